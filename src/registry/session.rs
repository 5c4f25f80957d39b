//! Consul's sessions and the KV locks they hold: `/v1/session/*`, `?acquire=` / `?release=` on
//! `/v1/kv/`, TTL expiry and invalidation, with Consul's rules (`agent/session_endpoint.go`,
//! `agent/consul/session_endpoint.go`, `agent/consul/state/{session,kvs}.go`,
//! `agent/consul/session_ttl.go`):
//!
//! - a session belongs to a node (default: the registry's own) and depends on checks of that node
//!   (default: `serfHealth`). It is invalidated when it is destroyed, when one of its checks turns
//!   critical or goes away, when its node is deregistered, and, with a `TTL`, when it is not
//!   renewed within twice the TTL (Consul's grace factor);
//! - invalidation releases the locks the session holds (`Behavior: release`, the default) or
//!   deletes their keys (`delete`), and each such key refuses new locks for the session's
//!   `LockDelay` (default 15 s, at most 60 s);
//! - `?acquire=<session>` answers `true` when the session now holds the key (holding it already
//!   counts), `false` when another session does or the key is in its lock-delay; `LockIndex` grows
//!   each time the holder changes. A plain write keeps the holder. `?release=<session>` answers
//!   `true` only for the holder.
//!
//! Sessions and locks are written to the log like every other write, so they survive a restart.
//! TTL timers are runtime state: after a restart every TTL runs again from "now", as Consul's new
//! leader does. Lock-delays are kept in the state as wall-clock deadlines (Consul keeps them in
//! memory only, so a restart there forgets them).
//!
//! The registry's own node always exists for sessions, and its `serfHealth` check passes unless
//! one is registered: the registry is the agent, and Consul's agent always has both.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::api::{
    ApiError, Query, Resp, Shared, decode, json_body, json_response, plain, read, submit_with,
};
use super::decode::{self, DecodeError, Field, Json, Kind, Shape};
use super::store::{Behavior, Op, SessionDef, SessionEntry, State};
use crate::catalog::Health;
use crate::http1::percent_decode;

/// The check every Consul agent has, and the sessions' default.
pub const SERF_CHECK: &str = "serfHealth";
/// A session's lock-delay when the client gives none.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// The shortest TTL a session may have (Consul's `session_ttl_min` default).
pub const TTL_MIN: Duration = Duration::from_secs(10);
/// The longest TTL a session may have (Consul's `SessionTTLMax`).
pub const TTL_MAX: Duration = Duration::from_secs(24 * 3600);
/// A TTL session is invalidated when not renewed within this many TTLs (Consul's
/// `SessionTTLMultiplier`): the contract is "not before the TTL", and the grace absorbs network
/// and scheduling delays.
pub const TTL_MULTIPLIER: u32 = 2;
/// A lock-delay below this many nanoseconds is taken as seconds: clients send `15` meaning 15 s
/// (Consul's `lockDelayMinThreshold`).
const LOCK_DELAY_MIN_THRESHOLD_NS: i64 = 1000;

/// The wall clock in Unix milliseconds, as lock-delays are kept.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// === Validity ===

/// Whether `node` exists for sessions: registered, or the registry's own.
fn node_exists(state: &State, own_node: &str, node: &str) -> bool {
    node == own_node || state.nodes.contains_key(node)
}

/// The status of a check of `node`; the registry's own `serfHealth` passes unless registered.
fn check_status(state: &State, own_node: &str, node: &str, check: &str) -> Option<Health> {
    match state.check(node, check) {
        Some(c) => Some(c.status),
        None if node == own_node && check == SERF_CHECK => Some(Health::Passing),
        None => None,
    }
}

/// Why a session cannot exist on `state`, as Consul words it; `None` when it can.
fn invalid_reason(state: &State, own_node: &str, def: &SessionDef) -> Option<String> {
    if !node_exists(state, own_node, &def.node) {
        return Some("Missing node registration".to_owned());
    }
    for check in def.all_checks() {
        match check_status(state, own_node, &def.node, check) {
            None => return Some(format!("Missing check '{check}' registration")),
            Some(Health::Critical) => {
                return Some(format!("Check '{check}' is in critical state"));
            }
            Some(_) => {}
        }
    }
    None
}

