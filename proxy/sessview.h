/* sessview.h: what the admin endpoint shows of sessions (GET /sessions, /sessions/SID).
 *
 * Each worker keeps a record per open session and a ring of the records of
 * its most recently closed ones (struct sessview). The worker writes them:
 * at accept, at each phase change, at each ev=pair (the same events as the
 * log lines, with the same redacted command text) and at close. The admin
 * endpoint reads them on the main thread with sessview_render().
 *
 * Locking: one mutex per worker (struct sessview.lock). The worker holds it
 * only to copy a prepared record update or one pair into place (a memcpy of
 * a few hundred bytes) and to move a closed record into the ring. The admin
 * thread holds it while it copies out the records its request selects
 * (fixed-size headers and at most the pairs it shows), never while it
 * builds JSON or writes to a socket. A worker thus waits at most for one
 * such copy; every other cost of a scrape is the admin thread's alone.
 *
 * Memory: a record is SESSVIEW_REC bytes plus its pairs, at most
 * SESSVIEW_PAIRS_MAX (the oldest beyond that are dropped and counted, the
 * pairs array grows by doubling). Closed records are kept up to
 * recent_sessions for the process (each of W workers keeps
 * ceil(recent_sessions / W), and the answer keeps the newest
 * recent_sessions); 0 keeps none.
 */
#ifndef MXPROXY_SESSVIEW_H
#define MXPROXY_SESSVIEW_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "query.h"

#define SESSVIEW_PAIRS_MAX 100   /* pairs kept per session; older ones are counted as dropped */
#define SESSVIEW_PAIRS_LIST 5    /* pairs shown per session in GET /sessions */
#define SESSVIEW_CMD_MAX 120     /* command text kept, bytes (longer is cut) */
#define SESSVIEW_REPLY_MAX 160   /* reply text kept, bytes */
#define SESSVIEW_FIELDS_MAX 1536 /* the protocol's close-line fields, as a JSON fragment */
#define SESSVIEW_TEXT_MAX 64     /* client, backend, TLS, end, error texts */

#define SESSVIEW_P_PIPELINED 0x01u /* pipelined=1 */
#define SESSVIEW_P_LOCAL 0x02u     /* local=1: mxproxy answered */
#define SESSVIEW_P_ABORTED 0x04u   /* aborted=1: never answered */
#define SESSVIEW_P_PRIMARY 0x08u   /* primary=1: the session's primary error */
#define SESSVIEW_P_MS 0x10u        /* ms is known */

/* One ev=pair, as the worker hands it over. */
struct sessview_pair {
    char cmd[SESSVIEW_CMD_MAX];     /* redacted command, NUL-terminated */
    char reply[SESSVIEW_REPLY_MAX]; /* reply text, NUL-terminated */
    char code[8];                   /* "250", "OK", "+OK"; "" when none */
    uint64_t at_us;                 /* since accept */
    uint64_t ms_us;                 /* ms= in microseconds, with SESSVIEW_P_MS */
    unsigned flags;                 /* SESSVIEW_P_* */
};

/* The state of a session as the worker last saw it; the part a record
 * update copies. Texts are NUL-terminated. */
struct sessview_state {
    const char *phase;              /* static text */
    char client[SESSVIEW_TEXT_MAX]; /* client=; "" before it is known */
    union {
        struct sockaddr sa; /* AF_UNSPEC before it is known */
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } client_sa;
    uint64_t bytes_up, bytes_down;       /* as of the update */
    char backend[SESSVIEW_TEXT_MAX];     /* "" before a connect */
    char tls_client[SESSVIEW_TEXT_MAX];  /* "" without TLS */
    char tls_backend[SESSVIEW_TEXT_MAX]; /* "" without TLS */
    char fields[SESSVIEW_FIELDS_MAX];    /* ,"helo":...: the protocol's close fields, JSON */
};

struct sessview_rec; /* opaque */

struct sessview {
    uv_mutex_t lock;            /* see above */
    struct sessview_rec *live;  /* open sessions, newest first */
    struct sessview_rec **ring; /* closed ones; ring[(head + i) % cap], oldest first */
    unsigned ring_cap, ring_head, ring_n;
};

/* What an admin request selects. */
struct sessview_filter {
    struct query_filter q; /* client=, listener=, error= */
    bool has_sid;          /* /sessions/SID: that one, with every pair kept */
    uint64_t sid;
};

void sessview_init(struct sessview *v);
void sessview_destroy(struct sessview *v); /* frees every record; no worker uses v */

/* Worker side. sessview_open returns NULL out of memory (the session then
 * has no record; it runs all the same). */
struct sessview_rec *sessview_open(struct sessview *v, uint64_t sid, const char *listener,
                                   const char *mode);
void sessview_update(struct sessview *v, struct sessview_rec *r, const struct sessview_state *st);
void sessview_pair(struct sessview *v, struct sessview_rec *r, const struct sessview_pair *p);
/* Final update, then the record goes to the ring (ring_cap records at most,
 * resized to ring_cap now) or is freed with ring_cap 0. */
void sessview_close(struct sessview *v, struct sessview_rec *r, const struct sessview_state *st,
                    const char *end, const char *error, unsigned ring_cap);

/* Admin side: JSON for f over every worker's records into *out (malloc'd,
 * the caller frees). recent_max bounds the closed sessions listed. Returns
 * the length; 0 when f->has_sid and no such session is kept (then *out is
 * NULL); -1 out of memory. */
long sessview_render(struct sessview *const *views, unsigned n, unsigned recent_max,
                     const struct sessview_filter *f, char **out);

#endif /* MXPROXY_SESSVIEW_H */
