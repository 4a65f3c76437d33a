// collab embedded in an actix-web app (server/examples/embed.rs) with the stock npm client:
// `new WebsocketProvider('ws://HOST:PORT/collab', doc, ydoc)` as written, two providers
// converge, and a late joiner gets the document.
//
// Run from tests/interop:  npm ci && node --test embed.test.mjs
// COLLAB_EMBED_BIN: the example binary (default ../../target/debug/examples/embed).

import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const BIN = process.env.COLLAB_EMBED_BIN
  ? path.resolve(process.env.COLLAB_EMBED_BIN)
  : path.resolve(HERE, '../../target/debug/examples/embed')
const WAIT_MS = Number(process.env.COLLAB_WAIT_MS || 5000)

const children = new Set()
const dirs = []
const providers = []

after(() => {
  for (const p of providers) { p.destroy(); p.doc.destroy() }
  for (const c of children) c.kill('SIGKILL')
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})

function startApp () {
  if (!existsSync(BIN)) throw new Error(`example not found at ${BIN}; cargo build -p collab-server --example embed`)
  const dir = mkdtempSync(path.join(os.tmpdir(), 'collab-embed-'))
  dirs.push(dir)
  const child = spawn(BIN, [], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, COLLAB_ADDR: '127.0.0.1:0', COLLAB_DATA_DIR: path.join(dir, 'db') }
  })
  children.add(child)
  let log = ''
  child.stderr.on('data', (d) => { log += d })
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the example did not start\n${log}`)), 10000)
    child.stdout.on('data', (d) => {
      log += d
      const m = /listening on (\S+)/.exec(log)
      if (m) {
        clearTimeout(timer)
        resolve({ url: `ws://${m[1]}/collab`, base: `http://${m[1]}` })
      }
    })
  })
}

function provider (url, room) {
  const doc = new Y.Doc()
  // As written in the README: the server URL with the mount path, then the document name.
  const p = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  providers.push(p)
  return p
}

async function until (what, cond) {
  const deadline = Date.now() + WAIT_MS
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

test('WebsocketProvider against collab embedded in an actix-web app', async () => {
  const app = await startApp()
  const a = provider(app.url, 'embedded-doc')
  const b = provider(app.url, 'embedded-doc')
  await until('both synced', () => a.synced && b.synced)
  a.doc.getText('t').insert(0, 'hello from a')
  await until("a's edit at b", () => b.doc.getText('t').toString() === 'hello from a')
  b.doc.getMap('m').set('k', 'from b')
  await until("b's edit at a", () => a.doc.getMap('m').get('k') === 'from b')
  a.awareness.setLocalStateField('user', { name: 'A' })
  await until("a's presence at b", () => b.awareness.getStates().get(a.doc.clientID)?.user?.name === 'A')
  const late = provider(app.url, 'embedded-doc')
  await until('late joiner synced', () => late.synced)
  assert.equal(late.doc.getText('t').toString(), 'hello from a')
  // The app's own page and middleware are served beside it.
  const res = await fetch(`${app.base}/`)
  assert.equal(res.status, 200)
  assert.equal(res.headers.get('x-app-session'), 'checked')
  assert.match(await res.text(), /My app/)
})
