/**
 * `vmsnap agent --listen SOCK --output-dir DIR`: serve VMMs until
 * SIGINT/SIGTERM. Who may connect and ask is docs/security.md.
 */
import { agentScoped } from "@vmsnap/core"
import { Effect } from "effect"
import { readFileSync } from "node:fs"
import type { Io } from "../Io.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags, maxGuestSizeOption, maxGuestSizeOptionSpec, stallTimeoutOption, stallTimeoutOptionSpec, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export interface AgentFlags extends CommonFlags {
  readonly listen: string
  readonly outputDir: string
  readonly allowUids: ReadonlyArray<number>
  readonly allowGroups: ReadonlyArray<number>
  readonly socketMode: number | undefined
  readonly socketGroup: number | undefined
  readonly mode: number | undefined
  /** Fail a snapshot when its output takes nothing for this long (ms). */
  readonly stallMs: number
  /** The most guest memory one VM may declare (bytes); undefined: this machine's memory. */
  readonly maxGuestBytes: number | undefined
}

export const runAgent = (io: Io, flags: AgentFlags) =>
  runCommand(
    io,
    flags,
    Effect.scoped(
      Effect.gen(function* () {
        yield* agentScoped(flags.listen, {
          log: (line) => (flags.json ? io.stdout(JSON.stringify({ type: "log", time: new Date().toISOString(), message: line }) + "\n") : io.stderr(`vmsnap agent: ${line}\n`)),
          outputDir: flags.outputDir,
          allowUids: flags.allowUids,
          allowGroups: flags.allowGroups,
          socketMode: flags.socketMode,
          socketGroup: flags.socketGroup,
          fileMode: flags.mode,
          limits: { stallTimeoutMs: flags.stallMs, maxGuestBytes: flags.maxGuestBytes }
        })
        if (!flags.json) io.stderr(`vmsnap agent: listening on ${flags.listen}, writing snapshots under ${flags.outputDir} (Ctrl-C to stop)\n`)
        return yield* Effect.never
      })
    ),
    () => ({ human: "", json: {} })
  )

/** An octal file mode such as 0600 or 660. */
export const fileModeOption = (name: string, value: unknown): number | undefined => {
  if (value === undefined) return undefined
  const s = String(value)
  if (!/^0?[0-7]{3}$/.test(s)) throw new UsageError(`--${name} ${s}: give an octal mode such as 0600 or 0660`)
  return parseInt(s, 8)
}

/** A uid: a number or a name from /etc/passwd. */
const idOf = (name: string, file: "/etc/passwd" | "/etc/group", value: unknown): number => {
  const s = String(value)
  if (/^\d+$/.test(s)) return Number(s)
  let table = ""
  try {
    table = readFileSync(file, "utf8")
  } catch {
    // no such file: names cannot be resolved
  }
  const line = table.split("\n").find((l) => l.split(":")[0] === s)
  if (!line) throw new UsageError(`--${name} ${s}: no such ${file === "/etc/passwd" ? "user" : "group"} (give a name from ${file} or a number)`)
  return Number(line.split(":")[2])
}

const list = (v: unknown): Array<unknown> => (v === undefined ? [] : Array.isArray(v) ? v : [v])

export const agentCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "agent",
    describe: "serve VMMs on a Unix socket: they hand over their userfaultfd and guest memory, and snapshots are taken on request",
    builder: (y) =>
      y
        .option("listen", { type: "string", demandOption: true, describe: "Unix socket path to listen on (created 0600)" })
        .option("output-dir", { type: "string", demandOption: true, describe: "the only directory requested snapshots are written under" })
        .option("allow-uid", { type: "string", array: true, describe: "also let this user (name or uid) ask for snapshots and the list (repeatable)" })
        .option("allow-group", { type: "string", array: true, describe: "also let members of this group ask (repeatable)" })
        .option("socket-mode", { type: "string", describe: "mode of the socket file, e.g. 0660 (default 0600: only this user connects)" })
        .option("socket-group", { type: "string", describe: "group of the socket file (with --socket-mode 0660: that group's VMMs may connect)" })
        .option("mode", { type: "string", describe: "mode of snapshot files written on request (default 0600)" })
        .option("max-guest-size", maxGuestSizeOptionSpec("the most guest memory one VM may declare at hello, e.g. 64GiB (default: this machine's memory): write-protecting memory takes page tables and state in proportion to its declared size, so a VMM declaring terabytes of sparse memory is refused instead of exhausting the host"))
        .option("stall-timeout", stallTimeoutOptionSpec("seconds a snapshot's file may take nothing (a hung disk or file system) before that snapshot is abandoned, its guest released and the requester told why"))
        .example("$0 agent --listen /run/vmsnap.sock --output-dir /var/lib/vmsnap", "then start VMMs with that socket, and ask: vmsnap snapshot --agent /run/vmsnap.sock --vm ID -o web-1.vmsnap")
        .example("$0 agent --listen /run/vmsnap.sock --output-dir /srv/snap --socket-mode 0660 --socket-group kvm --allow-group kvm", "VMMs and operators of group kvm may connect and ask"),
    handler: (a) => {
      if (a.listen.trim() === "") throw new UsageError("--listen: give a socket path")
      if (a.outputDir.trim() === "") throw new UsageError("--output-dir: give a directory")
      const flags: AgentFlags = {
        ...commonFlags(a),
        listen: a.listen,
        outputDir: a.outputDir,
        allowUids: list(a.allowUid).map((v) => idOf("allow-uid", "/etc/passwd", v)),
        allowGroups: list(a.allowGroup).map((v) => idOf("allow-group", "/etc/group", v)),
        socketMode: fileModeOption("socket-mode", a.socketMode),
        socketGroup: a.socketGroup === undefined ? undefined : idOf("socket-group", "/etc/group", a.socketGroup),
        mode: fileModeOption("mode", a.mode),
        stallMs: stallTimeoutOption(a.stallTimeout),
        maxGuestBytes: maxGuestSizeOption(a.maxGuestSize)
      }
      schedule(() => runAgent(io, flags))
    }
  })
