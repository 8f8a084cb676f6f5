/* test_climit.c: unit tests for proxy/climit.c (per-client session counts and rates),
 * and a microbenchmark of one admission + release (argument "bench"). */
#include "climit.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <time.h>

static struct climit_key key4(uint32_t host_order)
{
    struct sockaddr_in in = {.sin_family = AF_INET};
    struct climit_key k;

    in.sin_addr.s_addr = htonl(host_order);
    ASSERT(climit_key_of((const struct sockaddr *)&in, &k));
    return k;
}

static struct climit_key key6(const char *text)
{
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6};
    struct climit_key k;

    ASSERT_EQ(inet_pton(AF_INET6, text, &in6.sin6_addr), 1);
    ASSERT(climit_key_of((const struct sockaddr *)&in6, &k));
    return k;
}

static bool key_eq(struct climit_key a, struct climit_key b)
{
    return a.hi == b.hi && a.lo == b.lo;
}

static void test_keys(void)
{
    /* IPv6 by /64, IPv4 by address, IPv4-mapped as IPv4, families apart. */
    ASSERT(key_eq(key6("2001:db8:1:2::1"), key6("2001:db8:1:2:ffff:ffff:ffff:ffff")));
    ASSERT(!key_eq(key6("2001:db8:1:2::1"), key6("2001:db8:1:3::1")));
    ASSERT(key_eq(key6("::ffff:192.0.2.1"), key4(0xc0000201)));
    ASSERT(!key_eq(key4(0xc0000201), key4(0xc0000202)));
    ASSERT(!key_eq(key6("::"), key4(0)));
    ASSERT_EQ(key6("2001:db8::").hi, UINT64_C(0x20010db800000000));
    struct sockaddr_storage un = {.ss_family = AF_UNIX};
    struct climit_key k;
    ASSERT(!climit_key_of((const struct sockaddr *)&un, &k));
}

static void test_open_limit(void)
{
    struct climit_table *t;
    struct climit_key a = key4(0x7f000001), b = key4(0x7f000002);

    ASSERT_OK(climit_table_new(&t, 1, 42));
    ASSERT_EQ(climit_capacity(t), CLIMIT_WAYS * CLIMIT_LOCKS);
    ASSERT_EQ(climit_acquire(t, &a, 0, 0, 0), CLIMIT_UNTRACKED); /* both off */
    ASSERT_EQ(climit_acquire(t, &a, 2, 0, 0), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 2, 0, 0), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 2, 0, 0), CLIMIT_OVER_CONNECTIONS);
    ASSERT_EQ(climit_acquire(t, &b, 2, 0, 0), CLIMIT_OK); /* another address is apart */
    ASSERT_EQ(climit_open(t, &a), 2);
    ASSERT_EQ(climit_open(t, &b), 1);
    climit_release(t, &a, 5);
    ASSERT_EQ(climit_open(t, &a), 1);
    ASSERT_EQ(climit_acquire(t, &a, 2, 0, 5), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 3, 0, 5), CLIMIT_OK); /* a reload raised the limit */
    ASSERT_EQ(climit_acquire(t, &a, 1, 0, 5), CLIMIT_OVER_CONNECTIONS);
    for (int i = 0; i < 3; i++)
        climit_release(t, &a, 6);
    climit_release(t, &b, 6);
    climit_release(t, &b, 6); /* one too many: ignored, never below 0 */
    ASSERT_EQ(climit_open(t, &a), 0);
    ASSERT_EQ(climit_open(t, &b), 0);
    struct climit_stats st;
    climit_stats(t, &st);
    ASSERT_EQ(st.in_use, 2);
    ASSERT_EQ(st.evictions, 0);
    climit_table_free(t);
    climit_table_free(NULL);
}

static void test_rate(void)
{
    struct climit_table *t;
    struct climit_key a = key6("2001:db8::1"), a2 = key6("2001:db8::2");

    ASSERT_OK(climit_table_new(&t, 0, 7));
    /* rate 3: a burst of 3, then one more every 333.3 ms */
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(climit_acquire(t, &a, 0, 3, 1000), CLIMIT_OK);
        climit_release(t, &a, 1000);
    }
    ASSERT_EQ(climit_acquire(t, &a2, 0, 3, 1000), CLIMIT_OVER_RATE); /* same /64 */
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 1333), CLIMIT_OVER_RATE);  /* 999 milli-tokens */
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 1334), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 1334), CLIMIT_OVER_RATE);
    /* a long pause refills the bucket to its size, no more */
    for (int i = 0; i < 3; i++)
        ASSERT_EQ(climit_acquire(t, &a, 0, 3, 100000), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 100000), CLIMIT_OVER_RATE);
    ASSERT_EQ(climit_open(t, &a), 4); /* refused attempts count nothing */
    /* the open limit is checked first and takes no token */
    ASSERT_EQ(climit_acquire(t, &a, 4, 3, 200000), CLIMIT_OVER_CONNECTIONS);
    ASSERT_EQ(climit_acquire(t, &a, 5, 3, 200000), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 200000), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 200000), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 200000), CLIMIT_OVER_RATE);
    /* time going backwards (another worker's clock a little behind) adds nothing */
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 199000), CLIMIT_OVER_RATE);
    /* ... and does not move the bucket's clock back: 333 ms after 200000 still owes 1 ms */
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 200333), CLIMIT_OVER_RATE);
    ASSERT_EQ(climit_acquire(t, &a, 0, 3, 200334), CLIMIT_OK);
    /* the largest rate does not overflow */
    struct climit_key big = key4(0x0a000001);
    for (int i = 0; i < 1000; i++)
        ASSERT_EQ(climit_acquire(t, &big, 0, CLIMIT_RATE_MAX, 5), CLIMIT_OK);
    ASSERT_EQ(climit_acquire(t, &big, 0, CLIMIT_RATE_MAX, UINT64_MAX / 2), CLIMIT_OK);
    climit_table_free(t);
}

