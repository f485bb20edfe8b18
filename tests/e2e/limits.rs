//! Request limits end to end (README, *Limits*): load shedding (503 with `Retry-After`),
//! per-client rate limits (429), the request-head size, the per-tenant connect timeout
//! and the drain on shutdown. The proxy binary runs against the real upstream and
//! issuer; a fault server stands in for the upstream where a request must be held in
//! flight, and a listener with a full accept queue for an upstream that never answers
//! a connection attempt.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    Answer, Fault, FaultServer, Gate, Proxy, Reply, answer, get, tenant, tenants,
};
use crate::support;

const PATIENT: &str = r#"{"resourceType":"Patient","id":"p1"}"#;

/// Polls `done` until it holds (at most 20 s, a bound against hanging).
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_refusal(a: &Answer, status: u16, reason: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.reason(), reason, "{}", a.text);
    assert_eq!(a.json()["issue"][0]["code"], "throttled", "{}", a.text);
    let retry: u64 = a
        .header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("no Retry-After seconds: {:?}", a.headers));
    assert!(retry >= 1, "{retry}");
}

fn audited(proxy: &Proxy, reason: &str) -> Vec<Value> {
    proxy
        .audit_records()
        .into_iter()
        .filter(|r| r["authz.reason"] == reason)
        .collect()
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_shed_with_503_and_retry_after() {
    let gate = Gate::default();
    let upstream = FaultServer::start(Fault::Gated(gate.clone(), Reply::fhir(PATIENT)));
    let issuer = support::issuer();
    let proxy = Proxy::start_with_args(
        |port| tenants(vec![("t", tenant("t", port, &upstream.base(), issuer))]),
        &["--max-concurrent-requests", "3"],
        &[],
    );
    let token = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move { get(&url, Some(&token)).await })
        })
        .collect();
    // All three are in flight once the upstream holds them.
    until("three requests at the upstream", || {
        upstream.requests.lock().unwrap().len() == 3
    })
    .await;
    for _ in 0..5 {
        let a = get(&url, Some(&token)).await;
        assert_refusal(&a, 503, "overloaded");
        assert_eq!(a.header("retry-after"), "1");
    }
    // Discovery is shed too: nothing is queued behind the limit.
    let a = get(
        &format!("{}/.well-known/smart-configuration", proxy.base("t")),
        None,
    )
    .await;
    assert_refusal(&a, 503, "overloaded");
    assert_eq!(upstream.requests.lock().unwrap().len(), 3);

    gate.open();
    for h in held {
        let a = h.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["id"], "p1");
    }
    // The slots are free again.
    let a = get(&url, Some(&token)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let shed = audited(&proxy, "overloaded");
    assert_eq!(shed.len(), 6, "{shed:?}");
    assert!(
        shed.iter()
            .all(|r| r["http.status"] == 503 && r["authz.decision"] == "deny")
    );
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_and_is_limited_by_client_id() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy = Proxy::start_with_args(
        |port| {
            tenants(vec![
                ("t", tenant("t", port, fhir.base_url(), issuer)),
                ("u", tenant("u", port, fhir.base_url(), issuer)),
            ])
        },
        &["--rate-limit-per-client", "1/h", "--rate-burst", "4"],
        &[],
    );
    let backend = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let other = support::token("backend-es256", "system/*.rs", &proxy.base("t")).await;
    let backend_u = support::token("backend", "system/*.rs", &proxy.base("u")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));

    // A token that does not verify is charged to the address, once refused.
    let a = get(&url, Some("not.a.token")).await;
    assert_eq!(a.status, 401, "{}", a.text);

    for i in 0..4 {
        let a = get(&url, Some(&backend)).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.text);
    }
    for _ in 0..3 {
        let a = get(&url, Some(&backend)).await;
        assert_refusal(&a, 429, "rate_limited");
        // The next token is an hour's rate away.
        let retry: u64 = a.header("retry-after").parse().unwrap();
        assert!((3000..=3600).contains(&retry), "{retry}");
        assert!(a.headers.get("www-authenticate").is_none());
    }
    // Another client from the same address, and the same client on another tenant,
    // have buckets of their own.
    assert_eq!(get(&url, Some(&other)).await.status, 200);
    let a = get(&format!("{}/Patient/p1", proxy.base("u")), Some(&backend_u)).await;
    assert_eq!(a.status, 200, "{}", a.text);

    // Without a verified token the address pays: one charge is gone already (the bad
    // token), three discovery calls empty the bucket.
    let discovery = format!("{}/.well-known/smart-configuration", proxy.base("t"));
    for _ in 0..3 {
        assert_eq!(get(&discovery, None).await.status, 200);
    }
    assert_refusal(&get(&discovery, None).await, 429, "rate_limited");
    assert_refusal(&get(&url, None).await, 429, "rate_limited");
    assert_refusal(&get(&url, Some("not.a.token")).await, 429, "rate_limited");
    // X-Forwarded-For is not believed without `--trust-forwarded-for`.
    let forged = answer(
        support::http_client()
            .get(&discovery)
            .header("x-forwarded-for", "192.0.2.77"),
    )
    .await;
    assert_refusal(&forged, 429, "rate_limited");
    // Verified clients are not held to the address's bucket.
    assert_eq!(get(&url, Some(&other)).await.status, 200);

    let limited = audited(&proxy, "rate_limited");
    assert!(
        limited.iter().any(|r| r["client.id"] == "backend"
            && r["tenant.id"] == "t"
            && r["http.status"] == 429),
        "{limited:?}"
    );
    assert_eq!(limited.len(), 3 + 4, "{limited:?}");
}

