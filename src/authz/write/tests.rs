#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use http::Method;
use serde_json::json;

use super::*;
use crate::authz::fga::PatientList;
use crate::fhir::{CompartmentIndex, parse_request};
use crate::smart::parse_scopes;
use crate::token::FhirUser;

const PUBLIC: &str = "https://proxy.example/t1";
const UPSTREAM: &str = "http://127.0.0.1:8081/fhir";

static INDEX: LazyLock<Arc<CompartmentIndex>> =
    LazyLock::new(|| Arc::new(CompartmentIndex::official().unwrap()));

fn checker() -> Checker {
    Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND)
}

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

fn token(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: Some("alice".to_owned()),
        client_id: Some("app".to_owned()),
        scopes: parse_scopes(scopes),
        patient: patient.map(|p| ResourceId::parse(p).unwrap()),
        fhir_user: fhir_user.map(|u| FhirUser::parse(u).unwrap()),
        expires_at: u64::MAX,
    }
}

fn patient_token(scopes: &str) -> VerifiedToken {
    token(scopes, Some("p1"), Some("Patient/p1"))
}

fn practitioner_token(scopes: &str) -> VerifiedToken {
    token(scopes, None, Some("Practitioner/pr1"))
}

fn system_token(scopes: &str) -> VerifiedToken {
    token(scopes, None, None)
}

fn request(method: Method, path: &str, query: Option<&str>) -> FhirRequest {
    parse_request(&method, path, query, None).unwrap()
}

/// The grant and permit stages 2 and 3 give `token` for `req`.
fn passed(checker: &Checker, token: &VerifiedToken, req: &FhirRequest) -> (ScopeGrant, Permit) {
    let grant = check_scopes(
        &token.scopes,
        req,
        TokenContext {
            has_patient: token.patient.is_some(),
        },
    )
    .unwrap();
    let permit = authorize_as(checker, req, token, &grant, token.fhir_user.clone()).unwrap();
    (grant, permit)
}

fn permit_for(token: &VerifiedToken, method: Method, path: &str) -> Permit {
    passed(&checker(), token, &request(method, path, None)).1
}

fn run(
    permit: &Permit,
    fga: Option<&FgaDecisions>,
    rt_name: &str,
    new: Option<&Value>,
    current: Option<&Value>,
) -> Result<ScopeContext, AuthzError> {
    let ctx = WriteCtx {
        permit,
        index: &INDEX,
        bases: [PUBLIC, UPSTREAM],
        fga,
    };
    decide(&ctx, rt(rt_name), new, current)
}

fn obs(subject: &str) -> Value {
    json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": subject},
           "meta": {"versionId": "3"}})
}

// ---------------------------------------------------------------------------------
// the new content
// ---------------------------------------------------------------------------------

#[test]
fn patient_token_creates_only_in_its_own_compartment() {
    let p = permit_for(
        &patient_token("patient/Observation.c"),
        Method::POST,
        "/Observation",
    );
    assert_eq!(
        run(&p, None, "Observation", Some(&obs("Patient/p1")), None).unwrap(),
        ScopeContext::Patient
    );
    // Absolute references under a local base count as local.
    let abs = obs(&format!("{UPSTREAM}/Patient/p1"));
    assert!(run(&p, None, "Observation", Some(&abs), None).is_ok());
    for other in [
        obs("Patient/p2"),
        obs("Patient/p10"),
        // In no compartment at all.
        json!({"resourceType": "Observation", "code": {"text": "x"}}),
        // A foreign base is not this server's patient p1.
        obs("https://elsewhere/fhir/Patient/p1"),
    ] {
        let err = run(&p, None, "Observation", Some(&other), None).unwrap_err();
        assert_eq!(err.reason(), "write_outside_reach", "{other}");
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }
}

#[test]
fn patient_data_may_not_also_land_in_another_patients_compartment() {
    let p = permit_for(
        &patient_token("patient/Observation.c"),
        Method::POST,
        "/Observation",
    );
    let both = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                      "performer": [{"reference": "Patient/p2"}]});
    assert_eq!(
        run(&p, None, "Observation", Some(&both), None)
            .unwrap_err()
            .reason(),
        "write_outside_reach"
    );
}

#[test]
fn conditional_references_are_refused_for_restricted_tokens() {
    let p = permit_for(
        &patient_token("patient/Observation.c"),
        Method::POST,
        "/Observation",
    );
    let smuggled = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                          "performer": [{"reference": "Patient?identifier=x|2"}]});
    assert_eq!(
        run(&p, None, "Observation", Some(&smuggled), None)
            .unwrap_err()
            .reason(),
        "write_conditional_reference"
    );
    let s = permit_for(
        &system_token("system/Observation.c"),
        Method::POST,
        "/Observation",
    );
    assert!(run(&s, None, "Observation", Some(&smuggled), None).is_ok());
}

