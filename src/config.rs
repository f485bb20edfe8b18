//! Configuration: raw serde types for `tenants.json`, validated into domain types.
//!
//! Raw types mirror the file exactly and reject unknown keys; [`validate`] turns them
//! into [`TenantConfig`] values whose fields are already parsed (URLs, algorithms,
//! durations), so no later stage re-checks configuration. Every validation error names
//! the tenant and the key. Environment variables override file values through the
//! `config` crate: `SFP__TENANTS__DEMO__UPSTREAM__BASE_URL=...` (keys are lowercase,
//! path segments separated by `__`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use url::Url;

mod udap;
pub use udap::{
    Community, CommunityIssuer, CommunityKeys, RawCommunity, RawCommunityIssuer, RawUdap,
    RawUdapCertificate, RawUdapMetadata, UdapConfig, UdapMetadata,
};

/// Prefix of environment overrides: `SFP__TENANTS__<id>__<key>__...`.
pub const ENV_PREFIX: &str = "SFP";

/// A secret from the configuration (a client secret, an API key, a shared HMAC key, an
/// upstream credential header): `Debug` and `Display` print `<redacted>`, so no
/// formatted configuration, log line or `check-config` output can carry it, and it has
/// no `Serialize`. The value is reached only through [`Secret::expose`], at the one
/// place it is sent or used.
#[derive(Clone)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that sends or uses it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> std::fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret<String> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{path}`: {message}")]
    Load { path: String, message: String },
    #[error("tenant `{tenant}`: key `{key}`: {message}")]
    Invalid {
        tenant: String,
        key: &'static str,
        message: String,
    },
    #[error("{0}")]
    File(String),
}

// ---------------------------------------------------------------------------------
// Raw types: exactly the file's shape.
// ---------------------------------------------------------------------------------

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub tenants: BTreeMap<String, RawTenant>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub public_base_url: String,
    pub upstream: RawUpstream,
    pub token: RawToken,
    pub smart: RawSmart,
    pub authorization: RawAuthorization,
    /// Cross-origin access for browser SMART apps; absent: no CORS headers at all.
    pub cors: Option<RawCors>,
    /// `Patient/$match`: forwarded or scored by the proxy; absent: the defaults.
    #[serde(default, rename = "match")]
    pub patient_match: RawMatch,
    /// UDAP server metadata and communities; absent: `/.well-known/udap` is 404.
    pub udap: Option<RawUdap>,
}

// ---- Patient $match (`match`) ----
/// `match`: how `Patient/$match` is answered.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub mode: MatchMode,
    #[serde(default)]
    pub input_level: MatchInputLevel,
    pub max_candidates: Option<usize>,
    pub search_count: Option<usize>,
}

/// Who answers `Patient/$match` (`match.mode`).
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MatchMode {
    /// `forward` when the upstream's CapabilityStatement declares Patient `$match`,
    /// else `score`.
    #[default]
    Auto,
    /// The upstream's own `$match` (e.g. HAPI MDM); 501 when it declares none.
    Forward,
    /// The proxy scores candidates it searches for on the upstream.
    Score,
}

/// The least input weight `score` mode accepts (`match.input_level`): the HL7 IDI
/// (Interoperable Digital Identity and Patient Matching) IG's profiles.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MatchInputLevel {
    /// `IDI-Patient`: some identifying element present, no weighting.
    #[serde(rename = "IDI-Patient")]
    Base,
    /// `IDI-Patient-L0`: weighted input of at least 10.
    #[default]
    #[serde(rename = "IDI-Patient-L0")]
    L0,
    /// `IDI-Patient-L1`: weighted input of at least 20.
    #[serde(rename = "IDI-Patient-L1")]
    L1,
}

impl MatchInputLevel {
    /// The profile's name in the IG.
    pub fn name(self) -> &'static str {
        match self {
            MatchInputLevel::Base => "IDI-Patient",
            MatchInputLevel::L0 => "IDI-Patient-L0",
            MatchInputLevel::L1 => "IDI-Patient-L1",
        }
    }

    /// The least weight the profile requires (`IDI-Patient`: none, but one element).
    pub fn min_weight(self) -> u32 {
        match self {
            MatchInputLevel::Base => 0,
            MatchInputLevel::L0 => 10,
            MatchInputLevel::L1 => 20,
        }
    }
}

/// `match`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchConfig {
    pub mode: MatchMode,
    pub input_level: MatchInputLevel,
    /// Most distinct candidates scored per request.
    pub max_candidates: usize,
    /// `_count` of each candidate search (one page, never followed).
    pub search_count: usize,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            mode: MatchMode::Auto,
            input_level: MatchInputLevel::L0,
            max_candidates: 50,
            search_count: 20,
        }
    }
}

fn match_config(m: RawMatch) -> Result<MatchConfig, Bad> {
    let d = MatchConfig::default();
    let max_candidates = m.max_candidates.unwrap_or(d.max_candidates);
    if !(1..=500).contains(&max_candidates) {
        return Err(("match.max_candidates", "must be 1 to 500".into()));
    }
    let search_count = m.search_count.unwrap_or(d.search_count);
    if !(1..=100).contains(&search_count) {
        return Err(("match.search_count", "must be 1 to 100".into()));
    }
    Ok(MatchConfig {
        mode: m.mode,
        input_level: m.input_level,
        max_candidates,
        search_count,
    })
}
// ---- end Patient $match ----

/// `cors`: which browser origins may call the tenant.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Exact origins (`https://app.example`, `http://127.0.0.1:3000`), or `["*"]`.
    pub allowed_origins: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default = "default_cors_max_age")]
    pub max_age_seconds: u64,
    /// Response headers scripts may read, besides the ones always exposed.
    #[serde(default)]
    pub exposed_headers: Vec<String>,
}

