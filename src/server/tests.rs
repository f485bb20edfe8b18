#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::pipeline::fhir_json;

/// A body that sends `frames`, then either ends, fails or never goes on.
struct Scripted {
    frames: Vec<Bytes>,
    then: Then,
}

enum Then {
    End,
    Fail,
    Stall,
}

impl http_body::Body for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if !self.frames.is_empty() {
            let frame = self.frames.remove(0);
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        match self.then {
            Then::End => Poll::Ready(None),
            Then::Fail => Poll::Ready(Some(Err(std::io::Error::other("bad chunk")))),
            Then::Stall => Poll::Pending,
        }
    }
}

fn limits() -> Limits {
    Limits {
        max_body_bytes: 10,
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        max_headers: 100,
        ..Limits::default()
    }
}

fn body(frames: &[&'static [u8]], then: Then) -> Scripted {
    Scripted {
        frames: frames.iter().map(|f| Bytes::from_static(f)).collect(),
        then,
    }
}

#[tokio::test]
async fn each_body_failure_has_its_own_error() {
    let l = limits();
    let ok = read_body(body(&[b"abc", b"def"], Then::End), &l).await;
    assert_eq!(ok.unwrap(), Bytes::from_static(b"abcdef"));
    let large = read_body(body(&[b"abcdef", b"ghijk"], Then::End), &l).await;
    assert!(matches!(large, Err(TenantError::BodyTooLarge)), "{large:?}");
    let broken = read_body(body(&[b"abc"], Then::Fail), &l).await;
    assert!(
        matches!(broken, Err(TenantError::BodyMalformed)),
        "{broken:?}"
    );
    let slow = read_body(body(&[b"abc"], Then::Stall), &l).await;
    assert!(matches!(slow, Err(TenantError::BodyTimeout)), "{slow:?}");
    assert_eq!(
        TenantError::BodyTimeout.status(),
        StatusCode::REQUEST_TIMEOUT
    );
    assert_eq!(TenantError::BodyMalformed.status(), StatusCode::BAD_REQUEST);
}

/// `serve` on a loopback port in front of an app that answers `{}` to everything but a
/// request the server refused, which it answers with the error as the stack's
/// outermost layer does.
async fn start() -> (u16, tokio::sync::oneshot::Sender<()>) {
    let app: App = tower::util::BoxCloneSyncService::new(tower::service_fn(
        |req: Request<Bytes>| async move {
            let resp = match req.extensions().get::<BodyRefused>() {
                Some(BodyRefused(e)) => crate::stack::render_error(
                    &crate::error::ProxyError::Tenant(e.clone()),
                    None,
                    None,
                ),
                None => fhir_json(StatusCode::OK, Bytes::from_static(b"{}")),
            };
            Ok::<_, Infallible>(resp)
        },
    ));
    let (port, stop, _) = start_with(app, limits(), Duration::from_millis(100)).await;
    (port, stop)
}

/// `serve` on a loopback port in front of `app`; the handle ends when `serve` returns.
async fn start_with(
    app: App,
    limits: Limits,
    drain: Duration,
) -> (
    u16,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        app,
        limits,
        async {
            let _ = stopped.await;
        },
        drain,
    ));
    (port, stop, served)
}

/// An app that holds every request until the gate opens, and says when one arrives.
/// It answers with the client address the server put on the request.
fn gated_app(gate: Arc<Semaphore>, arrived: tokio::sync::mpsc::UnboundedSender<()>) -> App {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Bytes>| {
        let gate = Arc::clone(&gate);
        let arrived = arrived.clone();
        async move {
            let _ = arrived.send(());
            // Held for good: every request waits for a permit of its own.
            gate.acquire().await.unwrap().forget();
            let addr = req
                .extensions()
                .get::<ClientAddr>()
                .map(|a| a.0.to_string())
                .unwrap_or_default();
            Ok::<_, Infallible>(fhir_json(
                StatusCode::OK,
                Bytes::from(format!("{{\"addr\":\"{addr}\"}}")),
            ))
        }
    }))
}

