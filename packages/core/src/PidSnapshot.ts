/**
 * A live snapshot of an unmodified process by pid (`vmsnap snapshot --pid`):
 * a VMM such as QEMU, a service such as Redis, any program.
 *
 * 1. Check the target (PidTarget.ts), freeze every thread with ptrace
 *    (vmsnap_inject.h), pick the mappings (ProcessMappings.ts), run
 *    userfaultfd(2) inside the target and take the fd with pidfd_getfd,
 *    then thaw: the target now runs with a userfaultfd of its address space
 *    held by vmsnap only.
 * 2. The same session as for an agent's VMM (SnapshotSession.takeSnapshot,
 *    remote mode): register the mappings, arm while the target runs, freeze
 *    all threads again for the cut (checking the layout is still the one
 *    registered), thaw, and save pages read with process_vm_readv.
 * 3. Before the file is committed, the layout is checked once more: a chosen
 *    mapping unmapped, moved or replaced during the snapshot fails it.
 *
 * Every exit path detaches from every thread and closes the uffd (closing
 * it removes all protection); if vmsnap is killed, the kernel does both.
 * Captured: memory only. Registers, file descriptors and device state are
 * not (docs/pid-snapshot.md).
 */
import { Effect } from "effect"
import { closeSync } from "node:fs"
import { outOfOomReach } from "./internal/oomScore.js"
import { CapabilityError, InvalidInput, NativeError, type VmsnapError } from "./Errors.js"
import { guestTooLarge } from "./GuestBound.js"
import { gpa, hva, type MemoryRegion } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import { type JsExternal, loadWp } from "./internal/ffi.js"
import {
  aliasesOf, type ChosenMapping, describeMapping, type MappingSelector, type ProcessMapping, readMappings, sameLayout, selectMappings
} from "./ProcessMappings.js"
import { checkTarget, isAlive, ptraceDenied } from "./PidTarget.js"
import { describeShared, sharedWithOthers } from "./SharedMappers.js"
import { type SnapshotResult, takeSnapshot } from "./SnapshotSession.js"
import type { Compression } from "./SnapshotWriter.js"
import { WpNative } from "./WpNative.js"
import { isNullPointer } from "ffi-rs"

export interface PidSnapshotOptions {
  readonly pid: number
  /** Final path of the snapshot file. */
  readonly path: string
  /** Which mappings; empty or absent: every writable one that can be captured. */
  readonly mappings?: ReadonlyArray<MappingSelector>
  readonly poolPages?: number
  readonly faultAroundPages?: number
  /** Record compression (default "auto", SnapshotWriter.ts). */
  readonly compression?: Compression
  /** Bound on waiting for the threads to stop, per freeze. Default 2000 ms. */
  readonly freezeTimeoutMs?: number
  /** Runs once the memory is armed, right before the cut's freeze, the target running (tests make it act here). */
  readonly beforeCut?: Effect.Effect<void, VmsnapError>
  /** Runs while every thread is frozen, right after the cut (tests take their reference here). */
  readonly atCut?: (regions: ReadonlyArray<MemoryRegion>) => Effect.Effect<void, VmsnapError>
  readonly onProgress?: (savedPages: number, totalPages: number) => void
  /** Slow the writer down (ms per turn): tests only. */
  readonly writerDelayMs?: number
  /** Fail when the output takes nothing for this long, in ms (SnapshotWriter.ts `stallMs`, default 10 s). */
  readonly stallMs?: number
  /** The most bytes of mappings protected (GuestBound.ts); default this machine's memory. */
  readonly maxGuestBytes?: number
}

/** One captured mapping as recorded: the target's hva, bytes, kind, name, permissions. */
export interface CapturedMapping {
  readonly hva: bigint
  readonly size: number
  readonly kind: string
  readonly name: string
  readonly permissions: string
}

export interface PidSnapshotResult extends SnapshotResult {
  readonly pid: number
  /** Threads stopped for the cut. */
  readonly threads: number
  /**
   * How long the target's threads were held stopped, ms, from the first stop
   * request to the last thread let go: to take the userfaultfd (`setup`) and
   * for the cut (`cut`: freeze, layout check, protect, atCut, thaw; `pauseMs`
   * is the protect alone).
   */
  readonly stoppedMs: { readonly setup: number; readonly cut: number }
  readonly mappings: ReadonlyArray<CapturedMapping>
  /** Writable mappings left out and why (default selection only). */
  readonly skipped: ReadonlyArray<{ readonly mapping: string; readonly why: string }>
}