/// `upstream.tls`, `authorization.openfga.tls`: the CA to trust instead of the system's
/// roots, and a client certificate to present (mTLS).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTlsClient {
    pub ca_file: Option<std::path::PathBuf>,
    pub client_cert_file: Option<std::path::PathBuf>,
    pub client_key_file: Option<std::path::PathBuf>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub base_url: String,
    #[serde(default)]
    pub auth: RawUpstreamAuth,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_upstream_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    #[serde(default)]
    pub compartment_search: CompartmentSearch,
    pub tls: Option<RawTlsClient>,
}

/// How the upstream is asked for a search inside a compartment
/// (`upstream.compartment_search`).
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CompartmentSearch {
    /// FHIR compartment search, `[Owner]/[id]/[type]?...`, for servers that implement
    /// it (the union of every linking parameter of the CompartmentDefinition).
    Native,
    /// A type search on one linking parameter, `[type]?...&[param]=[Owner]/[id]`
    /// (`_id=[id]` on the owner's own type): works on every FHIR server, HAPI's JPA
    /// server included, which has no compartment search. Records linked to the owner
    /// only through another parameter are not found (they stay readable one by one).
    #[default]
    ByParameter,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum RawUpstreamAuth {
    #[default]
    None,
    /// A static header, e.g. an API key. The value comes from `value` or, better, from
    /// the environment variable named by `value_env`.
    Header {
        name: String,
        value: Option<Secret>,
        value_env: Option<String>,
    },
    /// OAuth2 client credentials against the upstream's own authorization server.
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: Option<Secret>,
        client_secret_env: Option<String>,
        scope: Option<String>,
    },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub issuers: Vec<String>,
    pub jwks_uri: String,
    pub audience: String,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Shared secret for HS256/384/512; only read when an HS algorithm is listed.
    pub hmac_secret_env: Option<String>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_seconds: u64,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_min_refresh_seconds: u64,
    #[serde(default = "default_jwks_timeout_ms")]
    pub jwks_timeout_ms: u64,
    #[serde(default)]
    pub claims: RawClaims,
    pub introspection: Option<RawIntrospection>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawClaims {
    #[serde(default = "default_scope_claim")]
    pub scope: String,
    #[serde(default = "default_patient_claim")]
    pub patient: String,
    #[serde(default = "default_fhir_user_claim")]
    pub fhir_user: String,
    #[serde(default = "default_client_id_claim")]
    pub client_id: String,
}

impl Default for RawClaims {
    fn default() -> Self {
        RawClaims {
            scope: default_scope_claim(),
            patient: default_patient_claim(),
            fhir_user: default_fhir_user_claim(),
            client_id: default_client_id_claim(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawIntrospection {
    pub endpoint: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_secret_env: Option<String>,
    #[serde(default = "default_introspection_cache")]
    pub cache_seconds: u64,
    #[serde(default = "default_jwks_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSmart {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    pub management_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub user_access_brand_bundle: Option<String>,
    #[serde(default = "default_grant_types")]
    pub grant_types_supported: Vec<String>,
    #[serde(default = "default_auth_methods")]
    pub token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default = "default_signing_algs")]
    pub token_endpoint_auth_signing_alg_values_supported: Vec<String>,
    #[serde(default = "default_scopes_supported")]
    pub scopes_supported: Vec<String>,
    #[serde(default = "default_response_types")]
    pub response_types_supported: Vec<String>,
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "snake_case")]
pub enum RawAuthorization {
    Compartment {
        /// Status for a record the token may not see: 404 (default; indistinguishable
        /// from a missing record) or 403.
        #[serde(default = "default_denied_status")]
        denied_read_status: u16,
        /// Non-patient resource types (outside every Patient compartment, e.g.
        /// `Organization`, `Location`, `Medication`) that `patient/` tokens with a
        /// matching scope may read and search wholesale.
        #[serde(default)]
        public_types: Vec<String>,
    },
    /// Fine-grained: `user/` and `system/` access per patient, decided by OpenFGA;
    /// `patient/` scopes keep the token patient's compartment.
    Openfga {
        #[serde(default = "default_denied_status")]
        denied_read_status: u16,
        #[serde(default)]
        public_types: Vec<String>,
        openfga: Box<RawOpenFga>,
    },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawOpenFga {
    pub api_url: String,
    pub store_id: String,
    /// Pinned model: sent with every call, so a model change is a deliberate edit.
    pub authorization_model_id: String,
    #[serde(default)]
    pub credentials: RawFgaCredentials,
    #[serde(default = "default_fga_timeout_ms")]
    pub timeout_ms: u64,
    /// The server's `listObjectsDeadline` (OpenFGA default 3 s).
    #[serde(default = "default_fga_list_deadline_ms")]
    pub list_objects_deadline_ms: u64,
    #[serde(default = "default_fga_cache_ttl")]
    pub cache_ttl_seconds: u64,
    #[serde(default = "default_fga_breaker_failures")]
    pub breaker_failure_threshold: u32,
    #[serde(default = "default_fga_breaker_cool_down_ms")]
    pub breaker_cool_down_ms: u64,
    /// Records that belong to several patients: released if the principal may view
    /// any of them (`any_of`) or only all of them (`all_of`, the default).
    #[serde(default)]
    pub multi_patient_policy: MultiPatientPolicy,
    /// Most patients one principal may be listed with for a search; more fails the
    /// search (never truncated).
    #[serde(default = "default_fga_max_listed")]
    pub max_listed_patients: usize,
    /// Patient ids per upstream search (POST `_search` body); more are searched chunk by
    /// chunk across pages.
    #[serde(default = "default_fga_chunk")]
    pub search_chunk_size: usize,
    pub tls: Option<RawTlsClient>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
pub enum RawFgaCredentials {
    #[default]
    None,
    /// A pre-shared key, sent as `Authorization: Bearer`.
    ApiToken {
        api_token: Option<Secret>,
        api_token_env: Option<String>,
    },
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: Option<Secret>,
        client_secret_env: Option<String>,
        audience: Option<String>,
    },
}

/// How a record that belongs to several patients is decided.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MultiPatientPolicy {
    AnyOf,
    #[default]
    AllOf,
}

fn default_cors_max_age() -> u64 {
    600
}
fn default_fga_timeout_ms() -> u64 {
    2_000
}
fn default_fga_list_deadline_ms() -> u64 {
    3_000
}
fn default_fga_cache_ttl() -> u64 {
    10
}
fn default_fga_breaker_failures() -> u32 {
    5
}
fn default_fga_breaker_cool_down_ms() -> u64 {
    10_000
}
fn default_fga_max_listed() -> usize {
    100_000
}
fn default_fga_chunk() -> usize {
    100
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_upstream_timeout_ms() -> u64 {
    30_000
}
fn default_max_response_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_algorithms() -> Vec<String> {
    ["RS256", "RS384", "ES256", "ES384", "PS256"]
        .map(String::from)
        .to_vec()
}
fn default_leeway() -> u64 {
    30
}
fn default_jwks_cache() -> u64 {
    300
}
fn default_jwks_refresh() -> u64 {
    10
}
fn default_jwks_timeout_ms() -> u64 {
    3_000
}
fn default_introspection_cache() -> u64 {
    30
}
fn default_scope_claim() -> String {
    "scope".into()
}
fn default_patient_claim() -> String {
    "patient".into()
}
fn default_fhir_user_claim() -> String {
    "fhirUser".into()
}
fn default_client_id_claim() -> String {
    "client_id".into()
}
fn default_grant_types() -> Vec<String> {
    ["authorization_code", "client_credentials"]
        .map(String::from)
        .to_vec()
}
fn default_auth_methods() -> Vec<String> {
    ["client_secret_basic", "private_key_jwt"]
        .map(String::from)
        .to_vec()
}
fn default_signing_algs() -> Vec<String> {
    ["RS384", "ES384"].map(String::from).to_vec()
}
fn default_scopes_supported() -> Vec<String> {
    [
        "openid",
        "fhirUser",
        "launch",
        "launch/patient",
        "offline_access",
        "patient/*.rs",
        "user/*.rs",
        "system/*.rs",
    ]
    .map(String::from)
    .to_vec()
}
fn default_response_types() -> Vec<String> {
    vec!["code".into()]
}
fn default_capabilities() -> Vec<String> {
    [
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "context-ehr-patient",
        "context-standalone-patient",
        "sso-openid-connect",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
    ]
    .map(String::from)
    .to_vec()
}
fn default_denied_status() -> u16 {
    404
}

// ---------------------------------------------------------------------------------
// Domain types: validated.
// ---------------------------------------------------------------------------------

/// A tenant's validated configuration.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    /// Public base of this tenant, without trailing slash: `https://proxy/demo`.
    pub public_base: String,
    pub upstream: UpstreamConfig,
    pub token: TokenConfig,
    pub smart: RawSmartOwned,
    pub authorization: AuthorizationConfig,
    pub cors: Option<CorsConfig>,
    /// `Patient/$match` (`match`).
    pub patient_match: MatchConfig,
    pub udap: Option<UdapConfig>,
}

/// A tenant's CORS policy (`cors`), validated: origins in their serialized form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    pub origins: CorsOrigins,
    pub allow_credentials: bool,
    pub max_age_seconds: u64,
    /// Lowercase header names.
    pub exposed_headers: Vec<http::HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `["*"]`: any origin, answered with `*` (never together with credentials).
    Any,
    /// Exact origins, `scheme://host[:port]` as browsers send them.
    List(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Upstream FHIR base, without trailing slash: `http://127.0.0.1:8081/fhir`.
    pub base: String,
    pub base_uri: http::Uri,
    pub auth: UpstreamAuth,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub compartment_search: CompartmentSearch,
    /// The CA and client certificate of the upstream connection (`upstream.tls`).
    pub tls: Option<crate::tls::ClientTls>,
}

#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    None,
    Header {
        name: http::HeaderName,
        /// Marked sensitive, so HTTP/2 never indexes it either.
        value: Secret<http::HeaderValue>,
    },
    ClientCredentials {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub issuers: Vec<String>,
    pub jwks_uri: Url,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub hmac_secret: Option<Secret<Vec<u8>>>,
    pub leeway: Duration,
    pub jwks_cache: Duration,
    pub jwks_min_refresh: Duration,
    pub jwks_timeout: Duration,
    pub claims: ClaimNames,
    pub introspection: Option<IntrospectionConfig>,
}

#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub scope: String,
    pub patient: String,
    pub fhir_user: String,
    pub client_id: String,
}

#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    pub endpoint: Url,
    pub client_id: String,
    pub client_secret: Secret,
    pub cache: Duration,
    pub timeout: Duration,
}

