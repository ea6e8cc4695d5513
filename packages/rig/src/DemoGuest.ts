/**
 * The built-in demo guest (libvmsnap_guest.so, guest/guest.c): guest memory plus native
 * writer threads that time their own writes. Used by `vmsnap demo` and the
 * tests as a stand-in for a VMM's vCPUs.
 */
import { Effect } from "effect"
import { isNullPointer } from "ffi-rs"
import {
  errnoReason, gpa, guestBucketLowerNs, hva, type Hva, InvalidInput, type LatencySummary, type MemoryKind, type MemoryRegion,
  NativeError, PAGE_SIZE, summarizeUs
} from "@vmsnap/core"
import { type JsExternal, loadGuest, VG_HIST_BUCKETS } from "./internal/ffi.js"

/**
 * The demo guest's memory: a MemoryKind ("hugetlbfs": a memfd MFD_HUGETLB of
 * 2 MiB pages), or hugetlbfs as private anonymous MAP_HUGETLB memory, or as
 * a memfd of 1 GiB pages.
 */
export type DemoMemory = MemoryKind | "hugetlbfs-anon" | "hugetlbfs-1g"

const kindCode: Partial<Record<DemoMemory, number>> = { anon: 0, "anon-thp": 1, memfd: 2, hugetlbfs: 3, "hugetlbfs-anon": 4, "hugetlbfs-1g": 5 }

export const Phase = { before: 0, during: 1, after: 2, idle: 3 } as const

export interface GuestLatency extends LatencySummary {
  readonly writes: number
  /** Writes per second over the phase's wall time. */
  readonly writesPerSecond: number
}

const check = (op: string, rc: number | bigint) => {
  const n = Number(rc)
  if (n < 0) throw new NativeError({ op, errno: -n, reason: errnoReason(op, -n) })
  return n
}

export class DemoGuest {
  private constructor(private readonly handle: JsExternal, readonly region: MemoryRegion) {}

  /** Maps `size` bytes of guest memory; unmapped (writers stopped) on scope close. */
  static make(size: number, memory: DemoMemory = "anon") {
    const kind: MemoryKind = memory === "hugetlbfs-anon" || memory === "hugetlbfs-1g" ? "hugetlbfs" : memory
    return Effect.acquireRelease(
      Effect.suspend((): Effect.Effect<DemoGuest, InvalidInput | NativeError> => {
        const code = kindCode[memory]
        if (code === undefined) return Effect.fail(new InvalidInput({ reason: `the demo guest cannot use ${kind} memory (anon, anon-thp, memfd, hugetlbfs, hugetlbfs-anon, hugetlbfs-1g)` }))
        if (size <= 0 || size % PAGE_SIZE !== 0) return Effect.fail(new InvalidInput({ reason: `guest size ${size} is not a positive multiple of 4 KiB` }))
        const lib = loadGuest()
        const err = new Int32Array(1)
        const handle: JsExternal = lib.vg_create([BigInt(size), code, Buffer.from(err.buffer)])
        if (isNullPointer(handle)) return Effect.fail(new NativeError({ op: "map guest memory", errno: -err[0]!, reason: errnoReason("mmap", -err[0]!) }))
        const base: bigint = lib.vg_hva([handle])
        return Effect.succeed(new DemoGuest(handle, { guestBase: gpa(0), hostBase: hva(base), size, kind }))
      }),
      (g) => Effect.sync(() => loadGuest().vg_destroy([g.handle]))
    )
  }

  /** The memfd of a memfd guest. */
  get memfd(): number {
    return loadGuest().vg_memfd([this.handle])
  }

  get pages() {
    return this.region.size / PAGE_SIZE
  }

  fill(firstPage: number, pages: number, seed = 1) {
    check("fill", loadGuest().vg_fill([this.handle, BigInt(firstPage), BigInt(pages), BigInt(seed)]))
  }

  /** Writers pick pages uniformly from [firstPage, firstPage + pages). */
  setTarget(firstPage: number, pages: number) {
    check("set target", loadGuest().vg_set_target([this.handle, BigInt(firstPage), BigInt(pages)]))
  }

  /** Starts writer threads; rate in pages/s across all of them, 0 = flat out. */
  start(writers: number, ratePagesPerSecond: number, seed = 1) {
    check("start writers", loadGuest().vg_start([this.handle, writers, BigInt(ratePagesPerSecond), BigInt(seed)]))
  }

  setPhase(phase: number) {
    check("set phase", loadGuest().vg_set_phase([this.handle, phase]))
  }

  readonly freeze: Effect.Effect<void, NativeError> = Effect.try({
    try: () => void check("freeze", loadGuest().vg_freeze([this.handle, 5000])),
    catch: (e) => e as NativeError
  })

  readonly thaw: Effect.Effect<void> = Effect.sync(() => void loadGuest().vg_thaw([this.handle]))

  /** Allocates the reference copy now, so taking it does not lengthen the freeze. */
  prepareReference() {
    check("reference copy", loadGuest().vg_prepare_reference([this.handle]))
  }

  /** While frozen: copy memory to the reference (unpopulated pages stay zero). */
  readonly takeReference: Effect.Effect<void, NativeError> = Effect.try({
    try: () => void check("reference copy", loadGuest().vg_take_reference([this.handle])),
    catch: (e) => e as NativeError
  })

  get referenceHva(): Hva {
    return hva(loadGuest().vg_reference_hva([this.handle]) as bigint)
  }

  /** Pages unpopulated at the cut that the writers have written since. */
  countWrittenUnpopulated(): number {
    return check("count", loadGuest().vg_count_written_unpopulated([this.handle]))
  }

  latency(phase: number): GuestLatency {
    const hist = new BigUint64Array(VG_HIST_BUCKETS)
    const summary = new BigUint64Array(4)
    check("latency", loadGuest().vg_latency([this.handle, phase, Buffer.from(hist.buffer), Buffer.from(summary.buffer)]))
    const counts = Array.from(hist, Number)
    const writes = Number(summary[0])
    const phaseNs = Number(summary[3])
    return { ...summarizeUs(counts, Number(summary[1]), guestBucketLowerNs), writes, writesPerSecond: phaseNs > 0 ? writes / (phaseNs / 1e9) : 0 }
  }

  stop() {
    loadGuest().vg_stop([this.handle])
  }
}

/** A fresh anonymous mapping (reads as zero), unmapped on scope close. */
export const scratchMemory = (size: number) =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      const base: bigint = loadGuest().vg_map([BigInt(size)])
      return base === 0n ? Effect.fail(new NativeError({ op: "map scratch memory", errno: 12, reason: "out of memory" })) : Effect.succeed(hva(base))
    }),
    (base) => Effect.sync(() => loadGuest().vg_unmap([base, BigInt(size)]))
  )

/** Index of the first differing page, or -1 when equal. */
export const comparePages = (a: Hva, b: Hva, size: number): number => Number(loadGuest().vg_compare([a, b, BigInt(size)]))

/** Copies `dst.length` bytes from host-virtual address `from` of this process. */
export const copyFromHva = (dst: Buffer, from: bigint): void => {
  loadGuest().vg_read([dst, from, BigInt(dst.length)])
}

/** Reads a byte of every page of a range, in order (each missing page faults in). */
export const touchPages = (base: bigint, size: number): void => {
  loadGuest().vg_touch([base, BigInt(size)])
}
