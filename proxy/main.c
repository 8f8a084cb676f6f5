/* main.c: command line, signals, workers, reload and drain. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

#include "admin.h"
#include "config.h"
#include "discover.h"
#include "health.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "sockaddr.h"
#include "worker.h"

/* State of the main thread; the workers reach it only through on_* hooks
 * that bump an atomic counter and wake the main loop. */
static struct {
    uv_loop_t *loop;
    uv_signal_t sighup, sigterm, sigint;
    uv_async_t wake;    /* a worker closed its listeners or exited */
    struct config *cfg; /* current config, owned reference */
    const char *path;   /* -c FILE */
    struct worker *workers;
    unsigned n_workers;
    bool draining;                 /* SIGTERM/SIGINT seen once */
    unsigned stop_signals;         /* SIGTERM/SIGINT seen after the first */
    bool drain_logged;             /* ev=drain written */
    unsigned reloads;              /* configs posted to the workers by SIGHUP */
    bool ready_owed;               /* RELOADING=1 sent, READY=1 not yet */
    atomic_uint listeners_closed;  /* workers that closed their listeners */
    atomic_uint exited;            /* workers whose loop ended */
    struct admin *admin;           /* the admin endpoint, or NULL */
    bool has_admin;                /* admin_addr is the address admin serves (or failed to) */
    struct config_addr admin_addr; /* address of the current admin endpoint */
    struct metrics **metrics;      /* &workers[i].metrics, for metrics_render */
    struct health *health;         /* the health checker, NULL once stopped */
    struct discover *discover;     /* DNS discovery of backends, NULL once stopped */
    struct sessview **views;       /* &workers[i].view, for sessview_render */
} mx;

static void main_usage(FILE *out)
{
    fprintf(out, "usage: mxproxy -c FILE     run in the foreground, logging to stderr\n"
                 "       mxproxy -t -c FILE  check FILE and exit (0: valid, 1: invalid)\n"
                 "       mxproxy -V          print the version\n");
}

/* Tells the service manager (systemd, Type=notify) of a state change; a
 * failure is logged, never fatal: mxproxy serves all the same. */
static void main_notify(enum notify_state s)
{
    char state[64];
    struct log_line l;

    int rc = notify_send(s);
    if (rc == 0 || !log_enabled(LOG_WARN))
        return;
    notify_format(s, state, sizeof(state));
    log_begin(&l, LOG_WARN, "notify_error");
    log_str(&l, "state", state);
    log_str(&l, "error", uv_strerror(rc));
    log_end(&l);
}

/* READY=1 after a reload, once every worker has bound the new listeners. */
static void main_notify_reloaded(void)
{
    if (!mx.ready_owed || mx.draining)
        return;
    for (unsigned i = 0; i < mx.n_workers; i++)
        if (atomic_load(&mx.workers[i].cfg_applied) != mx.reloads)
            return;
    mx.ready_owed = false;
    main_notify(NOTIFY_READY);
}

static void main_apply_logging(const struct config *c)
{
    log_configure(c->log_format == CONFIG_LOG_JSON ? LOG_FORMAT_JSON : LOG_FORMAT_LOGFMT,
                  (enum log_level)c->log_level);
}

static unsigned main_active_sessions(void)
{
    unsigned n = 0;
    for (unsigned i = 0; i < mx.n_workers; i++)
        n += atomic_load(&mx.workers[i].n_sessions);
    return n;
}

static bool main_admin_ready(void *arg)
{
    (void)arg;
    return !mx.draining;
}

static size_t main_admin_render(void *arg, char *out, size_t cap)
{
    (void)arg;
    size_t n = metrics_render(mx.metrics, mx.n_workers, out, cap);
    /* Appended over the NUL; when the first part did not fit, neither does the whole. */
    size_t more = metrics_render_backends(mx.cfg, uv_hrtime() / 1000000, n < cap ? out + n : out,
                                          n < cap ? cap - n : 0);
    return n + more;
}

static long main_admin_sessions(void *arg, const struct sessview_filter *f, char **out)
{
    (void)arg;
    return sessview_render(mx.views, mx.n_workers, mx.cfg->recent_sessions, f, out);
}

static void main_log_admin(enum log_level lvl, const char *ev, const char *addr, int rc)
{
    struct log_line l;

    if (!log_enabled(lvl))
        return;
    log_begin(&l, lvl, ev);
    log_str(&l, "addr", addr);
    if (rc != 0)
        log_str(&l, "error", uv_strerror(rc));
    log_end(&l);
}

static const struct admin_ops main_admin_ops = {
    .ready = main_admin_ready,
    .render = main_admin_render,
    .sessions = main_admin_sessions,
};

