/* session.c: accept, connect to a backend at once, relay, close. */
#include "session.h"
#include "clock.h"
#include "proto.h"
#include "session_impl.h"

#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cidr.h"
#include "climit.h"
#include "config.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "proxyproto.h"
#include "relay.h"
#include "sessview.h"
#include "sockaddr.h"
#include "tls.h"
#include "worker.h"

static const char *const session_end_names[] = {
    [SESSION_END_CLIENT_EOF] = "client_eof",
    [SESSION_END_CLIENT_RESET] = "client_reset",
    [SESSION_END_BACKEND_CLOSED] = "backend_closed",
    [SESSION_END_BACKEND_RESET] = "backend_reset",
    [SESSION_END_CONNECT_FAILED] = "connect_failed",
    [SESSION_END_IDLE_TIMEOUT] = "idle_timeout",
    [SESSION_END_DRAIN] = "drain",
    [SESSION_END_LIMIT] = "limit",
    [SESSION_END_QUIT] = "quit",
    [SESSION_END_CLIENT_EOF_WITHOUT_QUIT] = "client_eof_without_quit",
    [SESSION_END_SMUGGLING] = "smuggling",
    [SESSION_END_TLS_ERROR] = "tls_error",
    [SESSION_END_PROXY_PROTOCOL_ERROR] = "proxy_protocol_error",
    [SESSION_END_LOOP] = "loop",
    [SESSION_END_XCLIENT_ERROR] = "xclient_error",
    [SESSION_END_LOCAL_ERROR] = "local_error",
    [SESSION_END_LOGOUT] = "logout",
    [SESSION_END_CLIENT_EOF_WITHOUT_LOGOUT] = "client_eof_without_logout",
    [SESSION_END_NO_BACKEND] = "no_backend",
    [SESSION_END_CLIENT_LIMIT] = "client_limit",
    [SESSION_END_DENIED] = "denied",
};

static_assert((int)CONFIG_KERNEL_RELAY_SPLICE == (int)RELAY_KERNEL_SPLICE &&
                  (int)CONFIG_KERNEL_RELAY_SOCKMAP == (int)RELAY_KERNEL_SOCKMAP,
              "kernel_relay values are relay_kernel values");

static_assert(sizeof(session_end_names) / sizeof(session_end_names[0]) == SESSION_END_COUNT_,
              "every enum session_end has a name");

const char *session_end_name(enum session_end end)
{
    return session_end_names[end];
}

static const char *const session_phase_names[] = {
    [SESSION_PHASE_ACCEPTED] = "accepted",     [SESSION_PHASE_PROXY_HEADER] = "proxy_header",
    [SESSION_PHASE_CONNECTING] = "connecting", [SESSION_PHASE_RELAYING] = "relaying",
    [SESSION_PHASE_FLUSHING] = "flushing",     [SESSION_PHASE_CLOSING] = "closing",
};

static void session_view_open(struct session *s);
static void session_view_close(struct session *s, enum session_end end, const char *error);

void session_enter_phase(struct session *s, enum session_phase next)
{
    struct log_line l;

    if (next == s->phase || (s->phase >= SESSION_PHASE_FLUSHING && next < s->phase))
        return;
    if (log_enabled(LOG_DEBUG)) {
        log_begin(&l, LOG_DEBUG, "phase");
        log_sid(&l, s->id);
        log_str(&l, "from", session_phase_names[s->phase]);
        log_str(&l, "to", session_phase_names[next]);
        log_end(&l);
    }
    s->phase = next;
    if (next != SESSION_PHASE_CLOSING)
        session_view_update(s); /* session_close updates it with end= */
}

/* Unique within the process: a random 32-bit prefix set once, so ids from
 * two runs rarely collide in aggregated logs, then a counter. */
static atomic_uint_fast64_t session_ids;
static uv_once_t session_ids_once = UV_ONCE_INIT;

static void session_ids_seed(void)
{
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 16) ^ uv_hrtime();
    seed ^= seed >> 33;
    seed *= 0xff51afd7ed558ccdULL;
    seed ^= seed >> 33;
    atomic_store(&session_ids, (seed & 0xffffffff00000000ULL));
}

static uint64_t session_next_id(void)
{
    uv_once(&session_ids_once, session_ids_seed);
    return atomic_fetch_add(&session_ids, 1) + 1;
}

/* client= text of client_sa (the accepted peer, or the PROXY header's source), formatted on
 * first use: a proxy that logs nothing never formats an address. */
const char *session_client_addr(struct session *s)
{
    if (s->client_addr[0] != '\0')
        return s->client_addr;
    if (s->client_sa.sa.sa_family != AF_UNSPEC)
        sockaddr_format((const struct sockaddr *)&s->client_sa, s->client_addr,
                        sizeof(s->client_addr));
    else
        snprintf(s->client_addr, sizeof(s->client_addr), "-");
    return s->client_addr;
}

static void session_leave_backend(struct session *s);

static void session_maybe_free(struct session *s)
{
    if (s->open_handles > 0)
        return;
    struct worker *w = s->w;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        w->sessions = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    atomic_fetch_sub(&w->n_sessions, 1);
    session_leave_backend(s);
    if (s->proto != NULL)
        s->proto->free(s);
    free(s->pp_in);
    free(s->early);
    free(s->dst_backend);
    tls_conn_free(s->client_tls);
    tls_conn_free(s->backend_tls);
    config_unref(s->cfg);
    free(s);
    worker_session_gone(w);
}

static void session_on_client_closed(uv_handle_t *h)
{
    struct session *s = container_of(h, struct session, client);
    s->open_handles--;
    session_maybe_free(s);
}

static void session_on_timer_closed(uv_handle_t *h)
{
    struct session *s = container_of(h, struct session, timer);
    s->open_handles--;
    session_maybe_free(s);
}

/* last_error after greeting_timeout: no UV_E* code says it. */
#define SESSION_ERR_NO_GREETING (-0x7ffe)

/* The error= text of a failed connect, the same on ev=connect_error and ev=close. */
static const char *session_connect_error_text(int status)
{
    if (status == SESSION_ERR_NO_GREETING)
        return "no greeting";
    return status == UV_ETIMEDOUT ? "connect timeout" : uv_strerror(status);
}

static void session_connect_next(struct session *s);
static void session_connect_error(struct session *s, int rc);
static void session_backend_connected(struct session *s);
static void session_on_timer(uv_timer_t *t);

/* A backend read at once (SESSION_F_READ_CONNECT) that has sent nothing after this many
 * ms is asked whether its connect completed (a backend waiting for its client). */
#define SESSION_PROBE_MS 50
static void session_no_backend(struct session *s);
static unsigned session_n_backends(const struct session *s);
static unsigned session_pick_backend(const struct session *s);
static void session_pp_failed(struct session *s, const char *reason);
static int session_send_proxy_header(struct session *s);

static void session_on_backend_closed(uv_handle_t *h)
{
    struct session *s = container_of(h, struct session, backend);
    s->open_handles--;
    s->flags &= ~SESSION_F_BACKEND;
    if (session_closing(s) || (s->flags & SESSION_F_NO_BACKEND)) {
        session_maybe_free(s);
        return;
    }
    /* A failed attempt: try the next backend at once, or give up. */
    if (s->tries < session_n_backends(s) && session_pick_backend(s) != UINT32_MAX) {
        session_connect_next(s);
        return;
    }
    if (s->proto != NULL) {
        /* A server-first client waits for a reply: give it one, not a bare close. */
        s->proto->say(s, PROTO_SAY_UNAVAILABLE, session_connect_error_text(s->last_error));
        session_close_after_flush(s, SESSION_END_CONNECT_FAILED,
                                  session_connect_error_text(s->last_error));
        return;
    }
    session_close(s, SESSION_END_CONNECT_FAILED, session_connect_error_text(s->last_error));
}

