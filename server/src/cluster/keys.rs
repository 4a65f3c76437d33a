//! Redis key names and stream positions.
//!
//! Every key of a document carries the name as a hash tag (`collab:{name}:...`), so they all
//! hash to one Redis Cluster slot and the multi-key scripts below stay legal there.

use std::fmt;

pub fn log(name: &str) -> String {
    format!("collab:{{{name}}}:log")
}

pub fn snapshot(name: &str) -> String {
    format!("collab:{{{name}}}:snap")
}

pub fn lease(name: &str) -> String {
    format!("collab:{{{name}}}:lease")
}

pub fn awareness(name: &str) -> String {
    format!("collab:{{{name}}}:aw")
}

/// The document a `log` key or an `awareness` channel belongs to. The name is recovered by the
/// fixed prefix and suffix, so names that contain braces round-trip.
pub fn doc_of<'a>(key: &'a str, suffix: &str) -> Option<&'a str> {
    key.strip_prefix("collab:{")?
        .strip_suffix(suffix)?
        .strip_suffix('}')
}

/// The set of every document name ever written in cluster mode.
pub const DOCS: &str = "collab:docs";

/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPos {
    pub ms: u64,
    pub seq: u64,
}

impl StreamPos {
    pub const ZERO: StreamPos = StreamPos { ms: 0, seq: 0 };

    pub fn parse(s: &str) -> Option<StreamPos> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamPos {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id after this one: `XTRIM MINID` keeps ids at or above its argument.
    pub fn next(self) -> StreamPos {
        match self.seq.checked_add(1) {
            Some(seq) => StreamPos { ms: self.ms, seq },
            None => StreamPos {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for StreamPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag_and_round_trip() {
        for name in ["notes", "a}b", "x{y", "team/doc 1"] {
            assert_eq!(doc_of(&log(name), ":log"), Some(name));
            assert_eq!(doc_of(&awareness(name), ":aw"), Some(name));
        }
        assert_eq!(doc_of("collab:docs", ":log"), None);
    }

    #[test]
    fn positions_order_like_redis_ids() {
        let a = StreamPos::parse("1700000000000-5").unwrap();
        let b = StreamPos::parse("1700000000001-0").unwrap();
        assert!(a < b && a.next() < b);
        assert_eq!(a.next().to_string(), "1700000000000-6");
        assert_eq!(StreamPos::parse("nope"), None);
    }
}
