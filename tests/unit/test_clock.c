/* test_clock.c: unit tests for proxy/clock.c (readings kept for a loop phase). */
#include "clock.h"
#include "test.h"

#include <pthread.h>

static uint64_t fresh_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int64_t real_ns(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

static void pause_ms(long ms)
{
    struct timespec d = {0, ms * 1000000L};
    nanosleep(&d, NULL);
}

/* Before clock_phases_on(), and on any other thread, every call reads the clock. */
static void *reads_each_time(void *arg)
{
    struct timespec r1, r2;

    (void)arg;
    uint64_t a = clock_mono_ns();
    clock_real(&r1);
    pause_ms(2);
    uint64_t b = clock_mono_ns();
    clock_real(&r2);
    ASSERT(b - a >= 2000000u);
    ASSERT(real_ns(&r2) - real_ns(&r1) >= 2000000);
    return NULL;
}

static void test_phases(void)
{
    struct timespec r1, r2;

    clock_phases_on();
    uint64_t before = fresh_mono();
    uint64_t a = clock_mono_ns();
    clock_real(&r1);
    ASSERT(a >= before);
    pause_ms(2);
    /* The same phase: the same readings, and never later than the clock. */
    ASSERT_EQ(clock_mono_ns(), a);
    clock_real(&r2);
    ASSERT_EQ(real_ns(&r2), real_ns(&r1));
    ASSERT(fresh_mono() - a >= 2000000u);

    /* Another thread meanwhile reads its own clock each time. */
    pthread_t t;
    ASSERT_OK(pthread_create(&t, NULL, reads_each_time, NULL));
    ASSERT_OK(pthread_join(t, NULL));

    /* The next phase reads afresh, and once. */
    clock_phase_end();
    uint64_t b = clock_mono_ns();
    ASSERT(b - a >= 2000000u);
    clock_real(&r2);
    ASSERT(real_ns(&r2) - real_ns(&r1) >= 2000000);
    pause_ms(1);
    ASSERT_EQ(clock_mono_ns(), b);
}

int main(void)
{
    reads_each_time(NULL);
    test_phases();
    printf("test_clock: all passed\n");
    return 0;
}
