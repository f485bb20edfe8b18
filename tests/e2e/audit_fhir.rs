//! Audit records as FHIR AuditEvents: written to a real FHIR server (a HAPI instance
//! of their own, so the shared server's data stays as it is), searched back there; the
//! queue's overflow choices against an audit endpoint that never answers.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Fault, FaultServer, Proxy, answer, get, tenant, tenants};
use crate::support::{self, FhirServer, FhirServerOptions};

/// The audit repository of this test binary: an empty HAPI server.
fn audit_server() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        FhirServer::start(FhirServerOptions {
            load: Vec::new(),
            quiet: true,
            ..FhirServerOptions::default()
        })
    })
}

/// A proxy with one tenant `id` on the shared upstream, writing AuditEvents with `env`.
fn proxy(id: &str, env: &[(&str, &str)]) -> Proxy {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    Proxy::start_with_env(
        |port| tenants(vec![(id, tenant(id, port, fhir.base_url(), issuer))]),
        env,
    )
}

/// Every AuditEvent of the audit server matching `query` (one page, enough here).
async fn audit_events(query: &str) -> Vec<Value> {
    let url = format!(
        "{}/AuditEvent?{query}&_count=200",
        audit_server().base_url()
    );
    let a = get(&url, None).await;
    assert_eq!(a.status, 200, "{url}: {}", a.text);
    a.json()["entry"]
        .as_array()
        .map(|es| es.iter().map(|e| e["resource"].clone()).collect())
        .unwrap_or_default()
}

/// Waits until `query` finds at least `n` events (the writer sends them a moment after
/// the answers); the wait is bounded only so that a broken writer fails the test.
async fn wait_for_events(query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = audit_events(query).await;
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn detail<'a>(e: &'a Value, name: &str) -> Option<&'a str> {
    e["entity"]
        .as_array()?
        .iter()
        .flat_map(|x| x["detail"].as_array().into_iter().flatten())
        .find(|d| d["type"] == name)
        .and_then(|d| d["valueString"].as_str())
}

