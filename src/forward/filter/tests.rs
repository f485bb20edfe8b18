#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, LazyLock};

use http::{HeaderValue, Method};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::authz::{Checker, Permit, authorize};
use crate::error::ProxyError;
use crate::fhir::CompartmentIndex;
use crate::fhir::{ResourceId, parse_request};
use crate::scope::{ScopeGrant, TokenContext, check_scopes};
use crate::smart::{ScopeContext, parse_scopes};
use crate::token::{FhirUser, VerifiedToken};

const PUBLIC: &str = "https://proxy.example/t1";
const UPSTREAM: &str = "http://127.0.0.1:8081/fhir";
const FHIR_JSON: &str = "application/fhir+json";
const REWRITE: BaseRewrite<'static> = BaseRewrite {
    from: UPSTREAM,
    to: PUBLIC,
};

static INDEX: LazyLock<Arc<CompartmentIndex>> =
    LazyLock::new(|| Arc::new(CompartmentIndex::official().unwrap()));

static CURSOR_KEY: LazyLock<crate::cursor::CursorKey> =
    LazyLock::new(|| crate::cursor::CursorKey::from_secret(&[7; 32], 60).unwrap());

/// A request that passed the scope and authz stages.
struct Fixture {
    request: FhirRequest,
    token: VerifiedToken,
    grant: ScopeGrant,
    permit: Permit,
}

impl Fixture {
    fn new(scopes: &str, patient: Option<&str>, user: Option<&str>, target: &str) -> Fixture {
        Fixture::with_status(scopes, patient, user, target, StatusCode::NOT_FOUND)
    }

    fn with_status(
        scopes: &str,
        patient: Option<&str>,
        user: Option<&str>,
        target: &str,
        denied: StatusCode,
    ) -> Fixture {
        let token = VerifiedToken {
            issuer: "https://issuer.example".to_owned(),
            subject: None,
            client_id: None,
            scopes: parse_scopes(scopes),
            patient: patient.map(|p| ResourceId::parse(p).unwrap()),
            fhir_user: user.map(|u| FhirUser::parse(u).unwrap()),
            expires_at: u64::MAX,
        };
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let request = parse_request(&Method::GET, path, query, None).unwrap();
        let grant = check_scopes(
            &token.scopes,
            &request,
            TokenContext {
                has_patient: token.patient.is_some(),
            },
        )
        .unwrap();
        let checker = Checker::for_test(Arc::clone(&INDEX), denied);
        let permit = authorize(&checker, &request, &token, &grant).unwrap();
        Fixture {
            request,
            token,
            grant,
            permit,
        }
    }

    /// A `patient/` token for patient p1.
    fn patient(scopes: &str, target: &str) -> Fixture {
        Fixture::new(scopes, Some("p1"), None, target)
    }

    /// A `system/` token.
    fn system(scopes: &str, target: &str) -> Fixture {
        Fixture::new(scopes, None, None, target)
    }

    fn check_with(
        &self,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Checked, ProxyError> {
        let out = crate::rewrite::rewrite_request(
            &self.request,
            &self.grant,
            &self.permit,
            &INDEX,
            &Bytes::new(),
        )
        .ok();
        let ctx = CheckCtx {
            request: &self.request,
            records: ReleaseCtx {
                permit: &self.permit,
                grant: &self.grant,
                token: &self.token,
                index: &INDEX,
                bases: [PUBLIC, UPSTREAM],
                fga: None,
            },
            paging: out.as_ref().map(|o| self.pager(o)),
            rewrite: REWRITE,
        };
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        check_answer(
            &ctx,
            StatusCode::from_u16(status).unwrap(),
            &headers,
            Bytes::copy_from_slice(body),
        )
        .map_err(ProxyError::from)
    }

    /// Paging links as stage 5 would issue them, with a fixed key and clock.
    fn pager<'a>(&'a self, out: &'a crate::fhir::OutboundRequest) -> crate::cursor::Pager<'a> {
        crate::cursor::Pager::new(
            &CURSOR_KEY,
            "t1",
            PUBLIC,
            &self.token,
            &self.request,
            out,
            None,
            1_000,
        )
    }

    fn check(&self, status: u16, body: &str) -> Result<Checked, ProxyError> {
        self.check_with(status, Some(FHIR_JSON), body.as_bytes())
    }
}

fn is_bad_response(e: &ProxyError) -> bool {
    matches!(e, ProxyError::Upstream(UpstreamError::BadResponse(_)))
}

fn is_hidden(e: &ProxyError, status: StatusCode) -> bool {
    matches!(e, ProxyError::Authz(AuthzError::Hidden { status: s }) if *s == status)
        && e.status() == status
}

fn is_not_found(e: &ProxyError) -> bool {
    matches!(e, ProxyError::Upstream(UpstreamError::NotFound))
        && e.status() == StatusCode::NOT_FOUND
}

fn obs(id: &str, subject: &str) -> serde_json::Value {
    json!({"resourceType": "Observation", "id": id, "subject": {"reference": subject}})
}

fn search_entry(resource: serde_json::Value, mode: &str) -> serde_json::Value {
    json!({
        "fullUrl": format!("{PUBLIC}/{}/{}", resource["resourceType"].as_str().unwrap(),
                           resource["id"].as_str().unwrap_or("x")),
        "resource": resource,
        "search": {"mode": mode}
    })
}

fn bundle(entries: Vec<serde_json::Value>) -> String {
    json!({
        "resourceType": "Bundle",
        "id": "b1",
        "type": "searchset",
        "total": entries.len(),
        "link": [{"relation": "self", "url": format!("{PUBLIC}/Observation")}],
        "entry": entries
    })
    .to_string()
}

fn parsed(c: &Checked) -> serde_json::Value {
    serde_json::from_slice(&c.body).unwrap()
}

fn entry_ids(c: &Checked) -> Vec<String> {
    parsed(c)["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap_or("-"),
                        e["resource"]["id"].as_str().unwrap_or("-")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------

#[test]
fn read_of_allowed_record_passes_bytes_unchanged() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    // Odd spacing, key order and escapes must survive untouched.
    let body = "{ \"subject\" : {\"reference\":\"Patient/p1\"},\n  \"resourceType\":\"Observation\",\
                \"id\":\"o1\", \"note\":[{\"text\":\"caf\\u00e9 \\\"x\\\"\"}], \"valueQuantity\":{\"value\":1.50}}";
    let c = fx.check(200, body).unwrap();
    assert_eq!(c.body, body.as_bytes());
    assert_eq!(c.dropped, 0);
    assert_eq!(c.reason, "record_allowed");
}

#[test]
fn read_of_own_patient() {
    let fx = Fixture::patient("patient/Patient.r", "/Patient/p1");
    let c = fx
        .check(200, r#"{"resourceType":"Patient","id":"p1"}"#)
        .unwrap();
    assert_eq!(c.reason, "record_allowed");
}

#[test]
fn read_of_other_patients_record_is_hidden() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    let err = fx
        .check(200, &obs("o1", "Patient/p2").to_string())
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

#[test]
fn read_denied_uses_tenant_status() {
    let fx = Fixture::with_status(
        "patient/Observation.rs",
        Some("p1"),
        None,
        "/Observation/o1",
        StatusCode::FORBIDDEN,
    );
    let err = fx
        .check(200, &obs("o1", "Patient/p10").to_string())
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::FORBIDDEN), "{err:?}");
    assert_eq!(err.reason(), "record_denied");
}

#[test]
fn read_of_type_outside_compartment_is_hidden() {
    let fx = Fixture::patient("patient/Medication.r", "/Medication/m1");
    let err = fx
        .check(200, r#"{"resourceType":"Medication","id":"m1"}"#)
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

#[test]
fn read_by_system_token_passes() {
    let fx = Fixture::system("system/Observation.r", "/Observation/o1");
    let body = obs("o1", "Patient/p2").to_string();
    assert_eq!(fx.check(200, &body).unwrap().body, body.as_bytes());
}

fn is_wrong_resource(e: &ProxyError) -> bool {
    matches!(e, ProxyError::Upstream(UpstreamError::WrongResource))
        && e.status() == StatusCode::BAD_GATEWAY
        && e.reason() == "upstream_wrong_resource"
}

#[test]
fn read_answered_with_another_record_is_wrong_resource() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    for body in [
        obs("o2", "Patient/p1").to_string(),
        obs("o10", "Patient/p1").to_string(),
        json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}).to_string(),
        json!({"resourceType": "Observation", "id": 1}).to_string(),
        // Same id, other type.
        json!({"resourceType": "Condition", "id": "o1",
               "subject": {"reference": "Patient/p1"}})
        .to_string(),
        // A Bundle instead of the record.
        bundle(vec![search_entry(obs("o1", "Patient/p1"), "match")]),
        // An OperationOutcome with a 2xx.
        r#"{"resourceType":"OperationOutcome","id":"o1","issue":[]}"#.to_owned(),
    ] {
        let err = fx.check(200, &body).unwrap_err();
        assert!(is_wrong_resource(&err), "{body}: {err:?}");
    }
}

