//! X.509 material for UDAP: a signing identity (a private key and its certificate
//! chain, from PEM files or a PKCS#12 file), trust anchors, chain verification, the
//! facts of a leaf certificate (URI SANs, validity) and compact JWS signing with the
//! identity's key.
//!
//! Part of the shared model (layer 0), under `tls`: configuration validation loads a
//! tenant's UDAP files once per load of `tenants.json`, so a broken identity (unreadable
//! file, key of another certificate, a chain that does not verify to the configured
//! anchors, the base URL not a SAN, an expired leaf) is refused at start-up or reload;
//! the token stage verifies `x5c` chains with [`TrustAnchors::verify_chain`].
//!
//! Chains are verified by rustls-webpki (the TLS stack's path builder, with the aws-lc-rs
//! algorithms): signatures, validity periods, basic constraints (a CA certificate is
//! never accepted as the leaf), name constraints and extended key usage (none, or
//! client or server authentication). x509-parser reads what webpki does not expose.
//! Private keys never leave [`SigningIdentity`]: it formats without them and errors never
//! quote them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::sign::SigningKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

/// Most certificates accepted in a chain (a file's or a token's `x5c`).
pub const MAX_CHAIN: usize = 8;

/// Largest PKCS#12 file read.
const MAX_P12_BYTES: u64 = 1024 * 1024;

/// The JWS algorithm an identity signs with, chosen by its key: RS256 for RSA keys,
/// ES256 or ES384 for P-256 and P-384 keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwsAlg {
    RS256,
    ES256,
    ES384,
}

impl JwsAlg {
    pub fn name(self) -> &'static str {
        match self {
            JwsAlg::RS256 => "RS256",
            JwsAlg::ES256 => "ES256",
            JwsAlg::ES384 => "ES384",
        }
    }
    fn scheme(self) -> SignatureScheme {
        match self {
            JwsAlg::RS256 => SignatureScheme::RSA_PKCS1_SHA256,
            JwsAlg::ES256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            JwsAlg::ES384 => SignatureScheme::ECDSA_NISTP384_SHA384,
        }
    }
    /// Bytes of one of `r`, `s` in a JWS ECDSA signature.
    fn ec_width(self) -> Option<usize> {
        match self {
            JwsAlg::RS256 => None,
            JwsAlg::ES256 => Some(32),
            JwsAlg::ES384 => Some(48),
        }
    }
}

/// What a certificate says about itself (read, not verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    /// `uniformResourceIdentifier` subject alternative names.
    pub uris: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    /// `notAfter` as text (`Dec  4 21:38:29 2036 +00:00`), for messages.
    pub not_after_text: String,
    pub is_ca: bool,
}

/// The public key of a certificate, in the forms JWT libraries take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// A PKCS#1 `RSAPublicKey` (DER).
    Rsa(Vec<u8>),
    /// An uncompressed EC point and its curve.
    Ec { curve: EcCurve, point: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcCurve {
    P256,
    P384,
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

fn parse(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(cert)
}

/// The facts of a DER certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, String> {
    use x509_parser::extensions::GeneralName;
    let cert = parse(der)?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push((*u).to_owned());
            }
        }
    }
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        uris,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        not_after_text: cert.validity().not_after.to_string(),
        is_ca: cert.is_ca(),
    })
}

/// The public key of a DER certificate (RSA, or EC on P-256/P-384).
pub fn public_key(der: &[u8]) -> Result<PublicKey, String> {
    let cert = parse(der)?;
    let spki = cert.public_key();
    let bits = spki.subject_public_key.data.to_vec();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        OID_RSA => Ok(PublicKey::Rsa(bits)),
        OID_EC => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let curve = match curve.as_deref() {
                Some(OID_P256) => EcCurve::P256,
                Some(OID_P384) => EcCurve::P384,
                _ => return Err("the EC key is not on P-256 or P-384".into()),
            };
            Ok(PublicKey::Ec { curve, point: bits })
        }
        other => Err(format!("unsupported public key algorithm `{other}`")),
    }
}

