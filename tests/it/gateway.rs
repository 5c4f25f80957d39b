//! The gateway in process, over our registry: tiers, fail-over and fail-back, KV policies,
//! loop protection; and the outbound proxy's cluster-DNS-style requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use skyline::catalog::CatalogSource;
use skyline::gateway::policy::{self, Pool, RoutePolicy, Upstream};
use skyline::gateway::{self, GatewayHandle, Settings};
use skyline::registry::{self, RegistryConfig, RegistryHandle};

const HOLD: Duration = Duration::from_millis(600);

struct Setup {
    registry: RegistryHandle,
    gateway: GatewayHandle,
    mesos: TestApp,
    kubernetes: TestApp,
    client: Client,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// A registry with `giphy` on Mesos node m1 (its "inbound" is the `mesos` app), and a
    /// gateway whose Kubernetes upstream is the `kubernetes` app.
    async fn start(routes: BTreeMap<String, RoutePolicy>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = skyline::serve::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let registry = registry::spawn(
            listener,
            RegistryConfig::new(dir.path().join("registry")),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let mesos = TestApp::spawn("mesos", ip("127.0.0.1"));
        let kubernetes = TestApp::spawn("kubernetes", ip("127.0.0.1"));
        let setup_client = Client::new();
        let s = Self {
            gateway: gateway::spawn(
                Settings {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    admin: Some("127.0.0.1:0".parse().unwrap()),
                    catalog: CatalogSource::Consul(registry.addr()),
                    upstreams: BTreeMap::from([(
                        skyline::contract::KUBERNETES.to_owned(),
                        Upstream {
                            pool: Pool::Addresses(vec![kubernetes.addr]),
                            bridge: true,
                        },
                    )]),
                    routes,
                    default_hold: HOLD,
                    max_hops: 8,
                    kv: Some(registry.addr()),
                    include_warning: false,
                    reload: None,
                    resilience: Default::default(),
                    tls: None,
                    authz: Default::default(),
                    access: skyline::access::Settings::off(),
                    peer_protocol: Default::default(),
                    tokens: Default::default(),
                },
                CancellationToken::new(),
            )
            .await
            .unwrap(),
            registry,
            mesos,
            kubernetes,
            client: setup_client,
            _dir: dir,
        };
        s.register_giphy().await;
        s
    }

    async fn put(&self, path: &str, body: String) -> Reply {
        let req = Request::put(format!("http://{}{path}", self.registry.addr()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.client.send(req).await.unwrap()
    }

    async fn register_giphy(&self) {
        let body = serde_json::json!({
            "Node": "m1", "Address": "127.0.0.1",
            "NodeMeta": {"skyline-inbound-port": self.mesos.addr.port().to_string()},
            "Service": {"ID": "giphy-m1", "Service": "giphy", "Port": 9, "Meta": {"platform": "mesos"}},
        });
        assert_eq!(
            self.put("/v1/catalog/register", body.to_string())
                .await
                .body
                .trim(),
            "true"
        );
        self.wait_tier("mesos").await;
    }

    async fn deregister_giphy(&self) {
        let body = serde_json::json!({"Node": "m1", "ServiceID": "giphy-m1"});
        self.put("/v1/catalog/deregister", body.to_string()).await;
    }

    async fn get(&self, path: &str) -> Reply {
        self.client
            .get(&format!("http://{}{path}", self.gateway.addr))
            .await
    }

    fn tier(reply: &Reply) -> &str {
        reply
            .headers
            .get("x-skyline-tier")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// Waits (at most 10 s) until giphy is served by `tier`; returns how long it took.
    async fn wait_tier(&self, tier: &str) -> Duration {
        let start = tokio::time::Instant::now();
        for _ in 0..1000 {
            let reply = self.get("/service/giphy/media").await;
            if Self::tier(&reply) == tier {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("giphy never went to {tier}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesos_first_then_kubernetes_at_once_and_back_after_the_hold() {
    let s = Setup::start(BTreeMap::new()).await;
    let reply = s.get("/service/giphy/media?q=1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body, "mesos /service/giphy/media?q=1",
        "full path kept"
    );
    assert_eq!(Setup::tier(&reply), "mesos");

    s.deregister_giphy().await;
    let over = s.wait_tier("kubernetes").await;
    assert!(
        over < Duration::from_millis(500),
        "fail-over is immediate: {over:?}"
    );
    let reply = s.get("/service/giphy/media").await;
    assert_eq!(reply.body, "kubernetes /service/giphy/media");

    s.register_giphy().await;
    // `register_giphy` waited for mesos; check the hold was respected on the way.
    let routes = s
        .client
        .get(&format!("http://{}/routes", s.gateway.admin.unwrap()))
        .await
        .json();
    assert_eq!(routes["services"]["giphy"]["chosen"], "mesos");
    assert!(s.kubernetes.hits() > 0 && s.mesos.hits() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_back_waits_for_the_hold() {
    let s = Setup::start(BTreeMap::new()).await;
    s.deregister_giphy().await;
    s.wait_tier("kubernetes").await;
    let body = serde_json::json!({
        "Node": "m1", "Address": "127.0.0.1",
        "NodeMeta": {"skyline-inbound-port": s.mesos.addr.port().to_string()},
        "Service": {"ID": "giphy-m1", "Service": "giphy", "Port": 9, "Meta": {"platform": "mesos"}},
    });
    s.put("/v1/catalog/register", body.to_string()).await;
    let back = s.wait_tier("mesos").await;
    assert!(
        back >= HOLD - Duration::from_millis(100),
        "fell back after {back:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_policy_in_the_kv_is_hot_reloaded_and_an_invalid_one_is_rejected() {
    let s = Setup::start(BTreeMap::new()).await;
    let kubernetes_only = r#"{"tiers": [{"upstream": "kubernetes"}]}"#;
    s.put("/v1/kv/skyline/routes/giphy", kubernetes_only.into())
        .await;
    s.wait_tier("kubernetes").await;
    // An invalid policy is refused and the previous one kept.
    s.put(
        "/v1/kv/skyline/routes/giphy",
        "tiers = [{ upstream = \"vms\" }]".into(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(
            Setup::tier(&s.get("/service/giphy/media").await),
            "kubernetes"
        );
    }
    // A TOML policy works as well.
    s.put(
        "/v1/kv/skyline/routes/giphy",
        "tiers = [{ select = \"platform=mesos\" }]\nhold = \"0s\"".into(),
    )
    .await;
    s.wait_tier("mesos").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_sends_each_tier_its_share() {
    let split =
        RoutePolicy::parse_text("split = [50, 50]", &policy::default_upstreams(), HOLD).unwrap();
    let s = Setup::start(BTreeMap::from([("giphy".to_owned(), split)])).await;
    let mut tiers = BTreeMap::new();
    for _ in 0..200 {
        let reply = s.get("/service/giphy/").await;
        *tiers.entry(Setup::tier(&reply).to_owned()).or_insert(0) += 1;
    }
    assert!(tiers["mesos"] > 60 && tiers["kubernetes"] > 60, "{tiers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_a_bridge_never_goes_back_to_a_bridge() {
    let s = Setup::start(BTreeMap::new()).await;
    let from_bridge = |path: &str| {
        Request::get(format!("http://{}{path}", s.gateway.addr))
            .header("x-skyline-origin", "bridge")
            .body(Full::default())
            .unwrap()
    };
    let reply = s
        .client
        .send(from_bridge("/service/ghost/x"))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.mesh_error(), Some("unknown-service"));
    let reply = s
        .client
        .send(from_bridge("/service/giphy/x"))
        .await
        .unwrap();
    assert_eq!(reply.body, "mesos /service/giphy/x");
    s.deregister_giphy().await;
    s.wait_tier("kubernetes").await;
    let reply = s
        .client
        .send(from_bridge("/service/giphy/x"))
        .await
        .unwrap();
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(reply.mesh_error(), Some("unknown-service"));
    // Without the mark, the same request goes to Kubernetes.
    assert_eq!(
        s.get("/service/ghost/x").await.body,
        "kubernetes /service/ghost/x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_hop_limit_is_a_loop() {
    let s = Setup::start(BTreeMap::new()).await;
    let req = Request::get(format!("http://{}/service/giphy/x", s.gateway.addr))
        .header("x-skyline-hops", "8")
        .body(Full::default())
        .unwrap();
    let reply = s.client.send(req).await.unwrap();
    assert_eq!(reply.status, 508);
    assert_eq!(reply.mesh_error(), Some("loop-detected"));
    let req = Request::get(format!("http://{}/service/giphy/x", s.gateway.addr))
        .header("x-skyline-hops", "3")
        .body(Full::default())
        .unwrap();
    s.client.send(req).await.unwrap();
    let seen = s.mesos.seen();
    assert_eq!(seen.last().unwrap().headers["x-skyline-hops"], "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_proxy_takes_cluster_dns_style_requests() {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .spawn()
        .await;
    let outbound: SocketAddr = mesh.outbound("a");
    let req = Request::get(format!("http://{outbound}/media/x?q=1"))
        .header("host", "web.default.svc.cluster.local:8080")
        .body(Full::default())
        .unwrap();
    let reply = Client::new().send(req).await.unwrap();
    assert_eq!(reply.body, "web /media/x?q=1");
    let seen = web.seen();
    assert_eq!(seen[0].headers["x-skyline-hops"], "1");
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_policies_in_the_config_file_are_hot_reloaded_and_an_invalid_file_is_refused() {
    let s = Setup::start(BTreeMap::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let file = |routes: &str| {
        format!(
            "[listen]\ngateway = \"127.0.0.1:0\"\nadmin = \"off\"\n\n[catalog]\nconsul = \"{}\"\n\n\
             [gateway]\nkv_routes = false\n\n\
             [upstreams.kubernetes]\naddresses = [\"{}\"]\nbridge = true\n\n{routes}",
            s.registry.addr(),
            s.kubernetes.addr
        )
    };
    let mesos_first = "[routes.giphy]\ntiers = [{ select = \"platform=mesos\" }, { upstream = \"kubernetes\" }]\nhold = \"0s\"\n";
    let kubernetes_only = "[routes.giphy]\ntiers = [{ upstream = \"kubernetes\" }]\n";
    std::fs::write(&path, file(mesos_first)).unwrap();
    let args = skyline::gateway::config::GatewayArgs {
        config: Some(path.clone()),
        ..Default::default()
    };
    let gw = gateway::spawn(args.resolve().unwrap(), CancellationToken::new())
        .await
        .unwrap();
    let url = format!("http://{}/service/giphy/media", gw.addr);
    let tier_of = |reply: &Reply| reply.headers["x-skyline-tier"].to_str().unwrap().to_owned();
    assert_eq!(tier_of(&s.client.get(&url).await), "mesos");

    write_atomically(&path, &file(kubernetes_only));
    let mut switched = false;
    for _ in 0..200 {
        if tier_of(&s.client.get(&url).await) == "kubernetes" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(switched, "the edited file took effect");

    // An invalid policy file is refused; the policies in force stay.
    write_atomically(
        &path,
        &file("[routes.giphy]\ntiers = [{ upstream = \"vms\" }]\n"),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..10 {
        assert_eq!(tier_of(&s.client.get(&url).await), "kubernetes");
    }
    gw.shutdown();
    gw.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_counts_its_requests_and_refused_policy_reloads_in_metrics() {
    let s = Setup::start(BTreeMap::new()).await;
    let admin = s.gateway.admin.unwrap();
    let before = scrape(admin).await;
    let ok = r#"skyline_requests_total{role="gateway",service="giphy",code="200",error=""}"#;
    let served = before.count(ok);
    assert!(served >= 1.0, "setup routed giphy: {}", before.text);
    for _ in 0..4 {
        assert_eq!(s.get("/service/giphy/media").await.status, 200);
    }
    let loop_detected = Request::get(format!("http://{}/service/giphy/", s.gateway.addr))
        .header("x-skyline-hops", "8")
        .body(Full::default())
        .unwrap();
    assert_eq!(s.client.send(loop_detected).await.unwrap().status, 508);

    let after = scrape(admin).await;
    assert_eq!(after.count(ok), served + 4.0, "{}", after.text);
    let by_tier = |scrape: &Scrape, tier: &str| {
        scrape.count(&format!(
            r#"skyline_gateway_tier_requests_total{{service="giphy",tier="{tier}"}}"#
        ))
    };
    assert_eq!(
        by_tier(&after, "mesos") - by_tier(&before, "mesos"),
        4.0,
        "{}",
        after.text
    );
    // Each tier's answers by outcome and latency, what `skyline migrate` guards on.
    let answers = |scrape: &Scrape, series: &str| {
        scrape.count(&format!(
            r#"skyline_gateway_tier_{series}{{service="giphy",tier="mesos"{}}}"#,
            if series.starts_with("responses") {
                r#",outcome="success""#
            } else {
                ""
            }
        ))
    };
    for series in ["responses_total", "latency_seconds_count"] {
        assert_eq!(
            answers(&after, series) - answers(&before, series),
            4.0,
            "{series}: {}",
            after.text
        );
    }
    assert_eq!(
        after.count(
            r#"skyline_requests_total{role="gateway",service="",code="508",error="loop-detected"}"#
        ),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(after.value("skyline_catalog_stale"), Some(0.0));
    assert!(after.value("skyline_catalog_age_seconds").is_some());

    // A policy change in the KV is a reload: an invalid one is refused and counted.
    let refused = r#"skyline_config_reloads_total{result="refused"}"#;
    assert_eq!(after.value(refused), Some(0.0));
    s.put(
        "/v1/kv/skyline/routes/giphy",
        "tiers = [{ upstream = \"vms\" }]".into(),
    )
    .await;
    let mut counted = false;
    for _ in 0..200 {
        if scrape(admin).await.count(refused) == 1.0 {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted, "the refused policy is counted within 10 s");
    assert_eq!(
        scrape(admin)
            .await
            .count(r#"skyline_config_reloads_total{result="accepted"}"#),
        0.0
    );
}

/// The gateway takes HTTP/2 (an agent's catch-all forwards gRPC to it) with the agent's HTTP/2
/// limits: a PING flood ends with GOAWAY long before the flood does, and forwards nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_http2_connections_have_the_abuse_limits_a_ping_flood_gets_goaway() {
    use crate::h2_abuse::{PING, frame, opening, read_frames};
    use tokio::io::AsyncWriteExt;
    let s = Setup::start(BTreeMap::new()).await;
    let hits_before = s.mesos.hits() + s.kubernetes.hits();
    let stream = tokio::net::TcpStream::connect(s.gateway.addr)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let reader = tokio::spawn(read_frames(read, Duration::from_secs(20)));
    write.write_all(&opening()).await.unwrap();
    // 200 batches of 100 PINGs: 20 000 frames, 20 times the control-frame budget.
    for batch in 0u64..200 {
        let pings: Vec<u8> = (0..100u64)
            .flat_map(|k| frame(PING, 0, 0, &(batch * 100 + k).to_be_bytes()))
            .collect();
        if write.write_all(&pings).await.is_err() {
            break; // closed by the gateway
        }
    }
    let seen = reader.await.unwrap();
    assert!(seen.goaway.is_some(), "no GOAWAY: {seen:?}");
    assert!(seen.acks < 10_000, "{} PINGs answered", seen.acks);
    assert_eq!(s.mesos.hits() + s.kubernetes.hits(), hits_before);
}

/// A gateway and a bridge (re)started while the registry they follow is down start at once
/// and serve what needs no catalog, not ready until it answers: the bridge sends a Skyline URL
/// to the cluster's Service, and answers a cluster name bound for the mesh `503
/// no-healthy-endpoint` marked unsent (it learns the gateways from the catalog); the gateway
/// sends a service to its Kubernetes tier (the bridge). Once the registry is up each logs it,
/// turns ready, and the gateway sends a service on Mesos to Mesos. The gateway warns once that
/// its KV reads and its admin listener's registration fail, not at every retry, and says when
/// the KV answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_a_bridge_started_while_their_registry_is_down_serve_at_once_and_route_by_it_once_it_is_up()
 {
    use crate::upgrade::ClusterDns;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new();
    let registry_addr = free_addr("127.0.0.1");
    let pod = TestApp::spawn("pod", ip("127.0.0.1"));
    let dns = ClusterDns::start(&[("giphy.default.svc.cluster.local", "127.0.0.1")]).await;
    let not_ready = |admin: &str| {
        let url = format!("http://{admin}/readyz");
        let client = client.clone();
        async move {
            let ready = client.get(&url).await;
            assert_eq!(ready.status, 503, "{ready:?}");
            assert_eq!(ready.json()["ready"], false, "{ready:?}");
            assert!(
                ready.json()["catalog_error"].is_string(),
                "says why: {ready:?}"
            );
        }
    };

    let bridge_admin = free_addr("127.0.0.1");
    let (dns_addr, pod_port) = (dns.addr.to_string(), pod.addr.port().to_string());
    let mut bridge = Skyline::start(
        &[
            "bridge",
            "--consul",
            &registry_addr,
            "--listen=127.0.0.1:0",
            "--admin",
            &bridge_admin,
            "--dns",
            &dns_addr,
            "--port",
            &pod_port,
        ],
        &[],
    );
    let started = bridge.log.wait_for("bridge started").await;
    let bridge_addr = started["listen"].as_str().unwrap().to_owned();
    not_ready(&bridge_admin).await;
    let reply = client
        .get(&format!("http://{bridge_addr}/service/giphy/media"))
        .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod /media"));
    let to_mesh = Request::get(format!("http://{bridge_addr}/orders"))
        .header("host", "billing.default.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client.send(to_mesh).await.unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"), "{reply:?}");
    assert!(reply.headers.contains_key("x-skyline-unsent"), "{reply:?}");

    let (gateway_addr, gateway_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    // Its KV client's retries logged too (debug), to see that they are not warnings.
    let mut command = std::process::Command::new(SKYLINE);
    command
        .args([
            "gateway",
            "--consul",
            &registry_addr,
            "--listen",
            &gateway_addr,
        ])
        .args([
            "--admin",
            &gateway_admin,
            "--bridges",
            &bridge_addr,
            "--hold=200ms",
        ])
        .args(["--log-format", "json"])
        .env(
            "SKYLINE_LOG",
            "info,skyline::registry::client=debug,skyline::registration=debug",
        );
    let mut gateway = Skyline::spawn(command, &[]);
    let kv_failing = "cannot read route policy keys from the KV; keeping the last read";
    let kv_retry_failed = "cannot read route policy keys from the KV";
    let admin_failed = "admin registration failed; retrying";
    let count =
        |seen: &[Logged], message: &str| seen.iter().filter(|s| s.message == message).count();
    let mut gateway_log = gateway
        .log
        .until(|seen| {
            count(seen, "gateway started") == 1
                && count(seen, kv_retry_failed) > 0
                && count(seen, admin_failed) > 1
        })
        .await;
    not_ready(&gateway_admin).await;
    let giphy = format!("http://{gateway_addr}/service/giphy/media");
    let reply = client.get(&giphy).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod /media"));
    assert_eq!(Setup::tier(&reply), "kubernetes", "{reply:?}");

    let registry = Skyline::registry_at(&registry_addr, &dir.path().join("registry")).await;
    let mesos = TestApp::spawn("mesos", ip("127.0.0.1"));
    let register = serde_json::json!({
        "Node": "m1", "Address": "127.0.0.1",
        "NodeMeta": {"skyline-inbound-port": mesos.addr.port().to_string()},
        "Service": {"ID": "giphy-m1", "Service": "giphy", "Port": 9, "Meta": {"platform": "mesos"}},
    });
    let req = Request::put(format!("http://{registry_addr}/v1/catalog/register"))
        .body(Full::new(Bytes::from(register.to_string())))
        .unwrap();
    assert_eq!(client.send(req).await.unwrap().body.trim(), "true");
    const ANSWERED: &str = "the catalog answered; routing by it";
    bridge.log.wait_for(ANSWERED).await;
    // The gateway's KV reads (its route policies) failed all along: said once, then that they
    // answer again.
    let kv_again = "the KV answers again: reading route policy keys";
    gateway_log.extend(gateway.log.until_all(&[ANSWERED, kv_again]).await);
    let warned = |message: &str| {
        let warning = |s: &&Logged| s.message == message && s.level == "WARN";
        gateway_log.iter().filter(warning).count()
    };
    assert_eq!(warned(kv_failing), 1, "{gateway_log:?}");
    assert_eq!(warned(admin_failed), 1, "{gateway_log:?}");
    readyz_until(&gateway_admin, |r| r["ready"] == true).await;
    readyz_until(&bridge_admin, |r| r["catalog_error"].is_null()).await;
    let mut reply = client.get(&giphy).await;
    for _ in 0..500 {
        if Setup::tier(&reply) == "mesos" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply = client.get(&giphy).await;
    }
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "mesos /service/giphy/media")
    );
    assert_eq!(Setup::tier(&reply), "mesos", "{reply:?}");

    for role in [gateway, bridge, registry] {
        role.sigterm();
        role.exited_cleanly().await;
    }
    for app in [pod, mesos] {
        app.stop().await;
    }
}
