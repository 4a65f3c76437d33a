//! Crash safety under load: 20+ SIGKILLs of the real server at random moments while clients
//! edit, each followed by a restart on the same data folder. After every round, every edit any
//! client saw acknowledged is in what a fresh client loads, the clients re-converge with the
//! server, and the data folder stays within the disk bound. `scripts/soak.sh` runs the same for
//! 200 rounds.

mod common;
mod soak_harness;

use soak_harness::{disk_bound, run, SoakConfig};

#[tokio::test]
async fn nothing_acknowledged_is_lost_across_random_kills() {
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("SOAK_SEED={seed}");
    let report = run(&SoakConfig {
        rounds: 20,
        clients: 2,
        docs: 2,
        // Frequent compactions, so that some kills land in the middle of one.
        server_args: vec!["--compact-after-updates".into(), "50".into()],
        preload_chars: 0,
        edit_ms: (100, 1200),
        seed,
        verbose: true,
    })
    .await;
    assert_eq!(report.rounds, 20);
    assert!(report.echoed_edits > 0, "no edit was ever acknowledged");
    assert_eq!(
        report.lost_edits, 0,
        "acknowledged edits were lost: {report:?}"
    );
    assert!(
        report.over_bound.is_none(),
        "data folder over the bound ({} bytes for {} encoded): {report:?}",
        disk_bound(report.encoded_bytes),
        report.encoded_bytes
    );
}
