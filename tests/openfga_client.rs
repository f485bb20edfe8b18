#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The proxy's OpenFGA client (`src/authz/openfga.rs`) against a real OpenFGA server
//! (`support::fga_server`, memory datastore) with `fga-model/model.json` and a small
//! world: an organization tree (hospital > dept > ward-a, ward-b), a viewer team on
//! ward-a, an editor team on dept, 1,500 patients in ward-a, 10 in ward-b, an owner and
//! a care team.
//!
//! Answers, batching, caching, complete listing beyond ListObjects' 1,000 cap, the real
//! server's error codes and its pre-shared-key authentication. Faults the real server
//! cannot be made to produce on demand (a stall, a stream cut at the deadline, 5xx
//! answers) come from the OpenFGA-API-compatible test server (`tests/openfga/`), in
//! process: timeouts and the circuit breaker. Request counts, header and credential
//! handling are unit-tested next to the client (a recording fake server).

mod openfga;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use openfga::engine::TupleKey;
use openfga::server::{Control, Mode, Options, TestServer};
use serde_json::{Value, json};
use smart_fhir_proxy::authz::openfga::{DEFAULT_LIST_OBJECTS_DEADLINE, FgaError, OpenFgaClient};
use smart_fhir_proxy::config::{BreakerSettings, FgaConnection, FgaCredentials, Secret};

const WARD_A_PATIENTS: usize = 1500;
const WARD_B_PATIENTS: usize = 10;

fn model() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fga-model/model.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn a(i: usize) -> String {
    format!("patient:a{i}")
}

fn b(i: usize) -> String {
    format!("patient:b{i}")
}

fn tuples() -> Vec<TupleKey> {
    let mut t = vec![
        TupleKey::new("organization:hospital", "parent", "organization:dept"),
        TupleKey::new("organization:dept", "parent", "organization:ward-a"),
        TupleKey::new("organization:dept", "parent", "organization:ward-b"),
        TupleKey::new("user:alice", "member", "group:team-a"),
        TupleKey::new("group:team-a#member", "viewer", "organization:ward-a"),
        TupleKey::new("user:bob", "clinician", "group:team-b"),
        TupleKey::new("group:team-b#clinician", "editor", "organization:dept"),
        TupleKey::new("user:carol", "owner", &b(3)),
        TupleKey::new("user:dave", "member", "group:care-1"),
        TupleKey::new("group:care-1", "care_team", &b(5)),
    ];
    for i in 0..WARD_A_PATIENTS {
        t.push(TupleKey::new(
            "organization:ward-a",
            "assigned_organization",
            &a(i),
        ));
    }
    for i in 0..WARD_B_PATIENTS {
        t.push(TupleKey::new(
            "organization:ward-b",
            "assigned_organization",
            &b(i),
        ));
    }
    t
}

/// What the model says `can_view` is for this world.
fn expected_can_view(principal: &str, object: &str) -> bool {
    match principal {
        "user:alice" => object.starts_with("patient:a"),
        "user:bob" => true,
        "user:carol" => object == b(3),
        "user:dave" => object == b(5),
        _ => false,
    }
}

/// Where a [`World`] lives: a real OpenFGA server of its own, or the fault-injecting
/// test server.
enum Server {
    Real(support::OpenFgaServer),
    Test(TestServer),
}

struct World {
    server: Server,
    store_id: String,
    model_id: String,
    key: Option<String>,
}

impl World {
    /// The world on a real OpenFGA server of its own (so a test may stop it).
    async fn real() -> World {
        Self::real_with(support::OpenFgaOptions::default()).await
    }

    async fn real_with(options: support::OpenFgaOptions) -> World {
        let key = options.preshared_key.clone();
        let tuples: Vec<Value> = tuples().iter().map(TupleKey::to_json).collect();
        let (server, store) = tokio::task::spawn_blocking(move || {
            let server = support::OpenFgaServer::start(options);
            let store = server.create_store("proxy", &model(), &tuples);
            (server, store)
        })
        .await
        .unwrap();
        World {
            server: Server::Real(server),
            store_id: store.store_id,
            model_id: store.model_id,
            key,
        }
    }

    /// The world on the fault-injecting test server.
    async fn start(options: Options) -> World {
        let server = TestServer::start(options).await.unwrap();
        let (store_id, model_id) = server.preload("proxy", &model(), &tuples()).unwrap();
        World {
            server: Server::Test(server),
            store_id,
            model_id,
            key: None,
        }
    }

    fn url(&self) -> String {
        match &self.server {
            Server::Real(s) => s.url().to_owned(),
            Server::Test(s) => s.url(),
        }
    }

