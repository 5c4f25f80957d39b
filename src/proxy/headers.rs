//! The header contract of a forwarded request, stated once for every lane and role.
//!
//! Every hop (the outbound and inbound proxies, the gateway, a bridge) and both ways of
//! forwarding (the express lane's bytes, hyper's `HeaderMap`) decide what happens to each
//! request header by [`Rules::of`], from the header's [`Name`]:
//!
//! | header | rule |
//! |---|---|
//! | hop-by-hop (`connection`, `keep-alive`, `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`, RFC 9110 §7.6.1) and every header `Connection` names | dropped ([`Rule::Drop`]); a body that is not of known length goes on chunked, and an upgrade keeps its own (`proxy::upgrade`) |
//! | `x-request-id` | kept; one is made when the request has none ([`request_id`]) |
//! | `x-forwarded-for` | earlier values folded into one, the previous hop's address appended ([`Rule::Append`]) |
//! | `host` | kept ([`Host::Keep`], mesh hops), or replaced by the instance's address with the original in `x-forwarded-host`, unless one came ([`Host::Upstream`], the last hop) |
//! | `x-forwarded-host` | passed as it came (the mesh sets it only as above) |
//! | `x-forwarded-proto` | passed as it came; set to `http` at the last hop when none came ([`Host::Upstream`]): an application enters the mesh over plain HTTP (`:5040`, or a gateway's or bridge's listener), and mesh TLS between hops is the mesh's transport, not the caller's scheme |
//! | `traceparent`, `tracestate` | passed as they came: the mesh keeps the caller's trace |
//! | `x-skyline-hops` | replaced by this hop's count at a hop that counts ([`Rule::Count`]), else passed |
//! | `x-skyline-timeout-ms` | read as the caller's deadline and replaced by each attempt's time left ([`Rule::Deadline`]) |
//! | `x-skyline-attempt` | dropped at the first hop (it numbers attempts); passed at a later one, replaced by an attempt it numbers ([`Rule::Attempt`]) |
//! | `x-skyline-caller-token` | dropped: a credential never leaves its node |
//! | `x-skyline-caller` | passed only from a peer with a mesh certificate at a later hop; the first hop drops the application's and asserts its own |
//! | anything else, `x-skyline-error` and `x-skyline-unsent` included | passed as it came |
//!
//! The express lane writes the forwarded head as bytes ([`write_request`]) and hyper's lane
//! rewrites the header map ([`rewrite_request`]); both take every decision from [`Rules::of`],
//! so a rule changed here changes on every lane. A response loses its hop-by-hop headers the
//! same way on both lanes ([`Name::is_hop_by_hop`], [`strip_hop_by_hop`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::express::Head;
use super::{
    Host, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID, X_SKYLINE_HOPS,
    hop_count, parse_millis,
};
use crate::authz::X_SKYLINE_CALLER;
use crate::contract::request_id;
use crate::http1::{trim_ows, write_header as header};

// === Name ===

/// The header names the contract and the express lane act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    /// Any other header: passed on as it is.
    Other,
    /// `keep-alive`, `proxy-connection`, `te`, `trailer`.
    HopByHop,
    Connection,
    TransferEncoding,
    Upgrade,
    ContentLength,
    Expect,
    Host,
    RequestId,
    ForwardedFor,
    ForwardedHost,
    ForwardedProto,
    Hops,
    TimeoutMs,
    Attempt,
    MeshError,
    /// `x-skyline-unsent` (see [`super::X_SKYLINE_UNSENT`]).
    Unsent,
    /// `x-skyline-caller` (see [`crate::authz::X_SKYLINE_CALLER`]).
    Caller,
    /// `x-skyline-caller-token` (see [`crate::authz::X_SKYLINE_CALLER_TOKEN`]).
    CallerToken,
}

