/* sessview.c: session records for the admin endpoint; see sessview.h. */
#include "sessview.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"

#define SESSVIEW_NAME_MAX 64 /* listener name, bytes with NUL */

struct sessview_rec {
    struct sessview_rec *prev, *next; /* sessview.live while open */
    uint64_t sid;
    uint64_t t_open;  /* clock_mono_ns() at accept */
    uint64_t t_close; /* clock_mono_ns() at close; 0 while open */
    char listener[SESSVIEW_NAME_MAX];
    char mode[8];
    struct sessview_state st;      /* as of the last update */
    char end[SESSVIEW_TEXT_MAX];   /* end= once closed */
    char error[SESSVIEW_TEXT_MAX]; /* error= once closed; "" for none */
    bool failed;                   /* error= or primary_error= */
    struct sessview_pair *pairs;   /* ring: pairs[(pairs_head + i) % pairs_cap] */
    unsigned pairs_cap, pairs_head, pairs_n;
    uint64_t pairs_total; /* every pair seen, dropped ones included */
};

/* A record copied out under the lock: the header and the pairs shown. */
struct sessview_snap {
    struct sessview_rec h; /* h.pairs is snap-owned, oldest first, h.pairs_n long */
};

static void sessview_copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = src != NULL ? strlen(src) : 0;
    if (n >= cap)
        n = cap - 1;
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

void sessview_init(struct sessview *v)
{
    memset(v, 0, sizeof(*v));
    if (uv_mutex_init(&v->lock) != 0)
        abort(); /* only fails out of resources at start */
}

static void sessview_rec_free(struct sessview_rec *r)
{
    if (r == NULL)
        return;
    free(r->pairs);
    free(r);
}

void sessview_destroy(struct sessview *v)
{
    while (v->live != NULL) {
        struct sessview_rec *r = v->live;
        v->live = r->next;
        sessview_rec_free(r);
    }
    for (unsigned i = 0; i < v->ring_n; i++)
        sessview_rec_free(v->ring[(v->ring_head + i) % v->ring_cap]);
    free(v->ring);
    uv_mutex_destroy(&v->lock);
}

struct sessview_rec *sessview_open(struct sessview *v, uint64_t sid, const char *listener,
                                   const char *mode)
{
    struct sessview_rec *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    r->sid = sid;
    r->t_open = clock_mono_ns();
    sessview_copy_text(r->listener, sizeof(r->listener), listener);
    sessview_copy_text(r->mode, sizeof(r->mode), mode);
    r->st.phase = "accepted";
    uv_mutex_lock(&v->lock);
    r->next = v->live;
    if (v->live != NULL)
        v->live->prev = r;
    v->live = r;
    uv_mutex_unlock(&v->lock);
    return r;
}

/* With the lock held. */
static void sessview_set_state(struct sessview_rec *r, const struct sessview_state *st)
{
    r->st = *st;
    if (strstr(r->st.fields, "\"primary_error\":") != NULL)
        r->failed = true;
}

void sessview_update(struct sessview *v, struct sessview_rec *r, const struct sessview_state *st)
{
    uv_mutex_lock(&v->lock);
    sessview_set_state(r, st);
    uv_mutex_unlock(&v->lock);
}

void sessview_pair(struct sessview *v, struct sessview_rec *r, const struct sessview_pair *p)
{
    struct sessview_pair *grown = NULL, *old = NULL;

    /* The array grows outside the lock: the copy under it is a memcpy. */
    if (r->pairs_n == r->pairs_cap && r->pairs_cap < SESSVIEW_PAIRS_MAX) {
        unsigned cap = r->pairs_cap == 0 ? 8 : r->pairs_cap * 2;
        if (cap > SESSVIEW_PAIRS_MAX)
            cap = SESSVIEW_PAIRS_MAX;
        grown = malloc(cap * sizeof(*grown));
        if (grown != NULL) {
            for (unsigned i = 0; i < r->pairs_n; i++)
                grown[i] = r->pairs[(r->pairs_head + i) % r->pairs_cap];
        }
        uv_mutex_lock(&v->lock);
        if (grown != NULL) {
            old = r->pairs;
            r->pairs = grown;
            r->pairs_cap = cap;
            r->pairs_head = 0;
        }
    } else {
        uv_mutex_lock(&v->lock);
    }
    r->pairs_total++;
    if (r->pairs_cap > 0) {
        if (r->pairs_n == r->pairs_cap) {
            r->pairs[r->pairs_head] = *p; /* the oldest goes */
            r->pairs_head = (r->pairs_head + 1) % r->pairs_cap;
        } else {
            r->pairs[(r->pairs_head + r->pairs_n) % r->pairs_cap] = *p;
            r->pairs_n++;
        }
    }
    if (p->flags & SESSVIEW_P_PRIMARY)
        r->failed = true;
    uv_mutex_unlock(&v->lock);
    free(old);
}

