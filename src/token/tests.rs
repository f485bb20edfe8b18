#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::config::{ClaimNames, TokenConfig};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use std::time::Duration;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";

fn cfg() -> TokenConfig {
    TokenConfig {
        issuers: vec!["https://issuer.test".into()],
        // Never fetched by these tests: HS256 keys come from the shared secret.
        jwks_uri: url::Url::parse("http://127.0.0.1:9/jwks").unwrap(),
        audience: "https://proxy.test/demo".into(),
        algorithms: vec![Algorithm::HS256],
        hmac_secret: Some(crate::config::Secret::new(SECRET.to_vec())),
        leeway: Duration::from_secs(5),
        jwks_cache: Duration::from_secs(60),
        jwks_min_refresh: Duration::from_secs(10),
        jwks_timeout: Duration::from_millis(200),
        claims: ClaimNames {
            scope: "scope".into(),
            patient: "patient".into(),
            fhir_user: "fhirUser".into(),
            client_id: "client_id".into(),
        },
        introspection: None,
    }
}

fn sign(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn good_claims() -> serde_json::Value {
    let now = now_secs();
    json!({
        "iss": "https://issuer.test",
        "aud": "https://proxy.test/demo",
        "sub": "user-1",
        "client_id": "app-1",
        "exp": now + 300,
        "iat": now,
        "scope": "patient/Observation.rs openid",
        "patient": "p1",
        "fhirUser": "https://ehr.test/fhir/Practitioner/pr1",
    })
}

fn with(mut claims: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
    claims[key] = value;
    claims
}

fn without(mut claims: serde_json::Value, key: &str) -> serde_json::Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

async fn verify(token: &str) -> Result<std::sync::Arc<VerifiedToken>, TokenError> {
    let v = TokenVerifier::new(reqwest::Client::new());
    v.verify(0, "demo", &cfg(), token).await
}

#[tokio::test]
async fn valid_token_yields_principal() {
    let t = verify(&sign(good_claims())).await.unwrap();
    assert_eq!(t.issuer, "https://issuer.test");
    assert_eq!(t.subject.as_deref(), Some("user-1"));
    assert_eq!(t.client_id.as_deref(), Some("app-1"));
    assert_eq!(t.patient.as_ref().map(|p| p.as_str()), Some("p1"));
    let u = t.fhir_user.clone().unwrap();
    assert_eq!(
        (u.resource_type.as_str(), u.id.as_str()),
        ("Practitioner", "pr1")
    );
    assert_eq!(t.scopes.resource_scopes().len(), 1);
    assert!(t.scopes.has_other("openid"));
}

#[tokio::test]
async fn scope_claim_may_be_an_array() {
    let claims = with(
        good_claims(),
        "scope",
        json!(["patient/Observation.rs", "patient/Patient.r"]),
    );
    let t = verify(&sign(claims)).await.unwrap();
    assert_eq!(t.scopes.resource_scopes().len(), 2);
    let claims = with(good_claims(), "scope", json!(["ok", 7]));
    assert!(matches!(
        verify(&sign(claims)).await,
        Err(TokenError::BadClaims)
    ));
    let claims = with(good_claims(), "scope", json!({"a": 1}));
    assert!(matches!(
        verify(&sign(claims)).await,
        Err(TokenError::BadClaims)
    ));
}

#[tokio::test]
async fn failures_are_classified() {
    let now = now_secs();
    type Case = (serde_json::Value, fn(&TokenError) -> bool);
    let cases: Vec<Case> = vec![
        (with(good_claims(), "exp", json!(now - 60)), |e| {
            matches!(e, TokenError::Expired)
        }),
        (without(good_claims(), "exp"), |e| {
            matches!(e, TokenError::MissingExpiry)
        }),
        (with(good_claims(), "nbf", json!(now + 600)), |e| {
            matches!(e, TokenError::NotYetValid)
        }),
        (with(good_claims(), "iat", json!(now + 600)), |e| {
            matches!(e, TokenError::NotYetValid)
        }),
        (
            with(good_claims(), "iss", json!("https://evil.test")),
            |e| matches!(e, TokenError::WrongIssuer),
        ),
        (without(good_claims(), "iss"), |e| {
            matches!(e, TokenError::WrongIssuer)
        }),
        // Exact audience: a prefix-sharing audience is a different audience.
        (
            with(good_claims(), "aud", json!("https://proxy.test/demo2")),
            |e| matches!(e, TokenError::WrongAudience),
        ),
        (
            with(good_claims(), "aud", json!("https://proxy.test/dem")),
            |e| matches!(e, TokenError::WrongAudience),
        ),
        (
            with(good_claims(), "aud", json!("https://proxy.test")),
            |e| matches!(e, TokenError::WrongAudience),
        ),
        (without(good_claims(), "aud"), |e| {
            matches!(e, TokenError::WrongAudience)
        }),
        (with(good_claims(), "patient", json!("../p1")), |e| {
            matches!(e, TokenError::BadClaims)
        }),
        (with(good_claims(), "patient", json!(1)), |e| {
            matches!(e, TokenError::BadClaims)
        }),
    ];
    for (claims, expected) in cases {
        let err = verify(&sign(claims.clone()))
            .await
            .expect_err(&claims.to_string());
        assert!(expected(&err), "{claims} gave {err:?}");
    }
}

#[tokio::test]
async fn audience_array_must_contain_the_exact_audience() {
    let claims = with(
        good_claims(),
        "aud",
        json!(["other", "https://proxy.test/demo"]),
    );
    assert!(verify(&sign(claims)).await.is_ok());
    let claims = with(
        good_claims(),
        "aud",
        json!(["https://proxy.test/demo/", "x"]),
    );
    assert!(matches!(
        verify(&sign(claims)).await,
        Err(TokenError::WrongAudience)
    ));
}

#[tokio::test]
async fn tampered_signature_and_garbage_are_rejected() {
    let token = sign(good_claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged_payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        with(good_claims(), "patient", json!("p2")).to_string(),
    );
    parts[1] = &forged_payload;
    let forged = parts.join(".");
    assert!(matches!(
        verify(&forged).await,
        Err(TokenError::BadSignature)
    ));

    for garbage in [
        "",
        "a",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9..",
        "\u{0}",
    ] {
        assert!(verify(garbage).await.is_err(), "{garbage:?}");
    }
}

#[tokio::test]
async fn algorithm_must_be_accepted_and_none_never_is() {
    // alg=none: header {"alg":"none"}, empty signature.
    let b64 =
        |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&good_claims().to_string())
    );
    assert!(verify(&none).await.is_err());
    // HS384 is not in the tenant's list.
    let t = encode(
        &Header::new(Algorithm::HS384),
        &good_claims(),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert!(matches!(
        verify(&t).await,
        Err(TokenError::AlgorithmNotAccepted)
    ));
    // HS256 signed token against a tenant that only accepts RS256.
    let mut rs_only = cfg();
    rs_only.algorithms = vec![Algorithm::RS256];
    rs_only.hmac_secret = None;
    let v = TokenVerifier::new(reqwest::Client::new());
    let r = v.verify(0, "demo", &rs_only, &sign(good_claims())).await;
    assert!(matches!(r, Err(TokenError::AlgorithmNotAccepted)));
}

