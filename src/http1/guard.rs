//! The framing guard: re-validates every HTTP/1 request head and tracks body framing between the
//! TCP socket and hyper's server connection.
//!
//! hyper tolerates framing that a proxy must refuse (Content-Length next to Transfer-Encoding,
//! repeated Content-Length, bare LF line endings). [`Guarded`] wraps the socket, inspects the bytes
//! each inner read put into the caller's buffer (no copy in the common case) and:
//!
//! - passes valid request heads and bodies through unchanged;
//! - on a bad head of request `k`, records a [`Rejection`] for `k` in [`Verdicts`], withholds the
//!   bad bytes and hands hyper [`SYNTHETIC_REQUEST`] instead (it says `connection: close`), so
//!   the service answers request `k` with the rejection and hyper closes the connection; later
//!   client bytes are discarded and EOF is reported once the client's side ends;
//! - on a framing error inside the body of request `k`, records the rejection and fails the read
//!   with [`io::ErrorKind::InvalidData`], then EOF.
//!
//! Only the bytes of a head that spans reads are held back (at most `max_head + 1` bytes), so hyper
//! never sees a head the guard has not validated.
//!
//! # Wiring it to hyper
//!
//! - `let (io, verdicts) = Guarded::new(socket, limits);` then
//!   `http1::Builder::new().serve_connection(TokioIo::new(io), service)`.
//! - The service numbers the requests of its connection from 0 (hyper's HTTP/1 server calls it
//!   once per request, in order) and first checks `verdicts.rejection_for(index)`: when it is
//!   `Some`, answer `rejection.status` with `connection: close` and forward nothing.
//! - When a request body fails, check `rejection_for(index)` too: `Some` means the guard refused
//!   the body framing (answer 400); `None` means the client went away or hyper refused it.
//! - hyper's own limits must be looser than the guard's so the guard always speaks first:
//!   `max_headers` ≥ `Limits::max_headers` (hyper's default is 100, equal to ours) and
//!   `max_buf_size` comfortably above `Limits::max_head` (hyper's default ~400 KiB is).
//! - After accepting an upgrade (101, or 2xx to CONNECT), call [`Verdicts::upgraded`] before the
//!   response is sent so the tunnelled bytes are not parsed as HTTP.
//! - Only HTTP/1: an HTTP/2 prior-knowledge preface is refused like any bad head. (The agent's
//!   listeners see a connection's preface before the guard does and serve it as HTTP/2; see
//!   `proxy::express::connection`.)

use std::cmp::min;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use http::StatusCode;
use memchr::memchr;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::trim_ows;

/// What hyper reads in place of a refused request head: the service answers it with the
/// recorded [`Rejection`].
pub const SYNTHETIC_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nhost: skyline.invalid\r\nconnection: close\r\n\r\n";

/// Header slots kept on the stack for the one httparse pass; larger heads (only possible when
/// `max_headers` is raised above this) use a heap vector.
const STACK_HEADERS: usize = 128;

/// Header slots for one httparse pass over a head of `lines` header lines: `N` held inline (in
/// the caller's frame or future; uninitialised, so nothing is cleared per request), a head with
/// more gets exactly its number on the heap.
pub enum HeaderSlots<'b, const N: usize> {
    Inline([MaybeUninit<httparse::Header<'b>>; N]),
    Heap(Vec<MaybeUninit<httparse::Header<'b>>>),
}

impl<'b, const N: usize> HeaderSlots<'b, N> {
    pub fn new(lines: usize) -> Self {
        if lines <= N {
            HeaderSlots::Inline([const { MaybeUninit::uninit() }; N])
        } else {
            HeaderSlots::Heap(
                std::iter::repeat_with(MaybeUninit::uninit)
                    .take(lines)
                    .collect(),
            )
        }
    }

    /// The slots, at least `lines` of them.
    pub fn get(&mut self) -> &mut [MaybeUninit<httparse::Header<'b>>] {
        match self {
            HeaderSlots::Inline(slots) => slots,
            HeaderSlots::Heap(slots) => slots,
        }
    }
}

/// Reads discarded in one call after a rejection before yielding to the scheduler.
const DISCARD_ROUNDS: usize = 8;

/// Trailer names longer than this cannot be one of the forbidden names, so only this many bytes
/// of a trailer name are kept for the comparison.
const TRAILER_NAME_KEEP: usize = 20;

/// Whether `value` is a Host field value, `uri-host [ ":" port ]` (RFC 3986): a reg-name,
/// an IPv4 address or a bracketed IP literal; empty is allowed (RFC 9112 §3.2).
fn host_is_valid(value: &[u8]) -> bool {
    value.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// Trailer fields that would change framing or routing if merged into the head downstream.
const FORBIDDEN_TRAILERS: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

/// Size limits of the guard. hyper's own limits must be looser so the guard always speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line in bytes, CRLF excluded (default 8 KiB); longer → 414.
    pub max_request_line: usize,
    /// Largest request head in bytes, request line and final CRLFCRLF included (default
    /// 64 KiB); larger → 431. Also bounds the bytes held back while a head spans reads.
    pub max_head: usize,
    /// Most header fields in one head (default 100); more → 431.
    pub max_headers: usize,
    /// Longest chunk-size line in bytes: size digits plus extensions, CRLF excluded (default
    /// 4 KiB); longer → 400.
    pub max_chunk_line: usize,
    /// Largest trailer section in bytes, final CRLF included (default 16 KiB); larger → 400.
    pub max_trailers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_head: 64 * 1024,
            max_headers: 100,
            max_chunk_line: 4 * 1024,
            max_trailers: 16 * 1024,
        }
    }
}

/// Why the guard refused a request, and the status to answer it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// 400, 414 (request line too long) or 431 (head too large / too many headers).
    pub status: StatusCode,
    /// Short lowercase reason, e.g. "content-length with transfer-encoding".
    pub reason: &'static str,
}

// === impl Rejection ===

impl Rejection {
    fn bad(reason: &'static str) -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    fn uri_too_long() -> Self {
        Rejection {
            status: StatusCode::URI_TOO_LONG,
            reason: "request line too long",
        }
    }

