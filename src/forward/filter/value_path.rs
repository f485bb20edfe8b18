//! The answer check as it was before answers were projected: every resource parsed
//! into a whole `serde_json::Value`, and the body URL-rewritten before the check. Kept
//! (for tests only) as the reference the projected check must agree with.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::collections::HashSet;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::authz::{AuthzError, Release};
use crate::fhir::{Interaction, ResourceType};
use crate::pipeline::Internal;
use crate::upstream::UpstreamError;

use super::super::ForwardError;
use super::{CheckCtx, Checked, is_asked_record, is_json, targets_one_record};

/// Decides what of an upstream answer the client may see.
pub fn check_answer(
    ctx: &CheckCtx<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Checked, ForwardError> {
    if status == StatusCode::NOT_MODIFIED {
        // Conditional headers are only forwarded for unrestricted permits; a 304 for
        // anyone else cannot be checked.
        if !ctx.records.permit.is_unrestricted() {
            return Err(UpstreamError::BadResponse("unchecked 304").into());
        }
        return Ok(Checked {
            body: Bytes::new(),
            dropped: 0,
            kept: 0,
            reason: "not_modified",
        });
    }
    if status.is_redirection() {
        return Err(UpstreamError::Redirect.into());
    }
    if !status.is_success() {
        // For a single record, "missing" and "gone" look exactly like "denied". For
        // restricted tokens so does every other client error: an upstream that looks
        // the record up before validating parameters (`_since=garbage`) would otherwise
        // answer 400 for existing records and 404 for missing ones.
        let restricted = !ctx.records.permit.is_unrestricted();
        if targets_one_record(ctx.request)
            && (status == StatusCode::NOT_FOUND
                || status == StatusCode::GONE
                || (restricted && status.is_client_error()))
        {
            return Err(UpstreamError::NotFound.into());
        }
        if is_json(headers) && resource_type_of(&body).as_deref() == Some("OperationOutcome") {
            return Ok(Checked {
                body,
                dropped: 0,
                kept: 0,
                reason: "upstream_outcome",
            });
        }
        return Err(UpstreamError::Status(status).into());
    }
    if !is_json(headers) {
        return Err(UpstreamError::BadResponse("content type").into());
    }
    // The type alone first (a cheap scan); a whole `Value` only where one record is
    // checked, since a Bundle is parsed entry by entry below.
    let rt = resource_type_of(&body)
        .as_deref()
        .and_then(ResourceType::parse)
        .ok_or(UpstreamError::BadResponse("resourceType"))?;
    let parse = || -> Result<Value, ForwardError> {
        serde_json::from_slice(&body).map_err(|_| UpstreamError::BadResponse("json").into())
    };
    let denied = || -> ForwardError {
        AuthzError::Hidden {
            status: ctx.records.permit.denied_status,
        }
        .into()
    };

    if matches!(
        ctx.request.interaction,
        Interaction::Read | Interaction::Vread
    ) {
        let resource = parse()?;
        // The answer must be the record asked for; anything else is an upstream fault.
        if !is_asked_record(ctx.request, &resource) {
            return Err(UpstreamError::WrongResource.into());
        }
        return match ctx.records.release(rt, &resource, true) {
            Release::Allowed(_) => Ok(Checked {
                body,
                dropped: 0,
                kept: 0,
                reason: "record_allowed",
            }),
            // Non-patient data a patient token may only see next to its own records.
            Release::AllowedIfReferenced(_) | Release::DeniedType | Release::DeniedRecord => {
                Err(denied())
            }
        };
    }

    if rt == ResourceType::BUNDLE {
        if ctx.request.interaction == Interaction::HistoryInstance
            && history_of_another_record(ctx, &body)
        {
            return Err(UpstreamError::WrongResource.into());
        }
        let checked = filter_bundle(ctx, &body)?;
        // The history of a record the token may not see must look like a missing
        // record, not like an empty history.
        // The history of a record the token may not see must look like a missing
        // record. An empty history says nothing either way (the upstream may answer
        // a missing id, `_count=0` or `_since` in the future with an empty 200 and a
        // `total`), so for restricted tokens an instance history with nothing
        // releasable is answered exactly like a missing record.
        if ctx.request.interaction == Interaction::HistoryInstance
            && !ctx.records.permit.is_unrestricted()
            && checked.kept == 0
        {
            return Err(if checked.dropped > 0 {
                denied()
            } else {
                UpstreamError::NotFound.into()
            });
        }
        return Ok(checked);
    }
    if rt == ResourceType::OPERATION_OUTCOME {
        return Ok(Checked {
            body,
            dropped: 0,
            kept: 0,
            reason: "upstream_outcome",
        });
    }
    // Every other interaction answers with a Bundle.
    Err(UpstreamError::WrongResource.into())
}

/// Whether an instance history holds a version of another record (`false` when its
/// entries do not parse: the Bundle check then refuses them).
fn history_of_another_record(ctx: &CheckCtx<'_>, body: &[u8]) -> bool {
    let Ok(top) = serde_json::from_slice::<IndexMap<String, Box<RawValue>>>(body) else {
        return false;
    };
    let Some(entries) = top.get("entry") else {
        return false;
    };
    let Ok(entries) = serde_json::from_str::<Vec<EntryView>>(entries.get()) else {
        return false;
    };
    entries.iter().any(|e| {
        e.resource
            .as_ref()
            .is_some_and(|r| !is_asked_record(ctx.request, r))
    })
}

/// `resourceType`, decoded (an escaped one, `"Bundl\u0065"`, is still the type: the
/// check that replaced this one reads it so, and the fuzz target compares the two).
fn resource_type_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "resourceType")]
        resource_type: Option<String>,
    }
    serde_json::from_slice::<Head>(body).ok()?.resource_type
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Match,
    Include,
    Outcome,
}

