/** The bench's windows: cut from a guest write series, with no timing in the test. */
import { describe, expect, it } from "vitest"
import { median, rateSeries, spreadOf, windowOf, withMarks, writesAt } from "../src/BenchWindows.js"

const ms = 1e6
// 1000 writes/s for 1 s, stalled for 1 s, then 2000 writes/s for 1 s; samples every 10 ms from t = 5 s.
const t0 = 5000 * ms
const series: Array<[number, number]> = []
for (let i = 0; i <= 300; i++) {
  const t = i * 10
  const w = t <= 1000 ? t : t <= 2000 ? 1000 : 1000 + (t - 2000) * 2
  series.push([t0 + t * ms, w])
}

describe("bench windows", () => {
  it("interpolates between samples and clamps at the ends", () => {
    expect(writesAt(series, t0 + 505 * ms)).toBeCloseTo(505)
    expect(writesAt(series, t0 - 1000 * ms)).toBe(0)
    expect(writesAt(series, t0 + 10_000 * ms)).toBe(3000)
    expect(writesAt([], t0)).toBe(0)
  })

  it("a window's rate comes from the counter at its edges, placed relative to the cut", () => {
    const cut = t0 + 1000 * ms
    expect(windowOf(series, t0, cut, cut)).toEqual({ fromMs: -1000, seconds: 1, writes: 1000, writesPerSecond: 1000 })
    expect(windowOf(series, cut, cut + 1000 * ms, cut)).toMatchObject({ fromMs: 0, writes: 0, writesPerSecond: 0 })
    expect(windowOf(series, cut + 1000 * ms, cut + 1500 * ms, cut)).toMatchObject({ fromMs: 1000, seconds: 0.5, writes: 1000, writesPerSecond: 2000 })
  })

  it("a window past the series is clipped to it, and an empty one has no rate", () => {
    const cut = t0 + 2500 * ms
    expect(windowOf(series, cut, cut + 5000 * ms, cut)).toMatchObject({ seconds: 0.5, writes: 1000, writesPerSecond: 2000 })
    expect(windowOf(series, t0 + 9000 * ms, t0 + 9500 * ms, cut)).toMatchObject({ seconds: 0, writes: 0, writesPerSecond: 0 })
  })

  it("the time series has one rate per 100 ms step, from the cut", () => {
    const r = rateSeries(series, t0 + 1000 * ms)
    expect(r).toHaveLength(30)
    expect(r[0]).toEqual({ ms: -1000, writesPerSecond: 1000 })
    expect(r[15]).toEqual({ ms: 500, writesPerSecond: 0 })
    expect(r[29]).toEqual({ ms: 1900, writesPerSecond: 2000 })
  })

  it("median and spread", () => {
    expect(median([3, 1, 2])).toBe(2)
    expect(median([4, 1, 3, 2])).toBe(2.5)
    expect(spreadOf([0.3, 0.1, 0.2])).toEqual({ median: 0.2, min: 0.1, max: 0.3 })
  })
})

describe("exact counts at the cut and the last page saved", () => {
  it("a window between two marks uses them, not the samples around them", () => {
    // Samples 100 ms apart; the guest was frozen from 1020 ms to 1050 ms, which only the marks show.
    const sparse: Array<[number, number]> = [[t0 + 1000 * ms, 1000], [t0 + 1100 * ms, 1070]]
    const marked = withMarks(sparse, [[t0 + 1020 * ms, 1020], [t0 + 1050 * ms, 1020], [0, 0]])
    expect(marked).toHaveLength(4)
    expect(windowOf(marked, t0 + 1020 * ms, t0 + 1050 * ms, t0 + 1020 * ms).writes).toBe(0)
    expect(windowOf(sparse, t0 + 1020 * ms, t0 + 1050 * ms, t0 + 1020 * ms).writes).toBeGreaterThan(0)
  })
})
