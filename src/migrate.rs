//! `skyline migrate`: the migration autopilot. It moves a service's traffic from one tier of
//! the gateways' route policy to another (Mesos → Kubernetes, or back) step by step, by writing
//! the policy's weighted split to the registry KV (`skyline/routes/<service>`), which every
//! gateway follows. Between steps it reads what the gateways themselves saw of each tier's
//! answers (see [`answers`]) and rolls back at once when the new tier breaks a
//! guard ([`judge`]).
//!
//! - [`answers`]: what the gateways publish of each tier's answers while a migration is under
//!   way.
//! - [`crate::cli::migrate`]: the command itself, its lock, and `status|pause|resume|rollback`.
//!
//! KV keys of a migration of `<service>`:
//! - `skyline/migrate/<service>`: the [`Record`] (JSON): target, steps, current step, state,
//!   reason. Every change of the record that moves traffic is written in one transaction with
//!   the policy, the record checked by its index, so a rollback from the command line and a
//!   driver's step never interleave.
//! - `skyline/migrate/<service>/lock`: held by the driver's session (one driver at a time).
//! - `skyline/migrate/<service>/gateways/<gateway-id>`: each gateway's [`Report`] while the
//!   migration is `running` or `paused`.

pub mod answers;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use answers::{ShadowCounts, TierAnswers};

/// The default steps: the new tier's share of traffic, percent.
pub const DEFAULT_STEPS: [u32; 5] = [1, 5, 25, 50, 100];
/// The latency guard compares p99s only when both tiers answered at least this many requests
/// over the step.
pub const P99_MIN_ANSWERS: u64 = 100;
/// A new tier whose p99 is at or under this passes the latency guard whatever the ratio:
/// below it, the difference is noise of the machine, not of the tier.
pub const P99_FLOOR: Duration = Duration::from_millis(10);

/// What a step must not exceed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    /// The new tier's share of failed answers (5xx or none), 0..=1.
    pub max_error_rate: f64,
    /// The new tier's p99 latency over the old tier's.
    pub max_p99_ratio: f64,
    /// The error-rate guard judges a step once the new tier answered this many requests in it,
    /// and a step advances only then.
    pub min_requests: u64,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            max_error_rate: 0.01,
            max_p99_ratio: 2.0,
            min_requests: 20,
        }
    }
}

/// A guard the new tier broke, in words.
#[derive(Clone, Debug, PartialEq)]
pub struct Breach(pub String);

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Judges a step from the answers both tiers gave over it (deltas): `Some` breach when the
/// new tier's error rate is over the maximum (with at least `min_requests` answers), or its p99
/// is over `max_p99_ratio` times the old tier's (with at least [`P99_MIN_ANSWERS`] answers on
/// each side, and the new p99 above [`P99_FLOOR`]).
pub fn judge(
    guards: &Guards,
    (old_name, old): (&str, &TierAnswers),
    (new_name, new): (&str, &TierAnswers),
) -> Option<Breach> {
    if new.total() >= guards.min_requests.max(1) && new.error_rate() > guards.max_error_rate {
        return Some(Breach(format!(
            "error rate of {new_name} {:.1}% over the {:.1}% allowed ({} of {} answers failed)",
            new.error_rate() * 100.0,
            guards.max_error_rate * 100.0,
            new.failed,
            new.total()
        )));
    }
    if old.total() >= P99_MIN_ANSWERS && new.total() >= P99_MIN_ANSWERS {
        if let (Some(old_p99), Some(new_p99)) = (old.quantile(0.99), new.quantile(0.99)) {
            let ratio = new_p99 / old_p99.max(f64::MIN_POSITIVE);
            if new_p99 > P99_FLOOR.as_secs_f64() && ratio > guards.max_p99_ratio {
                return Some(Breach(format!(
                    "p99 latency of {new_name} {:.1} ms is {ratio:.1}× {old_name}'s {:.1} ms, over \
                     the {:.1}× allowed",
                    new_p99 * 1000.0,
                    old_p99 * 1000.0,
                    guards.max_p99_ratio
                )));
            }
        }
    }
    None
}

