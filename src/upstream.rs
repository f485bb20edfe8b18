//! The upstream FHIR client: one pooled connection to each tenant's FHIR base, bounded
//! in time (the tenant's connect timeout and exchange timeout) and size, with the
//! tenant's own upstream credentials.
//!
//! An I/O adapter below the stages that read the upstream (discovery, PractitionerRole
//! resolution in authz, forwarding): it sends an [`OutboundRequest`] and returns the
//! whole answer; what the client may see of it is decided by the forwarding stage.
//! Requests are built from scratch (method, rebuilt path, allow-listed headers), so the
//! client's credentials and hop-by-hop headers never reach the upstream. Each carries
//! the request's trace context and request id (`crate::trace`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use moka::future::Cache;

use crate::config::{TenantConfig, UpstreamAuth, UpstreamConfig};
use crate::fhir::OutboundRequest;
use crate::pipeline::FHIR_JSON;
use crate::tenant::Tenant;

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;
type HyperClient = Client<HttpsConnector, Full<Bytes>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream server is unreachable")]
    Unreachable,
    #[error("upstream server timed out")]
    Timeout,
    #[error("upstream answer could not be checked")]
    BadResponse(&'static str),
    #[error("upstream answer is too large")]
    TooLarge,
    /// A 2xx answer that is not what the request asked for: another record than the
    /// one read, or a single resource where a Bundle is due.
    #[error("upstream answered with another resource than asked")]
    WrongResource,
    /// A 3xx (other than 304): never followed, never passed on.
    #[error("upstream answered with a redirect")]
    Redirect,
    /// A non-FHIR error status from the upstream, passed on.
    #[error("upstream server answered with an error")]
    Status(StatusCode),
    /// The upstream has no such record. Rendered exactly like a denied record so the
    /// two cannot be told apart.
    #[error("resource not found")]
    NotFound,
    #[error("upstream credentials are unavailable")]
    Credentials,
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Unreachable
            | UpstreamError::BadResponse(_)
            | UpstreamError::TooLarge
            | UpstreamError::WrongResource
            | UpstreamError::Redirect
            | UpstreamError::Credentials => StatusCode::BAD_GATEWAY,
            UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Status(s) if s.is_client_error() => *s,
            UpstreamError::Status(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::NotFound => StatusCode::NOT_FOUND,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable => "upstream_unreachable",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::BadResponse(_) => "upstream_bad_response",
            UpstreamError::TooLarge => "upstream_too_large",
            UpstreamError::WrongResource => "upstream_wrong_resource",
            UpstreamError::Redirect => "upstream_redirect",
            UpstreamError::Status(_) => "upstream_status",
            UpstreamError::NotFound => "resource_not_found",
            UpstreamError::Credentials => "upstream_credentials",
        }
    }
}

/// Headers a client may send that are passed on to the upstream.
const FORWARDED_REQUEST_HEADERS: [header::HeaderName; 1] = [header::ACCEPT_LANGUAGE];

/// Conditional-read headers: passed on only for unrestricted permits, since a `304`
/// cannot be checked and would tell a restricted token that a record exists.
const CONDITIONAL_REQUEST_HEADERS: [header::HeaderName; 2] =
    [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE];

/// The process-wide upstream client: a connection pool per way of connecting (see
/// [`ConnectSettings`]), plus a cache of upstream access tokens for tenants using
/// client credentials.
#[derive(Clone)]
pub struct Upstream {
    /// One pooled client per distinct [`ConnectSettings`] in use: tenants that connect
    /// alike share a pool (hyper keys its pool by scheme and authority).
    clients: Cache<ConnectSettings, HyperClient>,
    http: reqwest::Client,
    /// Upstream access tokens by (configuration generation, tenant): a reload with a new
    /// upstream or new credentials never reuses a token fetched for the old ones.
    tokens: Cache<(u64, String), UpstreamToken>,
}

