/**
 * `snapshot --pid` of a process that discards memory (MADV_DONTNEED of 16-page
 * chunks of an anonymous mapping, as an allocator or a balloon does) during
 * the snapshot, as docs/pid-snapshot.md says: a discard before the cut is part
 * of the memory at the cut (exact snapshot); after the cut, a discard of pages
 * not yet saved fails the snapshot saying so (unless the cut saw them empty:
 * discarded while armed, then again after the cut), never "changed its memory
 * layout" (break2 finding 4: it said a mapping "was replaced", because the
 * layout was checked after the session had unregistered every mapping); a
 * real replacement still fails with the layout message (pid.e2e.test.ts).
 */
import { Effect, Exit } from "effect"
import { existsSync } from "node:fs"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { snapshotPid } from "../packages/core/src/index.js"
import { expectReleased, killTargets, messageOf, pidSkipReason, run, sleep, Target } from "./pidTarget.js"
import { differenceFromReference, leftovers, referenceAtCut } from "./pidTests.js"
import { scratchDir } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-piddiscard-")
const skip = pidSkipReason()
if (skip) console.warn(`SKIP pid discard tests: ${skip}`)
afterAll(killTargets)

const discardMessage = /pid \d+ discarded memory \(MADV_DONTNEED\/MADV_REMOVE\) that was not saved yet/

/** The target discards (`discard` command) and answers once every chunk is discarded. */
const discard = (target: Target) =>
  Effect.promise(async () => {
    target.send("discard")
    await target.line(/^discarded$/m)
  })

describe.skipIf(skip)("snapshot --pid of a process that discards memory", () => {
  it("discards while armed, before the cut: the snapshot equals the memory at the cut", async () => {
    const target = new Target(["32", "2"])
    const t = await target.ready
    const path = join(dir, "before.vmsnap")
    const reference = join(dir, "before.ref")
    const exit = await run(snapshotPid({
      pid: t.pid, path, poolPages: 256,
      mappings: [{ _tag: "Range", start: t.anon, end: t.anon + BigInt(t.bytes) }],
      beforeCut: discard(target),
      atCut: referenceAtCut(t.pid, reference)
    }))
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    expect(await differenceFromReference(path, reference)).toBe(-1)
    await expectReleased(target)
    expect(target.stderr).toBe("")
  })

  it("discards after the cut of pages not yet saved: fails saying so, not as a layout change, and no file", async () => {
    const target = new Target(["32", "2"])
    const t = await target.ready
    const path = join(dir, "after.vmsnap")
    const exit = await run(snapshotPid({
      pid: t.pid, path, poolPages: 64, writerDelayMs: 20,
      mappings: [{ _tag: "Range", start: t.anon, end: t.anon + BigInt(t.bytes) }],
      // Frozen at the cut: the target discards as soon as it is thawed, long before the slowed writer is done.
      atCut: () => Effect.sync(() => target.send("discard"))
    }))
    expect(messageOf(exit)).toMatch(discardMessage)
    expect(messageOf(exit)).not.toMatch(/memory layout|replaced/)
    expect(existsSync(path)).toBe(false)
    await target.line(/^discarded$/m)
    await expectReleased(target)
    expect(target.stderr).toBe("")
  })

  it("the same pages discarded while armed and again after the cut: empty at the cut, so the snapshot is exact (their zeros)", async () => {
    const target = new Target(["32", "0"]) // no writer: what the cut sees discarded stays empty
    const t = await target.ready
    const path = join(dir, "again.vmsnap")
    const reference = join(dir, "again.ref")
    const exit = await run(snapshotPid({
      pid: t.pid, path, poolPages: 64, writerDelayMs: 20,
      mappings: [{ _tag: "Range", start: t.anon, end: t.anon + BigInt(t.bytes) }],
      beforeCut: discard(target),
      atCut: (regions) => Effect.andThen(referenceAtCut(t.pid, reference)(regions), Effect.sync(() => target.send("discard")))
    }))
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    expect(await differenceFromReference(path, reference)).toBe(-1)
    await target.line(/^discarded$/m)
    expect(leftovers(t.pid)).toEqual([])
    await target.ping() // its main thread answers (it has no writer to check)
    expect(target.stderr).toBe("")
  })

  it("discarding again and again through several snapshots: each is exact or fails naming the discard", async () => {
    const target = new Target(["32", "2"])
    const t = await target.ready
    let discarding = true
    const loop = (async () => {
      while (discarding) {
        target.send("discard")
        await target.line(/^discarded$/m)
        await sleep(1)
      }
    })()
    const outcomes: Array<string> = []
    try {
      for (let round = 0; round < 4; round++) {
        const path = join(dir, `loop-${round}.vmsnap`)
        const reference = join(dir, `loop-${round}.ref`)
        const exit = await run(snapshotPid({
          pid: t.pid, path, poolPages: 256,
          mappings: [{ _tag: "Range", start: t.anon, end: t.anon + BigInt(t.bytes) }],
          atCut: referenceAtCut(t.pid, reference)
        }))
        if (Exit.isSuccess(exit)) {
          expect(await differenceFromReference(path, reference)).toBe(-1)
          outcomes.push("exact")
        } else {
          expect(messageOf(exit)).toMatch(discardMessage)
          expect(existsSync(path)).toBe(false)
          outcomes.push("discarded")
        }
      }
    } finally {
      discarding = false
      await loop
    }
    console.log(`pid snapshots of a process discarding memory in a loop: ${outcomes.join(", ")}`)
    await expectReleased(target)
    expect(target.stderr).toBe("")
  })
})
