//! SMART v1/v2 scopes, end to end: tokens with exactly these scopes from the real issuer.

use crate::harness::{Answer, get, shared, token};

async fn as_client(client: &str, scope: &str, path: &str) -> Answer {
    let t = token(client, scope, "demo").await;
    get(&format!("{}/{path}", shared().base("demo")), Some(&t)).await
}

fn assert_insufficient(a: &Answer) {
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "scope_insufficient", "{}", a.text);
    assert!(
        a.header("www-authenticate")
            .contains("error=\"insufficient_scope\"")
    );
}

#[tokio::test]
async fn v1_and_v2_read_scopes_read_and_search() {
    for scope in [
        "patient/Observation.read",
        "patient/Observation.rs",
        "patient/Observation.*",
        "patient/*.read",
        "patient/*.rs",
        "patient/Observation.cruds",
    ] {
        let a = as_client("patient-p1", scope, "Observation/obs-p1-glucose").await;
        assert_eq!(a.status, 200, "{scope}: {}", a.text);
        let a = as_client("patient-p1", scope, "Observation").await;
        assert_eq!(a.status, 200, "{scope}: {}", a.text);
        assert_eq!(a.entry_ids().len(), 6, "{scope}: {:?}", a.entry_ids());
    }
}

#[tokio::test]
async fn r_reads_but_does_not_search_and_s_searches_but_does_not_read() {
    assert_eq!(
        as_client(
            "patient-p1",
            "patient/Observation.r",
            "Observation/obs-p1-glucose"
        )
        .await
        .status,
        200
    );
    assert_insufficient(&as_client("patient-p1", "patient/Observation.r", "Observation").await);
    assert_eq!(
        as_client("patient-p1", "patient/Observation.s", "Observation")
            .await
            .status,
        200
    );
    assert_insufficient(
        &as_client(
            "patient-p1",
            "patient/Observation.s",
            "Observation/obs-p1-glucose",
        )
        .await,
    );
    // Instance history is a read; type history a search.
    assert_eq!(
        as_client(
            "patient-p1",
            "patient/Observation.r",
            "Observation/obs-p1-glucose/_history"
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn out_of_order_or_unknown_permissions_grant_nothing() {
    for scope in [
        "patient/Observation.sr",
        "patient/Observation.rr",
        "patient/Observation.R",
        "patient/Observation.x",
        "patient/observation.rs",
        "Patient/Observation.rs",
    ] {
        assert_insufficient(&as_client("patient-p1", scope, "Observation/obs-p1-glucose").await);
        assert_insufficient(&as_client("patient-p1", scope, "Observation").await);
    }
}

#[tokio::test]
async fn write_without_read_cannot_read() {
    for scope in [
        "patient/Observation.write",
        "patient/Observation.cud",
        "patient/Observation.c",
    ] {
        assert_insufficient(&as_client("patient-p1", scope, "Observation/obs-p1-glucose").await);
        assert_insufficient(&as_client("patient-p1", scope, "Observation").await);
    }
}

#[tokio::test]
async fn scopes_are_per_type() {
    assert_insufficient(
        &as_client(
            "patient-p1",
            "patient/Observation.rs",
            "Condition/cond-p1-diabetes",
        )
        .await,
    );
    let a = as_client(
        "patient-p1",
        "patient/Observation.rs patient/Condition.rs",
        "Condition/cond-p1-diabetes",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn patient_scope_without_patient_claim_grants_nothing() {
    // `backend` carries no patient claim.
    assert_insufficient(&as_client("backend", "patient/*.rs", "Observation").await);
    assert_insufficient(
        &as_client(
            "backend",
            "patient/Observation.rs",
            "Observation/obs-p1-glucose",
        )
        .await,
    );
}

#[tokio::test]
async fn system_scopes_reach_every_record_of_the_type() {
    let a = as_client("backend", "system/Observation.rs", "Observation?_count=100").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.entry_ids().len(), 11, "{:?}", a.entry_ids());
    assert_eq!(
        as_client(
            "backend-es256",
            "system/*.read",
            "Observation/obs-p2-glucose"
        )
        .await
        .status,
        200
    );
    assert_insufficient(
        &as_client(
            "backend",
            "system/Observation.rs",
            "Condition/cond-p2-hypertension",
        )
        .await,
    );
}

#[tokio::test]
async fn user_scopes_act_within_the_users_compartment() {
    let a = as_client(
        "practitioner-pr1",
        "user/Observation.rs",
        "Observation?_count=100",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut ids = a.entry_ids();
    ids.sort();
    assert_eq!(
        ids,
        [
            "Observation/obs-p1-absolute-ref",
            "Observation/obs-p1-glucose",
            "Observation/obs-p1-heart-rate",
            "Observation/obs-p1-versioned-ref",
            "Observation/obs-p10-glucose",
            "Observation/obs-p10-heart-rate",
        ]
    );
    // pr2 performed obs-p1-hba1c; pr1 did not.
    assert_eq!(
        as_client(
            "practitioner-pr1",
            "user/Observation.rs",
            "Observation/obs-p1-hba1c"
        )
        .await
        .status,
        404
    );
    assert_eq!(
        as_client(
            "practitioner-pr2",
            "user/Observation.rs",
            "Observation/obs-p1-hba1c"
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn finer_grained_scope_adds_its_constraint_to_searches() {
    let lab = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let a = as_client("patient-p1", lab, "Observation").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut ids = a.entry_ids();
    ids.sort();
    assert_eq!(
        ids,
        [
            "Observation/obs-p1-absolute-ref",
            "Observation/obs-p1-glucose",
            "Observation/obs-p1-hba1c"
        ]
    );
    // On a direct read the proxy evaluates the constraint on the record itself
    // (see `constraints.rs`): a laboratory Observation is released, a vital-signs one
    // looks missing.
    let a = as_client("patient-p1", lab, "Observation/obs-p1-glucose").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = as_client("patient-p1", lab, "Observation/obs-p1-heart-rate").await;
    assert_eq!(a.status, 404, "{}", a.text);
    // Where it cannot be checked record by record (type history), it is still refused.
    let a = as_client(
        "backend",
        "system/Observation.rs?category=laboratory",
        "Observation/_history",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "scope_constraint_unenforceable");
}

#[tokio::test]
async fn operations_other_than_match_and_everything_are_refused() {
    let a = as_client("backend", "system/*.cruds", "Patient/p1/$validate").await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "scope_operation_not_permitted");
}
