/** `vmsnap verify FILE`: structure, every checksum, every page covered once. */
import { formatBytes, verifySnapshot } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const verifyCommand = (io: Io, flags: CommonFlags & { file: string }) => {
  const bar = progressBar(io, "verify", !flags.json)
  return runCommand(io, flags, verifySnapshot(flags.file, (done, total) => bar.update(done * 4096, total * 4096)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `${r.path}: OK: ${r.pages} pages (${r.dataPages} data, ${r.zeroPages} zero) in ${r.records} records, ${formatBytes(r.fileBytes)}, every checksum matches`
    }
  })
}
