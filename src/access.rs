//! The access log: one line per request on every proxy listener (agent outbound and inbound,
//! gateway, bridge), written where the serve layer records the request's metrics.
//!
//! A line carries the time, the request id (`x-request-id`, the one the mesh adds when the
//! client sent none, so one request has the same id on every hop), the role, the service, the
//! tier and platform that answered, the upstream address, the status, the bytes in and out,
//! the duration, the attempts and the mesh error code (`x-skyline-error`). It is human
//! (`key=value`) by default and JSON with `--log-format json`, in the layout of the other log
//! lines, on standard error.
//!
//! Writing costs no system call on the request path: a line is formatted (without allocating)
//! into a shared buffer under a short lock, and a thread writes the buffer out every
//! [`FLUSH_EVERY`] or as soon as it holds [`FLUSH_AT`] bytes. A writer that cannot keep up
//! (a blocked pipe) does not slow requests down: past [`MAX_BUFFERED`] lines are dropped and
//! counted, and the count is reported once the writer catches up.
//!
//! A sampling rate below 1 writes that share of the answered requests, chosen at random, and
//! every failed one regardless: a 5xx, or any answer carrying a mesh error code. The default,
//! [`DEFAULT_SAMPLE`], is what the benchmark can afford (docs/benchmarks.md).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use toml::Spanned;

use crate::config::reference::{FileKey, Section, Value};
use crate::config::{ConfigError, Source, key};
use crate::metrics::{Role, ServiceLabel};

/// How often buffered lines are written out at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the writer before [`FLUSH_EVERY`].
pub const FLUSH_AT: usize = 32 * 1024;
/// Buffered bytes past which lines are dropped (and counted) until the writer catches up.
pub const MAX_BUFFERED: usize = 4 * 1024 * 1024;
/// The share of requests that did not fail written by default (failed ones are all written).
pub const DEFAULT_SAMPLE: f64 = 0.01;

// === Settings ===

/// How log lines are written: for a person, or one JSON object per line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Human,
    Json,
}

/// The format of every log line of the process: `main` sets it from `--log-format` with the
/// tracing subscriber (which is process-wide too); human until then.
static FORMAT: OnceLock<Format> = OnceLock::new();

/// Sets the format of the access log's lines (once, at start; later calls are ignored).
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

/// The access log's settings (the same in every role).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    /// The share of requests that did not fail written, from 0 to 1 (validated: never NaN);
    /// failed ones are always written.
    pub sample: f64,
    /// Whether metrics are recorded (`[metrics] enabled`, `--metrics`): off, no request does any
    /// metrics work and `/metrics` answers 404 saying so. Beside the access log because both
    /// are the per-request observability that the benchmark measures.
    pub metrics: bool,
}

// A validated sample is never NaN, so equality is total.
impl Eq for Settings {}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            sample: DEFAULT_SAMPLE,
            metrics: true,
        }
    }
}

impl Settings {
    /// No access log (the demos, which print their own story).
    pub fn off() -> Self {
        Settings {
            enabled: false,
            ..Settings::default()
        }
    }
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The access log's flags, the same in every role.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AccessArgs {
    /// The access log: one line per request on standard error, "on" or "off" [default: on]
    #[arg(long, env = "SKYLINE_ACCESS_LOG", value_name = "on|off")]
    pub access_log: Option<OnOff>,

    /// The share of requests the access log writes, from 0 to 1 (every failed request is
    /// written: a 5xx or a mesh error) [default: 0.01]
    #[arg(long, env = "SKYLINE_ACCESS_LOG_SAMPLE", value_name = "FRACTION")]
    pub access_log_sample: Option<f64>,

    /// Metrics recording (served at /metrics), "on" or "off" [default: on]
    #[arg(long, env = "SKYLINE_METRICS", value_name = "on|off")]
    pub metrics: Option<OnOff>,
}

/// The `[metrics]` table of every role's file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsSection {
    enabled: Option<bool>,
}

/// The `[metrics]` table, described (see [`crate::config::reference`]).
pub const METRICS_SECTION: Section = Section {
    table: "metrics",
    sample: "",
    doc: "Metrics, served at `/metrics` on the admin listener. Off, no request does any metrics \
          work, `/metrics` answers 404, the dashboard shows no traffic, and `skyline migrate` \
          cannot guard on a gateway's answers.",
    defaults_from: None,
    keys: &[key("enabled", "metrics", "boolean", Value::Default("true"))],
};

