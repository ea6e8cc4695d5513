/**
 * `vmsnap bench`: the same guest workload (the toy VMM, a KVM guest when
 * /dev/kvm works) snapshotted by each method in turn, side by side in one
 * run, with ratios against a run without any snapshot ("none"):
 *
 *   vmsnap          the agent with its default pool (and fault-around)
 *   vmsnap-sync     the agent with no pool: every faulting write waits for the
 *                   writer to take its page (what QEMU's background-snapshot does)
 *   floor           a minimal C uffd-wp handler inside the VMM (baselines.c)
 *   fork            fork() copy-on-write, the child writes memory (needs anonymous memory)
 *   stop-the-world  pause, write everything, resume
 *
 * Latency, blocked time and stalls are what the guest itself measured (rdtsc
 * around each write) during the snapshot.
 */
import { Effect } from "effect"
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { type Agent, InvalidInput, quietAgentScoped, type VmsnapError, type WpNative } from "@vmsnap/core"
import { type PhaseReport, ToyVmm, type ToyVmmReport } from "./ToyVmm.js"

export const BENCH_METHODS = ["vmsnap", "vmsnap-sync", "floor", "fork", "stop-the-world"] as const
export type BenchMethod = (typeof BENCH_METHODS)[number]

export interface BenchOptions {
  readonly sizes: ReadonlyArray<number>
  /** Guest writes in pages/s; 0 = as fast as it can. */
  readonly rate: number
  readonly methods: ReadonlyArray<BenchMethod>
  readonly vcpus: number
  readonly warmupMs: number
  readonly afterMs: number
  readonly poolPages: number
  readonly compression: "lz4" | "none"
  /** vmsnap's fault-around window (pages; 1 = off). */
  readonly faultAroundPages: number
  /** vmsnap sweeps where the guest writes first. */
  readonly steer: boolean
  /** Which pages the guest writes. */
  readonly pattern: "random" | "sequential"
  readonly onRun?: (run: BenchRun) => void
  readonly onStart?: (method: string, sizeBytes: number) => void
}

export interface BenchRun {
  readonly method: BenchMethod
  readonly sizeBytes: number
  readonly guestKind: "kvm" | "threads"
  readonly ok: boolean
  readonly error: string | null
  readonly pauseMs: number
  readonly durationMs: number
  readonly latencyUs: PhaseReport["latencyUs"]
  readonly faults: number
  readonly stallsOver1ms: number
  readonly guestBlockedMs: number
  readonly guestWritesPerSecond: number
  /** Guest writes/s during the snapshot over the same window without one. */
  readonly guestThroughputRatio: number
  /** Guest writes/s in the afterMs after the snapshot over the same without one. */
  readonly guestThroughputAfterRatio: number
  readonly throughputMBps: number
  readonly extraMemoryBytes: number
  readonly outputBytes: number
}

const MiB = 1024 * 1024
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"))?.[1] ?? 0) * 1024

interface Measured {
  readonly report: ToyVmmReport
  readonly pauseMs: number
  readonly durationMs: number
  readonly faults: number
  readonly extraMemoryBytes: number
  readonly outputBytes: number
  readonly error: string | null
}

/** A baseline the VMM runs itself (or "none"). */
const runLocal = async (method: "floor" | "fork" | "stop-the-world" | "none", size: number, o: BenchOptions, dir: string): Promise<Measured> => {
  const output = join(dir, `${method}.img`)
  const vmm = new ToyVmm({
    memMiB: size / MiB, vcpus: o.vcpus, rate: o.rate, pattern: o.pattern, fillPercent: 75, anon: method === "fork",
    local: method, output, snapshotAtMs: o.warmupMs, afterMs: o.afterMs
  })
  const report = await vmm.report()
  rmSync(output, { force: true })
  const s = report.snapshot!
  return {
    report, pauseMs: s.pauseMs, durationMs: s.durationMs, faults: s.faults, extraMemoryBytes: s.extraMemoryBytes,
    outputBytes: s.outputBytes, error: s.ok ? null : s.error
  }
}

