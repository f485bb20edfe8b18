//! A real OpenFGA server (`scripts/openfga-server.sh`: `openfga run`, memory datastore)
//! and stores created through its HTTP API, as an operator would create them.
//!
//! One server per test binary is shared ([`openfga`]); each test makes a store of its
//! own ([`OpenFgaServer::create_store`]), so tests do not see each other's tuples. Tests
//! that need other server flags (a pre-shared key, a short ListObjects deadline) start
//! one of their own ([`OpenFgaServer::start`]), which stops when dropped.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::{
    Background, read_pid, require_installed, run_start_script, scratch_dir, start_with_retries,
};

/// OpenFGA's default `--max-tuples-per-write`.
const TUPLES_PER_WRITE: usize = 100;

/// How to start an [`OpenFgaServer`].
#[derive(Debug, Clone, Default)]
pub struct OpenFgaOptions {
    /// Require this pre-shared key (`Authorization: Bearer KEY`).
    pub preshared_key: Option<String>,
    /// More `openfga run` flags, e.g. `["--listObjects-max-results", "100"]`.
    pub args: Vec<String>,
}

/// A running OpenFGA server.
#[derive(Debug)]
pub struct OpenFgaServer {
    url: String,
    key: Option<String>,
    dir: PathBuf,
    process: Background,
}

/// A store made by [`OpenFgaServer::create_store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FgaStore {
    pub api_url: String,
    pub store_id: String,
    pub model_id: String,
}

impl OpenFgaServer {
    /// Starts a server of its own on free ports; stops on drop.
    pub fn start(options: OpenFgaOptions) -> OpenFgaServer {
        require_installed();
        start_with_retries("OpenFGA", || {
            let dir = scratch_dir("openfga");
            let mut args = vec![
                "--port".to_owned(),
                "0".to_owned(),
                "--data-dir".to_owned(),
                dir.display().to_string(),
                "--parent-pid".to_owned(),
                std::process::id().to_string(),
            ];
            if let Some(key) = &options.preshared_key {
                args.extend(["--preshared-key".to_owned(), key.clone()]);
            }
            if !options.args.is_empty() {
                args.push("--".to_owned());
                args.extend(options.args.iter().cloned());
            }
            let (url, pgid) = run_start_script("openfga-server.sh", &args)?;
            let pid = read_pid(&dir.join("openfga.pid"));
            Ok(OpenFgaServer {
                url,
                key: options.preshared_key.clone(),
                dir,
                process: Background { pid, pgid },
            })
        })
    }

    /// HTTP API URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (as dropping it does).
    pub fn stop(&self) {
        self.process.stop();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("openfga.log")
    }

    /// Creates a store, writes `model` (OpenFGA's JSON form) and `tuples`
    /// (`{"user", "relation", "object"}` each) through the HTTP API. Blocking: it runs
    /// on a thread and runtime of its own, so it can be called from any test.
    pub fn create_store(&self, name: &str, model: &Value, tuples: &[Value]) -> FgaStore {
        let (url, key) = (self.url.clone(), self.key.clone());
        let (name, model, tuples) = (name.to_owned(), model.clone(), tuples.to_vec());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(create_store(url, key, name, model, tuples))
        })
        .join()
        .unwrap_or_else(|_| panic!("creating an OpenFGA store failed"))
    }

    /// Writes and deletes tuples in `store` (blocking, like [`Self::create_store`]).
    pub fn write(&self, store: &FgaStore, writes: &[Value], deletes: &[Value]) {
        let (key, store) = (self.key.clone(), store.clone());
        let (writes, deletes) = (writes.to_vec(), deletes.to_vec());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(write_tuples(&store, key.as_deref(), &writes, &deletes))
        })
        .join()
        .unwrap_or_else(|_| panic!("writing OpenFGA tuples failed"))
    }
}

impl Drop for OpenFgaServer {
    fn drop(&mut self) {
        self.process.stop();
    }
}

/// The OpenFGA server shared by the tests of this binary (no authentication).
pub fn openfga() -> &'static OpenFgaServer {
    static SERVER: OnceLock<OpenFgaServer> = OnceLock::new();
    SERVER.get_or_init(|| OpenFgaServer::start(OpenFgaOptions::default()))
}

/// `POST url` with an optional bearer key; panics unless OpenFGA answers 2xx.
pub async fn fga_post(url: &str, key: Option<&str>, body: &Value) -> Value {
    let mut request = super::http_client().post(url).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("OpenFGA at {url} unreachable: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "OpenFGA {url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn create_store(
    url: String,
    key: Option<String>,
    name: String,
    model: Value,
    tuples: Vec<Value>,
) -> FgaStore {
    let key = key.as_deref();
    let store = fga_post(&format!("{url}/stores"), key, &json!({ "name": name })).await;
    let store_id = store["id"].as_str().unwrap().to_owned();
    let written = fga_post(
        &format!("{url}/stores/{store_id}/authorization-models"),
        key,
        &model,
    )
    .await;
    let model_id = written["authorization_model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = FgaStore {
        api_url: url,
        store_id,
        model_id,
    };
    write_tuples(&store, key, &tuples, &[]).await;
    store
}

async fn write_tuples(store: &FgaStore, key: Option<&str>, writes: &[Value], deletes: &[Value]) {
    let url = format!("{}/stores/{}/write", store.api_url, store.store_id);
    for chunk in writes.chunks(TUPLES_PER_WRITE) {
        let body = json!({
            "writes": { "tuple_keys": chunk },
            "authorization_model_id": store.model_id,
        });
        fga_post(&url, key, &body).await;
    }
    for chunk in deletes.chunks(TUPLES_PER_WRITE) {
        let body = json!({
            "deletes": { "tuple_keys": chunk },
            "authorization_model_id": store.model_id,
        });
        fga_post(&url, key, &body).await;
    }
}
