/**
 * Asking a running agent for work: a snapshot of a connected VM, or the list
 * of VMs. Plain Unix-socket JSON lines; no fds travel this way.
 */
import { Effect } from "effect"
import { createConnection } from "node:net"
import { encodeMessage, LineReader, parseMessage } from "./AgentProtocol.js"
import { CapabilityError, InvalidInput, ProtocolError, SnapshotIoError } from "./Errors.js"
import type { SnapshotResult } from "./SnapshotSession.js"
import type { Compression } from "./SnapshotWriter.js"

/** What the agent reports of a snapshot: the session's result, with the fault count for the engine counters. */
export type AgentSnapshotResult = Omit<SnapshotResult, "engine"> & { readonly faults: number }

/** What asking the agent can fail with. */
export type AgentRequestError = ProtocolError | SnapshotIoError | InvalidInput | CapabilityError

/**
 * The agent's refusal as the error it was there (its `tag`, agent-protocol.md), so the requester's exit code
 * says the same: a bad request (InvalidInput) is a usage error, a missing kernel capability (CapabilityError) is
 * "unsupported"; anything else, or a tag this version does not know, is a ProtocolError. The reason keeps
 * "the agent refused:" in front: the cause is on the agent's machine.
 */
const agentError = (m: Record<string, unknown>): InvalidInput | CapabilityError | ProtocolError => {
  const reason = `the agent refused: ${String(m.message)}`
  switch (m.tag) {
    case "InvalidInput":
      return new InvalidInput({ reason })
    case "CapabilityError":
      return new CapabilityError({ missing: "a capability on the agent's machine", reason })
    default:
      return new ProtocolError({ reason })
  }
}

/** Sends one request and collects lines until the agent closes the connection. */
const exchange = (socketPath: string, request: Record<string, unknown>, onLine: (m: Record<string, unknown>) => void) =>
  Effect.callback<Record<string, unknown>, AgentRequestError>((resume, signal) => {
    const socket = createConnection(socketPath)
    const lines = new LineReader()
    let final: Record<string, unknown> | undefined
    signal.addEventListener("abort", () => socket.destroy())
    socket.on("connect", () => socket.write(encodeMessage(request)))
    socket.on("data", (chunk) => {
      try {
        for (const line of lines.push(chunk)) {
          const m = parseMessage(line)
          if (m.type === "progress") onLine(m)
          else final = m
        }
      } catch (e) {
        socket.destroy()
        resume(Effect.fail(e as ProtocolError))
      }
    })
    socket.on("error", (e: NodeJS.ErrnoException) =>
      resume(Effect.fail(new SnapshotIoError({ path: socketPath, op: "connect to agent", code: e.code ?? "EIO", reason: e.code === "ENOENT" || e.code === "ECONNREFUSED" ? "no agent is listening there: start one with `vmsnap agent --listen SOCK --output-dir DIR`" : e.message })))
    )
    socket.on("close", () => {
      if (!final) return resume(Effect.fail(new ProtocolError({ reason: "the agent closed the connection without an answer" })))
      if (final.type === "error") return resume(Effect.fail(agentError(final)))
      resume(Effect.succeed(final))
    })
  })

/**
 * Asks the agent at `socketPath` for a live snapshot of `vm` into `path`: a
 * path inside the agent's output directory (relative paths resolve there,
 * not in this process's working directory).
 */
export const requestSnapshot = (
  socketPath: string,
  request: { vm: string; path: string; poolPages?: number; faultAroundPages?: number; compression?: Compression },
  onProgress?: (savedBytes: number, totalBytes: number) => void
): Effect.Effect<AgentSnapshotResult, AgentRequestError> =>
  Effect.map(
    exchange(socketPath, { type: "snapshot", ...request }, (m) => onProgress?.(Number(m.savedBytes), Number(m.totalBytes))),
    (m) => m as unknown as AgentSnapshotResult
  )

export const listVms = (socketPath: string) =>
  Effect.map(exchange(socketPath, { type: "list" }, () => {}), (m) => (m.vms ?? []) as Array<{ id: string; processes: number; sizeBytes: number; busy: boolean }>)