static const struct config_addr *session_backend(const struct session *s)
{
    return s->cl->backend_original_dst ? s->dst_backend : &s->cl->backends[s->cur];
}

/* The name a backend's certificate must carry: backend_sni, or else, when
 * verifying, the address connected to (an IP address in the certificate). */
const char *session_backend_name(const struct session *s, char *buf, size_t cap)
{
    if (s->cl->backend_sni != NULL)
        return s->cl->backend_sni;
    if (!s->cl->backend_verify)
        return NULL;
    const struct config_addr *b = session_backend(s);
    const char *t = b->text;
    size_t n = strlen(t);
    const char *colon = strrchr(t, ':');
    if (colon != NULL)
        n = (size_t)(colon - t);
    if (t[0] == '[' && n >= 2) {
        t++;
        n -= 2;
    }
    snprintf(buf, cap, "%.*s", (int)n, t);
    return buf;
}

/* backend = original_dst has one backend per session: its destination. */
static unsigned session_n_backends(const struct session *s)
{
    return s->cl->backend_original_dst ? 1 : (unsigned)s->cl->n_backends;
}

static uint64_t session_clock_ms(void)
{
    return clock_mono_ns() / 1000000;
}

/* A backend the health checks took out: never tried, not even last. */
static bool session_backend_down(const struct config_listener *cl, unsigned i)
{
    return atomic_load_explicit(&cl->backend_state[i]->down, memory_order_relaxed);
}

/* The next backend to try, or UINT32_MAX when none is left. Backends the
 * health checks took out are skipped. Of the others not tried yet, those
 * that have not failed within fail_timeout come first: balance = first takes
 * the first in file order, round_robin the first from rr_start on,
 * least_connections the one with the fewest open sessions over all workers
 * (ties: from rr_start on). If every one has failed lately, the first of
 * them in that order anyway (never give up without trying). */
static unsigned session_pick_backend(const struct session *s)
{
    const struct config_listener *cl = s->cl;
    uint64_t now = session_clock_ms();
    unsigned fallback = UINT32_MAX;
    unsigned best = UINT32_MAX;
    unsigned best_active = UINT32_MAX;
    unsigned start = cl->balance == CONFIG_BALANCE_FIRST ? 0 : s->rr_start;

    if (cl->backend_original_dst)
        return s->tried != 0 ? UINT32_MAX : 0;
    for (unsigned k = 0; k < cl->n_backends; k++) {
        unsigned i = (start + k) % (unsigned)cl->n_backends;
        if ((s->tried & (UINT64_C(1) << i)) || session_backend_down(cl, i))
            continue;
        if (atomic_load_explicit(&cl->backend_retry_at[i], memory_order_relaxed) > now) {
            if (fallback == UINT32_MAX)
                fallback = i;
            continue;
        }
        if (cl->balance != CONFIG_BALANCE_LEAST_CONNECTIONS)
            return i;
        unsigned active = atomic_load_explicit(&cl->backend_state[i]->active, memory_order_relaxed);
        if (active < best_active) {
            best = i;
            best_active = active;
        }
    }
    return best != UINT32_MAX ? best : fallback;
}

/* The session no longer occupies its backend (least_connections). */
static void session_leave_backend(struct session *s)
{
    if (!(s->flags & SESSION_F_ON_BACKEND))
        return;
    s->flags &= ~SESSION_F_ON_BACKEND;
    atomic_fetch_sub_explicit(&s->cl->backend_state[s->cur]->active, 1, memory_order_relaxed);
}

/* Puts the current backend last for fail_timeout; logs when it was fine. */
static void session_mark_backend_failed(const struct session *s)
{
    const struct config_listener *cl = s->cl;
    struct log_line l;

    if (cl->fail_timeout_ms == 0 || cl->backend_original_dst)
        return;
    uint64_t now = session_clock_ms();
    uint64_t prev = atomic_exchange_explicit(&cl->backend_retry_at[s->cur],
                                             now + cl->fail_timeout_ms, memory_order_relaxed);
    if (prev <= now && log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "backend_down");
        log_str(&l, "listener", cl->name);
        log_str(&l, "backend", session_backend(s)->text);
        log_uint(&l, "for_ms", cl->fail_timeout_ms);
        log_str(&l, "reason", session_connect_error_text(s->last_error));
        log_end(&l);
    }
}

/* Ends this connect attempt; session_on_backend_closed moves on. */
static void session_connect_failed(struct session *s, int status)
{
    struct log_line l;

    s->last_error = status;
    session_mark_backend_failed(s);
    if (!s->cl->backend_original_dst)
        atomic_fetch_add_explicit(&s->cl->backend_state[s->cur]->connect_failures, 1,
                                  memory_order_relaxed);
    session_leave_backend(s);
    if (log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "connect_error");
        log_sid(&l, s->id);
        log_str(&l, "backend", session_backend(s)->text);
        log_str(&l, "error", session_connect_error_text(status));
        log_end(&l);
    }
    uv_timer_stop(&s->timer);
    if (!uv_is_closing((uv_handle_t *)&s->backend))
        uv_close((uv_handle_t *)&s->backend, session_on_backend_closed);
}

/* This host ran short of something a backend connection needs: not the
 * backend's fault, and no other backend would fare better. */
static bool session_error_is_local(int status)
{
    return status == UV_EMFILE || status == UV_ENFILE || status == UV_ENOMEM ||
           status == UV_ENOBUFS;
}

/* Ends the session for a local shortage (status) met while connecting:
 * end=local_error, the backend is neither marked down nor replaced. */
static void session_local_error(struct session *s, int status)
{
    const char *why = uv_strerror(status);

    s->last_error = status;
    s->flags |= SESSION_F_NO_BACKEND; /* the backend closes without a retry */
    uv_timer_stop(&s->timer);
    if ((s->flags & SESSION_F_BACKEND) && !uv_is_closing((uv_handle_t *)&s->backend))
        uv_close((uv_handle_t *)&s->backend, session_on_backend_closed);
    if (s->proto != NULL) {
        s->proto->say(s, PROTO_SAY_LOCAL_ERROR, why);
        session_close_after_flush(s, SESSION_END_LOCAL_ERROR, why);
        return;
    }
    session_close(s, SESSION_END_LOCAL_ERROR, why);
}

void session_wire_tls(struct session *s)
{
    s->up.rev = &s->down;
    s->down.rev = &s->up;
    s->up.src_tls = s->client_tls;
    s->down.dst_tls = s->client_tls;
    s->down.src_tls = s->backend_tls;
    s->up.dst_tls = s->backend_tls;
}

/* "TLSv1.3/TLS_AES_256_GCM_SHA384", the tls_client= and tls_backend= text. */
static const char *session_tls_text(const struct tls_conn *t, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%s", tls_version(t), tls_cipher(t));
    return buf;
}

/* A handshake completed; client says which side. */
static void session_log_tls(struct session *s, bool client)
{
    struct tls_conn *t = client ? s->client_tls : s->backend_tls;
    struct log_line l;
    char text[96];

    if (!log_enabled(LOG_INFO))
        return;
    log_begin(&l, LOG_INFO, "tls");
    log_sid(&l, s->id);
    log_str(&l, "side", client ? "client" : "backend");
    log_str(&l, "tls", session_tls_text(t, text, sizeof(text)));
    if (tls_sni(t) != NULL && (client || s->cl->backend_sni != NULL))
        log_str(&l, "sni", tls_sni(t)); /* an address checked in place of a name is no SNI */
    if (tls_session_reused(t))
        log_uint(&l, "resumed", 1);
    if (!client)
        log_uint(&l, "verified", tls_peer_verified(t));
    log_end(&l);
}

