// Interop tests: the stock npm `y-websocket` client (WebsocketProvider) against `collab`.
//
// Run from tests/interop:   npm ci && node --test
//
// Environment:
//   COLLAB_BIN      path of the server binary (default: ../../target/debug/collab, relative to
//                   this file). It is started as `collab --addr 127.0.0.1:0 --data-dir <tmp>` and
//                   must print `listening on HOST:PORT` on stdout once it accepts connections.
//   COLLAB_URL      e.g. ws://127.0.0.1:1234 — use an already running server instead of spawning
//                   one (tests that restart the server are skipped in that mode).
//   COLLAB_WAIT_MS  default bound for every wait (default 5000).
//   COLLAB_KEEP_DATA=1  keep the temporary data directories (their paths are printed).
//
// The server/client harness is in harness.mjs (shared with access.test.mjs).
//
// Every wait is bounded; a test that cannot make progress fails with a message saying what it
// was waiting for (plus the tail of the server's output when the server was spawned here).

import assert from 'node:assert/strict'

import * as Y from 'yjs'

import {
  SKIP_RESTART, WAIT_MS, sleep, within, freshDataDir, CollabServer, getSharedServer, setCurrentServer,
  currentServerNote, uniqueRoom, Client, RawConn, waitFor, waitSynced, waitConverged, sameStateVector,
  hex, interopTest
} from './harness.mjs'

// deterministic PRNG (mulberry32) so a failing run of the random test can be replayed
function prng (seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

interopTest('1. two providers sync, concurrent edits converge, other rooms stay isolated', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  // a room name with slashes (the room is the whole path); B also sends URL parameters, which
  // are not part of the room name
  const room = `org/team/${uniqueRoom('converge')}`
  const a = new Client(url, room, 'A')
  const b = new Client(url, room, 'B', { params: { token: 'abc', x: 'y z' } })
  await waitSynced(a, b)

  // concurrent: both edits are made before either side can have seen the other one
  a.text.insert(0, 'alpha ')
  b.text.insert(0, 'beta ')
  await waitConverged([a, b], 'A and B to converge after concurrent inserts',
    (s) => s.includes('alpha ') && s.includes('beta ') && s.length === 11)

  // a second round of concurrent, overlapping edits
  a.text.insert(3, 'X')
  a.text.delete(0, 1)
  b.text.delete(0, 2)
  b.text.insert(b.text.length, 'Z')
  await waitConverged([a, b], 'A and B to converge after concurrent inserts/deletes',
    (s) => s.includes('X') && s.endsWith('Z'))
  await waitFor('A and B to have identical state vectors', () => sameStateVector(a, b))
  const final = a.text.toString()

  // another room sees none of it, and its edits do not leak into this room
  const other = new Client(url, `org/team/${uniqueRoom('converge-other')}`, 'Other')
  await waitSynced(other)
  other.text.insert(0, 'other room')
  await sleep(300)
  assert.equal(other.text.toString(), 'other room', 'a provider on another room received content of the first room')
  assert.equal(a.text.toString(), final, 'an edit in another room reached room A')
  assert.equal(b.text.toString(), final, 'an edit in another room reached room B')
})

interopTest('2a. awareness: B sees A\'s state, and A\'s removal within 2 s after provider.destroy()', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const room = uniqueRoom('awareness')
  const a = new Client(url, room, 'A')
  const b = new Client(url, room, 'B')
  await waitSynced(a, b)
  const aId = a.doc.clientID
  const bId = b.doc.clientID
  const states = (c) => JSON.stringify([...c.awareness.getStates()].map(([k, v]) => [k, v]))

  a.awareness.setLocalStateField('user', { name: 'a' })
  b.awareness.setLocalStateField('user', { name: 'b' })
  await waitFor('B to see A\'s awareness state {user:{name:"a"}}',
    () => b.awareness.getStates().get(aId)?.user?.name === 'a', { detail: () => `B's states: ${states(b)}` })
  await waitFor('A to see B\'s awareness state {user:{name:"b"}}',
    () => a.awareness.getStates().get(bId)?.user?.name === 'b', { detail: () => `A's states: ${states(a)}` })

  a.destroy()
  await waitFor('B to see A\'s client id removed (<= 2 s after A was destroyed)',
    () => !b.awareness.getStates().has(aId), { timeoutMs: 2000, detail: () => `B's states: ${states(b)}` })

  // a newcomer gets the states the server knows: B's, not the departed A's
  const c = new Client(url, room, 'C')
  await waitSynced(c)
  await waitFor('newcomer C to receive B\'s awareness state on connect',
    () => c.awareness.getStates().get(bId)?.user?.name === 'b', { detail: () => `C's states: ${states(c)}` })
  assert.ok(!c.awareness.getStates().has(aId), `newcomer C received the departed A's awareness state: ${states(c)}`)
})

