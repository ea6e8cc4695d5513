/**
 * The vmsnap agent: a Unix-socket server that VMMs (and their device
 * processes) hand their guest memory to, and that takes live snapshots of
 * them on request. Serves several VMs; a misbehaving peer gets a protocol
 * error and is disconnected, and nothing else is disturbed.
 *
 * Who may do what (docs/security.md): anyone who can open the socket (0600
 * unless `socketMode`/`socketGroup` widen it) may hand over its own memory
 * as a VMM, or join a VM of its own uid as a device; only the agent's uid,
 * `allowUids` and members of `allowGroups` may ask for a snapshot or the
 * list, and requested files are written only under `outputDir`, 0600 (or
 * `fileMode`), owned by the uid that asked.
 *
 * Modules: AgentPeer (one connected process), AgentRegistry and
 * AgentAdmission (VMs and who joins them), AgentSnapshot (one snapshot),
 * internal/unixServer (socket path, credentials, bounded handshakes).
 */
import { Cause, Effect, Exit, Fiber } from "effect"
import type { Socket } from "node:net"
import { type ClientRequest, encodeMessage, LineReader, MAX_MESSAGE_BYTES, parseClientRequest, parseHello, parseMessage, type SnapshotRequest } from "./AgentProtocol.js"
import { type Vm, VmRegistry, type VmInfo } from "./AgentRegistry.js"
import { type AgentSnapshotLimits, snapshotVm } from "./AgentSnapshot.js"
import type { Peer } from "./AgentPeer.js"
import { removeStaleTempFiles } from "./AtomicFile.js"
import { describeError, ioError, ProtocolError, SnapshotIoError, type VmsnapError } from "./Errors.js"
import { defaultMaxGuestBytes } from "./GuestBound.js"
import { closeFds, type FirstMessage } from "./internal/firstMessage.js"
import { endAndClose, type HandshakeLimits, listenUnix, type PeerCred, type UnixServer } from "./internal/unixServer.js"
import { OutputDir } from "./OutputDir.js"
import type { SnapshotResult } from "./SnapshotSession.js"
import { WpNative } from "./WpNative.js"

export type { VmInfo }

export interface AgentOptions {
  readonly log?: (line: string) => void
  /** Uids besides the agent's own that may ask for snapshots and the list. */
  readonly allowUids?: ReadonlyArray<number>
  /** Groups whose members (primary or supplementary) may ask. */
  readonly allowGroups?: ReadonlyArray<number>
  /** Mode of the socket file. Default 0o600. */
  readonly socketMode?: number
  /** Group of the socket file. */
  readonly socketGroup?: number
  /** The only directory requested snapshots are written under; without it, requests for snapshots are refused. */
  readonly outputDir?: string
  /** Mode of files written on request. Default 0o600. */
  readonly fileMode?: number
  readonly limits?: HandshakeLimits & {
    /** Connected VMM and device processes per uid. Default 64. */
    readonly peersPerUid?: number
    /** Time from accept to a complete first message. Default 5000 ms. */
    readonly handshakeTimeoutMs?: number
    readonly freezeTimeoutMs?: number
    readonly prepareTimeoutMs?: number
    /** A snapshot whose output takes nothing for this long fails, releasing the guest. Default 10 000 ms (SnapshotWriter.ts STALL_MS). */
    readonly stallTimeoutMs?: number
    /** The most guest memory one VM may declare at hello and have protected (GuestBound.ts). Default this machine's memory. */
    readonly maxGuestBytes?: number
  }
}

/** @deprecated the options are AgentOptions; kept for callers that pass only `log`. */
export type AgentEvents = AgentOptions

const DEFAULT_PEERS_PER_UID = 64
const HELLO_TIMEOUT_MS = 5000
/** A VMM may copy a reference of all its memory before answering a freeze. */
const FREEZE_TIMEOUT_MS = 30000
const PREPARE_TIMEOUT_MS = 30000

const endOfLine = (b: Buffer) => {
  const nl = b.indexOf(0x0a)
  return nl < 0 ? undefined : nl + 1
}

/** An error's `_tag` (NativeError, InvalidInput, ...), sent with an error answer so a requester can tell the kind. */
const errorTag = (error: unknown): string | undefined =>
  typeof error === "object" && error !== null && "_tag" in error ? String((error as { _tag: unknown })._tag) : undefined

