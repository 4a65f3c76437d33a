#!/usr/bin/env bash
# The crash-safety soak at full length: the real server under continuous edits, SIGKILLed at
# random moments 200 times and restarted on the same data folder; then the same again with
# `--compact-after-updates 10`, so that kills land in the middle of compactions. Each run ends
# with `rounds, echoed edits, lost edits, data folder MB` and fails if an acknowledged edit was
# lost or the data folder outgrew its bound (4x the encoded documents + 4 MiB).
#
#   scripts/soak.sh [ROUNDS] [PRELOAD_CHARS]     (defaults: 200, 0; SOAK_SEED=N to replay)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-200}"
preload="${2:-0}"

cargo build --release -p collab-server --bin collab
cargo build --release -p collab-tests --example soak
export COLLAB_BIN="$PWD/target/release/collab"
soak=target/release/examples/soak

echo "== $rounds rounds, default compaction"
"$soak" "$rounds" "$preload"
echo "== $rounds rounds, --compact-after-updates 10"
"$soak" "$rounds" "$preload" -- --compact-after-updates 10
