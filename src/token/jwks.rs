//! JWKS key source: fetches a tenant's JWK Set, caches it, refreshes on unknown `kid`.
//!
//! Guarantees: concurrent misses for one JWKS URI cause a single fetch (moka's
//! `try_get_with` coalesces them); fetch errors are never cached; an unknown `kid`
//! triggers at most one refetch per `min_refresh` interval, so a flood of forged `kid`s
//! cannot turn the proxy into a load generator against the issuer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use moka::Expiry;
use moka::future::Cache;

use super::TokenError;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One usable key from a JWKS.
pub struct VerificationKey {
    pub kid: Option<String>,
    /// The key's `alg`, when the JWK pins one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

/// A fetched JWK Set, ready for verification.
pub struct KeySet {
    pub keys: Vec<VerificationKey>,
    /// Unique per fetch: lets a cached verification tell whether the key set it was
    /// made with is still the current one.
    pub serial: u64,
    /// Hash of the fetched document: tells an unchanged refetch from a rotation.
    fingerprint: u64,
    ttl: Duration,
}

impl KeySet {
    fn from_jwks(set: &JwkSet, ttl: Duration, fingerprint: u64) -> Self {
        let keys = set
            .keys
            .iter()
            .filter(|jwk| is_signing_key(jwk))
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some(VerificationKey {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm.and_then(key_algorithm),
                    key,
                })
            })
            .collect();
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        KeySet {
            keys,
            fingerprint,
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ttl,
        }
    }

    /// The key for a token header: by `kid` when the token names one; without a `kid`,
    /// only when the set holds exactly one candidate key for the algorithm.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&VerificationKey> {
        let alg_ok = |k: &&VerificationKey| k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(alg_ok)
                .find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut it = self.keys.iter().filter(alg_ok);
                match (it.next(), it.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        }
    }
}

fn is_signing_key(jwk: &Jwk) -> bool {
    !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

struct KeySetExpiry;

impl Expiry<String, Arc<KeySet>> for KeySetExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<KeySet>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Fetches and caches JWK Sets by URI. Shared by all tenants, so a config reload keeps
/// warm caches.
#[derive(Clone)]
pub struct JwksKeySource {
    http: reqwest::Client,
    cache: Cache<String, Arc<KeySet>>,
    /// When each JWKS URI was last refetched for an unknown `kid` (few URIs: one per
    /// configured issuer).
    last_refresh: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

/// What a tenant's token config says about its JWKS.
#[derive(Clone, Copy)]
pub struct JwksPolicy {
    pub ttl: Duration,
    pub min_refresh: Duration,
    pub timeout: Duration,
}

impl JwksKeySource {
    pub fn new(http: reqwest::Client) -> Self {
        JwksKeySource {
            http,
            last_refresh: Arc::default(),
            cache: Cache::builder()
                .max_capacity(1_000)
                .expire_after(KeySetExpiry)
                .build(),
        }
    }

    /// Returns the cached key set for `uri`, fetching it on a miss.
    pub async fn key_set(
        &self,
        uri: &url::Url,
        policy: JwksPolicy,
    ) -> Result<Arc<KeySet>, TokenError> {
        let http = self.http.clone();
        let u = uri.clone();
        self.cache
            .try_get_with(uri.as_str().to_owned(), async move {
                fetch(&http, &u, policy).await.map(Arc::new)
            })
            .await
            .map_err(|e: Arc<TokenError>| (*e).clone())
    }

    /// The serial of the cached key set for `uri`, without fetching.
    pub async fn current_serial(&self, uri: &url::Url) -> Option<u64> {
        self.cache.get(uri.as_str()).await.map(|k| k.serial)
    }

    /// Called when a token names a `kid` the cached set lacks: refetches at most once
    /// per `min_refresh` per JWKS URI. The cached set is replaced only by a good answer
    /// whose keys differ from it, so a forged `kid` can neither evict working keys
    /// (an unreachable issuer keeps them in place) nor churn the key-set serial.
    pub async fn refresh_for_unknown_kid(
        &self,
        uri: &url::Url,
        stale: &Arc<KeySet>,
        policy: JwksPolicy,
    ) -> Result<Option<Arc<KeySet>>, TokenError> {
        let key = uri.as_str().to_owned();
        // A concurrent refresh may already have replaced the set.
        if let Some(current) = self.cache.get(&key).await
            && !Arc::ptr_eq(&current, stale)
        {
            return Ok(Some(current));
        }
        {
            let mut last = match self.last_refresh.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let now = Instant::now();
            if last
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < policy.min_refresh)
            {
                return Ok(None);
            }
            last.insert(key.clone(), now);
        }
        let fresh = match fetch(&self.http, uri, policy).await {
            Ok(fresh) => fresh,
            // The token's key stays unknown; the working set stays cached.
            Err(_) => return Ok(None),
        };
        if fresh.fingerprint == stale.fingerprint {
            return Ok(None);
        }
        let fresh = Arc::new(fresh);
        self.cache.insert(key, Arc::clone(&fresh)).await;
        Ok(Some(fresh))
    }
}

async fn fetch(
    http: &reqwest::Client,
    uri: &url::Url,
    policy: JwksPolicy,
) -> Result<KeySet, TokenError> {
    let started = Instant::now();
    let resp = http
        .get(uri.clone())
        .timeout(policy.timeout)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(jwks.uri = %uri, error = %e, "jwks fetch failed");
            TokenError::JwksUnavailable
        })?;
    if !resp.status().is_success() {
        tracing::warn!(jwks.uri = %uri, status = %resp.status(), "jwks fetch failed");
        return Err(TokenError::JwksUnavailable);
    }
    let body = crate::fetch::read_capped(resp, MAX_JWKS_BYTES)
        .await
        .map_err(|_| TokenError::JwksUnavailable)?;
    let set: JwkSet = serde_json::from_slice(&body).map_err(|e| {
        tracing::warn!(jwks.uri = %uri, error = %e, "jwks is not a valid JWK Set");
        TokenError::JwksUnavailable
    })?;
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        h.finish()
    };
    let keys = KeySet::from_jwks(&set, policy.ttl, fingerprint);
    tracing::info!(
        jwks.uri = %uri,
        jwks.keys = keys.keys.len(),
        latency_ms = started.elapsed().as_millis() as u64,
        "jwks fetched"
    );
    Ok(keys)
}