/// The sessions `op` (just applied, touching the checks `touched`) invalidates: those on a node
/// it deregistered or whose checks it turned critical or removed.
pub fn invalidated_by(
    state: &State,
    own_node: &str,
    op: &Op,
    touched: &[(String, String)],
) -> Vec<String> {
    if state.sessions.is_empty() {
        return Vec::new();
    }
    let mut nodes: BTreeSet<&str> = touched.iter().map(|(n, _)| n.as_str()).collect();
    if let Op::Deregister { node, .. } = op {
        nodes.insert(node);
    }
    if nodes.is_empty() {
        return Vec::new();
    }
    state
        .sessions
        .values()
        .filter(|s| nodes.contains(s.def.node.as_str()))
        .filter(|s| invalid_reason(state, own_node, &s.def).is_some())
        .map(|s| s.def.id.clone())
        .collect()
}

/// Every session that should not exist on `state` (a crash between a check's change and the
/// session's invalidation leaves some; the registry clears them at start).
pub fn invalid_sessions(state: &State, own_node: &str) -> Vec<String> {
    state
        .sessions
        .values()
        .filter(|s| invalid_reason(state, own_node, &s.def).is_some())
        .map(|s| s.def.id.clone())
        .collect()
}

// === TTL timers ===

/// When each TTL session expires: runtime state, rebuilt from the sessions at start.
#[derive(Debug, Default)]
pub struct Timers {
    deadlines: HashMap<String, Instant>,
}

impl Timers {
    /// Restarts every TTL from `now`.
    pub fn reset_all(&mut self, state: &State, now: Instant) {
        self.deadlines.clear();
        for session in state.sessions.values() {
            self.renew(&session.def, now);
        }
    }

    /// Restarts one session's TTL (nothing for a session without one).
    pub fn renew(&mut self, def: &SessionDef, now: Instant) {
        if let Some(ttl) = ttl_of(def) {
            self.deadlines
                .insert(def.id.clone(), now + ttl * TTL_MULTIPLIER);
        }
    }

    pub fn remove(&mut self, id: &str) {
        self.deadlines.remove(id);
    }

    /// The sessions whose TTL ran out by `now`, as writes that invalidate them.
    pub fn expire(&mut self, state: &State, now: Instant) -> Vec<Op> {
        let due: Vec<String> = self
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let at_ms = now_ms();
        let mut ops = Vec::new();
        for id in due {
            self.deadlines.remove(&id);
            if state.sessions.contains_key(&id) {
                tracing::debug!(session = %id, "session ttl expired");
                ops.push(Op::SessionDestroy { id, at_ms });
            }
        }
        ops
    }
}

/// A session's TTL, `None` for none (empty or zero).
fn ttl_of(def: &SessionDef) -> Option<Duration> {
    crate::config::parse_duration(&def.ttl)
        .ok()
        .filter(|d| !d.is_zero())
}

// === KV locks ===

/// Why a lock or unlock wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockRefused {
    /// Another session holds the lock (or, for an unlock, this session does not).
    NotHolder,
    /// The key is in the lock-delay of a session that held it.
    LockDelay,
}

/// Decides `?acquire=`: the write, a refusal (`false`), or Consul's error (500).
pub fn lock(
    state: &State,
    key: &str,
    value: Vec<u8>,
    flags: u64,
    session: &str,
) -> Result<Result<Op, LockRefused>, ApiError> {
    if state
        .lock_delays
        .get(key)
        .is_some_and(|until| *until > now_ms())
    {
        tracing::warn!(%key, "rejecting lock of key due to lock-delay");
        return Ok(Err(LockRefused::LockDelay));
    }
    if session.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "missing session",
        ));
    }
    if !state.sessions.contains_key(session) {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("invalid session {session:?}"),
        ));
    }
    if let Some(holder) = state.kv.get(key).and_then(|e| e.session.as_deref()) {
        if holder != session {
            return Ok(Err(LockRefused::NotHolder));
        }
    }
    Ok(Ok(Op::KvLock {
        key: key.to_owned(),
        value,
        flags,
        session: session.to_owned(),
    }))
}

/// Decides `?release=`: the write, a refusal (`false`), or Consul's error (500).
pub fn unlock(
    state: &State,
    key: &str,
    value: Vec<u8>,
    flags: u64,
    session: &str,
) -> Result<Result<Op, LockRefused>, ApiError> {
    if session.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "missing session",
        ));
    }
    match state.kv.get(key) {
        Some(e) if e.session.as_deref() == Some(session) => Ok(Ok(Op::KvUnlock {
            key: key.to_owned(),
            value,
            flags,
            session: session.to_owned(),
        })),
        _ => Ok(Err(LockRefused::NotHolder)),
    }
}

