/* proto_imap.c: mode imap, between the relays and the pure IMAP parsers (imap.h,
 * imap_pairs.h), on the shared line-dialog machinery (dialog.h). */
#include "proto.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "clock.h"
#include "config.h"
#include "dialog.h"
#include "imap.h"
#include "imap_pairs.h"
#include "log.h"
#include "metrics.h"
#include "proxyproto.h"
#include "relay.h"
#include "session_impl.h"
#include "worker.h"

/* mxproxy's own exchange with the backend (backend_tls = starttls, imap_id = on), right
 * after the backend's greeting went to the client; the client's commands wait for its end:
 *
 *   IDLE -> [STARTTLS -> HANDSHAKE] -> [ID] -> DONE
 *
 * Every response in STARTTLS and ID is mxproxy's own: read, never forwarded, never paired.
 * A STARTTLS the backend refuses ends the session (never a plaintext downgrade); an ID it
 * refuses is logged and the session goes on. */
enum session_imap_hs {
    SESSION_IMAP_HS_IDLE = 0,  /* no greeting yet, or no exchange wanted */
    SESSION_IMAP_HS_STARTTLS,  /* "mxp1 STARTTLS" is out */
    SESSION_IMAP_HS_HANDSHAKE, /* the TLS handshake with the backend runs */
    SESSION_IMAP_HS_ID,        /* "mxp2 ID (...)" is out */
    SESSION_IMAP_HS_DONE,      /* every response is the client's */
};

struct session_imap {
    struct dialog d;         /* first: the shared dialog machinery (dialog.h) */
    struct imap_client cp;   /* client command parser */
    struct imap_server sp;   /* backend response parser */
    struct imap_pairs pp;    /* outstanding tags, summary */
    const char *primary;     /* a primary error mxproxy made up (static text), or NULL */
    char *dcarry;            /* backend bytes of a response line not yet whole */
    enum session_imap_hs hs; /* mxproxy's own exchange with the backend */
    bool refusing;           /* require_tls: the command under way is refused, nothing of it
                                goes out; answered at its end or at its first "+" wait */
};

/* m->d.flags: the dialog's DIALOG_F_* and these:
 *   GREETED  the backend's greeting went to the client */
#define SESSION_IMAP_F_GREETED DIALOG_F_PROTO(0)

#define SESSION_IMAP_TAG_STARTTLS "mxp1"
#define SESSION_IMAP_TAG_ID "mxp2"
#define SESSION_IMAP_CAPA_MAX (IMAP_SERVER_HOLD + 64) /* a rewritten capability line */

#define IMAP_M(s) ((struct session_imap *)(s)->proto_state)

#define SESSION_IMAP_BYE "* BYE [UNAVAILABLE] mxproxy: no mail server available"

/* transcript=full: a "+" continuation with text may be an AUTHENTICATE challenge. */
static const char *session_imap_redact(const char *line, size_t len)
{
    return len > 2 && line[0] == '+' && line[1] == ' ' ? "+ [redacted]" : NULL;
}

static const struct dialect session_imap_dialect = {
    .name = "imap",
    .match = DIALECT_MATCH_TAG,
    .verbs = imap_verbs,
    .nverbs = IMAP_CMD_COUNT_,
    .replies =
        {
            .unavailable = SESSION_IMAP_BYE,
            .local_error = "* BYE [UNAVAILABLE] mxproxy: local resources exhausted",
            .limit = "* BYE [UNAVAILABLE] mxproxy: too many connections",
            .client_limit = "* BYE [UNAVAILABLE] mxproxy: too many connections from your address",
            /* RFC 3501 7.1.5: a server refusing a client greets it with BYE. */
            .denied = "* BYE mxproxy: access denied",
            .idle = SESSION_IMAP_BYE,
            .drain = SESSION_IMAP_BYE,
            .backend_gone = SESSION_IMAP_BYE,
            .backend_tls = "* BYE [UNAVAILABLE] mxproxy: TLS with the mail server failed",
        },
    .redact_server_line = session_imap_redact,
};

#define IMAP_SAY(what) (session_imap_dialect.replies.what)

static uint64_t session_imap_now(void)
{
    return clock_mono_ns();
}

static void session_imap_client_init(struct session *s)
{
    struct imap_client_opts o = {.max_line_length = s->cl->max_line_length};

    imap_client_init(&IMAP_M(s)->cp, &o);
    IMAP_M(s)->refusing = false;
}

/* ---- FIFO storage --------------------------------------------------------------------- */

static bool session_imap_fifo_attach(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (m->d.fifo != NULL)
        return true;
    struct imap_pairs_entry *q =
        dialog_fifo_lend(s, sizeof(struct imap_pairs_entry) * IMAP_PAIRS_CAP);
    if (q == NULL)
        return false;
    imap_pairs_attach(&m->pp, q);
    return true;
}

/* Gives the slots back while no command is outstanding. */
static void session_imap_fifo_detach(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (m->d.fifo == NULL || imap_pairs_detach(&m->pp) == NULL)
        return;
    dialog_fifo_return(s);
}

/* ---- logging ---------------------------------------------------------------------------- */

static void session_imap_count_pair(const struct session *s, const struct imap_pair *p)
{
    struct metrics *mt = &s->w->metrics;

    switch (p->kind) {
    case IMAP_PAIR_GREETING:
        metrics_greeting(mt, p->t_reply - s->t_accept);
        metrics_imap_response(mt, IMAP_CMD_NONE, p->status, METRICS_NO_LATENCY);
        return;
    case IMAP_PAIR_COMMAND:
        metrics_imap_response(mt, p->cmd, p->status,
                              p->t_reply >= p->t_cmd ? p->t_reply - p->t_cmd : METRICS_NO_LATENCY);
        return;
    case IMAP_PAIR_LOCAL:
        metrics_imap_response(mt, p->cmd, p->status, METRICS_NO_LATENCY);
        return;
    case IMAP_PAIR_UNSOLICITED:
    case IMAP_PAIR_ABORTED:
        return;
    }
}

