//! Finer-grained scopes (`patient/Observation.rs?category=...`), end to end: searches get
//! the constraint added, and the proxy evaluates it on every record it releases (reads,
//! history, `_revinclude`d and `$everything` entries, and search matches again).
//! Data: p1 has 3 laboratory Observations (glucose, hba1c, absolute-ref) and 3
//! vital-signs ones (heart-rate, home-bp, versioned-ref).

use crate::harness::{Answer, get, shared, token};

const LAB: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
const VITALS: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

const P1_LAB: [&str; 3] = [
    "Observation/obs-p1-absolute-ref",
    "Observation/obs-p1-glucose",
    "Observation/obs-p1-hba1c",
];
const P1_VITALS: [&str; 3] = [
    "Observation/obs-p1-heart-rate",
    "Observation/obs-p1-home-bp",
    "Observation/obs-p1-versioned-ref",
];

async fn p1(scope: &str, path: &str) -> Answer {
    let t = token("patient-p1", scope, "demo").await;
    get(&format!("{}/{path}", shared().base("demo")), Some(&t)).await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn observations(a: &Answer) -> Vec<String> {
    sorted(
        a.entry_ids()
            .into_iter()
            .filter(|id| id.starts_with("Observation/"))
            .collect(),
    )
}

#[tokio::test]
async fn reads_are_allowed_only_for_records_matching_the_constraint() {
    for id in P1_LAB {
        let a = p1(LAB, id).await;
        assert_eq!(a.status, 200, "{id}: {}", a.text);
        assert_eq!(a.json()["resourceType"], "Observation");
    }
    for id in P1_VITALS {
        let a = p1(LAB, id).await;
        assert_eq!(a.status, 404, "{id}: {}", a.text);
        assert_eq!(a.reason(), "resource_not_found");
    }
    // A record outside the category looks exactly like a missing one ...
    let denied = p1(LAB, "Observation/obs-p1-heart-rate").await;
    let missing = p1(LAB, "Observation/no-such-observation").await;
    assert_eq!(
        (denied.status, denied.text.clone()),
        (missing.status, missing.text)
    );
    // ... and the audit record says the truth.
    let audit = shared().audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r["fhir.resource_id"] == "obs-p1-heart-rate"
                && r["authz.reason"] == "record_denied"
                && r["patient"] == "p1"),
        "{audit:?}"
    );
    // The constraint never widens the compartment: p2's laboratory Observation stays
    // hidden.
    assert_eq!(p1(LAB, "Observation/obs-p2-glucose").await.status, 404);
}

#[tokio::test]
async fn instance_history_and_vread_are_checked_against_the_constraint() {
    let a = p1(LAB, "Observation/obs-p1-glucose/_history").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let version = a.json()["entry"][0]["resource"]["meta"]["versionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = p1(
        LAB,
        &format!("Observation/obs-p1-glucose/_history/{version}"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = p1(LAB, "Observation/obs-p1-heart-rate/_history").await;
    assert_eq!(a.status, 404, "{}", a.text);
}

#[tokio::test]
async fn searches_return_only_matching_records() {
    let a = p1(LAB, "Observation?_count=100").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(observations(&a), P1_LAB);
    // A client asking for the other category gets nothing, not an error.
    let a = p1(LAB, "Observation?_id=obs-p1-heart-rate").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{:?}", a.entry_ids());
}

#[tokio::test]
async fn revincluded_observations_are_filtered_by_category() {
    // Encounter e1 is referenced by glucose and hba1c (laboratory) and heart-rate
    // (vital-signs).
    let path = "Encounter?_id=e1&_revinclude=Observation:encounter";
    let all = p1("patient/Encounter.rs patient/Observation.rs", path).await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(
        observations(&all),
        [
            "Observation/obs-p1-glucose",
            "Observation/obs-p1-hba1c",
            "Observation/obs-p1-heart-rate"
        ]
    );
    let a = p1(&format!("patient/Encounter.rs {LAB}"), path).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        a.entry_ids().contains(&"Encounter/e1".to_owned()),
        "{:?}",
        a.entry_ids()
    );
    assert_eq!(
        observations(&a),
        ["Observation/obs-p1-glucose", "Observation/obs-p1-hba1c"]
    );
    // Only included records were dropped: `total` (which counts matches) may stay,
    // and then counts the matched Encounters only.
    if let Some(total) = a.json().get("total") {
        let matches = a.json()["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] != "include")
            .count();
        assert_eq!(total.as_u64(), Some(matches as u64), "{}", a.text);
    }
    let a = p1(&format!("patient/Encounter.rs {VITALS}"), path).await;
    assert_eq!(observations(&a), ["Observation/obs-p1-heart-rate"]);
}

#[tokio::test]
async fn everything_entries_are_filtered_by_category() {
    let a = p1(
        &format!("patient/Patient.r {LAB}"),
        "Patient/p1/$everything",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        a.entry_ids().contains(&"Patient/p1".to_owned()),
        "{:?}",
        a.entry_ids()
    );
    assert_eq!(observations(&a), P1_LAB);
}

#[tokio::test]
async fn two_category_scopes_are_a_union() {
    let both = format!("{LAB} {VITALS}");
    let a = p1(&both, "Observation?_count=100").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut all: Vec<String> = P1_LAB
        .iter()
        .chain(&P1_VITALS)
        .map(|s| (*s).to_owned())
        .collect();
    all.sort();
    assert_eq!(observations(&a), all);
    for id in [
        "Observation/obs-p1-glucose",
        "Observation/obs-p1-heart-rate",
    ] {
        let a = p1(&both, id).await;
        assert_eq!(a.status, 200, "{id}: {}", a.text);
    }
    let a = p1(
        &format!("patient/Encounter.rs {both}"),
        "Encounter?_id=e1&_revinclude=Observation:encounter",
    )
    .await;
    assert_eq!(
        observations(&a),
        [
            "Observation/obs-p1-glucose",
            "Observation/obs-p1-hba1c",
            "Observation/obs-p1-heart-rate"
        ]
    );
}

#[tokio::test]
async fn constraints_the_proxy_cannot_evaluate_grant_nothing_on_reads() {
    // `date` is not evaluated by the proxy: the scope does not grant the read (fail
    // closed), the record looks missing.
    let a = p1(
        "patient/Observation.rs?date=ge2000-01-01",
        "Observation/obs-p1-glucose",
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
}
