//! Third-party Consul clients and a real program that depends on Consul, run unchanged against
//! `skyline registry` (the shipped binary, as a process): py-consul (PyPI) driven by a Python
//! script, the npm `consul` library driven by a Node script, and Patroni electing its PostgreSQL leader through sessions and a KV lock and
//! registering the cluster as a Consul service whose passing instance follows the leader.
//! What they need is installed by `scripts/install-deps`; a missing one fails the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::support::*;

/// The py-consul scenarios, in the order the script runs them (tests/clients/py_consul_client.py).
const PY_CONSUL_SCENARIOS: [&str; 13] = [
    "register_and_deregister",
    "ttl_pass_and_fail",
    "health_passing",
    "blocking_query",
    "catalog_register",
    "catalog_node",
    "catalog_deregister",
    "kv",
    "health_state_and_node",
    "agent_self_and_members",
    "check_register",
    "maintenance",
    "events",
];

/// `skyline registry` on an ephemeral loopback port, its address read from its log.
struct RegistryProcess {
    /// Killed on drop.
    _child: Child,
    addr: SocketAddr,
    _log: StderrLog,
}

impl RegistryProcess {
    async fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(SKYLINE)
            .args([
                "registry",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("SKYLINE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut log = StderrLog::follow(&mut child);
        let started = log.wait_for("registry started").await;
        let addr = started["addr"].as_str().unwrap().parse().unwrap();
        Self {
            _child: child,
            addr,
            _log: log,
        }
    }
}

async fn get_json(client: &Client, url: &str) -> Option<serde_json::Value> {
    let req = Request::get(url).body(Full::default()).unwrap();
    let reply = client.send(req).await.ok()?;
    (reply.status == 200)
        .then(|| serde_json::from_str(&reply.body).ok())
        .flatten()
}

// === py-consul ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_registers_checks_queries_blocks_and_uses_kv_maintenance_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryProcess::start(&dir.path().join("registry")).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/py_consul_client.py"
    );
    let run = Command::new("python3")
        .arg(script)
        .arg(registry.addr.to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the py-consul scenarios finish within 180 s")
        .expect("python3 runs (scripts/install-deps installs it and py-consul)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-consul failed against the registry:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.starts_with("py-consul 1.8.0 "),
        "not the pinned py-consul:\n{stdout}"
    );
    let done: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .collect();
    assert_eq!(done, PY_CONSUL_SCENARIOS, "{stdout}");
    drop(registry);
}

// === npm `consul` ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_consul_library_drives_services_checks_kv_sessions_locks_and_txn() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryProcess::start(&dir.path().join("registry")).await;
    let client_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node");
    assert!(
        client_dir.join("node_modules/consul").exists(),
        "the npm client is not installed: run scripts/install-deps"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new("node")
            .arg(client_dir.join("consul-client.js"))
            .env("CONSUL_ADDR", registry.addr.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client script finishes within 90 s")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the npm client failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    // Every step reported itself; the script exits non-zero on the first one that fails.
    for step in [
        "agent service register",
        "ttl pass",
        "ttl fail",
        "health passing",
        "blocking query",
        "catalog register",
        "kv cas",
        "kv recurse",
        "kv keys",
        "session create",
        "session renew",
        "session info",
        "session list",
        "lock refused to another session",
        "lock released",
        "session destroy",
        "txn",
        "agent service deregister",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {step}")),
            "step {step:?} did not pass:\n{stdout}"
        );
    }
}

// === Patroni ===

const PATRONI: &str = "/usr/bin/patroni";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SCOPE: &str = "skyline-it";

/// A Patroni node and its PostgreSQL, run as the `postgres` user with `setpriv` (which execs, so
/// the child's pid is Patroni's own). Dropping it kills both.
struct PatroniNode {
    name: String,
    dir: PathBuf,
    rest: u16,
    child: Option<Child>,
}

impl PatroniNode {
    fn start(name: &str, base: &Path, registry: SocketAddr) -> Self {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (rest, pg) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        let config = format!(
            "scope: {SCOPE}\n\
             name: {name}\n\
             restapi:\n  listen: 127.0.0.1:{rest}\n  connect_address: 127.0.0.1:{rest}\n\
             consul:\n  host: {registry}\n  register_service: true\n\
             bootstrap:\n  dcs:\n    ttl: 20\n    loop_wait: 1\n    retry_timeout: 5\n  initdb:\n  - encoding: UTF8\n\
             postgresql:\n  listen: 127.0.0.1:{pg}\n  connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n  bin_dir: {PG_BIN}\n  pgpass: {pgpass}\n\
             \x20 authentication:\n    superuser: {{username: postgres, password: postgres}}\n\
             \x20   replication: {{username: replicator, password: replicator}}\n\
             \x20 parameters:\n    unix_socket_directories: {sockets}\n\
             \x20 pg_hba:\n  - local all all trust\n  - host all all 127.0.0.1/32 trust\n\
             \x20 - host replication replicator 127.0.0.1/32 trust\n",
            data = dir.join("data").display(),
            pgpass = dir.join("pgpass").display(),
            sockets = dir.display(),
        );
        let config_path = dir.join("patroni.yml");
        std::fs::write(&config_path, config).unwrap();
        chown_to_postgres(&dir);
        let log = std::fs::File::create(dir.join("patroni.log")).unwrap();
        chown_to_postgres(&dir.join("patroni.log"));
        let child = Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                PATRONI,
            ])
            .arg(&config_path)
            .current_dir(&dir)
            .env("HOME", &dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("patroni starts (scripts/install-deps installs it)");
        Self {
            name: name.to_owned(),
            dir,
            rest,
            child: Some(child),
        }
    }

