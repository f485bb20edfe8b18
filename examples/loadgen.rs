//! A bounded HTTP load generator for `scripts/bench-e2e.sh` (loopback only).
//! Sends `--requests N` GETs to `URL` with `--concurrency C` keep-alive connections,
//! stopping early after `--max-seconds S`; prints one JSON line with throughput and
//! latency percentiles.
//!
//! Usage: loadgen URL [--header 'Name: value']... [--requests N] [--concurrency C] [--max-seconds S]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url: Uri = args.next().expect("URL").parse().expect("URL");
    let host = url.host().unwrap_or_default();
    assert!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]",
        "loopback targets only"
    );
    let (mut headers, mut requests, mut concurrency, mut max_seconds) =
        (Vec::new(), 2000usize, 8usize, 60u64);
    while let Some(a) = args.next() {
        let v = args.next().expect("value");
        match a.as_str() {
            "--header" => {
                let (n, v) = v.split_once(':').expect("Name: value");
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
            "--requests" => requests = v.parse().expect("N"),
            "--concurrency" => concurrency = v.parse().expect("C"),
            "--max-seconds" => max_seconds = v.parse().expect("S"),
            other => panic!("unknown option {other}"),
        }
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, headers, next) = (
            client.clone(),
            url.clone(),
            headers.clone(),
            Arc::clone(&next),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests && Instant::now() < deadline {
                let mut req = Request::get(url.clone());
                for (n, v) in &headers {
                    req = req.header(n, v);
                }
                let t = Instant::now();
                match client.request(req.body(Empty::new()).unwrap()).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let ok = resp.into_body().collect().await.is_ok();
                        latencies.push(t.elapsed());
                        *statuses.entry(status).or_default() += 1;
                        if !ok {
                            errors += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors, statuses)
        }));
    }
    let (mut all, mut errors, mut statuses) = (
        Vec::new(),
        0,
        std::collections::BTreeMap::<u16, usize>::new(),
    );
    for w in workers {
        let (l, e, s) = w.await.unwrap();
        all.extend(l);
        errors += e;
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i].as_secs_f64() * 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(), "errors": errors, "statuses": statuses,
            "seconds": elapsed, "rps": all.len() as f64 / elapsed,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
        })
    );
}
