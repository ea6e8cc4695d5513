/**
 * How much CPU the machine left idle lately, in cores: what `--compression
 * auto` may spend on lz4 without taking it from the guest (SnapshotWriter.ts).
 * From the first line of /proc/stat (idle + iowait over all jiffies), over the
 * last period of at least PERIOD_MS.
 * @internal
 */
import { availableParallelism } from "node:os"
import { readFileSync } from "node:fs"

const PERIOD_MS = 100

interface Jiffies {
  readonly idle: number
  readonly total: number
}

const read = (): Jiffies | undefined => {
  try {
    const fields = readFileSync("/proc/stat", "latin1").split("\n", 1)[0]!.trim().split(/\s+/).slice(1).map(Number)
    return { idle: (fields[3] ?? 0) + (fields[4] ?? 0), total: fields.reduce((a, b) => a + b, 0) }
  } catch {
    return undefined
  }
}

export class IdleCpu {
  private last = read()
  private lastAt = performance.now()
  private idle = 0
  private readonly cpus = availableParallelism()

  /** Idle cores over the last period (0 until one period has passed, or without /proc/stat). */
  cores(): number {
    const now = performance.now()
    if (now - this.lastAt < PERIOD_MS) return this.idle
    const cur = read()
    if (cur && this.last && cur.total > this.last.total) this.idle = ((cur.idle - this.last.idle) / (cur.total - this.last.total)) * this.cpus
    this.last = cur
    this.lastAt = now
    return this.idle
  }
}
