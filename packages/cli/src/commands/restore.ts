/** `vmsnap restore FILE --raw OUT`: a raw memory image (sparse), one file or one per region. */
import { formatBytes, restoreToRawFile, type RawLayout } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const restoreCommand = (io: Io, flags: CommonFlags & { file: string; raw: string; layout: RawLayout }) => {
  const bar = progressBar(io, "restore", !flags.json)
  return runCommand(io, flags, restoreToRawFile(flags.file, flags.raw, flags.layout, (done, total) => bar.update(done * 4096, total * 4096)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `restored ${r.pages} pages (${formatBytes(r.pages * 4096)}) of ${r.path} into ${r.outputs.join(", ")}`
    }
  })
}
