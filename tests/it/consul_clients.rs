//! Third-party Consul clients, unchanged, against `skyline registry` run as a process.
//!
//! The clients are installed by `scripts/install-deps` from their package registries; a test
//! fails (it does not skip) when its client is missing.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::StderrLog;

const SKYLINE: &str = env!("CARGO_BIN_EXE_skyline");
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

/// A `skyline registry` process on a free loopback port with an empty data directory.
struct RegistryProcess {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl RegistryProcess {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(SKYLINE)
            .args([
                "registry",
                "--log-format",
                "json",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("SKYLINE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = StderrLog::follow(&mut child)
            .wait_for("registry started")
            .await;
        let addr = started["addr"].as_str().unwrap().to_owned();
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_registers_checks_queries_blocks_and_uses_kv_maintenance_and_events() {
    let registry = RegistryProcess::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/py_consul_client.py"
    );
    let run = Command::new("python3")
        .arg(script)
        .arg(&registry.addr)
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
    registry.stop().await;
}
