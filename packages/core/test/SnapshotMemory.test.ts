/**
 * Memory bound: taking a snapshot of a large region costs the pool plus a
 * small constant, measured from the process's own peak RSS (VmHWM), not by
 * timing. fork()-style copy-on-write would cost up to the whole region.
 */
import { Effect } from "effect"
import { readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
// A writing guest from the test rig (tests only: core itself never imports the rig).
import { DemoGuest } from "../../rig/src/DemoGuest.js"
import { takeSnapshot } from "../src/SnapshotSession.js"
import { runTest, skipReason, tempDir } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("memory bound")
const dir = tempDir()

const statusKiB = (field: string): number => {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"))
  return Number(m?.[1] ?? NaN)
}

describe.skipIf(unavailable)("memory bound", () => {
  it("peak extra RSS stays within the pool plus a small constant", async () => {
    const size = 768 * MiB
    const poolPages = 4096 // 16 MiB
    // V8 grows its young generation (up to ~32 MiB) under the writer's allocation rate.
    const constantBytes = 64 * MiB
    const { extra, result } = await runTest(
      Effect.gen(function* () {
        const guest = yield* DemoGuest.make(size, "anon")
        guest.fill(0, guest.pages, 5)
        guest.start(2, 200_000)
        yield* Effect.sleep(50)
        // Warm-up snapshot: loads lz4, ffi, and JIT-compiles the writer.
        yield* takeSnapshot({ regions: [guest.region], path: join(dir, "warm.vmsnap"), poolPages, freeze: guest.freeze, thaw: guest.thaw })
        ;(globalThis as { gc?: () => void }).gc?.()
        writeFileSync("/proc/self/clear_refs", "5") // reset VmHWM to the current RSS
        const baseline = statusKiB("VmRSS") * 1024
        const result = yield* takeSnapshot({ regions: [guest.region], path: join(dir, "big.vmsnap"), poolPages, freeze: guest.freeze, thaw: guest.thaw })
        const peak = statusKiB("VmHWM") * 1024
        guest.stop()
        return { extra: peak - baseline, result }
      })
    )
    console.log(`memory bound: peak extra RSS ${(extra / MiB).toFixed(1)} MiB for a ${size / MiB} MiB guest, pool ${(poolPages * 4096) / MiB} MiB, ${result.engine.faults} faults, high water ${result.engine.poolHighWater} slots`)
    expect(result.engine.faults).toBeGreaterThan(0)
    expect(extra).toBeLessThanOrEqual(poolPages * 4096 + constantBytes)
  })
})
