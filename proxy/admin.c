/* admin.c: the HTTP admin endpoint on the main loop; see admin.h. */
#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "admin_page.h"
#include "config.h"
#include "log.h"
#include "query.h"
#include "sessview.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

#define ADMIN_BACKLOG 511           /* a burst of connects waits here, not in SYN retries */
#define ADMIN_BACKOFF_MS 100        /* no accept for this long after an accept error */
#define ADMIN_ACCEPT_BATCH 16       /* accepts per wakeup */
#define ADMIN_DROP_LOG_MS 1000      /* at most one ev=admin_drop line per reason this often */
#define ADMIN_METRICS_INITIAL 16384 /* first guess at the metrics text size, bytes */
#define ADMIN_RENDER_TRIES 4        /* the text may grow between two renders */

struct admin_conn;

/* Why the endpoint closed a connection it did not answer (ev=admin_drop reason=). */
enum admin_drop_reason {
    ADMIN_DROP_PEER_LIMIT = 0, /* its peer was at max_per_peer */
    ADMIN_DROP_CONN_LIMIT,     /* the table was at max_conns */
    ADMIN_DROP_HEADER_TIMEOUT, /* no complete request within header_timeout_ms */
    ADMIN_DROP_N,
};

static const char *const admin_drop_names[ADMIN_DROP_N] = {
    [ADMIN_DROP_PEER_LIMIT] = "peer_limit",
    [ADMIN_DROP_CONN_LIMIT] = "conn_limit",
    [ADMIN_DROP_HEADER_TIMEOUT] = "header_timeout",
};

struct admin {
    uv_poll_t listener;           /* readable when connections wait; data -> this */
    uv_timer_t backoff;           /* ends a pause of accepting after an error */
    int fd;                       /* the bound socket */
    uv_timer_t log_timer;         /* paces ev=admin_drop lines; data -> this */
    struct admin_ops ops;         /* the program's callbacks */
    struct admin_limits lim;      /* see admin_set_limits */
    struct admin_conn *conns;     /* open connections, newest first, doubly linked */
    unsigned n_conns;             /* length of conns, closing ones included */
    bool stopping;                /* admin_stop ran: free after the last close */
    unsigned listener_handles;    /* listener and backoff, until their close callbacks */
    bool log_timer_closed;        /* log_timer is not (or no longer) a handle */
    size_t metrics_hint;          /* size of the last metrics text, to allocate once */
    uint64_t drops[ADMIN_DROP_N]; /* closes not logged yet, per reason */
    char drop_peer[ADMIN_DROP_N][INET6_ADDRSTRLEN]; /* peer of the last of them */
    char addr[CONFIG_ADDR_TEXT_MAX];                /* for log lines */
    char page_headers[384]; /* GET /'s own headers: no-store, its Content-Security-Policy */
};

enum admin_conn_state {
    ADMIN_CONN_READING = 0, /* collecting the request head */
    ADMIN_CONN_WRITING,     /* answer queued */
    ADMIN_CONN_LINGER,      /* answer sent and FIN sent; reading to EOF so close sends no RST */
};

struct admin_conn {
    uv_tcp_t tcp;                 /* the accepted socket; data -> this */
    uv_timer_t timer;             /* request timeout, then answer timeout */
    uv_write_t wreq;              /* the answer */
    uv_shutdown_t sreq;           /* the FIN after it */
    struct admin *a;              /* owner */
    struct admin_conn *prev;      /* a->conns list */
    struct admin_conn *next;      /* a->conns list */
    enum admin_conn_state state;  /* see above */
    unsigned open_handles;        /* tcp and timer until their close callbacks */
    bool closing;                 /* admin_conn_close ran */
    bool peer_eof;                /* the client closed its side while we wrote */
    struct sockaddr_storage peer; /* the client's address; ss_family 0 when unknown */
    size_t len;                   /* bytes of req used */
    char *body;                   /* the /metrics text, owned; NULL otherwise */
    char head[640];               /* status line and headers of the answer */
    char req[ADMIN_REQ_MAX];      /* request line and headers; later a sink */
};

