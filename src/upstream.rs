//! The upstream FHIR client: one pooled connection to each tenant's FHIR base, bounded
//! in time and size, with the tenant's own upstream credentials.
//!
//! An I/O adapter below the stages that read the upstream (discovery, PractitionerRole
//! resolution in authz, forwarding): it sends an [`OutboundRequest`] and returns the
//! whole answer; what the client may see of it is decided by the forwarding stage.
//! Requests are built from scratch (method, rebuilt path, allow-listed headers), so the
//! client's credentials and hop-by-hop headers never reach the upstream.

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

/// The process-wide upstream client: one connection pool, plus a cache of upstream
/// access tokens for tenants using client credentials.
#[derive(Clone)]
pub struct Upstream {
    client: HyperClient,
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
        let mut http_connector = HttpConnector::new();
        http_connector.enforce_http(false);
        http_connector.set_nodelay(true);
        http_connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot load TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http_connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(tls);
        Ok(Upstream {
            client,
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
            // Unknown search parameters must fail, not be silently ignored: a
            // narrowing parameter the upstream does not know would otherwise widen
            // the search.
            .header("prefer", "handling=strict")
            .header(
                header::USER_AGENT,
                concat!("smart-fhir-proxy/", env!("CARGO_PKG_VERSION")),
            );
        for name in FORWARDED_REQUEST_HEADERS {
            for v in client_headers.get_all(&name) {
                builder = builder.header(&name, v);
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
            UpstreamAuth::Header { name, value } => builder = builder.header(name, value),
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
                builder = builder.header(header::CONTENT_TYPE, FHIR_JSON);
                Full::new(b.clone())
            }
            (None, None) => Full::new(Bytes::new()),
        };
        let request = builder
            .body(body)
            .map_err(|_| UpstreamError::BadResponse("outbound request"))?;
        let exchange = async {
            let resp = self.client.request(request).await.map_err(|e| {
                tracing::warn!(tenant.id = %cfg.id, error = %e, "upstream request failed");
                if e.is_connect() {
                    UpstreamError::Unreachable
                } else {
                    UpstreamError::BadResponse("connection")
                }
            })?;
            let (parts, body) = resp.into_parts();
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

    /// A cached upstream access token from the tenant's client-credentials grant.
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
        .basic_auth(client_id, Some(client_secret))
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
    let value = HeaderValue::from_str(&format!("Bearer {}", t.access_token))
        .map_err(|_| UpstreamError::Credentials)?;
    // Renewed 30 s before it expires; a token that short-lived is used once.
    let lifetime = Duration::from_secs(t.expires_in.unwrap_or(300).saturating_sub(30));
    Ok(UpstreamToken {
        value: Arc::new(value),
        lifetime,
    })
}

/// Replaces every occurrence of the upstream base with the public base.
pub fn rewrite_base(body: &[u8], upstream: &UpstreamConfig, public_base: &str) -> Bytes {
    BaseRewrite {
        from: &upstream.base,
        to: public_base,
    }
    .bytes(body)
}

/// Upstream URLs in answers become the proxy's: every whole occurrence of the
/// upstream base (`from`) is replaced with the tenant's public base (`to`).
#[derive(Clone, Copy, Debug)]
pub struct BaseRewrite<'a> {
    pub from: &'a str,
    pub to: &'a str,
}

impl BaseRewrite<'_> {
    /// `text` rewritten. Without an occurrence, `Bytes::copy_from_slice` is the one
    /// copy made.
    pub fn bytes(&self, text: &[u8]) -> Bytes {
        if self.from.is_empty() || memchr::memmem::find(text, self.from.as_bytes()).is_none() {
            return Bytes::copy_from_slice(text);
        }
        let mut out = Vec::with_capacity(text.len() + 256);
        self.append(text, &mut out);
        Bytes::from(out)
    }

    /// Appends `text`, JSON text, rewritten, to `out`.
    pub fn append(&self, text: &[u8], out: &mut Vec<u8>) {
        self.append_as(text, out, true);
    }

    /// `json`: `text` is JSON text, where what follows the base may be written as an
    /// escape (`\/`, `\u002f`); otherwise it is a decoded string.
    fn append_as(&self, text: &[u8], out: &mut Vec<u8>, json: bool) {
        let from = self.from.as_bytes();
        if from.is_empty() {
            out.extend_from_slice(text);
            return;
        }
        let to = self.to.as_bytes();
        let mut last = 0;
        for at in memchr::memmem::find_iter(text, from) {
            // Only the whole base: `http://up/fhir` must not turn `http://up/fhir2/...`
            // into `https://proxy/t2/...`, nor `http://up/fhir\u0032/...` (the same in
            // JSON) into `https://proxy/t\u0032/...`.
            let end = at + from.len();
            let whole = match text.get(end) {
                None | Some(b'/' | b'"' | b'?' | b'#') => true,
                Some(b'\\') if json => escape_ends_base(text.get(end + 1..).unwrap_or_default()),
                Some(b'\\') => true,
                Some(_) => false,
            };
            if !whole || at < last {
                continue;
            }
            out.extend_from_slice(text.get(last..at).unwrap_or_default());
            out.extend_from_slice(to);
            last = end;
        }
        out.extend_from_slice(text.get(last..).unwrap_or_default());
    }

    /// A URL, rewritten.
    pub fn url<'u>(&self, url: &'u str) -> std::borrow::Cow<'u, str> {
        if self.from.is_empty() || !url.contains(self.from) {
            return std::borrow::Cow::Borrowed(url);
        }
        let mut out = Vec::with_capacity(url.len() + 64);
        self.append_as(url.as_bytes(), &mut out, false);
        // Whole UTF-8 strings are spliced at UTF-8 boundaries.
        String::from_utf8(out).map_or(std::borrow::Cow::Borrowed(url), std::borrow::Cow::Owned)
    }
}

/// Whether the JSON escape after a backslash (`rest` starts after it) stands for a
/// character that ends a base: `/`, `"`, `?`, `#` or a backslash (which URL parsers take
/// for a slash).
fn escape_ends_base(rest: &[u8]) -> bool {
    match rest.first() {
        Some(b'/' | b'"' | b'\\') => true,
        Some(b'u') => rest
            .get(1..5)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            .is_some_and(|c| matches!(c, 0x2f | 0x22 | 0x3f | 0x23 | 0x5c)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
            rw.append(s.as_bytes(), &mut out);
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
            (r#""http://up/fhir\tx""#, false),
            (r#""http://up/fhir\n""#, false),
        ] {
            let out = text(json);
            assert_eq!(
                out.starts_with("\"https://proxy/t\\"),
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
        }
    }

    #[test]
    fn only_the_whole_base_is_rewritten() {
        let up = upstream("http://up/fhir");
        let body = br#"{"a":"http://up/fhir/Patient/p1","b":"http://up/fhir","c":"http://up/fhir2/Patient/p1","d":"http://up/fhir?x=1","e":"http://up/fhirx"}"#;
        let out = rewrite_base(body, &up, "https://proxy/t");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a":"https://proxy/t/Patient/p1","b":"https://proxy/t","c":"http://up/fhir2/Patient/p1","d":"https://proxy/t?x=1","e":"http://up/fhirx"}"#
        );
        let untouched = br#"{"resourceType":"Patient"}"#;
        assert_eq!(
            &rewrite_base(untouched, &up, "https://proxy/t")[..],
            &untouched[..]
        );
    }
}