    fn head_too_large(reason: &'static str) -> Self {
        Rejection {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl std::error::Error for Rejection {}

#[derive(Debug, Default)]
struct Shared {
    /// At most one rejection per connection: the guard stops at the first.
    rejection: OnceLock<(u64, Rejection)>,
    /// Set by the service once it accepted a protocol upgrade: stop inspecting.
    tunnel: AtomicBool,
}

/// The guard's findings on one connection, shared with the hyper service.
#[derive(Debug, Clone, Default)]
pub struct Verdicts {
    shared: Arc<Shared>,
}

// === impl Verdicts ===

impl Verdicts {
    /// The rejection of request number `index` (0-based, in order on this connection), if the
    /// guard refused it.
    pub fn rejection_for(&self, index: u64) -> Option<Rejection> {
        match self.shared.rejection.get() {
            Some((i, r)) if *i == index => Some(*r),
            _ => None,
        }
    }

    /// The refused request's index and the rejection, if the guard refused one.
    pub fn rejection(&self) -> Option<(u64, Rejection)> {
        self.shared.rejection.get().copied()
    }

    /// Tells the guard that the service accepted a protocol upgrade (101, or 2xx to CONNECT):
    /// every later byte is passed through uninspected. Call it before the response is sent.
    pub fn upgraded(&self) {
        self.shared.tunnel.store(true, Ordering::Release);
    }

    fn record(&self, index: u64, rejection: Rejection) {
        // The guard stops at its first rejection, so this is never called twice.
        let _ = self.shared.rejection.set((index, rejection));
    }

    fn is_tunnel(&self) -> bool {
        self.shared.tunnel.load(Ordering::Acquire)
    }
}

pin_project! {
    /// A socket whose reads are checked for request framing; writes pass straight through.
    #[derive(Debug)]
    pub struct Guarded<S> {
        #[pin]
        io: S,
        verdicts: Verdicts,
        scanner: Scanner,
        mode: Mode,
        // Bytes held back: `hold[sent..ok]` is validated and waiting for the reader,
        // `hold[ok..]` is the start of a head that is not complete yet.
        hold: Vec<u8>,
        ok: usize,
        sent: usize,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Inspecting requests.
    Inspect,
    /// A head was refused: feed the synthetic request from this offset, then discard input
    /// until the client's EOF.
    Rejected { sent: usize },
    /// A body was refused: the next read fails with this, later reads see EOF.
    Failed(Rejection),
    /// EOF forever.
    Closed,
    /// The service accepted an upgrade: pass bytes through.
    Tunnel,
}

// === impl Guarded ===

impl<S> Guarded<S> {
    /// Wraps `io`; the returned [`Verdicts`] goes to the hyper service of this connection.
    pub fn new(io: S, limits: Limits) -> (Self, Verdicts) {
        let verdicts = Verdicts::default();
        let guarded = Guarded {
            io,
            verdicts: verdicts.clone(),
            scanner: Scanner::new(limits),
            mode: Mode::Inspect,
            hold: Vec::new(),
            ok: 0,
            sent: 0,
        };
        (guarded, verdicts)
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Validated bytes held back from an earlier read go first.
            if *this.sent < *this.ok {
                let n = min(*this.ok - *this.sent, buf.remaining());
                buf.put_slice(&this.hold[*this.sent..*this.sent + n]);
                *this.sent += n;
                if *this.sent == *this.ok {
                    this.hold.drain(..*this.ok);
                    *this.ok = 0;
                    *this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match *this.mode {
                Mode::Inspect => {}
                Mode::Rejected { sent } if sent < SYNTHETIC_REQUEST.len() => {
                    let rest = &SYNTHETIC_REQUEST[sent..];
                    let n = min(rest.len(), buf.remaining());
                    buf.put_slice(&rest[..n]);
                    *this.mode = Mode::Rejected { sent: sent + n };
                    return Poll::Ready(Ok(()));
                }
                Mode::Rejected { .. } => {
                    // EOF only when the client's side ends: hyper (without `half_close`) drops
                    // a connection whose read side ends while the service is still answering
                    // the synthetic request. What the client sends meanwhile is discarded,
                    // using the reader's buffer as scratch space.
                    for _ in 0..DISCARD_ROUNDS {
                        let before = buf.filled().len();
                        ready!(this.io.as_mut().poll_read(cx, buf))?;
                        let read = buf.filled().len() - before;
                        buf.set_filled(before);
                        if read == 0 {
                            *this.mode = Mode::Closed;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Mode::Failed(rejection) => {
                    *this.mode = Mode::Closed;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, rejection)));
                }
                Mode::Closed => return Poll::Ready(Ok(())),
                Mode::Tunnel => {
                    if this.hold.is_empty() {
                        return this.io.as_mut().poll_read(cx, buf);
                    }
                    // Release a head prefix that was held back: it is not HTTP any more.
                    *this.ok = this.hold.len();
                    continue;
                }
            }
            if this.verdicts.is_tunnel() {
                *this.mode = Mode::Tunnel;
                continue;
            }

            if !this.hold.is_empty() {
                // A head spans reads: read into the hold, bounded by the head limit.
                let held = this.hold.len();
                let want = this
                    .scanner
                    .limits
                    .max_head
                    .saturating_add(1)
                    .saturating_sub(held)
                    .clamp(1, 16 * 1024);
                this.hold.resize(held + want, 0);
                let mut rb = ReadBuf::new(&mut this.hold[held..]);
                let polled = this.io.as_mut().poll_read(cx, &mut rb);
                let n = rb.filled().len();
                this.hold.truncate(held + n);
                ready!(polled)?;
                if n == 0 {
                    // EOF inside a head: hyper never sees the unvalidated part.
                    this.hold.clear();
                    *this.mode = Mode::Closed;
                    continue;
                }
                match this.scanner.scan(this.hold) {
                    Scan::Done => *this.ok = this.hold.len(),
                    Scan::Partial { head_start } => *this.ok = head_start,
                    Scan::RejectHead {
                        head_start,
                        index,
                        rejection,
                    } => {
                        this.verdicts.record(index, rejection);
                        this.hold.truncate(head_start);
                        *this.ok = head_start;
                        *this.mode = Mode::Rejected { sent: 0 };
                    }
                    Scan::BodyError {
                        at,
                        index,
                        rejection,
                    } => {
                        this.verdicts.record(index, rejection);
                        this.hold.truncate(at);
                        *this.ok = at;
                        *this.mode = Mode::Failed(rejection);
                    }
                }
                continue;
            }

            // The common case: inspect the bytes in place.
            let before = buf.filled().len();
            ready!(this.io.as_mut().poll_read(cx, buf))?;
            let new = &buf.filled()[before..];
            if new.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let keep = match this.scanner.scan(new) {
                Scan::Done => return Poll::Ready(Ok(())),
                Scan::Partial { head_start } => {
                    this.hold.extend_from_slice(&new[head_start..]);
                    head_start
                }
                Scan::RejectHead {
                    head_start,
                    index,
                    rejection,
                } => {
                    this.verdicts.record(index, rejection);
                    *this.mode = Mode::Rejected { sent: 0 };
                    head_start
                }
                Scan::BodyError {
                    at,
                    index,
                    rejection,
                } => {
                    this.verdicts.record(index, rejection);
                    *this.mode = Mode::Failed(rejection);
                    at
                }
            };
            buf.set_filled(before + keep);
            if keep > 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing for the reader yet (all held back, or a rejection to report): go again
            // rather than return an empty read, which would mean EOF.
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The outcome of scanning one slice of the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Every byte is valid and accounted for.
    Done,
    /// Bytes from `head_start` on are an incomplete head (valid so far).
    Partial { head_start: usize },
    /// Bytes before `head_start` are valid; the head starting there is refused.
    RejectHead {
        head_start: usize,
        index: u64,
        rejection: Rejection,
    },
    /// Bytes before `at` are valid; the body of request `index` is broken at `at`.
    BodyError {
        at: usize,
        index: u64,
        rejection: Rejection,
    },
}

/// Where the scanner is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Head,
    Fixed { remaining: u64 },
    Chunked(Chunk),
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size: `digits` so far.
    Size {
        digits: u8,
    },
    /// Whitespace after the size: only before `;` (RFC 9112's BWS), never before CR.
    SizeWs,
    /// After `;`, before the extension's name.
    ExtStart,
    /// Inside chunk extensions.
    Ext,
    /// CR of the size line seen, LF expected.
    SizeLf,
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerValueLf,
    TrailerEndLf,
}

/// Progress through a head, relative to the head's first byte, kept while it spans reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HeadScan {
    /// Next byte to search for LF.
    cursor: usize,
    /// First byte of the current line.
    line_start: usize,
    /// Non-empty lines seen: the request line and header lines.
    lines: usize,
    /// LFs seen, each checked to follow a CR.
    newlines: usize,
}

enum HeadStep {
    Incomplete,
    /// The head's lines passed; it ends after `len` bytes and is still to be checked whole.
    Ended {
        len: usize,
    },
    Complete {
        len: usize,
        framing: Framing,
    },
    Reject(Rejection),
}

#[derive(Debug)]
struct Scanner {
    limits: Limits,
    framing: Framing,
    head: HeadScan,
    /// Heads accepted so far: the index of the request being read.
    requests: u64,
    // Chunked-body bookkeeping.
    chunk_size: u64,
    /// Chunk data bytes seen so far (the decoded body's length).
    chunk_data: u64,
    chunk_line: usize,
    trailer_bytes: usize,
    trailer_name: [u8; TRAILER_NAME_KEEP],
    trailer_name_len: usize,
}

// === impl Scanner ===

impl Scanner {
    fn new(limits: Limits) -> Self {
        Scanner {
            limits,
            framing: Framing::Head,
            head: HeadScan::default(),
            requests: 0,
            chunk_size: 0,
            chunk_data: 0,
            chunk_line: 0,
            trailer_bytes: 0,
            trailer_name: [0; TRAILER_NAME_KEEP],
            trailer_name_len: 0,
        }
    }

    /// Scans `data`, the next bytes of the stream. A head carried over from an earlier call
    /// (see [`Scan::Partial`]) must start at `data[0]`.
    fn scan(&mut self, data: &[u8]) -> Scan {
        let mut pos = 0;
        loop {
            match self.framing {
                Framing::Head => {
                    if pos >= data.len() && self.head == HeadScan::default() {
                        return Scan::Done;
                    }
                    let head = data.get(pos..).unwrap_or_default();
                    let step = match self.scan_head(head) {
                        HeadStep::Ended { len } => self.check_head(&head[..len], len),
                        step => step,
                    };
                    match step {
                        HeadStep::Ended { .. } | HeadStep::Incomplete => {
                            return Scan::Partial { head_start: pos };
                        }
                        HeadStep::Reject(rejection) => {
                            return Scan::RejectHead {
                                head_start: pos,
                                index: self.requests,
                                rejection,
                            };
                        }
                        HeadStep::Complete { len, framing } => {
                            self.requests += 1;
                            self.head = HeadScan::default();
                            self.framing = framing;
                            pos += len;
                        }
                    }
                }
                Framing::Fixed { remaining } => {
                    let avail = data.len().saturating_sub(pos);
                    let take = min(remaining, avail as u64);
                    pos += take as usize;
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.framing = Framing::Fixed { remaining };
                        return Scan::Done;
                    }
                    self.framing = Framing::Head;
                }
                Framing::Chunked(chunk) => match self.scan_chunked(chunk, data, &mut pos) {
                    Ok(true) => self.framing = Framing::Head,
                    Ok(false) => return Scan::Done,
                    Err(rejection) => {
                        return Scan::BodyError {
                            at: pos,
                            index: self.requests.saturating_sub(1),
                            rejection,
                        };
                    }
                },
            }
        }
    }

    /// Finds the end of the head starting at `head[0]`, enforcing the limits line by line.
    fn scan_head(&mut self, head: &[u8]) -> HeadStep {
        let limits = self.limits;
        let hs = &mut self.head;
        while let Some(i) = head.get(hs.cursor..).and_then(|rest| memchr(b'\n', rest)) {
            let nl = hs.cursor + i;
            // Length checks come first so that a split head is refused the same way.
            if hs.lines == 0 && nl - hs.line_start > limits.max_request_line.saturating_add(1) {
                return HeadStep::Reject(Rejection::uri_too_long());
            }
            if nl >= limits.max_head {
                return HeadStep::Reject(Rejection::head_too_large("request head too large"));
            }
            if nl == 0 || head[nl - 1] != b'\r' {
                return HeadStep::Reject(Rejection::bad("bare lf in head"));
            }
            hs.newlines += 1;
            let line_len = (nl - 1).saturating_sub(hs.line_start);
            if line_len == 0 {
                if hs.lines > 0 {
                    return HeadStep::Ended { len: nl + 1 };
                }
                // Empty lines before the request line are tolerated (RFC 9112 §2.2).
            } else if hs.lines == 0 {
                hs.lines = 1;
            } else {
                if matches!(head[hs.line_start], b' ' | b'\t') {
                    return HeadStep::Reject(Rejection::bad("obs-fold in head"));
                }
                hs.lines += 1;
                if hs.lines - 1 > limits.max_headers {
                    return HeadStep::Reject(Rejection::head_too_large("too many headers"));
                }
            }
            hs.cursor = nl + 1;
            hs.line_start = nl + 1;
        }
        hs.cursor = head.len();
        if hs.lines == 0 && head.len() - hs.line_start > limits.max_request_line.saturating_add(1) {
            return HeadStep::Reject(Rejection::uri_too_long());
        }
        if head.len() > limits.max_head {
            return HeadStep::Reject(Rejection::head_too_large("request head too large"));
        }
        HeadStep::Incomplete
    }

    /// Validates a complete head (`head` ends with CRLFCRLF; every LF has its CR) and decides
    /// the body framing.
    fn check_head(&self, head: &[u8], len: usize) -> HeadStep {
        let count = self.head.lines.saturating_sub(1);
        let mut slots = HeaderSlots::<STACK_HEADERS>::new(count);
        match self.parse_head(head, &mut slots.get()[..count]) {
            Ok((_, framing)) => HeadStep::Complete { len, framing },
            Err(rejection) => HeadStep::Reject(rejection),
        }
    }

    /// [`check_head`](Self::check_head) into `headers`, which must have a slot for every header
    /// line; returns the parsed request too.
    fn parse_head<'h, 'b>(
        &self,
        head: &'b [u8],
        headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
    ) -> Result<(httparse::Request<'h, 'b>, Framing), Rejection> {
        if memchr(0, head).is_some() {
            return Err(Rejection::bad("nul in head"));
        }
        // Every LF is preceded by a CR, so as many CRs as LFs means no bare CR.
        if memchr::memchr_iter(b'\r', head).count() != self.head.newlines {
            return Err(Rejection::bad("bare cr in head"));
        }
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, headers) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err(Rejection::bad("malformed head")),
            Err(e) => return Err(Rejection::bad(parse_error_reason(e))),
        }
        let version = req.version.unwrap_or(0);
        if !target_is_valid(req.path.unwrap_or_default()) {
            return Err(Rejection::bad("invalid request target"));
        }

        let mut host_count = 0;
        let mut host_valid = true;
        let mut te_count = 0;
        let mut te_chunked = false;
        let mut cl_count = 0;
        let mut cl = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te_count += 1;
                te_chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("content-length") {
                cl_count += 1;
                cl = parse_content_length(h.value);
            } else if h.name.eq_ignore_ascii_case("host") {
                host_count += 1;
                host_valid &= host_is_valid(trim_ows(h.value));
            }
        }
        // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host, with
        // two Host lines (the routing target is ambiguous) or with an invalid one.
        if host_count > 1 {
            return Err(Rejection::bad("repeated host"));
        }

        let framing = if te_count > 0 {
            if cl_count > 0 {
                return Err(Rejection::bad("content-length with transfer-encoding"));
            }
            if te_count > 1 {
                return Err(Rejection::bad("repeated transfer-encoding"));
            }
            if version != 1 {
                return Err(Rejection::bad("transfer-encoding on http/1.0"));
            }
            if !te_chunked {
                return Err(Rejection::bad("unsupported transfer-encoding"));
            }
            Framing::Chunked(Chunk::Size { digits: 0 })
        } else if cl_count > 0 {
            if cl_count > 1 {
                return Err(Rejection::bad("repeated content-length"));
            }
            match cl {
                Some(0) => Framing::Head,
                Some(n) => Framing::Fixed { remaining: n },
                None => return Err(Rejection::bad("invalid content-length")),
            }
        } else {
            Framing::Head
        };
        if host_count == 0 && version == 1 {
            return Err(Rejection::bad("missing host"));
        }
        if !host_valid {
            return Err(Rejection::bad("invalid host"));
        }
        Ok((req, framing))
    }

    /// Advances through a chunked body from `data[*pos]`. `Ok(true)` when the body ended (at
    /// `*pos`), `Ok(false)` when `data` ran out; on error `*pos` is the offending byte.
    fn scan_chunked(
        &mut self,
        mut chunk: Chunk,
        data: &[u8],
        pos: &mut usize,
    ) -> Result<bool, Rejection> {
        let limits = self.limits;
        while *pos < data.len() {
            if let Chunk::Data { remaining } = chunk {
                // Chunk data is skipped in bulk.
                let take = min(remaining, (data.len() - *pos) as u64);
                *pos += take as usize;
                self.chunk_data = self.chunk_data.saturating_add(take);
                chunk = if remaining == take {
                    Chunk::DataCr
                } else {
                    Chunk::Data {
                        remaining: remaining - take,
                    }
                };
                continue;
            }
            let b = data[*pos];
            match chunk {
                Chunk::Size { .. } | Chunk::SizeWs | Chunk::ExtStart | Chunk::Ext if b != b'\r' => {
                    self.chunk_line = self.chunk_line.saturating_add(1);
                    if self.chunk_line > limits.max_chunk_line {
                        return Err(Rejection::bad("chunk size line too long"));
                    }
                }
                Chunk::TrailerStart
                | Chunk::TrailerName
                | Chunk::TrailerValue
                | Chunk::TrailerValueLf
                | Chunk::TrailerEndLf => {
                    self.trailer_bytes = self.trailer_bytes.saturating_add(1);
                    if self.trailer_bytes > limits.max_trailers {
                        return Err(Rejection::bad("trailers too large"));
                    }
                }
                _ => {}
            }
            let next = match chunk {
                Chunk::Size { digits } => {
                    if let Some(v) = hex_value(b) {
                        if digits == 16 {
                            return Err(Rejection::bad("chunk size overflow"));
                        }
                        self.chunk_size = (self.chunk_size << 4) | u64::from(v);
                        Chunk::Size { digits: digits + 1 }
                    } else if digits == 0 {
                        return Err(Rejection::bad("invalid chunk size"));
                    } else {
                        match b {
                            b'\r' => Chunk::SizeLf,
                            b';' => Chunk::ExtStart,
                            b' ' | b'\t' => Chunk::SizeWs,
                            _ => return Err(Rejection::bad("invalid chunk size")),
                        }
                    }
                }
                // "5 \r\n" is read as 5 by some parsers and refused by others: refused here.
                Chunk::SizeWs => match b {
                    b' ' | b'\t' => Chunk::SizeWs,
                    b';' => Chunk::ExtStart,
                    _ => return Err(Rejection::bad("whitespace after chunk size")),
                },
                Chunk::ExtStart => match b {
                    b' ' | b'\t' => Chunk::ExtStart,
                    b if is_tchar(b) => Chunk::Ext,
                    _ => return Err(Rejection::bad("chunk extension without a name")),
                },
                Chunk::Ext => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(Rejection::bad("bare lf in chunk extension")),
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => Chunk::Ext,
                    _ => return Err(Rejection::bad("invalid byte in chunk extension")),
                },
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(Rejection::bad("bare cr in chunk size line"));
                    }
                    let size = self.chunk_size;
                    self.chunk_size = 0;
                    self.chunk_line = 0;
                    if size == 0 {
                        self.trailer_bytes = 0;
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data { remaining: size }
                    }
                }
                Chunk::Data { .. } => chunk,
                Chunk::DataCr => {
                    if b != b'\r' {
                        return Err(Rejection::bad("missing crlf after chunk data"));
                    }
                    Chunk::DataLf
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err(Rejection::bad("missing crlf after chunk data"));
                    }
                    Chunk::Size { digits: 0 }
                }
                Chunk::TrailerStart => {
                    if b == b'\r' {
                        Chunk::TrailerEndLf
                    } else if is_tchar(b) {
                        self.trailer_name[0] = b.to_ascii_lowercase();
                        self.trailer_name_len = 1;
                        Chunk::TrailerName
                    } else if matches!(b, b' ' | b'\t') {
                        return Err(Rejection::bad("obs-fold in trailers"));
                    } else {
                        return Err(Rejection::bad("invalid trailer"));
                    }
                }
                Chunk::TrailerName => {
                    if is_tchar(b) {
                        if let Some(slot) = self.trailer_name.get_mut(self.trailer_name_len) {
                            *slot = b.to_ascii_lowercase();
                        }
                        self.trailer_name_len = self.trailer_name_len.saturating_add(1);
                        Chunk::TrailerName
                    } else if b == b':' {
                        let name = self.trailer_name.get(..self.trailer_name_len);
                        if name.is_some_and(|n| FORBIDDEN_TRAILERS.contains(&n)) {
                            return Err(Rejection::bad("forbidden trailer"));
                        }
                        Chunk::TrailerValue
                    } else {
                        return Err(Rejection::bad("invalid trailer name"));
                    }
                }
                Chunk::TrailerValue => match b {
                    b'\r' => Chunk::TrailerValueLf,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => Chunk::TrailerValue,
                    _ => return Err(Rejection::bad("invalid trailer value")),
                },
                Chunk::TrailerValueLf => {
                    if b != b'\n' {
                        return Err(Rejection::bad("bare cr in trailers"));
                    }
                    Chunk::TrailerStart
                }
                Chunk::TrailerEndLf => {
                    if b != b'\n' {
                        return Err(Rejection::bad("bare cr in trailers"));
                    }
                    *pos += 1;
                    return Ok(true);
                }
            };
            *pos += 1;
            chunk = next;
        }
        self.framing = Framing::Chunked(chunk);
        Ok(false)
    }
}