/* ev=pair proto=imap tag= cmd= status= reply= untagged= ms= pipelined= [size=] [rounds=]
 * [local=1] [aborted=1] [primary=1]. */
/* The pair for the admin endpoint's record, with the texts of the log line. */
static void session_imap_note_pair(const struct session *s, const struct imap_pair *p)
{
    struct dialog_pair_note n = {.cmd = p->cmd_text, .cmd_len = p->cmd_text_len, .code = ""};

    if (s->view == NULL)
        return;
    if (p->kind == IMAP_PAIR_GREETING || p->kind == IMAP_PAIR_UNSOLICITED) {
        n.cmd = p->kind == IMAP_PAIR_GREETING ? "<greeting>" : "<none>";
        n.cmd_len = strlen(n.cmd);
    }
    n.reply = "";
    if (p->status != IMAP_ST_NONE) {
        n.code = imap_status_name(p->status);
        n.reply = p->text;
        n.reply_len = p->text_len;
    }
    if (p->kind == IMAP_PAIR_GREETING) {
        n.ms_ns = p->t_reply - s->t_accept;
        n.flags |= SESSVIEW_P_MS;
    } else if (p->kind != IMAP_PAIR_UNSOLICITED && p->status != IMAP_ST_NONE &&
               p->t_reply >= p->t_cmd) {
        n.ms_ns = p->t_reply - p->t_cmd;
        n.flags |= SESSVIEW_P_MS;
    }
    n.flags |= (p->flags & IMAP_PAIR_F_PIPELINED) ? SESSVIEW_P_PIPELINED : 0;
    n.flags |= (p->flags & IMAP_PAIR_F_PRIMARY) ? SESSVIEW_P_PRIMARY : 0;
    n.flags |= p->kind == IMAP_PAIR_LOCAL ? SESSVIEW_P_LOCAL : 0;
    n.flags |= p->kind == IMAP_PAIR_ABORTED ? SESSVIEW_P_ABORTED : 0;
    dialog_note_pair(s, &n);
}

static void session_imap_log_pair(const struct session *s, const struct imap_pair *p)
{
    struct log_line l;

    session_imap_count_pair(s, p);
    session_imap_note_pair(s, p);
    if (!dialog_logs_pairs(s))
        return;
    log_begin(&l, LOG_INFO, "pair");
    log_sid(&l, s->id);
    log_str(&l, "proto", "imap");
    log_strn(&l, "tag", p->tag_len > 0 ? p->tag : "*", p->tag_len > 0 ? p->tag_len : 1);
    if (p->kind == IMAP_PAIR_GREETING)
        log_str(&l, "cmd", "<greeting>");
    else if (p->kind == IMAP_PAIR_UNSOLICITED)
        log_str(&l, "cmd", "<none>");
    else
        log_strn(&l, "cmd", p->cmd_text, p->cmd_text_len);
    if (p->status != IMAP_ST_NONE) {
        log_str(&l, "status", imap_status_name(p->status));
        log_strn(&l, "reply", p->text, p->text_len);
    }
    if (p->kind == IMAP_PAIR_COMMAND || p->kind == IMAP_PAIR_ABORTED)
        log_uint(&l, "untagged", p->untagged);
    if (p->kind == IMAP_PAIR_GREETING)
        log_ms(&l, "ms", p->t_reply - s->t_accept); /* what the client waited for */
    else if (p->kind != IMAP_PAIR_UNSOLICITED && p->status != IMAP_ST_NONE &&
             p->t_reply >= p->t_cmd)
        log_ms(&l, "ms", p->t_reply - p->t_cmd); /* IDLE: the idle time */
    if (p->kind != IMAP_PAIR_GREETING && p->kind != IMAP_PAIR_UNSOLICITED)
        log_uint(&l, "pipelined", (p->flags & IMAP_PAIR_F_PIPELINED) != 0);
    if (p->cmd == IMAP_CMD_APPEND)
        log_uint(&l, "size", p->size);
    if (p->cmd == IMAP_CMD_AUTHENTICATE)
        log_uint(&l, "rounds", p->rounds);
    if (p->kind == IMAP_PAIR_LOCAL)
        log_uint(&l, "local", 1);
    if (p->kind == IMAP_PAIR_ABORTED)
        log_uint(&l, "aborted", 1);
    if (p->flags & IMAP_PAIR_F_PRIMARY)
        log_uint(&l, "primary", 1);
    log_end(&l);
}

/* ---- client side ---------------------------------------------------------------------- */

static void session_imap_answer_locals(struct session *s);
static void session_imap_drain_answered(struct session *s);

static bool session_imap_tls_active(const struct session *s)
{
    return s->client_tls != NULL;
}

/* Does this listener make mxproxy talk to the backend before the client? */
static bool session_imap_hs_wanted(const struct session *s)
{
    return s->cl->imap_id || s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS;
}

/* True until mxproxy's own exchange with the backend is over: the client's commands wait. */
static bool session_imap_hs_busy(const struct session *s)
{
    return session_imap_hs_wanted(s) && IMAP_M(s)->hs != SESSION_IMAP_HS_DONE;
}

static bool session_imap_hs_own(const struct session *s);

/* True while the client is inside a response the backend began (literal data, or the start of
 * a long line, went out; its end has not): a line of mxproxy's own now would be read as more
 * of it, so mxproxy says nothing until the response ends, or nothing at all. */
static bool session_imap_mid_response(const struct session *s)
{
    return imap_server_mid_response(&IMAP_M(s)->sp) && !session_imap_hs_own(s);
}

