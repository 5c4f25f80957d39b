//! What the proxies observe of a whole route (an agent's service route, a gateway's tier), as
//! opposed to what the catalog says of it: two small state machines over time, pure, and the
//! shared cells that hold them next to a [`Route`](super::Route).
//!
//! - [`Reach`]: a route whose every endpoint refused the connection, timed out connecting or
//!   was ejected is **unreachable**. A request goes on to the next option at once (the agent to
//!   its catch-all, the gateway to its next tier), and later requests skip the route, except one
//!   *trial* request per [`TRIAL_INTERVAL`], which tries the route first and still goes on when
//!   it is refused. A trial that reaches an endpoint starts the recovery: the route is used again
//!   once it has stayed reachable for the hold, the same hysteresis as catalog health.
//! - [`Errors`]: the answers of one route over a sliding window. A route is **failing** when
//!   at least [`FAILING_MIN_ANSWERS`] answers in the last [`FAILING_WINDOW`] came back and at
//!   least [`FAILING_ERROR_PERCENT`] % of them were errors (5xx, or no answer at all). A
//!   failing route in use gives way at once to an eligible better one (the emergency fallback:
//!   the fail-back hold protects a healthy lower tier from flapping, not a failing one).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How often a route found unreachable gets one trial request.
pub const TRIAL_INTERVAL: Duration = Duration::from_millis(500);
/// The window over which a route's error rate is measured.
pub const FAILING_WINDOW: Duration = Duration::from_secs(2);
/// The fewest answers in the window for a route to count as failing (one error is no trend).
pub const FAILING_MIN_ANSWERS: u32 = 5;
/// The share of errors, in percent, from which a route counts as failing.
pub const FAILING_ERROR_PERCENT: u32 = 25;

/// What a request does with a route, as [`Reach::admit`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// The route is reachable: use it.
    Use,
    /// The route was unreachable: this request tries it first, and goes on if refused.
    Trial,
    /// The route is unreachable: go to the next option.
    Skip,
}

/// Whether a route's endpoints can be reached, as requests found out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reach {
    #[default]
    Up,
    /// Every endpoint refused (or timed out connecting, or was ejected); the next trial is due
    /// at `trial`.
    Down { trial: Instant },
    /// A trial reached an endpoint at `since`, and no attempt was refused since.
    Recovering { since: Instant, trial: Instant },
}

// === impl Reach ===

impl Reach {
    /// How `/routes` and `skyline explain` name the state.
    pub fn label(&self) -> &'static str {
        match self {
            Reach::Up => "up",
            Reach::Down { .. } => "unreachable",
            Reach::Recovering { .. } => "recovering",
        }
    }

    /// Whether a request at `now` uses the route, tries it, or skips it. A route recovering for
    /// `hold` is up again.
    pub fn admit(&mut self, now: Instant, hold: Duration) -> Admit {
        match *self {
            Reach::Up => Admit::Use,
            Reach::Recovering { since, .. } if now.saturating_duration_since(since) >= hold => {
                *self = Reach::Up;
                Admit::Use
            }
            Reach::Down { trial } | Reach::Recovering { trial, .. } => {
                if now < trial {
                    return Admit::Skip;
                }
                let next = now + TRIAL_INTERVAL;
                match self {
                    Reach::Down { trial } | Reach::Recovering { trial, .. } => *trial = next,
                    Reach::Up => {}
                }
                Admit::Trial
            }
        }
    }

    /// Every endpoint of the route refused, timed out connecting or was ejected at `now`.
    pub fn unreachable(&mut self, now: Instant) {
        *self = Reach::Down {
            trial: now + TRIAL_INTERVAL,
        };
    }

    /// An endpoint of the route answered at `now`.
    pub fn reached(&mut self, now: Instant, hold: Duration) {
        if let Reach::Down { trial } = *self {
            *self = if hold.is_zero() {
                Reach::Up
            } else {
                Reach::Recovering { since: now, trial }
            };
        }
    }

    /// Whether requests use the route without a trial.
    pub fn is_up(&self) -> bool {
        *self == Reach::Up
    }
}

