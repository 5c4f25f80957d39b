//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz): each takes arbitrary bytes, runs
//! them through one parser of hostile input exactly as the program does, and returns. Only a
//! panic (or a broken invariant, asserted here) is a finding. The stable test
//! `tests/it/fuzz_corpus.rs` replays the seed corpus through the same functions, and can run a
//! bounded random mutation loop over them without nightly.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

use crate::http1::guard::{ChunkedBody, Guarded, HeadCheck, HeadProgress, HeadReader, Limits};

/// A fuzz target's function: arbitrary bytes in, a panic out only on a finding.
pub type Target = fn(&[u8]);

/// Every target: its name (the folder of its corpus, the fuzz binary's name) and function.
pub const TARGETS: &[(&str, Target)] = &[
    ("http1_guard", http1_guard),
    ("skyline_url", skyline_url),
    ("bridge_rewrite", bridge_rewrite),
    ("registry_json", registry_json),
    ("config_file", config_file),
    ("route_policy", route_policy),
    ("authz_policy", authz_policy),
];

/// The function of target `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

// === http1_guard ===

/// An in-memory socket that hands out at most `max` bytes per read and never blocks.
struct Feed<'a> {
    data: &'a [u8],
    max: usize,
}

impl AsyncRead for Feed<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.max.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// The HTTP/1 framing guard over a connection's bytes: the first two bytes choose how reads
/// are split (the verdict must not depend on it), the rest is what the client sent. Also the
/// express lane's [`HeadReader`] on the same bytes, and [`ChunkedBody`] on them as a body.
pub fn http1_guard(data: &[u8]) {
    let (max_read, buf_size, input) = match data {
        [a, b, rest @ ..] => (usize::from(*a) + 1, usize::from(*b) * 64 + 1, rest),
        _ => (usize::MAX, 1 << 16, data),
    };
    let limits = Limits::default();
    let feed = Feed {
        data: input,
        max: max_read,
    };
    let (mut guarded, _verdicts) = Guarded::new(feed, limits);
    let mut cx = Context::from_waker(Waker::noop());
    let mut space = vec![0u8; buf_size];
    let mut output = 0usize;
    // Every read makes progress; this bound is only reached by a guard that loops.
    let bound = (input.len() + 1024) * 2 + 10;
    let mut ended = false;
    for _ in 0..bound {
        let mut rb = ReadBuf::new(&mut space);
        match Pin::new(&mut guarded).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                ended = true;
                break;
            }
            Poll::Ready(Ok(())) => output += rb.filled().len(),
            Poll::Ready(Err(_)) | Poll::Pending => {}
        }
    }
    assert!(ended, "the guard did not reach the end of its input");
    // What the guard hands on is the input or a prefix of it, plus at most its synthetic
    // request for a refused head.
    assert!(output <= input.len() + 1024, "the guard made up bytes");

    let mut reader = HeadReader::new(limits);
    let mut end = None;
    for cut in [input.len() / 3, input.len() / 2, input.len()] {
        match reader.scan(&input[..cut]) {
            HeadProgress::Ended(len) => {
                end = Some(len);
                break;
            }
            HeadProgress::Refused(_) => break,
            HeadProgress::Incomplete => {}
        }
    }
    if let Some(len) = end {
        let mut slots = [const { MaybeUninit::uninit() }; 128];
        if let HeadCheck::Valid { request, .. } = reader.parse(&input[..len], &mut slots) {
            if let Some(path) = request.path {
                skyline_url(path.as_bytes());
            }
        }
    }
    let mut body = ChunkedBody::new(limits);
    let mut pos = 0;
    for piece in input.chunks(max_read) {
        match body.scan(piece) {
            Ok(Some(n)) => {
                assert!(n <= piece.len(), "a chunked body ends past its bytes");
                break;
            }
            Ok(None) => pos += piece.len(),
            Err(_) => break,
        }
    }
    assert!(pos <= input.len());
}

// === skyline_url ===

