//! Choosing an endpoint of a route: power of two choices over EWMA latency (the default) or
//! weighted round robin, passive outlier ejection, and panic routing.
//!
//! Each endpoint carries an [`EndpointState`] behind an `Arc`. A route rebuilt after a catalog
//! change inherits the states of the addresses it keeps ([`Route::inherit`]), so latency
//! estimates and ejections survive table swaps.
//!
//! - **Latency**: each response head updates an exponentially weighted moving average with a
//!   time constant of [`DECAY`]; an endpoint that gets no traffic decays towards zero, so it is
//!   tried again later. The cost of an endpoint is its estimate times its requests in flight plus
//!   one. Of the two endpoints drawn, each is taken with a probability inverse to its cost (Twitter
//!   Finagle's and Linkerd's p2c take the cheaper outright, over a *peak* EWMA with a 10 s time
//!   constant): two equal endpoints then share evenly at steady load, where one slow answer used
//!   to send nearly all traffic to the other for seconds (597/3 requests in 3 s, measured), while
//!   a markedly slower endpoint still gets a share in proportion (1 ms against 50 ms: 2 %). A
//!   sudden stall needs no peak estimate to be seen: its requests in flight pile up in its cost.
//! - **Ejection** (Envoy's outlier detection): after `consecutive_failures` failures in a row
//!   (5xx, refused or reset connections, timeouts) an endpoint sits out for the base ejection time
//!   times the number of its ejections, up to a maximum. Never more than `max_ejected_percent` of
//!   a route is out at once: past that share a failing endpoint stays in rotation.
//! - **Panic**: when no endpoint of a route is healthy (every one ejected or failing its active
//!   probe), the route uses all of them rather than none, and says so to the caller, who logs it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Serialize;

use super::budget::RetryBudget;
use super::reach::Observed;

/// The time constant of the latency estimate: long enough to smooth one answer's jitter over a
/// hundred, short enough that an endpoint's recovery counts within seconds.
pub const DECAY: Duration = Duration::from_secs(1);

/// The least cost an endpoint's latency counts for, so a new endpoint (no estimate yet) takes
/// a few requests at once rather than every request until its first answer.
const RTT_FLOOR_NS: f64 = 10_000.0;

/// How requests are spread over a route's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Of two endpoints drawn at random (by weight), the one with the lower latency × load.
    #[default]
    P2c,
    /// Each endpoint in turn, as often as its weight.
    RoundRobin,
}

/// When an endpoint is taken out of rotation (Envoy's outlier detection, with its defaults
/// except `max_ejected_percent`, which the issue sets to half a pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Outlier {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; the n-th lasts n times as long.
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    pub max_ejection: Duration,
    /// The largest share of a route that may be ejected at once.
    pub max_ejected_percent: u8,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

// === Clock ===

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the first call in this process: a monotonic clock that fits an atomic.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `at` on the [`now_ns`] scale, so a caller that already read the clock need not read it again.
pub fn ns_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_nanos()).unwrap_or(u64::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// === EndpointState ===

/// What the proxy has learnt about one endpoint: latency, load and failures.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests sent and not yet answered.
    pending: AtomicU32,
    /// The EWMA latency estimate, in nanoseconds (`f64` bits).
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated ([`now_ns`]).
    stamp_ns: AtomicU64,
    /// Failures since the last success.
    failures: AtomicU32,
    /// How many times this endpoint was ejected.
    ejections: AtomicU32,
    /// Until when it is ejected ([`now_ns`]; 0 when never).
    ejected_until_ns: AtomicU64,
    /// Set while the active health probe finds it down.
    probe_down: AtomicBool,
    /// The active probe's results in a row: passes (> 0) or failures (< 0).
    probe_streak: std::sync::atomic::AtomicI32,
}

/// The result of one attempt, for the endpoint's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A 5xx response, a refused or reset connection, a timeout.
    Failure,
}

