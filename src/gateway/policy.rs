//! Route policies: per service (or `*`), the ordered tiers, the fail-back hold and an optional
//! weighted split. Written in the gateway's TOML file or stored in the registry's KV under
//! `skyline/routes/<service>` (as JSON or TOML); validated before use.
//!
//! ```toml
//! [routes."*"]
//! tiers = [{ select = "platform=mesos" }, { upstream = "kubernetes" }]
//!
//! [routes.giphy]
//! tiers = [{ select = "platform=mesos", min_healthy = "50%" }, { upstream = "kubernetes" }]
//! hold = "3s"
//! split = [90, 10]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::ServiceName;
use crate::config::parse_duration_setting;
use crate::contract::{BRIDGE_SERVICE, KUBERNETES};
pub use crate::routing::DEFAULT_HOLD;

// === What users write ===

/// A route policy as written in TOML or JSON.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicyConfig {
    /// The tiers, best first [default: `platform=mesos`, then upstream `kubernetes`].
    pub tiers: Option<Vec<TierConfig>>,
    /// How long a higher tier must stay eligible before traffic falls back to it, such as
    /// "3s" or "500ms" [default: 3s].
    pub hold: Option<String>,
    /// Weights per tier, such as [90, 10]: traffic is split over the tiers in service instead
    /// of all going to the best one [default: none].
    pub split: Option<Vec<u32>>,
    /// Copies a share of idempotent requests (GET, HEAD) to a tier as well, compares the copy's
    /// status class with the answer's and discards the copy, such as
    /// { tier = "kubernetes", percent = 10 }; `skyline migrate --shadow` sets it [default: none].
    pub shadow: Option<ShadowConfig>,
}

/// A shadow as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The tier that gets the copies, by name.
    pub tier: String,
    /// The share of GET and HEAD requests copied, 1 to 100.
    pub percent: u32,
}

/// One tier as written: exactly one of `select` and `upstream`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Instances of the service whose meta matches, such as "platform=mesos"; requests go to
    /// their nodes' inbound proxies.
    pub select: Option<String>,
    /// A named upstream pool from `[upstreams]`, such as "kubernetes" (the bridges).
    pub upstream: Option<String>,
    /// The tier is eligible while at least this many endpoints pass: a count (2) or a share
    /// of the tier's instances ("50%") [default: 1].
    pub min_healthy: Option<MinHealthyConfig>,
    /// The tier's name in `x-skyline-tier` and `/routes` [default: the selector's value or the
    /// upstream's name].
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MinHealthyConfig {
    Count(u32),
    Text(String),
}

/// A named upstream pool as written in `[upstreams.<name>]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The catalog service whose passing instances form the pool (their own address:port).
    pub service: Option<String>,
    /// Fixed addresses of the pool, instead of a catalog service.
    pub addresses: Option<Vec<String>>,
    /// Whether the pool is the Kubernetes bridges: a request that came from a bridge is never
    /// sent back to such a tier [default: true for `kubernetes` and `skyline-bridge`].
    pub bridge: Option<bool>,
}

// === Validated ===

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoutePolicy {
    pub tiers: Vec<Tier>,
    #[serde(serialize_with = "as_secs")]
    pub hold: Duration,
    pub split: Option<Vec<u32>>,
    pub shadow: Option<Shadow>,
}

/// A validated shadow: copies of `percent` % of idempotent requests go to tier `tier` (an
/// index into the tiers) too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shadow {
    pub tier: usize,
    pub percent: u32,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The name of a tier, as shown in `x-skyline-tier`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TierName(Arc<str>);

impl TierName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a shared string (a metrics label value).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for TierName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub name: TierName,
    pub source: TierSource,
    pub min_healthy: MinHealthy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierSource {
    /// Instances whose meta `key` equals `value`.
    Select { key: String, value: String },
    /// A named upstream pool.
    Upstream(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MinHealthy {
    Count(u32),
    Percent(u8),
}

impl MinHealthy {
    /// Whether `passing` endpoints out of `total` are enough. At least one is always needed.
    pub fn eligible(self, passing: usize, total: usize) -> bool {
        let needed = match self {
            MinHealthy::Count(n) => n as usize,
            MinHealthy::Percent(p) => (total * usize::from(p)).div_ceil(100),
        };
        passing >= needed.max(1)
    }
}

/// A named upstream pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upstream {
    pub pool: Pool,
    pub bridge: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Service(ServiceName),
    Addresses(Vec<SocketAddr>),
}

/// The upstreams when none are configured: `kubernetes`, the catalog's `skyline-bridge`.
pub fn default_upstreams() -> BTreeMap<String, Upstream> {
    let mut upstreams = BTreeMap::new();
    if let Ok(service) = ServiceName::parse(BRIDGE_SERVICE) {
        upstreams.insert(
            KUBERNETES.to_owned(),
            Upstream {
                pool: Pool::Service(service),
                bridge: true,
            },
        );
    }
    upstreams
}

/// A refused policy: which key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub struct PolicyError {
    pub key: String,
    pub reason: String,
}

