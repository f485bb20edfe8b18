//! The proxy binary under attack: hostile upstream answers (oversized, deeply nested,
//! huge strings, very many members, another record than asked, redirects), hostile
//! clients (huge scopes and tokens, header floods, slow and idle connections, broken
//! encodings, request smuggling over raw TCP) and hostile JWK Sets.
//!
//! Every case asserts a clear refusal (the status, and the OperationOutcome's reason
//! where the proxy itself answers; hyper's own refusals of unparsable HTTP carry no
//! body), that nothing leaks (no other patient's data, no upstream URL, no token), and
//! afterwards that the process survived: it still answers, its log has no panic, and
//! its resident set grew by less than [`MEMORY_BOUND`]. Upstream faults come from the
//! loopback [`FaultServer`]; tokens from the real issuer, or signed with its real keys.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, Fault, FaultServer, Proxy, Reply, get, now, tenant, tenants};
use crate::support::{self, Alg};

/// How much the proxy's resident set may grow during one attack: a bound, not a
/// measurement, generous enough for allocator noise and the answers a test lets through
/// (16 MiB at most), far below what buffering that grows with the attack would take.
const MEMORY_BOUND: u64 = 200 * 1024 * 1024;

/// The proxy's header timeout (`server::Limits`, not configurable).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy's body timeout for `POST` bodies (`server::Limits`).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest bearer token the proxy reads (`token::MAX_TOKEN_BYTES`).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The JSON reader's nesting limit (`fhir::json::MAX_DEPTH`): like serde_json, it
/// refuses the 128th nested container.
const MAX_DEPTH: usize = 128;

/// A proxy started for one attack, with its resident set before it.
struct Target {
    proxy: Proxy,
    rss_before: u64,
}

impl Target {
    fn start(build: impl FnOnce(u16) -> Value) -> Target {
        let proxy = Proxy::start(build);
        let rss_before = proxy.rss_bytes();
        Target { proxy, rss_before }
    }

    fn port(&self) -> u16 {
        self.proxy.port
    }

    fn base(&self, tenant: &str) -> String {
        self.proxy.base(tenant)
    }

    async fn token(&self, client: &str, scope: &str, tenant: &str) -> String {
        support::token(client, scope, &self.base(tenant)).await
    }

    /// The process still answers, logged no panic, and its memory stayed bounded.
    async fn assert_survived(&self) {
        let health = get(&format!("http://127.0.0.1:{}/_health", self.port()), None).await;
        assert_eq!(health.status, 200, "{}", health.text);
        let log = self.proxy.log();
        assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
        let rss = self.proxy.rss_bytes();
        let grown = rss.saturating_sub(self.rss_before);
        println!(
            "resident set: {} -> {} MiB",
            self.rss_before >> 20,
            rss >> 20
        );
        assert!(
            grown < MEMORY_BOUND,
            "resident set grew by {} MiB ({} -> {} MiB)",
            grown >> 20,
            self.rss_before >> 20,
            rss >> 20
        );
    }
}

/// A tenant `id` of the proxy on `port`, in front of `upstream`.
fn tenant_on(id: &str, port: u16, upstream: &str) -> Value {
    tenant(id, port, upstream, support::issuer())
}

/// At most the first `n` bytes of `s` (fewer, to end on a character), for messages.
fn clip(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Fails if `text` contains any of `secrets`.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !s.is_empty() && !text.contains(s),
            "{what} leaks `{}`: {}",
            clip(s, 80),
            clip(text, 500)
        );
    }
}

/// Status and reason of an answer the proxy made itself.
fn assert_outcome(a: &harness::Answer, status: u16, reason: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", clip(&a.text, 500));
    assert_eq!(a.header("content-type"), "application/fhir+json", "{what}");
    assert_eq!(a.reason(), reason, "{what}: {}", a.text);
}

// ---------------------------------------------------------------------------------------
// raw HTTP

/// One response read off a raw connection.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
}

impl RawAnswer {
    /// The OperationOutcome reason, `None` when the body is no OperationOutcome.
    fn reason(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        (v["resourceType"] == "OperationOutcome").then(|| {
            v["issue"][0]["details"]["coding"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
    }
}

/// What came back on one raw connection.
#[derive(Debug)]
struct Exchange {
    answers: Vec<RawAnswer>,
    /// The proxy closed (or reset) the connection; `false`: it was still open after
    /// the idle wait.
    closed: bool,
}

impl Exchange {
    fn only(&self) -> &RawAnswer {
        assert_eq!(self.answers.len(), 1, "{self:?}");
        &self.answers[0]
    }
}

/// Sends `request` on a fresh connection, writing while it reads (an early answer is
/// not lost), and reads until the proxy closes the connection or sends nothing for
/// `idle`.
async fn exchange(port: u16, request: Vec<u8>, idle: Duration) -> Exchange {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The proxy may refuse and close before it has read everything.
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(60);
    let closed = loop {
        assert!(Instant::now() < deadline, "the exchange did not end");
        match tokio::time::timeout(idle, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    writer.abort();
    Exchange {
        answers: split_responses(&got),
        closed,
    }
}

/// Splits bytes into `content-length`-delimited responses (an incomplete last one is
/// left out).
fn split_responses(mut bytes: &[u8]) -> Vec<RawAnswer> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            })
            .unwrap_or(0);
        let Some(body) = bytes.get(end + 4..end + 4 + len) else {
            break;
        };
        out.push(RawAnswer {
            status,
            head,
            body: String::from_utf8_lossy(body).into_owned(),
        });
        bytes = &bytes[end + 4 + len..];
    }
    out
}

/// A `GET` request head with `extra` header lines (each ending in CRLF).
fn raw_get(target: &[u8], token: &str, extra: &str) -> Vec<u8> {
    let mut r = b"GET ".to_vec();
    r.extend_from_slice(target);
    r.extend_from_slice(
        format!(" HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n{extra}\r\n")
            .as_bytes(),
    );
    r
}

// ---------------------------------------------------------------------------------------
// tokens signed with the issuer's real keys

/// Signs `claims` with a private key in PEM form, naming `kid`.
fn sign(pem: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("at+jwt".into());
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// Signs claims given as JSON text (which need not be what serde_json would write).
fn sign_text(pem: &str, kid: &str, claims: &str) -> String {
    let b64 =
        |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
    let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": kid}).to_string();
    let input = format!("{}.{}", b64(&header), b64(claims));
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap();
    format!("{input}.{signature}")
}

/// Claims of a valid token for patient p1 on `aud`, with `scope`.
fn claims(aud: &str, scope: Value) -> Value {
    json!({
        "iss": support::issuer().url(), "aud": aud, "sub": "adversary", "client_id": "handmade",
        "exp": now() + 300, "iat": now(), "scope": scope, "patient": "p1",
    })
}

/// The issuer's RS256 key: its kid and private key PEM.
fn issuer_key() -> (String, String) {
    let issuer = support::issuer();
    let kid = issuer.kid(Alg::RS256);
    let pem = issuer.private_key_pem(&kid);
    (kid, pem)
}

// ---------------------------------------------------------------------------------------
// fixtures

fn patient(id: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": format!("Family-{id}")}]})
        .to_string()
}

/// A Patient `id` whose JSON text is exactly `len` bytes (a long `note` string).
fn patient_of_len(id: &str, len: usize) -> Vec<u8> {
    let head = format!(r#"{{"resourceType":"Patient","id":"{id}","note":""#);
    let tail = r#""}"#;
    let mut text = head.into_bytes();
    text.resize(len - tail.len(), b'a');
    text.extend_from_slice(tail.as_bytes());
    assert_eq!(text.len(), len);
    text
}

fn observation(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"text": "glucose"}, "subject": {"reference": format!("Patient/{patient}")}})
}

