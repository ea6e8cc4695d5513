// node scripts/with-deadline.mjs SECONDS COMMAND [ARGS...]
// Runs COMMAND (its own process group, standard streams shared) and exits
// with its status. If it is still running after SECONDS, prints what every
// process of it is doing (scripts/processReport.cjs), kills the group and
// exits 124: a test stage that hangs fails in bounded time, saying where,
// instead of running into CI's limit with nothing printed.
import { spawn } from "node:child_process"
import { createRequire } from "node:module"

const { describeTree } = createRequire(import.meta.url)("./processReport.cjs")
const [seconds, command, ...args] = process.argv.slice(2)
if (!(Number(seconds) > 0) || !command) {
  console.error("usage: node scripts/with-deadline.mjs SECONDS COMMAND [ARGS...]")
  process.exit(2)
}
const child = spawn(command, args, { stdio: "inherit", detached: true })
const killGroup = (signal) => {
  try {
    process.kill(-child.pid, signal)
  } catch {}
}
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(signal, () => killGroup(signal))
const deadline = setTimeout(() => {
  const { text } = describeTree(child.pid)
  process.stderr.write(`\nDEADLINE: '${[command, ...args].join(" ")}' still running after ${seconds} s; what its processes are doing:\n${text}\nDEADLINE: killed\n`)
  killGroup("SIGKILL")
  process.exit(124)
}, Number(seconds) * 1000)
child.on("error", (e) => {
  console.error(`${command}: ${e.message}`)
  process.exit(127)
})
child.on("exit", (code, signal) => {
  clearTimeout(deadline)
  process.exit(code ?? (signal ? 128 : 1))
})
