//! Health checks the registry runs itself: TTL deadlines, HTTP, TCP and H2PING probes, and
//! `DeregisterCriticalServiceAfter`.
//!
//! An HTTP check of an instance registered as speaking only h2c (meta `protocol = "h2c"` or tag
//! `h2c`, as the proxies read it: `routing::protocol_of`) is sent over HTTP/2 with prior
//! knowledge: a gRPC server answers nothing else. Consul's `H2PING` (with `H2PingUseTLS` false)
//! sends an HTTP/2 PING over h2c and passes when its answer comes.
//!
//! This is runtime state only (deadlines, next probe times); statuses live in the store and only
//! their *changes* are written. After a restart every TTL deadline starts again from "now" (a
//! grace of one TTL) and every probe runs at once.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::store::{CheckDefinition, CheckKey, Op, ServiceEntry, State};
use crate::catalog::Health;
use crate::routing::{Protocol, declared_protocol};

/// The probe timeout when a check gives none (Consul's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often time-based rules are looked at, at the least.
pub const MAX_TICK: Duration = Duration::from_secs(1);
/// How often they are looked at, at the most.
const MIN_TICK: Duration = Duration::from_millis(20);

#[derive(Debug)]
enum Kind {
    Ttl {
        ttl: Duration,
        deadline: Instant,
    },
    Probe(Probe),
    /// Status set from outside (catalog registrations without a definition).
    Passive,
}

#[derive(Debug)]
struct Probe {
    target: Target,
    interval: Duration,
    timeout: Duration,
    next: Instant,
    in_flight: bool,
}

/// What a probe checks: `GET` of an URL (2xx passing, 429 warning, else critical) over HTTP/1.1
/// or over h2c (HTTP/2 with prior knowledge), an HTTP/2 PING over h2c to `host:port` (passing if
/// answered), or a TCP connect (passing if it connects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Http(String),
    H2c(String),
    H2Ping(String),
    Tcp(String),
}

impl Target {
    /// What the registry runs for `def`, a check of `service` (`None` for a node check): its
    /// HTTP check over h2c when the service was registered as speaking only h2c.
    pub fn of(def: &CheckDefinition, service: Option<&ServiceEntry>) -> Option<Target> {
        if let Some(addr) = &def.h2ping {
            return Some(Target::H2Ping(addr.clone()));
        }
        if let Some(url) = &def.http {
            let h2c = service.is_some_and(|s| {
                declared_protocol(
                    s.meta.get("protocol").map(String::as_str),
                    s.tags.iter().map(String::as_str),
                ) == Protocol::H2c
            });
            return Some(if h2c {
                Target::H2c(url.clone())
            } else {
                Target::Http(url.clone())
            });
        }
        def.tcp.clone().map(Target::Tcp)
    }
}

#[derive(Debug)]
struct Runtime {
    kind: Kind,
    status: Health,
    service_id: String,
    critical_since: Option<Instant>,
    deregister_after: Option<Duration>,
    generation: u64,
}

/// A finished probe, sent back to the registry task.
#[derive(Debug)]
pub struct ProbeResult {
    key: CheckKey,
    generation: u64,
    status: Health,
    output: String,
}

/// The runtime side of every check in the store.
pub struct Checks {
    /// The TTLs of sessions: the other runtime side of time-based rules.
    pub sessions: super::session::Timers,
    entries: HashMap<CheckKey, Runtime>,
    generation: u64,
    results: mpsc::UnboundedSender<ProbeResult>,
    client: Prober,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checks")
            .field("entries", &self.entries.len())
            .finish()
    }
}

// === impl Checks ===

impl Checks {
    pub fn new(results: mpsc::UnboundedSender<ProbeResult>) -> Self {
        Self {
            sessions: super::session::Timers::default(),
            entries: HashMap::new(),
            generation: 0,
            results,
            client: probe_client(),
        }
    }

    /// Rebuilds the runtime of every check from `state` (at start, after a failed write).
    pub fn reset_all(&mut self, state: &State, now: Instant) -> Option<Instant> {
        self.sessions.reset_all(state, now);
        self.entries.clear();
        let keys: Vec<CheckKey> = state
            .nodes
            .values()
            .flat_map(|n| {
                n.check_owner
                    .keys()
                    .map(|c| (n.info.name.clone(), c.clone()))
            })
            .collect();
        self.touched(state, &keys, now)
    }

