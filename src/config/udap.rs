//! `udap`: a tenant's UDAP server metadata (its signing certificate, the metadata
//! values) and the UDAP communities it takes part in (their trust anchors, their own
//! signing certificate, the authorization servers whose tokens the tenant accepts).
//!
//! Validation loads every file once per load of `tenants.json` and refuses, naming the
//! key: an unreadable file or wrong PKCS#12 password, a key that is not the leaf's, a
//! chain that does not verify to the anchors configured for it, a tenant base URL that
//! is not a `uniformResourceIdentifier` SAN of the leaf, an expired or not yet valid
//! certificate, an ambiguous issuer (one of `token.issuers`, or trusted by two
//! communities).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{Bad, RawSmartOwned, Secret, http_url, secret};
use crate::tls::x509::{IdentityFile, SigningIdentity, TrustAnchors};

/// `udap`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawUdap {
    /// The certificate the metadata is signed with.
    pub certificate: RawUdapCertificate,
    /// The anchors the certificate's chain must verify to (PEM).
    pub trust_anchor_files: Vec<PathBuf>,
    /// Lifetime (`exp - iat`) of `signed_metadata`.
    #[serde(default = "default_lifetime")]
    pub signed_metadata_lifetime_seconds: u64,
    #[serde(default)]
    pub metadata: RawUdapMetadata,
    #[serde(default)]
    pub communities: Vec<RawCommunity>,
}

/// A signing certificate: a PEM chain (leaf first) and key, or a PKCS#12 file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, tag = "format", rename_all = "snake_case")]
pub enum RawUdapCertificate {
    Pem {
        chain_file: PathBuf,
        key_file: PathBuf,
    },
    Pkcs12 {
        file: PathBuf,
        password: Option<Secret>,
        password_env: Option<String>,
    },
}

/// The metadata values; each absent one is derived (from `smart` where it has it).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUdapMetadata {
    pub udap_profiles_supported: Option<Vec<String>>,
    pub udap_authorization_extensions_supported: Option<Vec<String>>,
    pub udap_authorization_extensions_required: Option<Vec<String>>,
    pub udap_certifications_supported: Option<Vec<String>>,
    pub udap_certifications_required: Option<Vec<String>>,
    pub grant_types_supported: Option<Vec<String>>,
    pub scopes_supported: Option<Vec<String>>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub registration_endpoint: Option<String>,
    pub token_endpoint_auth_signing_alg_values_supported: Option<Vec<String>>,
    pub registration_endpoint_jwt_signing_alg_values_supported: Option<Vec<String>>,
}

/// `udap.communities[]`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCommunity {
    /// The community's URI, as clients send it in `?community=`.
    pub uri: String,
    /// The community's trust anchors (PEM).
    pub trust_anchor_files: Vec<PathBuf>,
    /// The certificate this community's metadata is signed with; absent: the tenant's
    /// (which must then chain to this community's anchors too).
    pub certificate: Option<RawUdapCertificate>,
    /// Authorization servers of the community whose tokens the tenant accepts.
    #[serde(default)]
    pub issuers: Vec<RawCommunityIssuer>,
}

/// `udap.communities[].issuers[]`: an issuer and how its tokens are verified, by its
/// JWKS (`jwks_uri`) or by the `x5c` chain in each token's header (`x5c: true`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCommunityIssuer {
    pub issuer: String,
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub x5c: bool,
}

fn default_lifetime() -> u64 {
    300
}

/// Most `signed_metadata` lifetime accepted (the IG allows up to a year; metadata that
/// outlives a certificate revocation by a year is not what a gateway should publish).
pub const MAX_METADATA_LIFETIME_SECS: u64 = 86_400;

/// The grant types UDAP defines.
const UDAP_GRANT_TYPES: [&str; 3] = ["authorization_code", "refresh_token", "client_credentials"];

/// The JWS algorithms UDAP peers may use (RS256 is required by the IG).
const UDAP_ALGS: [&str; 5] = ["RS256", "RS384", "ES256", "ES384", "ES512"];

/// A tenant's validated `udap`.
#[derive(Debug, Clone)]
pub struct UdapConfig {
    pub identity: Arc<SigningIdentity>,
    pub anchors: TrustAnchors,
    pub lifetime: Duration,
    pub metadata: UdapMetadata,
    pub communities: Vec<Community>,
    /// Every trusted community issuer of the tenant (disjoint from `token.issuers`, each
    /// in one community only).
    pub issuers: Vec<CommunityIssuer>,
}

