//! Token validation against the real issuer's keys.

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::harness::{self, Proxy, get, now, shared, sign_with_issuer_key, tenant, tenants, token};
use crate::support::{self, Alg, Issuer, IssuerConfig, TEST_SECRET};

const OWN_OBS: &str = "Observation/obs-p1-glucose";

fn claims(aud: &str) -> serde_json::Value {
    let issuer = support::issuer();
    json!({
        "iss": issuer.url(), "aud": aud, "sub": "u1", "client_id": "handmade",
        "exp": now() + 300, "iat": now(), "scope": "patient/Observation.rs", "patient": "p1",
    })
}

async fn read_with(t: &str) -> harness::Answer {
    get(&format!("{}/{OWN_OBS}", shared().base("demo")), Some(t)).await
}

fn assert_invalid_token(a: &harness::Answer, reason: &str) {
    assert_eq!(a.status, 401, "{}", a.text);
    assert_eq!(a.reason(), reason, "{}", a.text);
    let challenge = a.header("www-authenticate");
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
        "{challenge}"
    );
    assert_eq!(a.header("content-type"), "application/fhir+json");
}

#[tokio::test]
async fn real_rs256_and_es256_tokens_are_accepted() {
    for client in ["patient-p1", "patient-p1-es256"] {
        let t = token(client, "patient/Observation.rs", "demo").await;
        let a = read_with(&t).await;
        assert_eq!(a.status, 200, "{client}: {}", a.text);
        assert_eq!(a.json()["id"], "obs-p1-glucose");
    }
}

#[tokio::test]
async fn missing_token_gets_a_bare_bearer_challenge() {
    let a = get(&format!("{}/{OWN_OBS}", shared().base("demo")), None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.reason(), "token_missing");
    assert_eq!(a.header("www-authenticate"), "Bearer");
    let a = harness::answer(
        support::http_client()
            .get(format!("{}/{OWN_OBS}", shared().base("demo")))
            .header("authorization", "Basic dXNlcjpwYXNz"),
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(a.header("www-authenticate").contains("invalid_request"));
}

#[tokio::test]
async fn tampered_signature_is_rejected() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let parts: Vec<&str> = t.split('.').collect();
    let mut forged_claims = support::decode_jwt(&t).1;
    forged_claims["patient"] = json!("p2");
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        forged_claims.to_string(),
    );
    let forged = format!("{}.{}.{}", parts[0], payload, parts[2]);
    assert_invalid_token(&read_with(&forged).await, "token_signature");
}

#[tokio::test]
async fn wrong_issuer_is_rejected_even_with_a_valid_signature() {
    let issuer = support::issuer();
    let aud = shared().base("demo");
    let mut c = claims(&aud);
    c["iss"] = json!("http://127.0.0.1:1/evil");
    let t = sign_with_issuer_key(issuer, &issuer.kid(Alg::RS256), Algorithm::RS256, &c);
    assert_invalid_token(&read_with(&t).await, "token_issuer");
    // Control: the same hand-made token with the right issuer works.
    let t = sign_with_issuer_key(
        issuer,
        &issuer.kid(Alg::RS256),
        Algorithm::RS256,
        &claims(&aud),
    );
    assert_eq!(read_with(&t).await.status, 200);
}

#[tokio::test]
async fn audience_must_match_exactly() {
    // A real token for tenant demo2 (its audience shares the prefix `.../demo`).
    let t = token("patient-p1", "patient/Observation.rs", "demo2").await;
    assert_invalid_token(&read_with(&t).await, "token_audience");
    // Prefix and suffix variants of the right audience.
    let base = shared().base("demo");
    for aud in [
        format!("{base}/"),
        base[..base.len() - 1].to_owned(),
        format!("{base}x"),
    ] {
        let t = support::token("patient-p1", "patient/Observation.rs", &aud).await;
        assert_invalid_token(&read_with(&t).await, "token_audience");
    }
}

