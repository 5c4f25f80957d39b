//! HTTP/1.1 protocol upgrades (RFC 9110 §7.8): WebSocket and any other protocol a client asks
//! for with `Upgrade`, through every hop.
//!
//! An upgrade request keeps its `Upgrade` header and `Connection: upgrade` (every other
//! hop-by-hop header is dropped as usual) and goes to the upstream on a connection of its own,
//! never a pooled one. It is never sent again once it may have left: only a refused connection
//! is tried elsewhere. An answer other than `101 Switching Protocols` is an ordinary response.
//! After a `101`, which the client gets with the upstream's `Upgrade` header, both connections
//! are spliced ([`tunnel`]): bytes flow both ways as they come until both sides have closed.
//! A side that shuts down its writing half (a TCP FIN) has the other connection's writing half
//! shut down in turn, so half-closed protocols work. A tunnel with no byte in either direction
//! for the route's `idle_timeout` is closed. A tunnel uses no route table: a catalog change or
//! a policy reload leaves it open. At shutdown, tunnels stay open while the listener drains and
//! are closed when the drain ends (see `serve`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Version;
use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The protocols a request asks to switch to, when it is an upgrade request: HTTP/1.1, an
/// `Upgrade` header, and `upgrade` among its `Connection` options (a sender of `Upgrade` must
/// list it there, RFC 9110 §7.8; an `Upgrade` without it is dropped like any hop-by-hop
/// header). Only one `Upgrade` header line is taken.
pub fn requested(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let protocols = headers.get(header::UPGRADE)?;
    if headers.get_all(header::UPGRADE).iter().nth(1).is_some() {
        return None;
    }
    let listed = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|o| crate::http1::trim_ows(o).eq_ignore_ascii_case(b"upgrade"))
    });
    listed.then(|| protocols.clone())
}

/// Puts the upgrade back on a message whose hop-by-hop headers were dropped: `Upgrade:
/// <protocols>` and `Connection: upgrade`.
pub fn keep(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::UPGRADE, protocols);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Both sides of an accepted upgrade, to be spliced once hyper hands them over.
pub struct Switch {
    /// The client's connection, after the `101` is written to it.
    pub client: OnUpgrade,
    /// The upstream's connection, after its `101` was read.
    pub upstream: OnUpgrade,
    /// The longest the tunnel may carry no byte.
    pub idle: Duration,
    /// Cancelled when the listener's drain ends: the tunnel closes.
    pub drained: CancellationToken,
    /// For the log.
    pub service: String,
}

/// Splices both sides of `switch` in a task of their own until both have closed, either fails,
/// the tunnel idles for `switch.idle`, or the listener's drain ends.
pub fn spawn(switch: Switch) {
    tokio::spawn(async move {
        let Switch {
            client,
            upstream,
            idle,
            drained,
            service,
        } = switch;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%service, %error, "upgrade not completed");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        let end = tokio::select! {
            end = tunnel(&mut client, &mut upstream, idle) => end,
            () = drained.cancelled() => Ok(End::Drained),
        };
        match end {
            Ok(end) => tracing::debug!(%service, ?end, "upgraded connection closed"),
            Err(error) => tracing::debug!(%service, %error, "upgraded connection failed"),
        }
    });
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (each direction ended with its reader's end of stream).
    Closed { to_upstream: u64, to_client: u64 },
    /// No byte either way for the idle timeout.
    Idle,
    /// The listener's drain ended.
    Drained,
}

/// Copies bytes both ways between `a` and `b` until both directions ended (a read's end of
/// stream shuts the other side's writing half down) or no byte moved for `idle`.
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<End>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Active {
        io: a,
        start,
        last: last.clone(),
    };
    let mut b = Active {
        io: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            done = copy.as_mut() => {
                let (to_upstream, to_client) = done?;
                return Ok(End::Closed { to_upstream, to_client });
            }
            () = timer.as_mut() => {
                let quiet_since = start + Duration::from_nanos(last.load(Ordering::Relaxed));
                if Instant::now() >= quiet_since + idle {
                    return Ok(End::Idle);
                }
                timer.as_mut().reset(quiet_since + idle);
            }
        }
    }
}

/// A side of a tunnel that notes when it last read a byte.
struct Active<'a, T> {
    io: &'a mut T,
    start: Instant,
    /// Nanoseconds after `start` of the last read of either side.
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_needs_http_11_the_header_and_the_connection_option() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(
            requested(Version::HTTP_11, &headers(&ws)).unwrap(),
            "websocket"
        );
        assert!(requested(Version::HTTP_10, &headers(&ws)).is_none());
        assert!(requested(Version::HTTP_11, &headers(&[("upgrade", "websocket")])).is_none());
        assert!(requested(Version::HTTP_11, &headers(&[("connection", "upgrade")])).is_none());
        let twice = [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ];
        assert!(requested(Version::HTTP_11, &headers(&twice)).is_none());
    }

    #[tokio::test]
    async fn a_tunnel_passes_a_half_close_on_and_ends_when_both_sides_closed() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(64);
        let splice = tokio::spawn(async move {
            tunnel(
                &mut proxy_client,
                &mut proxy_upstream,
                Duration::from_secs(60),
            )
            .await
        });
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"ping",
            "the upstream reads to the client's end of stream"
        );
        upstream.write_all(b"pong after fin").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong after fin");
        let end = splice.await.unwrap().unwrap();
        assert_eq!(
            end,
            End::Closed {
                to_upstream: 4,
                to_client: 14
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_closes_after_the_idle_timeout_and_traffic_moves_the_timeout_on() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(64);
        let idle = Duration::from_secs(10);
        let started = Instant::now();
        let splice =
            tokio::spawn(async move { tunnel(&mut proxy_client, &mut proxy_upstream, idle).await });
        tokio::time::sleep(Duration::from_secs(7)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        upstream.read_exact(&mut one).await.unwrap();
        let end = splice.await.unwrap().unwrap();
        assert_eq!(end, End::Idle);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(17) && took < Duration::from_secs(18),
            "{took:?}"
        );
    }
}