interopTest('2b. awareness: the server removes a client whose socket dropped without a goodbye, within 2 s', {}, async () => {
  // provider.destroy() itself sends an awareness update with state null before closing, so 2a
  // passes even if the server never cleans up. Here A's TCP connection is cut (no close frame, no
  // null state), so only the server's removal-on-close can reach B within 2 s (B's own timeout is 30 s).
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const room = uniqueRoom('awareness-drop')
  const a = new Client(url, room, 'A')
  const b = new Client(url, room, 'B')
  await waitSynced(a, b)
  const aId = a.doc.clientID
  a.awareness.setLocalStateField('user', { name: 'a' })
  await waitFor('B to see A\'s awareness state', () => b.awareness.getStates().get(aId)?.user?.name === 'a')

  a.provider.shouldConnect = false // no reconnect
  a.provider.ws.terminate() // destroy the socket: no close frame, no awareness removal from A
  await waitFor('B to see A\'s client id removed after A\'s connection dropped (server must broadcast the removal)',
    () => !b.awareness.getStates().has(aId), { timeoutMs: 2000 })
  assert.ok(b.provider.wsconnected, 'B lost its own connection')
})

interopTest('3a. late joiner gets the full text from the server', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  await lateJoiner(url, uniqueRoom('late'))
})

interopTest('3c. a late joiner gets a 600 KB document whole (the server sends it as 64 KiB continuation frames)', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const room = uniqueRoom('late-big')
  const a = new Client(url, room, 'A')
  const b = new Client(url, room, 'B')
  await waitSynced(a, b)
  const line = 'the quick brown fox jumps over the lazy dog, '.repeat(20) + '\n'
  for (let i = 0; i < 600; i++) a.text.insert(a.text.length, line)
  await waitConverged([a, b], 'B to receive all of A\'s text', (s) => s.length === line.length * 600, 20000)
  const expected = a.text.toString()
  assert.ok(expected.length > 500000, `document is ${expected.length} characters`)
  a.destroy()
  b.destroy()
  await joinAndExpectAtSync(url, room, 'C', expected, 'late joiner of a big document')
})

interopTest('3b. late joiner after the room was idle (spawned with --grace-period-secs 0)', { skip: SKIP_RESTART }, async () => {
  // with no grace period the server may unload the room as soon as the last client leaves; the
  // late joiner must then be served from storage (and only after it has been loaded)
  const srv = await CollabServer.start(freshDataDir(), ['--grace-period-secs', '0'])
  setCurrentServer(srv)
  try {
    await lateJoiner(srv.url, uniqueRoom('late-idle'), 500)
  } finally {
    await srv.stop('SIGKILL')
  }
})

/**
 * Connect a new provider and require that it has `expected` at the moment it reaches synced:
 * the stock client treats the SyncStep2 as "this is the document", so content that only arrives
 * later (a server answering before its storage has loaded, y-websocket issue #81) is a failure.
 */
async function joinAndExpectAtSync (url, room, name, expected, what) {
  const c = new Client(url, room, name)
  let textAtSync = null
  let syncedAt = 0
  c.provider.on('sync', (s) => {
    if (s && textAtSync === null) { textAtSync = c.text.toString(); syncedAt = Date.now() }
  })
  await waitSynced(c)
  if (textAtSync !== expected) {
    // diagnose: does the content arrive later, or never?
    let late = 'it never arrived (waited 2 s more)'
    const deadline = Date.now() + 2000
    while (Date.now() < deadline) {
      if (c.text.toString() === expected) { late = `the full text arrived ${Date.now() - syncedAt} ms AFTER synced (the server answered SyncStep1 before its stored state was loaded, cf. y-websocket issue #81)`; break }
      await sleep(15)
    }
    assert.fail(`${what}: at synced ${name} had ${JSON.stringify(textAtSync)}, expected ${JSON.stringify(expected)}; ${late}` +
      currentServerNote())
  }
  return c
}

async function lateJoiner (url, room, idleMs = 200) {
  const a = new Client(url, room, 'A')
  const b = new Client(url, room, 'B')
  await waitSynced(a, b)
  a.text.insert(0, 'written by A. ')
  b.text.insert(0, 'written by B. ')
  a.text.insert(a.text.length, 'A again.')
  await waitConverged([a, b], 'A and B to converge', (s) => s.includes('A again.') && s.includes('written by B. '))
  const expected = a.text.toString()
  a.destroy()
  b.destroy()
  await sleep(idleMs)

  await joinAndExpectAtSync(url, room, 'C', expected, 'late joiner')
}

interopTest('4. content survives a graceful restart (SIGTERM) on the same data dir', { skip: SKIP_RESTART }, async () => {
  await restartScenario('SIGTERM')
})

