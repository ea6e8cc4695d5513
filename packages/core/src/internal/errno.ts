/**
 * The only place an errno becomes words. Linux x86-64 numbers.
 * @internal
 */
const names: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 4: "EINTR", 5: "EIO", 9: "EBADF", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
  14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL",
  24: "EMFILE", 61: "ENODATA", 6: "ENXIO", 27: "EFBIG", 28: "ENOSPC", 30: "EROFS", 38: "ENOSYS", 95: "EOPNOTSUPP", 110: "ETIMEDOUT",
  7: "E2BIG", 122: "EDQUOT", 116: "ESTALE", 32: "EPIPE"
}

export const errnoName = (errno: number): string => names[errno] ?? `errno ${errno}`

/** What an errno means for a given operation, with the fix where there is one. */
export const errnoReason = (op: string, errno: number): string => {
  switch (errno) {
    case 1:
    case 13:
      if (op === "userfaultfd")
        return "userfaultfd is not permitted for this user: run as root (CAP_SYS_PTRACE), or set `sysctl vm.unprivileged_userfaultfd=1`, or grant read/write access to /dev/userfaultfd (e.g. `chmod 0666 /dev/userfaultfd` or a udev rule)"
      return "permission denied"
    case 38:
      return "the kernel was built without userfaultfd (CONFIG_USERFAULTFD): use a kernel with it enabled"
    case 95:
      return op === "register"
        ? "this memory cannot be write-protected by vmsnap: a mapping userfaultfd cannot protect, or one with a page size vmsnap does not know (read from the mapping, whatever was declared; supported: anonymous, THP, memfd/shmem, hugetlbfs with 2 MiB or 1 GiB pages)"
        : "the kernel lacks a userfaultfd feature vmsnap needs (write-protect of unpopulated pages, Linux 6.4+)"
    case 12:
      return "out of memory"
    case 22:
      return op === "register"
        ? "invalid argument: addresses and sizes must be 4 KiB aligned, and multiples of the memory's huge page size for hugetlbfs (2 MiB or 1 GiB; read from the mapping), the same in every process mapping the region"
        : "invalid argument (addresses and sizes must be 4 KiB aligned)"
    case 17:
      return "regions overlap"
    case 16:
      return op === "register"
        ? "this memory is already registered with another userfaultfd (EBUSY): e.g. a lazy restore still serving it, or another snapshot of it in progress; wait until that one ends"
        : "the engine is already running"
    case 14:
      return op === "register" ? "nothing is mapped at that host address (the region names memory its process does not map)" : "bad address (EFAULT)"
    case 10:
      return op === "snapshot"
        ? "it forked during the snapshot while it maps shared guest memory (a memfd, shmem, hugetlbfs): the child's mapping is not write-protected, so its writes would be saved after the cut; fork before or after a snapshot, or leave that memory out"
        : "no child processes (ECHILD)"
    case 61:
      return "the guest discarded memory (MADV_DONTNEED or MADV_REMOVE, e.g. a balloon) before it was saved: its content at the cut is gone; hold discards from arming until the snapshot ends"
    case 5:
      return op === "snapshot" ? "guest memory could not be read: its file is shorter than the region (it shrank, or it is not the guest's memory)" : "I/O error"
    case 116:
      return op === "snapshot"
        ? "the memory's file (memfd, shmem, hugetlbfs) was changed through the file during the snapshot: a hole punched (fallocate, MADV_REMOVE), a truncate or a write(2) takes no write fault, so its content at the cut cannot be known; hold such changes from arming until the snapshot ends"
        : "stale file handle (ESTALE)"
    case 110:
      return "timed out"
    case 3:
      return "the process is gone (ESRCH): it exited or was killed"
    case 28:
      return "no space left on the device"
    default:
      return errnoName(errno)
  }
}
