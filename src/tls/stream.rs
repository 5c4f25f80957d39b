//! A mesh TLS connection after its handshake: TLS 1.3 records sealed and opened in the
//! connection's own two buffers, as kernel TLS would do them, instead of through rustls'
//! buffered connection and its tokio adapter.
//!
//! rustls does the handshake (certificates, the mesh CA, the key schedule), fed one whole
//! record at a time so that it never holds a byte that comes after its last handshake
//! record; then it hands over the traffic keys and sequence numbers
//! (`dangerous_extract_secrets`, the interface meant for kernel TLS) and this module carries
//! the records with *ring*'s AEAD, the same code rustls would call:
//!
//! - a record is opened in place in the read buffer and its plaintext copied once, into the
//!   reader's buffer (rustls copies it into a new allocation per record, then out again);
//! - a write is sealed straight into the write buffer, record header and tag around it, and
//!   written with one system call (rustls seals into a new allocation per record).
//!
//! The buffers are kept for the connection's life, so the hot path allocates nothing.
//!
//! What the record layer takes after the handshake: application data; `close_notify` (the
//! end of the stream); a `NewSessionTicket` from a server (ignored: the mesh does not resume
//! sessions, and Skyline's servers send none). Anything else (another alert, a `KeyUpdate`)
//! ends the connection with an error. Instead of updating its keys, a connection stops after
//! [`MAX_RECORDS`] records in either direction (far below AES-GCM's limit), and the express
//! lane's pool does not reuse one that nears it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::pki_types::CertificateDer;
use rustls::{ConnectionCommon, ConnectionTrafficSecrets, ExtractedSecrets, SideData};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

/// A record's header: type, legacy version (2 bytes), length (2 bytes).
const HEADER: usize = 5;
/// The most plaintext in one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// The most ciphertext in one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The AEAD tag of every suite of TLS 1.3.
const TAG: usize = 16;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
/// Records sealed or opened with one key before the connection stops (RFC 8446 §5.5 allows
/// AES-GCM 2^24.5; rustls updates its keys at 2^24 instead).
pub const MAX_RECORDS: u64 = 1 << 23;
/// Plaintext sealed by one write at most (four records).
const WRITE_CHUNK: usize = 4 * MAX_PLAINTEXT;
/// The least room a read from the socket is given.
const READ_SIZE: usize = 8 * 1024;

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("unsupported TLS cipher suite")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("TLS traffic key of the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS traffic IV of the wrong length"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce: the IV with the sequence number XORed into its last 8 bytes
    /// (RFC 8446 §5.3). Each sequence number is used once.
    fn nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "mesh TLS connection reached its record limit",
            ));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A mesh TLS connection over TCP after its handshake (see the module docs).
pub struct MeshStream {
    io: TcpStream,
    tx: Direction,
    rx: Direction,
    /// Bytes read from the socket; records from `opened` on are not opened yet.
    inbuf: Vec<u8>,
    opened: usize,
    /// The part of `inbuf` that is the last opened record's plaintext not yet read.
    plain: std::ops::Range<usize>,
    /// Bytes the next unopened record needs in `inbuf` (0: unknown until a header came).
    need: usize,
    /// Sealed records; those before `written` were sent.
    out: Vec<u8>,
    written: usize,
    /// The peer sent `close_notify`, or closed the connection between records.
    read_end: bool,
    /// `close_notify` was sealed.
    closed: bool,
}

impl std::fmt::Debug for MeshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStream")
            .field("io", &self.io)
            .field("sent_records", &self.tx.seq)
            .field("received_records", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// The client side of a handshake over `io`; the stream after it.
pub(super) async fn client(
    mut io: TcpStream,
    mut conn: rustls::ClientConnection,
) -> io::Result<MeshStream> {
    let rest = drive(&mut io, &mut conn).await?;
    tls13(&conn)?;
    let secrets = conn.dangerous_extract_secrets().map_err(io::Error::other)?;
    MeshStream::new(io, rest, secrets)
}

/// The server side of a handshake over `io`; the stream after it, with the certificate the
/// client presented.
pub(super) async fn server(
    mut io: TcpStream,
    mut conn: rustls::ServerConnection,
) -> io::Result<(MeshStream, Option<CertificateDer<'static>>)> {
    let rest = drive(&mut io, &mut conn).await?;
    tls13(&conn)?;
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let secrets = conn.dangerous_extract_secrets().map_err(io::Error::other)?;
    Ok((MeshStream::new(io, rest, secrets)?, peer))
}

fn tls13(conn: &rustls::CommonState) -> io::Result<()> {
    if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        Ok(())
    } else {
        Err(io::Error::other("mesh TLS needs TLS 1.3"))
    }
}

impl MeshStream {
    fn new(io: TcpStream, rest: Vec<u8>, secrets: ExtractedSecrets) -> io::Result<Self> {
        let mut inbuf = rest;
        inbuf.reserve(READ_SIZE);
        Ok(MeshStream {
            io,
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            inbuf,
            opened: 0,
            plain: 0..0,
            need: 0,
            out: Vec::with_capacity(READ_SIZE),
            written: 0,
            read_end: false,
            closed: false,
        })
    }

