//! Request tracing: W3C Trace Context (`traceparent`, `tracestate`) and request ids.
//!
//! Part of the shared model. The outermost layer (`observe`) starts each request's
//! [`Scope`] from its headers ([`Scope::start`]): a valid `traceparent` is continued
//! (same trace id, the caller's span as the parent of the proxy's), a missing or
//! malformed one is ignored and a new trace started; a sane `X-Request-Id` is kept,
//! anything else replaced by a new one. The scope is task-local to the request
//! ([`current`]); each stage runs in a child scope of its own, with a `tracing` span of
//! the same span id ([`in_child_span`]), so what the upstream FHIR client and the
//! OpenFGA client send ([`Scope::traceparent`]: the trace id and the span id of the
//! stage that calls) names the proxy span the call belongs to. [`otlp`] exports those
//! spans when an endpoint is configured.
//!
//! Ids are random (a per-thread generator seeded from the operating system); they
//! identify, they do not protect anything.

pub mod otlp;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Instrument;

/// The W3C Trace Context header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Vendor trace data, passed on with a valid `traceparent`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The request id header: accepted when sane, returned on every answer, forwarded
/// upstream and recorded in the audit record.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id accepted from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest `tracestate` passed on (the W3C limit vendors must propagate).
pub const MAX_TRACESTATE_LEN: usize = 512;

/// A 16-byte trace id, never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

/// An 8-byte span id, never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub u64);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl TraceId {
    /// 32 lowercase hex digits, not all zero (as `traceparent` carries it).
    pub fn parse(s: &str) -> Option<TraceId> {
        (s.len() == 32 && is_lower_hex(s))
            .then(|| u128::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v != 0)
            .map(TraceId)
    }

    pub fn random() -> TraceId {
        loop {
            let v = (u128::from(random_u64()) << 64) | u128::from(random_u64());
            if v != 0 {
                return TraceId(v);
            }
        }
    }
}

impl SpanId {
    /// 16 lowercase hex digits, not all zero.
    pub fn parse(s: &str) -> Option<SpanId> {
        (s.len() == 16 && is_lower_hex(s))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v != 0)
            .map(SpanId)
    }

    pub fn random() -> SpanId {
        loop {
            let v = random_u64();
            if v != 0 {
                return SpanId(v);
            }
        }
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: TraceId,
    /// The caller's span.
    pub parent_id: SpanId,
    pub flags: u8,
}

impl Traceparent {
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// Parses a `traceparent` value as W3C Trace Context level 1 defines it:
/// `version-traceid-parentid-flags`, lowercase hex, ids not all zero, version `ff`
/// invalid. Version `00` is exactly 55 characters; a later version may carry more
/// after a `-`, which is ignored (its first four fields are read as version `00`'s).
pub fn parse_traceparent(value: &str) -> Option<Traceparent> {
    let b = value.as_bytes();
    if b.len() < 55 {
        return None;
    }
    let version = value.get(0..2)?;
    if !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && b.len() != 55 {
        return None;
    }
    if b.len() > 55 && b[55] != b'-' {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::parse(value.get(3..35)?)?;
    let parent_id = SpanId::parse(value.get(36..52)?)?;
    let flags = value.get(53..55)?;
    if !is_lower_hex(flags) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Traceparent {
        trace_id,
        parent_id,
        flags,
    })
}

/// Whether a client's request id is kept: 1 to [`MAX_REQUEST_ID_LEN`] characters of
/// `A-Z a-z 0-9 - . _ : + = / @` (UUIDs, ULIDs, hex and base64 ids, `Root=1-...`
/// style ids), nothing that could break a header, a log line or an audit record.
pub fn sane_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID_LEN
        && v.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b':' | b'+' | b'=' | b'/' | b'@')
        })
}

/// A new request id: a random UUID (version 4).
pub fn new_request_id() -> String {
    let hi = random_u64();
    let lo = random_u64();
    let v = (u128::from(hi) << 64) | u128::from(lo);
    // Version 4, variant 10xx.
    let v = (v & !(0xf << 76)) | (0x4 << 76);
    let v = (v & !(0x3 << 62)) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The trace position of the code running now: which trace, which proxy span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Whether the trace is recorded: always for traces the proxy starts, as the
    /// caller's flag says for traces it continues.
    pub sampled: bool,
}

/// A request's trace scope: its span context and its request-wide ids.
#[derive(Clone, Debug)]
pub struct Scope {
    span: SpanContext,
    request: Arc<RequestIds>,
}

#[derive(Debug)]
struct RequestIds {
    request_id: HeaderValue,
    tracestate: Option<HeaderValue>,
}

/// What [`Scope::start`] found in a request's headers.
#[derive(Clone, Debug)]
pub struct Started {
    pub scope: Scope,
    /// The caller's span, when the request continued a trace.
    pub remote_parent: Option<SpanId>,
}

