// Cluster-mode helpers (issue #14) for cluster.test.mjs: a real `redis-server` on a free port in a
// temporary folder (AOF on, appendfsync always, no eviction), N collab processes with
// `--redis-url` (through harness.mjs's CollabServer), nginx as a round-robin WebSocket balancer
// in front of them, and a minimal RESP client to look at what collab stored in Redis.
// Every process started here is killed when the test file ends.

import { after } from 'node:test'
import { spawn } from 'node:child_process'
import { accessSync, constants, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

import { CollabServer, freshDataDir, sleep, within } from './harness.mjs'

/** Full path of an executable on PATH (or in `extraDirs`), or null. */
export function which (name, extraDirs = []) {
  const dirs = [...(process.env.PATH || '').split(path.delimiter), ...extraDirs]
  for (const d of dirs) {
    if (!d) continue
    const p = path.join(d, name)
    try {
      accessSync(p, constants.X_OK)
      return p
    } catch {}
  }
  return null
}

/** COLLAB_REDIS_SERVER / COLLAB_NGINX name the binary; one that is not executable counts as missing. */
function binary (envName, name, extraDirs) {
  const p = process.env[envName]
  if (p === undefined) return which(name, extraDirs)
  try {
    accessSync(p, constants.X_OK)
    return p
  } catch {
    return null
  }
}

export const REDIS_SERVER = binary('COLLAB_REDIS_SERVER', 'redis-server', ['/usr/bin', '/usr/local/bin'])
// Debian puts nginx in /usr/sbin, which a non-root PATH often lacks.
export const NGINX = binary('COLLAB_NGINX', 'nginx', ['/usr/sbin', '/usr/local/sbin', '/usr/local/nginx/sbin'])

/** @type {Set<import('node:child_process').ChildProcess>} */
const children = new Set()
const dirs = []

function tempDir (label) {
  const d = mkdtempSync(path.join(os.tmpdir(), `collab-${label}-`))
  dirs.push(d)
  return d
}

/**
 * nginx is stopped with SIGTERM: its master then takes its workers down, whereas a SIGKILLed
 * master leaves them running, still listening on the test's port.
 */
function track (child, stopSignal = 'SIGKILL') {
  child.stopSignal = stopSignal
  children.add(child)
  child.once('exit', () => children.delete(child))
  return child
}

after(async () => {
  const gone = [...children].map((c) => new Promise((resolve) => {
    c.once('exit', resolve)
    try { c.kill(c.stopSignal) } catch { resolve() }
  }))
  await within(Promise.all(gone), 5000)
  for (const c of children) { try { c.kill('SIGKILL') } catch {} }
  if (!process.env.COLLAB_KEEP_DATA) {
    for (const d of dirs) { try { rmSync(d, { recursive: true, force: true }) } catch {} }
  }
})
process.on('exit', () => { for (const c of children) { try { c.kill(c.stopSignal) } catch {} } })

/** A port nobody listens on right now (the caller binds it soon after; a lost race fails loudly). */
export function freePort () {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {net.AddressInfo} */ (srv.address())
      srv.close(() => resolve(port))
    })
  })
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/** Encode one command as a RESP array of bulk strings. */
function respCommand (args) {
  let s = `*${args.length}\r\n`
  for (const a of args) s += `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`
  return s
}

/**
 * Parse one RESP reply from `buf` at `pos`: [value, next position], or null when incomplete.
 * Errors come back as Error values, not thrown, so the caller decides.
 */
function parseResp (buf, pos = 0) {
  const eol = buf.indexOf('\r\n', pos)
  if (eol < 0) return null
  const kind = String.fromCharCode(buf[pos])
  const line = buf.toString('utf8', pos + 1, eol)
  const next = eol + 2
  if (kind === '+') return [line, next]
  if (kind === '-') return [new Error(line), next]
  if (kind === ':') return [Number(line), next]
  if (kind === '$') {
    const n = Number(line)
    if (n < 0) return [null, next]
    if (buf.length < next + n + 2) return null
    return [buf.subarray(next, next + n), next + n + 2]
  }
  if (kind === '*') {
    const n = Number(line)
    if (n < 0) return [null, next]
    const out = []
    let p = next
    for (let i = 0; i < n; i++) {
      const r = parseResp(buf, p)
      if (r === null) return null
      out.push(r[0])
      p = r[1]
    }
    return [out, p]
  }
  throw new Error(`unexpected RESP reply type ${JSON.stringify(kind)}`)
}

/** One command on a fresh connection; resolves with the decoded reply (bulk strings as Buffers). */
export function redisCall (port, ...args) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1')
    let buf = Buffer.alloc(0)
    const timer = setTimeout(() => { sock.destroy(); reject(new Error(`redis ${args[0]}: no reply within 3 s`)) }, 3000)
    sock.on('connect', () => sock.write(respCommand(args)))
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d])
      const r = parseResp(buf)
      if (r === null) return
      clearTimeout(timer)
      sock.end()
      resolve(r[0])
    })
    sock.on('error', (e) => { clearTimeout(timer); reject(e) })
  })
}

export class Redis {
  /** A fresh redis-server with the settings README.md asks for in cluster mode. */
  static async start () {
    if (!REDIS_SERVER) throw new Error('redis-server not found')
    const dir = tempDir('redis')
    for (let attempt = 0; ; attempt++) {
      const port = await freePort()
      const r = new Redis(dir, port)
      try {
        await r._ready
        return r
      } catch (e) {
        r.child.kill('SIGKILL')
        if (attempt >= 2) throw e
      }
    }
  }

