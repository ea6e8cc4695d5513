/**
 * `vmsnap bench --target redis`: one real Redis (RedisServer.ts) holding
 * `datasetBytes` of values, under a redis-benchmark SET load on loopback,
 * snapshotted in one run by
 *
 *   bgsave      Redis's own BGSAVE: fork(), the child writes the RDB while
 *               the parent's writes copy pages (copy-on-write)
 *   vmsnap-pid  `vmsnap snapshot --pid` of the server, every writable mapping
 *               it can capture (PidSnapshot.ts in @vmsnap/core)
 *
 * Client latency is a probe's (internal/redisProbe.ts, its own process:
 * one SET at a time, each timed), cut into before / during / after the
 * snapshot by the moment each request was sent; throughput is Redis's own
 * `total_commands_processed` (load and probe) over the same windows. Extra
 * memory: for BGSAVE the fork child's Private_Dirty (the pages it holds
 * copies of; peak sampled every 10 ms) and Redis's `rdb_last_cow_size`; for
 * vmsnap the growth of this process's RssAnon (vmsnap runs here: its pool
 * and buffers); for both, the growth of Redis's own RssAnon (the load adds
 * keys too). One Redis for every trial (filled once), methods interleaved.
 */
import { CapabilityError, type Compression, InvalidInput, snapshotPid, type VmsnapError, type WpNative } from "@vmsnap/core"
import { Effect, Exit } from "effect"
import { spawn } from "node:child_process"
import { copyFileSync, readFileSync, rmSync, statSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { type Spread, windowOf } from "./BenchWindows.js"
import { beginsWith, causeText, type MemoryPeak, type RealTrial, samplePeaks, scratchDirScoped, summarizeMethods, verifies } from "./RealBenchReport.js"
import { statusBytes } from "./QemuGuest.js"
import { childrenOf, privateDirtyBytes, RedisServer, redisMissing } from "./RedisServer.js"

export const REDIS_BENCH_METHODS = ["bgsave", "vmsnap-pid"] as const
export type RedisBenchMethod = (typeof REDIS_BENCH_METHODS)[number]

export interface RedisBenchOptions {
  /** Bytes of values to hold (keys of `valueBytes` each; Redis's used_memory is reported). */
  readonly datasetBytes: number
  readonly valueBytes: number
  readonly methods: ReadonlyArray<RedisBenchMethod>
  readonly runs: number
  /** redis-benchmark clients. */
  readonly clients: number
  /** The load runs this long before each snapshot (the `before` window is its last second at most). */
  readonly warmupMs: number
  readonly afterMs: number
  readonly poolPages: number
  readonly faultAroundPages: number
  readonly compression: Compression
  /** Keep each output here as METHOD-RUN.vmsnap / .rdb (default: deleted after each trial). */
  readonly outputDir?: string
  readonly onStart?: (what: string, run: number) => void
}

/** What the clients saw in one window: the probe's latency, the server's throughput. */
export interface ClientWindow {
  readonly seconds: number
  readonly requests: number
  readonly latencyUs: { readonly p50: number; readonly p99: number; readonly p999: number; readonly max: number }
  /** Commands/s Redis processed (load and probe). */
  readonly commandsPerSecond: number
}

export interface RedisTrial extends RealTrial<RedisBenchMethod> {
  /** RssAnon growth of Redis (target) and of the bench's process (vmsnap); the fork child's Private_Dirty and Redis's own count of it. */
  readonly extraMemory: MemoryPeak & { readonly redisCowBytes: number | null }
  readonly clients: { readonly before: ClientWindow; readonly during: ClientWindow; readonly after: ClientWindow }
}

export interface RedisMethodSummary {
  readonly method: RedisBenchMethod
  readonly ok: boolean
  readonly error: string | null
  readonly figures: Record<RedisFigure, Spread>
  readonly trials: ReadonlyArray<RedisTrial>
}

export interface RedisBenchResult {
  readonly keys: number
  readonly valueBytes: number
  /** Redis's used_memory after filling. */
  readonly usedMemoryBytes: number
  readonly methods: ReadonlyArray<RedisMethodSummary>
}

const FIGURES = {
  pauseMs: (t: RedisTrial) => t.pauseMs,
  setupStopMs: (t: RedisTrial) => t.setupStopMs,
  durationMs: (t: RedisTrial) => t.durationMs,
  beforeP99Us: (t: RedisTrial) => t.clients.before.latencyUs.p99,
  duringP50Us: (t: RedisTrial) => t.clients.during.latencyUs.p50,
  duringP99Us: (t: RedisTrial) => t.clients.during.latencyUs.p99,
  duringP999Us: (t: RedisTrial) => t.clients.during.latencyUs.p999,
  duringMaxUs: (t: RedisTrial) => t.clients.during.latencyUs.max,
  beforeCommandsPerSecond: (t: RedisTrial) => t.clients.before.commandsPerSecond,
  duringCommandsPerSecond: (t: RedisTrial) => t.clients.during.commandsPerSecond,
  afterCommandsPerSecond: (t: RedisTrial) => t.clients.after.commandsPerSecond,
  /** The snapshot's own memory: the fork child's copies, or vmsnap's growth. */
  extraMemoryBytes: (t: RedisTrial) => (t.method === "bgsave" ? Math.max(t.extraMemory.child ?? 0, t.extraMemory.redisCowBytes ?? 0) : t.extraMemory.vmsnap),
  redisGrowthBytes: (t: RedisTrial) => t.extraMemory.target,
  outputBytes: (t: RedisTrial) => t.outputBytes
}
export type RedisFigure = keyof typeof FIGURES

const MiB = 1024 * 1024
const nowNs = () => Number(process.hrtime.bigint())
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
/** Redis's memory per key beyond the value (dict entry, key, objects; jemalloc size classes), measured here. */
const KEY_OVERHEAD = 110
const probePath = () => join(dirname(fileURLToPath(import.meta.url)), "internal", "redisProbe.js")

interface Probe {
  readonly latency: Float64Array
  readonly commands: ReadonlyArray<readonly [number, number]>
}

const startProbe = async (port: number, keyspace: number, valueBytes: number, out: string) => {
  const child = spawn(process.execPath, [probePath(), String(port), String(keyspace), String(valueBytes), out], { stdio: ["ignore", "pipe", "pipe"] })
  let err = ""
  child.stderr!.on("data", (d) => (err += d))
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once("data", () => resolve())
    child.once("exit", () => reject(new Error(`the Redis latency probe exited: ${err.trim()}`)))
  })
  return {
    stop: async (): Promise<Probe> => {
      const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)))
      child.kill("SIGTERM")
      if ((await exited) !== 0) throw new Error(`the Redis latency probe failed: ${err.trim()}`)
      const j = JSON.parse(readFileSync(out, "utf8")) as { latency: string; commands: Array<[number, number]> }
      const b = Buffer.from(j.latency, "base64")
      return { latency: new Float64Array(b.buffer, b.byteOffset, b.length / 8), commands: j.commands }
    },
    kill: () => child.kill("SIGKILL")
  }
}

