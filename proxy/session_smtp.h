/* session_smtp.h: the SMTP-aware part of a session (mode = smtp).
 *
 * Glues the pure parsers (smtp.c, smtp_pairs.c) to a session's two relay
 * directions: every client read goes through the command parser, which
 * decides what reaches the backend; every backend read is forwarded as it
 * is while the reply parser matches replies to commands for the ev=pair
 * lines. mxproxy answers the client itself only where it must: overlong or
 * malformed command lines (500), SMTP smuggling (554, then 421), a backend
 * that is unreachable or gone with commands outstanding (421).
 *
 * All functions run on the session's worker thread; s->smtp is NULL in
 * mode tcp and none of these is called then.
 */
#ifndef MXPROXY_SESSION_SMTP_H
#define MXPROXY_SESSION_SMTP_H

#include <stdbool.h>

#include "session.h"

struct log_line;
struct session;
struct worker;

/* Allocates s->smtp at accept. Returns 0 or UV_ENOMEM. */
int session_smtp_new(struct session *s);

/* Frees s->smtp and what it holds; accepts a session without one. */
void session_smtp_free(struct session *s);

/* The backend connected: route both directions through the parsers. Call
 * before the relays start reading. */
void session_smtp_on_connected(struct session *s);

/* No backend could be reached: answers "421 4.4.1" and closes once it is
 * sent. why is static text for error=. */
void session_smtp_connect_failed(struct session *s, const char *why);

/* mxproxy itself ran short of descriptors or memory for the backend
 * connection: answers "421 4.3.2" and closes once it is sent. why is static
 * text for error=. */
void session_smtp_local_error(struct session *s, const char *why);

/* The backend sent EOF: answers the oldest outstanding command with 421,
 * logs the others as aborted, then closes after the client has everything. */
void session_smtp_on_backend_eof(struct session *s);

/* Reading the backend failed (a reset) or writing to it did: handled like
 * its EOF, so the oldest outstanding command gets 421 and the others are
 * logged aborted=1; the session ends with end and error once the client has
 * it all. Not for an opaque session (session_smtp_opaque). */
void session_smtp_on_backend_reset(struct session *s, enum session_end end, const char *error);

/* True once STARTTLS went through to the backend: the bytes are TLS, SMTP is
 * no longer seen, and the session ends as in mode tcp. */
bool session_smtp_opaque(const struct session *s);

/* TLS with the backend failed: the client gets "421 4.7.0" (never a
 * plaintext downgrade), then the session closes with end=tls_error. */
void session_smtp_backend_tls_failed(struct session *s, const char *reason);

/* The backend's TLS handshake completed: with backend_tls = starttls the
 * client's EHLO now goes out inside TLS and the client is read again. */
void session_smtp_backend_tls_ready(struct session *s);

/* Ends the session with a 421 reply to the client, for timeouts and drain. */
void session_smtp_goodbye(struct session *s, enum session_end end);

/* The backend's greeting was received whole (greeting_timeout). */
bool session_smtp_greeted(const struct session *s);

/* max_connections reached: answers "421 4.7.0 ... too many connections"; the
 * caller closes once it is sent. */
void session_smtp_over_limit(struct session *s);

/* The drain deadline passed. Returns false when the backend owes no reply:
 * the caller ends the session now (session_smtp_goodbye). Returns true when
 * one is owed: the client is no longer read, and once the last owed reply
 * has been forwarded the client gets "421 4.3.2" and the session closes
 * (end=drain); the caller does nothing more. */
bool session_smtp_drain_wait(struct session *s);

/* drain_grace ran out (or a third signal): every command still owed a reply
 * is logged aborted=1 and gets no reply at all (a 421 could contradict what
 * the backend did with it); with none owed the client gets the 421. The
 * caller closes after the flush. */
void session_smtp_drain_cut(struct session *s);

/* Refines end= with what SMTP knows: once QUIT is answered the session
 * ended with quit, however the sockets closed after it; client_eof becomes
 * quit or client_eof_without_quit. An opaque session keeps end as it is. */
enum session_end session_smtp_end(const struct session *s, enum session_end end);

/* Adds helo=, mail_from=, rcpt_ok=, rcpt_rejected=, messages= and
 * primary_error= to the close line; an opaque session only opaque=1 and the
 * helo= given before STARTTLS. */
void session_smtp_log_close(const struct session *s, struct log_line *l);

/* Returns the spare command FIFOs a worker keeps to the heap. */
void session_smtp_pool_drain(struct worker *w);

#endif /* MXPROXY_SESSION_SMTP_H */
