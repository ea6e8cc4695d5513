/**
 * Reading the first message of a Unix-socket connection together with the
 * fds it carries (SCM_RIGHTS), with recvmsg in C: Node cannot. The socket
 * must be paused (net.Server pauseOnConnect) so libuv has read nothing yet.
 * @internal
 */
import { closeSync } from "node:fs"
import { ProtocolError } from "../Errors.js"
import { errnoReason } from "./errno.js"
import { loadWp } from "./ffi.js"

const MAX_FDS = 64
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

export const closeFds = (fds: ReadonlyArray<number>) => {
  for (const fd of fds) {
    try {
      closeSync(fd)
    } catch {
      // already closed
    }
  }
}

/**
 * Reads until `complete(bytes)` returns the length of a whole message (or
 * undefined to read on), or, with idleMs, until the peer has sent nothing
 * for that long after sending something. Returns the message, what followed it, and the fds;
 * undefined if the peer closed first.
 */
export const receiveFirstMessage = async (
  fd: number,
  complete: (bytes: Buffer) => number | undefined,
  options: { maxBytes: number; timeoutMs: number; idleMs?: number }
): Promise<{ message: Buffer; rest: Buffer; fds: Array<number> } | undefined> => {
  const lib = loadWp()
  const buf = Buffer.alloc(64 * 1024)
  const fdBuf = new Int32Array(MAX_FDS)
  const count = new Int32Array(1)
  const fds: Array<number> = []
  let all = Buffer.alloc(0)
  const deadline = Date.now() + options.timeoutMs
  let lastData = 0
  try {
    while (true) {
      const n: number = lib.wp_transport_recv_fds([fd, buf, buf.length, Buffer.from(fdBuf.buffer), MAX_FDS, Buffer.from(count.buffer)])
      for (let i = 0; i < count[0]!; i++) fds.push(fdBuf[i]!)
      if (n === 0) {
        closeFds(fds)
        return undefined
      }
      if (n < 0 && n !== -11) throw new ProtocolError({ reason: `receiving the first message failed: ${errnoReason("recv", -n)}` })
      if (n > 0) {
        all = Buffer.concat([all, buf.subarray(0, n)])
        lastData = Date.now()
        const length = complete(all)
        if (length !== undefined) return { message: all.subarray(0, length), rest: all.subarray(length), fds }
        if (all.length > options.maxBytes) throw new ProtocolError({ reason: `first message longer than ${options.maxBytes} bytes` })
        continue
      }
      // A peer that sends one message and then waits: what came is the message.
      if (options.idleMs !== undefined && all.length > 0 && Date.now() - lastData > options.idleMs)
        return { message: all, rest: Buffer.alloc(0), fds }
      if (Date.now() > deadline) throw new ProtocolError({ reason: `no complete first message within ${options.timeoutMs} ms` })
      await sleep(2)
    }
  } catch (e) {
    closeFds(fds)
    throw e
  }
}

/** The fd of a net.Socket (a Unix socket's Pipe handle). */
export const socketFd = (socket: object): number | undefined => {
  const fd = (socket as { _handle?: { fd?: number } })._handle?.fd
  return fd !== undefined && fd >= 0 ? fd : undefined
}
