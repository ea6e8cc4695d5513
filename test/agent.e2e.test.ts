/**
 * Agent mode end to end: the toy VMM (a KVM guest when /dev/kvm works) runs
 * in its own process and hands its uffd and guest memory to the agent.
 */
import { Cause, Effect, Exit } from "effect"
import { execFile, spawn } from "node:child_process"
import { promisify } from "node:util"
import { existsSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Agent, listVms, requestSnapshot, restoreToRawFile, WpNative } from "../packages/core/src/index.js"
import { guestWritesOn, scratchDir, startVmm, toyVmmSkipReason } from "./toyVmmTests.js"

const here = dirname(fileURLToPath(import.meta.url))
const bin = join(here, "..", "packages", "cli", "dist", "bin.js")
const dir = scratchDir("vmsnap-agent-")
const skip = await toyVmmSkipReason("agent tests")

const run = <A, E>(effect: Effect.Effect<A, E, WpNative>) => Effect.runPromiseExit(Effect.provide(effect, WpNative.layer))
const execFileAsync = promisify(execFile)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const messageOf = (exit: Exit.Exit<unknown, unknown>) => (Exit.isFailure(exit) ? String((Cause.squash(exit.cause) as Error).message) : "(succeeded)")

/** Restores a snapshot to a raw image and compares it with the VMM's reference copy. */
const equalsReference = async (snapshot: string, reference: string) => {
  const raw = `${snapshot}.raw`
  const exit = await Effect.runPromiseExit(restoreToRawFile(snapshot, raw))
  expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
  const same = readFileSync(raw).equals(readFileSync(reference))
  rmSync(raw)
  return same
}

