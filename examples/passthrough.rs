//! The baseline for `scripts/bench-e2e.sh`: a plain pass-through reverse proxy with the
//! same server and client stack as smart-fhir-proxy (hyper 1, hyper-util pooled client)
//! and no authorization at all. Requests to `/{anything}/rest` go to `UPSTREAM/rest`.
//!
//! Usage: passthrough LISTEN_ADDR UPSTREAM_BASE   (e.g. 127.0.0.1:9001 http://127.0.0.1:9000/fhir)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("LISTEN_ADDR");
    let upstream: String = args
        .next()
        .expect("UPSTREAM_BASE")
        .trim_end_matches('/')
        .to_owned();
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(forward(&client, &upstream, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // Drop the first path segment (the tenant), keep the rest.
    let rest = path_and_query
        .strip_prefix('/')
        .and_then(|p| p.find(['/', '?']).map(|i| &p[i..]))
        .unwrap_or("");
    let uri: Uri = format!("{upstream}{rest}").parse().expect("uri");
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONNECTION {
            out = out.header(name, value);
        }
    }
    match client
        .request(out.body(Full::new(body)).expect("request"))
        .await
    {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, Full::new(body))
        }
        Err(_) => Response::builder()
            .status(502)
            .body(Full::new(Bytes::new()))
            .expect("response"),
    }
}
