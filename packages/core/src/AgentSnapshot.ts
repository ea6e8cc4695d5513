/**
 * One live snapshot of a VM connected to the agent, in steps:
 *
 * 1. refuse what cannot be point-in-time (a declared bypass writer);
 * 2. `prepare` every process that asked for it at hello and wait for
 *    `prepared` (it holds its balloon / discards from now until `done` or
 *    `failed`): this happens before the engine arms any protection;
 * 3. map read-only views of the fd-backed regions;
 * 4. take the snapshot (SnapshotSession) with the freeze sent to devices
 *    first and the VMM last; every process that was sent `freeze` is sent
 *    `thaw` on every path, also when a later one fails or times out;
 * 5. before anything is protected and again before the file is committed,
 *    no process outside the VM maps its guest memory; before the commit,
 *    every process's regions pass the hello checks again (a memfd mapped
 *    a second time during the snapshot);
 * 6. a process that disconnects ends the snapshot at once; the error names
 *    it by role and pid; every process hears `done` or `failed`.
 */
import { Cause, Deferred, Effect, Exit } from "effect"
import { checkHello, tryRead } from "./AgentAdmission.js"
import type { Peer } from "./AgentPeer.js"
import type { Vm, VmRegistry } from "./AgentRegistry.js"
import type { SnapshotRequest } from "./AgentProtocol.js"
import { isAlive } from "./AtomicFile.js"
import { describeError, NativeError, ProtocolError, type VmsnapError } from "./Errors.js"
import { gpa, hva, type MemoryRegion, PAGE_SIZE } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import { loadWp } from "./internal/ffi.js"
import type { OutputLocation } from "./OutputDir.js"
import { type ProcessMapping, readMappings } from "./ProcessMappings.js"
import { describeShared, sharedWithOthers } from "./SharedMappers.js"
import { type SnapshotResult, takeSnapshot } from "./SnapshotSession.js"
import type { RemoteProcess, WpNative } from "./WpNative.js"

/** The timeouts and bounds of an agent's snapshots (AgentOptions.limits, with defaults). */
export interface AgentSnapshotLimits {
  /** A snapshot whose output takes nothing for this long fails (SnapshotWriter.ts `stallMs`). */
  readonly stallMs?: number
  /** The most guest memory protected (GuestBound.ts); default this machine's memory. */
  readonly maxGuestBytes?: number
  /** How long a process may take to answer `freeze` (a VMM may copy a reference of all its memory first). */
  readonly freezeMs: number
  /** How long a process may take to answer `prepare`. */
  readonly prepareMs: number
}

export interface AgentSnapshotOptions {
  readonly request: Omit<SnapshotRequest, "type">
  /** Confined output (agent requests); absent: `request.path` as given (in-process callers). */
  readonly output?: OutputLocation
  readonly fileMode?: number
  readonly owner?: { readonly uid: number; readonly gid: number }
  readonly onProgress?: (savedBytes: number, totalBytes: number) => void
}

const PROGRESS_EVERY_MS = 200

/** Read-only views of the fd-backed regions (anonymous ones are read with process_vm_readv), unmapped when the scope ends. */
const mapViews = (vmm: Peer, regions: ReadonlyArray<Peer["hello"]["regions"][number]>) =>
  Effect.acquireRelease(
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

const ask = (p: Peer, type: string, reply: string, timeoutMs: number) =>
  Effect.tryPromise({
    try: () => p.request({ type }, reply, timeoutMs),
    catch: (e) => new ProtocolError({ reason: e instanceof Error ? e.message : String(e) })
  })

/**
 * Freeze and thaw of the VM's processes: devices first, the VMM last (its
 * reference copy then sees every writer stopped). `thaw` goes to exactly the
 * processes that were sent `freeze`, once, whatever happened after.
 */
const freezeControl = (vm: Vm, vmm: Peer, timeoutMs: number) => {
  const sent = new Set<Peer>()
  const thaw = Effect.sync(() => {
    sent.forEach((p) => p.send({ type: "thaw" }))
    sent.clear()
  })
  const freeze = Effect.forEach([...vm.devices, vmm], (p) => Effect.suspend(() => (sent.add(p), ask(p, "freeze", "frozen", timeoutMs))), { discard: true }).pipe(
    Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : thaw))
  )
  return { freeze, thaw }
}

/**
 * The real cause of an engine failure when a process changed its memory
 * since hello (a remap, an unmap, a shrunk fd): the first process whose
 * regions no longer pass the hello checks, named by role and pid.
 */
const layoutChanged = (e: VmsnapError, peers: ReadonlyArray<Peer>): VmsnapError | undefined => {
  for (const p of peers) {
    try {
      checkHello(p.hello, p.fds, p.pid)
    } catch (why) {
      return new ProtocolError({ reason: `${p.name} changed its guest memory since hello (${describeError(why)}); the snapshot failed: ${e.message}` })
    }
  }
  return undefined
}

