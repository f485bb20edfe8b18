//! The `Patient/$match` input: the `Parameters` body read and bounded, and the
//! weight of the Patient it carries under the HL7 IDI IG's weighting (pure).
//!
//! FHIR R4 `Patient/$match` takes `resource` (1..1, a Patient), `count` (0..1, an
//! integer) and `onlyCertainMatches` (0..1, a boolean). Anything else, repeated,
//! of another type, or larger than the bounds below is refused (400) before the
//! upstream sees anything.
//!
//! The weight follows the IDI IG 1.0.0 (STU1) invariants `idi-L0` / `idi-L1`
//! (<http://hl7.org/fhir/us/identity-matching/STU1/patient-matching.html>): passport
//! number 10; driver's licence or state id 10; 4 for any of a home address with line
//! and city, a phone or email, another typed identifier (SSN, MRN, member id, ...) or
//! a photo (4 at most for the group); given and family name 4; birth date 2.
//! `IDI-Patient-L0` needs 10, `IDI-Patient-L1` 20; the base `IDI-Patient` only one
//! identifying element (invariant `idi-1`).

use serde_json::Value;

use super::MatchError;
use crate::config::MatchInputLevel;

/// Largest `Parameters` body read (a Patient for matching is a few KB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most entries of one Patient list element (`identifier`, `name`, `telecom`,
/// `address`) in the input.
pub const MAX_LIST: usize = 20;

/// A validated `$match` request.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchInput {
    /// The Patient to match (a JSON object with `resourceType: Patient`).
    pub patient: Value,
    /// `count`: most matches to return (`None`: the server decides).
    pub count: Option<usize>,
    /// `onlyCertainMatches`.
    pub only_certain: bool,
}

