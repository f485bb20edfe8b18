//! Real components for integration tests: the upstream FHIR server (HAPI FHIR JPA
//! server), the OAuth2 token issuer (oidc-provider) and OpenFGA ([`fga_server`]),
//! started through the scripts in `scripts/`.
//!
//! Use from an integration test with `mod support;`. Per test binary there is one
//! shared FHIR server with `tests/fixtures/base-bundle.json` loaded ([`fhir_server`])
//! and one shared issuer with the test clients below ([`issuer`]), both started lazily
//! on free ports. Tests that change data or keys start their own ([`FhirServer::start`],
//! [`Issuer::start`]); those stop when dropped. Every process is watched: it exits
//! within about a second of the test process, however that ends.
//!
//! The components must be installed first (`scripts/install.sh`); otherwise the first
//! call panics and says so. This module knows nothing of the proxy crate.
//!
//! Shared issuer clients (secret [`TEST_SECRET`] for all; each may ask for any scope and
//! any `resource=` under `http://127.0.0.1:`, `http://localhost:` or `https://127.0.0.1:`
//! (HTTPS listener tests), which becomes `aud`):
//!
//! | client_id | `patient` | `fhirUser` | alg | note |
//! | --- | --- | --- | --- | --- |
//! | `patient-p1` | p1 | Patient/p1 | RS256 | |
//! | `patient-p1-es256` | p1 | Patient/p1 | ES256 | |
//! | `patient-p2` | p2 | Patient/p2 | RS256 | |
//! | `patient-p10` | p10 | Patient/p10 | RS256 | |
//! | `related-rp1` | p1 | RelatedPerson/rp1 | RS256 | |
//! | `practitioner-pr1` | | Practitioner/pr1 | RS256 | |
//! | `practitioner-pr2` | | Practitioner/pr2 | ES256 | |
//! | `role-pr1` | | PractitionerRole/role-pr1 | RS256 | acts as pr1 |
//! | `role-pr2-inactive` | | PractitionerRole/role-pr2-inactive | RS256 | inactive role |
//! | `backend` | | | RS256 | system scopes |
//! | `backend-es256` | | | ES256 | system scopes |
//! | `patient-p1-short` | p1 | Patient/p1 | RS256 | tokens expire after 2 s |
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod fga_server;
#[allow(unused_imports)]
pub use fga_server::{FgaStore, OpenFgaOptions, OpenFgaServer, openfga};

/// Client secret of every client of the shared issuer.
pub const TEST_SECRET: &str = "test-secret";

// ---------------------------------------------------------------------------------------
// paths and installation

