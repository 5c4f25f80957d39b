//! The mesh CA: `skyline ca init` creates it, `skyline ca issue` signs short-lived leaf
//! certificates for the proxies with it (rcgen, ring).
//!
//! A CA folder holds `ca.crt` (the trust anchor every proxy is given as `tls.ca`) and `ca.key`
//! (mode 0600; it never leaves the machine that issues). The CA certificate carries the trust
//! domain as its URI SAN `spiffe://<trust-domain>`; a leaf carries
//! `spiffe://<trust-domain>/<kind>/<name>`, and is good for both ends of a connection (server
//! and client authentication).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The CA certificate's file in a CA folder.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file in a CA folder (mode 0600).
pub const CA_KEY: &str = "ca.key";
/// The trust domain of a CA made without `--trust-domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "skyline.local";
/// How long a CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a leaf is valid without `--ttl`.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far back a leaf's validity starts, for clocks a little behind the issuer's.
const BACKDATE: Duration = Duration::from_secs(60);

/// What a leaf certificate names: which kind of proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Node,
    Gateway,
    Bridge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Gateway => "gateway",
            Kind::Bridge => "bridge",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{} already exists; refusing to overwrite a CA", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid trust domain {0:?}: expected lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("invalid name {0:?}: expected 1 to 63 letters, digits, '.', '-' and '_'")]
    Name(String),
    #[error("cannot make the certificate")]
    Rcgen(#[from] rcgen::Error),
}

/// A CA loaded from its folder, ready to issue.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    pub trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// Its SPIFFE ID.
    pub id: String,
    /// Its serial number, hex.
    pub serial: String,
}

/// What a leaf is for and how long it is valid.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub kind: Kind,
    pub name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafSpec {
    /// Valid from now (a minute back, for skewed clocks) for `ttl`.
    pub fn for_ttl(kind: Kind, name: &str, ttl: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            kind,
            name: name.to_owned(),
            not_before: now - BACKDATE,
            not_after: now + ttl,
        }
    }
}

/// Creates a CA in `dir` (made if missing): `ca.crt` and `ca.key` (0600). Refuses when either
/// file exists.
pub fn init(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
    check_trust_domain(trust_domain)?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("skyline mesh CA {trust_domain}"),
    );
    dn.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(ia5(format!("spiffe://{trust_domain}"))?)];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key)?;
    // The key first, created 0600 and never over an existing file.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
        trust_domain: trust_domain.to_owned(),
    })
}

/// Loads the CA of `dir`.
pub fn load(dir: &Path) -> Result<Ca, CaError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let read = |path: &PathBuf| {
        fs::read_to_string(path).map_err(|source| CaError::Read {
            path: path.clone(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
    let invalid = |path: &PathBuf, reason: String| CaError::Invalid {
        path: path.clone(),
        reason,
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_path, e.to_string()))?;
    let trust_domain = super::spiffe_ids_of_pem(&cert_pem)
        .map_err(|e| invalid(&cert_path, e))?
        .into_iter()
        .find_map(|id| {
            id.strip_prefix("spiffe://")
                .filter(|d| !d.contains('/'))
                .map(str::to_owned)
        })
        .ok_or_else(|| invalid(&cert_path, "no spiffe://<trust-domain> URI SAN".into()))?;
    let issuer =
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(&cert_path, e.to_string()))?;
    Ok(Ca {
        issuer,
        cert_pem,
        trust_domain,
    })
}

/// Issues a leaf for `spec`, signed by `ca`.
pub fn issue(ca: &Ca, spec: &LeafSpec) -> Result<Leaf, CaError> {
    check_name(&spec.name)?;
    let id = format!(
        "spiffe://{}/{}/{}",
        ca.trust_domain,
        spec.kind.as_str(),
        spec.name
    );
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{}/{}", spec.kind.as_str(), spec.name),
    );
    dn.push(DnType::OrganizationName, ca.trust_domain.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(ia5(id.clone())?)];
    params.use_authority_key_identifier_extension = true;
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    let serial = serial();
    let serial_hex = hex(&serial.to_bytes());
    params.serial_number = Some(serial);
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        id,
        serial: serial_hex,
    })
}

/// Writes `leaf` as `<out>.crt` and `<out>.key` (0600), each replaced whole (written aside,
/// then renamed over), so a proxy reloading them never reads half a file. Returns both paths.
pub fn write_leaf(leaf: &Leaf, out: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    let cert_path = with_suffix(out, "crt");
    let key_path = with_suffix(out, "key");
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| CaError::Write {
            path: parent.to_owned(),
            source,
        })?;
    }
    replace(&key_path, leaf.key_pem.as_bytes(), 0o600)?;
    replace(&cert_path, leaf.cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// `out` with `.suffix` appended to its file name.
fn with_suffix(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let aside = with_suffix(path, &format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&aside);
    write_new(&aside, bytes, mode)?;
    fs::rename(&aside, path).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A random positive 128-bit serial number, from the system's secure generator (the crypto
/// provider's); the clock's nanoseconds should it fail.
fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let random = rustls::crypto::ring::default_provider().secure_random;
    if random.fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ia5(text: String) -> Result<Ia5String, CaError> {
    Ia5String::try_from(text).map_err(CaError::Rcgen)
}

fn check_trust_domain(domain: &str) -> Result<(), CaError> {
    let ok = !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| CaError::TrustDomain(domain.to_owned()))
}

fn check_name(name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| CaError::Name(name.to_owned()))
}
