/**
 * The program behind `vmsnap demo`. By default the toy VMM runs a guest in
 * its own process (a KVM guest when /dev/kvm works) and hands its memory to
 * an agent in this process, which takes a live snapshot with a freeze at the
 * cut; the snapshot is verified, compared byte for byte with the reference
 * copy the VMM took at the cut, restored, and compared again. `--guest
 * threads` runs writer threads in this process instead.
 */
import {
  agentScoped, InvalidInput, type MemoryKind, openSnapshot, PAGE_SIZE, restoreToMemory, restoreToRawFile, type SnapshotResult,
  takeSnapshot, type VerifyReport, walkRecords, WpNative
} from "@vmsnap/core"
import { comparePages, copyFromHva, DemoGuest, Phase, type PhaseReport, scratchMemory, ToyVmm } from "@vmsnap/rig"
import { Effect } from "effect"
import { closeSync, existsSync, fstatSync, mkdtempSync, openSync, readSync, rmSync } from "node:fs"
import { unlink } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import type { CommonFlags } from "./Run.js"

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

export interface Latency {
  readonly p50: number
  readonly p99: number
  readonly p999: number
  readonly max: number
  readonly writes: number
  readonly writesPerSecond: number
}

export interface DemoOutcome {
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
            memMiB: flags.size / (1024 * 1024), vcpus: flags.writers, rate: flags.rate, anon: flags.memory === "anon", hugetlb: flags.memory === "hugetlbfs",
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
