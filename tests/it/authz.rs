//! Service identity and authorization policies through the shipped binary: a registry process
//! and two agent processes (a on 127.0.0.2, b on 127.0.0.3, with `web` and `grpc-echo` on b)
//! whose hop is mTLS with certificates of `skyline ca`. Callers present per-service tokens to
//! a's outbound proxy; b's inbound proxy enforces `[authz]` and the KV's policies.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{Client, Reply, SKYLINE, Skyline, TestApp, ip, scrape};

const FRONTEND_TOKEN: &str = "frontend-3c1f9a7e";
const BILLING_TOKEN: &str = "billing-77d0e4b2";

fn skyline(args: &[&str]) {
    let out = std::process::Command::new(SKYLINE)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

struct Mesh {
    _dir: tempfile::TempDir,
    registry: SocketAddr,
    _registry_process: Skyline,
    a: Skyline,
    b: Skyline,
    outbound_a: SocketAddr,
    inbound_b: SocketAddr,
    admin_b: SocketAddr,
    web: TestApp,
    grpc_stop: tokio_util::sync::CancellationToken,
}

impl Mesh {
    /// The mesh with mesh TLS in `mode` and `authz` (TOML: `[authz]` and its rules) in b's file.
    async fn start(mode: &str, authz: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = d.join("ca");
        skyline(&["ca", "init", "--dir", s(&ca), "--trust-domain", "mesh.test"]);
        let data = d.join("registry");
        let mut registry_process = Skyline::start(
            &[
                "registry",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                s(&data),
            ],
            &[],
        );
        let started = registry_process.log.wait_for("registry started").await;
        let registry: SocketAddr = started["addr"].as_str().unwrap().parse().unwrap();

        let web = TestApp::spawn("web@b", ip("127.0.0.3"));
        let grpc_stop = tokio_util::sync::CancellationToken::new();
        let grpc = crate::grpc::grpc_server("127.0.0.3", grpc_stop.clone()).await;
        std::fs::write(d.join("frontend.token"), format!("{FRONTEND_TOKEN}\n")).unwrap();
        std::fs::write(d.join("billing.token"), BILLING_TOKEN).unwrap();
        let tls = |node: &str| {
            format!(
                "[tls]\nmode = \"{mode}\"\nca = \"ca/ca.crt\"\ncert = \"{node}.crt\"\nkey = \"{node}.key\"\n\n"
            )
        };
        let config_a = tls("a")
            + "[[authz.caller]]\nservice = \"frontend\"\ntoken_file = \"frontend.token\"\n\n\
               [[authz.caller]]\nservice = \"billing\"\ntoken_file = \"billing.token\"\n\n";
        let config_b = tls("b")
            + &format!(
                "[[service]]\nname = \"web\"\naddress = \"127.0.0.3\"\nport = {}\ncheck = {{ ttl = \"1s\" }}\n\n\
                 [[service]]\nname = \"grpc-echo\"\naddress = \"127.0.0.3\"\nport = {}\n\
                 meta = {{ protocol = \"h2c\" }}\ncheck = {{ ttl = \"1s\" }}\n\n{authz}",
                web.addr.port(),
                grpc.port()
            );
        let consul = registry.to_string();
        let mut agents = Vec::new();
        for (node, node_ip, config) in [("a", "127.0.0.2", config_a), ("b", "127.0.0.3", config_b)]
        {
            skyline(&[
                "ca",
                "issue",
                "--dir",
                s(&ca),
                "--kind",
                "node",
                "--name",
                node,
                "--ttl",
                "1h",
                "--out",
                s(&d.join(node)),
            ]);
            let path = d.join(format!("{node}.toml"));
            std::fs::write(&path, config).unwrap();
            let listen = format!("{node_ip}:0");
            let mut agent = Skyline::start(
                &[
                    "agent",
                    "--config",
                    s(&path),
                    "--node-name",
                    node,
                    "--node-address",
                    node_ip,
                    "--outbound",
                    &listen,
                    "--inbound",
                    &listen,
                    "--admin",
                    &listen,
                    "--catalog",
                    "consul",
                    "--consul",
                    &consul,
                ],
                &[],
            );
            let fields = agent.log.wait_for("agent started").await;
            let addr = |key: &str| -> SocketAddr { fields[key].as_str().unwrap().parse().unwrap() };
            agents.push((agent, addr("outbound"), addr("inbound"), addr("admin")));
        }
        let (b, _, inbound_b, admin_b) = agents.pop().unwrap();
        let (a, outbound_a, _, _) = agents.pop().unwrap();
        let mesh = Mesh {
            _dir: dir,
            registry,
            _registry_process: registry_process,
            a,
            b,
            outbound_a,
            inbound_b,
            admin_b,
            web,
            grpc_stop,
        };
        // Bounded: web is routed once b registered it and its check passed (a 403 is routed
        // too: b's inbound proxy answered).
        for _ in 0..600 {
            let reply = mesh
                .try_call("GET", "/hello", Some(FRONTEND_TOKEN), &[])
                .await;
            if matches!(reply, Ok(ref r) if r.status == 200 || r.mesh_error() == Some("forbidden"))
            {
                return mesh;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("a never routed web to b");
    }

    async fn try_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let url = format!("http://{}/service/web{path}", self.outbound_a);
        let mut req = Request::builder().method(method).uri(url);
        if let Some(token) = token {
            req = req.header("x-skyline-caller-token", token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = if method == "POST" {
            Full::new(Bytes::from_static(b"a body"))
        } else {
            Full::default()
        };
        Client::new().send(req.body(body).unwrap()).await
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> Reply {
        self.try_call(method, path, token, &[]).await.unwrap()
    }

    /// Puts `value` at `key` in the registry's KV.
    async fn kv_put(&self, key: &str, value: &str) {
        let req = Request::put(format!("http://{}/v1/kv/{key}", self.registry))
            .body(Full::new(Bytes::from(value.to_owned())))
            .unwrap();
        let reply = Client::new().send(req).await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
    }

    async fn kv_delete(&self, key: &str) {
        let req = Request::delete(format!("http://{}/v1/kv/{key}", self.registry))
            .body(Full::default())
            .unwrap();
        let reply = Client::new().send(req).await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
    }

    /// Calls `path` until it answers `status` (bounded: 10 s).
    async fn until_status(&self, path: &str, status: u16) {
        for _ in 0..400 {
            if self.call("GET", path, Some(FRONTEND_TOKEN)).await.status == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{path} never answered {status}");
    }

    async fn stop(self) {
        for agent in [&self.a, &self.b] {
            agent.sigterm();
        }
        self.a.exited_cleanly().await;
        self.b.exited_cleanly().await;
        self.grpc_stop.cancel();
        self.web.stop().await;
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn assert_forbidden(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {reply:?}");
    assert_eq!(reply.mesh_error(), Some("forbidden"), "{what}: {reply:?}");
    assert_eq!(reply.json()["error"], "forbidden", "{what}");
    assert_eq!(reply.json()["service"], "web", "{what}");
}

const RULES: &str = "\
[[authz.rule]]
from = \"*\"
to = \"web\"
path_prefix = \"/admin\"
action = \"deny\"

[[authz.rule]]
from = \"billing\"
to = \"web\"
methods = [\"POST\"]
action = \"deny\"

[[authz.rule]]
from = \"frontend\"
to = \"grpc-echo\"
action = \"deny\"
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_allow_and_deny_by_caller_method_and_normalised_path_over_strict_mtls() {
    let mut mesh = Mesh::start("strict", RULES).await;

    // Allowed: the instance learns the caller its agent asserted, never the credential.
    let ok = mesh.call("GET", "/hello", Some(FRONTEND_TOKEN)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen = mesh.web.seen().pop().unwrap();
    assert_eq!(seen.headers["x-skyline-caller"], "frontend");
    assert!(seen.headers.get("x-skyline-caller-token").is_none());

    // Every spelling of /admin is denied, on the express lane (GET) and hyper's (a body).
    let hits = mesh.web.hits();
    for path in [
        "/admin",
        "/admin/users",
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "//admin",
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/admin;x=1",
        "/./admin/",
    ] {
        for method in ["GET", "POST"] {
            let reply = mesh.call(method, path, Some(FRONTEND_TOKEN)).await;
            assert_forbidden(&reply, &format!("{method} {path}"));
        }
    }
    assert_eq!(
        mesh.web.hits(),
        hits,
        "a denied request reached the instance"
    );
    // The audit line names caller, destination, method, path as matched, and the rule.
    let line = mesh.b.log.wait_for("request denied").await;
    assert_eq!(line["caller"], "frontend");
    assert_eq!(line["destination"], "web");
    assert_eq!(line["path"], "/admin");
    assert_eq!(line["rule"], "file:rule[0]");

    // Whole segments only, and the instance receives the path the policy saw.
    for (method, path, received) in [
        ("GET", "/administrator", "/administrator"),
        (
            "GET",
            "/%61pi//v1/./x;jsessionid=1?q=%2F&a",
            "/api/v1/x?q=%2F&a",
        ),
        ("POST", "/a/b/../c", "/a/c"),
    ] {
        let reply = mesh.call(method, path, Some(FRONTEND_TOKEN)).await;
        assert_eq!(reply.status, 200, "{method} {path}: {reply:?}");
        assert_eq!(mesh.web.seen().pop().unwrap().target, received, "{path}");
    }
    // A path above the root is refused, not guessed at.
    let above = mesh
        .call("GET", "/x/../../admin", Some(FRONTEND_TOKEN))
        .await;
    assert_eq!(above.status, 400, "{above:?}");
    assert_eq!(above.mesh_error(), Some("bad-request"));

    // By caller and method: billing may GET, not POST; frontend may POST.
    assert_eq!(
        mesh.call("GET", "/x", Some(BILLING_TOKEN)).await.status,
        200
    );
    assert_forbidden(
        &mesh.call("POST", "/x", Some(BILLING_TOKEN)).await,
        "billing POST",
    );
    assert_eq!(
        mesh.call("POST", "/x", Some(FRONTEND_TOKEN)).await.status,
        200
    );

    let metrics = scrape(mesh.admin_b).await;
    let denied = metrics
        .text
        .lines()
        .filter(|l| {
            l.starts_with("skyline_requests_total{")
                && l.contains("error=\"forbidden\"")
                && l.contains("role=\"inbound\"")
        })
        .count();
    assert!(denied >= 1, "{}", metrics.text);

    // gRPC: a denied call ends with PERMISSION_DENIED, from the mesh, not the application.
    use crate::grpc::pb::echo_client::EchoClient;
    use crate::grpc::request;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.outbound_a))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let origin = format!("http://{}/service/grpc-echo", mesh.outbound_a)
        .parse()
        .unwrap();
    let mut client = EchoClient::with_origin(channel, origin);
    let mut call = tonic::Request::new(request("hi"));
    call.metadata_mut()
        .insert("x-skyline-caller-token", FRONTEND_TOKEN.parse().unwrap());
    let status = client.unary(call).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "skyline: forbidden");
    let mut call = tonic::Request::new(request("hi"));
    call.metadata_mut()
        .insert("x-skyline-caller-token", BILLING_TOKEN.parse().unwrap());
    let reply = client.unary(call).await.unwrap();
    assert_eq!(reply.get_ref().message, "hi");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_admits_only_allowed_callers_and_forged_caller_headers_are_ignored() {
    let authz = "[authz]\ndefault = \"deny\"\n\n\
                 [[authz.rule]]\nfrom = \"frontend\"\nto = \"web\"\naction = \"allow\"\n";
    // Permissive, so that a plain client can reach b's inbound listener too.
    let mesh = Mesh::start("permissive", authz).await;
    assert_eq!(
        mesh.call("GET", "/x", Some(FRONTEND_TOKEN)).await.status,
        200
    );
    assert_forbidden(
        &mesh.call("GET", "/x", Some(BILLING_TOKEN)).await,
        "billing",
    );
    assert_forbidden(&mesh.call("GET", "/x", None).await, "no credential");
    assert_forbidden(
        &mesh.call("GET", "/x", Some("frontend-guess")).await,
        "a wrong token",
    );
    // An application that claims to be frontend is not believed by its own agent...
    let forged = mesh
        .try_call("GET", "/x", None, &[("x-skyline-caller", "frontend")])
        .await
        .unwrap();
    assert_forbidden(&forged, "x-skyline-caller from the application");
    // ... nor one that claims billing while presenting frontend's token: the token decides.
    let hits = mesh.web.hits();
    let both = mesh
        .try_call(
            "GET",
            "/x",
            Some(FRONTEND_TOKEN),
            &[("x-skyline-caller", "billing")],
        )
        .await
        .unwrap();
    assert_eq!(both.status, 200, "{both:?}");
    assert_eq!(mesh.web.hits(), hits + 1);
    assert_eq!(
        mesh.web.seen().pop().unwrap().headers["x-skyline-caller"],
        "frontend"
    );
    // ... nor a client that calls b's inbound listener in plain HTTP with the header.
    let plain = Client::new()
        .send(
            Request::get(format!("http://{}/service/web/x", mesh.inbound_b))
                .header("x-skyline-caller", "frontend")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_forbidden(&plain, "x-skyline-caller over a plain connection");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_policy_takes_effect_without_restart_and_a_bad_one_keeps_the_last_good_set() {
    let mut mesh = Mesh::start("strict", "").await;
    assert_eq!(
        mesh.call("GET", "/admin", Some(FRONTEND_TOKEN))
            .await
            .status,
        200
    );
    let key = "skyline/policies/lock-admin";
    mesh.kv_put(
        key,
        r#"{"rule":[{"from":"*","to":"web","path_prefix":"/admin","action":"deny"}]}"#,
    )
    .await;
    mesh.until_status("/admin", 403).await;
    assert_forbidden(
        &mesh.call("GET", "//%61dmin", Some(FRONTEND_TOKEN)).await,
        "KV rule, unnormalised path",
    );
    // A bad entry is refused with its key and reason; the last good set stays in force.
    mesh.kv_put(
        key,
        r#"{"rule":[{"from":"*","to":"web","action":"perhaps"}]}"#,
    )
    .await;
    let refused = mesh
        .b
        .log
        .wait_for("authorization policy refused; keeping the previous one")
        .await;
    assert_eq!(refused["key"], key);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("rule[0].action"),
        "{refused}"
    );
    assert_forbidden(
        &mesh.call("GET", "/admin", Some(FRONTEND_TOKEN)).await,
        "after a bad entry",
    );
    assert_eq!(
        mesh.call("GET", "/x", Some(FRONTEND_TOKEN)).await.status,
        200
    );
    // Removed, the policy stops applying.
    mesh.kv_delete(key).await;
    mesh.until_status("/admin", 200).await;
    mesh.stop().await;
}

// === Gateway and bridge ===

/// Issues a certificate of `kind` named `name` into `dir`/`name`.{crt,key}.
fn issue(ca: &Path, dir: &Path, kind: &str, name: &str) {
    skyline(&[
        "ca",
        "issue",
        "--dir",
        s(ca),
        "--kind",
        kind,
        "--name",
        name,
        "--ttl",
        "1h",
        "--out",
        s(&dir.join(name)),
    ]);
}

/// `shop` runs only in Kubernetes (a pod behind `shop.default.svc.cluster.local`), so a call
/// from node a goes outbound → gateway (a's catch-all) → bridge → pod, every proxy hop over
/// strict mTLS. The bridge watches `skyline/policies/` in the registry; the gateway follows a
/// catalog file (no KV) with a rule of its own in its file, so each denial below comes from
/// the proxy whose log holds its audit line. `grpc-shop` (a tonic server in the cluster) takes
/// the same path: a gRPC call denied by either proxy ends with PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_and_the_gateway_enforce_policies_on_calls_to_kubernetes_services_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    skyline(&["ca", "init", "--dir", s(&ca), "--trust-domain", "mesh.test"]);
    let (_registry, registry) = Skyline::registry(d).await;
    let pod = TestApp::spawn("pod", ip("127.0.0.5"));
    let grpc_stop = tokio_util::sync::CancellationToken::new();
    let grpc = crate::grpc::grpc_server("127.0.0.5", grpc_stop.clone()).await;
    let dns = crate::upgrade::ClusterDns::start(&[
        ("shop.default.svc.cluster.local", "127.0.0.5"),
        ("grpc-shop.default.svc.cluster.local", "127.0.0.5"),
    ])
    .await;
    std::fs::write(d.join("frontend.token"), FRONTEND_TOKEN).unwrap();
    std::fs::write(d.join("billing.token"), BILLING_TOKEN).unwrap();
    let tls = |name: &str| {
        format!(
            "[tls]\nmode = \"strict\"\nca = \"ca/ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n\n"
        )
    };
    let write = |name: &str, text: String| {
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    issue(&ca, d, "node", "a");
    issue(&ca, d, "gateway", "gw");
    issue(&ca, d, "bridge", "br");
    let config_a = write(
        "a",
        tls("a")
            + "[[authz.caller]]\nservice = \"frontend\"\ntoken_file = \"frontend.token\"\n\n\
               [[authz.caller]]\nservice = \"billing\"\ntoken_file = \"billing.token\"\n",
    );
    let config_gw = write(
        "gw",
        tls("gw")
            + "[[authz.rule]]\nfrom = \"billing\"\nto = \"shop\"\npath_prefix = \"/refunds\"\naction = \"deny\"\n\n\
               [[authz.rule]]\nfrom = \"billing\"\nto = \"grpc-shop\"\naction = \"deny\"\n",
    );
    // The gRPC Service listens on a port of its own.
    let grpc_service = format!("[services.grpc-shop]\nport = {}\n\n", grpc.port());
    let config_br = write("br", tls("br") + &grpc_service);
    let catalog = d.join("catalog.toml");
    std::fs::write(&catalog, "").unwrap();

    let gateway_addr = crate::support::free_addr("127.0.0.6");
    let bridge_admin = crate::support::free_addr("127.0.0.4");
    let mut bridge = Skyline::start(
        &[
            "bridge",
            "--config",
            &config_br,
            "--listen",
            "127.0.0.4:0",
            "--admin",
            &bridge_admin,
            "--dns",
            &dns.addr.to_string(),
            "--port",
            &pod.addr.port().to_string(),
            "--gateways",
            &gateway_addr,
            "--consul",
            &registry,
        ],
        &[],
    );
    let started = bridge.log.wait_for("bridge started").await;
    let bridge_host = started["listen"].as_str().unwrap().to_owned();
    let mut gateway = Skyline::start(
        &[
            "gateway",
            "--config",
            &config_gw,
            "--listen",
            &gateway_addr,
            "--admin",
            "off",
            "--catalog-file",
            s(&catalog),
            "--bridges",
            &bridge_host,
        ],
        &[],
    );
    gateway.log.wait_for("gateway started").await;
    let mut a = Skyline::start(
        &[
            "agent",
            "--config",
            &config_a,
            "--node-name",
            "a",
            "--node-address",
            "127.0.0.2",
            "--outbound",
            "127.0.0.2:0",
            "--inbound",
            "off",
            "--admin",
            "off",
            "--catch-all",
            &gateway_addr,
            "--catalog",
            "consul",
            "--consul",
            &registry,
        ],
        &[],
    );
    let started = a.log.wait_for("agent started").await;
    let outbound_a = started["outbound"].as_str().unwrap().to_owned();
    let call = |path: &str, token: &str| {
        let req = Request::get(format!("http://{outbound_a}/service/shop{path}"))
            .header("x-skyline-caller-token", token)
            .body(Full::default())
            .unwrap();
        async move { Client::new().send(req).await.unwrap() }
    };
    // Calls `path` as `token`'s service until it answers `status` (bounded: 10 s).
    let until = |path: &'static str, token: &'static str, status: u16| {
        let call = &call;
        async move {
            for _ in 0..400 {
                if call(path, token).await.status == status {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("{path} as {token} never answered {status}");
        }
    };
    let registry_addr: SocketAddr = registry.parse().unwrap();
    let kv_put = |key: &str, value: &str| {
        let req = Request::put(format!("http://{registry_addr}/v1/kv/{key}"))
            .body(Full::new(Bytes::from(value.to_owned())))
            .unwrap();
        async move {
            let reply = Client::new().send(req).await.unwrap();
            assert_eq!(reply.status, 200, "{reply:?}");
        }
    };

    // No policy in the KV yet: both callers reach the pod, which learns who called.
    until("/x", FRONTEND_TOKEN, 200).await;
    assert_eq!(
        pod.seen().pop().unwrap().headers["x-skyline-caller"],
        "frontend"
    );

    // Frontend may not call shop: the bridge denies it, with its audit line and counter.
    let key = "skyline/policies/shop-callers";
    kv_put(
        key,
        r#"{"rule":[{"from":"frontend","to":"shop","action":"deny"}]}"#,
    )
    .await;
    until("/x", FRONTEND_TOKEN, 403).await;
    let hits = pod.hits();
    let denied = call("/orders//%6Cist", FRONTEND_TOKEN).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.mesh_error(), Some("forbidden"), "{denied:?}");
    assert_eq!(denied.json()["service"], "shop");
    let line = bridge.log.wait_for("request denied").await;
    assert_eq!(line["caller"], "frontend");
    assert_eq!(line["destination"], "shop");
    assert_eq!(line["rule"], "kv:shop-callers:rule[0]");
    // Billing is allowed, and the pod receives the path the policies judged.
    let allowed = call("/orders//%6Cist;x=1?q=1", BILLING_TOKEN).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    let seen = pod.seen().pop().unwrap();
    assert_eq!(seen.target, "/orders/list?q=1");
    assert_eq!(seen.headers["x-skyline-caller"], "billing");
    assert_eq!(pod.hits(), hits + 1, "a denied request reached the pod");
    let metrics = scrape(bridge_admin.parse().unwrap()).await;
    let forbidden = metrics
        .text
        .lines()
        .filter(|l| {
            l.starts_with("skyline_requests_total{")
                && l.contains("role=\"bridge\"")
                && l.contains("error=\"forbidden\"")
        })
        .count();
    assert!(forbidden >= 1, "{}", metrics.text);

    // The gateway enforces its own file's rule (billing may not reach /refunds, in any
    // spelling), before the request goes on to the bridge.
    let refused = call("/x/../%72efunds/1", BILLING_TOKEN).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.mesh_error(), Some("forbidden"));
    let line = gateway.log.wait_for("request denied").await;
    assert_eq!(line["caller"], "billing");
    assert_eq!(line["path"], "/refunds/1");
    assert_eq!(line["rule"], "file:rule[0]");
    assert_eq!(pod.hits(), hits + 1, "a denied request reached the pod");

    // A policy change in the KV applies without a restart: now billing is the one denied.
    kv_put(
        key,
        r#"{"rule":[{"from":"billing","to":"shop","action":"deny"}]}"#,
    )
    .await;
    until("/x", BILLING_TOKEN, 403).await;
    assert_eq!(call("/x", FRONTEND_TOKEN).await.status, 200);
    // Earlier denials of frontend may come first in the bridge's log (bounded: each wait is).
    let mut callers = Vec::new();
    while callers.last().is_none_or(|c| c != "billing") {
        assert!(
            callers.len() < 20,
            "no denial of billing at the bridge: {callers:?}"
        );
        let line = bridge.log.wait_for("request denied").await;
        callers.push(line["caller"].as_str().unwrap_or("").to_owned());
    }

    // A rule added to the bridge's file applies within its poll, without a restart.
    crate::support::write_atomically(
        Path::new(&config_br),
        &(tls("br")
            + &grpc_service
            + "[[authz.rule]]\nfrom = \"frontend\"\nto = \"shop\"\npath_prefix = \"/file\"\naction = \"deny\"\n"),
    );
    until("/file", FRONTEND_TOKEN, 403).await;
    bridge.log.wait_for("authorization policies reloaded").await;
    assert_eq!(call("/x", FRONTEND_TOKEN).await.status, 200);

    // gRPC through the same proxies: frontend's call reaches the tonic server.
    use crate::grpc::pb::echo_client::EchoClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound_a}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let origin = format!("http://{outbound_a}/service/grpc-shop")
        .parse()
        .unwrap();
    let client = EchoClient::with_origin(channel, origin);
    let grpc_call = |token: &str| {
        let mut call = tonic::Request::new(crate::grpc::request("hi"));
        call.metadata_mut()
            .insert("x-skyline-caller-token", token.parse().unwrap());
        let mut client = client.clone();
        async move { client.unary(call).await }
    };
    let reply = grpc_call(FRONTEND_TOKEN).await.unwrap();
    assert_eq!(reply.get_ref().message, "hi");
    // The gateway's file denies billing: PERMISSION_DENIED, from the gateway.
    let status = grpc_call(BILLING_TOKEN).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "skyline: forbidden");
    let line = gateway.log.wait_for("request denied").await;
    assert_eq!(line["caller"], "billing");
    assert_eq!(line["destination"], "grpc-shop");
    assert_eq!(line["rule"], "file:rule[1]");
    // A KV policy denies frontend at the bridge: PERMISSION_DENIED, from the bridge
    // (bounded: until the bridge has the policy, 10 s).
    kv_put(
        "skyline/policies/grpc-shop-callers",
        r#"{"rule":[{"from":"frontend","to":"grpc-shop","action":"deny"}]}"#,
    )
    .await;
    let mut denied = None;
    for _ in 0..400 {
        match grpc_call(FRONTEND_TOKEN).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(status) => {
                denied = Some(status);
                break;
            }
        }
    }
    let status = denied.expect("frontend's gRPC call was never denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "skyline: forbidden");
    // Earlier denials of `shop` may come first in the bridge's log (bounded: each wait is).
    let mut rules = Vec::new();
    while rules
        .last()
        .is_none_or(|r| r != "kv:grpc-shop-callers:rule[0]")
    {
        assert!(rules.len() < 40, "no gRPC denial at the bridge: {rules:?}");
        let line = bridge.log.wait_for("request denied").await;
        rules.push(line["rule"].as_str().unwrap_or("").to_owned());
        if line["destination"] == "grpc-shop" {
            assert_eq!(line["caller"], "frontend");
        }
    }
    grpc_stop.cancel();

    for process in [&a, &gateway, &bridge] {
        process.sigterm();
    }
    a.exited_cleanly().await;
    gateway.exited_cleanly().await;
    bridge.exited_cleanly().await;
    pod.stop().await;
}