export class Agent {
  private readonly registry: VmRegistry
  private readonly snapshotLimits: AgentSnapshotLimits
  private server: UnixServer | undefined
  private output: OutputDir | undefined

  constructor(readonly socketPath: string, private readonly options: AgentOptions = {}) {
    this.registry = new VmRegistry(options.limits?.peersPerUid ?? DEFAULT_PEERS_PER_UID, options.limits?.maxGuestBytes ?? defaultMaxGuestBytes())
    this.snapshotLimits = { freezeMs: options.limits?.freezeTimeoutMs ?? FREEZE_TIMEOUT_MS, prepareMs: options.limits?.prepareTimeoutMs ?? PREPARE_TIMEOUT_MS, stallMs: options.limits?.stallTimeoutMs, maxGuestBytes: options.limits?.maxGuestBytes }
  }

  private log(line: string) {
    this.options.log?.(line)
  }

  /** Opens the output directory (removing temporary files a killed agent left there) and listens on the socket path. */
  async listen(): Promise<void> {
    if (this.options.outputDir !== undefined) {
      try {
        this.output = new OutputDir(this.options.outputDir)
      } catch (e) {
        throw ioError(this.options.outputDir, "open the output directory", e)
      }
      // Its own files and those it wrote for the uids and groups it allows (it fchowns them to the requester).
      const allowUids = this.options.allowUids ?? []
      const allowGroups = this.options.allowGroups ?? []
      const stale = removeStaleTempFiles(this.output.fd, {
        owned: (st) => st.uid === process.geteuid?.() || allowUids.includes(st.uid) || allowGroups.includes(st.gid)
      })
      if (stale.length > 0) this.log(`removed ${stale.length} temporary file(s) a stopped agent left in ${this.output.path}: ${stale.join(", ")}`)
    }
    try {
      this.server = await listenUnix(this.socketPath, {
        mode: this.options.socketMode,
        group: this.options.socketGroup,
        limits: this.options.limits,
        firstMessage: { complete: endOfLine, maxBytes: MAX_MESSAGE_BYTES, timeoutMs: this.options.limits?.handshakeTimeoutMs ?? HELLO_TIMEOUT_MS },
        refuse: (cred, reason) => this.refusal(cred, reason)
      }, (socket, cred, first) => this.accept(socket, cred, first))
    } catch (e) {
      this.output?.close()
      this.output = undefined
      throw e
    }
  }

  async close(): Promise<void> {
    this.registry.closeAll()
    await this.server?.close()
    this.server = undefined
    this.output?.close()
    this.output = undefined
  }

  list(): Array<VmInfo> {
    return this.registry.list()
  }

  /** Resolves once `vm` (any VM if undefined) has a VMM and at least `processes` processes. */
  waitForVm(vm: string | undefined, processes: number, signal?: AbortSignal): Promise<string> {
    return this.registry.waitForVm(vm, processes, signal)
  }

  /** May this peer ask for snapshots and the list? */
  private mayRequest(cred: PeerCred): boolean {
    const groups = this.options.allowGroups ?? []
    return cred.uid === process.geteuid?.() || (this.options.allowUids ?? []).includes(cred.uid) || groups.some((g) => g === cred.gid || cred.groups.includes(g))
  }

  /** Logs a refusal and gives the answer to send before the connection is closed (with the error's tag, if it has one). */
  private refusal(cred: PeerCred | undefined, message: string, error?: unknown): string {
    this.log(`refused a connection${cred ? ` (pid ${cred.pid}, uid ${cred.uid})` : ""}: ${message}`)
    return encodeMessage({ type: "error", ...(errorTag(error) ? { tag: errorTag(error) } : {}), message })
  }

  private accept(socket: Socket, cred: PeerCred, first: FirstMessage) {
    const fds = first.fds
    try {
      const m = parseMessage(first.message.toString("utf8").trimEnd())
      if (m.type === "hello") return this.admit(socket, cred, parseHello(m, fds.length), fds, first.rest)
      closeFds(fds)
      fds.length = 0
      const request = parseClientRequest(m)
      if (!this.mayRequest(cred))
        throw new ProtocolError({ reason: `uid ${cred.uid} may not ask this agent for snapshots or the list (the agent allows its own uid${this.options.allowUids?.length ? `, uids ${this.options.allowUids.join(", ")}` : ""}${this.options.allowGroups?.length ? `, groups ${this.options.allowGroups.join(", ")}` : ""}; see --allow-uid, --allow-group)` })
      return this.serveClient(socket, cred, request)
    } catch (e) {
      closeFds(fds)
      endAndClose(socket, this.refusal(cred, describeError(e), e))
    }
  }

