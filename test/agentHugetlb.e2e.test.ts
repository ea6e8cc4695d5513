/**
 * hugetlbfs guests through the agent (issue 11 #2): the toy VMM's guest RAM
 * in 2 MiB hugetlbfs pages (a memfd MFD_HUGETLB, or anonymous MAP_HUGETLB
 * read with process_vm_readv), its vCPUs writing during the snapshot, a
 * device process writing the same memfd. The snapshot records the region
 * as hugetlbfs with 2 MiB pages and equals the VMM's reference copy taken at
 * the cut; a hello that declares 4 KiB pages for such memory is refused at
 * hello, naming the real page size. Huge pages are reserved by the test
 * (test/hugePages.ts); without them it skips, saying why.
 */
import { Cause, Effect, Exit } from "effect"
import { execFile } from "node:child_process"
import { readFileSync, rmSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Agent, inspectSnapshot, restoreToRawFile, WpNative } from "../packages/core/src/index.js"
import { withHugePages } from "./hugePages.js"
import { guestWritesOn, scratchDir, startVmm, toyVmmSkipReason } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-agent-huge-")
const skip = await toyVmmSkipReason("agent hugetlbfs tests")
const run = <A, E>(effect: Effect.Effect<A, E, WpNative>) => Effect.runPromiseExit(Effect.provide(effect, WpNative.layer))
const messageOf = (exit: Exit.Exit<unknown, unknown>) => (Exit.isFailure(exit) ? String((Cause.squash(exit.cause) as Error).message) : "(succeeded)")
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const MiB = 1 << 20
const badPeer = join(dirname(fileURLToPath(import.meta.url)), "fixtures", "bad_peer.py")

/** Runs body with `count` huge pages reserved; skips the test, printing why, when they cannot be had. */
const withHuge = async (ctx: { skip: () => void }, count: number, body: () => Promise<void>) => {
  const why = await withHugePages(count, body)
  if (why) {
    console.warn(`SKIP agent hugetlbfs test: ${why}`)
    ctx.skip()
  }
}

describe.skipIf(skip)("agent with a hugetlbfs toy VMM", () => {
  const socket = join(dir, "agent.sock")
  const agent = new Agent(socket, { outputDir: dir })
  beforeAll(() => agent.listen())
  afterAll(() => agent.close())

  it.each([
    ["memfd MFD_HUGETLB, with a device process writing it too", { device: true }],
    ["anonymous MAP_HUGETLB (process_vm_readv)", { anon: true }]
  ])("%s: vCPUs write during the snapshot; it equals the reference at the cut, recorded as 2 MiB hugetlbfs", async (_what, memory, ctx) => {
    await withHuge(ctx, 40, async () => {
      const vm = memory.anon ? "huge-anon" : "huge-memfd"
      const reference = join(dir, `${vm}.ref`)
      const vmm = startVmm({ memMiB: 64, vcpus: 2, rate: 0, agent: socket, vm, reference, fillPercent: 50, hugetlb: true, ...memory })
      const ready = await vmm.ready
      await sleep(200)
      const path = join(dir, `${vm}.vmsnap`)
      // A pool smaller than one huge page: every huge-page fault goes through it in chunks.
      const exit = await run(agent.snapshot({ vm, path, poolPages: 128 }))
      await sleep(100)
      const report = await vmm.stop()
      expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
      if (Exit.isSuccess(exit)) expect(exit.value.engine.faults).toBeGreaterThan(0)
      expect(report.phases.during.writes).toBeGreaterThan(0)
      if (memory.device) expect(ready.pids).toHaveLength(2)
      const inspected = await Effect.runPromise(inspectSnapshot(path))
      expect(inspected.regions).toMatchObject([{ kind: "hugetlbfs", pageSize: 2 * MiB, sizeBytes: 64 * MiB }])
      const raw = `${path}.raw`
      const restored = await Effect.runPromiseExit(restoreToRawFile(path, raw))
      expect(Exit.isSuccess(restored), messageOf(restored)).toBe(true)
      expect(readFileSync(raw).equals(readFileSync(reference))).toBe(true)
      rmSync(raw)
    })
  })

  it("anonymous MAP_HUGETLB memory declared with 4 KiB pages is refused at hello, naming the real page size from smaps", async (ctx) => {
    await withHuge(ctx, 2, async () => {
      const hello = JSON.stringify({ type: "hello", version: 1, vm: "huge-declared", role: "vmm", uffd: 0, regions: [{ gpa: "0x0", size: 2 * MiB, pageSize: 4096, fd: null, hva: "HVA" }] })
      const { stdout } = await promisify(execFile)("python3", [badPeer, socket, hello, "uffd", "--anon-hugetlb", String(2 * MiB)], { encoding: "utf8" })
      const answer = JSON.parse(stdout.split("\n")[0]!) as { type: string; message: string }
      expect(answer.type).toBe("error")
      expect(answer.message).toMatch(/pid \d+'s mapping has 2097152-byte pages \(hugetlbfs\) but the region declares pageSize 4096: declare "pageSize": 2097152/)
      expect(agent.list().map((v) => v.id)).not.toContain("huge-declared")
    })
  })

  it("a device process killed mid-snapshot: the snapshot fails naming it, the VMM's vCPUs are not left blocked on a huge page", async (ctx) => {
    await withHuge(ctx, 40, async () => {
      const vmm = startVmm({ memMiB: 64, vcpus: 2, rate: 0, agent: socket, vm: "huge-doomed", fillPercent: 100, hugetlb: true, device: true, progressMs: 20 })
      const ready = await vmm.ready
      expect(ready.pids).toHaveLength(2)
      // Killed at the first progress report, with pages still to save: mid-snapshot whatever the machine's
      // speed (the native writer is fast enough that a fixed delay could miss it). A 4-slot pool: each huge-page
      // fault waits for the writer 128 times.
      let killed = false
      const exit = await run(
        agent.snapshot({ vm: "huge-doomed", path: join(dir, "huge-doomed.vmsnap"), poolPages: 4 }, (saved, total) => {
          if (!killed && saved < total) process.kill(ready.pids[1]!, "SIGKILL")
          killed = true
        })
      )
      expect(Exit.isFailure(exit)).toBe(true)
      expect(messageOf(exit)).toMatch(/device.*(disconnected|exited)/)
      // Every protection of the VMM is gone: its vCPUs write on (a loaded machine slows them, it does not stop them).
      const writes = await guestWritesOn(vmm, ready.pids[0]!)
      const report = await vmm.stop()
      expect(writes, `guest writes stalled after the failed snapshot (${report.kind})`).toBeGreaterThan(1000)
    })
  })
})