interopTest('5. acknowledged content survives kill -9 (SIGKILL) and restart on the same data dir', { skip: SKIP_RESTART }, async () => {
  await restartScenario('SIGKILL')
})

async function restartScenario (signal) {
  const dataDir = freshDataDir()
  const room = uniqueRoom(`restart-${signal}`)
  let srv = await CollabServer.start(dataDir)
  setCurrentServer(srv)
  try {
    const a = new Client(srv.url, room, 'A')
    const c = new Client(srv.url, room, 'C')
    await waitSynced(a, c)
    a.text.insert(0, 'persist me: ')
    a.text.insert(a.text.length, `${signal} 😀 ünïcode`)
    c.text.insert(0, '[C] ')
    const expectedParts = ['persist me: ', `${signal} 😀 ünïcode`, '[C] ']
    // relayed to the other provider = the server has applied (and acknowledged) it
    await waitConverged([a, c], 'A\'s and C\'s edits to be relayed to each other',
      (s) => expectedParts.every((p) => s.includes(p)))
    const expected = a.text.toString()

    const res = await srv.stop(signal)
    if (signal === 'SIGTERM') {
      assert.equal(res.code, 0, `collab should exit 0 on SIGTERM, got code=${res.code} signal=${res.signal}\n${srv.describe()}`)
    }
    // the old providers would otherwise reconnect and re-upload their copy, masking data loss
    a.destroy()
    c.destroy()

    srv = await CollabServer.start(dataDir)
    setCurrentServer(srv)
    const d = await joinAndExpectAtSync(srv.url, room, 'D', expected, `after ${signal} + restart on the same data dir`)

    // the restarted server still relays
    const e = new Client(srv.url, room, 'E')
    await waitSynced(e)
    d.text.insert(0, 'after restart ')
    await waitConverged([d, e], 'D and E to converge after restart', (s) => s === 'after restart ' + expected)
  } finally {
    await srv.stop('SIGKILL').catch(() => {})
  }
}

interopTest('6. five providers x 40 random inserts/deletes converge', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const seed = Number(process.env.COLLAB_SEED || (Date.now() % 1e9))
  const rnd = prng(seed)
  const room = uniqueRoom('random')
  const cs = Array.from({ length: 5 }, (_, i) => new Client(url, room, `P${i}`))
  // every update each provider made locally; merging them all is the expected end state
  const localUpdates = []
  for (const c of cs) {
    c.doc.on('update', (u, origin) => { if (origin !== c.provider) localUpdates.push(u) })
  }
  await waitSynced(...cs)

  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789 äöü€😀'
  for (let round = 0; round < 40; round++) {
    for (const c of cs) {
      const len = c.text.length
      if (len > 0 && rnd() < 0.35) {
        const pos = Math.floor(rnd() * len)
        c.text.delete(pos, Math.min(len - pos, 1 + Math.floor(rnd() * 3)))
      } else {
        const chars = Array.from(alphabet)
        let s = ''
        for (let k = 1 + Math.floor(rnd() * 4); k > 0; k--) s += chars[Math.floor(rnd() * chars.length)]
        c.text.insert(Math.floor(rnd() * (len + 1)), s)
      }
    }
    // sometimes let the network run, so edits are a mix of concurrent and causally ordered ones
    if (rnd() < 0.5) await sleep(Math.floor(rnd() * 10))
  }

  const oracle = new Y.Doc()
  for (const u of localUpdates) Y.applyUpdate(oracle, u)
  const expected = oracle.getText('t').toString()
  oracle.destroy()

  await waitConverged(cs, `5 providers to converge (seed ${seed}; replay with COLLAB_SEED=${seed})`,
    (s) => s === expected, Math.max(WAIT_MS, 10000))
  for (const c of cs.slice(1)) assert.ok(sameStateVector(cs[0], c), `state vectors differ between P0 and ${c.name}`)

  const late = new Client(url, room, 'Late')
  await waitSynced(late)
  assert.equal(late.text.toString(), expected, 'a late joiner did not get the converged text')
})

