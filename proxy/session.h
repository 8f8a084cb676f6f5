/* session.h: one client connection and its backend connection.
 *
 * A session accepts the client, connects to a backend at once (trying the
 * next one on failure), and relays both directions with relay.c, so the
 * backend's greeting reaches the client the moment it is sent. It ends in
 * session_close(), which logs the one ev=close line and frees the session in
 * the last handle's close callback.
 */
#ifndef MXPROXY_SESSION_H
#define MXPROXY_SESSION_H

struct sockaddr_storage;
struct listener;
struct worker;

/* Why a session ended: the end= field. Names never change once shipped. */
enum session_end {
    SESSION_END_CLIENT_EOF = 0,          /* the client closed first */
    SESSION_END_CLIENT_RESET,            /* the client reset, or writing to it failed */
    SESSION_END_BACKEND_CLOSED,          /* the backend closed first */
    SESSION_END_BACKEND_RESET,           /* the backend reset, or writing to it failed */
    SESSION_END_CONNECT_FAILED,          /* no backend could be reached */
    SESSION_END_IDLE_TIMEOUT,            /* nothing read from either side for idle_timeout */
    SESSION_END_DRAIN,                   /* still open when the drain timeout expired */
    SESSION_END_LIMIT,                   /* refused: max_connections reached */
    SESSION_END_QUIT,                    /* mode smtp: the client sent QUIT and got the reply */
    SESSION_END_CLIENT_EOF_WITHOUT_QUIT, /* mode smtp: the client closed without QUIT */
    SESSION_END_SMUGGLING,               /* mode smtp: SMTP smuggling rejected, then 421 */
    SESSION_END_TLS_ERROR,               /* a TLS handshake or record failed (ev=tls_error) */
    SESSION_END_PROXY_PROTOCOL_ERROR,    /* a bad or missing PROXY header (accept_proxy_protocol) */
    SESSION_END_LOOP,          /* transparent: the original destination is mxproxy itself */
    SESSION_END_XCLIENT_ERROR, /* xclient = on: the backend could not be told who the client is */
    SESSION_END_LOCAL_ERROR,   /* mxproxy ran short of descriptors or memory for the backend */
    SESSION_END_LOGOUT,        /* mode imap: the client sent LOGOUT and got the tagged reply */
    SESSION_END_CLIENT_EOF_WITHOUT_LOGOUT, /* mode imap: the client closed without LOGOUT */
    SESSION_END_NO_BACKEND,   /* every backend is down (health checks): none was tried */
    SESSION_END_CLIENT_LIMIT, /* refused: max_connections(_rate)_per_client for its address */
    SESSION_END_DENIED,       /* refused: the client is in deny, or not in a non-empty allow */
    SESSION_END_COUNT_,       /* not an end: the number of them */
};

const char *session_end_name(enum session_end end);

/* Starts a session for fd, a connection just accepted on l from peer (as
 * accept() gave it); takes fd. Errors are logged; a session that cannot
 * start is closed, and when no session can even be made, l pauses
 * (listener_accept_failed). */
void session_accept(struct listener *l, int fd, const struct sockaddr_storage *peer);

/* The drain deadline (drain_timeout, or a second signal): closes every
 * session of w with end=drain, except a mode smtp session whose backend
 * still owes a reply: it stops reading its client and ends (421 4.3.2) once
 * the reply is forwarded, or at session_cut_all(). Call once. */
void session_close_all(struct worker *w);

/* drain_grace after the deadline, or a third signal: closes every session
 * still open with end=drain; commands still owed a reply are logged
 * aborted=1 and get none. */
void session_cut_all(struct worker *w);

#endif /* MXPROXY_SESSION_H */
