/**
 * The native write-protect engine as a service. `WpNative.layer` loads
 * libvmsnap_wp.so (checking its ABI version); `engine` gives a scoped
 * `WpEngine` whose release always removes every protection first.
 *
 * Per-page work never crosses into JS: the fault thread copies and unprotects
 * natively. JS calls drain/sweep for batches of pages (~4 us per call).
 */
import { Context, Effect, Layer } from "effect"
import { CapabilityError, InvalidInput, NativeError } from "./Errors.js"
import { PAGE_SIZE, type MemoryRegion } from "./GuestMemory.js"
import { guestTooLarge } from "./GuestBound.js"
import { errnoReason } from "./internal/errno.js"
import {
  type JsExternal, loadWp, WP_ABI_VERSION, WP_FEATURE_MOVE, WP_FEATURE_PAGEFAULT_FLAG_WP, WP_FEATURE_WP_ASYNC,
  WP_FEATURE_WP_HUGETLBFS_SHMEM, WP_FEATURE_WP_UNPOPULATED, WP_OPEN_DEVICE, WP_PAGE_ZERO, WP_STATS_FIELDS, WP_STATS_WORDS
} from "./internal/ffi.js"
import { isNullPointer } from "ffi-rs"

/** What the kernel offers, from a probe on a throw-away userfaultfd. */
export interface Capabilities {
  readonly features: bigint
  readonly openedWith: "syscall" | "/dev/userfaultfd"
  readonly writeProtect: boolean
  readonly writeProtectShmem: boolean
  readonly writeProtectUnpopulated: boolean
  readonly writeProtectAsync: boolean
  readonly move: boolean
}

/** Engine counters (see wp_stats in vmsnap_engine.h). Times in nanoseconds. */
export interface EngineStats {
  readonly faults: number
  readonly faultsSpurious: number
  readonly fallbacks: number
  readonly fallbackNs: number
  readonly overflowPages: number
  readonly poolSlots: number
  readonly poolHighWater: number
  readonly poolUsed: number
  readonly pagesTotal: number
  readonly pagesSaved: number
  readonly pagesSwept: number
  readonly pagesZero: number
  readonly faultNsMax: number
  readonly faultNsTotal: number
  /** Neighbours saved along with a faulting page (fault-around). */
  readonly pagesFaultAround: number
  /** Writes let through while armed, before the cut. */
  readonly armFaults: number
  /** Pages re-protected at the cut: written since arming. */
  readonly cutPages: number
  /** Pages swept where the guest had just faulted (steering). */
  readonly pagesSteered: number
  /** Pages the guest discarded before they were saved whose content was lost (the snapshot failed). */
  readonly pagesDiscarded: number
  /** Bucket 2k: [2^k, 1.5*2^k) ns; bucket 2k+1: [1.5*2^k, 2^(k+1)) ns. */
  readonly faultHistogram: ReadonlyArray<number>
}

/** A swept page that is all zero (nothing copied): `WP_PAGE_ZERO`. */
export const PAGE_ZERO = WP_PAGE_ZERO

/** Caller-owned arrays filled by `WpEngine.nextBatchSync` (capacity: pages.length entries). */
export interface EngineBatch {
  /** Page contents, packed: at least pages.length * 4096 bytes. */
  readonly data: Buffer
  readonly regions: Uint32Array
  readonly pages: BigUint64Array
  readonly flags: Uint8Array
}

/**
 * Default fault-around window: 64 pages (256 KiB) saved per write fault. The
 * fault thread saves them while the sweep runs, so the pages left to fault on
 * run out sooner: against 16, a guest writing random pages flat out took
 * about a third fewer faults for the same writes (docs/BENCHMARKS.md, issue 14).
 */
export const DEFAULT_FAULT_AROUND_PAGES = 64

const nativeError = (op: string, rc: number) => new NativeError({ op, errno: -rc, reason: errnoReason(op, -rc) })

/** ENOMEM creating the engine: its copy pool (4 KiB per page) is the big allocation. */
const poolError = (pages: number) =>
  new NativeError({
    op: "engine", errno: 12,
    reason: `out of memory for a copy pool of ${pages} pages (${Math.ceil(pages / 256)} MiB): ask for a smaller pool (poolPages, --buffer)`
  })

