//! Catalog changes reach routing without restart, without dropping connections or requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_change_reroutes_requests_on_an_open_connection() {
    let (mesh, b, c) = mesh_with_b_and_c().await;
    // One client connection, kept open across the change.
    let stream = tokio::net::TcpStream::connect(mesh.outbound("a"))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut ask = async || {
        let req = Request::get("/service/web/")
            .header("host", "x")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    };
    assert_eq!(ask().await, "b /");
    mesh.set_catalog_and_wait(&[place("web", "c", &c)]).await;
    assert_eq!(ask().await, "c /", "same connection, new route");
    assert!(!conn.is_finished(), "the connection stayed open");
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_under_load_drop_no_request() {
    let (mesh, b, c) = mesh_with_b_and_c().await;
    let url = format!("http://{}/service/web/load", mesh.outbound("a"));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut load = Vec::new();
    for _ in 0..8 {
        let (client, url, ok, failed) = (Client::new(), url.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            // Bounded in time and in count.
            for _ in 0..50_000 {
                if Instant::now() > deadline {
                    break;
                }
                let req = Request::get(&url).body(Full::default()).unwrap();
                match client.send(req).await {
                    Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("failed: {other:?}");
                        }
                        0
                    }
                };
            }
        }));
    }
    let layouts = [
        vec![place("web", "c", &c)],
        vec![place("web", "b", &b), place("web", "c", &c)],
        vec![place("web", "b", &b)],
    ];
    let mut changes = 0;
    while Instant::now() < deadline {
        mesh.set_catalog(&layouts[changes % layouts.len()]);
        changes += 1;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    for task in load {
        task.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "{changes} catalog changes, {ok} requests ok, {failed} failed; b served {}, c served {}",
        b.hits(),
        c.hits()
    );
    assert_eq!(failed, 0);
    assert!(ok > 100, "the load ran");
    assert!(b.hits() > 0 && c.hits() > 0, "both layouts were routed");
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_catalog_file_keeps_the_last_good_routes() {
    let (mesh, b, c) = mesh_with_b_and_c().await;
    let client = Client::new();
    let admin = mesh.agents["a"].admin.unwrap();
    write_atomically(
        &mesh.catalog_path(),
        "[[node]]\nname = \"a\"\naddress = \"not-an-ip\"\n",
    );
    let mut rx = mesh.agents["a"].catalog.clone();
    rx.wait_for(|s| s.error.is_some()).await.unwrap();

    let reply = client
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.body, "b /", "still routed by the last good catalog");
    let ready = client.get(&format!("http://{admin}/readyz")).await.json();
    assert_eq!(ready["ready"], true);
    let error = ready["catalog_error"].as_str().unwrap();
    assert!(
        error.contains("catalog.toml:3") && error.contains("node.address"),
        "{error}"
    );

    mesh.set_catalog_and_wait(&[place("web", "c", &c)]).await;
    let reply = client
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert_eq!(reply.body, "c /");
    assert!(client.get(&format!("http://{admin}/readyz")).await.json()["catalog_error"].is_null());
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_that_learns_of_a_route_a_moment_late_still_serves_the_request() {
    let (mesh, b, c) = mesh_with_b_and_c().await;
    // Another node already routes `web` to c; c's inbound has not heard yet.
    let url = format!("http://{}/service/web/early", mesh.inbound("c"));
    let early = tokio::spawn(async move { Client::new().get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    mesh.set_catalog(&[place("web", "c", &c)]);
    let reply = early.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "c /early"));
    // A service that never arrives is still refused, after the short wait.
    let reply = Client::new()
        .get(&format!("http://{}/service/ghost/", mesh.inbound("c")))
        .await;
    assert_eq!(reply.mesh_error(), Some("unknown-service"));
    mesh.stop().await;
    b.stop().await;
    c.stop().await;
}
