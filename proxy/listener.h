/* listener.h: one listening socket of one worker.
 *
 * Every worker binds its own socket for each [listener] with SO_REUSEPORT,
 * so the kernel spreads connections across event loops without a shared
 * accept lock. Debian's libuv 1.44 has no UV_TCP_REUSEPORT: the option is set
 * on the socket between uv_tcp_init_ex() and uv_tcp_bind().
 */
#ifndef MXPROXY_LISTENER_H
#define MXPROXY_LISTENER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

struct config_listener;
struct worker;

struct listener {
    uv_tcp_t handle;                  /* the listening socket; handle.data = this */
    struct worker *w;                 /* owner */
    const struct config_listener *cl; /* in w->cfg; swapped on reload */
    struct listener *next;            /* w->listeners list */
    size_t rr;                        /* round-robin position among backends */
};

/* Binds and listens on cl->listen for worker w. On success returns 0 and
 * stores the listener in *out (not yet linked into w->listeners). On failure
 * returns a negative UV_E* code and closes what it opened. */
int listener_open(struct worker *w, const struct config_listener *cl, struct listener **out);

/* The address a transparently intercepted connection (accepted socket fd)
 * was meant for: with REDIRECT (transparent = redirect) the conntrack entry's
 * original destination (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST for IPv6),
 * with TPROXY the socket's own local address. Returns 0 or -errno. */
int listener_original_dst(int fd, bool tproxy, struct sockaddr_storage *out);

/* Marks a socket for IP_TRANSPARENT (IPV6_TRANSPARENT), so it may bind to
 * or accept for addresses that are not local (TPROXY). Needs CAP_NET_ADMIN.
 * Returns 0 or -errno. */
int listener_set_transparent(int fd, int family);

/* True when sa's address belongs to this host (a bind to it would work
 * without IP_TRANSPARENT). */
bool listener_addr_is_local(const struct sockaddr *sa);

/* Closes the socket; the listener is freed in its close callback. */
void listener_close(struct listener *l);

#endif /* MXPROXY_LISTENER_H */
