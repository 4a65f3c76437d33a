// Builds dist/: index.html, app.js, app.css. Deterministic: same lockfile, same bytes.
import { build } from 'esbuild'
import { copyFile, mkdir, readdir, rm } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import path from 'node:path'

const root = path.dirname(fileURLToPath(import.meta.url))
const dist = path.join(root, 'dist')

await rm(dist, { recursive: true, force: true })
await mkdir(dist, { recursive: true })

await build({
  absWorkingDir: root,
  entryPoints: { app: 'src/main.js' },
  outdir: 'dist',
  bundle: true,
  minify: true,
  format: 'iife',
  target: 'es2020',
  charset: 'utf8',
  legalComments: 'none',
  sourcemap: false,
  metafile: false,
  logLevel: 'warning'
})
await copyFile(path.join(root, 'src/index.html'), path.join(dist, 'index.html'))

for (const f of (await readdir(dist)).sort()) console.log('dist/' + f)
