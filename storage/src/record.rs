//! Framing of the write-ahead log's records.
//!
//! `len: u32 LE | crc: u32 LE | kind: u8 | body`, where `len` counts `kind ‖ body` and `crc` is
//! the CRC32 of `len ‖ kind ‖ body`. Covering the length means a damaged length is caught like
//! damaged content, and lets a reader find the next record after damage by trying each offset.

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"collabW1";
const HEADER: usize = 8;
/// A record never exceeds this; anything longer is damage, not a record.
pub const MAX_RECORD: usize = 1 << 30;

/// One Yjs update of a document, under its sequence number.
pub const UPDATE: u8 = b'u';
/// Sled durably holds this document's snapshot: sequence numbers below `upto`, with this length
/// and CRC32. Log entries below `upto` are dead from here on.
pub const SNAPSHOT: u8 = b's';
/// The document was deleted; everything before this about it is dead.
pub const DELETE: u8 = b'd';
/// Written at the end of every flush: what the flush made durable. A damaged record followed by
/// a valid commit is damage in the middle of the log, not a torn tail, and the commit names the
/// documents whose records must be there.
pub const COMMIT: u8 = b'c';

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Update {
        doc: String,
        seq: u64,
        update: Vec<u8>,
    },
    Snapshot {
        doc: String,
        upto: u64,
        len: u64,
        crc: u32,
    },
    Delete {
        doc: String,
    },
    /// `(kind, document, first, last)`: updates `first..=last`; for a snapshot `first` is its
    /// `upto`; for a delete both are 0.
    Commit(Vec<(u8, String, u64, u64)>),
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names are at most u16::MAX bytes: the store checks this before anything is written.
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Appends the framed record to `out`; returns its offset within `out` and its framed length.
pub fn encode(out: &mut Vec<u8>, record: &Record) -> (usize, usize) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    match record {
        Record::Update { doc, seq, update } => {
            out.push(UPDATE);
            put_name(out, doc);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(update);
        }
        Record::Snapshot {
            doc,
            upto,
            len,
            crc,
        } => {
            out.push(SNAPSHOT);
            put_name(out, doc);
            out.extend_from_slice(&upto.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&crc.to_le_bytes());
        }
        Record::Delete { doc } => {
            out.push(DELETE);
            put_name(out, doc);
        }
        Record::Commit(entries) => {
            out.push(COMMIT);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (kind, doc, first, last) in entries {
                out.push(*kind);
                put_name(out, doc);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&last.to_le_bytes());
            }
        }
    }
    let len = (out.len() - start - HEADER) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&h.finalize().to_le_bytes());
    (start, out.len() - start)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(len.into())?.to_vec()).ok()
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let record = match kind {
        UPDATE => Record::Update {
            doc: r.name()?,
            seq: r.u64()?,
            update: std::mem::take(&mut r.0).to_vec(),
        },
        SNAPSHOT => Record::Snapshot {
            doc: r.name()?,
            upto: r.u64()?,
            len: r.u64()?,
            crc: r.u32()?,
        },
        DELETE => Record::Delete { doc: r.name()? },
        COMMIT => {
            let n = r.u32()?;
            let mut entries = Vec::new();
            for _ in 0..n {
                entries.push((r.u8()?, r.name()?, r.u64()?, r.u64()?));
            }
            Record::Commit(entries)
        }
        _ => return None,
    };
    r.0.is_empty().then_some(record)
}

/// The record framed at the start of `bytes` and its framed length, if it is whole and its
/// checksum matches.
pub fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = bytes.get(HEADER..HEADER + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..4]);
    h.update(payload);
    if h.finalize() != crc {
        return None;
    }
    Some((decode_body(payload[0], &payload[1..])?, HEADER + len))
}

/// What a scan of one segment found, in file order.
#[derive(Debug)]
pub enum Scanned {
    Record {
        offset: u64,
        len: u64,
        record: Record,
    },
    /// Bytes that are not a valid record, from `start` up to the next valid record or the end.
    Bad { start: u64, end: u64 },
}

