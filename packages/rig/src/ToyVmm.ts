/**
 * Driving the toy VMM (packages/rig/vmm): a real KVM guest when
 * /dev/kvm works, host threads otherwise. Used by `vmsnap demo`, the tests
 * and the benchmarks. Its report (one JSON object on stdout at exit) has the
 * guest's own write latency before, during and after a snapshot.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { existsSync } from "node:fs"
import { buildPath } from "./internal/ffi.js"

/** The toy VMM's binary (packages/rig/build, built at install). */
export const toyVmmPath = (): string => buildPath("vmsnap-toyvmm")

export interface ToyVmmOptions {
  readonly memMiB: number
  readonly vcpus?: number
  /** Guest writes in pages/s over all vCPUs; 0 = as fast as they can. */
  readonly rate?: number
  /** Which pages the guest writes: random (default), sequential, or hot (about 90 % of writes to a tenth of the pages). */
  readonly pattern?: "random" | "sequential" | "hot"
  readonly anon?: boolean
  /** Guest RAM in 2 MiB hugetlbfs pages (needs free huge pages: vm.nr_hugepages). */
  readonly hugetlb?: boolean
  readonly threads?: boolean
  readonly agent?: string
  readonly vm?: string
  readonly device?: boolean
  /** A balloon that keeps discarding guest pages; the VMM says `"prepare": true` and holds it from `prepare` to `done`/`failed`. */
  readonly balloon?: boolean
  /** A misbehaving VMM: at the first thaw it maps its guest memfd a second time and writes every page through it. */
  readonly aliasAtThaw?: boolean
  /** A misbehaving VMM: at the first thaw it forks a child that writes every page of guest memory and exits. */
  readonly forkAtThaw?: boolean
  readonly reference?: string
  readonly runMs?: number
  /** Percent of guest memory filled with data before the guest starts. */
  readonly fillPercent?: number
  /** Print the guest's total writes this often (see `progress`). */
  readonly progressMs?: number
  /** A baseline snapshot method run by the VMM itself (benchmarks), at snapshotAtMs, into output. */
  readonly local?: "floor" | "fork" | "stop-the-world" | "none"
  readonly output?: string
  readonly snapshotAtMs?: number
  /** After a snapshot (local or through the agent): keep running this long, then exit and report. */
  readonly afterMs?: number
  /** Restore mode: connect to a page-fault handler (`vmsnap serve`) and run from the memory it serves. */
  readonly restoreFrom?: string
  /** Restore mode: at exit, check memory against this raw image plus the guest's own writes. */
  readonly verifyImage?: string
}

export interface PhaseReport {
  readonly writes: number
  readonly seconds: number
  readonly writesPerSecond: number
  /** Sum of the guest's write times in the phase. */
  readonly blockedMs: number
  readonly stallsOver1ms: number
  readonly latencyUs: { readonly p50: number; readonly p99: number; readonly p999: number; readonly max: number }
}

export interface ToyVmmReport {
  readonly role: "vmm" | "device"
  readonly kind: "kvm" | "threads"
  readonly whyThreads: string
  readonly vcpus: number
  readonly memBytes: number
  readonly snapshots: number
  readonly snapshotsFailed: number
  /** Pages the balloon discarded (with `balloon`). */
  readonly balloonDiscards: number
  readonly phases: { readonly before: PhaseReport; readonly during: PhaseReport; readonly after: PhaseReport }
  /**
   * In restore mode: handshake to the guest's first write, and the check against --verify-image
   * (-1: not checked): pages the guest changed from the image, and how many of them are in the
   * first tenth of its work area (the hot set of `pattern: "hot"`).
   */
  readonly restore?: { readonly firstWriteMs: number; readonly verifyMismatches: number; readonly changedPages: number; readonly changedHotPages: number }
  /** With `local`: what the VMM measured of its own snapshot. */
  readonly snapshot?: {
    readonly method: string
    readonly ok: boolean
    readonly error: string
    readonly pauseMs: number
    readonly durationMs: number
    readonly outputBytes: number
    readonly faults: number
    readonly extraMemoryBytes: number
  }
  /**
   * Moments in CLOCK_MONOTONIC ns (process.hrtime's clock; 0: none): the
   * guest started, the first snapshot was begun (local methods), its cut
   * (all vCPUs frozen), its last page saved (local methods).
   */
  readonly startNs: number
  readonly beginNs: number
  readonly cutNs: number
  readonly savedNs: number
  /** The guest's total writes at the cut and at savedNs (exact: read at those moments). */
  readonly cutWrites: number
  readonly savedWrites: number
  /** The guest's total writes over time: [CLOCK_MONOTONIC ns, writes], every ~10 ms. */
  readonly series: ReadonlyArray<readonly [number, number]>
}