/* With the lock held: makes the ring hold cap records, the newest kept;
 * the dropped ones are appended to *gone (to be freed after the lock). */
static bool sessview_ring_resize(struct sessview *v, unsigned cap, struct sessview_rec **gone)
{
    struct sessview_rec **ring = NULL;
    unsigned keep = v->ring_n < cap ? v->ring_n : cap;

    if (cap > 0 && (ring = calloc(cap, sizeof(*ring))) == NULL)
        return false;
    for (unsigned i = 0; i < v->ring_n; i++) {
        struct sessview_rec *r = v->ring[(v->ring_head + i) % v->ring_cap];
        if (i < v->ring_n - keep) {
            r->next = *gone;
            *gone = r;
        } else {
            ring[i - (v->ring_n - keep)] = r;
        }
    }
    free(v->ring);
    v->ring = ring;
    v->ring_cap = cap;
    v->ring_head = 0;
    v->ring_n = keep;
    return true;
}

void sessview_close(struct sessview *v, struct sessview_rec *r, const struct sessview_state *st,
                    const char *end, const char *error, unsigned ring_cap)
{
    struct sessview_rec *gone = NULL;

    uv_mutex_lock(&v->lock);
    sessview_set_state(r, st);
    r->t_close = clock_mono_ns();
    sessview_copy_text(r->end, sizeof(r->end), end);
    sessview_copy_text(r->error, sizeof(r->error), error);
    if (error != NULL)
        r->failed = true;
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        v->live = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    if (ring_cap != v->ring_cap)
        (void)sessview_ring_resize(v, ring_cap, &gone); /* out of memory: the old size stays */
    if (v->ring_cap == 0) {
        r->next = gone;
        gone = r;
    } else if (v->ring_n == v->ring_cap) {
        struct sessview_rec *old = v->ring[v->ring_head];
        if (old != NULL) {
            old->next = gone;
            gone = old;
        }
        v->ring[v->ring_head] = r;
        v->ring_head = (v->ring_head + 1) % v->ring_cap;
    } else {
        v->ring[(v->ring_head + v->ring_n) % v->ring_cap] = r;
        v->ring_n++;
    }
    uv_mutex_unlock(&v->lock);
    while (gone != NULL) {
        struct sessview_rec *next = gone->next;
        sessview_rec_free(gone);
        gone = next;
    }
}

/* ---- rendering (admin thread) ------------------------------------------------------------ */

struct sessview_snaps {
    struct sessview_snap *v;
    size_t n, cap;
    bool oom;
};

static bool sessview_matches(const struct sessview_rec *r, const struct sessview_filter *f)
{
    if (f->has_sid)
        return r->sid == f->sid;
    if (f->q.has_listener && strcmp(r->listener, f->q.listener) != 0)
        return false;
    if (f->q.error_only && !r->failed)
        return false;
    return query_client_match(&f->q, &r->st.client_sa.sa);
}

/* With the lock held: copies r and its last max_pairs pairs. */
static void sessview_snap_add(struct sessview_snaps *s, const struct sessview_rec *r,
                              unsigned max_pairs)
{
    if (s->oom)
        return;
    if (s->n == s->cap) {
        size_t cap = s->cap == 0 ? 16 : s->cap * 2;
        struct sessview_snap *p = realloc(s->v, cap * sizeof(*p));
        if (p == NULL) {
            s->oom = true;
            return;
        }
        s->v = p;
        s->cap = cap;
    }
    struct sessview_snap *sn = &s->v[s->n];
    unsigned n = r->pairs_n < max_pairs ? r->pairs_n : max_pairs;
    sn->h = *r;
    sn->h.pairs = NULL;
    sn->h.pairs_n = 0;
    if (n > 0) {
        sn->h.pairs = malloc(n * sizeof(*sn->h.pairs));
        if (sn->h.pairs == NULL) {
            s->oom = true;
            return;
        }
        for (unsigned i = 0; i < n; i++)
            sn->h.pairs[i] = r->pairs[(r->pairs_head + r->pairs_n - n + i) % r->pairs_cap];
        sn->h.pairs_n = n;
    }
    s->n++;
}

static void sessview_snaps_free(struct sessview_snaps *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i].h.pairs);
    free(s->v);
}

