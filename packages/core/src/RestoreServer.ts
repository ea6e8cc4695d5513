/**
 * `vmsnap serve`: a page-fault handler that speaks Firecracker's UFFD
 * handshake, so a Firecracker-style VMM restores lazily from a vmsnap file
 * (or a raw memory image).
 *
 * The VMM connects to a Unix stream socket and sends one message: a JSON
 * array of regions `{"base_host_virt_addr", "size", "offset", "page_size"}`
 * (older VMMs send `"page_size_kib"`, which despite its name is in bytes;
 * either is accepted) with its userfaultfd as the only fd (SCM_RIGHTS). A
 * memfd-backed guest may add its memfd as a second fd (a vmsnap extension;
 * shared memory, where pages can sit in the page cache unmapped and are
 * then mapped with UFFDIO_CONTINUE, is also known from the VMM's smaps,
 * so Firecracker's uffd alone is enough). The VMM keeps the
 * socket open; its pid comes from SO_PEERCRED. Firecracker expects no reply;
 * a refused VMM is told why three ways: the log, the `refused` event, and
 * one `{"error": ...}` line on the socket before it is closed.
 *
 * Before serving, each range is checked against the VMM's mappings
 * (FirecrackerHandshake.ts: mapped, registered MISSING, the declared page
 * size: 4 KiB, or 2 MiB for hugetlbfs memory). A VMM's outcome (`finished`)
 * is ok only when every page holds the snapshot's content or the guest's
 * own; close() reports it for every VMM still served, then frees them.
 *
 * The source's index is read and its structure checked once, at listen
 * (coverage, no page stored twice, region page sizes): per-VMM setup does
 * not read the file. docs/lazy-restore.md is the VMM author's view.
 */
import { Cause, Effect, Exit, Scope } from "effect"
import type { Socket } from "node:net"
import { describeError, type NativeError, ProtocolError } from "./Errors.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import { readMappings } from "./ProcessMappings.js"
import { checkVmmMappings, type FirecrackerRegion, type HvaSpan, parseFirecrackerBody, recheckVmmMappings, type VmmMappings } from "./FirecrackerHandshake.js"
import { closeFds, type FirstMessage } from "./internal/firstMessage.js"
import { endAndClose, listenUnix, type UnixServer } from "./internal/unixServer.js"
import { type GuestRange, type LazyRestore, type LazyRestoreStats, startLazyRestore } from "./LazyRestore.js"
import { type ImageIndex, openImageIndex, type RestoreSource } from "./RestoreIndex.js"

const MAX_BODY = 1 << 20
const HANDSHAKE_TIMEOUT_MS = 5000
const POLL_MS = 20

export interface ServeEvents {
  readonly log?: (line: string) => void
  /** A VMM was refused at the handshake (pid 0 when it could not be learned). */
  readonly onRefused?: (pid: number, reason: string) => void
  /** Pages of a VMM that cannot be served correctly: records that cannot be produced (poisoned or left blocked), ranges the VMM remapped. */
  readonly onPageFailure?: (pid: number, stats: LazyRestoreStats) => void
  /** A VMM's first faulting page was installed (reported once per VMM, within POLL_MS of it). */
  readonly onFirstPage?: (pid: number, times: HandshakeTimes) => void
  /** A VMM's restore finished (every page resident) or failed. */
  readonly onFinished?: (pid: number, outcome: { ok: boolean; error?: string; stats: LazyRestoreStats; handshake: HandshakeTimes }) => void
}

/**
 * A VMM's handshake, from its message parsed (ms, CLOCK_MONOTONIC on both
 * sides): to serving (its checks and per-VMM setup done, the fault thread
 * running); to the first fault taken (the fault thread began serving it:
 * when the VMM's first fault came, or serving began if it came before);
 * and to that fault's page installed (null until a fault). Issue 10's
 * target for the last: at most 2 ms at any size up to 8 GiB. What lies
 * between serving and the first fault taken is the VMM's (its guest had
 * not touched memory yet) or the machine's (the fault thread waited for a
 * CPU); the rest is serve's.
 */
