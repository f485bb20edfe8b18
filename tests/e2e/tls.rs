//! TLS end to end: the HTTPS listener (a test CA made per test, the real upstream
//! behind), its certificate replaced while it runs, and client certificates towards
//! the upstream and OpenFGA through a TLS-terminating relay that requires one and
//! passes the bytes on to the real HAPI or OpenFGA server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use serde_json::{Value, json};

use crate::harness::{Proxy, tenant, tenants};
use crate::support;

// -------------------------------------------------------------------------------------
// a test PKI

/// A CA made for one test.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate the CA issued, with its key.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    fn server(&self, serial: u64) -> Issued {
        self.issue(
            "proxy.test",
            &["127.0.0.1", "localhost"],
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, name: &str) -> Issued {
        self.issue(name, &[], 7, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        serial: u64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Replaced in one step, as an operator's deployment tool would.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

// -------------------------------------------------------------------------------------
// clients of the HTTPS proxy

/// A reqwest client that trusts only `ca` and reports the server's certificate.
fn https_client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .tls_info(true)
        .build()
        .unwrap()
}

/// The certificate a fresh connection to `url` is served (DER), and the status.
async fn served_certificate(ca: &TestCa, url: &str) -> (u16, Vec<u8>) {
    let resp = https_client(ca).get(url).send().await.unwrap();
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec();
    (resp.status().as_u16(), der)
}

/// A proxy with tenant `demo` (public base `https://...`) served with `server`.
fn https_proxy(dir: &Path, server: &Issued) -> Proxy {
    let cert = write(dir, "server.pem", &server.cert_pem);
    let key = write(dir, "server-key.pem", &server.key_pem);
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    Proxy::start_with_args(
        |port| {
            let mut t = tenant("demo", port, fhir.base_url(), issuer);
            t["public_base_url"] = format!("https://127.0.0.1:{port}/demo").into();
            t["token"]["audience"] = format!("https://127.0.0.1:{port}/demo").into();
            tenants(vec![("demo", t)])
        },
        &[
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        &[],
    )
}

fn https_base(proxy: &Proxy) -> String {
    format!("https://127.0.0.1:{}/demo", proxy.port)
}

#[tokio::test]
async fn https_with_a_test_ca_serves_the_real_upstream_over_http1_and_h2() {
    let ca = TestCa::new("test ca");
    let server = ca.server(1);
    let dir = tempfile::tempdir().unwrap();
    let proxy = https_proxy(dir.path(), &server);
    let base = https_base(&proxy);

    // A peer that never starts the handshake is dropped after the header timeout (10 s),
    // checked at the end of the test.
    let port = proxy.port;
    let silent = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{n} bytes answered to nothing")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("not closed: {e}")),
        }
    });

    let token = support::token("patient-p1", "patient/Patient.rs", &base).await;
    let resp = https_client(&ca)
        .get(format!("{base}/Patient/p1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let peer = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec();
    assert_eq!(peer, server.der, "the configured certificate is served");
    assert_eq!(resp.version(), http::Version::HTTP_11);
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["id"], "p1");

    // Another patient's record is still hidden: the same stack behind the listener.
    let resp = https_client(&ca)
        .get(format!("{base}/Patient/p2"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);

    // HTTP/2 through ALPN.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.cert.der().to_vec(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let req = http::Request::get(format!("{base}/Patient/p1"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["id"], "p1");

    // Plain HTTP is not served on the HTTPS listener.
    let plain = support::http_client()
        .get(format!("http://127.0.0.1:{}/demo/metadata", proxy.port))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()),
        "plain HTTP answered on the HTTPS listener"
    );

    // A client that does not trust the test CA refuses the proxy.
    let untrusting = support::http_client()
        .get(format!("{base}/metadata"))
        .send()
        .await;
    assert!(untrusting.is_err(), "{untrusting:?}");

    let closed = tokio::task::spawn_blocking(move || silent.join().unwrap())
        .await
        .unwrap();
    assert_eq!(closed, Ok(()));
}

/// Waits, bounded, until `done` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} did not happen");
}

