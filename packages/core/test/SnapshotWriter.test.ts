/**
 * The cut of an engine batch into records (wp_record_encode_batch, whose rules the native
 * writer's record_encode_iov shares: test_record.c checks both give the same bytes).
 */
import { describe, expect, it } from "vitest"
import { RECORD_DATA_PAGES } from "../src/SnapshotWriter.js"
import { loadWp, WP_RECORD_BATCH_FIELDS, WP_RECORD_ENCODE_LZ4, WP_RECORD_HEADER_BYTES, WP_RECORD_PAGES_ENTRY_BYTES } from "../src/internal/ffi.js"
import { decodeRecordPayload, pagesTableCounts } from "../src/internal/recordCodec.js"
import { PAGE_ZERO } from "../src/WpNative.js"

/** A batch's buffers, as the engine fills them (data packed) and the encoder writes them (out, records). */
const batchBuffers = (capacity: number) => ({
  data: Buffer.alloc(capacity * 4096),
  regions: new Uint32Array(capacity),
  pages: new BigUint64Array(capacity),
  flags: new Uint8Array(capacity),
  out: Buffer.alloc(capacity * (WP_RECORD_HEADER_BYTES + WP_RECORD_PAGES_ENTRY_BYTES + 4096)),
  records: new Uint32Array(capacity * WP_RECORD_BATCH_FIELDS)
})

const view = (a: Uint32Array | BigUint64Array | Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

/** Encodes the first n entries; returns the record count. */
const encodeBatchSync = (b: ReturnType<typeof batchBuffers>, n: number, maxPages: number, lz4: boolean): number => {
  const rc: number = loadWp().wp_record_encode_batch([
    view(b.regions), view(b.pages), view(b.flags), n, b.data, maxPages, lz4 ? WP_RECORD_ENCODE_LZ4 : 0, b.out, BigInt(b.out.length), view(b.records), b.regions.length
  ])
  expect(rc).toBeGreaterThanOrEqual(0)
  return rc
}

/** A batch as the engine fills it: entries (region, page, zero), data of the non-zero ones packed (page i of region r: bytes r*16 + i%16 + 1, or random). */
const batch = (entries: Array<[region: number, page: number, zero: boolean]>, random = false) => {
  const b = batchBuffers(Math.max(entries.length, 4))
  let packed = 0
  entries.forEach(([region, page, zero], i) => {
    b.regions[i] = region
    b.pages[i] = BigInt(page)
    b.flags[i] = zero ? PAGE_ZERO : 0
    if (zero) return
    const at = packed++ * 4096
    if (random) for (let o = 0; o < 4096; o++) b.data[at + o] = (Math.random() * 256) | 0
    else b.data.fill(region * 16 + (page % 16) + 1, at, at + 4096)
  })
  return b
}

/** The records of an encoded batch: fields, and the record bytes (header + payload) of each. */
const recordsOf = (b: ReturnType<typeof batch>, count: number) => {
  const out = []
  let at = 0
  for (let r = 0; r < count; r++) {
    const f = b.records.subarray(r * 6, r * 6 + 6)
    const bytes = b.out.subarray(at, at + f[5]!)
    out.push({ region: f[0]!, firstPage: f[1]! + f[2]! * 2 ** 32, pageCount: f[3]!, encoding: f[4]!, bytes })
    at += f[5]!
  }
  return out
}

describe("wp_record_encode_batch (one native call per batch)", () => {
  it("cuts runs of consecutive pages of one region with one flag; each data record decodes to its pages, in entry order", () => {
    // Pool pages arrive in fault order: not sorted, several regions.
    const b = batch([[0, 5, false], [0, 6, false], [0, 7, true], [1, 8, false], [0, 2, false], [0, 3, true], [0, 4, true]])
    const records = recordsOf(b, encodeBatchSync(b, 7, RECORD_DATA_PAGES, false))
    expect(records.map((r) => [r.region, r.firstPage, r.pageCount, r.encoding])).toEqual([
      [0, 5, 2, 3], [0, 7, 1, 2], [1, 8, 1, 3], [0, 2, 1, 3], [0, 3, 2, 2]
    ])
    const pages = (r: (typeof records)[number]) => decodeRecordPayload(r.bytes.subarray(0, 32), r.bytes.subarray(32), r.pageCount)
    expect(pages(records[0]!)!.equals(Buffer.concat([Buffer.alloc(4096, 6), Buffer.alloc(4096, 7)]))).toBe(true)
    expect(pages(records[1]!)).toBeUndefined()
    expect(pages(records[2]!)!.equals(Buffer.alloc(4096, 16 + 8 + 1))).toBe(true)
    expect(pages(records[3]!)!.equals(Buffer.alloc(4096, 3))).toBe(true)
    // none: every block raw
    expect(pagesTableCounts(records[0]!.bytes.subarray(32), 2)).toEqual({ lz4: 0, raw: 2, zero: 0 })
  })

  it("lz4 blocks only where they are smaller (random pages stay raw); only the first n entries count", () => {
    const b = batch([[0, 0, false], [0, 1, false], [0, 2, false]])
    const records = recordsOf(b, encodeBatchSync(b, 2, RECORD_DATA_PAGES, true))
    expect(records).toHaveLength(1)
    expect(records[0]).toMatchObject({ firstPage: 0, pageCount: 2, encoding: 3 })
    expect(pagesTableCounts(records[0]!.bytes.subarray(32), 2)).toEqual({ lz4: 2, raw: 0, zero: 0 })
    expect(records[0]!.bytes.length).toBeLessThan(2 * 4096)
    const r = batch([[0, 0, false], [0, 1, false]], true)
    const random = recordsOf(r, encodeBatchSync(r, 2, RECORD_DATA_PAGES, true))
    expect(pagesTableCounts(random[0]!.bytes.subarray(32), 2)).toEqual({ lz4: 0, raw: 2, zero: 0 })
    expect(decodeRecordPayload(random[0]!.bytes.subarray(0, 32), random[0]!.bytes.subarray(32), 2)!.equals(r.data.subarray(0, 8192))).toBe(true)
  })

  it("a data run longer than 64 KiB is cut into records of at most RECORD_DATA_PAGES (a lazy restore reads one per fault); zero runs stay whole", () => {
    const entries: Array<[number, number, boolean]> = []
    for (let p = 0; p < 40; p++) entries.push([0, p, false])
    for (let p = 40; p < 100; p++) entries.push([0, p, true])
    const b = batch(entries)
    const records = recordsOf(b, encodeBatchSync(b, entries.length, RECORD_DATA_PAGES, true))
    expect(RECORD_DATA_PAGES * 4096).toBeLessThanOrEqual(64 * 1024)
    expect(records.map((r) => [r.firstPage, r.pageCount, r.encoding === 2])).toEqual([
      [0, 16, false], [16, 16, false], [32, 8, false], [40, 60, true]
    ])
  })
})
