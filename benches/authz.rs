#![allow(clippy::expect_used)]
//! Micro-benchmarks of the record stages (pure, no I/O): compartment membership of
//! single resources, and checking a ~1 MB searchset Bundle (1,500 Observations of 50
//! patients plus 20 `_include`d Practitioners) for a patient token (most entries
//! dropped), a patient token with a finer-grained scope (constraints re-evaluated per
//! record), a practitioner token and a system token (nothing dropped). A plain
//! `serde_json::Value` parse of the same bytes runs in the same group as the baseline,
//! so results read as ratios. The Bundle is generated deterministically at start-up.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use smart_fhir_proxy::authz::{Checker, ReleaseCtx, authorize};
use smart_fhir_proxy::config::{RawFile, TenantConfig, validate};
use smart_fhir_proxy::fhir::{
    CompartmentIndex, CompartmentRef, ResourceId, ResourceType, parse_request,
};
use smart_fhir_proxy::forward::filter::{CheckCtx, check_answer};
use smart_fhir_proxy::scope::{TokenContext, check_scopes};
use smart_fhir_proxy::smart::parse_scopes;
use smart_fhir_proxy::token::{FhirUser, VerifiedToken};
use smart_fhir_proxy::upstream::BaseRewrite;

const PUBLIC_BASE: &str = "https://proxy.bench/bench";
const UPSTREAM_BASE: &str = "http://fhir.bench:8080/fhir";
const PATIENTS: usize = 50;
const PRACTITIONERS: usize = 20;
const OBSERVATIONS: usize = 1_500;

fn tenant() -> TenantConfig {
    let raw: RawFile = serde_json::from_value(json!({"tenants": {"bench": {
        "public_base_url": PUBLIC_BASE,
        "upstream": {"base_url": UPSTREAM_BASE},
        "token": {
            "issuers": ["https://issuer.bench"],
            "jwks_uri": "https://issuer.bench/jwks",
            "audience": PUBLIC_BASE,
        },
        "smart": {
            "authorization_endpoint": "https://issuer.bench/auth",
            "token_endpoint": "https://issuer.bench/token",
        },
        "authorization": {"mode": "compartment"},
    }}}))
    .expect("raw tenants");
    validate(raw)
        .expect("valid tenant")
        .into_iter()
        .next()
        .expect("one tenant")
}

/// One Observation of the generated Bundle. Every 10th subject is an absolute
/// reference with the upstream base, every 15th a versioned one.
fn observation(i: usize) -> Value {
    let patient = i % PATIENTS;
    let subject = if i.is_multiple_of(10) {
        format!("{UPSTREAM_BASE}/Patient/p{patient}")
    } else if i.is_multiple_of(15) {
        format!("Patient/p{patient}/_history/2")
    } else {
        format!("Patient/p{patient}")
    };
    let (category, code, display, unit, value) = match i % 4 {
        0 => (
            "laboratory",
            "2339-0",
            "Glucose [Mass/volume] in Blood",
            "mg/dL",
            70 + i % 90,
        ),
        1 => (
            "laboratory",
            "4548-4",
            "Hemoglobin A1c/Hemoglobin.total in Blood",
            "%",
            4 + i % 8,
        ),
        2 => ("vital-signs", "8867-4", "Heart rate", "/min", 50 + i % 70),
        _ => (
            "vital-signs",
            "8480-6",
            "Systolic blood pressure",
            "mm[Hg]",
            95 + i % 60,
        ),
    };
    let mut performer = vec![json!({"reference": format!("Practitioner/pr{}", i % PRACTITIONERS)})];
    if i.is_multiple_of(7) {
        performer.push(json!({"reference": "Organization/org1"}));
    }
    json!({
        "resourceType": "Observation",
        "id": format!("obs-{i:05}"),
        "meta": {"versionId": "1", "lastUpdated": format!("2024-05-{:02}T08:{:02}:00Z", 1 + i % 28, i % 60)},
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category,
        }]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": subject},
        "encounter": {"reference": format!("Encounter/e{patient}-{}", i % 3)},
        "effectiveDateTime": format!("2024-05-{:02}T08:{:02}:00Z", 1 + i % 28, i % 60),
        "performer": performer,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    })
}

fn practitioner(k: usize) -> Value {
    json!({
        "resourceType": "Practitioner",
        "id": format!("pr{k}"),
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": format!("99999{k:05}")}],
        "active": true,
        "name": [{"family": format!("Practitioner-{k}"), "given": ["Pat"], "prefix": ["Dr."]}],
    })
}

/// The ~1 MB searchset Bundle the upstream would answer `Observation?_include=...` with.
fn search_bundle() -> Vec<u8> {
    let mut entries: Vec<Value> = (0..OBSERVATIONS)
        .map(|i| {
            json!({
                "fullUrl": format!("{UPSTREAM_BASE}/Observation/obs-{i:05}"),
                "resource": observation(i),
                "search": {"mode": "match"},
            })
        })
        .collect();
    entries.extend((0..PRACTITIONERS).map(|k| {
        json!({
            "fullUrl": format!("{UPSTREAM_BASE}/Practitioner/pr{k}"),
            "resource": practitioner(k),
            "search": {"mode": "include"},
        })
    }));
    serde_json::to_vec(&json!({
        "resourceType": "Bundle",
        "id": "bench-searchset",
        "type": "searchset",
        "total": OBSERVATIONS,
        "link": [{"relation": "self", "url": format!("{UPSTREAM_BASE}/Observation?_include=Observation:performer&_count={OBSERVATIONS}")}],
        "entry": entries,
    }))
    .expect("bundle")
}

