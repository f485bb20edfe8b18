//! TLS material: PEM certificate chains and private keys read from files, and the
//! rustls client configurations of connections that trust a private CA or present a
//! client certificate (mTLS towards the upstream FHIR server and OpenFGA).
//!
//! Part of the shared model (layer 0): configuration validation loads a tenant's files
//! once per load of `tenants.json`, so an unreadable or inconsistent file is refused at
//! start-up or reload with the tenant and key named, and the clients use the loaded
//! configuration as it is. The HTTPS listener (`server::tls`) reads its certificate with
//! the same functions. [`x509`] holds the UDAP signing identities and trust anchors.

pub mod x509;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Largest PEM file read (a certificate chain, a key or a CA bundle).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The crypto provider of every TLS connection: aws-lc-rs, as hyper-rustls and reqwest
/// are built with, named explicitly so no process-wide default has to be installed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The bytes of a PEM file, at most [`MAX_PEM_BYTES`].
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "`{}` is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("`{}`: {e}", path.display()))
}

/// Every certificate of a PEM text, in order; at least one.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no `CERTIFICATE` in the file".into());
    }
    Ok(certs)
}

/// The private key of a PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    // The error is not shown: it could quote key material.
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| "no PEM private key in the file".into())
}

/// Which file of a [`ClientTls`] failed to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Ca,
    ClientCert,
    ClientKey,
}

/// The TLS settings of one client connection (`upstream.tls`,
/// `authorization.openfga.tls`), loaded: whom to trust (the CA file's certificates, or
/// the system's roots) and the client certificate to present, if any.
///
/// Each load has its own [`ClientTls::id`], so a connection pool built for it is never
/// reused for other files (a reload re-reads the files and gets a new id). Two loads
/// are equal (`==`) when they read the same files with the same bytes, so a reload can
/// tell an unchanged setting from a changed one.
#[derive(Clone)]
pub struct ClientTls {
    id: u64,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    /// The bytes of the CA, certificate and key files as read (never shown).
    material: Arc<[Vec<u8>; 3]>,
    config: Arc<rustls::ClientConfig>,
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.client_cert_file == other.client_cert_file
            && self.material == other.material
    }
}

impl Eq for ClientTls {}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the files: `ca_file` replaces the system's roots (a private PKI); `identity`
    /// is the client certificate chain and its key, which must match.
    pub fn load(
        ca_file: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, (TlsFile, String)> {
        let mut material: [Vec<u8>; 3] = Default::default();
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let pem = read_pem_file(path).map_err(|m| (TlsFile::Ca, m))?;
                material[0].clone_from(&pem);
                let certs = parse_certs(&pem).map_err(|m| (TlsFile::Ca, m))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| (TlsFile::Ca, format!("not a usable CA certificate: {e}")))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (_, _) = roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err((
                        TlsFile::Ca,
                        "no system CA certificates were found; give `ca_file`".into(),
                    ));
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| (TlsFile::Ca, format!("tls: {e}")))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let pem = read_pem_file(cert_path).map_err(|m| (TlsFile::ClientCert, m))?;
                let chain = parse_certs(&pem).map_err(|m| (TlsFile::ClientCert, m))?;
                material[1] = pem;
                let pem = read_pem_file(key_path).map_err(|m| (TlsFile::ClientKey, m))?;
                let key = parse_key(&pem).map_err(|m| (TlsFile::ClientKey, m))?;
                material[2] = pem;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| (TlsFile::ClientKey, key_error(&e)))?
            }
        };
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(ClientTls {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            ca_file: ca_file.map(Path::to_owned),
            client_cert_file: identity.map(|(c, _)| c.to_owned()),
            material: Arc::new(material),
            config: Arc::new(config),
        })
    }

    /// Unique per load.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What is trusted and presented, for `check-config`.
    pub fn summary(&self) -> String {
        let trust = match &self.ca_file {
            Some(p) => format!("trusts {}", p.display()),
            None => "trusts the system roots".to_owned(),
        };
        match &self.client_cert_file {
            Some(p) => format!("{trust}, presents {}", p.display()),
            None => trust,
        }
    }

    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.client_cert_file.is_some()
    }

    /// The rustls configuration (no ALPN set: the HTTP client sets its own).
    pub fn config(&self) -> &rustls::ClientConfig {
        &self.config
    }
}

