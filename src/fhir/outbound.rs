//! The outbound request: what will be sent to the tenant's upstream FHIR server.
//!
//! Written by stage 4 (search narrowing) for the forwarding stage, and built directly
//! by the stages that read the upstream themselves (discovery, PractitionerRole
//! resolution). The upstream client sends nothing else.

use bytes::Bytes;
use http::Method;

/// What will be sent upstream, relative to the tenant's upstream base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundRequest {
    pub method: Method,
    /// Starts with `/` (or is empty for the base itself).
    pub path: String,
    pub params: Vec<(String, String)>,
    /// Forwarded body (`POST $match` Parameters). `_search` bodies are turned into
    /// query parameters instead.
    pub body: Option<Bytes>,
    /// Whether conditional-read headers may be forwarded (unrestricted permits only).
    pub conditional: bool,
    /// `openfga` tenants: the allowed patients a search is narrowed to, sent chunk by
    /// chunk in a POST `_search` body (never in the URL, never in a cursor).
    pub narrowing: Option<Narrowing>,
    /// Request headers the stages decided to send (writes: `Content-Type`, `If-Match`,
    /// the narrowed `If-None-Exist`, `Prefer`). A `Content-Type` or `Prefer` here
    /// replaces the upstream client's own.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// A search narrowed to a list of patients (see [`OutboundRequest::narrowing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Narrowing {
    /// `_id` on Patient searches, else the type's patient reference parameter.
    pub param: String,
    /// Sorted and distinct: `id`s for `_id`, `Patient/id` references otherwise.
    pub values: std::sync::Arc<[String]>,
    pub chunk_size: usize,
    /// The chunk this request searches.
    pub chunk: usize,
    /// Whether the chunk goes upstream with this request (false for pages the upstream
    /// holds itself, such as HAPI's `_getpages`).
    pub send: bool,
    /// `PatientNarrowing::fingerprint` (module `authz::fga`) of the list.
    pub fingerprint: std::sync::Arc<str>,
}

impl Narrowing {
    /// How many upstream searches the whole list takes.
    pub fn chunks(&self) -> usize {
        self.values.len().div_ceil(self.chunk_size.max(1))
    }

    /// The parameter pair of the current chunk.
    pub fn pair(&self) -> (String, String) {
        let size = self.chunk_size.max(1);
        let start = self.chunk.saturating_mul(size).min(self.values.len());
        let end = start.saturating_add(size).min(self.values.len());
        let value = self.values.get(start..end).unwrap_or_default().join(",");
        (self.param.clone(), value)
    }

    pub fn has_next_chunk(&self) -> bool {
        self.chunk + 1 < self.chunks()
    }
}

impl OutboundRequest {
    /// The value of a header in [`OutboundRequest::headers`].
    pub fn header(&self, name: &http::HeaderName) -> Option<&http::HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The encoded path and query, ready to append to the upstream base.
    pub fn path_and_query(&self) -> String {
        if self.params.is_empty() {
            return self.path.clone();
        }
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.params {
            ser.append_pair(k, v);
        }
        format!("{}?{}", self.path, ser.finish())
    }

    /// The `application/x-www-form-urlencoded` body of a narrowed POST `_search`: the
    /// parameters and the current chunk.
    pub fn search_form(&self) -> Option<Bytes> {
        let n = self.narrowing.as_ref().filter(|n| n.send)?;
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.params {
            ser.append_pair(k, v);
        }
        let (k, v) = n.pair();
        ser.append_pair(&k, &v);
        Some(Bytes::from(ser.finish()))
    }
}
