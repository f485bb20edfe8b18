#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, LazyLock};

use proptest::prelude::*;
use serde_json::json;

use bytes::Bytes;

use super::*;
use crate::authz::Checker;
use crate::authz::authorize;
use crate::authz::fga::PatientNarrowing;
use crate::error::ProxyError;
use crate::fhir::CompartmentIndex;
use crate::fhir::{ResourceId, parse_request};
use crate::rewrite::rewrite_request;
use crate::scope::{TokenContext, check_scopes};
use crate::smart::parse_scopes;
use crate::tenant::Tenant;
use crate::token::FhirUser;

/// Stage 4's resume of a `_cursor` request (`rewrite::resume`, built on [`open`] and
/// [`resume_page`]), its error classified as the client sees it.
fn resume(
    key: &CursorKey,
    tenant: &Tenant,
    token: &VerifiedToken,
    user: Option<&FhirUser>,
    req: &FhirRequest,
    patients: Option<(&PatientNarrowing, usize)>,
    now: u64,
) -> Result<Option<(OutboundRequest, Resumed)>, ProxyError> {
    crate::rewrite::resume(key, tenant, &CHECKER, token, user, req, patients, now)
        .map_err(ProxyError::from)
}

const PUBLIC: &str = "https://proxy.example/t1";
const NOW: u64 = 1_700_000_000;

static INDEX: LazyLock<Arc<CompartmentIndex>> =
    LazyLock::new(|| Arc::new(CompartmentIndex::official().unwrap()));

fn key() -> CursorKey {
    CursorKey::from_secret(&[7; 32], 60).unwrap()
}

fn token(client: &str, scopes: &str, patient: Option<&str>) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: Some(client.to_owned()),
        client_id: Some(client.to_owned()),
        scopes: parse_scopes(scopes),
        patient: patient.map(|p| ResourceId::parse(p).unwrap()),
        fhir_user: patient.map(|p| FhirUser::parse(&format!("Patient/{p}")).unwrap()),
        expires_at: u64::MAX,
    }
}

fn get(target: &str) -> FhirRequest {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    parse_request(&Method::GET, path, query, None).unwrap()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn page() -> Page {
    Page {
        path: "/Patient/p1/Observation".to_owned(),
        params: pairs(&[("_count", "2"), ("_offset", "2")]),
    }
}

fn binding<'a>(principal: &'a str, request: &'a str) -> Binding<'a> {
    Binding {
        tenant: "t1",
        principal,
        request,
    }
}

fn issue(key: &CursorKey) -> String {
    key.issue(
        &binding("prn", "search-type /Observation"),
        &pairs(&[("_count", "2")]),
        "digest",
        page(),
        NOW,
    )
    .unwrap()
}

/// A compartment-mode tenant whose upstream has compartment search (the pages below
/// are those of `rewrite_request`, which sends compartment searches as such).
fn tenant() -> Tenant {
    let raw: crate::config::RawFile = serde_json::from_value(json!({"tenants": {"t1": {
        "public_base_url": PUBLIC,
        "upstream": {"base_url": "http://127.0.0.1:8081/fhir", "compartment_search": "native"},
        "token": {
            "issuers": ["https://issuer.example"],
            "jwks_uri": "https://issuer.example/jwks",
            "audience": PUBLIC,
        },
        "smart": {
            "authorization_endpoint": "https://issuer.example/auth",
            "token_endpoint": "https://issuer.example/token",
        },
        "authorization": {"mode": "compartment"},
    }}}))
    .unwrap();
    let config = crate::config::validate(raw).unwrap().remove(0);
    Tenant {
        config,
        generation: 0,
    }
}

/// The tenant's checker (compartment mode, denied reads are 404).
static CHECKER: LazyLock<Checker> =
    LazyLock::new(|| Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND));

// ---------------------------------------------------------------------------------------
// the token

