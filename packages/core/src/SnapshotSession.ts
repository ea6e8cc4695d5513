/**
 * A live snapshot session.
 *
 * Resources are acquired in this order: output file (temporary name) →
 * engine (userfaultfd registered, fault thread running) → protection (the cut)
 * → writer fiber. They are released in reverse: the writer is awaited or
 * interrupted → every protection is removed and the engine destroyed → the
 * temporary file is closed and, unless the snapshot completed, deleted. So on
 * success, failure and interruption alike the guest is never left
 * write-protected and nothing partial appears under the final name.
 */
import { Effect, Fiber } from "effect"
import { randomUUID } from "node:crypto"
import type { AtomicFileOptions } from "./AtomicFile.js"
import { InvalidInput, type VmsnapError } from "./Errors.js"
import { formatBytes, hugePageSizes, PAGE_SIZE, type MemoryRegion } from "./GuestMemory.js"
import { type ProcessMapping, readMappings } from "./ProcessMappings.js"
import { SnapshotFile } from "./SnapshotFile.js"
import { writeSnapshotBody, type WriterOptions } from "./SnapshotWriter.js"
import { errnoName } from "./internal/errno.js"
import { loadWp } from "./internal/ffi.js"
import { type EngineStats, type RemoteProcess, type WpEngine, WpNative } from "./WpNative.js"

export interface SnapshotOptions extends WriterOptions {
  readonly regions: ReadonlyArray<MemoryRegion>
  /** Final path of the snapshot file. */
  readonly path: string
  /** How the output is created (mode, owner, a confined directory); default mode 0600. */
  readonly output?: AtomicFileOptions
  /** Pool capacity in 4 KiB pages; 0 = synchronous. Default 16384 (64 MiB). */
  readonly poolPages?: number
  /** Remote mode: protect these processes (a VMM and its devices) instead of this one. */
  readonly processes?: ReadonlyArray<RemoteProcess>
  /** Pages saved per write fault (power of two up to 512; 1 = off). Default 64 (DEFAULT_FAULT_AROUND_PAGES). */
  readonly faultAroundPages?: number
  /** The most bytes of regions protected (GuestBound.ts); default this machine's memory; more fails InvalidInput. */
  readonly maxGuestBytes?: number
  /** Pause the guest's vCPUs: runs right before the cut. */
  readonly freeze?: Effect.Effect<void, VmsnapError>
  /** Resume them: runs right after the cut, also when the cut fails. */
  readonly thaw?: Effect.Effect<void, VmsnapError>
  /** Runs while frozen, after the cut (tests take their reference copy here). */
  readonly atCut?: Effect.Effect<void, VmsnapError>
  /** Runs once every page is written, before the file is committed, while still registered: a failure abandons the file. */
  readonly beforeCommit?: Effect.Effect<void, VmsnapError>
  /**
   * Runs on a failure once the memory is registered, before anything is
   * released (the engine alive, every range still registered): returns the
   * error to report, e.g. one that says what the guest did. The session fails
   * whatever it returns.
   */
  readonly explainFailure?: (error: VmsnapError) => Effect.Effect<VmsnapError>
  readonly parentId?: string
  /**
   * Arm the protection while the guest runs, so the cut re-protects only
   * what was written since: a pause independent of guest size. Default true.
   */
  readonly arm?: boolean
  /** Rebuild huge pages of anon-thp regions afterwards (MADV_COLLAPSE). Default true. */
  readonly collapseHugePages?: boolean
}

export interface SnapshotResult {
  readonly path: string
  readonly snapshotId: string
  readonly sizeBytes: number
  readonly fileBytes: number
  /** Time the guest was frozen for the cut (protect only, hooks excluded). */
  readonly pauseMs: number
  /** Time spent arming the protection before the freeze (the guest runs meanwhile). */
  readonly armMs: number
  /** From the cut to the file being durable under its final name. */
  readonly durationMs: number
  readonly records: number
  /** Pages the sweep saved where the guest had just faulted. */
  readonly steeredPages: number
  readonly engine: EngineStats
  /** Rebuilding split huge pages after the snapshot (anon-thp regions); null when there were none. */
  readonly collapse: { readonly ms: number; readonly ok: boolean; readonly error: string | null } | null
}

export const DEFAULT_POOL_PAGES = 16384

