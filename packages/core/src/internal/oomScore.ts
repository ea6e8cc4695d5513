/**
 * Keeping the OOM killer off vmsnap for a short window.
 * @internal
 */
import { readFileSync, writeFileSync } from "node:fs"

/**
 * Runs f with this process out of the OOM killer's reach (oom_score_adj
 * -1000; root only, best effort). The system call run inside the target is
 * the one window where vmsnap's death harms it: until vi_take_uffd returns,
 * a thread's registers (and maybe two bytes of its code) are vmsnap's, and a
 * SIGKILL then leaves them so (break7 H1; docs/pid-snapshot.md).
 */
export const outOfOomReach = <A>(f: () => A): A => {
  const path = "/proc/self/oom_score_adj"
  let before: string | undefined
  try {
    before = readFileSync(path, "utf8")
    writeFileSync(path, "-1000")
  } catch {
    before = undefined
  }
  try {
    return f()
  } finally {
    if (before !== undefined)
      try {
        writeFileSync(path, before)
      } catch {
        // left at -1000 until this process exits
      }
  }
}