fn searchset(resources: impl IntoIterator<Item = Value>) -> String {
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
        .collect();
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entry}).to_string()
}

/// A route for a read of `Type/id` (the key ends at the request line's space).
fn read_route(path: &str, reply: Reply) -> (String, Reply) {
    (format!("/fhir/{path} "), reply)
}

// ---------------------------------------------------------------------------------------
// hostile upstream answers

#[tokio::test]
async fn oversized_upstream_answers_are_refused_at_the_configured_cap() {
    const MIB: usize = 1024 * 1024;
    let default_cap = 32 * MIB;
    let upstream = FaultServer::start(Fault::Routes(vec![
        read_route("Patient/exact", Reply::fhir(patient_of_len("exact", MIB))),
        read_route("Patient/over", Reply::fhir(patient_of_len("over", MIB + 1))),
        read_route(
            "Patient/declared",
            Reply::fhir(patient_of_len("declared", default_cap + 1)),
        ),
        read_route(
            "Patient/streamed",
            Reply::fhir(patient_of_len("streamed", 48 * MIB)).chunked(),
        ),
    ]));
    let target = Target::start(|port| {
        let mut capped = tenant_on("capped", port, &upstream.base());
        capped["upstream"]["max_response_bytes"] = json!(MIB);
        tenants(vec![
            ("capped", capped),
            ("default", tenant_on("default", port, &upstream.base())),
        ])
    });
    let capped = target.token("backend", "system/Patient.rs", "capped").await;
    let default = target
        .token("backend", "system/Patient.rs", "default")
        .await;
    // Exactly at the cap: released whole.
    let a = get(
        &format!("{}/Patient/exact", target.base("capped")),
        Some(&capped),
    )
    .await;
    assert_eq!(a.status, 200, "{}", clip(&a.text, 300));
    assert_eq!(a.text.len(), MIB);
    // One byte over it, and over the default cap (declared and streamed).
    for (tenant, token, id) in [
        ("capped", &capped, "over"),
        ("default", &default, "declared"),
        ("default", &default, "streamed"),
    ] {
        let a = get(
            &format!("{}/Patient/{id}", target.base(tenant)),
            Some(token),
        )
        .await;
        assert_outcome(&a, 502, "upstream_too_large", id);
        assert_clean(id, &a.text, &[&upstream.base(), "aaaaaaaa"]);
    }
    target.assert_survived().await;
}