export interface HandshakeTimes {
  readonly handshakeToServingMs: number
  readonly handshakeToFirstFaultMs: number | null
  readonly handshakeToFirstPageMs: number | null
}

const handshakeTimes = (at: bigint, restore: LazyRestore, s: LazyRestoreStats): HandshakeTimes => {
  const serving = Number(restore.startedAtNs() - at) / 1e6
  return {
    handshakeToServingMs: serving,
    handshakeToFirstFaultMs: s.firstFaultMs === null ? null : serving + s.firstFaultMs,
    handshakeToFirstPageMs: s.firstPageMs === null ? null : serving + s.firstPageMs
  }
}

/** The length of a complete JSON body at the start of `b`, if there is one yet. */
const completeJson = (b: Buffer): number | undefined => {
  try {
    JSON.parse(b.toString("utf8"))
    return b.length
  } catch {
    return undefined
  }
}

const fail = (reason: string): never => {
  throw new ProtocolError({ reason })
}

/** Why a restore whose pages are all settled did not restore the snapshot everywhere; undefined when it did. */
const shortfall = (s: LazyRestoreStats): string | undefined => {
  const why = [
    s.pagesFailed - s.pagesUnallocated ? `${s.pagesFailed - s.pagesUnallocated} page(s) could not be produced and were poisoned` : "",
    s.pagesUnallocated ? `${s.pagesUnallocated} page(s) could not be installed: no huge page could be allocated (the hugetlbfs pool or the mount's size= quota is exhausted); poisoned where the VMM negotiated UFFD_FEATURE_POISON, else their faults stay blocked` : "",
    s.pagesGone ? `${s.pagesGone} page(s) were no longer registered with the userfaultfd when installed (the VMM mapped something else there or unregistered them) and were skipped: they hold what the VMM put there, not the snapshot` : "",
    s.faultsOutside ? `${s.faultsOutside} fault(s) hit registered pages that no region declares (first at ${s.firstOutsideHva}), answered with a memory error` : ""
  ].filter((w) => w)
  return why.length ? why.join("; ") : undefined
}

/**
 * Runs the TypeScript of a VMM's handshake once before any VMM comes: the
 * body's parse, the smaps check (of serve's own process: refused, nothing
 * of it is registered), and startLazyRestore up to wp_restorer_create (fd
 * -1 is not a userfaultfd: refused). V8 compiles that code then, not during the first VMM's
 * handshake (with Firecracker, one serve per VM: the only one). Measured
 * with the toy VMM at 1 GiB, load average 3.2-3.7: the first VMM's
 * handshake to serving took 1.7-3.0 ms without this (the smaps check
 * alone 1.2-1.3 ms), the second VMM's 0.7-1.2 ms; with it, the first's
 * 0.9-1.4 ms (its smaps check 0.56-0.66 ms).
 */
const rehearse = async (source: RestoreSource, index: ImageIndex) => {
  parseFirecrackerBody(JSON.stringify([{ base_host_virt_addr: PAGE_SIZE, size: PAGE_SIZE, offset: 0, page_size: PAGE_SIZE }]))
  const own = readMappings(process.pid)[0]
  try {
    checkVmmMappings(process.pid, own ? [{ base_host_virt_addr: Number(own.start), size: PAGE_SIZE, offset: 0, page_size: own.kernelPageSize }] : [])
  } catch {
    // refused: serve's own memory is not registered with a userfaultfd
  }
  const scope = Effect.runSync(Scope.make())
  await Effect.runPromiseExit(Scope.provide(scope)(startLazyRestore(source, -1, [{ hva: 0n, size: PAGE_SIZE, imageOffset: 0 }], {}, index)))
  await Effect.runPromise(Scope.close(scope, Exit.void))
}

