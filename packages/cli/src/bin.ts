#!/usr/bin/env node
// Signals first, then the rest: a SIGINT or SIGTERM while the modules load is
// remembered and reported by the command (EarlySignals.ts).
import { listenEarly } from "./EarlySignals.js"

listenEarly()
const { main } = await import("./main.js")

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (e) => {
    process.stderr.write(`vmsnap: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`)
    process.exitCode = 1
  }
)
