/**
 * `vmsnap bench --target qemu`: one real QEMU guest workload (QemuGuest.ts:
 * the bare-metal guest writing random pages of `guestMiB` MiB flat out,
 * timing each write) snapshotted in one run by
 *
 *   qemu-background  QEMU's own live snapshot: QMP `migrate` to a file with
 *                    the `background-snapshot` capability (uffd-wp in QEMU;
 *                    a faulting vCPU waits until its page is written out)
 *   vmsnap-pid       `vmsnap snapshot --pid` of the running QEMU, its guest
 *                    RAM mapping only (PidSnapshot.ts in @vmsnap/core)
 *   qemu-stop        QMP `stop`, `migrate` to a file, `cont`: stop-the-world
 *
 * A fresh QEMU per trial (a snapshot leaves its marks: split huge pages,
 * shadow pages). The guest's own windows (QemuGuest.ts) are sorted into
 * before / during / after the snapshot by host time; latency percentiles
 * come from the guest's per-window histograms merged over a phase. Extra
 * memory is the peak growth of RssAnon, sampled every 10 ms from the start
 * to the end of the snapshot, of QEMU and of this process (vmsnap runs
 * here). QEMU writes through `exec:cat > FILE` (QEMU 7.2 has no `file:`
 * URI) and does not fsync; vmsnap fsyncs its file before it is done.
 */
import { CapabilityError, type Compression, InvalidInput, snapshotPid, type VmsnapError, type WpNative } from "@vmsnap/core"
import { Effect, Exit } from "effect"
import { statSync } from "node:fs"
import { join } from "node:path"
import type { Spread } from "./BenchWindows.js"
import { buildQemuGuest, QemuGuest, qemuMissing, statusBytes } from "./QemuGuest.js"
import {
  beginsWith, causeText, type GuestPhase, guestPhase, type MemoryPeak, type PlacedWindow, type RealTrial, samplePeaks, scratchDirScoped, summarizeMethods, verifies
} from "./RealBenchReport.js"

export const QEMU_BENCH_METHODS = ["qemu-background", "vmsnap-pid", "qemu-stop"] as const
export type QemuBenchMethod = (typeof QEMU_BENCH_METHODS)[number]

export interface QemuBenchOptions {
  /** The guest's working set (its buffer; QEMU gets 256 MiB more). */
  readonly guestBytes: number
  readonly methods: ReadonlyArray<QemuBenchMethod>
  readonly runs: number
  /** The guest runs this long (after touching its memory) before each snapshot. */
  readonly warmupMs: number
  /** Measured after each snapshot ends. */
  readonly afterMs: number
  /** The guest's window length (its W lines). */
  readonly windowMs: number
  readonly poolPages: number
  readonly faultAroundPages: number
  readonly compression: Compression
  /** Keep each output here as METHOD-RUN.vmsnap / .qemu (default: deleted after each trial). */
  readonly outputDir?: string
  readonly onStart?: (method: QemuBenchMethod, run: number) => void
}

/** One snapshot of one fresh QEMU by one method. */
export interface QemuTrial extends RealTrial<QemuBenchMethod> {
  /** RssAnon growth of QEMU (target) and of the bench's process (vmsnap). */
  readonly extraMemory: MemoryPeak
  /** Write faults vmsnap served (vmsnap-pid only). */
  readonly faults: number | null
  readonly guest: {
    readonly before: GuestPhase
    readonly during: GuestPhase
    readonly after: GuestPhase
    /** The guest's 5 longest writes from the start of the snapshot to the end of `after`: ms from the start, and how long. */
    readonly longestStalls: ReadonlyArray<{ readonly atMs: number; readonly ms: number }>
  }
}

/** One method over its trials: medians with their spread. */
export interface QemuMethodSummary {
  readonly method: QemuBenchMethod
  readonly ok: boolean
  readonly error: string | null
  readonly figures: Record<QemuFigure, Spread>
  readonly trials: ReadonlyArray<QemuTrial>
}

export interface QemuBenchResult {
  readonly guestBytes: number
  readonly qemuRamBytes: number
  readonly windowMs: number
  readonly methods: ReadonlyArray<QemuMethodSummary>
}

