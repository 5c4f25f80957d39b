//! Agents register the services their config declares, as the shipped binary runs: with etcd
//! (node and services under the agent's lease, checks run by the agent), and with every catalog
//! a `[[service]]` change applied on SIGHUP. No test here writes an instance into etcd itself:
//! agents do, or the `skyline register` command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::etcd::{EtcdCluster, ONE_CLUSTER_AT_A_TIME};
use crate::processes::{sighup, sigterm};
use crate::support::*;

/// The lease TTL agents use (`catalog::etcd::register::DEFAULT_TTL`).
const LEASE_TTL: Duration = Duration::from_secs(10);

/// A `skyline agent` process on `ip`, configured by the file `config` (rewritten by tests
/// before a SIGHUP), with its addresses read from its JSON log.
struct Agent {
    child: Child,
    outbound: String,
    inbound: String,
    admin: String,
    log: StderrLog,
    config: PathBuf,
}

impl Agent {
    async fn start(name: &str, ip: &str, catalog: &[String], config: PathBuf) -> Self {
        let mut child = Command::new(SKYLINE)
            .args(["agent", "--log-format", "json", "--node-name", name])
            .args(["--node-address", ip])
            .args(["--outbound", &format!("{ip}:0")])
            .args(["--inbound", &format!("{ip}:0")])
            .args(["--admin", &format!("{ip}:0")])
            .args(catalog)
            .arg("--config")
            .arg(&config)
            // With the registration's retries (debug), to tell them from its warnings.
            .env("SKYLINE_LOG", "info,skyline::registration=debug")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut log = StderrLog::follow(&mut child);
        let started = log.wait_for("agent started").await;
        let field = |k: &str| started[k].as_str().unwrap().to_owned();
        Self {
            outbound: field("outbound"),
            inbound: field("inbound"),
            admin: field("admin"),
            child,
            log,
            config,
        }
    }

    /// Rewrites the config file and sends SIGHUP; waits until the agent says it reloaded.
    async fn reload(&mut self, text: &str) {
        write_atomically(&self.config, text);
        sighup(&self.child);
        let outcome = self.log.wait_for("configuration reloaded").await;
        assert_eq!(outcome["outcome"], "Applied", "{outcome}");
    }

    async fn get(&self, client: &Client, service: &str) -> Reply {
        client
            .get(&format!("http://{}/service/{service}/x", self.outbound))
            .await
    }

