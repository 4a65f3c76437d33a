//! Damage in the middle of a data folder's files is found and reported by document name, at
//! start-up and by `SledStore::check`, and the damaged document is refused rather than served
//! short. The other documents are unaffected.

mod common;

use std::path::{Path, PathBuf};

use collab_storage::{SledStore, Store};
use common::*;

const DOCS: [&str; 2] = ["victim", "bystander"];

/// Writes a big document (`victim`, most of every file) and a small one (`bystander`), and
/// returns their texts.
async fn populate(server: &Server) -> Vec<String> {
    let victim = synced_client(&server.url(DOCS[0])).await;
    let bystander = synced_client(&server.url(DOCS[1])).await;
    for i in 0..40u32 {
        victim.insert(0, &format!("{i:04}{}", "v".repeat(2000)));
        bystander.insert(0, "b");
        victim
            .wait_for("echo", |c| {
                c.seen.lock().unwrap().updates_received as u32 > i
            })
            .await;
    }
    bystander.wait_text(&"b".repeat(40)).await;
    vec![victim.text(), bystander.text()]
}

fn middle_of_biggest(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap()
}

/// Flips a byte inside the victim's text nearest after the middle of the file: inside an
/// update record for certain, rather than in a small commit record that happens to sit at the
/// middle (damage to a commit loses no document data and is reported without a name).
fn flip_victim_byte_near_middle(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let run = [b'v'; 64];
    let mid = bytes.len() / 2;
    let at = bytes[mid..]
        .windows(run.len())
        .position(|w| w == run)
        .map(|i| mid + i + run.len() / 2)
        .or_else(|| {
            bytes
                .windows(run.len())
                .position(|w| w == run)
                .map(|i| i + run.len() / 2)
        })
        .expect("the victim's text in the log");
    bytes[at] ^= 0x5a;
    std::fs::write(file, &bytes).unwrap();
}

fn flip_middle_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(file, &bytes).unwrap();
}

/// Restarts on the damaged folder: the start-up log names the damaged document(s), which are
/// refused (1011); every other document is served whole; `check()` names the same ones.
async fn assert_damage_reported(server: &mut Server, texts: &[String]) {
    server.restart();
    let log = server.log();
    let damaged: Vec<&str> = DOCS
        .into_iter()
        .filter(|doc| {
            log.lines()
                .any(|l| l.contains("stored data is damaged") && l.contains(&format!("\"{doc}\"")))
        })
        .collect();
    assert!(
        !damaged.is_empty(),
        "no document reported damaged at start-up:\n{log}"
    );
    for (doc, text) in DOCS.iter().zip(texts) {
        if damaged.contains(doc) {
            let c = Client::connect(&server.url(doc)).await;
            assert_eq!(
                c.wait_closed().await,
                Some(1011),
                "{doc} is damaged and must not be served"
            );
        } else {
            let c = synced_client(&server.url(doc)).await;
            assert_eq!(
                &c.text(),
                text,
                "{doc} is not damaged and must be served whole"
            );
        }
    }
    server.terminate();
    let store = SledStore::open(server.db_path()).unwrap();
    let mut checked: Vec<String> = store
        .check()
        .unwrap()
        .into_iter()
        .filter_map(|d| d.doc)
        .collect();
    checked.dedup();
    let mut expected: Vec<String> = damaged.iter().map(|d| d.to_string()).collect();
    expected.sort();
    assert_eq!(checked, expected, "check() and start-up disagree");
}

#[tokio::test]
async fn a_flipped_byte_in_the_middle_of_the_log_is_reported_by_name() {
    // No compaction: every update stays in the log.
    let mut server = Server::start(&["--compact-after-updates", "100000"]);
    let texts = populate(&server).await;
    server.terminate();
    flip_victim_byte_near_middle(&middle_of_biggest(&server.db_path().join("wal")));
    assert_damage_reported(&mut server, &texts).await;
}

#[tokio::test]
async fn a_flipped_byte_in_the_middle_of_the_sled_file_is_reported_by_name() {
    // Compacting after every few updates puts both documents' content in sled's snapshots.
    let mut server = Server::start(&["--compact-after-updates", "5"]);
    let texts = populate(&server).await;
    server.terminate();
    flip_middle_byte(&server.db_path().join("db"));
    assert_damage_reported(&mut server, &texts).await;
}

#[tokio::test]
async fn a_truncated_snapshot_file_is_reported_by_name() {
    let mut server = Server::start(&["--compact-after-updates", "5"]);
    let texts = populate(&server).await;
    server.terminate();
    let file = middle_of_biggest(&server.db_path().join("snapshots"));
    let len = file.metadata().unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_damage_reported(&mut server, &texts).await;
}

#[tokio::test]
async fn a_flipped_byte_in_a_snapshot_file_is_found_when_the_document_loads() {
    let mut server = Server::start(&["--compact-after-updates", "5"]);
    let texts = populate(&server).await;
    server.terminate();
    flip_middle_byte(&middle_of_biggest(&server.db_path().join("snapshots")));
    // A changed byte keeps the file's size, so start-up (which reads no snapshot) passes it;
    // the snapshot's CRC32 refuses it when the document loads, and `check` names it.
    server.restart();
    let victim = Client::connect(&server.url(DOCS[0])).await;
    assert_eq!(victim.wait_closed().await, Some(1011));
    let bystander = synced_client(&server.url(DOCS[1])).await;
    assert_eq!(bystander.text(), texts[1]);
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot load document") && l.contains("victim")),
        "the refusal is logged with the document's name:\n{log}"
    );
    server.terminate();
    let store = SledStore::open(server.db_path()).unwrap();
    let damaged: Vec<Option<String>> = store.check().unwrap().into_iter().map(|d| d.doc).collect();
    assert_eq!(damaged, vec![Some("victim".to_owned())]);
}