const O_NONBLOCK = 0o4000
const O_CLOEXEC = 0o2000000

/** The ptrace handle on the target, closed (every thread detached) with its scope. */
const openTarget = (pid: number) =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      const err = new Int32Array(1)
      const handle: JsExternal = loadWp().vi_open([pid, Buffer.from(err.buffer)])
      if (isNullPointer(handle)) return Effect.fail(new NativeError({ op: `open pid ${pid}`, errno: -err[0]!, reason: errnoReason("pidfd_open", -err[0]!) }))
      return Effect.succeed(handle)
    }),
    (handle) => Effect.sync(() => loadWp().vi_close([handle]))
  )

const freezeError = (pid: number, rc: number): VmsnapError => {
  if (rc === -1) return ptraceDenied(pid, 1)
  if (rc === -3) return new NativeError({ op: `freeze pid ${pid}`, errno: 3, reason: `pid ${pid} exited` })
  if (rc === -110) return new NativeError({ op: `freeze pid ${pid}`, errno: 110, reason: "a thread did not stop in time (uninterruptible sleep?): try again" })
  if (rc === -11) return new NativeError({ op: `freeze pid ${pid}`, errno: 11, reason: "threads kept being created faster than they could be stopped" })
  return new NativeError({ op: `freeze pid ${pid}`, errno: -rc, reason: errnoReason("ptrace", -rc) })
}

/** Stops every thread; returns how many. */
const freeze = (handle: JsExternal, pid: number, timeoutMs: number) =>
  Effect.suspend(() => {
    const rc: number = loadWp().vi_freeze([handle, timeoutMs])
    return rc < 0 ? Effect.fail(freezeError(pid, rc)) : Effect.succeed(rc)
  })

const thaw = (handle: JsExternal) => Effect.sync(() => void loadWp().vi_thaw([handle]))

/**
 * While frozen to take the userfaultfd: the words the kernel clears at exit for each thread (src/inject_tid.c),
 * those inside the chosen mappings. Threads made after this are not asked (running a system call in a thread
 * just made, at the cut, once left the target's main thread stuck under load: not done). None when the kernel
 * cannot tell (no PR_GET_TID_ADDRESS). docs/pid-snapshot.md says what is not covered.
 */
const exitWords = (handle: JsExternal, chosen: ReadonlyArray<ChosenMapping>): Buffer => {
  const max = 4096
  const out = Buffer.alloc(8 * max)
  const n: number = outOfOomReach(() => loadWp().vi_tid_addresses([handle, out, max]))
  const words: Array<Buffer> = []
  for (let i = 0; i < n; i++) {
    const at = out.readBigUInt64LE(8 * i)
    if (chosen.some((m) => at >= m.start && at + 4n <= m.end)) words.push(out.subarray(8 * i, 8 * i + 8))
  }
  return Buffer.concat(words)
}

/**
 * At the cut, still frozen: each exit word written back with its own value, which makes the engine save and
 * unprotect its page now. A thread exiting later clears it (the kernel does not wait for a userfaultfd for an
 * exiting thread: the clear, and the wake of whoever joins it, would be lost on a page not yet saved).
 */
const saveExitWords = (handle: JsExternal, words: Buffer) =>
  Effect.sync(() => void (words.length > 0 && loadWp().vi_rewrite_words([handle, words, words.length / 8])))

/** While frozen: a userfaultfd of the target's mm, owned by this process. */
const takeUffd = (handle: JsExternal, pid: number) =>
  Effect.acquireRelease(
    Effect.suspend((): Effect.Effect<number, VmsnapError> => {
      const fd: number = outOfOomReach(() => loadWp().vi_take_uffd([handle, O_CLOEXEC | O_NONBLOCK]))
      if (fd >= 0) return Effect.succeed(fd)
      if (fd === -1 || fd === -13)
        return Effect.fail(new CapabilityError({ missing: `userfaultfd in pid ${pid}`, reason: `the target may not create a userfaultfd: it needs CAP_SYS_PTRACE, or \`sysctl vm.unprivileged_userfaultfd=1\`` }))
      if (fd === -8) return Effect.fail(new InvalidInput({ reason: `pid ${pid} runs no 64-bit x86 thread that vmsnap can run a system call in` }))
      return Effect.fail(new NativeError({ op: `userfaultfd in pid ${pid}`, errno: -fd, reason: errnoReason("userfaultfd", -fd) }))
    }),
    (fd) => Effect.sync(() => closeSync(fd))
  )

