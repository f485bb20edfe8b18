use std::sync::LazyLock;

use serde_json::{Value, json};

use super::*;

const PUBLIC: &str = "https://proxy.example/t1";
const UPSTREAM: &str = "http://127.0.0.1:8081/fhir";
const BASES: [&str; 2] = [PUBLIC, UPSTREAM];

const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const LOINC: &str = "http://loinc.org";

static INDEX: LazyLock<SearchParamIndex> =
    LazyLock::new(|| SearchParamIndex::official().expect("shipped search parameters load"));

use Evaluation::{Match, NoMatch, Unsupported};

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

/// Evaluates `name=value` on `resource` (its type from `resourceType`).
fn eval(resource: &Value, name: &str, value: &str) -> Evaluation {
    let t = rt(resource["resourceType"].as_str().unwrap());
    satisfies(&INDEX, t, resource, name, value, &BASES)
}

fn observation(category: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "meta": {
            "profile": ["http://example.org/StructureDefinition/lab-obs"],
            "tag": [{"system": "http://example.org/tags", "code": "reviewed"}],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}]
        },
        "category": [
            {"coding": [{"system": CATEGORY, "code": category, "display": "x"}]},
            {"text": "free text only"}
        ],
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}], "text": "Glucose"},
        "subject": {"reference": "Patient/p1"},
        "performer": [
            {"reference": "Practitioner/pr1"},
            {"reference": "RelatedPerson/rp1/_history/3"}
        ],
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
             "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "123"}]}},
            {"code": {"coding": [{"code": "no-system-code"}]}}
        ]
    })
}

fn lab() -> Value {
    observation("laboratory")
}

fn vitals() -> Value {
    observation("vital-signs")
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "gender": "female",
        "identifier": [
            {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"},
            {"value": "no-system-id"}
        ],
        "telecom": [
            {"system": "phone", "value": "555-0100", "use": "home"},
            {"system": "email", "value": "jane@example.org"}
        ],
        "name": [{"family": "Smith", "given": ["Jane", "Q"], "prefix": ["Dr"]},
                 {"text": "José Álvarez"}],
        "address": [{"line": ["1 Main Street"], "city": "Springfield", "postalCode": "12345"}],
        "generalPractitioner": [{"reference": "Practitioner/pr1"}],
        "link": [{"other": {"identifier": {"value": "logical-only"}}, "type": "seealso"}]
    })
}

// ---------------------------------------------------------------------------------
// the index
// ---------------------------------------------------------------------------------

#[test]
fn official_index_loads_every_core_parameter() {
    assert!(SearchParamIndex::official().is_ok());
    assert!(INDEX.knows(rt("Observation"), "category"));
    assert!(
        INDEX.knows(rt("Observation"), "code"),
        "multi-base clinical-code"
    );
    assert!(INDEX.knows(rt("Patient"), "name"));
    // Resource-level parameters apply to every type.
    for t in ["Observation", "Patient", "Bundle", "Medication"] {
        assert!(INDEX.knows(rt(t), "_id"), "{t}");
        assert!(INDEX.knows(rt(t), "_tag"), "{t}");
    }
    assert!(!INDEX.knows(rt("Observation"), "nope"));
    assert!(!INDEX.knows(rt("Patient"), "category"));
}

#[test]
fn shipped_file_is_compact_and_holds_only_core_parameters() {
    assert!(SEARCH_PARAMETERS_ALL.len() < 1024 * 1024);
    let v: Value = serde_json::from_str(SEARCH_PARAMETERS_ALL).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1376);
    for sp in list {
        let keys: Vec<&str> = sp.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            keys.iter()
                .all(|k| ["code", "base", "type", "expression", "target"].contains(k)),
            "{keys:?}"
        );
    }
    // The examples package's own example parameters (`example` redefines `_id` with
    // the expression `id`) are left out.
    let ids: Vec<&Value> = list.iter().filter(|sp| sp["code"] == "_id").collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0]["expression"], "Resource.id");
}

