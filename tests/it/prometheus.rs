//! Prometheus finds every role's `/metrics` through the catalog: each agent, gateway and bridge
//! registers its admin listener as `skyline-admin`, `skyline prometheus-targets` keeps a
//! `file_sd_configs` file of them current, and Debian's Prometheus (which has no Consul
//! discovery) scrapes them all.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// The targets in `file` (a file_sd_configs JSON file) once `done` holds for them (bounded:
/// 30 s).
async fn targets_until(file: &std::path::Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(file) {
            // Written atomically: any text there parses.
            let groups: Vec<Value> = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", file.display()));
            if done(&groups) {
                return groups;
            }
            last = groups;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the targets never became what was expected: {last:#?}");
}

fn roles(groups: &[Value]) -> Vec<String> {
    let mut roles: Vec<String> = groups
        .iter()
        .map(|g| g["labels"]["role"].as_str().unwrap_or("").to_owned())
        .collect();
    roles.sort();
    roles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_roles_metrics_found_through_the_catalog() {
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: scripts/install-deps installs Debian's prometheus"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_registry_process, registry) = Skyline::registry(dir.path()).await;

    let agent_admin = free_addr("127.0.0.1");
    let _agent = Skyline::start(
        &[
            "agent",
            "--catalog=consul",
            &format!("--consul={registry}"),
            "--node-name=node-1",
            "--outbound=127.0.0.1:0",
            "--inbound=127.0.0.1:0",
            &format!("--admin={agent_admin}"),
        ],
        &[],
    );
    let gateway_admin = free_addr("127.0.0.1");
    let _gateway = Skyline::start(
        &[
            "gateway",
            &format!("--consul={registry}"),
            "--bridges=127.0.0.1:9",
            "--listen=127.0.0.1:0",
            &format!("--admin={gateway_admin}"),
        ],
        &[],
    );
    let bridge_admin = free_addr("127.0.0.1");
    let _bridge = Skyline::start(
        &[
            "bridge",
            &format!("--consul={registry}"),
            "--listen=127.0.0.1:0",
            &format!("--admin={bridge_admin}"),
        ],
        &[],
    );

    // One file, written once: every role's admin listener, labelled with its role.
    let file = dir.path().join("targets.json");
    let once = tokio::process::Command::new(SKYLINE)
        .args([
            "prometheus-targets",
            "--once",
            "--registry",
            &registry,
            "--out",
        ])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );

    // And kept current: the roles register within moments of starting.
    let mut follower = tokio::process::Command::new(SKYLINE)
        .args(["prometheus-targets", "--registry", &registry, "--out"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let groups = targets_until(&file, |g| roles(g) == ["agent", "bridge", "gateway"]).await;
    let target = |role: &str| {
        groups
            .iter()
            .find(|g| g["labels"]["role"] == role)
            .map(|g| g["targets"][0].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(target("agent"), agent_admin);
    assert_eq!(target("gateway"), gateway_admin);
    assert_eq!(target("bridge"), bridge_admin);
    let agent_group = groups
        .iter()
        .find(|g| g["labels"]["role"] == "agent")
        .unwrap();
    assert_eq!(agent_group["labels"]["node"], "node-1");

    // Debian's Prometheus with file_sd_configs over that file, scraping every second.
    let prometheus_addr = free_addr("127.0.0.1");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: skyline\n    scrape_interval: 1s\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n",
            file.display()
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prometheus_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Bounded: Prometheus starts, reads the file, and scrapes each target once (1 s apart).
    let client = Client::new();
    let url = format!("http://{prometheus_addr}/api/v1/targets?state=active");
    let mut last = Value::Null;
    let mut all_up = false;
    for _ in 0..600 {
        if let Ok(reply) = client.get_result(&url).await {
            if reply.status == 200 {
                last = reply.json();
                let active = last["data"]["activeTargets"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let up: Vec<String> = active
                    .iter()
                    .filter(|t| t["health"] == "up")
                    .map(|t| t["labels"]["role"].as_str().unwrap_or("").to_owned())
                    .collect();
                if ["agent", "bridge", "gateway"]
                    .iter()
                    .all(|r| up.iter().any(|u| u == r))
                {
                    all_up = true;
                    break;
                }
            }
        }
        assert!(
            prometheus.try_wait().unwrap().is_none(),
            "prometheus exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        all_up,
        "not every role's target is up in Prometheus: {last:#}"
    );
    let active = last["data"]["activeTargets"].as_array().unwrap();
    for t in active {
        let url = t["scrapeUrl"].as_str().unwrap();
        assert!(url.ends_with("/metrics"), "{url}");
    }
    drop(follower.kill().await);
}
