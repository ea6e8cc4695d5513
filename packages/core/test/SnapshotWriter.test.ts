/** The writer's cut of an engine batch into records (recordsFromBatch). */
import { describe, expect, it } from "vitest"
import { compressBatch, RECORD_DATA_PAGES, recordsFromBatch } from "../src/SnapshotWriter.js"
import { IdleCpu } from "../src/internal/idleCpu.js"
import { availableParallelism } from "node:os"
import { PAGE_ZERO } from "../src/WpNative.js"

const batch = (entries: Array<[region: number, page: number, zero: boolean]>) => {
  const data = Buffer.alloc(entries.length * 4096)
  let packed = 0
  entries.forEach(([region, page, zero]) => {
    if (!zero) data.fill(region * 16 + (page % 16) + 1, packed * 4096, ++packed * 4096)
  })
  return {
    data,
    regions: Uint32Array.from(entries.map((e) => e[0])),
    pages: BigUint64Array.from(entries.map((e) => BigInt(e[1]))),
    flags: Uint8Array.from(entries.map((e) => (e[2] ? PAGE_ZERO : 0)))
  }
}

describe("recordsFromBatch", () => {
  it("cuts runs of consecutive pages of one region with one flag; data stays packed in entry order", async () => {
    // Pool pages arrive in fault order: not sorted, several regions.
    const b = batch([[0, 5, false], [0, 6, false], [0, 7, true], [1, 8, false], [0, 2, false], [0, 3, true], [0, 4, true]])
    const records = await recordsFromBatch(b, 7, false)
    expect(records.map((r) => [r.region, r.firstPage, r.pageCount, r.encoding])).toEqual([
      [0, 5, 2, "raw"], [0, 7, 1, "zero"], [1, 8, 1, "raw"], [0, 2, 1, "raw"], [0, 3, 2, "zero"]
    ])
    expect(records[0]!.payload!.equals(Buffer.concat([Buffer.alloc(4096, 6), Buffer.alloc(4096, 7)]))).toBe(true)
    expect(records[2]!.payload!.equals(Buffer.alloc(4096, 16 + 8 + 1))).toBe(true)
    expect(records[3]!.payload!.equals(Buffer.alloc(4096, 3))).toBe(true)
  })

  it("lz4 only where it is smaller; only the first n entries count", async () => {
    const b = batch([[0, 0, false], [0, 1, false], [0, 2, false]])
    const records = await recordsFromBatch(b, 2, true)
    expect(records).toHaveLength(1)
    expect(records[0]).toMatchObject({ firstPage: 0, pageCount: 2, encoding: "lz4" })
    expect(records[0]!.payload!.length).toBeLessThan(2 * 4096)
  })

  it("a data run longer than 64 KiB is cut into records of at most RECORD_DATA_PAGES (a lazy restore decodes one per fault); zero runs stay whole", async () => {
    const entries: Array<[number, number, boolean]> = []
    for (let p = 0; p < 40; p++) entries.push([0, p, false])
    for (let p = 40; p < 100; p++) entries.push([0, p, true])
    const b = batch(entries)
    const records = await recordsFromBatch(b, entries.length, true)
    expect(RECORD_DATA_PAGES * 4096).toBeLessThanOrEqual(64 * 1024)
    expect(records.map((r) => [r.firstPage, r.pageCount, r.encoding === "zero"])).toEqual([
      [0, 16, false], [16, 16, false], [32, 8, false], [40, 60, true]
    ])
  })
})

describe("compression auto (issue 14: never the core the guest needs)", () => {
  it("compresses a batch only with half a core idle and no other batch compressing; lz4 always; none never", () => {
    expect(compressBatch("auto", 0, 1.0)).toBe(true)
    expect(compressBatch("auto", 0, 0.5)).toBe(true)
    expect(compressBatch("auto", 0, 0.2)).toBe(false) // the machine is busy: raw
    expect(compressBatch("auto", 1, 2.0)).toBe(false) // one batch is on the thread pool already: raw
    expect(compressBatch("lz4", 3, 0)).toBe(true)
    expect(compressBatch("none", 0, 2.0)).toBe(false)
  })

  it("reads the machine's idle cores from /proc/stat: between 0 and the CPU count", async () => {
    const idle = new IdleCpu()
    await new Promise((r) => setTimeout(r, 150))
    const sleeping = idle.cores()
    expect(sleeping).toBeGreaterThanOrEqual(0)
    expect(sleeping).toBeLessThanOrEqual(availableParallelism())
  })
})
