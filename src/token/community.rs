//! Community trust: tokens of authorization servers a UDAP community vouches for on a
//! tenant (`udap.communities[].issuers`).
//!
//! Part of stage 1. The token's unverified `iss` only chooses how it is verified: a
//! community issuer of THIS tenant is verified against that issuer's own JWKS (cached
//! per tenant and JWKS URI, with the same refresh limits as the tenant's) or against
//! the leaf key of the token's `x5c` header once the chain verifies to the community's
//! trust anchors (validity periods, signatures, no CA leaf, no self-signed leaf outside
//! the anchors) and the leaf names the issuer as a URI SAN (so another member of the
//! community, holding a certificate of its own, cannot sign as the trusted issuer). Either way the claims are then checked exactly as for the tenant's
//! own issuers, with `iss` required to be that one issuer and `aud` the tenant's
//! audience. An issuer configured on another tenant is nobody here: its tokens take the
//! tenant's own path and fail it.

use jsonwebtoken::{DecodingKey, Header};
use serde_json::Value;

use super::TokenError;
use crate::config::CommunityIssuer;
use crate::tls::x509::{self, PublicKey, TrustAnchors};

/// The `iss` of a token, read without verifying it (it only picks the key source).
pub fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The community issuer a token claims to come from, if it is one of `issuers`.
pub fn issuer_of<'a>(issuers: &'a [CommunityIssuer], token: &str) -> Option<&'a CommunityIssuer> {
    if issuers.is_empty() {
        return None;
    }
    let iss = unverified_issuer(token)?;
    issuers.iter().find(|i| i.issuer == iss)
}

/// The key of a token's `x5c` leaf, once its chain verifies to `anchors` at `now` and
/// the leaf has `issuer` as a URI SAN; with the leaf's `notAfter`.
pub fn x5c_key(
    header: &Header,
    issuer: &str,
    anchors: &TrustAnchors,
    now: u64,
) -> Result<(DecodingKey, i64), TokenError> {
    let x5c = header.x5c.as_ref().ok_or(TokenError::X5cMissing)?;
    let chain = x509::decode_x5c(x5c).map_err(|_| TokenError::X5cUntrusted)?;
    anchors.verify_chain(&chain, now).map_err(|e| {
        tracing::info!(error = %e, "token x5c chain refused");
        TokenError::X5cUntrusted
    })?;
    let leaf = chain.first().ok_or(TokenError::X5cUntrusted)?;
    let facts = x509::cert_facts(leaf).map_err(|_| TokenError::X5cUntrusted)?;
    if !facts.uris.iter().any(|u| u == issuer) {
        tracing::info!(token.issuer = %issuer, "token x5c leaf does not name the issuer");
        return Err(TokenError::X5cUntrusted);
    }
    let key = match x509::public_key(leaf).map_err(|_| TokenError::UnknownKey)? {
        PublicKey::Rsa(der) => DecodingKey::from_rsa_der(&der),
        PublicKey::Ec { point, .. } => DecodingKey::from_ec_der(&point),
    };
    Ok((key, facts.not_after))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use base64::Engine;

    fn token(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"ES256"}"#), b(claims))
    }

    #[test]
    fn only_a_listed_issuer_picks_the_community_path() {
        let listed = CommunityIssuer {
            community: "urn:c".into(),
            issuer: "https://as.c".into(),
            keys: crate::config::CommunityKeys::X5c(TrustAnchors::from_certs(vec![])),
        };
        let issuers = [listed];
        let t = token(r#"{"iss":"https://as.c"}"#);
        assert_eq!(unverified_issuer(&t).as_deref(), Some("https://as.c"));
        assert_eq!(issuer_of(&issuers, &t).unwrap().community, "urn:c");
        // Another tenant (no community issuers), another issuer, no or odd `iss`.
        assert!(issuer_of(&[], &t).is_none());
        for other in [
            r#"{"iss":"https://as.c/"}"#,
            r#"{"iss":["https://as.c"]}"#,
            r#"{}"#,
            "not json",
        ] {
            assert!(issuer_of(&issuers, &token(other)).is_none(), "{other}");
        }
        assert!(issuer_of(&issuers, "garbage").is_none());
    }
}
