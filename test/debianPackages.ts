/**
 * Real software for the tests that need it (QEMU, Redis): Debian packages,
 * installed with apt-get only when a test asks for one and its program is
 * missing. Returns undefined when the program is there, else why a test
 * must skip (not root, no apt-get, the install failed).
 */
import { spawnSync } from "node:child_process"

const onPath = (program: string) => spawnSync("sh", ["-c", `command -v ${program}`], { stdio: "ignore" }).status === 0

/** Makes `program` available by installing Debian package `pkg` if needed; a skip reason when it cannot. */
export const ensureDebianPackage = (pkg: string, program: string): string | undefined => {
  if (onPath(program)) return undefined
  if (process.getuid?.() !== 0) return `${program} is not installed and installing ${pkg} needs root`
  if (!onPath("apt-get")) return `${program} is not installed and there is no apt-get to install ${pkg}`
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" }
  const install = () => spawnSync("apt-get", ["install", "-y", "--no-install-recommends", pkg], { env, encoding: "utf8", timeout: 900_000 })
  let r = install()
  if (r.status !== 0) {
    spawnSync("apt-get", ["update"], { env, stdio: "ignore", timeout: 300_000 })
    r = install()
  }
  if (r.status !== 0 || !onPath(program)) return `could not install ${pkg} with apt-get: ${(r.stderr || r.error?.message || "").trim().split("\n").slice(-2).join(" ")}`
  return undefined
}