/** The probe's requests sent in [fromNs, toNs] and the server's commands/s there. */
const clientWindow = (p: Probe, fromNs: number, toNs: number): ClientWindow => {
  const lat: Array<number> = []
  for (let i = 0; i < p.latency.length; i += 2) if (p.latency[i]! >= fromNs && p.latency[i]! < toNs) lat.push(p.latency[i + 1]!)
  lat.sort((a, b) => a - b)
  const q = (x: number) => (lat.length ? Math.round(lat[Math.min(lat.length - 1, Math.ceil(x * lat.length) - 1)]! / 100) / 10 : 0)
  return {
    seconds: Math.round((toNs - fromNs) / 1e6) / 1000,
    requests: lat.length,
    latencyUs: { p50: q(0.5), p99: q(0.99), p999: q(0.999), max: lat.length ? Math.round(lat[lat.length - 1]! / 100) / 10 : 0 },
    commandsPerSecond: windowOf(p.commands, fromNs, toNs, fromNs).writesPerSecond
  }
}

interface Outcome {
  readonly pauseMs: number
  readonly setupStopMs: number
  /** vmsnap-pid only: of the cut's stop, the time spent write-protecting (its `pauseMs`); null for the others. */
  readonly protectMs: number | null
  readonly redisCowBytes: number | null
  readonly path: string
  readonly check: Effect.Effect<boolean>
}

