// Test harness: runs the collab server binary and drives the demo page in Debian's Chromium.
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const here = path.dirname(fileURLToPath(import.meta.url))
export const repoRoot = path.resolve(here, '../..')
export const collabBin = process.env.COLLAB_BIN || path.resolve(here, '../../target/debug/collab')
const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium'

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Polls `fn` until it returns a truthy value; throws `message` after `timeout` ms. */
export const waitFor = async (fn, { timeout = 5000, interval = 25, message = 'condition' } = {}) => {
  const deadline = Date.now() + timeout
  let last
  for (;;) {
    last = await fn()
    if (last) return last
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${message}`)
    await sleep(interval)
  }
}

export const makeDataDir = () => mkdtemp(path.join(os.tmpdir(), 'collab-browser-'))
export const removeDir = (dir) => rm(dir, { recursive: true, force: true })

/**
 * A running server process (`collab --addr ADDR --data-dir DIR ...extraArgs`). `start` resolves once it printed `listening on HOST:PORT`.
 */
export class Server {
  /** `extraArgs` follow `--addr ... --data-dir ...` on every start, e.g. ['--auth-secret', s]. */
  constructor (dataDir, extraArgs = []) {
    this.dataDir = dataDir
    this.extraArgs = extraArgs
    this.proc = null
    this.port = 0
    this.output = ''
  }

  async start (addr = '127.0.0.1:0', { timeout = 20000 } = {}) {
    const proc = spawn(collabBin, ['--addr', addr, '--data-dir', this.dataDir, ...this.extraArgs], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { RUST_LOG: 'info', ...process.env }
    })
    this.proc = proc
    const failed = once(proc, 'error').then(([err]) => ({ error: String(err) }))
    proc.stderr.setEncoding('utf8')
    proc.stderr.on('data', (d) => { this.output += d })
    proc.stdout.setEncoding('utf8')
    const exited = once(proc, 'exit').then(([code, signal]) => ({ code, signal }))
    const listening = new Promise((resolve) => {
      let buf = ''
      proc.stdout.on('data', (d) => {
        this.output += d
        buf += d
        const m = buf.match(/listening on (\S+):(\d+)/)
        if (m) {
          buf = ''
          resolve(Number(m[2]))
        }
      })
    })
    let timer
    const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), timeout) })
    const result = await Promise.race([listening, exited, failed, timedOut])
    clearTimeout(timer)
    if (typeof result !== 'number') {
      proc.kill('SIGKILL')
      const why = result === 'timeout' ? `no "listening on" line within ${timeout} ms` : `exited early (${JSON.stringify(result)})`
      const hint = result.error ? ' (build it: cargo build -p collab-server --bin collab, or set COLLAB_BIN)' : ''
      throw new Error(`server ${collabBin} ${why}${hint}; output:\n${this.output}`)
    }
    this.port = result
    this.exited = exited
    return this.port
  }

  /** Starts again on the same port; the old socket may take a moment to be free. */
  async restart ({ timeout = 15000 } = {}) {
    const deadline = Date.now() + timeout
    for (;;) {
      try {
        return await this.start(`127.0.0.1:${this.port}`)
      } catch (e) {
        if (Date.now() > deadline) throw e
        await sleep(250)
      }
    }
  }

  /** SIGTERM, and wait for a graceful exit. */
  async stop ({ timeout = 10000 } = {}) {
    const proc = this.proc
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return null
    proc.kill('SIGTERM')
    let timer
    const result = await Promise.race([
      this.exited,
      new Promise((resolve) => { timer = setTimeout(() => resolve(null), timeout) })
    ])
    clearTimeout(timer)
    if (result === null) {
      proc.kill('SIGKILL')
      await this.exited
      throw new Error(`server did not exit within ${timeout} ms of SIGTERM`)
    }
    return result
  }

  url (hash) {
    return `http://127.0.0.1:${this.port}/${hash}`
  }
}

export const launchBrowser = () => chromium.launch({
  executablePath: chromiumPath,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'
  ]
})

const WS_FAILURE = /^WebSocket connection to '.*' failed/

/**
 * A page of the demo plus everything it printed to the console.
 */
export class DemoPage {
  constructor (page) {
    this.page = page
    this.errors = []
    this.messages = []
    // while the server is deliberately down, the browser itself logs failed WebSocket handshakes
    this.allowWsFailures = false
    this.tolerated = 0
    page.on('console', (msg) => {
      const text = msg.text()
      this.messages.push(`[${msg.type()}] ${text}`)
      if (msg.type() !== 'error') return
      if (this.allowWsFailures && WS_FAILURE.test(text)) this.tolerated++
      else this.errors.push(text)
    })
    page.on('pageerror', (err) => this.errors.push(`uncaught: ${err.stack || err}`))
  }

  static async open (context, url, { name } = {}) {
    const dp = new DemoPage(await context.newPage())
    await dp.page.goto(url)
    await dp.waitForState('connected', 10000)
    if (name) await dp.setName(name)
    return dp
  }

  async setName (name) {
    const input = this.page.locator('#name-input')
    await input.fill(name)
    await input.press('Enter')
    await this.waitForPeer(name, 3000)
  }

  status () {
    return this.page.evaluate(() => {
      const el = document.getElementById('status')
      return {
        state: el.dataset.state,
        saved: el.dataset.saved,
        text: document.getElementById('status-text').textContent,
        note: document.getElementById('save-text').textContent
      }
    })
  }

  async waitForState (state, timeout = 5000) {
    await waitFor(async () => (await this.status()).text === state, { timeout, message: `status "${state}"` })
  }

  async waitForSaved (timeout = 5000) {
    let last
    await waitFor(async () => {
      const s = last = await this.status()
      return s.state === 'connected' && s.saved === 'saved' && s.note === 'all changes saved'
    }, { timeout, message: '"all changes saved"' }).catch((e) => {
      throw new Error(`${e.message} (last status ${JSON.stringify(last)})`)
    })
  }

  /** The editor's text as the user sees it, without remote cursor labels. */
  text () {
    return this.page.evaluate(() => {
      const content = document.querySelector('.cm-content')
      if (!content) return null
      const clone = content.cloneNode(true)
      clone.querySelectorAll('.cm-ySelectionCaret, .cm-widgetBuffer, .cm-placeholder').forEach((n) => n.remove())
      return Array.from(clone.querySelectorAll('.cm-line'), (l) => l.textContent).join('\n')
    })
  }

  async waitForText (substring, timeout = 5000) {
    return waitFor(async () => ((await this.text()) || '').includes(substring), { timeout, message: `text ${JSON.stringify(substring)}` })
  }

  /** Names in the who's-here list. */
  peers () {
    return this.page.locator('#peers .peer-name').allTextContents()
  }

  async waitForPeer (name, timeout = 5000) {
    await waitFor(async () => (await this.peers()).includes(name), { timeout, message: `${name} in who's here` })
  }

  async type (text, { at = 'end' } = {}) {
    await this.page.locator('.cm-content').click()
    if (at === 'end') await this.page.keyboard.press('Control+End')
    await this.page.keyboard.type(text)
  }

  assertNoConsoleErrors () {
    if (this.errors.length) {
      throw new Error(`console errors on ${this.page.url()}:\n  ${this.errors.join('\n  ')}`)
    }
  }
}
