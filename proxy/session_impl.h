/* session_impl.h: struct session, shared by session.c (connections, relay,
 * close) and the protocol modules (dialog.c, proto_*.c) that session.c
 * reaches only through s->proto (proto.h). Nothing else includes it. */
#ifndef MXPROXY_SESSION_IMPL_H
#define MXPROXY_SESSION_IMPL_H

#include <assert.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <uv.h>

#include "climit.h"
#include "config.h"
#include "relay.h"
#include "session.h"
#include "sockaddr.h"

/* An IPv4 or IPv6 address, a quarter of a sockaddr_storage: sessions are
 * counted per idle connection. */
union session_sa {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

/* Copies an AF_INET/AF_INET6 address into *dst; anything else makes it AF_UNSPEC. */
static inline void session_sa_set(union session_sa *dst, const struct sockaddr_storage *src)
{
    if (src->ss_family == AF_INET)
        memcpy(&dst->in, src, sizeof(dst->in));
    else if (src->ss_family == AF_INET6)
        memcpy(&dst->in6, src, sizeof(dst->in6));
    else
        dst->sa.sa_family = AF_UNSPEC;
}

struct proxyproto_parser;
struct sessview_pair;
struct sessview_rec;
struct proto;
struct tls_conn;
struct worker;

static_assert(CONFIG_BACKENDS_MAX <= 64, "session.tried holds one bit per backend");

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* Where a session is in its life; changed only by session_enter_phase(),
 * which logs ev=phase from= to= at debug level. Phases only move forward,
 * except RELAYING -> CONNECTING (greeting_timeout: the next backend). */
enum session_phase {
    SESSION_PHASE_ACCEPTED = 0, /* accepted; nothing started yet */
    SESSION_PHASE_PROXY_HEADER, /* reading the load balancer's PROXY header */
    SESSION_PHASE_CONNECTING,   /* a backend connect is under way */
    SESSION_PHASE_RELAYING,     /* the backend connected: both directions relay */
    SESSION_PHASE_FLUSHING,     /* close_after_flush: the client's last bytes, then FIN */
    SESSION_PHASE_CLOSING,      /* session_close ran: only close callbacks remain */
};

struct session {
    uv_tcp_t client;                   /* accepted socket; data -> up (relay) */
    uv_tcp_t backend;                  /* outgoing socket; data -> down (relay) */
    uv_timer_t timer;                  /* connect timeout, then idle timeout */
    uv_connect_t connect_req;          /* the backend connect in flight */
    struct relay_dir up;               /* client -> backend */
    struct relay_dir down;             /* backend -> client */
    struct worker *w;                  /* owning worker; sessions never migrate */
    struct config *cfg;                /* reference held for the session's life */
    const struct config_listener *cl;  /* this session's listener, inside cfg */
    enum config_transcript transcript; /* the listener's, or full for transcript_clients */
    struct session *prev, *next;       /* w->sessions list */
    uint64_t id;                       /* sid= */
    uint64_t t_accept;                 /* uv_hrtime() at accept */
    uint64_t t_connect;                /* uv_hrtime() when the current connect began */
    uint64_t connected_at;             /* uv_now() when the backend connected */
    uint64_t tls_started_at;           /* uv_now() when the client TLS handshake could begin */
    enum session_phase phase;          /* SESSION_PHASE_*, see session_enter_phase() */
    unsigned flags;                    /* SESSION_F_* */
    unsigned open_handles;             /* uv handles not yet through their close_cb */
    unsigned rr_start;                 /* round-robin position: where the search starts */
    unsigned cur;                      /* index of the backend tried last, with tries > 0 */
    unsigned tries;                    /* backends tried so far */
    uint64_t tried;                    /* bit i: backend i was tried */
    int last_error;                    /* last connect error, for end=connect_failed */
    enum session_end first_close;      /* who closed first, valid with SESSION_F_FIRST_CLOSE */
    enum session_end pending_end;      /* close_after_flush: the end= to log */
    const char *pending_error;         /* close_after_flush: the error= to log, static text */
    const struct proto *proto;         /* the mode's protocol (proto.h), NULL in mode tcp */
    void *proto_state;                 /* the protocol's per-session state, its own type */
    struct tls_conn *client_tls;       /* TLS with the client, or NULL */
    struct tls_conn *backend_tls;      /* TLS with the backend, or NULL */
    union session_sa client_sa;        /* the client: the peer, or what a PROXY header said */
    union session_sa orig_dst;         /* where the client meant to go, or AF_UNSPEC */
    struct config_addr *dst_backend;   /* backend = original_dst: orig_dst as a backend, or NULL */
    struct proxyproto_parser *pp_in;   /* accept_proxy_protocol: header being read */
    char *early;                       /* client bytes that followed the PROXY header */
    size_t early_len;                  /* their number */
    char client_addr[SOCKADDR_TEXT_MAX]; /* client= */
    struct climit_table *climit;         /* SESSION_F_CLIMIT: the table counting it */
    struct climit_key climit_key;        /* ... and the client's key in it */
    struct sessview_rec *view;           /* the admin endpoint's record (sessview.h), or NULL */
};

/* Facts about a session, whatever its phase (s->flags). */
#define SESSION_F_RELAYS 0x02u       /* the relays run with a connected backend */
#define SESSION_F_BACKEND 0x04u      /* backend handle initialised and not yet closed */
#define SESSION_F_FIRST_CLOSE 0x08u  /* first_close records the side that closed first */
#define SESSION_F_COUNTED 0x10u      /* counted in the listener's active sessions */
#define SESSION_F_TIMED_OUT 0x20u    /* the current connect attempt timed out */
#define SESSION_F_NO_BACKEND 0x80u   /* the backend was dropped on purpose; no retry */
#define SESSION_F_PP_SENT 0x200u     /* the PROXY header went to the backend */
#define SESSION_F_OPEN_LOGGED 0x400u /* ev=open was written */
/* this connect attempt reads the backend at once: its first bytes (or a probe of the
 * socket's state) complete the connect, with no POLLOUT turn */
#define SESSION_F_READ_CONNECT 0x800u
#define SESSION_F_CLIMIT 0x1000u     /* counted in s->climit: released at close */
#define SESSION_F_ON_BACKEND 0x2000u /* counted in backend_state[cur]->active */

/* Moves s to phase next (logged at debug level). Once FLUSHING or CLOSING,
 * a session never goes back to an earlier phase: such a call is a no-op. */
void session_enter_phase(struct session *s, enum session_phase next);

/* session_close ran: only close callbacks remain. */
static inline bool session_closing(const struct session *s)
{
    return s->phase == SESSION_PHASE_CLOSING;
}

/* Closing, or closing after the client has what is queued for it. */
static inline bool session_ending(const struct session *s)
{
    return s->phase >= SESSION_PHASE_FLUSHING;
}

/* end= for a backend that went away: the side that closed first, which is
 * the backend unless the client already had. */
static inline enum session_end session_backend_gone_end(struct session *s)
{
    if (!(s->flags & SESSION_F_FIRST_CLOSE)) {
        s->flags |= SESSION_F_FIRST_CLOSE;
        s->first_close = SESSION_END_BACKEND_CLOSED;
    }
    return s->first_close;
}

#define SESSION_TLS_HANDSHAKE_MS 5000 /* a client TLS handshake must finish within this */

/* Logs ev=close once and closes every handle; the session is freed when the
 * last close callback has run. error is static text or NULL. Idempotent. */
void session_close(struct session *s, enum session_end end, const char *error);

/* Stops reading the client, sends what is queued for it followed by a FIN,
 * then closes with end and error (also after a short grace if the client
 * does not take the bytes). */
void session_close_after_flush(struct session *s, enum session_end end, const char *error);

/* Connects the relay directions to the session's TLS connections: the
 * client's decrypts up and encrypts down, the backend's the reverse. Call
 * after relay_init and whenever one of them appears (STARTTLS). */
void session_wire_tls(struct session *s);

/* The client's TLS handshake may begin now: it must finish within
 * SESSION_TLS_HANDSHAKE_MS; re-arms the session timer accordingly. */
void session_tls_started(struct session *s);

/* Where the client connected to: the original destination when one is
 * known (transparent, PROXY header), else the accepted socket's local
 * address; AF_UNSPEC when neither is. */
void session_client_dst(struct session *s, struct sockaddr_storage *out);

/* client= text of s->client_sa, formatted on first use. */
const char *session_client_addr(struct session *s);

/* The name to send as SNI and verify in the backend's certificate, or NULL;
 * buf (cap bytes) may hold it. */
const char *session_backend_name(const struct session *s, char *buf, size_t cap);

/* Closes the backend connection with a reset, so it discards whatever it was
 * receiving (an unfinished message), without ending the session. */
void session_drop_backend(struct session *s);

/* Refreshes s's record for the admin endpoint (phase, bytes, backend, TLS,
 * the protocol's close fields); a no-op without one. */
void session_view_update(const struct session *s);

/* Adds one pair (already redacted, as logged) to s's record, then refreshes it. */
void session_view_pair(const struct session *s, const struct sessview_pair *p);

#endif /* MXPROXY_SESSION_IMPL_H */
