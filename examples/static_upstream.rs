//! A fast, fixed-answer FHIR upstream for `scripts/bench-e2e.sh`, so the benchmark can
//! show the proxy's own cost (the real test upstream, a Python server, takes several
//! milliseconds per request and would hide it). Answers with FHIR JSON of realistic
//! shape for patient p1: `GET .../Patient/{id}` (p1's Patient resource),
//! `GET .../Observation/{id}` (a read), and any search ending in `Observation` or
//! `Observation/_search` (the POST search `openfga` tenants narrow with): a searchset
//! Bundle of `ENTRIES` Observations, default 20 (12 make about 10 KB).
//!
//! Usage: static_upstream LISTEN_ADDR [ENTRIES]
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;

fn observation(base: &str, i: usize) -> serde_json::Value {
    json!({
        "resourceType": "Observation", "id": format!("obs-{i}"),
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Practitioner/pr1"}],
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2024-01-01T08:00:00Z",
        "valueQuantity": {"value": 5.4 + i as f64 / 10.0, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
        "note": [{"text": format!("see {base}/Observation/obs-{i}")}]
    })
}

fn patient_p1() -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": "p1",
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
        "active": true,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
        "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work"}],
        "gender": "male", "birthDate": "1974-12-25",
        "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}],
        "generalPractitioner": [{"reference": "Practitioner/pr1"}],
        "managingOrganization": {"reference": "Organization/o1"}
    })
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("LISTEN_ADDR");
    let entries: usize = args
        .next()
        .map(|n| n.parse().expect("ENTRIES"))
        .unwrap_or(20);
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    let read = Bytes::from(observation(&base, 0).to_string());
    let bundle = Bytes::from(
        json!({
            "resourceType": "Bundle", "type": "searchset", "total": entries,
            "link": [{"relation": "self", "url": format!("{base}/Observation")}],
            "entry": (0..entries).map(|i| json!({
                "fullUrl": format!("{base}/Observation/obs-{i}"),
                "resource": observation(&base, i),
                "search": {"mode": "match"}
            })).collect::<Vec<_>>()
        })
        .to_string(),
    );
    let patient = Bytes::from(patient_p1().to_string());
    let answers = Arc::new((read, bundle, patient));
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        let _ = stream.set_nodelay(true);
        let answers = Arc::clone(&answers);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answers = Arc::clone(&answers);
                async move {
                    let path = req.uri().path();
                    let body = if path.ends_with("/Observation")
                        || path.ends_with("/Observation/_search")
                    {
                        answers.1.clone()
                    } else if path.contains("/Patient/") {
                        answers.2.clone()
                    } else {
                        answers.0.clone()
                    };
                    // Read a POST body to its end, so the connection stays reusable.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/fhir+json")
                            .body(Full::new(body))
                            .expect("response"),
                    )
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
