/**
 * Point-in-time consistency against the real kernel: writer threads keep
 * writing during the snapshot, and the snapshot (verified and restored)
 * equals, byte for byte, a reference copy taken at the cut.
 */
import { Effect } from "effect"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
// A writing guest from the test rig (tests only: core itself never imports the rig).
import { comparePages, DemoGuest, scratchMemory } from "../../rig/src/DemoGuest.js"
import type { MemoryKind } from "../src/GuestMemory.js"
import { inspectSnapshot, verifySnapshot } from "../src/SnapshotReader.js"
import type { Compression } from "../src/SnapshotWriter.js"
import { restoreToMemory, restoreToRawFile } from "../src/SnapshotRestore.js"
import { takeSnapshot } from "../src/SnapshotSession.js"
import { readFileSync } from "node:fs"
import { runTest, skipReason, tempDir } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("snapshot consistency")
const dir = tempDir()

const snapshotWhileWriting = (
  kind: MemoryKind,
  options: { size: number; poolPages: number; writerDelayMs?: number; faultAroundPages?: number; arm?: boolean; freezeDelayMs?: number; compression?: Compression }
) =>
  Effect.gen(function* () {
    const guest = yield* DemoGuest.make(options.size, kind)
    const pages = guest.pages
    // The upper half is never touched before the cut: the writers only move there after it.
    guest.fill(0, pages / 2, 42)
    guest.setTarget(0, pages / 2)
    guest.start(2, 0)
    yield* Effect.sleep(30)
    const path = join(dir, `${kind}-${options.poolPages}-${options.compression ?? "default"}.vmsnap`)
    const result = yield* takeSnapshot({
      regions: [guest.region],
      path,
      poolPages: options.poolPages,
      faultAroundPages: options.faultAroundPages,
      arm: options.arm,
      writerDelayMs: options.writerDelayMs,
      compression: options.compression,
      freeze: Effect.andThen(Effect.sleep(options.freezeDelayMs ?? 0), guest.freeze),
      thaw: guest.thaw,
      atCut: Effect.andThen(guest.takeReference, Effect.sync(() => guest.setTarget(0, pages)))
    })
    const writtenUnpopulated = guest.countWrittenUnpopulated()
    guest.stop()
    const report = yield* verifySnapshot(path)
    const target = yield* scratchMemory(options.size)
    yield* restoreToMemory(path, { hostBases: [target], targetIsZero: true })
    const restoredDiff = comparePages(target, guest.referenceHva, options.size)
    const rawPath = join(dir, `${kind}.raw`)
    yield* restoreToRawFile(path, rawPath)
    const raw = readFileSync(rawPath)
    const rawTarget = yield* scratchMemory(options.size)
    const { loadWp } = yield* Effect.promise(() => import("../src/internal/ffi.js"))
    loadWp().wp_copy_to_hva([rawTarget, raw, BigInt(raw.length)])
    const rawDiff = comparePages(rawTarget, guest.referenceHva, options.size)
    const inspected = yield* inspectSnapshot(path)
    return { result, report, restoredDiff, rawDiff, writtenUnpopulated, records: inspected.encodings, version: inspected.version }
  })

