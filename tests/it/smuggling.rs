//! Request smuggling: a corpus of raw-byte framing mutations drawn from public research
//! (Transfer-Encoding obfuscations, duplicate and conflicting lengths, chunk-size tricks, bare CR
//! and LF, pipelined and embedded requests, upgrade tricks) sent to every listener: the agent's
//! outbound and inbound proxies, the gateway, the bridge and the registry.
//!
//! Behind the proxies is a raw-TCP application that parses what it receives strictly and records
//! every request. For each mutation, the requests a strict RFC 9112 reader takes from the bytes
//! are written down by hand (`meant`; none when the bytes are ambiguous or invalid). What
//! reaches the application must be a prefix of `meant`, equal in method, path and body: a
//! mutation is refused, or forwarded as exactly the requests the client meant, never as more or
//! as other ones. A refusal must be a clear one (an error status with `x-skyline-error`) unless
//! the client's bytes end before a request does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::support::*;
use crate::upgrade::{ClusterDns, ClusterPath};

/// One request as the application got it (or as the client meant it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn got(method: &str, path: &str, body: &str) -> Got {
    Got {
        method: method.to_owned(),
        path: path.to_owned(),
        body: body.as_bytes().to_vec(),
    }
}

/// One mutation: its name, its bytes, and what a strict reader takes from them.
struct Mutation {
    name: String,
    bytes: Vec<u8>,
    meant: Vec<Got>,
}

const CHUNKED_HELLO: &str = "5\r\nhello\r\n0\r\n\r\n";

