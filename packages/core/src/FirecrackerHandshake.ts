/**
 * The body of Firecracker's UFFD handshake and the checks `vmsnap serve`
 * makes of it before serving a page (docs/lazy-restore.md, "The handshake").
 *
 * The body is a JSON array of ranges `{"base_host_virt_addr", "size",
 * "offset", "page_size"}` (older VMMs send `"page_size_kib"`, which despite
 * its name is in bytes; either is accepted). Each range is then checked
 * against the VMM's own mappings in /proc/PID/smaps (PID from SO_PEERCRED:
 * the uffd must be the connecting process's): every byte mapped, every
 * mapping registered with a userfaultfd in MISSING mode (VmFlags `um`), and
 * backed by pages of the size the range declares (KernelPageSize). A range
 * that is not registered never faults: the guest would read zero there.
 */
import { ProtocolError } from "./Errors.js"
import { HUGE_PAGE_SIZE, PAGE_SIZE } from "./GuestMemory.js"
import { type ProcessMapping, readMappings } from "./ProcessMappings.js"

export interface FirecrackerRegion {
  /** Where the range is mapped in the VMM (hva). */
  readonly base_host_virt_addr: number
  /** Bytes. */
  readonly size: number
  /** Where the range's first byte is in the memory image, bytes. */
  readonly offset: number
  /** Bytes per page of the VMM's mapping. */
  readonly page_size: number
}

/** The page sizes serve installs (bytes): 4 KiB, and 2 MiB for hugetlbfs memory. */
export const SERVED_PAGE_SIZES: ReadonlyArray<number> = [PAGE_SIZE, HUGE_PAGE_SIZE]

const fail = (reason: string): never => {
  throw new ProtocolError({ reason })
}

const hex = (n: number | bigint) => `0x${n.toString(16)}`

/** Validates Firecracker's region list (shapes, sizes, alignment, overlap); throws ProtocolError with the reason. */
export const parseFirecrackerBody = (text: string): Array<FirecrackerRegion> => {
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch {
    return fail("the handshake body is not valid JSON (expected an array of regions)")
  }
  if (!Array.isArray(v) || v.length === 0) return fail("the handshake body must be a non-empty JSON array of regions")
  const regions = v.map((r: unknown, i) => {
    if (typeof r !== "object" || r === null) return fail(`region ${i} is not an object`)
    const o = r as Record<string, unknown>
    const num = (k: string) => {
      const x = o[k]
      return typeof x === "number" && Number.isSafeInteger(x) && x >= 0 ? x : fail(`region ${i}: "${k}" must be a non-negative integer`)
    }
    const pageSize = o.page_size !== undefined ? num("page_size") : o.page_size_kib !== undefined ? num("page_size_kib") : fail(`region ${i}: "page_size" (or "page_size_kib") is missing`)
    if (!SERVED_PAGE_SIZES.includes(pageSize)) fail(`region ${i}: page size ${pageSize}; vmsnap serves ${SERVED_PAGE_SIZES.join(" or ")}-byte pages`)
    const region = { base_host_virt_addr: num("base_host_virt_addr"), size: num("size"), offset: num("offset"), page_size: pageSize }
    if (region.size === 0) fail(`region ${i}: size is 0; a region holds at least one ${pageSize}-byte page`)
    if (region.size % pageSize) fail(`region ${i}: size ${region.size} is not a multiple of its ${pageSize}-byte pages`)
    if (region.base_host_virt_addr % pageSize) fail(`region ${i}: base_host_virt_addr ${hex(region.base_host_virt_addr)} is not a multiple of its ${pageSize}-byte pages`)
    if (region.offset % PAGE_SIZE) fail(`region ${i}: offset ${region.offset} in the memory image is not a multiple of ${PAGE_SIZE}`)
    return region
  })
  checkNoOverlap(regions)
  return regions
}

/** Two ranges at one hva would leave it ambiguous which image page goes there. */
export const checkNoOverlap = (regions: ReadonlyArray<{ readonly base_host_virt_addr: number; readonly size: number }>): void => {
  const sorted = regions.map((r, i) => ({ ...r, i })).sort((a, b) => a.base_host_virt_addr - b.base_host_virt_addr)
  for (let k = 1; k < sorted.length; k++) {
    const a = sorted[k - 1]!, b = sorted[k]!
    if (b.base_host_virt_addr < a.base_host_virt_addr + a.size) {
      const [x, y] = a.i < b.i ? [a, b] : [b, a]
      fail(`region ${y.i} (${hex(y.base_host_virt_addr)}, ${y.size} bytes) overlaps region ${x.i} (${hex(x.base_host_virt_addr)}, ${x.size} bytes): declare each page of the VMM's memory once`)
    }
  }
}

/** A span of the VMM's memory, [start, end) (hva). */
export interface HvaSpan {
  readonly start: bigint
  readonly end: bigint
}

/** [start, end) less the spans in `gone`, in order. */
const outside = (start: bigint, end: bigint, gone: ReadonlyArray<HvaSpan>): Array<HvaSpan> => {
  let pieces: Array<HvaSpan> = [{ start, end }]
  for (const g of gone)
    pieces = pieces.flatMap((p) => (g.end <= p.start || p.end <= g.start ? [p] : [
      ...(g.start > p.start ? [{ start: p.start, end: g.start }] : []),
      ...(g.end < p.end ? [{ start: g.end, end: p.end }] : [])
    ]))
  return pieces
}

/** What a VMM that changes its mappings right after the handshake must do (docs/lazy-restore.md, "The handshake"). */
const REMAP_HINT = "(a VMM that may remap or unmap guest memory at any time after sending the handshake must negotiate UFFD_FEATURE_EVENT_UNMAP, and EVENT_REMAP for mremap: serve then learns of the change and those pages are gone, not refused; without it, remap only once a first page was served)"

