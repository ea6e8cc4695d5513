/** `vmsnap verify FILE`: structure, every checksum, every page covered once. */
import { formatBytes, PAGE_SIZE, verifySnapshot } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const runVerify = (io: Io, flags: CommonFlags & { file: string }) => {
  const bar = progressBar(io, "verify", !flags.json)
  return runCommand(io, flags, verifySnapshot(flags.file, (done, total) => bar.update(done * PAGE_SIZE, total * PAGE_SIZE)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `${r.path}: OK: ${r.pages} pages (${r.dataPages} data, ${r.zeroPages} zero) in ${r.records} records, ${formatBytes(r.fileBytes)}, every checksum matches`
    }
  })
}

export const verifyCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "verify <file>",
    describe: "check a snapshot's structure and every checksum, and that every page is stored exactly once",
    builder: (y) => y.positional("file", { type: "string", demandOption: true, describe: "snapshot file" }).example("$0 verify guest.vmsnap", ""),
    handler: (a) => schedule(() => runVerify(io, { ...commonFlags(a), file: a.file }))
  })