describe.skipIf(skip)("agent with the toy VMM", () => {
  const socket = join(dir, "agent.sock")
  const log: Array<string> = []
  const agent = new Agent(socket, { log: (l) => log.push(l), outputDir: dir })
  beforeAll(() => agent.listen())
  afterAll(() => agent.close())

  it("a KVM guest keeps writing during the snapshot; the snapshot equals the reference at the cut", async () => {
    const reference = join(dir, "kvm.ref")
    const vmm = startVmm({ memMiB: 128, vcpus: 2, rate: 0, agent: socket, vm: "kvm", reference, fillPercent: 50 })
    const ready = await vmm.ready
    if (ready.kind !== "kvm") console.warn(`SKIP the KVM part: the toy VMM ran on host threads (${vmm.stderr.trim()})`)
    await sleep(200)
    const path = join(dir, "kvm.vmsnap")
    const exit = await run(agent.snapshot({ vm: "kvm", path, poolPages: 1024 }))
    await sleep(100)
    const report = await vmm.stop()
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    if (Exit.isSuccess(exit)) expect(exit.value.engine.faults).toBeGreaterThan(0)
    expect(report.kind).toBe(ready.kind)
    expect(report.phases.during.writes).toBeGreaterThan(0)
    expect(report.snapshots).toBe(1)
    expect(await equalsReference(path, reference)).toBe(true)
  })

  it("two processes write the same memfd during the snapshot; no write of the device leaks in", async () => {
    const reference = join(dir, "dev.ref")
    const vmm = startVmm({ memMiB: 64, vcpus: 1, rate: 0, agent: socket, vm: "dev", reference, device: true })
    const ready = await vmm.ready
    expect(ready.pids).toHaveLength(2)
    await sleep(200)
    expect(agent.list().find((v) => v.id === "dev")?.processes).toBe(2)
    const path = join(dir, "dev.vmsnap")
    const exit = await run(agent.snapshot({ vm: "dev", path, poolPages: 256 }))
    await sleep(100)
    const report = await vmm.stop()
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    const device = JSON.parse(vmm.stderr.split("\n").find((l) => l.startsWith('{"role":"device"')) ?? "{}")
    expect(device.phases?.during?.writes).toBeGreaterThan(0)
    expect(report.phases.during.writes).toBeGreaterThan(0)
    expect(await equalsReference(path, reference)).toBe(true)
  })

  it("anonymous guest memory (no fd), a sequential writer: read with process_vm_readv", async () => {
    const reference = join(dir, "anon.ref")
    const vmm = startVmm({ memMiB: 64, vcpus: 1, rate: 0, pattern: "sequential", anon: true, agent: socket, vm: "anon", reference, fillPercent: 30 })
    await vmm.ready
    await sleep(100)
    const path = join(dir, "anon.vmsnap")
    const exit = await run(agent.snapshot({ vm: "anon", path }))
    await vmm.stop()
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    expect(await equalsReference(path, reference)).toBe(true)
  })

  it.each([["memfd (MADV_REMOVE)", false], ["anonymous memory (MADV_DONTNEED)", true]])(
    "a VMM whose balloon discards %s holds it from prepare to done: the snapshot equals the reference at the cut",
    async (_what, anon) => {
      const reference = join(dir, `balloon-${anon}.ref`)
      const vmm = startVmm({ memMiB: 64, vcpus: 1, rate: 20000, agent: socket, vm: `balloon-${anon}`, reference, fillPercent: 50, balloon: true, anon })
      await vmm.ready
      await sleep(300)
      const path = join(dir, `balloon-${anon}.vmsnap`)
      const exit = await run(agent.snapshot({ vm: `balloon-${anon}`, path, poolPages: 256 }))
      await sleep(200)
      const report = await vmm.stop()
      expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
      expect(report.balloonDiscards, "the balloon discarded pages while no snapshot ran").toBeGreaterThan(100)
      expect(await equalsReference(path, reference)).toBe(true)
    }
  )

  it("a VMM that maps its memfd a second time once thawed and writes through it: refused before commit, no file", async () => {
    const reference = join(dir, "alias-at-thaw.ref")
    const vmm = startVmm({ memMiB: 256, vcpus: 1, rate: 1000, agent: socket, vm: "alias-at-thaw", reference, fillPercent: 100, aliasAtThaw: true })
    await vmm.ready
    const path = join(dir, "alias-at-thaw.vmsnap")
    const exit = await run(agent.snapshot({ vm: "alias-at-thaw", path, poolPages: 256 }))
    await vmm.stop()
    // Before the commit check this was a success whose pages held the writes made through the second mapping.
    expect(messageOf(exit)).toMatch(/vm alias-at-thaw: VMM pid \d+ changed its guest memory during the snapshot \(.*also maps that memory writable at 0x[0-9a-f]+-0x[0-9a-f]+ rw-s/)
    expect(existsSync(path)).toBe(false)
  })

  it("a VMM that forks once thawed, its child writing the guest memfd then exiting: the snapshot fails naming the fork, no file", async () => {
    const vmm = startVmm({ memMiB: 256, vcpus: 1, rate: 1000, agent: socket, vm: "fork-at-thaw", fillPercent: 100, forkAtThaw: true })
    await vmm.ready
    const path = join(dir, "fork-at-thaw.vmsnap")
    const exit = await run(agent.snapshot({ vm: "fork-at-thaw", path, poolPages: 256 }))
    await vmm.stop()
    // Before UFFD_EVENT_FORK was asked for, the child's writes were saved after the cut, silently.
    expect(messageOf(exit)).toMatch(/forked during the snapshot while it maps shared guest memory/)
    expect(existsSync(path)).toBe(false)
  })

  it("guest memory that a process outside the VM also maps (it did not say hello): refused before anything is protected, naming it", async () => {
    const vmm = startVmm({ memMiB: 64, vcpus: 1, rate: 1000, agent: socket, vm: "outsider" })
    const [vmmPid] = (await vmm.ready).pids
    const memfd = readdirSync(`/proc/${vmmPid}/fd`).find((fd) => {
      try {
        return readlinkSync(`/proc/${vmmPid}/fd/${fd}`).startsWith("/memfd:toyvmm-guest")
      } catch {
        return false
      }
    })
    expect(memfd, "the toy VMM's guest memfd").toBeDefined()
    // A process that maps the guest memory writable and shared, as a child the VMM forked would (python3: Debian's, always here).
    const outsider = spawn("python3", ["-c", `import mmap, os, sys, time
fd = os.open("/proc/${vmmPid}/fd/${memfd}", os.O_RDWR)
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
print("mapped", flush=True)
time.sleep(60)`], { stdio: ["ignore", "pipe", "inherit"] })
    try {
      await new Promise<void>((resolve) => outsider.stdout!.on("data", (d) => String(d).includes("mapped") && resolve()))
      const path = join(dir, "outsider.vmsnap")
      const exit = await run(agent.snapshot({ vm: "outsider", path }))
      expect(messageOf(exit)).toMatch(new RegExp(`vm outsider: guest memory of VMM pid ${vmmPid} is also mapped by processes that did not say hello: mapping 0x[0-9a-f]+-0x[0-9a-f]+ rw-s .*toyvmm-guest.* is also mapped by pid ${outsider.pid} \\(python3\\)`))
      expect(existsSync(path)).toBe(false)
    } finally {
      outsider.kill("SIGKILL")
      await vmm.stop()
    }
  })

  it("a VMM killed mid-snapshot: that snapshot fails and is cleaned up, the agent serves the others", async () => {
    const victim = startVmm({ memMiB: 512, vcpus: 2, rate: 0, agent: socket, vm: "victim", fillPercent: 100 })
    const other = startVmm({ memMiB: 32, vcpus: 1, rate: 1000, agent: socket, vm: "other" })
    await Promise.all([victim.ready, other.ready])
    const path = join(dir, "victim.vmsnap")
    // Killed at the first progress report, with pages still to save: mid-snapshot whatever the machine's speed
    // (the native writer saves 512 MiB in well under a second: a fixed delay could miss the snapshot).
    let killed = false
    const exit = await run(
      agent.snapshot({ vm: "victim", path, poolPages: 4, faultAroundPages: 1 }, (saved, total) => {
        if (!killed && saved < total) victim.child.kill("SIGKILL")
        killed = true
      })
    )
    expect(Exit.isFailure(exit)).toBe(true)
    expect(messageOf(exit)).toMatch(/victim.*(disconnected|exited)/)
    expect(existsSync(path)).toBe(false)
    expect(readdirSync(dir).filter((n) => n.includes("victim.vmsnap"))).toEqual([])
    // Its socket's close may be read after the snapshot failed (the engine can see the death first).
    for (let i = 0; i < 500 && agent.list().some((v) => v.id === "victim"); i++) await sleep(10)
    expect(agent.list().map((v) => v.id)).not.toContain("victim")
    const ok = await run(agent.snapshot({ vm: "other", path: join(dir, "other.vmsnap") }))
    expect(Exit.isSuccess(ok), messageOf(ok)).toBe(true)
    await other.stop()
  })

  describe("malformed peers get a clear protocol error and disturb nothing", () => {
    // Async: the agent under test runs in this process's event loop.
    const peer = async (body: string, fds: string) => {
      const { stdout } = await execFileAsync("python3", [join(here, "fixtures", "bad_peer.py"), socket, body, fds], { encoding: "utf8" })
      return JSON.parse(stdout) as { type: string; message: string }
    }
    const hello = (extra: Record<string, unknown> = {}, size = 1 << 20) =>
      JSON.stringify({ type: "hello", version: 1, vm: "bad", role: "vmm", uffd: 0, regions: [{ gpa: "0x0", size, pageSize: 4096, fd: 1, offset: 0, hva: "HVA" }], ...extra })

    it.each([
      ["not JSON", "{this is not json", "none", /not valid JSON/],
      ["an unknown message", JSON.stringify({ type: "frobnicate" }), "none", /unknown message type/],
      ["a hello without fds", hello(), "none", /without file descriptors/],
      ["a wrong protocol version", hello({ version: 7 }), "uffd,memfd:1048576", /unsupported protocol version 7/],
      ["an fd that is not a userfaultfd", hello(), "devnull,memfd:1048576", /not a fresh userfaultfd/],
      ["a userfaultfd already negotiated", hello(), "uffd-used,memfd:1048576", /not a fresh userfaultfd/],
      ["a region larger than its fd", hello({}, 8 << 20), "uffd,memfd:1048576", /holds 1048576 bytes, fewer than/],
      ["a region naming a missing fd", hello(), "uffd", /names fd index 1/],
      ["a device before its VMM", hello({ role: "device", vm: "lonely" }), "uffd,memfd:1048576", /no VMM connected yet/],
      ["a bad vm id", hello({ vm: "no spaces allowed" }), "uffd,memfd:1048576", /"vm" must be/]
    ])("%s", async (_what, body, fds, pattern) => {
      const answer = await peer(body, fds)
      expect(answer.type).toBe("error")
      expect(answer.message).toMatch(pattern)
      // The agent is still up and still serves.
      const vms = await Effect.runPromise(listVms(socket))
      expect(vms.map((v) => v.id)).not.toContain("bad")
    })

    it("the agent still takes snapshots after all of that", async () => {
      const vmm = startVmm({ memMiB: 16, rate: 1000, agent: socket, vm: "after" })
      await vmm.ready
      const exit = await Effect.runPromiseExit(requestSnapshot(socket, { vm: "after", path: join(dir, "after.vmsnap") }))
      await vmm.stop()
      expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    })
  })
})

describe.skipIf(skip || !existsSync(bin))("the agent process killed mid-snapshot", () => {
  it("the VMM's vCPUs are not left blocked", async () => {
    const socket = join(dir, "doomed.sock")
    const agentProcess = spawn(process.execPath, [bin, "agent", "--listen", socket, "--output-dir", dir], { stdio: ["ignore", "ignore", "pipe"] })
    while (!existsSync(socket)) await sleep(10)
    const vmm = startVmm({ memMiB: 512, vcpus: 2, rate: 0, agent: socket, vm: "doomed", fillPercent: 100, progressMs: 20 })
    const ready = await vmm.ready
    // Killed at the agent's first progress message with pages still to save: mid-snapshot whatever the machine's speed.
    let killed = false
    const client = Effect.runPromiseExit(
      requestSnapshot(socket, { vm: "doomed", path: join(dir, "doomed.vmsnap"), poolPages: 4, faultAroundPages: 1 }, (saved, total) => {
        if (!killed && saved < total) agentProcess.kill("SIGKILL")
        killed = true
      })
    )
    expect(Exit.isFailure(await client)).toBe(true)
    // The agent held the only reference to the uffd: its death removed all protection.
    await sleep(300)
    const writes = await guestWritesOn(vmm, ready.pids[0]!)
    expect(vmm.stderr).toMatch(/agent connection closed; guest keeps running/)
    const report = await vmm.stop()
    expect(writes, `guest writes stalled after the agent died (${report.kind})`).toBeGreaterThan(1000)
  })
})

describe.skipIf(skip || !existsSync(bin))("snapshot -o - streams to standard output", () => {
  it("a pipe gets the whole snapshot, which equals the reference at the cut", async () => {
    const socket = join(dir, "stream.sock")
    const cli = spawn(process.execPath, [bin, "snapshot", "--listen", socket, "-o", "-"], { stdio: ["ignore", "pipe", "pipe"] })
    const chunks: Array<Buffer> = []
    let stderr = ""
    cli.stdout!.on("data", (c: Buffer) => chunks.push(c))
    cli.stderr!.on("data", (c: Buffer) => (stderr += c.toString()))
    const exited = new Promise<number | null>((resolve) => cli.on("exit", resolve))
    while (!existsSync(socket)) await sleep(10)
    const reference = join(dir, "stream.ref")
    const vmm = startVmm({ memMiB: 32, vcpus: 1, rate: 20000, agent: socket, vm: "stream", reference, fillPercent: 50 })
    expect(await exited, stderr).toBe(0)
    await vmm.stop()
    expect(stderr).toMatch(/saved to standard output/)
    const path = join(dir, "stream.vmsnap")
    writeFileSync(path, Buffer.concat(chunks))
    expect(await equalsReference(path, reference)).toBe(true)
  })

  /**
   * `snapshot --listen NAME.sock -o -` (1 MiB pool) with a 64 MiB toy guest writing flat out, whose
   * standard output `reader` treats as it likes (not reading it at all by default).
   */
  const streamToReader = async (name: string, extra: Array<string>, reader?: (out: NodeJS.ReadableStream) => void) => {
    const socket = join(dir, `${name}.sock`)
    const cli = spawn(process.execPath, [bin, "snapshot", "--listen", socket, "-o", "-", "--buffer", "1MiB", ...extra], { stdio: ["ignore", "pipe", "pipe"] })
    const out = { cli, stderr: "", exited: new Promise<string>((resolve) => cli.on("exit", (code, signal) => resolve(`${code ?? signal}`))) }
    cli.stderr!.on("data", (c: Buffer) => (out.stderr += c.toString()))
    reader?.(cli.stdout!)
    while (!existsSync(socket)) await sleep(10)
    const vmm = startVmm({ memMiB: 64, vcpus: 1, rate: 0, agent: socket, vm: name, fillPercent: 100, progressMs: 20 })
    const pid = (await vmm.ready).pids[0]!
    /** vmsnap's exit (code or signal), or a line saying it still runs after `ms`. */
    const exit = (ms: number) => Promise.race([out.exited, sleep(ms).then(() => `still running ${ms / 1000} s later`)])
    /** The guest writes on once vmsnap is gone. */
    const guestRunsOn = async (after: string) => {
      const writes = await guestWritesOn(vmm, pid)
      const report = await vmm.stop()
      expect(writes, `guest writes stalled after ${after} (${report.kind})`).toBeGreaterThan(1000)
    }
    return Object.assign(out, { exit, guestRunsOn }) // out.stderr keeps growing
  }

  it("a reader that stops reading, then SIGTERM: vmsnap exits, and the guest it left protected writes on", async () => {
    // stdout is never read: the pipe fills and the native writer blocks in its write (the guest then waits too).
    const run = await streamToReader("stuck", [])
    await sleep(1500)
    expect(run.cli.exitCode, run.stderr).toBe(null) // stuck in its write, as a stalled reader makes it
    run.cli.kill("SIGTERM")
    expect(await run.exit(20_000), run.stderr).toMatch(/^(143|SIGTERM|1|130)$/)
    await run.guestRunsOn("vmsnap exited")
  })

  it("a reader that closes the pipe early: the snapshot fails naming a broken pipe, and the guest writes on (break7 L1)", async () => {
    const run = await streamToReader("epipe", [], (out) => out.once("data", () => (out as unknown as { destroy(): void }).destroy())) // the first bytes, then the reader is gone
    expect(await run.exit(30_000), run.stderr).toBe("1")
    expect(run.stderr).toMatch(/standard output: the reader of the output closed it \(broken pipe\)/)
    await run.guestRunsOn("the broken pipe")
  })

  it("a reader that stops reading and nobody stops vmsnap: after --stall-timeout the snapshot fails, naming the stall, and the guest writes on (break7 H2)", async () => {
    // Before: the guest waited on its write faults for as long as the reader did not read.
    const run = await streamToReader("stall", ["--stall-timeout", "1"])
    expect(await run.exit(30_000), run.stderr).toBe("1")
    expect(run.stderr).toMatch(/the output took nothing for 1\.0 s/)
    await run.guestRunsOn("the snapshot gave up")
  })
})

