/**
 * A test process whose JavaScript thread stops turning (a native call that
 * never returns: a spin on another thread, a kernel wait) defeats vitest's
 * own timeouts, which run on that very thread: CI then waits for hours and
 * prints nothing of why. Loaded as a setup file in every test process: the
 * main thread beats every second into shared memory; a worker thread that
 * sees no beat for HANG_SECONDS prints what every thread of this process and
 * of its children is doing (kernel state, wait channel, kernel stack, and the
 * user stacks when gdb is installed), then kills the process, so the file
 * fails with that report and the run goes on.
 *
 * HANG_SECONDS is over vitest's testTimeout (120 s) and hookTimeout (60 s):
 * a test that is only slow fails by vitest's timeout first.
 */
import { Worker } from "node:worker_threads"

const HANG_SECONDS = Number(process.env.VMSNAP_TEST_HANG_SECONDS ?? 180)

const watcher = `
const { workerData } = require("node:worker_threads")
const fs = require("node:fs")
const { spawnSync } = require("node:child_process")
const beat = new Int32Array(workerData.beat)
const pid = process.pid
const read = (path) => { try { return fs.readFileSync(path, "utf8").trim() } catch (e) { return "(" + e.code + ")" } }
const children = (of) => {
  const found = []
  for (const name of fs.readdirSync("/proc")) {
    if (!/^\\d+$/.test(name)) continue
    const stat = read("/proc/" + name + "/stat")
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1])
    if (ppid === of) found.push(Number(name), ...children(Number(name)))
  }
  return found
}
const describe = (p) => {
  const lines = ["== pid " + p + ": " + read("/proc/" + p + "/cmdline").split("\\0").join(" ").slice(0, 300)]
  let tasks = []
  try { tasks = fs.readdirSync("/proc/" + p + "/task") } catch {}
  for (const t of tasks) {
    const base = "/proc/" + p + "/task/" + t
    const stat = read(base + "/stat")
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0]
    lines.push("-- thread " + t + " " + read(base + "/comm") + " state " + state + " wchan " + read(base + "/wchan"))
    const stack = read(base + "/stack")
    if (stack && !stack.startsWith("(")) lines.push(stack.split("\\n").slice(0, 16).map((l) => "     " + l).join("\\n"))
  }
  const gdb = spawnSync("gdb", ["-batch", "-nx", "-p", String(p), "-ex", "thread apply all bt 20"], { encoding: "utf8", timeout: 30000 })
  if (gdb.error) lines.push("   (no user stacks: " + gdb.error.message + ")")
  else lines.push(gdb.stdout.split("\\n").filter((l) => /^(Thread|#)/.test(l)).join("\\n"))
  return lines.join("\\n")
}
let last = Atomics.load(beat, 0)
let quiet = 0
setInterval(() => {
  const now = Atomics.load(beat, 0)
  if (now !== last) { last = now; quiet = 0; return }
  if (++quiet < workerData.seconds) return
  const report = ["", "HANG: this test process's JavaScript thread has not run for " + quiet + " s (a native call that does not return?); what its threads and children are doing:"]
  for (const p of [pid, ...children(pid)]) report.push(describe(p))
  report.push("HANG: killing test process " + pid + " and its children so the run goes on", "")
  fs.writeSync(2, report.join("\\n") + "\\n")
  for (const p of children(pid)) { try { process.kill(p, "SIGKILL") } catch {} }
  process.kill(pid, "SIGKILL")
}, 1000)
`

const key = Symbol.for("vmsnap.test.hangWatchdog")
const global = globalThis as { [key]?: boolean }
if (!global[key] && HANG_SECONDS > 0) {
  global[key] = true
  const beat = new SharedArrayBuffer(4)
  const beats = new Int32Array(beat)
  setInterval(() => Atomics.add(beats, 0, 1), 1000).unref()
  new Worker(watcher, { eval: true, workerData: { beat, seconds: HANG_SECONDS } }).unref()
}