/// Answers and errors of a route over [`FAILING_WINDOW`], in two halves that slide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Errors {
    /// The half window that started at `start`: (answers, errors).
    current: (u32, u32),
    /// The half before it.
    previous: (u32, u32),
    start: Option<Instant>,
}

// === impl Errors ===

impl Errors {
    fn slide(&mut self, now: Instant) {
        let half = FAILING_WINDOW / 2;
        let Some(start) = self.start else {
            self.start = Some(now);
            return;
        };
        let age = now.saturating_duration_since(start);
        if age < half {
            return;
        }
        self.previous = if age < 2 * half { self.current } else { (0, 0) };
        self.current = (0, 0);
        self.start = Some(now);
    }

    /// Counts one answer at `now`; `error` when it was a 5xx or none came.
    pub fn record(&mut self, now: Instant, error: bool) {
        self.slide(now);
        self.current.0 = self.current.0.saturating_add(1);
        if error {
            self.current.1 = self.current.1.saturating_add(1);
        }
    }

    /// Whether the route is failing at `now` (see the module docs for the rule).
    pub fn failing(&mut self, now: Instant) -> bool {
        self.slide(now);
        let answers = self.current.0.saturating_add(self.previous.0);
        let errors = self.current.1.saturating_add(self.previous.1);
        answers >= FAILING_MIN_ANSWERS
            && u64::from(errors) * 100 >= u64::from(answers) * u64::from(FAILING_ERROR_PERCENT)
    }
}

// === Observed ===

/// The observed state of one route, shared by every request that uses it and kept across
/// table swaps (see [`Route::inherit`](super::Route::inherit)).
#[derive(Debug, Default)]
pub struct Observed {
    /// Set while the route is not [`Reach::Up`]: the common case reads one atomic.
    troubled: AtomicBool,
    reach: Mutex<Reach>,
}

impl Observed {
    /// [`Reach::admit`] at `now`.
    pub fn admit(&self, now: Instant, hold: Duration) -> Admit {
        if !self.troubled.load(Ordering::Relaxed) {
            return Admit::Use;
        }
        self.with(|reach| reach.admit(now, hold))
    }

    /// What [`admit`](Self::admit) would answer at `now`, without taking a trial: for
    /// explaining a route, not for sending.
    pub fn peek(&self, now: Instant, hold: Duration) -> Admit {
        if !self.troubled.load(Ordering::Relaxed) {
            return Admit::Use;
        }
        let mut reach = *self.reach.lock().unwrap_or_else(|e| e.into_inner());
        reach.admit(now, hold)
    }

    /// Whether the route is not known to be unreachable: up, or recovering.
    pub fn usable(&self) -> bool {
        !self.troubled.load(Ordering::Relaxed)
            || self.with(|reach| !matches!(reach, Reach::Down { .. }))
    }

    /// [`Reach::unreachable`].
    pub fn unreachable(&self, now: Instant) {
        self.with(|reach| reach.unreachable(now));
    }

    /// [`Reach::reached`]; costs one atomic read while the route is up.
    pub fn reached(&self, now: Instant, hold: Duration) {
        if self.troubled.load(Ordering::Relaxed) {
            self.with(|reach| reach.reached(now, hold));
        }
    }

