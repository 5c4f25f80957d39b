//! `ConsulDiscovery` against our registry (real sockets) and against recorded Consul answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use skyline::catalog::consul::ConsulDiscovery;
use skyline::catalog::{self, CatalogState, Discovery, Health, Subscriber};
use skyline::registry::store::{self, Op, Record, Registration, ServiceDef, Store};
use skyline::registry::{self, RegistryConfig, RegistryHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// === Harness ===

async fn start_registry(
    dir: &std::path::Path,
    addr: Option<SocketAddr>,
) -> (RegistryHandle, CancellationToken) {
    let listener = match addr {
        None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
        // Rebinding the port of a stopped registry; retried while the old socket goes away.
        Some(addr) => {
            let mut tries = 0;
            loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) => {
                        tries += 1;
                        assert!(tries < 100, "cannot rebind {addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    let token = CancellationToken::new();
    let handle = registry::spawn(listener, RegistryConfig::new(dir), token.clone())
        .await
        .unwrap();
    (handle, token)
}

async fn put_json(addr: SocketAddr, path: &str, body: Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{path}: {text:?}");
}

fn start_discovery(addr: SocketAddr) -> (Subscriber, CancellationToken, JoinHandle<()>) {
    let (publisher, subscriber) = catalog::channel();
    let token = CancellationToken::new();
    let discovery = ConsulDiscovery {
        address: addr,
        wait: Duration::from_secs(2),
        token: None,
    };
    assert_eq!(discovery.describe(), format!("consul:{addr}"));
    let task = tokio::spawn(discovery.run(publisher, token.clone()));
    (subscriber, token, task)
}

async fn wait_for(
    rx: &mut Subscriber,
    limit: Duration,
    what: &str,
    f: impl Fn(&CatalogState) -> bool,
) -> CatalogState {
    let result = tokio::time::timeout(limit, rx.wait_for(|s| f(s)))
        .await
        .map(|r| r.map(|state| state.clone()));
    match result {
        Ok(Ok(state)) => state,
        _ => panic!(
            "{what} not seen within {limit:?}; last state: {:?}",
            *rx.borrow()
        ),
    }
}

fn health_of(state: &CatalogState, service: &str, id: &str) -> Option<Health> {
    let snapshot = state.snapshot.as_ref()?;
    snapshot
        .services
        .get(service)?
        .iter()
        .find(|i| i.id == id)
        .map(|i| i.health)
}

// === Against our registry ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_registry_catalog_and_follows_health_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, reg_token) = start_registry(dir.path(), None).await;
    let addr = reg.addr();
    put_json(
        addr,
        "/v1/catalog/register",
        json!({"Node": "vm-1", "Address": "10.1.0.1", "NodeMeta": {"skyline-inbound-port": "7041"},
               "Service": {"ID": "pay-1", "Service": "pay", "Port": 9000, "Meta": {"platform": "mesos"},
                           "Weights": {"Passing": 3, "Warning": 1}}}),
    )
    .await;
    put_json(
        addr,
        "/v1/agent/service/register",
        json!({"ID": "web-1", "Name": "web", "Port": 8080,
               "Check": {"CheckID": "web-ttl", "TTL": "60s", "Status": "passing"}}),
    )
    .await;

    let (mut rx, token, task) = start_discovery(addr);
    let state = wait_for(&mut rx, Duration::from_secs(5), "first snapshot", |s| {
        s.snapshot.is_some()
    })
    .await;
    let snapshot = state.snapshot.unwrap();
    assert_eq!(snapshot.instance_count(), 2);
    assert_eq!(
        snapshot.nodes["vm-1"].inbound_addr(),
        "10.1.0.1:7041".parse().unwrap()
    );
    assert_eq!(
        snapshot.nodes["local"].inbound_port,
        catalog::DEFAULT_INBOUND_PORT
    );
    let pay = &snapshot.services["pay"][0];
    assert_eq!(pay.addr(), "10.1.0.1:9000".parse().unwrap());
    assert_eq!(pay.weight, 3);
    assert_eq!(pay.meta["platform"], "mesos");
    // The registry's own in-process view is the same catalog.
    let mut own = reg.subscribe();
    tokio::time::timeout(Duration::from_secs(5), own.wait_for(|s| **s == *snapshot))
        .await
        .expect("in-process snapshot equals the one seen over HTTP")
        .unwrap();

    let start = tokio::time::Instant::now();
    put_json(addr, "/v1/agent/check/fail/web-ttl", json!(null)).await;
    wait_for(&mut rx, Duration::from_secs(5), "critical web", |s| {
        health_of(s, "web", "web-1") == Some(Health::Critical)
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );

    // A new service appears; a deregistered one disappears.
    put_json(
        addr,
        "/v1/agent/service/register",
        json!({"ID": "db-1", "Name": "db", "Port": 5432}),
    )
    .await;
    put_json(addr, "/v1/agent/service/deregister/web-1", json!(null)).await;
    wait_for(
        &mut rx,
        Duration::from_secs(5),
        "db added and web removed",
        |s| {
            s.snapshot.as_ref().is_some_and(|snap| {
                snap.services.contains_key("db") && !snap.services.contains_key("web")
            })
        },
    )
    .await;

    token.cancel();
    task.await.unwrap();
    reg_token.cancel();
    reg.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_last_snapshot_while_the_registry_is_down_and_catches_up_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, reg_token) = start_registry(dir.path(), None).await;
    let addr = reg.addr();
    put_json(
        addr,
        "/v1/agent/service/register",
        json!({"ID": "a-1", "Name": "alpha", "Port": 1}),
    )
    .await;
    let (mut rx, token, task) = start_discovery(addr);
    let before = wait_for(&mut rx, Duration::from_secs(5), "first snapshot", |s| {
        s.snapshot.is_some()
    })
    .await
    .snapshot
    .unwrap();

    reg_token.cancel();
    reg.join().await;
    let down = wait_for(&mut rx, Duration::from_secs(5), "an error", |s| {
        s.error.is_some()
    })
    .await;
    assert_eq!(
        down.snapshot.as_deref(),
        Some(&*before),
        "last good snapshot kept"
    );
    assert!(down.error.unwrap().contains(&addr.to_string()));

    // Changes made while the client could not see the registry: written straight to its store.
    {
        let (mut store, state) = Store::open(dir.path()).unwrap();
        let mut buf = Vec::new();
        let record = Record {
            index: state.index + 1,
            op: Op::Register(Registration {
                node: "local".into(),
                address: "127.0.0.1".into(),
                node_meta: None,
                service: Some(ServiceDef {
                    id: "b-1".into(),
                    name: "beta".into(),
                    tags: vec![],
                    address: String::new(),
                    port: 2,
                    meta: Default::default(),
                    weights: Default::default(),
                }),
                checks: vec![],
                replace_service_checks: true,
            }),
        };
        store::encode(&record, &mut buf).unwrap();
        store.append(&buf).unwrap();
    }

    let (reg, reg_token) = start_registry(dir.path(), Some(addr)).await;
    let back = wait_for(&mut rx, Duration::from_secs(15), "catch-up", |s| {
        s.error.is_none()
            && s.snapshot
                .as_ref()
                .is_some_and(|snap| snap.services.contains_key("beta"))
    })
    .await;
    assert!(back.snapshot.unwrap().services.contains_key("alpha"));

    token.cancel();
    task.await.unwrap();
    reg_token.cancel();
    reg.join().await;
}

// === Against recorded Consul answers ===

/// `GET /v1/catalog/services` as in Consul's API documentation.
const CATALOG_SERVICES: &str = r#"{
  "consul": [],
  "redis": [],
  "postgresql": ["primary", "secondary"]
}"#;

/// `GET /v1/health/service/redis` as in Consul's API documentation.
const HEALTH_SERVICE: &str = r#"[
  {
    "Node": {
      "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
      "Node": "foobar",
      "Address": "10.1.10.12",
      "Datacenter": "dc1",
      "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
      "Meta": {"instance_type": "t2.medium"}
    },
    "Service": {
      "ID": "redis",
      "Service": "redis",
      "Tags": ["primary"],
      "Address": "10.1.10.12",
      "TaggedAddresses": {
        "lan": {"address": "10.1.10.12", "port": 8000},
        "wan": {"address": "198.18.0.53", "port": 80}
      },
      "Meta": {"redis_version": "4.0"},
      "Port": 8000,
      "Weights": {"Passing": 10, "Warning": 1},
      "Namespace": "default"
    },
    "Checks": [
      {
        "Node": "foobar",
        "CheckID": "service:redis",
        "Name": "Service 'redis' check",
        "Status": "passing",
        "Notes": "",
        "Output": "",
        "ServiceID": "redis",
        "ServiceName": "redis",
        "ServiceTags": ["primary"],
        "Namespace": "default"
      },
      {
        "Node": "foobar",
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Namespace": "default"
      }
    ]
  }
]"#;

/// How the fake Consul picks `X-Consul-Index` for `/v1/catalog/services`: from the number of
/// the request (0-based) and the index the client sent.
type IndexScript = dyn Fn(usize, Option<u64>) -> u64 + Send + Sync;

struct FakeConsul {
    addr: SocketAddr,
    /// The `?index=` of every `/v1/catalog/services` request, in order.
    catalog_requests: Arc<Mutex<Vec<Option<u64>>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_consul(script: Arc<IndexScript>) -> FakeConsul {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Arc<Mutex<Vec<Option<u64>>>> = Arc::default();
    let requests = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let script = script.clone();
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let log = log.clone();
                let script = script.clone();
                async move {
                    let index: Option<u64> = req.uri().query().and_then(|q| {
                        q.split('&')
                            .find_map(|p| p.strip_prefix("index="))
                            .and_then(|v| v.parse().ok())
                    });
                    let (body, consul_index) = match req.uri().path() {
                        "/v1/catalog/services" => {
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(index);
                                log.len() - 1
                            };
                            (CATALOG_SERVICES, script(n, index))
                        }
                        p if p.starts_with("/v1/health/service/") => (HEALTH_SERVICE, 10),
                        _ => ("", 0),
                    };
                    // A blocking request "blocks" a little, like a quiet Consul would.
                    if index.is_some() && consul_index != 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let resp = Response::builder()
                        .header("X-Consul-Index", consul_index.to_string())
                        .header("Content-Type", "application/json")
                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    FakeConsul {
        addr,
        catalog_requests: requests,
        task,
    }
}

#[tokio::test]
async fn understands_the_answers_of_consuls_documentation() {
    let consul = fake_consul(Arc::new(|_, _| 100)).await;
    let (mut rx, token, task) = start_discovery(consul.addr);
    let state = wait_for(&mut rx, Duration::from_secs(5), "first snapshot", |s| {
        s.snapshot.is_some()
    })
    .await;
    let snapshot = state.snapshot.unwrap();
    assert_eq!(
        snapshot
            .services
            .keys()
            .map(|k| k.as_str())
            .collect::<Vec<_>>(),
        ["consul", "postgresql", "redis"]
    );
    let redis = &snapshot.services["redis"][0];
    assert_eq!(redis.id, "redis");
    assert_eq!(redis.node, "foobar");
    assert_eq!(redis.addr(), "10.1.10.12:8000".parse().unwrap());
    assert_eq!(redis.weight, 10);
    assert_eq!(redis.health, Health::Passing);
    assert_eq!(*redis.tags, ["primary"]);
    assert_eq!(redis.meta["redis_version"], "4.0");
    let node = &snapshot.nodes["foobar"];
    assert_eq!(node.inbound_port, catalog::DEFAULT_INBOUND_PORT);
    assert_eq!(node.meta["instance_type"], "t2.medium");
    assert!(state.error.is_none());
    token.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn resets_its_index_when_consuls_index_goes_backwards() {
    // 100, then 50 (a restored snapshot), then 50 from there on.
    let consul = fake_consul(Arc::new(|n, _| if n == 0 { 100 } else { 50 })).await;
    let (_rx, token, task) = start_discovery(consul.addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if consul.catalog_requests.lock().unwrap().len() >= 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "too few requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = consul.catalog_requests.lock().unwrap()[..4].to_vec();
    assert_eq!(seen, [None, Some(100), None, Some(50)]);
    token.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn clamps_an_index_of_zero_and_does_not_busy_loop() {
    let consul = fake_consul(Arc::new(|_, _| 0)).await;
    let (_rx, token, task) = start_discovery(consul.addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    token.cancel();
    task.await.unwrap();
    let seen = consul.catalog_requests.lock().unwrap().clone();
    // One request per 50 ms at most: about 20 in a second, never thousands.
    assert!(
        seen.len() >= 2 && seen.len() <= 25,
        "{} requests in 1s",
        seen.len()
    );
    assert_eq!(seen[0], None);
    assert!(seen[1..].iter().all(|i| *i == Some(1)), "{seen:?}");
}