#[test]
fn references_the_check_cannot_read_are_refused_for_restricted_tokens() {
    let p = permit_for(
        &patient_token("patient/Observation.c"),
        Method::POST,
        "/Observation",
    );
    let with = |r: &str| {
        json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
               "performer": [{"reference": r}]})
    };
    for odd in [
        "Patient/p2/",
        " Patient/p2",
        "patient/p2",
        "Patient/p2/_history/",
        "urn:uuid:0b9f8f4e-1d7c-4f4f-8f69-9d7b6a0f6c55",
        "#",
        "HTTP://127.0.0.1:8081/fhir/Patient/p2/",
    ] {
        assert_eq!(
            run(&p, None, "Observation", Some(&with(odd)), None)
                .unwrap_err()
                .reason(),
            "write_body_invalid",
            "{odd}"
        );
    }
    for fine in [
        "Practitioner/pr1",
        "Patient/p1/_history/2",
        "#contained-1",
        "https://other.example/fhir/Practitioner/x",
    ] {
        assert!(
            run(&p, None, "Observation", Some(&with(fine)), None).is_ok(),
            "{fine}"
        );
    }
    let s = permit_for(
        &system_token("system/Observation.c"),
        Method::POST,
        "/Observation",
    );
    assert!(run(&s, None, "Observation", Some(&with("Patient/p2/")), None).is_ok());
}

#[test]
fn user_token_writes_within_its_user_compartment() {
    let p = permit_for(
        &practitioner_token("user/Observation.cu"),
        Method::POST,
        "/Observation",
    );
    let mine = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"},
                      "performer": [{"reference": "Practitioner/pr1"}]});
    assert_eq!(
        run(&p, None, "Observation", Some(&mine), None).unwrap(),
        ScopeContext::User
    );
    let not_mine = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"},
                          "performer": [{"reference": "Practitioner/pr2"}]});
    assert!(run(&p, None, "Observation", Some(&not_mine), None).is_err());
    // Non-patient data: a user context reaches the whole type, as for reads.
    let p = permit_for(
        &practitioner_token("user/Organization.c"),
        Method::POST,
        "/Organization",
    );
    let org = json!({"resourceType": "Organization", "name": "x"});
    assert!(run(&p, None, "Organization", Some(&org), None).is_ok());
}

#[test]
fn records_in_no_compartment_need_the_whole_type() {
    // A patient token cannot write non-patient data (it reaches it only next to its
    // own records); a system token can.
    let org = json!({"resourceType": "Organization", "name": "x"});
    let p = permit_for(
        &patient_token("patient/Organization.c"),
        Method::POST,
        "/Organization",
    );
    assert!(run(&p, None, "Organization", Some(&org), None).is_err());
    let s = permit_for(
        &system_token("system/Organization.c"),
        Method::POST,
        "/Organization",
    );
    assert_eq!(
        run(&s, None, "Organization", Some(&org), None).unwrap(),
        ScopeContext::System
    );
}

#[test]
fn content_of_another_type_reaches_nothing() {
    let s = permit_for(
        &system_token("system/Observation.c"),
        Method::POST,
        "/Observation",
    );
    let ctx = WriteCtx {
        permit: &s,
        index: &INDEX,
        bases: [PUBLIC, UPSTREAM],
        fga: None,
    };
    assert!(
        ctx.reaching(rt("Observation"), &json!({"resourceType": "Condition"}))
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------
// the current version
// ---------------------------------------------------------------------------------

#[test]
fn an_update_may_not_move_a_record_out_of_reach() {
    let p = permit_for(
        &patient_token("patient/Observation.u"),
        Method::PUT,
        "/Observation/o1",
    );
    let cur = obs("Patient/p1");
    assert!(
        run(
            &p,
            None,
            "Observation",
            Some(&obs("Patient/p1")),
            Some(&cur)
        )
        .is_ok()
    );
    let err = run(
        &p,
        None,
        "Observation",
        Some(&obs("Patient/p2")),
        Some(&cur),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "write_outside_reach");
}

#[test]
fn a_record_out_of_reach_cannot_be_touched_and_looks_hidden() {
    let p = permit_for(
        &patient_token("patient/Observation.ud"),
        Method::PUT,
        "/Observation/o1",
    );
    let theirs = obs("Patient/p2");
    // Even into the caller's own compartment.
    let err = run(
        &p,
        None,
        "Observation",
        Some(&obs("Patient/p1")),
        Some(&theirs),
    )
    .unwrap_err();
    assert!(matches!(err, AuthzError::Hidden { status } if status == StatusCode::NOT_FOUND));
    // Delete: only the current version.
    let err = run(&p, None, "Observation", None, Some(&theirs)).unwrap_err();
    assert_eq!(err.reason(), "record_denied");
    assert!(run(&p, None, "Observation", None, Some(&obs("Patient/p1"))).is_ok());
}

#[test]
fn one_context_must_reach_both_versions() {
    // patient/ reaches p1's records, user/ pr1's: a record of pr1 cannot be turned
    // into one of p1 that pr1 does not perform.
    let t = token(
        "patient/Observation.u user/Observation.u",
        Some("p1"),
        Some("Practitioner/pr1"),
    );
    let p = permit_for(&t, Method::PUT, "/Observation/o1");
    let cur = json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p5"},
                     "performer": [{"reference": "Practitioner/pr1"}]});
    let new = obs("Patient/p1");
    assert!(run(&p, None, "Observation", Some(&new), Some(&cur)).is_err());
    assert_eq!(
        run(&p, None, "Observation", Some(&cur), Some(&cur)).unwrap(),
        ScopeContext::User
    );
}

