#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn requests_are_counted_by_their_labels() {
    let m = Metrics::new();
    let demo = m.register_tenant("demo");
    let allowed = Outcome {
        tenant: demo,
        interaction: "read",
        reason: "allowed",
    };
    let unknown = Outcome {
        tenant: m.tenant("nope"),
        interaction: "-",
        reason: "tenant_unknown",
    };
    m.request(&allowed, 200, Duration::from_millis(3));
    m.request(&allowed, 200, Duration::from_millis(3));
    m.request(&unknown, 404, Duration::from_micros(100));
    let text = m.render(&[]);
    assert_eq!(
        lines(&text, "sfp_requests_total{"),
        [
            r#"sfp_requests_total{tenant="-",interaction="-",status="404",reason="tenant_unknown"} 1"#,
            r#"sfp_requests_total{tenant="demo",interaction="read",status="200",reason="allowed"} 2"#,
        ]
    );
    assert!(
        text.contains("# TYPE sfp_requests_total counter\n"),
        "{text}"
    );
    assert!(text.contains("# HELP sfp_requests_total "), "{text}");
}

#[test]
fn unregistered_tenants_share_one_label_value() {
    let m = Metrics::new();
    assert_eq!(m.tenant("anything"), TenantLabel::NONE);
    assert_eq!(m.tenant("demo"), TenantLabel::NONE);
    let demo = m.register_tenant("demo");
    assert_ne!(demo, TenantLabel::NONE);
    assert_eq!(m.tenant("demo"), demo);
    assert_eq!(m.register_tenant("demo"), demo);
    for id in ["a", "b", "c"] {
        m.entries_dropped(m.tenant(id), 1);
    }
    assert_eq!(
        lines(&m.render(&[]), "sfp_entries_dropped_total{"),
        [r#"sfp_entries_dropped_total{tenant="-"} 3"#]
    );
}

#[test]
fn histograms_are_cumulative_with_le_buckets() {
    let m = Metrics::new();
    let t = m.register_tenant("t1");
    // On a bound (le: less or equal), just above it, and beyond every bound.
    m.stage(t, Stage::Token, Duration::from_micros(500));
    m.stage(t, Stage::Token, Duration::from_micros(501));
    m.stage(t, Stage::Token, Duration::from_secs(60));
    let text = m.render(&[]);
    let buckets = lines(&text, "sfp_stage_duration_seconds_bucket{");
    assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
    assert_eq!(
        buckets[0],
        r#"sfp_stage_duration_seconds_bucket{tenant="t1",stage="token",le="0.0005"} 1"#
    );
    assert_eq!(
        buckets[1],
        r#"sfp_stage_duration_seconds_bucket{tenant="t1",stage="token",le="0.001"} 2"#
    );
    assert_eq!(
        buckets[13],
        r#"sfp_stage_duration_seconds_bucket{tenant="t1",stage="token",le="10"} 2"#
    );
    assert_eq!(
        buckets[14],
        r#"sfp_stage_duration_seconds_bucket{tenant="t1",stage="token",le="+Inf"} 3"#
    );
    assert_eq!(
        lines(&text, "sfp_stage_duration_seconds_count"),
        [r#"sfp_stage_duration_seconds_count{tenant="t1",stage="token"} 3"#]
    );
    assert_eq!(
        lines(&text, "sfp_stage_duration_seconds_sum"),
        [r#"sfp_stage_duration_seconds_sum{tenant="t1",stage="token"} 60.001001"#]
    );
}

#[test]
fn every_family_has_help_and_type_once_and_samples_follow_them() {
    let m = Metrics::new();
    let t = m.register_tenant("t1");
    m.jwks_fetch(t, true);
    m.jwks_fetch(t, false);
    m.jwks_cache(t, true);
    m.token_cache(t, false);
    m.fga_request(t, FgaEndpoint::BatchCheck);
    m.fga_error(t, FgaEndpoint::Check, "breaker_open");
    m.fga_cache(t, FgaCache::List, 2, 1);
    m.config_reload(true);
    m.config_reload(false);
    let extra = ScrapeFamily {
        name: "sfp_openfga_breaker_open",
        kind: "gauge",
        help: "whether open",
        samples: vec![(vec![("tenant", "t1".to_owned())], 1)],
    };
    let text = m.render(&[extra]);
    let mut declared = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            assert!(!declared.contains(&name), "declared twice: {name}");
            declared.push(name.clone());
            current = Some(name);
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = current.as_deref().unwrap();
            assert!(
                name == family
                    || [
                        format!("{family}_bucket"),
                        format!("{family}_sum"),
                        format!("{family}_count")
                    ]
                    .iter()
                    .any(|n| n == name),
                "{line} after TYPE {family}"
            );
        }
    }
    for expected in [
        r#"sfp_jwks_fetches_total{tenant="t1",result="error"} 1"#,
        r#"sfp_jwks_fetches_total{tenant="t1",result="ok"} 1"#,
        r#"sfp_jwks_cache_total{tenant="t1",result="hit"} 1"#,
        r#"sfp_token_cache_total{tenant="t1",result="miss"} 1"#,
        r#"sfp_openfga_requests_total{tenant="t1",endpoint="batch_check"} 1"#,
        r#"sfp_openfga_errors_total{tenant="t1",endpoint="check",reason="breaker_open"} 1"#,
        r#"sfp_openfga_cache_total{tenant="t1",cache="list",result="hit"} 2"#,
        r#"sfp_openfga_cache_total{tenant="t1",cache="list",result="miss"} 1"#,
        r#"sfp_config_reloads_total{result="failed"} 1"#,
        r#"sfp_config_reloads_total{result="ok"} 1"#,
        r#"sfp_openfga_breaker_open{tenant="t1"} 1"#,
        "sfp_requests_in_flight 0",
    ] {
        assert!(text.lines().any(|l| l == expected), "{expected} in\n{text}");
    }
    assert!(
        text.contains(&format!(
            "sfp_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.ends_with('\n'));
}

#[test]
fn label_values_and_help_are_escaped() {
    let mut out = String::new();
    escape_label(&mut out, "a\\b\"c\nd");
    assert_eq!(out, r#"a\\b\"c\nd"#);
    let mut text = String::new();
    let mut w = Writer { out: &mut text };
    w.head("x_total", "counter", "line\nbreak \\ slash");
    assert_eq!(
        text,
        "# HELP x_total line\\nbreak \\\\ slash\n# TYPE x_total counter\n"
    );
}

#[test]
fn in_flight_requests_are_counted_until_dropped() {
    let m = Metrics::new();
    let a = m.in_flight();
    let b = m.in_flight();
    assert!(m.render(&[]).contains("sfp_requests_in_flight 2\n"));
    drop(a);
    drop(b);
    assert!(m.render(&[]).contains("sfp_requests_in_flight 0\n"));
}

#[test]
fn concurrent_increments_are_all_counted() {
    let m = Arc::new(Metrics::new());
    let t = m.register_tenant("t1");
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let reason = ["a", "b", "c", "d"][i];
                for _ in 0..10_000 {
                    m.request(
                        &Outcome {
                            tenant: t,
                            interaction: "read",
                            reason,
                        },
                        200,
                        Duration::from_millis(1),
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = m.render(&[]);
    let total: u64 = lines(&text, "sfp_requests_total{")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 40_000);
    assert!(
        text.contains("sfp_request_duration_seconds_count{tenant=\"t1\"} 40000\n"),
        "{text}"
    );
}
