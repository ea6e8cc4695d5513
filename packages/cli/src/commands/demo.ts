/**
 * `vmsnap demo`: the main job on the built-in guest. Writer threads keep
 * writing guest memory while a live snapshot is taken with a freeze at the
 * cut; the snapshot is verified, compared byte for byte with a reference copy
 * taken at the cut, restored, and compared again.
 */
import {
  comparePages, DemoGuest, faultBucketLowerNs, formatBytes, type GuestLatency, copyFromHva, type MemoryKind,
  PAGE_SIZE, Phase, restoreToMemory, scratchMemory, summarizeUs, takeSnapshot, verifySnapshot, walkRecords, openSnapshot, WpNative
} from "@vmsnap/core"
import { Effect } from "effect"
import { unlink } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CommonFlags, runCommand } from "../Run.js"

export interface DemoFlags extends CommonFlags {
  readonly size: number
  readonly writers: number
  readonly rate: number
  readonly buffer: number
  readonly output: string | undefined
  readonly keep: boolean
  readonly memory: MemoryKind
  readonly warmupMs: number
  readonly faultAroundPages: number
}

/** Compares every record of the file with the reference copy, page range by page range. */
const snapshotEqualsReference = (path: string, referenceBase: bigint) =>
  Effect.scoped(
    Effect.gen(function* () {
      const s = yield* openSnapshot(path)
      let mismatches = 0
      const zero = Buffer.alloc(256 * PAGE_SIZE)
      yield* walkRecords(s, (rec) =>
        Effect.sync(() => {
          const bytes = rec.header.pageCount * PAGE_SIZE
          const expected = Buffer.allocUnsafe(bytes)
          copyFromHva(expected, referenceBase + BigInt(rec.header.firstPage * PAGE_SIZE))
          if (rec.pages) {
            if (!rec.pages.equals(expected)) mismatches++
          } else {
            for (let o = 0; o < bytes; o += zero.length)
              if (!zero.subarray(0, Math.min(zero.length, bytes - o)).equals(expected.subarray(o, o + Math.min(zero.length, bytes - o)))) {
                mismatches++
                break
              }
          }
        })
      )
      return mismatches === 0
    })
  )

const latencyJson = (l: GuestLatency) => ({ p50: l.p50, p99: l.p99, p999: l.p999, max: l.max, writes: l.writes })

export const demoProgram = (flags: DemoFlags, onProgress: (done: number, total: number) => void) =>
  Effect.scoped(
    Effect.gen(function* () {
      const native = yield* WpNative
      yield* native.probe
      const guest = yield* DemoGuest.make(flags.size, flags.memory)
      // A quarter of the guest is never touched before the cut: zero pages.
      const populated = Math.floor((guest.pages * 3) / 4)
      guest.fill(0, populated, 0x5eed)
      guest.prepareReference()
      guest.setPhase(Phase.before)
      guest.start(flags.writers, flags.rate)
      yield* Effect.sleep(flags.warmupMs)

      const path = flags.output ?? join(tmpdir(), `vmsnap-demo-${process.pid}-${Date.now()}.vmsnap`)
      if (!flags.output && !flags.keep) yield* Effect.addFinalizer(() => Effect.promise(() => unlink(path).catch(() => undefined)))
      let referenceMs = 0
      const result = yield* takeSnapshot({
        regions: [guest.region],
        path,
        poolPages: Math.floor(flags.buffer / PAGE_SIZE),
        faultAroundPages: flags.faultAroundPages,
        freeze: guest.freeze,
        thaw: Effect.andThen(guest.thaw, Effect.sync(() => guest.setPhase(Phase.during))),
        atCut: Effect.gen(function* () {
          const t = performance.now()
          yield* guest.takeReference
          referenceMs = performance.now() - t
        }),
        onProgress: (saved, total) => onProgress(saved * PAGE_SIZE, total * PAGE_SIZE)
      })
      guest.setPhase(Phase.after)
      yield* Effect.sleep(Math.min(flags.warmupMs, 500))
      guest.stop()
      const before = guest.latency(Phase.before)
      const during = guest.latency(Phase.during)
      const after = guest.latency(Phase.after)

      const verified = yield* verifySnapshot(path)
      const snapshotMatches = yield* snapshotEqualsReference(path, guest.referenceHva)
      const target = yield* scratchMemory(flags.size)
      yield* restoreToMemory(path, { hostBases: [target], targetIsZero: true })
      const restoreMatches = comparePages(target, guest.referenceHva, flags.size) === -1
      const fault = summarizeUs(result.engine.faultHistogram, result.engine.faultNsMax, faultBucketLowerNs)
      return { flags, path, result, referenceMs, verified, snapshotMatches, restoreMatches, before, during, after, fault }
    })
  )

