//! `score` mode, pure: which candidate searches an input asks for, how a candidate is
//! scored and graded, the `searchset` the scores become, and the limits (`count`,
//! `onlyCertainMatches`) applied to what the answer check released.
//!
//! Weighting (points; a candidate's score is its points over [`MAX_POINTS`], clamped
//! to 0..1). Names, emails and address parts are compared case-insensitively with
//! whitespace and punctuation removed, phones by their digits:
//!
//! | element | agrees | disagrees (both present) |
//! | --- | --- | --- |
//! | identifier (same `system` and `value`) | +6 | -4 (same `system`, other value) |
//! | family name | +2 | -1 |
//! | given name (first given of the input) | +2 (+1 initial only) | -1 |
//! | birth date | +3 | -3 |
//! | gender | +1 | -1 |
//! | phone or email | +2 | 0 |
//! | address (first line, and postal code or city) | +2 | 0 |
//!
//! Grades: `certain` from 12 points, `probable` from 9, `possible` from 6, else
//! `certainly-not` (never returned).

use std::collections::HashSet;

use serde_json::{Value, json};

/// The most points a candidate can get (every row agreeing).
pub const MAX_POINTS: i32 = 18;
/// Most candidate searches per request.
pub const MAX_SEARCHES: usize = 8;
/// The `match-grade` extension (FHIR R4) on `entry.search`.
pub const MATCH_GRADE: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grade {
    CertainlyNot,
    Possible,
    Probable,
    Certain,
}

