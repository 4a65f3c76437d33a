//! A document's content in Redis: loading it, compacting it, deleting it.
//!
//! Layout per document: the stream `collab:{name}:log` of raw Yjs updates (fields `u` = the
//! update, `i` = the document actor that appended it) and markers (`t` = `trim` with `upto`, or `t` =
//! `del`); the hash `collab:{name}:snap` with `state` (a Yjs v1 update of the whole document)
//! and `upto` (the last stream id the state covers).

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::keys::{self, StreamPos};
use super::ClusterError;

/// One decoded stream entry.
#[derive(Debug)]
pub struct Entry {
    pub id: StreamPos,
    pub kind: EntryKind,
}

#[derive(Debug)]
pub enum EntryKind {
    Update {
        origin: Vec<u8>,
        bytes: Vec<u8>,
    },
    /// A compaction wrote a snapshot covering ids up to `upto` and trimmed the stream below.
    Trimmed {
        upto: StreamPos,
    },
    Deleted {
        origin: Vec<u8>,
    },
    /// An update the reading actor appended itself (set by the reader): only its size matters.
    Own {
        len: u64,
    },
    /// Not a document entry (the reader's wake-ups), or a kind a newer instance wrote.
    Other,
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Decodes one `[id, [field, value, ...]]` entry. Kinds this build does not know are `Other`
/// rather than failing the whole document (a newer instance may add kinds).
fn entry(v: &Value) -> Option<Entry> {
    let [id, fields] = items(v) else { return None };
    let id = StreamPos::parse(std::str::from_utf8(bulk(id)?).ok()?)?;
    let fields = match fields {
        Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect::<Vec<_>>(),
        other => items(other).iter().collect(),
    };
    let field = |name: &[u8]| {
        fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && bulk(kv[0]) == Some(name))
            .and_then(|kv| bulk(kv[1]))
    };
    let kind = if let Some(bytes) = field(b"u") {
        EntryKind::Update {
            origin: field(b"i").unwrap_or_default().to_vec(),
            bytes: bytes.to_vec(),
        }
    } else {
        match field(b"t").unwrap_or_default() {
            b"trim" => EntryKind::Trimmed {
                upto: StreamPos::parse(std::str::from_utf8(field(b"upto")?).ok()?)?,
            },
            b"del" => EntryKind::Deleted {
                origin: field(b"i").unwrap_or_default().to_vec(),
            },
            _ => EntryKind::Other,
        }
    };
    Some(Entry { id, kind })
}

pub fn entries(v: &Value) -> Vec<Entry> {
    items(v).iter().filter_map(entry).collect()
}

/// `XREAD` answers `[[key, entries], ...]` in RESP2 and a map in RESP3.
pub fn streams(v: &Value) -> Vec<(String, Vec<Entry>)> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        other => items(other)
            .iter()
            .filter_map(|kv| match items(kv) {
                [k, v] => Some((k, v)),
                _ => None,
            })
            .collect(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| {
            let key = String::from_utf8(bulk(k)?.to_vec()).ok()?;
            Some((key, entries(v)))
        })
        .collect()
}

/// What loading a document from Redis produced.
#[derive(Debug, Default)]
pub struct Loaded {
    pub snapshot: Option<Vec<u8>>,
    /// Updates after the snapshot, in stream order, with their ids.
    pub updates: Vec<(StreamPos, Vec<u8>)>,
    /// The last stream id the loaded content covers; reading continues after it.
    pub position: StreamPos,
}

/// Snapshot and stream in one `MULTI`, so no compaction can fall between the two reads: the
/// stream holds every entry after the snapshot's `upto`, and reading on from `position` misses
/// nothing.
pub async fn load(conn: &mut ConnectionManager, name: &str) -> Result<Loaded, ClusterError> {
    let (snap, log): (Vec<Value>, Value) = redis::pipe()
        .atomic()
        .cmd("HMGET")
        .arg(keys::snapshot(name))
        .arg("state")
        .arg("upto")
        .cmd("XRANGE")
        .arg(keys::log(name))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    let mut loaded = Loaded::default();
    if let [state, upto] = snap.as_slice() {
        if let (Some(state), Some(upto)) = (bulk(state), bulk(upto)) {
            let upto = std::str::from_utf8(upto)
                .ok()
                .and_then(StreamPos::parse)
                .ok_or_else(|| ClusterError::Corrupt(format!("snapshot of {name:?}: bad upto")))?;
            loaded.snapshot = Some(state.to_vec());
            loaded.position = upto;
        }
    }
    let covered = loaded.position;
    for e in entries(&log) {
        if e.id <= covered {
            continue;
        }
        loaded.position = e.id;
        match e.kind {
            EntryKind::Update { bytes, .. } => loaded.updates.push((e.id, bytes)),
            EntryKind::Trimmed { .. } | EntryKind::Own { .. } | EntryKind::Other => {}
            EntryKind::Deleted { .. } => {
                loaded.snapshot = None;
                loaded.updates.clear();
            }
        }
    }
    Ok(loaded)
}