impl Scope {
    /// The scope of a new request: continues the trace of a single valid
    /// `traceparent` (passing its `tracestate` on), else starts one; keeps a single
    /// sane `X-Request-Id`, else makes one.
    pub fn start(headers: &HeaderMap) -> Started {
        let parent = single(headers, &TRACEPARENT).and_then(parse_traceparent);
        let request_id = single(headers, &X_REQUEST_ID)
            .filter(|v| sane_request_id(v))
            .and_then(|v| HeaderValue::from_str(v).ok())
            .or_else(|| HeaderValue::from_str(&new_request_id()).ok())
            .unwrap_or_else(|| HeaderValue::from_static("-"));
        let tracestate = parent.and_then(|_| tracestate(headers));
        let span = SpanContext {
            trace_id: parent.map_or_else(TraceId::random, |p| p.trace_id),
            span_id: SpanId::random(),
            sampled: parent.is_none_or(|p| p.sampled()),
        };
        Started {
            scope: Scope {
                span,
                request: Arc::new(RequestIds {
                    request_id,
                    tracestate,
                }),
            },
            remote_parent: parent.map(|p| p.parent_id),
        }
    }

    /// A scope of its own, outside any request (a new trace, a new request id).
    pub fn detached() -> Scope {
        Scope::start(&HeaderMap::new()).scope
    }

    /// A child: the same trace and request, a new span.
    pub fn child(&self) -> Scope {
        Scope {
            span: SpanContext {
                span_id: SpanId::random(),
                ..self.span
            },
            request: Arc::clone(&self.request),
        }
    }

    pub fn span(&self) -> SpanContext {
        self.span
    }

    pub fn trace_id(&self) -> TraceId {
        self.span.trace_id
    }

    pub fn span_id(&self) -> SpanId {
        self.span.span_id
    }

    pub fn sampled(&self) -> bool {
        self.span.sampled
    }

    /// The request id (always sane: accepted as such, or made here).
    pub fn request_id(&self) -> &str {
        self.request.request_id.to_str().unwrap_or("-")
    }

    pub fn request_id_header(&self) -> HeaderValue {
        self.request.request_id.clone()
    }

    /// `traceparent` for an outgoing call made in this scope: this trace, this span
    /// as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let v = format!(
            "00-{}-{}-{:02x}",
            self.span.trace_id,
            self.span.span_id,
            u8::from(self.span.sampled)
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The caller's `tracestate`, passed on unchanged with `traceparent`.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.request.tracestate.as_ref()
    }

    /// The headers an outgoing call carries: `traceparent`, `tracestate` when the
    /// caller sent one, and (with `request_id`) `x-request-id`.
    pub fn outbound_headers(&self, request_id: bool) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::with_capacity(3);
        out.push((TRACEPARENT.clone(), self.traceparent()));
        if let Some(state) = self.tracestate() {
            out.push((TRACESTATE.clone(), state.clone()));
        }
        if request_id {
            out.push((X_REQUEST_ID.clone(), self.request_id_header()));
        }
        out
    }
}

/// The value of a header sent exactly once, as text.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// Every `tracestate` header joined with `,` (as HTTP combines them), when the whole
/// is printable ASCII of at most [`MAX_TRACESTATE_LEN`] bytes.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut joined = String::new();
    for v in headers.get_all(&TRACESTATE) {
        let v = v.to_str().ok()?;
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(v);
        if joined.len() > MAX_TRACESTATE_LEN {
            return None;
        }
    }
    let printable = joined.bytes().all(|b| (0x20..=0x7e).contains(&b));
    (!joined.trim().is_empty() && printable)
        .then(|| HeaderValue::from_str(&joined).ok())
        .flatten()
}

tokio::task_local! {
    static CURRENT: Scope;
}

/// The scope of the code running now, if it runs for a request.
pub fn current() -> Option<Scope> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `f` in `scope`.
pub async fn within<F: Future>(scope: Scope, f: F) -> F::Output {
    CURRENT.scope(scope, f).await
}

/// `f` bound to the scope current now, for a task spawned to run it (a spawned task
/// does not inherit task-locals).
pub fn bind_current<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let scope = current();
    async move {
        match scope {
            Some(s) => CURRENT.scope(s, f).await,
            None => f.await,
        }
    }
}

/// Runs `f` in a child scope of the current one (a new trace outside a request),
/// inside the `tracing` span `make` builds for the child's span id. The span must carry
/// that id as its `span.id` field: that is how the exporter ([`otlp`]) and the logs
/// know it.
pub async fn in_child_span<F: Future>(
    make: impl FnOnce(SpanId) -> tracing::Span,
    f: F,
) -> F::Output {
    let scope = match current() {
        Some(s) => s.child(),
        None => Scope::detached(),
    };
    let span = make(scope.span_id());
    CURRENT.scope(scope, f).instrument(span).await
}

/// splitmix64 over a per-thread state seeded by the operating system.
fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|s| {
        let next = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    // No entropy source: distinct per thread and start, which is all ids need.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests;
