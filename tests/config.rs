#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `check-config` and start-up validation, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tenants.example.json")
}

/// The example's secrets come from these variables.
fn with_example_env(cmd: &mut Command) -> &mut Command {
    cmd.env("DEMO2_UPSTREAM_API_KEY", "example-key")
        .env("DEMO2_INTROSPECTION_SECRET", "example-secret")
        .env("PARTNER_UPSTREAM_CLIENT_SECRET", "example-secret")
        .env("PARTNER_UDAP_P12_PASSWORD", "example-only")
        .env("RESEARCH_OPENFGA_CLIENT_SECRET", "example-secret")
        .env(
            "PARTNER_HMAC_SECRET",
            "an-example-shared-secret-of-32-bytes-or-more",
        )
}

fn check(path: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = bin();
    with_example_env(&mut cmd);
    cmd.arg("check-config").arg("--tenants").arg(path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn example_file_is_valid_and_explained() {
    let out = check(&example(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for needle in [
        "4 tenant(s), valid",
        "- demo at http://127.0.0.1:8080/demo",
        "- demo2",
        "- partner",
        "- research",
        "OpenFga",
        "store_id: \"01JD5Q1X4T3M8N2P6R9S0V7W5Y\"",
        "permission-v2",
        "(searched by linking parameter)",
        "(compartment search (native))",
        "cors         http://127.0.0.1:3000, https://app.example.org, with credentials",
        "cors         *",
        "upstream tls trusts ",
        "examples/tls/ca.pem, presents ",
        "examples/tls/client.pem",
        "match        Auto, input IDI-Patient-L0, at most 50 candidates (20 per search)",
        "match        Score, input IDI-Patient-L1",
        "match        Forward, input IDI-Patient,",
        "udap         signs https://fhir.example.org/partner with `CN=smart-fhir-proxy UDAP example server` (RS256, examples/udap/server.p12)",
        "udap community urn:oid:2.999.7.1 signed with `CN=smart-fhir-proxy UDAP example server (community)`; trusts issuers: https://as.community.example.org (jwks https://as.community.example.org/jwks), https://apps.community.example.org (x5c)",
        "udap community https://community.example.org/udap signed with the tenant's certificate; trusts issuers: none",
    ] {
        assert!(t.contains(needle), "missing `{needle}` in:\n{t}");
    }
}

#[test]
fn missing_secret_env_is_refused_naming_tenant_and_key() {
    let mut cmd = bin();
    let out = cmd
        .arg("check-config")
        .arg("--tenants")
        .arg(example())
        .env_remove("DEMO2_UPSTREAM_API_KEY")
        .env("DEMO2_INTROSPECTION_SECRET", "x")
        .env("PARTNER_UPSTREAM_CLIENT_SECRET", "x")
        .env(
            "PARTNER_HMAC_SECRET",
            "an-example-shared-secret-of-32-bytes-or-more",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("tenant `demo2`") && t.contains("upstream.auth.value"),
        "{t}"
    );
}

fn write(dir: &tempfile::TempDir, body: &serde_json::Value) -> PathBuf {
    let p = dir.path().join("tenants.json");
    std::fs::write(&p, serde_json::to_vec_pretty(body).unwrap()).unwrap();
    p
}

fn example_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(example()).unwrap()).unwrap()
}

#[test]
fn invalid_files_exit_64_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            |v| v["tenants"]["demo"]["token"]["surprise"] = true.into(),
            &["surprise"],
        ),
        (
            |v| v["tenants"]["demo"]["token"]["algorithms"] = serde_json::json!(["none"]),
            &["demo", "token.algorithms", "none"],
        ),
        (
            |v| v["tenants"]["demo"]["token"]["algorithms"] = serde_json::json!(["HS256"]),
            &["demo", "hmac_secret_env"],
        ),
        (
            |v| v["tenants"]["demo"]["upstream"]["base_url"] = "ftp://x".into(),
            &["demo", "upstream.base_url"],
        ),
        (
            |v| v["tenants"]["demo"]["public_base_url"] = "http://127.0.0.1:8080/other".into(),
            &["demo", "public_base_url"],
        ),
        (
            |v| v["tenants"]["demo"]["authorization"] = serde_json::json!({"mode": "magic"}),
            &["magic"],
        ),
        (
            |v| v["tenants"]["demo"]["upstream"]["compartment_search"] = "sometimes".into(),
            &["sometimes", "upstream.compartment_search"],
        ),
        (
            |v| v["tenants"]["demo"]["match"]["mode"] = "guess".into(),
            &["guess", "match.mode"],
        ),
        (
            |v| v["tenants"]["demo"]["match"]["input_level"] = "L0".into(),
            &["L0", "match.input_level"],
        ),
        (
            |v| v["tenants"]["demo"]["match"]["max_candidates"] = 0.into(),
            &["demo", "match.max_candidates", "1 to 500"],
        ),
        (
            |v| v["tenants"]["demo"]["match"]["search_count"] = 1000.into(),
            &["demo", "match.search_count", "1 to 100"],
        ),
        (
            |v| v["tenants"]["demo"]["match"]["weights"] = serde_json::json!({}),
            &["weights"],
        ),
        (
            |v| v["tenants"]["demo"]["authorization"]["denied_read_status"] = 418.into(),
            &["demo", "denied_read_status"],
        ),
        (
            |v| v["tenants"]["demo"]["token"]["issuers"] = serde_json::json!([]),
            &["demo", "token.issuers"],
        ),
        (|v| v["tenants"] = serde_json::json!({}), &["no tenants"]),
        (
            |v| {
                let t = v["tenants"]["demo"].clone();
                v["tenants"]["_x"] = t;
            },
            &["`_x`", "id"],
        ),
    ];
    for (edit, needles) in cases {
        let mut v = example_json();
        edit(&mut v);
        let p = write(&dir, &v);
        let out = check(&p, &[]);
        let t = text(&out);
        assert_eq!(
            out.status.code(),
            Some(64),
            "expected exit 64 for {needles:?}:\n{t}"
        );
        for n in needles {
            assert!(t.contains(n), "missing `{n}` in:\n{t}");
        }
    }
}

