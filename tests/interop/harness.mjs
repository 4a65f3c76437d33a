// Shared harness of the interop tests (interop.test.mjs, access.test.mjs): spawns `collab`,
// creates stock npm `WebsocketProvider`s, bounded waits, and a raw y-websocket frame decoder.
// Environment: see README.md (COLLAB_BIN, COLLAB_URL, COLLAB_WAIT_MS, COLLAB_KEEP_DATA).
//
// Each test file runs in its own process under `node --test`, so the hooks registered here
// (cleanup after each test and at the end) belong to the file that imports this module.

import { test, after, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const HERE = path.dirname(fileURLToPath(import.meta.url))
export const EXTERNAL_URL = process.env.COLLAB_URL ? process.env.COLLAB_URL.replace(/\/+$/, '') : null
export const BIN = process.env.COLLAB_BIN
  ? path.resolve(process.env.COLLAB_BIN)
  : path.resolve(HERE, '../../target/debug/collab')
export const WAIT_MS = Number(process.env.COLLAB_WAIT_MS || 5000)
const STARTUP_MS = Math.max(WAIT_MS, 10000)
const STOP_MS = 10000
export const TEST_TIMEOUT = 60000
export const SKIP_RESTART = EXTERNAL_URL ? 'COLLAB_URL is set: restart tests need a server spawned by the harness' : false

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Resolve with the promise's value, or with `onTimeout` after `ms` (the timer is cleared either way). */
export function within (promise, ms, onTimeout = null) {
  let timer
  const t = new Promise((resolve) => { timer = setTimeout(() => resolve(onTimeout), ms) })
  return Promise.race([promise, t]).finally(() => clearTimeout(timer))
}

// ---------------------------------------------------------------------------------------------
// Server process harness
// ---------------------------------------------------------------------------------------------

/** @type {Set<CollabServer>} */
const servers = new Set()
/** @type {string[]} */
const tempDirs = []

export function freshDataDir () {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'collab-interop-'))
  tempDirs.push(dir)
  return dir
}

function checkBinary () {
  if (!existsSync(BIN) || !statSync(BIN).isFile()) {
    throw new Error(
      `collab server binary not found at ${BIN}.\n` +
      'Build it with `cargo build -p collab-server --bin collab` in the workspace root, ' +
      'or set COLLAB_BIN=/path/to/collab, or COLLAB_URL=ws://host:port to test a running server.'
    )
  }
}

export class CollabServer {
  /**
   * Started as `collab --addr 127.0.0.1:0 --data-dir <dataDir> ...extraArgs`. With `--tls-cert`
   * among the arguments, `url` is `wss://...` and `httpUrl` `https://...`.
   * @param {string} dataDir
   * @param {string[]} [extraArgs]
   * @param {{env?: Record<string, string>}} [opts] extra environment variables
   */
  static async start (dataDir, extraArgs = [], opts = {}) {
    checkBinary()
    const srv = new CollabServer(dataDir, extraArgs, opts)
    await srv._ready
    return srv
  }

  constructor (dataDir, extraArgs, { env = {} } = {}) {
    this.dataDir = dataDir
    this.args = ['--addr', '127.0.0.1:0', '--data-dir', dataDir, ...extraArgs]
    this.tls = extraArgs.includes('--tls-cert')
    this.log = ''
    this.url = null
    this.httpUrl = null
    this.exit = null
    this.child = spawn(BIN, this.args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } })
    servers.add(this)
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exit = { code, signal }
        servers.delete(this)
        resolve(this.exit)
      })
    })
    this._ready = new Promise((resolve, reject) => {
      let stdoutBuf = ''
      const timer = setTimeout(() => {
        this.child.kill('SIGKILL')
        reject(new Error(`collab did not print "listening on HOST:PORT" within ${STARTUP_MS} ms\n${this.describe()}`))
      }, STARTUP_MS)
      this.child.once('error', (err) => {
        clearTimeout(timer)
        reject(new Error(`could not spawn ${BIN}: ${err.message}`))
      })
      this.child.stdout.on('data', (chunk) => {
        const s = chunk.toString()
        this.log += s
        if (this.url !== null) return
        stdoutBuf += s
        const m = /listening on (\[[^\]]+\]|[^\s:]+):(\d+)/.exec(stdoutBuf)
        if (m) {
          clearTimeout(timer)
          this.port = Number(m[2])
          this.url = `${this.tls ? 'wss' : 'ws'}://${m[1]}:${m[2]}`
          this.httpUrl = `${this.tls ? 'https' : 'http'}://${m[1]}:${m[2]}`
          resolve()
        }
      })
      this.child.stderr.on('data', (chunk) => { this.log += chunk.toString() })
      this.exited.then(({ code, signal }) => {
        clearTimeout(timer)
        if (this.url === null) {
          reject(new Error(`collab exited (code ${code}, signal ${signal}) before printing "listening on"\n${this.describe()}`))
        }
      })
    })
  }

  describe () {
    // eslint-disable-next-line no-control-regex
    const tail = this.log.replace(/\x1b\[[0-9;]*m/g, '').split('\n').slice(-25).join('\n')
    return `[server ${BIN} ${this.args.join(' ')}; ` +
      `${this.exit ? `exited code=${this.exit.code} signal=${this.exit.signal}` : 'running'}]\n` +
      `--- server output (tail) ---\n${tail}\n---`
  }

  /**
   * Send `signal` and wait (bounded) until the process is gone.
   * @param {NodeJS.Signals} signal
   */
  async stop (signal = 'SIGTERM') {
    if (this.exit) return this.exit
    this.child.kill(signal)
    const res = await within(this.exited, STOP_MS, null)
    if (res === null) {
      this.child.kill('SIGKILL')
      await within(this.exited, 2000)
      throw new Error(`collab did not exit within ${STOP_MS} ms after ${signal}\n${this.describe()}`)
    }
    return res
  }
}

