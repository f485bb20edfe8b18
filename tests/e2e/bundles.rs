//! Batches (`POST /` with a `batch` Bundle) of reads on the shared stack: each entry is
//! authorized and checked on its own; a refused entry answers for itself.

use serde_json::{Value, json};

use crate::harness::{Answer, answer, shared, token};
use crate::support;

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
