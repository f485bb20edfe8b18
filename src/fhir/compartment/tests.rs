#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use serde_json::json;

use super::*;
use crate::fhir::ResourceId;

const PUBLIC: &str = "https://proxy.example/t1";
const UPSTREAM: &str = "http://127.0.0.1:8081/fhir";
const BASES: [&str; 2] = [PUBLIC, UPSTREAM];

static OFFICIAL: LazyLock<CompartmentIndex> =
    LazyLock::new(|| CompartmentIndex::official().expect("shipped definitions load"));

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

fn cref(owner: &str, id: &str) -> CompartmentRef {
    CompartmentRef {
        owner: rt(owner),
        id: ResourceId::parse(id).unwrap(),
    }
}

fn paths(rt_name: &str, expression: &str) -> Vec<Vec<String>> {
    paths_for(rt(rt_name), expression)
}

fn path(segments: &[&str]) -> Vec<String> {
    segments.iter().map(|s| (*s).to_owned()).collect()
}

fn is_in(reference: &str, owner: &str, id: &str) -> bool {
    reference_is(reference, &cref(owner, id), &BASES)
}

/// A small index from hand-written definitions, independent of the shipped files.
fn small_index() -> CompartmentIndex {
    let sps = json!([
        {"code": "subject", "base": ["Observation"],
         "expression": "Observation.subject.where(resolve() is Patient)"},
        {"code": "performer", "base": ["Observation"], "expression": "Observation.performer"},
        {"code": "patient", "base": ["AllergyIntolerance", "CarePlan"],
         "expression": "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient)"},
        {"code": "link", "base": ["Patient"], "expression": "Patient.link.other"},
        {"code": "no-expression", "base": ["Condition"]}
    ]);
    let defs = [
        json!({
            "resourceType": "CompartmentDefinition",
            "code": "Patient",
            "resource": [
                {"code": "Observation", "param": ["subject", "performer"]},
                {"code": "AllergyIntolerance", "param": ["patient"]},
                {"code": "CarePlan", "param": ["patient"]},
                {"code": "Patient", "param": ["link"]},
                {"code": "Condition", "param": ["no-expression"]},
                {"code": "Medication"},
                {"code": "NotAType", "param": ["subject"]}
            ]
        }),
        json!({
            "resourceType": "CompartmentDefinition",
            "code": "Practitioner",
            "resource": [
                {"code": "Observation", "param": ["performer"]},
                {"code": "Practitioner", "param": ["{def}"]}
            ]
        }),
    ];
    CompartmentIndex::from_json(&defs, &sps).unwrap()
}

// ---------------------------------------------------------------------------------
// paths_for
// ---------------------------------------------------------------------------------

#[test]
fn paths_for_drops_where_filter() {
    assert_eq!(
        paths(
            "Observation",
            "Observation.subject.where(resolve() is Patient)"
        ),
        vec![path(&["subject"])]
    );
}

#[test]
fn paths_for_plain_member() {
    assert_eq!(
        paths("Observation", "Observation.performer"),
        vec![path(&["performer"])]
    );
}

#[test]
fn paths_for_nested_members() {
    assert_eq!(
        paths(
            "Encounter",
            "Encounter.participant.individual.where(resolve() is Practitioner)"
        ),
        vec![path(&["participant", "individual"])]
    );
    assert_eq!(
        paths("Patient", "Patient.link.other"),
        vec![path(&["link", "other"])]
    );
    assert_eq!(
        paths("CarePlan", "CarePlan.activity.detail.performer"),
        vec![path(&["activity", "detail", "performer"])]
    );
}

#[test]
fn paths_for_union_picks_own_type() {
    let expr = "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) \
                | CareTeam.subject.where(resolve() is Patient)";
    assert_eq!(paths("AllergyIntolerance", expr), vec![path(&["patient"])]);
    assert_eq!(paths("CarePlan", expr), vec![path(&["subject"])]);
    assert_eq!(paths("CareTeam", expr), vec![path(&["subject"])]);
    assert!(paths("Condition", expr).is_empty());
}

