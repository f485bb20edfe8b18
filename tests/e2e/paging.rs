//! Paging: Bundle links are proxy URLs carrying opaque cursors bound to tenant,
//! principal and the narrowed query; every page is re-authorized and re-filtered; a
//! tampered or foreign cursor is refused before anything reaches the upstream.
//!
//! "Nothing reached the upstream" is checked on the shared FHIR server's access log,
//! which every test of this binary writes to at the same time: each test pages with a
//! `_count` of its own, so the upstream request of its second page is unique. The
//! refused attempts come first, then the genuine link as a control, and that page
//! request must then be in the log exactly once (`_count` 3, 4, 5 and 9 are taken).
//! HAPI pages from the search it keeps (`[base]?_getpages=<id>&_getpagesoffset=N&_count=C`),
//! so a page request is known by its offset and count ([`hapi_page`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Answer, Proxy, get, shared, tenant, tenants, token};
use crate::support;

/// The URL of the link with `relation`, if any.
fn link(a: &Answer, relation: &str) -> Option<String> {
    a.json()["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .and_then(|l| l["url"].as_str())
        .map(str::to_owned)
}

/// No upstream URL anywhere, and every link points at the proxy; paging links carry
/// nothing but a cursor.
fn assert_proxy_links_only(a: &Answer, base: &str, path: &str) {
    let upstream = support::fhir_server().base_url();
    assert!(
        !a.text.contains(upstream),
        "upstream URL leaked: {}",
        a.text
    );
    for l in a.json()["link"].as_array().into_iter().flatten() {
        let url = l["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{base}{path}")), "{l}");
        if l["relation"] != "self" {
            let cursor = url
                .strip_prefix(&format!("{base}{path}?_cursor="))
                .unwrap_or_else(|| panic!("not a cursor link: {l}"));
            assert!(!cursor.is_empty() && !cursor.contains('&'), "{l}");
        }
    }
}

/// Follows `next` links from `first` until there is none; returns each page's ids.
async fn page_through(first: &str, t: &str, base: &str, path: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut url = Some(first.to_owned());
    while let Some(u) = url {
        assert!(pages.len() < 20, "too many pages");
        let a = get(&u, Some(t)).await;
        assert_eq!(a.status, 200, "{u}: {}", a.text);
        assert_proxy_links_only(&a, base, path);
        pages.push(a.entry_ids());
        url = link(&a, "next");
    }
    pages
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// The cursor with one character in the middle of its claims changed.
fn tampered(url: &str) -> String {
    let (head, cursor) = url.split_once("?_cursor=").unwrap();
    let mut bytes = cursor.as_bytes().to_vec();
    let i = cursor.find('.').unwrap() + 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    format!("{head}?_cursor={}", String::from_utf8(bytes).unwrap())
}

/// The end of HAPI's request line for the page at `offset` of a search by `count`.
fn hapi_page(offset: usize, count: usize) -> String {
    format!("_getpagesoffset={offset}&_count={count}&_bundletype=searchset")
}

/// How many upstream requests end with `suffix`, once the access log has caught up
/// with at least `at_least` of them (or after 5 s).
async fn upstream_count(suffix: &str, at_least: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = support::fhir_server()
            .requests()
            .iter()
            .filter(|r| r.ends_with(suffix))
            .count();
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows a genuine `next` link after refused attempts with the same cursor: the page
/// must not have reached the upstream before (the refusals were not forwarded), must be
/// served now with `entries` entries, and must then be in the upstream's log (at least
/// once: the pooled client may retry an idempotent GET on a connection the upstream
/// closed, which logs it twice).
async fn follow_after_refusals(next: &str, token: &str, upstream_page: &str, entries: usize) {
    assert_eq!(
        upstream_count(upstream_page, 0).await,
        0,
        "a refused cursor was forwarded"
    );
    let page = get(next, Some(token)).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.entry_ids().len(), entries);
    assert!(upstream_count(upstream_page, 1).await >= 1);
}

const P1_OBSERVATIONS: [&str; 6] = [
    "Observation/obs-p1-glucose",
    "Observation/obs-p1-hba1c",
    "Observation/obs-p1-heart-rate",
    "Observation/obs-p1-home-bp",
    "Observation/obs-p1-absolute-ref",
    "Observation/obs-p1-versioned-ref",
];

#[tokio::test]
async fn patient_pages_through_its_own_observations_only() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let pages = page_through(
        &format!("{base}/Observation?_count=2"),
        &t,
        &base,
        "/Observation",
    )
    .await;
    assert_eq!(pages.len(), 3, "{pages:?}");
    let all: Vec<String> = pages.concat();
    assert_eq!(all.len(), 6, "{all:?}");
    assert_eq!(
        all.iter().cloned().collect::<BTreeSet<_>>(),
        set(&P1_OBSERVATIONS)
    );

    // `previous` (and `first`, where the upstream gives one) of page 2 lead back to
    // page 1; `self` is the client's own request.
    let first = get(&format!("{base}/Observation?_count=2"), Some(&t)).await;
    assert_eq!(
        link(&first, "self").unwrap(),
        format!("{base}/Observation?_count=2")
    );
    let second = get(&link(&first, "next").unwrap(), Some(&t)).await;
    assert_eq!(second.entry_ids(), pages[1]);
    assert!(link(&second, "previous").is_some(), "{}", second.text);
    for rel in ["previous", "first"] {
        let Some(url) = link(&second, rel) else {
            continue;
        };
        let back = get(&url, Some(&t)).await;
        assert_eq!(back.status, 200, "{rel}: {}", back.text);
        assert_eq!(back.entry_ids(), pages[0], "{rel}");
    }
    // The self link of a cursor page is a cursor for that very page.
    let again = get(&link(&second, "self").unwrap(), Some(&t)).await;
    assert_eq!(again.entry_ids(), pages[1]);
}