static void session_end_now(struct session *s, enum session_end end);

/* TLS with one side failed: one ev=tls_error line saying why, then the
 * session ends (with the protocol's canned reply to the client when the
 * backend's TLS failed, so the client is never left with a bare EOF). */
static void session_tls_failed(struct session *s, bool client, int status)
{
    struct tls_conn *t = client ? s->client_tls : s->backend_tls;
    const char *reason = t != NULL ? tls_error_reason(t) : NULL;
    struct log_line l;

    metrics_tls(&s->w->metrics, client, false);
    if (reason == NULL)
        reason = status == -ENOBUFS ? "too much unread TLS data" : "TLS failure";
    log_begin(&l, LOG_WARN, "tls_error");
    log_sid(&l, s->id);
    log_str(&l, "side", client ? "client" : "backend");
    log_str(&l, "reason", reason);
    if (!client && tls_verify_error(t) != NULL)
        log_str(&l, "verify", tls_verify_error(t));
    log_end(&l);
    if (!client && s->proto != NULL && s->phase != SESSION_PHASE_FLUSHING) {
        s->proto->backend_tls_failed(s, reason);
        return;
    }
    session_close(s, SESSION_END_TLS_ERROR, reason);
}

/* Ends the session the way its protocol expects: with a protocol the client
 * first gets its goodbye, in mode tcp the connection just closes. */
static void session_end_now(struct session *s, enum session_end end)
{
    if (s->proto != NULL && s->phase == SESSION_PHASE_RELAYING) {
        s->proto->say(s, end == SESSION_END_IDLE_TIMEOUT ? PROTO_SAY_IDLE : PROTO_SAY_DRAIN, NULL);
        session_close_after_flush(s, end, NULL);
        return;
    }
    session_close(s, end, NULL);
}

/* end= when a socket failed: the side that closed first, if one did, else
 * a reset of the failing side (client or backend). */
static enum session_end session_reset_end(const struct session *s, bool client)
{
    if (s->flags & SESSION_F_FIRST_CLOSE)
        return s->first_close;
    return client ? SESSION_END_CLIENT_RESET : SESSION_END_BACKEND_RESET;
}

/* A protocol answers a backend that failed (reset, or a write to it failed)
 * as one that closed: with a reply for the oldest outstanding command. Not once
 * the session is opaque or already ending. */
static bool session_answers_backend_reset(const struct session *s)
{
    return s->proto != NULL && !s->proto->opaque(s) && s->phase != SESSION_PHASE_FLUSHING &&
           !(s->flags & SESSION_F_NO_BACKEND);
}

static void session_on_relay_event(struct relay_dir *d, enum relay_event ev, int status)
{
    struct session *s = d->owner;
    bool up = d == &s->up;

    if (session_closing(s))
        return;
    if (!up && (ev == RELAY_EV_CONNECTED || ev == RELAY_EV_READ_ERR) &&
        s->phase == SESSION_PHASE_CONNECTING && (s->flags & SESSION_F_READ_CONNECT)) {
        /* The backend's first read event ends the connect. */
        if (ev == RELAY_EV_READ_ERR && status != UV_ECONNRESET && status != UV_EPIPE) {
            session_connect_error(s, status); /* refused, unreachable: fail over */
            return;
        }
        session_backend_connected(s); /* bytes, EOF, or a reset after the accept */
        if (ev == RELAY_EV_CONNECTED || session_closing(s))
            return;
    }
    switch (ev) {
    case RELAY_EV_CONNECTED:
        return;
    case RELAY_EV_KERNEL:
        if (log_enabled(LOG_DEBUG)) {
            struct log_line l;
            log_begin(&l, LOG_DEBUG, "kernel_relay");
            log_sid(&l, s->id);
            log_str(&l, "kernel_relay", config_kernel_relay_name((enum config_kernel_relay)status));
            log_str(&l, "dir", status == RELAY_KERNEL_SOCKMAP ? "both" : (up ? "up" : "down"));
            log_end(&l);
        }
        return;
    case RELAY_EV_EOF:
        if (!up && s->proto != NULL && !s->proto->opaque(s)) {
            s->proto->backend_eof(s);
            return;
        }
        if (!(s->flags & SESSION_F_FIRST_CLOSE)) {
            s->flags |= SESSION_F_FIRST_CLOSE;
            s->first_close = up ? SESSION_END_CLIENT_EOF : SESSION_END_BACKEND_CLOSED;
        }
        return;
    case RELAY_EV_DONE:
        if (s->phase == SESSION_PHASE_FLUSHING) {
            if (!up)
                session_close(s, s->pending_end, s->pending_error);
            return;
        }
        if ((s->up.flags & RELAY_F_DONE) && (s->down.flags & RELAY_F_DONE))
            session_close(s, s->first_close, NULL);
        return;
    case RELAY_EV_READ_ERR:
        /* up reads the client, down reads the backend. */
        if (!up && session_answers_backend_reset(s)) {
            s->proto->backend_reset(s, session_reset_end(s, false), uv_strerror(status));
            return;
        }
        session_close(s, session_reset_end(s, up), uv_strerror(status));
        return;
    case RELAY_EV_TLS_READY:
        metrics_tls(&s->w->metrics, up, true);
        session_log_tls(s, up);
        if (up && s->cl->proxy_protocol != CONFIG_PROXY_PROTOCOL_OFF &&
            !(s->flags & SESSION_F_PP_SENT))
            (void)session_send_proxy_header(s); /* v2 with the TLS details */
        if (!up && s->proto != NULL)
            s->proto->backend_tls_ready(s);
        return;
    case RELAY_EV_TLS_ERR:
        session_tls_failed(s, up, status);
        return;
    case RELAY_EV_WRITE_ERR:
        /* up writes to the backend, down writes to the client. */
        if (up && session_answers_backend_reset(s)) {
            s->proto->backend_reset(s, session_reset_end(s, false), uv_strerror(status));
            return;
        }
        session_close(s, session_reset_end(s, !up), uv_strerror(status));
        return;
    }
    abort(); /* every relay_event is handled above */
}

/* A client TLS handshake is still to finish. */
static bool session_tls_pending(const struct session *s)
{
    return s->client_tls != NULL && !tls_handshake_done(s->client_tls);
}

/* A protocol: the backend connected but its greeting is not complete yet. */
static bool session_greeting_pending(const struct session *s)
{
    return s->proto != NULL && !s->proto->greeted(s);
}

/* Milliseconds until the timer must look again: the idle deadline, or the
 * client's TLS handshake deadline or the greeting deadline when that comes
 * first. */
static uint64_t session_timer_ms(const struct session *s, uint64_t now)
{
    uint64_t last = s->connected_at;
    if (s->up.last_read > last)
        last = s->up.last_read;
    if (s->down.last_read > last)
        last = s->down.last_read;
    uint64_t ms = s->cl->idle_timeout_ms - (now - last < s->cl->idle_timeout_ms ? now - last : 0);
    if (session_tls_pending(s)) {
        uint64_t age = now - s->tls_started_at;
        uint64_t left = age < SESSION_TLS_HANDSHAKE_MS ? SESSION_TLS_HANDSHAKE_MS - age : 0;
        if (left < ms)
            ms = left;
    }
    if (session_greeting_pending(s)) {
        uint64_t age = now - s->connected_at;
        uint64_t limit = s->cl->greeting_timeout_ms;
        uint64_t left = age < limit ? limit - age : 0;
        if (left < ms)
            ms = left;
    }
    return ms > 0 ? ms : 1;
}

