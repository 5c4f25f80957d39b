//! The multiplexed peer link: many HTTP/1.1 connections between two Skyline proxies carried
//! as streams over one TCP (or mesh TLS) connection.
//!
//! With a connection per request in flight, each hop's kernel work (loopback TCP: the system
//! calls and segments of every request and answer) is most of a request's cost, the same for
//! any proxy (docs/benchmarks.md). On one link the frames of many requests go out in one
//! write and come in with one read. A stream is a byte stream with everything the express lane
//! and hyper expect of a TCP connection (reads, writes, half-close, end of stream, reset), so
//! HTTP/1.1 runs over it unchanged and both sides keep their keep-alive pools: the outbound
//! pools streams where it pooled connections, and the inbound serves each stream as it serves
//! a connection. Like yamux or SSH channels, and much smaller: only the side that dialled opens
//! streams, and a stream needs no round trip to open.
//!
//! The wire: the dialling side sends [`PREFACE`]; the listener answers the same bytes (a
//! listener that does not speak the link answers HTTP/1.1's 400, and the dialler uses
//! connections of their own to it from then on). Then frames, each an 8-byte header — kind
//! (1 byte), payload length (3 bytes), stream id (4 bytes), big-endian — and its payload:
//!
//! | kind | payload | meaning |
//! |---|---|---|
//! | `DATA` 0 | 1 to [`MAX_FRAME`] bytes | bytes of the stream; the first frame of a new id opens it |
//! | `FIN` 1 | none | the sender wrote its last byte (half-close) |
//! | `RESET` 2 | code, 4 bytes | the stream is gone both ways: 0 closed, 1 refused (never served) |
//! | `CREDIT` 3 | increment, 4 bytes | the receiver read that many more bytes of the stream (of the link, on id 0) |
//! | `GOAWAY` 4 | last id, 4 bytes | the listener drains: streams past the id were refused |
//! | `PING` 5 | 4 bytes | on id 0, asks the peer to answer with the same bytes on id 1 |
//!
//! A link is replaced after [`LINK_WRITES`] writes by either end (the dialler stops opening
//! streams on it, the listener sends `GOAWAY`), which keeps a mesh TLS link far from its
//! record limit, and when the dialler's certificate changes (its [`tag`](Link::dial)).
//!
//! Flow control, as HTTP/2's: a sender may have at most [`WINDOW`] bytes of a stream, and
//! [`LINK_WINDOW`] bytes of all its streams, unread by the other side; the reader grants more
//! with `CREDIT` as its application reads, so a slow reader holds back its own stream only
//! (until a link's worth of streams are held) and a link's memory stays bounded. A peer that breaks these rules
//! (an unknown kind, an oversized frame, more than its credit) loses the link, and so does one
//! that asks for answers (pings, resets) it does not read.
//!
//! Keepalive, as Linkerd's proxies keep HTTP/2 between them: an end with streams open that has
//! heard nothing from its peer for [`PING_AFTER`] sends a `PING`, and ends the link when
//! [`PING_TIMEOUT`] more pass in silence. A peer whose host vanished (a TCP connection keeps
//! retransmitting for many minutes) costs the requests in flight, not every request after.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hashbrown::HashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What the dialling side sends first and the listener answers. It starts as HTTP/2's preface
/// does, so listeners tell it from HTTP/1 by the same first byte; to an HTTP/1.1 server it is a
/// malformed request line.
pub const PREFACE: &[u8] = b"PRI * SKYLINE-MUX/1\r\n\r\n";
/// The largest payload of a `DATA` frame.
pub const MAX_FRAME: usize = 32 * 1024;
/// The bytes of one stream a sender may have in flight unread (per direction).
pub const WINDOW: u32 = 256 * 1024;
/// The bytes of all a link's streams a sender may have in flight unread (per direction).
pub const LINK_WINDOW: u32 = 4 * 1024 * 1024;
/// The most streams open at once on a link; a listener refuses more (a dialler opens another
/// link). As many as a Skyline listener allows an HTTP/2 connection.
pub const MAX_STREAMS: usize = 256;
/// An estimate of the records one end may write (each batch counted as one, plus one per
/// 8 KiB) before the link is replaced: a quarter of mesh TLS's record limit.
pub const LINK_WRITES: u64 = 1 << 21;
/// Bytes waiting to be written past which a stream's writes wait for the link's writer.
const OUT_LIMIT: usize = 512 * 1024;
/// What a link reads at a time at most.
const READ_SIZE: usize = 64 * 1024;
/// What a link's read buffer starts with, and goes back to when the link has no stream.
const FIRST_READ: usize = 4 * 1024;
/// A stream's receive buffer larger than this is freed once read empty (an idle stream holds
/// none of a large body's buffer).
const KEEP_RECV: usize = 8 * 1024;
/// How long an end with streams open hears nothing from its peer before it sends a `PING`.
pub const PING_AFTER: Duration = Duration::from_secs(10);
/// How long after that ping the link is ended if still nothing is heard.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes waiting to be written past which the peer is taken not to read them: the frames the
/// peer's own frames call for (credits, resets, ping answers) are a few bytes per read of
/// its data, far below this while it reads; a flood of pings or of bytes to closed streams
/// with nothing read ends the link instead of growing the queue.
const ANSWERS_LIMIT: usize = 2 * OUT_LIMIT;

const HEADER: usize = 8;
const DATA: u8 = 0;
const FIN: u8 = 1;
const RESET: u8 = 2;
const CREDIT: u8 = 3;
const GOAWAY: u8 = 4;
const PING: u8 = 5;
const CLOSED: u32 = 0;
const REFUSED: u32 = 1;
/// The dialler keys a stream that has sent nothing yet at this value and above; it takes its
/// id on the wire (below it) with its first frame, so ids go out in order whichever stream
/// writes first.
const UNSENT: u32 = 1 << 31;

/// Which end of the link this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// The dialling side: opens streams.
    Dialler,
    /// The listening side: serves the streams the dialler opens.
    Listener,
}

/// The error of a stream the listener refused (a `RESET` with code refused, or a stream past a
/// `GOAWAY`): the request on it reached no application and may go elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("the peer refused the stream")]
pub struct Refused;

/// Whether `error` is a stream's [`Refused`].
pub fn is_refused(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Refused>())
}

/// Whether a stream's [`Refused`] is among `error`'s causes (hyper's error over a stream).
pub fn refused_in(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<Refused>() || e.downcast_ref::<io::Error>().is_some_and(is_refused) {
            return true;
        }
        cause = e.source();
    }
    false
}

// === Link ===

/// One end of a link: what its streams, its reader task and its writer task share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    side: Side,
    /// The dialler's tag (its TLS generation) when it dialled.
    tag: u64,
}

