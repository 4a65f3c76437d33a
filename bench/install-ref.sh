#!/usr/bin/env bash
# Installs the reference server the benchmark compares against into bench/.ref (git-ignored):
# @y/websocket-server 0.1.1 (the last release on yjs 13 that still reads YPERSISTENCE), with the
# optional LevelDB persistence, and @hocuspocus/server 3.4.4 (the last line that runs on Node 20;
# 4.x needs Node 22) with @hocuspocus/extension-redis of the same version (the cluster benchmark,
# bench/cluster.sh) into .ref/hocuspocus, run by bench/hocuspocus-server.cjs, and the Rust peer
# y-sweet 0.9.1 from crates.io into .ref/y-sweet (a release build: a few minutes the first time).
# Does nothing when that exact set is already installed.
set -euo pipefail
REF="$(cd "$(dirname "$0")" && pwd)/.ref"
YSWEET_VERSION=0.9.1
if ! "$REF/y-sweet/bin/y-sweet" version 2>/dev/null | grep -q "$YSWEET_VERSION"; then
  cargo install y-sweet --version "$YSWEET_VERSION" --locked --root "$REF/y-sweet" -j 2
fi
mkdir -p "$REF/hocuspocus"
# A package of its own: hocuspocus wants ws 8, the y-websocket reference pins ws 6.
# ioredis is held at 5.8.0: with 5.11.1 (what ^5.6.1 resolved to in 2026-11) the extension's
# subscriber connection gets "Connection in subscriber mode, only subscriber commands may be used"
# and a second instance never hears the first one's updates (a ready check sending INFO after
# SUBSCRIBE, reported against 5.8.2 as redis/ioredis#2037); 5.8.0 relays every update.
cat > "$REF/hocuspocus/package.json.new" <<'JSON'
{
  "name": "collab-bench-hocuspocus",
  "private": true,
  "description": "@hocuspocus/server for bench/run.sh (written by bench/install-ref.sh)",
  "dependencies": {
    "@hocuspocus/server": "3.4.4",
    "@hocuspocus/provider": "3.4.4",
    "@hocuspocus/extension-redis": "3.4.4",
    "yjs": "13.6.33",
    "y-protocols": "1.0.7"
  },
  "overrides": {
    "ioredis": "5.8.0"
  }
}
JSON
if cmp -s "$REF/hocuspocus/package.json.new" "$REF/hocuspocus/package.json" \
  && [ -f "$REF/hocuspocus/node_modules/@hocuspocus/server/package.json" ] \
  && [ -f "$REF/hocuspocus/node_modules/@hocuspocus/extension-redis/package.json" ]; then
  rm "$REF/hocuspocus/package.json.new"
else
  mv "$REF/hocuspocus/package.json.new" "$REF/hocuspocus/package.json"
  (cd "$REF/hocuspocus" && npm install --no-audit --no-fund --loglevel=error)
fi
cat > "$REF/package.json.new" <<'JSON'
{
  "name": "collab-bench-reference",
  "private": true,
  "description": "Reference y-websocket server for bench/run.sh (written by bench/install-ref.sh)",
  "dependencies": {
    "@y/websocket-server": "0.1.1",
    "yjs": "13.6.33",
    "y-leveldb": "0.1.2",
    "ws": "6.2.3"
  }
}
JSON
if cmp -s "$REF/package.json.new" "$REF/package.json" \
  && [ -f "$REF/node_modules/@y/websocket-server/package.json" ] \
  && (cd "$REF" && node -e "require('leveldown')") 2>/dev/null; then
  rm "$REF/package.json.new"
  exit 0
fi
mv "$REF/package.json.new" "$REF/package.json"
(cd "$REF" && npm install --no-audit --no-fund --loglevel=error)
# leveldown ships prebuilt binaries for linux-x64; check that persistence can load.
(cd "$REF" && node -e "require('leveldown'); require('y-leveldb')") \
  || { echo "install-ref.sh: leveldown does not load; YPERSISTENCE runs will fail" >&2; exit 1; }
echo "reference server installed in $REF"
