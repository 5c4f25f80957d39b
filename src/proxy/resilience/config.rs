//! `[resilience]` (every role) and the agent's `[routes.<service>]`: how calls to services
//! behave, as users write it, validated into a [`Resilience`].

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Resilience;
use crate::config::reference::{DURATION, FileKey, Value};
use crate::config::{ConfigError, Source, file_only, parse_duration_setting};
use crate::routing::balance::Balance;

/// The keys of `[resilience]` (every role) and of the agent's `[routes.<service>]`.
pub const RESILIENCE_KEYS: &[FileKey] = &[
    file_only(
        "connect_timeout",
        DURATION,
        Value::Default("\"2s\""),
        "The longest a connection to an upstream may take to open.",
    ),
    file_only(
        "request_timeout",
        DURATION,
        Value::Default("\"60s\""),
        "The longest a request may wait for its response head, retries included; then 504 `upstream-timeout`.",
    ),
    file_only(
        "attempt_timeout",
        DURATION,
        Value::Example {
            toml: "\"500ms\"",
            default: "the request's",
        },
        "The longest one attempt may wait for its response head, before a retry.",
    ),
    file_only(
        "idle_timeout",
        DURATION,
        Value::Default("\"5m\""),
        "A response body that stalls this long is cut.",
    ),
    file_only(
        "max_request_body",
        "integer, bytes",
        Value::Example {
            toml: "1048576",
            default: "no limit",
        },
        "The largest request body forwarded: a longer declared length gets 413 `content-too-large` before anything is forwarded; a chunked body is cut off where it passes the limit.",
    ),
    file_only(
        "retries",
        "integer, 0 to 10",
        Value::Default("2"),
        "Retries of a request after a 502/503/504, a timed-out attempt or a broken connection (idempotent requests with a body of at most 64 KiB, first hop only); a refused connection is always retried.",
    ),
    file_only(
        "balance",
        "`p2c` or `round_robin`",
        Value::Default("\"p2c\""),
        "How an endpoint is chosen: power of two choices (each of the two by inverse cost) over EWMA latency times requests in flight, or round robin; both respect weights.",
    ),
    file_only(
        "outlier.consecutive_failures",
        "integer",
        Value::Default("5"),
        "Failures in a row (5xx, refused or reset, timeout) that eject an endpoint.",
    ),
    file_only(
        "outlier.base_ejection",
        DURATION,
        Value::Default("\"30s\""),
        "An ejected endpoint sits out this long times the number of its ejections.",
    ),
    file_only(
        "outlier.max_ejection",
        DURATION,
        Value::Default("\"5m\""),
        "The longest an endpoint sits out.",
    ),
    file_only(
        "outlier.max_ejected_percent",
        "integer, percent (0 to 100)",
        Value::Default("50"),
        "Never more than this share of a route's endpoints is ejected.",
    ),
    file_only(
        "probe.path",
        "path",
        Value::Example {
            toml: "\"/health\"",
            default: "no probe (`/` once `probe` is given)",
        },
        "Active health probe: `GET` this path on every endpoint; given any `probe` key, the service is probed.",
    ),
    file_only(
        "probe.interval",
        "duration, at least 100ms",
        Value::Example {
            toml: "\"5s\"",
            default: "`5s`",
        },
        "Time between probes of an endpoint.",
    ),
    file_only(
        "probe.timeout",
        DURATION,
        Value::Example {
            toml: "\"1s\"",
            default: "`1s`",
        },
        "A probe not answered within this time fails.",
    ),
    file_only(
        "probe.unhealthy",
        "integer, at least 1",
        Value::Example {
            toml: "2",
            default: "`2`",
        },
        "Failed probes in a row that take an endpoint out of rotation.",
    ),
    file_only(
        "probe.healthy",
        "integer, at least 1",
        Value::Example {
            toml: "1",
            default: "`1`",
        },
        "Passed probes in a row that bring it back.",
    ),
];