#[test]
fn paths_for_union_keeps_every_part_of_own_type() {
    assert_eq!(
        paths(
            "Observation",
            "Observation.subject|Observation.performer.where(resolve() is Patient)"
        ),
        vec![path(&["subject"]), path(&["performer"])]
    );
}

#[test]
fn paths_for_prefix_needs_the_dot() {
    // `ObservationDefinition.x` must not be read as an `Observation` path.
    assert!(paths("Observation", "ObservationDefinition.subject").is_empty());
    assert!(paths("Observation", "Observationsubject").is_empty());
    assert_eq!(
        paths(
            "Observation",
            "ObservationDefinition.subject | Observation.subject"
        ),
        vec![path(&["subject"])]
    );
}

#[test]
fn paths_for_reference_cast_is_parsed() {
    let p = paths("DeviceRequest", "(DeviceRequest.code as Reference)");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0][0].starts_with("code"), "{p:?}");
    // Parenthesised parts inside a union too.
    let p = paths(
        "DeviceRequest",
        "(DeviceRequest.code as Reference) | DeviceRequest.subject",
    );
    assert_eq!(p.len(), 2, "{p:?}");
}

#[test]
fn paths_for_reference_cast_names_the_json_property() {
    assert_eq!(
        paths("DeviceRequest", "(DeviceRequest.code as Reference)"),
        vec![path(&["codeReference"])]
    );
}

#[test]
fn paths_for_unsupported_syntax_yields_nothing() {
    // Anything but plain member paths fails closed: no path, never a wrong one.
    assert!(paths("Observation", "Observation.extension('http://x').value").is_empty());
    assert!(paths("Observation", "Observation.subject.ofType(Reference)").is_empty());
    assert!(paths("Observation", "Observation.sub-ject").is_empty());
    assert!(paths("Observation", "Observation.").is_empty());
    assert!(paths("Observation", "Observation..subject").is_empty());
    assert!(paths("Observation", "Observation.where(resolve() is Patient)").is_empty());
    assert!(paths("Observation", "").is_empty());
    assert!(paths("Observation", "|||").is_empty());
    assert!(paths("Observation", "Observation").is_empty());
}

#[test]
fn paths_for_resolve_and_as_function_stop_the_path() {
    assert_eq!(
        paths("Observation", "Observation.subject.resolve()"),
        vec![path(&["subject"])]
    );
    assert_eq!(
        paths("Observation", "Observation.subject.as(Reference)"),
        vec![path(&["subject"])]
    );
}

// ---------------------------------------------------------------------------------
// reference_is
// ---------------------------------------------------------------------------------

#[test]
fn reference_relative() {
    assert!(is_in("Patient/p1", "Patient", "p1"));
}

#[test]
fn reference_versioned() {
    assert!(is_in("Patient/p1/_history/2", "Patient", "p1"));
    assert!(is_in(
        &format!("{PUBLIC}/Patient/p1/_history/7"),
        "Patient",
        "p1"
    ));
}

#[test]
fn reference_versioned_malformed() {
    assert!(!is_in("Patient/p1/_history", "Patient", "p1"));
    assert!(!is_in("Patient/p1/_history/", "Patient", "p1"));
    assert!(!is_in("Patient/p1/_history/2/x", "Patient", "p1"));
    assert!(!is_in("Patient/p1/history/2", "Patient", "p1"));
}

#[test]
fn reference_absolute_public_and_upstream_base() {
    assert!(is_in(&format!("{PUBLIC}/Patient/p1"), "Patient", "p1"));
    assert!(is_in(&format!("{UPSTREAM}/Patient/p1"), "Patient", "p1"));
}

#[test]
fn reference_absolute_foreign_base_refused() {
    assert!(!is_in(
        "https://other.example/fhir/Patient/p1",
        "Patient",
        "p1"
    ));
    // A base that merely starts like ours.
    assert!(!is_in(&format!("{PUBLIC}x/Patient/p1"), "Patient", "p1"));
    assert!(!is_in(
        &format!("{PUBLIC}/../t2/Patient/p1"),
        "Patient",
        "p1"
    ));
    // Same host, different scheme.
    assert!(!is_in(
        "http://proxy.example/t1/Patient/p1",
        "Patient",
        "p1"
    ));
    // The base itself with a trailing segment missing.
    assert!(!is_in(PUBLIC, "Patient", "p1"));
    // No bases configured: every absolute reference is foreign.
    assert!(!reference_is(
        &format!("{PUBLIC}/Patient/p1"),
        &cref("Patient", "p1"),
        &[]
    ));
}

