//! The entries of a document's stream that its snapshot does not cover yet, as this instance
//! read them (its own appends included, once read back): what the compaction policy counts in
//! cluster mode. Entries leave when a snapshot covering them is written, by this instance or,
//! as its trim marker tells, by another.

use std::collections::VecDeque;

use super::keys::StreamPos;

#[derive(Debug, Default)]
pub struct Backlog {
    entries: VecDeque<(StreamPos, u64)>,
    bytes: u64,
}

impl Backlog {
    pub fn push(&mut self, id: StreamPos, len: u64) {
        self.entries.push_back((id, len));
        self.bytes += len;
    }

    /// Forgets the entries a snapshot up to `upto` covers.
    pub fn trim(&mut self, upto: StreamPos) {
        while let Some(&(id, len)) = self.entries.front() {
            if id > upto {
                break;
            }
            self.entries.pop_front();
            self.bytes -= len;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub fn count(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(ms: u64) -> StreamPos {
        StreamPos { ms, seq: 0 }
    }

    #[test]
    fn trimming_forgets_exactly_what_the_snapshot_covers() {
        let mut b = Backlog::default();
        for ms in 1..=5 {
            b.push(pos(ms), 10 * ms);
        }
        b.trim(pos(3));
        assert_eq!((b.count(), b.bytes()), (2, 90));
        b.trim(pos(2));
        assert_eq!(b.count(), 2);
        b.trim(pos(9));
        assert_eq!((b.count(), b.bytes()), (0, 0));
    }
}