#[tokio::test]
async fn expired_and_exp_less_tokens_are_rejected() {
    let issuer = support::issuer();
    let kid = issuer.kid(Alg::RS256);
    let aud = shared().base("demo");
    let mut expired = claims(&aud);
    expired["exp"] = json!(now() - 60);
    let t = sign_with_issuer_key(issuer, &kid, Algorithm::RS256, &expired);
    assert_invalid_token(&read_with(&t).await, "token_expired");

    let mut no_exp = claims(&aud);
    no_exp.as_object_mut().unwrap().remove("exp");
    let t = sign_with_issuer_key(issuer, &kid, Algorithm::RS256, &no_exp);
    assert_invalid_token(&read_with(&t).await, "token_missing_exp");

    let mut future = claims(&aud);
    future["nbf"] = json!(now() + 600);
    let t = sign_with_issuer_key(issuer, &kid, Algorithm::RS256, &future);
    assert_invalid_token(&read_with(&t).await, "token_not_yet_valid");
}

#[tokio::test]
async fn a_real_token_stops_working_when_it_expires() {
    let t = token("patient-p1-short", "patient/Observation.rs", "demo").await;
    assert_eq!(read_with(&t).await.status, 200);
    // The token lives 2 s; the tenant's leeway is 5 s.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    assert_invalid_token(&read_with(&t).await, "token_expired");
}

#[tokio::test]
async fn alg_none_and_hs256_key_confusion_are_rejected() {
    let aud = shared().base("demo");
    let b64 =
        |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims(&aud).to_string())
    );
    let a = read_with(&none).await;
    assert_eq!(a.status, 401, "{}", a.text);
    // HS256 "signed" with the issuer's public JWKS as the shared secret.
    let jwks = support::http_client()
        .get(support::issuer().jwks_uri())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims(&aud),
        &jsonwebtoken::EncodingKey::from_secret(jwks.as_bytes()),
    )
    .unwrap();
    assert_invalid_token(&read_with(&hs).await, "token_algorithm");
}

#[tokio::test]
async fn unknown_kid_then_key_rotation() {
    let mut issuer = Issuer::start(IssuerConfig::shared());
    let fhir = support::fhir_server();
    let iss_url = issuer.url().to_owned();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("rot", port, fhir.base_url(), &issuer);
        t["token"]["jwks_cache_seconds"] = json!(3600);
        t["token"]["jwks_min_refresh_seconds"] = json!(1);
        tenants(vec![("rot", t)])
    });
    let aud = proxy.base("rot");
    let url = format!("{aud}/{OWN_OBS}");
    let old = support::client_credentials_token(
        &issuer,
        "patient-p1",
        TEST_SECRET,
        "patient/Observation.rs",
        &aud,
    )
    .await;
    assert_eq!(get(&url, Some(&old)).await.status, 200);

    // A kid nobody published: refused after one refresh.
    let mut c = claims(&aud);
    c["iss"] = json!(iss_url);
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some("no-such-kid".into());
    let pem = issuer.private_key_pem(&issuer.kid(Alg::RS256));
    let forged = jsonwebtoken::encode(
        &header,
        &c,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_invalid_token(&get(&url, Some(&forged)).await, "token_unknown_key");

    // Rotate: the issuer now signs with new keys the proxy has never seen. (Unknown
    // kids refetch the JWKS at most once a second: wait out the forged kid's refetch.)
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    issuer.restart_with_keys(support::generate_keys());
    let new = support::client_credentials_token(
        &issuer,
        "patient-p1",
        TEST_SECRET,
        "patient/Observation.rs",
        &aud,
    )
    .await;
    assert_ne!(
        support::decode_jwt(&new).0["kid"],
        support::decode_jwt(&old).0["kid"]
    );
    let a = get(&url, Some(&new)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // The old key is gone from the refreshed set.
    assert_invalid_token(&get(&url, Some(&old)).await, "token_unknown_key");
}

#[tokio::test]
async fn unreachable_jwks_is_503() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let dead = support::free_port();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("nokeys", port, fhir.base_url(), issuer);
        t["token"]["jwks_uri"] = json!(format!("http://127.0.0.1:{dead}/jwks"));
        t["token"]["jwks_timeout_ms"] = json!(500);
        tenants(vec![("nokeys", t)])
    });
    let t = support::token(
        "patient-p1",
        "patient/Observation.rs",
        &proxy.base("nokeys"),
    )
    .await;
    let a = get(&format!("{}/{OWN_OBS}", proxy.base("nokeys")), Some(&t)).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.reason(), "jwks_unavailable");
    assert!(a.header("www-authenticate").is_empty());
}

