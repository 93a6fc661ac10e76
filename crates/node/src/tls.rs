//! The TCP listener's TLS identity: the node certificate made at first
//! start (its own key pair; the host's name and addresses as SANs; kept in
//! `DATA/tls/` with mode 0600), or a certificate and key the user gives.
//! Clients trust it by its SHA-256 fingerprint.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, ServerConfig};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("the certificate {cert} and the key {key} do not go together: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot make the node certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The certificate and key a user gave (`--tls-cert`, `--tls-key`).
#[derive(Clone, Debug)]
pub struct Given {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the listener serves with.
#[derive(Clone, Debug)]
pub struct Identity {
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub fingerprint: String,
    pub cert_path: PathBuf,
}

pub fn dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of_file(path: &Path) -> Result<String, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    CertificateDer::pem_slice_iter(&pem)
        .find_map(Result::ok)
        .map(|der| fingerprint(&der))
        .ok_or_else(|| TlsError::NoCertificate {
            path: path.to_owned(),
        })
}

/// The given certificate, or the node's own (made now if there is none).
pub fn identity(data: &Path, given: Option<&Given>) -> Result<Identity, TlsError> {
    let (cert, key) = match given {
        Some(given) => (given.cert.clone(), given.key.clone()),
        None => {
            let dir = dir(data);
            let (cert, key) = (dir.join("node.crt"), dir.join("node.key"));
            if !cert.exists() {
                make(&dir, &cert, &key)?;
            }
            (cert, key)
        }
    };
    load(&cert, &key)
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        path: key_path.to_owned(),
    })?;
    let mismatch = |source| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(mismatch)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity {
        config: Arc::new(config),
        fingerprint,
        cert_path: cert_path.to_owned(),
    })
}

/// A new key pair and a self-signed certificate for this host's names
/// and addresses, valid for ten years.
fn make(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    let mut params = rcgen::CertificateParams::new(dns_names())?;
    params
        .subject_alt_names
        .extend(addresses().into_iter().map(rcgen::SanType::IpAddress));
    let mut name = rcgen::DistinguishedName::new();
    name.push(
        rcgen::DnType::CommonName,
        format!("quetzald on {}", hostname()),
    );
    params.distinguished_name = name;
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let pair = rcgen::KeyPair::generate()?;
    let certificate = params.self_signed(&pair)?;
    write_private(key, pair.serialize_pem().as_bytes())?;
    write_private(cert, certificate.pem().as_bytes())?;
    tracing::info!(cert = %cert.display(), "made the node's TLS certificate");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn dns_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    let host = hostname();
    if host != "localhost" && !host.is_empty() {
        names.push(host);
    }
    names
}

/// Loopback and every address of this host's interfaces.
fn addresses() -> Vec<IpAddr> {
    let mut all = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if let Ok(interfaces) = nix::ifaddrs::getifaddrs() {
        for interface in interfaces {
            let Some(address) = interface.address else {
                continue;
            };
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !all.contains(&ip) {
                all.push(ip);
            }
        }
    }
    all
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    // 365.2425 days a year: off by at most a day around New Year, and the
    // certificate starts a year early.
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

/// SHA-256 of a certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Accepts exactly the certificate with the pinned fingerprint (any, when
/// none is pinned: then it only records what it saw, and the caller
/// decides). Handshake signatures are checked as usual.
#[derive(Debug)]
pub struct Pinned {
    pin: Option<String>,
    /// The fingerprint the server presented.
    pub seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    pub fn new(pin: Option<String>, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Pinned {
            pin,
            seen: Mutex::new(None),
            provider,
        })
    }

    pub fn seen(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|seen| seen.clone())
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity);
        if let Ok(mut slot) = self.seen.lock() {
            *slot = Some(seen.clone());
        }
        match &self.pin {
            Some(pin) if *pin == seen => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::General("not the pinned certificate".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that trusts only the certificate whose
/// fingerprint is `pin` (and, with none, records what it saw and refuses).
pub fn pinned_client(pin: Option<String>) -> (Arc<Pinned>, rustls::ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned::new(pin, Arc::clone(&provider));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring's provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (verifier, config)
}

/// What `--listen` was given, for the log and the plain-HTTP refusal.
pub fn https_url(addr: SocketAddr) -> String {
    format!("https://{addr}/")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn makes_a_private_certificate_once_and_keeps_it() {
        let data = tempfile::tempdir().unwrap();

        let first = identity(data.path(), None).unwrap();
        let second = identity(data.path(), None).unwrap();

        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);
        for file in ["node.crt", "node.key"] {
            let mode = std::fs::metadata(dir(data.path()).join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn a_certificate_with_another_key_is_refused() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        identity(one.path(), None).unwrap();
        identity(two.path(), None).unwrap();
        let given = Given {
            cert: dir(one.path()).join("node.crt"),
            key: dir(two.path()).join("node.key"),
        };

        let err = identity(one.path(), Some(&given)).unwrap_err();

        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let data = tempfile::tempdir().unwrap();
        let junk = data.path().join("junk");
        std::fs::write(&junk, "not a certificate").unwrap();
        let given = Given {
            cert: junk.clone(),
            key: junk.clone(),
        };

        let err = identity(data.path(), Some(&given)).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        let missing = Given {
            cert: data.path().join("missing.crt"),
            key: junk,
        };
        let err = identity(data.path(), Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");
    }
}