#[test]
fn read_of_a_patient_answered_with_another_patient_or_type_is_never_released() {
    // Every token, the unrestricted one too: the record it could see is not the one
    // asked for.
    for fx in [
        Fixture::patient("patient/Patient.r patient/Observation.r", "/Patient/p1"),
        Fixture::system("system/*.rs", "/Patient/p1"),
        Fixture::new("user/*.rs", None, Some("Patient/p1"), "/Patient/p1"),
    ] {
        for body in [
            json!({"resourceType": "Patient", "id": "p2"}).to_string(),
            json!({"resourceType": "Patient", "id": "p10"}).to_string(),
            json!({"resourceType": "Patient", "id": "P1"}).to_string(),
            obs("p1", "Patient/p1").to_string(),
        ] {
            let err = fx.check(200, &body).unwrap_err();
            assert!(is_wrong_resource(&err), "{body}: {err:?}");
        }
        assert!(
            fx.check(200, r#"{"resourceType":"Patient","id":"p1"}"#)
                .is_ok()
        );
    }
}

#[test]
fn answers_that_must_be_bundles_are_bundles() {
    let single = json!({"resourceType": "Patient", "id": "p1"}).to_string();
    let own_obs = obs("o1", "Patient/p1").to_string();
    for (fx, body) in [
        // `$everything`, even with the very patient it was asked about.
        (
            Fixture::patient("patient/*.rs", "/Patient/p1/$everything"),
            &single,
        ),
        (
            Fixture::system("system/*.rs", "/Patient/p1/$everything"),
            &single,
        ),
        // A compartment search, a type search, histories.
        (
            Fixture::patient("patient/Observation.rs", "/Patient/p1/Observation"),
            &own_obs,
        ),
        (
            Fixture::patient("patient/Observation.rs", "/Observation?code=a"),
            &own_obs,
        ),
        (
            Fixture::patient("patient/Observation.rs", "/Observation/o1/_history"),
            &own_obs,
        ),
        (
            Fixture::system("system/*.rs", "/Observation/_history"),
            &own_obs,
        ),
        (
            Fixture::system("system/Patient.rs", "/Patient/$match"),
            &single,
        ),
    ] {
        let err = fx.check(200, body).unwrap_err();
        assert!(
            is_wrong_resource(&err),
            "{}: {err:?}",
            fx.request.interaction.name()
        );
    }
    // The Bundle itself goes through the usual entry checks.
    let fx = Fixture::patient("patient/Observation.rs", "/Patient/p1/Observation");
    let c = fx
        .check(
            200,
            &bundle(vec![
                search_entry(obs("o1", "Patient/p1"), "match"),
                search_entry(obs("o2", "Patient/p2"), "match"),
            ]),
        )
        .unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
}

#[test]
fn instance_history_holds_versions_of_the_asked_record_only() {
    let history = |resources: Vec<serde_json::Value>| {
        json!({"resourceType": "Bundle", "type": "history",
               "entry": resources.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
        .to_string()
    };
    for fx in [
        Fixture::patient("patient/Observation.rs", "/Observation/o1/_history"),
        Fixture::system("system/Observation.rs", "/Observation/o1/_history"),
    ] {
        let ok = fx
            .check(
                200,
                &history(vec![obs("o1", "Patient/p1"), obs("o1", "Patient/p1")]),
            )
            .unwrap();
        assert_eq!(ok.kept, 2);
        for other in [
            obs("o2", "Patient/p1"),
            json!({"resourceType": "Condition", "id": "o1", "subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}),
        ] {
            let err = fx
                .check(200, &history(vec![obs("o1", "Patient/p1"), other.clone()]))
                .unwrap_err();
            assert!(is_wrong_resource(&err), "{other}: {err:?}");
        }
    }
}

#[test]
fn redirects_are_never_passed_on() {
    let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#;
    for fx in [
        Fixture::patient("patient/Observation.rs", "/Observation/o1"),
        Fixture::system("system/*.rs", "/Observation?code=a"),
    ] {
        for status in [300, 301, 302, 303, 307, 308] {
            for body in [outcome, "", "<html>moved</html>"] {
                let err = fx.check(status, body).unwrap_err();
                assert!(
                    matches!(err, ProxyError::Upstream(UpstreamError::Redirect)),
                    "{status}: {err:?}"
                );
                assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
                assert_eq!(err.reason(), "upstream_redirect");
            }
        }
    }
}

#[test]
fn escaped_upstream_urls_are_rewritten_in_released_answers() {
    let up = r"http:\/\/127.0.0.1:8081\/fhir";
    let fx = Fixture::system("system/Observation.rs", "/Observation/o1");
    let body = format!(
        r#"{{"resourceType":"Observation","id":"o1","subject":{{"reference":"{up}\/Patient\/p1"}},"note":[{{"text":"\u0068ttp://127.0.0.1:8081\u002Ffhir/Binary/b1 \"quoted\""}}]}}"#
    );
    let c = fx.check(200, &body).unwrap();
    let out = std::str::from_utf8(&c.body).unwrap();
    assert!(!out.contains("127.0.0.1:8081"), "{out}");
    let v = parsed(&c);
    assert_eq!(v["subject"]["reference"], format!("{PUBLIC}/Patient/p1"));
    assert_eq!(
        v["note"][0]["text"],
        format!("{PUBLIC}/Binary/b1 \"quoted\"")
    );
    // In Bundles too, entries and other members alike.
    let fx = Fixture::system("system/Observation.rs", "/Observation?code=a");
    let body = format!(
        r#"{{"resourceType":"Bundle","type":"searchset","meta":{{"source":"{up}"}},"entry":[{{"fullUrl":"{up}\/Observation\/o1","resource":{{"resourceType":"Observation","id":"o1","subject":{{"reference":"Patient\/p1"}}}}}}]}}"#
    );
    let c = fx.check(200, &body).unwrap();
    let out = std::str::from_utf8(&c.body).unwrap();
    assert!(!out.contains("127.0.0.1:8081"), "{out}");
    let v = parsed(&c);
    assert_eq!(v["meta"]["source"], PUBLIC);
    assert_eq!(v["entry"][0]["fullUrl"], format!("{PUBLIC}/Observation/o1"));
}

#[test]
fn vread_is_checked_like_read() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1/_history/2");
    assert!(fx.check(200, &obs("o1", "Patient/p1").to_string()).is_ok());
    let err = fx
        .check(200, &obs("o1", "Patient/p2").to_string())
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND));
    let err = fx
        .check(200, &obs("o2", "Patient/p1").to_string())
        .unwrap_err();
    assert!(is_wrong_resource(&err));
}

#[test]
fn not_found_and_gone_on_single_record_requests() {
    let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found","diagnostics":"Resource Observation/o1 is not known"}]}"#;
    for (scopes, target) in [
        ("patient/Observation.rs", "/Observation/o1"),
        ("patient/Observation.rs", "/Observation/o1/_history/2"),
        ("patient/Observation.rs", "/Observation/o1/_history"),
        ("patient/*.rs", "/Patient/p1/$everything"),
    ] {
        let fx = Fixture::patient(scopes, target);
        for status in [404, 410] {
            for body in [outcome, "", "<html>gone</html>"] {
                let err = fx.check(status, body).unwrap_err();
                assert!(is_not_found(&err), "{target} {status}: {err:?}");
                assert_eq!(err.reason(), "resource_not_found");
            }
        }
    }
}

#[test]
fn denied_read_is_indistinguishable_from_missing_record() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    let denied = fx
        .check(200, &obs("o1", "Patient/p2").to_string())
        .unwrap_err();
    let missing = fx.check(404, "").unwrap_err();
    // What `stack::render_error` puts on the wire.
    let wire = |e: &ProxyError| {
        (
            e.status(),
            e.issue_code(),
            e.client_reason(),
            e.client_message(),
        )
    };
    assert_eq!(wire(&denied), wire(&missing));
    // The audit record still says the truth.
    assert_eq!(denied.reason(), "record_denied");
    assert_eq!(missing.reason(), "resource_not_found");
}

// ---------------------------------------------------------------------------------
// Non-2xx answers
// ---------------------------------------------------------------------------------

#[test]
fn error_operation_outcome_passes_through() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Unknown search parameter \"foo\""}]}"#;
    for status in [400, 404, 410, 422, 500, 503] {
        for ct in [
            FHIR_JSON,
            "application/json",
            "application/fhir+json;charset=utf-8",
        ] {
            let c = fx.check_with(status, Some(ct), body.as_bytes()).unwrap();
            assert_eq!(c.body, body.as_bytes());
            assert_eq!(c.reason, "upstream_outcome");
            assert_eq!(c.dropped, 0);
        }
    }
}