/// Reads the `Parameters` body of a `Patient/$match` request.
pub fn parse_parameters(body: &[u8]) -> Result<MatchInput, MatchError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(MatchError::Parameters(format!(
            "the `Parameters` body is larger than {MAX_BODY_BYTES} bytes"
        )));
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| {
        MatchError::Parameters("the body is not a JSON `Parameters` resource".into())
    })?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(MatchError::Parameters(
            "the body must be a FHIR `Parameters` resource".into(),
        ));
    }
    let params = match v.get("parameter") {
        None => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => {
            return Err(MatchError::Parameters(
                "`Parameters.parameter` must be an array".into(),
            ));
        }
    };
    let (mut resource, mut count, mut only_certain) = (None, None, None);
    for p in params {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        match name {
            "resource" => {
                if resource.is_some() {
                    return Err(MatchError::Resource(
                        "`resource` is given more than once".into(),
                    ));
                }
                let r = p.get("resource").ok_or_else(|| {
                    MatchError::Resource("`resource` must carry a Patient resource".into())
                })?;
                if r.get("resourceType").and_then(Value::as_str) != Some("Patient") {
                    return Err(MatchError::Resource("`resource` must be a Patient".into()));
                }
                resource = Some(r.clone());
            }
            "count" => {
                if count.is_some() {
                    return Err(MatchError::Count);
                }
                let n = p
                    .get("valueInteger")
                    .and_then(Value::as_u64)
                    .filter(|n| *n >= 1)
                    .ok_or(MatchError::Count)?;
                count = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "onlyCertainMatches" => {
                if only_certain.is_some() {
                    return Err(MatchError::OnlyCertain);
                }
                only_certain = Some(
                    p.get("valueBoolean")
                        .and_then(Value::as_bool)
                        .ok_or(MatchError::OnlyCertain)?,
                );
            }
            other => {
                return Err(MatchError::Parameters(format!(
                    "unknown parameter `{}`",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    let patient = resource.ok_or_else(|| MatchError::Resource("`resource` is missing".into()))?;
    for list in ["identifier", "name", "telecom", "address"] {
        match patient.get(list) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.len() <= MAX_LIST => {}
            Some(Value::Array(_)) => {
                return Err(MatchError::Resource(format!(
                    "`Patient.{list}` has more than {MAX_LIST} entries"
                )));
            }
            Some(_) => {
                return Err(MatchError::Resource(format!(
                    "`Patient.{list}` must be an array"
                )));
            }
        }
    }
    Ok(MatchInput {
        patient,
        count,
        only_certain: only_certain.unwrap_or(false),
    })
}

/// The input's weight under the IDI weighting, and the groups it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weight {
    pub total: u32,
    /// What would add weight, as the IG names it, with its weight.
    pub missing: Vec<&'static str>,
    /// Some identifying element is present (`idi-1`, the base profile).
    pub any: bool,
}

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn has_str(v: &Value, key: &str) -> bool {
    v.get(key)
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty())
}

/// The `type.coding[].code`s of an identifier.
fn type_codes(identifier: &Value) -> impl Iterator<Item = &str> {
    identifier
        .get("type")
        .map(|t| items(t, "coding"))
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str))
}

fn has_typed_identifier(p: &Value, codes: &[&str]) -> bool {
    items(p, "identifier").any(|i| has_str(i, "value") && type_codes(i).any(|c| codes.contains(&c)))
}

/// The weight of `patient` as `idi-L0`/`idi-L1` compute it.
pub fn weigh(patient: &Value) -> Weight {
    let mut total = 0;
    let mut missing = Vec::new();
    let passport = has_typed_identifier(patient, &["PPN"]);
    if passport {
        total += 10;
    } else {
        missing.push("a passport number (identifier type `PPN`, 10)");
    }
    let licence = has_typed_identifier(patient, &["DL", "STID"]);
    if licence {
        total += 10;
    } else {
        missing.push("a driver's licence or state id number (identifier type `DL` or `STID`, 10)");
    }
    let home_address = items(patient, "address").any(|a| {
        a.get("use").and_then(Value::as_str) == Some("home")
            && items(a, "line").any(|l| l.as_str().is_some_and(|s| !s.trim().is_empty()))
            && has_str(a, "city")
    });
    let other_identifier = items(patient, "identifier").any(|i| {
        has_str(i, "value") && type_codes(i).any(|c| c != "PPN" && c != "DL" && c != "STID")
    });
    let telecom = items(patient, "telecom").any(|t| {
        matches!(
            t.get("system").and_then(Value::as_str),
            Some("phone" | "email")
        ) && has_str(t, "value")
    });
    let photo = items(patient, "photo").next().is_some();
    if home_address || other_identifier || telecom || photo {
        total += 4;
    } else {
        missing.push(
            "a home address with line and city, a phone or email, another typed identifier such as SSN or MRN, or a photo (4)",
        );
    }
    let full_name = items(patient, "name").any(|n| has_str(n, "family"))
        && items(patient, "name")
            .any(|n| items(n, "given").any(|g| g.as_str().is_some_and(|s| !s.trim().is_empty())));
    if full_name {
        total += 4;
    } else {
        missing.push("given and family name (4)");
    }
    let birth_date = has_str(patient, "birthDate");
    if birth_date {
        total += 2;
    } else {
        missing.push("birth date (2)");
    }
    let any = items(patient, "identifier").next().is_some()
        || items(patient, "telecom").next().is_some()
        || full_name
        || home_address
        || birth_date;
    Weight {
        total,
        missing,
        any,
    }
}

/// Refuses input too weak for `level`, saying what it weighs and what would add weight.
pub fn check_weight(patient: &Value, level: MatchInputLevel) -> Result<Weight, MatchError> {
    let w = weigh(patient);
    let enough = match level {
        MatchInputLevel::Base => w.any,
        MatchInputLevel::L0 | MatchInputLevel::L1 => w.total >= level.min_weight(),
    };
    if enough {
        Ok(w)
    } else {
        Err(MatchError::InputTooWeak {
            level: level.name(),
            weight: w.total,
            required: level.min_weight(),
            missing: w.missing.join("; "),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(parameter: Value) -> Vec<u8> {
        json!({"resourceType": "Parameters", "parameter": parameter})
            .to_string()
            .into_bytes()
    }

    fn patient() -> Value {
        json!({"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}], "birthDate": "1980-01-01"})
    }

    #[test]
    fn a_valid_request_is_read() {
        let body = params(json!([
            {"name": "resource", "resource": patient()},
            {"name": "count", "valueInteger": 3},
            {"name": "onlyCertainMatches", "valueBoolean": true}
        ]));
        let m = parse_parameters(&body).unwrap();
        assert_eq!(m.patient, patient());
        assert_eq!(m.count, Some(3));
        assert!(m.only_certain);
        let m = parse_parameters(&params(
            json!([{"name": "resource", "resource": patient()}]),
        ))
        .unwrap();
        assert_eq!((m.count, m.only_certain), (None, false));
    }

    #[test]
    fn bad_input_is_refused_with_its_reason() {
        let reason = |body: &[u8]| parse_parameters(body).unwrap_err().reason();
        assert_eq!(reason(b"not json"), "match_parameters_invalid");
        assert_eq!(
            reason(br#"{"resourceType":"Patient"}"#),
            "match_parameters_invalid"
        );
        assert_eq!(
            reason(br#"{"resourceType":"Parameters","parameter":{}}"#),
            "match_parameters_invalid"
        );
        assert_eq!(reason(&params(json!([]))), "match_resource_invalid");
        assert_eq!(
            reason(&params(
                json!([{"name": "resource", "resource": patient()}, {"name": "resource", "resource": patient()}])
            )),
            "match_resource_invalid"
        );
        assert_eq!(
            reason(&params(
                json!([{"name": "resource", "resource": {"resourceType": "Observation"}}])
            )),
            "match_resource_invalid"
        );
        assert_eq!(
            reason(&params(json!([{"name": "resource"}]))),
            "match_resource_invalid"
        );
        for count in [
            json!({"valueInteger": 0}),
            json!({"valueInteger": -1}),
            json!({"valueInteger": 1.5}),
            json!({"valueString": "3"}),
        ] {
            let mut c = count.clone();
            c["name"] = json!("count");
            assert_eq!(
                reason(&params(
                    json!([{"name": "resource", "resource": patient()}, c])
                )),
                "match_count_invalid",
                "{count}"
            );
        }
        assert_eq!(
            reason(&params(
                json!([{"name": "resource", "resource": patient()}, {"name": "count", "valueInteger": 1}, {"name": "count", "valueInteger": 2}])
            )),
            "match_count_invalid"
        );
        assert_eq!(
            reason(&params(
                json!([{"name": "resource", "resource": patient()}, {"name": "onlyCertainMatches", "valueString": "true"}])
            )),
            "match_only_certain_invalid"
        );
        assert_eq!(
            reason(&params(
                json!([{"name": "resource", "resource": patient()}, {"name": "limit", "valueInteger": 1}])
            )),
            "match_parameters_invalid"
        );
        let mut many = patient();
        many["identifier"] = json!(vec![json!({"value": "x"}); MAX_LIST + 1]);
        assert_eq!(
            reason(&params(json!([{"name": "resource", "resource": many}]))),
            "match_resource_invalid"
        );
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(reason(&huge), "match_parameters_invalid");
    }

    fn identifier(code: &str, value: &str) -> Value {
        json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": code}]}, "system": "urn:x", "value": value})
    }

    #[test]
    fn the_weight_follows_the_idi_table() {
        assert_eq!(weigh(&patient()).total, 6, "name 4 + birth date 2");
        let mut p = patient();
        p["telecom"] = json!([{"system": "phone", "value": "555-0100"}, {"system": "email", "value": "j@example.org"}]);
        assert_eq!(weigh(&p).total, 10, "phone and email count once (4)");
        p["identifier"] = json!([identifier("MR", "m1"), identifier("SS", "123-45-6789")]);
        assert_eq!(weigh(&p).total, 10, "the 4 group is capped at 4");
        p["identifier"] = json!([identifier("PPN", "X1"), identifier("DL", "D1")]);
        assert_eq!(weigh(&p).total, 10 + 10 + 4 + 4 + 2);
        // Untyped identifiers, addresses without use `home`, or without a city add nothing.
        let p = json!({"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}],
            "address": [{"line": ["1 Main St"], "city": "X"}, {"use": "home", "line": ["1 Main St"]}]});
        let w = weigh(&p);
        assert_eq!(w.total, 0);
        assert!(w.any, "an identifier is an identifying element");
        // A type without a value adds nothing.
        let p = json!({"resourceType": "Patient", "identifier": [{"type": {"coding": [{"code": "PPN"}]}}]});
        assert_eq!(weigh(&p).total, 0);
        assert!(!weigh(&json!({"resourceType": "Patient", "gender": "female"})).any);
    }

    #[test]
    fn weak_input_is_refused_saying_what_is_missing() {
        let e = check_weight(&patient(), MatchInputLevel::L0).unwrap_err();
        assert_eq!(e.reason(), "match_input_too_weak");
        let text = e.to_string();
        assert!(text.contains("weighs 6"), "{text}");
        assert!(text.contains("`IDI-Patient-L0` requires 10"), "{text}");
        assert!(text.contains("passport"), "{text}");
        assert!(!text.contains("birth date"), "present: {text}");
        assert!(check_weight(&patient(), MatchInputLevel::Base).is_ok());
        let mut p = patient();
        p["identifier"] = json!([identifier("MR", "m1")]);
        assert_eq!(check_weight(&p, MatchInputLevel::L0).unwrap().total, 10);
        assert!(check_weight(&p, MatchInputLevel::L1).is_err());
        p["identifier"] = json!([identifier("PPN", "X1"), identifier("MR", "m1")]);
        assert_eq!(check_weight(&p, MatchInputLevel::L1).unwrap().total, 20);
        let empty = json!({"resourceType": "Patient"});
        assert!(check_weight(&empty, MatchInputLevel::Base).is_err());
    }
}
