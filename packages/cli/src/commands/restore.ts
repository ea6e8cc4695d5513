/** `vmsnap restore FILE --raw OUT`: a raw memory image (sparse), one file or one per region. */
import { formatBytes, PAGE_SIZE, restoreToRawFile, type RawLayout } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const restoreCommand = (io: Io, flags: CommonFlags & { file: string; raw: string; layout: RawLayout }) => {
  const bar = progressBar(io, "restore", !flags.json)
  return runCommand(io, flags, restoreToRawFile(flags.file, flags.raw, flags.layout, (done, total) => bar.update(done * PAGE_SIZE, total * PAGE_SIZE)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `restored ${r.pages} pages (${formatBytes(r.pages * PAGE_SIZE)}) of ${r.path} into ${r.outputs.join(", ")}`
    }
  })
}