/* Says a BYE (one line, no CRLF) to the client, unless it would land inside a response; the
 * client then sees the connection end. Returns true when said. */
static bool session_imap_bye(struct session *s, const char *line)
{
    if (session_imap_mid_response(s))
        return false;
    dialog_say(s, line);
    return true;
}

/* A command cut short after parts of it reached the backend: the backend waits for the
 * rest, which will never come. The session ends. */
static void session_imap_cut_short(struct session *s, const char *why)
{
    struct session_imap *m = IMAP_M(s);
    struct imap_pair p;

    dialog_stop(s);
    session_drop_backend(s);
    bool said = session_imap_bye(s, "* BYE mxproxy: command line refused");
    while (imap_pairs_abort(&m->pp, &p))
        session_imap_log_pair(s, &p);
    if (said && !imap_pairs_summary(&m->pp)->has_primary && m->primary == NULL)
        m->primary = "BYE mxproxy: command line refused";
    dialog_close_after_flush(s, SESSION_END_CLIENT_RESET, why);
}

/* What a client event means beyond forwarding: transcript, warnings. */
static void session_imap_client_event(struct session *s, const struct imap_event *ev)
{
    struct session_imap *m = IMAP_M(s);
    struct log_line l;
    char text[IMAP_TAG_MAX + IMAP_TEXT_MAX + 32];
    int n;

    switch (ev->type) {
    case IMAP_EV_COMMAND:
        if (dialog_logs_lines(s)) {
            n = snprintf(text, sizeof(text), "%.*s %.*s", (int)ev->tag_len, ev->tag,
                         (int)ev->text_len, ev->text);
            dialog_log_line(s, "client", text, (size_t)n, false);
        }
        return;
    case IMAP_EV_LITERAL:
        if (dialog_logs_lines(s)) {
            n = snprintf(text, sizeof(text), "<literal: %llu bytes>", (unsigned long long)ev->size);
            dialog_log_line(s, "client", text, (size_t)n, false);
        }
        return;
    case IMAP_EV_AUTH_RESPONSE:
        if (dialog_logs_lines(s))
            dialog_log_line(s, "client", "[redacted]", 10, false);
        return;
    case IMAP_EV_DONE:
        if (dialog_logs_lines(s))
            dialog_log_line(s, "client", "DONE", 4, false);
        return;
    case IMAP_EV_TOO_LONG:
    case IMAP_EV_INVALID:
        if (log_enabled(LOG_WARN)) {
            log_begin(&l, LOG_WARN, ev->type == IMAP_EV_TOO_LONG ? "line_too_long" : "bad_line");
            log_sid(&l, s->id);
            if (ev->reason != NULL)
                log_str(&l, "reason", ev->reason);
            log_uint(&l, "limit", s->cl->max_line_length);
            log_end(&l);
        }
        if (ev->flags & IMAP_EV_F_MIDCMD)
            session_imap_cut_short(s, ev->type == IMAP_EV_TOO_LONG ? "line too long"
                                                                   : "bad command line");
        return;
    case IMAP_EV_INJECTED:
        m->d.injected += ev->size;
        return;
    default:
        return;
    }
}

/* require_tls before STARTTLS: a command that is not allowed yet never reaches the backend,
 * not even in part; it is answered "NO [PRIVACYREQUIRED]" once the client waits for an answer
 * (its end, or a synchronizing literal's "+", which it then never gets). A non-synchronizing
 * literal's data is dropped with the rest. Returns true when the event is refused. */
static bool session_imap_refuse_plaintext(struct session *s, const struct imap_event *ev)
{
    struct session_imap *m = IMAP_M(s);
    const struct config_listener *cl = s->cl;

    if (!m->refusing) {
        if (cl->client_tls != CONFIG_CLIENT_TLS_STARTTLS || (ev->flags & IMAP_EV_F_NO_TAG) ||
            (ev->type != IMAP_EV_BEGIN && ev->type != IMAP_EV_COMMAND) ||
            !dialog_needs_tls(s, ev->cmd))
            return false;
        m->refusing = true;
    }
    switch (ev->type) {
    case IMAP_EV_COMMAND:
        break;
    case IMAP_EV_BEGIN:
    case IMAP_EV_PART:
        if (ev->flags & IMAP_EV_F_SYNC)
            break;
        return true;
    case IMAP_EV_LITERAL:
        return true;
    default:
        /* Cut short (TOO_LONG, INVALID): handled as any such line; nothing of it went out. */
        m->refusing = false;
        return false;
    }
    m->refusing = false;
    (void)imap_pairs_answer_locally(&m->pp, IMAP_LOCAL_NEED_TLS);
    return true;
}

/* Decides whether a client event goes to the backend: mxproxy answers STARTTLS itself
 * when it terminates TLS (or TLS is on already), and refuses what require_tls forbids before
 * it. The event is recorded in the pairs. */
static bool session_imap_intercept(struct session *s, const struct imap_event *ev)
{
    struct session_imap *m = IMAP_M(s);
    const struct config_listener *cl = s->cl;

    if (session_imap_refuse_plaintext(s, ev))
        return false;
    if (ev->type != IMAP_EV_COMMAND || ev->cmd != IMAP_CMD_STARTTLS ||
        (ev->flags & IMAP_EV_F_NO_TAG))
        return true;
    if (cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS || session_imap_tls_active(s)) {
        (void)imap_pairs_answer_locally(&m->pp, session_imap_tls_active(s) ? IMAP_LOCAL_TLS_ACTIVE
                                                                           : IMAP_LOCAL_STARTTLS);
        return false;
    }
    return true; /* passthrough: the backend's OK turns the session opaque */
}

