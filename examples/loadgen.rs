//! A bounded HTTP load generator for `scripts/bench-e2e.sh` (loopback only).
//! Sends GETs to `URL` over `--concurrency C` keep-alive connections: first for
//! `--warmup-seconds W` unmeasured, then measured until `--requests N` requests or
//! `--max-seconds S` seconds, whichever comes first; prints one JSON line with
//! throughput, latency percentiles and status counts.
//!
//! With `--watch NAME=PID` (repeatable, Linux `/proc`) it also reports, for each watched
//! process over exactly the measured window: its CPU time, split into user and system
//! (`/proc/PID/stat`, counted in 10 ms ticks) and to the nanosecond as `run_ms` (the sum
//! of `/proc/PID/task/*/schedstat` over the threads alive at both ends); and its peak
//! resident set: the peak is reset when the window opens (`/proc/PID/clear_refs`, `5`)
//! and read as `VmHWM` when it closes (if the reset is refused, `peak_reset` is false and
//! `hwm_kib` is the lifetime peak). Its own CPU time is reported as `loadgen`, and the
//! whole machine's busy and total CPU time (`/proc/stat`) as `machine`, so a run can show
//! how much CPU other processes took.
//! `--sample-seconds T` adds `samples`: every T seconds, the watched processes' `VmRSS`.
//!
//! Usage: loadgen URL [--header 'Name: value']... [--requests N] [--concurrency C]
//!        [--max-seconds S] [--warmup-seconds W] [--watch NAME=PID]...
//!        [--sample-seconds T] [--clk-tck HZ]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// CPU ticks (user, system) of a process, from `/proc/PID/stat` (all its threads).
fn proc_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are 11 and 12 after the state field.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Nanoseconds on a CPU of all the process's current threads, from
/// `/proc/PID/task/*/schedstat` (exact, where `/proc/PID/stat` counts 10 ms ticks).
fn proc_run_ns(pid: &str) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`).
fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Busy and total ticks over all CPUs, from the `cpu` line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

struct Snapshot {
    ticks: BTreeMap<String, Option<(u64, u64)>>,
    run_ns: BTreeMap<String, Option<u64>>,
    machine: Option<(u64, u64)>,
}

fn snapshot(watch: &[(String, String)]) -> Snapshot {
    let mut ticks: BTreeMap<String, Option<(u64, u64)>> = watch
        .iter()
        .map(|(n, p)| (n.clone(), proc_ticks(p)))
        .collect();
    ticks.insert("loadgen".into(), proc_ticks("self"));
    let mut run_ns: BTreeMap<String, Option<u64>> = watch
        .iter()
        .map(|(n, p)| (n.clone(), proc_run_ns(p)))
        .collect();
    run_ns.insert("loadgen".into(), proc_run_ns("self"));
    Snapshot {
        ticks,
        run_ns,
        machine: machine_ticks(),
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url: Uri = args.next().expect("URL").parse().expect("URL");
    let host = url.host().unwrap_or_default();
    assert!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]",
        "loopback targets only"
    );
    let (mut headers, mut requests, mut concurrency) = (Vec::new(), 2000usize, 8usize);
    let (mut max_seconds, mut warmup_seconds, mut sample_seconds, mut clk_tck) =
        (60f64, 0f64, 0f64, 100f64);
    let mut watch: Vec<(String, String)> = Vec::new();
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
            "--warmup-seconds" => warmup_seconds = v.parse().expect("W"),
            "--sample-seconds" => sample_seconds = v.parse().expect("T"),
            "--clk-tck" => clk_tck = v.parse().expect("HZ"),
            "--watch" => {
                let (n, p) = v.split_once('=').expect("NAME=PID");
                assert!(p.bytes().all(|b| b.is_ascii_digit()), "PID: {p}");
                watch.push((n.to_owned(), p.to_owned()));
            }
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        concurrency > 0 && max_seconds > 0.0,
        "C and S must be positive"
    );
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let measure_from = Instant::now() + Duration::from_secs_f64(warmup_seconds);
    let deadline = measure_from + Duration::from_secs_f64(max_seconds);
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
            let mut statuses = BTreeMap::<u16, usize>::new();
            loop {
                let t = Instant::now();
                // Requests started in the warm-up are sent but neither counted nor timed.
                let measured = t >= measure_from;
                if t >= deadline || (measured && next.fetch_add(1, Ordering::Relaxed) >= requests) {
                    break;
                }
                let mut req = Request::get(url.clone());
                for (n, v) in &headers {
                    req = req.header(n, v);
                }
                let result = client.request(req.body(Empty::new()).unwrap()).await;
                if !measured {
                    if let Ok(resp) = result {
                        let _ = resp.into_body().collect().await;
                    }
                    continue;
                }
                match result {
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
    tokio::time::sleep_until(measure_from.into()).await;
    // The window opens: reset the watched processes' peaks, take the CPU counters.
    let peak_reset: BTreeMap<String, bool> = watch
        .iter()
        .map(|(n, p)| {
            let ok = std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok();
            (n.clone(), ok)
        })
        .collect();
    let started = Instant::now();
    let before = snapshot(&watch);
    let samples = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let sample = {
        let (watch, samples) = (watch.clone(), Arc::clone(&samples));
        move || {
            let rss: BTreeMap<&str, Option<u64>> = watch
                .iter()
                .map(|(n, p)| (n.as_str(), proc_status_kib(p, "VmRSS")))
                .collect();
            let t = started.elapsed().as_secs_f64();
            samples
                .lock()
                .unwrap()
                .push(json!({"t": t, "rss_kib": rss}));
        }
    };
    let sampler = (sample_seconds > 0.0).then(|| {
        let sample = sample.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(sample_seconds));
            loop {
                tick.tick().await;
                sample();
            }
        })
    });
    let (mut all, mut errors, mut statuses) = (Vec::new(), 0, BTreeMap::<u16, usize>::new());
    for w in workers {
        let (l, e, s) = w.await.unwrap();
        all.extend(l);
        errors += e;
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = snapshot(&watch);
    if let Some(sampler) = sampler {
        sampler.abort();
        sample();
    }
    let samples: Vec<Value> = std::mem::take(&mut samples.lock().unwrap());
    let ms = |t: u64| t as f64 * 1000.0 / clk_tck;
    let mut procs = serde_json::Map::new();
    for (name, b) in &before.ticks {
        let (Some(b), Some(a)) = (b, after.ticks.get(name).copied().flatten()) else {
            procs.insert(name.clone(), Value::Null);
            continue;
        };
        let pid = watch
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_str());
        let mut p = json!({
            "user_ms": ms(a.0.saturating_sub(b.0)), "sys_ms": ms(a.1.saturating_sub(b.1)),
        });
        // Threads that ended inside the window are missing from the exact figure.
        if let (Some(Some(b)), Some(Some(a))) = (before.run_ns.get(name), after.run_ns.get(name)) {
            p["run_ms"] = json!(a.saturating_sub(*b) as f64 / 1e6);
        }
        if let Some(pid) = pid {
            p["hwm_kib"] = json!(proc_status_kib(pid, "VmHWM"));
            p["rss_kib"] = json!(proc_status_kib(pid, "VmRSS"));
            p["peak_reset"] = json!(peak_reset.get(name).copied().unwrap_or(false));
        }
        procs.insert(name.clone(), p);
    }
    let machine = match (before.machine, after.machine) {
        (Some(b), Some(a)) => json!({
            "busy_ms": ms(a.0.saturating_sub(b.0)), "total_ms": ms(a.1.saturating_sub(b.1)),
        }),
        _ => Value::Null,
    };
    all.sort();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i].as_secs_f64() * 1000.0
    };
    let mean = if all.is_empty() {
        0.0
    } else {
        all.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / all.len() as f64
    };
    println!(
        "{}",
        json!({
            "requests": all.len(), "errors": errors, "statuses": statuses,
            "seconds": elapsed, "rps": all.len() as f64 / elapsed, "concurrency": concurrency,
            "mean_ms": mean, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": pct(1.0), "processes": procs, "machine": machine,
            "samples": (sample_seconds > 0.0).then_some(samples),
        })
    );
}
