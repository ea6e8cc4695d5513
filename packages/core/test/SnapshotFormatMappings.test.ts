/**
 * The header's mapping table (flag bit 0, written by `snapshot --pid`): names
 * and permissions survive a round trip, a header without it is unchanged
 * (files written before it still read), and a damaged table is refused.
 */
import { crc32 } from "node:zlib"
import { describe, expect, it } from "vitest"
import { decodeHeader, encodeHeader, headerBytesFor, HEADER_FLAG_MAPPINGS, TRAILER_BYTES } from "../src/SnapshotFormat.js"

const header = (mapped: boolean) => ({
  snapshotId: "00112233-4455-6677-8899-aabbccddeeff",
  parentId: undefined,
  createdMs: 1,
  pageSize: 4096,
  regions: [
    { guestBase: 0x7f0000000000n, size: 8192, kind: "anon" as const, pageSize: 4096, ...(mapped ? { mapping: { name: "[heap]", permissions: "rw-p" } } : {}) },
    { guestBase: 0x7f1000000000n, size: 4096, kind: "memfd" as const, pageSize: 4096, ...(mapped ? { mapping: { name: "/memfd:pc.ram (deleted)", permissions: "rw-s" } } : {}) }
  ]
})

describe("mapping table in the header", () => {
  it("round-trips names and permissions", () => {
    const b = encodeHeader(header(true))
    expect(b.readUInt16LE(10)).toBe(HEADER_FLAG_MAPPINGS)
    const h = decodeHeader(b, b.length + TRAILER_BYTES)
    expect(h.regions.map((r) => r.mapping)).toEqual([
      { name: "[heap]", permissions: "rw-p" },
      { name: "/memfd:pc.ram (deleted)", permissions: "rw-s" }
    ])
  })

  it("leaves a header without mappings exactly as before (flags 0, fixed size)", () => {
    const b = encodeHeader(header(false))
    expect(b.readUInt16LE(10)).toBe(0)
    expect(b.length).toBe(headerBytesFor(2))
    expect(decodeHeader(b, b.length + TRAILER_BYTES).regions.every((r) => r.mapping === undefined)).toBe(true)
  })

  it("refuses a mapping table whose name runs past the header", () => {
    const b = encodeHeader(header(true))
    const at = headerBytesFor(2) - 4 + 4 // first mapping's nameBytes
    b.writeUInt32LE(4000, at)
    b.writeUInt32LE(crc32(b.subarray(0, b.length - 4)), b.length - 4)
    expect(() => decodeHeader(b, b.length + TRAILER_BYTES)).toThrow(/mapping 0 is malformed/)
  })
})
