//! The long crash-safety soak behind `scripts/soak.sh`: the same rounds as `tests/soak.rs`, as
//! many as asked, printing one line per round and a summary
//! `rounds, echoed edits, lost edits, data folder MB`.
//!
//! cargo run -p collab-tests --example soak -- [ROUNDS] [PRELOAD_CHARS] [-- SERVER ARGS...]
//! Exits 1 if an acknowledged edit was lost or the data folder outgrew its bound.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/soak_harness/mod.rs"]
mod soak_harness;

use soak_harness::{disk_bound, run, SoakConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut server_args = Vec::new();
    while let Some(a) = args.next() {
        if a == "--" {
            server_args.extend(args.by_ref());
        } else {
            positional.push(a);
        }
    }
    let rounds = positional
        .first()
        .map_or(200, |s| s.parse().expect("ROUNDS"));
    let preload_chars = positional
        .get(1)
        .map_or(0, |s| s.parse().expect("PRELOAD_CHARS"));
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let verbose = std::env::var_os("SOAK_QUIET").is_none();
    println!(
        "SOAK_SEED={seed} rounds={rounds} preload={preload_chars} server args={server_args:?}"
    );
    let report = run(&SoakConfig {
        rounds,
        clients: 2,
        docs: 2,
        server_args,
        preload_chars,
        edit_ms: (100, 1500),
        seed,
        verbose,
    })
    .await;
    println!("rounds, echoed edits, lost edits, data folder MB");
    println!(
        "{}, {}, {}, {:.2}",
        report.rounds,
        report.echoed_edits,
        report.lost_edits,
        report.data_bytes as f64 / 1e6
    );
    println!(
        "(largest data folder {:.2} MB; documents encode to {:.2} MB; bound {:.2} MB)",
        report.max_data_bytes as f64 / 1e6,
        report.encoded_bytes as f64 / 1e6,
        disk_bound(report.encoded_bytes) as f64 / 1e6
    );
    if let Some((round, size, bound)) = report.over_bound {
        println!("OVER BOUND at round {round}: {size} bytes > {bound}");
    }
    if report.lost_edits > 0 || report.over_bound.is_some() {
        std::process::exit(1);
    }
}
