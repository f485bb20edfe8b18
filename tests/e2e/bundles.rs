//! Batches and transactions (`POST /` with a Bundle): reads on the shared stack, writes
//! on the write tests' own HAPI server. Each entry is authorized and checked on its
//! own; a refused batch entry answers for itself, a refused transaction entry stops the
//! whole transaction before anything is sent.

use serde_json::{Value, json};

use crate::harness::{Answer, answer, shared, token};
use crate::support;
use crate::writes::{fhir as w_fhir, proxy as w_proxy};

async fn post_bundle(tenant: &str, token: &str, bundle: &Value) -> Answer {
    answer(
        support::http_client()
            .post(shared().base(tenant))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(bundle).unwrap()),
    )
    .await
}

fn get(url: &str) -> Value {
    json!({ "request": { "method": "GET", "url": url } })
}

fn statuses(v: &Value) -> Vec<String> {
    v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn a_batch_of_reads_is_authorized_entry_by_entry() {
    let t = token(
        "patient-p1",
        "patient/Patient.r patient/Observation.rs",
        "demo",
    )
    .await;
    let bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            get("Patient/p1"),
            get("Patient/p2"),
            get("Observation?_count=50"),
            get("Encounter?_count=5"),
            get("http://elsewhere.example/fhir/Patient/p1"),
            get(&format!("{}/Observation/obs-p1-glucose", shared().base("demo"))),
            get("Observation/obs-p2-glucose"),
        ]
    });
    let a = post_bundle("demo", &t, &bundle).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["type"], "batch-response");
    assert_eq!(
        statuses(&v),
        [
            "200 OK",
            "404 Not Found",
            "200 OK",
            "403 Forbidden",
            "400 Bad Request",
            "200 OK",
            "404 Not Found"
        ]
    );
    let e = v["entry"].as_array().unwrap();
    assert_eq!(e[0]["resource"]["id"], "p1");
    // The search entry was narrowed like a search of its own: only p1's records.
    let search = &e[2]["resource"];
    assert_eq!(search["type"], "searchset");
    let subjects: Vec<&str> = search["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["resource"]["subject"]["reference"].as_str().unwrap_or(""))
        .collect();
    assert!(!subjects.is_empty());
    assert!(
        subjects.iter().all(|s| s
            .rsplit_once("Patient/")
            .is_some_and(|(_, id)| id.split('/').next() == Some("p1"))),
        "{subjects:?}"
    );
    // Refusals are OperationOutcomes with the reason, in place.
    let reason = |i: usize| {
        e[i]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(reason(1), "resource_not_found");
    assert_eq!(reason(3), "scope_insufficient");
    assert_eq!(reason(4), "bundle_entry_url");
    // Nothing of another patient, no upstream URL.
    assert!(!a.text.contains("obs-p2"), "{}", a.text);
    assert!(!a.text.contains(support::fhir_server().base_url()));
    // Each entry has an audit record of its own, with the true reason.
    let audit = shared().audit_records();
    let of_entry = |n: usize| {
        audit
            .iter()
            .filter(|r| {
                r["notes"]
                    .as_str()
                    .is_some_and(|s| s.split(' ').any(|x| x == format!("bundle.entry={n}")))
                    && r["client.id"] == "patient-p1"
            })
            .cloned()
            .collect::<Vec<Value>>()
    };
    assert!(
        of_entry(2)
            .iter()
            .any(|r| r["authz.reason"] == "record_denied" && r["fhir.resource_id"] == "p2"),
        "{audit:?}"
    );
    assert!(
        of_entry(1)
            .iter()
            .any(|r| r["authz.decision"] == "allow" && r["fhir.resource_id"] == "p1")
    );
}

#[tokio::test]
async fn malformed_bundles_are_refused_whole() {
    let t = token("patient-p1", "patient/Patient.r", "demo").await;
    let cases = [
        (json!({"resourceType": "Patient"}), 400, "bundle_invalid"),
        (
            json!({"resourceType": "Bundle", "type": "collection", "entry": [get("Patient/p1")]}),
            400,
            "bundle_type_unsupported",
        ),
        (
            json!({"resourceType": "Bundle", "type": "batch", "entry": []}),
            400,
            "bundle_empty",
        ),
        (
            json!({"resourceType": "Bundle", "type": "batch",
                   "entry": (0..101).map(|_| get("Patient/p1")).collect::<Vec<_>>()}),
            413,
            "bundle_too_many_entries",
        ),
    ];
    for (bundle, status, reason) in cases {
        let a = post_bundle("demo", &t, &bundle).await;
        assert_eq!(
            (a.status, a.reason()),
            (status, reason.to_owned()),
            "{}",
            a.text
        );
    }
    // Not JSON at all.
    let a = answer(
        support::http_client()
            .post(shared().base("demo"))
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body("{nope"),
    )
    .await;
    assert_eq!((a.status, a.reason()), (400, "bundle_invalid".to_owned()));
    // Not JSON by its media type.
    let a = answer(
        support::http_client()
            .post(shared().base("demo"))
            .bearer_auth(&t)
            .header("content-type", "text/plain")
            .body(r#"{"resourceType":"Bundle","type":"batch","entry":[]}"#),
    )
    .await;
    assert_eq!(a.status, 415, "{}", a.text);
    // Without a token: 401 before anything is read.
    let a = answer(
        support::http_client()
            .post(shared().base("demo"))
            .header("content-type", "application/fhir+json")
            .body("{}"),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(a.header("www-authenticate").starts_with("Bearer"));
}

// ---------------------------------------------------------------------------------------
// Writes in batches and transactions, against a HAPI server of their own.

// The write tests' HAPI server and proxy (`writes`: the base bundle loaded, tenant `w`).
// The base bundle's records these tests name are written only by entries the proxy
// refuses; what they create carries identifiers of their own.

async fn w_token(client: &str, scope: &str) -> String {
    support::token(client, scope, &w_proxy().base("w")).await
}

async fn w_post(token: &str, bundle: &Value) -> Answer {
    answer(
        support::http_client()
            .post(w_proxy().base("w"))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(bundle).unwrap()),
    )
    .await
}

/// Straight from the upstream, past the proxy.
async fn upstream(path: &str) -> Value {
    let url = format!("{}/{path}", w_fhir().base_url());
    let a = answer(
        support::http_client()
            .get(&url)
            .header("accept", "application/fhir+json"),
    )
    .await;
    a.json()
}

/// How many Observations on the upstream carry `identifier` (system `urn:test:bundles`).
async fn count_identified(value: &str) -> usize {
    let v = upstream(&format!(
        "Observation?identifier=urn:test:bundles%7C{value}&_total=accurate"
    ))
    .await;
    v["total"].as_u64().unwrap_or(0) as usize
}

fn observation(patient: &str, identifier: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "text": "bundle test" },
        "identifier": [{ "system": "urn:test:bundles", "value": identifier }],
        "subject": { "reference": format!("Patient/{patient}") }
    })
}

