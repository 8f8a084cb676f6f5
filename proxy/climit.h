/* climit.h: PURE per-client-address limits shared by the workers of a listener.
 *
 * A fixed-size, set-associative table: an address hashes (keyed with a random seed, so a
 * client cannot aim at one set) to a set of CLIMIT_WAYS entries, and each entry counts the
 * address's open sessions and holds its token bucket. The sets are guarded by a small array
 * of mutexes (lock striping): workers admitting different addresses rarely meet on the same
 * lock, and each critical section scans CLIMIT_WAYS entries and returns, with no allocation.
 *
 * Memory is fixed when the table is made. An entry with no open session is idle and may be
 * reused for another address when its set is full: first one whose bucket has refilled (it
 * knows nothing the address would not get anyway), else the one used longest ago. A set whose
 * entries all hold open sessions cannot take a new address: that address is admitted without
 * being counted (CLIMIT_UNTRACKED), never refused for another client's sake.
 *
 * Addresses are keyed as the limits count them: an IPv4 address (also IPv4-mapped IPv6) by
 * itself, an IPv6 address by its /64, the smallest block one end site usually gets.
 * No clock: callers pass a monotonic time in ms.
 */
#ifndef MXPROXY_CLIMIT_H
#define MXPROXY_CLIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CLIMIT_WAYS 8                 /* entries per set */
#define CLIMIT_LOCKS 64               /* mutexes the sets are striped over */
#define CLIMIT_RATE_MAX 1000000u      /* largest rate, new sessions per second */
#define CLIMIT_ENTRIES_DEFAULT 16384u /* the table a listener with limits gets */

/* What an address is counted as. */
struct climit_key {
    uint64_t hi; /* IPv6: the /64 prefix; IPv4: 0 */
    uint64_t lo; /* IPv6: 0; IPv4: 0xffff00000000 | the address (never 0) */
};

enum climit_verdict {
    CLIMIT_OK = 0,           /* admitted and counted: call climit_release() at its end */
    CLIMIT_UNTRACKED,        /* admitted, not counted (set full of busy addresses) */
    CLIMIT_OVER_CONNECTIONS, /* refused: max open sessions for this address */
    CLIMIT_OVER_RATE,        /* refused: no token left in this address's bucket */
};

/* Counters of a table, read without locks (each value whole, not a snapshot). */
struct climit_stats {
    uint64_t in_use;    /* entries holding an address */
    uint64_t evictions; /* idle entries reused for another address */
    uint64_t untracked; /* admissions that found no entry (CLIMIT_UNTRACKED) */
};

struct climit_table;

/* Fills *k for sa (AF_INET or AF_INET6). Returns false for other families. */
bool climit_key_of(const struct sockaddr *sa, struct climit_key *k);

/* Makes a table of at least entries entries (rounded up to a power of two, at least
 * CLIMIT_WAYS * CLIMIT_LOCKS); seed keys the hash (0: a random one). Returns 0 and stores
 * it in *out, or a negative errno (-ENOMEM). The caller owns it: climit_table_free(). */
int climit_table_new(struct climit_table **out, size_t entries, uint64_t seed);

/* Frees t; accepts NULL. No other thread may use t any more. */
void climit_table_free(struct climit_table *t);

/* Total entries of t (after rounding). */
size_t climit_capacity(const struct climit_table *t);

/* A new session from k at now_ms. max_open: open sessions allowed for k (0: no limit);
 * rate: new sessions per second, with a burst of as many (0: no limit; at most
 * CLIMIT_RATE_MAX). Over a limit nothing changes: a refused attempt uses no token and
 * counts nothing. With both limits 0 returns CLIMIT_UNTRACKED at once. Thread-safe. */
enum climit_verdict climit_acquire(struct climit_table *t, const struct climit_key *k,
                                   unsigned max_open, unsigned rate, uint64_t now_ms);

/* The end of a session climit_acquire() answered CLIMIT_OK for (never for any other
 * verdict); now_ms marks when the address was last seen. Thread-safe. */
void climit_release(struct climit_table *t, const struct climit_key *k, uint64_t now_ms);

/* The open sessions counted for k (0 when k has no entry). For tests and diagnostics. */
unsigned climit_open(struct climit_table *t, const struct climit_key *k);

void climit_stats(const struct climit_table *t, struct climit_stats *out);

#endif /* MXPROXY_CLIMIT_H */
