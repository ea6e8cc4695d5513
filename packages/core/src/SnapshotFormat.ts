/**
 * Snapshot file format v2 (v1 is read too). All integers little-endian. Full
 * description and rationale: docs/format.md. Layout:
 *
 *   Header    magic "VMSNAP\0\0" | version u16 = 2 (1 read too) | flags u16 | headerBytes u32
 *             | snapshotId 16 | parentId 16 (zero: full snapshot) | createdMs u64
 *             | regionCount u32 | pageSize u32 (4096)
 *             | regionCount x { guestBase u64 | size u64 | kind u32 | pageSize u32 | reserved u64 }
 *             | with flags bit 0 (a process's mappings, `snapshot --pid`):
 *               regionCount x { protection u32 (1 read, 2 write, 4 exec, 8 shared) | nameBytes u32 | name UTF-8 }
 *             | crc32 u32 (of every header byte before it)
 *   Records   in arrival order, each:
 *             magic "RCD1" | region u32 | firstPage u64 | pageCount u32 | encoding u8
 *             | reserved 3 | storedBytes u32 | crc32 u32 (of the 28 bytes before it + payload;
 *               encoding 3: + the table only) | payload (storedBytes)
 *             encodings: 0 raw (the pages), 1 lz4 (u32 length + one LZ4 block; written by v1 only),
 *             2 zero (no payload), 3 pages: pageCount x { blockBytes u32 | blockCrc u32 }, then the
 *             blocks (0 bytes: zero page, 4096: raw, 1..4095: an LZ4 block of one page)
 *   Index     magic "IDX1" | count u32 | count x { region u32 | pageCount u32 | firstPage u64
 *             | fileOffset u64 } | crc32 u32
 *   Trailer   magic "VMSNAPIX" | indexOffset u64 | indexBytes u64 | recordCount u32 | crc32 u32
 *
 * Every page of every region is covered by exactly one record. Decoders check
 * every size against the file before allocating.
 *
 * (Over 300 lines: the encoder and the checking decoder of each structure
 * above sit side by side, so the byte layout is written in one place.)
 */
import { crc32 } from "node:zlib"
import { memoryKindCode, memoryKindOf, type MemoryKind, PAGE_SIZE } from "./GuestMemory.js"

/** The version the writer writes. */
export const FORMAT_VERSION = 2
/** The versions readers accept: 1 differs only in that its writer never wrote encoding 3 (a reader of 1 alone refuses a version-2 file at open). */
export const READABLE_VERSIONS: ReadonlyArray<number> = [1, 2]
export const HEADER_MAGIC = Buffer.from("VMSNAP\0\0", "latin1")
export const RECORD_MAGIC = 0x31444352 // "RCD1"
export const INDEX_MAGIC = 0x31584449 // "IDX1"
export const TRAILER_MAGIC = Buffer.from("VMSNAPIX", "latin1")

export const HEADER_FIXED_BYTES = 64
export const REGION_ENTRY_BYTES = 32
export const RECORD_HEADER_BYTES = 32
export const INDEX_ENTRY_BYTES = 24
export const TRAILER_BYTES = 32
/** Upper bounds that keep a corrupt header from making us allocate wildly. */
export const MAX_REGIONS = 4096
export const MAX_RECORD_PAGES = 1 << 20
/** 2^46 bytes (64 TiB) per region: page counts and offsets stay exact in a JS number. */
export const MAX_REGION_BYTES = 1n << 46n

const HUGE_2M = 2 * 1024 * 1024
const HUGE_1G = 1024 * 1024 * 1024
/** The page sizes a region of each kind can have (its pageSize field): hugetlbfs only at its huge page size. */
export const pageSizesOf = (kind: MemoryKind): ReadonlyArray<number> => (kind === "hugetlbfs" ? [HUGE_2M, HUGE_1G] : [PAGE_SIZE])

/** Record encodings: "pages" (3) is what the writer writes for data, "zero" (2) for runs of zero pages; "raw" and "lz4" are read. */
export type Encoding = "raw" | "lz4" | "zero" | "pages"
export const encodingCode: Record<Encoding, number> = { raw: 0, lz4: 1, zero: 2, pages: 3 }
export const encodingOf = (code: number): Encoding | undefined =>
  code === 0 ? "raw" : code === 1 ? "lz4" : code === 2 ? "zero" : code === 3 ? "pages" : undefined
/** Encoding 3: bytes per table entry (blockBytes u32, blockCrc u32) and pages per record at most. */
export const PAGES_ENTRY_BYTES = 8
export const PAGES_MAX_PAGES = 256

export interface RegionDescriptor {
  readonly guestBase: bigint
  readonly size: number
  readonly kind: MemoryKind
  readonly pageSize: number
  /** For a process snapshot (`snapshot --pid`): the mapping's name and permissions ("rw-p"); guestBase is then its hva. */
  readonly mapping?: RegionMapping
}

export interface RegionMapping {
  /** As /proc/PID/maps shows it: a path, "[heap]", "/memfd:NAME (deleted)", or "" (anonymous). */
  readonly name: string
  /** "rwxs" style, as /proc/PID/maps: r/w/x or "-", then "s" (shared) or "p" (private). */
  readonly permissions: string
}

export interface SnapshotHeader {
  readonly version: number
  readonly snapshotId: string
  readonly parentId: string | undefined
  readonly createdMs: number
  readonly pageSize: number
  readonly regions: ReadonlyArray<RegionDescriptor>
  readonly headerBytes: number
}

export interface RecordHeader {
  readonly region: number
  readonly firstPage: number
  readonly pageCount: number
  readonly encoding: Encoding
  readonly storedBytes: number
  readonly crc: number
}

export interface IndexEntry {
  readonly region: number
  readonly firstPage: number
  readonly pageCount: number
  readonly fileOffset: number
}

export interface Trailer {
  readonly indexOffset: number
  readonly indexBytes: number
  readonly recordCount: number
}

const uuidBytes = (id: string | undefined): Buffer =>
  id === undefined ? Buffer.alloc(16) : Buffer.from(id.replace(/-/g, ""), "hex")

const uuidText = (b: Buffer): string => {
  const h = b.toString("hex")
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

/** Where each region starts in the concatenated raw image (docs/format.md): the sum of the sizes before it. */
export const concatOffsets = (regions: ReadonlyArray<{ readonly size: number }>): Array<number> => {
  let acc = 0
  return regions.map((r) => {
    const at = acc
    acc += r.size
    return at
  })
}

export const headerBytesFor = (regionCount: number) => HEADER_FIXED_BYTES + regionCount * REGION_ENTRY_BYTES + 4

/** Header flag: a mapping table (name, permissions per region) follows the region table. */
export const HEADER_FLAG_MAPPINGS = 1
/** Longest mapping name stored (PATH_MAX): bounds what a decoder accepts. */
export const MAX_MAPPING_NAME_BYTES = 4096

const protectionOf = (permissions: string): number =>
  (permissions[0] === "r" ? 1 : 0) | (permissions[1] === "w" ? 2 : 0) | (permissions[2] === "x" ? 4 : 0) | (permissions[3] === "s" ? 8 : 0)

const permissionsOf = (protection: number): string =>
  `${protection & 1 ? "r" : "-"}${protection & 2 ? "w" : "-"}${protection & 4 ? "x" : "-"}${protection & 8 ? "s" : "p"}`

const encodeMappings = (regions: ReadonlyArray<RegionDescriptor>): Buffer | undefined => {
  if (!regions.some((r) => r.mapping)) return undefined
  return Buffer.concat(regions.map((r) => {
    const name = Buffer.from(r.mapping?.name ?? "", "utf8").subarray(0, MAX_MAPPING_NAME_BYTES)
    const head = Buffer.alloc(8)
    head.writeUInt32LE(protectionOf(r.mapping?.permissions ?? "---p"), 0)
    head.writeUInt32LE(name.length, 4)
    return Buffer.concat([head, name])
  }))
}

/** The header's bytes; version FORMAT_VERSION unless given (tests write version-1 files). */
export const encodeHeader = (h: Omit<SnapshotHeader, "headerBytes" | "version"> & { readonly version?: number }): Buffer => {
  const mappings = encodeMappings(h.regions)
  const size = headerBytesFor(h.regions.length) + (mappings?.length ?? 0)
  const b = Buffer.alloc(size)
  HEADER_MAGIC.copy(b, 0)
  b.writeUInt16LE(h.version ?? FORMAT_VERSION, 8)
  b.writeUInt16LE(mappings ? HEADER_FLAG_MAPPINGS : 0, 10)
  b.writeUInt32LE(size, 12)
  uuidBytes(h.snapshotId).copy(b, 16)
  uuidBytes(h.parentId).copy(b, 32)
  b.writeBigUInt64LE(BigInt(h.createdMs), 48)
  b.writeUInt32LE(h.regions.length, 56)
  b.writeUInt32LE(h.pageSize, 60)
  h.regions.forEach((r, i) => {
    const o = HEADER_FIXED_BYTES + i * REGION_ENTRY_BYTES
    b.writeBigUInt64LE(r.guestBase, o)
    b.writeBigUInt64LE(BigInt(r.size), o + 8)
    b.writeUInt32LE(memoryKindCode[r.kind], o + 16)
    b.writeUInt32LE(r.pageSize, o + 20)
  })
  mappings?.copy(b, HEADER_FIXED_BYTES + h.regions.length * REGION_ENTRY_BYTES)
  b.writeUInt32LE(crc32(b.subarray(0, size - 4)), size - 4)
  return b
}

/** Decoding failures carry the format error kind; SnapshotReader adds the path. */
export class FormatViolation extends Error {
  constructor(readonly kind: import("./Errors.js").SnapshotFormatReason, message: string, readonly fileOffset?: number) {
    super(message)
  }
}

/** A u64 page number or offset as a number: past 2^53 none is valid (a region has at most 2^52 pages), so it is refused with its exact value. */
const u64Field = (b: Buffer, o: number, kind: import("./Errors.js").SnapshotFormatReason, what: string, fileOffset: number): number => {
  const v = b.readBigUInt64LE(o)
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatViolation(kind, `${what} ${v} is past 2^53: no region or file is that large`, fileOffset)
  return Number(v)
}

/** Reads the fixed part only: how long the whole header is. */
export const decodeHeaderPrefix = (b: Buffer, fileBytes: number): { headerBytes: number; regionCount: number } => {
  if (b.length < HEADER_FIXED_BYTES) throw new FormatViolation("Truncated", `file is ${fileBytes} bytes, shorter than a snapshot header`)
  if (!b.subarray(0, 8).equals(HEADER_MAGIC)) throw new FormatViolation("BadMagic", "no vmsnap header (bad magic): this is not a vmsnap snapshot file", 0)
  const version = b.readUInt16LE(8)
  if (!READABLE_VERSIONS.includes(version))
    throw new FormatViolation("UnsupportedVersion", `format version ${version}; this vmsnap reads versions ${READABLE_VERSIONS.join(" and ")}`, 8)
  const regionCount = b.readUInt32LE(56)
  const headerBytes = b.readUInt32LE(12)
  const withMappings = (b.readUInt16LE(10) & HEADER_FLAG_MAPPINGS) !== 0
  const base = headerBytesFor(regionCount)
  const sizeOk = withMappings
    ? headerBytes >= base + 8 * regionCount && headerBytes <= base + (8 + MAX_MAPPING_NAME_BYTES) * regionCount
    : headerBytes === base
  if (regionCount === 0 || regionCount > MAX_REGIONS || !sizeOk)
    throw new FormatViolation("ChecksumMismatch", "header is damaged (region count and header size disagree)", 12)
  if (headerBytes + TRAILER_BYTES > fileBytes) throw new FormatViolation("Truncated", `file is ${fileBytes} bytes, too short for its header and trailer`)
  return { headerBytes, regionCount }
}

export const decodeHeader = (b: Buffer, fileBytes: number): SnapshotHeader => {
  const { headerBytes, regionCount } = decodeHeaderPrefix(b, fileBytes)
  if (b.length < headerBytes) throw new FormatViolation("Truncated", "header is cut short")
  if (crc32(b.subarray(0, headerBytes - 4)) !== b.readUInt32LE(headerBytes - 4))
    throw new FormatViolation("ChecksumMismatch", "header checksum mismatch", 0)
  const pageSize = b.readUInt32LE(60)
  if (pageSize !== PAGE_SIZE) throw new FormatViolation("UnsupportedVersion", `page size ${pageSize}; only ${PAGE_SIZE} is supported`, 60)
  const regions: Array<RegionDescriptor> = []
  for (let i = 0; i < regionCount; i++) {
    const o = HEADER_FIXED_BYTES + i * REGION_ENTRY_BYTES
    const kind = memoryKindOf(b.readUInt32LE(o + 16))
    const size = b.readBigUInt64LE(o + 8)
    const regionPageSize = b.readUInt32LE(o + 20)
    if (kind === undefined || size === 0n || size % BigInt(PAGE_SIZE) !== 0n || size > MAX_REGION_BYTES)
      throw new FormatViolation("ChecksumMismatch", `region ${i} is malformed (kind ${b.readUInt32LE(o + 16)}, ${size} bytes)`, o)
    if (!pageSizesOf(kind).includes(regionPageSize) || size % BigInt(regionPageSize) !== 0n)
      throw new FormatViolation("BadRegion", `region ${i}: page size ${regionPageSize} is not one a ${kind} region can have (${pageSizesOf(kind).join(" or ")}, dividing its ${size} bytes)`, o + 20)
    if (b.readBigUInt64LE(o + 24) !== 0n)
      throw new FormatViolation("BadRegion", `region ${i}: reserved bytes are not zero (a field this vmsnap does not know)`, o + 24)
    const guestBase = b.readBigUInt64LE(o)
    if (guestBase + size > 1n << 64n) throw new FormatViolation("BadRegion", `region ${i}: base 0x${guestBase.toString(16)} + ${size} bytes passes the end of the 64-bit address space`, o)
    regions.push({ guestBase, size: Number(size), kind, pageSize: regionPageSize })
  }
  if (b.readUInt16LE(10) & HEADER_FLAG_MAPPINGS) decodeMappings(b, regionCount, headerBytes - 4, regions)
  const parent = b.subarray(32, 48)
  return {
    version: b.readUInt16LE(8),
    snapshotId: uuidText(b.subarray(16, 32)),
    parentId: parent.every((x) => x === 0) ? undefined : uuidText(parent),
    createdMs: Number(b.readBigUInt64LE(48)),
    pageSize,
    regions,
    headerBytes
  }
}

/** Reads the mapping table (checked against the header's end) into each region. */
const decodeMappings = (b: Buffer, regionCount: number, end: number, regions: Array<RegionDescriptor>) => {
  let o = HEADER_FIXED_BYTES + regionCount * REGION_ENTRY_BYTES
  for (let i = 0; i < regionCount; i++) {
    if (o + 8 > end) throw new FormatViolation("ChecksumMismatch", `mapping table cut short at region ${i}`, o)
    const protection = b.readUInt32LE(o)
    const nameBytes = b.readUInt32LE(o + 4)
    if (protection > 15 || nameBytes > MAX_MAPPING_NAME_BYTES || o + 8 + nameBytes > end)
      throw new FormatViolation("ChecksumMismatch", `mapping ${i} is malformed`, o)
    regions[i] = { ...regions[i]!, mapping: { name: b.toString("utf8", o + 8, o + 8 + nameBytes), permissions: permissionsOf(protection) } }
    o += 8 + nameBytes
  }
  if (o !== end) throw new FormatViolation("ChecksumMismatch", "mapping table and header size disagree", o)
}

/** A record header with its checksum over header and payload (encodings 0-2: the writer writes encoding 3 natively, recordCodec.ts). */
export const encodeRecord = (r: Omit<RecordHeader, "crc" | "storedBytes">, payload: Buffer | undefined): Buffer => {
  const h = Buffer.alloc(RECORD_HEADER_BYTES)
  h.writeUInt32LE(RECORD_MAGIC, 0)
  h.writeUInt32LE(r.region, 4)
  h.writeBigUInt64LE(BigInt(r.firstPage), 8)
  h.writeUInt32LE(r.pageCount, 16)
  h.writeUInt8(encodingCode[r.encoding], 20)
  h.writeUInt32LE(payload?.length ?? 0, 24)
  let crc = crc32(h.subarray(0, 28))
  if (payload) crc = crc32(payload, crc)
  h.writeUInt32LE(crc, 28)
  return h
}

export const decodeRecordHeader = (h: Buffer, fileOffset: number): RecordHeader => {
  if (h.length < RECORD_HEADER_BYTES) throw new FormatViolation("Truncated", "record header cut short", fileOffset)
  if (h.readUInt32LE(0) !== RECORD_MAGIC) throw new FormatViolation("BadRecord", "record magic missing (corrupt or misaligned record)", fileOffset)
  const encoding = encodingOf(h.readUInt8(20))
  if (encoding === undefined) throw new FormatViolation("BadRecord", `unknown record encoding ${h.readUInt8(20)}`, fileOffset + 20)
  return {
    region: h.readUInt32LE(4),
    firstPage: u64Field(h, 8, "BadRecord", "record first page", fileOffset + 8),
    pageCount: h.readUInt32LE(16),
    encoding,
    storedBytes: h.readUInt32LE(24),
    crc: h.readUInt32LE(28)
  }
}

/** Builds the index in place, 24 bytes an entry: millions of records stay cheap. */
export class IndexBuilder {
  private buf = Buffer.alloc(8 + 4096 * INDEX_ENTRY_BYTES + 4)
  count = 0

  add(e: IndexEntry): void {
    const o = 8 + this.count * INDEX_ENTRY_BYTES
    if (o + INDEX_ENTRY_BYTES + 4 > this.buf.length) {
      const bigger = Buffer.alloc(this.buf.length * 2)
      this.buf.copy(bigger, 0, 0, o)
      this.buf = bigger
    }
    this.buf.writeUInt32LE(e.region, o)
    this.buf.writeUInt32LE(e.pageCount, o + 4)
    this.buf.writeBigUInt64LE(BigInt(e.firstPage), o + 8)
    this.buf.writeBigUInt64LE(BigInt(e.fileOffset), o + 16)
    this.count++
  }

  /** The encoded index block: magic, count, the entries, crc32 (docs/format.md). */
  encode(): Buffer {
    const end = 8 + this.count * INDEX_ENTRY_BYTES
    const b = this.buf.subarray(0, end + 4)
    b.writeUInt32LE(INDEX_MAGIC, 0)
    b.writeUInt32LE(this.count, 4)
    b.writeUInt32LE(crc32(b.subarray(0, end)), end)
    return b
  }
}

export const decodeIndex = (b: Buffer, fileOffset: number): Array<IndexEntry> => {
  if (b.length < 12 || b.readUInt32LE(0) !== INDEX_MAGIC) throw new FormatViolation("BadIndex", "index magic missing", fileOffset)
  const count = b.readUInt32LE(4)
  if (b.length !== 8 + count * INDEX_ENTRY_BYTES + 4) throw new FormatViolation("BadIndex", "index size disagrees with its entry count", fileOffset + 4)
  if (crc32(b.subarray(0, b.length - 4)) !== b.readUInt32LE(b.length - 4))
    throw new FormatViolation("ChecksumMismatch", "index checksum mismatch", fileOffset)
  const out: Array<IndexEntry> = []
  for (let i = 0; i < count; i++) {
    const o = 8 + i * INDEX_ENTRY_BYTES
    out.push({
      region: b.readUInt32LE(o),
      pageCount: b.readUInt32LE(o + 4),
      firstPage: u64Field(b, o + 8, "BadIndex", `index entry ${i}: first page`, fileOffset + o + 8),
      fileOffset: u64Field(b, o + 16, "BadIndex", `index entry ${i}: file offset`, fileOffset + o + 16)
    })
  }
  return out
}

/**
 * The index's structure against the header (no record is read): each entry
 * names a region of the header and pages inside it, 1 to MAX_RECORD_PAGES
 * of them; offsets increase; every page of every region is covered exactly
 * once (a page stored twice, or missing, is refused). O(n log n) in the
 * entries, nothing allocated per page: `serve` runs it before accepting a
 * VMM, `verify` and every restore as part of opening.
 */
export const checkIndex = (header: SnapshotHeader, index: ReadonlyArray<IndexEntry>, indexOffset: number): void => {
  let lastOffset = -1
  for (const [i, e] of index.entries()) {
    const region = header.regions[e.region]
    if (!region) throw new FormatViolation("BadIndex", `index entry ${i} names region ${e.region}; the header has ${header.regions.length}`, e.fileOffset)
    if (e.pageCount === 0 || e.pageCount > MAX_RECORD_PAGES || e.firstPage + e.pageCount > region.size / PAGE_SIZE)
      throw new FormatViolation("BadIndex", `index entry ${i}: pages ${e.firstPage}+${e.pageCount} fall outside region ${e.region}`, e.fileOffset)
    if (e.fileOffset <= lastOffset || e.fileOffset < header.headerBytes || e.fileOffset + RECORD_HEADER_BYTES > indexOffset)
      throw new FormatViolation("BadIndex", `index entry ${i}: offset ${e.fileOffset} is out of order or outside the record area`, e.fileOffset)
    lastOffset = e.fileOffset
  }
  const order = index.map((_, i) => i).sort((a, b) => index[a]!.region - index[b]!.region || index[a]!.firstPage - index[b]!.firstPage)
  let k = 0
  for (const [r, region] of header.regions.entries()) {
    let next = 0
    for (; k < order.length && index[order[k]!]!.region === r; k++) {
      const e = index[order[k]!]!
      if (e.firstPage < next)
        throw new FormatViolation("Coverage", `page ${e.firstPage} of region ${r} is stored twice`, e.fileOffset)
      if (e.firstPage > next) throw new FormatViolation("Coverage", `page ${next} of region ${r} is missing`)
      next = e.firstPage + e.pageCount
    }
    if (next !== region.size / PAGE_SIZE) throw new FormatViolation("Coverage", `page ${next} of region ${r} is missing`)
  }
}

export const encodeTrailer = (t: Trailer): Buffer => {
  const b = Buffer.alloc(TRAILER_BYTES)
  TRAILER_MAGIC.copy(b, 0)
  b.writeBigUInt64LE(BigInt(t.indexOffset), 8)
  b.writeBigUInt64LE(BigInt(t.indexBytes), 16)
  b.writeUInt32LE(t.recordCount, 24)
  b.writeUInt32LE(crc32(b.subarray(0, 28)), 28)
  return b
}

export const decodeTrailer = (b: Buffer, fileBytes: number, headerBytes: number): Trailer => {
  const at = fileBytes - TRAILER_BYTES
  if (!b.subarray(0, 8).equals(TRAILER_MAGIC))
    throw new FormatViolation("Truncated", "no trailer at the end of the file: the file is truncated or was not finished", at)
  if (crc32(b.subarray(0, 28)) !== b.readUInt32LE(28)) throw new FormatViolation("ChecksumMismatch", "trailer checksum mismatch", at)
  const indexOffset = Number(b.readBigUInt64LE(8))
  const indexBytes = Number(b.readBigUInt64LE(16))
  const recordCount = b.readUInt32LE(24)
  if (indexOffset < headerBytes || indexOffset + indexBytes !== at || indexBytes !== 12 + recordCount * INDEX_ENTRY_BYTES)
    throw new FormatViolation("BadIndex", "trailer points outside the file", at)
  return { indexOffset, indexBytes, recordCount }
}
