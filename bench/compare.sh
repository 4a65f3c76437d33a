#!/usr/bin/env bash
# Before/after on the hot path: the fanout cases of bench/run.sh against two collab binaries,
# alternating runs so background load hits both alike, and a table of medians and ratios.
#
#   bench/compare.sh BEFORE_BIN AFTER_BIN            # fanout-50/200/1000 at 200 edits/s, 3 rounds
#   REPEAT=5 CASES="fanout-200 fanout-50-r1000" bench/compare.sh A B   # -rN: N edits/s
#   CASES=rooms-2500x4 bench/compare.sh A B    # rooms-DxC: D documents x C clients, 1 edit/s each
#                                              # for EDIT_SECONDS (default 5)
#
# Build a revision's binary with e.g.
#   git worktree add /tmp/before REV && (cd /tmp/before && cargo build --release -p collab-server --bin collab)
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
BEFORE="${1:?before binary}"
AFTER="${2:?after binary}"
REPEAT="${REPEAT:-3}"
CASES="${CASES:-fanout-50 fanout-200 fanout-1000}"
GEN="${GEN:-$ROOT/target/release/collab-bench}"
[ -x "$GEN" ] || (cd "$ROOT" && cargo build --release -p collab-bench)
OUT="$(mktemp -d)"
ulimit -n 65536 2>/dev/null || true
W="--warmup 2 --duration 8 --drain 3"
for round in $(seq 1 "$REPEAT"); do
  for case in $CASES; do
    if [[ "$case" == rooms-* ]]; then
      spec="${case#rooms-}"
      for side in before after; do
        bin="$BEFORE"; [ "$side" = after ] && bin="$AFTER"
        echo "### $case · $side (round $round of $REPEAT)" >&2
        "$GEN" rooms --docs "${spec%x*}" --per-doc "${spec#*x}" --settle 3 --edit-seconds "${EDIT_SECONDS:-5}" \
          --name "$case" --server-label "$side" \
          --server-cmd "$bin --addr 127.0.0.1:{port} --data-dir {dir}/db" \
          --json-out "$OUT/results.jsonl" --max-seconds 90 >/dev/null
      done
      continue
    fi
    # fanout-R at 200 edits/s, fanout-R-rN at N edits/s (with run.sh's raised rate limit).
    spec="${case#fanout-}"
    readers="${spec%%-r*}"
    rate=200 limit=""
    if [ "$spec" != "$readers" ]; then rate="${spec#*-r}" limit="--rate-limit-messages 2000"; fi
    for side in before after; do
      bin="$BEFORE"; [ "$side" = after ] && bin="$AFTER"
      echo "### $case · $side (round $round of $REPEAT)" >&2
      # shellcheck disable=SC2086
      "$GEN" fanout --readers "$readers" --rate "$rate" $W --name "$case" --server-label "$side" \
        --server-cmd "$bin --addr 127.0.0.1:{port} --data-dir {dir}/db $limit" \
        --json-out "$OUT/results.jsonl" --max-seconds 60 >/dev/null
    done
  done
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r.get("scenario") == "rooms":
        # Per delivered edit, as RESULTS.md's rooms tables count it.
        e = r["edits"]
        r["cpu_us_per_delivery"] = e["server_cpu_util"] * e["seconds"] * 1e6 / max(e["delivered"], 1)
        r["lat_ms"], r["delivered"], r["expected"] = e["lat_ms"], e["delivered"], e["expected"]
by = {}
for r in rows:
    by.setdefault((r["name"], r["server"]), []).append(r)
def med(rs, f):
    vals = [f(r) for r in rs]
    return statistics.median(vals) if vals else float("nan")
cpu = lambda r: r["cpu_us_per_delivery"]
p99 = lambda r: r["lat_ms"]["p99"]
got = lambda r: 100.0 * r["delivered"] / max(r["expected"], 1)
print(f"medians of {max(len(v) for v in by.values())} runs")
print("| case | CPU µs/delivery before | after | after/before | p99 ms before | after | delivered before / after |")
print("|---|---|---|---|---|---|---|")
for case in dict.fromkeys(r["name"] for r in rows):
    b, a = by.get((case, "before"), []), by.get((case, "after"), [])
    cb, ca = med(b, cpu), med(a, cpu)
    print(f"| {case} | {cb:.2f} | {ca:.2f} | {ca / cb:.2f} | {med(b, p99):.2f} | {med(a, p99):.2f} | {med(b, got):.1f} % / {med(a, got):.1f} % |")
PY
echo "raw: $OUT/results.jsonl" >&2
