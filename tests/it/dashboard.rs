//! The web dashboard (`/ui` on the admin listener), rendered by a real headless browser
//! (Debian's `chromium`, which runs the page's script) against a registry and a gateway as
//! processes, with traffic sent by the test and a migration moved by `skyline migrate`; and
//! an agent's dashboard. The gateway's screenshot is kept as `target/artifacts/dashboard.png`.
//!
//! Without `chromium` on the machine the browser tests say so loudly and pass without
//! checking anything: `scripts/install-deps` installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

use crate::support::*;
use skyline::registry::client::RegistryClient;

const TOKEN: &str = "dashboard-test-token-4f1c";
/// A platform name that is markup: the page must show it as text and run none of it.
const HOSTILE: &str =
    r#"<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>"#;

// === chromium ===

/// The headless browser, if this machine has one.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

fn no_chromium() {
    eprintln!(
        "\n\n*** SKIPPED: no `chromium` on this machine, so the dashboard was NOT checked in a \
         browser. Run scripts/install-deps (apt-get install chromium). ***\n\n"
    );
}

/// Runs the browser headless on `url` with `what` (`--dump-dom` or `--screenshot=<file>`),
/// giving the page 5 s of (virtual) time to poll; stdout (bounded: 90 s).
async fn browse(browser: &Path, url: &str, what: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,900",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(what)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium ends in time")
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The share the rendered page shows for `service`'s `series` (`<series> 12.3 %`).
fn shown_share(dom: &str, service: &str, series: &str) -> Option<f64> {
    let marker = format!(r#"class="share" data-service="{service}" data-series="{series}">"#);
    let at = dom.find(&marker)? + marker.len();
    // The swatch, then the text.
    let rest = &dom[at..];
    let text_at = rest.find("</span>")? + "</span>".len();
    let text = &rest[text_at..];
    let text = &text[..text.find("</span>")?];
    text.strip_prefix(series)?
        .trim()
        .strip_suffix('%')?
        .trim()
        .parse()
        .ok()
}

/// The HTML of `service`'s row in the services table.
fn row<'a>(dom: &'a str, service: &str) -> &'a str {
    let marker = format!(r#"<tr data-service="{service}">"#);
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no row for {service} in:\n{dom}"));
    let rest = &dom[at..];
    &rest[..rest.find("</tr>").unwrap()]
}

/// How many times the page had polled its data (`data-polls` of the status line).
fn polls(dom: &str) -> u32 {
    let marker = r#"data-polls=""#;
    let at = dom.find(marker).expect("a status line") + marker.len();
    dom[at..].split('"').next().unwrap().parse().unwrap()
}

// === Mesh ===

/// Requests the test sent through the gateway, per service and the tier that answered.
#[derive(Debug, Default)]
struct Tally(BTreeMap<String, BTreeMap<String, u64>>);

impl Tally {
    /// Sends one request to `service` through `gateway`; it must succeed. Returns the tier.
    async fn send(&mut self, client: &Client, gateway: &str, service: &str) -> String {
        let reply = client
            .get(&format!("http://{gateway}/service/{service}/pic"))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let tier = reply.headers["x-skyline-tier"].to_str().unwrap().to_owned();
        *self
            .0
            .entry(service.to_owned())
            .or_default()
            .entry(tier.clone())
            .or_default() += 1;
        tier
    }

    fn total(&self, service: &str) -> u64 {
        self.0.get(service).map_or(0, |t| t.values().sum())
    }

    /// The share of `service`'s requests `tier` answered, percent.
    fn share(&self, service: &str, tier: &str) -> f64 {
        let n = self.0.get(service).and_then(|t| t.get(tier)).copied();
        n.unwrap_or(0) as f64 * 100.0 / self.total(service) as f64
    }
}

