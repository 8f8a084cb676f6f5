/* metrics.c: per-worker counters, summed into Prometheus text; see metrics.h. */
#include "metrics.h"

#include <assert.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "imap.h"
#include "pop3.h"
#include "smtp.h"

/* Upper bounds of the histogram buckets in nanoseconds, and as le= text. */
static const uint64_t metrics_bounds_ns[METRICS_BUCKETS] = {
    100000,   250000,    500000,    1000000,   2500000,    5000000,    10000000,   25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000,
};
static const char *const metrics_bounds_text[METRICS_BUCKETS] = {
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
    "0.05",   "0.1",     "0.25",   "0.5",   "1",      "2.5",   "5",    "10",
};
static const char *const metrics_classes[METRICS_CLASSES] = {"2xx", "3xx", "4xx", "5xx"};
static const char *const metrics_accept_error_names[METRICS_ACCEPT_ERRORS] = {
    "emfile", "enfile", "enomem", "enobufs", "other",
};

/* One writer per counter: a plain add published with a relaxed store, so
 * the hot path takes no locked instruction and a reader never sees a torn
 * value. */
static inline void metrics_add(metrics_counter *c, uint64_t v)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                          memory_order_relaxed);
}

static inline uint64_t metrics_get(const metrics_counter *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static bool metrics_name_is(const char *slot, const char *name)
{
    size_t len = strnlen(name, METRICS_NAME_MAX - 1);
    return strncmp(slot, name, len) == 0 && slot[len] == '\0';
}

/* The slot of listener name in m, claimed on first use; the overflow slot
 * once the table is full. Worker thread only. */
static struct metrics_listener *metrics_slot(struct metrics *m, const char *name)
{
    unsigned n = atomic_load_explicit(&m->n_listeners, memory_order_relaxed);

    for (unsigned i = 0; i < n; i++) {
        if (metrics_name_is(m->listeners[i].name, name))
            return &m->listeners[i];
    }
    if (n == METRICS_LISTENERS_MAX)
        return &m->other;
    size_t len = strnlen(name, METRICS_NAME_MAX - 1);
    memcpy(m->listeners[n].name, name, len);
    m->listeners[n].name[len] = '\0';
    /* Release: a reader that sees the new count also sees the name. */
    atomic_store_explicit(&m->n_listeners, n + 1, memory_order_release);
    return &m->listeners[n];
}

void metrics_listener_seen(struct metrics *m, const char *listener)
{
    (void)metrics_slot(m, listener);
}

void metrics_session_opened(struct metrics *m, const char *listener)
{
    metrics_add(&metrics_slot(m, listener)->active, 1);
}

void metrics_session_closed(struct metrics *m, const char *listener, enum session_end end,
                            uint64_t bytes_up, uint64_t bytes_down)
{
    struct metrics_listener *l = metrics_slot(m, listener);

    if ((unsigned)end < METRICS_ENDS)
        metrics_add(&l->ends[end], 1);
    metrics_add(&l->active, UINT64_MAX); /* minus one, modulo 2^64 */
    metrics_add(&m->bytes_up, bytes_up);
    metrics_add(&m->bytes_down, bytes_down);
}

static void metrics_observe(struct metrics_hist *h, uint64_t ns)
{
    unsigned i = 0;

    while (i < METRICS_BUCKETS && ns > metrics_bounds_ns[i])
        i++;
    metrics_add(&h->buckets[i], 1);
    metrics_add(&h->sum_ns, ns);
}

void metrics_accept_error(struct metrics *m, const char *listener, int err)
{
    unsigned i = err == UV_EMFILE    ? 0
                 : err == UV_ENFILE  ? 1
                 : err == UV_ENOMEM  ? 2
                 : err == UV_ENOBUFS ? 3
                                     : 4;
    metrics_add(&metrics_slot(m, listener)->accept_errors[i], 1);
}

void metrics_connect_time(struct metrics *m, uint64_t ns)
{
    metrics_observe(&m->connect, ns);
}

void metrics_greeting(struct metrics *m, uint64_t ns)
{
    metrics_observe(&m->greeting, ns);
}

static_assert(METRICS_VERBS == SMTP_CMD_DOT + 1, "one reply row per enum smtp_cmd");
static_assert(METRICS_IMAP_CMDS == IMAP_CMD_COUNT_, "one response row per enum imap_cmd");
static_assert(METRICS_IMAP_STATUSES == IMAP_ST_PREAUTH + 1, "one column per enum imap_status");

void metrics_imap_response(struct metrics *m, unsigned cmd, unsigned status, uint64_t ns)
{
    if (cmd >= METRICS_IMAP_CMDS || status == IMAP_ST_NONE || status >= METRICS_IMAP_STATUSES)
        return;
    metrics_add(&m->imap[cmd][status], 1);
    if (ns != METRICS_NO_LATENCY)
        metrics_observe(&m->reply, ns);
}

void metrics_reply(struct metrics *m, unsigned cmd, int code, uint64_t ns)
{
    if ((unsigned)cmd >= METRICS_VERBS || code < 200 || code > 599)
        return;
    metrics_add(&m->replies[cmd][code / 100 - 2], 1);
    if (ns != METRICS_NO_LATENCY)
        metrics_observe(&m->reply, ns);
}

static_assert(METRICS_POP3_CMDS == POP3_CMD_COUNT, "one response row per enum pop3_cmd");

void metrics_pop3_response(struct metrics *m, unsigned cmd, bool ok)
{
    if (cmd >= METRICS_POP3_CMDS)
        return;
    metrics_add(&m->pop3[cmd][ok ? 1 : 0], 1);
}

void metrics_tls(struct metrics *m, bool client, bool ok)
{
    metrics_add(&m->tls[client ? 1 : 0][ok ? 1 : 0], 1);
}

/* ---- rendering ----------------------------------------------------------------------- */

/* snprintf-style output: len counts every byte asked for, out holds what fits. */
struct metrics_out {
    char *p;    /* caller's buffer */
    size_t cap; /* its size */
    size_t len; /* bytes the whole text needs so far */
};

static void metrics_put(struct metrics_out *o, const char *s, size_t n)
{
    if (o->len < o->cap) {
        size_t room = o->cap - o->len;
        memcpy(o->p + o->len, s, n < room ? n : room);
    }
    o->len += n;
}

static void metrics_puts(struct metrics_out *o, const char *s)
{
    metrics_put(o, s, strlen(s));
}

static void metrics_u64(struct metrics_out *o, uint64_t v)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof(tmp), "%" PRIu64, v);
    metrics_put(o, tmp, (size_t)n);
}

