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

/* Closes the socket; the listener is freed in its close callback. */
void listener_close(struct listener *l);

#endif /* MXPROXY_LISTENER_H */
