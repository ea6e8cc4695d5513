/**
 * `vmsnap bench`: vmsnap against its baselines on the same guest, one table;
 * with `--target qemu|redis`, against what real QEMU and Redis do themselves
 * (QemuBench.ts, RedisBench.ts in @vmsnap/rig).
 */
import { Effect } from "effect"
import { existsSync, statSync } from "node:fs"
import { type Compression, formatBytes } from "@vmsnap/core"
import {
  BENCH_METHODS, type BenchMethod, type BenchOptions, type BenchRun, QEMU_BENCH_METHODS, type QemuBenchMethod, REDIS_BENCH_METHODS,
  type RedisBenchMethod, type RestoreBenchResult, runBenchmark, runQemuBenchmark, runRedisBenchmark, runRestoreBenchmark, type Spread
} from "@vmsnap/rig"
import type { Io } from "../Io.js"
import { qemuTable, redisTable } from "../RealBenchTables.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { bufferOption, commonFlags, compressionOptionSpec, faultAroundOption, faultAroundOptionSpec, poolPagesOption, sizeOption, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

/** The bench's options as the CLI collects them (BenchOptions without the callbacks). */
export type BenchFlags = CommonFlags & Omit<BenchOptions, "onRun" | "onStart">

const perSecond = (n: number) => (n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(Math.round(n)))
const percent = (x: number) => `${Math.round(x * 100)}%`
/** The median, and with several runs its range. */
const withSpread = (s: Spread) => (s.min === s.max ? percent(s.median) : `${percent(s.median)} (${percent(s.min)}-${percent(s.max)})`)

const columns: Array<[string, (r: BenchRun) => string]> = [
  ["method", (r) => r.method],
  ["size", (r) => formatBytes(r.sizeBytes)],
  ["pause ms", (r) => r.pauseMs.toFixed(2)],
  ["time s", (r) => (r.durationMs / 1000).toFixed(2)],
  ["saved s", (r) => (r.savedMs / 1000).toFixed(2)],
  ["MB/s", (r) => String(r.throughputMBps)],
  ["p50 us", (r) => r.latencyUs.p50.toFixed(1)],
  ["p99 us", (r) => r.latencyUs.p99.toFixed(1)],
  ["p99.9 us", (r) => r.latencyUs.p999.toFixed(1)],
  ["max ms", (r) => (r.latencyUs.max / 1000).toFixed(1)],
  ["faults", (r) => String(r.faults)],
  ["faults/kw", (r) => r.faultsPerThousandWrites.toFixed(0)],
  [">1ms", (r) => String(r.stallsOver1ms)],
  ["blocked ms", (r) => String(r.guestBlockedMs)],
  ["during w/s", (r) => perSecond(r.writesPerSecond.during)],
  ["tput", (r) => withSpread(r.spread.guestThroughputRatio)],
  ["after w/s", (r) => perSecond(r.writesPerSecond.after)],
  ["after", (r) => withSpread(r.spread.guestThroughputAfterRatio)],
  ["extra mem", (r) => formatBytes(r.extraMemoryBytes)],
  ["output", (r) => formatBytes(r.outputBytes)]
]

export const table = (runs: ReadonlyArray<BenchRun>): string => {
  const rows = [columns.map(([h]) => h), ...runs.map((r) => columns.map(([, f]) => (r.ok ? f(r) : "")).map((c, i) => (i === 2 && !r.ok ? `failed: ${r.error}` : c)))]
  const widths = columns.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)))
  return rows.map((row) => row.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ")).join("\n")
}

export const runBench = (io: Io, flags: BenchFlags) =>
  runCommand(
    io,
    flags,
    runBenchmark({
      ...flags,
      onStart: (method, size, run) => !flags.json && io.stderr(`bench: ${method} at ${formatBytes(size)} (run ${run}/${flags.runs})...\n`)
    }),
    (runs) => ({
      json: { ok: runs.every((r) => r.ok), guestKind: runs[0]?.guestKind ?? null, runs },
      human: [
        `guest: ${runs[0]?.guestKind === "kvm" ? "KVM" : "host threads"}, ${flags.vcpus} vCPU, ${flags.rate ? `${flags.rate} pages/s` : "writing as fast as it can"} (${flags.pattern} pages); medians of ${flags.runs} run${flags.runs > 1 ? "s" : ""} (range in brackets)`,
        `saved: from the cut to the last page saved; during/after w/s: the guest's writes from the cut to the last page saved, and in the ${flags.afterMs} ms after;`,
        `tput/after: those over the same windows of the same guest with no snapshot (docs/BENCHMARKS.md); faults/kw: write faults per 1000 guest writes during;`,
        `latency, stalls, blocked: as the guest measured them during the snapshot`,
        table(runs),
        "",
        "CPU ms from the cut to the last page saved, per thread (medians; vmsnap's agent runs in this process):",
        ...runs.filter((r) => r.ok).map((r) => `  ${r.method.padEnd(14)} ${formatBytes(r.sizeBytes).padEnd(9)} ${cpuLine(r.cpuMs)}`),
        `CPU ms in the ${flags.afterMs} ms after the last page saved:`,
        ...runs.filter((r) => r.ok).map((r) => `  ${r.method.padEnd(14)} ${formatBytes(r.sizeBytes).padEnd(9)} ${cpuLine(r.cpuAfterMs)}`)
      ].join("\n"),
      exitCode: runs.every((r) => r.ok) ? 0 : 1
    })
  )

