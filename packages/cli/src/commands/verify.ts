/** `vmsnap verify FILE`: structure, every checksum, every page covered once. */
import { formatBytes, PAGE_SIZE, verifySnapshot } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const verifyCommand = (io: Io, flags: CommonFlags & { file: string }) => {
  const bar = progressBar(io, "verify", !flags.json)
  return runCommand(io, flags, verifySnapshot(flags.file, (done, total) => bar.update(done * PAGE_SIZE, total * PAGE_SIZE)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `${r.path}: OK: ${r.pages} pages (${r.dataPages} data, ${r.zeroPages} zero) in ${r.records} records, ${formatBytes(r.fileBytes)}, every checksum matches`
    }
  })
}
