//! What the document API asks of storage besides content, in Redis: which documents exist,
//! their sizes, and their versions, so every instance behind a load balancer answers alike.
//!
//! Versions of a document: `collab:{name}:vseq` (the last id given), `collab:{name}:vers` (a
//! sorted set of ids) and one hash `collab:{name}:ver:<id>` per version (`label`, `at`, `state`).

use collab_storage::{DocStats, VersionMeta};
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::content::{entries, EntryKind};
use super::keys;
use super::ClusterError;

fn vseq(name: &str) -> String {
    format!("collab:{{{name}}}:vseq")
}

fn vers(name: &str) -> String {
    format!("collab:{{{name}}}:vers")
}

fn ver(name: &str, id: u64) -> String {
    format!("collab:{{{name}}}:ver:{id}")
}

/// The keys a document's deletion removes besides snapshot and stream.
pub fn version_keys(name: &str) -> [String; 2] {
    [vseq(name), vers(name)]
}

pub async fn exists(conn: &mut ConnectionManager, name: &str) -> Result<bool, ClusterError> {
    Ok(redis::cmd("SISMEMBER")
        .arg(keys::DOCS)
        .arg(name)
        .query_async(conn)
        .await?)
}

pub async fn list(conn: &mut ConnectionManager) -> Result<Vec<String>, ClusterError> {
    Ok(redis::cmd("SMEMBERS")
        .arg(keys::DOCS)
        .query_async(conn)
        .await?)
}

/// Size (snapshot plus the updates still in the stream), the updates in the stream since the
/// last snapshot, the time of the last change, and the number of versions.
pub async fn stats(
    conn: &mut ConnectionManager,
    name: &str,
) -> Result<Option<DocStats>, ClusterError> {
    let (member, snap_len, snap_at, log, versions): (bool, u64, Option<u64>, Value, u64) =
        redis::pipe()
            .cmd("SISMEMBER")
            .arg(keys::DOCS)
            .arg(name)
            .cmd("HSTRLEN")
            .arg(keys::snapshot(name))
            .arg("state")
            .cmd("HGET")
            .arg(keys::snapshot(name))
            .arg("at")
            .cmd("XRANGE")
            .arg(keys::log(name))
            .arg("-")
            .arg("+")
            .cmd("ZCARD")
            .arg(vers(name))
            .query_async(conn)
            .await?;
    if !member {
        return Ok(None);
    }
    let (mut bytes, mut updates, mut last) = (snap_len, 0u64, snap_at.unwrap_or(0));
    for e in entries(&log) {
        if let EntryKind::Update { bytes: u, .. } = &e.kind {
            bytes += u.len() as u64;
            updates += 1;
            last = last.max(e.id.ms);
        }
    }
    Ok(Some(DocStats {
        size_bytes: bytes,
        updates,
        last_modified_ms: last,
        versions,
    }))
}

const PUT_VERSION: &str = r"
local id = redis.call('INCR', KEYS[1])
local key = KEYS[3] .. id
redis.call('HSET', key, 'label', ARGV[1], 'at', ARGV[2], 'state', ARGV[3])
redis.call('ZADD', KEYS[2], id, id)
return id
";

pub async fn put_version(
    conn: &mut ConnectionManager,
    name: &str,
    label: &str,
    state: &[u8],
) -> Result<VersionMeta, ClusterError> {
    let at = super::now_ms();
    let id: u64 = Script::new(PUT_VERSION)
        .key(vseq(name))
        .key(vers(name))
        .key(format!("collab:{{{name}}}:ver:"))
        .arg(label)
        .arg(at)
        .arg(state)
        .invoke_async(conn)
        .await?;
    Ok(VersionMeta {
        id,
        label: label.to_owned(),
        created_at_ms: at,
        size: state.len() as u64,
    })
}

pub async fn versions(
    conn: &mut ConnectionManager,
    name: &str,
) -> Result<Vec<VersionMeta>, ClusterError> {
    let ids: Vec<u64> = redis::cmd("ZRANGE")
        .arg(vers(name))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HMGET").arg(ver(name, *id)).arg("label").arg("at");
        pipe.cmd("HSTRLEN").arg(ver(name, *id)).arg("state");
    }
    let answers: Vec<Value> = pipe.query_async(conn).await?;
    let mut out = Vec::with_capacity(ids.len());
    for (id, pair) in ids.iter().zip(answers.chunks(2)) {
        let [meta, size] = pair else { continue };
        let (label, at): (Option<String>, Option<u64>) = redis::from_redis_value(meta.clone())
            .map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        let size: u64 = redis::from_redis_value(size.clone())
            .map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        if let (Some(label), Some(at)) = (label, at) {
            out.push(VersionMeta {
                id: *id,
                label,
                created_at_ms: at,
                size,
            });
        }
    }
    Ok(out)
}

pub async fn version(
    conn: &mut ConnectionManager,
    name: &str,
    id: u64,
) -> Result<Option<(VersionMeta, Vec<u8>)>, ClusterError> {
    let (label, at, state): (Option<String>, Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
        .arg(ver(name, id))
        .arg("label")
        .arg("at")
        .arg("state")
        .query_async(conn)
        .await?;
    Ok(match (label, at, state) {
        (Some(label), Some(at), Some(state)) => Some((
            VersionMeta {
                id,
                label,
                created_at_ms: at,
                size: state.len() as u64,
            },
            state,
        )),
        _ => None,
    })
}
