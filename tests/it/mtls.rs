//! Mesh TLS through the shipped binary: the CA commands, two agent processes whose
//! outbound → inbound hop is mTLS, raw TLS clients the inbound listener must refuse (another
//! CA's certificate, an expired one, none), plain HTTP in strict and permissive mode, and
//! certificates rotated under load; gRPC (HTTP/2, trailers) over the strict mTLS hop.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use skyline::tls::ca::{self, Kind, LeafSpec};

use crate::support::{Client, SKYLINE, Skyline, TestApp, ip, raw, scrape, write_atomically};

/// Runs `skyline <args>` to its end; its exit status and output.
fn skyline(args: &[&str]) -> std::process::Output {
    std::process::Command::new(SKYLINE)
        .args(args)
        .output()
        .unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `skyline ca init` in `dir`/ca, trust domain `mesh.test`.
fn init_ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let out = skyline(&[
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "mesh.test",
    ]);
    assert!(out.status.success(), "{out:?}");
    ca
}

/// `skyline ca issue` of a node certificate `name` into `dir`/`name`.{crt,key}; the serial.
fn issue_node(ca: &Path, dir: &Path, name: &str) -> String {
    let out_path = dir.join(name);
    let out = skyline(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--kind",
        "node",
        "--name",
        name,
        "--ttl",
        "1h",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    serial_of_file(&dir.join(format!("{name}.crt")))
}

fn serial_of_file(path: &Path) -> String {
    let der = CertificateDer::from_pem_file(path).unwrap();
    skyline::tls::serial_of(&der).unwrap()
}

#[test]
fn ca_init_keeps_its_key_private_refuses_to_overwrite_and_issues_spiffe_named_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = init_ca(dir.path());
    assert_eq!(mode_of(&ca.join("ca.key")), 0o600);
    let again = skyline(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("refusing to overwrite"), "{said}");

    for (kind, name) in [("node", "a"), ("gateway", "gw-1"), ("bridge", "k8s-node-3")] {
        let out = dir.path().join("certs").join(name);
        let issued = skyline(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--kind",
            kind,
            "--name",
            name,
            "--ttl",
            "30m",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(issued.status.success(), "{issued:?}");
        let key = dir.path().join("certs").join(format!("{name}.key"));
        assert_eq!(mode_of(&key), 0o600);
        let pem =
            std::fs::read_to_string(dir.path().join("certs").join(format!("{name}.crt"))).unwrap();
        let ids = skyline::tls::spiffe_ids_of_pem(&pem).unwrap();
        assert_eq!(ids, [format!("spiffe://mesh.test/{kind}/{name}")]);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        // 30 minutes, plus the minute the validity is backdated for skewed clocks.
        assert_eq!(lifetime, 31 * 60);
    }
    let bad = skyline(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--kind",
        "node",
        "--name",
        "../etc",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid name"));
}

// === A two-node mesh over mTLS ===

/// Agents a (127.0.0.2) and b (127.0.0.3) as processes, `web` on b, the hop between them
/// under mesh TLS in `mode`; `grpc-echo` (a tonic server, h2c) on b as well.
struct Mesh {
    dir: tempfile::TempDir,
    ca: PathBuf,
    a: Skyline,
    b: Skyline,
    outbound_a: SocketAddr,
    inbound_b: SocketAddr,
    admin_b: SocketAddr,
    web: TestApp,
    grpc_stop: tokio_util::sync::CancellationToken,
}

impl Mesh {
    async fn start(mode: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path());
        let web = TestApp::spawn("web@b", ip("127.0.0.3"));
        let grpc_stop = tokio_util::sync::CancellationToken::new();
        let grpc = crate::grpc::grpc_server("127.0.0.3", grpc_stop.clone()).await;
        let catalog = dir.path().join("catalog.toml");
        let text = |a: u16, b: u16| {
            format!(
                "[[node]]\nname = \"a\"\naddress = \"127.0.0.2\"\ninbound_port = {a}\n\n\
                 [[node]]\nname = \"b\"\naddress = \"127.0.0.3\"\ninbound_port = {b}\n\n\
                 [[service]]\nname = \"web\"\nnode = \"b\"\nport = {}\n\n\
                 [[service]]\nname = \"grpc-echo\"\nnode = \"b\"\nport = {}\n\
                 meta = {{ protocol = \"h2c\" }}\n",
                web.addr.port(),
                grpc.port()
            )
        };
        std::fs::write(&catalog, text(1, 1)).unwrap();
        let mut started = Vec::new();
        for (node, node_ip) in [("a", "127.0.0.2"), ("b", "127.0.0.3")] {
            issue_node(&ca, dir.path(), node);
            let config = dir.path().join(format!("{node}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[tls]\nmode = \"{mode}\"\nca = \"ca/ca.crt\"\ncert = \"{node}.crt\"\nkey = \"{node}.key\"\n"
                ),
            )
            .unwrap();
            let listen = format!("{node_ip}:0");
            let args = [
                "agent",
                "--config",
                config.to_str().unwrap(),
                "--node-name",
                node,
                "--node-address",
                node_ip,
                "--outbound",
                &listen,
                "--inbound",
                &listen,
                "--admin",
                &listen,
                "--catalog",
                "file",
                "--catalog-file",
                catalog.to_str().unwrap(),
            ];
            let mut agent = Skyline::start(&args, &[]);
            let fields = agent.log.wait_for("agent started").await;
            let addr = |key: &str| -> SocketAddr { fields[key].as_str().unwrap().parse().unwrap() };
            started.push((agent, addr("outbound"), addr("inbound"), addr("admin")));
        }
        let (b, _, inbound_b, admin_b) = started.pop().unwrap();
        let (a, outbound_a, inbound_a, _) = started.pop().unwrap();
        write_atomically(&catalog, &text(inbound_a.port(), inbound_b.port()));
        let mesh = Mesh {
            dir,
            ca,
            a,
            b,
            outbound_a,
            inbound_b,
            admin_b,
            web,
            grpc_stop,
        };
        // Bounded: the agents read the catalog file every 50 ms.
        let client = Client::new();
        for _ in 0..400 {
            if let Ok(reply) = client.get_result(&mesh.web_url()).await {
                if reply.status == 200 {
                    return mesh;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the agents never routed web over mesh TLS ({mode})");
    }

    fn web_url(&self) -> String {
        format!("http://{}/service/web/hello", self.outbound_a)
    }

    async fn tls_count(&self, transport: &str, outcome: &str) -> f64 {
        scrape(self.admin_b).await.count(&format!(
            "skyline_mesh_connections_total{{transport=\"{transport}\",outcome=\"{outcome}\"}}"
        ))
    }

    async fn stop(self) {
        for agent in [&self.a, &self.b] {
            agent.sigterm();
        }
        self.a.exited_cleanly().await;
        self.b.exited_cleanly().await;
        self.grpc_stop.cancel();
        self.web.stop().await;
    }
}

#[tokio::test]
async fn a_request_goes_outbound_to_inbound_over_strict_mtls() {
    let mesh = Mesh::start("strict").await;
    let reply = Client::new().get(&mesh.web_url()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "web@b /hello");
    // Node a's connection to b's inbound listener was TLS (and nothing else was taken).
    assert!(mesh.tls_count("tls", "accepted").await >= 1.0);
    assert_eq!(mesh.tls_count("plain", "accepted").await, 0.0);
    mesh.stop().await;
}

#[tokio::test]
async fn grpc_calls_and_their_trailers_cross_the_strict_mtls_hop_over_http2() {
    use crate::grpc::pb::EchoRequest;
    use crate::grpc::pb::echo_client::EchoClient;
    use crate::grpc::{MAX_MESSAGE, request};

    let mesh = Mesh::start("strict").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.outbound_a))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let origin = format!("http://{}/service/grpc-echo", mesh.outbound_a)
        .parse()
        .unwrap();
    let mut client = EchoClient::with_origin(channel, origin)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // A successful call's status (`grpc-status: 0`) comes in trailers after the reply, which
    // only an HTTP/2 hop carries (tonic fails a call without it): the hop between the agents
    // was HTTP/2 over mTLS.
    let reply = client.unary(request("hello")).await.unwrap();
    assert_eq!(reply.get_ref().message, "hello");
    let failing = EchoRequest {
        fail_with: tonic::Code::PermissionDenied as i32,
        ..request("not you")
    };
    let status = client.unary(failing).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "not you");
    let call = EchoRequest {
        count: 3,
        ..request("tick")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        got.push(reply.message);
    }
    assert_eq!(got, ["tick #0", "tick #1", "tick #2"]);
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // Node b's inbound listener took TLS connections only (strict refuses plain ones).
    assert!(mesh.tls_count("tls", "accepted").await >= 1.0);
    assert_eq!(mesh.tls_count("plain", "accepted").await, 0.0);
    mesh.stop().await;
}

// === Raw TLS clients ===

/// Trusts any server certificate: these clients test the server's checks, not their own.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client presenting `identity` (a certificate and key, PEM), or nothing.
fn tls_client(identity: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// What a TLS client got from `addr` for one GET: the handshake's error, or the server's
/// certificate serial and every byte it sent back (to the close, bounded: 5 s).
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<(String, String), String> {
    tls_request(connector, addr, "/service/web/raw").await
}

/// [`tls_get`] of `target`.
async fn tls_request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    target: &str,
) -> Result<(String, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| skyline::tls::serial_of(c).unwrap())
        .unwrap_or_default();
    // TLS 1.3: the client's certificate is judged after its side of the handshake ended, so
    // a refusal shows as an alert on the first read.
    let request = format!("GET {target} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok((serial, String::from_utf8_lossy(&out).into_owned())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// A leaf of the mesh CA in `ca_dir` for node `name`, valid from `from` to `until`.
fn leaf(ca_dir: &Path, name: &str, from: SystemTime, until: SystemTime) -> (String, String) {
    let authority = ca::load(ca_dir).unwrap();
    let spec = LeafSpec {
        kind: Kind::Node,
        name: name.to_owned(),
        not_before: from,
        not_after: until,
    };
    let leaf = ca::issue(&authority, &spec).unwrap();
    (leaf.cert_pem, leaf.key_pem)
}

#[tokio::test]
async fn the_strict_inbound_listener_refuses_another_cas_certificate_an_expired_one_and_none_at_the_handshake()
 {
    let mesh = Mesh::start("strict").await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // The control: a valid mesh certificate gets through to the instance.
    let (cert, key) = leaf(&mesh.ca, "probe", now - hour, now + hour);
    let (_, answer) = tls_get(&tls_client(Some((&cert, &key))), mesh.inbound_b)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("web@b /raw"), "{answer}");
    let refused_before = mesh.tls_count("tls", "refused").await;
    let hits_before = mesh.web.hits();

    // Another CA of the same name (its signature does not verify with the mesh CA's key), and
    // another trust domain's (an unknown issuer).
    let twin = mesh.dir.path().join("twin-ca");
    ca::init(&twin, "mesh.test").unwrap();
    let (twin_cert, twin_key) = leaf(&twin, "a", now - hour, now + hour);
    let other = mesh.dir.path().join("other-ca");
    ca::init(&other, "other.test").unwrap();
    let (other_cert, other_key) = leaf(&other, "a", now - hour, now + hour);
    let (old_cert, old_key) = leaf(&mesh.ca, "a", now - 2 * hour, now - hour);
    let cases = [
        (
            "a certificate of another CA with the mesh CA's name",
            Some((&twin_cert[..], &twin_key[..])),
            "DecryptError",
        ),
        (
            "a certificate of another trust domain's CA",
            Some((&other_cert[..], &other_key[..])),
            "UnknownCA",
        ),
        (
            "an expired certificate",
            Some((&old_cert[..], &old_key[..])),
            "CertificateExpired",
        ),
        ("no certificate", None, "CertificateRequired"),
    ];
    for (n, (case, identity, alert)) in cases.into_iter().enumerate() {
        let got = tls_get(&tls_client(identity), mesh.inbound_b).await;
        let error = got.expect_err(&format!("{case}: answered"));
        assert_eq!(error, format!("received fatal alert: {alert}"), "{case}");
        // Counted as a refused handshake, not as a request.
        let refused = mesh.tls_count("tls", "refused").await;
        assert_eq!(refused, refused_before + n as f64 + 1.0, "{case}");
    }
    assert_eq!(mesh.web.hits(), hits_before, "a refused client reached web");
    mesh.stop().await;
}

#[tokio::test]
async fn strict_refuses_plain_http_on_the_inbound_listener_and_permissive_takes_and_counts_it() {
    let request = b"GET /service/web/plain HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";

    let mesh = Mesh::start("strict").await;
    let answer = raw(mesh.inbound_b, request).await;
    assert_eq!(answer, "", "strict mode answered plain HTTP");
    assert_eq!(mesh.tls_count("plain", "refused").await, 1.0);
    assert_eq!(mesh.tls_count("plain", "accepted").await, 0.0);
    mesh.stop().await;

    let mut mesh = Mesh::start("permissive").await;
    let answer = raw(mesh.inbound_b, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("web@b /plain"), "{answer}");
    assert_eq!(mesh.tls_count("plain", "accepted").await, 1.0);
    // Node a still dials over TLS.
    let reply = Client::new().get(&mesh.web_url()).await;
    assert_eq!(reply.status, 200);
    assert!(mesh.tls_count("tls", "accepted").await >= 1.0);
    let logged = mesh
        .b
        .log
        .wait_for("plain connection accepted (mesh TLS is permissive)")
        .await;
    assert!(logged["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    mesh.stop().await;
}

#[tokio::test]
async fn certificates_rotated_under_load_fail_no_request_and_new_handshakes_present_the_new_serial()
{
    let mut mesh = Mesh::start("strict").await;
    let dir = mesh.dir.path().to_owned();
    let old_b = serial_of_file(&dir.join("b.crt"));
    let probe = {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        leaf(&mesh.ca, "probe", now - hour, now + hour)
    };
    let connector = tls_client(Some((&probe.0, &probe.1)));
    let (seen, _) = tls_get(&connector, mesh.inbound_b).await.unwrap();
    assert_eq!(seen, old_b);

    // Keep-alive clients of node a's outbound listener for 6 s: the rotation must not break
    // the connections open from a to b, nor fail the ones opened meanwhile.
    let url = mesh.web_url();
    let load = tokio::spawn(async move {
        crate::support::load(&url, 4, Duration::from_secs(6), Duration::from_millis(2)).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted_before = mesh.tls_count("tls", "accepted").await;
    let new_a = issue_node(&mesh.ca, &dir, "a");
    let new_b = issue_node(&mesh.ca, &dir, "b");
    assert_ne!(new_b, old_b);
    let reloaded_a = mesh.a.log.wait_for("mesh certificate reloaded").await;
    assert_eq!(reloaded_a["serial"], new_a.as_str());
    let reloaded_b = mesh.b.log.wait_for("mesh certificate reloaded").await;
    assert_eq!(reloaded_b["serial"], new_b.as_str());
    // A new handshake with b presents its new certificate.
    let (seen, answer) = tls_get(&connector, mesh.inbound_b).await.unwrap();
    assert_eq!(seen, new_b);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // More requests at once than node a has connections open to b. Node a connects to b
    // again with its new certificate, which b accepts: a new connection for requests past
    // those open, and a new mesh link for every request (a link dialled with the old
    // certificate takes no new request).
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let url = mesh.web_url();
            tokio::spawn(async move { Client::new().get(&url).await.status })
        })
        .collect();
    for reply in burst {
        assert_eq!(reply.await.unwrap(), 200);
    }
    assert!(mesh.tls_count("tls", "accepted").await > accepted_before);

    let report = load.await.unwrap();
    assert!(report.sent > 100, "{report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    mesh.stop().await;
}

// === Gateway and bridge ===

#[tokio::test]
async fn outbound_to_gateway_gateway_to_bridge_and_bridge_to_gateway_go_over_strict_mtls_and_pods_keep_plain_http()
 {
    let dir = tempfile::tempdir().unwrap();
    let ca = init_ca(dir.path());
    let config = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[tls]\nmode = \"strict\"\nca = \"ca/ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n"
            ),
        )
        .unwrap();
        issue_node(&ca, dir.path(), name);
        path.to_str().unwrap().to_owned()
    };
    // A Kubernetes pod behind the Service `web`, and a Mesos instance of `giphy` on node m,
    // behind node m's agent.
    let pod = TestApp::spawn("pod", ip("127.0.0.5"));
    let giphy = TestApp::spawn("giphy@m", ip("127.0.0.7"));
    let dns =
        crate::upgrade::ClusterDns::start(&[("web.default.svc.cluster.local", "127.0.0.5")]).await;
    let catalog = dir.path().join("catalog.toml");
    let text = |inbound: u16| {
        format!(
            "[[node]]\nname = \"m\"\naddress = \"127.0.0.7\"\ninbound_port = {inbound}\n\n\
             [[service]]\nname = \"giphy\"\nnode = \"m\"\nport = {}\nmeta = {{ platform = \"mesos\" }}\n",
            giphy.addr.port()
        )
    };
    std::fs::write(&catalog, text(1)).unwrap();
    let catalog = catalog.to_str().unwrap().to_owned();

    let gateway_addr = crate::support::free_addr("127.0.0.6");
    let m_config = config("m");
    let mut m = Skyline::start(
        &[
            "agent",
            "--config",
            &m_config,
            "--node-name",
            "m",
            "--node-address",
            "127.0.0.7",
            "--outbound",
            "127.0.0.7:0",
            "--catch-all",
            &gateway_addr,
            "--inbound",
            "127.0.0.7:0",
            "--admin",
            "off",
            "--catalog",
            "file",
            "--catalog-file",
            &catalog,
        ],
        &[],
    );
    let started = m.log.wait_for("agent started").await;
    let inbound_m: SocketAddr = started["inbound"].as_str().unwrap().parse().unwrap();
    let outbound_m = started["outbound"].as_str().unwrap().to_owned();
    write_atomically(Path::new(&catalog), &text(inbound_m.port()));

    let bridge_config = config("br");
    let bridge_admin = crate::support::free_addr("127.0.0.4");
    let mut bridge = Skyline::start(
        &[
            "bridge",
            "--config",
            &bridge_config,
            "--listen",
            "127.0.0.4:0,127.0.0.4:0",
            "--admin",
            &bridge_admin,
            "--dns",
            &dns.addr.to_string(),
            "--port",
            &pod.addr.port().to_string(),
            "--gateways",
            &gateway_addr,
        ],
        &[],
    );
    let started = bridge.log.wait_for("bridge started").await;
    let listen: Vec<SocketAddr> = started["listen"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let (bridge_host, service_port) = (listen[0], listen[1]);

    let gateway_config = config("gw");
    let mut gateway = Skyline::start(
        &[
            "gateway",
            "--config",
            &gateway_config,
            "--listen",
            &gateway_addr,
            "--admin",
            "off",
            "--catalog-file",
            &catalog,
            "--bridges",
            &bridge_host.to_string(),
        ],
        &[],
    );
    let started = gateway.log.wait_for("gateway started").await;
    let gateway_addr: SocketAddr = started["gateway"].as_str().unwrap().parse().unwrap();

    // A proxy's call into the gateway (a raw client with a mesh certificate): the gateway
    // sends it to its Kubernetes tier, the bridge, over mTLS; the bridge calls the pod.
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let (cert, key) = leaf(&ca, "probe", now - hour, now + hour);
    let connector = tls_client(Some((&cert, &key)));
    let (_, answer) = tls_request(&connector, gateway_addr, "/service/web/from-gateway")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("pod /from-gateway"), "{answer}");

    // A pod's plain call on the bridge's Service port: the bridge sends it to the gateway
    // over mTLS, which sends it to node m's inbound proxy over mTLS (the catalog is read
    // every 50 ms: bounded retries until node m's port is known).
    let client = Client::new();
    let mut reply = None;
    for _ in 0..100 {
        let req = http::Request::get(format!("http://{service_port}/from-pod"))
            .header(http::header::HOST, "giphy.default.svc.cluster.local")
            .body(http_body_util::Full::default())
            .unwrap();
        let got = client.send(req).await.unwrap();
        if got.status == 200 {
            reply = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = reply.expect("the pod's call never reached giphy on node m");
    assert_eq!(reply.body, "giphy@m /from-pod");

    // An application on node m calls a service its catalog does not know: node m's outbound
    // proxy sends it to its catch-all, the gateway, over mTLS, and on to the pod.
    let reply = client
        .get(&format!("http://{outbound_m}/service/web/from-node"))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "pod /from-node");

    // The bridge's host port is strict: plain HTTP is refused there.
    let plain = raw(
        bridge_host,
        b"GET /service/web/x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(plain, "");
    let metrics = scrape(bridge_admin.parse().unwrap()).await;
    let series = |t: &str, o: &str| {
        format!("skyline_mesh_connections_total{{transport=\"{t}\",outcome=\"{o}\"}}")
    };
    assert!(metrics.count(&series("tls", "accepted")) >= 1.0);
    assert_eq!(metrics.count(&series("plain", "refused")), 1.0);
    assert_eq!(pod.hits(), 2);

    for process in [&m, &bridge, &gateway] {
        process.sigterm();
    }
    m.exited_cleanly().await;
    bridge.exited_cleanly().await;
    gateway.exited_cleanly().await;
}
