//! `seed-openfga`: an admin tool, not a stage of the request pipeline. It prepares an
//! OpenFGA store so the proxy's OpenFGA mode can be tried in minutes against a tenant's
//! real upstream: it writes `fga-model/model.json` as the authorization model, a sample
//! hospital (`organization:hospital` as `parent` of `organization:ward-1..N`, a care team
//! `group:ward-K-team` whose members are `viewer` of each ward, and a hospital-wide
//! `group:hospital-clinicians` whose clinicians are `editor` of the hospital), assigns
//! every Patient of the upstream FHIR server to a ward (patient `i`, in the order the
//! server lists them, to ward `(i mod N) + 1`), and makes a sample user a member of the
//! ward-1 team, so that user may view exactly ward 1's patients.
//!
//! Guarantees:
//! - Nothing is written to OpenFGA before every patient id was read and checked: an
//!   unreachable upstream, a patient count above the bound, a bad id or a next link
//!   outside the FHIR base fails without leaving a half-made store behind. (A given
//!   `--store-id` is looked up first, so a wrong one fails before the upstream is read.)
//! - Next links are followed only under the given FHIR base (same scheme, host, port
//!   and path prefix), so the upstream's bearer token never goes to another host;
//!   redirects are not followed.
//! - Writes are at most [`MAX_TUPLES_PER_WRITE`] tuples each and ignore tuples that
//!   already exist (`on_duplicate: ignore`, OpenFGA 1.10+), so a run against an existing
//!   store (`--store-id`) only adds what is missing. Nothing is ever deleted.
//! - Every HTTP call is bounded by the configured timeout; tokens are never printed.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use url::Url;

use crate::config::Secret;

/// OpenFGA's default `maxTuplesPerWrite`.
pub const MAX_TUPLES_PER_WRITE: usize = 100;
/// Largest response body read from either server.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Longest server-provided text (an OpenFGA `message`, an OperationOutcome diagnostic)
/// repeated in an error.
const MAX_DETAIL_CHARS: usize = 300;

pub const DEFAULT_WARDS: u32 = 3;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const DEFAULT_MAX_PATIENTS: u64 = 100_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Which store to seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// Create a new store with this name.
    Create(String),
    /// Use an existing store, by id.
    Reuse(String),
}

/// Everything `seed-openfga` needs. Secrets are named by environment variable and read
/// when the seed runs, so this struct never holds one.
#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// OpenFGA API URL (`http://127.0.0.1:8080`), without `/stores`.
    pub api_url: Url,
    /// Environment variable holding an OpenFGA pre-shared key (`Authorization: Bearer`).
    pub api_token_env: Option<String>,
    pub store: StoreChoice,
    /// The model in JSON (`fga-model/model.json`).
    pub model_path: PathBuf,
    /// The upstream FHIR R4 base URL.
    pub fhir_base: Url,
    /// Environment variable holding a bearer token for the upstream.
    pub fhir_bearer_env: Option<String>,
    pub wards: u32,
    /// `_count` of the Patient search.
    pub page_size: u32,
    /// More patients than this fails the seed.
    pub max_patients: u64,
    /// Id of the sample user (`alice` -> `user:alice`).
    pub sample_user: String,
    /// Bound on every HTTP call, body included.
    pub timeout: Duration,
}

/// What a successful seed did: printed as JSON by the command.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub store_id: String,
    pub authorization_model_id: String,
    pub wards: u32,
    pub patients_assigned: usize,
    /// The sample principal, `user:<id>`.
    pub sample_user: String,
    /// The tenant's `authorization` block for this store.
    pub tenant_authorization: Value,
}

/// The server an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    OpenFga,
    Fhir,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::OpenFga => "openfga",
            Service::Fhir => "the fhir server",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the model `{path}`: {reason}")]
    Model { path: String, reason: String },
    #[error("{what}: cannot reach {service} at `{url}`: {reason}")]
    Unreachable {
        service: Service,
        what: String,
        url: String,
        reason: String,
    },
    #[error("{what}: {service} answered {status}{detail}")]
    Status {
        service: Service,
        what: String,
        status: http::StatusCode,
        detail: String,
    },
    #[error("{what}: {service} answered with an unusable body: {reason}")]
    Answer {
        service: Service,
        what: String,
        reason: String,
    },
    #[error(
        "the upstream has more than {max} patients (`--max-patients`); nothing was written to openfga"
    )]
    TooManyPatients { max: u64 },
    #[error(
        "refusing to follow the upstream's next link `{link}`: it is not under the fhir base `{base}` (if the server announces another public base, pass that as `--fhir-base`)"
    )]
    ForeignLink { link: String, base: String },
    #[error("{0}")]
    Paging(String),
}

