//! `skyline status`: every agent and bridge publishes the catalog version it routes with; the
//! command shows who is on the registry's newest version, who lags and since when, and who is
//! not ready. Real processes: a registry, three agents and a bridge; one agent is frozen with
//! SIGSTOP while the catalog changes.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// `skyline status --json` (and the human text with `json = false`) against `registry`, or
/// against etcd when `registry` is `--catalog=etcd --etcd-endpoints=...`.
async fn status(registry: &str, json: bool) -> Result<String, String> {
    let mut command = tokio::process::Command::new(SKYLINE);
    command.arg("status");
    match registry.strip_prefix("etcd:") {
        Some(endpoints) => command.args(["--catalog=etcd", "--etcd-endpoints", endpoints]),
        None => command.args(["--registry", registry]),
    };
    if json {
        command.arg("--json");
    }
    let out = command.output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The status once `done` holds for it (bounded: `tries` × 100 ms).
async fn status_until(
    registry: &str,
    what: &str,
    tries: u32,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..tries {
        if let Ok(text) = status(registry, true).await {
            last = serde_json::from_str(&text).unwrap();
            if done(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: never seen; last status: {last:#}");
}

fn proxy<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {status:#}"))
}

fn all_on_newest(s: &Value, count: usize) -> bool {
    s["proxies"].as_array().is_some_and(|p| p.len() == count) && s["on_newest"] == count
}

fn register(registry: &str, name: &str, port: &str) {
    let out = std::process::Command::new(SKYLINE)
        .args([
            "register",
            "--registry",
            registry,
            "--name",
            name,
            "--port",
            port,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn signal(process: &Skyline, name: &str) {
    let pid = process.child.id().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_one_frozen_agent_lagging_on_its_old_version_until_it_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry_process, registry) = Skyline::registry(dir.path()).await;
    let agent = |node: &str| {
        Skyline::start(
            &[
                "agent",
                "--catalog=consul",
                &format!("--consul={registry}"),
                &format!("--node-name={node}"),
                "--outbound=127.0.0.1:0",
                "--inbound=127.0.0.1:0",
                "--admin=127.0.0.1:0",
            ],
            &[],
        )
    };
    let _a = agent("node-a");
    let b = agent("node-b");
    let c = agent("node-c");
    // A bridge that finds its gateways in the catalog, where there is none: not ready.
    let _bridge = Skyline::start(
        &[
            "bridge",
            &format!("--consul={registry}"),
            "--listen=127.0.0.1:0",
            "--admin=127.0.0.1:0",
        ],
        &[],
    );

    // Everyone reports, and converges on a change of the catalog.
    let first = status_until(&registry, "four proxies on the newest version", 300, |s| {
        all_on_newest(s, 4)
    })
    .await;
    register(&registry, "web", "8080");
    let converged = status_until(&registry, "all on the version with web", 300, |s| {
        s["newest"].as_u64() > first["newest"].as_u64() && all_on_newest(s, 4)
    })
    .await;
    let before = converged["newest"].as_u64().unwrap();
    for name in ["node-a", "node-b", "node-c"] {
        assert_eq!(proxy(&converged, name)["version"], before, "{converged:#}");
        assert_eq!(proxy(&converged, name)["ready_now"], true, "{converged:#}");
    }
    let bridge = converged["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "bridge")
        .unwrap();
    assert_eq!(bridge["ready_now"], false, "{converged:#}");
    assert!(
        bridge["why_not_ready"][0]
            .as_str()
            .unwrap()
            .contains("no passing skyline-gateway instance"),
        "{converged:#}"
    );

    // Frozen, node-b keeps its table while the catalog changes: exactly it lags, on the old
    // version; the others move to the newest.
    signal(&b, "STOP");
    register(&registry, "api", "8081");
    let lagging = status_until(&registry, "node-b lagging alone", 300, |s| {
        s["newest"].as_u64() > Some(before) && s["on_newest"] == 3
    })
    .await;
    let newest = lagging["newest"].as_u64().unwrap();
    for p in lagging["proxies"].as_array().unwrap() {
        if p["name"] == "node-b" {
            assert_eq!(p["version"], before, "{lagging:#}");
            assert_eq!(p["on_newest"], false, "{lagging:#}");
        } else {
            assert_eq!(p["version"], newest, "{lagging:#}");
            assert_eq!(p["on_newest"], true, "{lagging:#}");
        }
    }
    assert_eq!(lagging["oldest"], before);
    let text = status(&registry, false).await.unwrap();
    assert!(
        text.contains("3 of 4 proxies on the newest version"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "oldest: version {before} on agent node-b, behind for at least"
        )),
        "{text}"
    );

    // Its admin listener stops passing its check (TTL 10 s): node-b is shown not ready.
    let stuck = status_until(&registry, "node-b not ready", 400, |s| {
        proxy(s, "node-b")["ready_now"] == false
    })
    .await;
    assert_eq!(
        proxy(&stuck, "node-b")["why_not_ready"][0],
        "its skyline-admin check is critical",
        "{stuck:#}"
    );
    assert_eq!(proxy(&stuck, "node-a")["ready_now"], true, "{stuck:#}");

    // Thawed, it catches up and is ready again.
    signal(&b, "CONT");
    status_until(&registry, "node-b caught up and ready", 300, |s| {
        all_on_newest(s, 4) && proxy(s, "node-b")["ready_now"] == true
    })
    .await;

    // A proxy that stops takes its report with it.
    c.sigterm();
    c.exited_cleanly().await;
    let after = status_until(&registry, "node-c's report gone", 100, |s| {
        s["proxies"].as_array().is_some_and(|p| p.len() == 3)
    })
    .await;
    assert!(
        after["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "node-c"),
        "{after:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyline_ups_own_agent_reports_the_registrys_newest_version_like_an_agent_following_it_over_http()
 {
    let dir = tempfile::tempdir().unwrap();
    let registry = crate::support::free_addr("127.0.0.1");
    let data = dir.path().join("up");
    let _up = Skyline::start(
        &[
            "up",
            "--outbound=127.0.0.1:0",
            "--inbound=127.0.0.1:0",
            "--admin=127.0.0.1:0",
            &format!("--registry={registry}"),
            "--dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    status_until(
        &registry,
        "up's own agent on the newest version",
        300,
        |s| all_on_newest(s, 1),
    )
    .await;
    // An agent on another node follows up's registry over HTTP: both compute the version alike.
    let _other = Skyline::start(
        &[
            "agent",
            "--catalog=consul",
            &format!("--consul={registry}"),
            "--node-name=node-b",
            "--outbound=127.0.0.1:0",
            "--inbound=127.0.0.1:0",
            "--admin=127.0.0.1:0",
        ],
        &[],
    );
    let first = status_until(&registry, "both proxies on the newest version", 300, |s| {
        all_on_newest(s, 2)
    })
    .await;
    let local = proxy(&first, "local");
    assert!(local["version"].as_u64().is_some(), "{first:#}");
    assert_eq!(
        local["catalog"].as_str().unwrap(),
        format!("embedded:{registry}")
    );

    // Every change reaches up's agent too: it moves to the newer version with the other one.
    register(&registry, "web", "8080");
    let after = status_until(&registry, "both on the version with web", 300, |s| {
        s["newest"].as_u64() > first["newest"].as_u64() && all_on_newest(s, 2)
    })
    .await;
    let newest = after["newest"].as_u64().unwrap();
    for name in ["local", "node-b"] {
        assert_eq!(proxy(&after, name)["version"], newest, "{after:#}");
        assert_eq!(proxy(&after, name)["on_newest"], true, "{after:#}");
    }
    let text = status(&registry, false).await.unwrap();
    assert!(
        text.contains("2 of 2 proxies on the newest version"),
        "{text}"
    );
    assert!(
        text.contains("every proxy routes with the newest version"),
        "{text}"
    );
    assert!(!text.contains("lagging"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_following_etcd_report_the_revision_they_route_with_and_the_frozen_one_lags_alone() {
    let _one = crate::etcd::ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = crate::etcd::EtcdCluster::start(1).await;
    let endpoints = cluster.endpoints().join(",");
    let etcd = format!("etcd:{endpoints}");
    let agent = |node: &str| {
        Skyline::start(
            &[
                "agent",
                "--catalog=etcd",
                &format!("--etcd-endpoints={endpoints}"),
                &format!("--node-name={node}"),
                "--node-address=127.0.0.1",
                "--outbound=127.0.0.1:0",
                "--inbound=127.0.0.1:0",
                "--admin=127.0.0.1:0",
            ],
            &[],
        )
    };
    let _a = agent("node-a");
    let b = agent("node-b");
    let first = status_until(&etcd, "both agents on etcd's newest revision", 300, |s| {
        all_on_newest(s, 2)
    })
    .await;
    assert!(
        first["newest_of"].as_str().unwrap().contains("skyline/"),
        "{first:#}"
    );
    let etcd_register = |name: &str, port: &str| {
        let out = std::process::Command::new(SKYLINE)
            .args(["register", "--catalog=etcd", "--etcd-endpoints", &endpoints])
            .args(["--name", name, "--port", port, "--node", "node-a"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Frozen, node-b keeps its table while the catalog changes: exactly it lags.
    signal(&b, "STOP");
    let before = proxy(&first, "node-b")["version"].as_u64().unwrap();
    etcd_register("web", "8080");
    let lagging = status_until(&etcd, "node-b lagging alone", 300, |s| {
        s["newest"].as_u64() > Some(before) && s["on_newest"] == 1
    })
    .await;
    let newest = lagging["newest"].as_u64().unwrap();
    assert_eq!(proxy(&lagging, "node-a")["version"], newest, "{lagging:#}");
    assert_eq!(proxy(&lagging, "node-a")["on_newest"], true, "{lagging:#}");
    assert_eq!(proxy(&lagging, "node-b")["on_newest"], false, "{lagging:#}");
    assert!(
        proxy(&lagging, "node-b")["version"].as_u64().unwrap() < newest,
        "{lagging:#}"
    );
    let text = status(&etcd, false).await.unwrap();
    assert!(
        text.contains("1 of 2 proxies on the newest version"),
        "{text}"
    );
    assert!(
        text.contains("on agent node-b, behind for at least"),
        "{text}"
    );

    // Thawed, it catches up.
    signal(&b, "CONT");
    let thawed = status_until(&etcd, "node-b caught up", 300, |s| all_on_newest(s, 2)).await;
    assert!(thawed["newest"].as_u64() >= Some(newest), "{thawed:#}");

    // A delete leaves no key behind, and is still the newest change.
    let out = std::process::Command::new(SKYLINE)
        .args([
            "deregister",
            "--catalog=etcd",
            "--etcd-endpoints",
            &endpoints,
        ])
        .arg("web-node-a-8080")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted = status_until(&etcd, "both on the revision of the delete", 300, |s| {
        s["newest"].as_u64() > thawed["newest"].as_u64() && all_on_newest(s, 2)
    })
    .await;
    assert_eq!(
        proxy(&deleted, "node-a")["version"],
        deleted["newest"],
        "{deleted:#}"
    );
}

#[tokio::test]
async fn status_of_a_catalog_file_says_a_file_has_no_shared_version() {
    let out = tokio::process::Command::new(SKYLINE)
        .args(["status", "--catalog=file"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a catalog file has no version shared between proxies"),
        "{err}"
    );
}
