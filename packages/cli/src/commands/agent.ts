/** `vmsnap agent --listen SOCK`: serve VMMs until SIGINT/SIGTERM. */
import { agentScoped } from "@vmsnap/core"
import { Effect } from "effect"
import type { Io } from "../Io.js"
import { type CommonFlags, runCommand } from "../Run.js"

export const agentCommand = (io: Io, flags: CommonFlags & { listen: string }) =>
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