/* Nanoseconds as decimal seconds, exact: "0.0015", "12", "3.000000001". */
static void metrics_seconds(struct metrics_out *o, uint64_t ns)
{
    char tmp[40];
    int n =
        snprintf(tmp, sizeof(tmp), "%" PRIu64 ".%09" PRIu64, ns / 1000000000u, ns % 1000000000u);
    while (tmp[n - 1] == '0')
        n--;
    if (tmp[n - 1] == '.')
        n--;
    metrics_put(o, tmp, (size_t)n);
}

/* A label value: backslash, double quote and newline escaped (format 0.0.4). */
static void metrics_label(struct metrics_out *o, const char *v)
{
    for (; *v != '\0'; v++) {
        if (*v == '\\')
            metrics_put(o, "\\\\", 2);
        else if (*v == '"')
            metrics_put(o, "\\\"", 2);
        else if (*v == '\n')
            metrics_put(o, "\\n", 2);
        else
            metrics_put(o, v, 1);
    }
}

static void metrics_head(struct metrics_out *o, const char *name, const char *type,
                         const char *help)
{
    metrics_puts(o, "# HELP ");
    metrics_puts(o, name);
    metrics_puts(o, " ");
    metrics_puts(o, help);
    metrics_puts(o, "\n# TYPE ");
    metrics_puts(o, name);
    metrics_puts(o, " ");
    metrics_puts(o, type);
    metrics_puts(o, "\n");
}

