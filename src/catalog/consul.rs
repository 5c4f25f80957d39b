//! The Consul backend: watches a Consul agent (or our embedded registry, which speaks the same
//! API) with blocking queries and publishes whole snapshots.
//!
//! One task watches `/v1/catalog/services`; one task per service watches
//! `/v1/health/service/<name>` (all statuses: an instance's health is its worst check). The
//! aggregating loop publishes only once every watched service has answered, so a snapshot is
//! never partial. Each watch follows Consul's client rules for blocking queries: an index that
//! goes backwards is reset to 0 (a fresh, non-blocking read); an index of 0 from the server is
//! clamped to 1; requests of one watch are at least [`MIN_INTERVAL`] apart; errors back off
//! exponentially with jitter, from [`BACKOFF_START`] to [`BACKOFF_MAX`], and the request after
//! an error blocks for at most [`RECOVERY_WAIT`], so a recovery is seen within a second. While Consul is unreachable the last
//! good snapshot stays in force and the error is reported through [`Publisher::fail`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::token::Token;

use super::{
    Backoff, DEFAULT_INBOUND_PORT, Discovery, Health, Instance, Interner, Node, NodeName, Nodes,
    Publisher, ServiceName, Snapshot,
};

/// The blocking wait asked of Consul when none is configured.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// The least time between two requests of one watch (Consul's rule: rate-limit the loop).
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// The first delay after an error.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest delay between retries after errors.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The largest response body read.
const MAX_RESPONSE: usize = 256 << 20;
const INBOUND_PORT_META: &str = "skyline-inbound-port";

/// Where to find Consul and how long to block.
#[derive(Clone, Debug)]
pub struct ConsulDiscovery {
    /// The Consul agent's (or our registry's) HTTP address, such as 127.0.0.1:8500.
    pub address: SocketAddr,
    /// How long one blocking query waits for a change; default 60 s. Consul caps it at 10 min.
    pub wait: Duration,
    /// Sent as `X-Consul-Token` on every request, for a registry or Consul with ACLs.
    pub token: Option<Token>,
}

impl ConsulDiscovery {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            wait: DEFAULT_WAIT,
            token: None,
        }
    }

    /// Sends `token` as `X-Consul-Token` on every request.
    #[must_use]
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("GET {path} failed")]
    Request {
        path: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("GET {path} did not answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("GET {path} answered {status}: {body}")]
    Status {
        path: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("reading the answer to GET {path} failed: {reason}")]
    Body { path: String, reason: String },
    #[error("cannot decode the answer to GET {path}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot build a request for {path}")]
    Build {
        path: String,
        #[source]
        source: http::Error,
    },
}

impl Discovery for ConsulDiscovery {
    fn describe(&self) -> String {
        format!("consul:{}", self.address)
    }

    async fn run(self, publisher: Publisher, shutdown: CancellationToken) {
        Aggregator::new(self, publisher).run(shutdown).await;
    }
}

// === Cursor: Consul's index rules ===

/// The index a watch sends next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    index: u64,
}

impl Cursor {
    /// The `?index=` to send; `None` for a non-blocking read (first call, or after a reset).
    pub fn query_index(&self) -> Option<u64> {
        (self.index > 0).then_some(self.index)
    }

    /// Takes in the `X-Consul-Index` of an answer.
    pub fn advance(&mut self, new: u64) {
        self.index = if new == 0 {
            // A server bug; sending 0 again would busy-loop.
            1
        } else if new < self.index {
            // Restored snapshot or new leader: start over with a fresh read.
            0
        } else {
            new
        };
    }
}