#[test]
fn from_json_refuses_unknown_bases_and_non_arrays() {
    let err = SearchParamIndex::from_json(&json!([
        {"code": "x", "base": ["NotAType"], "type": "token", "expression": "NotAType.x"}
    ]))
    .unwrap_err();
    assert_eq!(err, "search parameter `x`: unknown base `NotAType`");
    assert!(SearchParamIndex::from_json(&json!({})).is_err());
    assert!(SearchParamIndex::from_json(&json!([{"base": ["Patient"]}])).is_err());
}

#[test]
fn an_empty_index_evaluates_nothing() {
    let empty = SearchParamIndex::default();
    let e = satisfies(
        &empty,
        rt("Observation"),
        &lab(),
        "category",
        "laboratory",
        &BASES,
    );
    assert_eq!(e, Unsupported);
}

// ---------------------------------------------------------------------------------
// expressions
// ---------------------------------------------------------------------------------

fn field(name: &str) -> Step {
    Step::Field(name.to_owned())
}

fn member(s: &str) -> Option<(String, Part)> {
    parse_member(s).map(|(h, p)| (h.to_owned(), p))
}

#[test]
fn member_paths_are_parsed() {
    let (head, part) = member("Observation.component.code").unwrap();
    assert_eq!(head, "Observation");
    assert_eq!(part.steps, [field("component"), field("code")]);
    assert_eq!(part.target, None);

    let (_, part) = member("Observation.subject.where(resolve() is Patient)").unwrap();
    assert_eq!(part.steps, [field("subject")]);
    assert_eq!(part.target, Some(rt("Patient")));

    for cast in [
        "(Observation.value as CodeableConcept)",
        "Observation.value as CodeableConcept",
        "Observation.value.as(CodeableConcept)",
        "Observation.value.ofType(CodeableConcept)",
    ] {
        let (_, part) = member(cast).unwrap();
        assert_eq!(part.steps, [field("valueCodeableConcept")], "{cast}");
    }
    let (_, part) = member("(Observation.value as CodeableConcept).text").unwrap();
    assert_eq!(part.steps, [field("valueCodeableConcept"), field("text")]);
    let (_, part) = member("Condition.onset.as(string)").unwrap();
    assert_eq!(part.steps, [field("onsetString")]);

    let (_, part) = member("Patient.telecom.where(system='phone')").unwrap();
    assert_eq!(
        part.steps,
        [
            field("telecom"),
            Step::WhereEq("system".to_owned(), "phone".to_owned())
        ]
    );
    let (_, part) = member("Library.relatedArtifact.where(type='composed-of').resource").unwrap();
    assert_eq!(part.steps.len(), 3);
}

#[test]
fn other_expressions_are_not_understood() {
    for expr in [
        "Patient.deceased.exists() and Patient.deceased != false",
        "Bundle.entry[0].resource",
        "Observation",
        "Patient.extension('http://example.org/x')",
        "Observation.subject.where(resolve() is Patient).display",
        "Observation.subject.where(resolve() is NotAType)",
        "Patient.telecom.where(system!='phone')",
        "Observation.value as CodeableConcept as Coding",
        "",
    ] {
        assert!(member(expr).is_none(), "{expr}");
    }
}

#[test]
fn members_of_other_types_are_skipped_and_unknown_ones_make_a_parameter_partial() {
    let p = Param::compile(
        Kind::Reference,
        "CarePlan",
        "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient)",
    );
    assert_eq!(p.parts.len(), 1);
    assert!(!p.partial);
    let p = Param::compile(
        Kind::Token,
        "Patient",
        "Patient.deceased.exists() and Patient.deceased != false",
    );
    assert!(p.parts.is_empty());
    assert!(p.partial);
    let p = Param::compile(
        Kind::Token,
        "Patient",
        "Patient.gender | Patient.x.exists()",
    );
    assert_eq!(p.parts.len(), 1);
    assert!(p.partial);
    // Types never evaluated are not compiled.
    let p = Param::compile(Kind::Other, "Observation", "Observation.effective");
    assert!(p.parts.is_empty());
}

// ---------------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------------

#[test]
fn token_system_and_code_on_codeable_concepts() {
    let sys_code = format!("{CATEGORY}|laboratory");
    assert_eq!(eval(&lab(), "category", &sys_code), Match);
    assert_eq!(eval(&vitals(), "category", &sys_code), NoMatch);
    // Same code, another system.
    assert_eq!(
        eval(&lab(), "category", "http://other.example/cs|laboratory"),
        NoMatch
    );
}

