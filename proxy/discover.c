/* discover.c: backend host names asked again every resolve_interval. */
#include "discover.h"

#include "config.h"
#include "log.h"
#include "resolve.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* One name of a round: asked on the thread pool, answered in place. */
struct discover_ask {
    char host[CONFIG_HOST_MAX + 1];
    struct resolve_set set;
    int rc;
    char err[RESOLVE_ERR_MAX];
};

struct discover {
    uv_loop_t *loop;
    uv_timer_t timer;
    uv_work_t work;
    struct config *cfg; /* the running config, a reference */
    discover_apply_fn apply;
    bool busy;         /* a round is on the thread pool */
    bool stopped;      /* discover_stop(): free once idle and the timer closed */
    bool timer_closed; /* the timer's close callback ran */
    /* The round in flight: its resolver ("" for the system's) and names. The
     * thread pool owns them until the round's after-work callback. */
    char server[CONFIG_ADDR_TEXT_MAX];
    struct discover_ask *asks;
    size_t n_asks;
    /* The answers a rebuild last failed with (a certificate gone since, more than 64
     * backends): not tried, nor logged, again until an answer differs. */
    struct config_name *rejected;
    size_t n_rejected;
    /* Names whose lookups fail, logged once until they answer again. */
    char (*failing)[CONFIG_HOST_MAX + 1];
    size_t n_failing;
};

static void discover_free(struct discover *d)
{
    config_unref(d->cfg);
    free(d->rejected);
    free(d->failing);
    free(d);
}

static void discover_maybe_free(struct discover *d)
{
    if (d->stopped && d->timer_closed && !d->busy)
        discover_free(d);
}

static long discover_failing_index(const struct discover *d, const char *host)
{
    for (size_t i = 0; i < d->n_failing; i++)
        if (strcasecmp(d->failing[i], host) == 0)
            return (long)i;
    return -1;
}

/* A failed lookup: logged when the name starts failing, not at every round. */
static void discover_failed(struct discover *d, const struct discover_ask *a, size_t kept)
{
    struct log_line l;

    if (discover_failing_index(d, a->host) >= 0)
        return;
    void *grown = realloc(d->failing, (d->n_failing + 1) * sizeof(*d->failing));
    if (grown != NULL) {
        d->failing = grown;
        memcpy(d->failing[d->n_failing++], a->host, sizeof(a->host));
    }
    if (!log_enabled(LOG_WARN))
        return;
    log_begin(&l, LOG_WARN, "resolve_error");
    log_str(&l, "name", a->host);
    log_str(&l, "error", a->err);
    log_uint(&l, "kept", kept);
    log_end(&l);
}

static void discover_answered(struct discover *d, const char *host)
{
    long i = discover_failing_index(d, host);

    if (i < 0)
        return;
    d->n_failing--;
    memmove(d->failing[i], d->failing[d->n_failing], sizeof(d->failing[i]));
}

static struct config_name *discover_find(struct config_name *names, size_t n, const char *host)
{
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(names[i].host, host) == 0)
            return &names[i];
    return NULL;
}

static void discover_log_change(const struct config_name *was, const struct config_name *now)
{
    char added[512];
    char removed[512];
    struct log_line l;

    if (!log_enabled(LOG_INFO))
        return;
    resolve_set_minus(&now->addrs, &was->addrs, added, sizeof(added));
    resolve_set_minus(&was->addrs, &now->addrs, removed, sizeof(removed));
    log_begin(&l, LOG_INFO, "backends");
    log_str(&l, "name", now->host);
    log_str(&l, "added", added);
    log_str(&l, "removed", removed);
    log_uint(&l, "addresses", now->addrs.n);
    log_end(&l);
}

static bool discover_same_answers(const struct config_name *a, const struct config_name *b,
                                  size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(a[i].host, b[i].host) != 0 || !resolve_set_equal(&a[i].addrs, &b[i].addrs))
            return false;
    return true;
}

