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
 * Each method runs `runs` times (a fresh VMM each time) and is reported as
 * medians with their spread. Guest writes/s are cut from the guest's own
 * write counter in the same windows for every method (BenchWindows.ts);
 * latency, blocked time and stalls are what the guest measured (rdtsc around
 * each write) in the VMM's "during" phase (from the freeze to the end of the
 * snapshot as the VMM sees it).
 */
import { type Agent, type Compression, InvalidInput, quietAgentScoped, type VmsnapError, type WpNative } from "@vmsnap/core"
import { Effect } from "effect"
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { type BenchMethod, type BenchRun, type BenchTrial, type Measured, summarize, toTrial } from "./BenchReport.js"
import { ThreadCpuSampler } from "./ThreadCpu.js"
import { ToyVmm } from "./ToyVmm.js"

export { BENCH_METHODS, type BenchMethod, type BenchRun, type BenchTrial } from "./BenchReport.js"

export interface BenchOptions {
  readonly sizes: ReadonlyArray<number>
  /** Guest writes in pages/s; 0 = as fast as it can. */
  readonly rate: number
  readonly methods: ReadonlyArray<BenchMethod>
  readonly vcpus: number
  readonly warmupMs: number
  /** Length of the `after` window, from the moment the last page is saved. */
  readonly afterMs: number
  /** Runs of each method (medians and spread are reported). */
  readonly runs: number
  readonly poolPages: number
  readonly compression: Compression
  /** vmsnap's fault-around window (pages; 1 = off). */
  readonly faultAroundPages: number
  /** vmsnap sweeps where the guest writes first. */
  readonly steer: boolean
  /** Which pages the guest writes. */
  readonly pattern: "random" | "sequential" | "hot"
  readonly onRun?: (run: BenchRun) => void
  readonly onStart?: (method: string, sizeBytes: number, run: number) => void
}

const MiB = 1024 * 1024
/** Length of the `before` window, ending where the snapshot is begun. */
const BEFORE_MS = 1000
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"))?.[1] ?? 0) * 1024
/** CLOCK_MONOTONIC ns, the clock of the VMM's samples. */
const monotonicNs = () => Number(process.hrtime.bigint())

/** A baseline the VMM runs itself, or "none" (no snapshot) for `afterMs` after `warmupMs`. */
const runLocal = async (method: "floor" | "fork" | "stop-the-world" | "none", size: number, o: BenchOptions, dir: string, afterMs = o.afterMs): Promise<Measured> => {
  const output = join(dir, `${method}.img`)
  const vmm = new ToyVmm({
    memMiB: size / MiB, vcpus: o.vcpus, rate: o.rate, pattern: o.pattern, fillPercent: 75, anon: method === "fork",
    local: method, output, snapshotAtMs: o.warmupMs, afterMs
  })
  const cpu = new ThreadCpuSampler(() => [vmm.child.pid!])
  const report = await vmm.report().finally(() => cpu.stop())
  rmSync(output, { force: true })
  const s = report.snapshot!
  return {
    report, beginNs: report.beginNs, cutNs: report.cutNs, savedNs: report.savedNs,
    pauseMs: s.pauseMs, durationMs: s.durationMs, faults: s.faults, extraMemoryBytes: s.extraMemoryBytes,
    outputBytes: s.outputBytes, error: s.ok ? null : s.error,
    cpuMs: cpu.between(report.cutNs, report.savedNs),
    cpuAfterMs: cpu.between(report.savedNs, report.savedNs + afterMs * 1e6)
  }
}

