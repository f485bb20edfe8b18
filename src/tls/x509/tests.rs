#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

struct Made {
    cert: Certificate,
    key: KeyPair,
}

fn make(cn: &str, ca: bool, uri: Option<&str>, issuer: Option<&Made>, rsa: bool) -> Made {
    let key = if rsa {
        KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
    } else {
        KeyPair::generate().unwrap()
    };
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    }
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
    };
    Made { cert, key }
}

fn der(m: &Made) -> CertificateDer<'static> {
    m.cert.der().clone()
}

fn files(dir: &Path, leaf: &Made, chain: &[&Made], key: &KeyPair) -> (PathBuf, PathBuf) {
    let mut pem = leaf.cert.pem();
    for c in chain {
        pem.push_str(&c.cert.pem());
    }
    let c = dir.join("chain.pem");
    let k = dir.join("key.pem");
    std::fs::write(&c, pem).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

const URI: &str = "https://proxy.test/t";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn chains_verify_to_their_anchor_only() {
    let root = make("root", true, None, None, false);
    let inter = make("inter", true, None, Some(&root), false);
    let leaf = make("leaf", false, Some(URI), Some(&inter), false);
    let other = make("other", true, None, None, false);
    let anchors = TrustAnchors::from_certs(vec![der(&root)]);
    anchors
        .verify_chain(&[der(&leaf), der(&inter)], now())
        .unwrap();
    // Without the intermediate, to another anchor, a CA as the leaf, empty.
    assert_eq!(
        anchors.verify_chain(&[der(&leaf)], now()),
        Err(ChainError::Untrusted)
    );
    let elsewhere = TrustAnchors::from_certs(vec![der(&other)]);
    assert_eq!(
        elsewhere.verify_chain(&[der(&leaf), der(&inter)], now()),
        Err(ChainError::Untrusted)
    );
    assert_eq!(
        anchors.verify_chain(&[der(&inter)], now()),
        Err(ChainError::CaAsLeaf)
    );
    assert_eq!(anchors.verify_chain(&[], now()), Err(ChainError::Empty));
    // A self-signed leaf that is no anchor.
    let selfish = make("selfish", false, Some(URI), None, false);
    assert_eq!(
        anchors.verify_chain(&[der(&selfish)], now()),
        Err(ChainError::Untrusted)
    );
    // Long after rcgen's default validity: expired.
    assert_eq!(
        anchors.verify_chain(&[der(&leaf), der(&inter)], 70_000_000_000),
        Err(ChainError::Expired)
    );
}

#[test]
fn an_identity_signs_a_jws_its_leaf_key_verifies() {
    for rsa in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = make("root", true, None, None, false);
        let leaf = make("leaf", false, Some(URI), Some(&root), rsa);
        let (c, k) = files(dir.path(), &leaf, &[], &leaf.key);
        let id = SigningIdentity::from_pem_files(&c, &k).unwrap();
        assert_eq!(id.alg(), if rsa { JwsAlg::RS256 } else { JwsAlg::ES256 });
        assert_eq!(id.leaf().uris, vec![URI.to_owned()]);
        let anchors = TrustAnchors::from_certs(vec![der(&root)]);
        id.check_for(&anchors, URI, now()).unwrap();
        let wrong = id
            .check_for(&anchors, "https://proxy.test/u", now())
            .unwrap_err();
        assert!(
            wrong.contains("not a URI subject alternative name"),
            "{wrong}"
        );

        let claims = serde_json::json!({"iss": URI, "sub": URI, "exp": now() + 60});
        let jws = id.sign_jws(&claims).unwrap();
        let header = jsonwebtoken::decode_header(&jws).unwrap();
        assert_eq!(header.x5c.as_deref(), Some(&id.x5c()[..]));
        let key = match public_key(leaf.cert.der()).unwrap() {
            PublicKey::Rsa(d) => jsonwebtoken::DecodingKey::from_rsa_der(&d),
            PublicKey::Ec { point, .. } => jsonwebtoken::DecodingKey::from_ec_der(&point),
        };
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.validate_aud = false;
        let got = jsonwebtoken::decode::<serde_json::Value>(&jws, &key, &v).unwrap();
        assert_eq!(got.claims["sub"], URI);
        // Debug never shows the key.
        let shown = format!("{id:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = make("leaf", false, Some(URI), None, false);
    let stranger = KeyPair::generate().unwrap();
    let (c, k) = files(dir.path(), &leaf, &[], &stranger);
    let (file, message) = SigningIdentity::from_pem_files(&c, &k).unwrap_err();
    assert_eq!(file, IdentityFile::Key);
    assert!(message.contains("does not belong"), "{message}");
}

#[test]
fn ecdsa_signatures_become_fixed_width() {
    // r with a leading zero byte (high bit set), s short.
    let mut der = vec![0x30, 0x00, 0x02, 33, 0x00];
    der.extend([0x80; 32]);
    der.extend([0x02, 2, 0x01, 0x02]);
    der[1] = (der.len() - 2) as u8;
    let raw = ecdsa_der_to_raw(&der, 32).unwrap();
    assert_eq!(raw.len(), 64);
    assert_eq!(&raw[..32], &[0x80; 32]);
    assert_eq!(&raw[62..], &[0x01, 0x02]);
    assert!(ecdsa_der_to_raw(&[0x31, 0], 32).is_none());
    assert!(ecdsa_der_to_raw(&der[..10], 32).is_none());
}

#[test]
fn x5c_values_are_bounded_base64() {
    assert_eq!(decode_x5c(&[]), Err(ChainError::Empty));
    assert_eq!(
        decode_x5c(&["not base64!".into()]),
        Err(ChainError::Malformed)
    );
    let many = vec!["AA==".to_owned(); MAX_CHAIN + 1];
    assert_eq!(decode_x5c(&many), Err(ChainError::TooLong));
}
