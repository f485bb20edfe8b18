//! UDAP: signed server metadata at `/{tenant}/.well-known/udap`, verified by an
//! independent implementation (scripts/verify-udap.py: PyJWT + `cryptography`, and
//! `openssl verify`), certificates that do not fit refused at start-up, and community
//! trust (a second real issuer's JWKS, `x5c`-signed tokens) on one tenant only.
//!
//! Every certificate is made here at test time (rcgen): a CA, an intermediate and the
//! tenant's RSA leaf; a second community CA with its own leaf; an unrelated CA.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde_json::{Value, json};

use crate::harness::{Proxy, get, now, tenant, tenants, write_json};
use crate::support::{self, Issuer, IssuerClient, IssuerConfig};

const COMMUNITY_A: &str = "urn:example:community-a";
const COMMUNITY_B: &str = "https://community-b.example/udap";
const X5C_ISSUER: &str = "https://x5c-issuer.example";

/// A certificate and its key.
struct Made {
    cert: Certificate,
    key: KeyPair,
}

impl Made {
    fn pem(&self) -> String {
        self.cert.pem()
    }
    fn der_b64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.cert.der())
    }
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

fn ca(cn: &str, issuer: Option<&Made>) -> Made {
    let key = KeyPair::generate().unwrap();
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
    };
    Made { cert, key }
}

