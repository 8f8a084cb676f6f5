/* krelay.h: the kernel side of kernel_relay, on plain file descriptors.
 *
 * relay.c decides when a pair of sockets may be relayed by the kernel; this
 * module does the socket work: loading the eBPF sockmap verdict once per
 * process, putting a pair into its map, and reading the byte counters that
 * replace user space's own accounting while the kernel relays. No libuv
 * types. */
#ifndef MXPROXY_KRELAY_H
#define MXPROXY_KRELAY_H

#include <stdbool.h>
#include <stdint.h>

/* Loads and attaches the verdict program on first use (thread-safe, once per
 * process). Returns true when sockmap relaying is available; when it is not
 * (no CAP_BPF/CAP_NET_ADMIN, a kernel without sockmap, built without it),
 * logs one ev=kernel_relay_unavailable line at warn, the first time only. */
bool krelay_sockmap_available(void);

/* Puts sockets a and b into the map, each as the other's peer: from now on
 * the kernel forwards what either receives to the other, bytes that wait
 * unread in a receive queue first. Neither may hold a segment a read()
 * began (the caller knows: its last read of it took less than it could).
 * Returns 0 or a negative errno; on failure neither socket is left in the
 * map. */
int krelay_sockmap_pair(int a, int b);

/* Takes a and b out of the map again (after krelay_sockmap_pair). */
void krelay_sockmap_unpair(int a, int b);

/* What the kernel counted on a TCP socket; a FIN counts one byte. */
struct krelay_count {
    uint64_t rx;      /* bytes received (a socket paired only with its receive queue read
                         empty, whose verdict takes every byte at once: all were forwarded or
                         are on their way) */
    uint64_t tx;      /* bytes written to the socket: acknowledged or still queued */
    uint32_t idle_ms; /* milliseconds since data last arrived */
};

/* Fills *c for fd. Returns 0 or a negative errno. */
int krelay_counters(int fd, struct krelay_count *c);

/* For a socket not in the map: fills *c as krelay_counters does, but with
 * what waits unread in its receive queue taken off rx (what user space
 * consumed). Returns 0, -EAGAIN when segments kept arriving, or another
 * negative errno. */
int krelay_consumed(int fd, struct krelay_count *c);

#endif /* MXPROXY_KRELAY_H */