#[test]
fn error_operation_outcome_on_read_passes_through_except_not_found() {
    // Unrestricted: the upstream's outcome passes, except 404/410 (uniform not-found).
    let fx = Fixture::system("system/Observation.rs", "/Observation/o1");
    let body = r#"{"resourceType":"OperationOutcome","issue":[]}"#;
    assert_eq!(fx.check(400, body).unwrap().reason, "upstream_outcome");
    assert!(is_not_found(&fx.check(404, body).unwrap_err()));
    // Restricted: every client error on a single record looks missing.
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    assert!(is_not_found(&fx.check(400, body).unwrap_err()));
    assert!(is_not_found(&fx.check(404, body).unwrap_err()));
    // Server errors are still reported as such.
    assert!(fx.check(500, body).is_ok());
}

#[test]
fn error_without_outcome_is_status() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    for (status, ct, body, shown) in [
        (500, Some("text/html"), "<h1>oops</h1>", 502),
        (400, Some("text/plain"), "bad", 400),
        (404, None, "", 404),
        (503, Some(FHIR_JSON), "not json", 502),
        // JSON, but not an OperationOutcome: never passed on.
        (
            400,
            Some(FHIR_JSON),
            r#"{"resourceType":"Patient","id":"p2","name":[{"family":"Secret"}]}"#,
            400,
        ),
        (400, Some(FHIR_JSON), r#"{"issue":[]}"#, 400),
        // An OperationOutcome body labelled as XML is not passed on either.
        (
            400,
            Some("application/fhir+xml"),
            r#"{"resourceType":"OperationOutcome"}"#,
            400,
        ),
    ] {
        let err = fx.check_with(status, ct, body.as_bytes()).unwrap_err();
        assert!(
            matches!(err, ProxyError::Upstream(UpstreamError::Status(s)) if s.as_u16() == status),
            "{status} {body}: {err:?}"
        );
        assert_eq!(err.status().as_u16(), shown, "{status} {body}");
        assert_eq!(err.reason(), "upstream_status");
    }
}

#[test]
fn not_modified_has_an_empty_body() {
    let fx = Fixture::system("system/Observation.r", "/Observation/o1");
    let c = fx.check_with(304, None, b"ignored").unwrap();
    assert!(c.body.is_empty());
    assert_eq!(c.reason, "not_modified");
}

#[test]
fn not_modified_for_restricted_read_is_not_released() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o-of-p2");
    assert!(fx.check_with(304, None, b"").is_err());
}

// ---------------------------------------------------------------------------------
// Content type and malformed bodies
// ---------------------------------------------------------------------------------

#[test]
fn json_content_types_are_accepted() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    let body = obs("o1", "Patient/p1").to_string();
    for ct in [
        FHIR_JSON,
        "application/json",
        "application/json+fhir",
        "Application/FHIR+JSON",
        "application/fhir+json; charset=UTF-8",
        " application/fhir+json ;fhirVersion=4.0",
    ] {
        assert!(
            fx.check_with(200, Some(ct), body.as_bytes()).is_ok(),
            "{ct}"
        );
    }
}

#[test]
fn non_json_content_type_on_success_is_bad_response() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    let body = obs("o1", "Patient/p1").to_string();
    for ct in [
        Some("application/fhir+xml"),
        Some("application/xml"),
        Some("text/html"),
        Some("text/json"),
        Some("application/fhir+jsonx"),
        Some(""),
        None,
    ] {
        let err = fx.check_with(200, ct, body.as_bytes()).unwrap_err();
        assert!(is_bad_response(&err), "{ct:?}: {err:?}");
    }
}

#[test]
fn content_type_that_is_not_visible_ascii_is_bad_response() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o1");
    let ctx = CheckCtx {
        request: &fx.request,
        records: ReleaseCtx {
            permit: &fx.permit,
            grant: &fx.grant,
            token: &fx.token,
            index: &INDEX,
            bases: [PUBLIC, UPSTREAM],
            fga: None,
        },
        paging: None,
        rewrite: REWRITE,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_bytes(b"application/fhir+json\xff").unwrap(),
    );
    let err = check_answer(
        &ctx,
        StatusCode::OK,
        &headers,
        Bytes::from(obs("o1", "Patient/p1").to_string()),
    )
    .unwrap_err();
    assert!(is_bad_response(&err.into()));
}

#[test]
fn broken_json_is_bad_response() {
    for (scopes, target) in [
        ("patient/Observation.rs", "/Observation/o1"),
        ("patient/Observation.rs", "/Observation?code=a"),
        ("patient/*.rs", "/Patient/p1/$everything"),
    ] {
        let fx = Fixture::patient(scopes, target);
        for body in [
            "",
            "{",
            "null",
            "[]",
            "\"Bundle\"",
            "{\"resourceType\":\"Observation\"",
            "{\"resourceType\":1}",
            "{\"resourceType\":null}",
            "{\"resourceType\":\"observation\"}",
            "{\"resourceType\":\"NotAType\"}",
            "{\"id\":\"o1\"}",
            "{\"resourceType\":\"Bundle\"} trailing",
            "\u{feff}{\"resourceType\":\"Observation\",\"id\":\"o1\"}",
        ] {
            let err = fx.check(200, body).unwrap_err();
            assert!(is_bad_response(&err), "{target} {body:?}: {err:?}");
        }
    }
}

