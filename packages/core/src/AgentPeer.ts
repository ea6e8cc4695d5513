/**
 * One VMM or device process connected to the agent: its hello, the fds it
 * handed over, its credentials (SO_PEERCRED), and requests to it that wait
 * for an answer (`freeze` → `frozen`, `prepare` → `prepared`). A process may
 * send `bypass-writers` at any time to update what it declared at hello.
 */
import type { Socket } from "node:net"
import { type Hello, encodeMessage, parseBypassWriters } from "./AgentProtocol.js"
import { closeFds } from "./internal/firstMessage.js"
import type { PeerCred } from "./internal/unixServer.js"

interface Waiter {
  readonly type: string
  readonly resolve: (m: Record<string, unknown>) => void
  readonly reject: (e: Error) => void
}

export class Peer {
  private waiters: Array<Waiter> = []
  closed = false
  readonly lost: Promise<void>
  private markLost!: () => void
  /** Devices of this process that write guest memory without the page tables (declared by the process). */
  bypassWriters: ReadonlyArray<string>

  constructor(
    readonly socket: Socket,
    readonly hello: Hello,
    readonly fds: ReadonlyArray<number>,
    readonly cred: PeerCred
  ) {
    this.lost = new Promise((resolve) => (this.markLost = resolve))
    this.bypassWriters = hello.bypassWriters
  }

  get pid() {
    return this.cred.pid
  }

  get uffd() {
    return this.fds[this.hello.uffd]!
  }

  /** "VMM pid 1234" / "device pid 1240": how errors name this process. */
  get name() {
    return `${this.hello.role === "vmm" ? "VMM" : "device"} pid ${this.pid}`
  }

  send(m: Record<string, unknown>) {
    if (!this.closed) this.socket.write(encodeMessage(m))
  }

  /** Sends `m` and waits for a reply of type `reply` (an error on any other reply, a timeout or a disconnect). */
  request(m: Record<string, unknown>, reply: string, timeoutMs: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error(`${this.name} disconnected`))
      const waiter: Waiter = {
        type: reply,
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e))
      }
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter)
        reject(new Error(`${this.name} did not answer "${String(m.type)}" within ${timeoutMs} ms`))
      }, timeoutMs)
      this.waiters.push(waiter)
      this.send(m)
    })
  }

  /**
   * One message from the process. A reply nobody waits for (`thawed`, or one
   * that came after its timeout) is ignored; a bad `bypass-writers` throws
   * ProtocolError.
   */
  receive(m: Record<string, unknown>) {
    if (m.type === "bypass-writers") {
      this.bypassWriters = parseBypassWriters(m.writers)
      return
    }
    const w = this.waiters.shift()
    if (!w) return
    if (m.type === w.type) w.resolve(m)
    else w.reject(new Error(`${this.name} answered ${JSON.stringify(m).slice(0, 200)} instead of "${w.type}"`))
  }

  close() {
    if (this.closed) return
    this.closed = true
    for (const w of this.waiters) w.reject(new Error(`${this.name} disconnected`))
    this.waiters = []
    closeFds(this.fds)
    this.socket.destroy()
    this.markLost()
  }
}
