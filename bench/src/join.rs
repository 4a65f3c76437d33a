//! Join: one client builds a large document deterministically (single-character inserts from a
//! seeded generator, sent in batches, each batch waiting for its echo); then M fresh clients join
//! at once and the time from connect to SyncStep2 received is measured, with the server's RSS.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, SplitMix, Trouble};
use crate::proto::{self, Msg};
use crate::server::Server;
use crate::stats::{round, summary_ms};

/// The deterministic editing trace a stored document is built from (join and cold share it).
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// Single-character insert operations in the document.
    #[arg(long, default_value_t = 260_000)]
    pub ops: usize,
    /// Operations per update sent while building.
    #[arg(long, default_value_t = 2_000)]
    pub batch: usize,
    /// Chance that an insert goes to a random position instead of after the previous one.
    #[arg(long, default_value_t = 0.025)]
    pub jump: f64,
    /// Longest word one operation inserts (1–N characters, uniformly); 1 types characters.
    /// Words reach multi-megabyte documents with a few million operations.
    #[arg(long, default_value_t = 1)]
    pub word: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl TraceArgs {
    pub fn generator(&self) -> DocGen {
        DocGen::new(self.seed, self.jump).with_word(self.word)
    }
}

#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Numbers of clients that join at once (one measurement each).
    #[arg(long, value_delimiter = ',', default_value = "1,150")]
    pub clients: Vec<usize>,
    /// Repetitions of each measurement (fresh clients every time).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "bench-join")]
    pub doc: String,
}

/// The document's words in order, as (first clock, length) of the one writing client: insert at
/// an index and read neighbours in chunks of at most 1024. Locating walks from the chunk of the
/// previous access, so typing on (the common case) costs O(1) and only jumps walk the chunks.
struct Seq {
    chunks: Vec<Vec<(u32, u32)>>,
    len: usize,
    /// Chunk of the last access and the index of its first element.
    hint: (usize, usize),
}

impl Seq {
    fn new() -> Seq {
        Seq {
            chunks: vec![Vec::new()],
            len: 0,
            hint: (0, 0),
        }
    }
    /// Chunk and offset of index `i` (`i == len` gives the end of the last chunk).
    fn locate(&mut self, i: usize) -> (usize, usize) {
        let (mut c, mut start) = self.hint;
        while i < start {
            c -= 1;
            start -= self.chunks[c].len();
        }
        while i >= start + self.chunks[c].len() && c + 1 < self.chunks.len() {
            start += self.chunks[c].len();
            c += 1;
        }
        self.hint = (c, start);
        (c, i - start)
    }
    fn get(&mut self, i: usize) -> (u32, u32) {
        let (c, o) = self.locate(i);
        self.chunks[c][o]
    }
    fn insert(&mut self, i: usize, v: (u32, u32)) {
        let (c, o) = self.locate(i);
        self.chunks[c].insert(o, v);
        self.len += 1;
        if self.chunks[c].len() > 1024 {
            let tail = self.chunks[c].split_off(512);
            self.chunks.insert(c + 1, tail);
        }
    }
}

/// Deterministic typing: single-character inserts after the previous one, with a chance per
/// insert of jumping to a random position first. Encodes each batch as a Yjs v1 update by hand
/// (consecutive inserts become one string item, as Yjs itself would encode them), which keeps
/// building a 260,000-operation document well under a second.
pub struct DocGen {
    rng: SplitMix,
    seq: Seq,
    pub client: u64,
    clock: u32,
    cursor: usize,
    jump: f64,
    word: usize,
}

struct Run {
    start: u32,
    origin: Option<u32>,
    right: Option<u32>,
    text: Vec<u8>,
}

impl DocGen {
    pub fn new(seed: u64, jump: f64) -> DocGen {
        let mut rng = SplitMix(seed);
        let client = rng.client_id();
        DocGen {
            rng,
            seq: Seq::new(),
            client,
            clock: 0,
            cursor: 0,
            jump,
            word: 1,
        }
    }

    /// Operations insert words of 1..=`word` characters instead of single characters.
    pub fn with_word(mut self, word: usize) -> DocGen {
        self.word = word.max(1);
        self
    }

