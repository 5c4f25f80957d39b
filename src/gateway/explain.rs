//! Why the gateway would send a request where it sends it: `/explain?url=...` on the gateway's
//! admin listener (and `skyline explain <url> --admin <gateway admin>`).
//!
//! The answer replays the tier choice a request would get now ([`Gateway::choose`]) on a copy
//! of the service's tier state, so asking changes nothing: which tier takes the request, and
//! for every other tier why it does not (not eligible by the catalog, found unreachable by
//! requests, not yet held after a fail-over, failing, or below the tier in use), with the
//! migration split's share, the tier's endpoints and their state, and the policy in force.

use serde_json::{Value, json};
use tokio::time::Instant;

use super::Gateway;
use super::tiers::{FAILING_ERROR_PERCENT, FAILING_MIN_ANSWERS, FAILING_WINDOW};
use crate::proxy::MeshError;
use crate::proxy::outbound::explain::{describe, policy_view, split_url};
use crate::proxy::outbound::{path_of, service_of};

impl Gateway {
    /// The explanation of a request to `url` (`/service/<name>/<path>` or a whole URL).
    pub fn explain(&self, url: &str) -> Result<Value, MeshError> {
        let (_, target) = split_url(url);
        let name = service_of(path_of(target).0)?.to_owned();
        let table = self.load();
        let (tiers, known) = table.tiers(&name);
        let hold = tiers.hold();
        let policy = tiers.policy.clone();
        let split = policy.as_ref().and_then(|p| p.split.clone());
        let eligible = tiers.usable();
        let now = Instant::now();
        let entry = known
            .then(|| self.selectors.lock().ok())
            .flatten()
            .and_then(|s| {
                s.get(name.as_str()).map(|e| {
                    let mut probe = e.selector.clone();
                    let choice = probe.observe(&eligible, now, hold);
                    let answers: Vec<(String, u64, u64)> = e
                        .answers
                        .iter()
                        .map(|(t, a)| (t.as_str().to_owned(), a.ok, a.failed))
                        .collect();
                    (choice, probe.view(now), answers)
                })
            });
        let (choice, view, answers) = match entry {
            Some((choice, view, answers)) => (choice, Some(view), answers),
            None => (eligible.iter().position(|&e| e), None, Vec::new()),
        };
        // The tiers in service under a split: the chosen one, the eligible ones below it and
        // the held ones above it (see `Selector::observe_split`).
        let held = |i: usize| {
            view.as_ref()
                .and_then(|v| v.eligible_for_s.get(i).copied().flatten())
                .is_some_and(|s| s >= hold.as_secs_f64())
        };
        let in_service = |i: usize| {
            choice.is_some_and(|c| eligible.get(i) == Some(&true) && (i >= c || held(i)))
        };
        let weight = |i: usize| split.as_ref().and_then(|w| w.get(i).copied()).unwrap_or(0);
        let split_total: u32 = (0..tiers.tiers.len())
            .filter(|&i| in_service(i))
            .map(weight)
            .sum();
        let resilience = self.resilience.load_full();
        let mut out_tiers = Vec::new();
        for (i, tier) in tiers.tiers.iter().enumerate() {
            let failing = view
                .as_ref()
                .is_some_and(|v| v.failing.get(i) == Some(&true));
            let eligible_for = view
                .as_ref()
                .and_then(|v| v.eligible_for_s.get(i).copied().flatten());
            let share = (split.is_some() && split_total > 0 && in_service(i))
                .then(|| f64::from(weight(i)) / f64::from(split_total));
            let why = if tier.total == 0 {
                "ineligible: no instance in the catalog".to_owned()
            } else if !tier.eligible {
                format!(
                    "ineligible: {} of {} instances passing, below the tier's minimum",
                    tier.passing, tier.total
                )
            } else if !tier.route.observed.usable() {
                format!(
                    "ineligible: requests found it {}",
                    tier.route.observed.reach().label()
                )
            } else if Some(i) == choice {
                // Chosen before its hold passed while a lower tier is failing: the emergency
                // fallback (see `tiers`).
                let failing_below = (i + 1..tiers.tiers.len()).any(|j| {
                    view.as_ref()
                        .is_some_and(|v| v.failing.get(j) == Some(&true))
                });
                let emergency = !held(i) && failing_below;
                if share.is_some() {
                    "in service: takes its share of the split".to_owned()
                } else if failing {
                    "takes the request, though failing: no better tier is eligible".to_owned()
                } else if emergency {
                    "takes the request: the tier in use was failing (emergency fallback)".to_owned()
                } else {
                    "takes the request: the best tier in service".to_owned()
                }
            } else if share.is_some() {
                "in service: takes its share of the split".to_owned()
            } else if choice.is_some_and(|c| i > c) {
                "eligible, below the tier in use: next in line if that one refuses".to_owned()
            } else if failing {
                format!(
                    "eligible but failing: at least {FAILING_ERROR_PERCENT}% errors among at \
                     least {FAILING_MIN_ANSWERS} answers in the last {}s",
                    FAILING_WINDOW.as_secs()
                )
            } else {
                format!(
                    "held: eligible for {:.1}s, traffic falls back to it after {}s",
                    eligible_for.unwrap_or(0.0),
                    hold.as_secs_f64()
                )
            };
            let counted = answers.iter().find(|(t, _, _)| t == tier.name.as_str());
            out_tiers.push(json!({
                "name": tier.name.as_str(),
                "source": policy.as_ref().and_then(|p| p.tiers.get(i)).map(|t| &t.source),
                "chosen": Some(i) == choice,
                "why": why,
                "eligible": tier.eligible,
                "usable": tier.usable(),
                "passing": tier.passing,
                "total": tier.total,
                "bridge": tier.bridge,
                "eligible_for_s": eligible_for,
                "failing": failing,
                "split_weight": split.as_ref().map(|_| weight(i)),
                "split_share": share,
                "answers": counted.map(|(_, ok, failed)| json!({"ok": ok, "failed": failed})),
                "route": describe(&tier.route, &resilience.outlier),
            }));
        }
        let decision = match choice.and_then(|c| tiers.tiers.get(c)) {
            Some(tier) => json!({
                "tier": tier.name.as_str(),
                "why": if split_total > 0 {
                    "a split is in force: each request draws a tier in service by its weight"
                } else {
                    "the first tier in service wins; lower tiers take the request if it refuses"
                },
            }),
            None => {
                let error = if known || tiers.tiers.iter().any(|t| t.total > 0) {
                    MeshError::NoHealthyEndpoint
                } else {
                    MeshError::UnknownBeyond("no such service in the catalog, nor on any platform")
                };
                json!({
                    "answer": error.status().as_u16(),
                    "error": error.code(),
                    "why": "no tier is eligible",
                })
            }
        };
        Ok(json!({
            "service": name,
            "role": "gateway",
            "catalog": if known { "known" } else { "unknown: the tiers of `*`" },
            "decision": decision,
            "tiers": out_tiers,
            "policy": {
                "tiers": policy.as_ref().map(|p| p.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>()),
                "hold_seconds": hold.as_secs_f64(),
                "split": split,
                "shadow": policy.as_ref().and_then(|p| p.shadow).map(|s| json!({
                    "tier": tiers.tiers.get(s.tier).map(|t| t.name.as_str()),
                    "percent": s.percent,
                })),
                "calls": policy_view(&resilience),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::gateway::policy::{Pool, Upstream};
    use crate::gateway::{Policies, Table};
    use crate::metrics::Metrics;
    use crate::proxy::resilience::Resilience;

    const HOLD: Duration = Duration::from_secs(3);

    fn table(mesos_health: &str) -> Table {
        let text = format!(
            "[[node]]\nname = \"m\"\naddress = \"127.0.0.1\"\n\n[[service]]\nname = \"giphy\"\n\
             node = \"m\"\nport = 31000\nmeta = {{ platform = \"mesos\" }}\nhealth = \"{mesos_health}\"\n"
        );
        let snapshot = crate::catalog::file::parse(&text, Path::new("t.toml")).unwrap();
        let policies = Policies {
            default_hold: HOLD,
            ..Policies::default()
        };
        let upstreams = BTreeMap::from([(
            "kubernetes".to_owned(),
            Upstream {
                pool: Pool::Addresses(vec!["127.0.0.1:9".parse().unwrap()]),
                bridge: true,
            },
        )]);
        Table::build(&snapshot, &policies, &upstreams, false)
    }

    fn whys(answer: &Value) -> Vec<(bool, String)> {
        answer["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["chosen"] == true, t["why"].as_str().unwrap().to_owned()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_tier_is_explained_as_held_until_its_hold_passes() {
        let gateway = Gateway::new(
            table("critical"),
            10,
            Resilience::default(),
            Metrics::new(),
            None,
        );
        let answer = gateway.explain("/service/giphy/x").unwrap();
        assert_eq!(answer["decision"]["tier"], "kubernetes");
        gateway.store(table("passing"));
        let answer = gateway.explain("/service/giphy/x").unwrap();
        let why = whys(&answer);
        assert_eq!(answer["decision"]["tier"], "kubernetes", "{answer:#}");
        assert!(
            !why[0].0 && why[0].1.starts_with("held: eligible for 0.0s"),
            "{why:?}"
        );
        assert!(why[1].0, "{why:?}");
        tokio::time::advance(HOLD + Duration::from_millis(1)).await;
        let answer = gateway.explain("/service/giphy/x").unwrap();
        assert_eq!(answer["decision"]["tier"], "mesos", "{answer:#}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_lower_tier_gives_way_at_once_and_is_explained_as_the_emergency_fallback() {
        let gateway = Gateway::new(
            table("critical"),
            10,
            Resilience::default(),
            Metrics::new(),
            None,
        );
        let k8s = gateway.load().services["giphy"].tiers[1].name.clone();
        for _ in 0..FAILING_MIN_ANSWERS {
            gateway.record("giphy", 1, &k8s, true, Duration::from_millis(1));
        }
        gateway.store(table("passing"));
        let answer = gateway.explain("/service/giphy/x").unwrap();
        let why = whys(&answer);
        assert_eq!(answer["decision"]["tier"], "mesos", "{answer:#}");
        assert_eq!(
            why[0],
            (
                true,
                "takes the request: the tier in use was failing (emergency fallback)".to_owned()
            )
        );
        assert_eq!(answer["tiers"][1]["failing"], true, "{answer:#}");
        assert_eq!(
            answer["tiers"][1]["answers"]["failed"],
            u64::from(FAILING_MIN_ANSWERS)
        );
    }
}