/* A growing JSON text. */
struct sessview_json {
    char *p;
    size_t len, cap;
    bool oom;
};

static bool sessview_json_room(struct sessview_json *j, size_t n)
{
    if (j->oom)
        return false;
    if (j->len + n + 1 <= j->cap)
        return true;
    size_t cap = j->cap == 0 ? 4096 : j->cap;
    while (cap < j->len + n + 1)
        cap *= 2;
    char *p = realloc(j->p, cap);
    if (p == NULL) {
        j->oom = true;
        return false;
    }
    j->p = p;
    j->cap = cap;
    return true;
}

static void sessview_json_raw(struct sessview_json *j, const char *s, size_t n)
{
    if (!sessview_json_room(j, n))
        return;
    memcpy(j->p + j->len, s, n);
    j->len += n;
}

static void sessview_json_lit(struct sessview_json *j, const char *s)
{
    sessview_json_raw(j, s, strlen(s));
}

/* A JSON string, escaped by the log's escaper (json = true: always quoted). */
static void sessview_json_str(struct sessview_json *j, const char *s)
{
    size_t n = strlen(s), need = n * 6 + 3;
    if (!sessview_json_room(j, need))
        return;
    j->len += log_escape(j->p + j->len, need + 1, s, n, true);
}

/* "key": string, or null for "". */
static void sessview_json_kstr(struct sessview_json *j, const char *key, const char *s)
{
    sessview_json_lit(j, ",\"");
    sessview_json_lit(j, key);
    sessview_json_lit(j, "\":");
    if (s[0] == '\0')
        sessview_json_lit(j, "null");
    else
        sessview_json_str(j, s);
}

static void sessview_json_kuint(struct sessview_json *j, const char *key, uint64_t v)
{
    char buf[64];
    int n = snprintf(buf, sizeof(buf), ",\"%s\":%llu", key, (unsigned long long)v);
    sessview_json_raw(j, buf, (size_t)n);
}

/* Milliseconds with three decimals, from microseconds. */
static void sessview_json_kms(struct sessview_json *j, const char *key, uint64_t us)
{
    char buf[64];
    int n = snprintf(buf, sizeof(buf), ",\"%s\":%llu.%03u", key, (unsigned long long)(us / 1000),
                     (unsigned)(us % 1000));
    sessview_json_raw(j, buf, (size_t)n);
}

static void sessview_json_kbool(struct sessview_json *j, const char *key, bool v)
{
    sessview_json_lit(j, ",\"");
    sessview_json_lit(j, key);
    sessview_json_lit(j, v ? "\":true" : "\":false");
}

static void sessview_json_pair(struct sessview_json *j, const struct sessview_pair *p)
{
    sessview_json_lit(j, "{\"cmd\":");
    sessview_json_str(j, p->cmd);
    sessview_json_kstr(j, "code", p->code);
    sessview_json_kstr(j, "reply", p->reply);
    sessview_json_kms(j, "at_ms", p->at_us);
    if (p->flags & SESSVIEW_P_MS)
        sessview_json_kms(j, "ms", p->ms_us);
    else
        sessview_json_lit(j, ",\"ms\":null");
    sessview_json_kbool(j, "pipelined", p->flags & SESSVIEW_P_PIPELINED);
    sessview_json_kbool(j, "local", p->flags & SESSVIEW_P_LOCAL);
    sessview_json_kbool(j, "aborted", p->flags & SESSVIEW_P_ABORTED);
    sessview_json_kbool(j, "primary", p->flags & SESSVIEW_P_PRIMARY);
    sessview_json_lit(j, "}");
}