/// What the stages need of an upstream FHIR server: one request out, one bounded
/// answer back. [`Upstream`] is the real one (a pooled HTTP client); the stages that
/// talk upstream (discovery, forwarding) are generic over it, so a stage can be run
/// against anything that answers like a FHIR server.
pub trait FhirServer: Clone + Send + Sync + 'static {
    /// Sends `out` to the tenant's upstream and reads the whole answer, bounded by the
    /// tenant's timeout and size limit.
    fn fetch(
        &self,
        tenant: &Tenant,
        out: &OutboundRequest,
        client_headers: &HeaderMap,
    ) -> impl std::future::Future<Output = Result<Fetched, UpstreamError>> + Send;
}

impl FhirServer for Upstream {
    fn fetch(
        &self,
        tenant: &Tenant,
        out: &OutboundRequest,
        client_headers: &HeaderMap,
    ) -> impl std::future::Future<Output = Result<Fetched, UpstreamError>> + Send {
        Upstream::fetch(self, tenant, out, client_headers)
    }
}

/// A fetched upstream answer.
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Upstream {
    pub fn new(http: reqwest::Client) -> Result<Self, String> {
        // Built once here so that a machine without usable TLS roots fails at start-up,
        // not on a request; each tenant's client is built on its first request.
        build_client(
            ConnectSettings {
                connect_timeout: Duration::from_secs(2),
                tls: None,
            },
            None,
        )?;
        Ok(Upstream {
            clients: Cache::builder()
                .max_capacity(MAX_CLIENTS)
                .time_to_idle(CLIENT_IDLE)
                .build(),
            http,
            tokens: Cache::builder()
                .max_capacity(1_000)
                .expire_after(UpstreamTokenExpiry)
                .build(),
        })
    }

    /// Sends `out` to the tenant's upstream and reads the whole answer, bounded by the
    /// tenant's timeout and size limit.
    pub async fn fetch(
        &self,
        tenant: &Tenant,
        out: &OutboundRequest,
        client_headers: &HeaderMap,
    ) -> Result<Fetched, UpstreamError> {
        let cfg = &tenant.config;
        let up = &cfg.upstream;
        // A search narrowed to a patient list goes as POST `_search`: the list stays out
        // of URLs and logs.
        let form = out.search_form();
        let (method, uri) = match &form {
            Some(_) => (Method::POST, format!("{}{}/_search", up.base, out.path)),
            None => (
                out.method.clone(),
                format!("{}{}", up.base, out.path_and_query()),
            ),
        };
        let uri: http::Uri = uri
            .parse()
            .map_err(|_| UpstreamError::BadResponse("outbound uri"))?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::ACCEPT, FHIR_JSON)
            .header(
                header::USER_AGENT,
                concat!("smart-fhir-proxy/", env!("CARGO_PKG_VERSION")),
            );
        // Unknown search parameters must fail, not be silently ignored: a narrowing
        // parameter the upstream does not know would otherwise widen the search. A
        // write's own `Prefer` (stage 4) says so too.
        if out
            .header(&header::HeaderName::from_static("prefer"))
            .is_none()
        {
            builder = builder.header("prefer", "handling=strict");
        }
        for (name, value) in &out.headers {
            builder = builder.header(name, value);
        }
        for name in FORWARDED_REQUEST_HEADERS {
            for v in client_headers.get_all(&name) {
                builder = builder.header(&name, v);
            }
        }
        // The request's trace (the calling stage's span as the parent) and request id;
        // never the client's own headers for them, which the proxy has checked.
        if let Some(scope) = crate::trace::current() {
            for (name, value) in scope.outbound_headers(true) {
                builder = builder.header(name, value);
            }
        }
        if out.conditional {
            for name in CONDITIONAL_REQUEST_HEADERS {
                for v in client_headers.get_all(&name) {
                    builder = builder.header(&name, v);
                }
            }
        }
        match &up.auth {
            UpstreamAuth::None => {}
            UpstreamAuth::Header { name, value } => builder = builder.header(name, value.expose()),
            UpstreamAuth::ClientCredentials { .. } => {
                // Bounded like the rest of the exchange.
                let bearer = tokio::time::timeout(up.timeout, self.upstream_token(tenant))
                    .await
                    .map_err(|_| UpstreamError::Timeout)??;
                builder = builder.header(header::AUTHORIZATION, bearer.as_ref());
            }
        }
        let body = match (form, &out.body) {
            (Some(f), _) => {
                builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                Full::new(f)
            }
            (None, Some(b)) => {
                if out.header(&header::CONTENT_TYPE).is_none() {
                    builder = builder.header(header::CONTENT_TYPE, FHIR_JSON);
                }
                Full::new(b.clone())
            }
            (None, None) => Full::new(Bytes::new()),
        };
        let request = builder
            .body(body)
            .map_err(|_| UpstreamError::BadResponse("outbound request"))?;
        let client = self.client_for(up).await?;
        let exchange = async {
            let resp = client.request(request).await.map_err(|e| {
                tracing::warn!(tenant.id = %cfg.id, error = %e, "upstream request failed");
                if e.is_connect() {
                    UpstreamError::Unreachable
                } else {
                    UpstreamError::BadResponse("connection")
                }
            })?;
            let (parts, body) = resp.into_parts();
            // The client follows no redirect (hyper's never does), and a 3xx is no
            // answer: following it could take the request, with the tenant's upstream
            // credentials, to another host.
            if parts.status.is_redirection() && parts.status != StatusCode::NOT_MODIFIED {
                tracing::warn!(tenant.id = %cfg.id, status = %parts.status, "upstream answered with a redirect");
                return Err(UpstreamError::Redirect);
            }
            let body = Limited::new(body, up.max_response_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        UpstreamError::TooLarge
                    } else {
                        UpstreamError::BadResponse("body")
                    }
                })?
                .to_bytes();
            Ok::<_, UpstreamError>(Fetched {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(up.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// The pooled client that connects as `up` says.
    async fn client_for(&self, up: &UpstreamConfig) -> Result<HyperClient, UpstreamError> {
        let settings = ConnectSettings::of(up);
        let tls = up.tls.as_ref().map(|t| t.config());
        self.clients
            .try_get_with(settings, async move { build_client(settings, tls) })
            .await
            .map_err(|e: Arc<String>| {
                tracing::error!(error = %e, "cannot build the upstream client");
                UpstreamError::Unreachable
            })
    }

    /// A cached upstream access token from the tenant's client-credentials grant.
    /// Concurrent misses cause one token request; failures are never cached.
    async fn upstream_token(&self, tenant: &Tenant) -> Result<Arc<HeaderValue>, UpstreamError> {
        let key = (tenant.generation, tenant.id().to_owned());
        let http = self.http.clone();
        self.tokens
            .try_get_with(key, request_upstream_token(http, &tenant.config))
            .await
            .map(|t| t.value)
            .map_err(|e: Arc<UpstreamError>| (*e).clone())
    }
}

/// How connections to an upstream are made: what tells one tenant's client from
/// another's. The connect timeout and the TLS settings are properties of the
/// connector, so tenants that differ in either cannot share a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectSettings {
    /// Bound on establishing one TCP connection (`upstream.connect_timeout_ms`); a
    /// connection not made in time fails the request with 502 `upstream_unreachable`.
    pub connect_timeout: Duration,
    /// The load id of the tenant's own TLS settings (`upstream.tls`: a private CA, a
    /// client certificate); `None`: the system's roots, no client certificate. A pool
    /// is never shared between different settings, and one reloaded away idles out.
    pub tls: Option<u64>,
}

impl ConnectSettings {
    pub fn of(up: &UpstreamConfig) -> Self {
        ConnectSettings {
            connect_timeout: up.connect_timeout,
            tls: up.tls.as_ref().map(|t| t.id()),
        }
    }
}

/// Most distinct [`ConnectSettings`] with a client at once (one is needed per distinct
/// setting in the configuration, plus those of configurations just replaced).
const MAX_CLIENTS: u64 = 1024;

/// A client unused this long is dropped with its pool (a tenant that comes back gets
/// a new one).
const CLIENT_IDLE: Duration = Duration::from_secs(3600);

/// A pooled client connecting as `settings` say; `tls` is the tenant's own TLS
/// configuration (HTTPS only: configuration refuses `upstream.tls` with an `http`
/// base), else the system's roots for `https` and plain `http`.
fn build_client(
    settings: ConnectSettings,
    tls: Option<&rustls::ClientConfig>,
) -> Result<HyperClient, String> {
    let mut http_connector = HttpConnector::new();
    http_connector.enforce_http(false);
    http_connector.set_nodelay(true);
    http_connector.set_connect_timeout(Some(settings.connect_timeout));
    let connector = match tls {
        Some(config) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config.clone())
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http_connector),
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot load TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http_connector),
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build(connector))
}