export class ToyVmm {
  readonly child: ChildProcess
  /** Resolves when every process (the VMM, and the device if asked) is running (and connected). */
  readonly ready: Promise<{ kind: "kvm" | "threads"; pids: Array<number> }>
  readonly exited: Promise<number | null>
  stderr = ""
  /** Latest total guest writes per pid, from --progress-ms lines. */
  readonly progress = new Map<number, number>()
  private stdout = ""

  constructor(readonly options: ToyVmmOptions) {
    const path = toyVmmPath()
    if (!existsSync(path)) throw new Error(`the toy VMM is not built: ${path} is missing (run \`pnpm install\`)`)
    const args = ["--mem", String(options.memMiB), "--vcpus", String(options.vcpus ?? 1), "--rate", String(options.rate ?? 0)]
    if (options.pattern) args.push("--pattern", options.pattern)
    if (options.anon) args.push("--anon")
    if (options.hugetlb) args.push("--hugetlb")
    if (options.threads) args.push("--threads")
    if (options.agent) args.push("--agent", options.agent)
    if (options.vm) args.push("--vm", options.vm)
    if (options.device) args.push("--device")
    if (options.balloon) args.push("--balloon")
    if (options.aliasAtThaw) args.push("--alias-at-thaw")
    if (options.forkAtThaw) args.push("--fork-at-thaw")
    if (options.reference) args.push("--reference", options.reference)
    if (options.runMs) args.push("--run-ms", String(options.runMs))
    if (options.fillPercent) args.push("--fill", String(options.fillPercent))
    if (options.progressMs) args.push("--progress-ms", String(options.progressMs))
    if (options.local) args.push("--local", options.local, "--snapshot-at-ms", String(options.snapshotAtMs ?? 1000))
    if (options.output) args.push("--output", options.output)
    if (options.afterMs) args.push("--after-ms", String(options.afterMs))
    if (options.restoreFrom) args.push("--restore-from", options.restoreFrom)
    if (options.verifyImage) args.push("--verify-image", options.verifyImage)
    this.child = spawn(path, args, { stdio: ["ignore", "pipe", "pipe"] })
    this.child.stdout!.on("data", (d) => (this.stdout += d))
    const expected = options.device ? 2 : 1
    this.ready = new Promise((resolve, reject) => {
      const pids: Array<number> = []
      let kind: "kvm" | "threads" = "threads"
      this.child.stderr!.on("data", (d) => {
        this.stderr += d
        for (const m of String(d).matchAll(/toyvmm: progress pid=(\d+) writes=(\d+)/g)) this.progress.set(Number(m[1]), Number(m[2]))
        for (const m of String(d).matchAll(/toyvmm: ready pid=(\d+) kind=(\w+) role=(\w+)/g)) {
          pids.push(Number(m[1]))
          if (m[3] === "vmm") kind = m[2] as "kvm" | "threads"
          if (pids.length === expected) resolve({ kind, pids })
        }
      })
      this.child.on("exit", (code) => reject(new Error(`the toy VMM exited (${code}) before it was ready: ${this.stderr.trim()}`)))
    })
    this.ready.catch(() => undefined)
    // "close", not "exit": the report may still be in the pipes when the process exits.
    this.exited = new Promise((resolve) => this.child.on("close", (code) => resolve(code)))
  }

  /** SIGTERM, then the report it prints on the way out. */
  async stop(): Promise<ToyVmmReport> {
    if (this.child.exitCode === null) this.child.kill("SIGTERM")
    return this.report()
  }

  /** The report, once the VMM has exited by itself (--after-ms). */
  async report(): Promise<ToyVmmReport> {
    await this.exited
    const line = this.stdout.trim().split("\n").pop() ?? ""
    try {
      return JSON.parse(line) as ToyVmmReport
    } catch {
      throw new Error(`the toy VMM printed no report: ${this.stderr.trim()}`)
    }
  }
}