#[derive(Debug)]
struct State {
    /// Frames to write, in order.
    out: Vec<u8>,
    streams: HashMap<u32, Slot>,
    /// The writer task, waiting for frames.
    writer: Option<Waker>,
    /// Streams waiting for `out` to drain below [`OUT_LIMIT`].
    blocked: Vec<Waker>,
    /// Why the link ended, once it has.
    dead: Option<io::ErrorKind>,
    /// A `GOAWAY` was sent (listener) or received (dialler) with this last stream id.
    going_away: Option<u32>,
    /// Dialler: the next stream id. Listener: the highest id opened so far.
    ids: u32,
    /// Dialler: the next key of a stream that has sent nothing yet (see [`UNSENT`]).
    unsent: u32,
    /// Listener: streams opened and not yet taken by [`Link::accept`].
    incoming: VecDeque<u32>,
    acceptor: Option<Waker>,
    /// When the last stream closed (for the dialler's idle timeout).
    emptied: tokio::time::Instant,
    /// Writes so far, in [`LINK_WRITES`]' measure.
    written: u64,
    /// Bytes this end may still send, over all its streams.
    link_credit: u32,
    /// Bytes received and not read yet, over all streams.
    unread: usize,
    /// Bytes read (or dropped unread) and not yet granted back to the link.
    link_unacked: u32,
    /// When the peer was last heard from (a read of any bytes).
    heard: tokio::time::Instant,
    /// When a `PING` went out, if one did since then.
    pinged: Option<tokio::time::Instant>,
    /// [`PING_AFTER`] and [`PING_TIMEOUT`] (shorter in tests).
    ping_after: Duration,
    ping_timeout: Duration,
}

/// One stream's state at one end.
#[derive(Debug, Default)]
struct Slot {
    recv: Vec<u8>,
    /// Where the unread bytes of `recv` start.
    pos: usize,
    /// Bytes read by the application and not yet granted back in a `CREDIT`.
    unacked: u32,
    /// Bytes this end may still send.
    credit: u32,
    fin_in: bool,
    fin_out: bool,
    reset: Option<u32>,
    /// Dialler: the listener knows the stream (a frame of it was queued).
    on_wire: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Slot {
    fn new(on_wire: bool) -> Self {
        Self {
            credit: WINDOW,
            on_wire,
            ..Self::default()
        }
    }

    fn unread(&self) -> usize {
        self.recv.len() - self.pos
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

impl State {
    fn new(side: Side) -> Self {
        Self {
            out: Vec::new(),
            streams: HashMap::new(),
            writer: None,
            blocked: Vec::new(),
            dead: None,
            going_away: None,
            ids: if side == Side::Dialler { 1 } else { 0 },
            unsent: UNSENT,
            incoming: VecDeque::new(),
            acceptor: None,
            emptied: tokio::time::Instant::now(),
            written: 0,
            link_credit: LINK_WINDOW,
            unread: 0,
            link_unacked: 0,
            heard: tokio::time::Instant::now(),
            pinged: None,
            ping_after: PING_AFTER,
            ping_timeout: PING_TIMEOUT,
        }
    }

    /// Notes `n` bytes of the link read (or dropped) here, granting them back once there are
    /// enough to be worth a frame.
    fn consumed(&mut self, n: usize) {
        self.link_unacked += n as u32;
        // In eighths of the window: a link carrying many large bodies at once never waits for
        // half of it to be read.
        if self.link_unacked >= LINK_WINDOW / 8 && self.dead.is_none() {
            let grant = std::mem::take(&mut self.link_unacked);
            self.word(CREDIT, 0, grant);
        }
    }

    /// Takes no new stream any more: the dialler opens none on the link and reuses none of its
    /// idle ones; the listener tells the dialler with `GOAWAY` (streams past the last one it
    /// saw are refused). Streams in flight finish; the link closes after the last.
    fn retire(&mut self, side: Side) {
        if self.going_away.is_some() {
            return;
        }
        match side {
            Side::Dialler => self.going_away = Some(u32::MAX),
            Side::Listener => {
                let last = self.ids;
                self.going_away = Some(last);
                self.word(GOAWAY, 0, last);
            }
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// Queues a frame's header (its payload is appended by the caller) and wakes the writer.
    fn frame(&mut self, kind: u8, len: usize, id: u32) {
        if self.out.is_empty()
            && let Some(w) = self.writer.take()
        {
            w.wake();
        }
        let len = (len as u32).to_be_bytes();
        let id = id.to_be_bytes();
        self.out
            .extend_from_slice(&[kind, len[1], len[2], len[3], id[0], id[1], id[2], id[3]]);
    }

    fn word(&mut self, kind: u8, id: u32, value: u32) {
        self.frame(kind, 4, id);
        self.out.extend_from_slice(&value.to_be_bytes());
    }

    /// Ends the link: every stream, the writer and the acceptor learn it.
    fn die(&mut self, kind: io::ErrorKind) {
        if self.dead.is_none() {
            self.dead = Some(kind);
        }
        for slot in self.streams.values_mut() {
            slot.wake();
        }
        for w in self.blocked.drain(..) {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        if let Some(w) = self.acceptor.take() {
            w.wake();
        }
    }

    /// Gives the dialler's stream keyed `key` its id on the wire, if it has none yet (its first
    /// frame is about to be queued, under the same lock): returns the id.
    fn on_wire(&mut self, key: u32) -> u32 {
        if key < UNSENT {
            return key;
        }
        let Some(mut slot) = self.streams.remove(&key) else {
            return key;
        };
        let id = self.ids;
        self.ids += 1;
        slot.on_wire = true;
        self.streams.insert(id, slot);
        id
    }

    /// Handles one frame from the peer. `Err`: the peer broke the protocol.
    fn receive(
        &mut self,
        side: Side,
        kind: u8,
        id: u32,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let word = || -> Result<u32, &'static str> {
            <[u8; 4]>::try_from(payload)
                .map(u32::from_be_bytes)
                .map_err(|_| "bad frame length")
        };
        match kind {
            DATA if payload.is_empty() => return Err("empty data"),
            DATA => {}
            FIN if payload.is_empty() => {}
            RESET | CREDIT | GOAWAY | PING if payload.len() == 4 => {}
            FIN | RESET | CREDIT | GOAWAY | PING => return Err("bad frame length"),
            _ => return Err("unknown frame kind"),
        }
        if kind == DATA
            && self.unread + self.link_unacked as usize + payload.len() > LINK_WINDOW as usize
        {
            return Err("data past the link's window");
        }
        if kind == CREDIT && id == 0 {
            self.link_credit = self
                .link_credit
                .checked_add(word()?)
                .filter(|&c| c <= 2 * LINK_WINDOW)
                .ok_or("credit past the link's window")?;
            for w in self.blocked.drain(..) {
                w.wake();
            }
            return Ok(());
        }
        if kind == GOAWAY {
            let last = word()?;
            self.going_away = Some(last);
            for (&sid, slot) in self.streams.iter_mut() {
                if sid > last {
                    slot.reset = Some(REFUSED);
                    slot.wake();
                }
            }
            return Ok(());
        }
        if kind == PING {
            match id {
                0 => {
                    self.frame(PING, 4, 1);
                    self.out.extend_from_slice(payload);
                }
                // The answer: hearing it was the point.
                1 => {}
                _ => return Err("bad ping id"),
            }
            return Ok(());
        }
        if side == Side::Dialler && id >= UNSENT {
            // No id the dialler gave out: a stream of its own that has sent nothing.
            return Ok(());
        }
        if !self.streams.contains_key(&id) {
            // A new stream: the listener serves it, or refuses it when draining or full.
            if side == Side::Listener && id > self.ids && matches!(kind, DATA | FIN) {
                self.ids = id;
                if self.going_away.is_some() || self.streams.len() >= MAX_STREAMS {
                    self.word(RESET, id, REFUSED);
                    self.consumed(payload.len());
                    return Ok(());
                }
                self.streams.insert(id, Slot::new(true));
                self.incoming.push_back(id);
                if let Some(w) = self.acceptor.take() {
                    w.wake();
                }
            } else {
                // A stream this end closed: bytes for it are answered with a reset (as TCP
                // answers a closed socket), anything else is dropped.
                if kind == DATA {
                    self.word(RESET, id, CLOSED);
                    self.consumed(payload.len());
                }
                return Ok(());
            }
        }
        let Some(slot) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match kind {
            DATA => {
                if slot.fin_in {
                    return Err("data after the end of the stream");
                }
                if slot.unread() + slot.unacked as usize + payload.len() > WINDOW as usize {
                    return Err("data past the window");
                }
                if slot.reset.is_none() {
                    slot.recv.extend_from_slice(payload);
                    self.unread += payload.len();
                } else {
                    self.consumed(payload.len());
                    return Ok(());
                }
            }
            FIN => slot.fin_in = true,
            RESET => {
                // The first reset says why (a refusal stays one).
                let code = word()?;
                slot.reset.get_or_insert(code);
            }
            CREDIT => {
                slot.credit = slot
                    .credit
                    .checked_add(word()?)
                    .filter(|&c| c <= 2 * WINDOW)
                    .ok_or("credit past the window")?;
            }
            _ => return Err("unknown frame kind"),
        }
        slot.wake();
        Ok(())
    }
}

/// A link: one end of a TCP or TLS connection carrying streams. Dropping it does not end the
/// link; its streams and tasks keep it until it closes.
#[derive(Clone, Debug)]
pub struct Link {
    shared: Arc<Shared>,
}

impl Link {
    /// Runs a link over `io` (the prefaces exchanged), whose first bytes after them are
    /// `read` (already read from it). A dialler's link closes once it has had no stream for
    /// `idle`.
    fn start<S>(io: S, read: Vec<u8>, side: Side, idle: Duration, tag: u64) -> Link
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(side)),
            side,
            tag,
        });
        let (reader, writer) = tokio::io::split(io);
        tokio::spawn(read_frames(shared.clone(), reader, read));
        tokio::spawn(write_frames(shared.clone(), writer, idle));
        Link { shared }
    }

    /// The dialler's end of a link over `io`, a fresh connection to a listener: sends the
    /// preface and reads the listener's. `Ok(Err(io))`: the listener does not speak the link.
    /// `tag` (the dialler's TLS generation) tells links dialled before a change.
    pub async fn dial<S>(mut io: S, idle: Duration, tag: u64) -> io::Result<Result<Link, S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        io.write_all(PREFACE).await?;
        io.flush().await?;
        let mut answer = [0u8; PREFACE.len()];
        let mut got = 0;
        while got < answer.len() {
            let n = io.read(&mut answer[got..]).await?;
            if n == 0 || answer[got..got + n] != PREFACE[got..got + n] {
                return Ok(Err(io));
            }
            got += n;
        }
        Ok(Ok(Link::start(io, Vec::new(), Side::Dialler, idle, tag)))
    }

