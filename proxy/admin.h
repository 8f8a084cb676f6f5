/* admin.h: the HTTP admin endpoint (/healthz, /readyz, /metrics).
 *
 * A minimal HTTP/1.1 server on the main thread's event loop, apart from the
 * proxy listeners: one GET or HEAD per connection, answered and closed
 * (Connection: close). Each connection holds at most ADMIN_REQ_MAX bytes of
 * request plus its response. Limits (struct admin_limits) keep one peer from
 * starving the others, a liveness probe above all:
 *
 *   - at most max_conns connections are open, and at most max_per_peer from
 *     one source address. A new connection over either limit closes the
 *     oldest idle connection in its way (request not complete yet, or answer
 *     sent and lingering); only when none is idle is the new one closed;
 *   - a request must be complete within header_timeout_ms of the accept
 *     (408 otherwise), and the answer must be taken within ADMIN_TIMEOUT_MS.
 *
 * Each such close is logged as ev=admin_drop reason=peer_limit|conn_limit|
 * header_timeout, at most one line per reason and second, with count= the
 * closes since the last line and peer= the address of the last one.
 *
 *   GET /healthz  200 "ok\n": the process and its main loop are alive
 *   GET /readyz   200 "ready\n", or 503 "draining\n" once a drain has begun
 *   GET /metrics  200, Prometheus text format 0.0.4
 *   GET /sessions 200, JSON: open and recently closed sessions (sessview.h);
 *                 ?client=CIDR&listener=NAME&error=1 select (query.h), a bad query 400
 *   GET /sessions/SID  200, JSON: that session with every pair kept; 404 if none
 *   GET /         200, HTML: the sessions page (admin_page.c), which polls /sessions
 *   other paths 404, other methods 405, malformed or oversized requests 400,
 *   a request not complete within header_timeout_ms 408.
 */
#ifndef MXPROXY_ADMIN_H
#define MXPROXY_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

struct config_addr;
struct sessview_filter;

#define ADMIN_REQ_MAX 8192    /* request line and headers, bytes */
#define ADMIN_TIMEOUT_MS 5000 /* to take the answer */

#define ADMIN_CONNS_DEFAULT 64            /* "admin_max_connections" */
#define ADMIN_CONNS_MAX 1024              /* its largest value */
#define ADMIN_PER_PEER_DEFAULT 8          /* "admin_max_connections_per_peer" */
#define ADMIN_HEADER_TIMEOUT_DEFAULT 3000 /* "admin_header_timeout", ms */

/* How many connections the endpoint holds, and for how long without a request. */
struct admin_limits {
    unsigned max_conns;         /* open connections, 1..ADMIN_CONNS_MAX */
    unsigned max_per_peer;      /* open connections from one address, 1..max_conns */
    unsigned header_timeout_ms; /* accept to complete request head, > 0 */
};

/* What the endpoint asks of the program; called on the loop's thread. */
struct admin_ops {
    bool (*ready)(void *arg); /* false while draining: /readyz answers 503 */
    /* Renders the metrics text into out like snprintf: returns the whole
     * length, which may be >= cap (then it is called again, larger). */
    size_t (*render)(void *arg, char *out, size_t cap);
    /* GET /sessions[/SID]: the JSON for f into *out (malloc'd, the endpoint
     * frees it); returns its length, 0 for no such session, -1 out of memory. */
    long (*sessions)(void *arg, const struct sessview_filter *f, char **out);
    void *arg; /* passed to each */
};

struct admin; /* opaque */

/* Binds addr and serves on loop with the ADMIN_*_DEFAULT limits (see
 * admin_set_limits). On success returns 0 and stores the server
 * in *out; on failure returns a negative UV_E* code, stores NULL and leaves
 * nothing open (the error is the caller's to log). ops is copied. */
int admin_start(struct admin **out, uv_loop_t *loop, const struct config_addr *addr,
                const struct admin_ops *ops);

/* Replaces the limits of a (accepts NULL); lim is copied. Connections
 * already open keep their header deadline; a lower max_conns or
 * max_per_peer takes effect as new connections arrive. */
void admin_set_limits(struct admin *a, const struct admin_limits *lim);

/* Closes the listening socket at once and every connection; the server is
 * freed once its handles' close callbacks have run. Accepts NULL. */
void admin_stop(struct admin *a);

#endif /* MXPROXY_ADMIN_H */