static void session_on_timer(uv_timer_t *t);

void session_tls_started(struct session *s)
{
    s->tls_started_at = uv_now(s->client.loop);
    if (s->flags & SESSION_F_RELAYS)
        uv_timer_start(&s->timer, session_on_timer, session_timer_ms(s, s->tls_started_at), 0);
}

static void session_tls_timeout(struct session *s)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "tls_error");
    log_sid(&l, s->id);
    log_str(&l, "side", "client");
    log_str(&l, "reason", "handshake timeout");
    log_end(&l);
    metrics_tls(&s->w->metrics, true, false);
    session_close(s, SESSION_END_TLS_ERROR, "handshake timeout");
}

/* greeting_timeout: the backend accepted but never greeted. While nothing
 * was relayed either way the client cannot tell, so it counts as a failed
 * connect (ev=connect_error error="no greeting", the backend put last) and
 * the next backend is tried. Once bytes went through (a client talking
 * first) or a client TLS handshake began, there is no going back: the
 * client gets the protocol's "no backend" reply at once. */
static void session_greeting_timeout(struct session *s)
{
    bool clean = s->up.bytes == 0 && s->down.bytes == 0 && s->client_tls == NULL;

    relay_stop(&s->up);
    relay_stop(&s->down);
    s->flags &= ~(SESSION_F_RELAYS | SESSION_F_PP_SENT); /* the next backend starts afresh */
    session_enter_phase(s, SESSION_PHASE_CONNECTING);
    tls_conn_free(s->backend_tls);
    s->backend_tls = NULL;
    session_wire_tls(s);
    if (!clean)
        s->tries = session_n_backends(s); /* this was the last try */
    session_connect_failed(s, SESSION_ERR_NO_GREETING);
}

/* SESSION_F_READ_CONNECT and nothing heard from the backend yet: asks the socket whether
 * the connect completed (a backend that waits for the client). Returns false once
 * connect_timeout is over; otherwise the session is connected now or the timer looks
 * again, twice as late each time (SESSION_PROBE_MS, then 2x, ... at most 1 s). */
static bool session_probe_connect(struct session *s)
{
    uint64_t waited = (clock_mono_ns() - s->t_connect) / 1000000;
    unsigned limit = s->cl->connect_timeout_ms;
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    uv_os_fd_t fd;

    if (waited >= limit)
        return false;
    if (uv_fileno((uv_handle_t *)&s->backend, &fd) == 0 &&
        getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 &&
        (ti.tcpi_state == TCP_ESTABLISHED || ti.tcpi_state == TCP_CLOSE_WAIT)) {
        session_backend_connected(s);
        return true;
    }
    uint64_t next = waited < SESSION_PROBE_MS ? SESSION_PROBE_MS : waited;
    if (next > 1000)
        next = 1000;
    if (next > limit - waited)
        next = limit - waited;
    uv_timer_start(&s->timer, session_on_timer, next, 0);
    return true;
}

static void session_on_timer(uv_timer_t *t)
{
    struct session *s = container_of(t, struct session, timer);

    if (s->phase == SESSION_PHASE_FLUSHING) {
        /* The client does not take our last bytes: close anyway. */
        session_close(s, s->pending_end, s->pending_error);
        return;
    }
    if (s->phase == SESSION_PHASE_PROXY_HEADER) {
        session_pp_failed(s, "timeout");
        return;
    }
    if (s->phase != SESSION_PHASE_RELAYING) {
        if ((s->flags & SESSION_F_READ_CONNECT) && session_probe_connect(s))
            return;
        s->flags |= SESSION_F_TIMED_OUT;
        session_connect_failed(s, UV_ETIMEDOUT);
        return;
    }
    /* Reads only stamp last_read; the timer checks lazily, so the hot path
     * never touches the timer heap. */
    relay_kernel_sample(&s->up);
    uint64_t now = uv_now(t->loop);
    uint64_t last = s->connected_at;
    if (s->up.last_read > last)
        last = s->up.last_read;
    if (s->down.last_read > last)
        last = s->down.last_read;
    uint64_t idle = s->cl->idle_timeout_ms;
    if (session_tls_pending(s) && now - s->tls_started_at >= SESSION_TLS_HANDSHAKE_MS) {
        session_tls_timeout(s);
        return;
    }
    if (session_greeting_pending(s) && now - s->connected_at >= s->cl->greeting_timeout_ms) {
        session_greeting_timeout(s);
        return;
    }
    if (now - last >= idle) {
        session_end_now(s, SESSION_END_IDLE_TIMEOUT);
        return;
    }
    uv_timer_start(t, session_on_timer, session_timer_ms(s, now), 0);
}

/* The backend accepted: log it, set up both directions, start relaying. */
static void session_backend_connected(struct session *s)
{
    struct log_line l;
    int rc;

    s->flags |= SESSION_F_RELAYS;
    s->down.flags &= ~RELAY_F_CONNECTING;
    session_enter_phase(s, SESSION_PHASE_RELAYING);
    metrics_connect_time(&s->w->metrics, clock_mono_ns() - s->t_connect);
    s->connected_at = uv_now(s->backend.loop);
    s->tls_started_at = s->connected_at; /* implicit TLS: the client is read from now on */
    if (!s->cl->backend_original_dst) {
        if (atomic_load_explicit(&s->cl->backend_retry_at[s->cur], memory_order_relaxed) != 0)
            atomic_store_explicit(&s->cl->backend_retry_at[s->cur], 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&s->cl->backend_state[s->cur]->sessions, 1, memory_order_relaxed);
    }
    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, "connect");
        log_sid(&l, s->id);
        log_str(&l, "backend", session_backend(s)->text);
        log_ms(&l, "ms", clock_mono_ns() - s->t_connect);
        log_end(&l);
    }
    relay_init(&s->up, (uv_stream_t *)&s->client, (uv_stream_t *)&s->backend, &s->w->pool,
               session_on_relay_event, s);
    if (!(s->flags & SESSION_F_READ_CONNECT)) /* else down is reading the backend already */
        relay_init(&s->down, (uv_stream_t *)&s->backend, (uv_stream_t *)&s->client, &s->w->pool,
                   session_on_relay_event, s);
    /* With implicit client TLS a v2 header carries the TLS details: it goes
     * out when the client's handshake is done (the backend waits for it
     * before greeting, and the client cannot read the greeting before then). */
    if (s->cl->proxy_protocol != CONFIG_PROXY_PROTOCOL_OFF &&
        !(s->cl->proxy_protocol == CONFIG_PROXY_PROTOCOL_V2 && s->client_tls != NULL) &&
        session_send_proxy_header(s) != 0)
        return; /* closed through on_event */
    char host[SOCKADDR_TEXT_MAX];
    if (s->cl->backend_tls == CONFIG_BACKEND_TLS_IMPLICIT &&
        tls_conn_new(&s->backend_tls, s->cl->tls_client,
                     session_backend_name(s, host, sizeof(host))) != 0) {
        session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
        return;
    }
    session_wire_tls(s);
    if (s->proto != NULL)
        s->proto->connected(s);
    else
        relay_kernel_allow(&s->up, (enum relay_kernel)s->cl->kernel_relay); /* opaque */
    /* The backend first: its greeting is forwarded the moment it arrives. */
    rc = relay_start(&s->down);
    if (rc == 0)
        rc = relay_start(&s->up);
    if (rc != 0) {
        session_close(s, SESSION_END_CLIENT_RESET, uv_strerror(rc));
        return;
    }
    if (s->early != NULL) {
        relay_inject(&s->up, s->early, s->early_len);
        free(s->early);
        s->early = NULL;
        if (session_closing(s))
            return;
    }
    if (s->backend_tls != NULL) {
        int hs = tls_handshake(s->backend_tls); /* the ClientHello */
        relay_tls_flush(&s->up);
        if (hs < 0) {
            session_tls_failed(s, false, hs);
            return;
        }
    }
    uv_timer_start(&s->timer, session_on_timer, session_timer_ms(s, uv_now(s->backend.loop)), 0);
}