/* Parses client bytes b[off, end): forwards what the parser says to forward, keeps the
 * rest. The caller keeps its own reference to b. */
static void session_imap_client_bytes(struct session *s, struct relay_block *b, size_t off,
                                      size_t end)
{
    struct session_imap *m = IMAP_M(s);
    struct dialog_out out = {.n = 0};
    uint64_t now = session_imap_now();
    int rc = 0;

    m->d.flags &= ~DIALOG_F_SWITCHED;
    while (rc == 0 && !session_ending(s) && !(m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))) {
        struct imap_event ev;
        size_t n;

        if (session_imap_hs_busy(s)) {
            /* mxproxy's own exchange with the backend first: everything waits. */
            if (off < end)
                dialog_hold(s, b, off, end);
            break;
        }
        if (!session_imap_fifo_attach(s)) {
            rc = UV_ENOMEM;
            break;
        }
        if (imap_pairs_room(&m->pp) == 0) {
            dialog_hold(s, b, off, end); /* too many commands in flight */
            break;
        }
        n = imap_client_parse(&m->cp, b->data + off, end - off, &ev);
        if (ev.type == IMAP_EV_AGAIN) {
            rc = dialog_carry(s, b->data + off, end - off);
            break;
        }
        if (ev.type == IMAP_EV_WAIT) {
            if (off < end)
                dialog_hold(s, b, off, end);
            break;
        }
        (void)imap_pairs_on_client_event(&m->pp, &ev, now); /* room was checked */
        bool forward = session_imap_intercept(s, &ev);
        if (forward && ev.fwd_len > 0)
            rc = dialog_out_add(s, b, &out, ev.fwd, ev.fwd_len);
        off += n;
        if (rc == 0 && (ev.flags & IMAP_EV_F_MIDCMD))
            rc = dialog_out_flush(s, b, &out); /* what went before, then the end */
        session_imap_client_event(s, &ev);
        session_imap_answer_locals(s);
        if (m->d.flags & DIALOG_F_SWITCHED) {
            /* Plaintext after STARTTLS in this read is never parsed inside TLS. */
            m->d.flags &= ~DIALOG_F_SWITCHED;
            m->d.injected += end - off;
            dialog_log_injection(s);
            break;
        }
    }
    if (rc == 0 && !session_closing(s))
        rc = dialog_out_flush(s, b, &out);
    if (rc == UV_ENOMEM)
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
}

static void session_imap_on_client_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_imap *m = IMAP_M(s);

    if (m->d.flags & DIALOG_F_OPAQUE) {
        uv_buf_t buf = uv_buf_init(b->data, (unsigned)len);
        (void)relay_send(d, b, &buf, 1); /* a failure closes through on_event */
    } else {
        session_imap_client_bytes(s, b, 0, len);
    }
    dialog_carry_done(s);
    relay_block_unref(d->pool, b);
}

/* A response (or the end of mxproxy's exchange) may let held client bytes be parsed again. */
static void session_imap_resume_client(struct session *s)
{
    struct session_imap *m = IMAP_M(s);
    size_t off, end;
    struct relay_block *b;

    if (m->d.held == NULL || session_imap_hs_busy(s) || (m->d.flags & DIALOG_F_DRAIN))
        return;
    b = dialog_take_held(s, &off, &end);
    if (m->d.flags & DIALOG_F_OPAQUE) {
        /* COMPRESS accepted: what the client sent after it is deflate data. */
        uv_buf_t buf = uv_buf_init(b->data + off, (unsigned)(end - off));
        if (end > off)
            (void)relay_send(&s->up, b, &buf, 1);
    } else {
        session_imap_client_bytes(s, b, off, end);
    }
    relay_block_unref(s->up.pool, b);
    if (m->d.held == NULL && !session_ending(s))
        dialog_release(s);
}

/* The client got "OK Begin TLS negotiation now": it speaks TLS from now on. */
static void session_imap_start_client_tls(struct session *s)
{
    if (!dialog_start_client_tls(s))
        return;
    session_imap_client_init(s); /* RFC 9051: forget what the client said in plaintext */
    dialog_log_injection(s);
}

/* Answers, in order, the commands mxproxy answers itself, then lets held bytes go on. */
static void session_imap_answer_locals(struct session *s)
{
    struct session_imap *m = IMAP_M(s);
    struct imap_pair p;
    char text[IMAP_TAG_MAX + IMAP_TEXT_MAX + 16];
    bool answered = false;

    /* Inside a response the answers wait for its end (session_imap_on_response). */
    while (!session_closing(s) && !session_imap_mid_response(s) &&
           imap_pairs_take_local(&m->pp, session_imap_now(), &p)) {
        snprintf(text, sizeof(text), "%s %s %.*s", p.tag_len > 0 ? p.tag : "*",
                 imap_status_name(p.status), (int)p.text_len, p.text);
        dialog_say(s, text);
        session_imap_log_pair(s, &p);
        /* The answer is decided: a STARTTLS barrier or a wait for it ends. */
        imap_client_on_tagged(&m->cp, p.tag, p.tag_len);
        answered = true;
        if (p.local == IMAP_LOCAL_STARTTLS) {
            session_imap_start_client_tls(s);
            return;
        }
        if (p.local == IMAP_LOCAL_TLS_ACTIVE)
            dialog_log_injection(s); /* no TLS: what followed STARTTLS stays dropped */
    }
    if (answered)
        session_imap_resume_client(s);
}

/* ---- backend side --------------------------------------------------------------------- */

/* The backend's capability list, as the client must see it: STARTTLS offered before TLS
 * when mxproxy terminates it (with LOGINDISABLED when it requires TLS: RFC 9051 6.2.3),
 * STARTTLS and LOGINDISABLED gone inside TLS; with backend
 * STARTTLS, what the backend said before TLS offers neither. 0: nothing to change. */
