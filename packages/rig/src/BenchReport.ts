/**
 * One bench trial from what was measured (the VMM's report, the moments of
 * the snapshot) and the reference run with no snapshot; and the summary of a
 * method's trials: medians with their spread (min, max).
 */
import { type GuestWindow, rateSeries, type Spread, spreadOf, windowOf, withMarks, type WriteSeries } from "./BenchWindows.js"
import type { CpuByRole } from "./ThreadCpu.js"
import type { PhaseReport, ToyVmmReport } from "./ToyVmm.js"

export const BENCH_METHODS = ["vmsnap", "vmsnap-sync", "floor", "fork", "stop-the-world"] as const
export type BenchMethod = (typeof BENCH_METHODS)[number]

/** What one method's run measured; moments in CLOCK_MONOTONIC ns. */
export interface Measured {
  readonly report: ToyVmmReport
  /** The snapshot was begun, cut (all vCPUs frozen), and its last page saved. */
  readonly beginNs: number
  readonly cutNs: number
  readonly savedNs: number
  readonly pauseMs: number
  /** From the cut until the output is complete (durable, for vmsnap). */
  readonly durationMs: number
  readonly faults: number
  readonly extraMemoryBytes: number
  readonly outputBytes: number
  readonly error: string | null
  /** CPU ms per thread role (ThreadCpu.ts) from the cut to the last page saved: the VMM's threads, and for vmsnap this process's. */
  readonly cpuMs: CpuByRole
  /** The same over the `after` window: the afterMs after the last page was saved. */
  readonly cpuAfterMs: CpuByRole
}

export interface BenchTrial {
  readonly run: number
  readonly ok: boolean
  readonly error: string | null
  readonly pauseMs: number
  readonly durationMs: number
  /** From the cut to the moment the last page was saved. */
  readonly savedMs: number
  readonly faults: number
  readonly stallsOver1ms: number
  readonly guestBlockedMs: number
  readonly latencyUs: PhaseReport["latencyUs"]
  readonly throughputMBps: number
  readonly extraMemoryBytes: number
  readonly outputBytes: number
  /** The guest's writes in the windows (BenchWindows.ts), and the reference's in the same windows. */
  readonly windows: {
    readonly before: GuestWindow
    /** From begin to the cut: vmsnap arms its protection here while the guest runs (no window of the ratios). */
    readonly arming: GuestWindow
    readonly during: GuestWindow
    readonly after: GuestWindow
  }
  readonly reference: { readonly during: GuestWindow; readonly after: GuestWindow }
  readonly guestThroughputRatio: number
  readonly guestThroughputAfterRatio: number
  /** Guest writes/s every 100 ms, `ms` from the cut. */
  readonly series: ReadonlyArray<{ readonly ms: number; readonly writesPerSecond: number }>
  /** CPU ms per thread role from the cut to the last page saved (ThreadCpu.ts). */
  readonly cpuMs: CpuByRole
  /** The same over the `after` window: the afterMs after the last page was saved. */
  readonly cpuAfterMs: CpuByRole
}

/** A VMM's write series with the exact counts it read at the cut and when the last page was saved. */
const seriesOf = (r: ToyVmmReport): WriteSeries => withMarks(r.series, [[r.cutNs, r.cutWrites], [r.savedNs, r.savedWrites]])

const ratio = (a: number, b: number) => (b > 0 ? Math.round((a / b) * 1000) / 1000 : 0)

/** `none`: the reference run; `beforeMs`/`afterMs`: window lengths. */
export const toTrial = (run: number, size: number, m: Measured, none: ToyVmmReport, beforeMs: number, afterMs: number): BenchTrial => {
  const s = seriesOf(m.report)
  const ref = seriesOf(none)
  const during = windowOf(s, m.cutNs, m.savedNs, m.cutNs)
  const after = windowOf(s, m.savedNs, m.savedNs + afterMs * 1e6, m.cutNs)
  // The same windows in the reference run, at the same time since its guest started.
  const shift = none.startNs - m.report.startNs
  const reference = {
    during: windowOf(ref, m.cutNs + shift, m.savedNs + shift, m.cutNs + shift),
    after: windowOf(ref, m.savedNs + shift, m.savedNs + shift + afterMs * 1e6, m.cutNs + shift)
  }
  const phase = m.report.phases.during
  return {
    run, ok: m.error === null, error: m.error,
    pauseMs: Math.round(m.pauseMs * 1000) / 1000,
    durationMs: Math.round(m.durationMs),
    savedMs: Math.round((m.savedNs - m.cutNs) / 1e6),
    faults: m.faults,
    stallsOver1ms: phase.stallsOver1ms,
    guestBlockedMs: Math.round(phase.blockedMs),
    latencyUs: phase.latencyUs,
    throughputMBps: m.durationMs > 0 ? Math.round(size / 1e6 / (m.durationMs / 1000)) : 0,
    extraMemoryBytes: m.extraMemoryBytes,
    outputBytes: m.outputBytes,
    windows: { before: windowOf(s, m.beginNs - beforeMs * 1e6, m.beginNs, m.cutNs), arming: windowOf(s, m.beginNs, m.cutNs, m.cutNs), during, after },
    reference,
    guestThroughputRatio: ratio(during.writesPerSecond, reference.during.writesPerSecond),
    guestThroughputAfterRatio: ratio(after.writesPerSecond, reference.after.writesPerSecond),
    series: rateSeries(s, m.cutNs),
    cpuMs: m.cpuMs,
    cpuAfterMs: m.cpuAfterMs
  }
}

