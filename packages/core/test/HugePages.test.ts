/**
 * Unprotecting 4 KiB pages splits transparent huge pages. After a snapshot of
 * an anon-thp region vmsnap rebuilds them (MADV_COLLAPSE): the region is
 * huge-page backed again, not left split (QEMU leaves them split).
 */
import { Effect } from "effect"
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
// A writing guest from the test rig (tests only: core itself never imports the rig).
import { DemoGuest } from "../../rig/src/DemoGuest.js"
import { takeSnapshot } from "../src/SnapshotSession.js"
import { runTest, skipReason, tempDir } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("huge page rebuild")
const dir = tempDir()

/** AnonHugePages of the mapping that contains `hva`, in bytes. */
const anonHugeBytes = (hva: bigint): number => {
  let inside = false
  for (const line of readFileSync("/proc/self/smaps", "utf8").split("\n")) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line)
    if (range) inside = BigInt(`0x${range[1]}`) <= hva && hva < BigInt(`0x${range[2]}`)
    const huge = inside && /^AnonHugePages:\s+(\d+) kB/.exec(line)
    if (huge) return Number(huge[1]) * 1024
  }
  return 0
}

const snapshotThp = (collapseHugePages: boolean) =>
  runTest(
    Effect.gen(function* () {
      const guest = yield* DemoGuest.make(64 * MiB, "anon-thp")
      guest.fill(0, guest.pages, 11)
      const before = anonHugeBytes(guest.region.hostBase)
      guest.start(1, 20000)
      const result = yield* takeSnapshot({
        regions: [guest.region], path: join(dir, `thp-${collapseHugePages}.vmsnap`), poolPages: 1024,
        freeze: guest.freeze, thaw: guest.thaw, collapseHugePages
      })
      const after = anonHugeBytes(guest.region.hostBase)
      guest.stop()
      return { before, after, result }
    })
  )

describe.skipIf(unavailable)("transparent huge pages after a snapshot", () => {
  it("are split by the snapshot and rebuilt by MADV_COLLAPSE", async () => {
    const split = await snapshotThp(false)
    if (split.before < 32 * MiB) {
      console.warn(`SKIP huge page rebuild: the kernel gave only ${split.before / MiB} MiB of THP to a 64 MiB MADV_HUGEPAGE region`)
      return
    }
    expect(split.after).toBeLessThan(split.before / 2)
    const rebuilt = await snapshotThp(true)
    expect(rebuilt.result.collapse?.ok, rebuilt.result.collapse?.error ?? "").toBe(true)
    expect(rebuilt.after).toBeGreaterThanOrEqual(rebuilt.before * 0.9)
    console.log(`huge pages: ${rebuilt.before / MiB} MiB before, ${split.after / MiB} MiB left split, ${rebuilt.after / MiB} MiB after MADV_COLLAPSE (${rebuilt.result.collapse?.ms.toFixed(1)} ms)`)
  })
})