// ---------------------------------------------------------------------------------
// OpenFGA
// ---------------------------------------------------------------------------------

fn fga_decisions(principal: &str, writable: &[&str]) -> FgaDecisions {
    FgaDecisions {
        policy: MultiPatientPolicy::AllOf,
        by_principal: vec![(
            Arc::from(principal),
            Arc::new(PatientList::new(
                writable.iter().map(|s| (*s).to_owned()).collect(),
            )),
        )],
    }
}

fn fga_permit(scopes: &str) -> Permit {
    let t = token(scopes, None, None);
    let contexts: Vec<ScopeContext> = t
        .scopes
        .resource_scopes()
        .iter()
        .map(|s| s.context)
        .collect();
    Permit {
        reaches: contexts
            .into_iter()
            .map(|c| (c, Reach::in_mode(c, &t, None, true)))
            .collect(),
        denied_status: StatusCode::NOT_FOUND,
        token: TokenContext::default(),
        public_types: Arc::from([]),
        user: None,
        fga: true,
    }
}

#[test]
fn openfga_principals_need_can_write_on_every_patient() {
    let p = fga_permit("user/Observation.cu");
    let d = fga_decisions("user:alice", &["p1"]);
    assert!(run(&p, Some(&d), "Observation", Some(&obs("Patient/p1")), None).is_ok());
    assert!(run(&p, Some(&d), "Observation", Some(&obs("Patient/p2")), None).is_err());
    let both = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                      "performer": [{"reference": "Patient/p2"}]});
    assert!(run(&p, Some(&d), "Observation", Some(&both), None).is_err());
    // No decisions gathered: nothing written.
    assert!(run(&p, None, "Observation", Some(&obs("Patient/p1")), None).is_err());
    // The current version counts too.
    let err = run(
        &p,
        Some(&d),
        "Observation",
        Some(&obs("Patient/p1")),
        Some(&obs("Patient/p2")),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "record_denied");
}

// ---------------------------------------------------------------------------------
// bodies
// ---------------------------------------------------------------------------------

fn body_of(
    method: Method,
    path: &str,
    ct: &str,
    body: &str,
) -> Result<(WriteBody, Option<&'static str>), AuthzError> {
    let req = request(method, path, None);
    parse_body(&req, Some(ct), body.as_bytes())
}

#[test]
fn a_conditional_update_names_its_record_by_criteria_only() {
    let req = request(Method::PUT, "/Observation", Some("identifier=x"));
    let with_id = r#"{"resourceType":"Observation","id":"o2"}"#;
    assert_eq!(
        parse_body(&req, Some("application/fhir+json"), with_id.as_bytes())
            .unwrap_err()
            .reason(),
        "write_body_invalid"
    );
    let without = r#"{"resourceType":"Observation"}"#;
    assert!(parse_body(&req, Some("application/fhir+json"), without.as_bytes()).is_ok());
}

