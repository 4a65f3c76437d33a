//! Operations against the real binary: /metrics parsed as Prometheus text, /readyz during
//! shutdown, JSON logs, the config file's precedence and errors, the demo's ETag and gzip.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Prometheus text: `name{labels}` -> value, for every sample line.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        out.insert(series.to_owned(), value.parse().expect("sample value"));
    }
    out
}

fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "{body}");
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            !line.contains("doc=") && !line.contains("conn="),
            "a document or connection as a label: {line}"
        );
    }
    parse_metrics(&body)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test]
async fn metrics_follow_what_clients_do() {
    let server = Server::start(&[]);
    let before = scrape(server.addr);
    assert_eq!(value(&before, "collab_connections"), 0.0);
    let a = synced_client(&server.url("m1")).await;
    let b = synced_client(&server.url("m1")).await;
    let c = synced_client(&server.url("m2")).await;
    a.insert(0, "hello");
    b.wait_text("hello").await;
    let m = scrape(server.addr);
    assert_eq!(value(&m, "collab_connections"), 3.0);
    assert_eq!(value(&m, "collab_connections_opened_total"), 3.0);
    assert_eq!(value(&m, "collab_documents_loaded"), 2.0);
    assert!(value(&m, "collab_updates_applied_total") >= 1.0);
    assert!(value(&m, r#"collab_messages_received_total{type="update"}"#) >= 1.0);
    assert!(value(&m, r#"collab_messages_received_total{type="sync_step1"}"#) >= 3.0);
    assert!(value(&m, r#"collab_messages_sent_total{type="update"}"#) >= 2.0);
    assert!(value(&m, "collab_flush_seconds_count") >= 1.0);
    assert!(value(&m, "collab_update_apply_seconds_count") >= 1.0);
    assert!(value(&m, "collab_broadcast_delay_seconds_count") >= 1.0);
    assert_eq!(value(&m, "collab_first_sync_bytes_count"), 3.0);
    // Sampled at the scrape: two documents, with 2 and 1 connections.
    assert_eq!(value(&m, "collab_document_connections_count"), 2.0);
    assert_eq!(value(&m, "collab_document_connections_sum"), 3.0);
    assert_eq!(value(&m, "collab_outbound_queue_depth_count"), 3.0);
    assert!(value(&m, "collab_process_resident_memory_bytes") > 1e6);

    // A bad frame: closed with 1002, counted by code.
    c.send_raw(vec![0x00, 0x02, 0xff]);
    assert_eq!(c.wait_closed().await, Some(1002));
    let closed = |m: &HashMap<String, f64>| {
        m.get(r#"collab_connections_closed_total{code="1002"}"#)
            .copied()
            .unwrap_or(0.0)
    };
    let mut m = scrape(server.addr);
    let deadline = Instant::now() + WAIT;
    // The gauge drops when the close handshake has ended.
    while (closed(&m) < 1.0 || value(&m, "collab_connections") != 2.0) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(server.addr);
    }
    assert_eq!(closed(&m), 1.0);
    assert!(value(&m, r#"collab_updates_refused_total{reason="malformed"}"#) >= 1.0);
    assert_eq!(value(&m, "collab_connections"), 2.0);

    // A refused upgrade, by status.
    let _ = Client::try_connect(request(&server.url(&"x".repeat(600)), &[]), yrs::Doc::new()).await;
    let m = scrape(server.addr);
    assert_eq!(
        value(&m, r#"collab_upgrades_refused_total{status="400"}"#),
        1.0
    );
    drop((a, b));
}

#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let server = Server::start(&["--metrics-addr", &metrics_addr]);
    let (status, _) = http(server.addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 404, "/metrics is still on the main address");
    let m = scrape(metrics_addr.parse().unwrap());
    assert_eq!(value(&m, "collab_connections"), 0.0);
}

#[tokio::test]
async fn readyz_turns_503_first_when_shutting_down() {
    let mut server = Server::start(&["--shutdown-drain-secs", "3"]);
    let c = synced_client(&server.url("r")).await;
    let (status, _) = http(server.addr, "GET", "/readyz", &[], b"");
    assert_eq!(status, 200);
    let (status, _) = http(server.addr, "GET", "/healthz", &[], b"");
    assert_eq!(status, 200);
    Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http(server.addr, "GET", "/readyz", &[], b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"));
    // The sockets are still open while the load balancer drains.
    assert!(!c.is_closed());
    assert_eq!(c.wait_closed().await, Some(1001));
    server.terminate_wait();
}

#[tokio::test]
async fn json_logs_carry_the_span_fields() {
    let server = Server::start(&["--log-format", "json"]);
    let c = synced_client(&server.url("json-doc")).await;
    c.insert(0, "x");
    c.wait_text("x").await;
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let opened = lines
        .iter()
        .find(|l| l["message"] == "connection opened")
        .expect("a connection-opened line");
    assert_eq!(opened["level"], "INFO");
    assert!(opened["timestamp"].is_string());
    assert!(opened["target"].is_string());
    assert_eq!(opened["span"]["doc"], "json-doc");
    assert!(opened["span"]["conn"]
        .as_str()
        .is_some_and(|s| s.len() == 36));
    assert!(opened["peer"].is_string());
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("collab.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// How many connections to one document the server accepts.
async fn per_doc_allowance(server: &Server) -> usize {
    let mut held = Vec::new();
    for n in 0..5 {
        match Client::try_connect(request(&server.url("p"), &[]), yrs::Doc::new()).await {
            Ok(c) => held.push(c),
            Err(r) => {
                assert_eq!(r.status, 503);
                return n;
            }
        }
    }
    5
}

#[tokio::test]
async fn config_file_precedence_is_flag_then_env_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "max_connections_per_doc = 1\nlog_format = \"text\"\n",
    );
    let env_var = ("COLLAB_MAX_CONNECTIONS_PER_DOC", "2");
    let file_only = Server::start(&["--config", &config]);
    assert_eq!(per_doc_allowance(&file_only).await, 1);
    let file_and_env = Server::start_with_env(&["--config", &config], &[env_var]);
    assert_eq!(per_doc_allowance(&file_and_env).await, 2);
    let all = Server::start_with_env(
        &["--config", &config, "--max-connections-per-doc", "3"],
        &[env_var],
    );
    assert_eq!(per_doc_allowance(&all).await, 3);
    // COLLAB_CONFIG works as well as the flag.
    let by_env = Server::start_with_env(&[], &[("COLLAB_CONFIG", config.as_str())]);
    assert_eq!(per_doc_allowance(&by_env).await, 1);
}

#[test]
fn config_file_errors_name_the_key_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("max_conections = 5\n", "max_conections"),
        ("max_message_size = \"lots\"\n", "max_message_size"),
        ("allow_anonymous = \"yes\"\n", "allow_anonymous"),
        ("addr = \n", "collab.toml"),
    ] {
        let config = write_config(dir.path(), text);
        let out = Command::new(collab_bin())
            .args(["--config", &config, "--data-dir"])
            .arg(dir.path().join("db"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[tokio::test]
async fn the_demo_is_served_compressed_with_an_etag() {
    let server = Server::start(&[]);
    let raw = |headers: &[(&str, &str)]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        let mut req = String::from("GET /app.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&out[..split]).to_ascii_lowercase(),
            out.len() - split - 4,
        )
    };
    let (plain, plain_len) = raw(&[]);
    let (gzip, gzip_len) = raw(&[("Accept-Encoding", "gzip")]);
    assert!(plain.starts_with("http/1.1 200"), "{plain}");
    assert!(gzip.contains("content-encoding: gzip"), "{gzip}");
    assert!(
        gzip_len * 2 < plain_len,
        "gzip {gzip_len} vs {plain_len} bytes"
    );
    let etag = plain
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .trim()
        .to_owned();
    let (again, len) = raw(&[("If-None-Match", &etag)]);
    assert!(again.starts_with("http/1.1 304"), "{again}");
    assert_eq!(len, 0);
}

/// The grace-period timer armed when a document loads is cancelled by a join (it held memory in
/// every open document): a document stays loaded however long someone is connected, and unloads
/// one grace period after its last connection leaves, a rejoin in between included.
#[tokio::test]
async fn a_document_unloads_a_grace_period_after_its_last_leave_and_not_before() {
    let server = Server::start(&["--grace-period-secs", "1"]);
    let loaded = || value(&scrape(server.addr), "collab_documents_loaded");
    let a = synced_client(&server.url("grace")).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(loaded(), 1.0, "unloaded under a connection");
    a.close();
    a.wait_closed().await;
    let b = synced_client(&server.url("grace")).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        loaded(),
        1.0,
        "a rejoin within the grace period did not keep it"
    );
    b.close();
    b.wait_closed().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while loaded() != 0.0 {
        assert!(
            Instant::now() < deadline,
            "never unloaded after the last leave"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls /metrics until `series` satisfies `ok`, for up to five seconds.
async fn wait_metric(server: &Server, series: &str, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = value(&scrape(server.addr), series);
        if ok(v) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A document nobody edits for `--hibernate-after-secs` keeps only its encoded bytes: joiners
/// are served from them without waking it; a client holding part of the document, and the
/// next edit, wake it with nothing lost; and durability does not depend on it.
#[tokio::test]
async fn a_quiet_document_sleeps_as_bytes_and_wakes_with_nothing_lost() {
    use yrs::updates::decoder::Decode;
    use yrs::{ReadTxn, Transact};
    let mut server = Server::start(&["--hibernate-after-secs", "1"]);
    let dormant = "collab_documents_dormant";
    let a = synced_client(&server.url("sleepy")).await;
    // a new document is dormant until its first edit
    wait_metric(&server, dormant, |v| v == 1.0).await;
    a.insert(0, "hello");
    wait_metric(&server, dormant, |v| v == 0.0).await;
    wait_metric(&server, dormant, |v| v == 1.0).await;
    assert_eq!(
        value(&scrape(server.addr), "collab_document_hibernations_total"),
        1.0,
        "{}",
        server.log()
    );

    let b = synced_client(&server.url("sleepy")).await;
    b.wait_text("hello").await;
    assert_eq!(
        value(&scrape(server.addr), dormant),
        1.0,
        "a joiner woke the document"
    );
    let partial = yrs::Doc::new();
    partial
        .transact_mut()
        .apply_update(
            yrs::Update::decode_v1(
                &b.doc
                    .transact()
                    .encode_state_as_update_v1(&yrs::StateVector::default()),
            )
            .unwrap(),
        )
        .unwrap();

    a.insert(5, " world");
    b.wait_text("hello world").await;
    wait_metric(&server, "collab_document_hibernations_total", |v| v == 2.0).await;
    // a client that has "hello" needs a diff: built from the woken document
    let c = Client::connect_with(&server.url("sleepy"), partial).await;
    c.wait_text("hello world").await;

    server.kill9();
    server.restart();
    let d = synced_client(&server.url("sleepy")).await;
    d.wait_text("hello world").await;
}

/// Rebuilding a dormant document runs on a thread other documents share, so one too large to
/// rebuild quickly stays built however quiet it is.
#[tokio::test]
async fn a_document_over_256_kib_stays_built() {
    let server = Server::start(&["--hibernate-after-secs", "1"]);
    let a = synced_client(&server.url("big")).await;
    let b = synced_client(&server.url("small")).await;
    a.insert(0, &"x".repeat(300 * 1024));
    b.insert(0, "small");
    wait_metric(&server, "collab_document_hibernations_total", |v| v == 1.0).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = scrape(server.addr);
    assert_eq!(value(&m, "collab_document_hibernations_total"), 1.0);
    assert_eq!(
        value(&m, "collab_documents_dormant"),
        1.0,
        "the large one slept"
    );
    let c = synced_client(&server.url("big")).await;
    c.wait_for("the large document", |c| c.len() == 300 * 1024)
        .await;
}