process.on('exit', () => {
  for (const s of servers) {
    try { s.child.kill('SIGKILL') } catch {}
  }
})

/** @type {Promise<{url: string, server: CollabServer|null}>|null} */
let sharedServer = null

/** The server shared by the tests that do not restart it. */
export function getSharedServer () {
  if (EXTERNAL_URL) return Promise.resolve({ url: EXTERNAL_URL, server: null })
  if (sharedServer === null) {
    sharedServer = CollabServer.start(freshDataDir()).then((server) => ({ url: server.url, server }))
    // a failed start is reported by each test that needs it, and retried
    sharedServer.catch(() => { sharedServer = null })
  }
  return sharedServer
}

/** @type {CollabServer|null} used in failure messages */
let currentServer = null

/** The server whose output tail failed waits print (cleared after each test). */
export function setCurrentServer (server) { currentServer = server }

/** The tail of the current server's output, for a failure message ('' when there is none). */
export const currentServerNote = () => currentServer ? `\n${currentServer.describe()}` : ''

after(async () => {
  for (const c of [...clients]) c.destroy()
  for (const s of [...servers]) {
    try { await s.stop('SIGKILL') } catch {}
  }
  if (process.env.COLLAB_KEEP_DATA) {
    for (const d of tempDirs) console.log(`# kept data dir ${d}`)
  } else {
    for (const d of tempDirs) {
      try { rmSync(d, { recursive: true, force: true }) } catch {}
    }
  }
})

// ---------------------------------------------------------------------------------------------
// Client harness
// ---------------------------------------------------------------------------------------------

/** @type {Set<Client>} */
const clients = new Set()
let roomCounter = 0

/** A room name that no earlier run (or other test) has used. */
export function uniqueRoom (label) {
  return `interop-${label}-${process.pid}-${Date.now().toString(36)}-${roomCounter++}`
}

/**
 * Frames the server sent to a stock provider that do not decode as exactly one y-websocket
 * message. The provider would throw (or silently drop the rest); we record the bytes.
 * @type {string[]}
 */
const badFrames = []

/** The `ws` WebSocket, plus a tap that checks every frame the server sends to a provider. */
export class TappedWebSocket extends WebSocket {
  constructor (url, protocols, options) {
    super(url, protocols, options)
    this.on('message', (data, isBinary) => {
      const frame = new Uint8Array(data)
      try {
        if (!isBinary) throw new Error('text frame')
        decodeFrame(frame)
      } catch (e) {
        badFrames.push(`${url}: ${e.message}; frame (${frame.length} bytes): ${hex(frame).slice(0, 600)}`)
      }
    })
  }
}

export function assertNoBadFrames () {
  assert.deepEqual(badFrames.splice(0), [], 'the server sent frames that are not exactly one well-formed y-websocket message')
}

export class Client {
  /**
   * @param {string} url
   * @param {string} room
   * @param {string} name
   * @param {object} [opts] WebsocketProvider options (params, connect, WebSocketPolyfill, ...)
   */
  constructor (url, room, name, opts = {}) {
    this.name = name
    this.room = room
    this.doc = new Y.Doc()
    this.text = this.doc.getText('t')
    // disableBc: Node 20 has a global BroadcastChannel, and lib0 would use it to sync providers
    // of the same room inside this process directly, bypassing the server under test.
    this.provider = new WebsocketProvider(url, room, this.doc, {
      WebSocketPolyfill: /** @type {any} */ (TappedWebSocket),
      disableBc: true,
      ...opts
    })
    this.destroyed = false
    clients.add(this)
  }

  get awareness () { return this.provider.awareness }

  destroy () {
    if (this.destroyed) return
    this.destroyed = true
    clients.delete(this)
    this.provider.destroy()
    this.doc.destroy() // also destroys the awareness instance (and its 15 s renewal interval)
  }
}

afterEach(() => {
  for (const c of [...clients]) c.destroy()
  currentServer = null
})

/**
 * Poll `cond` until it is true, at most `timeoutMs`; otherwise fail saying what we waited for.
 * @param {string} what
 * @param {() => boolean} cond
 * @param {{timeoutMs?: number, detail?: () => string}} [opts]
 */