impl Name {
    /// What `name` is, by its length first so that most headers cost one comparison or none.
    pub fn of(name: &str) -> Name {
        let candidates: &[(&str, Name)] = match name.len() {
            2 => &[("te", Name::HopByHop)],
            4 => &[("host", Name::Host)],
            6 => &[("expect", Name::Expect)],
            7 => &[("upgrade", Name::Upgrade), ("trailer", Name::HopByHop)],
            10 => &[
                ("connection", Name::Connection),
                ("keep-alive", Name::HopByHop),
            ],
            12 => &[("x-request-id", Name::RequestId)],
            14 => &[
                ("content-length", Name::ContentLength),
                ("x-skyline-hops", Name::Hops),
            ],
            15 => &[
                ("x-forwarded-for", Name::ForwardedFor),
                ("x-skyline-error", Name::MeshError),
            ],
            16 => &[
                ("proxy-connection", Name::HopByHop),
                ("x-forwarded-host", Name::ForwardedHost),
                ("x-skyline-unsent", Name::Unsent),
                ("x-skyline-caller", Name::Caller),
            ],
            17 => &[
                ("transfer-encoding", Name::TransferEncoding),
                ("x-skyline-attempt", Name::Attempt),
                ("x-forwarded-proto", Name::ForwardedProto),
            ],
            20 => &[("x-skyline-timeout-ms", Name::TimeoutMs)],
            22 => &[("x-skyline-caller-token", Name::CallerToken)],
            _ => return Name::Other,
        };
        // The first byte, lowercased (every known name starts with a letter), rules out most
        // names of the same length; names usually come in lowercase, so an exact comparison
        // settles most of the rest.
        // (Every length above is at least 2: the name has a first byte.)
        let first = name.as_bytes()[0] | 0x20;
        candidates
            .iter()
            .filter(|(known, _)| known.as_bytes()[0] == first)
            .find(|(known, _)| *known == name || known.eq_ignore_ascii_case(name))
            .map_or(Name::Other, |&(_, kind)| kind)
    }

    /// A hop-by-hop header (RFC 9110 §7.6.1): never forwarded, in a request or a response.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::HopByHop | Name::Connection | Name::TransferEncoding | Name::Upgrade
        )
    }
}

// === Connection options ===

/// The options of a message's `Connection` headers.
#[derive(Default)]
pub struct ConnectionOptions {
    /// Header names listed (dropped with the hop-by-hop ones); rarely any.
    named: Vec<String>,
    pub close: bool,
}

impl ConnectionOptions {
    /// The header names listed (neither `close` nor `keep-alive`).
    pub fn named(&self) -> &[String] {
        &self.named
    }

    /// Whether `name` is one of the listed header names.
    pub fn names(&self, name: &str) -> bool {
        self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Reads the `Connection` headers among `headers`.
pub fn connection_options<'h>(
    headers: impl Iterator<Item = (Name, &'h [u8])>,
) -> ConnectionOptions {
    let mut options = ConnectionOptions::default();
    for (_, value) in headers.filter(|&(n, _)| n == Name::Connection) {
        for option in value.split(|&b| b == b',').map(trim_ows) {
            if option.eq_ignore_ascii_case(b"close") {
                options.close = true;
            } else if !option.eq_ignore_ascii_case(b"keep-alive") && !option.is_empty() {
                options
                    .named
                    .push(String::from_utf8_lossy(option).into_owned());
            }
        }
    }
    options
}

/// The `Connection` options of a header map (values that are not visible ASCII are ignored).
fn map_connection_options(headers: &HeaderMap) -> ConnectionOptions {
    let values = headers.get_all(header::CONNECTION).iter();
    let visible = values.filter(|v| v.to_str().is_ok());
    connection_options(visible.map(|v| (Name::Connection, v.as_bytes())))
}

// === Rules ===

/// What happens to one request header at one hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Sent on as it came.
    Pass,
    /// Not sent on.
    Drop,
    /// `x-skyline-hops` at a hop that counts: replaced by its count.
    Count,
    /// `x-skyline-timeout-ms`: the caller's deadline, replaced by each attempt's time left.
    Deadline,
    /// `x-skyline-attempt` at a later hop: passed, unless this hop numbers the attempt (a retry
    /// of its own), which replaces it.
    Attempt,
    /// `host` at the last hop: replaced by the instance's address, the original kept in
    /// `x-forwarded-host` unless the request has one.
    Host,
    /// `x-forwarded-for`: the values folded into one, the previous hop's address appended.
    Append,
}

/// What a hop adds to the requests it forwards, beyond the contract's fixed rules.
#[derive(Clone, Copy, Debug)]
pub struct Hop<'a> {
    /// How `host` is set.
    pub host: Host,
    /// The hop count this hop sends (the outbound proxy counts); `None`: the caller's
    /// `x-skyline-hops` passes (the gateway and a bridge count in the header map first).
    pub hops: Option<u32>,
    /// The calling service this hop asserts over mesh TLS (the outbound proxy, see
    /// [`crate::authz`]).
    pub caller: Option<&'a str>,
}

