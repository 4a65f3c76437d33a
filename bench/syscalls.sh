#!/usr/bin/env bash
# Where a server's CPU per delivery goes, side by side: one fanout case per server, and for 6 s
# of its steady window the server's user and system CPU and its syscalls, counted by
# `perf stat` attached to the running server (all threads), each divided by the deliveries of
# those 6 s. With PERF_RECORD=1 it also samples the server (`perf record -g`) into
# bench/out/syscalls-<time>/<server>.data for `perf report`.
#
#   bench/syscalls.sh                                   # fanout-50 at 1,000 edits/s, collab and y-sweet
#   READERS=200 RATE=200 SERVERS="collab ref" bench/syscalls.sh
#   COLLAB=/tmp/other/collab bench/syscalls.sh
#   COLLAB_ARGS="--workers 1" SERVERS=collab bench/syscalls.sh      # extra collab options
#   ROOMS=2500 SERVERS="collab y-sweet" bench/syscalls.sh  # rooms: 2,500 documents x 4 clients,
#                                      # 1 edit/s each; figures per delivered edit, in the edit phase
#   SERVERS="collab collab-tmpfs y-sweet" bench/syscalls.sh   # collab-tmpfs: data folder on tmpfs
#
# Needs perf with tracepoint access (root, or kernel.perf_event_paranoid <= 1) and the reference
# servers from bench/install-ref.sh.
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
GEN="${GEN:-$ROOT/target/release/collab-bench}"
COLLAB="${COLLAB:-$ROOT/target/release/collab}"
YSWEET="$BENCH/.ref/y-sweet/bin/y-sweet"
REF_JS="$BENCH/.ref/node_modules/@y/websocket-server/src/server.js"
READERS="${READERS:-50}"
RATE="${RATE:-1000}"
SERVERS="${SERVERS:-collab y-sweet}"
OUT="$BENCH/out/syscalls-$(date -u +%Y%m%dT%H%M%SZ)"
WINDOW=6
ROOMS="${ROOMS:-}"
mkdir -p "$OUT"
# rooms: 4 sockets per document here and as many in the server.
[ -n "$ROOMS" ] && { ulimit -n $((ROOMS * 4 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"; }
[ -x "$GEN" ] || (cd "$ROOT" && cargo build --release -p collab-bench)
[ -x "$COLLAB" ] || (cd "$ROOT" && cargo build --release -p collab-server --bin collab)
EVENTS=context-switches
for s in sendto sendmsg write writev recvfrom read epoll_wait futex fdatasync pwrite64; do
  EVENTS="$EVENTS,syscalls:sys_enter_$s"
done

for s in $SERVERS; do
  # The command, the process to attach to (a pattern for pgrep -n) and the protocol.
  case "$s" in
    # collab-tmpfs: the same binary with its data folder on tmpfs (fdatasync returns at once),
    # what the figures are without durability's device work; {dir} is placed below.
    collab | collab-tmpfs)
      # Fan-out above 200 edits/s needs more than the default message rate; rooms is 1 edit/s.
      limit=""; [ -z "$ROOMS" ] && [ "$RATE" -gt 200 ] && limit="--rate-limit-messages $((RATE * 2))"
      cmd="$COLLAB --addr 127.0.0.1:{port} --data-dir {dir}/db $limit ${COLLAB_ARGS:-}"; match="^$COLLAB --addr"; proto=y ;;
    y-sweet) cmd="$YSWEET serve {dir}/store --host 127.0.0.1 --port {port}"; match="^$YSWEET serve"; proto=y-sweet ;;
    ref) cmd="env HOST=127.0.0.1 PORT={port} node $REF_JS"; match="^node $REF_JS"; proto=y ;;
    floor) cmd="$GEN floor --addr 127.0.0.1:{port}"; match="^$GEN floor"; proto=y ;;
    *) echo "unknown server $s" >&2; exit 1 ;;
  esac
  tmp="${TMPDIR:-/tmp}"; [ "$s" = collab-tmpfs ] && tmp="${TMPFS_DIR:-/dev/shm}"
  if [ -n "$ROOMS" ]; then
    # Connecting and the 3 s settle take up to 7 s; the edit phase outlasts the window.
    load=(rooms --docs "$ROOMS" --per-doc 4 --settle 3 --edit-seconds $((WINDOW + 12)))
    deliveries=$((ROOMS * 3 * WINDOW)) unit="delivered edit" warm=9
  else
    load=(fanout --readers "$READERS" --rate "$RATE" --warmup 2 --duration $((WINDOW + 7)) --drain 2)
    deliveries=$((READERS * RATE * WINDOW)) unit=delivery warm=5
  fi
  TMPDIR="$tmp" "$GEN" "${load[@]}" \
    --protocol "$proto" --server-cmd "$cmd" --server-label "$s" --max-seconds 120 \
    >"$OUT/$s.bench" 2>&1 &
  gen=$!
  sleep "$warm"
  pid="$(pgrep -n -f "$match")" || { echo "$s: server not found" >&2; wait "$gen"; continue; }
  if [ -n "${PERF_RECORD:-}" ]; then
    perf record -q -F 2000 -g -p "$pid" -o "$OUT/$s.data" -- sleep 2 2>/dev/null || true
  fi
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$OUT/$s.perf" -- sleep "$WINDOW"
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  wait "$gen" || echo "$s: the load generator failed, see $OUT/$s.bench" >&2
  hz="$(getconf CLK_TCK)"
  python3 - "$s" "$OUT/$s.perf" "$deliveries" "$((u1 - u0))" "$((s1 - s0))" "$hz" "$unit" <<'PY'
import sys
name, path, deliveries, du, ds, hz, unit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
per = lambda ticks: ticks / hz * 1e6 / deliveries
print(f"== {name}: {deliveries} deliveries; user {per(du):.2f} µs, system {per(ds):.2f} µs per {unit}")
for line in open(path):
    f = line.strip().split(",")
    if len(f) < 3 or line.startswith("#") or not f[0].isdigit():
        continue
    print(f"{int(f[0]):>10} {int(f[0]) / deliveries:8.4f} per {unit}  {f[2].replace('syscalls:sys_enter_', '')}")
PY
done
echo "raw: $OUT" >&2
