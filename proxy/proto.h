/* proto.h: what a protocol-aware mode adds to a session, as one table of hooks.
 *
 * session.c knows sockets, backends, TLS records, timers and the close line;
 * it never names a protocol. A listener's mode picks a `const struct proto`
 * (proto_for_mode(), the one table in proto.c); mode tcp has none, and then
 * session.c relays bytes and nothing more. Every hook runs on the session's
 * worker thread, only while s->proto is set, and only on a session that is
 * not closing (session_closing() false), unless said otherwise.
 *
 * A protocol lives in its own files: proto_NAME.c (the hooks, built on the
 * line-dialog machinery of dialog.h) and its pure parsers (NAME.c). Its
 * per-session state hangs off s->proto_state, which open() allocates and
 * free() releases. Adding a protocol: write those files, add a row to
 * proto_for_mode()'s table and a value to enum config_mode with its keys
 * (config.c's key table); session.c does not change.
 */
#ifndef MXPROXY_PROTO_H
#define MXPROXY_PROTO_H

#include <stdbool.h>

#include "config.h"
#include "session.h"

struct log_line;
struct session;
struct worker;

/* The canned replies session.c asks for: what a server-first client must be
 * told instead of a bare close. The protocol chooses the words (SMTP: 421). */
enum proto_say {
    PROTO_SAY_UNAVAILABLE = 0, /* no backend could be reached (end=connect_failed) */
    PROTO_SAY_LOCAL_ERROR,     /* mxproxy ran short of descriptors or memory */
    PROTO_SAY_LIMIT,           /* max_connections reached; open() ran, nothing else */
    PROTO_SAY_IDLE,            /* idle_timeout: goodbye, then the session closes */
    PROTO_SAY_DRAIN,           /* drain deadline: goodbye, then the session closes */
};

struct proto {
    const char *name; /* the mode's name, as in config ("smtp") */

    /* At accept (also for a session refused over the limit): allocates
     * s->proto_state. Returns 0 or UV_ENOMEM (the session then closes with
     * end=client_reset "out of memory"). */
    int (*open)(struct session *s);

    /* Frees s->proto_state; also for a session whose open() failed or never
     * ran (proto_state NULL). Runs while the session is freed. */
    void (*free)(struct session *s);

    /* The backend connected: install the relay on_data hooks on s->up and
     * s->down. Runs before either relay delivers a byte (s->down may already
     * be reading: the backend's first bytes can be what completed the
     * connect, and they reach on_data after this hook). */
    void (*connected)(struct session *s);

    /* Says a canned reply (see enum proto_say) after whatever the backend
     * already said. why is static text (error=) or NULL. The caller closes
     * after the flush. With PROTO_SAY_IDLE/DRAIN an opaque session says
     * nothing. */
    void (*say)(struct session *s, enum proto_say what, const char *why);

    /* The backend sent EOF, or reading/writing it failed (end, error as for
     * the close line). Answer the client (one canned reply to the oldest
     * outstanding command, the others aborted=1), then close after flush.
     * Not called once opaque() is true or the session is flushing. */
    void (*backend_eof)(struct session *s);
    void (*backend_reset)(struct session *s, enum session_end end, const char *error);

    /* True once the protocol no longer sees the bytes (STARTTLS passthrough,
     * COMPRESS): the session then ends as in mode tcp. */
    bool (*opaque)(const struct session *s);

    /* TLS with the backend is up, or failed (reason is static text; the
     * ev=tls_error line is already written). A failure answers the client
     * and closes with end=tls_error: never a plaintext downgrade. */
    void (*backend_tls_ready)(struct session *s);
    void (*backend_tls_failed)(struct session *s, const char *reason);

    /* The backend's greeting arrived whole (greeting_timeout stops). */
    bool (*greeted)(const struct session *s);

    /* The drain deadline: false when the backend owes nothing (the caller
     * then says PROTO_SAY_DRAIN and closes); true when the session waits for
     * owed replies and ends itself. */
    bool (*drain_wait)(struct session *s);

    /* drain_grace ran out: owed replies are logged aborted=1 and never
     * forged; with none owed, the drain goodbye. The caller closes. */
    void (*drain_cut)(struct session *s);

    /* Refines end= with what the protocol knows (client_eof -> quit...). */
    enum session_end (*end)(const struct session *s, enum session_end end);

    /* Adds the protocol's fields to the ev=close line. */
    void (*log_close)(const struct session *s, struct log_line *l);
};

/* The protocol of a listener's mode, or NULL for mode tcp. */
const struct proto *proto_for_mode(enum config_mode mode);

/* Returns every protocol's spare per-worker storage to the heap (worker exit). */
void proto_pool_drain(struct worker *w);

extern const struct proto proto_smtp;
extern const struct proto proto_pop3;
extern const struct proto proto_imap;

#endif /* MXPROXY_PROTO_H */
