/**
 * The CLI in-process: each command's success path, its --json shape, and
 * each bad-input case with its exit code and one clear line.
 */
import { execFileSync } from "node:child_process"
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { memoryIo } from "../src/Io.js"
import { main } from "../src/main.js"
import { openSnapshot, RECORD_HEADER_BYTES, Vmsnap } from "@vmsnap/core"
import { Effect } from "effect"

const dir = mkdtempSync(join(tmpdir(), "vmsnap-cli-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const cli = async (...argv: Array<string>) => {
  const m = memoryIo()
  const code = await main(argv, m.io)
  return { code, stdout: m.stdout(), stderr: m.stderr() }
}

let unavailable: string | undefined
try {
  await Vmsnap.probe()
} catch (e) {
  unavailable = (e as Error).message
  console.warn(`SKIP snapshot-taking CLI tests: ${unavailable}`)
}

describe("usage", () => {
  it("--help lists the commands, examples and exit codes", async () => {
    const r = await cli("--help")
    expect(r.code).toBe(0)
    for (const word of ["demo", "inspect", "verify", "restore", "Exit codes"]) expect(r.stdout).toContain(word)
    const demo = await cli("demo", "--help")
    expect(demo.code).toBe(0)
    expect(demo.stdout).toContain("Examples:")
    expect(demo.stdout).toContain("--buffer")
  })

  it.each([
    [["demo", "--no-such-flag"], /Unknown argument/],
    [["demo", "--size", "lots"], /--size lots: not a size/],
    [["demo", "--size", "1000"], /must be at least/],
    [["demo", "--buffer", "4097"], /multiple of 4 KiB/],
    [["demo", "--writers", "0"], /--writers 0/],
    [["restore", "x.vmsnap"], /Missing required argument: raw/],
    [[], /name a command/],
    [["frobnicate"], /Unknown argument|name a command/]
  ])("%j is a usage error (exit 2, one clear line)", async (argv, pattern) => {
    const r = await cli(...argv)
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(pattern)
    expect(r.stderr).not.toMatch(/\n\s+at /) // no stack trace
    expect(r.stdout).toBe("")
  })

  it("usage errors with --json print one JSON object", async () => {
    const r = await cli("demo", "--size", "lots", "--json")
    expect(r.code).toBe(2)
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, exitCode: 2, error: { tag: "UsageError" } })
  })
})

describe("files that are missing or not snapshots", () => {
  it("a missing file: exit 1, names the file", async () => {
    const r = await cli("verify", join(dir, "missing.vmsnap"))
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/missing\.vmsnap.*no such file or directory/)
  })

  it("a file that is not a snapshot: exit 3 for verify, inspect and restore", async () => {
    const other = join(dir, "notes.txt")
    writeFileSync(other, "not a snapshot at all\n".repeat(20))
    for (const argv of [["verify", other], ["inspect", other], ["restore", other, "--raw", join(dir, "out.img")]]) {
      const r = await cli(...argv)
      expect(r.code).toBe(3)
      expect(r.stderr).toMatch(/not a vmsnap snapshot file/)
    }
    expect(readdirSync(dir).filter((n) => n.includes("out.img"))).toEqual([])
  })
})