/** vmsnap through the agent in this process. */
const runAgent = (agent: Agent, sync: boolean, size: number, o: BenchOptions, dir: string) =>
  Effect.gen(function* () {
    const vm = `bench-${sync ? "sync" : "pool"}-${size / MiB}`
    const vmm = new ToyVmm({ memMiB: size / MiB, vcpus: o.vcpus, rate: o.rate, pattern: o.pattern, fillPercent: 75, agent: agent.socketPath, vm, afterMs: o.afterMs })
    yield* Effect.promise(() => vmm.ready.then(() => sleep(o.warmupMs)))
    const path = join(dir, `${vm}.vmsnap`)
    // Anonymous memory only: the agent's view of the guest memfd is shared, not extra.
    const baseline = kib("RssAnon")
    let peak = baseline
    const sampler = setInterval(() => (peak = Math.max(peak, kib("RssAnon"))), 10)
    const exit = yield* Effect.exit(agent.snapshot({ vm, path, poolPages: sync ? 0 : o.poolPages, faultAroundPages: sync ? 1 : o.faultAroundPages, compression: o.compression, steer: o.steer }))
    clearInterval(sampler)
    const extra = Math.max(peak, kib("RssAnon")) - baseline
    const report = yield* Effect.promise(() => vmm.report())
    const outputBytes = exit._tag === "Success" ? statSync(path).size : 0
    rmSync(path, { force: true })
    return {
      report,
      pauseMs: exit._tag === "Success" ? exit.value.pauseMs : 0,
      durationMs: exit._tag === "Success" ? exit.value.durationMs : 0,
      faults: exit._tag === "Success" ? exit.value.engine.faults : 0,
      extraMemoryBytes: extra,
      outputBytes,
      error: exit._tag === "Success" ? null : String(exit.cause)
    } satisfies Measured
  })

const toRun = (method: BenchMethod, size: number, m: Measured, none: ToyVmmReport): BenchRun => {
  const during = m.report.phases.during
  const ratio = (a: number, b: number) => (b > 0 ? Math.round((a / b) * 1000) / 1000 : 0)
  return {
    method, sizeBytes: size, guestKind: m.report.kind, ok: m.error === null, error: m.error,
    pauseMs: Math.round(m.pauseMs * 1000) / 1000,
    durationMs: Math.round(m.durationMs),
    latencyUs: during.latencyUs,
    faults: m.faults,
    stallsOver1ms: during.stallsOver1ms,
    guestBlockedMs: Math.round(during.blockedMs),
    guestWritesPerSecond: Math.round(during.writesPerSecond),
    guestThroughputRatio: ratio(during.writesPerSecond, none.phases.during.writesPerSecond),
    guestThroughputAfterRatio: ratio(m.report.phases.after.writesPerSecond, none.phases.after.writesPerSecond),
    throughputMBps: m.durationMs > 0 ? Math.round(size / 1e6 / (m.durationMs / 1000)) : 0,
    extraMemoryBytes: m.extraMemoryBytes,
    outputBytes: m.outputBytes
  }
}

export const runBenchmark = (o: BenchOptions): Effect.Effect<Array<BenchRun>, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      for (const size of o.sizes)
        if (size % (2 * MiB) !== 0 || size < 4 * MiB) return yield* Effect.fail(new InvalidInput({ reason: `bench size ${size}: must be a multiple of 2 MiB, at least 4 MiB` }))
      const dir = yield* Effect.acquireRelease(
        Effect.sync(() => mkdtempSync(join(tmpdir(), "vmsnap-bench-"))),
        (d) => Effect.sync(() => rmSync(d, { recursive: true, force: true }))
      )
      const agent = yield* quietAgentScoped(join(dir, "agent.sock"))
      const runs: Array<BenchRun> = []
      for (const size of o.sizes) {
        o.onStart?.("none", size)
        const none = yield* Effect.promise(() => runLocal("none", size, o, dir))
        for (const method of o.methods) {
          o.onStart?.(method, size)
          const measured =
            method === "vmsnap" || method === "vmsnap-sync"
              ? yield* runAgent(agent, method === "vmsnap-sync", size, o, dir)
              : yield* Effect.promise(() => runLocal(method, size, o, dir))
          const run = toRun(method, size, measured, none.report)
          runs.push(run)
          o.onRun?.(run)
        }
      }
      return runs
    })
  )
