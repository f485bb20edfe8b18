#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::config::{RawFile, validate};
use crate::fhir::parse_request;
use http::Method;

const BASE: &str = "https://proxy.test/t";

/// A tenant with `udap`, its certificate made now (valid until rcgen's default).
fn tenant(dir: &std::path::Path, lifetime: u64) -> TenantConfig {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(BASE.try_into().unwrap())];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = p.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let chain = write("chain.pem", leaf.pem());
    let key = write("key.pem", key.serialize_pem());
    let anchor = write("ca.pem", ca.pem());
    let raw: RawFile = serde_json::from_value(serde_json::json!({"tenants": {"t": {
        "public_base_url": BASE,
        "upstream": {"base_url": "http://127.0.0.1:9/fhir"},
        "token": {"issuers": ["https://as.test"], "jwks_uri": "https://as.test/jwks", "audience": BASE},
        "smart": {"authorization_endpoint": "https://as.test/auth", "token_endpoint": "https://as.test/token",
                  "registration_endpoint": "https://as.test/reg"},
        "authorization": {"mode": "compartment"},
        "udap": {"certificate": {"format": "pem", "chain_file": chain, "key_file": key},
                 "trust_anchor_files": [anchor],
                 "signed_metadata_lifetime_seconds": lifetime,
                 "communities": [{"uri": "urn:c", "trust_anchor_files": [anchor]}]},
    }}}))
    .unwrap();
    validate(raw).unwrap().remove(0)
}

fn request(query: &str) -> FhirRequest {
    parse_request(&Method::GET, "/.well-known/udap", Some(query), None).unwrap()
}

#[test]
fn the_community_parameter_is_one_uri() {
    assert_eq!(parse_community(&request("")).unwrap(), None);
    assert_eq!(
        parse_community(&request("community=urn%3Ac")).unwrap(),
        Some("urn:c")
    );
    for bad in [
        "community=a&community=b",
        "community=",
        "community=a%20b",
        "other=1",
        "community:exact=a",
    ] {
        let e = parse_community(&request(bad)).unwrap_err();
        assert_eq!(e.reason(), "udap_query_invalid", "{bad}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }
}

#[test]
fn claims_name_the_tenant_and_expire_soon() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenant(dir.path(), 120);
    let udap = cfg.udap.as_ref().unwrap();
    let c = signed_claims(&cfg, udap, i64::MAX, 1_000, "j1").unwrap();
    assert_eq!(c["iss"], BASE);
    assert_eq!(c["sub"], BASE);
    assert_eq!(c["iat"], 1_000);
    assert_eq!(c["exp"], 1_120);
    assert_eq!(c["jti"], "j1");
    assert_eq!(c["token_endpoint"], "https://as.test/token");
    assert_eq!(c["registration_endpoint"], "https://as.test/reg");
    assert_eq!(c["authorization_endpoint"], "https://as.test/auth");
    // Never past the certificate's notAfter; nothing once it has passed.
    let c = signed_claims(&cfg, udap, 1_050, 1_000, "j2").unwrap();
    assert_eq!(c["exp"], 1_050);
    assert!(signed_claims(&cfg, udap, 1_000, 1_000, "j3").is_none());

    let doc = metadata_document(udap);
    assert_eq!(doc["udap_versions_supported"], serde_json::json!(["1"]));
    assert_eq!(
        doc["token_endpoint_auth_methods_supported"],
        serde_json::json!(["private_key_jwt"])
    );
    assert!(!doc.contains_key("signed_metadata"));
    assert!(!doc.contains_key("udap_certifications_required"));
}

#[tokio::test]
async fn answers_are_signed_once_per_lifetime_and_community() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = Tenant {
        config: tenant(dir.path(), 120),
        generation: 1,
    };
    let signer = UdapSigner::default();
    let body = |a: UdapAnswer| match a {
        UdapAnswer::Metadata(b) => serde_json::from_slice::<Value>(&b).unwrap(),
        UdapAnswer::UnknownCommunity => panic!("204"),
    };
    let first = body(signer.answer(&tenant, &request("")).await.unwrap());
    let again = body(signer.answer(&tenant, &request("")).await.unwrap());
    assert_eq!(first["signed_metadata"], again["signed_metadata"]);
    let community = body(
        signer
            .answer(&tenant, &request("community=urn:c"))
            .await
            .unwrap(),
    );
    assert_ne!(first["signed_metadata"], community["signed_metadata"]);
    assert!(matches!(
        signer.answer(&tenant, &request("community=urn:x")).await,
        Ok(UdapAnswer::UnknownCommunity)
    ));
}
