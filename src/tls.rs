//! Mesh TLS: mutual TLS on every proxy-to-proxy hop (outbound → inbound, outbound → gateway,
//! gateway → inbound and bridge, bridge → gateway), with certificates of the mesh CA
//! ([`ca`]: `skyline ca init`, `skyline ca issue`).
//!
//! One setting switches it on, the `[tls]` section of a role's config: `mode = "strict"`
//! refuses every connection that is not TLS with a certificate of the mesh CA (none, expired,
//! or another CA's: refused at the handshake); `"permissive"`, for a rollout, also takes plain
//! connections on the same port, told apart by their first byte (a TLS handshake record starts
//! with `0x16`, an HTTP request with a letter, HTTP/2's preface with `P`), and counts and logs
//! which kind came (`skyline_mesh_connections_total`). A proxy dialing another always speaks
//! TLS once the setting is on, presenting its certificate and checking the peer's against the
//! mesh CA. Applications keep speaking plain HTTP to the outbound listener, and the inbound
//! proxy keeps speaking plain HTTP to the local instances.
//!
//! What a handshake proves is that the peer holds the key of a certificate the mesh CA issued
//! and that has not expired: a mesh proxy (node, gateway or bridge, named in the certificate's
//! SPIFFE ID). Host names are not checked: the proxies dial addresses from the catalog, and the
//! mesh CA issues to nothing but the mesh.
//!
//! rustls does the handshake (TLS 1.3 only); after it, [`MeshStream`] carries the records in
//! its own buffers with the keys rustls hands over (see `tls::stream`), one copy and no
//! allocation per record.
//!
//! The files are read again every [`RELOAD_INTERVAL`]; when they changed and go together, new
//! connections use the new certificate, and open connections keep theirs. Files that do not
//! load (say, a new certificate next to the old key, between two writes) are logged and
//! counted; the certificate in use stays until they do.

pub mod ca;
pub mod config;
mod stream;

pub use stream::MeshStream;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the certificate files are read again.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// The longest a peer may take to start and finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether the proxies speak TLS to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP between the proxies (the default).
    Off,
    /// Dial with TLS; listeners take TLS and plain connections, and report which.
    Permissive,
    /// Dial with TLS; listeners take only TLS with a mesh certificate.
    Strict,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Mode::Off),
            "permissive" => Ok(Mode::Permissive),
            "strict" => Ok(Mode::Strict),
            other => Err(format!(
                "unknown mode {other:?}; expected \"off\", \"permissive\" or \"strict\""
            )),
        }
    }
}

/// The validated `[tls]` section: where the CA, the certificate and its key are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("the certificate {} and the key {} cannot be used together", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The files as last read, to see whether they changed.
#[derive(PartialEq, Eq, Default)]
struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The configurations built from one set of files.
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The certificate's serial number (hex) and SPIFFE ID, for logs.
    serial: String,
    id: String,
}

/// A role's mesh TLS: its configurations (swapped when the files change) and its mode.
/// Cheap to clone.
#[derive(Clone)]
pub struct MeshTls {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    current: ArcSwap<Configs>,
    /// The files as last read, loaded or not.
    seen: Mutex<Files>,
    metrics: Arc<Metrics>,
    /// How many times the certificate in use changed.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("mode", &self.inner.settings.mode)
            .finish_non_exhaustive()
    }
}

/// A connection as a mesh listener took it.
pub enum Accepted {
    /// With the SPIFFE ID of the peer's certificate ("" when it names none).
    Tls(Box<MeshStream>, Arc<str>),
    Plain(TcpStream),
    /// Refused (and closed): not TLS in strict mode, a failed handshake, or nothing sent.
    Refused,
}

