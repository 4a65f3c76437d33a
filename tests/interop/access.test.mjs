// Access control (issue #8) with the stock npm `y-websocket` client: JWT tokens minted with the
// npm `jsonwebtoken` package (as an application's backend would), read-only connections, expiry
// closing a live connection with 4401 and the token-refresh pattern, TLS (wss://), the token
// minting endpoint, anonymous read and the origin allow-list.
//
// Run from tests/interop:   npm ci && node --test
// Every test starts its own server(s) with the flags under test, so all are skipped when COLLAB_URL
// points at an already running server. Needs the `openssl` CLI for the TLS test.

import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { randomBytes } from 'node:crypto'

import jwt from 'jsonwebtoken'
import WebSocket from 'ws'

import {
  EXTERNAL_URL, WAIT_MS, sleep, freshDataDir, CollabServer, setCurrentServer, uniqueRoom,
  Client, TappedWebSocket, waitFor, waitSynced, waitConverged, interopTest
} from './harness.mjs'

const SKIP = EXTERNAL_URL ? 'COLLAB_URL is set: the access tests start servers with their own flags' : false
const SECRET = `interop-secret-${randomBytes(16).toString('hex')}`
const ADMIN_KEY = `interop-admin-${randomBytes(16).toString('hex')}`

/** What the application's backend does: sign the claims with the shared secret (HS256). */
const mint = (doc, perm = 'read-write', ttlSecs = 60, claims = {}, secret = SECRET, algorithm = 'HS256') =>
  jwt.sign({ doc, perm, ...claims }, secret, { algorithm, expiresIn: ttlSecs })

/** One server per flag set, started on first use and shared by the tests that want those flags. */
const started = new Map()
async function serverWith (args, env = {}) {
  const key = JSON.stringify([args, env])
  if (!started.has(key)) {
    const p = CollabServer.start(freshDataDir(), args, { env })
    p.catch(() => started.delete(key)) // a failed start is reported by each test, and retried
    started.set(key, p)
  }
  const server = await started.get(key)
  setCurrentServer(server)
  return server
}
// the secret from the environment (COLLAB_AUTH_SECRET), as a deployment should pass it
const authServer = () => serverWith(['--admin-key', ADMIN_KEY], { COLLAB_AUTH_SECRET: SECRET })
const publicServer = () => serverWith(['--auth-secret', SECRET, '--allow-anonymous-read',
  '--allowed-origins', 'https://app.example.com,https://*.example.org'])

/**
 * A raw WebSocket upgrade: resolves with {status: 101} when it opens, with the HTTP status and body
 * of a refused upgrade ('unexpected-response'), or with {status: 'error', error} (e.g. TLS).
 */
function tryUpgrade (url, options = {}) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, options)
    const done = (r) => { clearTimeout(timer); ws.terminate(); resolve(r) }
    const timer = setTimeout(() => done({ status: 'timeout' }), WAIT_MS)
    ws.on('open', () => done({ status: 101 }))
    ws.on('unexpected-response', (req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { body += d })
      res.on('end', () => { req.destroy(); done({ status: res.statusCode, body }) })
    })
    ws.on('error', (e) => done({ status: 'error', error: e.message }))
  })
}

/** Counts what a provider went through: opened sockets, closes (with codes), 'closed' events. */
function watch (c) {
  const w = { opened: 0, closes: [], closed: [] }
  c.provider.on('status', ({ status }) => { if (status === 'connected') w.opened++ })
  c.provider.on('connection-close', (e) => w.closes.push(e ? { code: e.code, reason: e.reason } : null))
  c.provider.on('closed', (e) => w.closed.push(e))
  return w
}

