/**
 * The memory mappings of another process (`/proc/PID/smaps`), which of them
 * a write-protect snapshot can capture, and which ones a caller picked.
 *
 * Capturable (userfaultfd-wp registers them; source: the kernel's
 * `vma_can_userfault`): anonymous private mappings (heap, stacks, `mmap`
 * anonymous memory) and shared memory (memfd, /dev/shm, SysV, shared
 * anonymous), and hugetlbfs memory with 2 MiB or 1 GiB pages (MAP_HUGETLB,
 * memfd MFD_HUGETLB, files on hugetlbfs; captured at that page size). Not
 * capturable: private or shared mappings of regular files (a program's
 * `.data`: write-protect does not apply to them), device memory (VM_IO /
 * VM_PFNMAP) and ranges the process registered with a userfaultfd of its own.
 */
import { readFileSync, statfsSync } from "node:fs"
import { InvalidInput } from "./Errors.js"
import { hugePageSizes, type MemoryKind, PAGE_SIZE } from "./GuestMemory.js"

/** One line of /proc/PID/maps with what smaps adds. Addresses are the target's hva. */
export interface ProcessMapping {
  readonly start: bigint
  readonly end: bigint
  /** Bytes. */
  readonly size: number
  /** As in /proc/PID/maps: "rw-p", "rw-s", ... */
  readonly permissions: string
  /** The file's device ("MAJOR:MINOR", hex, as in /proc/PID/maps) and inode; offset in the file, bytes. */
  readonly device: string
  readonly inode: number
  readonly offset: bigint
  /** Path, "[heap]", "[stack]", "[anon:NAME]", "/memfd:NAME (deleted)", or "" (anonymous). */
  readonly name: string
  readonly vmFlags: ReadonlyArray<string>
  readonly kernelPageSize: number
}

/** A mapping and whether it can be captured: its kind, or why not. */
export type Capture = { readonly ok: true; readonly kind: MemoryKind } | { readonly ok: false; readonly why: string }

/** How a caller picks mappings: an hva range, a name, or a minimum size. */
export type MappingSelector =
  | { readonly _tag: "Range"; readonly start: bigint; readonly end: bigint }
  | { readonly _tag: "Name"; readonly name: string }
  | { readonly _tag: "MinSize"; readonly bytes: number }

const TMPFS_MAGIC = 0x01021994
/** At most this many mappings are read (a bound on what a hostile /proc could make us hold). */
const MAX_MAPPINGS = 1 << 20

/** Parses /proc/PID/smaps. */
export const parseSmaps = (text: string): Array<ProcessMapping> => {
  const out: Array<ProcessMapping> = []
  let current: { -readonly [K in keyof ProcessMapping]: ProcessMapping[K] } | undefined
  for (const line of text.split("\n")) {
    // A mapping's first line starts with its start address (lowercase hex); the fields after it with a capital
    // letter ("Size:", "KernelPageSize:", "VmFlags:"): only the former meet the regex (the parse is per VMM at serve's handshake).
    const c = line.charCodeAt(0)
    const head = (c >= 48 && c <= 57) || (c >= 97 && c <= 102) ? /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$/.exec(line) : null
    if (head) {
      if (out.length >= MAX_MAPPINGS) break
      const start = BigInt(`0x${head[1]}`)
      const end = BigInt(`0x${head[2]}`)
      current = {
        start, end, size: Number(end - start), permissions: head[3]!, offset: BigInt(`0x${head[4]}`), device: head[5]!, inode: Number(head[6]),
        name: head[7]!, vmFlags: [], kernelPageSize: PAGE_SIZE
      }
      out.push(current)
      continue
    }
    if (!current) continue
    if (c === 86 && line.startsWith("VmFlags:")) current.vmFlags = line.slice(8).trim().split(/\s+/)
    else if (c === 75 && line.startsWith("KernelPageSize:")) current.kernelPageSize = Number(/(\d+)/.exec(line)?.[1] ?? 4) * 1024
  }
  return out
}

export const readMappings = (pid: number): Array<ProcessMapping> => parseSmaps(readFileSync(`/proc/${pid}/smaps`, "utf8"))

/** Whether a shared or file-backed mapping is shmem: tmpfs behind /proc/PID/map_files, else by name. */
const isShmem = (pid: number, m: ProcessMapping): boolean => {
  try {
    return statfsSync(`/proc/${pid}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`).type === TMPFS_MAGIC
  } catch {
    return /^\/(memfd:|dev\/shm\/|SYSV|dev\/zero)/.test(m.name)
  }
}

/** Whether uffd-wp can capture this mapping, and as what. */
export const classify = (pid: number, m: ProcessMapping): Capture => {
  const flags = new Set(m.vmFlags)
  if (flags.has("io") || flags.has("pf")) return { ok: false, why: "device memory (VM_IO/VM_PFNMAP)" }
  const hugetlb = flags.has("ht") || m.kernelPageSize > PAGE_SIZE
  if (hugetlb && !hugePageSizes.includes(m.kernelPageSize))
    return { ok: false, why: `hugetlbfs with ${m.kernelPageSize / 1024} KiB pages: not a huge page size vmsnap knows (2 MiB, 1 GiB)` }
  if (flags.has("um") || flags.has("uw") || flags.has("ui")) return { ok: false, why: "already registered with a userfaultfd of the process itself" }
  if (m.permissions[0] !== "r") return { ok: false, why: "not readable (a guard page or PROT_NONE reservation)" }
  if (hugetlb) return { ok: true, kind: "hugetlbfs" } // protected and saved in whole huge pages
  const shared = m.permissions[3] === "s"
  if (m.inode === 0 && !shared) return { ok: true, kind: "anon" }
  if (isShmem(pid, m)) return { ok: true, kind: "memfd" }
  return { ok: false, why: shared ? "a shared mapping of a regular file: write-protect does not apply to it" : "a private mapping of a file (program data): write-protect does not apply to it" }
}

