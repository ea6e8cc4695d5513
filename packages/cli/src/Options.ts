/**
 * Options and checks shared by several commands, declared once: --json and
 * --verbose (every command), size parsing, the copy pool (--buffer) and the
 * fault-around window. A bad value throws `UsageError`, which `main` turns
 * into exit code 2 and one line.
 */
import { type Compression, COMPRESSIONS, DEFAULT_FAULT_AROUND_PAGES, formatBytes, PAGE_SIZE, parseSize } from "@vmsnap/core"
import type { Argv } from "yargs"
import type { CommonFlags } from "./Run.js"

/** Bad command-line input: exit 2, one line, no stack trace. */
export class UsageError extends Error {}

/** The options every command takes (declared once on the top-level parser). */
export interface GlobalArgs {
  readonly json: boolean
  readonly verbose: boolean
}

export const globalOptions = <T>(y: Argv<T>) =>
  y
    .option("json", { type: "boolean", default: false, describe: "print one JSON object on stdout and nothing else there" })
    .option("verbose", { type: "boolean", default: false, describe: "print stack traces on errors" })

/** The common flags of parsed arguments. */
export const commonFlags = (a: { json?: boolean; verbose?: boolean }): CommonFlags => ({ json: a.json === true, verbose: a.verbose === true })

/**
 * A size in bytes from "4096", "256MiB", "1GiB"...; at least `min` bytes and
 * a multiple of 4 KiB. `name` is the option, for the message.
 */
export const sizeOption = (name: string, value: unknown, min: number): number => {
  const bytes = parseSize(String(value))
  if (bytes === undefined) throw new UsageError(`--${name} ${String(value)}: not a size (examples: 4096, 256MiB, 1GiB)`)
  if (bytes < min) throw new UsageError(`--${name} ${String(value)}: must be at least ${formatBytes(min)}`)
  if (bytes % PAGE_SIZE !== 0) throw new UsageError(`--${name} ${String(value)}: must be a multiple of 4 KiB`)
  return bytes
}

/** --buffer, the copy pool: a size, default 64 MiB, or 0 for the synchronous mode. */
export const bufferOption = (describe: string) => ({ type: "string", default: "64MiB", describe }) as const

/** --buffer's value in pages (0: synchronous). */
export const poolPagesOption = (value: unknown): number => (String(value).trim() === "0" ? 0 : sizeOption("buffer", value, PAGE_SIZE) / PAGE_SIZE)

/** --compression: how records are stored (SnapshotWriter.ts's Compression), default auto. */
export const compressionOptionSpec = {
  choices: COMPRESSIONS,
  default: "auto" as Compression,
  describe: "how records are stored: auto compresses with lz4 only with CPU nobody else wants (an idle-priority thread, or the writer while the guest takes no write fault) and otherwise writes raw records, so the capture never waits for compression nor takes a vCPU's core (a busy guest gets bigger files); lz4 compresses every record (the capture waits for it when it falls behind); none writes raw pages"
} as const

/** --fault-around: pages saved with each faulting page, default the engine's (DEFAULT_FAULT_AROUND_PAGES). */
export const faultAroundOptionSpec = (describe: string) => ({ type: "number", default: DEFAULT_FAULT_AROUND_PAGES, describe }) as const

/** --fault-around's value: a power of two from 1 to 512. */
export const faultAroundOption = (value: number): number => {
  if (!Number.isInteger(value) || value < 1 || value > 512 || (value & (value - 1)) !== 0)
    throw new UsageError(`--fault-around ${value}: must be a power of two from 1 to 512`)
  return value
}

/** --stall-timeout: seconds the output may take nothing before a snapshot is abandoned (default 10). */
export const stallTimeoutOptionSpec = (describe: string) => ({ type: "number", default: 10, describe }) as const

/** --stall-timeout's value in ms: seconds, more than 0 and at most a day. */
export const stallTimeoutOption = (value: number): number => {
  if (!(value > 0 && value <= 86400)) throw new UsageError(`--stall-timeout ${value}: must be seconds, more than 0 and at most 86400`)
  return value * 1000
}

/** --max-guest-size: the most guest memory one snapshot write-protects (GuestBound.ts); default this machine's memory. */
export const maxGuestSizeOptionSpec = (describe: string) => ({ type: "string", describe }) as const

/** --max-guest-size's value in bytes, or undefined for the default. */
export const maxGuestSizeOption = (value: unknown): number | undefined => (value === undefined ? undefined : sizeOption("max-guest-size", value, PAGE_SIZE))
