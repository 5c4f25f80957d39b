//! The data path: application → outbound (node A) → inbound (node B) → instance.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;
use skyline::catalog::Health;

async fn web_on_b() -> (TestMesh, TestApp) {
    let web = TestApp::spawn("web@b", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .spawn()
        .await;
    (mesh, web)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_crosses_both_hops_with_prefix_stripped_and_query_kept() {
    let (mesh, web) = web_on_b().await;
    let client = Client::new();
    let reply = client
        .get(&format!(
            "http://{}/service/web/media/cat.gif?size=big&x=%20y",
            mesh.outbound("a")
        ))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "web@b /media/cat.gif?size=big&x=%20y");
    assert!(reply.mesh_error().is_none());

    for (url, target) in [
        ("/service/web", "/"),
        ("/service/web/", "/"),
        ("/service/web?q=1", "/?q=1"),
    ] {
        let reply = client
            .get(&format!("http://{}{url}", mesh.outbound("a")))
            .await;
        assert_eq!(reply.body, format!("web@b {target}"), "{url}");
    }
    assert_eq!(web.hits(), 4);
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_body_and_end_to_end_headers_pass_while_hop_by_hop_headers_are_dropped() {
    let (mesh, web) = web_on_b().await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    // With a body or without, both take the express lane; wire.rs compares it with hyper's
    // lane header by header.
    for (method, body) in [("PUT", &b"0123456789"[..]), ("GET", &b""[..])] {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}/service/web/items/7", mesh.outbound("a")))
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("x-app", "passes")
            .header("traceparent", traceparent)
            .header("x-forwarded-for", "10.1.2.3")
            .header("x-skyline-attempt", "7")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let reply = Client::new().send(req).await.unwrap();
        assert_eq!(reply.status, 200, "{method}");

        let seen = web.seen().pop().unwrap();
        assert_eq!(seen.method, method);
        assert_eq!(seen.target, "/items/7");
        assert_eq!(seen.body_len, body.len() as u64);
        let h = &seen.headers;
        assert_eq!(h["x-app"], "passes", "{method}");
        assert_eq!(h["traceparent"], traceparent, "{method}");
        assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none(), "{method}: {h:?}");
        assert_eq!(h["x-request-id"].len(), 32, "the mesh adds a request id");
        let xff: Vec<&str> = h["x-forwarded-for"].to_str().unwrap().split(", ").collect();
        assert_eq!(
            xff.len(),
            3,
            "client's value, then one entry per hop: {xff:?}"
        );
        assert_eq!(xff[0], "10.1.2.3");
        assert_eq!(
            h["host"],
            web.addr.to_string(),
            "the last hop speaks to the instance"
        );
        assert_eq!(h["x-forwarded-host"], mesh.outbound("a").to_string());
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "the scheme the caller entered with"
        );
        assert_eq!(
            h["x-skyline-hops"], "1",
            "{method}: counted once, at the outbound"
        );
        assert!(h.contains_key("x-skyline-timeout-ms"), "{method}: {h:?}");
        assert!(
            h.get("x-skyline-attempt").is_none(),
            "{method}: the caller's attempt number is dropped, a first attempt has none"
        );
        assert_eq!(h.get_all("host").iter().count(), 1, "{method}: one Host");
    }
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_request_id_is_kept() {
    let (mesh, web) = web_on_b().await;
    let req = Request::get(format!("http://{}/service/web/", mesh.outbound("a")))
        .header("x-request-id", "abc-123")
        .body(Full::default())
        .unwrap();
    Client::new().send(req).await.unwrap();
    assert_eq!(web.seen()[0].headers["x-request-id"], "abc-123");
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_service_gets_404_without_a_catch_all() {
    let (mesh, web) = web_on_b().await;
    let reply = Client::new()
        .get(&format!("http://{}/service/ghost/x", mesh.outbound("a")))
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.mesh_error(), Some("unknown-service"));
    let json = reply.json();
    assert_eq!(json["error"], "unknown-service");
    assert_eq!(json["service"], "ghost");
    assert!(json["detail"].is_string());
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unhealthy_services_go_to_the_catch_all_with_the_full_path() {
    let gateway = TestApp::spawn("gateway", ip("127.0.0.4"));
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let mut down = place("down", "b", &web);
    down.health = Health::Critical;
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(down)
        .catch_all(gateway.addr)
        .spawn()
        .await;
    let client = Client::new();
    let reply = client
        .get(&format!(
            "http://{}/service/ghost/x?y=1",
            mesh.outbound("a")
        ))
        .await;
    assert_eq!(reply.body, "gateway /service/ghost/x?y=1");
    let reply = client
        .get(&format!("http://{}/service/down/z", mesh.outbound("a")))
        .await;
    assert_eq!(
        reply.body, "gateway /service/down/z",
        "nothing healthy here: the gateway decides"
    );
    assert_eq!(web.hits(), 0);
    mesh.stop().await;
    gateway.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_service_without_a_healthy_instance_gets_503() {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let mut sick = place("web", "b", &web);
    sick.health = Health::Critical;
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(sick)
        .spawn()
        .await;
    let client = Client::new();
    let reply = client
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"));
    // The inbound side says the same when asked directly.
    let reply = client
        .get(&format!("http://{}/service/web/", mesh.inbound("b")))
        .await;
    assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"));
    assert_eq!(web.hits(), 0);
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_is_down_gets_502_upstream_connect() {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let placement = place("web", "b", &web);
    web.stop().await;
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(placement)
        .spawn()
        .await;
    let reply = Client::new()
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.mesh_error(), Some("upstream-connect"));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_every_node_with_an_instance() {
    let b = TestApp::spawn("b", ip("127.0.0.3"));
    let c = TestApp::spawn("c", ip("127.0.0.4"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .node("c", "127.0.0.4")
        .place(place("web", "b", &b))
        .place(place("web", "c", &c))
        .resilience(round_robin())
        .spawn()
        .await;
    let client = Client::new();
    for _ in 0..20 {
        assert_eq!(
            client
                .get(&format!("http://{}/service/web/", mesh.outbound("a")))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        (b.hits(), c.hits()),
        (10, 10),
        "round robin over the two nodes"
    );
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_reports_readiness_and_routes() {
    let (mesh, web) = web_on_b().await;
    let admin = mesh.agents["a"].admin.unwrap();
    let client = Client::new();
    let ready = client.get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(ready.json()["services"], 1);
    let routes = client.get(&format!("http://{admin}/routes")).await.json();
    assert_eq!(
        routes["outbound"]["web"]["endpoints"][0]["addr"],
        mesh.inbound("b").to_string()
    );
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_or_a_dead_node_costs_no_request() {
    let web_b = TestApp::spawn("web@b", ip("127.0.0.3"));
    let dead = TestApp::spawn("dead", ip("127.0.0.3"));
    let mut dead_instance = place("web", "b", &dead);
    dead_instance.addr = dead.addr;
    dead.stop().await; // its port now refuses connections
    let web_c = TestApp::spawn("web@c", ip("127.0.0.4"));
    let mut mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .node("c", "127.0.0.4")
        .place(place("web", "b", &web_b))
        .place(dead_instance)
        .place(place("web", "c", &web_c))
        .spawn()
        .await;
    // Node c's agent goes away: its inbound refuses connections, the catalog still lists it.
    let c = mesh.agents.remove("c").unwrap();
    c.shutdown();
    c.join().await;

    let client = Client::new();
    for i in 0..30 {
        // A POST with a body too: a refused connection means it never left.
        let req = Request::post(format!("http://{}/service/web/{i}", mesh.outbound("a")))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let reply = client.send(req).await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, format!("web@b /{i}").as_str())
        );
    }
    assert_eq!(web_b.hits(), 30);
    assert!(web_b.seen().iter().all(|s| s.body_len == 7));
    mesh.stop().await;
    web_b.stop().await;
    web_c.stop().await;
}
