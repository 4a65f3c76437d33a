// Tracks whether every local edit has reached the server.
//
// The y-websocket server applies each update it receives and sends it back to ALL connections of
// the room, the sender included; that echo is the only "it reached the server" signal the stock
// client gets. Applying an echo to the editing doc is a no-op (no 'update' event fires), so the
// echo cannot be seen from the doc itself. Instead we keep a shadow Y.Doc that receives exactly
// what the server sent us (SyncStep2 and Update messages, read straight off the socket).
//
//   shadow = everything the server has confirmed to us
//   doc    = shadow + local edits (typed while online or offline)
//
// so "all changes saved" is precisely "doc has nothing shadow lacks": same state vector (inserts)
// and same delete set (deletions do not move the state vector). This stays correct for offline
// editing (the edits are sent in the client's SyncStep2 on reconnect, the server applies and
// echoes them), for concurrent deletes of the same text (the other user's delete reaches the
// shadow too), and for updates that the server merges or re-encodes before echoing.
//
// An echo can be lost: the socket may close after the server applied an edit but before the echo
// arrived (a network drop, or the server closing with 4401 when the token expires). On the next
// connection the provider's SyncStep1 carries the doc's state vector, which already covers that
// edit, so the server's answer leaves it out and the shadow would lack it forever ("saving…").
// So whenever a socket opens while the shadow lags behind the doc, the tracker sends a SyncStep1
// of its own with the shadow's state vector: the answer holds everything the server has and the
// shadow lacks. The provider applies that answer too, a no-op for a doc that has it all.

import * as Y from 'yjs'
import * as decoding from 'lib0/decoding'
import * as encoding from 'lib0/encoding'

const MESSAGE_SYNC = 0
const SYNC_STEP_1 = 0
const SYNC_STEP_2 = 1
const SYNC_UPDATE = 2

export class SaveTracker {
  /**
   * @param {Y.Doc} doc
   * @param {import('y-websocket').WebsocketProvider} provider
   * @param {(saved: boolean) => void} onChange
   */
  constructor (doc, provider, onChange) {
    this.doc = doc
    this.provider = provider
    this.onChange = onChange
    this.shadow = new Y.Doc({ gc: doc.gc })
    this.saved = true
    this._timer = 0
    this._soon = false
    this._sockets = new WeakSet()

    this._onUpdate = (_update, origin) => {
      if (origin !== provider && this.saved) {
        // a local edit: unsaved at once, no need to compare
        this._set(false)
      }
      this._schedule()
    }
    this._onStatus = () => this._attach()
    doc.on('update', this._onUpdate)
    provider.on('status', this._onStatus)
    this._attach()
  }

  // The provider creates a new WebSocket for every (re)connection and emits 'status' right after;
  // listen to each socket next to the provider's own handler.
  _attach () {
    const ws = this.provider.ws
    if (!ws || this._sockets.has(ws)) return
    this._sockets.add(ws)
    if (ws.readyState === WebSocket.OPEN) this._askForLostEchoes(ws)
    else ws.addEventListener('open', () => this._askForLostEchoes(ws))
    ws.addEventListener('message', (event) => {
      if (this.provider.ws !== ws || !(event.data instanceof ArrayBuffer)) return
      try {
        const decoder = decoding.createDecoder(new Uint8Array(event.data))
        if (decoding.readVarUint(decoder) !== MESSAGE_SYNC) return
        const sub = decoding.readVarUint(decoder)
        if (sub === SYNC_STEP_2 || sub === SYNC_UPDATE) {
          Y.applyUpdate(this.shadow, decoding.readVarUint8Array(decoder))
          this._schedule(true)
        }
      } catch (_e) {
        // a message the provider itself rejects; nothing to track
      }
    })
  }

  _askForLostEchoes (ws) {
    if (this.provider.ws !== ws || this._compare()) return
    const encoder = encoding.createEncoder()
    encoding.writeVarUint(encoder, MESSAGE_SYNC)
    encoding.writeVarUint(encoder, SYNC_STEP_1)
    encoding.writeVarUint8Array(encoder, Y.encodeStateVector(this.shadow))
    ws.send(encoding.toUint8Array(encoder))
  }

  // Comparing snapshots walks the whole document: do it at most every 150 ms while typing, but
  // right away when the server sent something (that is when "saved" can become true).
  _schedule (soon = false) {
    if (this._timer) {
      if (!soon || this._soon) return
      clearTimeout(this._timer)
    }
    this._soon = soon
    this._timer = setTimeout(() => {
      this._timer = 0
      this._set(this._compare())
    }, soon ? 0 : 150)
  }

  _compare () {
    return Y.equalSnapshots(Y.snapshot(this.doc), Y.snapshot(this.shadow))
  }

  _set (saved) {
    if (saved !== this.saved) {
      this.saved = saved
      this.onChange(saved)
    }
  }

  destroy () {
    clearTimeout(this._timer)
    this.doc.off('update', this._onUpdate)
    this.provider.off('status', this._onStatus)
    this.shadow.destroy()
  }
}
