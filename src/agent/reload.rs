//! Configuration reload on SIGHUP: the file is read and validated again; what can change
//! without a restart is applied at once: the resilience policies (for the next requests) and
//! the authorization policies and callers (`[authz]`), the declared `[[service]]`s (new ones registered with their checks, removed ones
//! deregistered, in whichever catalog the agent registers in). An invalid file is refused and
//! the running configuration kept. Open connections and in-flight requests are never touched.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Settings;
use super::config::AgentArgs;
use crate::config::ConfigError;
use crate::proxy::resilience::SharedPolicies;
use crate::registration::Declared;

/// What one reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// New policies or services are in force.
    Applied,
    /// The file gives the policies and services already in force.
    Unchanged,
}

/// Reloads on every SIGHUP until `shutdown`.
pub async fn on_sighup(
    args: AgentArgs,
    running: Settings,
    policies: SharedPolicies,
    declared: Arc<watch::Sender<Vec<Declared>>>,
    authz: crate::authz::Authz,
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
        match reload(&args, &running, &policies, &declared, &authz) {
            Ok(outcome) => tracing::info!(?outcome, "configuration reloaded"),
            Err(error) => {
                tracing::error!(%error, "configuration reload refused; the running configuration stays")
            }
        }
    }
}

/// Reads the configuration again and applies its policies and services, or refuses it whole.
pub fn reload(
    args: &AgentArgs,
    running: &Settings,
    policies: &SharedPolicies,
    declared: &watch::Sender<Vec<Declared>>,
    authz: &crate::authz::Authz,
) -> Result<Reloaded, ConfigError> {
    let next = args.clone().resolve()?;
    let fixed = Settings {
        resilience: running.resilience.clone(),
        services: running.services.clone(),
        authz: running.authz.clone(),
        ..next.clone()
    };
    if &fixed != running {
        tracing::warn!(
            "the configuration changes settings that need a restart (node, listeners, catalog, \
             proxy); they take effect at the next start"
        );
    }
    let services = declared.send_if_modified(|now| {
        let changed = *now != next.services;
        if changed {
            tracing::info!(
                before = now.len(),
                after = next.services.len(),
                "declared services reloaded"
            );
            now.clone_from(&next.services);
        }
        changed
    });
    let policies = if **policies.load() == next.resilience {
        false
    } else {
        policies.store(Arc::new(next.resilience));
        true
    };
    let rules = if authz.file_is(&next.authz) {
        false
    } else {
        tracing::info!(
            rules = next.authz.policy.rules.len(),
            "authorization policies reloaded"
        );
        authz.set_file(next.authz);
        true
    };
    Ok(if services || policies || rules {
        Reloaded::Applied
    } else {
        Reloaded::Unchanged
    })
}