#[test]
fn round_trip() {
    let key = key();
    let text = issue(&key);
    let c = key
        .verify(&text, &binding("prn", "search-type /Observation"), NOW)
        .unwrap();
    assert_eq!(c.tenant, "t1");
    assert_eq!(c.principal, "prn");
    assert_eq!(c.request, "search-type /Observation");
    assert_eq!(c.client_params, pairs(&[("_count", "2")]));
    assert_eq!(c.narrowed, "digest");
    assert_eq!(c.page, page());
    assert_eq!(c.exp, NOW + 60);
}

#[test]
fn cursor_is_url_safe() {
    let text = issue(&key());
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
        "{text}"
    );
}

#[test]
fn tampering_with_any_byte_is_invalid() {
    let key = key();
    let text = issue(&key);
    let b = binding("prn", "search-type /Observation");
    for i in 0..text.len() {
        for replacement in ['A', 'z', '0', '_', '.'] {
            let mut bytes = text.clone().into_bytes();
            if bytes[i] == replacement as u8 {
                continue;
            }
            bytes[i] = replacement as u8;
            let tampered = String::from_utf8(bytes).unwrap();
            assert_eq!(
                key.verify(&tampered, &b, NOW),
                Err(CursorError::Invalid),
                "byte {i} -> {replacement}"
            );
        }
    }
    // Truncated or extended.
    assert_eq!(
        key.verify(&text[..text.len() - 1], &b, NOW),
        Err(CursorError::Invalid)
    );
    assert_eq!(
        key.verify(&format!("{text}A"), &b, NOW),
        Err(CursorError::Invalid)
    );
}

#[test]
fn another_key_is_invalid() {
    let other = CursorKey::from_secret(&[8; 32], 60).unwrap();
    let text = issue(&other);
    assert_eq!(
        key().verify(&text, &binding("prn", "search-type /Observation"), NOW),
        Err(CursorError::Invalid)
    );
}

#[test]
fn tokens_that_are_not_cursors_are_invalid() {
    let key = key();
    let b = binding("prn", "search-type /Observation");
    let claims = json!({"ten": "t1", "prn": "prn", "req": "search-type /Observation",
        "cq": [], "nq": "digest", "pg": {"p": "/Observation", "q": []}, "exp": NOW + 60});
    // Right key and claims, but not typed as a cursor.
    let plain = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&[7; 32]),
    )
    .unwrap();
    assert_eq!(key.verify(&plain, &b, NOW), Err(CursorError::Invalid));
    // Another HMAC algorithm.
    let mut header = Header::new(Algorithm::HS512);
    header.typ = Some(TYP.to_owned());
    let hs512 =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[7; 32])).unwrap();
    assert_eq!(key.verify(&hs512, &b, NOW), Err(CursorError::Invalid));
    // `alg: none`, unsigned.
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": TYP})),
        b64(&claims)
    );
    assert_eq!(key.verify(&none, &b, NOW), Err(CursorError::Invalid));
    // Extra claims are refused.
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some(TYP.to_owned());
    let mut extra = claims.clone();
    extra["x"] = json!(1);
    let extra = jsonwebtoken::encode(&header, &extra, &EncodingKey::from_secret(&[7; 32])).unwrap();
    assert_eq!(key.verify(&extra, &b, NOW), Err(CursorError::Invalid));
    // A page path that is not relative to the upstream base.
    for path in ["Observation", "/a/../b", "/a?b", "http://evil/x"] {
        let mut bad = claims.clone();
        bad["pg"]["p"] = json!(path);
        let bad = jsonwebtoken::encode(&header, &bad, &EncodingKey::from_secret(&[7; 32])).unwrap();
        assert_eq!(
            key.verify(&bad, &b, NOW),
            Err(CursorError::Invalid),
            "{path}"
        );
    }
    // The same claims, properly typed, pass.
    let good = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[7; 32])).unwrap();
    assert!(key.verify(&good, &b, NOW).is_ok());
}

#[test]
fn expired() {
    let key = key();
    let text = issue(&key);
    let b = binding("prn", "search-type /Observation");
    assert!(key.verify(&text, &b, NOW + 59).is_ok());
    assert_eq!(key.verify(&text, &b, NOW + 60), Err(CursorError::Expired));
    assert_eq!(
        key.verify(&text, &b, NOW + 100_000),
        Err(CursorError::Expired)
    );
    assert_eq!(CursorError::Expired.status(), StatusCode::BAD_REQUEST);
    assert_eq!(CursorError::Expired.reason(), "cursor_expired");
}

