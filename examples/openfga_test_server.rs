//! Dev tool: an OpenFGA-API-compatible test server (test support, not a product
//! feature). In-memory stores answering OpenFGA's HTTP API (v1): stores, authorization
//! models, Write/Read, Check, BatchCheck, ListObjects and StreamedListObjects, with
//! OpenFGA's shapes and limits (1000 ListObjects results, 3 s deadline, 50 checks per
//! BatchCheck, 100 tuples per Write), plus fault injection (`POST /_control`). The
//! server itself is `tests/openfga/`; `tests/openfga_server.rs` proves it answers what
//! the real OpenFGA engine answers.
//!
//! ```sh
//! cargo run --example openfga_test_server -- --port 0 \
//!     --model fga-model/model.json --tuples fga-model/tuples.example.json
//! ```
//!
//! Listens on 127.0.0.1 only. When ready it prints, one per line:
//! `OPENFGA_API_URL=http://127.0.0.1:PORT`, and with `--model` also
//! `OPENFGA_STORE_ID=...` and `OPENFGA_AUTHORIZATION_MODEL_ID=...` of a store made from
//! the model (JSON, as `fga model transform` writes it) and the tuples (a JSON list of
//! `{"user", "relation", "object"}`). Stops on SIGINT or SIGTERM.
#![allow(clippy::print_stdout)]

#[path = "../tests/openfga/mod.rs"]
mod openfga;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use openfga::engine::TupleKey;
use openfga::server::{Control, Options, TestServer};

#[derive(Debug, Parser)]
#[command(about = "OpenFGA-API-compatible test server (dev tool, in memory, 127.0.0.1 only)")]
struct Args {
    /// Port on 127.0.0.1 (0: any free port; the address is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Create a store with this model (JSON form, e.g. fga-model/model.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tuples for that store (JSON list of {"user","relation","object"}).
    #[arg(long, requires = "model")]
    tuples: Option<PathBuf>,
    /// Name of that store.
    #[arg(long, default_value = "smart-fhir-proxy")]
    store_name: String,
    /// ListObjects stops silently after this many results (OpenFGA: listObjectsMaxResults).
    #[arg(long, default_value_t = 1000)]
    list_objects_max_results: usize,
    /// ListObjects stops silently after this time (OpenFGA: listObjectsDeadline).
    #[arg(long, default_value_t = 3000)]
    list_objects_deadline_ms: u64,
    /// OpenFGA: maxChecksPerBatchCheck.
    #[arg(long, default_value_t = 50)]
    max_checks_per_batch_check: usize,
    /// Fault injection: delay before every API answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fault injection: share of API requests (0..1) answered with 500 internal_error.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fault injection: time ListObjects spends per candidate object.
    #[arg(long, default_value_t = 0)]
    object_delay_ms: u64,
}

fn read_json(path: &PathBuf) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("`{}` is not JSON: {e}", path.display()))
}

fn read_tuples(path: &PathBuf) -> Result<Vec<TupleKey>, String> {
    #[derive(serde::Deserialize)]
    struct T {
        user: String,
        relation: String,
        object: String,
    }
    let list: Vec<T> = serde_json::from_value(read_json(path)?)
        .map_err(|e| format!("`{}` is not a list of tuples: {e}", path.display()))?;
    Ok(list
        .iter()
        .map(|t| TupleKey::new(&t.user, &t.relation, &t.object))
        .collect())
}

async fn run(args: Args) -> Result<(), String> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err("--fail-rate must be between 0 and 1".into());
    }
    let options = Options {
        list_objects_max_results: args.list_objects_max_results,
        list_objects_deadline: Duration::from_millis(args.list_objects_deadline_ms),
        max_checks_per_batch_check: args.max_checks_per_batch_check,
        control: Control {
            latency_ms: args.latency_ms,
            fail_rate: args.fail_rate,
            object_delay_ms: args.object_delay_ms,
            ..Control::default()
        },
        ..Options::default()
    };
    let server = TestServer::bind(SocketAddr::from(([127, 0, 0, 1], args.port)), options)
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", args.port))?;
    let mut out = format!("OPENFGA_API_URL={}\n", server.url());
    if let Some(model) = &args.model {
        let tuples = match &args.tuples {
            Some(p) => read_tuples(p)?,
            None => Vec::new(),
        };
        let (store, model_id) = server
            .preload(&args.store_name, &read_json(model)?, &tuples)
            .map_err(|e| format!("cannot load `{}`: {e}", model.display()))?;
        out.push_str(&format!(
            "OPENFGA_STORE_ID={store}\nOPENFGA_AUTHORIZATION_MODEL_ID={model_id}\n"
        ));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    drop(stdout);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openfga_test_server: {e}");
            ExitCode::from(64)
        }
    }
}