/** A running engine: one per snapshot. Methods are synchronous native calls. */
export class WpEngine {
  constructor(
    private readonly handle: JsExternal,
    readonly regions: ReadonlyArray<MemoryRegion>,
    /** Process index -> pid (index 0 is this process). */
    private readonly pids: ReadonlyArray<number> = [process.pid]
  ) {}

  /** @internal the engine's handle, for the native writer (internal/nativeWriter.ts), which must be destroyed first. */
  get nativeHandle(): JsExternal {
    return this.handle
  }

  private call(op: string, rc: number): Effect.Effect<number, NativeError> {
    return rc < 0 ? Effect.fail(nativeError(op, rc)) : Effect.succeed(rc)
  }

  /** Ahead of the cut, while the guest runs: protect everything, only noting writes. */
  arm(): Effect.Effect<void, NativeError> {
    return Effect.suspend(() => this.call("arm", loadWp().wp_engine_arm([this.handle])))
  }

  /** The cut: write-protect every region (after `arm`: only what was written since). Callers pause vCPUs around it. */
  protect(): Effect.Effect<void, NativeError> {
    return Effect.suspend(() => this.call("protect", loadWp().wp_engine_protect([this.handle])))
  }

  /**
   * The next batch of captured pages, as the engine chooses (pool pages
   * first, then a sweep where the guest last faulted, then in address
   * order). Entry i is page `pages[i]` of region `regions[i]`, all zero when
   * `flags[i]` is PAGE_ZERO; the data of the other entries is packed into
   * `data` in entry order. Returns the number of entries (at most
   * `pages.length`); 0 when nothing is left to sweep right now.
   */
  nextBatchSync(out: EngineBatch): number {
    const view = (a: Uint32Array | BigUint64Array | Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)
    const rc: number = loadWp().wp_engine_next_batch([
      this.handle, out.data, view(out.regions), view(out.pages), view(out.flags), out.pages.length
    ])
    if (rc < 0) throw this.errorSync() ?? nativeError("snapshot", rc)
    return rc
  }

  /** The first failure the fault thread or sweep saw (e.g. a process exited, the guest discarded memory), if any. */
  errorSync(): NativeError | undefined {
    const process = new Int32Array(1)
    const rc: number = loadWp().wp_engine_error([this.handle, Buffer.from(process.buffer)])
    if (rc >= 0) return undefined
    const index = process[0]!
    const who = index > 0 ? `the process with pid ${this.pids[index] ?? "?"}` : index === 0 ? "this process" : "the guest"
    const errno = -rc
    const reason =
      errno === 3 ? `${who} exited during the snapshot`
      : errno === 14 ? `memory of ${who} was unmapped or moved (munmap/mremap) during the snapshot; memory being snapshotted must not be remapped until the snapshot ends`
      : errno === 61 ? `${who}: ${this.statsSync().pagesDiscarded} page(s): ${errnoReason("snapshot", errno)}`
      : `${who}: ${errnoReason("snapshot", errno)}`
    return new NativeError({ op: "snapshot", errno, reason })
  }

  doneSync(): boolean {
    return loadWp().wp_engine_done([this.handle]) === 1
  }

  statsSync(): EngineStats {
    const words = new BigUint64Array(WP_STATS_WORDS)
    loadWp().wp_engine_stats([this.handle, Buffer.from(words.buffer)])
    const n = (field: (typeof WP_STATS_FIELDS)[number]) => Number(words[WP_STATS_FIELDS.indexOf(field)])
    return {
      faults: n("faults"), faultsSpurious: n("faults_spurious"), fallbacks: n("fallbacks"), fallbackNs: n("fallback_ns"),
      overflowPages: n("overflow_pages"), poolSlots: n("pool_slots"), poolHighWater: n("pool_high_water"),
      poolUsed: n("pool_used"), pagesTotal: n("pages_total"), pagesSaved: n("pages_saved"), pagesSwept: n("pages_swept"),
      pagesZero: n("pages_zero"), faultNsMax: n("fault_ns_max"), faultNsTotal: n("fault_ns_total"),
      pagesFaultAround: n("pages_fault_around"), armFaults: n("arm_faults"), cutPages: n("cut_pages"),
      pagesSteered: n("pages_steered"), pagesDiscarded: n("pages_discarded"),
      faultHistogram: Array.from(words.subarray(WP_STATS_FIELDS.length), Number)
    }
  }

