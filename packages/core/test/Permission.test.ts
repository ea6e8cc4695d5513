/**
 * Missing permission: an unprivileged user without userfaultfd access gets a
 * clear error naming the sysctl and the device to change. Runs the built
 * library as user `nobody` in a child process.
 */
import { execFileSync, spawnSync } from "node:child_process"
import { existsSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"

const coreDist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist", "index.js")

const why = (): string | undefined => {
  if (process.getuid?.() !== 0) return "needs root to run a child as an unprivileged user"
  if (readFileSync("/proc/sys/vm/unprivileged_userfaultfd", "utf8").trim() !== "0")
    return "vm.unprivileged_userfaultfd=1: every user may use userfaultfd here"
  if (!existsSync(coreDist)) return `core is not built (${coreDist}); run the README's test command`
  try {
    execFileSync("setpriv", ["--version"], { stdio: "ignore" })
  } catch {
    return "setpriv (util-linux) is not installed"
  }
  return undefined
}
const skip = why()
if (skip) console.warn(`SKIP unprivileged-user test: ${skip}`)

describe.skipIf(skip)("missing permission", () => {
  it("an unprivileged user gets an error naming the fix", () => {
    const script = `
      import("${coreDist}").then(async ({ Vmsnap }) => {
        try { await Vmsnap.probe(); console.log("UNEXPECTED: probe succeeded") }
        catch (e) { console.log(e._tag + ": " + e.message); process.exit(3) }
      })`
    const r = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, "-e", script], { encoding: "utf8" })
    expect(r.status, r.stderr).toBe(3)
    expect(r.stdout).toMatch(/NativeError: userfaultfd: userfaultfd is not permitted/)
    expect(r.stdout).toMatch(/vm\.unprivileged_userfaultfd=1/)
    expect(r.stdout).toMatch(/\/dev\/userfaultfd/)
  })
})