/// SMART discovery fields, kept as configured (all validated as URLs where they are).
#[derive(Debug, Clone)]
pub struct RawSmartOwned {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    pub management_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub user_access_brand_bundle: Option<String>,
    pub grant_types_supported: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub token_endpoint_auth_signing_alg_values_supported: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub response_types_supported: Vec<String>,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum AuthorizationConfig {
    Compartment {
        denied_read_status: http::StatusCode,
        public_types: Vec<crate::fhir::ResourceType>,
    },
    OpenFga {
        denied_read_status: http::StatusCode,
        public_types: Vec<crate::fhir::ResourceType>,
        openfga: Box<OpenFgaConfig>,
    },
}

impl AuthorizationConfig {
    pub fn denied_read_status(&self) -> http::StatusCode {
        match self {
            AuthorizationConfig::Compartment {
                denied_read_status, ..
            }
            | AuthorizationConfig::OpenFga {
                denied_read_status, ..
            } => *denied_read_status,
        }
    }

    pub fn public_types(&self) -> &[crate::fhir::ResourceType] {
        match self {
            AuthorizationConfig::Compartment { public_types, .. }
            | AuthorizationConfig::OpenFga { public_types, .. } => public_types,
        }
    }
}

/// A tenant's OpenFGA store and how it is used.
#[derive(Debug, Clone)]
pub struct OpenFgaConfig {
    pub connection: FgaConnection,
    pub multi_patient_policy: MultiPatientPolicy,
    pub max_listed_patients: usize,
    pub search_chunk_size: usize,
}

/// One tenant's OpenFGA store.
#[derive(Clone, Debug)]
pub struct FgaConnection {
    /// OpenFGA's API URL (`http://host:8080`, or with a path prefix).
    pub api_url: Url,
    pub store_id: String,
    /// Pinned: sent with every request, so a model change is deliberate.
    pub authorization_model_id: String,
    pub credentials: FgaCredentials,
    /// Bound on one call, including reading a whole stream.
    pub timeout: Duration,
    /// How long a decision is reused.
    pub cache_ttl: Duration,
    pub breaker: BreakerSettings,
    /// The server's `listObjectsDeadline`. StreamedListObjects ends silently, like a
    /// finished list, when the server reaches it; a stream that took this long is
    /// therefore not proof of completeness (the client answers it as incomplete).
    pub list_objects_deadline: Duration,
    /// The CA and client certificate of the OpenFGA connection.
    pub tls: Option<crate::tls::ClientTls>,
}

/// How the proxy authenticates to OpenFGA.
#[derive(Clone, Debug)]
pub enum FgaCredentials {
    None,
    /// A pre-shared key, sent as `Authorization: Bearer`.
    ApiToken(Secret),
    /// OAuth 2.0 client credentials; the access token is fetched, cached and renewed.
    ClientCredentials {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        audience: Option<String>,
    },
}

/// When the circuit breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failed calls that open the breaker.
    pub failure_threshold: u32,
    /// Time the breaker stays open before one trial call is let through.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

/// Reads and validates a tenants file, applying `SFP__...` environment overrides.
pub fn load(path: &Path) -> Result<Vec<TenantConfig>, ConfigError> {
    let raw = read_raw(path)?;
    validate(raw)
}

/// A tenant's configuration as written (the file with environment overrides applied),
/// in a canonical form (members sorted): a reload tells an unchanged tenant by it, so
/// only what was edited is rebuilt. It may hold inline secrets, so it formats as
/// `<tenant source>` and is only ever compared.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantSource(String);

impl std::fmt::Debug for TenantSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<tenant source>")
    }
}