const bgsave = async (r: RedisServer): Promise<Outcome> => {
  rmSync(r.rdbPath, { force: true })
  await r.redis.command("BGSAVE")
  let p: Map<string, string>
  for (;;) {
    p = await r.redis.info("persistence")
    if (p.get("rdb_bgsave_in_progress") === "0") break
    await sleep(10)
  }
  if (p.get("rdb_last_bgsave_status") !== "ok") throw new Error(`BGSAVE failed: rdb_last_bgsave_status ${p.get("rdb_last_bgsave_status")}`)
  const stats = await r.redis.info("stats")
  return {
    pauseMs: Number(stats.get("latest_fork_usec") ?? 0) / 1000,
    setupStopMs: 0,
    protectMs: null,
    redisCowBytes: p.has("rdb_last_cow_size") ? Number(p.get("rdb_last_cow_size")) : null,
    path: r.rdbPath,
    check: beginsWith(r.rdbPath, "REDIS")
  }
}

const vmsnapPid = (r: RedisServer, path: string, o: RedisBenchOptions) =>
  Effect.map(
    snapshotPid({ pid: r.pid, path, poolPages: o.poolPages, faultAroundPages: o.faultAroundPages, compression: o.compression }),
    (s): Outcome => ({ pauseMs: s.stoppedMs.cut, setupStopMs: s.stoppedMs.setup, protectMs: s.pauseMs, redisCowBytes: null, path, check: verifies(path) })
  )

const emptyWindow: ClientWindow = { seconds: 0, requests: 0, latencyUs: { p50: 0, p99: 0, p999: 0, max: 0 }, commandsPerSecond: 0 }

