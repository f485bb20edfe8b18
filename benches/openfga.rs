#![allow(clippy::expect_used)]
//! Micro-benchmarks of the OpenFGA decision path of `openfga` tenants, each group with
//! the compartment checker doing the same job in the same run as its baseline:
//! - `openfga_decide_20`: `OpenFgaChecker::decide` on a searchset Bundle of 20
//!   Observations of 20 different patients (BatchCheck of all of them), with a warm
//!   decision cache (`cache_ttl_seconds: 3600`) and with none (`cache_ttl_seconds: 0`,
//!   every call is a BatchCheck over loopback); baseline: the compartment checker's
//!   release of the same 20 entries, which is all it does per answer;
//! - `openfga_release_20`: the pure release check of those entries
//!   (`ReleaseCtx::release` with the decisions) against the compartment checker's;
//! - `openfga_listed_3000`: `OpenFgaChecker::listed` for a principal who may view
//!   3,000 patients (StreamedListObjects), cached and uncached, and the whole narrowing
//!   of a search with it; baseline: the compartment checker's narrowing of the same
//!   search (`rewrite_request`).
//!
//! OpenFGA is the OpenFGA-API-compatible test server (`tests/openfga/`) in process on a
//! loopback port, with `fga-model/model.json` and a world of one organization tree
//! (a hospital with 10 wards), one care team whose members view the hospital, one user
//! in it, and 3,000 patients assigned to the wards. The "miss" numbers are therefore
//! loopback HTTP plus the test server's in-memory evaluation, not a real OpenFGA's
//! latency; the "hit" numbers are the proxy's own cost. After the run the ratios to
//! each baseline are printed from criterion's estimates of this run.

#[path = "../tests/openfga/mod.rs"]
mod openfga;

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http::Method;
use serde_json::{Value, json};
use smart_fhir_proxy::authz::fga::FgaDecisions;
use smart_fhir_proxy::authz::{Checker, Permit, Release, ReleaseCtx, authorize};
use smart_fhir_proxy::config::{RawFile, TenantConfig, validate};
use smart_fhir_proxy::fhir::{CompartmentIndex, FhirRequest, ResourceType, parse_request};
use smart_fhir_proxy::rewrite::{rewrite_request, rewrite_request_with};
use smart_fhir_proxy::scope::{ScopeGrant, TokenContext, check_scopes};
use smart_fhir_proxy::smart::parse_scopes;
use smart_fhir_proxy::token::{FhirUser, VerifiedToken};

use openfga::engine::TupleKey;
use openfga::server::{Mode, Options, TestServer};

const PROXY: &str = "https://proxy.bench";
const UPSTREAM_BASE: &str = "http://fhir.bench:8080/fhir";
/// The answer's references are relative; the bases only matter for absolute ones.
const BASES: [&str; 2] = ["https://proxy.bench/fga_hit", UPSTREAM_BASE];
/// Patients the bench user may view (through its care team and the organization tree).
const PATIENTS: usize = 3_000;
const WARDS: usize = 10;
/// Entries (and distinct patients) of the answer `decide` and `release` work on.
const ENTRIES: usize = 20;
/// The OpenFGA principal of the bench user's `user/` scopes is `user:<sub>`.
const SUBJECT: &str = "bench-user";
const SCOPES: &str = "user/Observation.rs user/Patient.rs";

fn patient(i: usize) -> String {
    format!("bp{i:05}")
}

fn world() -> Vec<TupleKey> {
    let t = TupleKey::new;
    let mut tuples = vec![
        t("group:care-team#member", "viewer", "organization:hospital"),
        t(&format!("user:{SUBJECT}"), "member", "group:care-team"),
    ];
    for w in 0..WARDS {
        tuples.push(t(
            "organization:hospital",
            "parent",
            &format!("organization:ward-{w}"),
        ));
    }
    for i in 0..PATIENTS {
        tuples.push(t(
            &format!("organization:ward-{}", i % WARDS),
            "assigned_organization",
            &format!("patient:{}", patient(i)),
        ));
    }
    tuples
}

/// The test server on a runtime of its own thread (it outlives every bench), with the
/// world preloaded: `(server, store_id, model_id)`.
fn start_openfga() -> (TestServer, String, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let server = TestServer::start(Options::default())
                .await
                .expect("openfga test server");
            tx.send(server).expect("send server");
            std::future::pending::<()>().await;
        });
    });
    let server = rx.recv().expect("openfga test server started");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fga-model/model.json");
    let model: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("model")).expect("model json");
    let (store, model_id) = server.preload("bench", &model, &world()).expect("preload");
    (server, store, model_id)
}