const hex = (n: bigint) => `0x${n.toString(16)}`

export const describeMapping = (m: ProcessMapping): string =>
  `${hex(m.start)}-${hex(m.end)} ${m.permissions} ${m.name || "(anonymous)"}`

/** Parses `--mapping`: "START-END" (hex, 0x optional) or a mapping name. */
export const parseMappingSelector = (text: string): MappingSelector => {
  const range = /^(?:0x)?([0-9a-f]+)-(?:0x)?([0-9a-f]+)$/i.exec(text.trim())
  if (range) return { _tag: "Range", start: BigInt(`0x${range[1]}`), end: BigInt(`0x${range[2]}`) }
  return { _tag: "Name", name: text }
}

const baseName = (name: string) => name.replace(/ \(deleted\)$/, "")

const matches = (s: MappingSelector, m: ProcessMapping): boolean =>
  s._tag === "Range" ? m.start >= s.start && m.end <= s.end
    : s._tag === "Name" ? m.name === s.name || baseName(m.name) === s.name || m.name === `[anon:${s.name}]` || baseName(m.name) === `/memfd:${s.name}`
      : m.size >= s.bytes && m.permissions[1] === "w" // a size picks among writable mappings, not reservations

export interface ChosenMapping extends ProcessMapping {
  readonly kind: MemoryKind
}

export interface Selection {
  readonly chosen: ReadonlyArray<ChosenMapping>
  /** Writable mappings left out, and why (for the report). */
  readonly skipped: ReadonlyArray<{ readonly mapping: ProcessMapping; readonly why: string }>
}

/**
 * Picks the mappings to capture. With no selector: every writable mapping
 * that can be captured. With selectors: the mappings any of them matches,
 * each of which must be capturable (else InvalidInput saying why).
 */
export const selectMappings = (pid: number, mappings: ReadonlyArray<ProcessMapping>, selectors: ReadonlyArray<MappingSelector>): Selection | InvalidInput => {
  const chosen: Array<ChosenMapping> = []
  const skipped: Array<{ mapping: ProcessMapping; why: string }> = []
  for (const m of mappings) {
    const picked = selectors.length === 0 ? m.permissions[1] === "w" : selectors.some((s) => matches(s, m))
    if (!picked) continue
    const c = classify(pid, m)
    if (c.ok) chosen.push({ ...m, kind: c.kind })
    else if (selectors.length > 0) return new InvalidInput({ reason: `mapping ${describeMapping(m)} cannot be captured: ${c.why}` })
    else skipped.push({ mapping: m, why: c.why })
  }
  for (const s of selectors) {
    if (!mappings.some((m) => matches(s, m)))
      return new InvalidInput({ reason: `no mapping of pid ${pid} matches ${s._tag === "Range" ? `${hex(s.start)}-${hex(s.end)} (a range must cover whole mappings)` : s._tag === "Name" ? `the name "${s.name}"` : `a size of at least ${s.bytes} bytes`}` })
  }
  if (chosen.length === 0) return new InvalidInput({ reason: `pid ${pid} has no mapping to capture${skipped.length ? ` (left out: ${skipped.map((s) => `${describeMapping(s.mapping)}: ${s.why}`).join("; ")})` : ""}` })
  return { chosen, skipped }
}

/** Two layouts are the same for the chosen ranges: each still one mapping with the same bounds, permissions and file. */
export const sameLayout = (chosen: ReadonlyArray<ProcessMapping>, now: ReadonlyArray<ProcessMapping>): string | undefined => {
  for (const c of chosen) {
    const m = now.find((n) => n.start === c.start)
    if (!m || m.end !== c.end || m.permissions !== c.permissions || m.inode !== c.inode || m.name !== c.name)
      return `mapping ${describeMapping(c)} ${m ? `became ${describeMapping(m)}` : "was unmapped or split"}`
  }
  return undefined
}

/** A stat(2) st_dev as /proc/PID/maps prints it: "MAJOR:MINOR" in hex, at least two digits each (the kernel's new_encode_dev). */
export const deviceName = (dev: number | bigint): string => {
  const d = BigInt(dev)
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn)
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn)
  return `${major.toString(16).padStart(2, "0")}:${minor.toString(16).padStart(2, "0")}`
}

/**
 * The same shared memory mapped writable at another address of the same
 * process (break8 H4): mappings of `all` outside [start, end) that map part
 * of the file range [offset, offset + size) of the same file (device and
 * inode), shared and writable. Page state is kept per mapped range, so a
 * page written through such an alias would be saved through the other
 * range after the cut: a snapshot of one instant needs none.
 */
export const aliasesOf = (
  range: { readonly start: bigint; readonly end: bigint; readonly device: string; readonly inode: number; readonly offset: bigint },
  all: ReadonlyArray<ProcessMapping>
): Array<ProcessMapping> => {
  const fileEnd = range.offset + (range.end - range.start)
  return all.filter((o) =>
    o.inode !== 0 && o.inode === range.inode && o.device === range.device && o.permissions[1] === "w" && o.permissions[3] === "s" &&
    (o.end <= range.start || o.start >= range.end) && o.offset < fileEnd && range.offset < o.offset + BigInt(o.size))
}
