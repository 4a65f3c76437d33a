#!/usr/bin/env bash
# Does memory come back? Runs `collab-bench memory` against one or more collab binaries (e.g. the
# same revision built with different allocators): 20,000 idle sockets opened and closed, then a
# ~112 MB document (20.7 M words of 1–8 characters) built, fetched by 4 clients and closed; RSS
# sampled once a second for 60 s after each close. Target: back within 2x of the idle RSS within
# a minute. Prints one table row per binary; raw JSON lines in bench/out/memory-<time>/.
#
#   bench/memory.sh                                   # target/release/collab
#   bench/memory.sh /tmp/collab-glibc /tmp/collab-jemalloc /tmp/collab-mimalloc
#   SOCKETS=20000 OPS=0 bench/memory.sh BIN           # sockets only
#
# Build the allocator variants with e.g.
#   cargo build --release -p collab-server --bin collab --no-default-features && cp target/release/collab /tmp/collab-glibc
#   cargo build --release -p collab-server --bin collab --no-default-features --features mimalloc && cp …
#   cargo build --release -p collab-server --bin collab && cp target/release/collab /tmp/collab-jemalloc
#
# The document unloads after collab's grace period, set to 1 s here so that the minute measures
# the allocator; collab's cap on document size is raised for the 112 MB document.
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
GEN="${GEN:-$ROOT/target/release/collab-bench}"
SOCKETS="${SOCKETS:-20000}"
OPS="${OPS:-20700000}"
WATCH="${WATCH:-60}"
OUT="$BENCH/out/memory-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
[ -x "$GEN" ] || (cd "$ROOT" && cargo build --release -p collab-bench)
[ "$#" -gt 0 ] || set -- "$ROOT/target/release/collab"
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n 131072 2>/dev/null || true
for bin in "$@"; do
  label="$(basename "$bin")"
  echo "### memory · $label" >&2
  "$GEN" memory --sockets "$SOCKETS" --ops "$OPS" --word 8 --batch 10000 --joiners 4 \
    --watch "$WATCH" --name memory --server-label "$label" \
    --server-cmd "$bin --addr 127.0.0.1:{port} --data-dir {dir}/db --grace-period-secs 1 --max-document-bytes 300000000 --max-message-size 300000000" \
    --server-log "$OUT/$label.stderr" --json-out "$OUT/results.jsonl" --max-seconds 900 >&2
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
print("| binary | idle KiB | sockets: loaded → 10 s / 60 s after close (÷ idle) | ≤ 2× idle after | document: loaded → 10 s / 60 s after close (÷ idle) | ≤ 2× idle after |")
print("|---|---:|---|---:|---|---:|")
for l in open(sys.argv[1]):
    r = json.loads(l)
    idle = r.get("rss_kb_idle") or 1
    def ph(p):
        p = r.get(p) or {}
        a = p.get("rss_kb_after_close") or {}
        if not p:
            return "–", "–"
        t = p.get("seconds_to_2x_idle")
        return (f'{p["rss_kb_loaded"]} → {a.get("10s")} / {a.get("60s")} ({(a.get("60s") or 0) / idle:.2f}×)',
                "never" if t is None else f"{t} s")
    s, st = ph("sockets_phase")
    d, dt = ph("document_phase")
    print(f'| {r["server"]} | {idle} | {s} | {st} | {d} | {dt} |')
PY
echo "raw: $OUT/results.jsonl" >&2
