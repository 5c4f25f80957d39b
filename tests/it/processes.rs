//! The `skyline` binary as a user runs it: real processes, real signals.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

pub(crate) fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A `skyline agent` process for node `local` at 127.0.0.1, with its addresses read from its
/// JSON log. Its stderr keeps being drained so it never blocks on a full pipe.
struct AgentProcess {
    child: Child,
    outbound: String,
    inbound: String,
    log: StderrLog,
}

impl AgentProcess {
    async fn start(catalog: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(SKYLINE)
            .args([
                "agent",
                "--log-format",
                "json",
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--catalog",
                "file",
            ])
            .arg("--catalog-file")
            .arg(catalog)
            .args(extra)
            .env("SKYLINE_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = StderrLog::follow(&mut child);
        let mut agent = Self {
            child,
            outbound: String::new(),
            inbound: String::new(),
            log,
        };
        let started = agent.log.wait_for("agent started").await;
        agent.outbound = started["outbound"].as_str().unwrap().to_owned();
        agent.inbound = started["inbound"].as_str().unwrap().to_owned();
        agent
    }
}

/// A catalog with service `app` on node `local` (127.0.0.1) whose inbound port is `inbound`.
fn catalog_text(inbound: &str, app: std::net::SocketAddr) -> String {
    let port = inbound.rsplit(':').next().unwrap();
    format!(
        "[[node]]\nname = \"local\"\naddress = \"127.0.0.1\"\ninbound_port = {port}\n\n\
         [[service]]\nname = \"app\"\nnode = \"local\"\nport = {}\n",
        app.port()
    )
}

/// Starts an agent process routing `app` (hot-reloading the catalog once its port is known).
async fn agent_for(app: &TestApp, dir: &Path) -> AgentProcess {
    let catalog = dir.join("catalog.toml");
    std::fs::write(&catalog, catalog_text("127.0.0.1:1", app.addr)).unwrap();
    let agent = AgentProcess::start(&catalog, &[]).await;
    write_atomically(&catalog, &catalog_text(&agent.inbound, app.addr));
    let client = Client::new();
    for _ in 0..200 {
        if client
            .get(&format!("http://{}/service/app/", agent.outbound))
            .await
            .status
            == 200
        {
            return agent;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the agent never routed to the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyline_up_serves_the_demo_services_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(SKYLINE)
        .args([
            "up",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--registry",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.next_line().await.unwrap().unwrap();
            if line.starts_with("Skyline is up") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let outbound = banner
        .split("outbound ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();

    let client = Client::new();
    let hello = client
        .get(&format!("http://{outbound}/service/hello/"))
        .await;
    assert_eq!(hello.status, 200);
    assert!(
        hello.body.starts_with("hello from skyline"),
        "{}",
        hello.body
    );
    let req = Request::post(format!("http://{outbound}/service/echo/a/b?x=1"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"ping",
        )))
        .unwrap();
    let echo = client.send(req).await.unwrap().json();
    assert_eq!(
        (
            echo["method"].as_str(),
            echo["path"].as_str(),
            echo["query"].as_str()
        ),
        (Some("POST"), Some("/a/b"), Some("x=1"))
    );
    assert_eq!(echo["body"], "ping");
    // The demo services are in the embedded registry, passing, behind its Consul API.
    let registry = banner.split("registry ").nth(1).unwrap().trim();
    let health = client
        .get(&format!(
            "http://{registry}/v1/health/service/hello?passing"
        ))
        .await
        .json();
    assert_eq!(health[0]["Service"]["Service"], "hello");
    assert!(dir.path().join("registry").join("FORMAT").exists());

    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_bad_config_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("skyline.toml");
    std::fs::write(
        &config,
        "[node]\nname = \"n\"\n[listen]\noutbound = \"127.0.0.1:99999\"\n",
    )
    .unwrap();
    let out = Command::new(SKYLINE)
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4: key `listen.outbound`", config.display())),
        "{stderr}"
    );

    let out = Command::new(SKYLINE)
        .args([
            "agent",
            "--admin",
            "off",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--catalog",
            "file",
            "--catalog-file",
        ])
        .arg(dir.path().join("missing.toml"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_help_documents_every_setting_with_its_default_and_variable() {
    let out = Command::new(SKYLINE)
        .args(["agent", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env, default) in [
        ("--node-name", "SKYLINE_NODE_NAME", "[default: local]"),
        (
            "--node-address",
            "SKYLINE_NODE_ADDRESS",
            "[default: 127.0.0.1]",
        ),
        (
            "--outbound",
            "SKYLINE_OUTBOUND",
            "[default: 127.0.0.1:5040]",
        ),
        (
            "--inbound",
            "SKYLINE_INBOUND",
            "[default: <node address>:5041]",
        ),
        ("--admin", "SKYLINE_ADMIN", "[default: 127.0.0.1:5050]"),
        ("--catalog", "SKYLINE_CATALOG", "[default: embedded]"),
        (
            "--data-dir",
            "SKYLINE_DATA_DIR",
            "[default: /var/lib/skyline]",
        ),
        (
            "--registry",
            "SKYLINE_REGISTRY",
            "[default: 127.0.0.1:8500]",
        ),
        ("--consul", "SKYLINE_CONSUL", "[default: 127.0.0.1:8500]"),
        (
            "--catalog-file",
            "SKYLINE_CATALOG_FILE",
            "[default: /etc/skyline/catalog.toml]",
        ),
        (
            "--catch-all",
            "SKYLINE_CATCH_ALL",
            "[default: the instances of catalog service `skyline-gateway`",
        ),
        ("--config", "SKYLINE_CONFIG", ""),
    ] {
        assert!(
            help.contains(flag) && help.contains(env) && help.contains(default),
            "{flag} {env} {default}:\n{help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_skyline_variables_and_flags_win() {
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, catalog_text("127.0.0.1:1", app.addr)).unwrap();
    let mut child = Command::new(SKYLINE)
        .args(["agent", "--log-format", "json", "--outbound", "127.0.0.1:0"])
        .env("SKYLINE_LOG", "info")
        .env("SKYLINE_OUTBOUND", "127.0.0.1:1") // the flag wins
        .env("SKYLINE_INBOUND", "127.0.0.1:0")
        .env("SKYLINE_ADMIN", "off")
        .env("SKYLINE_NODE_NAME", "from-env")
        .env("SKYLINE_CATALOG", "file")
        .env("SKYLINE_CATALOG_FILE", &catalog)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let fields = &StderrLog::follow(&mut child)
        .wait_for("agent started")
        .await;
    assert_eq!(fields["node"], "from-env");
    assert_eq!(fields["admin"], "off");
    assert_ne!(fields["outbound"], "127.0.0.1:1");
    assert!(
        fields["catalog"]
            .as_str()
            .unwrap()
            .ends_with("catalog.toml")
    );
    child.kill().await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent_for(&app, dir.path()).await;
    let url = format!("http://{}/service/app/slow/1500", agent.outbound);
    let in_flight = tokio::spawn(async move { Client::new().get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&agent.child);
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status, 200,
        "the in-flight request finished: {reply:?}"
    );
    assert_eq!(reply.body, "app /slow/1500");
    let status = tokio::time::timeout(Duration::from_secs(15), agent.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        tokio::net::TcpStream::connect(&agent.outbound)
            .await
            .is_err(),
        "no longer accepting"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_up_and_down_through_both_hops_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_for(&app, dir.path()).await;
    let pid = agent.child.id().unwrap();

    let stream = tokio::net::TcpStream::connect(&agent.outbound)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);

    // Upload: the application counts what arrives.
    let req = Request::post("/service/app/sink")
        .header("host", "x")
        .body(Zeros { left: GIB })
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, GIB.to_string().as_bytes());

    // Download: counted frame by frame, never held.
    sender.ready().await.unwrap();
    let req = Request::get(format!("/service/app/bytes/{GIB}"))
        .header("host", "x")
        .body(Zeros { left: 0 })
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, GIB);

    let peak = peak_rss_kib(pid);
    eprintln!("agent peak RSS after 1 GiB each way: {} KiB", peak);
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB: bodies must stream, not buffer"
    );
    app.stop().await;
}

pub(crate) fn sighup(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies_under_load_and_refuses_a_bad_file() {
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("skyline.toml");
    std::fs::write(&config, "[resilience]\nretries = 2\n").unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, catalog_text("127.0.0.1:1", app.addr)).unwrap();
    let config_arg = config.to_str().unwrap();
    let mut agent = AgentProcess::start(&catalog, &["--config", config_arg]).await;
    write_atomically(&catalog, &catalog_text(&agent.inbound, app.addr));
    let client = Client::new();
    let base = format!("http://{}/service/app", agent.outbound);
    for _ in 0..200 {
        if client.get(&format!("{base}/")).await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A reload every 100 ms under load drops nothing.
    let url = format!("{base}/x");
    let running = tokio::spawn(async move {
        load(&url, 4, Duration::from_secs(3), Duration::from_millis(10)).await
    });
    let mut reloads = 0;
    for i in 0..25 {
        let text = if i % 2 == 0 {
            "[resilience]\nretries = 1\nbalance = \"round_robin\"\n"
        } else {
            "[resilience]\nretries = 2\n"
        };
        write_atomically(&config, text);
        sighup(&agent.child);
        agent.log.wait_for("configuration reloaded").await;
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = running.await.unwrap();
    println!(
        "{reloads} reloads under load: {} requests, {} failed, statuses {:?}",
        report.sent,
        report.failed(),
        report.statuses
    );
    assert_eq!(report.failed(), 0);

    // A route's timeout, reloaded, is in force for the next request.
    assert_eq!(client.get(&format!("{base}/slow/600")).await.status, 200);
    write_atomically(&config, "[routes.app]\nrequest_timeout = \"200ms\"\n");
    sighup(&agent.child);
    agent.log.wait_for("configuration reloaded").await;
    let reply = client.get(&format!("{base}/slow/600")).await;
    assert_eq!(reply.mesh_error(), Some("upstream-timeout"));

    // A bad file is refused with its key, and the running policies stay.
    write_atomically(&config, "[routes.app]\nrequest_timeout = \"soon\"\n");
    sighup(&agent.child);
    let refused = agent
        .log
        .wait_for("configuration reload refused; the running configuration stays")
        .await;
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("routes.app.request_timeout"), "{error}");
    let reply = client.get(&format!("{base}/slow/600")).await;
    assert_eq!(reply.mesh_error(), Some("upstream-timeout"));
    assert_eq!(client.get(&format!("{base}/")).await.status, 200);

    sigterm(&agent.child);
    let status = tokio::time::timeout(Duration::from_secs(15), agent.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_passes_the_agent_binary_and_sigterm_closes_it_without_waiting_out_the_drain() {
    use crate::upgrade::{WsEcho, exercise, next_data, ws_connect};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let echo = WsEcho::spawn("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, catalog_text("127.0.0.1:1", echo.addr)).unwrap();
    let mut agent = AgentProcess::start(&catalog, &[]).await;
    write_atomically(&catalog, &catalog_text(&agent.inbound, echo.addr));
    let outbound: std::net::SocketAddr = agent.outbound.parse().unwrap();
    let url = "ws://localhost/service/app/socket";
    // Once the agent routes `app`, the handshake succeeds.
    let mut routed = false;
    for _ in 0..200 {
        let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::client_async(url, stream),
        )
        .await
        {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(routed, "the agent never routed the WebSocket");
    exercise(ws_connect(outbound, url).await).await;

    let mut ws = ws_connect(outbound, url).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still here"));
    sigterm(&agent.child);
    // The drain may take 10 s for requests in flight; an open WebSocket does not hold it up.
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("the agent exits without waiting for the WebSocket")
        .unwrap();
    assert!(status.success(), "{status}");
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the WebSocket is closed with the process");
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `skyline up` without `--dir`, with its temporary folder under `tmp`.
fn up_in(tmp: &Path) -> Child {
    Command::new(SKYLINE)
        .args([
            "up",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
        ])
        .args(["--admin", "off", "--registry", "127.0.0.1:0"])
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (bounded) until `path` satisfies `ready`.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_skyline_up_within_two_seconds_at_any_moment_and_removes_its_folder() {
    // Interrupted as soon as the folder exists, as soon as the registry has written its data
    // folder (the demo services are not registered yet), and once fully up.
    for moment in ["folder", "registry", "banner"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = up_in(tmp.path());
        let created = || {
            std::fs::read_dir(tmp.path())
                .unwrap()
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with("skyline-up-"))
                .map(|e| e.path())
        };
        match moment {
            "folder" => until("the folder exists", || created().is_some()).await,
            "registry" => {
                until("the registry's data folder exists", || {
                    created().is_some_and(|d| d.join("registry").join("FORMAT").exists())
                })
                .await
            }
            _ => {
                // The registry's log holds the demo registrations once they are written.
                until("the demo services are registered", || {
                    created().is_some_and(|d| {
                        std::fs::metadata(d.join("registry").join("log")).is_ok_and(|m| m.len() > 0)
                    })
                })
                .await
            }
        }
        signal(&child, "INT");
        let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running 2 s after Ctrl-C ({moment})"))
            .unwrap();
        assert!(status.success(), "{moment}: {status}");
        assert_eq!(created(), None, "{moment}: the folder is removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_whose_log_is_damaged_refuses_to_start_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let registry = |data: &Path| {
        let mut command = Command::new(SKYLINE);
        command
            .args([
                "--log-format",
                "json",
                "registry",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    // A running registry and the base URL of its API, read from its log.
    let start = || async {
        let mut child = registry(&data).spawn().unwrap();
        let mut log = StderrLog::follow(&mut child);
        let started = log.wait_for("registry started").await;
        let base = format!("http://{}", started["addr"].as_str().unwrap());
        (child, base)
    };
    let client = Client::new();
    let (child, base) = start().await;
    for i in 0..200 {
        let req = Request::put(format!("{base}/v1/kv/key/{i:03}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                "v{i}"
            ))))
            .unwrap();
        assert_eq!(client.send(req).await.unwrap().status, 200);
    }
    let index_before = index_of(&client, &format!("{base}/v1/kv/key/?recurse")).await;
    sigterm(&child);
    child.wait_with_output().await.unwrap();

    // Other bytes written over the start of the log, as a misdirected redirect does.
    let log = data.join("log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[..64].copy_from_slice(&[b'#'; 64]);
    std::fs::write(&log, &bytes).unwrap();

    let refused = registry(&data).output().await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("damaged at byte 0") && stderr.contains("--repair"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the log is untouched");

    let repaired = Command::new(SKYLINE)
        .args(["registry", "--repair", "--data-dir"])
        .arg(&data)
        .output()
        .await
        .unwrap();
    assert!(repaired.status.success(), "{repaired:?}");
    let said = String::from_utf8_lossy(&repaired.stdout);
    assert!(said.contains("kept 199 records"), "{said}");

    let (child, base) = start().await;
    let keys = client.get(&format!("{base}/v1/kv/key/?keys")).await.json();
    assert_eq!(
        keys.as_array().unwrap().len(),
        199,
        "only the damaged record is lost"
    );
    assert!(index_of(&client, &format!("{base}/v1/kv/key/?recurse")).await >= index_before);
    sigterm(&child);
    child.wait_with_output().await.unwrap();
}

async fn index_of(client: &Client, url: &str) -> u64 {
    let reply = client
        .send(Request::get(url).body(Default::default()).unwrap())
        .await
        .unwrap();
    reply.headers["x-consul-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    // The human format (the default), into a pipe as into a log file or a journal.
    let mut child = Command::new(SKYLINE)
        .args(["registry", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SKYLINE_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = StderrLog::follow(&mut child);
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.next().await {
            if line.contains("registry started") {
                return line;
            }
        }
        panic!("the registry ended without logging that it started");
    })
    .await
    .expect("the registry logs that it started");
    assert!(!line.contains('\x1b'), "an escape code in {line:?}");
    assert!(line.contains(" INFO "), "a plain level in {line:?}");
}

/// Runs `skyline explain <args>`; its exit status, stdout and stderr.
async fn explain(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(SKYLINE)
        .arg("explain")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyline_explain_tells_the_route_its_endpoints_ejections_and_the_answer_of_unroutable_services()
 {
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    // `pair` runs on this node and on node `dead`, whose inbound port refuses connections.
    let text = |inbound_port: &str| {
        format!(
            "[[node]]\nname = \"local\"\naddress = \"127.0.0.1\"\ninbound_port = {inbound_port}\n\n\
             [[node]]\nname = \"dead\"\naddress = \"127.0.0.9\"\ninbound_port = 1\n\n\
             [[service]]\nname = \"app\"\nnode = \"local\"\nport = {port}\n\n\
             [[service]]\nname = \"pair\"\nnode = \"local\"\nport = {port}\n\n\
             [[service]]\nname = \"pair\"\nnode = \"dead\"\nport = {port}\n\n\
             [[service]]\nname = \"down\"\nnode = \"local\"\nport = {port}\nhealth = \"critical\"\n",
            port = app.addr.port()
        )
    };
    std::fs::write(&catalog, text("1")).unwrap();
    let mut child = Command::new(SKYLINE)
        .args(["agent", "--log-format", "json", "--catalog", "file"])
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--catalog-file"])
        .arg(&catalog)
        .env("SKYLINE_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = StderrLog::follow(&mut child);
    let started = log.wait_for("agent started").await;
    let field = |name: &str| started[name].as_str().unwrap().to_owned();
    let (outbound, inbound, admin) = (field("outbound"), field("inbound"), field("admin"));
    let inbound_port = inbound.rsplit(':').next().unwrap();
    write_atomically(&catalog, &text(inbound_port));
    let client = Client::new();
    until_ok(&format!("http://{outbound}/service/pair/x")).await;
    // Enough requests that the dead node's endpoint fails five times in a row: every one of
    // them still succeeds, on this node.
    for _ in 0..30 {
        let reply = client
            .get(&format!("http://{outbound}/service/pair/x"))
            .await;
        assert_eq!(reply.status, 200);
    }

    let (ok, out, err) = explain(&["http://localhost:5040/service/app/x", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("app: the catalog routes the service"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{inbound} ")) && out.contains("eligible"),
        "{out}"
    );
    assert!(out.contains(&format!("next pick: {inbound}")), "{out}");

    let (ok, out, err) = explain(&["/service/pair/x", "--admin", &admin, "--json"]).await;
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let endpoints = answer["route"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2, "{answer}");
    let dead = endpoints
        .iter()
        .find(|e| e["addr"] == "127.0.0.9:1")
        .unwrap();
    assert_eq!(dead["eligible"], false, "{dead}");
    assert!(
        dead["why"].as_str().unwrap().starts_with("ejected"),
        "{dead}"
    );
    assert_eq!(answer["next_pick"]["addr"], inbound.as_str(), "{answer}");
    assert_eq!(answer["policy"]["retries"], 2, "{answer}");

    let (ok, out, _) = explain(&["/service/nowhere/", "--admin", &admin]).await;
    assert!(ok);
    assert!(
        out.contains("catalog: unknown") && out.contains("answer: 404 unknown-service"),
        "{out}"
    );
    let (ok, out, _) = explain(&["/service/down/", "--admin", &admin]).await;
    assert!(ok);
    assert!(
        out.contains("catalog: known, no routable instance")
            && out.contains("answer: 503 no-healthy-endpoint"),
        "{out}"
    );
    let (ok, _, err) = explain(&["/service/Bad!/", "--admin", &admin]).await;
    assert!(!ok);
    assert!(err.contains("invalid service name"), "{err}");
    let (ok, _, err) = explain(&["/service/app/", "--admin", "127.0.0.1:1"]).await;
    assert!(!ok);
    assert!(
        err.contains("no agent's admin listener answers at 127.0.0.1:1"),
        "{err}"
    );
}

/// Runs `skyline routes <args>`; its exit status, stdout and stderr.
async fn routes(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(SKYLINE)
        .arg("routes")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyline_routes_prints_each_sides_services_with_their_endpoints_and_the_ejected_one() {
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    // `pair` runs on this node and on node `dead`, whose inbound port refuses connections.
    let text = |inbound_port: &str| {
        format!(
            "[[node]]\nname = \"local\"\naddress = \"127.0.0.1\"\ninbound_port = {inbound_port}\n\n\
             [[node]]\nname = \"dead\"\naddress = \"127.0.0.9\"\ninbound_port = 1\n\n\
             [[service]]\nname = \"app\"\nnode = \"local\"\nport = {port}\n\n\
             [[service]]\nname = \"pair\"\nnode = \"local\"\nport = {port}\n\n\
             [[service]]\nname = \"pair\"\nnode = \"dead\"\nport = {port}\n",
            port = app.addr.port()
        )
    };
    std::fs::write(&catalog, text("1")).unwrap();
    let mut child = Command::new(SKYLINE)
        .args(["agent", "--log-format", "json", "--catalog", "file"])
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--catalog-file"])
        .arg(&catalog)
        .env("SKYLINE_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = StderrLog::follow(&mut child);
    let started = log.wait_for("agent started").await;
    let field = |name: &str| started[name].as_str().unwrap().to_owned();
    let (outbound, inbound, admin) = (field("outbound"), field("inbound"), field("admin"));
    write_atomically(&catalog, &text(inbound.rsplit(':').next().unwrap()));
    until_ok(&format!("http://{outbound}/service/pair/x")).await;
    // Enough requests that the dead node's endpoint fails five times in a row and is ejected.
    let client = Client::new();
    for _ in 0..30 {
        let reply = client
            .get(&format!("http://{outbound}/service/pair/x"))
            .await;
        assert_eq!(reply.status, 200);
    }

    let (ok, out, err) = routes(&["--admin", &admin]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("route table version "), "{out}");
    let line = |service: &str, endpoint: &str| {
        out.lines()
            .find(|l| {
                l.contains(endpoint) && (service.is_empty() || l.trim_start().starts_with(service))
            })
            .unwrap_or_else(|| panic!("no line for {service} {endpoint} in\n{out}"))
            .to_owned()
    };
    // Outbound: app and pair go to this node's inbound; pair's other endpoint is ejected.
    let (outbound_block, inbound_block) = out.split_once("\ninbound:").unwrap();
    assert!(outbound_block.contains("app "), "{out}");
    assert!(line("app", &inbound).contains(" 1 "), "{out}");
    assert!(line("", "127.0.0.9:1").contains("ejected"), "{out}");
    // Inbound: this node's instances, at the application's address.
    assert!(inbound_block.contains(&app.addr.to_string()), "{out}");

    let (ok, out, err) = routes(&["--admin", &admin, "--json"]).await;
    assert!(ok, "{err}");
    let table: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        table["outbound"]["pair"]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let (ok, _, err) = routes(&["--admin", "127.0.0.1:1"]).await;
    assert!(!ok);
    assert!(
        err.contains("no agent's admin listener answers at 127.0.0.1:1"),
        "{err}"
    );
}
