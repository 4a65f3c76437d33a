//! Segment files of the write-ahead log: naming, creating, reading.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::record::{self, Record, SEGMENT_MAGIC};
use crate::recovery::Loc;
use crate::StoreError;

pub(crate) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

pub(crate) fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io {
        what: format!("{what} {}", path.display()),
        source: e,
    }
}

pub(crate) fn read_segments(
    dir: &Path,
    limit: Option<(u64, u64)>,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("list", dir, e))? {
        let entry = entry.map_err(|e| io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match name.strip_suffix(".wal").map(str::parse::<u64>) {
            Some(Ok(n)) => numbers.push(n),
            _ => warn!(file = %name, "ignoring a file that is not a log segment"),
        }
    }
    numbers.sort_unstable();
    let mut segments = Vec::new();
    for n in numbers {
        let path = segment_path(dir, n);
        let mut bytes = std::fs::read(&path).map_err(|e| io("read", &path, e))?;
        if let Some((head, len)) = limit {
            if n == head {
                bytes.truncate(len as usize);
            }
        }
        segments.push((n, bytes));
    }
    Ok(segments)
}

pub(crate) fn create_segment(dir: &Path, n: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, n);
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io("create", &path, e))?;
    f.write_all_at(SEGMENT_MAGIC, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| io("write", &path, e))?;
    sync_dir(dir)?;
    Ok(f)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    // A new file's name is durable only once its folder is synced.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))
}

pub(crate) fn read_at(file: &mut File, path: &Path, loc: Loc) -> Result<Record, StoreError> {
    let Loc::File { offset, len, .. } = loc else {
        unreachable!("only file locations are read from files");
    };
    let mut bytes = vec![0; len as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| io("read", path, e))?;
    match record::decode(&bytes) {
        Some((r, n)) if n == bytes.len() => Ok(r),
        _ => Err(StoreError::Io {
            what: format!("record at {offset} of {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "checksum mismatch"),
        }),
    }
}

pub(crate) fn update_of(
    doc: &str,
    decoded: Option<(Record, usize)>,
) -> Result<Vec<u8>, StoreError> {
    match decoded {
        Some((Record::Update { update, .. }, _)) => Ok(update),
        _ => Err(StoreError::Corrupt {
            doc: doc.to_owned(),
            what: "a log entry does not decode".into(),
        }),
    }
}