    /// The listener's end of a link over `io`, whose first bytes `read` start with the
    /// dialler's [`PREFACE`]: answers it and serves the link. A link with no stream for `idle`
    /// goes away and closes (a dialler closes its own idle links sooner).
    pub async fn listen<S>(mut io: S, mut read: Vec<u8>, idle: Duration) -> io::Result<Link>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        io.write_all(PREFACE).await?;
        io.flush().await?;
        read.drain(..PREFACE.len().min(read.len()));
        Ok(Link::start(io, read, Side::Listener, idle, 0))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Whether new streams may be opened on this link (dialler): it is up, the listener is not
    /// draining, and it has room.
    pub fn usable(&self) -> bool {
        let state = self.lock();
        state.dead.is_none()
            && state.going_away.is_none()
            && state.streams.len() < MAX_STREAMS
            && state.ids < UNSENT - MAX_STREAMS as u32
    }

    /// A new stream on this (dialler's) link; `None` when it is not [`usable`](Self::usable).
    pub fn open(&self) -> Option<Stream> {
        let mut state = self.lock();
        if state.dead.is_some()
            || state.going_away.is_some()
            || state.streams.len() >= MAX_STREAMS
            || state.ids >= UNSENT - MAX_STREAMS as u32
        {
            return None;
        }
        // Keyed apart until its first frame gives it an id on the wire.
        let mut key = state.unsent;
        while state.streams.contains_key(&key) {
            key = UNSENT | key.wrapping_add(1);
        }
        state.unsent = UNSENT | key.wrapping_add(1);
        state.streams.insert(key, Slot::new(false));
        Some(Stream {
            shared: self.shared.clone(),
            id: key,
        })
    }

