/* dialog.h: the protocol-neutral machinery of a line dialog between a
 * server-first client and its backend (SMTP, IMAP, POP3), for proto_*.c.
 *
 * A protocol module (proto_NAME.c, see proto.h) owns its per-session state;
 * that state begins with a struct dialog, so s->proto_state is also a
 * struct dialog * (dialog_of()). The protocol installs its relay on_data
 * hooks (proto->connected) and, for every read, runs its pure parsers and
 * uses the pieces below; what it supplies is a const struct dialect
 * (d->dialect, set in open()): its verb table, how replies find their
 * commands, its canned replies and its transcript redaction.
 *
 * A protocol has one verb table (verb.h), kept by its pure parser module
 * (smtp_verbs, pop3_verbs, imap_verbs): the parser reads a verb's WAIT and
 * BARRIER flags to know what follows it, the session its BEFORE_TLS flag
 * (dialog_needs_tls), and the pair modules its ENDS flag.
 *
 * The pieces, and the rules they keep:
 *  - Output spans (struct dialog_out): client bytes a parser says to forward
 *    are gathered as spans of the read block, so one read is one write.
 *  - Holding and resuming reads (dialog_hold, dialog_take_held): when a
 *    parser must wait for a reply (SMTP DATA, IMAP synchronizing literal,
 *    AUTH), or the FIFO is full, the unparsed rest of the read stays
 *    referenced (one block) and reading the client stops; the protocol
 *    parses it again after the reply, then dialog_release().
 *  - Carry (dialog_carry): a partial line (at most the line limit) waits for
 *    the next read in the relay's carry.
 *  - Backend bytes (d->down, down_start, down_end): the span of the read
 *    block parsed and ready to go to the client. Everything mxproxy says to
 *    the client (dialog_say) first flushes that span: the client sees the
 *    backend's replies and mxproxy's own in the order they were decided.
 *  - Tail (dialog_keep_tail/send_tail/drop_tail): the start of a backend
 *    reply that is not whole yet is held, so a canned reply is never glued
 *    into the middle of a backend's one.
 *  - Transcript (dialog_log_line, dialog_server_lines): ev=line records,
 *    with the dialect's redaction of server lines (SMTP 334, IMAP/POP3 "+ ").
 *    Client lines are the protocol's to redact before it logs them.
 *  - STARTTLS: termination (dialog_start_client_tls: the plaintext parsed so
 *    far is forgotten, RFC 3207/2595 style), passthrough (dialog_go_opaque:
 *    the rest is relayed untouched, as in mode tcp), and the injection guard
 *    (d->injected counts plaintext bytes that followed the STARTTLS command
 *    in the same read; dialog_log_injection writes ev=starttls_injection).
 *  - Own lines to the backend (dialog_send_backend), for the backend
 *    STARTTLS/XCLIENT/ID exchange a protocol drives before the client's
 *    first command; their replies are read with the protocol's parser and
 *    never forwarded.
 *  - Command FIFO storage (dialog_fifo_lend/return): a session with no
 *    command outstanding holds none; the worker keeps a few spares.
 *
 * Pairing replies to commands is the protocol's, through its pure module
 * (smtp_pairs.c is FIFO; IMAP pairs by tag, many in flight, and counts
 * untagged responses per tag; POP3 is FIFO with multi-line responses whose
 * shape depends on the pending command). dialect.match says which, for the
 * reader; the shared code never parses.
 *
 * The shape of a protocol's two on_data hooks (proto_smtp.c is the full one):
 *
 *   client (s->up.on_data):
 *     if (d->flags & DIALOG_F_OPAQUE) relay the block as it is;
 *     else for each parser event over b[off, len):
 *       AGAIN  -> dialog_carry(rest) and stop;
 *       WAIT   -> (more bytes behind it) dialog_hold(b, off, len) and stop;
 *                 an IMAP synchronizing literal {n} or IDLE, SMTP DATA/AUTH,
 *                 POP3 AUTH: the parser resumes after the reply;
 *       else   -> record the command (FIFO / tag table: no room -> hold),
 *                 decide forward / answer locally (verb flags: STARTTLS,
 *                 BEFORE_TLS...), dialog_out_add() what is forwarded,
 *                 answer local ones with dialog_say() in command order;
 *                 literal octets and DATA bodies are forwarded, never logged
 *                 nor parsed as commands;
 *       DIALOG_F_SWITCHED after a local STARTTLS answer: the rest of the
 *       read is injected plaintext -> d->injected += rest, stop;
 *     dialog_out_flush(); dialog_carry_done(); relay_block_unref(b).
 *   backend (s->down.on_data):
 *     d->down = b, down_start = down_end = 0; for each response parsed:
 *       not whole -> dialog_keep_tail() its start, stop;
 *       whole     -> down_end = its end, dialog_send_tail() if a start was
 *                    held, match it (FIFO or tag; untagged/"+" continuations
 *                    go straight through), log ev=pair, then resume held
 *                    client bytes (dialog_take_held, parse, unref,
 *                    dialog_release); the span grows over every response
 *                    of the read and goes out once (dialog_say and
 *                    dialog_close_after_flush flush it first, so mxproxy's
 *                    own lines and the FIN keep their place);
 *     a STARTTLS OK passed through -> dialog_go_opaque("starttls_passthrough")
 *     (IMAP COMPRESS: "compress_passthrough"); finally dialog_flush_down(),
 *     d->down = NULL, relay_block_unref(b).
 *   backend gone (proto->backend_eof/reset): dialog_stop(), dialog_say() the
 *     dialect's backend_gone reply if a command is outstanding, log each
 *     outstanding command (aborted=1 but the first), session_close_after_flush().
 *
 * Everything runs on the session's worker thread.
 */