/** One method at one size: medians over its successful trials, with the spread of the main figures. */
export interface BenchRun {
  readonly method: BenchMethod
  readonly sizeBytes: number
  readonly guestKind: "kvm" | "threads"
  readonly ok: boolean
  readonly error: string | null
  readonly pauseMs: number
  readonly durationMs: number
  readonly savedMs: number
  readonly latencyUs: PhaseReport["latencyUs"]
  readonly faults: number
  /**
   * Faults per 1000 guest writes in the `during` window: a write fault is a
   * guest write to a page not yet saved, so a guest that gets more writes
   * done during the snapshot also meets more of them; this is the chance a
   * write faults.
   */
  readonly faultsPerThousandWrites: number
  readonly stallsOver1ms: number
  readonly guestBlockedMs: number
  /** Guest writes/s during the snapshot (the `during` window). */
  readonly guestWritesPerSecond: number
  readonly writesPerSecond: {
    readonly before: number
    readonly during: number
    readonly after: number
    readonly referenceDuring: number
    readonly referenceAfter: number
  }
  /** Guest writes/s during the snapshot over the reference's in the same window. */
  readonly guestThroughputRatio: number
  /** The same for the `afterMs` after the last page was saved. */
  readonly guestThroughputAfterRatio: number
  readonly spread: {
    readonly guestThroughputRatio: Spread
    readonly guestThroughputAfterRatio: Spread
    readonly durationMs: Spread
    readonly savedMs: Spread
    readonly faults: Spread
    readonly faultsPerThousandWrites: Spread
    readonly pauseMs: Spread
  }
  readonly throughputMBps: number
  readonly extraMemoryBytes: number
  readonly outputBytes: number
  /** Medians over the trials of CPU ms per thread role, from the cut to the last page saved. */
  readonly cpuMs: CpuByRole
  /** Medians over the trials of CPU ms per thread role in the `after` window. */
  readonly cpuAfterMs: CpuByRole
  readonly trials: ReadonlyArray<BenchTrial>
}

const faultsPerThousand = (t: BenchTrial): number => (t.windows.during.writes > 0 ? (t.faults * 1000) / t.windows.during.writes : 0)

export const summarize = (method: BenchMethod, sizeBytes: number, guestKind: "kvm" | "threads", trials: ReadonlyArray<BenchTrial>): BenchRun => {
  const ok = trials.filter((t) => t.ok)
  const use = ok.length > 0 ? ok : trials
  const of = (f: (t: BenchTrial) => number): Spread => spreadOf(use.map(f))
  const med = (f: (t: BenchTrial) => number) => Math.round(of(f).median * 1000) / 1000
  /** Per role, the median over the trials (0 where a trial had no such thread). */
  const byRole = (f: (t: BenchTrial) => CpuByRole): CpuByRole =>
    Object.fromEntries([...new Set(use.flatMap((t) => Object.keys(f(t))))].map((role) => [role, med((t) => f(t)[role] ?? 0)]))
  return {
    method, sizeBytes, guestKind,
    ok: ok.length === trials.length,
    error: trials.find((t) => !t.ok)?.error ?? null,
    pauseMs: med((t) => t.pauseMs),
    durationMs: med((t) => t.durationMs),
    savedMs: med((t) => t.savedMs),
    latencyUs: {
      p50: med((t) => t.latencyUs.p50), p99: med((t) => t.latencyUs.p99),
      p999: med((t) => t.latencyUs.p999), max: med((t) => t.latencyUs.max)
    },
    faults: med((t) => t.faults),
    faultsPerThousandWrites: med((t) => faultsPerThousand(t)),
    stallsOver1ms: med((t) => t.stallsOver1ms),
    guestBlockedMs: med((t) => t.guestBlockedMs),
    guestWritesPerSecond: med((t) => t.windows.during.writesPerSecond),
    writesPerSecond: {
      before: med((t) => t.windows.before.writesPerSecond),
      during: med((t) => t.windows.during.writesPerSecond),
      after: med((t) => t.windows.after.writesPerSecond),
      referenceDuring: med((t) => t.reference.during.writesPerSecond),
      referenceAfter: med((t) => t.reference.after.writesPerSecond)
    },
    guestThroughputRatio: med((t) => t.guestThroughputRatio),
    guestThroughputAfterRatio: med((t) => t.guestThroughputAfterRatio),
    spread: {
      guestThroughputRatio: of((t) => t.guestThroughputRatio),
      guestThroughputAfterRatio: of((t) => t.guestThroughputAfterRatio),
      durationMs: of((t) => t.durationMs),
      savedMs: of((t) => t.savedMs),
      faults: of((t) => t.faults),
      faultsPerThousandWrites: of((t) => faultsPerThousand(t)),
      pauseMs: of((t) => t.pauseMs)
    },
    throughputMBps: med((t) => t.throughputMBps),
    extraMemoryBytes: med((t) => t.extraMemoryBytes),
    outputBytes: med((t) => t.outputBytes),
    cpuMs: byRole((t) => t.cpuMs),
    cpuAfterMs: byRole((t) => t.cpuAfterMs),
    trials
  }
}
