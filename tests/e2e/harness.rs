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
        Self::start_with_args::<&str>(build, &[], env)
    }

    /// As [`Proxy::start_with_env`], with extra command-line arguments. With
    /// `--tls-cert` the proxy speaks HTTPS only, so it is ready once it logs that it
    /// listens (the plain `/_health` probe cannot reach it).
    pub fn start_with_args<S: AsRef<str>>(
        build: impl FnOnce(u16) -> Value,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Proxy {
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
            .args(args.iter().map(AsRef::as_ref))
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
        if args.iter().any(|a| a.as_ref() == "--tls-cert") {
            proxy.wait_listening();
        } else {
            proxy.wait_ready();
        }
        proxy
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.log().contains("smart-fhir-proxy listening") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy did not start listening; log:\n{}", self.log());
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

    /// The pid of the proxy process itself (the watchdog's child).
    pub fn pid(&self) -> u32 {
        let watchdog = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // `pid (comm) state ppid ...`; comm may contain spaces, so after the `)`.
                let ppid = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split(' ').nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if ppid == Some(watchdog) && exe.to_string_lossy().contains("smart-fhir-proxy") {
                    return pid;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no proxy process under watchdog {watchdog}");
    }

    /// Sends `signal` (`TERM`, `INT`, `HUP`, ...) to the proxy process itself.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (at most `within`, a bound against hanging, not a measurement) for the
    /// proxy to exit; its exit status (the watchdog passes it on), `None` if it is
    /// still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The proxy's resident set in bytes (`VmRSS` in `/proc/PID/status`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("proxy process gone: {e}; log:\n{}", self.log()));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
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

impl Proxy {
    /// Stops the proxy (SIGTERM, as an orchestrator would) and waits for it to exit;
    /// returns its whole log.
    pub fn stop(mut self) -> String {
        self.terminate();
        self.log()
    }

    fn terminate(&mut self) {
        // Quietly: the group may be gone already (a test that stopped the proxy).
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.terminate();
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
    /// Answers every request with this reply and records the raw request.
    Reply(Reply),
    /// Answers with the reply of the first route whose key occurs in the request line
    /// (`GET /fhir/Patient/p1 HTTP/1.1`), 404 without one; records the raw request.
    Routes(Vec<(String, Reply)>),
    /// Holds each request (recorded as it arrives) until the gate opens, then answers
    /// this reply; connections are served side by side.
    Gated(Gate, Reply),
}

/// A gate for [`Fault::Gated`]: closed until [`Gate::open`].
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }

    fn wait(&self) {
        let (open, changed) = &*self.0;
        let mut is_open = open.lock().unwrap();
        while !*is_open {
            is_open = changed.wait(is_open).unwrap();
        }
    }
}

/// An HTTP answer a [`FaultServer`] sends: any status, headers and body, the body sent
/// with a `content-length` or chunked without one.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Arc<[u8]>,
    pub chunked: bool,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".to_owned(), content_type.to_owned())],
            body: Arc::from(body.into()),
            chunked: false,
        }
    }

    /// 200 `application/fhir+json`.
    pub fn fhir(body: impl Into<Vec<u8>>) -> Reply {
        Reply::new(200, "application/fhir+json", body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends the body chunked, without announcing its length.
    pub fn chunked(mut self) -> Reply {
        self.chunked = true;
        self
    }

    /// Writes the reply; a peer that stops reading ends it quietly.
    fn write_to(&self, s: &mut TcpStream) {
        let mut head = format!("HTTP/1.1 {} Fault\r\n", self.status);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.chunked {
            head.push_str("transfer-encoding: chunked\r\n");
        } else {
            head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        head.push_str("connection: close\r\n\r\n");
        if s.write_all(head.as_bytes()).is_err() {
            return;
        }
        if !self.chunked {
            let _ = s.write_all(&self.body);
            return;
        }
        for chunk in self.body.chunks(64 * 1024) {
            let size = format!("{:x}\r\n", chunk.len());
            if s.write_all(size.as_bytes()).is_err()
                || s.write_all(chunk).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
    }
}

/// The CapabilityStatement fault servers answer `GET /metadata` with: every search
/// parameter the tests use, declared for every type.
const CAPABILITY_STATEMENT: &str = r#"{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["json"],"rest":[{"mode":"server","searchParam":[{"name":"_id","type":"token"},{"name":"_lastUpdated","type":"date"},{"name":"code","type":"token"},{"name":"patient","type":"reference"},{"name":"subject","type":"reference"},{"name":"performer","type":"reference"},{"name":"name","type":"string"},{"name":"identifier","type":"token"},{"name":"category","type":"token"},{"name":"date","type":"date"}]}]}"#;

/// Whether a fault server answers this request with [`CAPABILITY_STATEMENT`]: a
/// `GET .../metadata` to a server that answers (not `Stall`, `BrokenJson` or a route
/// of its own for it).
fn answers_metadata(fault: &Fault, request: &str) -> bool {
    let line = request.lines().next().unwrap_or_default();
    let path = line.split(' ').nth(1).unwrap_or_default();
    let metadata = line.starts_with("GET ")
        && path
            .split('?')
            .next()
            .unwrap_or_default()
            .ends_with("/metadata");
    metadata
        && match fault {
            Fault::Stall | Fault::BrokenJson => false,
            Fault::Routes(routes) => !routes.iter().any(|(key, _)| key.contains("metadata")),
            _ => true,
        }
}

/// A loopback TCP server that misbehaves on purpose. Stops when dropped.
pub struct FaultServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultServer {
    pub fn start(fault: Fault) -> FaultServer {
        Self::start_with(|_| fault)
    }

    /// Starts a server whose fault is made knowing the server's own base URL (for
    /// answers that point back at it, e.g. redirects).
    pub fn start_with(make: impl FnOnce(&str) -> Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = make(&format!("http://127.0.0.1:{port}/fhir"));
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
                        // Restricted searches first ask for the CapabilityStatement (the
                        // search parameters the upstream declares): answered, and not
                        // recorded, for every fault that answers at all, unless a route
                        // says otherwise.
                        if answers_metadata(&fault, &request) {
                            Reply::fhir(CAPABILITY_STATEMENT).write_to(&mut s);
                            continue;
                        }
                        reqs.lock().unwrap().push(request.clone());
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
                            Fault::Reply(reply) => reply.write_to(&mut s),
                            Fault::Gated(gate, reply) => {
                                let (gate, reply) = (gate.clone(), reply.clone());
                                std::thread::spawn(move || {
                                    gate.wait();
                                    reply.write_to(&mut s);
                                });
                            }
                            Fault::Routes(routes) => {
                                let line = request.lines().next().unwrap_or_default();
                                match routes.iter().find(|(key, _)| line.contains(key.as_str())) {
                                    Some((_, reply)) => reply.write_to(&mut s),
                                    None => {
                                        Reply::new(404, "text/plain", "no route").write_to(&mut s)
                                    }
                                }
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
