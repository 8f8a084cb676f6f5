/* climit.c: per-client-address session counts and token buckets; see climit.h. */
#include "climit.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define CLIMIT_MILLI 1000u     /* a token is this many milli-tokens */
#define CLIMIT_REFILL_MS 1000u /* an empty bucket is full again after this long */

/* One address. Guarded by the lock of its set. */
struct climit_entry {
    uint64_t hi, lo;    /* struct climit_key */
    uint64_t refill_ms; /* when tokens was last brought up to date */
    uint64_t seen_ms;   /* last acquire or release: the idle entry used longest ago goes first */
    uint32_t open;      /* sessions counted and not yet released */
    uint32_t tokens;    /* milli-tokens left at refill_ms */
};

struct climit_set {
    struct climit_entry e[CLIMIT_WAYS];
    uint32_t used; /* bit i: e[i] holds an address */
};

/* One lock per cache line, so two workers on different stripes do not share one. */
struct climit_lock {
    _Alignas(64) pthread_mutex_t m;
};

struct climit_table {
    struct climit_lock locks[CLIMIT_LOCKS];
    uint64_t seed;              /* keys the hash */
    size_t set_mask;            /* sets - 1; sets is a power of two */
    _Atomic uint64_t in_use;    /* climit_stats */
    _Atomic uint64_t evictions; /* climit_stats */
    _Atomic uint64_t untracked; /* climit_stats */
    struct climit_set *sets;    /* set_mask + 1 of them */
};

