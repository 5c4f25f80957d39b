//! Fault tests of the forwarder's resilience, on real sockets with bounded load: a killed
//! instance, a black hole, a slow instance, failing instances and the retry budget, one hop
//! retrying, deadlines, and drain-aware removal. Each prints its counts.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::Full;
use skyline::catalog::ServiceName;
use skyline::proxy::resilience::{Policies, Resilience};

use crate::support::*;

/// Not a test of its own: the application process of the `kill -9` test. That test starts a
/// copy of this test binary running only this function, with `SKYLINE_TEST_APP_IP` set; without
/// it, this returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn app_process() {
    let Ok(ip) = std::env::var("SKYLINE_TEST_APP_IP") else {
        return;
    };
    let app = TestApp::spawn("process", ip.parse().unwrap());
    println!("listening {}", app.addr);
    // Until killed; bounded all the same.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// Starts [`app_process`] in its own process on `ip`; returns the child and its address.
fn app_in_process(ip: &str) -> (std::process::Child, std::net::SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["resilience::app_process", "--exact", "--nocapture"])
        .env("SKYLINE_TEST_APP_IP", ip)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines().take(50) {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("listening ") {
            return (child, addr.trim().parse().unwrap());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the application process did not start");
}

/// The nodes that run `web` in these tests; the caller is node `a` at 127.0.0.2.
const NODES: [(&str, &str); 3] = [("b", "127.0.0.3"), ("c", "127.0.0.4"), ("d", "127.0.0.5")];

/// One application per behaviour, the i-th on the i-th of [`NODES`].
fn apps(behaviours: &[Behaviour]) -> Vec<TestApp> {
    behaviours
        .iter()
        .zip(NODES)
        .map(|(&b, (node, addr))| TestApp::spawn_with(node, ip(addr), b))
        .collect()
}

/// A mesh where node `a` calls `web`, whose i-th instance (at `instances[i]`) runs on the i-th
/// of [`NODES`].
async fn web_mesh(instances: &[std::net::SocketAddr], policies: Policies) -> TestMesh {
    let mut mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .resilience(policies);
    for (&addr, (node, ip)) in instances.iter().zip(NODES) {
        mesh = mesh.node(node, ip).place(Placement {
            service: "web",
            node,
            addr,
            health: skyline::catalog::Health::Passing,
        });
    }
    mesh.spawn().await
}

fn addrs(apps: &[TestApp]) -> Vec<std::net::SocketAddr> {
    apps.iter().map(|a| a.addr).collect()
}

async fn stop_all(mesh: TestMesh, apps: Vec<TestApp>) {
    mesh.stop().await;
    for app in apps {
        app.stop().await;
    }
}

fn routes_of(reply: &Reply, service: &str) -> Vec<serde_json::Value> {
    reply.json()["outbound"][service]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_with_sigkill_under_load_fails_no_idempotent_request() {
    let (mut child, addr) = app_in_process("127.0.0.3");
    let c = TestApp::spawn("c", ip("127.0.0.4"));
    // Round robin, so the doomed instance certainly has traffic when it dies.
    let mesh = web_mesh(&[addr, c.addr], round_robin()).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    let load = tokio::spawn(async move {
        load(&url, 4, Duration::from_secs(4), Duration::from_millis(10)).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let report = load.await.unwrap();
    println!(
        "kill -9: {} requests, {} failed, statuses {:?}, errors {:?}",
        report.sent,
        report.failed(),
        report.statuses,
        report.reasons
    );
    assert_eq!(report.failed(), 0, "no idempotent request fails");
    assert!(
        c.hits() + 50 < report.sent,
        "the killed instance served its share before: {} of {} at c",
        c.hits(),
        report.sent
    );
    // The dead node is ejected from a's route for web.
    let routes = Client::new()
        .get(&format!(
            "http://{}/routes",
            mesh.agents["a"].admin.unwrap()
        ))
        .await;
    let ejected: Vec<_> = routes_of(&routes, "web")
        .into_iter()
        .filter(|e| e["state"]["ejected"] == true)
        .collect();
    assert_eq!(ejected.len(), 1, "{:?}", routes.body);
    assert_eq!(ejected[0]["addr"], mesh.inbound("b").to_string());
    let metrics = scrape(mesh.admin("a")).await;
    assert_eq!(
        metrics.count(r#"skyline_ejections_total{service="web"}"#),
        1.0
    );
    // The dead instance's node answered that it reached no instance (x-skyline-unsent): sent
    // elsewhere as safely as a refused connection.
    assert!(metrics.count(r#"skyline_retries_total{service="web",reason="unsent"}"#) >= 1.0);
    stop_all(mesh, vec![c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_instance_times_out_then_is_ejected() {
    // Accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let c = TestApp::spawn("c", ip("127.0.0.4"));
    let timeouts = policies(|r| {
        r.balance = skyline::routing::balance::Balance::RoundRobin;
        r.attempt_timeout = Some(Duration::from_millis(300));
        r.request_timeout = Duration::from_secs(5);
    });
    let mesh = web_mesh(&[hole_addr, c.addr], timeouts).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    let workers = 4;
    let report = load(
        &url,
        workers,
        Duration::from_secs(3),
        Duration::from_millis(10),
    )
    .await;
    println!(
        "black hole: {} requests, {} failed, statuses {:?}, errors {:?}",
        report.sent,
        report.failed(),
        report.statuses,
        report.reasons
    );
    assert!(
        report.failed() <= workers as u64,
        "failures are bounded by the requests in flight"
    );
    assert!(c.hits() >= report.sent - report.failed());
    let routes = Client::new()
        .get(&format!(
            "http://{}/routes",
            mesh.agents["a"].admin.unwrap()
        ))
        .await;
    let b = routes_of(&routes, "web")
        .into_iter()
        .find(|e| e["addr"] == mesh.inbound("b").to_string())
        .unwrap();
    assert_eq!(b["state"]["ejected"], true, "{b}");
    stop_all(mesh, vec![c]).await;
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_gets_less_than_a_tenth_of_the_traffic() {
    let slow = Behaviour::Slow(Duration::from_millis(500));
    let apps = apps(&[slow, Behaviour::Healthy, Behaviour::Healthy]);
    let mesh = web_mesh(&addrs(&apps), Policies::default()).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    let report = load(&url, 8, Duration::from_secs(4), Duration::from_millis(5)).await;
    let hits: Vec<u64> = apps.iter().map(TestApp::hits).collect();
    let share = hits[0] as f64 / hits.iter().sum::<u64>() as f64;
    println!(
        "slow instance: {} requests, {} failed; hits slow/fast/fast {hits:?} (slow share {:.1}%)",
        report.sent,
        report.failed(),
        share * 100.0
    );
    assert_eq!(report.failed(), 0);
    assert!(share < 0.10, "slow share {share}");
    assert!(hits[0] > 0, "the slow instance was tried");
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_equal_instances_share_each_three_second_window_of_steady_load_within_a_fifth_of_even()
{
    let apps = apps(&[Behaviour::Healthy, Behaviour::Healthy]);
    let mesh = web_mesh(&addrs(&apps), Policies::default()).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    // About 200 requests a second (2 callers, 10 ms apart), three windows of 3 s, at steady
    // load: a first second opens the pooled connections (whose connect time counts in an
    // endpoint's latency) and fills both endpoints' latency averages before anything is counted.
    let warm = load(&url, 2, Duration::from_secs(1), Duration::from_millis(10)).await;
    assert_eq!(warm.failed(), 0);
    for window in 0..3 {
        let before: Vec<u64> = apps.iter().map(TestApp::hits).collect();
        let report = load(&url, 2, Duration::from_secs(3), Duration::from_millis(10)).await;
        let hits: Vec<u64> = apps
            .iter()
            .zip(&before)
            .map(|(a, b)| a.hits() - b)
            .collect();
        let share = hits[0] as f64 / (hits[0] + hits[1]).max(1) as f64;
        println!(
            "window {window}: {} requests, {} failed, split {hits:?} ({:.1}% on the first)",
            report.sent,
            report.failed(),
            share * 100.0
        );
        assert_eq!(report.failed(), 0);
        assert!(hits[0] + hits[1] >= 100, "the load ran: {hits:?}");
        assert!(
            (0.4..=0.6).contains(&share),
            "window {window}: {hits:?} is not within 20% of an even split"
        );
    }
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_absorb_an_instance_failing_half_its_requests() {
    let apps = apps(&[
        Behaviour::Fail503Every(2),
        Behaviour::Healthy,
        Behaviour::Healthy,
    ]);
    let mesh = web_mesh(&addrs(&apps), round_robin()).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    let report = load(&url, 4, Duration::from_secs(3), Duration::from_millis(10)).await;
    let hits: u64 = apps.iter().map(TestApp::hits).sum();
    println!(
        "503 on half of one instance's requests: {} requests, {} failed, {} attempts, statuses {:?}",
        report.sent,
        report.failed(),
        hits,
        report.statuses
    );
    assert_eq!(report.failed(), 0, "every 503 was retried elsewhere");
    assert!(apps[0].hits() > 20, "the flaky instance kept its share");
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_instance_fails_retries_stay_within_the_budget() {
    let apps = apps(&[Behaviour::Fail503Every(1); 2]);
    let mesh = web_mesh(&addrs(&apps), Policies::default()).await;
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    let started = Instant::now();
    let report = load(&url, 4, Duration::from_secs(3), Duration::from_millis(5)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let attempts: u64 = apps.iter().map(TestApp::hits).sum();
    let retries = attempts - report.sent;
    // Linkerd's budget: 20% of requests plus 10/s, over a 10 s window (so the floor is 100
    // retries for any run shorter than the window).
    let allowed = 0.2 * report.sent as f64 + 100.0;
    println!(
        "every instance fails: {} requests in {elapsed:.1} s, {retries} retries (budget {allowed:.0}, \
         without one {}), statuses {:?}",
        report.sent,
        2 * report.sent,
        report.statuses
    );
    assert_eq!(
        report.statuses.get(&503),
        Some(&report.sent),
        "the 503s reach the caller"
    );
    assert!(retries > 0, "retries were tried");
    let metrics = scrape(mesh.admin("a")).await;
    assert_eq!(
        metrics.count(r#"skyline_retries_total{service="web",reason="status"}"#),
        retries as f64,
        "every retry counted"
    );
    assert!(metrics.count(r#"skyline_retry_budget_exhausted_total{service="web"}"#) > 0.0);
    assert!(
        retries as f64 <= allowed + 4.0,
        "{retries} retries for {} requests",
        report.sent
    );
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_hop_retries() {
    let apps = apps(&[Behaviour::Fail503Every(1)]);
    let mesh = web_mesh(&addrs(&apps), Policies::default()).await;
    let reply = Client::new()
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.mesh_error(), None, "the application's own 503");
    // The outbound proxy tries 1 + 2 times; the inbound proxy, a later hop, does not multiply
    // them (it would make 9).
    assert_eq!(apps[0].hits(), 3);
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_hop_never_retries_an_answer_even_for_a_request_without_a_first_hop() {
    let apps = apps(&[Behaviour::Fail503Every(1)]);
    let mesh = web_mesh(&addrs(&apps), Policies::default()).await;
    // Straight to node b's inbound proxy: no outbound proxy retried or marked this request.
    let reply = Client::new()
        .get(&format!("http://{}/service/web/", mesh.inbound(NODES[0].0)))
        .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.mesh_error(), None, "the application's own 503");
    assert_eq!(apps[0].hits(), 1, "the inbound proxy sent it once");
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_come_from_the_route_or_the_caller_and_travel_to_the_next_hop() {
    let app = TestApp::spawn("b", ip("127.0.0.3"));
    let short = Resilience {
        request_timeout: Duration::from_millis(300),
        ..Resilience::default()
    };
    let mut policies = Policies::default();
    policies
        .services
        .insert(ServiceName::parse("hurried").unwrap(), Arc::new(short));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &app))
        .place(place("hurried", "b", &app))
        .resilience(policies)
        .spawn()
        .await;
    let client = Client::new();
    let outbound = mesh.outbound("a");

    // The route's timeout: 300 ms for `hurried`, the default for `web`.
    let started = Instant::now();
    let reply = client
        .get(&format!("http://{outbound}/service/hurried/slow/3000"))
        .await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.mesh_error(), Some("upstream-timeout"));
    assert!(started.elapsed() < Duration::from_millis(2500));
    let reply = client
        .get(&format!("http://{outbound}/service/web/slow/400"))
        .await;
    assert_eq!(reply.status, 200);

    // The caller's deadline, shorter than the route's, is kept and passed on.
    let req = Request::get(format!("http://{outbound}/service/web/slow/3000"))
        .header("x-skyline-timeout-ms", "250")
        .header("x-skyline-attempt", "7")
        .body(Full::default())
        .unwrap();
    let started = Instant::now();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_millis(2500));
    let seen = app.seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.target == "/slow/3000")
        .unwrap();
    let left: u64 = last.headers["x-skyline-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left <= 250 && left > 0, "the instance saw {left} ms left");
    assert!(
        !last.headers.contains_key("x-skyline-attempt"),
        "only retries are marked, by the mesh"
    );
    mesh.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_leaving_the_catalog_finishes_its_in_flight_requests() {
    let (mesh, b, c) = mesh_with_b_and_c().await;
    let client = Client::new();
    let url = format!("http://{}/service/web/slow/1500", mesh.outbound("a"));
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.set_catalog_and_wait(&[place("web", "c", &c)]).await;
    let now = client
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(
        now.body, "c /",
        "new requests go to the remaining endpoint at once"
    );
    let finished = in_flight.await.unwrap();
    assert_eq!(finished.status, 200);
    assert_eq!(
        finished.body, "b /slow/1500",
        "the in-flight request finished"
    );
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_probe_takes_a_failing_endpoint_out_of_rotation() {
    let apps = apps(&[Behaviour::Fail503Every(1), Behaviour::Healthy]);
    let probing = policies(|r| {
        r.balance = skyline::routing::balance::Balance::RoundRobin;
        // No retries: a request sent to the sick instance would fail visibly.
        r.retries = 0;
        r.probe = Some(skyline::proxy::resilience::Probe {
            path: "/health".into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            unhealthy: 2,
            healthy: 1,
        });
    });
    let mesh = web_mesh(&addrs(&apps), probing).await;
    let client = Client::new();
    let admin = format!("http://{}/routes", mesh.agents["a"].admin.unwrap());
    let state_of = |routes: &Reply, node: &str| {
        routes_of(routes, "web")
            .into_iter()
            .find(|e| e["addr"] == mesh.inbound(node).to_string())
            .unwrap()["state"]
            .clone()
    };
    let mut down = false;
    for _ in 0..100 {
        let routes = client.get(&admin).await;
        if state_of(&routes, "b")["probe_down"] == true {
            assert_eq!(state_of(&routes, "c")["probe_down"], false);
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "the probe took b out");
    let url = format!("http://{}/service/web/data", mesh.outbound("a"));
    for _ in 0..40 {
        let reply = client.get(&url).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.starts_with("c "));
    }
    stop_all(mesh, apps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_retries_is_not_retried_by_a_later_hop_either() {
    let apps = apps(&[Behaviour::Fail503Every(1)]);
    let mesh = web_mesh(&addrs(&apps), policies(|r| r.retries = 0)).await;
    // The inbound side (node b) would retry by default.
    mesh.agents["b"]
        .policies
        .store(Arc::new(Policies::default()));
    let reply = Client::new()
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        apps[0].hits(),
        1,
        "the inbound proxy did not retry on its own"
    );
    stop_all(mesh, apps).await;
}