describe.skipIf(unavailable)("commands against the real kernel", () => {
  const kept = join(dir, "demo.vmsnap")
  let demoJson: any

  beforeAll(async () => {
    const r = await cli("demo", "--size", "64MiB", "--warmup", "200", "--rate", "20000", "-o", kept, "--json")
    expect(r.stderr).toBe("")
    expect(r.code).toBe(0)
    expect(r.stdout.trim().split("\n")).toHaveLength(1)
    demoJson = JSON.parse(r.stdout)
  })

  it("demo --json has the documented shape and is consistent", () => {
    expect(demoJson.consistent).toBe(true)
    expect(demoJson.sizeBytes).toBe(64 * 1024 * 1024)
    for (const key of ["pauseMs", "durationMs", "throughputMBps", "fileBytes", "faults", "fallbacks", "poolHighWater"])
      expect(typeof demoJson[key], key).toBe("number")
    for (const phase of ["before", "during"])
      for (const q of ["p50", "p99", "max"]) expect(typeof demoJson.guest.writeLatencyUs[phase][q], `${phase}.${q}`).toBe("number")
    expect(demoJson.guest.writeLatencyUs.during.writes, JSON.stringify(demoJson)).toBeGreaterThan(0)
    // The toy VMM runs a KVM guest where /dev/kvm works, host threads otherwise.
    expect(["kvm", "threads"]).toContain(demoJson.guest.kind)
    if (existsSync("/dev/kvm") && demoJson.guest.kind !== "kvm") console.warn(`note: /dev/kvm exists but the toy VMM used threads: ${demoJson.guest.whyThreads}`)
    expect(demoJson.guest.processes).toBe(1)
    expect(demoJson.path).toBe(kept)
  })

  it("demo with --device: two processes wrote guest memory, still consistent", async () => {
    const r = await cli("demo", "--size", "32MiB", "--warmup", "100", "--device", "--json")
    expect(r.code, r.stdout).toBe(0)
    const j = JSON.parse(r.stdout)
    expect(j.consistent).toBe(true)
    expect(j.guest.processes).toBe(2)
  })

  it("demo --guest threads: writer threads in this process", async () => {
    const r = await cli("demo", "--guest", "threads", "--memory", "anon-thp", "--size", "16MiB", "--warmup", "100", "--json")
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout).guest.kind).toBe("threads")
  })

  it("demo prints a human report on stderr and nothing on stdout", async () => {
    const r = await cli("demo", "--size", "16MiB", "--warmup", "100", "--buffer", "0")
    expect(r.code).toBe(0)
    expect(r.stdout).toBe("")
    expect(r.stderr).toMatch(/CONSISTENT/)
    expect(r.stderr).toMatch(/snapshot file removed/)
    expect(readdirSync(tmpdir()).filter((n) => n.startsWith(`vmsnap-demo-${process.pid}-`))).toEqual([])
  })

  it("inspect, verify and restore a kept snapshot", async () => {
    const inspect = await cli("inspect", kept, "--json")
    expect(inspect.code).toBe(0)
    const info = JSON.parse(inspect.stdout)
    expect(info.regions).toHaveLength(1)
    expect(info.regions[0].pages).toBe(16384)
    expect(info.dataPages + info.zeroPages).toBe(16384)

    const verify = await cli("verify", kept)
    expect(verify.code).toBe(0)
    expect(verify.stderr).toMatch(/OK: 16384 pages/)

    const img = join(dir, "guest.img")
    const restore = await cli("restore", kept, "--raw", img, "--json")
    expect(restore.code).toBe(0)
    expect(JSON.parse(restore.stdout).outputs).toEqual([img])
    expect(readFileSync(img).length).toBe(64 * 1024 * 1024)

    const split = await cli("restore", kept, "--raw", join(dir, "split.img"), "--layout", "per-region")
    expect(split.code).toBe(0)
    expect(readFileSync(join(dir, "split.img.0")).equals(readFileSync(img))).toBe(true)
  })

  it("a corrupt snapshot: exit 3 with the reason", async () => {
    const bad = join(dir, "bad.vmsnap")
    const bytes = readFileSync(kept)
    bytes[Math.floor(bytes.length / 2)] ^= 0xff
    writeFileSync(bad, bytes)
    const r = await cli("verify", bad)
    expect(r.code).toBe(3)
    expect(r.stderr).toMatch(/bad\.vmsnap: not a valid snapshot: .*(checksum|magic|record)/)
  })

  it("a corrupt page payload: verify exits 3; inspect exits 0 saying it read no page data (break1 finding 7)", async () => {
    const bad = join(dir, "bad-payload.vmsnap")
    const bytes = readFileSync(kept)
    // The first byte of the first record that stores data: a payload byte, not a header.
    const offsets = await Effect.runPromise(Effect.scoped(Effect.map(openSnapshot(kept), (s) => [...s.index.map((e) => e.fileOffset), s.trailer.indexOffset])))
    const at = offsets.findIndex((o, i) => i + 1 < offsets.length && offsets[i + 1]! - o > RECORD_HEADER_BYTES)
    expect(at).toBeGreaterThanOrEqual(0)
    bytes[offsets[at]! + RECORD_HEADER_BYTES] ^= 0xff
    writeFileSync(bad, bytes)
    const verify = await cli("verify", bad)
    expect(verify.code).toBe(3)
    expect(verify.stderr).toMatch(/checksum/)
    const inspect = await cli("inspect", bad)
    expect(inspect.code).toBe(0)
    expect(inspect.stderr).toMatch(/checked +header, index and record headers only; page data not read: `vmsnap verify .*bad-payload\.vmsnap` checks every checksum/)
    const json = await cli("inspect", bad, "--json")
    expect(JSON.parse(json.stdout).payloadsChecked).toBe(false)
    expect((await cli("inspect", "--help")).stdout).toMatch(/reads no page data: `verify`\s+checks it/)
  })

  it("a directory as output: exit 1, one line, nothing written", async () => {
    const r = await cli("demo", "--size", "4MiB", "--warmup", "0", "-o", dir)
    expect(r.code).toBe(1)
    expect(r.stderr.trim().split("\n")).toHaveLength(1)
    expect(r.stderr).toMatch(/is a directory/)
  })

  it("a full disk: exit 1 naming it, no partial file", async () => {
    const small = join(dir, "small")
    mkdirSync(small)
    try {
      execFileSync("mount", ["-t", "tmpfs", "-o", "size=2m", "vmsnap-cli-test", small], { stdio: "pipe" })
    } catch (e) {
      console.warn(`SKIP full-disk CLI test: cannot mount a small tmpfs: ${String(e).split("\n")[0]}`)
      return
    }
    try {
      const r = await cli("demo", "--size", "32MiB", "--warmup", "0", "-o", join(small, "snap.vmsnap"), "--json")
      expect(r.code).toBe(1)
      expect(JSON.parse(r.stdout).error.message).toMatch(/no space left/)
      expect(readdirSync(small)).toEqual([])
    } finally {
      execFileSync("umount", ["-l", small])
    }
  })
})