#[derive(Clone)]
struct UpstreamToken {
    value: Arc<HeaderValue>,
    lifetime: Duration,
}

struct UpstreamTokenExpiry;

impl moka::Expiry<(u64, String), UpstreamToken> for UpstreamTokenExpiry {
    fn expire_after_create(
        &self,
        _key: &(u64, String),
        value: &UpstreamToken,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

async fn request_upstream_token(
    http: reqwest::Client,
    cfg: &TenantConfig,
) -> Result<UpstreamToken, UpstreamError> {
    let UpstreamAuth::ClientCredentials {
        token_url,
        client_id,
        client_secret,
        scope,
    } = &cfg.upstream.auth
    else {
        return Err(UpstreamError::Credentials);
    };
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        access_token: String,
        expires_in: Option<u64>,
    }
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(s) = scope {
        form.push(("scope", s.as_str()));
    }
    let resp = http
        .post(token_url.clone())
        .timeout(cfg.upstream.timeout)
        .basic_auth(client_id, Some(client_secret.expose()))
        .form(&form)
        .send()
        .await
        .map_err(|_| UpstreamError::Credentials)?;
    if !resp.status().is_success() {
        tracing::warn!(tenant.id = %cfg.id, status = %resp.status(), "upstream token request failed");
        return Err(UpstreamError::Credentials);
    }
    let t: TokenResponse = crate::fetch::read_json(resp)
        .await
        .map_err(|_| UpstreamError::Credentials)?;
    let mut value = HeaderValue::from_str(&format!("Bearer {}", t.access_token))
        .map_err(|_| UpstreamError::Credentials)?;
    value.set_sensitive(true);
    // Renewed 30 s before it expires; a token that short-lived is used once.
    let lifetime = Duration::from_secs(t.expires_in.unwrap_or(300).saturating_sub(30));
    Ok(UpstreamToken {
        value: Arc::new(value),
        lifetime,
    })
}

/// Replaces every occurrence of the upstream base with the public base in a JSON text
/// (see [`BaseRewrite`]).
pub fn rewrite_base(
    body: &[u8],
    upstream: &UpstreamConfig,
    public_base: &str,
) -> Result<Bytes, UpstreamError> {
    BaseRewrite {
        from: &upstream.base,
        to: public_base,
    }
    .bytes(body)
}

/// Upstream URLs in answers become the proxy's: every whole occurrence of the
/// upstream base (`from`) is replaced with the tenant's public base (`to`).
///
/// An occurrence is judged on the string's value, so every JSON spelling of the base is
/// found: `http:\/\/up\/fhir`, `\u0068ttp://up/fhir` and any other mix of `\/` and
/// `\uXXXX` escapes. A string with such an escape is decoded and, if it holds the base,
/// re-encoded rewritten (its other escapes become plain characters where JSON allows);
/// every other string is rewritten in place, byte for byte. Strings without `\/` or
/// `\u` need no decoding: their other escapes (`\"`, `\\`, `\n`, ...) stand for
/// characters no base contains (configuration refuses bases with `"`, `\` or control
/// characters), so the base occurs in the value exactly where it occurs in the text.
/// A text whose strings cannot be decoded is refused rather than copied out with
/// the base possibly in it.
#[derive(Clone, Copy, Debug)]
pub struct BaseRewrite<'a> {
    pub from: &'a str,
    pub to: &'a str,
}

