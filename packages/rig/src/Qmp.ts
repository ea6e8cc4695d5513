/**
 * A minimal client of QEMU's machine protocol (QMP, docs/interop/qmp-spec in
 * QEMU): one JSON object per line on a Unix socket; a greeting, then
 * `qmp_capabilities`, then commands answered in order with `{"return": ...}`
 * or `{"error": {"class", "desc"}}`, with asynchronous `{"event": ...}`
 * objects in between. The bench uses it to drive QEMU's own snapshots
 * (`migrate` with and without the `background-snapshot` capability).
 */
import { connect, type Socket } from "node:net"

export class QmpError extends Error {}

interface Pending {
  readonly resolve: (value: unknown) => void
  readonly reject: (error: Error) => void
  readonly command: string
}

export class Qmp {
  private buffer = ""
  private readonly pending: Array<Pending> = []
  private closed: Error | undefined
  private greeted!: () => void
  private readonly greeting = new Promise<void>((resolve) => (this.greeted = resolve))
  /** Events received so far (`event` name and its `data`), in order. */
  readonly events: Array<{ readonly event: string; readonly data: unknown }> = []

  private constructor(private readonly socket: Socket) {
    socket.on("data", (d) => this.receive(d.toString("utf8")))
    socket.on("close", () => this.fail(new QmpError("QEMU closed its QMP socket")))
    socket.on("error", (e) => this.fail(new QmpError(`QMP socket: ${e.message}`)))
  }

  /** Connects to `path`, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(path: string): Promise<Qmp> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path, () => resolve(s))
      s.once("error", reject)
    })
    const qmp = new Qmp(socket)
    await qmp.greeting
    await qmp.execute("qmp_capabilities")
    return qmp
  }

  /** Runs one command; resolves with its `return` value, rejects with QEMU's error description. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed)
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject, command })
      this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + "\n")
    })
  }

  close(): void {
    this.socket.destroy()
  }

  private receive(text: string) {
    this.buffer += text
    let nl: number
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim()
      this.buffer = this.buffer.slice(nl + 1)
      if (line) this.message(JSON.parse(line) as Record<string, unknown>)
    }
  }

  private message(m: Record<string, unknown>) {
    if ("QMP" in m) return this.greeted()
    if ("event" in m) return void this.events.push({ event: String(m.event), data: m.data })
    const p = this.pending.shift()
    if (!p) return
    if ("error" in m) {
      const e = m.error as { class?: string; desc?: string }
      p.reject(new QmpError(`QMP ${p.command}: ${e.desc ?? "error"} (${e.class ?? "?"})`))
    } else p.resolve(m.return)
  }

  private fail(e: Error) {
    this.closed ??= e
    for (const p of this.pending.splice(0)) p.reject(e)
  }
}
