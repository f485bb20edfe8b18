//! Bearer token extraction, JWT header decoding and claims decoding (`token`).
//!
//! Two kinds of input:
//! - one line: an `Authorization` header value. Properties: `bearer_token` hands out
//!   only a non-empty, space-free, bounded token that the value ends with; such a
//!   token verifies only if it carries the tenant's own signature.
//! - `HEADER\nCLAIMS`: the two JSON parts of a token, which the target signs with the
//!   tenant's HMAC secret, so every claims decoding path is reached. Properties: a
//!   token that verifies names the accepted algorithm, and its claims (read again with
//!   `serde_json`) have a trusted `iss`, the exact audience, an `exp` not past, a
//!   `patient` that is a valid id, and are what the `VerifiedToken` says.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use smart_fhir_proxy::config::{ClaimNames, TokenConfig};
use smart_fhir_proxy::smart::MAX_RESOURCE_SCOPES;
use smart_fhir_proxy::token::{MAX_TOKEN_BYTES, VerifiedToken, bearer_token, verify_with_key};

const SECRET: &[u8] = b"fuzzing-only-secret-0123456789abcdef";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "https://proxy.example/t1";
const LEEWAY: u64 = 30;

fn config() -> TokenConfig {
    TokenConfig {
        issuers: vec![ISSUER.to_owned(), "https://issuer2.example".to_owned()],
        jwks_uri: url::Url::parse("http://127.0.0.1:9/jwks").expect("a valid URL"),
        audience: AUDIENCE.to_owned(),
        algorithms: vec![Algorithm::HS256],
        hmac_secret: Some(smart_fhir_proxy::config::Secret::new(SECRET.to_vec())),
        leeway: Duration::from_secs(LEEWAY),
        jwks_cache: Duration::from_secs(60),
        jwks_min_refresh: Duration::from_secs(10),
        jwks_timeout: Duration::from_millis(200),
        claims: ClaimNames {
            scope: "scope".to_owned(),
            patient: "patient".to_owned(),
            fhir_user: "fhirUser".to_owned(),
            client_id: "client_id".to_owned(),
        },
        introspection: None,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn signature(signing_input: &str) -> String {
    jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .expect("HS256 signs anything")
}

fn verify(token: &str) -> Option<VerifiedToken> {
    let key = DecodingKey::from_secret(SECRET);
    verify_with_key(&config(), Algorithm::HS256, &key, token).ok()
}

/// What a verified token must satisfy, read independently from its text.
fn check_verified(token: &str, verified: &VerifiedToken) {
    let header = jsonwebtoken::decode_header(token).expect("a verified token has a header");
    assert_eq!(header.alg, Algorithm::HS256);
    let mut parts = token.split('.');
    let (_, payload) = (parts.next(), parts.next().expect("a payload"));
    let claims: serde_json::Map<String, Value> = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(payload)
            .expect("a verified payload is base64url"),
    )
    .expect("a verified payload is a JSON object");
    let iss = claims.get("iss").and_then(Value::as_str);
    assert!(
        iss.is_some_and(|i| config().issuers.iter().any(|t| t == i)),
        "{claims:?}"
    );
    assert_eq!(Some(verified.issuer.as_str()), iss);
    match claims.get("aud") {
        Some(Value::String(a)) => assert_eq!(a, AUDIENCE),
        Some(Value::Array(all)) => assert!(all.iter().any(|a| a == AUDIENCE), "{claims:?}"),
        other => panic!("verified with aud {other:?}"),
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .expect("a verified token has a numeric exp");
    assert!(exp + LEEWAY as f64 + 1.0 >= now() as f64, "exp {exp}");
    assert_eq!(verified.expires_at, exp as u64);
    if let Some(iat) = claims.get("iat") {
        let iat = iat.as_f64().expect("a numeric iat");
        assert!(iat <= (now() + LEEWAY + 1) as f64, "iat {iat}");
    }
    match claims.get("patient") {
        None | Some(Value::Null) => assert!(verified.patient.is_none()),
        Some(Value::String(p)) => {
            assert_eq!(
                verified.patient.as_ref().map(|p| p.as_str()),
                Some(p.as_str())
            )
        }
        Some(other) => panic!("verified with patient {other:?}"),
    }
    assert_eq!(
        verified.subject.as_deref(),
        claims.get("sub").and_then(Value::as_str)
    );
    assert!(verified.scopes.resource_scopes().len() <= MAX_RESOURCE_SCOPES);
}

fuzz_target!(|data: &[u8]| {
    match data.iter().position(|&b| b == b'\n') {
        None => {
            let Ok(value) = HeaderValue::from_bytes(data) else {
                return;
            };
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.clone());
            let Ok(token) = bearer_token(&headers) else {
                return;
            };
            assert!(!token.is_empty() && token.len() <= MAX_TOKEN_BYTES);
            assert!(!token.contains(' '));
            let text = value.to_str().expect("a bearer token is visible ASCII");
            assert!(text.trim_end().ends_with(token), "{text:?}");
            assert!(
                text.get(..7)
                    .is_some_and(|s| s.eq_ignore_ascii_case("bearer "))
            );
            let _ = jsonwebtoken::decode_header(token);
            if let Some(verified) = verify(token) {
                let (signing_input, sig) = token.rsplit_once('.').expect("three parts");
                assert_eq!(
                    sig,
                    signature(signing_input),
                    "verified a foreign signature"
                );
                check_verified(token, &verified);
            }
        }
        Some(at) => {
            let (header, claims) = (&data[..at], &data[at + 1..]);
            let signing_input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(claims)
            );
            let token = format!("{signing_input}.{}", signature(&signing_input));
            if let Some(verified) = verify(&token) {
                check_verified(&token, &verified);
            }
        }
    }
});