/// What [`HeadReader::parse`] found.
pub enum HeadCheck<'h, 'b> {
    /// Refused, as the guard refuses it.
    Rejected(Rejection),
    /// Valid, but with more header lines than the caller gave slots for.
    TooManyForSlots,
    /// Valid: the parsed request, and how its body (if any) follows the head.
    Valid {
        request: httparse::Request<'h, 'b>,
        body: Body,
    },
}

/// How a request's body follows its head, by the framing the guard accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body (no framing header, or `Content-Length: 0`).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// How far [`HeadReader::scan`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProgress {
    /// No blank line yet, and nothing the guard refuses so far.
    Incomplete,
    /// The head ends after this many bytes (leading empty lines included).
    Ended(usize),
    /// The guard refuses the head (a bare LF, say, or a head past the limits).
    Refused(Rejection),
}

/// The guard's checks on one request head that arrives in pieces, for a reader that keeps the
/// bytes in its own buffer (the express lane): each call scans only what is new, and the
/// finished head is checked and parsed in one pass.
#[derive(Debug)]
pub struct HeadReader {
    scanner: Scanner,
}

impl HeadReader {
    pub fn new(limits: Limits) -> Self {
        HeadReader {
            scanner: Scanner::new(limits),
        }
    }

    /// Scans `buf`, which starts with the head and has only grown since the last call.
    pub fn scan(&mut self, buf: &[u8]) -> HeadProgress {
        match self.scanner.scan_head(buf) {
            HeadStep::Ended { len } => HeadProgress::Ended(len),
            HeadStep::Reject(rejection) => HeadProgress::Refused(rejection),
            _ => HeadProgress::Incomplete,
        }
    }