// === Wire types ===

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: NodeJson,
    service: ServiceJson,
    #[serde(default)]
    checks: Option<Vec<CheckJson>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson {
    node: String,
    address: String,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceJson {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    weights: Option<WeightsJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsJson {
    #[serde(default)]
    passing: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckJson {
    status: String,
}

/// One service's instances with the nodes they run on, as one answer gave them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct ServiceView {
    nodes: Vec<Node>,
    instances: Vec<Instance>,
}

impl ServiceView {
    /// Shares node names, meta and tags with every other view (see [`Interner`]), and the
    /// instance list with `previous` when it did not change.
    fn share(self, interner: &mut Interner, previous: Option<&SharedView>) -> SharedView {
        let mut node = |n: Node| Node {
            name: interner.node(&n.name),
            meta: interner.meta((*n.meta).clone()),
            ..n
        };
        let nodes: Vec<Node> = self.nodes.into_iter().map(&mut node).collect();
        let instances: Vec<Instance> = self
            .instances
            .into_iter()
            .map(|i| Instance {
                node: interner.node(&i.node),
                tags: interner.tags(i.tags.to_vec()),
                meta: interner.meta((*i.meta).clone()),
                ..i
            })
            .collect();
        let instances = match previous {
            Some(was) if *was.instances == *instances => was.instances.clone(),
            _ => instances.into(),
        };
        SharedView { nodes, instances }
    }
}

/// A [`ServiceView`] as kept between answers: shared strings, and an instance list that goes
/// into snapshots as is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SharedView {
    nodes: Vec<Node>,
    instances: Arc<[Instance]>,
}

fn parse_health(name: &ServiceName, body: &[u8], path: &str) -> Result<ServiceView, ConsulError> {
    let entries: Vec<HealthEntry> =
        serde_json::from_slice(body).map_err(|source| ConsulError::Decode {
            path: path.to_owned(),
            source,
        })?;
    let mut view = ServiceView::default();
    for entry in entries {
        let Ok(node_addr) = entry.node.address.parse::<IpAddr>() else {
            tracing::warn!(node = %entry.node.node, address = %entry.node.address, "node address is not an IP; instance left out");
            continue;
        };
        let node_meta = entry.node.meta.unwrap_or_default();
        let svc = entry.service;
        let address = if svc.address.is_empty() {
            node_addr
        } else if let Ok(ip) = svc.address.parse() {
            ip
        } else {
            tracing::warn!(service = %name, id = %svc.id, address = %svc.address, "service address is not an IP; instance left out");
            continue;
        };
        let health = entry
            .checks
            .unwrap_or_default()
            .iter()
            .map(|c| match c.status.as_str() {
                "passing" => Health::Passing,
                "warning" => Health::Warning,
                _ => Health::Critical,
            })
            .max()
            .unwrap_or(Health::Passing);
        let node = NodeName::from(entry.node.node);
        if !view.nodes.iter().any(|n| n.name == node) {
            view.nodes.push(Node {
                name: node.clone(),
                address: node_addr,
                inbound_port: node_meta
                    .get(INBOUND_PORT_META)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(DEFAULT_INBOUND_PORT),
                meta: node_meta.into(),
            });
        }
        view.instances.push(Instance {
            id: svc.id,
            service: name.clone(),
            node,
            address,
            port: svc.port,
            tags: svc.tags.unwrap_or_default().into(),
            meta: svc.meta.unwrap_or_default().into(),
            health,
            weight: svc.weights.map_or(1, |w| w.passing.max(1)),
        });
    }
    view.instances
        .sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    Ok(view)
}

fn parse_services(body: &[u8], path: &str) -> Result<BTreeSet<ServiceName>, ConsulError> {
    let map: BTreeMap<String, Option<Vec<String>>> =
        serde_json::from_slice(body).map_err(|source| ConsulError::Decode {
            path: path.to_owned(),
            source,
        })?;
    Ok(map
        .into_keys()
        .filter_map(|name| match ServiceName::parse(&name) {
            Ok(n) => Some(n),
            Err(error) => {
                tracing::debug!(%error, "service name outside the mesh contract; not watched");
                None
            }
        })
        .collect())
}

// === HTTP ===

#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
    wait: Duration,
    token: Option<Token>,
}

