#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, LazyLock};

use http::StatusCode;

use super::*;
use crate::authz::{Checker, authorize};
use crate::fhir::{ResourceId, ResourceType, parse_request};
use crate::scope::{TokenContext, check_scopes};
use crate::smart::{ScopeContext, parse_scopes};
use crate::token::{FhirUser, VerifiedToken};

static INDEX: LazyLock<Arc<CompartmentIndex>> =
    LazyLock::new(|| Arc::new(CompartmentIndex::official().unwrap()));

fn token(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: None,
        client_id: None,
        scopes: parse_scopes(scopes),
        patient: patient.map(|p| ResourceId::parse(p).unwrap()),
        fhir_user: fhir_user.map(|u| FhirUser::parse(u).unwrap()),
        expires_at: u64::MAX,
    }
}

fn patient_token(scopes: &str) -> VerifiedToken {
    token(scopes, Some("p1"), None)
}

fn system_token(scopes: &str) -> VerifiedToken {
    token(scopes, None, None)
}

fn parse(method: Method, target: &str, body: Option<&[u8]>) -> FhirRequest {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    parse_request(&method, path, query, body).unwrap()
}

fn get(target: &str) -> FhirRequest {
    parse(Method::GET, target, None)
}

fn grant_for(t: &VerifiedToken, req: &FhirRequest) -> ScopeGrant {
    check_scopes(
        &t.scopes,
        req,
        TokenContext {
            has_patient: t.patient.is_some(),
        },
    )
    .unwrap()
}

/// Runs the scope and authz stages (which must pass), then the rewrite.
fn rewrite_with_body(
    t: &VerifiedToken,
    req: &FhirRequest,
    body: &[u8],
) -> Result<OutboundRequest, AuthzError> {
    let grant = grant_for(t, req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, req, t, &grant).unwrap();
    rewrite_request(req, &grant, &permit, &INDEX, &Bytes::copy_from_slice(body))
}

fn rewrite(t: &VerifiedToken, req: &FhirRequest) -> Result<OutboundRequest, AuthzError> {
    rewrite_with_body(t, req, b"")
}

/// As [`rewrite`], for an upstream without compartment search.
fn rewrite_by_parameter(t: &VerifiedToken, target: &str) -> Result<OutboundRequest, AuthzError> {
    let req = get(target);
    let grant = grant_for(t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, t, &grant).unwrap();
    rewrite_request_with(
        &req,
        &grant,
        &permit,
        &INDEX,
        &Bytes::new(),
        None,
        CompartmentSearch::ByParameter,
    )
}

