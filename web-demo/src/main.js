import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { Awareness } from 'y-protocols/awareness'
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next'
import { EditorState } from '@codemirror/state'
import {
  EditorView, keymap, drawSelection, dropCursor, highlightActiveLine,
  highlightSpecialChars, placeholder
} from '@codemirror/view'
import { defaultKeymap, indentWithTab } from '@codemirror/commands'
import {
  Language, LanguageSupport, HighlightStyle, defineLanguageFacet, syntaxHighlighting, indentOnInput
} from '@codemirror/language'
import { parser as markdownParser, GFM } from '@lezer/markdown'
import { tags as t } from '@lezer/highlight'
import { SaveTracker } from './save-tracker.js'
import { loadIdentity, saveName, MAX_NAME } from './identity.js'
import './style.css'

const DEFAULT_DOC = 'welcome'
const TEXT_NAME = 'codemirror'

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id))
const els = {
  status: $('status'),
  statusText: $('status-text'),
  saveText: $('save-text'),
  docForm: /** @type {HTMLFormElement} */ ($('doc-form')),
  docInput: /** @type {HTMLInputElement} */ ($('doc-input')),
  newTab: /** @type {HTMLAnchorElement} */ ($('new-tab')),
  copyLink: /** @type {HTMLButtonElement} */ ($('copy-link')),
  docTitle: $('doc-title'),
  serverNote: $('server-note'),
  editor: $('editor'),
  nameInput: /** @type {HTMLInputElement} */ ($('name-input')),
  meSwatch: $('me-swatch'),
  peers: $('peers'),
  peerCount: $('peer-count')
}

// ---------------------------------------------------------------- document name and URL hash

/** Document names travel in a URL path: keep them to a safe, readable alphabet. */
const cleanDocName = (raw) => (raw || '')
  .trim()
  .replace(/\s+/g, '-')
  .replace(/[^A-Za-z0-9._-]/g, '')
  .replace(/^\.+/, '')
  .slice(0, 64)

const isHttpUrl = (raw) => {
  try { return /^https?:$/.test(new URL(raw, window.location.href).protocol) } catch { return false }
}

/** `#doc=NAME[&server=WS_URL][&token=JWT][&tokenUrl=URL]` */
const readHash = () => {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ''))
  const server = (params.get('server') || '').trim()
  const token = (params.get('token') || '').trim()
  const tokenUrl = (params.get('tokenUrl') || '').trim()
  return {
    doc: cleanDocName(params.get('doc')) || DEFAULT_DOC,
    server: /^wss?:\/\/[^\s]+$/i.test(server) ? server : '',
    token: /^[\w-]+\.[\w-]+\.[\w-]*$/.test(token) ? token : '',
    tokenUrl: isHttpUrl(tokenUrl) ? tokenUrl : ''
  }
}

const hashFor = ({ doc, server, token, tokenUrl }) => `#doc=${doc}` + (server ? `&server=${server}` : '') +
  (token ? `&token=${token}` : '') + (tokenUrl ? `&tokenUrl=${encodeURIComponent(tokenUrl)}` : '')

const socketBase = (server) => {
  if (server) return server
  const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws'
  return `${scheme}://${window.location.host || 'localhost:1234'}`
}

// ---------------------------------------------------------------- access tokens

// With access control on the server, the page gets a token (a JWT from the application's backend)
// in the hash, and optionally `tokenUrl`, that backend's endpoint for a fresh one. The claims are
// read here only to explain problems early; the server checks the signature.
const tokenClaims = (token) => {
  try {
    const b64 = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))))
    return claims && typeof claims === 'object' ? claims : {}
  } catch {
    return {}
  }
}
const tokenExpired = (token) => typeof tokenClaims(token).exp === 'number' && tokenClaims(token).exp * 1000 <= Date.now()
const tokenCovers = (token, doc) => {
  const d = tokenClaims(token).doc
  if (typeof d !== 'string') return true // not ours to judge: the server decides
  return d.endsWith('*') ? doc.startsWith(d.slice(0, -1)) : d === doc
}

