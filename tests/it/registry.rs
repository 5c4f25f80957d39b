//! The embedded registry over real sockets: Consul's shapes, checks, blocking queries, KV,
//! bad input, and durability across a real `SIGKILL` of a child process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use skyline::catalog::Health;
use skyline::registry::{self, RegistryConfig, RegistryHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// === Harness ===

struct TestRegistry {
    handle: RegistryHandle,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let handle = registry::spawn(listener, RegistryConfig::new(dir.path()), shutdown.clone())
            .await
            .unwrap();
        Self {
            handle,
            shutdown,
            dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.addr()
    }

    /// Stops gracefully and starts again on the same data directory.
    async fn restart(self) -> Self {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle.join())
            .await
            .expect("registry stops within 10s");
        Self::start_in(self.dir).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle.join())
            .await
            .expect("registry stops within 10s");
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn index(&self) -> u64 {
        self.headers["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn call(addr: SocketAddr, method: Method, path: &str, body: impl Into<Bytes>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(body.into()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("answer within 30s")
        .expect("request succeeds");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, Method::GET, path, Bytes::new()).await
}

async fn put(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> Reply {
    call(addr, Method::PUT, path, body).await
}

async fn put_json(addr: SocketAddr, path: &str, body: Value) -> Reply {
    put(addr, path, serde_json::to_vec(&body).unwrap()).await
}

async fn register(addr: SocketAddr, body: Value) {
    let r = put_json(addr, "/v1/agent/service/register", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// Polls `f` every 50 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

async fn health_statuses(addr: SocketAddr, name: &str) -> Vec<String> {
    get(addr, &format!("/v1/health/service/{name}"))
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["Checks"].as_array().unwrap().clone())
        .map(|c| c["Status"].as_str().unwrap().to_owned())
        .collect()
}

/// The registry's in-process snapshot once `f` holds (5 s at most).
async fn snapshot_where(
    handle: &RegistryHandle,
    f: impl Fn(&skyline::catalog::Snapshot) -> bool,
) -> std::sync::Arc<skyline::catalog::Snapshot> {
    let mut rx = handle.subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| f(s)))
        .await
        .expect("snapshot within 5s")
        .expect("registry running")
        .clone()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

// === Consul shapes ===

#[tokio::test]
async fn agent_registration_shows_up_in_every_read_with_consul_field_names() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(
        addr,
        json!({
            "ID": "web-1", "Name": "web", "Tags": ["primary", "v1"], "Address": "127.0.0.2",
            "Port": 8080, "Meta": {"platform": "mesos"}, "Weights": {"Passing": 10, "Warning": 1},
            "Check": {"TTL": "30s", "Status": "passing", "Notes": "ttl", "Name": "web alive"}
        }),
    )
    .await;

    let services = get(addr, "/v1/agent/services").await;
    assert_eq!(services.status, StatusCode::OK);
    assert_eq!(services.headers["content-type"], "application/json");
    let s = &services.json()["web-1"];
    assert_eq!(
        keys(s),
        [
            "Address",
            "Datacenter",
            "EnableTagOverride",
            "ID",
            "Meta",
            "Port",
            "Service",
            "Tags",
            "Weights"
        ]
    );
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Weights"], json!({"Passing": 10, "Warning": 1}));

    let checks = get(addr, "/v1/agent/checks").await.json();
    let c = &checks["service:web-1"];
    assert_eq!(c["CheckID"], "service:web-1");
    assert_eq!(c["Name"], "web alive");
    assert_eq!(c["Status"], "passing");
    assert_eq!(c["ServiceID"], "web-1");
    assert_eq!(c["ServiceName"], "web");
    assert_eq!(c["Type"], "ttl");
    assert_eq!(c["Node"], "local");

    let catalog = get(addr, "/v1/catalog/services").await;
    assert!(catalog.index() > 1);
    assert_eq!(catalog.headers["x-consul-knownleader"], "true");
    assert_eq!(catalog.headers["x-consul-lastcontact"], "0");
    assert_eq!(catalog.json(), json!({"web": ["primary", "v1"]}));

    let entries = get(addr, "/v1/catalog/service/web").await.json();
    let e = &entries[0];
    for field in [
        "ServiceID",
        "ServiceName",
        "ServiceAddress",
        "ServicePort",
        "ServiceTags",
        "ServiceMeta",
        "ServiceWeights",
        "Node",
        "Address",
        "NodeMeta",
        "CreateIndex",
        "ModifyIndex",
    ] {
        assert!(e.get(field).is_some(), "catalog entry lacks {field}: {e}");
    }
    assert_eq!(e["ServiceID"], "web-1");
    assert_eq!(e["ServiceAddress"], "127.0.0.2");
    assert_eq!(e["ServicePort"], 8080);
    assert_eq!(e["Node"], "local");
    assert_eq!(e["Address"], "127.0.0.1");
    assert_eq!(e["ServiceMeta"], json!({"platform": "mesos"}));

    let health = get(addr, "/v1/health/service/web").await.json();
    let h = &health[0];
    assert_eq!(keys(h), ["Checks", "Node", "Service"]);
    assert_eq!(h["Node"]["Node"], "local");
    assert_eq!(h["Node"]["Address"], "127.0.0.1");
    assert_eq!(h["Service"]["ID"], "web-1");
    assert_eq!(h["Service"]["Service"], "web");
    assert_eq!(h["Service"]["Port"], 8080);
    assert_eq!(h["Checks"][0]["CheckID"], "service:web-1");
    assert_eq!(h["Checks"][0]["Status"], "passing");

    let nodes = get(addr, "/v1/catalog/nodes").await.json();
    assert_eq!(nodes[0]["Node"], "local");
    assert_eq!(nodes[0]["Address"], "127.0.0.1");
    assert!(nodes[0].get("Meta").is_some());

    let hc = get(addr, "/v1/health/checks/web").await.json();
    assert_eq!(hc.as_array().unwrap().len(), 1);
    assert_eq!(
        get(addr, "/v1/status/leader").await.json(),
        json!("127.0.0.1:8300")
    );

    // The in-process view agrees (it is published a few ms after the write).
    let snapshot = snapshot_where(&reg.handle, |s| s.instance_count() == 1).await;
    let web = &snapshot.services["web"];
    assert_eq!(web[0].weight, 10);
    assert_eq!(web[0].health, Health::Passing);
    assert_eq!(web[0].addr(), "127.0.0.2:8080".parse().unwrap());

    let r = put(addr, "/v1/agent/service/deregister/web-1", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(addr, "/v1/catalog/service/web").await.json(), json!([]));
    assert_eq!(get(addr, "/v1/agent/checks").await.json(), json!({}));
    let r = put(addr, "/v1/agent/service/deregister/web-1", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text().contains("Unknown service ID"));
    reg.stop().await;
}

#[tokio::test]
async fn passing_filter_leaves_out_warning_and_critical_instances() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    for (id, status) in [("a", "passing"), ("b", "warning"), ("c", "critical")] {
        register(
            addr,
            json!({"ID": id, "Name": "api", "Port": 80, "Check": {"TTL": "60s", "Status": status}}),
        )
        .await;
    }
    let all = get(addr, "/v1/health/service/api").await.json();
    assert_eq!(all.as_array().unwrap().len(), 3);
    let passing = get(addr, "/v1/health/service/api?passing").await.json();
    let ids: Vec<&str> = passing
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a"]);
    let snapshot = snapshot_where(&reg.handle, |s| s.instance_count() == 3).await;
    let health: Vec<Health> = snapshot.services["api"].iter().map(|i| i.health).collect();
    assert_eq!(health, [Health::Passing, Health::Warning, Health::Critical]);
    reg.stop().await;
}