/// Sends `request` on a new connection and reads the whole answer.
async fn exchange(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

const GET: &[u8] = b"GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// Reads until the peer closes (or resets) the connection; what arrived.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn connections_without_a_request_head_are_closed_after_the_header_timeout() {
    let (port, _stop) = start().await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
    let started = Instant::now();
    // Nothing at all, part of the HTTP/2 preface, the whole preface, part of an HTTP/1
    // request head.
    let mut held = Vec::new();
    for opening in [
        &b""[..],
        b"PRI * HT",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\n",
    ] {
        let mut s = connect().await.unwrap();
        s.write_all(opening).await.unwrap();
        held.push(s);
    }
    // Another client is served meanwhile.
    let mut other = connect().await.unwrap();
    other
        .write_all(b"GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut other, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            read_until_closed(s, Duration::from_secs(5)).await.is_some(),
            "connection {i} is still open"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408() {
    let (port, _stop) = start().await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"POST /t/Observation/_search HTTP/1.1\r\nhost: x\r\ncontent-length: 8\r\n\r\nab")
        .await
        .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    // Broken chunked encoding: 400, not "too large".
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        b"POST /t/Observation/_search HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("body_malformed"), "{text}");
}

#[tokio::test]
async fn a_request_head_over_the_configured_size_is_431() {
    let app: App =
        tower::util::BoxCloneSyncService::new(tower::service_fn(|_req: Request<Bytes>| async {
            Ok::<_, Infallible>(fhir_json(StatusCode::OK, Bytes::from_static(b"{}")))
        }));
    let small = Limits {
        max_header_bytes: 8192,
        max_headers: 10,
        ..limits()
    };
    let (port, _stop, _) = start_with(app, small, Duration::from_millis(100)).await;
    let with = |extra: String| {
        format!("GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n")
    };
    let fits = exchange(
        port,
        with(format!("x-a: {}\r\n", "a".repeat(4000))).as_bytes(),
    )
    .await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
    let large = exchange(
        port,
        with(format!("x-a: {}\r\n", "a".repeat(9000))).as_bytes(),
    )
    .await;
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    // `host` and `connection` and 8 more are the 10 allowed; one more is too many.
    let lines = |n: usize| -> String { (0..n).map(|i| format!("x-{i}: {i}\r\n")).collect() };
    let ten = exchange(port, with(lines(8)).as_bytes()).await;
    assert!(ten.starts_with("HTTP/1.1 200"), "{ten}");
    let eleven = exchange(port, with(lines(9)).as_bytes()).await;
    assert!(eleven.starts_with("HTTP/1.1 431"), "{eleven}");
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_shed_with_503_at_once() {
    let gate = Arc::new(Semaphore::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let two = Limits {
        max_concurrent_requests: 2,
        ..limits()
    };
    let (port, _stop, _) = start_with(
        gated_app(Arc::clone(&gate), arrived_tx),
        two,
        Duration::from_secs(5),
    )
    .await;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { exchange(port, GET).await }))
        .collect();
    for _ in 0..2 {
        arrived.recv().await.unwrap();
    }
    // Both permits are taken: the next requests are answered without reaching the app.
    for _ in 0..3 {
        let shed = exchange(port, GET).await;
        assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
        assert!(
            shed.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
            "{shed}"
        );
        assert!(shed.contains("\"overloaded\""), "{shed}");
        assert!(shed.contains("\"throttled\""), "{shed}");
    }
    assert!(
        arrived.try_recv().is_err(),
        "a shed request reached the app"
    );
    gate.add_permits(2);
    for h in held {
        let answer = h.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // The permits are back.
    gate.add_permits(1);
    let again = exchange(port, GET).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

#[tokio::test]
async fn the_client_address_is_the_forwarded_one_only_from_trusted_proxies() {
    let gate = Arc::new(Semaphore::new(100));
    let (arrived_tx, _arrived) = tokio::sync::mpsc::unbounded_channel();
    let request = b"GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 6.6.6.6, 192.0.2.1\r\nconnection: close\r\n\r\n";
    for (hops, want) in [(0, "127.0.0.1"), (1, "192.0.2.1")] {
        let l = Limits {
            trust_forwarded_for: hops,
            ..limits()
        };
        let app = gated_app(Arc::clone(&gate), arrived_tx.clone());
        let (port, _stop, _) = start_with(app, l, Duration::from_millis(100)).await;
        let answer = exchange(port, request).await;
        assert!(
            answer.contains(&format!("{{\"addr\":\"{want}\"}}")),
            "{hops}: {answer}"
        );
    }
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_lets_requests_in_flight_finish() {
    let gate = Arc::new(Semaphore::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let (port, stop, served) = start_with(
        gated_app(Arc::clone(&gate), arrived_tx),
        limits(),
        Duration::from_secs(30),
    )
    .await;
    let in_flight = tokio::spawn(async move { exchange(port, GET).await });
    arrived.recv().await.unwrap();
    stop.send(()).unwrap();
    // The listener is closed (not left to fill its backlog).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Accepted, or reset while the listener closes: not yet.
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "still accepting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(!served.is_finished(), "stopped with a request in flight");
    gate.add_permits(1);
    let answer = in_flight.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("serve returned once drained")
        .unwrap();
}

#[tokio::test]
async fn the_drain_is_bounded_by_the_grace_period() {
    let gate = Arc::new(Semaphore::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let (port, stop, served) = start_with(
        gated_app(gate, arrived_tx),
        limits(),
        Duration::from_millis(200),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(GET).await.unwrap();
    arrived.recv().await.unwrap();
    stop.send(()).unwrap();
    // The request never finishes; serve returns anyway once the grace period is over.
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("serve returned after the grace period")
        .unwrap();
}
