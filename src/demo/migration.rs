//! `skyline demo migration`: the seed's Mesos → Kubernetes migration on one machine, narrated.
//!
//! The nodes — a registry and gateway node, two Mesos nodes with agents, a Kubernetes node with
//! a bridge, Kubernetes pods and a cluster DNS — run on one of two [`Site`]s:
//!
//! - [`netns`]: a network namespace per node, on a private subnet, when running as root with
//!   `ip` and dnsmasq at hand. Every part is a real process: `skyline registry|gateway|bridge|
//!   agent`, the applications and the load as `skyline demo app|load|call` ([`child`]), dnsmasq
//!   as the cluster DNS. Everything is torn down at the end, on Ctrl-C and on panics. The mesh's
//!   parts are started by [`mesh`], which the end-to-end migration test uses too.
//! - [`loopback`]: everything in this process on loopback addresses (127.0.0.x), with a tiny
//!   cluster DNS; for everyone else.
//!
//! `--mode auto` (the default) takes namespaces when it can and says why when it cannot;
//! `--mode netns` fails with the reason instead of falling back.
//!
//! The narration is the same on both: a load of [`RATE`] requests a second goes from Mesos node
//! m1 to `/service/giphy/media` while the steps run, and one line a second shows the share of
//! traffic per platform. The demo ends by itself after the steps.

pub mod child;
mod loopback;
pub mod mesh;
mod netns;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::cli::migrate::{DriveArgs, MigrateArgs, MigrateError};
use crate::proxy::{Body, full};
use crate::registry::INBOUND_PORT_META;
use crate::registry::client::RegistryClient;
use crate::serve::{Conn, Handler};

/// Requests a second from the Mesos node to giphy while the demo runs.
pub const RATE: u64 = 200;
/// The fail-back hold of the demo's gateway and agents.
pub const HOLD: Duration = Duration::from_secs(3);
/// How long one request of the load, or the Kubernetes pod's call, may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// The demonstration to run [default: migration]
    #[command(subcommand)]
    pub which: Option<Which>,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum Which {
    /// Move giphy from Mesos to Kubernetes and back under load
    Migration(MigrationArgs),
    /// An application of the demo, run in a node's namespace
    #[command(hide = true)]
    App(child::AppArgs),
    /// The demo's load, run in Mesos node m1's namespace
    #[command(hide = true)]
    Load(child::LoadArgs),
    /// A Kubernetes pod's call by cluster DNS name, run in a pod's namespace
    #[command(hide = true)]
    Call(child::CallArgs),
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct MigrationArgs {
    /// Where the nodes run: netns (a network namespace per node, each part a process; needs
    /// root, `ip` and dnsmasq), loopback (this process, on 127.0.0.x), or auto (netns when
    /// possible, else loopback)
    #[arg(long, value_enum, env = "SKYLINE_DEMO_MODE", default_value_t = Mode::Auto)]
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[default]
    Auto,
    Netns,
    Loopback,
}

#[derive(Debug, thiserror::Error)]
#[error("the demo could not {step}: {reason}")]
pub struct DemoError {
    step: &'static str,
    reason: String,
}

fn fail(step: &'static str) -> impl FnOnce(String) -> DemoError {
    move |reason| DemoError { step, reason }
}

/// Runs the demonstration `args` asks for, narrating to `out`, until its end or `shutdown`.
pub async fn run(
    args: DemoArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    match args.which {
        None => migration(MigrationArgs::default(), shutdown, out).await,
        Some(Which::Migration(args)) => migration(args, shutdown, out).await,
        Some(Which::App(args)) => child::app(args, shutdown, out).await,
        Some(Which::Load(args)) => child::load(args, shutdown).await,
        Some(Which::Call(args)) => child::call(args, out).await,
    }
}

/// Picks the site `args.mode` asks for, then narrates the migration on it.
async fn migration(
    args: MigrationArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let lab = match args.mode {
        Mode::Loopback => None,
        Mode::Netns => Some(netns::prepare().map_err(fail("run in network namespaces"))?),
        Mode::Auto => match netns::prepare() {
            Ok(lab) => Some(lab),
            Err(reason) => {
                say(
                    out,
                    &format!(
                        "Network namespaces are not available ({reason}); running on loopback addresses."
                    ),
                );
                None
            }
        },
    };
    match lab {
        Some(lab) => {
            let start = netns::Namespaces::start(lab);
            let Some(site) = until(&shutdown, start).await.transpose()? else {
                interrupted(out);
                return Ok(());
            };
            narrate(site, shutdown, out).await
        }
        None => {
            let start = loopback::Loopback::start();
            let Some(site) = until(&shutdown, start).await.transpose()? else {
                interrupted(out);
                return Ok(());
            };
            narrate(site, shutdown, out).await
        }
    }
}

/// `work`'s result, or `None` when `shutdown` comes first (`work` is then dropped, which tears
/// down whatever it started).
async fn until<T>(shutdown: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        result = work => Some(result),
        () = shutdown.cancelled() => None,
    }
}