static void session_on_connect(uv_connect_t *req, int status)
{
    struct session *s = container_of(req, struct session, connect_req);

    if (session_closing(s) || (s->flags & SESSION_F_TIMED_OUT))
        return; /* UV_ECANCELED from our own uv_close */
    if (status < 0) {
        if (session_error_is_local(status))
            session_local_error(s, status);
        else
            session_connect_failed(s, status);
        return;
    }
    session_backend_connected(s);
}

/* mark: SO_MARK, so iptables rules can exempt mxproxy's own connections
 * (no loop through REDIRECT); source = client: the backend sees the
 * client's address (TPROXY, IP_TRANSPARENT and a bind to it). */
static int session_prepare_backend_socket(struct session *s, const struct config_addr *b)
{
    const struct config_listener *cl = s->cl;
    uv_os_fd_t fd;

    if (cl->mark == 0 && !cl->source_client)
        return 0;
    if (uv_fileno((uv_handle_t *)&s->backend, &fd) != 0)
        return UV_EBADF;
    if (cl->mark != 0) {
        unsigned mark = cl->mark;
        if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
            return -errno;
    }
    if (cl->source_client && s->client_sa.sa.sa_family == b->sa.ss_family) {
        union session_sa src = s->client_sa;
        int rc = listener_set_transparent(fd, src.sa.sa_family);
        if (rc != 0)
            return rc;
        if (src.sa.sa_family == AF_INET)
            src.in.sin_port = 0;
        else
            src.in6.sin6_port = 0;
        return uv_tcp_bind(&s->backend, &src.sa, 0);
    }
    return 0;
}

/* Connecting by reading (SESSION_F_READ_CONNECT) needs a backend that may speak first:
 * none when mxproxy itself must write before the backend says anything. */
static bool session_connect_by_read(const struct session *s)
{
    return s->cl->proxy_protocol == CONFIG_PROXY_PROTOCOL_OFF &&
           s->cl->backend_tls != CONFIG_BACKEND_TLS_IMPLICIT;
}

/* Fails this attempt for a connect error met before any event. */
static void session_connect_error(struct session *s, int rc)
{
    if (session_error_is_local(rc))
        session_local_error(s, rc);
    else
        session_connect_failed(s, rc);
}

/* Creates and connects the backend socket by hand and reads it at once: the backend's
 * greeting then completes the connect, with no POLLOUT registration, SO_ERROR query and
 * re-registration for reading in between (libuv's uv_tcp_connect costs three epoll_ctl
 * and a getsockopt more). A failed connect shows as a read error (RELAY_EV_READ_ERR); a
 * backend that stays silent is found connected by session_probe_connect. uv_tcp_open sets
 * O_NONBLOCK once more (an ioctl); uv_tcp_init_ex's own socket would not need it, but its
 * handle stays unreadable (UV_ENOTCONN) until a uv_tcp_connect completes. */
static void session_connect_reading(struct session *s, const struct config_addr *b)
{
    int fd = socket(b->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) {
        session_local_error(s, -errno); /* the handle is not initialised: nothing to close */
        return;
    }
    uv_tcp_init(&s->w->loop, &s->backend);
    s->open_handles++;
    s->flags |= SESSION_F_BACKEND | SESSION_F_READ_CONNECT;
    s->t_connect = clock_mono_ns();
    int rc = uv_tcp_open(&s->backend, fd);
    if (rc != 0) {
        close(fd); /* the handle did not take it */
        session_local_error(s, rc);
        return;
    }
    uv_tcp_nodelay(&s->backend, 1);
    rc = session_prepare_backend_socket(s, b);
    if (rc == 0 && connect(fd, (const struct sockaddr *)&b->sa, b->salen) != 0 &&
        errno != EINPROGRESS)
        rc = -errno;
    if (rc == 0) {
        relay_init(&s->down, (uv_stream_t *)&s->backend, (uv_stream_t *)&s->client, &s->w->pool,
                   session_on_relay_event, s);
        session_wire_tls(s); /* a 421 to an implicit-TLS client still goes encrypted */
        s->down.flags |= RELAY_F_CONNECTING;
        rc = relay_start(&s->down);
    }
    if (rc != 0) {
        session_connect_error(s, rc);
        return;
    }
    unsigned first =
        s->cl->connect_timeout_ms < SESSION_PROBE_MS ? s->cl->connect_timeout_ms : SESSION_PROBE_MS;
    uv_timer_start(&s->timer, session_on_timer, first, 0);
}

static void session_connect_next(struct session *s)
{
    const struct config_addr *b;
    int rc;

    unsigned next = session_pick_backend(s);
    if (next >= session_n_backends(s))
        abort(); /* callers try only while an untried backend is left */
    s->cur = next;
    s->tried |= UINT64_C(1) << next;
    s->tries++;
    if (!s->cl->backend_original_dst) {
        atomic_fetch_add_explicit(&s->cl->backend_state[next]->active, 1, memory_order_relaxed);
        s->flags |= SESSION_F_ON_BACKEND;
    }
    s->flags &= ~(SESSION_F_TIMED_OUT | SESSION_F_READ_CONNECT);
    session_enter_phase(s, SESSION_PHASE_CONNECTING);
    b = session_backend(s);
    if (session_connect_by_read(s)) {
        session_connect_reading(s, b);
        return;
    }
    rc = uv_tcp_init_ex(&s->w->loop, &s->backend, b->sa.ss_family); /* the socket now */
    if (rc != 0) {
        /* libuv has unlinked the handle again: it must not be closed. */
        session_local_error(s, rc);
        return;
    }
    s->open_handles++;
    s->flags |= SESSION_F_BACKEND;
    s->t_connect = clock_mono_ns();
    uv_tcp_nodelay(&s->backend, 1);
    rc = session_prepare_backend_socket(s, b);
    if (rc == 0)
        rc = uv_tcp_connect(&s->connect_req, &s->backend, (const struct sockaddr *)&b->sa,
                            session_on_connect);
    if (rc != 0) {
        session_connect_error(s, rc);
        return;
    }
    uv_timer_start(&s->timer, session_on_timer, s->cl->connect_timeout_ms, 0);
}

/* ev=open, once; session_close() makes sure it comes before ev=close. */
static void session_log_open(struct session *s)
{
    struct log_line l;

    if ((s->flags & SESSION_F_OPEN_LOGGED) || !log_enabled(LOG_INFO))
        return;
    s->flags |= SESSION_F_OPEN_LOGGED;
    log_begin(&l, LOG_INFO, "open");
    log_sid(&l, s->id);
    log_str(&l, "listener", s->cl->name);
    log_str(&l, "client", session_client_addr(s));
    log_end(&l);
}

