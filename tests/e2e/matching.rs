//! `Patient/$match` end to end: the proxy binary against a real HAPI server of its own
//! (the candidates below, nothing else) and the real token issuer; the OpenFGA case
//! against the real OpenFGA server.
//!
//! The candidates, for the input "Jane Doe, female, born 1980-01-01, MRN `M-100`,
//! phone 555-0100" (weight 10: an MRN 4, name 4, birth date 2 = `IDI-Patient-L0`):
//! - `p1`: the same person (MRN, name, birth date, gender, phone, home address):
//!   18 points, `certain`; general practitioner `pr1`;
//! - `p2`: name, birth date, gender and phone, no MRN: 10, `probable`; `pr2`;
//! - `p10`: name, birth date and gender: 8, `possible`; `pr1`;
//! - `p3`: Janet Doe, male, born 1955 (found by `given=Jane&family=Doe`, HAPI's
//!   prefix match): -3, `certainly-not`, never returned; `pr1`;
//! - `px`: Max Roe, nobody's candidate.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::harness::{self, Answer, Proxy, tenant, tenants};
use crate::support::{self, FhirServer, FhirServerOptions};

const MATCH_GRADE: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";

fn fhir() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let gp = |pr: &str| json!([{"reference": format!("Practitioner/{pr}")}]);
        let patients = [
            json!({"resourceType": "Patient", "id": "p1",
                "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "urn:mrn", "value": "M-100"}],
                "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": "1980-01-01",
                "telecom": [{"system": "phone", "value": "555-0100"}],
                "address": [{"use": "home", "line": ["1 Main St"], "city": "Springfield", "postalCode": "12345"}],
                "generalPractitioner": gp("pr1")}),
            json!({"resourceType": "Patient", "id": "p2",
                "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": "1980-01-01",
                "telecom": [{"system": "phone", "value": "555-0100"}],
                "generalPractitioner": gp("pr2")}),
            json!({"resourceType": "Patient", "id": "p10",
                "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": "1980-01-01",
                "generalPractitioner": gp("pr1")}),
            json!({"resourceType": "Patient", "id": "p3",
                "name": [{"family": "Doe", "given": ["Janet"]}], "gender": "male", "birthDate": "1955-05-05",
                "generalPractitioner": gp("pr1")}),
            json!({"resourceType": "Patient", "id": "px",
                "name": [{"family": "Roe", "given": ["Max"]}], "birthDate": "1999-09-09"}),
            // HAPI finds reference search targets only when they exist.
            json!({"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "One"}]}),
            json!({"resourceType": "Practitioner", "id": "pr2", "name": [{"family": "Two"}]}),
        ];
        let entries: Vec<Value> = patients
            .into_iter()
            .map(|p| {
                let url = format!(
                    "{}/{}",
                    p["resourceType"].as_str().unwrap(),
                    p["id"].as_str().unwrap()
                );
                json!({"resource": p, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let dir = std::env::temp_dir().join(format!("sfp-match-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("match-bundle.json");
        std::fs::write(&path, serde_json::to_vec(&bundle).unwrap()).unwrap();
        FhirServer::start(FhirServerOptions {
            load: vec![path],
            ..FhirServerOptions::default()
        })
    })
}

/// Tenants on [`fhir`]: `score` (the proxy scores) and `fwd` (`auto`: HAPI declares
/// `Patient/$match`, so its MDM answers).
fn proxy() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let base = fhir().base_url().to_owned();
        let issuer = support::issuer();
        Proxy::start(|port| {
            let mut score = tenant("score", port, &base, issuer);
            score["match"] = json!({"mode": "score", "max_candidates": 20, "search_count": 10});
            tenants(vec![
                ("score", score),
                ("fwd", tenant("fwd", port, &base, issuer)),
            ])
        })
    })
}

fn jane() -> Value {
    json!({"resourceType": "Patient",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "urn:mrn", "value": "M-100"}],
        "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": "1980-01-01",
        "telecom": [{"system": "phone", "value": "555-0100"}]})
}

fn params(patient: Value, extra: &[Value]) -> Value {
    let mut parameter = vec![json!({"name": "resource", "resource": patient})];
    parameter.extend(extra.iter().cloned());
    json!({"resourceType": "Parameters", "parameter": parameter})
}