    /// Stops a real server: nothing answers at its address any more.
    fn stop_server(&mut self) {
        match &self.server {
            Server::Real(s) => s.stop(),
            Server::Test(_) => panic!("stop_server is for the real server"),
        }
    }

    /// Fault injection: only the test server has modes.
    fn set_mode(&self, mode: Mode) {
        match &self.server {
            Server::Test(s) => s.set_mode(mode),
            Server::Real(_) => panic!("the real OpenFGA server has no fault modes"),
        }
    }

    fn connection(&self) -> FgaConnection {
        FgaConnection {
            api_url: self.url().parse().unwrap(),
            store_id: self.store_id.clone(),
            authorization_model_id: self.model_id.clone(),
            credentials: match &self.key {
                Some(key) => FgaCredentials::ApiToken(Secret::new(key.clone())),
                None => FgaCredentials::None,
            },
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(60),
            breaker: BreakerSettings::default(),
            list_objects_deadline: DEFAULT_LIST_OBJECTS_DEADLINE,
            tls: None,
        }
    }

    fn client_with(&self, conn: FgaConnection) -> OpenFgaClient {
        OpenFgaClient::new(reqwest::Client::new(), conn).unwrap()
    }

    fn client(&self) -> OpenFgaClient {
        self.client_with(self.connection())
    }
}

fn sample_objects() -> Vec<String> {
    (0..5).map(a).chain((0..WARD_B_PATIENTS).map(b)).collect()
}

#[tokio::test]
async fn check_and_batch_check_match_the_model() {
    let world = World::real().await;
    let objects = sample_objects();
    for principal in [
        "user:alice",
        "user:bob",
        "user:carol",
        "user:dave",
        "user:eve",
    ] {
        let checks = world.client();
        let mut by_check = HashMap::new();
        for o in &objects {
            let allowed = checks.check(principal, "can_view", o).await.unwrap();
            assert_eq!(allowed, expected_can_view(principal, o), "{principal} {o}");
            by_check.insert(o.clone(), allowed);
        }
        let batched = world
            .client()
            .batch_check(principal, "can_view", &objects)
            .await
            .unwrap();
        assert_eq!(batched, by_check, "{principal}");
    }
    // can_write is narrower: bob (clinician, editor of dept) only
    let client = world.client();
    assert!(client.check("user:bob", "can_write", &b(5)).await.unwrap());
    assert!(!client.check("user:dave", "can_write", &b(5)).await.unwrap());
    assert!(
        !client
            .check("user:alice", "can_write", &a(0))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn batch_of_120_objects_is_answered_in_full() {
    // The server refuses more than 50 checks per BatchCheck, so a full answer means
    // the client split the batch (the unit tests count the calls: 50 + 50 + 20).
    let world = World::real().await;
    let objects: Vec<String> = (0..110).map(a).chain((0..WARD_B_PATIENTS).map(b)).collect();
    assert_eq!(objects.len(), 120);
    let answers = world
        .client()
        .batch_check("user:alice", "can_view", &objects)
        .await
        .unwrap();
    assert_eq!(answers.len(), 120);
    for o in &objects {
        assert_eq!(answers[o], expected_can_view("user:alice", o), "{o}");
    }
    assert!(
        world
            .client()
            .batch_check("user:alice", "can_view", &[])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn cached_answers_are_served_without_the_server() {
    let mut world = World::real().await;
    let client = world.client();
    let cached: Vec<String> = (0..60).map(a).chain([b(0)]).collect();
    let before = client
        .batch_check("user:alice", "can_view", &cached)
        .await
        .unwrap();
    assert!(client.check("user:carol", "can_view", &b(3)).await.unwrap());

    world.stop_server();
    assert_eq!(
        client
            .batch_check("user:alice", "can_view", &cached)
            .await
            .unwrap(),
        before
    );
    assert!(client.check("user:carol", "can_view", &b(3)).await.unwrap());
    assert!(client.check("user:alice", "can_view", &a(0)).await.unwrap());

    // uncached: fail closed, and one uncached object fails the whole batch
    let e = client
        .check("user:alice", "can_view", &a(100))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "fga_unavailable", "{e}");
    let mut mixed = cached.clone();
    mixed.push(a(101));
    let e = client
        .batch_check("user:alice", "can_view", &mixed)
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Unavailable { .. }), "{e}");
    // another principal is another cache key
    let e = client
        .check("user:bob", "can_view", &a(0))
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Unavailable { .. }), "{e}");
}

