//! The data tools: `collab docs list|export|import|delete`, `collab backup`, `collab restore`
//! and `collab check`. They open the data folder themselves, so they run while no server holds
//! it (sled locks the folder; a second opener gets [`ToolError::Locked`]).

pub mod backup;

use std::io::Write;
use std::path::{Path, PathBuf};

use collab_crdt::Document;
use collab_storage::{SledStore, Store, StoreError, StoredDoc};
use serde::Serialize;
use yrs::updates::decoder::Decode;

use crate::config::{DocsCommand, MAX_DOC_NAME_LEN};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("the data folder {} is locked: another process (a running collab?) holds it; stop it first, or use POST /api/backup on a running server", .0.display())]
    Locked(PathBuf),
    #[error("cannot open the data folder {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("there is no data folder at {}", .0.display())]
    NoData(PathBuf),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("document {0:?} is not stored")]
    NotFound(String),
    #[error("document {name:?} does not load: {why}")]
    Damaged { name: String, why: String },
    #[error("{}: not a Yjs v1 update: {why}", path.display())]
    NotAnUpdate { path: PathBuf, why: String },
    #[error("document {name:?} cannot take the update: {why}")]
    Unmergeable { name: String, why: String },
    #[error("the document name must be 1 to {MAX_DOC_NAME_LEN} bytes")]
    BadName,
    #[error("cannot {what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error("{0}")]
    Internal(String),
}

impl ToolError {
    /// Settings that cannot work (exit code 2, as for a bad flag) rather than a failure (1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ToolError::BadName
                | ToolError::NoData(_)
                | ToolError::Backup(
                    backup::BackupError::DataNotEmpty(_) | backup::BackupError::TargetNotEmpty(_)
                )
        )
    }
}

pub fn file_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ToolError {
    let path = path.to_path_buf();
    move |source| ToolError::File { what, path, source }
}

/// Whether opening a store failed because another process holds the folder's lock (sled reports
/// it as an I/O error "could not acquire lock on ...").
pub fn is_locked(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(_)) && e.to_string().contains("could not acquire lock")
}

/// Opens an existing data folder: a mistyped path is an error, not a new empty store.
pub fn open_existing(path: &Path) -> Result<SledStore, ToolError> {
    if !path.is_dir() {
        return Err(ToolError::NoData(path.to_path_buf()));
    }
    open_store(path)
}

