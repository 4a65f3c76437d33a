//! Replaying the log's segments: what each document's live records are, where damage is, and
//! where an unfinished last write begins.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::record::{self, scan, Record, Scanned};
use crate::Damage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// Still in the write buffer.
    Buffered {
        offset: usize,
        len: u32,
    },
    File {
        segment: u64,
        offset: u64,
        len: u32,
    },
}

impl Loc {
    pub(crate) fn segment(&self) -> Option<u64> {
        match self {
            Loc::File { segment, .. } => Some(*segment),
            Loc::Buffered { .. } => None,
        }
    }
}

/// What the log says sled holds as a document's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub upto: u64,
    pub len: u64,
    pub crc: u32,
}

#[derive(Debug, Default)]
pub(crate) struct DocLog {
    /// Live log entries: sequence number at or above the snapshot's `upto`.
    pub records: BTreeMap<u64, Loc>,
    pub snapshot: Option<(Mark, Loc)>,
}

pub(crate) struct Analysis {
    pub docs: HashMap<String, DocLog>,
    pub damage: Vec<Damage>,
    /// `(segment, offset)` where the unfinished last write begins.
    pub tail: Option<(u64, u64)>,
    /// Bytes of each segment's data: up to the tail, or up to its free space.
    pub sizes: BTreeMap<u64, u64>,
    pub deletes: BTreeSet<u64>,
}

/// Replays segments in order. Only the last segment can end in a torn write: every earlier one
/// was synced, ending in a commit, before the next was opened. So a bad range is a torn tail
/// only if it is in the last segment with no valid commit after it; anything else is damage.
pub(crate) fn analyze(segments: &[(u64, Vec<u8>)]) -> Analysis {
    // The size of a segment is where its data ends, not its file's length (see `wal`).
    let scanned: Vec<(u64, usize, Vec<Scanned>)> = segments
        .iter()
        .map(|(n, bytes)| {
            let (items, end) = scan(bytes);
            (*n, end, items)
        })
        .collect();
    let mut last_commit = None;
    for (i, (_, _, items)) in scanned.iter().enumerate() {
        for item in items {
            if let Scanned::Record {
                offset,
                len,
                record: Record::Commit(_),
            } = item
            {
                last_commit = Some((i, offset + len));
            }
        }
    }
    let tail = scanned.len().checked_sub(1).and_then(|last| {
        let from = match last_commit {
            Some((i, end)) if i == last => end,
            _ => 0,
        };
        scanned[last].2.iter().find_map(|item| match item {
            Scanned::Bad { start, .. } if *start >= from => Some((scanned[last].0, *start)),
            _ => None,
        })
    });

    let mut a = Analysis {
        docs: HashMap::new(),
        damage: Vec::new(),
        tail,
        sizes: BTreeMap::new(),
        deletes: BTreeSet::new(),
    };
    for (n, size, items) in scanned {
        let cut = tail.filter(|(s, _)| *s == n).map(|(_, at)| at);
        a.sizes.insert(n, cut.unwrap_or(size as u64));
        for item in items {
            match item {
                Scanned::Bad { start, .. } if cut.is_some_and(|c| start >= c) => break,
                Scanned::Record { offset, .. } if cut.is_some_and(|c| offset >= c) => break,
                Scanned::Bad { start, end } => a.damage.push(Damage {
                    doc: None,
                    what: format!("log segment {n}: bytes {start}..{end} are not a valid record"),
                }),
                Scanned::Record {
                    offset,
                    len,
                    record,
                } => {
                    let loc = Loc::File {
                        segment: n,
                        offset,
                        len: len as u32,
                    };
                    replay(&mut a, n, loc, record);
                }
            }
        }
    }
    a
}

fn replay(a: &mut Analysis, n: u64, loc: Loc, record: Record) {
    match record {
        Record::Update { doc, seq, .. } => {
            let d = a.docs.entry(doc).or_default();
            if d.snapshot.is_none_or(|(m, _)| seq >= m.upto) {
                d.records.insert(seq, loc);
            }
        }
        Record::Snapshot {
            doc,
            upto,
            len,
            crc,
        } => {
            let d = a.docs.entry(doc).or_default();
            if d.snapshot.is_none_or(|(m, _)| upto >= m.upto) {
                d.snapshot = Some((Mark { upto, len, crc }, loc));
                d.records = d.records.split_off(&upto);
            }
        }
        Record::Delete { doc } => {
            a.docs.remove(&doc);
            a.deletes.insert(n);
        }
        Record::Commit(entries) => {
            let deleted: BTreeSet<&String> = entries
                .iter()
                .filter(|e| e.0 == record::DELETE)
                .map(|e| &e.1)
                .collect();
            for (kind, doc, first, last) in &entries {
                if deleted.contains(doc) {
                    continue;
                }
                let d = a.docs.get(doc);
                let upto = d.and_then(|d| d.snapshot).map_or(0, |(m, _)| m.upto);
                let what = match *kind {
                    record::UPDATE => {
                        let missing = (*first..=*last)
                            .filter(|s| *s >= upto && d.is_none_or(|d| !d.records.contains_key(s)))
                            .count();
                        (missing > 0).then(|| {
                            format!(
                                "{missing} of the log entries {first}..={last} that a commit in \
                                 log segment {n} lists are missing or damaged"
                            )
                        })
                    }
                    record::SNAPSHOT => (upto < *first).then(|| {
                        format!(
                            "the snapshot marker up to {first} that a commit in log segment {n} \
                             lists is missing or damaged"
                        )
                    }),
                    _ => None,
                };
                if let Some(what) = what {
                    a.damage.push(Damage {
                        doc: Some(doc.clone()),
                        what,
                    });
                }
            }
        }
    }
}