async fn post(url: &str, token: &str, body: &str) -> Answer {
    harness::answer(
        support::http_client()
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_owned()),
    )
    .await
}

async fn post_match(proxy: &Proxy, tenant: &str, token: &str, body: &Value) -> Answer {
    post(
        &format!("{}/Patient/$match", proxy.base(tenant)),
        token,
        &body.to_string(),
    )
    .await
}

async fn token(proxy: &Proxy, client: &str, scope: &str, tenant: &str) -> String {
    support::token(client, scope, &proxy.base(tenant)).await
}

/// `(Patient/id, grade, score)` of every entry, in order.
fn graded(a: &Answer) -> Vec<(String, String, f64)> {
    a.json()["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let grade = e["search"]["extension"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["url"] == MATCH_GRADE)
                .and_then(|x| x["valueCode"].as_str())
                .unwrap_or("none")
                .to_owned();
            (
                format!("Patient/{}", e["resource"]["id"].as_str().unwrap_or("?")),
                grade,
                e["search"]["score"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect()
}

fn ids_grades(a: &Answer) -> Vec<(String, String)> {
    graded(a).into_iter().map(|(id, g, _)| (id, g)).collect()
}

fn pair(id: &str, grade: &str) -> (String, String) {
    (format!("Patient/{id}"), grade.to_owned())
}

#[tokio::test]
async fn scored_candidates_are_graded_certain_probable_possible_and_non_matches_left_out() {
    let p = proxy();
    let t = token(p, "backend", "system/Patient.rs", "score").await;
    let a = post_match(p, "score", &t, &params(jane(), &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["resourceType"], "Bundle");
    assert_eq!(v["type"], "searchset");
    assert!(v.get("total").is_none(), "{}", a.text);
    assert_eq!(
        ids_grades(&a),
        [
            pair("p1", "certain"),
            pair("p2", "probable"),
            pair("p10", "possible")
        ],
        "{}",
        a.text
    );
    let scores: Vec<f64> = graded(&a).iter().map(|(_, _, s)| *s).collect();
    // 16 of 18 points: the input has no address.
    assert_eq!(scores[0], 0.889);
    assert!(scores.windows(2).all(|w| w[0] > w[1]), "{scores:?}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    for e in v["entry"].as_array().unwrap() {
        assert_eq!(e["search"]["mode"], "match");
        assert!(
            e["fullUrl"].as_str().unwrap().starts_with(&p.base("score")),
            "upstream base handed out: {e}"
        );
    }
    // Candidate searches went to the upstream, bounded by `search_count`.
    let wanted = |r: &str| {
        r.starts_with("GET /fhir/Patient?identifier=urn%3Amrn%7CM-100") && r.contains("_count=10")
    };
    let seen = fhir().requests_once(wanted).await;
    assert!(seen.iter().any(|r| wanted(r)), "{seen:?}");
    // Nobody like this: an empty searchset.
    let nobody = json!({"resourceType": "Patient", "identifier": [{"type": {"coding": [{"code": "MR"}]}, "system": "urn:mrn", "value": "nobody"}],
        "name": [{"family": "Zed", "given": ["Zoe"]}], "birthDate": "2001-02-03"});
    let a = post_match(p, "score", &t, &params(nobody, &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{}", a.text);
}

#[tokio::test]
async fn count_and_only_certain_matches_are_honoured() {
    let p = proxy();
    let t = token(p, "backend", "system/Patient.rs", "score").await;
    let count = |n: i64| json!({"name": "count", "valueInteger": n});
    let certain = |b: bool| json!({"name": "onlyCertainMatches", "valueBoolean": b});
    let a = post_match(p, "score", &t, &params(jane(), &[count(2)])).await;
    assert_eq!(
        ids_grades(&a),
        [pair("p1", "certain"), pair("p2", "probable")],
        "{}",
        a.text
    );
    let a = post_match(p, "score", &t, &params(jane(), &[certain(true)])).await;
    assert_eq!(ids_grades(&a), [pair("p1", "certain")], "{}", a.text);
    let a = post_match(
        p,
        "score",
        &t,
        &params(jane(), &[certain(false), count(10)]),
    )
    .await;
    assert_eq!(a.entry_ids().len(), 3, "{}", a.text);
}

#[tokio::test]
async fn weak_or_malformed_input_is_a_400_before_any_candidate_search() {
    let p = proxy();
    let t = token(p, "backend", "system/Patient.rs", "score").await;
    let url = format!("{}/Patient/$match", p.base("score"));
    // Values no other test sends, to find any search made for these requests.
    let marker = "Weakling";
    let jane = || {
        let mut j = jane();
        j["name"][0]["family"] = json!(marker);
        j
    };
    // Name and birth date weigh 6: below IDI-Patient-L0's 10.
    let weak = json!({"resourceType": "Patient", "name": [{"family": marker, "given": ["Jane"]}], "birthDate": "1980-01-01"});
    let a = post_match(p, "score", &t, &params(weak, &[])).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "match_input_too_weak");
    let text = a.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
        + a.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap_or_default();
    assert!(
        text.contains("weighs 6")
            && text.contains("IDI-Patient-L0")
            && text.contains("requires 10"),
        "{}",
        a.text
    );
    assert!(
        text.contains("passport") && !text.contains("birth date"),
        "{}",
        a.text
    );
    let cases: [(String, &str); 8] = [
        ("not json".into(), "match_parameters_invalid"),
        (jane().to_string(), "match_parameters_invalid"),
        (
            json!({"resourceType": "Parameters", "parameter": []}).to_string(),
            "match_resource_invalid",
        ),
        (
            params(jane(), &[json!({"name": "resource", "resource": jane()})]).to_string(),
            "match_resource_invalid",
        ),
        (
            params(json!({"resourceType": "Observation"}), &[]).to_string(),
            "match_resource_invalid",
        ),
        (
            params(jane(), &[json!({"name": "count", "valueInteger": 0})]).to_string(),
            "match_count_invalid",
        ),
        (
            params(
                jane(),
                &[json!({"name": "onlyCertainMatches", "valueString": "yes"})],
            )
            .to_string(),
            "match_only_certain_invalid",
        ),
        (
            params(
                jane(),
                &[json!({"name": "padding", "valueString": "x".repeat(70_000)})],
            )
            .to_string(),
            "match_parameters_invalid",
        ),
    ];
    for (body, reason) in &cases {
        let a = post(&url, &t, body).await;
        assert_eq!(a.status, 400, "{body:.80}: {}", a.text);
        assert_eq!(a.reason(), *reason, "{body:.80}");
    }
    // Forward mode reads the same Parameters.
    let tf = token(p, "backend", "system/Patient.rs", "fwd").await;
    let a = post(
        &format!("{}/Patient/$match", p.base("fwd")),
        &tf,
        "not json",
    )
    .await;
    assert_eq!(
        (a.status, a.reason()),
        (400, "match_parameters_invalid".to_owned())
    );
    let searches: Vec<String> = fhir()
        .requests()
        .into_iter()
        .filter(|r| r.contains(marker))
        .collect();
    assert!(searches.is_empty(), "{searches:?}");
}

#[tokio::test]
async fn a_patient_token_gets_only_its_own_patient_scored_and_nothing_about_the_others() {
    let p = proxy();
    // p10 is the least likely candidate; p1 and p2 rank above it but are hidden.
    let t = token(p, "patient-p10", "patient/Patient.rs", "score").await;
    // An email no candidate has (it scores nothing) and no other test sends: its
    // search shows how this request's candidate searches went upstream.
    let mut input = jane();
    input["telecom"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": "email", "value": "p10-only@example.org"}));
    let a = post_match(p, "score", &t, &params(input, &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(ids_grades(&a), [pair("p10", "possible")], "{}", a.text);
    assert!(a.json().get("total").is_none(), "{}", a.text);
    // The candidate searches were narrowed to the token's compartment.
    let searches: Vec<String> = fhir()
        .requests_once(|r| r.contains("p10-only"))
        .await
        .into_iter()
        .filter(|r| r.contains("p10-only"))
        .collect();
    assert!(!searches.is_empty());
    assert!(
        searches.iter().all(|r| r.contains("_id=p10")),
        "{searches:?}"
    );
    // `count=1` still gives its own patient: a hidden, better candidate takes no slot.
    let one = json!({"name": "count", "valueInteger": 1});
    let a = post_match(p, "score", &t, &params(jane(), &[one])).await;
    assert_eq!(ids_grades(&a), [pair("p10", "possible")], "{}", a.text);
    // Only certain matches: p1 is one, but not this token's; the answer is exactly the
    // one for an input that matches nobody at all.
    let certain = json!({"name": "onlyCertainMatches", "valueBoolean": true});
    let hidden = post_match(p, "score", &t, &params(jane(), &[certain])).await;
    let nobody = json!({"resourceType": "Patient", "identifier": [{"type": {"coding": [{"code": "MR"}]}, "system": "urn:mrn", "value": "nobody"}],
        "name": [{"family": "Zed", "given": ["Zoe"]}], "birthDate": "2001-02-03"});
    let none = post_match(p, "score", &t, &params(nobody, &[])).await;
    assert_eq!((hidden.status, none.status), (200, 200));
    assert!(hidden.entry_ids().is_empty(), "{}", hidden.text);
    assert_eq!(
        hidden.text, none.text,
        "a hidden candidate changes the answer"
    );
    // p1 as the token patient: its own certain match, nothing else.
    let t1 = token(p, "patient-p1", "patient/Patient.rs", "score").await;
    let a = post_match(p, "score", &t1, &params(jane(), &[])).await;
    assert_eq!(ids_grades(&a), [pair("p1", "certain")], "{}", a.text);
}

#[tokio::test]
async fn a_practitioner_sees_only_the_candidates_in_its_compartment() {
    let p = proxy();
    let t = token(p, "practitioner-pr1", "user/Patient.rs", "score").await;
    let a = post_match(p, "score", &t, &params(jane(), &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // p2 (pr2's) is hidden; p3 is pr1's but no match.
    assert_eq!(
        ids_grades(&a),
        [pair("p1", "certain"), pair("p10", "possible")],
        "{}",
        a.text
    );
    assert!(a.json().get("total").is_none());
    // The audit record says how it was answered: the narrowed searches found pr1's
    // three patients (p3 scored as no match), never p2.
    let audit = p.audit_records();
    assert!(
        audit.iter().any(|r| {
            let notes = r["notes"].to_string();
            r["client.id"] == "practitioner-pr1"
                && notes.contains("match.mode=score")
                && notes.contains("match.candidates=3")
        }),
        "{audit:?}"
    );
}

#[tokio::test]
async fn forwarded_match_is_answered_by_hapi_mdm_and_filtered_for_restricted_tokens() {
    let p = proxy();
    let sys = token(p, "backend", "system/Patient.rs", "fwd").await;
    let a = post_match(p, "fwd", &sys, &params(jane(), &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let all: Vec<String> = a.entry_ids();
    assert!(
        ["Patient/p1", "Patient/p2", "Patient/p10"]
            .iter()
            .all(|id| all.contains(&(*id).to_owned())),
        "{}",
        a.text
    );
    assert!(
        fhir()
            .requests_once(|r| r.starts_with("POST /fhir/Patient/$match"))
            .await
            .iter()
            .any(|r| r.starts_with("POST /fhir/Patient/$match"))
    );
    // A patient token gets its own patient only, even asking for one match.
    let t = token(p, "patient-p10", "patient/Patient.rs", "fwd").await;
    let one = json!({"name": "count", "valueInteger": 1});
    let a = post_match(p, "fwd", &t, &params(jane(), &[one])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.entry_ids(), ["Patient/p10"], "{}", a.text);
    assert!(a.json().get("total").is_none(), "{}", a.text);
    // A practitioner: the candidates in its compartment only.
    let t = token(p, "practitioner-pr1", "user/Patient.rs", "fwd").await;
    let a = post_match(p, "fwd", &t, &params(jane(), &[])).await;
    let ids = a.entry_ids();
    assert!(
        ids.contains(&"Patient/p1".to_owned()) && ids.contains(&"Patient/p10".to_owned()),
        "{}",
        a.text
    );
    assert!(!ids.contains(&"Patient/p2".to_owned()), "{}", a.text);
}

#[tokio::test]
async fn forward_mode_without_an_upstream_match_is_501() {
    // A loopback upstream whose CapabilityStatement declares no `$match`.
    let upstream = harness::FaultServer::start(harness::Fault::Respond(
        json!({"resourceType": "Bundle", "type": "searchset"}).to_string(),
    ));
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("mpi", port, &upstream.base(), issuer);
        t["match"] = json!({"mode": "forward"});
        tenants(vec![("mpi", t)])
    });
    let t = support::token("backend", "system/Patient.rs", &proxy.base("mpi")).await;
    let a = post_match(&proxy, "mpi", &t, &params(jane(), &[])).await;
    assert_eq!(a.status, 501, "{}", a.text);
    assert_eq!(a.reason(), "match_not_supported");
    assert!(
        !upstream
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("$match")),
        "forwarded anyway"
    );
}

#[tokio::test]
async fn an_openfga_principal_gets_only_the_candidates_it_may_view() {
    // pr1's team is the care team of p2 and p10; p1 is nobody's here.
    let tuples = [
        json!({"user": "user:practitioner-pr1", "relation": "member", "object": "group:team-m"}),
        json!({"user": "group:team-m", "relation": "care_team", "object": "patient:p2"}),
        json!({"user": "group:team-m", "relation": "care_team", "object": "patient:p10"}),
    ];
    let model: Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("fga-model/model.json")).unwrap(),
    )
    .unwrap();
    let store = support::openfga().create_store("match-e2e", &model, &tuples);
    let base = fhir().base_url().to_owned();
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("fga", port, &base, issuer);
        t["match"] = json!({"mode": "score"});
        t["authorization"] = json!({"mode": "openfga", "openfga": {
            "api_url": store.api_url, "store_id": store.store_id,
            "authorization_model_id": store.model_id, "timeout_ms": 5000}});
        tenants(vec![("fga", t)])
    });
    let t = support::token("practitioner-pr1", "user/Patient.rs", &proxy.base("fga")).await;
    let a = post_match(&proxy, "fga", &t, &params(jane(), &[])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        ids_grades(&a),
        [pair("p2", "probable"), pair("p10", "possible")],
        "{}",
        a.text
    );
    assert!(a.json().get("total").is_none(), "{}", a.text);
    // `count=1`: the best it may view, not the hidden certain p1.
    let one = json!({"name": "count", "valueInteger": 1});
    let a = post_match(&proxy, "fga", &t, &params(jane(), &[one])).await;
    assert_eq!(ids_grades(&a), [pair("p2", "probable")], "{}", a.text);
    let certain = json!({"name": "onlyCertainMatches", "valueBoolean": true});
    let a = post_match(&proxy, "fga", &t, &params(jane(), &[certain])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{}", a.text);
}

#[tokio::test]
async fn the_demo_tours_match_finds_p1_in_the_demo_data() {
    // What `scripts/demo-up.sh` shows, on the shared upstream's demo data (read only).
    let issuer = support::issuer();
    let base = support::fhir_server().base_url().to_owned();
    let proxy = Proxy::start(|port| {
        let mut t = tenant("demo", port, &base, issuer);
        t["match"] = json!({"mode": "score", "input_level": "IDI-Patient-L0"});
        tenants(vec![("demo", t)])
    });
    let input = |mrn: &str, family: &str, given: &str, birth: &str| {
        params(
            json!({"resourceType": "Patient",
                "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "urn:oid:1.2.3.4.5.1", "value": mrn}],
                "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": birth}),
            &[json!({"name": "count", "valueInteger": 5})],
        )
    };
    let t = token(&proxy, "backend", "system/Patient.rs", "demo").await;
    let a = post_match(
        &proxy,
        "demo",
        &t,
        &input("MRN-P1", "Patient-One", "Amy", "1970-01-01"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(ids_grades(&a), [pair("p1", "certain")], "{}", a.text);
    let p = token(&proxy, "patient-p1", "patient/Patient.rs", "demo").await;
    let a = post_match(
        &proxy,
        "demo",
        &p,
        &input("MRN-P2", "Patient-Two", "Ben", "1980-02-02"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{}", a.text);
    assert!(a.json().get("total").is_none(), "{}", a.text);
    let name_only = params(
        json!({"resourceType": "Patient", "name": [{"family": "Patient-One", "given": ["Amy"]}]}),
        &[],
    );
    let a = post_match(&proxy, "demo", &t, &name_only).await;
    assert_eq!(
        (a.status, a.reason()),
        (400, "match_input_too_weak".to_owned())
    );
}
