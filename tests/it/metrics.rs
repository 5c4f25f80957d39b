//! `/metrics` on the admin listeners, scraped over HTTP while real requests cross the mesh.

use std::time::Duration;

use crate::support::*;
use skyline::catalog::Health;

/// `skyline_requests_total` of `role`, `service`, `code` and `error`, as exposed.
fn requests(role: &str, service: &str, code: u16, error: &str) -> String {
    format!(
        r#"skyline_requests_total{{role="{role}",service="{service}",code="{code}",error="{error}"}}"#
    )
}

fn durations(role: &str, service: &str) -> String {
    format!(r#"skyline_request_duration_seconds_count{{role="{role}",service="{service}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_two_hops_are_counted_per_role_service_code_and_error() {
    let web = TestApp::spawn("web@b", ip("127.0.0.3"));
    let down = Placement {
        health: Health::Critical,
        ..place("down", "b", &web)
    };
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .place(down)
        .spawn()
        .await;
    let client = Client::new();
    let out = mesh.outbound("a");
    let (ok, unknown, unhealthy) = (7, 3, 2);
    for i in 0..ok {
        let reply = client.get(&format!("http://{out}/service/web/x/{i}")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    for i in 0..unknown {
        let reply = client
            .get(&format!("http://{out}/service/ghost-{i}/"))
            .await;
        assert_eq!(reply.mesh_error(), Some("unknown-service"));
    }
    for _ in 0..unhealthy {
        let reply = client.get(&format!("http://{out}/service/down/")).await;
        assert_eq!(reply.mesh_error(), Some("no-healthy-endpoint"));
    }
    // Refused by the framing guard before any handler: still one request, a 400.
    let refused = raw(
        out,
        b"GET /service/web/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");

    // A response is recorded before its head is sent, so the counts are final now.
    let a = scrape(mesh.admin("a")).await;
    let text = &a.text;
    assert_eq!(
        a.count(&requests("outbound", "web", 200, "")),
        7.0,
        "{text}"
    );
    assert_eq!(a.count(&durations("outbound", "web")), 7.0, "{text}");
    assert_eq!(
        a.count(&requests("outbound", "", 404, "unknown-service")),
        3.0,
        "unknown names never become labels: {text}"
    );
    assert!(!text.contains("ghost"), "{text}");
    assert_eq!(
        a.count(&requests("outbound", "down", 503, "no-healthy-endpoint")),
        2.0,
        "{text}"
    );
    assert_eq!(a.count(&durations("outbound", "down")), 2.0, "{text}");
    assert_eq!(
        a.count(&requests("outbound", "", 400, "bad-request")),
        1.0,
        "{text}"
    );
    assert!(
        !text.contains(r#"role="inbound""#),
        "nothing arrived at a's inbound: {text}"
    );
    let bucket = |le: &str| {
        let series = format!(
            r#"skyline_request_duration_seconds_bucket{{role="outbound",service="web",le="{le}"}}"#
        );
        a.value(&series)
            .unwrap_or_else(|| panic!("no {series}: {text}"))
    };
    assert_eq!(bucket("+Inf"), 7.0);
    assert!(bucket("0.0005") <= bucket("10") && bucket("10") <= 7.0);

    let b = scrape(mesh.admin("b")).await;
    assert_eq!(
        b.count(&requests("inbound", "web", 200, "")),
        7.0,
        "{}",
        b.text
    );
    assert_eq!(b.count(&durations("inbound", "web")), 7.0);
    assert!(!b.text.contains(r#"role="outbound""#), "{}", b.text);
    assert_eq!(web.hits(), 7);
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_gauges_show_its_size_age_and_staleness() {
    let web = TestApp::spawn("web@b", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .place(place("api", "b", &web))
        .place(place("api", "a", &web))
        .spawn()
        .await;
    let fresh = scrape(mesh.admin("a")).await;
    assert_eq!(
        fresh.value("skyline_catalog_services"),
        Some(2.0),
        "{}",
        fresh.text
    );
    assert_eq!(fresh.value("skyline_catalog_instances"), Some(3.0));
    assert_eq!(fresh.value("skyline_catalog_stale"), Some(0.0));
    let age = fresh.value("skyline_catalog_age_seconds").unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");

    // A broken catalog file: the last good catalog stays in force, and is reported stale.
    write_atomically(&mesh.catalog_path(), "this is [not toml");
    let mut stale = None;
    for _ in 0..200 {
        let now = scrape(mesh.admin("a")).await;
        if now.value("skyline_catalog_stale") == Some(1.0) {
            stale = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale = stale.expect("the catalog is reported stale within 10 s");
    assert_eq!(stale.value("skyline_catalog_services"), Some(2.0));
    let later = stale.value("skyline_catalog_age_seconds").unwrap();
    assert!(later >= age, "the age grows: {age} then {later}");
    let readyz = Client::new()
        .get(&format!("http://{}/readyz", mesh.admin("a")))
        .await
        .json();
    assert!(readyz["catalog_error"].is_string(), "{readyz}");
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_only_the_catch_all_serves_is_labelled_when_an_application_answers() {
    // Stands in for the gateway pool: answers for any service, as it does during a migration.
    let gateway = TestApp::spawn("gateway", ip("127.0.0.4"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .catch_all(gateway.addr)
        .spawn()
        .await;
    let client = Client::new();
    let out = mesh.outbound("a");
    for _ in 0..3 {
        let reply = client.get(&format!("http://{out}/service/moved/x")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "gateway /service/moved/x");
    }
    // With the catch-all gone, only the mesh answers: such a name never becomes a label.
    gateway.stop().await;
    let reply = client.get(&format!("http://{out}/service/vanished/")).await;
    assert_eq!(reply.mesh_error(), Some("upstream-connect"), "{reply:?}");

    let a = scrape(mesh.admin("a")).await;
    assert_eq!(
        a.count(&requests("outbound", "moved", 200, "")),
        3.0,
        "{}",
        a.text
    );
    assert_eq!(
        a.count(&requests("outbound", "", 502, "upstream-connect")),
        1.0,
        "{}",
        a.text
    );
    assert!(!a.text.contains("vanished"), "{}", a.text);
    mesh.stop().await;
}
