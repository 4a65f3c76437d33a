//! Documents over HTTP against the real binary: reading and writing from a backend while real
//! yrs clients are connected, deleting, versions, and every refusal's status (webhooks:
//! `webhooks.rs`).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use yrs::sync::{Message, SyncMessage};
use yrs::types::xml::{XmlElementPrelim, XmlFragment, XmlTextPrelim};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Array, Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, TransactionMut, Update,
    WriteTxn,
};

const SECRET: &str = "integration-test-secret-0123456789abcdef";
const ADMIN: &str = "admin-key-for-the-api-tests";

/// An HTTP answer with its raw body (binary endpoints) and lower-cased headers.
struct Res {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Res {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Res {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {path}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Res {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn get(server: &Server, path: &str) -> Res {
    call(server.addr, "GET", path, &[], b"")
}

fn post(server: &Server, path: &str, body: &[u8]) -> Res {
    call(server.addr, "POST", path, &[], body)
}

/// An update made by a backend with its own yrs document.
fn backend_update(f: impl FnOnce(&mut TransactionMut)) -> Vec<u8> {
    let doc = Doc::new();
    let mut txn = doc.transact_mut();
    f(&mut txn);
    txn.encode_update_v1()
}

/// Edits a connected client's document and sends the update, as a Yjs binding does.
fn edit(c: &Client, f: impl FnOnce(&mut TransactionMut)) {
    let mut txn = c.doc.transact_mut();
    f(&mut txn);
    let update = txn.encode_update_v1();
    drop(txn);
    c.send_raw(Message::Sync(SyncMessage::Update(update)).encode_v1());
}

fn text_of(doc: &Doc, name: &str) -> String {
    let t = doc.get_or_insert_text(name);
    t.get_string(&doc.transact())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(doc: &str, perm: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"doc": doc, "perm": perm, "exp": now_secs() + 600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_backend_update_reaches_clients_and_survives_kill_9() {
    // Slow flushes: a 200 sent before the flush would lose the update to the kill every time.
    let mut server = Server::start(&["--debug-flush-delay-ms", "300"]);
    let client = synced_client(&server.url("backend")).await;
    let update = backend_update(|txn| {
        let text = txn.get_or_insert_text("t");
        text.insert(txn, 0, "from the backend");
    });
    let res = post(&server, "/api/docs/backend/update", &update);
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json(), json!({"changed": true}));
    server.kill9();
    // It was sent to the client before the 200.
    client.wait_text("from the backend").await;
    server.restart();
    let after = synced_client(&server.url("backend")).await;
    assert_eq!(after.text(), "from the backend");
    // The same update again changes nothing.
    let res = post(&server, "/api/docs/backend/update", &update);
    assert_eq!(res.json(), json!({"changed": false}));
}

#[tokio::test]
async fn get_renders_every_root_type_edited_by_clients() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("rich")).await;
    let b = synced_client(&server.url("rich")).await;
    edit(&a, |txn| {
        let text = txn.get_or_insert_text("body");
        text.insert(txn, 0, "Hello, world");
        let map = txn.get_or_insert_map("meta");
        map.insert(txn, "title", "Notes");
        map.insert(txn, "count", 3);
    });
    edit(&b, |txn| {
        let list = txn.get_or_insert_array("tags");
        list.insert_range(txn, 0, ["a", "b"]);
        let xml = txn.get_or_insert_xml_fragment("prosemirror");
        let p = xml.push_back(txn, XmlElementPrelim::empty("paragraph"));
        p.push_back(txn, XmlTextPrelim::new("rich"));
    });
    a.wait_for("b's edit", |c| c.doc.transact().root_refs().count() == 4)
        .await;
    let res = get(&server, "/api/docs/rich");
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["content-type"], "application/json");
    assert_eq!(
        res.json(),
        json!({
            "body": "Hello, world",
            "meta": {"title": "Notes", "count": 3},
            "tags": ["a", "b"],
            "prosemirror": "<paragraph>rich</paragraph>",
        })
    );
}

#[tokio::test]
async fn an_sv_diff_applies_cleanly_on_a_client_holding_that_state() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("diff")).await;
    a.insert(0, "first part");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    // A backend that keeps its own copy, up to date so far.
    let full = get(&server, "/api/docs/diff/update");
    assert_eq!(full.status, 200);
    assert_eq!(full.headers["content-type"], "application/octet-stream");
    let copy = Doc::new();
    copy.transact_mut()
        .apply_update(Update::decode_v1(&full.body).unwrap())
        .unwrap();
    assert_eq!(text_of(&copy, "t"), "first part");