const cpuLine = (c: Readonly<Record<string, number>>): string => Object.entries(c).map(([role, ms]) => `${role} ${Math.round(ms)}`).join(", ")

const restoreTable = (r: RestoreBenchResult): string => {
  const lines = [
    "handshake to the guest's first write (lazy) vs every page decoded first (eager); serve's figures for the same VMM:",
    "handshake to serving (checks, per-VMM setup), to its first fault taken and to that page installed (target: <= 2 ms at any size up to 8 GiB):",
    "  size       guest    lazy ms   eager ms  serving ms  first fault ms  first page ms  target"
  ]
  const ms = (v: number | null, width: number) => (v === null ? "-" : v.toFixed(2)).padStart(width)
  for (const f of r.firstWrite)
    lines.push(
      `  ${formatBytes(f.sizeBytes).padEnd(9)}  ${f.guestKind.padEnd(7)}  ${f.lazyMs.toFixed(2).padStart(7)}  ${String(f.eagerMs).padStart(9)}  ${ms(f.handshakeToServingMs, 10)}  ${ms(f.handshakeToFirstFaultMs, 14)}  ${ms(f.handshakeToFirstPageMs, 13)}  ${f.handshakeToFirstPageMs === null ? "-" : f.handshakeToFirstPageMs <= 2 ? "met" : "missed"}`
    )
  lines.push("", "resolving faults, in this process (faults only: every page touched in order; fill only: the background fill):")
  lines.push("  mode      size      faults  p50 us  p99 us  faults-only ms  fill-only ms  p50/floor  p99/floor")
  const floor = r.modes.find((m) => m.mode === "floor" && m.error === null)
  const ratio = (a: number, b: number | undefined) => (b ? `${(a / b).toFixed(2)}x` : "-")
  for (const m of r.modes)
    lines.push(
      m.error
        ? `  ${m.mode.padEnd(8)}  failed: ${m.error}`
        : `  ${m.mode.padEnd(8)}  ${formatBytes(m.sizeBytes).padEnd(8)}  ${String(m.faults).padStart(6)}  ${m.faultServiceUs.p50.toFixed(1).padStart(6)}  ${m.faultServiceUs.p99.toFixed(1).padStart(6)}  ${String(m.faultInMs).padStart(14)}  ${String(m.residentMs).padStart(12)}  ${ratio(m.faultServiceUs.p50, floor?.faultServiceUs.p50).padStart(9)}  ${ratio(m.faultServiceUs.p99, floor?.faultServiceUs.p99).padStart(9)}`
    )
  lines.push("  (floor: a bare handler, one 4 KiB UFFDIO_COPY per fault from the image in memory; raw: serve --raw, the same image as a raw file; targets: p50 <= 1.5x, p99 <= 3x)")
  return lines.join("\n")
}

export const runRestoreBench = (io: Io, flags: CommonFlags & { sizes: ReadonlyArray<number> }) =>
  runCommand(
    io,
    flags,
    runRestoreBenchmark({ sizes: flags.sizes, modeSize: 512 * 1024 * 1024, onStart: (what) => !flags.json && io.stderr(`bench: ${what}...\n`) }),
    (r) => ({ json: { ok: r.modes.every((m) => m.error === null), restore: r }, human: restoreTable(r), exitCode: r.modes.every((m) => m.error === null) ? 0 : 1 })
  )

/** What `--target qemu|redis` runs with. */
export interface RealBenchFlags extends CommonFlags {
  readonly sizes: ReadonlyArray<number>
  readonly methods: ReadonlyArray<string>
  readonly runs: number
  readonly warmupMs: number
  readonly afterMs: number
  readonly poolPages: number
  readonly faultAroundPages: number
  readonly compression: Compression
  readonly windowMs: number
  readonly valueBytes: number
  readonly clients: number
  readonly outputDir?: string
}