/* One parsed request line; pointers into the connection's req buffer. */
struct admin_request {
    const char *method; /* "GET" */
    size_t method_len;
    const char *path; /* target without its query, starts with '/' */
    size_t path_len;
    const char *query; /* after '?', without it; NULL when the target has none */
    size_t query_len;
};

enum admin_parse {
    ADMIN_PARSE_AGAIN = 0, /* the head is not complete yet */
    ADMIN_PARSE_OK,        /* *r is filled */
    ADMIN_PARSE_BAD,       /* not an HTTP/1.x request: answer 400 */
};

static void admin_maybe_free(struct admin *a)
{
    if (a->stopping && a->listener_handles == 0 && a->log_timer_closed && a->n_conns == 0)
        free(a);
}

static void admin_on_log_timer_closed(uv_handle_t *h)
{
    struct admin *a = h->data;
    a->log_timer_closed = true;
    admin_maybe_free(a);
}

/* Writes one ev=admin_drop line per reason with closes not logged yet. */
static void admin_flush_drops(struct admin *a)
{
    for (int r = 0; r < ADMIN_DROP_N; r++) {
        struct log_line l;

        if (a->drops[r] == 0)
            continue;
        log_begin(&l, LOG_WARN, "admin_drop");
        log_str(&l, "reason", admin_drop_names[r]);
        log_uint(&l, "count", a->drops[r]);
        log_str(&l, "peer", a->drop_peer[r]);
        log_str(&l, "admin", a->addr);
        log_end(&l);
        a->drops[r] = 0;
    }
}

static void admin_on_log_timer(uv_timer_t *t)
{
    struct admin *a = t->data;
    bool pending = false;

    for (int r = 0; r < ADMIN_DROP_N; r++)
        pending = pending || a->drops[r] > 0;
    if (!pending) {
        uv_timer_stop(t); /* a quiet second: the next close is logged at once */
        return;
    }
    admin_flush_drops(a);
}

/* Counts a close for ev=admin_drop. The first close after a quiet second is
 * logged at once; later ones are summed into one line per reason and second,
 * so a flood of connections cannot turn into a flood of log lines. */
static void admin_note_drop(struct admin *a, enum admin_drop_reason r,
                            const struct sockaddr_storage *peer)
{
    const void *host = NULL;

    a->drops[r]++;
    /* The address without its port: the limits count addresses. */
    if (peer->ss_family == AF_INET)
        host = &((const struct sockaddr_in *)peer)->sin_addr;
    else if (peer->ss_family == AF_INET6)
        host = &((const struct sockaddr_in6 *)peer)->sin6_addr;
    if (host == NULL ||
        inet_ntop(peer->ss_family, host, a->drop_peer[r], sizeof(a->drop_peer[r])) == NULL)
        snprintf(a->drop_peer[r], sizeof(a->drop_peer[r]), "-");
    if (a->stopping || a->log_timer_closed || uv_is_active((uv_handle_t *)&a->log_timer))
        return;
    admin_flush_drops(a);
    uv_timer_start(&a->log_timer, admin_on_log_timer, ADMIN_DROP_LOG_MS, ADMIN_DROP_LOG_MS);
}

static void admin_on_listener_closed(uv_handle_t *h)
{
    struct admin *a = h->data;
    a->listener_handles--;
    admin_maybe_free(a);
}

static void admin_conn_on_closed(uv_handle_t *h)
{
    struct admin_conn *c = h->data;
    struct admin *a = c->a;

    if (--c->open_handles > 0)
        return;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    a->n_conns--;
    free(c->body);
    c->body = NULL;
    free(c);
    admin_maybe_free(a);
}

static void admin_conn_close(struct admin_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, admin_conn_on_closed);
    uv_close((uv_handle_t *)&c->timer, admin_conn_on_closed);
}

/* Parses the request head in buf[0, len). Strict enough to refuse what is
 * not HTTP/1.x; headers are checked for shape and otherwise ignored. */
static enum admin_parse admin_parse_request(const char *buf, size_t len, struct admin_request *r)
{
    const char *end = NULL, *p, *line_end;
    size_t i;

