/** Percentiles from the log-linear histograms the native side keeps. */

/** Lower bound in ns of bucket b of the guest's and the lazy restorer's histograms (8 sub-buckets per power of two). */
export const guestBucketLowerNs = (b: number): number => {
  if (b < 8) return b
  const msb = Math.floor(b / 8)
  return 2 ** msb * (1 + (b % 8) / 8)
}

/** Lower bound in ns of bucket b of the engine's fault histogram (2 per power of two). */
export const faultBucketLowerNs = (b: number): number => 2 ** Math.floor(b / 2) * (b % 2 === 0 ? 1 : 1.5)

/** The q-quantile (0..1), reported as the upper edge of its bucket (never optimistic). */
export const quantileNs = (hist: ReadonlyArray<number>, q: number, lowerNs: (b: number) => number): number => {
  const total = hist.reduce((a, b) => a + b, 0)
  if (total === 0) return 0
  const rank = Math.ceil(q * total)
  let seen = 0
  for (let b = 0; b < hist.length; b++) {
    seen += hist[b]!
    if (seen >= rank) return lowerNs(b + 1)
  }
  return lowerNs(hist.length)
}

export interface LatencySummary {
  readonly count: number
  readonly p50: number
  readonly p99: number
  readonly p999: number
  readonly max: number
}

/** Summary in microseconds. */
export const summarizeUs = (hist: ReadonlyArray<number>, maxNs: number, lowerNs: (b: number) => number): LatencySummary => {
  const us = (ns: number) => Math.round(ns / 10) / 100
  return {
    count: hist.reduce((a, b) => a + b, 0),
    p50: us(Math.min(quantileNs(hist, 0.5, lowerNs), maxNs)),
    p99: us(Math.min(quantileNs(hist, 0.99, lowerNs), maxNs)),
    p999: us(Math.min(quantileNs(hist, 0.999, lowerNs), maxNs)),
    max: us(maxNs)
  }
}
