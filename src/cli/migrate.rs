//! The `skyline migrate` command: the driver of one migration, and `status`, `pause`, `resume`,
//! `rollback`.
//!
//! The driver holds the KV lock `skyline/migrate/<service>/lock` with a session (TTL, renewed),
//! so one driver moves a service at a time; a second one is refused. Its state is the record in
//! the KV: a driver that restarts resumes at the recorded step (with a fresh step time), and
//! `pause`, `resume` and `rollback` change the record, which the driver reads four times a
//! second. A rollback from the command line works with no driver running: it writes the policy
//! itself.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::ServiceName;
use crate::config::token::Token;
use crate::config::{DEFAULT_REGISTRY, parse_duration_setting};
use crate::gateway::KV_ROUTES_PREFIX;
use crate::migrate::answers::{
    Report, ShadowCounts, TierAnswers, record_key, reports_prefix, unix_now,
};
use crate::migrate::judge_shadow;
use crate::migrate::{
    DEFAULT_STEPS, Guards, Observed, Record, State, TierSummary, judge, may_advance, parse_percent,
    parse_steps,
};
use crate::registry::client::{ClientError, RegistryClient};

/// How often the driver reads the record and the gateways' reports.
pub const POLL: Duration = Duration::from_millis(250);
/// The TTL of the driver's session; it renews it every third of that.
pub const SESSION_TTL: Duration = Duration::from_secs(10);

// === Arguments ===

/// `skyline migrate <service> --to <tier>`, or one of its subcommands.
#[derive(clap::Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub command: Option<MigrateCommand>,

    #[command(flatten)]
    pub drive: DriveArgs,
}

/// Move a service's traffic to another tier, step by step, guarded.
#[derive(clap::Args, Clone, Debug)]
pub struct DriveArgs {
    /// The service to move
    #[arg(required = true)]
    pub service: Option<String>,

    /// The tier to move traffic to, by name, such as kubernetes or mesos
    #[arg(long, required = true, value_name = "TIER")]
    pub to: Option<String>,

    /// The tier traffic leaves [default: the first other tier of the policy]
    #[arg(long, value_name = "TIER")]
    pub from: Option<String>,

    /// The registry (or Consul agent) whose KV the gateways follow
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    /// The new tier's share at each step, percent, increasing and ending at 100
    #[arg(long, value_name = "LIST", default_value = "1,5,25,50,100")]
    pub steps: String,

    /// How long each step lasts before the next, such as 30s or 5m
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub step_time: String,

    /// Roll back when the new tier's share of failed answers (5xx or none) is over this
    #[arg(long, value_name = "PERCENT", default_value = "1%")]
    pub max_error_rate: String,

    /// Roll back when the new tier's p99 latency is over this many times the old tier's
    #[arg(long, value_name = "RATIO", default_value_t = 2.0)]
    pub max_p99_ratio: f64,

    /// Answers of the new tier a step needs before its error rate is judged and it may advance
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub min_requests: u64,

    /// Start with a shadow step: copy this share of GET and HEAD requests to the new tier,
    /// compare the copies' status class with the answers, discard them (no caller sees one)
    #[arg(long, value_name = "PERCENT")]
    pub shadow: Option<String>,