#[test]
fn token_code_only_matches_any_system() {
    assert_eq!(eval(&lab(), "category", "laboratory"), Match);
    assert_eq!(eval(&vitals(), "category", "laboratory"), NoMatch);
    assert_eq!(eval(&lab(), "code", "2339-0"), Match);
    // Codes are compared exactly, and `display`/`text` are not codes.
    assert_eq!(eval(&lab(), "category", "Laboratory"), NoMatch);
    assert_eq!(eval(&lab(), "category", "x"), NoMatch);
    assert_eq!(eval(&lab(), "code", "Glucose"), NoMatch);
}

#[test]
fn token_system_only_and_no_system_forms() {
    assert_eq!(eval(&lab(), "category", &format!("{CATEGORY}|")), Match);
    assert_eq!(
        eval(&lab(), "category", "http://other.example/cs|"),
        NoMatch
    );
    // `|code`: a coding without a system.
    assert_eq!(eval(&lab(), "category", "|laboratory"), NoMatch);
    assert_eq!(eval(&lab(), "component-code", "|no-system-code"), Match);
    assert_eq!(eval(&lab(), "component-code", "|8480-6"), NoMatch);
}

#[test]
fn token_on_nested_codeable_concepts() {
    // Observation.component.code: arrays flatten through every level.
    assert_eq!(
        eval(&lab(), "component-code", &format!("{LOINC}|8480-6")),
        Match
    );
    // combo-code is the union of code and component.code.
    assert_eq!(eval(&lab(), "combo-code", "8480-6"), Match);
    assert_eq!(eval(&lab(), "combo-code", "2339-0"), Match);
    assert_eq!(eval(&lab(), "combo-code", "0000-0"), NoMatch);
    // Choice element through a cast: component.valueCodeableConcept.
    assert_eq!(
        eval(
            &lab(),
            "component-value-concept",
            "http://snomed.info/sct|123"
        ),
        Match
    );
    assert_eq!(eval(&lab(), "value-concept", "123"), NoMatch);
    let with_value = json!({
        "resourceType": "Observation",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]}
    });
    assert_eq!(eval(&with_value, "value-concept", "260385009"), Match);
    assert_eq!(eval(&with_value, "combo-value-concept", "260385009"), Match);
}

#[test]
fn token_on_codings_primitives_and_booleans() {
    // Coding (meta.tag, meta.security), through the Resource-level parameters.
    assert_eq!(
        eval(&lab(), "_tag", "http://example.org/tags|reviewed"),
        Match
    );
    assert_eq!(eval(&lab(), "_tag", "reviewed"), Match);
    assert_eq!(
        eval(&lab(), "_tag", "http://example.org/other|reviewed"),
        NoMatch
    );
    assert_eq!(eval(&lab(), "_security", "HTEST"), Match);
    // code and id primitives: the plain form only.
    assert_eq!(eval(&lab(), "status", "final"), Match);
    assert_eq!(eval(&lab(), "status", "preliminary"), NoMatch);
    assert_eq!(eval(&lab(), "_id", "obs-1"), Match);
    assert_eq!(eval(&lab(), "_id", "obs-10"), NoMatch);
    assert_eq!(
        eval(
            &lab(),
            "status",
            "http://hl7.org/fhir/observation-status|final"
        ),
        Unsupported
    );
    assert_eq!(eval(&patient(), "gender", "female"), Match);
    assert_eq!(eval(&patient(), "active", "true"), Match);
    assert_eq!(eval(&patient(), "active", "false"), NoMatch);
    let inactive = json!({"resourceType": "Patient", "active": false});
    assert_eq!(eval(&inactive, "active", "false"), Match);
}

#[test]
fn token_on_identifiers() {
    let p = patient();
    assert_eq!(
        eval(&p, "identifier", "urn:oid:1.2.36.146.595.217.0.1|12345"),
        Match
    );
    assert_eq!(eval(&p, "identifier", "12345"), Match);
    assert_eq!(eval(&p, "identifier", "urn:oid:9.9|12345"), NoMatch);
    assert_eq!(
        eval(&p, "identifier", "urn:oid:1.2.36.146.595.217.0.1|"),
        Match
    );
    assert_eq!(eval(&p, "identifier", "|no-system-id"), Match);
    assert_eq!(eval(&p, "identifier", "|12345"), NoMatch);
}