const trial = (method: RedisBenchMethod, run: number, r: RedisServer, keys: number, dir: string, vmsnapBase: number, o: RedisBenchOptions): Effect.Effect<RedisTrial, never, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      const failed = (error: string): RedisTrial => ({
        method, run, ok: false, error, pauseMs: 0, setupStopMs: 0, protectMs: null, durationMs: 0, extraMemory: { target: 0, vmsnap: 0, redisCowBytes: null }, outputBytes: 0, outputChecked: false,
        clients: { before: emptyWindow, during: emptyWindow, after: emptyWindow }
      })
      const probe = yield* Effect.acquireRelease(
        Effect.tryPromise(() => startProbe(r.port, keys, o.valueBytes, join(dir, `probe-${method}-${run}.json`))),
        (p) => Effect.sync(() => p.kill())
      ).pipe(Effect.exit)
      if (Exit.isFailure(probe)) return failed(causeText(probe.cause))
      yield* Effect.addFinalizer(() => Effect.promise(() => r.stopLoad()))
      // Bounded: far more than a trial needs at this machine's rates, and stopped at its end.
      r.startLoad({ clients: o.clients, requests: 50_000_000, keyspace: keys, valueBytes: o.valueBytes })
      yield* Effect.promise(() => sleep(o.warmupMs))
      const vmsnapPath = join(o.outputDir ?? dir, `${method}-${run}.vmsnap`)
      const peaks = samplePeaks(r.pid, method === "vmsnap-pid" ? vmsnapBase : Infinity, method === "bgsave" ? () => childrenOf(r.pid).reduce((a, c) => a + privateDirtyBytes(c), 0) : undefined)
      const beginNs = nowNs()
      const outcome = yield* Effect.exit<Outcome, unknown, WpNative>(
        method === "vmsnap-pid" ? vmsnapPid(r, vmsnapPath, o) : Effect.tryPromise({ try: () => bgsave(r), catch: (e) => e })
      )
      const endNs = nowNs()
      const memory = peaks.stop()
      yield* Effect.promise(() => sleep(o.afterMs))
      yield* Effect.promise(() => r.stopLoad())
      const probed = yield* Effect.exit(Effect.tryPromise(() => probe.value.stop()))
      if (Exit.isFailure(outcome)) return failed(causeText(outcome.cause))
      if (Exit.isFailure(probed)) return failed(causeText(probed.cause))
      const p = probed.value
      const checked = yield* outcome.value.check
      const outputBytes = statSync(outcome.value.path).size
      if (o.outputDir && method === "bgsave") copyFileSync(outcome.value.path, join(o.outputDir, `${method}-${run}.rdb`))
      if (!o.outputDir || method === "bgsave") rmSync(outcome.value.path, { force: true })
      return {
        method, run, ok: checked, error: checked ? null : "the output did not check out",
        pauseMs: Math.round(outcome.value.pauseMs * 1000) / 1000,
        setupStopMs: outcome.value.setupStopMs,
        protectMs: outcome.value.protectMs === null ? null : Math.round(outcome.value.protectMs * 1000) / 1000,
        durationMs: Math.round((endNs - beginNs) / 1e6),
        extraMemory: { ...memory, redisCowBytes: outcome.value.redisCowBytes },
        outputBytes,
        outputChecked: checked,
        clients: {
          before: clientWindow(p, beginNs - Math.min(1000, o.warmupMs) * 1e6, beginNs),
          during: clientWindow(p, beginNs, endNs),
          after: clientWindow(p, endNs, endNs + o.afterMs * 1e6)
        }
      }
    })
  )

/** Fills one Redis, then runs every method `runs` times under the same load, methods interleaved per run. */
export const runRedisBenchmark = (o: RedisBenchOptions): Effect.Effect<RedisBenchResult, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      if (!Number.isSafeInteger(o.datasetBytes) || o.datasetBytes < 4 * MiB) return yield* Effect.fail(new InvalidInput({ reason: `Redis dataset ${o.datasetBytes} bytes: at least 4 MiB` }))
      if (!Number.isInteger(o.valueBytes) || o.valueBytes < 1 || o.valueBytes > MiB) return yield* Effect.fail(new InvalidInput({ reason: `Redis value size ${o.valueBytes}: 1 byte to 1 MiB` }))
      const missing = redisMissing()
      if (missing) return yield* Effect.fail(new CapabilityError({ missing: "Redis", reason: missing }))
      const dir = yield* scratchDirScoped("vmsnap-bench-redis-")
      const server = yield* Effect.acquireRelease(
        Effect.tryPromise({ try: () => RedisServer.start(dir), catch: (e) => new CapabilityError({ missing: "a running Redis", reason: e instanceof Error ? e.message : String(e) }) }),
        (r) => Effect.sync(() => r.close())
      )
      const keys = Math.max(1, Math.round(o.datasetBytes / (o.valueBytes + KEY_OVERHEAD)))
      o.onStart?.(`filling Redis with ${keys} keys of ${o.valueBytes} bytes`, 0)
      const usedMemoryBytes = yield* Effect.promise(() => server.populate(keys, o.valueBytes))
      const vmsnapBase = statusBytes("self", "RssAnon")
      const trials: Array<RedisTrial> = []
      for (let run = 1; run <= o.runs; run++)
        for (const method of o.methods) {
          o.onStart?.(method, run)
          trials.push(yield* trial(method, run, server, keys, dir, vmsnapBase, o))
        }
      return {
        keys, valueBytes: o.valueBytes, usedMemoryBytes,
        methods: summarizeMethods(o.methods, trials, FIGURES)
      }
    })
  )
