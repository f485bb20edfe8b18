//! Single writes (create, update, patch, delete, and their conditional forms) end to
//! end: the proxy binary in front of a real HAPI FHIR server of these tests' own (the
//! base bundle loaded; the shared server's demo data is never written), with tokens
//! from the real issuer (patient, user and system clients) and, for the `openfga`
//! tenant, a real OpenFGA server. Every "denied" is checked on the upstream itself:
//! nothing was written, or the record is as it was.
//!
//! Records these tests write have ids and identifiers unique to the test
//! ([`unique`]), so the tests do not see each other's writes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::harness::{Answer, Proxy, answer, tenant, tenants};
use crate::support::{self, FhirServer, FhirServerOptions};

/// The upstream of the write tests: a server of their own with the base bundle.
pub(crate) fn fhir() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| FhirServer::start(FhirServerOptions::default()))
}

/// One proxy for the compartment-mode tests: tenant `w` on [`fhir`].
pub(crate) fn proxy() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let base = fhir().base_url().to_owned();
        Proxy::start(move |port| tenants(vec![("w", tenant("w", port, &base, support::issuer()))]))
    })
}

/// An id (and identifier value) no other test uses.
fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "w-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const IDENT: &str = "urn:sfp:writes";

fn observation(id: Option<&str>, subject: &str, ident: &str) -> Value {
    let mut o = json!({
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": IDENT, "value": ident}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject}
    });
    if let Some(id) = id {
        o["id"] = json!(id);
    }
    o
}

async fn token(client: &str, scope: &str) -> String {
    support::token(client, scope, &proxy().base("w")).await
}

fn url(path: &str) -> String {
    format!("{}{path}", proxy().base("w"))
}