    a.insert(10, ", second part");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 2)
        .await;
    let sv = copy.transact().state_vector().encode_v1();
    // Standard base64 with its `+` and `/` percent-encoded, as a careful client sends it.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&sv);
    let encoded: String = form_urlencoded_byte_serialize(&b64);
    let diff = get(&server, &format!("/api/docs/diff/update?sv={encoded}"));
    assert_eq!(diff.status, 200);
    assert!(
        diff.body.len() < full.body.len() + 13,
        "the diff is not the whole state"
    );
    copy.transact_mut()
        .apply_update(Update::decode_v1(&diff.body).unwrap())
        .unwrap();
    assert_eq!(text_of(&copy, "t"), "first part, second part");
    assert!(!copy.transact().has_missing_updates());
    // Base64url is accepted too; an up-to-date copy gets an empty update.
    let sv = copy.transact().state_vector().encode_v1();
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sv);
    let none = get(&server, &format!("/api/docs/diff/update?sv={b64url}"));
    let update = Update::decode_v1(&none.body).unwrap();
    assert_eq!(update.state_vector(), StateVector::default());
}

fn form_urlencoded_byte_serialize(s: &str) -> String {
    s.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

#[tokio::test]
async fn delete_closes_clients_with_4404_and_a_later_connection_starts_empty() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("doomed")).await;
    let b = synced_client(&server.url("doomed")).await;
    a.insert(0, "soon gone");
    b.wait_text("soon gone").await;
    let v = post(&server, "/api/docs/doomed/versions", br#"{"label": "x"}"#);
    assert_eq!(v.status, 201);

    let res = call(server.addr, "DELETE", "/api/docs/doomed", &[], b"");
    assert_eq!(res.status, 204);
    assert_eq!(a.wait_closed().await, Some(4404));
    assert_eq!(b.wait_closed().await, Some(4404));
    assert_eq!(get(&server, "/api/docs/doomed").status, 404);
    assert_eq!(get(&server, "/api/docs/doomed/versions").status, 404);
    assert_eq!(
        call(server.addr, "DELETE", "/api/docs/doomed", &[], b"").status,
        404
    );
    let c = synced_client(&server.url("doomed")).await;
    assert_eq!(c.text(), "");
    // A write after the delete starts a new document, with versions numbered from 1 again.
    c.insert(0, "fresh");
    c.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    let v = post(&server, "/api/docs/doomed/versions", br#"{"label": "y"}"#);
    assert_eq!(v.json()["id"], 1);
}

#[tokio::test]
async fn joins_racing_a_delete_never_see_the_old_content() {
    // Slow flushes keep the delete waiting for the flush in flight while clients join.
    let server = Server::start(&["--debug-flush-delay-ms", "200"]);
    let writer = synced_client(&server.url("race")).await;
    writer.insert(0, "old content");
    writer
        .wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    writer.insert(0, "more ");
    let addr = server.addr;
    let delete =
        tokio::task::spawn_blocking(move || call(addr, "DELETE", "/api/docs/race", &[], b""));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut joiners = Vec::new();
    for _ in 0..5 {
        joiners.push(Client::connect(&server.url("race")).await);
    }
    assert_eq!(delete.await.unwrap().status, 204);
    for j in &joiners {
        // Either joined after the delete (empty) or was closed by it (4404): never the old text.
        let s = wait_until(WAIT, || j.seen.lock().unwrap().synced || j.is_closed()).await;
        assert!(s, "joiner neither synced nor closed");
        if !j.is_closed() {
            assert_eq!(j.text(), "");
        } else {
            assert_eq!(j.seen.lock().unwrap().close_code, Some(4404));
        }
    }
    assert_eq!(get(&server, "/api/docs/race").status, 404);
}

#[tokio::test]
async fn versions_list_fetch_restore_and_survive_a_restart() {
    let mut server = Server::start(&["--compact-after-updates", "2"]);
    let a = synced_client(&server.url("history")).await;
    let watcher = synced_client(&server.url("history")).await;
    edit(&a, |txn| {
        let t = txn.get_or_insert_text("t");
        t.insert(txn, 0, "draft one");
        txn.get_or_insert_map("m").insert(txn, "k", "v1");
    });
    watcher.wait_text("draft one").await;
    let v1 = post(
        &server,
        "/api/docs/history/versions",
        br#"{"label": "first"}"#,
    );
    assert_eq!(v1.status, 201);
    let v1 = v1.json();
    assert_eq!(
        (v1["id"].as_u64(), v1["label"].as_str()),
        (Some(1), Some("first"))
    );
    assert!(v1["size"].as_u64().unwrap() > 0 && v1["time"].is_string());

    edit(&a, |txn| {
        let t = txn.get_or_insert_text("t");
        t.remove_range(txn, 0, 5);
        t.insert(txn, 0, "final");
        txn.get_or_insert_map("m").insert(txn, "k", "v2");
    });
    a.insert(0, ">> ");
    watcher.wait_text(">> final one").await;
    assert_eq!(
        post(
            &server,
            "/api/docs/history/versions",
            br#"{"label": "second"}"#
        )
        .status,
        201
    );

    let list = get(&server, "/api/docs/history/versions").json();
    let labels: Vec<&str> = list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, vec!["first", "second"]);
    assert_eq!(
        get(&server, "/api/docs/history/versions/1").json(),
        json!({"m": {"k": "v1"}, "t": "draft one"})
    );
    let binary = call(
        server.addr,
        "GET",
        "/api/docs/history/versions/1",
        &[("Accept", "application/octet-stream")],
        b"",
    );
    assert_eq!(binary.headers["content-type"], "application/octet-stream");
    let old = Doc::new();
    old.transact_mut()
        .apply_update(Update::decode_v1(&binary.body).unwrap())
        .unwrap();
    assert_eq!(text_of(&old, "t"), "draft one");

    let restored = post(&server, "/api/docs/history/versions/1/restore", b"");
    assert_eq!(restored.status, 200);
    assert_eq!(restored.json(), json!({"restored": 1, "changed": true}));
    // Every connected client receives the restore as an ordinary update.
    watcher.wait_text("draft one").await;
    a.wait_text("draft one").await;
    assert_eq!(
        get(&server, "/api/docs/history").json(),
        json!({"m": {"k": "v1"}, "t": "draft one"})
    );

    server.terminate();
    server.restart();
    let list = get(&server, "/api/docs/history/versions").json();
    assert_eq!(list["versions"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&server, "/api/docs/history/versions/2").json(),
        json!({"m": {"k": "v2"}, "t": ">> final one"})
    );
    assert_eq!(
        get(&server, "/api/docs/history").json(),
        json!({"m": {"k": "v1"}, "t": "draft one"})
    );
    let c = synced_client(&server.url("history")).await;
    assert_eq!(c.text(), "draft one");
}

