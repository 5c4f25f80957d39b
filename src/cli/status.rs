//! `skyline status`: how far the mesh has converged on the catalog. Reads every proxy's
//! report (`skyline/status/` in the KV, see [`crate::status`]), asks the registry for its
//! newest catalog version, and tells how many proxies route with it, which one is the oldest
//! and for how long it has been behind, and which proxies are not ready.
//!
//! The newest version is computed as the proxies compute theirs: the highest `X-Consul-Index`
//! of `/v1/catalog/services` and of `/v1/health/service/<name>` for every service a proxy
//! follows. A proxy is not ready when it says so, when its report is older than three
//! heartbeats, or when the registry holds its `skyline-admin` check critical (its admin
//! listener stopped answering).
//!
//! With `--catalog etcd` the reports are read from etcd (`<prefix>-status/`), and the newest
//! version is the revision of the last change under the catalog prefix: the highest
//! `mod_revision` of its keys or, when keys were deleted since, the revision of the last
//! delete (found by counting the prefix's keys at earlier revisions). A catalog file has no
//! shared version: the command says so.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::SystemTime;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::CliError;
use super::etcd::EtcdArgs;
use crate::agent::config::CatalogKind;
use crate::catalog::etcd::EtcdError;
use crate::catalog::etcd::client::Client as EtcdClient;
use crate::catalog::{ServiceName, unix_ms};
use crate::config::DEFAULT_REGISTRY;
use crate::contract::ADMIN_SERVICE;
use crate::registry::client::{ClientError, RegistryClient};
use crate::status::{HEARTBEAT, KV_STATUS_PREFIX, Report};

/// Show how far every proxy has converged on the catalog.
#[derive(clap::Args, Clone, Debug)]
pub struct StatusArgs {
    /// The registry (or Consul agent) the proxies follow
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    /// Print JSON instead of a summary and a table
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// One proxy as `skyline status` judges it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyStatus {
    #[serde(flatten)]
    pub report: Report,
    /// Routes with the newest catalog version.
    pub on_newest: bool,
    /// How long a newer version than its own has been in force somewhere (or, when no proxy
    /// applied a newer one, since its own table went into force), in milliseconds; 0 when on
    /// the newest.
    pub behind_ms: u64,
    /// Ready as `skyline status` sees it: the report's readiness, a recent report, and a
    /// passing admin check.
    pub ready_now: bool,
    /// Why not, when not.
    pub why_not_ready: Vec<String>,
}