/// Repository root: `SMART_FHIR_PROXY_ROOT` if set, else this crate's manifest dir.
pub fn repo_root() -> PathBuf {
    std::env::var_os("SMART_FHIR_PROXY_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn scripts_dir() -> PathBuf {
    repo_root().join("scripts")
}

fn stack_dir() -> PathBuf {
    std::env::var_os("SMART_FHIR_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".stack"))
}

/// `tests/fixtures/base-bundle.json`.
pub fn base_bundle_path() -> PathBuf {
    repo_root().join("tests/fixtures/base-bundle.json")
}

/// Panics with the fix when a component is missing.
pub fn require_installed() {
    let needed = [
        stack_dir().join("hapi/app.jar"),
        stack_dir().join("bin/openfga"),
        scripts_dir().join("issuer/node_modules/oidc-provider/package.json"),
    ];
    for path in needed {
        if !path.exists() {
            panic!(
                "the test stack is not installed ({} is missing): run scripts/install.sh",
                path.display()
            );
        }
    }
}

/// Scratch directories live under `target/tmp/smart-fhir-stack/<pid>-<name>-<n>`;
/// directories of test processes that are gone are removed on first use.
fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    static CLEANED: OnceLock<()> = OnceLock::new();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smart-fhir-stack");
    CLEANED.get_or_init(|| {
        for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
            let owner = entry
                .file_name()
                .to_string_lossy()
                .split('-')
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            if owner.is_some_and(|pid| pid != std::process::id() && !pid_alive(pid)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{}-{name}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------------------
// processes

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// Whether `pid` runs (a zombie does not).
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn send_signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A background process started by one of the scripts, in its own process group.
#[derive(Debug)]
struct Background {
    pid: u32,
    pgid: u32,
}

impl Background {
    /// SIGTERM to the group, up to 5 s for `pid` to go, then SIGKILL.
    fn stop(&self) {
        send_signal("TERM", &format!("-{}", self.pgid));
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(self.pid) {
            send_signal("KILL", &format!("-{}", self.pgid));
            send_signal("KILL", &self.pid.to_string());
        }
    }
}

/// Runs `scripts/<script> args...` in a new process group with the watchdog tied to this
/// test process; returns its trimmed stdout and the group id, or the error output.
fn run_start_script(script: &str, args: &[String]) -> Result<(String, u32), String> {
    use std::os::unix::process::CommandExt;
    let child = Command::new("bash")
        .arg(scripts_dir().join(script))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run scripts/{script}: {e}"))?;
    let pgid = child.id();
    let out = child
        .wait_with_output()
        .map_err(|e| format!("scripts/{script}: {e}"))?;
    if out.status.success() {
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), pgid))
    } else {
        Err(format!(
            "scripts/{script} {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `attempt` up to three times (a free port may be taken before the server binds
/// it); panics with the last error naming `what`.
fn start_with_retries<T>(what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let mut last_error = String::new();
    for _ in 0..3 {
        match attempt() {
            Ok(started) => return started,
            Err(e) => last_error = e,
        }
    }
    panic!("cannot start {what}: {last_error}");
}

fn read_pid(file: &Path) -> u32 {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", file.display()))
}

// ---------------------------------------------------------------------------------------
// FHIR server

/// How to start a [`FhirServer`].
#[derive(Debug, Clone)]
pub struct FhirServerOptions {
    /// Bundles to load after start; `__FHIR_BASE__` in them becomes the base URL.
    pub load: Vec<PathBuf>,
    /// Add compartment search (`Patient/p1/Observation`), which a stock HAPI JPA
    /// server lacks (`scripts/fhir-server.sh --compartment-search`).
    pub compartment_search: bool,
    /// Base URL the server writes into `fullUrl`, links and `Location` instead of its own.
    pub public_base: Option<String>,
    /// No access log (then [`FhirServer::requests`] sees nothing).
    pub quiet: bool,
}

impl Default for FhirServerOptions {
    /// The base bundle loaded, access log on.
    fn default() -> Self {
        Self {
            load: vec![base_bundle_path()],
            compartment_search: false,
            public_base: None,
            quiet: false,
        }
    }
}

/// A running HAPI FHIR JPA server (`scripts/fhir-server.sh`), data in memory.
#[derive(Debug)]
pub struct FhirServer {
    base_url: String,
    port: u16,
    data_dir: PathBuf,
    process: Background,
}

impl FhirServer {
    /// Starts a server of its own on a free port with a fresh database; stops on drop.
    pub fn start(options: FhirServerOptions) -> FhirServer {
        require_installed();
        start_with_retries("the FHIR server", || {
            let port = free_port();
            let data_dir = scratch_dir("fhir");
            let mut args = vec![
                "--port".to_owned(),
                port.to_string(),
                "--data-dir".to_owned(),
                data_dir.display().to_string(),
                "--parent-pid".to_owned(),
                std::process::id().to_string(),
            ];
            for file in &options.load {
                args.extend(["--load".to_owned(), file.display().to_string()]);
            }
            if let Some(base) = &options.public_base {
                args.extend(["--public-base".to_owned(), base.clone()]);
            }
            if options.quiet {
                args.push("--quiet".to_owned());
            }
            if options.compartment_search {
                args.push("--compartment-search".to_owned());
            }
            let (base_url, pgid) = run_start_script("fhir-server.sh", &args)?;
            let pid = read_pid(&data_dir.join("server.pid"));
            Ok(FhirServer {
                base_url,
                port,
                data_dir,
                process: Background { pid, pgid },
            })
        })
    }

    /// FHIR base URL, `http://127.0.0.1:PORT/fhir` (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory with `server.log` (access log), `hapi.log`, `server.pid`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// Requests the server received so far, as `METHOD /fhir/path?query` (query as sent),
    /// oldest first, from its access log. The shared server sees every test's requests.
    pub fn requests(&self) -> Vec<String> {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let start = line.find(" - \"")? + 4;
                let rest = &line[start..];
                let end = rest.find(" HTTP/")?;
                Some(rest[..end].to_owned())
            })
            .collect()
    }
}

impl FhirServer {
    /// [`FhirServer::requests`] once a line satisfies `seen`, or after 5 s: the access
    /// log is written after the answer, so a test can get its answer first.
    pub async fn requests_once(&self, seen: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let lines = self.requests();
            if lines.iter().any(|l| seen(l)) || std::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for FhirServer {
    fn drop(&mut self) {
        self.process.stop();
    }
}

/// The FHIR server shared by the tests of this binary, with the base bundle loaded and
/// compartment search added (for tenants with `upstream.compartment_search: native`;
/// the others never send one, as in front of a stock HAPI server).
/// Do not change its data; start a [`FhirServer`] of your own for that.
pub fn fhir_server() -> &'static FhirServer {
    static SERVER: OnceLock<FhirServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        FhirServer::start(FhirServerOptions {
            compartment_search: true,
            ..FhirServerOptions::default()
        })
    })
}

// ---------------------------------------------------------------------------------------
// issuer

/// Signing algorithm of a client's access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Alg {
    #[default]
    RS256,
    ES256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::ES256 => "ES256",
        }
    }
}

