#!/usr/bin/env bash
# Runs every benchmark scenario against (a) collab's release build, (b) @y/websocket-server 0.1.1
# without persistence, (c) the same with YPERSISTENCE (LevelDB), (d) @hocuspocus/server 3.4.4
# in memory, (e) y-sweet 0.9.1 (Rust, whole-document checkpoints to disk every 10 s) and (f) the
# floor (`collab-bench floor`: frames relayed as-is, no CRDT, no storage), one server at a time,
# and writes bench/RESULTS.md (absolute figures, collab / each server's ratios, the issue's
# targets met or missed) and bench/charts/*.svg.
#
# Opt-in server `collab-tmpfs`: the same collab binary with its data folder on tmpfs, where
# `fdatasync` returns at once. Not a setting anyone should run; it attributes collab's CPU to
# durability (collab − collab-tmpfs) and to everything else (collab-tmpfs ÷ the others), and
# RESULTS.md then gets a table of both.
#   SERVERS="collab collab-tmpfs y-sweet" ONLY="fanout-50-r1000 rooms-2500x4" bench/run.sh
#
#   bench/run.sh                 # full scale, bounded by the per-case limits: at most ~25 min
#   SCALE=small bench/run.sh     # shorter windows, fewer clients, no 20 MB join: ~5 minutes
#   SERVERS="collab ref" ONLY="fanout-200 join" bench/run.sh
#   NO_BUILD=1 bench/run.sh      # use the binaries already in target/release
#   REPEAT=3 bench/run.sh        # every run three times; RESULTS.md shows medians
#   ONLY=idle-50k bench/run.sh   # opt-in cases (marked + below) run only when named in ONLY
#
# Every run is bounded (--max-seconds, per case below) and starts a fresh server in a fresh temporary folder.
# Raw output: bench/out/<time>/ (results.jsonl, log.txt, each server's stderr).
set -uo pipefail

BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
SCALE="${SCALE:-full}"
SERVERS="${SERVERS:-collab ref ref-leveldb hocuspocus y-sweet floor}"
ONLY="${ONLY:-}"
REPEAT="${REPEAT:-1}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$BENCH/out/$STAMP"
RESULTS="${RESULTS:-$BENCH/RESULTS.md}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

"$BENCH/install-ref.sh" || exit 1
if [ -z "${NO_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release -p collab-server --bin collab && cargo build --release -p collab-bench) || exit 1
fi
BIN="$ROOT/target/release/collab-bench"
COLLAB="$ROOT/target/release/collab"
REF_JS="$BENCH/.ref/node_modules/@y/websocket-server/src/server.js"
YSWEET="$BENCH/.ref/y-sweet/bin/y-sweet"
# rooms-2500x4 opens 10,000 client sockets here and as many in the server (which inherits this
# limit): each process needs a little over 10,000 descriptors; idle-50k a little over 50,000.
# As root the hard limit can go up too (to fs.nr_open at most).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n 131072 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt 10100 ]; then
  echo "warning: ulimit -n is $(ulimit -n); rooms-2500x4 needs about 10,100 descriptors per process" >&2
fi

server_cmd() {
  case "$1" in
    # collab-tmpfs differs only in where {dir} is: the generator makes it under TMPDIR (below).
    collab | collab-tmpfs) echo "$COLLAB --addr 127.0.0.1:{port} --data-dir {dir}/db" ;;
    ref) echo "env HOST=127.0.0.1 PORT={port} node $REF_JS" ;;
    ref-leveldb) echo "env HOST=127.0.0.1 PORT={port} YPERSISTENCE={dir}/leveldb node $REF_JS" ;;
    hocuspocus) echo "env HOST=127.0.0.1 PORT={port} node $BENCH/hocuspocus-server.cjs" ;;
    y-sweet) echo "$YSWEET serve {dir}/store --host 127.0.0.1 --port {port}" ;;
    floor) echo "$BIN floor --addr 127.0.0.1:{port}" ;;
    *) echo "unknown server $1" >&2; return 1 ;;
  esac
}
server_protocol() {
  case "$1" in
    hocuspocus) echo hocuspocus ;;
    y-sweet) echo y-sweet ;;
    *) echo y ;;
  esac
}

