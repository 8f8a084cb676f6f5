/* worker.c: event-loop threads; see worker.h. */
#include "worker.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "config.h"
#include "listener.h"
#include "log.h"
#include "proto.h"
#include "session.h"
#include "sockaddr.h"

static void worker_log_listen(const struct worker *w, const struct config_listener *cl,
                              const char *ev)
{
    struct log_line l;

    if (w->id != 0 || !log_enabled(LOG_INFO))
        return; /* every worker binds the same sockets: say it once */
    log_begin(&l, LOG_INFO, ev);
    log_str(&l, "listener", cl->name);
    log_str(&l, "addr", cl->listen.text);
    log_str(&l, "mode", config_mode_name(cl->mode));
    log_end(&l);
}

static void worker_log_listen_error(const struct worker *w, const struct config_listener *cl,
                                    int rc)
{
    struct log_line l;

    log_begin(&l, LOG_ERROR, "listen_error");
    log_str(&l, "listener", cl->name);
    log_str(&l, "addr", cl->listen.text);
    log_uint(&l, "worker", w->id);
    log_str(&l, "error", uv_strerror(rc));
    log_end(&l);
}

/* Makes w's listeners match cfg: keeps sockets whose address is unchanged
 * (pointing them at their new config), opens new ones, closes the rest. */
static void worker_apply_listeners(struct worker *w, const struct config *cfg)
{
    struct listener *kept = NULL;

    for (size_t i = 0; i < cfg->n_listeners; i++) {
        const struct config_listener *cl = &cfg->listeners[i];
        struct listener **pp = &w->listeners, *l;

        while (*pp != NULL && !sockaddr_equal((const struct sockaddr *)&(*pp)->cl->listen.sa,
                                              (const struct sockaddr *)&cl->listen.sa))
            pp = &(*pp)->next;
        if (*pp != NULL) {
            l = *pp;
            *pp = l->next;
            l->cl = cl;
        } else {
            int rc = listener_open(w, cl, &l);
            if (rc != 0) {
                worker_log_listen_error(w, cl, rc);
                continue;
            }
            worker_log_listen(w, cl, "listen");
        }
        metrics_listener_seen(&w->metrics, cl->name);
        l->next = kept;
        kept = l;
    }
    while (w->listeners != NULL) {
        struct listener *l = w->listeners;
        w->listeners = l->next;
        worker_log_listen(w, l->cl, "unlisten");
        listener_close(l);
    }
    w->listeners = kept;
}

static void worker_close_listeners(struct worker *w)
{
    while (w->listeners != NULL) {
        struct listener *l = w->listeners;
        w->listeners = l->next;
        listener_close(l);
    }
}

/* Closes the worker's own handles so uv_run returns once sessions are gone. */
static void worker_finish(struct worker *w)
{
    if (uv_is_closing((uv_handle_t *)&w->wake))
        return;
    uv_close((uv_handle_t *)&w->wake, NULL);
    uv_close((uv_handle_t *)&w->drain_timer, NULL);
    uv_close((uv_handle_t *)&w->log_flush, NULL);
    uv_close((uv_handle_t *)&w->clock_phase, NULL);
}

void worker_session_gone(struct worker *w)
{
    if (w->draining && atomic_load(&w->n_sessions) == 0)
        worker_finish(w);
}

static void worker_on_drain_timer(uv_timer_t *t);

/* The drain deadline: sessions owing no reply end now; the others get
 * drain_grace to receive it, then they are cut. Idempotent. */
static void worker_drain_deadline(struct worker *w)
{
    if (w->drain_deadline)
        return;
    w->drain_deadline = true;
    session_close_all(w);
    if (!uv_is_closing((uv_handle_t *)&w->drain_timer))
        uv_timer_start(&w->drain_timer, worker_on_drain_timer, w->cfg->drain_grace_ms, 0);
}

static void worker_on_drain_timer(uv_timer_t *t)
{
    struct worker *w = t->data;

    if (!w->drain_deadline) {
        worker_drain_deadline(w);
        return;
    }
    session_cut_all(w);
}

static void worker_start_drain(struct worker *w, unsigned drain_ms)
{
    if (w->draining)
        return;
    w->draining = true;
    worker_close_listeners(w);
    if (w->on_listeners_closed != NULL)
        w->on_listeners_closed(w);
    if (atomic_load(&w->n_sessions) == 0) {
        worker_finish(w);
        return;
    }
    uv_timer_start(&w->drain_timer, worker_on_drain_timer, drain_ms, 0);
}

