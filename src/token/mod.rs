//! Stage 1: bearer token validation.
//!
//! Sits after the tenant stage (which provides `TenantCtx`) and before scopes. It
//! guarantees that a request carrying a [`VerifiedToken`] extension presented a JWT
//! that: is signed by a key from the tenant's JWKS with an algorithm the tenant
//! accepts (never `none`; HMAC only when a shared secret is configured); has an `iss`
//! the tenant trusts, an `aud` equal to the tenant's audience (exact string match, no
//! prefix), an `exp` in the future, and `nbf`/`iat` not in the future (with leeway);
//! and, where the tenant configures RFC 7662 introspection, is still active.
//! Tokens of a UDAP community issuer the tenant trusts are verified by that issuer's
//! keys instead ([`community`]); the tenant's introspection endpoint is not asked
//! about them (it is the tenant's own authorization server, which never issued them).
//! The token itself is never logged, stored in audit records, or forwarded upstream.

pub mod community;
pub mod introspect;
pub mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::future::Cache;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::config::{CommunityIssuer, CommunityKeys, TokenConfig};
use crate::fhir::{ResourceId, ResourceType};
use crate::pipeline::{Flow, Internal, Stage};
use crate::smart::{ScopeSet, parse_scopes};
use crate::tenant::tenant_of;
use jwks::{JwksKeySource, JwksPolicy};

/// Longest bearer token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The principal a request acts for, proven by a valid token.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub issuer: String,
    pub subject: Option<String>,
    pub client_id: Option<String>,
    pub scopes: ScopeSet,
    /// The `patient` launch context, when present and a valid FHIR id.
    pub patient: Option<ResourceId>,
    /// The `fhirUser` claim, when it names a FHIR resource.
    pub fhir_user: Option<FhirUser>,
    pub expires_at: u64,
}

/// A `fhirUser` claim: `Practitioner/pr1` or an absolute URL ending in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirUser {
    pub resource_type: ResourceType,
    pub id: ResourceId,
}

impl FhirUser {
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim_end_matches('/').rsplit('/');
        let id = ResourceId::parse(parts.next()?)?;
        let resource_type = ResourceType::parse(parts.next()?)?;
        Some(FhirUser { resource_type, id })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("the authorization header is not a single bearer token")]
    MalformedHeader,
    #[error("token is not a well-formed jwt")]
    Malformed,
    #[error("token signing algorithm is not accepted")]
    AlgorithmNotAccepted,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token has no expiry")]
    MissingExpiry,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not trusted")]
    WrongIssuer,
    #[error("token audience does not match")]
    WrongAudience,
    #[error("token claims are malformed")]
    BadClaims,
    #[error("token is not active")]
    Inactive,
    #[error("token keys are unavailable")]
    JwksUnavailable,
    #[error("token introspection is unavailable")]
    IntrospectionUnavailable,
    #[error("token of a community issuer has no x5c header")]
    X5cMissing,
    #[error("token x5c chain does not lead to a community trust anchor")]
    X5cUntrusted,
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::MalformedHeader => "token_header_malformed",
            TokenError::Malformed => "token_malformed",
            TokenError::AlgorithmNotAccepted => "token_algorithm",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::BadSignature => "token_signature",
            TokenError::Expired => "token_expired",
            TokenError::MissingExpiry => "token_missing_exp",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongIssuer => "token_issuer",
            TokenError::WrongAudience => "token_audience",
            TokenError::BadClaims => "token_claims",
            TokenError::Inactive => "token_inactive",
            TokenError::JwksUnavailable => "jwks_unavailable",
            TokenError::IntrospectionUnavailable => "introspection_unavailable",
            TokenError::X5cMissing => "token_x5c_missing",
            TokenError::X5cUntrusted => "token_x5c_untrusted",
        }
    }

    /// Whether the failure lies with the proxy's dependencies rather than the token.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            TokenError::JwksUnavailable | TokenError::IntrospectionUnavailable
        )
    }
}

/// Extracts the token from the `Authorization` header values of a request.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, TokenError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(TokenError::Missing);
    };
    if values.next().is_some() {
        return Err(TokenError::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| TokenError::MalformedHeader)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::MalformedHeader);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || token.contains(' ') {
        return Err(TokenError::MalformedHeader);
    }
    Ok(token)
}

