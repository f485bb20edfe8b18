//! End-to-end tests: the proxy binary against the real upstream FHIR server
//! (HAPI FHIR JPA server) and the real token issuer (oidc-provider), all on 127.0.0.1.
//! Data: `tests/fixtures/base-bundle.json` (see its README for ids and compartments).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod harness;
#[path = "../openfga/mod.rs"]
#[allow(dead_code)]
mod openfga;

mod adversarial;
mod audit_fhir;
mod bundles;
mod cases;
mod constraints;
mod cors;
mod discovery;
mod fga;
mod forwarding;
mod limits;
mod matching;
mod observability;
mod paging;
mod records;
mod scopes;
mod tls;
mod tokens;
mod udap;
mod writes;