/// Judges a shadow step from its copies (deltas): `Some` breach when the share of copies whose
/// status class differed from the caller's answer is over the maximum error rate, once at
/// least `min_requests` copies were compared.
pub fn judge_shadow(
    guards: &Guards,
    old_name: &str,
    new_name: &str,
    counts: &ShadowCounts,
) -> Option<Breach> {
    if counts.compared < guards.min_requests.max(1) {
        return None;
    }
    let rate = counts.differ as f64 / counts.compared as f64;
    (rate > guards.max_error_rate).then(|| {
        Breach(format!(
            "shadow copies to {new_name} differed from {old_name}'s answers in status class in \
             {:.1}% of {} compared, over the {:.1}% allowed",
            rate * 100.0,
            counts.compared,
            guards.max_error_rate * 100.0
        ))
    })
}

/// Whether a step that lasted its step time may advance: the new tier answered enough requests
/// for the guards to have judged it.
pub fn may_advance(guards: &Guards, new: &TierAnswers) -> bool {
    new.total() >= guards.min_requests
}

/// Parses steps like `1,5,25,50,100`: increasing percentages, each 1..=100, ending at 100.
pub fn parse_steps(text: &str) -> Result<Vec<u32>, String> {
    let steps = text
        .split(',')
        .map(|s| {
            let s = s.trim().trim_end_matches('%');
            s.parse::<u32>()
                .map_err(|_| format!("{s:?} is not a percentage"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    if steps.iter().any(|&s| s == 0 || s > 100) {
        return Err("every step is a share between 1 and 100 (percent)".into());
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err("steps must increase, such as 1,5,25,50,100".into());
    }
    if steps.last() != Some(&100) {
        return Err("the last step must be 100".into());
    }
    Ok(steps)
}

/// Parses a percentage like `1%`, `0.5%` or `1` (percent) into a share 0..=1.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim().trim_end_matches('%');
    let v: f64 = t
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage like 1% or 0.5%"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{text:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}

// === Record ===

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Done,
    RolledBack,
}

impl State {
    /// Running or paused: the migration holds traffic on both tiers.
    pub fn under_way(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Done => "done",
            State::RolledBack => "rolled_back",
        })
    }
}

/// One tier's numbers over a step, as shown.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TierSummary {
    pub answers: u64,
    pub failed: u64,
    /// `None` without answers.
    pub p99_ms: Option<f64>,
}

impl TierSummary {
    pub fn of(answers: &TierAnswers) -> Self {
        Self {
            answers: answers.total(),
            failed: answers.failed,
            p99_ms: answers.quantile(0.99).map(|s| (s * 1e4).round() / 10.0),
        }
    }
}

impl fmt::Display for TierSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} answers, {} failed", self.answers, self.failed)?;
        if let Some(p99) = self.p99_ms {
            write!(f, ", p99 {p99:.1} ms")?;
        }
        Ok(())
    }
}

/// A migration's record, `skyline/migrate/<service>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Random per migration: gateways count each migration's traffic from zero.
    #[serde(default)]
    pub id: String,
    pub service: String,
    /// The tier traffic leaves.
    pub from: String,
    /// The tier traffic goes to.
    pub to: String,
    /// The new tier's share at each step, percent; 0 is the shadow step.
    pub steps: Vec<u32>,
    /// The share of GET and HEAD requests copied to the new tier in the shadow step.
    #[serde(default)]
    pub shadow: Option<u32>,
    /// The index of the current step in `steps`.
    pub step: usize,
    pub state: State,
    /// Why the migration was rolled back (or paused, or is waiting).
    pub reason: Option<String>,
    pub step_time_ms: u64,
    pub guards: Guards,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub step_started_at: u64,
    pub updated_at: u64,
    /// The last judged step's numbers, per tier name (`from`, `to`).
    #[serde(default)]
    pub observed: Option<Observed>,
}

/// Both tiers' numbers over a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The step they were taken at.
    pub step: usize,
    pub from: TierSummary,
    pub to: TierSummary,
    /// The shadow's copies, in a shadow step.
    #[serde(default)]
    pub shadow: Option<ShadowCounts>,
    pub seconds: f64,
}

