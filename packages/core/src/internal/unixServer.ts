/**
 * The Unix stream socket server shared by the agent and `serve`:
 *
 * - the socket path: a path that is not a socket is refused (never deleted),
 *   a socket another server is listening on is refused ("already in use by
 *   pid N"), a stale socket (nobody listening) is replaced; the socket is
 *   created 0600 (umask 0177 around bind) and then widened only as asked
 *   (mode, group); on close it is removed only if it is still the one this
 *   server created (same device and inode);
 * - every peer's credentials (SO_PEERCRED, at connect time) are taken before
 *   anything else;
 * - first messages (with their SCM_RIGHTS fds) are read without polling and
 *   bounded: bytes, fds, a handshake timeout, and connections still waiting
 *   for their first message per uid and in total (beyond either, the new
 *   connection is refused at once);
 * - a refused connection is answered and its fd closed (endAndClose): a
 *   paused socket never reads its peer's end, so `end()` alone kept it open;
 *   closing the server refuses (answers) those still sending their first
 *   message the same way, and cuts the others.
 * @internal
 */
import { randomBytes } from "node:crypto"
import { chmodSync, chownSync, linkSync, lstatSync, type Stats, statSync, unlinkSync } from "node:fs"
import { createConnection, createServer, type Server, type Socket } from "node:net"
import { dirname } from "node:path"
import { describeFileType } from "../AtomicFile.js"
import { describeError, SnapshotIoError } from "../Errors.js"
import { closeFds, type FirstMessage, type FirstMessageOptions, receiveFirstMessage, socketFd } from "./firstMessage.js"
import { loadWp } from "./ffi.js"
import { Readiness } from "./readiness.js"

/** Who is at the other end of a connection (SO_PEERCRED / SO_PEERGROUPS, at connect time). */
export interface PeerCred {
  readonly pid: number
  readonly uid: number
  readonly gid: number
  /** Supplementary groups (empty when the kernel cannot say). */
  readonly groups: ReadonlyArray<number>
}

export interface HandshakeLimits {
  /** Connections waiting for their first message, per uid. Default 16. */
  readonly pendingPerUid?: number
  /** Connections waiting for their first message, in total. Default 64. */
  readonly pendingTotal?: number
}

export interface UnixServerOptions {
  /** File mode of the socket (connecting needs write permission). Default 0o600. */
  readonly mode?: number
  /** Group of the socket (with a mode that lets the group in). */
  readonly group?: number
  readonly firstMessage: FirstMessageOptions
  readonly limits?: HandshakeLimits
  /** The answer (one line, with its newline) to a peer that is refused (bad or slow first message, over a limit); the server then closes it. */
  readonly refuse: (cred: PeerCred | undefined, reason: string) => string
}

export interface UnixServer {
  readonly close: () => Promise<void>
}

/** How long a closing connection waits for its peer to take the last answer before it is closed anyway. */
const LINGER_MS = 5000
const DEFAULT_PENDING_PER_UID = 16
const DEFAULT_PENDING_TOTAL = 64
const MAX_GROUPS = 64

/**
 * Sends `last` (if any) and closes the connection: its fd is released as soon
 * as the bytes are written, or after LINGER_MS when the peer does not read
 * them; what the peer sent and was not read is discarded. Every refusal and
 * every final answer ends this way: `socket.end()` alone waits for the
 * peer's end, which a paused socket never reads, so the fd stayed open.
 */
export const endAndClose = (socket: Socket, last?: string | Buffer): void => {
  if (socket.destroyed) return
  const timer = setTimeout(() => socket.destroy(), LINGER_MS)
  timer.unref()
  socket.once("close", () => clearTimeout(timer))
  socket.end(last ?? "", () => socket.destroy())
}

/** The peer's credentials, or undefined when the socket is already gone. */
export const peerCred = (fd: number): PeerCred | undefined => {
  const out = new Uint32Array(3 + MAX_GROUPS)
  const n: number = loadWp().wp_transport_peer_cred([fd, Buffer.from(out.buffer), out.length])
  if (n < 3) return undefined
  return { pid: out[0]!, uid: out[1]!, gid: out[2]!, groups: [...out.subarray(3, n)] }
}

/** Who listens on the socket at `path`: their pid, or undefined when nobody does (stale). */
const listenerOf = (path: string): Promise<number | undefined> =>
  new Promise((resolve, reject) => {
    const probe = createConnection(path)
    probe.once("connect", () => {
      const fd = socketFd(probe)
      const cred = fd === undefined ? undefined : peerCred(fd)
      probe.destroy()
      resolve(cred?.pid ?? 0)
    })
    probe.once("error", (e: NodeJS.ErrnoException) => (e.code === "ECONNREFUSED" ? resolve(undefined) : reject(e)))
  })