// === HTTP ===

/// Answers `/v1/session/<rest>`.
pub(crate) async fn handle(
    shared: &Shared,
    method: &Method,
    rest: &str,
    query: &Query,
    body: impl std::future::Future<Output = Result<Bytes, ApiError>>,
) -> Result<Resp, ApiError> {
    let not_found = || ApiError::not_found("404 page not found");
    let (endpoint, raw_arg) = match rest.split_once('/') {
        Some((endpoint, arg)) => (endpoint, Some(arg)),
        None => (rest, None),
    };
    let arg = |missing: &'static str| -> Result<String, ApiError> {
        let raw = raw_arg.unwrap_or_default();
        let decoded = percent_decode(raw, false)
            .ok_or_else(|| ApiError::bad_request("Invalid path parameter encoding"))?;
        if decoded.is_empty() {
            return Err(ApiError::bad_request(missing));
        }
        Ok(decoded)
    };
    let allow = |allowed: &[Method]| -> Result<(), ApiError> {
        if allowed.contains(method) {
            Ok(())
        } else {
            Err(ApiError::method(method, allowed))
        }
    };
    match endpoint {
        "create" if raw_arg.is_none() => {
            allow(&[Method::PUT])?;
            create(shared, &body.await?).await
        }
        "destroy" => {
            allow(&[Method::PUT])?;
            destroy(shared, arg("Missing session")?).await
        }
        "renew" => {
            allow(&[Method::PUT])?;
            renew(shared, arg("Missing session")?).await
        }
        "info" => {
            allow(&[Method::GET])?;
            let id = arg("Missing session")?;
            let (state, index) = read(shared, query, |s| s.sessions_index).await?;
            let out: Vec<Value> = state
                .sessions
                .get(&id)
                .map(|s| to_json(s))
                .into_iter()
                .collect();
            Ok(json_response(index, &out))
        }
        "list" if raw_arg.is_none() => {
            allow(&[Method::GET])?;
            let (state, index) = read(shared, query, |s| s.sessions_index).await?;
            let out: Vec<Value> = state.sessions.values().map(|s| to_json(s)).collect();
            Ok(json_response(index, &out))
        }
        "node" => {
            allow(&[Method::GET])?;
            let node = arg("Missing node name")?;
            let (state, index) = read(shared, query, |s| s.sessions_index).await?;
            let out: Vec<Value> = state
                .sessions
                .values()
                .filter(|s| s.def.node == node)
                .map(|s| to_json(s))
                .collect();
            Ok(json_response(index, &out))
        }
        _ => Err(not_found()),
    }
}

/// A session as Consul answers it.
pub fn to_json(s: &SessionEntry) -> Value {
    let d = &s.def;
    let service_checks: Value = if d.service_checks.is_empty() {
        Value::Null
    } else {
        d.service_checks
            .iter()
            .map(|id| json!({ "ID": id, "Namespace": "" }))
            .collect()
    };
    let mut out = json!({
        "ID": d.id,
        "Name": d.name,
        "Node": d.node,
        "LockDelay": u64::try_from(d.lock_delay.as_nanos()).unwrap_or(u64::MAX),
        "Behavior": d.behavior.as_str(),
        "TTL": d.ttl,
        "NodeChecks": d.node_checks,
        "ServiceChecks": service_checks,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    });
    if !d.checks.is_empty() {
        out["Checks"] = json!(d.checks);
    }
    out
}

/// `structs.ServiceCheck`.
static SERVICE_CHECK: Shape = Shape {
    name: "ServiceCheck",
    strict: true,
    fields: &[
        Field {
            name: "ID",
            kind: Kind::Str,
            aliases: &[],
        },
        Field {
            name: "Namespace",
            kind: Kind::Str,
            aliases: &[],
        },
    ],
};

