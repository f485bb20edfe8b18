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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        app,
        limits(),
        async {
            let _ = stopped.await;
        },
        Duration::from_millis(100),
    ));
    (port, stop)
}

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