describe("agent and snapshot usage", () => {
  it.each([
    [["snapshot", "-o", "x.vmsnap"], /exactly one of --agent SOCK/],
    [["snapshot", "-o", "x.vmsnap", "--agent", "/tmp/a.sock"], /--agent needs --vm ID/],
    [["snapshot", "--agent", "/tmp/a.sock", "--vm", "x"], /Missing required argument: output/],
    [["agent"], /Missing required arguments?: listen/],
    [["agent", "--listen", "/tmp/a.sock"], /Missing required argument: output-dir/],
    [["snapshot", "--agent", "/tmp/a.sock", "--vm", "x", "-o", "-"], /-o - works with --listen and --pid/],
    [["agent", "--listen", "/tmp/a.sock", "--output-dir", "/tmp", "--socket-mode", "rw"], /--socket-mode rw: give an octal mode/],
    [["agent", "--listen", "/tmp/a.sock", "--output-dir", "/tmp", "--stall-timeout", "0"], /--stall-timeout 0: must be seconds/],
    [["agent", "--listen", "/tmp/a.sock", "--output-dir", "/tmp", "--max-guest-size", "lots"], /--max-guest-size lots: not a size/],
    [["snapshot", "--agent", "/tmp/a.sock", "--vm", "x", "-o", "x.vmsnap", "--max-guest-size", "1GiB"], /--max-guest-size goes with --listen or --pid/],
    [["demo", "--guest", "vmm", "--memory", "anon-thp"], /needs --guest threads/],
    [["demo", "--guest", "threads", "--device"], /--device needs --guest vmm/]
  ])("%j is a usage error", async (argv, pattern) => {
    const r = await cli(...argv)
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(pattern)
  })

  it("snapshot -o - with --json is a usage error (both want standard output)", async () => {
    const r = await cli("snapshot", "--listen", "/tmp/a.sock", "-o", "-", "--json")
    expect(r.code).toBe(2)
    expect(r.stdout + r.stderr).toMatch(/-o - and --json both want standard output/)
  })

  it("snapshot --agent with no agent listening: exit 1 and the fix", async () => {
    const r = await cli("snapshot", "--agent", join(dir, "nobody.sock"), "--vm", "x", "-o", join(dir, "x.vmsnap"))
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/no agent is listening there: start one with `vmsnap agent --listen SOCK --output-dir DIR`/)
  })
})

