//! Forwarding: URL rewriting, malformed input, tenant isolation, upstream faults,
//! configuration reload.

use serde_json::{Value, json};

use crate::harness::{
    self, Fault, FaultServer, Proxy, Reply, get, shared, tenant, tenants, token, write_json,
};
use crate::support;

#[tokio::test]
async fn upstream_urls_are_rewritten_to_the_proxy() {
    let t = token("backend", "system/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let a = get(&format!("{base}/Observation?_count=2"), Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let upstream = support::fhir_server().base_url();
    assert!(
        !a.text.contains(upstream),
        "upstream base leaked: {}",
        a.text
    );
    let v = a.json();
    for e in v["entry"].as_array().unwrap() {
        assert!(
            e["fullUrl"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{base}/Observation/")),
            "{e}"
        );
    }
    let next = v["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("next link");
    let next = next["url"].as_str().unwrap();
    assert!(next.starts_with(&format!("{base}/")), "{next}");
    // The next page works through the proxy and is checked like any request.
    let page2 = get(next, Some(&t)).await;
    assert_eq!(page2.status, 200, "{}", page2.text);
    assert_eq!(page2.entry_ids().len(), 2);
    // An absolute upstream URL inside a resource is rewritten too. (HAPI stores
    // references to its own base as relative ones, so the URL is an attachment's.)
    let t = token("backend", "system/Practitioner.rs", "demo").await;
    let a = get(&format!("{base}/Practitioner/pr1"), Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json()["photo"][0]["url"],
        format!("{base}/Binary/photo-pr1")
    );
}

#[tokio::test]
async fn malformed_paths_are_refused_before_forwarding() {
    let t = token("backend", "system/*.rs", "demo").await;
    let base = shared().base("demo");
    let before = support::fhir_server().requests().len();
    for (path, reason) in [
        ("Patient%2Fp1", "path_encoded_slash"),
        ("Patient/p1%2F..%2Fp2", "path_encoded_slash"),
        ("Patient/%2e%2e/p2", "path_dot_segment"),
        ("patient/p1", "unknown_resource_type"),
        ("Patient/p1%00", "path_percent_encoded"),
        ("Patient/a_b", "invalid_id"),
        ("Patient/p1/_history/", "path_empty_segment"),
        ("Observation?code=%ff", "param_invalid_encoding"),
        ("Foo/1", "unknown_resource_type"),
    ] {
        // reqwest normalizes `..`; send the raw path with a manual request line.
        let a = raw_get(shared().port, &format!("/demo/{path}"), &t).await;
        assert_eq!(a.0, 400, "{path}: {}", a.1);
        let v: serde_json::Value = serde_json::from_str(&a.1).unwrap();
        assert_eq!(
            v["issue"][0]["details"]["coding"][0]["code"], reason,
            "{path}: {}",
            a.1
        );
    }
    let a = raw_get(shared().port, "/demo/Patient/../Observation", &t).await;
    assert_eq!(a.0, 400, "{}", a.1);
    // Nothing of this reached the upstream.
    let after = support::fhir_server().requests();
    let new: Vec<_> = after[before..]
        .iter()
        .filter(|r| r.contains("Patient/p1%2F") || r.contains("..") || r.contains("/patient/"))
        .collect();
    assert!(new.is_empty(), "{new:?}");
    let _ = base;
}

/// A GET with a verbatim request target.
async fn raw_get(port: u16, target: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn tenants_are_isolated() {
    let t2 = token("backend", "system/*.rs", "demo2").await;
    let a = get(&format!("{}/Patient/p1", shared().base("demo")), Some(&t2)).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.reason(), "token_audience");
    assert_eq!(
        get(&format!("{}/Patient/p1", shared().base("demo2")), Some(&t2))
            .await
            .status,
        200
    );
    let a = get(&format!("{}/Patient/p1", shared().base("nope")), Some(&t2)).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.reason(), "tenant_unknown");
}

#[tokio::test]
async fn a_method_the_path_never_takes_is_405() {
    // (Writes themselves are tested in `writes`, against a FHIR server of their own.)
    let t = token("backend", "system/*.cruds", "demo").await;
    // A method the path never takes gets 405 with the methods it does take.
    let a = harness::answer(
        support::http_client()
            .patch(format!("{}/Observation", shared().base("demo")))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(a.status, 405, "{}", a.text);
    assert_eq!(a.reason(), "method_not_allowed");
    assert!(a.header("allow").contains("GET"), "{:?}", a.headers);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = token("backend", "system/*.rs", "demo").await;
    let limit = 1024 * 1024;
    // Declared too large: refused from the headers alone, before any body is read.
    // Sent chunked: refused once the limit is crossed. Raw requests, so the client never
    // races the early answer with its own upload.
    let declared = format!(
        "POST /demo/Observation/_search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        2 * limit
    );
    let chunk = "a".repeat(limit + 10);
    let chunked = format!(
        "POST /demo/Observation/_search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/x-www-form-urlencoded\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n",
        chunk.len()
    );
    for request in [declared, chunked] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", shared().port))
            .await
            .unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "{}",
            &text[..text.len().min(300)]
        );
        assert!(text.contains("body_too_large"), "{text}");
    }
}

#[tokio::test]
async fn upstream_down_slow_or_broken() {
    let issuer = support::issuer();
    let slow = FaultServer::start(Fault::Stall);
    let broken = FaultServer::start(Fault::BrokenJson);
    let dead = support::free_port();
    let proxy = Proxy::start(|port| {
        let mut down = tenant(
            "down",
            port,
            &format!("http://127.0.0.1:{dead}/fhir"),
            issuer,
        );
        down["upstream"]["connect_timeout_ms"] = json!(500);
        let mut s = tenant("slow", port, &slow.base(), issuer);
        s["upstream"]["timeout_ms"] = json!(300);
        let b = tenant("broken", port, &broken.base(), issuer);
        tenants(vec![("down", down), ("slow", s), ("broken", b)])
    });
    for (tenant_id, status, reason) in [
        ("down", 502, "upstream_unreachable"),
        ("slow", 504, "upstream_timeout"),
        ("broken", 502, "upstream_bad_response"),
    ] {
        let t = support::token("backend", "system/*.rs", &proxy.base(tenant_id)).await;
        let a = get(&format!("{}/Patient/p1", proxy.base(tenant_id)), Some(&t)).await;
        assert_eq!(a.status, status, "{tenant_id}: {}", a.text);
        assert_eq!(a.reason(), reason, "{tenant_id}");
        assert_eq!(a.header("content-type"), "application/fhir+json");
    }
    // The process is still healthy.
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/_health", proxy.port), None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn tenants_file_changes_apply_without_restart_and_bad_files_are_refused() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy =
        Proxy::start(|port| tenants(vec![("one", tenant("one", port, fhir.base_url(), issuer))]));
    let t1 = support::token("backend", "system/*.rs", &proxy.base("one")).await;
    let t2 = support::token("backend", "system/*.rs", &proxy.base("two")).await;
    assert_eq!(
        get(&format!("{}/Patient/p1", proxy.base("one")), Some(&t1))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&format!("{}/Patient/p1", proxy.base("two")), Some(&t2))
            .await
            .status,
        404
    );

    let port = proxy.port;
    write_json(
        &proxy.tenants_path(),
        &tenants(vec![
            ("one", tenant("one", port, fhir.base_url(), issuer)),
            ("two", tenant("two", port, fhir.base_url(), issuer)),
        ]),
    );
    wait_for(|| async {
        get(&format!("{}/Patient/p1", proxy.base("two")), Some(&t2))
            .await
            .status
            == 200
    })
    .await;

    // A broken file is refused; the running configuration stays.
    std::fs::write(
        proxy.tenants_path(),
        b"{\"tenants\": {\"one\": {\"oops\": 1}}}",
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        get(&format!("{}/Patient/p1", proxy.base("two")), Some(&t2))
            .await
            .status,
        200
    );
    assert!(
        proxy.log().contains("configuration reload refused"),
        "{}",
        proxy.log()
    );
}