impl UdapConfig {
    pub fn community(&self, uri: &str) -> Option<&Community> {
        self.communities.iter().find(|c| c.uri == uri)
    }

    /// A fingerprint of every certificate loaded (the identities' chains and the
    /// anchors), so a reload tells a replaced file from an unchanged one. The keys need
    /// no part in it: each is checked to belong to its leaf.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut add = |certs: &[rustls::pki_types::CertificateDer<'_>]| {
            certs.len().hash(&mut h);
            for c in certs {
                c.as_ref().hash(&mut h);
            }
        };
        add(self.identity.chain());
        add(self.anchors.certs());
        for c in &self.communities {
            add(c.anchors.certs());
            add(c.identity.as_ref().map_or(&[][..], |i| i.chain()));
        }
        h.finish()
    }
}

/// The metadata values, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdapMetadata {
    pub udap_profiles_supported: Vec<String>,
    pub udap_authorization_extensions_supported: Vec<String>,
    pub udap_authorization_extensions_required: Option<Vec<String>>,
    pub udap_certifications_supported: Vec<String>,
    pub udap_certifications_required: Option<Vec<String>>,
    pub grant_types_supported: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: String,
    pub registration_endpoint: String,
    pub token_endpoint_auth_signing_alg_values_supported: Vec<String>,
    pub registration_endpoint_jwt_signing_alg_values_supported: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Community {
    pub uri: String,
    pub anchors: TrustAnchors,
    /// `None`: signed with the tenant's identity.
    pub identity: Option<Arc<SigningIdentity>>,
}

/// An issuer a community vouches for on this tenant.
#[derive(Debug, Clone)]
pub struct CommunityIssuer {
    pub community: String,
    pub issuer: String,
    pub keys: CommunityKeys,
}

#[derive(Debug, Clone)]
pub enum CommunityKeys {
    /// The issuer's JWK Set.
    Jwks(Url),
    /// The leaf of the token's `x5c`, chained to the community's anchors.
    X5c(TrustAnchors),
}

/// The keys of one certificate block, for error messages.
struct CertKeys {
    chain_file: &'static str,
    key_file: &'static str,
    pkcs12: &'static str,
    password: &'static str,
}

const TENANT_CERT: CertKeys = CertKeys {
    chain_file: "udap.certificate.chain_file",
    key_file: "udap.certificate.key_file",
    pkcs12: "udap.certificate.file",
    password: "udap.certificate.password",
};

const COMMUNITY_CERT: CertKeys = CertKeys {
    chain_file: "udap.communities.certificate.chain_file",
    key_file: "udap.communities.certificate.key_file",
    pkcs12: "udap.communities.certificate.file",
    password: "udap.communities.certificate.password",
};

fn identity(raw: RawUdapCertificate, keys: &CertKeys) -> Result<SigningIdentity, Bad> {
    let loaded = match raw {
        RawUdapCertificate::Pem {
            chain_file,
            key_file,
        } => SigningIdentity::from_pem_files(&chain_file, &key_file),
        RawUdapCertificate::Pkcs12 {
            file,
            password,
            password_env,
        } => {
            let password = secret(password, password_env).map_err(|m| (keys.password, m))?;
            SigningIdentity::from_pkcs12_file(&file, password.expose())
        }
    };
    loaded.map_err(|(file, m)| {
        let key = match file {
            IdentityFile::Chain => keys.chain_file,
            IdentityFile::Key => keys.key_file,
            IdentityFile::Pkcs12 => keys.pkcs12,
        };
        (key, m)
    })
}

fn list(v: Option<Vec<String>>, default: &[&str]) -> Vec<String> {
    v.unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
}

fn algs(key: &'static str, v: Option<Vec<String>>) -> Result<Vec<String>, Bad> {
    let v = list(v, &["RS256", "ES256", "ES384"]);
    if !v.iter().any(|a| a == "RS256") {
        return Err((key, "must include `RS256` (required by UDAP)".into()));
    }
    if let Some(a) = v.iter().find(|a| !UDAP_ALGS.contains(&a.as_str())) {
        return Err((key, format!("`{a}` is not one of {}", UDAP_ALGS.join(", "))));
    }
    Ok(v)
}