fn ok(t: &VerifiedToken, target: &str) -> OutboundRequest {
    rewrite(t, &get(target)).unwrap()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn outbound(path: &str, params: &[(&str, &str)]) -> OutboundRequest {
    OutboundRequest {
        method: Method::GET,
        path: path.to_owned(),
        params: pairs(params),
        body: None,
        conditional: false,
        narrowing: None,
        headers: Vec::new(),
    }
}

/// As [`outbound`], for unrestricted permits (conditional headers may pass).
fn outbound_unrestricted(path: &str, params: &[(&str, &str)]) -> OutboundRequest {
    OutboundRequest {
        conditional: true,
        ..outbound(path, params)
    }
}

// ---------------------------------------------------------------------------------
// Type searches
// ---------------------------------------------------------------------------------

#[test]
fn type_search_for_patient_token_becomes_compartment_search() {
    let t = patient_token("patient/Observation.rs");
    let out = ok(&t, "/Observation?code=1234-5&date=ge2020&code=x");
    assert_eq!(
        out,
        outbound(
            "/Patient/p1/Observation",
            &[("code", "1234-5"), ("date", "ge2020"), ("code", "x")]
        )
    );
}

#[test]
fn without_compartment_search_a_type_search_is_narrowed_by_the_linking_parameter() {
    let t = patient_token("patient/*.rs");
    // Patient compartment: the type's patient parameter (`patient`, else `subject`),
    // appended after the client's, which FHIR ANDs with it.
    assert_eq!(
        rewrite_by_parameter(&t, "/Observation?code=1234-5&subject=Patient/p2").unwrap(),
        outbound(
            "/Observation",
            &[
                ("code", "1234-5"),
                ("subject", "Patient/p2"),
                ("subject", "Patient/p1")
            ]
        )
    );
    assert_eq!(
        rewrite_by_parameter(&t, "/Condition").unwrap(),
        outbound("/Condition", &[("patient", "Patient/p1")])
    );
    // the owner's own type: `_id`, as before
    assert_eq!(
        rewrite_by_parameter(&t, "/Patient?name=x").unwrap(),
        outbound("/Patient", &[("name", "x"), ("_id", "p1")])
    );
    // a compartment search by the client is translated the same way
    assert_eq!(
        rewrite_by_parameter(&t, "/Patient/p1/Observation?category=laboratory").unwrap(),
        outbound(
            "/Observation",
            &[("category", "laboratory"), ("subject", "Patient/p1")]
        )
    );
    assert_eq!(
        rewrite_by_parameter(&t, "/Patient/p1/Patient").unwrap(),
        outbound("/Patient", &[("_id", "p1")])
    );
    // operations and every-type compartment searches are left to the upstream
    assert_eq!(
        rewrite_by_parameter(&t, "/Patient/p1/$everything")
            .unwrap()
            .path,
        "/Patient/p1/$everything"
    );
    // other compartments: the first linking parameter of the definition
    let pr = token("user/*.rs", None, Some("Practitioner/pr1"));
    assert_eq!(
        rewrite_by_parameter(&pr, "/Observation?status=final").unwrap(),
        outbound(
            "/Observation",
            &[("status", "final"), ("performer", "Practitioner/pr1")]
        )
    );
    assert_eq!(
        rewrite_by_parameter(&pr, "/Patient").unwrap(),
        outbound("/Patient", &[("general-practitioner", "Practitioner/pr1")])
    );
}

#[test]
fn without_compartment_search_a_type_the_compartment_does_not_link_is_refused() {
    let t = system_token("system/*.rs");
    let e = rewrite_by_parameter(&t, "/Patient/p1/Medication").unwrap_err();
    assert!(
        matches!(e, AuthzError::OutsideCompartment { resource_type } if resource_type.as_str() == "Medication"),
        "{e:?}"
    );
    // the same search where the upstream has compartment search: forwarded as it is
    let req = get("/Patient/p1/Medication");
    assert_eq!(rewrite(&t, &req).unwrap().path, "/Patient/p1/Medication");
}

#[test]
fn type_search_client_cannot_redirect_compartment_with_params() {
    // Client parameters that name another patient are kept: FHIR ANDs them with the
    // compartment, so they can only narrow.
    let t = patient_token("patient/Observation.rs");
    let out = ok(&t, "/Observation?subject=Patient/p2&patient=p2");
    assert_eq!(out.path, "/Patient/p1/Observation");
    assert_eq!(
        out.params,
        pairs(&[("subject", "Patient/p2"), ("patient", "p2")])
    );
}

#[test]
fn patient_search_gets_id_of_the_token_patient() {
    let t = patient_token("patient/Patient.rs");
    assert_eq!(ok(&t, "/Patient"), outbound("/Patient", &[("_id", "p1")]));
    assert_eq!(
        ok(&t, "/Patient?name=smith"),
        outbound("/Patient", &[("name", "smith"), ("_id", "p1")])
    );
}

#[test]
fn patient_search_keeps_client_id_and_adds_own() {
    // `_id=p2&_id=p1` is an AND: the upstream finds nothing, never p2.
    let t = patient_token("patient/Patient.rs");
    assert_eq!(
        ok(&t, "/Patient?_id=p2"),
        outbound("/Patient", &[("_id", "p2"), ("_id", "p1")])
    );
}

#[test]
fn format_is_dropped() {
    let t = patient_token("patient/Observation.rs");
    let out = ok(
        &t,
        "/Observation?_format=xml&code=a&_format=application/fhir%2Bxml",
    );
    assert_eq!(out.params, pairs(&[("code", "a")]));
    let out = ok(&t, "/Observation/o1?_format=xml");
    assert!(out.params.is_empty());
}

#[test]
fn unrestricted_type_search_keeps_the_type_path() {
    let t = system_token("system/Observation.rs");
    assert_eq!(
        ok(&t, "/Observation?code=a"),
        outbound_unrestricted("/Observation", &[("code", "a")])
    );
    let t = system_token("system/Patient.rs");
    assert_eq!(ok(&t, "/Patient"), outbound_unrestricted("/Patient", &[]));
}

#[test]
fn union_with_system_context_is_unrestricted() {
    let t = token(
        "patient/Observation.rs system/Observation.rs",
        Some("p1"),
        None,
    );
    assert_eq!(
        ok(&t, "/Observation"),
        outbound_unrestricted("/Observation", &[])
    );
}

#[test]
fn user_practitioner_type_search() {
    let t = token("user/*.rs", None, Some("Practitioner/pr1"));
    assert_eq!(
        ok(&t, "/Observation?status=final"),
        outbound("/Practitioner/pr1/Observation", &[("status", "final")])
    );
    // Practitioners are not patient data: a user token searches them wholesale.
    assert_eq!(ok(&t, "/Practitioner"), outbound("/Practitioner", &[]));
    assert_eq!(
        ok(&t, "/Patient"),
        outbound("/Practitioner/pr1/Patient", &[])
    );
}

#[test]
fn same_compartment_from_two_contexts_is_one() {
    let t = token(
        "patient/Observation.rs user/Observation.rs",
        Some("p1"),
        Some("Patient/p1"),
    );
    assert_eq!(
        ok(&t, "/Observation"),
        outbound("/Patient/p1/Observation", &[])
    );
}

#[test]
fn two_different_compartments_are_not_narrowable() {
    let t = token(
        "patient/Observation.rs user/Observation.rs",
        Some("p1"),
        Some("Practitioner/pr1"),
    );
    let err = rewrite(&t, &get("/Observation")).unwrap_err();
    assert!(
        matches!(
            err,
            AuthzError::NotNarrowable {
                interaction: "search-type"
            }
        ),
        "{err:?}"
    );
}

#[test]
fn type_outside_compartment_is_refused_by_rewrite_too() {
    // Authz refuses this first; the rewrite does not rely on it.
    let t = patient_token("patient/Medication.rs");
    let req = get("/Medication");
    let grant = grant_for(&t, &req);
    let permit = Permit {
        fga: false,
        public_types: std::sync::Arc::from([]),
        user: None,
        reaches: vec![(
            ScopeContext::Patient,
            crate::authz::Reach::Compartment(crate::fhir::CompartmentRef {
                owner: ResourceType::PATIENT,
                id: ResourceId::parse("p1").unwrap(),
            }),
        )],
        denied_status: StatusCode::NOT_FOUND,
        token: TokenContext { has_patient: true },
    };
    let err = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap_err();
    assert!(
        matches!(err, AuthzError::OutsideCompartment { resource_type } if resource_type.as_str() == "Medication")
    );
}

#[test]
fn type_search_without_resource_type_is_not_narrowable() {
    let t = system_token("system/Observation.rs");
    let mut req = get("/Observation");
    let grant = grant_for(&t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, &t, &grant).unwrap();
    req.resource_type = None;
    let err = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap_err();
    assert!(matches!(err, AuthzError::NotNarrowable { .. }));
}

#[test]
fn post_search_becomes_get_with_query() {
    let t = patient_token("patient/Observation.rs");
    let req = parse(
        Method::POST,
        "/Observation/_search?status=final",
        Some(b"code=a&date=ge2020"),
    );
    let out = rewrite_with_body(&t, &req, b"code=a&date=ge2020").unwrap();
    assert_eq!(
        out,
        outbound(
            "/Patient/p1/Observation",
            &[("status", "final"), ("code", "a"), ("date", "ge2020")]
        )
    );
}

// ---------------------------------------------------------------------------------
// Scope constraints
// ---------------------------------------------------------------------------------

#[test]
fn constraint_is_appended() {
    let t = patient_token("patient/Observation.rs?category=laboratory");
    assert_eq!(
        ok(&t, "/Observation?code=a"),
        outbound(
            "/Patient/p1/Observation",
            &[("code", "a"), ("category", "laboratory")]
        )
    );
}

#[test]
fn constraint_conjunction_appends_every_pair() {
    let t = system_token("system/Observation.rs?category=laboratory&status=final");
    assert_eq!(
        ok(&t, "/Observation"),
        outbound_unrestricted(
            "/Observation",
            &[("category", "laboratory"), ("status", "final")]
        )
    );
}

#[test]
fn constraint_is_added_even_when_client_sends_the_same_param() {
    let t = patient_token("patient/Observation.rs?category=laboratory");
    let out = ok(&t, "/Observation?category=vital-signs");
    assert_eq!(
        out.params,
        pairs(&[("category", "vital-signs"), ("category", "laboratory")])
    );
}

#[test]
fn unconstrained_scope_absorbs_constrained_one() {
    let t = patient_token("patient/Observation.rs?category=laboratory patient/Observation.rs");
    assert_eq!(
        ok(&t, "/Observation"),
        outbound("/Patient/p1/Observation", &[])
    );
}

#[test]
fn single_pair_constraints_on_one_param_are_comma_joined() {
    let t = patient_token(
        "patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs",
    );
    assert_eq!(
        ok(&t, "/Observation"),
        outbound(
            "/Patient/p1/Observation",
            &[("category", "laboratory,vital-signs")]
        )
    );
}

#[test]
fn comma_joined_values_keep_their_fhir_or_meaning() {
    // Each scope's value is FHIR search syntax: `a,b` already means "a or b", so the
    // union of the three scopes is `a,b,c\d,e`, joined without re-escaping.
    let t = system_token(
        "system/Observation.rs?code=a%2Cb system/Observation.rs?code=c%5Cd system/Observation.rs?code=e",
    );
    let out = ok(&t, "/Observation");
    assert_eq!(out.params, pairs(&[("code", r"a,b,c\d,e")]));
}

#[test]
fn constraints_on_different_params_are_not_narrowable() {
    let t = patient_token(
        "patient/Observation.rs?category=laboratory patient/Observation.rs?status=final",
    );
    let err = rewrite(&t, &get("/Observation")).unwrap_err();
    assert!(
        matches!(&err, AuthzError::ConstraintNotNarrowable { resource_type } if resource_type == "Observation"),
        "{err:?}"
    );
    assert_eq!(err.reason(), "scope_constraint_not_narrowable");
}

#[test]
fn several_multi_pair_conjunctions_are_not_narrowable() {
    let t = patient_token(
        "patient/Observation.rs?category=laboratory&status=final patient/Observation.rs?category=vital-signs",
    );
    assert!(matches!(
        rewrite(&t, &get("/Observation")),
        Err(AuthzError::ConstraintNotNarrowable { .. })
    ));
}

#[test]
fn two_contexts_with_different_constraints_are_not_narrowable() {
    let t = token(
        "patient/Observation.rs?category=laboratory system/Observation.rs?category=vital-signs",
        Some("p1"),
        None,
    );
    assert!(matches!(
        rewrite(&t, &get("/Observation")),
        Err(AuthzError::ConstraintNotNarrowable { .. })
    ));
}

#[test]
fn two_contexts_constrained_and_unconstrained_are_not_narrowable() {
    // The unconstrained context would allow more, but one query cannot carry both.
    let t = token(
        "patient/Observation.rs?category=laboratory system/Observation.rs",
        Some("p1"),
        None,
    );
    assert!(matches!(
        rewrite(&t, &get("/Observation")),
        Err(AuthzError::ConstraintNotNarrowable { .. })
    ));
}

#[test]
fn two_contexts_with_equal_constraints_add_it_once() {
    let t = token(
        "patient/Observation.rs?category=laboratory system/Observation.rs?category=laboratory",
        Some("p1"),
        None,
    );
    assert_eq!(
        ok(&t, "/Observation"),
        outbound_unrestricted("/Observation", &[("category", "laboratory")])
    );
}

// ---------------------------------------------------------------------------------
// History and system-level interactions
// ---------------------------------------------------------------------------------

#[test]
fn history_type_restricted_is_not_narrowable() {
    let t = patient_token("patient/Observation.rs");
    let err = rewrite(&t, &get("/Observation/_history")).unwrap_err();
    assert!(matches!(
        err,
        AuthzError::NotNarrowable {
            interaction: "history-type"
        }
    ));
}

#[test]
fn history_type_and_system_unrestricted() {
    let t = system_token("system/*.rs");
    assert_eq!(
        ok(&t, "/Observation/_history?_since=2020-01-01"),
        outbound_unrestricted("/Observation/_history", &[("_since", "2020-01-01")])
    );
    assert_eq!(ok(&t, "/_history"), outbound_unrestricted("/_history", &[]));
}

#[test]
fn history_system_restricted_is_not_narrowable_here_too() {
    let t = patient_token("patient/*.rs");
    let req = get("/_history");
    let grant = grant_for(&t, &req);
    let permit = Permit {
        fga: false,
        public_types: std::sync::Arc::from([]),
        user: None,
        reaches: vec![(ScopeContext::Patient, crate::authz::Reach::Nothing)],
        denied_status: StatusCode::NOT_FOUND,
        token: TokenContext { has_patient: true },
    };
    assert!(matches!(
        rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()),
        Err(AuthzError::NotNarrowable { .. })
    ));
}