#[tokio::test]
async fn tokens_never_reach_the_upstream_or_the_logs() {
    let capture = harness::FaultServer::start(harness::Fault::Capture);
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("cap", port, &capture.base(), issuer);
        t["upstream"]["auth"] =
            json!({"type": "header", "name": "x-upstream-key", "value": "upstream-secret"});
        tenants(vec![("cap", t)])
    });
    let t = support::token("patient-p1", "patient/Patient.rs", &proxy.base("cap")).await;
    let a = harness::answer(
        support::http_client()
            .get(format!("{}/Patient/p1", proxy.base("cap")))
            .bearer_auth(&t)
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("cookie", "session=abc")
            .header("x-forwarded-host", "evil.example"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let seen = capture.requests.lock().unwrap().join("\n").to_lowercase();
    assert!(seen.starts_with("get /fhir/patient/p1 "), "{seen}");
    assert!(!seen.contains(&t.to_lowercase()), "token forwarded: {seen}");
    assert!(!seen.contains("authorization"), "{seen}");
    for leaked in ["x-hop", "cookie", "evil.example"] {
        assert!(!seen.contains(leaked), "`{leaked}` forwarded: {seen}");
    }
    assert!(seen.contains("x-upstream-key: upstream-secret"), "{seen}");
    let log = proxy.log();
    assert!(!log.contains(&t), "token logged");
    assert!(
        !log.contains(t.split('.').nth(2).unwrap()),
        "token signature logged"
    );
}

#[tokio::test]
async fn introspection_stops_revoked_tokens_before_they_expire() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy = Proxy::start_with_env(
        |port| {
            let mut t = tenant("intro", port, fhir.base_url(), issuer);
            t["token"]["introspection"] = json!({
                "endpoint": format!("{}/rfc7662/introspect", issuer.url()),
                "client_id": "backend",
                "client_secret_env": "INTRO_SECRET",
                "cache_seconds": 1
            });
            tenants(vec![("intro", t)])
        },
        &[("INTRO_SECRET", TEST_SECRET)],
    );
    let url = format!("{}/{OWN_OBS}", proxy.base("intro"));
    let t = support::token("patient-p1", "patient/Observation.rs", &proxy.base("intro")).await;
    let a = get(&url, Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);

    let revoked = support::http_client()
        .post(format!("{}/rfc7662/revoke", issuer.url()))
        .basic_auth("patient-p1", Some(TEST_SECRET))
        .form(&[("token", t.as_str()), ("token_type_hint", "access_token")])
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_invalid_token(&get(&url, Some(&t)).await, "token_inactive");
    // Another, unrevoked token of the same client still works.
    let t2 = support::token("patient-p1", "patient/Observation.rs", &proxy.base("intro")).await;
    assert_eq!(get(&url, Some(&t2)).await.status, 200);
}