/* name{k1="v1",k2="v2"} value\n; k2 and v2 may be NULL. */
static void metrics_sample(struct metrics_out *o, const char *name, const char *k1, const char *v1,
                           const char *k2, const char *v2, uint64_t value)
{
    metrics_puts(o, name);
    metrics_puts(o, "{");
    metrics_puts(o, k1);
    metrics_puts(o, "=\"");
    metrics_label(o, v1);
    if (k2 != NULL && v2 != NULL) {
        metrics_puts(o, "\",");
        metrics_puts(o, k2);
        metrics_puts(o, "=\"");
        metrics_label(o, v2);
    }
    metrics_puts(o, "\"} ");
    metrics_u64(o, value);
    metrics_puts(o, "\n");
}

/* The smallest listener name of any worker that sorts after prev (NULL: the
 * first), or NULL when none is left. Quadratic, but without allocation, and
 * the tables are small. */
static const char *metrics_next_name(struct metrics *const *pw, unsigned n, const char *prev)
{
    const char *best = NULL;

    for (unsigned w = 0; w < n; w++) {
        unsigned k = atomic_load_explicit(&pw[w]->n_listeners, memory_order_acquire);
        for (unsigned i = 0; i < k; i++) {
            const char *name = pw[w]->listeners[i].name;
            if ((prev == NULL || strcmp(name, prev) > 0) &&
                (best == NULL || strcmp(name, best) < 0))
                best = name;
        }
    }
    return best;
}

/* One worker's slot named name (NULL: its overflow slot); NULL when it has no such slot. */
static const struct metrics_listener *metrics_find_listener(const struct metrics *m,
                                                            const char *name)
{
    unsigned k = atomic_load_explicit(&m->n_listeners, memory_order_acquire);

    if (name == NULL)
        return &m->other;
    for (unsigned i = 0; i < k; i++) {
        if (strcmp(m->listeners[i].name, name) == 0)
            return &m->listeners[i];
    }
    return NULL;
}

/* The sum over workers of the slot named name (NULL: the overflow slot). */
static void metrics_sum_listener(struct metrics *const *pw, unsigned n, const char *name,
                                 uint64_t ends[METRICS_ENDS], uint64_t *active)
{
    memset(ends, 0, METRICS_ENDS * sizeof(ends[0]));
    *active = 0;
    for (unsigned w = 0; w < n; w++) {
        const struct metrics_listener *l = metrics_find_listener(pw[w], name);

        if (l == NULL)
            continue;
        for (unsigned e = 0; e < METRICS_ENDS; e++)
            ends[e] += metrics_get(&l->ends[e]);
        *active += metrics_get(&l->active);
    }
}

static bool metrics_has_other(struct metrics *const *pw, unsigned n)
{
    uint64_t ends[METRICS_ENDS], active;

    metrics_sum_listener(pw, n, NULL, ends, &active);
    if (active != 0)
        return true;
    for (unsigned e = 0; e < METRICS_ENDS; e++) {
        if (ends[e] != 0)
            return true;
    }
    return false;
}

static void metrics_render_sessions(struct metrics_out *o, struct metrics *const *pw, unsigned n,
                                    bool active)
{
    uint64_t ends[METRICS_ENDS], act;
    const char *name = NULL;
    bool other = metrics_has_other(pw, n);

    if (active)
        metrics_head(o, "mxproxy_sessions_active", "gauge", "Sessions open now, by listener.");
    else
        metrics_head(o, "mxproxy_sessions_total", "counter",
                     "Sessions ended, by listener and end reason (the end= of ev=close).");
    for (;;) {
        name = metrics_next_name(pw, n, name);
        if (name == NULL && !other)
            break;
        metrics_sum_listener(pw, n, name, ends, &act);
        const char *label = name != NULL ? name : METRICS_OTHER_LISTENER;
        if (active) {
            metrics_sample(o, "mxproxy_sessions_active", "listener", label, NULL, NULL, act);
        } else {
            for (unsigned e = 0; e < METRICS_ENDS; e++)
                metrics_sample(o, "mxproxy_sessions_total", "listener", label, "end",
                               session_end_name((enum session_end)e), ends[e]);
        }
        if (name == NULL)
            break; /* the overflow slot comes last */
    }
}

