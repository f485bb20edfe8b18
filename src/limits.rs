//! Limits that refuse a request before the proxy does its work: load shedding and
//! per-client rate limits.
//!
//! **Load shedding.** The server admits at most `--max-concurrent-requests` requests at
//! a time; one more is answered at once with [`LimitError::Overloaded`] (503,
//! `Retry-After: 1`), never queued, so a burst cannot pile up latency for everyone.
//!
//! **Rate limits** (`--rate-limit-per-client`, off by default): a token bucket per
//! client, refilled at the configured rate and holding at most the burst. Over it, a
//! request is answered 429 with `Retry-After` ([`LimitError::RateLimited`]). Who the
//! client is:
//! - the token's client id (per tenant), when the token verifies: charged by
//!   [`ChargeClient`], the stage right after stage 1, so many users of one app behind
//!   one address (a hospital's NAT) are not limited as one, and one app cannot use up
//!   another's allowance;
//! - else the client's address ([`ClientAddr`]; IPv6 by its /64 prefix), charged by
//!   [`LimitRate`], which sits outside every stage: a request without credentials is
//!   charged before anything runs; one whose token does not verify, once it has been
//!   refused (from then on such requests get 429 instead of 401).
//!
//! Every request is charged exactly once. Buckets are kept for at most
//! [`MAX_TRACKED_CLIENTS`] clients, and a bucket idle long enough to have refilled is
//! forgotten (it would be full anyway), so memory is bounded whatever the traffic.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use tower::{Layer, Service};

use crate::pipeline::{BoxFuture, ClientAddr, Flow, Internal, ProxyResponse, Stage, ext};
use crate::tenant::tenant_of;
use crate::token::VerifiedToken;

/// Most clients whose buckets are kept at once.
pub const MAX_TRACKED_CLIENTS: u64 = 100_000;

/// A request refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// As many requests as allowed are in flight.
    #[error("the server is busy; retry shortly")]
    Overloaded,
    /// The client's bucket is empty; a token is back after `retry_after_secs`.
    #[error("too many requests; retry later")]
    RateLimited { retry_after_secs: u64 },
}

impl LimitError {
    pub fn status(&self) -> StatusCode {
        match self {
            LimitError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            LimitError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::Overloaded => "overloaded",
            LimitError::RateLimited { .. } => "rate_limited",
        }
    }

    /// The `Retry-After` value, in seconds.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            LimitError::Overloaded => 1,
            LimitError::RateLimited { retry_after_secs } => *retry_after_secs,
        }
    }
}

/// What the [`ChargeClient`] stage fails with.
#[derive(Debug, thiserror::Error)]
pub enum ChargeClientError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// A per-client rate: requests per second, and how many may come at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSettings {
    pub per_second: f64,
    pub burst: u32,
}

impl RateSettings {
    /// The burst used when none is configured: one second's worth, at least 1.
    pub fn default_burst(per_second: f64) -> u32 {
        let b = per_second.ceil();
        if b >= f64::from(u32::MAX) {
            u32::MAX
        } else if b >= 1.0 {
            b as u32
        } else {
            1
        }
    }

    /// How long an empty bucket takes to fill up: a bucket idle that long is full, so
    /// forgetting it changes nothing.
    fn refill_time(&self) -> Duration {
        let secs = f64::from(self.burst) / self.per_second;
        // At most a day: beyond, a forgotten bucket only forgives a very slow client.
        Duration::from_secs_f64(secs.clamp(1.0, 86_400.0))
    }
}

