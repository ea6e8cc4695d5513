/**
 * Smoke test of `vmsnap bench --target qemu|redis` at small sizes: every
 * method produces a result, vmsnap's snapshot files (kept with --output-dir)
 * verify with `vmsnap verify`, QEMU's and Redis's own outputs are theirs.
 * No timing assertions: the figures are the bench's business. Also the
 * errors when QEMU or Redis is missing (PATH without them): exit 4 and how
 * to install. Installs Debian's qemu-system-x86 / redis-server when missing
 * (test/debianPackages.ts), else skips with the reason.
 */
import { spawnSync } from "node:child_process"
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"
import { ensureDebianPackage } from "./debianPackages.js"
import { scratchDir } from "./toyVmmTests.js"

const bin = join(dirname(fileURLToPath(import.meta.url)), "..", "packages", "cli", "dist", "bin.js")
const dir = scratchDir("vmsnap-bench-real-")

const needsRoot = (): string | undefined => {
  if (!existsSync(bin)) return `the CLI is not built (${bin})`
  if (process.arch !== "x64") return "snapshot --pid is implemented for x86-64 only"
  if (process.getuid?.() !== 0) return "needs root: ptrace and userfaultfd inside QEMU and Redis"
  return undefined
}
const qemuSkip = needsRoot() ?? (existsSync("/dev/kvm") ? ensureDebianPackage("qemu-system-x86", "qemu-system-x86_64") : "no /dev/kvm")
const redisSkip = needsRoot() ?? ensureDebianPackage("redis-server", "redis-server") ?? ensureDebianPackage("redis-tools", "redis-benchmark")
if (qemuSkip) console.warn(`SKIP bench --target qemu: ${qemuSkip}`)
if (redisSkip) console.warn(`SKIP bench --target redis: ${redisSkip}`)

const vmsnap = (args: ReadonlyArray<string>, env?: NodeJS.ProcessEnv) =>
  spawnSync(process.execPath, [bin, ...args], { encoding: "utf8", env: env ?? process.env, timeout: 600_000 })

/** Every kept vmsnap file passes `vmsnap verify`; returns how many there were. */
const verifyAll = (out: string): number => {
  const files = readdirSync(out).filter((n) => n.endsWith(".vmsnap"))
  for (const f of files) {
    const v = vmsnap(["verify", join(out, f)])
    expect(v.status, `verify ${f}: ${v.stderr}`).toBe(0)
  }
  return files.length
}

interface Trial {
  readonly ok: boolean
  readonly error: string | null
  readonly outputBytes: number
  readonly outputChecked: boolean
}
interface Method {
  readonly method: string
  readonly ok: boolean
  readonly trials: ReadonlyArray<Trial>
}

const expectEveryMethod = (methods: ReadonlyArray<Method>, names: ReadonlyArray<string>) => {
  expect(methods.map((m) => m.method)).toEqual(names)
  for (const m of methods) {
    expect(m.trials.length, m.method).toBe(1)
    expect(m.trials[0]!.error, m.method).toBeNull()
    expect(m.ok, m.method).toBe(true)
    expect(m.trials[0]!.outputChecked, m.method).toBe(true)
    expect(m.trials[0]!.outputBytes, m.method).toBeGreaterThan(0)
  }
}

describe("vmsnap bench on real software", () => {
  it.skipIf(qemuSkip)("--target qemu: background-snapshot, vmsnap --pid and stop-the-world each produce a checked output", () => {
    const out = join(dir, "qemu")
    mkdirSync(out)
    const r = vmsnap(["bench", "--target", "qemu", "--sizes", "32MiB", "--runs", "1", "--warmup", "500", "--after", "500", "--output-dir", out, "--json"])
    expect(r.status, r.stderr + r.stdout).toBe(0)
    const j = JSON.parse(r.stdout) as { ok: boolean; results: Array<{ methods: Array<Method & { trials: Array<Trial & { guest: { during: { windows: number } } }> }> }> }
    expect(j.ok).toBe(true)
    expectEveryMethod(j.results[0]!.methods, ["qemu-background", "vmsnap-pid", "qemu-stop"])
    for (const m of j.results[0]!.methods) expect(m.trials[0]!.guest.during.windows, `${m.method}: the guest reported no window during the snapshot`).toBeGreaterThan(0)
    expect(verifyAll(out)).toBe(1)
    for (const name of ["qemu-background-1.qemu", "qemu-stop-1.qemu"]) expect(readFileSync(join(out, name)).subarray(0, 4).toString("latin1"), name).toBe("QEVM")
  }, 600_000)

  it.skipIf(redisSkip)("--target redis: BGSAVE and vmsnap --pid each produce a checked output under load", () => {
    const out = join(dir, "redis")
    mkdirSync(out)
    const r = vmsnap(["bench", "--target", "redis", "--sizes", "16MiB", "--runs", "1", "--warmup", "500", "--after", "500", "--output-dir", out, "--json"])
    expect(r.status, r.stderr + r.stdout).toBe(0)
    const j = JSON.parse(r.stdout) as { ok: boolean; results: Array<{ methods: Array<Method & { trials: Array<Trial & { clients: { during: { requests: number } } }> }> }> }
    expect(j.ok).toBe(true)
    expectEveryMethod(j.results[0]!.methods, ["bgsave", "vmsnap-pid"])
    expect(verifyAll(out)).toBe(1)
    expect(readFileSync(join(out, "bgsave-1.rdb")).subarray(0, 5).toString("latin1")).toBe("REDIS")
  }, 600_000)

  it.skipIf(!existsSync(bin) || process.arch !== "x64")("QEMU or Redis missing: exit 4, saying what to install", () => {
    // A PATH with a shell and nothing else: neither QEMU nor Redis is found.
    const path = join(dir, "bare-path")
    mkdirSync(path)
    symlinkSync("/bin/sh", join(path, "sh"))
    const env = { ...process.env, PATH: path }
    const q = vmsnap(["bench", "--target", "qemu", "--sizes", "32MiB", "--runs", "1"], env)
    expect(q.status, q.stderr).toBe(4)
    expect(q.stderr).toMatch(/qemu-system-x86_64 is not installed.*apt-get install qemu-system-x86/)
    const r = vmsnap(["bench", "--target", "redis", "--sizes", "16MiB", "--runs", "1", "--json"], env)
    expect(r.status, r.stdout).toBe(4)
    expect(JSON.parse(r.stdout).error.message).toMatch(/redis-server is not installed.*apt-get install redis-server/)
  })
})
