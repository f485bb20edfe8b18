//! One structured audit record per request decision.
//!
//! The outermost layer puts an [`AuditSlot`] into the request; each stage fills in what
//! it proved (tenant, principal, interaction, patient); the outermost layer emits the
//! record once, with the decision and the stable reason id, on the `audit` tracing
//! target. Records name who, what, which patient and why; never a token, and no patient
//! data beyond ids.

use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// Extra facts a stage wants on record (e.g. dropped entries), as `key=value`.
    pub notes: Vec<String>,
}

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
    fn with(&self, f: impl FnOnce(&mut AuditRecord)) {
        // A poisoned lock only means another thread panicked mid-update; the record is
        // still worth emitting.
        let mut guard = match self.record.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard);
    }

    pub fn set_tenant(&self, tenant: &str) {
        self.with(|r| r.tenant = Some(tenant.to_owned()));
    }

    pub fn set_request(&self, req: &FhirRequest) {
        self.with(|r| {
            r.interaction = Some(req.interaction.name());
            r.resource_type = req.resource_type.map(|t| t.as_str());
            r.resource_id = req.id.as_ref().map(|i| i.as_str().to_owned());
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

    pub fn note(&self, note: String) {
        self.with(|r| r.notes.push(note));
    }

    /// Emits the record. `decision` is `allow` or `deny`; `reason` a stable id.
    pub fn emit(&self, status: u16, decision: &'static str, reason: &str) {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.with(|r| {
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
                authz.decision = decision,
                authz.reason = reason,
                http.status = status,
                notes = %r.notes.join(" "),
                "decision"
            );
        });
    }
}
