#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::audit::AuditRecord;

fn record(reason: &str) -> Arc<Finished> {
    Arc::new(Finished {
        record: AuditRecord {
            tenant: Some("t1".into()),
            patient: Some("p1".into()),
            interaction: Some("read"),
            resource_type: Some("Patient"),
            resource_id: Some("p1".into()),
            ..AuditRecord::default()
        },
        at: SystemTime::now(),
        latency_ms: 1.0,
        status: 200,
        decision: "allow",
        reason: reason.to_owned(),
    })
}

/// One HTTP request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn bundle(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A loopback server answering the n-th request with `replies[n]` (the last one from
/// then on); records every request.
async fn server(replies: Vec<(u16, String)>) -> (url::Url, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/fhir", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let (head, body) = loop {
                let k = s.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..k]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break (head, buf[end + 4..end + 4 + len].to_vec());
                }
            };
            log.lock().unwrap().push(Seen { head, body });
            let (status, body) = replies[n.min(replies.len() - 1)].clone();
            n += 1;
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (url.parse().unwrap(), seen)
}

fn batch_response(statuses: &[&str]) -> String {
    let entry: Vec<Value> = statuses
        .iter()
        .map(|s| serde_json::json!({"response": {"status": s}}))
        .collect();
    serde_json::json!({"resourceType": "Bundle", "type": "batch-response", "entry": entry})
        .to_string()
}

