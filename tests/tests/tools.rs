//! The data tools of the real binary: `collab docs list|export|import|delete`, `collab backup`,
//! `collab restore`, `collab check`, `POST /api/backup` on a running server, and the one-line
//! message for a data folder another process holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sha2::{Digest, Sha256};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

const ADMIN: &str = "admin-key-for-the-tools-tests";

/// Runs `collab --data-dir DATA ARGS...` to completion.
fn tool(data: &Path, args: &[&str]) -> Output {
    Command::new(collab_bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("COLLAB_DATA_DIR")
        .env_remove("COLLAB_CONFIG")
        .output()
        .expect("run collab")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed with {}:\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The text `t` of a Yjs update, read with a fresh yrs document.
fn text_of(update: &[u8]) -> String {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    doc.transact_mut()
        .apply_update(Update::decode_v1(update).expect("a Yjs v1 update"))
        .expect("applies");
    let s = text.get_string(&doc.transact());
    s
}

/// An update inserting `s` at `index` of text `t`, built on `base` (a whole-document update).
fn edit_on(base: Option<&[u8]>, index: u32, s: &str) -> Vec<u8> {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    if let Some(base) = base {
        doc.transact_mut()
            .apply_update(Update::decode_v1(base).unwrap())
            .unwrap();
    }
    let mut txn = doc.transact_mut();
    text.insert(&mut txn, index, s);
    txn.encode_update_v1()
}

/// What a fresh client sees of `doc`: its encoded state vector and its text.
async fn observed(server: &Server, doc: &str) -> (Vec<u8>, String) {
    let c = synced_client(&server.url(doc)).await;
    let sv = c.doc.transact().state_vector().encode_v1();
    let text = c.text();
    c.close();
    (sv, text)
}

/// Writes `texts` into their documents through WebSocket clients, one insert per piece, and
/// waits until a second client sees each whole text.
async fn write_docs(server: &Server, docs: &[(&str, Vec<String>)]) {
    for (name, pieces) in docs {
        let c = synced_client(&server.url(name)).await;
        for p in pieces {
            c.insert(c.len(), p);
        }
        let whole: String = pieces.concat();
        let check = synced_client(&server.url(name)).await;
        check.wait_text(&whole).await;
        c.close();
        check.close();
    }
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn entry_file(manifest: &serde_json::Value, doc: &str) -> String {
    manifest["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == doc)
        .unwrap_or_else(|| panic!("{doc} not in the manifest: {manifest}"))["file"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn docs_list_export_import_delete_round_trip() {
    let mut server = Server::start(&[]);
    write_docs(
        &server,
        &[
            ("alpha", vec!["hello ".into(), "alpha".into()]),
            ("beta/one", vec!["beta".into()]),
        ],
    )
    .await;
    server.terminate();
    let data = server.db_path();

    let list = tool(&data, &["docs", "list", "--json"]);
    assert_ok(&list, "docs list --json");
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta/one"]);
    assert!(rows[0]["size"].as_u64().unwrap() > 0);
    assert!(rows[0]["log_updates"].as_u64().unwrap() >= 2, "{rows}");
    // The data folder is found as the server finds it: environment, then the config file.
    let by_env = Command::new(collab_bin())
        .args(["docs", "list", "--json"])
        .env("COLLAB_DATA_DIR", &data)
        .env_remove("COLLAB_CONFIG")
        .output()
        .unwrap();
    assert_ok(&by_env, "docs list with COLLAB_DATA_DIR");
    assert_eq!(by_env.stdout, list.stdout);
    let config = server.data.path().join("collab.toml");
    std::fs::write(
        &config,
        format!("data_dir = {:?}\n", data.to_str().unwrap()),
    )
    .unwrap();
    let by_file = Command::new(collab_bin())
        .args([
            "--config",
            config.to_str().unwrap(),
            "docs",
            "list",
            "--json",
        ])
        .env_remove("COLLAB_DATA_DIR")
        .output()
        .unwrap();
    assert_ok(&by_file, "docs list with data_dir in --config");
    assert_eq!(by_file.stdout, list.stdout);
    let nowhere = tool(&data.join("missing"), &["docs", "list"]);
    assert_eq!(nowhere.status.code(), Some(2), "{}", stderr(&nowhere));

    let table = tool(&data, &["docs", "list"]);
    assert_ok(&table, "docs list");
    assert!(stdout(&table).starts_with("NAME"), "{}", stdout(&table));
    assert!(stdout(&table).lines().any(|l| l.starts_with("beta/one ")));

    // Export, to a file and to stdout: the same update, holding the text.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("alpha.yjs");
    assert_ok(
        &tool(
            &data,
            &["docs", "export", "alpha", "-o", file.to_str().unwrap()],
        ),
        "export -o",
    );
    let exported = std::fs::read(&file).unwrap();
    assert_eq!(text_of(&exported), "hello alpha");
    let piped = tool(&data, &["docs", "export", "alpha"]);
    assert_ok(&piped, "export to stdout");
    assert_eq!(piped.stdout, exported);
    let missing = tool(&data, &["docs", "export", "nothing-here"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("nothing-here"));

    // Import: merged into an existing document, and creating a new one.
    let addition = out.path().join("addition.yjs");
    std::fs::write(&addition, edit_on(Some(&exported), 11, "!")).unwrap();
    assert_ok(
        &tool(
            &data,
            &["docs", "import", "alpha", addition.to_str().unwrap()],
        ),
        "import into alpha",
    );
    let fresh = out.path().join("fresh.yjs");
    std::fs::write(&fresh, edit_on(None, 0, "imported")).unwrap();
    assert_ok(
        &tool(&data, &["docs", "import", "gamma", fresh.to_str().unwrap()]),
        "import gamma",
    );
    let not_update = out.path().join("junk");
    std::fs::write(&not_update, b"\xff\xff\xff\xff not yjs").unwrap();
    let junk = tool(
        &data,
        &["docs", "import", "alpha", not_update.to_str().unwrap()],
    );
    assert_eq!(junk.status.code(), Some(1), "{}", stderr(&junk));

    // Delete.
    assert_ok(&tool(&data, &["docs", "delete", "beta/one"]), "delete");
    assert_eq!(
        tool(&data, &["docs", "delete", "beta/one"]).status.code(),
        Some(1)
    );
    let list = tool(&data, &["docs", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "gamma"]);

    // The server serves what the tools wrote.
    server.restart();
    assert_eq!(observed(&server, "alpha").await.1, "hello alpha!");
    assert_eq!(observed(&server, "gamma").await.1, "imported");
    assert_eq!(observed(&server, "beta/one").await.1, "");
}

/// Documents with compacted snapshots and live logs; names with `/` and percent signs (a
/// WebSocket's document name is its raw path).
async fn populated() -> (Server, Vec<&'static str>) {
    let server = Server::start(&["--compact-after-updates", "4"]);
    let names = vec!["plain", "team-1/notes", "caf%C3%A9%20menu", "big"];
    let docs: Vec<(&str, Vec<String>)> = vec![
        (names[0], vec!["one".into()]),
        (names[1], (0..9).map(|i| format!("line {i}\n")).collect()),
        (names[2], vec!["crème".into(), " brûlée".into()]),
        (
            names[3],
            (0..12)
                .map(|i| format!("{i}{}", "x".repeat(20_000)))
                .collect(),
        ),
    ];
    write_docs(&server, &docs).await;
    (server, names)
}

/// A stopped server's folder restored from `backup`, started, and compared document by
/// document with `expected`.
async fn assert_restored_identical(backup: &Path, expected: &[(String, (Vec<u8>, String))]) {
    // A server made for its data folder only: stopped before it wrote anything.
    let mut restored = Server::start(&[]);
    restored.kill9();
    std::fs::remove_dir_all(restored.db_path()).unwrap();
    let r = tool(&restored.db_path(), &["restore", backup.to_str().unwrap()]);
    assert_ok(&r, "restore");
    restored.restart();
    for (name, seen) in expected {
        assert_eq!(
            &observed(&restored, name).await,
            seen,
            "{name} differs after backup and restore"
        );
    }
}

#[tokio::test]
async fn backup_then_restore_into_a_fresh_folder_serves_every_document_identically() {
    let (mut server, names) = populated().await;
    let mut expected = Vec::new();
    for name in &names {
        expected.push((name.to_string(), observed(&server, name).await));
    }
    assert!(expected[3].1 .1.len() > 200_000);
    server.terminate();

    let out = tempfile::tempdir().unwrap();
    let backup = out.path().join("backup");
    let b = tool(&server.db_path(), &["backup", backup.to_str().unwrap()]);
    assert_ok(&b, "backup");
    let m = manifest(&backup);
    assert_eq!(m["format"], "collab-backup");
    assert_eq!(m["version"], 1);
    assert!(m["created"].as_str().unwrap().ends_with('Z'));
    let docs = m["documents"].as_array().unwrap();
    assert_eq!(docs.len(), names.len());
    for e in docs {
        let file = e["file"].as_str().unwrap();
        assert!(
            file.len() == 68
                && file.ends_with(".yjs")
                && file[..64].bytes().all(|b| b.is_ascii_hexdigit()),
            "file names are hashes, not document names: {file}"
        );
        let bytes = std::fs::read(backup.join(file)).unwrap();
        assert_eq!(e["size"].as_u64().unwrap(), bytes.len() as u64);
        let sha: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(e["sha256"].as_str().unwrap(), sha);
    }

    // A second backup into the same (now non-empty) folder is refused.
    let again = tool(&server.db_path(), &["backup", backup.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));

    // Restore refuses a data folder that holds anything.
    let refused = tool(&server.db_path(), &["restore", backup.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );

    assert_restored_identical(&backup, &expected).await;
}

#[tokio::test]
async fn restore_refuses_a_tampered_backup_naming_the_document() {
    let (mut server, _) = populated().await;
    server.terminate();
    let out = tempfile::tempdir().unwrap();
    let backup = out.path().join("backup");
    assert_ok(
        &tool(&server.db_path(), &["backup", backup.to_str().unwrap()]),
        "backup",
    );
    let file = backup.join(entry_file(&manifest(&backup), "team-1/notes"));
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let target = out.path().join("restored");
    let r = tool(&target, &["restore", backup.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(stderr(&r).contains("\"team-1/notes\""), "{}", stderr(&r));
    assert!(
        !target.exists(),
        "nothing is written before every file is verified"
    );
}

#[tokio::test]
async fn check_reports_a_corrupted_record_by_document_name() {
    // No compaction: every update stays in the log.
    let mut server = Server::start(&["--compact-after-updates", "100000"]);
    let victim: Vec<String> = (0..40)
        .map(|i| format!("{i:04}{}", "v".repeat(2000)))
        .collect();
    write_docs(
        &server,
        &[("victim", victim), ("bystander", vec!["b".repeat(40)])],
    )
    .await;
    server.terminate();
    let data = server.db_path();
    let clean = tool(&data, &["check"]);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );

    let wal = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max_by_key(|p| p.metadata().unwrap().len())
        .expect("a wal segment");
    // Inside the victim's text: the segment's file also holds free space (zeros) after it.
    let mut bytes = std::fs::read(&wal).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w.iter().all(|b| *b == b'v'))
        .expect("the victim's text in the log");
    bytes[at + 32] ^= 0x5a;
    std::fs::write(&wal, &bytes).unwrap();

    let damaged = tool(&data, &["check"]);
    assert_eq!(
        damaged.status.code(),
        Some(1),
        "{}{}",
        stdout(&damaged),
        stderr(&damaged)
    );
    let report = stdout(&damaged);
    assert!(
        report.lines().any(|l| l.starts_with("damaged: \"victim\"")),
        "{report}"
    );
    assert!(!report.contains("\"bystander\""), "{report}");
}

fn post_backup(server: &Server, key: Option<&str>, path: &str) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let body = serde_json::json!({ "path": path }).to_string();
    http(
        server.addr,
        "POST",
        "/api/backup",
        &headers,
        body.as_bytes(),
    )
}

#[tokio::test]
async fn post_api_backup_on_a_live_server_while_a_client_edits() {
    let closed = Server::start(&[]);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("live");
    let (status, _) = post_backup(&closed, Some(ADMIN), target.to_str().unwrap());
    assert_eq!(status, 404, "no admin key: the endpoint does not exist");

    let mut server = Server::start(&["--admin-key", ADMIN, "--grace-period-secs", "0"]);
    // One document unloaded (read from storage), one loaded and edited during the backup.
    write_docs(&server, &[("resting", vec!["at rest".into()])]).await;
    let editor = synced_client(&server.url("busy")).await;
    for i in 0..50 {
        editor.insert(editor.len(), &format!("{i},"));
    }
    let before = {
        let check = synced_client(&server.url("busy")).await;
        check.wait_text(&editor.text()).await;
        editor.text()
    };

    assert_eq!(post_backup(&server, None, target.to_str().unwrap()).0, 401);
    assert_eq!(
        post_backup(&server, Some("wrong"), target.to_str().unwrap()).0,
        401
    );
    assert_eq!(post_backup(&server, Some(ADMIN), "relative/dir").0, 400);

    let typing = {
        let editor = editor;
        tokio::spawn(async move {
            for i in 50..250 {
                editor.insert(editor.len(), &format!("{i},"));
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            editor
        })
    };
    let path = target.to_str().unwrap().to_owned();
    let addr = server.addr;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let body = serde_json::json!({ "path": path }).to_string();
        http(
            addr,
            "POST",
            "/api/backup",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Bearer {ADMIN}")),
            ],
            body.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["documents"], 2, "{answer}");
    assert_eq!(answer["skipped"].as_array().unwrap().len(), 0);
    let editor = typing.await.unwrap();
    let final_text = editor.text();

    // The target is not empty any more.
    assert_eq!(
        post_backup(&server, Some(ADMIN), target.to_str().unwrap()).0,
        409
    );
    server.terminate();

    // A server made for its data folder only: stopped before it wrote anything.
    let mut restored = Server::start(&[]);
    restored.kill9();
    std::fs::remove_dir_all(restored.db_path()).unwrap();
    assert_ok(
        &tool(&restored.db_path(), &["restore", target.to_str().unwrap()]),
        "restore",
    );
    restored.restart();
    assert_eq!(observed(&restored, "resting").await.1, "at rest");
    let busy = observed(&restored, "busy").await.1;
    assert!(
        busy.starts_with(&before) && final_text.starts_with(&busy),
        "the backup holds a consistent state between {before:?} and {final_text:?}, got {busy:?}"
    );
}

#[tokio::test]
async fn a_data_folder_held_by_a_running_server_is_one_line() {
    let server = Server::start(&[]);
    let data: PathBuf = server.db_path();
    for args in [
        &["docs", "list"][..],
        &["check"],
        &["--addr", "127.0.0.1:0"],
    ] {
        let o = tool(&data, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(
            err.contains(&data.display().to_string()) && err.contains("another process"),
            "{args:?}: {err}"
        );
    }
}