    for (i = 0; i + 1 < len; i++) {
        if (buf[i] == '\n' &&
            (buf[i + 1] == '\n' || (buf[i + 1] == '\r' && i + 2 < len && buf[i + 2] == '\n'))) {
            end = buf + i + 1;
            break;
        }
    }
    if (end == NULL)
        return ADMIN_PARSE_AGAIN;

    /* Request line: METHOD SP TARGET SP HTTP/1.x */
    line_end = memchr(buf, '\n', (size_t)(end - buf));
    p = buf;
    r->method = p;
    while (p < line_end && *p >= 'A' && *p <= 'Z')
        p++;
    r->method_len = (size_t)(p - r->method);
    if (r->method_len == 0 || r->method_len > 16 || *p != ' ')
        return ADMIN_PARSE_BAD;
    p++;
    if (*p != '/')
        return ADMIN_PARSE_BAD;
    r->path = p;
    while (p<line_end && * p> ' ' && *p < 0x7f)
        p++;
    const char *target_end = p;
    const char *q = memchr(r->path, '?', (size_t)(target_end - r->path));
    r->path_len = (size_t)((q != NULL ? q : target_end) - r->path);
    r->query = q != NULL ? q + 1 : NULL;
    r->query_len = q != NULL ? (size_t)(target_end - q - 1) : 0;
    if (*p != ' ')
        return ADMIN_PARSE_BAD;
    p++;
    size_t vlen = (size_t)(line_end - p);
    if (vlen > 0 && p[vlen - 1] == '\r')
        vlen--;
    if (vlen != 8 || (memcmp(p, "HTTP/1.1", 8) != 0 && memcmp(p, "HTTP/1.0", 8) != 0))
        return ADMIN_PARSE_BAD;

    /* Header lines: NAME ":" VALUE, no control bytes but TAB. */
    for (p = line_end + 1; p < end;) {
        const char *le = memchr(p, '\n', (size_t)(end - p));
        size_t n = (size_t)(le - p);
        if (n > 0 && p[n - 1] == '\r')
            n--;
        if (n == 0)
            break; /* the empty line ending the head */
        if (memchr(p, ':', n) == NULL || *p == ':' || *p == ' ' || *p == '\t')
            return ADMIN_PARSE_BAD;
        for (i = 0; i < n; i++) {
            unsigned char ch = (unsigned char)p[i];
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
                return ADMIN_PARSE_BAD;
        }
        p = le + 1;
    }
    return ADMIN_PARSE_OK;
}

static void admin_conn_on_timer(uv_timer_t *t);

static void admin_conn_on_shutdown(uv_shutdown_t *req, int status)
{
    struct admin_conn *c = container_of(req, struct admin_conn, sreq);

    if (status < 0 || c->peer_eof) {
        admin_conn_close(c); /* UV_ECANCELED after our own close included */
        return;
    }
    c->state = ADMIN_CONN_LINGER;
}

static void admin_conn_on_write(uv_write_t *req, int status)
{
    struct admin_conn *c = container_of(req, struct admin_conn, wreq);

    if (status < 0 || c->closing) {
        admin_conn_close(c);
        return;
    }
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, admin_conn_on_shutdown) != 0)
        admin_conn_close(c);
}

/* Queues the answer and stops reading requests; body is static text, or
 * c->body. head_only: HEAD, the headers of the GET answer only. */
static void admin_conn_respond(struct admin_conn *c, int code, const char *reason,
                               const char *content_type, const char *body, size_t body_len,
                               bool head_only, const char *extra_header)
{
    uv_buf_t bufs[2];
    unsigned nbufs = 1;
    int n = snprintf(c->head, sizeof(c->head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                     "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
                     code, reason, content_type, body_len, extra_header);

    if (n < 0 || (size_t)n >= sizeof(c->head))
        abort(); /* fixed texts only: they fit */
    bufs[0] = uv_buf_init(c->head, (unsigned)n);
    if (!head_only && body_len > 0) {
        bufs[1] = uv_buf_init((char *)body, (unsigned)body_len);
        nbufs = 2;
    }
    c->state = ADMIN_CONN_WRITING;
    uv_timer_start(&c->timer, admin_conn_on_timer, ADMIN_TIMEOUT_MS, 0);
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, bufs, nbufs, admin_conn_on_write) != 0)
        admin_conn_close(c);
}

