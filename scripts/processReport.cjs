// What a process and its descendants are doing, for a test run that stopped
// moving (test/hangWatchdog.ts, scripts/with-deadline.mjs): each thread's
// state, wait channel and kernel stack (/proc, readable by root), and user
// stacks from gdb where it is installed (bounded: gdb waits for threads that
// a uffd holds). CommonJS: required from a worker thread's eval'd code too.
"use strict"
const fs = require("node:fs")
const { spawnSync } = require("node:child_process")

const read = (path) => {
  try {
    return fs.readFileSync(path, "utf8").trim()
  } catch (e) {
    return `(${e.code})`
  }
}

/** Field `index` (0: state) of /proc/PID/stat after the command's closing parenthesis. */
const statField = (stat, index) => stat.slice(stat.lastIndexOf(")") + 2).split(" ")[index]

/** pid's descendants, depth first, from one pass over /proc. */
const descendants = (pid) => {
  const children = new Map()
  let names = []
  try {
    names = fs.readdirSync("/proc")
  } catch {}
  for (const name of names) {
    if (!/^\d+$/.test(name)) continue
    const parent = Number(statField(read(`/proc/${name}/stat`), 1))
    children.set(parent, [...(children.get(parent) ?? []), Number(name)])
  }
  const below = (p) => (children.get(p) ?? []).flatMap((c) => [c, ...below(c)])
  return below(pid)
}

const describeProcess = (pid) => {
  const lines = [`== pid ${pid}: ${read(`/proc/${pid}/cmdline`).split("\0").join(" ").slice(0, 300)}`]
  let tasks = []
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`)
  } catch {}
  for (const t of tasks) {
    const base = `/proc/${pid}/task/${t}`
    lines.push(`-- thread ${t} ${read(`${base}/comm`)} state ${statField(read(`${base}/stat`), 0)} wchan ${read(`${base}/wchan`)}`)
    const stack = read(`${base}/stack`)
    if (stack && !stack.startsWith("(")) lines.push(stack.split("\n").slice(0, 16).map((l) => `     ${l}`).join("\n"))
  }
  const gdb = spawnSync("gdb", ["-batch", "-nx", "-p", String(pid), "-ex", "thread apply all bt 20"], { encoding: "utf8", timeout: 20000 })
  if (gdb.error) lines.push(`   (no user stacks: ${gdb.error.message})`)
  else lines.push(gdb.stdout.split("\n").filter((l) => /^(Thread|#)/.test(l)).join("\n"))
  return lines.join("\n")
}

/** The report for pid and every descendant, and their pids (to kill after). */
const describeTree = (pid) => {
  const pids = [pid, ...descendants(pid)]
  return { pids, text: pids.map(describeProcess).join("\n") }
}

module.exports = { describeTree, descendants }