#[tokio::test]
async fn compartment_search_pages_keep_the_compartment() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let pages = page_through(
        &format!("{base}/Patient/p1/Observation?_count=2"),
        &t,
        &base,
        "/Patient/p1/Observation",
    )
    .await;
    let all: Vec<String> = pages.concat();
    assert_eq!(
        all.iter().cloned().collect::<BTreeSet<_>>(),
        set(&P1_OBSERVATIONS)
    );
    assert_eq!(all.len(), 6);
}

#[tokio::test]
async fn system_token_pages_through_every_observation() {
    let t = token("backend", "system/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let pages = page_through(
        &format!("{base}/Observation?_count=2"),
        &t,
        &base,
        "/Observation",
    )
    .await;
    let all: Vec<String> = pages.concat();
    assert_eq!(all.len(), 11, "{all:?}");
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 11);
}

#[tokio::test]
async fn tampered_cursor_is_invalid_and_never_forwarded() {
    let t = token("backend", "system/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let first = get(&format!("{base}/Observation?_count=9"), Some(&t)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let next = link(&first, "next").unwrap();

    let a = get(&tampered(&next), Some(&t)).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.reason(), "cursor_invalid");
    for bad in [
        format!("{}x", next),
        next[..next.len() - 2].to_owned(),
        format!("{base}/Observation?_cursor=garbage"),
        format!("{base}/Observation?_cursor="),
    ] {
        let a = get(&bad, Some(&t)).await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text);
        assert_eq!(a.reason(), "cursor_invalid", "{bad}");
    }
    // Without a token a cursor is worth nothing.
    assert_eq!(get(&next, None).await.status, 401);

    follow_after_refusals(&next, &t, &hapi_page(9, 9), 2).await;
}

#[tokio::test]
async fn another_principal_or_tenant_cannot_replay_a_cursor() {
    let p1 = token("patient-p1", "patient/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let first = get(&format!("{base}/Observation?_count=5"), Some(&p1)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let next = link(&first, "next").unwrap();

    // Another patient, and another client of the same patient.
    for (client, scope) in [
        ("patient-p2", "patient/Observation.rs"),
        ("patient-p1-es256", "patient/Observation.rs"),
        ("backend", "system/Observation.rs"),
    ] {
        let other = token(client, scope, "demo").await;
        let a = get(&next, Some(&other)).await;
        assert_eq!(a.status, 403, "{client}: {}", a.text);
        assert_eq!(a.reason(), "cursor_foreign", "{client}");
    }
    // The same client on another tenant (same upstream).
    let p1_demo2 = token("patient-p1", "patient/Observation.rs", "demo2").await;
    let on_demo2 = next.replacen("/demo/", "/demo2/", 1);
    let a = get(&on_demo2, Some(&p1_demo2)).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "cursor_foreign");
    // The same principal whose scopes narrow the search differently now: the stored
    // page would be wider than it may see.
    let lab = token(
        "patient-p1",
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        "demo",
    )
    .await;
    let a = get(&next, Some(&lab)).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.reason(), "cursor_foreign");

    follow_after_refusals(&next, &p1, &hapi_page(5, 5), 1).await;
}