/// The DER `SubjectPublicKeyInfo` of a certificate.
fn spki_der(der: &[u8]) -> Result<Vec<u8>, String> {
    Ok(parse(der)?.public_key().raw.to_vec())
}

/// Certificates a chain must lead to (a community's or the tenant's own anchors).
#[derive(Clone)]
pub struct TrustAnchors {
    files: Vec<PathBuf>,
    certs: Arc<Vec<CertificateDer<'static>>>,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("files", &self.files)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("the chain has more than {MAX_CHAIN} certificates")]
    TooLong,
    #[error("a certificate of the chain is malformed")]
    Malformed,
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not valid yet")]
    NotYetValid,
    #[error("the chain does not lead to a trusted anchor")]
    Untrusted,
    #[error("a CA certificate cannot be the leaf")]
    CaAsLeaf,
    #[error("the certificate is not valid for this use: {0}")]
    Other(String),
}

impl TrustAnchors {
    /// Reads every certificate of the PEM files (at least one).
    pub fn load(files: &[PathBuf]) -> Result<TrustAnchors, String> {
        if files.is_empty() {
            return Err("at least one trust anchor file is required".into());
        }
        let mut certs = Vec::new();
        for f in files {
            let pem = super::read_pem_file(f)?;
            for c in super::parse_certs(&pem).map_err(|m| format!("`{}`: {m}", f.display()))? {
                webpki::anchor_from_trusted_cert(&c)
                    .map_err(|e| format!("`{}`: not a usable trust anchor: {e}", f.display()))?;
                certs.push(c);
            }
        }
        Ok(TrustAnchors {
            files: files.to_vec(),
            certs: Arc::new(certs),
        })
    }

    /// Anchors from DER certificates (tests, and nothing else reads them from memory).
    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> TrustAnchors {
        TrustAnchors {
            files: Vec::new(),
            certs: Arc::new(certs),
        }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Verifies `chain` (leaf first, then intermediates; an anchor may end it) to one of
    /// the anchors at time `now` (seconds since the epoch).
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>], now: u64) -> Result<(), ChainError> {
        let (leaf, intermediates) = chain.split_first().ok_or(ChainError::Empty)?;
        if chain.len() > MAX_CHAIN {
            return Err(ChainError::TooLong);
        }
        let anchors: Vec<_> = self
            .certs
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| ChainError::Malformed)?;
        let algs = super::provider().signature_verification_algorithms.all;
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
        let verified = ee.verify_for_usage(
            algs,
            &anchors,
            intermediates,
            time,
            AnyAuthUsage,
            None,
            None,
        );
        verified.map(|_| ()).map_err(|e| match e {
            webpki::Error::CertExpired { .. } => ChainError::Expired,
            webpki::Error::CertNotValidYet { .. } => ChainError::NotYetValid,
            webpki::Error::UnknownIssuer
            | webpki::Error::InvalidSignatureForPublicKey
            | webpki::Error::UnsupportedSignatureAlgorithmContext(_)
            | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
                ChainError::Untrusted
            }
            webpki::Error::CaUsedAsEndEntity => ChainError::CaAsLeaf,
            webpki::Error::BadDer | webpki::Error::BadDerTime => ChainError::Malformed,
            other => ChainError::Other(format!("{other:?}")),
        })
    }
}

/// Extended key usage of a UDAP leaf: none, or one naming client or server
/// authentication (a UDAP certificate signs metadata and tokens, and many are issued
/// for TLS as well).
#[derive(Clone, Copy, Debug)]
struct AnyAuthUsage;

