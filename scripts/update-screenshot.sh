#!/usr/bin/env bash
# Regenerates web-demo/screenshot.png (the README picture) from the browser test that composes
# two collaborating pages. Test runs themselves never write tracked files.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p collab-server --bin collab
export COLLAB_BIN="$PWD/target/debug/collab"
(cd tests/browser && npm ci --no-audit --no-fund && UPDATE_SCREENSHOT=1 node --test --test-name-pattern='screenshot of two collaborating pages' collab.test.mjs)
echo "updated web-demo/screenshot.png"
