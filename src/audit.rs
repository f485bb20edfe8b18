//! One structured audit record per request decision.
//!
//! The outermost layer puts an [`AuditSlot`] into the request; each stage fills in what
//! it proved (tenant, principal, interaction, patient); the outermost layer emits the
//! record once, with the decision and the stable reason id. Records name who, what,
//! which patient and why; never a token, and no patient data beyond ids.
//!
//! Off the request path: with a [`AuditSink`] installed (the server does at start-up)
//! the finished record is handed to a bounded queue and formatted and written by one
//! writer thread, in the shape of the `audit` tracing target's lines. When the queue is
//! full the operator's [`Overflow`] choice applies: count the record as dropped, or
//! fail the request closed (503). Without a sink (library use, unit tests) the record
//! goes to the `audit` tracing target directly.
//!
//! Optionally ([`fhir::FhirAuditSink`]) every record is also written as a FHIR R4
//! `AuditEvent` ([`event`]) to an audit repository, in `batch` Bundles, by a writer of
//! its own with its own bounded queue and overflow choice. A record is only handed on
//! once both queues have taken it, so a refusal by one never leaves it in the other.

pub mod event;
pub mod fhir;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use crate::fhir::FhirRequest;

#[derive(Default, Debug, Clone)]
pub struct AuditRecord {
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub subject: Option<String>,
    pub interaction: Option<&'static str>,
    pub operation: Option<String>,
    pub resource_type: Option<&'static str>,
    pub resource_id: Option<String>,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    /// The tenant's public base URL: the AuditEvent's references are absolute under it,
    /// so they stay unambiguous in a repository shared by tenants (and searchable where
    /// the repository does not hold the records).
    pub public_base: Option<String>,
    /// The token's issuer (the namespace of `client_id` and `subject`).
    pub issuer: Option<String>,
    /// The version of a vread.
    pub version: Option<String>,
    /// The compartment named in the path (`Patient/p1` of `Patient/p1/Observation`).
    pub compartment: Option<String>,
    /// The request as the client sent it, relative to the tenant base: `Observation?code=x`,
    /// a `POST _search` body after a blank line; `access_token` parameters removed, cut at
    /// [`MAX_QUERY_BYTES`]. Only the FHIR `AuditEvent` carries it, never a log line.
    pub query: Option<String>,
    /// The request id (`X-Request-Id`: the client's or a front proxy's when sane, else
    /// the one the proxy made; `crate::trace`).
    pub request_id: Option<String>,
    /// Extra facts a stage wants on record (e.g. dropped entries), as `key=value`.
    pub notes: Vec<String>,
    /// The patients whose compartments a written record is in (its new content and
    /// the version it replaced), sorted and distinct.
    pub patients: Vec<String>,
}

/// The most of a request kept as its query (a `_search` body may be much larger; the
/// queues hold many records).
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Shared, per-request audit record under construction.
#[derive(Clone, Debug)]
pub struct AuditSlot {
    record: Arc<Mutex<AuditRecord>>,
    started: Instant,
}

impl Default for AuditSlot {
    fn default() -> Self {
        AuditSlot {
            record: Arc::default(),
            started: Instant::now(),
        }
    }
}