/// Every valid record of a segment and every damaged range between them, and where the
/// segment's data ends. After damage the scan resumes at the next offset where a whole record
/// with a matching checksum starts, so one damaged record hides none of the records after it.
///
/// Segments are extended with zeros ahead of the writes (see `wal`), so where a record could
/// start and only zeros follow, the data ends: that is unused space, not damage. A record
/// never starts with a zero length, so zeros are never mistaken for one.
pub fn scan(segment: &[u8]) -> (Vec<Scanned>, usize) {
    let mut out = Vec::new();
    if segment.get(..SEGMENT_MAGIC.len()) != Some(&SEGMENT_MAGIC[..]) {
        out.push(Scanned::Bad {
            start: 0,
            end: SEGMENT_MAGIC.len().min(segment.len()) as u64,
        });
    }
    let mut pos = SEGMENT_MAGIC.len().min(segment.len());
    let mut bad_since: Option<usize> = None;
    while pos < segment.len() {
        match decode(&segment[pos..]) {
            Some((record, len)) => {
                if let Some(start) = bad_since.take() {
                    out.push(Scanned::Bad {
                        start: start as u64,
                        end: pos as u64,
                    });
                }
                out.push(Scanned::Record {
                    offset: pos as u64,
                    len: len as u64,
                    record,
                });
                pos += len;
            }
            None => {
                if bad_since.is_none() && segment[pos..].iter().all(|b| *b == 0) {
                    return (out, pos);
                }
                bad_since.get_or_insert(pos);
                pos += 1;
            }
        }
    }
    if let Some(start) = bad_since {
        out.push(Scanned::Bad {
            start: start as u64,
            end: segment.len() as u64,
        });
    }
    (out, segment.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[Record]) -> Vec<u8> {
        let mut out = SEGMENT_MAGIC.to_vec();
        for r in records {
            encode(&mut out, r);
        }
        out
    }

    fn update(seq: u64) -> Record {
        Record::Update {
            doc: "d".into(),
            seq,
            update: vec![seq as u8; 20],
        }
    }

    #[test]
    fn every_kind_roundtrips() {
        let records = vec![
            update(1),
            Record::Snapshot {
                doc: "é".into(),
                upto: 9,
                len: 100,
                crc: 7,
            },
            Record::Delete { doc: "x".into() },
            Record::Commit(vec![(UPDATE, "d".into(), 1, 1), (DELETE, "x".into(), 0, 0)]),
        ];
        let scanned = scan(&segment(&records)).0;
        let back: Vec<Record> = scanned
            .into_iter()
            .map(|s| match s {
                Scanned::Record { record, .. } => record,
                Scanned::Bad { .. } => panic!("damage in a clean segment"),
            })
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn zeros_after_the_last_record_are_free_space_not_damage() {
        // The commit ends in zero bytes (its range 0..=0): only a record start can begin the
        // free space.
        let records = vec![update(1), Record::Commit(vec![(UPDATE, "d".into(), 0, 0)])];
        let clean = segment(&records);
        let mut padded = clean.clone();
        padded.resize(clean.len() + 4096, 0);
        let (scanned, end) = scan(&padded);
        assert_eq!(end, clean.len());
        assert_eq!(scanned.len(), 2);
        assert!(scanned.iter().all(|s| matches!(s, Scanned::Record { .. })));

        // A torn write into the free space is damage up to the end, not free space.
        padded[clean.len() + 100] = 1;
        let (scanned, end) = scan(&padded);
        assert_eq!(end, padded.len());
        assert!(matches!(
            scanned.last(),
            Some(Scanned::Bad { start, .. }) if *start == clean.len() as u64
        ));
    }

    #[test]
    fn a_flipped_byte_anywhere_hides_only_its_record() {
        let clean = segment(&[update(1), update(2), update(3)]);
        for at in SEGMENT_MAGIC.len()..clean.len() {
            let mut damaged = clean.clone();
            damaged[at] ^= 0x10;
            let scanned = scan(&damaged).0;
            let seqs: Vec<u64> = scanned
                .iter()
                .filter_map(|s| match s {
                    Scanned::Record {
                        record: Record::Update { seq, .. },
                        ..
                    } => Some(*seq),
                    _ => None,
                })
                .collect();
            let bad = scanned
                .iter()
                .filter(|s| matches!(s, Scanned::Bad { .. }))
                .count();
            assert_eq!((seqs.len(), bad), (2, 1), "flip at {at}: {scanned:?}");
        }
    }

    #[test]
    fn a_torn_tail_is_one_bad_range_at_the_end() {
        let clean = segment(&[update(1), update(2)]);
        let torn = &clean[..clean.len() - 5];
        let scanned = scan(torn).0;
        assert!(matches!(scanned[0], Scanned::Record { .. }));
        assert!(matches!(scanned[1], Scanned::Bad { end, .. } if end == torn.len() as u64));
    }
}