fn subtypes(e: &Value) -> Vec<String> {
    e["subtype"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["code"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn patients(e: &Value) -> Vec<String> {
    e["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["role"]["code"] == "1")
        .map(|x| {
            x["what"]["reference"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn query(e: &Value) -> Option<String> {
    let q = e["entity"]
        .as_array()?
        .iter()
        .find(|x| x["role"]["code"] == "24")?["query"]
        .as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(q).ok()?;
    String::from_utf8(bytes).ok()
}

/// One exchange over a raw connection: what came back before the proxy closed it.
async fn raw(port: u16, request: String) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Asks the audit server to validate `event` against the base R4 definitions; returns
/// the error and fatal issues.
async fn validation_errors(event: &Value) -> Vec<Value> {
    let mut e = event.clone();
    let o = e.as_object_mut().unwrap();
    o.remove("id");
    o.remove("meta");
    let a = answer(
        support::http_client()
            .post(format!(
                "{}/AuditEvent/$validate",
                audit_server().base_url()
            ))
            .header("content-type", "application/fhir+json")
            .body(e.to_string()),
    )
    .await;
    let outcome = a.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{}", a.text);
    outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["severity"] == "error" || i["severity"] == "fatal")
        .cloned()
        .collect()
}

#[tokio::test]
async fn decisions_become_audit_events_on_the_fhir_server() {
    let audit = audit_server();
    let p = proxy(
        "aud1",
        &[
            ("SFP_AUDIT_FHIR_ENDPOINT", audit.base_url()),
            ("SFP_AUDIT_FHIR_FLUSH_MS", "20"),
            ("SFP_AUDIT_FHIR_SOURCE", "proxy-e2e"),
        ],
    );
    let base = p.base("aud1");
    let patient = support::token("patient-p1", "patient/*.rs", &base).await;
    let backend = support::token("backend", "system/*.rs", &base).await;

    // An allowed read, with a request id.
    let a = answer(
        support::http_client()
            .get(format!("{base}/Patient/p1"))
            .bearer_auth(&patient)
            .header("x-request-id", "req-aud1-read"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // A denied read: another patient's record.
    let a = get(&format!("{base}/Patient/p2"), Some(&patient)).await;
    assert_eq!(a.status, 404, "{}", a.text);
    // A search.
    let a = get(
        &format!("{base}/Observation?category=laboratory"),
        Some(&patient),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // A search with the token also sent as a parameter (refused: no such parameter).
    let a = get(
        &format!("{base}/Observation?code=2339-0&access_token={patient}"),
        Some(&patient),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "search_parameter_unknown");
    // An upstream error handed through: HAPI refuses an unknown search parameter.
    let a = get(
        &format!("{base}/Observation?no-such-param=1"),
        Some(&backend),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(!a.text.contains("body_"), "{}", a.text);
    // Refused before the stack: a body too large, a broken chunked body.
    let head = |extra: &str| {
        format!(
            "POST /aud1/Observation/_search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {backend}\r\n\
             content-type: application/x-www-form-urlencoded\r\n{extra}connection: close\r\n\r\n"
        )
    };
    let text = raw(
        p.port,
        head(&format!("content-length: {}\r\n", 8 * 1024 * 1024)),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let text = raw(
        p.port,
        format!("{}zz\r\nab\r\n", head("transfer-encoding: chunked\r\n")),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    let events = wait_for_events("site=aud1", 7).await;
    assert_eq!(events.len(), 7, "{events:#?}\n{}", p.log());
    let everything = serde_json::to_string(&events).unwrap();
    assert!(!everything.contains(&patient) && !everything.contains(&backend));
    for e in &events {
        assert_eq!(e["source"]["observer"]["display"], "proxy-e2e");
        assert_eq!(e["type"]["code"], "rest", "{e}");
        let errors = validation_errors(e).await;
        assert!(errors.is_empty(), "{errors:#?}\n{e:#}");
    }

    // The patient's events, found by the entity search (references are absolute, under
    // the tenant's public base).
    let of_p1 = audit_events(&format!("site=aud1&entity={base}/Patient/p1")).await;
    let read = of_p1
        .iter()
        .find(|e| subtypes(e) == ["read"] && e["outcome"] == "0")
        .unwrap_or_else(|| panic!("{of_p1:#?}"));
    assert_eq!(read["action"], "R");
    assert_eq!(read["outcomeDesc"], "record_allowed");
    assert_eq!(detail(read, "authz.decision"), Some("allow"));
    assert_eq!(patients(read), [format!("{base}/Patient/p1")]);
    let agents = read["agent"].as_array().unwrap();
    assert_eq!(agents[0]["who"]["identifier"]["value"], "patient-p1");
    assert_eq!(agents[1]["who"]["reference"], format!("{base}/Patient/p1"));
    assert_eq!(agents[1]["requestor"], true);
    assert!(
        read["entity"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["type"]["code"] == "XrequestId"
                && x["what"]["identifier"]["value"] == "req-aud1-read"),
        "{read:#}"
    );
    let searches: Vec<&Value> = of_p1
        .iter()
        .filter(|e| subtypes(e).contains(&"search-type".to_owned()))
        .collect();
    assert_eq!(searches.len(), 2, "{of_p1:#?}");
    for search in &searches {
        assert_eq!(search["action"], "E");
        assert_eq!(subtypes(search), ["search", "search-type", "110112"]);
    }
    let (ok, refused) = if searches[0]["outcome"] == "0" {
        (searches[0], searches[1])
    } else {
        (searches[1], searches[0])
    };
    assert_eq!(ok["outcome"], "0");
    assert_eq!(
        query(ok).as_deref(),
        Some("Observation?category=laboratory")
    );
    // The refused one is on record with its query, but not the token it carried.
    assert_eq!(refused["outcome"], "4");
    assert_eq!(refused["outcomeDesc"], "search_parameter_unknown");
    assert_eq!(query(refused).as_deref(), Some("Observation?code=2339-0"));

    // The denied read names both patients: the token's and the one asked for.
    let of_p2 = audit_events(&format!("site=aud1&patient={base}/Patient/p2")).await;
    assert_eq!(of_p2.len(), 1, "{of_p2:#?}");
    assert_eq!(of_p2[0]["outcome"], "4");
    assert_eq!(of_p2[0]["outcomeDesc"], "record_denied");
    assert_eq!(detail(&of_p2[0], "authz.decision"), Some("deny"));
    assert_eq!(
        patients(&of_p2[0]),
        [format!("{base}/Patient/p1"), format!("{base}/Patient/p2")]
    );

    // Failures, found by outcome: the denied read, the upstream's error (not `allow`)
    // and the two refusals before the stack, filed under the tenant.
    let failed = audit_events("site=aud1&outcome=4").await;
    let mut reasons: Vec<(String, String)> = failed
        .iter()
        .map(|e| {
            (
                e["outcomeDesc"].as_str().unwrap_or_default().to_owned(),
                detail(e, "authz.decision").unwrap_or_default().to_owned(),
            )
        })
        .collect();
    reasons.sort();
    let expected: Vec<(String, String)> = [
        ("body_malformed", "deny"),
        ("body_too_large", "deny"),
        ("record_denied", "deny"),
        ("search_parameter_unknown", "deny"),
        ("upstream_outcome", "error"),
    ]
    .iter()
    .map(|(r, d)| (r.to_string(), d.to_string()))
    .collect();
    assert_eq!(reasons, expected, "{failed:#?}");
    // The JSON lines agree.
    let lines = p.audit_records();
    assert!(
        lines
            .iter()
            .any(|r| r["authz.reason"] == "upstream_outcome" && r["authz.decision"] == "error"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|r| r["authz.reason"] == "body_too_large" && r["tenant.id"] == "aud1"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn queued_audit_events_are_sent_on_shutdown() {
    let audit = audit_server();
    // Batches would wait a minute to fill: only the drain at shutdown sends them.
    let p = proxy(
        "aud2",
        &[
            ("SFP_AUDIT_FHIR_ENDPOINT", audit.base_url()),
            ("SFP_AUDIT_FHIR_FLUSH_MS", "60000"),
            ("SFP_AUDIT_FHIR_BATCH", "1000"),
        ],
    );
    let base = p.base("aud2");
    let t = support::token("backend", "system/*.rs", &base).await;
    for id in ["p1", "p2", "p10"] {
        let a = get(&format!("{base}/Patient/{id}"), Some(&t)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    assert!(audit_events("site=aud2").await.is_empty());
    let log = p.stop();
    // The process has exited: what it sent, it sent while shutting down.
    let events = audit_events("site=aud2").await;
    let mut read: Vec<String> = events.iter().flat_map(patients).collect();
    read.sort();
    let expected: Vec<String> = ["p1", "p10", "p2"]
        .iter()
        .map(|id| format!("{base}/Patient/{id}"))
        .collect();
    assert_eq!(read, expected, "{log}");
    assert!(!log.contains("audit.fhir.unsent"), "{log}");
}

/// A proxy whose AuditEvents go to an endpoint that never answers, with room for one
/// queued event and one in flight.
fn stalled_proxy(id: &str, stalled: &FaultServer, overflow: &str) -> Proxy {
    let endpoint = stalled.base();
    proxy(
        id,
        &[
            ("SFP_AUDIT_FHIR_ENDPOINT", endpoint.as_str()),
            ("SFP_AUDIT_FHIR_QUEUE", "1"),
            ("SFP_AUDIT_FHIR_BATCH", "1"),
            ("SFP_AUDIT_FHIR_FLUSH_MS", "0"),
            ("SFP_AUDIT_FHIR_TIMEOUT_MS", "600000"),
            ("SFP_AUDIT_FHIR_OVERFLOW", overflow),
        ],
    )
}

/// Waits until the writer has taken the first event to the endpoint.
fn wait_for_post(stalled: &FaultServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while stalled.requests.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = stalled.requests.lock().unwrap().join("\n");
    assert!(seen.starts_with("POST /fhir "), "{seen}");
}

#[tokio::test]
async fn a_full_audit_event_queue_fails_closed() {
    let stalled = FaultServer::start(Fault::Stall);
    let p = stalled_proxy("aud3", &stalled, "fail-closed");
    let base = p.base("aud3");
    let t = support::token("backend", "system/*.rs", &base).await;
    let first = get(&format!("{base}/Patient/p1"), Some(&t)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    wait_for_post(&stalled);
    // One event in flight, one queued; then nothing is released unrecorded.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let a = get(&format!("{base}/Patient/p1"), Some(&t)).await;
        if a.status == 503 {
            assert_eq!(a.reason(), "audit_unavailable");
            assert!(!a.text.contains("\"Patient\""), "{}", a.text);
        }
        statuses.push(a.status);
    }
    assert_eq!(statuses, [200, 503, 503, 503, 503], "{}", p.log());
    // Refusals still go out.
    let a = get(&format!("{base}/Patient/p1"), None).await;
    assert_eq!(a.status, 401, "{}", a.text);
}

#[tokio::test]
async fn a_full_audit_event_queue_drops_and_counts_when_told_to() {
    let stalled = FaultServer::start(Fault::Stall);
    let p = stalled_proxy("aud4", &stalled, "drop");
    let base = p.base("aud4");
    let t = support::token("backend", "system/*.rs", &base).await;
    let first = get(&format!("{base}/Patient/p1"), Some(&t)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    wait_for_post(&stalled);
    for _ in 0..5 {
        let a = get(&format!("{base}/Patient/p1"), Some(&t)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    // One more fits the queue; four are dropped, and a warning says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = loop {
        let total = p
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "audit events dropped: the FHIR audit queue was full")
            .filter_map(|v| v["audit.fhir.dropped_total"].as_u64())
            .max();
        if total == Some(4) || Instant::now() > deadline {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(total, Some(4), "{}", p.log());
    // The JSON lines are complete all the same.
    let lines = p.audit_records();
    assert_eq!(
        lines
            .iter()
            .filter(|r| r["tenant.id"] == "aud4" && r["fhir.interaction"] == "read")
            .count(),
        6,
        "{lines:?}"
    );
}