/// The metadata values, with defaults derived from the tenant's SMART settings.
fn metadata(m: RawUdapMetadata, smart: &RawSmartOwned) -> Result<UdapMetadata, Bad> {
    let grant_types_supported = match m.grant_types_supported {
        Some(g) => g,
        None => smart
            .grant_types_supported
            .iter()
            .filter(|g| UDAP_GRANT_TYPES.contains(&g.as_str()))
            .cloned()
            .collect(),
    };
    const GRANTS: &str = "udap.metadata.grant_types_supported";
    if let Some(g) = grant_types_supported
        .iter()
        .find(|g| !UDAP_GRANT_TYPES.contains(&g.as_str()))
    {
        return Err((GRANTS, format!("`{g}` is not a UDAP grant type")));
    }
    let code = grant_types_supported
        .iter()
        .any(|g| g == "authorization_code");
    if !code
        && !grant_types_supported
            .iter()
            .any(|g| g == "client_credentials")
    {
        return Err((
            GRANTS,
            "needs `authorization_code` or `client_credentials`".into(),
        ));
    }
    if !code && grant_types_supported.iter().any(|g| g == "refresh_token") {
        return Err((GRANTS, "`refresh_token` needs `authorization_code`".into()));
    }
    let url = |key: &'static str, v: Option<String>, default: Option<&String>| match v
        .or_else(|| default.cloned())
    {
        Some(u) => http_url(&u).map(|_| Some(u)).map_err(|m| (key, m)),
        None => Ok(None),
    };
    let authorization_endpoint = url(
        "udap.metadata.authorization_endpoint",
        m.authorization_endpoint,
        Some(&smart.authorization_endpoint),
    )?
    .filter(|_| code);
    let token_endpoint = url(
        "udap.metadata.token_endpoint",
        m.token_endpoint,
        Some(&smart.token_endpoint),
    )?
    .ok_or(("udap.metadata.token_endpoint", "is required".into()))?;
    let registration_endpoint = url(
        "udap.metadata.registration_endpoint",
        m.registration_endpoint,
        smart.registration_endpoint.as_ref(),
    )?
    .ok_or((
        "udap.metadata.registration_endpoint",
        "UDAP requires a registration endpoint: set it here or `smart.registration_endpoint`"
            .into(),
    ))?;
    let extensions = list(m.udap_authorization_extensions_supported, &["hl7-b2b"]);
    if let Some(req) = &m.udap_authorization_extensions_required
        && let Some(r) = req.iter().find(|r| !extensions.contains(r))
    {
        return Err((
            "udap.metadata.udap_authorization_extensions_required",
            format!("`{r}` is not in `udap_authorization_extensions_supported`"),
        ));
    }
    let certifications = list(m.udap_certifications_supported, &[]);
    if let Some(req) = &m.udap_certifications_required
        && let Some(r) = req.iter().find(|r| !certifications.contains(r))
    {
        return Err((
            "udap.metadata.udap_certifications_required",
            format!("`{r}` is not in `udap_certifications_supported`"),
        ));
    }
    let profiles = list(
        m.udap_profiles_supported,
        &["udap_dcr", "udap_authn", "udap_authz"],
    );
    if !profiles.iter().any(|p| p == "udap_dcr") {
        return Err((
            "udap.metadata.udap_profiles_supported",
            "must include `udap_dcr`".into(),
        ));
    }
    Ok(UdapMetadata {
        udap_profiles_supported: profiles,
        udap_authorization_extensions_supported: extensions,
        udap_authorization_extensions_required: m.udap_authorization_extensions_required,
        udap_certifications_supported: certifications,
        udap_certifications_required: m.udap_certifications_required,
        grant_types_supported,
        scopes_supported: m
            .scopes_supported
            .unwrap_or_else(|| smart.scopes_supported.clone()),
        authorization_endpoint,
        token_endpoint,
        registration_endpoint,
        token_endpoint_auth_signing_alg_values_supported: algs(
            "udap.metadata.token_endpoint_auth_signing_alg_values_supported",
            m.token_endpoint_auth_signing_alg_values_supported,
        )?,
        registration_endpoint_jwt_signing_alg_values_supported: algs(
            "udap.metadata.registration_endpoint_jwt_signing_alg_values_supported",
            m.registration_endpoint_jwt_signing_alg_values_supported,
        )?,
    })
}