/* mxproxy_accept_errors_total: every listener and error, from 0. */
static void metrics_render_accept_errors(struct metrics_out *o, struct metrics *const *pw,
                                         unsigned n)
{
    const char *name = NULL;
    bool other = metrics_has_other(pw, n);

    metrics_head(o, "mxproxy_accept_errors_total", "counter",
                 "Failed accepts by listener and error (ev=accept_error); accepting pauses "
                 "briefly after each.");
    for (;;) {
        name = metrics_next_name(pw, n, name);
        if (name == NULL && !other)
            break;
        for (unsigned e = 0; e < METRICS_ACCEPT_ERRORS; e++) {
            uint64_t sum = 0;
            for (unsigned w = 0; w < n; w++) {
                const struct metrics_listener *l = metrics_find_listener(pw[w], name);
                if (l != NULL)
                    sum += metrics_get(&l->accept_errors[e]);
            }
            metrics_sample(o, "mxproxy_accept_errors_total", "listener",
                           name != NULL ? name : METRICS_OTHER_LISTENER, "error",
                           metrics_accept_error_names[e], sum);
        }
        if (name == NULL)
            break; /* the overflow slot comes last */
    }
}

static const char *metrics_verb(enum smtp_cmd cmd)
{
    return cmd == SMTP_CMD_NONE ? "none" : smtp_cmd_name(cmd);
}

enum metrics_hist_id {
    METRICS_HIST_CONNECT,
    METRICS_HIST_GREETING,
    METRICS_HIST_REPLY,
};

static const struct metrics_hist *metrics_hist_of(const struct metrics *m, enum metrics_hist_id id)
{
    switch (id) {
    case METRICS_HIST_CONNECT:
        return &m->connect;
    case METRICS_HIST_GREETING:
        return &m->greeting;
    case METRICS_HIST_REPLY:
        return &m->reply;
    }
    abort(); /* every histogram is listed above */
}

static void metrics_render_hist(struct metrics_out *o, struct metrics *const *pw, unsigned n,
                                enum metrics_hist_id id, const char *name, const char *help)
{
    uint64_t buckets[METRICS_BUCKETS + 1] = {0}, sum = 0, cum = 0;
    char sample[64];

    for (unsigned w = 0; w < n; w++) {
        const struct metrics_hist *h = metrics_hist_of(pw[w], id);
        for (unsigned i = 0; i <= METRICS_BUCKETS; i++)
            buckets[i] += metrics_get(&h->buckets[i]);
        sum += metrics_get(&h->sum_ns);
    }
    metrics_head(o, name, "histogram", help);
    snprintf(sample, sizeof(sample), "%s_bucket", name);
    for (unsigned i = 0; i <= METRICS_BUCKETS; i++) {
        cum += buckets[i];
        metrics_sample(o, sample, "le", i < METRICS_BUCKETS ? metrics_bounds_text[i] : "+Inf", NULL,
                       NULL, cum);
    }
    metrics_puts(o, name);
    metrics_puts(o, "_sum ");
    metrics_seconds(o, sum);
    metrics_puts(o, "\n");
    metrics_puts(o, name);
    metrics_puts(o, "_count ");
    metrics_u64(o, cum);
    metrics_puts(o, "\n");
}