interopTest('A1. read-only: its edits reach neither the writers nor the server; it still gets edits and presence', { skip: SKIP }, async () => {
  const { url } = await authServer()
  const room = uniqueRoom('read-only')
  const w = new Client(url, room, 'W', { params: { token: mint(room) } })
  const r = new Client(url, room, 'R', { params: { token: mint(room, 'read-only') }, connect: false })
  const rWatch = watch(r)
  // an edit made before connecting travels in R's SyncStep2 answer, the others as sync Updates
  r.text.insert(0, '[RO offline edit] ')
  r.provider.connect()
  await waitSynced(w, r)

  w.text.insert(0, 'from W. ')
  await waitFor('read-only R to receive W\'s edit', () => r.text.toString().includes('from W. '))
  r.text.insert(r.text.length, '[RO live edit]')
  r.text.delete(0, 3)

  // presence both ways. R's awareness goes out after its edits on the same socket, so once W has
  // it the server has handled (and refused) those edits.
  r.awareness.setLocalStateField('user', { name: 'r' })
  w.awareness.setLocalStateField('user', { name: 'w' })
  await waitFor('W to see read-only R\'s presence', () => w.awareness.getStates().get(r.doc.clientID)?.user?.name === 'r')
  await waitFor('R to see W\'s presence', () => r.awareness.getStates().get(w.doc.clientID)?.user?.name === 'w')
  await sleep(300)
  assert.equal(w.text.toString(), 'from W. ', 'an edit of the read-only provider reached the read-write provider')

  // later edits still reach R, and R's connection was never closed (no reconnect-and-resend loop)
  w.text.insert(w.text.length, 'W again.')
  await waitFor('R to receive W\'s second edit', () => r.text.toString().includes('W again.'))
  assert.ok(r.provider.wsconnected, 'the read-only connection was closed')
  assert.equal(rWatch.opened, 1, 'the read-only provider had to reconnect')
  assert.deepEqual(rWatch.closes, [])

  // nothing of R's was stored: a newcomer gets exactly W's text
  const fresh = new Client(url, room, 'Fresh', { params: { token: mint(room) } })
  await waitSynced(fresh)
  assert.equal(fresh.text.toString(), 'from W. W again.', 'the server stored an edit of the read-only provider')
  assert.equal(w.text.toString(), 'from W. W again.')
})

interopTest('A2. tokens: a backend-minted HS256 token is accepted; wrong-document, missing and invalid tokens are refused', { skip: SKIP }, async () => {
  const { url } = await authServer()
  const team = `team-${uniqueRoom('tokens')}`
  const room = `${team}/notes`
  const good = new Client(url, room, 'Good', { params: { token: mint(room, 'read-write', 60, { sub: 'user-1' }) } })
  const prefixed = new Client(url, room, 'Prefix', { params: { token: mint(`${team}/*`) } })
  const wrongDoc = new Client(url, room, 'WrongDoc', { params: { token: mint(`${team}/other`) } })
  const noToken = new Client(url, room, 'NoToken')
  const refused = [wrongDoc, noToken].map((c) => ({ c, w: watch(c) }))

  await waitSynced(good, prefixed)
  good.text.insert(0, 'good ')
  prefixed.text.insert(0, 'prefix ')
  await waitConverged([good, prefixed], 'the exact-document and the prefix token holders to converge',
    (s) => s.includes('good ') && s.includes('prefix '))
  await sleep(1000) // the refused providers keep retrying with back-off meanwhile
  for (const { c, w } of refused) {
    assert.equal(c.provider.synced, false, `${c.name} synced`)
    assert.equal(w.opened, 0, `${c.name}'s WebSocket opened`)
    assert.ok(w.closes.length >= 1, `${c.name} never saw its connection fail`)
    assert.equal(c.text.toString(), '', `${c.name} received content`)
  }

  // what the refusals are, on the wire
  const at = `${url}/${room}`
  const now = Math.floor(Date.now() / 1000)
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const cases = [
    ['no token', at, {}, 401],
    ['token for another document', `${at}?token=${mint(`${team}/other`)}`, {}, 403],
    ['prefix token for another team', `${at}?token=${mint('team-x/*')}`, {}, 403],
    ['bad signature', `${at}?token=${mint(room, 'read-write', 60, {}, 'another-secret')}`, {}, 401],
    ['malformed token', `${at}?token=not.a.jwt`, {}, 401],
    ['expired token', `${at}?token=${jwt.sign({ doc: room, perm: 'read-write', exp: now - 5 }, SECRET)}`, {}, 401],
    ['not yet valid (nbf in 5 min)', `${at}?token=${mint(room, 'read-write', 600, { nbf: now + 300 })}`, {}, 401],
    ['alg HS512', `${at}?token=${mint(room, 'read-write', 60, {}, SECRET, 'HS512')}`, {}, 401],
    ['alg none', `${at}?token=${b64({ alg: 'none', typ: 'JWT' })}.${b64({ doc: room, perm: 'read-write', exp: now + 60 })}.`, {}, 401],
    ['good token in the query', `${at}?token=${mint(room)}`, {}, 101],
    ['good token as Authorization: Bearer', at, { headers: { authorization: `Bearer ${mint(room)}` } }, 101]
  ]
  for (const [what, u, opts, want] of cases) {
    const res = await tryUpgrade(u, opts)
    assert.equal(res.status, want, `${what}: ${JSON.stringify(res)}`)
    if (want !== 101) assert.ok(res.body.trim().length > 0, `${what}: the refusal carries no reason`)
  }
})