    /// The registry's token, given by a program that drives a migration itself (the demo);
    /// the command takes `SKYLINE_REGISTRY_TOKEN`.
    #[arg(skip)]
    pub token: Option<Token>,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum MigrateCommand {
    /// Print a migration's record and the gateways' latest numbers
    Status(ControlArgs),
    /// Hold a migration at its current step (the guards keep watching)
    Pause(ControlArgs),
    /// Let a paused migration go on (its step starts over)
    Resume(ControlArgs),
    /// Send all traffic back to the old tier now, with or without a driver running
    Rollback(ControlArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct ControlArgs {
    /// The service
    pub service: String,

    /// The registry (or Consul agent) whose KV holds the migration
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    /// Print JSON (status only)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Registry(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error(
        "another `skyline migrate` drives {service} (session {session}); use `skyline migrate status|pause|resume|rollback {service}`"
    )]
    Locked { service: String, session: String },
    #[error("migration of {service} rolled back: {reason}")]
    RolledBack { service: String, reason: String },
    #[error("the driver's session expired: another driver may take over")]
    LockLost,
    #[error("the migration record of {0} was removed")]
    Removed(String),
    #[error("interrupted; the migration stays at its step (run the same command to resume)")]
    Interrupted,
    #[error("the record of {0} keeps changing under us; try again")]
    Contended(String),
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

fn usage(text: impl Into<String>) -> MigrateError {
    MigrateError::Usage(text.into())
}

/// Runs `skyline migrate ...`.
pub async fn run(
    args: MigrateArgs,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    match args.command {
        Some(MigrateCommand::Status(c)) => status(c, out).await,
        Some(MigrateCommand::Pause(c)) => control(c, Control::Pause, out).await,
        Some(MigrateCommand::Resume(c)) => control(c, Control::Resume, out).await,
        Some(MigrateCommand::Rollback(c)) => control(c, Control::Rollback, out).await,
        None => drive(args.drive, shutdown, out).await,
    }
}

// === The KV ===

/// The KV calls of a migration.
#[derive(Clone, Debug)]
struct Kv {
    client: RegistryClient,
    /// The driver's lock: `(key, session)`. Set, every commit is fenced by it (the write happens
    /// only while the session holds the lock), so a driver that lost its lock without noticing
    /// (paused, partitioned past its TTL) cannot overwrite the next driver's steps.
    fence: Option<(String, String)>,
}

/// One KV entry: its value and modify index.
struct Entry {
    index: u64,
    value: String,
    session: Option<String>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
    #[serde(rename = "ModifyIndex", default)]
    index: u64,
    #[serde(rename = "Session", default)]
    session: Option<String>,
}

fn decode(value: Option<String>) -> String {
    value
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default()
}

fn encode(value: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

fn not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { status, .. } if *status == StatusCode::NOT_FOUND)
}

impl Kv {
    /// The KV of the registry at `addr`, with `token`, or else `SKYLINE_REGISTRY_TOKEN`'s.
    fn new(addr: SocketAddr, token: Option<Token>) -> Self {
        let client = match token {
            Some(token) => RegistryClient::new(addr).with_token(Some(token)),
            None => RegistryClient::from_env(addr),
        };
        Self {
            client,
            fence: None,
        }
    }

    /// This KV with every commit fenced by `lock`.
    fn fenced(&self, lock: &Lock) -> Self {
        Self {
            fence: Some((lock.key.clone(), lock.session.clone())),
            ..self.clone()
        }
    }

