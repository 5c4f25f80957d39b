//! `skyline prometheus-targets`: keeps a Prometheus `file_sd_configs` file current from the
//! catalog's `skyline-admin` instances (every agent's, gateway's and bridge's admin listener,
//! registered by the role itself), for Prometheus builds without Consul discovery (Debian's).
//!
//! It follows the catalog with blocking queries (`?index=&wait=`, as Consul's own clients do)
//! and rewrites the file only when the targets changed, atomically (a temporary file renamed
//! over it), so Prometheus never reads half a file. `--once` writes it once and exits.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::config::DEFAULT_REGISTRY;
use crate::contract::ADMIN_SERVICE;
use crate::registry::client::RegistryClient;

/// How long one blocking query waits for a change.
pub const WAIT: &str = "30s";
/// The longest wait between attempts while the registry is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keep a Prometheus file_sd_configs file of every role's admin listener current.
#[derive(clap::Args, Clone, Debug)]
pub struct PrometheusTargetsArgs {
    /// The registry (or Consul agent) to follow
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    /// The file_sd_configs JSON file to write (replaced atomically)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Write the file once and exit, instead of following the catalog
    #[arg(long)]
    pub once: bool,
}

pub async fn run(
    args: &PrometheusTargetsArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let client = RegistryClient::new(args.registry);
    let mut index: u64 = 0;
    let mut written: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let path = if index == 0 {
            format!("/v1/catalog/service/{ADMIN_SERVICE}")
        } else {
            format!("/v1/catalog/service/{ADMIN_SERVICE}?index={index}&wait={WAIT}")
        };
        let read = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            read = client.get_indexed(&path) => read,
        };
        match read {
            Ok((body, next)) => {
                backoff = Duration::from_millis(100);
                let instances: Vec<Value> = serde_json::from_slice(&body)?;
                let text = file_sd(&instances);
                if written.as_deref() != Some(text.as_str()) {
                    write_atomically(&args.out, &text).map_err(|e| {
                        CliError::Usage(format!("cannot write {}: {e}", args.out.display()))
                    })?;
                    if args.once {
                        let _ = writeln!(
                            out,
                            "wrote {} targets to {}",
                            instances.len(),
                            args.out.display()
                        );
                    } else {
                        tracing::info!(targets = instances.len(), file = %args.out.display(), "prometheus targets written");
                    }
                    written = Some(text);
                }
                if args.once {
                    return Ok(());
                }
                // A registry that restarted counts from lower again: start over (Consul's rule).
                index = match next {
                    Some(next) if next > index => next,
                    Some(next) if next < index => 0,
                    _ => index,
                };
            }
            Err(error) if args.once => return Err(error.into()),
            Err(error) => {
                tracing::warn!(registry = %args.registry, error = %crate::error_chain(&error), "reading the catalog failed; retrying");
                index = 0;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The `file_sd_configs` text of the catalog's `skyline-admin` instances
/// (`/v1/catalog/service/skyline-admin`): one group per admin listener, labelled with the
/// role and node it belongs to, in a stable order.
pub fn file_sd(instances: &[Value]) -> String {
    let mut groups: Vec<(String, String, String)> = instances
        .iter()
        .filter_map(|i| {
            let address = i["ServiceAddress"]
                .as_str()
                .filter(|a| !a.is_empty())
                .or_else(|| i["Address"].as_str())?;
            let port = i["ServicePort"].as_u64()?;
            let target = if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            };
            let meta = &i["ServiceMeta"];
            let role = meta["role"].as_str().unwrap_or("").to_owned();
            let node = meta["node"]
                .as_str()
                .or_else(|| i["Node"].as_str())
                .unwrap_or("")
                .to_owned();
            Some((role, node, target))
        })
        .collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(role, node, target)| {
            json!({
                "targets": [target],
                "labels": { "role": role, "node": node },
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&groups).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

/// Writes `text` to `path` through a temporary file in the same folder, renamed over it.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_admin_listener_is_a_target_labelled_with_its_role_and_node() {
        let instances = serde_json::json!([
            {"Node": "m1", "Address": "10.0.0.11", "ServiceAddress": "", "ServicePort": 5050,
             "ServiceMeta": {"role": "agent", "node": "m1"}},
            {"Node": "registry", "Address": "10.0.0.5", "ServiceAddress": "10.0.0.50", "ServicePort": 5051,
             "ServiceMeta": {"role": "gateway", "node": "gw-1"}},
            {"Node": "k1", "Address": "::1", "ServicePort": 5050, "ServiceMeta": {"role": "bridge"}},
            {"Node": "broken"}
        ]);
        let text = file_sd(instances.as_array().unwrap());
        let groups: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            groups,
            serde_json::json!([
                {"targets": ["10.0.0.11:5050"], "labels": {"role": "agent", "node": "m1"}},
                {"targets": ["[::1]:5050"], "labels": {"role": "bridge", "node": "k1"}},
                {"targets": ["10.0.0.50:5051"], "labels": {"role": "gateway", "node": "gw-1"}},
            ])
        );
        assert_eq!(file_sd(&[]), "[]\n");
    }
}
