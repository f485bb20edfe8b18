#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The OpenFGA test server (`tests/openfga/`, also `examples/openfga_test_server.rs`)
//! against the real OpenFGA engine, and its API shapes and limits.
//!
//! - `store_tests_of_the_model_pass_on_the_test_server`: every `check` and
//!   `list_objects` assertion of `fga-model/model.fga.yaml` (what `fga model test`
//!   verifies with the real engine in CI), asked through the test server's HTTP API.
//! - `official_cli_as_client_passes_the_store_tests`: `fga model test` in remote mode,
//!   i.e. the official Go SDK, runs those store tests against the test server.
//! - `differential_*`: the test server answers the full product users x relations x
//!   objects (Check) and users x types x relations (ListObjects) over a world of tuples;
//!   its answers become a store-test file that the real engine (`fga model test`) must
//!   pass in full. Worlds: the store tests' own tuples and seeded random tuple sets, for
//!   the project's model and for `tests/openfga/features.fga` (intersection, exclusion,
//!   wildcards, nested usersets, cycles). A copy with a few answers flipped must fail,
//!   by exactly that many assertions, so the differential cannot pass vacuously.
//! - the rest: OpenFGA's shapes, error codes and limits, and fault injection.
//!
//! Needs `.stack/venv` from `scripts/install.sh` (the `fga` CLI and PyYAML).

mod openfga;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use openfga::server::{Control, Mode, Options, TestServer};

// ---------------------------------------------------------------------------------------
// tools from the stack

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    std::env::var_os("SMART_FHIR_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".stack"))
        .join("venv/bin")
        .join(name)
}

fn fga_cli() -> PathBuf {
    let fga = venv_bin("fga");
    assert!(
        fga.exists(),
        "the OpenFGA CLI is not installed (`{}` missing): run scripts/install.sh",
        fga.display()
    );
    fga
}

/// A YAML file as JSON, through the venv's Python and PyYAML (no YAML crate here).
fn load_yaml(path: &Path) -> Value {
    let python = venv_bin("python");
    assert!(
        python.exists(),
        "the stack's Python is not installed (`{}` missing): run scripts/install.sh",
        python.display()
    );
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "cannot read `{}` with PyYAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("yaml as json")
}

