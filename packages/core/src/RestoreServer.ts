/**
 * `vmsnap serve`: a page-fault handler that speaks Firecracker's UFFD
 * handshake, so a Firecracker-style VMM restores lazily from a vmsnap file
 * (or a raw memory image).
 *
 * The VMM connects to a Unix stream socket and sends one message: a JSON
 * array of regions `{"base_host_virt_addr", "size", "offset", "page_size"}`
 * (older VMMs send `"page_size_kib"`, which despite its name is in bytes;
 * either is accepted) with its userfaultfd as the only fd (SCM_RIGHTS). A
 * memfd-backed guest adds its memfd as a second fd (a vmsnap extension: the
 * ranges are shared memory, where pages can sit in the page cache unmapped
 * and are then mapped with UFFDIO_CONTINUE). The VMM keeps the
 * socket open; its pid comes from SO_PEERCRED. Firecracker expects no reply;
 * a refused VMM is told why three ways: the log, the `refused` event, and
 * one `{"error": ...}` line on the socket before it is closed.
 *
 * The source's index is read and its structure checked once, at listen
 * (coverage, no page stored twice, region page sizes): per-VMM setup does
 * not read the file. docs/lazy-restore.md is the VMM author's view.
 */
import { Cause, Effect, Exit, Scope } from "effect"
import { readFileSync } from "node:fs"
import type { Socket } from "node:net"
import { describeError, ProtocolError } from "./Errors.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import { closeFds, type FirstMessage } from "./internal/firstMessage.js"
import { endAndClose, listenUnix, type UnixServer } from "./internal/unixServer.js"
import { type GuestRange, type ImageIndex, indexSource, type LazyRestoreStats, type RestoreSource, startLazyRestore } from "./LazyRestore.js"

const MAX_BODY = 1 << 20
const HANDSHAKE_TIMEOUT_MS = 5000
const POLL_MS = 20

export interface FirecrackerRegion {
  readonly base_host_virt_addr: number
  readonly size: number
  readonly offset: number
  readonly page_size: number
}

/** The length of a complete JSON array at the start of `b`, if there is one yet. */
const completeJson = (b: Buffer): number | undefined => {
  const text = b.toString("utf8")
  try {
    JSON.parse(text)
    return b.length
  } catch {
    return undefined
  }
}

const fail = (reason: string): never => {
  throw new ProtocolError({ reason })
}

/** Validates Firecracker's region list. */
export const parseFirecrackerBody = (text: string): Array<FirecrackerRegion> => {
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch {
    return fail("the handshake body is not valid JSON (expected an array of regions)")
  }
  if (!Array.isArray(v) || v.length === 0) return fail("the handshake body must be a non-empty JSON array of regions")
  return v.map((r: unknown, i) => {
    if (typeof r !== "object" || r === null) return fail(`region ${i} is not an object`)
    const o = r as Record<string, unknown>
    const num = (k: string) => {
      const x = o[k]
      return typeof x === "number" && Number.isSafeInteger(x) && x >= 0 ? x : fail(`region ${i}: "${k}" must be a non-negative integer`)
    }
    const pageSize = o.page_size !== undefined ? num("page_size") : o.page_size_kib !== undefined ? num("page_size_kib") : fail(`region ${i}: "page_size" (or "page_size_kib") is missing`)
    if (pageSize !== PAGE_SIZE) fail(`region ${i}: page size ${pageSize}; vmsnap serves 4096-byte pages`)
    const region = { base_host_virt_addr: num("base_host_virt_addr"), size: num("size"), offset: num("offset"), page_size: pageSize }
    if (region.size === 0 || region.size % PAGE_SIZE || region.offset % PAGE_SIZE || region.base_host_virt_addr % PAGE_SIZE)
      fail(`region ${i}: address, size and offset must be multiples of ${PAGE_SIZE}`)
    return region
  })
}

/**
 * The page size backing each region in the VMM, from /proc/PID/smaps
 * (KernelPageSize), against the one it declares: a hugetlbfs region served
 * at 4 KiB would read wrong, so it is refused. Regions whose mapping cannot
 * be read are left to the kernel (a 4 KiB UFFDIO_COPY into hugetlbfs fails
 * with EINVAL and the restorer stops, its ranges still registered).
 */
const checkBackingPageSizes = (pid: number, regions: ReadonlyArray<FirecrackerRegion>) => {
  let smaps: string
  try {
    smaps = readFileSync(`/proc/${pid}/smaps`, "utf8")
  } catch {
    return
  }
  const maps: Array<{ start: bigint; end: bigint; kib: number }> = []
  for (const line of smaps.split("\n")) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line)
    if (range) maps.push({ start: BigInt(`0x${range[1]}`), end: BigInt(`0x${range[2]}`), kib: 0 })
    const kps = /^KernelPageSize:\s+(\d+) kB/.exec(line)
    if (kps && maps.length) maps[maps.length - 1]!.kib = Number(kps[1])
  }
  regions.forEach((r, i) => {
    const at = BigInt(r.base_host_virt_addr)
    const m = maps.find((m) => m.start <= at && at < m.end)
    if (m && m.kib * 1024 !== r.page_size)
      fail(`region ${i} is backed by ${m.kib} KiB pages (hugetlbfs?) but declares ${r.page_size}-byte pages; vmsnap serves 4 KiB pages only, and serving a huge page mapping at 4 KiB would be wrong`)
  })
}