/** One VMM being served: its connection and the scope that owns its restorer. */
interface Session {
  readonly socket: Socket
  /** Reports the outcome (once) and frees the restorer; whether every page was settled. */
  readonly stop: (why: string) => Promise<boolean>
}

/** What close() found: VMMs still served then, and of them, those with pages left to install (their ranges stay registered). */
export interface ServeStop {
  readonly served: number
  readonly pagesLeft: number
}

export class RestoreServer {
  private server: UnixServer | undefined
  private index: ImageIndex | undefined
  /** Holds the index (released at close: restorers still serving keep their own references). */
  private indexScope: Scope.Closeable | undefined
  private readonly sessions = new Set<Session>()
  private idleWaiters: Array<() => void> = []

  constructor(
    readonly socketPath: string,
    readonly source: RestoreSource,
    private readonly events: ServeEvents = {}
  ) {}

  private log(line: string) {
    this.events.log?.(line)
  }

  /**
   * Reads the source's index and checks its structure (fails with
   * SnapshotFormatError), builds the native index every VMM shares, then
   * listens.
   */
  async listen(): Promise<void> {
    const scope = Effect.runSync(Scope.make())
    this.indexScope = scope
    this.index = await Effect.runPromise(Scope.provide(scope)(openImageIndex(this.source))).catch(async (e) => {
      await this.releaseIndex()
      throw e
    })
    await rehearse(this.source, this.index)
    this.server = await listenUnix(this.socketPath, {
      // Firecracker sends one message and no terminator: a body that stops arriving is complete.
      firstMessage: { complete: completeJson, maxBytes: MAX_BODY, timeoutMs: HANDSHAKE_TIMEOUT_MS, idleMs: 200 },
      refuse: (cred, reason) => this.refusal(cred?.pid ?? 0, reason)
    }, (socket, cred, first) => void this.accept(socket, cred.pid, first, process.hrtime.bigint())).catch(async (e) => {
      await this.releaseIndex()
      throw e
    })
  }

  private async releaseIndex() {
    const scope = this.indexScope
    this.indexScope = undefined
    this.index = undefined
    if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
  }

  /**
   * Resolves once no VMM is being served: a VMM whose pages are all settled
   * but that still has registered ranges (failed pages needing a handler,
   * pages no region declares) is served until it disconnects (serve --once
   * waits for that before exiting).
   */
  idle(): Promise<void> {
    return this.sessions.size === 0 ? Promise.resolve() : new Promise((resolve) => this.idleWaiters.push(resolve))
  }

  /**
   * Stops serving every VMM (each gets its `finished` event: ok when its
   * pages were all settled, else ok false) and closes the socket
   * (connections still sending their first message are refused).
   */
  async close(): Promise<ServeStop> {
    const served = [...this.sessions]
    let pagesLeft = 0
    for (const s of served) if (!(await s.stop("serve stopped before every page was resident; ranges with pages left stay registered"))) pagesLeft++
    await this.server?.close()
    this.server = undefined
    await this.releaseIndex()
    return { served: served.length, pagesLeft }
  }

  /** Logs and reports a refusal; gives the answer to send before the connection is closed. */
  private refusal(pid: number, reason: string): string {
    this.log(`refused a VMM${pid ? ` (pid ${pid})` : ""}: ${reason}`)
    this.events.onRefused?.(pid, reason)
    return JSON.stringify({ error: reason }) + "\n"
  }

  private refuse(socket: Socket, pid: number, reason: string) {
    endAndClose(socket, this.refusal(pid, reason))
  }

