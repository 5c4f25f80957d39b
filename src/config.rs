//! The grammar every role's configuration shares: [`ConfigError`] (file, line, key and reason),
//! a file's text with the positions of its keys ([`Source`]), the one duration grammar
//! ([`parse_duration_setting`]), listener addresses ([`Listen`]), the tokens of the control
//! APIs ([`token`]), and the description of a file's keys ([`reference`]) from which
//! docs/configuration.md is written. Each role's own file lives with the role
//! (`agent::config`, `gateway::config`, `bridge::config`); a section several roles share lives
//! with what it configures (`tls::config`, `authz::config`, `proxy::resilience::config`,
//! `proxy::h2`'s `[mesh]`, `access`'s `[log]` and `[metrics]`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;

pub mod reference;
pub mod token;

use self::reference::{FileKey, Value};

pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5050);
pub const DEFAULT_DATA_DIR: &str = "/var/lib/skyline";
pub const DEFAULT_REGISTRY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8500);

/// The one duration grammar of Skyline, Go's `time.ParseDuration` (and so Consul's): a number
/// and a unit, `ns`, `us`, `ms`, `s`, `m` or `h`, possibly combined (`300ms`, `1.5h`, `2h45m`);
/// `0` alone; negative durations are refused. Every duration of every config file and flag, and
/// of the registry's API, is read here.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let nanos = parse_go_duration(s)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| format!("negative duration {s:?}"))
}

/// Go's `time.ParseDuration`, error texts included: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+` with units
/// `ns`, `us` (or `µs`, `μs`), `ms`, `s`, `m`, `h`; `"0"` needs no unit. Returns signed
/// nanoseconds.
pub fn parse_go_duration(orig: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {orig:?}");
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some((&c, rest)) = s.split_first() {
        if c == b'-' || c == b'+' {
            neg = c == b'-';
            s = rest;
        }
    }
    if s == b"0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut d: u64 = 0;
    const LIMIT: u64 = 1 << 63;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // The integer part; overflow is an invalid duration, as Go's leadingInt reports it.
        let int_len = s.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut v: u64 = 0;
        for &c in &s[..int_len] {
            if v > LIMIT / 10 {
                return Err(invalid());
            }
            v = v * 10 + u64::from(c - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
        }
        let pre = int_len > 0;
        s = &s[int_len..];
        // The fraction: digits past what a u64 holds are dropped, as Go's leadingFraction does.
        let mut post = false;
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
            let mut overflow = false;
            for &c in &s[..n] {
                if overflow {
                    continue;
                }
                if frac > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let y = frac * 10 + u64::from(c - b'0');
                if y > LIMIT {
                    overflow = true;
                    continue;
                }
                frac = y;
                scale *= 10.0;
            }
            post = n > 0;
            s = &s[n..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        let unit_len = s
            .iter()
            .take_while(|c| !(**c == b'.' || c.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {orig:?}"));
        }
        let unit_text = String::from_utf8_lossy(&s[..unit_len]);
        let unit: u64 = match &*unit_text {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(format!("time: unknown unit {other:?} in duration {orig:?}"));
            }
        };
        s = &s[unit_len..];
        if v > LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if frac > 0 {
            // Go computes the fraction in float64, and so do we, to round the same way.
            #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
            let extra = (frac as f64 * (unit as f64 / scale)) as u64;
            v = v.checked_add(extra).ok_or_else(invalid)?;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        d = d.checked_add(v).ok_or_else(invalid)?;
        if d > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        // -(1<<63) is the one negative value without a positive counterpart.
        return Ok(if d == LIMIT { i64::MIN } else { -(d as i64) });
    }
    i64::try_from(d).map_err(|_| invalid())
}

/// A duration setting of a config file or a flag: [`parse_duration`], at most a day.
pub fn parse_duration_setting(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let d = parse_duration(text).map_err(|_| {
        format!("{text:?} is not a duration like \"500ms\", \"3s\", \"5m\" or \"1h\"")
    })?;
    if d > Duration::from_secs(86_400) {
        return Err(format!("{text:?} is out of range (0 to 24h)"));
    }
    Ok(d)
}

/// A listener address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(addr) => Some(addr),
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|_| format!("{s:?} is neither an address like 127.0.0.1:5040 nor \"off\""))
    }
}