/// `GET /ui/data` with the admin token.
async fn data(admin: &str, token: Option<&str>) -> Reply {
    let mut req = Request::get(format!("http://{admin}/ui/data"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    Client::new()
        .send(req.body(Full::<Bytes>::default()).unwrap())
        .await
        .unwrap()
}

async fn register(registry: &str, body: serde_json::Value) {
    RegistryClient::new(registry.parse().unwrap())
        .put_json("/v1/catalog/register", &body)
        .await
        .unwrap();
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_dashboard_renders_tiers_health_traffic_shares_and_the_autopilot_step_and_shows_markup_as_text()
 {
    let Some(browser) = chromium() else {
        return no_chromium();
    };
    // A registry; giphy and tiles on Mesos node m1 (an app standing for its inbound proxy);
    // a Kubernetes tier (an app standing for the bridges); a service whose platform is markup.
    let dir = tempfile::tempdir().unwrap();
    let (_registry_process, registry) = Skyline::registry(dir.path()).await;
    let mesos = TestApp::spawn("mesos", ip("127.0.0.1"));
    let k8s = TestApp::spawn("kubernetes", ip("127.0.0.1"));
    let node = |id: &str, service: &str, platform: &str| {
        json!({
            "Node": "m1", "Address": "127.0.0.1",
            "NodeMeta": {"skyline-inbound-port": mesos.addr.port().to_string()},
            "Service": {"ID": id, "Service": service, "Port": 9, "Meta": {"platform": platform}},
        })
    };
    register(&registry, node("giphy-m1", "giphy", "mesos")).await;
    register(&registry, node("tiles-m1", "tiles", "mesos")).await;
    register(&registry, node("legacy-m1", "legacy", HOSTILE)).await;

    // The gateway, its admin listener behind a token.
    let admin = free_addr("127.0.0.1");
    let gateway = free_addr("127.0.0.1");
    let mut command = std::process::Command::new(SKYLINE);
    command
        .args([
            "gateway".to_owned(),
            format!("--listen={gateway}"),
            format!("--admin={admin}"),
            format!("--consul={registry}"),
            format!("--bridges={}", k8s.addr),
            "--hold=500ms".to_owned(),
            "--log-format=json".to_owned(),
        ])
        .env("SKYLINE_LOG", "info")
        .env("SKYLINE_ADMIN_TOKEN", TOKEN);
    let mut gateway_process = Skyline::spawn(command, &[]);
    gateway_process.log.wait_for("gateway started").await;

    // The page is open (it holds no data), with its security headers; the data is not.
    let page = Client::new().get(&format!("http://{admin}/ui")).await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert!(!page.body.contains(TOKEN));
    assert_eq!(data(&admin, None).await.status, 401);
    assert_eq!(data(&admin, Some("not-the-token")).await.status, 401);

    // Traffic: tiles and giphy all on Mesos (waiting for the first catalog on the way).
    let client = Client::new();
    let mut tally = Tally::default();
    for service in ["tiles", "giphy"] {
        let mut on_mesos = 0;
        for _ in 0..40 {
            if tally.send(&client, &gateway, service).await == "mesos" {
                on_mesos += 1;
            }
        }
        assert_eq!(on_mesos, 40, "{tally:?}");
    }

    // The autopilot moves giphy to 50% on Kubernetes and holds there (the step needs more
    // requests than the test sends to advance).
    let driver = tokio::process::Command::new(SKYLINE)
        .args([
            "migrate",
            "giphy",
            "--to=kubernetes",
            "--steps=50,100",
            "--step-time=60s",
            "--min-requests=100000",
            // Loopback latencies on a shared machine are noise; this test is about the view.
            "--max-p99-ratio=1000",
        ])
        .arg(format!("--registry={registry}"))
        .env("SKYLINE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut moved = false;
    for _ in 0..400 {
        if tally.send(&client, &gateway, "giphy").await == "kubernetes" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(moved, "the split never sent giphy to kubernetes: {tally:?}");
    // The gateway reports the migration's answers from when it first saw the migration: once
    // its first report is there, every request counts in the next ones.
    let giphy_migration = |data: &serde_json::Value| {
        data["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["service"] == "giphy")
            .cloned()
            .unwrap_or_default()
    };
    let mut reported = false;
    for _ in 0..100 {
        let now = data(&admin, Some(TOKEN)).await.json();
        if giphy_migration(&now)["live"]["gateways"] == 1 {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reported, "the gateway never reported the migration");
    let mut reported = Tally::default();
    for _ in 0..100 {
        let tier = tally.send(&client, &gateway, "giphy").await;
        *reported
            .0
            .entry("giphy".into())
            .or_default()
            .entry(tier)
            .or_default() += 1;
    }
    println!("sent: {tally:?}; since the gateway's first report: {reported:?}");
    let live_answers = |data: &serde_json::Value, tier: &str| {
        giphy_migration(data)["live"]["tiers"][tier]["answers"].as_u64()
    };
    let expected = |tier: &str| reported.0["giphy"].get(tier).copied();

    // The data agrees with what was sent before a browser looks at it (bounded: 10 s).
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let reply = data(&admin, Some(TOKEN)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        last = reply.json();
        let requests = |name: &str| {
            last["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .map(|s| s["requests"].as_u64().unwrap())
        };
        if live_answers(&last, "kubernetes") == expected("kubernetes")
            && live_answers(&last, "mesos") == expected("mesos")
            && requests("giphy") == Some(tally.total("giphy"))
            && requests("tiles") == Some(tally.total("tiles"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let migration = giphy_migration(&last);
    assert_eq!(migration["state"], "running", "{migration}");
    assert_eq!(migration["share"], 50, "{migration}");
    assert_eq!(
        live_answers(&last, "kubernetes"),
        expected("kubernetes"),
        "{migration}"
    );
    let kubernetes_answers = expected("kubernetes").unwrap();
    assert!(kubernetes_answers > 0, "{reported:?}");

    // The browser, with the token in the URL's fragment (never sent to the server).
    let url = format!("http://{admin}/ui#token={TOKEN}");
    let dom = browse(&browser, &url, "--dump-dom").await;
    assert!(
        polls(&dom) >= 2,
        "the page polled only {} times",
        polls(&dom)
    );
    assert!(dom.contains(r#"<span id="role">gateway</span>"#), "{dom}");

    // Every service, its tiers (the chosen one marked), health and platforms.
    let tiles = row(&dom, "tiles");
    assert!(tiles.contains(r#"<td class="name">tiles</td>"#), "{tiles}");
    assert!(
        tiles.contains(r#"<span class="tier chosen">mesos: 1/1</span>"#),
        "{tiles}"
    );
    assert!(
        tiles.contains(r#"<span class="passing">1 passing</span>"#),
        "{tiles}"
    );
    assert!(
        tiles.contains(r#"<span class="platform">mesos</span>"#),
        "{tiles}"
    );
    let giphy = row(&dom, "giphy");
    // Under a 50/50 split both tiers take requests.
    assert!(
        giphy.contains(r#"<span class="tier chosen">mesos: 1/1</span>"#)
            && giphy.contains(r#"<span class="tier chosen">kubernetes: 1/1</span>"#),
        "{giphy}"
    );

    // The shares are those of the traffic sent: tiles all on Mesos, giphy split as answered.
    assert_eq!(shown_share(&dom, "tiles", "mesos"), Some(100.0), "{tiles}");
    assert_eq!(shown_share(&dom, "tiles", "kubernetes"), None, "{tiles}");
    for tier in ["mesos", "kubernetes"] {
        let shown = shown_share(&dom, "giphy", tier)
            .unwrap_or_else(|| panic!("no share of {tier} for giphy in {giphy}"));
        let sent = tally.share("giphy", tier);
        assert!(
            (shown - sent).abs() <= 0.051,
            "giphy on {tier}: shown {shown} %, sent {sent:.2} % ({tally:?})"
        );
    }
    let total = format!(r#"<td class="requests">{}</td>"#, tally.total("giphy"));
    assert!(giphy.contains(&total), "{giphy}");

    // The autopilot panel: giphy at step 1 of 2, 50% to Kubernetes, running, with its guards.
    let panel_at = dom
        .find(r#"<div class="migration" data-service="giphy">"#)
        .unwrap_or_else(|| panic!("no autopilot panel in:\n{dom}"));
    let panel = &dom[panel_at..];
    for text in [
        "giphy: mesos → kubernetes",
        r#"<span class="state running">running</span>"#,
        r#"<span class="step current">50%</span>"#,
        "<dd>step 1/2</dd>",
        "<dt>share to kubernetes</dt><dd>50%</dd>",
        "judged after 100000 requests",
        "<dt>live, since the migration started (1 gateway)</dt>",
    ] {
        assert!(panel.contains(text), "no {text:?} in the panel:\n{panel}");
    }

    // The guards' live readings: Kubernetes answered, none failed.
    let live = &panel[panel.find("<dt>live, since").unwrap()..];
    let kubernetes = &live[live.find("<dt>kubernetes</dt><dd>").expect(live)..];
    let answered = format!("<dd>{kubernetes_answers} answers, 0 failed (0.0 %)");
    assert!(
        kubernetes.starts_with(&format!("<dt>kubernetes</dt>{answered}")),
        "{kubernetes}"
    );

    // Markup in the catalog is shown as text: no element was made of it, nothing ran.
    let legacy = row(&dom, "legacy");
    assert!(
        legacy.contains(
            r#"<span class="platform">&lt;img src=x onerror="document.title='pwned'"&gt;&lt;script&gt;document.title='pwned'&lt;/script&gt;</span>"#
        ),
        "{legacy}"
    );
    assert!(!dom.contains("<img") && !dom.contains("pwned</"), "{dom}");
    assert!(
        dom.contains("<title>Skyline</title>"),
        "a script ran: {dom}"
    );

    // The screenshot, kept as an artifact.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    browse(&browser, &url, &format!("--screenshot={}", png.display())).await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 900));
    // A blank page of that size compresses to a few kilobytes; the dashboard does not.
    assert!(bytes.len() > 20_000, "{} bytes only", bytes.len());
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());

    drop(driver);
    gateway_process.sigterm();
    gateway_process.exited_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_dashboard_shows_each_service_with_its_requests_per_listener() {
    let b = TestApp::spawn("b", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &b))
        .spawn()
        .await;
    let client = Client::new();
    let url = format!("http://{}/service/web/x", mesh.outbound("a"));
    for _ in 0..25 {
        assert_eq!(client.get(&url).await.status, 200);
    }
    let (a, b_admin) = (mesh.admin("a"), mesh.admin("b"));
    let page = client.get(&format!("http://{a}/ui/")).await;
    assert_eq!(page.status, 200);
    assert!(page.headers.contains_key("content-security-policy"));
    let script = client.get(&format!("http://{a}/ui/app.js")).await;
    assert_eq!(
        script.headers["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(script.headers["x-content-type-options"], "nosniff");

    // Node a sent web's requests out, node b took them in: 100% each, and 25 requests.
    for (admin, listener) in [(a, "outbound"), (b_admin, "inbound")] {
        let data = data(&admin.to_string(), None).await.json();
        assert_eq!(data["role"], "agent");
        assert_eq!(data["traffic_by"], "listener");
        let web = data["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "web")
            .unwrap_or_else(|| panic!("no web in {data}"))
            .clone();
        assert_eq!(web["requests"], 25, "{web}");
        assert_eq!(web["traffic"][0]["name"], listener, "{web}");
        assert_eq!(web["traffic"][0]["share"], 100.0, "{web}");
        assert_eq!(web["health"]["passing"], 1, "{web}");
        assert_eq!(web["tiers"][0]["name"], "nodes", "{web}");
        assert_eq!(web["tiers"][0]["passing"], 1, "{web}");
    }

    let Some(browser) = chromium() else {
        mesh.stop().await;
        return no_chromium();
    };
    let dom = browse(&browser, &format!("http://{a}/ui"), "--dump-dom").await;
    assert!(polls(&dom) >= 1, "{dom}");
    assert!(dom.contains(r#"<span id="role">agent</span>"#), "{dom}");
    let web = row(&dom, "web");
    assert_eq!(shown_share(&dom, "web", "outbound"), Some(100.0), "{web}");
    assert!(web.contains(r#"<td class="requests">25</td>"#), "{web}");
    assert!(
        web.contains(r#"<span class="tier chosen">nodes: 1/1</span>"#),
        "{web}"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_serves_the_dashboard_with_the_catalogs_services() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry_process, registry) = Skyline::registry(dir.path()).await;
    register(
        &registry,
        json!({"Node": "n1", "Address": "127.0.0.1",
               "Service": {"Service": "web", "ID": "web-1", "Port": 8080,
                           "Meta": {"platform": "mesos"}}}),
    )
    .await;
    let admin = free_addr("127.0.0.1");
    let _bridge = Skyline::start(
        &[
            "bridge",
            &format!("--consul={registry}"),
            "--listen=127.0.0.1:0",
            &format!("--admin={admin}"),
        ],
        &[],
    );
    until_ok(&format!("http://{admin}/healthz")).await;
    let page = Client::new().get(&format!("http://{admin}/ui")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("app.js"), "{}", page.body);
    let body = data(&admin, None).await;
    assert_eq!(body.status, 200, "{}", body.body);
    let json = body.json();
    assert_eq!(json["role"], "bridge", "{json:#}");
    let web = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap_or_else(|| panic!("web not in {json:#}"));
    assert_eq!(web["platforms"], json!(["mesos"]), "{json:#}");
}