/** Makes `path` free for a new socket: refuses what is not a stale socket, and says which directory is missing or not one. */
const claimPath = async (path: string) => {
  const dir = dirname(path)
  const parent = statSync(dir, { throwIfNoEntry: false })
  if (!parent) throw new SnapshotIoError({ path, op: "listen on", code: "ENOENT", reason: `the directory ${dir} does not exist: create it or choose another socket path` })
  if (!parent.isDirectory()) throw new SnapshotIoError({ path, op: "listen on", code: "ENOTDIR", reason: `${dir} is not a directory` })
  let st: Stats
  try {
    st = lstatSync(path)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return
    throw e
  }
  if (!st.isSocket()) throw new Error(`${path} exists and is ${describeFileType(st)}, not a socket: refusing to replace it (remove it or choose another path)`)
  const pid = await listenerOf(path)
  if (pid !== undefined) throw new Error(`${path} is already in use${pid > 0 ? ` by pid ${pid}` : ""}: stop that server or choose another path`)
  unlinkSync(path) // stale: nobody listens
}

/**
 * Binds under a temporary name with umask 0177 (so the socket is never, even
 * briefly, wider than 0600), then links it to `path`, which fails rather than
 * replaces if something appeared there meanwhile. libuv unlinks the name it
 * bound when the server closes: that is the temporary name, already gone.
 */
const bind = async (server: Server, path: string): Promise<void> => {
  const tmp = `${path}~${randomBytes(3).toString("hex")}`
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject)
    const old = process.umask(0o177)
    try {
      server.listen(tmp, () => {
        server.off("error", reject)
        resolve()
      })
    } finally {
      process.umask(old)
    }
  })
  try {
    linkSync(tmp, path)
  } catch (e) {
    server.close()
    throw (e as NodeJS.ErrnoException).code === "EEXIST" ? new Error(`${path} appeared while binding: another server started there`) : e
  } finally {
    try {
      unlinkSync(tmp)
    } catch {
      // gone
    }
  }
}

export const listenUnix = async (
  path: string,
  options: UnixServerOptions,
  onFirstMessage: (socket: Socket, cred: PeerCred, first: FirstMessage) => void
): Promise<UnixServer> => {
  await claimPath(path)
  const perUid = options.limits?.pendingPerUid ?? DEFAULT_PENDING_PER_UID
  const total = options.limits?.pendingTotal ?? DEFAULT_PENDING_TOTAL
  const readiness = new Readiness()
  const sockets = new Set<Socket>()
  /** Connections still waiting for their first message: at close they are refused (answered), not cut off. */
  const handshaking = new Set<Socket>()
  const pending = new Map<number, number>()
  let pendingTotal = 0
  const refuse = (socket: Socket, cred: PeerCred | undefined, reason: string) => endAndClose(socket, options.refuse(cred, reason))

  const handshake = async (socket: Socket, fd: number, cred: PeerCred) => {
    let first: FirstMessage | undefined
    try {
      first = await receiveFirstMessage(readiness, fd, options.firstMessage)
    } catch (e) {
      return refuse(socket, cred, describeError(e))
    }
    if (!first) return void socket.destroy()
    if (socket.destroyed) return closeFds(first.fds)
    onFirstMessage(socket, cred, first)
  }

  const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
    sockets.add(socket)
    socket.on("close", () => sockets.delete(socket))
    socket.on("error", () => undefined)
    const fd = socketFd(socket)
    const cred = fd === undefined ? undefined : peerCred(fd)
    if (fd === undefined || !cred) return void socket.destroy()
    const mine = pending.get(cred.uid) ?? 0
    if (mine >= perUid || pendingTotal >= total)
      return refuse(socket, cred, mine >= perUid
        ? `too many connections from uid ${cred.uid} waiting for their first message (${mine}): send it, or try again later`
        : `too many connections waiting for their first message (${pendingTotal}): try again later`)
    pending.set(cred.uid, mine + 1)
    pendingTotal++
    handshaking.add(socket)
    void handshake(socket, fd, cred).finally(() => {
      handshaking.delete(socket)
      pendingTotal--
      const left = (pending.get(cred.uid) ?? 1) - 1
      if (left === 0) pending.delete(cred.uid)
      else pending.set(cred.uid, left)
    })
  })
  try {
    await bind(server, path)
  } catch (e) {
    readiness.close()
    throw e
  }
  const mine = lstatSync(path)
  try {
    if (options.group !== undefined) chownSync(path, -1, options.group)
    if ((options.mode ?? 0o600) !== 0o600) chmodSync(path, options.mode!)
  } catch (e) {
    server.close()
    readiness.close()
    unlinkSync(path)
    throw new Error(`cannot set the socket's ${options.group !== undefined ? "group or " : ""}mode: ${(e as Error).message}`)
  }
  return {
    close: () =>
      new Promise<void>((done) => {
        // A connection still sending its first message is refused like any other ("the server stopped before
        // the first message was complete", written on it, then closed: readiness.close() wakes its handshake);
        // destroying it first, as before, closed it with no answer. The others (served, or answered) are cut.
        for (const s of sockets) if (!handshaking.has(s)) s.destroy()
        readiness.close()
        server.close(() => done()) // once every connection is closed, the refused ones after their answer
        // Only the socket this server created: another may have replaced it.
        try {
          const now = lstatSync(path)
          if (now.dev === mine.dev && now.ino === mine.ino) unlinkSync(path)
        } catch {
          // already gone
        }
      })
  }
}