/**
 * Guest memory that a process outside the VM maps (one that did not say
 * hello: a child the VMM forked before the snapshot, an undeclared device)
 * is written there without a fault, so the snapshot would not be of one
 * instant: refused, naming it, when the snapshot starts (before anything
 * is protected) and again before the file is committed. From every
 * process's /proc/PID/maps (SharedMappers.ts); one that maps it and unmaps
 * it again between the two checks is not seen.
 */
const outsideMappers = (vm: Vm, peers: ReadonlyArray<Peer>, p: Peer, smaps: ReadonlyArray<ProcessMapping> | Error, when: string) => {
  if (smaps instanceof Error) return undefined // exiting: its disconnect fails the snapshot
  const guest = smaps.filter((m) => p.hello.regions.some((r) => r.fd !== null && r.hva < m.end && r.hva + BigInt(r.size) > m.start))
  const shared = sharedWithOthers(peers.map((q) => q.pid), guest)
  if (shared.length === 0) return undefined
  return new ProtocolError({
    reason: `vm ${vm.id}: guest memory of ${p.name} is also mapped by processes that did not say hello${when}: ${describeShared(shared)}. ` +
      `Their writes are not write-protected, so the snapshot would not be of one instant. Have such a process say hello as a device, ` +
      `declare it in bypassWriters, or let it unmap guest memory (a child forked by the VMM keeps the mapping until it execs or exits)`
  })
}

/** When the snapshot starts, before anything is protected. */
const checkNoOutsideMappers = (vm: Vm, peers: ReadonlyArray<Peer>) =>
  Effect.suspend(() => {
    for (const p of peers) {
      const refused = outsideMappers(vm, peers, p, tryRead(() => readMappings(p.pid)), "")
      if (refused) return Effect.fail(refused)
    }
    return Effect.void
  })

/**
 * Before the file is committed, while every region is registered, from
 * each process's smaps read once: no process outside the VM maps its
 * memory, and its regions pass the hello checks again. A second writable
 * mapping of a memfd made during the snapshot is not write-protected:
 * pages written through it would be saved with data from after the cut.
 * One made and removed again before this check is not seen (the kernel
 * reports no new mapping of a file); docs/agent-protocol.md says so.
 */
const checkPeersBeforeCommit = (vm: Vm, peers: ReadonlyArray<Peer>) =>
  Effect.suspend(() => {
    for (const p of peers) {
      const smaps = tryRead(() => readMappings(p.pid))
      const refused = outsideMappers(vm, peers, p, smaps, " (seen before the file was committed)")
      if (refused) return Effect.fail(refused)
      try {
        checkHello(p.hello, p.fds, p.pid, smaps)
      } catch (why) {
        return Effect.fail(new ProtocolError({ reason: `vm ${vm.id}: ${p.name} changed its guest memory during the snapshot (${describeError(why)}); the snapshot would not be of one instant, so it is abandoned` }))
      }
    }
    return Effect.void
  })

/** "process 2 of the VM" in an engine error becomes the process's role and pid. */
const nameProcesses = (e: VmsnapError, peers: ReadonlyArray<Peer>): VmsnapError => {
  if (!(e instanceof NativeError)) return e
  const reason = e.reason.replace(/process (\d+) of the VM/g, (all, n: string) => peers[Number(n) - 1]?.name ?? all)
  const op = e.op.replace(/process (\d+) of the VM/g, (all, n: string) => peers[Number(n) - 1]?.name ?? all)
  return reason === e.reason && op === e.op ? e : new NativeError({ op, errno: e.errno, reason })
}

/** The VM to snapshot, marked busy until the scope ends; fails if it is absent, busy, or has a declared bypass writer. */
const claimVm = (registry: VmRegistry, id: string) =>
  Effect.gen(function* () {
    const vm = registry.get(id)
    if (!vm?.vmm) return yield* Effect.fail(new ProtocolError({ reason: `no VM "${id}" is connected (connected: ${registry.list().map((v) => v.id).join(", ") || "none"})` }))
    if (vm.busy) return yield* Effect.fail(new ProtocolError({ reason: `vm "${id}" is already being snapshotted` }))
    const peers = [vm.vmm, ...vm.devices]
    const bypass = peers.flatMap((p) => p.bypassWriters.map((w) => `${w} (${p.name})`))
    if (bypass.length > 0)
      return yield* Effect.fail(new ProtocolError({
        reason: `vm "${vm.id}" has devices that write guest memory without the page tables: ${bypass.join(", ")}. Write-protect cannot see their writes, so a live snapshot would not hold the memory at one instant; detach or quiesce them (and send "bypass-writers" with an empty list) first`
      }))
    vm.busy = true
    yield* Effect.addFinalizer(() => Effect.sync(() => {
      vm.busy = false
      registry.forgetIfEmpty(vm)
    }))
    return { vm, vmm: vm.vmm, peers }
  })

