// End-to-end tests of the demo page served by the collab binary, in headless Chromium.
//   cd tests/browser && npm ci && node --test
// COLLAB_BIN overrides the server binary (default: ../../target/debug/collab).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, copyFile, writeFile } from 'node:fs/promises'
import path from 'node:path'
import {
  Server, DemoPage, launchBrowser, makeDataDir, removeDir, waitFor, sleep, repoRoot
} from './harness.mjs'

let browser
let server
let dataDir
const contexts = new Set()
const run = Date.now().toString(36)
const docName = (label) => `${label}-${run}`

const newContext = async (opts = {}) => {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 750 }, ...opts })
  contexts.add(ctx)
  return ctx
}
const closeContexts = async () => {
  await Promise.all([...contexts].map((c) => c.close().catch(() => {})))
  contexts.clear()
}

before(async () => {
  dataDir = await makeDataDir()
  server = new Server(dataDir)
  await server.start()
  browser = await launchBrowser()
})

after(async () => {
  await closeContexts()
  if (browser) await browser.close()
  if (server) {
    await server.stop().catch(() => {})
    // the server's own log, for looking into a failure
    await mkdir(path.join(repoRoot, 'target'), { recursive: true })
    await writeFile(path.join(repoRoot, 'target/browser-tests-server.log'), server.output)
  }
  if (dataDir) await removeDir(dataDir)
})

test('the server serves the page and its assets', async () => {
  for (const p of ['/', '/index.html', '/app.js', '/app.css']) {
    const res = await fetch(`http://127.0.0.1:${server.port}${p}`)
    assert.equal(res.status, 200, `GET ${p}`)
    const type = res.headers.get('content-type') || ''
    const want = p.endsWith('.js') ? 'javascript' : p.endsWith('.css') ? 'text/css' : 'text/html'
    assert.match(type, new RegExp(want), `content-type of ${p}`)
  }
})