fn interrupted(out: &mut dyn Write) {
    say(out, "Interrupted: everything the demo started is stopped.");
}

fn say(out: &mut dyn Write, text: &str) {
    let _ = writeln!(out, "\n{text}");
    let _ = out.flush();
}

// === The site ===

/// Where the demo's nodes run. The narration drives it and never knows which it is.
trait Site {
    /// Where everything runs and what calls what, for the opening lines.
    fn banner(&self) -> String;

    /// The registry, to take giphy on Mesos out of the catalog and back (scaling it to zero
    /// and up again).
    fn registry(&self) -> &RegistryClient;

    /// giphy's instance on Mesos node m2, as registered.
    fn giphy_on_mesos(&self) -> &Placement;

    /// Starts the load from Mesos node m1; each answer is added to `counts`.
    async fn start_load(&mut self, counts: Arc<Counts>) -> Result<(), DemoError>;

    /// Starts a second load from Mesos node m1, sent to the gateway itself (the traffic the
    /// gateway's split moves); each answer is added to `counts`.
    async fn start_gateway_load(&mut self, counts: Arc<Counts>) -> Result<(), DemoError>;

    /// Starts giphy on `platform` (a version that answers 500 when `broken`); returns once it
    /// listens.
    async fn start_giphy(&mut self, platform: Platform, broken: bool) -> Result<(), DemoError>;

    /// Stops giphy on `platform`: in-flight requests drain, then it exits.
    async fn stop_giphy(&mut self, platform: Platform) -> Result<(), DemoError>;

    /// A Kubernetes pod calls organization by its cluster DNS name; the answer in one line.
    async fn call_organization(&mut self) -> Result<String, DemoError>;

    /// Stops everything the site started, bounded in time.
    async fn teardown(self);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Platform {
    Mesos,
    Kubernetes,
}

/// A service instance on a node, as the demo (and the migration test) registers it in the
/// catalog.
#[derive(Clone, Debug)]
pub struct Placement {
    pub node: &'static str,
    pub node_ip: IpAddr,
    /// Where the node's inbound proxy (or the bridge, or the gateway) listens.
    pub inbound_port: u16,
    pub service: &'static str,
    pub addr: SocketAddr,
    /// `mesos`, `kubernetes` or `gateway`: the instance's `platform` meta.
    pub platform: &'static str,
}

// === impl Placement ===

impl Placement {
    /// `<service>-<node>`: one instance of a service per node.
    pub fn id(&self) -> String {
        format!("{}-{}", self.service, self.node)
    }

    pub async fn register(&self, registry: &RegistryClient) -> Result<(), DemoError> {
        let body = serde_json::json!({
            "Node": self.node,
            "Address": self.node_ip.to_string(),
            "NodeMeta": {INBOUND_PORT_META: self.inbound_port.to_string()},
            "Service": {
                "ID": self.id(), "Service": self.service,
                "Address": self.addr.ip().to_string(), "Port": self.addr.port(),
                "Meta": {"platform": self.platform},
            },
        });
        registry
            .put_json("/v1/catalog/register", &body)
            .await
            .map(drop)
            .map_err(|e| fail("register")(crate::error_chain(&e)))
    }

