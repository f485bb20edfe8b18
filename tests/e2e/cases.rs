//! Data-driven authorization cases: each `tests/cases/*.json` file is an array of cases
//! run in order against tenant `demo` of the shared proxy, with tokens of the shared
//! issuer's clients (see `tests/support/mod.rs`) and the base bundle
//! (`tests/fixtures/README.md`). Every failing case of a file is reported at once.
//!
//! A case:
//!
//! ```json
//! {"description": "p1 cannot read p2's glucose", "client": "patient-p1",
//!  "scope": "patient/Observation.rs",
//!  "request": {"method": "GET", "path": "Observation/obs-p2-glucose", "query": "...",
//!              "form": {"patient": "p2", "_id": ["a", "b"]}},
//!  "expect": {"status": 404, "reason": "resource_not_found",
//!             "ids": ["Observation/obs-p1-glucose"], "ids_exclude": ["..."],
//!             "total": 6, "same_as": "Observation/no-such-observation",
//!             "upstream": ["GET /fhir/Observation?", "&subject=Patient/p1"],
//!             "no_upstream_call": true}}
//! ```
//!
//! - `request.method` is `GET` (default) or `POST`; `path` is relative to the tenant base
//!   and sent byte for byte (no normalization of `..` or `%2F`); `query` is the raw query
//!   string; `form` (POST `_search`) values are a string or a list of strings.
//!   `{fhir_base}` (the upstream base) and `{public_base}` (the tenant's base as clients
//!   see it) are replaced in `query` and `form` values.
//! - `expect.status` is the HTTP status; `reason` the OperationOutcome reason id
//!   (`issue[0].details.coding[0].code`).
//! - `ids` is the exact set of `Type/id` of the Bundle's entries (`match` and `include`;
//!   the upstream's `outcome` warnings do not count), or of the resource itself when the
//!   answer is not a Bundle; none of `ids_exclude` may occur.
//! - `total`: the Bundle's `total`; `null` means it must be absent (entries were dropped).
//! - `same_as`: a GET of this path with the same token gets the same status and body
//!   (a denied record must look exactly like a missing one).
//! - `upstream`: some request the upstream received for this case contains this text
//!   (or each of a list of texts), as logged or percent-decoded; `no_upstream_call`: the upstream received nothing for
//!   this case. The access log is shared by concurrent tests, so a case with either check
//!   gets a unique, result-neutral marker parameter appended to its query
//!   (`_lastUpdated=lt2NNN`, a year far in the future) and only log lines carrying it count.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::harness::{Answer, shared, token};
use crate::support;

const TENANT: &str = "demo";

/// The case files; a test checks that this is every file in `tests/cases/`.
const FILES: [&str; 6] = [
    "reads",
    "searches",
    "includes",
    "compartment-search",
    "leak-attempts",
    "user-and-system",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    client: String,
    scope: String,
    request: CaseRequest,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseRequest {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    form: Option<serde_json::Map<String, Value>>,
}

fn default_method() -> String {
    "GET".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: u16,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    ids_exclude: Vec<String>,
    /// Absent: not checked; `null`: must be absent; a number: must be equal.
    #[serde(default, deserialize_with = "present")]
    total: Option<Option<u64>>,
    #[serde(default)]
    same_as: Option<String>,
    /// One text, or several that must all be in the same request line.
    #[serde(default, deserialize_with = "one_or_many")]
    upstream: Option<Vec<String>>,
    #[serde(default)]
    no_upstream_call: bool,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Texts {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match Texts::deserialize(d)? {
        Texts::One(t) => vec![t],
        Texts::Many(ts) => ts,
    }))
}

/// Distinguishes an explicit `null` from an absent key.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn cases_dir() -> PathBuf {
    support::repo_root().join("tests/cases")
}