#[test]
fn other_tenant_principal_or_request_is_foreign() {
    let key = key();
    let text = issue(&key);
    let other_tenant = Binding {
        tenant: "t2",
        principal: "prn",
        request: "search-type /Observation",
    };
    for b in [
        other_tenant,
        binding("other", "search-type /Observation"),
        binding("prn", "search-type /Condition"),
        binding("prn", "search-compartment /Patient/p1/Observation"),
    ] {
        assert_eq!(
            key.verify(&text, &b, NOW),
            Err(CursorError::Foreign),
            "{b:?}"
        );
    }
    assert_eq!(CursorError::Foreign.status(), StatusCode::FORBIDDEN);
    assert_eq!(CursorError::Foreign.reason(), "cursor_foreign");
    assert_eq!(CursorError::Invalid.reason(), "cursor_invalid");
    assert_eq!(CursorError::NotAlone.reason(), "cursor_invalid");
    assert_eq!(CursorError::NotAlone.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn principal_names_every_identity_claim() {
    let key = key();
    let base = token("patient-p1", "patient/*.rs", Some("p1"));
    let same = key.principal(&base);
    assert_eq!(same, key.principal(&base.clone()));
    // Scopes are not part of the principal (they are re-checked on every page).
    let mut t = base.clone();
    t.scopes = parse_scopes("patient/Observation.rs");
    assert_eq!(key.principal(&t), same);
    let variants: [fn(&mut VerifiedToken); 5] = [
        |t| t.issuer = "https://other.example".to_owned(),
        |t| t.subject = None,
        |t| t.client_id = Some("x".to_owned()),
        |t| t.patient = ResourceId::parse("p10"),
        |t| t.fhir_user = FhirUser::parse("Patient/p10"),
    ];
    for change in variants {
        let mut t = base.clone();
        change(&mut t);
        assert_ne!(key.principal(&t), same);
    }
    // Keyed: another key gives another digest, and no identifier shows in clear.
    let other = CursorKey::from_secret(&[8; 32], 60).unwrap();
    assert_ne!(other.principal(&base), same);
    assert!(!same.contains("p1"));
}

#[test]
fn keys() {
    assert!(CursorKey::from_secret(&[1; 31], 60).is_err());
    assert!(CursorKey::from_secret(&[1; 32], 0).is_err());
    let std = base64::engine::general_purpose::STANDARD.encode([0xfb; 32]);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfb; 32]);
    assert!(CursorKey::from_base64(&std, 60).is_ok());
    assert!(CursorKey::from_base64(&url, 60).is_ok());
    assert!(CursorKey::from_base64(&format!(" {std}\n"), 60).is_ok());
    assert!(CursorKey::from_base64("c2hvcnQ=", 60).is_err());
    assert!(CursorKey::from_base64("not base64!", 60).is_err());
    // Two generated keys differ.
    let a = CursorKey::generate(60).unwrap();
    let b = CursorKey::generate(60).unwrap();
    assert_eq!(a.ttl_seconds(), 60);
    let text = issue(&a);
    assert_eq!(
        b.verify(&text, &binding("prn", "search-type /Observation"), NOW),
        Err(CursorError::Invalid)
    );
    assert!(!format!("{a:?}").contains("encoding"));
}