/// The whole mesh's convergence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MeshStatus {
    /// The newest catalog version: the registry's, or the etcd revision of the last change.
    pub newest: u64,
    /// Where `newest` comes from, for a person.
    pub newest_of: String,
    pub proxies: Vec<ProxyStatus>,
    pub on_newest: usize,
    /// The lowest version a proxy routes with.
    pub oldest: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AdminEntry {
    service: AdminService,
    #[serde(default)]
    checks: Vec<AdminCheck>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AdminService {
    #[serde(default)]
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AdminCheck {
    status: String,
}

pub async fn run(args: &StatusArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.etcd.catalog == Some(CatalogKind::File) {
        return Err(CliError::Usage(
            "--catalog file: a catalog file has no version shared between proxies (each reads \
             its own copy), so proxies that follow one report nothing; skyline status reads the \
             reports in a registry, Consul or etcd"
                .to_owned(),
        ));
    }
    let status = if args.etcd.is_etcd() {
        gather_etcd(&args.etcd).await?
    } else {
        let client = RegistryClient::from_env(args.registry);
        gather(&client).await.map_err(|e| match e {
            CliError::Registry(
                ClientError::Unreachable { addr, .. } | ClientError::Timeout { addr },
            ) => CliError::Usage(format!("no registry answers at {addr} (--registry)")),
            other => other,
        })?
    };
    if args.json {
        let _ = writeln!(out, "{}", serde_json::to_value(&status)?);
    } else {
        let _ = write!(out, "{}", render(&status));
    }
    Ok(())
}

/// Reads the reports, the newest version and the admin checks, and judges every proxy.
pub async fn gather(client: &RegistryClient) -> Result<MeshStatus, CliError> {
    let newest = newest_version(client).await?;
    let reports = reports(client).await?;
    let admin = admin_checks(client).await?;
    let mut status = judge(newest, reports, &admin, unix_ms(SystemTime::now()));
    status.newest_of = "the registry's newest".to_owned();
    Ok(status)
}

/// [`gather`] from etcd: the reports under `<prefix>-status/` and the revision of the last
/// change under the catalog prefix. etcd has no admin checks: a dead proxy's report goes with
/// its lease.
pub async fn gather_etcd(args: &EtcdArgs) -> Result<MeshStatus, CliError> {
    let (mut client, keys) = args.open()?;
    let newest = last_change(&mut client, keys.prefix()).await?;
    let folder = crate::status::etcd_status_prefix(keys.prefix());
    let answer = client.range(&folder, true).await?;
    let mut reports = Vec::new();
    for kv in answer.kvs {
        match serde_json::from_slice::<Report>(&kv.value) {
            Ok(report) => reports.push(report),
            Err(_) => {
                let key = String::from_utf8_lossy(&kv.key);
                tracing::warn!(%key, "not a status report; left out");
            }
        }
    }
    let mut status = judge(
        newest,
        reports,
        &BTreeMap::new(),
        unix_ms(SystemTime::now()),
    );
    status.newest_of = format!("etcd's last change under {}", keys.prefix());
    Ok(status)
}

/// The revision of the last change under `prefix`: a put leaves its `mod_revision` on the key,
/// a delete leaves nothing, so the changes after the last put are read from etcd's history (a
/// watch from there, until a progress notification says every event up to now was sent).
/// When that history was compacted, the last put is the answer (a later delete is missed).
async fn last_change(client: &mut EtcdClient, prefix: &str) -> Result<u64, CliError> {
    let answer = client.range(prefix, true).await?;
    let now = answer.header.map_or(0, |h| h.revision);
    let last_put = answer
        .kvs
        .iter()
        .map(|kv| kv.mod_revision)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut newest = last_put;
    if last_put < now {
        let mut watch = client.watch(prefix, last_put + 1).await?;
        let deadline = tokio::time::Instant::now() + crate::catalog::etcd::CALL_TIMEOUT;
        let mut ask = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            let message = tokio::select! {
                m = watch.message() => m?.ok_or(EtcdError::WatchClosed)?,
                _ = ask.tick() => {
                    watch.request_progress();
                    continue;
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(EtcdError::Timeout { call: "watch" }.into());
                }
            };
            if message.canceled {
                tracing::warn!(
                    compact_revision = message.compact_revision,
                    "etcd's history is compacted: a delete after the last put may be missed"
                );
                break;
            }
            for event in &message.events {
                if let Some(kv) = &event.kv {
                    newest = newest.max(kv.mod_revision);
                }
            }
            let progress = message.events.is_empty() && !message.created;
            if progress && message.header.is_some_and(|h| h.revision >= now) {
                break;
            }
        }
    }
    Ok(u64::try_from(newest).unwrap_or(0))
}

/// The registry's newest catalog version, as a proxy that applied everything would report it.
async fn newest_version(client: &RegistryClient) -> Result<u64, CliError> {
    let (body, index) = client.get_indexed("/v1/catalog/services").await?;
    let names: BTreeMap<String, Value> = serde_json::from_slice(&body)?;
    let mut newest = index.unwrap_or(0);
    for name in names.keys().filter(|n| ServiceName::is_valid(n)) {
        let (_, index) = client
            .get_indexed(&format!("/v1/health/service/{name}"))
            .await?;
        newest = newest.max(index.unwrap_or(0));
    }
    Ok(newest)
}

/// Every report under [`KV_STATUS_PREFIX`]; one that does not decode is left out (and said).
async fn reports(client: &RegistryClient) -> Result<Vec<Report>, CliError> {
    let path = format!("/v1/kv/{KV_STATUS_PREFIX}?recurse");
    let body = match client.get(&path).await {
        Ok(body) => body,
        Err(ClientError::Refused { status, .. }) if status.as_u16() == 404 => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let entries: Vec<KvEntry> = serde_json::from_slice(&body)?;
    let mut reports = Vec::new();
    for entry in entries {
        let decoded = entry
            .value
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|bytes| serde_json::from_slice::<Report>(&bytes).ok());
        match decoded {
            Some(report) => reports.push(report),
            None => tracing::warn!(key = %entry.key, "not a status report; left out"),
        }
    }
    Ok(reports)
}

/// The `skyline-admin` checks: by (role, node, port), whether every check passes.
async fn admin_checks(
    client: &RegistryClient,
) -> Result<BTreeMap<(String, String, u16), bool>, CliError> {
    let body = client
        .get(&format!("/v1/health/service/{ADMIN_SERVICE}"))
        .await?;
    let entries: Vec<AdminEntry> = serde_json::from_slice(&body)?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let meta = e.service.meta.unwrap_or_default();
            let field = |k: &str| meta.get(k).cloned().unwrap_or_default();
            let passing = e.checks.iter().all(|c| c.status == "passing");
            ((field("role"), field("node"), e.service.port), passing)
        })
        .collect())
}

