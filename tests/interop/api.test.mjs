// Documents over HTTP with the stock npm client: a backend POSTs a Yjs update with node's
// fetch, a connected `WebsocketProvider` receives it, and it survives `kill -9` of the server
// right after the 200. Also: GET renders what providers wrote, and DELETE closes them (4404).
//
// Self-contained (its own small server harness), so it does not depend on interop.test.mjs.
// Run from tests/interop:  npm ci && node --test api.test.mjs
// COLLAB_BIN: server binary (default ../../target/debug/collab).

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
const BIN = process.env.COLLAB_BIN
  ? path.resolve(process.env.COLLAB_BIN)
  : path.resolve(HERE, '../../target/debug/collab')
const WAIT_MS = Number(process.env.COLLAB_WAIT_MS || 5000)

const children = new Set()
const dirs = []
const providers = []

/** Destroys the provider and its doc: the doc's awareness keeps an interval until then. */
function done (p) {
  p.destroy()
  p.doc.destroy()
}

after(() => {
  for (const p of providers) done(p)
  for (const c of children) c.kill('SIGKILL')
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})

/** Starts collab on a free port; resolves with { child, base, ws, log() }. */
function start (dataDir, args = []) {
  if (!existsSync(BIN)) throw new Error(`collab binary not found at ${BIN}; build it or set COLLAB_BIN`)
  const child = spawn(BIN, ['--addr', '127.0.0.1:0', '--data-dir', dataDir, ...args], {
    stdio: ['ignore', 'pipe', 'pipe']
  })
  children.add(child)
  child.once('exit', () => children.delete(child))
  let log = ''
  child.stderr.on('data', (d) => { log += d })
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`collab did not start\n${log}`)), 10000)
    child.stdout.on('data', (d) => {
      log += d
      const m = /listening on (\S+)/.exec(log)
      if (m) {
        clearTimeout(timer)
        resolve({ child, base: `http://${m[1]}`, ws: `ws://${m[1]}`, log: () => log })
      }
    })
  })
}

function kill9 (server) {
  return new Promise((resolve) => {
    server.child.once('exit', resolve)
    server.child.kill('SIGKILL')
  })
}

/** Polls `cond` until true, failing with `what` after WAIT_MS. */
async function waitFor (what, cond) {
  const deadline = Date.now() + WAIT_MS
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

function provider (wsUrl, name, doc = new Y.Doc()) {
  const p = new WebsocketProvider(wsUrl, name, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  providers.push(p)
  return p
}

async function synced (p) {
  await waitFor('sync', () => p.synced)
  return p
}

test('a backend POST reaches a connected WebsocketProvider and survives kill -9 right after the 200', async () => {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'collab-api-'))
  dirs.push(dataDir)
  // Slow flushes: answering before the flush would lose the update to the kill every time.
  let server = await start(dataDir, ['--debug-flush-delay-ms', '300'])
  // `WebsocketProvider(url, 'my doc')` connects to /my%20doc; in the API that name is one
  // percent-encoded segment: my%2520doc.
  const reader = await synced(provider(server.ws, 'my doc'))
  const text = reader.doc.getText('content')

  const backend = new Y.Doc()
  backend.getText('content').insert(0, 'written by the backend')
  const res = await fetch(`${server.base}/api/docs/${encodeURIComponent('my%20doc')}/update`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/octet-stream' },
    body: Y.encodeStateAsUpdate(backend)
  })
  assert.equal(res.status, 200)
  assert.deepEqual(await res.json(), { changed: true })
  await kill9(server)

  // Sent to the provider before the 200.
  await waitFor('the backend text at the provider', () => text.toString() === 'written by the backend')
  done(reader)

  server = await start(dataDir)
  const after = await synced(provider(server.ws, 'my doc'))
  assert.equal(after.doc.getText('content').toString(), 'written by the backend')
  const json = await (await fetch(`${server.base}/api/docs/my%2520doc`)).json()
  assert.deepEqual(json, { content: 'written by the backend' })
  done(after)
  await kill9(server)
})

test('GET renders what providers wrote; DELETE closes them with 4404 and they stay away', async () => {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'collab-api-'))
  dirs.push(dataDir)
  const server = await start(dataDir)
  const a = await synced(provider(server.ws, 'notes'))
  const b = await synced(provider(server.ws, 'notes'))
  a.doc.getText('body').insert(0, 'hello')
  a.doc.getMap('meta').set('title', 'Notes')
  b.doc.getArray('tags').push(['x', 'y'])
  const para = new Y.XmlElement('p')
  para.insert(0, [new Y.XmlText('rich')])
  b.doc.getXmlFragment('prose').insert(0, [para])
  await waitFor('both edits on both sides', () =>
    a.doc.getArray('tags').length === 2 && b.doc.getText('body').toString() === 'hello')
  let json
  // Both edits are on both providers, so the server has them; allow for its flush.
  for (let i = 0; i < 50; i++) {
    json = await (await fetch(`${server.base}/api/docs/notes`)).json()
    if (Object.keys(json).length === 4) break
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  assert.deepEqual(json, {
    body: 'hello',
    meta: { title: 'Notes' },
    tags: ['x', 'y'],
    prose: '<p>rich</p>'
  })

  const closes = []
  for (const p of [a, b]) p.on('connection-close', (event) => { if (event) closes.push(event.code) })
  const res = await fetch(`${server.base}/api/docs/notes`, { method: 'DELETE' })
  assert.equal(res.status, 204)
  await waitFor('both providers closed', () => closes.length === 2)
  assert.deepEqual(closes, [4404, 4404])
  // y-websocket does not reconnect after a 44xx close, so their copies do not come back.
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(a.wsconnected, false)
  assert.equal((await fetch(`${server.base}/api/docs/notes`)).status, 404)
  await kill9(server)
})