const nowMs = () => performance.now()

const validate = (options: SnapshotOptions) => {
  if (options.regions.length === 0) return Effect.fail(new InvalidInput({ reason: "no memory regions to snapshot" }))
  for (const r of options.regions) {
    if (r.size <= 0 || r.size % PAGE_SIZE !== 0 || !Number.isSafeInteger(r.size))
      return Effect.fail(new InvalidInput({ reason: `region at guest ${r.guestBase} has size ${r.size}: must be a positive multiple of ${PAGE_SIZE}` }))
  }
  const pool = options.poolPages ?? DEFAULT_POOL_PAGES
  if (!Number.isInteger(pool) || pool < 0 || pool > 1 << 26)
    return Effect.fail(new InvalidInput({ reason: `pool of ${pool} pages: must be a whole number from 0 to ${1 << 26}` }))
  return Effect.void
}

/**
 * The regions as the kernel maps them: each one's real page size, from the
 * mapping of the first process that registers it (KernelPageSize in
 * /proc/PID/smaps, the same source the engine reads), never what the caller
 * declared. Memory with 2 MiB or 1 GiB pages is hugetlbfs and is recorded
 * so; the engine protects and saves it in whole huge pages. A region not
 * made of whole huge pages is refused.
 */
const withRealPageSizes = (options: SnapshotOptions): Effect.Effect<ReadonlyArray<MemoryRegion>, InvalidInput> =>
  Effect.suspend(() => {
    const maps = new Map<number, ReadonlyArray<ProcessMapping>>()
    const mappingsOf = (pid: number) => {
      if (!maps.has(pid)) maps.set(pid, (() => { try { return readMappings(pid) } catch { return [] } })())
      return maps.get(pid)!
    }
    const out: Array<MemoryRegion> = []
    for (const [i, r] of options.regions.entries()) {
      const remote = options.processes?.flatMap((p) => p.mappings.filter((m) => m.region === i).map((m) => ({ pid: p.pid, hva: m.hva })))[0]
      const at = options.processes ? remote : { pid: process.pid, hva: r.hostBase as bigint }
      // Nothing mapped there: registering fails with EFAULT, which says so.
      const real = at && mappingsOf(at.pid).find((m) => at.hva >= m.start && at.hva < m.end)?.kernelPageSize
      const where = `region at guest 0x${r.guestBase.toString(16)} (${formatBytes(r.size)})`
      if (real === undefined) out.push(r)
      else if (real === PAGE_SIZE) {
        if (r.kind === "hugetlbfs") return Effect.fail(new InvalidInput({ reason: `${where} is declared hugetlbfs but its memory has 4 KiB pages` }))
        out.push({ ...r, pageSize: PAGE_SIZE })
      } else if (!hugePageSizes.includes(real))
        return Effect.fail(new InvalidInput({ reason: `${where} has ${real}-byte pages: not a hugetlbfs page size vmsnap knows (2 MiB, 1 GiB)` }))
      else if (r.size % real !== 0)
        return Effect.fail(new InvalidInput({ reason: `${where} has ${formatBytes(real)} pages (hugetlbfs): its size must be a whole number of them` }))
      else out.push({ ...r, kind: "hugetlbfs", pageSize: real })
    }
    return Effect.succeed(out)
  })

/**
 * 4 KiB unprotects split transparent huge pages; once the snapshot is over
 * and the memory unregistered, rebuild them so the guest does not run slower
 * afterwards. Best effort: the snapshot is already complete.
 */
const collapseHugePages = (options: SnapshotOptions) =>
  Effect.sync((): SnapshotResult["collapse"] => {
    if (options.collapseHugePages === false) return null
    const thp = options.regions.map((r, i) => ({ r, i })).filter(({ r }) => r.kind === "anon-thp")
    if (thp.length === 0) return null
    const t0 = nowMs()
    const errors: Array<string> = []
    for (const { r, i } of thp) {
      const targets = options.processes
        ? options.processes.flatMap((p) => p.mappings.filter((m) => m.region === i).map((m) => ({ pid: p.pid, hva: m.hva })))
        : [{ pid: 0, hva: r.hostBase as bigint }]
      for (const t of targets) {
        const rc: number = loadWp().wp_collapse([t.pid, t.hva, BigInt(r.size)])
        if (rc < 0) errors.push(`MADV_COLLAPSE: ${errnoName(-rc)}`)
      }
    }
    return { ms: nowMs() - t0, ok: errors.length === 0, error: errors[0] ?? null }
  })

