/**
 * The vmsnap agent: a Unix-socket server that VMMs (and their device
 * processes) hand their guest memory to, and that takes live snapshots of
 * them on request. Serves several VMs; a misbehaving peer gets a protocol
 * error and is disconnected, and nothing else is disturbed.
 *
 * Per VM: one VMM connection and any number of device connections, each with
 * its own userfaultfd (negotiated here) and mapping. A snapshot protects the
 * memory in every process and reads pages through the agent's own read-only
 * mapping of the VMM's memory fds (process_vm_readv for anonymous memory).
 * The freeze goes to devices first and to the VMM last, so a VMM that copies
 * a reference at its freeze sees every writer stopped.
 */
import { Deferred, Effect } from "effect"
import { fstatSync, readFileSync } from "node:fs"
import type { Socket } from "node:net"
import { describeError, NativeError, ProtocolError, type VmsnapError } from "./Errors.js"
import { gpa, hva, type MemoryRegion, PAGE_SIZE } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import { loadWp } from "./internal/ffi.js"
import { closeFds, receiveFirstMessage, socketFd } from "./internal/firstMessage.js"
import { listenUnix, type UnixServer } from "./internal/unixServer.js"
import {
  type ClientRequest, encodeMessage, type Hello, LineReader, MAX_MESSAGE_BYTES, parseClientRequest, parseHello,
  parseMessage, type SnapshotRequest
} from "./AgentProtocol.js"
import { type SnapshotResult, takeSnapshot } from "./SnapshotSession.js"
import { type RemoteProcess, WpNative } from "./WpNative.js"

const HELLO_TIMEOUT_MS = 5000
/** A VMM may copy a reference of all its memory before answering a freeze. */
const FREEZE_TIMEOUT_MS = 30000

/** One VMM or device process connected to the agent. */
class Peer {
  readonly lines = new LineReader()
  private waiters: Array<{ type: string; resolve: (m: Record<string, unknown>) => void; reject: (e: Error) => void }> = []
  closed = false
  readonly lost: Promise<void>
  private markLost!: () => void

  constructor(
    readonly socket: Socket,
    readonly hello: Hello,
    readonly fds: ReadonlyArray<number>,
    readonly pid: number
  ) {
    this.lost = new Promise((resolve) => (this.markLost = resolve))
  }

  get uffd() {
    return this.fds[this.hello.uffd]!
  }

  send(m: Record<string, unknown>) {
    if (!this.closed) this.socket.write(encodeMessage(m))
  }

