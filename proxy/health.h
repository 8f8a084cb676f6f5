/* health.h: the active health checker, one per process, on the main loop.
 *
 * For every listener with health_check != off it checks each backend once
 * per health_interval, the checks of a listener spread evenly over the
 * interval, each bounded by health_timeout. A backend that fails
 * health_fall checks in a row is marked down (config_backend_state.down,
 * ev=backend_down) until it passes health_rise in a row (ev=backend_up).
 * Workers only read that flag when they pick a backend: no session ever
 * waits for a check.
 */
#ifndef MXPROXY_HEALTH_H
#define MXPROXY_HEALTH_H

#include <uv.h>

struct config;
struct health;

/* Starts checking the backends of cfg on loop (the calling thread's).
 * Returns 0 with *out set, or UV_ENOMEM. Holds a reference to cfg. */
int health_start(struct health **out, uv_loop_t *loop, struct config *cfg);

/* After a reload: checks what cfg asks for from now on. A backend's up/down
 * state lives in the listener's shared state, so a backend kept across the
 * reload keeps it; the run of passes or failures starts again. Listeners
 * whose health_check is off have their backends marked up. On UV_ENOMEM the
 * previous checks continue. */
int health_reload(struct health *h, struct config *cfg);

/* Stops every check and frees h (handles close on the loop's next turn).
 * Accepts NULL. */
void health_stop(struct health *h);

#endif /* MXPROXY_HEALTH_H */
