//! Configuration reload on SIGHUP: the file is read and validated again; what can change
//! without a restart (the resilience policies) is swapped in at once, for the next requests;
//! an invalid file is refused and the running configuration kept. Open connections and
//! in-flight requests are never touched.

use tokio_util::sync::CancellationToken;

use super::Settings;
use crate::config::{AgentArgs, ConfigError};
use crate::proxy::resilience::SharedPolicies;

/// What one reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// New policies are in force.
    Applied,
    /// The file gives the policies already in force.
    Unchanged,
}

/// Reloads on every SIGHUP until `shutdown`.
pub async fn on_sighup(
    args: AgentArgs,
    running: Settings,
    policies: SharedPolicies,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; configuration reload is off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match reload(&args, &running, &policies) {
            Ok(outcome) => tracing::info!(?outcome, "configuration reloaded"),
            Err(error) => {
                tracing::error!(%error, "configuration reload refused; the running configuration stays")
            }
        }
    }
}

/// Reads the configuration again and applies its policies, or refuses it whole.
pub fn reload(
    args: &AgentArgs,
    running: &Settings,
    policies: &SharedPolicies,
) -> Result<Reloaded, ConfigError> {
    let next = args.clone().resolve()?;
    let fixed = Settings {
        resilience: running.resilience.clone(),
        ..next.clone()
    };
    if &fixed != running {
        tracing::warn!(
            "the configuration changes settings that need a restart (node, listeners, catalog, \
             proxy, services); they take effect at the next start"
        );
    }
    if **policies.load() == next.resilience {
        return Ok(Reloaded::Unchanged);
    }
    policies.store(std::sync::Arc::new(next.resilience));
    Ok(Reloaded::Applied)
}