const FIGURES = {
  pauseMs: (t: QemuTrial) => t.pauseMs,
  setupStopMs: (t: QemuTrial) => t.setupStopMs,
  durationMs: (t: QemuTrial) => t.durationMs,
  beforeWritesPerSecond: (t: QemuTrial) => t.guest.before.writesPerSecond,
  duringWritesPerSecond: (t: QemuTrial) => t.guest.during.writesPerSecond,
  afterWritesPerSecond: (t: QemuTrial) => t.guest.after.writesPerSecond,
  duringRatio: (t: QemuTrial) => ratio(t.guest.during.writesPerSecond, t.guest.before.writesPerSecond),
  afterRatio: (t: QemuTrial) => ratio(t.guest.after.writesPerSecond, t.guest.before.writesPerSecond),
  duringP50Us: (t: QemuTrial) => t.guest.during.latencyUs.p50,
  duringP99Us: (t: QemuTrial) => t.guest.during.latencyUs.p99,
  duringP999Us: (t: QemuTrial) => t.guest.during.latencyUs.p999,
  duringMaxUs: (t: QemuTrial) => t.guest.during.latencyUs.max,
  duringOver1ms: (t: QemuTrial) => t.guest.during.over1ms,
  afterMaxUs: (t: QemuTrial) => t.guest.after.latencyUs.max,
  extraMemoryBytes: (t: QemuTrial) => t.extraMemory.target + t.extraMemory.vmsnap,
  targetExtraBytes: (t: QemuTrial) => t.extraMemory.target,
  vmsnapExtraBytes: (t: QemuTrial) => t.extraMemory.vmsnap,
  outputBytes: (t: QemuTrial) => t.outputBytes
}
export type QemuFigure = keyof typeof FIGURES

const MiB = 1024 * 1024
const nowNs = () => Number(process.hrtime.bigint())
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const ratio = (a: number, b: number) => (b > 0 ? Math.round((a / b) * 1000) / 1000 : 0)

interface Outcome {
  readonly pauseMs: number
  readonly setupStopMs: number
  /** vmsnap-pid only: of the cut's stop, the time spent write-protecting (its `pauseMs`); null for the others. */
  readonly protectMs: number | null
  readonly faults: number | null
  readonly check: Effect.Effect<boolean>
}

/** QEMU's `migrate` to `path`, with or without background-snapshot; the VM stopped around it for `qemu-stop`. */
const qemuMigrate = async (q: QemuGuest, path: string, background: boolean): Promise<Outcome> => {
  await q.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "background-snapshot", state: background }] })
  const stopped = nowNs()
  if (!background) await q.qmp.execute("stop")
  // The path is in a fresh private directory of ours, without quotes in it.
  await q.qmp.execute("migrate", { uri: `exec:cat > '${path}'` })
  let status: { status?: string; downtime?: number; "error-desc"?: string }
  for (;;) {
    status = (await q.qmp.execute("query-migrate")) as typeof status
    if (status.status === "completed" || status.status === "failed" || status.status === "cancelled") break
    await sleep(5)
  }
  if (!background) await q.qmp.execute("cont")
  const resumed = nowNs()
  if (status.status !== "completed") throw new Error(`QEMU's migration ${status.status}: ${status["error-desc"] ?? "no reason given"}`)
  return {
    pauseMs: background ? (status.downtime ?? 0) : (resumed - stopped) / 1e6,
    setupStopMs: 0,
    protectMs: null,
    faults: null,
    check: beginsWith(path, "QEVM")
  }
}

/** `vmsnap snapshot --pid` of QEMU, its guest RAM (the mapping of QEMU's whole RAM size) only. */
const vmsnapPid = (q: QemuGuest, path: string, o: QemuBenchOptions) =>
  Effect.map(
    snapshotPid({ pid: q.pid, path, mappings: [{ _tag: "MinSize", bytes: q.ramBytes }], poolPages: o.poolPages, faultAroundPages: o.faultAroundPages, compression: o.compression }),
    (r): Outcome => ({
      pauseMs: r.stoppedMs.cut,
      setupStopMs: r.stoppedMs.setup,
      protectMs: r.pauseMs,
      faults: r.engine.faults,
      check: verifies(path)
    })
  )

/** The guest's windows placed on the host clock (a window's length is its guest time since the previous one). */
const placed = (q: QemuGuest, windowMs: number): Array<PlacedWindow> =>
  q.windows().map((line, i, all) => {
    const endNs = q.hostEndNs(line)
    const lengthMs = i > 0 ? line.guestMs - all[i - 1]!.guestMs : windowMs
    return { line, startNs: endNs - lengthMs * 1e6, endNs }
  })

const emptyPhase: GuestPhase = { windows: 0, seconds: 0, writes: 0, writesPerSecond: 0, latencyUs: { p50: 0, p99: 0, p999: 0, max: 0 }, over1ms: 0, stallMs: 0 }

