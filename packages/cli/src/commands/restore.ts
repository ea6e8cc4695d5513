/** `vmsnap restore FILE --raw OUT`: a raw memory image (sparse), one file or one per region. */
import { formatBytes, PAGE_SIZE, restoreToRawFile, type RawLayout } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const runRestore = (io: Io, flags: CommonFlags & { file: string; raw: string; layout: RawLayout }) => {
  const bar = progressBar(io, "restore", !flags.json)
  return runCommand(io, flags, restoreToRawFile(flags.file, flags.raw, flags.layout, (done, total) => bar.update(done * PAGE_SIZE, total * PAGE_SIZE)), (r) => {
    bar.done()
    return {
      json: { ok: true, ...r },
      human: `restored ${r.pages} pages (${formatBytes(r.pages * PAGE_SIZE)}) of ${r.path} into ${r.outputs.join(", ")}`
    }
  })
}

export const restoreCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "restore <file>",
    describe: "restore a snapshot into a raw memory image (zero pages stay sparse holes)",
    builder: (y) =>
      y
        .positional("file", { type: "string", demandOption: true, describe: "snapshot file" })
        .option("raw", { type: "string", demandOption: true, describe: "raw image to write" })
        .option("layout", {
          choices: ["concat", "per-region"] as const,
          default: "concat" as const,
          describe: "concat: region i at the sum of the sizes before it in one file; per-region: OUT.0, OUT.1, ..."
        })
        .example("$0 restore guest.vmsnap --raw guest.img", "")
        .example("$0 restore guest.vmsnap --raw guest.img --layout per-region", "writes guest.img.0, guest.img.1, ..."),
    handler: (a) => {
      if (a.raw.trim() === "") throw new UsageError("--raw: give a file path")
      schedule(() => runRestore(io, { ...commonFlags(a), file: a.file, raw: a.raw, layout: a.layout as RawLayout }))
    }
  })