# name | --max-seconds | scenario and arguments [| extra options for collab only]
# One writer at 1,000 edits/s is over collab's default per-connection limit of 200 messages/s
# (which then stops reading that socket): those cases measure throughput, not the limiter.
R1000="--rate-limit-messages 2000"
# A name starting with + is opt-in: it runs only when ONLY names it (without the +).
# Join documents: words of 1–8 characters take about 5.4 bytes per operation encoded, so
# 780,000 operations make about 4 MB and 3,900,000 about 20 MB.
if [ "$SCALE" = small ]; then
  W="--warmup 1 --duration 3 --drain 2"
  CASES=(
    "fanout-200|20|fanout --readers 200 --rate 200 $W"
    "fanout-50|20|fanout --readers 50 --rate 200 $W"
    "fanout-1000|30|fanout --readers 1000 --rate 200 $W"
    "fanout-200-r1000|20|fanout --readers 200 --rate 1000 $W|$R1000"
    "writers-20|20|fanout --writers 20 --readers 0 --rate 20 $W"
    "writers-200|60|fanout --writers 200 --readers 0 --rate 20 $W"
    "presence-200|30|presence --clients 200 $W"
    "rooms|30|rooms --docs 200 --per-doc 4 --settle 2 --edit-seconds 3"
    "join|40|join --ops 260000 --clients 1,150 --rounds 2"
    "join-4mb|60|join --ops 780000 --word 8 --batch 10000 --clients 1,150 --rounds 1"
    "cold|60|cold --ops 260000 --restarts 2"
    "churn|60|churn --ops 5000"
  )
else
  W="--warmup 2 --duration 8 --drain 3"
  WH="--warmup 1 --duration 5 --drain 3"
  CASES=(
    "fanout-50|30|fanout --readers 50 --rate 200 $W"
    "fanout-200|30|fanout --readers 200 --rate 200 $W"
    "fanout-1000|45|fanout --readers 1000 --rate 200 $W"
    "fanout-50-r1000|30|fanout --readers 50 --rate 1000 $W|$R1000"
    "fanout-200-r1000|30|fanout --readers 200 --rate 1000 $W|$R1000"
    "fanout-1000-r1000|45|fanout --readers 1000 --rate 1000 $WH|$R1000"
    "writers-20|30|fanout --writers 20 --readers 0 --rate 20 $W"
    "writers-200|90|fanout --writers 200 --readers 0 --rate 20 $WH"
    "presence-500|40|presence --clients 500 $W"
    "rooms|30|rooms --docs 500 --per-doc 4 --settle 3"
    "rooms-no-awareness|30|rooms --docs 500 --per-doc 4 --settle 3 --no-awareness"
    "rooms-2000x1|30|rooms --docs 2000 --per-doc 1 --settle 3"
    "rooms-2500x4|90|rooms --docs 2500 --per-doc 4 --settle 3 --edit-seconds 5"
    "rooms-10000x1|90|rooms --docs 10000 --per-doc 1 --settle 3"
    "join|40|join --ops 260000 --clients 1,150 --rounds 3"
    "join-4mb|90|join --ops 780000 --word 8 --batch 10000 --clients 1,150 --rounds 2"
    "join-20mb|150|join --ops 3900000 --word 8 --batch 10000 --clients 1,150 --rounds 1"
    "cold|60|cold --ops 260000 --restarts 3"
    "churn|60|churn --ops 20000"
    # 50,000 sockets: four source addresses (one has ~28,000 ephemeral ports towards one port);
    # collab keeps at most 10,000 documents loaded by default.
    "+idle-50k|420|rooms --docs 12500 --per-doc 4 --settle 5 --edit-seconds 10 --source-ips 4 --connect-concurrency 128|--max-loaded-documents 20000"
    # The same within a hard open-file limit of 20,000 (no CAP_SYS_RESOURCE to raise it).
    "+idle-18k|240|rooms --docs 4500 --per-doc 4 --settle 5 --edit-seconds 10 --connect-concurrency 128"
  )
fi