/* The round's answers against the running config: a changed name rebuilds it. */
static void discover_compare(struct discover *d)
{
    struct config *old = d->cfg;
    struct config_name *names;
    struct config *next;
    char err[CONFIG_ERR_MAX];
    const char *first = NULL;
    struct log_line l;

    names = malloc(old->n_names * sizeof(*names));
    if (names == NULL)
        return; /* the next round tries again */
    memcpy(names, old->names, old->n_names * sizeof(*names));
    for (size_t i = 0; i < d->n_asks; i++) {
        const struct discover_ask *a = &d->asks[i];
        struct config_name *n = discover_find(names, old->n_names, a->host);

        if (n == NULL) /* a reload dropped the name meanwhile */
            continue;
        if (a->rc != 0) {
            discover_failed(d, a, n->addrs.n);
            continue;
        }
        discover_answered(d, a->host);
        if (!resolve_set_equal(&n->addrs, &a->set)) {
            n->addrs = a->set;
            first = first != NULL ? first : n->host;
        }
    }
    if (first == NULL || (d->rejected != NULL && d->n_rejected == old->n_names &&
                          discover_same_answers(d->rejected, names, old->n_names))) {
        free(names);
        return;
    }
    config_ref(old);
    if (config_load_rebuild(old, names, old->n_names, &next, err, sizeof(err)) != 0 ||
        d->apply(next, err, sizeof(err)) != 0) {
        /* Kept as it was, until an answer differs from these or a reload. */
        if (log_enabled(LOG_WARN)) {
            log_begin(&l, LOG_WARN, "resolve_error");
            log_str(&l, "name", first);
            log_str(&l, "error", err);
            log_end(&l);
        }
        free(d->rejected);
        d->rejected = names;
        d->n_rejected = old->n_names;
        names = NULL;
    } else {
        for (size_t i = 0; i < old->n_names; i++)
            if (!resolve_set_equal(&old->names[i].addrs, &names[i].addrs))
                discover_log_change(&old->names[i], &names[i]);
    }
    config_unref(old);
    free(names);
}

static void discover_run(uv_work_t *w)
{
    struct discover *d = w->data;

    for (size_t i = 0; i < d->n_asks; i++) {
        struct discover_ask *a = &d->asks[i];
        a->rc = resolve_host(d->server[0] != '\0' ? d->server : NULL, a->host,
                             CONFIG_RESOLVE_TIMEOUT_MS, &a->set, a->err, sizeof(a->err));
    }
}

static void discover_done(uv_work_t *w, int status)
{
    struct discover *d = w->data;

    d->busy = false;
    if (status == 0 && !d->stopped)
        discover_compare(d);
    free(d->asks);
    d->asks = NULL;
    d->n_asks = 0;
    discover_maybe_free(d);
}

static void discover_on_timer(uv_timer_t *t)
{
    struct discover *d = t->data;
    const struct config *c = d->cfg;

    if (d->busy || c->n_names == 0)
        return;
    d->asks = calloc(c->n_names, sizeof(*d->asks));
    if (d->asks == NULL)
        return;
    d->n_asks = c->n_names;
    for (size_t i = 0; i < c->n_names; i++)
        memcpy(d->asks[i].host, c->names[i].host, sizeof(d->asks[i].host));
    memcpy(d->server, config_addr_given(&c->resolver) ? c->resolver.text : "",
           config_addr_given(&c->resolver) ? sizeof(d->server) : 1);
    d->work.data = d;
    d->busy = true;
    if (uv_queue_work(d->loop, &d->work, discover_run, discover_done) != 0) {
        d->busy = false;
        free(d->asks);
        d->asks = NULL;
        d->n_asks = 0;
    }
}

static void discover_arm(struct discover *d)
{
    const struct config *c = d->cfg;

    if (c->n_names > 0 && c->resolve_interval_ms > 0)
        uv_timer_start(&d->timer, discover_on_timer, c->resolve_interval_ms,
                       c->resolve_interval_ms);
    else
        uv_timer_stop(&d->timer);
}

int discover_start(struct discover **out, uv_loop_t *loop, struct config *cfg,
                   discover_apply_fn apply)
{
    struct discover *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return UV_ENOMEM;
    d->loop = loop;
    d->apply = apply;
    d->cfg = config_ref(cfg);
    uv_timer_init(loop, &d->timer);
    d->timer.data = d;
    discover_arm(d);
    *out = d;
    return 0;
}

void discover_reload(struct discover *d, struct config *cfg)
{
    if (d == NULL || d->stopped)
        return;
    free(d->rejected); /* a new config may take what the old one could not */
    d->rejected = NULL;
    d->n_rejected = 0;
    config_ref(cfg);
    config_unref(d->cfg);
    d->cfg = cfg;
    discover_arm(d);
}

static void discover_on_timer_closed(uv_handle_t *h)
{
    struct discover *d = h->data;

    d->timer_closed = true;
    discover_maybe_free(d);
}

void discover_stop(struct discover *d)
{
    if (d == NULL || d->stopped)
        return;
    d->stopped = true;
    uv_close((uv_handle_t *)&d->timer, discover_on_timer_closed);
}
