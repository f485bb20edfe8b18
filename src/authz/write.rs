//! Stage 3, writes: the record checks of create, update, patch and delete
//! ([`CheckWrite`], right after `Authorize`, before the rewrite stage).
//!
//! Input: `TenantCtx`, the tenant's `Checker`, `FhirRequest`, `VerifiedToken`,
//! `ScopeGrant` (a `c`, `u` or `d` scope permitted the interaction), `Permit`, and the
//! request's body and headers. Output: a [`WritePlan`] (the version the forwarded write
//! is pinned to, the patients written, the read authority for the answer), read by
//! stage 4 (which builds the forwarded write and narrows conditional criteria) and
//! stage 5 (which decides whether the answer's body may be shown).
//!
//! Guarantees:
//! - the body is what the path says: JSON (never XML, which the proxy cannot check),
//!   of the path's type, with the path's id for an update; no object in it has a
//!   member twice (the proxy and the upstream could read such a body differently);
//! - the new content lies within the reach of a permitting context ([`WriteCtx`]): a
//!   `patient/` context only in the token patient's compartment and in no other
//!   patient's, a `user/` context in its user's compartment, `system/` anywhere,
//!   OpenFGA principals only where OpenFGA says `can_write` for every patient the
//!   content is in; a record in no compartment only where the context reaches the
//!   whole type (as for reads). References the upstream would resolve by search
//!   (`Patient?identifier=...`) are refused for restricted tokens;
//! - for update, patch and delete the current version is read from the upstream first
//!   and must pass the same check (what the token cannot reach it cannot touch; a
//!   refusal looks like a read of a hidden record); the forwarded write is pinned to
//!   that version with `If-Match`, so nothing the check did not see can be
//!   overwritten. An update of a missing id is checked as a create;
//! - a JSON Patch is applied here ([`crate::fhir::patch`]) to the current version and
//!   the result checked as an update's body; a FHIRPath Patch may not touch the
//!   elements that decide compartment membership (nor `id`) unless the context reaches
//!   every record of the type.
//!
//! Write never implies read: [`ReadBack`] is the authority of a `read` of the type by
//! the same token, if it has one; stage 5 shows the upstream's answer body only if the
//! record passes it.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use serde_json::Value;

use super::fga::FgaDecisions;
use super::{AuthzError, Checker, Permit, Reach, TypeReach, authorize_as};
use crate::config::MultiPatientPolicy;
use crate::fhir::record::Record;
use crate::fhir::{
    CompartmentIndex, FhirRequest, Interaction, OutboundRequest, ResourceId, ResourceType,
};
use crate::pipeline::{FHIR_JSON, Flow, Internal, Stage, ext};
use crate::scope::{ScopeGrant, TokenContext, check_scopes};
use crate::smart::{ContextSet, ScopeContext};
use crate::tenant::tenant_of;
use crate::token::VerifiedToken;
use crate::upstream::{FhirServer, Upstream, UpstreamError};

/// The OpenFGA relation a principal needs on `patient:<id>` to write that patient's
/// records.
pub const WRITE_RELATION: &str = "can_write";

/// The media type of a JSON Patch body.
pub const JSON_PATCH: &str = "application/json-patch+json";

/// Whether the interaction is a single write this stage checks.
pub fn is_write(interaction: &Interaction) -> bool {
    matches!(
        interaction,
        Interaction::Create | Interaction::Update | Interaction::Patch | Interaction::Delete
    )
}

/// How the client asked a write to be answered (`Prefer: return=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnPref {
    /// No preference: the upstream's default (HAPI: the resource).
    Default,
    Minimal,
    Representation,
    OperationOutcome,
}

impl ReturnPref {
    /// The `return` preference among the request's `Prefer` headers (RFC 7240;
    /// preferences separated by `,`, parameters by `;`). Other preferences are not
    /// passed on (`handling=lenient` would let the upstream ignore criteria).
    pub fn of(headers: &HeaderMap) -> ReturnPref {
        let mut pref = ReturnPref::Default;
        for v in headers.get_all("prefer") {
            let Ok(text) = v.to_str() else { continue };
            for item in text.split([',', ';']) {
                let item = item.trim();
                let Some(value) = item.strip_prefix("return=") else {
                    continue;
                };
                pref = match value.trim_matches('"') {
                    "minimal" => ReturnPref::Minimal,
                    "representation" => ReturnPref::Representation,
                    "OperationOutcome" => ReturnPref::OperationOutcome,
                    _ => pref,
                };
            }
        }
        pref
    }