/// Settings of `skyline registry`, the Consul-compatible catalog for one node or a small site.
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Where the Consul-compatible HTTP API listens
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub listen: SocketAddr,

    /// The data folder: every acknowledged write is on disk here before it is answered
    #[arg(long, env = "SKYLINE_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// The registry's own node, where /v1/agent/service/register puts services
    #[arg(
        long,
        env = "SKYLINE_NODE_NAME",
        value_name = "NAME",
        default_value = "local"
    )]
    pub node_name: String,

    /// The address of the registry's own node
    #[arg(
        long,
        env = "SKYLINE_NODE_ADDRESS",
        value_name = "IP",
        default_value = "127.0.0.1"
    )]
    pub node_address: IpAddr,

    /// A file holding the ACL token every request must carry (X-Consul-Token, Authorization:
    /// Bearer or ?token=), or give the token itself in SKYLINE_REGISTRY_TOKEN; required when
    /// --listen is not a loopback address [default: no token on loopback]
    #[arg(long, env = "SKYLINE_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The token itself, from SKYLINE_REGISTRY_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_REGISTRY_TOKEN").ok())]
    pub token_env: Option<String>,

    /// Repair a damaged data folder and exit: keep every readable record of the log, move the
    /// damaged file aside (`log.damaged-<time>`). Run it only while no registry uses the folder.
    #[arg(long)]
    pub repair: bool,
}

impl RegistryArgs {
    /// The registry's token, refused when missing while the API listens beyond loopback.
    pub fn token(&self) -> Result<Option<token::Token>, ConfigError> {
        let setting = token::TokenSetting {
            env: self.token_env.clone(),
            file: self.token_file.clone(),
        };
        let flags = Source {
            path: PathBuf::from("<flags>"),
            text: String::new(),
        };
        token_for(
            &flags,
            &setting,
            None,
            "--token-file",
            "SKYLINE_REGISTRY_TOKEN",
            Some(self.listen),
            "the registry",
        )
    }
}

/// A listener's token from `setting`, checked: a file that cannot be read or holds no valid
/// token is refused with the reason (never the content), and so is a listener at `exposed`
/// that is reachable from other machines without a token.
pub(crate) fn token_for(
    src: &Source,
    setting: &token::TokenSetting,
    at: Option<usize>,
    key: &str,
    env_name: &str,
    listen: Option<SocketAddr>,
    what: &str,
) -> Result<Option<token::Token>, ConfigError> {
    let loaded = setting
        .load(env_name)
        .map_err(|reason| src.error(at, Some(key), reason))?;
    if loaded.is_none() {
        if let Some(addr) = listen.filter(|a| token::exposed(*a)) {
            return Err(src.error(
                at,
                Some(key),
                format!(
                    "{what} listens on {addr}, which other machines can reach: it needs a token \
                     ({key} or {env_name}), or a loopback address"
                ),
            ));
        }
    }
    Ok(loaded)
}

/// A refused configuration: which file, where, which key, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}{}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default() + &key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub reason: String,
}

// What users write in the file. Every field optional: flags and variables may supply it.

/// A key that flag `flag` (a clap id) also sets.
pub(crate) const fn key(
    key: &'static str,
    flag: &'static str,
    ty: &'static str,
    value: Value,
) -> FileKey {
    FileKey {
        key,
        flag: Some(flag),
        ty,
        value,
        doc: "",
    }
}

/// A key only the file has.
pub(crate) const fn file_only(
    key: &'static str,
    ty: &'static str,
    value: Value,
    doc: &'static str,
) -> FileKey {
    FileKey {
        key,
        flag: None,
        ty,
        value,
        doc,
    }
}

/// A config file's path and text, to turn spans into line numbers for errors.
pub(crate) struct Source {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl Source {
    /// Reads and parses the TOML file at `path` into `T` (every role's file goes through here);
    /// without a file, `T`'s defaults and a source named `<flags>`. A syntax error, an unknown
    /// key or a value of the wrong type names the file, the line and the key.
    pub(crate) fn read<T: serde::de::DeserializeOwned + Default>(
        path: Option<&PathBuf>,
    ) -> Result<(T, Source), ConfigError> {
        let Some(path) = path else {
            let flags = Source {
                path: PathBuf::from("<flags>"),
                text: String::new(),
            };
            return Ok((T::default(), flags));
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.clone(),
            line: None,
            key: None,
            reason: format!("cannot read: {e}"),
        })?;
        let source = Source {
            path: path.clone(),
            text,
        };
        match toml::from_str(&source.text) {
            Ok(parsed) => Ok((parsed, source)),
            Err(e) => {
                let offset = e.span().map(|s| s.start);
                let key = offset.and_then(|o| key_at(&source.text, o));
                Err(source.error(offset, key.as_deref(), e.message().trim()))
            }
        }
    }

    /// An error about `key`, at the line of byte `offset` when known.
    pub(crate) fn at(
        &self,
        offset: Option<usize>,
        key: &str,
        reason: impl Into<String>,
    ) -> ConfigError {
        self.error(offset, Some(key), reason)
    }

