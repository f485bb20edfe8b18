//! CORS end to end: preflights and answers over plain HTTP, and a real browser
//! (headless Chromium) running a SMART fetch from a page of another origin against the
//! proxy, with the real issuer and HAPI behind.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Proxy, get, tenant, tenants};
use crate::support;

/// A proxy with `cors` (origins `allowed`, credentials), `wild` (`["*"]`) and `plain`
/// (no `cors`).
fn start(allowed: &[String]) -> Proxy {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let allowed = allowed.to_vec();
    Proxy::start_with_env(
        move |port| {
            let mut cors = tenant("cors", port, fhir.base_url(), issuer);
            cors["cors"] = json!({
                "allowed_origins": allowed,
                "allow_credentials": true,
                "max_age_seconds": 120,
                "exposed_headers": ["x-request-id"],
            });
            let mut wild = tenant("wild", port, fhir.base_url(), issuer);
            wild["cors"] = json!({"allowed_origins": ["*"]});
            let plain = tenant("plain", port, fhir.base_url(), issuer);
            tenants(vec![("cors", cors), ("wild", wild), ("plain", plain)])
        },
        &[],
    )
}

const APP: &str = "http://127.0.0.1:3000";

async fn preflight(url: &str, origin: &str, method: &str, headers: &str) -> crate::harness::Answer {
    crate::harness::answer(
        support::http_client()
            .request(reqwest::Method::OPTIONS, url)
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers),
    )
    .await
}

async fn from(url: &str, origin: &str, token: Option<&str>) -> crate::harness::Answer {
    let mut req = support::http_client().get(url).header("origin", origin);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    crate::harness::answer(req).await
}

#[tokio::test]
async fn preflights_and_answers_carry_the_tenants_cors_headers() {
    let proxy = start(&[APP.to_owned()]);
    let base = proxy.base("cors");

    // A preflight needs no token and goes no further than the proxy.
    let a = preflight(
        &format!("{base}/Patient/p1"),
        APP,
        "GET",
        "authorization, prefer",
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(a.header("access-control-allow-origin"), APP);
    assert_eq!(a.header("access-control-allow-credentials"), "true");
    assert_eq!(
        a.header("access-control-allow-methods"),
        "GET, POST, HEAD, OPTIONS"
    );
    assert!(
        a.header("access-control-allow-headers")
            .contains("authorization")
    );
    assert_eq!(a.header("access-control-max-age"), "120");
    assert!(a.header("vary").contains("Origin"));

    // Other origins, methods and headers: 403 OperationOutcome, no CORS headers.
    for (origin, method, headers, reason) in [
        (
            "http://127.0.0.1:3001",
            "GET",
            "authorization",
            "cors_origin_not_allowed",
        ),
        ("null", "GET", "authorization", "cors_origin_not_allowed"),
        (APP, "DELETE", "authorization", "cors_method_not_allowed"),
        (
            APP,
            "GET",
            "authorization, x-evil",
            "cors_header_not_allowed",
        ),
    ] {
        let a = preflight(&format!("{base}/Patient/p1"), origin, method, headers).await;
        assert_eq!(a.status, 403, "{origin} {method} {headers}: {}", a.text);
        assert_eq!(a.reason(), reason);
        assert_eq!(a.header("access-control-allow-origin"), "");
    }
    // A tenant without `cors` allows no origin.
    let a = preflight(
        &format!("{}/Patient/p1", proxy.base("plain")),
        APP,
        "GET",
        "",
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!(a.reason(), "cors_origin_not_allowed");

    // Answers: the record, and the refusals an app must be able to read.
    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;
    let ok = from(&format!("{base}/Patient/p1"), APP, Some(&token)).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.header("access-control-allow-origin"), APP);
    assert!(
        ok.header("access-control-expose-headers")
            .contains("www-authenticate")
    );
    assert!(
        ok.header("access-control-expose-headers")
            .contains("x-request-id")
    );
    let missing_token = from(&format!("{base}/Patient/p1"), APP, None).await;
    assert_eq!(missing_token.status, 401);
    assert_eq!(missing_token.header("access-control-allow-origin"), APP);
    assert!(
        missing_token
            .header("www-authenticate")
            .starts_with("Bearer")
    );
    let hidden = from(&format!("{base}/Patient/p2"), APP, Some(&token)).await;
    assert_eq!(hidden.status, 404);
    assert_eq!(hidden.header("access-control-allow-origin"), APP);
    let wrong_scope = from(&format!("{base}/Observation?code=x"), APP, Some(&token)).await;
    assert_eq!(wrong_scope.status, 403, "{}", wrong_scope.text);
    assert_eq!(wrong_scope.header("access-control-allow-origin"), APP);
    // Discovery, without a token.
    for path in ["/.well-known/smart-configuration", "/metadata"] {
        let a = from(&format!("{base}{path}"), APP, None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        assert_eq!(a.header("access-control-allow-origin"), APP, "{path}");
    }
    // Another origin: answered (CORS is not access control) but unreadable to its page.
    let other = from(
        &format!("{base}/Patient/p1"),
        "https://evil.example",
        Some(&token),
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), "");
    assert!(other.header("vary").contains("Origin"));
    // No Origin: no CORS headers but `Vary`.
    let none = get(&format!("{base}/Patient/p1"), Some(&token)).await;
    assert_eq!(none.status, 200);
    assert_eq!(none.header("access-control-allow-origin"), "");

    // `["*"]`: any origin, `*`, never credentials.
    let wild = proxy.base("wild");
    let a = preflight(
        &format!("{wild}/Patient/p1"),
        "https://anyone.example",
        "GET",
        "authorization",
    )
    .await;
    assert_eq!(a.status, 204);
    assert_eq!(a.header("access-control-allow-origin"), "*");
    assert_eq!(a.header("access-control-allow-credentials"), "");
    let a = from(&format!("{wild}/metadata"), "https://anyone.example", None).await;
    assert_eq!(a.header("access-control-allow-origin"), "*");

    // No `cors`: no CORS headers at all.
    let a = from(&format!("{}/metadata", proxy.base("plain")), APP, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("access-control-allow-origin"), "");
    assert_eq!(a.header("vary"), "");

    // Preflights are logged (origin and decision, never a token).
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cors preflight") && l.contains("\"allow\"")),
        "{log}"
    );
    assert!(!log.contains(&token));
}

