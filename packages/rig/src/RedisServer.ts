/**
 * A real Redis (Debian's redis-server) for `vmsnap bench --target redis`:
 * started on a free loopback port with persistence off (no RDB saves of its
 * own, no AOF) in a private directory, filled by a Lua script, loaded
 * by `redis-benchmark` (loopback, bounded in count; killed at the end of a
 * trial), and asked for `BGSAVE` and `INFO`.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { readFileSync } from "node:fs"
import { createServer } from "node:net"
import { join } from "node:path"
import { Resp } from "./Resp.js"

export const REDIS_PROGRAMS = ["redis-server", "redis-benchmark"] as const

const onPath = (program: string) => spawnSync("sh", ["-c", `command -v ${program}`], { stdio: "ignore" }).status === 0
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Why Redis cannot be benchmarked here, with how to install it; undefined when it can. */
export const redisMissing = (): string | undefined => {
  if (!onPath("redis-server")) return "redis-server is not installed: install Redis (Debian/Ubuntu: `apt-get install redis-server`, which brings redis-tools)"
  if (!onPath("redis-benchmark")) return "redis-benchmark is not installed (Debian/Ubuntu: `apt-get install redis-tools`)"
  return undefined
}

/** A TCP port on 127.0.0.1 free a moment ago. */
export const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const s = createServer()
    s.once("error", reject)
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })

/** Bytes of `Private_Dirty` of a process (its pages written since fork or allocation), 0 if gone. */
export const privateDirtyBytes = (pid: number): number => {
  try {
    return Number(/^Private_Dirty:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1] ?? 0) * 1024
  } catch {
    return 0
  }
}

/** The children of a process's main thread (a forked BGSAVE child). */
export const childrenOf = (pid: number): Array<number> => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {
    return []
  }
}

export class RedisServer {
  readonly child: ChildProcess
  private stderr = ""
  private client: Resp | undefined
  private load: ChildProcess | undefined

  private constructor(readonly port: number, readonly dir: string) {
    this.child = spawn("redis-server", [
      "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, "--dbfilename", "dump.rdb",
      "--protected-mode", "yes", "--daemonize", "no", "--logfile", ""
    ], { stdio: ["ignore", "ignore", "pipe"] })
    this.child.stderr!.on("data", (d) => (this.stderr += d))
  }

  /** Starts Redis in `dir` (its RDB goes there) and connects. */
  static async start(dir: string): Promise<RedisServer> {
    const r = new RedisServer(await freePort(), dir)
    for (let i = 0; i < 500 && !r.client; i++) {
      if (r.child.exitCode !== null) break
      r.client = await Resp.connect(r.port).catch(() => undefined)
      if (!r.client) await sleep(20)
    }
    if (!r.client) {
      r.close()
      throw new Error(`redis-server did not accept connections on 127.0.0.1:${r.port}: ${r.stderr.trim()}`)
    }
    return r
  }

  get pid(): number {
    return this.child.pid!
  }

  get redis(): Resp {
    return this.client!
  }

  get rdbPath(): string {
    return join(this.dir, "dump.rdb")
  }

  /**
   * `count` keys named as redis-benchmark names them (`key:` and 12 digits,
   * 0 to count-1), so that its `-r count` load overwrites them rather than
   * adding keys; values of `valueBytes` "x". Filled by a Lua script, 100 000
   * keys per call. Returns Redis's used_memory after.
   */
  async populate(count: number, valueBytes: number): Promise<number> {
    const script = "local v = string.rep('x', tonumber(ARGV[3])) for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do redis.call('SET', string.format('key:%012d', i), v) end return 1"
    for (let from = 0; from < count; from += 100_000)
      await this.redis.command("EVAL", script, "0", String(from), String(Math.min(count, from + 100_000)), String(valueBytes))
    return Number((await this.redis.info("memory")).get("used_memory") ?? 0)
  }

  /** Starts redis-benchmark: SETs of random keys of `keyspace` with `valueBytes` values by `clients` clients, at most `requests`. */
  startLoad(o: { readonly clients: number; readonly requests: number; readonly keyspace: number; readonly valueBytes: number }): void {
    this.load = spawn("redis-benchmark", [
      "-h", "127.0.0.1", "-p", String(this.port), "-c", String(o.clients), "-n", String(o.requests), "-r", String(o.keyspace),
      "-d", String(o.valueBytes), "-t", "set", "-q"
    ], { stdio: "ignore" })
  }

  /** Stops the load (if still running). */
  async stopLoad(): Promise<void> {
    const l = this.load
    this.load = undefined
    if (!l || l.exitCode !== null || l.signalCode !== null) return
    await new Promise<void>((resolve) => {
      l.once("exit", () => resolve())
      l.kill("SIGKILL")
    })
  }

  close(): void {
    this.load?.kill("SIGKILL")
    this.client?.close()
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL")
  }
}
