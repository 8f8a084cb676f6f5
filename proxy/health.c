/* health.c: active health checks on the main loop; see health.h. */
#include "health.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

#include "config.h"
#include "log.h"
#include "probe.h"
#include "proxyproto.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

#define HEALTH_HOST_MAX 256 /* EHLO name, bytes with NUL */
#define HEALTH_CMDS 2       /* commands a check sends at most: EHLO and QUIT */

struct health_target;

/* One check in flight: its socket and buffers, freed in the socket's close
 * callback. A check that ends (or whose target goes away) drops t first, so
 * callbacks still queued for the socket see t == NULL and do nothing. */
struct health_conn {
    uv_tcp_t tcp;                            /* the connection to the backend */
    uv_connect_t connect_req;                /* its connect */
    uv_write_t pp_req;                       /* the PROXY header, when the listener sends one */
    uv_write_t cmd_req[HEALTH_CMDS];         /* EHLO, then QUIT: each its own request and bytes, */
    char cmd[HEALTH_CMDS][PROBE_OUTPUT_MAX]; /* as a backend that answers early may overlap them */
    unsigned n_cmds;                         /* commands sent so far */
    struct health_target *t;                 /* the target checked, NULL once the check is over */
    struct probe probe;                      /* the dialogue */
    char pp[PROXYPROTO_V2_MAX];              /* PROXY header bytes, alive until pp_req completes */
    char rbuf[PROBE_LINE_MAX];               /* read buffer */
};

/* One backend of one listener, checked every health_interval. */
struct health_target {
    uv_timer_t timer;                 /* next check, then the running check's timeout */
    const struct config_listener *cl; /* the listener, inside health.cfg */
    const struct config_addr *addr;   /* the backend */
    struct config_backend_state *st;  /* its shared state (down, counters) */
    const char *ehlo_name;            /* health.host, borrowed */
    struct health_conn *conn;         /* the check in flight, or NULL */
    uint64_t started;                 /* uv_now() when that check began */
    unsigned passes;                  /* checks passed in a row */
    unsigned fails;                   /* checks failed in a row */
};

struct health {
    uv_loop_t *loop;
    struct config *cfg;             /* the config checked, owned reference */
    struct health_target **targets; /* every backend of every checked listener */
    size_t n_targets;
    char host[HEALTH_HOST_MAX]; /* EHLO name: this host's name */
};

static void health_on_timer(uv_timer_t *timer);

static void health_on_conn_closed(uv_handle_t *h)
{
    free(container_of(h, struct health_conn, tcp));
}

static void health_on_target_closed(uv_handle_t *h)
{
    free(container_of(h, struct health_target, timer));
}

static enum probe_proto health_proto(enum config_mode mode)
{
    switch (mode) {
    case CONFIG_MODE_POP3:
        return PROBE_POP3;
    case CONFIG_MODE_IMAP:
        return PROBE_IMAP;
    case CONFIG_MODE_TCP: /* health_check = smtp only (config.c) */
    case CONFIG_MODE_SMTP:
        return PROBE_SMTP;
    }
    abort(); /* a mode without a row: add one here and in probe.c */
}

static void health_log(const struct health_target *t, bool up, const char *reason)
{
    struct log_line l;
    enum log_level lvl = up ? LOG_INFO : LOG_WARN;

    if (!log_enabled(lvl))
        return;
    log_begin(&l, lvl, up ? "backend_up" : "backend_down");
    log_str(&l, "listener", t->cl->name);
    log_str(&l, "backend", t->addr->text);
    log_str(&l, "check", config_health_check_name((enum config_health_check)t->cl->health_check));
    if (!up)
        log_str(&l, "reason", reason);
    log_end(&l);
}

/* The check ended: counts it, flips the backend's state on the health_rise-th
 * pass or the health_fall-th failure in a row, and schedules the next check
 * one interval after this one began, so checks keep their spread. */
static void health_check_end(struct health_target *t, bool ok, const char *reason)
{
    struct health_conn *c = t->conn;
    const struct config_listener *cl = t->cl;

    if (c != NULL) {
        t->conn = NULL;
        c->t = NULL;
        uv_close((uv_handle_t *)&c->tcp, health_on_conn_closed);
    }
    bool down = atomic_load_explicit(&t->st->down, memory_order_relaxed);
    if (ok) {
        atomic_fetch_add_explicit(&t->st->checks_ok, 1, memory_order_relaxed);
        t->fails = 0;
        if (t->passes < cl->health_rise)
            t->passes++;
        if (down && t->passes >= cl->health_rise) {
            atomic_store_explicit(&t->st->down, false, memory_order_relaxed);
            health_log(t, true, NULL);
        }
    } else {
        atomic_fetch_add_explicit(&t->st->checks_failed, 1, memory_order_relaxed);
        t->passes = 0;
        if (t->fails < cl->health_fall)
            t->fails++;
        if (!down && t->fails >= cl->health_fall) {
            atomic_store_explicit(&t->st->down, true, memory_order_relaxed);
            health_log(t, false, reason);
        }
    }
    uint64_t took = uv_now(t->timer.loop) - t->started;
    uint64_t wait = took < cl->health_interval_ms ? cl->health_interval_ms - took : 0;
    uv_timer_start(&t->timer, health_on_timer, wait, 0);
}