/* Gives mx.admin (if any) the limits of config c. */
static void main_admin_limits(const struct config *c)
{
    struct admin_limits lim = {
        .max_conns = c->admin_max_connections,
        .max_per_peer = c->admin_max_per_peer,
        .header_timeout_ms = c->admin_header_timeout_ms,
    };
    admin_set_limits(mx.admin, &lim);
}

/* Starts the admin endpoint on addr into mx.admin and logs the outcome. */
static int main_admin_bind(const struct config_addr *addr)
{
    int rc = admin_start(&mx.admin, mx.loop, addr, &main_admin_ops);
    main_admin_limits(mx.cfg);
    main_log_admin(rc == 0 ? LOG_INFO : LOG_ERROR, rc == 0 ? "admin_listen" : "admin_error",
                   addr->text, rc);
    return rc;
}

/* SIGHUP: follow a changed "admin" address. The new socket is bound before
 * the old one closes, so scrapes see no gap; when the old socket holds the
 * port (127.0.0.1:9180 -> 0.0.0.0:9180), it closes first. If the new address
 * cannot be bound, the old one is kept (or bound again) and the next reload
 * tries anew. */
static void main_reload_admin(const struct config *next)
{
    struct admin *old = mx.admin;
    bool want = config_addr_given(&next->admin);
    int rc = 0;

    if (want == mx.has_admin && (!want || mx.admin != NULL) &&
        (!want || sockaddr_equal((const struct sockaddr *)&next->admin.sa,
                                 (const struct sockaddr *)&mx.admin_addr.sa)))
        return;
    mx.admin = NULL;
    if (want) {
        rc = admin_start(&mx.admin, mx.loop, &next->admin, &main_admin_ops);
        if (rc != 0 && old != NULL) {
            admin_stop(old); /* it may hold the port */
            old = NULL;
            main_log_admin(LOG_INFO, "admin_unlisten", mx.admin_addr.text, 0);
            rc = admin_start(&mx.admin, mx.loop, &next->admin, &main_admin_ops);
        }
    }
    if (rc != 0) {
        main_log_admin(LOG_ERROR, "admin_error", next->admin.text, rc);
        if (mx.has_admin)
            (void)main_admin_bind(&mx.admin_addr); /* back to the old address */
        return;
    }
    if (old != NULL) {
        admin_stop(old);
        main_log_admin(LOG_INFO, "admin_unlisten", mx.admin_addr.text, 0);
    }
    if (want)
        main_log_admin(LOG_INFO, "admin_listen", next->admin.text, 0);
    mx.has_admin = want;
    mx.admin_addr = next->admin;
}

/* True when cur (the running config, or NULL) has a listener on the port
 * of addr: this process may hold a socket there, so a probe of addr could
 * find mxproxy itself (127.0.0.1:25 becoming 0.0.0.0:25 on reload). */
static bool main_holds_port(const struct config *cur, const struct config_addr *addr)
{
    if (cur == NULL)
        return false;
    for (size_t i = 0; i < cur->n_listeners; i++) {
        const struct sockaddr *a = (const struct sockaddr *)&cur->listeners[i].listen.sa;
        if (a->sa_family == addr->sa.ss_family &&
            sockaddr_port(a) == sockaddr_port((const struct sockaddr *)&addr->sa))
            return true;
    }
    return false;
}

/* Refuses listen addresses another process already holds: every worker
 * socket sets SO_REUSEPORT, which would otherwise let a second mxproxy (or
 * anything of the same user) share the port and take part of the clients.
 * Probes each address of next that cur does not hold. Returns 0, or -1 with
 * "FILE:LINE: listener 'NAME': address already in use" in err. Other bind
 * errors are left to the workers' binds, which report them. */
static int main_probe_listeners(const struct config *next, const struct config *cur, char *err,
                                size_t cap)
{
    for (size_t i = 0; i < next->n_listeners; i++) {
        const struct config_listener *cl = &next->listeners[i];
        if (main_holds_port(cur, &cl->listen))
            continue;
        if (listener_probe(cl) == UV_EADDRINUSE) {
            snprintf(err, cap, "%s:%d: listener '%s': address already in use", next->path, cl->line,
                     cl->name);
            return -1;
        }
    }
    return 0;
}

/* Secrets on disk decrypt every session: say so at start and at every reload, so it
 * is never left on unnoticed. */
static void main_warn_keylog(const struct config *c)
{
    struct log_line l;

    if (c->tls_keylog != NULL && log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "tls_keylog");
        log_str(&l, "file", c->tls_keylog);
        log_str(&l, "msg", "TLS secrets of every session are written to this file");
        log_end(&l);
    }
}

/* Puts next, whose reference it takes, in place of the running config: after
 * SIGHUP, or when a backend name's addresses changed. Returns 0, or -1 with a
 * message in err and next released; the running config then stays. */
