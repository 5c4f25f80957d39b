//! HTTP/2 abuse against a `skyline agent` process, scripted frame by frame over raw TCP: rapid
//! reset, CONTINUATION floods, SETTINGS and PING floods, oversized header blocks and too many
//! concurrent streams, on both of the agent's HTTP/2 listeners (outbound and inbound).
//!
//! Each case asserts what the user of a shared proxy needs: the abusive connection is told to go
//! away (a GOAWAY frame read back) and closed within a bounded time, the agent's resident memory
//! stays under a bound, and normal requests on other connections (HTTP/1.1 and HTTP/2) made
//! while the abuse runs are answered. Every attack is bounded in frames and in time; no
//! assertion is on timing beyond generous bounds.
//!
//! Frames are encoded by hand (RFC 9113 §4.1); header blocks use HPACK's static table and
//! literals without indexing (RFC 7541 §6.1, §6.2.2), never Huffman.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

// === Frames ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
pub(crate) const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 8;
const REFUSED_STREAM: u32 = 7;
const ENHANCE_YOUR_CALM: u32 = 11;

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24);
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first` (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing whose name is static-table entry `index`.
fn hpack_indexed_name(out: &mut Vec<u8>, index: usize, value: &[u8]) {
    hpack_int(out, 0, 4, index);
    hpack_string(out, value);
}

/// A literal field without indexing with a literal name.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// The header block of a request: `method` is `0x82` (GET) or `0x83` (POST), from the static
/// table; `:scheme http`; `:authority` and `:path` literal.
fn request_block(method: u8, path: &str) -> Vec<u8> {
    let mut block = vec![method, 0x86];
    hpack_indexed_name(&mut block, 1, b"local");
    hpack_indexed_name(&mut block, 4, path.as_bytes());
    block
}

/// The client's opening: the preface and an empty SETTINGS frame.
pub(crate) fn opening() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

/// What the server sent on the abusive connection.
#[derive(Debug, Default)]
pub(crate) struct Read {
    /// GOAWAY's error code and debug data.
    pub(crate) goaway: Option<(u32, String)>,
    /// The last stream the first GOAWAY says the server processed.
    last_stream: Option<u32>,
    /// PING and SETTINGS acknowledgements: the client's control frames the server answered.
    pub(crate) acks: u64,
    /// RST_STREAM frames by error code.
    resets: std::collections::BTreeMap<u32, u64>,
    /// Streams that got response HEADERS, with the block's first byte (`0x88` is `:status 200`).
    responses: Vec<(u32, u8)>,
    /// Streams whose response ended (END_STREAM on HEADERS or DATA).
    ended: Vec<u32>,
    frames: u64,
    /// The connection ended (EOF or reset) before the reader's time ran out.
    closed: bool,
    /// Since the first GOAWAY: how long until the connection ended.
    closed_after_goaway: Option<Duration>,
}

/// Reads and parses frames until the connection ends or `limit` passes.
pub(crate) async fn read_frames(mut read: tokio::net::tcp::OwnedReadHalf, limit: Duration) -> Read {
    let mut seen = Read::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    let mut goaway_at = None;
    loop {
        let n = match tokio::time::timeout_at(deadline, read.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                seen.closed = true;
                break;
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while at + 9 <= buf.len() {
            let len = usize::from(buf[at]) << 16
                | usize::from(buf[at + 1]) << 8
                | usize::from(buf[at + 2]);
            if at + 9 + len > buf.len() {
                break;
            }
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            let stream = u32::from_be_bytes(buf[at + 5..at + 9].try_into().unwrap()) & !(1 << 31);
            let payload = &buf[at + 9..at + 9 + len];
            seen.frames += 1;
            match kind {
                GOAWAY if payload.len() >= 8 && seen.goaway.is_none() => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                    seen.goaway = Some((code, debug));
                    let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    seen.last_stream = Some(last & !(1 << 31));
                    goaway_at = Some(Instant::now());
                }
                PING | SETTINGS if flags & ACK != 0 => seen.acks += 1,
                RST_STREAM if payload.len() == 4 => {
                    let code = u32::from_be_bytes(payload.try_into().unwrap());
                    *seen.resets.entry(code).or_default() += 1;
                }
                HEADERS => {
                    seen.responses
                        .push((stream, payload.first().copied().unwrap_or(0)));
                    if flags & END_STREAM != 0 {
                        seen.ended.push(stream);
                    }
                }
                DATA if flags & END_STREAM != 0 => seen.ended.push(stream),
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
    seen.closed_after_goaway = goaway_at.filter(|_| seen.closed).map(|at| at.elapsed());
    seen
}

// === The agent under attack ===

/// A `skyline agent` process with one node, `local`, and service `web` (an HTTP/1.1 TestApp) on
/// it: requests to either listener reach the application.
struct Agent {
    process: Skyline,
    outbound: std::net::TcpListener,
    inbound: std::net::TcpListener,
    app: TestApp,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start() -> Self {
        let app = TestApp::spawn("web", ip("127.0.0.1"));
        let dir = tempfile::tempdir().unwrap();
        let outbound = supervised_socket("127.0.0.1");
        let inbound = supervised_socket("127.0.0.1");
        let catalog = dir.path().join("catalog.toml");
        write_atomically(
            &catalog,
            &format!(
                "[[node]]\nname = \"local\"\naddress = \"127.0.0.1\"\ninbound_port = {}\n\n\
                 [[service]]\nname = \"web\"\nnode = \"local\"\nport = {}\n",
                port(&inbound),
                app.addr.port()
            ),
        );
        let args = [
            "agent",
            "--node-name",
            "local",
            "--catalog",
            "file",
            "--catalog-file",
            catalog.to_str().unwrap(),
            "--outbound",
            "off",
            "--inbound",
            "off",
            "--admin",
            "off",
        ];
        let mut process = Skyline::start(&args, &[("outbound", &outbound), ("inbound", &inbound)]);
        process.log.wait_for("agent started").await;
        let agent = Agent {
            process,
            outbound,
            inbound,
            app,
            _dir: dir,
        };
        for listener in agent.listeners() {
            until_ok(&format!("http://{listener}/service/web/")).await;
        }
        agent
    }

    fn listeners(&self) -> [SocketAddr; 2] {
        [
            self.outbound.local_addr().unwrap(),
            self.inbound.local_addr().unwrap(),
        ]
    }

    /// The process's resident memory (VmRSS), in KiB.
    fn rss_kib(&self) -> u64 {
        let pid = self.process.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    async fn stop(self) {
        self.process.sigterm();
        self.process.exited_cleanly().await;
        self.app.stop().await;
    }
}

/// One normal request over HTTP/1.1 and one over HTTP/2, each on a new connection to `addr`:
/// the statuses.
async fn normal_requests(addr: SocketAddr, n: u64) -> [u16; 2] {
    let h1 = Client::new()
        .get_result(&format!("http://{addr}/service/web/normal/{n}"))
        .await
        .map_or(0, |r| r.status);
    let h2 = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = Request::get(format!("http://local/service/web/normal-h2/{n}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(req).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    let h2 = tokio::time::timeout(Duration::from_secs(20), h2)
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
    [h1, h2]
}

/// What one attack came to.
#[derive(Debug)]
struct Outcome {
    read: Read,
    /// Batches and bytes the attacker got written before the server stopped it.
    batches: u64,
    bytes: u64,
    /// The agent's resident memory before the attack and its highest sample during it, KiB.
    rss_before: u64,
    rss_peak: u64,
    /// Statuses of the normal requests made on other connections while the attack ran.
    normal: Vec<[u16; 2]>,
}

impl Outcome {
    fn assert_goaway_and_closed(&self, what: &str) {
        assert!(self.read.goaway.is_some(), "{what}: no GOAWAY ({self:?})");
        assert!(
            self.read.closed,
            "{what}: the connection was not closed within the reader's 30 s ({self:?})"
        );
    }

    fn assert_memory_under(&self, what: &str, growth_kib: u64) {
        assert!(
            self.rss_peak.saturating_sub(self.rss_before) < growth_kib,
            "{what}: RSS grew from {} KiB to {} KiB (bound: +{growth_kib} KiB)",
            self.rss_before,
            self.rss_peak
        );
    }

    fn assert_normal_requests_answered(&self, what: &str) {
        assert!(
            !self.normal.is_empty(),
            "{what}: no normal request was made"
        );
        assert!(
            self.normal.iter().all(|s| *s == [200, 200]),
            "{what}: normal requests during the attack: {:?}",
            self.normal
        );
    }
}

/// Opens a connection to `addr` and writes `head`, then `batch(i)` for i in 0..`batches` until
/// the server stops reading or closes it, while normal requests go to `addr` on other
/// connections and the agent's memory is sampled. The writer gets 30 s, the reader 30 s.
async fn attack(
    agent: &Agent,
    addr: SocketAddr,
    head: Vec<u8>,
    batches: u64,
    batch: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> Outcome {
    let rss_before = agent.rss_kib();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let reader = tokio::spawn(read_frames(read, Duration::from_secs(30)));
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let done = done.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut bytes = 0u64;
            let mut sent = 0u64;
            if tokio::time::timeout_at(deadline, write.write_all(&head))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                bytes += head.len() as u64;
                for i in 0..batches {
                    let chunk = batch(i);
                    match tokio::time::timeout_at(deadline, write.write_all(&chunk)).await {
                        Ok(Ok(())) => {
                            bytes += chunk.len() as u64;
                            sent += 1;
                            written.store(sent, Ordering::Relaxed);
                        }
                        // Closed or reset by the server, or it stopped reading.
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
            }
            done.store(true, Ordering::Relaxed);
            // Keep the write half open until the reader is done: closing it would end the
            // connection from our side.
            (sent, bytes, write)
        })
    };
    // Normal requests on other connections while the attack runs: the first once the attack
    // has begun, then every 100 ms until the writer is done (at most 100).
    let mut normal = Vec::new();
    let mut rss_peak = rss_before;
    for _ in 0..200 {
        if written.load(Ordering::Relaxed) > 0 || done.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for n in 0..100 {
        normal.push(normal_requests(addr, n).await);
        rss_peak = rss_peak.max(agent.rss_kib());
        if done.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (batches, bytes, write) = writer.await.unwrap();
    let read = reader.await.unwrap();
    drop(write);
    rss_peak = rss_peak.max(agent.rss_kib());
    // And one more after it, on the same listener.
    normal.push(normal_requests(addr, 1000).await);
    Outcome {
        read,
        batches,
        bytes,
        rss_before,
        rss_peak,
        normal,
    }
}

fn label(agent: &Agent, addr: SocketAddr) -> &'static str {
    if addr == agent.outbound.local_addr().unwrap() {
        "outbound"
    } else {
        "inbound"
    }
}

// === The cases ===

/// 100 000 streams opened and cancelled at once (CVE-2023-44487) would be 100 000 requests
/// forwarded; the connection is stopped long before: h2's limit on streams reset before they
/// are accepted, or the control-frame budget's charge for each reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_loop_gets_goaway_and_forwards_a_bounded_number_of_requests_while_others_are_served()
 {
    const PAIRS: u64 = 100_000;
    const PER_BATCH: u64 = 100;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let hits_before = agent.app.hits();
        let outcome = attack(&agent, addr, opening(), PAIRS / PER_BATCH, |i| {
            let mut out = Vec::new();
            for k in 0..PER_BATCH {
                let stream = (2 * (i * PER_BATCH + k) + 1) as u32;
                let block = request_block(0x82, "/service/web/reset");
                out.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
                out.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            }
            out
        })
        .await;
        let forwarded = agent.app.hits() - hits_before;
        println!(
            "{what}: rapid reset: {} pairs written, GOAWAY {:?}, {forwarded} requests reached \
             the application, RSS {} -> {} KiB",
            outcome.batches * PER_BATCH,
            outcome.read.goaway,
            outcome.rss_before,
            outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        assert!(
            outcome.batches * PER_BATCH < PAIRS,
            "{what}: all {PAIRS} pairs were taken"
        );
        // The budget allows ~1000 resets; a stream may reach the application before its reset.
        assert!(
            forwarded < 3_000,
            "{what}: {forwarded} of the attack's requests reached the application"
        );
        // Unbounded, 100 000 streams' state and forwarded requests would hold hundreds of MiB.
        outcome.assert_memory_under(what, 64 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}

/// The same loop paced so that h2's limit never sees it: each stream is reset only once its
/// request has reached the application (accepted, routed and forwarded). Those resets are the
/// control-frame budget's: a HEADERS earns a unit, a RST_STREAM costs two, so the loop gets
/// GOAWAY after about a thousand streams, and is closed after about five hundred more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_loop_paced_past_h2s_own_limit_is_stopped_by_the_control_frame_budget() {
    const PAIRS: u64 = 5_000;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let rss_before = agent.rss_kib();
        let hits_before = agent.app.hits();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let reader = tokio::spawn(read_frames(read, Duration::from_secs(60)));
        let started = Instant::now();
        write.write_all(&opening()).await.unwrap();
        let mut pairs = 0;
        'attack: for i in 0..PAIRS {
            let stream = (2 * i + 1) as u32;
            // The application answers after 30 s: the request is still in flight when reset.
            let block = request_block(0x82, "/service/web/slow/30000");
            let headers = frame(HEADERS, END_STREAM | END_HEADERS, stream, &block);
            if write.write_all(&headers).await.is_err() {
                break;
            }
            // Wait (at most 5 s) until the request has reached the application.
            let mut reached = false;
            for _ in 0..5_000 {
                if agent.app.hits() > hits_before + i || reader.is_finished() {
                    reached = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let reset = frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
            if !reached || reader.is_finished() || write.write_all(&reset).await.is_err() {
                break 'attack;
            }
            pairs += 1;
        }
        let read = reader.await.unwrap();
        drop(write);
        let elapsed = started.elapsed().as_secs();
        let forwarded = agent.app.hits() - hits_before;
        let rss_peak = agent.rss_kib();
        println!(
            "{what}: paced rapid reset: {pairs} pairs, GOAWAY {:?}, closed {:?} after it, \
             {forwarded} reached the application, RSS {rss_before} -> {rss_peak} KiB",
            read.goaway, read.closed_after_goaway
        );
        assert!(read.goaway.is_some() && read.closed, "{what}: {read:?}");
        assert!(pairs < PAIRS, "{what}: all {PAIRS} pairs were taken");
        // 1 000 units, a unit lost per pair, then GOAWAY; after it (the attacker does not
        // answer the GOAWAY's ping, so h2 still takes its streams) two units a pair until a
        // second 1 000 are owed, then the connection is no longer read. 10 units earned a
        // second, and a few for the bytes the server wrote; an earlier stop is fine too.
        let allowed = 1_550 + 10 * elapsed;
        assert!(
            forwarded <= allowed,
            "{what}: {forwarded} reset requests reached the application in {elapsed} s \
             (allowed {allowed})"
        );
        assert!(
            rss_peak.saturating_sub(rss_before) < 64 * 1024,
            "{what}: RSS {rss_before} -> {rss_peak} KiB"
        );
        assert_eq!(normal_requests(addr, 0).await, [200, 200], "{what}");
    }
    agent.stop().await;
}

/// A client that overdraws its control-frame budget and then stops (as a legitimate peer might)
/// is sent GOAWAY but keeps the request it had in flight: its response still comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_the_budget_is_overdrawn_still_gets_its_response() {
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let reader = tokio::spawn(read_frames(read, Duration::from_secs(30)));
        let mut bytes = opening();
        // A request the application answers after 2 s, then 1 100 pings: over the budget of
        // 1 000, well short of a second one.
        let block = request_block(0x82, "/service/web/slow/2000");
        bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block));
        for k in 0u64..1_100 {
            bytes.extend(frame(PING, 0, 0, &k.to_be_bytes()));
        }
        write.write_all(&bytes).await.unwrap();
        let read = reader.await.unwrap();
        drop(write);
        println!(
            "{what}: GOAWAY {:?}, responses {:?}, ended {:?}, closed {} ({:?} after GOAWAY)",
            read.goaway, read.responses, read.ended, read.closed, read.closed_after_goaway
        );
        assert_eq!(
            read.goaway.as_ref().map(|g| g.0),
            Some(0),
            "{what}: {read:?}"
        );
        assert_eq!(
            read.responses.first(),
            Some(&(1, 0x88)),
            "{what}: the request in flight is answered 200: {read:?}"
        );
        assert!(read.ended.contains(&1), "{what}: {read:?}");
        // Closed by the end of the grace (10 s), within the reader's 30 s.
        assert!(read.closed, "{what}: {read:?}");
    }
    agent.stop().await;
}

/// A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames
/// (CVE-2024-27316's flood), 1 KiB of header fields each, up to 100 000 of them (100 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_gets_goaway_enhance_your_calm_and_memory_stays_bounded() {
    const FRAMES: u64 = 100_000;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let mut head = opening();
        head.extend(frame(
            HEADERS,
            0,
            1,
            &request_block(0x82, "/service/web/continued"),
        ));
        let outcome = attack(&agent, addr, head, FRAMES, |i| {
            let mut block = Vec::new();
            hpack_literal(&mut block, format!("x-c{i}").as_bytes(), &[b'a'; 1000]);
            frame(CONTINUATION, 0, 1, &block)
        })
        .await;
        println!(
            "{what}: CONTINUATION flood: {} frames ({} bytes) written, GOAWAY {:?}, RSS {} -> {} KiB",
            outcome.batches,
            outcome.bytes,
            outcome.read.goaway,
            outcome.rss_before,
            outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        assert_eq!(
            outcome.read.goaway.as_ref().map(|g| g.0),
            Some(ENHANCE_YOUR_CALM),
            "{what}"
        );
        // Had the server kept reading, the attacker would have written 100 MiB; what it took
        // (plus the socket buffers) stays far below.
        outcome.assert_memory_under(what, 32 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}

/// SETTINGS frames without end (each one to be acknowledged), up to 200 000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_flood_gets_goaway_within_the_control_frame_budget_while_others_are_served() {
    const PER_BATCH: u64 = 100;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        // SETTINGS_HEADER_TABLE_SIZE = 4096: a valid, harmless setting.
        let settings = frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]);
        let outcome = attack(&agent, addr, opening(), 2_000, move |_| {
            settings.repeat(PER_BATCH as usize)
        })
        .await;
        println!(
            "{what}: SETTINGS flood: {} frames written, {} answered, GOAWAY {:?}, closed {:?} \
             after it, RSS {} -> {} KiB",
            outcome.batches * PER_BATCH,
            outcome.read.acks,
            outcome.read.goaway,
            outcome.read.closed_after_goaway,
            outcome.rss_before,
            outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        // GOAWAY after 1 000 frames, no more reading after another 1 000 (plus the rest of the
        // buffer being read, a few thousand frames): the rest of the 200 000 stay unread.
        assert!(
            outcome.read.acks < 10_000,
            "{what}: {} frames answered",
            outcome.read.acks
        );
        outcome.assert_memory_under(what, 32 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}

/// PING frames without end (each one to be answered), up to 200 000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_gets_goaway_within_the_control_frame_budget_while_others_are_served() {
    const PER_BATCH: u64 = 100;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let outcome = attack(&agent, addr, opening(), 2_000, |i| {
            let mut out = Vec::new();
            for k in 0..PER_BATCH {
                out.extend(frame(PING, 0, 0, &(i * PER_BATCH + k).to_be_bytes()));
            }
            out
        })
        .await;
        println!(
            "{what}: PING flood: {} frames written, {} answered, GOAWAY {:?}, closed {:?} \
             after it, RSS {} -> {} KiB",
            outcome.batches * PER_BATCH,
            outcome.read.acks,
            outcome.read.goaway,
            outcome.read.closed_after_goaway,
            outcome.rss_before,
            outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        // GOAWAY after 1 000 frames, no more reading after another 1 000 (plus the rest of the
        // buffer being read, a few thousand frames): the rest of the 200 000 stay unread.
        assert!(
            outcome.read.acks < 10_000,
            "{what}: {} frames answered",
            outcome.read.acks
        );
        outcome.assert_memory_under(what, 32 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}

/// A header block of 80 KiB (over the 64 KiB limit, in the frames that limit allows) is refused
/// on its stream with 431 and reaches no application, and the connection goes on serving; one
/// of 1 MiB ends the connection with GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_block_is_refused_with_431_and_a_huge_one_gets_goaway() {
    let agent = Agent::start().await;
    let fields = |n: usize| {
        let mut block = request_block(0x82, "/service/web/oversized");
        for k in 0..n {
            hpack_literal(
                &mut block,
                format!("x-big{k}").as_bytes(),
                &[b'b'; 8 * 1024],
            );
        }
        block
    };
    // HEADERS + CONTINUATION frames of at most 16 KiB carrying `block`.
    let split = |stream: u32, block: &[u8]| {
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        for (k, chunk) in chunks.iter().enumerate() {
            let last = k + 1 == chunks.len();
            let (kind, flags) = match (k, last) {
                (0, true) => (HEADERS, END_STREAM | END_HEADERS),
                (0, false) => (HEADERS, END_STREAM),
                (_, true) => (CONTINUATION, END_HEADERS),
                (_, false) => (CONTINUATION, 0),
            };
            out.extend(frame(kind, flags, stream, chunk));
        }
        out
    };
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        // 80 KiB on stream 1, then a normal request on stream 3 of the same connection.
        let mut head = opening();
        head.extend(split(1, &fields(10)));
        head.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            3,
            &request_block(0x82, "/service/web/after-oversized"),
        ));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let reader = tokio::spawn(read_frames(read, Duration::from_secs(10)));
        write.write_all(&head).await.unwrap();
        let read = reader.await.unwrap();
        drop(write);
        println!("{what}: 80 KiB header block: {read:?}");
        let status_of = |stream: u32| read.responses.iter().find(|r| r.0 == stream).map(|r| r.1);
        // `0x88` is `:status 200` (static table); h2 writes 431 as a literal.
        assert!(
            status_of(1).is_some_and(|first| first != 0x88),
            "{what}: stream 1 answered: {read:?}"
        );
        assert_eq!(
            status_of(3),
            Some(0x88),
            "{what}: the next request is served"
        );
        assert!(read.ended.contains(&3), "{what}: {read:?}");
        assert!(read.goaway.is_none(), "{what}: {read:?}");
        let seen: Vec<String> = agent.app.seen().into_iter().map(|s| s.target).collect();
        assert!(
            !seen.iter().any(|t| t.contains("/oversized")),
            "{what}: the oversized request reached the application: {seen:?}"
        );

        // 1 MiB of header fields on one stream.
        let block = fields(128);
        let outcome = attack(&agent, addr, opening(), 1, move |_| split(1, &block)).await;
        println!(
            "{what}: 1 MiB header block: GOAWAY {:?}, RSS {} -> {} KiB",
            outcome.read.goaway, outcome.rss_before, outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        outcome.assert_memory_under(what, 32 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}

/// 2 000 streams opened at once on one connection, each a POST whose body never comes: the
/// first 256 (the advertised SETTINGS_MAX_CONCURRENT_STREAMS) are taken, the rest refused
/// with REFUSED_STREAM, and the connection ends with GOAWAY once it has made the server
/// refuse over 1 024 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_concurrency_limit_are_refused_and_a_client_that_keeps_opening_gets_goaway()
 {
    const STREAMS: u64 = 2_000;
    const PER_BATCH: u64 = 50;
    let agent = Agent::start().await;
    for addr in agent.listeners() {
        let what = label(&agent, addr);
        let hits_before = agent.app.hits();
        let outcome = attack(&agent, addr, opening(), STREAMS / PER_BATCH, |i| {
            let mut out = Vec::new();
            for k in 0..PER_BATCH {
                let stream = (2 * (i * PER_BATCH + k) + 1) as u32;
                let block = request_block(0x83, "/service/web/held");
                out.extend(frame(HEADERS, END_HEADERS, stream, &block));
            }
            out
        })
        .await;
        let reached = agent.app.hits() - hits_before;
        let refused = outcome
            .read
            .resets
            .get(&REFUSED_STREAM)
            .copied()
            .unwrap_or(0);
        println!(
            "{what}: {} streams opened, {refused} refused, {reached} reached the application, \
             GOAWAY {:?} after stream {:?}, resets {:?}, RSS {} -> {} KiB",
            outcome.batches * PER_BATCH,
            outcome.read.goaway,
            outcome.read.last_stream,
            outcome.read.resets,
            outcome.rss_before,
            outcome.rss_peak
        );
        outcome.assert_goaway_and_closed(what);
        // GOAWAY names the last stream the server took: every one up to it was taken, none
        // after (refused streams are not taken). No more than the limit.
        let taken = u64::from(outcome.read.last_stream.unwrap_or(0)).div_ceil(2);
        let limit = u64::from(skyline::serve::H2_MAX_CONCURRENT_STREAMS);
        assert!(taken <= limit, "{what}: {taken} streams taken");
        assert!(
            refused > u64::try_from(skyline::serve::H2_MAX_LOCAL_ERROR_RESET_STREAMS).unwrap() - 1,
            "{what}: {refused} refused before GOAWAY"
        );
        assert!(
            reached <= limit,
            "{what}: {reached} held requests reached the application"
        );
        // 256 requests in flight through both hops: their state, upstream connections and
        // buffers; unbounded, 2 000 would be forwarded.
        outcome.assert_memory_under(what, 64 * 1024);
        outcome.assert_normal_requests_answered(what);
    }
    agent.stop().await;
}
