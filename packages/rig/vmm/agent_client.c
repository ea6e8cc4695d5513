/* The toy VMM as a vmsnap agent client (docs/agent-protocol.md): hello with
 * its uffd and memory, then prepare/freeze/thaw/done from the agent; the
 * device process, which joins the same VM; and, with --balloon, a balloon
 * that discards guest pages except from prepare to done/failed. */
#include "toyvmm.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void send_hello(int sock)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        die("userfaultfd");
    char body[1024];
    int fds[2] = {uffd, vmm.memfd};
    int nfds = vmm.anon ? 1 : 2;
    int n = snprintf(body, sizeof body,
                     "{\"type\":\"hello\",\"version\":1,\"vm\":\"%s\",\"role\":\"%s\",\"pid\":%d,\"uffd\":0,\"prepare\":%s,"
                     "\"regions\":[{\"gpa\":\"0x0\",\"size\":%llu,\"pageSize\":%u,\"fd\":%s,\"offset\":0,"
                     "\"hva\":\"0x%llx\"}]}\n",
                     vmm.vm_id, vmm.is_device ? "device" : "vmm", getpid(), vmm.balloon && !vmm.is_device ? "true" : "false",
                     (unsigned long long)vmm.mem_size, vmm.hugetlb ? 2u << 20 : 4096u,
                     vmm.anon ? "null" : "1", (unsigned long long)(uintptr_t)vmm.mem);
    if (send_with_fds(sock, body, (size_t)n, fds, nfds) < 0)
        die("send hello");
    /* The agent now holds the only reference: if it dies, the uffd is
     * released, which removes all protection and wakes every vCPU. */
    close(uffd);
}

static void send_line(int sock, const char *line)
{
    size_t len = strlen(line);
    if (send(sock, line, len, MSG_NOSIGNAL) != (ssize_t)len)
        fprintf(stderr, "toyvmm: agent connection lost while replying\n");
}

static void take_reference(void)
{
    int fd = open(vmm.reference, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("open reference");
    for (uint64_t off = 0; off < vmm.mem_size;) {
        ssize_t w = pwrite(fd, vmm.mem + off, vmm.mem_size - off > (64 << 20) ? (64 << 20) : vmm.mem_size - off, (off_t)off);
        if (w <= 0)
            die("write reference");
        off += (uint64_t)w;
    }
    close(fd);
}

static bool has_type(const char *line, const char *type)
{
    char want[64];
    snprintf(want, sizeof want, "\"type\":\"%s\"", type);
    return strstr(line, want) != NULL;
}

static void spawn_device(int vmm_sock);

/* The balloon: a page of guest memory (past the system area) discarded every
 * 200 us, as a guest giving memory back would: MADV_DONTNEED on anonymous
 * memory, MADV_REMOVE on the memfd. balloon_lock is held around each
 * discard, so once prepare has set balloon_held under it no discard is in
 * flight and none starts until done/failed clears it. */
static pthread_mutex_t balloon_lock = PTHREAD_MUTEX_INITIALIZER;
static bool balloon_held;
static _Atomic bool balloon_stop;

static void *balloon_main(void *arg)
{
    (void)arg;
    uint64_t x = 0x9e3779b97f4a7c15ull, pages = (vmm.mem_size - SYSTEM_AREA) / PAGE;
    while (!atomic_load(&balloon_stop)) {
        pthread_mutex_lock(&balloon_lock);
        if (!balloon_held) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            if (madvise(vmm.mem + SYSTEM_AREA + (x % pages) * PAGE, PAGE, vmm.anon ? MADV_DONTNEED : MADV_REMOVE) == 0)
                atomic_fetch_add(&vmm.balloon_discards, 1);
        }
        pthread_mutex_unlock(&balloon_lock);
        usleep(200);
    }
    return NULL;
}

static void hold_balloon(bool hold)
{
    pthread_mutex_lock(&balloon_lock);
    balloon_held = hold;
    pthread_mutex_unlock(&balloon_lock);
}

/* --alias-at-thaw, a misbehaving VMM: once thawed after the cut, it maps its
 * guest memfd a second time (not write-protected: the agent was never told
 * of it) and writes a byte of every page past the system area through it. */
static void write_through_alias(void)
{
    if (vmm.memfd < 0)
        return;
    uint8_t *again = mmap(NULL, vmm.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, vmm.memfd, 0);
    if (again == MAP_FAILED)
        die("mmap alias");
    for (uint64_t o = SYSTEM_AREA; o < vmm.mem_size; o += PAGE)
        again[o + 1] ^= 0xA5;
    vmm.alias_at_thaw = false; /* once; the mapping stays */
}