/// Everything token validation needs from the process: the shared key cache and the
/// control-plane HTTP client.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: JwksKeySource,
    introspection: introspect::Introspector,
    /// Tokens whose signature and claims were verified, keyed by tenant configuration
    /// generation, tenant and token text. An entry lives at most until the token
    /// expires and never longer than the tenant's JWKS cache lifetime; it is honoured
    /// only while the JWKS key set it was verified with is still the current one, so a
    /// key rotation takes effect exactly as without the cache. Expiry is re-checked on
    /// every hit; introspection is never skipped.
    verified: Cache<String, Arc<CachedToken>>,
}

struct CachedToken {
    token: Arc<VerifiedToken>,
    /// The JWKS URI and serial of the key set the signature was checked with (`None`
    /// for HMAC and `x5c`).
    key_serial: Option<(url::Url, u64)>,
    ttl: Duration,
}

/// How a signature was verified: with which JWKS key set, and until when the key is
/// valid (an `x5c` leaf's `notAfter`).
struct Proof {
    key_serial: Option<(url::Url, u64)>,
    valid_until: Option<u64>,
}

struct CachedTokenExpiry;

impl moka::Expiry<String, Arc<CachedToken>> for CachedTokenExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<CachedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Largest number of verified tokens kept.
const VERIFIED_CACHE_CAPACITY: u64 = 100_000;

impl TokenVerifier {
    pub fn new(http: reqwest::Client) -> Self {
        TokenVerifier {
            keys: JwksKeySource::new(http.clone()),
            introspection: introspect::Introspector::new(http),
            verified: Cache::builder()
                .max_capacity(VERIFIED_CACHE_CAPACITY)
                .expire_after(CachedTokenExpiry)
                .build(),
        }
    }

    /// Verifies `token` for a tenant. `generation` identifies the tenant configuration
    /// snapshot, so a reload never reuses a verification made under other settings.
    pub async fn verify(
        &self,
        generation: u64,
        tenant_id: &str,
        cfg: &TokenConfig,
        token: &str,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        self.verify_with_communities(generation, tenant_id, cfg, &[], token)
            .await
    }

    /// As [`TokenVerifier::verify`], also accepting tokens of the tenant's trusted UDAP
    /// community issuers (`communities`, disjoint from `cfg.issuers`).
    pub async fn verify_with_communities(
        &self,
        generation: u64,
        tenant_id: &str,
        cfg: &TokenConfig,
        communities: &[CommunityIssuer],
        token: &str,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        let key = format!("{generation}\u{0}{tenant_id}\u{0}{token}");
        let now = now_secs();
        let leeway = cfg.leeway.as_secs();
        let hit = match self.verified.get(&key).await {
            Some(hit) if hit.token.expires_at.saturating_add(leeway) >= now => {
                // INVARIANT: a hit is honoured only while the key set it was verified
                // with is still the current one; a refresh (rotation) re-verifies.
                let keys_current = match &hit.key_serial {
                    None => true,
                    Some((uri, serial)) => {
                        self.keys.current_serial(tenant_id, uri).await == Some(*serial)
                    }
                };
                keys_current.then(|| hit.token.clone())
            }
            _ => None,
        };
        let metrics = crate::metrics::global();
        metrics.token_cache(metrics.tenant(tenant_id), hit.is_some());
        let verified = match hit {
            Some(token) => token,
            None => {
                // The key source is chosen on a miss only: a hit was verified by the
                // one its issuer names (the cache key holds the whole token).
                let (fresh, proof) = match community::issuer_of(communities, token) {
                    None => {
                        self.verify_signature_and_claims(tenant_id, cfg, &cfg.jwks_uri, true, token)
                            .await?
                    }
                    Some(c) => self.verify_community(tenant_id, cfg, c, token).await?,
                };
                let Proof {
                    key_serial,
                    valid_until,
                } = proof;
                let fresh = Arc::new(fresh);
                let mut remaining = fresh.expires_at.saturating_add(leeway).saturating_sub(now);
                if let Some(until) = valid_until {
                    remaining = remaining.min(until.saturating_sub(now));
                }
                let ttl = Duration::from_secs(remaining).min(cfg.jwks_cache);
                if !ttl.is_zero() {
                    let cached = CachedToken {
                        token: Arc::clone(&fresh),
                        key_serial,
                        ttl,
                    };
                    self.verified.insert(key, Arc::new(cached)).await;
                }
                fresh
            }
        };
        let from_community = communities.iter().any(|c| c.issuer == verified.issuer);
        if let Some(intro) = cfg.introspection.as_ref().filter(|_| !from_community) {
            self.introspection
                .check_active(tenant_id, intro, token, verified.expires_at)
                .await?;
        }
        Ok(verified)
    }