/// A JSON text the rewrite could not read.
const UNREADABLE: UpstreamError = UpstreamError::BadResponse("json");

impl BaseRewrite<'_> {
    /// `text`, a JSON text, rewritten. Without an occurrence, `Bytes::copy_from_slice`
    /// is the one copy made.
    pub fn bytes(&self, text: &[u8]) -> Result<Bytes, UpstreamError> {
        if self.from.is_empty()
            || (!may_escape_url(text) && memchr::memmem::find(text, self.from.as_bytes()).is_none())
        {
            return Ok(Bytes::copy_from_slice(text));
        }
        let mut out = Vec::with_capacity(text.len() + 256);
        self.append(text, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Appends `text`, rewritten, to `out`. `text` is JSON: a value, or members and
    /// values with their punctuation (every `"` outside a string opens one).
    pub fn append(&self, text: &[u8], out: &mut Vec<u8>) -> Result<(), UpstreamError> {
        if self.from.is_empty() || !may_escape_url(text) {
            self.append_literal(text, out);
            return Ok(());
        }
        // Copied as they are, but for strings with `\/` or `\u` escapes.
        let mut copied = 0;
        let mut at = 0;
        while let Some(q) = text.get(at..).and_then(|rest| memchr::memchr(b'"', rest)) {
            let start = at + q;
            let (end, escaped) = string_end(text, start).ok_or(UNREADABLE)?;
            if escaped {
                self.append_literal(text.get(copied..start).unwrap_or_default(), out);
                let raw = text.get(start..end).unwrap_or_default();
                let value: String = serde_json::from_slice(raw).map_err(|_| UNREADABLE)?;
                match self.url(&value) {
                    std::borrow::Cow::Owned(rewritten) if rewritten != value => {
                        serde_json::to_writer(&mut *out, &rewritten).map_err(|_| UNREADABLE)?;
                    }
                    _ => out.extend_from_slice(raw),
                }
                copied = end;
            }
            at = end;
        }
        self.append_literal(text.get(copied..).unwrap_or_default(), out);
        Ok(())
    }

    /// Appends `text` with every whole occurrence of the base, as it is spelled in
    /// `from`, replaced.
    fn append_literal(&self, text: &[u8], out: &mut Vec<u8>) {
        let from = self.from.as_bytes();
        if from.is_empty() {
            out.extend_from_slice(text);
            return;
        }
        let to = self.to.as_bytes();
        let mut last = 0;
        for at in memchr::memmem::find_iter(text, from) {
            // Only the whole base: `http://up/fhir` must not turn `http://up/fhir2/...`
            // into `https://proxy/t2/...`. What ends it: the end of the string (`"`),
            // a path, query or fragment delimiter, or an escape (`\`) or control
            // character. The same bytes end it in a JSON text and in a decoded value, so
            // both read alike.
            let end = at + from.len();
            let whole = matches!(
                text.get(end),
                None | Some(b'/' | b'"' | b'?' | b'#' | b'\\' | 0x00..=0x1f)
            );
            if !whole || at < last {
                continue;
            }
            out.extend_from_slice(text.get(last..at).unwrap_or_default());
            out.extend_from_slice(to);
            last = end;
        }
        out.extend_from_slice(text.get(last..).unwrap_or_default());
    }

    /// A URL (a decoded string, not JSON), rewritten.
    pub fn url<'u>(&self, url: &'u str) -> std::borrow::Cow<'u, str> {
        if self.from.is_empty() || !url.contains(self.from) {
            return std::borrow::Cow::Borrowed(url);
        }
        let mut out = Vec::with_capacity(url.len() + 64);
        self.append_literal(url.as_bytes(), &mut out);
        // Whole UTF-8 strings are spliced at UTF-8 boundaries.
        String::from_utf8(out).map_or(std::borrow::Cow::Borrowed(url), std::borrow::Cow::Owned)
    }
}

