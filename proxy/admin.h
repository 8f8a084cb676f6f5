/* admin.h: the HTTP admin endpoint (/healthz, /readyz, /metrics).
 *
 * A minimal HTTP/1.1 server on the main thread's event loop, apart from the
 * proxy listeners: one GET or HEAD per connection, answered and closed
 * (Connection: close). Each connection holds at most ADMIN_REQ_MAX bytes of
 * request plus its response, at most ADMIN_CONNS_MAX connections are open,
 * and each gets ADMIN_TIMEOUT_MS to send its request and as long again to
 * take the answer.
 *
 *   GET /healthz  200 "ok\n": the process and its main loop are alive
 *   GET /readyz   200 "ready\n", or 503 "draining\n" once a drain has begun
 *   GET /metrics  200, Prometheus text format 0.0.4
 *   other paths 404, other methods 405, malformed or oversized requests 400,
 *   a request not complete within ADMIN_TIMEOUT_MS 408.
 */
#ifndef MXPROXY_ADMIN_H
#define MXPROXY_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

struct config_addr;

#define ADMIN_REQ_MAX 8192    /* request line and headers, bytes */
#define ADMIN_CONNS_MAX 64    /* open admin connections; more are closed at once */
#define ADMIN_TIMEOUT_MS 5000 /* to send a request; then to take the answer */

/* What the endpoint asks of the program; called on the loop's thread. */
struct admin_ops {
    bool (*ready)(void *arg); /* false while draining: /readyz answers 503 */
    /* Renders the metrics text into out like snprintf: returns the whole
     * length, which may be >= cap (then it is called again, larger). */
    size_t (*render)(void *arg, char *out, size_t cap);
    void *arg; /* passed to both */
};

struct admin; /* opaque */

/* Binds addr and serves on loop. On success returns 0 and stores the server
 * in *out; on failure returns a negative UV_E* code, stores NULL and leaves
 * nothing open (the error is the caller's to log). ops is copied. */
int admin_start(struct admin **out, uv_loop_t *loop, const struct config_addr *addr,
                const struct admin_ops *ops);

/* Closes the listening socket at once and every connection; the server is
 * freed once its handles' close callbacks have run. Accepts NULL. */
void admin_stop(struct admin *a);

#endif /* MXPROXY_ADMIN_H */
