#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `smart-fhir-proxy seed-openfga` (`src/seed.rs`), the built binary run against the
//! real upstream FHIR server (`tests/support/`) and a real OpenFGA server of its own per
//! test (`support::fga_server`). What the seed wrote is read back through OpenFGA's HTTP
//! API (Check, ListObjects) and compared with the upstream's own list of patients,
//! fetched here independently. A server that accepts connections but never answers
//! comes from the OpenFGA-API-compatible test server (`tests/openfga/`).

mod openfga;
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use openfga::server::{Mode, Options, TestServer};
use serde_json::{Value, json};
use support::{FhirServer, FhirServerOptions};

const BIN: &str = env!("CARGO_BIN_EXE_smart-fhir-proxy");
/// Patients added to the base bundle's three for the paging world.
const EXTRA_PATIENTS: usize = 10;

/// One run of the binary.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON report of a successful run (stdout must be exactly one JSON object).
    fn report(&self) -> Value {
        assert_eq!(self.code, Some(0), "seed failed: {self:#?}");
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"));
        assert!(v.is_object(), "{v}");
        v
    }

    fn assert_failed(&self, needles: &[&str]) {
        assert_eq!(self.code, Some(1), "{self:#?}");
        assert!(self.stdout.trim().is_empty(), "{self:#?}");
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks `{n}`: {self:#?}");
        }
    }
}

/// Runs `smart-fhir-proxy seed-openfga ARGS` from the repository root (for the default
/// `--model`), without proxies or OpenFGA settings from the environment.
async fn seed(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(support::repo_root())
            .arg("seed-openfga")
            .args(&args)
            .envs(envs);
        for var in [
            "OPENFGA_API_URL",
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// Every Patient id the upstream has, in its listing order, paged by this test itself.
async fn upstream_patient_ids(base: &str) -> Vec<String> {
    let http = support::http_client();
    let mut ids = Vec::new();
    let mut url = format!("{base}/Patient?_count=1000");
    loop {
        let page: Value = http
            .get(&url)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        for e in page["entry"].as_array().into_iter().flatten() {
            ids.push(e["resource"]["id"].as_str().unwrap().to_owned());
        }
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => url = l["url"].as_str().unwrap().to_owned(),
            None => break,
        }
    }
    assert!(!ids.is_empty(), "the upstream at {base} has no patients");
    ids
}

/// The base bundle plus [`EXTRA_PATIENTS`] patients, so wards get uneven shares and
/// paging takes several pages. Shared by the tests of this file (read only).
fn paging_upstream() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let entries: Vec<Value> = (1..=EXTRA_PATIENTS)
            .map(|i| {
                let id = format!("seed-{i:02}");
                json!({
                    "resource": {"resourceType": "Patient", "id": id, "active": true,
                                 "name": [{"family": "Seed", "given": [format!("P{i}")]}]},
                    "request": {"method": "PUT", "url": format!("Patient/{id}")}
                })
            })
            .collect();
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        let file = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
        std::fs::write(file.path(), bundle.to_string()).unwrap();
        FhirServer::start(FhirServerOptions {
            load: vec![support::base_bundle_path(), PathBuf::from(file.path())],
            ..FhirServerOptions::default()
        })
    })
}

/// A real OpenFGA server of the test's own, and the pre-shared key it requires.
struct Fga {
    server: support::OpenFgaServer,
    key: Option<String>,
}