  /** `at`: when the handshake message was complete (process.hrtime.bigint()). */
  private async accept(socket: Socket, pid: number, first: FirstMessage, at: bigint) {
    let regions: Array<FirecrackerRegion>
    try {
      regions = parseFirecrackerBody(first.message.toString("utf8"))
      if (first.fds.length === 0) fail("the handshake carried no file descriptor: send the userfaultfd with SCM_RIGHTS")
      if (first.fds.length > 2) fail(`the handshake carried ${first.fds.length} fds: send the userfaultfd (and, for a memfd guest, its memfd)`)
    } catch (e) {
      closeFds(first.fds)
      return this.refuse(socket, pid, describeError(e))
    }
    const [uffd, memfd] = first.fds as [number, number | undefined]
    // The VMM's mappings: mapped, registered, the declared page size, shared or not. A failure is
    // reported once the uffd is accepted (admit), so a wrong fd is said first.
    let mappings: VmmMappings = { undeclared: [], shared: [] }
    let refusal: ProtocolError | undefined
    try {
      mappings = checkVmmMappings(pid, regions)
    } catch (e) {
      refusal = e as ProtocolError
    }
    // Shared memory whether or not the VMM sent its memfd (Firecracker sends only the uffd): a page in its page cache is mapped with UFFDIO_CONTINUE.
    // Private memory is private whatever fd came with it: an unrelated memfd sent along once made it served as shared (a discard read the snapshot, not zero).
    const rangesOf = (m: VmmMappings): Array<GuestRange> =>
      regions.map((r, i) => ({ hva: BigInt(r.base_host_virt_addr), size: r.size, imageOffset: r.offset, memfd: m.shared[i] ? memfd : undefined, shared: m.shared[i], pageSize: r.page_size }))
    const ranges = rangesOf(mappings)
    // The mappings disagree with the ranges: were they changed right after sending (UNMAP/REMAP events queued)?
    const admit = ({ goneAfterSending }: { readonly goneAfterSending: () => ReadonlyArray<HvaSpan> }) =>
      Effect.try({
        try: () => (refusal ? rangesOf(mappings = recheckVmmMappings(pid, regions, refusal, goneAfterSending)) : undefined),
        catch: (e) => e as ProtocolError | NativeError
      })
    const scope = Effect.runSync(Scope.make())
    const started = await Effect.runPromiseExit(Scope.provide(scope)(startLazyRestore(this.source, uffd, ranges, { admit, ownerPid: pid || undefined }, this.index)))
    closeFds(first.fds) // the restorer keeps its own dups
    if (Exit.isFailure(started)) {
      await Effect.runPromise(Scope.close(scope, Exit.void))
      return this.refuse(socket, pid, describeError(Cause.squash(started.cause)))
    }
    const restore = started.value
    const undeclared = mappings.undeclared
    const total = regions.reduce((s, r) => s + r.size, 0)
    this.log(`VMM pid ${pid}: serving ${regions.length} region(s), ${total} bytes, from ${this.source.path}${ranges.some((r) => r.shared || r.memfd !== undefined) ? " (shared memory: UFFDIO_COPY, UFFDIO_CONTINUE for pages in its page cache)" : ""}`)
    for (const w of undeclared) this.log(`VMM pid ${pid}: ${w}`)
    let reported = false
    const report = (why: string, ok: boolean) => {
      if (reported) return
      reported = true
      this.log(`VMM pid ${pid}: ${why}`)
      const stats = restore.stats()
      this.events.onFinished?.(pid, { ok, error: ok ? undefined : why, stats, handshake: handshakeTimes(at, restore, stats) })
    }
    let done = false
    /**
     * The outcome, from the restorer's own state whatever ended serving (the
     * VMM leaving, serve stopping, every page settled): ok when every page
     * is settled and none failed, was gone or faulted outside every range;
     * `why` when pages were left. (It once came from whether the 20 ms poll
     * had seen "done" before the disconnect was noticed: a VMM that read
     * every page and exited at once was told it left too early.)
     */
    const outcome = (why: string): boolean => {
      const s = restore.stats()
      if (s.pagesSettled < s.pagesTotal) {
        report(why, false)
        return false
      }
      const short = shortfall(s)
      const after = s.doneMs === null ? "" : ` after ${s.doneMs.toFixed(0)} ms`
      report(short ? `every page settled${after}, but ${short}` : `every page resident${after} (${s.faults} faults, ${s.pagesByFill} pages filled in the background)`, !short)
      return true
    }
    let firstPage = false
    /** The first-page event, once, when the stats first show it (by the poll, or at the end if the VMM was quicker). */
    const noteFirstPage = (s: LazyRestoreStats) => {
      if (firstPage || s.firstPageMs === null) return
      firstPage = true
      const times = handshakeTimes(at, restore, s)
      this.log(`VMM pid ${pid}: first page installed ${times.handshakeToFirstPageMs!.toFixed(3)} ms after the handshake (checks and setup: ${times.handshakeToServingMs.toFixed(3)} ms; first fault taken at ${times.handshakeToFirstFaultMs?.toFixed(3)} ms)`)
      this.events.onFirstPage?.(pid, times)
    }
    let released = false
    const session: Session = {
      socket,
      stop: async (why) => {
        if (!released) {
          restore.stop() // its threads end here: the stats read next are final
          noteFirstPage(restore.stats())
        }
        const whole = outcome(why)
        if (released) return whole
        released = true
        clearInterval(timer)
        this.sessions.delete(session)
        await Effect.runPromise(Scope.close(scope, Exit.void)) // frees the restorer: restore.stats() keeps its last figures
        if (this.sessions.size === 0) for (const wake of this.idleWaiters.splice(0)) wake()
        return whole
      }
    }
    this.sessions.add(session)
    let seen = { failed: 0, gone: 0, outside: 0 }
    const timer = setInterval(() => {
      const state = restore.poll()
      const s = restore.stats()
      noteFirstPage(s)
      if (s.pagesFailed > seen.failed || s.pagesGone > seen.gone || s.faultsOutside > seen.outside) {
        seen = { failed: s.pagesFailed, gone: s.pagesGone, outside: s.faultsOutside }
        const f = s.failedRecord
        this.log(`VMM pid ${pid}: ${s.pagesFailed} page(s) cannot be produced${f ? ` (${f.records} record(s); first at byte ${f.fileOffset}: ${f.reason})` : ""}${s.pagesUnallocated ? ` (${s.pagesUnallocated} of them: no huge page could be allocated, the hugetlbfs pool or size= quota is exhausted)` : ""}, ${s.pagesPoisoned} of them poisoned (the guest sees a memory error; the others stay blocked); ${s.pagesGone} page(s) no longer registered (remapped by the VMM), skipped${s.faultsOutside ? `; ${s.faultsOutside} fault(s) on registered pages no region declares (first at ${s.firstOutsideHva}), ${s.outsidePoisoned} answered with a memory error` : ""}`)
        this.events.onPageFailure?.(pid, s)
      }
      if ((state === "done" || state === "settled") && !done) {
        done = true
        // A range still registered (undeclared pages, or failed pages that need a handler) is served until the VMM
        // disconnects: its faults get a memory error, its discards go on; with nobody reading they would wait for ever.
        // The outcome is reported now, unless faults outside every region may still change it (then at disconnect).
        if (undeclared.length === 0 && state === "done") void session.stop("")
        else if (undeclared.length === 0) {
          outcome("")
          this.log(`VMM pid ${pid}: ranges with pages that could not be produced stay registered and are served (a memory error; discards go on) until the VMM disconnects`)
        } else this.log(`VMM pid ${pid}: every declared page settled; faults on registered pages that no region declares get a memory error until the VMM disconnects`)
      } else if (state !== "serving" && state !== "done" && state !== "settled") void session.stop(`restore failed: ${state === "stopped" ? "stopped" : state.message}`)
    }, POLL_MS)
    socket.on("close", () => void session.stop("disconnected before every page was resident; cleaned up"))
    socket.resume()
  }
}