#[test]
fn environment_overrides_file_values() {
    // A bad value injected through the environment is seen (and refused) ...
    let out = check(
        &example(),
        &[("SFP__TENANTS__DEMO__UPSTREAM__BASE_URL", "not a url")],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("upstream.base_url"));
    // ... and a good one replaces the file's.
    let out = check(
        &example(),
        &[(
            "SFP__TENANTS__DEMO__UPSTREAM__BASE_URL",
            "http://10.1.2.3:9999/r4",
        )],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("http://10.1.2.3:9999/r4"));
}

#[test]
fn serve_refuses_invalid_config_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = example_json();
    v["tenants"]["demo"]["token"]["audience"] = "".into();
    let p = write(&dir, &v);
    let mut cmd = bin();
    with_example_env(&mut cmd);
    let out = cmd
        .arg("--tenants")
        .arg(&p)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("token.audience"));
}

#[test]
fn audit_repository_settings_are_checked_at_start_up_and_secrets_never_printed() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (&["--audit-fhir-endpoint", "not a url"], &[], "is not a url"),
        (
            &[
                "--audit-fhir-endpoint",
                "https://auditor:pw-in-url@audit.example/fhir",
            ],
            &[],
            "credentials in the URL",
        ),
        (
            &["--audit-fhir-endpoint", "https://audit.example/fhir?x=1"],
            &[],
            "query or fragment",
        ),
        (
            &[
                "--audit-fhir-endpoint",
                "https://audit.example/fhir",
                "--audit-fhir-token-env",
                "SFP_TEST_AUDIT_TOKEN_UNSET",
            ],
            &[],
            "`SFP_TEST_AUDIT_TOKEN_UNSET` is not set",
        ),
        (
            &[
                "--audit-fhir-endpoint",
                "https://audit.example/fhir",
                "--audit-fhir-basic-auth-env",
                "SFP_TEST_AUDIT_BASIC",
            ],
            &[("SFP_TEST_AUDIT_BASIC", "no-colon-secret-value")],
            "expected `user:password`",
        ),
    ];
    for (args, env, message) in cases {
        let mut cmd = bin();
        with_example_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd
            .arg("--tenants")
            .arg(example())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args)
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {t}");
        assert!(t.contains(message), "{args:?}: {t}");
        assert!(
            !t.contains("pw-in-url") && !t.contains("no-colon-secret-value"),
            "{t}"
        );
    }
}