#[test]
fn bodies_must_be_what_the_path_says() {
    let ok = r#"{"resourceType":"Observation","id":"o1"}"#;
    assert!(matches!(
        body_of(
            Method::PUT,
            "/Observation/o1",
            "application/fhir+json; charset=utf-8",
            ok
        ),
        Ok((WriteBody::Resource(_), Some(FHIR_JSON)))
    ));
    for (method, path, ct, body, reason) in [
        (
            Method::POST,
            "/Observation",
            "application/fhir+xml",
            ok,
            "write_media_type",
        ),
        (
            Method::POST,
            "/Observation",
            "text/plain",
            ok,
            "write_media_type",
        ),
        (
            Method::POST,
            "/Condition",
            "application/fhir+json",
            ok,
            "write_body_invalid",
        ),
        (
            Method::PUT,
            "/Observation/o2",
            "application/fhir+json",
            ok,
            "write_body_invalid",
        ),
        (
            Method::PUT,
            "/Observation/o1",
            "application/fhir+json",
            r#"{"resourceType":"Observation"}"#,
            "write_body_invalid",
        ),
        (
            Method::POST,
            "/Observation",
            "application/fhir+json",
            "{",
            "write_body_invalid",
        ),
        (
            Method::POST,
            "/Observation",
            "application/fhir+json",
            r#"{"resourceType":"Observation","subject":{"reference":"Patient/p2"},"subject":{"reference":"Patient/p1"}}"#,
            "write_body_invalid",
        ),
        (
            Method::POST,
            "/Observation",
            "application/json",
            r#"{"resourceType":"Observation","a":[{"x":1,"x":2}]}"#,
            "write_body_invalid",
        ),
        (
            Method::PATCH,
            "/Observation/o1",
            "application/json-patch+json",
            r#"{"op":"add"}"#,
            "write_body_invalid",
        ),
        (
            Method::PATCH,
            "/Observation/o1",
            "application/fhir+json",
            ok,
            "write_body_invalid",
        ),
        (
            Method::PATCH,
            "/Observation/o1",
            "application/xml-patch+xml",
            "<x/>",
            "write_media_type",
        ),
    ] {
        let err = body_of(method.clone(), path, ct, body).unwrap_err();
        assert_eq!(err.reason(), reason, "{method} {path} {ct} {body}");
    }
    assert!(matches!(
        body_of(
            Method::PATCH,
            "/Observation/o1",
            "application/json-patch+json",
            "[]"
        ),
        Ok((WriteBody::JsonPatch(_), Some(JSON_PATCH)))
    ));
    assert!(matches!(
        body_of(
            Method::PATCH,
            "/Observation/o1",
            "application/fhir+json",
            r#"{"resourceType":"Parameters"}"#
        ),
        Ok((WriteBody::FhirPathPatch(_), Some(FHIR_JSON)))
    ));
    assert!(matches!(
        body_of(Method::DELETE, "/Observation/o1", "", ""),
        Ok((WriteBody::None, None))
    ));
}

// ---------------------------------------------------------------------------------
// patches
// ---------------------------------------------------------------------------------

#[test]
fn json_patch_result_is_checked_like_an_update() {
    let p = permit_for(
        &patient_token("patient/Observation.u"),
        Method::PATCH,
        "/Observation/o1",
    );
    let id = ResourceId::parse("o1").unwrap();
    let cur = obs("Patient/p1");
    let harmless = json!([{"op": "add", "path": "/status", "value": "final"}]);
    let new = apply_json_patch(rt("Observation"), &id, &cur, &harmless).unwrap();
    assert_eq!(new["status"], "final");
    assert!(run(&p, None, "Observation", Some(&new), Some(&cur)).is_ok());
    let moving = json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]);
    let new = apply_json_patch(rt("Observation"), &id, &cur, &moving).unwrap();
    assert_eq!(
        run(&p, None, "Observation", Some(&new), Some(&cur))
            .unwrap_err()
            .reason(),
        "write_outside_reach"
    );
    // The record stays the same record.
    let renaming = json!([{"op": "replace", "path": "/id", "value": "o2"}]);
    assert_eq!(
        apply_json_patch(rt("Observation"), &id, &cur, &renaming)
            .unwrap_err()
            .reason(),
        "write_body_invalid"
    );
    let failing = json!([{"op": "test", "path": "/status", "value": "final"}]);
    let err = apply_json_patch(rt("Observation"), &id, &cur, &failing).unwrap_err();
    assert_eq!(err.reason(), "patch_not_applicable");
    assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