static void worker_on_wake(uv_async_t *a)
{
    struct worker *w = a->data;
    struct config *cfg;
    bool drain, deadline, cut;
    unsigned drain_ms, posted;

    uv_mutex_lock(&w->lock);
    cfg = w->pending_cfg;
    w->pending_cfg = NULL;
    posted = w->cfg_posted;
    drain = w->pending_drain;
    drain_ms = w->pending_drain_ms;
    deadline = w->pending_deadline;
    w->pending_deadline = false;
    cut = w->pending_cut;
    w->pending_cut = false;
    uv_mutex_unlock(&w->lock);

    if (cfg != NULL) {
        if (!w->draining) {
            worker_apply_listeners(w, cfg);
            config_unref(w->cfg);
            w->cfg = cfg;
        } else {
            config_unref(cfg);
        }
        atomic_store(&w->cfg_applied, posted);
        if (w->on_config_applied != NULL)
            w->on_config_applied(w);
    }
    if (drain)
        worker_start_drain(w, drain_ms);
    if (deadline && w->draining)
        worker_drain_deadline(w);
    if (cut && w->draining) {
        worker_drain_deadline(w);
        session_cut_all(w);
    }
}

/* Once per loop turn, before the loop may sleep: the lines this turn logged go to the
 * writer together (one lock, at most one wake-up), and the clock is read afresh after the
 * poll. */
static void worker_on_prepare(uv_prepare_t *p)
{
    (void)p;
    log_flush();
    clock_phase_end();
}

/* After the poll's callbacks: closing handles and the next turn's timers read the clock
 * afresh. */
static void worker_on_check(uv_check_t *c)
{
    (void)c;
    clock_phase_end();
}

static void worker_main(void *arg)
{
    struct worker *w = arg;

    if (log_thread_attach() == 0) {
        uv_prepare_start(&w->log_flush, worker_on_prepare);
        uv_unref((uv_handle_t *)&w->log_flush); /* never keeps the loop alive */
        uv_check_start(&w->clock_phase, worker_on_check);
        uv_unref((uv_handle_t *)&w->clock_phase);
        clock_phases_on(); /* both phase ends run */
    }
    uv_run(&w->loop, UV_RUN_DEFAULT);
    if (w->on_exit != NULL)
        w->on_exit(w);
    log_thread_detach();
}

int worker_start(struct worker *w, unsigned id, struct config *cfg)
{
    int rc;

    w->id = id;
    memset(&w->metrics, 0, sizeof(w->metrics)); /* all zero: no listener, no counts */
    rc = uv_loop_init(&w->loop);
    if (rc != 0)
        return rc;
    uv_async_init(&w->loop, &w->wake, worker_on_wake);
    w->wake.data = w;
    uv_timer_init(&w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    uv_prepare_init(&w->loop, &w->log_flush);
    uv_check_init(&w->loop, &w->clock_phase);
    uv_mutex_init(&w->lock);
    sessview_init(&w->view);
    w->cfg = config_ref(cfg);
    /* libuv opens a spare descriptor for the loop with its first stream
     * handle. Listeners are poll handles, so that would be the first
     * session's: take it now, and the descriptor count stays put from the
     * start (a steady baseline for leak checks). */
    uv_tcp_t first;
    uv_tcp_init(&w->loop, &first);
    uv_close((uv_handle_t *)&first, NULL);
    uv_run(&w->loop, UV_RUN_NOWAIT); /* runs the close; nothing else can fire yet */

    /* The loop does not run yet, so binding from this thread is safe. */
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        struct listener *l;
        rc = listener_open(w, &cfg->listeners[i], &l);
        if (rc != 0) {
            worker_log_listen_error(w, &cfg->listeners[i], rc);
            return rc;
        }
        l->next = w->listeners;
        w->listeners = l;
        metrics_listener_seen(&w->metrics, cfg->listeners[i].name);
        worker_log_listen(w, &cfg->listeners[i], "listen");
    }
    return uv_thread_create(&w->thread, worker_main, w);
}

void worker_post_config(struct worker *w, struct config *cfg)
{
    uv_mutex_lock(&w->lock);
    config_unref(w->pending_cfg); /* a newer reload supersedes one not yet applied */
    w->pending_cfg = config_ref(cfg);
    w->cfg_posted++;
    uv_mutex_unlock(&w->lock);
    uv_async_send(&w->wake);
}

void worker_post_drain(struct worker *w, unsigned drain_ms)
{
    uv_mutex_lock(&w->lock);
    w->pending_drain = true;
    w->pending_drain_ms = drain_ms;
    uv_mutex_unlock(&w->lock);
    uv_async_send(&w->wake);
}

void worker_post_deadline(struct worker *w)
{
    uv_mutex_lock(&w->lock);
    w->pending_deadline = true;
    uv_mutex_unlock(&w->lock);
    uv_async_send(&w->wake);
}

void worker_post_cut(struct worker *w)
{
    uv_mutex_lock(&w->lock);
    w->pending_cut = true;
    uv_mutex_unlock(&w->lock);
    uv_async_send(&w->wake);
}

void worker_join(struct worker *w)
{
    uv_thread_join(&w->thread);
    /* Run the close callbacks of the last listeners and sessions. */
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->loop);
    uv_mutex_lock(&w->lock);
    config_unref(w->pending_cfg);
    w->pending_cfg = NULL;
    uv_mutex_unlock(&w->lock);
    uv_mutex_destroy(&w->lock);
    config_unref(w->cfg);
    w->cfg = NULL;
    relay_pool_drain(&w->pool);
    proto_pool_drain(w);
    sessview_destroy(&w->view);
}