interopTest('A3. expiry: closed with 4401 at exp, no automatic reconnect; a fresh token in provider.params brings it back', { skip: SKIP }, async () => {
  const { url } = await authServer()
  const room = uniqueRoom('expiry')
  const other = new Client(url, room, 'Other', { params: { token: mint(room) } })
  const token = mint(room, 'read-write', 3) // exp = iat + 3 s, iat rounded down: 2-3 s left
  const exp = jwt.decode(token).exp * 1000
  const p = new Client(url, room, 'P', { params: { token } })
  const pw = watch(p)
  await waitSynced(p, other)
  p.text.insert(0, 'before expiry. ')
  await waitConverged([p, other], 'P\'s edit to reach Other', (s) => s === 'before expiry. ')

  await waitFor('the server to close P\'s connection when its token expires',
    () => pw.closes.length > 0, { timeoutMs: exp - Date.now() + 3000 })
  const lateBy = Date.now() - exp
  assert.deepEqual(pw.closes[0], { code: 4401, reason: 'token expired' })
  assert.ok(lateBy > -100 && lateBy < 1500, `closed ${lateBy} ms after exp (want within 1 s)`)
  // y-websocket 3.1.0 treats 4400-4499 as permanent: it emits 'closed' and stops reconnecting
  assert.deepEqual(pw.closed, [{ code: 4401, reason: 'token expired' }])

  other.text.insert(other.text.length, 'meanwhile. ')
  p.text.insert(0, 'offline. ')
  await sleep(1500)
  assert.equal(pw.opened, 1, 'the provider reconnected by itself after 4401')
  assert.equal(pw.closes.length, 1)
  assert.ok(p.provider.ws === null && !p.provider.shouldConnect, 'the provider is still trying to connect')
  assert.equal(other.text.toString(), 'before expiry. meanwhile. ')

  // the refresh pattern: a new token from the backend, then connect() again
  p.provider.params.token = mint(room)
  p.provider.connect()
  await waitConverged([p, other], 'P (with a fresh token) and Other to exchange the edits made meanwhile',
    (s) => s === 'offline. before expiry. meanwhile. ')
  assert.ok(p.provider.synced)
  assert.equal(pw.opened, 2)
})

interopTest('A4. TLS: two providers converge over wss:// with a self-signed certificate', { skip: SKIP }, async () => {
  const dir = freshDataDir()
  const cert = path.join(dir, 'cert.pem')
  const key = path.join(dir, 'key.pem')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert], { stdio: 'pipe' })
  const srv = await serverWith(['--tls-cert', cert, '--tls-key', key])
  assert.match(srv.url, /^wss:\/\/127\.0\.0\.1:\d+$/)
  const ca = readFileSync(cert)
  class CaWebSocket extends TappedWebSocket {
    constructor (url, protocols) { super(url, protocols, { ca }) }
  }
  const room = uniqueRoom('tls')
  const a = new Client(srv.url, room, 'A', { WebSocketPolyfill: CaWebSocket })
  const b = new Client(srv.url, room, 'B', { WebSocketPolyfill: CaWebSocket })
  await waitSynced(a, b)
  a.text.insert(0, 'over ')
  b.text.insert(0, 'TLS ')
  await waitConverged([a, b], 'A and B to converge over wss://', (s) => s.length === 9)

  // the certificate is really verified, and plain ws:// gets no WebSocket on that port
  const noCa = await tryUpgrade(`${srv.url}/${room}`)
  assert.equal(noCa.status, 'error', `without the CA: ${JSON.stringify(noCa)}`)
  assert.match(noCa.error, /self[- ]signed|certificate/i)
  const plain = await tryUpgrade(`${srv.url.replace('wss:', 'ws:')}/${room}`)
  assert.notEqual(plain.status, 101, 'a plain ws:// upgrade was accepted on the TLS port')
})