#[test]
fn system_search_unrestricted_has_empty_path() {
    let t = system_token("system/*.rs");
    let out = ok(&t, "/?_type=Observation,Patient");
    assert_eq!(
        out,
        outbound_unrestricted("", &[("_type", "Observation,Patient")])
    );
    assert_eq!(out.path_and_query(), "?_type=Observation%2CPatient");
}

#[test]
fn system_search_restricted_is_not_narrowable() {
    let t = patient_token("patient/*.rs");
    let req = get("/?_type=Observation");
    let grant = grant_for(&t, &req);
    let permit = Permit {
        fga: false,
        public_types: std::sync::Arc::from([]),
        user: None,
        reaches: vec![(
            ScopeContext::Patient,
            crate::authz::Reach::Compartment(crate::fhir::CompartmentRef {
                owner: ResourceType::PATIENT,
                id: ResourceId::parse("p1").unwrap(),
            }),
        )],
        denied_status: StatusCode::NOT_FOUND,
        token: TokenContext { has_patient: true },
    };
    assert!(matches!(
        rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()),
        Err(AuthzError::NotNarrowable {
            interaction: "search-system"
        })
    ));
}

// ---------------------------------------------------------------------------------
// Compartment searches
// ---------------------------------------------------------------------------------

#[test]
fn compartment_search_path() {
    let t = patient_token("patient/Observation.rs");
    assert_eq!(
        ok(&t, "/Patient/p1/Observation?code=a&_format=json"),
        outbound("/Patient/p1/Observation", &[("code", "a")])
    );
}