static unsigned session_imap_capa_edit(const struct session *s)
{
    const struct config_listener *cl = s->cl;
    unsigned edit = 0;

    if (session_imap_tls_active(s))
        edit |= IMAP_CAPA_DEL_STARTTLS | IMAP_CAPA_DEL_LOGINDISABLED;
    else if (cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS)
        edit |= IMAP_CAPA_ADD_STARTTLS | (cl->require_tls ? IMAP_CAPA_ADD_LOGINDISABLED : 0);
    if (cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS) {
        if (cl->client_tls != CONFIG_CLIENT_TLS_STARTTLS || session_imap_tls_active(s))
            edit |= IMAP_CAPA_DEL_STARTTLS;
        edit |= IMAP_CAPA_DEL_LOGINDISABLED;
    }
    if (edit & IMAP_CAPA_ADD_STARTTLS)
        edit &= ~IMAP_CAPA_DEL_STARTTLS;
    return edit;
}

/* The backend is gone or unusable: with commands outstanding (or always, with always) the
 * client gets reply (one line, no CRLF) instead of a bare close; every outstanding tag is
 * logged aborted=1, and the session closes. A backend that closes with nothing owed (after
 * LOGOUT, or after its own BYE) has said what it had to say. */
static void session_imap_abort(struct session *s, const char *reply, bool always,
                               enum session_end end, const char *error)
{
    struct session_imap *m = IMAP_M(s);
    struct imap_pair p;

    dialog_stop(s);
    if ((always || imap_pairs_outstanding(&m->pp) > 0) && session_imap_bye(s, reply)) {
        if (!imap_pairs_summary(&m->pp)->has_primary && m->primary == NULL)
            m->primary = reply + 2; /* without "* " */
    }
    while (imap_pairs_abort(&m->pp, &p))
        session_imap_log_pair(s, &p);
    dialog_close_after_flush(s, end, error);
}

static void session_imap_backend_tls_failed(struct session *s, const char *reason)
{
    session_drop_backend(s);
    /* Never a plaintext downgrade. */
    session_imap_abort(s, IMAP_SAY(backend_tls), true, SESSION_END_TLS_ERROR, reason);
}

static void session_imap_backend_starttls_failed(struct session *s, const char *reason)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "tls_error");
    log_sid(&l, s->id);
    log_str(&l, "side", "backend");
    log_str(&l, "reason", reason);
    log_end(&l);
    session_imap_backend_tls_failed(s, reason);
}

static const char *session_imap_hs_name(enum session_imap_hs hs)
{
    static const char *const names[] = {
        [SESSION_IMAP_HS_IDLE] = "idle",           [SESSION_IMAP_HS_STARTTLS] = "starttls",
        [SESSION_IMAP_HS_HANDSHAKE] = "handshake", [SESSION_IMAP_HS_ID] = "id",
        [SESSION_IMAP_HS_DONE] = "done",
    };
    return names[hs];
}

/* Sends the ID command with the client's address and where it connected to. */
static void session_imap_send_id(struct session *s)
{
    struct sockaddr_storage dst;
    char cip[PROXYPROTO_ADDR_TEXT_MAX] = "", lip[PROXYPROTO_ADDR_TEXT_MAX] = "";
    unsigned cport = 0, lport = 0;
    bool v6;
    char line[512];

    session_client_dst(s, &dst);
    (void)proxyproto_addr_text(&s->client_sa.sa, cip, &v6, &cport);
    if (dst.ss_family != AF_UNSPEC)
        (void)proxyproto_addr_text((const struct sockaddr *)&dst, lip, &v6, &lport);
    ssize_t n = imap_id_line(SESSION_IMAP_TAG_ID, cip, cport, lip, lport, line, sizeof(line));
    if (n > 0)
        dialog_send_backend(s, line, (size_t)n);
}

/* Enters state next and does what it names. */
static void session_imap_hs_enter(struct session *s, enum session_imap_hs next)
{
    struct session_imap *m = IMAP_M(s);
    struct log_line l;
    const char *why = NULL;

    if (log_enabled(LOG_DEBUG)) {
        log_begin(&l, LOG_DEBUG, "backend_handshake");
        log_sid(&l, s->id);
        log_str(&l, "from", session_imap_hs_name(m->hs));
        log_str(&l, "to", session_imap_hs_name(next));
        log_end(&l);
    }
    m->hs = next;
    switch (next) {
    case SESSION_IMAP_HS_STARTTLS:
        dialog_send_backend(s, SESSION_IMAP_TAG_STARTTLS " STARTTLS\r\n",
                            sizeof(SESSION_IMAP_TAG_STARTTLS " STARTTLS\r\n") - 1);
        return;
    case SESSION_IMAP_HS_HANDSHAKE:
        if (!dialog_start_backend_tls(s, &why) && why != NULL)
            session_imap_backend_starttls_failed(s, why);
        return; /* session_imap_backend_tls_ready moves on */
    case SESSION_IMAP_HS_ID:
        session_imap_send_id(s);
        return;
    case SESSION_IMAP_HS_DONE:
        session_imap_resume_client(s);
        return;
    case SESSION_IMAP_HS_IDLE:
        break;
    }
    abort();
}

/* The state after hs, once hs got what it waited for. */
static enum session_imap_hs session_imap_hs_next(const struct session *s, enum session_imap_hs hs)
{
    switch (hs) {
    case SESSION_IMAP_HS_IDLE:
        if (s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS)
            return SESSION_IMAP_HS_STARTTLS;
        /* fallthrough */
    case SESSION_IMAP_HS_HANDSHAKE:
        return s->cl->imap_id ? SESSION_IMAP_HS_ID : SESSION_IMAP_HS_DONE;
    case SESSION_IMAP_HS_STARTTLS:
        return SESSION_IMAP_HS_HANDSHAKE;
    case SESSION_IMAP_HS_ID:
        return SESSION_IMAP_HS_DONE;
    case SESSION_IMAP_HS_DONE:
        break;
    }
    abort();
}