#[tokio::test]
async fn unreachable_jwks_is_unavailable_not_invalid() {
    let mut rs = cfg();
    rs.algorithms = vec![Algorithm::RS256];
    rs.hmac_secret = None;
    let b64 =
        |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
    let token = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"k1"}"#),
        b64(&good_claims().to_string()),
        b64("sig")
    );
    let v = TokenVerifier::new(reqwest::Client::new());
    let err = v.verify(0, "demo", &rs, &token).await.unwrap_err();
    assert!(matches!(err, TokenError::JwksUnavailable), "{err:?}");
    assert!(err.is_unavailable());
}

#[test]
fn bearer_header_parsing() {
    let mut h = http::HeaderMap::new();
    assert!(matches!(bearer_token(&h), Err(TokenError::Missing)));
    h.insert(
        http::header::AUTHORIZATION,
        "Bearer abc.def.ghi".parse().unwrap(),
    );
    assert_eq!(bearer_token(&h).unwrap(), "abc.def.ghi");
    h.insert(http::header::AUTHORIZATION, "bearer abc".parse().unwrap());
    assert_eq!(bearer_token(&h).unwrap(), "abc");
    for bad in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "Token abc",
    ] {
        h.insert(http::header::AUTHORIZATION, bad.parse().unwrap());
        assert!(
            matches!(bearer_token(&h), Err(TokenError::MalformedHeader)),
            "{bad}"
        );
    }
    h.insert(http::header::AUTHORIZATION, "Bearer a".parse().unwrap());
    h.append(http::header::AUTHORIZATION, "Bearer b".parse().unwrap());
    assert!(matches!(bearer_token(&h), Err(TokenError::MalformedHeader)));
    let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
    let mut h = http::HeaderMap::new();
    h.insert(http::header::AUTHORIZATION, long.parse().unwrap());
    assert!(matches!(bearer_token(&h), Err(TokenError::MalformedHeader)));
}

#[test]
fn fhir_user_parsing() {
    let u = FhirUser::parse("Practitioner/pr1").unwrap();
    assert_eq!(
        (u.resource_type.as_str(), u.id.as_str()),
        ("Practitioner", "pr1")
    );
    assert!(FhirUser::parse("https://ehr/fhir/RelatedPerson/rp1").is_some());
    for bad in [
        "",
        "pr1",
        "practitioner/pr1",
        "Practitioner/",
        "Practitioner/a b",
        "Foo/1",
    ] {
        assert!(FhirUser::parse(bad).is_none(), "{bad}");
    }
}

#[tokio::test]
async fn cached_verifications_still_expire_and_never_cross_configurations() {
    let v = TokenVerifier::new(reqwest::Client::new());
    let mut strict = cfg();
    strict.leeway = Duration::from_secs(0);
    let token = sign(with(good_claims(), "exp", json!(now_secs() + 1)));
    assert!(v.verify(7, "demo", &strict, &token).await.is_ok());
    assert!(
        v.verify(7, "demo", &strict, &token).await.is_ok(),
        "cache hit"
    );
    // Another configuration generation re-verifies: here the audience changed.
    let mut other = strict.clone();
    other.audience = "https://proxy.test/other".into();
    assert!(matches!(
        v.verify(8, "demo", &other, &token).await,
        Err(TokenError::WrongAudience)
    ));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        v.verify(7, "demo", &strict, &token).await,
        Err(TokenError::Expired)
    ));
}
