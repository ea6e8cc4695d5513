/**
 * Snapshot files built byte by byte for the tests (docs/format.md), with the
 * format's own encoders: good records, and records tampered with after
 * encoding (the checksum recomputed or not), so each rule of the readers can
 * be hit on its own.
 */
import { writeFileSync } from "node:fs"
import { crc32 } from "node:zlib"
import {
  encodeHeader, encodeRecord, encodeTrailer, type Encoding, IndexBuilder, type MemoryKind, PAGE_SIZE, PAGES_ENTRY_BYTES, RECORD_HEADER_BYTES
} from "../packages/core/src/index.js"
import { loadWp, WP_RECORD_ENCODE_LZ4 } from "../packages/core/src/internal/ffi.js"

/**
 * An encoding-1 payload as format version 1's writer framed it (lz4-napi's
 * `compress`: a u32 length, then one LZ4 block), with a block of literals
 * only: a valid LZ4 block (one last sequence: token, length bytes, the
 * bytes) that liblz4 decodes like any other.
 */
export const legacyLz4 = (pages: Buffer): Buffer => {
  const n = pages.length
  const lengthBytes: Array<number> = [0xf0]
  for (let rest = n - 15; ; rest -= 255) {
    lengthBytes.push(Math.min(rest, 255))
    if (rest < 255) break
  }
  const prefix = Buffer.alloc(4)
  prefix.writeUInt32LE(n, 0)
  return Buffer.concat([prefix, Buffer.from(lengthBytes), pages])
}

/** An encoding-3 ("pages") payload by the writer's own encoder (wp_record_encode_pages): the table and the blocks. */
export const pagesPayload = (pages: Buffer, lz4 = true): Buffer => {
  const n = pages.length / PAGE_SIZE
  const out = Buffer.alloc(RECORD_HEADER_BYTES + n * (PAGES_ENTRY_BYTES + PAGE_SIZE))
  const bytes = Number(loadWp().wp_record_encode_pages([0, 0n, n, pages, lz4 ? WP_RECORD_ENCODE_LZ4 : 0, out, BigInt(out.length)]))
  if (bytes < 0) throw new Error(`wp_record_encode_pages: ${bytes}`)
  return out.subarray(RECORD_HEADER_BYTES, bytes)
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
  /** The pages (raw, lz4 and pages records): pageCount x 4096 bytes. */
  readonly pages?: Buffer
  /** Encoding 3: lz4 blocks where smaller (default true), else every block raw. */
  readonly lz4?: boolean
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

/** The record's payload as each encoding stores it (lz4: version 1's framing, see legacyLz4). */
const payloadOf = (r: RecordSpec): Buffer =>
  r.encoding === "zero" ? Buffer.alloc(0)
  : r.encoding === "raw" ? Buffer.from(r.pages!)
  : r.encoding === "lz4" ? legacyLz4(r.pages!)
  : pagesPayload(r.pages!, r.lz4 ?? true)

/** The bytes of a snapshot file with these regions and records (in this order); version: the header's (default: the writer's). */
export const buildSnapshot = (regions: ReadonlyArray<RegionSpec>, records: ReadonlyArray<RecordSpec>, options: { version?: number } = {}): Buffer => {
  const header = encodeHeader({
    ...(options.version === undefined ? {} : { version: options.version }),
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
    let payload = payloadOf(r)
    // The header CRC covers the payload; for encoding 3 only its table (each block has its own CRC).
    const covered = (p: Buffer) => (r.encoding === "pages" ? p.subarray(0, r.pageCount * PAGES_ENTRY_BYTES) : p)
    const h = encodeRecord(r, payload.length ? payload : undefined)
    h.writeUInt32LE(crc32(covered(payload), crc32(h.subarray(0, 28))), 28)
    if (r.tamper) {
      payload = r.tamper(h, payload) ?? payload
      h.writeUInt32LE(payload.length, 24)
      if (r.fixCrc ?? true) h.writeUInt32LE(crc32(covered(payload), crc32(h.subarray(0, 28))), 28)
    }
    index.add({ ...(r.entry ?? r), fileOffset: offset })
    parts.push(h, payload)
    offset += RECORD_HEADER_BYTES + payload.length
  }
  const idx = index.encode()
  parts.push(idx, encodeTrailer({ indexOffset: offset, indexBytes: idx.length, recordCount: index.count }))
  return Buffer.concat(parts)
}

export const writeSnapshot = (path: string, regions: ReadonlyArray<RegionSpec>, records: ReadonlyArray<RecordSpec>, options: { version?: number } = {}): string => {
  writeFileSync(path, buildSnapshot(regions, records, options), { mode: 0o600 })
  return path
}