/// One client of an [`Issuer`].
#[derive(Debug, Clone, Default)]
pub struct IssuerClient {
    pub client_id: String,
    pub client_secret: String,
    /// Space separated scopes the client may ask for, or `*` for any.
    pub scopes: String,
    /// `patient` claim of its tokens.
    pub patient: Option<String>,
    /// `fhirUser` claim of its tokens.
    pub fhir_user: Option<String>,
    pub alg: Alg,
    /// Sign with this key instead of the first key of `alg`.
    pub kid: Option<String>,
    /// Token lifetime in seconds (default: the issuer's).
    pub token_ttl: Option<u64>,
    /// `resource=` values this client may use (default: all of the issuer's).
    pub resources: Option<Vec<String>>,
}

impl IssuerClient {
    /// A client with secret [`TEST_SECRET`] that may ask for any scope.
    pub fn new(client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: TEST_SECRET.to_owned(),
            scopes: "*".to_owned(),
            ..Self::default()
        }
    }

    pub fn patient(mut self, id: &str) -> Self {
        self.patient = Some(id.to_owned());
        self
    }

    pub fn fhir_user(mut self, reference: &str) -> Self {
        self.fhir_user = Some(reference.to_owned());
        self
    }

    pub fn alg(mut self, alg: Alg) -> Self {
        self.alg = alg;
        self
    }

    pub fn scopes(mut self, scopes: &str) -> Self {
        self.scopes = scopes.to_owned();
        self
    }

    pub fn token_ttl(mut self, seconds: u64) -> Self {
        self.token_ttl = Some(seconds);
        self
    }

    fn to_json(&self) -> Value {
        let mut c = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scopes": self.scopes,
            "alg": self.alg.as_str(),
        });
        if let Some(v) = &self.patient {
            c["patient"] = json!(v);
        }
        if let Some(v) = &self.fhir_user {
            c["fhirUser"] = json!(v);
        }
        if let Some(v) = &self.kid {
            c["kid"] = json!(v);
        }
        if let Some(v) = self.token_ttl {
            c["token_ttl"] = json!(v);
        }
        if let Some(v) = &self.resources {
            c["resources"] = json!(v);
        }
        c
    }
}

/// Configuration of an [`Issuer`] (`scripts/issuer/issuer.mjs` config without the port).
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub clients: Vec<IssuerClient>,
    /// Accepted `resource=` values (= `aud`); a trailing `*` makes a prefix.
    pub resources: Vec<String>,
    /// Private JWKS; `None` generates one RS256 and one ES256 key.
    pub keys: Option<Value>,
    /// Default token lifetime in seconds (3600 when `None`).
    pub token_ttl: Option<u64>,
}

impl Default for IssuerConfig {
    /// No clients; every resource on 127.0.0.1 and localhost; fresh keys.
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            resources: vec![
                "http://127.0.0.1:*".to_owned(),
                "http://localhost:*".to_owned(),
                "https://127.0.0.1:*".to_owned(),
            ],
            keys: None,
            token_ttl: None,
        }
    }
}