async fn send(
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = support::http_client()
        .request(method, url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    answer(req).await
}

// ---- the upstream, asked directly (the oracle) ----

async fn upstream_put(resource: &Value) {
    let path = format!(
        "{}/{}/{}",
        fhir().base_url(),
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let res = support::http_client()
        .put(path)
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
}

async fn upstream_get(path: &str) -> (u16, Value) {
    let res = support::http_client()
        .get(format!("{}{path}", fhir().base_url()))
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The ids of the upstream's Observations with identifier `ident`.
async fn upstream_with_identifier(ident: &str) -> Vec<Value> {
    let (status, bundle) =
        upstream_get(&format!("/Observation?identifier={IDENT}%7C{ident}")).await;
    assert_eq!(status, 200, "{bundle}");
    bundle["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

// ---------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_patient_creates_in_its_own_compartment_and_not_for_another_patient() {
    let t = token("patient-p1", "patient/Observation.cr").await;
    let mine = unique("own");
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p1", &mine)),
        &[],
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let location = a.header("location");
    assert!(
        location.starts_with(&url("/Observation/")),
        "Location is the proxy's: {location}"
    );
    assert!(!a.header("etag").is_empty());
    // It may read what it wrote: the body comes back.
    assert_eq!(a.json()["subject"]["reference"], "Patient/p1");
    assert_eq!(upstream_with_identifier(&mine).await.len(), 1);

    // For another patient: refused, and nothing is written.
    let theirs = unique("other");
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p2", &theirs)),
        &[],
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "write_outside_reach");
    // Also when the other patient only comes in as a performer.
    let mut both = observation(None, "Patient/p1", &theirs);
    both["performer"] = json!([{"reference": "Patient/p2"}]);
    let a = send(reqwest::Method::POST, "/Observation", &t, Some(&both), &[]).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(upstream_with_identifier(&theirs).await.is_empty());

    // The write's audit record names the interaction, the record and the patient.
    let id = location
        .trim_start_matches(&url("/Observation/"))
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let audit = proxy().audit_records();
    assert!(
        audit.iter().any(|r| r["fhir.interaction"] == "create"
            && r["fhir.resource_id"] == id.as_str()
            && r["fhir.patients"] == "p1"
            && r["authz.decision"] == "allow"),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|r| r["fhir.interaction"] == "create"
            && r["authz.reason"] == "write_outside_reach"
            && r["authz.decision"] == "deny"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn a_write_scope_without_read_scope_gets_no_body() {
    let t = token("patient-p1", "patient/Observation.c").await;
    for prefer in [None, Some("return=representation")] {
        let ident = unique("noread");
        let headers: Vec<(&str, &str)> = prefer.iter().map(|p| ("prefer", *p)).collect();
        let a = send(
            reqwest::Method::POST,
            "/Observation",
            &t,
            Some(&observation(None, "Patient/p1", &ident)),
            &headers,
        )
        .await;
        assert_eq!(a.status, 201, "{}", a.text);
        assert_eq!(a.text, "", "no body without a read scope ({prefer:?})");
        assert!(a.header("location").starts_with(&url("/Observation/")));
        assert!(!a.header("etag").is_empty());
        assert_eq!(upstream_with_identifier(&ident).await.len(), 1);
    }
    // v1 `write` is create, update and delete, and no read either.
    let t = token("patient-p1", "patient/Observation.write").await;
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p1", &unique("v1"))),
        &[],
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (201, ""));
    // A read-only token cannot write at all.
    let t = token("patient-p1", "patient/Observation.rs").await;
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p1", &unique("ro"))),
        &[],
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "scope_insufficient");
}

#[tokio::test]
async fn user_and_system_tokens_write_within_their_reach() {
    // pr1's user compartment: records it performs, whoever the patient.
    let t = token("practitioner-pr1", "user/Observation.cr").await;
    let ident = unique("pr1");
    let mut obs = observation(None, "Patient/p2", &ident);
    obs["performer"] = json!([{"reference": "Practitioner/pr1"}]);
    let a = send(reqwest::Method::POST, "/Observation", &t, Some(&obs), &[]).await;
    assert_eq!(a.status, 201, "{}", a.text);
    obs["performer"] = json!([{"reference": "Practitioner/pr2"}]);
    obs["identifier"][0]["value"] = json!(unique("pr2"));
    let a = send(reqwest::Method::POST, "/Observation", &t, Some(&obs), &[]).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(upstream_with_identifier(&ident).await.len(), 1);

    // A system token writes for any patient (without `r`: no body).
    let t = token("backend", "system/Observation.cud").await;
    let ident = unique("sys");
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p10", &ident)),
        &[],
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (201, ""));
    assert_eq!(upstream_with_identifier(&ident).await.len(), 1);
}

#[tokio::test]
async fn bodies_that_cannot_be_checked_are_refused() {
    let t = token("backend", "system/*.cu").await;
    let ident = unique("bad");
    let body = observation(None, "Patient/p1", &ident);
    // XML cannot be checked.
    let a = answer(
        support::http_client()
            .post(url("/Observation"))
            .bearer_auth(&t)
            .header("content-type", "application/fhir+xml")
            .body("<Observation xmlns=\"http://hl7.org/fhir\"/>"),
    )
    .await;
    assert_eq!(a.status, 415, "{}", a.text);
    // Another type than the path's.
    let a = send(reqwest::Method::POST, "/Condition", &t, Some(&body), &[]).await;
    assert_eq!((a.status, a.reason().as_str()), (400, "write_body_invalid"));
    // A member twice: the proxy and the upstream could read different subjects.
    let twice = format!(
        r#"{{"resourceType":"Observation","status":"final","subject":{{"reference":"Patient/p2"}},"subject":{{"reference":"Patient/p1"}},"identifier":[{{"system":"{IDENT}","value":"{ident}"}}],"code":{{"text":"x"}}}}"#
    );
    let a = answer(
        support::http_client()
            .post(url("/Observation"))
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(twice),
    )
    .await;
    assert_eq!((a.status, a.reason().as_str()), (400, "write_body_invalid"));
    assert!(upstream_with_identifier(&ident).await.is_empty());
}

// ---------------------------------------------------------------------------------
// update, patch, delete: the current version
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn an_update_that_moves_an_observation_to_another_patient_is_denied() {
    let id = unique("move");
    upstream_put(&observation(Some(&id), "Patient/p1", &id)).await;
    let t = token("patient-p1", "patient/Observation.ru").await;
    let path = format!("/Observation/{id}");
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&observation(Some(&id), "Patient/p2", &id)),
        &[],
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "write_outside_reach");
    let (_, now) = upstream_get(&path).await;
    assert_eq!(now["subject"]["reference"], "Patient/p1");
    assert_eq!(now["meta"]["versionId"], "1");

    // Within the compartment it goes through, and the body comes back (scope `r`).
    let mut changed = observation(Some(&id), "Patient/p1", &id);
    changed["status"] = json!("amended");
    let a = send(reqwest::Method::PUT, &path, &t, Some(&changed), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["status"], "amended");
    let (_, now) = upstream_get(&path).await;
    assert_eq!(now["meta"]["versionId"], "2");

    // Another patient's record cannot be taken over, not even into the caller's
    // compartment: it looks like a missing record.
    let theirs = unique("theirs");
    upstream_put(&observation(Some(&theirs), "Patient/p2", &theirs)).await;
    let a = send(
        reqwest::Method::PUT,
        &format!("/Observation/{theirs}"),
        &t,
        Some(&observation(Some(&theirs), "Patient/p1", &theirs)),
        &[],
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    let (_, now) = upstream_get(&format!("/Observation/{theirs}")).await;
    assert_eq!(now["subject"]["reference"], "Patient/p2");
}

#[tokio::test]
async fn an_update_of_a_missing_id_is_checked_as_a_create() {
    let t = token("patient-p1", "patient/Observation.u").await;
    let id = unique("upsert");
    let path = format!("/Observation/{id}");
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&observation(Some(&id), "Patient/p2", &id)),
        &[],
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(upstream_get(&path).await.0, 404);
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&observation(Some(&id), "Patient/p1", &id)),
        &[],
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (201, ""), "no `r`, no body");
    assert_eq!(upstream_get(&path).await.0, 200);
}