    pub async fn deregister(&self, registry: &RegistryClient) -> Result<(), DemoError> {
        let body = serde_json::json!({"Node": self.node, "ServiceID": self.id()});
        registry
            .put_json("/v1/catalog/deregister", &body)
            .await
            .map(drop)
            .map_err(|e| fail("deregister")(crate::error_chain(&e)))
    }
}

// === The narration ===

/// Tells the migration step by step on `site`, with the traffic share once a second.
async fn narrate<S: Site>(
    mut site: S,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let result = until(&shutdown, scenario(&mut site, out)).await;
    site.teardown().await;
    match result {
        Some(result) => result,
        None => {
            interrupted(out);
            Ok(())
        }
    }
}

async fn scenario<S: Site>(site: &mut S, out: &mut dyn Write) -> Result<(), DemoError> {
    say(out, &site.banner());
    let counts = Arc::new(Counts::default());
    site.start_load(counts.clone()).await?;
    let mut second = 0;

    say(
        out,
        "1. giphy runs on Mesos only: every request is served there.",
    );
    counts.take();
    let mut tally = Tally::default();
    tally.add("1. mesos only", wait(out, &counts, 4, &mut second).await);

    say(
        out,
        "2. giphy starts on Kubernetes; Mesos scales giphy to zero (deregistered, then stopped).\n   The gateway fails over to the Kubernetes tier at once.",
    );
    site.start_giphy(Platform::Kubernetes, false).await?;
    let mesos = site.giphy_on_mesos().clone();
    mesos.deregister(site.registry()).await?;
    say(out, "   >> scale down: giphy on Mesos deregistered");
    let step = wait(out, &counts, 2, &mut second).await;
    let (stopped, more) = tokio::join!(
        site.stop_giphy(Platform::Mesos),
        wait(out, &counts, 4, &mut second)
    );
    stopped?;
    tally.add("2. scale to zero", step.plus(more));

    say(
        out,
        &format!(
            "3. Mesos scales giphy up again: traffic falls back after the {}s hold.",
            HOLD.as_secs()
        ),
    );
    site.start_giphy(Platform::Mesos, false).await?;
    mesos.register(site.registry()).await?;
    say(out, "   >> scale up: giphy on Mesos registered again");
    let held = wait(out, &counts, HOLD.as_secs(), &mut second).await;
    say(
        out,
        "   >> hold over: Mesos has been eligible for the whole hold",
    );
    let after = wait(out, &counts, 6 - HOLD.as_secs().min(6), &mut second).await;
    tally.add("3. scale up, hold", held.plus(after));

    say(
        out,
        "4. A Kubernetes app calls http://organization.default.svc.cluster.local:8080/members;\n   the Service targets the bridge, which sends it to Mesos through the gateway.",
    );
    let answer = site.call_organization().await?;
    say(out, &format!("   -> {answer}"));

    say(
        out,
        "5. A broken giphy version on Kubernetes (answers 500) while Mesos is scaled to zero;\n   scaling Mesos up restores success.",
    );
    mesos.deregister(site.registry()).await?;
    let (replaced, broken) = tokio::join!(
        async {
            site.stop_giphy(Platform::Kubernetes).await?;
            site.start_giphy(Platform::Kubernetes, true).await
        },
        wait(out, &counts, 3, &mut second)
    );
    replaced?;
    mesos.register(site.registry()).await?;
    say(
        out,
        "   >> scale up: giphy on Mesos registered again; the failing tier is left at once",
    );
    let restored = wait(out, &counts, 5, &mut second).await;
    tally.add("5. broken kubernetes", broken);
    tally.add("5. mesos back", restored);

    say(
        out,
        &format!(
            "6. The autopilot: skyline migrate giphy --to kubernetes --steps {AUTOPILOT_STEPS} --step-time {}s.\n   It moves the gateway's split, so a second load of {RATE} requests a second now goes from m1\n   to the gateway itself (the agents keep sending m1's first load straight to Mesos), and\n   the lines below show that load. The broken version is still on Kubernetes: the autopilot\n   rolls back at once, judged by the gateway's own numbers.",
            AUTOPILOT_STEP_TIME.as_secs()
        ),
    );
    let via_gateway = Arc::new(Counts::default());
    site.start_gateway_load(via_gateway.clone()).await?;
    let registry = site.registry().clone();
    let (result, broken, direct) =
        autopilot(out, &via_gateway, &counts, &mut second, &registry, None).await;
    if result.is_ok() {
        say(
            out,
            "   (the autopilot did not roll back the broken version)",
        );
    }
    tally.add("6. autopilot, broken", broken);
    say(
        out,
        &format!(
            "   A fixed version on Kubernetes, and the autopilot again, with a shadow step first\n   ({AUTOPILOT_SHADOW}% of requests copied to Kubernetes, the answers compared and discarded)."
        ),
    );
    site.stop_giphy(Platform::Kubernetes).await?;
    site.start_giphy(Platform::Kubernetes, false).await?;
    let (result, moved, more) = autopilot(
        out,
        &via_gateway,
        &counts,
        &mut second,
        &registry,
        Some(AUTOPILOT_SHADOW),
    )
    .await;
    if let Err(e) = result {
        say(out, &format!("   (the autopilot stopped: {e})"));
    }
    tally.add("6. autopilot", moved);
    tally.add("6. m1 load, direct", direct.plus(more));

    say(
        out,
        "Done: the applications never changed a URL; the mesh moved the traffic.",
    );
    tally.print(out);
    Ok(())
}

/// Requests and failed requests of a stretch of the demo.
#[derive(Clone, Copy, Debug, Default)]
struct Stretch {
    requests: u64,
    failed: u64,
}

impl Stretch {
    fn plus(self, other: Stretch) -> Stretch {
        Stretch {
            requests: self.requests + other.requests,
            failed: self.failed + other.failed,
        }
    }
}

/// The closing tally: requests and failures per step.
#[derive(Debug, Default)]
struct Tally(Vec<(&'static str, Stretch)>);

impl Tally {
    fn add(&mut self, step: &'static str, stretch: Stretch) {
        self.0.push((step, stretch));
    }

    fn print(&self, out: &mut dyn Write) {
        let _ = writeln!(out, "  tally:");
        for (step, s) in &self.0 {
            let _ = writeln!(
                out,
                "    {step:<22} {:>6} requests {:>5} failed",
                s.requests, s.failed
            );
        }
        let _ = out.flush();
    }
}

/// Waits `seconds`, writing the traffic share per platform once a second; the requests and
/// failures of that time.
async fn wait(out: &mut dyn Write, counts: &Counts, seconds: u64, second: &mut u64) -> Stretch {
    let mut stretch = Stretch::default();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        stretch = stretch.plus(report_second(out, counts, second));
    }
    stretch
}

/// Writes the traffic share of the second that just passed; its requests and failures.
fn report_second(out: &mut dyn Write, counts: &Counts, second: &mut u64) -> Stretch {
    *second += 1;
    let (m, k, e) = counts.take();
    let total = (m + k + e).max(1);
    let _ = writeln!(
        out,
        "  [{:>2}s] mesos {:>3}%  kubernetes {:>3}%  errors {:>3}   ({} requests)",
        second,
        m * 100 / total,
        k * 100 / total,
        e,
        m + k + e
    );
    let _ = out.flush();
    Stretch {
        requests: m + k + e,
        failed: e,
    }
}

// === The autopilot ===

/// The autopilot's steps in the demo (percent to Kubernetes) and the time of each.
const AUTOPILOT_STEPS: &str = "10,50,100";
const AUTOPILOT_STEP_TIME: Duration = Duration::from_secs(2);
/// The share of requests the healthy run copies to Kubernetes in its shadow step.
const AUTOPILOT_SHADOW: u32 = 10;

/// Runs `skyline migrate giphy --to kubernetes` (in this process) against `registry`, writing
/// the traffic share of `counts` once a second and the autopilot's lines as events as they
/// come; its result, and the requests and failures of `counts` and of `direct` meanwhile.
async fn autopilot(
    out: &mut dyn Write,
    counts: &Counts,
    direct: &Counts,
    second: &mut u64,
    registry: &RegistryClient,
    shadow: Option<u32>,
) -> (Result<(), MigrateError>, Stretch, Stretch) {
    let args = MigrateArgs {
        command: None,
        drive: DriveArgs {
            service: Some("giphy".into()),
            to: Some("kubernetes".into()),
            from: None,
            registry: registry.addr(),
            token: registry.token().cloned(),
            steps: AUTOPILOT_STEPS.into(),
            step_time: format!("{}s", AUTOPILOT_STEP_TIME.as_secs()),
            max_error_rate: "1%".into(),
            // One machine shared by every node, and everything else it runs: latencies of a
            // few milliseconds vary several times over from one second to the next, so only a
            // tier ten times slower is a breach here.
            max_p99_ratio: 10.0,
            min_requests: 20,
            shadow: shadow.map(|p| format!("{p}%")),
        },
    };
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let mut sink = LineSink {
        tx,
        partial: Vec::new(),
    };
    let (mut stretch, mut others) = (Stretch::default(), Stretch::default());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let result = {
        let driver = crate::cli::migrate::run(args, CancellationToken::new(), &mut sink);
        tokio::pin!(driver);
        loop {
            tokio::select! {
                result = &mut driver => break result,
                _ = tick.tick() => {
                    stretch = stretch.plus(report_second(out, counts, second));
                    let (m, k, e) = direct.take();
                    others = others.plus(Stretch { requests: m + k + e, failed: e });
                }
                Some(line) = lines.recv() => event(out, &line),
            }
        }
    };
    drop(sink);
    while let Some(line) = lines.recv().await {
        event(out, &line);
    }
    // The answers still under way when the autopilot ended (a rollback's last failures)
    // belong to this run.
    tick.tick().await;
    stretch = stretch.plus(report_second(out, counts, second));
    let (m, k, e) = direct.take();
    others = others.plus(Stretch {
        requests: m + k + e,
        failed: e,
    });
    if let Err(e) = &result {
        if !matches!(e, MigrateError::RolledBack { .. }) {
            let _ = writeln!(out, "   >> autopilot failed: {e}");
        }
    }
    (result, stretch, others)
}

/// One line of the autopilot, marked as an event.
fn event(out: &mut dyn Write, line: &str) {
    let line = line.trim();
    let _ = match line.strip_prefix("ROLLBACK ") {
        Some(reason) => writeln!(out, "   >> rollback {reason}"),
        None => writeln!(out, "   >> autopilot: {line}"),
    };
    let _ = out.flush();
}

/// A writer that hands each complete line to a channel.
struct LineSink {
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    partial: Vec<u8>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let _ = self
                .tx
                .send(String::from_utf8_lossy(&line[..i]).into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === The applications ===

/// An application that says which platform serves it.
#[derive(Clone, Debug)]
struct App {
    text: Arc<str>,
    broken: bool,
}

impl Handler for App {
    type Body = Body;

    async fn handle(&self, _req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let mut response = Response::new(full(self.text.to_string()));
        if self.broken {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        response
    }
}

/// The text giphy answers on `platform`.
fn giphy_text(platform: Platform, broken: bool) -> &'static str {
    match (platform, broken) {
        (Platform::Mesos, _) => "mesos giphy",
        (Platform::Kubernetes, false) => "kubernetes giphy",
        (Platform::Kubernetes, true) => "kubernetes giphy (broken)",
    }
}

const ORGANIZATION_TEXT: &str = "mesos organization";

// === The load ===

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// What one request of the load got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Mesos,
    Kubernetes,
    /// Anything but a 200 from one of the platforms: a mesh error, a 500, no answer in time.
    Failed,
}

// === impl Outcome ===

impl Outcome {
    /// The word a load process prints for it, one line per answer.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Mesos => "mesos",
            Outcome::Kubernetes => "kubernetes",
            Outcome::Failed => "failed",
        }
    }

    /// Reads back [`Outcome::word`]; anything else is a failure.
    pub fn from_word(word: &str) -> Self {
        match word.trim() {
            "mesos" => Outcome::Mesos,
            "kubernetes" => Outcome::Kubernetes,
            _ => Outcome::Failed,
        }
    }

    fn of(status: StatusCode, body: &[u8]) -> Self {
        match status {
            StatusCode::OK if body.starts_with(b"mesos") => Outcome::Mesos,
            StatusCode::OK if body.starts_with(b"kubernetes") => Outcome::Kubernetes,
            _ => Outcome::Failed,
        }
    }
}

/// Counts of the load's answers by platform since the last report.
#[derive(Debug, Default)]
pub struct Counts {
    mesos: AtomicU64,
    kubernetes: AtomicU64,
    failed: AtomicU64,
}

// === impl Counts ===

impl Counts {
    pub fn add(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Mesos => &self.mesos,
            Outcome::Kubernetes => &self.kubernetes,
            Outcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> (u64, u64, u64) {
        (
            self.mesos.swap(0, Ordering::Relaxed),
            self.kubernetes.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
        )
    }
}

/// `rate` requests a second to `url` until `stop`, each answer given to `record`. At most 128
/// are in flight; a request that would exceed that counts as failed.
async fn load(
    url: String,
    rate: u64,
    record: impl Fn(Outcome) + Clone + Send + 'static,
    stop: CancellationToken,
) {
    let client = http_client();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(128));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            record(Outcome::Failed);
            continue;
        };
        let Ok(req) = Request::get(url.as_str()).body(Full::default()) else {
            return;
        };
        let (client, record) = (client.clone(), record.clone());
        tokio::spawn(async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let resp = client.request(req).await.ok()?;
                let status = resp.status();
                let body = resp.into_body().collect().await.ok()?.to_bytes();
                Some(Outcome::of(status, &body))
            })
            .await;
            record(answer.ok().flatten().unwrap_or(Outcome::Failed));
            drop(permit);
        });
    }
}