fn fhirpath_patch(ops: &[(&str, &str, Option<&str>)]) -> Value {
    let parameter: Vec<Value> = ops
        .iter()
        .map(|(kind, path, name)| {
            let mut part = vec![
                json!({"name": "type", "valueCode": kind}),
                json!({"name": "path", "valueString": path}),
            ];
            if let Some(n) = name {
                part.push(json!({"name": "name", "valueString": n}));
            }
            json!({"name": "operation", "part": part})
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

#[test]
fn fhirpath_patch_may_not_touch_compartment_links() {
    let p = permit_for(
        &patient_token("patient/Observation.u"),
        Method::PATCH,
        "/Observation/o1",
    );
    let check = |patch: &Value| check_fhirpath_patch(&p, &INDEX, rt("Observation"), patch);
    assert!(check(&fhirpath_patch(&[("replace", "Observation.status", None)])).is_ok());
    assert!(
        check(&fhirpath_patch(&[(
            "replace",
            "Observation.code.coding[0].code",
            None
        )]))
        .is_ok()
    );
    for (patch, reason) in [
        (
            fhirpath_patch(&[("replace", "Observation.subject", None)]),
            "patch_compartment_element",
        ),
        (
            fhirpath_patch(&[("add", "Observation", Some("performer"))]),
            "patch_compartment_element",
        ),
        (
            fhirpath_patch(&[("replace", "Observation.id", None)]),
            "patch_compartment_element",
        ),
        (
            fhirpath_patch(&[("delete", "Observation.where(true).subject", None)]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[("delete", "Condition.subject", None)]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[("delete", "%resource.subject", None)]),
            "patch_not_checkable",
        ),
        // Paths whose first name is harmless but which reach other elements.
        (
            fhirpath_patch(&[(
                "add",
                "Observation.status.where(false) | Observation",
                Some("performer"),
            )]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[("delete", "Observation.status | Observation.subject", None)]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[(
                "delete",
                "Observation.status.select(%resource).subject",
                None,
            )]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[("replace", "Observation.code.coding[x]", None)]),
            "patch_not_checkable",
        ),
        (
            fhirpath_patch(&[("replace", "Observation.code..coding", None)]),
            "patch_not_checkable",
        ),
    ] {
        assert_eq!(check(&patch).unwrap_err().reason(), reason, "{patch}");
    }
    // A part given twice could be read either way: refused.
    let mut twice = fhirpath_patch(&[("replace", "Observation.status", None)]);
    twice["parameter"][0]["part"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "path", "valueString": "Observation.subject"}));
    assert_eq!(check(&twice).unwrap_err().reason(), "patch_not_checkable");
    let mut two_values = fhirpath_patch(&[("replace", "Observation.status", None)]);
    two_values["parameter"][0]["part"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "value", "valueCode": "final", "valueReference": {"reference": "Patient/p2"}}));
    assert_eq!(
        check(&two_values).unwrap_err().reason(),
        "patch_not_checkable"
    );
    // A context that reaches the whole type may patch anything checkable.
    let s = permit_for(
        &system_token("system/Observation.u"),
        Method::PATCH,
        "/Observation/o1",
    );
    assert!(
        check_fhirpath_patch(
            &s,
            &INDEX,
            rt("Observation"),
            &fhirpath_patch(&[("replace", "Observation.subject", None)])
        )
        .is_ok()
    );
}

// ---------------------------------------------------------------------------------
// If-Match, Prefer, read-back
// ---------------------------------------------------------------------------------

#[test]
fn the_write_is_pinned_to_the_checked_version() {
    let hv = |s: &str| HeaderValue::from_str(s).unwrap();
    assert_eq!(pin_version(None, Some("3")).unwrap(), Some(hv("W/\"3\"")));
    assert_eq!(
        pin_version(Some(&hv("W/\"3\"")), Some("3")).unwrap(),
        Some(hv("W/\"3\""))
    );
    // An older version: the upstream's 412 to give.
    assert_eq!(
        pin_version(Some(&hv("\"2\"")), Some("3")).unwrap(),
        Some(hv("\"2\""))
    );
    // A later one was never checked.
    for v in ["W/\"4\"", "W/\"x\"", "*", "3"] {
        assert_eq!(
            pin_version(Some(&hv(v)), Some("3")).unwrap_err().reason(),
            "write_version_unchecked",
            "{v}"
        );
    }
    assert_eq!(pin_version(None, None).unwrap(), None);
    assert_eq!(
        pin_version(Some(&hv("W/\"9\"")), None).unwrap(),
        Some(hv("W/\"9\""))
    );
}

#[test]
fn return_preference_is_read_from_prefer() {
    let pref = |values: &[&str]| {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("prefer", HeaderValue::from_str(v).unwrap());
        }
        ReturnPref::of(&h)
    };
    assert_eq!(pref(&[]), ReturnPref::Default);
    assert_eq!(pref(&["return=minimal"]), ReturnPref::Minimal);
    assert_eq!(
        pref(&["handling=lenient, return=OperationOutcome"]),
        ReturnPref::OperationOutcome
    );
    assert_eq!(
        pref(&["respond-async", "return=representation"]),
        ReturnPref::Representation
    );
    assert_eq!(pref(&["return=bogus"]), ReturnPref::Default);
}