load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
failed=0
for round in $(seq 1 "$REPEAT"); do
for c in "${CASES[@]}"; do
  name="${c%%|*}"
  rest="${c#*|}"
  max="${rest%%|*}"
  args="${rest#*|}"
  extra=""
  if [[ "$args" == *"|"* ]]; then extra="${args#*|}"; args="${args%%|*}"; fi
  optin=""
  if [[ "$name" == +* ]]; then optin=1; name="${name#+}"; fi
  if [ -n "$optin" ] && ! [[ " $ONLY " == *" $name "* ]]; then continue; fi
  if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $name "* ]]; then continue; fi
  # Servers take turns within a scenario, so background load hits them alike.
  for s in $SERVERS; do
    cmd="$(server_cmd "$s")" || exit 1
    if [[ "$s" == collab* ]] && [ -n "$extra" ]; then cmd="$cmd $extra"; fi
    tmp="${TMPDIR:-/tmp}"
    if [ "$s" = collab-tmpfs ]; then tmp="${TMPFS_DIR:-/dev/shm}"; fi
    echo
    echo "### $name · $s (round $round of $REPEAT)"
    # shellcheck disable=SC2086
    if ! TMPDIR="$tmp" "$BIN" $args --name "$name" --server-label "$s" --server-cmd "$cmd" \
      --protocol "$(server_protocol "$s")" \
      --server-log "$OUT/$name.$s.stderr" --json-out "$OUT/results.jsonl" --max-seconds "$max"; then
      echo "!!! $name against $s failed"
      failed=$((failed + 1))
    fi
    sleep 1
  done
done
done
load_end="$(cut -d' ' -f1-3 /proc/loadavg)"

# The Cluster section comes from bench/cluster.sh; the report below rewrites the file without it.
cluster_section="$(sed -n '/^<!-- cluster section/,/^<!-- end of cluster section -->/p' "$RESULTS" 2>/dev/null)"
rev="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
tmpfs_note=""
if [[ " $SERVERS " == *" collab-tmpfs "* ]]; then
  tmpfs_note="; the same collab binary with its data folder in ${TMPFS_DIR:-/dev/shm} ($(df --output=fstype "${TMPFS_DIR:-/dev/shm}" | tail -1): fdatasync returns at once; attribution only, not a setting) as \`collab-tmpfs\`"
fi
dirty="$(cd "$ROOT" && git status --porcelain -- server crdt storage 2>/dev/null | head -1)"
"$BIN" report --input "$OUT/results.jsonl" --out "$RESULTS" --base collab --ref ref \
  --charts "$BENCH/charts" \
  --note "Generated by \`bench/run.sh\` (SCALE=$SCALE) on $(date -u '+%Y-%m-%d %H:%M UTC'); raw lines in bench/out/$STAMP/results.jsonl." \
  --note "Servers: collab $rev${dirty:+ (with uncommitted changes)} release build of $(date -u -r "$COLLAB" "+%Y-%m-%d %H:%M UTC") (default options, RUST_LOG unset = info); @y/websocket-server $(node -p "require('$BENCH/.ref/node_modules/@y/websocket-server/package.json').version") on yjs $(node -p "require('$BENCH/.ref/node_modules/yjs/package.json').version"), Node $(node --version), as \`ref\` and with \`YPERSISTENCE\` (LevelDB) as \`ref-leveldb\`; @hocuspocus/server $(node -p "require('$BENCH/.ref/hocuspocus/node_modules/@hocuspocus/server/package.json').version") without extensions (in memory) as \`hocuspocus\`; y-sweet $("$YSWEET" version 2>/dev/null | tr -d '\n' || echo '?') (\`y-sweet serve DIR\`, checkpoints every 10 s) as \`y-sweet\`; \`collab-bench floor\` (one thread, frames relayed as-is, no CRDT, no storage) as \`floor\`${tmpfs_note}." \
  --note "Load generator: \`collab-bench\` (bench/), one process, on the same machine; readers only parse update headers." \
  --note "Load average (1/5/15 min) before the runs: $load_start; after: $load_end. Other work on the machine shows up as noise, mostly in latency tails." \
  || failed=$((failed + 1))
[ -z "$cluster_section" ] || printf '\n%s\n' "$cluster_section" >> "$RESULTS"
echo
echo "wrote $RESULTS ($failed failed runs)"
[ "$failed" -eq 0 ]