impl Fga {
    fn url(&self) -> String {
        self.server.url().to_owned()
    }

    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// A real OpenFGA server of this test's own (so store counts are the test's).
async fn fga() -> Fga {
    real_fga(None).await
}

/// A real OpenFGA server that requires the pre-shared `key`, or none.
async fn real_fga(key: Option<&str>) -> Fga {
    let key = key.map(str::to_owned);
    let options = support::OpenFgaOptions {
        preshared_key: key.clone(),
        ..Default::default()
    };
    let server = tokio::task::spawn_blocking(move || support::OpenFgaServer::start(options))
        .await
        .unwrap();
    Fga { server, key }
}

async fn fga_post(server: &Fga, path: &str, body: Value) -> Value {
    support::fga_server::fga_post(&format!("{}{path}", server.url()), server.key(), &body).await
}

async fn stores(server: &Fga) -> Vec<String> {
    let mut request = support::http_client().get(format!("{}/stores", server.url()));
    if let Some(key) = server.key() {
        request = request.bearer_auth(key);
    }
    let v: Value = request.send().await.unwrap().json().await.unwrap();
    v["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The store the report names, as the test server sees it.
struct Seeded<'a> {
    server: &'a Fga,
    store: String,
    model: String,
}

impl<'a> Seeded<'a> {
    fn from_report(server: &'a Fga, report: &Value) -> Self {
        Seeded {
            server,
            store: report["store_id"].as_str().unwrap().to_owned(),
            model: report["authorization_model_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        }
    }

    /// ListObjects of type `patient`, ids without the `patient:` prefix.
    async fn patients(&self, user: &str, relation: &str) -> BTreeSet<String> {
        let v = fga_post(
            self.server,
            &format!("/stores/{}/list-objects", self.store),
            json!({"authorization_model_id": self.model, "type": "patient",
                   "relation": relation, "user": user}),
        )
        .await;
        v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                o.as_str()
                    .unwrap()
                    .strip_prefix("patient:")
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    async fn check(&self, user: &str, relation: &str, object: &str) -> bool {
        let v = fga_post(
            self.server,
            &format!("/stores/{}/check", self.store),
            json!({"authorization_model_id": self.model,
                   "tuple_key": {"user": user, "relation": relation, "object": object}}),
        )
        .await;
        v["allowed"].as_bool().unwrap()
    }

    async fn write(&self, user: &str, relation: &str, object: &str) {
        fga_post(
            self.server,
            &format!("/stores/{}/write", self.store),
            json!({"authorization_model_id": self.model,
                   "writes": {"tuple_keys": [{"user": user, "relation": relation, "object": object}]}}),
        )
        .await;
    }
}

/// A request for a page of 4 Patients: the search itself, or a page of the search HAPI
/// keeps (`[base]?_getpages=<id>&_getpagesoffset=N&_count=4`).
fn is_page_of_4(request: &str) -> bool {
    (request.starts_with("GET /fhir/Patient?") || request.starts_with("GET /fhir?_getpages="))
        && request.split(['?', '&']).any(|p| p == "_count=4")
}

/// Patients of ward `k` (1-based) when `ids` are dealt round robin over `wards`.
fn dealt(ids: &[String], wards: usize, k: usize) -> BTreeSet<String> {
    ids.iter()
        .enumerate()
        .filter(|(i, _)| i % wards == k - 1)
        .map(|(_, id)| id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn assigns_every_upstream_patient_to_a_ward_across_pages() {
    let fhir = paging_upstream();
    let server = fga().await;
    let upstream = upstream_patient_ids(fhir.base_url()).await;
    assert_eq!(upstream.len(), 3 + EXTRA_PATIENTS);
    let searches_before = fhir.requests().iter().filter(|r| is_page_of_4(r)).count();

    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            fhir.base_url(),
            "--page-size",
            "4",
        ],
        &[],
    )
    .await;
    let report = run.report();

    // the report
    assert_eq!(report["patients_assigned"], upstream.len(), "{report}");
    assert_eq!(report["wards"], 3);
    assert_eq!(report["sample_user"], "user:alice");
    assert_eq!(
        stores(&server).await,
        [report["store_id"].as_str().unwrap()]
    );
    assert_eq!(
        report["tenant_authorization"],
        json!({"mode": "openfga", "openfga": {
            "api_url": server.url(),
            "store_id": report["store_id"],
            "authorization_model_id": report["authorization_model_id"],
            "credentials": {"method": "none"}
        }})
    );

    // paging: one request per page of 4 (the search, then HAPI's `_getpages` links),
    // the next links followed to the end
    let searches: Vec<String> = fhir
        .requests()
        .into_iter()
        .filter(|r| is_page_of_4(r))
        .collect();
    assert_eq!(
        searches.len() - searches_before,
        upstream.len().div_ceil(4),
        "{searches:#?}"
    );

    // wards: round robin in the upstream's order, together exactly the upstream's
    let seeded = Seeded::from_report(&server, &report);
    let mut all = BTreeSet::new();
    for k in 1..=3 {
        let ward = seeded
            .patients(&format!("organization:ward-{k}"), "assigned_organization")
            .await;
        assert_eq!(ward, dealt(&upstream, 3, k), "ward-{k}");
        assert!(ward.is_disjoint(&all));
        all.extend(ward);
    }
    let upstream_set: BTreeSet<String> = upstream.iter().cloned().collect();
    assert_eq!(all, upstream_set);

    // alice: exactly ward 1's patients, read only
    let ward1 = dealt(&upstream, 3, 1);
    let ward2 = dealt(&upstream, 3, 2);
    assert_eq!(seeded.patients("user:alice", "can_view").await, ward1);
    let in_ward2 = format!("patient:{}", ward2.iter().next().unwrap());
    assert!(!seeded.check("user:alice", "can_view", &in_ward2).await);
    let in_ward1 = format!("patient:{}", ward1.iter().next().unwrap());
    assert!(seeded.check("user:alice", "can_view", &in_ward1).await);
    assert!(!seeded.check("user:alice", "can_write", &in_ward1).await);

    // a hospital clinician: every patient, read and write; nobody else: none
    assert!(seeded.patients("user:carol", "can_view").await.is_empty());
    seeded
        .write("user:carol", "clinician", "group:hospital-clinicians")
        .await;
    assert_eq!(
        seeded.patients("user:carol", "can_view").await,
        upstream_set
    );
    assert_eq!(
        seeded.patients("user:carol", "can_write").await,
        upstream_set
    );
    assert!(seeded.patients("user:mallory", "can_view").await.is_empty());
    // a member of a ward-2 team sees ward 2 only
    seeded
        .write("user:dave", "member", "group:ward-2-team")
        .await;
    assert_eq!(seeded.patients("user:dave", "can_view").await, ward2);
}

#[tokio::test(flavor = "multi_thread")]
async fn reuses_a_store_given_by_id() {
    let fhir = support::fhir_server();
    let server = fga().await;
    let upstream = upstream_patient_ids(fhir.base_url()).await;
    let base = ["--api-url", &server.url(), "--fhir-base", fhir.base_url()];

    let first = seed(&base, &[]).await.report();
    let store = first["store_id"].as_str().unwrap().to_owned();

    let mut args = base.to_vec();
    args.extend([
        "--store-id",
        &store,
        "--sample-user",
        "bob",
        "--page-size",
        "2",
    ]);
    let second = seed(&args, &[]).await.report();
    assert_eq!(second["store_id"], store.as_str());
    assert_eq!(second["sample_user"], "user:bob");
    assert_eq!(second["patients_assigned"], upstream.len());
    assert_eq!(
        second["tenant_authorization"]["openfga"]["store_id"],
        store.as_str()
    );
    // no second store, and the rerun's tuples (the same ones) were accepted
    assert_eq!(stores(&server).await, [store.as_str()]);

    let seeded = Seeded::from_report(&server, &second);
    let ward1 = dealt(&upstream, 3, 1);
    assert_eq!(seeded.patients("user:alice", "can_view").await, ward1);
    assert_eq!(seeded.patients("user:bob", "can_view").await, ward1);
    for k in 1..=3 {
        let ward = seeded
            .patients(&format!("organization:ward-{k}"), "assigned_organization")
            .await;
        assert_eq!(ward, dealt(&upstream, 3, k), "ward-{k}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn names_the_token_variables_and_never_prints_the_tokens() {
    let fhir = support::fhir_server();
    const FGA_SECRET: &str = "fga-secret-5f1c9a";
    // The real server refuses every call without this key.
    let server = real_fga(Some(FGA_SECRET)).await;
    const FHIR_SECRET: &str = "fhir-secret-77d0e2";
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            fhir.base_url(),
            "--api-token-env",
            "SEED_TEST_FGA_TOKEN",
            "--fhir-bearer-env",
            "SEED_TEST_FHIR_TOKEN",
            "--wards",
            "2",
        ],
        &[
            ("SEED_TEST_FGA_TOKEN", FGA_SECRET),
            ("SEED_TEST_FHIR_TOKEN", FHIR_SECRET),
        ],
    )
    .await;
    let report = run.report();
    assert_eq!(
        report["tenant_authorization"]["openfga"]["credentials"],
        json!({"method": "api_token", "api_token_env": "SEED_TEST_FGA_TOKEN"})
    );
    assert_eq!(report["wards"], 2);
    for secret in [FGA_SECRET, FHIR_SECRET] {
        assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret));
    }

    // a named variable that is not set is an error, before anything is written
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            fhir.base_url(),
            "--api-token-env",
            "SEED_TEST_UNSET_TOKEN",
        ],
        &[],
    )
    .await;
    run.assert_failed(&["SEED_TEST_UNSET_TOKEN", "not set"]);
    assert_eq!(stores(&server).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_clearly_when_openfga_is_unreachable() {
    let fhir = support::fhir_server();
    let closed = format!("http://127.0.0.1:{}", support::free_port());
    let run = seed(
        &[
            "--api-url",
            &closed,
            "--fhir-base",
            fhir.base_url(),
            "--timeout-ms",
            "5000",
        ],
        &[],
    )
    .await;
    run.assert_failed(&[&format!("cannot reach openfga at `{closed}/stores`")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_does_not_answer_times_out() {
    let fhir = support::fhir_server();
    let server = TestServer::start(Options::default()).await.unwrap();
    server.set_mode(Mode::Stall);
    let started = std::time::Instant::now();
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            fhir.base_url(),
            "--timeout-ms",
            "500",
        ],
        &[],
    )
    .await;
    run.assert_failed(&["creating the store", "no answer within 500 ms"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    server.set_mode(Mode::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_model_file_fails_before_any_request() {
    let closed = format!("http://127.0.0.1:{}", support::free_port());
    let run = seed(
        &[
            "--api-url",
            &closed,
            "--fhir-base",
            &format!("{closed}/fhir"),
            "--model",
            "fga-model/no-such-model.json",
        ],
        &[],
    )
    .await;
    run.assert_failed(&["cannot read the model `fga-model/no-such-model.json`"]);
    assert!(!run.stderr.contains("cannot reach"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_clearly_when_the_fhir_server_is_unreachable() {
    let server = fga().await;
    let closed = format!("http://127.0.0.1:{}/fhir", support::free_port());
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            &closed,
            "--timeout-ms",
            "5000",
        ],
        &[],
    )
    .await;
    run.assert_failed(&[
        "reading patients (page 1)",
        &format!("cannot reach the fhir server at `{closed}/Patient?_count=100&_elements=id`"),
    ]);
    assert!(stores(&server).await.is_empty(), "nothing may be written");
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_more_patients_than_the_bound_and_writes_nothing() {
    let fhir = support::fhir_server();
    let server = fga().await;
    let n = upstream_patient_ids(fhir.base_url()).await.len();
    let below = (n - 1).to_string();
    let exact = n.to_string();
    let args = |max: &str| {
        vec![
            "--api-url".to_owned(),
            server.url(),
            "--fhir-base".to_owned(),
            fhir.base_url().to_owned(),
            "--page-size".to_owned(),
            "1".to_owned(),
            "--max-patients".to_owned(),
            max.to_owned(),
        ]
    };
    let refused = args(&below);
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    seed(&refused, &[])
        .await
        .assert_failed(&[&format!("more than {below} patients"), "--max-patients"]);
    assert!(stores(&server).await.is_empty(), "nothing may be written");

    let accepted = args(&exact);
    let accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
    let report = seed(&accepted, &[]).await.report();
    assert_eq!(report["patients_assigned"], n);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_a_next_link_outside_the_fhir_base() {
    // The server announces another host in its links (its public base): the seed must
    // not follow them, and writes nothing.
    let port = support::free_port();
    let fhir = FhirServer::start(FhirServerOptions {
        public_base: Some(format!("http://localhost:{port}/fhir")),
        ..FhirServerOptions::default()
    });
    let direct = format!("http://127.0.0.1:{}/fhir", fhir.port());
    let server = fga().await;
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            &direct,
            "--page-size",
            "2",
        ],
        &[],
    )
    .await;
    run.assert_failed(&[
        "refusing to follow the upstream's next link `http://localhost:",
        &format!("not under the fhir base `{direct}`"),
    ]);
    assert!(stores(&server).await.is_empty(), "nothing may be written");
    // one page read, the foreign link not requested
    let searches = fhir
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /fhir/Patient?"))
        .count();
    assert_eq!(searches, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_store_id_fails_with_openfgas_error() {
    let fhir = support::fhir_server();
    let server = fga().await;
    let run = seed(
        &[
            "--api-url",
            &server.url(),
            "--fhir-base",
            fhir.base_url(),
            "--store-id",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        ],
        &[],
    )
    .await;
    run.assert_failed(&["openfga answered 404", "store_id_not_found"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_are_reported_by_the_parser() {
    for bad in [
        &[
            "--api-url",
            "http://127.0.0.1:1",
            "--fhir-base",
            "http://127.0.0.1:1/fhir",
            "--wards",
            "0",
        ][..],
        &["--api-url", "http://127.0.0.1:1"][..],
        &[
            "--api-url",
            "http://u:p@127.0.0.1:1",
            "--fhir-base",
            "http://127.0.0.1:1/fhir",
        ][..],
        &[
            "--api-url",
            "http://127.0.0.1:1",
            "--fhir-base",
            "http://127.0.0.1:1/fhir",
            "--sample-user",
            "a:b",
        ][..],
    ] {
        let run = seed(bad, &[]).await;
        assert_eq!(run.code, Some(2), "{bad:?}: {run:#?}");
        assert!(run.stdout.is_empty());
    }
}