/// `structs.Session`, the body of `/v1/session/create`.
static SESSION: Shape = Shape {
    name: "Session",
    strict: true,
    fields: &[
        field("ID", Kind::Str),
        field("Name", Kind::Str),
        field("Node", Kind::Str),
        field("LockDelay", Kind::Custom(lock_delay)),
        field("Behavior", Kind::Str),
        field("TTL", Kind::Str),
        field("NodeChecks", Kind::Strings),
        field("ServiceChecks", Kind::Objs(&SERVICE_CHECK)),
        field("Checks", Kind::Strings),
        field("CreateIndex", Kind::Int),
        field("ModifyIndex", Kind::Int),
    ],
};

const fn field(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        aliases: &[],
    }
}

/// `Session.UnmarshalJSON`'s lock-delay: a Go duration string or a number of nanoseconds, and
/// below 1000 ns a number of seconds (clients send `15` meaning 15 s). Integer nanoseconds out.
fn lock_delay(raw: &Json, _path: &str) -> Result<Option<Value>, DecodeError> {
    let nanos = match raw {
        Json::Null => return Ok(None),
        other => decode::duration(other)?.unwrap_or(0),
    };
    let nanos = if nanos < LOCK_DELAY_MIN_THRESHOLD_NS {
        nanos.saturating_mul(1_000_000_000)
    } else {
        nanos
    };
    Ok(Some(Value::from(nanos.max(0))))
}

#[derive(Debug, Deserialize)]
struct ServiceCheckIn {
    #[serde(rename = "ID", default)]
    id: String,
}

/// `/v1/session/create`'s body, normalised by [`SESSION`].
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionIn {
    name: Option<String>,
    node: Option<String>,
    /// Nanoseconds.
    lock_delay: Option<u64>,
    behavior: Option<String>,
    #[serde(rename = "TTL")]
    ttl: Option<String>,
    checks: Option<Vec<String>>,
    node_checks: Option<Vec<String>>,
    service_checks: Option<Vec<ServiceCheckIn>>,
}

/// Decodes and validates a session create body as `create` does, without the store (the fuzz
/// target `registry_json`).
pub(crate) fn decode_create(body: &[u8]) {
    if let Ok(input) = decode::decode::<SessionIn>(body, &SESSION) {
        let _ = session_def(input, "local");
    }
}

/// Builds the session a create request asks for, with Consul's defaults and its check rules
/// (`fixupEmptySessionChecks`), validated as `Session.Apply` does. Errors are Consul's (500).
fn session_def(input: SessionIn, own_node: &str) -> Result<SessionDef, ApiError> {
    let rpc = |m: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m);
    let mut checks = vec![SERF_CHECK.to_owned()];
    let mut node_checks = vec![SERF_CHECK.to_owned()];
    if let Some(c) = input.checks {
        checks = c;
    }
    if let Some(c) = input.node_checks {
        node_checks = c;
    }
    if checks.is_empty() {
        node_checks.clear();
    } else if checks == [SERF_CHECK] || node_checks.is_empty() {
        checks.clear();
    }
    let node = input.node.unwrap_or_else(|| own_node.to_owned());
    if node.is_empty() {
        return Err(rpc("Must provide Node".to_owned()));
    }
    let behavior = match input.behavior.as_deref().unwrap_or_default() {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        other => return Err(rpc(format!("Invalid Behavior setting '{other}'"))),
    };
    let ttl = input.ttl.unwrap_or_default();
    if !ttl.is_empty() {
        let d = crate::config::parse_duration(&ttl)
            .map_err(|e| rpc(format!("Session TTL '{ttl}' invalid: {e}")))?;
        if !d.is_zero() && (d < TTL_MIN || d > TTL_MAX) {
            return Err(rpc(format!(
                "Invalid Session TTL '{}', must be between [{}={}]",
                d.as_nanos(),
                go_duration(TTL_MIN),
                go_duration(TTL_MAX)
            )));
        }
    }
    Ok(SessionDef {
        id: String::new(),
        name: input.name.unwrap_or_default(),
        node,
        lock_delay: input
            .lock_delay
            .map_or(DEFAULT_LOCK_DELAY, Duration::from_nanos),
        behavior,
        ttl,
        node_checks,
        service_checks: input
            .service_checks
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect(),
        checks,
    })
}

/// Go's `Duration.String()` for whole seconds (`10s`, `24h0m0s`).
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

/// A random version-4 UUID, as Consul's session ids are (unique, checked against the state).
fn new_id() -> String {
    super::events::uuid_v4()
}