#[tokio::test]
async fn behind_trusted_proxies_the_forwarded_address_is_the_clients() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy = Proxy::start_with_args(
        |port| tenants(vec![("t", tenant("t", port, fhir.base_url(), issuer))]),
        &[
            "--rate-limit-per-client",
            "1/h",
            "--rate-burst",
            "2",
            "--trust-forwarded-for",
            "1",
        ],
        &[],
    );
    let discovery = format!("{}/.well-known/smart-configuration", proxy.base("t"));
    let from = |xff: &'static str| {
        let url = discovery.clone();
        async move {
            answer(
                support::http_client()
                    .get(&url)
                    .header("x-forwarded-for", xff),
            )
            .await
        }
    };
    assert_eq!(from("192.0.2.1").await.status, 200);
    assert_eq!(from("192.0.2.1").await.status, 200);
    assert_refusal(&from("192.0.2.1").await, 429, "rate_limited");
    // What the client wrote before the load balancer's entry is not believed.
    assert_refusal(&from("192.0.2.9, 192.0.2.1").await, 429, "rate_limited");
    assert_eq!(from("192.0.2.2").await.status, 200);
}

#[tokio::test]
async fn request_heads_over_the_configured_size_or_line_count_are_431() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy = Proxy::start_with_args(
        |port| tenants(vec![("t", tenant("t", port, fhir.base_url(), issuer))]),
        &["--max-header-bytes", "16384", "--max-headers", "20"],
        &[],
    );
    let token = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));
    let with_header = |bytes: usize| {
        support::http_client()
            .get(&url)
            .bearer_auth(&token)
            .header("x-junk", "j".repeat(bytes))
    };
    let a = answer(with_header(8 * 1024)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = answer(with_header(20 * 1024)).await;
    assert_eq!(a.status, 431);
    let mut many = support::http_client().get(&url).bearer_auth(&token);
    for i in 0..25 {
        many = many.header(format!("x-h{i}"), "1");
    }
    assert_eq!(answer(many).await.status, 431);
}

/// A loopback address that never answers a connection attempt: a listener whose accept
/// queue is full (backlog 0, one connection made and never accepted) drops further
/// SYNs, so connecting hangs until the client gives up.
async fn black_hole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filling = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => filling.push(s),
            Ok(Err(e)) => panic!("connecting to the black hole failed at once: {e}"),
            // No answer: the queue is full.
            Err(_) => break,
        }
        assert!(filling.len() < 16, "the accept queue does not fill up");
    }
    (listener, filling, addr.port())
}