impl AuditSlot {
    fn with<R>(&self, f: impl FnOnce(&mut AuditRecord) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update; the record is
        // still worth emitting.
        let mut guard = match self.record.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// A record of its own for a part of this request (an entry of a batch or
    /// transaction): the tenant, principal, issuer and request id so far, nothing of
    /// what was asked.
    pub fn fork(&self) -> AuditSlot {
        let record = self.with(|r| AuditRecord {
            tenant: r.tenant.clone(),
            client_id: r.client_id.clone(),
            subject: r.subject.clone(),
            patient: r.patient.clone(),
            fhir_user: r.fhir_user.clone(),
            public_base: r.public_base.clone(),
            issuer: r.issuer.clone(),
            request_id: r.request_id.clone(),
            ..AuditRecord::default()
        });
        AuditSlot {
            record: Arc::new(Mutex::new(record)),
            started: Instant::now(),
        }
    }

    pub fn set_tenant(&self, tenant: &str) {
        self.with(|r| r.tenant = Some(tenant.to_owned()));
    }

    /// The tenant's public base URL (`https://proxy.example/demo`).
    pub fn set_public_base(&self, base: &str) {
        self.with(|r| r.public_base = Some(base.trim_end_matches('/').to_owned()));
    }

    pub fn set_request(&self, req: &FhirRequest) {
        self.with(|r| {
            r.interaction = Some(req.interaction.name());
            r.resource_type = req.resource_type.map(|t| t.as_str());
            r.resource_id = req.id.as_ref().map(|i| i.as_str().to_owned());
            r.version = req.version.as_ref().map(|v| v.as_str().to_owned());
            r.compartment = req
                .compartment
                .as_ref()
                .map(|c| format!("{}/{}", c.owner.as_str(), c.id.as_str()));
            if let crate::fhir::Interaction::Operation(op, _) = &req.interaction {
                r.operation = Some(op.as_str().to_owned());
            }
        });
    }

    /// Who the request is for, as the verified token names them: client id, subject,
    /// `patient` and `fhirUser` (`Type/id`).
    pub fn set_principal(
        &self,
        client_id: Option<String>,
        subject: Option<String>,
        patient: Option<String>,
        fhir_user: Option<String>,
    ) {
        self.with(|r| {
            r.client_id = client_id;
            r.subject = subject;
            r.patient = patient;
            r.fhir_user = fhir_user;
        });
    }

    /// The token's issuer.
    pub fn set_issuer(&self, issuer: &str) {
        self.with(|r| r.issuer = Some(issuer.to_owned()));
    }

    /// The request as sent: `path` relative to the tenant base (`/Observation`), the raw
    /// query string and a form body. Kept for the FHIR `AuditEvent` only (and only when
    /// AuditEvents are written).
    pub fn set_query(&self, path: &str, query: Option<&str>, body: Option<&[u8]>) {
        if !fhir::enabled() {
            return;
        }
        let text = request_text(path, query, body);
        self.with(|r| r.query = Some(text));
    }

    /// The request id (`X-Request-Id`), if it is a plausible one: 1 to 200 visible
    /// ASCII characters. Anything else is not recorded.
    pub fn set_request_id(&self, id: &str) {
        let plausible =
            !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic());
        if plausible {
            self.with(|r| r.request_id = Some(id.to_owned()));
        }
    }