#[tokio::test]
async fn a_forged_kid_cannot_evict_working_keys_while_the_issuer_is_down() {
    let mut issuer = Issuer::start(IssuerConfig::shared());
    let fhir = support::fhir_server();
    let iss_url = issuer.url().to_owned();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("evict", port, fhir.base_url(), &issuer);
        t["token"]["jwks_min_refresh_seconds"] = json!(1);
        tenants(vec![("evict", t)])
    });
    let aud = proxy.base("evict");
    let url = format!("{aud}/{OWN_OBS}");
    let kid = issuer.kid(Alg::RS256);
    let pem = issuer.private_key_pem(&kid);
    let mut c = claims(&aud);
    c["iss"] = json!(iss_url);
    let sign = |kid: &str, c: &serde_json::Value| {
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            c,
            &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    // Warm the key cache, then take the issuer away.
    assert_eq!(get(&url, Some(&sign(&kid, &c))).await.status, 200);
    issuer.stop();
    // A forged kid: refused, and the refetch fails, but the working keys stay.
    let forged = sign("forged-kid", &c);
    assert_invalid_token(&get(&url, Some(&forged)).await, "token_unknown_key");
    // A new token (not in the verified-token cache) with the real kid still verifies.
    c["jti"] = json!("fresh-after-outage");
    let a = get(&url, Some(&sign(&kid, &c))).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn tenants_sharing_a_jwks_each_live_by_their_own_cache_settings() {
    let mut issuer = Issuer::start(IssuerConfig::shared());
    let fhir = support::fhir_server();
    let iss_url = issuer.url().to_owned();
    // Both tenants name the same JWKS; only `short` may keep it for a second. Neither
    // refetches for an unknown kid more than once an hour.
    let proxy = Proxy::start(|port| {
        let mut long = tenant("long", port, fhir.base_url(), &issuer);
        long["token"]["jwks_cache_seconds"] = json!(3600);
        long["token"]["jwks_min_refresh_seconds"] = json!(3600);
        let mut short = tenant("short", port, fhir.base_url(), &issuer);
        short["token"]["jwks_cache_seconds"] = json!(1);
        short["token"]["jwks_min_refresh_seconds"] = json!(3600);
        tenants(vec![("long", long), ("short", short)])
    });
    let token_for = |tenant: &str, kid: &str, pem: &str, jti: &str| {
        let aud = proxy.base(tenant);
        let mut c = claims(&aud);
        c["iss"] = json!(iss_url);
        c["jti"] = json!(jti);
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            &c,
            &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let read = |tenant: &str| format!("{}/{OWN_OBS}", proxy.base(tenant));
    let kid = issuer.kid(Alg::RS256);
    let pem = issuer.private_key_pem(&kid);
    // `long` fetches the JWKS first (a cache shared by URI would keep its lifetime for
    // both), then `short`.
    for tenant in ["long", "short"] {
        let a = get(&read(tenant), Some(&token_for(tenant, &kid, &pem, tenant))).await;
        assert_eq!(a.status, 200, "{tenant}: {}", a.text);
    }
    // A forged kid on `long` spends `long`'s refetch for the hour, not `short`'s.
    let forged = token_for("long", "forged-kid", &pem, "forged");
    assert_invalid_token(
        &get(&read("long"), Some(&forged)).await,
        "token_unknown_key",
    );

    // The issuer rotates its keys.
    issuer.restart_with_keys(support::generate_keys());
    let new_kid = issuer.kid(Alg::RS256);
    let new_pem = issuer.private_key_pem(&new_kid);
    assert_ne!(new_kid, kid);
    // `short` gets the new key, by its own lifetime or its own refetch for the unknown
    // kid (with one cache for both, `long`'s hour and spent refetch would refuse it).
    let a = get(
        &read("short"),
        Some(&token_for("short", &new_kid, &new_pem, "n1")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // `long` spent its refetch on the forged kid and keeps its set for an hour.
    let a = get(
        &read("long"),
        Some(&token_for("long", &new_kid, &new_pem, "n2")),
    )
    .await;
    assert_invalid_token(&a, "token_unknown_key");
    // So `short` no longer knows the old key, and `long` still verifies with it.
    let old_short = token_for("short", &kid, &pem, "o1");
    assert_invalid_token(
        &get(&read("short"), Some(&old_short)).await,
        "token_unknown_key",
    );
    let old_long = token_for("long", &kid, &pem, "o2");
    let a = get(&read("long"), Some(&old_long)).await;
    assert_eq!(a.status, 200, "{}", a.text);
}