#[test]
fn write_does_not_imply_read() {
    let c = checker();
    let t = patient_token("patient/Observation.c");
    let p = permit_for(&t, Method::POST, "/Observation");
    assert!(read_back(&c, rt("Observation"), &t, &p).is_none());
    let t = patient_token("patient/Observation.cr");
    let p = permit_for(&t, Method::POST, "/Observation");
    let back = read_back(&c, rt("Observation"), &t, &p).unwrap();
    assert_eq!(back.grant.required(), crate::smart::Permissions::READ);
    // v1 `write` is c, u and d: no read either.
    let t = patient_token("patient/Observation.write");
    let p = permit_for(&t, Method::POST, "/Observation");
    assert!(read_back(&c, rt("Observation"), &t, &p).is_none());
}

// ---------------------------------------------------------------------------------
// conditional criteria (stage 4's narrowing, which stage 4 applies to writes)
// ---------------------------------------------------------------------------------

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn conditional_criteria_are_narrowed_like_a_search() {
    let c = checker();
    let t = patient_token("patient/Observation.u");
    let req = request(Method::PUT, "/Observation", Some("identifier=x"));
    let (grant, permit) = passed(&c, &t, &req);
    let narrowed = crate::rewrite::narrow_criteria(
        rt("Observation"),
        &pairs(&[("identifier", "x")]),
        &grant,
        &permit,
        &INDEX,
    )
    .unwrap();
    assert_eq!(
        narrowed,
        pairs(&[("identifier", "x"), ("subject", "Patient/p1")])
    );
    // On the compartment's own type: by id.
    let req = request(Method::PUT, "/Patient", Some("name=x"));
    let t = patient_token("patient/Patient.u");
    let (grant, permit) = passed(&c, &t, &req);
    assert_eq!(
        crate::rewrite::narrow_criteria(rt("Patient"), &req.params, &grant, &permit, &INDEX)
            .unwrap(),
        pairs(&[("name", "x"), ("_id", "p1")])
    );
    // What a search refuses, a conditional write refuses too.
    for bad in [
        pairs(&[("subject:Patient.name", "x")]),
        pairs(&[("_has:Observation:subject:code", "x")]),
        Vec::new(),
    ] {
        assert!(
            crate::rewrite::narrow_criteria(rt("Patient"), &bad, &grant, &permit, &INDEX).is_err(),
            "{bad:?}"
        );
    }
    // Unrestricted: as sent.
    let t = system_token("system/Observation.d");
    let req = request(Method::DELETE, "/Observation", Some("code=x"));
    let (grant, permit) = passed(&c, &t, &req);
    assert_eq!(
        crate::rewrite::narrow_criteria(rt("Observation"), &req.params, &grant, &permit, &INDEX)
            .unwrap(),
        pairs(&[("code", "x")])
    );
}

#[test]
fn openfga_principals_cannot_use_conditional_writes() {
    let t = system_token("user/Observation.u");
    let req = request(Method::PUT, "/Observation", Some("identifier=x"));
    let grant = check_scopes(&t.scopes, &req, TokenContext::default()).unwrap();
    let permit = fga_permit("user/Observation.u");
    let err =
        crate::rewrite::narrow_criteria(rt("Observation"), &req.params, &grant, &permit, &INDEX)
            .unwrap_err();
    assert_eq!(err.reason(), "search_not_narrowable");
}

// ---------------------------------------------------------------------------------
// the forwarded write (stage 4 builds it from the plan)
// ---------------------------------------------------------------------------------

fn plan(read: bool, if_match: Option<&str>, prefer: ReturnPref) -> WritePlan {
    let c = checker();
    let t = patient_token(if read {
        "patient/Observation.cru"
    } else {
        "patient/Observation.cu"
    });
    let p = permit_for(&t, Method::POST, "/Observation");
    WritePlan {
        if_match: if_match.map(|v| HeaderValue::from_str(v).unwrap()),
        content_type: Some(FHIR_JSON),
        body: Some(Bytes::from_static(b"{}")),
        target: None,
        existed: false,
        patients: vec!["p1".to_owned()],
        context: ScopeContext::Patient,
        read_back: read_back(&c, rt("Observation"), &t, &p),
        prefer,
    }
}

fn outbound(
    method: Method,
    path: &str,
    query: Option<&str>,
    plan: &WritePlan,
    headers: &[(&str, &str)],
) -> Result<OutboundRequest, AuthzError> {
    let c = checker();
    let req = request(method, path, query);
    let t = patient_token("patient/Observation.cud");
    let (grant, permit) = passed(&c, &t, &req);
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    crate::rewrite::rewrite_write(&req, &grant, &permit, &INDEX, plan, &h)
}

fn header<'a>(out: &'a OutboundRequest, name: &str) -> Option<&'a str> {
    out.headers
        .iter()
        .find(|(n, _)| n.as_str() == name)
        .and_then(|(_, v)| v.to_str().ok())
}