    /// The tenant and interaction recorded so far (the request metrics' labels).
    pub fn labels<R>(&self, f: impl FnOnce(Option<&str>, Option<&'static str>) -> R) -> R {
        self.with(|r| f(r.tenant.as_deref(), r.interaction))
    }

    /// The patients a write concerns (see [`AuditRecord::patients`]).
    pub fn set_patients(&self, patients: &[String]) {
        self.with(|r| r.patients = patients.to_vec());
    }

    /// The record a write produced, as the upstream named it (`Location`): its id
    /// (for a create, which has none in the path) and version.
    pub fn set_written(&self, id: &str, version: Option<&str>) {
        self.with(|r| {
            r.resource_id = Some(id.to_owned());
            r.version = version.map(str::to_owned);
        });
    }

    pub fn note(&self, note: String) {
        self.with(|r| r.notes.push(note));
    }

    /// Emits the record of an answer that releases something: `decision` is `allow`,
    /// or `error` (an upstream error passed through); `reason` a stable id. All or
    /// nothing: `Err` if a sink that fails closed could not take the record, and then
    /// no sink has it (the answer must not go out, so neither may its record).
    pub fn emit(&self, status: u16, decision: &'static str, reason: &str) -> Result<(), AuditFull> {
        let finished = self.finish(status, decision, reason);
        // A place in the FHIR queue first: when the line queue then refuses the record,
        // the place is given back and neither has it.
        let event = fhir::reserve()?;
        match SINK.get() {
            Some(sink) => sink.send(Arc::clone(&finished))?,
            None => trace_record(&finished),
        }
        if let Some(place) = event {
            place.send(finished);
        }
        Ok(())
    }

    /// Emits the record of a refusal (decision `deny`). The refusal goes out whatever
    /// happens here, so each sink takes the record if it can.
    pub fn emit_refusal(&self, status: u16, reason: &str) {
        let finished = self.finish(status, "deny", reason);
        if let Ok(Some(place)) = fhir::reserve() {
            place.send(Arc::clone(&finished));
        }
        match SINK.get() {
            Some(sink) => {
                let _ = sink.send(finished);
            }
            None => trace_record(&finished),
        }
    }

    fn finish(&self, status: u16, decision: &'static str, reason: &str) -> Arc<Finished> {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let mut record = AuditRecord::default();
        self.with(|r| std::mem::swap(r, &mut record));
        Arc::new(Finished {
            record,
            at: SystemTime::now(),
            latency_ms,
            status,
            decision,
            reason: reason.to_owned(),
        })
    }
}

/// The request text of [`AuditRecord::query`].
fn request_text(path: &str, query: Option<&str>, body: Option<&[u8]>) -> String {
    let mut text = String::from(path.strip_prefix('/').unwrap_or(path));
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        text.push('?');
        push_without_tokens(&mut text, q);
    }
    if let Some(b) = body.filter(|b| !b.is_empty()) {
        text.push_str("\n\n");
        push_without_tokens(&mut text, &String::from_utf8_lossy(b));
    }
    if text.len() > MAX_QUERY_BYTES {
        let mut end = MAX_QUERY_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Appends the `&`-separated pairs of `form` as they were sent, except those named
/// `access_token` (however encoded): a token sent as a parameter (RFC 6750 2.3) is
/// never recorded.
fn push_without_tokens(out: &mut String, form: &str) {
    let mut first = true;
    for pair in form.split('&') {
        let name = pair.split('=').next().unwrap_or_default();
        let decoded: String = form_urlencoded::parse(name.as_bytes())
            .map(|(k, _)| k.into_owned())
            .collect();
        if decoded.trim().eq_ignore_ascii_case("access_token") {
            continue;
        }
        if !first {
            out.push('&');
        }
        out.push_str(pair);
        first = false;
    }
}

fn trace_record(f: &Finished) {
    let (r, latency_ms, status, decision, reason) = (
        &f.record,
        f.latency_ms,
        f.status,
        f.decision,
        f.reason.as_str(),
    );
    tracing::info!(
        target: "audit",
        latency_ms,
        tenant.id = r.tenant.as_deref().unwrap_or("-"),
        client.id = r.client_id.as_deref().unwrap_or("-"),
        subject = r.subject.as_deref().unwrap_or("-"),
        fhir.user = r.fhir_user.as_deref().unwrap_or("-"),
        fhir.interaction = r.interaction.unwrap_or("-"),
        fhir.operation = r.operation.as_deref().unwrap_or("-"),
        fhir.resource_type = r.resource_type.unwrap_or("-"),
        fhir.resource_id = r.resource_id.as_deref().unwrap_or("-"),
        patient = r.patient.as_deref().unwrap_or("-"),
        fhir.patients = %r.patients.join(","),
        authz.decision = decision,
        authz.reason = reason,
        http.status = status,
        notes = %r.notes.join(" "),
        request.id = r.request_id.as_deref().unwrap_or("-"),
        "decision"
    );
}

/// The audit queue was full and the sink fails closed: the request must not be
/// answered as if it had been recorded.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit log is not keeping up")]
pub struct AuditFull;

/// What happens to a record when the audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The request fails with 503: nothing is released unrecorded.
    FailClosed,
    /// The record is dropped and counted (`audit.dropped` in a warning line).
    Drop,
}

/// How audit lines are written (as the process's other log lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Json,
    Text,
}

/// A record handed to the writer.
struct Finished {
    record: AuditRecord,
    at: SystemTime,
    latency_ms: f64,
    status: u16,
    decision: &'static str,
    reason: String,
}

/// The process's audit queue and its writer thread.
pub struct AuditSink {
    tx: SyncSender<Arc<Finished>>,
    overflow: Overflow,
    dropped: Arc<AtomicU64>,
    /// Queued and not yet written.
    pending: Arc<AtomicU64>,
}

static SINK: OnceLock<AuditSink> = OnceLock::new();

impl AuditSink {
    /// Starts the writer thread (writing to standard error) and makes it the
    /// process's sink. Once per process; a second call fails.
    pub fn install(capacity: usize, overflow: Overflow, format: LineFormat) -> Result<(), String> {
        // One lock of standard error per batch: the batch's lines never interleave with
        // the process's other log lines.
        let stderr = || Box::new(std::io::stderr().lock()) as Box<dyn Write>;
        let sink = AuditSink::start(capacity, overflow, format, Box::new(stderr))?;
        SINK.set(sink)
            .map_err(|_| "the audit sink is installed already".to_owned())
    }