#[test]
fn reference_contained_refused() {
    assert!(!is_in("#p1", "Patient", "p1"));
    assert!(!is_in("#", "Patient", "p1"));
    assert!(!is_in("Patient/#p1", "Patient", "p1"));
}

#[test]
fn reference_ids_compared_whole() {
    assert!(!is_in("Patient/p10", "Patient", "p1"));
    assert!(!is_in("Patient/p1x", "Patient", "p1"));
    assert!(!is_in("Patient/p", "Patient", "p1"));
    assert!(!is_in("Patient/P1", "Patient", "p1"));
    assert!(!is_in(&format!("{PUBLIC}/Patient/p10"), "Patient", "p1"));
}

#[test]
fn reference_trailing_garbage_refused() {
    assert!(!is_in("Patient/p1/foo", "Patient", "p1"));
    assert!(!is_in("Patient/p1/", "Patient", "p1"));
    assert!(!is_in("Patient/p1?x=1", "Patient", "p1"));
    assert!(!is_in("Patient/p1#x", "Patient", "p1"));
    assert!(!is_in("Patient/p1 ", "Patient", "p1"));
}

#[test]
fn reference_other_shapes_refused() {
    assert!(!is_in("", "Patient", "p1"));
    assert!(!is_in("Patient", "Patient", "p1"));
    assert!(!is_in("Patient/", "Patient", "p1"));
    assert!(!is_in("/Patient/p1", "Patient", "p1"));
    assert!(!is_in("//proxy.example/t1/Patient/p1", "Patient", "p1"));
    assert!(!is_in("patient/p1", "Patient", "p1"));
    assert!(!is_in("Group/p1", "Patient", "p1"));
    assert!(!is_in("Patient?identifier=x|1", "Patient", "p1"));
    assert!(!is_in(
        "urn:uuid:0f4f0c1a-0000-4000-8000-000000000001",
        "Patient",
        "p1"
    ));
}

#[test]
fn reference_type_must_match_owner() {
    assert!(is_in("Practitioner/pr1", "Practitioner", "pr1"));
    assert!(!is_in("Patient/pr1", "Practitioner", "pr1"));
    assert!(!is_in("PractitionerRole/pr1", "Practitioner", "pr1"));
}

// ---------------------------------------------------------------------------------
// from_json and the small index
// ---------------------------------------------------------------------------------

#[test]
fn from_json_records_params_as_listed() {
    let idx = small_index();
    assert_eq!(
        idx.params(ResourceType::PATIENT, rt("Observation")),
        ["subject", "performer"]
    );
    assert_eq!(
        idx.params(ResourceType::PATIENT, rt("AllergyIntolerance")),
        ["patient"]
    );
    assert!(
        idx.params(ResourceType::PATIENT, rt("Medication"))
            .is_empty()
    );
    assert!(idx.params(rt("Device"), rt("Observation")).is_empty());
}

#[test]
fn from_json_links_only_with_expressions() {
    let idx = small_index();
    assert!(idx.links_type(ResourceType::PATIENT, rt("Observation")));
    assert!(idx.links_type(ResourceType::PATIENT, rt("CarePlan")));
    // Listed, but no expression resolves: no links.
    assert!(!idx.links_type(ResourceType::PATIENT, rt("Condition")));
    assert_eq!(
        idx.params(ResourceType::PATIENT, rt("Condition")),
        ["no-expression"]
    );
    // Not listed with params.
    assert!(!idx.links_type(ResourceType::PATIENT, rt("Medication")));
    // The compartment's own type always links.
    assert!(idx.links_type(ResourceType::PRACTITIONER, ResourceType::PRACTITIONER));
    assert!(idx.links_type(rt("Device"), rt("Device")));
}