    /// How many header lines the head [`scan`](Self::scan) found has: the slots
    /// [`parse`](Self::parse) needs.
    pub fn header_lines(&self) -> usize {
        self.scanner.head.lines.saturating_sub(1)
    }

    /// Checks the head [`scan`](Self::scan) found to end after `head.len()` bytes, and parses
    /// it into `slots`.
    pub fn parse<'h, 'b>(
        &self,
        head: &'b [u8],
        slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
    ) -> HeadCheck<'h, 'b> {
        let Some(slots) = slots.get_mut(..self.header_lines()) else {
            return HeadCheck::TooManyForSlots;
        };
        match self.scanner.parse_head(head, slots) {
            Ok((request, framing)) => HeadCheck::Valid {
                request,
                body: match framing {
                    Framing::Head => Body::None,
                    Framing::Fixed { remaining } => Body::Length(remaining),
                    Framing::Chunked(_) => Body::Chunked,
                },
            },
            Err(rejection) => HeadCheck::Rejected(rejection),
        }
    }
}

/// Finds where a chunked body ends, by the guard's rules and limits, without decoding it: the
/// express lane passes an upstream's chunked response through as it arrives and needs only to
/// know where it stops (and that its framing is sound).
#[derive(Debug)]
pub struct ChunkedBody {
    scanner: Scanner,
}