static void sessview_json_session(struct sessview_json *j, const struct sessview_rec *r,
                                  uint64_t now)
{
    char sid[24];

    snprintf(sid, sizeof(sid), "%016llx", (unsigned long long)r->sid);
    sessview_json_lit(j, "{\"sid\":");
    sessview_json_str(j, sid);
    sessview_json_kstr(j, "listener", r->listener);
    sessview_json_kstr(j, "mode", r->mode);
    sessview_json_kstr(j, "client", r->st.client);
    sessview_json_kstr(j, "backend", r->st.backend);
    sessview_json_kstr(j, "phase", r->t_close != 0 ? "closed" : r->st.phase);
    sessview_json_kuint(j, "age_ms", (now - r->t_open) / 1000000);
    sessview_json_kuint(j, "bytes_up", r->st.bytes_up);
    sessview_json_kuint(j, "bytes_down", r->st.bytes_down);
    sessview_json_kstr(j, "tls_client", r->st.tls_client);
    sessview_json_kstr(j, "tls_backend", r->st.tls_backend);
    sessview_json_lit(j, r->st.fields); /* the protocol's close fields: ,"helo":... */
    if (r->t_close != 0) {
        sessview_json_kstr(j, "end", r->end);
        sessview_json_kms(j, "ms", (r->t_close - r->t_open) / 1000);
        sessview_json_kstr(j, "error", r->error);
    }
    sessview_json_kbool(j, "failed", r->failed);
    sessview_json_kuint(j, "pairs_total", r->pairs_total);
    sessview_json_kuint(j, "pairs_dropped",
                        r->pairs_total > SESSVIEW_PAIRS_MAX ? r->pairs_total - SESSVIEW_PAIRS_MAX
                                                            : 0);
    sessview_json_lit(j, ",\"pairs\":[");
    for (unsigned i = 0; i < r->pairs_n; i++) {
        if (i > 0)
            sessview_json_lit(j, ",");
        sessview_json_pair(j, &r->pairs[i]);
    }
    sessview_json_lit(j, "]}");
}

static int sessview_by_close_desc(const void *a, const void *b)
{
    const struct sessview_snap *x = a, *y = b;
    return x->h.t_close < y->h.t_close ? 1 : x->h.t_close > y->h.t_close ? -1 : 0;
}

static int sessview_by_open_desc(const void *a, const void *b)
{
    const struct sessview_snap *x = a, *y = b;
    return x->h.t_open < y->h.t_open ? 1 : x->h.t_open > y->h.t_open ? -1 : 0;
}

long sessview_render(struct sessview *const *views, unsigned n, unsigned recent_max,
                     const struct sessview_filter *f, char **out)
{
    struct sessview_snaps open = {0}, recent = {0};
    struct sessview_json j = {0};
    unsigned max_pairs = f->has_sid ? SESSVIEW_PAIRS_MAX : SESSVIEW_PAIRS_LIST;
    uint64_t now;

    *out = NULL;
    for (unsigned w = 0; w < n; w++) {
        struct sessview *v = views[w];
        uv_mutex_lock(&v->lock);
        for (const struct sessview_rec *r = v->live; r != NULL; r = r->next)
            if (sessview_matches(r, f))
                sessview_snap_add(&open, r, max_pairs);
        for (unsigned i = 0; i < v->ring_n; i++) {
            const struct sessview_rec *r = v->ring[(v->ring_head + i) % v->ring_cap];
            if (sessview_matches(r, f))
                sessview_snap_add(&recent, r, max_pairs);
        }
        uv_mutex_unlock(&v->lock);
    }
    now = uv_hrtime(); /* a fresh reading: never earlier than a kept one */
    if (open.oom || recent.oom)
        goto oom;
    if (open.n > 1)
        qsort(open.v, open.n, sizeof(*open.v), sessview_by_open_desc);
    if (recent.n > 1)
        qsort(recent.v, recent.n, sizeof(*recent.v), sessview_by_close_desc);
    /* Each worker keeps its share rounded up: the newest recent_max are shown. */
    size_t shown = recent.n < recent_max ? recent.n : recent_max;
    if (f->has_sid) {
        const struct sessview_snaps *s = open.n > 0 ? &open : &recent;
        if (s->n == 0 || (s == &recent && shown == 0)) {
            sessview_snaps_free(&open);
            sessview_snaps_free(&recent);
            return 0;
        }
        sessview_json_session(&j, &s->v[0].h, now);
    } else {
        sessview_json_lit(&j, "{\"open\":[");
        for (size_t i = 0; i < open.n; i++) {
            if (i > 0)
                sessview_json_lit(&j, ",");
            sessview_json_session(&j, &open.v[i].h, now);
        }
        sessview_json_lit(&j, "],\"recent\":[");
        for (size_t i = 0; i < shown; i++) {
            if (i > 0)
                sessview_json_lit(&j, ",");
            sessview_json_session(&j, &recent.v[i].h, now);
        }
        sessview_json_lit(&j, "]");
        sessview_json_kuint(&j, "recent_sessions", recent_max);
        sessview_json_lit(&j, "}");
    }
    sessview_json_lit(&j, "\n");
    if (j.oom)
        goto oom;
    j.p[j.len] = '\0'; /* room is always kept for it */
    sessview_snaps_free(&open);
    sessview_snaps_free(&recent);
    *out = j.p;
    return (long)j.len;
oom:
    sessview_snaps_free(&open);
    sessview_snaps_free(&recent);
    free(j.p);
    return -1;
}
