// Prints the plain closing line CI reads ("N passed, N failed, N skipped"):
// vitest's JSON report plus the C tests, which ran before it (make check
// writes each one's outcome to packages/wp-native/build/check-results).
import { existsSync, readFileSync } from "node:fs"

const report = JSON.parse(readFileSync(process.argv[2], "utf8"))
const checkResults = new URL("../packages/wp-native/build/check-results", import.meta.url)
const native = existsSync(checkResults) ? readFileSync(checkResults, "utf8").split("\n").filter(Boolean) : []
if (native.length === 0) {
  console.error("no C test outcomes in packages/wp-native/build/check-results: did make check run?")
  process.exit(1)
}
const count = (outcome) => native.filter((line) => line.endsWith(` ${outcome}`)).length
const passed = report.numPassedTests + count("passed")
const failed = report.numFailedTests + count("failed")
const skipped = report.numPendingTests + report.numTodoTests + count("skipped")
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exit(failed > 0 ? 1 : 0)