impl EndpointState {
    /// Counts a request in flight until the returned guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(now_ns())
    }

    /// [`start`](Self::start) at `now` ([`now_ns`] scale).
    pub fn start_at(self: &Arc<Self>, now: u64) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state: self.clone(),
            started: now,
        }
    }

    /// The latency estimate at `now`, decayed towards zero for the time without samples.
    fn rtt_at(&self, now: u64) -> f64 {
        let (rtt, w) = self.last(now);
        rtt * w
    }

    /// The estimate as of the last sample, and the weight `w` it keeps at `now`.
    fn last(&self, now: u64) -> (f64, f64) {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        let idle = now.saturating_sub(stamp) as f64;
        (rtt, (-idle / DECAY.as_nanos() as f64).exp())
    }

    /// Adds a sample: the older the estimate, the more the sample counts (all of it after a long
    /// silence, so a first answer sets the estimate).
    fn observe(&self, rtt: f64, now: u64) {
        let (last, w) = self.last(now);
        let next = last * w + rtt * (1.0 - w);
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    fn cost(&self, now: u64) -> f64 {
        let pending = f64::from(self.pending.load(Ordering::Relaxed));
        (self.rtt_at(now) + RTT_FLOOR_NS) * (pending + 1.0)
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) > now
    }

    fn healthy(&self, now: u64) -> bool {
        !self.ejected(now) && !self.probe_down.load(Ordering::Relaxed)
    }

    /// Records an active probe's verdict.
    pub fn set_probe_down(&self, down: bool) {
        self.probe_down.store(down, Ordering::Relaxed);
    }

    /// Records one active probe: `unhealthy` failures in a row take the endpoint out,
    /// `healthy` passes in a row bring it back. Returns the change, if any (`Some(true)`: now
    /// down).
    pub fn record_probe(&self, passed: bool, unhealthy: u32, healthy: u32) -> Option<bool> {
        let streak = self.probe_streak.load(Ordering::Relaxed);
        let streak = match (passed, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.probe_streak.store(streak, Ordering::Relaxed);
        let down = self.is_probe_down();
        let limit = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        if !down && streak <= -limit(unhealthy) {
            self.set_probe_down(true);
            return Some(true);
        }
        if down && streak >= limit(healthy) {
            self.set_probe_down(false);
            return Some(false);
        }
        None
    }

    pub fn is_probe_down(&self) -> bool {
        self.probe_down.load(Ordering::Relaxed)
    }

    fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
            }
            Outcome::Failure => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ejects the endpoint for the base time × its ejection count (capped), and resets its
    /// failure count so it starts afresh when it comes back.
    fn eject(&self, outlier: &Outlier, now: u64) -> Duration {
        let n = self
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let time = outlier
            .base_ejection
            .saturating_mul(n)
            .min(outlier.max_ejection);
        self.ejected_until_ns
            .store(now.saturating_add(nanos(time)), Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        time
    }

    /// What `/routes` shows of the state.
    pub fn view(&self) -> StateView {
        let now = now_ns();
        StateView {
            pending: self.pending.load(Ordering::Relaxed),
            latency_ms: self.rtt_at(now) / 1e6,
            failures: self.failures.load(Ordering::Relaxed),
            ejected: self.ejected(now),
            ejections: self.ejections.load(Ordering::Relaxed),
            probe_down: self.probe_down.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StateView {
    pending: u32,
    latency_ms: f64,
    failures: u32,
    pub(crate) ejected: bool,
    ejections: u32,
    pub(crate) probe_down: bool,
}

/// One request in flight to an endpoint; finishing it records latency and outcome. Dropped
/// unfinished (the caller gave up), it only stops counting as in flight.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    started: u64,
}

impl InFlight {
    /// The response head came (or the attempt failed) now.
    pub fn finish(self, outcome: Outcome) {
        self.finish_at(outcome, now_ns());
    }

    /// [`finish`](Self::finish) at `now` ([`now_ns`] scale).
    pub fn finish_at(self, outcome: Outcome, now: u64) {
        self.state
            .observe(now.saturating_sub(self.started) as f64, now);
        self.state.record(outcome);
    }

    /// The attempt ended without telling anything about the endpoint (a pooled connection the
    /// endpoint had closed): not a sample, not a failure.
    pub fn forget(self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

// === Endpoint ===

/// One place a request can be sent, with its traffic weight and what is known about it.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a `Host` header value, built once here rather than per request.
    #[serde(skip)]
    pub host: HeaderValue,
    pub weight: u32,
    /// What the endpoint speaks: HTTP/1.1, h2c (HTTP/2 over cleartext with prior knowledge,
    /// see `proxy::h2`), or both (another Skyline proxy).
    #[serde(skip_serializing_if = "Protocol::is_http1")]
    pub protocol: Protocol,
    /// The endpoint is a mesh proxy (an inbound listener, a gateway, a bridge), not an
    /// application: with mesh TLS on, hops to it are mTLS (see `tls`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mesh: bool,
    #[serde(serialize_with = "view_state")]
    pub state: Arc<EndpointState>,
}

fn view_state<S: serde::Serializer>(state: &Arc<EndpointState>, s: S) -> Result<S::Ok, S::Error> {
    state.view().serialize(s)
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
            && self.weight == other.weight
            && self.protocol == other.protocol
            && self.mesh == other.mesh
    }
}

impl Eq for Endpoint {}

impl Endpoint {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        // A `SocketAddr`'s text is always a valid header value.
        let host = HeaderValue::try_from(addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Self {
            addr,
            host,
            weight,
            protocol: Protocol::Http1,
            mesh: false,
            state: Arc::default(),
        }
    }

    /// This endpoint, speaking `protocol`.
    pub fn speaking(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// This endpoint, a mesh proxy when `mesh`.
    pub fn with_mesh(mut self, mesh: bool) -> Self {
        self.mesh = mesh;
        self
    }
}

/// The HTTP versions an endpoint speaks, which decide how a request is sent to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 only: every request goes over HTTP/1.1 (an instance registered with no
    /// protocol, or with `http1`).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge only: every request goes over HTTP/2, an
    /// HTTP/1.1 caller's too (an instance registered with `h2c`: a gRPC server, say). An
    /// upgrade (WebSocket) still goes over HTTP/1.1, which alone can carry it.
    H2c,
    /// Both, on one port: a Skyline proxy (an inbound, a gateway, a bridge). A request goes on
    /// in the version it came in, so an HTTP/2 request keeps its trailers.
    Both,
}

impl Protocol {
    pub fn is_http1(&self) -> bool {
        *self == Protocol::Http1
    }

    /// Whether a request that came in HTTP/2 (`http2`), or is an upgrade (`upgrade`), goes to
    /// an endpoint speaking this over HTTP/2. `peers_h2`: every request but an upgrade goes to
    /// another Skyline proxy ([`Protocol::Both`]) over HTTP/2, whatever the caller spoke (the
    /// `[mesh] peer_protocol` setting, see `proxy::h2`).
    pub fn sends_h2(self, http2: bool, upgrade: bool, peers_h2: bool) -> bool {
        match self {
            Protocol::Http1 => false,
            Protocol::H2c => !upgrade,
            Protocol::Both => http2 || (peers_h2 && !upgrade),
        }
    }
}

// === Route ===

/// The endpoints of one service and the retry budget of the requests sent to them.
#[derive(Debug, Default, Serialize)]
pub struct Route {
    pub endpoints: Box<[Endpoint]>,
    /// Indices into `endpoints`, each repeated by its (reduced) weight; empty when all weights
    /// are equal, in which case picks are uniform over `endpoints`.
    #[serde(skip)]
    schedule: Box<[u32]>,
    #[serde(skip)]
    next: AtomicUsize,
    #[serde(skip)]
    pub budget: Arc<RetryBudget>,
    /// Whether requests found the route reachable (see [`reach`](super::reach)). Kept by a
    /// rebuilt route with the same endpoints: new endpoints are a new chance.
    #[serde(serialize_with = "view_reach")]
    pub observed: Arc<Observed>,
}

fn view_reach<S: serde::Serializer>(observed: &Arc<Observed>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(observed.reach().label())
}

/// An endpoint chosen for one attempt, and what choosing it revealed.
#[derive(Debug)]
pub struct Choice {
    pub endpoint: Endpoint,
    /// No endpoint of the route was healthy: this one was chosen among all of them.
    pub panic: bool,
    /// An endpoint ejected while choosing (it had just reached its failure threshold).
    pub ejected: Option<(SocketAddr, Duration)>,
}

/// The largest repeat count a weight is reduced to, to keep schedules small.
const MAX_SCHEDULE_WEIGHT: u32 = 100;

impl Route {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        let schedule = schedule(&endpoints);
        Self {
            endpoints: endpoints.into_boxed_slice(),
            schedule,
            next: AtomicUsize::new(fastrand::usize(..1024)),
            budget: Arc::default(),
            observed: Arc::default(),
        }
    }

    /// Takes over the endpoint states (matched by address) and the retry budget of the route
    /// this one replaces, and its reachability when the endpoints are the same.
    pub fn inherit(mut self, previous: &Route) -> Self {
        for endpoint in self.endpoints.iter_mut() {
            if let Some(old) = previous.endpoints.iter().find(|e| e.addr == endpoint.addr) {
                endpoint.state = old.state.clone();
            }
        }
        self.budget = previous.budget.clone();
        let same = |a: &Route, b: &Route| {
            a.endpoints.len() == b.endpoints.len()
                && a.endpoints
                    .iter()
                    .all(|e| b.endpoints.iter().any(|o| o.addr == e.addr))
        };
        if same(&self, previous) {
            self.observed = previous.observed.clone();
        }
        self
    }

    /// Whether no endpoint is left to try at `now` ([`now_ns`]): each one is in `tried`,
    /// ejected or failing its active probe. Ejection itself happens in [`choose_at`](Self::choose_at).
    pub fn exhausted(&self, tried: &[SocketAddr], now: u64) -> bool {
        self.endpoints
            .iter()
            .all(|e| tried.contains(&e.addr) || !e.state.healthy(now))
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The index the `n`-th weighted draw lands on.
    fn slot(&self, n: usize) -> Option<usize> {
        if self.schedule.is_empty() {
            let len = self.endpoints.len();
            (len > 0).then(|| n % len)
        } else {
            Some(self.schedule[n % self.schedule.len()] as usize)
        }
    }

    /// Chooses an endpoint not in `tried`, or `None` when every endpoint was tried.
    pub fn choose(
        &self,
        tried: &[SocketAddr],
        balance: Balance,
        outlier: &Outlier,
    ) -> Option<Choice> {
        self.choose_at(tried, balance, outlier, now_ns())
    }

    pub fn choose_at(
        &self,
        tried: &[SocketAddr],
        balance: Balance,
        outlier: &Outlier,
        now: u64,
    ) -> Option<Choice> {
        let n = self.endpoints.len();
        let mut ejected = None;
        // Ejection happens here rather than where the failure is recorded: only the route knows
        // how many of its endpoints are out already.
        let mut usable = |i: usize| {
            let e = &self.endpoints[i];
            if tried.contains(&e.addr) {
                return false;
            }
            let failures = e.state.failures.load(Ordering::Relaxed);
            if outlier.consecutive_failures > 0
                && failures >= outlier.consecutive_failures
                && !e.state.ejected(now)
                && self.may_eject(outlier, now)
            {
                let time = e.state.eject(outlier, now);
                ejected = Some((e.addr, time));
            }
            e.state.healthy(now)
        };
        let found = match balance {
            Balance::P2c => self.two_choices(&mut usable, now),
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let span = self.schedule.len().max(n);
                (0..span)
                    .filter_map(|k| self.slot(start + k))
                    .find(|&i| usable(i))
            }
        };
        if let Some(i) = found {
            return Some(Choice {
                endpoint: self.endpoints[i].clone(),
                panic: false,
                ejected,
            });
        }
        // No healthy endpoint left to try. Panic only when none is healthy at all; otherwise
        // every healthy one was tried already.
        let any_healthy = self.endpoints.iter().any(|e| e.state.healthy(now));
        if any_healthy {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (0..self.schedule.len().max(n))
            .filter_map(|k| self.slot(start + k))
            .find(|&i| !tried.contains(&self.endpoints[i].addr))?;
        Some(Choice {
            endpoint: self.endpoints[i].clone(),
            panic: true,
            ejected,
        })
    }

    /// Of two usable endpoints drawn by weight, one by inverse cost; a full scan when draws
    /// keep landing on unusable ones.
    fn two_choices(&self, usable: &mut impl FnMut(usize) -> bool, now: u64) -> Option<usize> {
        let n = self.endpoints.len();
        match n {
            0 => return None,
            1 => return usable(0).then_some(0),
            // Two of equal weight: weigh both (draws would often land twice on one).
            2 if self.schedule.is_empty() => {
                return match (usable(0), usable(1)) {
                    (true, true) => Some(self.by_cost(0, 1, now)),
                    (true, false) => Some(0),
                    (false, true) => Some(1),
                    (false, false) => None,
                };
            }
            _ => {}
        }
        let draw = || self.slot(fastrand::usize(..self.schedule.len().max(n)));
        let mut first = None;
        for _ in 0..4 {
            let Some(i) = draw() else { break };
            if first == Some(i) || !usable(i) {
                continue;
            }
            match first {
                None => first = Some(i),
                Some(a) => return Some(self.by_cost(a, i, now)),
            }
        }
        if first.is_none() {
            // Unlucky draws: look at each once (rare; allocates).
            let all: Vec<usize> = (0..n).filter(|&i| usable(i)).collect();
            return match all.as_slice() {
                [] => None,
                [only] => Some(*only),
                many => Some(self.by_cost(many[0], many[fastrand::usize(1..many.len())], now)),
            };
        }
        first
    }

    /// `a` or `b`, each with a probability inverse to its cost: `a` with `cost(b) / (cost(a) +
    /// cost(b))`.
    fn by_cost(&self, a: usize, b: usize, now: u64) -> usize {
        let cost = |i: usize| self.endpoints[i].state.cost(now);
        let (ca, cb) = (cost(a), cost(b));
        if fastrand::f64() * (ca + cb) < cb {
            a
        } else {
            b
        }
    }

    /// Whether one more endpoint may be ejected without passing the route's share.
    fn may_eject(&self, outlier: &Outlier, now: u64) -> bool {
        let n = self.endpoints.len();
        let allowed = n * usize::from(outlier.max_ejected_percent.min(100)) / 100;
        let out = self
            .endpoints
            .iter()
            .filter(|e| e.state.ejected(now))
            .count();
        out < allowed
    }
}

fn schedule(endpoints: &[Endpoint]) -> Box<[u32]> {
    let Some(first) = endpoints.first() else {
        return Box::new([]);
    };
    if endpoints.iter().all(|e| e.weight == first.weight) {
        return Box::new([]);
    }
    let gcd = endpoints.iter().fold(0, |g, e| gcd(g, e.weight.max(1)));
    let max = endpoints
        .iter()
        .map(|e| e.weight.max(1) / gcd)
        .max()
        .unwrap_or(1);
    let scale = |w: u32| {
        let w = w.max(1) / gcd;
        if max <= MAX_SCHEDULE_WEIGHT {
            w
        } else {
            (u64::from(w) * u64::from(MAX_SCHEDULE_WEIGHT) / u64::from(max)).max(1) as u32
        }
    };
    // Interleave rather than group, so consecutive picks spread over endpoints: round r takes
    // every endpoint whose scaled weight is above r.
    let weights: Vec<u32> = endpoints.iter().map(|e| scale(e.weight)).collect();
    let rounds = weights.iter().copied().max().unwrap_or(1);
    let mut out = Vec::with_capacity(weights.iter().map(|&w| w as usize).sum());
    for round in 0..rounds {
        for (i, &w) in weights.iter().enumerate() {
            if w > round {
                out.push(i as u32);
            }
        }
    }
    out.into_boxed_slice()
}

pub(crate) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn route(n: u16) -> Route {
        Route::new(
            (0..n)
                .map(|i| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i)), 1))
                .collect(),
        )
    }

    fn fail(route: &Route, i: usize, times: u32) {
        for _ in 0..times {
            route.endpoints[i].state.record(Outcome::Failure);
        }
    }

    fn chosen(route: &Route, outlier: &Outlier, now: u64) -> Vec<usize> {
        let mut seen = vec![0; route.endpoints.len()];
        for _ in 0..200 {
            let c = route
                .choose_at(&[], Balance::RoundRobin, outlier, now)
                .unwrap();
            seen[usize::from(c.endpoint.addr.port() - 1000)] += 1;
        }
        seen
    }

    #[test]
    fn consecutive_failures_eject_an_endpoint_for_a_time_that_grows() {
        let route = route(3);
        let outlier = Outlier::default();
        fail(&route, 0, 4);
        assert!(chosen(&route, &outlier, SEC)[0] > 0, "4 failures: still in");
        fail(&route, 0, 1);
        let seen = chosen(&route, &outlier, SEC);
        assert_eq!(seen[0], 0, "5 failures in a row: ejected");
        assert!(seen[1] > 0 && seen[2] > 0);
        assert!(chosen(&route, &outlier, 31 * SEC)[0] > 0, "back after 30 s");
        fail(&route, 0, 5);
        assert_eq!(chosen(&route, &outlier, 32 * SEC)[0], 0, "ejected again");
        assert_eq!(
            chosen(&route, &outlier, 80 * SEC)[0],
            0,
            "for 60 s this time"
        );
        assert!(chosen(&route, &outlier, 93 * SEC)[0] > 0);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let route = route(2);
        fail(&route, 0, 4);
        route.endpoints[0].state.record(Outcome::Success);
        fail(&route, 0, 4);
        assert!(chosen(&route, &Outlier::default(), SEC)[0] > 0);
    }

    #[test]
    fn never_more_than_the_share_of_a_route_is_ejected() {
        let route = route(4);
        let outlier = Outlier::default();
        for i in 0..4 {
            fail(&route, i, 5);
        }
        let seen = chosen(&route, &outlier, SEC);
        let out = seen.iter().filter(|&&n| n == 0).count();
        assert_eq!(out, 2, "half of 4 at most: {seen:?}");
        let single = self::route(1);
        fail(&single, 0, 50);
        let c = single.choose_at(&[], Balance::P2c, &outlier, SEC).unwrap();
        assert!(!c.panic, "a lone endpoint is never ejected");
    }

    #[test]
    fn with_no_healthy_endpoint_the_route_panics_and_uses_them_all() {
        let route = route(3);
        for e in route.endpoints.iter() {
            e.state.set_probe_down(true);
        }
        let mut seen = [0; 3];
        for _ in 0..60 {
            let c = route
                .choose_at(&[], Balance::P2c, &Outlier::default(), SEC)
                .unwrap();
            assert!(c.panic);
            seen[usize::from(c.endpoint.addr.port() - 1000)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        route.endpoints[1].state.set_probe_down(false);
        let c = route
            .choose_at(&[], Balance::P2c, &Outlier::default(), SEC)
            .unwrap();
        assert!(!c.panic);
        assert_eq!(c.endpoint.addr.port(), 1001);
    }

    #[test]
    fn probes_take_an_endpoint_out_and_back_after_their_streaks() {
        let state = EndpointState::default();
        assert_eq!(state.record_probe(false, 2, 2), None);
        assert_eq!(
            state.record_probe(true, 2, 2),
            None,
            "a pass breaks the streak"
        );
        assert_eq!(state.record_probe(false, 2, 2), None);
        assert_eq!(state.record_probe(false, 2, 2), Some(true));
        assert!(state.is_probe_down());
        assert_eq!(state.record_probe(false, 2, 2), None);
        assert_eq!(state.record_probe(true, 2, 2), None);
        assert_eq!(state.record_probe(true, 2, 2), Some(false));
        assert!(!state.is_probe_down());
    }

    #[test]
    fn tried_endpoints_are_skipped_until_none_is_left() {
        let route = route(2);
        let first = route.endpoints[0].addr;
        for balance in [Balance::P2c, Balance::RoundRobin] {
            let c = route
                .choose_at(&[first], balance, &Outlier::default(), SEC)
                .unwrap();
            assert_eq!(c.endpoint.addr.port(), 1001);
            let all = [first, route.endpoints[1].addr];
            assert!(
                route
                    .choose_at(&all, balance, &Outlier::default(), SEC)
                    .is_none()
            );
        }
    }

    /// How many of `picks` p2c choices land on each endpoint of `route` at `now`.
    fn p2c_shares(route: &Route, picks: usize, now: u64) -> Vec<usize> {
        let mut seen = vec![0; route.endpoints.len()];
        for _ in 0..picks {
            let c = route
                .choose_at(&[], Balance::P2c, &Outlier::default(), now)
                .unwrap();
            seen[usize::from(c.endpoint.addr.port() - 1000)] += 1;
        }
        seen
    }

    #[test]
    fn two_choices_prefer_the_faster_and_less_loaded_endpoint() {
        fastrand::seed(7);
        let route = route(2);
        route.endpoints[0].state.observe(50_000_000.0, SEC); // 50 ms
        route.endpoints[1].state.observe(1_000_000.0, SEC); // 1 ms
        let seen = p2c_shares(&route, 1000, SEC);
        assert!(seen[1] > 950, "the fast one takes ~98%: {seen:?}");
        assert!(seen[0] > 0, "the slow one keeps a share: {seen:?}");
        // Load counts: 60 requests in flight make the fast one costlier than the slow one.
        let flights: Vec<_> = (0..60).map(|_| route.endpoints[1].state.start()).collect();
        let seen = p2c_shares(&route, 1000, SEC);
        assert!(seen[0] > 500, "61 ms of cost against 50: {seen:?}");
        drop(flights);
        assert!(p2c_shares(&route, 1000, SEC)[1] > 950);
        // An estimate not refreshed decays: a few seconds later the slow one is tried again.
        assert!(route.endpoints[0].state.rtt_at(10 * SEC) < 1_000_000.0);
    }

    #[test]
    fn two_equal_endpoints_share_every_three_second_window_within_a_fifth_at_steady_load() {
        // 200 requests a second for 30 s, each answered in 300–500 µs, one in a hundred after a
        // 5–20 ms stall: the jitter of a loaded machine, the same for both endpoints.
        fastrand::seed(11);
        let route = route(2);
        let outlier = Outlier::default();
        let mut now = 100 * SEC;
        for window in 0..10 {
            let mut seen = [0; 2];
            for _ in 0..600 {
                let c = route.choose_at(&[], Balance::P2c, &outlier, now).unwrap();
                let i = usize::from(c.endpoint.addr.port() - 1000);
                seen[i] += 1;
                let latency = if fastrand::u32(..100) == 0 {
                    fastrand::u64(5_000_000..20_000_000)
                } else {
                    fastrand::u64(300_000..500_000)
                };
                let flight = route.endpoints[i].state.start_at(now);
                flight.finish_at(Outcome::Success, now + latency);
                now += 5_000_000;
            }
            assert!(
                (240..=360).contains(&seen[0]),
                "window {window}: {seen:?} is not within 50 % ± 10 points"
            );
        }
    }

    #[test]
    fn the_estimate_smooths_one_stall_and_follows_a_slower_endpoint_within_a_second() {
        let state = EndpointState::default();
        let mut now = 100 * SEC;
        for _ in 0..200 {
            state.observe(1e6, now);
            now += 5_000_000;
        }
        assert!((0.9e6..1.1e6).contains(&state.rtt_at(now)));
        state.observe(100e6, now);
        let after = state.rtt_at(now);
        assert!(after < 2e6, "one stall among steady 1 ms answers: {after}");
        for _ in 0..100 {
            now += 5_000_000;
            state.observe(50e6, now);
        }
        let slower = state.rtt_at(now);
        assert!(slower > 15e6, "half a second of 50 ms answers: {slower}");
    }

    #[test]
    fn a_rebuilt_route_keeps_the_state_of_the_endpoints_it_keeps() {
        let old = route(2);
        fail(&old, 1, 3);
        old.budget.deposit();
        let new = Route::new(vec![
            Endpoint::new(old.endpoints[1].addr, 1),
            Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 2000)), 1),
        ])
        .inherit(&old);
        assert!(Arc::ptr_eq(
            &new.endpoints[0].state,
            &old.endpoints[1].state
        ));
        assert_eq!(new.endpoints[0].state.view().failures, 3);
        assert_eq!(new.endpoints[1].state.view().failures, 0);
        assert!(Arc::ptr_eq(&new.budget, &old.budget));
    }
}
