//! Tokens on the control APIs, through the shipped binary: a registry or admin listener that
//! other machines can reach refuses to start without a token; with one, the registry answers
//! as Consul's ACL system does (403 `Permission denied` without a token, 403 `ACL not found`
//! with a wrong one) to a real third-party client (py-consul), the admin listener wants
//! `Authorization: Bearer`, an agent that follows a protected registry sends its token, and
//! the secret appears in no log line and no admin answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use tokio::process::Command;
use tokio::time::Instant;

use crate::support::*;

const TOKEN: &str = "7f3c2a9e-sky-line-token-b41d";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `skyline <args>`, which must refuse to start: its exit status and stderr (bounded: 20 s).
async fn refused_start(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(SKYLINE);
    command
        .args(args)
        .env_remove("SKYLINE_ADMIN_TOKEN")
        .env_remove("SKYLINE_REGISTRY_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("a refused start ends at once")
        .unwrap();
    assert!(!out.status.success(), "started anyway: {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `skyline registry` listening on every interface (0.0.0.0) with `token_file`; its port, read
/// from its log, is reached at 127.0.0.1.
async fn exposed_registry(dir: &Path, token_file: &Path) -> (Skyline, SocketAddr) {
    let data = dir.join("registry");
    let mut registry = Skyline::start(
        &[
            "registry",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let started = registry.log.wait_for("registry started").await;
    assert_eq!(started["token"], true, "{started}");
    let addr: SocketAddr = started["addr"].as_str().unwrap().parse().unwrap();
    assert!(addr.ip().is_unspecified(), "{addr}");
    (registry, SocketAddr::from(([127, 0, 0, 1], addr.port())))
}

/// Every log line the process wrote so far (bounded: stops at the first 300 ms of silence).
async fn drain(log: &mut StderrLog) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(300), log.next()).await {
        lines.push(line);
    }
    lines
}

async fn send(req: Request<Full<bytes::Bytes>>) -> Reply {
    Client::new().send(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_or_admin_listener_beyond_loopback_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stderr = refused_start(
        &[
            "registry",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(
        stderr.contains("--token-file") && stderr.contains("0.0.0.0:0"),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "the refused registry created its data folder"
    );

    // An empty token file is no token either: refused with the file named, not its content.
    let empty = write(dir.path(), "empty.token", "\n");
    let stderr = refused_start(
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--token-file",
            empty.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(
        stderr.contains("empty.token: the token is empty"),
        "{stderr}"
    );

    // The agent: file, line and key of the admin listener that needs a token.
    let config = write(
        dir.path(),
        "agent.toml",
        "[listen]\noutbound = \"off\"\ninbound = \"off\"\nadmin = \"0.0.0.0:0\"\n",
    );
    let stderr = refused_start(&["agent", "--config", config.to_str().unwrap()], &[]).await;
    let expected = format!("{}: key `listen.admin_token_file`", config.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("SKYLINE_ADMIN_TOKEN"), "{stderr}");

    // And its embedded registry, exposed without `catalog.token_file`.
    let config = write(
        dir.path(),
        "embedded.toml",
        &format!(
            "[listen]\noutbound = \"off\"\ninbound = \"off\"\nadmin = \"off\"\n[catalog]\nsource = \"embedded\"\nregistry = \"0.0.0.0:0\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    );
    let stderr = refused_start(&["agent", "--config", config.to_str().unwrap()], &[]).await;
    assert!(stderr.contains("key `catalog.token_file`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_with_the_token_registers_and_without_it_gets_consuls_acl_answer() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "registry.token", &format!("{TOKEN}\n"));
    let (mut registry, addr) = exposed_registry(dir.path(), &token_file).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/py_consul_token.py"
    );
    let run = Command::new("python3")
        .arg(script)
        .arg(addr.to_string())
        .arg(TOKEN)
        .env_remove("CONSUL_HTTP_TOKEN")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the py-consul script finishes within 60 s")
        .expect("python3 runs (scripts/install-deps installs it and py-consul)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-consul failed:\n{stdout}\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "ok register with the token",
            "ok catalog read with the token",
            "denied none Permission denied",
            "denied wrong ACL not found",
            "ok nothing registered without the token",
        ],
        "{stdout}"
    );

    // The three ways Consul takes a token, and its answers byte for byte.
    let url = format!("http://{addr}/v1/agent/services");
    let reply = send(Request::get(&url).body(Full::default()).unwrap()).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (403, "Permission denied")
    );
    let reply = send(
        Request::get(&url)
            .header("x-consul-token", "wrong")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!((reply.status, reply.body.as_str()), (403, "ACL not found"));
    for req in [
        Request::get(&url).header("x-consul-token", TOKEN),
        Request::get(&url).header("authorization", format!("Bearer {TOKEN}")),
        Request::get(format!("{url}?token={TOKEN}")),
    ] {
        let reply = send(req.body(Full::default()).unwrap()).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.json()["web-1"].is_object(), "{reply:?}");
    }
    // Consul answers /v1/status/leader without a token (load balancers probe it).
    let reply = Client::new()
        .get(&format!("http://{addr}/v1/status/leader"))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    registry.sigterm();
    let lines = drain(&mut registry.log).await;
    assert!(!lines.is_empty());
    for line in lines {
        assert!(!line.contains(TOKEN), "the token is in the log: {line}");
    }
}

/// A `[[service]]` entry for `name` at `app`, with a TTL check the agent keeps passing.
fn service_toml(name: &str, app: &TestApp) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\ncheck = {{ ttl = \"2s\" }}\n",
        app.addr.ip(),
        app.addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_the_registry_token_registers_and_routes_and_one_without_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "registry.token", TOKEN);
    let (mut registry, addr) = exposed_registry(dir.path(), &token_file).await;
    let web = TestApp::spawn("web", ip("127.0.0.1"));
    let config = write(dir.path(), "agent.toml", &service_toml("web", &web));
    let consul = addr.to_string();
    let token_path = token_file.to_str().unwrap().to_owned();
    let agent_args = |with_token: bool| {
        let mut args = vec![
            "agent",
            "--catalog",
            "consul",
            "--consul",
            consul.as_str(),
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ];
        if with_token {
            args.extend(["--registry-token-file", token_path.as_str()]);
        }
        args
    };

    // Without the token the catalog's first read is refused: the agent does not start.
    let stderr = refused_start(&agent_args(false), &[]).await;
    assert!(
        stderr.contains("403") && stderr.contains("Permission denied"),
        "{stderr}"
    );

    let mut agent = Skyline::start(&agent_args(true), &[]);
    let started = agent.log.wait_for("agent started").await;
    let outbound = started["outbound"].as_str().unwrap().to_owned();
    // The agent registered `web` with the token; the catalog it follows (with the token) routes.
    let client = Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let reply = client
            .get(&format!("http://{outbound}/service/web/hi"))
            .await;
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(web.seen().last().unwrap().target, "/hi");

    // The same token from the environment instead of a file.
    let env_agent = {
        let mut command = std::process::Command::new(SKYLINE);
        command
            .args(agent_args(false))
            .args(["--node-name", "env", "--log-format", "json"])
            .env("SKYLINE_LOG", "info")
            .env("SKYLINE_REGISTRY_TOKEN", TOKEN);
        let mut agent = Skyline::spawn(command, &[]);
        agent.log.wait_for("agent started").await;
        agent
    };

    for process in [&mut agent, &mut registry] {
        process.sigterm();
        for line in drain(&mut process.log).await {
            assert!(!line.contains(TOKEN), "the token is in the log: {line}");
        }
    }
    drop(env_agent);
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_admin_listener_answers_only_with_its_bearer_token_and_never_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
    let catalog = write(dir.path(), "catalog.toml", "");
    let mut agent = Skyline::start(
        &[
            "agent",
            "--catalog",
            "file",
            "--catalog-file",
            catalog.to_str().unwrap(),
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "off",
            "--admin",
            "0.0.0.0:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let started = agent.log.wait_for("agent started").await;
    let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin.port()));
    let get = |path: &str, auth: Option<String>| {
        let mut req = Request::get(format!("http://{admin}{path}"));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        send(req.body(Full::default()).unwrap())
    };

    // Probes need no token.
    assert_eq!(get("/healthz", None).await.status, 200);
    assert_eq!(get("/readyz", None).await.status, 200);
    // The dashboard's page holds no data; its data needs the token.
    assert_eq!(get("/ui", None).await.status, 200);
    for path in [
        "/routes",
        "/metrics",
        "/explain?url=/service/web/",
        "/ui/data",
    ] {
        let none = get(path, None).await;
        assert_eq!(none.status, 401, "{path}: {none:?}");
        assert_eq!(
            none.headers["www-authenticate"],
            "Bearer realm=\"skyline-admin\""
        );
        assert_eq!(none.json()["error"], "unauthorized");
        let wrong = get(path, Some("Bearer not-it".into())).await;
        assert_eq!(wrong.status, 401, "{path}: {wrong:?}");
        assert!(
            wrong.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
        assert!(!wrong.body.contains("not-it"), "{wrong:?}");
        let basic = get(path, Some(format!("Basic {TOKEN}"))).await;
        assert_eq!(basic.status, 401, "{path}: {basic:?}");
        let good = get(path, Some(format!("Bearer {TOKEN}"))).await;
        assert_ne!(good.status, 401, "{path}: {good:?}");
        assert!(!good.body.contains(TOKEN), "{path} shows the token");
    }
    assert_eq!(
        get("/routes", Some(format!("bearer {TOKEN}"))).await.status,
        200
    );
    // A non-ASCII cluster host in /explain (found by the fuzz target bridge_rewrite) is a bad
    // request, not a panic that drops the connection.
    let odd = get(
        "/explain?url=http://a.b%C3%A9svc.cluster.local/",
        Some(format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(odd.status, 400, "{odd:?}");

    agent.sigterm();
    for line in drain(&mut agent.log).await {
        assert!(!line.contains(TOKEN), "the token is in the log: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reads_catalog_and_kv_policies_of_a_protected_registry_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "registry.token", TOKEN);
    let admin_token = write(dir.path(), "admin.token", "admin-secret-42");
    let (mut registry, addr) = exposed_registry(dir.path(), &token_file).await;
    let consul = addr.to_string();
    let gateway_args = |with_token: bool| {
        let mut args = vec![
            "gateway".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "0.0.0.0:0".into(),
            "--admin-token-file".into(),
            admin_token.to_str().unwrap().into(),
            "--consul".into(),
            consul.clone(),
        ];
        if with_token {
            args.extend([
                "--registry-token-file".to_owned(),
                token_file.to_str().unwrap().into(),
            ]);
        }
        args
    };

    // Without the registry token the catalog refuses the gateway, which does not start.
    let args = gateway_args(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stderr = refused_start(&args, &[]).await;
    assert!(stderr.contains("Permission denied"), "{stderr}");

    let args = gateway_args(true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gateway = Skyline::start(&args, &[]);
    let started = gateway.log.wait_for("gateway started").await;
    let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin.port()));

    // A route policy written to the KV (with the token) reaches the gateway's KV watch.
    let put = Request::put(format!("http://{addr}/v1/kv/skyline/routes/web"))
        .header("x-consul-token", TOKEN)
        .body(Full::from(r#"{"hold": "1s"}"#))
        .unwrap();
    assert_eq!(send(put).await.status, 200);
    let loaded = gateway.log.wait_for("route policy loaded").await;
    assert_eq!(loaded["key"], "skyline/routes/web", "{loaded}");

    // Its admin listener, exposed, wants the bearer token.
    let routes = format!("http://{admin}/routes");
    let reply = Client::new().get(&routes).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    let reply = send(
        Request::get(&routes)
            .header("authorization", "Bearer admin-secret-42")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(!reply.body.contains(TOKEN) && !reply.body.contains("admin-secret-42"));

    for process in [&mut gateway, &mut registry] {
        process.sigterm();
        for line in drain(&mut process.log).await {
            assert!(
                !line.contains(TOKEN) && !line.contains("admin-secret-42"),
                "a token is in the log: {line}"
            );
        }
    }
}