fn refuse(key: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        key: key.into(),
        reason: reason.into(),
    }
}

// === impl RoutePolicy ===

impl RoutePolicy {
    /// Tier 1: instances with `platform=mesos`; tier 2: the Kubernetes bridges.
    pub fn seed(hold: Duration) -> Self {
        Self {
            tiers: vec![
                Tier {
                    name: TierName("mesos".into()),
                    source: TierSource::Select {
                        key: "platform".into(),
                        value: "mesos".into(),
                    },
                    min_healthy: MinHealthy::Count(1),
                },
                Tier {
                    name: TierName(KUBERNETES.into()),
                    source: TierSource::Upstream(KUBERNETES.into()),
                    min_healthy: MinHealthy::Count(1),
                },
            ],
            hold,
            split: None,
            shadow: None,
        }
    }

    /// Parses a policy stored in the KV: JSON when it starts with `{`, TOML otherwise.
    pub fn parse_text(
        text: &str,
        upstreams: &BTreeMap<String, Upstream>,
        default_hold: Duration,
    ) -> Result<Self, PolicyError> {
        let config: RoutePolicyConfig = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| refuse("(value)", e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| refuse("(value)", e.message().trim().to_owned()))?
        };
        config.validate(upstreams, default_hold)
    }
}

impl RoutePolicyConfig {
    /// Checks every field; errors name the key within the policy (`tiers[1].upstream`).
    pub fn validate(
        self,
        upstreams: &BTreeMap<String, Upstream>,
        default_hold: Duration,
    ) -> Result<RoutePolicy, PolicyError> {
        let hold = match &self.hold {
            None => default_hold,
            Some(text) => parse_duration_setting(text).map_err(|reason| refuse("hold", reason))?,
        };
        let tiers = match self.tiers {
            None => RoutePolicy::seed(hold).tiers,
            Some(tiers) => {
                if tiers.is_empty() {
                    return Err(refuse("tiers", "must list at least one tier"));
                }
                tiers
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| t.validate(i, upstreams))
                    .collect::<Result<_, _>>()?
            }
        };
        if let Some(split) = &self.split {
            if split.len() != tiers.len() {
                return Err(refuse(
                    "split",
                    format!("has {} weights for {} tiers", split.len(), tiers.len()),
                ));
            }
            if split.iter().all(|&w| w == 0) {
                return Err(refuse("split", "at least one weight must be above 0"));
            }
        }
        let shadow = match self.shadow {
            None => None,
            Some(shadow) => {
                let tier = tiers
                    .iter()
                    .position(|t: &Tier| t.name.as_str() == shadow.tier)
                    .ok_or_else(|| {
                        refuse(
                            "shadow.tier",
                            format!("{:?} is not one of the policy's tiers", shadow.tier),
                        )
                    })?;
                if !(1..=100).contains(&shadow.percent) {
                    return Err(refuse("shadow.percent", "must be between 1 and 100"));
                }
                Some(Shadow {
                    tier,
                    percent: shadow.percent,
                })
            }
        };
        Ok(RoutePolicy {
            tiers,
            hold,
            shadow,
            split: self.split,
        })
    }
}

impl TierConfig {
    fn validate(
        self,
        i: usize,
        upstreams: &BTreeMap<String, Upstream>,
    ) -> Result<Tier, PolicyError> {
        let key = |field: &str| format!("tiers[{i}].{field}");
        let (source, default_name) = match (self.select, self.upstream) {
            (Some(select), None) => {
                let Some((k, v)) = select.split_once('=') else {
                    return Err(refuse(
                        key("select"),
                        "expected key=value, such as platform=mesos",
                    ));
                };
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(refuse(
                        key("select"),
                        "expected key=value, such as platform=mesos",
                    ));
                }
                let source = TierSource::Select {
                    key: k.to_owned(),
                    value: v.to_owned(),
                };
                (source, v.to_owned())
            }
            (None, Some(name)) => {
                if !upstreams.contains_key(&name) {
                    let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                    return Err(refuse(
                        key("upstream"),
                        format!("unknown upstream {name:?}; known: {known:?}"),
                    ));
                }
                (TierSource::Upstream(name.clone()), name)
            }
            _ => {
                return Err(refuse(
                    format!("tiers[{i}]"),
                    "needs exactly one of `select` and `upstream`",
                ));
            }
        };
        let min_healthy = match self.min_healthy {
            None => MinHealthy::Count(1),
            Some(MinHealthyConfig::Count(n)) => MinHealthy::Count(n),
            Some(MinHealthyConfig::Text(text)) => parse_min_healthy(&text).ok_or_else(|| {
                refuse(
                    key("min_healthy"),
                    "expected a count or a percentage like \"50%\"",
                )
            })?,
        };
        let name = self.name.unwrap_or(default_name);
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(refuse(
                key("name"),
                "must be printable ASCII without spaces",
            ));
        }
        Ok(Tier {
            name: TierName(name.into()),
            source,
            min_healthy,
        })
    }
}

