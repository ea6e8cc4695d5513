/**
 * Missing permission: an unprivileged user without userfaultfd access gets a
 * clear error naming the sysctl and the device to change. A child process
 * loads the built library as root (so the checkout may live anywhere, even
 * in a directory only root can enter), then drops to user `nobody` (uid,
 * gid, no supplementary groups: the kernel then checks nobody's rights) and
 * probes.
 */
import { spawnSync } from "node:child_process"
import { existsSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"

const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist")
const coreDist = join(dist, "index.js")
const ffiDist = join(dist, "internal", "ffi.js")
const NOBODY = 65534

const why = (): string | undefined => {
  if (process.getuid?.() !== 0) return "needs root to run a child as an unprivileged user"
  if (readFileSync("/proc/sys/vm/unprivileged_userfaultfd", "utf8").trim() !== "0")
    return "vm.unprivileged_userfaultfd=1: every user may use userfaultfd here"
  if (!existsSync(coreDist)) return `core is not built (${coreDist}); run the README's test command`
  return undefined
}
const skip = why()
if (skip) console.warn(`SKIP unprivileged-user test: ${skip}`)

describe.skipIf(skip)("missing permission", () => {
  it("an unprivileged user gets an error naming the fix", () => {
    const script = `
      const { Vmsnap } = await import(${JSON.stringify(coreDist)})
      const { loadWp } = await import(${JSON.stringify(ffiDist)})
      loadWp()
      process.setgroups([]); process.setgid(${NOBODY}); process.setuid(${NOBODY})
      try { await Vmsnap.probe(); console.log("UNEXPECTED: probe succeeded") }
      catch (e) { console.log(e._tag + ": " + e.message); process.exit(3) }`
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" })
    expect(r.status, r.stderr).toBe(3)
    expect(r.stdout).toMatch(/NativeError: userfaultfd: userfaultfd is not permitted/)
    expect(r.stdout).toMatch(/vm\.unprivileged_userfaultfd=1/)
    expect(r.stdout).toMatch(/\/dev\/userfaultfd/)
  })
})