/// The corpus, for requests to `prefix` + `/p<i>` (the application sees `/p<i>`), with `post`
/// as the method of requests with a body.
fn corpus(prefix: &str, post: &str) -> Vec<Mutation> {
    let mut out: Vec<Mutation> = Vec::new();
    let mut push = |name: String, bytes: Vec<u8>, meant: Vec<Got>| {
        out.push(Mutation { name, bytes, meant });
    };
    // `i` is the index the next mutation gets: its path.
    let mut i = 0usize;
    let mut next = || {
        i += 1;
        i - 1
    };
    let line =
        |method: &str, n: usize| format!("{method} {prefix}/p{n} HTTP/1.1\r\nHost: mesh\r\n");
    let path = |n: usize| format!("/p{n}");
    let hello = |n: usize| vec![got(post, &path(n), "hello")];

    // --- Transfer-Encoding values, alone and beside a Content-Length ---
    let te_values: &[(&str, bool)] = &[
        ("chunked", true),
        (" chunked", true),
        ("chunked ", true),
        ("\tchunked", true),
        ("chunked\t", true),
        ("Chunked", true),
        ("CHUNKED", true),
        ("cHuNkEd", true),
        ("gzip, chunked", true),
        ("\"chunked\"", false),
        ("chunked\x0b", false),
        ("\x0bchunked", false),
        ("\x0cchunked", false),
        ("chunk", false),
        ("chunkedx", false),
        ("x-chunked", false),
        ("xchunked", false),
        ("chunked;", false),
        ("chunked, chunked", false),
        ("chunked,chunked", false),
        ("identity, chunked", false),
        ("chunked, identity", false),
        ("chunked, gzip", false),
        ("chunk\ted", false),
        ("chunked\x00", false),
        ("chu\x00nked", false),
        ("\u{85}chunked", false),
        ("chunked\u{a0}", false),
    ];
    for &(value, valid) in te_values {
        let n = next();
        let bytes = format!(
            "{}Transfer-Encoding: {value}\r\n\r\n{CHUNKED_HELLO}",
            line(post, n)
        );
        push(
            format!("te {value:?}"),
            bytes.into(),
            if valid { hello(n) } else { vec![] },
        );
        let n = next();
        let bytes = format!(
            "{}Content-Length: 5\r\nTransfer-Encoding: {value}\r\n\r\n{CHUNKED_HELLO}",
            line(post, n)
        );
        push(format!("cl 5 + te {value:?}"), bytes.into(), vec![]);
    }
    // --- Transfer-Encoding as other header names and lines ---
    let te_lines: &[(&str, bool)] = &[
        ("Transfer-Encoding : chunked", false),
        ("Transfer-Encoding\t: chunked", false),
        ("Transfer-Encoding\x00: chunked", false),
        ("Transfer-\x00Encoding: chunked", false),
        ("X-A: b\r\n Transfer-Encoding: chunked", false),
        ("X-A: b\r\n\tTransfer-Encoding: chunked", false),
        ("Transfer-Encoding:\r\n chunked", false),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            false,
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip",
            false,
        ),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            true,
        ),
        ("transfer-encoding: chunked", true),
        ("TRANSFER-ENCODING: chunked", true),
        ("Transfer-Encoding:chunked", true),
    ];
    for &(text, valid) in te_lines {
        let n = next();
        let bytes = format!("{}{text}\r\n\r\n{CHUNKED_HELLO}", line(post, n));
        push(
            format!("te line {text:?}"),
            bytes.into(),
            if valid { hello(n) } else { vec![] },
        );
    }
    // A header that is not Transfer-Encoding at all: no body, then garbage.
    for text in ["Transfer_Encoding: chunked", "XTransfer-Encoding: chunked"] {
        let n = next();
        let bytes = format!("{}{text}\r\n\r\n{CHUNKED_HELLO}", line(post, n));
        push(
            format!("not te {text:?}"),
            bytes.into(),
            vec![got(post, &path(n), "")],
        );
    }
    // A whitespace line between the request line and the first field.
    let n = next();
    push(
        "space before the first field".into(),
        format!(
            "{post} {prefix}/p{n} HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: mesh\r\n\r\n{CHUNKED_HELLO}"
        )
        .into(),
        vec![],
    );

    // --- Content-Length values ---
    let cl_values: &[(&str, Option<&str>)] = &[
        ("5", Some("hello")),
        (" 5", Some("hello")),
        ("5 ", Some("hello")),
        ("05", Some("hello")),
        ("0005", Some("hello")),
        ("+5", None),
        ("-5", None),
        ("5.0", None),
        ("0x5", None),
        ("5e0", None),
        ("5, 6", None),
        ("5 5", None),
        ("", None),
        ("\u{ff15}", None),
        ("18446744073709551621", None),
        ("99999999999999999999999999", None),
        ("5\x00", None),
        ("5\x0b", None),
    ];
    for &(value, meant) in cl_values {
        let n = next();
        let bytes = format!("{}Content-Length: {value}\r\n\r\nhello", line(post, n));
        push(
            format!("cl {value:?}"),
            bytes.into(),
            meant.map_or(vec![], |b| vec![got(post, &path(n), b)]),
        );
    }
    let cl_lines: &[(&str, &str, Option<&str>)] = &[
        (
            "two equal lengths",
            "Content-Length: 5\r\nContent-Length: 5",
            Some("hello"),
        ),
        (
            "two lengths",
            "Content-Length: 5\r\nContent-Length: 6",
            None,
        ),
        ("length list", "Content-Length: 5, 5", Some("hello")),
        ("space before colon", "Content-Length : 5", None),
        ("folded length", "Content-Length:\r\n 5", None),
    ];
    for &(what, text, meant) in cl_lines {
        let n = next();
        let bytes = format!("{}{text}\r\n\r\nhello", line(post, n));
        push(
            format!("cl line: {what}"),
            bytes.into(),
            meant.map_or(vec![], |b| vec![got(post, &path(n), b)]),
        );
    }
    // Shorter lengths than the body: the rest is the next request, which is garbage.
    for (length, body) in [("3", "hel"), ("0", "")] {
        let n = next();
        let bytes = format!("{}Content-Length: {length}\r\n\r\nhello", line(post, n));
        push(
            format!("cl {length} before 5 bytes"),
            bytes.into(),
            vec![got(post, &path(n), body)],
        );
    }
    let n = next();
    push(
        "Content_Length is not a length".into(),
        format!("{}Content_Length: 5\r\n\r\nhello", line(post, n)).into(),
        vec![got(post, &path(n), "")],
    );

    // --- Chunk sizes, extensions, data and trailers ---
    let chunked: &[(&str, &str, Option<&str>)] = &[
        ("extension", "5;ext=1\r\nhello\r\n0\r\n\r\n", Some("hello")),
        (
            "quoted extension",
            "5;ext=\"a b\"\r\nhello\r\n0\r\n\r\n",
            Some("hello"),
        ),
        ("leading zeros", "0005\r\nhello\r\n0\r\n\r\n", Some("hello")),
        (
            "upper-case hex",
            "A\r\nhellohello\r\n0\r\n\r\n",
            Some("hellohello"),
        ),
        (
            "two chunks",
            "2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
            Some("hello"),
        ),
        ("last chunk 000", "5\r\nhello\r\n000\r\n\r\n", Some("hello")),
        ("empty body", "0\r\n\r\n", Some("")),
        (
            "trailer",
            "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
            Some("hello"),
        ),
        (
            "framing trailers",
            "5\r\nhello\r\n0\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n",
            Some("hello"),
        ),
        ("0x size", "0x5\r\nhello\r\n0\r\n\r\n", None),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n", None),
        ("plus size", "+5\r\nhello\r\n0\r\n\r\n", None),
        ("space before size", " 5\r\nhello\r\n0\r\n\r\n", None),
        ("tab after size", "5\t\r\nhello\r\n0\r\n\r\n", None),
        ("extension without a name", "5;\r\nhello\r\n0\r\n\r\n", None),
        ("bare lf after size", "5\nhello\r\n0\r\n\r\n", None),
        ("bare cr after size", "5\rhello\r\n0\r\n\r\n", None),
        (
            "overflowing size",
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
            None,
        ),
        (
            "data longer than its size",
            "5\r\nhelloX\r\n0\r\n\r\n",
            None,
        ),
        (
            "data shorter than its size",
            "6\r\nhello\r\n0\r\n\r\n",
            None,
        ),
        ("no crlf after data", "5\r\nhello0\r\n\r\n", None),
        ("bare lf after data", "5\r\nhello\n0\r\n\r\n", None),
        ("bare lf after last chunk", "5\r\nhello\r\n0\n\n", None),
        (
            "folded trailer",
            "5\r\nhello\r\n0\r\nX-T: 1\r\n folded\r\n\r\n",
            None,
        ),
        (
            "bare lf in a trailer",
            "5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
            None,
        ),
        ("no end after the last chunk", "5\r\nhello\r\n0\r\n", None),
    ];
    for &(what, body, meant) in chunked {
        let n = next();
        let bytes = format!("{}Transfer-Encoding: chunked\r\n\r\n{body}", line(post, n));
        push(
            format!("chunked: {what}"),
            bytes.into(),
            meant.map_or(vec![], |b| vec![got(post, &path(n), b)]),
        );
    }
    let n = next();
    let long_extension = format!(
        "{}Transfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        line(post, n),
        "x".repeat(70_000)
    );
    push(
        "chunked: a 70 KB extension".into(),
        long_extension.into(),
        hello(n),
    );

    // --- Request lines and line endings ---
    let get = |n: usize| vec![got("GET", &path(n), "")];
    let lines: &[(&str, &str, bool)] = &[
        (
            "bare lf line ends",
            "GET {p} HTTP/1.1\nHost: mesh\n\n",
            true,
        ),
        (
            "a bare cr in a value",
            "GET {p} HTTP/1.1\r\nHost: mesh\r\nX-A: a\rb\r\n\r\n",
            false,
        ),
        (
            "a bare cr ending a field",
            "GET {p} HTTP/1.1\r\nHost: mesh\rX-A: b\r\n\r\n",
            false,
        ),
        (
            "two spaces",
            "GET  {p} HTTP/1.1\r\nHost: mesh\r\n\r\n",
            false,
        ),
        (
            "a trailing space",
            "GET {p} HTTP/1.1 \r\nHost: mesh\r\n\r\n",
            false,
        ),
        ("tabs", "GET\t{p}\tHTTP/1.1\r\nHost: mesh\r\n\r\n", false),
        (
            "HTTP/1.10",
            "GET {p} HTTP/1.10\r\nHost: mesh\r\n\r\n",
            false,
        ),
        (
            "lower-case version",
            "GET {p} http/1.1\r\nHost: mesh\r\n\r\n",
            false,
        ),
        (
            "two hosts",
            "GET {p} HTTP/1.1\r\nHost: mesh\r\nHost: other\r\n\r\n",
            false,
        ),
        ("no host", "GET {p} HTTP/1.1\r\nX-A: b\r\n\r\n", false),
        (
            "a space in the host",
            "GET {p} HTTP/1.1\r\nHost: me sh\r\n\r\n",
            false,
        ),
        (
            "a leading empty line",
            "\r\nGET {p} HTTP/1.1\r\nHost: mesh\r\n\r\n",
            true,
        ),
        (
            "a nul in the target",
            "GET {p}\x00 HTTP/1.1\r\nHost: mesh\r\n\r\n",
            false,
        ),
        (
            "a space in the target",
            "GET {p} x HTTP/1.1\r\nHost: mesh\r\n\r\n",
            false,
        ),
    ];
    for &(what, template, valid) in lines {
        let n = next();
        let bytes = template.replace("{p}", &format!("{prefix}/p{n}"));
        push(
            format!("line: {what}"),
            bytes.into(),
            if valid { get(n) } else { vec![] },
        );
    }

    // --- Pipelined and embedded requests ---
    let second = |n: usize| format!("GET {prefix}/p{n}b HTTP/1.1\r\nHost: mesh\r\n\r\n");
    let and_second = |n: usize, first: Got| vec![first, got("GET", &format!("/p{n}b"), "")];
    let n = next();
    push(
        "pipelined: two GETs".into(),
        format!("{}\r\n{}", line("GET", n), second(n)).into(),
        and_second(n, got("GET", &path(n), "")),
    );
    let n = next();
    push(
        "pipelined: a body, then a GET".into(),
        format!(
            "{}Content-Length: 5\r\n\r\nhello{}",
            line(post, n),
            second(n)
        )
        .into(),
        and_second(n, got(post, &path(n), "hello")),
    );
    let n = next();
    push(
        "pipelined: an empty chunked body, then a GET".into(),
        format!(
            "{}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
            line(post, n),
            second(n)
        )
        .into(),
        and_second(n, got(post, &path(n), "")),
    );
    let n = next();
    let embedded = second(n);
    push(
        "embedded: a request inside a chunked body".into(),
        format!(
            "{}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{embedded}\r\n0\r\n\r\n",
            line(post, n),
            embedded.len()
        )
        .into(),
        vec![got(post, &path(n), &embedded)],
    );
    let n = next();
    push(
        "CL.TE: a request hidden behind both lengths".into(),
        format!(
            "{}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
            line(post, n),
            second(n)
        )
        .into(),
        vec![],
    );
    let n = next();
    push(
        "TE.CL: a request hidden behind both lengths".into(),
        format!(
            "{}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n{}\r\n0\r\n\r\n",
            line(post, n),
            second(n)
        )
        .into(),
        vec![],
    );
    let n = next();
    push(
        "TE.TE: an obfuscated second coding".into(),
        format!(
            "{}Transfer-Encoding: chunked\r\nTransfer-encoding: x\r\n\r\n0\r\n\r\n{}",
            line(post, n),
            second(n)
        )
        .into(),
        vec![],
    );
    let n = next();
    push(
        "a GET with a length and a body".into(),
        format!("{}Content-Length: 5\r\n\r\nhello", line("GET", n)).into(),
        vec![got("GET", &path(n), "hello")],
    );
    let n = next();
    push(
        "a GET with a chunked body".into(),
        format!(
            "{}Transfer-Encoding: chunked\r\n\r\n{CHUNKED_HELLO}",
            line("GET", n)
        )
        .into(),
        vec![got("GET", &path(n), "hello")],
    );
    let n = next();
    push(
        "expect 100-continue".into(),
        format!(
            "{}Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
            line(post, n)
        )
        .into(),
        hello(n),
    );
    let n = next();
    push(
        "a bad request behind a good one".into(),
        format!(
            "{}\r\n{}Content-Length: 1\r\nContent-Length: 2\r\n\r\nxy{}",
            line("GET", n),
            line(post, n + 1000),
            second(n)
        )
        .into(),
        vec![got("GET", &path(n), "")],
    );

    // --- Upgrade tricks (the application never switches: it answers 200) ---
    let upgrades: &[(&str, &str)] = &[
        (
            "h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        ),
        (
            "websocket",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        ("upgrade without connection", "Upgrade: websocket\r\n"),
        ("connection without upgrade", "Connection: Upgrade\r\n"),
    ];
    for &(what, headers) in upgrades {
        let n = next();
        push(
            format!("upgrade refused: {what}, then a GET"),
            format!("{}{headers}\r\n{}", line("GET", n), second(n)).into(),
            and_second(n, got("GET", &path(n), "")),
        );
    }
    let n = next();
    push(
        "upgrade with a body, then a GET".into(),
        format!(
            "{}Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello{}",
            line(post, n),
            second(n)
        )
        .into(),
        and_second(n, got(post, &path(n), "hello")),
    );
    out
}

// === The application ===

/// A raw-TCP application that parses strictly and records every request it reads; `None` for
/// bytes it could not parse (then it closes the connection).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Option<Got>>>>,
}

