/**
 * `vmsnap snapshot --pid` given something that is not a process it can
 * snapshot, or asked for mappings by size (break1 finding 7): a kernel thread
 * and a thread id that is not its process's pid are refused as usage errors
 * (exit 2) that say what the pid is and which pid to give (they said
 * "missing ptrace access ... EPERM" with exit 4, and "open pid N: ENOENT");
 * `--min-size` picks writable mappings, not a bigger PROT_NONE reservation.
 */
import { spawnSync } from "node:child_process"
import { readdirSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, describe, expect, it } from "vitest"
import { expectReleased, killTargets, pidSkipReason, Target } from "./pidTarget.js"
import { scratchDir } from "./toyVmmTests.js"

const here = dirname(fileURLToPath(import.meta.url))
const bin = join(here, "..", "packages", "cli", "dist", "bin.js")
const dir = scratchDir("vmsnap-pidchoice-")
const skip = pidSkipReason()
if (skip) console.warn(`SKIP pid target choice tests: ${skip}`)
afterAll(killTargets)

const vmsnap = (args: ReadonlyArray<string>) => {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: "utf8", timeout: 60_000 })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** A kernel thread this process can see (PF_KTHREAD in /proc/PID/stat), if any. */
const kernelThread = (): number | undefined => {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue
    try {
      const flags = Number(readFileSync(`/proc/${name}/stat`, "utf8").replace(/^.*\) /s, "").split(" ")[6])
      if ((flags & 0x00200000) !== 0) return Number(name)
    } catch { /* gone */ }
  }
  return undefined
}

describe.skipIf(skip)("snapshot --pid: which pid, which mappings", () => {
  const kthread = kernelThread()
  it.skipIf(kthread === undefined)("a kernel thread: a usage error saying it has no user memory", () => {
    const r = vmsnap(["snapshot", "--pid", String(kthread), "-o", join(dir, "k.vmsnap")])
    expect(r.code, r.stderr).toBe(2)
    expect(r.stderr).toMatch(new RegExp(`pid ${kthread} \\(.+\\) is a kernel thread: it has no user memory to snapshot`))
  })
  if (kthread === undefined) console.warn("SKIP kernel thread case: no kernel thread is visible in this pid namespace")

  it("a thread id that is not its process's pid: a usage error naming the process to give", async () => {
    const target = new Target(["8", "2"])
    const t = await target.ready
    const tid = readdirSync(`/proc/${t.pid}/task`).map(Number).find((n) => n !== t.pid)!
    const r = vmsnap(["snapshot", "--pid", String(tid), "-o", join(dir, "tid.vmsnap")])
    expect(r.code, r.stderr).toBe(2)
    expect(r.stderr).toContain(`pid ${tid} is a thread of process ${t.pid} (vmsnap-pidtarge), not a process: memory belongs to the whole process, snapshot it with --pid ${t.pid}`)
    await expectReleased(target)
  })

  it("--min-size picks the writable mappings of that size, not a bigger PROT_NONE reservation", async () => {
    const target = new Target(["32", "1"]) // 16 MiB each: more than a thread stack (8 MiB)
    const t = await target.ready
    const r = vmsnap(["snapshot", "--pid", String(t.pid), "--min-size", String(t.bytes), "-o", join(dir, "min.vmsnap"), "--json"])
    expect(r.code, r.stderr + r.stdout).toBe(0)
    const hvas = JSON.parse(r.stdout).mappings.map((m: { hva: string }) => m.hva)
    expect(hvas.sort()).toEqual([`0x${t.anon.toString(16)}`, `0x${t.shm.toString(16)}`].sort())
    await expectReleased(target)
  })
})