fn token(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.bench".into(),
        subject: Some("bench".into()),
        client_id: Some("bench-app".into()),
        scopes: parse_scopes(scopes),
        patient: patient.map(|p| ResourceId::parse(p).expect("patient id")),
        fhir_user: fhir_user.map(|u| FhirUser::parse(u).expect("fhirUser")),
        expires_at: u64::MAX,
    }
}

fn resource_type(name: &str) -> ResourceType {
    ResourceType::parse(name).expect("resource type")
}

fn bench_contains(c: &mut Criterion) {
    let index = CompartmentIndex::official().expect("compartment index");
    let bases = [PUBLIC_BASE, UPSTREAM_BASE];
    let patient = |id: &str| CompartmentRef {
        owner: ResourceType::PATIENT,
        id: ResourceId::parse(id).expect("id"),
    };
    let practitioner = CompartmentRef {
        owner: ResourceType::PRACTITIONER,
        id: ResourceId::parse("pr3").expect("id"),
    };
    let encounter = json!({
        "resourceType": "Encounter", "id": "e7-1", "status": "finished",
        "subject": {"reference": "Patient/p7"},
        "participant": [
            {"individual": {"reference": "Practitioner/pr1"}},
            {"individual": {"reference": "Practitioner/pr2"}},
            {"individual": {"reference": "Practitioner/pr3"}},
        ],
    });
    let shapes: [(&str, CompartmentRef, ResourceType, Value); 6] = [
        (
            "observation_subject_hit",
            patient("p7"),
            resource_type("Observation"),
            observation(7),
        ),
        (
            "observation_prefix_miss",
            patient("p1"),
            resource_type("Observation"),
            observation(11),
        ),
        (
            "observation_absolute_hit",
            patient("p0"),
            resource_type("Observation"),
            observation(100),
        ),
        (
            "observation_performer_hit",
            practitioner.clone(),
            resource_type("Observation"),
            observation(23),
        ),
        (
            "encounter_participant_hit",
            practitioner,
            resource_type("Encounter"),
            encounter,
        ),
        (
            "patient_itself",
            patient("p7"),
            ResourceType::PATIENT,
            json!({"resourceType": "Patient", "id": "p7"}),
        ),
    ];
    for (name, compartment, rt, resource) in &shapes {
        c.bench_function(&format!("authz/contains/{name}"), |b| {
            b.iter(|| {
                index.contains(
                    black_box(compartment),
                    *rt,
                    black_box(resource),
                    black_box(&bases),
                )
            })
        });
    }
}

fn bench_filter(c: &mut Criterion) {
    let tenant = tenant();
    let index = Arc::new(CompartmentIndex::official().expect("compartment index"));
    let checker = Checker::for_tenant(&tenant, &index, &reqwest::Client::new()).expect("checker");
    let body = Bytes::from(search_bundle());
    eprintln!(
        "authz bench: search Bundle of {} bytes ({OBSERVATIONS} Observations, {PRACTITIONERS} Practitioners)",
        body.len()
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    let request = parse_request(
        &Method::GET,
        "/Observation",
        Some("_include=Observation:performer&_count=2000"),
        None,
    )
    .expect("request");

    let tokens = [
        (
            "patient",
            token(
                "patient/Observation.rs patient/Practitioner.rs",
                Some("p7"),
                Some("Patient/p7"),
            ),
        ),
        (
            "patient_constrained",
            token(
                "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory patient/Practitioner.rs",
                Some("p7"),
                Some("Patient/p7"),
            ),
        ),
        (
            "practitioner",
            token(
                "user/Observation.rs user/Practitioner.rs",
                None,
                Some("Practitioner/pr3"),
            ),
        ),
        ("system", token("system/*.rs", None, None)),
    ];

    c.bench_function("authz/authorize_search", |b| {
        let (_, t) = &tokens[0];
        let ctx = TokenContext {
            has_patient: t.patient.is_some(),
        };
        let grant = check_scopes(&t.scopes, &request, ctx).expect("scope grant");
        b.iter(|| authorize(&checker, black_box(&request), t, &grant).expect("permit"))
    });

    let mut group = c.benchmark_group("filter_1mb");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("baseline_serde_value", |b| {
        b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).expect("json"))
    });
    // The cost of merely validating the JSON: the floor a check that reads every byte
    // once can get near.
    group.bench_function("baseline_serde_ignored_any", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).expect("json"))
    });
    for (name, t) in &tokens {
        let ctx = TokenContext {
            has_patient: t.patient.is_some(),
        };
        let grant = check_scopes(&t.scopes, &request, ctx).expect("scope grant");
        let permit = authorize(&checker, &request, t, &grant).expect("permit");
        let check = CheckCtx {
            request: &request,
            records: ReleaseCtx {
                permit: &permit,
                grant: &grant,
                token: t,
                index: &index,
                bases: [PUBLIC_BASE, UPSTREAM_BASE],
                fga: None,
            },
            paging: None,
            rewrite: BaseRewrite {
                from: UPSTREAM_BASE,
                to: PUBLIC_BASE,
            },
        };
        let checked =
            check_answer(&check, StatusCode::OK, &headers, body.clone()).expect("checked");
        eprintln!(
            "authz bench: {name}: kept {} dropped {} ({} bytes out)",
            checked.kept,
            checked.dropped,
            checked.body.len()
        );
        group.bench_function(format!("check_answer_{name}"), |b| {
            b.iter(|| {
                check_answer(&check, StatusCode::OK, &headers, black_box(body.clone()))
                    .expect("checked")
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_contains, bench_filter
}
criterion_main!(benches);