impl TenantSource {
    fn of(value: &serde_json::Value) -> Self {
        let mut out = String::new();
        canonical(value, &mut out);
        TenantSource(out)
    }

    /// With the fingerprint of the tenant's UDAP certificates: a certificate replaced in
    /// its file (same path) rebuilds the tenant on reload.
    fn with_udap(mut self, t: &TenantConfig) -> Self {
        if let Some(u) = &t.udap {
            self.0
                .push_str(&format!("\u{0}udap:{:016x}", u.fingerprint()));
        }
        self
    }
}

/// `v` as JSON with every object's members sorted by key.
fn canonical(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// As [`load`], with each tenant's [`TenantSource`] (`None` only if the tenant cannot
/// be found again in the file's tree, which is then treated as a change).
pub fn load_with_sources(
    path: &Path,
) -> Result<Vec<(TenantConfig, Option<TenantSource>)>, ConfigError> {
    let built = read_built(path)?;
    let display = path.display().to_string();
    let tree = built
        .clone()
        .try_deserialize::<serde_json::Value>()
        .map_err(|e| ConfigError::File(format!("`{display}`: {e}")))?;
    let raw = built
        .try_deserialize::<RawFile>()
        .map_err(|e| ConfigError::File(format!("`{display}`: {e}")))?;
    let tenants = validate(raw)?;
    Ok(tenants
        .into_iter()
        .map(|t| {
            let source = tree
                .get("tenants")
                .and_then(|all| all.get(&t.id))
                .map(TenantSource::of)
                .map(|s| s.with_udap(&t));
            (t, source)
        })
        .collect())
}

fn read_raw(path: &Path) -> Result<RawFile, ConfigError> {
    let display = path.display().to_string();
    read_built(path)?
        .try_deserialize::<RawFile>()
        .map_err(|e| ConfigError::File(format!("`{display}`: {e}")))
}

/// The file merged with the environment overrides, not yet deserialized.
fn read_built(path: &Path) -> Result<config::Config, ConfigError> {
    let display = path.display().to_string();
    if !path.is_file() {
        return Err(ConfigError::Load {
            path: display,
            message: "no such file".into(),
        });
    }
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Json))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .map_err(|e| ConfigError::Load {
            path: display,
            message: e.to_string(),
        })
}

/// Validates raw tenants into domain types. Errors name the tenant and key.
pub fn validate(raw: RawFile) -> Result<Vec<TenantConfig>, ConfigError> {
    if raw.tenants.is_empty() {
        return Err(ConfigError::File("no tenants configured".into()));
    }
    raw.tenants
        .into_iter()
        .map(|(id, t)| validate_tenant(id, t))
        .collect()
}

