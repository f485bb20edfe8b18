//! Checking an upstream answer against the request's permit.
//!
//! Pure (no I/O): given the answer's status, headers and body, decide what the client
//! may see. The answer is read once, without a DOM ([`crate::fhir::answer`]): each
//! resource is decided on its text ([`crate::fhir::record::TextRecord`]), walking only
//! the members its checks read (type, id, compartment links); a resource is parsed
//! whole only where a scope constraint is evaluated on it. Bundles are filtered entry
//! by entry; kept entries are spliced back as their original bytes, so the proxy never
//! re-serializes clinical content, and upstream URLs are rewritten to the proxy's as
//! the answer is copied out. `Bundle.total` is handed out only where it cannot count
//! a record the client may not see ([`keeps_total`]).

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use std::collections::HashSet;

use serde_json::Value;

use crate::authz::{AuthzError, Release, ReleaseCtx};
use crate::fhir::answer::{self, Answer};
use crate::fhir::record::Record;
use crate::fhir::{FhirRequest, Interaction, ResourceType};

use super::ForwardError;
use crate::pipeline::Internal;
use crate::upstream::{BaseRewrite, UpstreamError};

/// The checked answer body.
#[derive(Debug)]
pub struct Checked {
    pub body: Bytes,
    /// Bundle entries removed.
    pub dropped: usize,
    /// Bundle entries kept.
    pub kept: usize,
    /// Why the answer was released (for the audit record).
    pub reason: &'static str,
}

/// What the check needs to know about the request.
pub struct CheckCtx<'a> {
    pub request: &'a FhirRequest,
    pub records: ReleaseCtx<'a>,
    /// Turns Bundle links into proxy links (`None`: every link is dropped).
    pub paging: Option<crate::cursor::Pager<'a>>,
    /// Upstream URLs to the proxy's, applied to everything handed out.
    pub rewrite: BaseRewrite<'a>,
}

impl CheckCtx<'_> {
    fn release<R: Record + ?Sized>(
        &self,
        rt: ResourceType,
        resource: &R,
        primary: bool,
    ) -> Release {
        self.records.release(rt, resource, primary)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/fhir+json")
                || m.eq_ignore_ascii_case("application/json")
                || m.eq_ignore_ascii_case("application/json+fhir")
        })
        .unwrap_or(false)
}