/// A certificate/key pair rustls refused, in words.
pub fn key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate".into()
        }
        other => format!("the certificate and key are not usable: {other}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            Pki {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_a_ca_and_a_matching_identity() {
        let pki = Pki::new();
        let (ca, _) = pair("ca.test");
        let (cert, key) = pair("client.test");
        let ca = pki.write("ca.pem", &ca);
        let c = pki.write("c.pem", &cert);
        let k = pki.write("k.pem", &key);
        let a = ClientTls::load(Some(&ca), Some((&c, &k))).unwrap();
        let b = ClientTls::load(Some(&ca), None).unwrap();
        assert!(a.has_identity());
        assert!(!b.has_identity());
        assert_ne!(a.id(), b.id(), "every load has its own id");
        // The same files read again are equal; other bytes are not.
        let again = ClientTls::load(Some(&ca), Some((&c, &k))).unwrap();
        assert_ne!(again.id(), a.id());
        assert_eq!(again, a);
        assert_ne!(a, b);
        let (cert2, key2) = pair("client.test");
        std::fs::write(&c, &cert2).unwrap();
        std::fs::write(&k, &key2).unwrap();
        assert_ne!(ClientTls::load(Some(&ca), Some((&c, &k))).unwrap(), a);
        assert!(a.config().client_auth_cert_resolver.has_certs());
        assert!(!b.config().client_auth_cert_resolver.has_certs());
        // Debug names the files, never key material.
        let shown = format!("{a:?}");
        assert!(shown.contains("c.pem"), "{shown}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }

    #[test]
    fn refuses_a_key_of_another_certificate() {
        let pki = Pki::new();
        let (ca, _) = pair("ca.test");
        let (cert, _) = pair("client.test");
        let (_, other_key) = pair("other.test");
        let ca = pki.write("ca.pem", &ca);
        let c = pki.write("c.pem", &cert);
        let k = pki.write("k.pem", &other_key);
        let (file, message) = ClientTls::load(Some(&ca), Some((&c, &k))).unwrap_err();
        assert_eq!(file, TlsFile::ClientKey);
        assert!(message.contains("does not belong"), "{message}");
    }

    #[test]
    fn names_the_file_that_is_broken() {
        let pki = Pki::new();
        let (cert, key) = pair("client.test");
        let c = pki.write("c.pem", &cert);
        let k = pki.write("k.pem", &key);
        let junk = pki.write("junk.pem", "not pem at all\n");
        let missing = pki.dir.path().join("missing.pem");
        type Case<'a> = (Option<&'a Path>, Option<(&'a Path, &'a Path)>, TlsFile);
        let cases: [Case<'_>; 5] = [
            (Some(&junk), None, TlsFile::Ca),
            (Some(&missing), None, TlsFile::Ca),
            (Some(&c), Some((&junk, &k)), TlsFile::ClientCert),
            (Some(&c), Some((&c, &junk)), TlsFile::ClientKey),
            // A certificate file given as the key.
            (Some(&c), Some((&c, &c)), TlsFile::ClientKey),
        ];
        for (ca, id, want) in cases {
            let (file, message) = ClientTls::load(ca, id).unwrap_err();
            assert_eq!(file, want, "{message}");
        }
        // A key file given as the CA: no certificate in it.
        let (file, message) = ClientTls::load(Some(&k), None).unwrap_err();
        assert_eq!(file, TlsFile::Ca);
        assert!(!message.contains("PRIVATE KEY-----\n"), "{message}");
    }
}