    /// The next stream the dialler opened (listener); `None` once the link has ended.
    pub async fn accept(&self) -> Option<Stream> {
        poll_fn(|cx| {
            let mut state = self.lock();
            if let Some(id) = state.incoming.pop_front() {
                return Poll::Ready(Some(Stream {
                    shared: self.shared.clone(),
                    id,
                }));
            }
            if state.dead.is_some() {
                return Poll::Ready(None);
            }
            state.acceptor = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Starts the listener's drain: the dialler opens no more streams here (those it opened
    /// and this end has not seen are refused), and the link closes when its last stream does.
    pub fn go_away(&self) {
        self.lock().retire(self.shared.side);
    }

    /// The tag the dialler gave the link.
    pub fn tag(&self) -> u64 {
        self.shared.tag
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The link's reader task: reads frames and hands them to their streams until the connection
/// ends or the peer breaks the protocol.
async fn read_frames<R: AsyncRead>(shared: Arc<Shared>, reader: R, mut buf: Vec<u8>) {
    let mut reader = pin!(reader);
    // Small until reads fill it: an idle link holds a few KiB, not a read's worth.
    buf.reserve(FIRST_READ);
    let ended = loop {
        // Every whole frame read, under one lock.
        let mut at = 0;
        let broken = {
            let mut state = lock(&shared);
            state.heard = tokio::time::Instant::now();
            state.pinged = None;
            let mut broken = None;
            while buf.len() - at >= HEADER {
                let h = &buf[at..at + HEADER];
                let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
                if len > MAX_FRAME {
                    broken = Some("frame too large");
                    break;
                }
                if buf.len() - at < HEADER + len {
                    break;
                }
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let payload = &buf[at + HEADER..at + HEADER + len];
                if let Err(reason) = state.receive(shared.side, h[0], id, payload) {
                    broken = Some(reason);
                    break;
                }
                at += HEADER + len;
            }
            if state.out.len() > ANSWERS_LIMIT {
                broken = broken.or(Some("the peer reads none of the answers it asks for"));
            }
            broken
        };
        if let Some(reason) = broken {
            tracing::debug!(
                reason,
                "mesh link peer broke the protocol; closing the link"
            );
            break io::ErrorKind::InvalidData;
        }
        // What is left is the start of a frame: moved to the front, so the buffer never
        // grows past one read and one frame.
        buf.drain(..at);
        if buf.is_empty() && buf.capacity() > FIRST_READ && lock(&shared).streams.is_empty() {
            buf = Vec::with_capacity(FIRST_READ);
        }
        let room = buf.capacity() - buf.len();
        if room < FIRST_READ / 2 {
            // Room for a read, and for the rest of a frame larger than the buffer.
            buf.reserve(FIRST_READ.max(buf.len()));
        }
        let room = buf.capacity() - buf.len();
        match reader.read_buf(&mut buf).await {
            Ok(0) => break io::ErrorKind::UnexpectedEof,
            // A read that filled the buffer: more room next time, up to a read's worth.
            Ok(n) if n == room && buf.capacity() < READ_SIZE + HEADER + MAX_FRAME => {
                buf.reserve(buf.capacity());
            }
            Ok(_) => {}
            Err(e) => break e.kind(),
        }
    };
    lock(&shared).die(ended);
}

/// What the writer task does next.
enum Next {
    Write,
    Close,
}

/// The link's writer task: writes the queued frames, each batch in one write, until the link
/// ends; a link with no stream for `idle`, or a listener's gone away and drained of its
/// streams, is closed.
async fn write_frames<W: AsyncWrite>(shared: Arc<Shared>, writer: W, idle: Duration) {
    let mut writer = pin!(writer);
    let mut batch: Vec<u8> = Vec::new();
    // Armed while a dialler's link has no stream.
    let idle = idle.min(Duration::from_secs(86_400));
    let mut timer = pin!(tokio::time::sleep(idle));
    loop {
        // Woken by the first frame queued after a write: the streams that run before this
        // task add theirs, and the batch goes out in one write.
        let next = poll_fn(|cx| {
            let mut state = lock(&shared);
            if state.dead.is_some() {
                return Poll::Ready(Next::Close);
            }
            if !state.out.is_empty() {
                std::mem::swap(&mut state.out, &mut batch);
                for w in state.blocked.drain(..) {
                    w.wake();
                }
                return Poll::Ready(Next::Write);
            }
            if !state.streams.is_empty() {
                // Keepalive: a ping after a quiet spell (or at once, the first stream after
                // one), the end if the ping is not answered.
                let at = match state.pinged {
                    Some(pinged) => pinged + state.ping_timeout,
                    None => state.heard + state.ping_after,
                };
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    if state.pinged.is_some() {
                        tracing::debug!("mesh link peer silent past its ping; closing the link");
                        state.die(io::ErrorKind::TimedOut);
                        return Poll::Ready(Next::Close);
                    }
                    state.pinged = Some(tokio::time::Instant::now());
                    state.frame(PING, 4, 0);
                    state.out.extend_from_slice(&[0; 4]);
                    std::mem::swap(&mut state.out, &mut batch);
                    return Poll::Ready(Next::Write);
                }
            } else {
                if state.going_away.is_some() && shared.side == Side::Listener {
                    return Poll::Ready(Next::Close);
                }
                let at = state.emptied + idle;
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    match shared.side {
                        Side::Dialler => return Poll::Ready(Next::Close),
                        // Told first, so that no stream is opened as the link closes; it
                        // closes once the GOAWAY is written.
                        Side::Listener => {
                            state.retire(Side::Listener);
                            std::mem::swap(&mut state.out, &mut batch);
                            return Poll::Ready(Next::Write);
                        }
                    }
                }
            }
            state.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        match next {
            Next::Close => break,
            Next::Write => {
                let written = async {
                    writer.write_all(&batch).await?;
                    writer.flush().await
                };
                if let Err(e) = while_heard(&shared, written).await {
                    lock(&shared).die(e.kind());
                    break;
                }
                let mut state = lock(&shared);
                state.written += 1 + batch.len() as u64 / 8192;
                if state.written >= LINK_WRITES {
                    state.retire(shared.side);
                }
                drop(state);
                batch.clear();
                if batch.capacity() > 4 * OUT_LIMIT {
                    batch = Vec::new();
                }
            }
        }
    }
    lock(&shared).die(io::ErrorKind::ConnectionAborted);
    let _ = writer.shutdown().await;
}

/// `write`, unless it cannot finish while the peer says nothing for as long as a ping is
/// given (a peer whose host vanished takes no bytes and sends none).
async fn while_heard(
    shared: &Shared,
    write: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    let mut write = pin!(write);
    let started = tokio::time::Instant::now();
    let silent_after =
        |state: &State| state.heard.max(started) + state.ping_after + state.ping_timeout;
    loop {
        let silent = silent_after(&lock(shared));
        match tokio::time::timeout_at(silent, write.as_mut()).await {
            Ok(written) => return written,
            Err(_) if silent_after(&lock(shared)) <= silent => {
                tracing::debug!("mesh link peer silent with a write pending; closing the link");
                return Err(io::ErrorKind::TimedOut.into());
            }
            Err(_) => {}
        }
    }
}

// === Stream ===

/// One stream of a link: a byte stream as a TCP connection is. Dropped, it is closed: a `FIN`
/// if this end had not sent one (bytes the peer sends after are answered with a reset).
#[derive(Debug)]
pub struct Stream {
    shared: Arc<Shared>,
    id: u32,
}

impl Stream {
    /// Whether an idle (pooled) stream can carry a request: the link is up and not draining,
    /// and the peer has neither closed the stream nor sent a stray byte.
    pub fn is_open(&self) -> bool {
        let state = lock(&self.shared);
        state.dead.is_none()
            && state.going_away.is_none()
            && state
                .streams
                .get(&self.id)
                .is_some_and(|s| !s.fin_in && s.reset.is_none() && s.unread() == 0)
    }

    /// The tag of the stream's link (see [`Link::dial`]).
    pub fn tag(&self) -> u64 {
        self.shared.tag
    }

    /// Resolves once a read would not wait: bytes came, or the stream or the link ended.
    pub async fn readable(&self) {
        poll_fn(|cx| {
            let mut state = lock(&self.shared);
            let dead = state.dead.is_some();
            match state.streams.get_mut(&self.id) {
                Some(slot)
                    if slot.unread() == 0 && !slot.fin_in && slot.reset.is_none() && !dead =>
                {
                    slot.reader = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        })
        .await
    }

    fn error(kind: io::ErrorKind, reset: Option<u32>) -> io::Error {
        match reset {
            Some(REFUSED) => io::Error::new(io::ErrorKind::ConnectionRefused, Refused),
            Some(_) => io::Error::new(io::ErrorKind::ConnectionReset, "stream reset by the peer"),
            None => io::Error::new(kind, "mesh link closed"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = lock(&self.shared);
        let dead = state.dead;
        let Some(slot) = state.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if slot.unread() > 0 {
            let n = slot.unread().min(buf.remaining());
            buf.put_slice(&slot.recv[slot.pos..slot.pos + n]);
            slot.pos += n;
            if slot.pos == slot.recv.len() {
                slot.pos = 0;
                slot.recv.clear();
                if slot.recv.capacity() > KEEP_RECV {
                    slot.recv = Vec::new();
                }
            }
            slot.unacked += n as u32;
            let grant = slot.unacked;
            let more = !slot.fin_in && slot.reset.is_none();
            if grant >= WINDOW / 2 && more {
                slot.unacked = 0;
                state.word(CREDIT, self.id, grant);
            }
            state.unread -= n;
            state.consumed(n);
            return Poll::Ready(Ok(()));
        }
        // The peer's end of stream comes before a reset that followed it (the answer to bytes
        // sent as it closed, as on a TCP connection closed while idle).
        if slot.fin_in {
            return Poll::Ready(Ok(()));
        }
        if slot.reset.is_some() || dead.is_some() {
            let reset = slot.reset;
            return Poll::Ready(Err(Self::error(
                dead.unwrap_or(io::ErrorKind::ConnectionReset),
                reset,
            )));
        }
        slot.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let mut guard = lock(&this.shared);
        // The state itself, so that a stream's slot and the link's fields borrow apart.
        let state = &mut *guard;
        let dead = state.dead;
        let full = state.out.len() >= OUT_LIMIT;
        let Some(slot) = state.streams.get(&this.id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let ready = dead.is_none()
            && slot.reset.is_none()
            && !slot.fin_out
            && slot.credit > 0
            && !full
            && state.link_credit > 0;
        if ready {
            this.id = state.on_wire(this.id);
        }
        let Some(slot) = state.streams.get_mut(&this.id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if let Some(kind) = dead {
            return Poll::Ready(Err(Self::error(kind, slot.reset)));
        }
        if slot.reset.is_some() {
            return Poll::Ready(Err(Self::error(io::ErrorKind::ConnectionReset, slot.reset)));
        }
        if slot.fin_out {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if slot.credit == 0 {
            slot.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(slot.credit as usize).min(MAX_FRAME);
        if full || state.link_credit == 0 {
            state.blocked.push(cx.waker().clone());
            return Poll::Pending;
        }
        let n = n.min(state.link_credit as usize);
        state.link_credit -= n as u32;
        slot.credit -= n as u32;
        state.frame(DATA, n, this.id);
        state.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The link's writer sends what was queued as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = lock(&this.shared);
        let Some(slot) = state.streams.get_mut(&this.id) else {
            return Poll::Ready(Ok(()));
        };
        if slot.fin_out || slot.reset.is_some() {
            return Poll::Ready(Ok(()));
        }
        slot.fin_out = true;
        // A stream that never sent a byte ends without a frame: the listener never knew it.
        if this.id < UNSENT {
            state.frame(FIN, 0, this.id);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        let Some(slot) = state.streams.remove(&self.id) else {
            return;
        };
        // Bytes it never read are the link's again.
        let unread = slot.unread();
        if unread > 0 {
            state.unread -= unread;
            state.consumed(unread);
        }
        if slot.on_wire && !slot.fin_out && slot.reset.is_none() && state.dead.is_none() {
            state.frame(FIN, 0, self.id);
        }
        if state.streams.is_empty() {
            state.emptied = tokio::time::Instant::now();
            if let Some(w) = state.writer.take() {
                w.wake();
            }
        }
    }
}

// === Links ===

/// A dialler's links, per listener address, and the listeners found not to speak the link.
/// Cheap to clone: one shared map.
///
/// One link is dialled to a listener at a time: requests that find no link with room while
/// one is being dialled wait for it (see [`reach`](Self::reach)), so a burst of first requests
/// makes one link, not one each.
#[derive(Clone, Debug, Default)]
pub struct Links {
    inner: Arc<Mutex<LinksInner>>,
}

#[derive(Debug, Default)]
struct LinksInner {
    links: HashMap<std::net::SocketAddr, Vec<Link>>,
    /// Listeners that answered the preface with something else, and until when they are
    /// dialled without it.
    plain: HashMap<std::net::SocketAddr, tokio::time::Instant>,
    /// The link being dialled to each listener, if any.
    dialling: HashMap<std::net::SocketAddr, Arc<Dialling>>,
}

/// A link being dialled, as the requests waiting for it see it.
#[derive(Debug, Default)]
struct Dialling {
    /// Set (under the links' lock) once the dial has ended.
    done: std::sync::atomic::AtomicBool,
    /// Whether it ended with a link added.
    linked: std::sync::atomic::AtomicBool,
    ended: tokio::sync::Notify,
}

/// How a request reaches a listener (see [`Links::reach`]).
#[derive(Debug)]
pub enum Reach {
    /// On a new stream of a link already open.
    Stream(Stream),
    /// On a link the caller dials: it connects and hands the connection to [`Dial::join`].
    Dial(Dial),
    /// The listener does not speak the link: on a connection of its own.
    Plain,
}

/// The right (and duty) to dial a link to a listener: while it is held, other requests to the
/// listener wait for it. Dropped without [`join`](Self::join) (the connection failed), the
/// waiting requests dial their own.
#[derive(Debug)]
pub struct Dial {
    links: Links,
    addr: std::net::SocketAddr,
    tag: u64,
    /// The entry waiting requests see (`None`: a dial of the caller's own after a failed one).
    dialling: Option<Arc<Dialling>>,
}

/// How long a listener that does not speak the link is dialled without it before it is asked
/// again (it may have been upgraded).
const PLAIN_FOR: Duration = Duration::from_secs(60);

impl LinksInner {
    /// A new stream to `addr` on a link already open to it, if one can take it. Links dialled
    /// with another `tag` (before the certificate changed) are retired.
    fn stream(&mut self, addr: std::net::SocketAddr, tag: u64) -> Option<Stream> {
        let links = self.links.get_mut(&addr)?;
        for link in links.iter().filter(|l| l.tag() != tag) {
            link.lock().retire(Side::Dialler);
        }
        links.retain(Link::usable);
        links.iter().find_map(Link::open)
    }

    fn speaks(&mut self, addr: std::net::SocketAddr) -> bool {
        match self.plain.get(&addr) {
            Some(&until) if tokio::time::Instant::now() < until => false,
            Some(_) => {
                self.plain.remove(&addr);
                true
            }
            None => true,
        }
    }
}

impl Links {
    fn lock(&self) -> MutexGuard<'_, LinksInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How a request with TLS generation `tag` reaches the listener at `addr`: on a stream of
    /// a link with room; else, when another request is dialling a link to it, on that link
    /// once it is up (or on a dial of its own if that one failed); else by dialling one.
    /// The wait is as long as the caller's: bound it with the request's deadline.
    pub async fn reach(&self, addr: std::net::SocketAddr, tag: u64) -> Reach {
        let mut after_failure = false;
        loop {
            let dialling = {
                let mut inner = self.lock();
                if let Some(stream) = inner.stream(addr, tag) {
                    return Reach::Stream(stream);
                }
                if !inner.speaks(addr) {
                    return Reach::Plain;
                }
                match inner.dialling.get(&addr) {
                    Some(dialling) if !after_failure => dialling.clone(),
                    // Another failed dial may be under way; this request does not wait for it.
                    Some(_) => return Reach::Dial(self.dial(addr, tag, None)),
                    None => {
                        let dialling = Arc::new(Dialling::default());
                        inner.dialling.insert(addr, dialling.clone());
                        return Reach::Dial(self.dial(addr, tag, Some(dialling)));
                    }
                }
            };
            let ended = dialling.ended.notified();
            let mut ended = pin!(ended);
            ended.as_mut().enable();
            if !dialling.done.load(std::sync::atomic::Ordering::Acquire) {
                ended.await;
            }
            // A new link (its room may be taken already: then the next dial is waited for
            // likewise); a failed dial: this request dials its own, with no one waiting on it.
            after_failure = !dialling.linked.load(std::sync::atomic::Ordering::Acquire);
        }
    }

    fn dial(&self, addr: std::net::SocketAddr, tag: u64, dialling: Option<Arc<Dialling>>) -> Dial {
        Dial {
            links: self.clone(),
            addr,
            tag,
            dialling,
        }
    }

    /// Notes that `addr` answered the preface with something else.
    fn refused_by(&self, addr: std::net::SocketAddr) {
        let until = tokio::time::Instant::now() + PLAIN_FOR;
        self.lock().plain.insert(addr, until);
    }

    /// Keeps `link`, just dialled to `addr`, and opens its first stream.
    fn add(&self, addr: std::net::SocketAddr, link: Link) -> Option<Stream> {
        let stream = link.open();
        let mut inner = self.lock();
        // Endpoints whose links all closed are forgotten as links are added.
        inner.links.retain(|_, links| {
            links.retain(Link::usable);
            !links.is_empty()
        });
        inner.links.entry(addr).or_default().push(link);
        stream
    }
}

impl Dial {
    /// The first stream of a new link over `io`, a connection just made to the listener.
    /// Waits for the listener's preface as long as the caller does: a listener that is
    /// restarting on its socket answers once it is up, as it would answer a request on a
    /// connection of its own. `Ok(None)`: the listener does not speak the link (`io` is
    /// dropped); the caller connects as it would without it, and so do those waiting.
    pub async fn join<S>(self, io: S, idle: Duration) -> io::Result<Option<Stream>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = self.addr;
        match Link::dial(io, idle, self.tag).await? {
            Ok(link) => {
                let stream = self.links.add(addr, link);
                if let Some(dialling) = &self.dialling {
                    dialling
                        .linked
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                stream
                    .map(Some)
                    .ok_or_else(|| io::Error::other("new mesh link closed"))
            }
            Err(_) => {
                tracing::debug!(%addr, "peer does not speak the mesh link; connecting plainly");
                self.links.refused_by(addr);
                Ok(None)
            }
        }
    }
}

impl Drop for Dial {
    fn drop(&mut self) {
        let Some(dialling) = self.dialling.take() else {
            return;
        };
        {
            let mut inner = self.links.lock();
            if inner
                .dialling
                .get(&self.addr)
                .is_some_and(|d| Arc::ptr_eq(d, &dialling))
            {
                inner.dialling.remove(&self.addr);
            }
            dialling
                .done
                .store(true, std::sync::atomic::Ordering::Release);
        }
        dialling.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A link over loopback TCP: the dialler's end and the listener's.
    async fn linked() -> (Link, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialler, listener) = tokio::join!(
            dial_to(addr, Duration::from_secs(30)),
            listen_once(listener)
        );
        (dialler.unwrap(), listener)
    }

    /// The listener's end of the first connection `listener` accepts, once it sent the preface.
    async fn listen_once(listener: TcpListener) -> Link {
        listen_idle(listener, Duration::from_secs(30)).await
    }

    /// [`listen_once`], the link closed once it has had no stream for `idle`.
    async fn listen_idle(listener: TcpListener, idle: Duration) -> Link {
        let (mut served, _) = listener.accept().await.unwrap();
        let mut first = vec![0u8; PREFACE.len()];
        served.read_exact(&mut first).await.unwrap();
        Link::listen(served, first, idle).await.unwrap()
    }

    /// The dialler's end of a link to `addr` (`Err`: `addr` answered something else).
    async fn dial_to(addr: std::net::SocketAddr, idle: Duration) -> Result<Link, TcpStream> {
        let io = TcpStream::connect(addr).await.unwrap();
        Link::dial(io, idle, 0).await.unwrap()
    }

    /// A listener's address, and its first connection once it has read the dialler's preface
    /// and answered `answer` (the preface, for frames written by hand, or something else).
    async fn raw_listener(
        answer: &'static [u8],
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut p = vec![0u8; PREFACE.len()];
            conn.read_exact(&mut p).await.unwrap();
            conn.write_all(answer).await.unwrap();
            conn
        });
        (addr, peer)
    }

    /// A raw connection that has exchanged the prefaces with a listener's end (for frames
    /// written by hand), and that end.
    async fn raw_dialler() -> (TcpStream, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut raw = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut served, _) = listener.accept().await.unwrap();
        raw.write_all(PREFACE).await.unwrap();
        let mut first = vec![0u8; PREFACE.len()];
        served.read_exact(&mut first).await.unwrap();
        let link = Link::listen(served, first, Duration::from_secs(30))
            .await
            .unwrap();
        // The link is up before a test sends it anything.
        raw.write_all(&frame(CREDIT, 99, &1u32.to_be_bytes()))
            .await
            .unwrap();
        let mut answer = vec![0u8; PREFACE.len()];
        raw.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, PREFACE);
        (raw, link)
    }

    fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![kind, len[1], len[2], len[3]];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Reads frames from `raw` until one of `kind` comes: its stream id and payload.
    async fn next_frame(raw: &mut TcpStream, kind: u8) -> (u32, Vec<u8>) {
        loop {
            let mut h = [0u8; HEADER];
            raw.read_exact(&mut h).await.unwrap();
            let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            let mut payload = vec![0u8; len];
            raw.read_exact(&mut payload).await.unwrap();
            if h[0] == kind {
                return (u32::from_be_bytes([h[4], h[5], h[6], h[7]]), payload);
            }
        }
    }

    /// Waits (bounded) until `done`.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 5 s");
    }

    #[tokio::test]
    async fn streams_carry_their_own_bytes_both_ways_with_half_close_and_end_of_stream() {
        let (dialler, listener) = linked().await;
        let server = tokio::spawn(async move {
            let mut echoes = Vec::new();
            while let Some(mut stream) = listener.accept().await {
                echoes.push(tokio::spawn(async move {
                    // Everything until the dialler's half-close, then the bytes back reversed.
                    let mut got = Vec::new();
                    stream.read_to_end(&mut got).await.unwrap();
                    got.reverse();
                    stream.write_all(&got).await.unwrap();
                    stream.shutdown().await.unwrap();
                }));
                if echoes.len() == 3 {
                    break;
                }
            }
            for e in echoes {
                e.await.unwrap();
            }
        });
        let sizes = [1, 100_000, 3 * WINDOW as usize];
        let mut calls = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let mut stream = dialler.open().unwrap();
            calls.push(tokio::spawn(async move {
                let sent: Vec<u8> = (0..size).map(|j| (i * 7 + j) as u8).collect();
                stream.write_all(&sent).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut back = Vec::new();
                stream.read_to_end(&mut back).await.unwrap();
                back.reverse();
                assert!(back == sent, "stream {i} got its own {size} bytes back");
            }));
        }
        for call in calls {
            call.await.unwrap();
        }
        server.await.unwrap();
        assert!(dialler.lock().streams.is_empty());
    }

    #[tokio::test]
    async fn streams_that_write_in_another_order_than_they_were_opened_are_all_served() {
        let (dialler, listener) = linked().await;
        let mut first = dialler.open().unwrap();
        let mut second = dialler.open().unwrap();
        second.write_all(b"second").await.unwrap();
        first.write_all(b"first").await.unwrap();
        for want in [&b"second"[..], b"first"] {
            let mut served = listener.accept().await.unwrap();
            let mut got = vec![0u8; want.len()];
            served.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want);
            served.write_all(b"ok").await.unwrap();
        }
        for stream in [&mut first, &mut second] {
            let mut ok = [0u8; 2];
            stream.read_exact(&mut ok).await.unwrap();
            assert_eq!(&ok, b"ok");
        }
    }

    #[tokio::test]
    async fn a_reader_that_does_not_read_holds_back_its_own_stream_only() {
        let (dialler, listener) = linked().await;
        let mut big = dialler.open().unwrap();
        let writer = tokio::spawn(async move {
            big.write_all(&vec![7u8; 4 * WINDOW as usize])
                .await
                .unwrap();
            big
        });
        let mut held = listener.accept().await.unwrap();
        // The sender stops at its window: what the listener buffers unread stays within it.
        until(|| {
            let state = listener.lock();
            state
                .streams
                .values()
                .any(|s| s.unread() == WINDOW as usize)
        })
        .await;
        assert!(!writer.is_finished(), "the writer waits for credit");
        // Another stream still passes both ways.
        let mut other = dialler.open().unwrap();
        other.write_all(b"ping").await.unwrap();
        let mut served = listener.accept().await.unwrap();
        let mut ping = [0u8; 4];
        served.read_exact(&mut ping).await.unwrap();
        served.write_all(b"pong").await.unwrap();
        other.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"pong");
        // Reading releases the writer; every byte arrives.
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while total < 4 * WINDOW as usize {
            let n = held.read(&mut buf).await.unwrap();
            assert!(buf[..n].iter().all(|&b| b == 7));
            total += n;
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn unread_streams_hold_the_link_at_its_window_and_closing_them_frees_it() {
        let (dialler, listener) = linked().await;
        let streams = LINK_WINDOW as usize / WINDOW as usize + 4;
        let writers: Vec<_> = (0..streams)
            .map(|_| {
                let mut stream = dialler.open().unwrap();
                tokio::spawn(async move {
                    stream.write_all(&vec![1u8; WINDOW as usize]).await.unwrap();
                    stream
                })
            })
            .collect();
        let mut held = Vec::new();
        while held.len() < LINK_WINDOW as usize / WINDOW as usize {
            held.push(listener.accept().await.unwrap());
        }
        // Nothing is read: the listener holds a link's window and no more.
        until(|| listener.lock().unread == LINK_WINDOW as usize).await;
        let done = writers.iter().filter(|w| w.is_finished()).count();
        assert!(done < streams, "{done} of {streams} writers done");
        // Closing the unread streams gives their bytes back: every writer finishes.
        held.clear();
        for writer in writers {
            tokio::time::timeout(Duration::from_secs(5), writer)
                .await
                .expect("the writer finished")
                .unwrap();
        }
        assert!(listener.lock().unread <= LINK_WINDOW as usize);
    }

    #[tokio::test]
    async fn a_listener_that_goes_away_keeps_open_streams_refuses_new_ones_and_closes_after_the_last()
     {
        let (mut raw, listener) = raw_dialler().await;
        raw.write_all(&frame(DATA, 1, b"first")).await.unwrap();
        let mut first = listener.accept().await.unwrap();
        listener.go_away();
        let (_, last) = next_frame(&mut raw, GOAWAY).await;
        assert_eq!(last, 1u32.to_be_bytes());
        // A stream the dialler opened before it saw the GOAWAY is refused.
        raw.write_all(&frame(DATA, 2, b"late")).await.unwrap();
        let (id, code) = next_frame(&mut raw, RESET).await;
        assert_eq!((id, code), (2, REFUSED.to_be_bytes().to_vec()));
        // The open one still works both ways.
        let mut got = [0u8; 5];
        first.read_exact(&mut got).await.unwrap();
        first.write_all(b"answer").await.unwrap();
        let (id, data) = next_frame(&mut raw, DATA).await;
        assert_eq!((id, data.as_slice()), (1, &b"answer"[..]));
        // Its end closes the link.
        drop(first);
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest).await;
        assert!(listener.accept().await.is_none());
    }

    #[tokio::test]
    async fn a_dialler_learns_a_refusal_and_a_going_away_link_takes_no_new_stream() {
        let (dialler, listener) = linked().await;
        let mut s = dialler.open().unwrap();
        s.write_all(b"x").await.unwrap();
        let _served = listener.accept().await.unwrap();
        listener.go_away();
        until(|| !dialler.usable()).await;
        assert!(dialler.open().is_none());
        assert!(
            !s.is_open(),
            "a pooled stream of a going-away link is not reused"
        );
        // A refused stream's error says so.
        let (addr, peer) = raw_listener(PREFACE).await;
        let other = dial_to(addr, Duration::from_secs(5)).await.unwrap();
        let mut conn = peer.await.unwrap();
        let mut s = other.open().unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (id, _) = next_frame(&mut conn, DATA).await;
        conn.write_all(&frame(RESET, id, &REFUSED.to_be_bytes()))
            .await
            .unwrap();
        // Later resets for the same stream do not change why it ended.
        conn.write_all(&frame(RESET, id, &CLOSED.to_be_bytes()))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let error = s.read(&mut buf).await.unwrap_err();
        assert!(is_refused(&error), "{error:?}");
    }

    #[tokio::test]
    async fn a_peer_that_breaks_the_framing_or_its_window_loses_the_link() {
        for bad in [
            frame(9, 1, b""),
            frame(CREDIT, 1, b"12"),
            frame(PING, 0, b"12"),
            frame(PING, 2, b"ping"),
            // One more byte than the window, in frames of the largest size.
            (0..=WINDOW as usize / MAX_FRAME)
                .flat_map(|_| frame(DATA, 1, &[1u8; MAX_FRAME]))
                .collect(),
            // A stream's window on each of more streams than the link's window holds.
            (1..=LINK_WINDOW / WINDOW + 1)
                .flat_map(|id| {
                    (0..WINDOW as usize / MAX_FRAME)
                        .flat_map(move |_| frame(DATA, id, &[1u8; MAX_FRAME]))
                })
                .collect(),
            {
                let mut f = frame(DATA, 1, b"");
                f[3] = 1;
                f[1] = 0xff;
                f
            },
        ] {
            let (mut raw, listener) = raw_dialler().await;
            raw.write_all(&bad).await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
                .await
                .expect("the listener closed the link");
            until(|| listener.lock().dead.is_some()).await;
        }
    }

    #[tokio::test]
    async fn a_listener_that_answers_http_is_told_apart_from_one_that_speaks_the_link() {
        let (addr, peer) =
            raw_listener(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        let dialled = dial_to(addr, Duration::from_secs(5)).await;
        assert!(dialled.is_err(), "not a link");
        peer.await.unwrap();
        let links = Links::default();
        assert!(matches!(links.reach(addr, 0).await, Reach::Dial(_)));
        links.refused_by(addr);
        assert!(
            matches!(links.reach(addr, 0).await, Reach::Plain),
            "dialled plainly for a while"
        );
    }

    /// Reaches `addr` through `links` as a request would: dials when told to.
    async fn reach_by(links: Links, addr: std::net::SocketAddr) -> Stream {
        match links.reach(addr, 0).await {
            Reach::Stream(stream) => stream,
            Reach::Dial(dial) => {
                let io = TcpStream::connect(addr).await.unwrap();
                dial.join(io, Duration::from_secs(30))
                    .await
                    .unwrap()
                    .unwrap()
            }
            Reach::Plain => panic!("{addr} speaks the link"),
        }
    }

    #[tokio::test]
    async fn a_burst_of_first_requests_dials_one_link_per_stream_limit_and_a_failed_dial_frees_the_waiters()
     {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut served = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut first = vec![0u8; PREFACE.len()];
                conn.read_exact(&mut first).await.unwrap();
                served.push(
                    Link::listen(conn, first, Duration::from_secs(30))
                        .await
                        .unwrap(),
                );
            }
        });
        let links = Links::default();
        // One more request than a link has room for, all at once.
        let burst = (0..=MAX_STREAMS).map(|_| tokio::spawn(reach_by(links.clone(), addr)));
        let streams: Vec<Stream> = futures_util::future::join_all(burst)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(streams.len(), MAX_STREAMS + 1);
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "a link, and a second for the one stream the first had no room for"
        );

        // A dial that fails (dropped before its link is up): the requests waiting on it each
        // dial at once, none waiting for another's.
        drop(streams);
        let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = other.local_addr().unwrap();
        let Reach::Dial(first) = links.reach(addr, 0).await else {
            panic!("no link to {addr} yet");
        };
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let links = links.clone();
                tokio::spawn(async move { links.reach(addr, 0).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "they wait for the dial under way"
        );
        drop(first);
        for waiter in waiting {
            let reach = tokio::time::timeout(Duration::from_secs(10), waiter).await;
            assert!(
                matches!(reach, Ok(Ok(Reach::Dial(_)))),
                "each dials its own: {reach:?}"
            );
        }
    }

    /// A link whose one stream closes after a minute stays usable for the shorter of the two
    /// ends' idle timeouts (in seconds), and is closed just after.
    async fn closes_when_idle(dialler_idle: u64, listener_idle: u64) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(listen_idle(listener, Duration::from_secs(listener_idle)));
        let dialler = dial_to(addr, Duration::from_secs(dialler_idle))
            .await
            .unwrap();
        let listener = accept.await.unwrap();
        // No pings: under paused time, the clock may run past a ping's answer on the wire.
        for end in [&dialler, &listener] {
            end.lock().ping_after = Duration::from_secs(86_400);
        }
        let mut s = dialler.open().unwrap();
        s.write_all(b"x").await.unwrap();
        let served = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(dialler.usable(), "a link with a stream stays");
        drop((s, served));
        let idle = dialler_idle.min(listener_idle);
        tokio::time::sleep(Duration::from_secs(idle - 1)).await;
        assert!(dialler.usable());
        tokio::time::sleep(Duration::from_secs(2)).await;
        until(|| !dialler.usable()).await;
        assert!(
            listener.accept().await.is_none(),
            "the listener saw it close"
        );
    }

    /// Pings after 300 ms of quiet, the end 700 ms after an unanswered one, for `link`.
    fn quick_pings(link: &Link) {
        let mut state = link.lock();
        state.ping_after = Duration::from_millis(300);
        state.ping_timeout = Duration::from_millis(700);
    }

    #[tokio::test]
    async fn a_link_whose_peer_answers_pings_stays_and_one_whose_peer_falls_silent_ends_within_a_ping()
     {
        // A stream open for 3 s with no byte on it: the ends ping and answer.
        let (dialler, listener) = linked().await;
        quick_pings(&dialler);
        quick_pings(&listener);
        let mut s = dialler.open().unwrap();
        s.write_all(b"x").await.unwrap();
        let served = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(dialler.usable() && listener.lock().dead.is_none());
        drop((s, served));

        // A peer that reads every byte and sends none (as a host that vanished, or a process
        // stopped, whose socket still takes bytes): a request waiting on it fails within a
        // ping's wait, and the link takes no more.
        let (addr, peer) = raw_listener(PREFACE).await;
        let silent = dial_to(addr, Duration::from_secs(3600)).await.unwrap();
        quick_pings(&silent);
        let mut conn = peer.await.unwrap();
        let pinged = tokio::spawn(async move {
            let ping = next_frame(&mut conn, PING).await;
            // Read on, answer nothing.
            let mut sink = vec![0u8; 4096];
            while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            ping
        });
        let mut s = silent.open().unwrap();
        let started = tokio::time::Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let error = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error:?}");
        let waited = started.elapsed();
        // A ping after 300 ms of quiet, the end 700 ms later (with room for a busy machine).
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert!(!silent.usable());
        let (id, payload) = pinged.await.unwrap();
        assert_eq!((id, payload.len()), (0, 4), "a ping asks on id 0");
    }

    #[tokio::test]
    async fn a_peer_that_floods_pings_without_reading_the_answers_loses_the_link() {
        let (raw, listener) = raw_dialler().await;
        // Nothing of the answers is read: the socket's buffers fill, then the link's queue.
        let (_unread, mut raw) = raw.into_split();
        let pings: Vec<u8> = (0..4096).flat_map(|_| frame(PING, 0, b"ping")).collect();
        let flood = tokio::spawn(async move {
            // Bounded: 256 MiB of pings at the most.
            for _ in 0..5_000 {
                if raw.write_all(&pings).await.is_err() {
                    return true;
                }
            }
            false
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(30), flood)
                .await
                .expect("the flood was cut off")
                .unwrap(),
            "the listener closed the link"
        );
        until(|| listener.lock().dead.is_some()).await;
        assert_eq!(listener.lock().dead, Some(io::ErrorKind::InvalidData));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dialler_link_with_no_stream_closes_after_its_idle_timeout() {
        closes_when_idle(30, 86_400).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_link_with_no_stream_goes_away_and_closes_after_its_idle_timeout() {
        closes_when_idle(86_400, 10).await;
    }
}