/* --fork-at-thaw, a misbehaving VMM: once thawed after the cut, it forks a
 * child, which writes a byte of every page past the system area through
 * its copy of the guest mapping (shared memory: the same pages) and exits. */
static void write_from_child(void)
{
    vmm.fork_at_thaw = false; /* once */
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        for (uint64_t o = SYSTEM_AREA; o < vmm.mem_size; o += PAGE)
            vmm.mem[o + 2] ^= 0x5A;
        _exit(0);
    }
    waitpid(child, NULL, 0);
}

/* Serve the agent's messages until it goes away or we are told to stop. */
static void agent_loop(int sock)
{
    char buf[65536];
    size_t used = 0;
    uint64_t deadline = vmm.run_ms ? now_ns() + vmm.run_ms * 1000000ull : 0;
    while (!atomic_load(&vmm.stopping)) {
        if (deadline && now_ns() > deadline)
            break;
        maybe_progress();
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        if (poll(&pfd, 1, 20) <= 0)
            continue;
        ssize_t n = recv(sock, buf + used, sizeof buf - used - 1, 0);
        if (n <= 0) {
            fprintf(stderr, "toyvmm: agent connection closed; guest keeps running\n");
            break;
        }
        used += (size_t)n;
        buf[used] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            if (has_type(line, "welcome")) {
                announce_ready();
                if (vmm.device && vmm.device_pid == 0)
                    spawn_device(sock);
            } else if (has_type(line, "prepare")) {
                hold_balloon(true);
                send_line(sock, "{\"type\":\"prepared\"}\n");
            } else if (has_type(line, "freeze")) {
                int rc = freeze_guest();
                if (rc == 0 && !vmm.cut_ns)
                    vmm.cut_ns = now_ns(), vmm.cut_writes = total_writes();
                if (vmm.phase == 0)
                    next_phase();
                if (rc == 0 && vmm.reference && !vmm.is_device)
                    take_reference();
                send_line(sock, rc == 0 ? "{\"type\":\"frozen\"}\n" : "{\"type\":\"error\",\"message\":\"freeze timed out\"}\n");
            } else if (has_type(line, "thaw")) {
                thaw_guest();
                if (vmm.alias_at_thaw && !vmm.is_device)
                    write_through_alias();
                if (vmm.fork_at_thaw && !vmm.is_device)
                    write_from_child();
                send_line(sock, "{\"type\":\"thawed\"}\n");
            } else if (has_type(line, "done") || has_type(line, "failed")) {
                hold_balloon(false);
                if (has_type(line, "done"))
                    vmm.snapshots_done++;
                else
                    vmm.snapshots_failed++;
                if (vmm.phase == 1)
                    next_phase();
                if (vmm.after_ms) /* measure the after phase, then exit */
                    deadline = now_ns() + vmm.after_ms * 1000000ull;
            } else if (has_type(line, "error")) {
                fprintf(stderr, "toyvmm: agent refused us: %s\n", line);
            }
            line = nl + 1;
        }
        used = (size_t)(buf + used - line);
        memmove(buf, line, used);
    }
    /* Whatever happened, the guest must not stay frozen. */
    thaw_guest();
    run_until(deadline);
}

/* The device process: same memfd, its own writer thread, uffd and agent
 * connection. Forked once the VMM is welcomed (a device must join a VMM). */
static void spawn_device(int vmm_sock)
{
    vmm.device_pid = fork();
    if (vmm.device_pid < 0)
        die("fork");
    if (vmm.device_pid > 0)
        return;
    close(vmm_sock);
    vmm.is_device = true;
    vmm.sampling = false; /* the sampler thread is the parent's */
    vmm.nsamples = 0;
    vmm.device = false;
    vmm.vcpus = 1;
    vmm.kvm_mode = false;
    vmm.phase = 0;
    vmm.phase_start_ns = now_ns();
    snprintf(vmm.why_threads, sizeof vmm.why_threads, "device process");
    struct toy_ctl *c = aligned_alloc(PAGE, PAGE);
    vmm.ctl[0] = c;
    init_ctl(c, 7, (uint64_t)(uintptr_t)(vmm.mem + SYSTEM_AREA), 1);
    pthread_create(&vmm.threads[0], NULL, thread_main, c);
    agent_session();
    stop_guest();
    /* The device's report goes to stderr: stdout belongs to the VMM. */
    report(stderr);
    exit(0);
}

void agent_session(void)
{
    int sock = connect_unix(vmm.agent, "connect to the agent");
    pthread_t balloon;
    bool ballooning = vmm.balloon && !vmm.is_device && pthread_create(&balloon, NULL, balloon_main, NULL) == 0;
    send_hello(sock);
    agent_loop(sock);
    if (ballooning) {
        atomic_store(&balloon_stop, true);
        pthread_join(balloon, NULL);
    }
    close(sock);
}
