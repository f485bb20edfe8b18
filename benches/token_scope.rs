#![allow(clippy::expect_used)]
//! Micro-benchmarks of the token and scope stages (pure, no I/O): JWT verification
//! with RS256 and ES256 keys, SMART scope parsing, request classification and scope
//! matching. The end-to-end ratio against a plain pass-through proxy is measured by
//! `scripts/bench-e2e.sh`.

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use smart_fhir_proxy::config::{ClaimNames, TokenConfig};
use smart_fhir_proxy::fhir::parse_request;
use smart_fhir_proxy::scope::{TokenContext, check_scopes};
use smart_fhir_proxy::smart::parse_scopes;
use smart_fhir_proxy::token::{TokenVerifier, verify_with_key};

const SCOPES: &str = "openid fhirUser launch/patient offline_access patient/Patient.rs \
    patient/Observation.rs patient/Condition.rs patient/MedicationRequest.rs \
    patient/AllergyIntolerance.rs patient/Encounter.rs patient/Immunization.rs \
    patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory \
    user/Practitioner.rs user/Organization.r";

fn cfg(alg: Algorithm) -> TokenConfig {
    TokenConfig {
        issuers: vec!["https://issuer.bench".into()],
        jwks_uri: url::Url::parse("https://issuer.bench/jwks").expect("url"),
        audience: "https://proxy.bench/demo".into(),
        algorithms: vec![alg],
        hmac_secret: None,
        leeway: Duration::from_secs(30),
        jwks_cache: Duration::from_secs(300),
        jwks_min_refresh: Duration::from_secs(10),
        jwks_timeout: Duration::from_secs(3),
        claims: ClaimNames {
            scope: "scope".into(),
            patient: "patient".into(),
            fhir_user: "fhirUser".into(),
            client_id: "client_id".into(),
        },
        introspection: None,
    }
}

fn token(alg: Algorithm, key: &EncodingKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://issuer.bench", "aud": "https://proxy.bench/demo", "sub": "u1",
        "client_id": "bench-app", "exp": now + 3600, "iat": now, "scope": SCOPES,
        "patient": "p1", "fhirUser": "Patient/p1",
    });
    let mut header = Header::new(alg);
    header.kid = Some("bench".into());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn bench_tokens(c: &mut Criterion) {
    let rsa_priv = include_bytes!("keys/rs256-private.pem");
    let rsa_pub = include_bytes!("keys/rs256-public.pem");
    let ec_priv = include_bytes!("keys/es256-private.pem");
    let ec_pub = include_bytes!("keys/es256-public.pem");

    let rs_token = token(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(rsa_priv).expect("rsa"),
    );
    let rs_key = DecodingKey::from_rsa_pem(rsa_pub).expect("rsa pub");
    let rs_cfg = cfg(Algorithm::RS256);
    c.bench_function("token/verify_rs256", |b| {
        b.iter(|| {
            verify_with_key(&rs_cfg, Algorithm::RS256, &rs_key, black_box(&rs_token))
                .expect("valid")
        })
    });

    let es_token = token(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(ec_priv).expect("ec"),
    );
    let es_key = DecodingKey::from_ec_pem(ec_pub).expect("ec pub");
    let es_cfg = cfg(Algorithm::ES256);
    c.bench_function("token/verify_es256", |b| {
        b.iter(|| {
            verify_with_key(&es_cfg, Algorithm::ES256, &es_key, black_box(&es_token))
                .expect("valid")
        })
    });
}

/// The verifier as the proxy uses it: a repeated token is served from the
/// verified-token cache (HS256 here, so no JWKS is needed; the cache does not depend
/// on the algorithm).
fn bench_cached(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let secret = b"0123456789abcdef0123456789abcdef-bench-only";
    let mut cfg = cfg(Algorithm::HS256);
    cfg.hmac_secret = Some(smart_fhir_proxy::config::Secret::new(secret.to_vec()));
    let token = token(Algorithm::HS256, &EncodingKey::from_secret(secret));
    let verifier = TokenVerifier::new(reqwest::Client::new());
    rt.block_on(verifier.verify(0, "bench", &cfg, &token))
        .expect("valid");
    c.bench_function("token/verify_cached_hit", |b| {
        b.iter(|| {
            rt.block_on(verifier.verify(0, "bench", &cfg, black_box(&token)))
                .expect("valid")
        })
    });
}

fn bench_scopes(c: &mut Criterion) {
    c.bench_function("scope/parse_14_scopes", |b| {
        b.iter(|| parse_scopes(black_box(SCOPES)))
    });

    let set = parse_scopes(SCOPES);
    let ctx = TokenContext { has_patient: true };
    let cases = [
        ("read", Method::GET, "/Observation/o1", None),
        (
            "search",
            Method::GET,
            "/Observation",
            Some("code=http://loinc.org|1234-5&_count=50&date=ge2020"),
        ),
        ("compartment", Method::GET, "/Patient/p1/Condition", None),
        ("denied", Method::GET, "/Procedure", None),
    ];
    for (name, method, path, query) in cases {
        let req = parse_request(&method, path, query, None).expect("parse");
        c.bench_function(&format!("scope/check_{name}"), |b| {
            b.iter(|| {
                let _ = black_box(check_scopes(&set, black_box(&req), ctx));
            })
        });
    }

    c.bench_function("request/parse_search", |b| {
        b.iter(|| {
            parse_request(
                &Method::GET,
                black_box("/Observation"),
                black_box(Some("subject=Patient/p1&category=laboratory&_count=50&_include=Observation:performer")),
                None,
            )
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_tokens, bench_cached, bench_scopes
}
criterion_main!(benches);