describe.skipIf(unavailable)("live snapshot consistency", () => {
  for (const kind of ["anon", "anon-thp", "memfd"] as const) {
    it(`${kind}: snapshot equals the reference at the cut while writers race it`, async () => {
      const { result, report, restoredDiff, rawDiff, writtenUnpopulated } = await runTest(
        snapshotWhileWriting(kind, { size: 64 * MiB, poolPages: 1024 })
      )
      expect(restoredDiff).toBe(-1)
      expect(rawDiff).toBe(-1)
      expect(report.pages).toBe((64 * MiB) / 4096)
      // The writers really did race the snapshot...
      expect(result.engine.faults).toBeGreaterThan(0)
      // ...including into pages never touched before the cut, which the snapshot holds as zero.
      expect(writtenUnpopulated).toBeGreaterThan(0)
      expect(result.engine.pagesSaved).toBe(report.pages)
      // Fault-around (default 16 pages) saved neighbours of faulting pages.
      expect(result.engine.pagesFaultAround).toBeGreaterThan(0)
    })
  }

  it("armed ahead of the cut (the default): only pages written since arming are re-protected", async () => {
    // The freeze waits 20 ms after arming, so the writers certainly write while armed.
    const { result, restoredDiff } = await runTest(snapshotWhileWriting("anon", { size: 64 * MiB, poolPages: 1024, freezeDelayMs: 20 }))
    expect(restoredDiff).toBe(-1)
    expect(result.engine.cutPages).toBeGreaterThan(0) // the writers did write while armed
    expect(result.engine.cutPages).toBeLessThan((64 * MiB) / 4096 / 2)
  })

  it("not armed: the cut protects everything, still exact", async () => {
    const { result, restoredDiff } = await runTest(snapshotWhileWriting("memfd", { size: 32 * MiB, poolPages: 1024, arm: false }))
    expect(restoredDiff).toBe(-1)
    expect(result.engine.armFaults).toBe(0)
    expect(result.engine.cutPages).toBe(0)
  })

  it("fault-around off: exact snapshot, every captured page accounted to a fault or the sweep", async () => {
    const { result, restoredDiff } = await runTest(snapshotWhileWriting("anon", { size: 32 * MiB, poolPages: 1024, faultAroundPages: 1 }))
    expect(restoredDiff).toBe(-1)
    expect(result.engine.pagesFaultAround).toBe(0)
    expect(result.engine.faults + result.engine.pagesSwept).toBe((32 * MiB) / 4096)
  })

  it("synchronous fallback: a 4-slot pool and a slow writer still give an exact snapshot", async () => {
    const { result, restoredDiff } = await runTest(snapshotWhileWriting("anon", { size: 16 * MiB, poolPages: 4, writerDelayMs: 2 }))
    expect(restoredDiff).toBe(-1)
    expect(result.engine.fallbacks).toBeGreaterThan(0)
    expect(result.engine.fallbackNs).toBeGreaterThan(0)
    expect(result.engine.poolHighWater).toBeLessThanOrEqual(4)
    expect(result.engine.overflowPages).toBe(0)
  })

  it("no pool (synchronous mode): exact snapshot", async () => {
    const { restoredDiff, result } = await runTest(snapshotWhileWriting("anon", { size: 16 * MiB, poolPages: 0 }))
    expect(restoredDiff).toBe(-1)
    expect(result.engine.poolSlots).toBe(0)
  })

  // The guest's pages are compressible (stamped), so lz4 blocks are smaller than raw ones. Data records are encoding 3 ("pages") whatever the compression.
  it("compression auto, lz4 and none: each exact; lz4 writes no raw block, none no lz4 one (auto's choice: packages/wp-native/test/test_writer.c)", async () => {
    const auto = await runTest(snapshotWhileWriting("anon", { size: 64 * MiB, poolPages: 1024, compression: "auto" }))
    expect(auto.restoredDiff).toBe(-1)
    expect(auto.version).toBe(2)
    expect(auto.records.pages.lz4 + auto.records.pages.raw).toBeGreaterThan(0)
    expect(auto.records.lz4 + auto.records.raw).toBe(0)
    const lz4 = await runTest(snapshotWhileWriting("anon", { size: 32 * MiB, poolPages: 1024, compression: "lz4" }))
    expect(lz4.restoredDiff).toBe(-1)
    expect(lz4.records.pages.raw).toBe(0)
    expect(lz4.records.pages.lz4).toBeGreaterThan(0)
    const none = await runTest(snapshotWhileWriting("memfd", { size: 32 * MiB, poolPages: 1024, compression: "none" }))
    expect(none.restoredDiff).toBe(-1)
    expect(none.records.pages.lz4).toBe(0)
    expect(none.records.pages.raw).toBeGreaterThan(0)
  })
})