    /// Brings the runtime of the given checks in line with `state` after a write; returns when
    /// the earliest of them is next due, so the caller can tick then.
    pub fn touched(&mut self, state: &State, keys: &[CheckKey], now: Instant) -> Option<Instant> {
        let mut due: Option<Instant> = None;
        for key in keys {
            let Some(check) = state.check(&key.0, &key.1) else {
                self.entries.remove(key);
                continue;
            };
            let def = &check.definition;
            let service = state
                .nodes
                .get(&key.0)
                .and_then(|n| n.services.get(&check.service_id));
            let target = Target::of(def, service.map(|s| &**s));
            let same_definition = self
                .entries
                .get(key)
                .is_some_and(|rt| match (&rt.kind, def) {
                    (Kind::Ttl { ttl, .. }, d) => d.ttl == Some(*ttl),
                    (Kind::Probe(p), d) => {
                        target.as_ref() == Some(&p.target)
                            && d.interval == Some(p.interval)
                            && d.timeout.unwrap_or(DEFAULT_TIMEOUT) == p.timeout
                    }
                    (Kind::Passive, d) => d.ttl.is_none() && target.is_none(),
                });
            if let (true, Some(rt)) = (same_definition, self.entries.get_mut(key)) {
                rt.deregister_after = def.deregister_critical_after;
                Self::set_status(rt, check.status, now);
                due = earliest(due, next_due(rt));
                continue;
            }
            self.generation += 1;
            let kind = if let Some(ttl) = def.ttl {
                Kind::Ttl {
                    ttl,
                    deadline: now + ttl,
                }
            } else if let (Some(target), Some(interval)) = (target, def.interval) {
                Kind::Probe(Probe {
                    target,
                    interval,
                    timeout: def.timeout.unwrap_or(DEFAULT_TIMEOUT),
                    next: now,
                    in_flight: false,
                })
            } else {
                Kind::Passive
            };
            let mut rt = Runtime {
                kind,
                status: check.status,
                service_id: check.service_id.clone(),
                critical_since: None,
                deregister_after: def.deregister_critical_after,
                generation: self.generation,
            };
            if rt.status == Health::Critical {
                rt.critical_since = Some(now);
            }
            due = earliest(due, next_due(&rt));
            self.entries.insert(key.clone(), rt);
        }
        due
    }

    fn set_status(rt: &mut Runtime, status: Health, now: Instant) {
        if status == Health::Critical {
            rt.critical_since.get_or_insert(now);
        } else {
            rt.critical_since = None;
        }
        rt.status = status;
    }

    /// Restarts a TTL check's deadline; `false` when the check is not a TTL check.
    pub fn refresh_ttl(&mut self, key: &CheckKey, now: Instant) -> bool {
        match self.entries.get_mut(key) {
            Some(Runtime {
                kind: Kind::Ttl { ttl, deadline },
                ..
            }) => {
                *deadline = now + *ttl;
                true
            }
            _ => false,
        }
    }

    /// Turns a probe result into a status write, when it is current and changes something.
    pub fn on_result(&mut self, state: &State, result: ProbeResult) -> Option<Op> {
        let rt = self.entries.get_mut(&result.key)?;
        if rt.generation != result.generation {
            return None;
        }
        if let Kind::Probe(p) = &mut rt.kind {
            p.in_flight = false;
        }
        let check = state.check(&result.key.0, &result.key.1)?;
        (check.status != result.status || check.output != result.output).then_some(
            Op::CheckStatus {
                node: result.key.0,
                check_id: result.key.1,
                status: result.status,
                output: result.output,
            },
        )
    }