  unprotectAll(): Effect.Effect<void, NativeError> {
    return Effect.suspend(() => this.call("unprotect", loadWp().wp_engine_unprotect_all([this.handle])))
  }

  /** @internal destroy: stops the fault thread, unprotects, unregisters, frees. */
  destroySync(): number {
    return loadWp().wp_engine_destroy([this.handle])
  }
}

const load = Effect.try({
  try: () => {
    const lib = loadWp()
    const abi: number = lib.wp_abi_version([])
    if (abi !== WP_ABI_VERSION) throw new Error(`libvmsnap_wp.so has ABI ${abi}, this vmsnap needs ${WP_ABI_VERSION}: rebuild with \`pnpm install\``)
    return lib
  },
  catch: (e) => new CapabilityError({ missing: "native engine", reason: e instanceof Error ? e.message : String(e) })
})

const probe = Effect.gen(function* () {
  const lib = yield* load
  const features = new BigUint64Array(1)
  const how = new Int32Array(1)
  const rc: number = lib.wp_probe([Buffer.from(features.buffer), Buffer.from(how.buffer)])
  if (rc < 0) return yield* Effect.fail(nativeError("userfaultfd", rc))
  const f = features[0]!
  const caps: Capabilities = {
    features: f,
    openedWith: how[0] === WP_OPEN_DEVICE ? "/dev/userfaultfd" : "syscall",
    writeProtect: (f & WP_FEATURE_PAGEFAULT_FLAG_WP) !== 0n,
    writeProtectShmem: (f & WP_FEATURE_WP_HUGETLBFS_SHMEM) !== 0n,
    writeProtectUnpopulated: (f & WP_FEATURE_WP_UNPOPULATED) !== 0n,
    writeProtectAsync: (f & WP_FEATURE_WP_ASYNC) !== 0n,
    move: (f & WP_FEATURE_MOVE) !== 0n
  }
  return caps
})

/** Fails with a CapabilityError naming what is missing and the kernel that added it. */
const requireCapabilities = (caps: Capabilities, regions: ReadonlyArray<MemoryRegion>) => {
  if (!caps.writeProtect)
    return Effect.fail(new CapabilityError({ missing: "UFFD_FEATURE_PAGEFAULT_FLAG_WP", reason: "userfaultfd write-protect needs Linux 5.7+ built with CONFIG_HAVE_ARCH_USERFAULTFD_WP" }))
  if (!caps.writeProtectUnpopulated)
    return Effect.fail(new CapabilityError({ missing: "UFFD_FEATURE_WP_UNPOPULATED", reason: "write-protecting never-touched pages needs Linux 6.4+; without it a page first written during the snapshot would be missed" }))
  if (!caps.writeProtectShmem && regions.some((r) => r.kind === "memfd" || r.kind === "hugetlbfs"))
    return Effect.fail(new CapabilityError({ missing: "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", reason: "write-protect of memfd/shmem and hugetlbfs memory needs Linux 5.19+" }))
  return Effect.void
}

/**
 * Another process whose page tables hold guest memory (a VMM, a device
 * process): its userfaultfd (already negotiated with wp_uffd_negotiate) and
 * where it maps each region. With remote processes, `MemoryRegion.hostBase`
 * is this process's read-only view of the region (0: read the first
 * mapping with process_vm_readv).
 */
export interface RemoteProcess {
  readonly uffd: number
  readonly pid: number
  readonly mappings: ReadonlyArray<{ readonly region: number; readonly hva: bigint }>
}

