/**
 * A one-line progress bar on a terminal: bytes done / total, rate, ETA.
 * Drawn at most every 100 ms; nothing at all when stderr is not a TTY or
 * with --json.
 */
import { formatBytes } from "@vmsnap/core"
import type { Io } from "./Io.js"

export interface Progress {
  readonly update: (doneBytes: number, totalBytes: number) => void
  readonly done: () => void
}

export const noProgress: Progress = { update: () => {}, done: () => {} }

export const progressBar = (io: Io, label: string, enabled: boolean): Progress => {
  if (!enabled || !io.isTTY) return noProgress
  // The clock starts at the first update: setup before the work is not its rate.
  let start = 0
  let last = 0
  let drawn = false
  return {
    update: (done, total) => {
      const now = performance.now()
      if (start === 0) start = now
      if (now - last < 100 && done < total) return
      last = now
      const secs = (now - start) / 1000
      const rate = secs > 0 ? done / secs : 0
      const eta = rate > 0 ? (total - done) / rate : 0
      const width = 24
      const fill = total > 0 ? Math.round((done / total) * width) : 0
      const bar = "#".repeat(fill) + "-".repeat(width - fill)
      io.stderr(`\r${label} [${bar}] ${formatBytes(done)} / ${formatBytes(total)}  ${formatBytes(rate)}/s  ETA ${eta.toFixed(1)}s   `)
      drawn = true
    },
    done: () => {
      if (drawn) io.stderr("\r\x1b[2K")
    }
  }
}
