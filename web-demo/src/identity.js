// Who this browser is: a name the user can change and a colour that is random but stable,
// both remembered in localStorage.

const PALETTE = [
  '#e8590c', '#d6336c', '#ae3ec9', '#7048e8', '#4263eb', '#1c7ed6',
  '#0c8599', '#099268', '#2f9e44', '#66a80f', '#f08c00', '#c92a2a'
]
const ADJECTIVES = ['Curious', 'Brave', 'Quiet', 'Swift', 'Clever', 'Gentle', 'Bright', 'Lucky', 'Witty', 'Calm']
const ANIMALS = ['Otter', 'Fox', 'Heron', 'Lynx', 'Panda', 'Koala', 'Falcon', 'Badger', 'Dolphin', 'Owl']

const NAME_KEY = 'collab:name'
const COLOR_KEY = 'collab:color'

const load = (key) => {
  try { return window.localStorage.getItem(key) } catch (_e) { return null }
}
const store = (key, value) => {
  try { window.localStorage.setItem(key, value) } catch (_e) { /* storage disabled */ }
}
const pick = (list) => list[Math.floor(Math.random() * list.length)]

export const MAX_NAME = 40

export const loadIdentity = () => {
  let name = (load(NAME_KEY) || '').trim().slice(0, MAX_NAME)
  if (!name) {
    name = `${pick(ADJECTIVES)} ${pick(ANIMALS)}`
    store(NAME_KEY, name)
  }
  let color = load(COLOR_KEY)
  if (!color || !/^#[0-9a-f]{6}$/i.test(color)) {
    color = pick(PALETTE)
    store(COLOR_KEY, color)
  }
  return { name, color, colorLight: color + '33' }
}

export const saveName = (name) => store(NAME_KEY, name)