enum Decision {
    Keep,
    Drop,
    /// Keep only if a kept entry references this `Type/id`.
    IfReferenced(String),
}

/// Adds every local reference (`Type/id`, versions stripped, local absolute bases
/// removed) found anywhere in `resource` to `out`. Contained (`#x`) and foreign
/// references are ignored.
fn collect_references(resource: &Value, bases: &[&str], out: &mut HashSet<String>) {
    match resource {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("reference", Value::String(r)) => {
                        if let Some(l) = crate::fhir::parse_local_reference(r, bases) {
                            out.insert(format!("{}/{}", l.resource_type, l.id));
                        }
                    }
                    _ => collect_references(value, bases, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_references(i, bases, out)),
        _ => {}
    }
}

#[derive(Deserialize)]
struct EntryView {
    resource: Option<Value>,
    search: Option<SearchView>,
}

#[derive(Deserialize)]
struct SearchView {
    mode: Option<String>,
}

fn filter_bundle(ctx: &CheckCtx<'_>, body: &[u8]) -> Result<Checked, ForwardError> {
    let top: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| UpstreamError::BadResponse("bundle"))?;
    let entries: Vec<Box<RawValue>> = match top.get("entry") {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| UpstreamError::BadResponse("bundle.entry"))?,
        None => Vec::new(),
    };
    // First pass: decide each entry on its own. Non-patient data that a patient token
    // may only see next to its own records waits for the second pass.
    let mut decisions: Vec<(&RawValue, Decision, EntryKind)> = Vec::with_capacity(entries.len());
    let mut referenced: HashSet<String> = HashSet::new();
    // Only a `patient/` context (which needs a `patient` claim) releases records
    // `IfReferenced`; without one the references of kept records are never consulted.
    let wants_references = ctx.records.token.patient.is_some();
    for raw in &entries {
        let entry: EntryView = serde_json::from_str(raw.get())
            .map_err(|_| UpstreamError::BadResponse("bundle.entry"))?;
        let mode = entry.search.as_ref().and_then(|s| s.mode.as_deref());
        let kind = match mode {
            Some("include") => EntryKind::Include,
            Some("outcome") => EntryKind::Outcome,
            _ => EntryKind::Match,
        };
        let decision = match &entry.resource {
            // History entries of deletions carry no resource: only for unrestricted
            // tokens, since their request URL names the record.
            None if ctx.records.permit.is_unrestricted() => Decision::Keep,
            None => Decision::Drop,
            Some(resource) => {
                match resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .and_then(ResourceType::parse)
                {
                    Some(rt)
                        if rt == ResourceType::OPERATION_OUTCOME && mode == Some("outcome") =>
                    {
                        Decision::Keep
                    }
                    Some(rt) => match ctx.records.release(rt, resource, mode != Some("include")) {
                        Release::Allowed(_) => {
                            if wants_references {
                                collect_references(resource, &ctx.records.bases, &mut referenced);
                            }
                            Decision::Keep
                        }
                        Release::AllowedIfReferenced(_) => {
                            match resource.get("id").and_then(Value::as_str) {
                                Some(id) => Decision::IfReferenced(format!("{rt}/{id}")),
                                None => Decision::Drop,
                            }
                        }
                        Release::DeniedType | Release::DeniedRecord => Decision::Drop,
                    },
                    None => Decision::Drop,
                }
            }
        };
        decisions.push((raw, decision, kind));
    }
    // Second pass: keep waiting entries that a released record references.
    let mut verdicts: Vec<(&RawValue, bool, EntryKind)> = decisions
        .into_iter()
        .map(|(raw, decision, kind)| {
            let keep = match decision {
                Decision::Keep => true,
                Decision::Drop => false,
                Decision::IfReferenced(local) => referenced.contains(&local),
            };
            (raw, keep, kind)
        })
        .collect();
    let dropped_any = verdicts.iter().any(|(_, keep, _)| !keep);
    // Upstream warnings may describe what was dropped: for restricted tokens they go
    // whenever anything else went.
    if dropped_any && !ctx.records.permit.is_unrestricted() {
        for (_, keep, kind) in &mut verdicts {
            if *kind == EntryKind::Outcome {
                *keep = false;
            }
        }
    }
    let mut kept: Vec<&RawValue> = Vec::with_capacity(verdicts.len());
    let (mut dropped, mut kept_records, mut dropped_matches) = (0usize, 0usize, 0usize);
    let mut kept_matches = 0u64;
    for (raw, keep, kind) in verdicts {
        if keep {
            kept.push(raw);
            if kind != EntryKind::Outcome {
                kept_records += 1;
            }
            if kind == EntryKind::Match {
                kept_matches += 1;
            }
        } else {
            dropped += 1;
            if kind == EntryKind::Match {
                dropped_matches += 1;
            }
        }
    }
    let top = rewrite_links(ctx, top)?;
    // One chunk of a search narrowed to a patient list counts only that chunk.
    let segmented = ctx.paging.as_ref().is_some_and(|p| p.segmented());
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    out.push(b'{');
    let mut first = true;
    for (key, value) in &top {
        // `total` counts matches on every page: kept only where it cannot count a
        // hidden record (every match of the type is released, or it equals this page's
        // matches), and never after a dropped match or for one chunk of a list.
        if key == "total" {
            let derivable = ctx.records.releases_every_match(ctx.request.resource_type)
                || value.get().trim().parse::<u64>().ok() == Some(kept_matches);
            if dropped_matches > 0 || segmented || !derivable {
                continue;
            }
        }
        if key == "entry" && kept.is_empty() {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(
            serde_json::to_string(key)
                .map_err(|_| UpstreamError::BadResponse("bundle"))?
                .as_bytes(),
        );
        out.push(b':');
        if key == "entry" {
            out.push(b'[');
            for (i, e) in kept.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(e.get().as_bytes());
            }
            out.push(b']');
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(Checked {
        body: Bytes::from(out),
        dropped,
        kept: kept_records,
        reason: if dropped > 0 {
            "entries_filtered"
        } else {
            "entries_allowed"
        },
    })
}

/// Bundle links: an upstream URL is never handed out. `self` becomes the client's own
/// request (or a cursor for this page), the paging relations become cursor URLs
/// ([`crate::cursor::Pager::link`]), and anything else, including links to anywhere but
/// the tenant's public base, is dropped; with no link left the key goes too.
fn rewrite_links(
    ctx: &CheckCtx<'_>,
    mut top: IndexMap<String, Box<RawValue>>,
) -> Result<IndexMap<String, Box<RawValue>>, ForwardError> {
    let links: Vec<Value> = match top.get("link") {
        Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        None => Vec::new(),
    };
    let mut out: Vec<Value> = Vec::with_capacity(links.len() + 1);
    if let Some(pager) = &ctx.paging {
        for link in &links {
            let relation = link.get("relation").and_then(Value::as_str);
            let url = link.get("url").and_then(Value::as_str);
            let (Some(relation), Some(url)) = (relation, url) else {
                continue;
            };
            let proxied = pager
                .link(relation, url)
                .map_err(|_| Internal("cursor signing failed"))?;
            if let Some(url) = proxied {
                out.push(serde_json::json!({ "relation": relation, "url": url }));
            }
        }
        // The end of one chunk of a patient-list narrowed search: go on with the next.
        let has_next = out
            .iter()
            .any(|l| l.get("relation").and_then(Value::as_str) == Some("next"));
        if !has_next {
            let next = pager
                .next_chunk_link()
                .map_err(|_| Internal("cursor signing failed"))?;
            if let Some(url) = next {
                out.push(serde_json::json!({ "relation": "next", "url": url }));
            }
        }
    }
    if out.is_empty() {
        top.shift_remove("link");
        return Ok(top);
    }
    let value = serde_json::value::to_raw_value(&out)
        .map_err(|_| UpstreamError::BadResponse("bundle.link"))?;
    // Replacing an existing key keeps its position.
    top.insert("link".to_owned(), value);
    Ok(top)
}