/// Writes the snapshot only while this instance still holds the lease (the fencing check) and
/// only if it covers more of the stream than the stored one, then marks and trims the stream.
/// The marker sits after the trim point, so an instance whose read position is below `upto`
/// meets it and knows it missed entries.
const COMPACT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local cur = redis.call('HGET', KEYS[2], 'upto')
if cur then
  local ms, seq = string.match(cur, '^(%d+)-(%d+)$')
  ms = tonumber(ms); seq = tonumber(seq)
  local nms = tonumber(ARGV[5]); local nseq = tonumber(ARGV[6])
  if ms > nms or (ms == nms and seq >= nseq) then
    redis.call('DEL', KEYS[1])
    return -2
  end
end
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'upto', ARGV[3], 'at', ARGV[7])
redis.call('XADD', KEYS[3], '*', 't', 'trim', 'upto', ARGV[3])
local n = redis.call('XTRIM', KEYS[3], 'MINID', ARGV[4])
redis.call('DEL', KEYS[1])
return n
";

/// How long a compaction lease lasts; far longer than writing one snapshot takes.
const LEASE_MS: u64 = 30_000;

#[derive(Debug, PartialEq, Eq)]
pub enum Compacted {
    /// Snapshot written; this many entries were trimmed.
    Trimmed(u64),
    /// Another instance holds the lease.
    Busy,
    /// The stored snapshot already covers as much.
    Stale,
}

pub async fn compact(
    conn: &mut ConnectionManager,
    name: &str,
    state: &[u8],
    upto: StreamPos,
) -> Result<Compacted, ClusterError> {
    let token = uuid::Uuid::new_v4().to_string();
    let got: Option<String> = redis::cmd("SET")
        .arg(keys::lease(name))
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(LEASE_MS)
        .query_async(conn)
        .await?;
    if got.is_none() {
        return Ok(Compacted::Busy);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let n: i64 = Script::new(COMPACT)
        .key(keys::lease(name))
        .key(keys::snapshot(name))
        .key(keys::log(name))
        .arg(&token)
        .arg(state)
        .arg(upto.to_string())
        .arg(upto.next().to_string())
        .arg(upto.ms)
        .arg(upto.seq)
        .arg(now)
        .invoke_async(conn)
        .await?;
    Ok(match n {
        -1 => Compacted::Busy,
        -2 => Compacted::Stale,
        n => Compacted::Trimmed(n.max(0) as u64),
    })
}

/// Empties the document for every instance: the snapshot and the versions go, the stream keeps its last id
/// (so new ids stay above every reader's position) and gets a `del` marker that tells the
/// instances holding the document to drop their copy.
const DELETE: &str = r"
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local existed = redis.call('EXISTS', KEYS[1]) == 1
if #last > 0 and not (last[1][2][1] == 't' and last[1][2][2] == 'del') then existed = true end
redis.call('DEL', KEYS[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  redis.call('DEL', KEYS[5] .. id)
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('XTRIM', KEYS[2], 'MAXLEN', 0)
redis.call('XADD', KEYS[2], '*', 't', 'del', 'i', ARGV[1])
if existed then return 1 else return 0 end
";

pub async fn delete(
    conn: &mut ConnectionManager,
    name: &str,
    origin: &str,
) -> Result<bool, ClusterError> {
    let [vseq, vers] = super::catalog::version_keys(name);
    let existed: i64 = Script::new(DELETE)
        .key(keys::snapshot(name))
        .key(keys::log(name))
        .key(&vseq)
        .key(&vers)
        .key(format!("collab:{{{name}}}:ver:"))
        .arg(origin)
        .invoke_async(conn)
        .await?;
    let _: i64 = redis::cmd("SREM")
        .arg(keys::DOCS)
        .arg(name)
        .query_async(conn)
        .await?;
    Ok(existed == 1)
}