#[test]
fn missing_file_is_a_config_error() {
    let out = check(Path::new("/nonexistent/tenants.json"), &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).contains("no such file"));
}

#[test]
fn openfga_settings_are_validated_and_secrets_never_printed() {
    let out = check(&example(), &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("example-secret"), "a secret was printed:\n{t}");
    // The OpenFGA client secret comes from the environment.
    let mut cmd = bin();
    with_example_env(&mut cmd);
    let out = cmd
        .arg("check-config")
        .arg("--tenants")
        .arg(example())
        .env_remove("RESEARCH_OPENFGA_CLIENT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("tenant `research`")
            && t.contains("authorization.openfga.credentials.client_secret"),
        "{t}"
    );
    // Bad values name their key.
    for (key, value, named) in [
        ("STORE_ID", "not/an/id", "authorization.openfga.store_id"),
        (
            "SEARCH_CHUNK_SIZE",
            "0",
            "authorization.openfga.search_chunk_size",
        ),
        ("TIMEOUT_MS", "0", "authorization.openfga.timeout_ms"),
        (
            "MAX_LISTED_PATIENTS",
            "0",
            "authorization.openfga.max_listed_patients",
        ),
        ("API_URL", "ftp://openfga", "authorization.openfga.api_url"),
    ] {
        let var = format!("SFP__TENANTS__RESEARCH__AUTHORIZATION__OPENFGA__{key}");
        let out = check(&example(), &[(var.as_str(), value)]);
        assert_eq!(out.status.code(), Some(64), "{key}: {}", text(&out));
        assert!(text(&out).contains(named), "{key}: {}", text(&out));
    }
}

#[test]
fn check_config_never_prints_a_secret() {
    // Every secret of the example from the environment, each with a value of its own,
    // and a copy with secrets written inline (a header value, an OpenFGA API token).
    let secrets = [
        ("DEMO2_UPSTREAM_API_KEY", "env-upstream-key-5c1d"),
        (
            "DEMO2_INTROSPECTION_SECRET",
            "env-introspection-secret-77ab",
        ),
        (
            "PARTNER_UPSTREAM_CLIENT_SECRET",
            "env-upstream-client-secret-0e9f",
        ),
        (
            "RESEARCH_OPENFGA_CLIENT_SECRET",
            "env-openfga-client-secret-3b2a",
        ),
        (
            "PARTNER_HMAC_SECRET",
            "env-hmac-shared-secret-of-more-than-32-bytes-9d4e",
        ),
    ];
    let out = check(&example(), &secrets);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for (var, value) in secrets {
        assert!(!t.contains(value), "`{var}` printed:\n{t}");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut inline = example_json();
    let tenants = &mut inline["tenants"];
    tenants["demo2"]["upstream"]["auth"] = serde_json::json!({
        "type": "header", "name": "x-api-key", "value": "inline-upstream-key-a8e3"
    });
    tenants["research"]["authorization"]["openfga"]["credentials"] = serde_json::json!({
        "method": "api_token", "api_token": "inline-openfga-token-6f0c"
    });
    let out = check(&write(&dir, &inline), &secrets);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("ApiToken(<redacted>)"), "{t}");
    for value in ["inline-upstream-key-a8e3", "inline-openfga-token-6f0c"] {
        assert!(!t.contains(value), "`{value}` printed:\n{t}");
    }
}