/// Tenants `compartment`, `fga_hit` (decisions reused for an hour) and `fga_miss`
/// (never reused), in that order.
fn tenants(api_url: &str, store: &str, model: &str) -> [TenantConfig; 3] {
    let tenant = |id: &str, authorization: Value| {
        json!({
            "public_base_url": format!("{PROXY}/{id}"),
            "upstream": {"base_url": UPSTREAM_BASE},
            "token": {
                "issuers": ["https://issuer.bench"],
                "jwks_uri": "https://issuer.bench/jwks",
                "audience": format!("{PROXY}/{id}"),
            },
            "smart": {
                "authorization_endpoint": "https://issuer.bench/auth",
                "token_endpoint": "https://issuer.bench/token",
            },
            "authorization": authorization,
        })
    };
    let fga = |id: &str, ttl: u64| {
        tenant(
            id,
            json!({"mode": "openfga", "openfga": {
                "api_url": api_url,
                "store_id": store,
                "authorization_model_id": model,
                "timeout_ms": 10_000,
                "list_objects_deadline_ms": 10_000,
                "cache_ttl_seconds": ttl,
            }}),
        )
    };
    let raw: RawFile = serde_json::from_value(json!({"tenants": {
        "compartment": tenant("compartment", json!({"mode": "compartment"})),
        "fga_hit": fga("fga_hit", 3_600),
        "fga_miss": fga("fga_miss", 0),
    }}))
    .expect("raw tenants");
    let mut all = validate(raw).expect("valid tenants");
    let mut take = |id: &str| {
        let at = all.iter().position(|t| t.id == id).expect("tenant");
        all.remove(at)
    };
    [take("compartment"), take("fga_hit"), take("fga_miss")]
}