/// Judges each report against the newest version, the admin checks and the clock (`now_ms`).
pub fn judge(
    newest: u64,
    mut reports: Vec<Report>,
    admin: &BTreeMap<(String, String, u16), bool>,
    now_ms: u64,
) -> MeshStatus {
    reports.sort_by(|a, b| (&a.role, &a.name).cmp(&(&b.role, &b.name)));
    let stale_ms = 3 * u64::try_from(HEARTBEAT.as_millis()).unwrap_or(u64::MAX);
    // When each version first went into force somewhere.
    let first_applied = |above: u64| {
        reports
            .iter()
            .filter(|r| r.version.is_some_and(|v| v > above))
            .filter_map(|r| r.applied_at_ms)
            .min()
    };
    let proxies: Vec<ProxyStatus> = reports
        .iter()
        .map(|report| {
            let on_newest = report.version.is_some_and(|v| v >= newest);
            let behind_ms = if on_newest {
                0
            } else {
                let since = first_applied(report.version.unwrap_or(0)).or(report.applied_at_ms);
                since.map_or(0, |t| now_ms.saturating_sub(t))
            };
            let mut why = report.reasons.clone();
            let silent = now_ms.saturating_sub(report.published_at_ms);
            if silent > stale_ms {
                why.push(format!("no report for {:.0}s", silent as f64 / 1000.0));
            }
            let port = report
                .admin
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| a.port());
            if let Some(port) = port {
                let key = (report.role.clone(), report.node.clone(), port);
                if admin.get(&key) == Some(&false) {
                    why.push(format!("its {ADMIN_SERVICE} check is critical"));
                }
            }
            ProxyStatus {
                report: report.clone(),
                on_newest,
                behind_ms,
                ready_now: why.is_empty(),
                why_not_ready: why,
            }
        })
        .collect();
    MeshStatus {
        newest,
        newest_of: String::new(),
        on_newest: proxies.iter().filter(|p| p.on_newest).count(),
        oldest: proxies.iter().filter_map(|p| p.report.version).min(),
        proxies,
    }
}

/// The summary and the table, for a person.
pub fn render(status: &MeshStatus) -> String {
    let total = status.proxies.len();
    let mut out = format!(
        "catalog version {} ({})\n{} of {total} proxies on the newest version\n",
        status.newest, status.newest_of, status.on_newest
    );
    let oldest = status
        .proxies
        .iter()
        .filter(|p| !p.on_newest)
        .max_by_key(|p| (p.behind_ms, std::cmp::Reverse(p.report.version)));
    match oldest {
        Some(p) => {
            out += &format!(
                "oldest: version {} on {} {}, behind for at least {:.1}s\n",
                show_version(p.report.version),
                p.report.role,
                p.report.name,
                p.behind_ms as f64 / 1000.0
            );
        }
        None if total > 0 => out += "every proxy routes with the newest version\n",
        None => out += "no proxy reports here\n",
    }
    let not_ready: Vec<&ProxyStatus> = status.proxies.iter().filter(|p| !p.ready_now).collect();
    if not_ready.is_empty() {
        out += "not ready: none\n";
    } else {
        out += "not ready:\n";
        for p in not_ready {
            out += &format!(
                "  {} {}: {}\n",
                p.report.role,
                p.report.name,
                p.why_not_ready.join("; ")
            );
        }
    }
    if total > 0 {
        out += &format!(
            "\n{:<8} {:<24} {:<16} {:>9}  {:<10} {:>9}  {:<5} {}\n",
            "ROLE", "NAME", "NODE", "VERSION", "STATE", "BEHIND", "READY", "ADMIN"
        );
        for p in &status.proxies {
            let r = &p.report;
            out += &format!(
                "{:<8} {:<24} {:<16} {:>9}  {:<10} {:>8.1}s  {:<5} {}\n",
                r.role,
                r.name,
                r.node,
                show_version(r.version),
                if p.on_newest { "newest" } else { "lagging" },
                p.behind_ms as f64 / 1000.0,
                if p.ready_now { "yes" } else { "no" },
                r.admin.as_deref().unwrap_or("-"),
            );
        }
    }
    out
}

fn show_version(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, version: u64, applied_at_ms: u64, now: u64) -> Report {
        Report {
            role: "agent".into(),
            name: name.into(),
            node: name.into(),
            version: Some(version),
            applied_at_ms: Some(applied_at_ms),
            ready: true,
            reasons: vec![],
            admin: Some("127.0.0.1:5050".into()),
            catalog: "consul:127.0.0.1:8500".into(),
            published_at_ms: now,
        }
    }

    #[test]
    fn a_lagging_proxy_is_behind_since_a_newer_version_went_into_force() {
        let now = 100_000;
        let reports = vec![
            report("a", 12, 90_000, now),
            report("b", 10, 50_000, now),
            report("c", 12, 95_000, now),
        ];
        let status = judge(12, reports, &BTreeMap::new(), now);
        assert_eq!(status.on_newest, 2);
        assert_eq!(status.oldest, Some(10));
        let b = &status.proxies[1];
        assert!(!b.on_newest);
        assert_eq!(b.behind_ms, 10_000);
        let text = render(&status);
        assert!(text.contains("2 of 3 proxies"), "{text}");
        assert!(
            text.contains("oldest: version 10 on agent b, behind for at least 10.0s"),
            "{text}"
        );
    }

    #[test]
    fn a_silent_proxy_or_one_with_a_critical_admin_check_is_not_ready() {
        let now = 100_000;
        let reports = vec![report("a", 3, 1, 1_000), report("b", 3, 1, now)];
        let admin = BTreeMap::from([(("agent".into(), "b".into(), 5050), false)]);
        let status = judge(3, reports, &admin, now);
        assert_eq!(status.proxies[0].why_not_ready, ["no report for 99s"]);
        assert_eq!(
            status.proxies[1].why_not_ready,
            ["its skyline-admin check is critical"]
        );
    }
}