/** GET `tokenUrl?doc=NAME` → `{"token": "..."}` */
const fetchToken = async (tokenUrl, doc) => {
  const url = new URL(tokenUrl, window.location.href)
  url.searchParams.set('doc', doc)
  const res = await fetch(url, { cache: 'no-store', credentials: 'include' })
  if (!res.ok) throw new Error(`${url.origin}${url.pathname} answered ${res.status}`)
  const { token } = await res.json()
  if (typeof token !== 'string' || !token) throw new Error('no "token" in the answer')
  return token
}

// ---------------------------------------------------------------- identity

const identity = loadIdentity()
els.nameInput.maxLength = MAX_NAME
els.nameInput.value = identity.name
els.meSwatch.style.background = identity.color

// ---------------------------------------------------------------- editor look

// Markdown highlighting straight from the Lezer parser: @codemirror/lang-markdown would also pull
// in the HTML, CSS and JavaScript languages (~170 KB minified) for embedded code blocks.
const markdown = new LanguageSupport(new Language(
  defineLanguageFacet({ commentTokens: { block: { open: '<!--', close: '-->' } } }),
  markdownParser.configure(GFM), [], 'markdown'))

const markdownStyle = HighlightStyle.define([
  { tag: t.heading1, fontWeight: '700', fontSize: '1.35em' },
  { tag: t.heading2, fontWeight: '700', fontSize: '1.15em' },
  { tag: [t.heading3, t.heading4, t.heading5, t.heading6], fontWeight: '700' },
  { tag: t.strong, fontWeight: '700' },
  { tag: t.emphasis, fontStyle: 'italic' },
  { tag: t.strikethrough, textDecoration: 'line-through', color: 'var(--muted)' },
  { tag: [t.link, t.url], color: 'var(--accent)' },
  { tag: t.monospace, fontFamily: 'var(--mono)', fontSize: '.92em', backgroundColor: 'var(--code-bg)', borderRadius: '4px' },
  { tag: t.quote, color: 'var(--muted)', fontStyle: 'italic' },
  { tag: [t.processingInstruction, t.contentSeparator, t.labelName], color: 'var(--markup)' },
  { tag: t.atom, color: 'var(--accent)', fontWeight: '600' }
])

const editorTheme = EditorView.theme({
  '&': { height: '100%', fontSize: '15px', backgroundColor: 'transparent' },
  '&.cm-focused': { outline: 'none' },
  '.cm-scroller': {
    fontFamily: 'var(--sans)',
    lineHeight: '1.7',
    padding: '14px 0'
  },
  '.cm-content': { padding: '0 22px', caretColor: 'var(--accent)' },
  '.cm-line': { padding: '0' },
  '.cm-activeLine': { backgroundColor: 'var(--active-line)' },
  '.cm-placeholder': { color: 'var(--muted)', fontStyle: 'italic' },
  '&.cm-focused .cm-selectionBackground, .cm-selectionBackground, ::selection': {
    backgroundColor: 'var(--selection) !important'
  },
  // Remote carets: keep the owner's name visible, not only on hover.
  '.cm-ySelectionCaret': { borderLeftWidth: '2px', borderRightWidth: '0', marginLeft: '-1px', marginRight: '0' },
  '.cm-ySelectionInfo': {
    opacity: '1',
    top: '-1.45em',
    left: '-2px',
    padding: '1px 6px',
    borderRadius: '4px 4px 4px 0',
    fontFamily: 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
    fontSize: '11px',
    fontWeight: '600',
    lineHeight: '1.4',
    pointerEvents: 'none'
  },
  '.cm-ySelectionCaretDot': { display: 'none' }
})

// ---------------------------------------------------------------- one session per open document