#[test]
fn compartment_search_star() {
    let t = patient_token("patient/*.rs");
    assert_eq!(
        ok(&t, "/Patient/p1/*?_lastUpdated=gt2020"),
        outbound("/Patient/p1/*", &[("_lastUpdated", "gt2020")])
    );
}

#[test]
fn compartment_search_with_constraint() {
    let t = patient_token("patient/Observation.rs?category=laboratory");
    assert_eq!(
        ok(&t, "/Patient/p1/Observation"),
        outbound("/Patient/p1/Observation", &[("category", "laboratory")])
    );
}

#[test]
fn compartment_search_by_system_token_keeps_path() {
    let t = system_token("system/Observation.rs");
    assert_eq!(
        ok(&t, "/Encounter/e1/Observation"),
        outbound_unrestricted("/Encounter/e1/Observation", &[])
    );
}

#[test]
fn compartment_search_without_compartment_is_not_narrowable() {
    let t = patient_token("patient/Observation.rs");
    let mut req = get("/Patient/p1/Observation");
    let grant = grant_for(&t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, &t, &grant).unwrap();
    req.compartment = None;
    assert!(matches!(
        rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()),
        Err(AuthzError::NotNarrowable { .. })
    ));
}

// ---------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------

#[test]
fn operation_post_forwards_body() {
    let t = system_token("system/Patient.rs");
    let body = br#"{"resourceType":"Parameters","parameter":[]}"#;
    let req = parse(Method::POST, "/Patient/$match", None);
    let out = rewrite_with_body(&t, &req, body).unwrap();
    assert_eq!(out.method, Method::POST);
    assert_eq!(out.path, "/Patient/$match");
    assert_eq!(out.body.as_deref(), Some(&body[..]));
}