  /** Sends `m` and waits for a reply of type `reply` (or an error reply). */
  request(m: Record<string, unknown>, reply: string, timeoutMs: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.hello.role} pid ${this.pid} did not answer "${m.type}" within ${timeoutMs} ms`)), timeoutMs)
      this.waiters.push({
        type: reply,
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e))
      })
      this.send(m)
    })
  }

  receive(m: Record<string, unknown>) {
    const w = this.waiters.shift()
    if (!w) return
    if (m.type === w.type) w.resolve(m)
    else w.reject(new Error(`${this.hello.role} pid ${this.pid} answered ${JSON.stringify(m)}`))
  }

  close() {
    if (this.closed) return
    this.closed = true
    for (const w of this.waiters) w.reject(new Error(`${this.hello.role} pid ${this.pid} disconnected`))
    this.waiters = []
    closeFds(this.fds)
    this.socket.destroy()
    this.markLost()
  }
}

interface Vm {
  readonly id: string
  vmm: Peer | undefined
  readonly devices: Set<Peer>
  busy: boolean
}

export interface AgentEvents {
  readonly log?: (line: string) => void
}

export interface VmInfo {
  readonly id: string
  readonly processes: number
  readonly sizeBytes: number
  readonly busy: boolean
}

/** Still running: neither gone nor a zombie waiting for its parent. */
const isAlive = (pid: number): boolean => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z"
  } catch {
    return false
  }
}

/** A hello line (newline-terminated) and the fds that came with it. */
const receiveFirst = async (fd: number) => {
  const first = await receiveFirstMessage(fd, (b) => { const nl = b.indexOf(0x0a); return nl < 0 ? undefined : nl + 1 }, { maxBytes: MAX_MESSAGE_BYTES, timeoutMs: HELLO_TIMEOUT_MS })
  return first && { line: first.message.toString("utf8").trimEnd(), rest: first.rest, fds: first.fds }
}

export class Agent {
  private readonly vms = new Map<string, Vm>()
  private server: UnixServer | undefined
  private readonly arrivals = new Set<() => void>()

  constructor(readonly socketPath: string, private readonly events: AgentEvents = {}) {}

  private log(line: string) {
    this.events.log?.(line)
  }

  /** Listens on the socket path (replacing a stale socket file). */
  async listen(): Promise<void> {
    this.server = await listenUnix(this.socketPath, (socket) => void this.accept(socket))
  }

  async close(): Promise<void> {
    for (const vm of this.vms.values()) {
      vm.vmm?.close()
      vm.devices.forEach((d) => d.close())
    }
    this.vms.clear()
    await this.server?.close()
    this.server = undefined
  }

  list(): Array<VmInfo> {
    return [...this.vms.values()].map((vm) => ({
      id: vm.id,
      processes: (vm.vmm ? 1 : 0) + vm.devices.size,
      sizeBytes: vm.vmm?.hello.regions.reduce((s, r) => s + r.size, 0) ?? 0,
      busy: vm.busy
    }))
  }

  /** Resolves once `vm` (any VM if undefined) has a VMM and at least `processes` processes. */
  waitForVm(vm: string | undefined, processes: number, signal?: AbortSignal): Promise<string> {
    return new Promise((resolve, reject) => {
      const check = () => {
        for (const v of this.vms.values()) {
          if ((vm === undefined || v.id === vm) && v.vmm && 1 + v.devices.size >= processes) {
            this.arrivals.delete(check)
            resolve(v.id)
            return
          }
        }
      }
      signal?.addEventListener("abort", () => {
        this.arrivals.delete(check)
        reject(new Error("aborted"))
      })
      this.arrivals.add(check)
      check()
    })
  }

  private async accept(socket: Socket) {
    const fd = socketFd(socket)
    if (fd === undefined) return void socket.destroy()
    let first: Awaited<ReturnType<typeof receiveFirst>>
    try {
      first = await receiveFirst(fd)
    } catch (e) {
      return this.refuse(socket, e, [])
    }
    if (!first) return void socket.destroy()
    try {
      const m = parseMessage(first.line)
      if (m.type === "hello") return this.admit(socket, parseHello(m, first.fds.length), first.fds, first.rest)
      closeFds(first.fds)
      first.fds.length = 0
      return this.serveClient(socket, parseClientRequest(m))
    } catch (e) {
      return this.refuse(socket, e, first.fds)
    }
  }

  private refuse(socket: Socket, e: unknown, fds: ReadonlyArray<number>) {
    const message = describeError(e)
    this.log(`refused a connection: ${message}`)
    closeFds(fds)
    socket.end(encodeMessage({ type: "error", message }))
  }

  /** Validates a hello against the VM it joins and the fds it carries. */
  private admit(socket: Socket, hello: Hello, fds: Array<number>, rest: Buffer) {
    const lib = loadWp()
    for (const r of hello.regions) {
      if (r.fd === null) continue
      const size = fstatSync(fds[r.fd]!).size
      if (size < r.offset + r.size)
        throw new ProtocolError({ reason: `region at gpa 0x${r.gpa.toString(16)}: its fd holds ${size} bytes, fewer than offset ${r.offset} + size ${r.size}` })
    }
    const vm = this.vms.get(hello.vm) ?? { id: hello.vm, vmm: undefined, devices: new Set<Peer>(), busy: false }
    if (hello.role === "vmm" && vm.vmm) throw new ProtocolError({ reason: `vm "${hello.vm}" already has a VMM connected` })
    if (hello.role === "device") {
      if (!vm.vmm) throw new ProtocolError({ reason: `vm "${hello.vm}" has no VMM connected yet: connect the VMM first` })
      for (const r of hello.regions) {
        const match = vm.vmm.hello.regions.find((v) => v.gpa === r.gpa && v.size === r.size)
        if (!match) throw new ProtocolError({ reason: `device region at gpa 0x${r.gpa.toString(16)} (${r.size} bytes) matches no region of the VMM` })
      }
    }
    if (vm.busy) throw new ProtocolError({ reason: `vm "${hello.vm}" is being snapshotted; connect when it is done` })
    const rc: number = lib.wp_uffd_negotiate([fds[hello.uffd]!])
    if (rc < 0)
      throw new ProtocolError({
        reason: rc === -22 || rc === -25 ? `fd ${hello.uffd} is not a fresh userfaultfd (not a uffd, or UFFDIO_API was already issued on it)` : `userfaultfd: ${errnoReason("userfaultfd", -rc)}`
      })
    const pid: number = lib.wp_transport_peer_pid([(socket as unknown as { _handle: { fd: number } })._handle.fd])
    const peer = new Peer(socket, hello, fds, pid)
    if (hello.role === "vmm") vm.vmm = peer
    else vm.devices.add(peer)
    this.vms.set(vm.id, vm)
    socket.on("data", (chunk) => this.onLines(peer, chunk))
    socket.on("close", () => this.drop(vm, peer))
    socket.on("error", () => this.drop(vm, peer))
    socket.resume()
    if (rest.length > 0) this.onLines(peer, rest)
    peer.send({ type: "welcome", version: 1, vm: vm.id, role: hello.role })
    this.log(`vm ${vm.id}: ${hello.role} pid ${pid} connected (${hello.regions.length} regions)`)
    this.arrivals.forEach((check) => check())
  }

  private onLines(peer: Peer, chunk: Buffer) {
    try {
      for (const line of peer.lines.push(chunk)) peer.receive(parseMessage(line))
    } catch (e) {
      peer.send({ type: "error", message: describeError(e) })
      peer.close()
    }
  }

  private drop(vm: Vm, peer: Peer) {
    if (peer.closed && vm.vmm !== peer && !vm.devices.has(peer)) return
    peer.close()
    if (vm.vmm === peer) vm.vmm = undefined
    vm.devices.delete(peer)
    if (!vm.vmm && vm.devices.size === 0 && !vm.busy) this.vms.delete(vm.id)
    this.log(`vm ${vm.id}: ${peer.hello.role} pid ${peer.pid} disconnected`)
  }

  private async serveClient(socket: Socket, request: ClientRequest) {
    socket.resume()
    socket.on("error", () => undefined)
    if (request.type === "list") return void socket.end(encodeMessage({ type: "vms", vms: this.list() }))
    let last = 0
    const exit = await Effect.runPromiseExit(
      Effect.provide(
        this.snapshot(request, (saved, total) => {
          const now = Date.now()
          if (now - last < 200 && saved < total) return
          last = now
          socket.write(encodeMessage({ type: "progress", savedBytes: saved, totalBytes: total }))
        }),
        WpNative.layer
      )
    )
    if (exit._tag === "Success") socket.end(encodeMessage({ type: "result", ...exit.value, engine: undefined, faults: exit.value.engine.faults }))
    else {
      const { Cause } = await import("effect")
      const error = Cause.squash(exit.cause)
      const tag = typeof error === "object" && error !== null && "_tag" in error ? String((error as { _tag: unknown })._tag) : "Error"
      socket.end(encodeMessage({ type: "error", tag, message: describeError(error) }))
    }
  }

  /**
   * Takes a live snapshot of a connected VM. Fails if a process of the VM
   * disconnects (e.g. is killed) during it; the others are unprotected.
   */
  snapshot(
    request: Omit<SnapshotRequest, "type">,
    onProgress?: (savedBytes: number, totalBytes: number) => void
  ): Effect.Effect<SnapshotResult, VmsnapError, WpNative> {
    const agent = this
    return Effect.gen(function* () {
      const vm = agent.vms.get(request.vm)
      if (!vm?.vmm) return yield* Effect.fail(new ProtocolError({ reason: `no VM "${request.vm}" is connected (connected: ${agent.list().map((v) => v.id).join(", ") || "none"})` }))
      if (vm.busy) return yield* Effect.fail(new ProtocolError({ reason: `vm "${request.vm}" is already being snapshotted` }))
      const vmm = vm.vmm
      const peers = [vmm, ...vm.devices]
      vm.busy = true
      yield* Effect.addFinalizer(() => Effect.sync(() => {
        vm.busy = false
        if (!vm.vmm && vm.devices.size === 0) agent.vms.delete(vm.id)
      }))
      const regions = [...vmm.hello.regions].sort((a, b) => (a.gpa < b.gpa ? -1 : 1))
      // Read-only views of fd-backed regions, unmapped when the snapshot ends.
      const views = yield* Effect.acquireRelease(
        Effect.try({
          try: () =>
            regions.map((r) => {
              if (r.fd === null) return { base: 0n, size: r.size }
              const err = new Int32Array(1)
              const base: bigint = loadWp().wp_transport_map_fd([vmm.fds[r.fd]!, BigInt(r.offset), BigInt(r.size), Buffer.from(err.buffer)])
              if (base === 0n) throw new NativeError({ op: "map guest memory", errno: -err[0]!, reason: errnoReason("mmap", -err[0]!) })
              return { base, size: r.size }
            }),
          catch: (e) => e as NativeError
        }),
        (vs) => Effect.sync(() => vs.forEach((v) => v.base !== 0n && loadWp().wp_transport_unmap([v.base, BigInt(v.size)])))
      )
      const memory: Array<MemoryRegion> = regions.map((r, i) => ({
        guestBase: gpa(r.gpa),
        hostBase: hva(views[i]!.base),
        size: r.size,
        kind: r.fd === null ? "anon" : "memfd"
      }))
      const processes: Array<RemoteProcess> = peers.map((p) => ({
        uffd: p.uffd,
        pid: p.pid,
        mappings: p.hello.regions.map((r) => ({ region: regions.findIndex((v) => v.gpa === r.gpa), hva: r.hva }))
      }))
      // Devices first, the VMM last: its reference copy then sees every writer stopped.
      const freezeOrder = [...vm.devices, vmm]
      const ask = (p: Peer, type: string, reply: string) =>
        Effect.tryPromise({
          try: () => p.request({ type }, reply, FREEZE_TIMEOUT_MS),
          catch: (e) => new ProtocolError({ reason: e instanceof Error ? e.message : String(e) })
        })
      const freeze = Effect.forEach(freezeOrder, (p) => ask(p, "freeze", "frozen"), { discard: true })
      const thaw = Effect.sync(() => peers.forEach((p) => p.send({ type: "thaw" })))
      const gone = (p: Peer) =>
        new NativeError({ op: "snapshot", errno: 3, reason: `vm ${vm.id}: ${p.hello.role} pid ${p.pid} disconnected during the snapshot` })
      // A process that disconnects ends the snapshot at once (its uffd may be unusable).
      const lost = yield* Deferred.make<never, NativeError>()
      for (const p of peers) void p.lost.then(() => Effect.runFork(Deferred.fail(lost, gone(p))))
      agent.log(`vm ${vm.id}: snapshot to ${request.path} started`)
      let lastProgress = 0
      const result = yield* Effect.raceFirst(
        takeSnapshot({
          regions: memory,
          processes,
          path: request.path,
          poolPages: request.poolPages,
          faultAroundPages: request.faultAroundPages,
          compress: request.compression !== "none",
          steer: request.steer,
          freeze,
          thaw,
          onProgress: (saved, total) => {
            onProgress?.(saved * PAGE_SIZE, total * PAGE_SIZE)
            const now = Date.now()
            if (now - lastProgress < 200) return
            lastProgress = now
            peers.forEach((p) => p.send({ type: "progress", savedBytes: saved * PAGE_SIZE, totalBytes: total * PAGE_SIZE }))
          }
        }),
        Deferred.await(lost)
      ).pipe(
        // A process that went away explains whatever else failed.
        Effect.mapError((e) => {
          const dead = peers.find((p) => p.closed || !isAlive(p.pid))
          return dead ? gone(dead) : e
        }),
        Effect.tapError((e) => Effect.sync(() => {
          agent.log(`vm ${vm.id}: snapshot failed: ${e.message}`)
          peers.forEach((p) => p.send({ type: "failed", message: e.message }))
        }))
      )
      agent.log(`vm ${vm.id}: snapshot done: ${result.path}`)
      peers.forEach((p) => p.send({ type: "done", path: result.path, pauseMs: result.pauseMs, durationMs: result.durationMs }))
      return result
    }).pipe(Effect.scoped)
  }
}

/** An agent without events in a scope, for benchmarks: listening until the scope closes. */
export const quietAgentScoped = (socketPath: string) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const agent = new Agent(socketPath)
      await agent.listen()
      return agent
    }),
    (agent) => Effect.promise(() => agent.close())
  )

/** The agent as a scoped resource: listening until the scope closes. */
export const agentScoped = (socketPath: string, events?: AgentEvents) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: async () => {
        const agent = new Agent(socketPath, events)
        await agent.listen()
        return agent
      },
      catch: (e) => new ProtocolError({ reason: `cannot listen on ${socketPath}: ${e instanceof Error ? e.message : String(e)}` })
    }),
    (agent) => Effect.promise(() => agent.close())
  )