export interface EngineOptions {
  readonly regions: ReadonlyArray<MemoryRegion>
  /** Remote mode: protect these processes instead of this one. */
  readonly processes?: ReadonlyArray<RemoteProcess>
  /**
   * Pool capacity in 4 KiB pages; 0 = synchronous (a faulting write waits for
   * the writer). More than the regions hold is never used: the engine gets at
   * most their page count.
   */
  readonly poolPages: number
  /** Fault-around window in pages (a power of two from 1 to 512; 1 = off; else InvalidInput). */
  readonly faultAroundPages?: number
  /** Sweep where the guest last faulted first (default true); false: front to back. */
  readonly steer?: boolean
  /** The most bytes of regions protected (GuestBound.ts; default this machine's memory); more is InvalidInput. */
  readonly maxGuestBytes?: number
}

export class WpNative extends Context.Service<WpNative, {
  readonly probe: Effect.Effect<Capabilities, NativeError | CapabilityError>
  /** A started engine with every region registered (not yet protected). */
  readonly engine: (options: EngineOptions) => Effect.Effect<WpEngine, NativeError | CapabilityError | InvalidInput, import("effect").Scope.Scope>
}>()("vmsnap/WpNative") {
  static readonly layer = Layer.succeed(this, {
    probe,
    engine: (options) =>
      Effect.gen(function* () {
        const around = options.faultAroundPages ?? DEFAULT_FAULT_AROUND_PAGES
        if (!Number.isInteger(around) || around < 1 || around > 512 || (around & (around - 1)) !== 0)
          return yield* Effect.fail(new InvalidInput({ reason: `faultAroundPages ${around}: the pages saved with each faulting page must be a power of two from 1 to 512 (1 = only the faulting page)` }))
        const total = options.regions.reduce((n, r) => n + r.size, 0)
        const tooLarge = guestTooLarge(total, "the memory to protect", "if the guest really is that large, raise the bound (maxGuestBytes; vmsnap agent and snapshot: --max-guest-size)", options.maxGuestBytes)
        if (tooLarge) return yield* Effect.fail(new InvalidInput({ reason: tooLarge }))
        const pool = Math.min(options.poolPages, total / PAGE_SIZE)
        const caps = yield* probe
        yield* requireCapabilities(caps, options.regions)
        const lib = yield* load
        return yield* Effect.acquireRelease(
          Effect.suspend(() => {
            const err = new Int32Array(1)
            const handle: JsExternal = lib.wp_engine_create([pool, Buffer.from(err.buffer)])
            if (isNullPointer(handle)) return Effect.fail(err[0] === -12 ? poolError(pool) : nativeError("userfaultfd", err[0]!))
            const engine = new WpEngine(handle, options.regions, [process.pid, ...(options.processes ?? []).map((p) => p.pid)])
            const failed = (op: string, rc: number) => {
              engine.destroySync()
              return Effect.fail(nativeError(op, rc))
            }
            for (const r of options.regions) {
              if (r.size % PAGE_SIZE !== 0 || r.hostBase % BigInt(PAGE_SIZE) !== 0n) return failed("register", -22)
              const rc: number = options.processes
                ? lib.wp_engine_add_shared_region([handle, r.hostBase, BigInt(r.size)])
                : lib.wp_engine_add_region([handle, r.hostBase, BigInt(r.size)])
              if (rc < 0) return failed("register", rc)
            }
            for (const p of options.processes ?? []) {
              const index: number = lib.wp_engine_add_process([handle, p.uffd, p.pid])
              if (index < 0) return failed("adopt userfaultfd", index)
              for (const m of p.mappings) {
                const rc: number = lib.wp_engine_map_region([handle, m.region, index, m.hva])
                if (rc < 0) return failed("register", rc)
              }
            }
            const aroundRc: number = lib.wp_engine_set_fault_around([handle, around])
            if (aroundRc < 0) return failed("fault-around", aroundRc)
            const steering: number = lib.wp_engine_set_steering([handle, options.steer === false ? 0 : 1])
            if (steering < 0) return failed("steering", steering)
            const rc: number = lib.wp_engine_start([handle])
            if (rc < 0) return failed("start", rc)
            return Effect.succeed(engine)
          }),
          (engine) => Effect.sync(() => engine.destroySync())
        )
      })
  })
}