async fn wait_for<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("condition not met in time");
}

#[tokio::test]
async fn every_decision_is_audited_without_the_token() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let _ = get(&format!("{base}/Observation/obs-p1-glucose"), Some(&t)).await;
    let _ = get(&format!("{base}/Condition/cond-p1-diabetes"), Some(&t)).await;
    let audit = shared().audit_records();
    let allowed = audit
        .iter()
        .find(|r| r["fhir.resource_id"] == "obs-p1-glucose" && r["authz.decision"] == "allow")
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(allowed["client.id"], "patient-p1");
    assert_eq!(allowed["tenant.id"], "demo");
    assert_eq!(allowed["fhir.interaction"], "read");
    assert_eq!(allowed["patient"], "p1");
    assert!(
        audit
            .iter()
            .any(|r| r["fhir.resource_id"] == "cond-p1-diabetes"
                && r["authz.decision"] == "deny"
                && r["authz.reason"] == "scope_insufficient")
    );
    assert!(!shared().log().contains(&t));
}

/// POSTs `Patient/$match` with `patient` as the `resource` parameter.
async fn post_match(url: &str, token: &str, patient: Value) -> harness::Answer {
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": patient},
        {"name": "count", "valueInteger": 10}
    ]});
    harness::answer(
        support::http_client()
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(params.to_string()),
    )
    .await
}

