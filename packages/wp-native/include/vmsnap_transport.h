/*
 * vmsnap_transport.h - socket and fd helpers for the agent (Node has no
 * SCM_RIGHTS nor SO_PEERCRED).
 *
 * Prefix: wp_transport_. Returns >= 0 or -errno; caller-owned buffers.
 */
#ifndef VMSNAP_TRANSPORT_H
#define VMSNAP_TRANSPORT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with -fvisibility=hidden: only the public headers'
 * declarations are exported. */
#pragma GCC visibility push(default)

/* wp_transport_recv_fds: one recvmsg on a non-blocking stream socket; returns bytes
 * read (0 at EOF, -EAGAIN if nothing yet) and the received fds in fds_out
 * (their count in *nfds_out; extra fds beyond max_fds are closed).
 * wp_transport_peer_pid: the pid of the socket's peer (SO_PEERCRED).
 * wp_transport_peer_cred: the peer's credentials at connect time: out[0]
 * pid, out[1] uid, out[2] gid, then its supplementary groups
 * (SO_PEERGROUPS); returns the number of words filled (at least 3) or
 * -errno. cap >= 3.
 * wp_transport_epoll_create / wp_transport_epoll_watch (add != 0: watch fd
 * for one readiness report, again after each report; 0: stop watching) /
 * wp_transport_epoll_wait_one (blocks up to timeout_ms; returns a ready fd
 * or -ETIMEDOUT): readiness of sockets whose bytes Node must not read itself
 * (fds ride with them).
 * wp_transport_map_fd: map [offset, offset + size) of fd shared and read-only; returns
 * the hva or 0 with *err_out = -errno. wp_transport_unmap undoes it. */
int32_t wp_transport_recv_fds(int32_t sock, uint8_t *buf, uint32_t cap, int32_t *fds_out, uint32_t max_fds, int32_t *nfds_out);
int32_t wp_transport_peer_pid(int32_t sock);
int32_t wp_transport_peer_cred(int32_t sock, uint32_t *out, uint32_t cap);
int32_t wp_transport_epoll_create(void);
int32_t wp_transport_epoll_watch(int32_t ep, int32_t fd, int32_t add);
int32_t wp_transport_epoll_wait_one(int32_t ep, int32_t timeout_ms);
uint64_t wp_transport_map_fd(int32_t fd, uint64_t offset, uint64_t size, int32_t *err_out);
int32_t wp_transport_unmap(uint64_t hva, uint64_t size);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_TRANSPORT_H */
