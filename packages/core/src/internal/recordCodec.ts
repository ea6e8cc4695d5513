/**
 * The one decoder of snapshot records, `packages/wp-native/include/vmsnap_record.h`,
 * bound for the TypeScript readers. `verify`, `restore` and the lazy restorer
 * (restore.c) all apply its rules, so they accept and refuse the same bytes
 * (issue 9; pinned by test/records.e2e.test.ts). And its encoder: a writer
 * batch becomes records in one native call (`encodeBatch`).
 * @internal
 */
import { load, type JsExternal } from "ffi-rs"
import type { SnapshotFormatReason } from "../Errors.js"
import { PAGE_SIZE } from "../GuestMemory.js"
import { loadWp, symbolTables, WP_RECORD_BATCH_FIELDS, WP_RECORD_ENCODE_LZ4, WP_RECORD_HEADER_BYTES, WP_RECORD_PAGES, WP_RECORD_PAGES_ENTRY_BYTES } from "./ffi.js"

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

/** A writer batch's buffers (one set per batch in flight): the engine fills the first four, the encoder the last two. */
export interface BatchBuffers {
  /** Data of the non-zero pages, packed in entry order: capacity x 4096 bytes. */
  readonly data: Buffer
  readonly regions: Uint32Array
  readonly pages: BigUint64Array
  readonly flags: Uint8Array
  /** The encoded records, back to back: capacity x (32 + 8 + 4096) bytes (WP_RECORD_BATCH_BOUND). */
  readonly out: Buffer
  /** WP_RECORD_BATCH_FIELDS u32 per record: region, first page low, high, page count, encoding, bytes. */
  readonly records: Uint32Array
}

/** Buffers for batches of at most `capacity` pages. */
export const batchBuffers = (capacity: number): BatchBuffers => ({
  data: Buffer.allocUnsafeSlow(capacity * PAGE_SIZE),
  regions: new Uint32Array(capacity),
  pages: new BigUint64Array(capacity),
  flags: new Uint8Array(capacity),
  out: Buffer.allocUnsafeSlow(capacity * (WP_RECORD_HEADER_BYTES + WP_RECORD_PAGES_ENTRY_BYTES + PAGE_SIZE)),
  records: new Uint32Array(capacity * WP_RECORD_BATCH_FIELDS)
})

const view = (a: Uint32Array | BigUint64Array | Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

const batchArgs = (b: BatchBuffers, n: number, maxPages: number, lz4: boolean): Array<unknown> => [
  view(b.regions), view(b.pages), view(b.flags), n, b.data, maxPages, lz4 ? WP_RECORD_ENCODE_LZ4 : 0, b.out,
  BigInt(b.out.length), view(b.records), b.regions.length
]

const encoded = (rc: number): number => {
  // -EINVAL / -ENOBUFS: the buffers are sized by batchBuffers and maxPages by the writer, so a defect.
  if (rc < 0) throw new Error(`wp_record_encode_batch: ${rc}`)
  return rc
}

/**
 * Encodes the first n entries of a batch into records in `b.out` (zero runs:
 * zero records; data runs: encoding-3 records of at most maxPages pages,
 * lz4 blocks where they are smaller when `lz4`); returns the record count
 * (their fields in `b.records`). On this thread: for raw batches (a CRC and
 * a copy per page).
 */
export const encodeBatchSync = (b: BatchBuffers, n: number, maxPages: number, lz4: boolean): number =>
  encoded(loadWp().wp_record_encode_batch(batchArgs(b, n, maxPages, lz4)))

/** `encodeBatchSync` on a libuv pool thread (about 0.1 ms a hop here: for lz4 batches, about 1-3 ms of compression). */
export const encodeBatch = (b: BatchBuffers, n: number, maxPages: number, lz4: boolean): Promise<number> => {
  loadWp() // opens the library
  const { library, retType, paramsType } = symbolTables["vmsnap_record.h"].wp_record_encode_batch
  const call = load({ library, funcName: "wp_record_encode_batch", retType, paramsType: [...paramsType], paramsValue: batchArgs(b, n, maxPages, lz4), runInNewThread: true })
  return (call as unknown as Promise<number>).then(encoded)
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
