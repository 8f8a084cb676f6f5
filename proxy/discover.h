/* discover.h: DNS discovery of backends, one per process, on the main loop.
 *
 * Every resolve_interval it asks DNS again for each backend host name of the
 * running config, on libuv's thread pool (resolve.h blocks), one round at a
 * time. When a name's addresses changed it rebuilds the config with the new
 * answers (config_load_rebuild) and hands it over, logging
 * ev=backends name=... added=... removed=...; the workers then pick from the
 * new set while sessions on a removed address run to their end on the config
 * they began with. A failed lookup keeps the name's last good addresses and
 * logs ev=resolve_error once, until the name answers again.
 */
#ifndef MXPROXY_DISCOVER_H
#define MXPROXY_DISCOVER_H

#include <stddef.h>
#include <uv.h>

struct config;
struct discover;

/* Puts next (whose reference it takes) in place of the running config.
 * Returns 0, or -1 with a message in err (next then released). */
typedef int (*discover_apply_fn)(struct config *next, char *err, size_t errlen);

/* Starts re-resolving cfg's names on loop. Returns 0 with *out set, or
 * UV_ENOMEM. Holds a reference to cfg. A config without names, or with
 * resolve_interval = 0, costs a stopped timer. */
int discover_start(struct discover **out, uv_loop_t *loop, struct config *cfg,
                   discover_apply_fn apply);

/* The running config is now cfg (a reload or a rebuild): its names and
 * interval from now on. A round in flight still compares against the names it
 * asked for, by host name. */
void discover_reload(struct discover *d, struct config *cfg);

/* Stops re-resolving and frees d once a round in flight has ended. Accepts NULL. */
void discover_stop(struct discover *d);

#endif /* MXPROXY_DISCOVER_H */