    async fn list(&self, prefix: &str) -> Result<BTreeMap<String, Entry>, MigrateError> {
        let body = match self.client.get(&format!("/v1/kv/{prefix}?recurse")).await {
            Ok(body) => body,
            Err(e) if not_found(&e) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let raw: Vec<RawEntry> = serde_json::from_slice(&body)
            .map_err(|e| usage(format!("the registry's KV answer does not decode: {e}")))?;
        Ok(raw
            .into_iter()
            .map(|e| {
                let entry = Entry {
                    index: e.index,
                    value: decode(e.value),
                    session: e.session,
                };
                (e.key, entry)
            })
            .collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, MigrateError> {
        let body = match self.client.get(&format!("/v1/kv/{key}")).await {
            Ok(body) => body,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let raw: Vec<RawEntry> = serde_json::from_slice(&body)
            .map_err(|e| usage(format!("the registry's KV answer does not decode: {e}")))?;
        Ok(raw.into_iter().find(|e| e.key == key).map(|e| Entry {
            index: e.index,
            value: decode(e.value),
            session: e.session,
        }))
    }

    async fn record(&self, service: &str) -> Result<Option<(u64, Record)>, MigrateError> {
        let Some(entry) = self.get(&record_key(service)).await? else {
            return Ok(None);
        };
        let record = serde_json::from_str(&entry.value).map_err(|e| {
            usage(format!(
                "the record {} is not a migration record: {e}",
                record_key(service)
            ))
        })?;
        Ok(Some((entry.index, record)))
    }

    /// Writes `record` if its key is still at `index` (0: absent), and the policy with it, in
    /// one transaction (fenced by the driver's lock when there is one); `false` when the record
    /// changed meanwhile, [`MigrateError::LockLost`] when the lock is no longer the driver's.
    async fn commit(
        &self,
        index: u64,
        record: &Record,
        policy: Option<&serde_json::Value>,
    ) -> Result<bool, MigrateError> {
        let record_text = serde_json::to_string(record).unwrap_or_default();
        let mut ops = Vec::with_capacity(3);
        if let Some((key, session)) = &self.fence {
            ops.push(serde_json::json!({"KV": {
                "Verb": "check-session", "Key": key, "Session": session,
            }}));
        }
        ops.push(serde_json::json!({"KV": {
            "Verb": "cas", "Key": record_key(&record.service),
            "Value": encode(&record_text), "Index": index,
        }}));
        if let Some(policy) = policy {
            ops.push(serde_json::json!({"KV": {
                "Verb": "set", "Key": format!("{KV_ROUTES_PREFIX}{}", record.service),
                "Value": encode(&policy.to_string()),
            }}));
        }
        let body = Bytes::from(serde_json::Value::Array(ops).to_string());
        match self.client.send(Method::PUT, "/v1/txn", body).await {
            Ok(_) => Ok(true),
            Err(ClientError::Refused { status, .. }) if status == StatusCode::CONFLICT => {
                match &self.fence {
                    Some((key, session)) if !self.holds(key, session).await? => {
                        Err(MigrateError::LockLost)
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `session` holds the lock `key`.
    async fn holds(&self, key: &str, session: &str) -> Result<bool, MigrateError> {
        let entry = self.get(key).await?;
        Ok(entry.and_then(|e| e.session).as_deref() == Some(session))
    }

    async fn reports(&self, service: &str) -> Result<BTreeMap<String, Report>, MigrateError> {
        let entries = self.list(&reports_prefix(service)).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, e)| Some((key, serde_json::from_str(&e.value).ok()?)))
            .collect())
    }
}

/// Per tier name, the answers in `now` since `before` (a gateway whose `boot` changed, or that
/// is new, counts whole; one that is gone counts nothing).
fn delta(
    before: &BTreeMap<String, Report>,
    now: &BTreeMap<String, Report>,
) -> BTreeMap<String, TierAnswers> {
    let mut sum: BTreeMap<String, TierAnswers> = BTreeMap::new();
    for (key, report) in now {
        let base = before.get(key).filter(|b| b.boot == report.boot);
        for (tier, answers) in &report.tiers {
            let d = match base.and_then(|b| b.tiers.get(tier)) {
                Some(b) => answers.since(b),
                None => answers.clone(),
            };
            sum.entry(tier.clone()).or_default().add(&d);
        }
    }
    sum
}

// === The policy ===

/// The policy the migration edits: the service's KV policy, else `*`'s, else the default
/// tiers (Mesos, then the Kubernetes bridges).
async fn base_policy(kv: &Kv, service: &str) -> Result<serde_json::Value, MigrateError> {
    for key in [service, "*"] {
        if let Some(entry) = kv.get(&format!("{KV_ROUTES_PREFIX}{key}")).await? {
            return parse_policy(&entry.value)
                .map_err(|e| usage(format!("the policy {KV_ROUTES_PREFIX}{key}: {e}")));
        }
    }
    Ok(serde_json::json!({}))
}

fn parse_policy(text: &str) -> Result<serde_json::Value, String> {
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    } else {
        let toml: toml::Value = toml::from_str(text).map_err(|e| e.message().trim().to_owned())?;
        serde_json::to_value(toml).map_err(|e| e.to_string())?
    };
    if !value.is_object() {
        return Err("not a table".into());
    }
    Ok(value)
}

/// The names of a policy's tiers, as the gateway names them.
fn tier_names(policy: &serde_json::Value) -> Result<Vec<String>, String> {
    let Some(tiers) = policy.get("tiers") else {
        return Ok(vec!["mesos".into(), crate::contract::KUBERNETES.into()]);
    };
    let tiers = tiers.as_array().ok_or("`tiers` is not a list")?;
    tiers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let text = |k: &str| t.get(k).and_then(|v| v.as_str());
            if let Some(name) = text("name") {
                return Ok(name.to_owned());
            }
            if let Some(select) = text("select") {
                if let Some((_, v)) = select.split_once('=') {
                    return Ok(v.trim().to_owned());
                }
            }
            if let Some(upstream) = text("upstream") {
                return Ok(upstream.to_owned());
            }
            Err(format!("tiers[{i}] has no name, select or upstream"))
        })
        .collect()
}

/// The policy with the split that gives `to` `share` percent and `from` the rest.
fn with_split(
    policy: &serde_json::Value,
    tiers: usize,
    from: usize,
    to: usize,
    share: u32,
) -> serde_json::Value {
    let mut weights = vec![0u32; tiers];
    weights[from] = 100 - share.min(100);
    weights[to] = share.min(100);
    let mut policy = policy.clone();
    if let Some(map) = policy.as_object_mut() {
        map.insert("split".into(), serde_json::json!(weights));
    }
    policy
}

/// A record's policy: the base with the split of its current share.
fn policy_for(base: &serde_json::Value, record: &Record) -> Result<serde_json::Value, String> {
    let names = tier_names(base)?;
    let find = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("the policy has no tier {name:?}; its tiers: {names:?}"))
    };
    let (from, to) = (find(&record.from)?, find(&record.to)?);
    let mut policy = with_split(base, names.len(), from, to, record.share());
    // The shadow in a shadow step, none otherwise.
    if let Some(map) = policy.as_object_mut() {
        map.remove("shadow");
        if let (true, 0, Some(percent)) = (record.state.under_way(), record.share(), record.shadow)
        {
            map.insert(
                "shadow".into(),
                serde_json::json!({"tier": record.to, "percent": percent}),
            );
        }
    }
    Ok(policy)
}

/// Per gateway, the shadow counts in `now` since `before`, summed.
fn shadow_delta(before: &BTreeMap<String, Report>, now: &BTreeMap<String, Report>) -> ShadowCounts {
    let mut sum = ShadowCounts::default();
    for (key, report) in now {
        match before.get(key).filter(|b| b.boot == report.boot) {
            Some(b) => sum.add(&report.shadow.since(&b.shadow)),
            None => sum.add(&report.shadow),
        }
    }
    sum
}

// === The driver ===

/// The driver's session and lock.
struct Lock {
    kv: Kv,
    key: String,
    session: String,
    lost: CancellationToken,
    renew: tokio::task::JoinHandle<()>,
}

impl Lock {
    async fn take(kv: &Kv, service: &str) -> Result<Self, MigrateError> {
        let body = serde_json::json!({
            "Name": format!("skyline migrate {service}"),
            "TTL": format!("{}s", SESSION_TTL.as_secs()),
            "LockDelay": "0s",
            "Behavior": "release",
        });
        let created = kv.client.put_json("/v1/session/create", &body).await?;
        let session = serde_json::from_slice::<serde_json::Value>(&created)
            .ok()
            .and_then(|v| v.get("ID").and_then(|id| id.as_str()).map(str::to_owned))
            .ok_or_else(|| usage("the registry's session answer has no ID"))?;
        let key = format!("{}/lock", record_key(service));
        let holder = serde_json::json!({"pid": std::process::id(), "since": unix_now()});
        let acquired = kv
            .client
            .put_json(&format!("/v1/kv/{key}?acquire={session}"), &holder)
            .await?;
        if String::from_utf8_lossy(&acquired).trim() != "true" {
            let holder = kv.get(&key).await.ok().flatten().and_then(|e| e.session);
            let _ = destroy(kv, &session).await;
            return Err(MigrateError::Locked {
                service: service.to_owned(),
                session: holder.unwrap_or_else(|| "unknown".into()),
            });
        }
        let lost = CancellationToken::new();
        let renew = tokio::spawn(renew(kv.clone(), session.clone(), lost.clone()));
        Ok(Self {
            kv: kv.clone(),
            key,
            session,
            lost,
            renew,
        })
    }