/// Validates `udap` for a tenant whose base URL is `public_base`, trusting
/// `token_issuers` already.
pub(super) fn udap_config(
    u: RawUdap,
    public_base: &str,
    smart: &RawSmartOwned,
    token_issuers: &[String],
) -> Result<UdapConfig, Bad> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let tenant_identity = identity(u.certificate, &TENANT_CERT)?;
    let anchors =
        TrustAnchors::load(&u.trust_anchor_files).map_err(|m| ("udap.trust_anchor_files", m))?;
    tenant_identity
        .check_for(&anchors, public_base, now)
        .map_err(|m| ("udap.certificate", m))?;
    let lifetime = u.signed_metadata_lifetime_seconds;
    if !(60..=MAX_METADATA_LIFETIME_SECS).contains(&lifetime) {
        return Err((
            "udap.signed_metadata_lifetime_seconds",
            format!("`{lifetime}` is not within 60..={MAX_METADATA_LIFETIME_SECS}"),
        ));
    }
    let metadata = metadata(u.metadata, smart)?;
    let mut communities: Vec<Community> = Vec::with_capacity(u.communities.len());
    let mut issuers: Vec<CommunityIssuer> = Vec::new();
    for c in u.communities {
        const URI: &str = "udap.communities.uri";
        Url::parse(&c.uri).map_err(|e| (URI, format!("`{}` is not a URI: {e}", c.uri)))?;
        if communities.iter().any(|k| k.uri == c.uri) {
            return Err((URI, format!("`{}` is listed twice", c.uri)));
        }
        let anchors = TrustAnchors::load(&c.trust_anchor_files).map_err(|m| {
            (
                "udap.communities.trust_anchor_files",
                format!("community `{}`: {m}", c.uri),
            )
        })?;
        let identity = match c.certificate {
            Some(raw) => {
                let id = identity(raw, &COMMUNITY_CERT)?;
                id.check_for(&anchors, public_base, now).map_err(|m| {
                    (
                        "udap.communities.certificate",
                        format!("community `{}`: {m}", c.uri),
                    )
                })?;
                Some(Arc::new(id))
            }
            None => {
                tenant_identity.check_for(&anchors, public_base, now).map_err(|m| {
                    (
                        "udap.communities.certificate",
                        format!(
                            "community `{}` has no certificate of its own and the tenant's does not fit it: {m}",
                            c.uri
                        ),
                    )
                })?;
                None
            }
        };
        for i in c.issuers {
            const ISS: &str = "udap.communities.issuers.issuer";
            if i.issuer.trim().is_empty() {
                return Err((ISS, "must not be empty".into()));
            }
            if token_issuers.contains(&i.issuer) {
                return Err((
                    ISS,
                    format!("`{}` is one of `token.issuers` already", i.issuer),
                ));
            }
            if let Some(other) = issuers.iter().find(|k| k.issuer == i.issuer) {
                return Err((
                    ISS,
                    format!(
                        "`{}` is trusted by community `{}` already",
                        i.issuer, other.community
                    ),
                ));
            }
            let keys = match (i.jwks_uri, i.x5c) {
                (Some(uri), false) => CommunityKeys::Jwks(
                    http_url(&uri).map_err(|m| ("udap.communities.issuers.jwks_uri", m))?,
                ),
                (None, true) => CommunityKeys::X5c(anchors.clone()),
                _ => {
                    return Err((
                        "udap.communities.issuers",
                        format!(
                            "issuer `{}`: give either `jwks_uri` or `x5c: true`",
                            i.issuer
                        ),
                    ));
                }
            };
            issuers.push(CommunityIssuer {
                community: c.uri.clone(),
                issuer: i.issuer,
                keys,
            });
        }
        communities.push(Community {
            uri: c.uri,
            anchors,
            identity,
        });
    }
    Ok(UdapConfig {
        identity: Arc::new(tenant_identity),
        anchors,
        lifetime: Duration::from_secs(lifetime),
        metadata,
        communities,
        issuers,
    })
}

#[cfg(test)]
mod tests;
