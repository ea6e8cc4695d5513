/**
 * `vmsnap bench --restore`: what lazy restore buys.
 *
 *   first write   handshake to the guest's first write (the toy VMM restoring
 *                 lazily through `vmsnap serve`'s code) against an eager
 *                 restore, which decodes every page into memory before the
 *                 guest may run; per guest size. With serve's own figures
 *                 for that VMM (RestoreServer's HandshakeTimes): handshake
 *                 to serving (its checks and per-VMM setup) and to the
 *                 first faulting page installed; target (issue 10) for
 *                 the latter: at most 2 ms at any size up to 8 GiB.
 *   modes         in this process, a 512 MiB snapshot served three ways:
 *                 UFFDIO_COPY (anonymous), UFFDIO_COPY (memfd: the shared
 *                 path, CONTINUE for pages in the page cache), UFFDIO_MOVE
 *                 (anonymous), and `raw`: UFFDIO_COPY (anonymous) from the
 *                 same image as a raw memory image (serve --raw; written
 *                 by `vmsnap restore --raw` first): fault service time when every page is touched
 *                 in order with no background fill, and the time the
 *                 background fill alone takes to make it all resident; and
 *                 the floor: a bare handler (one 4 KiB UFFDIO_COPY per fault
 *                 from the image in memory, guest/bare_restore.c), in the
 *                 same run. Targets (issue 10): vmsnap's fault p50 at most
 *                 1.5x the floor's, p99 at most 3x.
 */
import { Effect } from "effect"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import {
  guestBucketLowerNs, type HandshakeTimes, type LatencySummary, quietAgentScoped, restoreToRawFile, summarizeUs, restoreToMemory, RestoreServer, restoreUffd, startLazyRestore, takeSnapshot,
  type VmsnapError, type WpNative
} from "@vmsnap/core"
import { DemoGuest, scratchMemory, touchPages } from "./DemoGuest.js"
import { loadGuest, VG_BARE_HIST_BUCKETS } from "./internal/ffi.js"
import { ToyVmm } from "./ToyVmm.js"

const MiB = 1024 * 1024

export interface FirstWriteRun {
  readonly sizeBytes: number
  readonly guestKind: "kvm" | "threads"
  /** Handshake to the guest's first write, restoring lazily. */
  readonly lazyMs: number
  /** Every page decoded into memory, before the guest could run. */
  readonly eagerMs: number
  /** serve's figures for this VMM: handshake to serving (checks, per-VMM setup) and to its first faulting page installed (null: no fault seen). */
  readonly handshakeToServingMs: number | null
  readonly handshakeToFirstPageMs: number | null
  /** When serve took that VMM's first fault (after serving began: the guest had not faulted yet, or the fault thread waited for a CPU). */
  readonly handshakeToFirstFaultMs: number | null
}

export interface ModeRun {
  readonly mode: "floor" | "copy" | "continue" | "move" | "raw"
  readonly sizeBytes: number
  readonly faults: number
  readonly faultServiceUs: LatencySummary
  /** Touching every page in order, faults only. */
  readonly faultInMs: number
  /** The background fill alone. */
  readonly residentMs: number
  readonly error: string | null
}