/// A lost update: the upstream's answer to a stale `If-Match`, its status passed
/// through (HAPI answers it with 409 Conflict, HAPI-0989, where FHIR says 412), its
/// OperationOutcome only to tokens that reach every record of the type. An `If-Match` naming a version the proxy's check did
/// not see is the proxy's own 412.
#[tokio::test]
async fn a_lost_update_is_the_upstreams_conflict() {
    let id = unique("ifmatch");
    upstream_put(&observation(Some(&id), "Patient/p1", &id)).await;
    let path = format!("/Observation/{id}");
    let mut v2 = observation(Some(&id), "Patient/p1", &id);
    v2["status"] = json!("amended");
    upstream_put(&v2).await;
    let t = token("patient-p1", "patient/Observation.ru").await;
    let mut mine = observation(Some(&id), "Patient/p1", &id);
    mine["status"] = json!("cancelled");
    // The client read version 1; the record is at 2 now.
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&mine),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(a.status, 409, "{}", a.text);
    // For a patient token the status passes, the upstream's text does not (it could
    // name records outside the token's reach).
    assert_eq!(a.reason(), "upstream_write_refused", "{}", a.text);
    assert!(!a.text.contains("HAPI-"), "{}", a.text);
    // A system token gets the upstream's own OperationOutcome.
    let sys = token("backend", "system/Observation.ru").await;
    let a = send(
        reqwest::Method::PUT,
        &path,
        &sys,
        Some(&mine),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(a.status, 409, "{}", a.text);
    let outcome = a.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome.to_string().contains("HAPI-0989"),
        "the upstream's own OperationOutcome: {outcome}"
    );
    // A version the proxy's check never saw is not sent at all.
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&mine),
        &[("if-match", "W/\"7\"")],
    )
    .await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (412, "write_version_unchecked")
    );
    let (_, now) = upstream_get(&path).await;
    assert_eq!(
        (now["status"].as_str(), now["meta"]["versionId"].as_str()),
        (Some("amended"), Some("2"))
    );
    // With the current version it goes through; the ETag is the new version.
    let a = send(
        reqwest::Method::PUT,
        &path,
        &t,
        Some(&mine),
        &[("if-match", "W/\"2\"")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("etag"), "W/\"3\"");
}