impl Recorder {
    async fn spawn(ip: &str) -> (SocketAddr, Self, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind((crate::support::ip(ip), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Self::default();
        let seen = recorder.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(seen.clone().serve(stream));
            }
        });
        (addr, recorder, task)
    }

    fn seen(&self) -> Vec<Option<Got>> {
        self.seen.lock().unwrap().clone()
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            match parse(&buf) {
                Parsed::Done(request, used) => {
                    buf.drain(..used);
                    self.seen.lock().unwrap().push(Some(request));
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    continue;
                }
                Parsed::Bad => {
                    self.seen.lock().unwrap().push(None);
                    return;
                }
                Parsed::More => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

enum Parsed {
    Done(Got, usize),
    More,
    Bad,
}

/// A strict HTTP/1.1 request reader, for what the proxies send.
fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > 256 * 1024 {
            Parsed::Bad
        } else {
            Parsed::More
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Bad;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, "HTTP/1.1"] = parts[..] else {
        return Parsed::Bad;
    };
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(": ") else {
            return Parsed::Bad;
        };
        if name.is_empty()
            || name.contains([' ', '\t', '\r', '\n'])
            || value.contains(['\r', '\n', '\0'])
        {
            return Parsed::Bad;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (length, value.parse::<usize>()) {
                (None, Ok(n)) => length = Some(n),
                _ => return Parsed::Bad,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Parsed::Bad;
            }
            chunked = true;
        }
    }
    let body_start = end + 4;
    let (body, used) = match (length, chunked) {
        (Some(_), true) => return Parsed::Bad,
        (Some(n), false) => {
            if buf.len() < body_start + n {
                return Parsed::More;
            }
            (buf[body_start..body_start + n].to_vec(), body_start + n)
        }
        (None, true) => match dechunk(&buf[body_start..]) {
            Dechunked::Done(body, used) => (body, body_start + used),
            Dechunked::More => return Parsed::More,
            Dechunked::Bad => return Parsed::Bad,
        },
        (None, false) => (Vec::new(), body_start),
    };
    let got = Got {
        method: method.to_owned(),
        path: target.to_owned(),
        body,
    };
    Parsed::Done(got, used)
}