#[tokio::test]
async fn automatic_versions_follow_activity() {
    let server = Server::start(&["--auto-version-secs", "1"]);
    let a = synced_client(&server.url("auto")).await;
    a.insert(0, "typing");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    let found = wait_until(WAIT, || {
        let list = get(&server, "/api/docs/auto/versions").json();
        list["versions"].as_array().is_some_and(|v| !v.is_empty())
    })
    .await;
    assert!(found, "no automatic version after 1 s of activity");
    let list = get(&server, "/api/docs/auto/versions").json();
    assert_eq!(list["versions"][0]["label"], "auto");
    assert_eq!(
        get(&server, "/api/docs/auto/versions/1").json(),
        json!({"t": "typing"})
    );
    // No activity, no further versions.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list = get(&server, "/api/docs/auto/versions").json();
    assert_eq!(list["versions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn names_are_the_websocket_path_and_one_api_segment() {
    let server = Server::start(&[]);
    // `new WebsocketProvider(url, 'my doc')` connects to /my%20doc: the name is `my%20doc`.
    let spaced = synced_client(&server.url("my%20doc")).await;
    spaced.insert(0, "spaced");
    let nested = synced_client(&server.url("team/a")).await;
    nested.insert(0, "nested");
    for c in [&spaced, &nested] {
        c.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
            .await;
    }
    assert_eq!(
        get(&server, "/api/docs/my%2520doc").json(),
        json!({"t": "spaced"})
    );
    assert_eq!(
        get(&server, "/api/docs/team%2Fa").json(),
        json!({"t": "nested"})
    );
    assert_eq!(get(&server, "/api/docs/team/a").status, 404);
    let list = get(&server, "/api/docs?prefix=team").json();
    assert_eq!(list["docs"].as_array().unwrap().len(), 1);
    assert_eq!(list["docs"][0]["name"], "team/a");
    assert_eq!(list["docs"][0]["updates"], 1);
    // Paging: one name per page, each page naming the next.
    let first = get(&server, "/api/docs?limit=1").json();
    assert_eq!(first["docs"][0]["name"], "my%20doc");
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = get(&server, &format!("/api/docs?limit=1&cursor={cursor}")).json();
    assert_eq!(second["docs"][0]["name"], "team/a");
    assert_eq!(second["next_cursor"], Value::Null);
}

/// Method, path, headers, body, expected status.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, &'a [u8], u16);

#[tokio::test]
async fn refusals_have_their_statuses_and_change_nothing() {
    let server = Server::start(&[
        "--auth-secret",
        SECRET,
        "--admin-key",
        ADMIN,
        "--max-message-size",
        "4096",
    ]);
    let admin = format!("Bearer {ADMIN}");
    let rw = format!("Bearer {}", token("guarded", "read-write"));
    let ro = format!("Bearer {}", token("guarded", "read-only"));
    let other = format!("Bearer {}", token("elsewhere", "read-write"));
    let auth = |h: &str| vec![("Authorization", h.to_owned())];
    let req = |method: &str, path: &str, hdr: &[(&str, String)], body: &[u8]| {
        let h: Vec<(&str, &str)> = hdr.iter().map(|(k, v)| (*k, v.as_str())).collect();
        call(server.addr, method, path, &h, body)
    };
    let good = backend_update(|txn| {
        let text = txn.get_or_insert_text("t");
        text.insert(txn, 0, "ok")
    });
    let writer = Client::connect(&format!(
        "{}?token={}",
        server.url("guarded"),
        token("guarded", "read-write")
    ))
    .await;
    writer.wait_synced().await;

    // Credentials are checked before anything else (even the document's existence).
    let cases: Vec<Case> = vec![
        ("GET", "/api/docs/guarded", vec![], b"", 401),
        (
            "GET",
            "/api/docs/guarded",
            auth("Bearer not-a-token"),
            b"",
            401,
        ),
        ("GET", "/api/docs/guarded", auth(&other), b"", 403),
        ("POST", "/api/docs/guarded/update", auth(&ro), &good, 403),
        ("DELETE", "/api/docs/guarded", auth(&ro), b"", 403),
        ("POST", "/api/docs/guarded/versions", auth(&ro), b"{}", 403),
        (
            "POST",
            "/api/docs/guarded/versions/1/restore",
            auth(&ro),
            b"",
            403,
        ),
        ("GET", "/api/docs", auth(&rw), b"", 401),
        ("GET", "/api/docs", vec![], b"", 401),
        ("GET", "/api/docs/guarded", auth(&ro), b"", 404),
    ];
    for (method, path, hdr, body, status) in cases {
        let res = req(method, path, &hdr, body);
        assert_eq!(res.status, status, "{method} {path} with {hdr:?}");
        assert!(res.json()["error"].is_string());
    }
    assert_eq!(
        req("POST", "/api/docs/guarded/update", &auth(&rw), &good).status,
        200
    );
    writer.wait_text("ok").await;
    assert_eq!(
        req("GET", "/api/docs/guarded", &auth(&ro), b"").json(),
        json!({"t": "ok"})
    );
    assert_eq!(req("GET", "/api/docs", &auth(&admin), b"").status, 200);

    // Bodies that are not updates: 400, nothing applied, the connected client unaffected.
    let skipping = Doc::new();
    let t = skipping.get_or_insert_text("t");
    t.insert(&mut skipping.transact_mut(), 0, "a");
    let sv = skipping.transact().state_vector();
    t.insert(&mut skipping.transact_mut(), 1, "b");
    let ahead = skipping.transact().encode_diff_v1(&sv);
    let bad: Vec<(&str, &[u8])> = vec![
        ("empty", b""),
        ("random bytes", b"\xff\xfe\xfd\xfc garbage"),
        ("missing predecessors", &ahead),
    ];
    for (what, body) in bad {
        let res = req("POST", "/api/docs/guarded/update", &auth(&rw), body);
        assert_eq!(
            res.status,
            400,
            "{what}: {}",
            String::from_utf8_lossy(&res.body)
        );
    }
    let big = vec![0u8; 5000];
    assert_eq!(
        req("POST", "/api/docs/guarded/update", &auth(&rw), &big).status,
        413
    );
    assert_eq!(
        req("GET", "/api/docs/guarded", &auth(&admin), b"").json(),
        json!({"t": "ok"})
    );
    assert!(!writer.is_closed());

    // Unknown documents and versions, bad parameters.
    let statuses = [
        ("GET", "/api/docs/nobody", 404),
        ("GET", "/api/docs/nobody/update", 404),
        ("DELETE", "/api/docs/nobody", 404),
        ("GET", "/api/docs/nobody/versions", 404),
        ("POST", "/api/docs/nobody/versions", 404),
        ("GET", "/api/docs/guarded/versions/7", 404),
        ("POST", "/api/docs/guarded/versions/7/restore", 404),
        ("GET", "/api/docs/guarded/versions/seven", 400),
        ("GET", "/api/docs/guarded/update?sv=%%%", 400),
        ("GET", "/api/docs/guarded/update?sv=_w", 400),
        ("GET", "/api/docs?limit=0", 400),
        ("GET", "/api/docs/%FF", 400),
        ("GET", "/api/nothing-here", 404),
    ];
    for (method, path, status) in statuses {
        let res = req(method, path, &auth(&admin), b"");
        assert_eq!(
            res.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&res.body)
        );
        assert!(res.json()["error"].is_string(), "{method} {path}");
    }
    let res = req(
        "POST",
        "/api/docs/guarded/versions",
        &auth(&admin),
        b"{\"label\": 5}",
    );
    assert_eq!(res.status, 400);
}
