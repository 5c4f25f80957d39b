//! Tier choice as a small state machine over (which tiers are eligible, now).
//!
//! - Failing *over* to a lower tier is immediate: the tier in use stops being eligible, the next
//!   request goes elsewhere.
//! - Failing *back* to a higher tier waits until it has been eligible for `hold` without a break
//!   (hysteresis), so an instance that flaps does not flap traffic.
//! - Tiers eligible when the selector is created count as held: a gateway that starts (or a
//!   service that appears) routes to its best tier at once.
//! - **Emergency fallback**: the hold protects a healthy lower tier from flapping, not a failing
//!   one. When the tier in use is failing — at least [`FAILING_ERROR_PERCENT`] % errors (5xx
//!   answers, or none) among at least [`FAILING_MIN_ANSWERS`] answers in the last
//!   [`FAILING_WINDOW`], as [`record`](Selector::record) counted them — traffic returns at once
//!   to the best eligible higher tier that is not failing itself, held or not. (A tier whose
//!   endpoints are all refused, timed out or ejected is not eligible at all: the gateway learns
//!   that from its requests, see [`crate::routing::reach`].)

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::routing::reach::Errors;
pub use crate::routing::reach::{FAILING_ERROR_PERCENT, FAILING_MIN_ANSWERS, FAILING_WINDOW};

/// The tier state of one service.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Per tier: since when it has been eligible without a break, `None` while it is not.
    since: Vec<Option<Instant>>,
    /// The tier the last choice fell on.
    active: Option<usize>,
    /// Per tier: its answers over the failing window.
    errors: Vec<Errors>,
}

/// What `/routes` shows of a selector.
#[derive(Clone, Debug, Serialize)]
pub struct SelectorView {
    pub active: Option<usize>,
    /// Per tier: how long it has been eligible, in seconds (`null` while it is not).
    pub eligible_for_s: Vec<Option<f64>>,
    /// Per tier: whether it is failing (see the module docs).
    pub failing: Vec<bool>,
}

// === impl Selector ===

impl Selector {
    /// A selector for tiers whose current eligibility is `eligible`; those count as held.
    pub fn new(eligible: &[bool], now: Instant, hold: Duration) -> Self {
        let born = now.checked_sub(hold).unwrap_or(now);
        Self {
            since: eligible.iter().map(|&e| e.then_some(born)).collect(),
            active: None,
            errors: vec![Errors::default(); eligible.len()],
        }
    }

    /// Counts an answer of tier `tier` at `now`: `error` when it was a 5xx or none came.
    pub fn record(&mut self, tier: usize, now: Instant, error: bool) {
        if let Some(errors) = self.errors.get_mut(tier) {
            errors.record(now, error);
        }
    }

    /// Whether tier `tier` is failing at `now` (see the module docs).
    pub fn failing(&mut self, tier: usize, now: Instant) -> bool {
        self.errors.get_mut(tier).is_some_and(|e| e.failing(now))
    }

