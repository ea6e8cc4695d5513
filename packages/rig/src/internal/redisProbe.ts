/**
 * The Redis bench's latency probe, run as its own process (`node
 * redisProbe.js PORT KEYSPACE VALUE_BYTES OUT`) so that what vmsnap does in
 * the bench's process cannot delay it: one connection sending one SET of a
 * random key at a time (the same command as the load), timing each with
 * CLOCK_MONOTONIC; every 100 ms an `INFO stats` instead, recording Redis's
 * `total_commands_processed` (the server's throughput, load included).
 * On SIGTERM it writes OUT: JSON `{ "latency": base64 of Float64Array
 * [sendNs, latencyNs, ...], "commands": [[ns, total], ...] }` and exits.
 * @internal
 */
import { writeFileSync } from "node:fs"
import { Resp } from "../Resp.js"

const [port, keyspace, valueBytes, out] = process.argv.slice(2)
const nowNs = () => Number(process.hrtime.bigint())
let samples = new Float64Array(1 << 20)
let count = 0
const commands: Array<[number, number]> = []
let stopping = false

const record = (sendNs: number, latencyNs: number) => {
  if (count * 2 + 2 > samples.length) {
    const bigger = new Float64Array(samples.length * 2)
    bigger.set(samples)
    samples = bigger
  }
  samples[count * 2] = sendNs
  samples[count * 2 + 1] = latencyNs
  count++
}

const finish = () => {
  writeFileSync(out!, JSON.stringify({ latency: Buffer.from(samples.buffer, 0, count * 16).toString("base64"), commands }), { mode: 0o600 })
  process.exit(0)
}
process.on("SIGTERM", () => (stopping = true))

const main = async () => {
  const redis = await Resp.connect(Number(port))
  const value = "x".repeat(Number(valueBytes))
  const space = Number(keyspace)
  let nextInfo = 0
  process.stdout.write("ready\n")
  while (!stopping) {
    const t = nowNs()
    if (t >= nextInfo) {
      const total = Number((await redis.info("stats")).get("total_commands_processed") ?? 0)
      commands.push([(t + nowNs()) / 2, total])
      nextInfo = t + 100e6
      continue
    }
    await redis.command("SET", `key:${String(Math.floor(Math.random() * space)).padStart(12, "0")}`, value)
    record(t, nowNs() - t)
  }
  redis.close()
  finish()
}
main().catch((e) => {
  process.stderr.write(`redis probe: ${e instanceof Error ? e.message : String(e)}\n`)
  process.exit(1)
})