struct Running {
    tx: mpsc::Sender<Arc<Finished>>,
    stats: Arc<Stats>,
    draining: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Running {
    async fn send(&self, f: Arc<Finished>) {
        self.stats.pending.fetch_add(1, Ordering::AcqRel);
        self.tx.send(f).await.unwrap();
    }

    /// Waits until nothing is pending (bounded generously; a hang fails the test).
    async fn settled(&self) {
        for _ in 0..3000 {
            if self.stats.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the writer did not finish");
    }
}

fn config(
    endpoint: url::Url,
    auth: FhirAuth,
    batch: usize,
    flush: Duration,
    retries: u32,
) -> FhirAuditConfig {
    FhirAuditConfig {
        endpoint,
        auth,
        batch,
        queue: 100,
        overflow: Overflow::FailClosed,
        flush,
        timeout: Duration::from_secs(10),
        retries,
        observer: "proxy-test".into(),
    }
}

fn start(config: FhirAuditConfig) -> Running {
    let (tx, rx) = mpsc::channel(config.queue);
    let stats = Arc::new(Stats::default());
    let draining = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let writer = Writer {
        client: crate::fetch::control_client().build().unwrap(),
        batch: config.batch,
        config,
        stats: Arc::clone(&stats),
        draining: Arc::clone(&draining),
        wake: Arc::clone(&wake),
    };
    tokio::spawn(writer.run(rx));
    Running {
        tx,
        stats,
        draining,
        wake,
    }
}

#[tokio::test]
async fn records_go_out_in_batches_and_transient_failures_are_retried() {
    let (url, seen) = server(vec![
        (503, String::new()),
        (
            200,
            batch_response(&["201 Created", "201 Created", "400 Bad Request"]),
        ),
    ])
    .await;
    let w = start(config(
        url,
        FhirAuth::Bearer(Secret::new("audit-writer-token".into())),
        3,
        Duration::from_secs(600),
        2,
    ));
    // Three records fill the batch: it goes out without waiting for the flush.
    for i in 0..3 {
        w.send(record(&format!("r{i}"))).await;
    }
    w.settled().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one 503, then the retry: {seen:?}");
    for s in &seen {
        assert!(s.head.starts_with("POST /fhir HTTP/1.1"), "{}", s.head);
        let head = s.head.to_ascii_lowercase();
        assert!(
            head.contains("authorization: bearer audit-writer-token"),
            "{head}"
        );
        assert!(
            head.contains("content-type: application/fhir+json"),
            "{head}"
        );
        let b = s.bundle();
        assert_eq!(b["type"], "batch");
        let reasons: Vec<&str> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["outcomeDesc"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["r0", "r1", "r2"]);
    }
    // The repository refused one entry of the batch.
    assert_eq!(w.stats.sent.load(Ordering::Relaxed), 2);
    assert_eq!(w.stats.failed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn retries_are_bounded_and_client_errors_are_not_retried() {
    for (status, retries, expected_posts) in [(500, 2, 3), (502, 0, 1), (400, 3, 1), (401, 3, 1)] {
        let (url, seen) = server(vec![(status, String::new())]).await;
        let w = start(config(url, FhirAuth::None, 10, Duration::ZERO, retries));
        w.send(record("r")).await;
        w.send(record("s")).await;
        w.settled().await;
        let posts: usize = seen.lock().unwrap().len();
        let failed = w.stats.failed.load(Ordering::Relaxed);
        let sent = w.stats.sent.load(Ordering::Relaxed);
        assert_eq!(sent + failed, 2, "{status}");
        assert_eq!(sent, 0, "{status}");
        // Batches of one or two (the second record may have come after the first
        // batch left); each batch tried `1 + retries` times for 5xx, once otherwise.
        assert!(
            posts == expected_posts || posts == 2 * expected_posts,
            "{status}: {posts} posts"
        );
    }
}

#[tokio::test]
async fn a_drain_sends_a_batch_that_is_still_filling() {
    let (url, seen) = server(vec![(200, batch_response(&["201 Created"]))]).await;
    let w = start(config(
        url,
        FhirAuth::Basic {
            user: "auditor".into(),
            password: Secret::new("pw".into()),
        },
        100,
        Duration::from_secs(600),
        0,
    ));
    w.send(record("r0")).await;
    // Without the drain the batch would wait ten minutes to fill.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(seen.lock().unwrap().is_empty());
    w.draining.store(true, Ordering::Release);
    w.wake.notify_one();
    w.settled().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    // `auditor:pw`
    assert!(
        seen[0]
            .head
            .to_ascii_lowercase()
            .contains("authorization: basic yxvkaxrvcjpwdw=="),
        "{}",
        seen[0].head
    );
    assert_eq!(w.stats.sent.load(Ordering::Relaxed), 1);
}

#[test]
fn a_full_queue_drops_and_counts_or_fails_closed() {
    for overflow in [Overflow::Drop, Overflow::FailClosed] {
        let (tx, rx) = mpsc::channel(2);
        let sink: &'static FhirAuditSink = Box::leak(Box::new(FhirAuditSink {
            tx,
            overflow,
            stats: Arc::default(),
            draining: Arc::default(),
            wake: Arc::default(),
        }));
        let first = sink.reserve().unwrap().unwrap();
        first.send(record("a"));
        // A place taken and given back is free again.
        drop(sink.reserve().unwrap().unwrap());
        sink.reserve().unwrap().unwrap().send(record("b"));
        match overflow {
            Overflow::Drop => {
                assert!(sink.reserve().unwrap().is_none());
                assert!(sink.reserve().unwrap().is_none());
                assert_eq!(sink.stats.dropped.load(Ordering::Relaxed), 2);
            }
            Overflow::FailClosed => {
                assert!(sink.reserve().is_err());
                assert_eq!(sink.stats.dropped.load(Ordering::Relaxed), 0);
            }
        }
        assert_eq!(sink.stats.pending.load(Ordering::Relaxed), 2);
        drop(rx);
    }
}

#[test]
fn batch_responses_are_checked_entry_by_entry() {
    assert_eq!(
        refused_entries(batch_response(&["201 Created", "200 OK"]).as_bytes()),
        0
    );
    assert_eq!(
        refused_entries(batch_response(&["201", "422 Unprocessable Entity", "500"]).as_bytes()),
        2
    );
    // An entry without a status is not known to be stored.
    assert_eq!(refused_entries(br#"{"entry":[{"response":{}},{}]}"#), 2);
    // An answer that is no batch-response says nothing about entries.
    assert_eq!(refused_entries(b"not json"), 0);
}

#[test]
fn credentials_come_from_the_environment_and_are_checked() {
    let env = |name: &str| match name {
        "TOKEN" => Some("abc.def".to_owned()),
        "BAD_TOKEN" => Some("abc def".to_owned()),
        "BASIC" => Some("auditor:s3cr:et".to_owned()),
        "NO_COLON" => Some("auditor".to_owned()),
        _ => None,
    };
    assert!(matches!(
        FhirAuth::from_lookup(None, None, env),
        Ok(FhirAuth::None)
    ));
    match FhirAuth::from_lookup(Some("TOKEN"), None, env) {
        Ok(FhirAuth::Bearer(t)) => {
            assert_eq!(t.expose(), "abc.def");
            assert_eq!(format!("{t:?}"), "<redacted>");
        }
        other => panic!("{other:?}"),
    }
    match FhirAuth::from_lookup(None, Some("BASIC"), env) {
        Ok(FhirAuth::Basic { user, password }) => {
            assert_eq!(user, "auditor");
            assert_eq!(password.expose(), "s3cr:et");
        }
        other => panic!("{other:?}"),
    }
    for (token, basic) in [
        (Some("MISSING"), None),
        (Some("BAD_TOKEN"), None),
        (None, Some("NO_COLON")),
        (Some("TOKEN"), Some("BASIC")),
    ] {
        let e = FhirAuth::from_lookup(token, basic, env).unwrap_err();
        assert!(!e.contains("abc") && !e.contains("s3cr"), "{e}");
    }
}

#[test]
fn endpoints_are_plain_http_urls() {
    let check = |s: &str| check_endpoint(&s.parse().unwrap());
    assert!(check("https://audit.example/fhir").is_ok());
    assert!(check("http://127.0.0.1:8080/fhir/").is_ok());
    assert!(check("https://user:pw@audit.example/fhir").is_err());
    assert!(check("https://audit.example/fhir?x=1").is_err());
    assert!(check("https://audit.example/fhir#x").is_err());
    assert!(check("ftp://audit.example/fhir").is_err());
}
