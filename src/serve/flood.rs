//! The control-frame budget of an HTTP/2 connection: what h2 does not limit by itself.
//!
//! h2 (under hyper's HTTP/2 server) bounds memory against floods of PING and SETTINGS frames
//! by back-pressure (it keeps one answer pending and reads no further until it is written), and
//! it ends a connection with GOAWAY for CONTINUATION floods, header blocks far over
//! `max_header_list_size`, and too many streams reset before they were accepted. It does not end
//! a connection whose client sends PING, SETTINGS, RST_STREAM, PRIORITY or empty DATA frames
//! without end: each costs the server a little work and answers, and no request.
//!
//! [`Metered`] reads the frame headers of a connection's incoming bytes as they pass to hyper
//! (nine bytes per frame; payloads are skipped, never copied) and keeps a budget, in the spirit
//! of Envoy's `max_outbound_control_frames` and NGINX's flood detection:
//!
//! - a connection starts with [`BUDGET`] units, and never holds more;
//! - a PING or SETTINGS (not an acknowledgement), a PRIORITY, an empty DATA frame that does not
//!   end its stream, or a frame of an unknown type costs 1; an RST_STREAM costs 2;
//! - a HEADERS frame (a request, or trailers) earns 1, so a client that cancels up to half of
//!   its requests never runs dry, while a rapid-reset loop (HEADERS then RST_STREAM) loses a
//!   unit a stream;
//! - every KiB of DATA received and every KiB written earns 1 (the pings an HTTP/2 client sends
//!   to size its flow-control window come with data), and time earns [`REFILL_PER_SECOND`]
//!   (keep-alive pings of an idle client).
//!
//! A connection that overdraws its budget is sent GOAWAY (`serve_h2`): no new streams, and
//! those in flight get [`H2_FLOOD_GRACE`](super::H2_FLOOD_GRACE) (10 s, as in a drain) to
//! finish, so a legitimate peer that tripped it keeps the calls it had started. From then on
//! HEADERS earn nothing; a client
//! that runs up a second budget's worth of debt (it flooded on after the GOAWAY) is read no
//! further and closed a second later. WINDOW_UPDATE frames are not charged: h2 handles each in
//! constant time and answers none.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The units a connection starts with and may hold at most.
pub const BUDGET: i64 = 1000;
/// The units a connection earns each second.
pub const REFILL_PER_SECOND: i64 = 10;
/// HTTP/2's client connection preface, which comes before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
/// The last frame type RFC 9113 defines (CONTINUATION).
const LAST_KNOWN: u8 = 9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

/// How far a connection has overdrawn its budget; `serve_h2` waits on it.
#[derive(Debug, Default)]
pub struct Tripwire {
    /// Overdrawn: the connection is to be sent GOAWAY.
    overdrawn: AtomicBool,
    /// Overdrawn by a second budget: it is no longer read, and is to be closed.
    exhausted: AtomicBool,
    notify: Notify,
}

impl Tripwire {
    /// Resolves once the connection has overdrawn its budget.
    pub async fn overdrawn(&self) {
        self.wait(&self.overdrawn).await;
    }

    /// Resolves once the connection has overdrawn a second budget after its GOAWAY.
    pub async fn exhausted(&self) {
        self.wait(&self.exhausted).await;
    }

