/* clock.h: the time of the events a worker handles, read once per loop phase.
 *
 * The events one poll returns are handled at the time it returned, as nginx does: a logged
 * SMTP session would otherwise read the clock some twenty times (each log line's ts=, each
 * command's and reply's timing, the session's own marks). On a thread that called
 * clock_phases_on(), the first reading after clock_phase_end() is kept until the next
 * clock_phase_end(); a worker ends a phase after the poll's callbacks (uv_check) and
 * before it may sleep (uv_prepare), so no phase spans a sleep. Elsewhere, and before
 * clock_phases_on(), each call reads the clock.
 *
 * A kept reading is never later than the clock, and one phase's reading never earlier than
 * the last phase's: a kept time subtracted from a kept or fresh one is never negative. So
 * session timestamps come from here and nowhere else.
 */
#ifndef MXPROXY_CLOCK_H
#define MXPROXY_CLOCK_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC in nanoseconds, the clock uv_hrtime() reads. */
uint64_t clock_mono_ns(void);

/* CLOCK_REALTIME, for log timestamps. */
void clock_real(struct timespec *ts);

/* Keeps readings on this thread from now on, each until the next clock_phase_end(). */
void clock_phases_on(void);

/* Forgets this thread's kept readings: the next call reads the clock. */
void clock_phase_end(void);

#endif /* MXPROXY_CLOCK_H */
