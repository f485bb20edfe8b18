//! OperationOutcome: the one shape every proxy-made error takes on the wire.

use serde::Serialize;

/// A FHIR OperationOutcome with a single issue.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct OperationOutcome {
    resource_type: &'static str,
    issue: [Issue; 1],
}

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct Issue {
    severity: &'static str,
    code: &'static str,
    details: Details,
    diagnostics: String,
}

#[derive(Serialize, Debug, Clone)]
struct Details {
    coding: [Coding; 1],
    text: String,
}

#[derive(Serialize, Debug, Clone)]
struct Coding {
    system: &'static str,
    code: &'static str,
}

/// The code system of the proxy's stable reason ids.
pub const REASON_SYSTEM: &str = "urn:smart-fhir-proxy:reason";

impl OperationOutcome {
    /// `code` is a FHIR issue-type code (`security`, `forbidden`, `not-found`, ...),
    /// `reason` a stable proxy reason id, `text` a fixed client-safe message.
    pub fn error(code: &'static str, reason: &'static str, text: String) -> Self {
        OperationOutcome {
            resource_type: "OperationOutcome",
            issue: [Issue {
                severity: "error",
                code,
                details: Details {
                    coding: [Coding {
                        system: REASON_SYSTEM,
                        code: reason,
                    }],
                    text: text.clone(),
                },
                diagnostics: text,
            }],
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings cannot fail; fall back to a fixed body anyway
        // so the request path has no panic.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}"#
                .to_vec()
        })
    }
}