/* True when the backend's responses are mxproxy's own now. */
static bool session_imap_hs_own(const struct session *s)
{
    enum session_imap_hs hs = IMAP_M(s)->hs;

    return hs == SESSION_IMAP_HS_STARTTLS || hs == SESSION_IMAP_HS_ID;
}

/* One whole response of mxproxy's own exchange: untagged ones (ID's "* ID ...") are read
 * and forgotten; the tagged one moves on. Returns true when it moved on. */
static bool session_imap_hs_step(struct session *s, const struct imap_resp *r)
{
    struct session_imap *m = IMAP_M(s);
    struct log_line l;

    if (r->kind != IMAP_RESP_TAGGED)
        return false;
    switch (m->hs) {
    case SESSION_IMAP_HS_STARTTLS:
        if (r->status != IMAP_ST_OK || strcmp(r->tag, SESSION_IMAP_TAG_STARTTLS) != 0) {
            session_imap_backend_starttls_failed(s, "backend refused STARTTLS");
            return true;
        }
        break;
    case SESSION_IMAP_HS_ID:
        if (log_enabled(r->status == IMAP_ST_OK ? LOG_INFO : LOG_WARN)) {
            log_begin(&l, r->status == IMAP_ST_OK ? LOG_INFO : LOG_WARN, "imap_id");
            log_sid(&l, s->id);
            log_str(&l, "status", imap_status_name(r->status));
            log_strn(&l, "reply", r->text, r->text_len);
            log_end(&l);
        }
        break;
    default:
        abort(); /* only the states above read responses */
    }
    session_imap_hs_enter(s, session_imap_hs_next(s, m->hs));
    return true;
}

static void session_imap_backend_tls_ready(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (m->hs != SESSION_IMAP_HS_HANDSHAKE)
        return;
    session_imap_hs_enter(s, session_imap_hs_next(s, m->hs));
}

/* The backend broke the protocol (a line that is no response, a tag nobody sent): the
 * responses before it went out, nothing after it does, and the client gets the BYE. */
static void session_imap_backend_broke(struct session *s, const struct imap_resp *r,
                                       const char *why)
{
    if (log_enabled(LOG_WARN)) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "backend_garbage");
        log_sid(&l, s->id);
        log_strn(&l, "text", r->text, r->text_len);
        log_end(&l);
    }
    dialog_flush_down(s);
    session_drop_backend(s);
    session_imap_abort(s, IMAP_SAY(backend_gone), true, session_backend_gone_end(s), why);
}

/* One whole response for the client (already forwarded up to its end). */
static void session_imap_on_response(struct session *s, const struct imap_resp *r)
{
    struct session_imap *m = IMAP_M(s);
    struct imap_pair p;
    enum imap_pairs_res res;

    res = imap_pairs_on_response(&m->pp, r, &p);
    switch (res) {
    case IMAP_PAIRS_GARBAGE:
        session_imap_backend_broke(s, r, "backend sent a line that is not an IMAP response");
        return;
    case IMAP_PAIRS_CONTINUE:
        imap_client_on_continue(&m->cp);
        break;
    case IMAP_PAIRS_UNTAGGED:
        break;
    case IMAP_PAIRS_GREETING:
        session_imap_log_pair(s, &p);
        m->d.flags |= SESSION_IMAP_F_GREETED;
        if (session_imap_hs_wanted(s) && m->hs == SESSION_IMAP_HS_IDLE) {
            if (r->status != IMAP_ST_OK) {
                /* PREAUTH or BYE: no STARTTLS, no ID can follow. */
                if (s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS) {
                    session_imap_backend_starttls_failed(s, "backend greeting is not OK");
                    return;
                }
                m->hs = SESSION_IMAP_HS_DONE;
            } else {
                session_imap_hs_enter(s, session_imap_hs_next(s, m->hs));
                return;
            }
        }
        break;
    case IMAP_PAIRS_UNSOLICITED:
    case IMAP_PAIRS_MATCHED:
        /* Only the answer to a command the backend got ends what waits for it: a tag of a
         * command mxproxy answers itself (STARTTLS) must not lift its barrier. */
        if (res == IMAP_PAIRS_MATCHED)
            imap_client_on_tagged(&m->cp, r->tag, r->tag_len);
        session_imap_log_pair(s, &p);
        if (res == IMAP_PAIRS_MATCHED && r->status == IMAP_ST_OK) {
            if (p.cmd == IMAP_CMD_STARTTLS) {
                dialog_log_injection(s);
                dialog_go_opaque(s, "starttls_passthrough");
            } else if (p.cmd == IMAP_CMD_COMPRESS) {
                dialog_go_opaque(s, "compress_passthrough");
            }
        } else if (res == IMAP_PAIRS_MATCHED && p.cmd == IMAP_CMD_STARTTLS) {
            dialog_log_injection(s);
        }
        break;
    }
    /* The response goes out with the rest of the read (dialog_say and
     * dialog_close_after_flush send it before anything of mxproxy's own). */
    session_imap_resume_client(s);
    session_imap_answer_locals(s);
    session_imap_fifo_detach(s);
    session_imap_drain_answered(s);
}

/* Keeps backend bytes p[0, n) (n < IMAP_SERVER_HOLD) for the next read. */
static bool session_imap_carry_down(struct session *s, const char *p, size_t n)
{
    struct session_imap *m = IMAP_M(s);

    if (m->dcarry == NULL) {
        m->dcarry = malloc(IMAP_SERVER_HOLD);
        if (m->dcarry == NULL)
            return false;
    }
    memmove(m->dcarry, p, n);
    s->down.carry = m->dcarry;
    s->down.carry_len = n;
    return true;
}