/// One relationship tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TupleKey {
    pub user: String,
    pub relation: String,
    pub object: String,
}

impl TupleKey {
    fn new(user: impl Into<String>, relation: &str, object: impl Into<String>) -> Self {
        TupleKey {
            user: user.into(),
            relation: relation.to_owned(),
            object: object.into(),
        }
    }
}

/// Checks an id used as an OpenFGA object or user id (OpenFGA: `[^:#@\s]{1,254}`).
pub fn check_fga_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 254 {
        return Err(format!("`{id}` must have 1 to 254 characters"));
    }
    if id
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, ':' | '#' | '@' | '*'))
    {
        return Err(format!(
            "`{id}` must not contain whitespace, `:`, `#`, `@` or `*`"
        ));
    }
    Ok(())
}

/// Store ids go into request paths: OpenFGA's are ULIDs, anything else is refused.
fn check_store_id(id: &str) -> Result<(), String> {
    if id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!(
            "store id `{id}` is not an OpenFGA store id (a ULID)"
        ))
    }
}

/// Checks a base URL given on the command line: http(s), no credentials, no query or
/// fragment (so it can be printed and prefixed safely).
pub fn check_base_url(what: &str, url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(format!("{what} `{url}` must be an http or https url"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{what} must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{what} `{url}` must not have a query or fragment"));
    }
    Ok(())
}

/// The URL as given, without trailing slashes (`Url` always prints one for an empty path).
fn trimmed(url: &Url) -> &str {
    url.as_str().trim_end_matches('/')
}

/// Ward of the `index`-th patient (0-based), 1-based.
pub fn ward_of(index: usize, wards: u32) -> u32 {
    let wards = wards.max(1);
    // u32 -> usize never truncates on the platforms tokio supports
    (index % wards as usize) as u32 + 1
}

/// The sample organization: hospital, wards, one care team per ward, the hospital-wide
/// clinicians. Each tuple is valid for `fga-model/model.fga`.
pub fn hierarchy_tuples(wards: u32) -> Vec<TupleKey> {
    let mut tuples = Vec::new();
    for k in 1..=wards {
        let ward = format!("organization:ward-{k}");
        tuples.push(TupleKey::new("organization:hospital", "parent", &ward));
        tuples.push(TupleKey::new(
            format!("group:ward-{k}-team#member"),
            "viewer",
            ward,
        ));
    }
    tuples.push(TupleKey::new(
        "group:hospital-clinicians#clinician",
        "editor",
        "organization:hospital",
    ));
    tuples
}

/// `organization:ward-K assigned_organization patient:<id>` for each patient, in order.
pub fn patient_tuples(patient_ids: &[String], wards: u32) -> Vec<TupleKey> {
    patient_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            TupleKey::new(
                format!("organization:ward-{}", ward_of(i, wards)),
                "assigned_organization",
                format!("patient:{id}"),
            )
        })
        .collect()
}

/// The sample user's membership of the ward-1 care team.
pub fn sample_user_tuple(sample_user: &str) -> TupleKey {
    TupleKey::new(format!("user:{sample_user}"), "member", "group:ward-1-team")
}

/// The tenant `authorization` block pointing at this store.
pub fn tenant_authorization(
    api_url: &Url,
    store_id: &str,
    model_id: &str,
    api_token_env: Option<&str>,
) -> Value {
    let credentials = match api_token_env {
        Some(var) => json!({"method": "api_token", "api_token_env": var}),
        None => json!({"method": "none"}),
    };
    json!({
        "mode": "openfga",
        "openfga": {
            "api_url": trimmed(api_url),
            "store_id": store_id,
            "authorization_model_id": model_id,
            "credentials": credentials,
        }
    })
}

