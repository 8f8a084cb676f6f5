/* metrics.h: per-worker counters and their Prometheus text exposition.
 *
 * Each worker owns one struct metrics and is the only thread that writes it;
 * the admin endpoint on the main thread reads every worker's struct and sums
 * them at scrape time. Counters are _Atomic uint64_t updated with a relaxed
 * load and store (one writer: no locked instruction on the hot path) and read
 * with relaxed loads, so a scrape sees each counter whole but not a snapshot
 * across counters. Nothing here allocates.
 *
 * A zero-initialised struct metrics is ready to use.
 */
#ifndef MXPROXY_METRICS_H
#define MXPROXY_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "session.h"

#define METRICS_LISTENERS_MAX 64         /* listener names kept per worker */
#define METRICS_ENDS SESSION_END_COUNT_  /* end= values */
#define METRICS_VERBS 19                 /* values of enum smtp_cmd (checked in metrics.c) */
#define METRICS_POP3_CMDS 20             /* values of enum pop3_cmd (checked in metrics.c) */
#define METRICS_CLASSES 4                /* 2xx, 3xx, 4xx, 5xx */
#define METRICS_IMAP_CMDS 43             /* values of enum imap_cmd (checked in metrics.c) */
#define METRICS_IMAP_STATUSES 6          /* values of enum imap_status (checked in metrics.c) */
#define METRICS_BUCKETS 16               /* finite histogram bounds, 0.0001..10 s */
#define METRICS_NO_LATENCY UINT64_MAX    /* metrics_reply(): count, do not time */
#define METRICS_OTHER_LISTENER "~other"  /* label for names past the table */
#define METRICS_NAME_MAX CONFIG_NAME_MAX /* bytes of a listener name with NUL */
#define METRICS_ACCEPT_ERRORS 5          /* error= values of accept_errors_total */

typedef _Atomic uint64_t metrics_counter;

/* One listener's counters in one worker. name is written once, before the
 * slot is published through metrics.n_listeners, and never changes. */
struct metrics_listener {
    char name[METRICS_NAME_MAX];        /* [listener NAME], NUL-terminated */
    metrics_counter ends[METRICS_ENDS]; /* closed sessions by enum session_end */
    metrics_counter active;             /* opened minus closed; wraps below 0 in one worker */
    metrics_counter accept_errors[METRICS_ACCEPT_ERRORS]; /* by metrics_accept_error_names */
};

/* A latency histogram: per-bucket (not cumulative) counts, rendered cumulative. */
struct metrics_hist {
    metrics_counter buckets[METRICS_BUCKETS + 1]; /* last one: above the largest bound */
    metrics_counter sum_ns;                       /* sum of observations, nanoseconds */
};

struct metrics {
    _Atomic unsigned n_listeners;                             /* published slots of listeners[] */
    struct metrics_listener listeners[METRICS_LISTENERS_MAX]; /* in order of first use */
    struct metrics_listener other;                            /* names that found no free slot */
    metrics_counter replies[METRICS_VERBS][METRICS_CLASSES];  /* by smtp_cmd and code / 100 - 2 */
    metrics_counter pop3[METRICS_POP3_CMDS][2];               /* mode pop3: by pop3_cmd, [+OK?] */
    metrics_counter bytes_up;     /* read from clients, closed sessions */
    metrics_counter bytes_down;   /* read from backends, closed sessions */
    metrics_counter tls[2][2];    /* [client?][ok?] handshakes */
    struct metrics_hist connect;  /* backend connect time */
    struct metrics_hist greeting; /* accept to first greeting byte */
    struct metrics_hist reply;    /* command to reply */
    /* mode imap: by imap_cmd and imap_status */
    metrics_counter imap[METRICS_IMAP_CMDS][METRICS_IMAP_STATUSES];
};

/* Hooks; call only on the worker thread that owns m (or before it starts).
 * listener is a config_listener name, matched by content, so a listener keeps
 * its series across reloads; a removed listener's series stay (counters never
 * go back). metrics_listener_seen() makes a listener's series appear at 0
 * before its first session (worker.c calls it for every listener it binds). */
void metrics_listener_seen(struct metrics *m, const char *listener);
void metrics_session_opened(struct metrics *m, const char *listener);
void metrics_session_closed(struct metrics *m, const char *listener, enum session_end end,
                            uint64_t bytes_up, uint64_t bytes_down);
void metrics_connect_time(struct metrics *m, uint64_t ns);
void metrics_greeting(struct metrics *m, uint64_t ns);

/* A mode smtp reply with code (200..599; other codes are ignored) to cmd,
 * an enum smtp_cmd; ns is the command-to-reply latency, or
 * METRICS_NO_LATENCY for replies that are not timed (mxproxy's own answers,
 * greetings). */
void metrics_reply(struct metrics *m, unsigned cmd, int code, uint64_t ns);

/* A mode imap response: the tagged status (or the greeting's, cmd IMAP_CMD_NONE) that ended
 * cmd, an enum imap_cmd; status is an enum imap_status (NONE is not counted). Also mxproxy's
 * own tagged answers. Response times go to the same histogram as SMTP's (ns as above). */
void metrics_imap_response(struct metrics *m, unsigned cmd, unsigned status, uint64_t ns);

/* A mode pop3 response (+OK when ok, else -ERR) to cmd, an enum pop3_cmd (POP3_CMD_NONE: the
 * greeting, or a response to no command). */
void metrics_pop3_response(struct metrics *m, unsigned cmd, bool ok);

/* Accepting on listener failed with err (a negative UV_E* code): counted as
 * error="emfile", "enfile", "enomem", "enobufs" or "other". */
void metrics_accept_error(struct metrics *m, const char *listener, int err);

/* A TLS handshake with the client (client true) or the backend ended. */
void metrics_tls(struct metrics *m, bool client, bool ok);

/* Writes the Prometheus text exposition (format 0.0.4) of the sum of n
 * workers' counters into out (capacity cap, NUL-terminated when cap > 0).
 * Returns the length of the whole text without NUL, like snprintf: when it
 * is >= cap the text was cut and the caller may retry with a larger buffer.
 * Reads per_worker with relaxed loads: safe while the workers run. Never
 * allocates; listeners are listed by name, in byte order. */
size_t metrics_render(struct metrics *const *per_worker, unsigned n, char *out, size_t cap);

#endif /* MXPROXY_METRICS_H */