    pub fn reach(&self) -> Reach {
        self.with(|reach| *reach)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Reach) -> T) -> T {
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut reach);
        self.troubled.store(!reach.is_up(), Ordering::Relaxed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLD: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_route_is_skipped_but_for_one_trial_per_interval() {
        let mut r = Reach::Up;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Use);
        r.unreachable(Instant::now());
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Skip);
        tokio::time::advance(TRIAL_INTERVAL).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Trial);
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Skip, "one trial");
        // The trial was refused again.
        r.unreachable(Instant::now());
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Skip);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reached_route_is_used_again_only_after_the_hold_without_a_refusal() {
        let mut r = Reach::Up;
        r.unreachable(Instant::now());
        tokio::time::advance(TRIAL_INTERVAL).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Trial);
        r.reached(Instant::now(), HOLD);
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Skip);
        tokio::time::advance(HOLD - Duration::from_millis(1)).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Trial, "trials go on");
        // A refusal while recovering starts over.
        r.unreachable(Instant::now());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Skip);
        tokio::time::advance(TRIAL_INTERVAL).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Trial);
        r.reached(Instant::now(), HOLD);
        tokio::time::advance(HOLD).await;
        assert_eq!(r.admit(Instant::now(), HOLD), Admit::Use);
        // Without a hold (the gateway's selector holds instead), one answer is enough.
        r.unreachable(Instant::now());
        r.reached(Instant::now(), Duration::ZERO);
        assert_eq!(r.admit(Instant::now(), Duration::ZERO), Admit::Use);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_fails_with_enough_errors_in_the_window_and_recovers_when_they_age_out() {
        let mut e = Errors::default();
        for _ in 0..4 {
            e.record(Instant::now(), true);
        }
        assert!(!e.failing(Instant::now()), "4 answers are too few to judge");
        e.record(Instant::now(), true);
        assert!(e.failing(Instant::now()));
        tokio::time::advance(FAILING_WINDOW / 2).await;
        assert!(e.failing(Instant::now()), "the previous half still counts");
        tokio::time::advance(FAILING_WINDOW / 2).await;
        assert!(!e.failing(Instant::now()), "aged out");
        // 1 error in 4 answers is the threshold; 1 in 5 is under it.
        for error in [true, false, false, false, false] {
            e.record(Instant::now(), error);
        }
        assert!(!e.failing(Instant::now()));
        e.record(Instant::now(), true);
        assert!(e.failing(Instant::now()), "2 in 6");
    }

    /// One event of a random run: what happens, and how many ms pass before it.
    #[derive(Clone, Copy, Debug)]
    enum Event {
        Admit,
        Refused,
        Reached,
    }

    fn events() -> impl Strategy<Value = Vec<(Event, u64)>> {
        let event = prop_oneof![
            Just(Event::Admit),
            Just(Event::Refused),
            Just(Event::Reached)
        ];
        prop::collection::vec((event, 0u64..1500), 1..80)
    }

    proptest! {
        #[test]
        fn a_route_is_used_only_after_it_stayed_reachable_for_the_hold(events in events()) {
            let mut now = Instant::now();
            let mut r = Reach::Up;
            // As the test sees it: since when no refusal happened, after the last one.
            let mut clean_since: Option<Instant> = None;
            let mut down = false;
            let mut last_trial: Option<Instant> = None;
            for (event, ms) in events {
                now += Duration::from_millis(ms);
                match event {
                    Event::Refused => {
                        r.unreachable(now);
                        down = true;
                        clean_since = None;
                    }
                    Event::Reached => {
                        if down && clean_since.is_none() {
                            clean_since = Some(now);
                        }
                        r.reached(now, HOLD);
                    }
                    Event::Admit => {
                        let admit = r.admit(now, HOLD);
                        if admit == Admit::Use && down {
                            let held = clean_since.is_some_and(|t| now - t >= HOLD);
                            prop_assert!(held, "used while not held: {r:?}");
                            down = false;
                        }
                        if admit == Admit::Trial {
                            if let Some(t) = last_trial {
                                prop_assert!(now - t >= TRIAL_INTERVAL, "trials too close");
                            }
                            last_trial = Some(now);
                        }
                        if !down {
                            prop_assert_eq!(admit, Admit::Use);
                        }
                    }
                }
            }
        }
    }
}