async fn create(shared: &Shared, body: &[u8]) -> Result<Resp, ApiError> {
    let input: SessionIn = if body.iter().all(u8::is_ascii_whitespace) {
        SessionIn::default()
    } else {
        decode(body, &SESSION)?
    };
    let mut def = session_def(input, &shared.node_name)?;
    let own = shared.node_name.clone();
    let (_, id) = submit_with(shared, move |state, checks| {
        if let Some(reason) = invalid_reason(state, &own, &def) {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason));
        }
        def.id = loop {
            let id = new_id();
            if !state.sessions.contains_key(&id) {
                break id;
            }
        };
        checks.sessions.renew(&def, Instant::now());
        let id = def.id.clone();
        Ok((Some(Op::SessionCreate(def)), id))
    })
    .await?;
    Ok(json_body(StatusCode::OK, &json!({ "ID": id })))
}

async fn destroy(shared: &Shared, id: String) -> Result<Resp, ApiError> {
    submit_with(shared, move |state, checks| {
        checks.sessions.remove(&id);
        let op = state
            .sessions
            .contains_key(&id)
            .then(|| Op::SessionDestroy {
                id,
                at_ms: now_ms(),
            });
        Ok((op, ()))
    })
    .await?;
    Ok(plain(StatusCode::OK, "true"))
}

async fn renew(shared: &Shared, id: String) -> Result<Resp, ApiError> {
    let wanted = id.clone();
    let (_, session) = submit_with(shared, move |state, checks| {
        let session: Option<Arc<SessionEntry>> = state.sessions.get(&wanted).cloned();
        if let Some(s) = &session {
            checks.sessions.renew(&s.def, Instant::now());
        }
        Ok((None, session))
    })
    .await?;
    match session {
        Some(s) => Ok(json_body(StatusCode::OK, &[to_json(&s)])),
        None => Err(ApiError::not_found(format!("Session id '{id}' not found"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(body: &str) -> Result<SessionDef, ApiError> {
        let input: SessionIn = decode::decode(body.as_bytes(), &SESSION)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        session_def(input, "local")
    }

    #[test]
    fn checks_default_to_serf_health_and_an_empty_list_removes_it() {
        let d = def("{}").unwrap();
        assert_eq!(
            (d.node_checks, d.checks),
            (vec![SERF_CHECK.to_owned()], vec![])
        );
        let d = def(r#"{"checks": []}"#).unwrap();
        assert!(d.node_checks.is_empty() && d.checks.is_empty());
        let d = def(r#"{"Checks": ["a"]}"#).unwrap();
        assert_eq!(
            (d.checks, d.node_checks),
            (vec!["a".to_owned()], vec![SERF_CHECK.to_owned()])
        );
        let d = def(r#"{"NodeChecks": ["b"], "ServiceChecks": [{"ID": "s"}]}"#).unwrap();
        assert_eq!(d.all_checks().collect::<Vec<_>>(), ["b", "s"]);
    }

    #[test]
    fn a_lock_delay_below_a_microsecond_is_read_as_seconds() {
        let delay = |body: &str| def(body).unwrap().lock_delay;
        assert_eq!(delay("{}"), DEFAULT_LOCK_DELAY);
        assert_eq!(delay(r#"{"LockDelay": 5}"#), Duration::from_secs(5));
        assert_eq!(delay(r#"{"LockDelay": "20s"}"#), Duration::from_secs(20));
        assert_eq!(
            delay(r#"{"lockdelay": "0.001s"}"#),
            Duration::from_millis(1)
        );
        assert_eq!(
            delay(r#"{"LockDelay": 2000000000}"#),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn a_session_ttl_outside_ten_seconds_to_a_day_is_refused() {
        assert!(def(r#"{"TTL": "10s"}"#).is_ok());
        assert!(def(r#"{"TTL": "0s"}"#).is_ok());
        assert!(def(r#"{"TTL": "86400s"}"#).is_ok());
        let e = def(r#"{"TTL": "86401s"}"#).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid Session TTL '86401000000000', must be between [10s=24h0m0s]"
        );
        assert!(
            def(r#"{"TTL": "soon"}"#)
                .unwrap_err()
                .message
                .starts_with("Session TTL 'soon' invalid")
        );
    }

    #[test]
    fn a_new_id_is_a_version_4_uuid() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!("89ab".contains(&id[19..20]));
    }
}