/// Whether `link` is under `base`: same scheme, host and port, and a path equal to the
/// base's or below it (on a segment boundary), without credentials.
pub fn is_under_base(link: &Url, base: &Url) -> bool {
    let base_path = base.path().trim_end_matches('/');
    let path = link.path();
    link.scheme() == base.scheme()
        && link.host_str() == base.host_str()
        && link.port_or_known_default() == base.port_or_known_default()
        && link.username().is_empty()
        && link.password().is_none()
        && (path == base_path
            || path
                .strip_prefix(base_path)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// The `next` link of a searchset Bundle, if any.
pub fn next_link(bundle: &Value) -> Option<&str> {
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
}

/// The ids of the Patients a searchset page matched (included resources are skipped).
pub fn page_patient_ids(bundle: &Value) -> Result<Vec<String>, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("not a Bundle".into());
    }
    let Some(entries) = bundle.get("entry") else {
        return Ok(Vec::new());
    };
    let entries = entries.as_array().ok_or("`entry` is not a list")?;
    let mut ids = Vec::new();
    for entry in entries {
        let mode = entry
            .get("search")
            .and_then(|s| s.get("mode"))
            .and_then(Value::as_str);
        if mode.is_some_and(|m| m != "match") {
            continue;
        }
        let Some(resource) = entry.get("resource") else {
            continue;
        };
        if resource.get("resourceType").and_then(Value::as_str) != Some("Patient") {
            continue;
        }
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .ok_or("a Patient without an id")?;
        if !crate::fhir::ResourceId::is_valid(id) {
            return Err(format!("patient id `{id}` is not a valid FHIR id"));
        }
        ids.push(id.to_owned());
    }
    Ok(ids)
}

/// Reads the environment variable a `*_env` option names.
fn secret_from_env(option: &str, var: &str) -> Result<Secret, SeedError> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim().to_owned())),
        Ok(_) => Err(SeedError::Invalid(format!(
            "`{option} {var}`: the environment variable is empty"
        ))),
        Err(std::env::VarError::NotPresent) => Err(SeedError::Invalid(format!(
            "`{option} {var}`: the environment variable is not set"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(SeedError::Invalid(format!(
            "`{option} {var}`: the environment variable is not valid unicode"
        ))),
    }
}

/// The error chain of a transport error, without the request URL (given separately).
fn transport_reason(e: reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {} ms", timeout.as_millis());
    }
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        e.without_url().to_string()
    } else {
        parts.join(": ")
    }
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// What a non-2xx answer says: OpenFGA's `code`/`message`, or an OperationOutcome's
/// first diagnostics.
fn error_detail(service: Service, body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let text = match service {
        Service::OpenFga => {
            let code = v.get("code").and_then(Value::as_str).unwrap_or_default();
            let message = v.get("message").and_then(Value::as_str).unwrap_or_default();
            match (code.is_empty(), message.is_empty()) {
                (true, true) => return String::new(),
                (false, true) => code.to_owned(),
                (true, false) => message.to_owned(),
                (false, false) => format!("{code}: {message}"),
            }
        }
        Service::Fhir => {
            let issue = v
                .get("issue")
                .and_then(Value::as_array)
                .and_then(|i| i.first());
            match issue
                .and_then(|i| i.get("diagnostics").or_else(|| i.get("code")))
                .and_then(Value::as_str)
            {
                Some(d) => d.to_owned(),
                None => return String::new(),
            }
        }
    };
    format!(": {}", shorten(&text))
}

/// One HTTP client for both servers: no redirects, every call bounded.
struct Http {
    client: reqwest::Client,
    timeout: Duration,
}

impl Http {
    fn new(timeout: Duration) -> Result<Self, SeedError> {
        let client = crate::fetch::control_client()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| SeedError::Invalid(format!("cannot build the http client: {e}")))?;
        Ok(Http { client, timeout })
    }

    /// Sends a request and returns the JSON body of a 2xx answer.
    async fn send(
        &self,
        service: Service,
        what: &str,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, SeedError> {
        let unreachable = |e: reqwest::Error| SeedError::Unreachable {
            service,
            what: what.to_owned(),
            url: url.to_owned(),
            reason: transport_reason(e, self.timeout),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = match crate::fetch::read_capped(response, MAX_BODY_BYTES).await {
            Ok(body) => body,
            Err(crate::fetch::ReadError::Transport(e)) => return Err(unreachable(e)),
            Err(_) => {
                return Err(SeedError::Answer {
                    service,
                    what: what.to_owned(),
                    reason: format!("larger than {MAX_BODY_BYTES} bytes"),
                });
            }
        };
        if !status.is_success() {
            return Err(SeedError::Status {
                service,
                what: what.to_owned(),
                status,
                detail: error_detail(service, &body),
            });
        }
        serde_json::from_slice(&body).map_err(|e| SeedError::Answer {
            service,
            what: what.to_owned(),
            reason: format!("not JSON: {e}"),
        })
    }
}

/// The OpenFGA HTTP API (v1) calls the seed makes.
struct Fga<'a> {
    http: &'a Http,
    api: String,
    token: Option<Secret>,
}