    pub(crate) fn error(
        &self,
        offset: Option<usize>,
        key: Option<&str>,
        reason: impl Into<String>,
    ) -> ConfigError {
        let line = offset.map(|o| self.text[..o.min(self.text.len())].matches('\n').count() + 1);
        ConfigError {
            file: self.path.clone(),
            line,
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// Parses an optional spanned string field into `T`.
    pub(crate) fn parse<T: FromStr>(
        &self,
        key: &str,
        field: &Option<Spanned<String>>,
    ) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let Some(field) = field else { return Ok(None) };
        field
            .get_ref()
            .parse()
            .map(Some)
            .map_err(|e| self.error(Some(field.span().start), Some(key), format!("{e}")))
    }
}

/// A path given by a flag (as is) or by the file (relative to it, with its offset for errors).
pub(crate) fn file_path(
    src: &Source,
    flag: Option<PathBuf>,
    field: &Option<Spanned<PathBuf>>,
) -> (Option<PathBuf>, Option<usize>) {
    match (flag, field) {
        (Some(p), _) => (Some(p), None),
        (None, Some(p)) => (
            Some(relative_to(src, p.get_ref().clone())),
            Some(p.span().start),
        ),
        (None, None) => (None, None),
    }
}

/// A key prefix, ending with `/` (added when missing).
pub(crate) fn etcd_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() || prefix.chars().any(char::is_control) {
        return Err("must be a non-empty key prefix such as \"skyline/\"".to_owned());
    }
    Ok(if prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    })
}

/// `host:port` or `http://host:port`, as `http://host:port`.
pub(crate) fn etcd_endpoint(text: &str) -> Result<String, String> {
    let url = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let bad = || format!("{text:?} is not an etcd client URL like http://10.0.0.5:2379");
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{text:?}: only http:// etcd endpoints are supported"
        ));
    }
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.port_u16().is_none() || authority.host().is_empty() {
        return Err(bad());
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad());
    }
    Ok(format!("http://{authority}"))
}

/// The dotted key at byte `offset` of a TOML text, for the errors the TOML parser reports with a
/// position only (an unknown key, a value of the wrong type): the table header above it and the
/// keys that lead to `offset` on its line (`outlier = { max_ejection = 5 }` under `[resilience]`
/// is `resilience.outlier.max_ejection`).
pub(crate) fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let lines: Vec<&str> = before.split('\n').collect();
    let current = lines.len() - 1;
    let header_of = |line: &str| {
        let line = line.trim();
        line.starts_with('[').then(|| {
            let end = line.rfind(']').unwrap_or(line.len());
            line[..end].trim_matches(['[', ']']).trim().replace('"', "")
        })
    };
    let line_start = offset - lines[current].len();
    if header_of(lines[current]).is_some() {
        // The error is in a table header: the whole header names the table.
        return text[line_start..].lines().next().and_then(header_of);
    }
    // An unknown key's position is the key itself: the key to scan through.
    let rest = &text[offset..];
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    let key_here = if rest[key_len..].trim_start().starts_with('=') {
        &rest[..key_len]
    } else {
        ""
    };
    // The line that holds the key: this one when the position is at or after a key, otherwise
    // the one an array that continues here began on.
    let starts_here = lines[current].contains('=') || !key_here.is_empty();
    let key_line = if starts_here {
        current
    } else {
        let i = (0..current)
            .rev()
            .find(|&i| lines[i].contains('=') || header_of(lines[i]).is_some())?;
        if header_of(lines[i]).is_some() {
            return header_of(lines[i]);
        }
        i
    };
    let mut keys: Vec<String> = Vec::new();
    let mut depth: usize = 0;
    let mut token = String::new();
    let mut in_string = None;
    let scanned = if key_line == current {
        format!("{}{key_here}=", lines[current])
    } else {
        lines[key_line].to_owned()
    };
    for c in scanned.chars() {
        match (in_string, c) {
            (Some(q), c) if c == q => in_string = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => in_string = Some(c),
            (None, '{') => depth += 1,
            (None, '}') => {
                depth = usize::saturating_sub(depth, 1);
                keys.truncate(depth);
            }
            (None, '=') => {
                let key = token.trim().replace('"', "");
                if !key.is_empty() {
                    keys.truncate(depth);
                    keys.push(key);
                }
                token.clear();
            }
            (None, ',' | '[' | ']') => token.clear(),
            (None, c) => token.push(c),
        }
    }
    let header = lines[..key_line].iter().rev().find_map(|l| header_of(l));
    let key = keys.join(".");
    match header {
        _ if key.is_empty() => None,
        Some(h) => Some(format!("{h}.{key}")),
        None => Some(key),
    }
}

/// A path in the config file is relative to the file's folder.
pub(crate) fn relative_to(src: &Source, path: PathBuf) -> PathBuf {
    match src.path.parent() {
        Some(dir) if path.is_relative() && src.path != Path::new("<flags>") => dir.join(path),
        _ => path,
    }
}