/// The Skyline URL `/service/<name>/<path>?<query>` as the outbound and inbound proxies split
/// it: a name that passes is a valid service name and the path rebuilds the URL.
pub fn skyline_url(data: &[u8]) {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let (path, _query) = crate::proxy::outbound::path_of(target);
    if let Ok((name, rest)) = crate::proxy::outbound::split_service_path(path) {
        assert!(crate::catalog::ServiceName::parse(name).is_ok(), "{name:?}");
        assert_eq!(format!("/service/{name}{rest}"), path);
    }
    let _ = crate::proxy::outbound::service_of(target);
    let _ = crate::catalog::ServiceName::parse(target);
    let _ = http::Uri::try_from(target);
}

// === bridge_rewrite ===

/// The bridge's two rewrites: a `Host` (the first line) that names a cluster Service becomes
/// `/service/<name>` plus the request target (the second line); a Skyline service name
/// becomes a cluster DNS name by the template.
pub fn bridge_rewrite(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (host, target) = text.split_once('\n').unwrap_or((&text, "/"));
    let names = crate::bridge::Names::default();
    for domain in [names.cluster_domain.as_str(), "example.org", ""] {
        let Some(name) = crate::contract::cluster_service(host, domain) else {
            continue;
        };
        assert!(crate::catalog::ServiceName::is_valid(&name), "{name:?}");
        let pq = http::uri::PathAndQuery::try_from(target).ok();
        if let Ok(rewritten) = crate::contract::skyline_target(&name, pq.as_ref()) {
            let (path, _) = crate::proxy::outbound::path_of(rewritten.as_str());
            let (again, _) = crate::proxy::outbound::split_service_path(path)
                .unwrap_or_else(|e| panic!("{rewritten} does not split: {e}"));
            assert_eq!(again, &*name);
            if let Some(pq) = &pq {
                assert_eq!(rewritten.query(), pq.query(), "the query changed");
            }
        }
        let (dns, _port) = names.target(&name);
        assert!(dns.contains(&*name));
    }
}

// === registry_json ===

/// A request body as every registry endpoint that takes JSON decodes it, by Consul's rules.
pub fn registry_json(data: &[u8]) {
    crate::registry::api::decode_every_body(data);
}

// === config_file ===

/// A config file as each role reads it at start (`skyline config check`), and its text as a
/// duration setting. The text goes through a file of this process, as the roles read one.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::parse_duration_setting(text);
    let _ = crate::config::parse_go_duration(text);
    let path = std::env::temp_dir().join(format!(
        "skyline-fuzz-config-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, text).is_err() {
        return;
    }
    for role in crate::cli::config::Role::ALL {
        let _ = role.check(path.clone());
    }
    let _ = std::fs::remove_file(&path);
}

// === route_policy ===

/// A gateway route policy as stored in the registry KV (`skyline/routes/<service>`): JSON or
/// TOML, validated against the default upstreams.
pub fn route_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::gateway::policy::RoutePolicy::parse_text(
        text,
        &crate::gateway::policy::default_upstreams(),
        crate::gateway::policy::DEFAULT_HOLD,
    );
}

// === authz_policy ===

/// An authorization policy as stored in the registry KV (`skyline/policies/<name>`, JSON or
/// TOML), and a request path through the normalisation that policies match: a normal path is
/// its own normal form (normalising twice changes nothing), starts with `/`, and has no `.` or
/// `..` segment and no empty one but a trailing `/`.
pub fn authz_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::authz::Policy::parse_kv("fuzz", text);
    let path = text.lines().next().unwrap_or("");
    if let Ok(normal) = crate::authz::path::normalise(path) {
        assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
        let again = crate::authz::path::normalise(&normal);
        assert_eq!(again.as_deref(), Ok(&*normal), "normalising {path:?} twice");
        let inner = normal.trim_end_matches('/');
        for segment in inner.split('/').skip(1) {
            assert!(
                !matches!(segment, "" | "." | ".."),
                "{path:?} -> {normal:?} keeps segment {segment:?}"
            );
        }
    }
}