    /// A sink whose writer thread writes lines to what `out` opens (one lock per
    /// batch of queued records).
    fn start(
        capacity: usize,
        overflow: Overflow,
        format: LineFormat,
        out: Box<dyn Fn() -> Box<dyn Write> + Send>,
    ) -> Result<AuditSink, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        let (counter, written) = (Arc::clone(&dropped), Arc::clone(&pending));
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || write_loop(&rx, format, &counter, &written, &*out))
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        Ok(AuditSink {
            tx,
            overflow,
            dropped,
            pending,
        })
    }

    fn send(&self, f: Arc<Finished>) -> Result<(), AuditFull> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.try_send(f);
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) if self.overflow == Overflow::Drop => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Full and failing closed, or the writer is gone (it never exits while
            // the sender lives, so only if it panicked): not recorded.
            Err(_) => {
                if self.overflow == Overflow::Drop {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(AuditFull)
            }
        }
    }
}

/// The records the JSON-lines sink dropped so far (overflow `drop`), when one is
/// installed (for the metrics).
pub fn dropped_total() -> Option<u64> {
    SINK.get().map(|s| s.dropped.load(Ordering::Relaxed))
}

/// Waits (at most `timeout`) until every queued record is written, as lines and (when
/// configured) as FHIR AuditEvents; for a graceful shutdown. Without a sink, returns at
/// once.
pub fn drain(timeout: std::time::Duration) {
    let until = Instant::now() + timeout;
    // The FHIR writer stops waiting for fuller batches at once.
    fhir::start_draining();
    let lines = || {
        SINK.get()
            .is_some_and(|s| s.pending.load(Ordering::Acquire) > 0)
    };
    while (lines() || fhir::pending() > 0) && Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    fhir::report_unsent();
}

fn write_loop(
    rx: &Receiver<Arc<Finished>>,
    format: LineFormat,
    dropped: &AtomicU64,
    pending: &AtomicU64,
    out: &dyn Fn() -> Box<dyn Write>,
) {
    let mut line = Vec::with_capacity(512);
    let mut reported = 0u64;
    loop {
        // The writer polls rather than waits on the queue: a sender then never has to
        // wake it (a futex call and a context switch per record), and records written
        // within one tick go out in one write.
        let first = match rx.try_recv() {
            Ok(f) => f,
            Err(TryRecvError::Empty) => {
                std::thread::sleep(WRITE_TICK);
                continue;
            }
            // Every sender is gone.
            Err(TryRecvError::Disconnected) => return,
        };
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, out());
        let mut next = Some(first);
        let mut written = 0;
        while let Some(f) = next {
            line.clear();
            format_line(&mut line, &f, format);
            // A failing log sink cannot be reported anywhere better; the next
            // records try again.
            let _ = w.write_all(&line);
            written += 1;
            next = rx.try_recv().ok();
        }
        let now = dropped.load(Ordering::Relaxed);
        if now > reported {
            line.clear();
            format_dropped(&mut line, now - reported, now, format);
            let _ = w.write_all(&line);
            reported = now;
        }
        let _ = w.flush();
        drop(w);
        pending.fetch_sub(written, Ordering::AcqRel);
        std::thread::sleep(WRITE_TICK);
    }
}

/// How long the writer lets records gather between writes (and how late a line can
/// be).
const WRITE_TICK: std::time::Duration = std::time::Duration::from_millis(5);

/// One line, as the `audit` tracing target's events look in `format`.
fn format_line(out: &mut Vec<u8>, f: &Finished, format: LineFormat) {
    let r = &f.record;
    let notes = r.notes.join(" ");
    let patients = r.patients.join(",");
    let fields: [(&str, &str); 15] = [
        ("tenant.id", r.tenant.as_deref().unwrap_or("-")),
        ("client.id", r.client_id.as_deref().unwrap_or("-")),
        ("subject", r.subject.as_deref().unwrap_or("-")),
        ("fhir.user", r.fhir_user.as_deref().unwrap_or("-")),
        ("fhir.interaction", r.interaction.unwrap_or("-")),
        ("fhir.operation", r.operation.as_deref().unwrap_or("-")),
        ("fhir.resource_type", r.resource_type.unwrap_or("-")),
        ("fhir.resource_id", r.resource_id.as_deref().unwrap_or("-")),
        ("patient", r.patient.as_deref().unwrap_or("-")),
        ("fhir.patients", &patients),
        ("authz.decision", f.decision),
        ("authz.reason", &f.reason),
        ("http.status", ""),
        ("notes", &notes),
        ("request.id", r.request_id.as_deref().unwrap_or("-")),
    ];
    let timestamp = rfc3339(f.at);
    match format {
        LineFormat::Json => {
            // Written field by field (no map): strings escaped by serde_json.
            let string = |out: &mut Vec<u8>, s: &str| {
                // Writing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, s);
            };
            out.extend_from_slice(b"{\"timestamp\":");
            string(out, &timestamp);
            out.extend_from_slice(b",\"level\":\"INFO\",\"message\":\"decision\",\"latency_ms\":");
            let _ = serde_json::to_writer(&mut *out, &f.latency_ms);
            for (k, v) in fields {
                out.push(b',');
                string(out, k);
                out.push(b':');
                if k == "http.status" {
                    let _ = write!(out, "{}", f.status);
                } else {
                    string(out, v);
                }
            }
            out.extend_from_slice(b",\"target\":\"audit\"}");
        }
        LineFormat::Text => {
            let _ = write!(
                out,
                "{timestamp}  INFO audit: decision latency_ms={}",
                f.latency_ms
            );
            for (k, v) in fields {
                if k == "http.status" {
                    let _ = write!(out, " {k}={}", f.status);
                } else {
                    let _ = write!(out, " {k}=");
                    text_value(out, v);
                }
            }
        }
    }
    out.push(b'\n');
}

