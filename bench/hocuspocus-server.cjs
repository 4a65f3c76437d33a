// @hocuspocus/server for bench/run.sh: `HOST=127.0.0.1 PORT=1234 node bench/hocuspocus-server.cjs`
// runs it without extensions (in memory); with `REDIS_PORT=6379` (and optionally REDIS_HOST) it
// adds @hocuspocus/extension-redis, so several such processes share documents (bench/cluster.sh).
// Resolves the packages from bench/.ref/hocuspocus (written by bench/install-ref.sh), so it runs
// from any working directory.
const path = require('node:path')
const modules = path.join(__dirname, '.ref/hocuspocus/node_modules')
const { Server } = require(path.join(modules, '@hocuspocus/server'))

const extensions = []
if (process.env.REDIS_PORT) {
  const { Redis } = require(path.join(modules, '@hocuspocus/extension-redis'))
  extensions.push(new Redis({ host: process.env.REDIS_HOST || '127.0.0.1', port: Number(process.env.REDIS_PORT) }))
}

const server = new Server({
  address: process.env.HOST || '127.0.0.1',
  port: Number(process.env.PORT || 1234),
  extensions,
  // The banner and per-connection logs would only add noise to the measured CPU.
  quiet: true,
})
server.listen()
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.destroy().finally(() => process.exit(0)))
}
