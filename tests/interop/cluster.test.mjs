// Cluster mode (issue #14) with the stock npm WebsocketProvider: a real redis-server (AOF,
// appendfsync always) and three real collab processes started with `--redis-url`, each with its
// own port and data folder, so the only way an edit reaches another instance is through Redis.
// The last test goes through nginx as a round-robin load balancer, as scripts/cluster.sh runs it.
// Skipped (saying why) without redis-server, or nginx for the last test; .ci/run installs both.

import { before } from 'node:test'
import assert from 'node:assert/strict'

import * as Y from 'yjs'
import {
  Client, EXTERNAL_URL, interopTest, status, uniqueRoom, waitConverged, waitFor, waitSynced
} from './harness.mjs'
import { NGINX, Nginx, REDIS_SERVER, Redis, metric, startInstances } from './cluster-harness.mjs'

const SKIP = EXTERNAL_URL
  ? 'COLLAB_URL is set: the cluster tests start their own Redis and collab instances'
  : REDIS_SERVER ? false : 'redis-server is not installed (apt-get install redis-server; .ci/run installs it)'
const SKIP_NGINX = SKIP || (NGINX ? false : 'nginx is not installed (apt-get install nginx; .ci/run installs it)')

/** @type {Redis} */
let redis
/** @type {import('./harness.mjs').CollabServer[]} */
let nodes = []

before(async () => {
  if (SKIP) return
  redis = await Redis.start()
  nodes = await startInstances(redis, 3)
})

/** Every instance's output tail plus Redis', for a failure message. */
const clusterNote = () => [...nodes.map((n) => n.describe()), redis.describe()].join('\n')

/** A failing wait names what each client holds and what every process printed. */
async function converge (clients, what, pred) {
  try {
    await waitConverged(clients, what, pred, 15000)
  } catch (e) {
    e.message += `\n${clusterNote()}`
    throw e
  }
}

const sorted = (s) => [...s].sort().join('')

/** Redis holds the document (its stream or its snapshot): the content went through Redis. */
async function assertStoredInRedis (room) {
  const keys = await redis.call('KEYS', `collab:{${room}}:*`)
  assert.ok(Array.isArray(keys) && keys.length > 0,
    `no collab:{${room}}:* key in Redis; keys there: ${(await redis.call('KEYS', '*')).map(String).join(', ')}`)
}

interopTest('cluster: clients on three instances converge on concurrent edits', { skip: SKIP }, async () => {
  const room = uniqueRoom('cluster-concurrent')
  // Two clients per instance: a relay that only reached the sender's own instance leaves the
  // other instances' pairs agreeing with each other and not with it.
  const cs = nodes.flatMap((n, i) => [new Client(n.url, room, `n${i}a`), new Client(n.url, room, `n${i}b`)])
  await waitSynced(...cs)
  const perClient = 25
  // Every client types at once, in small bursts, without waiting for anyone.
  for (let k = 0; k < perClient; k++) {
    for (const [i, c] of cs.entries()) {
      const pos = Math.floor(((k * 7 + i * 13) % 97) / 97 * (c.text.length + 1))
      c.text.insert(pos, `<${c.name}:${k}>`)
    }
    if (k % 5 === 4) await new Promise((resolve) => setImmediate(resolve))
  }
  // Concurrent inserts land inside each other's markers, so the check is on the characters: every
  // one typed anywhere, each exactly once, in the same order on every client.
  const typed = sorted(cs.flatMap((c) => [...Array(perClient).keys()].map((k) => `<${c.name}:${k}>`)).join(''))
  await converge(cs, 'the six clients on three instances to hold the same text, with every character typed',
    (s) => s.length === typed.length && sorted(s) === typed)
  await assertStoredInRedis(room)
})

