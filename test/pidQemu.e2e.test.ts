/**
 * `snapshot --pid` of a real, unmodified QEMU (Debian's qemu-system-x86,
 * installed by test/debianPackages.ts when missing) running the bare-metal
 * guest of packages/rig/qemu-guest (a copy of the shared fixture) on KVM: the guest RAM mapping,
 * chosen by size, equals QEMU's memory at the cut (read while every QEMU
 * thread, vCPU included, is frozen), and the guest keeps running and
 * reporting its writes afterwards.
 */
import { Effect, Exit, Cause } from "effect"
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { existsSync } from "node:fs"
import { connect, type Socket } from "node:net"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, describe, expect, it } from "vitest"
import { snapshotPid, WpNative } from "../packages/core/src/index.js"
import { ensureDebianPackage } from "./debianPackages.js"
import { differenceFromReference, leftovers, referenceAtCut } from "./pidTests.js"
import { scratchDir } from "./toyVmmTests.js"

const here = dirname(fileURLToPath(import.meta.url))
const guestDir = join(here, "..", "packages", "rig", "qemu-guest")
const dir = scratchDir("vmsnap-pid-qemu-")
const MIB = 1024 * 1024
const RAM_MIB = 512
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const skipReason = (): string | undefined => {
  if (process.arch !== "x64") return "syscall injection into another process is implemented for x86-64 only"
  if (process.getuid?.() !== 0) return "needs root: ptrace of QEMU and userfaultfd inside it"
  if (!existsSync("/dev/kvm")) return "no /dev/kvm"
  if (!existsSync(join(guestDir, "build.sh"))) return `the QEMU guest fixture is not at ${guestDir}`
  const build = spawnSync("bash", [join(guestDir, "build.sh"), join(dir, "guest.elf")], { encoding: "utf8" })
  if (build.status !== 0) return `cannot build the QEMU guest: ${build.stderr.trim()}`
  return ensureDebianPackage("qemu-system-x86", "qemu-system-x86_64")
}
const skip = skipReason()
if (skip) console.warn(`SKIP pid snapshot of QEMU: ${skip}`)

/** QEMU with the bare-metal guest; its serial console read line by line. */
class Qemu {
  readonly child: ChildProcess
  private console = ""
  stderr = ""
  private serial: Socket | undefined

  constructor(readonly guestMiB: number) {
    const ser = join(dir, "ser.sock")
    this.child = spawn("qemu-system-x86_64", [
      "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", String(RAM_MIB), "-smp", "1", "-nodefaults",
      "-display", "none", "-monitor", "none", "-no-reboot", "-kernel", join(dir, "guest.elf"),
      "-append", `wl.mib=${guestMiB} wl.secs=600 wl.mode=rand`,
      "-chardev", `socket,id=ser0,path=${ser},server=on,wait=on`, "-serial", "chardev:ser0",
      "-device", "isa-debug-exit,iobase=0xf4,iosize=1"
    ], { stdio: ["ignore", "ignore", "pipe"] })
    this.child.stderr!.on("data", (d) => (this.stderr += d))
  }

  get pid() {
    return this.child.pid!
  }

  async start() {
    const ser = join(dir, "ser.sock")
    for (let i = 0; i < 500 && !this.serial; i++) {
      if (existsSync(ser)) {
        this.serial = await new Promise<Socket | undefined>((resolve) => {
          const s = connect(ser, () => resolve(s))
          s.on("error", () => resolve(undefined))
        })
      }
      if (!this.serial) await sleep(20)
    }
    if (!this.serial) throw new Error(`QEMU's serial socket never came up: ${this.stderr}`)
    this.serial.on("data", (d) => (this.console += d.toString("latin1")))
    await this.line(/^READY$/m, 60_000)
  }

  /** The next console line matching re (consumed with everything before it). */
  async line(re: RegExp, timeoutMs = 30_000): Promise<RegExpExecArray> {
    for (let waited = 0; waited < timeoutMs; waited += 20) {
      const m = re.exec(this.console)
      if (m) {
        this.console = this.console.slice(m.index + m[0].length)
        return m
      }
      if (this.child.exitCode !== null) throw new Error(`QEMU exited: ${this.stderr}`)
      await sleep(20)
    }
    throw new Error(`the guest did not print ${re} within ${timeoutMs} ms: ${this.stderr}`)
  }

  /** Accesses the guest made in its next full window (W line). */
  async window(): Promise<number> {
    return Number((await this.line(/^W i=\d+ .*?\bn=(\d+)/m))[1])
  }

  kill() {
    this.serial?.destroy()
    if (this.child.exitCode === null) this.child.kill("SIGKILL")
  }
}

describe.skipIf(skip)("snapshot --pid of QEMU", () => {
  const qemu = skip ? undefined : new Qemu(192)
  afterAll(() => qemu?.kill())

  it("the guest RAM, chosen by size, equals QEMU's memory at the cut; the guest runs on", async () => {
    await qemu!.start()
    expect(await qemu!.window()).toBeGreaterThan(0)
    const path = join(dir, "qemu.vmsnap")
    const reference = join(dir, "qemu.ref")
    const exit = await Effect.runPromiseExit(Effect.provide(
      snapshotPid({ pid: qemu!.pid, path, mappings: [{ _tag: "MinSize", bytes: RAM_MIB * MIB }], atCut: referenceAtCut(qemu!.pid, reference) }),
      WpNative.layer
    ))
    expect(Exit.isSuccess(exit), Exit.isFailure(exit) ? String(Cause.squash(exit.cause)) : "").toBe(true)
    if (!Exit.isSuccess(exit)) return
    const r = exit.value
    console.log(`QEMU by pid: ${r.mappings.length} mapping(s) ${r.mappings.map((m) => `${m.size / MIB} MiB ${m.kind}`).join(", ")}, ${r.threads} threads frozen, pause ${r.pauseMs.toFixed(2)} ms, ${r.engine.faults} faults`)
    expect(r.mappings.length).toBe(1)
    expect(r.engine.faults, "the guest never wrote during the snapshot").toBeGreaterThan(0)
    expect(await differenceFromReference(path, reference)).toBe(-1)
    expect(leftovers(qemu!.pid)).toEqual([])
    await qemu!.window() // a window that may include the snapshot
    expect(await qemu!.window(), "the guest stopped writing after the snapshot").toBeGreaterThan(0)
  })
})