#ifndef MXPROXY_DIALOG_H
#define MXPROXY_DIALOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "relay.h"
#include "session.h"
#include "session_impl.h"
#include "verb.h"

struct session;
struct worker;

/* How replies find their commands. */
enum dialect_match {
    DIALECT_MATCH_FIFO = 0, /* the oldest outstanding command (SMTP, POP3 PIPELINING) */
    DIALECT_MATCH_TAG,      /* by the command's tag, any order (IMAP) */
};

/* mxproxy's own replies, one line each without CRLF; NULL: none. */
struct dialect_replies {
    const char *unavailable;  /* no backend (SMTP "421 4.4.1 ...") */
    const char *local_error;  /* mxproxy short of descriptors or memory */
    const char *limit;        /* max_connections reached */
    const char *client_limit; /* max_connections(_rate)_per_client reached */
    const char *denied;       /* allow/deny refused the client: the greeting's stand-in */
    const char *idle;         /* idle_timeout */
    const char *drain;        /* drain deadline */
    const char *backend_gone; /* the backend closed with commands outstanding */
    const char *backend_tls;  /* TLS with the backend failed (never a downgrade) */
};

/* What a protocol supplies to the shared machinery. const, one per protocol. */
struct dialect {
    const char *name;               /* proto= in logs ("smtp") */
    enum dialect_match match;       /* how replies find their commands */
    const struct verb *verbs;       /* the verb table, from the parser module (verb.h) */
    unsigned nverbs;                /* its rows: the protocol's command count */
    struct dialect_replies replies; /* canned replies */
    /* transcript=full: a server line (CRLF excluded) that must not be logged
     * as it is (an AUTH challenge) gets this text instead; NULL: log it. */
    const char *(*redact_server_line)(const char *line, size_t len);
};

/* require_tls: must the client's command `id` (a row of the verb table) be refused because
 * the client has not started TLS yet? */
bool dialog_needs_tls(const struct session *s, unsigned id);

#define DIALOG_LINE_LOG_MAX 512 /* transcript=full: bytes of a server line kept */

/* d->flags: the low 16 bits are the dialog's, the rest the protocol's own
 * (DIALOG_F_PROTO(n) makes its n-th bit). */
#define DIALOG_F_OPAQUE 0x01u    /* passed through: the bytes are TLS (or compressed) now */
#define DIALOG_F_ENDING 0x02u    /* a final answer was sent; nothing more is parsed */
#define DIALOG_F_SLINE_CUT 0x04u /* the server line kept for the transcript was cut */
#define DIALOG_F_TLS 0x08u       /* mxproxy terminated the client's STARTTLS */
#define DIALOG_F_SWITCHED 0x10u  /* TLS began in the middle of a read: drop the rest */
#define DIALOG_F_DRAIN 0x20u     /* drain deadline passed: owed replies, then goodbye */
#define DIALOG_F_PROTO(n) (1u << (16 + (n)))