impl IssuerConfig {
    /// The configuration of the shared issuer (clients in the module docs).
    pub fn shared() -> Self {
        let c = IssuerClient::new;
        Self {
            clients: vec![
                c("patient-p1").patient("p1").fhir_user("Patient/p1"),
                c("patient-p1-es256")
                    .patient("p1")
                    .fhir_user("Patient/p1")
                    .alg(Alg::ES256),
                c("patient-p2").patient("p2").fhir_user("Patient/p2"),
                c("patient-p10").patient("p10").fhir_user("Patient/p10"),
                c("related-rp1")
                    .patient("p1")
                    .fhir_user("RelatedPerson/rp1"),
                c("practitioner-pr1").fhir_user("Practitioner/pr1"),
                c("role-pr1").fhir_user("PractitionerRole/role-pr1"),
                c("role-pr2-inactive").fhir_user("PractitionerRole/role-pr2-inactive"),
                c("practitioner-pr2")
                    .fhir_user("Practitioner/pr2")
                    .alg(Alg::ES256),
                c("backend"),
                c("backend-es256").alg(Alg::ES256),
                c("patient-p1-short")
                    .patient("p1")
                    .fhir_user("Patient/p1")
                    .token_ttl(2),
            ],
            ..Self::default()
        }
    }
}

/// A running oidc-provider issuer (`scripts/issuer-server.sh`).
#[derive(Debug)]
pub struct Issuer {
    url: String,
    port: u16,
    dir: PathBuf,
    config: IssuerConfig,
    keys: Value,
    process: Option<Background>,
}

impl Issuer {
    /// Starts an issuer of its own on a free port; stops on drop.
    pub fn start(config: IssuerConfig) -> Issuer {
        require_installed();
        let keys = config.keys.clone().unwrap_or_else(generate_keys);
        start_with_retries("the issuer", || {
            let port = free_port();
            let mut issuer = Issuer {
                url: format!("http://127.0.0.1:{port}"),
                port,
                dir: scratch_dir("issuer"),
                config: config.clone(),
                keys: keys.clone(),
                process: None,
            };
            issuer.launch()?;
            Ok(issuer)
        })
    }

    fn launch(&mut self) -> Result<(), String> {
        let config = json!({
            "issuer": self.url,
            "port": self.port,
            "keys": self.keys,
            "clients": self.config.clients.iter().map(IssuerClient::to_json).collect::<Vec<_>>(),
            "resources": self.config.resources,
            "token_ttl": self.config.token_ttl.unwrap_or(3600),
        });
        let config_path = self.dir.join("issuer.json");
        fs::write(&config_path, config.to_string())
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let pid_file = self.dir.join("issuer.pid");
        let args = [
            "--config".to_owned(),
            config_path.display().to_string(),
            "--parent-pid".to_owned(),
            std::process::id().to_string(),
            "--pid-file".to_owned(),
            pid_file.display().to_string(),
            "--log".to_owned(),
            self.log_path().display().to_string(),
        ];
        let (_, pgid) = run_start_script("issuer-server.sh", &args)?;
        self.process = Some(Background {
            pid: read_pid(&pid_file),
            pgid,
        });
        Ok(())
    }

    /// Stops the issuer (its port stays reserved for a restart).
    pub fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            p.stop();
        }
    }

    /// Stops the issuer and starts it again on the same port and issuer URL, signing with
    /// (and publishing only) `keys`, a private JWKS such as [`generate_keys`] returns.
    pub fn restart_with_keys(&mut self, keys: Value) {
        self.stop();
        self.keys = keys;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return,
                // The old process may hold the port for a moment.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!("cannot restart the issuer on port {}: {e}", self.port),
            }
        }
    }

    /// Issuer identifier (`iss`), `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.url)
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.url)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.url)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("issuer.log")
    }

    /// The private JWKS the issuer signs with.
    pub fn keys(&self) -> &Value {
        &self.keys
    }

    /// Key ids, in JWKS order.
    pub fn kids(&self) -> Vec<String> {
        key_list(&self.keys)
            .filter_map(|k| k["kid"].as_str().map(str::to_owned))
            .collect()
    }

    /// Key id of the first key for `alg`.
    pub fn kid(&self, alg: Alg) -> String {
        key_list(&self.keys)
            .find(|k| k["alg"] == alg.as_str())
            .and_then(|k| k["kid"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("the issuer has no {} key", alg.as_str()))
    }

    /// PKCS#8 PEM of the private key `kid`, to sign hand-made tokens
    /// (`jsonwebtoken::EncodingKey::from_rsa_pem` / `from_ec_pem`).
    pub fn private_key_pem(&self, kid: &str) -> String {
        let jwk = key_list(&self.keys)
            .find(|k| k["kid"] == kid)
            .unwrap_or_else(|| panic!("the issuer has no key `{kid}`"));
        jwk_to_pem(jwk)
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The issuer shared by the tests of this binary ([`IssuerConfig::shared`]).
pub fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| Issuer::start(IssuerConfig::shared()))
}

