//! `ProxyError`: the one error type that crosses stage boundaries.
//!
//! Each stage owns its error enum; `ProxyError` wraps them and only classifies them
//! (status, FHIR issue code, stable reason id, `WWW-Authenticate`). Rendering happens
//! in exactly one place, the outermost layer (`stack::RenderErrors`).
//!
//! A stage adapter fails with an enum of what it can run into (`ValidateTokenError`,
//! `AuthorizeError`, ...): its own decisions' errors, those of earlier stages it runs
//! again or builds on, and a missing extension ([`Internal`]). The conversions below
//! take such an enum apart into the error it wraps, so a failure is classified and
//! rendered the same whichever stage met it.

use http::StatusCode;

use crate::authz::{AuthorizeError, AuthzError};
use crate::cors::CorsError;
use crate::cursor::CursorError;
use crate::discovery::DiscoveryError;
use crate::discovery::udap::UdapError;
use crate::fhir::RequestError;
use crate::fhir::bundle::{BundleError, EntryError};
use crate::forward::ForwardError;
use crate::limits::{ChargeClientError, LimitError};
use crate::pipeline::Internal;
use crate::rewrite::RewriteError;
use crate::scope::{CheckScopeError, ScopeError};
use crate::tenant::TenantError;
use crate::token::{TokenError, ValidateTokenError};
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Tenant(#[from] TenantError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// Refused by a limit (load shedding, rate limit) before the work is done.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A CORS preflight the tenant does not allow.
    #[error(transparent)]
    Cors(#[from] CorsError),
    /// `/.well-known/udap`: UDAP not enabled, a bad query, or no signature.
    #[error(transparent)]
    Udap(#[from] UdapError),
    /// The audit record of an answer could not be queued and the audit sink fails
    /// closed: nothing goes out unrecorded.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditFull),
    /// A batch or transaction Bundle that cannot be processed as a whole.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// One entry of a batch or transaction that is malformed or unsupported.
    #[error(transparent)]
    BundleEntry(#[from] EntryError),
    /// A transaction refused because of one entry (1-based `index`, as
    /// `Bundle.entry[index - 1]`): nothing was sent upstream. Classified as that
    /// entry's error.
    #[error("transaction entry {index}: {error}")]
    TransactionEntry {
        index: usize,
        error: Box<ProxyError>,
    },
    /// `Patient/$match` refused (`forward::patient_match`).
    #[error(transparent)]
    Match(#[from] crate::forward::patient_match::MatchError),
    /// A broken invariant inside the proxy (e.g. a stage's extension is missing).
    /// Never a silent pass: the request fails with 500.
    #[error("internal error")]
    Internal(&'static str),
}

impl From<Internal> for ProxyError {
    fn from(e: Internal) -> Self {
        ProxyError::Internal(e.0)
    }
}

impl From<DiscoveryError> for ProxyError {
    fn from(e: DiscoveryError) -> Self {
        match e {
            DiscoveryError::Upstream(e) => ProxyError::Upstream(e),
            DiscoveryError::Udap(e) => ProxyError::Udap(e),
            DiscoveryError::Internal(e) => e.into(),
        }
    }
}

impl From<ValidateTokenError> for ProxyError {
    fn from(e: ValidateTokenError) -> Self {
        match e {
            ValidateTokenError::Token(e) => ProxyError::Token(e),
            ValidateTokenError::Internal(e) => e.into(),
        }
    }
}

impl From<ChargeClientError> for ProxyError {
    fn from(e: ChargeClientError) -> Self {
        match e {
            ChargeClientError::Limit(e) => ProxyError::Limit(e),
            ChargeClientError::Internal(e) => e.into(),
        }
    }
}

impl From<CheckScopeError> for ProxyError {
    fn from(e: CheckScopeError) -> Self {
        match e {
            CheckScopeError::Scope(e) => ProxyError::Scope(e),
            CheckScopeError::Internal(e) => e.into(),
        }
    }
}

impl From<AuthorizeError> for ProxyError {
    fn from(e: AuthorizeError) -> Self {
        match e {
            AuthorizeError::Authz(e) => ProxyError::Authz(e),
            AuthorizeError::Upstream(e) => ProxyError::Upstream(e),
            AuthorizeError::Internal(e) => e.into(),
        }
    }
}

impl From<crate::authz::write::CheckWriteError> for ProxyError {
    fn from(e: crate::authz::write::CheckWriteError) -> Self {
        use crate::authz::write::CheckWriteError;
        match e {
            CheckWriteError::Authz(e) => ProxyError::Authz(e),
            CheckWriteError::Upstream(e) => ProxyError::Upstream(e),
            CheckWriteError::Internal(e) => e.into(),
        }
    }
}

/// The forwarding stage's errors are those of the stages they come from.
impl From<ForwardError> for ProxyError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Upstream(e) => ProxyError::Upstream(e),
            ForwardError::Authz(e) => ProxyError::Authz(e),
            ForwardError::Match(e) => ProxyError::Match(e),
            ForwardError::Internal(e) => e.into(),
        }
    }
}

/// Stage 4's errors are those of the decisions it runs.
impl From<RewriteError> for ProxyError {
    fn from(e: RewriteError) -> Self {
        match e {
            RewriteError::Authz(e) => ProxyError::Authz(e),
            RewriteError::Scope(e) => ProxyError::Scope(e),
            RewriteError::Cursor(e) => ProxyError::Cursor(e),
            RewriteError::Capabilities(e) => e.into(),
            RewriteError::Internal(e) => e.into(),
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Tenant(e) => e.status(),
            ProxyError::Request(e) => e.status(),
            ProxyError::Token(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Token(TokenError::MalformedHeader) => StatusCode::BAD_REQUEST,
            ProxyError::Token(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Scope(_) => StatusCode::FORBIDDEN,
            ProxyError::Authz(e) => e.status(),
            ProxyError::Upstream(e) => e.status(),
            ProxyError::Cursor(e) => e.status(),
            ProxyError::Limit(e) => e.status(),
            ProxyError::Cors(e) => e.status(),
            ProxyError::Udap(e) => e.status(),
            ProxyError::Audit(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Bundle(BundleError::TooManyEntries { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Bundle(_) => StatusCode::BAD_REQUEST,
            ProxyError::BundleEntry(e) => e.status(),
            ProxyError::TransactionEntry { error, .. } => error.status(),
            ProxyError::Match(e) => e.status(),
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// FHIR `IssueType` code for the OperationOutcome.
    pub fn issue_code(&self) -> &'static str {
        match self {
            ProxyError::Limit(_) => return "throttled",
            ProxyError::TransactionEntry { error, .. } => return error.issue_code(),
            ProxyError::BundleEntry(
                EntryError::ReadInTransaction | EntryError::Nested | EntryError::Method { .. },
            ) => return "not-supported",
            _ => {}
        }
        match self.status() {
            StatusCode::UNAUTHORIZED => "login",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => "not-supported",
            StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "timeout",
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "transient",
            s if s.is_client_error() => "invalid",
            _ => "exception",
        }
    }

    /// Stable machine-readable reason id (also the audit record's `authz.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Tenant(e) => e.reason(),
            ProxyError::Request(e) => e.reason(),
            ProxyError::Token(e) => e.reason(),
            ProxyError::Scope(e) => e.reason(),
            ProxyError::Authz(e) => e.reason(),
            ProxyError::Upstream(e) => e.reason(),
            ProxyError::Cursor(e) => e.reason(),
            ProxyError::Limit(e) => e.reason(),
            ProxyError::Cors(e) => e.reason(),
            ProxyError::Udap(e) => e.reason(),
            ProxyError::Audit(_) => "audit_unavailable",
            ProxyError::Bundle(e) => e.reason(),
            ProxyError::BundleEntry(e) => e.reason(),
            ProxyError::TransactionEntry { error, .. } => error.reason(),
            ProxyError::Match(e) => e.reason(),
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The reason id shown to the client. Equal to [`ProxyError::reason`] except where
    /// the truth would be an oracle: a record hidden with 404 is reported exactly like
    /// a missing one. The audit record always carries the true reason.
    pub fn client_reason(&self) -> &'static str {
        match self {
            ProxyError::Authz(AuthzError::Hidden { status })
                if *status == StatusCode::NOT_FOUND =>
            {
                crate::upstream::UpstreamError::NotFound.reason()
            }
            ProxyError::TransactionEntry { error, .. } => error.client_reason(),
            other => other.reason(),
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3), if any.
    pub fn www_authenticate(&self, realm: Option<&str>) -> Option<String> {
        if let ProxyError::TransactionEntry { error, .. } = self {
            return error.www_authenticate(realm);
        }
        let realm = realm
            .map(|r| format!("realm=\"{r}\", "))
            .unwrap_or_default();
        match self {
            // No credentials at all: a bare challenge, no error code (RFC 6750 3.1).
            ProxyError::Token(TokenError::Missing) => {
                Some(format!("Bearer {}", realm.trim_end_matches(", ")))
            }
            ProxyError::Token(TokenError::MalformedHeader) => {
                Some(format!("Bearer {realm}error=\"invalid_request\""))
            }
            ProxyError::Token(e) if !e.is_unavailable() => Some(format!(
                "Bearer {realm}error=\"invalid_token\", error_description=\"{e}\""
            )),
            ProxyError::Scope(_) => Some(format!("Bearer {realm}error=\"insufficient_scope\"")),
            _ => None,
        }
        .map(|s| s.trim_end().to_owned())
    }

    /// The `Retry-After` value in seconds, for refusals that say when to come back.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::Limit(e) => Some(e.retry_after_secs()),
            ProxyError::TransactionEntry { error, .. } => error.retry_after_secs(),
            _ => None,
        }
    }

    /// Client-facing text: fixed and safe. Internal details go to logs only.
    pub fn client_message(&self) -> String {
        match self {
            ProxyError::Internal(_) => "internal error".into(),
            ProxyError::Upstream(e) => e.to_string(),
            ProxyError::TransactionEntry { index, error } => {
                format!("transaction entry {index}: {}", error.client_message())
            }
            other => other.to_string(),
        }
    }
}