    async fn readyz(&self, client: &Client) -> serde_json::Value {
        client
            .get(&format!("http://{}/readyz", self.admin))
            .await
            .json()
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        sigterm(&self.child);
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// Polls `agent` for `service` every 50 ms until `done` holds for the reply; panics with
/// `what` and the last reply after `limit`. Returns how long it took.
async fn wait_reply(
    agent: &Agent,
    service: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Reply) -> bool,
) -> Duration {
    let client = Client::new();
    let started = Instant::now();
    loop {
        let reply = agent.get(&client, service).await;
        if done(&reply) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; last reply {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn routed(reply: &Reply) -> bool {
    reply.status == 200
}

fn unknown(reply: &Reply) -> bool {
    reply.mesh_error() == Some("unknown-service")
}

/// A `[[service]]` entry for `name` listening at `app`, with a TTL check of 1 s (a TCP probe of
/// the port every ~330 ms).
fn service_toml(name: &str, app: &TestApp) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\ncheck = {{ ttl = \"1s\" }}\n\n",
        app.addr.ip(),
        app.addr.port()
    )
}

fn etcd_args(cluster: &EtcdCluster) -> Vec<String> {
    vec![
        "--catalog".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        cluster.endpoints().join(","),
    ]
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `skyline <args>` to completion; its stdout, after asserting it succeeded.
async fn cli(args: &[String]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(SKYLINE)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "skyline {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_etcd_route_to_the_services_they_declare_and_a_killed_agents_vanish_within_its_lease_ttl()
 {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let args = etcd_args(&cluster);
    let a = Agent::start(
        "a",
        "127.0.0.2",
        &args,
        write_config(dir.path(), "a.toml", ""),
    )
    .await;
    let b_config = write_config(dir.path(), "b.toml", &service_toml("web", &web));
    let mut b = Agent::start("b", "127.0.0.3", &args, b_config).await;

    wait_reply(&a, "web", Duration::from_secs(30), "a routes web", routed).await;
    let client = Client::new();
    let reply = a.get(&client, "web").await;
    assert_eq!(reply.body, "web /x", "through b's inbound to the app");
    let ready = a.readyz(&client).await;
    assert_eq!(ready["catalog_error"], serde_json::Value::Null, "{ready}");
    assert_eq!(ready["services"], 1, "{ready}");

    // kill -9: nothing revokes the lease; the instance goes when the lease expires.
    b.child.start_kill().unwrap();
    let killed = Instant::now();
    b.child.wait().await.unwrap();
    let gone = wait_reply(
        &a,
        "web",
        LEASE_TTL + Duration::from_secs(10),
        "web vanishes after b is killed",
        unknown,
    )
    .await;
    let gone = gone.max(killed.elapsed());
    println!("web vanished {gone:?} after kill -9 of its agent (lease TTL {LEASE_TTL:?})");
    assert!(
        gone <= LEASE_TTL + Duration::from_secs(3),
        "within the lease TTL (plus etcd's expiry tick): {gone:?}"
    );
    assert!(
        gone >= Duration::from_secs(2),
        "kept until the lease expired, not dropped at once: {gone:?}"
    );
    assert_eq!(a.readyz(&client).await["services"], 0);
    a.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_agent_on_etcd_takes_its_services_away_at_once() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let args = etcd_args(&cluster);
    let a = Agent::start(
        "a",
        "127.0.0.2",
        &args,
        write_config(dir.path(), "a.toml", ""),
    )
    .await;
    let b_config = write_config(dir.path(), "b.toml", &service_toml("web", &web));
    let b = Agent::start("b", "127.0.0.3", &args, b_config).await;
    wait_reply(&a, "web", Duration::from_secs(30), "a routes web", routed).await;

    let stopping = Instant::now();
    b.stop().await;
    let gone = wait_reply(
        &a,
        "web",
        Duration::from_secs(5),
        "web vanishes after b's SIGTERM",
        unknown,
    )
    .await;
    let gone = gone.max(stopping.elapsed());
    println!("web vanished {gone:?} after SIGTERM of its agent");
    assert!(gone < LEASE_TTL / 2, "revoked, not expired: {gone:?}");
    a.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_services_and_deregister_work_against_etcd_from_the_command_line() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let api = TestApp::spawn("api", ip("127.0.0.3"));
    let args = etcd_args(&cluster);
    let a = Agent::start(
        "a",
        "127.0.0.2",
        &args,
        write_config(dir.path(), "a.toml", ""),
    )
    .await;
    let b_config = write_config(dir.path(), "b.toml", &service_toml("web", &web));
    let b = Agent::start("b", "127.0.0.3", &args, b_config).await;
    wait_reply(&a, "web", Duration::from_secs(30), "a routes web", routed).await;

    let with = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .map(|s| s.to_string())
            .chain(args.iter().cloned())
            .collect()
    };
    let port = api.addr.port().to_string();
    let out = cli(&with(&[
        "register", "--name", "api", "--port", &port, "--node", "b",
    ]))
    .await;
    let id = format!("api-b-{port}");
    assert_eq!(out.trim(), format!("registered {id}"));
    wait_reply(&a, "api", Duration::from_secs(30), "a routes api", routed).await;
    assert_eq!(a.get(&Client::new(), "api").await.body, "api /x");

    let listed: serde_json::Value =
        serde_json::from_str(&cli(&with(&["services", "--json"])).await).unwrap();
    let mut rows: Vec<(String, String, String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            (s("service"), s("id"), s("node"), s("health"))
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("api".into(), id.clone(), "b".into(), "passing".into()),
            (
                "web".into(),
                format!("web-b-{}", web.addr.port()),
                "b".into(),
                "passing".into()
            ),
        ]
    );
    let table = cli(&with(&["services"])).await;
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(table.contains(&format!("127.0.0.3:{port}")), "{table}");

    // Without a registered node, or with a check, etcd registration is refused.
    for bad in [
        vec![
            "register", "--name", "x", "--port", "1", "--node", "nowhere",
        ],
        vec![
            "register", "--name", "x", "--port", "1", "--node", "b", "--ttl", "5s",
        ],
        vec!["register", "--name", "x", "--port", "1"],
    ] {
        let output = Command::new(SKYLINE)
            .args(with(&bad))
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{bad:?} must fail");
    }

    let out = cli(&with(&["deregister", &id])).await;
    assert_eq!(out.trim(), format!("deregistered {id}"));
    wait_reply(&a, "api", Duration::from_secs(30), "api vanishes", unknown).await;
    assert!(routed(&a.get(&Client::new(), "web").await), "web stays");

    // An instance registered on b lives on b's lease: it goes when b stops.
    cli(&with(&[
        "register", "--name", "api", "--port", &port, "--node", "b",
    ]))
    .await;
    wait_reply(
        &a,
        "api",
        Duration::from_secs(30),
        "a routes api again",
        routed,
    )
    .await;
    b.stop().await;
    wait_reply(
        &a,
        "api",
        Duration::from_secs(5),
        "api goes with b",
        unknown,
    )
    .await;
    a.stop().await;
    web.stop().await;
    api.stop().await;
}

/// One catalog for the SIGHUP test: the agent's flags, and what else must run for it.
async fn sighup_adds_and_removes_a_service(catalog: &[String], dir: &Path, other: Option<&Agent>) {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let extra = TestApp::spawn("extra", ip("127.0.0.3"));
    let config = write_config(dir, "b.toml", &service_toml("web", &web));
    let mut b = Agent::start("b", "127.0.0.3", catalog, config).await;
    let from = other.unwrap_or(&b);
    wait_reply(from, "web", Duration::from_secs(30), "web routed", routed).await;
    assert!(unknown(&from.get(&Client::new(), "extra").await));

    b.reload(&(service_toml("web", &web) + &service_toml("extra", &extra)))
        .await;
    let from = other.unwrap_or(&b);
    wait_reply(
        from,
        "extra",
        Duration::from_secs(30),
        "extra added",
        routed,
    )
    .await;
    assert_eq!(from.get(&Client::new(), "extra").await.body, "extra /x");

    b.reload(&service_toml("extra", &extra)).await;
    let from = other.unwrap_or(&b);
    wait_reply(from, "web", Duration::from_secs(30), "web removed", unknown).await;
    assert!(
        routed(&from.get(&Client::new(), "extra").await),
        "extra stays"
    );
    b.stop().await;
    web.stop().await;
    extra.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_declared_services_with_the_embedded_registry_consul_and_etcd() {
    let dir = tempfile::tempdir().unwrap();
    // Embedded: the agent's own registry.
    let data = dir.path().join("data");
    let embedded = vec![
        "--catalog".to_owned(),
        "embedded".into(),
        "--registry".into(),
        "127.0.0.3:0".into(),
        "--data-dir".into(),
        data.to_str().unwrap().into(),
    ];
    sighup_adds_and_removes_a_service(&embedded, dir.path(), None).await;

    // Consul: agent b registers in the registry that agent a runs, and a routes.
    let data_a = dir.path().join("data-a");
    let registry = free_addr("127.0.0.2");
    let a_args = vec![
        "--catalog".to_owned(),
        "embedded".into(),
        "--registry".into(),
        registry.clone(),
        "--data-dir".into(),
        data_a.to_str().unwrap().into(),
    ];
    let a = Agent::start(
        "a",
        "127.0.0.2",
        &a_args,
        write_config(dir.path(), "a.toml", ""),
    )
    .await;
    let consul = vec![
        "--catalog".to_owned(),
        "consul".into(),
        "--consul".into(),
        registry,
    ];
    sighup_adds_and_removes_a_service(&consul, dir.path(), Some(&a)).await;
    a.stop().await;

    // etcd.
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    sighup_adds_and_removes_a_service(&etcd_args(&cluster), dir.path(), None).await;
}

/// Agent a on 127.0.0.2, whose catalog is a file listing `services` (name, port) on node b at
/// b's inbound proxy: a peer whose catalog has them whatever b's own says.
async fn peer_of_b(dir: &Path, b: &Agent, services: &[(&str, u16)]) -> Agent {
    let (_, inbound_port) = b.inbound.rsplit_once(':').unwrap();
    let mut catalog =
        format!("[[node]]\nname = \"b\"\naddress = \"127.0.0.3\"\ninbound_port = {inbound_port}\n");
    for (name, port) in services {
        catalog += &format!("\n[[service]]\nname = \"{name}\"\nnode = \"b\"\nport = {port}\n");
    }
    let catalog = write_config(dir, "catalog.toml", &catalog);
    let file = [
        "--catalog",
        "file",
        "--catalog-file",
        catalog.to_str().unwrap(),
    ]
    .map(String::from);
    Agent::start("a", "127.0.0.2", &file, write_config(dir, "a.toml", "")).await
}

/// Agent b follows a registry that goes down; on SIGHUP it declares a new service, `late`,
/// which it cannot register, so b's catalog (its last good one) does not show it. Agent a
/// routes `late` to b all the same: its own catalog has it (a file here, standing for a peer
/// whose catalog is ahead of b's, as when b's etcd watch is failing over). b's inbound serves
/// what b declares, refuses what it does not, and once the registry is back and b's catalog
/// shows the instance, the catalog's health rules over the declaration; a declaration removed
/// on SIGHUP is routed no more. b logs once that its catalog is failing, and once that it
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_declared_while_the_registry_is_down_is_served_to_peers_until_the_catalog_says_otherwise()
 {
    let dir = tempfile::tempdir().unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let late = TestApp::spawn("late", ip("127.0.0.3"));
    let registry_addr = free_addr("127.0.0.3");
    let data = dir.path().join("registry");
    let registry = Skyline::registry_at(&registry_addr, &data).await;
    let consul = ["--catalog", "consul", "--consul", &registry_addr].map(String::from);
    let b_config = write_config(dir.path(), "b.toml", &service_toml("web", &web));
    let mut b = Agent::start("b", "127.0.0.3", &consul, b_config).await;
    let client = Client::new();
    let services = |n: u64| move |ready: &serde_json::Value| ready["services"] == n;
    // web and b's admin listener (`skyline-admin`).
    readyz_until(&b.admin, services(2)).await;

    let port = late.addr.port();
    let a = peer_of_b(dir.path(), &b, &[("late", port), ("undeclared", port)]).await;

    registry.sigterm();
    registry.exited_cleanly().await;
    let failing = b
        .log
        .wait_for("consul catalog failing; keeping the last good catalog")
        .await;
    assert!(failing["error"].is_string(), "{failing}");
    b.reload(&(service_toml("web", &web) + &service_toml("late", &late)))
        .await;
    let ready = b.readyz(&client).await;
    assert_eq!(
        ready["services"], 2,
        "b's last catalog, without late: {ready}"
    );
    let reply = a.get(&client, "late").await;
    assert_eq!(
        reply.status, 200,
        "b's inbound serves its declared late: {reply:?}"
    );
    assert_eq!(reply.body, "late /x", "through b's inbound to the app");
    let reply = a.get(&client, "undeclared").await;
    assert_eq!(
        reply.mesh_error(),
        Some("unknown-service"),
        "b neither declares nor knows it: {reply:?}"
    );

    // The registry is back: b registers late, and its catalog shows it.
    let registry = Skyline::registry_at(&registry_addr, &data).await;
    readyz_until(&b.admin, services(3)).await;
    b.log.wait_for("consul catalog answers again").await;
    // late goes down: its TTL check turns critical, and once the inbound's drain grace for the
    // route it served is over, b answers from the catalog (no healthy instance) instead of
    // dialling the declared address; a, with no other node to try, relays b's answer.
    late.stop().await;
    let limit = Duration::from_secs(30);
    wait_reply(
        &a,
        "late",
        limit,
        "b refuses late once its check is critical",
        |r| r.status == 503 && r.mesh_error() == Some("no-healthy-endpoint"),
    )
    .await;
    // Declared no more: deregistered, and neither the catalog nor the declaration routes it.
    b.reload(&service_toml("web", &web)).await;
    wait_reply(
        &a,
        "late",
        limit,
        "b forgets late once it no longer declares it",
        |r| r.status == 404 && r.mesh_error() == Some("unknown-service"),
    )
    .await;
    a.stop().await;
    b.stop().await;
    web.stop().await;
    registry.sigterm();
    registry.exited_cleanly().await;
}

/// Agent b starts while its catalog does not answer, as a node rebooted during an outage does,
/// and serves at once instead of refusing to start: not ready, it answers a service it cannot
/// route with 503 `no-healthy-endpoint`, not sent (the service may exist: not 404), and its
/// inbound serves the service it declares to a peer that routes there (a, whose catalog is a
/// file standing for one that answers). Once `bring_up` has the catalog back, b logs that it
/// answered, registers, turns ready and routes by it. Returns what `bring_up` returned, to stop last.
async fn started_while_the_catalog_is_down<T>(
    catalog: &[String],
    bring_up: impl std::future::Future<Output = T>,
) -> T {
    let dir = tempfile::tempdir().unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let b_config = write_config(dir.path(), "b.toml", &service_toml("web", &web));
    let mut b = Agent::start("b", "127.0.0.3", catalog, b_config).await;
    let client = Client::new();

    let ready = b.readyz(&client).await;
    assert_eq!(ready["ready"], false, "no catalog read yet: {ready}");
    assert!(ready["catalog_error"].is_string(), "says why: {ready}");
    let reply = b.get(&client, "web").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"), "{reply:?}");
    assert!(
        reply.headers.contains_key("x-skyline-unsent"),
        "reached no application, so a caller may try elsewhere: {reply:?}"
    );

    let a = peer_of_b(dir.path(), &b, &[("web", web.addr.port())]).await;
    let reply = a.get(&client, "web").await;
    assert_eq!(
        reply.status, 200,
        "b's inbound serves what b declares: {reply:?}"
    );
    assert_eq!(reply.body, "web /x");

    let up = bring_up.await;
    b.log.wait_for("the catalog answered; routing by it").await;
    let ready = readyz_until(&b.admin, |r| r["ready"] == true && r["services"] != 0).await;
    assert_eq!(ready["catalog_error"], serde_json::Value::Null, "{ready}");
    let limit = Duration::from_secs(30);
    wait_reply(&b, "web", limit, "b routes web by its catalog", routed).await;
    assert_eq!(b.get(&client, "web").await.body, "web /x");
    a.stop().await;
    b.stop().await;
    web.stop().await;
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_its_registry_is_down_serves_at_once_and_routes_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let registry_addr = free_addr("127.0.0.3");
    let data = dir.path().join("registry");
    let consul = ["--catalog", "consul", "--consul", &registry_addr].map(String::from);
    let bring_up = Skyline::registry_at(&registry_addr, &data);
    // With a catch-all (an application standing for the gateways here), an agent without its
    // catalog sends every service there; it warns once that it cannot register, not at every
    // retry; stopped before its catalog ever answered, it exits cleanly, without waiting for it.
    let gateway = TestApp::spawn("gateway", ip("127.0.0.4"));
    let mut with_catch_all = consul.to_vec();
    with_catch_all.extend(["--catch-all".to_owned(), gateway.addr.to_string()]);
    let c_config = write_config(dir.path(), "c.toml", "");
    let mut c = Agent::start("c", "127.0.0.4", &with_catch_all, c_config).await;
    let reply = c.get(&Client::new(), "anything").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "gateway /service/anything/x", "{reply:?}");
    // Its registration (its admin listener) fails at every attempt: one warning, the retries
    // at debug.
    let failed = "registration failed; retrying";
    let count = |seen: &[Logged]| seen.iter().filter(|s| s.message == failed).count();
    let seen = c.log.until(|seen| count(seen) > 2).await;
    let warnings = seen
        .iter()
        .filter(|s| s.message == failed && s.level == "WARN")
        .count();
    assert_eq!(warnings, 1, "{seen:?}");
    c.stop().await;
    gateway.stop().await;
    let registry = started_while_the_catalog_is_down(&consul, bring_up).await;
    registry.sigterm();
    registry.exited_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_etcd_is_down_serves_at_once_and_routes_once_it_is_up() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start(1).await;
    let args = etcd_args(&cluster);
    cluster.kill_all();
    let bring_up = async {
        cluster.restart_all();
        cluster.wait_healthy().await;
    };
    started_while_the_catalog_is_down(&args, bring_up).await;
}
