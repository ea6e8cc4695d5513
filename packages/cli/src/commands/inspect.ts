/**
 * `vmsnap inspect FILE`: header, regions, page counts, compression ratio.
 * It reads the header, the index and each record's header (and the block
 * table of encoding-3 records), not the pages
 * (instant on any size, like `qemu-img info`): a file whose page data is
 * corrupt inspects fine, and says so (`payloadsChecked: false`); `verify`
 * reads every payload and checksum and exits 3 on a corrupt one.
 */
import { formatBytes, inspectSnapshot } from "@vmsnap/core"
import type { Io } from "../Io.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const runInspect = (io: Io, flags: CommonFlags & { file: string }) =>
  runCommand(io, flags, inspectSnapshot(flags.file), (r) => ({
    json: { ok: true, ...r, payloadsChecked: false },
    human: [
      `${r.path}: vmsnap snapshot v${r.version}`,
      `  id          ${r.snapshotId}${r.parentId ? ` (parent ${r.parentId})` : ""}`,
      `  created     ${r.createdAt}`,
      `  file        ${formatBytes(r.fileBytes)} in ${r.records} records, compression ${r.compressionRatio.toFixed(2)}x`,
      `  pages       ${r.dataPages} data, ${r.zeroPages} zero`,
      `  records     ${r.encodings.pages.records} pages, ${r.encodings.zero} zero${r.encodings.lz4 + r.encodings.raw ? `, ${r.encodings.lz4} lz4, ${r.encodings.raw} raw (format 1)` : ""}`,
      `  page blocks ${r.encodings.pages.lz4} lz4, ${r.encodings.pages.raw} raw, ${r.encodings.pages.zero} zero (in pages records)`,
      ...r.regions.map(
        (g, i) => `  region ${i}    guest ${g.guestBase}  ${formatBytes(g.sizeBytes)}  ${g.kind}${g.pageSize !== 4096 ? ` (${formatBytes(g.pageSize)} pages)` : ""}  ${g.dataPages} data / ${g.zeroPages} zero pages${g.mapping ? `  ${g.mapping.permissions} ${g.mapping.name || "(anonymous)"}` : ""}`
      ),
      `  checked     header, index and record headers only; page data not read: \`vmsnap verify ${r.path}\` checks every checksum`
    ].join("\n")
  }))

export const inspectCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "inspect <file>",
    describe: "show a snapshot's header, regions, page counts and compression ratio (reads no page data: `verify` checks it)",
    builder: (y) => y.positional("file", { type: "string", demandOption: true, describe: "snapshot file" }).example("$0 inspect guest.vmsnap --json", ""),
    handler: (a) => schedule(() => runInspect(io, { ...commonFlags(a), file: a.file }))
  })