fn validate_tenant(id: String, t: RawTenant) -> Result<TenantConfig, ConfigError> {
    let bad = |key: &'static str, message: String| ConfigError::Invalid {
        tenant: id.clone(),
        key,
        message,
    };
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    // Ids start with a letter or digit; `_`-prefixed paths (`/_health`) are reserved.
    if !id_ok || !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad(
            "id",
            "tenant ids are 1-64 characters of a-z, 0-9, `-` and `_`".into(),
        ));
    }

    let public_base = base_url(&t.public_base_url).map_err(|m| bad("public_base_url", m))?;
    if !public_base.ends_with(&format!("/{id}")) {
        return Err(bad(
            "public_base_url",
            format!("must end with the tenant path `/{id}`"),
        ));
    }

    let up = t.upstream;
    let upstream_base = base_url(&up.base_url).map_err(|m| bad("upstream.base_url", m))?;
    let base_uri: http::Uri = upstream_base
        .parse()
        .map_err(|e| bad("upstream.base_url", format!("{e}")))?;
    let auth = match up.auth {
        RawUpstreamAuth::None => UpstreamAuth::None,
        RawUpstreamAuth::Header {
            name,
            value,
            value_env,
        } => {
            let value = secret(value, value_env).map_err(|m| bad("upstream.auth.value", m))?;
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| bad("upstream.auth.name", e.to_string()))?;
            if name == http::header::HOST || name == http::header::CONTENT_LENGTH {
                return Err(bad("upstream.auth.name", format!("`{name}` cannot be set")));
            }
            let mut value = http::HeaderValue::from_str(value.expose())
                .map_err(|_| bad("upstream.auth.value", "not a valid header value".into()))?;
            value.set_sensitive(true);
            UpstreamAuth::Header {
                name,
                value: Secret(value),
            }
        }
        RawUpstreamAuth::ClientCredentials {
            token_url,
            client_id,
            client_secret,
            client_secret_env,
            scope,
        } => UpstreamAuth::ClientCredentials {
            token_url: http_url(&token_url).map_err(|m| bad("upstream.auth.token_url", m))?,
            client_id,
            client_secret: secret(client_secret, client_secret_env)
                .map_err(|m| bad("upstream.auth.client_secret", m))?,
            scope,
        },
    };
    if up.timeout_ms == 0 || up.connect_timeout_ms == 0 {
        return Err(bad("upstream.timeout_ms", "must be greater than 0".into()));
    }
    if up.max_response_bytes < 1024 {
        return Err(bad(
            "upstream.max_response_bytes",
            "must be at least 1024".into(),
        ));
    }
    let tls = client_tls(up.tls, &upstream_base, &UPSTREAM_TLS).map_err(|(k, m)| bad(k, m))?;
    let upstream = UpstreamConfig {
        base: upstream_base,
        base_uri,
        auth,
        connect_timeout: Duration::from_millis(up.connect_timeout_ms),
        timeout: Duration::from_millis(up.timeout_ms),
        max_response_bytes: up.max_response_bytes,
        compartment_search: up.compartment_search,
        tls,
    };

    let tk = t.token;
    if tk.issuers.is_empty() {
        return Err(bad(
            "token.issuers",
            "at least one issuer is required".into(),
        ));
    }
    if tk.issuers.iter().any(|i| i.trim().is_empty()) {
        return Err(bad("token.issuers", "issuers must not be empty".into()));
    }
    if tk.audience.trim().is_empty() {
        return Err(bad("token.audience", "must not be empty".into()));
    }
    let mut algorithms = Vec::new();
    for a in &tk.algorithms {
        let alg = parse_algorithm(a).ok_or_else(|| {
            bad(
                "token.algorithms",
                format!("`{a}` is not supported (RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256 HS384 HS512)"),
            )
        })?;
        algorithms.push(alg);
    }
    if algorithms.is_empty() {
        return Err(bad(
            "token.algorithms",
            "at least one algorithm is required".into(),
        ));
    }
    let wants_hmac = algorithms
        .iter()
        .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512));
    let hmac_secret = match (&tk.hmac_secret_env, wants_hmac) {
        (Some(var), true) => {
            let v = std::env::var(var).map_err(|_| {
                bad(
                    "token.hmac_secret_env",
                    format!("environment variable `{var}` is not set"),
                )
            })?;
            // RFC 7518 3.2: a key at least as long as the hash output.
            let needed = if algorithms.contains(&Algorithm::HS512) {
                64
            } else if algorithms.contains(&Algorithm::HS384) {
                48
            } else {
                32
            };
            if v.len() < needed {
                return Err(bad(
                    "token.hmac_secret_env",
                    format!(
                        "the shared secret must be at least {needed} bytes for the listed HS algorithms"
                    ),
                ));
            }
            Some(Secret(v.into_bytes()))
        }
        (None, true) => {
            return Err(bad(
                "token.algorithms",
                "HS algorithms need `hmac_secret_env`".into(),
            ));
        }
        (Some(_), false) => {
            return Err(bad(
                "token.hmac_secret_env",
                "set only together with an HS algorithm".into(),
            ));
        }
        (None, false) => None,
    };
    if tk.jwks_cache_seconds == 0 || tk.jwks_cache_seconds > 86_400 {
        return Err(bad("token.jwks_cache_seconds", "must be 1 to 86400".into()));
    }
    if tk.jwks_timeout_ms == 0 || tk.jwks_timeout_ms > 60_000 {
        return Err(bad("token.jwks_timeout_ms", "must be 1 to 60000".into()));
    }
    if tk.jwks_min_refresh_seconds == 0 || tk.jwks_min_refresh_seconds > 3_600 {
        return Err(bad(
            "token.jwks_min_refresh_seconds",
            "must be 1 to 3600 (an unknown `kid` refetches the JWKS at most this often)".into(),
        ));
    }
    if tk.leeway_seconds > 300 {
        return Err(bad("token.leeway_seconds", "must be at most 300".into()));
    }
    for (key, v) in [
        ("token.claims.scope", &tk.claims.scope),
        ("token.claims.patient", &tk.claims.patient),
        ("token.claims.fhir_user", &tk.claims.fhir_user),
        ("token.claims.client_id", &tk.claims.client_id),
    ] {
        if v.is_empty() {
            return Err(bad(key, "must not be empty".into()));
        }
    }
    let introspection = match tk.introspection {
        None => None,
        Some(i) => Some(IntrospectionConfig {
            endpoint: http_url(&i.endpoint).map_err(|m| bad("token.introspection.endpoint", m))?,
            client_id: i.client_id,
            client_secret: secret(i.client_secret, i.client_secret_env)
                .map_err(|m| bad("token.introspection.client_secret", m))?,
            cache: Duration::from_secs(i.cache_seconds),
            timeout: Duration::from_millis(i.timeout_ms.max(1)),
        }),
    };
    let token = TokenConfig {
        issuers: tk.issuers,
        jwks_uri: http_url(&tk.jwks_uri).map_err(|m| bad("token.jwks_uri", m))?,
        audience: tk.audience,
        algorithms,
        hmac_secret,
        leeway: Duration::from_secs(tk.leeway_seconds),
        jwks_cache: Duration::from_secs(tk.jwks_cache_seconds),
        jwks_min_refresh: Duration::from_secs(tk.jwks_min_refresh_seconds),
        jwks_timeout: Duration::from_millis(tk.jwks_timeout_ms),
        claims: ClaimNames {
            scope: tk.claims.scope,
            patient: tk.claims.patient,
            fhir_user: tk.claims.fhir_user,
            client_id: tk.claims.client_id,
        },
        introspection,
    };

    let s = t.smart;
    http_url(&s.authorization_endpoint).map_err(|m| bad("smart.authorization_endpoint", m))?;
    http_url(&s.token_endpoint).map_err(|m| bad("smart.token_endpoint", m))?;
    for (key, v) in [
        ("smart.registration_endpoint", &s.registration_endpoint),
        ("smart.management_endpoint", &s.management_endpoint),
        ("smart.revocation_endpoint", &s.revocation_endpoint),
        ("smart.introspection_endpoint", &s.introspection_endpoint),
        (
            "smart.user_access_brand_bundle",
            &s.user_access_brand_bundle,
        ),
    ] {
        if let Some(v) = v {
            http_url(v).map_err(|m| bad(key, m))?;
        }
    }
    let smart = RawSmartOwned {
        authorization_endpoint: s.authorization_endpoint,
        token_endpoint: s.token_endpoint,
        registration_endpoint: s.registration_endpoint,
        management_endpoint: s.management_endpoint,
        revocation_endpoint: s.revocation_endpoint,
        introspection_endpoint: s.introspection_endpoint,
        user_access_brand_bundle: s.user_access_brand_bundle,
        grant_types_supported: s.grant_types_supported,
        token_endpoint_auth_methods_supported: s.token_endpoint_auth_methods_supported,
        token_endpoint_auth_signing_alg_values_supported: s
            .token_endpoint_auth_signing_alg_values_supported,
        scopes_supported: s.scopes_supported,
        response_types_supported: s.response_types_supported,
        capabilities: s.capabilities,
    };

    let authorization = match t.authorization {
        RawAuthorization::Compartment {
            denied_read_status,
            public_types,
        } => AuthorizationConfig::Compartment {
            denied_read_status: denied_status(denied_read_status).map_err(|(k, m)| bad(k, m))?,
            public_types: public_type_list(&public_types).map_err(|(k, m)| bad(k, m))?,
        },
        RawAuthorization::Openfga {
            denied_read_status,
            public_types,
            openfga,
        } => AuthorizationConfig::OpenFga {
            denied_read_status: denied_status(denied_read_status).map_err(|(k, m)| bad(k, m))?,
            public_types: public_type_list(&public_types).map_err(|(k, m)| bad(k, m))?,
            openfga: Box::new(openfga_config(*openfga).map_err(|(k, m)| bad(k, m))?),
        },
    };

    let cors = t
        .cors
        .map(cors_config)
        .transpose()
        .map_err(|(k, m)| bad(k, m))?;
    let patient_match = match_config(t.patient_match).map_err(|(k, m)| bad(k, m))?;

    let udap = t
        .udap
        .map(|u| udap::udap_config(u, &public_base, &smart, &token.issuers))
        .transpose()
        .map_err(|(k, m)| bad(k, m))?;

    Ok(TenantConfig {
        id,
        public_base,
        upstream,
        token,
        smart,
        authorization,
        cors,
        patient_match,
        udap,
    })
}