impl ChunkedBody {
    pub fn new(limits: Limits) -> Self {
        let mut scanner = Scanner::new(limits);
        scanner.framing = Framing::Chunked(Chunk::Size { digits: 0 });
        ChunkedBody { scanner }
    }

    /// Scans `data`, the body's next bytes: `Ok(Some(n))` when the body ends after `data[..n]`,
    /// `Ok(None)` when all of `data` belongs to it and more is to come.
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, Rejection> {
        let Framing::Chunked(chunk) = self.scanner.framing else {
            return Ok(Some(0));
        };
        let mut pos = 0;
        if self.scanner.scan_chunked(chunk, data, &mut pos)? {
            self.scanner.framing = Framing::Head;
            return Ok(Some(pos));
        }
        Ok(None)
    }

    /// The chunk data scanned so far: the body's length without its framing.
    pub fn data_len(&self) -> u64 {
        self.scanner.chunk_data
    }
}

fn parse_error_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method",
        httparse::Error::Version => "unsupported http version",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Status => "malformed head",
    }
}

/// Whether `http::Uri` accepts the request target. Origin-form targets made of bytes that
/// `http` accepts in both path and query are checked here without allocating.
fn target_is_valid(target: &str) -> bool {
    const MAX_URI: usize = u16::MAX as usize - 1;
    let bytes = target.as_bytes();
    let fast = bytes.first() == Some(&b'/')
        && bytes.len() <= MAX_URI
        && bytes
            .iter()
            .all(|&b| matches!(b, 0x21 | 0x24..=0x3b | 0x3d | 0x3f..=0x5f | 0x61..=0x7e));
    fast || http::Uri::try_from(target).is_ok()
}

