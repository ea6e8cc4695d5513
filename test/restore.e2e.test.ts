/**
 * Lazy restore end to end: `vmsnap serve` speaks Firecracker's UFFD handshake;
 * the toy VMM (a KVM guest when /dev/kvm works) and a Python Firecracker-style
 * VMM restore from it.
 */
import { Effect, Exit } from "effect"
import { execFile } from "node:child_process"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import {
  Agent, gpa, hva, restoreToRawFile, RestoreServer, takeSnapshot, WpNative
} from "../packages/core/src/index.js"
import { DemoGuest } from "../packages/rig/src/index.js"
import { scratchDir, startVmm, toyVmmSkipReason } from "./toyVmmTests.js"

const here = dirname(fileURLToPath(import.meta.url))
const execFileAsync = promisify(execFile)
const dir = scratchDir("vmsnap-restore-")
const MiB = 1024 * 1024
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const skip = await toyVmmSkipReason("lazy restore tests")

const snapshotPath = join(dir, "guest.vmsnap")
const imagePath = join(dir, "guest.img")
const manyPath = join(dir, "many.vmsnap")
const manyImage = join(dir, "many.img")

describe.skipIf(skip)("lazy restore", () => {
  const socket = join(dir, "serve.sock")
  const finished: Array<{ pid: number; ok: boolean; error?: string; faults: number; pagesByFill: number }> = []
  const log: Array<string> = []
  const server = new RestoreServer(socket, { path: snapshotPath, raw: false }, {
    log: (l) => log.push(l),
    onFinished: (pid, o) => finished.push({ pid, ok: o.ok, error: o.error, faults: o.stats.faults, pagesByFill: o.stats.pagesByFill })
  })

  beforeAll(async () => {
    // A snapshot of a running toy VMM guest, and its raw image for the checks.
    const agentSocket = join(dir, "agent.sock")
    const agent = new Agent(agentSocket)
    await agent.listen()
    const source = startVmm({ memMiB: 64, rate: 0, agent: agentSocket, vm: "source", fillPercent: 75 })
    await source.ready
    await sleep(200)
    const exit = await Effect.runPromiseExit(Effect.provide(agent.snapshot({ vm: "source", path: snapshotPath }), WpNative.layer))
    expect(Exit.isSuccess(exit)).toBe(true)
    await source.stop()
    await agent.close()
    await Effect.runPromise(restoreToRawFile(snapshotPath, imagePath))
    // A snapshot with 32 regions, for handshakes over 1 KiB.
    await Effect.runPromise(
      Effect.provide(
        Effect.scoped(
          Effect.gen(function* () {
            const guest = yield* DemoGuest.make(8 * MiB, "anon")
            guest.fill(0, guest.pages, 5)
            const slice = 256 * 1024
            const regions = Array.from({ length: 32 }, (_, i) => ({
              guestBase: gpa(i * slice), hostBase: hva(guest.region.hostBase + BigInt(i * slice)), size: slice, kind: "anon" as const
            }))
            yield* takeSnapshot({ regions, path: manyPath, poolPages: 64 })
          })
        ),
        WpNative.layer
      )
    )
    await Effect.runPromise(restoreToRawFile(manyPath, manyImage))
    await server.listen()
  })
  afterAll(() => server.close())

  for (const memory of ["anon", "memfd"] as const) {
    it(`a ${memory} guest runs at once and keeps writing; its memory ends as the snapshot plus its own writes`, async () => {
      const vmm = startVmm({ memMiB: 64, rate: 0, anon: memory === "anon", restoreFrom: socket, verifyImage: imagePath, runMs: 1000 })
      const ready = await vmm.ready
      const report = await vmm.report()
      expect(report.restore?.verifyMismatches).toBe(0)
      expect(report.phases.before.writes).toBeGreaterThan(1000)
      expect(report.restore!.firstWriteMs).toBeLessThan(1000)
      const done = finished.find((f) => f.pid === ready.pids[0])
      expect(done?.ok, done?.error).toBe(true)
      expect(done!.faults).toBeGreaterThan(0) // some pages came on demand...
      expect(done!.pagesByFill).toBeGreaterThan(0) // ...the rest streamed in behind
    })
  }

  const peer = (...args: Array<string>) =>
    execFileAsync("python3", [join(here, "fixtures", "firecracker_peer.py"), socket, ...args], { encoding: "utf8" }).then((r) => r.stdout.trim())

  it.each(["page_size", "page_size_kib"])("the Firecracker handshake with %s: memory equals the snapshot", async (field) => {
    expect(await peer("restore", imagePath, String(64 * MiB), field)).toMatch(/^OK /)
  })

  it("a body over 1 KiB (32 regions), and several VMMs at once", async () => {
    const many = new RestoreServer(join(dir, "many.sock"), { path: manyPath, raw: false })
    await many.listen()
    try {
      const run = () =>
        execFileAsync("python3", [join(here, "fixtures", "firecracker_peer.py"), join(dir, "many.sock"), "restore", manyImage, String(256 * 1024), "page_size"], { encoding: "utf8" })
      const results = await Promise.all([run(), run(), run()])
      for (const r of results) {
        const [verdict, bodyBytes] = r.stdout.trim().split(" ")
        expect(verdict).toBe("OK")
        expect(Number(bodyBytes)).toBeGreaterThan(1024)
      }
    } finally {
      await many.close()
    }
  })

  it("a raw image (--raw) serves the same way", async () => {
    const raw = new RestoreServer(join(dir, "raw.sock"), { path: imagePath, raw: true })
    await raw.listen()
    try {
      const out = await execFileAsync("python3", [join(here, "fixtures", "firecracker_peer.py"), join(dir, "raw.sock"), "restore", imagePath, String(64 * MiB), "page_size"], { encoding: "utf8" })
      expect(out.stdout).toMatch(/^OK /)
    } finally {
      await raw.close()
    }
  })

  it("a range the guest discards (balloon) reads zero afterwards, not snapshot data", async () => {
    expect(await peer("restore", imagePath, String(64 * MiB), "page_size", "discard", String(8 * MiB), String(4 * MiB))).toMatch(/^OK /)
  })

  it.each([
    ["malformed JSON", "[{not json", "1", /not valid JSON/],
    ["a missing fd", JSON.stringify([{ base_host_virt_addr: 4096 * 1000, size: 64 * MiB, offset: 0, page_size: 4096 }]), "none", /no file descriptor/],
    ["a region outside the memory image", JSON.stringify([{ base_host_virt_addr: 4096 * 1000, size: 32 * MiB, offset: 48 * MiB, page_size: 4096 }]), "1", /outside the 67108864-byte memory image/],
    ["a page size serve does not install (1 GiB)", JSON.stringify([{ base_host_virt_addr: 4096 * 1000, size: 64 * MiB, offset: 0, page_size: 1 << 30 }]), "1", /page size 1073741824; vmsnap serves 4096 or 2097152-byte pages/],
    ["too many fds", JSON.stringify([{ base_host_virt_addr: 4096 * 1000, size: 64 * MiB, offset: 0, page_size: 4096 }]), "3", /carried 3 fds/]
  ])("%s: a clear error, the connection closed, serve stays up", async (_what, body, fds, pattern) => {
    const answer = JSON.parse(await peer("send", body, fds))
    expect(answer.error).toMatch(pattern)
    expect(await peer("restore", imagePath, String(64 * MiB), "page_size")).toMatch(/^OK /)
  })

  it("a VMM that exits mid-restore is cleaned up; the next one is served", async () => {
    const vmm = startVmm({ memMiB: 64, rate: 0, restoreFrom: socket })
    const ready = await vmm.ready
    vmm.child.kill("SIGKILL")
    await vmm.exited
    await sleep(100)
    const outcome = finished.find((f) => f.pid === ready.pids[0])
    // Either it was all resident already, or it was cleaned up on disconnect.
    expect(outcome === undefined || outcome.ok || /disconnected/.test(outcome.error ?? "")).toBe(true)
    expect(await peer("restore", imagePath, String(64 * MiB), "page_size")).toMatch(/^OK /)
  })
})