/// `cors`: exact origins (or `["*"]` alone, never with credentials), header names.
fn cors_config(c: RawCors) -> Result<CorsConfig, Bad> {
    const KEY: &str = "cors.allowed_origins";
    let origins = if c.allowed_origins.iter().any(|o| o == "*") {
        if c.allowed_origins.len() != 1 {
            return Err((KEY, "`*` must be the only entry".into()));
        }
        if c.allow_credentials {
            return Err((
                KEY,
                "`*` cannot be used with `allow_credentials`: list the origins".into(),
            ));
        }
        CorsOrigins::Any
    } else {
        if c.allowed_origins.is_empty() {
            return Err((KEY, "at least one origin is required".into()));
        }
        let mut list = Vec::with_capacity(c.allowed_origins.len());
        for o in &c.allowed_origins {
            list.push(cors_origin(o).map_err(|m| (KEY, m))?);
        }
        CorsOrigins::List(list)
    };
    if c.max_age_seconds > 86_400 {
        return Err((
            "cors.max_age_seconds",
            format!("`{}` is more than 86400", c.max_age_seconds),
        ));
    }
    let mut exposed_headers = Vec::with_capacity(c.exposed_headers.len());
    for h in &c.exposed_headers {
        let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            (
                "cors.exposed_headers",
                format!("`{h}` is not a header name"),
            )
        })?;
        exposed_headers.push(name);
    }
    Ok(CorsConfig {
        origins,
        allow_credentials: c.allow_credentials,
        max_age_seconds: c.max_age_seconds,
        exposed_headers,
    })
}