static void admin_conn_text(struct admin_conn *c, int code, const char *reason, const char *text,
                            bool head_only)
{
    admin_conn_respond(c, code, reason, "text/plain; charset=utf-8", text, strlen(text), head_only,
                       "");
}

/* Renders the metrics into c->body, growing the buffer while the text does
 * not fit. Returns its length, or -1 when memory ran out. */
static long admin_render_metrics(struct admin_conn *c)
{
    struct admin *a = c->a;
    size_t cap = a->metrics_hint > 0 ? a->metrics_hint : ADMIN_METRICS_INITIAL;

    for (int i = 0; i < ADMIN_RENDER_TRIES; i++) {
        char *p = realloc(c->body, cap);
        if (p == NULL)
            return -1;
        c->body = p;
        size_t len = a->ops.render(a->ops.arg, c->body, cap);
        if (len < cap) {
            a->metrics_hint = len + len / 4 + 1;
            return (long)len;
        }
        cap = len + len / 4 + 1; /* room for series added meanwhile */
    }
    return -1;
}

static void admin_log_request(const struct admin_conn *c, const struct admin_request *r, int code)
{
    struct log_line l;

    if (!log_enabled(LOG_DEBUG))
        return;
    log_begin(&l, LOG_DEBUG, "admin_request");
    if (r != NULL) {
        log_strn(&l, "method", r->method, r->method_len);
        log_strn(&l, "path", r->path, r->path_len);
    }
    log_uint(&l, "code", (uint64_t)code);
    log_str(&l, "admin", c->a->addr);
    log_end(&l);
}

static bool admin_path_is(const struct admin_request *r, const char *path)
{
    return r->path_len == strlen(path) && memcmp(r->path, path, r->path_len) == 0;
}

#define ADMIN_SESSIONS "/sessions"
#define ADMIN_JSON "application/json; charset=utf-8"

/* GET /sessions[?QUERY] and GET /sessions/SID: JSON built by ops.sessions. */
static int admin_sessions(struct admin_conn *c, const struct admin_request *r, bool head)
{
    struct admin *a = c->a;
    struct sessview_filter f = {0};
    size_t plen = strlen(ADMIN_SESSIONS);

    if (!query_parse(r->query, r->query_len, &f.q)) {
        admin_conn_text(c, 400, "Bad Request", "bad query\n", head);
        return 400;
    }
    if (r->path_len > plen) {
        if (r->path[plen] != '/' ||
            !query_parse_sid(r->path + plen + 1, r->path_len - plen - 1, &f.sid)) {
            admin_conn_text(c, 404, "Not Found", "not found\n", head);
            return 404;
        }
        f.has_sid = true;
    }
    free(c->body);
    c->body = NULL;
    long len = a->ops.sessions(a->ops.arg, &f, &c->body);
    if (len < 0) {
        admin_conn_text(c, 500, "Internal Server Error", "out of memory\n", head);
        return 500;
    }
    if (len == 0) {
        admin_conn_text(c, 404, "Not Found", "no such session\n", head);
        return 404;
    }
    admin_conn_respond(c, 200, "OK", ADMIN_JSON, c->body, (size_t)len, head,
                       "Cache-Control: no-store\r\n");
    return 200;
}