/** The layout now, or undefined if the target is gone (reported as an exit). */
const mappingsNow = (pid: number): Array<ProcessMapping> | undefined => {
  try {
    return readMappings(pid)
  } catch {
    return undefined
  }
}

/**
 * How the chosen mappings differ from the layout now (gone, moved, replaced: no longer
 * registered with our uffd, "uw"), if they do. Only while the session holds them
 * registered: before registration, and after the release, none is "uw".
 */
const layoutChange = (pid: number, chosen: ReadonlyArray<ChosenMapping>, now = mappingsNow(pid)): string | undefined => {
  if (!now) return undefined
  return sameLayout(chosen, now) ??
    chosen.map((c) => now.find((n) => n.start === c.start)!).filter((m) => !m.vmFlags.includes("uw")).map((m) => `mapping ${describeMapping(m)} was replaced`)[0]
}

const layoutError = (pid: number, when: string, change: string) =>
  new NativeError({ op: "snapshot", errno: 16, reason: `pid ${pid} changed its memory layout ${when}: ${change}; the snapshot would not be of one instant, so it is abandoned. Try again, or choose with --mapping the mappings that matter and that it does not remap (heaps and thread stacks change as a program runs and creates threads)` })

/** Shared memory another process maps is written without faulting in the target: refused, naming both. */
const checkNotShared = (pid: number, chosen: ReadonlyArray<ChosenMapping>, when: string): Effect.Effect<void, VmsnapError> =>
  Effect.suspend(() => {
    const shared = sharedWithOthers([pid], chosen)
    if (shared.length === 0) return Effect.void
    return Effect.fail(new InvalidInput({
      reason: `shared memory of pid ${pid} is also mapped by other processes${when}: ${describeShared(shared)}. ` +
        `Their writes are not write-protected (only pid ${pid}'s page tables are), so the snapshot would not be of one instant. ` +
        `Leave these mappings out by choosing the others with --mapping START-END|NAME, or snapshot while those processes do not write`
    }))
  })

/**
 * Fails if a chosen mapping's memory is also mapped writable at another address of the process (aliasesOf):
 * `all` is the layout the choice was made from, or, before commit, the layout then (undefined: not readable,
 * the process is exiting, which the layout check says). A mapping made and unmapped between the two reads
 * is not seen: the kernel tells nothing of a new mapping of the same file.
 */
const checkNoAliases = (
  pid: number, chosen: ReadonlyArray<ChosenMapping>, all: ReadonlyArray<ProcessMapping> | undefined, when: "" | " (mapped during the snapshot)"
): Effect.Effect<void, VmsnapError> =>
  Effect.suspend(() => {
    if (!all) return Effect.void
    for (const m of chosen) {
      const alias = aliasesOf(m, all)[0]
      if (!alias) continue
      const reason = `pid ${pid} maps the same shared memory twice, writable${when}: ${describeMapping(m)} and ${describeMapping(alias)} (one file range at two addresses). ` +
        `vmsnap protects each mapping's pages on their own, so a page written through one would be saved through the other after the cut: ` +
        `this process cannot be captured at one instant while it writes through both; snapshot it when it does not, or leave both out with --mapping`
      // Before anything is done, a refusal of the input; during the snapshot, an abandoned snapshot (as a layout change is).
      return Effect.fail(when ? new NativeError({ op: "snapshot", errno: 16, reason }) : new InvalidInput({ reason }))
    }
    return Effect.void
  })

/**
 * Before commit, while the chosen mappings are registered: the layout, read once (a walk of every page
 * table), still has them all, unchanged and registered, and no second mapping of their memory.
 */
