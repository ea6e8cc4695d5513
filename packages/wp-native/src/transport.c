/* Transport helpers for the agent: file descriptors over Unix sockets,
 * the peer's pid, and read-only views of guest memory fds. */
#define _GNU_SOURCE
#include "vmsnap_transport.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define WP_MAX_RECV_FDS 64

int32_t wp_transport_recv_fds(int32_t sock, uint8_t *buf, uint32_t cap, int32_t *fds_out, uint32_t max_fds, int32_t *nfds_out)
{
    char control[CMSG_SPACE(sizeof(int) * WP_MAX_RECV_FDS)];
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    *nfds_out = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0)
        return -errno;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int fds[WP_MAX_RECV_FDS];
        memcpy(fds, CMSG_DATA(cm), count * sizeof(int));
        for (size_t i = 0; i < count; i++) {
            if ((uint32_t)*nfds_out < max_fds)
                fds_out[(*nfds_out)++] = fds[i];
            else
                close(fds[i]); /* more than the caller can take: do not leak them */
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        for (int32_t i = 0; i < *nfds_out; i++)
            close(fds_out[i]);
        *nfds_out = 0;
        return -EMSGSIZE;
    }
    return (int32_t)n;
}

int32_t wp_transport_peer_pid(int32_t sock)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return -errno;
    return cred.pid;
}

int32_t wp_transport_peer_cred(int32_t sock, uint32_t *out, uint32_t cap)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (cap < 3)
        return -EINVAL;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return -errno;
    out[0] = (uint32_t)cred.pid;
    out[1] = cred.uid;
    out[2] = cred.gid;
    /* Supplementary groups (Linux 4.13+); none when the kernel cannot say
     * or there are more than the caller has room for. */
    socklen_t glen = (socklen_t)((cap - 3) * sizeof(gid_t));
    if (cap == 3 || getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, out + 3, &glen) < 0)
        return 3;
    return 3 + (int32_t)(glen / sizeof(gid_t));
}

int32_t wp_transport_epoll_create(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    return ep < 0 ? -errno : ep;
}

int32_t wp_transport_epoll_watch(int32_t ep, int32_t fd, int32_t add)
{
    if (!add)
        return epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
    /* One-shot: a ready fd is reported once, until the caller watches it again. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) == 0)
        return 0;
    if (errno != ENOENT)
        return -errno;
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int32_t wp_transport_epoll_wait_one(int32_t ep, int32_t timeout_ms)
{
    struct epoll_event ev;
    int n;
    do
        n = epoll_wait(ep, &ev, 1, timeout_ms);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return n == 0 ? -ETIMEDOUT : ev.data.fd;
}

uint64_t wp_transport_map_fd(int32_t fd, uint64_t offset, uint64_t size, int32_t *err_out)
{
    *err_out = 0;
    void *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *err_out = -errno;
        return 0;
    }
    return (uint64_t)(uintptr_t)p;
}

int32_t wp_transport_unmap(uint64_t hva, uint64_t size)
{
    return munmap((void *)(uintptr_t)hva, size) < 0 ? -errno : 0;
}