static void admin_conn_dispatch(struct admin_conn *c, const struct admin_request *r)
{
    struct admin *a = c->a;
    bool head = r->method_len == 4 && memcmp(r->method, "HEAD", 4) == 0;
    bool get = r->method_len == 3 && memcmp(r->method, "GET", 3) == 0;
    int code;

    if (!get && !head) {
        code = 405;
        admin_conn_respond(c, code, "Method Not Allowed", "text/plain; charset=utf-8",
                           "method not allowed\n", strlen("method not allowed\n"), false,
                           "Allow: GET, HEAD\r\n");
    } else if (admin_path_is(r, "/healthz")) {
        code = 200;
        admin_conn_text(c, code, "OK", "ok\n", head);
    } else if (admin_path_is(r, "/readyz")) {
        bool ready = a->ops.ready(a->ops.arg);
        code = ready ? 200 : 503;
        admin_conn_text(c, code, ready ? "OK" : "Service Unavailable",
                        ready ? "ready\n" : "draining\n", head);
    } else if (admin_path_is(r, "/metrics")) {
        long len = admin_render_metrics(c);
        if (len < 0) {
            code = 500;
            admin_conn_text(c, code, "Internal Server Error", "out of memory\n", head);
        } else {
            code = 200;
            admin_conn_respond(c, code, "OK", "text/plain; version=0.0.4; charset=utf-8", c->body,
                               (size_t)len, head, "");
        }
    } else if (a->ops.sessions != NULL &&
               (admin_path_is(r, ADMIN_SESSIONS) ||
                (r->path_len > strlen(ADMIN_SESSIONS) + 1 &&
                 memcmp(r->path, ADMIN_SESSIONS "/", strlen(ADMIN_SESSIONS) + 1) == 0))) {
        code = admin_sessions(c, r, head);
    } else if (a->ops.sessions != NULL && admin_path_is(r, "/")) {
        code = 200;
        admin_conn_respond(c, code, "OK", "text/html; charset=utf-8", admin_page_html,
                           admin_page_html_len, head, a->page_headers);
    } else {
        code = 404;
        admin_conn_text(c, code, "Not Found", "not found\n", head);
    }
    admin_log_request(c, r, code);
}

static void admin_conn_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct admin_conn *c = h->data;

    (void)suggested;
    if (c->state == ADMIN_CONN_READING)
        *buf = uv_buf_init(c->req + c->len, (unsigned)(sizeof(c->req) - c->len));
    else
        *buf = uv_buf_init(c->req, sizeof(c->req)); /* answered: read only to discard */
}

static void admin_conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct admin_conn *c = s->data;
    struct admin_request r;

    (void)buf;
    if (nread < 0) {
        /* Before the answer: the client gave up. After it: done. While it is
         * being written: finish writing, then close. */
        if (c->state == ADMIN_CONN_WRITING && nread == UV_EOF) {
            c->peer_eof = true;
            uv_read_stop(s);
            return;
        }
        admin_conn_close(c);
        return;
    }
    if (nread == 0 || c->state != ADMIN_CONN_READING)
        return;
    c->len += (size_t)nread;
    switch (admin_parse_request(c->req, c->len, &r)) {
    case ADMIN_PARSE_OK:
        admin_conn_dispatch(c, &r);
        return;
    case ADMIN_PARSE_BAD:
        admin_conn_text(c, 400, "Bad Request", "bad request\n", false);
        admin_log_request(c, NULL, 400);
        return;
    case ADMIN_PARSE_AGAIN:
        if (c->len == sizeof(c->req)) {
            admin_conn_text(c, 400, "Bad Request", "request head too large\n", false);
            admin_log_request(c, NULL, 400);
        }
        return;
    }
    abort(); /* every admin_parse value is handled above */
}

static void admin_conn_on_timer(uv_timer_t *t)
{
    struct admin_conn *c = t->data;

    if (c->state == ADMIN_CONN_READING) {
        admin_note_drop(c->a, ADMIN_DROP_HEADER_TIMEOUT, &c->peer);
        admin_conn_text(c, 408, "Request Timeout", "request timeout\n", false);
        admin_log_request(c, NULL, 408);
        return;
    }
    admin_conn_close(c); /* the client does not take the answer, or does not close */
}

/* True when a and b are the same IPv4 or IPv6 address, whatever the ports. */
static bool admin_same_host(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
               ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    if (a->ss_family == AF_INET6)
        return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                      &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr)) == 0;
    return false;
}