#[tokio::test]
async fn the_tenants_connect_timeout_bounds_connecting_to_the_upstream() {
    let (_listener, _filling, port) = black_hole().await;
    let base = format!("http://127.0.0.1:{port}/fhir");
    let issuer = support::issuer();
    let proxy = Proxy::start(|p| {
        // `quick` gives up connecting well within its exchange timeout (the former
        // fixed 5 s connect timeout would have let the exchange time out first);
        // `patient` waits for the connection longer than its exchange may take.
        let mut quick = tenant("quick", p, &base, issuer);
        quick["upstream"]["connect_timeout_ms"] = 300.into();
        quick["upstream"]["timeout_ms"] = 4000.into();
        let mut patient = tenant("patient", p, &base, issuer);
        patient["upstream"]["connect_timeout_ms"] = 20_000.into();
        patient["upstream"]["timeout_ms"] = 1000.into();
        tenants(vec![("quick", quick), ("patient", patient)])
    });
    let quick = support::token("backend", "system/*.rs", &proxy.base("quick")).await;
    let patient = support::token("backend", "system/*.rs", &proxy.base("patient")).await;
    let a = get(&format!("{}/Patient/p1", proxy.base("quick")), Some(&quick)).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.reason(), "upstream_unreachable");
    let a = get(
        &format!("{}/Patient/p1", proxy.base("patient")),
        Some(&patient),
    )
    .await;
    assert_eq!(a.status, 504, "{}", a.text);
    assert_eq!(a.reason(), "upstream_timeout");
}

/// Connects until the proxy refuses (at most 20 s).
async fn until_refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {
                assert!(Instant::now() < deadline, "still accepting connections");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn sigterm_drains_requests_in_flight_and_refuses_new_connections() {
    let gate = Gate::default();
    let upstream = FaultServer::start(Fault::Gated(gate.clone(), Reply::fhir(PATIENT)));
    let issuer = support::issuer();
    let mut proxy = Proxy::start_with_args(
        |port| tenants(vec![("t", tenant("t", port, &upstream.base(), issuer))]),
        &["--shutdown-grace-seconds", "60"],
        &[],
    );
    let token = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));
    let in_flight = {
        let (url, token) = (url.clone(), token.clone());
        tokio::spawn(async move { get(&url, Some(&token)).await })
    };
    until("the request at the upstream", || {
        upstream.requests.lock().unwrap().len() == 1
    })
    .await;
    proxy.signal("TERM");
    until_refused(proxy.port).await;
    // Still running: the request is in flight.
    assert!(proxy.wait_exit(Duration::ZERO).is_none(), "{}", proxy.log());
    gate.open();
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["id"], "p1");
    let status = proxy
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the proxy did not exit; log:\n{}", proxy.log()));
    assert!(status.success(), "{status:?}; log:\n{}", proxy.log());
    let log = proxy.log();
    assert!(log.contains("no longer accepting"), "{log}");
    assert!(log.contains("drained"), "{log}");
    // The request's audit record was written before the exit.
    assert!(
        proxy
            .audit_records()
            .iter()
            .any(|r| r["http.status"] == 200 && r["fhir.resource_id"] == "p1"),
        "{log}"
    );
}

#[tokio::test]
async fn the_drain_ends_after_the_grace_period() {
    let gate = Gate::default();
    let upstream = FaultServer::start(Fault::Gated(gate.clone(), Reply::fhir(PATIENT)));
    let issuer = support::issuer();
    let mut proxy = Proxy::start_with_args(
        |port| tenants(vec![("t", tenant("t", port, &upstream.base(), issuer))]),
        &["--shutdown-grace-seconds", "1"],
        &[],
    );
    let token = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));
    let in_flight = tokio::spawn(async move {
        support::http_client()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
    });
    until("the request at the upstream", || {
        upstream.requests.lock().unwrap().len() == 1
    })
    .await;
    proxy.signal("TERM");
    // The upstream never answers; the proxy exits anyway, cutting the request off.
    let status = proxy
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the proxy did not exit; log:\n{}", proxy.log()));
    assert!(status.success(), "{status:?}; log:\n{}", proxy.log());
    assert!(in_flight.await.unwrap().is_err());
    assert!(proxy.log().contains("drain timeout"), "{}", proxy.log());
    gate.open();
}