const checkLayoutBeforeCommit = (pid: number, chosen: ReadonlyArray<ChosenMapping>): Effect.Effect<void, VmsnapError> =>
  Effect.suspend(() => {
    const now = mappingsNow(pid)
    const change = layoutChange(pid, chosen, now)
    // Written through a mapping made during the snapshot, a page would be saved with data from after the cut.
    return change ? Effect.fail(layoutError(pid, "during the snapshot", change)) : checkNoAliases(pid, chosen, now, " (mapped during the snapshot)")
  })

const exited = (pid: number) => new NativeError({ op: "snapshot", errno: 3, reason: `pid ${pid} exited during the snapshot` })

/**
 * What the target did, if an engine failure comes from it; called while the
 * chosen mappings are still registered. ESRCH or a target no longer running:
 * it exited. A chosen mapping gone, moved or no longer registered: the layout
 * changed (e.g. ENOENT unprotecting it, EFAULT from a uffd UNMAP/REMAP
 * event). ENODATA: it discarded pages not yet saved (src/discard.c). ECHILD: it
 * forked while it maps shared memory chosen (src/discard.c).
 */
const explainFailure = (pid: number, chosen: ReadonlyArray<ChosenMapping>, e: VmsnapError): VmsnapError => {
  if (!isAlive(pid) || (e instanceof NativeError && e.errno === 3)) return exited(pid)
  const change = e instanceof NativeError && e.errno !== 16 ? layoutChange(pid, chosen) : undefined
  if (change) return layoutError(pid, "during the snapshot", change)
  if (e instanceof NativeError && e.errno === 10)
    return new NativeError({ op: "snapshot", errno: 10, reason: `pid ${pid} forked during the snapshot while it maps shared memory chosen for it: the child's mapping is not write-protected, so its writes would be saved after the cut, and the snapshot is abandoned. Try again when it does not fork, or choose with --mapping its private memory only` })
  if (e instanceof NativeError && e.errno === 61)
    return new NativeError({ op: "snapshot", errno: 61, reason: `pid ${pid} discarded memory (MADV_DONTNEED/MADV_REMOVE) that was not saved yet: its content at the cut is gone, so the snapshot is abandoned. A discard before the cut is fine: try again, or choose with --mapping the mappings it does not discard from (allocators and thread libraries discard heap and stack pages)` })
  return e
}

