//! `openfga` tenants end to end: the proxy binary against a real upstream FHIR server
//! of their own (the base bundle plus 1,100 generated patients, each with one
//! Observation, and `obs-cross`: subject p1, performer p2) and a real OpenFGA server
//! (`support::openfga`, stores written through its HTTP API). Faults that the real
//! server cannot be made to produce on demand (errors, stalls, a stream cut at its
//! deadline) come from the OpenFGA-API-compatible test server (`tests/openfga/`).
//!
//! The world (per test, in a store of its own): `organization:hospital` is the parent of
//! `ward-a`; `group:team-a` members view `ward-a`, `group:team-h` members view `hospital`;
//! `practitioner-pr1` is in team-a, `practitioner-pr2` in team-h; p1 and the 1,100
//! `fp*` patients are assigned to ward-a, p2 to ward-b (no parent), p10 to nothing;
//! `system:backend` is the consented system of p2.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Proxy, tenant, tenants};
use crate::openfga::engine::TupleKey;
use crate::openfga::server::{Control, Mode, Options, TestServer};
use crate::support::{self, FhirServer, FhirServerOptions};

const EXTRA_PATIENTS: usize = 1100;

fn fp(i: usize) -> String {
    format!("fp{i:04}")
}

/// The upstream of these tests: base bundle plus the generated patients.
fn fhir() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut entries = Vec::new();
        let mut put = |resource: Value| {
            let rt = resource["resourceType"].as_str().unwrap().to_owned();
            let id = resource["id"].as_str().unwrap().to_owned();
            entries.push(json!({
                "resource": resource,
                "request": { "method": "PUT", "url": format!("{rt}/{id}") }
            }));
        };
        for i in 0..EXTRA_PATIENTS {
            put(json!({"resourceType": "Patient", "id": fp(i), "active": true}));
            put(json!({
                "resourceType": "Observation", "id": format!("fobs-{}", fp(i)),
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/{}", fp(i))}
            }));
        }
        put(json!({
            "resourceType": "Observation", "id": "obs-cross", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Patient/p2"}]
        }));
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let dir = std::env::temp_dir().join(format!("sfp-fga-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fga-bundle.json");
        std::fs::write(&path, serde_json::to_vec(&bundle).unwrap()).unwrap();
        let mut options = FhirServerOptions::default();
        options.load.push(path);
        FhirServer::start(options)
    })
}