    async fn release(self) {
        self.renew.abort();
        let path = format!("/v1/kv/{}?release={}", self.key, self.session);
        let _ = self.kv.client.send(Method::PUT, &path, Bytes::new()).await;
        let _ = destroy(&self.kv, &self.session).await;
    }
}

async fn destroy(kv: &Kv, session: &str) -> Result<(), MigrateError> {
    let path = format!("/v1/session/destroy/{session}");
    kv.client.send(Method::PUT, &path, Bytes::new()).await?;
    Ok(())
}

/// Renews the session every third of its TTL; cancels `lost` when the registry no longer knows
/// it (a registry that cannot be reached is tried again until the TTL would have passed).
async fn renew(kv: Kv, session: String, lost: CancellationToken) {
    let path = format!("/v1/session/renew/{session}");
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(SESSION_TTL / 3).await;
        match kv.client.send(Method::PUT, &path, Bytes::new()).await {
            Ok(_) => last_ok = Instant::now(),
            Err(e) if not_found(&e) => break,
            Err(_) if last_ok.elapsed() < SESSION_TTL => {}
            Err(_) => break,
        }
    }
    lost.cancel();
}

/// The validated settings of one drive.
struct Plan {
    registry: SocketAddr,
    service: String,
    to: String,
    from: Option<String>,
    steps: Vec<u32>,
    step_time: Duration,
    guards: Guards,
    shadow: Option<u32>,
}

fn plan(args: DriveArgs) -> Result<Plan, MigrateError> {
    let service = args.service.unwrap_or_default();
    ServiceName::parse(&service).map_err(|e| usage(format!("service {service:?}: {e}")))?;
    let steps = if args.steps.trim().is_empty() {
        DEFAULT_STEPS.to_vec()
    } else {
        parse_steps(&args.steps).map_err(|e| usage(format!("--steps: {e}")))?
    };
    let step_time =
        parse_duration_setting(&args.step_time).map_err(|e| usage(format!("--step-time: {e}")))?;
    if step_time.is_zero() {
        return Err(usage("--step-time: must be above 0"));
    }
    let max_error_rate =
        parse_percent(&args.max_error_rate).map_err(|e| usage(format!("--max-error-rate: {e}")))?;
    if !(args.max_p99_ratio.is_finite() && args.max_p99_ratio >= 1.0) {
        return Err(usage("--max-p99-ratio: must be a number of at least 1"));
    }
    let shadow = match &args.shadow {
        None => None,
        Some(text) => {
            let share = parse_percent(text).map_err(|e| usage(format!("--shadow: {e}")))?;
            let percent = (share * 100.0).round();
            if !(1.0..=100.0).contains(&percent) {
                return Err(usage("--shadow: must be between 1% and 100%"));
            }
            // Within 1..=100: the cast cannot truncate.
            Some(percent as u32)
        }
    };
    Ok(Plan {
        registry: args.registry,
        service,
        to: args.to.unwrap_or_default(),
        from: args.from,
        steps,
        step_time,
        guards: Guards {
            max_error_rate,
            max_p99_ratio: args.max_p99_ratio,
            min_requests: args.min_requests,
        },
        shadow,
    })
}

fn step_line(record: &Record) -> String {
    if record.share() == 0 && record.state.under_way() {
        return format!(
            "step {}/{}: shadow: {}% of GET and HEAD requests of {} copied to {}, answers from {}",
            record.step + 1,
            record.steps.len(),
            record.shadow.unwrap_or(0),
            record.service,
            record.to,
            record.from
        );
    }
    format!(
        "step {}/{}: {}% of {} to {}",
        record.step + 1,
        record.steps.len(),
        record.share(),
        record.service,
        record.to
    )
}

/// `skyline migrate <service> --to <tier>`: takes the lock, starts or resumes the migration,
/// and drives it to its end; the lock is released on every way out.
async fn drive(
    args: DriveArgs,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    let token = args.token.clone();
    let plan = plan(args)?;
    let kv = Kv::new(plan.registry, token);
    let lock = Lock::take(&kv, &plan.service).await?;
    let result = drive_locked(&kv.fenced(&lock), &plan, &lock.lost, &shutdown, out).await;
    lock.release().await;
    result
}

async fn drive_locked(
    kv: &Kv,
    plan: &Plan,
    lost: &CancellationToken,
    shutdown: &CancellationToken,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    let service = plan.service.as_str();
    let base = base_policy(kv, service).await?;
    let (mut index, mut record) = match kv.record(service).await? {
        Some((index, record)) if record.state.under_way() => {
            if record.to != plan.to {
                return Err(usage(format!(
                    "a migration of {service} to {} is under way; roll it back first",
                    record.to
                )));
            }
            writeln!(
                out,
                "resuming the migration of {service} from {} to {} at step {}/{} ({})",
                record.from,
                record.to,
                record.step + 1,
                record.steps.len(),
                record.state
            )?;
            (index, record)
        }
        Some((_, record)) if record.state == State::Done && record.to == plan.to => {
            writeln!(out, "{service} is already on {}: nothing to do", record.to)?;
            return Ok(());
        }
        previous => {
            let names = tier_names(&base).map_err(|e| usage(format!("the policy: {e}")))?;
            if !names.contains(&plan.to) {
                return Err(usage(format!(
                    "--to: the policy of {service} has no tier {:?}; its tiers: {names:?}",
                    plan.to
                )));
            }
            let from = match &plan.from {
                Some(from) if names.contains(from) && *from != plan.to => from.clone(),
                Some(from) => {
                    return Err(usage(format!(
                        "--from: {from:?} is not another tier of the policy; its tiers: {names:?}"
                    )));
                }
                None => names
                    .iter()
                    .find(|n| **n != plan.to)
                    .cloned()
                    .ok_or_else(|| usage("the policy has a single tier: nothing to move"))?,
            };
            let now = unix_now();
            let record = Record {
                id: crate::registry::events::uuid_v4(),
                service: service.to_owned(),
                from,
                to: plan.to.clone(),
                steps: match plan.shadow {
                    Some(_) => std::iter::once(0)
                        .chain(plan.steps.iter().copied())
                        .collect(),
                    None => plan.steps.clone(),
                },
                shadow: plan.shadow,
                step: 0,
                state: State::Running,
                reason: None,
                step_time_ms: u64::try_from(plan.step_time.as_millis()).unwrap_or(u64::MAX),
                guards: plan.guards,
                started_at: now,
                step_started_at: now,
                updated_at: now,
                observed: None,
            };
            // Reports of an earlier migration would make deltas of another one.
            let path = format!("/v1/kv/{}?recurse", reports_prefix(service));
            kv.client.send(Method::DELETE, &path, Bytes::new()).await?;
            let index = previous.map_or(0, |(index, _)| index);
            writeln!(
                out,
                "migrating {service} from {} to {}: steps {:?} %, {:?} each; guards: error rate \
                 <= {:.1}%, p99 <= {:.1}x {}'s",
                record.from,
                record.to,
                record.steps,
                plan.step_time,
                plan.guards.max_error_rate * 100.0,
                plan.guards.max_p99_ratio,
                record.from
            )?;
            (index, record)
        }
    };
    // The step's policy, written again (idempotent when resuming).
    let policy = policy_for(&base, &record).map_err(usage)?;
    if !kv.commit(index, &record, Some(&policy)).await? {
        return Err(MigrateError::Contended(service.to_owned()));
    }
    writeln!(out, "{}", step_line(&record))?;
    out.flush()?;
    let mut paused = record.state == State::Paused;
    let mut clock = Instant::now();
    let mut baseline = kv.reports(service).await?;
    let mut waited = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Err(MigrateError::Interrupted),
            () = lost.cancelled() => return Err(MigrateError::LockLost),
            () = tokio::time::sleep(POLL) => {}
        }
        let Some((now_index, now_record)) = kv.record(service).await? else {
            return Err(MigrateError::Removed(service.to_owned()));
        };
        (index, record) = (now_index, now_record);
        match record.state {
            State::RolledBack => {
                let reason = record.reason.clone().unwrap_or_default();
                writeln!(out, "rolled back: {reason}")?;
                return Err(MigrateError::RolledBack {
                    service: service.to_owned(),
                    reason,
                });
            }
            State::Done => return Ok(()),
            State::Paused if !paused => {
                paused = true;
                writeln!(
                    out,
                    "paused at step {}/{}",
                    record.step + 1,
                    record.steps.len()
                )?;
                out.flush()?;
            }
            State::Running if paused => {
                paused = false;
                clock = Instant::now();
                baseline = kv.reports(service).await?;
                waited = false;
                writeln!(out, "resumed: {} starts over", step_line(&record))?;
                out.flush()?;
            }
            State::Paused | State::Running => {}
        }
        let reports = kv.reports(service).await?;
        let answers = delta(&baseline, &reports);
        let empty = TierAnswers::default();
        let old = answers.get(&record.from).unwrap_or(&empty);
        let new = answers.get(&record.to).unwrap_or(&empty);
        let shadowing = record.share() == 0;
        let copies = shadow_delta(&baseline, &reports);
        let observed = Observed {
            step: record.step,
            from: TierSummary::of(old),
            to: TierSummary::of(new),
            shadow: shadowing.then_some(copies),
            seconds: clock.elapsed().as_secs_f64(),
        };
        let breach = if shadowing {
            judge_shadow(&record.guards, &record.from, &record.to, &copies)
        } else {
            judge(&record.guards, (&record.from, old), (&record.to, new))
        };
        if let Some(breach) = breach {
            let reason = format!(
                "at step {}/{} ({}% to {}): {breach}",
                record.step + 1,
                record.steps.len(),
                record.share(),
                record.to
            );
            let mut next = record.clone();
            next.state = State::RolledBack;
            next.reason = Some(reason.clone());
            next.updated_at = unix_now();
            next.observed = Some(observed);
            let policy = policy_for(&base, &next).map_err(usage)?;
            if !kv.commit(index, &next, Some(&policy)).await? {
                continue;
            }
            writeln!(
                out,
                "ROLLBACK {reason}; all traffic back on {}",
                record.from
            )?;
            out.flush()?;
            return Err(MigrateError::RolledBack {
                service: service.to_owned(),
                reason,
            });
        }
        if paused || clock.elapsed() < plan_step_time(&record) {
            continue;
        }
        let judged = if shadowing {
            copies.compared >= record.guards.min_requests
        } else {
            may_advance(&record.guards, new)
        };
        if !judged {
            if !waited {
                waited = true;
                writeln!(
                    out,
                    "waiting: {} answered {} of the {} requests a step needs",
                    record.to,
                    if shadowing {
                        copies.compared
                    } else {
                        new.total()
                    },
                    record.guards.min_requests
                )?;
                out.flush()?;
            }
            continue;
        }
        let mut next = record.clone();
        next.updated_at = unix_now();
        let mut summary = format!(
            "  {}: {}; {}: {}",
            record.from, observed.from, record.to, observed.to
        );
        if let Some(c) = &observed.shadow {
            summary.push_str(&format!(
                "; shadow: {} compared, {} differed, {} skipped",
                c.compared, c.differ, c.skipped
            ));
        }
        next.observed = Some(observed);
        if record.step + 1 >= record.steps.len() {
            next.state = State::Done;
            if !kv.commit(index, &next, None).await? {
                continue;
            }
            writeln!(out, "{summary}")?;
            writeln!(out, "done: all traffic of {service} on {}", record.to)?;
            out.flush()?;
            return Ok(());
        }
        next.step += 1;
        next.step_started_at = next.updated_at;
        let policy = policy_for(&base, &next).map_err(usage)?;
        if !kv.commit(index, &next, Some(&policy)).await? {
            continue;
        }
        writeln!(out, "{summary}")?;
        writeln!(out, "{}", step_line(&next))?;
        out.flush()?;
        clock = Instant::now();
        baseline = reports;
        waited = false;
    }
}