export async function waitFor (what, cond, { timeoutMs = WAIT_MS, detail } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (cond()) return
    if (Date.now() >= deadline) {
      let msg = `timed out after ${timeoutMs} ms waiting for ${what}`
      if (detail) msg += `\n${detail()}`
      if (badFrames.length) msg += `\nmalformed frames received:\n${badFrames.join('\n')}`
      if (currentServer) msg += `\n${currentServer.describe()}`
      throw new assert.AssertionError({ message: msg })
    }
    await sleep(15)
  }
}

export const status = (...cs) => cs.map((c) =>
  `${c.name}: ws=${c.provider.wsconnected ? 'open' : c.provider.wsconnecting ? 'connecting' : 'closed'} ` +
  `synced=${c.provider.synced} text=${JSON.stringify(c.text.toString())}`).join('\n')

export async function waitSynced (...cs) {
  await waitFor(`${cs.map((c) => c.name).join(', ')} to reach synced`,
    () => cs.every((c) => c.provider.synced), { detail: () => status(...cs) })
}

export async function waitConverged (cs, what = 'all clients to converge', pred = () => true, timeoutMs = WAIT_MS) {
  await waitFor(what, () => {
    const s = cs[0].text.toString()
    return cs.every((c) => c.text.toString() === s) && pred(s)
  }, { timeoutMs, detail: () => status(...cs) })
}

export const sameStateVector = (a, b) =>
  Buffer.from(Y.encodeStateVector(a.doc)).equals(Buffer.from(Y.encodeStateVector(b.doc)))

// ---------------------------------------------------------------------------------------------
// Raw protocol helpers (lib0 encoding, see /work/shared/protocol.md)
// ---------------------------------------------------------------------------------------------

class Reader {
  constructor (buf) { this.buf = buf; this.pos = 0 }
  varUint () {
    let n = 0; let mult = 1
    for (;;) {
      if (this.pos >= this.buf.length) throw new Error('truncated varUint')
      const b = this.buf[this.pos++]
      n += (b & 127) * mult
      if (b < 128) return n
      mult *= 128
      if (mult > 2 ** 56) throw new Error('varUint too long')
    }
  }
  bytes () {
    const len = this.varUint()
    if (this.pos + len > this.buf.length) throw new Error(`varUint8Array of ${len} bytes overruns the frame`)
    const b = this.buf.subarray(this.pos, this.pos + len); this.pos += len; return b
  }
  string () { return Buffer.from(this.bytes()).toString('utf8') }
}

/** Decode one whole frame as exactly ONE y-websocket message; throws on trailing bytes. */
export function decodeFrame (frame) {
  const r = new Reader(frame)
  const type = r.varUint()
  const msg = { type }
  if (type === 0) {
    msg.sub = r.varUint()
    msg.payload = r.bytes()
  } else if (type === 1) {
    msg.payload = r.bytes()
    const a = new Reader(msg.payload)
    const n = a.varUint()
    msg.states = []
    for (let i = 0; i < n; i++) msg.states.push({ clientID: a.varUint(), clock: a.varUint(), json: a.string() })
  } else if (type === 2) {
    msg.sub = r.varUint()
    msg.reason = r.string()
  } else if (type !== 3) {
    throw new Error(`unknown message type ${type}`)
  }
  if (r.pos !== frame.length) {
    throw new Error(`frame holds ${frame.length - r.pos} bytes after the first message (stock clients read one message per frame)`)
  }
  return msg
}

export const hex = (b) => Buffer.from(b).toString('hex').replace(/(..)/g, '$1 ').trim()

export class RawConn {
  /** @param {import('ws').ClientOptions} [options] e.g. headers, origin, ca */
  constructor (url, room, options) {
    this.frames = []
    this.errors = []
    this.ws = new WebSocket(`${url}/${room}`, options)
    this.ws.binaryType = 'nodebuffer'
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve)
      this.ws.once('error', reject)
    })
    this.ws.on('error', () => {})
    this.ws.on('message', (data, isBinary) => {
      const frame = new Uint8Array(data)
      let msg = null
      try {
        if (!isBinary) throw new Error('text frame')
        msg = decodeFrame(frame)
      } catch (e) {
        this.errors.push(`${e.message}: ${hex(frame).slice(0, 300)}`)
      }
      this.frames.push({ frame, msg })
    })
  }
  send (bytes) { this.ws.send(Uint8Array.from(bytes)) }
  msgs () { return this.frames.map((f) => f.msg).filter(Boolean) }
  dump () { return this.frames.map((f) => hex(f.frame).slice(0, 200)).join('\n') }
  close () { try { this.ws.terminate() } catch {} }
}

/** node:test `test`, plus: no frame the server sent to a provider during the test was malformed. */
export function interopTest (name, opts, fn) {
  test(name, { timeout: TEST_TIMEOUT, ...opts }, async (t) => {
    badFrames.length = 0
    await fn(t)
    assertNoBadFrames()
  })
}
