//! OTLP export of the proxy's spans: OTLP/HTTP with the JSON encoding, to
//! `{endpoint}/v1/traces`, when `--otlp-endpoint` is configured.
//!
//! [`OtlpLayer`] is a `tracing` layer. It records the spans that carry a `span.id`
//! field (the request span and one span per stage, see [`super::in_child_span`]): the
//! request span names its trace (`trace.id`), the caller's span (`trace.parent_id`) and
//! whether the trace is sampled (`trace.sampled`); a stage span inherits them from its
//! parent. Other fields become span attributes; `otel.kind` (`server`, `client`) sets
//! the span kind and `otel.status_code = "error"` an error status. Spans of unsampled
//! traces are not recorded.
//!
//! Off the request path: a closed span is handed to a bounded queue (full: the span is
//! dropped and counted, never waited for) and one exporter thread posts batches, every
//! second or every [`MAX_BATCH`] spans. A batch that fails is counted and dropped, not
//! retried: tracing must never hold up or break the proxy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{SpanId, TraceId};

/// Spans waiting for the exporter, at most.
pub const QUEUE_CAPACITY: usize = 8192;
/// Spans per export request, at most.
pub const MAX_BATCH: usize = 512;
/// How long spans gather before an export (unless a batch fills first).
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one export request.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as what spans are exported.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The OTLP/HTTP base URL (`http://collector:4318`); spans go to `/v1/traces`
    /// under it.
    pub endpoint: url::Url,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl OtlpConfig {
    /// The traces URL: the endpoint's path with `v1/traces` appended.
    pub fn traces_url(&self) -> url::Url {
        let mut url = self.endpoint.clone();
        let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url
    }
}

/// Export counts, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub exported: u64,
    pub dropped: u64,
    pub failed: u64,
}

struct Shared {
    /// Queued and not yet exported (or given up).
    pending: AtomicU64,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    flush: AtomicBool,
}

static EXPORTER: OnceLock<Arc<Shared>> = OnceLock::new();

/// The export counts, when an exporter runs.
pub fn counts() -> Option<Counts> {
    let s = EXPORTER.get()?;
    Some(Counts {
        exported: s.exported.load(Ordering::Relaxed),
        dropped: s.dropped.load(Ordering::Relaxed),
        failed: s.failed.load(Ordering::Relaxed),
    })
}

/// Exports what is queued and waits for it (at most `timeout`); for a graceful
/// shutdown. Without an exporter, returns at once.
pub fn flush(timeout: Duration) {
    let Some(s) = EXPORTER.get() else {
        return;
    };
    s.flush.store(true, Ordering::Release);
    let until = Instant::now() + timeout;
    while s.pending.load(Ordering::Acquire) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The layer that records spans for export.
pub struct OtlpLayer {
    tx: SyncSender<FinishedSpan>,
    shared: Arc<Shared>,
}

impl OtlpLayer {
    /// Starts the exporter thread (once per process) and returns the layer feeding it.
    pub fn start(config: OtlpConfig) -> Result<OtlpLayer, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            flush: AtomicBool::new(false),
        });
        EXPORTER
            .set(Arc::clone(&shared))
            .map_err(|_| "the span exporter is started already".to_owned())?;
        let exporter = Exporter::new(&config, Arc::clone(&shared))?;
        std::thread::Builder::new()
            .name("otlp-exporter".to_owned())
            .spawn(move || exporter.run(&rx))
            .map_err(|e| format!("cannot start the span exporter: {e}"))?;
        Ok(OtlpLayer { tx, shared })
    }

    /// A layer that hands spans to `tx` (tests read them there).
    #[cfg(test)]
    pub(crate) fn to_channel(tx: SyncSender<FinishedSpan>) -> OtlpLayer {
        OtlpLayer {
            tx,
            shared: Arc::new(Shared {
                pending: AtomicU64::new(0),
                exported: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                flush: AtomicBool::new(false),
            }),
        }
    }

    /// The filter to install the layer with: the proxy's own spans, at any log level
    /// (what `RUST_LOG` lets through to the logs does not decide what is traced).
    pub fn filter() -> SpanFilter {
        SpanFilter
    }

    fn send(&self, span: FinishedSpan) {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(span) {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Lets through the spans the layer records: those with a `span.id` field.
pub struct SpanFilter;

impl<S> Filter<S> for SpanFilter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        meta.is_span() && meta.fields().field("span.id").is_some()
    }

    /// The proxy's spans are at `INFO` (requests) and `DEBUG` (stages).
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::DEBUG)
    }
}