#[tokio::test]
async fn cursor_is_bound_to_the_request_path() {
    let t = token(
        "patient-p1",
        "patient/Observation.rs patient/Condition.rs",
        "demo",
    )
    .await;
    let base = shared().base("demo");
    let first = get(&format!("{base}/Observation?_count=4"), Some(&t)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let next = link(&first, "next").unwrap();
    let cursor = next.split_once("?_cursor=").unwrap().1;
    for other in [
        format!("{base}/Condition?_cursor={cursor}"),
        format!("{base}/Patient/p1/Observation?_cursor={cursor}"),
        format!("{base}/Observation/_history?_cursor={cursor}"),
    ] {
        let a = get(&other, Some(&t)).await;
        assert_eq!(a.status, 403, "{other}: {}", a.text);
        assert_eq!(a.reason(), "cursor_foreign", "{other}");
    }
    // p1 has 6 Observations: the second page of 4 holds 2.
    follow_after_refusals(&next, &t, &hapi_page(4, 4), 2).await;
}

#[tokio::test]
async fn cursor_must_be_the_only_parameter() {
    let t = token("patient-p1", "patient/Observation.rs", "demo").await;
    let base = shared().base("demo");
    let first = get(&format!("{base}/Observation?_count=3"), Some(&t)).await;
    let next = link(&first, "next").unwrap();
    let cursor = next.split_once("?_cursor=").unwrap().1;
    for mixed in [
        format!("{next}&_count=100"),
        format!("{next}&patient=p2"),
        format!("{base}/Observation?code=x&_cursor={cursor}"),
        format!("{next}&_cursor={cursor}"),
    ] {
        let a = get(&mixed, Some(&t)).await;
        assert_eq!(a.status, 400, "{mixed}: {}", a.text);
        assert_eq!(a.reason(), "cursor_invalid", "{mixed}");
    }
    follow_after_refusals(&next, &t, &hapi_page(3, 3), 3).await;
}

/// A proxy with one tenant `demo` on the shared stack and the given environment.
fn own_proxy(env: &[(&str, &str)]) -> Proxy {
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    Proxy::start_with_env(
        |port| {
            tenants(vec![(
                "demo",
                tenant("demo", port, fhir.base_url(), issuer),
            )])
        },
        env,
    )
}

#[tokio::test]
async fn instances_sharing_a_key_accept_each_others_cursors_until_they_expire() {
    // 32 bytes, base64.
    let key = "c2ZwLXRlc3QtY3Vyc29yLWtleS0zMi1ieXRlcy1sb25n";
    let env = [("SFP_CURSOR_KEY", key), ("SFP_CURSOR_TTL_SECONDS", "4")];
    let a = own_proxy(&env);
    let b = own_proxy(&env);
    let c = own_proxy(&[]);
    let scope = "patient/Observation.rs";
    let ta = support::token("patient-p1", scope, &a.base("demo")).await;
    let tb = support::token("patient-p1", scope, &b.base("demo")).await;
    let tc = support::token("patient-p1", scope, &c.base("demo")).await;

    let first = get(
        &format!("{}/Observation?_count=2", a.base("demo")),
        Some(&ta),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text);
    let next = link(&first, "next").unwrap();
    let cursor = next.split_once("?_cursor=").unwrap().1.to_owned();
    let at = |p: &Proxy| format!("{}/Observation?_cursor={cursor}", p.base("demo"));

    let on_b = get(&at(&b), Some(&tb)).await;
    assert_eq!(on_b.status, 200, "{}", on_b.text);
    assert_eq!(on_b.entry_ids().len(), 2);
    // Another key (random at start-up): not a cursor it issued.
    let on_c = get(&at(&c), Some(&tc)).await;
    assert_eq!(on_c.status, 400, "{}", on_c.text);
    assert_eq!(on_c.reason(), "cursor_invalid");

    tokio::time::sleep(Duration::from_secs(5)).await;
    let late = get(&next, Some(&ta)).await;
    assert_eq!(late.status, 400, "{}", late.text);
    assert_eq!(late.reason(), "cursor_expired");
}

#[tokio::test]
async fn a_short_cursor_key_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.json");
    let fhir = support::fhir_server();
    let issuer = support::issuer();
    let file: Value = tenants(vec![("demo", tenant("demo", 1, fhir.base_url(), issuer))]);
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-fhir-proxy"))
        .arg("--tenants")
        .arg(&path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("SFP_CURSOR_KEY", "c2hvcnQ=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SFP_CURSOR_KEY"), "{stderr}");
}