impl Http {
    fn new(address: SocketAddr, wait: Duration, token: Option<Token>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            address,
            wait,
            token,
        }
    }

    /// One (blocking) GET: the answer's `X-Consul-Index` and body.
    /// A read of `path`: blocking at `index` (for at most the configured wait, or
    /// [`RECOVERY_WAIT`] when `recovering`), or plain without one.
    async fn get(
        &self,
        path: &str,
        index: Option<u64>,
        recovering: bool,
    ) -> Result<(u64, Bytes), ConsulError> {
        let wait = if recovering {
            RECOVERY_WAIT.min(self.wait)
        } else {
            self.wait
        };
        let uri = match index {
            Some(i) => format!(
                "http://{}{path}?index={i}&wait={}ms",
                self.address,
                wait.as_millis()
            ),
            None => format!("http://{}{path}", self.address),
        };
        let mut req = http::Request::get(uri);
        if let Some(token) = &self.token {
            req = req.header("x-consul-token", token.expose());
        }
        let req = req
            .body(Empty::new())
            .map_err(|source| ConsulError::Build {
                path: path.to_owned(),
                source,
            })?;
        let timeout = wait + wait / 16 + Duration::from_secs(5);
        let fetch = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|source| ConsulError::Request {
                    path: path.to_owned(),
                    source,
                })?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ConsulError::Body {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            if !status.is_success() {
                let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(ConsulError::Status {
                    path: path.to_owned(),
                    status,
                    body,
                });
            }
            Ok((index, body))
        };
        match tokio::time::timeout(timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(ConsulError::Timeout {
                path: path.to_owned(),
                timeout,
            }),
        }
    }
}

/// The longest a watch's first request after an error blocks.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(1);

// === Watches ===

#[derive(Debug)]
enum Event {
    /// The services and the answer's `X-Consul-Index`.
    Services(Result<(u64, BTreeSet<ServiceName>), Failure>),
    /// One service's instances and the answer's `X-Consul-Index`.
    Service(ServiceName, Result<(u64, ServiceView), Failure>),
}

/// Why a watch's request failed, and whether Consul refused the reader (401, 403: the token)
/// rather than not answering.
#[derive(Clone, Debug)]
struct Failure {
    error: String,
    refused: bool,
}

impl Failure {
    fn of(error: &ConsulError) -> Self {
        let refused = matches!(
            error,
            ConsulError::Status { status, .. }
                if *status == http::StatusCode::UNAUTHORIZED || *status == http::StatusCode::FORBIDDEN
        );
        Failure {
            error: crate::error_chain(error),
            refused,
        }
    }
}

