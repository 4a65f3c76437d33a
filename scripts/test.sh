#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, the npm y-websocket interop test, the
# Python (pycrdt) client test and the browser test of the demo page. Needs cargo, node/npm,
# python3 3.11+ with venv, /usr/bin/chromium for the browser test, and redis-server and nginx for
# the cluster-mode interop test (.ci/run installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build (the integration tests run the real binary and the embedding example)"
cargo build --workspace --bins
cargo build -p collab-server --example embed
export COLLAB_BIN="$PWD/target/debug/collab"

echo "== cargo test"
cargo test --workspace

echo "== interop: npm y-websocket WebsocketProvider and @hocuspocus/provider v2/v3 against collab, and cluster mode"
# --test-force-exit: the Hocuspocus providers keep a reconnect timer alive after destroy(), which
# would hold the test process open once every test has passed. Every *.test.mjs runs, cluster.test.mjs
# included: it starts redis-server and nginx itself (skipped, saying so, where they are missing).
(cd tests/interop && npm ci --no-audit --no-fund && node --test --test-force-exit)

echo "== python: pycrdt client and npm WebsocketProvider against collab (tests/python/.venv)"
[ -x tests/python/.venv/bin/python ] || { python3 -m venv tests/python/.venv && tests/python/.venv/bin/python -m pip install -q -r tests/python/requirements.txt; }
(cd tests/python && .venv/bin/python -m pytest -q)

echo "== demo page: the committed bundle matches a fresh build"
(cd web-demo && npm ci --no-audit --no-fund && npm run build)
git diff --exit-code -- web-demo/dist

echo "== browser: the demo page in headless Chromium (/usr/bin/chromium)"
(cd tests/browser && npm ci --no-audit --no-fund && node --test)