#[test]
fn token_on_contact_points() {
    let p = patient();
    assert_eq!(eval(&p, "telecom", "555-0100"), Match);
    assert_eq!(eval(&p, "telecom", "jane@example.org"), Match);
    assert_eq!(eval(&p, "phone", "555-0100"), Match);
    // `where(system='phone')` filters: an email is not a phone.
    assert_eq!(eval(&p, "phone", "jane@example.org"), NoMatch);
    assert_eq!(eval(&p, "email", "jane@example.org"), Match);
    // A ContactPoint's system is a kind, not a code system: not evaluated.
    assert_eq!(eval(&p, "telecom", "phone|555-0100"), Unsupported);
    assert_eq!(eval(&p, "telecom", "phone|000"), Unsupported);
}

// ---------------------------------------------------------------------------------
// reference
// ---------------------------------------------------------------------------------

#[test]
fn reference_type_and_id() {
    let o = lab();
    assert_eq!(eval(&o, "subject", "Patient/p1"), Match);
    assert_eq!(eval(&o, "subject", "Patient/p10"), NoMatch);
    assert_eq!(eval(&o, "subject", "Group/p1"), NoMatch);
    assert_eq!(eval(&o, "subject", "p1"), Match);
    assert_eq!(eval(&o, "subject", "p"), NoMatch);
    assert_eq!(eval(&o, "performer", "Practitioner/pr1"), Match);
    // Versioned references in the resource count.
    assert_eq!(eval(&o, "performer", "RelatedPerson/rp1"), Match);
    assert_eq!(eval(&o, "performer", "rp1"), Match);
    assert_eq!(
        eval(&patient(), "general-practitioner", "Practitioner/pr1"),
        Match
    );
}

#[test]
fn reference_forms_in_the_resource() {
    let with = |reference: &str| json!({"resourceType": "Observation", "subject": {"reference": reference}});
    for local in [
        "Patient/p1".to_owned(),
        "Patient/p1/_history/2".to_owned(),
        format!("{PUBLIC}/Patient/p1"),
        format!("{UPSTREAM}/Patient/p1/_history/1"),
    ] {
        assert_eq!(
            eval(&with(&local), "subject", "Patient/p1"),
            Match,
            "{local}"
        );
    }
    for other in [
        "#p1",
        "https://other.example/fhir/Patient/p1",
        "urn:uuid:p1",
        "Patient/p1/_history/",
        "Patient/p1/x",
        "Patient/",
    ] {
        assert_eq!(
            eval(&with(other), "subject", "Patient/p1"),
            NoMatch,
            "{other}"
        );
    }
    // Identifier-only and display-only references never match.
    let logical = json!({"resourceType": "Observation",
        "subject": {"identifier": {"value": "p1"}, "display": "Patient/p1"}});
    assert_eq!(eval(&logical, "subject", "Patient/p1"), NoMatch);
    assert_eq!(eval(&logical, "subject", "p1"), NoMatch);
}

#[test]
fn reference_target_filter_of_the_expression() {
    // `patient` is `Observation.subject.where(resolve() is Patient)`.
    let group = json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}});
    assert_eq!(eval(&group, "subject", "g1"), Match);
    assert_eq!(eval(&group, "patient", "g1"), NoMatch);
    assert_eq!(eval(&group, "patient", "Group/g1"), NoMatch);
    assert_eq!(eval(&lab(), "patient", "p1"), Match);
    assert_eq!(eval(&lab(), "patient", "Patient/p1"), Match);
}

#[test]
fn reference_values_beyond_type_and_id_are_unsupported() {
    for value in [
        "http://127.0.0.1:8081/fhir/Patient/p1",
        "Patient/p1/_history/1",
        "NotAType/p1",
        "Patient/",
        "http://example.org/canonical|1.0",
        "p 1",
    ] {
        assert_eq!(eval(&lab(), "subject", value), Unsupported, "{value}");
    }
}

// ---------------------------------------------------------------------------------
// string, uri
// ---------------------------------------------------------------------------------

