/**
 * The engine's failures. Each carries a `reason` a person can act on; exit
 * codes are decided once, at the CLI edge.
 */
import { Data } from "effect"

/** A native call failed: `op` is what was attempted, `errno` the kernel's answer. */
export class NativeError extends Data.TaggedError("NativeError")<{
  readonly op: string
  readonly errno: number
  readonly reason: string
}> {
  override get message() {
    return `${this.op}: ${this.reason}`
  }
}

/** The kernel lacks a capability vmsnap needs. */
export class CapabilityError extends Data.TaggedError("CapabilityError")<{
  readonly missing: string
  readonly reason: string
}> {
  override get message() {
    return `missing ${this.missing}: ${this.reason}`
  }
}

export type SnapshotFormatReason =
  | "BadMagic"
  | "UnsupportedVersion"
  | "Truncated"
  | "ChecksumMismatch"
  | "BadRecord"
  | "BadIndex"
  | "BadRegion"
  | "Coverage"

/** A snapshot file is not a valid vmsnap file (corrupt, truncated, or not ours). */
export class SnapshotFormatError extends Data.TaggedError("SnapshotFormatError")<{
  readonly path: string
  readonly kind: SnapshotFormatReason
  readonly reason: string
  readonly fileOffset?: number
}> {
  override get message() {
    const at = this.fileOffset === undefined ? "" : ` (at byte ${this.fileOffset})`
    return `${this.path}: not a valid snapshot: ${this.reason}${at}`
  }
}

/** Reading or writing a file failed (ENOSPC, EACCES, EISDIR, ...). */
export class SnapshotIoError extends Data.TaggedError("SnapshotIoError")<{
  readonly path: string
  readonly op: string
  readonly code: string
  readonly reason: string
}> {
  override get message() {
    return `${this.op} ${this.path}: ${this.reason}`
  }
}

/** The caller's options make no sense (bad size, empty region list, ...). */
export class InvalidInput extends Data.TaggedError("InvalidInput")<{
  readonly reason: string
}> {
  override get message() {
    return this.reason
  }
}

/** An agent peer broke the protocol, or an agent request could not be served. */
export class ProtocolError extends Data.TaggedError("ProtocolError")<{ readonly reason: string }> {
  override get message() {
    return `protocol error: ${this.reason}`
  }
}

/** What went wrong, for a peer or a log line: a protocol error's reason, else the error's message. */
export const describeError = (e: unknown): string =>
  e instanceof ProtocolError ? e.reason : e instanceof Error ? e.message : String(e)

export type VmsnapError = NativeError | CapabilityError | SnapshotFormatError | SnapshotIoError | InvalidInput | ProtocolError

const ioReasons: Record<string, string> = {
  ENOSPC: "no space left on the device: free space or choose another output directory",
  EDQUOT: "disk quota exceeded: free space or choose another output directory",
  EACCES: "permission denied: choose a path you may write, or fix its permissions",
  EPERM: "operation not permitted: choose a path you may write",
  EISDIR: "is a directory: give a file path",
  ENOENT: "no such file or directory",
  ENOTDIR: "a component of the path is not a directory",
  EROFS: "read-only file system: choose another output directory",
  EIO: "input/output error from the device",
  EPIPE: "the reader of the output closed it (broken pipe): the snapshot cannot be completed there",
  EFBIG: "file too large: over the file system's size limit or this process's (ulimit -f)",
  EAGAIN: "the output would block (a non-blocking file that is not a stream): give a regular file or -o -"
}

/** Wraps a Node fs error into a SnapshotIoError with a reason that says what to do. */
export const ioError = (path: string, op: string, cause: unknown): SnapshotIoError => {
  const code = typeof cause === "object" && cause !== null && "code" in cause ? String((cause as { code: unknown }).code) : "EUNKNOWN"
  const reason = ioReasons[code] ?? (cause instanceof Error ? cause.message : String(cause))
  return new SnapshotIoError({ path, op, code, reason })
}