fn start_fga(options: Options) -> TestServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tx.send(TestServer::start(options).await.unwrap()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

fn model() -> Value {
    let path = support::repo_root().join("fga-model/model.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn t(user: &str, relation: &str, object: &str) -> TupleKey {
    TupleKey::new(user, relation, object)
}

fn world() -> Vec<TupleKey> {
    let mut tuples = vec![
        t("organization:hospital", "parent", "organization:ward-a"),
        t("group:team-a#member", "viewer", "organization:ward-a"),
        t("group:team-h#member", "viewer", "organization:hospital"),
        t("user:practitioner-pr1", "member", "group:team-a"),
        t("user:practitioner-pr2", "member", "group:team-h"),
        t("organization:ward-a", "assigned_organization", "patient:p1"),
        t("organization:ward-b", "assigned_organization", "patient:p2"),
        t("system:backend", "consented_system", "patient:p2"),
    ];
    for i in 0..EXTRA_PATIENTS {
        tuples.push(t(
            "organization:ward-a",
            "assigned_organization",
            &format!("patient:{}", fp(i)),
        ));
    }
    tuples
}

/// A store of its own with the world's tuples on the shared real OpenFGA server,
/// created through its HTTP API: `(api_url, store_id, model_id)`.
fn store() -> (String, String, String) {
    store_on(support::openfga())
}

/// As [`store`], on `server`.
fn store_on(server: &support::OpenFgaServer) -> (String, String, String) {
    let tuples: Vec<Value> = world().iter().map(TupleKey::to_json).collect();
    let s = server.create_store("fga-e2e", &model(), &tuples);
    (s.api_url, s.store_id, s.model_id)
}

/// The same world on a fault-injecting test server (faults the real server cannot be
/// made to produce on demand: errors, stalls, streams cut at its deadline).
fn test_store(server: &TestServer) -> (String, String, String) {
    let (s, m) = server.preload("fga-e2e", &model(), &world()).unwrap();
    (server.url(), s, m)
}

/// An `openfga` tenant on `store` with extra `openfga` settings.
fn fga_tenant(id: &str, port: u16, store: &(String, String, String), extra: Value) -> Value {
    let mut t = tenant(id, port, fhir().base_url(), support::issuer());
    let mut openfga = json!({
        "api_url": store.0,
        "store_id": store.1,
        "authorization_model_id": store.2,
        "timeout_ms": 5000,
    });
    for (k, v) in extra.as_object().unwrap() {
        openfga[k] = v.clone();
    }
    t["authorization"] = json!({ "mode": "openfga", "openfga": openfga });
    t
}

fn start(list: Vec<(&str, Value)>) -> Proxy {
    start_with_env(list, &[])
}

/// As [`start`], with environment variables for the proxy (credentials).
fn start_with_env(list: Vec<(&str, Value)>, env: &[(&str, &str)]) -> Proxy {
    let list: Vec<(String, Value)> = list.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Proxy::start_with_env(
        move |port| {
            tenants(
                list.iter()
                    .map(|(id, extra)| {
                        let store = serde_json::from_value::<(String, String, String)>(
                            extra["store"].clone(),
                        )
                        .unwrap();
                        let mut settings = extra.clone();
                        settings.as_object_mut().unwrap().remove("store");
                        (id.as_str(), fga_tenant(id, port, &store, settings))
                    })
                    .collect(),
            )
        },
        env,
    )
}

fn settings(store: &(String, String, String), extra: Value) -> Value {
    let mut v = extra;
    v["store"] = json!([store.0, store.1, store.2]);
    v
}

async fn get(proxy: &Proxy, tenant: &str, client: &str, scope: &str, path: &str) -> (u16, Value) {
    let token = support::token(client, scope, &proxy.base(tenant)).await;
    get_with(&token, &format!("{}{path}", proxy.base(tenant))).await
}

async fn get_with(token: &str, url: &str) -> (u16, Value) {
    let res = support::http_client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Every entry id of a search, following `next` links; asserts that no page carries a
/// `total` unless it is the whole answer.
async fn search_all(
    proxy: &Proxy,
    tenant: &str,
    client: &str,
    scope: &str,
    path: &str,
) -> Vec<String> {
    let token = support::token(client, scope, &proxy.base(tenant)).await;
    let mut url = format!("{}{path}", proxy.base(tenant));
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let (status, page) = get_with(&token, &url).await;
        assert_eq!(status, 200, "{url}: {page}");
        pages += 1;
        assert!(pages < 200, "too many pages");
        for e in page["entry"].as_array().into_iter().flatten() {
            if e["search"]["mode"] == "match" || e["search"]["mode"].is_null() {
                ids.push(format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                ));
            }
        }
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str());
        match next {
            Some(n) => {
                assert!(n.starts_with(&proxy.base(tenant)), "{n}");
                url = n.to_owned();
            }
            None => break,
        }
    }
    ids
}

fn outcome_reason(body: &Value) -> String {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["details"]["coding"][0]["code"]
        .as_str()
        .or(body["issue"][0]["diagnostics"].as_str())
        .unwrap_or_default()
        .to_owned()
}

const PR_SCOPES: &str = "user/Patient.rs user/Observation.rs";