#[tokio::test]
async fn deeply_nested_upstream_json_is_refused_past_the_depth_limit() {
    // The resource object is one level, arrays inside it make the rest: 127 levels are
    // read (as by serde_json), 128 are not.
    let nested = |id: &str, arrays: usize, closed: bool| -> Reply {
        let mut text = format!(r#"{{"resourceType":"Patient","id":"{id}","extension":"#);
        text.push_str(&"[".repeat(arrays));
        if closed {
            text.push_str(&"]".repeat(arrays));
            text.push('}');
        }
        Reply::fhir(text)
    };
    let mut deep_entry = r#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},"x":"#.to_owned();
    deep_entry.push_str(&"{\"a\":".repeat(100_000));
    deep_entry.push('1');
    deep_entry.push_str(&"}".repeat(100_000));
    deep_entry.push_str("}}]}");
    let upstream = FaultServer::start(Fault::Routes(vec![
        read_route("Patient/limit", nested("limit", MAX_DEPTH - 2, true)),
        read_route("Patient/beyond", nested("beyond", MAX_DEPTH - 1, true)),
        read_route("Patient/deep", nested("deep", 100_000, true)),
        read_route("Patient/unclosed", nested("unclosed", 100_000, false)),
        ("/fhir/Observation?".to_owned(), Reply::fhir(deep_entry)),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let system = target.token("backend", "system/*.rs", "t").await;
    let p1 = target
        .token("patient-p1", "patient/Observation.rs", "t")
        .await;
    let base = target.base("t");
    let a = get(&format!("{base}/Patient/limit"), Some(&system)).await;
    assert_eq!(a.status, 200, "at the depth limit: {}", a.text);
    assert_eq!(a.json()["id"], "limit");
    for id in ["beyond", "deep", "unclosed"] {
        let a = get(&format!("{base}/Patient/{id}"), Some(&system)).await;
        assert_outcome(&a, 502, "upstream_bad_response", id);
        assert_clean(id, &a.text, &["[[[["]);
    }
    for token in [&system, &p1] {
        let a = get(&format!("{base}/Observation?code=x"), Some(token)).await;
        assert_outcome(&a, 502, "upstream_bad_response", "deep Bundle entry");
        assert_clean("deep Bundle entry", &a.text, &["{\"a\":{\"a\""]);
    }
    target.assert_survived().await;
}

#[tokio::test]
async fn huge_strings_and_very_many_members_are_checked_in_bounded_memory() {
    // A 16 MiB string; 2 million escapes; 300,000 members; a Bundle of 20,000 entries
    // of two patients, one entry with 200,000 members.
    let big_string = patient_of_len("bigstr", 16 * 1024 * 1024);
    let mut escaped = r#"{"resourceType":"Patient","id":"escaped","note":""#.to_owned();
    escaped.push_str(&"\\u00e9".repeat(2_000_000));
    escaped.push_str("\"}");
    let mut wide = r#"{"resourceType":"Patient","id":"wide""#.to_owned();
    for i in 0..300_000 {
        wide.push_str(&format!(r#","m{i}":{i}"#));
    }
    wide.push('}');
    let mut twice = r#"{"resourceType":"Patient","id":"twice""#.to_owned();
    for _ in 0..100_000 {
        twice.push_str(r#","resourceType":"Patient""#);
    }
    twice.push('}');
    let mut wide_entry = observation("wide-entry", "p1");
    for i in 0..200_000 {
        wide_entry[format!("m{i}")] = json!(i);
    }
    let mut resources = vec![wide_entry];
    for i in 0..20_000 {
        let owner = if i % 2 == 0 { "p1" } else { "p2" };
        let mut o = observation(&format!("o{i}"), owner);
        if owner == "p2" {
            o["note"] = json!([{"text": "SECRET-OF-P2"}]);
        }
        resources.push(o);
    }
    let upstream = FaultServer::start(Fault::Routes(vec![
        read_route("Patient/bigstr", Reply::fhir(big_string.clone())),
        read_route("Patient/escaped", Reply::fhir(escaped.clone())),
        read_route("Patient/wide", Reply::fhir(wide.clone())),
        read_route("Patient/twice", Reply::fhir(twice)),
        (
            "/fhir/Observation?".to_owned(),
            Reply::fhir(searchset(resources)),
        ),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let system = target.token("backend", "system/*.rs", "t").await;
    let base = target.base("t");
    for (id, text) in [
        ("bigstr", big_string.as_slice()),
        ("escaped", escaped.as_bytes()),
        ("wide", wide.as_bytes()),
    ] {
        let a = get(&format!("{base}/Patient/{id}"), Some(&system)).await;
        assert_eq!(a.status, 200, "{id}: {}", clip(&a.text, 300));
        assert!(a.text.as_bytes() == text, "{id}: the answer was altered");
    }
    let a = get(&format!("{base}/Patient/twice"), Some(&system)).await;
    assert_outcome(&a, 502, "upstream_bad_response", "resourceType repeated");
    // A patient token sees exactly its own 10,001 records of the 20,001.
    let p1 = target
        .token("patient-p1", "patient/Observation.rs", "t")
        .await;
    let a = get(&format!("{base}/Observation?code=x"), Some(&p1)).await;
    assert_eq!(a.status, 200, "{}", clip(&a.text, 300));
    let v = a.json();
    let entries = v["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 10_001);
    assert!(
        entries
            .iter()
            .all(|e| e["resource"]["subject"]["reference"] == "Patient/p1")
    );
    assert_eq!(entries[0]["resource"]["m199999"], 199_999);
    assert_clean("searchset", &a.text, &["SECRET-OF-P2", "Patient/p2"]);
    target.assert_survived().await;
}

#[tokio::test]
async fn an_upstream_answering_another_resource_than_asked_is_not_released() {
    let secret = |id: &str| {
        json!({"resourceType": "Patient", "id": id, "name": [{"family": format!("SECRET-{id}")}]})
            .to_string()
    };
    let upstream = FaultServer::start(Fault::Routes(vec![
        // Another patient, another type, a Bundle, another patient for a vread, the
        // right id followed by another one (the last counts), and p1 answered with p2.
        read_route("Patient/pa", Reply::fhir(secret("pb"))),
        read_route(
            "Patient/pc",
            Reply::fhir(observation("pc", "pb").to_string()),
        ),
        read_route(
            "Patient/pe",
            Reply::fhir(searchset([json!({"resourceType": "Patient", "id": "pe"})])),
        ),
        read_route("Patient/pd/_history/1", Reply::fhir(secret("pb"))),
        read_route(
            "Patient/pf",
            Reply::fhir(
                r#"{"resourceType":"Patient","id":"pf","name":[{"family":"SECRET-pf"}],"id":"pb"}"#,
            ),
        ),
        read_route("Patient/p1", Reply::fhir(secret("p2"))),
        read_route(
            "Observation/obs-p1",
            Reply::fhir(observation("obs-p2", "p2").to_string()),
        ),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let system = target.token("backend", "system/*.rs", "t").await;
    let p1 = target
        .token(
            "patient-p1",
            "patient/Patient.rs patient/Observation.rs",
            "t",
        )
        .await;
    let base = target.base("t");
    for (token, path) in [
        (&system, "Patient/pa"),
        (&system, "Patient/pc"),
        (&system, "Patient/pe"),
        (&system, "Patient/pd/_history/1"),
        (&system, "Patient/pf"),
        (&system, "Patient/p1"),
        (&p1, "Patient/p1"),
        (&p1, "Observation/obs-p1"),
    ] {
        let a = get(&format!("{base}/{path}"), Some(token)).await;
        assert_outcome(&a, 502, "upstream_wrong_resource", path);
        assert_clean(path, &a.text, &["SECRET", "obs-p2", &upstream.base()]);
    }
    target.assert_survived().await;
}

#[tokio::test]
async fn upstream_redirects_are_not_followed() {
    let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#;
    let redirect = |status: u16, location: &str, body: &str, ct: &str| {
        Reply::new(status, ct, body.to_owned()).header("location", location)
    };
    let upstream = FaultServer::start_with(|up| {
        Fault::Routes(vec![
            read_route(
                "Patient/r1",
                redirect(
                    302,
                    &format!("{up}/Patient/p2"),
                    outcome,
                    "application/fhir+json",
                ),
            ),
            read_route(
                "Patient/r2",
                redirect(
                    301,
                    "http://evil.example/Patient/p2",
                    "<html>moved</html>",
                    "text/html",
                ),
            ),
            read_route(
                "Patient/r3",
                redirect(307, "Patient/p2", "", "application/fhir+json"),
            ),
            read_route(
                "Patient/r4",
                redirect(
                    308,
                    &format!("{up}/Patient/p2"),
                    outcome,
                    "application/fhir+json",
                ),
            ),
            read_route(
                "Patient/p1",
                redirect(
                    302,
                    &format!("{up}/Patient/p2"),
                    outcome,
                    "application/fhir+json",
                ),
            ),
            (
                "/fhir/Observation?".to_owned(),
                redirect(
                    303,
                    &format!("{up}/Observation?subject=Patient/p2"),
                    outcome,
                    "application/fhir+json",
                ),
            ),
            read_route(
                "Patient/p2",
                Reply::fhir(
                    r#"{"resourceType":"Patient","id":"p2","name":[{"family":"SECRET-p2"}]}"#,
                ),
            ),
        ])
    });
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let system = target.token("backend", "system/*.rs", "t").await;
    let p1 = target
        .token(
            "patient-p1",
            "patient/Patient.rs patient/Observation.rs",
            "t",
        )
        .await;
    let base = target.base("t");
    let mut failures = Vec::new();
    // A client that does not follow redirects itself: what the proxy answered.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (who, token, path) in [
        ("system", &system, "Patient/r1"),
        ("system", &system, "Patient/r2"),
        ("system", &system, "Patient/r3"),
        ("system", &system, "Patient/r4"),
        ("system", &system, "Observation?code=x"),
        ("patient", &p1, "Patient/p1"),
        ("patient", &p1, "Observation?code=x"),
    ] {
        let a = harness::answer(client.get(format!("{base}/{path}")).bearer_auth(token)).await;
        let location = a.header("location");
        let ok = a.status == 502
            && a.header("content-type") == "application/fhir+json"
            && a.json()["resourceType"] == "OperationOutcome"
            && location.is_empty();
        if !ok {
            failures.push(format!(
                "{who} {path}: {} location `{location}` {}",
                a.status, a.text
            ));
        }
        assert_clean(path, &a.text, &["SECRET", &upstream.base()]);
        assert_clean(path, &location, &[&upstream.base(), "evil.example"]);
    }
    // Nothing was followed: the upstream never saw a request for p2.
    let seen = upstream.requests.lock().unwrap().join("\n");
    assert!(
        !seen.contains("Patient/p2"),
        "a redirect was followed: {seen}"
    );
    assert!(
        failures.is_empty(),
        "redirects released:\n{}",
        failures.join("\n")
    );
    target.assert_survived().await;
}

// ---------------------------------------------------------------------------------------
// hostile clients

#[tokio::test]
async fn huge_scopes_and_huge_tokens_are_refused_cleanly() {
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Observation/obs-p1",
        Reply::fhir(observation("obs-p1", "p1").to_string()),
    )]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let aud = target.base("t");
    let url = format!("{aud}/Observation/obs-p1");
    let (kid, pem) = issuer_key();
    // A scope string nearly as long as the token cap allows: 500 scopes the proxy does
    // not know, then the one that permits the read.
    let mut many: Vec<String> = (0..500).map(|i| format!("patient/Junk{i}.rs")).collect();
    many.push("patient/Observation.rs".to_owned());
    let t = sign(&pem, &kid, &claims(&aud, json!(many.join(" "))));
    assert!(
        t.len() > MAX_TOKEN_BYTES * 3 / 4 && t.len() <= MAX_TOKEN_BYTES,
        "{}",
        t.len()
    );
    let a = get(&url, Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["id"], "obs-p1");
    // The same as a JSON array.
    let t = sign(&pem, &kid, &claims(&aud, json!(many)));
    assert!(t.len() <= MAX_TOKEN_BYTES, "{}", t.len());
    assert_eq!(get(&url, Some(&t)).await.status, 200);
    // One scope of 10,000 characters grants nothing.
    let giant = format!("patient/Observation.rs{}", "s".repeat(10_000));
    let t = sign(&pem, &kid, &claims(&aud, json!(giant)));
    let a = get(&url, Some(&t)).await;
    assert_outcome(&a, 403, "scope_insufficient", "one giant scope");
    assert_clean(
        "giant scope",
        &format!("{:?} {}", a.headers, a.text),
        &[&giant, &t],
    );
    // Claims nested 5,000 deep in a correctly signed token.
    let deep = claims(&aud, json!("patient/Observation.rs"))
        .to_string()
        .replacen(
            '{',
            &format!("{{\"x\":{}{},", "[".repeat(5_000), "]".repeat(5_000)),
            1,
        );
    let nested = sign_text(&pem, &kid, &deep);
    assert!(nested.len() <= MAX_TOKEN_BYTES, "{}", nested.len());
    let a = get(&url, Some(&nested)).await;
    assert_outcome(&a, 401, "token_malformed", "deeply nested claims");
    // Past the token cap: a validly signed token with a longer scope string, then
    // 100 KB and junk of 1 MB.
    let mut more = many.clone();
    more.extend((0..300).map(|i| format!("patient/More{i}.rs")));
    let over = sign(&pem, &kid, &claims(&aud, json!(more.join(" "))));
    assert!(over.len() > MAX_TOKEN_BYTES);
    let mut huge = many.clone();
    huge.extend((0..5_000).map(|i| format!("patient/Huge{i}.rs")));
    let t100k = sign(&pem, &kid, &claims(&aud, json!(huge.join(" "))));
    assert!(t100k.len() > 100_000, "{}", t100k.len());
    for (what, t) in [("over the cap", &over), ("100 KB", &t100k)] {
        let a = get(&url, Some(t)).await;
        assert_outcome(&a, 400, "token_header_malformed", what);
        assert!(a.header("www-authenticate").contains("invalid_request"));
        assert_clean(
            what,
            &format!("{:?} {}", a.headers, a.text),
            &[t, &t[t.len() - 40..]],
        );
    }
    // 1 MB of header: past what hyper buffers for a request head, refused before the
    // proxy sees it (no body: hyper's own answer).
    let junk = format!("eyJ{}.x.y", "A".repeat(1024 * 1024));
    let x = exchange(
        target.port(),
        raw_get(b"/t/Observation/obs-p1", &junk, ""),
        Duration::from_secs(5),
    )
    .await;
    let a = x.only();
    assert_eq!(a.status, 431, "{a:?}");
    assert_clean(
        "1 MB token",
        &format!("{} {}", a.head, a.body),
        &["AAAAAAAAAAAAAAAA"],
    );
    assert!(x.closed);
    // Nothing of this was logged.
    let log = target.proxy.log();
    assert_clean(
        "the log",
        &log,
        &[
            &t100k[t100k.len() - 40..],
            &over[over.len() - 40..],
            "Junk499",
        ],
    );
    // Only the good tokens reached the upstream, and never a token.
    let seen = upstream.requests.lock().unwrap().join("\n");
    assert_eq!(
        seen.matches("GET /fhir/Observation/obs-p1 ").count(),
        2,
        "{seen}"
    );
    assert!(!seen.to_lowercase().contains("authorization"), "{seen}");
    target.assert_survived().await;
}

#[tokio::test]
async fn header_floods_are_refused_at_the_header_limit() {
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Patient/p1",
        Reply::fhir(patient("p1")),
    )]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let headers = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: {i}\r\n")).collect() };
    let port = target.port();
    let idle = Duration::from_secs(5);
    // `host` and `authorization` and `connection` are three of the 100 allowed headers.
    let with = |extra: String| {
        raw_get(
            b"/t/Patient/p1",
            &t,
            &format!("connection: close\r\n{extra}"),
        )
    };
    let x = exchange(port, with(headers(97)), idle).await;
    assert_eq!(x.only().status, 200, "100 headers: {x:?}");
    for (what, n) in [("101 headers", 98), ("5,000 headers", 4_997)] {
        let x = exchange(port, with(headers(n)), idle).await;
        assert_eq!(x.only().status, 431, "{what}: {x:?}");
        assert!(x.closed, "{what}");
    }
    // One header of 300 KB is read (within hyper's buffer) and not passed on; one of
    // 1 MB is refused.
    let x = exchange(
        port,
        with(format!("x-junk: {}\r\n", "j".repeat(300 * 1024))),
        idle,
    )
    .await;
    assert_eq!(x.only().status, 200, "300 KB header: {:?}", x.only().head);
    let x = exchange(
        port,
        with(format!("x-junk: {}\r\n", "j".repeat(1024 * 1024))),
        idle,
    )
    .await;
    assert_eq!(x.only().status, 431, "1 MB header");
    assert!(x.closed);
    let seen = upstream.requests.lock().unwrap().join("\n");
    assert_eq!(
        seen.matches("GET /fhir/Patient/p1 ").count(),
        2,
        "{}",
        clip(&seen, 500)
    );
    assert!(
        !seen.contains("x-junk") && !seen.contains("x-h1:"),
        "client headers forwarded"
    );
    target.assert_survived().await;
}

/// A client's raw connection kept open on purpose, and when the proxy closed it.
async fn wait_closed(mut s: tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Requests of a well-behaved client while `busy` runs: every one must succeed.
async fn serve_others_meanwhile<F: std::future::Future>(
    url: &str,
    token: &str,
    busy: F,
) -> F::Output {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (url, token) = (url.to_owned(), token.to_owned());
    let others = tokio::spawn(async move {
        let mut served = 0;
        loop {
            let a = get(&url, Some(&token)).await;
            assert_eq!(
                a.status, 200,
                "a well-behaved client was not served: {}",
                a.text
            );
            served += 1;
            tokio::select! {
                _ = &mut stop_rx => return served,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    let out = busy.await;
    let _ = stop_tx.send(());
    let served = others.await.unwrap();
    assert!(served >= 2, "only {served} requests of others were served");
    out
}

#[tokio::test]
async fn slowloris_and_idle_connections_are_closed_and_others_are_served() {
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Patient/p1",
        Reply::fhir(patient("p1")),
    )]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let port = target.port();
    let url = format!("{}/Patient/p1", target.base("t"));
    let within = HEADER_TIMEOUT + Duration::from_secs(8);
    let open = |first: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(first).await.unwrap();
        s
    };
    let closed = serve_others_meanwhile(&url, &t, async {
        // Headers trickled one a second (hyper's header timeout), nothing at all,
        // part of the HTTP/2 preface, and the whole preface without a request.
        let trickled = {
            let mut s = open(b"GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\n").await;
            tokio::spawn(async move {
                let started = Instant::now();
                for i in 0..30 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if s.write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return Some(started.elapsed());
                    }
                    let mut buf = [0u8; 64];
                    match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                        _ => {}
                    }
                }
                None
            })
        };
        let silent = [
            &b""[..],
            b"PRI * HTTP/2.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ];
        let mut waits = Vec::new();
        for first in silent {
            let s = open(first).await;
            waits.push(tokio::spawn(wait_closed(s, within)));
        }
        let mut closed = vec![trickled.await.unwrap()];
        for w in waits {
            closed.push(w.await.unwrap());
        }
        closed
    })
    .await;
    for (what, when) in [
        "trickled headers",
        "nothing",
        "part of the HTTP/2 preface",
        "HTTP/2 preface only",
    ]
    .iter()
    .zip(&closed)
    {
        assert!(when.is_some(), "{what}: the connection was never closed");
    }
    target.assert_survived().await;
}

#[tokio::test]
async fn slow_request_bodies_time_out_and_others_are_served() {
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Patient/p1",
        Reply::fhir(patient("p1")),
    )]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let port = target.port();
    let url = format!("{}/Patient/p1", target.base("t"));
    let trickle = |head: String| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // A byte every 500 ms, reading whatever comes back meanwhile.
        while started.elapsed() < BODY_TIMEOUT + Duration::from_secs(10) {
            let _ = s.write_all(b"a").await;
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if split_responses(&got).len() == 1 {
                break;
            }
        }
        (started.elapsed(), split_responses(&got))
    };
    let (post, get_answer) = serve_others_meanwhile(&url, &t, async {
        let post = tokio::spawn(trickle(format!(
            "POST /t/Patient/_search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\n"
        )));
        // A GET body is never waited for.
        let get = tokio::spawn(trickle(format!(
            "GET /t/Patient/p1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-length: 1000\r\n\r\n"
        )));
        (post.await.unwrap(), get.await.unwrap())
    })
    .await;
    let (took, answers) = post;
    assert_eq!(answers.len(), 1, "slow POST body: no answer after {took:?}");
    let a = &answers[0];
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.reason().as_deref(), Some("body_timeout"), "{a:?}");
    assert!(
        took >= BODY_TIMEOUT - Duration::from_secs(1),
        "answered after {took:?}"
    );
    // Refused before the stack, and audited all the same, under its tenant.
    let audit = target.proxy.audit_records();
    assert!(
        audit.iter().any(|r| r["tenant.id"] == "t"
            && r["authz.decision"] == "deny"
            && r["authz.reason"] == "body_timeout"
            && r["http.status"] == 408),
        "{audit:?}"
    );
    let (took, answers) = get_answer;
    assert_eq!(answers.len(), 1, "slow GET body: no answer after {took:?}");
    assert_eq!(answers[0].status, 200, "{:?}", answers[0]);
    assert!(took < BODY_TIMEOUT, "the GET waited for its body: {took:?}");
    target.assert_survived().await;
}

#[tokio::test]
async fn many_idle_connections_do_not_stop_a_normal_request() {
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Patient/p1",
        Reply::fhir(patient("p1")),
    )]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let port = target.port();
    // 500 connections: half send nothing, half the start of a request head.
    let mut held = Vec::new();
    for i in 0..500 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /t/Patient/p1 HTTP/1.1\r\n")
                .await
                .unwrap();
        }
        held.push(s);
    }
    let a = get(&format!("{}/Patient/p1", target.base("t")), Some(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["id"], "p1");
    target.assert_survived().await;
    // And the proxy lets go of them after its header timeout.
    let mut waits = tokio::task::JoinSet::new();
    for s in held {
        waits.spawn(wait_closed(s, HEADER_TIMEOUT + Duration::from_secs(10)));
    }
    let mut open = 0;
    while let Some(closed) = waits.join_next().await {
        if closed.unwrap().is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{open} idle connections were never closed");
}

#[tokio::test]
async fn malformed_encodings_in_paths_and_queries_are_refused_before_forwarding() {
    let empty = r#"{"resourceType":"Bundle","type":"searchset","total":0}"#;
    let upstream = FaultServer::start(Fault::Routes(vec![
        read_route("Patient/p1", Reply::fhir(patient("p1"))),
        ("/fhir/Observation?".to_owned(), Reply::fhir(empty)),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let port = target.port();
    // (request target, the proxy's reason; `None` where hyper refuses the request
    // line itself, without a body)
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"/t/Patient/%", Some("path_percent_encoded")),
        (b"/t/Patient/%zz", Some("path_percent_encoded")),
        (b"/t/Patient/%ff", Some("path_percent_encoded")),
        (b"/t/Patient%2Fp1", Some("path_encoded_slash")),
        (b"/t/Patient/p1%2f..%2fp2", Some("path_encoded_slash")),
        (b"/t/Patient/%c0%af", Some("path_percent_encoded")),
        (b"/t/Patient/%c0%ae%c0%ae/p2", Some("path_percent_encoded")),
        (b"/t/Patient/p1%00", Some("path_percent_encoded")),
        (b"/t/Patient/p1\xc0\xaf", None),
        (b"/t/Patient/\xff", None),
        (b"/t/Patient/p1\x00", None),
        (b"/t/Observation?code=%", Some("param_invalid_encoding")),
        (b"/t/Observation?code=%zz", Some("param_invalid_encoding")),
        (b"/t/Observation?code=%ff", Some("param_invalid_encoding")),
        (
            b"/t/Observation?code=%c0%af",
            Some("param_invalid_encoding"),
        ),
        (
            b"/t/Observation?code=%ed%a0%80",
            Some("param_invalid_encoding"),
        ),
        (
            b"/t/Observation?code=a%00b",
            Some("param_control_character"),
        ),
        (b"/t/Observation?%zz=1", Some("param_invalid_encoding")),
        (b"/t/Observation?code=\xff", None),
    ];
    let mut wrong = Vec::new();
    for (target_bytes, reason) in &cases {
        let x = exchange(
            port,
            raw_get(target_bytes, &t, "connection: close\r\n"),
            Duration::from_secs(5),
        )
        .await;
        let shown = String::from_utf8_lossy(target_bytes)
            .escape_debug()
            .to_string();
        let Some(a) = x.answers.first() else {
            wrong.push(format!("{shown}: no answer"));
            continue;
        };
        if a.status != 400 || a.reason().as_deref() != *reason {
            wrong.push(format!("{shown}: {} {:?} {}", a.status, a.reason(), a.body));
        }
        assert_clean(&shown, &a.body, &[&t, &upstream.base()]);
    }
    assert!(
        wrong.is_empty(),
        "not refused as expected:\n{}",
        wrong.join("\n")
    );
    assert!(
        upstream.requests.lock().unwrap().is_empty(),
        "a refused request reached the upstream: {:?}",
        upstream.requests.lock().unwrap()
    );
    // Control: an encoded slash in a parameter value is data, passed on encoded.
    let x = exchange(
        port,
        raw_get(b"/t/Observation?code=a%2Fb", &t, "connection: close\r\n"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(x.only().status, 200, "{x:?}");
    let seen = upstream.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let line = seen[0].lines().next().unwrap_or_default();
    assert!(
        line.starts_with("GET /fhir/Observation?") && line.contains("code=a%2Fb"),
        "{line}"
    );
    target.assert_survived().await;
}

/// What the proxy must do with a smuggling attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// 400 (with the proxy's reason, or none where hyper refuses), nothing forwarded,
    /// the connection closed.
    Refused(Option<&'static str>),
    /// The first request answered and forwarded once, then the connection closed.
    AnsweredThenClosed,
    /// The first request answered and forwarded once.
    Answered,
}

#[tokio::test]
async fn request_smuggling_attempts_never_reach_the_upstream() {
    let upstream = FaultServer::start(Fault::Routes(vec![
        read_route("Patient/p1", Reply::fhir(patient("p1"))),
        read_route(
            "Patient/p2",
            Reply::fhir(r#"{"resourceType":"Patient","id":"p2","name":[{"family":"SECRET-p2"}]}"#),
        ),
        ("/fhir/Patient ".to_owned(), Reply::fhir(searchset([]))),
        ("/fhir/Patient?".to_owned(), Reply::fhir(searchset([]))),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let t = target.token("backend", "system/*.rs", "t").await;
    let port = target.port();
    let smuggled =
        format!("GET /t/Patient/p2 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\r\n");
    let head = |method: &str, path: &str, extra: &str| {
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n{extra}\r\n")
    };
    let form = "content-type: application/x-www-form-urlencoded\r\n";
    // (what, request, what the proxy must do with it)
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "content-length then transfer-encoding",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head(
                    "GET",
                    "/t/Patient/p1",
                    &format!(
                        "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                        5 + smuggled.len()
                    )
                )
            ),
            Expect::AnsweredThenClosed,
        ),
        (
            "transfer-encoding then content-length, POST",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!(
                        "{form}transfer-encoding: chunked\r\ncontent-length: {}\r\n",
                        5 + smuggled.len()
                    )
                )
            ),
            Expect::AnsweredThenClosed,
        ),
        (
            "two different content-lengths",
            format!(
                "{}{smuggled}",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!(
                        "{form}content-length: 0\r\ncontent-length: {}\r\n",
                        smuggled.len()
                    )
                )
            ),
            Expect::Refused(None),
        ),
        (
            "transfer-encoding: chunked, identity",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!("{form}transfer-encoding: chunked, identity\r\n")
                )
            ),
            Expect::Refused(None),
        ),
        (
            "transfer-encoding with a space before the colon",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!("{form}transfer-encoding : chunked\r\ncontent-length: 5\r\n")
                )
            ),
            Expect::Refused(None),
        ),
        (
            "obsolete line folding",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!(
                        "{form}x-folded: a\r\n transfer-encoding: chunked\r\ncontent-length: 5\r\n"
                    )
                )
            ),
            Expect::Refused(None),
        ),
        (
            "transfer-encoding on HTTP/1.0",
            format!(
                "POST /t/Patient/_search HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {t}\r\n{form}transfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            Expect::Refused(None),
        ),
        (
            "a chunk size that is no number",
            format!(
                "{}zz\r\n{smuggled}\r\n0\r\n\r\n",
                head(
                    "POST",
                    "/t/Patient/_search",
                    &format!("{form}transfer-encoding: chunked\r\n")
                )
            ),
            Expect::Refused(Some("body_malformed")),
        ),
        (
            "a request inside a GET body",
            format!(
                "{}{smuggled}",
                head(
                    "GET",
                    "/t/Patient/p1",
                    &format!("content-length: {}\r\n", smuggled.len())
                )
            ),
            Expect::Answered,
        ),
    ];
    let mut report = Vec::new();
    for (what, request, expect) in cases {
        let before = upstream.requests.lock().unwrap().len();
        let x = exchange(port, request.into_bytes(), Duration::from_secs(2)).await;
        let seen: Vec<String> = upstream.requests.lock().unwrap()[before..].to_vec();
        let statuses: Vec<u16> = x.answers.iter().map(|a| a.status).collect();
        report.push(format!(
            "{what}: answers {statuses:?}, upstream saw {}",
            seen.len()
        ));
        // Never the smuggled request: not upstream, not answered.
        assert!(
            seen.iter().all(|r| !r.contains("Patient/p2")),
            "{what}: smuggled request forwarded: {seen:?}"
        );
        for a in &x.answers {
            assert_clean(what, &a.body, &["SECRET", &t]);
        }
        assert!(
            x.answers.len() <= 1,
            "{what}: a second request was answered: {statuses:?}"
        );
        match (expect, x.answers.first()) {
            (Expect::Refused(reason), Some(a)) => {
                assert_eq!(a.status, 400, "{what}: {x:?}");
                assert_eq!(a.reason().as_deref(), reason, "{what}: {x:?}");
                assert!(seen.is_empty(), "{what}: refused, yet forwarded: {seen:?}");
                assert!(x.closed, "{what}: refused, yet the connection stayed open");
            }
            (Expect::AnsweredThenClosed | Expect::Answered, Some(a)) => {
                assert_eq!(a.status, 200, "{what}: {x:?}");
                assert_eq!(seen.len(), 1, "{what}: {seen:?}");
                if expect == Expect::AnsweredThenClosed {
                    // RFC 9112 6.1: a server that reads such a message by its
                    // transfer coding must close the connection after answering.
                    assert!(x.closed, "{what}: the connection stayed open");
                }
            }
            (_, None) => panic!("{what}: no answer: {x:?}"),
        }
    }
    println!("{}", report.join("\n"));
    target.assert_survived().await;
}

