//! Faults on real processes under load: a restarted agent, a registry down for 30 s, a route
//! reload every 100 ms. Each test runs a paced keep-alive load on loopback throughout, prints
//! its request and failure counts, and asserts that no request failed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::support::*;
use skyline::serve;

// === Load ===

/// What a load run saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// The first few failures, for the assertion message.
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.failures.truncate(10);
    }
}

/// A paced load: `workers` keep-alive clients sharing `client`'s pool, together about `rate`
/// requests per second, each request answered 200 by an application or counted as failed.
/// Bounded: it stops when told, and by itself after [`Load::MAX_RUN`].
struct Load {
    stop: CancellationToken,
    workers: Vec<JoinHandle<Tally>>,
}

impl Load {
    const MAX_RUN: Duration = Duration::from_secs(120);

    fn start(client: Client, url: String, rate: u32, workers: u32) -> Self {
        let stop = CancellationToken::new();
        let url = Arc::new(url);
        let period = Duration::from_secs(1) * workers / rate;
        let workers = (0..workers)
            .map(|_| {
                let (stop, client, url) = (stop.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let deadline = Instant::now() + Self::MAX_RUN;
                    let mut ticks = tokio::time::interval(period);
                    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            _ = ticks.tick() => {}
                        }
                        if Instant::now() > deadline {
                            break;
                        }
                        match check(client.get_result(&url).await) {
                            Ok(()) => tally.ok += 1,
                            Err(failure) => {
                                tally.failed += 1;
                                if tally.failures.len() < 10 {
                                    tally.failures.push(failure);
                                }
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        Self { stop, workers }
    }

    async fn finish(self) -> Tally {
        self.stop.cancel();
        let mut total = Tally::default();
        for worker in self.workers {
            total.add(worker.await.unwrap());
        }
        total
    }
}

/// A success is a 200 from an application: no mesh error, nothing lost on the way.
fn check(reply: Result<Reply, String>) -> Result<(), String> {
    match reply {
        Ok(reply) if reply.status == 200 && reply.mesh_error().is_none() => Ok(()),
        Ok(reply) => Err(format!(
            "{} {:?}: {}",
            reply.status,
            reply.mesh_error(),
            reply.body
        )),
        Err(error) => Err(error),
    }
}

async fn get_json(url: &str) -> serde_json::Value {
    Client::new().get(url).await.json()
}

// === An agent restarted on inherited sockets ===

/// The catalog of the restart test: service `web` on node `local` at 127.0.0.1.
fn local_catalog(inbound_port: u16, app: SocketAddr) -> String {
    format!(
        "[[node]]\nname = \"local\"\naddress = \"127.0.0.1\"\ninbound_port = {inbound_port}\n\n\
         [[service]]\nname = \"web\"\nnode = \"local\"\nport = {}\n",
        app.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_on_inherited_sockets_under_load_fails_no_request() {
    const RESTARTS: usize = 3;
    let app = TestApp::spawn("web", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    // The supervisor's sockets, held for the whole test as systemd's socket unit holds them.
    let outbound = supervised_socket("127.0.0.1");
    let inbound = supervised_socket("127.0.0.1");
    let admin = supervised_socket("127.0.0.1");
    let catalog = dir.path().join("catalog.toml");
    write_atomically(&catalog, &local_catalog(port(&inbound), app.addr));
    let args = [
        "agent",
        "--node-name",
        "local",
        "--catalog",
        "file",
        "--catalog-file",
        catalog.to_str().unwrap(),
        // Never bound: the inherited sockets replace them.
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let sockets = [
        ("outbound", &outbound),
        ("inbound", &inbound),
        ("admin", &admin),
    ];
    let start = || async {
        let mut agent = Skyline::start(&args, &sockets);
        let started = agent.log.wait_for("agent started").await;
        assert_eq!(
            started["outbound"],
            outbound.local_addr().unwrap().to_string(),
            "serves the inherited socket"
        );
        agent
    };

    let mut agent = start().await;
    let url = format!("http://{}/service/web/", outbound.local_addr().unwrap());
    until_ok(&url).await;
    // A client that keeps idle connections for less than the drain's idle grace: the server
    // never closes a connection this client may still pick (see the README's Operations).
    let client = Client::with_idle_timeout(serve::DRAIN_IDLE_GRACE / 2);
    let load = Load::start(client, url.clone(), 200, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pids = vec![agent.child.id().unwrap()];
    for restart in 0..RESTARTS {
        agent.sigterm();
        if restart == 1 {
            // The new process starts while the old one drains (both on the same sockets).
            let new = start().await;
            agent.exited_cleanly().await;
            agent = new;
        } else {
            // systemd's order: the old process is gone before the new one starts; meanwhile
            // connections wait in the backlog.
            agent.exited_cleanly().await;
            agent = start().await;
        }
        pids.push(agent.child.id().unwrap());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let tally = load.finish().await;
    let served = app.hits();
    eprintln!(
        "agent restarted {RESTARTS} times under load: {} requests, {} ok, {} failed; pids {pids:?}",
        tally.ok + tally.failed,
        tally.ok,
        tally.failed
    );
    assert_eq!(tally.failed, 0, "failures: {:?}", tally.failures);
    assert!(tally.ok >= 200, "the load ran: {} requests", tally.ok);
    assert!(served >= tally.ok, "every success reached the application");
    // The last agent serves on the same sockets, admin included.
    let routes = get_json(&format!("http://{}/routes", admin.local_addr().unwrap())).await;
    assert_eq!(
        routes["outbound"]["web"]["endpoints"][0]["addr"],
        inbound.local_addr().unwrap().to_string()
    );
    agent.sigterm();
    agent.exited_cleanly().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_named_for_no_listener_of_the_role_is_refused_at_start() {
    let socket = supervised_socket("127.0.0.1");
    // Ports 0: the refusal must not depend on the default ports being free on this machine.
    let args = [
        "agent",
        "--admin",
        "off",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
    ];
    let mut agent = Skyline::start(&args, &[("gateway", &socket)]);
    let status = tokio::time::timeout(Duration::from_secs(20), agent.child.wait())
        .await
        .expect("the agent refuses to start")
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let mut stderr = String::new();
    let read_all = async {
        while let Some(line) = agent.log.next().await {
            stderr.push_str(&line);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .unwrap();
    assert!(
        stderr.contains("inherited socket \"gateway\" is not a listener of this role")
            && stderr.contains("outbound, inbound, admin, registry"),
        "{stderr}"
    );
}

// === The registry down for 30 s ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_down_for_30s_under_load_fails_no_request() {
    const DOWN: Duration = Duration::from_secs(30);
    let app = TestApp::spawn("web", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let registry_addr = free_addr("127.0.0.61");
    let data_dir = dir.path().to_str().unwrap();
    let registry_args = [
        "registry",
        "--listen",
        &registry_addr,
        "--data-dir",
        data_dir,
        "--node-name",
        "registry",
    ];
    let mut registry = Skyline::start(&registry_args, &[]);
    registry.log.wait_for("registry started").await;
    let mut agent = Skyline::start(
        &[
            "agent",
            "--node-name",
            "local",
            "--catalog",
            "consul",
            "--consul",
            &registry_addr,
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[],
    );
    let started = agent.log.wait_for("agent started").await;
    let field = |name: &str| started[name].as_str().unwrap().to_owned();
    let (outbound, inbound, admin) = (field("outbound"), field("inbound"), field("admin"));
    let inbound_port = inbound.rsplit(':').next().unwrap();
    let register = serde_json::json!({
        "Node": "local",
        "Address": "127.0.0.1",
        "NodeMeta": { "skyline-inbound-port": inbound_port },
        "Service": { "ID": "web-1", "Service": "web", "Port": app.addr.port() },
    });
    skyline::registry::client::RegistryClient::new(registry_addr.parse().unwrap())
        .put_json("/v1/catalog/register", &register)
        .await
        .unwrap();
    let url = format!("http://{outbound}/service/web/");
    until_ok(&url).await;
    let load = Load::start(Client::new(), url, 200, 4);
    tokio::time::sleep(Duration::from_secs(3)).await;

    registry.child.kill().await.unwrap();
    let killed = Instant::now();
    let noticed = readyz_until(&admin, |r| !r["catalog_error"].is_null()).await;
    tokio::time::sleep_until(killed + DOWN).await;
    let later = get_json(&format!("http://{admin}/readyz")).await;
    let (age_noticed, age_later) = (
        noticed["catalog_age_seconds"].as_f64().unwrap(),
        later["catalog_age_seconds"].as_f64().unwrap(),
    );
    assert_eq!(
        later["ready"], true,
        "routing goes on from the last catalog"
    );
    assert!(!later["catalog_error"].is_null(), "{later}");
    assert!(
        age_later > age_noticed + 10.0,
        "the catalog grows older while the registry is down: {age_noticed} then {age_later}"
    );

    let mut registry = Skyline::start(&registry_args, &[]);
    registry.log.wait_for("registry started").await;
    let back = readyz_until(&admin, |r| r["catalog_error"].is_null()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tally = load.finish().await;
    eprintln!(
        "registry killed for {:.1} s under load: {} requests, {} ok, {} failed; \
         /readyz while down: {}; catalog age {age_noticed:.1} s then {age_later:.1} s",
        DOWN.as_secs_f64(),
        tally.ok + tally.failed,
        tally.ok,
        tally.failed,
        later["catalog_error"]
    );
    assert_eq!(tally.failed, 0, "failures: {:?}", tally.failures);
    assert!(tally.ok >= 1000, "the load ran: {} requests", tally.ok);
    // Its `[[service]]` and its admin listener (`skyline-admin`, for Prometheus).
    assert_eq!(back["services"], 2, "the registration survived: {back}");
    agent.sigterm();
    agent.exited_cleanly().await;
    registry.sigterm();
    registry.exited_cleanly().await;
    app.stop().await;
}

// === A route reload every 100 ms ===

/// Catalog number `step` of a cycle of four that all serve `web`: instances come and go,
/// weights change, and node `b` joins and leaves with its instance.
fn reload_catalog(step: usize, a_inbound: u16, b_inbound: u16, apps: [&TestApp; 3]) -> String {
    let [a1, a2, b1] = apps.map(|app| app.addr.port());
    let node_a =
        format!("[[node]]\nname = \"a\"\naddress = \"127.0.0.71\"\ninbound_port = {a_inbound}\n");
    let node_b =
        format!("[[node]]\nname = \"b\"\naddress = \"127.0.0.72\"\ninbound_port = {b_inbound}\n");
    let web = |node: &str, port: u16, weight: u32| {
        format!(
            "[[service]]\nname = \"web\"\nnode = \"{node}\"\nport = {port}\nweight = {weight}\n"
        )
    };
    match step % 4 {
        0 => [node_a, node_b, web("a", a1, 1), web("b", b1, 1)].concat(),
        1 => [node_a, web("a", a1, 3), web("a", a2, 1)].concat(),
        2 => [node_a, node_b, web("a", a2, 2), web("b", b1, 5)].concat(),
        _ => [node_a, web("a", a1, 1)].concat(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_reload_every_100ms_under_load_fails_no_request() {
    const RELOADS: usize = 100;
    let a1 = TestApp::spawn("web@a1", ip("127.0.0.71"));
    let a2 = TestApp::spawn("web@a2", ip("127.0.0.71"));
    let b1 = TestApp::spawn("web@b1", ip("127.0.0.72"));
    // The agents' sockets are bound here so the catalog can name their ports before they start.
    let a_outbound = supervised_socket("127.0.0.71");
    let a_inbound = supervised_socket("127.0.0.71");
    let a_admin = supervised_socket("127.0.0.71");
    let b_inbound = supervised_socket("127.0.0.72");
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    let write = |step: usize| {
        let text = reload_catalog(step, port(&a_inbound), port(&b_inbound), [&a1, &a2, &b1]);
        write_atomically(&catalog, &text);
    };
    write(0);
    let catalog_path = catalog.to_str().unwrap();
    let agent_args = |node: &'static str, ip: &'static str| {
        vec![
            "agent",
            "--node-name",
            node,
            "--node-address",
            ip,
            "--catalog",
            "file",
            "--catalog-file",
            catalog_path,
            // Off unless inherited: the sockets passed replace them.
            "--outbound",
            "off",
            "--inbound",
            "off",
            "--admin",
            "off",
        ]
    };
    let mut agent_a = Skyline::start(
        &agent_args("a", "127.0.0.71"),
        &[
            ("outbound", &a_outbound),
            ("inbound", &a_inbound),
            ("admin", &a_admin),
        ],
    );
    let mut agent_b = Skyline::start(&agent_args("b", "127.0.0.72"), &[("inbound", &b_inbound)]);
    agent_a.log.wait_for("agent started").await;
    agent_b.log.wait_for("agent started").await;
    let url = format!("http://{}/service/web/", a_outbound.local_addr().unwrap());
    until_ok(&url).await;
    until_ok(&format!(
        "http://{}/service/web/",
        b_inbound.local_addr().unwrap()
    ))
    .await;
    let routes = format!("http://{}/routes", a_admin.local_addr().unwrap());
    let version_before = get_json(&routes).await["version"].as_u64().unwrap();
    let hits_before = [a1.hits(), a2.hits(), b1.hits()];

    let load = Load::start(Client::new(), url, 200, 4);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    for step in 1..=RELOADS {
        ticks.tick().await;
        write(step);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.finish().await;
    let versions = get_json(&routes).await["version"].as_u64().unwrap() - version_before;
    let hits = [a1.hits(), a2.hits(), b1.hits()]
        .iter()
        .zip(hits_before)
        .map(|(after, before)| after - before)
        .collect::<Vec<_>>();
    eprintln!(
        "{RELOADS} catalog rewrites 100 ms apart under load: {} requests, {} ok, {} failed; \
         {versions} route-table versions on agent a; hits a1/a2/b1 {hits:?}",
        tally.ok + tally.failed,
        tally.ok,
        tally.failed
    );
    assert_eq!(tally.failed, 0, "failures: {:?}", tally.failures);
    assert!(tally.ok >= 500, "the load ran: {} requests", tally.ok);
    assert!(
        versions >= RELOADS as u64 / 4,
        "the agent went through the reloads: {versions} versions for {RELOADS} rewrites"
    );
    assert!(
        hits.iter().all(|&h| h > 0),
        "every instance served in turn: {hits:?}"
    );
    for agent in [agent_a, agent_b] {
        agent.sigterm();
        agent.exited_cleanly().await;
    }
    for app in [a1, a2, b1] {
        app.stop().await;
    }
}