impl Grade {
    pub fn of(points: i32) -> Grade {
        match points {
            p if p >= 12 => Grade::Certain,
            p if p >= 9 => Grade::Probable,
            p if p >= 6 => Grade::Possible,
            _ => Grade::CertainlyNot,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Grade::Certain => "certain",
            Grade::Probable => "probable",
            Grade::Possible => "possible",
            Grade::CertainlyNot => "certainly-not",
        }
    }
}

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Lowercase letters and digits only.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Escapes a value for a FHIR search parameter (`,` `$` `|` `\`).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, ',' | '$' | '|' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn families(p: &Value) -> Vec<String> {
    items(p, "name")
        .filter_map(|n| str_of(n, "family"))
        .map(norm)
        .filter(|s| !s.is_empty())
        .collect()
}

fn givens(p: &Value) -> Vec<String> {
    items(p, "name")
        .flat_map(|n| items(n, "given"))
        .filter_map(Value::as_str)
        .map(norm)
        .filter(|s| !s.is_empty())
        .collect()
}

/// (system, value) of identifiers with a value.
fn identifiers(p: &Value) -> Vec<(Option<&str>, &str)> {
    items(p, "identifier")
        .filter_map(|i| Some((str_of(i, "system"), str_of(i, "value")?)))
        .collect()
}

/// Normalized phones (digits) and emails (lowercase), as `phone:`/`email:` keys.
fn telecoms(p: &Value) -> HashSet<String> {
    items(p, "telecom")
        .filter_map(|t| {
            let v = str_of(t, "value")?;
            match t.get("system").and_then(Value::as_str) {
                Some("phone") | Some("sms") => {
                    let d = digits(v);
                    (d.len() >= 4).then(|| format!("phone:{d}"))
                }
                Some("email") => Some(format!("email:{}", v.to_lowercase())),
                _ => None,
            }
        })
        .collect()
}

/// (first line, postal code, city) of each address, normalized.
fn addresses(p: &Value) -> Vec<(String, String, String)> {
    items(p, "address")
        .filter_map(|a| {
            let line = items(a, "line").find_map(Value::as_str).map(norm)?;
            (!line.is_empty()).then(|| {
                (
                    line,
                    str_of(a, "postalCode").map(norm).unwrap_or_default(),
                    str_of(a, "city").map(norm).unwrap_or_default(),
                )
            })
        })
        .collect()
}

/// The candidate searches for `input` (Patient search parameters, without `_count`
/// and without any narrowing), at most [`MAX_SEARCHES`], in a fixed order: each
/// identifier, family and birth date, given and family, given and birth date, each
/// phone and email.
pub fn candidate_searches(input: &Value) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = Vec::new();
    let p = |k: &str, v: String| (k.to_owned(), v);
    for (system, value) in identifiers(input) {
        let v = match system {
            Some(s) => format!("{}|{}", escape(s), escape(value)),
            None => escape(value),
        };
        out.push(vec![p("identifier", v)]);
    }
    let family = items(input, "name").find_map(|n| str_of(n, "family"));
    let given = items(input, "name")
        .flat_map(|n| items(n, "given"))
        .find_map(|g| g.as_str().map(str::trim).filter(|s| !s.is_empty()));
    let birth = str_of(input, "birthDate");
    if let (Some(f), Some(b)) = (family, birth) {
        out.push(vec![p("family", escape(f)), p("birthdate", escape(b))]);
    }
    if let (Some(g), Some(f)) = (given, family) {
        out.push(vec![p("given", escape(g)), p("family", escape(f))]);
    }
    if let (Some(g), Some(b)) = (given, birth) {
        out.push(vec![p("given", escape(g)), p("birthdate", escape(b))]);
    }
    for t in items(input, "telecom") {
        let Some(v) = str_of(t, "value") else {
            continue;
        };
        match t.get("system").and_then(Value::as_str) {
            Some("phone") => out.push(vec![p("phone", escape(v))]),
            Some("email") => out.push(vec![p("email", escape(v))]),
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    out.retain(|s| seen.insert(s.clone()));
    out.truncate(MAX_SEARCHES);
    out
}

/// Points of `candidate` against `input` (see the module's table).
pub fn points(input: &Value, candidate: &Value) -> i32 {
    let mut points = 0;
    // Identifiers: one agreement is enough; a disagreement counts only without one.
    let (ids_in, ids_c) = (identifiers(input), identifiers(candidate));
    let agree = ids_in
        .iter()
        .any(|(s, v)| s.is_some() && ids_c.iter().any(|(cs, cv)| cs == s && cv == v));
    let conflict = ids_in
        .iter()
        .any(|(s, v)| s.is_some() && ids_c.iter().any(|(cs, cv)| cs == s && cv != v));
    if agree {
        points += 6;
    } else if conflict {
        points -= 4;
    }
    let (fam_in, fam_c) = (families(input), families(candidate));
    if !fam_in.is_empty() && !fam_c.is_empty() {
        points += if fam_in.iter().any(|f| fam_c.contains(f)) {
            2
        } else {
            -1
        };
    }
    let (giv_in, giv_c) = (givens(input), givens(candidate));
    if let (Some(first), false) = (giv_in.first(), giv_c.is_empty()) {
        let initial = first.chars().next();
        points += if giv_c.contains(first) {
            2
        } else if giv_c.iter().any(|g| {
            (g.chars().count() == 1 || first.chars().count() == 1) && g.chars().next() == initial
        }) {
            1
        } else {
            -1
        };
    }
    if let (Some(a), Some(b)) = (str_of(input, "birthDate"), str_of(candidate, "birthDate")) {
        points += if a == b { 3 } else { -3 };
    }
    let known = |g: &str| g == "male" || g == "female";
    if let (Some(a), Some(b)) = (str_of(input, "gender"), str_of(candidate, "gender"))
        && known(a)
        && known(b)
    {
        points += if a == b { 1 } else { -1 };
    }
    if !telecoms(input).is_disjoint(&telecoms(candidate)) {
        points += 2;
    }
    let addr_c = addresses(candidate);
    let same_address = addresses(input).iter().any(|(line, zip, city)| {
        addr_c.iter().any(|(l, z, c)| {
            l == line && ((!zip.is_empty() && z == zip) || (!city.is_empty() && c == city))
        })
    });
    if same_address {
        points += 2;
    }
    points
}

/// The score in 0..1 for `points`, to three decimals.
pub fn score_of(points: i32) -> f64 {
    let clamped = points.clamp(0, MAX_POINTS);
    (f64::from(clamped) * 1000.0 / f64::from(MAX_POINTS)).round() / 1000.0
}

/// One scored candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub id: String,
    pub resource: Value,
    pub points: i32,
}

/// Adds the Patients of a candidate search's `searchset` to `into` (new ids only, at
/// most `max` in all). `false` when the answer is no Bundle.
pub fn collect_candidates(bundle: &Value, into: &mut Vec<(String, Value)>, max: usize) -> bool {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return false;
    }
    for entry in items(bundle, "entry") {
        if into.len() >= max {
            break;
        }
        let Some(r) = entry.get("resource") else {
            continue;
        };
        if r.get("resourceType").and_then(Value::as_str) != Some("Patient") {
            continue;
        }
        let Some(id) = r.get("id").and_then(Value::as_str) else {
            continue;
        };
        if into.iter().any(|(seen, _)| seen == id) {
            continue;
        }
        into.push((id.to_owned(), r.clone()));
    }
    true
}

/// Scores every candidate, drops the `certainly-not` ones, and sorts by score
/// (ties by id).
pub fn rank(input: &Value, candidates: Vec<(String, Value)>) -> Vec<Scored> {
    let mut out: Vec<Scored> = candidates
        .into_iter()
        .map(|(id, resource)| Scored {
            points: points(input, &resource),
            id,
            resource,
        })
        .filter(|s| Grade::of(s.points) != Grade::CertainlyNot)
        .collect();
    out.sort_by(|a, b| b.points.cmp(&a.points).then_with(|| a.id.cmp(&b.id)));
    out
}

/// The `searchset` of scored candidates, as the upstream would have sent it (its
/// base in `fullUrl`), for the answer check. No `total`, no links.
pub fn searchset(upstream_base: &str, scored: &[Scored]) -> Value {
    let entries: Vec<Value> = scored
        .iter()
        .map(|s| {
            json!({
                "fullUrl": format!("{upstream_base}/Patient/{}", s.id),
                "resource": s.resource,
                "search": {
                    "extension": [{"url": MATCH_GRADE, "valueCode": Grade::of(s.points).code()}],
                    "mode": "match",
                    "score": score_of(s.points)
                }
            })
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entries})
}

/// The `match-grade` code of a Bundle entry.
fn grade_of(entry: &Value) -> Option<&str> {
    entry
        .get("search")
        .map(|s| items(s, "extension"))
        .into_iter()
        .flatten()
        .find(|x| x.get("url").and_then(Value::as_str) == Some(MATCH_GRADE))
        .and_then(|x| x.get("valueCode").and_then(Value::as_str))
}

/// Applies `onlyCertainMatches` and `count` to a checked `searchset` (only released
/// entries are left in it, so neither depends on a hidden candidate): with
/// `only_certain` only `certain` matches stay; then the first `count` matches. Removes
/// `total` and `link`, which could count or point at more than is shown. `None`: not
/// a Bundle.
pub fn limit(mut bundle: Value, count: Option<usize>, only_certain: bool) -> Option<Value> {
    let obj = bundle.as_object_mut()?;
    if obj.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return None;
    }
    obj.remove("total");
    obj.remove("link");
    if let Some(Value::Array(entries)) = obj.get_mut("entry") {
        let mut matches = 0usize;
        entries.retain(|e| {
            let is_match = e
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str)
                .is_none_or(|m| m == "match");
            if !is_match {
                return true;
            }
            if only_certain && grade_of(e) != Some("certain") {
                return false;
            }
            matches += 1;
            count.is_none_or(|c| matches <= c)
        });
        if entries.is_empty() {
            obj.remove("entry");
        }
    }
    Some(bundle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jane() -> Value {
        json!({"resourceType": "Patient",
            "identifier": [{"system": "urn:mrn", "value": "M-1"}],
            "name": [{"family": "Doe", "given": ["Jane", "Q"]}],
            "gender": "female", "birthDate": "1980-01-01",
            "telecom": [{"system": "phone", "value": "(555) 010-0100"}, {"system": "email", "value": "Jane@Example.org"}],
            "address": [{"use": "home", "line": ["1 Main St."], "city": "Springfield", "postalCode": "12345"}]})
    }

    #[test]
    fn agreeing_elements_add_their_points() {
        let me = jane();
        assert_eq!(points(&me, &me), MAX_POINTS, "every row agrees");
        assert_eq!(score_of(points(&me, &me)), 1.0);
        let name_and_birth = json!({"resourceType": "Patient", "name": [{"family": "DOE", "given": ["jane"]}], "birthDate": "1980-01-01"});
        assert_eq!(points(&me, &name_and_birth), 7);
        assert_eq!(Grade::of(7), Grade::Possible);
        let mut with_phone = name_and_birth.clone();
        with_phone["telecom"] = json!([{"system": "phone", "value": "555-010-0100"}]);
        assert_eq!(points(&me, &with_phone), 9, "phones compared by digits");
        assert_eq!(Grade::of(9), Grade::Probable);
        let mut with_id = with_phone.clone();
        with_id["identifier"] = json!([{"system": "urn:mrn", "value": "M-1"}]);
        assert_eq!(points(&me, &with_id), 15);
        assert_eq!(Grade::of(15), Grade::Certain);
    }

    #[test]
    fn disagreeing_elements_cost_points() {
        let me = jane();
        let other = json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "M-2"}],
            "name": [{"family": "Doe", "given": ["John"]}], "gender": "male", "birthDate": "1990-05-05"});
        assert_eq!(points(&me, &other), -4 + 2 - 1 - 3 - 1);
        assert_eq!(score_of(points(&me, &other)), 0.0);
        assert_eq!(Grade::of(points(&me, &other)), Grade::CertainlyNot);
        let initial =
            json!({"resourceType": "Patient", "name": [{"family": "Doe", "given": ["J"]}]});
        assert_eq!(points(&me, &initial), 2 + 1);
        // An identifier of another system says nothing.
        let foreign = json!({"resourceType": "Patient", "identifier": [{"system": "urn:other", "value": "M-2"}]});
        assert_eq!(points(&me, &foreign), 0);
    }

    #[test]
    fn grades_have_fixed_thresholds() {
        assert_eq!(Grade::of(12), Grade::Certain);
        assert_eq!(Grade::of(11), Grade::Probable);
        assert_eq!(Grade::of(8), Grade::Possible);
        assert_eq!(Grade::of(5), Grade::CertainlyNot);
        assert_eq!(score_of(-3), 0.0);
        assert_eq!(score_of(99), 1.0);
        assert_eq!(score_of(12), 0.667);
    }

    #[test]
    fn candidate_searches_are_escaped_deduplicated_and_bounded() {
        let s = candidate_searches(&jane());
        let flat: Vec<String> = s
            .iter()
            .map(|q| {
                q.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            })
            .collect();
        assert_eq!(
            flat,
            [
                "identifier=urn:mrn|M-1",
                "family=Doe&birthdate=1980-01-01",
                "given=Jane&family=Doe",
                "given=Jane&birthdate=1980-01-01",
                "phone=(555) 010-0100",
                "email=Jane@Example.org"
            ]
        );
        let tricky = json!({"resourceType": "Patient", "identifier": [{"system": "urn:a,b", "value": "x|y$z\\"}]});
        assert_eq!(
            candidate_searches(&tricky)[0][0].1,
            "urn:a\\,b|x\\|y\\$z\\\\"
        );
        let many = json!({"resourceType": "Patient", "identifier": (0..20).map(|i| json!({"system": "urn:x", "value": i.to_string()})).collect::<Vec<_>>()});
        assert_eq!(candidate_searches(&many).len(), MAX_SEARCHES);
        assert!(
            candidate_searches(&json!({"resourceType": "Patient", "gender": "female"})).is_empty()
        );
    }

    #[test]
    fn candidates_are_collected_once_and_bounded() {
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "a"}},
            {"resource": {"resourceType": "Observation", "id": "o"}},
            {"resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": "a"}},
            {"resource": {"resourceType": "Patient", "id": "b"}},
            {"resource": {"resourceType": "Patient", "id": "c"}}
        ]});
        let mut into = Vec::new();
        assert!(collect_candidates(&b, &mut into, 2));
        let ids: Vec<&str> = into.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(!collect_candidates(
            &json!({"resourceType": "Patient"}),
            &mut into,
            9
        ));
    }

    #[test]
    fn ranking_sorts_by_score_and_drops_certain_non_matches() {
        let me = jane();
        let exact = me.clone();
        let near = json!({"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}], "birthDate": "1980-01-01"});
        let other = json!({"resourceType": "Patient", "name": [{"family": "Roe", "given": ["Max"]}], "birthDate": "1950-01-01"});
        let ranked = rank(
            &me,
            vec![
                ("n".into(), near.clone()),
                ("o".into(), other),
                ("e".into(), exact),
                ("m".into(), near),
            ],
        );
        let ids: Vec<&str> = ranked.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["e", "m", "n"], "ties by id");
        let b = searchset("http://up/fhir", &ranked);
        assert_eq!(b["entry"][0]["fullUrl"], "http://up/fhir/Patient/e");
        assert_eq!(b["entry"][0]["search"]["mode"], "match");
        assert_eq!(b["entry"][0]["search"]["score"], 1.0);
        assert_eq!(b["entry"][0]["search"]["extension"][0]["url"], MATCH_GRADE);
        assert_eq!(
            b["entry"][0]["search"]["extension"][0]["valueCode"],
            "certain"
        );
        assert_eq!(
            b["entry"][1]["search"]["extension"][0]["valueCode"],
            "possible"
        );
        assert!(b.get("total").is_none());
    }

    #[test]
    fn limits_apply_to_what_is_left() {
        let entry = |id: &str, grade: &str| {
            json!({"resource": {"resourceType": "Patient", "id": id},
            "search": {"mode": "match", "extension": [{"url": MATCH_GRADE, "valueCode": grade}]}})
        };
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 9, "link": [{"relation": "self", "url": "x"}],
            "entry": [entry("a", "certain"), entry("b", "probable"), entry("c", "certain"),
                      {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}}]});
        let ids = |v: &Value| -> Vec<String> {
            v["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["resource"]["id"].as_str().map(String::from))
                .collect()
        };
        let all = limit(b.clone(), None, false).unwrap();
        assert_eq!(ids(&all), ["a", "b", "c"]);
        assert!(all.get("total").is_none() && all.get("link").is_none());
        assert_eq!(ids(&limit(b.clone(), Some(2), false).unwrap()), ["a", "b"]);
        assert_eq!(ids(&limit(b.clone(), None, true).unwrap()), ["a", "c"]);
        assert_eq!(ids(&limit(b.clone(), Some(1), true).unwrap()), ["a"]);
        let none = json!({"resourceType": "Bundle", "entry": [entry("b", "probable")]});
        assert!(limit(none, None, true).unwrap().get("entry").is_none());
        assert!(limit(json!({"resourceType": "Patient"}), None, false).is_none());
    }
}
