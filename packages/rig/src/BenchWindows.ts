/**
 * The windows `vmsnap bench` measures the guest in, cut from the guest's own
 * write counter (the toy VMM samples it every ~10 ms: `ToyVmmReport.series`)
 * so that every method is measured the same way:
 *
 *   before  the `beforeMs` ending where the snapshot was begun
 *   arming  from then to the cut (vmsnap protects memory here while the guest runs)
 *   during  from the cut (all vCPUs frozen) to the moment the last page is saved
 *   after   the `afterMs` from the moment the last page is saved
 *
 * The reference ("none", the same guest with no snapshot) is measured over
 * the same windows placed at the same offsets from its guest's start, so both
 * guests have run for the same time (same warm-up of KVM's shadow pages).
 * Times are CLOCK_MONOTONIC ns (the VMM's clock_gettime and Node's
 * process.hrtime share it on Linux).
 */

/** [CLOCK_MONOTONIC ns, total guest writes] samples, in time order. */
export type WriteSeries = ReadonlyArray<readonly [number, number]>

export interface GuestWindow {
  /** Start of the window, ms from the cut (negative: before it). */
  readonly fromMs: number
  readonly seconds: number
  readonly writes: number
  readonly writesPerSecond: number
}

/** The series with exact counts read at given moments added (moments of 0 ns are absent). */
export const withMarks = (s: WriteSeries, marks: ReadonlyArray<readonly [number, number]>): WriteSeries =>
  [...s, ...marks.filter(([t]) => t > 0)].sort((a, b) => a[0] - b[0])

/** Total writes at time `t` (ns): linear between samples, clamped to the first and last. */
export const writesAt = (s: WriteSeries, t: number): number => {
  if (s.length === 0) return 0
  if (t <= s[0]![0]) return s[0]![1]
  const last = s[s.length - 1]!
  if (t >= last[0]) return last[1]
  let lo = 0
  let hi = s.length - 1
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1
    if (s[mid]![0] <= t) lo = mid
    else hi = mid
  }
  const [t0, w0] = s[lo]!
  const [t1, w1] = s[hi]!
  return w0 + ((w1 - w0) * (t - t0)) / (t1 - t0)
}

/** The guest's writes in [fromNs, toNs], clipped to what the series covers. */
export const windowOf = (s: WriteSeries, fromNs: number, toNs: number, cutNs: number): GuestWindow => {
  const from = s.length ? Math.max(fromNs, s[0]![0]) : fromNs
  const to = s.length ? Math.min(toNs, s[s.length - 1]![0]) : fromNs
  const seconds = Math.max(0, (to - from) / 1e9)
  const writes = seconds > 0 ? writesAt(s, to) - writesAt(s, from) : 0
  return {
    fromMs: Math.round((from - cutNs) / 1e5) / 10,
    seconds: Math.round(seconds * 1000) / 1000,
    writes: Math.round(writes),
    writesPerSecond: seconds > 0 ? Math.round(writes / seconds) : 0
  }
}

/** Writes/s in consecutive `stepMs` steps over the whole series; `ms` is each step's start from the cut. */
export const rateSeries = (s: WriteSeries, cutNs: number, stepMs = 100): Array<{ ms: number; writesPerSecond: number }> => {
  if (s.length < 2) return []
  const out: Array<{ ms: number; writesPerSecond: number }> = []
  const step = stepMs * 1e6
  const end = s[s.length - 1]![0]
  for (let t = s[0]![0]; t + step <= end; t += step)
    out.push({ ms: Math.round((t - cutNs) / 1e6), writesPerSecond: Math.round((writesAt(s, t + step) - writesAt(s, t)) / (stepMs / 1000)) })
  return out
}

/** Median of a non-empty list (mean of the middle two for an even count). */
export const median = (xs: ReadonlyArray<number>): number => {
  const v = [...xs].sort((a, b) => a - b)
  const m = v.length >> 1
  return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2
}

export interface Spread {
  readonly median: number
  readonly min: number
  readonly max: number
}

export const spreadOf = (xs: ReadonlyArray<number>): Spread => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) })
