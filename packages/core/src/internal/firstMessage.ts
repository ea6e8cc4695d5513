/**
 * Reading the first message of a Unix-socket connection together with the
 * fds it carries (SCM_RIGHTS), with recvmsg in C: Node cannot. The socket
 * must be paused (net.Server pauseOnConnect) so libuv has read nothing yet.
 * Readiness comes from the server's epoll set (Readiness): nothing runs for a
 * connection while its peer is silent.
 * @internal
 */
import { closeSync } from "node:fs"
import { ProtocolError } from "../Errors.js"
import { errnoReason } from "./errno.js"
import { loadWp } from "./ffi.js"
import type { Readiness } from "./readiness.js"

/** Most fds one first message may carry (also what one recvmsg in C takes). */
export const MAX_FIRST_MESSAGE_FDS = 64
const EAGAIN = 11
/** What wp_transport_recv_fds returns when the fds did not fit (MSG_CTRUNC; it closed those that came). */
const EMSGSIZE = 90

export const closeFds = (fds: ReadonlyArray<number>) => {
  for (const fd of fds) {
    try {
      closeSync(fd)
    } catch {
      // already closed
    }
  }
}

export interface FirstMessageOptions {
  /** The length of a whole message at the start of `bytes`, or undefined to read on. */
  readonly complete: (bytes: Buffer) => number | undefined
  readonly maxBytes: number
  /** Whole handshake, from accept to a complete message. */
  readonly timeoutMs: number
  /** A peer that sends one message and then waits: what came is the message once it has been silent this long. */
  readonly idleMs?: number
  /** Default MAX_FIRST_MESSAGE_FDS; a peer that sends more is refused at once. */
  readonly maxFds?: number
}

export interface FirstMessage {
  readonly message: Buffer
  /** What followed the message in the same reads. */
  readonly rest: Buffer
  readonly fds: Array<number>
}

const serverStopped = () => new ProtocolError({ reason: "the server stopped before the first message was complete" })

/**
 * Reads until `complete` finds a whole message, the peer closes (undefined),
 * or a limit is hit (ProtocolError: too long, too many fds, too slow). Fds
 * received are closed on every path but success.
 */
export const receiveFirstMessage = async (
  readiness: Readiness,
  fd: number,
  options: FirstMessageOptions
): Promise<FirstMessage | undefined> => {
  const lib = loadWp()
  const maxFds = options.maxFds ?? MAX_FIRST_MESSAGE_FDS
  const buf = Buffer.alloc(64 * 1024)
  const fdBuf = new Int32Array(maxFds + 1)
  const count = new Int32Array(1)
  const fds: Array<number> = []
  const chunks: Array<Buffer> = []
  let length = 0
  let expired: "timeout" | "idle" | undefined
  const deadline = setTimeout(() => ((expired = "timeout"), readiness.forget(fd), wake?.()), options.timeoutMs)
  let idle: NodeJS.Timeout | undefined
  let wake: (() => void) | undefined
  try {
    while (true) {
      const n: number = lib.wp_transport_recv_fds([fd, buf, buf.length, Buffer.from(fdBuf.buffer), fdBuf.length, Buffer.from(count.buffer)])
      for (let i = 0; i < count[0]!; i++) fds.push(fdBuf[i]!)
      if (fds.length > maxFds) throw new ProtocolError({ reason: `the first message carried more than ${maxFds} file descriptors` })
      if (n === 0) {
        closeFds(fds)
        return undefined
      }
      if (n === -EMSGSIZE) throw new ProtocolError({ reason: `the first message carried more file descriptors than one message may (at most ${maxFds}); they were closed` })
      if (n < 0 && n !== -EAGAIN) throw new ProtocolError({ reason: `receiving the first message failed: ${errnoReason("recv", -n)}` })
      if (n > 0) {
        chunks.push(Buffer.from(buf.subarray(0, n)))
        length += n
        const all = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, length)
        chunks.length = 0
        chunks.push(all)
        const whole = options.complete(all)
        if (whole !== undefined) return { message: all.subarray(0, whole), rest: all.subarray(whole), fds }
        if (length > options.maxBytes) throw new ProtocolError({ reason: `first message longer than ${options.maxBytes} bytes` })
        if (options.idleMs !== undefined) {
          clearTimeout(idle)
          idle = setTimeout(() => ((expired = "idle"), readiness.forget(fd), wake?.()), options.idleMs)
        }
        continue
      }
      if (expired === "idle") return { message: chunks[0]!, rest: Buffer.alloc(0), fds }
      if (expired === "timeout") throw new ProtocolError({ reason: `no complete first message within ${options.timeoutMs} ms` })
      if (readiness.isClosed) throw serverStopped()
      await new Promise<void>((resolve, reject) => {
        wake = resolve
        readiness.readable(fd).then(resolve, reject)
      })
      wake = undefined
      // The server is closing: say so (the caller answers the peer with it), never read on (that said EBADF).
      if (readiness.isClosed) throw serverStopped()
    }
  } catch (e) {
    closeFds(fds)
    throw e
  } finally {
    clearTimeout(deadline)
    clearTimeout(idle)
    readiness.forget(fd)
  }
}

/** The fd of a net.Socket (a Unix socket's Pipe handle). */
export const socketFd = (socket: object): number | undefined => {
  const fd = (socket as { _handle?: { fd?: number } })._handle?.fd
  return fd !== undefined && fd >= 0 ? fd : undefined
}