struct dialog {
    const struct dialect *dialect; /* set by the protocol's open() */
    unsigned flags;                /* DIALOG_F_* and the protocol's own bits */
    struct relay_block *held;      /* client bytes not parsed yet (waiting, FIFO full) */
    size_t held_off, held_end;     /* their range in held->data */
    char *carry;                   /* a partial client line between reads */
    struct relay_block *down;      /* backend bytes parsed but not yet forwarded */
    size_t down_start, down_end;   /* their range in down->data */
    uint64_t injected;             /* plaintext dropped after STARTTLS, not yet logged */
    char *sline;                   /* transcript=full: the server line being read */
    size_t sline_len;              /* bytes in sline (capped at DIALOG_LINE_LOG_MAX) */
    char *tail;                    /* the start of a backend reply not yet whole, or NULL */
    size_t tail_len, tail_cap;     /* bytes in tail, and its size */
    void *fifo;                    /* lent command FIFO storage, or NULL */
    size_t fifo_size;              /* its size */
};

/* The dialog of a session with a protocol: the first member of its state. */
static inline struct dialog *dialog_of(const struct session *s)
{
    return (struct dialog *)s->proto_state;
}

/* Frees what d holds (held block, carry, transcript line, tail, FIFO). */
void dialog_free(struct session *s);

/* Is mxproxy logging ev=pair (transcript != off) / ev=line (= full)? */
bool dialog_logs_pairs(const struct session *s);
bool dialog_logs_lines(const struct session *s);

/* One ev=pair as the admin endpoint's session record (sessview.h) keeps it:
 * the texts the log line gets, so credentials are redacted the same way. */
struct dialog_pair_note {
    const char *cmd; /* cmd= as logged: "<greeting>", "<none>" or the redacted command */
    size_t cmd_len;
    const char *code;  /* "250", "OK", "+OK"; "" when the command got no reply */
    const char *reply; /* reply= (SMTP: with its enhanced status code in front) */
    size_t reply_len;
    uint64_t ms_ns; /* ms=, with SESSVIEW_P_MS in flags */
    unsigned flags; /* SESSVIEW_P_* */
};

/* Every protocol's ev=pair event calls this, whatever the log level: one hook
 * feeding s's record; a no-op when s has none or its listener has
 * transcript = off (the page then shows no pairs, as the log has none). */
void dialog_note_pair(const struct session *s, const struct dialog_pair_note *n);

/* One ev=line (dir "client", "server" or "proxy"); text never holds credentials. */
void dialog_log_line(const struct session *s, const char *dir, const char *text, size_t len,
                     bool cut);

/* transcript=full: splits backend bytes into server lines, redacted by the dialect. */
void dialog_server_lines(struct session *s, const char *p, size_t len);

/* ---- client -> backend -------------------------------------------------------------- */

/* Spans of one read block for the backend. */
struct dialog_out {
    uv_buf_t bufs[RELAY_SEND_MAX_BUFS];
    unsigned n;
};

/* Adds p[0, len) (inside b) to o, writing o out when it is full; 0 or UV_E*. */
int dialog_out_add(struct session *s, struct relay_block *b, struct dialog_out *o, const char *p,
                   size_t len);

/* Writes o to the backend (nothing when the session is closing or the
 * backend was dropped); 0 or UV_E*. */
int dialog_out_flush(struct session *s, struct relay_block *b, struct dialog_out *o);

/* Keeps b[off, end) (a reference) and stops reading the client. */
void dialog_hold(struct session *s, struct relay_block *b, size_t off, size_t end);

/* Keeps a partial line p[0, len) (len <= max_line_length) for the next read;
 * p may point into the carry itself. 0 or UV_ENOMEM. */
int dialog_carry(struct session *s, const char *p, size_t len);

/* After a read: frees the carry once lines are whole again and nothing is held. */
void dialog_carry_done(struct session *s);

