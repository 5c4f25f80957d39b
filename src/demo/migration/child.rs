//! The parts that `skyline demo migration` runs as processes in the nodes' namespaces, as
//! hidden subcommands of `skyline demo`: an application (`app`), the load from a Mesos node
//! (`load`) and a Kubernetes pod's call by cluster DNS name (`call`).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{App, DemoError, Outcome, RATE, fail};
use crate::serve;

/// The line an application prints once it listens.
pub const READY: &str = "READY";

#[derive(clap::Args, Clone, Debug)]
pub struct AppArgs {
    /// Where to listen
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// What to answer every request with
    #[arg(long)]
    pub text: String,
    /// Answer with status 500 (a broken version)
    #[arg(long)]
    pub broken: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// The URL to call
    #[arg(long)]
    pub url: String,
    /// Requests a second
    #[arg(long, default_value_t = RATE)]
    pub rate: u64,
    /// Stop after this many seconds at most; the load also stops when its stdin closes (the
    /// demo stopped or died)
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub max_seconds: u64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct CallArgs {
    /// The URL to call, its host a cluster DNS name
    #[arg(long)]
    pub url: http::Uri,
    /// The cluster DNS server that resolves it
    #[arg(long, value_name = "ADDR")]
    pub dns: SocketAddr,
}

/// Serves `text` at `listen` until `shutdown`, then drains; prints [`READY`] once it listens.
pub async fn app(
    args: AppArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let listener = serve::bind(args.listen)
        .map_err(|e| fail("start the application")(format!("{}: {e}", args.listen)))?;
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
    let app = App {
        text: args.text.into(),
        broken: args.broken,
    };
    serve::serve(listener, app, shutdown).await;
    Ok(())
}

/// The load: one line per answer on stdout, [`Outcome::word`], until stdin closes, `shutdown`
/// or `max_seconds`.
pub async fn load(args: LoadArgs, shutdown: CancellationToken) -> Result<(), DemoError> {
    let stop = shutdown.child_token();
    let on_eof = stop.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        while stdin.read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
        on_eof.cancel();
    });
    let stdout = Arc::new(std::io::stdout());
    let record = move |outcome: Outcome| {
        let _ = writeln!(stdout.lock(), "{}", outcome.word());
    };
    let max = Duration::from_secs(args.max_seconds);
    let _ = tokio::time::timeout(max, super::load(args.url, args.rate, record, stop)).await;
    Ok(())
}

/// Resolves the URL's host through `dns`, as a pod would, and calls it; prints the answer in
/// one line.
pub async fn call(args: CallArgs, out: &mut dyn Write) -> Result<(), DemoError> {
    let host = args
        .url
        .host()
        .ok_or_else(|| fail("call")(format!("{} has no host", args.url)))?;
    let port = args.url.port_u16().unwrap_or(80);
    let resolver = crate::bridge::resolver(args.dns).map_err(fail("resolve"))?;
    let lookup = tokio::time::timeout(
        Duration::from_secs(10),
        resolver.lookup_ip(format!("{host}.").as_str()),
    )
    .await
    .map_err(|_| fail("resolve")(format!("{host}: no answer from {}", args.dns)))?
    .map_err(|e| fail("resolve")(format!("{host}: {e}")))?;
    let ip = lookup
        .iter()
        .next()
        .ok_or_else(|| fail("resolve")(format!("{host}: no address")))?;
    let client = super::http_client();
    let answer = super::ask(
        &client,
        SocketAddr::new(ip, port),
        &format!("{host}:{port}"),
        args.url.path(),
    )
    .await;
    let _ = writeln!(out, "{answer}");
    let _ = out.flush();
    Ok(())
}
