#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;

fn smart(grants: &[&str], registration: Option<&str>) -> RawSmartOwned {
    RawSmartOwned {
        authorization_endpoint: "https://as.test/auth".into(),
        token_endpoint: "https://as.test/token".into(),
        registration_endpoint: registration.map(str::to_owned),
        management_endpoint: None,
        revocation_endpoint: None,
        introspection_endpoint: None,
        user_access_brand_bundle: None,
        grant_types_supported: grants.iter().map(|g| (*g).to_owned()).collect(),
        token_endpoint_auth_methods_supported: vec![],
        token_endpoint_auth_signing_alg_values_supported: vec![],
        scopes_supported: vec!["system/*.rs".into()],
        response_types_supported: vec![],
        capabilities: vec![],
    }
}

fn raw(v: serde_json::Value) -> RawUdapMetadata {
    serde_json::from_value(v).unwrap()
}

#[test]
fn values_default_to_the_smart_settings() {
    let m = metadata(
        RawUdapMetadata::default(),
        &smart(
            &["authorization_code", "client_credentials", "urn:other"],
            Some("https://as.test/reg"),
        ),
    )
    .unwrap();
    assert_eq!(
        m.grant_types_supported,
        vec!["authorization_code", "client_credentials"]
    );
    assert_eq!(m.token_endpoint, "https://as.test/token");
    assert_eq!(m.registration_endpoint, "https://as.test/reg");
    assert_eq!(
        m.authorization_endpoint.as_deref(),
        Some("https://as.test/auth")
    );
    assert_eq!(m.scopes_supported, vec!["system/*.rs"]);
    assert_eq!(
        m.udap_profiles_supported,
        vec!["udap_dcr", "udap_authn", "udap_authz"]
    );
    assert_eq!(m.udap_authorization_extensions_supported, vec!["hl7-b2b"]);
    assert!(
        m.token_endpoint_auth_signing_alg_values_supported
            .contains(&"RS256".to_owned())
    );
    // Without the authorization code grant, no authorization endpoint is published.
    let m = metadata(
        RawUdapMetadata::default(),
        &smart(&["client_credentials"], Some("https://as.test/reg")),
    )
    .unwrap();
    assert_eq!(m.authorization_endpoint, None);
}

#[test]
fn metadata_rules_are_enforced() {
    let s = smart(&["client_credentials"], Some("https://as.test/reg"));
    let cases = [
        (
            serde_json::json!({"grant_types_supported": ["password"]}),
            "not a UDAP grant type",
        ),
        (
            serde_json::json!({"grant_types_supported": ["refresh_token"]}),
            "needs `authorization_code` or",
        ),
        (
            serde_json::json!({"grant_types_supported": ["client_credentials", "refresh_token"]}),
            "`refresh_token` needs `authorization_code`",
        ),
        (
            serde_json::json!({"token_endpoint_auth_signing_alg_values_supported": ["ES256"]}),
            "must include `RS256`",
        ),
        (
            serde_json::json!({"registration_endpoint_jwt_signing_alg_values_supported": ["RS256", "none"]}),
            "`none` is not one of",
        ),
        (
            serde_json::json!({"udap_authorization_extensions_required": ["hl7-b2b-user"]}),
            "is not in `udap_authorization_extensions_supported`",
        ),
        (
            serde_json::json!({"udap_certifications_required": ["https://cert.test"]}),
            "is not in `udap_certifications_supported`",
        ),
        (
            serde_json::json!({"udap_profiles_supported": ["udap_authn"]}),
            "must include `udap_dcr`",
        ),
        (
            serde_json::json!({"token_endpoint": "ftp://as.test/token"}),
            "http(s) URL",
        ),
    ];
    for (v, needle) in cases {
        let (_, message) = metadata(raw(v.clone()), &s).unwrap_err();
        assert!(message.contains(needle), "{v}: {message}");
    }
    let (key, message) = metadata(
        RawUdapMetadata::default(),
        &smart(&["client_credentials"], None),
    )
    .unwrap_err();
    assert_eq!(key, "udap.metadata.registration_endpoint");
    assert!(
        message.contains("requires a registration endpoint"),
        "{message}"
    );
}

#[test]
fn raw_settings_refuse_unknown_keys() {
    let bad = serde_json::json!({
        "certificate": {"format": "pem", "chain_file": "c.pem", "key_file": "k.pem", "pasword": "x"},
        "trust_anchor_files": ["ca.pem"],
    });
    assert!(serde_json::from_value::<RawUdap>(bad).is_err());
    let bad = serde_json::json!({
        "certificate": {"format": "der", "file": "c.der"},
        "trust_anchor_files": ["ca.pem"],
    });
    assert!(serde_json::from_value::<RawUdap>(bad).is_err());
    let ok = serde_json::json!({
        "certificate": {"format": "pkcs12", "file": "id.p12", "password_env": "P"},
        "trust_anchor_files": ["ca.pem"],
        "communities": [{"uri": "urn:c", "trust_anchor_files": ["c.pem"],
                         "issuers": [{"issuer": "https://as.c", "x5c": true}]}],
    });
    let raw: RawUdap = serde_json::from_value(ok).unwrap();
    assert_eq!(raw.signed_metadata_lifetime_seconds, 300);
    assert!(raw.communities[0].issuers[0].x5c);
}