    /// Records the tiers' eligibility at `now` and chooses a tier: the index into the tiers, or
    /// `None` when no tier is eligible.
    pub fn observe(&mut self, eligible: &[bool], now: Instant, hold: Duration) -> Option<usize> {
        if eligible.len() != self.since.len() {
            // The policy changed shape: start over, without hold.
            *self = Self::new(eligible, now, hold);
        }
        for (since, &e) in self.since.iter_mut().zip(eligible) {
            *since = if e { Some(since.unwrap_or(now)) } else { None };
        }
        let held =
            |t: &Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) >= hold);
        let first_held = self.since.iter().position(held);
        let active = self
            .active
            .filter(|&a| self.since.get(a).is_some_and(Option::is_some));
        let choice = match (first_held, active) {
            // Fail back to a held higher tier, or stay on a higher active one.
            (Some(h), Some(a)) => Some(h.min(a)),
            // The active tier failed (or there was none): over, at once, to the best held tier.
            (Some(h), None) => Some(h),
            // Nothing held: stay where we are while it stays eligible.
            (None, Some(a)) => Some(a),
            // Nothing held, nothing active: any eligible tier, best first.
            (None, None) => self.since.iter().position(Option::is_some),
        };
        // Emergency fallback: a failing tier gives way to a better eligible one at once.
        let choice = match choice {
            Some(c) if self.failing(c, now) => {
                let better = (0..c).find(|&i| self.since[i].is_some() && !self.failing(i, now));
                better.or(Some(c))
            }
            other => other,
        };
        self.active = choice;
        choice
    }

    /// Like [`observe`](Self::observe), then splits traffic by `weights` over the tiers in
    /// service: the chosen one, the eligible ones below it, and the held ones above it.
    /// `roll` is a uniform random number; tiers with weight 0 only get traffic when no other
    /// tier in service has weight.
    pub fn observe_split(
        &mut self,
        eligible: &[bool],
        now: Instant,
        hold: Duration,
        weights: &[u32],
        roll: u64,
    ) -> Option<usize> {
        let choice = self.observe(eligible, now, hold)?;
        let held =
            |t: &Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) >= hold);
        let in_service = |i: usize| {
            let since = &self.since[i];
            since.is_some() && (i >= choice || held(since))
        };
        let weight = |i: usize| weights.get(i).copied().unwrap_or(0);
        let total: u64 = (0..self.since.len())
            .filter(|&i| in_service(i))
            .map(|i| u64::from(weight(i)))
            .sum();
        if total == 0 {
            return Some(choice);
        }
        let mut point = roll % total;
        for i in (0..self.since.len()).filter(|&i| in_service(i)) {
            let w = u64::from(weight(i));
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        Some(choice)
    }

    /// How many tiers this selector follows.
    pub fn tier_count(&self) -> usize {
        self.since.len()
    }

    pub fn view(&mut self, now: Instant) -> SelectorView {
        let failing = (0..self.errors.len())
            .map(|i| self.failing(i, now))
            .collect();
        SelectorView {
            active: self.active,
            failing,
            eligible_for_s: self
                .since
                .iter()
                .map(|s| s.map(|t| now.saturating_duration_since(t).as_secs_f64()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLD: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn fails_over_at_once_and_back_only_after_the_hold() {
        let mut s = Selector::new(&[true, true], Instant::now(), HOLD);
        assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(0));
        // Mesos scaled to zero: Kubernetes at once.
        assert_eq!(s.observe(&[false, true], Instant::now(), HOLD), Some(1));
        // Mesos back: still Kubernetes until it has been up for the hold.
        assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(1));
        tokio::time::advance(Duration::from_millis(2999)).await;
        assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_higher_tier_does_not_take_traffic_back() {
        let mut s = Selector::new(&[false, true], Instant::now(), HOLD);
        for _ in 0..10 {
            assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(1));
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(s.observe(&[false, true], Instant::now(), HOLD), Some(1));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tiers_eligible_at_start_count_as_held() {
        let mut s = Selector::new(&[true, true], Instant::now(), HOLD);
        assert_eq!(s.observe(&[true, true], Instant::now(), HOLD), Some(0));
        let mut none = Selector::new(&[false, false], Instant::now(), HOLD);
        assert_eq!(none.observe(&[false, false], Instant::now(), HOLD), None);
        // The only eligible tier is used even before its hold: there is nothing better.
        assert_eq!(none.observe(&[true, false], Instant::now(), HOLD), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_sends_each_tier_its_share_and_skips_ineligible_tiers() {
        let mut s = Selector::new(&[true, true], Instant::now(), HOLD);
        let mut hits = [0u32; 2];
        for roll in 0..100 {
            let tier = s.observe_split(&[true, true], Instant::now(), HOLD, &[90, 10], roll);
            hits[tier.unwrap()] += 1;
        }
        assert_eq!(hits, [90, 10]);
        for roll in 0..100 {
            let tier = s.observe_split(&[false, true], Instant::now(), HOLD, &[90, 10], roll);
            assert_eq!(tier, Some(1));
        }
        // Back, but not held yet: no share for tier 0.
        let tier = s.observe_split(&[true, true], Instant::now(), HOLD, &[90, 10], 0);
        assert_eq!(tier, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_tier_gives_way_to_a_better_eligible_one_before_the_hold() {
        let mut s = Selector::new(&[false, true], Instant::now(), HOLD);
        assert_eq!(s.observe(&[false, true], Instant::now(), HOLD), Some(1));
        // Kubernetes answers 500; Mesos comes back.
        for _ in 0..FAILING_MIN_ANSWERS {
            s.record(1, Instant::now(), true);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            s.observe(&[true, true], Instant::now(), HOLD),
            Some(0),
            "at once"
        );
        assert_eq!(
            s.observe(&[true, true], Instant::now(), HOLD),
            Some(0),
            "and stays"
        );
        // A healthy lower tier still waits for the hold.
        let mut healthy = Selector::new(&[false, true], Instant::now(), HOLD);
        for _ in 0..FAILING_MIN_ANSWERS {
            healthy.record(1, Instant::now(), false);
        }
        assert_eq!(
            healthy.observe(&[true, true], Instant::now(), HOLD),
            Some(1)
        );
        // A better tier that fails as well is no refuge.
        let mut both = Selector::new(&[false, true], Instant::now(), HOLD);
        for _ in 0..FAILING_MIN_ANSWERS {
            both.record(0, Instant::now(), true);
            both.record(1, Instant::now(), true);
        }
        assert_eq!(both.observe(&[true, true], Instant::now(), HOLD), Some(1));
    }

    /// A step of a random run: the tiers' eligibility and how much time passes before it.
    fn steps() -> impl Strategy<Value = Vec<(Vec<bool>, u64)>> {
        prop::collection::vec((prop::collection::vec(any::<bool>(), 3), 0u64..5000), 1..60)
    }

    proptest! {
        #[test]
        fn a_lower_tier_is_never_chosen_while_a_higher_one_is_eligible_past_its_hold(
            start in prop::collection::vec(any::<bool>(), 3),
            steps in steps(),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Selector::new(&start, now, HOLD);
            // Since when each tier has been eligible, as the test sees it.
            let mut since: Vec<Option<Instant>> = start.iter().map(|&e| e.then(|| t0 - HOLD)).collect();
            for (eligible, ms) in steps {
                now += Duration::from_millis(ms);
                for (s, &e) in since.iter_mut().zip(&eligible) {
                    *s = if e { Some(s.unwrap_or(now)) } else { None };
                }
                let choice = s.observe(&eligible, now, HOLD);
                if let Some(best_held) = since.iter().position(|t| t.is_some_and(|t| now - t >= HOLD)) {
                    prop_assert!(choice.is_some_and(|c| c <= best_held), "{choice:?} with tier {best_held} held");
                }
            }
        }

        #[test]
        fn a_failing_tier_in_use_gives_way_at_once_to_an_eligible_better_tier_that_is_not_failing(
            start in prop::collection::vec(any::<bool>(), 3),
            steps in prop::collection::vec(
                (prop::collection::vec(any::<bool>(), 3), prop::collection::vec(any::<bool>(), 3), 0u64..1500),
                1..60,
            ),
        ) {
            let mut now = Instant::now();
            let mut s = Selector::new(&start, now, HOLD);
            for (eligible, errors, ms) in steps {
                now += Duration::from_millis(ms);
                // Each tier answers with or without errors, enough to judge.
                for (tier, &error) in errors.iter().enumerate() {
                    for _ in 0..FAILING_MIN_ANSWERS {
                        s.record(tier, now, error);
                    }
                }
                let choice = s.observe(&eligible, now, HOLD);
                let failing: Vec<bool> = (0..3).map(|i| s.failing(i, now)).collect();
                if let Some(c) = choice {
                    prop_assert!(eligible[c]);
                    if failing[c] {
                        let refuge = (0..c).find(|&i| eligible[i] && !failing[i]);
                        prop_assert_eq!(refuge, None, "stayed on failing tier {} with {:?} eligible", c, eligible);
                    }
                }
            }
        }

        #[test]
        fn fail_over_to_a_lower_tier_is_immediate(
            start in prop::collection::vec(any::<bool>(), 3),
            steps in steps(),
        ) {
            let mut now = Instant::now();
            let mut s = Selector::new(&start, now, HOLD);
            for (eligible, ms) in steps {
                now += Duration::from_millis(ms);
                let choice = s.observe(&eligible, now, HOLD);
                match choice {
                    Some(c) => prop_assert!(eligible[c], "chose ineligible tier {c}"),
                    None => prop_assert!(eligible.iter().all(|e| !e)),
                }
            }
        }
    }
}
