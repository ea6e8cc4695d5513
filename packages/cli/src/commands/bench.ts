/** `vmsnap bench`: vmsnap against its baselines on the same guest, one table. */
import { formatBytes } from "@vmsnap/core"
import {
  BENCH_METHODS, type BenchMethod, type BenchOptions, type BenchRun, type RestoreBenchResult, runBenchmark, runRestoreBenchmark, type Spread
} from "@vmsnap/rig"
import type { Io } from "../Io.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { bufferOption, commonFlags, faultAroundOption, faultAroundOptionSpec, poolPagesOption, sizeOption, UsageError } from "../Options.js"
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
        `tput/after: those over the same windows of the same guest with no snapshot (docs/BENCHMARKS.md); latency, stalls, blocked: as the guest measured them during the snapshot`,
        table(runs)
      ].join("\n"),
      exitCode: runs.every((r) => r.ok) ? 0 : 1
    })
  )

const restoreTable = (r: RestoreBenchResult): string => {
  const lines = ["handshake to the guest's first write (lazy) vs every page decoded first (eager):", "  size       guest    lazy ms   eager ms"]
  for (const f of r.firstWrite)
    lines.push(`  ${formatBytes(f.sizeBytes).padEnd(9)}  ${f.guestKind.padEnd(7)}  ${f.lazyMs.toFixed(2).padStart(7)}  ${String(f.eagerMs).padStart(9)}`)
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
  lines.push("  (floor: a bare handler, one 4 KiB UFFDIO_COPY per fault from the image in memory; targets: p50 <= 1.5x, p99 <= 3x)")
  return lines.join("\n")
}

export const runRestoreBench = (io: Io, flags: CommonFlags & { sizes: ReadonlyArray<number> }) =>
  runCommand(
    io,
    flags,
    runRestoreBenchmark({ sizes: flags.sizes, modeSize: 512 * 1024 * 1024, onStart: (what) => !flags.json && io.stderr(`bench: ${what}...\n`) }),
    (r) => ({ json: { ok: r.modes.every((m) => m.error === null), restore: r }, human: restoreTable(r), exitCode: r.modes.every((m) => m.error === null) ? 0 : 1 })
  )

export const benchCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "bench",
    describe: "measure vmsnap against its baselines (no pool, a minimal C handler, fork, stop-the-world) on the same KVM guest",
    builder: (y) =>
      y
        .option("sizes", { type: "string", default: "1GiB", describe: "comma-separated guest sizes" })
        .option("rate", { type: "number", default: 0, describe: "guest writes in pages/s (0: as fast as it can)" })
        .option("methods", { type: "string", default: BENCH_METHODS.join(","), describe: "comma-separated methods" })
        .option("vcpus", { type: "number", default: 1, describe: "guest vCPUs" })
        .option("warmup", { type: "number", default: 2000, describe: "ms the guest runs before each snapshot" })
        .option("after", { type: "number", default: 1000, describe: "ms measured after each snapshot's last page is saved" })
        .option("runs", { type: "number", default: 3, describe: "runs of each method (medians and range are reported)" })
        .option("buffer", bufferOption("vmsnap's pool"))
        .option("compression", { choices: ["lz4", "none"] as const, default: "lz4" as const, describe: "vmsnap's record compression" })
        .option("fault-around", faultAroundOptionSpec("vmsnap's fault-around window in pages (1 = off)"))
        .option("steer", { type: "boolean", default: true, describe: "vmsnap sweeps where the guest writes first (--no-steer: front to back)" })
        .option("pattern", { choices: ["random", "sequential", "hot"] as const, default: "random" as const, describe: "which pages the guest writes (hot: about 90% of writes to a tenth of the pages)" })
        .option("restore", { type: "boolean", default: false, describe: "benchmark restore instead: lazy vs eager time to the guest's first write per size, and COPY / CONTINUE / MOVE at 512 MiB" })
        .example("$0 bench", "1 GiB, every method, 3 runs each: a few minutes")
        .example("$0 bench --sizes 1GiB,4GiB,8GiB --methods vmsnap,stop-the-world --json", "")
        .example("$0 bench --methods vmsnap,floor --pattern hot --runs 5", "a guest writing mostly a tenth of its memory")
        .example("$0 bench --restore --sizes 1GiB,4GiB,8GiB", "lazy restore: first write must stay flat"),
    handler: (a) => {
      const sizes = String(a.sizes).split(",").map((t) => sizeOption("sizes", t, 4 * 1024 * 1024))
      for (const s of sizes) if (s % (2 * 1024 * 1024) !== 0) throw new UsageError(`--sizes ${formatBytes(s)}: each must be a multiple of 2 MiB`)
      const methods = String(a.methods).split(",").map((m) => m.trim())
      for (const m of methods) if (!(BENCH_METHODS as ReadonlyArray<string>).includes(m)) throw new UsageError(`--methods: unknown method ${m} (known: ${BENCH_METHODS.join(", ")})`)
      if (!Number.isInteger(a.vcpus) || a.vcpus < 1 || a.vcpus > 32) throw new UsageError(`--vcpus ${a.vcpus}: must be 1 to 32`)
      if (!Number.isFinite(a.rate) || a.rate < 0) throw new UsageError(`--rate ${a.rate}: must be 0 or more pages/s`)
      if (!Number.isInteger(a.runs) || a.runs < 1 || a.runs > 20) throw new UsageError(`--runs ${a.runs}: must be 1 to 20`)
      const poolPages = poolPagesOption(a.buffer)
      if (a.restore) {
        schedule(() => runRestoreBench(io, { ...commonFlags(a), sizes }))
        return
      }
      schedule(() =>
        runBench(io, {
          ...commonFlags(a), sizes, rate: Math.round(a.rate), methods: methods as Array<BenchMethod>, vcpus: a.vcpus,
          warmupMs: a.warmup, afterMs: a.after, runs: a.runs, poolPages, compression: a.compression as "lz4" | "none",
          faultAroundPages: faultAroundOption(a["fault-around"]), steer: a.steer !== false,
          pattern: a.pattern as "random" | "sequential" | "hot"
        })
      )
    }
  })