#[test]
fn string_is_a_case_insensitive_prefix_match() {
    let p = patient();
    assert_eq!(eval(&p, "family", "Smith"), Match);
    assert_eq!(eval(&p, "family", "smi"), Match);
    assert_eq!(eval(&p, "family", "SMITH"), Match);
    assert_eq!(eval(&p, "family", "mith"), NoMatch, "prefix, not substring");
    assert_eq!(eval(&p, "family", "Smithers"), NoMatch);
    assert_eq!(eval(&p, "given", "q"), Match);
    assert_eq!(eval(&p, "address-city", "spring"), Match);
}

#[test]
fn string_on_human_names_and_addresses_searches_their_parts() {
    let p = patient();
    for value in ["smith", "jane", "q", "dr", "josé", "JOSÉ Álv"] {
        assert_eq!(eval(&p, "name", value), Match, "{value}");
    }
    assert_eq!(eval(&p, "name", "doe"), NoMatch);
    assert_eq!(
        eval(&p, "name", "álvarez"),
        NoMatch,
        "the text's prefix only"
    );
    // Accent-sensitive: narrower than a server that folds accents, never wider.
    assert_eq!(eval(&p, "name", "jose"), NoMatch);
    assert_eq!(eval(&p, "address", "1 main"), Match);
    assert_eq!(eval(&p, "address", "springf"), Match);
    assert_eq!(eval(&p, "address", "12345"), Match);
    assert_eq!(eval(&p, "address", "main"), NoMatch);
}

#[test]
fn string_through_a_cast() {
    let o = json!({"resourceType": "Observation", "valueString": "Positive result"});
    assert_eq!(eval(&o, "value-string", "positive"), Match);
    assert_eq!(eval(&o, "value-string", "negative"), NoMatch);
    let o = json!({"resourceType": "Observation",
        "valueCodeableConcept": {"text": "Negative"}});
    assert_eq!(eval(&o, "value-string", "neg"), Match);
}

#[test]
fn uri_is_exact() {
    let o = lab();
    let profile = "http://example.org/StructureDefinition/lab-obs";
    assert_eq!(eval(&o, "_profile", profile), Match);
    assert_eq!(
        eval(&o, "_profile", "http://example.org/StructureDefinition/lab"),
        NoMatch
    );
    assert_eq!(eval(&o, "_profile", &profile.to_uppercase()), NoMatch);
    let sourced = json!({"resourceType": "Observation", "meta": {"source": "urn:sys#1"}});
    assert_eq!(eval(&sourced, "_source", "urn:sys#1"), Match);
    assert_eq!(eval(&sourced, "_source", "urn:sys"), NoMatch);
}

// ---------------------------------------------------------------------------------
// OR lists, escapes, absent elements
// ---------------------------------------------------------------------------------

#[test]
fn comma_separated_values_are_alternatives() {
    let both = format!("{CATEGORY}|vital-signs,{CATEGORY}|laboratory");
    assert_eq!(eval(&lab(), "category", &both), Match);
    assert_eq!(eval(&vitals(), "category", &both), Match);
    assert_eq!(eval(&lab(), "category", "exam,imaging"), NoMatch);
    assert_eq!(eval(&lab(), "subject", "Patient/p2,Patient/p1"), Match);
    // One decidable match wins over an undecidable alternative ...
    assert_eq!(eval(&lab(), "status", "x|final,final"), Match);
    // ... but without one, the list is undecidable.
    assert_eq!(eval(&lab(), "status", "x|final,amended"), Unsupported);
    // An empty alternative is malformed.
    assert_eq!(eval(&lab(), "category", "laboratory,"), Unsupported);
    assert_eq!(eval(&lab(), "category", ",laboratory"), Unsupported);
}

#[test]
fn escapes_are_honoured() {
    let o = json!({"resourceType": "Observation",
        "code": {"coding": [{"system": "urn:x", "code": "a,b|c$d\\e"}]}});
    assert_eq!(eval(&o, "code", "urn:x|a\\,b\\|c\\$d\\\\e"), Match);
    assert_eq!(eval(&o, "code", "a\\,b\\|c\\$d\\\\e"), Match);
    // Unescaped, the comma splits and the pipe separates a system.
    assert_eq!(eval(&o, "code", "a,b|c$d\\\\e"), NoMatch);
    // Unknown escapes and a dangling backslash are malformed.
    assert_eq!(eval(&o, "code", "a\\x"), Unsupported);
    assert_eq!(eval(&o, "code", "a\\"), Unsupported);
    assert_eq!(eval(&o, "code", "a|b|c"), Unsupported);
    assert_eq!(eval(&o, "code", "|"), Unsupported);
}