size_t metrics_render(struct metrics *const *per_worker, unsigned n, char *out, size_t cap)
{
    struct metrics_out o = {.p = out, .cap = cap, .len = 0};
    uint64_t sum;

    metrics_render_sessions(&o, per_worker, n, false);
    metrics_render_sessions(&o, per_worker, n, true);

    metrics_head(&o, "mxproxy_replies_total", "counter",
                 "SMTP replies to clients by command and code class (mode smtp); "
                 "verb=\"none\" is the greeting.");
    for (unsigned v = 0; v < METRICS_VERBS; v++) {
        for (unsigned c = 0; c < METRICS_CLASSES; c++) {
            sum = 0;
            for (unsigned w = 0; w < n; w++)
                sum += metrics_get(&per_worker[w]->replies[v][c]);
            metrics_sample(&o, "mxproxy_replies_total", "verb", metrics_verb((enum smtp_cmd)v),
                           "class", metrics_classes[c], sum);
        }
    }

    /* Only the pairs that happened: 43 commands times 5 statuses would be mostly zeros. */
    metrics_head(&o, "mxproxy_imap_responses_total", "counter",
                 "IMAP responses that ended a command, by command and status (mode imap); "
                 "command=\"none\" is the greeting and lines mxproxy refused itself.");
    for (unsigned v = 0; v < METRICS_IMAP_CMDS; v++) {
        for (unsigned st = IMAP_ST_OK; st < METRICS_IMAP_STATUSES; st++) {
            sum = 0;
            for (unsigned w = 0; w < n; w++)
                sum += metrics_get(&per_worker[w]->imap[v][st]);
            if (sum > 0)
                metrics_sample(&o, "mxproxy_imap_responses_total", "command",
                               v == IMAP_CMD_NONE ? "none" : imap_cmd_name((enum imap_cmd)v),
                               "status", imap_status_name((enum imap_status)st), sum);
        }
    }

    metrics_head(&o, "mxproxy_pop3_responses_total", "counter",
                 "POP3 responses to clients by the command they answer and status (mode pop3); "
                 "command=\"none\" is the greeting.");
    for (unsigned v = 0; v < METRICS_POP3_CMDS; v++) {
        for (unsigned ok = 0; ok < 2; ok++) {
            sum = 0;
            for (unsigned w = 0; w < n; w++)
                sum += metrics_get(&per_worker[w]->pop3[v][ok]);
            metrics_sample(&o, "mxproxy_pop3_responses_total", "command",
                           v == POP3_CMD_NONE ? "none" : pop3_cmd_name((enum pop3_cmd)v), "status",
                           ok ? "+OK" : "-ERR", sum);
        }
    }

    metrics_render_accept_errors(&o, per_worker, n);

    metrics_head(&o, "mxproxy_bytes_total", "counter",
                 "Bytes read from clients (up) and from backends (down), counted when a "
                 "session ends.");
    sum = 0;
    for (unsigned w = 0; w < n; w++)
        sum += metrics_get(&per_worker[w]->bytes_up);
    metrics_sample(&o, "mxproxy_bytes_total", "direction", "up", NULL, NULL, sum);
    sum = 0;
    for (unsigned w = 0; w < n; w++)
        sum += metrics_get(&per_worker[w]->bytes_down);
    metrics_sample(&o, "mxproxy_bytes_total", "direction", "down", NULL, NULL, sum);

    metrics_head(&o, "mxproxy_tls_handshakes_total", "counter",
                 "TLS handshakes by side (client or backend) and result.");
    for (int side = 1; side >= 0; side--) {
        for (int ok = 1; ok >= 0; ok--) {
            sum = 0;
            for (unsigned w = 0; w < n; w++)
                sum += metrics_get(&per_worker[w]->tls[side][ok]);
            metrics_sample(&o, "mxproxy_tls_handshakes_total", "side", side ? "client" : "backend",
                           "result", ok ? "ok" : "error", sum);
        }
    }

    metrics_render_hist(&o, per_worker, n, METRICS_HIST_CONNECT, "mxproxy_connect_seconds",
                        "Time to connect to a backend.");
    metrics_render_hist(&o, per_worker, n, METRICS_HIST_GREETING, "mxproxy_greeting_seconds",
                        "Time from accept to the first byte of the backend's greeting "
                        "(mode smtp).");
    metrics_render_hist(&o, per_worker, n, METRICS_HIST_REPLY, "mxproxy_reply_seconds",
                        "Time from a command's last byte to its reply's first byte (mode smtp).");

    if (cap > 0)
        out[o.len < cap ? o.len : cap - 1] = '\0';
    return o.len;
}