    pub fn next_batch(&mut self, n: usize) -> Vec<u8> {
        let first = self.clock;
        let mut runs: Vec<Run> = Vec::new();
        for _ in 0..n {
            let len = self.seq.len;
            if self.rng.chance(self.jump) || self.cursor > len {
                self.cursor = self.rng.below(len as u64 + 1) as usize;
            }
            // Single characters draw nothing extra, which keeps the 260,000-character
            // document of earlier results byte for byte the same.
            let wlen = if self.word > 1 {
                1 + self.rng.below(self.word as u64) as u32
            } else {
                1
            };
            let left = (self.cursor > 0).then(|| {
                let (start, l) = self.seq.get(self.cursor - 1);
                start + l - 1
            });
            let right = (self.cursor < len).then(|| self.seq.get(self.cursor).0);
            for k in 0..wlen {
                let c = b'a' + self.rng.below(26) as u8;
                match runs.last_mut() {
                    Some(r)
                        if (k > 0 || (self.clock > 0 && left == Some(self.clock - 1)))
                            && r.right == right =>
                    {
                        r.text.push(c)
                    }
                    _ => runs.push(Run {
                        start: self.clock,
                        origin: left,
                        right,
                        text: vec![c],
                    }),
                }
                self.clock += 1;
            }
            self.seq.insert(self.cursor, (self.clock - wlen, wlen));
            self.cursor += 1;
        }
        let mut u = Vec::with_capacity(n + runs.len() * 20 + 16);
        proto::write_var(&mut u, 1);
        proto::write_var(&mut u, runs.len() as u64);
        proto::write_var(&mut u, self.client);
        proto::write_var(&mut u, u64::from(first));
        for r in &runs {
            debug_assert!(r.start >= first);
            let mut info = 4u8;
            if r.origin.is_some() {
                info |= 0x80;
            }
            if r.right.is_some() {
                info |= 0x40;
            }
            u.push(info);
            if let Some(o) = r.origin {
                proto::write_var(&mut u, self.client);
                proto::write_var(&mut u, u64::from(o));
            }
            if let Some(o) = r.right {
                proto::write_var(&mut u, self.client);
                proto::write_var(&mut u, u64::from(o));
            }
            if info & 0xC0 == 0 {
                proto::write_var(&mut u, 1);
                proto::write_var(&mut u, 1);
                u.push(b't');
            }
            proto::write_var(&mut u, r.text.len() as u64);
            u.extend_from_slice(&r.text);
        }
        proto::write_var(&mut u, 0); // empty delete set
        u
    }
}

/// The building writer, still connected, and what building cost.
pub struct Built {
    pub sink: client::Sink,
    pub stream: client::Stream,
    pub build_s: f64,
    /// Of which spent generating updates in this process.
    pub local_s: f64,
    pub sent_bytes: usize,
}

/// Connects a writer and sends `ops` operations of `generator` in batches, each waiting for its
/// echo (the server has applied and, for collab, stored it).
pub async fn build(
    url: &str,
    fr: &proto::Framing,
    mut generator: DocGen,
    ops: usize,
    batch: usize,
) -> anyhow::Result<Built> {
    if batch == 0 {
        bail!("--batch must be positive");
    }
    let writer = client::connect_synced(url, fr, None, Duration::from_secs(15)).await?;
    let (mut sink, mut stream) = (writer.sink, writer.stream);
    let t_build = Instant::now();
    let mut local = Duration::ZERO;
    let mut done = 0;
    let mut sent_bytes = 0usize;
    while done < ops {
        let n = batch.min(ops - done);
        let t = Instant::now();
        let update = generator.next_batch(n);
        local += t.elapsed();
        sent_bytes += update.len();
        sink.send(Message::binary(fr.frame(&proto::update_message(&update))))
            .await?;
        done += n;
        let echo = async {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        let mut is_update = false;
                        fr.messages(&b, |m| is_update |= matches!(m, Msg::Update(_)));
                        if is_update {
                            return Ok(());
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        return Err(anyhow!("server closed the writer: {c:?}"))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(anyhow!("writer connection: {e}")),
                    None => return Err(anyhow!("writer connection ended")),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), echo)
            .await
            .map_err(|_| anyhow!("no echo of batch ending at op {done} within 60 s"))??;
    }
    Ok(Built {
        sink,
        stream,
        build_s: t_build.elapsed().as_secs_f64(),
        local_s: local.as_secs_f64(),
        sent_bytes,
    })
}