    /// A community issuer's token: by its JWKS, or by its `x5c` chain; `iss` must be
    /// that issuer.
    async fn verify_community(
        &self,
        tenant_id: &str,
        cfg: &TokenConfig,
        community: &CommunityIssuer,
        token: &str,
    ) -> Result<(VerifiedToken, Proof), TokenError> {
        let cfg = TokenConfig {
            issuers: vec![community.issuer.clone()],
            introspection: None,
            hmac_secret: None,
            ..cfg.clone()
        };
        match &community.keys {
            CommunityKeys::Jwks(uri) => {
                self.verify_signature_and_claims(tenant_id, &cfg, uri, false, token)
                    .await
            }
            CommunityKeys::X5c(anchors) => {
                let header =
                    jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
                if !cfg.algorithms.contains(&header.alg) || is_hmac(header.alg) {
                    return Err(TokenError::AlgorithmNotAccepted);
                }
                let (key, not_after) =
                    community::x5c_key(&header, &community.issuer, anchors, now_secs())?;
                let verified = verify_with_key(&cfg, header.alg, &key, token)?;
                let proof = Proof {
                    key_serial: None,
                    valid_until: Some(u64::try_from(not_after).unwrap_or(0)),
                };
                Ok((verified, proof))
            }
        }
    }

    /// Verifies signature and claims with the key set at `jwks_uri` (or the tenant's
    /// shared secret, when `hmac` allows it); also returns the key set used.
    async fn verify_signature_and_claims(
        &self,
        tenant_id: &str,
        cfg: &TokenConfig,
        jwks_uri: &url::Url,
        hmac: bool,
        token: &str,
    ) -> Result<(VerifiedToken, Proof), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !cfg.algorithms.contains(&header.alg) || (is_hmac(header.alg) && !hmac) {
            return Err(TokenError::AlgorithmNotAccepted);
        }
        let (verified, key_serial) = if is_hmac(header.alg) {
            let secret = cfg
                .hmac_secret
                .as_ref()
                .ok_or(TokenError::AlgorithmNotAccepted)?;
            let key = DecodingKey::from_secret(secret.expose());
            (verify_with_key(cfg, header.alg, &key, token)?, None)
        } else {
            let policy = JwksPolicy {
                ttl: cfg.jwks_cache,
                min_refresh: cfg.jwks_min_refresh,
                timeout: cfg.jwks_timeout,
            };
            let set = self.keys.key_set(tenant_id, jwks_uri, policy).await?;
            let kid = header.kid.as_deref();
            match set.find(kid, header.alg) {
                Some(k) => (
                    verify_with_key(cfg, header.alg, &k.key, token)?,
                    Some((jwks_uri.clone(), set.serial)),
                ),
                None => {
                    let fresh = self
                        .keys
                        .refresh_for_unknown_kid(tenant_id, jwks_uri, &set, policy)
                        .await?
                        .ok_or(TokenError::UnknownKey)?;
                    let k = fresh.find(kid, header.alg).ok_or(TokenError::UnknownKey)?;
                    (
                        verify_with_key(cfg, header.alg, &k.key, token)?,
                        Some((jwks_uri.clone(), fresh.serial)),
                    )
                }
            }
        };
        let proof = Proof {
            key_serial,
            valid_until: None,
        };
        Ok((verified, proof))
    }
}

/// The synchronous core: signature, registered claims and SMART claims, given the
/// key. `alg` must already be one the tenant accepts (checked against the header).
pub fn verify_with_key(
    cfg: &TokenConfig,
    alg: Algorithm,
    key: &DecodingKey,
    token: &str,
) -> Result<VerifiedToken, TokenError> {
    let claims = decode(token, key, &validation_for(cfg, alg))?;
    check_iat(&claims, cfg)?;
    claims_to_token(cfg, &claims)
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn validation_for(cfg: &TokenConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v.set_audience(&[cfg.audience.as_str()]);
    v.set_issuer(&cfg.issuers);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Map<String, Value>, TokenError> {
    use jsonwebtoken::errors::ErrorKind;
    jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "exp" => TokenError::MissingExpiry,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                TokenError::AlgorithmNotAccepted
            }
            ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey => TokenError::UnknownKey,
            _ => TokenError::Malformed,
        })
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `iat` in the future (beyond leeway) means a clock or issuer problem: refuse.
fn check_iat(claims: &serde_json::Map<String, Value>, cfg: &TokenConfig) -> Result<(), TokenError> {
    match claims.get("iat") {
        None => Ok(()),
        Some(v) => {
            let iat = v.as_f64().ok_or(TokenError::BadClaims)?;
            if iat > (now_secs() + cfg.leeway.as_secs()) as f64 {
                Err(TokenError::NotYetValid)
            } else {
                Ok(())
            }
        }
    }
}