/**
 * @typedef {Object} Session
 * @property {string} name
 * @property {string} server
 * @property {Y.Doc} doc
 * @property {Awareness} awareness
 * @property {WebsocketProvider} provider
 * @property {SaveTracker} tracker
 * @property {Y.UndoManager} undoManager
 * @property {EditorView} view
 * @property {boolean} failed  a connection closed or failed since the last successful sync
 * @property {boolean} everSynced
 * @property {string} token  the access token in use ('' without one)
 * @property {string} tokenUrl  where to get a fresh token ('' when the page cannot renew it)
 * @property {boolean} renewing  a fresh token is being fetched
 * @property {'' | 'expired' | 'refused'} access  the server (or the token itself) denies access
 */

/** @type {Session | null} */
let session = null

const openDoc = (name, server, token, tokenUrl) => {
  if (session && session.name === name && session.server === server && session.token === token &&
      session.tokenUrl === tokenUrl) return
  closeDoc()

  const doc = new Y.Doc()
  const ytext = doc.getText(TEXT_NAME)
  const awareness = new Awareness(doc)
  awareness.setLocalStateField('user', { ...identity })
  const provider = new WebsocketProvider(socketBase(server), name, doc, {
    awareness,
    // sent as `?token=` on every (re)connect; renewToken() replaces it
    params: token ? { token } : {},
    connect: false,
    // Every edit goes through the server, even between tabs of one browser: this is a server demo.
    disableBc: true
  })
  const undoManager = new Y.UndoManager(ytext)
  const readOnly = tokenClaims(token).perm === 'read-only'

  /** @type {Session} */
  const s = { name, server, doc, awareness, provider, undoManager, failed: false, everSynced: false, tracker: /** @type {any} */ (null), view: /** @type {any} */ (null), token, tokenUrl, renewing: false, access: '', readOnly }
  s.tracker = new SaveTracker(doc, provider, () => renderStatus())
  provider.on('status', ({ status }) => {
    if (status === 'connected') {
      // After a reconnect the others (and the server) still remember our awareness clock and
      // ignore a state whose clock did not move past it: we would stay invisible until the 15 s
      // renewal. A server built on yrs even announces our removal with clock + 1. So move the
      // clock two steps now (the provider sends our state right after this event).
      const local = awareness.getLocalState()
      if (local) {
        awareness.setLocalState({ ...local })
        awareness.setLocalState({ ...local })
      }
    } else if (status === 'disconnected') {
      // The provider has just dropped everyone else's presence but keeps their clocks: when we
      // come back alone (a token refresh, a network blip) the server replays their states at the
      // same clocks, which would be ignored until their 15 s renewal. Forget those clocks.
      for (const id of [...awareness.meta.keys()]) {
        if (id !== doc.clientID && !awareness.states.has(id)) awareness.meta.delete(id)
      }
    }
    renderStatus()
  })
  provider.on('sync', (synced) => {
    if (synced) {
      s.failed = false
      s.everSynced = true
    }
    renderStatus()
  })
  provider.on('connection-close', (event) => {
    s.failed = true
    const code = event ? event.code : 0
    if (code >= 4400 && code < 4500 && code !== 4401) {
      // refused for good (4403-style); y-websocket stops reconnecting on 44xx by itself
      s.access = 'refused'
    } else if (code === 4401 || (s.token && tokenExpired(s.token))) {
      // 4401: the token expired while connected. An upgrade refused for an expired token (HTTP
      // 401) reaches the page only as code 1006, hence the look at the token's own `exp`.
      if (s.tokenUrl) renewToken(s)
      else {
        s.access = 'expired'
        provider.shouldConnect = false // no use retrying with this token
      }
    }
    renderStatus()
  })
  awareness.on('change', () => renderPeers())

  s.view = new EditorView({
    parent: els.editor,
    state: EditorState.create({
      doc: ytext.toString(),
      extensions: [
        keymap.of([...yUndoManagerKeymap, ...defaultKeymap, indentWithTab]),
        highlightSpecialChars(),
        drawSelection(),
        dropCursor(),
        highlightActiveLine(),
        indentOnInput(),
        syntaxHighlighting(markdownStyle),
        markdown,
        EditorView.lineWrapping,
        EditorView.contentAttributes.of({ 'aria-label': `Document ${name}` }),
        placeholder('Start typing. Everyone who opens this document sees your edits live.'),
        editorTheme,
        EditorState.readOnly.of(readOnly),
        yCollab(ytext, awareness, { undoManager })
      ]
    })
  })

  session = s
  if (tokenUrl && (!token || tokenExpired(token) || !tokenCovers(token, name))) renewToken(s)
  else if (token && !tokenCovers(token, name)) s.access = 'refused'
  else if (token && tokenExpired(token)) s.access = 'expired'
  else provider.connect()
  renderDocChrome()
  renderStatus()
  renderPeers()
}