#[tokio::test]
async fn json_patch_is_allowed_and_a_moving_patch_is_denied() {
    let id = unique("patch");
    upstream_put(&observation(Some(&id), "Patient/p1", &id)).await;
    let path = format!("/Observation/{id}");
    let t = token("patient-p1", "patient/Observation.ru").await;
    let patch = |ops: Value| {
        let t = t.clone();
        let path = path.clone();
        async move {
            answer(
                support::http_client()
                    .patch(url(&path))
                    .bearer_auth(&t)
                    .header("content-type", "application/json-patch+json")
                    .body(ops.to_string()),
            )
            .await
        }
    };
    let a = patch(json!([{"op": "replace", "path": "/status", "value": "amended"}])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["status"], "amended");
    let a = patch(json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]))
        .await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (403, "write_outside_reach")
    );
    // A FHIRPath Patch may not touch the subject.
    let fhirpath = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"},
        {"name": "path", "valueString": "Observation.subject"},
        {"name": "value", "valueReference": {"reference": "Patient/p2"}}
    ]}]});
    let a = answer(
        support::http_client()
            .patch(url(&path))
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(fhirpath.to_string()),
    )
    .await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (403, "patch_compartment_element")
    );
    let (_, now) = upstream_get(&path).await;
    assert_eq!(now["subject"]["reference"], "Patient/p1");
    assert_eq!(now["status"], "amended");
    // Another patient's record: as missing.
    let theirs = unique("patch-theirs");
    upstream_put(&observation(Some(&theirs), "Patient/p2", &theirs)).await;
    let a = answer(
        support::http_client()
            .patch(url(&format!("/Observation/{theirs}")))
            .bearer_auth(&t)
            .header("content-type", "application/json-patch+json")
            .body(json!([{"op": "replace", "path": "/status", "value": "amended"}]).to_string()),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(
        upstream_get(&format!("/Observation/{theirs}")).await.1["status"],
        "final"
    );
}