    /// Patroni's own view of its role (`master`/`primary`, `replica`, ...), `None` while its
    /// REST API does not answer.
    async fn role(&self, client: &Client) -> Option<String> {
        let status = get_json(client, &format!("http://127.0.0.1:{}/patroni", self.rest)).await?;
        status["role"].as_str().map(str::to_owned)
    }

    /// `kill -9` of Patroni and of its PostgreSQL's postmaster, as a crashed machine would.
    fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("patroni.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

fn chown_to_postgres(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown postgres {}", path.display());
}

fn is_primary(role: Option<&str>) -> bool {
    matches!(role, Some("master" | "primary"))
}

/// The registry's leader key: (holder's name, session).
async fn leader_key(client: &Client, registry: SocketAddr) -> Option<(String, String)> {
    let url = format!("http://{registry}/v1/kv/service/{SCOPE}/leader");
    let entry = get_json(client, &url).await?;
    let entry = &entry[0];
    let value = entry["Value"].as_str()?;
    use base64::Engine as _;
    let name = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    Some((
        String::from_utf8(name).ok()?,
        entry["Session"].as_str()?.to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_elects_a_leader_through_the_registry_and_a_replica_takes_over_when_it_is_killed() {
    assert!(
        Path::new(PATRONI).exists() && Path::new(PG_BIN).join("postgres").exists(),
        "patroni and postgresql are not installed: run scripts/install-deps"
    );
    let base = tempfile::tempdir().unwrap();
    let registry = RegistryProcess::start(&base.path().join("registry")).await;
    // PostgreSQL refuses to run as root and needs to reach its data directory.
    chown_to_postgres(base.path());
    let started = Instant::now();
    let client = Client::new();
    let mut nodes = [
        PatroniNode::start("pg1", base.path(), registry.addr),
        PatroniNode::start("pg2", base.path(), registry.addr),
    ];

    // A leader: one node is primary and holds the lock, the other replicates.
    let deadline = started + Duration::from_secs(100);
    let (leader, session) = loop {
        let roles = [nodes[0].role(&client).await, nodes[1].role(&client).await];
        let key = leader_key(&client, registry.addr).await;
        if let Some((holder, session)) = key {
            let leader = nodes.iter().position(|n| n.name == holder);
            if let Some(i) = leader {
                if is_primary(roles[i].as_deref()) && roles[1 - i].as_deref() == Some("replica") {
                    break (i, session);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader with a replica within 100 s: roles {roles:?}\n{}\n{}",
            nodes[0].log_tail(),
            nodes[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let elected = started.elapsed();
    let replica = 1 - leader;

    nodes[leader].kill_hard();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    loop {
        let role = nodes[replica].role(&client).await;
        let key = leader_key(&client, registry.addr).await;
        let holds_lock = key
            .as_ref()
            .is_some_and(|(holder, s)| *holder == nodes[replica].name && *s != session);
        if is_primary(role.as_deref()) && holds_lock {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica was not promoted within 60 s of the leader's death: role {role:?}, \
             leader key {key:?}\n{}",
            nodes[replica].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let failover = killed.elapsed();
    // Patroni registers the cluster as a Consul service, one instance per node, with an HTTP
    // check on its REST API that passes on the primary only: `?passing` follows the leader.
    let url = format!("http://{}/v1/health/service/{SCOPE}?passing", registry.addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let passing = get_json(&client, &url).await.unwrap_or_default();
        let ids: Vec<&str> = passing
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["Service"]["ID"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let tags = &passing[0]["Service"]["Tags"];
        let want = format!("{SCOPE}/{}", nodes[replica].name);
        if ids == [want.as_str()]
            && tags
                .as_array()
                .is_some_and(|t| t.contains(&"master".into()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the passing instances of service {SCOPE} never became just {want}: {passing}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The dead leader's session expired (TTL 10 s, invalidated after twice that).
    let sessions = get_json(
        &client,
        &format!("http://{}/v1/session/list", registry.addr),
    )
    .await
    .unwrap();
    assert!(
        sessions
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ID"] != session.as_str()),
        "{sessions}"
    );
    println!(
        "patroni: leader {} elected {:.1}s after start; {} promoted {:.1}s after kill -9",
        nodes[leader].name,
        elected.as_secs_f64(),
        nodes[replica].name,
        failover.as_secs_f64()
    );
    assert!(
        started.elapsed() < Duration::from_secs(170),
        "{:?}",
        started.elapsed()
    );
    drop(nodes);
    drop(registry);
}