impl MeshTls {
    /// The mesh TLS of `settings`, or `None` when it is off. Files that do not load are an
    /// error: a proxy does not start without its certificate.
    pub fn load(settings: &Settings, metrics: Arc<Metrics>) -> Result<Option<Self>, TlsError> {
        if settings.mode == Mode::Off {
            return Ok(None);
        }
        let files = read_files(settings)?;
        let configs = build(settings, &files)?;
        tracing::info!(
            mode = ?settings.mode,
            id = %configs.id,
            serial = %configs.serial,
            "mesh TLS on"
        );
        Ok(Some(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                current: ArcSwap::from_pointee(configs),
                seen: Mutex::new(files),
                metrics,
                generation: Default::default(),
            }),
        }))
    }

    pub fn mode(&self) -> Mode {
        self.inner.settings.mode
    }

    /// The serial number (hex) of the certificate new connections present.
    pub fn serial(&self) -> String {
        self.inner.current.load().serial.clone()
    }

    /// Reads the files again; when they changed and load, new connections use them. Returns
    /// whether the certificate in use changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = read_files(&self.inner.settings)?;
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == files {
            return Ok(false);
        }
        let built = build(&self.inner.settings, &files);
        // Files that do not load are not tried again until they change.
        *seen = files;
        drop(seen);
        let configs = built?;
        tracing::info!(id = %configs.id, serial = %configs.serial, "mesh certificate reloaded");
        self.inner.current.store(Arc::new(configs));
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// How many times the certificate in use changed: a long-lived connection made before
    /// the last change (a mesh link) is replaced by one that presents the new certificate.
    pub fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reloads the files every [`RELOAD_INTERVAL`] until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(false) => {}
                Ok(true) => self.inner.metrics.mesh_certificate_reload(true),
                Err(e) => {
                    self.inner.metrics.mesh_certificate_reload(false);
                    tracing::warn!(
                        error = %crate::error_chain(&e),
                        "mesh certificate files do not load; keeping the certificate in use"
                    );
                }
            }
        }
    }

    /// Takes a connection on a mesh listener: a TLS one is handshaken (the peer must present a
    /// mesh certificate), a plain one taken in permissive mode only. Counted either way.
    pub async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Accepted {
        let metrics = &self.inner.metrics;
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return Accepted::Refused,
        }
        if first[0] != TLS_HANDSHAKE {
            if self.mode() == Mode::Strict {
                metrics.mesh_connection("plain", "refused");
                tracing::info!(%peer, "plain connection refused: mesh TLS is strict");
                return Accepted::Refused;
            }
            metrics.mesh_connection("plain", "accepted");
            tracing::info!(%peer, "plain connection accepted (mesh TLS is permissive)");
            return Accepted::Plain(stream);
        }
        let handshake = async {
            let conn = rustls::ServerConnection::new(self.inner.current.load().server.clone())
                .map_err(io::Error::other)?;
            stream::server(stream, conn).await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok((tls, certificate))) => {
                metrics.mesh_connection("tls", "accepted");
                let id = certificate
                    .and_then(|c| spiffe_ids(&c).ok())
                    .and_then(|ids| ids.into_iter().next())
                    .unwrap_or_default();
                tracing::debug!(%peer, %id, "mesh TLS connection");
                Accepted::Tls(Box::new(tls), Arc::from(id))
            }
            Ok(Err(error)) => {
                metrics.mesh_connection("tls", "refused");
                tracing::info!(%peer, %error, "mesh TLS handshake refused");
                Accepted::Refused
            }
            Err(_) => {
                metrics.mesh_connection("tls", "refused");
                tracing::info!(%peer, "mesh TLS handshake timed out");
                Accepted::Refused
            }
        }
    }

    /// The client side of a hop: a TLS connection over `stream` to the proxy at `addr`,
    /// presenting this proxy's certificate and checking the peer's against the mesh CA.
    pub async fn connect(&self, addr: SocketAddr, stream: TcpStream) -> io::Result<MeshStream> {
        // Names are not checked (see the module docs); an IP address sends no SNI.
        let name = ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(self.inner.current.load().client.clone(), name)
            .map_err(io::Error::other)?;
        stream::client(stream, conn).await
    }
}

fn read_files(settings: &Settings) -> Result<Files, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok(Files {
        ca: read(&settings.ca)?,
        cert: read(&settings.cert)?,
        key: read(&settings.key)?,
    })
}

/// rustls' *ring* provider with the AES-128-GCM suites first (TLS 1.3's, then 1.2's), the
/// others after them in *ring*'s order. *ring*'s own order puts AES-256-GCM first; with AES-NI
/// the 128-bit key's 10 rounds cost about 30 % less per block than the 256-bit key's 14, and
/// its security margin is TLS 1.3's mandatory suite's. Measured in docs/benchmarks.md.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the AES-128-GCM suites first, each group in its own order.
    provider
        .cipher_suites
        .sort_by_key(|suite| !is_aes_128_gcm(suite.suite()));
    Arc::new(provider)
}

fn is_aes_128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as C;
    matches!(
        suite,
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

fn build(settings: &Settings, files: &Files) -> Result<Configs, TlsError> {
    build_with(settings, files, provider)
}

/// [`build`] with the crypto provider `provider` makes.
fn build_with(
    settings: &Settings,
    files: &Files,
    provider: fn() -> Arc<CryptoProvider>,
) -> Result<Configs, TlsError> {
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&files.ca) {
        let cert = cert.map_err(|e| invalid(&settings.ca, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| invalid(&settings.ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid(&settings.ca, "no certificate in the file".into()));
    }
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&settings.cert, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(invalid(&settings.cert, "no certificate in the file".into()));
    };
    let serial = serial_of(leaf).map_err(|e| invalid(&settings.cert, e))?;
    let id = spiffe_ids(leaf)
        .map_err(|e| invalid(&settings.cert, e))?
        .into_iter()
        .next()
        .unwrap_or_default();
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| invalid(&settings.key, e.to_string()))?;
    let pair = |source| TlsError::Pair {
        cert: settings.cert.clone(),
        key: settings.key.clone(),
        source,
    };
    let roots = Arc::new(roots);
    let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| invalid(&settings.ca, e.to_string()))?;
    // TLS 1.3 only: after the handshake its records are carried by `stream`.
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(pair)?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(pair)?;
    // The server's order of suites, not the client's: a peer that prefers AES-256-GCM (an
    // older Skyline, or OpenSSL) still gets AES-128-GCM (see `provider`).
    server.ignore_client_order = true;
    // The keys go to `stream` after the handshake; the mesh does not resume sessions.
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| invalid(&settings.ca, e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(pair)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier { inner: servers }))
        .with_client_auth_cert(chain, key)
        .map_err(pair)?;
    client.enable_secret_extraction = true;
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
        serial,
        id,
    })
}

