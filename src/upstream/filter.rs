//! Checking an upstream answer against the request's permit.
//!
//! Pure (no I/O): given the answer's status, headers and (URL-rewritten) body, decide
//! what the client may see. Bundles are filtered entry by entry; kept entries are
//! spliced back as their original bytes (`RawValue`), so the proxy never re-serializes
//! clinical content. A Bundle that lost entries loses its `total` too, so counts never
//! reveal dropped records.

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::authz::{AuthzError, Release, ReleaseCtx};
use crate::error::ProxyError;
use crate::fhir::{FhirRequest, Interaction, ResourceType};

use super::UpstreamError;

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
}

impl CheckCtx<'_> {
    fn release(&self, rt: ResourceType, resource: &Value, primary: bool) -> Release {
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
) -> Result<Checked, ProxyError> {
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
    if !status.is_success() {
        // For a single record, "missing" and "gone" look exactly like "denied".
        if targets_one_record(ctx.request)
            && (status == StatusCode::NOT_FOUND || status == StatusCode::GONE)
        {
            return Err(UpstreamError::NotFound.into());
        }
        if is_json(headers) && resource_type_of(&body) == Some("OperationOutcome") {
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
    let resource: Value =
        serde_json::from_slice(&body).map_err(|_| UpstreamError::BadResponse("json"))?;
    let rt_name = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or(UpstreamError::BadResponse("resourceType"))?;
    let rt = ResourceType::parse(rt_name).ok_or(UpstreamError::BadResponse("resourceType"))?;
    let denied = || -> ProxyError {
        AuthzError::Hidden {
            status: ctx.records.permit.denied_status,
        }
        .into()
    };

    if matches!(
        ctx.request.interaction,
        Interaction::Read | Interaction::Vread
    ) {
        // The answer must be the record asked for; anything else is an upstream fault.
        let same_type = Some(rt) == ctx.request.resource_type;
        let same_id = resource.get("id").and_then(Value::as_str)
            == ctx.request.id.as_ref().map(|i| i.as_str());
        if !same_type || !same_id {
            return Err(UpstreamError::BadResponse("read answered another record").into());
        }
        return match ctx.release(rt, &resource, true) {
            Release::Allowed(_) => Ok(Checked {
                body,
                dropped: 0,
                kept: 0,
                reason: "record_allowed",
            }),
            Release::DeniedType | Release::DeniedRecord => Err(denied()),
        };
    }
    drop(resource);

    if rt == ResourceType::BUNDLE {
        let checked = filter_bundle(ctx, &body)?;
        // The history of a record the token may not see must look like a missing
        // record, not like an empty history.
        if ctx.request.interaction == Interaction::HistoryInstance
            && checked.dropped > 0
            && checked.kept == 0
        {
            return Err(denied());
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
    // An operation that answered with a single resource: it must be releasable on its
    // own.
    let resource: Value =
        serde_json::from_slice(&body).map_err(|_| UpstreamError::BadResponse("json"))?;
    match ctx.release(rt, &resource, false) {
        Release::Allowed(_) => Ok(Checked {
            body,
            dropped: 0,
            kept: 0,
            reason: "record_allowed",
        }),
        _ => Err(denied()),
    }
}

fn resource_type_of(body: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<&'a str>,
    }
    serde_json::from_slice::<Head<'_>>(body).ok()?.resource_type
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

fn filter_bundle(ctx: &CheckCtx<'_>, body: &[u8]) -> Result<Checked, ProxyError> {
    let top: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| UpstreamError::BadResponse("bundle"))?;
    let entries: Vec<Box<RawValue>> = match top.get("entry") {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| UpstreamError::BadResponse("bundle.entry"))?,
        None => Vec::new(),
    };
    let mut kept: Vec<&RawValue> = Vec::with_capacity(entries.len());
    let mut dropped = 0usize;
    for raw in &entries {
        let entry: EntryView = serde_json::from_str(raw.get())
            .map_err(|_| UpstreamError::BadResponse("bundle.entry"))?;
        let keep = match &entry.resource {
            // History entries of deletions carry no resource: only for unrestricted
            // tokens, since their request URL names the record.
            None => ctx.records.permit.is_unrestricted(),
            Some(resource) => {
                let mode = entry.search.as_ref().and_then(|s| s.mode.as_deref());
                match resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .and_then(ResourceType::parse)
                {
                    Some(rt)
                        if rt == ResourceType::OPERATION_OUTCOME && mode == Some("outcome") =>
                    {
                        true
                    }
                    Some(rt) => matches!(
                        ctx.release(rt, resource, mode != Some("include")),
                        Release::Allowed(_)
                    ),
                    None => false,
                }
            }
        };
        if keep {
            kept.push(raw);
        } else {
            dropped += 1;
        }
    }
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    out.push(b'{');
    let mut first = true;
    for (key, value) in &top {
        if key == "total" && dropped > 0 {
            continue;
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
        kept: kept.len(),
        reason: if dropped > 0 {
            "entries_filtered"
        } else {
            "entries_allowed"
        },
    })
}

#[cfg(test)]
mod tests;
