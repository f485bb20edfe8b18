//! JWKS key source: fetches a tenant's JWK Set, caches it, refreshes on unknown `kid`.
//!
//! Guarantees: key sets are cached per tenant and JWKS URI, so two tenants that name
//! the same JWKS each live by their own `jwks_cache_seconds` and
//! `jwks_min_refresh_seconds` (one tenant's fetches, refreshes and settings never
//! decide what another tenant verifies with), while a reload keeps the warm cache of a
//! tenant whose id and URI stay; a cached set older than the tenant's current lifetime
//! is refetched, so a reload that shortens it applies at once. Concurrent misses for
//! one tenant and URI cause a single fetch (moka's per-key compute serializes them);
//! fetch errors are never cached; an unknown `kid` triggers at most one refetch per
//! `min_refresh` interval, so a flood of forged `kid`s cannot turn the proxy into a
//! load generator against the issuer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};

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
    fetched_at: Instant,
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
            fetched_at: Instant::now(),
        }
    }

    /// Whether the set is still within a lifetime of `ttl` (the asking tenant's).
    fn fresh_for(&self, ttl: Duration) -> bool {
        self.fetched_at.elapsed() < ttl
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

/// A cache key: the tenant id and the JWKS URI.
type SetKey = (String, String);

struct KeySetExpiry;

impl Expiry<SetKey, Arc<KeySet>> for KeySetExpiry {
    fn expire_after_create(
        &self,
        _key: &SetKey,
        value: &Arc<KeySet>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    /// A replaced set (a refresh) lives its own lifetime, not the rest of the old one's.
    fn expire_after_update(
        &self,
        _key: &SetKey,
        value: &Arc<KeySet>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A boxed future borrowing its arguments.
pub type JwksFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, TokenError>> + Send + 'a>>;

/// The I/O behind the key cache: GET a JWK Set document (bounded in time and size).
/// [`HttpJwks`] is the real one; parsing, fingerprinting and caching stay in
/// [`JwksKeySource`].
pub trait JwksFetch: Send + Sync + 'static {
    fn fetch<'a>(&'a self, uri: &'a url::Url, timeout: Duration) -> JwksFuture<'a>;
}

/// JWK Sets over HTTP(S), at most `MAX_JWKS_BYTES`.
pub struct HttpJwks(pub reqwest::Client);

impl JwksFetch for HttpJwks {
    fn fetch<'a>(&'a self, uri: &'a url::Url, timeout: Duration) -> JwksFuture<'a> {
        Box::pin(async move {
            let resp = self
                .0
                .get(uri.clone())
                .timeout(timeout)
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
            crate::fetch::read_capped(resp, MAX_JWKS_BYTES)
                .await
                .map_err(|_| TokenError::JwksUnavailable)
        })
    }
}

/// Fetches and caches JWK Sets by tenant and URI. One per process, outliving
/// configuration reloads, so a reload keeps the warm caches of unchanged tenants.
#[derive(Clone)]
pub struct JwksKeySource {
    http: Arc<dyn JwksFetch>,
    cache: Cache<SetKey, Arc<KeySet>>,
    /// When each tenant's JWKS was last refetched for an unknown `kid` (few entries:
    /// one per configured tenant).
    last_refresh: Arc<std::sync::Mutex<std::collections::HashMap<SetKey, Instant>>>,
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
        Self::with_fetch(Arc::new(HttpJwks(http)))
    }

    /// A key source over any [`JwksFetch`].
    pub fn with_fetch(http: Arc<dyn JwksFetch>) -> Self {
        JwksKeySource {
            http,
            last_refresh: Arc::default(),
            cache: Cache::builder()
                .max_capacity(1_000)
                .expire_after(KeySetExpiry)
                .build(),
        }
    }

    /// Returns `tenant`'s cached key set for `uri`, fetching it on a miss or when the
    /// cached set is older than `policy.ttl`.
    pub async fn key_set(
        &self,
        tenant: &str,
        uri: &url::Url,
        policy: JwksPolicy,
    ) -> Result<Arc<KeySet>, TokenError> {
        let key = set_key(tenant, uri);
        let metrics = crate::metrics::global();
        let label = metrics.tenant(tenant);
        if let Some(set) = self.cache.get(&key).await
            && set.fresh_for(policy.ttl)
        {
            metrics.jwks_cache(label, true);
            return Ok(set);
        }
        metrics.jwks_cache(label, false);
        // A miss, or a set older than the tenant's current lifetime (a reload shortened
        // it). The compute is serialized per key: concurrent callers wait for one fetch
        // and then find the fresh set.
        let http = Arc::clone(&self.http);
        let result = self
            .cache
            .entry(key)
            .and_try_compute_with(|entry| async move {
                if let Some(entry) = entry
                    && entry.value().fresh_for(policy.ttl)
                {
                    return Ok(Op::Nop);
                }
                fetch(&*http, tenant, uri, policy)
                    .await
                    .map(|set| Op::Put(Arc::new(set)))
            })
            .await?;
        match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Ok(e.into_value())
            }
            CompResult::Removed(_) | CompResult::StillNone(_) => Err(TokenError::JwksUnavailable),
        }
    }

    /// The serial of `tenant`'s cached key set for `uri`, without fetching.
    pub async fn current_serial(&self, tenant: &str, uri: &url::Url) -> Option<u64> {
        self.cache
            .get(&set_key(tenant, uri))
            .await
            .map(|k| k.serial)
    }

    /// Called when a token names a `kid` the cached set lacks: refetches at most once
    /// per `min_refresh` per tenant and JWKS URI. The cached set is replaced only by a
    /// good answer whose keys differ from it, so a forged `kid` can neither evict
    /// working keys (an unreachable issuer keeps them in place) nor churn the key-set
    /// serial.
    pub async fn refresh_for_unknown_kid(
        &self,
        tenant: &str,
        uri: &url::Url,
        stale: &Arc<KeySet>,
        policy: JwksPolicy,
    ) -> Result<Option<Arc<KeySet>>, TokenError> {
        let key = set_key(tenant, uri);
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
        let fresh = match fetch(&*self.http, tenant, uri, policy).await {
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

fn set_key(tenant: &str, uri: &url::Url) -> SetKey {
    (tenant.to_owned(), uri.as_str().to_owned())
}

/// Fetches and parses `tenant`'s JWK Set, counting the fetch.
async fn fetch(
    http: &dyn JwksFetch,
    tenant: &str,
    uri: &url::Url,
    policy: JwksPolicy,
) -> Result<KeySet, TokenError> {
    let metrics = crate::metrics::global();
    let result = fetch_set(http, uri, policy).await;
    metrics.jwks_fetch(metrics.tenant(tenant), result.is_ok());
    result
}

async fn fetch_set(
    http: &dyn JwksFetch,
    uri: &url::Url,
    policy: JwksPolicy,
) -> Result<KeySet, TokenError> {
    let started = Instant::now();
    let body = http.fetch(uri, policy.timeout).await?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A JWKS endpoint that answers from a list, counting calls: the cache and the
    /// unknown-`kid` refresh rules, without a network.
    struct Scripted {
        answers: std::sync::Mutex<Vec<Result<Vec<u8>, TokenError>>>,
        calls: AtomicUsize,
    }

    impl JwksFetch for Scripted {
        fn fetch<'a>(&'a self, _uri: &'a url::Url, _timeout: Duration) -> JwksFuture<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.answers.lock().unwrap().remove(0);
            Box::pin(async move { next })
        }
    }

    fn jwks(kid: &str) -> Vec<u8> {
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]})
        .to_string()
        .into_bytes()
    }

    const POLICY: JwksPolicy = JwksPolicy {
        ttl: Duration::from_secs(300),
        min_refresh: Duration::from_secs(60),
        timeout: Duration::from_secs(1),
    };

    #[tokio::test]
    async fn key_sets_are_cached_and_a_failed_refresh_keeps_the_working_set() {
        let endpoint = Arc::new(Scripted {
            answers: std::sync::Mutex::new(vec![Ok(jwks("k1")), Err(TokenError::JwksUnavailable)]),
            calls: AtomicUsize::new(0),
        });
        let source = JwksKeySource::with_fetch(Arc::clone(&endpoint) as Arc<dyn JwksFetch>);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        let first = source.key_set("t1", &uri, POLICY).await.unwrap();
        let again = source.key_set("t1", &uri, POLICY).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
        // An unknown kid refetches once; the issuer is down, so nothing changes.
        assert!(
            source
                .refresh_for_unknown_kid("t1", &uri, &first, POLICY)
                .await
                .unwrap()
                .is_none()
        );
        // Within `min_refresh`, no second refetch at all.
        assert!(
            source
                .refresh_for_unknown_kid("t1", &uri, &first, POLICY)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        let still = source.key_set("t1", &uri, POLICY).await.unwrap();
        assert!(Arc::ptr_eq(&first, &still));
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_jwks_unavailable() {
        let endpoint = Arc::new(Scripted {
            answers: std::sync::Mutex::new(vec![
                Err(TokenError::JwksUnavailable),
                Ok(b"not json".to_vec()),
            ]),
            calls: AtomicUsize::new(0),
        });
        let source = JwksKeySource::with_fetch(endpoint);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        assert!(matches!(
            source.key_set("t1", &uri, POLICY).await,
            Err(TokenError::JwksUnavailable)
        ));
        // Errors are not cached; a broken document is unavailable too.
        assert!(matches!(
            source.key_set("t1", &uri, POLICY).await,
            Err(TokenError::JwksUnavailable)
        ));
    }

    fn scripted(answers: Vec<Result<Vec<u8>, TokenError>>) -> Arc<Scripted> {
        Arc::new(Scripted {
            answers: std::sync::Mutex::new(answers),
            calls: AtomicUsize::new(0),
        })
    }

    fn with_ttl(ttl: Duration) -> JwksPolicy {
        JwksPolicy { ttl, ..POLICY }
    }

    #[tokio::test]
    async fn tenants_sharing_a_jwks_uri_each_live_by_their_own_lifetime() {
        let endpoint = scripted(vec![Ok(jwks("k1")), Ok(jwks("k1")), Ok(jwks("k2"))]);
        let source = JwksKeySource::with_fetch(Arc::clone(&endpoint) as Arc<dyn JwksFetch>);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        let long = with_ttl(Duration::from_secs(300));
        let short = with_ttl(Duration::from_millis(150));
        // The long-lived tenant fetches first; the other still gets a set of its own.
        let a = source.key_set("long", &uri, long).await.unwrap();
        let b = source.key_set("short", &uri, short).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Past its own lifetime the short-lived tenant refetches (and sees the
        // rotation); the other keeps its set.
        let b2 = source.key_set("short", &uri, short).await.unwrap();
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
        assert!(b2.find(Some("k2"), Algorithm::ES256).is_some());
        let a2 = source.key_set("long", &uri, long).await.unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert!(a2.find(Some("k2"), Algorithm::ES256).is_none());
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn one_tenants_unknown_kid_refresh_governs_no_other_tenant() {
        let endpoint = scripted(vec![
            Ok(jwks("k1")),
            Ok(jwks("k1")),
            Ok(jwks("k2")),
            Ok(jwks("k2")),
        ]);
        let source = JwksKeySource::with_fetch(Arc::clone(&endpoint) as Arc<dyn JwksFetch>);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        let a = source.key_set("a", &uri, POLICY).await.unwrap();
        let b = source.key_set("b", &uri, POLICY).await.unwrap();
        // Tenant a refreshes for a new kid: its set is replaced, b's is not.
        let a2 = source
            .refresh_for_unknown_kid("a", &uri, &a, POLICY)
            .await
            .unwrap()
            .expect("a new set");
        assert!(a2.find(Some("k2"), Algorithm::ES256).is_some());
        let b_now = source.key_set("b", &uri, POLICY).await.unwrap();
        assert!(Arc::ptr_eq(&b, &b_now));
        assert_eq!(source.current_serial("b", &uri).await, Some(b.serial));
        // a's refresh spent a's budget only: b may still refresh at once.
        assert!(
            source
                .refresh_for_unknown_kid("a", &uri, &a2, POLICY)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
        let b2 = source
            .refresh_for_unknown_kid("b", &uri, &b, POLICY)
            .await
            .unwrap()
            .expect("b refreshes on its own budget");
        assert!(b2.find(Some("k2"), Algorithm::ES256).is_some());
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_reload_keeps_a_warm_set_and_a_shortened_lifetime_applies_at_once() {
        let endpoint = scripted(vec![Ok(jwks("k1")), Ok(jwks("k2"))]);
        let source = JwksKeySource::with_fetch(Arc::clone(&endpoint) as Arc<dyn JwksFetch>);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        let first = source.key_set("t1", &uri, POLICY).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The same tenant after a reload that kept its settings: the warm set.
        let again = source.key_set("t1", &uri, POLICY).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
        // A reload shortened the lifetime below the set's age: refetched now, not when
        // the lifetime it was fetched under runs out.
        let shorter = with_ttl(Duration::from_millis(100));
        let fresh = source.key_set("t1", &uri, shorter).await.unwrap();
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        assert!(fresh.find(Some("k2"), Algorithm::ES256).is_some());
        assert_eq!(source.current_serial("t1", &uri).await, Some(fresh.serial));
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_tenant_cause_one_fetch() {
        let endpoint = scripted(vec![Ok(jwks("k1"))]);
        let source = JwksKeySource::with_fetch(Arc::clone(&endpoint) as Arc<dyn JwksFetch>);
        let uri = url::Url::parse("https://issuer.example/jwks").unwrap();
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (source, uri) = (source.clone(), uri.clone());
                tokio::spawn(
                    async move { source.key_set("t1", &uri, POLICY).await.unwrap().serial },
                )
            })
            .collect();
        let mut serials = Vec::new();
        for c in calls {
            serials.push(c.await.unwrap());
        }
        assert!(serials.windows(2).all(|w| w[0] == w[1]), "{serials:?}");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
    }
}
