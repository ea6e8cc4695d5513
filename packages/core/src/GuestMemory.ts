/**
 * Guest memory vocabulary: guest-physical addresses (GPA), host-virtual
 * addresses (HVA), region-relative page indices, and memory regions.
 */
export const PAGE_SIZE = 4096
/** x86-64's hugetlbfs page sizes, which vmsnap captures in whole huge pages: 2 MiB and 1 GiB. */
export const HUGE_PAGE_SIZE = 2 * 1024 * 1024
export const GIGANTIC_PAGE_SIZE = 1024 * 1024 * 1024
export const hugePageSizes: ReadonlyArray<number> = [HUGE_PAGE_SIZE, GIGANTIC_PAGE_SIZE]

/** Guest-physical address. */
export type Gpa = bigint & { readonly _brand: "Gpa" }
/** Host-virtual address in the process that maps the region. */
export type Hva = bigint & { readonly _brand: "Hva" }

export const gpa = (n: bigint | number): Gpa => BigInt(n) as Gpa
export const hva = (n: bigint | number): Hva => BigInt(n) as Hva

/** How a region's memory is backed; recorded in the snapshot header. */
export type MemoryKind = "anon" | "anon-thp" | "memfd" | "hugetlbfs" | "file"

export const memoryKindCode: Record<MemoryKind, number> = { anon: 0, "anon-thp": 1, memfd: 2, hugetlbfs: 3, file: 4 }
export const memoryKindOf = (code: number): MemoryKind | undefined =>
  (Object.keys(memoryKindCode) as Array<MemoryKind>).find((k) => memoryKindCode[k] === code)

/** One contiguous range of guest RAM, as the VMM maps it. */
export interface MemoryRegion {
  readonly guestBase: Gpa
  readonly hostBase: Hva
  /** Bytes; a multiple of PAGE_SIZE. */
  readonly size: number
  readonly kind: MemoryKind
  /**
   * Bytes per page of the memory: 4096, or the huge page size of hugetlbfs
   * memory (2 MiB), which is protected and saved in whole huge pages. A
   * snapshot reads the real one from the mapping (/proc/PID/smaps) and
   * records that; default 4096.
   */
  readonly pageSize?: number
  /** A process's mapping (`snapshot --pid`): recorded in the file's mapping table. */
  readonly mapping?: { readonly name: string; readonly permissions: string }
}

export const pagesIn = (size: number): number => Math.ceil(size / PAGE_SIZE)

export const regionPages = (r: { readonly size: number }): number => pagesIn(r.size)

const units: Record<string, number> = {
  "": 1, b: 1, k: 1024, kb: 1024, kib: 1024, m: 1024 ** 2, mb: 1024 ** 2, mib: 1024 ** 2,
  g: 1024 ** 3, gb: 1024 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tb: 1024 ** 4, tib: 1024 ** 4
}

/** Parses "1GiB", "512MiB", "4096", "1.5G" into bytes; undefined when malformed. */
export const parseSize = (text: string): number | undefined => {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text)
  if (!m) return undefined
  const unit = units[m[2]!.toLowerCase()]
  if (unit === undefined) return undefined
  const bytes = Math.round(Number(m[1]) * unit)
  return Number.isSafeInteger(bytes) ? bytes : undefined
}

export const formatBytes = (n: number): string => {
  const steps = ["B", "KiB", "MiB", "GiB", "TiB"]
  let i = 0
  let v = n
  while (v >= 1024 && i < steps.length - 1) {
    v /= 1024
    i++
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${steps[i]}`
}