test('two pages on one document: live edits and presence; a third document sees none of it', { timeout: 60000 }, async (t) => {
  const doc = docName('shared')
  try {
    const alice = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Alice' })
    const bob = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Bob' })
    const carol = await DemoPage.open(await newContext(), server.url(`#doc=${docName('other')}`), { name: 'Carol' })

    // presence: each sees the other in the who's-here list
    await alice.waitForPeer('Bob', 3000)
    await bob.waitForPeer('Alice', 3000)

    // typing in one appears in the other within 1 s
    await alice.type('Hello from Alice')
    let t0 = Date.now()
    await bob.waitForText('Hello from Alice', 1000)
    const aliceToBob = Date.now() - t0
    await bob.type(' and Bob')
    t0 = Date.now()
    await alice.waitForText('Hello from Alice and Bob', 1000)
    const bobToAlice = Date.now() - t0
    t.diagnostic(`propagation: alice→bob ${aliceToBob} ms, bob→alice ${bobToAlice} ms`)

    // remote cursors carry the other user's name
    await waitFor(() => alice.page.locator('.cm-ySelectionInfo', { hasText: 'Bob' }).count(), { timeout: 3000, message: "Bob's cursor in Alice's editor" })
    await waitFor(() => bob.page.locator('.cm-ySelectionInfo', { hasText: 'Alice' }).count(), { timeout: 3000, message: "Alice's cursor in Bob's editor" })

    await alice.waitForSaved(3000)
    await bob.waitForSaved(3000)

    // the third document is isolated in both directions
    await sleep(300)
    assert.equal(await carol.text(), '', 'other document stays empty')
    assert.deepEqual(await carol.peers(), ['Carol'])
    assert.deepEqual((await alice.peers()).sort(), ['Alice', 'Bob'])
    assert.deepEqual((await bob.peers()).sort(), ['Alice', 'Bob'])
    await carol.type('Carol only')
    await carol.waitForSaved(3000)
    await sleep(300)
    assert.ok(!(await alice.text()).includes('Carol'), 'edit on another document leaked')

    // the document field switches Carol over: hash updated, content and presence follow
    await carol.page.locator('#doc-input').fill(doc)
    await carol.page.locator('#doc-form button').click()
    await waitFor(() => carol.page.evaluate((d) => location.hash === `#doc=${d}`, doc), { timeout: 2000, message: 'hash update' })
    await carol.waitForState('connected', 5000)
    await carol.waitForText('Hello from Alice and Bob', 3000)
    await alice.waitForPeer('Carol', 3000)
    assert.equal(await carol.page.locator('#doc-title').textContent(), doc)
    assert.match(await carol.page.locator('#new-tab').getAttribute('href'), new RegExp(`#doc=${doc}$`))
    // ... and her old document's presence is gone from it: Alice and Bob never saw her there
    await carol.page.goBack()
    await carol.waitForText('Carol only', 3000)
    await alice.waitForPeer('Alice')
    await waitFor(async () => !(await alice.peers()).includes('Carol'), { timeout: 3000, message: 'Carol gone from the shared doc' })

    for (const p of [alice, bob, carol]) p.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})

test('reloading a page keeps the content', { timeout: 60000 }, async () => {
  const doc = docName('reload')
  try {
    const ctx = await newContext()
    const page = await DemoPage.open(ctx, server.url(`#doc=${doc}`), { name: 'Dana' })
    await page.type('# Persistent notes\nstill here after a reload\nDELETE ME')
    await page.waitForSaved(3000)
    // a deletion alone does not move the state vector: "saved" must still wait for its echo
    for (let i = 0; i < '\nDELETE ME'.length; i++) await page.page.keyboard.press('Backspace')
    await page.waitForSaved(3000)
    await page.page.reload()
    await page.waitForState('connected', 10000)
    await page.waitForText('still here after a reload', 3000)
    assert.equal(await page.text(), '# Persistent notes\nstill here after a reload')
    // a brand-new browser on the same document gets it too
    const other = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Eve' })
    await other.waitForText('still here after a reload', 3000)
    page.assertNoConsoleErrors()
    other.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})

test('an edit whose echo was lost with its socket is confirmed after the reconnect', { timeout: 60000 }, async () => {
  const doc = docName('lost-echo')
  // Between the page and the real server: forwards everything, except that once armed it drops the
  // next update the server sends and cuts the connection, as a network drop (or a close at token
  // expiry) can right after the server applied an edit.
  let dropNextUpdate = false
  let dropped = 0
  try {
    const ctx = await newContext()
    await ctx.routeWebSocket((url) => url.pathname === `/${doc}`, (page) => {
      const upstream = page.connectToServer()
      page.onMessage((m) => upstream.send(m))
      upstream.onMessage((m) => {
        // y-protocols: 0 = sync, then 2 = update
        if (dropNextUpdate && typeof m !== 'string' && m[0] === 0 && m[1] === 2) {
          dropNextUpdate = false
          dropped++
          page.close({ code: 1001, reason: 'test: connection lost' })
          upstream.close()
          return
        }
        page.send(m)
      })
    })
    const alice = await DemoPage.open(ctx, server.url(`#doc=${doc}`), { name: 'Alice' })
    await alice.type('confirmed')
    await alice.waitForSaved(3000)

    dropNextUpdate = true
    await alice.page.keyboard.type('!')
    await waitFor(() => dropped === 1, { timeout: 3000, message: 'the echo of "!" to be dropped' })
    // the server has "!": a page that never lost anything gets it
    const bob = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Bob' })
    await bob.waitForText('confirmed!', 3000)
    // and Alice's page, back online, learns that the server has it
    await alice.waitForSaved(5000)
    assert.equal(await alice.text(), 'confirmed!')
    assert.equal(dropped, 1)
    alice.assertNoConsoleErrors()
    bob.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})

test('server restart: pages go offline, keep editing, reconnect by themselves and merge', { timeout: 90000 }, async (t) => {
  const doc = docName('restart')
  try {
    const alice = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Alice' })
    const bob = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Bob' })
    await alice.type('before restart.')
    await bob.waitForText('before restart.', 1000)
    await alice.waitForSaved(3000)

    for (const p of [alice, bob]) p.allowWsFailures = true
    const exit = await server.stop()
    assert.ok(exit, 'server stopped')
    await alice.waitForState('offline', 5000)
    await bob.waitForState('offline', 5000)
    assert.deepEqual(await alice.peers(), ['Alice'], 'while offline only yourself is listed')

    // edit while offline, on both sides
    await alice.type(' alice offline.')
    await bob.page.locator('.cm-content').click()
    await bob.page.keyboard.press('Control+Home')
    await bob.page.keyboard.type('bob offline. ')
    await waitFor(async () => (await alice.status()).saved === 'unsaved', { timeout: 2000, message: 'Alice sees unsaved edits' })
    assert.equal((await alice.status()).state, 'offline')
    assert.ok(!(await bob.text()).includes('alice offline.'))
    await sleep(1500) // a few failed reconnect attempts
    assert.equal((await alice.status()).state, 'offline', 'still offline while the server is down')
    await alice.page.screenshot({ path: path.join(repoRoot, 'target/demo-offline.png') })

    await server.restart()
    await alice.waitForState('connected', 10000)
    await bob.waitForState('connected', 10000)
    await bob.waitForText('alice offline.', 3000)
    await alice.waitForText('bob offline. ', 3000)
    const expected = 'bob offline. before restart. alice offline.'
    assert.equal(await alice.text(), expected)
    assert.equal(await bob.text(), expected)
    await alice.waitForSaved(3000)
    await bob.waitForSaved(3000)
    await alice.waitForPeer('Bob', 3000)
    await bob.waitForPeer('Alice', 3000)

    // the merged state was persisted by the restarted server
    const late = await DemoPage.open(await newContext(), server.url(`#doc=${doc}`), { name: 'Late' })
    await late.waitForText(expected, 3000)

    t.diagnostic(`failed WebSocket handshakes logged by Chromium while the server was down: ${alice.tolerated + bob.tolerated}`)
    for (const p of [alice, bob, late]) p.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})

test('narrow window: no horizontal overflow', { timeout: 30000 }, async () => {
  try {
    const ctx = await newContext({ viewport: { width: 375, height: 740 }, isMobile: true, hasTouch: true })
    const page = await DemoPage.open(ctx, server.url(`#doc=${docName('narrow')}`), { name: 'Mo' })
    const overflow = await page.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
    assert.ok(overflow <= 0, `page is ${overflow}px wider than a 375px window`)
    await page.page.screenshot({ path: path.join(repoRoot, 'target/demo-narrow.png') })
    page.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})

test('screenshot of two collaborating pages', { timeout: 60000 }, async () => {
  const doc = docName('demo')
  try {
    // fixed colours so the picture is the same every time (the page picks a random one per browser)
    const withColor = async (color) => {
      const ctx = await newContext({ viewport: { width: 700, height: 800 }, colorScheme: 'light' })
      await ctx.addInitScript((c) => window.localStorage.setItem('collab:color', c), color)
      return ctx
    }
    const alice = await DemoPage.open(await withColor('#7048e8'), server.url(`#doc=${doc}`), { name: 'Alice Martin' })
    const bob = await DemoPage.open(await withColor('#0c8599'), server.url(`#doc=${doc}`), { name: 'Bob Chen' })
    await alice.type('# Launch checklist\n\n## Server\n- [x] y-websocket protocol\n- [x] persistence\n- [ ] ')
    await bob.waitForText('- [ ] ', 2000)
    await bob.page.locator('.cm-content').click()
    await bob.page.keyboard.press('Control+End')
    await bob.page.keyboard.type('load test\n\n## Demo page\n- [x] **live** cursors\n- [ ] screenshot for the README')
    await alice.waitForText('screenshot for the README', 2000)
    // Bob selects a word, Alice's caret sits in the server list
    await bob.page.keyboard.down('Shift')
    for (let i = 0; i < 6; i++) await bob.page.keyboard.press('ArrowLeft')
    await bob.page.keyboard.up('Shift')
    await alice.page.locator('.cm-line', { hasText: 'persistence' }).click()
    await alice.page.keyboard.press('End')
    await alice.waitForSaved(3000)
    await bob.waitForSaved(3000)
    await waitFor(() => alice.page.locator('.cm-ySelectionInfo', { hasText: 'Bob Chen' }).count(), { timeout: 3000, message: 'remote cursor' })
    await waitFor(() => bob.page.locator('.cm-ySelectionInfo', { hasText: 'Alice Martin' }).count(), { timeout: 3000, message: 'remote cursor' })
    await sleep(400) // let the caret-label transitions settle

    const shots = await Promise.all([alice, bob].map((p) => p.page.screenshot()))
    const composer = await (await newContext({ viewport: { width: 1412, height: 800 } })).newPage()
    await composer.setContent(`<!doctype html><body style="margin:0;background:#1d2330;display:flex;gap:12px">
      ${shots.map((b) => `<img style="display:block" width="700" height="800" src="data:image/png;base64,${b.toString('base64')}">`).join('')}
      </body>`)
    await composer.waitForFunction(() => Array.from(document.images).every((i) => i.complete && i.naturalWidth > 0))
    await mkdir(path.join(repoRoot, 'target'), { recursive: true })
    const out = path.join(repoRoot, 'target/demo-screenshot.png')
    await composer.screenshot({ path: out })
    if (process.env.UPDATE_SCREENSHOT === '1') {
      // only on request (scripts/update-screenshot.sh): no test run rewrites a tracked file
      await copyFile(out, path.join(repoRoot, 'web-demo/screenshot.png'))
    }
    alice.assertNoConsoleErrors()
    bob.assertNoConsoleErrors()
  } finally {
    await closeContexts()
  }
})