#[test]
fn the_forwarded_write_carries_what_the_plan_decided() {
    let p = plan(true, Some("W/\"3\""), ReturnPref::Default);
    let out = outbound(Method::PUT, "/Observation/o1", None, &p, &[]).unwrap();
    assert_eq!(
        (out.method.clone(), out.path.as_str()),
        (Method::PUT, "/Observation/o1")
    );
    assert_eq!(header(&out, "if-match"), Some("W/\"3\""));
    assert_eq!(header(&out, "content-type"), Some(FHIR_JSON));
    assert_eq!(header(&out, "prefer"), Some("handling=strict"));
    assert_eq!(out.body.as_deref(), Some(&b"{}"[..]));
    assert!(!out.conditional);
    // Without `r` the upstream is asked for no body; `OperationOutcome` passes.
    let out = outbound(
        Method::POST,
        "/Observation",
        None,
        &plan(false, None, ReturnPref::Representation),
        &[],
    )
    .unwrap();
    assert_eq!(
        header(&out, "prefer"),
        Some("return=minimal, handling=strict")
    );
    assert_eq!(header(&out, "if-match"), None);
    let out = outbound(
        Method::POST,
        "/Observation",
        None,
        &plan(false, None, ReturnPref::OperationOutcome),
        &[],
    )
    .unwrap();
    assert_eq!(
        header(&out, "prefer"),
        Some("return=OperationOutcome, handling=strict")
    );
}

#[test]
fn conditional_criteria_go_upstream_narrowed() {
    let p = plan(false, None, ReturnPref::Default);
    let out = outbound(
        Method::POST,
        "/Observation",
        None,
        &p,
        &[("if-none-exist", "identifier=a|b")],
    )
    .unwrap();
    assert_eq!(
        header(&out, "if-none-exist"),
        Some("identifier=a%7Cb&subject=Patient%2Fp1")
    );
    // `Type?` before the criteria is allowed, another type is not.
    assert!(
        outbound(
            Method::POST,
            "/Observation",
            None,
            &p,
            &[("if-none-exist", "Observation?identifier=a")]
        )
        .is_ok()
    );
    assert_eq!(
        outbound(
            Method::POST,
            "/Observation",
            None,
            &p,
            &[("if-none-exist", "Condition?identifier=a")]
        )
        .unwrap_err()
        .reason(),
        "write_body_invalid"
    );
    let out = outbound(Method::DELETE, "/Observation", Some("code=x"), &p, &[]).unwrap();
    assert_eq!(out.path, "/Observation");
    assert_eq!(
        out.params,
        pairs(&[("code", "x"), ("subject", "Patient/p1")])
    );
    // A delete by id goes by `_id` and the narrowing (upstreams may ignore `If-Match`
    // on DELETE).
    let out = outbound(Method::DELETE, "/Observation/o1", None, &p, &[]).unwrap();
    assert_eq!(
        out.path_and_query(),
        "/Observation?_id=o1&subject=Patient%2Fp1"
    );
    let out = outbound(Method::PUT, "/Observation", Some("identifier=y"), &p, &[]).unwrap();
    assert_eq!(
        out.path_and_query(),
        "/Observation?identifier=y&subject=Patient%2Fp1"
    );
}

// ---------------------------------------------------------------------------------
// the stage, with a stand-in upstream that holds one record
// ---------------------------------------------------------------------------------

/// Answers every GET with `record` (or 404 when `None`) and records the paths asked.
#[derive(Clone)]
struct OneRecord {
    record: Option<Value>,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

impl FhirServer for OneRecord {
    async fn fetch(
        &self,
        _tenant: &crate::tenant::Tenant,
        out: &OutboundRequest,
        _client_headers: &HeaderMap,
    ) -> Result<crate::upstream::Fetched, UpstreamError> {
        self.asked
            .lock()
            .unwrap()
            .push(format!("{} {}", out.method, out.path_and_query()));
        let (status, body) = match &self.record {
            Some(r) => (StatusCode::OK, r.to_string()),
            None => (StatusCode::NOT_FOUND, String::new()),
        };
        Ok(crate::upstream::Fetched {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body),
        })
    }
}

fn tenant() -> crate::tenant::Tenant {
    let raw: crate::config::RawFile = serde_json::from_value(json!({"tenants": {"t1": {
        "public_base_url": PUBLIC,
        "upstream": {"base_url": UPSTREAM},
        "token": {
            "issuers": ["https://issuer.example"],
            "jwks_uri": "https://issuer.example/jwks",
            "audience": PUBLIC,
        },
        "smart": {
            "authorization_endpoint": "https://issuer.example/auth",
            "token_endpoint": "https://issuer.example/token",
        },
        "authorization": {"mode": "compartment"},
    }}}))
    .unwrap();
    crate::tenant::Tenant {
        config: crate::config::validate(raw).unwrap().remove(0),
        generation: 0,
    }
}

