//! CORS for browser SMART apps, per tenant (`cors` in `tenants.json`): the decisions,
//! pure functions over the request's headers and the tenant's [`CorsConfig`], and the
//! response headers they give. The stack's outermost layer (`stack::apply_cors`) runs
//! them around every answer of a tenant, errors and discovery included.
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//!   answered by the proxy, before and without any token: 204 when the origin is
//!   allowed and the method and headers it announces are ones the proxy takes
//!   ([`check_preflight`]), otherwise a 403 OperationOutcome without CORS headers.
//! - Every other answer to an allowed origin carries `Access-Control-Allow-Origin`
//!   with that origin (or `*` for a tenant configured with `["*"]` and no
//!   credentials, never otherwise) and exposes `WWW-Authenticate` and the other
//!   headers a FHIR client reads ([`decorate`]), so an app can read a 401, a 403 or an
//!   OperationOutcome as well as a Bundle. An origin that is not allowed gets no CORS
//!   headers: the browser keeps the answer from the page.
//!
//! CORS only tells browsers what a page may read; it is no access control. Every
//! request is authorized by its token, whatever its origin.

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::config::{CorsConfig, CorsOrigins};

/// The methods a preflight may announce: the ones the proxy forwards.
pub const ALLOW_METHODS: &str = "GET, POST, HEAD, OPTIONS";

const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::HEAD, Method::OPTIONS];

/// The request headers a page may send (lowercase), as `Access-Control-Allow-Headers`
/// lists them. Safelisted ones (`Accept`, ...) are listed too, since a value outside
/// the safelist makes a browser announce them.
pub const ALLOW_HEADERS: [&str; 12] = [
    "authorization",
    "content-type",
    "accept",
    "accept-language",
    "prefer",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-none-exist",
    "traceparent",
    "tracestate",
];

/// Response headers every allowed origin may read, besides the configured ones.
pub const EXPOSE_HEADERS: [&str; 5] = [
    "www-authenticate",
    "location",
    "content-location",
    "etag",
    "last-modified",
];

/// Why a preflight was refused (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorsError {
    #[error("cross-origin requests from this origin are not allowed")]
    OriginNotAllowed,
    #[error("cross-origin method `{0}` is not allowed, allowed: {ALLOW_METHODS}")]
    MethodNotAllowed(String),
    #[error("cross-origin request header `{0}` is not allowed")]
    HeaderNotAllowed(String),
}

impl CorsError {
    pub fn status(&self) -> StatusCode {
        StatusCode::FORBIDDEN
    }

    pub fn reason(&self) -> &'static str {
        match self {
            CorsError::OriginNotAllowed => "cors_origin_not_allowed",
            CorsError::MethodNotAllowed(_) => "cors_method_not_allowed",
            CorsError::HeaderNotAllowed(_) => "cors_header_not_allowed",
        }
    }
}

/// The request's one `Origin`; none when absent, repeated or not text.
pub fn origin(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut all = headers.get_all(header::ORIGIN).iter();
    let first = all.next()?;
    (all.next().is_none() && first.to_str().is_ok()).then_some(first)
}

/// Whether the request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The `Access-Control-Allow-Origin` value for `origin`, if the tenant allows it.
pub fn allow_origin(cfg: &CorsConfig, origin: &HeaderValue) -> Option<HeaderValue> {
    match &cfg.origins {
        // INVARIANT: configuration refuses `*` together with credentials.
        CorsOrigins::Any if !cfg.allow_credentials => Some(HeaderValue::from_static("*")),
        CorsOrigins::Any => None,
        CorsOrigins::List(list) => {
            let o = origin.to_str().ok()?;
            list.iter().any(|a| a == o).then(|| origin.clone())
        }
    }
}