fn key_list(jwks: &Value) -> impl Iterator<Item = &Value> {
    jwks["keys"].as_array().into_iter().flatten()
}

fn run_node(script: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("node")
        .current_dir(scripts_dir().join("issuer"))
        .arg(script)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node (needed by the test stack): {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("node stdin: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("node: {e}"));
    if !out.status.success() {
        panic!(
            "node {script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh private JWKS with one RS256 and one ES256 key and new kids
/// (`scripts/issuer/genkeys.mjs`).
pub fn generate_keys() -> Value {
    require_installed();
    let out = run_node("genkeys.mjs", &[], None);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("genkeys.mjs printed no JWKS: {e}"))
}

fn jwk_to_pem(jwk: &Value) -> String {
    const SCRIPT: &str = "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>{\
        const k=require('node:crypto').createPrivateKey({key:JSON.parse(s),format:'jwk'});\
        process.stdout.write(k.export({type:'pkcs8',format:'pem'}));});";
    run_node("-e", &[SCRIPT], Some(&jwk.to_string()))
}

// ---------------------------------------------------------------------------------------
// tokens

/// A token endpoint answer that was not a success: HTTP status and body.
#[derive(Debug, Clone)]
pub struct TokenError {
    pub status: u16,
    pub body: Value,
}

/// `client_credentials` grant with a resource indicator: the `access_token`.
/// An empty `scope` sends no `scope` parameter. Panics when the issuer refuses.
pub async fn client_credentials_token(
    issuer: &Issuer,
    client_id: &str,
    secret: &str,
    scope: &str,
    resource: &str,
) -> String {
    match request_token(issuer, client_id, secret, scope, Some(resource)).await {
        Ok(answer) => answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {answer}"))
            .to_owned(),
        Err(e) => panic!(
            "token request for `{client_id}` (scope `{scope}`, resource `{resource}`) failed: {} {}",
            e.status, e.body
        ),
    }
}

/// [`client_credentials_token`] on the shared issuer with [`TEST_SECRET`].
pub async fn token(client_id: &str, scope: &str, resource: &str) -> String {
    client_credentials_token(issuer(), client_id, TEST_SECRET, scope, resource).await
}

/// The whole token endpoint answer (`access_token`, `scope`, `expires_in`, ...), or the
/// error answer (e.g. 400 `invalid_scope`, `invalid_target`; 401 `invalid_client`).
/// Without `resource` the issuer hands out an opaque token.
pub async fn request_token(
    issuer: &Issuer,
    client_id: &str,
    secret: &str,
    scope: &str,
    resource: Option<&str>,
) -> Result<Value, TokenError> {
    let mut form = vec![("grant_type", "client_credentials")];
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    if let Some(resource) = resource {
        form.push(("resource", resource));
    }
    let response = http_client()
        .post(issuer.token_endpoint())
        .basic_auth(client_id, Some(secret))
        .form(&form)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "token endpoint {} unreachable: {e}",
                issuer.token_endpoint()
            )
        });
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == 200 {
        Ok(body)
    } else {
        Err(TokenError { status, body })
    }
}

/// Header and claims of a JWT, decoded without any check.
pub fn decode_jwt(token: &str) -> (Value, Value) {
    let part = |i: usize| -> Value {
        let seg = token
            .split('.')
            .nth(i)
            .unwrap_or_else(|| panic!("not a JWT: {token}"));
        let bytes =
            base64url_decode(seg).unwrap_or_else(|| panic!("JWT segment {i} is not base64url"));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("JWT segment {i} is not JSON: {e}"))
    };
    (part(0), part(1))
}

/// Unpadded (or padded) base64url, as in JWTs.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A reqwest client for loopback calls (no proxy from the environment).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"))
}