/** Takes one live snapshot of `regions` into `path`. */
export const takeSnapshot = (options: SnapshotOptions): Effect.Effect<SnapshotResult, VmsnapError, WpNative> =>
  Effect.flatMap(takeSnapshotScoped(options), (result) =>
    Effect.map(collapseHugePages(options), (collapse) => ({ ...result, collapse }))
  )

/** The output file under a temporary name, its header written (scoped: deleted unless committed). */
const openOutput = (options: SnapshotOptions, snapshotId: string) =>
  SnapshotFile.create(options.path, options.output, {
    snapshotId,
    parentId: options.parentId,
    createdMs: Date.now(),
    pageSize: PAGE_SIZE,
    regions: options.regions.map((r) => ({ guestBase: r.guestBase, size: r.size, kind: r.kind, pageSize: r.pageSize ?? PAGE_SIZE, mapping: r.mapping }))
  })

/**
 * Arms the protection while the guest runs (unless `arm: false`), then the
 * cut: freeze, protect, `atCut`, and thaw whatever happens in between.
 * Returns how long arming took and how long protect held the guest (ms).
 */
const cut = (engine: WpEngine, options: SnapshotOptions) =>
  Effect.gen(function* () {
    let armMs = 0
    if (options.arm ?? true) {
      const t0 = nowMs()
      yield* engine.arm()
      armMs = nowMs() - t0
    }
    let pauseMs = 0
    yield* Effect.acquireUseRelease(
      options.freeze ?? Effect.void,
      () =>
        Effect.gen(function* () {
          const t0 = nowMs()
          yield* engine.protect()
          pauseMs = nowMs() - t0
          if (options.atCut) yield* options.atCut
        }),
      () => Effect.orDie(options.thaw ?? Effect.void)
    )
    return { armMs, pauseMs }
  })

/** The writer fiber, forked in the session's scope (interrupted with it), then the index, trailer and commit. */
const writeAndCommit = (engine: WpEngine, file: SnapshotFile, options: SnapshotOptions) =>
  Effect.gen(function* () {
    const writer = yield* Effect.forkIn(writeSnapshotBody(engine, file, options), yield* Effect.scope)
    const body = yield* Fiber.join(writer)
    // A change the engine learns of only now (its memory file changed through the file) still fails the snapshot.
    const late = engine.errorSync()
    if (late) return yield* Effect.fail(late)
    if (options.beforeCommit) yield* options.beforeCommit
    const fileBytes = yield* file.finish()
    yield* file.commit
    return { records: body.records, fileBytes }
  })

const takeSnapshotScoped = (declared: SnapshotOptions): Effect.Effect<Omit<SnapshotResult, "collapse">, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      yield* validate(declared)
      const options: SnapshotOptions = { ...declared, regions: yield* withRealPageSizes(declared) }
      const native = yield* WpNative
      const snapshotId = randomUUID()
      const file = yield* openOutput(options, snapshotId)
      const engine = yield* native.engine({
        regions: options.regions,
        poolPages: options.poolPages ?? DEFAULT_POOL_PAGES,
        faultAroundPages: options.faultAroundPages,
        processes: options.processes,
        steer: options.steer,
        maxGuestBytes: options.maxGuestBytes
      })
      const { armMs, pauseMs, cutAt, records, fileBytes } = yield* Effect.gen(function* () {
        const { armMs, pauseMs } = yield* cut(engine, options)
        const cutAt = nowMs()
        return { armMs, pauseMs, cutAt, ...(yield* writeAndCommit(engine, file, options)) }
      }).pipe(Effect.catch((e: VmsnapError) => Effect.flatMap(options.explainFailure?.(e) ?? Effect.succeed(e), Effect.fail)))
      const stats = engine.statsSync()
      return {
        path: options.path,
        snapshotId,
        sizeBytes: options.regions.reduce((s, r) => s + r.size, 0),
        fileBytes,
        pauseMs,
        armMs,
        durationMs: nowMs() - cutAt,
        records,
        steeredPages: stats.pagesSteered,
        engine: stats
      }
    })
  )