export const demoCommand = (io: Io, flags: DemoFlags) => {
  const bar = progressBar(io, "snapshot", !flags.json)
  return runCommand(io, flags, demoProgram(flags, bar.update), (d) => {
    bar.done()
    const r = d.result
    const consistent = d.snapshotMatches && d.restoreMatches
    const throughputMBps = r.sizeBytes / 1e6 / (r.durationMs / 1000)
    const kept = flags.output !== undefined || flags.keep
    const ratio = d.before.writesPerSecond > 0 ? d.during.writesPerSecond / d.before.writesPerSecond : 0
    const json = {
      ok: consistent,
      consistent,
      snapshotMatchesReference: d.snapshotMatches,
      restoreMatchesReference: d.restoreMatches,
      sizeBytes: r.sizeBytes,
      pauseMs: round(r.pauseMs, 3),
      referenceCopyMs: round(d.referenceMs, 1),
      durationMs: round(r.durationMs, 1),
      throughputMBps: round(throughputMBps, 1),
      fileBytes: r.fileBytes,
      compressionRatio: round(d.verified.dataPages * PAGE_SIZE / Math.max(1, d.verified.storedBytes), 2),
      records: r.records,
      faults: r.engine.faults,
      faultAroundPages: flags.faultAroundPages,
      pagesSavedAround: r.engine.pagesFaultAround,
      fallbacks: r.engine.fallbacks,
      fallbackMs: round(r.engine.fallbackNs / 1e6, 2),
      poolPages: r.engine.poolSlots,
      poolHighWater: r.engine.poolHighWater,
      faultServiceUs: { p50: d.fault.p50, p99: d.fault.p99, max: d.fault.max },
      path: kept ? d.path : null,
      guest: {
        kind: "threads",
        processes: 1,
        memory: flags.memory,
        writers: flags.writers,
        ratePagesPerSecond: flags.rate,
        writeLatencyUs: { before: latencyJson(d.before), during: latencyJson(d.during), after: latencyJson(d.after) },
        writesPerSecond: { before: Math.round(d.before.writesPerSecond), during: Math.round(d.during.writesPerSecond), after: Math.round(d.after.writesPerSecond) },
        throughputRatioDuring: round(ratio, 3)
      }
    }
    const lat = (l: GuestLatency) => `p50 ${l.p50} us  p99 ${l.p99} us  max ${l.max} us  (${Math.round(l.writesPerSecond).toLocaleString("en-US")} writes/s)`
    const human = [
      `vmsnap demo: live snapshot of a ${formatBytes(r.sizeBytes)} ${flags.memory} guest, ${flags.writers} writer threads${flags.rate ? ` at ${flags.rate} pages/s` : " flat out"}`,
      `  result      ${consistent ? "CONSISTENT: snapshot and restore equal the reference copy taken at the cut" : "INCONSISTENT: the snapshot differs from the reference copy"}`,
      `  pause       ${r.pauseMs.toFixed(2)} ms (write-protect at the cut; reference copy for this check took another ${d.referenceMs.toFixed(0)} ms)`,
      `  snapshot    ${(r.durationMs / 1000).toFixed(2)} s, ${throughputMBps.toFixed(0)} MB/s, file ${formatBytes(r.fileBytes)} (${json.compressionRatio}x on data pages)`,
      `  faults      ${r.engine.faults} served (p50 ${d.fault.p50} us, p99 ${d.fault.p99} us), ${r.engine.pagesFaultAround} neighbours saved with them, ${r.engine.fallbacks} fallbacks, pool high water ${r.engine.poolHighWater}/${r.engine.poolSlots} pages`,
      `  guest write latency`,
      `    before    ${lat(d.before)}`,
      `    during    ${lat(d.during)}`,
      `  ${kept ? `kept ${d.path}` : "snapshot file removed (use --keep or -o FILE to keep it)"}`
    ].join("\n")
    return { json, human, exitCode: consistent ? 0 : 1 }
  })
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits
