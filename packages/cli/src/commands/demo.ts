/**
 * `vmsnap demo`: the main job. By default the toy VMM runs a guest in its own
 * process (a KVM guest when /dev/kvm works) and hands its memory to an agent
 * in this process, which takes a live snapshot with a freeze at the cut; the
 * snapshot is verified, compared byte for byte with the reference copy the
 * VMM took at the cut, restored, and compared again. `--guest threads` runs
 * writer threads in this process instead.
 */
import {
  agentScoped, comparePages, copyFromHva, DemoGuest, faultBucketLowerNs, formatBytes, InvalidInput,
  type MemoryKind, openSnapshot, PAGE_SIZE, Phase, type PhaseReport, restoreToMemory, restoreToRawFile, scratchMemory,
  type SnapshotResult, summarizeUs, takeSnapshot, ToyVmm, type VerifyReport, walkRecords, WpNative
} from "@vmsnap/core"
import { Effect } from "effect"
import { closeSync, existsSync, fstatSync, mkdtempSync, openSync, readSync, rmSync } from "node:fs"
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
  /** Pool capacity in 4 KiB pages (0: synchronous). */
  readonly poolPages: number
  readonly output: string | undefined
  readonly keep: boolean
  readonly memory: MemoryKind
  readonly warmupMs: number
  readonly faultAroundPages: number
  /** vmm: the toy VMM in its own process, through the agent; threads: writer threads in this process. */
  readonly guest: "vmm" | "threads"
  /** With the toy VMM: a second process writing the same memfd. */
  readonly device: boolean
}

/**
 * Verifies the file (structure, every checksum, every page once) and, in the
 * same pass, compares every record with the reference copy.
 */
const verifyAgainstReference = (path: string, expected: (firstPage: number, bytes: number) => Buffer) =>
  Effect.scoped(
    Effect.gen(function* () {
      const s = yield* openSnapshot(path)
      let mismatches = 0
      const verified = yield* walkRecords(s, (rec) =>
        Effect.sync(() => {
          const bytes = rec.header.pageCount * PAGE_SIZE
          const want = expected(rec.header.firstPage, bytes)
          const got = rec.pages ?? Buffer.alloc(bytes)
          if (!got.equals(want)) mismatches++
        })
      )
      return { verified, snapshotMatches: mismatches === 0 }
    })
  )

/** Two files hold the same bytes (a sparse raw image reads zero in its holes). */
const filesEqual = (a: string, b: string): boolean => {
  const fa = openSync(a, "r")
  const fb = openSync(b, "r")
  try {
    if (fstatSync(fa).size !== fstatSync(fb).size) return false
    const ba = Buffer.alloc(8 << 20)
    const bb = Buffer.alloc(8 << 20)
    for (let pos = 0; ; pos += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, pos)
      const nb = readSync(fb, bb, 0, bb.length, pos)
      if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) return false
      if (na === 0) return true
    }
  } finally {
    closeSync(fa)
    closeSync(fb)
  }
}

interface Latency {
  readonly p50: number
  readonly p99: number
  readonly p999: number
  readonly max: number
  readonly writes: number
  readonly writesPerSecond: number
}

interface DemoOutcome {
  readonly path: string
  readonly result: SnapshotResult
  readonly referenceMs: number | undefined
  readonly verified: VerifyReport
  readonly snapshotMatches: boolean
  readonly restoreMatches: boolean
  readonly before: Latency
  readonly during: Latency
  readonly guestKind: "kvm" | "threads"
  readonly whyThreads: string
  readonly processes: number
}

const snapshotPath = (flags: DemoFlags) =>
  Effect.gen(function* () {
    const path = flags.output ?? join(tmpdir(), `vmsnap-demo-${process.pid}-${Date.now()}.vmsnap`)
    if (!flags.output && !flags.keep) yield* Effect.addFinalizer(() => Effect.promise(() => unlink(path).catch(() => undefined)))
    return path
  })

/** The built-in guest in this process: writer threads over memory we map. */
const threadsDemo = (flags: DemoFlags, onProgress: (done: number, total: number) => void) =>
  Effect.gen(function* () {
    const guest = yield* DemoGuest.make(flags.size, flags.memory)
    // A quarter of the guest is never touched before the cut: zero pages.
    guest.fill(0, Math.floor((guest.pages * 3) / 4), 0x5eed)
    guest.prepareReference()
    guest.setPhase(Phase.before)
    guest.start(flags.writers, flags.rate)
    yield* Effect.sleep(flags.warmupMs)
    const path = yield* snapshotPath(flags)
    let referenceMs = 0
    const result = yield* takeSnapshot({
      regions: [guest.region],
      path,
      poolPages: flags.poolPages,
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
    const reference = guest.referenceHva
    const { verified, snapshotMatches } = yield* verifyAgainstReference(path, (firstPage, bytes) => {
      const b = Buffer.allocUnsafe(bytes)
      copyFromHva(b, reference + BigInt(firstPage * PAGE_SIZE))
      return b
    })
    const target = yield* scratchMemory(flags.size)
    yield* restoreToMemory(path, { hostBases: [target], targetIsZero: true })
    const restoreMatches = comparePages(target, reference, flags.size) === -1
    return {
      path, result, referenceMs, verified, snapshotMatches, restoreMatches,
      before: guest.latency(Phase.before), during: guest.latency(Phase.during),
      guestKind: "threads", whyThreads: "--guest threads", processes: 1
    } satisfies DemoOutcome
  })

/** The toy VMM in its own process (a KVM guest when /dev/kvm works), through the agent. */
const vmmDemo = (flags: DemoFlags, onProgress: (done: number, total: number) => void) =>
  Effect.gen(function* () {
    const work = yield* Effect.acquireRelease(
      // The reference copy and the restored image live in RAM when they can: writing them is not what we measure.
      Effect.sync(() => mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "vmsnap-demo-"))),
      (dir) => Effect.sync(() => rmSync(dir, { recursive: true, force: true }))
    )
    const socket = join(work, "agent.sock")
    const referencePath = join(work, "reference.img")
    const agent = yield* agentScoped(socket)
    const vmm = yield* Effect.acquireRelease(
      Effect.try({
        try: () =>
          new ToyVmm({
            memMiB: flags.size / (1024 * 1024), vcpus: flags.writers, rate: flags.rate, anon: flags.memory === "anon",
            agent: socket, vm: "demo", reference: referencePath, device: flags.device, fillPercent: 75
          }),
        catch: (e) => new InvalidInput({ reason: e instanceof Error ? e.message : String(e) })
      }),
      (v) => Effect.promise(() => v.stop().catch(() => undefined))
    )
    const ready = yield* Effect.tryPromise({ try: () => vmm.ready, catch: (e) => new InvalidInput({ reason: String(e instanceof Error ? e.message : e) }) })
    yield* Effect.sleep(flags.warmupMs)
    const path = yield* snapshotPath(flags)
    const result = yield* agent.snapshot(
      { vm: "demo", path, poolPages: flags.poolPages, faultAroundPages: flags.faultAroundPages },
      onProgress
    )
    yield* Effect.sleep(Math.min(flags.warmupMs, 500))
    const report = yield* Effect.promise(() => vmm.stop())
    const ref = openSync(referencePath, "r")
    yield* Effect.addFinalizer(() => Effect.sync(() => closeSync(ref)))
    const { verified, snapshotMatches } = yield* verifyAgainstReference(path, (firstPage, bytes) => {
      const b = Buffer.alloc(bytes)
      readSync(ref, b, 0, bytes, firstPage * PAGE_SIZE)
      return b
    })
    const rawPath = join(work, "restored.img")
    yield* restoreToRawFile(path, rawPath)
    const restoreMatches = filesEqual(rawPath, referencePath)
    const phase = (p: PhaseReport): Latency => ({ ...p.latencyUs, writes: p.writes, writesPerSecond: p.writesPerSecond })
    return {
      path, result, referenceMs: undefined, verified, snapshotMatches, restoreMatches,
      before: phase(report.phases.before), during: phase(report.phases.during),
      guestKind: ready.kind, whyThreads: report.whyThreads, processes: ready.pids.length
    } satisfies DemoOutcome
  })

export const demoProgram = (flags: DemoFlags, onProgress: (done: number, total: number) => void) =>
  Effect.scoped(
    Effect.gen(function* () {
      const native = yield* WpNative
      yield* native.probe
      return yield* (flags.guest === "vmm" ? vmmDemo(flags, onProgress) : threadsDemo(flags, onProgress))
    })
  )

const latencyJson = (l: Latency) => ({ p50: l.p50, p99: l.p99, p999: l.p999, max: l.max, writes: l.writes })

export const demoCommand = (io: Io, flags: DemoFlags) => {
  const bar = progressBar(io, "snapshot", !flags.json)
  return runCommand(io, flags, demoProgram(flags, bar.update), (d) => {
    bar.done()
    const r = d.result
    const fault = summarizeUs(r.engine.faultHistogram, r.engine.faultNsMax, faultBucketLowerNs)
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
      armMs: round(r.armMs, 1),
      pagesWrittenWhileArmed: r.engine.cutPages,
      referenceCopyMs: d.referenceMs === undefined ? null : round(d.referenceMs, 1),
      durationMs: round(r.durationMs, 1),
      throughputMBps: round(throughputMBps, 1),
      fileBytes: r.fileBytes,
      compressionRatio: round((d.verified.dataPages * PAGE_SIZE) / Math.max(1, d.verified.storedBytes), 2),
      records: r.records,
      faults: r.engine.faults,
      faultAroundPages: flags.faultAroundPages,
      pagesSavedAround: r.engine.pagesFaultAround,
      fallbacks: r.engine.fallbacks,
      fallbackMs: round(r.engine.fallbackNs / 1e6, 2),
      poolPages: r.engine.poolSlots,
      poolHighWater: r.engine.poolHighWater,
      hugePagesRebuilt: r.collapse,
      faultServiceUs: { p50: fault.p50, p99: fault.p99, max: fault.max },
      path: kept ? d.path : null,
      guest: {
        kind: d.guestKind,
        whyThreads: d.guestKind === "threads" ? d.whyThreads : null,
        processes: d.processes,
        memory: flags.memory,
        writers: flags.writers,
        ratePagesPerSecond: flags.rate,
        writeLatencyUs: { before: latencyJson(d.before), during: latencyJson(d.during) },
        writesPerSecond: { before: Math.round(d.before.writesPerSecond), during: Math.round(d.during.writesPerSecond) },
        throughputRatioDuring: round(ratio, 3)
      }
    }
    const lat = (l: Latency) => `p50 ${l.p50} us  p99 ${l.p99} us  max ${l.max} us  (${Math.round(l.writesPerSecond).toLocaleString("en-US")} writes/s)`
    const who =
      d.guestKind === "kvm"
        ? `a KVM guest (toy VMM, ${flags.writers} vCPU${flags.writers > 1 ? "s" : ""}${d.processes > 1 ? ", plus a device process" : ""})`
        : flags.guest === "vmm"
          ? `the toy VMM on host threads (${d.whyThreads})`
          : `${flags.writers} writer threads in this process`
    const human = [
      `vmsnap demo: live snapshot of ${formatBytes(r.sizeBytes)} of ${flags.memory} memory of ${who}, writing ${flags.rate ? `${flags.rate} pages/s` : "as fast as it can"}`,
      `  result      ${consistent ? "CONSISTENT: snapshot and restore equal the reference copy taken at the cut" : "INCONSISTENT: the snapshot differs from the reference copy"}`,
      `  pause       ${r.pauseMs.toFixed(2)} ms at the cut (re-protecting ${r.engine.cutPages} pages written since arming, which took ${r.armMs.toFixed(0)} ms while the guest ran${d.referenceMs === undefined ? "" : `; the reference copy for this check took another ${d.referenceMs.toFixed(0)} ms`})`,
      `  snapshot    ${(r.durationMs / 1000).toFixed(2)} s, ${throughputMBps.toFixed(0)} MB/s, file ${formatBytes(r.fileBytes)} (${json.compressionRatio}x on data pages)`,
      `  faults      ${r.engine.faults} served (p50 ${fault.p50} us, p99 ${fault.p99} us), ${r.engine.pagesFaultAround} neighbours saved with them, ${r.engine.fallbacks} fallbacks, pool high water ${r.engine.poolHighWater}/${r.engine.poolSlots} pages`,
      `  guest write latency, as the guest measured it`,
      `    before    ${lat(d.before)}`,
      `    during    ${lat(d.during)}`,
      `  ${kept ? `kept ${d.path}` : "snapshot file removed (use --keep or -o FILE to keep it)"}`
    ].join("\n")
    return { json, human, exitCode: consistent ? 0 : 1 }
  })
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits
