/**
 * The agent protocol, version 1 (docs/agent-protocol.md): newline-delimited
 * JSON over a Unix stream socket. A VMM's first message (`hello`) carries its
 * userfaultfd and guest-memory fds in SCM_RIGHTS. Addresses travel as hex
 * strings so 64-bit values survive JSON.
 */
import { ProtocolError } from "./Errors.js"
import { hugePageSizes, PAGE_SIZE } from "./GuestMemory.js"
import { COMPRESSIONS, type Compression } from "./SnapshotWriter.js"

export const PROTOCOL_VERSION = 1
/** Longest message accepted, in bytes. */
export const MAX_MESSAGE_BYTES = 1 << 20
export const MAX_HELLO_REGIONS = 64
/** Processes (a VMM and its devices) one VM may have: the engine protects at most 16 processes, one of them the agent itself (WP_MAX_PROCESSES in engine_internal.h). */
export const MAX_VM_PROCESSES = 15
/** Entries of a `bypassWriters` list, and characters of each. */
const MAX_BYPASS_WRITERS = 64
const MAX_BYPASS_WRITER_CHARS = 200

export { ProtocolError }

export interface HelloRegion {
  readonly gpa: bigint
  readonly size: number
  readonly pageSize: number
  /** Index into the message's fds, or null for anonymous memory. */
  readonly fd: number | null
  readonly offset: number
  /** Where the sender maps the region. */
  readonly hva: bigint
  /** Anonymous memory the sender backs with transparent huge pages: rebuilt (MADV_COLLAPSE) after a snapshot. */
  readonly thp: boolean
}

export interface Hello {
  readonly type: "hello"
  readonly version: number
  readonly vm: string
  readonly role: "vmm" | "device"
  /** Index of the userfaultfd among the message's fds. */
  readonly uffd: number
  readonly regions: ReadonlyArray<HelloRegion>
  /** The sender answers `prepare` (holds its balloon/discards from then until `done` or `failed`). */
  readonly prepare: boolean
  /** Devices that write guest memory without the page tables (VFIO, vDPA, io_uring fixed buffers, pwrite on the memfd); snapshots are refused while any is declared. */
  readonly bypassWriters: ReadonlyArray<string>
}

export interface SnapshotRequest {
  readonly type: "snapshot"
  readonly vm: string
  readonly path: string
  readonly poolPages?: number
  readonly faultAroundPages?: number
  /** "auto" (default: lz4 while no other batch is compressing, else raw), "lz4" or "none" (SnapshotWriter.ts). */
  readonly compression?: Compression
  /** Sweep where the guest writes first (default true). */
  readonly steer?: boolean
}

export type ClientRequest = SnapshotRequest | { readonly type: "list" }

/** Throws a ProtocolError with `reason` (parsers and admission checks). */
export const failProtocol = (reason: string): never => {
  throw new ProtocolError({ reason })
}
const fail = failProtocol

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v)

const address = (v: unknown, what: string): bigint => {
  if (typeof v === "string" && /^0x[0-9a-fA-F]{1,16}$/.test(v)) return BigInt(v)
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v)
  return fail(`${what} must be a hex string like "0x7f0000000000" (or a JSON whole number below 2^53)`)
}

const ADDRESS_END = 1n << 64n

const wholeNumber = (v: unknown, what: string): number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0
    ? v
    : fail(`${what} must be a whole number from 0 to 2^53 - 1 (got ${typeof v === "number" ? String(v) : typeof v})`)

const vmId = (v: unknown): string =>
  typeof v === "string" && /^[A-Za-z0-9._-]{1,128}$/.test(v) ? v : fail(`"vm" must be 1-128 characters of A-Z a-z 0-9 . _ -`)

/** Parses one line of JSON; ProtocolError when it is not a JSON object. */
export const parseMessage = (line: string): Record<string, unknown> => {
  let v: unknown
  try {
    v = JSON.parse(line)
  } catch {
    return fail("message is not valid JSON")
  }
  return isObject(v) ? v : fail("message is not a JSON object")
}

/** A `bypassWriters` list: short descriptions of devices, at most 64. */
export const parseBypassWriters = (v: unknown): ReadonlyArray<string> => {
  if (v === undefined) return []
  if (!Array.isArray(v) || v.length > MAX_BYPASS_WRITERS || !v.every((w) => typeof w === "string" && w.length > 0 && w.length <= MAX_BYPASS_WRITER_CHARS))
    return fail(`"bypassWriters" must be an array of at most ${MAX_BYPASS_WRITERS} device descriptions (strings of 1-${MAX_BYPASS_WRITER_CHARS} characters)`)
  return v as Array<string>
}

const flag = (v: unknown, what: string): boolean => (v === undefined ? false : typeof v === "boolean" ? v : fail(`${what} must be true or false`))

/** Checks a hello against the fds that came with it. */
export const parseHello = (m: Record<string, unknown>, fdCount: number): Hello => {
  if (m.version !== PROTOCOL_VERSION) fail(`unsupported protocol version ${JSON.stringify(m.version)}; this agent speaks ${PROTOCOL_VERSION}`)
  const role: "vmm" | "device" = m.role === undefined || m.role === "vmm" ? "vmm" : m.role === "device" ? "device" : fail(`"role" must be "vmm" or "device"`)
  const uffd = wholeNumber(m.uffd ?? 0, '"uffd"')
  if (fdCount === 0) fail("hello came without file descriptors: send the userfaultfd (and memory fds) with SCM_RIGHTS")
  if (uffd >= fdCount) fail(`"uffd" is fd index ${uffd}, but the message carried ${fdCount} fds`)
  if (!Array.isArray(m.regions) || m.regions.length === 0) fail(`"regions" must be a non-empty array`)
  const list = m.regions as Array<unknown>
  if (list.length > MAX_HELLO_REGIONS) fail(`at most ${MAX_HELLO_REGIONS} regions`)
  const regions = list.map((r, i): HelloRegion => {
    if (!isObject(r)) return fail(`region ${i} is not an object`)
    const size = wholeNumber(r.size, `region ${i} "size"`)
    if (size === 0 || size % PAGE_SIZE !== 0) fail(`region ${i} size ${size} is not a positive multiple of ${PAGE_SIZE}`)
    const pageSize = wholeNumber(r.pageSize ?? PAGE_SIZE, `region ${i} "pageSize"`)
    if (pageSize !== PAGE_SIZE && !hugePageSizes.includes(pageSize))
      fail(`region ${i} page size ${pageSize}: must be ${PAGE_SIZE}, or for hugetlbfs memory ${hugePageSizes.join(" or ")}`)
    if (size % pageSize !== 0) fail(`region ${i} size ${size} is not a whole number of its ${pageSize}-byte pages`)
    const fd = r.fd === null || r.fd === undefined ? null : wholeNumber(r.fd, `region ${i} "fd"`)
    if (fd !== null && (fd >= fdCount || fd === uffd)) fail(`region ${i} names fd index ${fd}, which is not a memory fd of this message`)
    const offset = wholeNumber(r.offset ?? 0, `region ${i} "offset"`)
    if (offset % pageSize !== 0) fail(`region ${i} offset ${offset} is not page aligned (${pageSize}-byte pages)`)
    const hva = address(r.hva, `region ${i} "hva"`)
    if (hva % BigInt(pageSize) !== 0n || hva === 0n) fail(`region ${i} hva is not a page-aligned address (${pageSize}-byte pages)`)
    const thp = flag(r.thp, `region ${i} "thp"`)
    if (thp && fd !== null) fail(`region ${i} "thp": only anonymous memory (no fd) is rebuilt into huge pages`)
    const gpa = address(r.gpa, `region ${i} "gpa"`)
    // Both ranges must end within 64 bits: a wrapped end would pass every later comparison.
    if (gpa + BigInt(size) > ADDRESS_END) fail(`region ${i}: gpa 0x${gpa.toString(16)} + size ${size} passes the end of the 64-bit guest-physical space`)
    if (hva + BigInt(size) > ADDRESS_END) fail(`region ${i}: hva 0x${hva.toString(16)} + size ${size} passes the end of the 64-bit address space`)
    return { gpa, size, pageSize, fd, offset, hva, thp }
  })
  const sorted = [...regions].sort((a, b) => (a.gpa < b.gpa ? -1 : 1))
  for (let i = 1; i < sorted.length; i++)
    if (sorted[i - 1]!.gpa + BigInt(sorted[i - 1]!.size) > sorted[i]!.gpa) fail("regions overlap in guest-physical space")
  return {
    type: "hello", version: PROTOCOL_VERSION, vm: vmId(m.vm), role, uffd, regions,
    prepare: flag(m.prepare, `"prepare"`), bypassWriters: parseBypassWriters(m.bypassWriters)
  }
}

export const parseClientRequest = (m: Record<string, unknown>): ClientRequest => {
  if (m.type === "list") return { type: "list" }
  if (m.type !== "snapshot") return fail(`unknown message type ${JSON.stringify(m.type)}`)
  if (typeof m.path !== "string" || m.path.length === 0) fail(`"path" must name the snapshot file`)
  const opt = (k: string) => (m[k] === undefined ? undefined : wholeNumber(m[k], `"${k}"`))
  if (m.compression !== undefined && !COMPRESSIONS.includes(m.compression as Compression)) fail(`"compression" must be "auto", "lz4" or "none"`)
  return {
    type: "snapshot", vm: vmId(m.vm), path: m.path as string, poolPages: opt("poolPages"), faultAroundPages: opt("faultAroundPages"),
    compression: m.compression as Compression | undefined,
    steer: m.steer === undefined ? undefined : m.steer === true
  }
}

/** One message as a line. */
export const encodeMessage = (m: Record<string, unknown>): string =>
  JSON.stringify(m, (_k, v) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v)) + "\n"

/** Splits a byte stream into lines; ProtocolError past MAX_MESSAGE_BYTES. */
export class LineReader {
  private pending = ""

  push(chunk: Buffer | string): Array<string> {
    this.pending += typeof chunk === "string" ? chunk : chunk.toString("utf8")
    const lines = this.pending.split("\n")
    this.pending = lines.pop()!
    if (this.pending.length > MAX_MESSAGE_BYTES) fail(`message longer than ${MAX_MESSAGE_BYTES} bytes`)
    return lines.filter((l) => l.trim().length > 0)
  }
}