/** Gets a fresh token from the app's backend, then (re)connects with it: the refresh pattern. */
const renewToken = (s) => {
  if (s.renewing) return
  s.renewing = true
  s.provider.shouldConnect = false // wait for the new token instead of retrying with the old one
  fetchToken(s.tokenUrl, s.name).then((token) => {
    s.renewing = false
    if (session !== s) return
    s.token = token
    s.access = tokenCovers(token, s.name) ? '' : 'refused'
    s.provider.params.token = token
    if (!s.access) s.provider.connect()
    // a reload uses the fresh token too (replaceState fires no hashchange)
    window.history.replaceState(null, '', window.location.pathname + window.location.search + hashFor({ doc: s.name, server: s.server, token, tokenUrl: s.tokenUrl }))
    renderStatus()
  }, (err) => {
    s.renewing = false
    if (session !== s) return
    console.warn(`could not get a fresh access token: ${err.message}; retrying in 5 s`)
    s.access = 'expired'
    renderStatus()
    setTimeout(() => { if (session === s && s.access === 'expired') renewToken(s) }, 5000)
  })
  renderStatus()
}

const closeDoc = () => {
  if (!session) return
  const s = session
  session = null
  s.view.destroy()
  s.tracker.destroy()
  s.undoManager.destroy()
  s.provider.destroy() // tells the others we left, then closes the socket
  s.awareness.destroy()
  s.doc.destroy()
}

// ---------------------------------------------------------------- rendering

const connectionState = (s) => {
  if (s.provider.wsconnected && s.provider.synced) return 'connected'
  if (s.renewing) return 'connecting'
  if (s.access) return s.access
  if (s.failed) return 'offline'
  return 'connecting'
}

const renderStatus = () => {
  const s = session
  if (!s) return
  const state = connectionState(s)
  const saved = s.tracker.saved
  els.status.dataset.state = state
  els.status.dataset.saved = saved ? 'saved' : 'unsaved'
  els.statusText.textContent = state === 'expired' || state === 'refused' ? `access ${state}` : state
  let note = ''
  if (state === 'expired') note = s.tokenUrl ? 'could not renew the token, retrying…' : 'reload with a new token'
  else if (state === 'refused') note = 'this token does not open this document'
  else if (s.readOnly) note = 'read-only'
  else if (!saved) note = state === 'connected' ? 'saving…' : 'unsaved edits, kept until reconnected'
  else if (s.everSynced) note = 'all changes saved'
  else if (state === 'offline') note = 'retrying…'
  els.saveText.textContent = note
  els.status.title = state === 'offline'
    ? 'The server cannot be reached. Keep editing: your changes merge when the connection is back.'
    : state === 'expired' || state === 'refused'
      ? 'The server does not accept this access token for this document.'
      : `Server: ${s.provider.url.replace(/([?&]token=)[^&]*/, '$1…')}`
}

const renderDocChrome = () => {
  const s = session
  if (!s) return
  // links carry the token only when the page cannot fetch one itself
  const hash = hashFor({ doc: s.name, server: s.server, token: s.tokenUrl ? '' : s.token, tokenUrl: s.tokenUrl })
  els.docInput.value = s.name
  els.docTitle.textContent = s.name
  els.newTab.href = window.location.pathname + window.location.search + hash
  els.serverNote.textContent = s.server ? `via ${s.server}` : ''
  document.title = `${s.name} · collab`
}