#[tokio::test]
async fn list_objects_complete_returns_all_1500_where_list_objects_stops_at_1000() {
    let world = World::real().await;
    // plain ListObjects: silently capped
    let capped: Value = reqwest::Client::new()
        .post(format!(
            "{}/stores/{}/list-objects",
            world.url(),
            world.store_id
        ))
        .json(&json!({
            "authorization_model_id": world.model_id,
            "type": "patient",
            "relation": "can_view",
            "user": "user:alice"
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(capped["objects"].as_array().unwrap().len(), 1000);

    let client = world.client();
    let mut all = client
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap();
    all.sort();
    let mut expected: Vec<String> = (0..WARD_A_PATIENTS).map(a).collect();
    expected.sort();
    assert_eq!(all, expected);

    let bob = client
        .list_objects_complete("user:bob", "can_view", "patient", 5000)
        .await
        .unwrap();
    assert_eq!(bob.len(), WARD_A_PATIENTS + WARD_B_PATIENTS);
    assert_eq!(
        client
            .list_objects_complete("user:carol", "can_view", "patient", 5000)
            .await
            .unwrap(),
        vec![b(3)]
    );
    assert!(
        client
            .list_objects_complete("user:eve", "can_view", "patient", 5000)
            .await
            .unwrap()
            .is_empty()
    );

    // more than allowed: an error, never a truncated list
    let e = client
        .list_objects_complete("user:alice", "can_view", "patient", WARD_A_PATIENTS - 1)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        FgaError::TooMany {
            max: WARD_A_PATIENTS - 1
        }
    );
    assert_eq!(e.reason(), "fga_too_many");
    assert!(!client.breaker_open());
}

#[tokio::test]
async fn stream_cut_by_the_real_servers_deadline_is_incomplete() {
    // OpenFGA ends a StreamedListObjects at its `listObjectsDeadline` without saying so
    // (with 5 ms it stopped after 500 of 3,000 objects, a clean end of stream): the
    // client, told the same deadline, cannot prove the list complete.
    let world = World::real_with(support::OpenFgaOptions {
        args: vec!["--listObjects-deadline".into(), "1ms".into()],
        ..Default::default()
    })
    .await;
    let mut conn = world.connection();
    conn.list_objects_deadline = Duration::from_millis(1);
    let e = world
        .client_with(conn)
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Incomplete { .. }), "{e}");
    assert_eq!(e.reason(), "fga_incomplete");
}

#[tokio::test]
async fn stream_cut_by_the_server_deadline_is_incomplete() {
    let world = World::start(Options {
        list_objects_deadline: Duration::from_millis(400),
        control: Control {
            object_delay_ms: 1,
            ..Control::default()
        },
        ..Options::default()
    })
    .await;
    let mut conn = world.connection();
    conn.list_objects_deadline = Duration::from_millis(400);
    let client = world.client_with(conn);
    let e = client
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Incomplete { .. }), "{e}");
    assert_eq!(e.reason(), "fga_incomplete");
}

#[tokio::test]
async fn rejected_requests_name_the_code() {
    let world = World::real().await;
    let client = world.client();
    let e = client
        .check("user:alice", "no_such_relation", &a(0))
        .await
        .unwrap_err();
    assert!(matches!(&e, FgaError::Rejected { status: 400, .. }), "{e}");
    assert_eq!(e.reason(), "fga_rejected");
    // StreamedListObjects errors come as a gRPC status through the gateway
    // (`{"error": {"code": 3, ..}}`), not as OpenFGA's named codes
    let e = client
        .list_objects_complete("user:alice", "can_view", "no_such_type", 10)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        FgaError::Rejected {
            status: 400,
            code: "invalid_argument".into()
        }
    );
    // an unknown store
    let mut conn = world.connection();
    conn.store_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV".into();
    let e = world
        .client_with(conn)
        .check("user:alice", "can_view", &a(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            FgaError::Rejected {
                status: 400 | 404,
                ..
            }
        ),
        "{e:?}"
    );

    // the pinned model id is always sent: an unknown one is refused, not replaced by
    // the latest model
    let mut conn = world.connection();
    conn.authorization_model_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV".into();
    let pinned = world.client_with(conn);
    let e = pinned
        .check("user:alice", "can_view", &a(0))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        FgaError::Rejected {
            status: 400,
            code: "authorization_model_not_found".into()
        }
    );
    let e = pinned
        .batch_check("user:alice", "can_view", &[a(0)])
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "fga_rejected");
    let e = pinned
        .list_objects_complete("user:alice", "can_view", "patient", 10)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "fga_rejected");
}