#[test]
fn check_config_refuses_bad_cors_settings() {
    let example = support::repo_root().join("tenants.example.json");
    let base: Value = serde_json::from_slice(&std::fs::read(example).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (cors, needle) in [
        (
            json!({"allowed_origins": ["*"], "allow_credentials": true}),
            "`*` cannot be used with `allow_credentials`",
        ),
        (
            json!({"allowed_origins": ["*", "https://a.example"]}),
            "`*` must be the only entry",
        ),
        (
            json!({"allowed_origins": ["https://a.example/"]}),
            "did you mean `https://a.example`",
        ),
        (
            json!({"allowed_origins": ["https://a.example:443"]}),
            "did you mean `https://a.example`",
        ),
        (json!({"allowed_origins": ["null"]}), "cors.allowed_origins"),
        (json!({"allowed_origins": []}), "at least one origin"),
        (
            json!({"allowed_origins": ["https://a.example"], "max_age_seconds": 86401}),
            "cors.max_age_seconds",
        ),
        (
            json!({"allowed_origins": ["https://a.example"], "exposed_headers": ["bad header"]}),
            "cors.exposed_headers",
        ),
        (
            json!({"allowed_origins": ["https://a.example"], "allow_methods": ["PUT"]}),
            "allow_methods",
        ),
    ] {
        let mut v = base.clone();
        let demo = v["tenants"]["demo"].clone();
        v["tenants"] = json!({ "demo": demo });
        v["tenants"]["demo"]["cors"] = cors.clone();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
            .arg("check-config")
            .arg("--tenants")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cors}: {text}");
        assert!(text.contains(needle), "{cors}: `{needle}` not in {text}");
    }
}

// -------------------------------------------------------------------------------------
// a real browser

