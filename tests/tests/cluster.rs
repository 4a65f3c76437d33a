//! Cluster mode: three real collab processes sharing documents through a real redis-server.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::time::Duration;

use common::*;
use redis_harness::{redis_available, Redis};

fn instance(redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[tokio::test]
async fn clients_on_three_instances_converge_and_a_late_joiner_gets_everything() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let servers: Vec<Server> = (0..3).map(|_| instance(&redis, &[])).collect();
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(synced_client(&s.url("shared")).await);
    }
    // Concurrent edits on every instance at once.
    for round in 0..20u32 {
        for (i, c) in clients.iter().enumerate() {
            c.insert(0, &format!("{i}{round};"));
        }
    }
    let expected_len = clients.iter().map(|c| c.len()).sum::<u32>();
    assert!(
        wait_until(WAIT, || clients.iter().all(|c| c.len() == expected_len)).await,
        "not converged: {:?}",
        clients.iter().map(|c| c.len()).collect::<Vec<_>>()
    );
    let text = clients[0].text();
    assert!(clients.iter().all(|c| c.text() == text));

    // An instance that never had the document loads it from Redis alone.
    let late = instance(&redis, &[]);
    let joiner = synced_client(&late.url("shared")).await;
    assert_eq!(joiner.text(), text);
    // And it takes part from then on.
    joiner.insert(0, "late;");
    let expected = joiner.text();
    for c in &clients {
        c.wait_text(&expected).await;
    }
}

#[tokio::test]
async fn an_echoed_edit_survives_kill_9_of_its_instance_and_of_redis() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    // Slow appends make "echoed before Redis acknowledged" lose data every time.
    let slow = ["--debug-flush-delay-ms", "300"];
    let mut a = instance(&redis, &slow);
    let b = instance(&redis, &slow);
    let writer = synced_client(&a.url("durable")).await;
    let reader_b = synced_client(&b.url("durable")).await;
    for i in 0..25u32 {
        writer.insert(i, "e");
    }
    // Seen echoed by a client of the same instance: acknowledged by Redis by then.
    let watcher = synced_client(&a.url("durable")).await;
    watcher.wait_text(&"e".repeat(25)).await;
    a.kill9();
    reader_b.wait_text(&"e".repeat(25)).await;

    // kill -9 of Redis right after an echo on b.
    reader_b.insert(0, "R");
    let echo_b = synced_client(&b.url("durable")).await;
    echo_b.wait_text(&format!("R{}", "e".repeat(25))).await;
    redis.kill9();
    redis.restart();
    let fresh = instance(&redis, &[]);
    let after = synced_client(&fresh.url("durable")).await;
    assert_eq!(after.text(), format!("R{}", "e".repeat(25)));
}

#[tokio::test]
async fn compaction_under_concurrent_writes_trims_and_loses_nothing() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let opts = ["--compact-after-updates", "20"];
    let a = instance(&redis, &opts);
    let b = instance(&redis, &opts);
    let wa = synced_client(&a.url("compacted")).await;
    let wb = synced_client(&b.url("compacted")).await;
    for i in 0..150u32 {
        wa.insert(0, "a");
        wb.insert(0, "b");
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    assert!(
        wait_until(WAIT, || wa.len() == 300 && wb.len() == 300).await,
        "not converged: {} / {}",
        wa.len(),
        wb.len()
    );
    assert_eq!(wa.text(), wb.text());
    let trims = metric(&a, "collab_redis_trims_total") + metric(&b, "collab_redis_trims_total");
    assert!(trims >= 1.0, "no compaction trimmed the stream");
    // Each edit was its own update: the stream holds far fewer than 300 now.
    let len: i64 = redis.query(redis::cmd("XLEN").arg("collab:{compacted}:log"));
    assert!(len < 200, "stream not trimmed: {len} entries");
    let upto: Option<String> = redis.query(
        redis::cmd("HGET")
            .arg("collab:{compacted}:snap")
            .arg("upto"),
    );
    assert!(upto.is_some(), "no snapshot written");
    let fresh = instance(&redis, &[]);
    let c = synced_client(&fresh.url("compacted")).await;
    assert_eq!(c.text(), wa.text());
}

#[tokio::test]
async fn an_instance_behind_a_trim_reloads_from_the_snapshot() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let a = instance(&redis, &["--compact-after-updates", "1"]);
    let b = instance(&redis, &["--compact-after-updates", "100000"]);
    let wa = synced_client(&a.url("behind")).await;
    let rb = synced_client(&b.url("behind")).await;
    wa.insert(0, "x");
    rb.wait_text("x").await;
    // b stops reading while a writes and compacts until the stream holds nothing but the last
    // trim marker: everything b has not read is gone from the stream, and nothing after the
    // gap could tell b (an update that does not apply) except the marker.
    let pid = b.pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    for i in 0..30u32 {
        wa.insert(i, "y");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = "collab:{behind}:log";
    assert!(
        wait_until(WAIT, || redis.query::<i64>(redis::cmd("XLEN").arg(log))
            == 1)
        .await,
        "a never compacted everything"
    );
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    let expected = wa.text();
    assert_eq!(expected.len(), 31);
    rb.wait_text(&expected).await;
    assert!(
        metric(&b, "collab_redis_reloads_total") >= 1.0,
        "b did not notice it fell behind a trim\n--- a ---\n{}\n--- b ---\n{}",
        a.log(),
        b.log()
    );
}