export interface RestoreBenchResult {
  readonly firstWrite: Array<FirstWriteRun>
  readonly modes: Array<ModeRun>
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const waitDone = (restore: { poll: () => unknown }) =>
  Effect.promise(async () => {
    for (;;) {
      const state = restore.poll()
      if (state !== "serving") return state
      await sleep(2)
    }
  })

/** One mode at `size`: faults-only pass, then fill-only pass. `raw`: `source` is the raw image, served with UFFDIO_COPY. */
const measureMode = (mode: ModeRun["mode"], source: string, size: number) =>
  Effect.gen(function* () {
    const pass = (fill: boolean) =>
      Effect.scoped(
        Effect.gen(function* () {
          const memfdGuest = mode === "continue" ? yield* DemoGuest.make(size, "memfd") : undefined
          const base = memfdGuest ? memfdGuest.region.hostBase : yield* scratchMemory(size)
          const uffd = yield* restoreUffd(base, size, { memfd: mode === "continue", move: mode === "move" })
          const t0 = performance.now()
          const restore = yield* startLazyRestore(
            { path: source, raw: mode === "raw" },
            uffd,
            [{ hva: base, size, imageOffset: 0, memfd: memfdGuest?.memfd }],
            { move: mode === "move", fill }
          )
          if (!fill) touchPages(base, size)
          const state = yield* waitDone(restore)
          const ms = performance.now() - t0
          return { stats: restore.stats(), ms, error: state === "done" ? null : String((state as Error).message ?? state) }
        })
      )
    const faulted = yield* pass(false)
    const filled = yield* pass(true)
    return {
      mode, sizeBytes: size, faults: faulted.stats.faults, faultServiceUs: faulted.stats.faultServiceUs,
      faultInMs: Math.round(faulted.ms), residentMs: Math.round(filled.stats.doneMs ?? filled.ms), error: faulted.error ?? filled.error
    } satisfies ModeRun
  }).pipe(
    Effect.catch((e: unknown) =>
      Effect.succeed({
        mode, sizeBytes: size, faults: 0, faultServiceUs: { count: 0, p50: 0, p99: 0, p999: 0, max: 0 }, faultInMs: 0, residentMs: 0,
        error: e instanceof Error ? e.message : String(e)
      } satisfies ModeRun)
    )
  )

/** The floor: the bare handler over the same image, restored eagerly into memory first. */
const measureFloor = (snapshot: string, size: number) =>
  Effect.scoped(
    Effect.gen(function* () {
      const image = yield* scratchMemory(size)
      yield* restoreToMemory(snapshot, { hostBases: [image], targetIsZero: true })
      const target = yield* scratchMemory(size)
      const hist = new BigUint64Array(VG_BARE_HIST_BUCKETS)
      const summary = new BigUint64Array(4)
      const rc: number = loadGuest().vg_bare_restore([target, BigInt(size), image, Buffer.from(hist.buffer), Buffer.from(summary.buffer)])
      return {
        mode: "floor" as const, sizeBytes: size, faults: Number(summary[0]),
        faultServiceUs: summarizeUs(Array.from(hist, Number), Number(summary[1]), guestBucketLowerNs),
        faultInMs: Math.round(Number(summary[2]) / 1e6), residentMs: 0, error: rc < 0 ? `bare handler: errno ${-rc}` : null
      } satisfies ModeRun
    })
  )

export const runRestoreBenchmark = (options: {
  readonly sizes: ReadonlyArray<number>
  readonly modeSize: number
  readonly onStart?: (what: string) => void
}): Effect.Effect<RestoreBenchResult, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      const dir = yield* Effect.acquireRelease(
        Effect.sync(() => mkdtempSync(join(tmpdir(), "vmsnap-restore-bench-"))),
        (d) => Effect.sync(() => rmSync(d, { recursive: true, force: true }))
      )
      // Modes: a half-random, 75 % filled region snapshotted in this process.
      options.onStart?.(`restore modes at ${options.modeSize / MiB} MiB`)
      const modeSnapshot = join(dir, "modes.vmsnap")
      yield* Effect.scoped(
        Effect.gen(function* () {
          const guest = yield* DemoGuest.make(options.modeSize, "anon")
          guest.fill(0, Math.floor((guest.pages * 3) / 4), 3)
          // lz4 whatever the CPU load ("auto" writes raw blocks on a busy machine): the fault path decodes a block per fault.
          yield* takeSnapshot({ regions: [guest.region], path: modeSnapshot, compression: "lz4" })
        })
      )
      const modeImage = join(dir, "modes.img") // the same image, raw (vmsnap restore FILE --raw OUT)
      yield* restoreToRawFile(modeSnapshot, modeImage)
      const modes: Array<ModeRun> = [yield* measureFloor(modeSnapshot, options.modeSize)]
      for (const mode of ["copy", "continue", "move"] as const) modes.push(yield* measureMode(mode, modeSnapshot, options.modeSize))
      modes.push(yield* measureMode("raw", modeImage, options.modeSize))
      rmSync(modeImage, { force: true })

      const agent = yield* quietAgentScoped(join(dir, "agent.sock"))
      const firstWrite: Array<FirstWriteRun> = []
      for (const size of options.sizes) {
        options.onStart?.(`first write, lazy vs eager, at ${size / MiB} MiB`)
        const path = join(dir, `guest-${size}.vmsnap`)
        const source = new ToyVmm({ memMiB: size / MiB, rate: 1, agent: agent.socketPath, vm: `src-${size}`, fillPercent: 75 })
        yield* Effect.promise(() => source.ready)
        yield* agent.snapshot({ vm: `src-${size}`, path })
        yield* Effect.promise(() => source.stop())
        let handshake: HandshakeTimes | undefined
        const server = new RestoreServer(join(dir, `serve-${size}.sock`), { path, raw: false }, { onFinished: (_pid, o) => (handshake = o.handshake) })
        yield* Effect.promise(() => server.listen())
        const vmm = new ToyVmm({ memMiB: size / MiB, rate: 0, anon: true, restoreFrom: server.socketPath, runMs: 200 })
        const report = yield* Effect.promise(() => vmm.report())
        yield* Effect.promise(() => server.close())
        const eagerMs = yield* Effect.scoped(
          Effect.gen(function* () {
            const target = yield* scratchMemory(size)
            const t0 = performance.now()
            yield* restoreToMemory(path, { hostBases: [target], targetIsZero: true })
            return performance.now() - t0
          })
        )
        rmSync(path, { force: true })
        firstWrite.push({
          sizeBytes: size, guestKind: report.kind, lazyMs: Math.round((report.restore?.firstWriteMs ?? 0) * 100) / 100, eagerMs: Math.round(eagerMs),
          handshakeToServingMs: handshake?.handshakeToServingMs ?? null, handshakeToFirstPageMs: handshake?.handshakeToFirstPageMs ?? null,
          handshakeToFirstFaultMs: handshake?.handshakeToFirstFaultMs ?? null
        })
      }
      return { firstWrite, modes }
    })
  )