/// Parses a rate: `N` or `N/s` (per second), `N/min`, `N/h`; `N` a positive number.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (number, per) = match s.split_once('/') {
        None => (s, 1.0),
        Some((n, "s")) => (n, 1.0),
        Some((n, "min")) => (n, 60.0),
        Some((n, "h")) => (n, 3600.0),
        Some((_, unit)) => {
            return Err(format!(
                "unknown unit `{unit}`: the rate is N, N/s, N/min or N/h"
            ));
        }
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{number}` is not a number"))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("the rate must be positive, not `{number}`"));
    }
    Ok(n / per)
}

/// One client's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(settings: &RateSettings, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(settings.burst),
            at: now,
        }
    }

    /// Takes one token, or says how long until one is back.
    fn take(&mut self, settings: &RateSettings, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * settings.per_second).min(f64::from(settings.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / settings.per_second;
        Err(Duration::from_secs_f64(wait.clamp(0.0, 86_400.0)))
    }
}

/// Whose bucket a request is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    /// An address: IPv4 as it is, IPv6 by its /64 prefix (one host usually has a whole
    /// /64 to pick addresses from).
    Addr(IpAddr),
    /// A client id of a tenant.
    Client { tenant: Box<str>, client: Box<str> },
}

impl BucketKey {
    fn addr(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                BucketKey::Addr(IpAddr::V6(prefix.into()))
            }
            v4 => BucketKey::Addr(v4),
        }
    }
}

/// The process's rate-limit buckets.
pub struct RateLimiter {
    settings: RateSettings,
    buckets: moka::future::Cache<BucketKey, Arc<Mutex<Bucket>>>,
}

impl RateLimiter {
    pub fn new(settings: RateSettings) -> Self {
        RateLimiter {
            settings,
            buckets: moka::future::Cache::builder()
                .max_capacity(MAX_TRACKED_CLIENTS)
                .time_to_idle(settings.refill_time())
                .build(),
        }
    }

    pub fn settings(&self) -> RateSettings {
        self.settings
    }

    async fn charge(&self, key: BucketKey) -> Result<(), LimitError> {
        let now = Instant::now();
        let settings = self.settings;
        let bucket = self
            .buckets
            .get_with(key, async move {
                Arc::new(Mutex::new(Bucket::full(&settings, now)))
            })
            .await;
        let taken = {
            // A poisoned lock only means a panic elsewhere mid-update; the bucket is
            // still a bucket.
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.take(&settings, now)
        };
        taken.map_err(|wait| LimitError::RateLimited {
            retry_after_secs: retry_after(wait),
        })
    }
}

/// Whole seconds to wait, at least 1 (`Retry-After` has no fractions).
fn retry_after(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The client's address: the peer's, or with `trusted_hops` proxies in front, the
/// address the farthest trusted proxy saw, from `X-Forwarded-For` (every such header,
/// in order). Each proxy appends the address it received the request from, so the
/// entry `trusted_hops` places from the right end (the peer being the last) is the
/// one no client can forge. A shorter header gives its leftmost entry; an entry that
/// is not an address gives the peer's.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted_hops: usize) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if entries.is_empty() {
        return peer;
    }
    let pick = entries.len().saturating_sub(trusted_hops);
    entries
        .get(pick)
        .and_then(|e| parse_forwarded_addr(e))
        .unwrap_or(peer)
}

/// `192.0.2.1`, `2001:db8::1`, and the same with a port (`192.0.2.1:443`,
/// `[2001:db8::1]:443`).
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// Set once a request has been charged to its client id.
#[derive(Clone, Default)]
struct Charged(Arc<AtomicBool>);

/// The outer rate-limit layer (see the module docs): charges the client's address for
/// every request no verified token is charged for.
#[derive(Clone)]
pub struct LimitRateLayer {
    limiter: Option<Arc<RateLimiter>>,
}

impl LimitRateLayer {
    /// `None`: no rate limit, every request passes.
    pub fn new(limiter: Option<Arc<RateLimiter>>) -> Self {
        LimitRateLayer { limiter }
    }
}

impl<S> Layer<S> for LimitRateLayer {
    type Service = LimitRate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LimitRate {
            limiter: self.limiter.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct LimitRate<S> {
    limiter: Option<Arc<RateLimiter>>,
    inner: S,
}

impl<S, E> Service<Request<Bytes>> for LimitRate<S>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = E> + Clone + Send + 'static,
    S::Future: Send,
    E: From<LimitError> + From<Internal> + Send + 'static,
{
    type Response = ProxyResponse;
    type Error = E;
    type Future = BoxFuture<Result<ProxyResponse, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        // The readied service goes into the future; a fresh clone stays for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(limiter) = self.limiter.clone() else {
            return Box::pin(inner.call(req));
        };
        Box::pin(async move {
            let addr = ext::<ClientAddr>(&req, "missing ClientAddr")?.0;
            if !req.headers().contains_key(http::header::AUTHORIZATION) {
                limiter.charge(BucketKey::addr(addr)).await?;
                return inner.call(req).await;
            }
            // Which bucket pays is known once the token has been checked.
            let charged = Charged::default();
            req.extensions_mut().insert(charged.clone());
            let result = inner.call(req).await;
            if !charged.0.load(Ordering::Acquire) {
                limiter.charge(BucketKey::addr(addr)).await?;
            }
            result
        })
    }
}

/// The stage right after stage 1: charges the verified token's client id (per
/// tenant); a token without one is charged to the client's address.
pub struct ChargeClient {
    limiter: Option<Arc<RateLimiter>>,
}

impl ChargeClient {
    /// `None`: no rate limit, every request passes.
    pub fn new(limiter: Option<Arc<RateLimiter>>) -> Self {
        ChargeClient { limiter }
    }
}

impl Stage for ChargeClient {
    type Error = ChargeClientError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, ChargeClientError> {
        let Some(limiter) = &self.limiter else {
            return Ok(Flow::Continue);
        };
        let tenant = &tenant_of(req)?.0;
        let token = ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
        let key = match &token.client_id {
            Some(client) => BucketKey::Client {
                tenant: tenant.id().into(),
                client: client.as_str().into(),
            },
            None => BucketKey::addr(ext::<ClientAddr>(req, "missing ClientAddr")?.0),
        };
        if let Some(charged) = req.extensions().get::<Charged>() {
            charged.0.store(true, Ordering::Release);
        }
        limiter.charge(key).await?;
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http::HeaderValue;

    fn settings(per_second: f64, burst: u32) -> RateSettings {
        RateSettings { per_second, burst }
    }

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let s = settings(2.0, 3);
        let t0 = Instant::now();
        let mut b = Bucket::full(&s, t0);
        for _ in 0..3 {
            assert!(b.take(&s, t0).is_ok());
        }
        // Empty: one token is back after half a second.
        assert_eq!(b.take(&s, t0), Err(Duration::from_millis(500)));
        assert_eq!(
            b.take(&s, t0 + Duration::from_millis(250)),
            Err(Duration::from_millis(250))
        );
        assert!(b.take(&s, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(&s, t0 + Duration::from_millis(500)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(&s, later).is_ok());
        }
        assert!(b.take(&s, later).is_err());
    }

    #[test]
    fn a_clock_that_seems_to_go_back_refills_nothing() {
        let s = settings(1.0, 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = Bucket::full(&s, t0);
        assert!(b.take(&s, t0).is_ok());
        assert!(b.take(&s, t0 - Duration::from_secs(5)).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after(Duration::from_millis(1)), 1);
        assert_eq!(retry_after(Duration::ZERO), 1);
        assert_eq!(retry_after(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after(Duration::from_secs(60)), 60);
    }

    #[test]
    fn rates_parse_with_their_units() {
        assert_eq!(parse_rate("10"), Ok(10.0));
        assert_eq!(parse_rate("10/s"), Ok(10.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        assert_eq!(parse_rate("120/min"), Ok(2.0));
        assert_eq!(parse_rate("36/h"), Ok(0.01));
        for bad in ["", "0", "-1", "x", "1/day", "NaN", "inf", "1/"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(RateSettings::default_burst(0.01), 1);
        assert_eq!(RateSettings::default_burst(2.5), 3);
        assert_eq!(RateSettings::default_burst(50.0), 50);
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_client_address_is_the_peer_unless_proxies_are_trusted() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let forged = xff(&["6.6.6.6, 192.0.2.1"]);
        assert_eq!(client_addr(peer, &forged, 0), peer);
        // One load balancer: it appended the address it saw; what the client wrote
        // before that is not believed.
        assert_eq!(client_addr(peer, &forged, 1), ip("192.0.2.1"));
        assert_eq!(client_addr(peer, &forged, 2), ip("6.6.6.6"));
        // Two headers are one list.
        let split = xff(&["6.6.6.6", "192.0.2.1, 10.1.1.1"]);
        assert_eq!(client_addr(peer, &split, 2), ip("192.0.2.1"));
        // Shorter than the trusted chain: the leftmost.
        assert_eq!(client_addr(peer, &forged, 5), ip("6.6.6.6"));
        // Ports and IPv6.
        assert_eq!(
            client_addr(peer, &xff(&["[2001:db8::1]:443"]), 1),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_addr(peer, &xff(&["192.0.2.7:1234"]), 1),
            ip("192.0.2.7")
        );
        // Garbage or nothing: the peer.
        assert_eq!(client_addr(peer, &xff(&["unknown"]), 1), peer);
        assert_eq!(client_addr(peer, &HeaderMap::new(), 1), peer);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_prefix() {
        let a = BucketKey::addr("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = BucketKey::addr("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = BucketKey::addr("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(
            BucketKey::addr("::ffff:192.0.2.1".parse().unwrap()),
            BucketKey::addr("192.0.2.1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn buckets_are_per_client() {
        let limiter = RateLimiter::new(settings(0.001, 2));
        let a = || BucketKey::Client {
            tenant: "t".into(),
            client: "a".into(),
        };
        let other_tenant = BucketKey::Client {
            tenant: "u".into(),
            client: "a".into(),
        };
        assert!(limiter.charge(a()).await.is_ok());
        assert!(limiter.charge(a()).await.is_ok());
        let refused = limiter.charge(a()).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.reason(), "rate_limited");
        // About 1000 s until the next token.
        assert!(refused.retry_after_secs() > 900, "{refused:?}");
        assert!(limiter.charge(other_tenant).await.is_ok());
        let addr = BucketKey::addr("192.0.2.1".parse().unwrap());
        assert!(limiter.charge(addr).await.is_ok());
    }
}