#[tokio::test]
async fn awareness_crosses_instances_and_is_removed_on_disconnect() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let mut alice = synced_client(&a.url("presence")).await;
    let bob = synced_client(&b.url("presence")).await;
    alice.set_awareness(r#"{"user":"alice"}"#);
    let id = alice.client_id();
    bob.wait_for("alice's presence", |c| {
        c.awareness_states()
            .get(&id)
            .is_some_and(|s| s.contains("alice"))
    })
    .await;
    // A client joining another instance later sees her at once (the load asks the others).
    let c = instance(&redis, &[]);
    let carol = synced_client(&c.url("presence")).await;
    carol
        .wait_for("alice's presence on a new instance", |c| {
            c.awareness_states().contains_key(&id)
        })
        .await;
    alice.close();
    bob.wait_for("alice's removal", |c| {
        !c.awareness_states().contains_key(&id)
    })
    .await;
    carol
        .wait_for("alice's removal", |c| {
            !c.awareness_states().contains_key(&id)
        })
        .await;
}

#[tokio::test]
async fn redis_away_for_a_while_is_survived() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let wa = synced_client(&a.url("outage")).await;
    let rb = synced_client(&b.url("outage")).await;
    wa.insert(0, "before;");
    rb.wait_text("before;").await;
    redis.stop();
    // An edit now cannot be made durable: the writer is told to come back later (1013), and
    // nobody sees the edit.
    wa.insert(0, "during;");
    assert_eq!(wa.wait_closed().await, Some(1013));
    assert_eq!(rb.text(), "before;");
    let (status, _) = http(a.addr, "GET", "/readyz", &[], b"");
    assert_eq!(status, 503);
    let (status, body) = raw_upgrade(a.addr, "/outage");
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    // Service resumes by itself, and the edit comes back with its client's resync.
    assert!(
        wait_until(Duration::from_secs(15), || {
            http(a.addr, "GET", "/readyz", &[], b"").0 == 200
        })
        .await,
        "not ready again after Redis returned"
    );
    let again = Client::connect_with(&a.url("outage"), wa.doc.clone()).await;
    again.wait_synced().await;
    rb.wait_text("during;before;").await;
    let fresh = instance(&redis, &[]);
    let c = synced_client(&fresh.url("outage")).await;
    assert_eq!(c.text(), "during;before;");
}

fn json(server: &Server, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let (status, body) = http(server.addr, method, path, &[], body);
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[tokio::test]
async fn the_document_api_answers_alike_on_every_instance() {
    use yrs::{Doc, Text, Transact};
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let watcher = synced_client(&b.url("api-doc")).await;
    // A backend's update through a: b's client sees it, b's API reads it.
    let doc = Doc::new();
    let update = {
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, "from the api");
        txn.encode_update_v1()
    };
    let (status, _) = json(&a, "POST", "/api/docs/api-doc/update", &update);
    assert_eq!(status, 200);
    watcher.wait_text("from the api").await;
    let (status, content) = json(&b, "GET", "/api/docs/api-doc", b"");
    assert_eq!(status, 200);
    assert_eq!(content["t"], "from the api");
    // A listing on a third instance, which never loaded the document.
    let c = instance(&redis, &[]);
    let (status, list) = json(&c, "GET", "/api/docs", b"");
    assert_eq!(status, 200);
    let docs = list["docs"].as_array().unwrap();
    assert_eq!(docs.len(), 1, "{list}");
    assert_eq!(docs[0]["name"], "api-doc");
    assert!(docs[0]["size"].as_u64().unwrap() > 0);
    // A version made on a is listed and read on c.
    let (status, v) = json(
        &a,
        "POST",
        "/api/docs/api-doc/versions",
        br#"{"label":"v1"}"#,
    );
    assert_eq!(status, 201, "{v}");
    let (_, versions) = json(&c, "GET", "/api/docs/api-doc/versions", b"");
    assert_eq!(versions["versions"][0]["label"], "v1");
    let (status, old) = json(&c, "GET", "/api/docs/api-doc/versions/1", b"");
    assert_eq!(status, 200);
    assert_eq!(old["t"], "from the api");
    // Deleted through c: the client on b is closed with 4404 and nothing is left anywhere.
    let (status, _) = json(&c, "DELETE", "/api/docs/api-doc", b"");
    assert_eq!(status, 204);
    assert_eq!(watcher.wait_closed().await, Some(4404));
    assert_eq!(json(&a, "GET", "/api/docs/api-doc", b"").0, 404);
    assert_eq!(json(&b, "GET", "/api/docs/api-doc/versions", b"").0, 404);
    let (_, list) = json(&a, "GET", "/api/docs", b"");
    assert_eq!(list["docs"].as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test]
async fn a_redis_that_does_not_fsync_every_write_is_reported_at_start_up() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let ok = instance(&redis, &[]);
    let _: () = redis.query(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg("everysec"),
    );
    let lax = instance(&redis, &[]);
    let warning = "REDIS DOES NOT FSYNC EVERY WRITE";
    assert!(
        wait_until(WAIT, || lax.log().contains(warning)).await,
        "{}",
        lax.log()
    );
    assert!(lax.log().contains("appendfsync=everysec"), "{}", lax.log());
    assert!(!ok.log().contains(warning), "{}", ok.log());
    assert!(ok.log().contains("appendfsync always"), "{}", ok.log());
}