  constructor (dir, port) {
    this.dir = dir
    this.port = port
    this.url = `redis://127.0.0.1:${port}`
    this.log = ''
    this.child = track(spawn(REDIS_SERVER, [
      '--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
      '--appendonly', 'yes', '--appendfsync', 'always', '--maxmemory-policy', 'noeviction',
      '--save', ''
    ], { stdio: ['ignore', 'pipe', 'pipe'] }))
    this.child.stdout.on('data', (d) => { this.log += d })
    this.child.stderr.on('data', (d) => { this.log += d })
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })))
    this._ready = (async () => {
      const deadline = Date.now() + 10000
      for (;;) {
        if (this.child.exitCode !== null || this.child.signalCode !== null) {
          throw new Error(`redis-server exited before answering PING\n${this.describe()}`)
        }
        try {
          if ((await redisCall(port, 'PING')) === 'PONG') return
        } catch {}
        if (Date.now() > deadline) throw new Error(`redis-server did not answer PING within 10 s\n${this.describe()}`)
        await sleep(50)
      }
    })()
  }

  call (...args) { return redisCall(this.port, ...args) }

  describe () {
    return `[redis-server on ${this.port}, dir ${this.dir}]\n--- redis output (tail) ---\n` +
      `${this.log.split('\n').slice(-15).join('\n')}\n---`
  }

  async stop () {
    this.child.kill('SIGTERM')
    await within(this.exited, 5000)
  }
}

// ---------------------------------------------------------------------------------------------
// collab instances
// ---------------------------------------------------------------------------------------------

/** `n` collab processes on free ports, each with its own data folder, sharing `redis`. */
export async function startInstances (redis, n, extraArgs = []) {
  return Promise.all(Array.from({ length: n }, () =>
    CollabServer.start(freshDataDir(), ['--redis-url', redis.url, ...extraArgs])))
}

/** A Prometheus sample of a collab instance: the value of `name` (no labels), or null. */
export async function metric (server, name) {
  const text = await (await fetch(`${server.httpUrl}/metrics`)).text()
  const m = new RegExp(`^${name} ([0-9.e+-]+)$`, 'm').exec(text)
  return m ? Number(m[1]) : null
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/** The load-balancer configuration of scripts/cluster.sh and README.md, for a test's own prefix. */
export function nginxConfig (dir, port, upstreamPorts) {
  const root = process.getuid && process.getuid() === 0
  return `
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log notice;
${root ? 'user root;  # workers write under the test folder, which only root may enter' : ''}
events { worker_connections 1024; }
http {
  client_body_temp_path ${dir}/tmp/body;
  proxy_temp_path ${dir}/tmp/proxy;
  fastcgi_temp_path ${dir}/tmp/fastcgi;
  uwsgi_temp_path ${dir}/tmp/uwsgi;
  scgi_temp_path ${dir}/tmp/scgi;
  log_format cluster '$remote_addr "$request" $status upstream=$upstream_addr';
  access_log ${dir}/access.log cluster;
  map $http_upgrade $connection_upgrade {
    default upgrade;
    ''      close;
  }
  upstream collab {
${upstreamPorts.map((p) => `    server 127.0.0.1:${p};`).join('\n')}
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://collab;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
`
}

export class Nginx {
  /** nginx in the foreground, round-robin over `servers` (CollabServer instances). */
  static async start (servers) {
    if (!NGINX) throw new Error('nginx not found')
    const dir = tempDir('nginx')
    mkdirSync(path.join(dir, 'tmp'))
    for (let attempt = 0; ; attempt++) {
      const port = await freePort()
      writeFileSync(path.join(dir, 'nginx.conf'), nginxConfig(dir, port, servers.map((s) => s.port)))
      const n = new Nginx(dir, port)
      try {
        await n._ready
        return n
      } catch (e) {
        n.child.kill('SIGTERM')
        if (attempt >= 2) throw e
      }
    }
  }

  constructor (dir, port) {
    this.dir = dir
    this.port = port
    this.url = `ws://127.0.0.1:${port}`
    this.httpUrl = `http://127.0.0.1:${port}`
    this.log = ''
    this.child = track(spawn(NGINX, ['-e', path.join(dir, 'error.log'), '-p', dir, '-c', path.join(dir, 'nginx.conf'), '-g', 'daemon off;'],
      { stdio: ['ignore', 'pipe', 'pipe'] }), 'SIGTERM')
    this.child.stdout.on('data', (d) => { this.log += d })
    this.child.stderr.on('data', (d) => { this.log += d })
    this._ready = (async () => {
      const deadline = Date.now() + 10000
      for (;;) {
        if (this.child.exitCode !== null) throw new Error(`nginx exited (code ${this.child.exitCode})\n${this.describe()}`)
        try {
          if ((await fetch(`${this.httpUrl}/healthz`)).ok) return
        } catch {}
        if (Date.now() > deadline) throw new Error(`nginx did not proxy /healthz within 10 s\n${this.describe()}`)
        await sleep(50)
      }
    })()
  }

  /** The upstream of every request so far, from the access log. */
  upstreams () {
    let text = ''
    try { text = readFileSync(path.join(this.dir, 'access.log'), 'utf8') } catch {}
    return [...text.matchAll(/upstream=(\S+)/g)].map((m) => m[1])
  }

  describe () {
    let err = ''
    try { err = readFileSync(path.join(this.dir, 'error.log'), 'utf8') } catch {}
    return `[nginx on ${this.port}, prefix ${this.dir}]\n${this.log}\n--- error.log (tail) ---\n` +
      `${err.split('\n').slice(-15).join('\n')}\n---`
  }
}