fn parse_min_healthy(text: &str) -> Option<MinHealthy> {
    let text = text.trim();
    match text.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= 100)
            .map(MinHealthy::Percent),
        None => text.parse().ok().map(MinHealthy::Count),
    }
}

impl UpstreamConfig {
    pub fn validate(self, name: &str) -> Result<Upstream, PolicyError> {
        let key = |field: &str| format!("upstreams.{name}.{field}");
        let pool = match (self.service, self.addresses) {
            (Some(service), None) => Pool::Service(
                ServiceName::parse(&service).map_err(|e| refuse(key("service"), e.to_string()))?,
            ),
            (None, Some(addresses)) => Pool::Addresses(
                addresses
                    .iter()
                    .map(|a| {
                        a.parse().map_err(|_| {
                            refuse(
                                key("addresses"),
                                format!("{a:?} is not an address like 10.0.0.21:5041"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => {
                return Err(refuse(
                    format!("upstreams.{name}"),
                    "needs exactly one of `service` and `addresses`",
                ));
            }
        };
        let bridge = self.bridge.unwrap_or(
            name == KUBERNETES || matches!(&pool, Pool::Service(s) if s.as_str() == BRIDGE_SERVICE),
        );
        Ok(Upstream { pool, bridge })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RoutePolicy, PolicyError> {
        RoutePolicy::parse_text(text, &default_upstreams(), DEFAULT_HOLD)
    }

    #[test]
    fn a_toml_policy_with_tiers_hold_and_split_is_accepted() {
        let p = parse(
            r#"tiers = [{ select = "platform=mesos", min_healthy = "50%" }, { upstream = "kubernetes" }]
hold = "500ms"
split = [90, 10]"#,
        )
        .unwrap();
        assert_eq!(p.tiers[0].name.as_str(), "mesos");
        assert_eq!(p.tiers[0].min_healthy, MinHealthy::Percent(50));
        assert_eq!(p.tiers[1].source, TierSource::Upstream("kubernetes".into()));
        assert_eq!(p.hold, Duration::from_millis(500));
        assert_eq!(p.split, Some(vec![90, 10]));
        let shadowed =
            parse(r#"{"split": [100, 0], "shadow": {"tier": "kubernetes", "percent": 10}}"#)
                .unwrap();
        assert_eq!(
            shadowed.shadow,
            Some(Shadow {
                tier: 1,
                percent: 10
            })
        );
    }

    #[test]
    fn a_json_policy_is_accepted_and_defaults_fill_the_rest() {
        let p = parse(r#"{"hold": "1s"}"#).unwrap();
        assert_eq!(p, RoutePolicy::seed(Duration::from_secs(1)));
    }

    #[test]
    fn invalid_policies_name_the_key() {
        for (text, key) in [
            (r#"tiers = [{ upstream = "vms" }]"#, "tiers[0].upstream"),
            (r#"tiers = [{ select = "mesos" }]"#, "tiers[0].select"),
            (
                r#"tiers = [{ select = "a=b", upstream = "kubernetes" }]"#,
                "tiers[0]",
            ),
            (
                r#"tiers = [{ select = "a=b", min_healthy = "150%" }]"#,
                "tiers[0].min_healthy",
            ),
            (r#"hold = "soon""#, "hold"),
            (r#"split = [1, 2, 3]"#, "split"),
            (r#"split = [0, 0]"#, "split"),
            (r#"tiers = []"#, "tiers"),
            (r#"{"tiers": 3}"#, "(value)"),
            (r#"shadow = { tier = "vms", percent = 10 }"#, "shadow.tier"),
            (
                r#"shadow = { tier = "kubernetes", percent = 0 }"#,
                "shadow.percent",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn min_healthy_needs_at_least_one_endpoint() {
        assert!(!MinHealthy::Percent(50).eligible(0, 0));
        assert!(MinHealthy::Percent(50).eligible(1, 2));
        assert!(!MinHealthy::Percent(50).eligible(1, 3));
        assert!(!MinHealthy::Count(2).eligible(1, 5));
        assert!(MinHealthy::Count(0).eligible(1, 1));
    }
}