fn plan_step_time(record: &Record) -> Duration {
    Duration::from_millis(record.step_time_ms)
}

// === status, pause, resume, rollback ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Pause,
    Resume,
    Rollback,
}

/// How many times a command tries again when the record changed under it.
const CONTROL_TRIES: usize = 50;

/// `service` if it is a valid service name (it becomes part of KV keys).
fn valid_service(service: &str) -> Result<&str, MigrateError> {
    ServiceName::parse(service).map_err(|e| usage(format!("service {service:?}: {e}")))?;
    Ok(service)
}

async fn control(
    args: ControlArgs,
    what: Control,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    let kv = Kv::new(args.registry, None);
    let service = valid_service(&args.service)?;
    for _ in 0..CONTROL_TRIES {
        let Some((index, record)) = kv.record(service).await? else {
            return Err(usage(format!("no migration of {service}")));
        };
        let mut next = record.clone();
        next.updated_at = unix_now();
        let mut policy = None;
        match (what, record.state) {
            (Control::Pause, State::Running) => next.state = State::Paused,
            (Control::Resume, State::Paused) => next.state = State::Running,
            (Control::Rollback, State::Running | State::Paused | State::Done) => {
                next.state = State::RolledBack;
                next.reason = Some(format!(
                    "rolled back by the operator at step {}/{} ({}% to {})",
                    record.step + 1,
                    record.steps.len(),
                    record.share(),
                    record.to
                ));
                let base = base_policy(&kv, service).await?;
                policy = Some(policy_for(&base, &next).map_err(usage)?);
            }
            (_, state) => {
                return Err(usage(format!(
                    "the migration of {service} is {state}: cannot {}",
                    match what {
                        Control::Pause => "pause it",
                        Control::Resume => "resume it",
                        Control::Rollback => "roll it back",
                    }
                )));
            }
        }
        if kv.commit(index, &next, policy.as_ref()).await? {
            writeln!(
                out,
                "{service}: {} (step {}/{}, {}% to {})",
                next.state,
                next.step + 1,
                next.steps.len(),
                next.share(),
                next.to
            )?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(MigrateError::Contended(service.to_owned()))
}

async fn status(args: ControlArgs, out: &mut impl Write) -> Result<(), MigrateError> {
    let kv = Kv::new(args.registry, None);
    let service = valid_service(&args.service)?;
    let Some((_, record)) = kv.record(service).await? else {
        return Err(usage(format!("no migration of {service}")));
    };
    let reports = kv.reports(service).await?;
    let total = delta(&BTreeMap::new(), &reports);
    if args.json {
        let json = serde_json::json!({
            "record": record,
            "gateways": reports,
            "tiers": total.iter().map(|(t, a)| (t.clone(), TierSummary::of(a))).collect::<BTreeMap<_, _>>(),
        });
        writeln!(out, "{json:#}")?;
        return Ok(());
    }
    let now = unix_now();
    writeln!(
        out,
        "{service}: {} -> {}, {}, step {}/{} ({}% to {}), steps {:?} %, {} ms each",
        record.from,
        record.to,
        record.state,
        record.step + 1,
        record.steps.len(),
        record.share(),
        record.to,
        record.steps,
        record.step_time_ms
    )?;
    writeln!(
        out,
        "guards: error rate <= {:.1}% once {} answered {} requests; p99 <= {:.1}x {}'s",
        record.guards.max_error_rate * 100.0,
        record.to,
        record.guards.min_requests,
        record.guards.max_p99_ratio,
        record.from
    )?;
    writeln!(
        out,
        "started {} s ago, step started {} s ago, updated {} s ago",
        now.saturating_sub(record.started_at),
        now.saturating_sub(record.step_started_at),
        now.saturating_sub(record.updated_at)
    )?;
    if let Some(reason) = &record.reason {
        writeln!(out, "reason: {reason}")?;
    }
    if let Some(o) = &record.observed {
        writeln!(
            out,
            "last judged (step {}, {:.1} s): {}: {}; {}: {}",
            o.step + 1,
            o.seconds,
            record.from,
            o.from,
            record.to,
            o.to
        )?;
        if let Some(c) = &o.shadow {
            writeln!(
                out,
                "  shadow: {} compared, {} differed, {} skipped",
                c.compared, c.differ, c.skipped
            )?;
        }
    }
    if record.shadow.is_some() {
        let c = shadow_delta(&BTreeMap::new(), &reports);
        writeln!(
            out,
            "shadow copies to {} (all gateways, since each started): {} compared, {} differed, \
             {} skipped",
            record.to, c.compared, c.differ, c.skipped
        )?;
    }
    writeln!(
        out,
        "gateways ({}), counts since each started:",
        reports.len()
    )?;
    for report in reports.values() {
        let tiers: Vec<String> = report
            .tiers
            .iter()
            .map(|(t, a)| format!("{t}: {}", TierSummary::of(a)))
            .collect();
        writeln!(
            out,
            "  {} ({} s ago): {}",
            report.gateway,
            now.saturating_sub(report.at),
            tiers.join("; ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_follow_the_gateway_naming_and_the_split_moves_the_share() {
        let default = serde_json::json!({});
        assert_eq!(tier_names(&default).unwrap(), ["mesos", "kubernetes"]);
        let custom = parse_policy(
            "tiers = [{ select = \"platform=vm\" }, { upstream = \"k8s\", name = \"new\" }]",
        )
        .unwrap();
        assert_eq!(tier_names(&custom).unwrap(), ["vm", "new"]);
        let p = with_split(&custom, 2, 0, 1, 25);
        assert_eq!(p["split"], serde_json::json!([75, 25]));
        assert_eq!(p["tiers"], custom["tiers"]);
        assert_eq!(
            with_split(&default, 2, 1, 0, 100)["split"],
            serde_json::json!([100, 0])
        );
    }

    #[test]
    fn deltas_count_a_restarted_gateway_whole_and_a_gone_one_as_nothing() {
        let report = |boot: &str, ok: u64| {
            let mut a = TierAnswers::default();
            for _ in 0..ok {
                a.record(false, Duration::from_millis(1));
            }
            Report {
                gateway: "g".into(),
                boot: boot.into(),
                at: 0,
                tiers: BTreeMap::from([("mesos".to_owned(), a)]),
                shadow: ShadowCounts::default(),
            }
        };
        let before = BTreeMap::from([
            ("a".to_owned(), report("1", 10)),
            ("b".to_owned(), report("1", 10)),
            ("gone".to_owned(), report("1", 10)),
        ]);
        let now = BTreeMap::from([
            ("a".to_owned(), report("1", 15)),
            ("b".to_owned(), report("2", 3)),
            ("gone".to_owned(), report("1", 10)),
            ("new".to_owned(), report("1", 1)),
        ]);
        assert_eq!(delta(&before, &now)["mesos"].ok, 5 + 3 + 1);
    }

    #[tokio::test]
    async fn a_driver_whose_lock_was_taken_over_cannot_write_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let registry = crate::registry::spawn(
            listener,
            crate::registry::RegistryConfig::new(dir.path()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let kv = Kv::new(registry.addr(), None);
        let record = Record {
            id: "m1".into(),
            service: "web".into(),
            from: "mesos".into(),
            to: "kubernetes".into(),
            steps: vec![1, 100],
            shadow: None,
            step: 0,
            state: State::Running,
            reason: None,
            step_time_ms: 1000,
            guards: Guards::default(),
            started_at: 0,
            step_started_at: 0,
            updated_at: 0,
            observed: None,
        };
        let lock = Lock::take(&kv, "web").await.unwrap();
        let fenced = kv.fenced(&lock);
        assert!(fenced.commit(0, &record, None).await.unwrap());
        let (index, _) = kv.record("web").await.unwrap().unwrap();

        // The session goes (its TTL ran out while the driver was paused, say) and another
        // driver takes the lock: the first driver's next write is refused, not applied.
        destroy(&kv, &lock.session).await.unwrap();
        let next = Lock::take(&kv, "web").await.unwrap();
        let stale = Record {
            step: 1,
            ..record.clone()
        };
        assert!(matches!(
            fenced.commit(index, &stale, None).await,
            Err(MigrateError::LockLost)
        ));
        assert_eq!(kv.record("web").await.unwrap().unwrap().1.step, 0);
        // The new holder writes.
        assert!(kv.fenced(&next).commit(index, &stale, None).await.unwrap());
        assert_eq!(kv.record("web").await.unwrap().unwrap().1.step, 1);
        next.release().await;
        lock.renew.abort();
        shutdown.cancel();
        registry.join().await;
    }
}