/// Checks a server's certificate as WebPKI does (chain to the mesh CA, validity, usage), but
/// not its names: mesh certificates name a SPIFFE ID, not the address dialed.
#[derive(Debug)]
struct MeshServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked last, after the chain and the validity period: a name error
        // means everything else passed.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => Ok(verified),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The `spiffe://` URI SANs of a certificate.
pub fn spiffe_ids(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    ids.push((*uri).to_owned());
                }
            }
        }
    }
    Ok(ids)
}

/// [`spiffe_ids`] of the first certificate of a PEM text.
pub fn spiffe_ids_of_pem(pem: &str) -> Result<Vec<String>, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    spiffe_ids(&der)
}

/// A certificate's serial number, hex.
pub fn serial_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(ca::hex(cert.raw_serial()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ca::{Kind, LeafSpec};

    fn settings(dir: &Path) -> Settings {
        Settings {
            mode: Mode::Strict,
            ca: dir.join("ca").join(ca::CA_CERT),
            cert: dir.join("node.crt"),
            key: dir.join("node.key"),
        }
    }

    fn issue(authority: &ca::Ca) -> ca::Leaf {
        let spec = LeafSpec::for_ttl(Kind::Node, "a", Duration::from_secs(3600));
        ca::issue(authority, &spec).unwrap()
    }

    #[test]
    fn a_new_certificate_is_taken_only_once_its_key_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let authority = ca::init(&dir.path().join("ca"), "mesh.test").unwrap();
        let first = issue(&authority);
        ca::write_leaf(&first, &dir.path().join("node")).unwrap();
        let tls = MeshTls::load(&settings(dir.path()), Metrics::new())
            .unwrap()
            .unwrap();
        assert_eq!(tls.serial(), first.serial);
        assert!(!tls.reload().unwrap(), "unchanged files are not a reload");

        // The new certificate next to the old key: refused, the first one stays.
        let second = issue(&authority);
        std::fs::write(dir.path().join("node.crt"), &second.cert_pem).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Pair { .. })));
        assert_eq!(tls.serial(), first.serial);
        // Until the files change again, they are not tried again.
        assert!(!tls.reload().unwrap());

        std::fs::write(dir.path().join("node.key"), &second.key_pem).unwrap();
        assert!(tls.reload().unwrap());
        assert_eq!(tls.serial(), second.serial);
    }

    #[test]
    fn two_proxies_agree_on_aes_128_gcm_even_when_the_client_prefers_aes_256() {
        let dir = tempfile::tempdir().unwrap();
        let authority = ca::init(&dir.path().join("ca"), "mesh.test").unwrap();
        ca::write_leaf(&issue(&authority), &dir.path().join("node")).unwrap();
        let files = read_files(&settings(dir.path())).unwrap();
        let configs = build(&settings(dir.path()), &files).unwrap();
        // A client with ring's own order (AES-256-GCM first), as an older Skyline offers.
        let ring_order = build_with(&settings(dir.path()), &files, || {
            Arc::new(rustls::crypto::ring::default_provider())
        })
        .unwrap();
        for client in [configs.client.clone(), ring_order.client] {
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let mut client = rustls::ClientConnection::new(client, name).unwrap();
            let mut server = rustls::ServerConnection::new(configs.server.clone()).unwrap();
            // The handshake in memory: each side's records handed to the other until done.
            for _ in 0..10 {
                let mut wire = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut wire).unwrap();
                }
                server.read_tls(&mut wire.as_slice()).unwrap();
                server.process_new_packets().unwrap();
                let mut wire = Vec::new();
                while server.wants_write() {
                    server.write_tls(&mut wire).unwrap();
                }
                client.read_tls(&mut wire.as_slice()).unwrap();
                client.process_new_packets().unwrap();
                if !client.is_handshaking() && !server.is_handshaking() {
                    break;
                }
            }
            assert!(!server.is_handshaking(), "the handshake did not finish");
            let suite = server.negotiated_cipher_suite().unwrap().suite();
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
    }

    #[test]
    fn mode_off_loads_nothing_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let off = Settings {
            mode: Mode::Off,
            ..settings(dir.path())
        };
        assert!(MeshTls::load(&off, Metrics::new()).unwrap().is_none());
        let e = MeshTls::load(&settings(dir.path()), Metrics::new()).unwrap_err();
        assert!(e.to_string().contains("ca.crt"), "{e}");
    }
}