void session_close(struct session *s, enum session_end end, const char *error)
{
    struct log_line l;

    if (session_closing(s))
        return;
    session_log_open(s);
    session_enter_phase(s, SESSION_PHASE_CLOSING);
    if (s->proto != NULL)
        end = s->proto->end(s, end);
    relay_kernel_sample(&s->up); /* bytes the kernel relayed */
    metrics_session_closed(&s->w->metrics, s->cl->name, end, s->up.bytes, s->down.bytes);
    if (s->flags & SESSION_F_RELAYS) {
        relay_stop(&s->up);
        relay_stop(&s->down);
    } else if (s->flags & SESSION_F_READ_CONNECT) {
        relay_stop(&s->down); /* reading the connecting backend */
    }
    if (s->flags & SESSION_F_COUNTED)
        atomic_fetch_sub(&s->cl->shared->active, 1);
    if (s->flags & SESSION_F_CLIMIT) {
        s->flags &= ~SESSION_F_CLIMIT;
        climit_release(s->climit, &s->climit_key, uv_now(&s->w->loop));
    }

    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, "close");
        log_sid(&l, s->id);
        log_str(&l, "listener", s->cl->name);
        log_str(&l, "end", session_end_name(end));
        log_uint(&l, "bytes_up", s->up.bytes);
        log_uint(&l, "bytes_down", s->down.bytes);
        log_ms(&l, "ms", clock_mono_ns() - s->t_accept);
        log_str(&l, "client", session_client_addr(s));
        if (s->tries > 0 && end != SESSION_END_CONNECT_FAILED && end != SESSION_END_LIMIT &&
            end != SESSION_END_LOCAL_ERROR)
            log_str(&l, "backend", session_backend(s)->text);
        if (error != NULL)
            log_str(&l, "error", error);
        char text[96];
        if (s->client_tls != NULL && tls_handshake_done(s->client_tls)) {
            log_str(&l, "tls_client", session_tls_text(s->client_tls, text, sizeof(text)));
            if (tls_sni(s->client_tls) != NULL)
                log_str(&l, "sni", tls_sni(s->client_tls));
        }
        if (s->backend_tls != NULL && tls_handshake_done(s->backend_tls))
            log_str(&l, "tls_backend", session_tls_text(s->backend_tls, text, sizeof(text)));
        if (s->proto != NULL)
            s->proto->log_close(s, &l);
        log_end(&l);
    }
    session_view_close(s, end, error);

    uv_close((uv_handle_t *)&s->client, session_on_client_closed);
    uv_close((uv_handle_t *)&s->timer, session_on_timer_closed);
    if ((s->flags & SESSION_F_BACKEND) && !uv_is_closing((uv_handle_t *)&s->backend))
        uv_close((uv_handle_t *)&s->backend, session_on_backend_closed);
}

#define SESSION_FLUSH_GRACE_MS 1000 /* how long a last reply may take to leave */

void session_close_after_flush(struct session *s, enum session_end end, const char *error)
{
    if (session_ending(s))
        return;
    session_enter_phase(s, SESSION_PHASE_FLUSHING);
    s->pending_end = end;
    s->pending_error = error;
    relay_hold(&s->up);
    if (s->flags & (SESSION_F_RELAYS | SESSION_F_READ_CONNECT))
        relay_stop(&s->down);
    uv_timer_start(&s->timer, session_on_timer, SESSION_FLUSH_GRACE_MS, 0);
    /* The FIN follows every queued write; RELAY_EV_DONE then closes. */
    relay_shutdown_dst(&s->down);
}

void session_drop_backend(struct session *s)
{
    if (!(s->flags & SESSION_F_BACKEND) || (s->flags & SESSION_F_NO_BACKEND))
        return;
    s->flags |= SESSION_F_NO_BACKEND;
    relay_stop(&s->down);
    if (!uv_is_closing((uv_handle_t *)&s->backend) &&
        uv_tcp_close_reset(&s->backend, session_on_backend_closed) != 0)
        uv_close((uv_handle_t *)&s->backend, session_on_backend_closed);
}

/* TPROXY keeps the destination as the local address, intercepted or not:
 * the client came straight to mxproxy when that destination is this
 * listener's port on one of this host's own addresses (any of them for a
 * wildcard listener). */
static bool session_tproxy_loop(const struct session *s)
{
    const struct sockaddr *dst = &s->orig_dst.sa;
    const struct sockaddr *lis = (const struct sockaddr *)&s->cl->listen.sa;

    if (sockaddr_equal(dst, lis))
        return true;
    if (dst->sa_family != lis->sa_family || sockaddr_port(dst) != sockaddr_port(lis))
        return false;
    return listener_addr_is_local(dst);
}

/* Learns where a transparently intercepted client meant to go, refusing
 * connections that were not intercepted at all (their destination is this
 * listener: mxproxy would connect to itself), then connects. */
static void session_start_backend(struct session *s)
{
    const struct config_listener *cl = s->cl;
    uv_os_fd_t fd;

    if (cl->transparent != CONFIG_TRANSPARENT_OFF && s->orig_dst.sa.sa_family == AF_UNSPEC) {
        struct sockaddr_storage local, orig;
        socklen_t len = sizeof(local);
        int rc = uv_fileno((uv_handle_t *)&s->client, &fd);
        if (rc == 0)
            rc = listener_original_dst(fd, cl->transparent == CONFIG_TRANSPARENT_TPROXY, &orig);
        if (rc == 0)
            session_sa_set(&s->orig_dst, &orig);
        if (rc == 0 && getsockname(fd, (struct sockaddr *)&local, &len) != 0)
            rc = -errno;
        if (rc != 0) {
            session_close(s, SESSION_END_CONNECT_FAILED, "no original destination");
            return;
        }
        bool loop = cl->transparent == CONFIG_TRANSPARENT_TPROXY
                        ? session_tproxy_loop(s)
                        : sockaddr_equal((const struct sockaddr *)&s->orig_dst,
                                         (const struct sockaddr *)&local);
        if (loop) {
            struct log_line l;
            log_begin(&l, LOG_WARN, "loop");
            log_sid(&l, s->id);
            log_str(&l, "listener", cl->name);
            char text[SOCKADDR_TEXT_MAX];
            log_str(&l, "dst",
                    sockaddr_format((const struct sockaddr *)&s->orig_dst, text, sizeof(text)));
            log_end(&l);
            session_close(s, SESSION_END_LOOP, "original destination is mxproxy itself");
            return;
        }
    }
    if (cl->backend_original_dst) {
        s->dst_backend = calloc(1, sizeof(*s->dst_backend));
        if (s->dst_backend == NULL) {
            session_close(s, SESSION_END_CONNECT_FAILED, "out of memory");
            return;
        }
        s->dst_backend->salen = s->orig_dst.sa.sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                     : sizeof(struct sockaddr_in);
        memcpy(&s->dst_backend->sa, &s->orig_dst, s->dst_backend->salen);
        sockaddr_format(&s->orig_dst.sa, s->dst_backend->text, sizeof(s->dst_backend->text));
    }
    if (session_pick_backend(s) == UINT32_MAX) {
        session_no_backend(s);
        return;
    }
    session_connect_next(s);
}

/* Every backend is down (health checks): the client learns it at once, with
 * no connect tried and so no connect_timeout paid. */
static void session_no_backend(struct session *s)
{
    static const char why[] = "all backends down";

    if (s->proto != NULL) {
        s->proto->say(s, PROTO_SAY_UNAVAILABLE, why);
        session_close_after_flush(s, SESSION_END_NO_BACKEND, why);
        return;
    }
    session_close(s, SESSION_END_NO_BACKEND, why);
}

/* ---- PROXY protocol ----------------------------------------------------------------- */

static void session_pp_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static _Thread_local char scratch[PROXYPROTO_V2_MAX + 512];
    (void)h;
    (void)suggested;
    /* Read little: bytes after the header are kept in s->early. */
    *buf = uv_buf_init(scratch, sizeof(scratch));
}

/* allow/deny or a per-client limit turned the client away before any backend
 * connect: a protocol says why (in place of a greeting), mode tcp closes. */
static void session_refuse_client(struct session *s, enum proto_say what, enum session_end end,
                                  const char *why)
{
    if (s->proto != NULL) {
        s->proto->say(s, what, why);
        session_close_after_flush(s, end, why);
        return;
    }
    session_close(s, end, why);
}