    async fn wait(&self, flag: &AtomicBool) {
        loop {
            let notified = self.notify.notified();
            if flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn set(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The budget and the frame-header reader of one connection (pure: time is given).
#[derive(Debug)]
pub struct Meter {
    /// Preface bytes still to pass before the first frame.
    preface: usize,
    /// The frame header being read, and how much of it has arrived.
    head: [u8; FRAME_HEADER_LEN],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    tokens: i64,
    /// Bytes of DATA received and written not yet turned into units (below 1 KiB).
    bytes: u64,
    refilled: Instant,
    /// Overdrawn once: HEADERS earn nothing more.
    overdrawn: bool,
}

// === impl Meter ===

impl Meter {
    pub fn new(now: Instant) -> Self {
        Meter {
            preface: PREFACE_LEN,
            head: [0; FRAME_HEADER_LEN],
            have: 0,
            skip: 0,
            tokens: BUDGET,
            bytes: 0,
            refilled: now,
            overdrawn: false,
        }
    }

    /// Reads the frame headers in `bytes` (the connection's next incoming bytes) and charges
    /// them. Returns whether the budget is overdrawn.
    pub fn read(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        self.refill(now);
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER_LEN - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER_LEN {
                    self.have = 0;
                    self.frame();
                }
            }
        }
        self.overdrawn |= self.tokens < 0;
        self.tokens < 0
    }

    /// Whether the connection is a second budget in debt.
    pub fn exhausted(&self) -> bool {
        self.tokens < -BUDGET
    }

    /// Credits `n` bytes the server wrote.
    pub fn wrote(&mut self, n: usize) {
        self.earn_bytes(n as u64);
    }

    fn frame(&mut self) {
        let [l0, l1, l2, kind, flags, ..] = self.head;
        let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        self.skip = len;
        let cost = match kind {
            DATA if len == 0 && flags & END_STREAM == 0 => 1,
            DATA => {
                self.earn_bytes(len as u64);
                0
            }
            HEADERS if self.overdrawn => 0,
            HEADERS => -1,
            PING | SETTINGS if flags & ACK == 0 => 1,
            PING | SETTINGS => 0,
            PRIORITY => 1,
            RST_STREAM => 2,
            kind if kind > LAST_KNOWN => 1,
            _ => 0,
        };
        self.tokens = (self.tokens - cost).min(BUDGET);
    }

    fn earn_bytes(&mut self, n: u64) {
        self.bytes += n;
        let units = self.bytes / 1024;
        self.bytes %= 1024;
        self.tokens = (self.tokens + i64::try_from(units).unwrap_or(BUDGET)).min(BUDGET);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let units = i64::try_from(elapsed.as_secs()).unwrap_or(BUDGET) * REFILL_PER_SECOND;
        if units > 0 {
            self.tokens = (self.tokens + units).min(BUDGET);
            self.refilled += std::time::Duration::from_secs(elapsed.as_secs());
        }
    }
}

/// An HTTP/2 connection's I/O with its [`Meter`]: once exhausted, it reads nothing more.
pub struct Metered<T> {
    inner: T,
    meter: Meter,
    tripwire: Arc<Tripwire>,
    overdrawn: bool,
    exhausted: bool,
}

// === impl Metered ===

impl<T> Metered<T> {
    pub fn new(inner: T) -> (Self, Arc<Tripwire>) {
        let tripwire = Arc::new(Tripwire::default());
        let metered = Metered {
            inner,
            meter: Meter::new(Instant::now()),
            tripwire: tripwire.clone(),
            overdrawn: false,
            exhausted: false,
        };
        (metered, tripwire)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.exhausted {
            // No more of this client's bytes are read: `serve_h2` closes the connection.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            if this.meter.read(&buf.filled()[before..], Instant::now()) && !this.overdrawn {
                this.overdrawn = true;
                this.tripwire.set(&this.tripwire.overdrawn);
            }
            if this.meter.exhausted() {
                this.exhausted = true;
                this.tripwire.set(&this.tripwire.exhausted);
            }
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.meter.wrote(n);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.meter.wrote(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn opened(now: Instant) -> Meter {
        let mut meter = Meter::new(now);
        assert!(!meter.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", now));
        assert!(!meter.read(&frame(SETTINGS, 0, 0, &[]), now));
        meter
    }

    #[test]
    fn a_ping_flood_overdraws_the_budget_within_its_size() {
        let now = Instant::now();
        let mut meter = opened(now);
        let ping = frame(PING, 0, 0, &[0; 8]);
        let tripped_at = (1..=2 * BUDGET).find(|_| meter.read(&ping, now));
        assert_eq!(tripped_at, Some(BUDGET), "the settings frame cost one");
    }

    #[test]
    fn acknowledgements_cost_nothing() {
        let now = Instant::now();
        let mut meter = opened(now);
        let ack = frame(PING, ACK, 0, &[0; 8]);
        let settings_ack = frame(SETTINGS, ACK, 0, &[]);
        for _ in 0..10 * BUDGET {
            assert!(!meter.read(&ack, now));
            assert!(!meter.read(&settings_ack, now));
        }
    }

    #[test]
    fn a_rapid_reset_loop_overdraws_the_budget_but_cancelling_half_the_requests_does_not() {
        let now = Instant::now();
        let headers = frame(HEADERS, 0x5, 1, &[0x82, 0x86, 0x84]);
        let reset = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        let mut meter = opened(now);
        let mut pair = headers.clone();
        pair.extend_from_slice(&reset);
        let tripped = (0..2 * BUDGET).find(|_| meter.read(&pair, now));
        assert!(tripped.is_some_and(|n| n < BUDGET + 1), "{tripped:?}");

        let mut meter = opened(now);
        for _ in 0..100 * BUDGET {
            assert!(!meter.read(&headers, now));
            assert!(!meter.read(&headers, now));
            assert!(!meter.read(&reset, now));
        }
    }

    #[test]
    fn once_overdrawn_requests_earn_nothing_and_a_second_budget_of_debt_exhausts_it() {
        let now = Instant::now();
        let mut meter = opened(now);
        let ping = frame(PING, 0, 0, &[0; 8]);
        let headers = frame(HEADERS, 0x5, 1, &[0x82, 0x86, 0x84]);
        while !meter.read(&ping, now) {}
        for _ in 0..10 * BUDGET {
            meter.read(&headers, now);
        }
        assert!(meter.tokens < 0, "no credit after the overdraft");
        assert!(!meter.exhausted());
        let pings = (1..=2 * BUDGET).find(|_| {
            meter.read(&ping, now);
            meter.exhausted()
        });
        assert_eq!(pings, Some(BUDGET));
    }

    #[test]
    fn frame_headers_split_across_reads_are_read_whole() {
        let now = Instant::now();
        let mut meter = opened(now);
        // A DATA frame with a 20 KiB payload, delivered a byte at a time: the payload is
        // skipped (and earns units), so the pings after it are still told apart.
        let mut bytes = frame(DATA, 0, 1, &[b'P'; 20 * 1024]);
        let ping = frame(PING, 0, 0, &[6; 8]);
        for _ in 0..BUDGET {
            bytes.extend_from_slice(&ping);
        }
        for byte in &bytes {
            assert!(!meter.read(std::slice::from_ref(byte), now));
        }
        assert_eq!(
            meter.tokens, 0,
            "the data refilled the budget; the pings spent it"
        );
        assert!(meter.read(&ping, now));
    }

    #[test]
    fn time_and_data_refill_the_budget_up_to_its_size() {
        let start = Instant::now();
        let mut meter = opened(start);
        let ping = frame(PING, 0, 0, &[0; 8]);
        // A keep-alive ping every second for a day never runs the budget dry.
        for second in 0..86_400 {
            assert!(!meter.read(&ping, start + Duration::from_secs(second)));
        }
        assert_eq!(meter.tokens, BUDGET - 1);
        meter.wrote(1 << 30);
        assert_eq!(meter.tokens, BUDGET, "never more than the budget");
        let empty_data = frame(DATA, 0, 1, &[]);
        let later = start + Duration::from_secs(86_400);
        let tripped_at = (1..=2 * BUDGET).find(|_| meter.read(&empty_data, later));
        assert_eq!(tripped_at, Some(BUDGET + 1));
    }
}