interopTest('7. raw protocol: one message per frame, SyncStep2 always sent, echo to sender, removal bytes on close', {}, async () => {
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const room = uniqueRoom('raw')
  const x = new RawConn(url, room)
  const y = new RawConn(url, room)
  try {
    const opened = await within(Promise.all([x.opened, y.opened]).then(() => true), WAIT_MS, false)
    assert.ok(opened, `raw WebSocket connections to ${url}/${room} did not open within ${WAIT_MS} ms`)
    const detail = () => `frames to X:\n${x.dump()}\nframes to Y:\n${y.dump()}\nerrors: ${[...x.errors, ...y.errors].join('\n')}`

    // client SyncStep1 of an empty doc
    x.send([0x00, 0x00, 0x01, 0x00])
    y.send([0x00, 0x00, 0x01, 0x00])
    await waitFor('the server\'s SyncStep1 and a SyncStep2 answer (each decodable as one message per frame) on both sockets',
      () => [x, y].every((r) => r.msgs().some((m) => m.type === 0 && m.sub === 0) && r.msgs().some((m) => m.type === 0 && m.sub === 1)),
      { detail })
    assert.deepEqual([...x.errors, ...y.errors], [], `undecodable frames:\n${detail()}`)

    // update inserting "hi" into text "t" (bytes from protocol.md); it must come back to the sender too
    const before = x.frames.length
    x.send([0x00, 0x02, 0x0c, 0x01, 0x01, 0x01, 0x00, 0x04, 0x01, 0x01, 0x74, 0x02, 0x68, 0x69, 0x00])
    const hasHi = (r, from = 0) => r.frames.slice(from).some(({ msg }) => {
      if (!msg || msg.type !== 0 || (msg.sub !== 2 && msg.sub !== 1)) return false
      const d = new Y.Doc()
      try { Y.applyUpdate(d, msg.payload); return d.getText('t').toString() === 'hi' } catch { return false } finally { d.destroy() }
    })
    await waitFor('the update to be echoed back to its sender X (sync Update carrying "hi")', () => hasHi(x, before), { detail })
    await waitFor('the update to be relayed to Y', () => hasHi(y), { detail })

    // awareness of client 1 {user:"a"}, clock 1: echoed to X and relayed to Y
    const aw = [0x01, 0x10, 0x01, 0x01, 0x01, 0x0c, ...Buffer.from('{"user":"a"}')]
    const awBefore = x.frames.length
    x.send(aw)
    const seesAw = (r, from, json) => r.frames.slice(from).some(({ msg }) =>
      msg && msg.type === 1 && msg.states.some((s) => s.clientID === 1 && s.json === json))
    await waitFor('the awareness update to be echoed back to its sender X', () => seesAw(x, awBefore, '{"user":"a"}'), { detail })
    await waitFor('the awareness update to be relayed to Y', () => seesAw(y, 0, '{"user":"a"}'), { detail })

    // X disappears without a goodbye: Y must get client 1 with state null
    const yBefore = y.frames.length
    x.close()
    await waitFor('Y to receive the awareness removal of client 1 (state "null") after X\'s socket dropped',
      () => seesAw(y, yBefore, 'null'), { timeoutMs: 2000, detail })
    assert.deepEqual(y.errors, [], `undecodable frames:\n${detail()}`)
  } finally {
    x.close()
    y.close()
  }
})

interopTest('8. awareness removal on close keeps the client\'s last clock, like the reference server', {}, async () => {
  // The reference server removes a dropped connection's client ids with their LAST clock
  // (y-protocols removeAwarenessStates keeps a remote client's clock). Peers accept it because a
  // null state at an equal clock removes. Sending clock+1 instead makes every peer (and the
  // server) ignore that client's announcements at clock+1 too: when the stock provider reconnects
  // with the same client id it re-announces its current clock, so its presence stays invisible
  // until its 2nd 15 s renewal (~33 s) instead of its 1st (~18 s, reference).
  const { url, server } = await getSharedServer()
  setCurrentServer(server)
  const room = uniqueRoom('raw-clock')
  const x = new RawConn(url, room)
  const y = new RawConn(url, room)
  try {
    const opened = await within(Promise.all([x.opened, y.opened]).then(() => true), WAIT_MS, false)
    assert.ok(opened, `raw WebSocket connections to ${url}/${room} did not open within ${WAIT_MS} ms`)
    const detail = () => `frames to X:\n${x.dump()}\nframes to Y:\n${y.dump()}`
    x.send([0x00, 0x00, 0x01, 0x00])
    y.send([0x00, 0x00, 0x01, 0x00])
    // client 7, clock 5, {"user":"x"}
    x.send([0x01, 0x10, 0x01, 0x07, 0x05, 0x0c, ...Buffer.from('{"user":"x"}')])
    const awarenessOf7 = (r) => r.msgs().filter((m) => m.type === 1).flatMap((m) => m.states).filter((s) => s.clientID === 7)
    await waitFor('Y to receive client 7\'s awareness state', () => awarenessOf7(y).some((s) => s.json === '{"user":"x"}'), { detail })
    x.close()
    await waitFor('Y to receive the removal of client 7 after X\'s socket dropped',
      () => awarenessOf7(y).some((s) => s.json === 'null'), { timeoutMs: 2000, detail })
    const removal = y.frames.find(({ msg }) => msg?.type === 1 && msg.states.some((s) => s.clientID === 7 && s.json === 'null'))
    assert.equal(hex(removal.frame), '01 08 01 07 05 04 6e 75 6c 6c',
      'the removal should carry client 7\'s last clock (5), as the reference server sends it')
  } finally {
    x.close()
    y.close()
  }
})
