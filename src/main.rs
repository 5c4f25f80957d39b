//! The `skyline` binary: arguments → settings → tracing → the role's `run`.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use skyline::agent::Listeners;
use skyline::agent::config::AgentArgs;
use skyline::bridge::config::BridgeArgs;
use skyline::config::RegistryArgs;
use skyline::demo::migration::DemoArgs;
use skyline::gateway::config::GatewayArgs;
use skyline::serve::activation::Inherited;
use skyline::up::UpArgs;

/// `skyline --version`: the commit and the build date come from `build.rs`.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SKYLINE_COMMIT"),
    ", built ",
    env!("SKYLINE_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "skyline",
    version = VERSION,
    about = "A service mesh in one small binary"
)]
struct Cli {
    /// Log format: human on a terminal, json for machines
    #[arg(
        long,
        global = true,
        env = "SKYLINE_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node proxy: outbound (:5040) and inbound (:5041)
    Agent(AgentArgs),
    /// Run the embedded, Consul-compatible registry on its own (:8500)
    Registry(RegistryArgs),
    /// Start a whole mesh on this machine with two demo services, hello and echo
    Up(UpArgs),
    /// Run the service discovery bridge (SDB): per-service tiers, Mesos first, then Kubernetes
    Gateway(GatewayArgs),
    /// Run on a Kubernetes node: Skyline URLs <-> cluster DNS names
    Bridge(BridgeArgs),
    /// Demonstrations; `skyline demo migration` moves a service from Mesos to Kubernetes and back
    Demo(DemoArgs),
    /// List services, their instances and health
    Services(skyline::cli::ServicesArgs),
    /// Register a service instance in the registry
    Register(skyline::cli::RegisterArgs),
    /// Remove a service instance from the registry
    Deregister(skyline::cli::DeregisterArgs),
    /// Check a config file, print an example one, or the reference of every setting
    Config(skyline::cli::config::ConfigArgs),
    /// Print shell completions, such as `skyline completions bash`
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the man page skyline(1), or write it and one page per command into a folder
    Man {
        /// Write skyline.1, skyline-agent.1, ... into this folder instead
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Kubernetes: `skyline k8s services` prints the Services that stand for Mesos services
    K8s(skyline::cli::kubernetes::K8sArgs),
    /// Explain where a request to a URL would go, and why, asking the local agent (or a gateway
    /// or bridge with --admin)
    Explain(skyline::cli::explain::ExplainArgs),
    /// Print the route table the local agent routes with now
    Routes(skyline::cli::routes::RoutesArgs),
    /// Show how far every agent, gateway and bridge has converged on the registry's catalog
    Status(skyline::cli::status::StatusArgs),
    /// Keep a Prometheus file_sd_configs file of every role's admin listener (/metrics)
    /// current from the catalog
    PrometheusTargets(skyline::cli::prometheus::PrometheusTargetsArgs),
    /// Move a service to another tier step by step, guarded: `skyline migrate giphy --to
    /// kubernetes`; also `skyline migrate status|pause|resume|rollback <service>`
    Migrate(skyline::cli::migrate::MigrateArgs),
    /// The mesh CA: create it, issue proxy certificates (mTLS between the proxies)
    Ca(skyline::cli::ca::CaArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man(dir.as_deref()),
        _ => {}
    }
    if let Command::Ca(args) = cli.command {
        return match skyline::cli::ca::run(args, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&skyline::error_chain(&e)),
        };
    }
    if let Command::Config(args) = cli.command {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        return skyline::cli::config::run(args, &Cli::command(), &mut out, &mut err);
    }
    init_tracing(cli.log_format);
    // Before any thread starts: taking the sockets edits the environment.
    let inherited = match Inherited::from_env() {
        Ok(inherited) => inherited,
        Err(e) => return fail(&e),
    };
    let workers = match &cli.command {
        Command::Agent(args) => match args.clone().resolve() {
            Ok(settings) => settings.workers,
            Err(e) => return fail(&e),
        },
        _ => 1,
    };
    // One worker: a current-thread runtime, like an NGINX worker, with no cross-thread wake-ups.
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // Installed before anything is started, so a signal at any moment stops cleanly.
        tokio::spawn(stop_on_signal(Signals::install()?, shutdown.clone()));
        match cli.command {
            Command::Agent(args) => {
                let settings = args.clone().resolve()?;
                let mut inherited = inherited;
                let listeners = Listeners::open(&settings, &mut inherited)?;
                inherited.finish(&skyline::agent::LISTENER_NAMES)?;
                let agent =
                    skyline::agent::start(settings.clone(), listeners, shutdown.clone()).await?;
                let reload = skyline::agent::reload::on_sighup(
                    args,
                    settings,
                    agent.policies.clone(),
                    agent.declared.clone(),
                    agent.authz.clone(),
                    shutdown,
                );
                tokio::spawn(reload);
                agent.join().await;
            }
            Command::Gateway(args) => {
                let gateway =
                    skyline::gateway::spawn_on(args.resolve()?, inherited, shutdown).await?;
                gateway.join().await;
            }
            Command::Bridge(args) => {
                let bridge =
                    skyline::bridge::spawn_on(args.resolve()?, inherited, shutdown).await?;
                bridge.join().await;
            }
            Command::Registry(args) if args.repair => {
                inherited.finish(&[])?;
                let repair = skyline::registry::store::Store::repair(&args.data_dir)?;
                println!(
                    "kept {} records; dropped {} damaged byte ranges {:?}{}",
                    repair.kept,
                    repair.dropped.len(),
                    repair.dropped,
                    repair.damaged.map_or_else(String::new, |p| format!(
                        "; the damaged log is kept as {}",
                        p.display()
                    ))
                );
            }
            Command::Registry(args) => {
                let token = args.token()?;
                let mut inherited = inherited;
                let listener = skyline::role::listen_at(&mut inherited, "registry", args.listen)?;
                inherited.finish(&["registry"])?;
                let config = skyline::registry::RegistryConfig {
                    data_dir: args.data_dir,
                    node_name: args.node_name,
                    node_address: args.node_address,
                    token,
                };
                let registry = skyline::registry::spawn(listener, config, shutdown).await?;
                registry.join().await;
            }
            // The other commands take no inherited sockets: passing some is a mistake.
            other => {
                inherited.finish(&[])?;
                run_tool(other, shutdown).await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The commands that are not long-running roles behind a supervisor.
async fn run_tool(command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => skyline::up::run(args, shutdown, &mut std::io::stdout()).await?,
        Command::Demo(args) => {
            skyline::demo::migration::run(args, shutdown, &mut std::io::stdout()).await?
        }
        Command::Services(args) => skyline::cli::services(args, &mut std::io::stdout()).await?,
        Command::Register(args) => skyline::cli::register(args, &mut std::io::stdout()).await?,
        Command::Deregister(args) => skyline::cli::deregister(args, &mut std::io::stdout()).await?,
        Command::Explain(args) => skyline::cli::explain::run(&args, &mut std::io::stdout()).await?,
        Command::Routes(args) => skyline::cli::routes::run(&args, &mut std::io::stdout()).await?,
        Command::Status(args) => skyline::cli::status::run(&args, &mut std::io::stdout()).await?,
        Command::PrometheusTargets(args) => {
            skyline::cli::prometheus::run(&args, shutdown, &mut std::io::stdout()).await?
        }
        Command::K8s(args) => {
            let (mut out, mut notes) = (std::io::stdout(), std::io::stderr());
            skyline::cli::kubernetes::run(args, &mut out, &mut notes).await?
        }
        Command::Migrate(args) => {
            let mut out = std::io::stdout();
            skyline::cli::migrate::run(args, shutdown, &mut out).await?
        }
        Command::Agent(_)
        | Command::Gateway(_)
        | Command::Bridge(_)
        | Command::Registry(_)
        | Command::Config(_)
        | Command::Ca(_)
        | Command::Completions { .. }
        | Command::Man { .. } => {}
    }
    Ok(())
}

/// `skyline completions <shell>`: generated from the same definition as `--help`.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "skyline",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

/// `skyline man`: skyline(1) on stdout, or every page (skyline-agent(1), ...) into `dir`.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let written = match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("skyline: {error:#}");
    ExitCode::from(2)
}

/// SIGINT (Ctrl-C) and SIGTERM, listened for from the moment they are installed.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM; in-flight requests then drain.
async fn stop_on_signal(mut signals: Signals, shutdown: CancellationToken) {
    tokio::select! {
        _ = signals.interrupt.recv() => {}
        _ = signals.terminate.recv() => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
    shutdown.cancel();
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SKYLINE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log file or a journal gets plain text.
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    // The access log writes its lines itself (off the request path), in the same format.
    skyline::access::set_format(match format {
        LogFormat::Human => skyline::access::Format::Human,
        LogFormat::Json => skyline::access::Format::Json,
    });
}
