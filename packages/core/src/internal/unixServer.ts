/**
 * A Unix stream socket server whose connections start paused (so their first
 * message can be read with recvmsg for its fds), replacing a stale socket
 * file, and closing every connection when it closes.
 * @internal
 */
import { existsSync, unlinkSync } from "node:fs"
import { createServer, type Server, type Socket } from "node:net"

export interface UnixServer {
  readonly close: () => Promise<void>
}

export const listenUnix = (path: string, onConnection: (socket: Socket) => void): Promise<UnixServer> => {
  if (existsSync(path)) unlinkSync(path)
  const sockets = new Set<Socket>()
  return new Promise((resolve, reject) => {
    const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
      sockets.add(socket)
      socket.on("close", () => sockets.delete(socket))
      onConnection(socket)
    })
    server.once("error", reject)
    server.listen(path, () => {
      server.off("error", reject)
      resolve({
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy()
            server.close(() => done())
            try {
              unlinkSync(path)
            } catch {
              // already gone
            }
          })
      })
    })
  })
}