#[tokio::test]
async fn delete_of_another_patients_record_is_denied() {
    let theirs = unique("del-theirs");
    let mine = unique("del-mine");
    upstream_put(&observation(Some(&theirs), "Patient/p2", &theirs)).await;
    upstream_put(&observation(Some(&mine), "Patient/p1", &mine)).await;
    let t = token("patient-p1", "patient/Observation.d").await;
    let a = send(
        reqwest::Method::DELETE,
        &format!("/Observation/{theirs}"),
        &t,
        None,
        &[],
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(upstream_get(&format!("/Observation/{theirs}")).await.0, 200);
    let a = send(
        reqwest::Method::DELETE,
        &format!("/Observation/{mine}"),
        &t,
        None,
        &[],
    )
    .await;
    assert!(
        a.status == 200 || a.status == 204,
        "{} {}",
        a.status,
        a.text
    );
    assert_eq!(upstream_get(&format!("/Observation/{mine}")).await.0, 410);
    // A system token may delete anyone's.
    let t = token("backend", "system/Observation.d").await;
    let a = send(
        reqwest::Method::DELETE,
        &format!("/Observation/{theirs}"),
        &t,
        None,
        &[],
    )
    .await;
    assert!(
        a.status == 200 || a.status == 204,
        "{} {}",
        a.status,
        a.text
    );
    assert_eq!(upstream_get(&format!("/Observation/{theirs}")).await.0, 410);
}

// ---------------------------------------------------------------------------------
// conditional writes
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn conditional_writes_whose_criteria_match_another_patients_record_do_not_touch_it() {
    let ident = unique("cond");
    let theirs = unique("cond-theirs");
    upstream_put(&observation(Some(&theirs), "Patient/p2", &ident)).await;
    let criteria = format!("identifier={IDENT}%7C{ident}");
    let t = token("patient-p1", "patient/Observation.cud").await;

    // Conditional update: narrowed to p1's records, it matches nothing and creates.
    let a = send(
        reqwest::Method::PUT,
        &format!("/Observation?{criteria}"),
        &t,
        Some(&observation(None, "Patient/p1", &ident)),
        &[],
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let (_, now) = upstream_get(&format!("/Observation/{theirs}")).await;
    assert_eq!(
        (
            now["subject"]["reference"].as_str(),
            now["meta"]["versionId"].as_str()
        ),
        (Some("Patient/p2"), Some("1"))
    );
    assert_eq!(upstream_with_identifier(&ident).await.len(), 2);

    // Conditional create (`If-None-Exist`): p2's record does not count as a match.
    let ident2 = unique("ifnone");
    let theirs2 = unique("ifnone-theirs");
    upstream_put(&observation(Some(&theirs2), "Patient/p2", &ident2)).await;
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p1", &ident2)),
        &[("if-none-exist", &format!("identifier={IDENT}|{ident2}"))],
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(upstream_with_identifier(&ident2).await.len(), 2);
    // Now p1 has one: the same create matches it and writes nothing new.
    let a = send(
        reqwest::Method::POST,
        "/Observation",
        &t,
        Some(&observation(None, "Patient/p1", &ident2)),
        &[("if-none-exist", &format!("identifier={IDENT}|{ident2}"))],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(upstream_with_identifier(&ident2).await.len(), 2);

    // Conditional delete: only p1's record goes.
    let a = send(
        reqwest::Method::DELETE,
        &format!("/Observation?{criteria}"),
        &t,
        None,
        &[],
    )
    .await;
    assert!(
        a.status == 200 || a.status == 204,
        "{} {}",
        a.status,
        a.text
    );
    let left = upstream_with_identifier(&ident).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["id"], theirs.as_str());

    // Criteria a search would refuse are refused.
    let a = send(
        reqwest::Method::DELETE,
        "/Observation?subject:Patient.name=x",
        &t,
        None,
        &[],
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "search_parameter_not_allowed");
    // ... and so are parameters the upstream does not declare (a lenient upstream
    // would ignore them and match more).
    let a = send(
        reqwest::Method::PUT,
        &format!("/Observation?{criteria}&no-such-param=x"),
        &t,
        Some(&observation(None, "Patient/p1", &ident)),
        &[],
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "search_parameter_unknown");
    assert_eq!(upstream_with_identifier(&ident).await.len(), 1);
}

// ---------------------------------------------------------------------------------
// OpenFGA
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn openfga_can_write_decides_for_user_tokens() {
    // pr1 is a clinician of p1's care team (can_write) and a member of p2's (can_view).
    let t = |u: &str, r: &str, o: &str| json!({"user": u, "relation": r, "object": o});
    let tuples = vec![
        t("user:practitioner-pr1", "clinician", "group:team-1"),
        t("group:team-1", "care_team", "patient:p1"),
        t("user:practitioner-pr1", "member", "group:team-2"),
        t("group:team-2", "care_team", "patient:p2"),
    ];
    let model: Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("fga-model/model.json")).unwrap(),
    )
    .unwrap();
    let store = support::openfga().create_store("writes", &model, &tuples);
    let base = fhir().base_url().to_owned();
    let proxy = Proxy::start(move |port| {
        let mut tn = tenant("wf", port, &base, support::issuer());
        tn["authorization"] = json!({"mode": "openfga", "openfga": {
            "api_url": store.api_url, "store_id": store.store_id,
            "authorization_model_id": store.model_id, "timeout_ms": 5000
        }});
        tenants(vec![("wf", tn)])
    });
    let tok = support::token(
        "practitioner-pr1",
        "user/Observation.cruds",
        &proxy.base("wf"),
    )
    .await;
    let post = |body: Value| {
        let url = format!("{}/Observation", proxy.base("wf"));
        let tok = tok.clone();
        async move {
            answer(
                support::http_client()
                    .post(url)
                    .bearer_auth(tok)
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string()),
            )
            .await
        }
    };
    let ident = unique("fga-p1");
    let a = post(observation(None, "Patient/p1", &ident)).await;
    assert_eq!(a.status, 201, "{}", a.text);
    // can_write implies can_view: the body comes back.
    assert_eq!(a.json()["subject"]["reference"], "Patient/p1");
    let ident2 = unique("fga-p2");
    let a = post(observation(None, "Patient/p2", &ident2)).await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (403, "write_outside_reach")
    );
    assert!(upstream_with_identifier(&ident2).await.is_empty());
    // An existing p2 record (viewable, not writable) cannot be updated.
    let theirs = unique("fga-theirs");
    upstream_put(&observation(Some(&theirs), "Patient/p2", &theirs)).await;
    let mut changed = observation(Some(&theirs), "Patient/p2", &theirs);
    changed["status"] = json!("amended");
    let a = answer(
        support::http_client()
            .put(format!("{}/Observation/{theirs}", proxy.base("wf")))
            .bearer_auth(&tok)
            .header("content-type", "application/fhir+json")
            .body(changed.to_string()),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(
        upstream_get(&format!("/Observation/{theirs}")).await.1["status"],
        "final"
    );
    // Conditional writes cannot be narrowed to an OpenFGA patient list: refused.
    let a = answer(
        support::http_client()
            .delete(format!(
                "{}/Observation?identifier={IDENT}%7C{ident}",
                proxy.base("wf")
            ))
            .bearer_auth(&tok),
    )
    .await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (403, "search_not_narrowable")
    );
    assert_eq!(upstream_with_identifier(&ident).await.len(), 1);
}

