/**
 * How a lazy-restore fault is served (issue 10, speed): the faulting page
 * alone, then its record's other pages by the fill thread (fault-around),
 * never on the faulting thread's time. Checked through the restorer's own
 * counters on real userfaultfd memory of this process, with the image-order
 * fill off so that every page is reached by a fault or by fault-around:
 * one page touched in every 64 KiB (every record has one), every fault
 * installs at most its own page (before, a fault installed its whole
 * record: 16 pages of a .vmsnap record, 256 of a raw image's 1 MiB), the
 * records' other pages still arrive (fault-around), and memory equals the image.
 * Speed itself is measured by `vmsnap bench --restore`, never here.
 */
import { Effect } from "effect"
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { restoreUffd, startLazyRestore, WpNative } from "../packages/core/src/index.js"
import { copyFromHva, scratchMemory, touchPages } from "../packages/rig/src/index.js"
import { SIZE, twoRegionSnapshot } from "./lazyRestoreTests.js"
import { scratchDir, toyVmmSkipReason } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-lazy-faultpath-")
const snapshotPath = join(dir, "two-regions.vmsnap")
const imagePath = join(dir, "two-regions.img")
const skip = await toyVmmSkipReason("lazy restore fault path tests")

const STRIDE = 16 * 4096
/** Restores the image into fresh memory of this process by faults (one page in every 64 KiB, so every record has one) and fault-around only. */
const restoreByFaults = (path: string, raw: boolean) =>
  Effect.runPromise(
    Effect.provide(
      Effect.scoped(
        Effect.gen(function* () {
          const base = yield* scratchMemory(SIZE)
          const uffd = yield* restoreUffd(base, SIZE)
          const restore = yield* startLazyRestore({ path, raw }, uffd, [{ hva: base, size: SIZE, imageOffset: 0 }], { fill: false })
          for (let at = 0; at < SIZE; at += STRIDE) touchPages(base + BigInt(at + ((at / STRIDE) % 16) * 4096), 4096)
          for (let i = 0; i < 5000 && restore.poll() === "serving"; i++) yield* Effect.promise(() => new Promise((r) => setTimeout(r, 2)))
          const memory = Buffer.alloc(SIZE)
          copyFromHva(memory, base)
          return { state: restore.poll(), stats: restore.stats(), memory }
        })
      ),
      WpNative.layer
    )
  )

describe.skipIf(skip)("a lazy-restore fault installs its own page first, its neighbours follow in the fill", () => {
  for (const [what, raw] of [["a raw memory image (serve --raw)", true], ["a .vmsnap file (records of encoding pages)", false]] as const) {
    it(`${what}: each fault installs at most one page, the record's others come from the fill, memory equals the image`, async () => {
      await twoRegionSnapshot(snapshotPath, imagePath, 23)
      const { state, stats, memory } = await restoreByFaults(raw ? imagePath : snapshotPath, raw)
      expect(state).toBe("done")
      const touched = SIZE / STRIDE
      expect(stats.faults).toBeGreaterThan(0)
      expect(stats.faults).toBeLessThanOrEqual(touched)
      // A fault on a page the fill had just installed installs nothing: at most one page per fault.
      expect(stats.pagesByFault).toBeLessThanOrEqual(stats.faults)
      expect(stats.pagesByFill).toBeGreaterThanOrEqual(stats.pagesTotal - touched)
      expect(stats.pagesByFault + stats.pagesByFill).toBe(stats.pagesTotal)
      expect(memory.equals(readFileSync(imagePath).subarray(0, SIZE))).toBe(true)
    })
  }
})

