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
 * wp_transport_map_fd: map [offset, offset + size) of fd shared and read-only; returns
 * the hva or 0 with *err_out = -errno. wp_transport_unmap undoes it. */
int32_t wp_transport_recv_fds(int32_t sock, uint8_t *buf, uint32_t cap, int32_t *fds_out, uint32_t max_fds, int32_t *nfds_out);
int32_t wp_transport_peer_pid(int32_t sock);
uint64_t wp_transport_map_fd(int32_t fd, uint64_t offset, uint64_t size, int32_t *err_out);
int32_t wp_transport_unmap(uint64_t hva, uint64_t size);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_TRANSPORT_H */