/* A connection that holds a slot without being served: its request is not
 * complete, or its answer is sent and it only lingers for the peer's FIN. */
static bool admin_conn_idle(const struct admin_conn *c)
{
    return c->state == ADMIN_CONN_READING || c->state == ADMIN_CONN_LINGER;
}

/* Counts the open connections other than c (all of them, or those from c's
 * address) into *count and returns the oldest idle one among them, or NULL. */
static struct admin_conn *admin_oldest_idle(struct admin *a, const struct admin_conn *c,
                                            bool same_peer, unsigned *count)
{
    struct admin_conn *oldest = NULL;

    *count = 0;
    for (struct admin_conn *o = a->conns; o != NULL; o = o->next) {
        if (o == c || o->closing || (same_peer && !admin_same_host(&o->peer, &c->peer)))
            continue;
        (*count)++;
        if (admin_conn_idle(o))
            oldest = o; /* the list runs newest first */
    }
    return oldest;
}

/* Makes room for the new connection c under one limit: while the others
 * reach max, their oldest idle connection is closed. Returns false when none
 * is idle; then c itself has been closed. */
static bool admin_make_room(struct admin *a, struct admin_conn *c, bool same_peer, unsigned max,
                            enum admin_drop_reason reason)
{
    for (;;) {
        unsigned count;
        struct admin_conn *victim = admin_oldest_idle(a, c, same_peer, &count);

        if (count < max)
            return true;
        if (victim == NULL) {
            admin_note_drop(a, reason, &c->peer);
            admin_conn_close(c);
            return false;
        }
        admin_note_drop(a, reason, &victim->peer);
        admin_conn_close(victim);
    }
}

/* One accepted connection (fd). Out of memory it is closed at once, so the
 * backlog does not fill with connections nobody will answer. */
static void admin_on_connection(struct admin *a, int fd)
{
    uv_loop_t *loop = a->listener.loop;
    struct admin_conn *c;
    int len = (int)sizeof(struct sockaddr_storage);

    if ((c = calloc(1, sizeof(*c))) == NULL) {
        close(fd);
        return;
    }
    c->a = a;
    uv_tcp_init(loop, &c->tcp);
    uv_timer_init(loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->open_handles = 2;
    c->next = a->conns;
    if (a->conns != NULL)
        a->conns->prev = c;
    a->conns = c;
    a->n_conns++;
    if (uv_tcp_open(&c->tcp, fd) != 0) {
        close(fd);
        admin_conn_close(c);
        return;
    }
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->peer, &len) != 0)
        c->peer.ss_family = AF_UNSPEC; /* counts as a peer of its own */
    /* The peer's limit first: a flood from one address then only ever
     * replaces its own connections, never another peer's. */
    if (!admin_make_room(a, c, true, a->lim.max_per_peer, ADMIN_DROP_PEER_LIMIT) ||
        !admin_make_room(a, c, false, a->lim.max_conns, ADMIN_DROP_CONN_LIMIT))
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, admin_conn_on_alloc, admin_conn_on_read) != 0) {
        admin_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, admin_conn_on_timer, a->lim.header_timeout_ms, 0);
}

static void admin_on_readable(uv_poll_t *p, int status, int events);

static void admin_on_backoff(uv_timer_t *t)
{
    struct admin *a = t->data;

    if (uv_poll_start(&a->listener, UV_READABLE, admin_on_readable) != 0)
        abort(); /* only fails for a closing handle, whose timer is stopped */
}

/* Accepts by hand rather than with uv_listen(): on EMFILE libuv closes its
 * spare descriptor to accept and drop a connection, and when a worker thread
 * takes the freed descriptor first, it calls back with EMFILE in a loop that
 * never returns, so the main loop stops handling signals. Here an error
 * pauses accepting for ADMIN_BACKOFF_MS; clients wait in the backlog. */
