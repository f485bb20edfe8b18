//! Record-level checks on what the upstream returns, and search narrowing.

use crate::harness::{Answer, get, post_form, shared, token};
use crate::support;

async fn p1(scope: &str, path: &str) -> Answer {
    let t = token("patient-p1", scope, "demo").await;
    get(&format!("{}/{path}", shared().base("demo")), Some(&t)).await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

const P1_OBS: [&str; 6] = [
    "Observation/obs-p1-absolute-ref",
    "Observation/obs-p1-glucose",
    "Observation/obs-p1-hba1c",
    "Observation/obs-p1-heart-rate",
    "Observation/obs-p1-home-bp",
    "Observation/obs-p1-versioned-ref",
];

#[tokio::test]
async fn denied_read_looks_exactly_like_a_missing_record() {
    let denied = p1("patient/Observation.rs", "Observation/obs-p2-glucose").await;
    let missing = p1("patient/Observation.rs", "Observation/no-such-observation").await;
    assert_eq!(denied.status, 404, "{}", denied.text);
    assert_eq!(
        (denied.status, denied.text.clone()),
        (missing.status, missing.text.clone())
    );
    // Prefix trap: p10's records are not p1's.
    assert_eq!(
        p1("patient/Observation.rs", "Observation/obs-p10-glucose")
            .await
            .status,
        404
    );
    assert_eq!(p1("patient/Patient.rs", "Patient/p10").await.status, 404);
    assert_eq!(p1("patient/Patient.rs", "Patient/p1").await.status, 200);
    // The audit record says the truth.
    let audit = shared().audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r["fhir.resource_id"] == "obs-p2-glucose"
                && r["authz.reason"] == "record_denied"
                && r["patient"] == "p1"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn searches_are_narrowed_to_the_patient() {
    let a = p1(
        "patient/Observation.rs",
        "Observation?_count=100&_total=accurate",
    )
    .await;
    assert_eq!(sorted(a.entry_ids()), P1_OBS);
    // Narrowed upstream, not filtered afterwards: nothing was dropped, so the
    // upstream's total survives and counts only p1's records.
    assert_eq!(a.json()["total"], 6, "{}", a.text);
    // Asking for another patient narrows to nothing instead of widening.
    for q in [
        "Observation?patient=p2",
        "Observation?subject=Patient/p2",
        "Observation?patient=p1,p2&_count=100",
        "Observation?patient=p1&patient=p2",
    ] {
        let a = p1("patient/Observation.rs", q).await;
        assert_eq!(a.status, 200, "{q}: {}", a.text);
        assert!(
            a.entry_ids().iter().all(|id| P1_OBS.contains(&id.as_str())),
            "{q}: {:?}",
            a.entry_ids()
        );
    }
    let a = p1("patient/Patient.rs", "Patient?_id=p1,p2").await;
    assert_eq!(a.entry_ids(), ["Patient/p1"]);
    // The upstream saw the narrowed type search (no compartment search: the tenant's
    // upstream is asked by parameter), not the client's query alone.
    let seen = support::fhir_server()
        .requests_once(|r| {
            r.starts_with("GET /fhir/Observation?") && r.ends_with("&subject=Patient%2Fp1")
        })
        .await;
    assert!(
        seen.iter().any(
            |r| r.starts_with("GET /fhir/Observation?") && r.ends_with("&subject=Patient%2Fp1")
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn post_search_body_is_narrowed_too() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let a = post_form(
        &format!("{}/Observation/_search", shared().base("demo")),
        &t,
        &[("patient", "p2"), ("_count", "100")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{:?}", a.entry_ids());
    let a = post_form(
        &format!("{}/Observation/_search", shared().base("demo")),
        &t,
        &[("category", "vital-signs")],
    )
    .await;
    assert_eq!(
        sorted(a.entry_ids()),
        [
            "Observation/obs-p1-heart-rate",
            "Observation/obs-p1-home-bp",
            "Observation/obs-p1-versioned-ref"
        ]
    );
}

#[tokio::test]
async fn included_records_are_checked_too() {
    // Medication is outside every compartment: without a Medication scope it is dropped;
    // Practitioners likewise.
    let a = p1(
        "patient/MedicationRequest.rs",
        "MedicationRequest?_include=MedicationRequest:medication",
    )
    .await;
    assert_eq!(a.entry_ids(), ["MedicationRequest/medreq-p1-metformin"]);
    // `total` counts matches only; dropping an included record leaves it alone.
    assert_eq!(a.json()["total"], 1, "{}", a.text);
    let a = p1(
        "patient/Observation.rs",
        "Observation?_id=obs-p1-glucose&_include=Observation:performer",
    )
    .await;
    assert_eq!(a.entry_ids(), ["Observation/obs-p1-glucose"]);
    // With a Medication scope, the Medication p1's own request references comes along
    // (non-patient data, released next to the record that references it) ...
    let a = p1(
        "patient/MedicationRequest.rs patient/Medication.rs",
        "MedicationRequest?_include=MedicationRequest:medication",
    )
    .await;
    assert_eq!(
        a.entry_ids(),
        [
            "MedicationRequest/medreq-p1-metformin",
            "Medication/med-metformin"
        ]
    );
    // ... but it cannot be read on its own (the demo tenant lists no public types).
    assert_eq!(
        p1("patient/Medication.rs", "Medication/med-metformin")
            .await
            .status,
        404
    );
    // A _revinclude reaching a Provenance outside p1's compartment is dropped.
    let a = p1(
        "patient/Observation.rs patient/Provenance.rs",
        "Observation?_id=obs-p1-glucose&_revinclude=Provenance:target",
    )
    .await;
    assert_eq!(a.entry_ids(), ["Observation/obs-p1-glucose"]);
}

#[tokio::test]
async fn reference_forms_are_matched_strictly() {
    // Absolute (same server) and versioned references count; contained ones never do.
    assert_eq!(
        p1("patient/Observation.rs", "Observation/obs-p1-absolute-ref")
            .await
            .status,
        200
    );
    assert_eq!(
        p1("patient/Observation.rs", "Observation/obs-p1-versioned-ref")
            .await
            .status,
        200
    );
    assert_eq!(
        p1(
            "patient/Observation.rs",
            "Observation/obs-contained-patient"
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn compartment_search_and_everything_only_for_the_own_patient() {
    let a = p1(
        "patient/Observation.rs",
        "Patient/p1/Observation?_count=100",
    )
    .await;
    assert_eq!(sorted(a.entry_ids()), P1_OBS);
    for path in [
        "Patient/p2/Observation",
        "Patient/p10/Observation",
        "Patient/p2/*",
    ] {
        let a = p1("patient/Observation.rs", path).await;
        assert_eq!(a.status, 404, "{path}: {}", a.text);
    }
    let a = p1("patient/*.rs", "Patient/p2/$everything").await;
    assert_eq!(a.status, 404, "{}", a.text);
    // $everything with only Patient and Observation scopes: nothing of other types.
    let a = p1(
        "patient/Patient.rs patient/Observation.rs",
        "Patient/p1/$everything",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let ids = a.entry_ids();
    assert!(ids.contains(&"Patient/p1".to_owned()), "{ids:?}");
    assert!(
        ids.iter()
            .all(|id| id == "Patient/p1" || P1_OBS.contains(&id.as_str())),
        "{ids:?}"
    );
}

#[tokio::test]
async fn types_outside_the_compartment_are_refused_for_patient_tokens() {
    let a = p1("patient/*.rs", "Medication").await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "outside_compartment");
    let a = p1("patient/*.rs", "Observation/_history").await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "search_not_narrowable");
}

#[tokio::test]
async fn vread_and_instance_history_are_checked() {
    let a = p1(
        "patient/Observation.rs",
        "Observation/obs-p1-glucose/_history",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let version = a.json()["entry"][0]["resource"]["meta"]["versionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = p1(
        "patient/Observation.rs",
        &format!("Observation/obs-p1-glucose/_history/{version}"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let other = p1(
        "patient/Observation.rs",
        "Observation/obs-p2-glucose/_history",
    )
    .await;
    assert_eq!(other.status, 404, "{}", other.text);
    let other = p1(
        "patient/Observation.rs",
        "Observation/obs-p2-glucose/_history/1",
    )
    .await;
    assert_eq!(other.status, 404, "{}", other.text);
}

#[tokio::test]
async fn related_person_sees_only_its_own_compartment() {
    let t = token("related-rp1", "user/Observation.rs", "demo").await;
    let a = get(&format!("{}/Observation", shared().base("demo")), Some(&t)).await;
    assert_eq!(a.entry_ids(), ["Observation/obs-p1-home-bp"]);
}

#[tokio::test]
async fn practitioners_read_non_patient_data_wholesale_but_patient_data_by_compartment() {
    let t = token(
        "practitioner-pr1",
        "user/Practitioner.rs user/Medication.rs user/Patient.rs",
        "demo",
    )
    .await;
    let base = shared().base("demo");
    let a = get(&format!("{base}/Practitioner"), Some(&t)).await;
    assert_eq!(
        sorted(a.entry_ids()),
        ["Practitioner/pr1", "Practitioner/pr2"]
    );
    assert_eq!(
        get(&format!("{base}/Medication/med-metformin"), Some(&t))
            .await
            .status,
        200
    );
    let a = get(&format!("{base}/Patient"), Some(&t)).await;
    assert_eq!(sorted(a.entry_ids()), ["Patient/p1", "Patient/p10"]);
    assert_eq!(
        get(&format!("{base}/Patient/p2"), Some(&t)).await.status,
        404
    );
}

#[tokio::test]
async fn chained_and_reverse_chained_parameters_are_refused_for_compartment_bound_tokens() {
    let before = support::fhir_server().requests().len();
    for q in [
        "Observation?subject:Patient.name=Smith",
        "Patient?_has:Observation:patient:code=1234",
        "Patient/p1/Observation?performer.name=X",
    ] {
        let a = p1("patient/*.rs", q).await;
        assert_eq!(a.status, 400, "{q}: {}", a.text);
        assert_eq!(a.reason(), "search_parameter_not_allowed", "{q}");
    }
    let after = support::fhir_server().requests();
    assert!(
        !after[before..]
            .iter()
            .any(|r| r.contains("Smith") || r.contains("_has")),
        "{after:?}"
    );
    // A system token may chain.
    let t = token("backend", "system/Observation.rs", "demo").await;
    let a = get(
        &format!(
            "{}/Observation?subject:Patient.name=Smith",
            shared().base("demo")
        ),
        Some(&t),
    )
    .await;
    assert!(
        !a.text.contains("search_parameter_not_allowed"),
        "{}",
        a.text
    );
}

#[tokio::test]
async fn a_practitioner_role_acts_as_its_practitioner() {
    let base = shared().base("demo");
    let t = token("role-pr1", "user/Observation.rs", "demo").await;
    let a = get(&format!("{base}/Observation?_count=100"), Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let pr1 = token("practitioner-pr1", "user/Observation.rs", "demo").await;
    let b = get(&format!("{base}/Observation?_count=100"), Some(&pr1)).await;
    assert_eq!(sorted(a.entry_ids()), sorted(b.entry_ids()));
    assert!(!a.entry_ids().is_empty());
    assert_eq!(
        get(&format!("{base}/Observation/obs-p1-hba1c"), Some(&t))
            .await
            .status,
        404
    );
    // An inactive role reaches nothing.
    let t = token("role-pr2-inactive", "user/Observation.rs", "demo").await;
    let a = get(&format!("{base}/Observation"), Some(&t)).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "no_user_compartment");
}

/// A tenant whose upstream does FHIR compartment search itself
/// (`upstream.compartment_search: native`; the shared server has it added).
fn native_proxy() -> crate::harness::Proxy {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    crate::harness::Proxy::start(|port| {
        let mut t = crate::harness::tenant("native", port, fhir.base_url(), issuer);
        t["upstream"]["compartment_search"] = "native".into();
        crate::harness::tenants(vec![("native", t)])
    })
}

#[tokio::test]
async fn native_compartment_search_is_forwarded_as_such_and_pages() {
    let proxy = native_proxy();
    let base = proxy.base("native");
    let t = support::token("patient-p1", "patient/Observation.rs", &base).await;
    // A type search is narrowed to the compartment search, with a marker of its own.
    let a = get(
        &format!("{base}/Observation?_lastUpdated=lt2890&_count=4"),
        Some(&t),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut ids = a.entry_ids();
    let wanted = "GET /fhir/Patient/p1/Observation?_lastUpdated=lt2890&_count=4";
    let seen = support::fhir_server().requests_once(|r| r == wanted).await;
    assert!(seen.iter().any(|r| r == wanted), "{seen:?}");
    // The second page comes through a proxy cursor like any other.
    let next = a.json()["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_owned)
        .expect("a next link");
    assert!(
        next.starts_with(&format!("{base}/Observation?_cursor=")),
        "{next}"
    );
    let b = get(&next, Some(&t)).await;
    assert_eq!(b.status, 200, "{}", b.text);
    ids.extend(b.entry_ids());
    assert_eq!(sorted(ids), P1_OBS);
    // Another patient's compartment looks missing, as in by-parameter mode.
    let other = get(&format!("{base}/Patient/p2/Observation"), Some(&t)).await;
    assert_eq!(other.status, 404, "{}", other.text);
}

/// PUTs `resource` on the shared upstream directly (not through the proxy), then
/// DELETEs it there, so the upstream answers 410 for it. `Flag` is a type no other
/// test counts.
async fn deleted_on_the_upstream(resource: serde_json::Value) {
    let url = format!(
        "{}/{}/{}",
        support::fhir_server().base_url(),
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let http = support::http_client();
    let put = http
        .put(&url)
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "PUT {url}: {}", put.status());
    let delete = http.delete(&url).send().await.unwrap();
    assert!(
        delete.status().is_success(),
        "DELETE {url}: {}",
        delete.status()
    );
    let gone = http
        .get(&url)
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 410, "HAPI answers a deleted record with 410");
}

#[tokio::test]
async fn deleted_records_look_missing_and_their_old_versions_are_still_checked() {
    for (id, patient) in [("flag-p1-deleted", "p1"), ("flag-p2-deleted", "p2")] {
        deleted_on_the_upstream(serde_json::json!({
            "resourceType": "Flag", "id": id, "status": "active",
            "code": {"text": "test flag"},
            "subject": {"reference": format!("Patient/{patient}")}
        }))
        .await;
    }
    let missing = p1("patient/Flag.rs", "Flag/no-such-flag").await;
    assert_eq!(missing.status, 404, "{}", missing.text);
    // Gone, whoever's it was: the same answer as a record that never existed.
    for path in ["Flag/flag-p1-deleted", "Flag/flag-p2-deleted"] {
        let a = p1("patient/Flag.rs", path).await;
        assert_eq!(
            (a.status, &a.text),
            (missing.status, &missing.text),
            "{path}"
        );
    }
    let t = token("backend", "system/Flag.rs", "demo").await;
    let a = get(
        &format!("{}/Flag/flag-p2-deleted", shared().base("demo")),
        Some(&t),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    // The version before the deletion still exists upstream: p1 may read its own, not p2's.
    let own = p1("patient/Flag.rs", "Flag/flag-p1-deleted/_history/1").await;
    assert_eq!(own.status, 200, "{}", own.text);
    assert_eq!(own.json()["subject"]["reference"], "Patient/p1");
    let other = p1("patient/Flag.rs", "Flag/flag-p2-deleted/_history/1").await;
    assert_eq!((other.status, &other.text), (missing.status, &missing.text));
}