/// Runs the stage on `method path` with `body` for `token`, in front of `record`.
async fn stage(
    token: VerifiedToken,
    method: Method,
    path: &str,
    body: Option<Value>,
    record: Option<Value>,
) -> (Result<Flow, CheckWriteError>, Request<Bytes>, Vec<String>) {
    let checker = Arc::new(checker());
    let fhir = request(method.clone(), path, None);
    let (grant, permit) = passed(&checker, &token, &fhir);
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/t1{path}"))
        .header("content-type", "application/fhir+json")
        .body(body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())))
        .unwrap();
    let x = req.extensions_mut();
    x.insert(crate::tenant::TenantCtx(Arc::new(tenant())));
    x.insert(checker);
    x.insert(fhir);
    x.insert(Arc::new(token));
    x.insert(grant);
    x.insert(permit);
    let upstream = OneRecord {
        record,
        asked: Arc::default(),
    };
    let flow = CheckWrite::new(upstream.clone()).run(&mut req).await;
    let asked = upstream.asked.lock().unwrap().clone();
    (flow, req, asked)
}

#[tokio::test]
async fn the_stage_reads_the_current_version_and_pins_the_write_to_it() {
    let t = patient_token("patient/Observation.u");
    let (flow, req, asked) = stage(
        t,
        Method::PUT,
        "/Observation/o1",
        Some(obs("Patient/p1")),
        Some(obs("Patient/p1")),
    )
    .await;
    assert!(matches!(flow, Ok(Flow::Continue)));
    assert_eq!(asked, vec!["GET /Observation/o1".to_owned()]);
    let plan = req.extensions().get::<WritePlan>().unwrap();
    assert_eq!(plan.if_match, Some(HeaderValue::from_static("W/\"3\"")));
    assert!(plan.existed);
    assert_eq!(plan.patients, vec!["p1".to_owned()]);
    assert_eq!(plan.target.as_deref(), Some("Observation/o1"));
    assert!(plan.read_back.is_none());
}

#[tokio::test]
async fn the_stage_refuses_what_it_cannot_check() {
    // Another patient's current version: hidden.
    let (flow, req, _) = stage(
        patient_token("patient/Observation.u"),
        Method::PUT,
        "/Observation/o1",
        Some(obs("Patient/p1")),
        Some(obs("Patient/p2")),
    )
    .await;
    assert!(matches!(
        flow,
        Err(CheckWriteError::Authz(AuthzError::Hidden { .. }))
    ));
    assert!(req.extensions().get::<WritePlan>().is_none());
    // A current version without a version id cannot be pinned.
    let mut unversioned = obs("Patient/p1");
    unversioned.as_object_mut().unwrap().remove("meta");
    let (flow, _, _) = stage(
        patient_token("patient/Observation.u"),
        Method::PUT,
        "/Observation/o1",
        Some(obs("Patient/p1")),
        Some(unversioned.clone()),
    )
    .await;
    assert!(matches!(
        flow,
        Err(CheckWriteError::Upstream(UpstreamError::BadResponse(
            "meta.versionId"
        )))
    ));
    // ... which a system token does not need.
    let (flow, _, _) = stage(
        system_token("system/Observation.u"),
        Method::PUT,
        "/Observation/o1",
        Some(obs("Patient/p1")),
        Some(unversioned),
    )
    .await;
    assert!(flow.is_ok());
    // A delete of a missing record is a missing record.
    let (flow, _, _) = stage(
        patient_token("patient/Observation.d"),
        Method::DELETE,
        "/Observation/o1",
        None,
        None,
    )
    .await;
    assert!(matches!(
        flow,
        Err(CheckWriteError::Upstream(UpstreamError::NotFound))
    ));
    // An update of a missing id is a create: no If-Match, the new content checked.
    let (flow, req, _) = stage(
        patient_token("patient/Observation.u"),
        Method::PUT,
        "/Observation/o1",
        Some(obs("Patient/p1")),
        None,
    )
    .await;
    assert!(flow.is_ok());
    let plan = req.extensions().get::<WritePlan>().unwrap();
    assert_eq!((plan.if_match.as_ref(), plan.existed), (None, false));
}

#[tokio::test]
async fn reads_pass_the_stage_untouched() {
    let (flow, req, asked) = stage(
        patient_token("patient/Observation.r"),
        Method::GET,
        "/Observation/o1",
        None,
        Some(obs("Patient/p1")),
    )
    .await;
    assert!(matches!(flow, Ok(Flow::Continue)));
    assert!(asked.is_empty());
    assert!(req.extensions().get::<WritePlan>().is_none());
}