#[test]
fn from_json_accepts_a_bundle_of_search_parameters() {
    let sps = json!({
        "resourceType": "Bundle",
        "entry": [
            {"resource": {"code": "subject", "base": ["Observation"],
                          "expression": "Observation.subject"}},
            {"fullUrl": "no resource"}
        ]
    });
    let defs = [json!({
        "code": "Patient",
        "resource": [{"code": "Observation", "param": ["subject"]}]
    })];
    let idx = CompartmentIndex::from_json(&defs, &sps).unwrap();
    assert!(idx.links_type(ResourceType::PATIENT, rt("Observation")));
    assert!(idx.contains(
        &cref("Patient", "p1"),
        rt("Observation"),
        &json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}),
        &BASES
    ));
}

#[test]
fn from_json_ignores_unusable_search_parameters() {
    let sps = json!([
        {"code": "subject", "expression": "Observation.subject"},
        {"base": ["Observation"], "expression": "Observation.subject"},
        {"code": "subject", "base": ["Observation"]},
        {"code": "subject", "base": [7, null], "expression": "Observation.subject"},
        "not an object"
    ]);
    let defs = [json!({
        "code": "Patient",
        "resource": [{"code": "Observation", "param": ["subject"]}]
    })];
    let idx = CompartmentIndex::from_json(&defs, &sps).unwrap();
    assert!(!idx.links_type(ResourceType::PATIENT, rt("Observation")));
    assert_eq!(
        idx.params(ResourceType::PATIENT, rt("Observation")),
        ["subject"]
    );
}

#[test]
fn from_json_search_parameters_of_other_shapes_give_no_links() {
    let defs = [json!({
        "code": "Patient",
        "resource": [{"code": "Observation", "param": ["subject"]}]
    })];
    for sps in [
        json!(null),
        json!("x"),
        json!({"resourceType": "SearchParameter"}),
    ] {
        let idx = CompartmentIndex::from_json(&defs, &sps).unwrap();
        assert!(!idx.links_type(ResourceType::PATIENT, rt("Observation")));
    }
}

#[test]
fn from_json_refuses_definition_without_valid_code() {
    let sps = json!([]);
    for def in [
        json!({"resource": []}),
        json!({"code": "patient", "resource": []}),
        json!({"code": "NotAType"}),
        json!({"code": 1}),
    ] {
        assert!(
            CompartmentIndex::from_json(std::slice::from_ref(&def), &sps).is_err(),
            "{def}"
        );
    }
}

#[test]
fn from_json_empty_input_is_an_empty_index() {
    let idx = CompartmentIndex::from_json(&[], &json!([])).unwrap();
    assert!(!idx.links_type(ResourceType::PATIENT, rt("Observation")));
    assert!(idx.links_type(ResourceType::PATIENT, ResourceType::PATIENT));
    assert!(!idx.contains(
        &cref("Patient", "p1"),
        rt("Observation"),
        &json!({"subject": {"reference": "Patient/p1"}}),
        &BASES
    ));
}

#[test]
fn small_index_contains_observation_via_subject_and_performer() {
    let idx = small_index();
    let c = cref("Patient", "p1");
    let obs = |field: &str, reference: &str| {
        let mut o = json!({"resourceType": "Observation", "id": "o1"});
        o[field] = json!({"reference": reference});
        o
    };
    assert!(idx.contains(&c, rt("Observation"), &obs("subject", "Patient/p1"), &BASES));
    // `performer` is an array in R4; a single object works as well.
    assert!(idx.contains(
        &c,
        rt("Observation"),
        &obs("performer", "Patient/p1"),
        &BASES
    ));
    assert!(!idx.contains(&c, rt("Observation"), &obs("subject", "Patient/p2"), &BASES));
    // Fields the index does not name do not link.
    assert!(!idx.contains(&c, rt("Observation"), &obs("focus", "Patient/p1"), &BASES));
}

#[test]
fn small_index_type_without_params_never_contains() {
    let idx = small_index();
    let med = json!({"resourceType": "Medication", "subject": {"reference": "Patient/p1"}});
    assert!(!idx.contains(&cref("Patient", "p1"), rt("Medication"), &med, &BASES));
}

// ---------------------------------------------------------------------------------
// The shipped (official) index
// ---------------------------------------------------------------------------------