#[tokio::test]
async fn replaced_certificate_files_are_served_without_a_restart() {
    let ca = TestCa::new("test ca");
    let first = ca.server(1);
    let dir = tempfile::tempdir().unwrap();
    let proxy = https_proxy(dir.path(), &first);
    let url = format!("{}/.well-known/smart-configuration", https_base(&proxy));
    let pid = proxy.pid();
    assert_eq!(
        served_certificate(&ca, &url).await,
        (200, first.der.clone())
    );

    // The new certificate lands first, its key later: the mismatched pair is refused
    // and the old one stays served.
    let second = ca.server(2);
    write(dir.path(), "server.pem", &second.cert_pem);
    eventually("the refusal of a mismatched pair", || async {
        proxy.log().contains("tls certificate reload refused")
    })
    .await;
    assert_eq!(
        served_certificate(&ca, &url).await,
        (200, first.der.clone())
    );

    // Then the key: the new certificate (serial 2) is served on new connections.
    write(dir.path(), "server-key.pem", &second.key_pem);
    eventually("the new certificate being served", || async {
        served_certificate(&ca, &url).await == (200, second.der.clone())
    })
    .await;
    assert!(proxy.log().contains("tls certificate reloaded"));
    assert_ne!(first.der, second.der);

    // SIGHUP re-reads the files at once, like the tenants file.
    let third = ca.server(3);
    write(dir.path(), "server-key.pem", &third.key_pem);
    write(dir.path(), "server.pem", &third.cert_pem);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the third certificate being served", || async {
        served_certificate(&ca, &url).await == (200, third.der.clone())
    })
    .await;
    assert_eq!(proxy.pid(), pid, "the same process throughout");
}

