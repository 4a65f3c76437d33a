#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, the npm y-websocket interop test and the
# browser test of the demo page. Needs cargo, node/npm, and /usr/bin/chromium for the browser
# test (.ci/run installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build (the integration tests run the real binary)"
cargo build --workspace --bins
export COLLAB_BIN="$PWD/target/debug/collab"

echo "== cargo test"
cargo test --workspace

echo "== interop: npm yjs + y-websocket WebsocketProvider against collab"
(cd tests/interop && npm ci --no-audit --no-fund && node --test)

echo "== demo page: the committed bundle matches a fresh build"
(cd web-demo && npm ci --no-audit --no-fund && npm run build)
git diff --exit-code -- web-demo/dist

echo "== browser: the demo page in headless Chromium (/usr/bin/chromium)"
(cd tests/browser && npm ci --no-audit --no-fund && node --test)
