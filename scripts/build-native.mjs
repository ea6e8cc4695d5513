// Builds a package's C code (`make all` in it) at install time, with a clear
// message when the C toolchain or the kernel headers are missing.
// Usage (from a package's install script):
//   node ../../scripts/build-native.mjs "<what>" [debian-package:header ...]
// Each debian-package:header pair is a library the C code links: when the
// header is missing, the package is installed with apt-get (as root), else
// the build stops naming the package to install.
import { spawnSync } from "node:child_process"
import { existsSync } from "node:fs"

// pnpm runs install scripts in the package's directory.
const root = process.cwd()
const what = process.argv[2] ?? "the native code"
const libraries = process.argv.slice(3).map((pair) => pair.split(":"))
const cc = process.env.CC ?? "cc"

const fail = (problem, fix) => {
  console.error(`vmsnap: cannot build ${what}: ${problem}\n  fix: ${fix}`)
  process.exit(1)
}

if (process.platform !== "linux") fail(`userfaultfd needs Linux, this is ${process.platform}`, "run vmsnap on Linux 6.4 or newer")
if (spawnSync(cc, ["--version"], { stdio: "ignore" }).status !== 0)
  fail(`no C compiler (${cc}) on PATH`, "install one, e.g. `apt-get install gcc make` (or set CC)")
if (spawnSync("make", ["--version"], { stdio: "ignore" }).status !== 0)
  fail("no `make` on PATH", "install it, e.g. `apt-get install make`")
if (!existsSync("/usr/include/linux/userfaultfd.h"))
  fail("the Linux uapi headers are missing (linux/userfaultfd.h)", "install them, e.g. `apt-get install linux-libc-dev`")

for (const [pkg, header] of libraries) {
  if (existsSync(header)) continue
  const fix = `install it: \`apt-get install ${pkg}\``
  if (process.getuid?.() !== 0 || spawnSync("sh", ["-c", "command -v apt-get"], { stdio: "ignore" }).status !== 0)
    fail(`${header} is missing (Debian package ${pkg})`, fix)
  console.error(`vmsnap: installing ${pkg} (${header} is missing) with apt-get`)
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" }
  const install = () => spawnSync("apt-get", ["install", "-y", "--no-install-recommends", pkg], { env, stdio: ["ignore", "ignore", "inherit"] })
  if (install().status !== 0) {
    spawnSync("apt-get", ["update"], { env, stdio: "ignore" })
    install()
  }
  if (!existsSync(header)) fail(`${header} is missing and apt-get could not install ${pkg} (above)`, fix)
}

const r = spawnSync("make", ["--no-print-directory", "-C", root, "all"], { stdio: "inherit", env: { ...process.env, CC: cc } })
if (r.status !== 0) fail("the C compiler reported errors (above)", "report a bug with the compiler output")
