// The Hocuspocus provider (Tiptap's @hocuspocus/provider, v3 3.4.4 and v2 2.15.3 through an npm
// alias) against collab, which speaks its protocol on the root path: convergence, presence,
// late joiners, several documents on one socket, mixing with y-websocket providers, SyncStatus
// only after the flush (and surviving kill -9), and token auth per document.
//
// Run from tests/interop:  npm ci && node --test hocuspocus.test.mjs
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
import jwt from 'jsonwebtoken'
import * as V3 from '@hocuspocus/provider'
import * as V2 from 'hocuspocus-provider-v2'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const BIN = process.env.COLLAB_BIN
  ? path.resolve(process.env.COLLAB_BIN)
  : path.resolve(HERE, '../../target/debug/collab')
const WAIT_MS = Number(process.env.COLLAB_WAIT_MS || 5000)
const SECRET = 'hocuspocus-test-secret-0123456789abcdef'

const children = new Set()
const dirs = []
const cleanups = []

after(() => {
  for (const c of cleanups) { try { c() } catch {} }
  for (const c of children) c.kill('SIGKILL')
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})

function start (args = [], dataDir = null) {
  if (!existsSync(BIN)) throw new Error(`collab binary not found at ${BIN}`)
  if (!dataDir) {
    dataDir = mkdtempSync(path.join(os.tmpdir(), 'collab-hp-'))
    dirs.push(dataDir)
  }
  const child = spawn(BIN, ['--addr', '127.0.0.1:0', '--data-dir', path.join(dataDir, 'db'), ...args], {
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
        resolve({ child, url: `ws://${m[1]}`, dataDir, log: () => log })
      }
    })
  })
}