fn load(file: &str) -> Vec<Case> {
    let path = cases_dir().join(format!("{file}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Unique per case within the test binary (years 2601..).
fn next_marker() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(2601);
    format!("_lastUpdated=lt{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn substitute(s: &str) -> String {
    s.replace("{fhir_base}", support::fhir_server().base_url())
        .replace("{public_base}", &shared().base(TENANT))
}

/// Sends one request with a verbatim request target (reqwest would normalize `..`).
async fn send(
    method: &str,
    target: &str,
    bearer: &str,
    form: Option<String>,
) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", shared().port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "127.0.0.1")
        .header("accept", "application/fhir+json")
        .header("authorization", format!("Bearer {bearer}"));
    if form.is_some() {
        builder = builder.header("content-type", "application/x-www-form-urlencoded");
    }
    let req = builder
        .body(Full::new(Bytes::from(form.unwrap_or_default())))
        .map_err(|e| format!("bad request target `{target}`: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `Type/id` of every Bundle entry but the upstream's warnings (`search.mode: outcome`),
/// or of the resource itself.
fn ids_of(body: &Value) -> Vec<String> {
    let id = |r: &Value| {
        format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap_or("?"),
            r["id"].as_str().unwrap_or("?")
        )
    };
    if body["resourceType"] == "Bundle" {
        body["entry"]
            .as_array()
            .map(|es| {
                es.iter()
                    .filter(|e| e["search"]["mode"] != "outcome")
                    .map(|e| id(&e["resource"]))
                    .collect()
            })
            .unwrap_or_default()
    } else if body.is_object() {
        vec![id(body)]
    } else {
        Vec::new()
    }
}

fn reason_of(body: &Value) -> Option<&str> {
    (body["resourceType"] == "OperationOutcome")
        .then(|| body["issue"][0]["details"]["coding"][0]["code"].as_str())
        .flatten()
}

fn decoded(line: &str) -> String {
    percent_encoding::percent_decode_str(&line.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Upstream log lines carrying `marker`, waiting briefly for the log when `want` is set.
async fn upstream_lines(marker: &str, want: bool) -> Vec<String> {
    for _ in 0..10 {
        let lines: Vec<String> = support::fhir_server()
            .requests()
            .into_iter()
            .filter(|l| l.contains(marker))
            .collect();
        if !lines.is_empty() || !want {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Vec::new()
}

struct Runner {
    tokens: HashMap<(String, String), String>,
}

impl Runner {
    async fn token(&mut self, client: &str, scope: &str) -> String {
        let key = (client.to_owned(), scope.to_owned());
        if let Some(t) = self.tokens.get(&key) {
            return t.clone();
        }
        let t = token(client, scope, TENANT).await;
        self.tokens.insert(key, t.clone());
        t
    }

    /// Runs one case; `Err` lists what did not hold.
    async fn run(&mut self, case: &Case) -> Result<(), String> {
        let bearer = self.token(&case.client, &case.scope).await;
        let expect = &case.expect;
        let marker = (expect.upstream.is_some() || expect.no_upstream_call).then(next_marker);
        let mut query: Vec<String> = case.request.query.iter().map(|q| substitute(q)).collect();
        query.extend(marker.clone());
        let mut target = format!("/{TENANT}/{}", case.request.path);
        if !query.is_empty() {
            target = format!("{target}?{}", query.join("&"));
        }
        let form = case.request.form.as_ref().map(|f| {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in f {
                match v {
                    Value::Array(items) => {
                        for item in items {
                            ser.append_pair(k, &substitute(item.as_str().unwrap_or_default()));
                        }
                    }
                    other => {
                        ser.append_pair(k, &substitute(other.as_str().unwrap_or_default()));
                    }
                }
            }
            ser.finish()
        });
        let answer = send(&case.request.method, &target, &bearer, form).await?;
        let body: Value = serde_json::from_str(&answer.text).unwrap_or(Value::Null);
        let ids = ids_of(&body);
        let mut problems = Vec::new();

        if answer.status != expect.status {
            problems.push(format!(
                "status {} (expected {})",
                answer.status, expect.status
            ));
        }
        if let Some(reason) = &expect.reason
            && reason_of(&body) != Some(reason.as_str())
        {
            problems.push(format!(
                "reason {:?} (expected `{reason}`)",
                reason_of(&body)
            ));
        }
        if let Some(want) = &expect.ids {
            let mut got = ids.clone();
            got.sort();
            got.dedup();
            let mut want = want.clone();
            want.sort();
            if got != want || got.len() != ids.len() {
                let missing: Vec<_> = want.iter().filter(|i| !got.contains(i)).collect();
                let extra: Vec<_> = got.iter().filter(|i| !want.contains(i)).collect();
                problems.push(format!(
                    "ids differ: missing {missing:?}, unexpected {extra:?}{}",
                    if got.len() == ids.len() {
                        String::new()
                    } else {
                        ", with duplicates".to_owned()
                    }
                ));
            }
        }
        let leaked: Vec<_> = ids
            .iter()
            .filter(|i| expect.ids_exclude.contains(i))
            .collect();
        if !leaked.is_empty() {
            problems.push(format!("excluded ids present: {leaked:?}"));
        }
        if let Some(total) = expect.total {
            let got = body.get("total").and_then(Value::as_u64);
            if got != total {
                problems.push(format!("total {got:?} (expected {total:?})"));
            }
        }
        if let Some(other) = &expect.same_as {
            let twin = send("GET", &format!("/{TENANT}/{other}"), &bearer, None).await?;
            if (twin.status, &twin.text) != (answer.status, &answer.text) {
                problems.push(format!(
                    "differs from `{other}`: {} {}",
                    twin.status, twin.text
                ));
            }
        }
        let mut seen = Vec::new();
        if let Some(marker) = &marker {
            seen = upstream_lines(marker, expect.upstream.is_some()).await;
            if expect.no_upstream_call && !seen.is_empty() {
                problems.push(format!("the upstream was called: {seen:?}"));
            }
            if let Some(want) = &expect.upstream
                && !seen.iter().any(|l| {
                    let d = decoded(l);
                    want.iter()
                        .all(|w| l.contains(w.as_str()) || d.contains(w.as_str()))
                })
            {
                problems.push(format!("no upstream request contains all of {want:?}"));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let excerpt: String = answer.text.chars().take(600).collect();
        Err(format!(
            "{}\n    request: {} {target} (client `{}`, scope `{}`)\n    \
             answer: {} reason={:?} ids={ids:?}\n    upstream: {seen:?}\n    body: {excerpt}",
            problems.join("; "),
            case.request.method,
            case.client,
            case.scope,
            answer.status,
            reason_of(&body),
        ))
    }
}

async fn run_file(file: &str) {
    let cases = load(file);
    assert!(!cases.is_empty(), "{file}.json has no cases");
    let mut runner = Runner {
        tokens: HashMap::new(),
    };
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if let Err(e) = runner.run(case).await {
            failures.push(format!("[{file}#{i}] {}: {e}", case.description));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases in {file}.json failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_case_file_is_run() {
    let mut found: Vec<String> = std::fs::read_dir(cases_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
    found.sort();
    let mut known: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    known.sort();
    assert_eq!(
        found, known,
        "add new case files to `FILES` and give them a test"
    );
    for file in FILES {
        let _ = load(file);
    }
}

#[tokio::test]
async fn reads() {
    run_file("reads").await;
}

#[tokio::test]
async fn searches() {
    run_file("searches").await;
}

#[tokio::test]
async fn includes() {
    run_file("includes").await;
}

#[tokio::test]
async fn compartment_search() {
    run_file("compartment-search").await;
}

#[tokio::test]
async fn leak_attempts() {
    run_file("leak-attempts").await;
}

#[tokio::test]
async fn user_and_system() {
    run_file("user-and-system").await;
}