#[test]
fn operation_get_has_no_body() {
    let t = patient_token("patient/Patient.r");
    let req = get("/Patient/p1/$everything?_since=2020-01-01&_format=xml");
    let out = rewrite_with_body(&t, &req, b"ignored").unwrap();
    assert_eq!(
        out,
        outbound("/Patient/p1/$everything", &[("_since", "2020-01-01")])
    );
}

#[test]
fn operation_levels_rebuild_paths() {
    // Built directly: the scope stage permits only `$match` and `$everything`.
    let t = system_token("system/*.rs");
    let base = get("/Patient/p1/$everything");
    let grant = grant_for(&t, &base);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &base, &t, &grant).unwrap();
    for (target, path) in [
        ("/$reindex", "/$reindex"),
        ("/Observation/$lastn", "/Observation/$lastn"),
        ("/Observation/o1/$meta", "/Observation/o1/$meta"),
    ] {
        let req = get(target);
        let out = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap();
        assert_eq!(out.path, path);
        assert_eq!(out.method, Method::GET);
    }
}

// ---------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------

#[test]
fn reads_rebuild_the_path() {
    let t = patient_token("patient/Observation.rs");
    assert_eq!(ok(&t, "/Observation/o1"), outbound("/Observation/o1", &[]));
    assert_eq!(
        ok(&t, "/Observation/o1/_history/2"),
        outbound("/Observation/o1/_history/2", &[])
    );
    assert_eq!(
        ok(&t, "/Observation/o1/_history?_count=5"),
        outbound("/Observation/o1/_history", &[("_count", "5")])
    );
}

#[test]
fn reads_are_built_from_parsed_parts_only() {
    let t = patient_token("patient/Observation.rs");
    let mut req = get("/Observation/o1");
    let grant = grant_for(&t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, &t, &grant).unwrap();
    req.id = ResourceId::parse("other-id.2");
    let out = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap();
    assert_eq!(out.path, "/Observation/other-id.2");
    assert_eq!(out.method, Method::GET);
    assert_eq!(out.body, None);
}

#[test]
fn reads_keep_client_params_except_format() {
    let t = patient_token("patient/Observation.rs");
    let out = ok(&t, "/Observation/o1?_elements=id&_format=json&_pretty=true");
    assert_eq!(out.path, "/Observation/o1");
    assert!(
        !out.params.iter().any(|(k, _)| k == "_format"),
        "{:?}",
        out.params
    );
    assert!(
        out.params
            .contains(&("_pretty".to_owned(), "true".to_owned()))
    );
    // `_elements` is kept, widened with the compartment-linking elements.
    let elements = &out.params.iter().find(|(k, _)| k == "_elements").unwrap().1;
    assert!(
        elements.starts_with("id,") && elements.contains("subject"),
        "{elements}"
    );
}