/** The engine's view of the VM: regions sorted by gpa (read through `views`), and each process's mappings of them. */
const engineLayout = (vmm: Peer, peers: ReadonlyArray<Peer>) =>
  Effect.gen(function* () {
    const regions = [...vmm.hello.regions].sort((a, b) => (a.gpa < b.gpa ? -1 : 1))
    const views = yield* mapViews(vmm, regions)
    const memory: Array<MemoryRegion> = regions.map((r, i) => ({
      guestBase: gpa(r.gpa),
      hostBase: hva(views[i]!.base),
      size: r.size,
      // Checked at hello against the fd or mapping; the session reads it again from the mapping.
      kind: r.pageSize > PAGE_SIZE ? "hugetlbfs" : r.fd !== null ? "memfd" : r.thp ? "anon-thp" : "anon",
      pageSize: r.pageSize
    }))
    const processes: Array<RemoteProcess> = peers.map((p) => ({
      uffd: p.uffd,
      pid: p.pid,
      mappings: p.hello.regions.map((r) => ({ region: regions.findIndex((v) => v.gpa === r.gpa), hva: r.hva }))
    }))
    return { memory, processes }
  })

/** Progress to the requester (every call) and to the VM's processes (at most every PROGRESS_EVERY_MS). */
const progressTo = (peers: ReadonlyArray<Peer>, onProgress: AgentSnapshotOptions["onProgress"]) => {
  let last = 0
  return (saved: number, total: number) => {
    onProgress?.(saved * PAGE_SIZE, total * PAGE_SIZE)
    const now = Date.now()
    if (now - last < PROGRESS_EVERY_MS) return
    last = now
    peers.forEach((p) => p.send({ type: "progress", savedBytes: saved * PAGE_SIZE, totalBytes: total * PAGE_SIZE }))
  }
}

/** Takes a live snapshot of a connected VM. Fails if a process of the VM disconnects during it; the others are unprotected and thawed. */
export const snapshotVm = (
  registry: VmRegistry,
  limits: AgentSnapshotLimits,
  log: (line: string) => void,
  options: AgentSnapshotOptions
): Effect.Effect<SnapshotResult, VmsnapError, WpNative> =>
  Effect.gen(function* () {
    const { request } = options
    const { vm, vmm, peers } = yield* claimVm(registry, request.vm)
    const path = options.output?.path ?? request.path
    const gone = (p: Peer) => new NativeError({ op: "snapshot", errno: 3, reason: `vm ${vm.id}: ${p.name} disconnected during the snapshot` })
    // A process that disconnects ends the snapshot at once (its uffd may be unusable).
    const lost = yield* Deferred.make<never, NativeError>()
    for (const p of peers) void p.lost.then(() => Effect.runFork(Deferred.fail(lost, gone(p))))
    log(`vm ${vm.id}: snapshot to ${path} started`)

    const run = Effect.gen(function* () {
      yield* Effect.forEach(peers.filter((p) => p.hello.prepare), (p) => ask(p, "prepare", "prepared", limits.prepareMs), { discard: true })
      yield* checkNoOutsideMappers(vm, peers)
      const { memory, processes } = yield* engineLayout(vmm, peers)
      const { freeze, thaw } = freezeControl(vm, vmm, limits.freezeMs)
      return yield* takeSnapshot({
        regions: memory,
        processes,
        path,
        output: options.output && { dir: { fd: options.output.dirFd, name: options.output.name }, mode: options.fileMode, owner: options.owner },
        poolPages: request.poolPages,
        faultAroundPages: request.faultAroundPages,
        compression: request.compression,
        steer: request.steer,
        stallMs: limits.stallMs,
        maxGuestBytes: limits.maxGuestBytes,
        freeze,
        thaw,
        beforeCommit: checkPeersBeforeCommit(vm, peers),
        onProgress: progressTo(peers, options.onProgress)
      })
    }).pipe(Effect.scoped)

    const result = yield* Effect.raceFirst(run, Deferred.await(lost)).pipe(
      // A process that went away explains whatever else failed.
      Effect.mapError((e) => {
        const dead = peers.find((p) => p.closed || !isAlive(p.pid))
        // A ProtocolError already names the process and what it did (checkPeersBeforeCommit, a bad answer).
        return dead ? gone(dead) : e instanceof ProtocolError ? e : layoutChanged(e, peers) ?? nameProcesses(e, peers)
      }),
      Effect.onExit((exit) => Effect.sync(() => {
        if (Exit.isSuccess(exit)) return
        const text = Cause.hasFails(exit.cause) ? describeError(Cause.squash(exit.cause)) : "cancelled: the requester went away"
        log(`vm ${vm.id}: snapshot failed: ${text}`)
        peers.forEach((p) => p.send({ type: "failed", message: text }))
      }))
    )
    log(`vm ${vm.id}: snapshot done: ${result.path}`)
    peers.forEach((p) => p.send({ type: "done", path: result.path, pauseMs: result.pauseMs, durationMs: result.durationMs }))
    return result
  }).pipe(Effect.scoped)