#[test]
fn deeply_nested_json_is_bad_response_not_a_crash() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let deep = format!(
        "{{\"resourceType\":\"Bundle\",\"entry\":[{{\"resource\":{}1{}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(is_bad_response(&fx.check(200, &deep).unwrap_err()));
}

// ---------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------

#[test]
fn bundle_drops_other_patients_entries() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
        search_entry(obs("o3", "Patient/p10"), "match"),
        search_entry(obs("o4", &format!("{PUBLIC}/Patient/p1")), "match"),
        search_entry(obs("o5", "https://elsewhere.example/Patient/p1"), "match"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1", "Observation/o4"]);
    assert_eq!(c.dropped, 3);
    assert_eq!(c.reason, "entries_filtered");
}

#[test]
fn bundle_drops_included_records_the_token_may_not_see() {
    let fx = Fixture::patient(
        "patient/Observation.rs patient/Patient.r",
        "/Observation?_include=Observation:subject&_include=Observation:performer",
    );
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(json!({"resourceType": "Patient", "id": "p1"}), "include"),
        search_entry(json!({"resourceType": "Patient", "id": "p2"}), "include"),
        search_entry(
            json!({"resourceType": "Practitioner", "id": "pr1"}),
            "include",
        ),
        search_entry(json!({"resourceType": "Medication", "id": "m1"}), "include"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1", "Patient/p1"]);
    assert_eq!(c.dropped, 3);
}

#[test]
fn bundle_include_without_scope_dropped_even_if_in_compartment() {
    let fx = Fixture::patient(
        "patient/Observation.rs",
        "/Observation?_include=Observation:subject",
    );
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(json!({"resourceType": "Patient", "id": "p1"}), "include"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
}

#[test]
fn bundle_match_entry_of_other_type_needs_its_own_scope() {
    // An upstream that answers an Observation search with a Patient "match".
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = bundle(vec![search_entry(
        json!({"resourceType": "Patient", "id": "p1"}),
        "match",
    )]);
    let c = fx.check(200, &body).unwrap();
    assert!(entry_ids(&c).is_empty());
    assert_eq!(c.dropped, 1);
}

#[test]
fn bundle_total_removed_only_when_something_was_dropped() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let all_mine = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p1"), "match"),
    ]);
    let c = fx.check(200, &all_mine).unwrap();
    assert_eq!(parsed(&c)["total"], 2);
    assert_eq!(c.dropped, 0);
    assert_eq!(c.reason, "entries_allowed");

    let mixed = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
    ]);
    let c = fx.check(200, &mixed).unwrap();
    assert!(parsed(&c).get("total").is_none());
    assert_eq!(c.dropped, 1);
}

#[test]
fn bundle_keeps_link_and_other_keys_in_order() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = format!(
        r#"{{"resourceType":"Bundle","id":"b1","meta":{{"lastUpdated":"2024-01-01T00:00:00Z"}},"type":"searchset","total":2,"link":[{{"relation":"self","url":"{PUBLIC}/Observation?code=a"}},{{"relation":"next","url":"{PUBLIC}?_getpages=x"}}],"entry":[{},{}],"signature":{{"type":[]}}}}"#,
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
    );
    let c = fx.check(200, &body).unwrap();
    let out = parsed(&c);
    let keys: Vec<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "resourceType",
            "id",
            "meta",
            "type",
            "link",
            "entry",
            "signature"
        ]
    );
    let input: serde_json::Value = serde_json::from_str(&body).unwrap();
    // `self` is the client's own request; the HAPI-style `next` handle became a cursor.
    assert_eq!(out["link"][0], input["link"][0]);
    assert_eq!(out["link"][1]["relation"], "next");
    let next = out["link"][1]["url"].as_str().unwrap();
    assert!(
        next.starts_with(&format!("{PUBLIC}/Observation?_cursor=")),
        "{next}"
    );
    assert_eq!(out["meta"], input["meta"]);
}

#[test]
fn bundle_all_dropped_removes_entry_key() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = bundle(vec![search_entry(obs("o2", "Patient/p2"), "match")]);
    let c = fx.check(200, &body).unwrap();
    let out = parsed(&c);
    assert!(out.get("entry").is_none(), "{out}");
    assert!(out.get("total").is_none(), "{out}");
    assert_eq!(out["resourceType"], "Bundle");
    assert_eq!(out["link"][0]["relation"], "self");
}

#[test]
fn bundle_without_entries_is_kept() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    for body in [
        r#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
        r#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#,
    ] {
        let c = fx.check(200, body).unwrap();
        assert_eq!(c.dropped, 0);
        let out = parsed(&c);
        assert_eq!(out["total"], 0);
        assert!(out.get("entry").is_none());
    }
}

#[test]
fn bundle_keeps_outcome_entries() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let outcome = json!({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "warning", "code": "processing"}]});
    // Nothing else dropped: the upstream's warning stays (and is not a record).
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        json!({"resource": outcome, "search": {"mode": "outcome"}}),
    ]);
    let c = fx.check(200, &body).unwrap();
    let out = parsed(&c);
    let entries = out["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["search"]["mode"], "outcome");
    assert_eq!((c.dropped, c.kept), (0, 1));

    // Something dropped: for a restricted token the warning goes too, since it may
    // describe what was dropped.
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        json!({"resource": outcome, "search": {"mode": "outcome"}}),
        // An OperationOutcome posing as a match needs a scope on OperationOutcome.
        json!({"resource": outcome, "search": {"mode": "match"}}),
        json!({"resource": outcome}),
    ]);
    let c = fx.check(200, &body).unwrap();
    let out = parsed(&c);
    let entries = out["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(c.dropped, 3);
}

#[test]
fn total_goes_only_when_a_match_was_dropped() {
    let fx = Fixture::patient(
        "patient/Observation.rs",
        "/Observation?code=a&_include=Observation:performer",
    );
    let practitioner = json!({"resourceType": "Practitioner", "id": "pr9"});
    // Only an included record dropped: `total` (which counts matches) stays.
    let body = json!({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(practitioner.clone(), "include"),
    ]})
    .to_string();
    let c = fx.check(200, &body).unwrap();
    assert_eq!(parsed(&c)["total"], 1);
    assert_eq!(c.dropped, 1);
    // A match dropped: `total` goes.
    let body = json!({"resourceType": "Bundle", "type": "searchset", "total": 2, "entry": [
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
    ]})
    .to_string();
    let c = fx.check(200, &body).unwrap();
    assert!(parsed(&c).get("total").is_none());
}

#[test]
fn bundle_entries_without_resource_only_for_unrestricted() {
    let history = |fx: &Fixture| {
        let body = json!({
            "resourceType": "Bundle", "type": "history",
            "entry": [
                {"fullUrl": format!("{PUBLIC}/Observation/o1"),
                 "resource": obs("o1", "Patient/p1"),
                 "request": {"method": "PUT", "url": "Observation/o1"},
                 "response": {"status": "200"}},
                {"request": {"method": "DELETE", "url": "Observation/o9"},
                 "response": {"status": "204"}},
                {"resource": null,
                 "request": {"method": "DELETE", "url": "Observation/o8"}}
            ]
        })
        .to_string();
        fx.check(200, &body).unwrap()
    };
    let restricted = history(&Fixture::patient(
        "patient/Observation.rs",
        "/Observation/o1/_history",
    ));
    assert_eq!(restricted.dropped, 2);
    assert_eq!(parsed(&restricted)["entry"].as_array().unwrap().len(), 1);

    let unrestricted = history(&Fixture::system(
        "system/Observation.rs",
        "/Observation/_history",
    ));
    assert_eq!(unrestricted.dropped, 0);
    assert_eq!(parsed(&unrestricted)["entry"].as_array().unwrap().len(), 3);
}