/// The `[log]` table of every role's file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    access_log: Option<Spanned<String>>,
    access_log_sample: Option<Spanned<f64>>,
}

/// The `[log]` table, described (see [`crate::config::reference`]).
pub const FILE_SECTION: Section = Section {
    table: "log",
    sample: "",
    doc: "The access log: one line per request on standard error, in the format of `--log-format`.",
    defaults_from: None,
    keys: LOG_KEYS,
};

const LOG_KEYS: &[FileKey] = &[
    key(
        "access_log",
        "access_log",
        "`\"on\"` or `\"off\"`",
        Value::Default("\"on\""),
    ),
    key(
        "access_log_sample",
        "access_log_sample",
        "number from 0 to 1: the share of requests written; every failed request (a 5xx or a mesh error) is written regardless",
        Value::Default("0.01"),
    ),
];

impl AccessArgs {
    /// Flags and variables over the file's `[log]` table.
    pub(crate) fn resolve(
        &self,
        src: &Source,
        file: &LogSection,
        metrics: &MetricsSection,
    ) -> Result<Settings, ConfigError> {
        let metrics = match self.metrics {
            Some(flag) => flag == OnOff::On,
            None => metrics.enabled.unwrap_or(true),
        };
        let enabled = match (self.access_log, &file.access_log) {
            (Some(flag), _) => flag == OnOff::On,
            (None, Some(text)) => match text.get_ref().as_str() {
                "on" => true,
                "off" => false,
                other => {
                    return Err(src.at(
                        Some(text.span().start),
                        "log.access_log",
                        format!("{other:?} is neither \"on\" nor \"off\""),
                    ));
                }
            },
            (None, None) => true,
        };
        let (sample, at) = match (self.access_log_sample, &file.access_log_sample) {
            (Some(s), _) => (s, None),
            (None, Some(s)) => (*s.get_ref(), Some(s.span().start)),
            (None, None) => (DEFAULT_SAMPLE, None),
        };
        if !(0.0..=1.0).contains(&sample) {
            return Err(src.at(
                at,
                "log.access_log_sample",
                format!("{sample} is not a share from 0 to 1"),
            ));
        }
        Ok(Settings {
            enabled,
            sample,
            metrics,
        })
    }
}

// === Note ===

/// What a role's handler notes about a request, returned beside its response: the service
/// (the metrics label) and, for the access log, where the request went.
#[derive(Clone, Debug, Default)]
pub struct Note {
    pub label: Option<ServiceLabel>,
    pub trail: Trail,
    /// The route or tier that answered: `direct` or `catch-all` on an agent's outbound,
    /// `local` on its inbound, the tier's name on the gateway, `cluster-dns` or `gateway` on a
    /// bridge.
    pub tier: Tag,
    /// The platform of that tier, where the role knows it.
    pub platform: Tag,
}

/// The forwarder's part of a [`Note`]: the endpoint it sent the request to last, and how many
/// attempts it made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trail {
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
}

/// A short text of a [`Note`], without allocating.
#[derive(Clone, Debug, Default)]
pub enum Tag {
    #[default]
    None,
    Static(&'static str),
    Shared(Arc<str>),
}

impl Tag {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Tag::None => None,
            Tag::Static(s) => Some(s),
            Tag::Shared(s) => Some(s),
        }
    }
}

// === Entry ===

/// One access log line's fields.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub role: Role,
    pub request_id: &'a [u8],
    pub service: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub platform: Option<&'a str>,
    pub upstream: Option<SocketAddr>,
    pub status: u16,
    /// The request body's length, when it was declared (`Content-Length`; 0 without a body).
    pub bytes_in: Option<u64>,
    /// The response body bytes sent to the client.
    pub bytes_out: u64,
    pub duration: Duration,
    pub attempts: u32,
    pub error: Option<&'a str>,
}

impl<'a> Entry<'a> {
    /// The fields of a request from what its handler noted.
    pub fn noted(role: Role, note: &'a Note, request_id: &'a [u8]) -> Self {
        Entry {
            role,
            request_id,
            service: note.label.as_ref().map(ServiceLabel::name),
            tier: note.tier.as_str(),
            platform: note.platform.as_str(),
            upstream: note.trail.upstream,
            status: 0,
            bytes_in: Some(0),
            bytes_out: 0,
            duration: Duration::ZERO,
            attempts: note.trail.attempts,
            error: None,
        }
    }
}

// === AccessLog ===