    /// The TCP connection underneath.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Whether the connection may carry another exchange: far from its record limit, nothing
    /// received and not yet read.
    pub fn reusable(&self) -> bool {
        self.tx.seq < MAX_RECORDS / 2
            && self.rx.seq < MAX_RECORDS / 2
            && self.plain.is_empty()
            && self.opened == self.inbuf.len()
    }

    /// Sends the sealed records not sent yet.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        // A large write's room is not kept by an idle connection.
        if self.out.capacity() > 2 * READ_SIZE + MAX_CIPHERTEXT {
            self.out.shrink_to(READ_SIZE);
        }
        Poll::Ready(Ok(()))
    }

    /// Seals `data` (at most [`MAX_PLAINTEXT`] bytes) of content `kind` as one record at the
    /// end of `out`.
    fn seal(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        let nonce = self.tx.nonce()?;
        let len = data.len() + 1 + TAG;
        let [hi, lo] = (len as u16).to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, hi, lo];
        let start = self.out.len() + HEADER;
        self.out.reserve(HEADER + len);
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(data);
        self.out.push(kind);
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[start..])
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the next record of `inbuf` when it is whole; `Ok(false)` when more bytes are
    /// needed (`need` says how many in all, once the header is there).
    fn open_next(&mut self) -> io::Result<bool> {
        let start = self.opened;
        let Some(header) = self.inbuf.get(start..start + HEADER) else {
            return Ok(false);
        };
        let header: [u8; HEADER] = [header[0], header[1], header[2], header[3], header[4]];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != CONTENT_APPLICATION_DATA || len > MAX_CIPHERTEXT || len <= TAG {
            return Err(invalid("malformed TLS record"));
        }
        let end = start + HEADER + len;
        if self.inbuf.len() < end {
            self.need = end - start;
            return Ok(false);
        }
        self.need = 0;
        let nonce = self.rx.nonce()?;
        let plain = self
            .rx
            .key
            .open_in_place(
                nonce,
                Aad::from(header),
                &mut self.inbuf[start + HEADER..end],
            )
            .map_err(|_| invalid("a TLS record failed to decrypt"))?;
        // The content type is the last byte that is not padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS record without a content type"));
        };
        let (kind, first) = (plain[at], plain.first().copied());
        let second = plain.get(1).copied();
        self.opened = end;
        match kind {
            CONTENT_APPLICATION_DATA => self.plain = start + HEADER..start + HEADER + at,
            CONTENT_ALERT if at == 2 && second == Some(0) => self.read_end = true,
            CONTENT_ALERT => return Err(invalid("TLS alert from the peer")),
            CONTENT_HANDSHAKE if first == Some(HANDSHAKE_NEW_SESSION_TICKET) => {}
            _ => return Err(invalid("unexpected TLS message after the handshake")),
        }
        Ok(true)
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The length of the whole record at the start of `buf`, if it is there.
fn whole_record(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER)?;
    let len = HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (buf.len() >= len).then_some(len)
}