/// `1*DIGIT` that fits in a u64, surrounded by optional whitespace; nothing else.
pub(crate) fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::task::Waker;

    /// An in-memory socket that returns at most `max` bytes per read and never blocks.
    struct Feed {
        data: Vec<u8>,
        pos: usize,
        max: usize,
    }

    impl AsyncRead for Feed {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = min(min(self.max, self.data.len() - self.pos), buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Debug)]
    struct Outcome {
        output: Vec<u8>,
        error: Option<io::Error>,
        verdict: Option<(u64, Rejection)>,
    }

    /// Reads everything through a guard: `max_read` bytes at most per inner read, into a reader
    /// buffer of `buf_size` bytes.
    fn run_with(input: &[u8], limits: Limits, max_read: usize, buf_size: usize) -> Outcome {
        let feed = Feed {
            data: input.to_vec(),
            pos: 0,
            max: max_read,
        };
        let (mut guarded, verdicts) = Guarded::new(feed, limits);
        let mut cx = Context::from_waker(Waker::noop());
        let mut output = Vec::new();
        let mut error = None;
        let mut space = vec![0; buf_size];
        // Every read makes progress, so this bound is never reached by a correct guard.
        for _ in 0..(input.len() + SYNTHETIC_REQUEST.len()) * 2 + 10 {
            let mut rb = ReadBuf::new(&mut space);
            match Pin::new(&mut guarded).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Outcome {
                        output,
                        error,
                        verdict: verdicts.rejection(),
                    };
                }
                Poll::Ready(Ok(())) => output.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => {
                    assert!(error.is_none(), "a second error after {error:?}: {e}");
                    error = Some(e);
                }
                // The feed never blocks: only the guard's discard loop yields.
                Poll::Pending => {}
            }
        }
        panic!("guard did not reach EOF");
    }

    fn run(input: &[u8]) -> Outcome {
        run_with(input, Limits::default(), usize::MAX, 1 << 20)
    }

    #[derive(Debug, Clone, Copy)]
    enum Expect {
        /// The head is refused with this status; the reader sees the synthetic request.
        Head(u16),
        /// The body is refused: the reader gets a prefix of the input, then InvalidData.
        Body,
        /// Passes byte for byte.
        Pass,
    }

    fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
        use Expect::*;
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        let big_head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            (0..10)
                .map(|i| format!("X-{i}: {}\r\n", "v".repeat(7000)))
                .collect::<String>()
        );
        let many_headers = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            (0..101)
                .map(|i| format!("X-{i}: v\r\n"))
                .collect::<String>()
        );
        let max_headers = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            (0..99).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
        );
        let post = |headers: &str, body: &str| {
            format!("POST /upload HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}").into_bytes()
        };
        let chunked = |body: &str| post("Transfer-Encoding: chunked\r\n", body);
        vec![
            // Content-Length and Transfer-Encoding together.
            (
                "cl then te",
                post(
                    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                ),
                Head(400),
            ),
            (
                "te then cl",
                post(
                    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                    "0\r\n\r\n",
                ),
                Head(400),
            ),
            (
                "te with cl 0, lowercase",
                post(
                    "transfer-encoding: chunked\r\ncontent-length: 0\r\n",
                    "0\r\n\r\n",
                ),
                Head(400),
            ),
            // Content-Length variants.
            (
                "duplicate equal cl",
                post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
                Head(400),
            ),
            (
                "duplicate different cl",
                post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
                Head(400),
            ),
            (
                "cl list 5, 6",
                post("Content-Length: 5, 6\r\n", "hello!"),
                Head(400),
            ),
            (
                "cl list 5,5",
                post("Content-Length: 5,5\r\n", "hello"),
                Head(400),
            ),
            (
                "cl plus sign",
                post("Content-Length: +5\r\n", "hello"),
                Head(400),
            ),
            ("cl negative", post("Content-Length: -1\r\n", ""), Head(400)),
            ("cl empty", post("Content-Length: \r\n", ""), Head(400)),
            (
                "cl hex",
                post("Content-Length: 0x5\r\n", "hello"),
                Head(400),
            ),
            (
                "cl overflow",
                post("Content-Length: 18446744073709551616\r\n", ""),
                Head(400),
            ),
            // Obfuscated Transfer-Encoding.
            (
                "te xchunked",
                post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
                Head(400),
            ),
            (
                "te chunked, identity",
                post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
                Head(400),
            ),
            (
                "te identity",
                post("Transfer-Encoding: identity\r\n", ""),
                Head(400),
            ),
            (
                "te twice",
                post(
                    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                ),
                Head(400),
            ),
            (
                "te on http/1.0",
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "te space before colon",
                post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
                Head(400),
            ),
            (
                "te value folded",
                post("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n"),
                Head(400),
            ),
            (
                "te vertical tab",
                post("Transfer-Encoding: chunked\x0b\r\n", "0\r\n\r\n"),
                Head(400),
            ),
            // Line endings and control bytes.
            (
                "bare lf after request line",
                b"GET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "bare lf after header",
                b"GET / HTTP/1.1\r\nHost: a\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "all bare lf",
                b"GET / HTTP/1.1\nHost: a\n\n".to_vec(),
                Head(400),
            ),
            (
                "bare cr in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\nHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "bare cr line end",
                b"GET / HTTP/1.1\rHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "nul in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "nul in target",
                b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "obs-fold",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "obs-fold tab",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "space before colon",
                b"GET / HTTP/1.1\r\nHost : a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "space in header name",
                b"GET / HTTP/1.1\r\nHost: a\r\nX Y: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "duplicate host",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "no host on http/1.1",
                b"GET / HTTP/1.1\r\nX: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "space in host",
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "no host on http/1.0",
                b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "host with a port and an ip literal",
                b"GET / HTTP/1.1\r\nHost: [::1]:5040\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "empty header name",
                b"GET / HTTP/1.1\r\nHost: a\r\n: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            // Request line.
            (
                "invalid method",
                b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            ("http/1.2", b"GET / HTTP/1.2\r\n\r\n".to_vec(), Head(400)),
            ("http/0.9 style", b"GET /\r\n\r\n".to_vec(), Head(400)),
            (
                "target http::Uri refuses",
                b"GET /a<b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Head(400),
            ),
            (
                "h2 prior knowledge preface",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                Head(400),
            ),
            // Limits.
            ("request line too long", long_target.into_bytes(), Head(414)),
            ("head too large", big_head.into_bytes(), Head(431)),
            ("too many headers", many_headers.into_bytes(), Head(431)),
            // Chunked bodies.
            (
                "chunk size overflow",
                chunked("FFFFFFFFFFFFFFFFF\r\n"),
                Body,
            ),
            (
                "chunk ext bare lf",
                chunked("5;a\nb\r\nhello\r\n0\r\n\r\n"),
                Body,
            ),
            (
                "chunk ext nul",
                chunked("5;a\0\r\nhello\r\n0\r\n\r\n"),
                Body,
            ),
            ("chunk size bare cr", chunked("5\rhello\r\n0\r\n\r\n"), Body),
            (
                "whitespace after chunk size",
                chunked("5\t\r\nhello\r\n0\r\n\r\n"),
                Body,
            ),
            (
                "chunk ext without a name",
                chunked("5;\r\nhello\r\n0\r\n\r\n"),
                Body,
            ),
            ("chunk size not hex", chunked("g\r\n"), Body),
            ("chunk size empty", chunked("\r\nhello\r\n0\r\n\r\n"), Body),
            ("chunk size bare lf", chunked("5\nhello\r\n0\r\n\r\n"), Body),
            (
                "missing crlf after chunk data",
                chunked("5\r\nhelloX\r\n0\r\n\r\n"),
                Body,
            ),
            (
                "chunk data too long",
                chunked("3\r\nhello\r\n0\r\n\r\n"),
                Body,
            ),
            (
                "trailer injection content-length",
                chunked("0\r\nContent-Length: 5\r\n\r\n"),
                Body,
            ),
            (
                "trailer injection transfer-encoding",
                chunked("0\r\ntransfer-encoding: chunked\r\n\r\n"),
                Body,
            ),
            ("trailer obs-fold", chunked("0\r\nX: a\r\n b\r\n\r\n"), Body),
            ("trailer bare lf", chunked("0\r\nX: a\n\r\n"), Body),
            (
                "trailer space before colon",
                chunked("0\r\nX : a\r\n\r\n"),
                Body,
            ),
            ("missing final crlf", chunked("0\r\n\rX"), Body),
            // Valid requests.
            (
                "get",
                b"GET /a/b?c=d&e HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "post with content-length",
                post("Content-Length: 5\r\n", "hello"),
                Pass,
            ),
            (
                "chunk ext after whitespace",
                chunked("5 ;a=b\r\nhello\r\n0\r\n\r\n"),
                Pass,
            ),
            (
                "chunked with extensions and trailers",
                chunked(
                    "5;name=val;x\r\nhello\r\nA\r\n0123456789\r\n0;last\r\nX-Sum: 1\r\nEtag: \"a\"\r\n\r\n",
                ),
                Pass,
            ),
            (
                "te ows and case",
                post("Transfer-Encoding: \tChunked \r\n", "0\r\n\r\n"),
                Pass,
            ),
            (
                "chunk size whitespace",
                chunked("5 ;a\r\nhello\r\n0\r\n\r\n"),
                Pass,
            ),
            ("http/1.0", b"GET / HTTP/1.0\r\n\r\n".to_vec(), Pass),
            (
                "absolute form",
                b"GET http://a.example/b?c HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "target with quote",
                b"GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "options star",
                b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Pass,
            ),
            (
                "leading empty line",
                b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Pass,
            ),
            ("exactly max headers", max_headers.into_bytes(), Pass),
            (
                "pipelined three",
                [
                    &b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
                    &post("Content-Length: 3\r\n", "abc"),
                    &chunked("3\r\nabc\r\n0\r\n\r\n"),
                ]
                .concat(),
                Pass,
            ),
        ]
    }

    fn check(name: &str, input: &[u8], expect: Expect, got: &Outcome) {
        match expect {
            Expect::Head(status) => {
                assert_eq!(
                    got.output, SYNTHETIC_REQUEST,
                    "{name}: reader must see the synthetic request"
                );
                assert!(got.error.is_none(), "{name}: {:?}", got.error);
                let (index, rejection) =
                    got.verdict.unwrap_or_else(|| panic!("{name}: no verdict"));
                assert_eq!(index, 0, "{name}");
                assert_eq!(rejection.status.as_u16(), status, "{name}: {rejection:?}");
            }
            Expect::Body => {
                assert!(
                    input.starts_with(&got.output),
                    "{name}: output must be a prefix"
                );
                let error = got
                    .error
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: no error"));
                assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{name}");
                let (index, rejection) =
                    got.verdict.unwrap_or_else(|| panic!("{name}: no verdict"));
                assert_eq!(index, 0, "{name}");
                assert_eq!(rejection.status, StatusCode::BAD_REQUEST, "{name}");
                assert_eq!(error.to_string(), rejection.reason, "{name}");
            }
            Expect::Pass => {
                assert_eq!(got.output, input, "{name}: must pass unchanged");
                assert!(got.error.is_none(), "{name}: {:?}", got.error);
                assert_eq!(got.verdict, None, "{name}");
            }
        }
    }

    /// Validates one whole request head (`head` ends with its blank line) by the guard's rules and
    /// limits, and parses it into `slots`. A head that does not end where `head` does is refused.
    fn validate_head<'h, 'b>(
        head: &'b [u8],
        limits: Limits,
        slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
    ) -> HeadCheck<'h, 'b> {
        let mut reader = HeadReader::new(limits);
        match reader.scan(head) {
            HeadProgress::Ended(len) if len == head.len() => reader.parse(head, slots),
            HeadProgress::Refused(rejection) => HeadCheck::Rejected(rejection),
            _ => HeadCheck::Rejected(Rejection::bad("malformed head")),
        }
    }

    /// The express lane checks heads with a [`HeadReader`]; on every case it must reach the
    /// stream scanner's verdict on the first head.
    #[test]
    fn whole_head_checks_agree_with_the_stream_scanner() {
        let limits = Limits::default();
        for (name, input, _) in cases() {
            let mut input = &input[..];
            while let Some(rest) = input.strip_prefix(b"\r\n") {
                input = rest;
            }
            let expected = match Scanner::new(limits).scan(input) {
                Scan::RejectHead {
                    index: 0,
                    rejection,
                    ..
                } => Some(rejection),
                _ => None,
            };
            let Some(end) = memchr::memmem::find(input, b"\r\n\r\n").map(|i| i + 4) else {
                let progress = HeadReader::new(limits).scan(input);
                let refused = matches!(progress, HeadProgress::Refused(_));
                assert_eq!(refused, expected.is_some(), "{name}");
                continue;
            };
            let mut slots = [const { MaybeUninit::uninit() }; 128];
            let got = match validate_head(&input[..end], limits, &mut slots) {
                HeadCheck::Rejected(rejection) => Some(rejection),
                HeadCheck::Valid { .. } => None,
                HeadCheck::TooManyForSlots => panic!("{name}: 128 slots are enough"),
            };
            // A bare LF can hide the real end of the head from the CRLFCRLF search: the
            // stream scanner refuses at the LF, and so does the whole-head check.
            assert_eq!(got.map(|r| r.status), expected.map(|r| r.status), "{name}");
        }
    }

    #[test]
    fn validate_head_parses_what_it_accepts_and_says_whether_a_body_follows() {
        let limits = Limits::default();
        let mut slots = [const { MaybeUninit::uninit() }; 8];
        let head = b"GET /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
        let HeadCheck::Valid { request, body } = validate_head(head, limits, &mut slots) else {
            panic!("valid head refused");
        };
        assert_eq!((request.method, request.path), (Some("GET"), Some("/a?b")));
        assert_eq!(request.headers.len(), 2);
        assert_eq!(body, Body::None);
        let mut slots = [const { MaybeUninit::uninit() }; 8];
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n";
        assert!(matches!(
            validate_head(head, limits, &mut slots),
            HeadCheck::Valid {
                body: Body::Length(3),
                ..
            }
        ));
        let mut slots = [const { MaybeUninit::uninit() }; 1];
        assert!(matches!(
            validate_head(head, limits, &mut slots),
            HeadCheck::TooManyForSlots
        ));
        // Two heads: only a whole single head is accepted.
        let two = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut slots = [const { MaybeUninit::uninit() }; 8];
        assert!(matches!(
            validate_head(two, limits, &mut slots),
            HeadCheck::Rejected(_)
        ));
    }

    #[test]
    fn a_chunked_body_end_and_data_length_are_found_however_it_is_split() {
        let body = b"6\r\nhello \r\n5;x=y\r\nworld\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut scan = ChunkedBody::new(Limits::default());
            let first = scan.scan(&body[..split]).unwrap();
            let found = match first {
                Some(n) => n,
                None => split + scan.scan(&body[split..]).unwrap().expect("ends"),
            };
            assert_eq!(found, end, "split at {split}");
            assert_eq!(scan.data_len(), 11, "split at {split}");
        }
        let mut scan = ChunkedBody::new(Limits::default());
        assert!(scan.scan(b"zz\r\n").is_err());
        let mut scan = ChunkedBody::new(Limits::default());
        assert!(scan.scan(b"0\r\ncontent-length: 1\r\n\r\n").is_err());
    }

    #[test]
    fn hostile_requests_are_refused_and_valid_ones_pass_unchanged() {
        for (name, input, expect) in cases() {
            check(name, &input, expect, &run(&input));
        }
    }

    #[test]
    fn verdicts_do_not_depend_on_how_reads_are_split() {
        for (name, input, expect) in cases() {
            let whole = run(&input);
            for (max_read, buf_size) in [
                (1, 1),
                (1, 8192),
                (3, 5),
                (7, 64),
                (4096, 100),
                (usize::MAX, 17),
            ] {
                let split = run_with(&input, Limits::default(), max_read, buf_size);
                check(name, &input, expect, &split);
                assert_eq!(
                    split.output, whole.output,
                    "{name} ({max_read}, {buf_size})"
                );
                assert_eq!(
                    split.verdict, whole.verdict,
                    "{name} ({max_read}, {buf_size})"
                );
            }
        }
    }

    #[test]
    fn valid_requests_before_a_bad_one_pass_and_only_the_bad_one_is_refused() {
        let good = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc".to_vec();
        let bad = b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        let input = [&good[..], &bad[..]].concat();
        for (max_read, buf_size) in [(usize::MAX, 1 << 16), (1, 1), (10, 7)] {
            let got = run_with(&input, Limits::default(), max_read, buf_size);
            assert_eq!(got.output, [&good[..], SYNTHETIC_REQUEST].concat());
            assert!(got.error.is_none());
            assert_eq!(
                got.verdict.map(|(i, r)| (i, r.reason)),
                Some((1, "repeated content-length"))
            );
        }
        let (_, verdicts) = Guarded::new(
            Feed {
                data: input,
                pos: 0,
                max: 1,
            },
            Limits::default(),
        );
        assert_eq!(verdicts.rejection_for(0), None);
    }

    #[test]
    fn a_broken_body_after_a_valid_request_is_charged_to_its_own_request() {
        let good = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
        let bad = b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n";
        let input = [&good[..], &bad[..]].concat();
        let got = run(&input);
        assert!(input.starts_with(&got.output));
        assert!(got.output.len() >= good.len() + 50);
        assert_eq!(
            got.error.map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        assert_eq!(
            got.verdict.map(|(i, r)| (i, r.reason)),
            Some((1, "missing crlf after chunk data"))
        );
    }

    #[test]
    fn rejection_for_answers_only_the_refused_index() {
        let input =
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /\n\r\n"
                .to_vec();
        let (mut guarded, verdicts) = Guarded::new(
            Feed {
                data: input,
                pos: 0,
                max: 1 << 16,
            },
            Limits::default(),
        );
        let mut cx = Context::from_waker(Waker::noop());
        let mut space = [0u8; 1024];
        while {
            let mut rb = ReadBuf::new(&mut space);
            matches!(
                Pin::new(&mut guarded).poll_read(&mut cx, &mut rb),
                Poll::Ready(Ok(()))
            ) && !rb.filled().is_empty()
        } {}
        assert_eq!(verdicts.rejection_for(0), None);
        assert_eq!(verdicts.rejection_for(1), None);
        assert_eq!(
            verdicts.rejection_for(2).map(|r| r.status),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(verdicts.rejection_for(3), None);
    }

    #[test]
    fn an_accepted_upgrade_passes_later_bytes_uninspected() {
        let head =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let frames = b"\x81\x05hello\nnot http\0";
        let input = [&head[..], &frames[..]].concat();
        let feed = Feed {
            data: input.clone(),
            pos: 0,
            max: head.len(),
        };
        let (mut guarded, verdicts) = Guarded::new(feed, Limits::default());
        let mut cx = Context::from_waker(Waker::noop());
        let mut space = [0u8; 4096];
        let mut rb = ReadBuf::new(&mut space);
        assert!(matches!(
            Pin::new(&mut guarded).poll_read(&mut cx, &mut rb),
            Poll::Ready(Ok(()))
        ));
        let mut output = rb.filled().to_vec();
        verdicts.upgraded();
        loop {
            let mut rb = ReadBuf::new(&mut space);
            assert!(matches!(
                Pin::new(&mut guarded).poll_read(&mut cx, &mut rb),
                Poll::Ready(Ok(()))
            ));
            if rb.filled().is_empty() {
                break;
            }
            output.extend_from_slice(rb.filled());
        }
        assert_eq!(output, input);
        assert_eq!(verdicts.rejection(), None);
    }

    #[test]
    fn eof_inside_a_head_hands_the_reader_nothing_of_it() {
        let got = run_with(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Len",
            Limits::default(),
            5,
            64,
        );
        assert!(got.output.is_empty());
        assert!(got.error.is_none());
        assert_eq!(got.verdict, None);
    }

    #[tokio::test]
    async fn works_over_a_real_duplex_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let (mut guarded, verdicts) = Guarded::new(server, Limits::default());
        let writer = tokio::spawn(async move {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await?;
            client
                .write_all(
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                )
                .await?;
            client.shutdown().await
        });
        let mut output = Vec::new();
        guarded.read_to_end(&mut output).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(
            output,
            [&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..], SYNTHETIC_REQUEST].concat()
        );
        assert_eq!(
            verdicts.rejection_for(1).map(|r| r.reason),
            Some("content-length with transfer-encoding")
        );
    }

    #[tokio::test]
    async fn after_a_rejection_input_is_discarded_until_the_client_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::time::{Duration, timeout};
        let (mut client, server) = tokio::io::duplex(256);
        let (mut guarded, verdicts) = Guarded::new(server, Limits::default());
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\0\r\n\r\n")
            .await
            .unwrap();
        let mut synthetic = vec![0; SYNTHETIC_REQUEST.len()];
        guarded.read_exact(&mut synthetic).await.unwrap();
        assert_eq!(synthetic, SYNTHETIC_REQUEST);
        assert_eq!(
            verdicts.rejection_for(0).map(|r| r.reason),
            Some("nul in head")
        );
        let mut rest = [0u8; 64];
        // The client is still there: no EOF yet, and what it sends is never handed on.
        assert!(
            timeout(Duration::from_millis(20), guarded.read(&mut rest))
                .await
                .is_err()
        );
        client.write_all(&[b'x'; 200]).await.unwrap();
        assert!(
            timeout(Duration::from_millis(20), guarded.read(&mut rest))
                .await
                .is_err()
        );
        drop(client);
        assert_eq!(guarded.read(&mut rest).await.unwrap(), 0);
        assert_eq!(guarded.read(&mut rest).await.unwrap(), 0);
    }

    #[test]
    fn chunk_line_and_trailer_limits_are_enforced() {
        let limits = small_limits();
        let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let long_ext = format!("{head}1;{}\r\na\r\n0\r\n\r\n", "e".repeat(30));
        let long_trailers = format!("{head}0\r\nX-A: {}\r\n\r\n", "v".repeat(60));
        let fits = format!(
            "{head}1;{}\r\na\r\n0\r\nX-A: {}\r\n\r\n",
            "e".repeat(20),
            "v".repeat(30)
        );
        for (input, reason) in [
            (long_ext, Some("chunk size line too long")),
            (long_trailers, Some("trailers too large")),
            (fits, None),
        ] {
            for max_read in [1, 5, usize::MAX] {
                let got = run_with(input.as_bytes(), limits, max_read, 64);
                assert_eq!(got.verdict.map(|(_, r)| r.reason), reason, "{input:?}");
                assert_eq!(got.error.is_some(), reason.is_some(), "{input:?}");
            }
        }
    }

    #[test]
    fn a_large_body_is_skipped_without_holding_it() {
        let body = vec![b'z'; 1 << 20];
        let mut input = format!(
            "PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let feed = Feed {
            data: input.clone(),
            pos: 0,
            max: 8192,
        };
        let (mut guarded, _verdicts) = Guarded::new(feed, Limits::default());
        let mut cx = Context::from_waker(Waker::noop());
        let mut space = vec![0; 8192];
        let mut output = Vec::new();
        loop {
            let mut rb = ReadBuf::new(&mut space);
            assert!(matches!(
                Pin::new(&mut guarded).poll_read(&mut cx, &mut rb),
                Poll::Ready(Ok(()))
            ));
            if rb.filled().is_empty() {
                break;
            }
            output.extend_from_slice(rb.filled());
            assert!(guarded.hold.capacity() <= Limits::default().max_head + 1);
        }
        assert_eq!(output, input);
    }

    fn request(kind: u8, body: &[u8], chunks: &[usize], ext: bool) -> Vec<u8> {
        let mut out = Vec::new();
        match kind % 3 {
            0 => out.extend_from_slice(b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            1 => {
                out.extend_from_slice(
                    format!(
                        "PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(body);
            }
            _ => {
                out.extend_from_slice(
                    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                let mut rest = body;
                for &size in chunks {
                    let n = min(size, rest.len());
                    if n == 0 {
                        break;
                    }
                    let ext = if ext { ";e=1" } else { "" };
                    out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                if !rest.is_empty() {
                    out.extend_from_slice(format!("{:X}\r\n", rest.len()).as_bytes());
                    out.extend_from_slice(rest);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(if ext {
                    &b"0\r\nX-T: v\r\n\r\n"[..]
                } else {
                    b"0\r\n\r\n"
                });
            }
        }
        out
    }

    fn small_limits() -> Limits {
        Limits {
            max_request_line: 40,
            max_head: 200,
            max_headers: 6,
            max_chunk_line: 24,
            max_trailers: 48,
        }
    }

    /// Pieces of HTTP, good and bad, so that random streams reach deep into the state machine.
    const PIECES: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\n",
        b"GET / HTTP/1.0\r\n",
        b"Host: a\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"X: ",
        b"\r\n",
        b"\n",
        b"\r",
        b"\0",
        b" ",
        b":",
        b"abc",
        b"3\r\n",
        b"0\r\n",
        b";ext",
        b"FFFFFFFFFFFFFFFFF",
        b"PRI * HTTP/2.0\r\n",
    ];

    proptest! {
        #[test]
        fn valid_streams_pass_unchanged_however_reads_are_split(
            requests in prop::collection::vec(
                (any::<u8>(), prop::collection::vec(any::<u8>(), 0..60), prop::collection::vec(1usize..25, 0..4), any::<bool>()),
                1..6,
            ),
            max_read in 1usize..80,
            buf_size in 1usize..200,
        ) {
            let input: Vec<u8> = requests.iter().flat_map(|(k, b, c, e)| request(*k, b, c, *e)).collect();
            let whole = run(&input);
            prop_assert_eq!(&whole.output, &input);
            prop_assert!(whole.error.is_none());
            prop_assert_eq!(whole.verdict, None);
            let split = run_with(&input, Limits::default(), max_read, buf_size);
            prop_assert_eq!(&split.output, &input);
            prop_assert!(split.error.is_none());
            prop_assert_eq!(split.verdict, None);
        }

        #[test]
        fn random_bytes_never_panic_and_output_is_bounded(
            input in prop::collection::vec(any::<u8>(), 0..2048),
            max_read in 1usize..300,
            buf_size in 1usize..300,
            odd in (0usize..50, 0usize..200, 0usize..5, 0usize..30, 0usize..50),
        ) {
            let odd = Limits {
                max_request_line: odd.0,
                max_head: odd.1,
                max_headers: odd.2,
                max_chunk_line: odd.3,
                max_trailers: odd.4,
            };
            let unbounded = Limits {
                max_request_line: usize::MAX,
                max_head: usize::MAX,
                max_headers: usize::MAX,
                max_chunk_line: usize::MAX,
                max_trailers: usize::MAX,
            };
            for limits in [Limits::default(), small_limits(), odd, unbounded] {
                let got = run_with(&input, limits, max_read, buf_size);
                prop_assert!(got.output.len() <= input.len() + SYNTHETIC_REQUEST.len());
            }
        }

        #[test]
        fn random_http_pieces_get_the_same_verdict_however_reads_are_split(
            picks in prop::collection::vec(0usize..PIECES.len(), 0..60),
            max_read in 1usize..40,
            buf_size in 1usize..64,
        ) {
            let input: Vec<u8> = picks.iter().flat_map(|&i| PIECES[i].iter().copied()).collect();
            for limits in [Limits::default(), small_limits()] {
                let whole = run_with(&input, limits, usize::MAX, 1 << 16);
                let split = run_with(&input, limits, max_read, buf_size);
                prop_assert!(whole.output.len() <= input.len() + SYNTHETIC_REQUEST.len());
                prop_assert_eq!(&split.output, &whole.output);
                prop_assert_eq!(split.verdict, whole.verdict);
                prop_assert_eq!(split.error.map(|e| e.kind()), whole.error.map(|e| e.kind()));
            }
        }
    }
}