const progress = (io: Io, flags: CommonFlags) => (what: string, run: number) =>
  !flags.json && io.stderr(run > 0 ? `bench: ${what} (run ${run})...\n` : `bench: ${what}...\n`)

export const runQemuBench = (io: Io, flags: RealBenchFlags) =>
  runCommand(
    io,
    flags,
    Effect.forEach(flags.sizes, (guestBytes) =>
      runQemuBenchmark({ ...flags, guestBytes, methods: flags.methods as Array<QemuBenchMethod>, onStart: (m, run) => progress(io, flags)(`${m} of QEMU with a ${formatBytes(guestBytes)} guest`, run) })
    ),
    (results) => {
      const ok = results.every((r) => r.methods.every((m) => m.ok))
      return { json: { ok, target: "qemu", results }, human: results.map((r) => qemuTable(r, flags.runs)).join("\n\n"), exitCode: ok ? 0 : 1 }
    }
  )

export const runRedisBench = (io: Io, flags: RealBenchFlags) =>
  runCommand(
    io,
    flags,
    Effect.forEach(flags.sizes, (datasetBytes) =>
      runRedisBenchmark({ ...flags, datasetBytes, methods: flags.methods as Array<RedisBenchMethod>, onStart: progress(io, flags) })
    ),
    (results) => {
      const ok = results.every((r) => r.methods.every((m) => m.ok))
      return { json: { ok, target: "redis", results }, human: results.map((r) => redisTable(r, flags.runs)).join("\n\n"), exitCode: ok ? 0 : 1 }
    }
  )

const TARGET_METHODS: Record<"toy" | "qemu" | "redis", ReadonlyArray<string>> = { toy: BENCH_METHODS, qemu: QEMU_BENCH_METHODS, redis: REDIS_BENCH_METHODS }