impl Fga<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.api)
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t.expose()),
            None => request,
        }
    }

    async fn post(&self, what: &str, path: &str, body: &Value) -> Result<Value, SeedError> {
        let url = self.url(path);
        let request = self.authorize(self.http.client.post(&url).json(body));
        self.http.send(Service::OpenFga, what, &url, request).await
    }

    async fn get(&self, what: &str, path: &str) -> Result<Value, SeedError> {
        let url = self.url(path);
        let request = self.authorize(self.http.client.get(&url));
        self.http.send(Service::OpenFga, what, &url, request).await
    }

    fn id_from(&self, what: &str, answer: &Value, field: &str) -> Result<String, SeedError> {
        answer
            .get(field)
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| SeedError::Answer {
                service: Service::OpenFga,
                what: what.to_owned(),
                reason: format!("no `{field}`"),
            })
    }

    async fn write(
        &self,
        store_id: &str,
        model_id: &str,
        tuples: &[TupleKey],
    ) -> Result<(), SeedError> {
        for (n, batch) in tuples.chunks(MAX_TUPLES_PER_WRITE).enumerate() {
            let body = json!({
                "writes": {"tuple_keys": batch, "on_duplicate": "ignore"},
                "authorization_model_id": model_id,
            });
            let what = format!("writing tuples (batch {}, {} tuples)", n + 1, batch.len());
            self.post(&what, &format!("stores/{store_id}/write"), &body)
                .await?;
        }
        Ok(())
    }
}

