/**
 * What the benches on real software (QemuBench.ts, RedisBench.ts) share:
 * the guest's own windows gathered into a phase (before / during / after a
 * snapshot), peak memory growth sampled from /proc, and medians with their
 * spread over a method's trials.
 */
import { guestBucketLowerNs, quantileNs, verifySnapshot } from "@vmsnap/core"
import { Cause, Effect } from "effect"
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { type Spread, spreadOf } from "./BenchWindows.js"
import { type GuestFinal, type GuestWindowLine, statusBytes } from "./QemuGuest.js"

/** What every trial of the real-software benches has. */
export interface RealTrial<M extends string> {
  readonly method: M
  readonly run: number
  readonly ok: boolean
  readonly error: string | null
  /** The target stopped: the method's own figure (QEMU's downtime, stop to cont, fork); vmsnap --pid: every thread held stopped by ptrace for its cut. */
  readonly pauseMs: number
  /** vmsnap-pid only: the target's threads stopped earlier, to take the userfaultfd (0 for the others). */
  readonly setupStopMs: number
  /** vmsnap-pid only: of the cut's stop, the time spent write-protecting (its `pauseMs`); null for the others. */
  readonly protectMs: number | null
  /** From the command to the output complete, as the bench saw it. */
  readonly durationMs: number
  readonly outputBytes: number
  /** vmsnap's file passed `verifySnapshot`; another program's output begins with its magic. */
  readonly outputChecked: boolean
}

/** The guest's accesses over some of its windows, as it measured them. */
export interface GuestPhase {
  readonly windows: number
  readonly seconds: number
  readonly writes: number
  readonly writesPerSecond: number
  /** From the windows' histograms merged (each quantile is its bucket's upper edge); max is exact. */
  readonly latencyUs: { readonly p50: number; readonly p99: number; readonly p999: number; readonly max: number }
  /** Writes that took 1 ms or more. */
  readonly over1ms: number
  /** Time in writes slower than 10 µs. */
  readonly stallMs: number
}

/** A window's host interval [startNs, endNs]. */
export interface PlacedWindow {
  readonly line: GuestWindowLine
  readonly startNs: number
  readonly endNs: number
}

const round3 = (x: number) => Math.round(x * 1000) / 1000

/** Merges the chosen windows; `final` holds their histograms (by window index). */
export const guestPhase = (windows: ReadonlyArray<PlacedWindow>, final: GuestFinal): GuestPhase => {
  const hist: Array<number> = new Array(512).fill(0)
  for (const w of windows) for (const [b, c] of final.histograms[w.line.index] ?? []) hist[b] = (hist[b] ?? 0) + c
  const lower = (b: number) => guestBucketLowerNs(b) * final.nsPerCycle
  const maxNs = Math.max(0, ...windows.map((w) => w.line.maxNs))
  const q = (x: number) => round3(Math.min(quantileNs(hist, x, lower), maxNs) / 1000)
  const seconds = windows.reduce((a, w) => a + (w.endNs - w.startNs) / 1e9, 0)
  const writes = windows.reduce((a, w) => a + w.line.writes, 0)
  return {
    windows: windows.length,
    seconds: Math.round(seconds * 1000) / 1000,
    writes,
    writesPerSecond: seconds > 0 ? Math.round(writes / seconds) : 0,
    latencyUs: { p50: q(0.5), p99: q(0.99), p999: q(0.999), max: round3(maxNs / 1000) },
    over1ms: windows.reduce((a, w) => a + w.line.over1ms, 0),
    stallMs: Math.round(windows.reduce((a, w) => a + w.line.stallUs, 0) / 1000)
  }
}

/**
 * Peak growth of RssAnon, in bytes: of the snapshotted process (`target`,
 * from the start of the sampling) and of this one (`vmsnap`, from
 * `vmsnapBase`: this process's RssAnon when the bench started, since memory a
 * previous trial freed may still be held by the allocator and a later
 * trial's growth from its own start would leave it out).
 */