/* transcript=full: the lines of backend bytes, literal data left out. */
static void session_imap_server_lines(struct session *s, const struct imap_server_event *ev)
{
    if (!dialog_logs_lines(s))
        return;
    if (ev->flags & IMAP_SEV_F_LITERAL) {
        char text[64];
        int n = snprintf(text, sizeof(text), "<literal: %zu bytes>", ev->fwd_len);
        dialog_log_line(s, "server", text, (size_t)n, false);
        return;
    }
    dialog_server_lines(s, ev->fwd, ev->fwd_len);
}

/* relay on_data for the backend direction: responses go to the client as they are (a
 * capability list rewritten when TLS needs it), each line once whole; literal data and
 * lines over IMAP_SERVER_HOLD as they come. */
static void session_imap_on_backend_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_imap *m = IMAP_M(s);
    uint64_t now = session_imap_now();
    size_t off = 0;

    m->d.down = b;
    m->d.down_start = 0;
    m->d.down_end = 0;
    while (off < len && !(m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING)) && !session_ending(s)) {
        struct imap_server_event ev;
        size_t n = imap_server_parse(&m->sp, b->data + off, len - off, now, &ev);
        bool own = session_imap_hs_own(s);

        if (ev.type == IMAP_SEV_AGAIN) {
            if (!session_imap_carry_down(s, b->data + off, len - off))
                session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
            break;
        }
        if (own) {
            /* mxproxy's own response: read, never forwarded. */
            dialog_flush_down(s);
            off += n;
            m->d.down_start = m->d.down_end = off;
            if (ev.type == IMAP_SEV_RESPONSE && session_imap_hs_step(s, ev.resp)) {
                /* Nothing may follow it before our next line (STARTTLS: it is TLS). */
                m->d.down_start = m->d.down_end = len;
                break;
            }
            continue;
        }
        session_imap_server_lines(s, &ev);
        if (ev.type == IMAP_SEV_RESPONSE && (ev.flags & IMAP_SEV_F_WHOLE) &&
            session_imap_capa_edit(s) != 0 &&
            (ev.resp->code[0] != '\0' || strcmp(ev.resp->keyword, "CAPABILITY") == 0)) {
            char out[SESSION_IMAP_CAPA_MAX];
            ssize_t w =
                imap_capa_edit(ev.fwd, ev.fwd_len, session_imap_capa_edit(s), out, sizeof(out));
            if (w >= 0 && ((size_t)w != ev.fwd_len || memcmp(out, ev.fwd, ev.fwd_len) != 0)) {
                dialog_flush_down(s); /* earlier responses first */
                (void)relay_send_copy(&s->down, out, (size_t)w);
                off += n;
                m->d.down_start = m->d.down_end = off;
                session_imap_on_response(s, ev.resp);
                continue;
            }
        }
        off += n;
        m->d.down_end = off;
        if (ev.type == IMAP_SEV_RESPONSE)
            session_imap_on_response(s, ev.resp);
    }
    if (m->d.down_end < len && (m->d.flags & DIALOG_F_OPAQUE)) {
        /* After STARTTLS or COMPRESS passthrough the rest is TLS or deflate: forward it. */
        if (m->d.down_start == m->d.down_end)
            m->d.down_start = off;
        m->d.down_end = len;
        s->down.carry_len = 0;
    }
    if (!session_closing(s))
        dialog_flush_down(s);
    m->d.down = NULL;
    relay_block_unref(d->pool, b);
}

static void session_imap_on_backend_eof(struct session *s)
{
    if (session_imap_hs_own(s) || IMAP_M(s)->hs == SESSION_IMAP_HS_HANDSHAKE) {
        if (s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS &&
            IMAP_M(s)->hs != SESSION_IMAP_HS_ID) {
            session_imap_backend_starttls_failed(s, "backend closed the connection");
            return;
        }
    }
    session_imap_abort(s, IMAP_SAY(backend_gone), false, session_backend_gone_end(s), NULL);
}

static void session_imap_on_backend_reset(struct session *s, enum session_end end,
                                          const char *error)
{
    session_imap_abort(s, IMAP_SAY(backend_gone), false, end, error);
}

static bool session_imap_opaque(const struct session *s)
{
    return (IMAP_M(s)->d.flags & DIALOG_F_OPAQUE) != 0;
}

/* ---- session hooks ------------------------------------------------------------------- */

static int session_imap_new(struct session *s)
{
    struct session_imap *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return UV_ENOMEM;
    m->d.dialect = &session_imap_dialect;
    s->proto_state = m;
    session_imap_client_init(s);
    return 0;
}

static void session_imap_free(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (m == NULL)
        return;
    if (m->d.fifo != NULL) {
        struct imap_pair p;
        while (imap_pairs_abort(&m->pp, &p))
            ; /* empty it, so detach gives the storage back */
        session_imap_fifo_detach(s);
    }
    dialog_free(s);
    free(m->dcarry);
    free(m);
    s->proto_state = NULL;
}

static void session_imap_on_connected(struct session *s)
{
    s->up.on_data = session_imap_on_client_data;
    s->down.on_data = session_imap_on_backend_data;
    s->down.flags |= RELAY_F_NO_FIN; /* on backend EOF, the client gets the BYE first */
}

static bool session_imap_greeted(const struct session *s)
{
    return IMAP_M(s)->pp.greeted;
}

/* No backend, mxproxy short of resources, or over the limit: a client that spoke before a
 * greeting that never came had its commands aborted; the client hears why. */