/// The `match-grade` extension of each entry's `search`, by entry id.
fn match_grades(a: &harness::Answer) -> Vec<(String, String)> {
    a.json()["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let grade = e["search"]["extension"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["url"] == "http://hl7.org/fhir/StructureDefinition/match-grade")
                .and_then(|x| x["valueCode"].as_str())
                .unwrap_or("none");
            (
                format!("Patient/{}", e["resource"]["id"].as_str().unwrap_or("?")),
                grade.to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn match_goes_to_the_upstreams_mdm_and_its_candidates_are_scored() {
    // HAPI's own `$match` (MDM, match-only): scored candidates with `match-grade`.
    let base = shared().base("demo");
    let url = format!("{base}/Patient/$match");
    let t = token("backend", "system/Patient.rs", "demo").await;
    let copy_of_p1 = json!({"resourceType": "Patient",
        "name": [{"family": "Patient-One", "given": ["Amy"]}], "birthDate": "1970-01-01"});
    let a = post_match(&url, &t, copy_of_p1.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        match_grades(&a),
        [("Patient/p1".to_owned(), "certain".to_owned())],
        "{}",
        a.text
    );
    let certain_score = a.json()["entry"][0]["search"]["score"].as_f64().unwrap();
    // Same name, another birth date: a possible match only.
    let near = json!({"resourceType": "Patient",
        "name": [{"family": "Patient-One", "given": ["Amy"]}], "birthDate": "1999-09-09"});
    let a = post_match(&url, &t, near).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        match_grades(&a),
        [("Patient/p1".to_owned(), "possible".to_owned())],
        "{}",
        a.text
    );
    let near_score = a.json()["entry"][0]["search"]["score"].as_f64().unwrap();
    assert!(
        certain_score > near_score,
        "{certain_score} vs {near_score}"
    );
    // Nobody like this: an empty searchset.
    let nobody = json!({"resourceType": "Patient",
        "name": [{"family": "Nobody", "given": ["Zed"]}], "birthDate": "2001-01-01"});
    let a = post_match(&url, &t, nobody).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{}", a.text);
    // No resource: refused by the proxy before the upstream (`match_resource_invalid`).
    let a = harness::answer(
        support::http_client()
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(r#"{"resourceType":"Parameters","parameter":[]}"#),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "match_resource_invalid", "{}", a.text);
    // A compartment-bound token gets the candidates it may read: its own patient.
    let p = token("patient-p1", "patient/Patient.rs", "demo").await;
    let a = post_match(&url, &p, copy_of_p1.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        match_grades(&a),
        [("Patient/p1".to_owned(), "certain".to_owned())],
        "{}",
        a.text
    );
    // Another patient's token: nothing, and no count of what was hidden.
    let p2 = token("patient-p2", "patient/Patient.rs", "demo").await;
    let a = post_match(&url, &p2, copy_of_p1).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.entry_ids().is_empty(), "{}", a.text);
    assert!(a.json().get("total").is_none(), "{}", a.text);
}

#[tokio::test]
async fn match_is_forwarded_with_its_body_and_its_results_are_checked() {
    // A loopback server answers in the upstream's place with what HAPI would never
    // send (an Observation among the candidates), so the filtering can be observed.
    let answer = json!({
        "resourceType": "Bundle", "type": "searchset", "total": 4,
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "generalPractitioner": [{"reference": "Practitioner/pr1"}]}, "search": {"mode": "match", "score": 0.9}},
            {"resource": {"resourceType": "Patient", "id": "p2", "generalPractitioner": [{"reference": "Practitioner/pr2"}]}, "search": {"mode": "match", "score": 0.8}},
            {"resource": {"resourceType": "Patient", "id": "p10", "generalPractitioner": [{"reference": "Practitioner/pr1"}]}, "search": {"mode": "match", "score": 0.7}},
            {"resource": {"resourceType": "Observation", "id": "o9", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p2"}}, "search": {"mode": "match"}}
        ]
    });
    // Its CapabilityStatement declares `Patient/$match`, so `auto` forwards.
    let metadata = json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": [{"type": "Patient", "operation": [{"name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"}]}]}]});
    let upstream = FaultServer::start(Fault::Routes(vec![
        (
            "GET /fhir/metadata".to_owned(),
            Reply::fhir(metadata.to_string()),
        ),
        (
            "POST /fhir/Patient/$match".to_owned(),
            Reply::fhir(answer.to_string()),
        ),
    ]));
    let issuer = support::issuer();
    let proxy =
        Proxy::start(|port| tenants(vec![("mpi", tenant("mpi", port, &upstream.base(), issuer))]));
    let params = r#"{"resourceType":"Parameters","parameter":[{"name":"resource","resource":{"resourceType":"Patient","name":[{"family":"Doe"}]}}]}"#;
    let url = format!("{}/Patient/$match", proxy.base("mpi"));

    // A compartment-bound token gets the candidates in its compartment only (pr1's
    // patients), and the upstream is asked for `max_candidates`, not the client's count.
    let t = support::token("practitioner-pr1", "user/Patient.rs", &proxy.base("mpi")).await;
    let a = harness::answer(
        support::http_client()
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(params),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.entry_ids(), ["Patient/p1", "Patient/p10"]);
    assert!(a.json().get("total").is_none(), "{}", a.text);
    let seen = upstream.requests.lock().unwrap().last().cloned().unwrap();
    assert!(seen.starts_with("POST /fhir/Patient/$match "), "{seen}");
    assert!(
        seen.contains(r#"{"name":"count","valueInteger":50}"#),
        "restricted body: {seen}"
    );

    // A backend service may; entries of types outside its scopes are still dropped.
    let t = support::token("backend", "system/Patient.rs", &proxy.base("mpi")).await;
    let a = harness::answer(
        support::http_client()
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(params),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.entry_ids(), ["Patient/p1", "Patient/p2", "Patient/p10"]);
    assert!(
        a.json().get("total").is_none(),
        "a match was dropped: {}",
        a.text
    );
    let seen = upstream.requests.lock().unwrap().last().cloned().unwrap();
    assert!(seen.starts_with("POST /fhir/Patient/$match "), "{seen}");
    assert!(seen.ends_with(params), "body not forwarded: {seen}");

    // `$match` is a search: `r` alone does not permit it.
    let t = support::token("backend", "system/Patient.r", &proxy.base("mpi")).await;
    let a = harness::answer(
        support::http_client()
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body(params),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
}

#[tokio::test]
async fn upstream_client_credentials_are_obtained_and_used() {
    let capture = FaultServer::start(Fault::Capture);
    let issuer = support::issuer();
    let proxy = Proxy::start_with_env(
        |port| {
            let mut t = tenant("cc", port, &capture.base(), issuer);
            t["upstream"]["auth"] = json!({
                "type": "client_credentials", "token_url": issuer.token_endpoint(),
                "client_id": "backend", "client_secret_env": "CC_UPSTREAM_SECRET", "scope": "system/*.rs"
            });
            tenants(vec![("cc", t)])
        },
        &[("CC_UPSTREAM_SECRET", support::TEST_SECRET)],
    );
    let t = support::token("patient-p1", "patient/Patient.rs", &proxy.base("cc")).await;
    for _ in 0..2 {
        let a = get(&format!("{}/Patient/p1", proxy.base("cc")), Some(&t)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let seen = capture.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let bearer = |r: &str| {
        r.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("authorization: bearer ")
                    .then(|| l[22..].trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no upstream credentials: {r}"))
    };
    let (first, second) = (bearer(&seen[0]), bearer(&seen[1]));
    assert_ne!(first, t, "the client's token was forwarded");
    assert_eq!(first, second, "the upstream token is cached");
}

#[tokio::test]
async fn upstream_redirects_are_never_followed_nor_passed_on() {
    // Whatever a redirect points to must never be called: not by the FHIR client,
    // not by the JWKS or introspection clients.
    let elsewhere = FaultServer::start(Fault::Capture);
    let moved = FaultServer::start(Fault::Redirect(format!("{}/Patient/p1", elsewhere.base())));
    let issuer = support::issuer();
    let dead = support::free_port();
    let nowhere = format!("http://127.0.0.1:{dead}/fhir");
    let proxy = Proxy::start_with_env(
        |port| {
            let mut fhir = tenant("moved", port, &moved.base(), issuer);
            fhir["upstream"]["auth"] =
                json!({"type": "header", "name": "x-upstream-key", "value_env": "MOVED_KEY"});
            let mut jwks = tenant("jwksmoved", port, &nowhere, issuer);
            jwks["token"]["jwks_uri"] = json!(format!("{}/jwks", moved.base()));
            let mut intro = tenant("intromoved", port, &nowhere, issuer);
            intro["token"]["introspection"] = json!({
                "endpoint": format!("{}/introspect", moved.base()),
                "client_id": "backend",
                "client_secret_env": "MOVED_KEY",
            });
            tenants(vec![
                ("moved", fhir),
                ("jwksmoved", jwks),
                ("intromoved", intro),
            ])
        },
        &[("MOVED_KEY", "key-for-the-upstream-only")],
    );
    for (tenant_id, status, reason) in [
        ("moved", 502, "upstream_redirect"),
        ("jwksmoved", 503, "jwks_unavailable"),
        ("intromoved", 503, "introspection_unavailable"),
    ] {
        let t = support::token("backend", "system/*.rs", &proxy.base(tenant_id)).await;
        let a = get(&format!("{}/Patient/p1", proxy.base(tenant_id)), Some(&t)).await;
        assert_eq!(a.status, status, "{tenant_id}: {}", a.text);
        assert_eq!(a.reason(), reason, "{tenant_id}");
        assert_eq!(a.header("content-type"), "application/fhir+json");
        assert!(
            a.header("location").is_empty(),
            "{tenant_id}: {:?}",
            a.headers
        );
        assert!(!a.text.contains("moved"), "{tenant_id}: {}", a.text);
    }
    // Each client did ask the redirecting server (so the check above is not vacuous),
    // the FHIR request with the tenant's upstream credential ...
    let asked = moved.requests.lock().unwrap().join("\n").to_lowercase();
    assert!(asked.contains("get /fhir/patient/p1 "), "{asked}");
    assert!(
        asked.contains("x-upstream-key: key-for-the-upstream-only"),
        "{asked}"
    );
    assert!(asked.contains("get /fhir/jwks "), "{asked}");
    assert!(asked.contains("post /fhir/introspect "), "{asked}");
    // ... and nothing went where the redirect pointed.
    assert!(
        elsewhere.requests.lock().unwrap().is_empty(),
        "a redirect was followed: {:?}",
        elsewhere.requests.lock().unwrap()
    );
    let audit = proxy.audit_records();
    assert!(
        audit.iter().any(|r| r["tenant.id"] == "moved"
            && r["authz.decision"] == "deny"
            && r["authz.reason"] == "upstream_redirect"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn an_upstream_answering_another_resource_is_refused_and_audited() {
    // The upstream answers every request with the same other patient.
    let other =
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Otherpatient"}]});
    let upstream = FaultServer::start(Fault::Respond(other.to_string()));
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        tenants(vec![(
            "wrong",
            tenant("wrong", port, &upstream.base(), issuer),
        )])
    });
    let base = proxy.base("wrong");
    let system = support::token("backend", "system/*.rs", &base).await;
    let patient = support::token("patient-p1", "patient/*.rs", &base).await;
    for (t, path) in [
        // A read of p1 answered with p2: even a token that may read p2.
        (&system, "Patient/p1"),
        (&patient, "Patient/p1"),
        (&system, "Patient/p1/_history/1"),
        // Answered with a resource where a Bundle is due.
        (&system, "Patient/p1/$everything"),
        (&patient, "Patient/p1/$everything"),
        (&patient, "Patient/p1/Observation"),
        (&system, "Patient?name=x"),
    ] {
        let a = get(&format!("{base}/{path}"), Some(t)).await;
        assert_eq!(a.status, 502, "{path}: {}", a.text);
        assert_eq!(a.reason(), "upstream_wrong_resource", "{path}");
        assert!(!a.text.contains("Otherpatient"), "{path}: {}", a.text);
    }
    assert!(upstream.requests.lock().unwrap().len() >= 7);
    // A read of the very record the upstream answers with goes through.
    let a = get(&format!("{base}/Patient/p2"), Some(&system)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let audit = proxy.audit_records();
    assert!(
        audit.iter().any(|r| r["fhir.resource_id"] == "p1"
            && r["fhir.interaction"] == "read"
            && r["authz.decision"] == "deny"
            && r["authz.reason"] == "upstream_wrong_resource"),
        "{audit:?}"
    );
}