fn claims_to_token(
    cfg: &TokenConfig,
    claims: &serde_json::Map<String, Value>,
) -> Result<VerifiedToken, TokenError> {
    let names = &cfg.claims;
    let str_claim = |name: &str| -> Result<Option<String>, TokenError> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(TokenError::BadClaims),
        }
    };
    let scopes = match claims.get(&names.scope) {
        None | Some(Value::Null) => ScopeSet::default(),
        Some(Value::String(s)) => parse_scopes(s),
        Some(Value::Array(items)) => {
            let mut strings = Vec::with_capacity(items.len());
            for item in items {
                strings.push(item.as_str().ok_or(TokenError::BadClaims)?);
            }
            ScopeSet::from_list(strings)
        }
        Some(_) => return Err(TokenError::BadClaims),
    };
    let patient = match str_claim(&names.patient)? {
        None => None,
        Some(p) => Some(ResourceId::parse(&p).ok_or(TokenError::BadClaims)?),
    };
    let fhir_user = str_claim(&names.fhir_user)?.and_then(|u| FhirUser::parse(&u));
    let client_id = match str_claim(&names.client_id)? {
        Some(c) => Some(c),
        None => str_claim("azp")?,
    };
    let issuer = str_claim("iss")?.ok_or(TokenError::WrongIssuer)?;
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(TokenError::MissingExpiry)? as u64;
    Ok(VerifiedToken {
        issuer,
        subject: str_claim("sub")?,
        client_id,
        scopes,
        patient,
        fhir_user,
        expires_at,
    })
}

/// A shared handle used by the layer.
pub type SharedVerifier = Arc<TokenVerifier>;

#[cfg(test)]
mod tests;

/// What stage 1 fails with.
#[derive(Debug, thiserror::Error)]
pub enum ValidateTokenError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// The stage: verifies the bearer token and writes [`VerifiedToken`].
pub struct ValidateToken {
    verifier: SharedVerifier,
}

impl ValidateToken {
    pub fn new(verifier: SharedVerifier) -> Self {
        ValidateToken { verifier }
    }
}

impl Stage for ValidateToken {
    type Error = ValidateTokenError;

    async fn run(&self, req: &mut http::Request<bytes::Bytes>) -> Result<Flow, Self::Error> {
        let tenant = Arc::clone(&tenant_of(req)?.0);
        let token = bearer_token(req.headers())?;
        let communities = tenant
            .config
            .udap
            .as_ref()
            .map_or(&[][..], |u| u.issuers.as_slice());
        let verified = self
            .verifier
            .verify_with_communities(
                tenant.generation,
                tenant.id(),
                &tenant.config.token,
                communities,
                token,
            )
            .await?;
        // The community that vouched for the token (its issuer is in one only).
        let community = communities.iter().find(|c| c.issuer == verified.issuer);
        if let Some(audit) = req.extensions().get::<crate::audit::AuditSlot>() {
            audit.set_principal(
                verified.client_id.clone(),
                verified.subject.clone(),
                verified.patient.as_ref().map(|p| p.as_str().to_owned()),
                verified
                    .fhir_user
                    .as_ref()
                    .map(|u| format!("{}/{}", u.resource_type, u.id)),
            );
            audit.set_issuer(&verified.issuer);
            if let Some(c) = community {
                audit.note(format!("token.community={}", c.community));
            }
        }
        // Defence in depth: nothing after this stage can forward the client's token.
        req.headers_mut().remove(http::header::AUTHORIZATION);
        // INVARIANT: the extension is `Arc<VerifiedToken>` (a cache hit shares it).
        req.extensions_mut().insert::<Arc<VerifiedToken>>(verified);
        Ok(Flow::Continue)
    }
}
