/**
 * The engine service against the real kernel: probe, the engine's batches
 * (every page exactly once, with its region and page index), a region the
 * engine refuses with a NativeError, options refused in their own words, and
 * counters that add up.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { DemoGuest } from "../../rig/src/DemoGuest.js"
import { InvalidInput, NativeError } from "../src/Errors.js"
import { hva } from "../src/GuestMemory.js"
import { loadWp } from "../src/internal/ffi.js"
import { PAGE_ZERO, WpNative } from "../src/WpNative.js"
import { closeSync } from "node:fs"
import { runTest, skipReason } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("WpNative")

describe.skipIf(unavailable)("WpNative", () => {
  it("probe reports write-protect of unpopulated pages", async () => {
    const caps = await runTest(Effect.flatMap(WpNative, (n) => n.probe))
    expect(caps.writeProtect && caps.writeProtectUnpopulated).toBe(true)
  })

  it("batches give every page of every region once, with region and page index; contents match", async () => {
    const seen = await runTest(
      Effect.gen(function* () {
        const a = yield* DemoGuest.make(2 * MiB, "anon")
        const b = yield* DemoGuest.make(1 * MiB, "memfd")
        a.fill(0, 128, 3) // first half data, second half never touched
        b.fill(0, 256, 4)
        const regions = [a.region, b.region]
        const engine = yield* (yield* WpNative).engine({ regions, poolPages: 64 })
        yield* engine.protect()
        const out = { data: Buffer.alloc(64 * 4096), regions: new Uint32Array(64), pages: new BigUint64Array(64), flags: new Uint8Array(64) }
        const seen = regions.map((r) => new Uint8Array(r.size / 4096))
        const dataPages = [0, 0]
        while (!engine.doneSync()) {
          const n = engine.nextBatchSync(out)
          for (let i = 0; i < n; i++) {
            seen[out.regions[i]!]![Number(out.pages[i]!)]! += 1
            if (out.flags[i] !== PAGE_ZERO) dataPages[out.regions[i]!]! += 1
          }
        }
        const stats = engine.statsSync()
        expect(stats.pagesSaved).toBe(stats.pagesTotal)
        expect(stats.pagesTotal).toBe(768)
        expect(dataPages).toEqual([128, 256])
        return seen
      })
    )
    for (const r of seen) expect(r.every((c) => c === 1)).toBe(true)
  })

  it("engine options are checked with their own words (break1 finding 7): a fault-around that is not a power of two, a pool bigger than the guest", async () => {
    const [around, slots] = await runTest(
      Effect.gen(function* () {
        const g = yield* DemoGuest.make(1 * MiB, "anon")
        const native = yield* WpNative
        const around = yield* Effect.flip(native.engine({ regions: [g.region], poolPages: 16, faultAroundPages: 3 }))
        // 2^26 pages (256 GiB) for a 1 MiB guest: "userfaultfd: out of memory" before; the guest's 256 pages are enough.
        const engine = yield* native.engine({ regions: [g.region], poolPages: 1 << 26 })
        return [around, engine.statsSync().poolSlots] as const
      })
    )
    expect(around).toBeInstanceOf(InvalidInput)
    expect(around.message).toMatch(/faultAroundPages 3: the pages saved with each faulting page must be a power of two from 1 to 512/)
    expect(slots).toBe(256)
  })

  it("memory over the bound is refused before anything is registered (break8: sparse terabytes took the host's memory in page tables)", async () => {
    const [over, under] = await runTest(
      Effect.gen(function* () {
        const g = yield* DemoGuest.make(1 * MiB, "anon")
        const native = yield* WpNative
        const over = yield* Effect.flip(native.engine({ regions: [g.region], poolPages: 16, maxGuestBytes: MiB - 4096 }))
        const under = yield* native.engine({ regions: [g.region], poolPages: 16, maxGuestBytes: MiB })
        return [over, under.statsSync().poolSlots] as const
      })
    )
    expect(over).toBeInstanceOf(InvalidInput)
    expect(over.message).toMatch(/the memory to protect is 1\.00 MiB, more than the 1020\.0 KiB vmsnap write-protects at once \(the bound given\)/)
    expect(over.message).toMatch(/raise the bound \(maxGuestBytes; vmsnap agent and snapshot: --max-guest-size\)/)
    expect(under).toBe(16)
  })

  it("a region that is not mapped fails with a NativeError, nothing left registered", async () => {
    const error = await runTest(
      Effect.flip(
        Effect.flatMap(WpNative, (n) =>
          n.engine({ regions: [{ guestBase: 0n as never, hostBase: hva(0x7f0000000000n), size: 4096 * 16, kind: "anon" }], poolPages: 16 })
        )
      )
    )
    expect(error).toBeInstanceOf(NativeError)
    expect((error as NativeError).op).toBe("register")
  })

  it("memory held by another userfaultfd (a lazy restore still serving it): the error says so, not 'already running'", async () => {
    const error = await runTest(
      Effect.gen(function* () {
        const g = yield* DemoGuest.make(1 * MiB, "anon")
        const uffd: number = loadWp().wp_restore_uffd_create([g.region.hostBase, BigInt(g.region.size), 0])
        expect(uffd).toBeGreaterThanOrEqual(0)
        yield* Effect.addFinalizer(() => Effect.sync(() => closeSync(uffd)))
        return yield* Effect.flip((yield* WpNative).engine({ regions: [g.region], poolPages: 16 }))
      })
    )
    expect(error).toBeInstanceOf(NativeError)
    expect((error as NativeError).errno).toBe(16)
    expect((error as NativeError).reason).toMatch(/already registered with another userfaultfd.*lazy restore/)
  })
})
