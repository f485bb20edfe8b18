//! Paging cursors: the proxy never hands out or accepts upstream URLs.
//!
//! Where a searchset or history Bundle links to another page, stage 5 replaces the link
//! with `{public base}{client request path}?_cursor=<cursor>`. A cursor is an HS256-signed
//! compact token (the key is process-wide: [`CursorKey`]) that binds
//! - the tenant and the principal (a keyed digest of issuer, subject, client id,
//!   `patient` and `fhirUser`),
//! - the shape of the client's request (interaction and path: type, compartment, id),
//! - the client's original parameters and a digest of the narrowed upstream query they
//!   gave, and
//! - the upstream page to fetch (a path relative to the upstream base and its query),
//!
//! and expires. A `_cursor` request goes through every stage like any request; stage 4
//! then verifies the cursor ([`open`]), re-runs the scope and record decisions on the
//! original request, requires that they narrow it exactly as when the cursor was
//! issued (so a token with other scopes cannot widen a search through someone's
//! cursor), and sends the stored page upstream. Nothing of the client's request but
//! the cursor is used. A tampered or malformed cursor is 400 `cursor_invalid`, an
//! expired one 400 `cursor_expired`, one issued to another tenant, principal or request
//! 403 `cursor_foreign`; all before any upstream call.

use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::fhir::{FhirRequest, Interaction, Narrowing, OperationLevel, OutboundRequest};
use crate::token::VerifiedToken;

/// The query parameter that carries a cursor.
pub const PARAM: &str = "_cursor";

/// Shortest accepted key (bytes), as for HS256 token secrets.
pub const MIN_KEY_BYTES: usize = 32;

/// Default cursor lifetime (seconds).
pub const DEFAULT_TTL_SECONDS: u64 = 3600;

/// Longest cursor accepted (bytes); anything longer is refused before decoding.
const MAX_CURSOR_BYTES: usize = 12 * 1024;

/// The JWT `typ` of a cursor, so no other HS256 token could pass for one.
const TYP: &str = "sfp-cursor";

/// Link relations that become cursors. `self` is handled apart; any other relation is
/// dropped.
const PAGE_RELATIONS: [&str; 5] = ["next", "previous", "prev", "first", "last"];

/// Search result parameters that only shape a page, never which records match. They
/// are not re-added to a page whose upstream link lost them.
const RESULT_PARAMS: [&str; 10] = [
    "_count",
    "_offset",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_format",
    "_pretty",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Bad signature, malformed, or not shaped like a cursor.
    #[error("paging cursor is invalid")]
    Invalid,
    /// `_cursor` came with other parameters.
    #[error("`_cursor` must be the only parameter")]
    NotAlone,
    #[error("paging cursor has expired")]
    Expired,
    /// Issued for another tenant, principal or request.
    #[error("paging cursor was issued for another request")]
    Foreign,
    /// The patients the token may access changed since the cursor was issued.
    #[error(
        "the records this token may access changed since this page was issued; restart the search"
    )]
    Stale,
}

impl CursorError {
    pub fn status(&self) -> StatusCode {
        match self {
            CursorError::Invalid | CursorError::NotAlone | CursorError::Expired => {
                StatusCode::BAD_REQUEST
            }
            CursorError::Foreign => StatusCode::FORBIDDEN,
            CursorError::Stale => StatusCode::CONFLICT,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            CursorError::Invalid | CursorError::NotAlone => "cursor_invalid",
            CursorError::Expired => "cursor_expired",
            CursorError::Foreign => "cursor_foreign",
            CursorError::Stale => "cursor_stale",
        }
    }
}

/// An upstream page: a path relative to the upstream base (`""` or `/...`) and its
/// decoded query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "q")]
    pub params: Vec<(String, String)>,
}

/// The claims of a cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    #[serde(rename = "ten")]
    pub tenant: String,
    /// [`CursorKey::principal`] of the token it was issued to.
    #[serde(rename = "prn")]
    pub principal: String,
    /// [`request_binding`] of the request it was issued for.
    #[serde(rename = "req")]
    pub request: String,
    /// The parameters of the client's original request.
    #[serde(rename = "cq")]
    pub client_params: Vec<(String, String)>,
    /// [`CursorKey::query_digest`] of the narrowed upstream query of the original request.
    #[serde(rename = "nq")]
    pub narrowed: String,
    #[serde(rename = "pg")]
    pub page: Page,
    /// Searches narrowed to a patient list ([`Narrowing`]): the chunk
    /// of the list this page belongs to, and a keyed digest of the whole list.
    #[serde(rename = "sg", default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    pub exp: u64,
}