export interface ServeEvents {
  readonly log?: (line: string) => void
  /** A VMM was refused at the handshake (pid 0 when it could not be learned). */
  readonly onRefused?: (pid: number, reason: string) => void
  /** Pages of a VMM that cannot be served correctly: records that cannot be produced (poisoned or left blocked), ranges the VMM remapped. */
  readonly onPageFailure?: (pid: number, stats: LazyRestoreStats) => void
  /** A VMM's restore finished (every page resident) or failed. */
  readonly onFinished?: (pid: number, outcome: { ok: boolean; error?: string; stats: LazyRestoreStats }) => void
}

export class RestoreServer {
  private server: UnixServer | undefined
  private index: ImageIndex | undefined
  private readonly sessions = new Set<{ socket: Socket; scope: Scope.Closeable }>()

  constructor(
    readonly socketPath: string,
    readonly source: RestoreSource,
    private readonly events: ServeEvents = {}
  ) {}

  private log(line: string) {
    this.events.log?.(line)
  }

  /** Reads the source's index and checks its structure (fails with SnapshotFormatError), then listens. */
  async listen(): Promise<void> {
    this.index = await Effect.runPromise(indexSource(this.source))
    this.server = await listenUnix(this.socketPath, {
      // Firecracker sends one message and no terminator: a body that stops arriving is complete.
      firstMessage: { complete: completeJson, maxBytes: MAX_BODY, timeoutMs: HANDSHAKE_TIMEOUT_MS, idleMs: 200 },
      refuse: (cred, reason) => this.refusal(cred?.pid ?? 0, reason)
    }, (socket, cred, first) => void this.accept(socket, cred.pid, first))
  }

  async close(): Promise<void> {
    for (const s of this.sessions) await Effect.runPromise(Scope.close(s.scope, Exit.void))
    this.sessions.clear()
    await this.server?.close()
    this.server = undefined
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

  private async accept(socket: Socket, pid: number, first: FirstMessage) {
    let regions: Array<FirecrackerRegion>
    try {
      regions = parseFirecrackerBody(first.message.toString("utf8"))
      if (first.fds.length === 0) fail("the handshake carried no file descriptor: send the userfaultfd with SCM_RIGHTS")
      if (first.fds.length > 2) fail(`the handshake carried ${first.fds.length} fds: send the userfaultfd (and, for a memfd guest, its memfd)`)
      checkBackingPageSizes(pid, regions)
    } catch (e) {
      closeFds(first.fds)
      return this.refuse(socket, pid, describeError(e))
    }
    const [uffd, memfd] = first.fds as [number, number | undefined]
    const ranges: Array<GuestRange> = regions.map((r) => ({ hva: BigInt(r.base_host_virt_addr), size: r.size, imageOffset: r.offset, memfd }))
    const scope = Effect.runSync(Scope.make())
    const started = await Effect.runPromiseExit(Scope.provide(scope)(startLazyRestore(this.source, uffd, ranges, {}, this.index)))
    closeFds(first.fds) // the restorer keeps its own dups
    if (Exit.isFailure(started)) {
      await Effect.runPromise(Scope.close(scope, Exit.void))
      return this.refuse(socket, pid, describeError(Cause.squash(started.cause)))
    }
    const restore = started.value
    const session = { socket, scope }
    this.sessions.add(session)
    const total = regions.reduce((s, r) => s + r.size, 0)
    this.log(`VMM pid ${pid}: serving ${regions.length} region(s), ${total} bytes, from ${this.source.path}${memfd !== undefined ? " (memfd: pwrite + UFFDIO_CONTINUE)" : ""}`)
    let finished = false
    const end = async (why: string, ok: boolean) => {
      if (finished) return
      finished = true
      clearInterval(timer)
      const stats = restore.stats()
      this.sessions.delete(session)
      await Effect.runPromise(Scope.close(scope, Exit.void))
      this.log(`VMM pid ${pid}: ${why}`)
      this.events.onFinished?.(pid, { ok, error: ok ? undefined : why, stats })
    }
    let reported = { failed: 0, gone: 0 }
    const timer = setInterval(() => {
      const state = restore.poll()
      const s = restore.stats()
      if (s.pagesFailed > reported.failed || s.pagesGone > reported.gone) {
        reported = { failed: s.pagesFailed, gone: s.pagesGone }
        const f = s.failedRecord
        this.log(`VMM pid ${pid}: ${s.pagesFailed} page(s) cannot be produced${f ? ` (${f.records} record(s); first at byte ${f.fileOffset}: ${f.reason})` : ""}, ${s.pagesPoisoned} of them poisoned (the guest sees a memory error; the others stay blocked); ${s.pagesGone} page(s) remapped by the VMM, skipped`)
        this.events.onPageFailure?.(pid, s)
      }
      if (state === "done") {
        if (s.pagesFailed > 0) void end(`every page settled after ${s.doneMs?.toFixed(0)} ms, but ${s.pagesFailed} page(s) could not be produced and were poisoned`, false)
        else void end(`every page resident after ${s.doneMs?.toFixed(0)} ms (${s.faults} faults, ${s.pagesByFill} pages filled in the background${s.pagesGone ? `, ${s.pagesGone} remapped by the VMM and skipped` : ""})`, true)
      } else if (state !== "serving") void end(`restore failed: ${state.message}`, false)
    }, POLL_MS)
    socket.on("close", () => void end("disconnected before every page was resident; cleaned up", false))
    socket.resume()
  }
}