#[test]
fn history_instance_of_other_patients_record_is_hidden() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation/o2/_history");
    let body = json!({
        "resourceType": "Bundle", "type": "history", "total": 2,
        "entry": [
            {"resource": obs("o2", "Patient/p2")},
            {"resource": json!({"resourceType": "Observation", "id": "o2",
                                "meta": {"versionId": "1"},
                                "subject": {"reference": "Patient/p2"}})}
        ]
    })
    .to_string();
    let err = fx.check(200, &body).unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

#[test]
fn bundle_kept_entries_are_byte_identical() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let e1 = r#"{ "fullUrl" : "https://proxy.example/t1/Observation/o1",
        "resource":{"resourceType":"Observation","id":"o1","valueQuantity":{"value":1.50,"unit":"mg"},
        "subject":{"reference":"Patient/p1"},"note":[{"text":"caf\u00e9 \"q\" \/"}]},"search":{"mode":"match","score":1.0}}"#;
    let e2 = r#"{"resource":{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p2"}},"search":{"mode":"match"}}"#;
    let e3 = r#"{"resource":{"subject":{"reference":"Patient/p1"},"id":"o3","resourceType":"Observation","valueInteger":10000000000000000000001}}"#;
    let body = format!(
        "{{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"searchset\",\n  \"entry\": [ {e1} ,\n {e2}, {e3} ]\n}}"
    );
    let c = fx.check(200, &body).unwrap();
    let out = std::str::from_utf8(&c.body).unwrap();
    assert!(out.contains(e1), "{out}");
    assert!(out.contains(e3), "{out}");
    assert!(!out.contains("o2"), "{out}");
    assert_eq!(
        out,
        format!(r#"{{"resourceType":"Bundle","type":"searchset","entry":[{e1},{e3}]}}"#)
    );
}

