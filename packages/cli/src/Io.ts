/**
 * Where a command writes. `--json` output goes to stdout and nothing else
 * does; people read stderr. Tests pass an in-memory Io.
 */
export interface Io {
  readonly stdout: (text: string) => void
  readonly stderr: (text: string) => void
  /** stderr is a terminal: progress bars are drawn only then. */
  readonly isTTY: boolean
}

export const processIo: Io = {
  stdout: (t) => void process.stdout.write(t),
  stderr: (t) => void process.stderr.write(t),
  isTTY: process.stderr.isTTY === true
}

/** Collects output in memory. */
export const memoryIo = (isTTY = false) => {
  const out: Array<string> = []
  const err: Array<string> = []
  return {
    io: { stdout: (t: string) => void out.push(t), stderr: (t: string) => void err.push(t), isTTY } satisfies Io,
    stdout: () => out.join(""),
    stderr: () => err.join("")
  }
}
