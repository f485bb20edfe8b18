#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::fhir::{ResourceId, parse_request};
use crate::scope::check_scopes;
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

fn cref(owner: &str, id: &str) -> CompartmentRef {
    CompartmentRef {
        owner: rt(owner),
        id: ResourceId::parse(id).unwrap(),
    }
}

fn token(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: Some("sub".to_owned()),
        client_id: Some("app".to_owned()),
        scopes: parse_scopes(scopes),
        patient: patient.map(|p| ResourceId::parse(p).unwrap()),
        fhir_user: fhir_user.map(|u| FhirUser::parse(u).unwrap()),
        expires_at: u64::MAX,
    }
}

fn request(method: Method, path: &str, query: Option<&str>) -> FhirRequest {
    parse_request(&method, path, query, None).unwrap()
}

fn get(path: &str) -> FhirRequest {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    request(Method::GET, path, query)
}

fn grant_for(token: &VerifiedToken, req: &FhirRequest) -> ScopeGrant {
    check_scopes(
        &token.scopes,
        req,
        TokenContext {
            has_patient: token.patient.is_some(),
        },
    )
    .unwrap()
}

fn decide(token: &VerifiedToken, req: &FhirRequest) -> Result<Permit, AuthzError> {
    authorize(&checker(), req, token, &grant_for(token, req))
}

fn patient_token(scopes: &str) -> VerifiedToken {
    token(scopes, Some("p1"), None)
}

/// A request that passed the scope and authz stages, ready to release records.
struct Passed {
    token: VerifiedToken,
    grant: ScopeGrant,
    permit: Permit,
}

impl Passed {
    fn new(token: VerifiedToken, req: &FhirRequest) -> Passed {
        let grant = grant_for(&token, req);
        let permit = authorize(&checker(), req, &token, &grant).unwrap();
        Passed {
            token,
            grant,
            permit,
        }
    }

    fn release(&self, resource: &Value, primary: bool) -> Release {
        let ctx = ReleaseCtx {
            permit: &self.permit,
            grant: &self.grant,
            token: &self.token,
            index: &INDEX,
            bases: [PUBLIC, UPSTREAM],
            fga: None,
        };
        let rt = rt(resource["resourceType"].as_str().unwrap());
        ctx.release(rt, resource, primary)
    }
}

fn observation(subject: &str) -> Value {
    json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": subject}})
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id})
}

// ---------------------------------------------------------------------------------
// Reach::of
// ---------------------------------------------------------------------------------

#[test]
fn reach_system_is_all() {
    let t = token("system/*.rs", None, None);
    assert_eq!(Reach::of(ScopeContext::System, &t), Reach::All);
}

#[test]
fn reach_patient_is_the_patient_compartment() {
    let t = token("patient/*.rs", Some("p1"), Some("Practitioner/pr1"));
    assert_eq!(
        Reach::of(ScopeContext::Patient, &t),
        Reach::Compartment(cref("Patient", "p1"))
    );
    let t = token("patient/*.rs", None, Some("Patient/p1"));
    assert_eq!(Reach::of(ScopeContext::Patient, &t), Reach::Nothing);
}

#[test]
fn reach_user_follows_fhir_user() {
    for (user, owner, id) in [
        ("Practitioner/pr1", "Practitioner", "pr1"),
        ("RelatedPerson/rp1", "RelatedPerson", "rp1"),
        ("Patient/p7", "Patient", "p7"),
        (
            "https://ehr.example/fhir/Practitioner/pr2",
            "Practitioner",
            "pr2",
        ),
    ] {
        let t = token("user/*.rs", Some("p1"), Some(user));
        assert_eq!(
            Reach::of(ScopeContext::User, &t),
            Reach::Compartment(cref(owner, id)),
            "{user}"
        );
    }
}