static void admin_on_readable(uv_poll_t *p, int status, int events)
{
    struct admin *a = p->data;

    (void)events;
    for (int i = 0; status == 0 && i < ADMIN_ACCEPT_BATCH && !a->stopping; i++) {
        int fd = accept4(a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            admin_on_connection(a, fd);
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        if (errno != EINTR && errno != ECONNABORTED)
            status = -errno; /* EMFILE, ENFILE, ENOBUFS, ENOMEM */
    }
    if (status < 0) {
        uv_poll_stop(&a->listener);
        uv_timer_start(&a->backoff, admin_on_backoff, ADMIN_BACKOFF_MS, 0);
    }
}

/* socket/bind/listen by hand, so a failure leaves no libuv handle that would
 * need a loop iteration to close. Returns the fd or -errno. */
static int admin_bind(const struct config_addr *addr)
{
    int one = 1, fd = socket(addr->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

    if (fd < 0)
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(fd, (const struct sockaddr *)&addr->sa, addr->salen) != 0 ||
        listen(fd, ADMIN_BACKLOG) != 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int admin_start(struct admin **out, uv_loop_t *loop, const struct config_addr *addr,
                const struct admin_ops *ops)
{
    struct admin *a;
    int fd, rc;

    *out = NULL;
    a = calloc(1, sizeof(*a));
    if (a == NULL)
        return UV_ENOMEM;
    fd = admin_bind(addr);
    if (fd < 0) {
        free(a);
        return fd; /* -errno equals UV_E* on Linux */
    }
    a->ops = *ops;
    static const char no_store[] = "Cache-Control: no-store\r\n";
    memcpy(a->page_headers, no_store, sizeof(no_store));
    if (admin_page_csp(a->page_headers + sizeof(no_store) - 1,
                       sizeof(a->page_headers) - sizeof(no_store) + 1) == 0) {
        close(fd);
        free(a);
        return UV_EINVAL; /* the policy does not fit, or OpenSSL cannot hash: a bug */
    }
    a->lim = (struct admin_limits){
        .max_conns = ADMIN_CONNS_DEFAULT,
        .max_per_peer = ADMIN_PER_PEER_DEFAULT,
        .header_timeout_ms = ADMIN_HEADER_TIMEOUT_DEFAULT,
    };
    a->log_timer_closed = true; /* not a handle until the listener works */
    snprintf(a->addr, sizeof(a->addr), "%s", addr->text);
    rc = uv_poll_init_socket(loop, &a->listener, fd);
    if (rc != 0) {
        close(fd);
        free(a);
        return rc;
    }
    a->fd = fd;
    a->listener.data = a;
    uv_timer_init(loop, &a->backoff);
    a->backoff.data = a;
    a->listener_handles = 2;
    rc = uv_poll_start(&a->listener, UV_READABLE, admin_on_readable);
    if (rc != 0) {
        admin_stop(a); /* the handles exist now: a is freed in their close callbacks */
        return rc;
    }
    uv_timer_init(loop, &a->log_timer);
    a->log_timer.data = a;
    a->log_timer_closed = false;
    *out = a;
    return 0;
}

void admin_set_limits(struct admin *a, const struct admin_limits *lim)
{
    if (a == NULL)
        return;
    a->lim = *lim;
    if (a->lim.max_conns == 0)
        a->lim.max_conns = 1; /* the config never gives 0; a zero would refuse everything */
    if (a->lim.max_per_peer == 0)
        a->lim.max_per_peer = 1;
    if (a->lim.header_timeout_ms == 0)
        a->lim.header_timeout_ms = ADMIN_HEADER_TIMEOUT_DEFAULT;
}

void admin_stop(struct admin *a)
{
    if (a == NULL || a->stopping)
        return;
    a->stopping = true;
    admin_flush_drops(a); /* what the pacing held back */
    /* Polling stops at once, so the descriptor may go now. */
    uv_close((uv_handle_t *)&a->listener, admin_on_listener_closed);
    uv_close((uv_handle_t *)&a->backoff, admin_on_listener_closed);
    close(a->fd);
    if (!a->log_timer_closed)
        uv_close((uv_handle_t *)&a->log_timer, admin_on_log_timer_closed);
    for (struct admin_conn *c = a->conns; c != NULL; c = c->next)
        admin_conn_close(c);
}