enum Dechunked {
    Done(Vec<u8>, usize),
    More,
    Bad,
}

fn dechunk(buf: &[u8]) -> Dechunked {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Dechunked::More;
        };
        let Ok(size_text) = std::str::from_utf8(&buf[at..at + eol]) else {
            return Dechunked::Bad;
        };
        let size_text = size_text.split(';').next().unwrap_or("");
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Dechunked::Bad;
        };
        at += eol + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Dechunked::More;
                };
                at += eol + 2;
                if eol == 0 {
                    return Dechunked::Done(body, at);
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Dechunked::More;
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Dechunked::Bad;
        }
        at += size + 2;
    }
}

// === Sending ===

/// Sends `bytes` and reads until the listener closes, or answered `expected` requests (final
/// answers), or 3 s passed. `half_close`: shut the write side after sending, for bytes that end
/// inside a request (the only way to tell the listener nothing more comes).
async fn send(addr: SocketAddr, bytes: &[u8], expected: usize, half_close: bool) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
            if expected > 0 && final_answers(&out) >= expected {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// How many complete final (not 1xx) answers `out` holds.
fn final_answers(out: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(end) = out[at..].windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&out[at..at + end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let next = at + end + 4 + length;
        if next > out.len() {
            break;
        }
        if !head.starts_with("http/1.1 1") {
            count += 1;
        }
        at = next;
    }
    count
}

/// The status codes in a reply, in order.
fn statuses(reply: &str) -> Vec<u16> {
    reply
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| reply.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Sends the corpus to `listener` (paths under `prefix`) and checks what reached `recorder`;
/// the failures, and how many mutations were forwarded whole and refused.
async fn run_corpus(
    what: &str,
    listener: SocketAddr,
    prefix: &str,
    recorder: &Recorder,
) -> (Vec<String>, usize, usize) {
    let mut failures = Vec::new();
    let (mut forwarded, mut refused) = (0, 0);
    for mutation in corpus(prefix, "POST") {
        let before = recorder.seen().len();
        let incomplete = mutation.name.contains("no end after");
        let reply = send(listener, &mutation.bytes, mutation.meant.len(), incomplete).await;
        let seen: Vec<Option<Got>> = recorder.seen()[before..].to_vec();
        let codes = statuses(&reply);
        let prefix_of_meant = seen.len() <= mutation.meant.len()
            && seen
                .iter()
                .zip(&mutation.meant)
                .all(|(s, m)| s.as_ref() == Some(m));
        if !prefix_of_meant {
            failures.push(format!(
                "{what} {}: the application got {seen:?}, meant {:?} (reply {codes:?})",
                mutation.name, mutation.meant
            ));
            continue;
        }
        if seen.len() == mutation.meant.len() && !seen.is_empty() {
            forwarded += 1;
            continue;
        }
        refused += 1;
        // Refused (in part): clearly, unless the bytes ended inside a request.
        let clear = codes.last().is_some_and(|&c| (400..=505).contains(&c))
            && reply.to_ascii_lowercase().contains("x-skyline-error:");
        if !clear && !incomplete {
            failures.push(format!(
                "{what} {}: refused without a clear error: {reply:?}",
                mutation.name
            ));
        }
    }
    (failures, forwarded, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smuggling_corpus_is_refused_or_forwarded_as_meant_on_every_listener() {
    let count = corpus("/x", "POST").len();
    assert!(count >= 100, "the corpus has {count} mutations");

    // `web` on node b (outbound a → inbound b → app); `kube` known only to the cluster DNS
    // (outbound a → gateway → bridge → app).
    let (app, recorder, app_task) = Recorder::spawn("127.0.0.5").await;
    let dns = ClusterDns::start(&[("kube.default.svc.cluster.local", "127.0.0.5")]).await;
    let path = ClusterPath::start(&dns, app.port()).await;
    let (gateway, bridge) = (&path.gateway, &path.bridge);
    let web = Placement {
        service: "web",
        node: "b",
        addr: app,
        health: skyline::catalog::Health::Passing,
    };
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(web)
        .catch_all(gateway.addr)
        .spawn()
        .await;

    let listeners = [
        ("outbound", mesh.outbound("a"), "/service/web"),
        ("inbound", mesh.inbound("b"), "/service/web"),
        (
            "outbound via the gateway",
            mesh.outbound("a"),
            "/service/kube",
        ),
        ("gateway", gateway.addr, "/service/kube"),
        ("bridge", bridge.addrs[0], "/service/kube"),
    ];
    let mut failures = Vec::new();
    for (what, addr, prefix) in listeners {
        let (mut f, forwarded, refused) = run_corpus(what, addr, prefix, &recorder).await;
        println!(
            "{what}: {count} mutations, {forwarded} forwarded as meant, {refused} refused, {} wrong",
            f.len()
        );
        failures.append(&mut f);
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        recorder.seen().iter().all(Option::is_some),
        "the application never read bytes it could not parse"
    );
    mesh.stop().await;
    path.stop().await;
    app_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smuggling_corpus_writes_to_the_registry_only_what_was_meant() {
    let dir = tempfile::tempdir().unwrap();
    let listener = skyline::serve::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let registry = skyline::registry::spawn(
        listener,
        skyline::registry::RegistryConfig::new(dir.path().join("registry")),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    // Every mutation is a KV write (PUT /v1/kv/p<i>) or read: what the registry stored must be
    // what the client meant to write, key for key.
    let corpus = corpus("/v1/kv", "PUT");
    let mut meant: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut unclear = Vec::new();
    for mutation in &corpus {
        for m in &mutation.meant {
            if m.method == "PUT" {
                meant.insert(m.path.trim_start_matches('/').to_owned(), m.body.clone());
            }
        }
        let incomplete = mutation.name.contains("no end after");
        let reply = send(
            registry.addr(),
            &mutation.bytes,
            mutation.meant.len(),
            incomplete,
        )
        .await;
        let codes = statuses(&reply);
        let refused = codes.last().is_some_and(|&c| (400..=505).contains(&c));
        if mutation.meant.is_empty() && !incomplete && !refused {
            unclear.push(format!("{}: {codes:?}", mutation.name));
        }
    }
    let listing = Client::new()
        .get(&format!("http://{}/v1/kv/?recurse", registry.addr()))
        .await;
    let stored: Vec<serde_json::Value> = if listing.status == 404 {
        Vec::new()
    } else {
        serde_json::from_str(&listing.body).unwrap()
    };
    let mut wrong = Vec::new();
    for entry in &stored {
        let key = entry["Key"].as_str().unwrap();
        let value = entry["Value"].as_str().map_or(Vec::new(), |v| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(v).unwrap()
        });
        if meant.get(key) != Some(&value) {
            wrong.push(format!("{key} = {:?}", String::from_utf8_lossy(&value)));
        }
    }
    println!(
        "registry: {} mutations, {} keys stored of {} meant",
        corpus.len(),
        stored.len(),
        meant.len()
    );
    assert!(wrong.is_empty(), "stored but not meant: {wrong:?}");
    assert!(unclear.is_empty(), "invalid but not refused: {unclear:?}");
    assert!(!stored.is_empty(), "valid writes went through");
    registry.shutdown();
}