    /// Runs what is due at `now`: expires TTLs, starts probes, and deregisters services whose
    /// check stayed critical too long. Returns the writes to make and when to look again.
    pub fn tick(&mut self, now: Instant) -> (Vec<Op>, Instant) {
        let mut ops = Vec::new();
        let mut next = now + MAX_TICK;
        let mut deregistered = std::collections::HashSet::new();
        for (key, rt) in &mut self.entries {
            match &mut rt.kind {
                Kind::Ttl { deadline, .. } => {
                    if rt.status != Health::Critical {
                        if *deadline <= now {
                            ops.push(Op::CheckStatus {
                                node: key.0.clone(),
                                check_id: key.1.clone(),
                                status: Health::Critical,
                                output: "TTL expired".to_owned(),
                            });
                        } else {
                            next = next.min(*deadline);
                        }
                    }
                }
                Kind::Probe(p) => {
                    if !p.in_flight {
                        if p.next <= now {
                            p.in_flight = true;
                            p.next = now + p.interval;
                            let result = ProbeResult {
                                key: key.clone(),
                                generation: rt.generation,
                                status: Health::Critical,
                                output: String::new(),
                            };
                            spawn_probe(
                                self.client.clone(),
                                p.target.clone(),
                                p.timeout,
                                result,
                                self.results.clone(),
                            );
                        }
                        next = next.min(p.next);
                    }
                }
                Kind::Passive => {}
            }
            if let (Some(since), Some(after)) = (rt.critical_since, rt.deregister_after) {
                if rt.service_id.is_empty() {
                    continue;
                }
                if since + after <= now {
                    if deregistered.insert((key.0.clone(), rt.service_id.clone())) {
                        ops.push(Op::Deregister {
                            node: key.0.clone(),
                            service_id: Some(rt.service_id.clone()),
                            check_id: None,
                        });
                    }
                } else {
                    next = next.min(since + after);
                }
            }
        }
        (ops, next.max(now + MIN_TICK))
    }
}

/// When a check next needs the ticker: its TTL deadline, next probe, or deregistration time.
fn next_due(rt: &Runtime) -> Option<Instant> {
    let own = match &rt.kind {
        Kind::Ttl { deadline, .. } if rt.status != Health::Critical => Some(*deadline),
        Kind::Probe(p) if !p.in_flight => Some(p.next),
        _ => None,
    };
    let dereg = match (rt.critical_since, rt.deregister_after) {
        (Some(since), Some(after)) if !rt.service_id.is_empty() => Some(since + after),
        _ => None,
    };
    earliest(own, dereg)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The HTTP/1.1 client probes use (no connection kept between probes); h2c probes open a
/// connection of their own each.
pub type Prober = Client<HttpConnector, Empty<Bytes>>;

/// The client of [`probe_once`].
pub fn probe_client() -> Prober {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// Probes `target` once, within `timeout`: its health and a line saying why (Consul's output).
pub async fn probe_once(client: &Prober, target: &Target, timeout: Duration) -> (Health, String) {
    match tokio::time::timeout(timeout, probe(client, target)).await {
        Ok(r) => r,
        Err(_) => (
            Health::Critical,
            format!("{}: timed out after {timeout:?}", describe(target)),
        ),
    }
}

fn spawn_probe(
    client: Prober,
    target: Target,
    timeout: Duration,
    mut result: ProbeResult,
    results: mpsc::UnboundedSender<ProbeResult>,
) {
    tokio::spawn(async move {
        let (status, output) = probe_once(&client, &target, timeout).await;
        result.status = status;
        result.output = output;
        let _ = results.send(result);
    });
}

fn describe(target: &Target) -> String {
    match target {
        Target::Http(url) => format!("HTTP GET {url}"),
        Target::H2c(url) => format!("HTTP GET {url} (h2c)"),
        Target::H2Ping(addr) => format!("H2PING {addr} (h2c)"),
        Target::Tcp(addr) => format!("TCP connect {addr}"),
    }
}

/// The health an HTTP check's answer gives: 2xx passing, 429 warning, anything else critical.
fn health_of(status: http::StatusCode) -> Health {
    if status.is_success() {
        Health::Passing
    } else if status == http::StatusCode::TOO_MANY_REQUESTS {
        Health::Warning
    } else {
        Health::Critical
    }
}

async fn probe(client: &Prober, target: &Target) -> (Health, String) {
    let what = describe(target);
    match target {
        Target::H2c(url) => match h2c_get(url).await {
            Ok(status) => (health_of(status), format!("{what}: {status}")),
            Err(e) => (Health::Critical, format!("{what}: {e}")),
        },
        Target::H2Ping(addr) => match h2c_connect(addr).await {
            Ok((_send, mut ping)) => match ping.ping(h2::Ping::opaque()).await {
                Ok(_) => (
                    Health::Passing,
                    format!("{what}: HTTP2 ping was successful"),
                ),
                Err(e) => (Health::Critical, format!("{what}: ping failed: {e}")),
            },
            Err(e) => (Health::Critical, format!("{what}: {e}")),
        },
        Target::Http(url) => {
            let uri: http::Uri = match url.parse() {
                Ok(u) => u,
                Err(e) => return (Health::Critical, format!("{what}: {e}")),
            };
            let req = match http::Request::get(uri)
                .header(http::header::USER_AGENT, "Consul Health Check")
                .body(Empty::new())
            {
                Ok(r) => r,
                Err(e) => return (Health::Critical, format!("{what}: {e}")),
            };
            match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    (health_of(status), format!("{what}: {status}"))
                }
                Err(e) => (Health::Critical, format!("{what}: {e}")),
            }
        }
        Target::Tcp(addr) => match tokio::net::TcpStream::connect(addr.as_str()).await {
            Ok(_) => (Health::Passing, format!("{what}: Success")),
            Err(e) => (Health::Critical, format!("{what}: {e}")),
        },
    }
}

