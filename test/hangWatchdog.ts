/**
 * A test process whose JavaScript thread stops turning (a native call that
 * never returns: a spin on another thread, a kernel wait) defeats vitest's
 * own timeouts, which run on that very thread: CI then waits for hours and
 * prints nothing of why. Loaded as a setup file in every test process: the
 * main thread beats every second into shared memory; a worker thread that
 * sees no beat for HANG_SECONDS prints what every thread of this process and
 * of its children is doing (kernel state, wait channel, kernel stack, and the
 * user stacks when gdb is installed: scripts/processReport.cjs), then kills
 * the process: the run ends with that report (vitest stops at a worker that
 * died) instead of at CI's limit.
 *
 * HANG_SECONDS is over vitest's testTimeout (120 s) and hookTimeout (60 s):
 * a test that is only slow fails by vitest's timeout first.
 */
import { fileURLToPath } from "node:url"
import { Worker } from "node:worker_threads"

const HANG_SECONDS = Number(process.env.VMSNAP_TEST_HANG_SECONDS ?? 180)

const watcher = `
const { workerData } = require("node:worker_threads")
const fs = require("node:fs")
const { describeTree } = require(workerData.report)
const beat = new Int32Array(workerData.beat)
let last = Atomics.load(beat, 0)
let quiet = 0
setInterval(() => {
  const now = Atomics.load(beat, 0)
  if (now !== last) { last = now; quiet = 0; return }
  if (++quiet < workerData.seconds) return
  const { pids, text } = describeTree(process.pid)
  fs.writeSync(2, "\\nHANG: this test process's JavaScript thread has not run for " + quiet + " s (a native call that does not return?); what its threads and children are doing:\\n" + text + "\\nHANG: killing test process " + process.pid + " and its children so the run ends\\n")
  for (const p of pids.slice(1)) { try { process.kill(p, "SIGKILL") } catch {} }
  process.kill(process.pid, "SIGKILL")
}, 1000)
`

const key = Symbol.for("vmsnap.test.hangWatchdog")
const global = globalThis as { [key]?: boolean }
if (!global[key] && HANG_SECONDS > 0) {
  global[key] = true
  const beat = new SharedArrayBuffer(4)
  const beats = new Int32Array(beat)
  setInterval(() => Atomics.add(beats, 0, 1), 1000).unref()
  const report = fileURLToPath(new URL("../scripts/processReport.cjs", import.meta.url))
  new Worker(watcher, { eval: true, workerData: { beat, seconds: HANG_SECONDS, report } }).unref()
}