// ---------------------------------------------------------------------------------------
// hostile JWK Sets

/// An RSA public JWK with a modulus of `n_chars` base64url characters.
fn rsa_jwk(kid: &str, n_chars: usize) -> Value {
    let n: String = (0..n_chars)
        .map(|i| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[(i * 7919) % 64]
                as char
        })
        .collect();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"})
}

#[tokio::test]
async fn hostile_jwks_answers_fail_tokens_cleanly() {
    let issuer = support::issuer();
    let published: Value = support::http_client()
        .get(issuer.jwks_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (kid, pem) = issuer_key();
    let real_rsa = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap()
        .clone();
    // Another RSA key under a kid the real key also has (the first one counts).
    let other = support::generate_keys()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "RSA")
        .map(|k| json!({"kty": "RSA", "kid": "dup", "alg": "RS256", "n": k["n"], "e": k["e"]}))
        .unwrap();
    let mut dup_real = real_rsa.clone();
    dup_real["kid"] = json!("dup");
    // A symmetric key (base64url of the HMAC secret used below) in a public key set.
    let oct = json!({"kty": "oct", "kid": "oct", "alg": "HS256",
        "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"});
    let hostile = json!({"keys": [
        {"kty": "XYZ", "kid": "bad-kty", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "not-base64", "alg": "RS256", "n": "!!!*", "e": "AQAB"},
        {"kty": "EC", "kid": "ec-bad-curve", "crv": "P-999", "x": "AA", "y": "AA"},
        rsa_jwk("giant", 150_000),
        other,
        dup_real,
        oct,
        real_rsa,
    ]});
    assert!(hostile.to_string().len() < 256 * 1024);
    // 10,000 keys, 20 MB: sent chunked, and declared.
    let keys: Vec<Value> = (0..10_000)
        .map(|i| rsa_jwk(&format!("k{i}"), 2_000))
        .collect();
    let huge = json!({ "keys": keys }).to_string();
    assert!(huge.len() > 20_000_000, "{}", huge.len());
    let jwks = |reply: Reply| FaultServer::start(Fault::Reply(reply));
    let servers = [
        (
            "hostile",
            jwks(Reply::new(200, "application/json", hostile.to_string())),
        ),
        (
            "streamed",
            jwks(Reply::new(200, "application/json", huge.clone()).chunked()),
        ),
        ("declared", jwks(Reply::new(200, "application/json", huge))),
        (
            "html",
            jwks(Reply::new(
                200,
                "text/html",
                "<html><body>login</body></html>",
            )),
        ),
        (
            "shape",
            jwks(Reply::new(200, "application/json", r#"{"keys": "none"}"#)),
        ),
        (
            "array",
            jwks(Reply::new(200, "application/json", "[1, 2, 3]")),
        ),
        ("stall", FaultServer::start(Fault::Stall)),
    ];
    let upstream = FaultServer::start(Fault::Routes(vec![read_route(
        "Patient/p1",
        Reply::fhir(patient("p1")),
    )]));
    let target = Target::start(|port| {
        tenants(
            servers
                .iter()
                .map(|(id, server)| {
                    let mut t = tenant_on(id, port, &upstream.base());
                    t["token"]["jwks_uri"] =
                        json!(format!("http://127.0.0.1:{}/jwks", server.port));
                    t["token"]["jwks_timeout_ms"] = json!(1000);
                    t["token"]["jwks_min_refresh_seconds"] = json!(1);
                    (*id, t)
                })
                .collect(),
        )
    });
    let token_for = |tenant: &str, kid: &str| {
        sign(
            &pem,
            kid,
            &claims(&target.base(tenant), json!("patient/Patient.rs")),
        )
    };
    let read = |tenant: &str, token: String| {
        let url = format!("{}/Patient/p1", target.base(tenant));
        async move { (get(&url, Some(&token)).await, token) }
    };
    // A set with hostile neighbours: the real key still works.
    let (a, _) = read("hostile", token_for("hostile", &kid)).await;
    assert_eq!(
        a.status, 200,
        "the real key next to hostile ones: {}",
        a.text
    );
    // Tokens naming the hostile keys fail as invalid tokens: keys that cannot be used
    // are not there; the giant modulus and the first of two `dup` keys do not verify.
    for (key, reason) in [
        ("bad-kty", "token_unknown_key"),
        ("not-base64", "token_unknown_key"),
        ("ec-bad-curve", "token_unknown_key"),
        ("oct", "token_unknown_key"),
        ("giant", "token_signature"),
        ("dup", "token_signature"),
    ] {
        let (a, token) = read("hostile", token_for("hostile", key)).await;
        assert_outcome(&a, 401, reason, key);
        assert_clean(key, &format!("{:?} {}", a.headers, a.text), &[&token]);
    }
    // An HMAC token keyed with the set's `oct` key.
    let hs = jsonwebtoken::encode(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("oct".into());
            h
        },
        &claims(&target.base("hostile"), json!("patient/Patient.rs")),
        &EncodingKey::from_secret(b"secret-secret-secret-secret-secret"),
    )
    .unwrap();
    let (a, _) = read("hostile", hs).await;
    assert_outcome(&a, 401, "token_algorithm", "HS256 with the set's oct key");
    // Sets that cannot be used at all: the keys are unavailable.
    for (tenant, _) in servers.iter().skip(1) {
        let (a, _) = read(tenant, token_for(tenant, &kid)).await;
        assert_outcome(&a, 503, "jwks_unavailable", tenant);
        assert!(a.header("www-authenticate").is_empty(), "{tenant}");
    }
    let seen = upstream.requests.lock().unwrap().len();
    assert_eq!(seen, 1, "only the one good token reached the upstream");
    target.assert_survived().await;
}

#[tokio::test]
async fn an_upstream_without_a_capability_statement_gets_no_restricted_search() {
    // The upstream answers searches, but `/metadata` with 404: restricted searches
    // cannot be held to its declared parameters and are refused (502, never the
    // upstream's 404 as if it were the client's); unrestricted ones still work.
    let upstream = FaultServer::start(Fault::Routes(vec![
        (
            "/fhir/metadata".to_owned(),
            Reply::new(404, "text/plain", "no such page"),
        ),
        (
            "/fhir/Observation?".to_owned(),
            Reply::fhir(searchset([observation("obs-p1", "p1")])),
        ),
    ]));
    let target = Target::start(|port| tenants(vec![("t", tenant_on("t", port, &upstream.base()))]));
    let base = target.base("t");
    let p1 = target
        .token("patient-p1", "patient/Observation.rs", "t")
        .await;
    let a = get(&format!("{base}/Observation?code=x"), Some(&p1)).await;
    assert_outcome(&a, 502, "upstream_bad_response", "restricted search");
    assert!(
        !upstream
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("/fhir/Observation")),
        "the search went upstream unchecked"
    );
    let a = get(&format!("{base}/metadata"), None).await;
    assert_outcome(&a, 502, "upstream_bad_response", "discovery");
    let system = target.token("backend", "system/*.rs", "t").await;
    let a = get(&format!("{base}/Observation?code=x"), Some(&system)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    target.assert_survived().await;
}