/// Serves one HTML page, `/app.html`, on 127.0.0.1 (the app's origin) until dropped.
/// The page is set once the proxy it calls runs.
struct PageServer {
    port: u16,
    html: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl PageServer {
    fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let html = Arc::new(Mutex::new(String::new()));
        let page = Arc::clone(&html);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let (status, body) = if buf.starts_with(b"GET /app.html") {
                            ("200 OK", page.lock().unwrap().clone())
                        } else {
                            ("404 Not Found", String::new())
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        PageServer { port, html, stop }
    }

    fn set_page(&self, html: String) {
        *self.html.lock().unwrap() = html;
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The SMART app's page: reads `Patient/p1` with the token from the URL fragment, and
/// the same record without a token (the 401 and its challenge), into the DOM.
fn app_page(proxy_base: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="read">pending</pre><pre id="anon">pending</pre>
<script>
const base = {base:?};
const token = location.hash.slice(1);
fetch(base + '/Patient/p1', {{headers: {{Authorization: 'Bearer ' + token, Accept: 'application/fhir+json'}}}})
  .then(r => r.json().then(j => {{ document.getElementById('read').textContent = 'status=' + r.status + ' patient=' + j.resourceType + '/' + j.id; }}))
  .catch(e => {{ document.getElementById('read').textContent = 'fetch-error ' + e.name; }});
fetch(base + '/Patient/p1')
  .then(r => {{ document.getElementById('anon').textContent = 'status=' + r.status + ' challenge=' + r.headers.get('WWW-Authenticate'); }})
  .catch(e => {{ document.getElementById('anon').textContent = 'fetch-error ' + e.name; }});
</script></body></html>"#,
        base = proxy_base
    )
}

fn chromium() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        path.exists(),
        "{} is missing: run scripts/install.sh (it installs Debian's `chromium`)",
        path.display()
    );
    path
}

/// The DOM of `url` after its scripts ran, from headless Chromium (bounded in time).
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Virtual time waits for the page's fetches before the DOM is dumped.
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match child.try_wait().unwrap() {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 90 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("<pre id=\"{id}\">");
    let start = dom
        .find(&open)
        .map(|i| i + open.len())
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let end = dom[start..].find("</pre>").unwrap() + start;
    &dom[start..end]
}

#[tokio::test]
async fn a_browser_app_of_an_allowed_origin_reads_a_record_and_others_cannot() {
    chromium();
    // The pages' origins go into the tenant, the proxy's base into the pages.
    let allowed = PageServer::start();
    let other = PageServer::start();
    let proxy = start(&[allowed.origin()]);
    let base = proxy.base("cors");
    allowed.set_page(app_page(&base));
    other.set_page(app_page(&base));
    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;

    let dom = tokio::task::spawn_blocking({
        let url = format!("{}/app.html#{token}", allowed.origin());
        move || dump_dom(&url)
    })
    .await
    .unwrap();
    assert_eq!(
        element(&dom, "read"),
        "status=200 patient=Patient/p1",
        "{dom}"
    );
    assert_eq!(
        element(&dom, "anon"),
        "status=401 challenge=Bearer",
        "{dom}"
    );
    // The browser asked first (Authorization is not a safelisted header).
    let log = proxy.log();
    let preflight_of = |origin: &str, decision: &str| {
        log.lines().any(|l| {
            l.contains("cors preflight")
                && l.contains(&format!("\"cors.origin\":\"{origin}\""))
                && l.contains(&format!("\"cors.decision\":\"{decision}\""))
        })
    };
    assert!(preflight_of(&allowed.origin(), "allow"), "{log}");

    // A page of another origin gets nothing it can read.
    let dom = tokio::task::spawn_blocking({
        let url = format!("{}/app.html#{token}", other.origin());
        move || dump_dom(&url)
    })
    .await
    .unwrap();
    assert_eq!(element(&dom, "read"), "fetch-error TypeError", "{dom}");
    assert_eq!(element(&dom, "anon"), "fetch-error TypeError", "{dom}");
    let log = proxy.log();
    let preflight_of = |origin: &str, decision: &str| {
        log.lines().any(|l| {
            l.contains("cors preflight")
                && l.contains(&format!("\"cors.origin\":\"{origin}\""))
                && l.contains(&format!("\"cors.decision\":\"{decision}\""))
        })
    };
    assert!(preflight_of(&other.origin(), "deny"), "{log}");
}