/// An origin exactly as a browser serializes it in `Origin`: `scheme://host[:port]`,
/// lowercase, without the scheme's default port, path, query or credentials. `null`
/// (sandboxed documents, `file:` pages) is never an allowed origin.
fn cors_origin(s: &str) -> Result<String, String> {
    let u = Url::parse(s).map_err(|e| format!("`{s}` is not an origin: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("`{s}` is not an http(s) origin"));
    }
    let origin = u.origin().ascii_serialization();
    if origin != s {
        return Err(format!(
            "`{s}` is not an origin as browsers send it (scheme://host[:port], no path or trailing slash, lowercase, no default port); did you mean `{origin}`?"
        ));
    }
    Ok(origin)
}

/// The keys of one `tls` block, for error messages.
struct TlsKeys {
    tls: &'static str,
    ca_file: &'static str,
    client_cert_file: &'static str,
    client_key_file: &'static str,
    url: &'static str,
}

const UPSTREAM_TLS: TlsKeys = TlsKeys {
    tls: "upstream.tls",
    ca_file: "upstream.tls.ca_file",
    client_cert_file: "upstream.tls.client_cert_file",
    client_key_file: "upstream.tls.client_key_file",
    url: "upstream.base_url",
};

const OPENFGA_TLS: TlsKeys = TlsKeys {
    tls: "authorization.openfga.tls",
    ca_file: "authorization.openfga.tls.ca_file",
    client_cert_file: "authorization.openfga.tls.client_cert_file",
    client_key_file: "authorization.openfga.tls.client_key_file",
    url: "authorization.openfga.api_url",
};

/// `upstream.tls` / `authorization.openfga.tls`: the files loaded, for an `https` URL.
fn client_tls(
    raw: Option<RawTlsClient>,
    url: &str,
    keys: &TlsKeys,
) -> Result<Option<crate::tls::ClientTls>, Bad> {
    use crate::tls::{ClientTls, TlsFile};
    let Some(raw) = raw else {
        return Ok(None);
    };
    if !url.starts_with("https://") {
        return Err((keys.url, format!("`{}` needs an `https` URL", keys.tls)));
    }
    let identity = match (&raw.client_cert_file, &raw.client_key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                keys.client_key_file,
                "`client_cert_file` needs a key file".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                keys.client_cert_file,
                "`client_key_file` needs a certificate file".into(),
            ));
        }
    };
    if raw.ca_file.is_none() && identity.is_none() {
        return Err((
            keys.tls,
            "give `ca_file`, a client certificate and key, or both".into(),
        ));
    }
    ClientTls::load(raw.ca_file.as_deref(), identity)
        .map(Some)
        .map_err(|(file, m)| {
            let key = match file {
                TlsFile::Ca => keys.ca_file,
                TlsFile::ClientCert => keys.client_cert_file,
                TlsFile::ClientKey => keys.client_key_file,
            };
            (key, m)
        })
}

type Bad = (&'static str, String);

fn denied_status(code: u16) -> Result<http::StatusCode, Bad> {
    match code {
        403 => Ok(http::StatusCode::FORBIDDEN),
        404 => Ok(http::StatusCode::NOT_FOUND),
        other => Err((
            "authorization.denied_read_status",
            format!("`{other}` is not 403 or 404"),
        )),
    }
}

fn public_type_list(names: &[String]) -> Result<Vec<crate::fhir::ResourceType>, Bad> {
    let mut types = Vec::with_capacity(names.len());
    for name in names {
        let rt = crate::fhir::ResourceType::parse(name).ok_or_else(|| {
            (
                "authorization.public_types",
                format!("`{name}` is not an R4 resource type"),
            )
        })?;
        // Patient data can never be public: it would bypass compartments.
        let non_patient = crate::fhir::CompartmentIndex::official_shared()
            .map(|index| index.is_non_patient_data(rt))
            .unwrap_or(false);
        if !non_patient {
            return Err((
                "authorization.public_types",
                format!(
                    "`{name}` may hold patient data and cannot be public (allowed: {})",
                    crate::fhir::compartment::NON_PATIENT_TYPES.join(", ")
                ),
            ));
        }
        types.push(rt);
    }
    Ok(types)
}

fn openfga_config(o: RawOpenFga) -> Result<OpenFgaConfig, Bad> {
    let api_url = http_url(&o.api_url).map_err(|m| ("authorization.openfga.api_url", m))?;
    if api_url.query().is_some() || api_url.fragment().is_some() {
        return Err((
            "authorization.openfga.api_url",
            format!("`{}` must not have a query or fragment", o.api_url),
        ));
    }
    let id_ok =
        |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !id_ok(&o.store_id) {
        return Err((
            "authorization.openfga.store_id",
            format!("`{}` is not an OpenFGA id (ULID)", o.store_id),
        ));
    }
    if !id_ok(&o.authorization_model_id) {
        return Err((
            "authorization.openfga.authorization_model_id",
            format!("`{}` is not an OpenFGA id (ULID)", o.authorization_model_id),
        ));
    }
    let credentials = match o.credentials {
        RawFgaCredentials::None => FgaCredentials::None,
        RawFgaCredentials::ApiToken {
            api_token,
            api_token_env,
        } => FgaCredentials::ApiToken(
            secret(api_token, api_token_env)
                .map_err(|m| ("authorization.openfga.credentials.api_token", m))?,
        ),
        RawFgaCredentials::ClientCredentials {
            token_url,
            client_id,
            client_secret,
            client_secret_env,
            audience,
        } => FgaCredentials::ClientCredentials {
            token_url: http_url(&token_url)
                .map_err(|m| ("authorization.openfga.credentials.token_url", m))?,
            client_id,
            client_secret: secret(client_secret, client_secret_env)
                .map_err(|m| ("authorization.openfga.credentials.client_secret", m))?,
            audience,
        },
    };
    let ms = |key: &'static str, v: u64, max: u64| {
        if v == 0 || v > max {
            Err((key, format!("`{v}` is not within 1..={max}")))
        } else {
            Ok(Duration::from_millis(v))
        }
    };
    let timeout = ms("authorization.openfga.timeout_ms", o.timeout_ms, 60_000)?;
    let list_objects_deadline = ms(
        "authorization.openfga.list_objects_deadline_ms",
        o.list_objects_deadline_ms,
        600_000,
    )?;
    if o.cache_ttl_seconds > 3_600 {
        return Err((
            "authorization.openfga.cache_ttl_seconds",
            format!("`{}` is more than 3600", o.cache_ttl_seconds),
        ));
    }
    let cool_down = ms(
        "authorization.openfga.breaker_cool_down_ms",
        o.breaker_cool_down_ms,
        600_000,
    )?;
    if o.breaker_failure_threshold == 0 {
        return Err((
            "authorization.openfga.breaker_failure_threshold",
            "must be at least 1".into(),
        ));
    }
    if o.max_listed_patients == 0 || o.max_listed_patients > 10_000_000 {
        return Err((
            "authorization.openfga.max_listed_patients",
            format!("`{}` is not within 1..=10000000", o.max_listed_patients),
        ));
    }
    if o.search_chunk_size == 0 || o.search_chunk_size > 5_000 {
        return Err((
            "authorization.openfga.search_chunk_size",
            format!("`{}` is not within 1..=5000", o.search_chunk_size),
        ));
    }
    let tls = client_tls(o.tls, api_url.as_str(), &OPENFGA_TLS)?;
    Ok(OpenFgaConfig {
        connection: FgaConnection {
            api_url,
            store_id: o.store_id,
            authorization_model_id: o.authorization_model_id,
            credentials,
            timeout,
            cache_ttl: Duration::from_secs(o.cache_ttl_seconds),
            breaker: BreakerSettings {
                failure_threshold: o.breaker_failure_threshold,
                cool_down,
            },
            list_objects_deadline,
            tls,
        },
        multi_patient_policy: o.multi_patient_policy,
        max_listed_patients: o.max_listed_patients,
        search_chunk_size: o.search_chunk_size,
    })
}