/// `[resilience]` and `[routes.<service>]`: every key optional, over the defaults (or, for a
/// route, over `[resilience]`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResilienceSection {
    connect_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    attempt_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    /// The largest request body, in bytes [default: none, bodies stream whatever their size].
    /// A larger one is answered `413` with `x-skyline-error: content-too-large`.
    max_request_body: Option<Spanned<u64>>,
    retries: Option<Spanned<u32>>,
    balance: Option<Spanned<String>>,
    outlier: Option<OutlierSection>,
    probe: Option<ProbeSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierSection {
    consecutive_failures: Option<u32>,
    base_ejection: Option<Spanned<String>>,
    max_ejection: Option<Spanned<String>>,
    max_ejected_percent: Option<Spanned<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSection {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    unhealthy: Option<Spanned<u32>>,
    healthy: Option<Spanned<u32>>,
}

/// `base` with the keys `section` gives, each validated; `prefix` names the section in errors.
pub(crate) fn resilience(
    src: &Source,
    base: &Resilience,
    section: &ResilienceSection,
    prefix: &str,
) -> Result<Resilience, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let duration = |k: &str, field: &Option<Spanned<String>>, min: Duration| {
        let Some(field) = field else { return Ok(None) };
        let at = Some(field.span().start);
        let d =
            parse_duration_setting(field.get_ref()).map_err(|e| src.error(at, Some(&key(k)), e))?;
        if d < min {
            return Err(src.error(at, Some(&key(k)), format!("must be at least {min:?}")));
        }
        Ok(Some(d))
    };
    let ms = Duration::from_millis(1);
    let mut r = base.clone();
    if let Some(d) = duration("connect_timeout", &section.connect_timeout, ms)? {
        r.connect_timeout = d;
    }
    if let Some(d) = duration("request_timeout", &section.request_timeout, ms)? {
        r.request_timeout = d;
    }
    if let Some(d) = duration("attempt_timeout", &section.attempt_timeout, ms)? {
        r.attempt_timeout = Some(d);
    }
    if let Some(d) = duration("idle_timeout", &section.idle_timeout, ms)? {
        r.idle_timeout = d;
    }
    if let Some(n) = &section.max_request_body {
        r.max_request_body = Some(*n.get_ref());
    }
    if let Some(n) = &section.retries {
        if *n.get_ref() > 10 {
            let at = Some(n.span().start);
            return Err(src.error(at, Some(&key("retries")), "must be at most 10"));
        }
        r.retries = *n.get_ref();
    }
    if let Some(b) = &section.balance {
        r.balance = match b.get_ref().as_str() {
            "p2c" => Balance::P2c,
            "round_robin" => Balance::RoundRobin,
            other => {
                return Err(src.error(
                    Some(b.span().start),
                    Some(&key("balance")),
                    format!("unknown balance {other:?}; expected p2c or round_robin"),
                ));
            }
        };
    }
    if let Some(o) = &section.outlier {
        if let Some(n) = o.consecutive_failures {
            r.outlier.consecutive_failures = n;
        }
        if let Some(d) = duration("outlier.base_ejection", &o.base_ejection, ms)? {
            r.outlier.base_ejection = d;
        }
        if let Some(d) = duration("outlier.max_ejection", &o.max_ejection, ms)? {
            r.outlier.max_ejection = d;
        }
        if let Some(p) = &o.max_ejected_percent {
            if *p.get_ref() > 100 {
                let at = Some(p.span().start);
                let k = key("outlier.max_ejected_percent");
                return Err(src.error(at, Some(&k), "must be at most 100"));
            }
            r.outlier.max_ejected_percent = *p.get_ref();
        }
    }
    if let Some(p) = &section.probe {
        let mut probe = r.probe.clone().unwrap_or_default();
        if let Some(path) = &p.path {
            if !path.get_ref().starts_with('/') || path.get_ref().parse::<http::Uri>().is_err() {
                let at = Some(path.span().start);
                let k = key("probe.path");
                return Err(src.error(at, Some(&k), "must be a path such as \"/health\""));
            }
            probe.path = path.get_ref().clone();
        }
        if let Some(d) = duration("probe.interval", &p.interval, Duration::from_millis(100))? {
            probe.interval = d;
        }
        if let Some(d) = duration("probe.timeout", &p.timeout, ms)? {
            probe.timeout = d;
        }
        for (name, field, slot) in [
            ("probe.unhealthy", &p.unhealthy, &mut probe.unhealthy),
            ("probe.healthy", &p.healthy, &mut probe.healthy),
        ] {
            if let Some(n) = field {
                if *n.get_ref() == 0 {
                    let at = Some(n.span().start);
                    return Err(src.error(at, Some(&key(name)), "must be at least 1"));
                }
                *slot = *n.get_ref();
            }
        }
        r.probe = Some(probe);
    }
    Ok(r)
}