#[test]
fn bundle_unknown_or_missing_entry_type_is_dropped() {
    let fx = Fixture::system("system/*.rs", "/?_type=Observation");
    let body = bundle(vec![
        json!({"resource": {"resourceType": "NotAType", "id": "x"}}),
        json!({"resource": {"id": "x"}}),
        json!({"resource": {"resourceType": 7}}),
        json!({"resource": "Observation/o1"}),
        search_entry(obs("o1", "Patient/p2"), "match"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
    assert_eq!(c.dropped, 4);
}

#[test]
fn bundle_malformed_entries_are_bad_response() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    for body in [
        r#"{"resourceType":"Bundle","entry":{}}"#,
        r#"{"resourceType":"Bundle","entry":null}"#,
        r#"{"resourceType":"Bundle","entry":"x"}"#,
        r#"{"resourceType":"Bundle","entry":[1]}"#,
        r#"{"resourceType":"Bundle","entry":[[]]}"#,
        r#"{"resourceType":"Bundle","entry":[{"search":{"mode":1},"resource":{"resourceType":"Observation"}}]}"#,
        r#"{"resourceType":"Bundle","entry":[{"search":"match","resource":{"resourceType":"Observation"}}]}"#,
        // Duplicate keys inside an entry are ambiguous: refused, never guessed.
        r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}},"resource":{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p2"}}}]}"#,
    ] {
        let err = fx.check(200, body).unwrap_err();
        assert!(is_bad_response(&err), "{body}: {err:?}");
    }
}

#[test]
fn bundle_duplicate_top_level_entry_never_leaks_unchecked_entries() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let mine = search_entry(obs("o1", "Patient/p1"), "match");
    let theirs = search_entry(obs("o2", "Patient/p2"), "match");
    for body in [
        format!(r#"{{"resourceType":"Bundle","entry":[{theirs}],"entry":[{mine}]}}"#),
        format!(r#"{{"resourceType":"Bundle","entry":[{mine}],"entry":[{theirs}]}}"#),
    ] {
        let c = fx.check(200, &body).unwrap();
        let out = std::str::from_utf8(&c.body).unwrap();
        assert!(!out.contains("Patient/p2"), "{out}");
        assert!(out.matches("\"entry\"").count() <= 1, "{out}");
    }
}

#[test]
fn bundle_everything_filters_by_scope_and_compartment() {
    let fx = Fixture::patient(
        "patient/Patient.r patient/Observation.r",
        "/Patient/p1/$everything",
    );
    let body = bundle(vec![
        json!({"resource": {"resourceType": "Patient", "id": "p1"}}),
        json!({"resource": obs("o1", "Patient/p1")}),
        json!({"resource": obs("o2", "Patient/p2")}),
        json!({"resource": {"resourceType": "Encounter", "id": "e1",
                            "subject": {"reference": "Patient/p1"}}}),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Patient/p1", "Observation/o1"]);
    assert_eq!(c.dropped, 2);
}

#[test]
fn bundle_for_system_token_keeps_everything() {
    let fx = Fixture::system("system/Observation.rs", "/Observation?code=a");
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(c.dropped, 0);
    assert_eq!(parsed(&c)["total"], 2);
    let mut expected = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    // The `self` link names the client's own request (see `crate::cursor`).
    expected["link"][0]["url"] = json!(format!("{PUBLIC}/Observation?code=a"));
    assert_eq!(parsed(&c), expected);
}

#[test]
fn bundle_user_practitioner() {
    let fx = Fixture::new(
        "user/Observation.rs",
        None,
        Some("Practitioner/pr1"),
        "/Observation",
    );
    let mut by_me = obs("o1", "Patient/p1");
    by_me["performer"] = json!([{"reference": "Practitioner/pr1"}]);
    let mut by_other = obs("o2", "Patient/p1");
    by_other["performer"] = json!([{"reference": "Practitioner/pr2"}]);
    let body = bundle(vec![
        search_entry(by_me, "match"),
        search_entry(by_other, "match"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
}

// ---------------------------------------------------------------------------------
// Other 2xx answers
// ---------------------------------------------------------------------------------

#[test]
fn success_operation_outcome_passes_through() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#;
    let c = fx.check(200, body).unwrap();
    assert_eq!(c.body, body.as_bytes());
    assert_eq!(c.reason, "upstream_outcome");
}

#[test]
fn permit_contexts_are_the_releasing_ones() {
    // The union: a patient/ token with a system/ scope on the same type sees both.
    let fx = Fixture::patient(
        "patient/Observation.rs system/Observation.rs",
        "/Observation?code=a",
    );
    assert!(fx.permit.is_unrestricted());
    assert!(
        fx.permit
            .reaches
            .iter()
            .any(|(c, _)| *c == ScopeContext::System)
    );
    let body = bundle(vec![
        search_entry(obs("o1", "Patient/p1"), "match"),
        search_entry(obs("o2", "Patient/p2"), "match"),
    ]);
    assert_eq!(fx.check(200, &body).unwrap().dropped, 0);
}

// ---------------------------------------------------------------------------------
// Never panics
// ---------------------------------------------------------------------------------

fn fixtures() -> Vec<Fixture> {
    vec![
        Fixture::patient("patient/Observation.rs", "/Observation/o1"),
        Fixture::patient(
            "patient/Observation.rs patient/Patient.r",
            "/Observation?code=a",
        ),
        Fixture::patient("patient/*.rs", "/Patient/p1/$everything"),
        Fixture::patient("patient/Observation.rs", "/Observation/o1/_history"),
        Fixture::system("system/*.rs", "/_history"),
    ]
}

static FIXTURES: LazyLock<Vec<Fixture>> = LazyLock::new(fixtures);

/// JSON-ish text built from FHIR-looking fragments, so the filter's deeper paths
/// are reached far more often than with random bytes.
fn jsonish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"resourceType\"",
        "\"Bundle\"",
        "\"Observation\"",
        "\"Patient\"",
        "\"OperationOutcome\"",
        "\"entry\"",
        "\"resource\"",
        "\"search\"",
        "\"mode\"",
        "\"include\"",
        "\"outcome\"",
        "\"match\"",
        "\"total\"",
        "\"id\"",
        "\"o1\"",
        "\"p1\"",
        "\"subject\"",
        "\"reference\"",
        "\"Patient/p1\"",
        "\"#p1\"",
        "null",
        "1",
        "-0.5e9",
        "true",
        "\"\\u0000\"",
        "\"\\ud800\"",
        " ",
        "\"",
        "\\",
    ]);
    prop::collection::vec(atoms, 0..64).prop_map(|parts| parts.concat())
}

fn wrapped_bundle() -> impl Strategy<Value = String> {
    jsonish().prop_map(|inner| {
        format!(r#"{{"resourceType":"Bundle","entry":[{{"resource":{inner}}}],"total":1}}"#)
    })
}

fn status() -> impl Strategy<Value = u16> {
    prop::sample::select(vec![200u16, 201, 204, 304, 400, 404, 410, 500])
}

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![
        Some(FHIR_JSON),
        Some("application/json; charset=utf-8"),
        Some("application/fhir+xml"),
        None,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn check_answer_never_panics_on_bytes(
        body in prop::collection::vec(any::<u8>(), 0..512),
        status in status(),
        ct in content_type(),
        which in 0usize..5,
    ) {
        let _ = FIXTURES[which].check_with(status, ct, &body);
    }

    #[test]
    fn check_answer_never_panics_on_jsonish(
        body in prop_oneof![jsonish(), wrapped_bundle()],
        status in status(),
        ct in content_type(),
        which in 0usize..5,
    ) {
        let _ = FIXTURES[which].check_with(status, ct, body.as_bytes());
    }

    #[test]
    fn filtered_bundle_is_valid_json_with_only_allowed_entries(
        subjects in prop::collection::vec(
            prop::sample::select(vec!["Patient/p1", "Patient/p2", "Patient/p10", "#p1", "Group/p1"]),
            0..12,
        ),
    ) {
        let fx = &FIXTURES[1];
        let entries: Vec<_> = subjects
            .iter()
            .enumerate()
            .map(|(i, s)| search_entry(obs(&format!("o{i}"), s), "match"))
            .collect();
        let c = fx.check(200, &bundle(entries)).unwrap();
        let out = parsed(&c);
        let kept = out.get("entry").and_then(|e| e.as_array()).map_or(0, Vec::len);
        let expected = subjects.iter().filter(|s| **s == "Patient/p1").count();
        prop_assert_eq!(kept, expected);
        prop_assert_eq!(c.dropped, subjects.len() - expected);
        prop_assert_eq!(out.get("total").is_some(), c.dropped == 0);
        for e in out.get("entry").and_then(|e| e.as_array()).into_iter().flatten() {
            prop_assert_eq!(&e["resource"]["subject"]["reference"], "Patient/p1");
        }
    }
}

#[test]
fn non_patient_includes_are_kept_only_when_a_released_record_references_them() {
    let fx = Fixture::patient(
        "patient/MedicationRequest.rs patient/Medication.rs",
        "/MedicationRequest?_include=MedicationRequest:medication",
    );
    let mr = |id: &str, patient: &str, med: &str| {
        json!({"resourceType": "MedicationRequest", "id": id,
               "subject": {"reference": patient},
               "medicationReference": {"reference": med}})
    };
    let med = |id: &str| json!({"resourceType": "Medication", "id": id});
    let body = json!({
        "resourceType": "Bundle", "type": "searchset", "total": 2,
        "entry": [
            search_entry(mr("mr1", "Patient/p1", "Medication/m1"), "match"),
            search_entry(mr("mr2", "Patient/p2", "Medication/m2"), "match"),
            search_entry(med("m1"), "include"),
            // Referenced only by p2's request, which is dropped.
            search_entry(med("m2"), "include"),
            // Referenced by nobody.
            search_entry(med("m3"), "include"),
            // Referenced absolutely through the public base, with a version.
            search_entry(mr("mr3", "Patient/p1", &format!("{PUBLIC}/Medication/m4/_history/2")), "match"),
            search_entry(med("m4"), "include")
        ]
    })
    .to_string();
    let c = fx.check(200, &body).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
    let ids: Vec<&str> = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mr1", "m1", "mr3", "m4"]);
    assert_eq!(c.dropped, 3);

    // A direct read of the same Medication is refused for the patient token.
    let fx = Fixture::patient("patient/Medication.rs", "/Medication/m1");
    let err = fx.check(200, &med("m1").to_string()).unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// paging links (`rewrite_links`, see `crate::cursor`)

#[test]
fn bundle_links_never_carry_upstream_urls() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?_count=2");
    let body = json!({
        "resourceType": "Bundle", "type": "searchset",
        "link": [
            {"relation": "self", "url": format!("{PUBLIC}/Observation?_count=2&_offset=0")},
            // The upstream's own URL, rewritten to the public base and made a cursor
            // (the upstream dropped the compartment of the narrowed search).
            {"relation": "next", "url": format!("{UPSTREAM}/Observation?_count=2&_offset=2")},
            // Not the upstream base (a longer path), so not rewritten: foreign, dropped.
            {"relation": "previous", "url": format!("{UPSTREAM}2/Observation?_offset=0")},
            {"relation": "last", "url": "https://elsewhere.example/fhir/Observation"},
            {"relation": "alternate", "url": format!("{PUBLIC}/Observation?_format=xml")},
            {"relation": "first"},
            "junk"
        ],
        "entry": [search_entry(obs("o1", "Patient/p1"), "match")]
    })
    .to_string();
    let c = fx.check(200, &body).unwrap();
    let out = parsed(&c);
    let links = out["link"].as_array().unwrap();
    assert_eq!(links.len(), 2, "{out}");
    assert_eq!(links[0]["relation"], "self");
    assert_eq!(links[0]["url"], format!("{PUBLIC}/Observation?_count=2"));
    assert_eq!(links[1]["relation"], "next");
    let next = links[1]["url"].as_str().unwrap();
    let cursor = next
        .strip_prefix(&format!("{PUBLIC}/Observation?_cursor="))
        .unwrap();
    let principal = CURSOR_KEY.principal(&fx.token);
    let claims = CURSOR_KEY
        .verify(
            cursor,
            &crate::cursor::Binding {
                tenant: "t1",
                principal: &principal,
                request: "search-type /Observation",
            },
            1_000,
        )
        .unwrap();
    assert_eq!(claims.page.path, "/Patient/p1/Observation");
    assert!(
        !c.body
            .windows(UPSTREAM.len())
            .any(|w| w == UPSTREAM.as_bytes())
    );
    // Entries untouched.
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
}

#[test]
fn upstream_base_in_a_bundle_member_key_is_rewritten() {
    // Found by fuzzing (fuzz/regressions/answer/): a top-level key was copied out as
    // written, so an upstream URL in it reached the client.
    let fx = Fixture::new(
        "user/Observation.rs user/Patient.rs",
        None,
        Some("Practitioner/pr1"),
        "/Observation?code=a",
    );
    let body = format!(r#"{{"resourceType":"Bundle","{UPSTREAM}":[],"{UPSTREAM}/x":1}}"#);
    let c = fx.check(200, &body).unwrap();
    let text = std::str::from_utf8(&c.body).unwrap();
    assert!(!text.contains(UPSTREAM), "{text}");
    assert_eq!(parsed(&c)[PUBLIC], json!([]));
    assert_eq!(parsed(&c)[format!("{PUBLIC}/x")], 1);
}

#[test]
fn bundle_without_paging_context_loses_its_links() {
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let body = bundle(vec![search_entry(obs("o1", "Patient/p1"), "match")]);
    let ctx = CheckCtx {
        request: &fx.request,
        records: ReleaseCtx {
            permit: &fx.permit,
            grant: &fx.grant,
            token: &fx.token,
            index: &INDEX,
            bases: [PUBLIC, UPSTREAM],
            fga: None,
        },
        paging: None,
        rewrite: REWRITE,
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    let c = check_answer(&ctx, StatusCode::OK, &headers, Bytes::from(body)).unwrap();
    let out = parsed(&c);
    assert!(out.get("link").is_none(), "{out}");
    assert_eq!(out["total"], 1);
}

// ---------------------------------------------------------------------------------
// Finer-grained scopes: constraints evaluated on returned records
// ---------------------------------------------------------------------------------

const LAB_SCOPE: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";

fn categorized_obs(id: &str, category: &str) -> serde_json::Value {
    let mut o = obs(id, "Patient/p1");
    o["category"] = json!([{"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": category
    }]}]);
    o
}

#[test]
fn constrained_read_of_matching_record_passes() {
    let fx = Fixture::patient(LAB_SCOPE, "/Observation/o1");
    let body = categorized_obs("o1", "laboratory").to_string();
    let c = fx.check(200, &body).unwrap();
    assert_eq!(c.body, body.as_bytes());
    assert_eq!(c.reason, "record_allowed");
}

#[test]
fn constrained_read_of_other_record_looks_missing() {
    let fx = Fixture::patient(LAB_SCOPE, "/Observation/o1");
    let err = fx
        .check(200, &categorized_obs("o1", "vital-signs").to_string())
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
    assert_eq!(err.reason(), "record_denied");
    // Without a category at all, likewise.
    let err = fx
        .check(200, &obs("o1", "Patient/p1").to_string())
        .unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

#[test]
fn constrained_history_keeps_only_matching_versions() {
    let fx = Fixture::patient(LAB_SCOPE, "/Observation/o1/_history");
    let history = |categories: &[&str]| {
        json!({
            "resourceType": "Bundle", "type": "history", "total": categories.len(),
            "entry": categories.iter()
                .map(|c| json!({"resource": categorized_obs("o1", c)}))
                .collect::<Vec<_>>()
        })
        .to_string()
    };
    let c = fx
        .check(200, &history(&["laboratory", "vital-signs"]))
        .unwrap();
    assert_eq!(c.kept, 1);
    assert_eq!(c.dropped, 1);
    let err = fx.check(200, &history(&["vital-signs"])).unwrap_err();
    assert!(is_hidden(&err, StatusCode::NOT_FOUND), "{err:?}");
}

#[test]
fn constrained_search_matches_are_checked_again() {
    let fx = Fixture::patient(LAB_SCOPE, "/Observation");
    let body = bundle(vec![
        search_entry(categorized_obs("o1", "laboratory"), "match"),
        search_entry(categorized_obs("o2", "vital-signs"), "match"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1"]);
    assert_eq!(c.dropped, 1);
}

#[test]
fn included_records_not_matching_a_constrained_scope_are_dropped() {
    let fx = Fixture::patient(
        &format!("patient/Encounter.rs {LAB_SCOPE}"),
        "/Encounter?_revinclude=Observation:encounter",
    );
    let body = bundle(vec![
        search_entry(
            json!({"resourceType": "Encounter", "id": "e1",
                   "subject": {"reference": "Patient/p1"}}),
            "match",
        ),
        search_entry(categorized_obs("o1", "laboratory"), "include"),
        search_entry(categorized_obs("o2", "vital-signs"), "include"),
        search_entry(obs("o3", "Patient/p1"), "include"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Encounter/e1", "Observation/o1"]);
    assert_eq!(c.dropped, 2);
}

#[test]
fn two_constrained_scopes_release_the_union() {
    let vitals = LAB_SCOPE.replace("laboratory", "vital-signs");
    let fx = Fixture::patient(
        &format!("patient/Encounter.rs {LAB_SCOPE} {vitals}"),
        "/Encounter?_revinclude=Observation:encounter",
    );
    let body = bundle(vec![
        search_entry(categorized_obs("o1", "laboratory"), "include"),
        search_entry(categorized_obs("o2", "vital-signs"), "include"),
        search_entry(categorized_obs("o3", "imaging"), "include"),
    ]);
    let c = fx.check(200, &body).unwrap();
    assert_eq!(entry_ids(&c), ["Observation/o1", "Observation/o2"]);
}

#[test]
fn single_record_client_errors_look_missing_for_restricted_tokens() {
    let outcome =
        r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid"}]}"#;
    let fx = Fixture::patient(
        "patient/Observation.rs",
        "/Observation/o2/_history?_since=garbage",
    );
    let err = fx.check(400, outcome).unwrap_err();
    assert!(is_not_found(&err), "{err:?}");
    // An unrestricted token sees the upstream's own answer.
    let fx = Fixture::system(
        "system/Observation.rs",
        "/Observation/o2/_history?_since=garbage",
    );
    let c = fx.check(400, outcome).unwrap();
    assert_eq!(c.reason, "upstream_outcome");
}

mod differential;

/// A searchset page as the upstream sends it: `total` over all pages, these matches,
/// a `next` link unless it is the last page.
fn page(total: usize, entries: Vec<serde_json::Value>, last: bool) -> String {
    let mut links = vec![json!({"relation": "self", "url": format!("{UPSTREAM}/Observation")})];
    if !last {
        links.push(
            json!({"relation": "next", "url": format!("{UPSTREAM}?_getpages=x&_getpagesoffset=2")}),
        );
    }
    json!({"resourceType": "Bundle", "type": "searchset", "total": total,
           "link": links, "entry": entries})
    .to_string()
}

/// An Observation of `subject` in category `category`.
fn obs_in(id: &str, subject: &str, category: &str) -> serde_json::Value {
    json!({"resourceType": "Observation", "id": id, "subject": {"reference": subject},
           "category": [{"coding": [{
               "system": "http://terminology.hl7.org/CodeSystem/observation-category",
               "code": category}]}]})
}

/// A patient token whose scope is constrained: the narrowing (`category=laboratory`)
/// and the answer check may disagree, so the upstream's count proves nothing.
const LAB_ONLY: &str = "patient/Observation.rs?category=laboratory";

#[test]
fn a_restricted_page_shows_total_only_when_it_shows_every_match() {
    let fx = Fixture::patient(LAB_ONLY, "/Observation?code=a");
    let lab = |i: usize| {
        search_entry(
            obs_in(&format!("o{i}"), "Patient/p1", "laboratory"),
            "match",
        )
    };
    // The first of two pages drops nothing, but the upstream's 3 may count a record
    // the check drops on the second page: not handed out.
    let c = fx
        .check(200, &page(3, vec![lab(1), lab(2)], false))
        .unwrap();
    assert_eq!(c.dropped, 0);
    assert!(parsed(&c).get("total").is_none(), "{}", parsed(&c));
    // A one-page answer whose total is what it shows: kept.
    let c = fx.check(200, &page(2, vec![lab(1), lab(2)], true)).unwrap();
    assert_eq!(parsed(&c)["total"], 2);
    // A total larger than the page, even without a next link: not kept.
    let c = fx.check(200, &page(5, vec![lab(1)], true)).unwrap();
    assert!(parsed(&c).get("total").is_none());
    // A count-only answer of a nonzero count: not kept.
    let c = fx.check(200, &page(4, vec![], true)).unwrap();
    assert!(parsed(&c).get("total").is_none());
}

#[test]
fn total_is_kept_where_every_match_of_the_narrowed_search_is_released() {
    let o = |i: usize, p: &str| search_entry(obs(&format!("o{i}"), p), "match");
    // A system token without constraints: every match is released.
    let fx = Fixture::system("system/Observation.rs", "/Observation?code=a");
    let c = fx
        .check(
            200,
            &page(40, vec![o(1, "Patient/p1"), o(2, "Patient/p2")], false),
        )
        .unwrap();
    assert_eq!(parsed(&c)["total"], 40);
    // The same with a constraint: the upstream may count records the proxy drops.
    let fx = Fixture::system(
        "system/Observation.rs?category=laboratory",
        "/Observation?code=a",
    );
    let c = fx.check(200, &page(40, vec![], false)).unwrap();
    assert!(parsed(&c).get("total").is_none());
    // A practitioner's `user/` token reaches every Medication (non-patient data).
    let fx = Fixture::new(
        "user/Medication.rs",
        None,
        Some("Practitioner/dr1"),
        "/Medication?code=x",
    );
    let med = json!({"resourceType": "Medication", "id": "m1"});
    let c = fx
        .check(200, &page(12, vec![search_entry(med, "match")], false))
        .unwrap();
    assert_eq!(parsed(&c)["total"], 12);
    // An unconstrained patient token: the search is narrowed to p1's compartment on a
    // compartment parameter, so every match the upstream counts is p1's.
    let fx = Fixture::patient("patient/Observation.rs", "/Observation?code=a");
    let c = fx
        .check(200, &page(9, vec![o(1, "Patient/p1")], false))
        .unwrap();
    assert_eq!(parsed(&c)["total"], 9);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Paging never reveals a count of hidden records: over every page of a search
    /// whose narrowing the check may not agree with (a constrained scope, the upstream
    /// matching records outside the constraint), any `total` handed out equals the
    /// number of matches the client can see in all.
    #[test]
    fn paging_never_reveals_a_count_of_hidden_records(
        records in prop::collection::vec(
            (prop::bool::weighted(0.8), prop::bool::weighted(0.7)), 0..30),
        page_size in 1usize..8,
    ) {
        let fx = Fixture::patient(LAB_ONLY, "/Observation?code=a");
        let total = records.len();
        let pages: Vec<&[(bool, bool)]> =
            if records.is_empty() { vec![&[][..]] } else { records.chunks(page_size).collect() };
        let visible = records.iter().filter(|(mine, lab)| *mine && *lab).count();
        let mut offset = 0;
        for (n, chunk) in pages.iter().enumerate() {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, (mine, lab))| {
                    let p = if *mine { "Patient/p1" } else { "Patient/p2" };
                    let category = if *lab { "laboratory" } else { "vital-signs" };
                    search_entry(obs_in(&format!("o{}", offset + i), p, category), "match")
                })
                .collect();
            offset += chunk.len();
            let c = fx.check(200, &page(total, entries, n + 1 == pages.len())).unwrap();
            if let Some(t) = parsed(&c).get("total") {
                prop_assert_eq!(t.as_u64(), Some(visible as u64), "page {} of {:?}", n, records);
            }
        }
    }
}

/// The direct check of one record: may `scopes` (for patient p1, or as `user`) read
/// `resource` on its own (`GET /{type}/{id}` answered with it)? Refused by the scope or
/// record stage, or hidden by the answer check: no.
fn directly_readable(scopes: &str, user: Option<&str>, resource: &serde_json::Value) -> bool {
    let token = VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: None,
        client_id: None,
        scopes: parse_scopes(scopes),
        patient: user.is_none().then(|| ResourceId::parse("p1").unwrap()),
        fhir_user: user.map(|u| FhirUser::parse(u).unwrap()),
        expires_at: u64::MAX,
    };
    let path = format!(
        "/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let Ok(request) = parse_request(&Method::GET, &path, None, None) else {
        return false;
    };
    let context = TokenContext {
        has_patient: token.patient.is_some(),
    };
    let Ok(grant) = check_scopes(&token.scopes, &request, context) else {
        return false;
    };
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let Ok(permit) = authorize(&checker, &request, &token, &grant) else {
        return false;
    };
    let fx = Fixture {
        request,
        token,
        grant,
        permit,
    };
    fx.check(200, &resource.to_string()).is_ok()
}

mod never_releases_more {
    use super::*;

    /// A record a search could return: Observations and MedicationRequests of p1 or
    /// p2 (by subject or performer), the Patients, a Practitioner, a Medication.
    fn record() -> impl Strategy<Value = serde_json::Value> {
        let who = prop::sample::select(vec![
            "Patient/p1",
            "Patient/p2",
            "Patient/p10",
            "Practitioner/dr1",
        ]);
        (0usize..6, who, 0u32..1000).prop_map(|(kind, who, n)| match kind {
            0 => json!({"resourceType": "Observation", "id": format!("o{n}"), "subject": {"reference": who}}),
            1 => json!({"resourceType": "Observation", "id": format!("o{n}"), "performer": [{"reference": who}]}),
            2 => json!({"resourceType": "MedicationRequest", "id": format!("mr{n}"),
                        "subject": {"reference": who}, "medicationReference": {"reference": "Medication/m1"}}),
            3 => json!({"resourceType": "Patient", "id": if n % 2 == 0 { "p1" } else { "p2" }}),
            4 => json!({"resourceType": "Practitioner", "id": "dr1"}),
            _ => json!({"resourceType": "Medication", "id": "m1"}),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The answer check never releases an entry a direct check would deny: every
        /// entry kept in a filtered Bundle is readable on its own by the same token, or
        /// is non-patient data that a kept record references (the one thing a
        /// `patient/` token sees only next to its own records).
        #[test]
        fn the_answer_check_never_releases_what_a_direct_check_denies(
            records in prop::collection::vec((record(), any::<bool>()), 0..10),
            user in any::<bool>(),
        ) {
            let scopes = if user {
                "user/Observation.rs user/MedicationRequest.rs user/Patient.rs user/Practitioner.rs user/Medication.rs"
            } else {
                "patient/Observation.rs patient/MedicationRequest.rs patient/Patient.rs patient/Practitioner.rs patient/Medication.rs"
            };
            let practitioner = user.then_some("Practitioner/dr1");
            let fx = Fixture::new(scopes, (!user).then_some("p1"), practitioner, "/Observation?code=a");
            let entries = records
                .iter()
                .map(|(r, include)| {
                    let mode = if *include || r["resourceType"] != "Observation" { "include" } else { "match" };
                    search_entry(r.clone(), mode)
                })
                .collect();
            let c = fx.check(200, &bundle(entries)).unwrap();
            let out = parsed(&c);
            let kept: Vec<&serde_json::Value> = out["entry"]
                .as_array()
                .map(|es| es.iter().map(|e| &e["resource"]).collect())
                .unwrap_or_default();
            let text = serde_json::to_string(&kept).unwrap();
            for r in &kept {
                let t = r["resourceType"].as_str().unwrap();
                let id = r["id"].as_str().unwrap();
                let referenced = INDEX.is_non_patient_data(ResourceType::parse(t).unwrap())
                    && text.contains(&format!("\"{t}/{id}\""));
                prop_assert!(
                    directly_readable(scopes, practitioner, r) || referenced,
                    "{t}/{id} released but not readable on its own: {}", out
                );
            }
        }
    }
}