/// Observations of [`ENTRIES`] different patients, spread over the wards; all performed
/// by `Practitioner/pr1`, so the compartment checker's practitioner token releases
/// them all too.
fn answer() -> Value {
    let entries: Vec<Value> = (0..ENTRIES)
        .map(|k| {
            let p = patient(k * (PATIENTS / ENTRIES) + k % 7);
            json!({
                "fullUrl": format!("{UPSTREAM_BASE}/Observation/obs-{k}"),
                "resource": {
                    "resourceType": "Observation", "id": format!("obs-{k}"),
                    "meta": {"versionId": "1", "lastUpdated": "2024-05-01T08:00:00Z"},
                    "status": "final",
                    "category": [{"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }]}],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                    "subject": {"reference": format!("Patient/{p}")},
                    "encounter": {"reference": format!("Encounter/e-{p}")},
                    "effectiveDateTime": "2024-05-01T08:00:00Z",
                    "performer": [{"reference": "Practitioner/pr1"}],
                    "valueQuantity": {"value": 60 + k, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
                },
                "search": {"mode": "match"},
            })
        })
        .collect();
    json!({
        "resourceType": "Bundle", "type": "searchset", "total": ENTRIES,
        "link": [{"relation": "self", "url": format!("{UPSTREAM_BASE}/Observation?_count={ENTRIES}")}],
        "entry": entries,
    })
}

fn token(subject: &str) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.bench".into(),
        subject: Some(subject.into()),
        client_id: Some("bench-app".into()),
        scopes: parse_scopes(SCOPES),
        patient: None,
        fhir_user: Some(FhirUser::parse("Practitioner/pr1").expect("fhirUser")),
        expires_at: u64::MAX,
    }
}

/// Everything the benches share.
struct Fixture {
    /// Keeps the server accepting; flipped to failing once to prove the cache modes.
    server: TestServer,
    /// The client side's runtime (the bench thread drives it with `block_on`).
    rt: tokio::runtime::Runtime,
    index: Arc<CompartmentIndex>,
    hit: Checker,
    miss: Checker,
    request: FhirRequest,
    grant: ScopeGrant,
    compartment_token: VerifiedToken,
    compartment_permit: Permit,
    fga_token: VerifiedToken,
    fga_permit: Permit,
    answer: Value,
    /// The same answer as the bytes the proxy gets from the upstream.
    answer_bytes: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let (server, store, model) = start_openfga();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client");
        let index = Arc::new(CompartmentIndex::official().expect("compartment index"));
        let [compartment, hit, miss] = tenants(&server.url(), &store, &model)
            .map(|t| Checker::for_tenant(&t, &index, &http).expect("checker"));
        let request = parse_request(
            &Method::GET,
            "/Observation",
            Some(&format!("_count={ENTRIES}")),
            None,
        )
        .expect("request");
        let compartment_token = token("pr1");
        let fga_token = token(SUBJECT);
        let grant = check_scopes(
            &fga_token.scopes,
            &request,
            TokenContext { has_patient: false },
        )
        .expect("scope grant");
        let compartment_permit =
            authorize(&compartment, &request, &compartment_token, &grant).expect("permit");
        let fga_permit = authorize(&hit, &request, &fga_token, &grant).expect("fga permit");
        assert!(
            fga_permit.has_fga(),
            "the bench user acts as an OpenFGA principal"
        );
        Fixture {
            server,
            rt,
            index,
            hit,
            miss,
            request,
            grant,
            compartment_token,
            compartment_permit,
            fga_token,
            fga_permit,
            answer: answer(),
            answer_bytes: serde_json::to_vec(&answer()).expect("answer bytes"),
        }
    }

    fn fga(checker: &Checker) -> &smart_fhir_proxy::authz::fga::OpenFgaChecker {
        checker.fga().expect("openfga checker")
    }

    fn decide(&self, checker: &Checker) -> FgaDecisions {
        self.rt
            .block_on(Self::fga(checker).decide(
                &self.fga_permit,
                None,
                black_box(&self.answer_bytes),
                &self.index,
                &BASES,
            ))
            .expect("decisions")
    }

    fn listed_count(&self, checker: &Checker) -> usize {
        let listed = self
            .rt
            .block_on(Self::fga(checker).listed(&self.fga_permit))
            .expect("listed");
        listed.per_principal.iter().map(|(_, l)| l.ids.len()).sum()
    }

    /// Releases every entry of the answer; returns how many were released.
    fn release_all(&self, ctx: &ReleaseCtx<'_>) -> usize {
        let mut released = 0;
        for entry in self.answer["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let rt = resource["resourceType"]
                .as_str()
                .and_then(ResourceType::parse)
                .expect("resource type");
            if matches!(
                ctx.release(rt, black_box(resource), true),
                Release::Allowed(_)
            ) {
                released += 1;
            }
        }
        released
    }

    fn compartment_ctx(&self) -> ReleaseCtx<'_> {
        ReleaseCtx {
            permit: &self.compartment_permit,
            grant: &self.grant,
            token: &self.compartment_token,
            index: &self.index,
            bases: BASES,
            fga: None,
        }
    }

    fn fga_ctx<'a>(&'a self, decisions: &'a FgaDecisions) -> ReleaseCtx<'a> {
        ReleaseCtx {
            permit: &self.fga_permit,
            grant: &self.grant,
            token: &self.fga_token,
            index: &self.index,
            bases: BASES,
            fga: Some(decisions),
        }
    }

    /// Proves that the two checkers measure what their names say: with OpenFGA
    /// failing, the warm one still decides from its cache and the TTL-0 one cannot.
    fn check_cache_modes(&self) {
        assert_eq!(self.listed_count(&self.hit), PATIENTS);
        assert_eq!(self.listed_count(&self.miss), PATIENTS);
        let decisions = self.decide(&self.hit);
        assert_eq!(self.release_all(&self.fga_ctx(&decisions)), ENTRIES);
        assert_eq!(self.release_all(&self.compartment_ctx()), ENTRIES);
        self.server.set_mode(Mode::Error);
        let hit = self.rt.block_on(Self::fga(&self.hit).decide(
            &self.fga_permit,
            None,
            &self.answer_bytes,
            &self.index,
            &BASES,
        ));
        let miss = self.rt.block_on(Self::fga(&self.miss).decide(
            &self.fga_permit,
            None,
            &self.answer_bytes,
            &self.index,
            &BASES,
        ));
        let listed_hit = self
            .rt
            .block_on(Self::fga(&self.hit).listed(&self.fga_permit));
        let listed_miss = self
            .rt
            .block_on(Self::fga(&self.miss).listed(&self.fga_permit));
        self.server.set_mode(Mode::Ok);
        assert!(
            hit.is_ok() && listed_hit.is_ok(),
            "the warm checker decides from its cache"
        );
        assert!(
            miss.is_err() && listed_miss.is_err(),
            "the TTL-0 checker asks OpenFGA every time"
        );
    }
}

