// Prints the plain closing line CI reads ("N passed, N failed, N skipped"),
// from vitest's JSON report plus the C engine test, which ran before it.
import { readFileSync } from "node:fs"

const report = JSON.parse(readFileSync(process.argv[2], "utf8"))
const passed = report.numPassedTests + 1 // + packages/wp-native's test_engine (make check)
const failed = report.numFailedTests
const skipped = report.numPendingTests + report.numTodoTests
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exit(failed > 0 ? 1 : 0)
