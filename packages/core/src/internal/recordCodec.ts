/**
 * The one decoder of snapshot records, `packages/wp-native/include/vmsnap_record.h`,
 * bound for the TypeScript readers. `verify`, `restore` and the lazy restorer
 * (restore.c) all apply its rules, so they accept and refuse the same bytes
 * (issue 9; pinned by test/records.e2e.test.ts). The encoder runs in the
 * native writer (vmsnap_writer.h, internal/nativeWriter.ts).
 * @internal
 */
import type { JsExternal } from "ffi-rs"
import type { SnapshotFormatReason } from "../Errors.js"
import { PAGE_SIZE } from "../GuestMemory.js"
import { loadWp, WP_RECORD_PAGES, WP_RECORD_PAGES_ENTRY_BYTES } from "./ffi.js"

/** WP_RECORD_* reasons (vmsnap_record.h): the format error kind and what it means. */
const refusals: Record<number, readonly [SnapshotFormatReason, string]> = {
  1: ["BadRecord", "record magic missing (corrupt or misaligned record)"],
  2: ["BadIndex", "index entry and record disagree (region, first page or page count)"],
  3: ["BadRecord", "unknown record encoding, or reserved bytes not zero"],
  4: ["BadRecord", "record's stored bytes are impossible for its encoding and page count"],
  5: ["ChecksumMismatch", "record checksum mismatch"],
  6: ["BadRecord", "lz4 payload does not decode to pageCount x 4096 bytes (length prefix or block malformed; pages: a block is not exactly one page)"]
}

/** A record the decoder refused: why (WP_RECORD_*), as a format error kind and message. */
export class RecordRefused extends Error {
  constructor(readonly why: number, readonly kind: SnapshotFormatReason) {
    super(refusals[why]?.[1] ?? `record refused (reason ${why})`)
  }
}

const refused = (why: Uint32Array): RecordRefused => new RecordRefused(why[0]!, refusals[why[0]!]?.[0] ?? "BadRecord")

let codec: JsExternal | undefined
/** CRC tables, created once per process (8 KiB, read-only). */
const sharedCodec = (): JsExternal => (codec ??= loadWp().wp_record_codec_create([]))

const EMPTY = Buffer.alloc(0)

/**
 * Checks a 32-byte record header against its index entry; the payload's
 * stored bytes, bounded by the record's own page count (throws RecordRefused).
 */
export const checkRecordHeader = (h: Buffer, entry: { region: number; firstPage: number; pageCount: number }): number => {
  const out = new Uint32Array(2)
  const rc: number = loadWp().wp_record_check([h, entry.region, BigInt(entry.firstPage), entry.pageCount, Buffer.from(out.buffer)])
  if (rc < 0) throw refused(out.subarray(1))
  return out[0]!
}

/**
 * Checks the checksums (header + payload; pages: header + table, then each
 * block) and decodes: the pages (the payload itself for raw), or undefined
 * for a zero record.
 */
export const decodeRecordPayload = (h: Buffer, payload: Buffer | undefined, pageCount: number): Buffer | undefined => {
  const why = new Uint32Array(1)
  const lz4 = h[20] === 1 || h[20] === WP_RECORD_PAGES
  const out = lz4 ? Buffer.allocUnsafe(pageCount * PAGE_SIZE) : EMPTY
  const p = payload ?? EMPTY
  const rc: number = loadWp().wp_record_decode([sharedCodec(), h, p, BigInt(p.length), out, BigInt(out.length), Buffer.from(why.buffer)])
  if (rc < 0) throw refused(why)
  return rc === 2 ? undefined : lz4 ? out : p
}

/** Encoding-3 page counts of a record's table (8 bytes a page): zero (no block), raw (4096) and lz4 blocks. */
export const pagesTableCounts = (table: Buffer, pageCount: number): { lz4: number; raw: number; zero: number } => {
  const c = { lz4: 0, raw: 0, zero: 0 }
  for (let k = 0; k < pageCount; k++) {
    const bytes = table.readUInt32LE(k * WP_RECORD_PAGES_ENTRY_BYTES)
    if (bytes === 0) c.zero++
    else if (bytes === PAGE_SIZE) c.raw++
    else c.lz4++
  }
  return c
}