export const benchCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "bench",
    describe: "measure vmsnap against its baselines on the same KVM guest, or against real QEMU's and Redis's own snapshots (--target)",
    builder: (y) =>
      y
        .option("target", {
          choices: ["toy", "qemu", "redis"] as const, default: "toy" as const,
          describe: "toy: the toy VMM's KVM guest, methods " + BENCH_METHODS.join(", ") + "; " +
            "qemu: a real QEMU running a bare-metal guest that writes random pages and times each write, methods " + QEMU_BENCH_METHODS.join(", ") +
            " (QEMU's background-snapshot, vmsnap snapshot --pid of QEMU's guest RAM, QEMU's migrate with the VM stopped); " +
            "redis: a real redis-server filled to --sizes under redis-benchmark SETs, methods " + REDIS_BENCH_METHODS.join(", ") +
            " (Redis's fork copy-on-write save, vmsnap snapshot --pid of the server)"
        })
        .option("sizes", { type: "string", default: "1GiB", describe: "comma-separated guest sizes (qemu: the guest's working set; redis: the data Redis holds)" })
        .option("rate", { type: "number", default: 0, describe: "toy: guest writes in pages/s (0: as fast as it can)" })
        .option("methods", { type: "string", describe: "comma-separated methods (default: every method of the --target)" })
        .option("vcpus", { type: "number", default: 1, describe: "toy: guest vCPUs" })
        .option("warmup", { type: "number", default: 2000, describe: "ms the guest (toy, qemu) or the load (redis) runs before each snapshot" })
        .option("after", { type: "number", default: 1000, describe: "ms measured after each snapshot (toy: after its last page is saved)" })
        .option("runs", { type: "number", default: 3, describe: "runs of each method (medians and range are reported)" })
        .option("buffer", bufferOption("vmsnap's pool"))
        .option("compression", { ...compressionOptionSpec, describe: `vmsnap's record compression (${compressionOptionSpec.describe})` })
        .option("fault-around", faultAroundOptionSpec("vmsnap's fault-around window in pages (1 = off)"))
        .option("steer", { type: "boolean", default: true, describe: "toy: vmsnap sweeps where the guest writes first (--no-steer: front to back)" })
        .option("pattern", { choices: ["random", "sequential", "hot"] as const, default: "random" as const, describe: "toy: which pages the guest writes (hot: about 90% of writes to a tenth of the pages)" })
        .option("window", { type: "number", default: 250, describe: "qemu: the guest's measuring window in ms (its own counts and histograms per window)" })
        .option("value-size", { type: "number", default: 1000, describe: "redis: bytes per value (the fill and the load)" })
        .option("clients", { type: "number", default: 16, describe: "redis: redis-benchmark's concurrent clients" })
        .option("output-dir", { type: "string", describe: "qemu, redis: keep every snapshot here as METHOD-RUN.vmsnap / .qemu / .rdb (default: each is deleted after its trial)" })
        .option("restore", { type: "boolean", default: false, describe: "benchmark restore instead: per size, lazy vs eager time to the guest's first write and serve's handshake to first page; at 512 MiB, COPY / CONTINUE / MOVE and a raw image against a bare handler" })
        .example("$0 bench", "1 GiB, every method, 3 runs each: a few minutes")
        .example("$0 bench --sizes 1GiB,4GiB,8GiB --methods vmsnap,stop-the-world --json", "")
        .example("$0 bench --methods vmsnap,floor --pattern hot --runs 5", "a guest writing mostly a tenth of its memory")
        .example("$0 bench --restore --sizes 1GiB,4GiB,8GiB", "lazy restore: first write must stay flat")
        .example("$0 bench --target qemu --sizes 1GiB --runs 3", "QEMU's background-snapshot vs vmsnap --pid vs stop-the-world, same guest (needs qemu-system-x86, root)")
        .example("$0 bench --target redis --sizes 1GiB --runs 3 --json", "Redis BGSAVE vs vmsnap --pid under redis-benchmark (needs redis-server, root)")
        .example("$0 bench --target redis --sizes 64MiB --runs 1", "a quick check that everything works")
        .epilogue(
          "Every method runs on the same workload in one run, --runs times, interleaved; the tables print medians with the range. " +
            "What each column means, how it is measured and a recorded run: docs/BENCHMARKS.md. " +
            "QEMU comes from Debian's qemu-system-x86, Redis from redis-server and redis-tools (apt-get install ...)."
        ),
    handler: (a) => {
      const sizes = String(a.sizes).split(",").map((t) => sizeOption("sizes", t, 4 * 1024 * 1024))
      for (const s of sizes) if (s % (2 * 1024 * 1024) !== 0) throw new UsageError(`--sizes ${formatBytes(s)}: each must be a multiple of 2 MiB`)
      const known = TARGET_METHODS[a.target]
      const methods = a.methods === undefined ? [...known] : String(a.methods).split(",").map((m) => m.trim())
      for (const m of methods) if (!known.includes(m)) throw new UsageError(`--methods: unknown method ${m} for --target ${a.target} (known: ${known.join(", ")})`)
      if (!Number.isInteger(a.vcpus) || a.vcpus < 1 || a.vcpus > 32) throw new UsageError(`--vcpus ${a.vcpus}: must be 1 to 32`)
      if (!Number.isFinite(a.rate) || a.rate < 0) throw new UsageError(`--rate ${a.rate}: must be 0 or more pages/s`)
      if (!Number.isInteger(a.runs) || a.runs < 1 || a.runs > 20) throw new UsageError(`--runs ${a.runs}: must be 1 to 20`)
      const poolPages = poolPagesOption(a.buffer)
      if (a.target !== "toy") {
        if (a.restore) throw new UsageError("--restore benchmarks the toy VMM's restore: leave out --target")
        if (!Number.isInteger(a.window) || a.window < 50 || a.window > 5000) throw new UsageError(`--window ${a.window}: must be 50 to 5000 ms`)
        if (!Number.isInteger(a["value-size"]) || a["value-size"] < 1 || a["value-size"] > 1024 * 1024) throw new UsageError(`--value-size ${a["value-size"]}: must be 1 to 1048576 bytes`)
        if (!Number.isInteger(a.clients) || a.clients < 1 || a.clients > 1000) throw new UsageError(`--clients ${a.clients}: must be 1 to 1000`)
        const outputDir = a["output-dir"]
        if (outputDir !== undefined && !(existsSync(outputDir) && statSync(outputDir).isDirectory())) throw new UsageError(`--output-dir ${outputDir}: not a directory`)
        const real: RealBenchFlags = {
          ...commonFlags(a), sizes, methods, runs: a.runs, warmupMs: a.warmup, afterMs: a.after, poolPages,
          faultAroundPages: faultAroundOption(a["fault-around"]), compression: a.compression, windowMs: a.window,
          valueBytes: a["value-size"], clients: a.clients, ...(outputDir !== undefined ? { outputDir } : {})
        }
        schedule(() => (a.target === "qemu" ? runQemuBench(io, real) : runRedisBench(io, real)))
        return
      }
      if (a.restore) {
        schedule(() => runRestoreBench(io, { ...commonFlags(a), sizes }))
        return
      }
      schedule(() =>
        runBench(io, {
          ...commonFlags(a), sizes, rate: Math.round(a.rate), methods: methods as Array<BenchMethod>, vcpus: a.vcpus,
          warmupMs: a.warmup, afterMs: a.after, runs: a.runs, poolPages, compression: a.compression,
          faultAroundPages: faultAroundOption(a["fault-around"]), steer: a.steer !== false,
          pattern: a.pattern as "random" | "sequential" | "hot"
        })
      )
    }
  })