bool climit_key_of(const struct sockaddr *sa, struct climit_key *k)
{
    static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const uint8_t *b;

    if (sa->sa_family == AF_INET) {
        b = (const uint8_t *)&((const struct sockaddr_in *)(const void *)sa)->sin_addr;
    } else if (sa->sa_family == AF_INET6) {
        b = ((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr.s6_addr;
        if (memcmp(b, v4mapped, sizeof(v4mapped)) != 0) {
            uint64_t hi = 0;
            for (int i = 0; i < 8; i++)
                hi = hi << 8 | b[i];
            *k = (struct climit_key){.hi = hi, .lo = 0};
            return true;
        }
        b += 12;
    } else {
        return false;
    }
    uint64_t v4 = (uint64_t)b[0] << 24 | (uint64_t)b[1] << 16 | (uint64_t)b[2] << 8 | b[3];
    /* lo is never 0 for IPv4 and always 0 for IPv6: the two never collide. */
    *k = (struct climit_key){.hi = 0, .lo = UINT64_C(0xffff00000000) | v4};
    return true;
}

/* A 64-bit finaliser (murmur3's fmix64): every input bit moves every output bit. */
static uint64_t climit_mix(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

static uint64_t climit_hash(const struct climit_table *t, const struct climit_key *k)
{
    return climit_mix(climit_mix(k->hi ^ t->seed) ^ k->lo);
}

int climit_table_new(struct climit_table **out, size_t entries, uint64_t seed)
{
    size_t sets = CLIMIT_LOCKS;
    struct climit_table *t;

    *out = NULL;
    while (sets * CLIMIT_WAYS < entries) {
        if (sets > SIZE_MAX / 2 / CLIMIT_WAYS / sizeof(struct climit_set))
            return -ENOMEM;
        sets *= 2;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return -ENOMEM;
    t->sets = calloc(sets, sizeof(*t->sets));
    if (t->sets == NULL) {
        free(t);
        return -ENOMEM;
    }
    while (seed == 0 && getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed)) {
        if (errno != EINTR) {
            seed = (uint64_t)(uintptr_t)t ^ UINT64_C(0x9e3779b97f4a7c15); /* better than none */
            break;
        }
    }
    t->seed = seed;
    t->set_mask = sets - 1;
    for (size_t i = 0; i < CLIMIT_LOCKS; i++)
        pthread_mutex_init(&t->locks[i].m, NULL);
    atomic_init(&t->in_use, 0);
    atomic_init(&t->evictions, 0);
    atomic_init(&t->untracked, 0);
    *out = t;
    return 0;
}

void climit_table_free(struct climit_table *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < CLIMIT_LOCKS; i++)
        pthread_mutex_destroy(&t->locks[i].m);
    free(t->sets);
    t->sets = NULL;
    free(t);
}

size_t climit_capacity(const struct climit_table *t)
{
    return (t->set_mask + 1) * CLIMIT_WAYS;
}

/* Brings e's bucket up to now (rate > 0). A bucket refills rate tokens per second,
 * up to rate: CLIMIT_REFILL_MS from empty to full, so longer gaps add nothing more. */
static void climit_refill(struct climit_entry *e, unsigned rate, uint64_t now_ms)
{
    uint64_t full = (uint64_t)rate * CLIMIT_MILLI;

    /* Workers' loop clocks differ by a few ms: never move refill_ms back, or the
     * next call from a later clock would be credited that time twice. */
    if (now_ms <= e->refill_ms)
        return;
    uint64_t gap = now_ms - e->refill_ms;

    if (gap > CLIMIT_REFILL_MS)
        gap = CLIMIT_REFILL_MS;
    /* rate tokens per second is rate milli-tokens per ms. */
    uint64_t tokens = e->tokens + gap * rate;
    e->tokens = (uint32_t)(tokens > full ? full : tokens);
    e->refill_ms = now_ms;
}

/* An idle entry whose bucket is full tells nothing: reusing it loses nothing. */
static bool climit_forgettable(const struct climit_entry *e, unsigned rate, uint64_t now_ms)
{
    if (rate == 0)
        return true;
    uint64_t gap = now_ms > e->refill_ms ? now_ms - e->refill_ms : 0;
    return gap >= CLIMIT_REFILL_MS || e->tokens + gap * rate >= (uint64_t)rate * CLIMIT_MILLI;
}

/* The entry of k in set, or NULL. */
static struct climit_entry *climit_find(struct climit_set *set, const struct climit_key *k)
{
    for (unsigned i = 0; i < CLIMIT_WAYS; i++) {
        if ((set->used & (1u << i)) && set->e[i].lo == k->lo && set->e[i].hi == k->hi)
            return &set->e[i];
    }
    return NULL;
}

/* A slot for a new address in set: a free one, else an idle one (see climit.h); NULL when
 * every entry holds open sessions. */
static struct climit_entry *climit_claim(struct climit_table *t, struct climit_set *set,
                                         unsigned rate, uint64_t now_ms)
{
    int victim = -1;

    for (unsigned i = 0; i < CLIMIT_WAYS; i++) {
        if (!(set->used & (1u << i))) {
            set->used |= 1u << i;
            atomic_fetch_add_explicit(&t->in_use, 1, memory_order_relaxed);
            return &set->e[i];
        }
    }
    for (unsigned i = 0; i < CLIMIT_WAYS; i++) {
        const struct climit_entry *e = &set->e[i];
        if (e->open != 0)
            continue;
        if (climit_forgettable(e, rate, now_ms)) {
            victim = (int)i;
            break;
        }
        if (victim < 0 || e->seen_ms < set->e[victim].seen_ms)
            victim = (int)i;
    }
    if (victim < 0)
        return NULL;
    atomic_fetch_add_explicit(&t->evictions, 1, memory_order_relaxed);
    return &set->e[victim];
}

enum climit_verdict climit_acquire(struct climit_table *t, const struct climit_key *k,
                                   unsigned max_open, unsigned rate, uint64_t now_ms)
{
    enum climit_verdict v = CLIMIT_OK;

    if (max_open == 0 && rate == 0)
        return CLIMIT_UNTRACKED;
    if (rate > CLIMIT_RATE_MAX)
        rate = CLIMIT_RATE_MAX;
    uint64_t h = climit_hash(t, k);
    struct climit_set *set = &t->sets[h & t->set_mask];
    pthread_mutex_t *m = &t->locks[h & (CLIMIT_LOCKS - 1)].m;

    pthread_mutex_lock(m);
    struct climit_entry *e = climit_find(set, k);
    if (e == NULL) {
        e = climit_claim(t, set, rate, now_ms);
        if (e == NULL) {
            pthread_mutex_unlock(m);
            atomic_fetch_add_explicit(&t->untracked, 1, memory_order_relaxed);
            return CLIMIT_UNTRACKED;
        }
        *e = (struct climit_entry){
            .hi = k->hi, .lo = k->lo, .refill_ms = now_ms, .tokens = rate * CLIMIT_MILLI};
    } else if (rate > 0) {
        climit_refill(e, rate, now_ms);
    }
    if (max_open > 0 && e->open >= max_open)
        v = CLIMIT_OVER_CONNECTIONS;
    else if (rate > 0 && e->tokens < CLIMIT_MILLI)
        v = CLIMIT_OVER_RATE;
    if (v == CLIMIT_OK) {
        e->open++;
        if (rate > 0)
            e->tokens -= CLIMIT_MILLI;
    }
    e->seen_ms = now_ms;
    pthread_mutex_unlock(m);
    return v;
}

void climit_release(struct climit_table *t, const struct climit_key *k, uint64_t now_ms)
{
    uint64_t h = climit_hash(t, k);
    struct climit_set *set = &t->sets[h & t->set_mask];
    pthread_mutex_t *m = &t->locks[h & (CLIMIT_LOCKS - 1)].m;

    pthread_mutex_lock(m);
    struct climit_entry *e = climit_find(set, k);
    /* An entry with open sessions is never reused, so a counted session finds its own. */
    if (e != NULL && e->open > 0) {
        e->open--;
        e->seen_ms = now_ms;
    }
    pthread_mutex_unlock(m);
}

unsigned climit_open(struct climit_table *t, const struct climit_key *k)
{
    uint64_t h = climit_hash(t, k);
    struct climit_set *set = &t->sets[h & t->set_mask];
    pthread_mutex_t *m = &t->locks[h & (CLIMIT_LOCKS - 1)].m;
    unsigned open = 0;

    pthread_mutex_lock(m);
    const struct climit_entry *e = climit_find(set, k);
    if (e != NULL)
        open = e->open;
    pthread_mutex_unlock(m);
    return open;
}

void climit_stats(const struct climit_table *t, struct climit_stats *out)
{
    out->in_use = atomic_load_explicit(&t->in_use, memory_order_relaxed);
    out->evictions = atomic_load_explicit(&t->evictions, memory_order_relaxed);
    out->untracked = atomic_load_explicit(&t->untracked, memory_order_relaxed);
}