const initials = (name) => {
  const parts = name.trim().split(/\s+/).filter(Boolean)
  const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] || '?').slice(0, 2)
  return letters.toUpperCase()
}
const safeColor = (c) => typeof c === 'string' && /^#[0-9a-f]{3,8}$/i.test(c) ? c : '#868e96'

const renderPeers = () => {
  const s = session
  if (!s) return
  const me = s.doc.clientID
  const people = []
  s.awareness.getStates().forEach((state, clientID) => {
    const user = state && state.user
    if (!user) return
    const name = String(user.name || 'Anonymous').slice(0, MAX_NAME)
    people.push({ clientID, name, color: safeColor(user.color), self: clientID === me })
  })
  people.sort((a, b) => (Number(b.self) - Number(a.self)) || a.name.localeCompare(b.name) || a.clientID - b.clientID)
  els.peers.replaceChildren(...people.map((p) => {
    const li = document.createElement('li')
    li.className = 'peer' + (p.self ? ' self' : '')
    li.dataset.clientId = String(p.clientID)
    const avatar = document.createElement('span')
    avatar.className = 'avatar'
    avatar.style.background = p.color
    avatar.textContent = initials(p.name)
    const name = document.createElement('span')
    name.className = 'peer-name'
    name.textContent = p.name
    li.append(avatar, name)
    if (p.self) {
      const you = document.createElement('span')
      you.className = 'you'
      you.textContent = 'you'
      li.append(you)
    }
    return li
  }))
  els.peerCount.textContent = String(people.length)
}

// ---------------------------------------------------------------- controls

const followHash = () => {
  const h = readHash()
  if (session && !session.tracker.saved && (session.name !== h.doc || session.server !== h.server) &&
      !window.confirm(`"${session.name}" has edits the server has not confirmed yet; they are lost if you leave. Leave anyway?`)) {
    window.history.replaceState(null, '', window.location.pathname + window.location.search +
      hashFor({ doc: session.name, server: session.server, token: session.token, tokenUrl: session.tokenUrl }))
    els.docInput.value = session.name
    return
  }
  const canonical = hashFor(h)
  if (window.location.hash !== canonical) {
    window.history.replaceState(null, '', window.location.pathname + window.location.search + canonical)
  }
  openDoc(h.doc, h.server, h.token, h.tokenUrl)
}

els.docForm.addEventListener('submit', (e) => {
  e.preventDefault()
  const name = cleanDocName(els.docInput.value)
  if (!name) {
    els.docInput.value = session ? session.name : DEFAULT_DOC
    return
  }
  els.docInput.value = name
  window.location.hash = hashFor({ ...readHash(), doc: name }) // → hashchange → followHash
  els.docInput.blur()
})

let nameTimer = 0
const applyName = () => {
  clearTimeout(nameTimer)
  const name = els.nameInput.value.trim().slice(0, MAX_NAME)
  if (!name || name === identity.name) return
  identity.name = name
  saveName(name)
  if (session) session.awareness.setLocalStateField('user', { ...identity })
}
els.nameInput.addEventListener('input', () => {
  clearTimeout(nameTimer)
  nameTimer = setTimeout(applyName, 250)
})
els.nameInput.addEventListener('change', applyName)
els.nameInput.addEventListener('blur', () => {
  applyName()
  els.nameInput.value = identity.name
})
els.nameInput.addEventListener('keydown', (e) => {
  if (e.key === 'Enter') els.nameInput.blur()
})

if (navigator.clipboard && window.isSecureContext) {
  els.copyLink.addEventListener('click', () => {
    navigator.clipboard.writeText(els.newTab.href).then(() => {
      els.copyLink.textContent = 'Copied'
      setTimeout(() => { els.copyLink.textContent = 'Copy link' }, 1500)
    }, () => { /* clipboard refused: the link is still right there */ })
  })
} else {
  els.copyLink.hidden = true
}

window.addEventListener('hashchange', followHash)
window.addEventListener('beforeunload', (e) => {
  if (session && !session.tracker.saved) {
    e.preventDefault()
    e.returnValue = ''
  }
})

followHash()
