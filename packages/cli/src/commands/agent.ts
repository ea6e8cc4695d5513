/** `vmsnap agent --listen SOCK`: serve VMMs until SIGINT/SIGTERM. */
import { agentScoped } from "@vmsnap/core"
import { Effect } from "effect"
import type { Io } from "../Io.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const runAgent = (io: Io, flags: CommonFlags & { listen: string }) =>
  runCommand(
    io,
    flags,
    Effect.scoped(
      Effect.gen(function* () {
        yield* agentScoped(flags.listen, {
          log: (line) => (flags.json ? io.stdout(JSON.stringify({ type: "log", time: new Date().toISOString(), message: line }) + "\n") : io.stderr(`vmsnap agent: ${line}\n`))
        })
        if (!flags.json) io.stderr(`vmsnap agent: listening on ${flags.listen} (Ctrl-C to stop)\n`)
        return yield* Effect.never
      })
    ),
    () => ({ human: "", json: {} })
  )

export const agentCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "agent",
    describe: "serve VMMs on a Unix socket: they hand over their userfaultfd and guest memory, and snapshots are taken on request",
    builder: (y) =>
      y
        .option("listen", { type: "string", demandOption: true, describe: "Unix socket path to listen on" })
        .example("$0 agent --listen /run/vmsnap.sock", "then start VMMs with that socket, and ask: vmsnap snapshot --agent /run/vmsnap.sock --vm ID -o FILE"),
    handler: (a) => {
      if (a.listen.trim() === "") throw new UsageError("--listen: give a socket path")
      schedule(() => runAgent(io, { ...commonFlags(a), listen: a.listen }))
    }
  })