#[tokio::test]
async fn a_care_team_member_reads_its_patients_records_and_not_others() {
    let store = store();
    let proxy = start(vec![("fga", settings(&store, json!({})))]);
    let read = |path: &'static str| get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, path);
    for path in [
        "/Patient/p1",
        "/Observation/obs-p1-glucose",
        "/Patient/fp0005",
        "/Observation/fobs-fp1099",
    ] {
        let (status, body) = read(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        "/Patient/p2",
        "/Observation/obs-p2-glucose",
        "/Patient/p10",
        "/Patient/p2/Observation",
        "/Patient/does-not-exist",
    ] {
        let (status, body) = read(path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // A compartment search of an allowed patient: every record is re-checked; all-of
    // (the default) drops obs-cross, which also belongs to p2.
    let ids = search_all(
        &proxy,
        "fga",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/p1/Observation",
    )
    .await;
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert!(!ids.contains(&"Observation/obs-cross".to_owned()));
    // Audit: who, what, which patient, why.
    let audit = proxy.audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r.to_string().contains("record_denied")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn searches_return_exactly_the_allowed_patients_records_beyond_1000() {
    let store = store();
    let proxy = start(vec![(
        "fga",
        settings(&store, json!({ "search_chunk_size": 200 })),
    )]);
    let patients: BTreeSet<String> = search_all(
        &proxy,
        "fga",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient?_count=300",
    )
    .await
    .into_iter()
    .collect();
    let mut expected: BTreeSet<String> = (0..EXTRA_PATIENTS)
        .map(|i| format!("Patient/{}", fp(i)))
        .collect();
    expected.insert("Patient/p1".to_owned());
    assert!(expected.len() > 1000);
    assert_eq!(patients, expected);

    // Observations: the oracle is the upstream itself, asked directly for every
    // vital-signs Observation, kept where every patient it belongs to is allowed.
    let allowed: BTreeSet<String> = expected
        .iter()
        .map(|p| p.trim_start_matches("Patient/").to_owned())
        .collect();
    let mut oracle = BTreeSet::new();
    let mut url = format!(
        "{}/Observation?category=vital-signs&_count=500",
        fhir().base_url()
    );
    loop {
        let page: Value = support::http_client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for e in page["entry"].as_array().into_iter().flatten() {
            let r = &e["resource"];
            let mut refs = vec![
                r["subject"]["reference"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ];
            for p in r["performer"].as_array().into_iter().flatten() {
                refs.push(p["reference"].as_str().unwrap_or_default().to_owned());
            }
            let pats: Vec<String> = refs
                .iter()
                .filter_map(|x| {
                    x.rsplit_once("Patient/")
                        .map(|(_, id)| id.split('/').next().unwrap().to_owned())
                })
                .collect();
            if !pats.is_empty() && pats.iter().all(|p| allowed.contains(p)) {
                oracle.insert(format!("Observation/{}", r["id"].as_str().unwrap()));
            }
        }
        match page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => url = l["url"].as_str().unwrap().to_owned(),
            None => break,
        }
    }
    assert!(oracle.len() > 1000);
    let found = search_all(
        &proxy,
        "fga",
        "practitioner-pr1",
        PR_SCOPES,
        "/Observation?category=vital-signs&_count=70",
    )
    .await;
    let found_set: BTreeSet<String> = found.iter().cloned().collect();
    assert_eq!(found.len(), found_set.len(), "no record twice");
    assert_eq!(found_set, oracle);
    // The patient list went upstream in POST bodies, never in a URL.
    let requests = fhir()
        .requests_once(|r| r.starts_with("POST /fhir/Observation/_search"))
        .await;
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("POST /fhir/Observation/_search")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.starts_with("GET")
            && (r.contains("%2CPatient") || r.contains(",Patient/") || r.contains("%2Cfp0"))),
        "a patient list went upstream in a URL"
    );
}

#[tokio::test]
async fn an_included_record_of_another_patient_is_dropped() {
    let store = store();
    let proxy = start(vec![
        (
            "anyof",
            settings(&store, json!({ "multi_patient_policy": "any_of" })),
        ),
        (
            "allof",
            settings(&store, json!({ "multi_patient_policy": "all_of" })),
        ),
    ]);
    let path =
        "/Observation?_id=obs-cross&_include=Observation:performer&_include=Observation:subject";
    let (status, body) = get(&proxy, "anyof", "practitioner-pr1", PR_SCOPES, path).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            )
        })
        .collect();
    assert!(ids.contains(&"Observation/obs-cross".to_owned()), "{ids:?}");
    assert!(ids.contains(&"Patient/p1".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"Patient/p2".to_owned()), "{ids:?}");
    // The upstream did include p2: the proxy dropped it.
    let direct: Value = support::http_client()
        .get(format!("{}{path}", fhir().base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(direct.to_string().contains("\"id\":\"p2\""));
    // All-of: a record that also belongs to p2 is not released at all.
    let (status, body) = get(&proxy, "allof", "practitioner-pr1", PR_SCOPES, path).await;
    assert_eq!(status, 200, "{body}");
    let entries = body["entry"].as_array().cloned().unwrap_or_default();
    assert!(
        !entries.iter().any(|e| e["resource"]["id"] == "obs-cross"),
        "{body}"
    );
    let (status, _) = get(
        &proxy,
        "allof",
        "practitioner-pr1",
        PR_SCOPES,
        "/Observation/obs-cross",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(
        &proxy,
        "anyof",
        "practitioner-pr1",
        PR_SCOPES,
        "/Observation/obs-cross",
    )
    .await;
    assert_eq!(status, 200);
}

async fn write_tuples(store: &(String, String, String), writes: &[TupleKey], deletes: &[TupleKey]) {
    let keys = |ts: &[TupleKey]| json!({ "tuple_keys": ts.iter().map(TupleKey::to_json).collect::<Vec<_>>() });
    let mut body = json!({ "authorization_model_id": store.2 });
    if !writes.is_empty() {
        body["writes"] = keys(writes);
    }
    if !deletes.is_empty() {
        body["deletes"] = keys(deletes);
    }
    let res = support::http_client()
        .post(format!("{}/stores/{}/write", store.0, store.1))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

/// Polls `path` until it answers `want` (bounded; the bound is a correctness limit,
/// not a performance threshold).
async fn eventually(proxy: &Proxy, tenant: &str, client: &str, path: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = get(proxy, tenant, client, PR_SCOPES, path).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {want} (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn organization_and_group_changes_take_effect_after_the_cache_ttl() {
    let store = store();
    let proxy = start(vec![
        ("short", settings(&store, json!({ "cache_ttl_seconds": 1 }))),
        (
            "long",
            settings(&store, json!({ "cache_ttl_seconds": 3600 })),
        ),
    ]);
    // pr2 views the hospital's tree: ward-a (p1), not ward-b (p2).
    for tenant in ["short", "long"] {
        let (s, _) = get(&proxy, tenant, "practitioner-pr2", PR_SCOPES, "/Patient/p1").await;
        assert_eq!(s, 200);
        let (s, _) = get(&proxy, tenant, "practitioner-pr2", PR_SCOPES, "/Patient/p2").await;
        assert_eq!(s, 404);
    }
    // A search paged across chunks, stopped after its first page.
    let token = support::token("practitioner-pr2", PR_SCOPES, &proxy.base("short")).await;
    let (status, first) =
        get_with(&token, &format!("{}/Patient?_count=5", proxy.base("short"))).await;
    assert_eq!(status, 200, "{first}");
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .unwrap()
        .to_owned();
    // Hierarchy: ward-b joins the hospital.
    write_tuples(
        &store,
        &[t("organization:hospital", "parent", "organization:ward-b")],
        &[],
    )
    .await;
    eventually(&proxy, "short", "practitioner-pr2", "/Patient/p2", 200).await;
    // The search's patient list changed under the cursor: refused, never shifted.
    // (Once the cached list has expired too.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = get_with(&token, &next).await;
        if status != 200 {
            assert_eq!(status, 409, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "the cursor never went stale");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(outcome_reason(&body), "cursor_stale");
    // The long-TTL tenant keeps its cached decision.
    let (s, _) = get(&proxy, "long", "practitioner-pr2", PR_SCOPES, "/Patient/p2").await;
    assert_eq!(s, 404);
    // Membership: pr2 leaves team-h.
    write_tuples(
        &store,
        &[],
        &[t("user:practitioner-pr2", "member", "group:team-h")],
    )
    .await;
    eventually(&proxy, "short", "practitioner-pr2", "/Patient/p1", 404).await;
    let (s, _) = get(&proxy, "long", "practitioner-pr2", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_system_token_sees_its_consented_patients_and_a_patient_token_its_compartment() {
    let store = store();
    let proxy = start(vec![("fga", settings(&store, json!({})))]);
    let ids = search_all(
        &proxy,
        "fga",
        "backend",
        "system/Observation.rs",
        "/Observation?_count=50",
    )
    .await;
    let set: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        set,
        BTreeSet::from([
            "Observation/obs-p2-glucose",
            "Observation/obs-p2-heart-rate"
        ])
    );
    let ids = search_all(
        &proxy,
        "fga",
        "patient-p1",
        "patient/Observation.rs",
        "/Observation?_count=50",
    )
    .await;
    assert_eq!(
        ids.len(),
        7,
        "p1's compartment, obs-cross included: {ids:?}"
    );
    let (s, _) = get(
        &proxy,
        "fga",
        "patient-p1",
        "patient/Observation.rs",
        "/Observation/obs-p2-glucose",
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn truncation_is_never_silent() {
    // More allowed patients than the tenant lists: refused, not cut.
    let store = store();
    let proxy = start(vec![(
        "fga",
        settings(&store, json!({ "max_listed_patients": 1000 })),
    )]);
    let (status, body) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Observation").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.to_string().contains("more than 1000 patients"),
        "{body}"
    );
    // Reads do not list: they still work.
    let (status, _) = get(
        &proxy,
        "fga",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/fp0001",
    )
    .await;
    assert_eq!(status, 200);

    // A server whose ListObjects deadline cuts the stream (silently, as OpenFGA's does):
    // the proxy cannot prove the list complete and fails closed.
    let slow = start_fga(Options {
        list_objects_deadline: Duration::from_millis(300),
        control: Control {
            object_delay_ms: 5,
            ..Control::default()
        },
        ..Options::default()
    });
    let slow_store = test_store(&slow);
    let proxy = start(vec![(
        "fga",
        settings(&slow_store, json!({ "list_objects_deadline_ms": 300 })),
    )]);
    let (status, body) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Patient").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(outcome_reason(&body), "fga_incomplete", "{body}");
}

#[tokio::test]
async fn openfga_down_is_503_and_the_breaker_stops_calling_it() {
    // Nothing listens.
    let closed = (
        "http://127.0.0.1:9".to_owned(),
        "01HZZZZZZZZZZZZZZZZZZZZZZZ".to_owned(),
        "01HZZZZZZZZZZZZZZZZZZZZZZZ".to_owned(),
    );
    let faulty = start_fga(Options::default());
    let faulty_store = test_store(&faulty);
    let proxy = start(vec![
        ("down", settings(&closed, json!({}))),
        (
            "faulty",
            settings(
                &faulty_store,
                json!({ "timeout_ms": 300, "breaker_failure_threshold": 2, "breaker_cool_down_ms": 600000 }),
            ),
        ),
    ]);
    let (status, body) = get(&proxy, "down", "practitioner-pr1", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(outcome_reason(&body), "fga_unavailable");
    let (status, body) = get(
        &proxy,
        "down",
        "practitioner-pr1",
        PR_SCOPES,
        "/Observation",
    )
    .await;
    assert_eq!(status, 503, "{body}");

    // Erroring, then stalled: 503 each time; after two failures the breaker opens and
    // the proxy answers 503 without calling OpenFGA, even once it is healthy again.
    faulty.set_mode(Mode::Error);
    let (status, _) = get(
        &proxy,
        "faulty",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/p1",
    )
    .await;
    assert_eq!(status, 503);
    faulty.set_mode(Mode::Stall);
    let (status, _) = get(
        &proxy,
        "faulty",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/fp0001",
    )
    .await;
    assert_eq!(status, 503);
    faulty.set_mode(Mode::Ok);
    let (status, body) = get(
        &proxy,
        "faulty",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/fp0002",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        proxy.log().contains("circuit breaker open"),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn a_server_with_a_pre_shared_key_is_called_with_it_and_a_wrong_key_fails_closed() {
    const KEY: &str = "fga-e2e-preshared-key-41d7";
    let server = support::OpenFgaServer::start(support::OpenFgaOptions {
        preshared_key: Some(KEY.to_owned()),
        ..Default::default()
    });
    let store = store_on(&server);
    let credentials =
        |var: &str| json!({ "credentials": { "method": "api_token", "api_token_env": var } });
    let proxy = start_with_env(
        vec![
            ("keyed", settings(&store, credentials("FGA_E2E_RIGHT_KEY"))),
            (
                "wrongkey",
                settings(&store, credentials("FGA_E2E_WRONG_KEY")),
            ),
        ],
        &[
            ("FGA_E2E_RIGHT_KEY", KEY),
            ("FGA_E2E_WRONG_KEY", "not-the-key"),
        ],
    );
    // A read (BatchCheck) and a search (StreamedListObjects) with the right key.
    let (status, body) = get(
        &proxy,
        "keyed",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/p1",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(
        &proxy,
        "keyed",
        "practitioner-pr1",
        PR_SCOPES,
        "/Observation?_count=5",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"].as_array().map(Vec::len), Some(5), "{body}");
    // OpenFGA refuses the wrong key (401): fail closed, and the key is never logged.
    for path in ["/Patient/p1", "/Observation"] {
        let (status, body) = get(&proxy, "wrongkey", "practitioner-pr1", PR_SCOPES, path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(outcome_reason(&body), "fga_rejected", "{body}");
    }
    assert!(!proxy.log().contains(KEY), "the key was logged");
}

#[tokio::test]
async fn a_reload_keeps_the_state_of_unchanged_tenants_and_rebuilds_changed_ones() {
    let faulty = start_fga(Options::default());
    let store = test_store(&faulty);
    let breaker = json!({
        "timeout_ms": 300, "breaker_failure_threshold": 1, "breaker_cool_down_ms": 600000
    });
    let proxy = start(vec![
        ("fga", settings(&store, breaker.clone())),
        ("other", settings(&store, json!({}))),
    ]);
    let file = |list: Vec<(&str, Value)>| {
        tenants(
            list.into_iter()
                .map(|(id, extra)| (id, fga_tenant(id, proxy.port, &store, extra)))
                .collect(),
        )
    };
    // One failure opens `fga`'s breaker; from then on it fails without calling OpenFGA,
    // even once OpenFGA is healthy again.
    faulty.set_mode(Mode::Error);
    let (status, _) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(status, 503);
    faulty.set_mode(Mode::Ok);
    let (status, body) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(outcome_reason(&body), "fga_unavailable");
    let (status, body) = get(
        &proxy,
        "other",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/p1",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A reload that edits `other` and adds `probe` (which says when it has applied)
    // leaves `fga` as it was: its breaker is still open.
    crate::harness::write_json(
        &proxy.tenants_path(),
        &file(vec![
            ("fga", breaker.clone()),
            ("other", json!({ "cache_ttl_seconds": 0 })),
            ("probe", json!({})),
        ]),
    );
    until_tenant_exists(&proxy, "probe").await;
    let (status, body) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(
        status, 503,
        "the breaker did not survive the reload: {body}"
    );
    assert_eq!(outcome_reason(&body), "fga_unavailable");
    let (status, body) = get(
        &proxy,
        "other",
        "practitioner-pr1",
        PR_SCOPES,
        "/Patient/p1",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        proxy.log().contains("\"tenants.kept\":1"),
        "{}",
        proxy.log()
    );

    // Editing `fga` itself rebuilds it: a fresh breaker, closed, and OpenFGA answers.
    let mut edited = breaker.clone();
    edited["breaker_cool_down_ms"] = json!(599_999);
    crate::harness::write_json(
        &proxy.tenants_path(),
        &file(vec![
            ("fga", edited),
            ("other", json!({ "cache_ttl_seconds": 0 })),
            ("probe2", json!({})),
        ]),
    );
    until_tenant_exists(&proxy, "probe2").await;
    let (status, body) = get(&proxy, "fga", "practitioner-pr1", PR_SCOPES, "/Patient/p1").await;
    assert_eq!(status, 200, "{body}");
}

/// Waits (at most 20 s) until the proxy knows tenant `id`.
async fn until_tenant_exists(proxy: &Proxy, id: &str) {
    let url = format!("{}/.well-known/smart-configuration", proxy.base(id));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = support::http_client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tenant `{id}` never appeared; log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