#[test]
fn absent_elements_do_not_match() {
    let bare = json!({"resourceType": "Observation", "id": "o"});
    for (name, value) in [
        ("category", "laboratory"),
        ("category", &format!("{CATEGORY}|laboratory") as &str),
        ("code", "2339-0"),
        ("subject", "Patient/p1"),
        ("patient", "p1"),
        ("value-string", "x"),
        ("_tag", "reviewed"),
        ("_profile", "http://x"),
    ] {
        assert_eq!(eval(&bare, name, value), NoMatch, "{name}={value}");
    }
    // A text-only CodeableConcept carries no token.
    let text_only = json!({"resourceType": "Observation", "category": [{"text": "laboratory"}]});
    assert_eq!(eval(&text_only, "category", "laboratory"), NoMatch);
    // Odd shapes are not guessed at.
    let odd = json!({"resourceType": "Observation", "category": [42]});
    assert_eq!(eval(&odd, "category", "42"), Unsupported);
}

// ---------------------------------------------------------------------------------
// unsupported
// ---------------------------------------------------------------------------------

#[test]
fn modifiers_and_chains_are_unsupported() {
    let o = lab();
    for (name, value) in [
        ("category:not", "laboratory"),
        ("category:text", "Laboratory"),
        ("category:in", "http://example.org/vs"),
        ("category:below", "laboratory"),
        ("subject:missing", "false"),
        ("subject:Patient", "p1"),
        ("subject.name", "Smith"),
        ("subject:Patient.name", "Smith"),
        ("_has:Provenance:target:agent", "Practitioner/pr1"),
    ] {
        assert_eq!(eval(&o, name, value), Unsupported, "{name}={value}");
    }
    assert_eq!(eval(&patient(), "name:exact", "Smith"), Unsupported);
    assert_eq!(eval(&patient(), "name:contains", "mit"), Unsupported);
}

#[test]
fn other_parameter_types_and_unknown_parameters_are_unsupported() {
    let o = lab();
    for (name, value) in [
        ("date", "2024-01-15"),
        ("_lastUpdated", "gt2024-01-01"),
        ("value-quantity", "5.4|http://unitsofmeasure.org|mmol/L"),
        ("code-value-concept", "2339-0$123"),
        ("combo-code-value-quantity", "2339-0$5"),
        ("_text", "glucose"),
        ("_content", "glucose"),
        ("_filter", "status eq final"),
        ("nope", "x"),
        ("gender", "female"),
    ] {
        assert_eq!(eval(&o, name, value), Unsupported, "{name}={value}");
    }
    assert_eq!(eval(&patient(), "birthdate", "2000"), Unsupported);
    // A token parameter whose expression is beyond the supported subset.
    assert_eq!(eval(&patient(), "deceased", "true"), Unsupported);
}

// ---------------------------------------------------------------------------------
// conjunctions
// ---------------------------------------------------------------------------------

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

fn all(resource: &Value, constraints: &[(&str, &str)]) -> Evaluation {
    let t = rt(resource["resourceType"].as_str().unwrap());
    satisfies_all(&INDEX, t, resource, &pairs(constraints), &BASES)
}

#[test]
fn a_scopes_constraints_are_a_conjunction() {
    let o = lab();
    assert_eq!(all(&o, &[]), Match, "unconstrained");
    assert_eq!(
        all(&o, &[("category", "laboratory"), ("code", "2339-0")]),
        Match
    );
    assert_eq!(
        all(&o, &[("category", "laboratory"), ("code", "0000-0")]),
        NoMatch
    );
    assert_eq!(
        all(&o, &[("category", "laboratory"), ("date", "2024")]),
        Unsupported
    );
    // A definite NoMatch decides even next to an undecidable constraint.
    assert_eq!(
        all(&o, &[("date", "2024"), ("category", "vital-signs")]),
        NoMatch
    );
}