const trial = (method: QemuBenchMethod, run: number, elf: string, vmsnapBase: number, o: QemuBenchOptions): Effect.Effect<QemuTrial, never, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      const dir = yield* scratchDirScoped(`vmsnap-bench-qemu-${method}-`)
      const q = yield* Effect.acquireRelease(
        Effect.sync(() => new QemuGuest({ elf, dir, guestMiB: o.guestBytes / MiB, windowMs: o.windowMs })),
        (g) => Effect.sync(() => g.kill())
      )
      const failed = (error: string): QemuTrial => ({
        method, run, ok: false, error, pauseMs: 0, setupStopMs: 0, protectMs: null, durationMs: 0, extraMemory: { target: 0, vmsnap: 0 }, outputBytes: 0, outputChecked: false, faults: null,
        guest: { before: emptyPhase, during: emptyPhase, after: emptyPhase, longestStalls: [] }
      })
      const started = yield* Effect.exit(Effect.tryPromise(async () => {
        await q.start()
        await q.nextWindows(Math.max(2, Math.ceil(o.warmupMs / o.windowMs)))
      }))
      if (Exit.isFailure(started)) return failed(causeText(started.cause))
      const path = join(o.outputDir ?? dir, `${method}-${run}.${method === "vmsnap-pid" ? "vmsnap" : "qemu"}`)
      const peaks = samplePeaks(q.pid, method === "vmsnap-pid" ? vmsnapBase : Infinity)
      const beginNs = nowNs()
      const outcome = yield* Effect.exit<Outcome, unknown, WpNative>(
        method === "vmsnap-pid"
          ? vmsnapPid(q, path, o)
          : Effect.tryPromise({ try: () => qemuMigrate(q, path, method === "qemu-background"), catch: (e) => (e instanceof Error ? e.message : String(e)) })
      )
      const endNs = nowNs()
      const extraMemory = peaks.stop()
      if (Exit.isFailure(outcome)) return failed(causeText(outcome.cause))
      const after = yield* Effect.exit(Effect.tryPromise(async () => {
        await q.windowsUntil(endNs, o.afterMs + o.windowMs)
        return q.quit()
      }))
      if (Exit.isFailure(after)) return failed(`after the snapshot: ${causeText(after.cause)}`)
      const final = after.value
      const windows = placed(q, o.windowMs)
      const beforeAll = windows.filter((w) => w.endNs <= beginNs)
      const before = beforeAll.slice(-Math.max(1, Math.round(1000 / o.windowMs)))
      const during = windows.filter((w) => w.endNs > beginNs && w.startNs < endNs)
      const afterWindows = windows.filter((w) => w.startNs >= endNs && w.endNs <= endNs + (o.afterMs + o.windowMs) * 1e6)
      const checked = yield* outcome.value.check
      return {
        method, run, ok: checked, error: checked ? null : "the output did not check out",
        pauseMs: Math.round(outcome.value.pauseMs * 1000) / 1000,
        setupStopMs: outcome.value.setupStopMs,
        protectMs: outcome.value.protectMs === null ? null : Math.round(outcome.value.protectMs * 1000) / 1000,
        durationMs: Math.round((endNs - beginNs) / 1e6),
        extraMemory,
        outputBytes: statSync(path).size,
        outputChecked: checked,
        faults: outcome.value.faults,
        guest: {
          before: guestPhase(before, final), during: guestPhase(during, final), after: guestPhase(afterWindows, final),
          longestStalls: final.stalls
            // A stall is recorded at its end: it began `us` before.
            .map((st) => ({ atMs: Math.round((q.hostNs(st.guestMs) - st.us * 1e3 - beginNs) / 1e5) / 10, ms: Math.round(st.us / 100) / 10 }))
            .filter((st) => st.atMs >= -st.ms && st.atMs * 1e6 <= endNs - beginNs + o.afterMs * 1e6)
            .sort((a, b) => b.ms - a.ms)
            .slice(0, 5)
        }
      }
    })
  )

/** Runs every method `runs` times on fresh QEMUs with the same guest, methods interleaved per run. */
export const runQemuBenchmark = (o: QemuBenchOptions): Effect.Effect<QemuBenchResult, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      if (o.guestBytes % (2 * MiB) !== 0 || o.guestBytes < 16 * MiB) return yield* Effect.fail(new InvalidInput({ reason: `QEMU guest size ${o.guestBytes}: must be a multiple of 2 MiB, at least 16 MiB` }))
      const missing = qemuMissing()
      if (missing) return yield* Effect.fail(new CapabilityError({ missing: "QEMU on KVM", reason: missing }))
      const dir = yield* scratchDirScoped("vmsnap-bench-qemu-")
      const elf = join(dir, "guest.elf")
      yield* Effect.try({ try: () => buildQemuGuest(elf), catch: (e) => new CapabilityError({ missing: "the QEMU guest", reason: String(e) }) })
      const vmsnapBase = statusBytes("self", "RssAnon")
      const trials: Array<QemuTrial> = []
      for (let run = 1; run <= o.runs; run++)
        for (const method of o.methods) {
          o.onStart?.(method, run)
          trials.push(yield* trial(method, run, elf, vmsnapBase, o))
        }
      return {
        guestBytes: o.guestBytes,
        qemuRamBytes: o.guestBytes + 256 * MiB,
        windowMs: o.windowMs,
        methods: summarizeMethods(o.methods, trials, FIGURES)
      }
    })
  )