/// `GET path` sent to `target` with `Host: host`, as a pod's HTTP client sends it after
/// resolving `host`; the answer in one line, `200 OK: mesos organization`.
async fn ask(client: &HttpClient, target: SocketAddr, host: &str, path: &str) -> String {
    let req = match Request::get(format!("http://{target}{path}"))
        .header(http::header::HOST, host)
        .body(Full::default())
    {
        Ok(req) => req,
        Err(e) => return format!("failed: {e}"),
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))
    })
    .await;
    match answer {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => format!("failed: no answer within {}s", REQUEST_TIMEOUT.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_process_line_reads_back_as_its_outcome() {
        for outcome in [Outcome::Mesos, Outcome::Kubernetes, Outcome::Failed] {
            assert_eq!(Outcome::from_word(outcome.word()), outcome);
        }
        assert_eq!(Outcome::from_word("garbage"), Outcome::Failed);
    }

    #[test]
    fn only_a_200_from_a_platform_counts_as_served() {
        assert_eq!(Outcome::of(StatusCode::OK, b"mesos giphy"), Outcome::Mesos);
        assert_eq!(
            Outcome::of(StatusCode::OK, b"kubernetes giphy"),
            Outcome::Kubernetes
        );
        assert_eq!(
            Outcome::of(
                StatusCode::INTERNAL_SERVER_ERROR,
                b"kubernetes giphy (broken)"
            ),
            Outcome::Failed
        );
        assert_eq!(
            Outcome::of(
                StatusCode::SERVICE_UNAVAILABLE,
                b"{\"error\":\"no-healthy-endpoint\"}"
            ),
            Outcome::Failed
        );
    }
}