static void health_on_write(uv_write_t *req, int status)
{
    struct health_conn *c = req->data;

    if (status < 0 && c->t != NULL)
        health_check_end(c->t, false, uv_strerror(status));
}

static int health_write(struct health_conn *c, uv_write_t *req, const char *data, size_t len)
{
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);

    req->data = c;
    return uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, health_on_write);
}

static void health_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct health_conn *c = container_of(h, struct health_conn, tcp);

    (void)suggested;
    *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void health_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct health_conn *c = container_of(s, struct health_conn, tcp);
    struct health_target *t = c->t;
    size_t off = 0;

    if (t == NULL || nread == 0)
        return;
    if (nread < 0) {
        health_check_end(t, false, nread == UV_EOF ? "connection closed" : uv_strerror((int)nread));
        return;
    }
    while (off < (size_t)nread) {
        size_t used;
        enum probe_status st = probe_feed(&c->probe, buf->base + off, (size_t)nread - off, &used);
        off += used;
        switch (st) {
        case PROBE_AGAIN:
            return;
        case PROBE_SEND: {
            if (c->n_cmds == HEALTH_CMDS)
                abort(); /* probe.c sends EHLO and QUIT, nothing more */
            char *out = c->cmd[c->n_cmds];
            snprintf(out, PROBE_OUTPUT_MAX, "%s", probe_output(&c->probe));
            int rc = health_write(c, &c->cmd_req[c->n_cmds++], out, strlen(out));
            if (rc != 0) {
                health_check_end(t, false, uv_strerror(rc));
                return;
            }
            continue;
        }
        case PROBE_OK:
            if (!c->probe.smtp) {
                /* Best effort: the verdict is in, the goodbye only spares the
                 * backend a "lost connection" line. */
                const char *bye = probe_goodbye(c->probe.proto);
                uv_buf_t b = uv_buf_init((char *)bye, (unsigned)strlen(bye));
                (void)uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
            }
            health_check_end(t, true, NULL);
            return;
        case PROBE_FAIL:
            health_check_end(t, false, probe_reason(&c->probe));
            return;
        }
        abort(); /* every probe_status is handled above */
    }
}

/* A listener that sends PROXY headers has backends that expect one first:
 * the check says it is the proxy's own connection (v1 UNKNOWN, v2 LOCAL). */
static int health_send_proxy_header(struct health_conn *c, const struct config_listener *cl)
{
    int n;

    if (cl->proxy_protocol == CONFIG_PROXY_PROTOCOL_V1) {
        n = proxyproto_encode_v1(c->pp, sizeof(c->pp), NULL, NULL);
    } else {
        struct proxyproto_v2_opts opts = {.local = true};
        n = proxyproto_encode_v2(c->pp, sizeof(c->pp), NULL, NULL, &opts);
    }
    if (n < 0)
        return UV_EINVAL;
    return health_write(c, &c->pp_req, c->pp, (size_t)n);
}

static void health_on_connect(uv_connect_t *req, int status)
{
    struct health_conn *c = container_of(req, struct health_conn, connect_req);
    struct health_target *t = c->t;
    int rc = 0;

    if (t == NULL)
        return; /* UV_ECANCELED: the check is over */
    if (status < 0) {
        health_check_end(t, false, uv_strerror(status));
        return;
    }
    if (t->cl->health_check == CONFIG_HEALTH_CONNECT) {
        health_check_end(t, true, NULL);
        return;
    }
    if (t->cl->proxy_protocol != CONFIG_PROXY_PROTOCOL_OFF)
        rc = health_send_proxy_header(c, t->cl);
    if (rc == 0)
        rc = uv_read_start((uv_stream_t *)&c->tcp, health_on_alloc, health_on_read);
    if (rc != 0)
        health_check_end(t, false, uv_strerror(rc));
}

/* The timer fired: either the next check is due, or the running one took
 * health_timeout. */