fn write(method: &str, url: &str, resource: Option<Value>) -> Value {
    let mut e = json!({ "request": { "method": method, "url": url } });
    if let Some(r) = resource {
        e["resource"] = r;
    }
    e
}

fn batch(entries: Vec<Value>) -> Value {
    json!({ "resourceType": "Bundle", "type": "batch", "entry": entries })
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

/// A transaction refused because of entry `entry` (1-based), with `status` and `reason`.
fn assert_entry_refused(a: &Answer, status: u16, reason: &str, entry: usize) {
    assert_eq!(
        (a.status, a.reason()),
        (status, reason.to_owned()),
        "{}",
        a.text
    );
    let v = a.json();
    let diagnostics = v["issue"][0]["diagnostics"].as_str().unwrap_or_default();
    assert!(
        diagnostics.starts_with(&format!("transaction entry {entry}:")),
        "{diagnostics}"
    );
}

const P1_WRITER: &str = "patient/Observation.cruds patient/Encounter.cruds patient/Patient.cruds";

#[tokio::test]
async fn a_batch_mixing_allowed_and_denied_writes_applies_only_the_allowed_ones() {
    let t = w_token("patient-p1", P1_WRITER).await;
    let mut moved = upstream("Observation/obs-p1-glucose").await;
    moved["subject"]["reference"] = json!("Patient/p2");
    let a = w_post(
        &t,
        &batch(vec![
            write("POST", "Observation", Some(observation("p1", "batch-own"))),
            write(
                "POST",
                "Observation",
                Some(observation("p2", "batch-other")),
            ),
            write("PUT", "Observation/obs-p1-glucose", Some(moved)),
            write("DELETE", "Observation/obs-p2-glucose", None),
            get("Observation/obs-p1-glucose"),
        ]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(
        statuses(&v),
        [
            "201 Created",
            "403 Forbidden",
            "403 Forbidden",
            "404 Not Found",
            "200 OK"
        ],
        "{}",
        a.text
    );
    let reason = |i: usize| {
        v["entry"][i]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    // Another patient's new record, a record moved to another patient, and another
    // patient's record deleted (hidden: like a missing one).
    assert_eq!(reason(1), "write_outside_reach");
    assert_eq!(reason(2), "write_outside_reach");
    assert_eq!(reason(3), "resource_not_found");
    let location = v["entry"][0]["response"]["location"].as_str().unwrap();
    assert!(
        location.starts_with(&format!("{}/Observation/", w_proxy().base("w"))),
        "{location}"
    );
    // What the upstream holds: the allowed create, and nothing else changed.
    assert_eq!(count_identified("batch-own").await, 1);
    assert_eq!(count_identified("batch-other").await, 0);
    assert_eq!(
        upstream("Observation/obs-p1-glucose").await["subject"]["reference"],
        "Patient/p1"
    );
    assert_eq!(
        upstream("Observation/obs-p2-glucose").await["resourceType"],
        "Observation"
    );
}

#[tokio::test]
async fn a_transaction_with_one_denied_entry_writes_nothing() {
    let t = w_token("patient-p1", P1_WRITER).await;
    let a = w_post(
        &t,
        &transaction(vec![
            write("POST", "Observation", Some(observation("p1", "tx-own"))),
            write("POST", "Observation", Some(observation("p2", "tx-other"))),
        ]),
    )
    .await;
    assert_entry_refused(&a, 403, "write_outside_reach", 2);
    // Nothing was written (that nothing was sent either: see
    // `the_upstream_receives_one_transaction_of_the_prepared_entries`).
    assert_eq!(count_identified("tx-own").await, 0);
    assert_eq!(count_identified("tx-other").await, 0);
    // The refusal's record names the entry.
    let audit = w_proxy().audit_records();
    assert!(
        audit.iter().any(|r| r["fhir.interaction"] == "batch"
            && r["authz.decision"] == "deny"
            && r["notes"]
                .as_str()
                .is_some_and(|n| n.contains("transaction.refused_entry=2"))),
        "{audit:?}"
    );
}

#[tokio::test]
async fn an_allowed_transaction_resolves_its_references_and_answers_without_resources() {
    let t = w_token("patient-p1", P1_WRITER).await;
    let mut obs = observation("p1", "tx-linked");
    obs["encounter"] = json!({ "reference": "urn:uuid:7f1b7e3c-3a8e-4f5e-9a57-2f0f1e0c2d11" });
    let a = w_post(
        &t,
        &transaction(vec![
            json!({
                "fullUrl": "urn:uuid:7f1b7e3c-3a8e-4f5e-9a57-2f0f1e0c2d11",
                "resource": {
                    "resourceType": "Encounter", "status": "finished",
                    "class": { "code": "AMB" },
                    "subject": { "reference": "Patient/p1" }
                },
                "request": { "method": "POST", "url": "Encounter" }
            }),
            write("POST", "Observation", Some(obs)),
        ]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["type"], "transaction-response");
    let entries = v["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for e in entries {
        assert!(e.get("resource").is_none(), "{e}");
        assert!(e["response"]["status"].as_str().unwrap().starts_with("201"));
        // Relative to the base (HAPI's form) or under the proxy's base, never the
        // upstream's.
        let loc = e["response"]["location"].as_str().unwrap();
        assert!(
            !loc.contains("://") || loc.starts_with(&w_proxy().base("w")),
            "{loc}"
        );
        assert!(loc.contains("/_history/"), "{loc}");
    }
    assert!(!a.text.contains(w_fhir().base_url()));
    // The upstream linked the Observation to the Encounter it created.
    let found = upstream("Observation?identifier=urn:test:bundles%7Ctx-linked").await;
    let encounter = found["entry"][0]["resource"]["encounter"]["reference"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(encounter.starts_with("Encounter/"), "{encounter}");
    assert_eq!(
        upstream(&encounter).await["subject"]["reference"],
        "Patient/p1"
    );
    // Each entry's record names what it wrote.
    let audit = w_proxy().audit_records();
    let written: Vec<&str> = audit
        .iter()
        .filter_map(|r| r["notes"].as_str())
        .filter(|n| n.contains("written="))
        .collect();
    assert!(
        written
            .iter()
            .any(|n| n.contains(&format!("written={encounter}"))),
        "{written:?}"
    );
}

#[tokio::test]
async fn links_to_records_a_transaction_creates_reach_no_compartment_but_the_whole_type() {
    let new_patient = || {
        json!({
            "fullUrl": "urn:uuid:0b9f8f4e-1d7c-4f4f-8f69-9d7b6a0f6c55",
            "resource": { "resourceType": "Patient", "identifier": [{ "system": "urn:test:bundles", "value": "new-patient" }] },
            "request": { "method": "POST", "url": "Patient" }
        })
    };
    let mut obs = observation("p1", "tx-new-patient");
    obs["subject"] = json!({ "reference": "urn:uuid:0b9f8f4e-1d7c-4f4f-8f69-9d7b6a0f6c55" });
    // A patient app cannot create a patient and link records to it.
    let t = w_token("patient-p1", P1_WRITER).await;
    let a = w_post(
        &t,
        &transaction(vec![
            new_patient(),
            write("POST", "Observation", Some(obs.clone())),
        ]),
    )
    .await;
    assert_entry_refused(&a, 403, "write_outside_reach", 1);
    assert_eq!(count_identified("tx-new-patient").await, 0);
    // Nor link its own record to a patient the transaction creates (here one it may
    // not create either way: the Observation is refused on its own account as well).
    let a = w_post(
        &t,
        &transaction(vec![
            write(
                "POST",
                "Observation",
                Some(observation("p1", "tx-before-new")),
            ),
            write("POST", "Observation", Some(obs.clone())),
            new_patient(),
        ]),
    )
    .await;
    assert_entry_refused(&a, 403, "write_outside_reach", 2);
    assert_eq!(count_identified("tx-before-new").await, 0);
    // Nor link one of its own records to an entry that names no entry at all.
    let mut dangling = observation("p1", "tx-dangling");
    dangling["encounter"] = json!({ "reference": "urn:uuid:11111111-2222-3333-4444-555555555555" });
    let a = w_post(
        &t,
        &transaction(vec![write("POST", "Observation", Some(dangling))]),
    )
    .await;
    assert_eq!(
        (a.status, a.reason()),
        (400, "transaction_reference_unresolved".to_owned()),
        "{}",
        a.text
    );
    // Nor use a conditional reference, which the upstream would resolve by a search.
    let mut conditional = observation("p1", "tx-conditional");
    conditional["encounter"] =
        json!({ "reference": "Encounter?identifier=urn:test:bundles|enc-x" });
    let a = w_post(
        &t,
        &transaction(vec![write("POST", "Observation", Some(conditional))]),
    )
    .await;
    assert_eq!(
        (a.status, a.reason()),
        (403, "write_conditional_reference".to_owned()),
        "{}",
        a.text
    );
    assert_eq!(count_identified("tx-conditional").await, 0);
    // A backend service that reaches every Patient and Observation may.
    let system = w_token("backend", "system/Patient.cruds system/Observation.cruds").await;
    let a = w_post(
        &system,
        &transaction(vec![new_patient(), write("POST", "Observation", Some(obs))]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let found = upstream("Observation?identifier=urn:test:bundles%7Ctx-new-patient").await;
    let subject = found["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        subject.starts_with("Patient/") && subject != "Patient/p1",
        "{subject}"
    );
}

#[tokio::test]
async fn conditional_entries_are_narrowed_and_version_conflicts_pass_through() {
    // p2 has an Observation with a known identifier.
    let system = w_token("backend", "system/Observation.cruds").await;
    let a = w_post(
        &system,
        &transaction(vec![write(
            "POST",
            "Observation",
            Some(observation("p2", "p2-conditional-target")),
        )]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // p1's conditional update whose criteria match p2's record cannot touch it.
    let t = w_token("patient-p1", P1_WRITER).await;
    let a = w_post(
        &t,
        &transaction(vec![write(
            "PUT",
            "Observation?identifier=urn:test:bundles|p2-conditional-target",
            Some(observation("p1", "p2-conditional-target")),
        )]),
    )
    .await;
    let p2 = upstream(
        "Observation?identifier=urn:test:bundles%7Cp2-conditional-target&subject=Patient/p2",
    )
    .await;
    assert_eq!(p2["entry"].as_array().map_or(0, Vec::len), 1, "{}", a.text);
    assert_eq!(p2["entry"][0]["resource"]["meta"]["versionId"], "1");
    // A stale version is the upstream's conflict, passed through; nothing changes.
    let current = upstream("Observation/obs-p1-hba1c").await;
    let mut changed = current.clone();
    changed["status"] = json!("amended");
    let mut e = write("PUT", "Observation/obs-p1-hba1c", Some(changed));
    e["request"]["ifMatch"] = json!("W/\"999\"");
    let a = w_post(&t, &transaction(vec![e])).await;
    // A version newer than the one checked is the proxy's own 412; an older one (here:
    // any the upstream does not hold as current) would be the upstream's conflict.
    assert!(a.status == 409 || a.status == 412, "{}", a.text);
    assert_eq!(a.json()["resourceType"], "OperationOutcome");
    let mut stale = write("PUT", "Observation/obs-p1-hba1c", Some(current.clone()));
    stale["request"]["ifMatch"] = json!("W/\"0\"");
    let a = w_post(&t, &transaction(vec![stale.clone()])).await;
    assert_eq!(a.status, 409, "{}", a.text);
    // The status passes; the upstream's text only to a token that reaches every record.
    assert_eq!(a.reason(), "upstream_write_refused", "{}", a.text);
    assert!(!a.text.contains("HAPI-"), "{}", a.text);
    let system = w_token("backend", "system/Observation.cruds").await;
    let a = w_post(&system, &transaction(vec![stale])).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert!(a.text.contains("HAPI-"), "{}", a.text);
    assert_eq!(
        upstream("Observation/obs-p1-hba1c").await["meta"]["versionId"],
        current["meta"]["versionId"]
    );
}

/// What the upstream receives: a capturing relay in front of the write tests' HAPI.
#[tokio::test]
async fn the_upstream_receives_one_transaction_of_the_prepared_entries() {
    use crate::observability::{Relay, host_port};
    let relay = Relay::start(&host_port(w_fhir().base_url()));
    let upstream_base = format!("http://127.0.0.1:{}/fhir", relay.port);
    let proxy = crate::harness::Proxy::start(move |port| {
        crate::harness::tenants(vec![(
            "wt",
            crate::harness::tenant("wt", port, &upstream_base, support::issuer()),
        )])
    });
    let t = support::token("patient-p1", P1_WRITER, &proxy.base("wt")).await;
    let post = |bundle: Value| {
        answer(
            support::http_client()
                .post(proxy.base("wt"))
                .bearer_auth(&t)
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(&bundle).unwrap()),
        )
    };
    // A refused transaction sends nothing that writes.
    let a = post(transaction(vec![
        write("POST", "Observation", Some(observation("p1", "relay-own"))),
        write(
            "POST",
            "Observation",
            Some(observation("p2", "relay-other")),
        ),
    ]))
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let sent: Vec<String> = relay
        .exchanges()
        .iter()
        .map(|e| e.line().to_owned())
        .collect();
    assert!(
        sent.iter().all(|l| l.starts_with("GET ")),
        "a refused transaction reached the upstream: {sent:?}"
    );
    // An allowed one goes as one transaction of the prepared entries.
    let id = format!("bx-{}", std::process::id());
    let mut own = observation("p1", &id);
    own["id"] = json!(id);
    let put = answer(
        support::http_client()
            .put(format!("{}/Observation/{id}", w_fhir().base_url()))
            .header("content-type", "application/fhir+json")
            .body(own.to_string()),
    )
    .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text);
    let mut amended = own.clone();
    amended["status"] = json!("amended");
    let mut create = write("POST", "Observation", Some(observation("p1", "relay-new")));
    create["request"]["ifNoneExist"] = json!("identifier=urn:test:bundles|relay-new");
    let a = post(transaction(vec![
        write("PUT", &format!("Observation/{id}"), Some(amended)),
        write(
            "PUT",
            "Observation?identifier=urn:test:bundles|relay-cond",
            Some(observation("p1", "relay-cond")),
        ),
        create,
    ]))
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let exchanges = relay.exchanges();
    let tx: Vec<_> = exchanges
        .iter()
        .filter(|e| e.line().starts_with("POST /fhir "))
        .collect();
    assert_eq!(
        tx.len(),
        1,
        "{:?}",
        exchanges.iter().map(|e| e.line()).collect::<Vec<_>>()
    );
    assert!(
        exchanges
            .iter()
            .all(|e| e.line().starts_with("GET ") || e.line().starts_with("POST /fhir ")),
        "entries went upstream one by one"
    );
    let sent: Value = serde_json::from_str(&tx[0].request_body).unwrap();
    assert_eq!(sent["type"], "transaction");
    let e = sent["entry"].as_array().unwrap();
    // The update is pinned to the version the write check read.
    assert_eq!(e[0]["request"]["url"], format!("Observation/{id}"));
    assert_eq!(e[0]["request"]["ifMatch"], "W/\"1\"");
    // The conditional update's criteria and the create's condition are narrowed to p1.
    let url = e[1]["request"]["url"].as_str().unwrap();
    assert!(url.starts_with("Observation?identifier="), "{url}");
    assert!(url.contains("p1"), "criteria not narrowed: {url}");
    let cond = e[2]["request"]["ifNoneExist"].as_str().unwrap();
    assert!(
        cond.contains("identifier=") && cond.contains("p1"),
        "{cond}"
    );
    // The resources go as the client sent them.
    assert_eq!(e[0]["resource"]["status"], "amended");
    // The transaction asks for a minimal answer.
    assert!(
        tx[0]
            .request_header("prefer")
            .iter()
            .any(|p| p.contains("return=minimal")),
        "{:?}",
        tx[0].request_header("prefer")
    );
    drop(proxy);
}

#[tokio::test]
async fn a_practitioners_write_only_batch_writes_within_its_reach_and_reads_nothing_back() {
    // `c` without `r`: the created record is not returned, only where it went.
    let t = w_token("practitioner-pr1", "user/Observation.c").await;
    let mut mine = observation("p1", "user-own");
    mine["performer"] = json!([{ "reference": "Practitioner/pr1" }]);
    let a = w_post(
        &t,
        &batch(vec![
            write("POST", "Observation", Some(mine)),
            write("POST", "Observation", Some(observation("p2", "user-other"))),
            get("Observation/obs-p1-glucose"),
        ]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(
        statuses(&v),
        ["201 Created", "403 Forbidden", "403 Forbidden"],
        "{}",
        a.text
    );
    assert!(v["entry"][0].get("resource").is_none(), "{}", a.text);
    assert!(
        v["entry"][0]["response"]["location"]
            .as_str()
            .is_some_and(|l| l.contains("Observation/"))
    );
    assert_eq!(
        v["entry"][2]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"],
        "scope_insufficient"
    );
    assert_eq!(count_identified("user-own").await, 1);
    assert_eq!(count_identified("user-other").await, 0);
}

#[tokio::test]
async fn transactions_refuse_searches_foreign_full_urls_and_two_changes_of_one_record() {
    let t = w_token("patient-p1", P1_WRITER).await;
    let search = json!({"resource": {"resourceType": "Parameters"},
                        "request": {"method": "POST", "url": "Observation/_search"}});
    let mut foreign = write("POST", "Observation", Some(observation("p1", "tx-foreign")));
    foreign["fullUrl"] = json!("Patient/p1");
    let own = upstream("Observation/obs-p1-glucose").await;
    let cases = [
        (vec![search], 400, "transaction_read_unsupported"),
        (vec![foreign], 400, "transaction_full_url"),
        (
            vec![
                write("PUT", "Observation/obs-p1-glucose", Some(own.clone())),
                write("DELETE", "Observation/obs-p1-glucose", None),
            ],
            400,
            "transaction_duplicate_target",
        ),
    ];
    for (entries, status, reason) in cases {
        let a = w_post(&t, &transaction(entries)).await;
        assert_eq!(
            (a.status, a.reason()),
            (status, reason.to_owned()),
            "{}",
            a.text
        );
    }
    assert_eq!(count_identified("tx-foreign").await, 0);
    assert_eq!(
        upstream("Observation/obs-p1-glucose").await["meta"]["versionId"],
        own["meta"]["versionId"]
    );
}
