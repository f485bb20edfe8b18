//! An OpenFGA-API-compatible test server: in-memory stores answering Check, BatchCheck,
//! ListObjects, StreamedListObjects, Write and ReadAuthorizationModel with OpenFGA's
//! request and response shapes, error shapes and limits, and fault injection.
//!
//! Test support, not a product feature. Used in process by the integration tests
//! (`mod openfga;` from a file in `tests/`, or `#[path = "../openfga/mod.rs"]` from a
//! test directory) and as a stand-alone dev tool by `examples/openfga_test_server.rs`.
//! `tests/openfga_server.rs` proves it answers exactly what the real OpenFGA engine
//! (`fga model test`) answers on the same model, tuples and queries.
//!
//! - `engine`: models, tuples, validation, and the Check / ListObjects evaluator;
//! - `server`: the HTTP API ([`server::TestServer`]).

pub mod engine;
pub mod server;
