//! Operations: the admin listener (`/metrics` scraped by a real Prometheus and checked
//! by `promtool`, `/healthz`, `/readyz`, also while draining), W3C `traceparent` and
//! `X-Request-Id` on the way to the real upstream FHIR server and the real OpenFGA
//! server, and span export over OTLP/HTTP (and a collector that is down).
//!
//! What the upstream and OpenFGA receive is read by a capturing relay in front of the
//! real servers (it records each request head and the server's answer head, and passes
//! both through unchanged but for `connection: close`): HAPI's access log and
//! OpenFGA's log name no request headers. No OTLP collector is installable here, so the
//! spans go to a stand-in receiver that records what is posted to `/v1/traces`.
//! Prometheus (`prometheus`, `promtool`) comes from Debian's package, which
//! `scripts/install.sh` installs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Proxy, tenant, tenants};
use crate::support;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

fn traceparent(trace: &str, parent: &str, flags: &str) -> String {
    format!("00-{trace}-{parent}-{flags}")
}

/// A proxy with its admin listener on a free port (and more environment).
fn start(build: impl FnOnce(u16) -> Value, env: &[(&str, &str)]) -> (Proxy, u16) {
    let admin = support::free_port();
    let listen = format!("127.0.0.1:{admin}");
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("SFP_ADMIN_LISTEN", &listen));
    (Proxy::start_with_env(build, &env), admin)
}

async fn admin_get(port: u16, path: &str) -> (u16, String, String) {
    let resp = support::http_client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, ct, resp.text().await.unwrap())
}