/// A fresh h2c connection (HTTP/2 with prior knowledge) to `addr` (`host:port`), driven in a
/// task of its own until its handles are dropped (bounded: a peer that never lets it close is
/// dropped after [`DEFAULT_TIMEOUT`]). Callers bound the whole probe by its timeout.
async fn h2c_connect(addr: &str) -> Result<(h2::client::SendRequest<Bytes>, h2::PingPong), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (send, mut conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let ping = conn
        .ping_pong()
        .ok_or_else(|| "HTTP/2 PING not available".to_owned())?;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DEFAULT_TIMEOUT, conn).await;
    });
    Ok((send, ping))
}

/// `GET url` over a fresh h2c connection: the answer's status.
async fn h2c_get(url: &str) -> Result<http::StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| "no host in the URL".to_owned())?;
    let addr = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.host()),
    };
    let (send, _ping) = h2c_connect(&addr).await?;
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "Consul Health Check")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::store::{CheckDef, CheckDefinition, Record, Registration, ServiceDef};

    fn state_with(definition: CheckDefinition, status: Option<Health>) -> (State, Vec<CheckKey>) {
        let mut state = State::default();
        let touched = state.apply(&Record {
            index: 2,
            op: Op::Register(Registration {
                node: "local".into(),
                address: "127.0.0.1".into(),
                node_meta: None,
                service: Some(ServiceDef {
                    id: "web-1".into(),
                    name: "web".into(),
                    tags: vec![],
                    address: String::new(),
                    port: 80,
                    meta: Default::default(),
                    weights: Default::default(),
                }),
                checks: vec![CheckDef {
                    id: "c".into(),
                    name: "c".into(),
                    service_id: "web-1".into(),
                    status,
                    output: String::new(),
                    notes: String::new(),
                    definition,
                }],
                replace_service_checks: true,
            }),
        });
        (state, touched)
    }

    fn checks() -> Checks {
        Checks::new(mpsc::unbounded_channel().0)
    }

    /// A server that speaks only HTTP/2 (h2c with prior knowledge) and answers `status`.
    async fn h2_only(status: u16) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(move |_req| async move {
                    let mut response = http::Response::new(http_body_util::Empty::<Bytes>::new());
                    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_http_check_of_an_h2c_only_server_passes_over_h2c_and_fails_over_http1() {
        let client = probe_client();
        let timeout = Duration::from_secs(5);
        let ok = h2_only(200).await;
        let url = format!("http://{ok}/health");
        let (health, output) = probe_once(&client, &Target::H2c(url.clone()), timeout).await;
        assert_eq!(health, Health::Passing, "{output}");
        assert_eq!(output, format!("HTTP GET {url} (h2c): 200 OK"));
        let (health, _) = probe_once(&client, &Target::Http(url), timeout).await;
        assert_eq!(
            health,
            Health::Critical,
            "HTTP/1.1 to an HTTP/2-only server"
        );
        let busy = h2_only(429).await;
        let (health, _) =
            probe_once(&client, &Target::H2c(format!("http://{busy}/")), timeout).await;
        assert_eq!(health, Health::Warning);

        let (health, output) = probe_once(&client, &Target::H2Ping(ok.to_string()), timeout).await;
        assert_eq!(health, Health::Passing, "{output}");
        // Nothing listening: critical, quickly.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (health, _) = probe_once(&client, &Target::H2Ping(closed.to_string()), timeout).await;
        assert_eq!(health, Health::Critical);
    }

    #[test]
    fn an_http_check_is_run_over_h2c_for_a_service_registered_as_h2c() {
        let def = CheckDefinition {
            http: Some("http://127.0.0.1:1/".into()),
            interval: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let service = |meta: &[(&str, &str)], tags: &[&str]| ServiceEntry {
            id: "s".into(),
            name: "s".into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            address: String::new(),
            port: 1,
            meta: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            weights: Default::default(),
            create_index: 1,
            modify_index: 1,
        };
        let h2c = Some(Target::H2c("http://127.0.0.1:1/".into()));
        let http1 = Some(Target::Http("http://127.0.0.1:1/".into()));
        assert_eq!(
            Target::of(&def, Some(&service(&[("protocol", "h2c")], &[]))),
            h2c
        );
        assert_eq!(Target::of(&def, Some(&service(&[], &["h2c"]))), h2c);
        assert_eq!(
            Target::of(&def, Some(&service(&[("protocol", "http1")], &[]))),
            http1
        );
        assert_eq!(Target::of(&def, None), http1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_check_expires_after_its_ttl_and_not_before() {
        let ttl = Duration::from_secs(5);
        let (state, touched) = state_with(
            CheckDefinition {
                ttl: Some(ttl),
                ..Default::default()
            },
            Some(Health::Passing),
        );
        let mut checks = checks();
        let start = Instant::now();
        assert_eq!(checks.touched(&state, &touched, start), Some(start + ttl));
        let (ops, next) = checks.tick(start + Duration::from_secs(4));
        assert!(ops.is_empty());
        assert_eq!(next, start + ttl);
        let (ops, _) = checks.tick(start + ttl);
        assert!(matches!(
            &ops[..],
            [Op::CheckStatus {
                status: Health::Critical,
                ..
            }]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshing_a_ttl_moves_its_deadline() {
        let (state, touched) = state_with(
            CheckDefinition {
                ttl: Some(Duration::from_secs(5)),
                ..Default::default()
            },
            Some(Health::Passing),
        );
        let mut checks = checks();
        let start = Instant::now();
        checks.touched(&state, &touched, start);
        assert!(checks.refresh_ttl(&touched[0], start + Duration::from_secs(4)));
        let (ops, _) = checks.tick(start + Duration::from_secs(8));
        assert!(ops.is_empty());
        let (ops, _) = checks.tick(start + Duration::from_secs(9));
        assert_eq!(ops.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_critical_for_longer_than_its_limit_is_deregistered() {
        let (state, touched) = state_with(
            CheckDefinition {
                ttl: Some(Duration::from_secs(60)),
                deregister_critical_after: Some(Duration::from_secs(3)),
                ..Default::default()
            },
            None,
        );
        let mut checks = checks();
        let start = Instant::now();
        checks.touched(&state, &touched, start);
        let (ops, next) = checks.tick(start + Duration::from_secs(2));
        assert!(ops.is_empty());
        assert_eq!(next, start + Duration::from_secs(3));
        let (ops, _) = checks.tick(start + Duration::from_secs(3));
        assert!(matches!(&ops[..], [Op::Deregister { service_id: Some(id), .. }] if id == "web-1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_check_does_not_count_towards_deregistration() {
        let (state, touched) = state_with(
            CheckDefinition {
                ttl: Some(Duration::from_secs(60)),
                deregister_critical_after: Some(Duration::from_secs(1)),
                ..Default::default()
            },
            Some(Health::Passing),
        );
        let mut checks = checks();
        let start = Instant::now();
        checks.touched(&state, &touched, start);
        let (ops, _) = checks.tick(start + Duration::from_secs(30));
        assert!(ops.is_empty());
    }
}
