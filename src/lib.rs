//! smart-fhir-proxy: a multi-tenant SMART-on-FHIR authorization reverse proxy.
//!
//! Request flow (one stage per module, ordered in [`stack`]):
//! `registry` (stage 0) -> `discovery` -> `token` -> `scope` -> `authz` -> `rewrite` ->
//! `forward`. Modules depend only downward: the shared model (`fhir`, `pipeline`, ...)
//! at the bottom, the stages above it in request order, the composition on top
//! (`docs/architecture.md`, checked by `scripts/check-layers.py`).

pub mod admin;
pub mod audit;
pub mod authz;
pub mod config;
pub mod cors;
pub mod cursor;
pub mod discovery;
pub mod error;
pub mod fetch;
pub mod fhir;
pub mod forward;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod pipeline;
pub mod registry;
pub mod rewrite;
pub mod scope;
pub mod seed;
pub mod server;
pub mod smart;
pub mod stack;
pub mod tenant;
pub mod tls;
pub mod token;
pub mod trace;
pub mod upstream;