/// Where a process's access log lines go. Cheap to clone (one shared buffer and its writer).
#[derive(Clone, Debug)]
pub struct AccessLog {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// Requests are written when a random `u32` is below this (all of them at `u32::MAX`).
    threshold: u32,
    format: Format,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Buffer>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Buffer {
    lines: Vec<u8>,
    closed: bool,
}

impl AccessLog {
    /// The access log of `settings` on standard error, in the process's log format, or `None`
    /// when it is off.
    pub fn stderr(settings: &Settings) -> Option<AccessLog> {
        let format = FORMAT.get().copied().unwrap_or_default();
        Self::to(settings, format, std::io::stderr)
    }

    /// The access log of `settings`, written to what `out` opens, or `None` when it is off.
    pub fn to<W: std::io::Write>(
        settings: &Settings,
        format: Format,
        out: impl Fn() -> W + Send + 'static,
    ) -> Option<AccessLog> {
        if !settings.enabled {
            return None;
        }
        let shared = Arc::new(Shared::default());
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("skyline-access-log".into())
                .spawn(move || write_out(&shared, out))
                .ok()?
        };
        // `as` saturates: a sample of 1 is every request.
        let threshold = (settings.sample * f64::from(u32::MAX)) as u32;
        Some(AccessLog {
            inner: Arc::new(Handle {
                shared,
                threshold,
                format,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Whether this request is written if it does not fail (the sampling draw); ask once per
    /// request, before gathering its fields.
    pub fn sampled(&self) -> bool {
        self.inner.threshold == u32::MAX || fastrand::u32(..) < self.inner.threshold
    }

    /// Whether a request's line is written: drawn by [`sampled`](Self::sampled), or failed (a
    /// 5xx, or an answer with a mesh error code).
    pub fn keeps(drawn: bool, status: u16, error: Option<&str>) -> bool {
        drawn || status >= 500 || error.is_some()
    }

    /// Writes one line (the request was [`kept`](Self::keeps)).
    pub fn write(&self, entry: &Entry<'_>) {
        let shared = &self.inner.shared;
        let now = SystemTime::now();
        let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.lines.len() >= MAX_BUFFERED {
            drop(state);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let out = &mut state.lines;
        match self.inner.format {
            Format::Human => human(out, now, entry),
            Format::Json => json(out, now, entry),
        }
        let wake = out.len() >= FLUSH_AT;
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
    }
}

impl Drop for Handle {
    /// Writes out what is buffered and stops the writer.
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.wake.notify_one();
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

/// The writer thread: takes the buffered lines every [`FLUSH_EVERY`] (or when woken) and
/// writes them out, outside the lock.
fn write_out<W: std::io::Write>(shared: &Shared, out: impl Fn() -> W) {
    let mut spare = Vec::with_capacity(FLUSH_AT * 2);
    loop {
        let closed = {
            let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            // Lines gather for a while rather than one write per request.
            let mut state = shared
                .wake
                .wait_timeout_while(state, FLUSH_EVERY, |s| {
                    s.lines.len() < FLUSH_AT && !s.closed
                })
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            std::mem::swap(&mut state.lines, &mut spare);
            state.closed
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "access log lines dropped: the log output did not keep up"
            );
        }
        if !spare.is_empty() {
            // One write of whole lines: the other log lines (also standard error, under its
            // lock) never land inside one.
            let _ = out().write_all(&spare);
            spare.clear();
            if spare.capacity() > MAX_BUFFERED {
                spare = Vec::with_capacity(FLUSH_AT * 2);
            }
        }
        if closed {
            return;
        }
    }
}

// === Formats ===

/// `2026-12-03T07:25:00.123456Z  INFO skyline::access: request_id=... role=... ...`, as the
/// other human log lines; a value that is missing is `-`.
fn human(out: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    timestamp(out, now);
    out.extend_from_slice(b"  INFO skyline::access: request_id=");
    human_value(out, e.request_id);
    out.extend_from_slice(b" role=");
    out.extend_from_slice(e.role.as_str().as_bytes());
    fields(out, Style::Human, e);
    out.push(b'\n');
}

/// A value of a human line: as it is when it is plain, else quoted with `"` and `\` escaped
/// and anything outside printable ASCII as `?`.
fn human_value(out: &mut Vec<u8>, value: &[u8]) {
    let plain = !value.is_empty()
        && value
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b'=');
    if plain {
        out.extend_from_slice(value);
        return;
    }
    out.push(b'"');
    for &b in value {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b' ' => out.push(b),
            b if b.is_ascii_graphic() => out.push(b),
            _ => out.push(b'?'),
        }
    }
    out.push(b'"');
}

/// `{"timestamp":"...","level":"INFO","fields":{"message":"access",...},"target":"skyline::access"}`,
/// the layout of the other JSON log lines; a value that is missing is `null`.
fn json(out: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, now);
    out.extend_from_slice(
        b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"access\",\"request_id\":",
    );
    json_string(out, Some(e.request_id));
    out.extend_from_slice(b",\"role\":\"");
    out.extend_from_slice(e.role.as_str().as_bytes());
    out.push(b'"');
    fields(out, Style::Json, e);
    out.extend_from_slice(b"},\"target\":\"skyline::access\"}\n");
}

/// How a line writes its fields: `key=value` with `-` for a missing value, or JSON members
/// with `null`.
#[derive(Clone, Copy)]
enum Style {
    Human,
    Json,
}

impl Style {
    /// The separator and the key before a value: ` key=` or `,"key":`.
    fn key(self, out: &mut Vec<u8>, key: &str) {
        match self {
            Style::Human => {
                out.push(b' ');
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
            }
            Style::Json => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
            }
        }
    }

    fn missing(self, out: &mut Vec<u8>) {
        out.extend_from_slice(match self {
            Style::Human => b"-",
            Style::Json => b"null",
        });
    }

    fn text(self, out: &mut Vec<u8>, value: Option<&str>) {
        match self {
            Style::Human => human_value(out, value.map_or(b"-", str::as_bytes)),
            Style::Json => json_string(out, value.map(str::as_bytes)),
        }
    }

    /// A string that never needs escaping (an address): quoted in JSON only.
    fn plain(self, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        match self {
            Style::Human => write(out),
            Style::Json => {
                out.push(b'"');
                write(out);
                out.push(b'"');
            }
        }
    }
}

/// The fields after the request id and role, the same in both formats.
fn fields(out: &mut Vec<u8>, style: Style, e: &Entry<'_>) {
    for (key, value) in [
        ("service", e.service),
        ("tier", e.tier),
        ("platform", e.platform),
    ] {
        style.key(out, key);
        style.text(out, value);
    }
    style.key(out, "upstream");
    match e.upstream {
        Some(addr) => style.plain(out, |out| address(out, addr)),
        None => style.missing(out),
    }
    style.key(out, "status");
    number(out, e.status);
    style.key(out, "bytes_in");
    match e.bytes_in {
        Some(n) => number(out, n),
        None => style.missing(out),
    }
    style.key(out, "bytes_out");
    number(out, e.bytes_out);
    style.key(out, "duration_ms");
    millis(out, e.duration);
    style.key(out, "attempts");
    number(out, e.attempts);
    style.key(out, "error");
    style.text(out, e.error);
}

/// A JSON string (or `null`): `"` and `\` escaped, control characters as `\u00XX`, bytes
/// outside ASCII as U+FFFD (request ids are ASCII; anything else is a client's invention).
fn json_string(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(value) = value else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    for &b in value {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            0x20..=0x7e => out.push(b),
            0x00..=0x1f | 0x7f => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.extend_from_slice("\u{fffd}".as_bytes()),
        }
    }
    out.push(b'"');
}

// Numbers are written digit by digit rather than through `core::fmt`, whose machinery (a
// `write!` with padding costs hundreds of instructions) was most of a line's cost.

/// A number in decimal.
fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` in exactly `width` decimal digits, zero-padded (`n` < 10^`width`).
fn padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for digit in out[start..].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `ip:port`, and `[ip]:port` for IPv6 (written by `core::fmt`: not the mesh's usual case).
fn address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, octet);
            }
            out.push(b':');
            number(out, v4.port());
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// A duration in milliseconds with microsecond digits: `12.345`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    number(out, micros / 1000);
    out.push(b'.');
    padded(out, (micros % 1000) as u64, 3);
}

/// RFC 3339 in UTC with microseconds, as tracing writes it: `2026-12-03T07:25:00.123456Z`.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rest = secs % 86_400;
    padded(out, year.clamp(0, 9999) as u64, 4);
    out.push(b'-');
    padded(out, u64::from(month), 2);
    out.push(b'-');
    padded(out, u64::from(day), 2);
    out.push(b'T');
    padded(out, rest / 3600, 2);
    out.push(b':');
    padded(out, rest / 60 % 60, 2);
    out.push(b':');
    padded(out, rest % 60, 2);
    out.push(b'.');
    padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            role: Role::Outbound,
            request_id: b"abc123",
            service: Some("hello"),
            tier: Some("direct"),
            platform: None,
            upstream: Some("127.0.0.1:5041".parse().unwrap()),
            status: 200,
            bytes_in: Some(0),
            bytes_out: 12,
            duration: Duration::from_micros(1_234),
            attempts: 1,
            error: None,
        }
    }

    fn at() -> SystemTime {
        // 2026-12-03T07:25:00.000042Z
        UNIX_EPOCH + Duration::new(1_796_282_700, 42_000)
    }

    #[test]
    fn dates_are_the_calendar_ones() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_790), (2026, 12, 3));
        let mut out = Vec::new();
        timestamp(&mut out, at());
        assert_eq!(out, b"2026-12-03T07:25:00.000042Z");
    }

    #[test]
    fn numbers_and_addresses_read_as_core_fmt_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "10.200.3.4:5041",
            "255.255.255.255:65535",
            "[::1]:80",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            address(&mut out, addr);
            assert_eq!(out, addr.to_string().as_bytes());
        }
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_050, "1.050"),
            (98_765_432, "98765.432"),
        ] {
            let mut out = Vec::new();
            millis(&mut out, Duration::from_micros(micros));
            assert_eq!(out, text.as_bytes());
        }
        let mut out = Vec::new();
        timestamp(
            &mut out,
            UNIX_EPOCH + Duration::new(951_782_399, 999_999_000),
        );
        assert_eq!(out, b"2000-02-28T23:59:59.999999Z");
    }

    #[test]
    fn a_human_line_has_every_field_with_dashes_for_the_missing() {
        let mut out = Vec::new();
        human(&mut out, at(), &entry());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-03T07:25:00.000042Z  INFO skyline::access: request_id=abc123 role=outbound \
             service=hello tier=direct platform=- upstream=127.0.0.1:5041 status=200 bytes_in=0 \
             bytes_out=12 duration_ms=1.234 attempts=1 error=-\n"
        );
    }

    #[test]
    fn a_json_line_parses_with_every_field() {
        let mut out = Vec::new();
        let mut e = entry();
        e.request_id = b"a\"b\\c\x01\xff";
        e.error = Some("upstream-connect");
        e.bytes_in = None;
        json(&mut out, at(), &e);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "skyline::access");
        let f = &v["fields"];
        assert_eq!(f["request_id"], "a\"b\\c\u{1}\u{fffd}");
        assert_eq!(f["role"], "outbound");
        assert_eq!(f["service"], "hello");
        assert_eq!(f["platform"], serde_json::Value::Null);
        assert_eq!(f["upstream"], "127.0.0.1:5041");
        assert_eq!(f["status"], 200);
        assert_eq!(f["bytes_in"], serde_json::Value::Null);
        assert_eq!(f["bytes_out"], 12);
        assert_eq!(f["duration_ms"], 1.234);
        assert_eq!(f["attempts"], 1);
        assert_eq!(f["error"], "upstream-connect");
    }

    #[test]
    fn a_hostile_request_id_cannot_forge_a_field_in_a_human_line() {
        let mut out = Vec::new();
        let mut e = entry();
        e.request_id = b"x status=500\n";
        human(&mut out, at(), &e);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.contains(" request_id=\"x status=500?\" role="),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn lines_reach_the_output_and_a_sample_of_zero_keeps_only_failed_requests() {
        let sink = Arc::new(Mutex::new(Vec::<u8>::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = sink.clone();
        let every = Settings {
            sample: 1.0,
            ..Settings::default()
        };
        let log = AccessLog::to(&every, Format::Json, move || Sink(out.clone())).unwrap();
        assert!(log.sampled());
        log.write(&entry());
        log.write(&entry());
        drop(log);
        let written = String::from_utf8(sink.lock().unwrap().clone()).unwrap();
        assert_eq!(written.lines().count(), 2, "{written}");
        for line in written.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        let errors_only = Settings {
            sample: 0.0,
            ..Settings::default()
        };
        let log = AccessLog::to(&errors_only, Format::Human, std::io::sink).unwrap();
        assert!((0..1000).all(|_| !log.sampled()));
        assert!(!AccessLog::keeps(false, 200, None));
        assert!(!AccessLog::keeps(false, 404, None));
        assert!(AccessLog::keeps(false, 404, Some("unknown-service")));
        assert!(AccessLog::keeps(false, 502, None));
        assert!(AccessLog::keeps(true, 200, None));
        assert!(AccessLog::to(&Settings::off(), Format::Human, std::io::sink).is_none());
    }
}