/** The mappings that cover [start, end), in order; the first byte not mapped, if any. */
const covering = (maps: ReadonlyArray<ProcessMapping>, start: bigint, end: bigint) => {
  const out: Array<ProcessMapping> = []
  let at = start
  for (const m of maps) {
    if (m.end <= at || at >= end) continue
    if (m.start > at) return { maps: out, hole: at }
    out.push(m)
    at = m.end
  }
  return { maps: out, hole: at < end ? at : undefined }
}

/** What the VMM's mappings say of its ranges. */
export interface VmmMappings {
  /** Registered pages that share a mapping with a declared range but that no range declares (a fault there gets a memory error, docs/lazy-restore.md). */
  readonly undeclared: Array<string>
  /** Per region: shared memory (memfd, shmem, hugetlbfs memfd: MAP_SHARED), whose pages may sit in the page cache unmapped. */
  readonly shared: Array<boolean>
}

/**
 * Checks the ranges against the VMM's mappings (see the module doc); throws
 * ProtocolError with the reason. `gone`: spans the VMM unmapped or remapped
 * right after sending the handshake (their UNMAP/REMAP events were read,
 * wp_restorer_take_early_events): not checked, they are gone.
 *
 * Reads all of /proc/PID/smaps (bounded by the kernel's vm.max_map_count and
 * parseSmaps' limit), once per VMM, at the handshake.
 */
export const checkVmmMappings = (pid: number, regions: ReadonlyArray<FirecrackerRegion>, gone: ReadonlyArray<HvaSpan> = []): VmmMappings => {
  if (pid <= 0) return fail("the VMM's pid cannot be learned (SO_PEERCRED), so its ranges cannot be checked")
  let maps: Array<ProcessMapping>
  try {
    maps = readMappings(pid).sort((a, b) => (a.start < b.start ? -1 : 1))
  } catch (e) {
    return fail(`cannot read /proc/${pid}/smaps to check that the ranges are mapped and registered (${(e as Error).message}); serve must be able to read its VMMs' /proc files (same uid, or root)`)
  }
  const used = new Set<ProcessMapping>()
  const shared = regions.map((r, i) => {
    const where = `region ${i} (${hex(BigInt(r.base_host_virt_addr))}-${hex(BigInt(r.base_host_virt_addr) + BigInt(r.size))})`
    const all: Array<ProcessMapping> = []
    for (const { start, end } of outside(BigInt(r.base_host_virt_addr), BigInt(r.base_host_virt_addr) + BigInt(r.size), gone)) {
      const { maps: parts, hole } = covering(maps, start, end)
      if (hole !== undefined) fail(`${where}: ${hex(hole)} is not mapped in the VMM (pid ${pid}); declare only memory the VMM has mapped ${REMAP_HINT}`)
      for (const m of parts) {
        used.add(m)
        all.push(m)
        if (m.kernelPageSize !== r.page_size)
          fail(`${where} is backed by ${m.kernelPageSize / 1024} KiB pages${m.vmFlags.includes("ht") ? " (hugetlbfs)" : ""} but declares ${r.page_size}-byte pages; serving it at another page size would be wrong`)
        if (!m.vmFlags.includes("um"))
          fail(`${where}: ${hex(m.start > start ? m.start : start)}-${hex(m.end < end ? m.end : end)} is not registered with a userfaultfd in MISSING mode; register every declared range (UFFDIO_REGISTER) before the handshake, else its pages read zero ${REMAP_HINT}`)
      }
    }
    const kinds = new Set(all.map((m) => m.permissions[3] === "s"))
    if (kinds.size > 1) fail(`${where} spans shared and private mappings: declare each as a region of its own`)
    return kinds.has(true)
  })
  const warnings: Array<string> = []
  for (const m of used) {
    let at = m.start
    const declared = regions
      .map((r) => ({ start: BigInt(r.base_host_virt_addr), end: BigInt(r.base_host_virt_addr) + BigInt(r.size) }))
      .filter((d) => d.start < m.end && m.start < d.end)
      .sort((a, b) => (a.start < b.start ? -1 : 1))
    for (const d of [...declared, { start: m.end, end: m.end }]) {
      if (d.start > at) warnings.push(`${hex(at)}-${hex(d.start)} is registered with the userfaultfd but no region declares it: a fault there gets a memory error`)
      if (d.end > at) at = d.end
    }
  }
  return { undeclared: warnings, shared }
}

/**
 * After checkVmmMappings refused (`refusal`): the VMM may have unmapped or
 * remapped part of its ranges right after sending the handshake, which it
 * cannot tell from "after" (no reply). Where it negotiated
 * UFFD_FEATURE_EVENT_UNMAP, that change queued an event on the uffd:
 * `goneAfterSending` reads them (wp_restorer_take_early_events; all the
 * spans so far) and those spans are gone, the rest is checked again (a
 * change may come meanwhile: a few rounds). No new event: the refusal
 * stands (without the feature nothing tells a remap from memory never
 * registered). docs/lazy-restore.md, "What after the handshake means".
 */
export const recheckVmmMappings = (pid: number, regions: ReadonlyArray<FirecrackerRegion>, refusal: ProtocolError, goneAfterSending: () => ReadonlyArray<HvaSpan>): VmmMappings => {
  for (let round = 0, seen = 0; round < 4; round++) {
    const gone = goneAfterSending()
    if (gone.length === seen) break
    seen = gone.length
    try {
      return checkVmmMappings(pid, regions, gone)
    } catch (e) {
      refusal = e as ProtocolError
    }
  }
  throw refusal
}