/// Opens (or creates) the data folder, telling a folder held by another process apart.
pub fn open_store(path: &Path) -> Result<SledStore, ToolError> {
    SledStore::open(path).map_err(|source| {
        if is_locked(&source) {
            ToolError::Locked(path.to_path_buf())
        } else {
            ToolError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Rebuilds a stored document.
pub fn load_document(store: &dyn Store, name: &str) -> Result<Document, ToolError> {
    let stored = store.load(name).map_err(|e| match e {
        e @ (StoreError::Corrupt { .. } | StoreError::UnsupportedFormat { .. }) => {
            ToolError::Damaged {
                name: name.to_owned(),
                why: e.to_string(),
            }
        }
        e => ToolError::Store(e),
    })?;
    document_of(name, &stored)
}

fn document_of(name: &str, stored: &StoredDoc) -> Result<Document, ToolError> {
    Document::load(
        stored.snapshot.as_deref(),
        stored.log.iter().map(|(_, u)| u.as_slice()),
    )
    .map_err(|e| ToolError::Damaged {
        name: name.to_owned(),
        why: e.to_string(),
    })
}

/// The whole state of a stored document as one Yjs v1 update.
pub fn export_state(store: &dyn Store, name: &str) -> Result<Vec<u8>, ToolError> {
    if store.stats(name)?.is_none() {
        return Err(ToolError::NotFound(name.to_owned()));
    }
    Ok(load_document(store, name)?.encode_state())
}

/// Merges `update` into the stored document `name` (created if needed) and stores what was
/// new as one log entry, flushed. Returns whether anything changed.
pub fn import_update(store: &dyn Store, name: &str, update: &[u8]) -> Result<bool, ToolError> {
    if name.is_empty() || name.len() > MAX_DOC_NAME_LEN {
        return Err(ToolError::BadName);
    }
    let stored = store.load(name)?;
    let mut doc = document_of(name, &stored)?;
    let parsed = yrs::Update::decode_v1(update).map_err(|e| ToolError::NotAnUpdate {
        path: PathBuf::from("the update"),
        why: e.to_string(),
    })?;
    let diff = doc
        .apply_update(parsed)
        .map_err(|e| ToolError::NotAnUpdate {
            path: PathBuf::from("the update"),
            why: e.to_string(),
        })?;
    let Some(diff) = diff else {
        return Ok(false);
    };
    store.append(name, stored.next_seq(), &diff)?;
    store.flush()?;
    Ok(true)
}

/// One row of `collab docs list`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub name: String,
    /// Stored bytes: snapshot plus log.
    pub size: u64,
    /// Updates in the log (not yet folded into the snapshot).
    pub log_updates: u64,
    /// The last change this store knows of: for a stopped server, the last compaction.
    pub last_modified: Option<String>,
}

pub fn list(store: &dyn Store) -> Result<Vec<Listed>, ToolError> {
    let mut rows = Vec::new();
    for name in store.list()? {
        let Some(stats) = store.stats(&name)? else {
            continue;
        };
        let upto = store.meta(&name)?.map_or(0, |m| m.snapshot_upto);
        rows.push(Listed {
            log_updates: stats.updates.saturating_sub(upto),
            size: stats.size_bytes,
            last_modified: (stats.last_modified_ms > 0).then(|| rfc3339_ms(stats.last_modified_ms)),
            name,
        });
    }
    Ok(rows)
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `collab docs ...`: what to print has been printed when it returns.
pub fn docs(data_dir: &Path, command: &DocsCommand) -> Result<(), ToolError> {
    if let DocsCommand::Import { name, file } = command {
        return import_file(data_dir, name, file);
    }
    let store = open_existing(data_dir)?;
    match command {
        DocsCommand::List { json } => {
            let rows = list(&store)?;
            let mut out = std::io::stdout().lock();
            let result = if *json {
                let text = serde_json::to_string_pretty(&rows).unwrap_or_default();
                writeln!(out, "{text}")
            } else {
                print_table(&mut out, &rows)
            };
            result.map_err(file_error("write", Path::new("stdout")))?;
        }
        DocsCommand::Export { name, output } => {
            let state = export_state(&store, name)?;
            match output {
                Some(path) => write_durably(path, &state)?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&state)
                        .and_then(|()| out.flush())
                        .map_err(file_error("write", Path::new("stdout")))?;
                }
            }
        }
        DocsCommand::Import { .. } => unreachable!("handled above"),
        DocsCommand::Delete { name } => {
            if !store.delete(name)? {
                return Err(ToolError::NotFound(name.clone()));
            }
            store.flush()?;
            eprintln!("{name}: deleted");
        }
    }
    Ok(())
}

/// `collab docs import`: the update is read and checked before the data folder is opened (or
/// created, for a new one).
fn import_file(data_dir: &Path, name: &str, file: &Path) -> Result<(), ToolError> {
    let update = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(file_error("read", Path::new("stdin")))?;
        buf
    } else {
        std::fs::read(file).map_err(file_error("read", file))?
    };
    yrs::Update::decode_v1(&update).map_err(|e| ToolError::NotAnUpdate {
        path: file.to_path_buf(),
        why: e.to_string(),
    })?;
    let store = open_store(data_dir)?;
    let changed = import_update(&store, name, &update).map_err(|e| match e {
        ToolError::NotAnUpdate { why, .. } => ToolError::NotAnUpdate {
            path: file.to_path_buf(),
            why,
        },
        e => e,
    })?;
    eprintln!(
        "{name}: {}",
        if changed {
            "update merged and stored"
        } else {
            "nothing new in the update"
        }
    );
    Ok(())
}

fn print_table(out: &mut impl Write, rows: &[Listed]) -> std::io::Result<()> {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    writeln!(
        out,
        "{:<width$}  {:>12}  {:>11}  LAST MODIFIED",
        "NAME", "SIZE", "LOG UPDATES"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<width$}  {:>12}  {:>11}  {}",
            r.name,
            r.size,
            r.log_updates,
            r.last_modified.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

/// `collab check`: the store's own check (log records, snapshots against their CRC and the
/// log's record of them), then every document rebuilt from its snapshot and log. Returns the
/// damaged documents' names, sorted; damage the store cannot attribute is printed too.
pub fn check(data_dir: &Path) -> Result<Vec<String>, ToolError> {
    let store = open_existing(data_dir)?;
    let mut damaged = std::collections::BTreeMap::<String, String>::new();
    let mut unattributed = Vec::new();
    for d in store.damage_at_open().iter().cloned().chain(store.check()?) {
        match d.doc {
            Some(doc) => {
                damaged.entry(doc).or_insert(d.what);
            }
            None => unattributed.push(d.what),
        }
    }
    let names = store.list()?;
    let total = names.len();
    for name in names {
        if damaged.contains_key(&name) {
            continue;
        }
        match load_document(&store, &name) {
            Ok(_) => {}
            Err(ToolError::Damaged { why, .. }) => {
                damaged.insert(name, why);
            }
            Err(e) => return Err(e),
        }
    }
    for what in &unattributed {
        println!("damage not attributable to a document: {what}");
    }
    for (name, what) in &damaged {
        println!("damaged: {name:?}: {what}");
    }
    println!("{total} documents checked, {} damaged", damaged.len());
    Ok(damaged.into_keys().collect())
}

/// Writes `bytes` to `path` through a temporary file, fsynced and renamed into place.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    let tmp = path.with_extension("partial");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(file_error("write", path))
}
