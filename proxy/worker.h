/* worker.h: one event loop per thread, owning its listeners and sessions.
 *
 * The main thread talks to a worker only through worker_post_*(), which
 * store a request under the worker's mutex and wake its loop with an
 * uv_async_t; everything else in a worker runs on its own thread.
 */
#ifndef MXPROXY_WORKER_H
#define MXPROXY_WORKER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <uv.h>

#include "metrics.h"
#include "relay.h"
#include "sessview.h"

struct config;
struct listener;
struct session;
struct dialog_spare;

struct worker {
    unsigned id; /* 0..workers-1; worker 0 logs per-process events */
    uv_thread_t thread;
    uv_loop_t loop;
    uv_async_t wake;            /* main -> worker requests */
    uv_timer_t drain_timer;     /* cuts sessions left at drain_timeout */
    uv_prepare_t log_flush;     /* hands the turn's log lines to the writer before polling */
    uv_check_t clock_phase;     /* ends the kept clock reading after the poll's callbacks */
    uv_mutex_t lock;            /* guards the pending_* fields */
    struct config *pending_cfg; /* next config to apply, owned reference */
    bool pending_drain;         /* stop accepting, then finish sessions */
    unsigned pending_drain_ms;  /* drain_timeout for pending_drain */
    bool pending_deadline;      /* the drain deadline is now (second signal) */
    bool pending_cut;           /* close every session now (third signal) */
    unsigned cfg_posted;        /* worker_post_config() calls so far */

    struct config *cfg;                            /* config for new sessions, owned reference */
    struct listener *listeners;                    /* singly linked, this worker's sockets */
    struct session *sessions;                      /* doubly linked list of open sessions */
    atomic_uint n_sessions;                        /* read by the main thread for ev=drain */
    bool draining;                                 /* listeners closed, waiting for sessions */
    bool drain_deadline;                           /* past it: only owed replies are awaited */
    int start_error;                               /* first listener error at start, for main */
    struct relay_pool pool;                        /* read/write blocks for every session here */
    struct metrics metrics;                        /* written here only, summed by admin.c */
    struct sessview view;                          /* session records, read by admin.c */
    struct dialog_spare *dialog_spare;             /* spare command FIFOs (dialog.c) */
    unsigned dialog_spare_n;                       /* length of dialog_spare */
    atomic_uint cfg_applied;                       /* cfg_posted as of the last config applied */
    void (*on_listeners_closed)(struct worker *w); /* called on the worker thread */
    void (*on_config_applied)(struct worker *w);   /* called on the worker thread */
    void (*on_exit)(struct worker *w);             /* called on the worker thread */
};

/* Initialises w and binds the listeners of cfg on the calling thread's
 * behalf, then runs the loop on a new thread. Returns 0 or a negative UV_E*
 * code (the first listener that failed to bind; its error is logged). The
 * worker takes its own reference to cfg. */
int worker_start(struct worker *w, unsigned id, struct config *cfg);

/* Asks the worker to use cfg for new sessions and to add or remove
 * listeners to match it. Takes a new reference to cfg. Once the worker has
 * done so (or dropped cfg for a newer one, or because it drains), its
 * cfg_applied equals the number of calls so far and on_config_applied runs. */
void worker_post_config(struct worker *w, struct config *cfg);

/* Asks the worker to close its listeners and finish its sessions within
 * drain_ms, then exit its loop. */
void worker_post_drain(struct worker *w, unsigned drain_ms);

/* Asks a draining worker to act as if drain_timeout had expired now:
 * sessions owing no reply end, the others get drain_grace. */
void worker_post_deadline(struct worker *w);

/* Asks a draining worker to close every session at once (end=drain); a
 * reply still owed is logged aborted=1, never forged. */
void worker_post_cut(struct worker *w);

/* Waits for the worker's thread and frees what it owns. */
void worker_join(struct worker *w);

/* Called by session.c on the worker thread after a session is freed, so a
 * draining worker can exit once the last one is gone. */
void worker_session_gone(struct worker *w);

#endif /* MXPROXY_WORKER_H */