/* Takes the held bytes back to parse them again (the caller then owns the
 * reference and unrefs the block); *off and *end are their range. NULL when
 * nothing is held. */
struct relay_block *dialog_take_held(struct session *s, size_t *off, size_t *end);

/* Restarts reading the client after held bytes were all parsed (none were
 * held again); closes the session when that fails. */
void dialog_release(struct session *s);

/* Sends one of mxproxy's own lines (with its CRLF) to the backend; logged
 * as dir=proxy for transcript=full. */
void dialog_send_backend(struct session *s, const char *line, size_t len);

/* ---- backend -> client -------------------------------------------------------------- */

/* Forwards the parsed span of the backend read (d->down_start..down_end). */
void dialog_flush_down(struct session *s);

/* session_close_after_flush() after the parsed backend span went to the
 * client: a protocol forwards a read's responses at once at its end (one
 * read, one write), so whatever ends the session in the middle of it sends
 * what was parsed before the FIN. */
void dialog_close_after_flush(struct session *s, enum session_end end, const char *error);

/* Says one of mxproxy's own lines (no CRLF) to the client, after what the
 * backend said before it; logged dir=proxy for transcript=full. */
void dialog_say(struct session *s, const char *text);

/* The start of a backend reply that is not whole: keep (false: out of
 * memory), send once whole, or forget (it never reaches the client). */
bool dialog_keep_tail(struct session *s, const char *p, size_t n);
void dialog_send_tail(struct session *s);
void dialog_drop_tail(struct session *s);

/* The dialog is over (the backend is gone or unusable, a final canned reply
 * follows): the client is no longer read, nothing more is parsed
 * (DIALOG_F_ENDING) and an unfinished backend reply is forgotten. The
 * protocol then says its reply (dialog_say), logs the outstanding commands
 * (the first answered by that reply, the others aborted=1) and calls
 * session_close_after_flush(). */
void dialog_stop(struct session *s);

/* After a reply in a session past its drain deadline (DIALOG_F_DRAIN), with
 * owed replies still outstanding: true when the protocol should now say its
 * goodbye and close. A session that went opaque on that reply (STARTTLS or
 * COMPRESS passed through) shows no reply again and has no goodbye to say:
 * it closes here, end=drain, as a mode tcp session does, and false is
 * returned (it would otherwise wait, client unread, for answers it can no
 * longer see). */
bool dialog_drain_due(struct session *s, size_t owed);

/* ---- TLS ------------------------------------------------------------------------- */

/* ev=starttls_injection for the bytes counted in d->injected, then zero. */
void dialog_log_injection(struct session *s);

/* The client was told to start TLS: from now on it speaks TLS (the 5 s
 * handshake limit starts); what it said in plaintext is forgotten. Sets
 * DIALOG_F_TLS | DIALOG_F_SWITCHED. The protocol resets its parser and then
 * calls dialog_log_injection(). Returns false when the session was closed. */
bool dialog_start_client_tls(struct session *s);

/* The backend accepted STARTTLS (or COMPRESS) that mxproxy does not
 * terminate: the bytes are relayed untouched from now on and the backend's
 * EOF reaches the client as in mode tcp. Logs ev=<ev>. */
void dialog_go_opaque(struct session *s, const char *ev);

/* Starts TLS with the backend in the middle of the connection (after its
 * reply to STARTTLS/STLS): sends the ClientHello. Returns true when the
 * handshake is under way (proto->backend_tls_ready or backend_tls_failed
 * follows). Returns false with *why NULL when the session was closed (out of
 * memory), or with *why (static text) when the handshake failed at once: the
 * protocol answers the client, never a plaintext downgrade. */
bool dialog_start_backend_tls(struct session *s, const char **why);

/* ---- command FIFO storage --------------------------------------------------------- */

/* Lends size bytes of FIFO storage (a spare of this worker's, or new); the
 * same storage stays lent until dialog_fifo_return. NULL when out of memory. */
void *dialog_fifo_lend(struct session *s, size_t size);

/* Gives the lent storage back (the protocol checked that it is empty). */
void dialog_fifo_return(struct session *s);

/* Frees a worker's spare FIFOs (worker exit). */
void dialog_pool_drain(struct worker *w);

#endif /* MXPROXY_DIALOG_H */