  private admit(socket: Socket, cred: PeerCred, hello: ReturnType<typeof parseHello>, fds: Array<number>, rest: Buffer) {
    const { vm, peer } = this.registry.admit(socket, hello, fds, cred)
    const lines = new LineReader()
    const onLines = (chunk: Buffer) => {
      try {
        for (const line of lines.push(chunk)) peer.receive(parseMessage(line))
      } catch (e) {
        peer.send({ type: "error", message: describeError(e) })
        this.drop(vm, peer)
      }
    }
    socket.on("data", onLines)
    socket.on("close", () => this.drop(vm, peer))
    socket.on("error", () => this.drop(vm, peer))
    socket.resume()
    if (rest.length > 0) onLines(rest)
    peer.send({ type: "welcome", version: 1, vm: vm.id, role: hello.role })
    this.log(`vm ${vm.id}: ${peer.name} (uid ${cred.uid}) connected (${hello.regions.length} regions)`)
  }

  private drop(vm: Vm, peer: Peer) {
    if (this.registry.drop(vm, peer)) this.log(`vm ${vm.id}: ${peer.name} disconnected`)
  }

  /** A request connection: the answer, or, for a snapshot, progress then the result. Closing the connection cancels the snapshot. */
  private serveClient(socket: Socket, cred: PeerCred, request: ClientRequest) {
    socket.resume()
    if (request.type === "list") return endAndClose(socket, encodeMessage({ type: "vms", vms: this.list() }))
    const output = this.output
    if (!output) throw new ProtocolError({ reason: "this agent writes no snapshot on request: start it with --output-dir DIR" })
    const location = output.resolve(request.path, cred)
    let last = 0
    const program = snapshotVm(this.registry, this.snapshotLimits, (l) => this.log(l), {
      request,
      output: location,
      fileMode: this.options.fileMode,
      owner: { uid: cred.uid, gid: cred.gid },
      onProgress: (saved, total) => {
        const now = Date.now()
        if (now - last < 200 && saved < total) return
        last = now
        socket.write(encodeMessage({ type: "progress", savedBytes: saved, totalBytes: total }))
      }
    }).pipe(Effect.ensuring(Effect.sync(() => closeFds([location.dirFd]))), Effect.provide(WpNative.layer))
    const fiber = Effect.runFork(program)
    const cancel = () => void Effect.runFork(Fiber.interrupt(fiber))
    socket.once("close", cancel)
    fiber.addObserver((exit) => {
      socket.off("close", cancel)
      if (Exit.isSuccess(exit)) return endAndClose(socket, encodeMessage({ type: "result", ...exit.value, engine: undefined, faults: exit.value.engine.faults }))
      if (!Cause.hasFails(exit.cause)) return void socket.destroy()
      const error = Cause.squash(exit.cause)
      endAndClose(socket, encodeMessage({ type: "error", tag: errorTag(error) ?? "Error", message: describeError(error) }))
    })
  }

  /**
   * Takes a live snapshot of a connected VM into `request.path` as given (the
   * caller is trusted: this is the in-process API, not a socket request).
   */
  snapshot(
    request: Omit<SnapshotRequest, "type">,
    onProgress?: (savedBytes: number, totalBytes: number) => void
  ): Effect.Effect<SnapshotResult, VmsnapError, WpNative> {
    return snapshotVm(this.registry, this.snapshotLimits, (l) => this.log(l), { request, fileMode: this.options.fileMode, onProgress })
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
export const agentScoped = (socketPath: string, options?: AgentOptions) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: async () => {
        const agent = new Agent(socketPath, options)
        await agent.listen()
        return agent
      },
      // A missing or unusable output directory or socket path is said as such (not as a protocol error).
      catch: (e) => (e instanceof SnapshotIoError ? e : new SnapshotIoError({ path: socketPath, op: "listen on", code: (e as NodeJS.ErrnoException).code ?? "EINVAL", reason: describeError(e) }))
    }),
    (agent) => Effect.promise(() => agent.close())
  )