export interface MemoryPeak {
  readonly target: number
  readonly vmsnap: number
  /** A forked child's Private_Dirty (fork copy-on-write: the pages copied), when there was one. */
  readonly child?: number
}

/** Samples RssAnon of `pid` and of this process every `everyMs` until stopped (this process's growth from `vmsnapBase`, or from now if that is more); `extra` adds a third sample (a child's copies). */
export const samplePeaks = (pid: number, vmsnapBase: number, extra?: () => number, everyMs = 10) => {
  const base = { target: statusBytes(pid, "RssAnon"), vmsnap: Math.min(vmsnapBase, statusBytes("self", "RssAnon")) }
  const peak = { ...base, child: 0 }
  const sample = () => {
    peak.target = Math.max(peak.target, statusBytes(pid, "RssAnon"))
    peak.vmsnap = Math.max(peak.vmsnap, statusBytes("self", "RssAnon"))
    if (extra) peak.child = Math.max(peak.child, extra())
  }
  const timer = setInterval(sample, everyMs)
  return {
    sample,
    stop: (): MemoryPeak => {
      clearInterval(timer)
      sample()
      return { target: peak.target - base.target, vmsnap: peak.vmsnap - base.vmsnap, ...(extra ? { child: peak.child } : {}) }
    }
  }
}

/** Medians with their spread of named figures over trials (successful ones when any succeeded). */
export const spreadsOf = <T extends { readonly ok: boolean }, K extends string>(
  trials: ReadonlyArray<T>,
  figures: Record<K, (t: T) => number>
): Record<K, Spread> => {
  const ok = trials.filter((t) => t.ok)
  const use = ok.length > 0 ? ok : trials
  const out = {} as Record<K, Spread>
  for (const k of Object.keys(figures) as Array<K>) out[k] = use.length ? spreadOf(use.map(figures[k])) : { median: 0, min: 0, max: 0 }
  return out
}

/** One line for a failure: a vmsnap error's reason, an Error's message. */
export const causeText = (cause: Cause.Cause<unknown>): string => {
  let e = Cause.squash(cause)
  // Effect.tryPromise wraps what a promise rejected with: say that.
  if (e instanceof Error && e.cause instanceof Error && /tryPromise|try$/.test(e.message)) e = e.cause
  if (typeof e === "object" && e !== null && "reason" in e) return `${String((e as { _tag?: string })._tag ?? "Error")}: ${String((e as { reason: unknown }).reason)}`
  return e instanceof Error ? e.message : String(e)
}

/** A private scratch directory under the system's temporary directory, removed with its scope. */
export const scratchDirScoped = (prefix: string) =>
  Effect.acquireRelease(
    Effect.sync(() => mkdtempSync(join(tmpdir(), prefix))),
    (d) => Effect.sync(() => rmSync(d, { recursive: true, force: true }))
  )

/** The file begins with `magic` (another program's output: QEMU's "QEVM", Redis's "REDIS"). */
export const beginsWith = (path: string, magic: string) =>
  Effect.sync(() => {
    const fd = openSync(path, "r")
    const head = Buffer.alloc(magic.length)
    try {
      readSync(fd, head, 0, head.length, 0)
    } finally {
      closeSync(fd)
    }
    return head.toString("latin1") === magic
  })

/** vmsnap's file passes `verifySnapshot` (every record, checksum and page). */
export const verifies = (path: string) => Effect.orElseSucceed(Effect.as(verifySnapshot(path), true), () => false)

/** Each method's trials with medians and spread of `figures`. */
export const summarizeMethods = <M extends string, T extends { readonly method: M; readonly ok: boolean; readonly run: number; readonly error: string | null }, K extends string>(
  methods: ReadonlyArray<M>,
  trials: ReadonlyArray<T>,
  figures: Record<K, (t: T) => number>
) =>
  methods.map((method) => {
    const mine = trials.filter((t) => t.method === method)
    return { method, ok: mine.every((t) => t.ok), error: mine.find((t) => !t.ok)?.error ?? null, figures: spreadsOf(mine, figures), trials: mine }
  })