describe.skipIf(unavailable)("bench", () => {
  it("--json: one run per method with the documented fields (shape only; figures live in docs/BENCHMARKS.md)", async () => {
    const r = await cli("bench", "--sizes", "8MiB", "--methods", "vmsnap,stop-the-world", "--warmup", "200", "--after", "200", "--json")
    expect(r.code, r.stdout).toBe(0)
    const j = JSON.parse(r.stdout)
    expect(j.runs.map((x: { method: string }) => x.method)).toEqual(["vmsnap", "stop-the-world"])
    for (const run of j.runs)
      for (const key of ["sizeBytes", "pauseMs", "durationMs", "faults", "faultsPerThousandWrites", "stallsOver1ms", "guestBlockedMs", "guestThroughputRatio", "guestThroughputAfterRatio", "throughputMBps", "extraMemoryBytes", "outputBytes"])
        expect(typeof run[key], key).toBe("number")
    expect(Object.keys(j.runs[0].latencyUs)).toEqual(["p50", "p99", "p999", "max"])
  })

  it("an unknown method is a usage error", async () => {
    const r = await cli("bench", "--methods", "vmsnap,teleport")
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(/unknown method teleport/)
  })
})

describe("serve", () => {
  it("needs --socket and a snapshot", async () => {
    const r = await cli("serve", join(dir, "x.vmsnap"))
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(/Missing required argument: socket/)
  })

  it("refuses a file that is not a snapshot before serving anyone (exit 3)", async () => {
    const other = join(dir, "not-a-snapshot.bin")
    writeFileSync(other, Buffer.alloc(8192, 7))
    const r = await cli("serve", other, "--socket", join(dir, "serve.sock"))
    expect(r.code).toBe(3)
    expect(r.stderr).toMatch(/not a vmsnap snapshot file/)
  })

  it("refuses an empty raw image before listening, saying so (exit 2, no socket)", async () => {
    const empty = join(dir, "empty.img")
    writeFileSync(empty, Buffer.alloc(0))
    const r = await cli("serve", "--raw", empty, "--socket", join(dir, "empty.sock"))
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(/the raw image is empty: no page to serve/)
    expect(existsSync(join(dir, "empty.sock"))).toBe(false)
  })
})

describe.skipIf(unavailable)("serve --once with the toy VMM", () => {
  it("restores a KVM guest lazily and exits once every page is resident", async () => {
    const { ToyVmm } = await import("@vmsnap/rig")
    const snap = join(dir, "serve-src.vmsnap")
    const made = await cli("demo", "--size", "16MiB", "--warmup", "100", "-o", snap, "--json")
    expect(made.code).toBe(0)
    const socket = join(dir, "serve-once.sock")
    const serving = cli("serve", snap, "--socket", socket, "--once", "--json")
    // The VMM runs 3 s: pages its guest does not touch come from the fill, which runs at nice 19 (only CPU the
    // guest and the fault thread leave): on a loaded machine 16 MiB can take longer than a few hundred ms.
    const vmm = new ToyVmm({ memMiB: 16, rate: 1000, restoreFrom: socket, runMs: 3000 })
    const report = await vmm.report()
    const r = await serving
    expect(r.code, r.stdout).toBe(0)
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l))
    expect(events.find((e) => e.type === "finished")?.ok).toBe(true)
    expect(report.phases.before.writes).toBeGreaterThan(0)
  })
})

describe.skipIf(unavailable)("bench --restore", () => {
  it("--json has first-write runs with serve's handshake figures, and mode runs with the raw image's (shape only)", async () => {
    const r = await cli("bench", "--restore", "--sizes", "8MiB", "--json")
    expect(r.code, r.stdout).toBe(0)
    const j = JSON.parse(r.stdout)
    expect(j.restore.firstWrite[0]).toMatchObject({ sizeBytes: 8 * 1024 * 1024 })
    expect(typeof j.restore.firstWrite[0].lazyMs).toBe("number")
    // serve's own figures for the toy VMM: setup, then its first faulting page (null when the fill had every page in
    // before the guest touched one: 8 MiB may be; test/lazyRestoreHandshake.e2e.test.ts makes a fault for sure).
    const { handshakeToServingMs: serving, handshakeToFirstPageMs: firstPage } = j.restore.firstWrite[0]
    expect(serving).toBeGreaterThan(0)
    expect(firstPage === null || firstPage > serving, `first page ${firstPage} ms, serving ${serving} ms`).toBe(true)
    expect(j.restore.modes.map((m: { mode: string }) => m.mode)).toEqual(["floor", "copy", "continue", "move", "raw"])
    for (const m of j.restore.modes) expect(m.error).toBeNull()
  })
})
