//! Optional RFC 7662 token introspection, so revoked tokens stop working before they
//! expire. Results are cached briefly (never past the token's own expiry); errors are
//! never cached and fail closed (503).

use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use super::TokenError;
use crate::config::IntrospectionConfig;

#[derive(Clone)]
struct Answer {
    active: bool,
    ttl: Duration,
}

struct AnswerExpiry;

impl Expiry<(String, String), Answer> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _k: &(String, String),
        v: &Answer,
        _at: Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

#[derive(Clone)]
pub struct Introspector {
    http: reqwest::Client,
    // Keyed by (tenant, token): tokens live here only for the cache TTL and are never
    // logged.
    cache: Cache<(String, String), Answer>,
}

impl Introspector {
    pub fn new(http: reqwest::Client) -> Self {
        Introspector {
            http,
            cache: Cache::builder()
                .max_capacity(100_000)
                .expire_after(AnswerExpiry)
                .build(),
        }
    }

    pub async fn check_active(
        &self,
        tenant: &str,
        cfg: &IntrospectionConfig,
        token: &str,
        expires_at: u64,
    ) -> Result<(), TokenError> {
        let key = (tenant.to_owned(), token.to_owned());
        let remaining = expires_at.saturating_sub(super::now_secs());
        let ttl = cfg.cache.min(Duration::from_secs(remaining));
        let http = self.http.clone();
        let answer = self
            .cache
            .try_get_with(key, async move {
                let active = introspect(&http, cfg, token).await?;
                Ok::<_, TokenError>(Answer { active, ttl })
            })
            .await
            .map_err(|e| (*e).clone())?;
        if answer.active {
            Ok(())
        } else {
            Err(TokenError::Inactive)
        }
    }
}

async fn introspect(
    http: &reqwest::Client,
    cfg: &IntrospectionConfig,
    token: &str,
) -> Result<bool, TokenError> {
    #[derive(serde::Deserialize)]
    struct Response {
        active: bool,
    }
    let resp = http
        .post(cfg.endpoint.clone())
        .timeout(cfg.timeout)
        .basic_auth(&cfg.client_id, Some(cfg.client_secret.expose()))
        .form(&[("token", token), ("token_type_hint", "access_token")])
        .send()
        .await
        .map_err(|_| TokenError::IntrospectionUnavailable)?;
    if !resp.status().is_success() {
        tracing::warn!(status = %resp.status(), "token introspection failed");
        return Err(TokenError::IntrospectionUnavailable);
    }
    let body: Response = crate::fetch::read_json(resp)
        .await
        .map_err(|_| TokenError::IntrospectionUnavailable)?;
    Ok(body.active)
}