/// A leaf with URI SAN `uri`; RSA when `rsa`; valid `years` from 2020 when given
/// (`Some(1)`: expired), else for the default validity of rcgen (until 4096).
fn leaf(cn: &str, uri: &str, issuer: &Made, rsa: bool, expired: bool) -> Made {
    let key = if rsa {
        KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
    } else {
        KeyPair::generate().unwrap()
    };
    let mut p = params(cn);
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    Made { cert, key }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The PKI of the tests, written to a directory of its own.
struct Pki {
    dir: tempfile::TempDir,
    ca: Made,
    intermediate: Made,
    community_ca: Made,
    other_ca: Made,
}

impl Pki {
    fn new() -> Pki {
        let root = ca("Test UDAP Root CA", None);
        let intermediate = ca_signed("Test UDAP Intermediate", &root);
        let community_ca = ca("Community B Root CA", None);
        let other_ca = ca("Unrelated CA", None);
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: root,
            intermediate,
            community_ca,
            other_ca,
        };
        write(pki.dir.path(), "ca.pem", &pki.ca.pem());
        write(pki.dir.path(), "community-ca.pem", &pki.community_ca.pem());
        write(pki.dir.path(), "other-ca.pem", &pki.other_ca.pem());
        write(pki.dir.path(), "intermediate.pem", &pki.intermediate.pem());
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name`-chain.pem (leaf, then `chain`) and `name`-key.pem.
    fn identity(&self, name: &str, leaf: &Made, chain: &[&Made]) -> (PathBuf, PathBuf) {
        let mut pem = leaf.pem();
        for c in chain {
            pem.push_str(&c.pem());
        }
        (
            write(self.dir.path(), &format!("{name}-chain.pem"), &pem),
            write(
                self.dir.path(),
                &format!("{name}-key.pem"),
                &leaf.key.serialize_pem(),
            ),
        )
    }
}

fn ca_signed(cn: &str, issuer: &Made) -> Made {
    ca(cn, Some(issuer))
}

fn pem_cert(chain: &Path, key: &Path) -> Value {
    json!({"format": "pem", "chain_file": chain, "key_file": key})
}

/// The proxy with tenant `udap` (UDAP on, two communities, two community issuers) and
/// tenant `plain` (no UDAP), the community issuer and the PKI.
struct Fixture {
    proxy: Proxy,
    pki: Pki,
    community_issuer: Issuer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pki = Pki::new();
        let community_issuer = Issuer::start(IssuerConfig {
            clients: vec![IssuerClient::new("community-app").patient("p1")],
            ..IssuerConfig::default()
        });
        let fhir = support::fhir_server();
        let issuer = support::issuer();
        let proxy = Proxy::start(|port| {
            let base = format!("http://127.0.0.1:{port}/udap");
            let tenant_leaf = leaf("udap tenant", &base, &pki.intermediate, true, false);
            let (chain, key) = pki.identity("tenant", &tenant_leaf, &[&pki.intermediate]);
            let community_leaf = leaf("udap tenant in B", &base, &pki.community_ca, false, false);
            let (b_chain, b_key) = pki.identity("community-b", &community_leaf, &[]);
            let mut udap = tenant("udap", port, fhir.base_url(), issuer);
            udap["smart"]["registration_endpoint"] = json!(format!("{}/reg", issuer.url()));
            udap["udap"] = json!({
                "certificate": pem_cert(&chain, &key),
                "trust_anchor_files": [pki.path("ca.pem")],
                "signed_metadata_lifetime_seconds": 300,
                "communities": [
                    {
                        "uri": COMMUNITY_A,
                        "trust_anchor_files": [pki.path("ca.pem")],
                        "issuers": [
                            {"issuer": community_issuer.url(), "jwks_uri": community_issuer.jwks_uri()},
                            {"issuer": X5C_ISSUER, "x5c": true},
                        ],
                    },
                    {
                        "uri": COMMUNITY_B,
                        "trust_anchor_files": [pki.path("community-ca.pem")],
                        "certificate": pem_cert(&b_chain, &b_key),
                    },
                ],
            });
            tenants(vec![
                ("udap", udap),
                ("plain", tenant("plain", port, fhir.base_url(), issuer)),
            ])
        });
        Fixture {
            proxy,
            pki,
            community_issuer,
        }
    })
}

fn python() -> PathBuf {
    support::repo_root().join(".stack/venv/bin/python")
}

/// Runs scripts/verify-udap.py on a saved metadata document.
fn verify_with_python(doc: &Value, anchor: &Path, base: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("udap.json");
    write_json(&file, doc);
    let out = Command::new(python())
        .arg(support::repo_root().join("scripts/verify-udap.py"))
        .arg("--metadata")
        .arg(&file)
        .arg("--anchor")
        .arg(anchor)
        .arg("--base-url")
        .arg(base)
        .arg("--max-lifetime")
        .arg("300")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn jwt_header(jwt: &str) -> Value {
    support::decode_jwt(jwt).0
}

#[tokio::test]
async fn signed_metadata_verifies_with_an_independent_implementation() {
    let f = fixture();
    let base = f.proxy.base("udap");
    let a = get(&format!("{base}/.well-known/udap"), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("content-type"), "application/json");
    let doc = a.json();
    for field in [
        "udap_versions_supported",
        "udap_profiles_supported",
        "udap_authorization_extensions_supported",
        "udap_certifications_supported",
        "grant_types_supported",
        "scopes_supported",
        "token_endpoint",
        "registration_endpoint",
        "token_endpoint_auth_methods_supported",
        "token_endpoint_auth_signing_alg_values_supported",
        "registration_endpoint_jwt_signing_alg_values_supported",
    ] {
        assert!(!doc[field].is_null(), "missing {field}: {doc}");
    }
    assert_eq!(
        doc["registration_endpoint"],
        format!("{}/reg", support::issuer().url())
    );
    let (ok, out) = verify_with_python(&doc, &f.pki.path("ca.pem"), &base);
    assert!(ok, "{out}");
    assert!(out.starts_with("OK signed_metadata RS256"), "{out}");
    // The same check fails against an anchor the chain does not lead to, and for
    // another base URL: the verifier is not a rubber stamp.
    let (ok, out) = verify_with_python(&doc, &f.pki.path("other-ca.pem"), &base);
    assert!(!ok && out.contains("does not lead to the anchor"), "{out}");
    let (ok, out) = verify_with_python(&doc, &f.pki.path("ca.pem"), &f.proxy.base("plain"));
    assert!(!ok && out.contains("not a URI SAN"), "{out}");

    // openssl verify: the x5c chain (leaf, intermediate) to the CA.
    let jwt = doc["signed_metadata"].as_str().unwrap();
    let header = jwt_header(jwt);
    let x5c = header["x5c"].as_array().unwrap();
    assert_eq!(x5c.len(), 2, "{header}");
    let dir = tempfile::tempdir().unwrap();
    let to_pem = |b64: &str| {
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            body.join("\n")
        )
    };
    let leaf_pem = write(dir.path(), "leaf.pem", &to_pem(x5c[0].as_str().unwrap()));
    let inter_pem = write(dir.path(), "inter.pem", &to_pem(x5c[1].as_str().unwrap()));
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(f.pki.path("ca.pem"))
        .arg("-untrusted")
        .arg(&inter_pem)
        .arg(&leaf_pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(x5c[1], f.pki.intermediate.der_b64());

    // Cached: a second request gets the same signature (same jti), not a new one.
    let again = get(&format!("{base}/.well-known/udap"), None).await.json();
    assert_eq!(again["signed_metadata"], doc["signed_metadata"]);
}

#[tokio::test]
async fn a_community_gets_metadata_signed_with_its_own_certificate() {
    let f = fixture();
    let base = f.proxy.base("udap");
    let q: String = form_urlencoded::byte_serialize(COMMUNITY_B.as_bytes()).collect();
    let a = get(&format!("{base}/.well-known/udap?community={q}"), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let doc = a.json();
    let (ok, out) = verify_with_python(&doc, &f.pki.path("community-ca.pem"), &base);
    assert!(ok, "{out}");
    assert!(out.contains("ES256"), "{out}");
    // Not under the tenant's own CA.
    let (ok, _) = verify_with_python(&doc, &f.pki.path("ca.pem"), &base);
    assert!(!ok);
    // A community without a certificate of its own: the tenant's.
    let a = get(
        &format!("{base}/.well-known/udap?community={COMMUNITY_A}"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (ok, out) = verify_with_python(&a.json(), &f.pki.path("ca.pem"), &base);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn unknown_communities_bad_queries_and_disabled_tenants() {
    let f = fixture();
    let base = f.proxy.base("udap");
    let a = get(
        &format!("{base}/.well-known/udap?community=urn:example:nobody"),
        None,
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(a.text.is_empty(), "{}", a.text);
    for query in [
        format!("community={COMMUNITY_A}&community={COMMUNITY_A}"),
        "community=".to_owned(),
        "format=json".to_owned(),
    ] {
        let a = get(&format!("{base}/.well-known/udap?{query}"), None).await;
        assert_eq!(a.status, 400, "{query}: {}", a.text);
        assert_eq!(a.reason(), "udap_query_invalid", "{query}");
    }
    let a = get(&format!("{}/.well-known/udap", f.proxy.base("plain")), None).await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(a.reason(), "udap_not_enabled");
    let a = crate::harness::answer(support::http_client().post(format!("{base}/.well-known/udap")))
        .await;
    assert_eq!(a.status, 405, "{}", a.text);
}

#[tokio::test]
async fn a_community_issuers_tokens_work_on_its_tenant_only() {
    let f = fixture();
    let a_base = f.proxy.base("udap");
    let b_base = f.proxy.base("plain");
    let token = |aud: String| async move {
        support::client_credentials_token(
            &f.community_issuer,
            "community-app",
            support::TEST_SECRET,
            "patient/Patient.rs",
            &aud,
        )
        .await
    };
    let for_a = token(a_base.clone()).await;
    let a = get(&format!("{a_base}/Patient/p1"), Some(&for_a)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // The same token on the other tenant, and one made for it: refused.
    let b = get(&format!("{b_base}/Patient/p1"), Some(&for_a)).await;
    assert_eq!(b.status, 401, "{}", b.text);
    let for_b = token(b_base.clone()).await;
    let b = get(&format!("{b_base}/Patient/p1"), Some(&for_b)).await;
    assert_eq!(b.status, 401, "{}", b.text);
    // The audit record names the community that vouched for the token.
    let records = f.proxy.audit_records();
    assert!(
        records.iter().any(|r| r["tenant.id"] == "udap"
            && r["client.id"] == "community-app"
            && r["notes"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("token.community={COMMUNITY_A}"))),
        "{records:?}"
    );
}

/// A token signed with `leaf`'s key, its `x5c` the leaf and `chain`.
fn x5c_token(leaf: &Made, chain: &[&Made], iss: &str, aud: &str, x5c: bool) -> String {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(leaf.key.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    if x5c {
        let mut certs = vec![leaf.der_b64()];
        certs.extend(chain.iter().map(|c| c.der_b64()));
        header.x5c = Some(certs);
    }
    let now = now();
    let claims = json!({
        "iss": iss, "aud": aud, "sub": "app-x5c", "client_id": "app-x5c",
        "exp": now + 300, "iat": now, "scope": "patient/Patient.rs", "patient": "p1",
    });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn x5c_tokens_must_chain_to_the_community_anchor() {
    let f = fixture();
    let base = f.proxy.base("udap");
    let url = format!("{base}/Patient/p1");
    let good = leaf("x5c app", X5C_ISSUER, &f.pki.intermediate, false, false);
    let t = x5c_token(&good, &[&f.pki.intermediate], X5C_ISSUER, &base, true);
    let a = get(&url, Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);

    let cases = [
        (
            "chained to another CA",
            x5c_token(
                &leaf("x5c app", X5C_ISSUER, &f.pki.other_ca, false, false),
                &[],
                X5C_ISSUER,
                &base,
                true,
            ),
            "token_x5c_untrusted",
        ),
        (
            "expired leaf",
            x5c_token(
                &leaf("x5c app", X5C_ISSUER, &f.pki.intermediate, false, true),
                &[&f.pki.intermediate],
                X5C_ISSUER,
                &base,
                true,
            ),
            "token_x5c_untrusted",
        ),
        (
            "leaf of another community member (its SAN is not the issuer)",
            x5c_token(
                &leaf(
                    "member",
                    "https://member.example",
                    &f.pki.intermediate,
                    false,
                    false,
                ),
                &[&f.pki.intermediate],
                X5C_ISSUER,
                &base,
                true,
            ),
            "token_x5c_untrusted",
        ),
        (
            "intermediate missing",
            x5c_token(&good, &[], X5C_ISSUER, &base, true),
            "token_x5c_untrusted",
        ),
        (
            "no x5c",
            x5c_token(&good, &[], X5C_ISSUER, &base, false),
            "token_x5c_missing",
        ),
        (
            "audience of the other tenant",
            x5c_token(
                &good,
                &[&f.pki.intermediate],
                X5C_ISSUER,
                &f.proxy.base("plain"),
                true,
            ),
            "token_audience",
        ),
    ];
    for (what, token, reason) in cases {
        let a = get(&url, Some(&token)).await;
        assert_eq!(a.status, 401, "{what}: {}", a.text);
        assert_eq!(a.reason(), reason, "{what}");
    }
    // A self-signed leaf (a CA of its own making) is no anchor of the community.
    let own = ca("self-made", None);
    let t = x5c_token(&own, &[], X5C_ISSUER, &base, true);
    let a = get(&url, Some(&t)).await;
    assert_eq!(a.status, 401, "{}", a.text);
    // The good token on the tenant that trusts no community.
    let t = x5c_token(
        &good,
        &[&f.pki.intermediate],
        X5C_ISSUER,
        &f.proxy.base("plain"),
        true,
    );
    let a = get(&format!("{}/Patient/p1", f.proxy.base("plain")), Some(&t)).await;
    assert_eq!(a.status, 401, "{}", a.text);
}

/// Runs `check-config` on a tenants file with one UDAP tenant.
fn check_config(udap: Value, base: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = "http://127.0.0.1:9";
    let t = json!({
        "public_base_url": base,
        "upstream": {"base_url": "http://127.0.0.1:9/fhir"},
        "token": {"issuers": [issuer], "jwks_uri": format!("{issuer}/jwks"), "audience": base},
        "smart": {
            "authorization_endpoint": format!("{issuer}/auth"),
            "token_endpoint": format!("{issuer}/token"),
            "registration_endpoint": format!("{issuer}/reg"),
        },
        "authorization": {"mode": "compartment"},
        "udap": udap,
    });
    let file = dir.path().join("tenants.json");
    write_json(&file, &json!({"tenants": {"t": t}}));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"));
    cmd.arg("check-config").arg("--tenants").arg(&file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn certificates_that_do_not_fit_are_refused_by_check_config() {
    let pki = Pki::new();
    let base = "https://proxy.example/t";
    let good = leaf("t", base, &pki.intermediate, true, false);
    let (chain, key) = pki.identity("good", &good, &[&pki.intermediate]);
    let ca = pki.path("ca.pem");
    let ok = json!({"certificate": pem_cert(&chain, &key), "trust_anchor_files": [ca]});
    let (code, out) = check_config(ok.clone(), base, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("udap         signs https://proxy.example/t"),
        "{out}"
    );

    // PKCS#12, as `openssl pkcs12 -export` writes it, password from the environment.
    let p12 = pki.path("good.p12");
    let status = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "env:P12_PASS"])
        .arg("-inkey")
        .arg(&key)
        .arg("-in")
        .arg(pki.identity("leaf-only", &good, &[]).0)
        .arg("-certfile")
        .arg(pki.path("intermediate.pem"))
        .arg("-out")
        .arg(&p12)
        .env("P12_PASS", "p12-secret")
        .status()
        .unwrap();
    assert!(status.success());
    let with_p12 = json!({
        "certificate": {"format": "pkcs12", "file": p12, "password_env": "UDAP_P12_PASSWORD"},
        "trust_anchor_files": [ca],
    });
    let (code, out) = check_config(
        with_p12.clone(),
        base,
        &[("UDAP_P12_PASSWORD", "p12-secret")],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("p12-secret"), "{out}");

    let expired = leaf("t", base, &pki.intermediate, true, true);
    let (e_chain, e_key) = pki.identity("expired", &expired, &[&pki.intermediate]);
    let other = leaf(
        "t",
        "https://elsewhere.example/t",
        &pki.intermediate,
        false,
        false,
    );
    let (o_chain, o_key) = pki.identity("other", &other, &[&pki.intermediate]);
    let stranger = leaf("t", base, &pki.other_ca, false, false);
    let (s_chain, s_key) = pki.identity("stranger", &stranger, &[]);
    type Case<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "expired leaf",
            json!({"certificate": pem_cert(&e_chain, &e_key), "trust_anchor_files": [ca]}),
            vec![],
            "the certificate has expired",
        ),
        (
            "wrong SAN",
            json!({"certificate": pem_cert(&o_chain, &o_key), "trust_anchor_files": [ca]}),
            vec![],
            "is not a URI subject alternative name",
        ),
        (
            "untrusted chain",
            json!({"certificate": pem_cert(&s_chain, &s_key), "trust_anchor_files": [ca]}),
            vec![],
            "does not lead to a trusted anchor",
        ),
        (
            "key of another certificate",
            json!({"certificate": pem_cert(&chain, &o_key), "trust_anchor_files": [ca]}),
            vec![],
            "does not belong",
        ),
        (
            "wrong PKCS#12 password",
            with_p12.clone(),
            vec![("UDAP_P12_PASSWORD", "wrong")],
            "cannot be read",
        ),
        (
            "PKCS#12 password not set",
            with_p12,
            vec![],
            "`UDAP_P12_PASSWORD` is not set",
        ),
        (
            "community anchor the tenant's chain does not fit",
            json!({
                "certificate": pem_cert(&chain, &key),
                "trust_anchor_files": [ca],
                "communities": [{"uri": "urn:x", "trust_anchor_files": [pki.path("other-ca.pem")]}],
            }),
            vec![],
            "has no certificate of its own",
        ),
        (
            "issuer of the tenant's own",
            json!({
                "certificate": pem_cert(&chain, &key),
                "trust_anchor_files": [ca],
                "communities": [{"uri": "urn:x", "trust_anchor_files": [ca],
                    "issuers": [{"issuer": "http://127.0.0.1:9", "x5c": true}]}],
            }),
            vec![],
            "is one of `token.issuers` already",
        ),
        (
            "lifetime too long",
            json!({"certificate": pem_cert(&chain, &key), "trust_anchor_files": [ca],
                   "signed_metadata_lifetime_seconds": 31_536_000}),
            vec![],
            "udap.signed_metadata_lifetime_seconds",
        ),
        (
            "unknown key",
            json!({"certificate": pem_cert(&chain, &key), "trust_anchor_files": [ca], "colour": 1}),
            vec![],
            "unknown field `colour`",
        ),
    ];
    for (what, udap, env, needle) in cases {
        let (code, out) = check_config(udap, base, &env);
        assert_eq!(code, Some(64), "{what}: {out}");
        assert!(out.contains(needle), "{what}: {out}");
    }
}

#[test]
fn start_up_refuses_an_expired_udap_certificate() {
    let pki = Pki::new();
    let base = "http://127.0.0.1:9/t";
    let expired = leaf("t", base, &pki.intermediate, false, true);
    let (chain, key) = pki.identity("expired", &expired, &[&pki.intermediate]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.json");
    let issuer = "http://127.0.0.1:9";
    write_json(
        &file,
        &json!({"tenants": {"t": {
            "public_base_url": base,
            "upstream": {"base_url": "http://127.0.0.1:9/fhir"},
            "token": {"issuers": [issuer], "jwks_uri": format!("{issuer}/jwks"), "audience": base},
            "smart": {"authorization_endpoint": format!("{issuer}/auth"),
                      "token_endpoint": format!("{issuer}/token"),
                      "registration_endpoint": format!("{issuer}/reg")},
            "authorization": {"mode": "compartment"},
            "udap": {"certificate": pem_cert(&chain, &key), "trust_anchor_files": [pki.path("ca.pem")]},
        }}}),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
        .arg("--tenants")
        .arg(&file)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", support::free_port()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("udap.certificate"), "{text}");
}

#[tokio::test]
async fn a_certificate_replaced_in_its_file_is_served_after_a_reload() {
    let pki = Pki::new();
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let files = std::cell::RefCell::new(None);
    let proxy = Proxy::start(|port| {
        let base = format!("http://127.0.0.1:{port}/r");
        let first = leaf("first", &base, &pki.intermediate, false, false);
        let (chain, key) = pki.identity("reload", &first, &[&pki.intermediate]);
        *files.borrow_mut() = Some((base, chain.clone(), key.clone()));
        let mut t = tenant("r", port, fhir.base_url(), issuer);
        t["smart"]["registration_endpoint"] = json!(format!("{}/reg", issuer.url()));
        t["udap"] = json!({
            "certificate": pem_cert(&chain, &key),
            "trust_anchor_files": [pki.path("ca.pem")],
        });
        tenants(vec![("r", t)])
    });
    let (base, chain, key) = files.into_inner().unwrap();
    let url = format!("{base}/.well-known/udap");
    let leaf_of =
        |doc: &Value| jwt_header(doc["signed_metadata"].as_str().unwrap())["x5c"][0].clone();
    let before = leaf_of(&get(&url, None).await.json());

    // Rotate: a new key and certificate written over the same files.
    let second = leaf("second", &base, &pki.intermediate, true, false);
    let mut pem = second.cert.pem();
    pem.push_str(&pki.intermediate.pem());
    std::fs::write(&chain, pem).unwrap();
    std::fs::write(&key, second.key.serialize_pem()).unwrap();
    proxy.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let after = loop {
        let doc = get(&url, None).await.json();
        if leaf_of(&doc) != before || std::time::Instant::now() > deadline {
            break doc;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(leaf_of(&after), json!(second.der_b64()), "{}", proxy.log());
    let (ok, out) = verify_with_python(&after, &pki.path("ca.pem"), &base);
    assert!(ok && out.contains("RS256"), "{out}");
}