#[tokio::test]
async fn a_pre_shared_key_is_sent_and_a_wrong_one_is_refused() {
    const KEY: &str = "fga-client-test-key-8c1d";
    let world = World::real_with(support::OpenFgaOptions {
        preshared_key: Some(KEY.to_owned()),
        ..Default::default()
    })
    .await;
    let client = world.client();
    assert!(client.check("user:alice", "can_view", &a(0)).await.unwrap());
    assert_eq!(
        client
            .list_objects_complete("user:carol", "can_view", "patient", 10)
            .await
            .unwrap(),
        vec![b(3)]
    );
    for credentials in [
        FgaCredentials::None,
        FgaCredentials::ApiToken(Secret::new("not-the-key".into())),
    ] {
        let mut conn = world.connection();
        conn.credentials = credentials;
        let e = world
            .client_with(conn)
            .check("user:alice", "can_view", &a(0))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FgaError::Rejected { status: 401, .. }),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn stalled_server_is_unavailable_within_the_timeout() {
    let world = World::start(Options::default()).await;
    let mut conn = world.connection();
    conn.timeout = Duration::from_millis(300);
    let client = world.client_with(conn);
    world.set_mode(Mode::Stall);

    let e = client
        .check("user:alice", "can_view", &a(0))
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Unavailable { .. }), "{e}");
    let e = client
        .batch_check("user:alice", "can_view", &sample_objects())
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Unavailable { .. }), "{e}");
    let e = client
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap_err();
    assert!(matches!(e, FgaError::Unavailable { .. }), "{e}");
    // (Each of these ended by the client's timeout, not by an answer.)
    world.set_mode(Mode::Ok);
}

#[tokio::test]
async fn slow_stream_is_bounded_by_the_timeout() {
    // results keep coming, but the whole list must arrive within the timeout
    let world = World::start(Options {
        control: Control {
            object_delay_ms: 1,
            ..Control::default()
        },
        ..Options::default()
    })
    .await;
    let mut conn = world.connection();
    conn.timeout = Duration::from_millis(300);
    let client = world.client_with(conn);
    let e = client
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, FgaError::Unavailable { detail } if detail == "timeout"),
        "{e:?}"
    );
}

#[tokio::test]
async fn repeated_failures_open_the_breaker_and_it_closes_after_the_cool_down() {
    let world = World::start(Options::default()).await;
    let mut conn = world.connection();
    conn.timeout = Duration::from_millis(200);
    conn.breaker = BreakerSettings {
        failure_threshold: 3,
        cool_down: Duration::from_millis(600),
    };
    let client = world.client_with(conn);
    assert!(client.check("user:alice", "can_view", &a(0)).await.unwrap());

    // a stalled server: each call waits for the timeout
    world.set_mode(Mode::Stall);
    for i in 1..=3 {
        let e = client
            .check("user:alice", "can_view", &a(i))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FgaError::Unavailable { detail } if detail == "timeout"),
            "{e:?}"
        );
    }
    assert!(client.breaker_open());

    // open: calls fail at once, without waiting for the stalled server
    for i in 4..10 {
        let e = client
            .check("user:alice", "can_view", &a(i))
            .await
            .unwrap_err();
        assert!(is_open_circuit(&e), "call reached the server: {e:?}");
    }
    let e = client
        .list_objects_complete("user:alice", "can_view", "patient", 5000)
        .await
        .unwrap_err();
    assert!(is_open_circuit(&e), "{e:?}");

    // healthy again, but still within the cool-down: still failing fast
    world.set_mode(Mode::Ok);
    let e = client
        .check("user:alice", "can_view", &a(20))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "fga_unavailable");

    // after the cool-down one trial goes through and closes the breaker
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert!(
        client
            .check("user:alice", "can_view", &a(20))
            .await
            .unwrap()
    );
    assert!(!client.breaker_open());
    let answers = client
        .batch_check("user:alice", "can_view", &sample_objects())
        .await
        .unwrap();
    assert_eq!(answers.len(), sample_objects().len());

    // 5xx answers count as failures too; a failed trial reopens it
    world.set_mode(Mode::Error);
    for i in 30..33 {
        let e = client
            .check("user:alice", "can_view", &a(i))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "fga_unavailable");
    }
    assert!(client.breaker_open());
    tokio::time::sleep(Duration::from_millis(650)).await;
    let e = client
        .check("user:alice", "can_view", &a(40))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "fga_unavailable");
    assert!(client.breaker_open());
    world.set_mode(Mode::Ok);
    let e = client
        .check("user:alice", "can_view", &a(41))
        .await
        .unwrap_err();
    assert!(is_open_circuit(&e), "{e:?}");
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert!(
        client
            .check("user:alice", "can_view", &a(41))
            .await
            .unwrap()
    );
}

/// The call was refused by the open circuit breaker, without reaching the server.
fn is_open_circuit(e: &FgaError) -> bool {
    matches!(e, FgaError::Unavailable { detail } if detail == "circuit breaker open")
}