// === Checks ===

#[tokio::test]
async fn ttl_check_turns_critical_after_its_ttl_and_passes_again_on_pass() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(
        addr,
        json!({"ID": "t1", "Name": "ttl", "Port": 1, "Check": {"CheckID": "t1-ttl", "TTL": "1s", "Status": "passing"}}),
    )
    .await;
    assert_eq!(health_statuses(addr, "ttl").await, ["passing"]);
    eventually(Duration::from_secs(5), "TTL expiry", || async {
        health_statuses(addr, "ttl").await == ["critical"]
    })
    .await;
    let checks = get(addr, "/v1/agent/checks").await.json();
    assert_eq!(checks["t1-ttl"]["Output"], "TTL expired");

    let r = put(addr, "/v1/agent/check/pass/t1-ttl?note=back", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(health_statuses(addr, "ttl").await, ["passing"]);
    assert_eq!(
        get(addr, "/v1/agent/checks").await.json()["t1-ttl"]["Output"],
        "back"
    );

    let r = put_json(
        addr,
        "/v1/agent/check/update/t1-ttl",
        json!({"Status": "warning", "Output": "slow"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(health_statuses(addr, "ttl").await, ["warning"]);
    let r = put(addr, "/v1/agent/check/fail/t1-ttl", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(health_statuses(addr, "ttl").await, ["critical"]);
    let r = put(addr, "/v1/agent/check/pass/nope", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    reg.stop().await;
}

/// A tiny HTTP server that answers every request with `status`, until its task is aborted.
async fn http_responder(status: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn http_and_tcp_checks_follow_a_real_listener_and_go_critical_when_it_stops() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let (target, server) = http_responder(200).await;
    register(
        addr,
        json!({"ID": "h1", "Name": "probed", "Port": target.port(), "Checks": [
            {"CheckID": "h1-http", "HTTP": format!("http://{target}/health"), "Interval": "200ms", "Timeout": "1s"},
            {"CheckID": "h1-tcp", "TCP": target.to_string(), "Interval": "200ms", "Timeout": "1s"}
        ]}),
    )
    .await;
    eventually(Duration::from_secs(5), "probes passing", || async {
        health_statuses(addr, "probed").await == ["passing", "passing"]
    })
    .await;
    server.abort();
    let _ = server.await;
    eventually(Duration::from_secs(5), "probes critical", || async {
        health_statuses(addr, "probed").await == ["critical", "critical"]
    })
    .await;

    let (busy, busy_server) = http_responder(429).await;
    register(
        addr,
        json!({"ID": "h2", "Name": "busy", "Port": 1, "Check":
            {"HTTP": format!("http://{busy}/"), "Interval": "200ms"}}),
    )
    .await;
    eventually(Duration::from_secs(5), "429 is warning", || async {
        health_statuses(addr, "busy").await == ["warning"]
    })
    .await;
    busy_server.abort();
    reg.stop().await;
}

#[tokio::test]
async fn deregister_critical_service_after_removes_the_service() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(
        addr,
        json!({"ID": "doomed-1", "Name": "doomed", "Port": 1,
               "Check": {"TTL": "60s", "DeregisterCriticalServiceAfter": "1s"}}),
    )
    .await;
    register(addr, json!({"ID": "kept-1", "Name": "kept", "Port": 1, "Check": {"TTL": "60s", "Status": "passing", "DeregisterCriticalServiceAfter": "1s"}})).await;
    assert_eq!(health_statuses(addr, "doomed").await, ["critical"]);
    eventually(Duration::from_secs(5), "deregistration", || async {
        get(addr, "/v1/catalog/service/doomed").await.json() == json!([])
    })
    .await;
    assert_eq!(
        get(addr, "/v1/catalog/services").await.json(),
        json!({"kept": []})
    );
    reg.stop().await;
}

// === Blocking queries ===

#[tokio::test]
async fn blocking_query_returns_early_with_a_higher_index_after_a_change_to_its_own_service() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(addr, json!({"ID": "w1", "Name": "watched", "Port": 1, "Check": {"CheckID": "w1c", "TTL": "60s", "Status": "passing"}})).await;
    let first = get(addr, "/v1/health/service/watched").await;
    let index = first.index();
    let start = Instant::now();
    let waiter = tokio::spawn(async move {
        get(
            addr,
            &format!("/v1/health/service/watched?index={index}&wait=20s"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "returned before any change");
    put(addr, "/v1/agent/check/fail/w1c", "").await;
    let woke = waiter.await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "woke only at {:?}",
        start.elapsed()
    );
    assert!(woke.index() > index);
    assert_eq!(woke.json()[0]["Checks"][0]["Status"], "critical");

    // KV blocking works the same way.
    put(addr, "/v1/kv/conf/a", "1").await;
    let kv_index = get(addr, "/v1/kv/conf/a").await.index();
    let waiter = tokio::spawn(async move {
        get(addr, &format!("/v1/kv/conf/a?index={kv_index}&wait=20s")).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    put(addr, "/v1/kv/conf/a", "2").await;
    let woke = waiter.await.unwrap();
    assert!(woke.index() > kv_index);
    reg.stop().await;
}

#[tokio::test]
async fn blocking_query_is_not_woken_by_writes_to_other_services_or_kv_keys() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(addr, json!({"ID": "q1", "Name": "quiet", "Port": 1})).await;
    put(addr, "/v1/kv/quiet/key", "v").await;
    let index = get(addr, "/v1/health/service/quiet").await.index();
    let kv_index = get(addr, "/v1/kv/quiet/key").await.index();

    let start = Instant::now();
    let service_waiter = tokio::spawn(async move {
        get(
            addr,
            &format!("/v1/catalog/service/quiet?index={index}&wait=1s"),
        )
        .await
    });
    let kv_waiter = tokio::spawn(async move {
        get(addr, &format!("/v1/kv/quiet/key?index={kv_index}&wait=1s")).await
    });
    for i in 0..5 {
        register(
            addr,
            json!({"ID": format!("n{i}"), "Name": "noisy", "Port": 1}),
        )
        .await;
        put(addr, &format!("/v1/kv/quiet/other-{i}"), "x").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let service = service_waiter.await.unwrap();
    let kv = kv_waiter.await.unwrap();
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(950),
        "woken after {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(service.index(), index);
    assert_eq!(kv.index(), kv_index);
    assert_eq!(service.json()[0]["ServiceID"], "q1");
    reg.stop().await;
}

#[tokio::test]
async fn shutdown_answers_blocking_queries_at_once() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let index = get(addr, "/v1/catalog/services").await.index();
    let waiter = tokio::spawn(async move {
        get(addr, &format!("/v1/catalog/services?index={index}&wait=5m")).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    reg.stop().await;
    let r = waiter.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(start.elapsed() < Duration::from_secs(5));
}

// === KV ===

#[tokio::test]
async fn kv_supports_recurse_keys_cas_flags_base64_and_delete() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    for (k, v) in [
        ("app/a", "alpha"),
        ("app/sub/b", "beta"),
        ("app/sub/c", "gamma"),
        ("other", "x"),
    ] {
        let r = put(addr, &format!("/v1/kv/{k}"), v).await;
        assert_eq!(r.text(), "true");
    }
    let r = get(addr, "/v1/kv/app/a").await;
    let e = &r.json()[0];
    assert_eq!(e["Key"], "app/a");
    assert_eq!(e["Value"], "YWxwaGE=");
    assert_eq!(e["Flags"], 0);
    assert_eq!(e["LockIndex"], 0);
    assert_eq!(e["CreateIndex"], e["ModifyIndex"]);
    assert_eq!(r.index(), e["ModifyIndex"].as_u64().unwrap());
    let modify = e["ModifyIndex"].as_u64().unwrap();
    assert_eq!(get(addr, "/v1/kv/app/a?raw").await.body, "alpha");

    let all = get(addr, "/v1/kv/app/?recurse").await.json();
    let ks: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(ks, ["app/a", "app/sub/b", "app/sub/c"]);
    assert_eq!(
        get(addr, "/v1/kv/app/?keys").await.json(),
        json!(["app/a", "app/sub/b", "app/sub/c"])
    );
    assert_eq!(
        get(addr, "/v1/kv/app/?keys&separator=/").await.json(),
        json!(["app/a", "app/sub/"])
    );

    // Compare-and-set: 0 means "only if absent"; otherwise the ModifyIndex must match.
    assert_eq!(
        put(addr, "/v1/kv/app/a?cas=0", "nope").await.text(),
        "false"
    );
    assert_eq!(
        put(addr, &format!("/v1/kv/app/a?cas={}", modify + 1000), "nope")
            .await
            .text(),
        "false"
    );
    assert_eq!(
        put(
            addr,
            &format!("/v1/kv/app/a?cas={modify}&flags=42"),
            "alpha2"
        )
        .await
        .text(),
        "true"
    );
    let e = &get(addr, "/v1/kv/app/a").await.json()[0];
    assert_eq!(e["Flags"], 42);
    assert_eq!(e["Value"], "YWxwaGEy");
    assert_eq!(put(addr, "/v1/kv/new?cas=0", "fresh").await.text(), "true");

    let r = call(addr, Method::DELETE, "/v1/kv/app/a?cas=1", Bytes::new()).await;
    assert_eq!(r.text(), "false");
    let r = call(addr, Method::DELETE, "/v1/kv/app/sub?recurse", Bytes::new()).await;
    assert_eq!(r.text(), "true");
    let missing = get(addr, "/v1/kv/app/sub/b").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.index() >= 1);
    assert_eq!(get(addr, "/v1/kv/app/?keys").await.json(), json!(["app/a"]));
    assert_eq!(
        get(addr, "/v1/kv/nothing/?recurse").await.status,
        StatusCode::NOT_FOUND
    );
    // An empty value reads back as null.
    put(addr, "/v1/kv/empty", "").await;
    assert_eq!(
        get(addr, "/v1/kv/empty").await.json()[0]["Value"],
        Value::Null
    );
    reg.stop().await;
}

// === Bad input ===

#[tokio::test]
async fn bad_input_is_refused_with_400_and_leaves_the_catalog_unchanged() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(addr, json!({"ID": "ok-1", "Name": "ok", "Port": 1})).await;
    put(addr, "/v1/kv/k", "v").await;
    let before = get(addr, "/v1/catalog/service/ok").await;
    let services_before = get(addr, "/v1/catalog/services").await;
    let checks_before = get(addr, "/v1/agent/checks").await;
    let nodes_before = get(addr, "/v1/catalog/nodes").await;

    let big = "x".repeat(600 * 1024);
    let cases: Vec<(&str, Bytes, &str)> = vec![
        (
            "/v1/agent/service/register",
            Bytes::from_static(b"{not json"),
            "Request decode failed",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":"ok","Port":"80"}"#),
            "Request decode failed",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":["ok"]}"#),
            "Request decode failed",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":"Bad_Name!","Port":1}"#),
            "Invalid service name",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Port":1}"#),
            "Missing service name",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":"ok","ID":"ok-1","Port":70000}"#),
            "Invalid Port",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":"ok","Port":-1}"#),
            "Invalid Port",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(
                r#"{"Name":"ok","ID":"ok-1","Port":1,"Check":{"TTL":"10s","Status":"bogus"}}"#,
            ),
            "Invalid check status",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(
                r#"{"Name":"ok","ID":"ok-1","Port":1,"Check":{"HTTP":"http://127.0.0.1:1/"}}"#,
            ),
            "Interval",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"Name":"ok","ID":"ok-1","Port":1,"Check":{"TTL":"ten"}}"#),
            "Request decode failed",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(format!(r#"{{"Name":"ok","Meta":{{"k":"{big}"}}}}"#)),
            "too large",
        ),
        (
            "/v1/catalog/register",
            Bytes::from(r#"{"Address":"10.0.0.1"}"#),
            "Must provide node",
        ),
        (
            "/v1/catalog/register",
            Bytes::from(r#"{"Node":"n1","Address":"10.0.0.1","Service":{"Service":"UP"}}"#),
            "Invalid service name",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from_static(b""),
            "Request decode failed: EOF",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"name":"ok","Bogus":1}"#),
            r#"Request decode failed: json: unknown field "Bogus""#,
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"name":"ok","port":"80"}"#),
            "json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int",
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"name":"ok","check":{"ttl":"10"}}"#),
            r#"time: missing unit in duration "10""#,
        ),
        (
            "/v1/agent/service/register",
            Bytes::from(r#"{"name":"ok","check":{"grpc":"127.0.0.1:1","interval":"1s"}}"#),
            "GRPC checks are not supported",
        ),
        (
            "/v1/catalog/register",
            Bytes::from(r#"{"node":"n9","address":"10.0.0.9","service":{"name":"ok"}}"#),
            r#"json: unknown field "name""#,
        ),
        (
            "/v1/agent/check/register",
            Bytes::from(r#"{"ttl":"10s"}"#),
            "Missing check name",
        ),
        (
            "/v1/agent/check/register",
            Bytes::from(r#"{"name":"c","ttl":"10s","serviceid":"nope"}"#),
            "does not exist",
        ),
        (
            "/v1/agent/check/register",
            Bytes::from(r#"{"name":"c"}"#),
            "missing a type",
        ),
        (
            "/v1/agent/maintenance",
            Bytes::new(),
            "Missing value for enable",
        ),
        (
            "/v1/agent/maintenance?enable=maybe",
            Bytes::new(),
            "Invalid value for enable",
        ),
        (
            "/v1/event/fire/deploy?tag=blue",
            Bytes::new(),
            "Cannot provide tag filter without service filter",
        ),
        (
            "/v1/event/fire/deploy?node=(",
            Bytes::new(),
            "Invalid node filter",
        ),
        (
            "/v1/event/fire/deploy",
            Bytes::from(vec![b'x'; 600]),
            "exceeds configured limit of 512 bytes",
        ),
        ("/v1/kv/k", Bytes::from(big.clone()), "too large"),
        (
            "/v1/kv/k?flags=abc",
            Bytes::from_static(b"v2"),
            "Invalid flags",
        ),
    ];
    for (path, body, expect) in cases {
        let r = put(addr, path, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert!(
            r.text().contains(expect),
            "{path}: {:?} lacks {expect:?}",
            r.text()
        );
    }
    let r = get(addr, "/v1/health/service/ok?index=abc").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = get(addr, "/v1/health/service/ok?index=1&wait=forever").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    assert_eq!(get(addr, "/v1/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(addr, "/elsewhere").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(addr, "/v1/agent/service/register").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        call(addr, Method::POST, "/v1/kv/k", Bytes::new())
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let after = get(addr, "/v1/catalog/service/ok").await;
    assert_eq!(after.json(), before.json());
    assert_eq!(
        get(addr, "/v1/agent/checks").await.json(),
        checks_before.json()
    );
    assert_eq!(
        get(addr, "/v1/catalog/nodes").await.json(),
        nodes_before.json()
    );
    assert_eq!(get(addr, "/v1/event/list").await.json(), json!([]));
    assert_eq!(after.index(), before.index());
    let services_after = get(addr, "/v1/catalog/services").await;
    assert_eq!(services_after.json(), services_before.json());
    assert_eq!(services_after.index(), services_before.index());
    assert_eq!(get(addr, "/v1/kv/k?raw").await.body, "v");
    reg.stop().await;
}

// === Catalog registration of other nodes ===

#[tokio::test]
async fn catalog_register_adds_other_nodes_and_a_node_deregistration_removes_them() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let mut snapshots = reg.handle.subscribe();
    let r = put_json(
        addr,
        "/v1/catalog/register",
        json!({
            "Node": "mesos-1", "Address": "10.0.0.7", "NodeMeta": {"skyline-inbound-port": "6041"},
            "Service": {"ID": "pay-1", "Service": "pay", "Port": 9000, "Tags": ["a"]},
            "Check": {"CheckID": "pay-1-ttl", "ServiceID": "pay-1", "Status": "passing",
                      "Definition": {"TTL": "30s"}}
        }),
    )
    .await;
    assert_eq!(r.text(), "true");
    let nodes = get(addr, "/v1/catalog/nodes").await.json();
    assert_eq!(nodes[0]["Node"], "mesos-1");
    assert_eq!(nodes[0]["Meta"]["skyline-inbound-port"], "6041");

    tokio::time::timeout(
        Duration::from_secs(5),
        snapshots.wait_for(|s| s.instance_count() == 1),
    )
    .await
    .unwrap()
    .unwrap();
    let snapshot = reg.handle.snapshot();
    let node = &snapshot.nodes["mesos-1"];
    assert_eq!(node.inbound_addr(), "10.0.0.7:6041".parse().unwrap());
    let pay = &snapshot.services["pay"][0];
    assert_eq!(pay.address.to_string(), "10.0.0.7");
    assert_eq!(pay.node, "mesos-1");

    // The TTL check of another node is refreshed with ?node=.
    let r = put(addr, "/v1/agent/check/fail/pay-1-ttl?node=mesos-1", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(health_statuses(addr, "pay").await, ["critical"]);

    let r = put_json(addr, "/v1/catalog/deregister", json!({"Node": "mesos-1"})).await;
    assert_eq!(r.text(), "true");
    assert_eq!(get(addr, "/v1/catalog/nodes").await.json(), json!([]));
    tokio::time::timeout(
        Duration::from_secs(5),
        snapshots.wait_for(|s| s.instance_count() == 0),
    )
    .await
    .unwrap()
    .unwrap();
    reg.stop().await;
}

#[tokio::test]
async fn embedded_discovery_feeds_a_publisher_without_http() {
    use skyline::catalog::Discovery as _;
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let (publisher, mut rx) = skyline::catalog::channel();
    let token = CancellationToken::new();
    let discovery = reg.handle.discovery();
    assert_eq!(discovery.describe(), format!("embedded:{addr}"));
    let task = tokio::spawn(discovery.run(publisher, token.clone()));
    register(addr, json!({"ID": "e-1", "Name": "embedded", "Port": 7, "Check": {"CheckID": "e", "TTL": "60s", "Status": "passing"}})).await;
    let state = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.snapshot.as_ref().is_some_and(|s| s.instance_count() == 1)),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(state.error.is_none());
    put(addr, "/v1/agent/check/warn/e", "").await;
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| {
            s.snapshot
                .as_ref()
                .is_some_and(|s| s.services["embedded"][0].health == Health::Warning)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    reg.stop().await;
    let stopped = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(
        stopped.snapshot.unwrap().instance_count(),
        1,
        "last snapshot kept"
    );
    token.cancel();
    task.await.unwrap();
}

// === Consul's decoding rules, through the socket ===

#[tokio::test]
async fn lowercase_and_snake_case_bodies_register_as_consul_decodes_them() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let r = put(
        addr,
        "/v1/agent/service/register",
        r#"{"name":"lower","id":"lower-1","port":81,"TAGS":["a"],"enable_tag_override":true,
            "check":{"checkid":"lower-ttl","ttl":"1m30s","status":"passing",
                     "deregister_critical_service_after":"1.5h"}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let health = get(addr, "/v1/health/service/lower").await.json();
    let check = &health[0]["Checks"][0];
    assert_eq!(health[0]["Service"]["Port"], 81);
    assert_eq!(health[0]["Service"]["Tags"], json!(["a"]));
    assert_eq!(check["CheckID"], "lower-ttl");
    assert_eq!(check["Status"], "passing");
    assert_eq!(check["Definition"]["TTL"], "1m30s");
    assert_eq!(
        check["Definition"]["DeregisterCriticalServiceAfter"],
        "1h30m0s"
    );

    let r = put(
        addr,
        "/v1/agent/check/update/lower-ttl",
        r#"{"status":"warning","output":"slow"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(health_statuses(addr, "lower").await, ["warning"]);

    let r = put(
        addr,
        "/v1/catalog/register",
        r#"{"node":"n2","address":"10.0.0.2","nodemeta":{"rack":"r1"},
            "service":{"service":"cat","id":"cat-1","port":82},
            "check":{"checkid":"cat-c","serviceid":"cat-1","status":"passing",
                     "definition":{"ttl":"30s","Unknown":"ignored here"}}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let node = get(addr, "/v1/catalog/node/n2").await;
    assert!(node.index() > 0);
    let node = node.json();
    assert_eq!(node["Node"]["Meta"], json!({"rack": "r1"}));
    assert_eq!(node["Services"]["cat-1"]["Port"], 82);
    let checks = get(addr, "/v1/health/node/n2").await.json();
    assert_eq!(checks[0]["Definition"]["TTL"], "30s");

    let r = put(
        addr,
        "/v1/catalog/deregister",
        r#"{"node":"n2","serviceid":"cat-1"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(get(addr, "/v1/catalog/service/cat").await.json(), json!([]));
    reg.stop().await;
}

#[tokio::test]
async fn node_health_state_and_coordinate_reads_carry_an_index_and_block_on_it() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(
        addr,
        json!({"ID": "b-1", "Name": "b", "Port": 1, "Check": {"CheckID": "b-ttl", "TTL": "60s"}}),
    )
    .await;
    for path in [
        "/v1/catalog/node/local",
        "/v1/health/node/local",
        "/v1/health/state/any",
        "/v1/health/state/critical",
        "/v1/coordinate/nodes",
        "/v1/event/list",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.index() > 0, "{path} lacks X-Consul-Index");
    }
    let critical = get(addr, "/v1/health/state/critical").await;
    assert_eq!(critical.json()[0]["CheckID"], "b-ttl");
    assert_eq!(
        get(addr, "/v1/health/state/passing").await.json(),
        json!([])
    );
    assert_eq!(get(addr, "/v1/health/state/bogus").await.json(), json!([]));

    // A blocking read of the critical state returns when the check passes.
    let index = critical.index();
    let waiter = tokio::spawn(async move {
        get(
            addr,
            &format!("/v1/health/state/passing?index={index}&wait=20s"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the blocking read answered before any change"
    );
    let r = put(addr, "/v1/agent/check/pass/b-ttl", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let woke = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken by the change")
        .unwrap();
    assert!(woke.index() > index);
    assert_eq!(woke.json()[0]["CheckID"], "b-ttl");

    // Agent and datacenter reads do not block and carry no index, as in Consul.
    for path in [
        "/v1/agent/self",
        "/v1/agent/members",
        "/v1/catalog/datacenters",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.headers.get("x-consul-index").is_none(), "{path}");
    }
    reg.stop().await;
}

#[tokio::test]
async fn maintenance_is_a_critical_check_that_survives_a_restart_and_events_do_not() {
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    register(addr, json!({"ID": "m-1", "Name": "m", "Port": 1})).await;
    let r = put(
        addr,
        "/v1/agent/service/maintenance/m-1?enable=true&reason=patching",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = put(addr, "/v1/agent/service/maintenance/nope?enable=true", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = put(addr, "/v1/event/fire/hello", "payload").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        get(addr, "/v1/event/list")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let reg = reg.restart().await;
    let addr = reg.addr();
    let checks = get(addr, "/v1/agent/checks").await.json();
    let check = &checks["_service_maintenance:m-1"];
    assert_eq!(check["Status"], "critical");
    assert_eq!(check["Notes"], "patching");
    assert_eq!(check["Type"], "maintenance");
    assert_eq!(health_statuses(addr, "m").await, ["critical"]);
    assert_eq!(get(addr, "/v1/event/list").await.json(), json!([]));

    let r = put(addr, "/v1/agent/service/maintenance/m-1?enable=false", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(health_statuses(addr, "m").await.is_empty());
    reg.stop().await;
}

// === Durability across a real crash ===

const CHILD_ENV: &str = "SKYLINE_TEST_CHILD";

/// Not a test of its own: the body of the child process the crash tests start and `SIGKILL`.
/// Without `SKYLINE_TEST_CHILD=registry:<dir>:<port-file>` it does nothing.
#[test]
fn child_registry_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    assert_eq!(parts.next(), Some("registry"));
    let dir = PathBuf::from(parts.next().unwrap());
    let port_file = PathBuf::from(parts.next().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = registry::spawn(
            listener,
            RegistryConfig::new(&dir),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let tmp = port_file.with_extension("tmp");
        std::fs::write(&tmp, handle.addr().to_string()).unwrap();
        std::fs::rename(&tmp, &port_file).unwrap();
        // Run until killed; bounded so a lost parent cannot leave it running forever.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

/// A registry in a child process, killed with SIGKILL when dropped.
struct ChildRegistry {
    child: Child,
    addr: SocketAddr,
}

impl ChildRegistry {
    async fn start(dir: &Path, run: u32) -> Self {
        let port_file = dir.with_extension(format!("port-{run}"));
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "registry::child_registry_process",
                "--exact",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("registry:{}:{}", dir.display(), port_file.display()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut me = Self {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                me.addr = s.trim().parse().unwrap();
                return me;
            }
            assert!(
                Instant::now() < deadline,
                "child registry did not start within 20s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ChildRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_kill_and_the_index_never_goes_backwards() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let child = ChildRegistry::start(&dir, 1).await;
    let addr = child.addr;
    const N: usize = 20;
    for i in 0..N {
        register(
            addr,
            json!({"ID": format!("c-{i}"), "Name": "crash", "Port": 1000 + i,
                   "Check": {"TTL": "30s", "Status": "passing"}}),
        )
        .await;
        let r = put(addr, &format!("/v1/kv/crash/{i}"), format!("value-{i}")).await;
        assert_eq!(r.text(), "true");
    }
    let service_index = get(addr, "/v1/health/service/crash").await.index();
    let kv_index = get(addr, "/v1/kv/crash/?recurse").await.index();
    child.kill();

    let child = ChildRegistry::start(&dir, 2).await;
    let addr = child.addr;
    let health = get(addr, "/v1/health/service/crash").await;
    assert!(
        health.index() >= service_index,
        "{} < {service_index}",
        health.index()
    );
    let entries = health.json();
    assert_eq!(entries.as_array().unwrap().len(), N);
    // No mass-critical at boot: TTL timers restart from now.
    assert_eq!(health_statuses(addr, "crash").await, vec!["passing"; N]);
    let kv = get(addr, "/v1/kv/crash/?recurse").await;
    assert!(kv.index() >= kv_index);
    for i in 0..N {
        let r = get(addr, &format!("/v1/kv/crash/{i}?raw")).await;
        assert_eq!(r.body, format!("value-{i}"));
    }
    // New writes get higher indexes than anything seen before the crash.
    put(addr, "/v1/kv/after", "1").await;
    assert!(get(addr, "/v1/kv/after").await.index() > kv_index.max(service_index));
    child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_dropped_at_start_and_earlier_records_survive() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let child = ChildRegistry::start(&dir, 1).await;
    for i in 0..5 {
        put(child.addr, &format!("/v1/kv/torn/{i}"), "v").await;
    }
    child.kill();

    // A record header that promises more bytes than follow, as a crash mid-write leaves it.
    let log = registry::store::Store::log_path(&dir);
    let clean_len = std::fs::metadata(&log).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, &[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, b'{', b'"'])
        .unwrap();
    drop(f);

    let child = ChildRegistry::start(&dir, 2).await;
    assert_eq!(std::fs::metadata(&log).unwrap().len(), clean_len);
    let keys = get(child.addr, "/v1/kv/torn/?keys").await.json();
    assert_eq!(keys.as_array().unwrap().len(), 5);
    put(child.addr, "/v1/kv/torn/after", "v").await;
    child.kill();

    // What was written after the truncation is readable too.
    let child = ChildRegistry::start(&dir, 3).await;
    let keys = get(child.addr, "/v1/kv/torn/?keys").await.json();
    assert_eq!(keys.as_array().unwrap().len(), 6);
    child.kill();
}

// === Scale ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_thirty_thousand_instances_registered_by_concurrent_agents() {
    const NODES: usize = 30;
    const PER_NODE: usize = 1000;
    let reg = TestRegistry::start().await;
    let addr = reg.addr();
    let start = Instant::now();
    let mut agents = Vec::new();
    for n in 0..NODES {
        agents.push(tokio::spawn(async move {
            for i in 0..PER_NODE {
                let r = put_json(
                    addr,
                    "/v1/catalog/register",
                    json!({"Node": format!("node-{n}"), "Address": format!("10.0.{n}.1"),
                           "Service": {"ID": format!("svc-{i}-{n}"), "Service": format!("svc-{}", i % 100), "Port": 8000},
                           "Check": {"CheckID": format!("svc-{i}-{n}-ttl"), "ServiceID": format!("svc-{i}-{n}"),
                                     "Status": "passing", "Definition": {"TTL": "10m"}}}),
                )
                .await;
                assert_eq!(r.status, StatusCode::OK);
            }
        }));
    }
    for a in agents {
        a.await.unwrap();
    }
    let elapsed = start.elapsed();
    let snapshot = snapshot_where(&reg.handle, |s| s.instance_count() == NODES * PER_NODE).await;
    assert_eq!(snapshot.services.len(), 100);
    let one = get(addr, "/v1/health/service/svc-7?passing").await.json();
    assert_eq!(one.as_array().unwrap().len(), NODES * PER_NODE / 100);
    eprintln!("30000 registrations in {elapsed:?}");

    // The log went through compaction (it passed 8 MiB); a restart replays snapshot + log.
    assert!(
        reg.dir.path().join("snapshot").exists(),
        "log was compacted"
    );
    let started = Instant::now();
    let reg = reg.restart().await;
    eprintln!("restart with 30000 instances in {:?}", started.elapsed());
    let again = snapshot_where(&reg.handle, |s| s.instance_count() == NODES * PER_NODE).await;
    assert_eq!(*again, *snapshot);
    reg.stop().await;
}

// === Sessions and locks ===

async fn create_session(addr: SocketAddr, body: Value) -> String {
    let r = put_json(addr, "/v1/session/create", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["ID"].as_str().unwrap().to_owned()
}

async fn kv_entry(addr: SocketAddr, key: &str) -> Value {
    let r = get(addr, &format!("/v1/kv/{key}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_a_restart_and_its_session_expires_after_twice_its_ttl() {
    let reg = TestRegistry::start().await;
    let id = create_session(reg.addr(), json!({ "TTL": "10s", "LockDelay": "0s" })).await;
    let r = put(reg.addr(), &format!("/v1/kv/leader?acquire={id}"), "me").await;
    assert_eq!(r.text(), "true");

    let reg = reg.restart().await;
    let renewed = Instant::now();
    let entry = kv_entry(reg.addr(), "leader").await;
    assert_eq!(
        (entry["Session"].as_str(), entry["LockIndex"].as_u64()),
        (Some(id.as_str()), Some(1))
    );
    let r = put(reg.addr(), &format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()[0]["ID"], id.as_str());

    // Past the TTL the lock is still held: a session is invalidated after twice its TTL.
    tokio::time::sleep_until(renewed + Duration::from_secs(11)).await;
    assert_eq!(kv_entry(reg.addr(), "leader").await["Session"], id.as_str());
    let index = get(reg.addr(), "/v1/kv/leader").await.index();
    let r = get(reg.addr(), &format!("/v1/kv/leader?index={index}&wait=30s")).await;
    let expired = renewed.elapsed();
    assert!(r.json()[0]["Session"].is_null(), "{}", r.text());
    assert!(
        expired >= Duration::from_secs(20) && expired < Duration::from_secs(25),
        "released {expired:?} after the renewal"
    );
    let r = put(reg.addr(), &format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.text(), format!("Session id '{id}' not found"));
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_check_invalidates_its_session_and_the_lock_delay_refuses_the_next_holder() {
    let reg = TestRegistry::start().await;
    register(
        reg.addr(),
        json!({ "Name": "web", "ID": "web-1", "Port": 80, "Check": { "TTL": "60s", "Status": "passing" } }),
    )
    .await;
    let first = create_session(
        reg.addr(),
        json!({ "Checks": ["serfHealth", "service:web-1"], "LockDelay": "2s" }),
    )
    .await;
    let second = create_session(reg.addr(), json!({ "Behavior": "delete" })).await;
    assert_eq!(
        put(reg.addr(), &format!("/v1/kv/lock?acquire={first}"), "1")
            .await
            .text(),
        "true"
    );
    assert_eq!(
        put(reg.addr(), &format!("/v1/kv/lock?acquire={second}"), "2")
            .await
            .text(),
        "false"
    );

    let r = put(reg.addr(), "/v1/agent/check/fail/service:web-1", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let invalidated = Instant::now();
    let r = get(reg.addr(), &format!("/v1/session/info/{first}")).await;
    assert_eq!(r.json(), json!([]));
    let entry = kv_entry(reg.addr(), "lock").await;
    assert!(entry["Session"].is_null(), "released: {entry}");
    assert_eq!(entry["Value"], "MQ==", "release keeps the value");

    // The lock-delay refuses the key to every session for 2 s, then lets the next one in.
    assert_eq!(
        put(reg.addr(), &format!("/v1/kv/lock?acquire={second}"), "2")
            .await
            .text(),
        "false"
    );
    let acquired = loop {
        let r = put(reg.addr(), &format!("/v1/kv/lock?acquire={second}"), "2").await;
        if r.text() == "true" {
            break invalidated.elapsed();
        }
        assert!(
            invalidated.elapsed() < Duration::from_secs(10),
            "never acquired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(acquired >= Duration::from_millis(1900), "{acquired:?}");
    assert_eq!(kv_entry(reg.addr(), "lock").await["LockIndex"], 2);

    // Destroying a `delete` session deletes what it holds.
    assert_eq!(
        put(reg.addr(), &format!("/v1/session/destroy/{second}"), "")
            .await
            .text(),
        "true"
    );
    assert_eq!(
        get(reg.addr(), "/v1/kv/lock").await.status,
        StatusCode::NOT_FOUND
    );
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_refused_with_consuls_errors_when_their_node_ttl_or_checks_are_wrong() {
    let reg = TestRegistry::start().await;
    register(
        reg.addr(),
        json!({ "Name": "web", "ID": "web-1", "Port": 80, "Check": { "TTL": "60s" } }),
    )
    .await;
    for (body, error) in [
        (
            json!({ "Node": "elsewhere" }),
            "Missing node registration".to_owned(),
        ),
        (
            json!({ "TTL": "5s" }),
            "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]".to_owned(),
        ),
        (
            json!({ "Behavior": "keep" }),
            "Invalid Behavior setting 'keep'".to_owned(),
        ),
        (
            json!({ "NodeChecks": ["nope"] }),
            "Missing check 'nope' registration".to_owned(),
        ),
        (
            json!({ "Checks": ["service:web-1"] }),
            "Check 'service:web-1' is in critical state".to_owned(),
        ),
    ] {
        let r = put_json(reg.addr(), "/v1/session/create", body.clone()).await;
        assert_eq!(
            (r.status, r.text()),
            (StatusCode::INTERNAL_SERVER_ERROR, error),
            "{body}"
        );
    }
    let r = put(reg.addr(), "/v1/kv/k?acquire=not-a-session", "").await;
    assert_eq!(
        (r.status, r.text()),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "invalid session \"not-a-session\"".to_owned()
        )
    );
    let r = put(reg.addr(), "/v1/kv/k?acquire=x&cas=0", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().starts_with("Conflicting flags: "), "{}", r.text());
    assert_eq!(get(reg.addr(), "/v1/session/list").await.json(), json!([]));
    reg.stop().await;
}
