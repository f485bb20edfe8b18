//! Starts the real proxy binary against the real stack, and small fault servers for
//! the cases a real upstream cannot be made to produce on demand (down, slow, broken).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, Issuer};

/// A running proxy process with its own tenants file and log.
pub struct Proxy {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy with the tenants file `build(port)` returns.
    pub fn start(build: impl FnOnce(u16) -> Value) -> Proxy {
        Self::start_with_env(build, &[])
    }

    pub fn start_with_env(build: impl FnOnce(u16) -> Value, env: &[(&str, &str)]) -> Proxy {
        use std::os::unix::process::CommandExt;
        let port = support::free_port();
        let dir = tempfile::tempdir().unwrap();
        let tenants = dir.path().join("tenants.json");
        std::fs::write(&tenants, serde_json::to_vec_pretty(&build(port)).unwrap()).unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let watchdog = support::repo_root().join("scripts/lib/watchdog.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(watchdog)
            .arg(std::process::id().to_string())
            .arg(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
            .arg("--tenants")
            .arg(&tenants)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--reload-poll-seconds")
            .arg("1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let proxy = Proxy { child, port, dir };
        proxy.wait_ready();
        proxy
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ =
                    s.write_all(b"GET /_health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy did not become ready; log:\n{}", self.log());
    }

    pub fn base(&self, tenant: &str) -> String {
        format!("http://127.0.0.1:{}/{tenant}", self.port)
    }

    pub fn tenants_path(&self) -> PathBuf {
        self.dir.path().join("tenants.json")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// The audit records (JSON lines on the `audit` target) logged so far. The proxy
    /// writes them from a queue every few milliseconds, so this first waits well past
    /// that for the records of requests just answered.
    pub fn audit_records(&self) -> Vec<Value> {
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "audit")
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// A tenant on the shared stack. `id` becomes the path segment and audience suffix.
pub fn tenant(id: &str, port: u16, fhir_base: &str, issuer: &Issuer) -> Value {
    json!({
        "public_base_url": format!("http://127.0.0.1:{port}/{id}"),
        "upstream": { "base_url": fhir_base, "timeout_ms": 10000 },
        "token": {
            "issuers": [issuer.url()],
            "jwks_uri": issuer.jwks_uri(),
            "audience": format!("http://127.0.0.1:{port}/{id}"),
            "algorithms": ["RS256", "ES256"],
            "leeway_seconds": 5,
        },
        "smart": {
            "authorization_endpoint": format!("{}/auth", issuer.url()),
            "token_endpoint": issuer.token_endpoint(),
        },
        "authorization": { "mode": "compartment" }
    })
}

pub fn tenants(list: Vec<(&str, Value)>) -> Value {
    let map: serde_json::Map<String, Value> =
        list.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    json!({ "tenants": map })
}

/// One proxy per test binary with tenants `demo` and `demo2` on the shared stack.
pub fn shared() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let fhir = support::fhir_server();
        let issuer = support::issuer();
        Proxy::start(|port| {
            tenants(vec![
                ("demo", tenant("demo", port, fhir.base_url(), issuer)),
                ("demo2", tenant("demo2", port, fhir.base_url(), issuer)),
            ])
        })
    })
}

/// A token from the shared issuer for `client` with `scope`, audience `tenant` of the
/// shared proxy.
pub async fn token(client: &str, scope: &str, tenant: &str) -> String {
    support::token(client, scope, &shared().base(tenant)).await
}

/// A finished HTTP exchange.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The OperationOutcome reason id (`issue[0].details.coding[0].code`).
    pub fn reason(&self) -> String {
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{}", self.text);
        v["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    /// `ResourceType/id` of every Bundle entry, in order.
    pub fn entry_ids(&self) -> Vec<String> {
        self.json()["entry"]
            .as_array()
            .map(|es| {
                es.iter()
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e["resource"]["resourceType"].as_str().unwrap_or("?"),
                            e["resource"]["id"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub async fn get(url: &str, token: Option<&str>) -> Answer {
    let mut req = support::http_client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    answer(req).await
}

pub async fn post_form(url: &str, token: &str, form: &[(&str, &str)]) -> Answer {
    answer(
        support::http_client()
            .post(url)
            .bearer_auth(token)
            .form(form),
    )
    .await
}

pub async fn answer(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
    }
}

/// Signs arbitrary claims with one of the issuer's real private keys.
pub fn sign_with_issuer_key(
    issuer: &Issuer,
    kid: &str,
    alg: jsonwebtoken::Algorithm,
    claims: &Value,
) -> String {
    let pem = issuer.private_key_pem(kid);
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => {
            jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()
        }
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_owned());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What a fault server does with each connection.
#[derive(Clone)]
pub enum Fault {
    /// Reads the request, never answers.
    Stall,
    /// Answers 200 `application/fhir+json` with a body that is not JSON.
    BrokenJson,
    /// Answers 200 with a Patient and records the raw request.
    Capture,
    /// Answers 200 with this FHIR JSON body and records the raw request.
    Respond(String),
    /// Answers `302 Found` to this location (with an OperationOutcome body) and
    /// records the raw request.
    Redirect(String),
}

/// A loopback TCP server that misbehaves on purpose. Stops when dropped.
pub struct FaultServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultServer {
    pub fn start(fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reqs, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(500)))
                            .unwrap();
                        let request = read_request(&mut s);
                        reqs.lock().unwrap().push(request);
                        match &fault {
                            Fault::Stall => held.push(s),
                            Fault::BrokenJson => {
                                let body = "{\"resourceType\": \"Patient\", \"id\": ";
                                let _ = write!(
                                    s,
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                            }
                            Fault::Redirect(location) => {
                                let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"moved"}]}"#;
                                let _ = write!(
                                    s,
                                    "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                            }
                            Fault::Capture | Fault::Respond(_) => {
                                let body = match &fault {
                                    Fault::Respond(b) => b.as_str(),
                                    _ => r#"{"resourceType":"Patient","id":"p1"}"#,
                                };
                                let _ = write!(
                                    s,
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultServer {
            port,
            requests,
            stop,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }
}

/// Reads one request (headers and a `content-length` body) as text.
fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Rewrites a tenants file in place (for reload tests).
pub fn write_json(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}