/// A text-format value: as is when it cannot be mistaken for more than one value,
/// else as a JSON string. Claims such as `sub` and `client_id` come from the token, so
/// a space, quote or line break in one must not forge another field or another line.
fn text_value(out: &mut Vec<u8>, v: &str) {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"');
    if plain {
        out.extend_from_slice(v.as_bytes());
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, v);
    }
}

fn format_dropped(out: &mut Vec<u8>, now: u64, total: u64, format: LineFormat) {
    let timestamp = rfc3339(SystemTime::now());
    let message = "audit records dropped: the audit queue was full";
    match format {
        LineFormat::Json => {
            let line = serde_json::json!({
                "timestamp": timestamp, "level": "WARN", "message": message,
                "audit.dropped": now, "audit.dropped_total": total,
                "target": "smart_fhir_proxy::audit",
            });
            let _ = serde_json::to_writer(&mut *out, &line);
        }
        LineFormat::Text => {
            let _ = write!(
                out,
                "{timestamp}  WARN smart_fhir_proxy::audit: {message} audit.dropped={now} audit.dropped_total={total}"
            );
        }
    }
    out.push(b'\n');
}

/// `2026-12-04T03:56:28.123456Z`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that says when the writer thread opens it, then blocks until `gate`
    /// opens, so the queue fills.
    fn gated(
        out: Shared,
        gate: Arc<Mutex<()>>,
        opened: std::sync::mpsc::Sender<()>,
    ) -> Box<dyn Fn() -> Box<dyn Write> + Send> {
        let opened = Mutex::new(opened);
        Box::new(move || {
            let _ = opened.lock().unwrap().send(());
            drop(gate.lock().unwrap());
            Box::new(out.clone())
        })
    }

    fn finished(reason: &str) -> Finished {
        Finished {
            record: AuditRecord {
                tenant: Some("t1".into()),
                patient: Some("p1".into()),
                interaction: Some("read"),
                notes: vec!["entries.dropped=2".into()],
                ..AuditRecord::default()
            },
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_820_588_123_456),
            latency_ms: 1.5,
            status: 200,
            decision: "allow",
            reason: reason.into(),
        }
    }

    fn lines(out: &Shared) -> Vec<String> {
        String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn wait_for(out: &Shared, n: usize) -> Vec<String> {
        for _ in 0..500 {
            let l = lines(out);
            if l.len() >= n {
                return l;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        lines(out)
    }

    #[test]
    fn json_lines_have_the_audit_targets_shape() {
        let mut line = Vec::new();
        format_line(&mut line, &finished("record_allowed"), LineFormat::Json);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["target"], "audit");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "decision");
        assert_eq!(v["timestamp"], "2025-12-04T03:56:28.123456Z");
        assert_eq!(v["tenant.id"], "t1");
        assert_eq!(v["patient"], "p1");
        assert_eq!(v["client.id"], "-");
        assert_eq!(v["authz.decision"], "allow");
        assert_eq!(v["authz.reason"], "record_allowed");
        assert_eq!(v["http.status"], 200);
        assert_eq!(v["notes"], "entries.dropped=2");
        assert_eq!(v["latency_ms"], 1.5);
        assert!(line.ends_with(b"\n"));
        let mut text = Vec::new();
        format_line(&mut text, &finished("record_allowed"), LineFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with(
                "2025-12-04T03:56:28.123456Z  INFO audit: decision latency_ms=1.5 tenant.id=t1"
            ),
            "{text}"
        );
        assert!(text.contains(" http.status=200 "), "{text}");
    }

    #[test]
    fn text_lines_cannot_be_forged_by_claims() {
        let mut f = finished("record_allowed");
        f.record.subject = Some("x patient=p2\n2025-12-04T00:00:00Z  INFO audit: forged".into());
        f.record.client_id = Some("app\"\u{7}".into());
        let mut text = Vec::new();
        format_line(&mut text, &f, LineFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(text.contains(r#" subject="x patient=p2\n2025"#), "{text}");
        assert!(text.contains(r#" client.id="app\"\u0007""#), "{text}");
        assert!(text.contains(" patient=p1 "), "{text}");
    }

    #[test]
    fn recorded_requests_never_hold_a_token_parameter() {
        assert_eq!(request_text("/Patient/p1", None, None), "Patient/p1");
        assert_eq!(request_text("/Observation", Some(""), None), "Observation");
        // Pairs are kept as sent, in order; every spelling of `access_token` goes.
        assert_eq!(
            request_text(
                "/Observation",
                Some(
                    "code=a%7Cb&access_token=T1&access%5Ftoken=T2&ACCESS_TOKEN&x=1&access_token=T3"
                ),
                Some(b"access_token=T4&_count=2"),
            ),
            "Observation?code=a%7Cb&x=1\n\n_count=2"
        );
        assert_eq!(
            request_text("/Observation", Some("access_token=T"), None),
            "Observation?"
        );
        // Cut at the limit, on a character boundary.
        let long = format!("name={}", "\u{e9}".repeat(MAX_QUERY_BYTES));
        let text = request_text("/Patient", Some(&long), None);
        assert!(text.len() <= MAX_QUERY_BYTES && text.len() > MAX_QUERY_BYTES - 2);
        assert!(text.starts_with("Patient?name="));
    }

    #[test]
    fn request_ids_are_recorded_only_when_plausible() {
        let slot = AuditSlot::default();
        slot.set_request_id("bad id with spaces");
        slot.set_request_id(&"x".repeat(201));
        slot.set_request_id("");
        slot.with(|r| assert_eq!(r.request_id, None));
        slot.set_request_id("4a8dca3c-2205-4dc6");
        slot.with(|r| assert_eq!(r.request_id.as_deref(), Some("4a8dca3c-2205-4dc6")));
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
        let end = SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(end), "2099-12-31T23:59:59.000000Z");
    }

    #[test]
    fn queued_records_are_written_in_order() {
        let out = Shared::default();
        let o = out.clone();
        let sink = AuditSink::start(
            16,
            Overflow::FailClosed,
            LineFormat::Json,
            Box::new(move || Box::new(o.clone())),
        )
        .unwrap();
        for i in 0..10 {
            sink.send(Arc::new(finished(&format!("r{i}")))).unwrap();
        }
        let l = wait_for(&out, 10);
        let reasons: Vec<String> = l
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["authz.reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            reasons,
            (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_full_queue_fails_closed_or_counts_drops() {
        for overflow in [Overflow::FailClosed, Overflow::Drop] {
            let out = Shared::default();
            let gate = Arc::new(Mutex::new(()));
            let closed = gate.lock().unwrap();
            let (opened_tx, opened) = std::sync::mpsc::channel();
            let sink = AuditSink::start(
                2,
                overflow,
                LineFormat::Json,
                gated(out.clone(), Arc::clone(&gate), opened_tx),
            )
            .unwrap();
            // The writer takes one record and waits at the gate; two more fill the
            // queue; the rest overflow.
            let mut results = vec![sink.send(Arc::new(finished("r0"))).is_ok()];
            opened.recv().unwrap();
            results.extend((1..8).map(|i| sink.send(Arc::new(finished(&format!("r{i}")))).is_ok()));
            match overflow {
                Overflow::FailClosed => {
                    assert!(results[..3].iter().all(|ok| *ok), "{results:?}");
                    assert!(results[3..].iter().all(|ok| !ok), "{results:?}");
                }
                Overflow::Drop => assert!(results.iter().all(|ok| *ok)),
            }
            drop(closed);
            let l = wait_for(&out, 3);
            assert_eq!(
                l.len(),
                if overflow == Overflow::Drop { 4 } else { 3 },
                "{l:?}"
            );
            if overflow == Overflow::Drop {
                let warn: serde_json::Value = serde_json::from_str(&l[3]).unwrap();
                assert_eq!(warn["level"], "WARN");
                assert_eq!(warn["audit.dropped"], 5);
            }
        }
    }
}