/// `fga model transform` of a DSL file: the model JSON both engines are given.
fn model_json(dsl: &Path) -> Value {
    let out = Command::new(fga_cli())
        .args(["model", "transform", "--output-format", "json", "--file"])
        .arg(dsl)
        .output()
        .expect("run fga model transform");
    assert!(
        out.status.success(),
        "fga model transform {}: {}",
        dsl.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("model json")
}

/// What `fga model test` said: exit status and its summary counts.
#[derive(Debug)]
struct FgaRun {
    ok: bool,
    output: String,
    /// (passing, total)
    checks: (usize, usize),
    list_objects: (usize, usize),
}

fn summary_count(output: &str, label: &str) -> (usize, usize) {
    output
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(label)?.trim();
            let (pass, rest) = rest.split_once('/')?;
            let total = rest.split_whitespace().next()?;
            Some((pass.parse().ok()?, total.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

async fn fga_model_test(tests: &Path, extra: &[&str]) -> FgaRun {
    let mut cmd = Command::new(fga_cli());
    cmd.args(["model", "test", "--tests"])
        .arg(tests)
        .args(extra);
    // blocking: the remote mode talks to the in-process server on another worker
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run fga model test"))
        .await
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    FgaRun {
        ok: out.status.success(),
        checks: summary_count(&output, "Checks "),
        list_objects: summary_count(&output, "ListObjects "),
        output,
    }
}

// ---------------------------------------------------------------------------------------
// a client of the test server

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Tuple {
    user: String,
    relation: String,
    object: String,
}

fn t(user: &str, relation: &str, object: &str) -> Tuple {
    Tuple {
        user: user.into(),
        relation: relation.into(),
        object: object.into(),
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &TestServer) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: server.url(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// A new store with the model; returns (store id, model id).
    async fn store(&self, name: &str, model: &Value) -> (String, String) {
        let (status, body) = self.post("/stores", json!({"name": name})).await;
        assert_eq!(status, 201, "{body}");
        let store = body["id"].as_str().unwrap().to_owned();
        let (status, body) = self
            .post(
                &format!("/stores/{store}/authorization-models"),
                model.clone(),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            store,
            body["authorization_model_id"].as_str().unwrap().to_owned(),
        )
    }

    async fn write(&self, store: &str, tuples: &[Tuple]) {
        for chunk in tuples.chunks(100) {
            let (status, body) = self
                .post(
                    &format!("/stores/{store}/write"),
                    json!({"writes": {"tuple_keys": chunk}}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }

    async fn check(&self, store: &str, user: &str, relation: &str, object: &str) -> bool {
        let (status, body) = self
            .post(
                &format!("/stores/{store}/check"),
                json!({"tuple_key": {"user": user, "relation": relation, "object": object}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["allowed"].as_bool().unwrap()
    }

    /// Check through BatchCheck, 50 at a time.
    async fn check_all(&self, store: &str, model: &str, queries: &[Tuple]) -> Vec<bool> {
        let mut out = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(50) {
            let checks: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, q)| json!({"tuple_key": q, "correlation_id": format!("c{i}")}))
                .collect();
            let (status, body) = self
                .post(
                    &format!("/stores/{store}/batch-check"),
                    json!({"authorization_model_id": model, "checks": checks}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            for i in 0..chunk.len() {
                let r = &body["result"][format!("c{i}")];
                out.push(r["allowed"].as_bool().unwrap_or_else(|| panic!("{r}")));
            }
        }
        out
    }

    async fn list_objects(
        &self,
        store: &str,
        type_name: &str,
        relation: &str,
        user: &str,
    ) -> Vec<String> {
        let (status, body) = self
            .post(
                &format!("/stores/{store}/list-objects"),
                json!({"type": type_name, "relation": relation, "user": user}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let mut objects: Vec<String> = serde_json::from_value(body["objects"].clone()).unwrap();
        objects.sort();
        objects
    }
}

async fn start() -> (TestServer, Api) {
    start_with(Options::default()).await
}

async fn start_with(options: Options) -> (TestServer, Api) {
    let server = TestServer::start(options).await.expect("start test server");
    let api = Api::new(&server);
    (server, api)
}

// ---------------------------------------------------------------------------------------
// the store tests of fga-model/

fn fga_model_dir() -> PathBuf {
    repo_root().join("fga-model")
}

/// One test of a store-test file: its name and all its tuples (global, own, tuple_file).
struct StoreTest {
    name: String,
    tuples: Vec<Tuple>,
    spec: Value,
}

fn store_tests(yaml: &Value, dir: &Path) -> Vec<StoreTest> {
    let parse = |v: &Value| -> Vec<Tuple> { serde_json::from_value(v.clone()).unwrap_or_default() };
    let global = parse(&yaml["tuples"]);
    yaml["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|test| {
            let mut tuples = global.clone();
            tuples.extend(parse(&test["tuples"]));
            if let Some(file) = test["tuple_file"].as_str() {
                let text = std::fs::read_to_string(dir.join(file)).unwrap();
                tuples.extend(serde_json::from_str::<Vec<Tuple>>(&text).unwrap());
            }
            StoreTest {
                name: test["name"].as_str().unwrap().to_owned(),
                tuples,
                spec: test.clone(),
            }
        })
        .collect()
}

#[tokio::test]
async fn store_tests_of_the_model_pass_on_the_test_server() {
    let dir = fga_model_dir();
    let yaml = load_yaml(&dir.join("model.fga.yaml"));
    assert_eq!(yaml["model_file"], "./model.fga");
    // model.json is what `fga model transform` makes of model.fga (fga-model/check.sh)
    let model: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    let (_server, api) = start().await;
    let (mut checks, mut lists) = (0, 0);
    for test in store_tests(&yaml, &dir) {
        let (store, _) = api.store("store-test", &model).await;
        api.write(&store, &test.tuples).await;
        for c in test.spec["check"].as_array().into_iter().flatten() {
            let (user, object) = (c["user"].as_str().unwrap(), c["object"].as_str().unwrap());
            for (relation, expected) in c["assertions"].as_object().unwrap() {
                let got = api.check(&store, user, relation, object).await;
                assert_eq!(
                    Some(got),
                    expected.as_bool(),
                    "{}: Check({user}, {relation}, {object})",
                    test.name
                );
                checks += 1;
            }
        }
        for l in test.spec["list_objects"].as_array().into_iter().flatten() {
            let (user, type_name) = (l["user"].as_str().unwrap(), l["type"].as_str().unwrap());
            for (relation, expected) in l["assertions"].as_object().unwrap() {
                let got = api.list_objects(&store, type_name, relation, user).await;
                let mut expected: Vec<String> = serde_json::from_value(expected.clone()).unwrap();
                expected.sort();
                assert_eq!(
                    got, expected,
                    "{}: ListObjects({user}, {relation}, {type_name})",
                    test.name
                );
                lists += 1;
            }
        }
    }
    // the same assertions the real engine runs on the file (its ListUsers aside)
    let real = fga_model_test(&dir.join("model.fga.yaml"), &[]).await;
    assert!(real.ok, "{}", real.output);
    assert_eq!(
        (checks, lists),
        (real.checks.1, real.list_objects.1),
        "{}",
        real.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_cli_as_client_passes_the_store_tests() {
    // `fga model test` without a model in the file runs against a server: the official
    // Go SDK sends Check and ListObjects with the tuples as contextual tuples.
    let dir = fga_model_dir();
    let mut yaml = load_yaml(&dir.join("model.fga.yaml"));
    let model: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    let (server, api) = start().await;
    let (store, model_id) = api.store("remote", &model).await;
    let doc = yaml.as_object_mut().unwrap();
    doc.remove("model_file");
    for test in doc["tests"].as_array_mut().unwrap() {
        let test = test.as_object_mut().unwrap();
        if let Some(file) = test.remove("tuple_file") {
            let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap();
            test.insert("tuples".into(), serde_json::from_str(&text).unwrap());
        }
        test.remove("list_users"); // ListUsers is not implemented by the test server
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("remote.fga.yaml");
    std::fs::write(&file, serde_json::to_string(&yaml).unwrap()).unwrap();
    let url = server.url();
    let run = fga_model_test(
        &file,
        &[
            "--api-url",
            &url,
            "--store-id",
            &store,
            "--model-id",
            &model_id,
        ],
    )
    .await;
    assert!(run.ok, "{}", run.output);
    assert!(
        run.checks.1 > 100 && run.list_objects.1 > 50,
        "{}",
        run.output
    );
    assert_eq!(run.checks.0, run.checks.1, "{}", run.output);
    assert_eq!(run.list_objects.0, run.list_objects.1, "{}", run.output);
}

// ---------------------------------------------------------------------------------------
// the differential test

/// The seed of the random worlds: fixed, or `OPENFGA_DIFFERENTIAL_SEED` to explore others.
fn seed(fixed: u64) -> u64 {
    std::env::var("OPENFGA_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(fixed, |s| fixed ^ s.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A deterministic generator (SplitMix64) for the random worlds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// An allowed user type of a relation: `(type, userset relation, wildcard)`.
type Restriction = (String, Option<String>, bool);

/// What a model says about its types, read from its JSON form.
struct Schema {
    /// type -> its relations
    relations: BTreeMap<String, Vec<String>>,
    /// (type, relation, its allowed user types) of every assignable relation
    assignable: Vec<(String, String, Vec<Restriction>)>,
}

impl Schema {
    fn of(model: &Value) -> Schema {
        let mut relations = BTreeMap::new();
        let mut assignable = Vec::new();
        for td in model["type_definitions"].as_array().unwrap() {
            let type_name = td["type"].as_str().unwrap().to_owned();
            let rels: Vec<String> = td["relations"]
                .as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            for rel in &rels {
                let refs = td["metadata"]["relations"][rel]["directly_related_user_types"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !refs.is_empty() {
                    let refs = refs
                        .iter()
                        .map(|r| {
                            (
                                r["type"].as_str().unwrap().to_owned(),
                                r["relation"].as_str().map(str::to_owned),
                                r.get("wildcard").is_some(),
                            )
                        })
                        .collect();
                    assignable.push((type_name.clone(), rel.clone(), refs));
                }
            }
            relations.insert(type_name, rels);
        }
        Schema {
            relations,
            assignable,
        }
    }

    /// `count` distinct random tuples the model allows, over `pool` ids per type.
    fn random_tuples(&self, rng: &mut Rng, count: usize, pool: usize) -> Vec<Tuple> {
        let mut out = BTreeSet::new();
        let mut attempts = 0;
        while out.len() < count && attempts < count * 20 {
            attempts += 1;
            let (type_name, rel, refs) = &self.assignable[rng.below(self.assignable.len())];
            let (ut, ur, wildcard) = &refs[rng.below(refs.len())];
            let object = format!("{type_name}:r{}", rng.below(pool));
            let user = match (ur, wildcard) {
                (_, true) => format!("{ut}:*"),
                (Some(ur), _) => format!("{ut}:r{}#{ur}", rng.below(pool)),
                (None, _) => format!("{ut}:r{}", rng.below(pool)),
            };
            if user == format!("{object}#{rel}") {
                continue; // implicit: OpenFGA refuses to store it
            }
            out.insert(t(&user, rel, &object));
        }
        out.into_iter().collect()
    }

    /// The universe of a world: every object of every type that appears in its tuples
    /// plus one unrelated object per type; as users also the usersets and wildcards
    /// the model's type restrictions name.
    fn universe(&self, tuples: &[Tuple]) -> (Vec<String>, Vec<String>) {
        let mut objects: BTreeSet<String> = self
            .relations
            .keys()
            .map(|t| format!("{t}:nobody"))
            .collect();
        for tu in tuples {
            objects.insert(tu.object.clone());
            let user_object = tu.user.split('#').next().unwrap();
            if !user_object.ends_with(":*") {
                objects.insert(user_object.to_owned());
            }
        }
        let mut users: BTreeSet<String> = objects.clone();
        for (_, _, refs) in &self.assignable {
            for (ut, ur, wildcard) in refs {
                if *wildcard {
                    users.insert(format!("{ut}:*"));
                }
                if let Some(ur) = ur {
                    for o in objects.iter().filter(|o| o.starts_with(&format!("{ut}:"))) {
                        users.insert(format!("{o}#{ur}"));
                    }
                }
            }
        }
        (objects.into_iter().collect(), users.into_iter().collect())
    }
}

struct World {
    name: String,
    tuples: Vec<Tuple>,
}

fn dedup(tuples: Vec<Tuple>) -> Vec<Tuple> {
    tuples
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The generated store-test file, its size, and how often each relation was true.
struct Differential {
    doc: Value,
    checks: usize,
    list_objects: usize,
    /// `type#relation` -> (allowed, denied) over all worlds
    outcomes: BTreeMap<String, (usize, usize)>,
}

/// Asks the test server the full product over each world and writes the answers as
/// one store test per world.
async fn differential(api: &Api, model: &Value, worlds: &[World]) -> Differential {
    let schema = Schema::of(model);
    let (mut n_checks, mut n_lists) = (0, 0);
    let mut outcomes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut tests = Vec::new();
    for world in worlds {
        let (store, model_id) = api.store("differential", model).await;
        api.write(&store, &world.tuples).await;
        let (objects, users) = schema.universe(&world.tuples);
        let type_of = |o: &str| o.split(':').next().unwrap().to_owned();
        let mut queries = Vec::new();
        for object in &objects {
            for user in &users {
                for rel in &schema.relations[&type_of(object)] {
                    queries.push(t(user, rel, object));
                }
            }
        }
        let answers = api.check_all(&store, &model_id, &queries).await;
        let mut by_pair: BTreeMap<(String, String), serde_json::Map<String, Value>> =
            BTreeMap::new();
        for (q, allowed) in queries.iter().zip(answers) {
            let counts = outcomes
                .entry(format!("{}#{}", type_of(&q.object), q.relation))
                .or_default();
            if allowed {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
            by_pair
                .entry((q.user.clone(), q.object.clone()))
                .or_default()
                .insert(q.relation.clone(), json!(allowed));
        }
        n_checks += queries.len();
        let check: Vec<Value> = by_pair
            .into_iter()
            .map(|((user, object), assertions)| json!({"user": user, "object": object, "assertions": assertions}))
            .collect();
        let mut list_objects = Vec::new();
        for user in &users {
            for (type_name, rels) in schema.relations.iter().filter(|(_, r)| !r.is_empty()) {
                let mut assertions = serde_json::Map::new();
                for rel in rels {
                    let got = api.list_objects(&store, type_name, rel, user).await;
                    assertions.insert(rel.clone(), json!(got));
                    n_lists += 1;
                }
                list_objects
                    .push(json!({"user": user, "type": type_name, "assertions": assertions}));
            }
        }
        tests.push(json!({
            "name": world.name,
            "tuples": world.tuples,
            "check": check,
            "list_objects": list_objects,
        }));
    }
    Differential {
        doc: json!({
            "name": "the OpenFGA test server's answers",
            "model_file": "./model.fga",
            "tuples": [],
            "tests": tests,
        }),
        checks: n_checks,
        list_objects: n_lists,
        outcomes,
    }
}

/// Where the generated files go: a temporary directory, or a new directory under
/// `OPENFGA_DIFFERENTIAL_DIR` (kept, to look at what the real engine was given).
fn output_dir() -> tempfile::TempDir {
    match std::env::var_os("OPENFGA_DIFFERENTIAL_DIR") {
        Some(dir) => {
            std::fs::create_dir_all(&dir).unwrap();
            let mut kept = tempfile::Builder::new()
                .prefix("differential-")
                .tempdir_in(dir)
                .unwrap();
            kept.disable_cleanup(true);
            kept
        }
        None => tempfile::tempdir().unwrap(),
    }
}

/// Runs the real engine on a generated file next to a copy of the DSL model.
async fn run_real_engine(dir: &Path, dsl: &Path, doc: &Value, file: &str) -> FgaRun {
    std::fs::copy(dsl, dir.join("model.fga")).unwrap();
    let path = dir.join(file);
    // JSON is YAML: the file is written as JSON
    std::fs::write(&path, serde_json::to_string(doc).unwrap()).unwrap();
    fga_model_test(&path, &[]).await
}

/// The same file with four wrong answers in its first world: one allowed and one denied
/// check flipped, one object left out of a ListObjects answer and put into an empty one.
fn with_wrong_answers(doc: &Value) -> Value {
    let mut doc = doc.clone();
    let test = &mut doc["tests"][0];
    let mut flipped = (false, false);
    for c in test["check"].as_array_mut().unwrap() {
        for (_, v) in c["assertions"].as_object_mut().unwrap() {
            let b = v.as_bool().unwrap();
            if (b && !flipped.0) || (!b && !flipped.1) {
                *v = json!(!b);
                if b {
                    flipped.0 = true;
                } else {
                    flipped.1 = true;
                }
            }
        }
    }
    assert_eq!(flipped, (true, true), "a world needs both answers");
    let mut answers: Vec<&mut Vec<Value>> = test["list_objects"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .flat_map(|l| l["assertions"].as_object_mut().unwrap().values_mut())
        .map(|v| v.as_array_mut().unwrap())
        .collect();
    let full = answers.iter().position(|a| !a.is_empty()).unwrap();
    let missing = answers[full].pop().unwrap();
    let empty = answers.iter().position(|a| a.is_empty()).unwrap();
    answers[empty].push(missing);
    doc
}

/// The real engine on a copy with wrong answers must fail exactly those.
async fn assert_wrong_answers_fail(dir: &Path, dsl: &Path, diff: &Differential) {
    let wrong = with_wrong_answers(&diff.doc);
    let run = run_real_engine(dir, dsl, &wrong, "wrong.fga.yaml").await;
    assert!(!run.ok, "wrong answers passed:\n{}", run.output);
    assert_eq!(run.checks, (diff.checks - 2, diff.checks), "{}", run.output);
    assert_eq!(
        run.list_objects,
        (diff.list_objects - 2, diff.list_objects),
        "{}",
        run.output
    );
}

fn assert_real_engine_agrees(run: &FgaRun, diff: &Differential) {
    // not vacuous: every relation is both granted and denied somewhere
    for (relation, (allowed, denied)) in &diff.outcomes {
        assert!(
            *allowed > 0 && *denied > 0,
            "`{relation}` is never {}: the worlds do not exercise it",
            if *allowed == 0 { "allowed" } else { "denied" }
        );
    }
    assert!(
        run.ok,
        "the real engine disagrees with the test server:\n{}",
        run.output
    );
    assert_eq!(run.checks, (diff.checks, diff.checks), "{}", run.output);
    assert_eq!(
        run.list_objects,
        (diff.list_objects, diff.list_objects),
        "{}",
        run.output
    );
    let allowed: usize = diff.outcomes.values().map(|o| o.0).sum();
    eprintln!(
        "the real engine agrees on {} checks ({allowed} allowed) and {} list-objects answers",
        diff.checks, diff.list_objects
    );
}

#[tokio::test]
async fn differential_project_model_against_the_real_engine() {
    let dir = fga_model_dir();
    let dsl = dir.join("model.fga");
    let model = model_json(&dsl);
    let yaml = load_yaml(&dir.join("model.fga.yaml"));
    let mut worlds: Vec<World> = store_tests(&yaml, &dir)
        .into_iter()
        .map(|s| World {
            name: format!("store test: {}", s.name),
            tuples: s.tuples,
        })
        .collect();
    let schema = Schema::of(&model);
    let mut rng = Rng(seed(0x5eed_0ffa_2026));
    for i in 0..3 {
        worlds.push(World {
            name: format!("random world {i}"),
            tuples: schema.random_tuples(&mut rng, 45, 4),
        });
    }
    // an organization cycle r0 -> r1 -> r2 -> r0, with grants and patients on it
    let mut cyclic = schema.random_tuples(&mut rng, 30, 4);
    cyclic.extend([
        t("organization:r1", "parent", "organization:r0"),
        t("organization:r2", "parent", "organization:r1"),
        t("organization:r0", "parent", "organization:r2"),
        t("group:r0#member", "viewer", "organization:r1"),
        t("user:r0", "member", "group:r0"),
        t("system:r1", "editor", "organization:r0"),
        t("organization:r2", "assigned_organization", "patient:r0"),
    ]);
    worlds.push(World {
        name: "an organization cycle".into(),
        tuples: dedup(cyclic),
    });
    let (_server, api) = start().await;
    let started = Instant::now();
    let diff = differential(&api, &model, &worlds).await;
    let asked = started.elapsed();
    let tmp = output_dir();
    let run = run_real_engine(tmp.path(), &dsl, &diff.doc, "differential.fga.yaml").await;
    eprintln!(
        "test server answered in {asked:?}, the real engine checked in {:?}",
        started.elapsed() - asked
    );
    assert_real_engine_agrees(&run, &diff);

    // the converse: wrong answers fail, exactly as many as were made wrong
    assert_wrong_answers_fail(tmp.path(), &dsl, &diff).await;
}

#[tokio::test]
async fn differential_feature_model_against_the_real_engine() {
    // intersection, exclusion, typed wildcards, nested and recursive usersets, a
    // tupleset whose types do not all define the computed relation, cycles
    let dsl = repo_root().join("tests/openfga/features.fga");
    let model = model_json(&dsl);
    let schema = Schema::of(&model);
    let mut rng = Rng(seed(0x0fea_7e5d));
    let mut worlds: Vec<World> = (0..5)
        .map(|i| World {
            name: format!("random world {i}"),
            tuples: schema.random_tuples(&mut rng, 30 + 5 * i, 4),
        })
        .collect();
    // nested teams r0 -> r1 -> r2 -> r0 and folders r0 -> r1 -> r2 -> r0, around a
    // document with an exclusion
    let mut cyclic = schema.random_tuples(&mut rng, 25, 4);
    cyclic.extend([
        t("team:r0#member", "member", "team:r1"),
        t("team:r1#member", "member", "team:r2"),
        t("team:r2#member", "member", "team:r0"),
        t("user:r0", "member", "team:r2"),
        t("user:r1", "admin", "team:r0"),
        t("folder:r1", "parent", "folder:r0"),
        t("folder:r2", "parent", "folder:r1"),
        t("folder:r0", "parent", "folder:r2"),
        t("team:r1#member", "viewer", "folder:r2"),
        t("folder:r1", "container", "document:r0"),
        t("team:r0", "container", "document:r0"),
        t("user:r1", "blocked", "document:r0"),
        t("user:r0", "auditor", "document:r0"),
    ]);
    worlds.push(World {
        name: "cycles of teams and folders".into(),
        tuples: dedup(cyclic),
    });
    let (_server, api) = start().await;
    let started = Instant::now();
    let diff = differential(&api, &model, &worlds).await;
    let asked = started.elapsed();
    let tmp = output_dir();
    let run = run_real_engine(tmp.path(), &dsl, &diff.doc, "differential.fga.yaml").await;
    eprintln!(
        "test server answered in {asked:?}, the real engine checked in {:?}",
        started.elapsed() - asked
    );
    assert_real_engine_agrees(&run, &diff);
    assert_wrong_answers_fail(tmp.path(), &dsl, &diff).await;
}

// ---------------------------------------------------------------------------------------
// API shapes, errors and limits

fn project_model() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fga_model_dir().join("model.json")).unwrap())
        .unwrap()
}

#[tokio::test]
async fn batch_check_answers_by_correlation_id_and_refuses_more_than_50() {
    let (_server, api) = start().await;
    let (store, model) = api.store("batch", &project_model()).await;
    api.write(&store, &[t("user:alice", "owner", "patient:alice")])
        .await;
    let path = format!("/stores/{store}/batch-check");
    let (status, body) = api
        .post(
            &path,
            json!({"authorization_model_id": model, "checks": [
                {"tuple_key": {"user": "user:alice", "relation": "can_view", "object": "patient:alice"}, "correlation_id": "yes"},
                {"tuple_key": {"user": "user:bob", "relation": "can_view", "object": "patient:alice"}, "correlation_id": "no"},
                {"tuple_key": {"user": "user:alice", "relation": "nonsense", "object": "patient:alice"}, "correlation_id": "bad"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["yes"], json!({"allowed": true}));
    assert_eq!(body["result"]["no"], json!({"allowed": false}));
    assert_eq!(
        body["result"]["bad"]["error"],
        json!({"input_error": "validation_error", "message": "relation 'patient#nonsense' not found"})
    );

    let checks = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"tuple_key": {"user": "user:alice", "relation": "owner", "object": format!("patient:p{i}")}, "correlation_id": format!("id-{i}")}))
            .collect()
    };
    let (status, body) = api.post(&path, json!({"checks": checks(50)})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"].as_object().unwrap().len(), 50);
    let (status, body) = api.post(&path, json!({"checks": checks(51)})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"code": "validation_error", "message": "batchCheck received 51 checks, the maximum allowed is 50 "})
    );
    let mut dup = checks(2);
    dup[1]["correlation_id"] = json!("id-0");
    let (status, body) = api.post(&path, json!({"checks": dup})).await;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("validation_error")),
        "{body}"
    );
    let (status, body) = api.post(&path, json!({"checks": []})).await;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("validation_error")),
        "{body}"
    );
}

fn many_patients(n: usize) -> Vec<Tuple> {
    (0..n)
        .map(|i| t("user:many", "owner", &format!("patient:p{i:04}")))
        .collect()
}

#[tokio::test]
async fn list_objects_stops_at_1000_results_and_the_stream_returns_all() {
    let (server, api) = start().await;
    let (store, _) = api.store("many", &project_model()).await;
    api.write(&store, &many_patients(1500)).await;
    let all: BTreeSet<String> = many_patients(1500).into_iter().map(|t| t.object).collect();

    let (status, body) = api
        .post(
            &format!("/stores/{store}/list-objects"),
            json!({"type": "patient", "relation": "can_view", "user": "user:many"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // the whole answer: no flag, no token says it was cut
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["objects"]
    );
    let objects: Vec<String> = serde_json::from_value(body["objects"].clone()).unwrap();
    let distinct: BTreeSet<String> = objects.iter().cloned().collect();
    assert_eq!(objects.len(), 1000);
    assert_eq!(distinct.len(), 1000);
    assert!(distinct.is_subset(&all));

    let res = reqwest::Client::new()
        .post(format!(
            "{}/stores/{store}/streamed-list-objects",
            server.url()
        ))
        .json(&json!({"type": "patient", "relation": "can_view", "user": "user:many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let streamed: BTreeSet<String> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 1, "{l}");
            v["result"]["object"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text.lines().count(), 1500);
    assert_eq!(streamed, all);
}

#[tokio::test]
async fn list_objects_stops_at_the_deadline_without_saying_so() {
    let deadline = Duration::from_millis(400);
    let (server, api) = start_with(Options {
        list_objects_deadline: deadline,
        control: Control {
            object_delay_ms: 2,
            ..Control::default()
        },
        ..Options::default()
    })
    .await;
    let (store, _) = api.store("slow", &project_model()).await;
    api.write(&store, &many_patients(600)).await;
    let request = json!({"type": "patient", "relation": "owner", "user": "user:many"});

    let started = Instant::now();
    let (status, body) = api
        .post(&format!("/stores/{store}/list-objects"), request.clone())
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let n = body["objects"].as_array().unwrap().len();
    assert!(n > 0 && n < 600, "{n} objects");
    assert!(took >= deadline && took < deadline * 3, "took {took:?}");

    let started = Instant::now();
    let res = reqwest::Client::new()
        .post(format!(
            "{}/stores/{store}/streamed-list-objects",
            server.url()
        ))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let took = started.elapsed();
    let n = text.lines().count();
    assert!(n > 0 && n < 600, "{n} objects");
    assert!(
        text.lines().all(|l| l.starts_with(r#"{"result":"#)),
        "{text}"
    );
    assert!(took >= deadline && took < deadline * 3, "took {took:?}");

    // without the slow datastore everything arrives in time
    server.set_control(Control::default());
    let (_, body) = api
        .post(&format!("/stores/{store}/list-objects"), request)
        .await;
    assert_eq!(body["objects"].as_array().unwrap().len(), 600);
}

#[tokio::test]
async fn writes_and_deletes_take_effect_and_bad_writes_are_refused() {
    let (_server, api) = start().await;
    let (store, _) = api.store("writes", &project_model()).await;
    let path = format!("/stores/{store}/write");
    assert!(
        !api.check(&store, "user:dr", "can_write", "patient:p1")
            .await
    );
    api.write(
        &store,
        &[
            t("user:dr", "clinician", "group:team"),
            t("group:team", "care_team", "patient:p1"),
        ],
    )
    .await;
    assert!(
        api.check(&store, "user:dr", "can_write", "patient:p1")
            .await
    );
    assert_eq!(
        api.list_objects(&store, "patient", "can_view", "user:dr")
            .await,
        ["patient:p1"]
    );

    let (status, body) = api
        .post(
            &path,
            json!({"deletes": {"tuple_keys": [{"user": "user:dr", "relation": "clinician", "object": "group:team"}]}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({}));
    assert!(
        !api.check(&store, "user:dr", "can_write", "patient:p1")
            .await
    );
    assert!(
        api.list_objects(&store, "patient", "can_view", "user:dr")
            .await
            .is_empty()
    );

    let refused = |status: u16, body: &Value, code: &str| {
        assert_eq!((status, body["code"].as_str()), (400, Some(code)), "{body}");
        assert!(body["message"].is_string(), "{body}");
    };
    let one = |user: &str, relation: &str, object: &str| json!([{"user": user, "relation": relation, "object": object}]);
    let (s, b) = api
        .post(
            &path,
            json!({"writes": {"tuple_keys": one("group:team", "care_team", "patient:p1")}}),
        )
        .await;
    refused(s, &b, "write_failed_due_to_invalid_input");
    let (s, b) = api
        .post(&path, json!({"writes": {"tuple_keys": one("group:team", "care_team", "patient:p1"), "on_duplicate": "ignore"}}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api
        .post(
            &path,
            json!({"deletes": {"tuple_keys": one("user:nobody", "owner", "patient:p1")}}),
        )
        .await;
    refused(s, &b, "write_failed_due_to_invalid_input");
    // type restrictions: `owner` takes users, not systems
    let (s, b) = api
        .post(
            &path,
            json!({"writes": {"tuple_keys": one("system:app", "owner", "patient:p1")}}),
        )
        .await;
    refused(s, &b, "validation_error");
    assert_eq!(
        b["message"],
        "Invalid tuple 'patient:p1#owner@system:app'. Reason: type 'system' is not an allowed type restriction for 'patient#owner'"
    );
    let (s, b) = api
        .post(
            &path,
            json!({"writes": {"tuple_keys": one("user:a", "nonsense", "patient:p1")}}),
        )
        .await;
    refused(s, &b, "validation_error");
    assert_eq!(
        b["message"],
        "Invalid tuple 'patient:p1#nonsense@user:a'. Reason: relation 'patient#nonsense' not found"
    );
    // a tuple that says what the model says anyway is refused, as by OpenFGA
    let nested_groups = json!({"schema_version": "1.1", "type_definitions": [
        {"type": "user"},
        {"type": "group", "relations": {"member": {"this": {}}}, "metadata": {"relations": {"member": {
            "directly_related_user_types": [{"type": "user"}, {"type": "group", "relation": "member"}]
        }}}},
    ]});
    let (groups, _) = api.store("nested-groups", &nested_groups).await;
    let (s, b) = api
        .post(
            &format!("/stores/{groups}/write"),
            json!({"writes": {"tuple_keys": one("group:g#member", "member", "group:g")}}),
        )
        .await;
    refused(s, &b, "validation_error");
    assert_eq!(
        b["message"],
        "Invalid tuple 'group:g#member@group:g#member'. Reason: cannot write a tuple that is implicit"
    );
    let (s, b) = api.post(&path, json!({})).await;
    refused(s, &b, "invalid_write_input");
    let too_many: Vec<Tuple> = many_patients(101);
    let (s, b) = api
        .post(&path, json!({"writes": {"tuple_keys": too_many}}))
        .await;
    refused(s, &b, "exceeded_entity_limit");
    let twice = json!([{"user": "user:a", "relation": "owner", "object": "patient:x"}, {"user": "user:a", "relation": "owner", "object": "patient:x"}]);
    let (s, b) = api
        .post(&path, json!({"writes": {"tuple_keys": twice}}))
        .await;
    refused(s, &b, "cannot_allow_duplicate_tuples_in_one_request");
    // a refused request changes nothing
    let mixed = json!([{"user": "user:a", "relation": "owner", "object": "patient:y"}, {"user": "system:b", "relation": "owner", "object": "patient:y"}]);
    let (s, _) = api
        .post(&path, json!({"writes": {"tuple_keys": mixed}}))
        .await;
    assert_eq!(s, 400);
    assert!(!api.check(&store, "user:a", "owner", "patient:y").await);
}

#[tokio::test]
async fn models_are_read_back_and_contextual_tuples_count() {
    let (_server, api) = start().await;
    let model = project_model();
    let (store, model_id) = api.store("models", &model).await;
    let (status, body) = api
        .get(&format!("/stores/{store}/authorization-models/{model_id}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let read = &body["authorization_model"];
    assert_eq!(read["id"], json!(model_id));
    assert_eq!(read["schema_version"], "1.1");
    assert_eq!(read["type_definitions"], model["type_definitions"]);

    let (status, body) = api
        .post(
            &format!("/stores/{store}/check"),
            json!({
                "authorization_model_id": model_id,
                "tuple_key": {"user": "user:rp", "relation": "can_view", "object": "patient:p1"},
                "contextual_tuples": {"tuple_keys": [
                    {"user": "user:rp", "relation": "authorized_representative", "object": "patient:p1"}
                ]},
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"allowed": true, "resolution": ""}));
    assert!(!api.check(&store, "user:rp", "can_view", "patient:p1").await);
}

#[tokio::test]
async fn unknown_stores_models_and_relations_get_openfga_errors() {
    let (_server, api) = start().await;
    let (store, _) = api.store("errors", &project_model()).await;
    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let check =
        json!({"tuple_key": {"user": "user:a", "relation": "owner", "object": "patient:p1"}});
    let expect = |(status, body): (u16, Value), want_status: u16, want: Value| {
        assert_eq!((status, body), (want_status, want));
    };
    expect(
        api.post(&format!("/stores/{unknown}/check"), check.clone())
            .await,
        400,
        json!({"code": "latest_authorization_model_not_found", "message": format!("No authorization models found for store '{unknown}'")}),
    );
    let mut with_model = check.clone();
    with_model["authorization_model_id"] = json!(unknown);
    expect(
        api.post(&format!("/stores/{store}/check"), with_model)
            .await,
        400,
        json!({"code": "authorization_model_not_found", "message": format!("Authorization Model '{unknown}' not found")}),
    );
    expect(
        api.get(&format!("/stores/{store}/authorization-models/{unknown}"))
            .await,
        400,
        json!({"code": "authorization_model_not_found", "message": format!("Authorization Model '{unknown}' not found")}),
    );
    expect(
        api.get(&format!("/stores/{unknown}")).await,
        404,
        json!({"code": "store_id_not_found", "message": "Store ID not found"}),
    );
    let (status, body) = api.post("/stores/not-a-store/check", check.clone()).await;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("validation_error")),
        "{body}"
    );
    expect(
        api.post(
            &format!("/stores/{store}/check"),
            json!({"tuple_key": {"user": "user:a", "relation": "nonsense", "object": "patient:p1"}}),
        )
        .await,
        400,
        json!({"code": "validation_error", "message": "relation 'patient#nonsense' not found"}),
    );
    expect(
        api.post(
            &format!("/stores/{store}/check"),
            json!({"tuple_key": {"user": "robot:a", "relation": "owner", "object": "patient:p1"}}),
        )
        .await,
        400,
        json!({"code": "validation_error", "message": "type 'robot' not found"}),
    );
    expect(
        api.post(
            &format!("/stores/{store}/list-objects"),
            json!({"type": "robot", "relation": "owner", "user": "user:a"}),
        )
        .await,
        400,
        json!({"code": "type_not_found", "message": "type 'robot' not found"}),
    );
    expect(
        api.post(
            &format!("/stores/{store}/list-objects"),
            json!({"type": "patient", "relation": "nonsense", "user": "user:a"}),
        )
        .await,
        400,
        json!({"code": "relation_not_found", "message": "relation 'patient#nonsense' not found"}),
    );
    let (status, body) = api
        .post(
            &format!("/stores/{store}/authorization-models"),
            json!({"schema_version": "1.1", "type_definitions": [{"type": "doc", "relations": {"viewer": {"computedUserset": {"relation": "missing"}}}}]}),
        )
        .await;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("invalid_authorization_model")),
        "{body}"
    );
    expect(
        api.get("/nowhere").await,
        404,
        json!({"code": "undefined_endpoint", "message": "Not Found"}),
    );
}

#[tokio::test]
async fn faults_are_injected_on_demand() {
    let (server, api) = start().await;
    let (store, _) = api.store("faults", &project_model()).await;
    let path = format!("/stores/{store}/check");
    let check =
        json!({"tuple_key": {"user": "user:a", "relation": "owner", "object": "patient:p1"}});

    let (status, body) = api.post("/_control", json!({"mode": "error"})).await;
    assert_eq!((status, &body["mode"]), (200, &json!("error")), "{body}");
    assert_eq!(
        api.post(&path, check.clone()).await,
        (
            500,
            json!({"code": "internal_error", "message": "Internal Server Error"})
        )
    );
    assert_eq!(api.get("/healthz").await.0, 200, "health is not affected");

    api.post("/_control", json!({"mode": "stall"})).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let stalled = client
        .post(format!("{}{path}", server.url()))
        .json(&check)
        .send()
        .await;
    assert!(stalled.is_err_and(|e| e.is_timeout()));
    // a stalled request is released when the mode changes
    let waiting = tokio::spawn({
        let url = format!("{}{path}", server.url());
        let check = check.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&check)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    server.set_mode(Mode::Ok);
    assert_eq!(waiting.await.unwrap(), 200);

    api.post("/_control", json!({"latency_ms": 200})).await;
    let started = Instant::now();
    assert_eq!(api.post(&path, check.clone()).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));

    let (_, body) = api
        .post("/_control", json!({"latency_ms": 0, "fail_rate": 0.5}))
        .await;
    assert_eq!(body["fail_rate"], 0.5);
    let mut statuses = BTreeMap::new();
    for _ in 0..60 {
        *statuses
            .entry(api.post(&path, check.clone()).await.0)
            .or_insert(0) += 1;
    }
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200, 500],
        "{statuses:?}"
    );
    let (status, _) = api.post("/_control", json!({"fail_rate": 2.0})).await;
    assert_eq!(status, 400);
    let (status, _) = api.post("/_control", json!({"bogus": 1})).await;
    assert_eq!(status, 400);
}