impl From<Host> for Hop<'_> {
    fn from(host: Host) -> Self {
        Hop {
            host,
            hops: None,
            caller: None,
        }
    }
}

/// The contract's rules for one request at one hop.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub hop: Hop<'a>,
    /// This is the first Skyline hop of the request: it numbers attempts.
    pub first: bool,
    /// The previous hop presented a mesh certificate: its `x-skyline-caller` is believed.
    pub trusted: bool,
}

impl Rules<'_> {
    /// What happens to a request header called `name` (see the module's table). A header the
    /// request's `Connection` names is dropped too, whatever this says.
    #[inline]
    pub fn of(&self, name: Name) -> Rule {
        match name {
            Name::HopByHop | Name::Connection | Name::TransferEncoding | Name::Upgrade => {
                Rule::Drop
            }
            Name::Host => match self.hop.host {
                Host::Keep => Rule::Pass,
                Host::Upstream => Rule::Host,
            },
            Name::ForwardedFor => Rule::Append,
            Name::Hops if self.hop.hops.is_some() => Rule::Count,
            Name::TimeoutMs => Rule::Deadline,
            Name::Attempt if self.first => Rule::Drop,
            Name::Attempt => Rule::Attempt,
            Name::CallerToken => Rule::Drop,
            Name::Caller if self.first || !self.trusted || self.hop.caller.is_some() => Rule::Drop,
            Name::Other
            | Name::ContentLength
            | Name::Expect
            | Name::RequestId
            | Name::ForwardedHost
            | Name::ForwardedProto
            | Name::Hops
            | Name::MeshError
            | Name::Unsent
            | Name::Caller => Rule::Pass,
        }
    }
}

// === Hyper's lane: the header map ===

/// Removes the hop-by-hop headers and every header the `Connection` header names (a response's,
/// or a request's that is not forwarded by [`rewrite_request`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut drop = Drops::default();
    for name in headers.keys() {
        if Name::of(name.as_str()).is_hop_by_hop() {
            drop.push(name);
        }
    }
    drop.remove_from(headers);
}

/// The header names a map loses: a message's few, without allocating.
#[derive(Default)]
struct Drops {
    /// Names are distinct in a map's keys: 7 hop-by-hop names and 3 more a request may lose.
    names: [Option<HeaderName>; 12],
    len: usize,
    /// Never used for the contract's names; there for safety.
    more: Vec<HeaderName>,
}

impl Drops {
    fn push(&mut self, name: &HeaderName) {
        match self.names.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(name.clone());
                self.len += 1;
            }
            None => self.more.push(name.clone()),
        }
    }

    /// Removes the names from `headers`, and the headers its `Connection` names (read first).
    fn remove_from(self, headers: &mut HeaderMap) {
        if self.len == 0 {
            return;
        }
        if headers.contains_key(header::CONNECTION) {
            for name in map_connection_options(headers).named() {
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
        for name in self.names.into_iter().flatten().chain(self.more) {
            headers.remove(name);
        }
    }
}

/// Rewrites a request's headers for the next hop by `rules`: what [`write_request`] writes
/// for the express lane, as a header map. `peer` is the previous hop's address. Returns
/// whether each attempt sets `host` to the endpoint's address (the request's is not kept, or
/// it had none).
pub fn rewrite_request(headers: &mut HeaderMap, rules: &Rules<'_>, peer: &HeaderValue) -> bool {
    let mut drop = Drops::default();
    for name in headers.keys() {
        if rules.of(Name::of(name.as_str())) == Rule::Drop {
            drop.push(name);
        }
    }
    drop.remove_from(headers);
    // What the hop adds, in the order the express lane writes it.
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(&X_REQUEST_ID, request_id());
    }
    append_forwarded_for(headers, peer);
    let set_host = match rules.hop.host {
        Host::Keep => !headers.contains_key(header::HOST),
        Host::Upstream => {
            if let Some(h) = headers.get(header::HOST).cloned() {
                if !headers.contains_key(&X_FORWARDED_HOST) {
                    headers.insert(&X_FORWARDED_HOST, h);
                }
            }
            if !headers.contains_key(&X_FORWARDED_PROTO) {
                headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
            }
            true
        }
    };
    if let Some(hops) = rules.hop.hops {
        headers.insert(&X_SKYLINE_HOPS, hop_count(hops));
    }
    if let Some(Ok(caller)) = rules.hop.caller.map(HeaderValue::from_str) {
        headers.insert(&X_SKYLINE_CALLER, caller);
    }
    // `x-skyline-timeout-ms` and a later hop's `x-skyline-attempt` stay for now: each attempt
    // replaces them (`H2Send::stamp`), as it does `host` when `set_host`.
    set_host
}