/// Runs one blocking-query loop until `stop`, sending each answer (or error) to the aggregator.
async fn watch<T>(
    http: Http,
    path: String,
    parse: impl Fn(&[u8], &str) -> Result<T, ConsulError>,
    wrap: impl Fn(Result<(u64, T), Failure>) -> Event,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut cursor = Cursor::default();
    let mut recovering = false;
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    let mut last_start: Option<Instant> = None;
    loop {
        if let Some(start) = last_start {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(start + MIN_INTERVAL) => {}
            }
        }
        last_start = Some(Instant::now());
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = http.get(&path, cursor.query_index(), recovering) => r,
        };
        let result = result.and_then(|(index, body)| Ok((index, parse(&body, &path)?)));
        match result {
            Ok((index, value)) => {
                cursor.advance(index);
                recovering = false;
                backoff.reset();
                if tx.send(wrap(Ok((index, value)))).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                // The next request blocks only briefly: a full wait on a server that came back
                // unchanged would keep the error standing that long. (Not a plain read: with
                // thousands of watches, plain reads after a burst of errors made a full resync
                // ten times slower.)
                recovering = true;
                let failure = Failure::of(&error);
                tracing::debug!(error = %failure.error, "consul watch failed");
                if tx.send(wrap(Err(failure))).await.is_err() {
                    return;
                }
                let delay = backoff.delay();
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

struct Aggregator {
    config: ConsulDiscovery,
    http: Http,
    publisher: Publisher,
    /// `None` until `/v1/catalog/services` first answered.
    wanted: Option<BTreeSet<ServiceName>>,
    views: BTreeMap<ServiceName, SharedView>,
    interner: Interner,
    watches: HashMap<ServiceName, CancellationToken>,
    /// Current errors by source ("catalog" or a service name).
    errors: BTreeMap<String, Failure>,
    /// Whether the last publish reported an error, to log the change once, not every retry.
    failing: bool,
    last: Option<Arc<Snapshot>>,
    /// The `X-Consul-Index` of the last `/v1/catalog/services` answer, and of each watched
    /// service's last answer: the snapshot's version is the highest (see [`Self::version`]).
    services_index: u64,
    indexes: BTreeMap<ServiceName, u64>,
}

impl Aggregator {
    fn new(config: ConsulDiscovery, publisher: Publisher) -> Self {
        let http = Http::new(config.address, config.wait, config.token.clone());
        Self {
            config,
            http,
            publisher,
            wanted: None,
            views: BTreeMap::new(),
            interner: Interner::default(),
            watches: HashMap::new(),
            errors: BTreeMap::new(),
            failing: false,
            last: None,
            services_index: 0,
            indexes: BTreeMap::new(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel(256);
        let stop = shutdown.child_token();
        tokio::spawn(watch(
            self.http.clone(),
            "/v1/catalog/services".to_owned(),
            parse_services,
            Event::Services,
            tx.clone(),
            stop.clone(),
        ));
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = rx.recv() => match event {
                    Some(e) => e,
                    None => break,
                },
            };
            match event {
                Event::Services(Ok((index, names))) => {
                    self.errors.remove("catalog");
                    self.services_index = index;
                    self.set_services(names, &tx, &stop);
                    self.publish();
                }
                Event::Services(Err(error)) => {
                    self.errors.insert("catalog".to_owned(), error);
                    self.publish();
                }
                Event::Service(name, result) => {
                    if !self.watches.contains_key(&name) {
                        continue; // a late answer for a service no longer watched
                    }
                    match result {
                        Ok((index, view)) => {
                            let had_error = self.errors.remove(name.as_str()).is_some();
                            let moved = self.indexes.insert(name.clone(), index) != Some(index);
                            let previous = self.views.get(&name);
                            let view = view.share(&mut self.interner, previous);
                            if !had_error && !moved && previous == Some(&view) {
                                continue; // a blocking query that timed out: nothing new
                            }
                            self.views.insert(name, view);
                        }
                        Err(error) => {
                            self.errors.insert(name.to_string(), error);
                        }
                    }
                    self.publish();
                }
            }
        }
        stop.cancel();
    }

    fn set_services(
        &mut self,
        names: BTreeSet<ServiceName>,
        tx: &mpsc::Sender<Event>,
        stop: &CancellationToken,
    ) {
        self.watches.retain(|name, token| {
            let keep = names.contains(name);
            if !keep {
                token.cancel();
            }
            keep
        });
        self.views.retain(|name, _| names.contains(name));
        self.indexes.retain(|name, _| names.contains(name));
        self.errors
            .retain(|source, _| source == "catalog" || names.contains(source.as_str()));
        for name in &names {
            if self.watches.contains_key(name) {
                continue;
            }
            let token = stop.child_token();
            let for_wrap = name.clone();
            let for_parse = name.clone();
            tokio::spawn(watch(
                self.http.clone(),
                format!("/v1/health/service/{name}"),
                move |body, path| parse_health(&for_parse, body, path),
                move |result| Event::Service(for_wrap.clone(), result),
                tx.clone(),
                token.clone(),
            ));
            self.watches.insert(name.clone(), token);
        }
        self.wanted = Some(names);
    }

    /// Publishes the whole snapshot once every watched service has answered; reports errors.
    fn publish(&mut self) {
        let complete = self
            .wanted
            .as_ref()
            .is_some_and(|w| w.iter().all(|n| self.views.contains_key(n)));
        if complete {
            let snapshot = self.build();
            let changed = self.last.as_deref() != Some(&snapshot);
            if changed || self.errors.is_empty() {
                let snapshot = Arc::new(snapshot);
                self.publisher
                    .publish_at(snapshot.clone(), Some(self.version()));
                self.last = Some(snapshot);
            }
        }
        // A refusal first: it is what keeps the catalog away for good.
        let shown =
            (self.errors.iter().find(|(_, f)| f.refused)).or_else(|| self.errors.iter().next());
        if let Some((source, failure)) = shown {
            let more = self.errors.len() - 1;
            let suffix = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            let error = format!(
                "{} ({source}): {}{suffix}",
                self.config.describe(),
                failure.error
            );
            if !self.failing {
                tracing::warn!(%error, "consul catalog failing; keeping the last good catalog");
            }
            if failure.refused {
                self.publisher.refuse(error);
            } else {
                self.publisher.fail(error);
            }
            self.failing = true;
        } else if self.failing && complete {
            tracing::info!(catalog = %self.config.describe(), "consul catalog answers again");
            self.failing = false;
        }
    }

    /// The catalog version of the snapshot: the highest index among the answers it was built
    /// from. A registry gives every write a higher index, so this is the last write that
    /// changed what the snapshot covers.
    fn version(&self) -> u64 {
        self.indexes
            .values()
            .copied()
            .fold(self.services_index, u64::max)
    }

    /// The snapshot of every view: instance lists as the views hold them, and the node map of
    /// the last snapshot when the nodes did not change.
    fn build(&self) -> Snapshot {
        let mut nodes = Nodes::new();
        let mut services = BTreeMap::new();
        for (name, view) in &self.views {
            for node in &view.nodes {
                nodes
                    .entry(node.name.clone())
                    .or_insert_with(|| node.clone());
            }
            if !view.instances.is_empty() {
                services.insert(name.clone(), view.instances.clone());
            }
        }
        let nodes = match &self.last {
            Some(last) if *last.nodes == nodes => last.nodes.clone(),
            _ => Arc::new(nodes),
        };
        Snapshot { nodes, services }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_that_goes_backwards_resets_to_a_fresh_read() {
        let mut c = Cursor::default();
        assert_eq!(c.query_index(), None);
        c.advance(42);
        assert_eq!(c.query_index(), Some(42));
        c.advance(7);
        assert_eq!(c.query_index(), None);
        c.advance(7);
        assert_eq!(c.query_index(), Some(7));
    }

    #[test]
    fn an_index_of_zero_is_clamped_to_one() {
        let mut c = Cursor::default();
        c.advance(0);
        assert_eq!(c.query_index(), Some(1));
        c.advance(0);
        assert_eq!(c.query_index(), Some(1));
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let first = b.delay();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let mut last = first;
        for _ in 0..20 {
            last = b.delay();
        }
        assert!(last >= BACKOFF_MAX / 2 && last <= BACKOFF_MAX);
        b.reset();
        assert!(b.delay() <= BACKOFF_START);
    }

    #[test]
    fn an_unchanged_answer_keeps_its_instances_and_shares_strings_with_other_services() {
        let answer = |port: u16| {
            format!(
                r#"[{{"Node":{{"Node":"n1","Address":"10.0.0.1"}},
                "Service":{{"ID":"i1","Service":"s","Meta":{{"platform":"mesos"}},"Port":{port}}},
                "Checks":[]}}]"#
            )
        };
        let (web, db) = (
            ServiceName::parse("web").unwrap(),
            ServiceName::parse("db").unwrap(),
        );
        let parse =
            |name: &ServiceName, port| parse_health(name, answer(port).as_bytes(), "/x").unwrap();
        let mut interner = Interner::default();
        let first = parse(&web, 80).share(&mut interner, None);
        let again = parse(&web, 80).share(&mut interner, Some(&first));
        assert!(Arc::ptr_eq(&first.instances, &again.instances));
        let moved = parse(&web, 81).share(&mut interner, Some(&first));
        assert!(!Arc::ptr_eq(&first.instances, &moved.instances));
        let other = parse(&db, 80).share(&mut interner, None);
        assert!(Arc::ptr_eq(
            &first.instances[0].meta,
            &other.instances[0].meta
        ));
        assert_eq!(
            first.instances[0].node.as_str().as_ptr(),
            other.nodes[0].name.as_str().as_ptr()
        );
    }

    #[test]
    fn parses_a_health_answer_with_worst_check_and_defaults() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.0.0.1","Meta":{"skyline-inbound-port":"6000"}},
            "Service":{"ID":"web-1","Service":"web","Tags":null,"Address":"","Meta":null,"Port":80},
            "Checks":[{"Status":"passing"},{"Status":"warning"}]},
            {"Node":{"Node":"n2","Address":"not-an-ip"},"Service":{"ID":"web-2","Service":"web","Port":81},"Checks":[]}]"#;
        let name = ServiceName::parse("web").unwrap();
        let view = parse_health(&name, body, "/v1/health/service/web").unwrap();
        assert_eq!(view.instances.len(), 1);
        let i = &view.instances[0];
        assert_eq!(i.health, Health::Warning);
        assert_eq!(i.address, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(i.weight, 1);
        assert_eq!(view.nodes[0].inbound_port, 6000);
    }
}