interopTest('A5. POST /api/tokens with the admin key returns a token a provider can use', { skip: SKIP }, async () => {
  const srv = await authServer()
  const room = uniqueRoom('minted')
  const post = (key, body) => fetch(`${srv.httpUrl}/api/tokens`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body)
  })
  const res = await post(ADMIN_KEY, { doc: room, perm: 'read-write', ttl_secs: 120, sub: 'ops' })
  assert.equal(res.status, 200, await res.clone().text())
  const { token, expires_at: expiresAt } = await res.json()
  const claims = jwt.verify(token, SECRET, { algorithms: ['HS256'] })
  assert.equal(claims.doc, room)
  assert.equal(claims.perm, 'read-write')
  assert.equal(claims.exp, expiresAt)
  assert.ok(Math.abs(expiresAt - (Date.now() / 1000 + 120)) < 5, `expires_at ${expiresAt}`)

  const a = new Client(srv.url, room, 'A', { params: { token } })
  const b = new Client(srv.url, room, 'B', { params: { token: mint(room) } })
  await waitSynced(a, b)
  a.text.insert(0, 'minted by the endpoint')
  await waitConverged([a, b], 'the endpoint token holder\'s edit to reach B', (s) => s === 'minted by the endpoint')

  assert.equal((await post('wrong-key', { doc: room, perm: 'read-write', ttl_secs: 60 })).status, 401, 'wrong admin key')
  assert.equal((await post(ADMIN_KEY, '{"doc": 1')).status, 400, 'malformed body')
  assert.equal((await post(ADMIN_KEY, { doc: room, perm: 'owner', ttl_secs: 60 })).status, 400, 'unknown perm')
  const noAdmin = await publicServer()
  const res404 = await fetch(`${noAdmin.httpUrl}/api/tokens`, {
    method: 'POST', headers: { authorization: `Bearer ${ADMIN_KEY}` }, body: '{}'
  })
  assert.equal(res404.status, 404, 'the endpoint exists without --admin-key')
})

interopTest('A6. --allow-anonymous-read lets token-less providers read only; the origin allow-list refuses other origins', { skip: SKIP }, async () => {
  const { url } = await publicServer()
  const room = uniqueRoom('public')
  const w = new Client(url, room, 'W', { params: { token: mint(room) } })
  const anon = new Client(url, room, 'Anon')
  await waitSynced(w, anon)
  w.text.insert(0, 'public text')
  await waitFor('the anonymous reader to receive the text', () => anon.text.toString() === 'public text')
  anon.text.insert(0, 'vandalism ')
  anon.awareness.setLocalStateField('user', { name: 'anon' })
  await waitFor('W to see the anonymous reader\'s presence', () => w.awareness.getStates().get(anon.doc.clientID)?.user?.name === 'anon')
  await sleep(300)
  assert.equal(w.text.toString(), 'public text', 'an anonymous reader\'s edit was applied')

  const at = `${url}/${room}`
  const cases = [
    ['an invalid token, even with anonymous read', `${at}?token=garbage`, {}, 401],
    ['a foreign origin', at, { origin: 'https://evil.example.net' }, 403],
    ['a foreign origin, with a valid token', `${at}?token=${mint(room)}`, { origin: 'https://evil.example.net' }, 403],
    ['the bare pattern domain (not a subdomain)', at, { origin: 'https://example.org' }, 403],
    ['an exact allowed origin', at, { origin: 'https://app.example.com' }, 101],
    ['a subdomain pattern', at, { origin: 'https://docs.example.org' }, 101],
    ['no Origin header (non-browser client)', at, {}, 101]
  ]
  for (const [what, u, opts, want] of cases) {
    const res = await tryUpgrade(u, opts)
    assert.equal(res.status, want, `${what}: ${JSON.stringify(res)}`)
  }
})