static void health_check_begin(struct health_target *t)
{
    const struct config_listener *cl = t->cl;
    uv_os_fd_t fd;

    if (t->conn != NULL) {
        health_check_end(t, false, "timeout");
        return;
    }
    t->started = uv_now(t->timer.loop);
    /* Short of memory or descriptors here is not the backend's fault: no
     * verdict, the next check comes one interval later. */
    struct health_conn *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        uv_timer_start(&t->timer, health_on_timer, cl->health_interval_ms, 0);
        return;
    }
    int rc = uv_tcp_init_ex(t->timer.loop, &c->tcp, t->addr->sa.ss_family);
    if (rc != 0) {
        free(c); /* libuv unlinked the handle: it is not to be closed */
        if (rc == UV_EMFILE || rc == UV_ENFILE || rc == UV_ENOMEM || rc == UV_ENOBUFS)
            uv_timer_start(&t->timer, health_on_timer, cl->health_interval_ms, 0);
        else
            health_check_end(t, false, uv_strerror(rc));
        return;
    }
    c->t = t;
    t->conn = c;
    probe_init(&c->probe, health_proto(cl->mode), cl->health_check == CONFIG_HEALTH_SMTP,
               t->ehlo_name);
    /* The same mark as session traffic, so iptables rules treat both alike. */
    if (cl->mark != 0 && uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0) {
        unsigned mark = cl->mark;
        if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) {
            health_check_end(t, false, uv_strerror(-errno));
            return;
        }
    }
    rc = uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)&t->addr->sa,
                        health_on_connect);
    if (rc != 0) {
        health_check_end(t, false, uv_strerror(rc));
        return;
    }
    uv_timer_start(&t->timer, health_on_timer, cl->health_timeout_ms, 0);
}

static void health_on_timer(uv_timer_t *timer)
{
    health_check_begin(container_of(timer, struct health_target, timer));
}

static void health_free_targets(struct health_target **targets, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct health_target *t = targets[i];
        if (t->conn != NULL) {
            t->conn->t = NULL;
            uv_close((uv_handle_t *)&t->conn->tcp, health_on_conn_closed);
            t->conn = NULL;
        }
        uv_close((uv_handle_t *)&t->timer, health_on_target_closed);
    }
    free(targets);
}

/* Makes the targets of cfg, their first checks spread over each listener's
 * interval, and marks up the backends of listeners that are not checked.
 * Returns 0 or UV_ENOMEM (nothing made, nothing marked). */
static int health_build(struct health *h, struct config *cfg, struct health_target ***out,
                        size_t *n_out)
{
    size_t n = 0, k = 0;

    for (size_t i = 0; i < cfg->n_listeners; i++)
        if (cfg->listeners[i].health_check != CONFIG_HEALTH_OFF)
            n += cfg->listeners[i].n_backends;
    struct health_target **targets = calloc(n > 0 ? n : 1, sizeof(*targets));
    if (targets == NULL)
        return UV_ENOMEM;
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        const struct config_listener *cl = &cfg->listeners[i];
        if (cl->health_check == CONFIG_HEALTH_OFF)
            continue;
        for (size_t j = 0; j < cl->n_backends; j++) {
            struct health_target *t = calloc(1, sizeof(*t));
            if (t == NULL) {
                for (size_t m = 0; m < k; m++)
                    free(targets[m]); /* no handle of theirs is initialised yet */
                free(targets);
                return UV_ENOMEM;
            }
            *t = (struct health_target){
                .cl = cl,
                .addr = &cl->backends[j],
                .st = cl->backend_state[j],
                .ehlo_name = h->host,
            };
            targets[k++] = t;
        }
    }
    k = 0;
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        const struct config_listener *cl = &cfg->listeners[i];
        if (cl->health_check == CONFIG_HEALTH_OFF) {
            for (size_t j = 0; j < cl->n_backends; j++)
                atomic_store_explicit(&cl->backend_state[j]->down, false, memory_order_relaxed);
            continue;
        }
        for (size_t j = 0; j < cl->n_backends; j++) {
            struct health_target *t = targets[k++];
            uint64_t at = (uint64_t)cl->health_interval_ms * j / cl->n_backends;
            uv_timer_init(h->loop, &t->timer);
            uv_timer_start(&t->timer, health_on_timer, at, 0);
        }
    }
    *out = targets;
    *n_out = n;
    return 0;
}

int health_start(struct health **out, uv_loop_t *loop, struct config *cfg)
{
    size_t len = HEALTH_HOST_MAX;
    struct health *h = calloc(1, sizeof(*h));

    *out = NULL;
    if (h == NULL)
        return UV_ENOMEM;
    h->loop = loop;
    if (uv_os_gethostname(h->host, &len) != 0 || h->host[0] == '\0')
        snprintf(h->host, sizeof(h->host), "localhost");
    int rc = health_build(h, cfg, &h->targets, &h->n_targets);
    if (rc != 0) {
        free(h);
        return rc;
    }
    h->cfg = config_ref(cfg);
    *out = h;
    return 0;
}

int health_reload(struct health *h, struct config *cfg)
{
    struct health_target **targets;
    size_t n;

    int rc = health_build(h, cfg, &targets, &n);
    if (rc != 0)
        return rc;
    health_free_targets(h->targets, h->n_targets);
    h->targets = targets;
    h->n_targets = n;
    config_unref(h->cfg);
    h->cfg = config_ref(cfg);
    return 0;
}

void health_stop(struct health *h)
{
    if (h == NULL)
        return;
    health_free_targets(h->targets, h->n_targets);
    config_unref(h->cfg);
    free(h);
}