proptest! {
    #[test]
    fn garbage_never_verifies(text in ".{0,400}") {
        let r = key().verify(&text, &binding("prn", "search-type /Observation"), NOW);
        prop_assert_eq!(r, Err(CursorError::Invalid));
    }

    #[test]
    fn jwt_shaped_garbage_never_verifies(
        a in "[A-Za-z0-9_-]{0,300}",
        b in "[A-Za-z0-9_-]{0,3000}",
        c in "[A-Za-z0-9_-]{0,100}",
    ) {
        let text = format!("{a}.{b}.{c}");
        let r = key().verify(&text, &binding("prn", "search-type /Observation"), NOW);
        prop_assert_eq!(r, Err(CursorError::Invalid));
    }

    #[test]
    fn mutated_cursors_never_verify(i in 0usize..4096, byte in any::<u8>()) {
        let key = key();
        let text = issue(&key);
        let i = i % text.len();
        let mut bytes = text.clone().into_bytes();
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        let tampered = String::from_utf8_lossy(&bytes).into_owned();
        let r = key.verify(&tampered, &binding("prn", "search-type /Observation"), NOW);
        prop_assert_eq!(r, Err(CursorError::Invalid));
    }
}

#[test]
fn huge_input_is_refused_without_decoding() {
    let key = key();
    let huge = "A".repeat(10 * 1024 * 1024);
    assert_eq!(
        key.verify(&huge, &binding("prn", "search-type /Observation"), NOW),
        Err(CursorError::Invalid)
    );
    assert_eq!(
        key.verify("", &binding("prn", "search-type /Observation"), NOW),
        Err(CursorError::Invalid)
    );
}

// ---------------------------------------------------------------------------------------
// request shapes and the `_cursor` parameter

#[test]
fn request_paths() {
    for (target, path) in [
        ("/Observation", Some("/Observation")),
        ("/Observation?code=a", Some("/Observation")),
        ("", Some("")),
        ("/Patient/p1/Observation", Some("/Patient/p1/Observation")),
        ("/Patient/p1/*", Some("/Patient/p1/*")),
        ("/Observation/o1/_history", Some("/Observation/o1/_history")),
        ("/Observation/_history", Some("/Observation/_history")),
        ("/_history", Some("/_history")),
        ("/Patient/p1/$everything", Some("/Patient/p1/$everything")),
        ("/Observation/o1", None),
        ("/Observation/o1/_history/2", None),
        ("/metadata", None),
    ] {
        let req = get(target);
        assert_eq!(request_path(&req).as_deref(), path, "{target}");
    }
    assert_eq!(
        request_binding(&get("/Patient/p1/Observation")),
        "search-compartment /Patient/p1/Observation"
    );
    assert_eq!(request_binding(&get("/Observation/o1")), "read ");
}

