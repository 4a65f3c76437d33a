//! Storage: `cold` opens a stored document after a server restart on the same data folder
//! (connect → SyncStep2 of the first client, which makes the server load it from disk); `churn`
//! measures write amplification, bytes the server writes per byte of final document, over a
//! workload of inserts and deletes.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use yrs::{Doc, GetString, ReadTxn, Text, Transact};

use crate::client::{self, SplitMix};
use crate::join;
use crate::proto::{self, Msg};
use crate::server::Server;
use crate::stats::{round, summary_ms};

#[derive(Args, Debug, Clone)]
pub struct ColdArgs {
    #[command(flatten)]
    pub trace: join::TraceArgs,
    /// Restarts, each followed by one cold and one warm join.
    #[arg(long, default_value_t = 3)]
    pub restarts: usize,
    /// Seconds between the last connection closing and the restart (lets a server that stores
    /// on idle or on close finish).
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    #[arg(long, default_value = "bench-cold")]
    pub doc: String,
}

pub async fn cold(
    a: &ColdArgs,
    server: &mut Server,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    let url = server.url(&a.doc);
    let fr = server.framing(&a.doc);
    let generator = a.trace.generator();
    let built = join::build(&url, &fr, generator, a.trace.ops, a.trace.batch).await?;
    let stored = client::fetch_document(&url, &fr).await?;
    let doc_bytes = stored.len();
    let doc_clocks = clocks(&stored);
    client::close_gracefully(built.sink, built.stream).await;
    let mut cold_ms = Vec::new();
    let mut warm_ms = Vec::new();
    let mut restart_s = Vec::new();
    let mut rss_loaded = Vec::new();
    let mut lost = 0usize;
    let mut complete_ms = Vec::new();
    let mut step2_short = 0usize;
    for _ in 0..a.restarts.max(1) {
        tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
        restart_s.push(tokio::task::block_in_place(|| server.restart())?);
        // Measured from the first connect attempt on a listening server.
        let t0 = Instant::now();
        let mut first =
            client::connect_synced_opts(&url, &fr, None, Duration::from_secs(60), true).await?;
        cold_ms.push(first.sync_time.as_secs_f64() * 1000.0);
        // A server that answers before it has loaded (y-websocket with LevelDB) sends a short
        // SyncStep2 and the rest as an update later: also time until the client has it all.
        let mut have = clocks(first.step2.as_deref().unwrap_or_default());
        if have < doc_clocks {
            step2_short += 1;
        }
        // LevelDB's late remainder arrives within a few hundred ms; an in-memory server never
        // sends it, and waiting long for that would only run into --max-seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while have < doc_clocks {
            match tokio::time::timeout_at(deadline, first.stream.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    fr.messages(&b, |m| {
                        if let Msg::Update(u) = m {
                            have += clocks(u);
                        }
                    });
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        if have < doc_clocks {
            lost += 1;
            // Every later restart would lose it again; one is enough to say so.
            client::close_gracefully(first.sink, first.stream).await;
            break;
        } else {
            complete_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        let second = client::connect_synced(&url, &fr, None, Duration::from_secs(60)).await?;
        warm_ms.push(second.sync_time.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        rss_loaded.extend(server.rss_kb());
        client::close_gracefully(second.sink, second.stream).await;
        client::close_gracefully(first.sink, first.stream).await;
    }
    rss_loaded.sort();
    let persisted = lost == 0;
    let j = json!({
        "scenario": "cold",
        "ops": a.trace.ops,
        "word": a.trace.word,
        "doc_bytes": doc_bytes,
        "build_s": round(built.build_s, 3),
        "restarts": a.restarts.max(1),
        "persisted": persisted,
        "restarts_losing_the_document": lost,
        "restart_to_listen_ms": summary_ms(restart_s.iter().map(|s| s * 1000.0).collect()),
        // Only meaningful when the document survived; an in-memory server answers at once
        // with an empty document.
        "cold_ms": if persisted { summary_ms(cold_ms) } else { Value::Null },
        "first_step2_incomplete": step2_short,
        "complete_ms": if persisted { summary_ms(complete_ms) } else { Value::Null },
        "warm_ms": summary_ms(warm_ms),
        "rss_kb_loaded": rss_loaded.get(rss_loaded.len() / 2),
        "data_dir_bytes": server.dir_bytes(),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let rows = vec![
        (
            "document".into(),
            format!(
                "{} ops, {doc_bytes} bytes encoded, {} bytes in the data folder",
                a.trace.ops,
                f(&j["data_dir_bytes"])
            ),
        ),
        (
            "after restart: first join ms p50/max".into(),
            if persisted {
                format!("{} / {}", f(&j["cold_ms"]["p50"]), f(&j["cold_ms"]["max"]))
            } else {
                format!("n/a: the document did not survive {lost} restarts")
            },
        ),
        (
            "after restart: whole document at the client ms p50/max".into(),
            format!(
                "{} / {} ({step2_short} restarts answered with an incomplete SyncStep2)",
                f(&j["complete_ms"]["p50"]),
                f(&j["complete_ms"]["max"])
            ),
        ),
        (
            "second join ms p50".into(),
            f(&j["warm_ms"]["p50"]).to_string(),
        ),
        (
            "restart → listening ms p50".into(),
            f(&j["restart_to_listen_ms"]["p50"]).to_string(),
        ),
    ];
    Ok((j, rows))
}

/// Total clock length of the structs in an update (characters and GC'd ranges).
fn clocks(update: &[u8]) -> u64 {
    let mut n = 0;
    proto::update_ranges(update, |_, _, l| n += l);
    n
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Edits: inserts of 1–8 characters (60 %) and deletions of 1–16 characters (40 %).
    #[arg(long, default_value_t = 20_000)]
    pub ops: usize,
    /// Edits per update message (1: every keystroke is its own update, as an editor sends).
    #[arg(long, default_value_t = 1)]
    pub per_update: usize,
    /// Updates sent before waiting for the server to catch up.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Seconds after the last echo before reading the counters (background flushes).
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    #[arg(long, default_value = "bench-churn")]
    pub doc: String,
}

/// Reads the writer's socket until an echo of its own insert reaching `until` (exclusive clock)
/// has arrived; deletions carry no clock, so the caller ends every window with an insert.
async fn wait_echo(
    stream: &mut client::Stream,
    fr: &proto::Framing,
    me: u64,
    echoed: &mut u64,
    until: u64,
) -> anyhow::Result<()> {
    while *echoed < until {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .map_err(|_| anyhow!("no echo up to clock {until} within 30 s"))?;
        match m {
            Some(Ok(Message::Binary(b))) => {
                fr.messages(&b, |m| {
                    if let Msg::Update(u) = m {
                        proto::update_ranges(u, |c, k, l| {
                            if c == me {
                                *echoed = (*echoed).max(k + l);
                            }
                        });
                    }
                });
            }
            Some(Ok(Message::Close(c))) => bail!("server closed the writer: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("writer connection: {e}"),
            None => bail!("writer connection ended"),
        }
    }
    Ok(())
}

pub async fn churn(
    a: &ChurnArgs,
    server: &Server,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    let url = server.url(&a.doc);
    let fr = server.framing(&a.doc);
    let mut rng = SplitMix(a.seed);
    let me = rng.client_id();
    let doc = Doc::with_client_id(me);
    let text = doc.get_or_insert_text("t");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let io0 = server.io_write_bytes();
    let dir0 = server.dir_bytes();
    let w = client::connect_synced(&url, &fr, None, Duration::from_secs(15)).await?;
    let (mut sink, mut stream) = (w.sink, w.stream);
    let t0 = Instant::now();
    let (mut inserts, mut deletes, mut sent_bytes, mut updates) = (0u64, 0u64, 0usize, 0usize);
    let mut echoed = 0u64;
    let mut done = 0;
    let per = a.per_update.max(1);
    while done < a.ops {
        let last_window = done + per * a.window.max(1) >= a.ops;
        for _ in 0..a.window.max(1) {
            if done >= a.ops {
                break;
            }
            let update = {
                let mut txn = doc.transact_mut();
                for _ in 0..per.min(a.ops - done) {
                    let len = text.len(&txn);
                    if len > 0 && rng.chance(0.4) {
                        let at = rng.below(u64::from(len)) as u32;
                        let n = (1 + rng.below(16) as u32).min(len - at);
                        text.remove_range(&mut txn, at, n);
                        deletes += 1;
                    } else {
                        let at = rng.below(u64::from(len) + 1) as u32;
                        let n = 1 + rng.below(8) as usize;
                        let s: String = (0..n)
                            .map(|_| (b'a' + rng.below(26) as u8) as char)
                            .collect();
                        text.insert(&mut txn, at, &s);
                        inserts += 1;
                    }
                    done += 1;
                }
                txn.encode_update_v1()
            };
            sent_bytes += update.len();
            updates += 1;
            sink.send(Message::binary(fr.frame(&proto::update_message(&update))))
                .await?;
        }
        // A one-character insert closes the window: its echo means the server applied (and,
        // if durable, stored) everything before it.
        let update = {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, ".");
            txn.encode_update_v1()
        };
        inserts += 1;
        sent_bytes += update.len();
        updates += 1;
        sink.send(Message::binary(fr.frame(&proto::update_message(&update))))
            .await?;
        let until = u64::from(
            doc.transact()
                .state_vector()
                .get(&yrs::block::ClientID::new(me)),
        );
        wait_echo(&mut stream, &fr, me, &mut echoed, until).await?;
        if last_window && done >= a.ops {
            break;
        }
    }
    let churn_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let io1 = server.io_write_bytes();
    let dir1 = server.dir_bytes();
    // The writer stays connected: an in-memory server keeps the document only while in use.
    let fetched = client::fetch_document(&url, &fr).await?;
    let local_text = text.get_string(&doc.transact());
    let (remote_len, _) = crate::converge::document_summary(&fetched)?;
    let remote_text = {
        use yrs::updates::decoder::Decode;
        let d = Doc::new();
        let t = d.get_or_insert_text("t");
        d.transact_mut()
            .apply_update(yrs::Update::decode_v1(&fetched)?)
            .map_err(|e| anyhow!("apply: {e}"))?;
        let s = t.get_string(&d.transact());
        s
    };
    let local_state = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default())
        .len();
    client::close_gracefully(sink, stream).await;
    let doc_bytes = fetched.len();
    let io = match (io0, io1) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    let dir = match (dir0, dir1) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    let per_doc_byte = |v: Option<u64>| {
        v.filter(|_| doc_bytes > 0)
            .map(|b| round(b as f64 / doc_bytes as f64, 3))
    };
    let j = json!({
        "scenario": "churn",
        "ops": a.ops,
        "per_update": per,
        "updates": updates,
        "inserts": inserts,
        "deletes": deletes,
        "sent_bytes": sent_bytes,
        "churn_s": round(churn_s, 3),
        "doc_bytes": doc_bytes,
        "local_state_bytes": local_state,
        "text_len": remote_len,
        "converged": remote_text == local_text,
        "io_write_bytes": io,
        "data_dir_bytes": dir,
        "write_amplification": per_doc_byte(io),
        "dir_per_doc_byte": per_doc_byte(dir),
        "written_per_sent_byte": io.filter(|_| sent_bytes > 0).map(|b| round(b as f64 / sent_bytes as f64, 3)),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let rows = vec![
        (
            "workload".into(),
            format!(
                "{updates} updates ({inserts} inserts, {deletes} deletes), {sent_bytes} bytes sent, {churn_s:.2} s"
            ),
        ),
        (
            "final document".into(),
            format!(
                "{doc_bytes} bytes encoded ({local_state} locally), {remote_len} characters, converged: {}",
                j["converged"]
            ),
        ),
        (
            "written by the server".into(),
            format!(
                "{} bytes (/proc/PID/io) = {} × the document",
                f(&j["io_write_bytes"]),
                f(&j["write_amplification"])
            ),
        ),
        (
            "data folder".into(),
            format!(
                "{} bytes = {} × the document",
                f(&j["data_dir_bytes"]),
                f(&j["dir_per_doc_byte"])
            ),
        ),
    ];
    Ok((j, rows))
}