/// Appends the previous hop's address (`peer`, already a header value) to `x-forwarded-for`,
/// folding earlier values into one.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(&X_FORWARDED_FOR, peer.clone());
        return;
    }
    let mut value = Vec::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        value.extend_from_slice(earlier.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
}

// === The express lane: bytes ===

/// What writing a request head found out.
pub(super) struct Written {
    /// The request's `Host` is not kept: each attempt sets the endpoint's.
    pub set_host: bool,
    /// The caller's `x-skyline-timeout-ms`, when it parses.
    pub timeout_ms: Option<u64>,
    /// The caller's `x-skyline-attempt`, passed on by a hop that does not number attempts.
    pub caller_attempt: Option<Vec<u8>>,
}

/// Writes the forwarded request line and headers by `rules`, without the per-attempt headers
/// and the final CRLF: what [`rewrite_request`] makes of a header map, as bytes, with no
/// allocation for the usual request. `peer` is the previous hop's address.
pub(super) fn write_request(
    out: &mut Vec<u8>,
    head: &Head<'_>,
    target: &str,
    rules: &Rules<'_>,
    peer: &[u8],
) -> Written {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut written = Written {
        set_host: false,
        timeout_ms: None,
        caller_attempt: None,
    };
    let (mut has_id, mut has_forwarded_host, mut host_value) = (false, false, None);
    let mut has_forwarded_proto = false;
    // Earlier hops' `x-forwarded-for` values: nearly always none or one.
    let (mut forwarded_for, mut more_forwarded_for) = (None, Vec::new());
    for (h, &kind) in head.headers.iter().zip(head.names) {
        let name = h.name;
        let rule = rules.of(kind);
        if rule == Rule::Drop || head.options.names(name) {
            continue;
        }
        match rule {
            Rule::Pass => match kind {
                Name::Host => host_value = Some(h.value),
                Name::RequestId => has_id = true,
                Name::ForwardedHost => has_forwarded_host = true,
                Name::ForwardedProto => has_forwarded_proto = true,
                _ => {}
            },
            Rule::Host => {
                host_value = Some(h.value);
                continue;
            }
            Rule::Append => {
                match forwarded_for {
                    None => forwarded_for = Some(h.value),
                    Some(_) => more_forwarded_for.push(h.value),
                }
                continue;
            }
            Rule::Deadline => {
                written.timeout_ms = parse_millis(h.value);
                continue;
            }
            Rule::Attempt => {
                written.caller_attempt = Some(h.value.to_vec());
                continue;
            }
            Rule::Count | Rule::Drop => continue,
        }
        header(out, name.as_bytes(), h.value);
    }
    if !has_id {
        header(out, b"x-request-id", head.request_id);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for earlier in forwarded_for.iter().chain(&more_forwarded_for) {
        out.extend_from_slice(earlier);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer);
    out.extend_from_slice(b"\r\n");
    written.set_host = match rules.hop.host {
        Host::Keep => host_value.is_none(),
        Host::Upstream => {
            if let (Some(original), false) = (host_value, has_forwarded_host) {
                header(out, b"x-forwarded-host", original);
            }
            if !has_forwarded_proto {
                header(out, b"x-forwarded-proto", b"http");
            }
            true
        }
    };
    if let Some(hops) = rules.hop.hops {
        header(out, b"x-skyline-hops", hop_count(hops).as_bytes());
    }
    if let Some(caller) = rules.hop.caller {
        header(out, b"x-skyline-caller", caller.as_bytes());
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::express::Head;

    #[test]
    fn header_names_are_told_apart_by_length_then_bytes_in_any_case() {
        assert_eq!(Name::of("Connection"), Name::Connection);
        assert_eq!(Name::of("KEEP-ALIVE"), Name::HopByHop);
        assert_eq!(Name::of("x-skyline-hops"), Name::Hops);
        assert_eq!(Name::of("Content-Length"), Name::ContentLength);
        assert_eq!(Name::of("Transfer-Encoding"), Name::TransferEncoding);
        assert_eq!(Name::of("x-skyline-attempt"), Name::Attempt);
        // Same lengths as known names, different bytes.
        assert_eq!(Name::of("user-agent"), Name::Other);
        assert_eq!(Name::of("content-type"), Name::Other);
        assert_eq!(Name::of("x"), Name::Other);
        // The first byte is compared case-blind too, and a byte that is not a letter is no name.
        for (name, kind) in [
            ("HOST", Name::Host),
            ("Te", Name::HopByHop),
            ("X-Forwarded-Proto", Name::ForwardedProto),
            ("X-SKYLINE-CALLER-TOKEN", Name::CallerToken),
            ("Expect", Name::Expect),
            ("Upgrade", Name::Upgrade),
            ("-ost", Name::Other),
            ("Hos", Name::Other),
            ("\u{0}ost", Name::Other),
        ] {
            assert_eq!(Name::of(name), kind, "{name:?}");
        }
        for hop in [
            "te",
            "trailer",
            "upgrade",
            "proxy-connection",
            "connection",
            "keep-alive",
            "transfer-encoding",
        ] {
            assert!(Name::of(hop).is_hop_by_hop(), "{hop}");
        }
        assert!(!Name::of("host").is_hop_by_hop());
        assert!(!Name::of("traceparent").is_hop_by_hop());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "close"),
            ("x-end-to-end", "kept"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["traceparent", "x-end-to-end"]);
    }

    #[test]
    fn a_plain_keep_alive_connection_header_leaves_nothing_behind() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("Keep-Alive"));
        h.append("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close, X-Private"));
        h.append("x-private", HeaderValue::from_static("1"));
        h.append("transfer-encoding", HeaderValue::from_static("chunked"));
        h.append("trailer", HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn forwarded_for_starts_with_the_peer() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.3"));
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.3");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.3"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.3");
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a, b);
    }

    /// The headers each lane sends for `request` (`name: value` lines) at a hop with `rules`,
    /// as sorted lowercase `name: value` lines: the express lane's bytes and hyper's map.
    fn both_lanes(request: &[(&str, &str)], rules: &Rules<'_>) -> (Vec<String>, Vec<String>) {
        let parsed: Vec<httparse::Header<'_>> = request
            .iter()
            .map(|&(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        let names: Vec<Name> = request.iter().map(|&(n, _)| Name::of(n)).collect();
        let values = parsed.iter().map(|h| h.value);
        let id = request
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
            .map_or("made-for-it", |&(_, v)| v);
        let head = Head {
            len: 0,
            method: "GET",
            target: "/",
            headers: &parsed,
            names: &names,
            options: connection_options(names.iter().copied().zip(values)),
            request_id: id.as_bytes(),
        };
        let mut out = Vec::new();
        let written = write_request(&mut out, &head, "/", rules, b"10.9.9.9");
        let text = String::from_utf8(out).unwrap();
        let mut bytes: Vec<String> = text
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                format!("{}: {v}", n.to_ascii_lowercase())
            })
            .collect();
        if let Some(ms) = written.timeout_ms {
            bytes.push(format!("(deadline {ms})"));
        }
        if let Some(attempt) = written.caller_attempt {
            bytes.push(format!(
                "x-skyline-attempt: {}",
                String::from_utf8(attempt).unwrap()
            ));
        }
        bytes.push(format!("(set host {})", written.set_host));
        bytes.sort();

        let mut map = HeaderMap::new();
        for &(name, value) in request {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        if !map.contains_key(&X_REQUEST_ID) {
            // As `serve` gives hyper's lane the id it logs.
            map.insert(&X_REQUEST_ID, HeaderValue::from_static("made-for-it"));
        }
        let set_host = rewrite_request(&mut map, rules, &HeaderValue::from_static("10.9.9.9"));
        let mut hyper: Vec<String> = Vec::new();
        for (name, value) in &map {
            let value = value.to_str().unwrap();
            if name == header::HOST && set_host {
                // Each attempt replaces it with the endpoint's (the express lane writes it then).
                continue;
            } else if name == super::super::X_SKYLINE_TIMEOUT_MS {
                hyper.push(format!("(deadline {value})"));
            } else {
                hyper.push(format!("{name}: {value}"));
            }
        }
        hyper.push(format!("(set host {set_host})"));
        hyper.sort();
        (bytes, hyper)
    }

    #[test]
    fn both_lanes_rewrite_a_request_head_alike_at_every_kind_of_hop() {
        let request: &[(&str, &str)] = &[
            ("Host", "web.example"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "private"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Connection", "keep-alive"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", "vendor=1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("X-Forwarded-Proto", "https"),
            ("x-skyline-hops", "2"),
            ("x-skyline-timeout-ms", "900"),
            ("x-skyline-attempt", "3"),
            ("x-skyline-caller", "intruder"),
            ("x-skyline-caller-token", "secret"),
            ("x-skyline-error", "made-up"),
            ("x-app", "kept"),
        ];
        let with_id: Vec<(&str, &str)> = request
            .iter()
            .copied()
            .chain([("X-Request-Id", "abc-123"), ("x-forwarded-host", "outer")])
            .collect();
        let hops = [
            // The outbound proxy, asserting its caller.
            Hop {
                host: Host::Keep,
                hops: Some(3),
                caller: Some("billing"),
            },
            // The gateway, from a peer with a mesh certificate.
            Host::Keep.into(),
            // The inbound proxy.
            Host::Upstream.into(),
        ];
        for hop in hops {
            for (first, trusted) in [(true, false), (false, true), (false, false)] {
                let rules = Rules {
                    hop,
                    first,
                    trusted,
                };
                for request in [request, &with_id[..]] {
                    let (bytes, hyper) = both_lanes(request, &rules);
                    assert_eq!(bytes, hyper, "{rules:?}");
                    for gone in [
                        "x-hop:",
                        "keep-alive:",
                        "te:",
                        "connection:",
                        "x-skyline-caller-token:",
                    ] {
                        assert!(
                            !bytes.iter().any(|l| l.starts_with(gone)),
                            "{gone} {bytes:?}"
                        );
                    }
                    for kept in [
                        "traceparent: 00-",
                        "tracestate: vendor=1",
                        "x-forwarded-proto: https",
                        "x-app: kept",
                    ] {
                        assert!(
                            bytes.iter().any(|l| l.starts_with(kept)),
                            "{kept} {bytes:?}"
                        );
                    }
                    assert!(
                        bytes.contains(&"x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.9.9.9".to_owned()),
                        "{bytes:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_last_hop_sets_the_callers_scheme_once_and_keeps_one_that_came() {
        let request: &[(&str, &str)] = &[("Host", "web.example")];
        let with_proto: &[(&str, &str)] =
            &[("Host", "web.example"), ("X-Forwarded-Proto", "https")];
        let proto = |lines: &[String]| -> Vec<String> {
            let lines = lines.iter().filter(|l| l.starts_with("x-forwarded-proto:"));
            lines.cloned().collect()
        };
        for (host, request, want) in [
            (Host::Upstream, request, &["x-forwarded-proto: http"][..]),
            (
                Host::Upstream,
                with_proto,
                &["x-forwarded-proto: https"][..],
            ),
            (Host::Keep, request, &[][..]),
            (Host::Keep, with_proto, &["x-forwarded-proto: https"][..]),
        ] {
            let rules = Rules {
                hop: host.into(),
                first: false,
                trusted: false,
            };
            let (bytes, hyper) = both_lanes(request, &rules);
            assert_eq!(bytes, hyper, "{host:?}");
            assert_eq!(proto(&bytes), want, "{host:?} {request:?}");
        }
    }

    #[test]
    fn the_first_hop_drops_the_callers_assertion_and_attempt_and_a_later_one_believes_a_mesh_peer()
    {
        let outbound = Rules {
            hop: Hop {
                host: Host::Keep,
                hops: Some(1),
                caller: None,
            },
            first: true,
            trusted: true,
        };
        assert_eq!(outbound.of(Name::Caller), Rule::Drop);
        assert_eq!(outbound.of(Name::Attempt), Rule::Drop);
        assert_eq!(outbound.of(Name::Hops), Rule::Count);
        let inbound = Rules {
            hop: Host::Upstream.into(),
            first: false,
            trusted: true,
        };
        assert_eq!(inbound.of(Name::Caller), Rule::Pass);
        assert_eq!(inbound.of(Name::CallerToken), Rule::Drop);
        assert_eq!(inbound.of(Name::Attempt), Rule::Attempt);
        assert_eq!(inbound.of(Name::Hops), Rule::Pass);
        assert_eq!(inbound.of(Name::Host), Rule::Host);
        let untrusted = Rules {
            trusted: false,
            ..inbound
        };
        assert_eq!(untrusted.of(Name::Caller), Rule::Drop);
    }
}
