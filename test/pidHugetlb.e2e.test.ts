/**
 * `snapshot --pid` of a process whose memory is hugetlbfs (issue 11 #2):
 * pid_target with `hugetlb` maps its anonymous memory with MAP_HUGETLB and
 * its memfd with MFD_HUGETLB, and its threads write stamped pages into both
 * during the snapshot. Both mappings are captured at their 2 MiB page size
 * (recorded as hugetlbfs), the snapshot equals the memory at the cut (read
 * through /proc/PID/mem while frozen), and the target runs on untraced and
 * unprotected. Huge pages are reserved by the test (test/hugePages.ts);
 * without them it skips, saying why.
 */
import { Effect, Exit } from "effect"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { inspectSnapshot, snapshotPid } from "../packages/core/src/index.js"
import { withHugePages } from "./hugePages.js"
import { expectReleased, killTargets, messageOf, pidSkipReason, run, sleep, Target } from "./pidTarget.js"
import { differenceFromReference, referenceAtCut } from "./pidTests.js"
import { scratchDir } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-pid-huge-")
const skip = pidSkipReason()
if (skip) console.warn(`SKIP pid hugetlbfs tests: ${skip}`)
afterAll(killTargets)
const MiB = 1 << 20

describe.skipIf(skip)("snapshot --pid of hugetlbfs memory", () => {
  it("MAP_HUGETLB and memfd MFD_HUGETLB mappings written by two threads: captured at 2 MiB pages, equal to the memory at the cut", async (ctx) => {
    const why = await withHugePages(10, async () => {
      const target = new Target(["16", "2", "hugetlb"])
      const t = await target.ready
      await sleep(100)
      const path = join(dir, "huge.vmsnap")
      const reference = join(dir, "huge.ref")
      const exit = await run(snapshotPid({
        pid: target.pid,
        path,
        poolPages: 256,
        mappings: [{ _tag: "Name", name: "pid-target-shm" }, { _tag: "Range", start: t.anon, end: t.anon + BigInt(t.bytes) }],
        atCut: referenceAtCut(target.pid, reference)
      }))
      expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
      if (!Exit.isSuccess(exit)) return
      expect(exit.value.mappings.map((m) => m.kind)).toEqual(["hugetlbfs", "hugetlbfs"])
      expect(exit.value.engine.faults, "the writers never raced the snapshot").toBeGreaterThan(0)
      const inspected = await Effect.runPromise(inspectSnapshot(path))
      expect(inspected.regions.map((r) => [r.kind, r.pageSize])).toEqual([["hugetlbfs", 2 * MiB], ["hugetlbfs", 2 * MiB]])
      expect(await differenceFromReference(path, reference)).toBe(-1)
      await expectReleased(target)
      expect(target.stderr).toBe("")
      target.kill()
    })
    if (why) {
      console.warn(`SKIP pid hugetlbfs snapshot: ${why}`)
      ctx.skip()
    }
  })
})