#[test]
fn a_key_of_another_certificate_is_refused_at_start_up() {
    let ca = TestCa::new("test ca");
    let (a, b) = (ca.server(1), ca.server(2));
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "c.pem", &a.cert_pem);
    let key = write(dir.path(), "k.pem", &b.key_pem);
    let tenants_file = dir.path().join("tenants.json");
    let example = support::repo_root().join("tenants.example.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(example).unwrap()).unwrap();
    let demo = v["tenants"]["demo"].clone();
    v["tenants"] = json!({ "demo": demo });
    std::fs::write(&tenants_file, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
        .arg("--tenants")
        .arg(&tenants_file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("does not belong to the certificate"),
        "{text}"
    );
    // Both or neither.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
        .arg("--tenants")
        .arg(&tenants_file)
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

// -------------------------------------------------------------------------------------
// client certificates towards the upstream and OpenFGA

/// What the relay saw of one connection.
#[derive(Clone, Debug)]
enum Seen {
    /// The handshake succeeded with this client certificate (DER).
    Client(Vec<u8>),
    /// The handshake failed (no or an untrusted client certificate).
    Refused(String),
}

/// A TLS server that requires a client certificate of `client_ca` and relays the
/// decrypted bytes to `target` (plain HTTP: the real HAPI or OpenFGA server).
struct MtlsRelay {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MtlsRelay {
    async fn start(server: &Issued, client_ca: &TestCa, target: SocketAddr) -> MtlsRelay {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                client_ca.cert.der().to_vec(),
            ))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .unwrap();
        use rustls::pki_types::pem::PemObject;
        let chain = vec![
            rustls::pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap(),
        ];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, record) = (acceptor.clone(), Arc::clone(&record));
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            record.lock().unwrap().push(Seen::Refused(e.to_string()));
                            return;
                        }
                    };
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec())
                        .unwrap_or_default();
                    record.lock().unwrap().push(Seen::Client(client));
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        MtlsRelay { port, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MtlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn file(dir: &Path, name: &str, text: &str) -> String {
    write(dir, name, text).display().to_string()
}

#[tokio::test]
async fn the_upstream_connection_presents_the_client_certificate() {
    let upstream_ca = TestCa::new("upstream ca");
    let client_ca = TestCa::new("client ca");
    let relay_cert = upstream_ca.server(1);
    let client = client_ca.client("smart-fhir-proxy");
    let stranger = TestCa::new("stranger ca").client("smart-fhir-proxy");
    let fhir = support::fhir_server();
    let relay = MtlsRelay::start(
        &relay_cert,
        &client_ca,
        SocketAddr::from(([127, 0, 0, 1], fhir.port())),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(dir.path(), "upstream-ca.pem", &upstream_ca.pem());
    let cert_file = file(dir.path(), "client.pem", &client.cert_pem);
    let key_file = file(dir.path(), "client-key.pem", &client.key_pem);
    let other_cert = file(dir.path(), "stranger.pem", &stranger.cert_pem);
    let other_key = file(dir.path(), "stranger-key.pem", &stranger.key_pem);
    let upstream = format!("https://127.0.0.1:{}/fhir", relay.port);
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        let with_tls = |id: &str, tls: Value| {
            let mut t = tenant(id, port, &upstream, issuer);
            if !tls.is_null() {
                t["upstream"]["tls"] = tls;
            }
            (id.to_owned(), t)
        };
        let list = [
            with_tls(
                "mtls",
                json!({"ca_file": ca_file, "client_cert_file": cert_file, "client_key_file": key_file}),
            ),
            with_tls("no-cert", json!({"ca_file": ca_file})),
            with_tls(
                "stranger",
                json!({"ca_file": ca_file, "client_cert_file": other_cert, "client_key_file": other_key}),
            ),
            // The system's roots do not know the test CA.
            with_tls("system-roots", Value::Null),
        ];
        tenants(list.iter().map(|(k, v)| (k.as_str(), v.clone())).collect())
    });

    let read = |tenant: &'static str| {
        let base = proxy.base(tenant);
        async move {
            let token = support::token("patient-p1", "patient/Patient.rs", &base).await;
            let resp = support::http_client()
                .get(format!("{base}/Patient/p1"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let (status, body) = read("mtls").await;
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    assert_eq!(body["id"], "p1");
    let presented: Vec<Vec<u8>> = relay
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Client(der) => Some(der),
            Seen::Refused(_) => None,
        })
        .collect();
    assert!(!presented.is_empty());
    assert!(
        presented.iter().all(|der| *der == client.der),
        "the relay saw another certificate than the configured one"
    );

    // Without a certificate, or with one of another CA, the relay refuses the
    // handshake; with the system's roots the proxy refuses the relay's certificate.
    for (tenant, refusal) in [
        ("no-cert", "peer sent no certificates"),
        ("stranger", "UnknownIssuer"),
        ("system-roots", "alert"),
    ] {
        let before = relay.seen().len();
        let (status, body) = read(tenant).await;
        assert_eq!(status, 502, "{tenant}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{tenant}: {body}");
        let seen = relay.seen()[before..].to_vec();
        assert!(!seen.is_empty(), "{tenant}: the relay saw no connection");
        for s in &seen {
            match s {
                Seen::Refused(e) => assert!(e.contains(refusal), "{tenant}: {e}"),
                Seen::Client(_) => panic!("{tenant}: a handshake succeeded"),
            }
        }
    }
}

#[tokio::test]
async fn the_openfga_connection_presents_the_client_certificate() {
    let fga_ca = TestCa::new("openfga ca");
    let client_ca = TestCa::new("client ca");
    let client = client_ca.client("smart-fhir-proxy");
    let fga = support::openfga();
    let model: Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("fga-model/model.json")).unwrap(),
    )
    .unwrap();
    let store = fga.create_store(
        "tls-e2e",
        &model,
        &[json!({"user": "user:practitioner-pr1", "relation": "owner", "object": "patient:p1"})],
    );
    let target: SocketAddr = store
        .api_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let relay = MtlsRelay::start(&fga_ca.server(1), &client_ca, target).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(dir.path(), "fga-ca.pem", &fga_ca.pem());
    let cert_file = file(dir.path(), "client.pem", &client.cert_pem);
    let key_file = file(dir.path(), "client-key.pem", &client.key_pem);
    let api_url = format!("https://127.0.0.1:{}", relay.port);
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let proxy = Proxy::start(|port| {
        let fga_tenant = |id: &str, tls: Value| {
            let mut t = tenant(id, port, fhir.base_url(), issuer);
            t["authorization"] = json!({"mode": "openfga", "openfga": {
                "api_url": api_url,
                "store_id": store.store_id,
                "authorization_model_id": store.model_id,
                "timeout_ms": 5000,
                "tls": tls,
            }});
            (id.to_owned(), t)
        };
        let list = [
            fga_tenant(
                "fga-mtls",
                json!({"ca_file": ca_file, "client_cert_file": cert_file, "client_key_file": key_file}),
            ),
            fga_tenant("fga-no-cert", json!({"ca_file": ca_file})),
        ];
        tenants(list.iter().map(|(k, v)| (k.as_str(), v.clone())).collect())
    });
    let read = |tenant: &'static str, path: &'static str| {
        let base = proxy.base(tenant);
        async move {
            let token = support::token("practitioner-pr1", "user/Patient.rs", &base).await;
            let resp = support::http_client()
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // OpenFGA answers through the relay: p1 is allowed, p2 is not.
    let (status, body) = read("fga-mtls", "/Patient/p1").await;
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
    let (status, _) = read("fga-mtls", "/Patient/p2").await;
    assert_eq!(status, 404);
    assert!(
        relay
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Client(der) if *der == client.der))
    );
    // Without the certificate OpenFGA cannot be asked: fail closed.
    let before = relay.seen().len();
    let (status, body) = read("fga-no-cert", "/Patient/p1").await;
    assert_eq!(status, 503, "{body}");
    let seen = relay.seen()[before..].to_vec();
    assert!(!seen.is_empty());
    for s in &seen {
        assert!(
            matches!(s, Seen::Refused(e) if e.contains("peer sent no certificates")),
            "{s:?}"
        );
    }
}