/// Pages through `GET {fhir}/Patient?_count=N&_elements=id`: the patient ids in the
/// order the server lists them, each once.
async fn read_patient_ids(
    http: &Http,
    config: &SeedConfig,
    bearer: Option<&Secret>,
    progress: &mut impl FnMut(String),
) -> Result<Vec<String>, SeedError> {
    let base = &config.fhir_base;
    let mut url = format!(
        "{}/Patient?_count={}&_elements=id",
        trimmed(base),
        config.page_size
    );
    let mut visited = HashSet::new();
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for page in 1usize.. {
        visited.insert(url.clone());
        let mut request = http
            .client
            .get(&url)
            .header(http::header::ACCEPT, "application/fhir+json");
        if let Some(token) = bearer {
            request = request.bearer_auth(token.expose());
        }
        let what = format!("reading patients (page {page})");
        let bundle = http.send(Service::Fhir, &what, &url, request).await?;
        let page_ids = page_patient_ids(&bundle).map_err(|reason| SeedError::Answer {
            service: Service::Fhir,
            what: what.clone(),
            reason,
        })?;
        let before = ids.len();
        for id in page_ids {
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        if ids.len() as u64 > config.max_patients {
            return Err(SeedError::TooManyPatients {
                max: config.max_patients,
            });
        }
        progress(format!("read page {page}: {} patient(s) so far", ids.len()));
        let Some(next) = next_link(&bundle) else {
            break;
        };
        let foreign = || SeedError::ForeignLink {
            link: next.to_owned(),
            base: trimmed(base).to_owned(),
        };
        let next_url = Url::parse(next).map_err(|_| foreign())?;
        if !is_under_base(&next_url, base) {
            return Err(foreign());
        }
        // INVARIANT: every followed page adds a patient, so at most max_patients + 1
        // pages are read, whatever the server answers.
        if ids.len() == before {
            return Err(SeedError::Paging(format!(
                "page {page} of the upstream's patient search has a next link but no new patients; refusing to page on"
            )));
        }
        if visited.contains(next_url.as_str()) {
            return Err(SeedError::Paging(format!(
                "the upstream's next links loop back to `{next_url}`"
            )));
        }
        url = next_url.into();
    }
    Ok(ids)
}

fn read_model(config: &SeedConfig) -> Result<Value, SeedError> {
    let path = config.model_path.display().to_string();
    let text = std::fs::read_to_string(&config.model_path).map_err(|e| SeedError::Model {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let model: Value = serde_json::from_str(&text).map_err(|e| SeedError::Model {
        path: path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    if !model.get("type_definitions").is_some_and(Value::is_array) {
        return Err(SeedError::Model {
            path,
            reason: "no `type_definitions` (the JSON form of the model is needed, as `fga model transform` writes it)".into(),
        });
    }
    Ok(model)
}

fn check_config(config: &SeedConfig) -> Result<(), SeedError> {
    let invalid = SeedError::Invalid;
    check_base_url("the openfga api url", &config.api_url).map_err(invalid)?;
    check_base_url("the fhir base", &config.fhir_base).map_err(invalid)?;
    check_fga_id(&config.sample_user).map_err(|e| invalid(format!("the sample user: {e}")))?;
    match &config.store {
        StoreChoice::Reuse(id) => check_store_id(id).map_err(invalid)?,
        StoreChoice::Create(name) if name.trim().is_empty() => {
            return Err(invalid("the store name must not be empty".into()));
        }
        StoreChoice::Create(_) => {}
    }
    if config.wards == 0 || config.page_size == 0 || config.max_patients == 0 {
        return Err(invalid(
            "wards, page size and max patients must be at least 1".into(),
        ));
    }
    if config.timeout.is_zero() {
        return Err(invalid("the timeout must be positive".into()));
    }
    Ok(())
}

/// Runs the seed. `progress` receives one line per step (the command prints them to
/// stderr).
pub async fn seed(
    config: &SeedConfig,
    mut progress: impl FnMut(String),
) -> Result<SeedReport, SeedError> {
    check_config(config)?;
    let model = read_model(config)?;
    let api_token = config
        .api_token_env
        .as_deref()
        .map(|var| secret_from_env("--api-token-env", var))
        .transpose()?;
    let fhir_bearer = config
        .fhir_bearer_env
        .as_deref()
        .map(|var| secret_from_env("--fhir-bearer-env", var))
        .transpose()?;
    let http = Http::new(config.timeout)?;
    let fga = Fga {
        http: &http,
        api: trimmed(&config.api_url).to_owned(),
        token: api_token,
    };

    if let StoreChoice::Reuse(id) = &config.store {
        fga.get(&format!("looking up store `{id}`"), &format!("stores/{id}"))
            .await?;
        progress(format!("store `{id}` exists"));
    }

    let patient_ids = read_patient_ids(&http, config, fhir_bearer.as_ref(), &mut progress).await?;
    progress(format!(
        "read {} patient(s) from `{}`",
        patient_ids.len(),
        trimmed(&config.fhir_base)
    ));

    let store_id = match &config.store {
        StoreChoice::Reuse(id) => id.clone(),
        StoreChoice::Create(name) => {
            let what = "creating the store";
            let answer = fga.post(what, "stores", &json!({"name": name})).await?;
            let id = fga.id_from(what, &answer, "id")?;
            check_store_id(&id).map_err(|reason| SeedError::Answer {
                service: Service::OpenFga,
                what: what.to_owned(),
                reason,
            })?;
            progress(format!("created store `{name}`: {id}"));
            id
        }
    };

    let what = "writing the authorization model";
    let answer = fga
        .post(
            what,
            &format!("stores/{store_id}/authorization-models"),
            &model,
        )
        .await?;
    let model_id = fga.id_from(what, &answer, "authorization_model_id")?;
    progress(format!("wrote the authorization model: {model_id}"));

    let hierarchy = hierarchy_tuples(config.wards);
    fga.write(&store_id, &model_id, &hierarchy).await?;
    progress(format!(
        "wrote the hospital with {} ward(s) ({} tuples)",
        config.wards,
        hierarchy.len()
    ));

    let assignments = patient_tuples(&patient_ids, config.wards);
    for (n, chunk) in assignments.chunks(MAX_TUPLES_PER_WRITE * 10).enumerate() {
        fga.write(&store_id, &model_id, chunk).await?;
        progress(format!(
            "assigned {} of {} patient(s) to wards",
            (n * MAX_TUPLES_PER_WRITE * 10 + chunk.len()),
            assignments.len()
        ));
    }

    let sample = sample_user_tuple(&config.sample_user);
    fga.write(&store_id, &model_id, std::slice::from_ref(&sample))
        .await?;
    progress(format!(
        "`{}` is a member of `group:ward-1-team` (views ward 1's patients)",
        sample.user
    ));

    Ok(SeedReport {
        tenant_authorization: tenant_authorization(
            &config.api_url,
            &store_id,
            &model_id,
            config.api_token_env.as_deref(),
        ),
        store_id,
        authorization_model_id: model_id,
        wards: config.wards,
        patients_assigned: patient_ids.len(),
        sample_user: sample.user,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn wards_round_robin() {
        let got: Vec<u32> = (0..7).map(|i| ward_of(i, 3)).collect();
        assert_eq!(got, [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(ward_of(5, 1), 1);
    }

    #[test]
    fn tuples_follow_the_model() {
        let t = hierarchy_tuples(2);
        assert_eq!(t.len(), 5);
        assert!(t.contains(&TupleKey::new(
            "organization:hospital",
            "parent",
            "organization:ward-2"
        )));
        assert!(t.contains(&TupleKey::new(
            "group:ward-1-team#member",
            "viewer",
            "organization:ward-1"
        )));
        let p = patient_tuples(&["a".into(), "b".into(), "c".into()], 2);
        assert_eq!(p[2].user, "organization:ward-1");
        assert_eq!(p[1].object, "patient:b");
        assert_eq!(sample_user_tuple("bob").user, "user:bob");
    }

    #[test]
    fn next_links_stay_under_the_base() {
        let base = url("http://127.0.0.1:8080/fhir");
        assert!(is_under_base(
            &url("http://127.0.0.1:8080/fhir/Patient?_offset=2"),
            &base
        ));
        assert!(is_under_base(&url("http://127.0.0.1:8080/fhir?x=1"), &base));
        for foreign in [
            "http://127.0.0.2:8080/fhir/Patient",
            "http://127.0.0.1:8081/fhir/Patient",
            "https://127.0.0.1:8080/fhir/Patient",
            "http://127.0.0.1:8080/fhir2/Patient",
            "http://127.0.0.1:8080/other",
            "http://u:p@127.0.0.1:8080/fhir/Patient",
        ] {
            assert!(!is_under_base(&url(foreign), &base), "{foreign}");
        }
        // a base with a trailing slash means the same
        assert!(is_under_base(
            &url("http://127.0.0.1:8080/fhir/Patient"),
            &url("http://127.0.0.1:8080/fhir/")
        ));
    }

    #[test]
    fn pages_yield_matched_patient_ids() {
        let page = json!({
            "resourceType": "Bundle",
            "link": [{"relation": "self", "url": "s"}, {"relation": "next", "url": "n"}],
            "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "match"}},
                {"resource": {"resourceType": "Patient", "id": "p9"}, "search": {"mode": "include"}},
                {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
                {"resource": {"resourceType": "Patient", "id": "p2"}}
            ]
        });
        assert_eq!(page_patient_ids(&page).unwrap(), ["p1", "p2"]);
        assert_eq!(next_link(&page), Some("n"));
        let bad = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "a b"}}
        ]});
        assert!(page_patient_ids(&bad).is_err());
        assert!(page_patient_ids(&json!({"resourceType": "Patient"})).is_err());
    }

    #[test]
    fn tenant_block_names_the_token_variable_only() {
        let api = url("http://127.0.0.1:9/");
        let none = tenant_authorization(&api, "S", "M", None);
        assert_eq!(none["openfga"]["api_url"], "http://127.0.0.1:9");
        assert_eq!(none["openfga"]["credentials"], json!({"method": "none"}));
        let token = tenant_authorization(&api, "S", "M", Some("FGA_TOKEN"));
        assert_eq!(
            token["openfga"]["credentials"],
            json!({"method": "api_token", "api_token_env": "FGA_TOKEN"})
        );
    }

    #[test]
    fn error_details_come_from_the_body() {
        let fga = error_detail(
            Service::OpenFga,
            br#"{"code":"store_id_not_found","message":"Store ID not found"}"#,
        );
        assert_eq!(fga, ": store_id_not_found: Store ID not found");
        let fhir = error_detail(
            Service::Fhir,
            br#"{"resourceType":"OperationOutcome","issue":[{"code":"security","diagnostics":"no token"}]}"#,
        );
        assert_eq!(fhir, ": no token");
        assert_eq!(error_detail(Service::Fhir, b"<html>"), "");
    }

    #[test]
    fn ids_and_urls_are_checked() {
        assert!(check_fga_id("alice").is_ok());
        assert!(check_fga_id("Practitioner/pr1").is_ok());
        for bad in ["", "a b", "a:b", "a#b"] {
            assert!(check_fga_id(bad).is_err(), "{bad}");
        }
        assert!(check_store_id("01ARZ3NDEKTSV4RRFFQ69G5FAV").is_ok());
        assert!(check_store_id("../x").is_err());
        assert!(check_base_url("x", &url("http://u:p@h/")).is_err());
        assert!(check_base_url("x", &url("http://h/fhir?a=1")).is_err());
        assert!(check_base_url("x", &url("ftp://h/")).is_err());
        assert!(check_base_url("x", &url("https://h/fhir")).is_ok());
    }
}
