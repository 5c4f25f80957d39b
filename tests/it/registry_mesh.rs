//! Agents routing from the registry: one agent runs it embedded, another follows it over the
//! Consul API; registrations, health changes and deregistrations reach routing.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::support::*;
use skyline::agent::{self, AgentHandle, Settings};
use skyline::catalog::CatalogSource;
use skyline::registry::client::RegistryClient;
use skyline::routing::Policy;

fn settings(name: &str, ip: &str, catalog: CatalogSource) -> Settings {
    let ip = self::ip(ip);
    Settings {
        node_name: name.into(),
        node_address: ip,
        outbound: Some(SocketAddr::new(ip, 0)),
        inbound: Some(SocketAddr::new(ip, 0)),
        admin: None,
        catalog,
        catch_all: Vec::new(),
        policy: Policy::default(),
        workers: 1,
        resilience: Default::default(),
        tls: None,
        authz: Default::default(),
        access: skyline::access::Settings::off(),
        peer_protocol: Default::default(),
        services: Vec::new(),
        tokens: Default::default(),
    }
}

/// Waits until `url` answers `status` (bounded: 10 s).
async fn eventually(client: &Client, url: &str, status: u16) -> Reply {
    for _ in 0..400 {
        let reply = client.get(url).await;
        if reply.status == status {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} never answered {status}");
}

async fn stop(agent: AgentHandle) {
    agent.shutdown();
    agent.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_registered_in_the_registry_are_routed_by_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = CatalogSource::Embedded {
        listen: "127.0.0.2:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
    };
    let a = agent::spawn(
        settings("a", "127.0.0.2", embedded),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let registry = a.registry.unwrap();
    let b = agent::spawn(
        settings("b", "127.0.0.3", CatalogSource::Consul(registry)),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let web = TestApp::spawn("web@b", ip("127.0.0.3"));

    let client = RegistryClient::new(registry);
    let register = serde_json::json!({
        "Node": "b",
        "Address": "127.0.0.3",
        "NodeMeta": { "skyline-inbound-port": b.inbound.unwrap().port().to_string() },
        "Service": { "ID": "web-1", "Service": "web", "Port": web.addr.port() },
        "Check": { "CheckID": "web-1-ttl", "ServiceID": "web-1", "Status": "passing",
                   "Definition": { "TTL": "30s" } },
    });
    client
        .put_json("/v1/catalog/register", &register)
        .await
        .unwrap();

    let http = Client::new();
    let url = format!("http://{}/service/web/x", a.outbound.unwrap());
    assert_eq!(eventually(&http, &url, 200).await.body, "web@b /x");
    // The agent that follows over the Consul API routes it too (to its own inbound).
    let via_b = format!("http://{}/service/web/y", b.outbound.unwrap());
    assert_eq!(eventually(&http, &via_b, 200).await.body, "web@b /y");

    client
        .put_json(
            "/v1/agent/check/fail/web-1-ttl?node=b",
            &serde_json::json!(null),
        )
        .await
        .unwrap();
    let reply = eventually(&http, &url, 503).await;
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"));
    eventually(&http, &via_b, 503).await;

    client
        .put_json(
            "/v1/agent/check/pass/web-1-ttl?node=b",
            &serde_json::json!(null),
        )
        .await
        .unwrap();
    eventually(&http, &url, 200).await;

    let deregister = serde_json::json!({ "Node": "b", "ServiceID": "web-1" });
    client
        .put_json("/v1/catalog/deregister", &deregister)
        .await
        .unwrap();
    let reply = eventually(&http, &url, 404).await;
    assert_eq!(reply.mesh_error(), Some("unknown-service"));

    stop(b).await;
    stop(a).await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_its_services_keeps_them_alive_and_deregisters_on_shutdown() {
    use skyline::catalog::ServiceName;
    use skyline::registration::{Check, Declared};

    let dir = tempfile::tempdir().unwrap();
    let embedded = CatalogSource::Embedded {
        listen: "127.0.0.2:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
    };
    let a = agent::spawn(
        settings("a", "127.0.0.2", embedded),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let web = TestApp::spawn("web@b", ip("127.0.0.3"));
    let mut b_settings = settings("b", "127.0.0.3", CatalogSource::Consul(a.registry.unwrap()));
    b_settings.services = vec![Declared {
        name: ServiceName::parse("web").unwrap(),
        id: "web-b".into(),
        address: None,
        port: web.addr.port(),
        tags: vec![],
        meta: Default::default(),
        check: Check::Ttl(Duration::from_millis(600)),
        deregister_after: None,
    }];
    let b = agent::spawn(b_settings, CancellationToken::new())
        .await
        .unwrap();

    let http = Client::new();
    let url = format!("http://{}/service/web/", a.outbound.unwrap());
    assert_eq!(eventually(&http, &url, 200).await.body, "web@b /");

    // The instance stops accepting connections: the agent fails its TTL check.
    web.stop().await;
    let reply = eventually(&http, &url, 503).await;
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"));

    // A graceful shutdown of b deregisters the service.
    stop(b).await;
    let reply = eventually(&http, &url, 404).await;
    assert_eq!(reply.mesh_error(), Some("unknown-service"));
    stop(a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_registers_lists_and_deregisters_services() {
    let dir = tempfile::tempdir().unwrap();
    let listener = skyline::serve::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = skyline::registry::RegistryConfig::new(dir.path());
    let registry = skyline::registry::spawn(listener, config, CancellationToken::new())
        .await
        .unwrap();
    let addr = registry.addr().to_string();
    let skyline = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skyline"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };

    let (ok, text) = skyline(&[
        "register",
        "--registry",
        &addr,
        "--name",
        "giphy",
        "--port",
        "31000",
        "--node",
        "mesos-1",
        "--node-address",
        "10.0.0.11",
        "--meta",
        "platform=mesos",
        "--ttl",
        "30s",
    ]);
    assert!(ok, "{text}");
    let (ok, text) = skyline(&[
        "register",
        "--registry",
        &addr,
        "--name",
        "org",
        "--port",
        "8080",
    ]);
    assert!(ok, "{text}");

    let (ok, json) = skyline(&["services", "--registry", &addr, "--json"]);
    assert!(ok, "{json}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let giphy = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "giphy")
        .unwrap();
    assert_eq!(giphy["node"], "mesos-1");
    assert_eq!(giphy["address"], "10.0.0.11:31000");
    assert_eq!(giphy["health"], "passing");
    let (ok, table) = skyline(&["services", "--registry", &addr]);
    assert!(ok);
    assert!(
        table.starts_with("SERVICE")
            && table.contains("org")
            && table.contains("giphy-mesos-1-31000"),
        "{table}"
    );

    let (ok, text) = skyline(&[
        "deregister",
        "--registry",
        &addr,
        "--node",
        "mesos-1",
        "giphy-mesos-1-31000",
    ]);
    assert!(ok, "{text}");
    let (_, json) = skyline(&["services", "--registry", &addr, "--json"]);
    assert!(!json.contains("giphy"), "{json}");

    let (ok, text) = skyline(&[
        "register",
        "--registry",
        &addr,
        "--name",
        "Bad!",
        "--port",
        "1",
    ]);
    assert!(!ok && text.contains("invalid service name"), "{text}");
    registry.shutdown();
    registry.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_routing_while_the_registry_is_down_and_catches_up_when_it_returns() {
    use skyline::registry::{RegistryConfig, spawn as spawn_registry};

    let dir = tempfile::tempdir().unwrap();
    let start_registry = |addr: SocketAddr| {
        let listener = skyline::serve::bind(addr).unwrap();
        spawn_registry(
            listener,
            RegistryConfig::new(dir.path()),
            CancellationToken::new(),
        )
    };
    let registry = start_registry("127.0.0.5:0".parse().unwrap())
        .await
        .unwrap();
    let addr = registry.addr();
    let agent = agent::spawn(
        settings("a", "127.0.0.2", CatalogSource::Consul(addr)),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let web = TestApp::spawn("web", ip("127.0.0.2"));
    let org = TestApp::spawn("org", ip("127.0.0.2"));
    let register = |name: &str, port: u16| {
        serde_json::json!({
            "Node": "a", "Address": "127.0.0.2",
            "NodeMeta": { "skyline-inbound-port": agent.inbound.unwrap().port().to_string() },
            "Service": { "ID": format!("{name}-1"), "Service": name, "Port": port },
        })
    };
    RegistryClient::new(addr)
        .put_json("/v1/catalog/register", &register("web", web.addr.port()))
        .await
        .unwrap();
    let http = Client::new();
    let web_url = format!("http://{}/service/web/", agent.outbound.unwrap());
    eventually(&http, &web_url, 200).await;

    // The registry goes away: routing goes on from the last good catalog, and says so.
    registry.shutdown();
    registry.join().await;
    let mut catalog = agent.catalog.clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        catalog.wait_for(|s| s.error.is_some()),
    )
    .await
    .expect("the agent notices the registry is gone")
    .unwrap();
    for _ in 0..20 {
        assert_eq!(http.get(&web_url).await.body, "web /");
    }

    // Back on the same data folder and address: the agent catches up with a change made since.
    let registry = start_registry(addr).await.unwrap();
    RegistryClient::new(addr)
        .put_json("/v1/catalog/register", &register("org", org.addr.port()))
        .await
        .unwrap();
    let org_url = format!("http://{}/service/org/", agent.outbound.unwrap());
    assert_eq!(eventually(&http, &org_url, 200).await.body, "org /");
    assert_eq!(
        http.get(&web_url).await.body,
        "web /",
        "the registration survived the restart"
    );

    stop(agent).await;
    registry.shutdown();
    registry.join().await;
    web.stop().await;
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_http_check_runs_at_its_interval_and_deregisters_the_instance_after_its_critical_time()
 {
    let dir = tempfile::tempdir().unwrap();
    let listener = skyline::serve::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = skyline::registry::RegistryConfig::new(dir.path());
    let registry = skyline::registry::spawn(listener, config, CancellationToken::new())
        .await
        .unwrap();
    let addr = registry.addr().to_string();
    let web = TestApp::spawn("web", ip("127.0.0.1"));
    let port = web.addr.port().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skyline"))
        .args([
            "register",
            "--registry",
            &addr,
            "--name",
            "web",
            "--port",
            &port,
        ])
        .args(["--http", "/", "--interval", "200ms", "--timeout", "100ms"])
        .args(["--deregister-after", "1s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_skyline"))
        .args([
            "register",
            "--registry",
            &addr,
            "--name",
            "x",
            "--port",
            "1",
        ])
        .args(["--http", "/", "--interval", "soon"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "{bad:?}");

    // The health of web's one instance, as the registry says: None once it is gone.
    let client = RegistryClient::new(registry.addr());
    let health = || async {
        let body = client.get("/v1/health/service/web").await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let entries = body.as_array().cloned().unwrap_or_default();
        entries.first().map(|e| {
            let checks = e["Checks"].as_array().cloned().unwrap_or_default();
            let critical = checks.iter().any(|c| c["Status"] == "critical");
            if critical { "critical" } else { "passing" }
        })
    };
    let wait = |want: Option<&'static str>, within: Duration| async move {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if health().await == want {
                return Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    };
    assert!(
        wait(Some("passing"), Duration::from_secs(5))
            .await
            .is_some()
    );
    let stopped = std::time::Instant::now();
    web.stop().await;
    // The default 5 s interval would miss this.
    let critical = wait(Some("critical"), Duration::from_secs(3)).await;
    let critical = critical.expect("the check never went critical");
    assert!(
        critical - stopped < Duration::from_millis(1500),
        "{:?}",
        critical - stopped
    );
    let gone = wait(None, Duration::from_secs(10)).await;
    let gone = gone.expect("the instance was never deregistered");
    assert!(
        gone - critical >= Duration::from_millis(900),
        "{:?}",
        gone - critical
    );
    println!(
        "critical after {:?}, deregistered {:?} later",
        critical - stopped,
        gone - critical
    );
    registry.shutdown();
    registry.join().await;
}