/* Far more addresses than entries: busy entries are never reused, idle ones are,
 * and memory does not grow. */
static void test_eviction(void)
{
    struct climit_table *t;
    const uint32_t n = 20000;

    ASSERT_OK(climit_table_new(&t, 1024, 99));
    size_t cap = climit_capacity(t);
    ASSERT_EQ(cap, 1024);
    struct climit_key busy = key4(0x01020304);
    ASSERT_EQ(climit_acquire(t, &busy, 1, 0, 0), CLIMIT_OK);
    unsigned ok = 0, untracked = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct climit_key k = key4(0x0b000000 + i);
        enum climit_verdict v = climit_acquire(t, &k, 1, 10, i);
        if (v == CLIMIT_OK) {
            ok++;
            climit_release(t, &k, i);
        } else {
            ASSERT_EQ(v, CLIMIT_UNTRACKED);
            untracked++;
        }
    }
    ASSERT_EQ(ok, n); /* every set always had an idle entry */
    ASSERT_EQ(untracked, 0);
    ASSERT_EQ(climit_open(t, &busy), 1); /* the busy one survived */
    ASSERT_EQ(climit_acquire(t, &busy, 1, 0, n), CLIMIT_OVER_CONNECTIONS);
    struct climit_stats st;
    climit_stats(t, &st);
    ASSERT_EQ(st.in_use, cap);
    ASSERT(st.evictions >= n - cap);

    /* Hold sessions for many addresses: once a set is all busy, newcomers there are
     * admitted uncounted, and nobody is refused for someone else's sake. */
    unsigned held = 0;
    untracked = 0;
    for (uint32_t i = 0; i < 4 * cap; i++) {
        struct climit_key k = key4(0x0c000000 + i);
        enum climit_verdict v = climit_acquire(t, &k, 1, 0, n + 1);
        ASSERT(v == CLIMIT_OK || v == CLIMIT_UNTRACKED);
        held += v == CLIMIT_OK;
        untracked += v == CLIMIT_UNTRACKED;
    }
    ASSERT(held <= cap);
    ASSERT(held > cap / 2);
    ASSERT(untracked >= 3 * cap);
    climit_stats(t, &st);
    ASSERT_EQ(st.untracked, untracked);
    ASSERT_EQ(climit_open(t, &busy), 1);
    climit_table_free(t);
}

/* Workers on many threads: counts stay exact. */
struct hammer {
    struct climit_table *t;
    unsigned id;
    unsigned refused;
};

#define HAMMER_THREADS 4
#define HAMMER_ROUNDS 20000

static void *hammer_run(void *arg)
{
    struct hammer *h = arg;

    for (unsigned i = 0; i < HAMMER_ROUNDS; i++) {
        struct climit_key k = key4(0x0d000000 + (i % 64));
        enum climit_verdict v = climit_acquire(h->t, &k, HAMMER_THREADS, 0, i);
        if (v == CLIMIT_OK)
            climit_release(h->t, &k, i);
        else
            h->refused++;
    }
    return NULL;
}

static void test_threads(void)
{
    struct climit_table *t;
    pthread_t th[HAMMER_THREADS];
    struct hammer h[HAMMER_THREADS];

    ASSERT_OK(climit_table_new(&t, 0, 0));
    for (unsigned i = 0; i < HAMMER_THREADS; i++) {
        h[i] = (struct hammer){.t = t, .id = i};
        ASSERT_OK(pthread_create(&th[i], NULL, hammer_run, &h[i]));
    }
    for (unsigned i = 0; i < HAMMER_THREADS; i++) {
        ASSERT_OK(pthread_join(th[i], NULL));
        ASSERT_EQ(h[i].refused, 0); /* each thread holds at most one per address */
    }
    for (uint32_t i = 0; i < 64; i++) {
        struct climit_key k = key4(0x0d000000 + i);
        ASSERT_EQ(climit_open(t, &k), 0);
    }
    climit_table_free(t);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* What a session pays: key, acquire, release, over many addresses (cache misses
 * included: 1M addresses over a 16384-entry table). */
static void bench(void)
{
    struct climit_table *t;
    const unsigned n = 1000000;

    ASSERT_OK(climit_table_new(&t, CLIMIT_ENTRIES_DEFAULT, 0));
    uint64_t t0 = now_ns();
    for (unsigned i = 0; i < n; i++) {
        struct sockaddr_in in = {.sin_family = AF_INET};
        struct climit_key k;
        in.sin_addr.s_addr = htonl(0x0a000000 + (i * 2654435761u) % 4000000u);
        climit_key_of((const struct sockaddr *)&in, &k);
        if (climit_acquire(t, &k, 10, 100, i / 1000) == CLIMIT_OK)
            climit_release(t, &k, i / 1000);
    }
    uint64_t t1 = now_ns();
    printf("climit bench: %u sessions, %.1f ns per session (key + acquire + release)\n", n,
           (double)(t1 - t0) / n);
    climit_table_free(t);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "bench") == 0) {
        bench();
        return 0;
    }
    test_keys();
    test_open_limit();
    test_rate();
    test_eviction();
    test_threads();
    printf("test_climit: all passed\n");
    return 0;
}