/** vmsnap through the agent in this process. */
const runAgent = (agent: Agent, sync: boolean, size: number, o: BenchOptions, dir: string, run: number) =>
  Effect.gen(function* () {
    const vm = `bench-${sync ? "sync" : "pool"}-${size / MiB}-${run}`
    const vmm = new ToyVmm({ memMiB: size / MiB, vcpus: o.vcpus, rate: o.rate, pattern: o.pattern, fillPercent: 75, agent: agent.socketPath, vm, afterMs: o.afterMs })
    yield* Effect.promise(() => vmm.ready.then(() => sleep(o.warmupMs)))
    const path = join(dir, `${vm}.vmsnap`)
    // Anonymous memory only: the agent's view of the guest memfd is shared, not extra.
    const baseline = kib("RssAnon")
    let peak = baseline
    const sampler = setInterval(() => (peak = Math.max(peak, kib("RssAnon"))), 10)
    const cpu = new ThreadCpuSampler(() => [process.pid, vmm.child.pid!])
    const beginNs = monotonicNs()
    let savedNs = 0
    const onProgress = (saved: number, total: number) => {
      if (saved === total && savedNs === 0) savedNs = monotonicNs()
    }
    const exit = yield* Effect.exit(
      agent.snapshot({ vm, path, poolPages: sync ? 0 : o.poolPages, faultAroundPages: sync ? 1 : o.faultAroundPages, compression: o.compression, steer: o.steer }, onProgress)
    )
    const endNs = monotonicNs()
    clearInterval(sampler)
    const extra = Math.max(peak, kib("RssAnon")) - baseline
    const report = yield* Effect.promise(() => vmm.report().finally(() => cpu.stop()))
    const outputBytes = exit._tag === "Success" ? statSync(path).size : 0
    rmSync(path, { force: true })
    return {
      report, beginNs, cutNs: report.cutNs || beginNs, savedNs: savedNs || endNs,
      pauseMs: exit._tag === "Success" ? exit.value.pauseMs : 0,
      durationMs: exit._tag === "Success" ? exit.value.durationMs : 0,
      faults: exit._tag === "Success" ? exit.value.engine.faults : 0,
      extraMemoryBytes: extra,
      outputBytes,
      error: exit._tag === "Success" ? null : String(exit.cause),
      cpuMs: cpu.between(report.cutNs || beginNs, savedNs || endNs),
      cpuAfterMs: cpu.between(savedNs || endNs, (savedNs || endNs) + o.afterMs * 1e6)
    } satisfies Measured
  })

export const runBenchmark = (o: BenchOptions): Effect.Effect<Array<BenchRun>, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      for (const size of o.sizes)
        if (size % (2 * MiB) !== 0 || size < 4 * MiB) return yield* Effect.fail(new InvalidInput({ reason: `bench size ${size}: must be a multiple of 2 MiB, at least 4 MiB` }))
      if (!Number.isInteger(o.runs) || o.runs < 1) return yield* Effect.fail(new InvalidInput({ reason: `bench runs ${o.runs}: must be a whole number, at least 1` }))
      const dir = yield* Effect.acquireRelease(
        Effect.sync(() => mkdtempSync(join(tmpdir(), "vmsnap-bench-"))),
        (d) => Effect.sync(() => rmSync(d, { recursive: true, force: true }))
      )
      const agent = yield* quietAgentScoped(join(dir, "agent.sock"))
      const trials = new Map<string, Array<BenchTrial>>()
      let guestKind: "kvm" | "threads" = "threads"
      for (let run = 1; run <= o.runs; run++)
        for (const size of o.sizes) {
          const measured: Array<[BenchMethod, Measured]> = []
          for (const method of o.methods) {
            o.onStart?.(method, size, run)
            measured.push([
              method,
              method === "vmsnap" || method === "vmsnap-sync"
                ? yield* runAgent(agent, method === "vmsnap-sync", size, o, dir, run)
                : yield* Effect.promise(() => runLocal(method, size, o, dir))
            ])
          }
          // The reference runs last, long enough to cover every method's windows at the same offsets.
          const lastMs = Math.max(0, ...measured.map(([, m]) => (m.savedNs - m.report.startNs) / 1e6))
          o.onStart?.("none", size, run)
          const none = yield* Effect.promise(() => runLocal("none", size, o, dir, Math.max(o.afterMs, Math.ceil(lastMs + o.afterMs - o.warmupMs) + 500)))
          for (const [method, m] of measured) {
            guestKind = m.report.kind
            const key = `${method} ${size}`
            trials.set(key, [...(trials.get(key) ?? []), toTrial(run, size, m, none.report, Math.min(BEFORE_MS, o.warmupMs), o.afterMs)])
          }
        }
      const runs: Array<BenchRun> = []
      for (const size of o.sizes)
        for (const method of o.methods) {
          const r = summarize(method, size, guestKind, trials.get(`${method} ${size}`) ?? [])
          runs.push(r)
          o.onRun?.(r)
        }
      return runs
    })
  )