/// Whether `text` may hold a string with an escape that can stand for a character of
/// a URL: `\/` or `\uXXXX` (an escaped backslash before `/` or `u` counts too; such a
/// text only takes the slower, string-by-string path).
fn may_escape_url(text: &[u8]) -> bool {
    memchr::memmem::find(text, b"\\/").is_some() || memchr::memmem::find(text, b"\\u").is_some()
}

/// For the string whose opening quote is at `start`: the index just past its closing
/// quote, and whether it has a `\/` or `\u` escape. `None` when it does not end.
fn string_end(text: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut i = start + 1;
    let mut escaped = false;
    loop {
        i += memchr::memchr2(b'"', b'\\', text.get(i..)?)?;
        if text.get(i) == Some(&b'"') {
            return Some((i + 1, escaped));
        }
        match text.get(i + 1)? {
            b'/' | b'u' => escaped = true,
            _ => {}
        }
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    #[test]
    fn a_base_followed_by_an_escape_is_whole_only_if_the_escape_ends_it() {
        // Any escape after the base counted as its end, so a link's URL, rewritten after
        // decoding, was rewritten otherwise than the text around it (found by the answer
        // fuzz target, fuzz/regressions/answer/), and `fhir\u0032` (`fhir2`) became
        // `t\u0032` (`t2`).
        let rw = BaseRewrite {
            from: "http://up/fhir",
            to: "https://proxy/t",
        };
        let text = |s: &str| {
            let mut out = Vec::new();
            rw.append(s.as_bytes(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        for (json, rewritten) in [
            (r#""http://up/fhir\/Patient\/p1""#, true),
            (r#""http://up/fhir\u002FPatient""#, true),
            (r#""http://up/fhir\u003fx=1""#, true),
            (r#""http://up/fhir\u0023x""#, true),
            (r#""http://up/fhir\"""#, true),
            (r#""http://up/fhir\\Patient""#, true),
            (r#""http://up/fhir\u0032/Patient""#, false),
            // A control character ends the base too: the upstream address never stays.
            (r#""http://up/fhir\tx""#, true),
            (r#""http://up/fhir\n""#, true),
        ] {
            let out = text(json);
            let value: String = serde_json::from_str(&out).unwrap();
            assert_eq!(
                value.starts_with("https://proxy/t"),
                rewritten,
                "{json} -> {out}"
            );
            // As the decoded string is rewritten.
            let decoded: String = serde_json::from_str(json).unwrap();
            let url = rw.url(&decoded);
            assert_eq!(
                url.starts_with("https://proxy/t"),
                rewritten,
                "{decoded:?} -> {url}"
            );
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), url, "{json}");
        }
    }

    fn upstream(base: &str) -> UpstreamConfig {
        UpstreamConfig {
            base: base.to_owned(),
            base_uri: base.parse().unwrap(),
            auth: UpstreamAuth::None,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_response_bytes: 1 << 20,
            compartment_search: crate::config::CompartmentSearch::Native,
            tls: None,
        }
    }

    #[test]
    fn only_the_whole_base_is_rewritten() {
        let up = upstream("http://up/fhir");
        let body = br#"{"a":"http://up/fhir/Patient/p1","b":"http://up/fhir","c":"http://up/fhir2/Patient/p1","d":"http://up/fhir?x=1","e":"http://up/fhirx"}"#;
        let out = rewrite_base(body, &up, "https://proxy/t").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a":"https://proxy/t/Patient/p1","b":"https://proxy/t","c":"http://up/fhir2/Patient/p1","d":"https://proxy/t?x=1","e":"http://up/fhirx"}"#
        );
        let untouched = br#"{"resourceType":"Patient"}"#;
        assert_eq!(
            &rewrite_base(untouched, &up, "https://proxy/t").unwrap()[..],
            &untouched[..]
        );
    }

    const UP: &str = "http://127.0.0.1:8080/fhir";
    const PUBLIC: &str = "https://proxy.example/t1";
    const RW: BaseRewrite<'static> = BaseRewrite {
        from: UP,
        to: PUBLIC,
    };

    fn rewritten(text: &str) -> String {
        String::from_utf8(RW.bytes(text.as_bytes()).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn every_json_spelling_of_the_base_is_rewritten() {
        for (text, want) in [
            (
                r#"{"a":"http:\/\/127.0.0.1:8080\/fhir\/Patient\/1"}"#,
                r#"{"a":"https://proxy.example/t1/Patient/1"}"#,
            ),
            (
                r#"{"a":"http:\u002f\u002F127.0.0.1:8080\u002ffhir/Patient/1"}"#,
                r#"{"a":"https://proxy.example/t1/Patient/1"}"#,
            ),
            (
                r#"{"a":"\u0068ttp://127.0.0.1:8080/fhir"}"#,
                r#"{"a":"https://proxy.example/t1"}"#,
            ),
            (
                r#"{"a":"\u0068\u0074\u0074\u0070\u003a\u002f\u002f\u0031\u0032\u0037\u002e\u0030\u002e\u0030\u002e\u0031\u003a\u0038\u0030\u0038\u0030\u002f\u0066\u0068\u0069\u0072?x=1"}"#,
                r#"{"a":"https://proxy.example/t1?x=1"}"#,
            ),
            // The string's other escapes are re-encoded as JSON writes them.
            (
                r#"["see http:\/\/127.0.0.1:8080\/fhir\/Binary\/b1 \"now\"\n\u00e9\ud83d\udca1"]"#,
                "[\"see https://proxy.example/t1/Binary/b1 \\\"now\\\"\\n\u{e9}\u{1f4a1}\"]",
            ),
            // An escaped backslash before the slash: the base ends at the backslash.
            (
                r#"{"a":"http://127.0.0.1:8080/fhir\\/x"}"#,
                r#"{"a":"https://proxy.example/t1\\/x"}"#,
            ),
            // Keys are strings too; escaped and plain spellings side by side.
            (
                r#"{"http:\/\/127.0.0.1:8080\/fhir":["http://127.0.0.1:8080/fhir/a",1,{"b":"http:\/\/127.0.0.1:8080\/fhir#f"}]}"#,
                r#"{"https://proxy.example/t1":["https://proxy.example/t1/a",1,{"b":"https://proxy.example/t1#f"}]}"#,
            ),
        ] {
            assert_eq!(rewritten(text), want, "{text}");
        }
    }

    #[test]
    fn strings_without_the_base_keep_their_bytes() {
        for text in [
            // Another base that starts like this one, spelled with escapes.
            r#"{"a":"http:\/\/127.0.0.1:8080\/fhir2\/Patient\/1","b":"\u0068ttp://127.0.0.1:8080/fhirx"}"#,
            r#"{"note":"caf\u00e9 \/ \"x\"","n":1.50,"t":true,"z":null}"#,
            r#"{"a":"\\u0068ttp://127.0.0.1:8080/fhir is no URL"}"#,
            r#"{"a":"http://127.0.0.1:8080/fhir\u0032"}"#,
        ] {
            assert_eq!(rewritten(text), text);
        }
    }

    #[test]
    fn a_text_the_rewrite_cannot_read_is_refused() {
        for text in [
            r#"{"a":"http:\/\/127.0.0.1:8080\/fhir"#,
            r#"{"a":"\/\x"}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"\/"#,
        ] {
            assert!(
                matches!(
                    RW.bytes(text.as_bytes()),
                    Err(UpstreamError::BadResponse(_))
                ),
                "{text}"
            );
        }
    }

    /// Pieces of generated string values: the base, what may follow it, another base
    /// sharing its prefix, and characters with every kind of escape.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            UP,
            UP,
            "http://127.0.0.1:8080/fhir2",
            "/Patient/p1",
            "/",
            "2",
            "x",
            "?_id=1",
            "#frag",
            "\"",
            "\\",
            "\n",
            "\u{1}",
            " ",
            "\u{e9}",
            "\u{1f4a1}",
            "http://",
            "127.0.0.1:8080",
        ])
    }

    /// A string value: its decoded text and its JSON spelling, each character written
    /// plainly or escaped (`\/`, `\uXXXX` in either case, surrogate pairs, short
    /// escapes), as `choices` say.
    fn json_string() -> impl Strategy<Value = (String, String)> {
        (
            prop::collection::vec(piece(), 0..6),
            0u8..3,
            prop::collection::vec(any::<u8>(), 1..64),
        )
            .prop_map(|(pieces, mode, choices)| {
                let value: String = pieces.concat();
                let mut text = String::from("\"");
                for (i, c) in value.chars().enumerate() {
                    let k = match mode {
                        // As JSON writers usually spell it.
                        0 => 0,
                        // Only slashes escaped, as some writers do.
                        1 => usize::from(c == '/'),
                        _ => usize::from(choices[i % choices.len()]),
                    };
                    let u = |c: char| {
                        let mut buf = [0u16; 2];
                        c.encode_utf16(&mut buf)
                            .iter()
                            .map(|unit| {
                                if k % 2 == 0 {
                                    format!("\\u{unit:04x}")
                                } else {
                                    format!("\\u{unit:04X}")
                                }
                            })
                            .collect::<String>()
                    };
                    let spelled = match c {
                        '"' => ["\\\"".to_owned(), u(c)][k % 2].clone(),
                        '\\' => ["\\\\".to_owned(), u(c)][k % 2].clone(),
                        '\n' => ["\\n".to_owned(), u(c)][k % 2].clone(),
                        c if (c as u32) < 0x20 => u(c),
                        '/' => ["/".to_owned(), "\\/".to_owned(), u(c), u(c)][k % 4].clone(),
                        c => [c.to_string(), u(c), u(c)][k % 3].clone(),
                    };
                    text.push_str(&spelled);
                }
                text.push('"');
                (value, text)
            })
    }

    /// A JSON document of generated strings: as values, keys, array items, nested.
    fn document() -> impl Strategy<Value = String> {
        prop::collection::vec(json_string(), 1..6).prop_map(|strings| {
            let mut out = String::from("{");
            for (i, (_, text)) in strings.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match i % 3 {
                    0 => out.push_str(&format!("\"k{i}\":{text}")),
                    // A generated key, made unique by a prefix.
                    1 => out.push_str(&format!(
                        "\"k{i}-{}:[{text},{i},{{\"n\":{text}}}]",
                        &text[1..]
                    )),
                    _ => out.push_str(&format!("\"k{i}\" : [ null , {text} ]")),
                }
            }
            out.push('}');
            out
        })
    }

    /// Every string (and key) of `v` through `f`.
    fn map_strings(v: &Value, f: &impl Fn(&str) -> String) -> Value {
        match v {
            Value::String(s) => Value::String(f(s)),
            Value::Array(items) => Value::Array(items.iter().map(|i| map_strings(i, f)).collect()),
            Value::Object(map) => {
                Value::Object(map.iter().map(|(k, v)| (f(k), map_strings(v, f))).collect())
            }
            other => other.clone(),
        }
    }

    /// Whether `s` holds the base as a whole (followed by nothing, or by a character
    /// that cannot continue it).
    fn holds_whole_base(s: &str) -> bool {
        s.match_indices(UP).any(|(at, _)| {
            s[at + UP.len()..]
                .chars()
                .next()
                .is_none_or(|c| matches!(c, '/' | '?' | '#' | '"' | '\\') || c.is_control())
        })
    }

    fn strings_of(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| strings_of(i, out)),
            Value::Object(map) => map.iter().for_each(|(k, v)| {
                out.push(k.clone());
                strings_of(v, out);
            }),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the spelling, the answer that goes out holds the upstream base in
        /// none of its strings, and reads exactly as the answer with each decoded
        /// string rewritten; strings that needed no rewriting keep their bytes.
        #[test]
        fn no_spelling_of_the_base_survives(doc in document()) {
            let input: Value = serde_json::from_str(&doc).unwrap();
            let out = RW.bytes(doc.as_bytes()).unwrap();
            let output: Value = serde_json::from_slice(&out).unwrap();
            let mut strings = Vec::new();
            strings_of(&output, &mut strings);
            for s in &strings {
                prop_assert!(!holds_whole_base(s), "{} in {}", s, String::from_utf8_lossy(&out));
            }
            let expected = map_strings(&input, &|s| RW.url(s).into_owned());
            prop_assert_eq!(&output, &expected);
            if expected == input {
                prop_assert_eq!(&out[..], doc.as_bytes());
            }
        }

        /// The fragments the answer check copies out (members, entries) rewrite as the
        /// whole text does.
        #[test]
        fn fragments_rewrite_as_the_whole((_, text) in json_string(), (_, other) in json_string()) {
            let whole = format!("[{text},{other}]");
            let mut pieces = Vec::new();
            pieces.push(b'[');
            RW.append(text.as_bytes(), &mut pieces).unwrap();
            pieces.push(b',');
            RW.append(other.as_bytes(), &mut pieces).unwrap();
            pieces.push(b']');
            prop_assert_eq!(&pieces[..], &RW.bytes(whole.as_bytes()).unwrap()[..]);
        }
    }
}
