#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use super::*;

// ---------------------------------------------------------------------------------------
// error bodies

#[test]
fn error_codes_come_from_openfga_or_the_grpc_status_of_a_stream() {
    let code = |body: &str| serde_json::from_str::<ApiErrorBody>(body).unwrap().code();
    assert_eq!(
        code(r#"{"code":"type_not_found","message":"type 'x' not found"}"#),
        "type_not_found"
    );
    // what OpenFGA's gateway answers for a StreamedListObjects refused before streaming
    assert_eq!(
        code(r#"{"error":{"code":3,"message":"type 'x' not found","details":[]}}"#),
        "invalid_argument"
    );
    assert_eq!(code(r#"{"error":{"code":16}}"#), "unauthenticated");
    assert_eq!(code(r#"{"error":{"code":99}}"#), "unknown");
    assert_eq!(code(r#"{"code":2000}"#), "2000");
    assert_eq!(code("{}"), "");
}

// ---------------------------------------------------------------------------------------
// circuit breaker

fn breaker(threshold: u32, cool_down_ms: u64) -> Breaker {
    Breaker::new(BreakerSettings {
        failure_threshold: threshold,
        cool_down: Duration::from_millis(cool_down_ms),
    })
}

#[test]
fn breaker_opens_after_consecutive_failures_only() {
    let b = breaker(3, 1000);
    let t = Instant::now();
    for _ in 0..2 {
        assert!(b.try_acquire(t));
        b.record(false, t);
    }
    // a success resets the count
    assert!(b.try_acquire(t));
    b.record(true, t);
    for _ in 0..2 {
        assert!(b.try_acquire(t));
        b.record(false, t);
    }
    assert!(!b.is_open());
    assert!(b.try_acquire(t));
    b.record(false, t);
    assert!(b.is_open());
    assert!(!b.try_acquire(t));
    assert!(!b.try_acquire(t + Duration::from_millis(999)));
}

#[test]
fn breaker_half_open_allows_one_trial_and_success_closes() {
    let b = breaker(1, 1000);
    let t = Instant::now();
    b.record(false, t);
    let later = t + Duration::from_millis(1000);
    assert!(b.try_acquire(later), "trial after the cool-down");
    assert!(!b.try_acquire(later), "only one trial at a time");
    b.record(true, later);
    assert!(!b.is_open());
    assert!(b.try_acquire(later));
    assert!(b.try_acquire(later));
}

#[test]
fn breaker_failed_trial_reopens_for_another_cool_down() {
    let b = breaker(2, 1000);
    let t = Instant::now();
    b.record(false, t);
    b.record(false, t);
    let t1 = t + Duration::from_millis(1000);
    assert!(b.try_acquire(t1));
    b.record(false, t1);
    assert!(!b.try_acquire(t1 + Duration::from_millis(500)));
    assert!(b.try_acquire(t1 + Duration::from_millis(1000)));
}

#[test]
fn breaker_lost_trial_does_not_stick_half_open() {
    let b = breaker(1, 100);
    let t = Instant::now();
    b.record(false, t);
    let t1 = t + Duration::from_millis(100);
    assert!(b.try_acquire(t1)); // trial never reports (future dropped)
    assert!(!b.try_acquire(t1 + Duration::from_millis(50)));
    assert!(b.try_acquire(t1 + Duration::from_millis(100)));
}

// ---------------------------------------------------------------------------------------
// wire shapes

#[test]
fn check_request_shape() {
    let body = CheckRequest {
        tuple_key: TupleKey {
            user: "user:alice",
            relation: "can_view",
            object: "patient:p1",
        },
        authorization_model_id: "01HMODEL",
    };
    assert_eq!(
        serde_json::to_value(&body).unwrap(),
        json!({
            "tuple_key": {"user": "user:alice", "relation": "can_view", "object": "patient:p1"},
            "authorization_model_id": "01HMODEL"
        })
    );
}

#[test]
fn batch_check_request_shape() {
    let body = BatchCheckRequest {
        checks: vec![BatchCheckItem {
            tuple_key: TupleKey {
                user: "user:alice",
                relation: "can_view",
                object: "patient:p1",
            },
            correlation_id: "0".into(),
        }],
        authorization_model_id: "01HMODEL",
    };
    assert_eq!(
        serde_json::to_value(&body).unwrap(),
        json!({
            "checks": [{
                "tuple_key": {"user": "user:alice", "relation": "can_view", "object": "patient:p1"},
                "correlation_id": "0"
            }],
            "authorization_model_id": "01HMODEL"
        })
    );
}

#[test]
fn list_objects_request_shape() {
    let body = ListObjectsRequest {
        authorization_model_id: "01HMODEL",
        type_name: "patient",
        relation: "can_view",
        user: "user:alice",
    };
    assert_eq!(
        serde_json::to_value(&body).unwrap(),
        json!({
            "authorization_model_id": "01HMODEL",
            "type": "patient",
            "relation": "can_view",
            "user": "user:alice"
        })
    );
}

fn objects(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn batch_response(v: Value) -> BatchCheckResponse {
    serde_json::from_value(v).unwrap()
}

#[test]
fn batch_response_maps_correlation_ids_back() {
    let r = batch_response(json!({"result": {
        "1": {"allowed": false},
        "0": {"allowed": true},
        "2": {}
    }}));
    let mapped = map_batch_response(&objects(&["patient:a", "patient:b", "patient:c"]), r).unwrap();
    assert_eq!(
        mapped,
        vec![
            ("patient:a".to_owned(), true),
            ("patient:b".to_owned(), false),
            ("patient:c".to_owned(), false),
        ]
    );
}

#[test]
fn batch_response_missing_or_extra_check_is_incomplete() {
    let r = batch_response(json!({"result": {"0": {"allowed": true}}}));
    let e = map_batch_response(&objects(&["patient:a", "patient:b"]), r).unwrap_err();
    assert_eq!(e.reason(), "fga_incomplete");
    let r = batch_response(json!({"result": {"0": {"allowed": true}, "7": {"allowed": true}}}));
    let e = map_batch_response(&objects(&["patient:a"]), r).unwrap_err();
    assert_eq!(e.reason(), "fga_incomplete");
}

#[test]
fn batch_response_item_errors_fail_the_whole_batch() {
    let r = batch_response(json!({"result": {
        "0": {"allowed": true},
        "1": {"error": {"input_error": "validation_error", "message": "bad"}}
    }}));
    let e = map_batch_response(&objects(&["patient:a", "patient:b"]), r).unwrap_err();
    assert_eq!(
        e,
        FgaError::Rejected {
            status: 400,
            code: "validation_error".into()
        }
    );
    let r = batch_response(json!({"result": {
        "0": {"error": {"internal_error": "internal_error", "message": "boom"}}
    }}));
    let e = map_batch_response(&objects(&["patient:a"]), r).unwrap_err();
    assert_eq!(e.reason(), "fga_unavailable");
}

// ---------------------------------------------------------------------------------------
// NDJSON

#[test]
fn ndjson_lines_split_across_chunks() {
    let body = b"{\"result\":{\"object\":\"patient:p1\"}}\n{\"result\":{\"object\":\"patient:p2\"}}\n\n{\"result\":{\"object\":\"patient:p3\"}}\n";
    for split in 0..body.len() {
        for split2 in split..body.len() {
            let mut p = NdjsonObjects::default();
            let mut got = p.push(&body[..split]).unwrap();
            got.extend(p.push(&body[split..split2]).unwrap());
            got.extend(p.push(&body[split2..]).unwrap());
            got.extend(p.finish().unwrap());
            assert_eq!(got, objects(&["patient:p1", "patient:p2", "patient:p3"]));
        }
    }
}

#[test]
fn ndjson_last_line_without_newline_counts_if_whole() {
    let mut p = NdjsonObjects::default();
    assert!(
        p.push(b"{\"result\":{\"object\":\"patient:p1\"}}")
            .unwrap()
            .is_empty()
    );
    assert_eq!(p.finish().unwrap(), Some("patient:p1".to_owned()));

    let mut p = NdjsonObjects::default();
    p.push(b"{\"result\":{\"object\":\"patient:p1\"}}\n{\"result\":{\"obj")
        .unwrap();
    assert_eq!(p.finish().unwrap_err().reason(), "fga_incomplete");
}

#[test]
fn ndjson_error_line_is_incomplete() {
    let mut p = NdjsonObjects::default();
    let e = p
        .push(b"{\"result\":{\"object\":\"patient:p1\"}}\n{\"error\":{\"code\":\"internal_error\",\"message\":\"x\"}}\n")
        .unwrap_err();
    assert_eq!(e.reason(), "fga_incomplete");
}

#[test]
fn ndjson_garbage_is_incomplete() {
    for garbage in [
        &b"not json\n"[..],
        b"{}\n",
        b"{\"result\":{}}\n",
        b"{\"result\":{\"object\":1}}\n",
        b"{\"unexpected\":true}\n",
        b"[1,2]\n",
    ] {
        let mut p = NdjsonObjects::default();
        let e = p.push(garbage).unwrap_err();
        assert_eq!(e.reason(), "fga_incomplete", "{garbage:?}");
    }
}

#[test]
fn error_reasons_are_stable() {
    assert_eq!(FgaError::unavailable("x").reason(), "fga_unavailable");
    assert_eq!(
        FgaError::Rejected {
            status: 400,
            code: "validation_error".into()
        }
        .reason(),
        "fga_rejected"
    );
    assert_eq!(FgaError::incomplete("x").reason(), "fga_incomplete");
    assert_eq!(FgaError::TooMany { max: 3 }.reason(), "fga_too_many");
}

#[test]
fn credentials_are_redacted_in_debug() {
    let api = FgaCredentials::ApiToken(Secret::new("s3cret-token".into()));
    assert!(!format!("{api:?}").contains("s3cret"));
    let cc = FgaCredentials::ClientCredentials {
        token_url: Url::parse("https://idp.example/token").unwrap(),
        client_id: "proxy".into(),
        client_secret: Secret::new("s3cret-secret".into()),
        audience: None,
    };
    let shown = format!("{:?}", connection("http://127.0.0.1:1", cc));
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("proxy"));
}

// ---------------------------------------------------------------------------------------
// against a recording fake server

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

type Responder = dyn Fn(&str, &Value) -> (u16, String) + Send + Sync;

struct Fake {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    async fn start(
        respond: impl Fn(&str, &Value) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Responder> = Arc::new(respond);
        let recorded = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let respond = Arc::clone(&respond);
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let respond = Arc::clone(&respond);
                            let recorded = Arc::clone(&recorded);
                            async move {
                                let path = req.uri().path().to_owned();
                                let authorization = req
                                    .headers()
                                    .get(http::header::AUTHORIZATION)
                                    .map(|v| v.to_str().unwrap().to_owned());
                                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                                let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                                });
                                let (status, answer) = respond(&path, &body);
                                recorded.lock().unwrap().push(Seen {
                                    path,
                                    authorization,
                                    body,
                                });
                                let mut res = http::Response::new(Full::new(Bytes::from(answer)));
                                *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, Infallible>(res)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Fake { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn connection(url: &str, credentials: FgaCredentials) -> FgaConnection {
    FgaConnection {
        api_url: Url::parse(url).unwrap(),
        store_id: "01HSTORE".into(),
        authorization_model_id: "01HMODEL".into(),
        credentials,
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::from_secs(60),
        breaker: BreakerSettings::default(),
        list_objects_deadline: DEFAULT_LIST_OBJECTS_DEADLINE,
        tls: None,
    }
}

/// Answers BatchCheck: objects whose id ends in an even digit are allowed.
fn batch_answer(body: &Value) -> String {
    let mut result = serde_json::Map::new();
    for c in body["checks"].as_array().unwrap() {
        let object = c["tuple_key"]["object"].as_str().unwrap();
        let even = object
            .chars()
            .last()
            .and_then(|d| d.to_digit(10))
            .is_some_and(|d| d % 2 == 0);
        result.insert(
            c["correlation_id"].as_str().unwrap().to_owned(),
            json!({"allowed": even}),
        );
    }
    json!({ "result": result }).to_string()
}

#[tokio::test]
async fn batch_of_120_goes_out_as_3_calls_with_the_model_id() {
    let fake = Fake::start(|path, body| {
        assert!(path.ends_with("/batch-check"), "{path}");
        assert!(body["checks"].as_array().unwrap().len() <= MAX_CHECKS_PER_BATCH);
        (200, batch_answer(body))
    })
    .await;
    let client = OpenFgaClient::new(
        reqwest::Client::new(),
        connection(&fake.url, FgaCredentials::None),
    )
    .unwrap();
    let objs: Vec<String> = (0..120).map(|i| format!("patient:p{i}")).collect();
    let answers = client
        .batch_check("user:alice", "can_view", &objs)
        .await
        .unwrap();
    assert_eq!(answers.len(), 120);
    for (i, o) in objs.iter().enumerate() {
        assert_eq!(answers[o], i % 2 == 0, "{o}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    let mut sizes: Vec<usize> = seen
        .iter()
        .map(|s| s.body["checks"].as_array().unwrap().len())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![20, 50, 50]);
    for s in &seen {
        assert_eq!(s.path, "/stores/01HSTORE/batch-check");
        assert_eq!(s.body["authorization_model_id"], "01HMODEL");
        assert_eq!(s.authorization, None);
    }
    // all cached now, duplicates answered once
    let mut again = objs.clone();
    again.extend(objs.iter().take(5).cloned());
    assert_eq!(
        client
            .batch_check("user:alice", "can_view", &again)
            .await
            .unwrap(),
        answers
    );
    assert_eq!(fake.seen().len(), 3);
}

#[tokio::test]
async fn api_token_is_sent_as_bearer() {
    let fake = Fake::start(|_, _| (200, json!({"allowed": true}).to_string())).await;
    let client = OpenFgaClient::new(
        reqwest::Client::new(),
        connection(
            &fake.url,
            FgaCredentials::ApiToken(Secret::new("psk-1".into())),
        ),
    )
    .unwrap();
    assert!(
        client
            .check("user:alice", "can_view", "patient:p1")
            .await
            .unwrap()
    );
    let seen = fake.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer psk-1"));
    assert_eq!(seen[0].path, "/stores/01HSTORE/check");
    assert_eq!(seen[0].body["authorization_model_id"], "01HMODEL");
}

#[tokio::test]
async fn client_credentials_token_is_fetched_once_and_sent() {
    let fake = Fake::start(|path, body| {
        if path == "/oauth/token" {
            let form = body.as_str().unwrap();
            assert!(form.contains("grant_type=client_credentials"), "{form}");
            assert!(form.contains("client_id=proxy"), "{form}");
            assert!(form.contains("client_secret=sec"), "{form}");
            assert!(form.contains("audience=fga"), "{form}");
            (
                200,
                json!({"access_token": "at-1", "expires_in": 3600, "token_type": "Bearer"})
                    .to_string(),
            )
        } else {
            (200, json!({"allowed": false}).to_string())
        }
    })
    .await;
    let creds = FgaCredentials::ClientCredentials {
        token_url: Url::parse(&format!("{}/oauth/token", fake.url)).unwrap(),
        client_id: "proxy".into(),
        client_secret: Secret::new("sec".into()),
        audience: Some("fga".into()),
    };
    let client = OpenFgaClient::new(reqwest::Client::new(), connection(&fake.url, creds)).unwrap();
    assert!(
        !client
            .check("user:a", "can_view", "patient:p1")
            .await
            .unwrap()
    );
    assert!(
        !client
            .check("user:a", "can_view", "patient:p2")
            .await
            .unwrap()
    );
    let seen = fake.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/oauth/token",
            "/stores/01HSTORE/check",
            "/stores/01HSTORE/check"
        ]
    );
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer at-1"));
    assert_eq!(seen[2].authorization.as_deref(), Some("Bearer at-1"));
}

#[tokio::test]
async fn api_url_path_prefix_is_kept() {
    let fake = Fake::start(|_, _| (200, json!({"allowed": true}).to_string())).await;
    let client = OpenFgaClient::new(
        reqwest::Client::new(),
        connection(&format!("{}/fga/", fake.url), FgaCredentials::None),
    )
    .unwrap();
    client
        .check("user:a", "can_view", "patient:p1")
        .await
        .unwrap();
    assert_eq!(fake.seen()[0].path, "/fga/stores/01HSTORE/check");
}

#[tokio::test]
async fn rejection_is_not_cached_and_does_not_trip_the_breaker() {
    let fake = Fake::start(|_, _| {
        (
            400,
            json!({"code": "validation_error", "message": "bad"}).to_string(),
        )
    })
    .await;
    let mut conn = connection(&fake.url, FgaCredentials::None);
    conn.breaker.failure_threshold = 1;
    let client = OpenFgaClient::new(reqwest::Client::new(), conn).unwrap();
    for _ in 0..3 {
        let e = client
            .check("user:a", "can_view", "patient:p1")
            .await
            .unwrap_err();
        assert_eq!(
            e,
            FgaError::Rejected {
                status: 400,
                code: "validation_error".into()
            }
        );
    }
    assert!(!client.breaker_open());
    assert_eq!(fake.seen().len(), 3);
}

#[tokio::test]
async fn streamed_list_is_parsed_deduplicated_and_bounded() {
    let fake = Fake::start(|path, body| {
        assert_eq!(path, "/stores/01HSTORE/streamed-list-objects");
        assert_eq!(body["authorization_model_id"], "01HMODEL");
        assert_eq!(body["type"], "patient");
        let mut s = String::new();
        for o in ["patient:p1", "patient:p2", "patient:p1", "patient:p3"] {
            s.push_str(&json!({"result": {"object": o}}).to_string());
            s.push('\n');
        }
        (200, s)
    })
    .await;
    let client = OpenFgaClient::new(
        reqwest::Client::new(),
        connection(&fake.url, FgaCredentials::None),
    )
    .unwrap();
    let got = client
        .list_objects_complete("user:a", "can_view", "patient", 3)
        .await
        .unwrap();
    assert_eq!(got, objects(&["patient:p1", "patient:p2", "patient:p3"]));
    let e = client
        .list_objects_complete("user:a", "can_view", "patient", 2)
        .await
        .unwrap_err();
    assert_eq!(e, FgaError::TooMany { max: 2 });
}

#[test]
fn ndjson_line_that_never_ends_is_incomplete() {
    let mut p = NdjsonObjects::default();
    let chunk = vec![b'x'; 16 * 1024];
    let mut failed = None;
    for i in 0..8 {
        if let Err(e) = p.push(&chunk) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, e) = failed.expect("an endless line must fail");
    assert!(
        i >= 3,
        "failed too early, after {} bytes",
        (i + 1) * chunk.len()
    );
    assert_eq!(e.reason(), "fga_incomplete");
}