/// How the exporter encodes a span kind (`SpanKind` of OTLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

/// A closed span, as exported.
#[derive(Clone, Debug)]
pub struct FinishedSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub name: &'static str,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub error: bool,
}

/// A recorded span while open (a span extension).
struct SpanData {
    trace_id: TraceId,
    span_id: SpanId,
    parent_id: Option<SpanId>,
    sampled: bool,
    kind: Kind,
    start: SystemTime,
    attributes: Vec<(&'static str, AttrValue)>,
    error: bool,
}

#[derive(Default)]
struct Fields {
    trace_id: Option<TraceId>,
    span_id: Option<SpanId>,
    parent_id: Option<SpanId>,
    sampled: Option<bool>,
    kind: Option<Kind>,
    error: bool,
    attributes: Vec<(&'static str, AttrValue)>,
}

impl Fields {
    fn text(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace.id" => self.trace_id = TraceId::parse(&value),
            "span.id" => self.span_id = SpanId::parse(&value),
            "trace.parent_id" => self.parent_id = SpanId::parse(&value),
            "otel.kind" => {
                self.kind = Some(match value.as_str() {
                    "server" => Kind::Server,
                    "client" => Kind::Client,
                    _ => Kind::Internal,
                });
            }
            "otel.status_code" => self.error = value.eq_ignore_ascii_case("error"),
            name => self.attributes.push((name, AttrValue::Str(value))),
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_owned());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "trace.sampled" => self.sampled = Some(value),
            name => self.attributes.push((name, AttrValue::Bool(value))),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push((field.name(), AttrValue::Int(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        let v = i64::try_from(value).unwrap_or(i64::MAX);
        self.attributes.push((field.name(), AttrValue::Int(v)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.attributes
            .push((field.name(), AttrValue::Float(value)));
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let Some(span_id) = fields.span_id else {
            return;
        };
        let Some(span) = ctx.span(id) else {
            return;
        };
        let inherited = span.parent().and_then(|p| {
            p.extensions()
                .get::<SpanData>()
                .map(|d| (d.trace_id, d.span_id, d.sampled))
        });
        let (trace_id, parent_id, sampled) = match (fields.trace_id, inherited) {
            (Some(trace), _) => (trace, fields.parent_id, fields.sampled.unwrap_or(true)),
            (None, Some((trace, parent, sampled))) => (trace, Some(parent), sampled),
            // Not part of a request's trace.
            (None, None) => return,
        };
        span.extensions_mut().insert(SpanData {
            trace_id,
            span_id,
            parent_id,
            sampled,
            kind: fields.kind.unwrap_or(Kind::Internal),
            start: SystemTime::now(),
            attributes: if sampled {
                fields.attributes
            } else {
                Vec::new()
            },
            error: fields.error,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut ext = span.extensions_mut();
        let Some(data) = ext.get_mut::<SpanData>().filter(|d| d.sampled) else {
            return;
        };
        let mut fields = Fields::default();
        values.record(&mut fields);
        data.error |= fields.error;
        for (k, v) in fields.attributes {
            match data.attributes.iter_mut().find(|(name, _)| *name == k) {
                Some(slot) => slot.1 = v,
                None => data.attributes.push((k, v)),
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        if !data.sampled {
            return;
        }
        self.send(FinishedSpan {
            trace_id: data.trace_id,
            span_id: data.span_id,
            parent_id: data.parent_id,
            name: span.name(),
            kind: data.kind,
            start: data.start,
            end: SystemTime::now(),
            attributes: data.attributes,
            error: data.error,
        });
    }
}

// ---------------------------------------------------------------------------------------
// the exporter

struct Exporter {
    url: url::Url,
    resource: Value,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Exporter {
    fn new(config: &OtlpConfig, shared: Arc<Shared>) -> Result<Exporter, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the span exporter: {e}"))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("smart-fhir-proxy/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the span exporter's client: {e}"))?;
        Ok(Exporter {
            url: config.traces_url(),
            resource: json!({"attributes": [
                attribute("service.name", &AttrValue::Str(config.service_name.clone())),
                attribute("service.version", &AttrValue::Str(env!("CARGO_PKG_VERSION").to_owned())),
            ]}),
            shared,
            runtime,
            http,
        })
    }

    fn run(&self, rx: &Receiver<FinishedSpan>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut last = Instant::now();
        let mut failing = false;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.export(&mut batch, &mut failing);
                    return;
                }
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            let flush = self.shared.flush.load(Ordering::Acquire);
            if !batch.is_empty()
                && (batch.len() >= MAX_BATCH || last.elapsed() >= EXPORT_INTERVAL || flush)
            {
                self.export(&mut batch, &mut failing);
                last = Instant::now();
            }
        }
    }

    fn export(&self, batch: &mut Vec<FinishedSpan>, failing: &mut bool) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = encode(&self.resource, batch);
        batch.clear();
        let sent = self.runtime.block_on(async {
            let resp = self
                .http
                .post(self.url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            let status = resp.status();
            // The answer is read so the connection can be reused; its content does not
            // matter (partial success is still a success for the batch).
            let _ = resp.bytes().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {}", status.as_u16()))
            }
        });
        match sent {
            Ok(()) => {
                self.shared.exported.fetch_add(n, Ordering::Relaxed);
                if *failing {
                    tracing::info!(otlp.url = %self.url, "span export works again");
                }
                *failing = false;
            }
            Err(e) => {
                self.shared.failed.fetch_add(n, Ordering::Relaxed);
                // Once per failure streak: a collector that is down must not flood the log.
                if !*failing {
                    tracing::warn!(otlp.url = %self.url, error = %e, spans = n, "span export failed; dropping spans until it works again");
                }
                *failing = true;
            }
        }
        self.shared.pending.fetch_sub(n, Ordering::AcqRel);
        if self.shared.pending.load(Ordering::Acquire) == 0 {
            self.shared.flush.store(false, Ordering::Release);
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

fn attribute(key: &str, value: &AttrValue) -> Value {
    let value = match value {
        AttrValue::Str(s) => json!({"stringValue": s}),
        // int64 as a decimal string, as the OTLP JSON mapping writes it.
        AttrValue::Int(i) => json!({"intValue": i.to_string()}),
        AttrValue::Bool(b) => json!({"boolValue": b}),
        AttrValue::Float(f) => json!({"doubleValue": f}),
    };
    json!({"key": key, "value": value})
}

/// An `ExportTraceServiceRequest` in the OTLP JSON encoding (ids in hex, enums as
/// numbers, 64-bit integers as strings).
pub fn encode(resource: &Value, spans: &[FinishedSpan]) -> Vec<u8> {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": s.trace_id.to_string(),
                "spanId": s.span_id.to_string(),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": if s.error { json!({"code": 2}) } else { json!({}) },
            });
            if let (Some(parent), Some(obj)) = (s.parent_id, span.as_object_mut()) {
                obj.insert("parentSpanId".into(), Value::String(parent.to_string()));
            }
            span
        })
        .collect();
    let request = json!({"resourceSpans": [{
        "resource": resource,
        "scopeSpans": [{
            "scope": {"name": "smart-fhir-proxy", "version": env!("CARGO_PKG_VERSION")},
            "spans": spans,
        }],
    }]});
    serde_json::to_vec(&request).unwrap_or_default()
}

#[cfg(test)]
mod tests;