static int main_install(struct config *next, char *err, size_t errlen)
{
    if (config_check_supported(next, err, errlen) != 0 ||
        main_probe_listeners(next, mx.cfg, err, errlen) != 0) {
        config_unref(next);
        return -1;
    }
    config_inherit_shared(next, mx.cfg);
    if (next->workers != mx.n_workers)
        log_msg(LOG_WARN, "reload_warning",
                "workers changed from %u to %u: takes effect after a restart", mx.n_workers,
                next->workers);
    main_apply_logging(next);
    if (health_reload(mx.health, next) != 0)
        log_msg(LOG_ERROR, "reload_warning", "out of memory: health checks keep the old config");
    main_reload_admin(next);
    main_admin_limits(next);
    for (unsigned i = 0; i < mx.n_workers; i++)
        worker_post_config(&mx.workers[i], next);
    mx.reloads++;
    config_unref(mx.cfg);
    mx.cfg = next;
    discover_reload(mx.discover, next);
    return 0;
}

/* A backend name's addresses changed (discover.c): new sessions use the new set. */
static int main_install_discovered(struct config *next, char *err, size_t errlen)
{
    if (mx.draining) {
        snprintf(err, errlen, "draining");
        config_unref(next);
        return -1;
    }
    return main_install(next, err, errlen);
}

static void main_reload(void)
{
    char err[CONFIG_ERR_MAX];
    struct config *next;
    struct log_line l;

    if (config_load_file(mx.path, &next, err, sizeof(err)) != 0 ||
        main_install(next, err, sizeof(err)) != 0) {
        log_begin(&l, LOG_ERROR, "reload_error");
        log_str(&l, "error", err);
        log_end(&l);
        main_notify_reloaded(); /* the running config stays: nothing to wait for */
        return;
    }
    main_warn_keylog(next);
    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, "reload");
        log_str(&l, "config", mx.path);
        log_uint(&l, "listeners", next->n_listeners);
        log_end(&l);
    }
}

static void main_on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (signum == SIGHUP) {
        if (!mx.draining) {
            main_notify(NOTIFY_RELOADING);
            mx.ready_owed = true;
            main_reload();
        }
        return;
    }
    if (!mx.draining) {
        mx.draining = true;
        main_notify(NOTIFY_STOPPING);
        discover_stop(mx.discover); /* the backends are what they are until the end */
        mx.discover = NULL;
        for (unsigned i = 0; i < mx.n_workers; i++)
            worker_post_drain(&mx.workers[i], mx.cfg->drain_timeout_ms);
        return;
    }
    /* A second SIGTERM/SIGINT: the drain deadline is now, but a reply the
     * backend owes (a message it may already have stored) is still awaited
     * for up to drain_grace, so no client is told 421 for mail that was
     * accepted. A third one stops waiting for anything. */
    if (++mx.stop_signals == 1) {
        log_msg(LOG_WARN, "drain_cut",
                "second signal: closing %u sessions, waiting up to %ums for owed replies",
                main_active_sessions(), mx.cfg->drain_grace_ms);
        for (unsigned i = 0; i < mx.n_workers; i++)
            worker_post_deadline(&mx.workers[i]);
        return;
    }
    log_msg(LOG_WARN, "drain_cut", "third signal: closing %u sessions now", main_active_sessions());
    for (unsigned i = 0; i < mx.n_workers; i++)
        worker_post_cut(&mx.workers[i]);
}

static void main_on_wake(uv_async_t *a)
{
    (void)a;
    main_notify_reloaded();
    if (!mx.drain_logged && atomic_load(&mx.listeners_closed) == mx.n_workers) {
        struct log_line l;
        mx.drain_logged = true;
        /* Logged once every listener is closed: connects from here on are refused. */
        if (log_enabled(LOG_INFO)) {
            log_begin(&l, LOG_INFO, "drain");
            log_uint(&l, "sessions", main_active_sessions());
            log_uint(&l, "timeout_ms", mx.cfg->drain_timeout_ms);
            log_end(&l);
        }
    }
    if (atomic_load(&mx.exited) == mx.n_workers) {
        /* Last step: /readyz answered 503 through the whole drain. */
        health_stop(mx.health);
        mx.health = NULL;
        discover_stop(mx.discover);
        mx.discover = NULL;
        admin_stop(mx.admin);
        mx.admin = NULL;
        uv_close((uv_handle_t *)&mx.sighup, NULL);
        uv_close((uv_handle_t *)&mx.sigterm, NULL);
        uv_close((uv_handle_t *)&mx.sigint, NULL);
        uv_close((uv_handle_t *)&mx.wake, NULL);
    }
}

static void main_on_worker_listeners_closed(struct worker *w)
{
    (void)w;
    atomic_fetch_add(&mx.listeners_closed, 1);
    uv_async_send(&mx.wake);
}