/* transcript_clients, the access lists, then the per-client limits, for the real client
 * (what a PROXY header said, or the peer). Returns true when the session may go on;
 * false when it is ending. */
static bool session_admit_client(struct session *s)
{
    const struct config_listener *cl = s->cl;

    /* Known only now (after a PROXY header): whether this client gets a full transcript. */
    if (cl->n_transcript_clients > 0) {
        if (cidr_list_match(cl->transcript_clients, cl->n_transcript_clients, &s->client_sa.sa))
            s->transcript = CONFIG_TRANSCRIPT_FULL;
    }

    if (cl->n_allow == 0 && cl->n_deny == 0 && cl->max_per_client == 0 && cl->rate_per_client == 0)
        return true;
    const struct sockaddr *sa = &s->client_sa.sa;
    if (cidr_list_match(cl->deny, cl->n_deny, sa) ||
        (cl->n_allow > 0 && !cidr_list_match(cl->allow, cl->n_allow, sa))) {
        session_refuse_client(s, PROTO_SAY_DENIED, SESSION_END_DENIED, NULL);
        return false;
    }
    struct climit_table *t = atomic_load_explicit(&cl->shared->clients, memory_order_acquire);
    if (t == NULL || !climit_key_of(sa, &s->climit_key))
        return true; /* no limit set (the table comes with the first one), or no address */
    switch (climit_acquire(t, &s->climit_key, cl->max_per_client, cl->rate_per_client,
                           uv_now(&s->w->loop))) {
    case CLIMIT_OK:
        s->climit = t;
        s->flags |= SESSION_F_CLIMIT;
        return true;
    case CLIMIT_UNTRACKED:
        return true;
    case CLIMIT_OVER_CONNECTIONS:
        session_refuse_client(s, PROTO_SAY_CLIENT_LIMIT, SESSION_END_CLIENT_LIMIT,
                              "max_connections_per_client");
        return false;
    case CLIMIT_OVER_RATE:
        session_refuse_client(s, PROTO_SAY_CLIENT_LIMIT, SESSION_END_CLIENT_LIMIT,
                              "max_connection_rate_per_client");
        return false;
    }
    abort();
}

static void session_pp_failed(struct session *s, const char *reason)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "proxy_protocol_error");
    log_sid(&l, s->id);
    log_str(&l, "listener", s->cl->name);
    log_str(&l, "peer", session_client_addr(s));
    log_str(&l, "reason", reason);
    log_end(&l);
    session_close(s, SESSION_END_PROXY_PROTOCOL_ERROR, reason);
}

static void session_pp_on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct session *s = container_of(stream, struct session, client);
    struct proxyproto_header hdr;
    size_t used = 0;

    if (nread == 0)
        return;
    if (nread < 0) {
        session_pp_failed(s, nread == UV_EOF ? "closed before the PROXY header"
                                             : uv_strerror((int)nread));
        return;
    }
    enum proxyproto_status st = proxyproto_decode(s->pp_in, buf->base, (size_t)nread, &used, &hdr);
    if (st == PROXYPROTO_NEED_MORE)
        return;
    if (st == PROXYPROTO_ERROR) {
        session_pp_failed(s, proxyproto_strerror(proxyproto_error(s->pp_in)));
        return;
    }
    uv_read_stop(stream);
    uv_timer_stop(&s->timer);
    char via[SOCKADDR_TEXT_MAX];
    snprintf(via, sizeof(via), "%s", session_client_addr(s));
    if (hdr.command == PROXYPROTO_CMD_PROXY && hdr.family != AF_UNSPEC) {
        session_sa_set(&s->client_sa, &hdr.src);
        session_sa_set(&s->orig_dst, &hdr.dst); /* where the client connected */
        s->client_addr[0] = '\0';
    }
    if (log_enabled(LOG_INFO)) {
        struct log_line l;
        log_begin(&l, LOG_INFO, "proxy_protocol");
        log_sid(&l, s->id);
        log_str(&l, "client", session_client_addr(s));
        log_str(&l, "via", via);
        log_uint(&l, "version", hdr.version);
        log_end(&l);
    }
    /* Bytes after the header (a TLS ClientHello, say) wait for the relay. */
    if ((size_t)nread > used) {
        s->early_len = (size_t)nread - used;
        s->early = malloc(s->early_len);
        if (s->early == NULL) {
            session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
            return;
        }
        memcpy(s->early, buf->base + used, s->early_len);
    }
    free(s->pp_in);
    s->pp_in = NULL;
    if (s->cl->transparent == CONFIG_TRANSPARENT_OFF)
        s->orig_dst.sa.sa_family =
            AF_UNSPEC; /* only a transparent listener trusts it as a target */
    if (session_admit_client(s))
        session_start_backend(s);
}

static void session_read_proxy_header(struct session *s)
{
    s->pp_in = calloc(1, sizeof(*s->pp_in));
    if (s->pp_in == NULL) {
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return;
    }
    session_enter_phase(s, SESSION_PHASE_PROXY_HEADER);
    int rc = uv_read_start((uv_stream_t *)&s->client, session_pp_alloc, session_pp_on_read);
    if (rc != 0) {
        session_close(s, SESSION_END_CLIENT_RESET, uv_strerror(rc));
        return;
    }
    uv_timer_start(&s->timer, session_on_timer, s->cl->proxy_protocol_timeout_ms, 0);
}

void session_client_dst(struct session *s, struct sockaddr_storage *out)
{
    socklen_t len = sizeof(*out);
    uv_os_fd_t fd;

    memset(out, 0, sizeof(*out)); /* AF_UNSPEC unless found */
    if (s->orig_dst.sa.sa_family != AF_UNSPEC)
        memcpy(out, &s->orig_dst, sizeof(s->orig_dst));
    else if (uv_fileno((uv_handle_t *)&s->client, &fd) != 0 ||
             getsockname(fd, (struct sockaddr *)out, &len) != 0)
        out->ss_family = AF_UNSPEC;
}

/* Tells the backend who the client is, before anything else it reads. */
static int session_send_proxy_header(struct session *s)
{
    char hdr[PROXYPROTO_V2_MAX];
    struct sockaddr_storage dst;
    int n;

    s->flags |= SESSION_F_PP_SENT;
    session_client_dst(s, &dst);
    if (s->cl->proxy_protocol == CONFIG_PROXY_PROTOCOL_V1) {
        n = proxyproto_encode_v1(hdr, sizeof(hdr), (const struct sockaddr *)&s->client_sa,
                                 (const struct sockaddr *)&dst);
    } else {
        struct proxyproto_tls_info tls = {0};
        struct proxyproto_v2_opts opts = {0};
        if (s->client_tls != NULL && tls_handshake_done(s->client_tls)) {
            tls.version = tls_version(s->client_tls);
            tls.cipher = tls_cipher(s->client_tls);
            tls.verify = 1; /* no client certificate was asked for */
            opts.tls = &tls;
            opts.authority = tls_sni(s->client_tls);
        }
        n = proxyproto_encode_v2(hdr, sizeof(hdr), (const struct sockaddr *)&s->client_sa,
                                 (const struct sockaddr *)&dst, &opts);
    }
    if (n < 0)
        return UV_EINVAL;
    /* Raw, ahead of any TLS with the backend: the header is for its TCP side. */
    struct tls_conn *tls = s->up.dst_tls;
    s->up.dst_tls = NULL;
    int rc = relay_send_copy(&s->up, hdr, (size_t)n);
    s->up.dst_tls = tls;
    return rc;
}