// ---------------------------------------------------------------------------------
// what the upstream receives (a capturing relay in front of the real server)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn the_forwarded_write_is_pinned_to_the_checked_version() {
    use crate::observability::{Relay, host_port};
    let relay = Relay::start(&host_port(fhir().base_url()));
    let upstream = format!("http://127.0.0.1:{}/fhir", relay.port);
    let proxy = Proxy::start(move |port| {
        tenants(vec![(
            "wr",
            tenant("wr", port, &upstream, support::issuer()),
        )])
    });
    let id = unique("pinned");
    upstream_put(&observation(Some(&id), "Patient/p1", &id)).await;
    let tok = support::token("patient-p1", "patient/Observation.u", &proxy.base("wr")).await;
    let mut changed = observation(Some(&id), "Patient/p1", &id);
    changed["status"] = json!("amended");
    let a = answer(
        support::http_client()
            .put(format!("{}/Observation/{id}", proxy.base("wr")))
            .bearer_auth(&tok)
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=representation; handling=lenient")
            .body(changed.to_string()),
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (200, ""), "no `r`: no body");
    let exchanges = relay.exchanges();
    let lines: Vec<&str> = exchanges.iter().map(|e| e.line()).collect();
    let read = lines
        .iter()
        .position(|l| l.starts_with(&format!("GET /fhir/Observation/{id} ")))
        .unwrap_or_else(|| panic!("the current version is read first: {lines:?}"));
    let write = lines
        .iter()
        .position(|l| l.starts_with(&format!("PUT /fhir/Observation/{id} ")))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(read < write, "{lines:?}");
    let put = &exchanges[write];
    assert_eq!(put.request_header("if-match"), vec!["W/\"1\"".to_owned()]);
    assert_eq!(
        put.request_header("content-type"),
        vec!["application/fhir+json".to_owned()]
    );
    // One Prefer: the token may not read, so the upstream is asked for no body; the
    // client's `handling=lenient` does not pass.
    assert_eq!(
        put.request_header("prefer"),
        vec!["return=minimal, handling=strict".to_owned()]
    );
    assert!(put.request_header("authorization").is_empty());

    // A conditional create's `If-None-Exist` goes narrowed.
    let tok = support::token("patient-p1", "patient/Observation.c", &proxy.base("wr")).await;
    let ident = unique("pinned-ifnone");
    let a = answer(
        support::http_client()
            .post(format!("{}/Observation", proxy.base("wr")))
            .bearer_auth(&tok)
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", format!("identifier={IDENT}|{ident}"))
            .body(observation(None, "Patient/p1", &ident).to_string()),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let post = relay
        .exchanges()
        .into_iter()
        .find(|e| e.line().starts_with("POST /fhir/Observation "))
        .unwrap();
    let inex = post.request_header("if-none-exist");
    assert_eq!(inex.len(), 1, "{inex:?}");
    assert!(
        inex[0].ends_with("&subject=Patient%2Fp1") && inex[0].contains(&ident),
        "{inex:?}"
    );

    // A conditional update's criteria go narrowed, in the query.
    let tok = support::token("patient-p1", "patient/Observation.u", &proxy.base("wr")).await;
    let a = answer(
        support::http_client()
            .put(format!(
                "{}/Observation?identifier={IDENT}%7C{ident}",
                proxy.base("wr")
            ))
            .bearer_auth(&tok)
            .header("content-type", "application/fhir+json")
            .body(observation(None, "Patient/p1", &ident).to_string()),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let put = relay
        .exchanges()
        .into_iter()
        .find(|e| e.line().starts_with("PUT /fhir/Observation?"))
        .unwrap();
    assert!(
        put.line().contains(&ident) && put.line().contains("&subject=Patient%2Fp1 "),
        "{}",
        put.line()
    );

    // HAPI ignores `If-Match` on DELETE: a restricted token's delete goes by `_id` and
    // the narrowing, so the upstream re-checks the compartment as it deletes.
    let tok = support::token("patient-p1", "patient/Observation.d", &proxy.base("wr")).await;
    let a = answer(
        support::http_client()
            .delete(format!("{}/Observation/{id}", proxy.base("wr")))
            .bearer_auth(&tok),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let delete = relay
        .exchanges()
        .into_iter()
        .find(|e| e.line().starts_with("DELETE /fhir/Observation"))
        .unwrap();
    assert!(
        delete.line().starts_with(&format!(
            "DELETE /fhir/Observation?_id={id}&subject=Patient%2Fp1 "
        )),
        "{}",
        delete.line()
    );
    assert_eq!(upstream_get(&format!("/Observation/{id}")).await.0, 410);
}