/// Where in a patient-list narrowed search a page is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    #[serde(rename = "c")]
    pub chunk: usize,
    /// [`CursorKey::list_digest`] of the patient list.
    #[serde(rename = "d")]
    pub list: String,
    /// Whether the stored page must be sent with its chunk (false for pages the
    /// upstream holds, such as `_getpages`).
    #[serde(rename = "s")]
    pub send: bool,
}

/// What a cursor must be bound to for the request at hand.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    pub tenant: &'a str,
    pub principal: &'a str,
    pub request: &'a str,
}

/// The process-wide cursor key and lifetime. Every instance behind one load balancer
/// must share the key.
#[derive(Clone)]
pub struct CursorKey {
    // Cloned per request by the stages: shared, never copied.
    keys: Arc<(EncodingKey, DecodingKey)>,
    ttl_seconds: u64,
}

impl fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CursorKey")
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl CursorKey {
    /// A key from raw secret bytes (at least [`MIN_KEY_BYTES`]).
    pub fn from_secret(secret: &[u8], ttl_seconds: u64) -> Result<Self, String> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the cursor key has {} bytes; at least {MIN_KEY_BYTES} are required",
                secret.len()
            ));
        }
        if ttl_seconds == 0 {
            return Err("the cursor lifetime must be at least one second".to_owned());
        }
        Ok(CursorKey {
            keys: Arc::new((
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
            )),
            ttl_seconds,
        })
    }

    /// A key from base64 text (standard or URL-safe alphabet, padding optional).
    pub fn from_base64(text: &str, ttl_seconds: u64) -> Result<Self, String> {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        let text = text.trim().trim_end_matches('=');
        let secret = STANDARD_NO_PAD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text))
            .map_err(|_| "the cursor key is not valid base64".to_owned())?;
        Self::from_secret(&secret, ttl_seconds)
    }

    /// A fresh random key: cursors then die with the process and are not accepted by
    /// other instances.
    pub fn generate(ttl_seconds: u64) -> Result<Self, String> {
        let mut secret = [0u8; MIN_KEY_BYTES];
        getrandom::getrandom(&mut secret)
            .map_err(|e| format!("cannot generate a cursor key: {e}"))?;
        Self::from_secret(&secret, ttl_seconds)
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    /// A keyed digest (HMAC-SHA256, base64url) of `message`.
    fn mac(&self, message: &[u8]) -> String {
        // Signing with an HMAC key cannot fail; an empty digest would match nothing
        // issued, so a failure is never a pass.
        jsonwebtoken::crypto::sign(message, &self.keys.0, Algorithm::HS256).unwrap_or_default()
    }

    /// The principal of a token as a keyed digest of issuer, subject, client id,
    /// `patient` and `fhirUser` (so cursors carry no identifiers in the clear).
    pub fn principal(&self, token: &VerifiedToken) -> String {
        let fhir_user = token
            .fhir_user
            .as_ref()
            .map(|u| format!("{}/{}", u.resource_type, u.id));
        let parts = (
            "principal",
            &token.issuer,
            &token.subject,
            &token.client_id,
            token.patient.as_ref().map(|p| p.as_str()),
            fhir_user,
        );
        self.mac(&serde_json::to_vec(&parts).unwrap_or_default())
    }

    /// A keyed digest of an upstream query (path and parameters, in order).
    pub fn query_digest(&self, path: &str, params: &[(String, String)]) -> String {
        let parts = ("query", path, params);
        self.mac(&serde_json::to_vec(&parts).unwrap_or_default())
    }

    /// A keyed digest of a patient list (of its fingerprint).
    pub fn list_digest(&self, n: &Narrowing) -> String {
        self.mac(format!("list:{}", n.fingerprint).as_bytes())
    }

    /// Signs a cursor for `page`, valid for the key's lifetime from `now`.
    pub fn issue(
        &self,
        binding: &Binding<'_>,
        client_params: &[(String, String)],
        narrowed: &str,
        page: Page,
        now: u64,
    ) -> Result<String, CursorError> {
        self.issue_segment(binding, client_params, narrowed, page, None, now)
    }

    /// As [`CursorKey::issue`], for a page of a patient-list narrowed search.
    pub fn issue_segment(
        &self,
        binding: &Binding<'_>,
        client_params: &[(String, String)],
        narrowed: &str,
        page: Page,
        segment: Option<Segment>,
        now: u64,
    ) -> Result<String, CursorError> {
        let claims = Cursor {
            tenant: binding.tenant.to_owned(),
            principal: binding.principal.to_owned(),
            request: binding.request.to_owned(),
            client_params: client_params.to_vec(),
            narrowed: narrowed.to_owned(),
            page,
            segment,
            exp: now.saturating_add(self.ttl_seconds),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(TYP.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.keys.0).map_err(|_| CursorError::Invalid)
    }

    /// Verifies a cursor: signature and shape, then expiry, then the binding.
    pub fn verify(
        &self,
        token: &str,
        expect: &Binding<'_>,
        now: u64,
    ) -> Result<Cursor, CursorError> {
        if token.is_empty() || token.len() > MAX_CURSOR_BYTES {
            return Err(CursorError::Invalid);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against `now`, without leeway; no other registered
        // claim is used.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Cursor>(token, &self.keys.1, &validation)
            .map_err(|_| CursorError::Invalid)?;
        if data.header.typ.as_deref() != Some(TYP) {
            return Err(CursorError::Invalid);
        }
        let cursor = data.claims;
        let path_ok = cursor.page.path.is_empty()
            || (cursor.page.path.starts_with('/')
                && !cursor.page.path.contains(['?', '#', '\\'])
                && !cursor.page.path.contains("/../")
                && !cursor.page.path.ends_with("/.."));
        if !path_ok {
            return Err(CursorError::Invalid);
        }
        if now >= cursor.exp {
            return Err(CursorError::Expired);
        }
        if cursor.tenant != expect.tenant
            || cursor.principal != expect.principal
            || cursor.request != expect.request
        {
            return Err(CursorError::Foreign);
        }
        Ok(cursor)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    crate::token::now_secs()
}

/// The path (after the tenant's public base) a client uses for this request, rebuilt
/// from the parsed parts; `None` for interactions whose answers are never paged.
pub fn request_path(req: &FhirRequest) -> Option<String> {
    let t = req.resource_type.map(|t| t.as_str()).unwrap_or("");
    let id = req.id.as_ref().map(|i| i.as_str()).unwrap_or("");
    Some(match &req.interaction {
        Interaction::SearchType => format!("/{t}"),
        Interaction::SearchSystem => String::new(),
        Interaction::SearchCompartment => {
            let c = req.compartment.as_ref()?;
            let target = req.resource_type.map(|t| t.as_str()).unwrap_or("*");
            format!("/{}/{}/{target}", c.owner, c.id)
        }
        Interaction::HistoryInstance => format!("/{t}/{id}/_history"),
        Interaction::HistoryType => format!("/{t}/_history"),
        Interaction::HistorySystem => "/_history".to_owned(),
        Interaction::Operation(op, OperationLevel::System) => format!("/${}", op.as_str()),
        Interaction::Operation(op, OperationLevel::Type) => format!("/{t}/${}", op.as_str()),
        Interaction::Operation(op, OperationLevel::Instance) => {
            format!("/{t}/{id}/${}", op.as_str())
        }
        _ => return None,
    })
}

/// What a cursor is bound to of the request: its interaction and path.
pub fn request_binding(req: &FhirRequest) -> String {
    format!(
        "{} {}",
        req.interaction.name(),
        request_path(req).unwrap_or_default()
    )
}

/// The cursor of a request, if it has one; `_cursor` must then be its only parameter.
pub fn cursor_param(req: &FhirRequest) -> Result<Option<&str>, CursorError> {
    let mut cursors = req.params.iter().filter(|(k, _)| k == PARAM);
    let Some((_, value)) = cursors.next() else {
        return Ok(None);
    };
    if req.params.len() != 1 {
        return Err(CursorError::NotAlone);
    }
    Ok(Some(value.as_str()))
}

/// A `_cursor` request as stage 4 resolved it (a request extension, read by stage 5
/// to issue the next cursors).
#[derive(Clone, Debug)]
pub struct Resumed {
    /// The parameters of the client's original request.
    pub client_params: Vec<(String, String)>,
    /// The original request, narrowed again for the current token.
    pub narrowed: OutboundRequest,
}

/// The first half of stage 4 for a `_cursor` request: verifies the cursor against the
/// tenant, the token and the request shape, and returns it with the client's original
/// request (this request's shape, the cursor's client parameters), for stage 4 to
/// re-authorize and narrow again with the current token (`rewrite::resume`). `Ok(None)`
/// when the request has no cursor. Pure: the caller passes `now`.
pub fn open(
    key: &CursorKey,
    tenant: &str,
    token: &VerifiedToken,
    req: &FhirRequest,
    now: u64,
) -> Result<Option<(Cursor, FhirRequest)>, CursorError> {
    let Some(text) = cursor_param(req)? else {
        return Ok(None);
    };
    let principal = key.principal(token);
    let request = request_binding(req);
    let binding = Binding {
        tenant,
        principal: &principal,
        request: &request,
    };
    let cursor = key.verify(text, &binding, now)?;
    let original = FhirRequest {
        params: cursor.client_params.clone(),
        ..req.clone()
    };
    Ok(Some((cursor, original)))
}

/// The second half: given the original request narrowed again for the current token
/// (`narrowed`), checks that it narrows exactly as when the cursor was issued and builds
/// the outbound request from the stored page.
pub fn resume_page(
    key: &CursorKey,
    cursor: Cursor,
    narrowed: OutboundRequest,
) -> Result<(OutboundRequest, Resumed), CursorError> {
    // The current token must narrow the original request exactly as the one the cursor
    // was issued to did; otherwise the stored page could be wider than it may see.
    if key.query_digest(&narrowed.path, &narrowed.params) != cursor.narrowed {
        return Err(CursorError::Foreign);
    }
    // A patient-list narrowed search resumes in its chunk of the current list, which
    // must be the list the cursor was issued with (else chunks would shift).
    let narrowing = match (&narrowed.narrowing, cursor.segment) {
        (None, None) => None,
        (Some(n), Some(seg)) => {
            if key.list_digest(n) != seg.list {
                return Err(CursorError::Stale);
            }
            if seg.chunk >= n.chunks().max(1) {
                return Err(CursorError::Invalid);
            }
            Some(Narrowing {
                chunk: seg.chunk,
                send: seg.send,
                ..n.clone()
            })
        }
        _ => return Err(CursorError::Foreign),
    };
    let out = OutboundRequest {
        method: Method::GET,
        path: cursor.page.path,
        params: cursor.page.params,
        body: None,
        conditional: narrowed.conditional,
        narrowing,
        headers: Vec::new(),
    };
    Ok((
        out,
        Resumed {
            client_params: cursor.client_params,
            narrowed,
        },
    ))
}

/// Everything stage 5 needs to turn an upstream Bundle's links into proxy links.
pub struct Pager<'a> {
    pub key: &'a CursorKey,
    pub tenant: &'a str,
    pub public_base: &'a str,
    token: &'a VerifiedToken,
    req: &'a FhirRequest,
    /// [`request_path`] of the request (`None`: not pageable, every link is dropped).
    pub path: Option<String>,
    // Computed on the first link only: most answers (reads) carry none, and every link
    // of one answer shares them.
    principal: OnceCell<String>,
    request: OnceCell<String>,
    digest: OnceCell<String>,
    /// The parameters of the client's original request.
    pub client_params: &'a [(String, String)],
    /// The original request's narrowed upstream query.
    pub narrowed: &'a OutboundRequest,
    /// What was sent upstream for this page.
    pub current: &'a OutboundRequest,
    /// Whether this request was itself a cursor.
    pub resumed: bool,
    pub now: u64,
}

impl<'a> Pager<'a> {
    /// The pager of a request: `resumed` is stage 4's [`Resumed`] for `_cursor`
    /// requests.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: &'a CursorKey,
        tenant: &'a str,
        public_base: &'a str,
        token: &'a VerifiedToken,
        req: &'a FhirRequest,
        current: &'a OutboundRequest,
        resumed: Option<&'a Resumed>,
        now: u64,
    ) -> Pager<'a> {
        let (client_params, narrowed) = match resumed {
            Some(r) => (r.client_params.as_slice(), &r.narrowed),
            None => (req.params.as_slice(), current),
        };
        Pager {
            key,
            tenant,
            public_base,
            token,
            req,
            path: request_path(req),
            principal: OnceCell::new(),
            request: OnceCell::new(),
            digest: OnceCell::new(),
            client_params,
            narrowed,
            current,
            resumed: resumed.is_some(),
            now,
        }
    }

    /// The proxy URL replacing an upstream link (already rewritten to the public base),
    /// or `None` to drop it: links to anywhere but the tenant's public base, relations
    /// other than `self` and the paging ones, and every link of an answer that is not
    /// pageable.
    pub fn link(&self, relation: &str, url: &str) -> Result<Option<String>, CursorError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let Some(rest) = url.strip_prefix(self.public_base) else {
            return Ok(None);
        };
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            || rest.contains('#')
        {
            return Ok(None);
        }
        let (link_path, link_query) = rest.split_once('?').unwrap_or((rest, ""));
        // Within a patient-list narrowed search, `first` and `last` would name the
        // chunk's first and last page, not the search's.
        if self.segmented() && matches!(relation, "first" | "last") {
            return Ok(None);
        }
        let page = if relation == "self" {
            if !self.resumed {
                return Ok(Some(self.client_url(path)));
            }
            Page {
                path: self.current.path.clone(),
                params: self.current.params.clone(),
            }
        } else if PAGE_RELATIONS.contains(&relation) {
            self.page(link_path, link_query)
        } else {
            return Ok(None);
        };
        let (page, segment) = match &self.current.narrowing {
            // The upstream's link repeats the chunk it was given; the cursor never
            // carries it (it is sent again from the current list).
            Some(n) => {
                let pair = n.pair();
                let page = Page {
                    params: page.params.into_iter().filter(|p| *p != pair).collect(),
                    ..page
                };
                (page, Some((n.chunk, n.send && !link_path.is_empty())))
            }
            None => (page, None),
        };
        self.cursor_url(path, page, segment).map(Some)
    }

    /// The proxy URL of a cursor for `page` (in chunk `segment` = (chunk, send) of a
    /// patient-list narrowed search).
    fn cursor_url(
        &self,
        path: &str,
        page: Page,
        segment: Option<(usize, bool)>,
    ) -> Result<String, CursorError> {
        let binding = Binding {
            tenant: self.tenant,
            principal: self
                .principal
                .get_or_init(|| self.key.principal(self.token)),
            request: self.request.get_or_init(|| request_binding(self.req)),
        };
        let digest = self.digest.get_or_init(|| {
            self.key
                .query_digest(&self.narrowed.path, &self.narrowed.params)
        });
        let segment = match (segment, &self.current.narrowing) {
            (Some((chunk, send)), Some(n)) => Some(Segment {
                chunk,
                list: self.key.list_digest(n),
                send,
            }),
            _ => None,
        };
        let cursor = self.key.issue_segment(
            &binding,
            self.client_params,
            digest,
            page,
            segment,
            self.now,
        )?;
        Ok(format!("{}{path}?{PARAM}={cursor}", self.public_base))
    }

    /// Whether this answer is one chunk of a patient-list narrowed search that spans
    /// several.
    pub fn segmented(&self) -> bool {
        self.current
            .narrowing
            .as_ref()
            .is_some_and(|n| n.chunks() > 1)
    }

    /// The link to the first page of the next chunk, when this answer ended its chunk
    /// (the upstream gave no `next`) and another chunk follows.
    pub fn next_chunk_link(&self) -> Result<Option<String>, CursorError> {
        let (Some(path), Some(n)) = (&self.path, &self.current.narrowing) else {
            return Ok(None);
        };
        if !n.has_next_chunk() {
            return Ok(None);
        }
        let page = Page {
            path: self.narrowed.path.clone(),
            params: self.narrowed.params.clone(),
        };
        self.cursor_url(path, page, Some((n.chunk + 1, true)))
            .map(Some)
    }

    /// The client's own request as a proxy URL.
    fn client_url(&self, path: &str) -> String {
        if self.client_params.is_empty() {
            return format!("{}{path}", self.public_base);
        }
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.client_params {
            ser.append_pair(k, v);
        }
        format!("{}{path}?{}", self.public_base, ser.finish())
    }

    /// The upstream page a link stands for. A link to the base itself (HAPI's
    /// `?_getpages=` handles of a search held by the server) is kept as it is. Any
    /// other link is taken as the narrowed path with the link's query, since upstreams
    /// may drop the compartment from compartment-search links (sekmet-fhir answers
    /// `Patient/p1/Observation?_count=2` with `next` = `Observation?_count=2&_offset=2`);
    /// narrowing parameters the link lost are added back (FHIR ANDs repeats, so they
    /// can only narrow).
    fn page(&self, link_path: &str, link_query: &str) -> Page {
        let mut params: Vec<(String, String)> = form_urlencoded::parse(link_query.as_bytes())
            .into_owned()
            .collect();
        if link_path.is_empty() {
            return Page {
                path: String::new(),
                params,
            };
        }
        for pair in &self.narrowed.params {
            let base = pair.0.split(':').next().unwrap_or(&pair.0);
            if !RESULT_PARAMS.contains(&base) && !params.contains(pair) {
                params.push(pair.clone());
            }
        }
        Page {
            path: self.narrowed.path.clone(),
            params,
        }
    }
}

#[cfg(test)]
mod tests;