interopTest('cluster: a late joiner on an instance that never had the document gets all of it', { skip: SKIP }, async () => {
  const room = uniqueRoom('cluster-late')
  const a = new Client(nodes[0].url, room, 'a')
  const b = new Client(nodes[1].url, room, 'b')
  a.doc.getMap('m').set('title', 'cluster notes')
  await waitSynced(a, b)
  for (let k = 0; k < 200; k++) (k % 2 ? a : b).text.insert(0, `${k % 10}`)
  await converge([a, b], 'the writers on instances 0 and 1 to agree', (s) => s.length === 200)
  // Instance 2 has had no connection to this room: it loads the document from Redis alone.
  const late = new Client(nodes[2].url, room, 'late')
  await waitSynced(late)
  await converge([a, b, late], 'the late joiner on instance 2 to hold the whole text', (s) => s.length === 200)
  assert.equal(late.doc.getMap('m').get('title'), 'cluster notes')
  assert.ok(Y.equalSnapshots(Y.snapshot(late.doc), Y.snapshot(a.doc)), 'late joiner and writer differ in state')
  // And its own edit travels back to the instances it joined after.
  late.text.insert(0, 'L')
  await converge([a, b, late], 'the late joiner\'s edit to reach instances 0 and 1', (s) => s.startsWith('L') && s.length === 201)
})

interopTest('cluster: presence crosses instances and is removed when its client disconnects', { skip: SKIP }, async () => {
  const room = uniqueRoom('cluster-awareness')
  const [a, b, c] = nodes.map((n, i) => new Client(n.url, room, `p${i}`))
  await waitSynced(a, b, c)
  a.awareness.setLocalStateField('user', { name: 'Ada', color: '#30bced' })
  c.awareness.setLocalStateField('user', { name: 'Cy', color: '#ee6352' })
  const seen = (who, of) => who.awareness.getStates().get(of.doc.clientID)?.user?.name
  const detail = () => [a, b, c].map((x) => `${x.name} sees ${JSON.stringify([...x.awareness.getStates().entries()]
    .map(([id, s]) => [id, s.user?.name]))}`).join('\n') + `\n${status(a, b, c)}\n${clusterNote()}`
  await waitFor('Ada (instance 0) to appear on instances 1 and 2, and Cy (instance 2) on 0 and 1',
    () => seen(b, a) === 'Ada' && seen(c, a) === 'Ada' && seen(a, c) === 'Cy' && seen(b, c) === 'Cy',
    { detail })
  // destroy() closes the socket without announcing the removal itself: instance 0 has to notice
  // the disconnect and the others have to hear about it through Redis.
  const adaId = a.doc.clientID
  a.destroy()
  await waitFor('Ada\'s presence to be removed on instances 1 and 2 after her client disconnected',
    () => !b.awareness.getStates().has(adaId) && !c.awareness.getStates().has(adaId),
    { detail, timeoutMs: 10000 })
  assert.equal(seen(b, c), 'Cy', 'the other presence stays')
})

interopTest('cluster: providers behind nginx (round-robin) land on different instances and converge', { skip: SKIP_NGINX }, async () => {
  const lb = await Nginx.start(nodes)
  const room = uniqueRoom('cluster-nginx')
  const opened0 = await Promise.all(nodes.map((n) => metric(n, 'collab_connections_opened_total')))
  const cs = Array.from({ length: 6 }, (_, i) => new Client(lb.url, room, `lb${i}`))
  await waitSynced(...cs).catch((e) => { e.message += `\n${lb.describe()}`; throw e })
  const opened1 = await Promise.all(nodes.map((n) => metric(n, 'collab_connections_opened_total')))
  const spread = opened1.map((v, i) => (v ?? 0) - (opened0[i] ?? 0))
  assert.ok(spread.every((d) => d >= 1),
    `the six sockets did not reach every instance (new connections per instance: ${spread.join(', ')}; ` +
    `nginx upstreams: ${lb.upstreams().join(' ')})`)
  for (let k = 0; k < 20; k++) {
    for (const c of cs) c.text.insert(c.text.length, `${c.name}.${k};`)
  }
  await converge(cs, 'six providers behind nginx to hold the same text',
    (s) => cs.every((c) => [...Array(20).keys()].every((k) => s.includes(`${c.name}.${k};`))))
  // The demo page and the HTTP API go through the same proxy.
  const page = await fetch(`${lb.httpUrl}/`)
  assert.equal(page.status, 200)
  assert.match(await page.text(), /<html/i)
})