#[test]
fn official_loads() {
    assert!(CompartmentIndex::official().is_ok());
}

#[test]
fn official_shipped_files_are_not_placeholders() {
    for d in DEFINITIONS.iter().chain([&SEARCH_PARAMETERS]) {
        assert!(!d.contains("_placeholder"));
    }
}

#[test]
fn official_patient_observation_params() {
    let params = OFFICIAL.params(ResourceType::PATIENT, rt("Observation"));
    assert!(params.iter().any(|p| p == "subject"), "{params:?}");
    assert!(params.iter().any(|p| p == "performer"), "{params:?}");
}

#[test]
fn official_patient_allergy_params() {
    let params = OFFICIAL.params(ResourceType::PATIENT, rt("AllergyIntolerance"));
    for p in ["patient", "recorder", "asserter"] {
        assert!(params.iter().any(|x| x == p), "{p} in {params:?}");
    }
}

#[test]
fn official_links_type() {
    assert!(!OFFICIAL.links_type(ResourceType::PATIENT, rt("Medication")));
    assert!(!OFFICIAL.links_type(ResourceType::PATIENT, rt("Organization")));
    assert!(!OFFICIAL.links_type(ResourceType::PATIENT, ResourceType::PRACTITIONER));
    assert!(OFFICIAL.links_type(ResourceType::PATIENT, rt("Observation")));
    assert!(OFFICIAL.links_type(ResourceType::PATIENT, ResourceType::PATIENT));
    assert!(OFFICIAL.links_type(ResourceType::PRACTITIONER, rt("Observation")));
    assert!(OFFICIAL.links_type(ResourceType::PRACTITIONER, ResourceType::PATIENT));
    assert!(OFFICIAL.links_type(ResourceType::PRACTITIONER, ResourceType::PRACTITIONER));
    assert!(OFFICIAL.links_type(ResourceType::RELATED_PERSON, rt("Observation")));
    assert!(OFFICIAL.links_type(rt("Encounter"), rt("Observation")));
    assert!(OFFICIAL.links_type(rt("Encounter"), rt("Encounter")));
    assert!(!OFFICIAL.links_type(rt("Encounter"), ResourceType::PATIENT));
}

