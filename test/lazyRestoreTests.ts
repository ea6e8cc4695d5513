/**
 * What the lazy restore tests share: the Firecracker-style peer
 * (fixtures/firecracker_peer.py), a RestoreServer that records what it
 * tells the world, and a 16 MiB snapshot of the demo guest in two regions
 * (split at 8 MiB) with its raw image.
 */
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { join } from "node:path"
import { promisify } from "node:util"
import { gpa, type HandshakeTimes, hva, type LazyRestoreStats, restoreToRawFile, RestoreServer, takeSnapshot, WpNative } from "../packages/core/src/index.js"
import { DemoGuest } from "../packages/rig/src/index.js"

const execFileAsync = promisify(execFile)
/** The Firecracker-style VMM the tests run (its usage: its docstring). */
export const peerScript = join(import.meta.dirname, "fixtures", "firecracker_peer.py")
export const MiB = 1024 * 1024
/** Bytes of twoRegionSnapshot's guest. */
export const SIZE = 16 * MiB
/** The vmsnap CLI, built. */
export const cli = join(import.meta.dirname, "..", "packages", "cli", "dist", "bin.js")

/** Runs the peer; its output, or how it failed (exit code and output) as text to match against. */
export const peer = (sock: string, ...args: Array<string>): Promise<string> =>
  // The timeout only ends a peer that hangs (a fault nobody answers), so a failing test leaves nothing running.
  execFileAsync("python3", [peerScript, sock, ...args], { encoding: "utf8", maxBuffer: 1 << 20, timeout: 90000, killSignal: "SIGKILL" }).then(
    (r) => r.stdout.trim(),
    (e) => `peer exited ${e.code}: ${String(e.stdout).trim()} ${String(e.stderr).trim()}`
  )

export interface Finished {
  readonly ok: boolean
  readonly error?: string
  readonly stats: LazyRestoreStats
  readonly handshake: HandshakeTimes
}

/** A server listening on DIR/NAME.sock serving `path` (a raw memory image with `raw`), with every event it reports. */
export const serving = async (dir: string, name: string, path: string, raw = false) => {
  const events = { failures: [] as Array<LazyRestoreStats>, refused: [] as Array<string>, log: [] as Array<string>, finished: [] as Array<Finished>, firstPage: [] as Array<HandshakeTimes> }
  const sock = join(dir, `${name}.sock`)
  const server = new RestoreServer(sock, { path, raw }, {
    log: (l) => events.log.push(l),
    onRefused: (_pid, reason) => events.refused.push(reason),
    onPageFailure: (_pid, s) => events.failures.push(s),
    onFirstPage: (_pid, t) => events.firstPage.push(t),
    onFinished: (_pid, o) => events.finished.push(o)
  })
  await server.listen()
  /** The finished event after the first `before` (a VMM may still be disconnecting when its peer has printed); a bound of 10 s ends the wait. */
  const nextFinished = async (before: number): Promise<Finished | undefined> => {
    for (let i = 0; i < 500 && events.finished.length <= before; i++) await new Promise((r) => setTimeout(r, 20))
    return events.finished[before]
  }
  return { sock, server, events, nextFinished }
}

/** A 16 MiB demo guest, 3/4 of its pages filled from `seed`, snapshotted as two 8 MiB regions into `path`; its raw image into `image`. */
export const twoRegionSnapshot = (path: string, image: string, seed: number): Promise<void> =>
  Effect.runPromise(
    Effect.provide(
      Effect.scoped(
        Effect.gen(function* () {
          const guest = yield* DemoGuest.make(SIZE, "anon")
          guest.fill(0, (guest.pages * 3) / 4, seed)
          const half = SIZE / 2
          const regions = [0, 1].map((i) => ({ guestBase: gpa(i * 0x100000000), hostBase: hva(guest.region.hostBase + BigInt(i * half)), size: half, kind: "anon" as const }))
          yield* takeSnapshot({ regions, path, poolPages: 64, compression: "lz4" }) // lz4 records whatever the CPU load ("auto" writes raw on a busy machine)
          yield* restoreToRawFile(path, image)
        })
      ),
      WpNative.layer
    )
  )