async fn get(url: &str, token: Option<&str>, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = support::http_client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Polls `f` until it returns `Some`, for at most a minute (a deadline to fail by, not
/// a timing requirement).
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus

fn require_prometheus() {
    for tool in ["prometheus", "promtool"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is not installed: run scripts/install.sh (it installs Debian's `prometheus` package)"
        );
    }
}

/// A real Prometheus server scraping one target every second, on a free port with a
/// data directory of its own; stopped when dropped (and by the watchdog when the test
/// process ends).
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        use std::os::unix::process::CommandExt;
        require_prometheus();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: smart-fhir-proxy\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = support::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("bash")
            .arg(support::repo_root().join("scripts/lib/watchdog.sh"))
            .arg(std::process::id().to_string())
            .arg("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                let _ =
                    s.write_all(b"GET /-/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                buf.starts_with("HTTP/1.1 200")
            });
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not start; log:\n{}",
                std::fs::read_to_string(p._dir.path().join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instant vector of `query`: each series' labels and value.
    async fn query(&self, query: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut url =
            url::Url::parse(&format!("http://127.0.0.1:{}/api/v1/query", self.port)).unwrap();
        url.query_pairs_mut().append_pair("query", query);
        let resp = support::http_client().get(url).send().await.unwrap();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_request_metrics() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let (proxy, admin) = start(
        |port| tenants(vec![("obs", tenant("obs", port, fhir.base_url(), issuer))]),
        &[],
    );
    let base = proxy.base("obs");
    let p1 = support::token("patient-p1", "patient/Patient.rs", &base).await;
    // Two allowed reads, a hidden record, no token, an unknown tenant.
    for _ in 0..2 {
        let r = get(&format!("{base}/Patient/p1"), Some(&p1), &[]).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        get(&format!("{base}/Patient/p2"), Some(&p1), &[])
            .await
            .status(),
        404
    );
    assert_eq!(
        get(&format!("{base}/Patient/p1"), None, &[]).await.status(),
        401
    );
    let unknown = format!("http://127.0.0.1:{}/no-such-tenant/Patient/p1", proxy.port);
    assert_eq!(get(&unknown, None, &[]).await.status(), 404);

    // What the requests were, by the audit records: the series must say the same.
    let mut expected: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for r in proxy.audit_records() {
        let key = (
            r["tenant.id"].as_str().unwrap().to_owned(),
            r["fhir.interaction"].as_str().unwrap().to_owned(),
            r["http.status"].to_string(),
            r["authz.reason"].as_str().unwrap().to_owned(),
        );
        *expected.entry(key).or_default() += 1.0;
    }
    assert_eq!(expected.values().sum::<f64>(), 5.0, "{expected:?}");
    for key in [
        ("obs", "read", "401", "token_missing"),
        ("obs", "read", "404", "record_denied"),
        ("-", "-", "404", "tenant_unknown"),
    ] {
        let key = (key.0.into(), key.1.into(), key.2.into(), key.3.into());
        assert_eq!(expected.get(&key), Some(&1.0), "{key:?} in {expected:?}");
    }
    assert!(
        expected
            .iter()
            .any(|((t, i, s, _), n)| t == "obs" && i == "read" && s == "200" && *n == 2.0),
        "{expected:?}"
    );

    // The exposition passes Prometheus's own checker.
    let (status, content_type, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    require_prometheus();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing lost by the audit sink.
    assert!(
        text.lines()
            .any(|l| l == "sfp_audit_records_dropped_total 0"),
        "{text}"
    );

    // A real scrape, read back through Prometheus's query API.
    let prometheus = Prometheus::start(&format!("127.0.0.1:{admin}"));
    let series = eventually("the request series in prometheus", async || {
        let got: BTreeMap<(String, String, String, String), f64> = prometheus
            .query("sfp_requests_total")
            .await
            .into_iter()
            .map(|(l, v)| {
                assert_eq!(l["job"], "smart-fhir-proxy");
                (
                    (
                        l["tenant"].clone(),
                        l["interaction"].clone(),
                        l["status"].clone(),
                        l["reason"].clone(),
                    ),
                    v,
                )
            })
            .collect();
        (got == expected).then_some(got)
    })
    .await;
    assert_eq!(series.len(), 4, "{series:?}");

    // Every stage of the allowed reads was timed, for this tenant.
    let stages: BTreeSet<String> = prometheus
        .query(r#"sfp_stage_duration_seconds_count{tenant="obs"}"#)
        .await
        .into_iter()
        .map(|(l, _)| l["stage"].clone())
        .collect();
    let all = ["authz", "check", "rewrite", "scope", "token", "upstream"];
    assert_eq!(
        stages,
        all.iter().map(|s| s.to_string()).collect(),
        "{stages:?}"
    );
    let requests = prometheus
        .query(r#"sfp_request_duration_seconds_count{tenant="obs"}"#)
        .await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].1, 4.0);
    // The key set was fetched once, then found in the cache.
    let fetches = prometheus
        .query(r#"sfp_jwks_fetches_total{tenant="obs",result="ok"}"#)
        .await;
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!(
        prometheus
            .query(r#"sfp_build_info"#)
            .await
            .first()
            .map(|(l, v)| (l["version"].clone(), *v)),
        Some((env!("CARGO_PKG_VERSION").to_owned(), 1.0))
    );
}

#[tokio::test]
async fn readiness_names_the_tenant_whose_upstream_is_down() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}/fhir", support::free_port());
    let (proxy, admin) = start(
        |port| {
            tenants(vec![
                ("up", tenant("up", port, fhir.base_url(), issuer)),
                ("down", tenant("down", port, &dead, issuer)),
            ])
        },
        &[],
    );
    let (status, _, body) = admin_get(admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let (status, content_type, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(content_type, "application/json");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "not_ready", "{v}");
    assert_eq!(
        v["tenants"]["down"],
        json!({"ready": false, "jwks": "ok", "upstream": "upstream_unreachable"}),
        "{v}"
    );
    assert_eq!(
        v["tenants"]["up"],
        json!({"ready": true, "jwks": "ok", "upstream": "ok"}),
        "{v}"
    );

    // Without the broken tenant (a reload), the proxy is ready.
    let mut file: Value =
        serde_json::from_str(&std::fs::read_to_string(proxy.tenants_path()).unwrap()).unwrap();
    file["tenants"].as_object_mut().unwrap().remove("down");
    crate::harness::write_json(&proxy.tenants_path(), &file);
    let v = eventually("readiness after the reload", async || {
        let (status, _, body) = admin_get(admin, "/readyz").await;
        (status == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
    })
    .await;
    assert_eq!(v["status"], "ready");
    assert_eq!(
        v["tenants"],
        json!({"up": {"ready": true, "jwks": "ok", "upstream": "ok"}})
    );
    let (_, _, metrics) = admin_get(admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"sfp_config_reloads_total{result="ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "sfp_tenants 1"), "{metrics}");

    let (status, _, _) = admin_get(admin, "/nothing-here").await;
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------
// a capturing relay in front of a real server

/// One request through the relay: its head as sent, and the server's answer head.
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub(crate) request: String,
    /// The request's body (`content-length` framed), as text.
    pub(crate) request_body: String,
    pub(crate) response: String,
}

impl Exchange {
    pub(crate) fn line(&self) -> &str {
        self.request.lines().next().unwrap_or_default()
    }

    fn header(head: &str, name: &str) -> Vec<String> {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    pub(crate) fn request_header(&self, name: &str) -> Vec<String> {
        Self::header(&self.request, name)
    }

    fn response_header(&self, name: &str) -> Vec<String> {
        Self::header(&self.response, name)
    }
}

/// Passes each HTTP/1.1 request on to `target` (one request per connection) and
/// records it. Stops when dropped. (Also used by `writes`.)
pub(crate) struct Relay {
    pub(crate) port: u16,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub(crate) fn start(target: &str) -> Relay {
        let target = target.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (Arc::clone(&exchanges), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (log, target) = (Arc::clone(&log), target.clone());
                        std::thread::spawn(move || relay_one(client, &target, &log));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay {
            port,
            exchanges,
            stop,
        }
    }

    pub(crate) fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one message head and its `content-length` body.
fn read_message(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = Exchange::header(&head, "content-length")
                .first()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = buf[end + 4..].to_vec();
            while body.len() < len {
                let n = s.read(&mut chunk).ok().filter(|n| *n > 0)?;
                body.extend_from_slice(&chunk[..n]);
            }
            return Some((head, body));
        }
        let n = s.read(&mut chunk).ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The head with any `connection` header replaced by `connection: close`.
fn closing(head: &str) -> String {
    let mut out: Vec<&str> = head
        .lines()
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        })
        .collect();
    out.push("connection: close");
    out.join("\r\n") + "\r\n\r\n"
}

fn relay_one(mut client: TcpStream, target: &str, log: &Mutex<Vec<Exchange>>) {
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let Some((head, body)) = read_message(&mut client) else {
        return;
    };
    let mut server = TcpStream::connect(target).unwrap();
    server.write_all(closing(&head).as_bytes()).unwrap();
    server.write_all(&body).unwrap();
    let mut answer = Vec::new();
    let _ = server.read_to_end(&mut answer);
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(answer.len());
    let response = String::from_utf8_lossy(&answer[..end]).into_owned();
    log.lock().unwrap().push(Exchange {
        request: head,
        request_body: String::from_utf8_lossy(&body).into_owned(),
        response: response.clone(),
    });
    let rest = answer.get(end + 4..).unwrap_or_default();
    let _ = client.write_all(closing(&response).as_bytes());
    let _ = client.write_all(rest);
}

pub(crate) fn host_port(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
}

/// The trace id and the parent span id of a `traceparent`, checked for form.
fn parts(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    assert_eq!(p[0], "00", "{traceparent}");
    assert!(
        p[1].len() == 32
            && p[1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(
        p[2].len() == 16
            && p[2]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(
        p[1] != "0".repeat(32) && p[2] != "0".repeat(16),
        "{traceparent}"
    );
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

#[tokio::test]
async fn the_trace_and_the_request_id_reach_the_real_upstream() {
    let fhir = support::fhir_server();
    let relay = Relay::start(&host_port(fhir.base_url()));
    let upstream = format!("http://127.0.0.1:{}/fhir", relay.port);
    let issuer = support::issuer();
    let (proxy, _) = start(
        |port| tenants(vec![("traced", tenant("traced", port, &upstream, issuer))]),
        &[],
    );
    let base = proxy.base("traced");
    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;

    // A caller's trace and request id: continued and kept.
    let r = get(
        &format!("{base}/Patient/p1"),
        Some(&token),
        &[
            ("traceparent", &traceparent(TRACE, PARENT, "01")),
            ("x-request-id", "obs-test-1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "obs-test-1");
    let read: Vec<Exchange> = relay
        .exchanges()
        .into_iter()
        .filter(|e| e.line().starts_with("GET /fhir/Patient/p1 "))
        .collect();
    assert_eq!(read.len(), 1, "{read:?}");
    let sent = read[0].request_header("traceparent");
    assert_eq!(sent.len(), 1, "{read:?}");
    let (trace, parent, flags) = parts(&sent[0]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, PARENT, "the proxy's own span is the parent");
    assert_eq!(read[0].request_header("x-request-id"), ["obs-test-1"]);
    // HAPI read the request id: it answers with it (HAPI keeps at most 16 characters).
    let echoed = read[0].response_header("x-request-id");
    assert_eq!(echoed.len(), 1, "{}", read[0].response);
    assert!(
        !echoed[0].is_empty() && "obs-test-1".starts_with(echoed[0].as_str()),
        "{echoed:?}"
    );
    assert!(
        read[0].response.starts_with("HTTP/1.1 200"),
        "{}",
        read[0].response
    );
    let audit = proxy.audit_records();
    let record = audit
        .iter()
        .find(|r| r["request.id"] == "obs-test-1")
        .unwrap_or_else(|| panic!("no audit record with the request id: {audit:?}"));
    assert_eq!(record["http.status"], 200);

    // A malformed traceparent and an insane request id: a new trace, a new id.
    for (tp, rid) in [
        (
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "has space",
        ),
        ("00-zzz", "quote\"d"),
    ] {
        let before = relay.exchanges().len();
        let r = get(
            &format!("{base}/Patient/p1"),
            Some(&token),
            &[("traceparent", tp), ("x-request-id", rid)],
        )
        .await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, rid);
        assert_eq!(id.len(), 36, "{id}");
        let ex = relay.exchanges();
        let new: Vec<&Exchange> = ex[before..]
            .iter()
            .filter(|e| e.line().starts_with("GET /fhir/Patient/p1 "))
            .collect();
        assert_eq!(new.len(), 1);
        let (trace, _, flags) = parts(&new[0].request_header("traceparent")[0]);
        assert!(
            !tp.contains(&trace) && trace != TRACE.to_lowercase(),
            "{trace}"
        );
        assert_eq!(flags, "01");
        assert_eq!(new[0].request_header("x-request-id"), [id]);
    }

    // Every answer carries a request id, the proxy's own refusals too.
    let r = get(&format!("{base}/Patient/p1"), None, &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"].len(), 36);
    // Refused by the server before the stack, from the declared length (a raw request,
    // so no client races the early answer with its upload).
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    write!(
        s,
        "POST /traced/Patient/_search HTTP/1.1\r\nhost: x\r\nx-request-id: too-large-1\r\n\
         content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        2 * 1024 * 1024
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .lines()
            .any(|l| l.eq_ignore_ascii_case("x-request-id: too-large-1")),
        "{answer}"
    );
}

/// The store of [`openfga_calls_carry_the_trace`]: pr1's care team sees p1.
fn fga_store() -> support::FgaStore {
    let model: Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("fga-model/model.json")).unwrap(),
    )
    .unwrap();
    let tuples = [
        json!({"user": "group:team-a#member", "relation": "viewer", "object": "organization:ward-a"}),
        json!({"user": "user:practitioner-pr1", "relation": "member", "object": "group:team-a"}),
        json!({"user": "organization:ward-a", "relation": "assigned_organization", "object": "patient:p1"}),
    ];
    support::openfga().create_store("obs-trace", &model, &tuples)
}

#[tokio::test]
async fn openfga_calls_carry_the_trace() {
    let store = fga_store();
    let relay = Relay::start(&host_port(&store.api_url));
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let api_url = format!("http://127.0.0.1:{}", relay.port);
    let (proxy, admin) = start(
        |port| {
            let mut t = tenant("fga", port, fhir.base_url(), issuer);
            t["authorization"] = json!({"mode": "openfga", "openfga": {
                "api_url": api_url,
                "store_id": store.store_id,
                "authorization_model_id": store.model_id,
                "timeout_ms": 5000,
            }});
            tenants(vec![("fga", t)])
        },
        &[],
    );
    let base = proxy.base("fga");
    let token = support::token("practitioner-pr1", "user/Patient.rs", &base).await;
    let r = get(
        &format!("{base}/Patient/p1"),
        Some(&token),
        &[("traceparent", &traceparent(TRACE, PARENT, "01"))],
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let calls: Vec<Exchange> = relay
        .exchanges()
        .into_iter()
        .filter(|e| e.line().starts_with("POST /stores/"))
        .collect();
    assert!(!calls.is_empty(), "no OpenFGA call went through the relay");
    for call in &calls {
        assert!(call.response.starts_with("HTTP/1.1 200"), "{call:?}");
        let tp = call.request_header("traceparent");
        assert_eq!(tp.len(), 1, "{call:?}");
        let (trace, parent, _) = parts(&tp[0]);
        assert_eq!(trace, TRACE, "{call:?}");
        assert_ne!(parent, PARENT);
    }
    assert!(
        calls.iter().any(|c| c.line().contains("/batch-check ")),
        "{calls:?}"
    );
    // Counted: the calls, and a closed breaker.
    let (_, _, metrics) = admin_get(admin, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l
            == format!(
                r#"sfp_openfga_requests_total{{tenant="fga",endpoint="batch_check"}} {}"#,
                calls
                    .iter()
                    .filter(|c| c.line().contains("/batch-check "))
                    .count()
            )),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"sfp_openfga_breaker_open{tenant="fga"} 0"#),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// OTLP

/// Records the JSON bodies posted to `/v1/traces` (and answers `200 {}`). Stops when
/// dropped.
struct OtlpReceiver {
    port: u16,
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    stop: Arc<AtomicBool>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (Arc::clone(&posts), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let Some((head, body)) = read_message(&mut s) else {
                    continue;
                };
                let line = head.lines().next().unwrap_or_default().to_owned();
                let content_type = Exchange::header(&head, "content-type");
                let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                log.lock()
                    .unwrap()
                    .push((format!("{line} {}", content_type.join(",")), json));
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
        OtlpReceiver { port, posts, stop }
    }

    /// Every span posted so far, with the resource it came with.
    fn spans(&self) -> Vec<(Value, Value)> {
        let mut out = Vec::new();
        for (_, body) in self.posts.lock().unwrap().iter() {
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        out.push((rs["resource"].clone(), span.clone()));
                    }
                }
            }
        }
        out
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn attribute(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

#[tokio::test]
async fn spans_of_every_stage_are_exported_over_otlp() {
    let receiver = OtlpReceiver::start();
    let fhir = support::fhir_server();
    let relay = Relay::start(&host_port(fhir.base_url()));
    let upstream = format!("http://127.0.0.1:{}/fhir", relay.port);
    let issuer = support::issuer();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let (proxy, _) = start(
        |port| tenants(vec![("otlp", tenant("otlp", port, &upstream, issuer))]),
        &[
            ("SFP_OTLP_ENDPOINT", &endpoint),
            ("SFP_OTLP_SERVICE_NAME", "proxy-under-test"),
        ],
    );
    let base = proxy.base("otlp");
    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;
    // A caller that does not sample: nothing of it is exported.
    const UNSAMPLED: &str = "11111111111111111111111111111111";
    let r = get(
        &format!("{base}/Patient/p1"),
        Some(&token),
        &[("traceparent", &traceparent(UNSAMPLED, PARENT, "00"))],
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get(
        &format!("{base}/Patient/p1"),
        Some(&token),
        &[
            ("traceparent", &traceparent(TRACE, PARENT, "01")),
            ("x-request-id", "otlp-1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);

    let names = [
        "request",
        "tenant",
        "discovery",
        "token",
        "scope",
        "authz",
        "write",
        "rewrite",
        "upstream",
        "check",
    ];
    let spans = eventually("the request's spans at the receiver", async || {
        let spans: Vec<(Value, Value)> = receiver
            .spans()
            .into_iter()
            .filter(|(_, s)| s["traceId"] == TRACE)
            .collect();
        (spans.len() >= names.len()).then_some(spans)
    })
    .await;
    assert!(
        receiver
            .spans()
            .iter()
            .all(|(_, s)| s["traceId"] != UNSAMPLED),
        "an unsampled trace was exported"
    );
    let posts = receiver.posts.lock().unwrap().clone();
    assert!(
        posts
            .iter()
            .all(|(line, _)| line.starts_with("POST /v1/traces ")
                && line.ends_with("application/json")),
        "{posts:?}"
    );
    let by_name: BTreeMap<String, Value> = spans
        .iter()
        .map(|(_, s)| (s["name"].as_str().unwrap().to_owned(), s.clone()))
        .collect();
    assert_eq!(
        by_name.keys().cloned().collect::<BTreeSet<_>>(),
        names.iter().map(|n| n.to_string()).collect(),
        "{spans:?}"
    );
    assert_eq!(spans.len(), names.len(), "one span per stage: {spans:?}");
    let (resource, _) = &spans[0];
    assert!(
        resource["attributes"].as_array().unwrap().contains(
            &json!({"key": "service.name", "value": {"stringValue": "proxy-under-test"}})
        ),
        "{resource}"
    );
    let request = &by_name["request"];
    assert_eq!(request["parentSpanId"], PARENT);
    assert_eq!(request["kind"], 2);
    assert_eq!(
        attribute(request, "tenant.id"),
        Some(json!({"stringValue": "otlp"}))
    );
    assert_eq!(
        attribute(request, "request.id"),
        Some(json!({"stringValue": "otlp-1"}))
    );
    assert_eq!(
        attribute(request, "http.response.status_code"),
        Some(json!({"intValue": "200"}))
    );
    for name in &names[1..] {
        let span = &by_name[*name];
        assert_eq!(span["parentSpanId"], request["spanId"], "{name}: {span}");
        let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start <= end, "{span}");
    }
    assert_eq!(by_name["upstream"]["kind"], 3);
    // No path, query, resource id or token in what is exported.
    let exported = serde_json::to_string(&spans).unwrap();
    for secret in ["Patient/p1", "/Patient", "p1\"", token.as_str()] {
        assert!(!exported.contains(secret), "{secret} in {exported}");
    }
    // The upstream was told the `upstream` span is its parent.
    let sent: Vec<String> = relay
        .exchanges()
        .iter()
        .filter(|e| e.request_header("x-request-id") == ["otlp-1"])
        .flat_map(|e| e.request_header("traceparent"))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (trace, parent, _) = parts(&sent[0]);
    assert_eq!(trace, TRACE);
    assert_eq!(by_name["upstream"]["spanId"], parent);
}

#[tokio::test]
async fn a_collector_that_is_down_costs_the_spans_and_nothing_else() {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let endpoint = format!("http://127.0.0.1:{}", support::free_port());
    let (proxy, admin) = start(
        |port| {
            tenants(vec![(
                "nocollector",
                tenant("nocollector", port, fhir.base_url(), issuer),
            )])
        },
        &[("SFP_OTLP_ENDPOINT", &endpoint)],
    );
    let base = proxy.base("nocollector");
    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;
    for _ in 0..3 {
        let r = get(&format!("{base}/Patient/p1"), Some(&token), &[]).await;
        assert_eq!(r.status(), 200);
    }
    let failed = eventually("the failed export in the metrics", async || {
        let (_, _, metrics) = admin_get(admin, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"sfp_otlp_spans_total{result="failed"} "#))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n > 0)
    })
    .await;
    assert!(failed >= 1);
    assert!(
        proxy.log().contains("span export failed"),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn readiness_says_draining_once_shutdown_begins() {
    use crate::harness::{Fault, FaultServer, Gate, Reply};
    let gate = Gate::default();
    let upstream = FaultServer::start(Fault::Gated(
        gate.clone(),
        Reply::fhir(r#"{"resourceType":"Patient","id":"p1"}"#),
    ));
    let issuer = support::issuer();
    let (mut proxy, admin) = start(
        |port| tenants(vec![("t", tenant("t", port, &upstream.base(), issuer))]),
        &[("SFP_SHUTDOWN_GRACE_SECONDS", "60")],
    );
    let token = support::token("backend", "system/*.rs", &proxy.base("t")).await;
    let url = format!("{}/Patient/p1", proxy.base("t"));
    let in_flight = tokio::spawn(async move { get(&url, Some(&token), &[]).await.status() });
    eventually("the request at the upstream", async || {
        (!upstream.requests.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    proxy.signal("TERM");
    // While the request drains, the admin listener still answers, and says so.
    let v = eventually("readiness to say draining", async || {
        let (status, _, body) = admin_get(admin, "/readyz").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        (status == 503 && v["status"] == "draining").then_some(v)
    })
    .await;
    assert_eq!(v["status"], "draining");
    let (status, _, _) = admin_get(admin, "/healthz").await;
    assert_eq!(status, 200);
    gate.open();
    assert_eq!(in_flight.await.unwrap(), 200);
    let exit = proxy
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the proxy did not exit; log:\n{}", proxy.log()));
    assert!(exit.success(), "{exit:?}");
}
