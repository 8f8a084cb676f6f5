/* clock.c: see clock.h. */
#include "clock.h"

#include <stdbool.h>

static _Thread_local bool clock_keeps;
static _Thread_local bool clock_have_mono, clock_have_real;
static _Thread_local uint64_t clock_mono;
static _Thread_local struct timespec clock_realtime;

uint64_t clock_mono_ns(void)
{
    if (!clock_have_mono) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        clock_mono = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        clock_have_mono = clock_keeps;
    }
    return clock_mono;
}

void clock_real(struct timespec *ts)
{
    if (!clock_have_real) {
        clock_gettime(CLOCK_REALTIME, &clock_realtime);
        clock_have_real = clock_keeps;
    }
    *ts = clock_realtime;
}

void clock_phases_on(void)
{
    clock_keeps = true;
    clock_phase_end();
}

void clock_phase_end(void)
{
    clock_have_mono = false;
    clock_have_real = false;
}
