/**
 * The VMs an agent knows: for each, its VMM and device processes, and
 * whether a snapshot is running. Admitting a process applies the rules of
 * who may join what: one VMM per VM, devices only after their VMM and only
 * under the VMM's uid, regions that match the VMM's, at most
 * MAX_VM_PROCESSES per VM and `peersPerUid` connected processes per uid.
 */
import type { Socket } from "node:net"
import { checkHello } from "./AgentAdmission.js"
import { guestTooLarge } from "./GuestBound.js"
import { failProtocol as fail, type Hello, MAX_VM_PROCESSES } from "./AgentProtocol.js"
import { Peer } from "./AgentPeer.js"
import { errnoReason } from "./internal/errno.js"
import { loadWp } from "./internal/ffi.js"
import type { PeerCred } from "./internal/unixServer.js"

export interface Vm {
  readonly id: string
  vmm: Peer | undefined
  readonly devices: Set<Peer>
  busy: boolean
}

export interface VmInfo {
  readonly id: string
  readonly processes: number
  readonly sizeBytes: number
  readonly busy: boolean
}

export class VmRegistry {
  private readonly vms = new Map<string, Vm>()
  private readonly arrivals = new Set<() => void>()
  private readonly perUid = new Map<number, number>()

  constructor(private readonly peersPerUid: number, private readonly maxGuestBytes: number) {}

  get(id: string): Vm | undefined {
    return this.vms.get(id)
  }

  list(): Array<VmInfo> {
    return [...this.vms.values()].map((vm) => ({
      id: vm.id,
      processes: (vm.vmm ? 1 : 0) + vm.devices.size,
      sizeBytes: vm.vmm?.hello.regions.reduce((s, r) => s + r.size, 0) ?? 0,
      busy: vm.busy
    }))
  }

  /** Validates a hello against the VM it joins, the sender and its fds; the admitted peer. ProtocolError says why not. */
  admit(socket: Socket, hello: Hello, fds: ReadonlyArray<number>, cred: PeerCred): { vm: Vm; peer: Peer } {
    const vm = this.vms.get(hello.vm) ?? { id: hello.vm, vmm: undefined, devices: new Set<Peer>(), busy: false }
    if (hello.role === "vmm" && vm.vmm) fail(`vm "${hello.vm}" already has a VMM connected`)
    if (hello.role === "device") {
      if (!vm.vmm) return fail(`vm "${hello.vm}" has no VMM connected yet: connect the VMM first`)
      if (cred.uid !== vm.vmm.cred.uid)
        fail(`device pid ${cred.pid} runs as uid ${cred.uid}, but vm "${hello.vm}"'s VMM runs as uid ${vm.vmm.cred.uid}: a device joins only a VM of its own uid`)
      for (const r of hello.regions) {
        const match = vm.vmm.hello.regions.find((v) => v.gpa === r.gpa && v.size === r.size)
        if (!match) fail(`device region at gpa 0x${r.gpa.toString(16)} (${r.size} bytes) matches no region of the VMM`)
      }
      if (1 + vm.devices.size >= MAX_VM_PROCESSES)
        fail(`vm "${hello.vm}" already has ${1 + vm.devices.size} processes, the most one VM may have (${MAX_VM_PROCESSES}: the engine protects 16 processes, one of them the agent)`)
    }
    if (vm.busy) fail(`vm "${hello.vm}" is being snapshotted; connect when it is done`)
    const mine = this.perUid.get(cred.uid) ?? 0
    if (mine >= this.peersPerUid) fail(`uid ${cred.uid} already has ${mine} processes connected, the most this agent allows per uid`)
    if (hello.role === "vmm") {
      const tooLarge = guestTooLarge(hello.regions.reduce((n, r) => n + r.size, 0), `vm "${hello.vm}"'s guest memory (its regions together)`, "if the guest really is that large, raise the agent's bound (vmsnap agent --max-guest-size)", this.maxGuestBytes)
      if (tooLarge) fail(tooLarge)
    }
    checkHello(hello, fds, cred.pid)
    const rc: number = loadWp().wp_uffd_negotiate([fds[hello.uffd]!])
    if (rc < 0)
      fail(rc === -22 || rc === -25 ? `fd ${hello.uffd} is not a fresh userfaultfd (not a uffd, or UFFDIO_API was already issued on it)` : `userfaultfd: ${errnoReason("userfaultfd", -rc)}`)
    const peer = new Peer(socket, hello, fds, cred)
    if (hello.role === "vmm") vm.vmm = peer
    else vm.devices.add(peer)
    this.vms.set(vm.id, vm)
    this.perUid.set(cred.uid, mine + 1)
    this.arrivals.forEach((check) => check())
    return { vm, peer }
  }

  /** Forgets a process that disconnected (and its VM once empty and idle). False if it was already gone. */
  drop(vm: Vm, peer: Peer): boolean {
    if (vm.vmm !== peer && !vm.devices.has(peer)) return false
    peer.close()
    if (vm.vmm === peer) vm.vmm = undefined
    vm.devices.delete(peer)
    const left = (this.perUid.get(peer.cred.uid) ?? 1) - 1
    if (left === 0) this.perUid.delete(peer.cred.uid)
    else this.perUid.set(peer.cred.uid, left)
    this.forgetIfEmpty(vm)
    return true
  }

  forgetIfEmpty(vm: Vm) {
    if (!vm.vmm && vm.devices.size === 0 && !vm.busy) this.vms.delete(vm.id)
  }

  closeAll() {
    for (const vm of [...this.vms.values()]) {
      if (vm.vmm) this.drop(vm, vm.vmm)
      vm.devices.forEach((d) => this.drop(vm, d))
    }
    this.vms.clear()
  }

  /** Resolves once `vm` (any VM if undefined) has a VMM and at least `processes` processes. */
  waitForVm(vm: string | undefined, processes: number, signal?: AbortSignal): Promise<string> {
    return new Promise((resolve, reject) => {
      const check = () => {
        for (const v of this.vms.values()) {
          if ((vm === undefined || v.id === vm) && v.vmm && 1 + v.devices.size >= processes) {
            this.arrivals.delete(check)
            resolve(v.id)
            return
          }
        }
      }
      signal?.addEventListener("abort", () => {
        this.arrivals.delete(check)
        reject(new Error("aborted"))
      })
      this.arrivals.add(check)
      check()
    })
  }
}
