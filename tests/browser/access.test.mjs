// The demo page against a server that requires tokens (issue #8), in headless Chromium.
//   cd tests/browser && npm ci && node --test
// A small Node HTTP server plays the application's backend: it mints short-lived tokens with the
// npm `jsonwebtoken` package at GET /token?doc=NAME, which the page calls when its token expires.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { once } from 'node:events'
import { randomBytes } from 'node:crypto'
import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import jwt from 'jsonwebtoken'
import { Server, DemoPage, launchBrowser, makeDataDir, removeDir, waitFor, sleep, repoRoot } from './harness.mjs'

const SECRET = randomBytes(32).toString('hex')
const TTL_SECS = 3 // exp = iat + 3 s with iat rounded down: each token lives 2-3 s
const mint = (doc, ttl = TTL_SECS) => jwt.sign({ doc, perm: 'read-write', sub: 'browser-test' }, SECRET, { algorithm: 'HS256', expiresIn: ttl })
const expiresAt = (token) => jwt.decode(token).exp * 1000

let browser
let server
let dataDir
let backend
let backendUrl
/** every token request the backend answered */
const requests = []
const contexts = new Set()
const run = Date.now().toString(36)

const newContext = async () => {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 750 } })
  contexts.add(ctx)
  return ctx
}
const closeContexts = async () => {
  await Promise.all([...contexts].map((c) => c.close().catch(() => {})))
  contexts.clear()
}

before(async () => {
  dataDir = await makeDataDir()
  server = new Server(dataDir, ['--auth-secret', SECRET])
  await server.start()
  const pageOrigin = `http://127.0.0.1:${server.port}`
  backend = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://backend')
    const doc = url.searchParams.get('doc')
    if (url.pathname !== '/token' || !doc) {
      res.writeHead(404).end()
      return
    }
    // a real backend would check the user's session cookie here and decide on doc and perm
    requests.push({ doc, origin: req.headers.origin, at: Date.now() })
    res.writeHead(200, {
      'content-type': 'application/json',
      'cache-control': 'no-store',
      'access-control-allow-origin': pageOrigin,
      'access-control-allow-credentials': 'true'
    })
    res.end(JSON.stringify({ token: mint(doc) }))
  })
  backend.listen(0, '127.0.0.1')
  await once(backend, 'listening')
  backendUrl = `http://127.0.0.1:${backend.address().port}/token`
  browser = await launchBrowser()
})

after(async () => {
  await closeContexts()
  if (browser) await browser.close()
  if (backend) backend.close()
  if (server) {
    await server.stop().catch(() => {})
    await mkdir(path.join(repoRoot, 'target'), { recursive: true })
    await writeFile(path.join(repoRoot, 'target/browser-access-server.log'), server.output)
  }
  if (dataDir) await removeDir(dataDir)
})

test('short-lived tokens: the page renews its token from tokenUrl when the server closes with 4401, and keeps collaborating', { timeout: 60000 }, async (t) => {
  const doc = `secure-${run}`
  const first = mint(doc)
  const hash = `#doc=${doc}&token=${first}&tokenUrl=${encodeURIComponent(backendUrl)}`
  const alice = await DemoPage.open(await newContext(), server.url(hash), { name: 'Alice' })
  // Bob's page holds a long token and no tokenUrl
  const bob = await DemoPage.open(await newContext(), server.url(`#doc=${doc}&token=${mint(doc, 120)}`), { name: 'Bob' })
  const seen = new Set()
  const poll = setInterval(() => alice.status().then((s) => seen.add(`${s.text}|${s.note}`), () => {}), 50)
  try {
    await alice.type('Alice, first token.')
    await bob.waitForText('Alice, first token.', 2000)
    assert.ok(requests.every((r) => r.at >= expiresAt(first)), 'the page fetched a token although its own one was valid')

    // the server closes Alice's socket with 4401 at exp; the page fetches a token and reconnects
    await waitFor(() => requests.length >= 1, { timeout: expiresAt(first) - Date.now() + 3000, message: 'the page to ask the backend for a fresh token' })
    t.diagnostic(`first token request ${requests[0].at - expiresAt(first)} ms after exp`)
    assert.deepEqual(requests[0], { doc, origin: `http://127.0.0.1:${server.port}`, at: requests[0].at })
    await alice.waitForState('connected', 5000)
    await alice.waitForPeer('Bob', 3000)
    await bob.type(' Bob, after the refresh.')
    await alice.waitForText('Alice, first token. Bob, after the refresh.', 3000)
    await alice.type(' Alice, renewed token.')
    await bob.waitForText('Alice, renewed token.', 3000)
    await alice.waitForSaved(3000)

    // the renewed tokens are short-lived too: it goes on renewing by itself
    await waitFor(() => requests.length >= 2, { timeout: 6000, message: 'a second token renewal' })
    await alice.waitForState('connected', 5000)
    await bob.type(' Bob again.')
    await alice.waitForText('Bob again.', 3000)
    assert.ok(requests.every((r) => r.doc === doc), JSON.stringify(requests))
    // the hash holds the latest token, so a reload keeps working
    const inHash = await alice.page.evaluate(() => new URLSearchParams(location.hash.slice(1)).get('token'))
    assert.notEqual(inHash, first, 'the renewed token did not replace the first one in the hash')
    assert.equal(jwt.verify(inHash, SECRET).doc, doc)
    assert.ok(![...seen].some((s) => s.startsWith('access')), `Alice's page showed an access problem: ${[...seen].join(', ')}`)
    alice.assertNoConsoleErrors()
    bob.assertNoConsoleErrors()
  } catch (e) {
    e.message += `\nAlice's statuses: ${[...seen].join(', ')}\ntoken requests: ${JSON.stringify(requests)}` +
      `\nAlice's console:\n  ${alice.messages.join('\n  ')}\nBob's console:\n  ${bob.messages.join('\n  ')}`
    throw e
  } finally {
    clearInterval(poll)
    await closeContexts()
  }
})

test('without tokenUrl: an expired token shows "access expired — reload with a new token"; a token for another document "access refused"', { timeout: 60000 }, async () => {
  const doc = `expiring-${run}`
  const token = mint(doc, 6) // time to open the page and type first
  const asked = () => requests.filter((r) => r.doc === doc).length
  try {
    const page = await DemoPage.open(await newContext(), server.url(`#doc=${doc}&token=${token}`), { name: 'Carol' })
    await page.type('typed before expiry')
    await page.waitForSaved(3000)
    await waitFor(async () => (await page.status()).text === 'access expired', { timeout: expiresAt(token) - Date.now() + 3000, message: 'status "access expired"' })
    assert.equal((await page.status()).note, 'reload with a new token')
    await sleep(1500)
    assert.equal((await page.status()).text, 'access expired', 'the page reconnected with an expired token?')
    assert.equal(asked(), 0, 'a page without tokenUrl asked the backend')

    const other = await (await newContext()).newPage()
    await other.goto(server.url(`#doc=${doc}&token=${mint(`not-${doc}`, 120)}`))
    await waitFor(() => other.evaluate(() => document.getElementById('status-text').textContent === 'access refused'), { timeout: 3000, message: 'status "access refused"' })

    // a page with only a tokenUrl asks for its first token itself
    const fresh = await DemoPage.open(await newContext(), server.url(`#doc=${doc}&tokenUrl=${encodeURIComponent(backendUrl)}`))
    await fresh.waitForText('typed before expiry', 3000)
    assert.ok(asked() >= 1, "the page with only a tokenUrl never asked for a token")
    page.assertNoConsoleErrors()
    fresh.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})
