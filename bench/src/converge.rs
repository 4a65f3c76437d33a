//! Convergence after a fan-out run: a fresh client per instance fetches the whole document.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use yrs::{Doc, Transact};

use crate::{client, proto};

/// Every instance must converge: a cluster whose instances disagree has lost an edit somewhere
/// even when the first one holds everything. `converged` is true only when all do; the first
/// instance that does not is named with its figures.
pub async fn check_all(urls: &[String], fr: &proto::Framing, ids: &[u64], sent: &[u64]) -> Value {
    let mut first = None;
    for (k, url) in urls.iter().enumerate() {
        let mut v = check_convergence(url, fr, ids, sent).await;
        if v["converged"].as_bool() != Some(true) {
            v["instance"] = json!(k);
            v["instances_checked"] = json!(urls.len());
            return v;
        }
        first.get_or_insert(v);
    }
    let mut v = first.unwrap_or_else(|| json!({ "converged": null, "error": "no instance" }));
    v["instances_checked"] = json!(urls.len());
    v
}

/// Convergence: a fresh client fetches the whole document after the run; its text must hold
/// every character sent and each writer's clock in it must equal that writer's edit count.
async fn check_convergence(url: &str, fr: &proto::Framing, ids: &[u64], sent: &[u64]) -> Value {
    // Bounded: a saturated server answers a new client only after its backlog, and the run's
    // figures must survive that.
    let doc = match tokio::time::timeout(Duration::from_secs(10), client::fetch_document(url, fr))
        .await
    {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return json!({ "converged": null, "error": format!("{e:#}") }),
        Err(_) => {
            return json!({ "converged": null, "error": "no SyncStep2 within 10 s (server backlog)" })
        }
    };
    let (text_len, clocks) = match document_summary(&doc) {
        Ok(x) => x,
        Err(e) => return json!({ "converged": null, "error": format!("{e:#}") }),
    };
    let matching = ids
        .iter()
        .zip(sent)
        .filter(|(id, n)| clocks.get(id).copied().unwrap_or(0) == **n)
        .count();
    let expected: u64 = sent.iter().sum();
    json!({
        "converged": matching == ids.len() && text_len == expected,
        "text_len": text_len,
        "expected_len": expected,
        "writers_matching": matching,
        "doc_bytes": doc.len(),
    })
}

/// Text length of "t" and the state vector of a v1 update holding a whole document.
pub fn document_summary(update: &[u8]) -> anyhow::Result<(u64, HashMap<u64, u64>)> {
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, ReadTxn};
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let u = yrs::Update::decode_v1(update).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
    doc.transact_mut()
        .apply_update(u)
        .map_err(|e| anyhow::anyhow!("apply: {e}"))?;
    let txn = doc.transact();
    let len = text.get_string(&txn).chars().count() as u64;
    let sv = txn
        .state_vector()
        .iter()
        .map(|(c, k)| (c.get(), u64::from(*k)))
        .collect();
    Ok((len, sv))
}
