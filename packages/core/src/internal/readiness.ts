/**
 * Readiness of sockets whose bytes Node must not read itself (their first
 * message carries fds, which only recvmsg in C receives). One epoll set per
 * server and at most one blocking wait outstanding, on a thread of ffi-rs
 * (`runInNewThread`), so a pending connection costs nothing while it is
 * silent: no timer per connection, no polling. The wait is issued only while
 * some fd is watched and returns at least every WAIT_MS so close() is prompt.
 * @internal
 */
import { DataType, load } from "ffi-rs"
import { closeSync } from "node:fs"
import { errnoReason } from "./errno.js"
import { loadWp } from "./ffi.js"

const WAIT_MS = 500
const ETIMEDOUT = 110

export class Readiness {
  private readonly ep: number
  private readonly waiting = new Map<number, () => void>()
  private inFlight = false
  private closed = false

  constructor() {
    const ep: number = loadWp().wp_transport_epoll_create([])
    if (ep < 0) throw new Error(`epoll_create: ${errnoReason("epoll_create", -ep)}`)
    this.ep = ep
  }

  /** Resolves once `fd` is readable (or hung up); at most one wait per fd. */
  readable(fd: number): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error("closed"))
      const rc: number = loadWp().wp_transport_epoll_watch([this.ep, fd, 1])
      if (rc < 0) return reject(new Error(`epoll_ctl: ${errnoReason("epoll_ctl", -rc)}`))
      this.waiting.set(fd, resolve)
      this.wait()
    })
  }

  /** Stops watching `fd` (call before closing it). */
  forget(fd: number) {
    if (!this.waiting.delete(fd)) return
    loadWp().wp_transport_epoll_watch([this.ep, fd, 0])
  }

  /** Whether close() was called: a wait that returns then must not touch its fd (it is closed or about to be). */
  get isClosed(): boolean {
    return this.closed
  }

  /** Stops every wait: each pending readable() resolves at once (its caller checks isClosed), so no caller waits out its own timeout. */
  close() {
    this.closed = true
    const all = [...this.waiting]
    for (const [fd] of all) this.forget(fd)
    for (const [, resolve] of all) resolve()
    if (!this.inFlight) this.closeEpoll()
  }

  private closeEpoll() {
    closeSync(this.ep)
  }

  private wait() {
    if (this.inFlight || this.closed || this.waiting.size === 0) return
    this.inFlight = true
    const call = load({
      library: "vmsnap_wp",
      funcName: "wp_transport_epoll_wait_one",
      retType: DataType.I32,
      paramsType: [DataType.I32, DataType.I32],
      paramsValue: [this.ep, WAIT_MS],
      runInNewThread: true
    }) as unknown as Promise<number>
    void call.then((fd) => {
      this.inFlight = false
      if (this.closed) return this.closeEpoll()
      if (fd >= 0) {
        const resolve = this.waiting.get(fd)
        this.waiting.delete(fd)
        resolve?.()
      } else if (fd !== -ETIMEDOUT) {
        // epoll itself failed: wake everyone, their reads will say what is wrong.
        const all = [...this.waiting.values()]
        this.waiting.clear()
        all.forEach((r) => r())
      }
      this.wait()
    })
  }
}