/// Drives `conn`'s handshake over `io`, handing it one whole record at a time so that it
/// reads nothing past the handshake. Returns the bytes read after it.
async fn drive<C, D>(io: &mut TcpStream, conn: &mut C) -> io::Result<Vec<u8>>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    let mut buf = Vec::with_capacity(READ_SIZE);
    let mut out = Vec::new();
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
            out.clear();
        }
        if !conn.is_handshaking() {
            return Ok(buf);
        }
        if let Some(len) = whole_record(&buf) {
            let mut record = &buf[..len];
            while !record.is_empty() {
                if conn.read_tls(&mut record)? == 0 {
                    return Err(invalid("TLS handshake record refused"));
                }
            }
            buf.drain(..len);
            if let Err(error) = conn.process_new_packets() {
                // The alert that says why, then the error.
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                let _ = io.write_all(&out).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            continue;
        }
        buf.reserve(READ_SIZE);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tls handshake eof",
            ));
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Records written without a flush go out before a read waits for the answer to them.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.inbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_end {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // Keep the unopened bytes, at the front, and read more after them.
            if this.opened == this.inbuf.len() {
                this.inbuf.clear();
            } else if this.opened > 0 {
                this.inbuf.drain(..this.opened);
            }
            this.opened = 0;
            this.plain = 0..0;
            this.inbuf
                .reserve(READ_SIZE.max(this.need.saturating_sub(this.inbuf.len())));
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.inbuf
            ))?;
            if n == 0 {
                if !this.inbuf.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a TLS record",
                    )));
                }
                this.read_end = true;
            }
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        for chunk in data.chunks(MAX_PLAINTEXT) {
            this.seal(CONTENT_APPLICATION_DATA, chunk)?;
        }
        // Sent now when the socket takes it; else by the next write, flush or read.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            // close_notify: a warning-level alert (RFC 8446 §6.1).
            this.seal(CONTENT_ALERT, &[1, 0])?;
            this.closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::ca::{self, Kind, LeafSpec};
    use crate::tls::{Settings, build, read_files};

    /// The mesh's client and server configurations, from a new CA.
    fn configs() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let authority = ca::init(&dir.path().join("ca"), "mesh.test").unwrap();
        let spec = LeafSpec::for_ttl(Kind::Node, "a", Duration::from_secs(3600));
        ca::write_leaf(
            &ca::issue(&authority, &spec).unwrap(),
            &dir.path().join("node"),
        )
        .unwrap();
        let settings = Settings {
            mode: crate::tls::Mode::Strict,
            ca: dir.path().join("ca").join(ca::CA_CERT),
            cert: dir.path().join("node.crt"),
            key: dir.path().join("node.key"),
        };
        let configs = build(&settings, &read_files(&settings).unwrap()).unwrap();
        (configs.client, configs.server)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    fn name() -> ServerName<'static> {
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// 100 KiB and more: several records per write, records split across reads.
    fn message(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    /// Sends `request`, reads an answer of `answer_len` bytes, and closes.
    async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        request: &[u8],
        answer_len: usize,
    ) -> Vec<u8> {
        stream.write_all(request).await.unwrap();
        stream.flush().await.unwrap();
        let mut answer = vec![0; answer_len];
        stream.read_exact(&mut answer).await.unwrap();
        stream.shutdown().await.unwrap();
        answer
    }

    /// Reads a request of `len` bytes, answers it reversed, and reads to the clean end.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, len: usize) -> Vec<u8> {
        let mut request = vec![0; len];
        stream.read_exact(&mut request).await.unwrap();
        let reversed: Vec<u8> = request.iter().rev().copied().collect();
        // In two writes, as the express lane sends a head and then a body.
        stream.write_all(&reversed[..100]).await.unwrap();
        stream.write_all(&reversed[100..]).await.unwrap();
        stream.flush().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "bytes after the request");
        request
    }

    #[tokio::test]
    async fn the_record_layer_talks_to_rustls_both_ways_and_ends_with_close_notify() {
        let (client_config, server_config) = configs();
        let request = message(100_000);
        let reversed: Vec<u8> = request.iter().rev().copied().collect();

        // Ours as the client, rustls (tokio-rustls) as the server, with session tickets as a
        // server of another make would send: the client ignores them.
        let mut with_tickets = (*server_config).clone();
        with_tickets.send_tls13_tickets = 2;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(with_tickets));
        let (c, s) = pair().await;
        let conn = rustls::ClientConnection::new(client_config.clone(), name()).unwrap();
        let (got, seen) = tokio::join!(
            async { ask(client(c, conn).await.unwrap(), &request, request.len()).await },
            async { answer(acceptor.accept(s).await.unwrap(), request.len()).await },
        );
        assert_eq!(seen, request);
        assert_eq!(got, reversed);

        // rustls as the client, ours as the server.
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let (c, s) = pair().await;
        let conn = rustls::ServerConnection::new(server_config).unwrap();
        let (got, seen) = tokio::join!(
            async {
                ask(
                    connector.connect(name(), c).await.unwrap(),
                    &request,
                    request.len(),
                )
                .await
            },
            async {
                let (stream, certificate) = server(s, conn).await.unwrap();
                assert!(certificate.is_some(), "the client's certificate");
                answer(stream, request.len()).await
            },
        );
        assert_eq!(seen, request);
        assert_eq!(got, reversed);
    }

    #[tokio::test]
    async fn a_tampered_record_is_refused_and_the_record_limit_ends_a_connection() {
        let (client_config, server_config) = configs();
        let (c, s) = pair().await;
        let (mut ours, theirs) = tokio::join!(
            async {
                let conn = rustls::ClientConnection::new(client_config, name()).unwrap();
                client(c, conn).await.unwrap()
            },
            async {
                let conn = rustls::ServerConnection::new(server_config).unwrap();
                server(s, conn).await.unwrap().0
            },
        );
        assert!(ours.reusable());
        // A record with one bit flipped, written under the stream's feet.
        let mut sealed = ours.tx.seq;
        ours.seal(CONTENT_APPLICATION_DATA, b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut record = std::mem::take(&mut ours.out);
        record[HEADER + 2] ^= 1;
        ours.io.write_all(&record).await.unwrap();
        let mut theirs = theirs;
        let mut buf = [0u8; 64];
        let e = theirs.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        sealed += 1;
        assert_eq!(ours.tx.seq, sealed);

        // Near the limit the pool lets it go; at the limit a write fails instead of reusing
        // a nonce.
        ours.tx.seq = MAX_RECORDS / 2;
        assert!(!ours.reusable());
        ours.tx.seq = MAX_RECORDS;
        assert!(ours.write(b"x").await.is_err());
    }
}
