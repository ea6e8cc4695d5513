/**
 * SIGINT and SIGTERM from the moment the process starts. Node and vmsnap's
 * modules take a moment to load (over a second on a busy machine), and a
 * signal before a command had installed its handlers killed the process
 * with no word, not even --json's one object (break8 L1). bin.ts listens
 * here first and loads everything else after; runCommand takes over and
 * starts already stopped if a signal came meanwhile. No imports: this
 * module must load at once.
 */
type StopSignal = "SIGINT" | "SIGTERM"

let first: StopSignal | undefined
const onSigint = () => void (first ??= "SIGINT")
const onSigterm = () => void (first ??= "SIGTERM")

/** From now on, remember the first SIGINT or SIGTERM instead of dying of it. */
export const listenEarly = (): void => {
  process.on("SIGINT", onSigint)
  process.on("SIGTERM", onSigterm)
}

/** Stops listening; returns the signal that came meanwhile, if any. */
export const takeEarlySignal = (): StopSignal | undefined => {
  process.off("SIGINT", onSigint)
  process.off("SIGTERM", onSigterm)
  return first
}