    /// The `return=` token to send (`None`: none).
    pub fn token(self) -> Option<&'static str> {
        match self {
            ReturnPref::Default => None,
            ReturnPref::Minimal => Some("return=minimal"),
            ReturnPref::Representation => Some("return=representation"),
            ReturnPref::OperationOutcome => Some("return=OperationOutcome"),
        }
    }
}

/// A write's body, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteBody {
    /// Delete: no body is used.
    None,
    /// Create and update: the resource.
    Resource(Value),
    /// `PATCH` with `application/json-patch+json`: the array of operations.
    JsonPatch(Value),
    /// `PATCH` with a FHIR `Parameters` resource (FHIRPath Patch).
    FhirPathPatch(Value),
}

/// The read authority of the token for the written type: what a `read` of it would
/// have been granted (stage 5 releases an answer body only under it).
#[derive(Clone, Debug)]
pub struct ReadBack {
    pub grant: ScopeGrant,
    pub permit: Permit,
}

/// What the write check proved; a request extension written by [`CheckWrite`], read by
/// stage 4 (the forwarded write) and stage 5 (the answer).
#[derive(Clone, Debug)]
pub struct WritePlan {
    /// The `If-Match` the forwarded write carries: the client's when it names the
    /// checked version (or an older one, which the upstream refuses with 412), else
    /// the checked version (`W/"<versionId>"`). `None` when no current version was read.
    pub if_match: Option<HeaderValue>,
    /// The media type the body is forwarded with (`None`: no body).
    pub content_type: Option<&'static str>,
    /// The body to forward (the client's bytes, unchanged).
    pub body: Option<Bytes>,
    /// `Type/id` of the record written, when the path names it.
    pub target: Option<String>,
    /// Whether the current version existed (update, patch, delete by id).
    pub existed: bool,
    /// The patients whose compartments the new content and the current version are in.
    pub patients: Vec<String>,
    /// The context whose reach allowed the write.
    pub context: ScopeContext,
    /// The token's read authority for the type, if any.
    pub read_back: Option<ReadBack>,
    pub prefer: ReturnPref,
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn media_type(content_type: Option<&str>) -> String {
    content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_fhir_json(media: &str) -> bool {
    matches!(
        media,
        "application/fhir+json" | "application/json" | "application/json+fhir"
    )
}

/// Parses the body of a write (pure). Create and update need a FHIR JSON resource of
/// the path's type (an update by id: with the path's id); patch a JSON Patch array or a
/// `Parameters` resource; delete uses no body. Returns the body and the media type it
/// is forwarded with.
pub fn parse_body(
    req: &FhirRequest,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(WriteBody, Option<&'static str>), AuthzError> {
    let rt = req.resource_type.ok_or(AuthzError::WriteBody {
        detail: "no resource type",
    })?;
    let media = media_type(content_type);
    match req.interaction {
        Interaction::Delete => Ok((WriteBody::None, None)),
        Interaction::Create | Interaction::Update => {
            if !is_fhir_json(&media) {
                return Err(AuthzError::WriteMediaType);
            }
            let v = parse_json(body)?;
            if v.resource_type().as_deref() != Some(rt.as_str()) {
                return Err(AuthzError::WriteBody {
                    detail: "the body's resourceType is not the path's",
                });
            }
            if req.interaction == Interaction::Update
                && let Some(id) = &req.id
                && v.id().as_deref() != Some(id.as_str())
            {
                return Err(AuthzError::WriteBody {
                    detail: "the body's id is not the path's",
                });
            }
            // A conditional update names its record by criteria; an id in the body
            // would name one too, which an upstream may create or overwrite when the
            // criteria match nothing, unchecked.
            if req.interaction == Interaction::Update && req.id.is_none() && v.id().is_some() {
                return Err(AuthzError::WriteBody {
                    detail: "a conditional update's body has no id",
                });
            }
            Ok((WriteBody::Resource(v), Some(FHIR_JSON)))
        }
        Interaction::Patch => {
            if media == JSON_PATCH {
                let v = parse_json(body)?;
                if !v.is_array() {
                    return Err(AuthzError::WriteBody {
                        detail: "a json patch is an array of operations",
                    });
                }
                Ok((WriteBody::JsonPatch(v), Some(JSON_PATCH)))
            } else if is_fhir_json(&media) {
                let v = parse_json(body)?;
                if v.resource_type().as_deref() != Some("Parameters") {
                    return Err(AuthzError::WriteBody {
                        detail: "a fhirpath patch is a Parameters resource",
                    });
                }
                Ok((WriteBody::FhirPathPatch(v), Some(FHIR_JSON)))
            } else {
                Err(AuthzError::WriteMediaType)
            }
        }
        _ => Err(AuthzError::WriteBody {
            detail: "not a write",
        }),
    }
}

/// JSON text as a `Value`, refused if any object in it has a member twice: the proxy
/// reads the last one, another parser may read the first, and the check would then
/// not be about what is stored.
pub fn parse_json(body: &[u8]) -> Result<Value, AuthzError> {
    let invalid = AuthzError::WriteBody {
        detail: "the body is not JSON, or an object in it has a member twice",
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::de::Deserialize::deserialize(&mut de)
        .map(|UniqueKeys| ())
        .map_err(|_| invalid.clone())?;
    de.end().map_err(|_| invalid.clone())?;
    serde_json::from_slice(body).map_err(|_| invalid)
}

/// Deserializes any JSON, failing on a duplicate object member (or serde_json's
/// private raw-value key, which would make `Value` read the object as something else).
struct UniqueKeys;

impl<'de> serde::de::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if key.starts_with("$serde_json") || !seen.insert(key) {
                return Err(serde::de::Error::custom("duplicate member"));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// Refuses a reference the upstream would resolve by searching
/// (`Patient?identifier=...`): the proxy cannot tell which record it names.
pub fn refuse_conditional_references(v: &Value) -> Result<(), AuthzError> {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                if let ("reference", Value::String(r)) = (k.as_str(), v)
                    && r.contains('?')
                {
                    return Err(AuthzError::ConditionalReference);
                }
                refuse_conditional_references(v)?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(refuse_conditional_references),
        _ => Ok(()),
    }
}

/// Refuses a reference the record checks cannot read, which would otherwise count as
/// naming no record at all: only local references (`Type/id`, with a version, or
/// absolute under one of `bases`), contained ones (`#id`) and absolute URLs of other
/// servers pass. `Patient/p2/`, ` Patient/p2`, `patient/p2` or a URN could be read as
/// `Patient/p2` by an upstream, putting the record in a compartment the check never saw.
pub fn refuse_unreadable_references(v: &Value, bases: &[&str]) -> Result<(), AuthzError> {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                if let ("reference", Value::String(r)) = (k.as_str(), v) {
                    let external = r.contains("://")
                        && !bases
                            .iter()
                            .any(|b| r.get(..b.len()).is_some_and(|p| p.eq_ignore_ascii_case(b)));
                    let readable = crate::fhir::parse_local_reference(r, bases).is_some()
                        || (r.starts_with('#') && r.len() > 1)
                        || external;
                    if !readable {
                        return Err(AuthzError::WriteBody {
                            detail: "a reference is neither local, contained nor of another server",
                        });
                    }
                }
                refuse_unreadable_references(v, bases)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .try_for_each(|v| refuse_unreadable_references(v, bases)),
        _ => Ok(()),
    }
}

/// What the write check of one record needs. Pure: OpenFGA's `can_write` decisions
/// are gathered beforehand ([`fga_write_decisions`]).
pub struct WriteCtx<'a> {
    pub permit: &'a Permit,
    pub index: &'a CompartmentIndex,
    /// Absolute bases whose references count as local (public and upstream).
    pub bases: [&'a str; 2],
    /// `can_write` on the patients of the checked records, per OpenFGA principal
    /// (`openfga` tenants; `None` elsewhere, and then `Reach::Fga` writes nothing).
    pub fga: Option<&'a FgaDecisions>,
}

impl WriteCtx<'_> {
    /// The permitting contexts whose reach allows `resource` (of type `rt`) to be
    /// written (as new content, or as the current version that is changed).
    pub fn reaching<R: Record + ?Sized>(&self, rt: ResourceType, resource: &R) -> ContextSet {
        self.permit
            .reaches
            .iter()
            .filter(|(context, reach)| self.reaches(*context, reach, rt, resource))
            .map(|(context, _)| *context)
            .collect()
    }

    fn reaches<R: Record + ?Sized>(
        &self,
        context: ScopeContext,
        reach: &Reach,
        rt: ResourceType,
        resource: &R,
    ) -> bool {
        if resource.resource_type().as_deref() != Some(rt.as_str()) {
            return false;
        }
        let type_reach = self.permit.type_reach(context, rt, self.index);
        match reach {
            Reach::All => true,
            Reach::Nothing => false,
            Reach::Compartment(c) => match type_reach {
                TypeReach::Whole => true,
                TypeReach::IfReferenced => false,
                TypeReach::Compartment => {
                    // In the context's compartment, and (patient data belongs to its
                    // patients) in no other patient's.
                    self.index.contains(c, rt, resource, &self.bases)
                        && (c.owner != ResourceType::PATIENT
                            || self
                                .index
                                .owners(ResourceType::PATIENT, rt, resource, &self.bases)
                                .iter()
                                .all(|id| id == c.id.as_str()))
                }
            },
            Reach::Fga(principal) => match type_reach {
                TypeReach::Whole => true,
                TypeReach::Compartment | TypeReach::IfReferenced => {
                    let patients =
                        self.index
                            .owners(ResourceType::PATIENT, rt, resource, &self.bases);
                    // `FgaDecisions::allows` under `AllOf`: every patient writable, and
                    // at least one.
                    self.fga.is_some_and(|d| d.allows(principal, &patients))
                }
            },
        }
    }

    /// Checks a record's new content (create and update bodies, a patched result)
    /// against the permit, without I/O: the contexts that may write it, or
    /// [`AuthzError::WriteOutsideReach`]. Restricted tokens may not use conditional
    /// references in it.
    pub fn check_content(
        &self,
        rt: ResourceType,
        resource: &Value,
    ) -> Result<ContextSet, AuthzError> {
        if !self.permit.is_unrestricted() {
            refuse_conditional_references(resource)?;
            refuse_unreadable_references(resource, &self.bases)?;
        }
        let contexts = self.reaching(rt, resource);
        if contexts.is_empty() {
            return Err(AuthzError::WriteOutsideReach { resource_type: rt });
        }
        Ok(contexts)
    }
}

/// The pure write decision: the new content (if any) and the current version (if any)
/// must both be within the reach of one permitting context. A current version out of
/// reach is hidden (the tenant's denied status, as a read of it would be); new content
/// out of reach is [`AuthzError::WriteOutsideReach`].
pub fn decide(
    ctx: &WriteCtx<'_>,
    rt: ResourceType,
    new: Option<&Value>,
    current: Option<&Value>,
) -> Result<ScopeContext, AuthzError> {
    let all: ContextSet = ctx.permit.reaches.iter().map(|(c, _)| *c).collect();
    let current_ok = match current {
        Some(cur) => {
            let set = ctx.reaching(rt, cur);
            if set.is_empty() {
                return Err(AuthzError::Hidden {
                    status: ctx.permit.denied_status,
                });
            }
            set
        }
        None => all,
    };
    let new_ok = match new {
        Some(v) => ctx.check_content(rt, v)?,
        None => all,
    };
    current_ok
        .iter()
        .find(|c| new_ok.contains(*c))
        .ok_or(AuthzError::WriteOutsideReach { resource_type: rt })
}

/// The patients whose compartments `resource` is in (sorted, distinct).
pub fn patients_of<R: Record + ?Sized>(
    index: &CompartmentIndex,
    rt: ResourceType,
    resource: &R,
    bases: &[&str],
) -> Vec<String> {
    let mut out = index.owners(ResourceType::PATIENT, rt, resource, bases);
    out.sort_unstable();
    out.dedup();
    out
}

/// The top-level elements a FHIRPath Patch (`Parameters`) changes on a resource of type
/// `rt`, or an error for an operation whose target cannot be told from its path alone
/// (a function, an expression not rooted at the type).
pub fn fhirpath_patch_elements(rt: ResourceType, patch: &Value) -> Result<Vec<String>, AuthzError> {
    let refuse = |detail| AuthzError::WriteBody { detail };
    let ops = patch
        .get("parameter")
        .and_then(Value::as_array)
        .ok_or(refuse("a fhirpath patch has parameters"))?;
    let mut out = Vec::new();
    for op in ops {
        if op.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(refuse("a fhirpath patch parameter is an operation"));
        }
        let part = |name: &str| {
            op.get("part")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        };
        let text = |name: &str| {
            part(name).and_then(|p| {
                ["valueString", "valueCode"]
                    .iter()
                    .find_map(|k| p.get(*k).and_then(Value::as_str))
            })
        };
        // One of each part: a repeated `path`, `name` or `type`, or several values,
        // could be read one way here and another way by the upstream.
        let parts = op.get("part").and_then(Value::as_array);
        let count = |pred: &dyn Fn(&str) -> bool| {
            parts
                .into_iter()
                .flatten()
                .filter(|p| p.get("name").and_then(Value::as_str).is_some_and(pred))
                .count()
        };
        if ["path", "name", "type", "index", "source", "destination"]
            .iter()
            .any(|n| count(&|x| x == *n) > 1)
            || count(&|x| x == "value") > 1
            || parts.into_iter().flatten().any(|p| {
                p.as_object().is_some_and(|o| {
                    o.keys()
                        .filter(|k| k.starts_with("value") || *k == "part" || *k == "resource")
                        .count()
                        > 1
                })
            })
        {
            return Err(AuthzError::PatchNotCheckable);
        }
        let path = text("path").ok_or(refuse("a fhirpath patch operation has a path"))?;
        let element = match path.strip_prefix(rt.as_str()) {
            // On the resource itself: `add` names the element.
            Some("") => text("name").ok_or(refuse(
                "a fhirpath patch operation on the resource names an element",
            ))?,
            Some(rest) => {
                let rest = rest
                    .strip_prefix('.')
                    .ok_or(refuse("a fhirpath patch path starts at the resource type"))?;
                // Only a plain path: `name(.name([n])?)*`. Anything else (a function,
                // a union, `where`, `select`, an expression) may reach other elements
                // than its first name says.
                if !is_plain_path(rest) {
                    return Err(AuthzError::PatchNotCheckable);
                }
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            }
            None => return Err(AuthzError::PatchNotCheckable),
        };
        if !element
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || element.is_empty()
        {
            return Err(AuthzError::PatchNotCheckable);
        }
        out.push(element.to_owned());
    }
    Ok(out)
}

