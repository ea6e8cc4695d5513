/**
 * The Unix socket server the agent and `serve` share: what it does with the
 * socket path, and how it bounds peers that never finish their first message.
 */
import { execFile, execFileSync } from "node:child_process"
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from "node:fs"
import { createConnection, type Socket } from "node:net"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"
import { afterAll, describe, expect, it, vi } from "vitest"
import { loadWp } from "../src/internal/ffi.js"
import { Agent } from "../src/Agent.js"
import { listenUnix, type UnixServer, type UnixServerOptions } from "../src/internal/unixServer.js"

const dir = mkdtempSync(join(tmpdir(), "vmsnap-unixserver-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))
const badPeer = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "test", "fixtures", "bad_peer.py")
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const refusals: Array<string> = []
const options = (extra: Partial<UnixServerOptions> = {}): UnixServerOptions => ({
  firstMessage: { complete: (b) => (b.indexOf(0x0a) < 0 ? undefined : b.indexOf(0x0a) + 1), maxBytes: 1 << 20, timeoutMs: 5000 },
  refuse: (_cred, reason) => {
    refusals.push(reason)
    return reason + "\n"
  },
  ...extra
})
const serve = (path: string, extra: Partial<UnixServerOptions> = {}) => listenUnix(path, options(extra), (socket) => socket.end("hello\n"))

/** The first line the server sends on a new connection, or "closed". */
const firstLine = (path: string, send?: string) =>
  new Promise<string>((resolve, reject) => {
    const c: Socket = createConnection(path)
    let text = ""
    c.on("connect", () => send !== undefined && c.write(send))
    c.on("data", (d) => (text += d.toString()))
    c.on("close", () => resolve(text.trim() || "closed"))
    c.on("error", reject)
  })

describe("the socket path", () => {
  it("is created 0600, or as asked", async () => {
    const a = await serve(join(dir, "a.sock"))
    const b = await serve(join(dir, "b.sock"), { mode: 0o660 })
    expect(statSync(join(dir, "a.sock")).mode & 0o777).toBe(0o600)
    expect(statSync(join(dir, "b.sock")).mode & 0o777).toBe(0o660)
    await a.close()
    await b.close()
    expect(existsSync(join(dir, "a.sock"))).toBe(false)
  })

  it("a regular file there is refused and left alone", async () => {
    const path = join(dir, "file.sock")
    writeFileSync(path, "precious")
    await expect(serve(path)).rejects.toThrow(/exists and is a regular file, not a socket: refusing to replace it/)
    expect(readFileSync(path, "utf8")).toBe("precious")
  })

  it("a live socket is refused, naming the pid that listens", async () => {
    const path = join(dir, "live.sock")
    const first = await serve(path)
    await expect(serve(path)).rejects.toThrow(new RegExp(`already in use by pid ${process.pid}`))
    expect(await firstLine(path, "x\n")).toBe("hello")
    await first.close()
  })

  it("a stale socket (nobody listening) is replaced", async () => {
    const path = join(dir, "stale.sock")
    execFileSync("python3", ["-c", `import socket; s = socket.socket(socket.AF_UNIX); s.bind(${JSON.stringify(path)})`])
    expect(statSync(path).isSocket()).toBe(true)
    const server = await serve(path)
    expect(await firstLine(path, "x\n")).toBe("hello")
    await server.close()
  })

  it("closing removes only the socket this server created", async () => {
    const path = join(dir, "mine.sock")
    const first = await serve(path)
    unlinkSync(path) // someone removes it and another server starts there
    const second = await serve(path)
    await first.close()
    expect(existsSync(path)).toBe(true)
    expect(await firstLine(path, "x\n")).toBe("hello")
    await second.close()
    expect(existsSync(path)).toBe(false)
    expect(readdirSync(dir).filter((n) => n.startsWith("mine.sock"))).toEqual([])
  })
})

describe("what a refusal says", () => {
  it("a socket path in a missing directory, or under a file, names that directory", async () => {
    await expect(serve(join(dir, "missing", "a.sock"))).rejects.toThrow(new RegExp(`listen on .*: the directory ${dir}/missing does not exist`))
    writeFileSync(join(dir, "plain"), "")
    await expect(serve(join(dir, "plain", "a.sock"))).rejects.toThrow(new RegExp(`${dir}/plain is not a directory`))
  })

  it("an agent with a missing output directory says so (not a protocol error)", async () => {
    const agent = new Agent(join(dir, "noout.sock"), { outputDir: join(dir, "no-such-out") })
    await expect(agent.listen()).rejects.toThrow(new RegExp(`^open the output directory ${dir}/no-such-out: no such file or directory$`))
  })

  it("a first message with more fds than one message may carry: said as such (not an errno)", async () => {
    const path = join(dir, "manyfds.sock")
    const server = await serve(path)
    try {
      const { stdout } = await promisify(execFile)("python3", ["-c", `
import os, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
socket.send_fds(s, [b"x\\n"], [os.open("/dev/null", os.O_RDONLY) for _ in range(200)])
print(s.recv(4096).decode().strip())`, path], { encoding: "utf8" })
      expect(stdout.trim()).toMatch(/^the first message carried more file descriptors than one message may \(at most 64\); they were closed$/)
    } finally {
      await server.close()
    }
  })
})

describe("peers that never finish their first message", () => {
  let server: UnixServer | undefined
  afterAll(() => server?.close())

  it("a flood of fds is refused as soon as it passes the limit; the server does not keep them", async () => {
    const path = join(dir, "flood.sock")
    server = await serve(path)
    const before = readdirSync("/proc/self/fd").length
    const { stdout } = await promisify(execFile)("python3", [badPeer, path, "", "memfd:4096", "--flood", "40"], { encoding: "utf8" })
    const report = JSON.parse(stdout) as { sent: number; closed: boolean }
    expect(report.closed).toBe(true)
    expect(refusals.at(-1)).toMatch(/more than 64 file descriptors/)
    await sleep(50)
    expect(readdirSync("/proc/self/fd").length - before).toBeLessThan(64)
    await server.close()
    server = undefined
  })

  it("connections over the per-uid limit are refused at once, the others time out; nothing is polled meanwhile", async () => {
    const path = join(dir, "idle.sock")
    server = await serve(path, { limits: { pendingPerUid: 3 }, firstMessage: { ...options().firstMessage, timeoutMs: 1500 } })
    const recv = vi.spyOn(loadWp(), "wp_transport_recv_fds")
    const answers = Promise.all(Array.from({ length: 8 }, () => firstLine(path)))
    await sleep(700) // all 8 connected and silent
    // One recvmsg per accepted connection (nothing there yet), then nothing until a peer sends or the timeout.
    expect(recv.mock.calls.length).toBeLessThanOrEqual(3)
    const got = await answers
    recv.mockRestore()
    expect(got.filter((a) => /too many connections from uid \d+ waiting for their first message \(3\)/.test(a))).toHaveLength(5)
    expect(got.filter((a) => /no complete first message within 1500 ms/.test(a))).toHaveLength(3)
    await server.close()
    server = undefined
  })
})