#[test]
fn official_every_listed_param_resolves_to_a_path() {
    // `{def}` (the compartment's own resource) is the only parameter without a
    // SearchParameter; every other listed one must yield a path of its own, or
    // compartment searches would match records that the filter then always drops.
    let sps: Value = serde_json::from_str(SEARCH_PARAMETERS).unwrap();
    let list = search_parameter_list(&sps);
    let mut checked = 0;
    for ((owner, rt), params) in &OFFICIAL.params {
        for p in params.iter().filter(|p| *p != "{def}") {
            let sp = list
                .iter()
                .find(|sp| {
                    sp["code"] == p.as_str()
                        && sp["base"]
                            .as_array()
                            .is_some_and(|b| b.iter().any(|b| b == rt.as_str()))
                })
                .unwrap_or_else(|| panic!("no SearchParameter `{p}` for {rt} ({owner})"));
            let expr = sp["expression"].as_str().unwrap();
            assert!(
                !paths_for(*rt, expr).is_empty(),
                "{owner} / {rt} / {p}: `{expr}`"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn official_paths_are_sorted_and_unique() {
    for (key, links) in &OFFICIAL.links {
        let mut sorted = links.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(&sorted, links, "{key:?}");
    }
}

#[test]
fn official_observation_subject_and_performer() {
    let c = cref("Patient", "p1");
    let by_subject = json!({
        "resourceType": "Observation", "id": "o1",
        "subject": {"reference": "Patient/p1"}
    });
    let by_performer = json!({
        "resourceType": "Observation", "id": "o2",
        "subject": {"reference": "Patient/p2"},
        "performer": [{"reference": "Practitioner/pr1"}, {"reference": "Patient/p1"}]
    });
    let other = json!({
        "resourceType": "Observation", "id": "o3",
        "subject": {"reference": "Patient/p2"},
        "performer": [{"reference": "Practitioner/pr1"}]
    });
    assert!(OFFICIAL.contains(&c, rt("Observation"), &by_subject, &BASES));
    assert!(OFFICIAL.contains(&c, rt("Observation"), &by_performer, &BASES));
    assert!(!OFFICIAL.contains(&c, rt("Observation"), &other, &BASES));
    // The other patient sees both o2 (as subject) and o3.
    let c2 = cref("Patient", "p2");
    assert!(OFFICIAL.contains(&c2, rt("Observation"), &by_performer, &BASES));
    assert!(OFFICIAL.contains(&c2, rt("Observation"), &other, &BASES));
}

#[test]
fn official_observation_subject_absolute_and_versioned() {
    let c = cref("Patient", "p1");
    for reference in [
        format!("{PUBLIC}/Patient/p1"),
        format!("{UPSTREAM}/Patient/p1"),
        "Patient/p1/_history/3".to_owned(),
    ] {
        let obs = json!({"resourceType": "Observation", "subject": {"reference": reference}});
        assert!(
            OFFICIAL.contains(&c, rt("Observation"), &obs, &BASES),
            "{reference}"
        );
    }
    let foreign = json!({
        "resourceType": "Observation",
        "subject": {"reference": "https://elsewhere.example/fhir/Patient/p1"}
    });
    assert!(!OFFICIAL.contains(&c, rt("Observation"), &foreign, &BASES));
}

#[test]
fn official_observation_subject_of_other_type_with_same_id() {
    // The `where(resolve() is Patient)` filter is dropped from the path; the type in
    // the reference is what keeps a Group with the same id out.
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Group/p1"}});
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Observation"), &obs, &BASES));
}

#[test]
fn official_allergy_patient_recorder_asserter() {
    let c = cref("Patient", "p1");
    for field in ["patient", "recorder", "asserter"] {
        let mut a = json!({
            "resourceType": "AllergyIntolerance", "id": "a1",
            "patient": {"reference": "Patient/p2"}
        });
        a[field] = json!({"reference": "Patient/p1"});
        assert!(
            OFFICIAL.contains(&c, rt("AllergyIntolerance"), &a, &BASES),
            "{field}"
        );
    }
    let a = json!({
        "resourceType": "AllergyIntolerance",
        "patient": {"reference": "Patient/p2"},
        "recorder": {"reference": "Practitioner/p1"}
    });
    assert!(!OFFICIAL.contains(&c, rt("AllergyIntolerance"), &a, &BASES));
    // In the Practitioner compartment through `recorder`.
    assert!(OFFICIAL.contains(
        &cref("Practitioner", "p1"),
        rt("AllergyIntolerance"),
        &a,
        &BASES
    ));
}

#[test]
fn official_encounter() {
    let e = json!({
        "resourceType": "Encounter", "id": "e1",
        "subject": {"reference": "Patient/p1"},
        "participant": [
            {"individual": {"reference": "Practitioner/pr1"}},
            {"individual": {"reference": "RelatedPerson/rp1"}}
        ]
    });
    assert!(OFFICIAL.contains(&cref("Patient", "p1"), rt("Encounter"), &e, &BASES));
    assert!(!OFFICIAL.contains(&cref("Patient", "p2"), rt("Encounter"), &e, &BASES));
    assert!(OFFICIAL.contains(&cref("Practitioner", "pr1"), rt("Encounter"), &e, &BASES));
    assert!(OFFICIAL.contains(&cref("RelatedPerson", "rp1"), rt("Encounter"), &e, &BASES));
    assert!(!OFFICIAL.contains(&cref("Practitioner", "pr2"), rt("Encounter"), &e, &BASES));
    // The Encounter compartment holds the Encounter itself.
    assert!(OFFICIAL.contains(&cref("Encounter", "e1"), rt("Encounter"), &e, &BASES));
    assert!(!OFFICIAL.contains(&cref("Encounter", "e2"), rt("Encounter"), &e, &BASES));
}

#[test]
fn official_patient_itself() {
    let p = json!({"resourceType": "Patient", "id": "p1"});
    assert!(OFFICIAL.contains(&cref("Patient", "p1"), ResourceType::PATIENT, &p, &BASES));
    assert!(!OFFICIAL.contains(&cref("Patient", "p10"), ResourceType::PATIENT, &p, &BASES));
    assert!(!OFFICIAL.contains(&cref("Patient", "p"), ResourceType::PATIENT, &p, &BASES));
}

#[test]
fn official_own_id_matters_only_for_the_owner_type() {
    // An Observation whose id happens to equal the patient's id is not in it.
    let o = json!({"resourceType": "Observation", "id": "p1",
                   "subject": {"reference": "Patient/p2"}});
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Observation"), &o, &BASES));
    // A Patient without an id, or with a non-string id, is not the owner.
    for p in [
        json!({"resourceType": "Patient"}),
        json!({"resourceType": "Patient", "id": 1}),
        json!({"resourceType": "Patient", "id": null}),
    ] {
        assert!(!OFFICIAL.contains(&cref("Patient", "p1"), ResourceType::PATIENT, &p, &BASES));
    }
}

#[test]
fn official_patient_linking_via_link_other() {
    let p2 = json!({
        "resourceType": "Patient", "id": "p2",
        "link": [
            {"other": {"reference": "Patient/p9"}, "type": "seealso"},
            {"other": {"reference": "Patient/p1"}, "type": "replaces"}
        ]
    });
    assert!(OFFICIAL.contains(&cref("Patient", "p1"), ResourceType::PATIENT, &p2, &BASES));
    assert!(OFFICIAL.contains(&cref("Patient", "p9"), ResourceType::PATIENT, &p2, &BASES));
    assert!(!OFFICIAL.contains(&cref("Patient", "p3"), ResourceType::PATIENT, &p2, &BASES));
    // `link.other` naming a RelatedPerson puts the Patient in that compartment.
    let p3 = json!({
        "resourceType": "Patient", "id": "p3",
        "link": [{"other": {"reference": "RelatedPerson/rp1"}, "type": "seealso"}]
    });
    assert!(OFFICIAL.contains(
        &cref("RelatedPerson", "rp1"),
        ResourceType::PATIENT,
        &p3,
        &BASES
    ));
}

#[test]
fn official_patient_in_practitioner_compartment_via_general_practitioner() {
    let p = json!({
        "resourceType": "Patient", "id": "p1",
        "generalPractitioner": [{"reference": "Practitioner/pr1"}]
    });
    assert!(OFFICIAL.contains(
        &cref("Practitioner", "pr1"),
        ResourceType::PATIENT,
        &p,
        &BASES
    ));
    assert!(!OFFICIAL.contains(
        &cref("Practitioner", "pr2"),
        ResourceType::PATIENT,
        &p,
        &BASES
    ));
}

#[test]
fn official_identifier_only_reference_never_links() {
    let o = json!({
        "resourceType": "Observation",
        "subject": {
            "identifier": {"system": "urn:mrn", "value": "p1"},
            "display": "Patient/p1"
        }
    });
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Observation"), &o, &BASES));
}

#[test]
fn official_contained_reference_never_links() {
    let o = json!({
        "resourceType": "Observation",
        "contained": [{"resourceType": "Patient", "id": "p1"}],
        "subject": {"reference": "#p1"}
    });
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Observation"), &o, &BASES));
}

#[test]
fn official_contained_resources_are_not_walked() {
    // A contained Observation that names the patient does not pull its container in.
    let o = json!({
        "resourceType": "Observation",
        "subject": {"reference": "Patient/p2"},
        "contained": [{
            "resourceType": "Observation", "id": "c1",
            "subject": {"reference": "Patient/p1"}
        }]
    });
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Observation"), &o, &BASES));
}

#[test]
fn official_nested_array_paths() {
    let cp = json!({
        "resourceType": "CarePlan",
        "subject": {"reference": "Group/g1"},
        "activity": [
            {"detail": {"performer": [{"reference": "Practitioner/pr1"}]}},
            {"detail": {"performer": [{"reference": "Patient/p1"}]}}
        ]
    });
    assert!(OFFICIAL.contains(&cref("Patient", "p1"), rt("CarePlan"), &cp, &BASES));
    assert!(OFFICIAL.contains(&cref("Practitioner", "pr1"), rt("CarePlan"), &cp, &BASES));
    assert!(!OFFICIAL.contains(&cref("Patient", "p2"), rt("CarePlan"), &cp, &BASES));
}

#[test]
fn official_provenance_via_target() {
    let prov = json!({
        "resourceType": "Provenance",
        "target": [{"reference": "Observation/o1"}, {"reference": "Patient/p1/_history/4"}]
    });
    assert!(OFFICIAL.contains(&cref("Patient", "p1"), rt("Provenance"), &prov, &BASES));
    let prov = json!({"resourceType": "Provenance", "target": [{"reference": "Observation/o1"}]});
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Provenance"), &prov, &BASES));
}

#[test]
fn official_medication_never_in_patient_compartment() {
    let m = json!({"resourceType": "Medication", "id": "m1",
                   "subject": {"reference": "Patient/p1"}});
    assert!(!OFFICIAL.contains(&cref("Patient", "p1"), rt("Medication"), &m, &BASES));
}

#[test]
fn official_malformed_shapes_do_not_link() {
    let c = cref("Patient", "p1");
    for o in [
        json!(null),
        json!("Patient/p1"),
        json!({"subject": "Patient/p1"}),
        json!({"subject": {"reference": 1}}),
        json!({"subject": {"reference": ["Patient/p1"]}}),
        json!({"subject": {"reference": null}}),
    ] {
        assert!(!OFFICIAL.contains(&c, rt("Observation"), &o, &BASES), "{o}");
    }
}

#[test]
fn official_device_request_code_reference_path_is_known() {
    assert!(OFFICIAL.links_type(rt("Device"), rt("DeviceRequest")));
}

#[test]
fn official_device_request_in_device_compartment_via_code_reference() {
    let dr = json!({
        "resourceType": "DeviceRequest", "id": "dr1",
        "codeReference": {"reference": "Device/d1"},
        "subject": {"reference": "Patient/p1"}
    });
    assert!(OFFICIAL.contains(&cref("Device", "d1"), rt("DeviceRequest"), &dr, &BASES));
}

mod exact_ids {
    use super::*;
    use proptest::prelude::*;

    /// An id close to `p1`: the ids a sloppy comparison would confuse with it.
    fn near_p1() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("p1".to_owned()),
            Just("P1".to_owned()),
            Just("p10".to_owned()),
            Just("p".to_owned()),
            Just("1".to_owned()),
            Just("xp1".to_owned()),
            Just("p1-".to_owned()),
            Just("p1.".to_owned()),
            "[A-Za-z0-9.-]{1,64}",
            "p1[A-Za-z0-9.-]{0,3}",
            "[A-Za-z0-9.-]{0,3}p1",
        ]
    }

    /// How a reference to `Patient/{id}` may be written: relative, versioned, absolute
    /// under either local base, or under a foreign base (never local).
    fn written(id: &str, how: u8) -> (String, bool) {
        match how % 5 {
            0 => (format!("Patient/{id}"), true),
            1 => (format!("Patient/{id}/_history/3"), true),
            2 => (format!("{PUBLIC}/Patient/{id}"), true),
            3 => (format!("{UPSTREAM}/Patient/{id}"), true),
            _ => (
                format!("https://elsewhere.example/fhir/Patient/{id}"),
                false,
            ),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// `Patient/p1` never matches another id: an Observation is in p1's
        /// compartment exactly when a linking reference names p1 itself, whether the
        /// record is read as a value or as text.
        #[test]
        fn patient_p1_never_matches_another_id(id in near_p1(), how in any::<u8>(), field in 0usize..2) {
            let (reference, local) = written(&id, how);
            let member = ["subject", "performer"][field];
            let record = json!({"resourceType": "Observation", "id": "o1",
                                member: {"reference": reference}});
            let text = record.to_string();
            let answer = crate::fhir::answer::read(&text).unwrap();
            let expected = local && id == "p1";
            let c = cref("Patient", "p1");
            prop_assert_eq!(OFFICIAL.contains(&c, rt("Observation"), &record, &BASES), expected, "{}", reference);
            prop_assert_eq!(OFFICIAL.contains(&c, rt("Observation"), &answer.resource, &BASES), expected, "{}", reference);
        }
    }
}
