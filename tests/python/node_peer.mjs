// A stock npm y-websocket `WebsocketProvider` driven by the Python tests over stdin/stdout.
//
//   node node_peer.mjs ws://HOST:PORT ROOM
//
// The packages are the ones `npm ci` installed in ../interop (yjs 13.6.33, y-websocket 3.1.0,
// ws 8.23.0); set INTEROP_DIR to load them from another folder. Each of them ships a CommonJS
// build, so all are loaded through one `require` rooted there and share one yjs instance.
//
// stdin: one JSON command per line, {"id": n, "op": ..., ...}. stdout: one JSON reply per line,
// {"id": n, "ok": true, ...} or {"id": n, "error": "..."}; the first line is {"ready": true}.
// Ops (Y.Text "t" and Y.Map "m" of the document):
//   state {brief?}                -> {synced, connected, textLength, text (unless brief), map}
//   insert {index, text}          delete {index, length}
//   set {key, value}              del {key}
//   edits {edits: [op, ...]}      several of the above in one transaction
//   disconnect / connect          provider.disconnect() / provider.connect()
// The process exits when stdin closes, so a dying test never leaves it behind.

import { createRequire } from 'node:module'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const interopDir = path.resolve(process.env.INTEROP_DIR || path.join(HERE, '..', 'interop'))
const require = createRequire(path.join(interopDir, 'package.json'))
const Y = require('yjs')
const { WebsocketProvider } = require('y-websocket')
const WebSocket = require('ws')

const [url, room] = process.argv.slice(2)
if (!url || !room) {
  process.stderr.write('usage: node node_peer.mjs ws://HOST:PORT ROOM\n')
  process.exit(2)
}

const doc = new Y.Doc()
const text = doc.getText('t')
const map = doc.getMap('m')
// disableBc: Node has a global BroadcastChannel that would sync same-room providers of one
// process without the server; there is only one here, but keep the server the only path.
const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })

const send = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

function apply (e) {
  switch (e.op) {
    case 'insert': text.insert(e.index, e.text); break
    case 'delete': text.delete(e.index, e.length); break
    case 'set': map.set(e.key, e.value); break
    case 'del': map.delete(e.key); break
    default: throw new Error(`unknown edit op ${JSON.stringify(e.op)}`)
  }
}

function handle (cmd) {
  switch (cmd.op) {
    case 'state':
      return {
        synced: provider.synced,
        connected: provider.wsconnected,
        textLength: text.length,
        ...(cmd.brief ? {} : { text: text.toString() }),
        map: map.toJSON()
      }
    case 'edits':
      doc.transact(() => { for (const e of cmd.edits) apply(e) })
      return {}
    case 'disconnect': provider.disconnect(); return {}
    case 'connect': provider.connect(); return {}
    default:
      apply(cmd)
      return {}
  }
}

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', (line) => {
  if (!line.trim()) return
  let cmd = { id: null }
  try {
    cmd = JSON.parse(line)
    send({ id: cmd.id, ok: true, ...handle(cmd) })
  } catch (e) {
    send({ id: cmd.id, error: String(e && e.stack ? e.stack : e) })
  }
})
rl.on('close', () => {
  provider.destroy()
  doc.destroy()
  process.exit(0)
})

send({ ready: true })