impl Record {
    /// The new tier's share now, percent: 0 once rolled back.
    pub fn share(&self) -> u32 {
        match self.state {
            State::RolledBack => 0,
            _ => self.steps.get(self.step).copied().unwrap_or(100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(ok: u64, failed: u64, ms: u64) -> TierAnswers {
        let mut a = TierAnswers::default();
        for i in 0..ok + failed {
            a.record(i < failed, Duration::from_millis(ms));
        }
        a
    }

    #[test]
    fn a_new_tier_failing_over_the_maximum_is_a_breach_once_it_answered_enough() {
        let g = Guards::default();
        let old = answers(1000, 0, 1);
        // 10 of 10 failed, but fewer than min_requests: not judged yet.
        assert_eq!(
            judge(&g, ("mesos", &old), ("k8s", &answers(0, 10, 1))),
            None
        );
        let breach = judge(&g, ("mesos", &old), ("k8s", &answers(0, 20, 1))).unwrap();
        assert!(breach.0.contains("error rate of k8s 100.0%"), "{breach}");
        // 1 of 200 is 0.5%: within 1%.
        assert_eq!(
            judge(&g, ("mesos", &old), ("k8s", &answers(199, 1, 1))),
            None
        );
        assert!(judge(&g, ("mesos", &old), ("k8s", &answers(196, 4, 1))).is_some());
    }

    #[test]
    fn a_slow_new_tier_is_a_breach_only_with_enough_answers_on_both_sides_and_above_the_floor() {
        let g = Guards::default();
        let fast = answers(500, 0, 2);
        let slow = answers(500, 0, 40);
        let breach = judge(&g, ("mesos", &fast), ("k8s", &slow)).unwrap();
        assert!(breach.0.contains("p99 latency of k8s"), "{breach}");
        // The other way round is fine; too few answers are not judged.
        assert_eq!(judge(&g, ("k8s", &slow), ("mesos", &fast)), None);
        assert_eq!(
            judge(&g, ("mesos", &answers(50, 0, 2)), ("k8s", &slow)),
            None
        );
        // 4 ms against 0.5 ms is 8×, but under the floor.
        assert_eq!(
            judge(
                &g,
                ("mesos", &answers(500, 0, 0)),
                ("k8s", &answers(500, 0, 4))
            ),
            None
        );
    }

    #[test]
    fn shadow_copies_differing_over_the_maximum_are_a_breach_once_enough_were_compared() {
        let g = Guards::default();
        let counts = |compared, differ| ShadowCounts {
            compared,
            differ,
            skipped: 0,
        };
        assert_eq!(judge_shadow(&g, "mesos", "k8s", &counts(19, 19)), None);
        let breach = judge_shadow(&g, "mesos", "k8s", &counts(20, 20)).unwrap();
        assert!(
            breach.0.contains("differed from mesos's answers"),
            "{breach}"
        );
        assert_eq!(judge_shadow(&g, "mesos", "k8s", &counts(200, 1)), None);
    }

    #[test]
    fn steps_are_increasing_shares_ending_at_100() {
        assert_eq!(parse_steps("1,5,25,50,100").unwrap(), DEFAULT_STEPS);
        assert_eq!(parse_steps("50%, 100%").unwrap(), [50, 100]);
        assert!(parse_steps("5,1,100").is_err());
        assert!(parse_steps("1,5").is_err());
        assert!(parse_steps("0,100").is_err());
        assert!(parse_steps("x").is_err());
        assert!((parse_percent("1%").unwrap() - 0.01).abs() < 1e-12);
        assert!((parse_percent("0.5").unwrap() - 0.005).abs() < 1e-12);
        assert!(parse_percent("120%").is_err());
    }

    #[test]
    fn a_step_advances_only_once_the_new_tier_answered_enough() {
        let g = Guards::default();
        assert!(!may_advance(&g, &answers(19, 0, 1)));
        assert!(may_advance(&g, &answers(20, 0, 1)));
    }
}