/* max_connections reached: a protocol tells the client why (a server-first
 * client would otherwise wait for a greeting, or retry at once), mode tcp
 * just closes. No backend is connected, and the session stops counting
 * against the limit now: refused clients never crowd out accepted ones. */
static void session_refuse_over_limit(struct session *s)
{
    atomic_fetch_sub(&s->cl->shared->active, 1);
    s->flags &= ~SESSION_F_COUNTED;
    s->proto = proto_for_mode(s->cl->mode);
    if (s->proto != NULL && s->proto->open(s) != 0)
        s->proto = NULL;
    if (s->proto != NULL) {
        s->proto->say(s, PROTO_SAY_LIMIT, NULL);
        session_close_after_flush(s, SESSION_END_LIMIT, NULL);
        return;
    }
    session_close(s, SESSION_END_LIMIT, NULL);
}

void session_accept(struct listener *l, int fd, const struct sockaddr_storage *peer)
{
    struct worker *w = l->w;
    struct session *s = calloc(1, sizeof(*s));

    if (s == NULL) {
        close(fd);
        listener_accept_failed(l, UV_ENOMEM);
        return;
    }
    s->w = w;
    s->cfg = config_ref(w->cfg);
    s->cl = l->cl;
    s->transcript = l->cl->transcript;
    s->id = session_next_id();
    s->t_accept = clock_mono_ns();
    session_sa_set(&s->client_sa, peer);
    s->rr_start = s->cl->n_backends > 0 ? (unsigned)(l->rr++ % s->cl->n_backends) : 0;
    uv_tcp_init(&w->loop, &s->client);
    uv_timer_init(&w->loop, &s->timer);
    s->open_handles = 2;
    /* Ready before connecting, so a protocol can answer a client whose
     * backends are all down; reset once the backend connects. */
    relay_init(&s->up, (uv_stream_t *)&s->client, (uv_stream_t *)&s->backend, &w->pool,
               session_on_relay_event, s);
    relay_init(&s->down, (uv_stream_t *)&s->backend, (uv_stream_t *)&s->client, &w->pool,
               session_on_relay_event, s);
    s->next = w->sessions;
    if (w->sessions != NULL)
        w->sessions->prev = s;
    w->sessions = s;
    atomic_fetch_add(&w->n_sessions, 1);
    metrics_session_opened(&w->metrics, s->cl->name);

    int rc = uv_tcp_open(&s->client, fd);
    if (rc != 0) {
        close(fd); /* the handle did not take it */
        session_close(s, SESSION_END_CLIENT_RESET, uv_strerror(rc));
        return;
    }
    s->flags |= SESSION_F_COUNTED;
    session_view_open(s);
    unsigned active = atomic_fetch_add(&s->cl->shared->active, 1) + 1;
    if (s->cl->max_connections > 0 && active > s->cl->max_connections) {
        session_refuse_over_limit(s);
        return;
    }
    s->proto = proto_for_mode(s->cl->mode);
    if (s->proto != NULL && s->proto->open(s) != 0) {
        s->proto = NULL;
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return;
    }
    if (s->cl->client_tls == CONFIG_CLIENT_TLS_IMPLICIT) {
        if (tls_conn_new(&s->client_tls, s->cl->tls_server, NULL) != 0) {
            session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
            return;
        }
        session_wire_tls(s);
    }
    /* TCP_NODELAY: inherited from the listening socket (listener_socket()). */
    if (s->cl->accept_proxy_protocol)
        session_read_proxy_header(s); /* the backend is chosen once we know the client */
    else if (session_admit_client(s))
        session_start_backend(s);
    /* Logged once the backend connect is under way: the line costs time
     * the greeting should not wait for. */
    session_log_open(s);
}

/* A protocol session whose backend owes a reply waits for it. */
static void session_drain_deadline(struct session *s)
{
    if (session_ending(s))
        return; /* ending already, within SESSION_FLUSH_GRACE_MS */
    if (s->proto != NULL && s->phase == SESSION_PHASE_RELAYING && s->proto->drain_wait(s))
        return;
    session_end_now(s, SESSION_END_DRAIN);
}

void session_close_all(struct worker *w)
{
    struct session *s = w->sessions;
    while (s != NULL) {
        struct session *next = s->next; /* s stays linked until its close callbacks run */
        session_drain_deadline(s);
        s = next;
    }
}

void session_cut_all(struct worker *w)
{
    struct session *s = w->sessions;
    while (s != NULL) {
        struct session *next = s->next;
        if (session_ending(s)) {
            s = next;
            continue;
        }
        if (s->proto != NULL && s->phase == SESSION_PHASE_RELAYING) {
            s->proto->drain_cut(s);
            session_close_after_flush(s, SESSION_END_DRAIN, NULL);
        } else {
            session_close(s, SESSION_END_DRAIN, NULL);
        }
        s = next;
    }
}

/* ---- the admin endpoint's record (sessview.h) ---------------------------------------- */

/* What the record shows of s now. */
static void session_view_state(const struct session *s, struct sessview_state *st)
{
    memset(st, 0, sizeof(*st));
    st->phase = session_phase_names[s->phase];
    snprintf(st->client, sizeof(st->client), "%s", s->client_addr);
    if (s->client_sa.sa.sa_family == AF_INET)
        st->client_sa.in = s->client_sa.in;
    else if (s->client_sa.sa.sa_family == AF_INET6)
        st->client_sa.in6 = s->client_sa.in6;
    st->bytes_up = s->up.bytes;
    st->bytes_down = s->down.bytes;
    if (s->tries > 0 && (!s->cl->backend_original_dst || s->dst_backend != NULL))
        snprintf(st->backend, sizeof(st->backend), "%s", session_backend(s)->text);
    if (s->client_tls != NULL && tls_handshake_done(s->client_tls))
        session_tls_text(s->client_tls, st->tls_client, sizeof(st->tls_client));
    if (s->backend_tls != NULL && tls_handshake_done(s->backend_tls))
        session_tls_text(s->backend_tls, st->tls_backend, sizeof(st->tls_backend));
    if (s->proto != NULL) {
        struct log_line l;
        log_fields_begin(&l);
        s->proto->log_close(s, &l); /* the close line's own fields, JSON-escaped */
        if (!l.truncated && l.len < sizeof(st->fields))
            memcpy(st->fields, l.buf, l.len);
        else
            snprintf(st->fields, sizeof(st->fields), ",\"fields_truncated\":true");
    }
}

/* A record only while the admin endpoint is configured: without it nothing reads them. */
static void session_view_open(struct session *s)
{
    if (!config_addr_given(&s->cfg->admin))
        return;
    s->view = sessview_open(&s->w->view, s->id, s->cl->name, config_mode_name(s->cl->mode));
    session_client_addr(s); /* the record shows client= from the start */
    session_view_update(s);
}

void session_view_update(const struct session *s)
{
    struct sessview_state st;

    if (s->view == NULL)
        return;
    session_view_state(s, &st);
    sessview_update(&s->w->view, s->view, &st);
}

void session_view_pair(const struct session *s, const struct sessview_pair *p)
{
    if (s->view == NULL)
        return;
    sessview_pair(&s->w->view, s->view, p);
    session_view_update(s);
}

static void session_view_close(struct session *s, enum session_end end, const char *error)
{
    struct sessview_state st;
    unsigned workers = s->w->cfg->workers > 0 ? s->w->cfg->workers : 1;

    if (s->view == NULL)
        return;
    session_view_state(s, &st);
    st.phase = "closed";
    /* Each worker keeps its share of recent_sessions, rounded up. */
    sessview_close(&s->w->view, s->view, &st, session_end_name(end), error,
                   (s->w->cfg->recent_sessions + workers - 1) / workers);
    s->view = NULL;
}
