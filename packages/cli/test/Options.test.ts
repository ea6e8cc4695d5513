/** The options several commands share: sizes, the copy pool, the fault-around window, the stall limit. */
import { describe, expect, it } from "vitest"
import { faultAroundOption, poolPagesOption, sizeOption, stallTimeoutOption, UsageError } from "../src/Options.js"

describe("shared options", () => {
  it("a size: units, a lower bound, whole 4 KiB pages", () => {
    expect(sizeOption("size", "256MiB", 4096)).toBe(256 * 1024 * 1024)
    expect(sizeOption("size", "8192", 4096)).toBe(8192)
    expect(() => sizeOption("size", "lots", 4096)).toThrow(/--size lots: not a size/)
    expect(() => sizeOption("size", "4KiB", 8192)).toThrow(/--size 4KiB: must be at least 8\.00 KiB/)
    expect(() => sizeOption("size", "6000", 4096)).toThrow(/multiple of 4 KiB/)
    expect(() => sizeOption("size", "lots", 4096)).toThrow(UsageError)
  })

  it("--buffer: pages, or 0 for the synchronous mode", () => {
    expect(poolPagesOption("64MiB")).toBe(16384)
    expect(poolPagesOption("0")).toBe(0)
    expect(poolPagesOption(" 0 ")).toBe(0)
    expect(() => poolPagesOption("4097")).toThrow(/--buffer 4097: must be a multiple of 4 KiB/)
  })

  it("--fault-around: a power of two from 1 to 512", () => {
    for (const n of [1, 2, 16, 512]) expect(faultAroundOption(n)).toBe(n)
    for (const n of [0, 3, 1024, 1.5, -2]) expect(() => faultAroundOption(n)).toThrow(/must be a power of two from 1 to 512/)
  })

  it("--stall-timeout: seconds in, ms out; more than 0, at most a day", () => {
    expect(stallTimeoutOption(10)).toBe(10_000)
    expect(stallTimeoutOption(0.5)).toBe(500)
    for (const s of [0, -1, 86401, Number.NaN]) expect(() => stallTimeoutOption(s)).toThrow(/--stall-timeout .*: must be seconds, more than 0 and at most 86400/)
  })
})