#[test]
fn tls_settings_are_validated_naming_the_key() {
    let ca = TestCa::new("test ca");
    let client = ca.client("c");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = file(dir.path(), "ca.pem", &ca.pem());
    let cert_file = file(dir.path(), "c.pem", &client.cert_pem);
    let key_file = file(dir.path(), "k.pem", &client.key_pem);
    let other_key = file(dir.path(), "other-key.pem", &ca.client("d").key_pem);
    let example = support::repo_root().join("tenants.example.json");
    let base: Value = serde_json::from_slice(&std::fs::read(example).unwrap()).unwrap();
    let cases: Vec<(&str, Value, Value, &str)> = vec![
        (
            "plain http upstream",
            json!("http://127.0.0.1:1/fhir"),
            json!({"ca_file": ca_file}),
            "upstream.base_url",
        ),
        (
            "certificate without key",
            json!("https://up.test/fhir"),
            json!({"client_cert_file": cert_file}),
            "upstream.tls.client_key_file",
        ),
        (
            "empty block",
            json!("https://up.test/fhir"),
            json!({}),
            "upstream.tls",
        ),
        (
            "missing file",
            json!("https://up.test/fhir"),
            json!({"ca_file": dir.path().join("nope.pem")}),
            "upstream.tls.ca_file",
        ),
        (
            "key of another certificate",
            json!("https://up.test/fhir"),
            json!({"ca_file": ca_file, "client_cert_file": cert_file, "client_key_file": other_key}),
            "upstream.tls.client_key_file",
        ),
        (
            "unknown key",
            json!("https://up.test/fhir"),
            json!({"ca_file": ca_file, "verify": false}),
            "verify",
        ),
    ];
    for (what, url, tls, needle) in cases {
        let mut v = base.clone();
        let demo = v["tenants"]["demo"].clone();
        v["tenants"] = json!({ "demo": demo });
        v["tenants"]["demo"]["upstream"]["base_url"] = url;
        v["tenants"]["demo"]["upstream"]["tls"] = tls;
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
            .arg("check-config")
            .arg("--tenants")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{what}: {text}");
        assert!(text.contains(needle), "{what}: `{needle}` not in {text}");
        assert!(!text.contains("PRIVATE KEY"), "{what}: {text}");
    }
    // A good block is accepted.
    let mut v = base;
    let demo = v["tenants"]["demo"].clone();
    v["tenants"] = json!({ "demo": demo });
    v["tenants"]["demo"]["upstream"]["base_url"] = json!("https://up.test/fhir");
    v["tenants"]["demo"]["upstream"]["tls"] =
        json!({"ca_file": ca_file, "client_cert_file": cert_file, "client_key_file": key_file});
    let path = dir.path().join("tenants.json");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
        .arg("check-config")
        .arg("--tenants")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