impl webpki::ExtendedKeyUsageValidator for AnyAuthUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let server = webpki::KeyPurposeId::new(&[0x2b, 6, 1, 5, 5, 7, 3, 1]);
        let client = webpki::KeyPurposeId::new(&[0x2b, 6, 1, 5, 5, 7, 3, 2]);
        let mut present = Vec::new();
        for purpose in iter {
            let purpose = purpose?;
            if purpose == server || purpose == client {
                return Ok(());
            }
            present.push(purpose.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

/// A private key and its certificate chain (leaf first), checked to belong together.
#[derive(Clone)]
pub struct SigningIdentity {
    source: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn SigningKey>,
    alg: JwsAlg,
    leaf: CertFacts,
}

impl fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningIdentity")
            .field("source", &self.source)
            .field("subject", &self.leaf.subject)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Which file of an identity failed to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityFile {
    Chain,
    Key,
    Pkcs12,
}

impl SigningIdentity {
    /// From a PEM chain file (leaf first) and a PEM key file (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(
        chain_file: &Path,
        key_file: &Path,
    ) -> Result<SigningIdentity, (IdentityFile, String)> {
        let pem = super::read_pem_file(chain_file).map_err(|m| (IdentityFile::Chain, m))?;
        let chain = super::parse_certs(&pem).map_err(|m| (IdentityFile::Chain, m))?;
        let pem = super::read_pem_file(key_file).map_err(|m| (IdentityFile::Key, m))?;
        let key = super::parse_key(&pem).map_err(|m| (IdentityFile::Key, m))?;
        Self::new(chain_file, chain, &key)
    }

    /// From a PKCS#12 file (PBES2/AES encryption, as OpenSSL 3 writes by default).
    pub fn from_pkcs12_file(
        file: &Path,
        password: &str,
    ) -> Result<SigningIdentity, (IdentityFile, String)> {
        let bad = |m: String| (IdentityFile::Pkcs12, m);
        let meta =
            std::fs::metadata(file).map_err(|e| bad(format!("`{}`: {e}", file.display())))?;
        if meta.len() > MAX_P12_BYTES {
            return Err(bad(format!(
                "`{}` is larger than {MAX_P12_BYTES} bytes",
                file.display()
            )));
        }
        let data = std::fs::read(file).map_err(|e| bad(format!("`{}`: {e}", file.display())))?;
        // The library's error is not shown beyond its kind: it never quotes the password.
        let store = p12_keystore::KeyStore::from_pkcs12(
            &data,
            password,
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|e| {
            bad(format!(
                "`{}` cannot be read (wrong password, or legacy RC2/3DES encryption: re-export with AES): {e}",
                file.display()
            ))
        })?;
        let (_, entry) = store.private_key_chain().ok_or_else(|| {
            bad(format!(
                "`{}` holds no private key with its certificate",
                file.display()
            ))
        })?;
        let chain: Vec<CertificateDer<'static>> = entry
            .certs()
            .iter()
            .map(|c| CertificateDer::from(c.as_der().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(entry.key().as_der().to_vec()));
        Self::new(file, chain, &key).map_err(|(_, m)| bad(m))
    }

    fn new(
        source: &Path,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
    ) -> Result<SigningIdentity, (IdentityFile, String)> {
        let leaf_der = chain
            .first()
            .ok_or((IdentityFile::Chain, "no certificate".to_owned()))?;
        if chain.len() > MAX_CHAIN {
            return Err((
                IdentityFile::Chain,
                format!("more than {MAX_CHAIN} certificates"),
            ));
        }
        let leaf = cert_facts(leaf_der).map_err(|m| (IdentityFile::Chain, m))?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(key).map_err(|_| {
            (
                IdentityFile::Key,
                "not a usable RSA or EC private key".to_owned(),
            )
        })?;
        let leaf_spki = spki_der(leaf_der).map_err(|m| (IdentityFile::Chain, m))?;
        let matches = signing
            .public_key()
            .is_some_and(|k| k.as_ref() == leaf_spki.as_slice());
        if !matches {
            return Err((
                IdentityFile::Key,
                "the private key does not belong to the first certificate of the chain".into(),
            ));
        }
        let alg = match (signing.algorithm(), public_key(leaf_der)) {
            (SignatureAlgorithm::RSA, _) => JwsAlg::RS256,
            (SignatureAlgorithm::ECDSA, Ok(PublicKey::Ec { curve, .. })) => match curve {
                EcCurve::P256 => JwsAlg::ES256,
                EcCurve::P384 => JwsAlg::ES384,
            },
            _ => {
                return Err((
                    IdentityFile::Key,
                    "the key is not RSA or EC on P-256/P-384".into(),
                ));
            }
        };
        Ok(SigningIdentity {
            source: source.to_owned(),
            chain,
            key: signing,
            alg,
            leaf,
        })
    }

    pub fn alg(&self) -> JwsAlg {
        self.alg
    }

    pub fn leaf(&self) -> &CertFacts {
        &self.leaf
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The file it was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The `x5c` header value: the chain, leaf first, each certificate base64 DER.
    pub fn x5c(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|c| STANDARD.encode(c.as_ref()))
            .collect()
    }

    /// Checks that the identity may sign for `uri` at `now`: the chain verifies to
    /// `anchors`, and `uri` is a `uniformResourceIdentifier` SAN of the leaf.
    pub fn check_for(&self, anchors: &TrustAnchors, uri: &str, now: u64) -> Result<(), String> {
        if !self.leaf.uris.iter().any(|u| u == uri) {
            let found = if self.leaf.uris.is_empty() {
                "none".to_owned()
            } else {
                self.leaf
                    .uris
                    .iter()
                    .map(|u| format!("`{u}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "`{uri}` is not a URI subject alternative name of the certificate (it has: {found})"
            ));
        }
        anchors.verify_chain(&self.chain, now).map_err(|e| {
            let anchors = anchors
                .files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            format!("the certificate chain does not verify to {anchors}: {e}")
        })
    }

    /// A compact JWS of `claims` with header `{alg, typ: JWT, x5c}`.
    pub fn sign_jws(&self, claims: &serde_json::Value) -> Result<String, String> {
        let header = serde_json::json!({
            "alg": self.alg.name(),
            "typ": "JWT",
            "x5c": self.x5c(),
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signer = self
            .key
            .choose_scheme(&[self.alg.scheme()])
            .ok_or("the key cannot sign with its algorithm")?;
        let sig = signer
            .sign(input.as_bytes())
            .map_err(|e| format!("signing failed: {e}"))?;
        let sig = match self.alg.ec_width() {
            None => sig,
            Some(width) => ecdsa_der_to_raw(&sig, width).ok_or("malformed ECDSA signature")?,
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// An ASN.1 `ECDSA-Sig-Value` (`SEQUENCE { r INTEGER, s INTEGER }`) as the JWS form:
/// `r || s`, each left-padded to `width` bytes.
fn ecdsa_der_to_raw(der: &[u8], width: usize) -> Option<Vec<u8>> {
    fn len_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
        let first = *b.get(i)?;
        if first < 0x80 {
            Some((first as usize, i + 1))
        } else if first == 0x81 {
            Some((*b.get(i + 1)? as usize, i + 2))
        } else {
            None
        }
    }
    if *der.first()? != 0x30 {
        return None;
    }
    let (_, mut i) = len_at(der, 1)?;
    let mut out = Vec::with_capacity(width * 2);
    for _ in 0..2 {
        if *der.get(i)? != 0x02 {
            return None;
        }
        let (len, start) = len_at(der, i + 1)?;
        let mut int = der.get(start..start + len)?;
        while int.len() > width && int.first() == Some(&0) {
            int = &int[1..];
        }
        if int.len() > width {
            return None;
        }
        out.extend(std::iter::repeat_n(0u8, width - int.len()));
        out.extend_from_slice(int);
        i = start + len;
    }
    Some(out)
}

/// Decodes an `x5c` header value: base64 (standard alphabet) DER certificates.
pub fn decode_x5c(x5c: &[String]) -> Result<Vec<CertificateDer<'static>>, ChainError> {
    if x5c.is_empty() {
        return Err(ChainError::Empty);
    }
    if x5c.len() > MAX_CHAIN {
        return Err(ChainError::TooLong);
    }
    x5c.iter()
        .map(|c| {
            STANDARD
                .decode(c)
                .map(CertificateDer::from)
                .map_err(|_| ChainError::Malformed)
        })
        .collect()
}

#[cfg(test)]
mod tests;