static void main_on_worker_config_applied(struct worker *w)
{
    (void)w;
    uv_async_send(&mx.wake);
}

static void main_on_worker_exit(struct worker *w)
{
    (void)w;
    atomic_fetch_add(&mx.exited, 1);
    uv_async_send(&mx.wake);
}

/* Each session holds two sockets: take every descriptor the hard limit allows. */
static void main_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int main_run(void)
{
    struct log_line l;

    mx.loop = uv_default_loop();
    uv_async_init(mx.loop, &mx.wake, main_on_wake);
    mx.n_workers = mx.cfg->workers;
    mx.workers = calloc(mx.n_workers, sizeof(*mx.workers));
    mx.metrics = calloc(mx.n_workers, sizeof(*mx.metrics));
    mx.views = calloc(mx.n_workers, sizeof(*mx.views));
    if (mx.workers == NULL || mx.metrics == NULL || mx.views == NULL) {
        fprintf(stderr, "mxproxy: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < mx.n_workers; i++) {
        mx.metrics[i] = &mx.workers[i].metrics;
        mx.views[i] = &mx.workers[i].view;
    }
    /* Bound before the workers, so a bad admin address stops the start
     * cleanly; it answers once the loop runs, after every listener is up. */
    if (config_addr_given(&mx.cfg->admin)) {
        mx.has_admin = true;
        mx.admin_addr = mx.cfg->admin;
        if (main_admin_bind(&mx.admin_addr) != 0) {
            log_close(); /* the admin_error line says which address failed */
            return 1;
        }
    }
    /* Checks begin once the loop runs, alongside the first sessions. */
    if (health_start(&mx.health, mx.loop, mx.cfg) != 0 ||
        discover_start(&mx.discover, mx.loop, mx.cfg, main_install_discovered) != 0) {
        fprintf(stderr, "mxproxy: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < mx.n_workers; i++) {
        struct worker *w = &mx.workers[i];
        w->on_listeners_closed = main_on_worker_listeners_closed;
        w->on_exit = main_on_worker_exit;
        w->on_config_applied = main_on_worker_config_applied;
        if (worker_start(w, i, mx.cfg) != 0) {
            log_close(); /* the listen_error line says which address failed */
            return 1;
        }
    }
    uv_signal_init(mx.loop, &mx.sighup);
    uv_signal_init(mx.loop, &mx.sigterm);
    uv_signal_init(mx.loop, &mx.sigint);
    uv_signal_start(&mx.sighup, main_on_signal, SIGHUP);
    uv_signal_start(&mx.sigterm, main_on_signal, SIGTERM);
    uv_signal_start(&mx.sigint, main_on_signal, SIGINT);

    main_warn_keylog(mx.cfg);
    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, "start");
        log_str(&l, "version", MXPROXY_VERSION);
        log_uint(&l, "workers", mx.n_workers);
        log_str(&l, "config", mx.path);
        log_end(&l);
    }
    main_notify(NOTIFY_READY); /* worker_start() bound every listener */

    uv_run(mx.loop, UV_RUN_DEFAULT);

    for (unsigned i = 0; i < mx.n_workers; i++)
        worker_join(&mx.workers[i]);
    free(mx.metrics);
    mx.metrics = NULL;
    free(mx.views);
    mx.views = NULL;
    free(mx.workers);
    mx.workers = NULL;
    log_msg(LOG_INFO, "stop", "all sessions closed");
    config_unref(mx.cfg);
    mx.cfg = NULL;
    uv_loop_close(mx.loop);
    return 0;
}

int main(int argc, char **argv)
{
    char err[CONFIG_ERR_MAX];
    bool test_only = false;
    int opt;

    while ((opt = getopt(argc, argv, "c:thV")) != -1) {
        switch (opt) {
        case 'c':
            mx.path = optarg;
            break;
        case 't':
            test_only = true;
            break;
        case 'V':
            printf("mxproxy %s\n", MXPROXY_VERSION);
            return 0;
        case 'h':
            main_usage(stdout);
            return 0;
        default:
            main_usage(stderr);
            return 2;
        }
    }
    if (mx.path == NULL || optind != argc) {
        main_usage(stderr);
        return 2;
    }
    if (config_load_file(mx.path, &mx.cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (config_check_supported(mx.cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        config_unref(mx.cfg);
        return 1;
    }
    if (test_only) {
        printf("%s: configuration is valid\n", mx.path);
        config_unref(mx.cfg);
        return 0;
    }

    if (main_probe_listeners(mx.cfg, NULL, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        config_unref(mx.cfg);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    main_raise_nofile();
    log_open(2, mx.cfg->log_format == CONFIG_LOG_JSON ? LOG_FORMAT_JSON : LOG_FORMAT_LOGFMT,
             (enum log_level)mx.cfg->log_level);
    int rc = main_run();
    log_close();
    return rc;
}