/// Whether `path` (after `Type.`) is `name([n])?(.name([n])?)*`: element names and
/// list indexes only.
fn is_plain_path(path: &str) -> bool {
    path.split('.').all(|seg| {
        let name = match seg.split_once('[') {
            Some((n, rest)) => match rest.strip_suffix(']') {
                Some(i) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return false,
            },
            None => seg,
        };
        !name.is_empty()
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// Refuses a FHIRPath Patch that changes what decides a record's compartments (the
/// elements linking `rt` into the compartments the permit reaches through, and the
/// Patient compartment's) or its `id`, unless some context reaches every record of the
/// type. Then the patched record is in the same compartments as the current version,
/// whose check stands for it.
pub fn check_fhirpath_patch(
    permit: &Permit,
    index: &CompartmentIndex,
    rt: ResourceType,
    patch: &Value,
) -> Result<(), AuthzError> {
    let elements = fhirpath_patch_elements(rt, patch)?;
    if permit.reaches_whole_type(rt, index) {
        return Ok(());
    }
    let mut guarded: Vec<&str> = index.link_roots(ResourceType::PATIENT, rt);
    for owner in permit.owner_types() {
        guarded.extend(index.link_roots(owner, rt));
    }
    guarded.extend(["id", "resourceType", "contained"]);
    match elements.iter().find(|e| guarded.contains(&e.as_str())) {
        Some(e) => Err(AuthzError::PatchCompartmentElement { element: e.clone() }),
        None => Ok(()),
    }
}

/// Applies a JSON Patch to the current version and returns the result to check: it
/// must still be the same record (type and id).
pub fn apply_json_patch(
    rt: ResourceType,
    id: &ResourceId,
    current: &Value,
    patch: &Value,
) -> Result<Value, AuthzError> {
    let out =
        crate::fhir::patch::apply(current, patch).map_err(|e| AuthzError::PatchNotApplicable {
            detail: e.to_string(),
        })?;
    if out.resource_type().as_deref() != Some(rt.as_str())
        || out.id().as_deref() != Some(id.as_str())
    {
        return Err(AuthzError::WriteBody {
            detail: "a patch may not change the resource's type or id",
        });
    }
    Ok(out)
}

/// The version id of a record (`meta.versionId`).
fn version_of(v: &Value) -> Option<&str> {
    v.get("meta")?.get("versionId")?.as_str()
}

/// The version an `If-Match` names (`W/"3"`, `"3"`), if it is one.
fn if_match_version(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')?.strip_suffix('"')
}

/// The `If-Match` of the forwarded write (pure): the checked version when the client
/// sent none; the client's when it names the checked version or an older one (the
/// upstream answers that with its 412); refused with 412 when it names a version the
/// check did not see (a later one, or one that is not a number), which could be the
/// version of a record changed after the check.
pub fn pin_version(
    client: Option<&HeaderValue>,
    checked: Option<&str>,
) -> Result<Option<HeaderValue>, AuthzError> {
    let Some(checked) = checked else {
        return Ok(client.cloned());
    };
    let Some(client) = client else {
        return HeaderValue::from_str(&format!("W/\"{checked}\""))
            .map(Some)
            .map_err(|_| AuthzError::VersionUnchecked);
    };
    let asked = if_match_version(client).ok_or(AuthzError::VersionUnchecked)?;
    let older = match (asked.parse::<u64>(), checked.parse::<u64>()) {
        (Ok(a), Ok(c)) => a <= c,
        _ => asked == checked,
    };
    if older {
        Ok(Some(client.clone()))
    } else {
        Err(AuthzError::VersionUnchecked)
    }
}

/// The token's read authority for records of type `rt`: what a `read` of one would
/// have been granted (scope `r` on the type, and the permit of that read). `None` if
/// the token may not read the type.
pub fn read_back(
    checker: &Checker,
    rt: ResourceType,
    token: &VerifiedToken,
    permit: &Permit,
) -> Option<ReadBack> {
    let read = FhirRequest {
        method: Method::GET,
        interaction: Interaction::Read,
        resource_type: Some(rt),
        id: None,
        version: None,
        compartment: None,
        params: Vec::new(),
    };
    let grant = check_scopes(
        &token.scopes,
        &read,
        TokenContext {
            has_patient: token.patient.is_some(),
        },
    )
    .ok()?;
    let permit = authorize_as(checker, &read, token, &grant, permit.user.clone()).ok()?;
    Some(ReadBack { grant, permit })
}

/// OpenFGA's `can_write` decisions on `patients`, for every OpenFGA principal of the
/// permit (BatchCheck; all or nothing). The decisions count under `AllOf`: a record is
/// writable only if every patient it is in is.
pub async fn fga_write_decisions(
    fga: &super::fga::OpenFgaChecker,
    permit: &Permit,
    patients: &[String],
) -> Result<FgaDecisions, AuthzError> {
    let mut by_principal = Vec::new();
    for principal in permit.fga_principals() {
        let allowed = fga
            .patients_with(principal, WRITE_RELATION, patients)
            .await?;
        by_principal.push((Arc::clone(principal), allowed));
    }
    Ok(FgaDecisions {
        policy: MultiPatientPolicy::AllOf,
        by_principal,
    })
}

/// What the write stage fails with.
#[derive(Debug, thiserror::Error)]
pub enum CheckWriteError {
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// The stage (a pass-through for everything but single writes).
pub struct CheckWrite<U = Upstream> {
    upstream: U,
}

impl<U: FhirServer> CheckWrite<U> {
    pub fn new(upstream: U) -> Self {
        CheckWrite { upstream }
    }

    /// The current version of `rt/id` on the upstream (`None`: missing or deleted).
    async fn current(
        &self,
        tenant: &crate::tenant::Tenant,
        rt: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<Value>, UpstreamError> {
        let out = OutboundRequest {
            method: Method::GET,
            path: format!("/{rt}/{id}"),
            params: Vec::new(),
            body: None,
            conditional: false,
            narrowing: None,
            headers: Vec::new(),
        };
        let fetched = self.upstream.fetch(tenant, &out, &HeaderMap::new()).await?;
        if fetched.status == StatusCode::NOT_FOUND || fetched.status == StatusCode::GONE {
            return Ok(None);
        }
        if !fetched.status.is_success() {
            return Err(UpstreamError::Status(fetched.status));
        }
        let v: Value = serde_json::from_slice(&fetched.body)
            .map_err(|_| UpstreamError::BadResponse("json"))?;
        if v.resource_type().as_deref() != Some(rt.as_str())
            || v.id().as_deref() != Some(id.as_str())
        {
            return Err(UpstreamError::WrongResource);
        }
        Ok(Some(v))
    }
}

impl<U: FhirServer> Stage for CheckWrite<U> {
    type Error = CheckWriteError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, CheckWriteError> {
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        if !is_write(&fhir.interaction) {
            return Ok(Flow::Continue);
        }
        let tenant = Arc::clone(&tenant_of(req)?.0);
        let checker = Arc::clone(ext::<Arc<Checker>>(req, "missing Checker")?);
        let token = ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
        let permit = ext::<Permit>(req, "missing Permit")?;
        let rt = fhir
            .resource_type
            .ok_or(Internal("write without a resource type"))?;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (body, media) = parse_body(fhir, content_type, req.body())?;
        let cfg = &tenant.config;
        let bases = [cfg.public_base.as_str(), cfg.upstream.base.as_str()];
        let index = checker.index();

        let current = match (&fhir.interaction, &fhir.id) {
            (Interaction::Update | Interaction::Patch | Interaction::Delete, Some(id)) => {
                self.current(&tenant, rt, id).await?
            }
            _ => None,
        };
        if matches!(fhir.interaction, Interaction::Patch | Interaction::Delete)
            && fhir.id.is_some()
            && current.is_none()
        {
            return Err(UpstreamError::NotFound.into());
        }
        // INVARIANT: a restricted token's write of an existing record is pinned to the
        // version that was checked; an upstream that names no version cannot be.
        if !permit.is_unrestricted() && current.as_ref().is_some_and(|c| version_of(c).is_none()) {
            return Err(UpstreamError::BadResponse("meta.versionId").into());
        }
        let new: Option<Value> = match (&body, &current, &fhir.id) {
            // A create's id is the server's to assign: it decides nothing.
            (WriteBody::Resource(v), _, _) if fhir.interaction == Interaction::Create => {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    o.shift_remove("id");
                }
                Some(v)
            }
            (WriteBody::Resource(v), _, _) => Some(v.clone()),
            (WriteBody::JsonPatch(p), Some(cur), Some(id)) => {
                Some(apply_json_patch(rt, id, cur, p)?)
            }
            (WriteBody::FhirPathPatch(p), Some(_), _) => {
                check_fhirpath_patch(permit, index, rt, p)?;
                None
            }
            (WriteBody::None, _, _) => None,
            _ => return Err(Internal("patch without a current version").into()),
        };

        let mut patients = Vec::new();
        for record in [new.as_ref(), current.as_ref()].into_iter().flatten() {
            patients.extend(patients_of(index, rt, record, &bases));
        }
        patients.sort_unstable();
        patients.dedup();
        let decisions = match checker.fga() {
            Some(fga) if permit.has_fga() => {
                Some(fga_write_decisions(fga, permit, &patients).await?)
            }
            _ => None,
        };
        let ctx = WriteCtx {
            permit,
            index,
            bases,
            fga: decisions.as_ref(),
        };
        let context = decide(&ctx, rt, new.as_ref(), current.as_ref())?;
        let if_match = pin_version(
            req.headers().get(header::IF_MATCH),
            current.as_ref().and_then(version_of),
        )?;
        let plan = WritePlan {
            if_match,
            content_type: media,
            body: media.map(|_| req.body().clone()),
            target: fhir.id.as_ref().map(|id| format!("{rt}/{id}")),
            existed: current.is_some(),
            patients,
            context,
            read_back: read_back(&checker, rt, token, permit),
            prefer: ReturnPref::of(req.headers()),
        };
        if let Some(audit) = req.extensions().get::<crate::audit::AuditSlot>() {
            audit.set_patients(&plan.patients);
        }
        req.extensions_mut().insert(plan);
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests;
