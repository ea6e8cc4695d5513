/**
 * A minimal Redis client (RESP2, https://redis.io/docs/reference/protocol-spec/)
 * for the Redis bench: one connection, commands answered in order. Replies:
 * simple strings and integers as strings, bulk strings as strings (null as
 * null), arrays as arrays, errors as rejections. Enough for PING, SET,
 * EVAL, BGSAVE and INFO; not a general client.
 */
import { connect, type Socket } from "node:net"

export type RespReply = string | null | ReadonlyArray<RespReply>

export class RespError extends Error {}

/** Encodes a command as a RESP array of bulk strings. */
export const encodeCommand = (args: ReadonlyArray<string>): Buffer =>
  Buffer.from(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`)

/** Parses one reply at `at` of `b`: [reply, next offset], or undefined when `b` holds only part of it. */
export const parseReply = (b: Buffer, at: number): [RespReply | RespError, number] | undefined => {
  const eol = b.indexOf("\r\n", at)
  if (eol < 0) return undefined
  const line = b.toString("latin1", at + 1, eol)
  switch (String.fromCharCode(b[at]!)) {
    case "+":
    case ":":
      return [line, eol + 2]
    case "-":
      return [new RespError(line), eol + 2]
    case "$": {
      const n = Number(line)
      if (n < 0) return [null, eol + 2]
      if (b.length < eol + 2 + n + 2) return undefined
      return [b.toString("utf8", eol + 2, eol + 2 + n), eol + 2 + n + 2]
    }
    case "*": {
      const n = Number(line)
      const items: Array<RespReply> = []
      let next = eol + 2
      for (let i = 0; i < n; i++) {
        const r = parseReply(b, next)
        if (!r) return undefined
        if (r[0] instanceof RespError) return [r[0], r[1]]
        items.push(r[0])
        next = r[1]
      }
      return [items, next]
    }
    default:
      throw new RespError(`not a RESP reply: ${JSON.stringify(b.toString("latin1", at, Math.min(b.length, at + 32)))}`)
  }
}

export class Resp {
  private buffer: Buffer = Buffer.alloc(0)
  private readonly pending: Array<{ resolve: (r: RespReply) => void; reject: (e: Error) => void }> = []
  private closed: Error | undefined

  private constructor(private readonly socket: Socket) {
    socket.setNoDelay(true)
    socket.on("data", (d) => this.receive(d))
    socket.on("close", () => this.fail(new RespError("Redis closed the connection")))
    socket.on("error", (e) => this.fail(new RespError(`Redis connection: ${e.message}`)))
  }

  static connect(port: number, host = "127.0.0.1"): Promise<Resp> {
    return new Promise((resolve, reject) => {
      const s = connect(port, host, () => resolve(new Resp(s)))
      s.once("error", reject)
    })
  }

  command(...args: ReadonlyArray<string>): Promise<RespReply> {
    if (this.closed) return Promise.reject(this.closed)
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject })
      this.socket.write(encodeCommand(args))
    })
  }

  /** INFO `section` as field -> value. */
  async info(section: string): Promise<Map<string, string>> {
    const text = String(await this.command("INFO", section))
    return new Map(text.split("\r\n").filter((l) => l.includes(":") && !l.startsWith("#")).map((l) => [l.slice(0, l.indexOf(":")), l.slice(l.indexOf(":") + 1)]))
  }

  close(): void {
    this.socket.destroy()
  }

  private receive(d: Buffer) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, d]) : d
    let at = 0
    for (;;) {
      const r = at < this.buffer.length ? parseReply(this.buffer, at) : undefined
      if (!r) break
      at = r[1]
      const p = this.pending.shift()
      if (r[0] instanceof RespError) p?.reject(r[0])
      else p?.resolve(r[0])
    }
    this.buffer = this.buffer.subarray(at)
  }

  private fail(e: Error) {
    this.closed ??= e
    for (const p of this.pending.splice(0)) p.reject(e)
  }
}