/// Decides a preflight; allowed, the headers of its 204 answer.
pub fn check_preflight(
    cfg: Option<&CorsConfig>,
    headers: &HeaderMap,
) -> Result<HeaderMap, CorsError> {
    let cfg = cfg.ok_or(CorsError::OriginNotAllowed)?;
    let allowed = origin(headers)
        .and_then(|o| allow_origin(cfg, o))
        .ok_or(CorsError::OriginNotAllowed)?;
    let method = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !METHODS.iter().any(|m| m.as_str() == method) {
        return Err(CorsError::MethodNotAllowed(shown(method)));
    }
    for value in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        let text = value
            .to_str()
            .map_err(|_| CorsError::HeaderNotAllowed("?".into()))?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !ALLOW_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                return Err(CorsError::HeaderNotAllowed(shown(name)));
            }
        }
    }
    let mut out = HeaderMap::new();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if cfg.allow_credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    if let Ok(v) = HeaderValue::from_str(&ALLOW_HEADERS.join(", ")) {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(cfg.max_age_seconds),
    );
    out.insert(
        header::VARY,
        HeaderValue::from_static(
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        ),
    );
    Ok(out)
}

/// Adds the CORS headers of an answer (not a preflight) of a tenant with `cfg`:
/// `Access-Control-*` for an allowed `origin`, and `Vary: Origin` whenever the answer
/// depends on the origin (a tenant with a list of origins), so a cache never hands one
/// origin's answer to another.
pub fn decorate(cfg: Option<&CorsConfig>, origin: Option<&HeaderValue>, out: &mut HeaderMap) {
    let Some(cfg) = cfg else {
        return;
    };
    if matches!(cfg.origins, CorsOrigins::List(_)) {
        out.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let Some(allowed) = origin.and_then(|o| allow_origin(cfg, o)) else {
        return;
    };
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if cfg.allow_credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let mut exposed: Vec<&str> = EXPOSE_HEADERS.to_vec();
    for h in &cfg.exposed_headers {
        if !exposed.contains(&h.as_str()) {
            exposed.push(h.as_str());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&exposed.join(", ")) {
        out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

/// Client input for an error message: a header name or method as sent, when it is a
/// short token, else a placeholder.
fn shown(s: &str) -> String {
    let token = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
    if token { s.to_owned() } else { "?".into() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const APP: &str = "http://127.0.0.1:3000";

    fn list(credentials: bool) -> CorsConfig {
        CorsConfig {
            origins: CorsOrigins::List(vec![APP.into(), "https://app.example".into()]),
            allow_credentials: credentials,
            max_age_seconds: 600,
            exposed_headers: vec![http::HeaderName::from_static("x-request-id")],
        }
    }

    fn any() -> CorsConfig {
        CorsConfig {
            origins: CorsOrigins::Any,
            allow_credentials: false,
            max_age_seconds: 60,
            exposed_headers: vec![],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn preflight(origin: &str, method: &str, req_headers: &str) -> HeaderMap {
        headers(&[
            ("origin", origin),
            ("access-control-request-method", method),
            ("access-control-request-headers", req_headers),
        ])
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
        h.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    #[test]
    fn a_preflight_of_an_allowed_origin_is_answered() {
        let cfg = list(true);
        let out = check_preflight(
            Some(&cfg),
            &preflight(APP, "GET", "authorization, Prefer,if-none-match"),
        )
        .unwrap();
        assert_eq!(get(&out, "access-control-allow-origin"), APP);
        assert_eq!(get(&out, "access-control-allow-credentials"), "true");
        assert_eq!(
            get(&out, "access-control-allow-methods"),
            "GET, POST, HEAD, OPTIONS"
        );
        let allowed = get(&out, "access-control-allow-headers");
        for h in ["authorization", "content-type", "prefer", "if-match"] {
            assert!(allowed.split(", ").any(|a| a == h), "{h} in {allowed}");
        }
        assert_eq!(get(&out, "access-control-max-age"), "600");
        assert!(get(&out, "vary").starts_with("Origin"));
        // POST with a form body and no announced headers.
        let mut h = preflight(APP, "POST", "");
        h.remove("access-control-request-headers");
        assert!(check_preflight(Some(&cfg), &h).is_ok());
    }

    #[test]
    fn preflights_are_refused_for_other_origins_methods_and_headers() {
        let cfg = list(false);
        let refused = |h: HeaderMap| check_preflight(Some(&cfg), &h).unwrap_err();
        for origin in [
            "http://127.0.0.1:3001",
            "http://localhost:3000",
            "https://127.0.0.1:3000",
            "http://127.0.0.1:3000/",
            "HTTP://127.0.0.1:3000",
            "null",
            "https://app.example.evil",
            "https://evil.app.example",
        ] {
            assert_eq!(
                refused(preflight(origin, "GET", "authorization")),
                CorsError::OriginNotAllowed,
                "{origin}"
            );
        }
        // Two Origin headers: neither is believed.
        let mut h = preflight(APP, "GET", "authorization");
        h.append("origin", HeaderValue::from_static("https://app.example"));
        assert_eq!(refused(h), CorsError::OriginNotAllowed);
        for m in ["PUT", "DELETE", "PATCH", "get", "CONNECT"] {
            assert_eq!(
                refused(preflight(APP, m, "")),
                CorsError::MethodNotAllowed(m.into())
            );
        }
        assert_eq!(
            refused(preflight(APP, "GET", "authorization, x-secret")),
            CorsError::HeaderNotAllowed("x-secret".into())
        );
        assert_eq!(
            refused(preflight(APP, "GET", "cookie")),
            CorsError::HeaderNotAllowed("cookie".into())
        );
        // No `cors` block: nothing is allowed.
        assert_eq!(
            check_preflight(None, &preflight(APP, "GET", "")).unwrap_err(),
            CorsError::OriginNotAllowed
        );
        // Client input is quoted only when it is a plain token.
        let e = refused(preflight(APP, "GET", "authorization, bad header name"));
        assert_eq!(e, CorsError::HeaderNotAllowed("?".into()));
        assert_eq!(e.reason(), "cors_header_not_allowed");
    }

    #[test]
    fn wildcard_only_without_credentials() {
        let out = check_preflight(
            Some(&any()),
            &preflight("https://anyone.example", "GET", "authorization"),
        )
        .unwrap();
        assert_eq!(get(&out, "access-control-allow-origin"), "*");
        assert!(out.get("access-control-allow-credentials").is_none());
        // Were `*` ever combined with credentials, nothing would be allowed.
        let broken = CorsConfig {
            allow_credentials: true,
            ..any()
        };
        assert_eq!(
            allow_origin(&broken, &HeaderValue::from_static("https://anyone.example")),
            None
        );
    }

    #[test]
    fn answers_to_allowed_origins_are_readable_others_are_not() {
        let cfg = list(true);
        let mut out = headers(&[("www-authenticate", "Bearer"), ("vary", "Accept")]);
        decorate(Some(&cfg), Some(&HeaderValue::from_static(APP)), &mut out);
        assert_eq!(get(&out, "access-control-allow-origin"), APP);
        assert_eq!(get(&out, "access-control-allow-credentials"), "true");
        let exposed = get(&out, "access-control-expose-headers");
        assert!(exposed.contains("www-authenticate"), "{exposed}");
        assert!(exposed.contains("x-request-id"), "{exposed}");
        let vary: Vec<&str> = out
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(vary, ["Accept", "Origin"]);

        let mut out = HeaderMap::new();
        let evil = HeaderValue::from_static("https://evil.example");
        decorate(Some(&cfg), Some(&evil), &mut out);
        assert!(out.get("access-control-allow-origin").is_none());
        assert!(out.get("access-control-expose-headers").is_none());
        assert_eq!(get(&out, "vary"), "Origin");

        // No Origin at all (not a browser's cross-origin request): only `Vary`.
        let mut out = HeaderMap::new();
        decorate(Some(&cfg), None, &mut out);
        assert_eq!(out.len(), 1);

        // A tenant without `cors`: nothing.
        let mut out = HeaderMap::new();
        decorate(None, Some(&HeaderValue::from_static(APP)), &mut out);
        assert!(out.is_empty());

        // `*`: no Vary needed, never credentials.
        let mut out = HeaderMap::new();
        decorate(
            Some(&any()),
            Some(&HeaderValue::from_static("https://x.example")),
            &mut out,
        );
        assert_eq!(get(&out, "access-control-allow-origin"), "*");
        assert!(out.get("access-control-allow-credentials").is_none());
        assert!(out.get("vary").is_none());
    }

    #[test]
    fn only_options_with_a_requested_method_is_a_preflight() {
        let h = preflight(APP, "GET", "");
        assert!(is_preflight(&Method::OPTIONS, &h));
        assert!(!is_preflight(&Method::GET, &h));
        assert!(!is_preflight(
            &Method::OPTIONS,
            &headers(&[("origin", APP)])
        ));
    }
}