static void session_imap_refuse(struct session *s, const char *reply)
{
    struct imap_pair p;

    while (imap_pairs_abort(&IMAP_M(s)->pp, &p))
        session_imap_log_pair(s, &p);
    if (session_imap_bye(s, reply))
        IMAP_M(s)->primary = reply + 2;
}

static void session_imap_goodbye(struct session *s, enum session_end end)
{
    struct session_imap *m = IMAP_M(s);

    (void)end;
    if (m->d.flags & DIALOG_F_OPAQUE)
        return; /* TLS or deflate to the backend: a plaintext BYE would be noise */
    dialog_drop_tail(s);
    if (session_imap_bye(s, IMAP_SAY(idle)) && !imap_pairs_summary(&m->pp)->has_primary &&
        m->primary == NULL)
        m->primary = IMAP_SAY(idle) + 2;
    m->d.flags |= DIALOG_F_ENDING;
}

/* Responses the backend owes: an IDLE in progress owes none until the client's DONE. */
static size_t session_imap_owed(const struct session_imap *m)
{
    size_t n = imap_pairs_outstanding(&m->pp);

    if (n > 0 && imap_client_idling(&m->cp))
        n--;
    return n;
}

static bool session_imap_drain_wait(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))
        return false;
    if (session_imap_owed(m) == 0)
        return false;
    m->d.flags |= DIALOG_F_DRAIN;
    relay_hold(&s->up); /* what the client sends now is answered by the BYE, never relayed */
    return true;
}

static void session_imap_drain_answered(struct session *s)
{
    struct session_imap *m = IMAP_M(s);

    if (!dialog_drain_due(s, session_imap_owed(m)))
        return;
    if (imap_pairs_summary(&m->pp)->logout_answered) {
        dialog_close_after_flush(s, SESSION_END_LOGOUT, NULL);
        return;
    }
    session_imap_goodbye(s, SESSION_END_DRAIN);
    dialog_close_after_flush(s, SESSION_END_DRAIN, NULL);
}

static void session_imap_drain_cut(struct session *s)
{
    struct session_imap *m = IMAP_M(s);
    struct imap_pair p;

    relay_hold(&s->up);
    while (imap_pairs_abort(&m->pp, &p))
        session_imap_log_pair(s, &p);
    session_imap_goodbye(s, SESSION_END_DRAIN);
}

static enum session_end session_imap_end(const struct session *s, enum session_end end)
{
    const struct imap_pairs_summary *sum = imap_pairs_summary(&IMAP_M(s)->pp);

    if (IMAP_M(s)->d.flags & DIALOG_F_OPAQUE)
        return end; /* a LOGOUT inside TLS or deflate is not seen: mode tcp's reasons */
    if (sum->logout_answered)
        return SESSION_END_LOGOUT; /* however the sockets closed after the reply */
    if (end == SESSION_END_CLIENT_EOF)
        return sum->logout_sent ? SESSION_END_LOGOUT : SESSION_END_CLIENT_EOF_WITHOUT_LOGOUT;
    return end;
}

static void session_imap_log_close(const struct session *s, struct log_line *l)
{
    const struct session_imap *m = IMAP_M(s);
    const struct imap_pairs_summary *sum = imap_pairs_summary(&m->pp);

    if (m->d.flags & DIALOG_F_OPAQUE)
        log_uint(l, "opaque", 1);
    if (sum->has_primary) {
        char primary[IMAP_TEXT_MAX + 16];
        const struct imap_pair *p = &sum->primary;
        int n = snprintf(primary, sizeof(primary), "%s %.*s", imap_status_name(p->status),
                         (int)p->text_len, p->text);
        log_strn(l, "primary_error", primary,
                 (size_t)n < sizeof(primary) ? (size_t)n : sizeof(primary) - 1);
    } else if (m->primary != NULL) {
        log_str(l, "primary_error", m->primary);
    }
}

static void session_imap_canned(struct session *s, enum proto_say what, const char *why)
{
    (void)why;
    switch (what) {
    case PROTO_SAY_UNAVAILABLE:
        session_imap_refuse(s, IMAP_SAY(unavailable));
        return;
    case PROTO_SAY_LOCAL_ERROR:
        session_imap_refuse(s, IMAP_SAY(local_error));
        return;
    case PROTO_SAY_LIMIT:
        dialog_say(s, IMAP_SAY(limit));
        IMAP_M(s)->primary = IMAP_SAY(limit) + 2;
        return;
    case PROTO_SAY_CLIENT_LIMIT:
        dialog_say(s, IMAP_SAY(client_limit));
        IMAP_M(s)->primary = IMAP_SAY(client_limit) + 2;
        return;
    case PROTO_SAY_DENIED:
        dialog_say(s, IMAP_SAY(denied));
        IMAP_M(s)->primary = IMAP_SAY(denied) + 2;
        return;
    case PROTO_SAY_IDLE:
        session_imap_goodbye(s, SESSION_END_IDLE_TIMEOUT);
        return;
    case PROTO_SAY_DRAIN:
        session_imap_goodbye(s, SESSION_END_DRAIN);
        return;
    }
    abort();
}

const struct proto proto_imap = {
    .name = "imap",
    .open = session_imap_new,
    .free = session_imap_free,
    .connected = session_imap_on_connected,
    .say = session_imap_canned,
    .backend_eof = session_imap_on_backend_eof,
    .backend_reset = session_imap_on_backend_reset,
    .opaque = session_imap_opaque,
    .backend_tls_ready = session_imap_backend_tls_ready,
    .backend_tls_failed = session_imap_backend_tls_failed,
    .greeted = session_imap_greeted,
    .drain_wait = session_imap_drain_wait,
    .drain_cut = session_imap_drain_cut,
    .end = session_imap_end,
    .log_close = session_imap_log_close,
};
