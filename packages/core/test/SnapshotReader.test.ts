/**
 * Corrupt input: bytes flipped at many offsets and files truncated at many
 * lengths are rejected by verify and restore with a clear message; none is
 * restored as if valid.
 */
import { Cause, Effect, Exit } from "effect"
import { readdirSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { beforeAll, describe, expect, it } from "vitest"
// A writing guest from the test rig (tests only: core itself never imports the rig).
import { comparePages, DemoGuest, scratchMemory } from "../../rig/src/DemoGuest.js"
import { SnapshotFormatError } from "../src/Errors.js"
import { inspectSnapshot, verifySnapshot } from "../src/SnapshotReader.js"
import { restoreToMemory, restoreToRawFile } from "../src/SnapshotRestore.js"
import { takeSnapshot } from "../src/SnapshotSession.js"
import { runTest, skipReason, tempDir } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("corrupt input")
const dir = tempDir()
const good = join(dir, "good.vmsnap")
let original: Buffer

const outcome = async <A>(effect: Effect.Effect<A, unknown, any>) => {
  const exit = await Effect.runPromiseExit(effect as Effect.Effect<A, unknown>)
  return Exit.isSuccess(exit) ? { ok: true as const } : { ok: false as const, error: Cause.squash(exit.cause) }
}

describe.skipIf(unavailable)("corrupt and truncated snapshots", () => {
  beforeAll(async () => {
    // A small snapshot with data, zero, lz4 and raw records.
    await runTest(
      Effect.gen(function* () {
        const guest = yield* DemoGuest.make(2 * MiB, "anon")
        guest.fill(0, 256, 9)
        guest.setTarget(0, 256) // the upper half stays zero
        guest.start(1, 20000)
        yield* takeSnapshot({ regions: [guest.region], path: good, poolPages: 64, sweepPages: 32, compression: "lz4", freeze: guest.freeze, thaw: guest.thaw })
      })
    )
    original = readFileSync(good)
  })

  it("the intact file verifies and inspects", async () => {
    const report = await Effect.runPromise(verifySnapshot(good))
    expect(report.pages).toBe(512)
    expect(report.zeroPages).toBeGreaterThan(0)
    const info = await Effect.runPromise(inspectSnapshot(good))
    expect(info.regions[0]!.pages).toBe(512)
    expect(info.compressionRatio).toBeGreaterThan(1)
  })

  it("a flipped byte anywhere is rejected by verify and by restore", async () => {
    const bad = join(dir, "flipped.vmsnap")
    const step = Math.max(1, Math.floor(original.length / 400))
    const offsets = new Set<number>()
    for (let o = 0; o < original.length; o += step) offsets.add(o)
    for (let o = 0; o < 96; o++) offsets.add(o) // every header byte
    for (let o = original.length - 64; o < original.length; o++) offsets.add(o) // index tail, trailer
    let checked = 0
    for (const offset of offsets) {
      const copy = Buffer.from(original)
      copy[offset] = copy[offset]! ^ 0x5a
      writeFileSync(bad, copy)
      const v = await outcome(verifySnapshot(bad))
      expect(v.ok, `flip at ${offset} was accepted by verify`).toBe(false)
      if (!v.ok) {
        expect(v.error).toBeInstanceOf(SnapshotFormatError)
        expect((v.error as Error).message).toMatch(/not a valid snapshot/)
      }
      if (checked++ % 8 === 0) {
        const raw = join(dir, "flipped.raw")
        const r = await outcome(restoreToRawFile(bad, raw))
        expect(r.ok, `flip at ${offset} was restored`).toBe(false)
        expect(readdirSync(dir).filter((n) => n.includes("flipped.raw"))).toEqual([])
      }
    }
    expect(checked).toBeGreaterThan(400)
  })

  it("a file truncated at any length is rejected", async () => {
    const bad = join(dir, "truncated.vmsnap")
    const lengths = new Set<number>([0, 1, 7, 8, 63, 64, 100, original.length - 1, original.length - 32, original.length - 33])
    for (let l = 0; l < original.length; l += Math.max(1, Math.floor(original.length / 150))) lengths.add(l)
    for (const length of lengths) {
      writeFileSync(bad, original.subarray(0, length))
      const v = await outcome(verifySnapshot(bad))
      expect(v.ok, `truncated to ${length} was accepted`).toBe(false)
      if (!v.ok) expect(v.error).toBeInstanceOf(SnapshotFormatError)
    }
  })

  it("restore into memory refuses a corrupt file before writing anything", async () => {
    const bad = join(dir, "late-flip.vmsnap")
    const copy = Buffer.from(original)
    const at = original.length - 200 // the last records: a one-pass restore would have written the rest
    copy[at] = copy[at]! ^ 1
    writeFileSync(bad, copy)
    await runTest(
      Effect.gen(function* () {
        const target = yield* scratchMemory(2 * MiB)
        const zero = yield* scratchMemory(2 * MiB)
        const exit = yield* Effect.exit(restoreToMemory(bad, { hostBases: [target], targetIsZero: true }))
        expect(Exit.isFailure(exit)).toBe(true)
        expect(comparePages(target, zero, 2 * MiB)).toBe(-1)
      })
    )
  })

  it("a file that is not a snapshot is named as such", async () => {
    const other = join(dir, "other.txt")
    writeFileSync(other, "hello, this is not a snapshot".repeat(10))
    const v = await outcome(verifySnapshot(other))
    expect(v.ok).toBe(false)
    if (!v.ok) expect((v.error as Error).message).toMatch(/not a vmsnap snapshot file/)
  })
})
