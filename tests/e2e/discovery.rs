//! Discovery documents, served without a token.

use crate::harness::{get, shared};
use crate::support;

#[tokio::test]
async fn smart_configuration_is_complete() {
    let a = get(
        &format!("{}/.well-known/smart-configuration", shared().base("demo")),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    let issuer = support::issuer();
    assert_eq!(v["issuer"], issuer.url());
    assert_eq!(v["jwks_uri"], issuer.jwks_uri());
    assert_eq!(v["token_endpoint"], issuer.token_endpoint());
    for key in [
        "authorization_endpoint",
        "grant_types_supported",
        "capabilities",
        "code_challenge_methods_supported",
        "scopes_supported",
        "response_types_supported",
        "token_endpoint_auth_methods_supported",
    ] {
        assert!(!v[key].is_null(), "missing {key}: {v}");
    }
    let caps = v["capabilities"].as_array().unwrap();
    for cap in ["permission-v1", "permission-v2", "launch-standalone"] {
        assert!(caps.iter().any(|c| c == cap), "{cap}");
    }
    assert_eq!(
        v["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
}

#[tokio::test]
async fn metadata_carries_the_smart_security_extension() {
    let base = shared().base("demo");
    let a = get(&format!("{base}/metadata"), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        !a.text.contains(support::fhir_server().base_url()),
        "upstream base leaked"
    );
    let v = a.json();
    assert_eq!(v["resourceType"], "CapabilityStatement");
    let rest = &v["rest"][0];
    let security = &rest["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &security["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    let token = uris["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "token")
        .unwrap();
    assert_eq!(token["valueUri"], support::issuer().token_endpoint());
    // Only what the proxy forwards is advertised (single writes included).
    let mut codes = std::collections::BTreeSet::new();
    for res in rest["resource"].as_array().unwrap() {
        for i in res["interaction"].as_array().into_iter().flatten() {
            let code = i["code"].as_str().unwrap();
            assert!(
                [
                    "read",
                    "vread",
                    "history-instance",
                    "search-type",
                    "create",
                    "update",
                    "patch",
                    "delete"
                ]
                .contains(&code),
                "{code}"
            );
            codes.insert(code.to_owned());
        }
    }
    assert!(
        codes.contains("read") && codes.contains("create"),
        "{codes:?}"
    );
    assert!(rest.get("interaction").is_none(), "no batch or transaction");
}

#[tokio::test]
async fn discovery_of_an_unknown_tenant_is_404() {
    let a = get(
        &format!(
            "http://127.0.0.1:{}/nope/.well-known/smart-configuration",
            shared().port
        ),
        None,
    )
    .await;
    assert_eq!(a.status, 404);
}