fn bench_openfga(c: &mut Criterion) {
    let f = Fixture::new();
    f.check_cache_modes();
    eprintln!(
        "openfga bench: {PATIENTS} patients listed for user:{SUBJECT}; answers of {ENTRIES} entries"
    );

    let mut group = c.benchmark_group("openfga_decide_20");
    group.bench_function("compartment_release", |b| {
        let ctx = f.compartment_ctx();
        b.iter(|| f.release_all(&ctx))
    });
    group.bench_function("fga_cache_hit", |b| b.iter(|| f.decide(&f.hit)));
    group.bench_function("fga_cache_miss", |b| b.iter(|| f.decide(&f.miss)));
    group.finish();

    let decisions = f.decide(&f.hit);
    let mut group = c.benchmark_group("openfga_release_20");
    group.bench_function("compartment", |b| {
        let ctx = f.compartment_ctx();
        b.iter(|| f.release_all(&ctx))
    });
    group.bench_function("fga", |b| {
        let ctx = f.fga_ctx(&decisions);
        b.iter(|| f.release_all(&ctx))
    });
    group.finish();

    let body = Bytes::new();
    let mut group = c.benchmark_group("openfga_listed_3000");
    group.bench_function("compartment_narrowing", |b| {
        b.iter(|| {
            rewrite_request(
                black_box(&f.request),
                &f.grant,
                &f.compartment_permit,
                &f.index,
                &body,
            )
            .expect("narrowed")
        })
    });
    group.bench_function("fga_cache_hit", |b| {
        b.iter(|| {
            f.rt.block_on(Fixture::fga(&f.hit).listed(&f.fga_permit))
                .expect("listed")
        })
    });
    // The whole narrowing of a search by the warm checker: list, union, rewrite.
    group.bench_function("fga_narrowing_cache_hit", |b| {
        let fga = Fixture::fga(&f.hit);
        b.iter(|| {
            let listed = f.rt.block_on(fga.listed(&f.fga_permit)).expect("listed");
            let patients = listed.union_sorted(&[]);
            rewrite_request_with(
                black_box(&f.request),
                &f.grant,
                &f.fga_permit,
                &f.index,
                &body,
                Some((&patients, fga.chunk_size)),
                smart_fhir_proxy::config::CompartmentSearch::Native,
            )
            .expect("narrowed")
        })
    });
    group.sample_size(10);
    group.bench_function("fga_cache_miss", |b| {
        b.iter(|| {
            f.rt.block_on(Fixture::fga(&f.miss).listed(&f.fga_permit))
                .expect("listed")
        })
    });
    group.finish();
}

/// `(group, bench, baseline)`: the ratios printed after the run.
const RATIOS: [(&str, &str, &str); 6] = [
    ("openfga_decide_20", "fga_cache_hit", "compartment_release"),
    ("openfga_decide_20", "fga_cache_miss", "compartment_release"),
    ("openfga_release_20", "fga", "compartment"),
    (
        "openfga_listed_3000",
        "fga_cache_hit",
        "compartment_narrowing",
    ),
    (
        "openfga_listed_3000",
        "fga_narrowing_cache_hit",
        "compartment_narrowing",
    ),
    (
        "openfga_listed_3000",
        "fga_cache_miss",
        "compartment_narrowing",
    ),
];

/// Where criterion keeps its estimates (`CRITERION_HOME`, else `<target>/criterion`).
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    // The bench runs as `<target>/<profile>/deps/openfga-<hash>`.
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The median of one bench measured since `since`, in nanoseconds.
fn median_ns(dir: &std::path::Path, group: &str, bench: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(group).join(bench).join("new/estimates.json");
    // A bench left out of this run (filtered) keeps an older file: not this run's.
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let estimates: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

/// Prints each bench's median as a multiple of its group's compartment baseline. Only
/// after a measuring run (`cargo bench`); test mode (`--test`) writes no estimates.
fn print_ratios(since: SystemTime) {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let Some(dir) = criterion_dir() else { return };
    let mut lines = Vec::new();
    for (group, bench, base) in RATIOS {
        if let (Some(x), Some(b)) = (
            median_ns(&dir, group, bench, since),
            median_ns(&dir, group, base, since),
        ) {
            lines.push(format!(
                "  {group}: {bench} {:.1} us = {:.1} x {base} ({:.2} us)",
                x / 1e3,
                x / b,
                b / 1e3
            ));
        }
    }
    if !lines.is_empty() {
        eprintln!(
            "openfga bench: medians against the compartment checker's\n{}",
            lines.join("\n")
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_openfga
}

fn main() {
    let started = SystemTime::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios(started);
}
