/**
 * Snapshot files built byte by byte for the tests (docs/format.md), with the
 * format's own encoders: good records, and records tampered with after
 * encoding (the checksum recomputed or not), so each rule of the readers can
 * be hit on its own.
 */
import { writeFileSync } from "node:fs"
import { createRequire } from "node:module"
import { crc32 } from "node:zlib"
import {
  encodeHeader, encodeRecord, encodeTrailer, type Encoding, IndexBuilder, type MemoryKind, PAGE_SIZE, RECORD_HEADER_BYTES
} from "../packages/core/src/index.js"

// The writer's compressor, resolved where packages/core depends on it.
const { compressSync } = createRequire(new URL("../packages/core/package.json", import.meta.url))("lz4-napi") as {
  compressSync: (b: Buffer) => Buffer
}

export interface RegionSpec {
  readonly size: number | bigint
  readonly kind?: MemoryKind
  readonly pageSize?: number
}

export interface RecordSpec {
  readonly region: number
  readonly firstPage: number
  readonly pageCount: number
  readonly encoding: Encoding
  /** The pages (raw and lz4 records): pageCount x 4096 bytes. */
  readonly pages?: Buffer
  /** Changes header and payload after encoding (both may be edited in place). */
  readonly tamper?: (header: Buffer, payload: Buffer) => Buffer | void
  /** Recompute the checksum after tampering (default true: only the tampered rule fails). */
  readonly fixCrc?: boolean
  /** The index entry, if it must say something else than the record. */
  readonly entry?: { region: number; firstPage: number; pageCount: number }
}

/** Page i of a pattern: every byte depends on the page and its offset. */
export const patternPages = (pages: number, seed: number): Buffer => {
  const b = Buffer.alloc(pages * PAGE_SIZE)
  for (let i = 0; i < b.length; i++) b[i] = (i * 31 + seed * 7 + (i >> 12) * 13) & 0xff
  return b
}

/** The bytes of a snapshot file with these regions and records (in this order). */
export const buildSnapshot = (regions: ReadonlyArray<RegionSpec>, records: ReadonlyArray<RecordSpec>): Buffer => {
  const header = encodeHeader({
    snapshotId: "5eed5eed-0000-4000-8000-000000000001",
    parentId: undefined,
    createdMs: 1_700_000_000_000,
    pageSize: PAGE_SIZE,
    regions: regions.map((r, i) => ({ guestBase: BigInt(i) << 32n, size: Number(r.size), kind: r.kind ?? "anon", pageSize: r.pageSize ?? PAGE_SIZE }))
  })
  // encodeHeader writes sizes through BigInt(number): put sizes past 2^53 in directly, then fix the checksum.
  regions.forEach((r, i) => header.writeBigUInt64LE(BigInt(r.size), 64 + i * 32 + 8))
  header.writeUInt32LE(crc32(header.subarray(0, header.length - 4)), header.length - 4)
  const parts: Array<Buffer> = [header]
  const index = new IndexBuilder()
  let offset = header.length
  for (const r of records) {
    let payload = r.encoding === "zero" ? Buffer.alloc(0) : r.encoding === "raw" ? Buffer.from(r.pages!) : compressSync(r.pages!)
    const h = encodeRecord(r, payload.length ? payload : undefined)
    if (r.tamper) {
      payload = r.tamper(h, payload) ?? payload
      h.writeUInt32LE(payload.length, 24)
      if (r.fixCrc ?? true) h.writeUInt32LE(crc32(payload, crc32(h.subarray(0, 28))), 28)
    }
    index.add({ ...(r.entry ?? r), fileOffset: offset })
    parts.push(h, payload)
    offset += RECORD_HEADER_BYTES + payload.length
  }
  const idx = index.encode()
  parts.push(idx, encodeTrailer({ indexOffset: offset, indexBytes: idx.length, recordCount: index.count }))
  return Buffer.concat(parts)
}

export const writeSnapshot = (path: string, regions: ReadonlyArray<RegionSpec>, records: ReadonlyArray<RecordSpec>): string => {
  writeFileSync(path, buildSnapshot(regions, records), { mode: 0o600 })
  return path
}