async function until (what, cond, ms = WAIT_MS) {
  const deadline = Date.now() + ms
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** A v3 provider with its own socket. */
function hp (url, name, opts = {}, lib = V3) {
  const document = new Y.Doc()
  const p = new lib.HocuspocusProvider({ url, name, document, WebSocketPolyfill: WebSocket, ...opts })
  cleanups.push(() => { p.destroy(); document.destroy() })
  return p
}

function ywp (url, room) {
  const doc = new Y.Doc()
  const p = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  cleanups.push(() => { p.destroy(); doc.destroy() })
  return p
}

const text = (p) => (p.document ?? p.doc).getText('t').toString()

test('two v3 providers converge, and a late joiner gets everything', async () => {
  const s = await start()
  const a = hp(s.url, 'hp-basic')
  const b = hp(s.url, 'hp-basic')
  await until('both synced', () => a.isSynced && b.isSynced)
  a.document.getText('t').insert(0, 'from a')
  await until('a at b', () => text(b) === 'from a')
  b.document.getText('t').insert(6, ' and b')
  await until('b at a', () => text(a) === 'from a and b')
  const late = hp(s.url, 'hp-basic')
  await until('late synced', () => late.isSynced)
  assert.equal(text(late), 'from a and b')
  await until('every change acknowledged', () => a.unsyncedChanges === 0 && b.unsyncedChanges === 0)
})

test('presence both ways, and removed when a provider leaves', async () => {
  const s = await start()
  const a = hp(s.url, 'hp-aw')
  const b = hp(s.url, 'hp-aw')
  await until('synced', () => a.isSynced && b.isSynced)
  a.setAwarenessField('user', { name: 'A' })
  b.setAwarenessField('user', { name: 'B' })
  await until('A at b', () => b.awareness.getStates().get(a.document.clientID)?.user?.name === 'A')
  await until('B at a', () => a.awareness.getStates().get(b.document.clientID)?.user?.name === 'B')
  const gone = a.document.clientID
  a.destroy()
  await until("A's removal at b", () => !b.awareness.getStates().has(gone))
})

test('three documents over one shared socket stay isolated', async () => {
  const s = await start()
  const socket = new V3.HocuspocusProviderWebsocket({ url: s.url, WebSocketPolyfill: WebSocket })
  cleanups.push(() => socket.destroy())
  const docs = ['iso-1', 'iso-2', 'iso-3'].map((name) => {
    const document = new Y.Doc()
    const p = new V3.HocuspocusProvider({ websocketProvider: socket, name, document })
    p.attach()
    cleanups.push(() => { p.destroy(); document.destroy() })
    return p
  })
  await until('all synced', () => docs.every((p) => p.isSynced))
  docs.forEach((p, i) => p.document.getText('t').insert(0, `doc ${i + 1}`))
  const readers = ['iso-1', 'iso-2', 'iso-3'].map((name) => ywp(s.url, name))
  await until('readers', () => readers.every((r, i) => text(r) === `doc ${i + 1}`))
  // Closing one document leaves the others on the socket working.
  docs[0].destroy()
  docs[1].document.getText('t').insert(5, '!')
  await until('doc 2 still live', () => text(readers[1]) === 'doc 2!')
})

test('a y-websocket provider and a Hocuspocus provider share a document', async () => {
  const s = await start()
  const h = hp(s.url, 'mixed')
  const y = ywp(s.url, 'mixed')
  await until('synced', () => h.isSynced && y.synced)
  h.document.getText('t').insert(0, 'tiptap ')
  y.doc.getText('t').insert(0, 'codemirror ')
  await until('converged', () => text(h) === text(y) && text(h).length === 'tiptap codemirror '.length)
})

test('SyncStatus only after the flush, and what it acknowledged survives kill -9', async () => {
  const s = await start(['--debug-flush-delay-ms', '400'])
  const a = hp(s.url, 'durable')
  await until('synced', () => a.isSynced, 8000)
  const sent = Date.now()
  a.document.getText('t').insert(0, 'saved for real')
  await until('pending change counted', () => a.unsyncedChanges > 0, 1000)
  await until('acknowledged', () => a.unsyncedChanges === 0, 8000)
  assert.ok(Date.now() - sent >= 350, `acknowledged after ${Date.now() - sent} ms, before the 400 ms flush`)
  s.child.kill('SIGKILL')
  await new Promise((resolve) => s.child.once('exit', resolve))
  const again = await start([], s.dataDir)
  const b = hp(again.url, 'durable')
  await until('synced after restart', () => b.isSynced, 8000)
  assert.equal(text(b), 'saved for real')
})

test('tokens per document: accepted, denied, read-only', async () => {
  const s = await start(['--auth-secret', SECRET])
  const token = (doc, perm) => jwt.sign({ doc, perm }, SECRET, { algorithm: 'HS256', expiresIn: '5m' })
  const writer = hp(s.url, 'guarded', { token: token('guarded', 'read-write') })
  await until('writer synced', () => writer.isSynced)
  assert.equal(writer.authorizedScope, 'read-write')
  writer.document.getText('t').insert(0, 'secret text')
  let denied = null
  const intruder = hp(s.url, 'guarded', { token: token('other', 'read-write'), onAuthenticationFailed: ({ reason }) => { denied = reason } })
  await until('denied', () => denied !== null)
  assert.equal(text(intruder), '')
  const reader = hp(s.url, 'guarded', { token: token('guarded', 'read-only') })
  await until('reader synced', () => reader.isSynced)
  assert.equal(reader.authorizedScope, 'readonly')
  await until('reader has the text', () => text(reader) === 'secret text')
  reader.document.getText('t').insert(0, 'vandal ')
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(text(writer), 'secret text')
  const fresh = hp(s.url, 'guarded', { token: token('guarded', 'read-only') })
  await until('fresh synced', () => fresh.isSynced)
  assert.equal(text(fresh), 'secret text')
})

test('a v2 provider and a v3 provider converge', async () => {
  const s = await start()
  const v3 = hp(s.url, 'versions')
  // v2 builds its socket from the global WebSocket (Node 20 has none) despite the option.
  globalThis.WebSocket ??= WebSocket
  const v2 = hp(s.url, 'versions', {}, V2)
  await until('both synced', () => v3.isSynced && v2.isSynced)
  v2.document.getText('t').insert(0, 'from v2 ')
  v3.document.getText('t').insert(0, 'from v3 ')
  await until('converged', () => text(v2) === text(v3) && text(v2).length === 16)
})