#[test]
fn cursor_must_be_alone() {
    assert_eq!(cursor_param(&get("/Observation?code=a")), Ok(None));
    assert_eq!(cursor_param(&get("/Observation?_cursor=x")), Ok(Some("x")));
    for target in [
        "/Observation?_cursor=x&code=a",
        "/Observation?code=a&_cursor=x",
        "/Observation?_cursor=x&_cursor=y",
        "/Observation?_cursor=x&_count=5",
    ] {
        assert_eq!(
            cursor_param(&get(target)),
            Err(CursorError::NotAlone),
            "{target}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// issuing links

fn outbound(path: &str, params: &[(&str, &str)]) -> OutboundRequest {
    OutboundRequest {
        method: Method::GET,
        path: path.to_owned(),
        params: pairs(params),
        body: None,
        conditional: false,
        narrowing: None,
        headers: Vec::new(),
    }
}

fn cursor_of(url: &str) -> &str {
    url.split_once("?_cursor=").unwrap().1
}

#[test]
fn links_become_cursors_for_the_narrowed_query() {
    let key = key();
    let t = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let req = get("/Observation?_count=2");
    let out = outbound("/Patient/p1/Observation", &[("_count", "2")]);
    let pager = Pager::new(&key, "t1", PUBLIC, &t, &req, &out, None, NOW);
    let principal = key.principal(&t);
    let b = binding(&principal, "search-type /Observation");

    // `self` is the client's own request.
    assert_eq!(
        pager
            .link("self", &format!("{PUBLIC}/Observation?_count=2&_offset=0"))
            .unwrap()
            .as_deref(),
        Some(format!("{PUBLIC}/Observation?_count=2").as_str())
    );
    // The upstream dropped the compartment: the narrowed path is kept.
    let next = pager
        .link("next", &format!("{PUBLIC}/Observation?_count=2&_offset=2"))
        .unwrap()
        .unwrap();
    assert!(
        next.starts_with(&format!("{PUBLIC}/Observation?_cursor=")),
        "{next}"
    );
    let c = key.verify(cursor_of(&next), &b, NOW).unwrap();
    assert_eq!(
        c.page,
        Page {
            path: "/Patient/p1/Observation".to_owned(),
            params: pairs(&[("_count", "2"), ("_offset", "2")]),
        }
    );
    assert_eq!(c.client_params, pairs(&[("_count", "2")]));
    assert_eq!(c.narrowed, key.query_digest(&out.path, &out.params));
    assert_eq!(c.exp, NOW + 60);
    // Every paging relation.
    for rel in ["previous", "prev", "first", "last"] {
        let url = pager
            .link(rel, &format!("{PUBLIC}/Observation?_count=2&_offset=0"))
            .unwrap()
            .unwrap();
        assert!(key.verify(cursor_of(&url), &b, NOW).is_ok(), "{rel}");
    }
    // Anything else, and any URL outside the tenant's public base, is dropped.
    for (rel, url) in [
        ("alternate", format!("{PUBLIC}/Observation")),
        (
            "next",
            "http://127.0.0.1:8081/fhir/Observation?_offset=2".to_owned(),
        ),
        ("next", format!("{PUBLIC}2/Observation?_offset=2")),
        ("next", "https://proxy.example/t2/Observation".to_owned()),
        ("next", "Observation?_offset=2".to_owned()),
        ("next", format!("{PUBLIC}/Observation?_offset=2#x")),
        (
            "self",
            "http://elsewhere.example/fhir/Observation".to_owned(),
        ),
    ] {
        assert_eq!(pager.link(rel, &url).unwrap(), None, "{rel} {url}");
    }
}

#[test]
fn base_links_are_kept_and_lost_narrowing_is_added_back() {
    let key = key();
    let t = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let req = get("/Observation?code=a&_sort=date");
    let out = outbound(
        "/Patient/p1/Observation",
        &[("code", "a"), ("_sort", "date"), ("category", "laboratory")],
    );
    let pager = Pager::new(&key, "t1", PUBLIC, &t, &req, &out, None, NOW);
    let principal = key.principal(&t);
    let b = binding(&principal, "search-type /Observation");
    // HAPI's handle to a search it holds: the base with `_getpages`, kept as it is.
    let hapi = pager
        .link("next", &format!("{PUBLIC}?_getpages=abc&_getpagesoffset=2"))
        .unwrap()
        .unwrap();
    let c = key.verify(cursor_of(&hapi), &b, NOW).unwrap();
    assert_eq!(
        c.page,
        Page {
            path: String::new(),
            params: pairs(&[("_getpages", "abc"), ("_getpagesoffset", "2")]),
        }
    );
    // A link that lost a narrowing parameter gets it back; result parameters do not.
    let lossy = pager
        .link(
            "next",
            &format!("{PUBLIC}/Patient/p1/Observation?code=a&_offset=2"),
        )
        .unwrap()
        .unwrap();
    let c = key.verify(cursor_of(&lossy), &b, NOW).unwrap();
    assert_eq!(
        c.page.params,
        pairs(&[("code", "a"), ("_offset", "2"), ("category", "laboratory")])
    );
    assert_eq!(c.page.path, "/Patient/p1/Observation");
}

#[test]
fn unpageable_answers_lose_every_link() {
    let key = key();
    let t = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let req = get("/Observation/o1");
    let out = outbound("/Observation/o1", &[]);
    let pager = Pager::new(&key, "t1", PUBLIC, &t, &req, &out, None, NOW);
    for rel in ["self", "next"] {
        assert_eq!(
            pager
                .link(rel, &format!("{PUBLIC}/Observation?_offset=2"))
                .unwrap(),
            None
        );
    }
}

// ---------------------------------------------------------------------------------------
// accepting cursors

/// The first page of `target` for `t`, as stages 4 and 5 would issue it, and the
/// cursor of its `next` link.
fn first_next(key: &CursorKey, tenant: &Tenant, t: &VerifiedToken, target: &str) -> String {
    let req = get(target);
    let grant = check_scopes(
        &t.scopes,
        &req,
        TokenContext {
            has_patient: t.patient.is_some(),
        },
    )
    .unwrap();
    let permit = authorize(&CHECKER, &req, t, &grant).unwrap();
    let out = rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).unwrap();
    let pager = Pager::new(key, tenant.id(), PUBLIC, t, &req, &out, None, NOW);
    let url = pager
        .link("next", &format!("{PUBLIC}/Observation?_count=2&_offset=2"))
        .unwrap()
        .unwrap();
    cursor_of(&url).to_owned()
}

#[test]
fn resume_rebuilds_the_page_from_the_cursor() {
    let key = key();
    let tenant = tenant();
    let p1 = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let c = first_next(&key, &tenant, &p1, "/Observation?_count=2");
    let req = get(&format!("/Observation?_cursor={c}"));
    let (out, resumed) = resume(
        &key,
        &tenant,
        &p1,
        p1.fhir_user.as_ref(),
        &req,
        None,
        NOW + 1,
    )
    .unwrap()
    .unwrap();
    assert_eq!(out.path, "/Patient/p1/Observation");
    assert_eq!(out.params, pairs(&[("_count", "2"), ("_offset", "2")]));
    assert_eq!(out.method, Method::GET);
    assert_eq!(resumed.client_params, pairs(&[("_count", "2")]));
    assert_eq!(resumed.narrowed.path, "/Patient/p1/Observation");
    // No cursor: nothing to do.
    assert!(
        resume(
            &key,
            &tenant,
            &p1,
            p1.fhir_user.as_ref(),
            &get("/Observation?_count=2"),
            None,
            NOW
        )
        .unwrap()
        .is_none()
    );
}

fn resume_err(key: &CursorKey, tenant: &Tenant, t: &VerifiedToken, target: &str) -> ProxyError {
    resume(
        key,
        tenant,
        t,
        t.fhir_user.as_ref(),
        &get(target),
        None,
        NOW + 1,
    )
    .unwrap_err()
}

#[test]
fn resume_refuses_foreign_and_broken_cursors() {
    let key = key();
    let tenant = tenant();
    let p1 = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let c = first_next(&key, &tenant, &p1, "/Observation?_count=2");
    let foreign = |e: ProxyError| matches!(e, ProxyError::Cursor(CursorError::Foreign));
    // Another patient.
    let p2 = token("patient-p2", "patient/Observation.rs", Some("p2"));
    assert!(foreign(resume_err(
        &key,
        &tenant,
        &p2,
        &format!("/Observation?_cursor={c}")
    )));
    // Another request path.
    let both = token(
        "patient-p1",
        "patient/Observation.rs patient/Condition.rs",
        Some("p1"),
    );
    assert!(foreign(resume_err(
        &key,
        &tenant,
        &both,
        &format!("/Condition?_cursor={c}")
    )));
    // The same principal with a constrained scope: the original request narrows
    // differently now, so the stored page could be too wide.
    let lab = token(
        "patient-p1",
        "patient/Observation.rs?category=laboratory",
        Some("p1"),
    );
    assert!(foreign(resume_err(
        &key,
        &tenant,
        &lab,
        &format!("/Observation?_cursor={c}")
    )));
    // Mixed with other parameters, tampered.
    assert!(matches!(
        resume_err(
            &key,
            &tenant,
            &p1,
            &format!("/Observation?_cursor={c}&_count=100")
        ),
        ProxyError::Cursor(CursorError::NotAlone)
    ));
    let mut tampered = c.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(matches!(
        resume_err(
            &key,
            &tenant,
            &p1,
            &format!("/Observation?_cursor={tampered}")
        ),
        ProxyError::Cursor(CursorError::Invalid)
    ));
    // Expired.
    let req = get(&format!("/Observation?_cursor={c}"));
    assert!(matches!(
        resume(
            &key,
            &tenant,
            &p1,
            p1.fhir_user.as_ref(),
            &req,
            None,
            NOW + 60
        )
        .unwrap_err(),
        ProxyError::Cursor(CursorError::Expired)
    ));
}

#[test]
fn resume_re_authorizes_the_original_request() {
    let key = key();
    let tenant = tenant();
    // Issued to a token with Observation scope; the same principal without it gets the
    // scope error of the original request.
    let p1 = token("patient-p1", "patient/Observation.rs", Some("p1"));
    let c = first_next(&key, &tenant, &p1, "/Observation?_count=2");
    let without = token("patient-p1", "patient/Condition.rs", Some("p1"));
    assert!(matches!(
        resume_err(
            &key,
            &tenant,
            &without,
            &format!("/Observation?_cursor={c}")
        ),
        ProxyError::Scope(_)
    ));
}

#[test]
fn rewrite_never_forwards_a_cursor() {
    let t = token("backend", "system/Observation.rs", None);
    let req = get("/Observation?_cursor=x");
    let grant = check_scopes(&t.scopes, &req, TokenContext { has_patient: false }).unwrap();
    let permit = authorize(&CHECKER, &req, &t, &grant).unwrap();
    assert!(rewrite_request(&req, &grant, &permit, &INDEX, &Bytes::new()).is_err());
}

#[test]
fn chunked_search_links_carry_the_chunk_and_list_digest_but_never_the_list() {
    let key = key();
    let t = token("practitioner", "user/Observation.rs", None);
    let req = get("/Observation?_count=2");
    let mut out = outbound("/Observation", &[("_count", "2")]);
    let list = crate::authz::fga::PatientNarrowing::new(vec!["a".into(), "b".into(), "c".into()]);
    out.narrowing = Some(crate::fhir::Narrowing {
        param: "subject".to_owned(),
        values: Arc::clone(&list.refs),
        chunk_size: 2,
        chunk: 0,
        send: true,
        fingerprint: Arc::clone(&list.fingerprint),
    });
    let pager = Pager::new(&key, "t1", PUBLIC, &t, &req, &out, None, NOW);
    let principal = key.principal(&t);
    let b = binding(&principal, "search-type /Observation");
    assert!(pager.segmented());
    // The upstream repeats the chunk in its link; the cursor drops it.
    let next = pager
        .link(
            "next",
            &format!("{PUBLIC}/Observation?subject=Patient%2Fa%2CPatient%2Fb&_count=2&_offset=2"),
        )
        .unwrap()
        .unwrap();
    let c = key.verify(cursor_of(&next), &b, NOW).unwrap();
    assert_eq!(c.page.params, pairs(&[("_count", "2"), ("_offset", "2")]));
    let seg = c.segment.unwrap();
    assert_eq!((seg.chunk, seg.send), (0, true));
    assert_eq!(seg.list, key.list_digest(out.narrowing.as_ref().unwrap()));
    assert!(!next.contains("Patient"), "{next}");
    // `first` and `last` would name the chunk's pages, not the search's.
    for rel in ["first", "last"] {
        assert_eq!(
            pager.link(rel, &format!("{PUBLIC}/Observation")).unwrap(),
            None
        );
    }
    // The chunk's end links to the next chunk's first page.
    let c = key
        .verify(
            cursor_of(&pager.next_chunk_link().unwrap().unwrap()),
            &b,
            NOW,
        )
        .unwrap();
    assert_eq!(c.segment.unwrap().chunk, 1);
    assert_eq!(c.page.params, pairs(&[("_count", "2")]));
    // The last chunk has no next chunk; another list has another digest.
    let mut last = out.clone();
    if let Some(n) = last.narrowing.as_mut() {
        n.chunk = 1;
    }
    let pager = Pager::new(&key, "t1", PUBLIC, &t, &req, &last, None, NOW);
    assert_eq!(pager.next_chunk_link().unwrap(), None);
    let mut other = out.narrowing.clone().unwrap();
    let shorter = crate::authz::fga::PatientNarrowing::new(vec!["a".into()]);
    other.values = shorter.refs;
    other.fingerprint = shorter.fingerprint;
    assert_ne!(key.list_digest(&other), seg.list);
}