#[test]
fn reach_user_without_usable_fhir_user_is_nothing() {
    for user in [
        Some("Organization/o1"),
        Some("Device/d1"),
        Some("PractitionerRole/r1"),
        None,
    ] {
        let t = token("user/*.rs", Some("p1"), user);
        assert_eq!(
            Reach::of(ScopeContext::User, &t),
            Reach::Nothing,
            "{user:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// authorize
// ---------------------------------------------------------------------------------

#[test]
fn read_by_patient_token_is_permitted_with_its_compartment() {
    let t = patient_token("patient/Observation.rs");
    let p = decide(&t, &get("/Observation/o1")).unwrap();
    assert_eq!(
        p.reaches,
        vec![(
            ScopeContext::Patient,
            Reach::Compartment(cref("Patient", "p1"))
        )]
    );
    assert_eq!(p.denied_status, StatusCode::NOT_FOUND);
    assert!(p.token.has_patient);
    assert!(!p.is_unrestricted());
    assert_eq!(
        p.compartments().collect::<Vec<_>>(),
        vec![&cref("Patient", "p1")]
    );
}

#[test]
fn writes_get_a_permit_for_the_write_stage() {
    // Stage 3 only decides the reach; the record checks of new and current content are
    // the write stage's (`write::CheckWrite`).
    let t = patient_token("patient/Observation.cruds");
    for (method, path, query) in [
        (Method::POST, "/Observation", None),
        (Method::PUT, "/Observation/o1", None),
        (Method::PATCH, "/Observation/o1", None),
        (Method::DELETE, "/Observation/o1", None),
        (Method::PUT, "/Observation", Some("code=x")),
        (Method::DELETE, "/Observation", Some("code=x")),
    ] {
        let req = request(method.clone(), path, query);
        let p = decide(&t, &req).unwrap();
        assert_eq!(
            p.compartments().collect::<Vec<_>>(),
            vec![&cref("Patient", "p1")],
            "{method} {path}"
        );
    }
    let t = token("system/*.cruds", None, None);
    assert!(
        decide(&t, &request(Method::POST, "/Observation", None))
            .unwrap()
            .is_unrestricted()
    );
}

#[test]
fn batch_is_not_supported() {
    // The scope stage refuses batches first; authz refuses them on its own too.
    let t = token("system/*.cruds", None, None);
    let grant = grant_for(&t, &get("/Observation/o1"));
    let batch = request(Method::POST, "/", None);
    assert_eq!(batch.interaction, Interaction::BatchOrTransaction);
    let err = authorize(&checker(), &batch, &t, &grant).unwrap_err();
    assert!(matches!(
        err,
        AuthzError::NotSupported {
            interaction: "batch"
        }
    ));
}

#[test]
fn compartment_search_of_own_patient_is_permitted() {
    let t = patient_token("patient/Observation.rs");
    assert!(decide(&t, &get("/Patient/p1/Observation")).is_ok());
}

#[test]
fn compartment_search_of_other_patient_is_hidden_with_tenant_status() {
    let t = patient_token("patient/Observation.rs");
    let req = get("/Patient/p2/Observation");
    let grant = grant_for(&t, &req);
    for status in [StatusCode::NOT_FOUND, StatusCode::FORBIDDEN] {
        let c = Checker::for_test(Arc::clone(&INDEX), status);
        let err = authorize(&c, &req, &t, &grant).unwrap_err();
        assert!(matches!(err, AuthzError::Hidden { status: s } if s == status));
        assert_eq!(err.status(), status);
        assert_eq!(err.reason(), "record_denied");
    }
}

#[test]
fn compartment_search_prefix_id_is_another_patient() {
    let t = patient_token("patient/Observation.rs");
    for path in ["/Patient/p10/Observation", "/Patient/p/Observation"] {
        assert!(
            matches!(decide(&t, &get(path)), Err(AuthzError::Hidden { .. })),
            "{path}"
        );
    }
}

#[test]
fn compartment_search_of_other_compartment_type_is_hidden() {
    let t = patient_token("patient/Observation.rs");
    for path in [
        "/Encounter/e1/Observation",
        "/Practitioner/p1/Observation",
        "/RelatedPerson/p1/Observation",
    ] {
        assert!(
            matches!(decide(&t, &get(path)), Err(AuthzError::Hidden { .. })),
            "{path}"
        );
    }
}

#[test]
fn compartment_search_star_of_other_patient_is_hidden() {
    let t = patient_token("patient/*.rs");
    assert!(decide(&t, &get("/Patient/p1/*")).is_ok());
    assert!(matches!(
        decide(&t, &get("/Patient/p2/*")),
        Err(AuthzError::Hidden { .. })
    ));
}

#[test]
fn compartment_search_by_user_token() {
    let t = token("user/Observation.rs", None, Some("Practitioner/pr1"));
    assert!(decide(&t, &get("/Practitioner/pr1/Observation")).is_ok());
    assert!(matches!(
        decide(&t, &get("/Practitioner/pr2/Observation")),
        Err(AuthzError::Hidden { .. })
    ));
    // A practitioner may not search a patient's compartment: it is not theirs.
    assert!(matches!(
        decide(&t, &get("/Patient/p1/Observation")),
        Err(AuthzError::Hidden { .. })
    ));
}

#[test]
fn compartment_search_by_system_token_is_unrestricted() {
    let t = token("system/Observation.rs", None, None);
    for path in [
        "/Patient/p2/Observation",
        "/Encounter/e1/Observation",
        "/Device/d1/Observation",
    ] {
        assert!(decide(&t, &get(path)).is_ok(), "{path}");
    }
}

#[test]
fn compartment_search_union_with_patient_and_user() {
    let t = token(
        "patient/Observation.rs user/Observation.rs",
        Some("p1"),
        Some("Practitioner/pr1"),
    );
    assert!(decide(&t, &get("/Patient/p1/Observation")).is_ok());
    assert!(decide(&t, &get("/Practitioner/pr1/Observation")).is_ok());
    assert!(matches!(
        decide(&t, &get("/Patient/p2/Observation")),
        Err(AuthzError::Hidden { .. })
    ));
}

#[test]
fn compartment_search_without_parsed_compartment_is_not_narrowable() {
    let t = patient_token("patient/Observation.rs");
    let mut req = get("/Patient/p1/Observation");
    let grant = grant_for(&t, &req);
    req.compartment = None;
    let err = authorize(&checker(), &req, &t, &grant).unwrap_err();
    assert!(matches!(
        err,
        AuthzError::NotNarrowable {
            interaction: "search-compartment"
        }
    ));
}

#[test]
fn everything_for_own_patient_is_permitted() {
    let t = patient_token("patient/*.rs");
    assert!(decide(&t, &get("/Patient/p1/$everything")).is_ok());
}

#[test]
fn everything_for_other_patient_is_hidden() {
    let t = patient_token("patient/*.rs");
    for path in ["/Patient/p2/$everything", "/Patient/p10/$everything"] {
        let err = decide(&t, &get(path)).unwrap_err();
        assert!(
            matches!(err, AuthzError::Hidden { status } if status == StatusCode::NOT_FOUND),
            "{path}"
        );
    }
}

#[test]
fn everything_for_user_tokens() {
    // A patient logged in as user: their own record only.
    let t = token("user/Patient.r", None, Some("Patient/p1"));
    assert!(decide(&t, &get("/Patient/p1/$everything")).is_ok());
    assert!(matches!(
        decide(&t, &get("/Patient/p2/$everything")),
        Err(AuthzError::Hidden { .. })
    ));
    // A practitioner's compartment never is a Patient's.
    let t = token("user/Patient.r", None, Some("Practitioner/pr1"));
    assert!(matches!(
        decide(&t, &get("/Patient/p1/$everything")),
        Err(AuthzError::Hidden { .. })
    ));
}

#[test]
fn everything_for_system_token_is_permitted() {
    let t = token("system/Patient.r", None, None);
    assert!(decide(&t, &get("/Patient/p2/$everything")).is_ok());
}

#[test]
fn type_search_outside_compartment() {
    let t = patient_token("patient/Medication.rs patient/Organization.rs patient/Practitioner.rs");
    for ty in ["Medication", "Organization", "Practitioner"] {
        let err = decide(&t, &get(&format!("/{ty}"))).unwrap_err();
        assert!(
            matches!(err, AuthzError::OutsideCompartment { resource_type } if resource_type == rt(ty)),
            "{ty}: {err:?}"
        );
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(err.reason(), "outside_compartment");
    }
}

#[test]
fn type_search_inside_compartment() {
    let t = patient_token("patient/*.rs");
    for ty in ["Observation", "Patient", "Encounter", "AllergyIntolerance"] {
        assert!(decide(&t, &get(&format!("/{ty}"))).is_ok(), "{ty}");
    }
}

#[test]
fn type_search_outside_practitioner_compartment() {
    let t = token("user/*.rs", None, Some("Practitioner/pr1"));
    assert!(decide(&t, &get("/Observation")).is_ok());
    assert!(decide(&t, &get("/Patient")).is_ok());
    assert!(decide(&t, &get("/Practitioner")).is_ok());
    // Non-patient data: user tokens read it wholesale.
    assert!(decide(&t, &get("/Medication")).is_ok());
    // Patient data outside the practitioner compartment's types stays refused.
    let rp = token("user/*.rs", None, Some("RelatedPerson/rp1"));
    assert!(matches!(
        decide(&rp, &get("/Immunization")),
        Err(AuthzError::OutsideCompartment { .. })
    ));
}

#[test]
fn type_search_any_reached_compartment_suffices() {
    // Practitioner links Patient (general-practitioner) even though the patient
    // token alone would not reach Practitioner resources.
    let t = token(
        "patient/Practitioner.rs user/Practitioner.rs",
        Some("p1"),
        Some("Practitioner/pr1"),
    );
    assert!(decide(&t, &get("/Practitioner")).is_ok());
}

#[test]
fn type_search_outside_compartment_with_system_scope_is_permitted() {
    let t = patient_token("patient/Observation.rs system/Medication.rs");
    assert!(decide(&t, &get("/Medication")).unwrap().is_unrestricted());
}

#[test]
fn history_type_outside_compartment() {
    let t = patient_token("patient/Medication.rs patient/Observation.rs");
    assert!(matches!(
        decide(&t, &get("/Medication/_history")),
        Err(AuthzError::OutsideCompartment { .. })
    ));
    // Inside the compartment authz lets it through; the rewrite stage refuses it.
    assert!(decide(&t, &get("/Observation/_history")).is_ok());
}

#[test]
fn system_search_for_compartment_bound_token_is_not_narrowable() {
    let t = patient_token("patient/*.rs");
    for path in ["/?_type=Observation", "/", "/_history"] {
        let err = decide(&t, &get(path)).unwrap_err();
        assert!(
            matches!(err, AuthzError::NotNarrowable { .. }),
            "{path}: {err:?}"
        );
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(err.reason(), "search_not_narrowable");
    }
    let t = token("user/*.rs", None, Some("Practitioner/pr1"));
    assert!(matches!(
        decide(&t, &get("/?_type=Observation")),
        Err(AuthzError::NotNarrowable {
            interaction: "search-system"
        })
    ));
}

#[test]
fn system_search_for_system_token_is_permitted() {
    let t = token("system/*.rs", None, None);
    for path in [
        "/?_type=Observation",
        "/",
        "/_history",
        "/Observation/_history",
    ] {
        assert!(decide(&t, &get(path)).unwrap().is_unrestricted(), "{path}");
    }
}

#[test]
fn user_token_without_fhir_user_has_no_compartment() {
    for user in [None, Some("Organization/o1"), Some("Device/d1")] {
        let t = token("user/Observation.rs", Some("p1"), user);
        for path in ["/Observation/o1", "/Observation", "/Patient/p1/Observation"] {
            let err = decide(&t, &get(path)).unwrap_err();
            assert!(
                matches!(err, AuthzError::NoUserCompartment),
                "{user:?} {path}: {err:?}"
            );
            assert_eq!(err.status(), StatusCode::FORBIDDEN);
            assert_eq!(err.reason(), "no_user_compartment");
        }
    }
}

#[test]
fn user_token_without_fhir_user_still_gets_other_contexts() {
    let t = token(
        "user/Observation.rs patient/Observation.rs",
        Some("p1"),
        None,
    );
    let p = decide(&t, &get("/Observation")).unwrap();
    assert_eq!(
        p.compartments().collect::<Vec<_>>(),
        vec![&cref("Patient", "p1")]
    );
    assert!(p.reaches.contains(&(ScopeContext::User, Reach::Nothing)));
    assert!(!p.is_unrestricted());
}

#[test]
fn system_token_is_unrestricted() {
    let t = token("system/Observation.rs", None, None);
    let p = decide(&t, &get("/Observation")).unwrap();
    assert!(p.is_unrestricted());
    assert_eq!(p.compartments().count(), 0);
    assert_eq!(p.reaches, vec![(ScopeContext::System, Reach::All)]);
    assert!(!p.token.has_patient);
}

#[test]
fn union_of_patient_and_system_contexts() {
    let t = token(
        "patient/Observation.rs system/Observation.rs",
        Some("p1"),
        None,
    );
    let p = decide(&t, &get("/Observation")).unwrap();
    assert!(p.is_unrestricted());
    assert_eq!(
        p.compartments().collect::<Vec<_>>(),
        vec![&cref("Patient", "p1")]
    );
    assert_eq!(p.reaches.len(), 2);
}

#[test]
fn read_only_interactions_pass_authz() {
    let t = patient_token("patient/*.rs");
    for path in [
        "/Observation/o1",
        "/Observation/o1/_history/2",
        "/Observation/o1/_history",
        "/Medication/m1",
    ] {
        assert!(decide(&t, &get(path)).is_ok(), "{path}");
    }
}

#[test]
fn error_statuses_and_reasons() {
    let cases: [(AuthzError, StatusCode, &str); 6] = [
        (
            AuthzError::Hidden {
                status: StatusCode::FORBIDDEN,
            },
            StatusCode::FORBIDDEN,
            "record_denied",
        ),
        (
            AuthzError::NotSupported {
                interaction: "create",
            },
            StatusCode::METHOD_NOT_ALLOWED,
            "interaction_not_supported",
        ),
        (
            AuthzError::OutsideCompartment {
                resource_type: rt("Medication"),
            },
            StatusCode::FORBIDDEN,
            "outside_compartment",
        ),
        (
            AuthzError::NotNarrowable {
                interaction: "search-system",
            },
            StatusCode::FORBIDDEN,
            "search_not_narrowable",
        ),
        (
            AuthzError::ConstraintNotNarrowable {
                resource_type: "Observation".to_owned(),
            },
            StatusCode::FORBIDDEN,
            "scope_constraint_not_narrowable",
        ),
        (
            AuthzError::NoUserCompartment,
            StatusCode::FORBIDDEN,
            "no_user_compartment",
        ),
    ];
    for (err, status, reason) in cases {
        assert_eq!(err.status(), status, "{err:?}");
        assert_eq!(err.reason(), reason, "{err:?}");
    }
}

#[test]
fn error_messages_follow_style() {
    let e = AuthzError::OutsideCompartment {
        resource_type: rt("Medication"),
    };
    assert_eq!(
        e.to_string(),
        "`Medication` resources are outside the compartments this token may access"
    );
    // The hidden error says nothing about the record.
    let e = AuthzError::Hidden {
        status: StatusCode::FORBIDDEN,
    };
    assert_eq!(e.to_string(), "resource not found");
}

#[test]
fn checker_for_test_keeps_status_and_index() {
    let c = checker();
    assert_eq!(c.denied_status(), StatusCode::NOT_FOUND);
    assert!(
        c.index()
            .links_type(ResourceType::PATIENT, rt("Observation"))
    );
}

// ---------------------------------------------------------------------------------
// ReleaseCtx::release
// ---------------------------------------------------------------------------------

#[test]
fn release_primary_in_compartment() {
    let p = Passed::new(
        patient_token("patient/Observation.rs"),
        &get("/Observation"),
    );
    assert_eq!(
        p.release(&observation("Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation(&format!("{PUBLIC}/Patient/p1")), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation(&format!("{UPSTREAM}/Patient/p1")), true),
        Release::Allowed(ScopeContext::Patient)
    );
}

#[test]
fn release_other_patients_record_is_denied_record() {
    let p = Passed::new(
        patient_token("patient/Observation.rs"),
        &get("/Observation"),
    );
    for subject in [
        "Patient/p2",
        "Patient/p10",
        "#p1",
        "https://other.example/fhir/Patient/p1",
    ] {
        assert_eq!(
            p.release(&observation(subject), true),
            Release::DeniedRecord,
            "{subject}"
        );
    }
}

#[test]
fn release_include_needs_its_own_scope() {
    let p = Passed::new(
        patient_token("patient/Observation.rs"),
        &get("/Observation?_include=Observation:subject"),
    );
    // No scope on Patient: its type is denied, even for the token's own patient.
    assert_eq!(p.release(&patient("p1"), false), Release::DeniedType);
    // A primary flag does not help a type the request did not target.
    assert_eq!(p.release(&patient("p1"), true), Release::DeniedType);
    // Included Observations are covered by the Observation scope.
    assert_eq!(
        p.release(&observation("Patient/p1"), false),
        Release::Allowed(ScopeContext::Patient)
    );
}

#[test]
fn release_include_with_scope_is_checked_against_compartment() {
    let p = Passed::new(
        patient_token("patient/Observation.rs patient/Patient.r"),
        &get("/Observation?_include=Observation:subject"),
    );
    assert_eq!(
        p.release(&patient("p1"), false),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(p.release(&patient("p2"), false), Release::DeniedRecord);
}

#[test]
fn release_include_with_constrained_scope_checks_the_constraint() {
    let p = Passed::new(
        patient_token("patient/Observation.rs patient/Condition.rs?category=problem-list-item"),
        &get("/Observation"),
    );
    let cond = json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}});
    assert_eq!(p.release(&cond, false), Release::DeniedRecord);
    let mut listed = cond.clone();
    listed["category"] = json!([{"coding": [{"code": "problem-list-item"}]}]);
    assert_eq!(
        p.release(&listed, false),
        Release::Allowed(ScopeContext::Patient)
    );
    // Still only inside the compartment.
    listed["subject"] = json!({"reference": "Patient/p2"});
    assert_eq!(p.release(&listed, false), Release::DeniedRecord);
}

// ---------------------------------------------------------------------------------
// ReleaseCtx::release with scope constraints
// ---------------------------------------------------------------------------------

const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

fn lab_scope() -> String {
    format!("patient/Observation.rs?category={CATEGORY}|laboratory")
}

fn vitals_scope() -> String {
    format!("patient/Observation.rs?category={CATEGORY}|vital-signs")
}

fn categorized(category: &str, subject: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": "o1",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "subject": {"reference": subject}
    })
}

#[test]
fn release_read_with_constrained_scope_evaluates_the_constraint() {
    for path in [
        "/Observation/o1",
        "/Observation/o1/_history/2",
        "/Observation/o1/_history",
    ] {
        let p = Passed::new(patient_token(&lab_scope()), &get(path));
        assert_eq!(
            p.release(&categorized("laboratory", "Patient/p1"), true),
            Release::Allowed(ScopeContext::Patient),
            "{path}"
        );
        assert_eq!(
            p.release(&categorized("vital-signs", "Patient/p1"), true),
            Release::DeniedRecord,
            "{path}"
        );
        assert_eq!(
            p.release(&observation("Patient/p1"), true),
            Release::DeniedRecord,
            "{path}: no category"
        );
        // The constraint does not widen the compartment.
        assert_eq!(
            p.release(&categorized("laboratory", "Patient/p2"), true),
            Release::DeniedRecord,
            "{path}"
        );
    }
}

#[test]
fn release_search_matches_are_checked_again() {
    // The constraint was added to the query; a record the upstream returned anyway is
    // still dropped.
    let p = Passed::new(patient_token(&lab_scope()), &get("/Observation"));
    assert_eq!(
        p.release(&categorized("laboratory", "Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&categorized("vital-signs", "Patient/p1"), true),
        Release::DeniedRecord
    );
}

#[test]
fn release_constrained_scopes_on_one_type_are_a_union() {
    let both = format!("{} {}", lab_scope(), vitals_scope());
    for path in ["/Observation/o1", "/Observation"] {
        let p = Passed::new(patient_token(&both), &get(path));
        for category in ["laboratory", "vital-signs"] {
            assert_eq!(
                p.release(&categorized(category, "Patient/p1"), true),
                Release::Allowed(ScopeContext::Patient),
                "{path} {category}"
            );
        }
        assert_eq!(
            p.release(&categorized("imaging", "Patient/p1"), true),
            Release::DeniedRecord
        );
    }
    // An unconstrained scope alongside lifts the constraint.
    let p = Passed::new(
        patient_token(&format!("{} patient/Observation.r", lab_scope())),
        &get("/Observation/o1"),
    );
    assert_eq!(
        p.release(&categorized("imaging", "Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
}

#[test]
fn release_included_records_with_constrained_scopes() {
    // `_include`d / `_revinclude`d Observations next to Encounters.
    let p = Passed::new(
        patient_token(&format!("patient/Encounter.rs {}", lab_scope())),
        &get("/Encounter?_revinclude=Observation:encounter"),
    );
    assert_eq!(
        p.release(&categorized("laboratory", "Patient/p1"), false),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&categorized("vital-signs", "Patient/p1"), false),
        Release::DeniedRecord
    );
}

#[test]
fn release_constraints_are_per_context() {
    // patient/: every Observation of p1; system/: only laboratory ones, of anyone.
    let p = Passed::new(
        token(
            &format!("patient/Observation.rs system/Observation.rs?category={CATEGORY}|laboratory"),
            Some("p1"),
            None,
        ),
        &get("/Observation/o1"),
    );
    assert_eq!(
        p.release(&categorized("vital-signs", "Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&categorized("laboratory", "Patient/p2"), true),
        Release::Allowed(ScopeContext::System)
    );
    assert_eq!(
        p.release(&categorized("vital-signs", "Patient/p2"), true),
        Release::DeniedRecord
    );
}

#[test]
fn release_with_unsupported_constraint_grants_nothing() {
    for scope in [
        "patient/Observation.rs?date=2024",
        "patient/Observation.rs?category:not=laboratory",
        "patient/Observation.rs?no-such-param=x",
        // One undecidable constraint in a conjunction is enough.
        "patient/Observation.rs?category=laboratory&date=2024",
    ] {
        let p = Passed::new(patient_token(scope), &get("/Observation/o1"));
        assert_eq!(
            p.release(&categorized("laboratory", "Patient/p1"), true),
            Release::DeniedRecord,
            "{scope}"
        );
    }
}

#[test]
fn release_include_with_search_only_scope_counts() {
    let p = Passed::new(
        patient_token("patient/Observation.rs patient/Encounter.s"),
        &get("/Observation"),
    );
    let enc = json!({"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}});
    assert_eq!(
        p.release(&enc, false),
        Release::Allowed(ScopeContext::Patient)
    );
}

#[test]
fn release_type_outside_scope_is_denied_type() {
    let p = Passed::new(
        patient_token("patient/Observation.rs"),
        &get("/Observation"),
    );
    let med = json!({"resourceType": "Medication", "id": "m1"});
    assert_eq!(p.release(&med, false), Release::DeniedType);
    assert_eq!(p.release(&med, true), Release::DeniedType);
}

#[test]
fn release_non_patient_data_to_patient_token_only_if_referenced() {
    // In scope, but Medication is never in a Patient compartment: a patient token may
    // see it only next to its own records that reference it.
    let p = Passed::new(
        patient_token("patient/Observation.rs patient/Medication.r"),
        &get("/Observation"),
    );
    let med = json!({"resourceType": "Medication", "id": "m1"});
    assert_eq!(
        p.release(&med, false),
        Release::AllowedIfReferenced(ScopeContext::Patient)
    );
    // Without a Medication scope, not even that.
    let p = Passed::new(
        patient_token("patient/Observation.rs"),
        &get("/Observation"),
    );
    assert_eq!(p.release(&med, false), Release::DeniedType);
}

#[test]
fn release_non_patient_data_to_user_token_wholesale() {
    let p = Passed::new(
        token("user/*.rs", None, Some("Practitioner/pr1")),
        &get("/Observation"),
    );
    let med = json!({"resourceType": "Medication", "id": "m1"});
    assert_eq!(p.release(&med, false), Release::Allowed(ScopeContext::User));
    let other_practitioner = json!({"resourceType": "Practitioner", "id": "pr2"});
    assert_eq!(
        p.release(&other_practitioner, false),
        Release::Allowed(ScopeContext::User)
    );
    // Patient data still needs the practitioner's compartment.
    assert_eq!(
        p.release(&observation("Patient/p2"), true),
        Release::DeniedRecord
    );
}

#[test]
fn public_types_are_wholesale_for_patient_tokens() {
    let index = Arc::new(CompartmentIndex::official().unwrap());
    let checker = Checker::for_test_public(index, StatusCode::NOT_FOUND, &["Medication"]);
    let t = patient_token("patient/Medication.rs");
    let req = get("/Medication");
    let grant = check_scopes(&t.scopes, &req, TokenContext { has_patient: true }).unwrap();
    let permit = authorize(&checker, &req, &t, &grant).unwrap();
    assert!(permit.reaches_whole_type(rt("Medication"), checker.index()));
    assert!(!permit.reaches_whole_type(rt("Observation"), checker.index()));
    // Without the public list the same search is refused.
    let plain = Checker::for_test(
        Arc::new(CompartmentIndex::official().unwrap()),
        StatusCode::NOT_FOUND,
    );
    assert!(matches!(
        authorize(&plain, &req, &t, &grant),
        Err(AuthzError::OutsideCompartment { .. })
    ));
}

#[test]
fn release_union_of_patient_and_system() {
    let p = Passed::new(
        token(
            "patient/Observation.rs system/Observation.rs",
            Some("p1"),
            None,
        ),
        &get("/Observation"),
    );
    assert_eq!(
        p.release(&observation("Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation("Patient/p2"), true),
        Release::Allowed(ScopeContext::System)
    );
}

#[test]
fn release_system_side_scope_widens_includes() {
    let p = Passed::new(
        token(
            "patient/Observation.rs system/Medication.r",
            Some("p1"),
            None,
        ),
        &get("/Observation"),
    );
    let med = json!({"resourceType": "Medication", "id": "m1"});
    assert_eq!(
        p.release(&med, false),
        Release::Allowed(ScopeContext::System)
    );
    // The system scope does not cover other types.
    assert_eq!(p.release(&patient("p1"), false), Release::DeniedType);
}

#[test]
fn release_user_practitioner() {
    let p = Passed::new(
        token("user/Observation.rs", None, Some("Practitioner/pr1")),
        &get("/Observation"),
    );
    let mine = json!({
        "resourceType": "Observation",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Practitioner/pr1"}]
    });
    let theirs = json!({
        "resourceType": "Observation",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Practitioner/pr2"}]
    });
    assert_eq!(p.release(&mine, true), Release::Allowed(ScopeContext::User));
    assert_eq!(p.release(&theirs, true), Release::DeniedRecord);
}

#[test]
fn release_patient_scope_ignored_without_patient_claim() {
    // Only the system scope is usable: patient/ scopes need a patient claim.
    let p = Passed::new(
        token("patient/Patient.r system/Observation.rs", None, None),
        &get("/Observation"),
    );
    assert_eq!(p.release(&patient("p1"), false), Release::DeniedType);
}

#[test]
fn release_everything_entries() {
    let req = get("/Patient/p1/$everything");
    // Only Patient is granted: other types need scopes of their own.
    let p = Passed::new(patient_token("patient/Patient.r"), &req);
    assert_eq!(
        p.release(&patient("p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation("Patient/p1"), true),
        Release::DeniedType
    );
    let p = Passed::new(
        patient_token("patient/Patient.r patient/Observation.r"),
        &req,
    );
    assert_eq!(
        p.release(&observation("Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation("Patient/p2"), true),
        Release::DeniedRecord
    );
}

#[test]
fn release_star_compartment_search_covers_only_scoped_types() {
    let p = Passed::new(
        patient_token("patient/Observation.rs patient/Encounter.rs"),
        &get("/Patient/p1/*"),
    );
    let enc = json!({"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}});
    let cond = json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}});
    assert_eq!(
        p.release(&enc, true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(
        p.release(&observation("Patient/p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(p.release(&cond, true), Release::DeniedType);
}

#[test]
fn release_read_of_own_patient_record() {
    let p = Passed::new(patient_token("patient/Patient.r"), &get("/Patient/p1"));
    assert_eq!(
        p.release(&patient("p1"), true),
        Release::Allowed(ScopeContext::Patient)
    );
    assert_eq!(p.release(&patient("p2"), true), Release::DeniedRecord);
    // A Patient that links to the token's patient is in its compartment.
    let linked = json!({
        "resourceType": "Patient", "id": "p2",
        "link": [{"other": {"reference": "Patient/p1"}, "type": "seealso"}]
    });
    assert_eq!(
        p.release(&linked, true),
        Release::Allowed(ScopeContext::Patient)
    );
}

#[test]
fn only_allow_listed_types_are_non_patient_data() {
    // Types missing from the Patient CompartmentDefinition are not thereby public.
    for (user, t) in [
        ("Patient/p1", "Binary"),
        ("Patient/p1", "Bundle"),
        ("RelatedPerson/rp1", "Task"),
        ("RelatedPerson/rp1", "Device"),
    ] {
        let tok = token("user/*.rs", None, Some(user));
        let search = decide(&tok, &get(&format!("/{t}")));
        assert!(
            matches!(search, Err(AuthzError::OutsideCompartment { .. })),
            "{user} {t}: {search:?}"
        );
        let p = Passed::new(tok, &get(&format!("/{t}/x1")));
        let record = json!({"resourceType": t, "id": "x1"});
        assert_eq!(
            p.release(&record, true),
            Release::DeniedRecord,
            "{user} {t}"
        );
    }
    let index = CompartmentIndex::official().unwrap();
    for t in [
        "Practitioner",
        "Organization",
        "Location",
        "Medication",
        "ValueSet",
    ] {
        assert!(index.is_non_patient_data(rt(t)), "{t}");
    }
    for t in [
        "Binary",
        "Bundle",
        "Task",
        "Device",
        "Group",
        "Observation",
        "Patient",
    ] {
        assert!(!index.is_non_patient_data(rt(t)), "{t}");
    }
}