fn parse_algorithm(s: &str) -> Option<Algorithm> {
    Some(match s {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        _ => return None,
    })
}

fn http_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("`{s}` must be an http(s) URL with a host"));
    }
    // Not echoed: the URL would carry the secret into logs and `check-config` output.
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "a URL for `{}` must not carry credentials; give secrets through `*_env`",
            u.host_str().unwrap_or_default()
        ));
    }
    Ok(u)
}

/// A base URL: http(s), no query or fragment, no characters that would need escaping
/// inside a JSON string (so byte-level URL rewriting of bodies stays exact). Returned
/// without trailing slash.
fn base_url(s: &str) -> Result<String, String> {
    let u = http_url(s)?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("`{s}` must not have a query or fragment"));
    }
    let out = u.as_str().trim_end_matches('/').to_owned();
    if out.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        return Err(format!("`{s}` contains characters that are not allowed"));
    }
    Ok(out)
}

fn secret(value: Option<Secret>, env: Option<String>) -> Result<Secret, String> {
    match (value, env) {
        (Some(v), None) => Ok(v),
        (None, Some(var)) => std::env::var(&var)
            .map(Secret)
            .map_err(|_| format!("environment variable `{var}` is not set")),
        (Some(_), Some(_)) => Err("give either the value or `*_env`, not both".into()),
        (None, None) => Err("a value or `*_env` is required".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    /// Distinctive values for every secret a tenant can hold.
    const SECRETS: [&str; 6] = [
        "upstream-header-secret-7f3a",
        "upstream-client-secret-9b1e",
        "introspection-secret-4d2c",
        "openfga-api-token-8e5f",
        "openfga-client-secret-1a6b",
        "hmac-shared-secret-0123456789abcdef-0123456789",
    ];

    fn tenant(
        id: &str,
        upstream_auth: serde_json::Value,
        credentials: serde_json::Value,
    ) -> serde_json::Value {
        json!({
            "public_base_url": format!("https://proxy.example/{id}"),
            "upstream": {"base_url": "http://127.0.0.1:8081/fhir", "auth": upstream_auth},
            "token": {
                "issuers": ["https://issuer.example"],
                "jwks_uri": "https://issuer.example/jwks",
                "audience": format!("https://proxy.example/{id}"),
                "introspection": {
                    "endpoint": "https://issuer.example/introspect",
                    "client_id": "proxy",
                    "client_secret": SECRETS[2],
                },
            },
            "smart": {
                "authorization_endpoint": "https://issuer.example/auth",
                "token_endpoint": "https://issuer.example/token",
            },
            "authorization": {
                "mode": "openfga",
                "openfga": {
                    "api_url": "http://127.0.0.1:8082",
                    "store_id": "01JD5Q1X4T3M8N2P6R9S0V7W5Y",
                    "authorization_model_id": "01JD5Q1X4T3M8N2P6R9S0V7W5Z",
                    "credentials": credentials,
                },
            },
        })
    }

    fn raw() -> RawFile {
        serde_json::from_value(json!({"tenants": {
            "a": tenant(
                "a",
                json!({"type": "header", "name": "x-api-key", "value": SECRETS[0]}),
                json!({"method": "api_token", "api_token": SECRETS[3]}),
            ),
            "b": tenant(
                "b",
                json!({"type": "client_credentials", "token_url": "https://idp.example/token",
                       "client_id": "proxy", "client_secret": SECRETS[1]}),
                json!({"method": "client_credentials", "token_url": "https://idp.example/token",
                       "client_id": "proxy", "client_secret": SECRETS[4]}),
            ),
        }}))
        .unwrap()
    }

    #[test]
    fn no_formatted_configuration_shows_a_secret() {
        let shown_raw = format!("{:?}", raw());
        let mut tenants = validate(raw()).unwrap();
        // HS algorithms read their secret from the environment only; set it as
        // validation would.
        tenants[1].token.hmac_secret = Some(Secret::new(SECRETS[5].as_bytes().to_vec()));
        let shown = format!("{tenants:?}");
        let pretty = format!("{tenants:#?}");
        for secret in SECRETS {
            for text in [&shown_raw, &shown, &pretty] {
                assert!(!text.contains(secret), "`{secret}` shown in {text}");
            }
        }
        // Redacted, not missing: the fields are there.
        assert!(shown.contains("client_secret: <redacted>"), "{shown}");
        assert!(shown.contains("ApiToken(<redacted>)"), "{shown}");
        assert!(shown.contains("hmac_secret: Some(<redacted>)"), "{shown}");
        // The values themselves reach the places that send them.
        match &tenants[0].upstream.auth {
            UpstreamAuth::Header { value, .. } => {
                assert_eq!(value.expose(), SECRETS[0]);
                assert!(value.expose().is_sensitive());
            }
            other => panic!("{other:?}"),
        }
        match &tenants[1].upstream.auth {
            UpstreamAuth::ClientCredentials { client_secret, .. } => {
                assert_eq!(client_secret.expose(), SECRETS[1]);
            }
            other => panic!("{other:?}"),
        }
        let intro = tenants[0].token.introspection.as_ref().unwrap();
        assert_eq!(intro.client_secret.expose(), SECRETS[2]);
        assert_eq!(format!("{}", intro.client_secret), "<redacted>");
    }
}