pub async fn run(a: &JoinArgs, server: &Server) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    let trouble = Trouble::default();
    let url = server.url(&a.doc);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = server.rss_kb();

    // Build the document.
    let fr = server.framing(&a.doc);
    let generator = a.trace.generator();
    let Built {
        mut sink,
        mut stream,
        build_s,
        local_s,
        sent_bytes,
    } = build(&url, &fr, generator, a.trace.ops, a.trace.batch).await?;
    // Keep the writer connected (the document stays loaded) and drain its socket meanwhile.
    let mut drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut samples: Vec<u64> = Vec::new();
    for _ in 0..5 {
        samples.extend(server.rss_kb());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples.sort();
    let rss_loaded = samples.get(samples.len() / 2).copied();

    // Joins.
    let mut joins = Vec::new();
    let mut rows: Vec<(String, String)> = Vec::new();
    for &m in &a.clients {
        let mut times = Vec::new();
        let mut step2 = Vec::new();
        let mut failures = 0usize;
        let cpu0 = server.cpu_seconds();
        for _ in 0..a.rounds.max(1) {
            let u = url.clone();
            let fr = fr.clone();
            let res = client::bounded(m, m, move |_| {
                let u = u.clone();
                let fr = fr.clone();
                async move {
                    let s = client::connect_synced(&u, &fr, None, Duration::from_secs(30)).await?;
                    let r = (s.sync_time, s.step2_bytes);
                    client::close_gracefully(s.sink, s.stream).await;
                    anyhow::Ok(r)
                }
            })
            .await;
            for r in res {
                match r {
                    Ok((d, b)) => {
                        times.push(d.as_secs_f64() * 1000.0);
                        step2.push(b);
                    }
                    Err(e) => {
                        failures += 1;
                        trouble.connect_errors.fetch_add(1, Ordering::Relaxed);
                        trouble.note(format!("{e:#}"));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let cpu1 = server.cpu_seconds();
        step2.sort();
        let s = summary_ms(times);
        let cpu_per_join = match (cpu0, cpu1) {
            (Some(x), Some(y)) if !step2.is_empty() => {
                Some(round((y - x) * 1000.0 / step2.len() as f64, 3))
            }
            _ => None,
        };
        let f = |v: &Value| crate::stats::fmt_opt(v);
        rows.push((
            format!("{m} joining at once, ms p50/p99/max"),
            format!(
                "{} / {} / {} ({} joins, {} failed, {} ms CPU each)",
                f(&s["p50"]),
                f(&s["p99"]),
                f(&s["max"]),
                step2.len(),
                failures,
                cpu_per_join.map_or("-".into(), |c| c.to_string())
            ),
        ));
        joins.push(json!({
            "clients": m,
            "rounds": a.rounds.max(1),
            "sync_ms": s,
            "failures": failures,
            "step2_bytes": step2.get(step2.len() / 2),
            "server_cpu_ms_per_join": cpu_per_join,
        }));
    }
    let rss_after = server.rss_kb();
    // The document's size as the server encodes it: the SyncStep2 a fresh client received.
    let doc_bytes = joins.first().and_then(|j| j["step2_bytes"].as_u64());
    let _ = sink.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut drain).await;
    drain.abort();
    let delta = match (rss_idle, rss_loaded) {
        (Some(i), Some(l)) => Some(l as i64 - i as i64),
        _ => None,
    };
    let j = json!({
        "scenario": "join",
        "ops": a.trace.ops,
        "batch": a.trace.batch,
        "jump": a.trace.jump,
        "seed": a.trace.seed,
        "doc_bytes": doc_bytes,
        "sent_bytes": sent_bytes,
        "build_s": round(build_s, 3),
        "build_local_s": round(local_s, 3),
        "word": a.trace.word,
        "rss_kb": {"idle": rss_idle, "loaded": rss_loaded, "after_joins": rss_after},
        "rss_delta_kb": delta,
        "joins": joins,
        "trouble": trouble.json(),
    });
    let mut head: Vec<(String, String)> = vec![
        ("document".into(), format!("{} ops, {} bytes sent in batches, {} bytes in a SyncStep2, built in {build_s:.2} s ({local_s:.2} s generating)", a.trace.ops, sent_bytes, doc_bytes.unwrap_or(0))),
        ("server RSS KiB idle → loaded".into(), format!("{} → {} (+{} KiB)", rss_idle.unwrap_or(0), rss_loaded.unwrap_or(0), delta.unwrap_or(0))),
    ];
    head.extend(rows);
    Ok((j, head))
}

#[cfg(test)]
mod tests {
    use super::DocGen;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Transact, Update};

    /// The hand-encoded updates are what Yjs would accept, and give the text a naive model
    /// of the same operations gives (words of one character, and of up to 7).
    #[test]
    fn generated_updates_match_a_naive_model() {
        for word in [1usize, 7] {
            let mut g = DocGen::new(3, 0.2).with_word(word);
            let mut model = DocGen::new(3, 0.2).with_word(word);
            let doc = yrs::Doc::new();
            let text = doc.get_or_insert_text("t");
            let mut naive: Vec<Vec<u8>> = Vec::new();
            for _ in 0..20 {
                let u = g.next_batch(250);
                doc.transact_mut()
                    .apply_update(Update::decode_v1(&u).expect("decodes"))
                    .expect("applies");
                // replay the same random choices against a plain vector of words
                for _ in 0..250 {
                    let len = naive.len();
                    if model.rng.chance(model.jump) || model.cursor > len {
                        model.cursor = model.rng.below(len as u64 + 1) as usize;
                    }
                    let wlen = if word > 1 {
                        1 + model.rng.below(word as u64) as usize
                    } else {
                        1
                    };
                    let w: Vec<u8> = (0..wlen)
                        .map(|_| b'a' + model.rng.below(26) as u8)
                        .collect();
                    naive.insert(model.cursor, w);
                    model.cursor += 1;
                }
            }
            let got = text.get_string(&doc.transact());
            let want = naive.concat();
            if word == 1 {
                assert_eq!(got.len(), 5000);
            }
            assert_eq!(got.as_bytes(), &want[..], "word {word}");
        }
    }
}