fn targets_one_record(req: &FhirRequest) -> bool {
    matches!(
        req.interaction,
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance
    ) || (matches!(req.interaction, Interaction::Operation(..)) && req.id.is_some())
}

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
        // Never followed and never passed on: its `Location` could point anywhere, and
        // its body is no answer to check.
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
        let outcome = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| answer::read(text).ok())
            .is_some_and(|a| a.resource_type.as_deref() == Some("OperationOutcome"));
        if is_json(headers) && outcome {
            return Ok(Checked {
                body: ctx.rewrite.bytes(&body)?,
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
    // One pass over the whole answer: validated, each resource projected.
    let text = std::str::from_utf8(&body).map_err(|_| UpstreamError::BadResponse("json"))?;
    let answer = answer::read(text).map_err(|e| match e {
        answer::AnswerError::Json(_) => UpstreamError::BadResponse("json"),
        answer::AnswerError::NotResource => UpstreamError::BadResponse("resourceType"),
    })?;
    let rt = answer
        .resource_type
        .as_deref()
        .and_then(ResourceType::parse)
        .ok_or(UpstreamError::BadResponse("resourceType"))?;
    let denied = || -> ForwardError {
        AuthzError::Hidden {
            status: ctx.records.permit.denied_status,
        }
        .into()
    };
    let released = |reason| -> Result<Checked, ForwardError> {
        Ok(Checked {
            body: ctx.rewrite.bytes(&body)?,
            dropped: 0,
            kept: 0,
            reason,
        })
    };

    if matches!(
        ctx.request.interaction,
        Interaction::Read | Interaction::Vread
    ) {
        let resource = &answer.resource;
        // The answer must be the record asked for; anything else is an upstream fault.
        if !is_asked_record(ctx.request, resource) {
            return Err(UpstreamError::WrongResource.into());
        }
        return match ctx.release(rt, resource, true) {
            Release::Allowed(_) => released("record_allowed"),
            // Non-patient data a patient token may only see next to its own records.
            Release::AllowedIfReferenced(_) | Release::DeniedType | Release::DeniedRecord => {
                Err(denied())
            }
        };
    }

    if rt == ResourceType::OPERATION_OUTCOME {
        return released("upstream_outcome");
    }
    // Every other interaction forwarded (searches of every kind, histories, `$match`,
    // `Patient/[id]/$everything`) answers with a Bundle; a single resource in its place
    // is not what was asked, even one the token could see.
    if rt != ResourceType::BUNDLE {
        return Err(UpstreamError::WrongResource.into());
    }
    // The history of one record holds versions of that record only. (Malformed
    // entries are refused as such by the Bundle check.)
    if ctx.request.interaction == Interaction::HistoryInstance
        && !answer.malformed_entries
        && answer.entries.iter().any(|entry| {
            entry
                .resource
                .as_ref()
                .is_some_and(|r| !is_asked_record(ctx.request, r))
        })
    {
        return Err(UpstreamError::WrongResource.into());
    }
    let checked = filter_bundle(ctx, &answer, text.len())?;
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
    Ok(checked)
}

/// Whether `resource` is the record the request names (its type and id).
fn is_asked_record<R: Record + ?Sized>(request: &FhirRequest, resource: &R) -> bool {
    let same_type = resource
        .resource_type()
        .as_deref()
        .and_then(ResourceType::parse)
        == request.resource_type;
    let same_id = resource.id().as_deref() == request.id.as_ref().map(|i| i.as_str());
    same_type && same_id
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Match,
    Include,
    Outcome,
}

enum Decision {
    /// Keep; `true` if a record was released (its references may release others).
    Keep(bool),
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

fn decide(ctx: &CheckCtx<'_>, entry: &answer::Entry<'_>) -> Decision {
    let mode = entry.mode.as_deref();
    let Some(resource) = &entry.resource else {
        // History entries of deletions carry no resource: only for unrestricted
        // tokens, since their request URL names the record.
        return if ctx.records.permit.is_unrestricted() {
            Decision::Keep(false)
        } else {
            Decision::Drop
        };
    };
    let Some(rt) = resource
        .resource_type()
        .as_deref()
        .and_then(ResourceType::parse)
    else {
        return Decision::Drop;
    };
    if rt == ResourceType::OPERATION_OUTCOME && mode == Some("outcome") {
        return Decision::Keep(false);
    }
    match ctx.release(rt, resource, mode != Some("include")) {
        Release::Allowed(_) => Decision::Keep(true),
        Release::AllowedIfReferenced(_) => match resource.id() {
            Some(id) => Decision::IfReferenced(format!("{rt}/{id}")),
            None => Decision::Drop,
        },
        Release::DeniedType | Release::DeniedRecord => Decision::Drop,
    }
}

fn filter_bundle(
    ctx: &CheckCtx<'_>,
    answer: &Answer<'_>,
    size: usize,
) -> Result<Checked, ForwardError> {
    if answer.malformed_entries {
        return Err(UpstreamError::BadResponse("bundle.entry").into());
    }
    // First pass: decide each entry on its own. Non-patient data that a patient token
    // may only see next to its own records waits for the second pass.
    let decisions: Vec<(Decision, EntryKind)> = answer
        .entries
        .iter()
        .map(|entry| {
            let kind = match entry.mode.as_deref() {
                Some("include") => EntryKind::Include,
                Some("outcome") => EntryKind::Outcome,
                _ => EntryKind::Match,
            };
            (decide(ctx, entry), kind)
        })
        .collect();
    // Second pass, only if something waits: the references of every released record
    // (read from its text; such answers are rare: `_include`d non-patient data for a
    // `patient/` token).
    let mut referenced: HashSet<String> = HashSet::new();
    if decisions
        .iter()
        .any(|(d, _)| matches!(d, Decision::IfReferenced(_)))
    {
        for (entry, (decision, _)) in answer.entries.iter().zip(&decisions) {
            if let (Decision::Keep(true), Some(raw)) = (decision, entry.resource_raw) {
                let resource: Value = serde_json::from_str(raw)
                    .map_err(|_| UpstreamError::BadResponse("bundle.entry"))?;
                collect_references(&resource, &ctx.records.bases, &mut referenced);
            }
        }
    }
    let mut verdicts: Vec<(bool, EntryKind)> = decisions
        .into_iter()
        .map(|(decision, kind)| {
            let keep = match decision {
                Decision::Keep(_) => true,
                Decision::Drop => false,
                Decision::IfReferenced(local) => referenced.contains(&local),
            };
            (keep, kind)
        })
        .collect();
    let dropped_any = verdicts.iter().any(|(keep, _)| !keep);
    // Upstream warnings may describe what was dropped: for restricted tokens they go
    // whenever anything else went.
    if dropped_any && !ctx.records.permit.is_unrestricted() {
        for (keep, kind) in &mut verdicts {
            if *kind == EntryKind::Outcome {
                *keep = false;
            }
        }
    }
    let (mut dropped, mut kept_records, mut dropped_matches) = (0usize, 0usize, 0usize);
    let mut kept_matches = 0usize;
    for (keep, kind) in &verdicts {
        if *keep {
            if *kind != EntryKind::Outcome {
                kept_records += 1;
            }
            if *kind == EntryKind::Match {
                kept_matches += 1;
            }
        } else {
            dropped += 1;
            if *kind == EntryKind::Match {
                dropped_matches += 1;
            }
        }
    }
    let any_kept = verdicts.iter().any(|(keep, _)| *keep);
    let links = proxy_links(ctx, answer.member("link").map(|m| m.value))?;
    // One chunk of a search narrowed to a patient list counts only that chunk.
    let segmented = ctx.paging.as_ref().is_some_and(|p| p.segmented());
    let keep_total = keeps_total(ctx, answer, dropped_matches, kept_matches, segmented);
    let mut out: Vec<u8> = Vec::with_capacity(size + 256);
    out.push(b'{');
    let mut first = true;
    let mut separate = |out: &mut Vec<u8>| {
        if !std::mem::replace(&mut first, false) {
            out.push(b',');
        }
    };
    for member in &answer.members {
        let key = member.key.as_ref();
        if key == "total" && !keep_total {
            continue;
        }
        if (key == "entry" && !any_kept) || (key == "link" && links.is_none()) {
            continue;
        }
        separate(&mut out);
        // Keys are handed out too: an upstream URL in one is rewritten like any other.
        ctx.rewrite.append(member.raw_key.as_bytes(), &mut out)?;
        out.push(b':');
        match key {
            "entry" => {
                out.push(b'[');
                let kept = answer
                    .entries
                    .iter()
                    .zip(&verdicts)
                    .filter(|(_, (keep, _))| *keep);
                for (i, (entry, _)) in kept.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    ctx.rewrite.append(entry.raw.as_bytes(), &mut out)?;
                }
                out.push(b']');
            }
            "link" => out.extend_from_slice(links.as_deref().unwrap_or("[]").as_bytes()),
            _ => ctx.rewrite.append(member.value.as_bytes(), &mut out)?,
        }
    }
    // Links where the upstream gave none (the next chunk of a narrowed search) go last.
    if let (None, Some(links)) = (answer.member("link"), &links) {
        separate(&mut out);
        out.extend_from_slice(b"\"link\":");
        out.extend_from_slice(links.as_bytes());
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

/// Whether the Bundle's `total` may be handed out. It counts the upstream's matches on
/// every page, so a page that shows no dropped match proves nothing about the others:
/// a later page may drop one, and a count kept on the first would already have
/// revealed it. `total` is kept only where it cannot count a record the client may
/// not see: when every match of the searched type is released
/// ([`ReleaseCtx::releases_every_match`](crate::authz::ReleaseCtx)), or when it equals
/// the matches this page shows (a one-page answer). Never after a dropped match, and
/// never for one chunk of a search narrowed to a patient list. `total` counts matches
/// only, so included records dropped or kept do not change it.
fn keeps_total(
    ctx: &CheckCtx<'_>,
    answer: &Answer<'_>,
    dropped_matches: usize,
    kept_matches: usize,
    segmented: bool,
) -> bool {
    if dropped_matches > 0 || segmented {
        return false;
    }
    if ctx.records.releases_every_match(ctx.request.resource_type) {
        return true;
    }
    answer
        .member("total")
        .and_then(|m| m.value.trim().parse::<u64>().ok())
        .is_some_and(|total| usize::try_from(total).is_ok_and(|t| t == kept_matches))
}

/// Bundle links: an upstream URL is never handed out. `self` becomes the client's own
/// request (or a cursor for this page), the paging relations become cursor URLs
/// ([`crate::cursor::Pager::link`]), and anything else, including links to anywhere but
/// the tenant's public base, is dropped; with no link left the key goes too.
/// `link` is the upstream's `link` member text; the answer is the new member's JSON
/// text, `None` for no link at all.
fn proxy_links(ctx: &CheckCtx<'_>, link: Option<&str>) -> Result<Option<String>, ForwardError> {
    let links: Vec<Value> = link
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let mut out: Vec<Value> = Vec::with_capacity(links.len() + 1);
    if let Some(pager) = &ctx.paging {
        for link in &links {
            let relation = link.get("relation").and_then(Value::as_str);
            let url = link.get("url").and_then(Value::as_str);
            let (Some(relation), Some(url)) = (relation, url) else {
                continue;
            };
            let proxied = pager
                .link(relation, &ctx.rewrite.url(url))
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
        return Ok(None);
    }
    serde_json::to_string(&out)
        .map(Some)
        .map_err(|_| UpstreamError::BadResponse("bundle.link").into())
}

#[cfg(test)]
mod tests;

// The reference check: the differential tests and the fuzz targets compare with it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod value_path;
