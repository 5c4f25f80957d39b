//! The access log as an operator reads it: the processes' standard error after known traffic,
//! one line per request on every role (agent outbound and inbound, gateway, bridge), in JSON
//! and in the human format, and nothing (or a share) when it is off (or sampled).

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use crate::support::*;

/// A catalog file with node `a` (the agent's inbound at `inbound`), service `hello` on it at
/// `app` (platform mesos), and service `down` at `closed`, where nothing listens.
fn write_catalog(path: &std::path::Path, inbound: &str, app: std::net::SocketAddr, closed: &str) {
    let port = |addr: &str| addr.rsplit(':').next().unwrap().to_owned();
    let text = format!(
        "[[node]]\nname = \"a\"\naddress = \"127.0.0.1\"\ninbound_port = {}\n\n\
         [[service]]\nname = \"hello\"\nnode = \"a\"\naddress = \"127.0.0.1\"\nport = {}\nmeta = {{ platform = \"mesos\" }}\n\n\
         [[service]]\nname = \"down\"\nnode = \"a\"\naddress = \"127.0.0.1\"\nport = {}\n",
        port(inbound),
        app.port(),
        port(closed),
    );
    std::fs::write(path, text).unwrap();
}

/// `skyline <args>` with `extra` arguments, its stderr followed; JSON logs unless `human`.
/// Unless `args` set the access log, it writes every request (its default is a sample), so a
/// test can look for any request's line.
fn start(args: &[String], human: bool) -> (tokio::process::Child, StderrLog) {
    let mut command = std::process::Command::new(SKYLINE);
    command.args(args).env("SKYLINE_LOG", "info");
    if !args.iter().any(|a| a.starts_with("--access-log")) {
        command.env("SKYLINE_ACCESS_LOG_SAMPLE", "1");
    }
    if !human {
        command.arg("--log-format=json");
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = StderrLog::follow(&mut child);
    (child, log)
}

/// Starts an agent (JSON logs unless `human`) on a fresh catalog with `hello` at `app`;
/// returns it, its outbound address and the catalog's folder.
async fn agent(
    app: &TestApp,
    extra: &[&str],
    human: bool,
) -> (tokio::process::Child, StderrLog, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    let (outbound, inbound) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    write_catalog(&catalog, &inbound, app.addr, &free_addr("127.0.0.1"));
    let mut args: Vec<String> = [
        "agent",
        "--node-name=a",
        "--admin=off",
        "--catalog=file",
        &format!("--catalog-file={}", catalog.display()),
        &format!("--outbound={outbound}"),
        &format!("--inbound={inbound}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let (child, log) = start(&args, human);
    until_ok(&format!("http://{outbound}/service/hello/")).await;
    (child, log, outbound, dir)
}

/// The access lines' fields from `log` until `enough` holds for them (bounded: 20 s); other
/// lines are skipped.
async fn access_lines(log: &mut StderrLog, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut lines = Vec::new();
    let gathered = tokio::time::timeout(Duration::from_secs(20), async {
        while !enough(&lines) {
            let Some(line) = log.next().await else { break };
            if let Ok(json) = serde_json::from_str::<Value>(&line) {
                if json["target"] == "skyline::access" {
                    lines.push(json["fields"].clone());
                }
            }
        }
    })
    .await;
    assert!(
        gathered.is_ok() && enough(&lines),
        "access lines so far: {lines:#?}"
    );
    lines
}

/// Every line of `log` until the process closes stderr (it exited), bounded: 20 s.
async fn rest_of(log: &mut StderrLog) -> Vec<String> {
    let mut lines = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.next().await {
            lines.push(line);
        }
    })
    .await
    .expect("the process closes stderr when it exits");
    lines
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

async fn send(url: &str, method: &str, id: Option<&str>, body: &'static str) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    Client::new()
        .send(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

fn find<'a>(lines: &'a [Value], role: &str, id: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["role"] == role && l["request_id"] == id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_writes_one_json_line_per_request_with_where_it_went_and_how_it_ended() {
    let app = TestApp::spawn("mesos-1", ip("127.0.0.1"));
    let (_agent, mut agent_log, outbound, dir) = agent(&app, &[], false).await;
    let catalog = dir.path().join("catalog.toml");

    // Known traffic on the agent: a GET without an id (the express lane), a POST with a body
    // (hyper's path), an unknown service (404) and one whose instance refuses (502).
    let get = send(
        &format!("http://{outbound}/service/hello/x"),
        "GET",
        None,
        "",
    )
    .await;
    assert_eq!((get.status, get.body.as_str()), (200, "mesos-1 /x"));
    let post = send(
        &format!("http://{outbound}/service/hello/post"),
        "POST",
        Some("rid-post"),
        "abc",
    )
    .await;
    assert_eq!(post.status, 200);
    let unknown = send(
        &format!("http://{outbound}/service/nope/"),
        "GET",
        Some("rid-404"),
        "",
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.mesh_error()),
        (404, Some("unknown-service"))
    );
    let down = send(
        &format!("http://{outbound}/service/down/"),
        "GET",
        Some("rid-502"),
        "",
    )
    .await;
    assert_eq!(
        (down.status, down.mesh_error()),
        (502, Some("upstream-connect"))
    );

    let seen = app.seen();
    let the_get = seen.iter().find(|s| s.target == "/x").unwrap();
    let the_id = the_get.headers["x-request-id"].to_str().unwrap().to_owned();
    let lines = access_lines(&mut agent_log, |l| {
        let has = |role: &str, id: &str| !find(l, role, id).is_empty();
        has("outbound", &the_id)
            && has("inbound", &the_id)
            && has("outbound", "rid-post")
            && has("inbound", "rid-post")
            && has("outbound", "rid-404")
            && has("outbound", "rid-502")
            && has("inbound", "rid-502")
    })
    .await;

    // The id the mesh made for the GET is the one the application saw, on both hops.
    assert_eq!(the_id.len(), 32, "{the_id}");
    let out = find(&lines, "outbound", &the_id);
    assert_eq!(out.len(), 1, "one line per request: {out:#?}");
    let out = out[0];
    assert_eq!(out["message"], "access");
    assert_eq!(out["service"], "hello");
    assert_eq!(out["tier"], "direct");
    assert_eq!(out["status"], 200);
    assert_eq!(out["bytes_in"], 0);
    assert_eq!(out["bytes_out"], "mesos-1 /x".len());
    assert_eq!(out["attempts"], 1);
    assert_eq!(out["error"], Value::Null);
    assert!(out["duration_ms"].as_f64().unwrap() > 0.0, "{out}");
    let inbound = find(&lines, "inbound", &the_id)[0];
    assert_eq!(inbound["tier"], "local");
    assert_eq!(inbound["upstream"], app.addr.to_string());
    // The outbound hop's upstream is the inbound listener.
    assert_eq!(
        out["upstream"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_ne!(out["upstream"], app.addr.to_string());

    let post = find(&lines, "outbound", "rid-post")[0];
    assert_eq!(
        (post["status"].as_u64(), post["bytes_in"].as_u64()),
        (Some(200), Some(3))
    );
    assert_eq!(find(&lines, "inbound", "rid-post")[0]["bytes_in"], 3);

    let unknown = find(&lines, "outbound", "rid-404")[0];
    assert_eq!(unknown["status"], 404);
    assert_eq!(unknown["error"], "unknown-service");
    assert_eq!(unknown["service"], "nope");
    assert_eq!(unknown["upstream"], Value::Null);
    assert_eq!(unknown["attempts"], 0);

    let down = find(&lines, "outbound", "rid-502")[0];
    assert_eq!(down["status"], 502);
    assert_eq!(down["error"], "upstream-connect");
    assert!(down["attempts"].as_u64().unwrap() >= 1, "{down}");
    let inbound_down = find(&lines, "inbound", "rid-502");
    assert!(
        inbound_down
            .iter()
            .all(|l| l["status"] == 502 && l["error"] == "upstream-connect")
    );

    // The gateway and a bridge in front of it (fixed gateway address, no cluster DNS needed for
    // this direction): a Kubernetes pod's request → bridge → gateway (tier mesos) → agent.
    let (gateway_listen, gateway_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let (_gateway, mut gateway_log) = start(
        &[
            "gateway".to_owned(),
            format!("--catalog-file={}", catalog.display()),
            "--bridges=127.0.0.1:9".to_owned(),
            format!("--listen={gateway_listen}"),
            format!("--admin={gateway_admin}"),
        ],
        false,
    );
    let (bridge_listen, bridge_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let (_bridge, mut bridge_log) = start(
        &[
            "bridge".to_owned(),
            format!("--gateways={gateway_listen}"),
            format!("--listen={bridge_listen}"),
            format!("--admin={bridge_admin}"),
        ],
        false,
    );
    until_ok(&format!("http://{gateway_admin}/readyz")).await;
    until_ok(&format!("http://{bridge_admin}/readyz")).await;
    let req = Request::get(format!("http://{bridge_listen}/z"))
        .header(http::header::HOST, "hello.default.svc.cluster.local")
        .header("x-request-id", "rid-k8s")
        .body(Full::default())
        .unwrap();
    let reply = Client::new().send(req).await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "mesos-1 /z"));

    let bridge = access_lines(&mut bridge_log, |l| {
        !find(l, "bridge", "rid-k8s").is_empty()
    })
    .await;
    let bridge = find(&bridge, "bridge", "rid-k8s")[0].clone();
    assert_eq!(bridge["service"], "hello");
    assert_eq!(bridge["tier"], "gateway");
    assert_eq!(bridge["upstream"], gateway_listen);
    assert_eq!(bridge["status"], 200);
    let gateway = access_lines(&mut gateway_log, |l| {
        !find(l, "gateway", "rid-k8s").is_empty()
    })
    .await;
    let gateway = find(&gateway, "gateway", "rid-k8s")[0].clone();
    assert_eq!(gateway["service"], "hello");
    assert_eq!(gateway["tier"], "mesos");
    assert_eq!(gateway["platform"], "mesos");
    assert_eq!(gateway["status"], 200);
    assert_eq!(gateway["attempts"], 1);
    assert_eq!(gateway["bytes_out"], "mesos-1 /z".len());
    let inbound = access_lines(&mut agent_log, |l| {
        !find(l, "inbound", "rid-k8s").is_empty()
    })
    .await;
    assert_eq!(find(&inbound, "inbound", "rid-k8s")[0]["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_human_access_line_names_every_field_and_has_no_colour_codes() {
    let app = TestApp::spawn("mesos-1", ip("127.0.0.1"));
    let (agent, mut log, outbound, _dir) = agent(&app, &[], true).await;
    let reply = send(
        &format!("http://{outbound}/service/nope/"),
        "GET",
        Some("rid-human"),
        "",
    )
    .await;
    assert_eq!(reply.status, 404);
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.next().await {
            if line.contains("request_id=rid-human") {
                return line;
            }
        }
        panic!("stderr closed");
    })
    .await
    .expect("the access line comes within 20 s");
    assert!(
        !line.contains('\u{1b}'),
        "no escape codes when stderr is not a terminal: {line:?}"
    );
    assert!(line.contains(" INFO skyline::access: "), "{line}");
    for field in [
        "role=outbound",
        "service=nope",
        "tier=-",
        "platform=-",
        "upstream=-",
        "status=404",
        "bytes_in=0",
        "bytes_out=",
        "duration_ms=",
        "attempts=0",
        "error=unknown-service",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    sigterm(&agent);
}

/// Sends `ok` requests that succeed (service `hello`) and `failed` ones for an unknown
/// service, each with an id of the test's, stops the agent and counts the outbound access
/// lines of each kind: `(succeeded, failed)`.
async fn lines_after(extra: &[&str], ok: usize, failed: usize) -> (usize, usize) {
    let app = TestApp::spawn("mesos-1", ip("127.0.0.1"));
    let (agent, mut log, outbound, _dir) = agent(&app, extra, false).await;
    for i in 0..ok {
        let url = format!("http://{outbound}/service/hello/");
        let reply = send(&url, "GET", Some(&format!("t-ok-{i}")), "").await;
        assert_eq!(reply.status, 200);
    }
    for i in 0..failed {
        let url = format!("http://{outbound}/service/nope/");
        let reply = send(&url, "GET", Some(&format!("t-failed-{i}")), "").await;
        assert_eq!(reply.status, 404);
    }
    sigterm(&agent);
    let lines = rest_of(&mut log).await;
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:#?}"
    );
    let ids: Vec<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "skyline::access" && l["fields"]["role"] == "outbound")
        .filter_map(|l| l["fields"]["request_id"].as_str().map(str::to_owned))
        .collect();
    let count = |prefix: &str| ids.iter().filter(|id| id.starts_with(prefix)).count();
    (count("t-ok-"), count("t-failed-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_writes_a_hundredth_plus_every_failure_by_default_every_request_when_asked_and_none_when_off()
 {
    let (default, every, off, sampled, failures_only) = tokio::join!(
        // On, at the default sample.
        lines_after(&["--access-log=on"], 400, 30),
        lines_after(&["--access-log-sample=1"], 50, 20),
        lines_after(&["--access-log=off"], 50, 20),
        lines_after(&["--access-log-sample=0.5"], 400, 30),
        lines_after(&["--access-log-sample=0"], 50, 30),
    );
    // Binomial(400, 0.01): 4 ± 2; more than 20 has a chance below 10^-8.
    assert!(
        default.0 <= 20,
        "{} of 400 at the default sample",
        default.0
    );
    assert_eq!(default.1, 30, "every failed request at the default sample");
    assert_eq!(every, (50, 20), "every request, lines flushed at exit");
    assert_eq!(off, (0, 0));
    // Binomial(400, 0.5): 200 ± 10 (one standard deviation); 120..280 is 8 of them.
    assert!(
        (120..=280).contains(&sampled.0),
        "{} of 400 at a sample of 0.5",
        sampled.0
    );
    assert_eq!(
        sampled.1, 30,
        "every failed request is written at any sample"
    );
    assert_eq!(failures_only, (0, 30));
}

#[tokio::test]
async fn a_bad_access_log_setting_is_refused_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[log]\naccess_log = \"sometimes\"\n").unwrap();
    let output = tokio::process::Command::new(SKYLINE)
        .args(["config", "check", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("log.access_log"),
        "{stdout}{stderr}"
    );
    let output = tokio::process::Command::new(SKYLINE)
        .args(["agent", "--access-log-sample=2"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("log.access_log_sample"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metrics_off_in_the_file_metrics_says_so_and_the_flag_turns_them_back_on() {
    let app = TestApp::spawn("hello", ip("127.0.0.1"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[metrics]\nenabled = false\n").unwrap();
    let client = Client::new();
    for (flag, on) in [(None, false), (Some("--metrics=on"), true)] {
        let admin = free_addr("127.0.0.1");
        let (outbound, inbound) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
        let catalog = dir.path().join("catalog.toml");
        write_catalog(&catalog, &inbound, app.addr, &free_addr("127.0.0.1"));
        let mut args: Vec<String> = [
            "agent",
            "--node-name=a",
            "--catalog=file",
            &format!("--catalog-file={}", catalog.display()),
            &format!("--outbound={outbound}"),
            &format!("--inbound={inbound}"),
            &format!("--admin={admin}"),
            &format!("--config={}", config.display()),
        ]
        .map(String::from)
        .to_vec();
        args.extend(flag.map(String::from));
        let (_child, _log) = start(&args, false);
        until_ok(&format!("http://{outbound}/service/hello/")).await;
        for _ in 0..5 {
            let reply = client
                .get(&format!("http://{outbound}/service/hello/"))
                .await;
            assert_eq!(reply.status, 200);
        }
        let metrics = client.get(&format!("http://{admin}/metrics")).await;
        if on {
            assert_eq!(metrics.status, 200, "{}", metrics.body);
            let scrape = scrape(admin.parse().unwrap()).await;
            assert!(
                scrape.count(
                    "skyline_requests_total{role=\"outbound\",service=\"hello\",code=\"200\",error=\"\"}"
                ) >= 5.0,
                "{}",
                metrics.body
            );
        } else {
            assert_eq!(metrics.status, 404, "{}", metrics.body);
            assert!(metrics.body.contains("metrics are off"), "{}", metrics.body);
        }
    }
}