/** Takes a live snapshot of process `pid`'s memory into `path`. */
export const snapshotPid = (options: PidSnapshotOptions): Effect.Effect<PidSnapshotResult, VmsnapError, WpNative> =>
  Effect.scoped(
    Effect.gen(function* () {
      const pid = options.pid
      const timeoutMs = options.freezeTimeoutMs ?? 2000
      yield* WpNative
      yield* checkTarget(pid)
      const handle = yield* openTarget(pid)
      const stoppedMs = { setup: 0, cut: 0 }
      let stoppedAt = performance.now()
      const stopped = (phase: "setup" | "cut") => Effect.sync(() => void (stoppedMs[phase] = performance.now() - stoppedAt))
      // The mappings are chosen while the target runs: reading smaps and every process's maps
      // walks page tables (tens of ms for a large process), so none of it is done while it is
      // stopped. Registering them later fails on a mapping that is gone, and the layout is
      // checked against this choice again before commit.
      // smaps is read in several read(2)s, and the kernel drops the process's mmap lock between
      // them: a process that maps and unmaps as it runs can be seen without one of its mappings
      // (seen under load). A choice that names a mapping not found is made once more.
      let mappings = readMappings(pid)
      let picked = selectMappings(pid, mappings, options.mappings ?? [])
      if (picked instanceof InvalidInput) picked = selectMappings(pid, (mappings = readMappings(pid)), options.mappings ?? [])
      if (picked instanceof InvalidInput) return yield* Effect.fail(picked)
      yield* checkNotShared(pid, picked.chosen, "")
      yield* checkNoAliases(pid, picked.chosen, mappings, "")
      if (picked.chosen.length > 64)
        return yield* Effect.fail(new InvalidInput({ reason: `pid ${pid} has ${picked.chosen.length} mappings to capture, more than the engine's 64 regions: pick some with --mapping START-END|NAME or --min-size` }))
      // Before anything is done to the target: sparse reservations (a sanitizer's shadow, a runtime's
      // reserved heap) can be terabytes, and protecting them would exhaust this machine (GuestBound.ts).
      const largest = [...picked.chosen].sort((a, b) => b.size - a.size).slice(0, 3).map(describeMapping).join(", ")
      const tooLarge = guestTooLarge(picked.chosen.reduce((n, m) => n + m.size, 0), `pid ${pid}'s mappings to capture (the largest: ${largest})`,
        "leave the large reservations out with --mapping START-END|NAME or --min-size, or raise the bound (--max-guest-size) if they really are in use", options.maxGuestBytes)
      if (tooLarge) return yield* Effect.fail(new InvalidInput({ reason: tooLarge }))
      // Frozen only to run userfaultfd(2) inside the target and take the fd.
      const { uffd, words } = yield* Effect.acquireUseRelease(
        Effect.suspend(() => {
          stoppedAt = performance.now()
          return freeze(handle, pid, timeoutMs)
        }),
        () => Effect.map(takeUffd(handle, pid), (fd) => ({ uffd: fd, words: exitWords(handle, picked.chosen) })),
        () => Effect.andThen(thaw(handle), stopped("setup"))
      )
      const selection = picked
      const rc: number = loadWp().wp_uffd_negotiate([uffd])
      if (rc < 0) return yield* Effect.fail(new NativeError({ op: "userfaultfd", errno: -rc, reason: errnoReason("userfaultfd", -rc) }))
      const chosen = selection.chosen
      const regions: Array<MemoryRegion> = chosen.map((m) => ({
        guestBase: gpa(m.start), hostBase: hva(0), size: m.size, kind: m.kind, pageSize: m.kernelPageSize, mapping: { name: m.name, permissions: m.permissions }
      }))
      let threads = 0
      // The cut's freeze. The layout is not read while the target is stopped (reading smaps
      // walks every page table: ~24 ms for a 0.5 GiB Redis): a mapping replaced before the
      // cut is unregistered, so protecting it at the cut fails (ENOENT, explained as a layout
      // change), and beforeCommit checks the layout again while everything is registered.
      const freezeForCut = Effect.gen(function* () {
        if (options.beforeCut) yield* options.beforeCut
        stoppedAt = performance.now()
        threads = yield* freeze(handle, pid, timeoutMs)
      })
      const result = yield* takeSnapshot({
        regions,
        processes: [{ uffd, pid, mappings: chosen.map((m, i) => ({ region: i, hva: m.start })) }],
        path: options.path,
        poolPages: options.poolPages,
        faultAroundPages: options.faultAroundPages,
        compression: options.compression,
        freeze: freezeForCut,
        thaw: Effect.andThen(thaw(handle), stopped("cut")),
        atCut: Effect.andThen(saveExitWords(handle, words), options.atCut?.(regions) ?? Effect.void),
        beforeCommit: Effect.andThen(checkLayoutBeforeCommit(pid, chosen), checkNotShared(pid, chosen, " (seen before the file was committed)")),
        // Before the session lets go: the chosen mappings are still registered ("uw"), so a
        // mapping that lost it was really replaced (after the release, every one has lost it).
        explainFailure: (e) => Effect.sync(() => explainFailure(pid, chosen, e)),
        onProgress: options.onProgress,
        writerDelayMs: options.writerDelayMs,
        stallMs: options.stallMs,
        maxGuestBytes: options.maxGuestBytes
      }).pipe(
        // Failures outside the registered part (registering itself): bounds only.
        Effect.mapError((e) => {
          if (!isAlive(pid)) return exited(pid)
          const now = e instanceof NativeError && e.errno !== 16 && e.errno !== 61 ? mappingsNow(pid) : undefined
          const change = now && sameLayout(chosen, now)
          return change ? layoutError(pid, "during the snapshot", change) : e
        })
      )
      return {
        ...result,
        pid,
        threads,
        stoppedMs: { setup: Math.round(stoppedMs.setup * 1000) / 1000, cut: Math.round(stoppedMs.cut * 1000) / 1000 },
        mappings: chosen.map((m) => ({ hva: m.start, size: m.size, kind: m.kind, name: m.name, permissions: m.permissions })),
        skipped: selection.skipped.map((s) => ({ mapping: describeMapping(s.mapping), why: s.why }))
      }
    })
  )
