//! The retry budget (Linkerd's and Finagle's): over a sliding window, retries may add at most
//! `ratio` of the requests plus `min_per_second` per second. A failing service then sees at most
//! 20% more load from retries (plus a small floor), never a retry storm.
//!
//! The window is a ring of one-second buckets of atomic counters: recording a request is one
//! atomic add on the hot path; only a retry, which is rare, sums the ring.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::routing::balance::now_ns;

/// Seconds in the window (Linkerd's `ttl`).
pub const WINDOW_SECS: u64 = 10;
/// The share of requests that may be retried (Linkerd's `retryRatio`).
pub const RATIO: f64 = 0.2;
/// Retries allowed per second whatever the request rate (Linkerd's `minRetriesPerSecond`).
pub const MIN_PER_SECOND: u32 = 10;

const SLOTS: usize = WINDOW_SECS as usize;

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since the process clock's epoch, plus one so 0 means unused) it counts.
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// The retry budget of one route. Shared across route-table swaps (see `Route::inherit`).
#[derive(Debug)]
pub struct RetryBudget {
    buckets: [Bucket; SLOTS],
    ratio: f64,
    min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(RATIO, MIN_PER_SECOND)
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            buckets: Default::default(),
            ratio,
            min_per_second,
        }
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.deposit_at(now_ns())
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(now_ns())
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let second = now / 1_000_000_000 + 1;
        let bucket = &self.buckets[(second % WINDOW_SECS) as usize];
        let seen = bucket.second.load(Ordering::Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A new second: this bucket last counted one a whole window ago.
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    pub fn deposit_at(&self, now: u64) {
        self.bucket(now).requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn try_withdraw_at(&self, now: u64) -> bool {
        let current = self.bucket(now);
        if self.left_at(now) == 0 {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// How many retries the budget allows at `now` ([`now_ns`] scale).
    pub fn left_at(&self, now: u64) -> u64 {
        let second = now / 1_000_000_000 + 1;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Relaxed);
            if s != 0 && s + WINDOW_SECS > second {
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(b.retries.load(Ordering::Relaxed));
            }
        }
        let allowed =
            self.ratio * requests as f64 + f64::from(self.min_per_second) * WINDOW_SECS as f64;
        (allowed.floor() as u64).saturating_sub(retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn retries_stay_within_the_ratio_plus_the_floor() {
        let budget = RetryBudget::default();
        // 1,000 requests a second for 10 s, each wanting a retry.
        let mut retried = 0;
        for ms in 0..10_000u64 {
            let now = 100 * SEC + ms * 1_000_000;
            budget.deposit_at(now);
            if budget.try_withdraw_at(now) {
                retried += 1;
            }
        }
        // 20% of 10,000 plus 10/s over the 10 s window.
        assert!(retried <= 2_000 + 100, "{retried} retries");
        assert!(retried >= 1_900, "the budget is usable: {retried}");
    }

    #[test]
    fn the_floor_allows_retries_at_a_low_rate() {
        let budget = RetryBudget::default();
        for s in 0..30 {
            let now = s * SEC;
            budget.deposit_at(now);
            assert!(budget.try_withdraw_at(now), "1 request/s may always retry");
        }
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::new(0.0, 1);
        let mut granted = 0;
        for _ in 0..50 {
            granted += u32::from(budget.try_withdraw_at(5 * SEC));
        }
        assert_eq!(granted, 10, "1/s over a 10 s window");
        assert!(!budget.try_withdraw_at(14 * SEC), "still inside the window");
        assert!(
            budget.try_withdraw_at(15 * SEC),
            "the old second left the window"
        );
    }
}
