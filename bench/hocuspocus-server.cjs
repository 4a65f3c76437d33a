// @hocuspocus/server without extensions (in memory), for bench/run.sh: `HOST=127.0.0.1 PORT=1234
// node bench/hocuspocus-server.cjs`. Resolves the package from bench/.ref/hocuspocus (written by
// bench/install-ref.sh), so it runs from any working directory.
const path = require('node:path')
const { Server } = require(path.join(__dirname, '.ref/hocuspocus/node_modules/@hocuspocus/server'))

const server = new Server({
  address: process.env.HOST || '127.0.0.1',
  port: Number(process.env.PORT || 1234),
  // The banner and per-connection logs would only add noise to the measured CPU.
  quiet: true,
})
server.listen()
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.destroy().finally(() => process.exit(0)))
}
