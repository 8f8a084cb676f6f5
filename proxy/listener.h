/* listener.h: one listening socket of one worker.
 *
 * Every worker binds its own socket for each [listener] with SO_REUSEPORT,
 * so the kernel spreads connections across event loops without a shared
 * accept lock. Debian's libuv 1.44 has no UV_TCP_REUSEPORT, so the socket is
 * made by hand, and mxproxy accepts from it itself, woken by an uv_poll_t:
 * libuv's uv_listen() answers EMFILE by closing a reserve descriptor and
 * accepting-and-dropping the backlog, which loses clients silently with one
 * worker and spins forever when another thread takes the freed descriptor.
 * Here an accept error stops accepting on that socket for
 * LISTENER_BACKOFF_MS (the clients wait in the kernel's backlog), is counted
 * in mxproxy_accept_errors_total, and is logged at most once a second per
 * listener and worker, as ev=accept_error with count= errors since the last
 * line (after nginx's ngx_disable_accept_events() and HAProxy's
 * limit_listener()).
 */
#ifndef MXPROXY_LISTENER_H
#define MXPROXY_LISTENER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

struct config_listener;
struct worker;

#define LISTENER_BACKOFF_MS 100    /* no accept for this long after an accept error */
#define LISTENER_LOG_EVERY_MS 1000 /* at most one ev=accept_error per listener this often */

struct listener {
    uv_poll_t poll;                   /* readable when connections wait; poll.data = this */
    uv_timer_t timer;                 /* ends a back-off; logs errors not yet logged */
    int fd;                           /* the listening socket, -1 once closed */
    unsigned open_handles;            /* poll and timer, until their close callbacks */
    struct worker *w;                 /* owner */
    const struct config_listener *cl; /* in w->cfg; swapped on reload */
    struct listener *next;            /* w->listeners list */
    size_t rr;                        /* round-robin position among backends */
    bool paused;                      /* accepting stopped until the timer fires */
    bool err_logged;                  /* err_logged_at is valid */
    uint64_t err_logged_at;           /* uv_hrtime() in ms of the last ev=accept_error */
    uint64_t err_count;               /* accept errors since that line */
    int err_last;                     /* the latest of them, a negative UV_E* code */
};

/* Binds and listens on cl->listen for worker w. On success returns 0 and
 * stores the listener in *out (not yet linked into w->listeners). On failure
 * returns a negative UV_E* code and closes what it opened. */
int listener_open(struct worker *w, const struct config_listener *cl, struct listener **out);

/* Checks that no other socket is bound to cl->listen, before this process
 * binds it: a socket bound without SO_REUSEPORT conflicts with any socket on
 * the address, so a second mxproxy cannot silently share a port with the
 * first. Returns 0, UV_EADDRINUSE, or another negative UV_E* code from
 * socket() or bind() (for the real bind to report). */
int listener_probe(const struct config_listener *cl);

/* Accepting on l failed with err (a negative UV_E* code), or a connection
 * just accepted had to be dropped for it: counts and logs it (at most one
 * line per LISTENER_LOG_EVERY_MS) and pauses l for LISTENER_BACKOFF_MS. */
void listener_accept_failed(struct listener *l, int err);

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

/* Closes the socket at once; the listener is freed in the last close callback. */
void listener_close(struct listener *l);

#endif /* MXPROXY_LISTENER_H */