#[test]
fn unsupported_interactions() {
    let t = system_token("system/*.cruds");
    let grant = grant_for(&t, &get("/Observation/o1"));
    let permit = Permit {
        fga: false,
        public_types: std::sync::Arc::from([]),
        user: None,
        reaches: vec![(ScopeContext::System, crate::authz::Reach::All)],
        denied_status: StatusCode::NOT_FOUND,
        token: TokenContext::default(),
    };
    for (method, target) in [
        (Method::POST, "/Observation"),
        (Method::PUT, "/Observation/o1"),
        (Method::PATCH, "/Observation/o1"),
        (Method::DELETE, "/Observation/o1"),
        (Method::POST, "/"),
        (Method::GET, "/metadata"),
        (Method::GET, "/.well-known/smart-configuration"),
        (Method::GET, "/.well-known/udap"),
    ] {
        let req = parse(method.clone(), target, None);
        let err = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap_err();
        assert!(
            matches!(err, AuthzError::NotSupported { .. }),
            "{method} {target}: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// OutboundRequest::path_and_query
// ---------------------------------------------------------------------------------

#[test]
fn path_and_query_without_params_is_the_path() {
    assert_eq!(
        outbound("/Observation", &[]).path_and_query(),
        "/Observation"
    );
    assert_eq!(outbound("", &[]).path_and_query(), "");
}

#[test]
fn path_and_query_encodes_special_characters() {
    let out = outbound(
        "/Observation",
        &[
            ("code", "http://loinc.org|1234-5"),
            ("name", "van der Berg"),
            ("a&b", "c=d"),
            ("date", "2020-01-01T00:00:00+01:00"),
            ("x", "caf\u{e9}"),
            ("hash", "#1"),
            ("pct", "100%"),
        ],
    );
    assert_eq!(
        out.path_and_query(),
        "/Observation?code=http%3A%2F%2Floinc.org%7C1234-5&name=van+der+Berg&a%26b=c%3Dd\
         &date=2020-01-01T00%3A00%3A00%2B01%3A00&x=caf%C3%A9&hash=%231&pct=100%25"
    );
}

#[test]
fn path_and_query_keeps_repeated_params_in_order() {
    let out = outbound("/Patient", &[("_id", "p2"), ("_id", "p1"), ("", "")]);
    assert_eq!(out.path_and_query(), "/Patient?_id=p2&_id=p1&=");
}

#[test]
fn path_and_query_round_trips_through_form_decoding() {
    let params = [
        ("code", "a|b c&d=e+f,g\\h"),
        ("k y", "v%20"),
        ("\u{1f600}", "\u{e9}"),
    ];
    let out = outbound("/Observation", &params);
    let pq = out.path_and_query();
    let query = pq.split_once('?').unwrap().1;
    let decoded: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(decoded, pairs(&params));
}

#[test]
fn path_and_query_of_rewritten_search() {
    let t = patient_token("patient/Observation.rs?code=http://loinc.org%7C1234-5");
    let out = ok(&t, "/Observation?value-string=a%20b");
    assert_eq!(
        out.path_and_query(),
        "/Patient/p1/Observation?value-string=a+b&code=http%3A%2F%2Floinc.org%7C1234-5"
    );
}

#[test]
fn inference_parameters_are_refused_for_compartment_bound_tokens() {
    let t = patient_token("patient/*.rs");
    for q in [
        "/Observation?subject:Patient.name=Smith",
        "/Observation?subject.name=Smith",
        "/Patient?_has:Observation:patient:code=1234",
        "/Observation?_filter=code%20eq%201234",
        "/Observation?_query=custom",
        "/Observation?_contained=true",
        "/Patient/p1/Observation?performer:Practitioner.name=X",
        "/Observation?_list=someones-list",
        "/Observation?_sort=subject.name",
        "/Observation?_sort=-patient:Patient.name",
    ] {
        let err = rewrite(&t, &get(q)).unwrap_err();
        assert!(
            matches!(err, AuthzError::ParameterNotAllowed { .. }),
            "{q}: {err:?}"
        );
        assert_eq!(err.reason(), "search_parameter_not_allowed");
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    }
    // Unrestricted tokens may use them: nothing to infer beyond their reach.
    let sys = system_token("system/*.rs");
    assert!(rewrite(&sys, &get("/Observation?subject:Patient.name=Smith")).is_ok());
    // Ordinary parameters with modifiers are fine.
    assert!(
        rewrite(
            &t,
            &get("/Observation?code:text=glucose&subject:identifier=x|1")
        )
        .is_ok()
    );
}

#[test]
fn elements_are_widened_with_the_linking_elements_for_restricted_tokens() {
    let t = patient_token("patient/Observation.rs");
    let out = ok(&t, "/Observation?_elements=code");
    let elements = &out.params.iter().find(|(k, _)| k == "_elements").unwrap().1;
    let listed: Vec<&str> = elements.split(',').collect();
    assert_eq!(listed[0], "code");
    for needed in ["subject", "performer"] {
        assert!(listed.contains(&needed), "{elements}");
    }
    // Already present elements are not repeated; unrestricted tokens are untouched.
    let out = ok(&t, "/Observation?_elements=subject,code");
    let elements = &out.params.iter().find(|(k, _)| k == "_elements").unwrap().1;
    assert_eq!(elements.matches("subject").count(), 1, "{elements}");
    let sys = system_token("system/Observation.rs");
    assert_eq!(
        ok(&sys, "/Observation?_elements=code").params,
        pairs(&[("_elements", "code")])
    );
}

#[test]
fn match_is_permitted_for_compartment_bound_tokens_within_their_compartment() {
    // Stage 5 narrows the candidate searches and checks the candidates
    // (`forward::patient_match`); the permit carries the token's compartment.
    let t = patient_token("patient/Patient.rs");
    let req = parse(Method::POST, "/Patient/$match", None);
    let grant = grant_for(&t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, &t, &grant).unwrap();
    assert!(!permit.is_unrestricted());
    let compartments: Vec<String> = permit
        .compartments()
        .map(|c| format!("{}/{}", c.owner, c.id))
        .collect();
    assert_eq!(compartments, ["Patient/p1"]);
}

#[test]
fn wholesale_searches_by_restricted_tokens_refuse_reverse_and_iterated_includes() {
    let t = token("user/*.rs", None, Some("Practitioner/pr1"));
    for q in [
        "/Practitioner?_id=pr2&_revinclude=Observation:performer",
        "/Organization?_include:iterate=Organization:partof",
    ] {
        let err = rewrite(&t, &get(q)).unwrap_err();
        assert!(
            matches!(err, AuthzError::ParameterNotAllowed { .. }),
            "{q}: {err:?}"
        );
    }
    // Plain includes and narrowed searches keep them.
    assert!(rewrite(&t, &get("/Practitioner?_include=Practitioner:location")).is_ok());
    assert!(rewrite(&t, &get("/Observation?_revinclude=Provenance:target")).is_ok());
}

// ---------------------------------------------------------------------------------------
// openfga tenants: searches narrowed to a patient list

fn fga_permit(t: &VerifiedToken) -> Permit {
    Permit {
        fga: true,
        public_types: std::sync::Arc::from([]),
        user: None,
        reaches: vec![(
            ScopeContext::User,
            crate::authz::Reach::Fga(std::sync::Arc::from("user:alice")),
        )],
        denied_status: http::StatusCode::NOT_FOUND,
        token: TokenContext {
            has_patient: t.patient.is_some(),
        },
    }
}

fn fga_rewrite(target: &str, ids: &[&str], chunk: usize) -> Result<OutboundRequest, AuthzError> {
    let t = token("user/*.rs", None, None);
    let req = get(target);
    let grant = grant_for(&t, &req);
    let list = PatientNarrowing::new(ids.iter().map(|s| (*s).to_owned()).collect());
    rewrite_request_with(
        &req,
        &grant,
        &fga_permit(&t),
        &INDEX,
        &Bytes::new(),
        Some((&list, chunk)),
        crate::config::CompartmentSearch::Native,
    )
}

#[test]
fn fga_search_is_narrowed_by_the_types_patient_parameter_outside_the_url() {
    let out = fga_rewrite("/Observation?code=1234", &["a", "b", "c"], 2).unwrap();
    assert_eq!(out.path, "/Observation");
    // The list is not in the URL.
    assert_eq!(out.path_and_query(), "/Observation?code=1234");
    let n = out.narrowing.clone().unwrap();
    assert_eq!(n.chunks(), 2);
    assert_eq!(
        n.pair(),
        ("subject".to_owned(), "Patient/a,Patient/b".to_owned())
    );
    assert_eq!(
        &out.search_form().unwrap()[..],
        b"code=1234&subject=Patient%2Fa%2CPatient%2Fb"
    );
    let last = crate::fhir::Narrowing { chunk: 1, ..n };
    assert_eq!(last.pair().1, "Patient/c");
    assert!(!last.has_next_chunk());

    let out = fga_rewrite("/Condition", &["a"], 100).unwrap();
    assert_eq!(
        out.narrowing.unwrap().pair(),
        ("patient".to_owned(), "Patient/a".to_owned())
    );
    let out = fga_rewrite("/Patient?name=x", &["a", "b"], 100).unwrap();
    assert_eq!(
        out.narrowing.unwrap().pair(),
        ("_id".to_owned(), "a,b".to_owned())
    );
    // Non-patient data is not narrowed; types outside the Patient compartment are refused.
    assert!(
        fga_rewrite("/Practitioner", &["a"], 100)
            .unwrap()
            .narrowing
            .is_none()
    );
    assert!(fga_rewrite("/Device", &["a"], 100).is_err());
}

#[test]
fn fga_search_without_a_list_is_never_forwarded_unnarrowed() {
    let t = token("user/*.rs", None, None);
    let req = get("/Observation");
    let grant = grant_for(&t, &req);
    let err = rewrite_request(&req, &grant, &fga_permit(&t), &INDEX, &Bytes::new()).unwrap_err();
    assert_eq!(err.reason(), "search_not_narrowable");
    // An empty list narrows to nothing (stage 5 answers an empty Bundle itself).
    let out = fga_rewrite("/Observation", &[], 100).unwrap();
    assert_eq!(out.narrowing.unwrap().chunks(), 0);
}

#[test]
fn fga_search_widens_elements_with_the_patient_links() {
    let out = fga_rewrite("/Observation?_elements=code", &["a"], 100).unwrap();
    let elements = &out.params.iter().find(|(k, _)| k == "_elements").unwrap().1;
    assert!(elements.starts_with("code,"), "{elements}");
    assert!(elements.contains("subject"), "{elements}");
    assert!(elements.contains("performer"), "{elements}");
}

#[test]
fn counts_are_refused_where_they_could_count_hidden_records() {
    for (t, target) in [
        (
            patient_token("patient/Observation.rs?category=laboratory"),
            "/Observation?_summary=count",
        ),
        (
            system_token("system/Observation.rs?category=laboratory"),
            "/Observation?_summary=count",
        ),
    ] {
        let err = rewrite(&t, &get(target)).unwrap_err();
        assert!(
            matches!(&err, AuthzError::ParameterNotAllowed { name } if name == "_summary=count"),
            "{target}: {err:?}"
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
    // Where every match is released the count is the client's to have: unrestricted,
    // non-patient data read wholesale, a search narrowed to the token's compartment.
    for (t, target) in [
        (
            system_token("system/Observation.rs"),
            "/Observation?_summary=count",
        ),
        (
            token("user/Medication.rs", None, Some("Practitioner/dr1")),
            "/Medication?_summary=count",
        ),
        (
            patient_token("patient/Observation.rs"),
            "/Observation?_summary=count",
        ),
        (
            patient_token("patient/Observation.rs"),
            "/Patient/p1/Observation?_summary=count",
        ),
        (
            token("user/Observation.rs", None, Some("Practitioner/dr1")),
            "/Observation?_summary=count",
        ),
    ] {
        assert!(rewrite(&t, &get(target)).is_ok(), "{target}");
    }
    // Other summaries shape records and are fine.
    let t = patient_token("patient/Observation.rs?category=laboratory");
    assert!(rewrite(&t, &get("/Observation?_summary=true")).is_ok());
}

/// An upstream declaring `code` and `patient` for Observation and `_id` for all.
fn declared() -> SearchSupport {
    SearchSupport::from_capability_statement(&serde_json::json!({
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "searchParam": [{"name": "_id"}], "resource": [
            {"type": "Observation", "searchParam": [{"name": "code"}, {"name": "patient"}]}
        ]}]
    }))
}

fn check_declared(t: &VerifiedToken, target: &str) -> Result<(), AuthzError> {
    let req = get(target);
    let grant = grant_for(t, &req);
    let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
    let permit = authorize(&checker, &req, t, &grant).unwrap();
    check_declared_params(&req, &permit, &declared())
}

#[test]
fn restricted_searches_are_held_to_the_parameters_the_upstream_declares() {
    let t = patient_token("patient/Observation.rs");
    for ok in [
        "/Observation?code=1234",
        "/Observation?code:text=glucose&_id=o1&_count=5&_sort=-date&_elements=code",
        "/Patient/p1/Observation?code=1234",
        "/Observation",
    ] {
        assert!(check_declared(&t, ok).is_ok(), "{ok}");
    }
    for (bad, name) in [
        ("/Observation?code=1&categroy=laboratory", "categroy"),
        ("/Observation?value-quantity=gt5", "value-quantity"),
        ("/Patient/p1/Observation?date:missing=true", "date:missing"),
    ] {
        let err = check_declared(&t, bad).unwrap_err();
        assert!(
            matches!(&err, AuthzError::UndeclaredParameter { name: n, .. } if n == name),
            "{bad}: {err:?}"
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.reason(), "search_parameter_unknown");
    }
    // Unrestricted tokens: the upstream's to judge.
    let sys = system_token("system/Observation.rs");
    assert!(check_declared(&sys, "/Observation?categroy=laboratory").is_ok());
    // Reads carry no search parameters to hold.
    assert!(check_declared(&t, "/Observation/o1").is_ok());
}

mod never_widens {
    use super::*;
    use proptest::prelude::*;

    fn client_params() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = prop::sample::select(vec![
            "code",
            "date",
            "status",
            "category",
            "patient",
            "subject",
            "performer",
            "_id",
            "_count",
            "_sort",
            "_elements",
            "_include",
            "code:text",
            "date:missing",
        ]);
        prop::collection::vec((name, "[a-z0-9]{1,8}"), 0..6)
            .prop_map(|ps| ps.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
    }

    /// The token's compartment, as the narrowing must carry it.
    fn narrowed_to(out: &OutboundRequest, owner: &str, id: &str, by: &[&str]) -> bool {
        out.path == format!("/{owner}/{id}/Observation")
            || (out.path == "/Observation"
                && out
                    .params
                    .iter()
                    .any(|(k, v)| by.contains(&k.as_str()) && *v == format!("{owner}/{id}")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Narrowing never widens a query: whatever the client sends, a forwarded
        /// search keeps every client parameter (ANDed by FHIR, so they only narrow
        /// further) and carries the token's compartment; anything else is refused.
        #[test]
        fn narrowing_never_widens_a_query(params in client_params(), native in any::<bool>(), user in any::<bool>()) {
            let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let target = format!("/Observation?{}", query.join("&"));
            let (t, owner, id, by): (VerifiedToken, &str, &str, &[&str]) = if user {
                (token("user/Observation.rs", None, Some("Practitioner/dr1")), "Practitioner", "dr1", &["performer"])
            } else {
                (patient_token("patient/Observation.rs"), "Patient", "p1", &["subject", "patient"])
            };
            let out = if native { rewrite(&t, &get(&target)) } else { rewrite_by_parameter(&t, &target) };
            // Plain parameters are never refused, so the property is not met vacuously.
            let plain = params.iter().all(|(k, _)| ["code", "date", "status", "_count"].contains(&k.as_str()));
            prop_assert!(out.is_ok() || !plain, "{target}: {:?}", out);
            let Ok(out) = out else { return Ok(()) };
            prop_assert!(narrowed_to(&out, owner, id, by), "{target} -> {} {:?}", out.path, out.params);
            for (k, v) in &params {
                let kept = out.params.iter().any(|(ok, ov)| {
                    ok == k && (ov == v || (k == "_elements" && ov.starts_with(&format!("{v},"))))
                });
                prop_assert!(kept, "{target}: {k}={v} lost in {:?}", out.params);
            }
        }
    }
}
