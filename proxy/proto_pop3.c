/* proto_pop3.c: mode pop3, between the relays and the pure parsers (pop3.h, pop3_pairs.h). */
#include "proto.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "clock.h"
#include "config.h"
#include "dialog.h"
#include "log.h"
#include "metrics.h"
#include "pop3.h"
#include "pop3_pairs.h"
#include "proxyproto.h"
#include "relay.h"
#include "session_impl.h"
#include "worker.h"

/* mxproxy's own exchange with the backend (backend_tls = starttls, xclient = on), before the
 * client's first command reaches it (QUIT excepted: it is relayed as it is, and nothing after
 * it ever is). That command and everything behind it wait; each state has sent one line, or
 * waits for one event, and session_pop3_hs_next() names the next:
 *
 *   IDLE -> [GREETING] -> [STLS -> HANDSHAKE] -> [XCLIENT] -> DONE
 *
 * Every response in STLS and XCLIENT is mxproxy's own: one status line, read and never
 * forwarded nor paired. Anything but "+OK" ends the session with a canned -ERR: the backend
 * never acts for an unidentified client, nor in plaintext when TLS was asked for. */
enum session_pop3_hs {
    SESSION_POP3_HS_IDLE = 0,  /* nothing sent: no command yet, or neither option is on */
    SESSION_POP3_HS_GREETING,  /* the client spoke first: our exchange waits for the greeting */
    SESSION_POP3_HS_STLS,      /* STLS is out: a +OK starts the handshake */
    SESSION_POP3_HS_HANDSHAKE, /* the TLS handshake runs */
    SESSION_POP3_HS_XCLIENT,   /* XCLIENT is out: its +OK lets the client's command go */
    SESSION_POP3_HS_DONE,      /* the client's command went out: every response is the client's */
};

struct session_pop3 {
    struct dialog d;         /* first: the shared dialog machinery (dialog.h) */
    struct pop3_client cp;   /* client command parser */
    struct pop3_server sp;   /* backend response parser */
    struct pop3_pairs pp;    /* outstanding commands, summary */
    const char *primary;     /* a primary error mxproxy made up (static text), or NULL */
    char *capa;              /* a CAPA response being gathered for rewriting */
    size_t capa_len;         /* bytes in capa */
    char *replay;            /* the client's first command, sent after the handshake */
    size_t replay_len;       /* bytes in replay */
    enum session_pop3_hs hs; /* mxproxy's own exchange with the backend */
    size_t rsize;            /* bytes of the status line in progress, across reads */
};

/* m->d.flags: the dialog's DIALOG_F_* and these:
 *   QUIT       QUIT came first and was relayed before the handshake: nothing else is
 *   XCLIENT    the greeting announced [XCLIENT]: the backend trusts mxproxy to name clients
 *   GATHER     the CAPA response being read is gathered into capa
 *   BODY_SKIP  transcript: the body being read is a message's, not logged line by line */
#define SESSION_POP3_F_QUIT DIALOG_F_PROTO(0)
#define SESSION_POP3_F_XCLIENT DIALOG_F_PROTO(1)
#define SESSION_POP3_F_GATHER DIALOG_F_PROTO(2)
#define SESSION_POP3_F_BODY_SKIP DIALOG_F_PROTO(3)

#define SESSION_POP3_CAPA_MAX 4096 /* a CAPA response longer than this is not rewritten */
/* A status line reaches the client only whole (a body streams); one longer than this is a
 * protocol error (RFC 2449 4: 512 octets; Dovecot's are far shorter). */
#define SESSION_POP3_LINE_MAX (64 * 1024)

#define POP3_M(s) ((struct session_pop3 *)(s)->proto_state)

/* A "+ " line is a SASL challenge: never in the transcript. */
static const char *session_pop3_redact(const char *line, size_t len)
{
    return len >= 1 && line[0] == '+' && (len == 1 || line[1] == ' ') ? "+ [redacted]" : NULL;
}

static const struct dialect session_pop3_dialect = {
    .name = "pop3",
    .match = DIALECT_MATCH_FIFO,
    .verbs = pop3_verbs,
    .nverbs = POP3_CMD_COUNT,
    .replies =
        {
            .unavailable = "-ERR [SYS/TEMP] mxproxy: no mail server available, try again later",
            .local_error = "-ERR [SYS/TEMP] mxproxy: local resources exhausted, try again later",
            .limit = "-ERR [SYS/TEMP] mxproxy: too many connections, try again later",
            .client_limit =
                "-ERR [SYS/TEMP] mxproxy: too many connections from your address, try again later",
            /* RFC 3206: SYS/PERM, retrying will not help. */
            .denied = "-ERR [SYS/PERM] mxproxy: access denied",
            .idle = "-ERR [SYS/TEMP] mxproxy: idle timeout, closing connection",
            .drain = "-ERR [SYS/TEMP] mxproxy: service shutting down, closing connection",
            .backend_gone = "-ERR [SYS/TEMP] mxproxy: backend closed the connection",
            .backend_tls = "-ERR [SYS/TEMP] mxproxy: TLS with the mail server failed, try again "
                           "later",
        },
    .redact_server_line = session_pop3_redact,
};

#define POP3_SAY(what) (session_pop3_dialect.replies.what)
#define POP3_SAY_XCLIENT                                                                           \
    "-ERR [SYS/TEMP] mxproxy: XCLIENT with the mail server failed, try again later"
#define POP3_SAY_BROKE "-ERR [SYS/TEMP] mxproxy: backend protocol error"

static void session_pop3_backend_tls_failed(struct session *s, const char *reason);
static void session_pop3_goodbye(struct session *s, enum session_end end);
static void session_pop3_answer_locals(struct session *s);
static void session_pop3_drain_answered(struct session *s);
static bool session_pop3_hs_wanted(const struct session *s);
static void session_pop3_hs_start(struct session *s, const struct pop3_event *ev);

static uint64_t session_pop3_now(void)
{
    return clock_mono_ns();
}

static void session_pop3_client_init(struct session *s)
{
    pop3_client_init(&POP3_M(s)->cp,
                     &(struct pop3_client_opts){.max_line_length = s->cl->max_line_length});
}

/* ---- FIFO storage --------------------------------------------------------------------- */

static bool session_pop3_fifo_attach(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->d.fifo != NULL)
        return true;
    struct pop3_pairs_entry *q =
        dialog_fifo_lend(s, sizeof(struct pop3_pairs_entry) * POP3_PAIRS_CAP);
    if (q == NULL)
        return false;
    pop3_pairs_attach(&m->pp, q);
    return true;
}

/* Gives the FIFO back while no command is outstanding: an idle session costs no FIFO. */
static void session_pop3_fifo_detach(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->d.fifo == NULL || pop3_pairs_detach(&m->pp) == NULL)
        return;
    dialog_fifo_return(s);
}

/* ---- logging ---------------------------------------------------------------------------- */

/* Counts every pair that got a status, logged or not (transcript = off). */
static void session_pop3_count_pair(const struct session *s, const struct pop3_pair *p)
{
    struct metrics *m = &s->w->metrics;

    if (p->kind == POP3_PAIR_GREETING)
        metrics_greeting(m, p->t_reply - s->t_accept);
    if (p->status == POP3_STATUS_OK || p->status == POP3_STATUS_ERR)
        metrics_pop3_response(m, p->cmd, p->status == POP3_STATUS_OK);
}

/* The pair for the admin endpoint's record, with the texts of the log line. */
static void session_pop3_note_pair(const struct session *s, const struct pop3_pair *p)
{
    struct dialog_pair_note n = {.cmd = p->cmd_text, .cmd_len = p->cmd_text_len, .code = ""};

    if (s->view == NULL)
        return;
    if (p->kind == POP3_PAIR_GREETING || p->kind == POP3_PAIR_UNSOLICITED) {
        n.cmd = p->kind == POP3_PAIR_GREETING ? "<greeting>" : "<none>";
        n.cmd_len = strlen(n.cmd);
    }
    n.reply = "";
    if (p->status != POP3_STATUS_NONE) {
        n.code = pop3_status_name(p->status);
        n.reply = p->text;
        n.reply_len = p->text_len;
    }
    if (p->kind == POP3_PAIR_GREETING) {
        n.ms_ns = p->t_reply - s->t_accept;
        n.flags |= SESSVIEW_P_MS;
    } else if (p->kind != POP3_PAIR_UNSOLICITED && p->status != POP3_STATUS_NONE &&
               p->t_reply >= p->t_cmd) {
        n.ms_ns = p->t_reply - p->t_cmd;
        n.flags |= SESSVIEW_P_MS;
    }
    n.flags |= (p->flags & POP3_PAIR_F_PIPELINED) ? SESSVIEW_P_PIPELINED : 0;
    n.flags |= (p->flags & POP3_PAIR_F_PRIMARY) ? SESSVIEW_P_PRIMARY : 0;
    n.flags |= p->kind == POP3_PAIR_LOCAL ? SESSVIEW_P_LOCAL : 0;
    n.flags |= p->kind == POP3_PAIR_ABORTED ? SESSVIEW_P_ABORTED : 0;
    dialog_note_pair(s, &n);
}

static void session_pop3_log_pair(const struct session *s, const struct pop3_pair *p)
{
    struct log_line l;

    session_pop3_count_pair(s, p);
    session_pop3_note_pair(s, p);
    if (!dialog_logs_pairs(s))
        return;
    log_begin(&l, LOG_INFO, "pair");
    log_sid(&l, s->id);
    log_str(&l, "proto", "pop3");
    if (p->kind == POP3_PAIR_GREETING)
        log_str(&l, "cmd", "<greeting>");
    else if (p->kind == POP3_PAIR_UNSOLICITED)
        log_str(&l, "cmd", "<none>");
    else
        log_strn(&l, "cmd", p->cmd_text, p->cmd_text_len);
    if (p->status != POP3_STATUS_NONE) {
        log_str(&l, "status", pop3_status_name(p->status));
        log_strn(&l, "reply", p->text, p->text_len);
    }
    if (p->flags & POP3_PAIR_F_MULTI) {
        log_uint(&l, "lines", p->lines);
        log_uint(&l, "size", p->size);
    }
    if (p->kind == POP3_PAIR_GREETING)
        log_ms(&l, "ms", p->t_reply - s->t_accept); /* what the client waited for */
    else if (p->kind != POP3_PAIR_UNSOLICITED && p->status != POP3_STATUS_NONE &&
             p->t_reply >= p->t_cmd)
        log_ms(&l, "ms", p->t_reply - p->t_cmd); /* from the command's last byte */
    if (p->kind != POP3_PAIR_GREETING && p->kind != POP3_PAIR_UNSOLICITED)
        log_uint(&l, "pipelined", (p->flags & POP3_PAIR_F_PIPELINED) != 0);
    if (p->cmd == POP3_CMD_AUTH && p->rounds > 0)
        log_uint(&l, "rounds", p->rounds);
    if (p->kind == POP3_PAIR_LOCAL)
        log_uint(&l, "local", 1);
    if (p->kind == POP3_PAIR_ABORTED)
        log_uint(&l, "aborted", 1);
    if (p->flags & POP3_PAIR_F_PRIMARY)
        log_uint(&l, "primary", 1);
    log_end(&l);
}

/* ---- client side ---------------------------------------------------------------------- */

/* What a client event means beyond forwarding: transcript, warnings, the injection count. */
static void session_pop3_client_event(struct session *s, const struct pop3_event *ev)
{
    struct session_pop3 *m = POP3_M(s);
    struct log_line l;

    switch (ev->type) {
    case POP3_EV_COMMAND:
        if (dialog_logs_lines(s)) {
            if (ev->flags & POP3_EV_F_REDACTED) {
                char redacted[POP3_PAIRS_TEXT_MAX + 16];
                int n = snprintf(
                    redacted, sizeof(redacted), "%.*s [redacted]",
                    (int)(ev->line_len < POP3_PAIRS_TEXT_MAX ? ev->line_len : POP3_PAIRS_TEXT_MAX),
                    ev->line);
                dialog_log_line(s, "client", redacted, (size_t)n, false);
            } else {
                dialog_log_line(s, "client", ev->line, ev->line_len, false);
            }
        }
        return;
    case POP3_EV_AUTH_RESPONSE:
        if (dialog_logs_lines(s))
            dialog_log_line(s, "client", "[redacted]", 10, false);
        return;
    case POP3_EV_TOO_LONG:
    case POP3_EV_INVALID:
        if (log_enabled(LOG_WARN)) {
            log_begin(&l, LOG_WARN, ev->type == POP3_EV_TOO_LONG ? "line_too_long" : "bad_line");
            log_sid(&l, s->id);
            if (ev->reason != NULL)
                log_str(&l, "reason", ev->reason);
            log_uint(&l, "limit", s->cl->max_line_length);
            log_end(&l);
        }
        return;
    case POP3_EV_INJECTED:
        m->d.injected += ev->size;
        return;
    default:
        return;
    }
}

static bool session_pop3_tls_active(const struct session *s)
{
    return s->client_tls != NULL;
}

/* True while mxproxy's own exchange with the backend runs: the client's commands wait. */
static bool session_pop3_hs_busy(const struct session *s)
{
    enum session_pop3_hs hs = POP3_M(s)->hs;

    return hs != SESSION_POP3_HS_IDLE && hs != SESSION_POP3_HS_DONE;
}

/* Decides whether a client event goes to the backend, where mxproxy itself terminates STLS,
 * requires TLS, refuses a client's XCLIENT, or talks to the backend first. The event is
 * already recorded in the FIFO. */
static bool session_pop3_intercept(struct session *s, const struct pop3_event *ev)
{
    struct session_pop3 *m = POP3_M(s);
    const struct config_listener *cl = s->cl;

    if (ev->type != POP3_EV_COMMAND)
        return true;
    if (ev->cmd == POP3_CMD_XCLIENT) {
        /* Only mxproxy tells the backend who the client is: the backend trusts mxproxy's
         * address, so a client's own XCLIENT through it would be believed. */
        (void)pop3_pairs_answer_locally(&m->pp, POP3_LOCAL_XCLIENT);
        return false;
    }
    if (ev->cmd == POP3_CMD_STLS && session_pop3_tls_active(s)) {
        /* TLS with mxproxy already (implicit, or STLS done): never TLS inside TLS. */
        (void)pop3_pairs_answer_locally(&m->pp, POP3_LOCAL_TLS_ACTIVE);
        return false;
    }
    if (cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS) {
        if (ev->cmd == POP3_CMD_STLS) {
            (void)pop3_pairs_answer_locally(&m->pp, POP3_LOCAL_STLS);
            return false;
        }
        if (dialog_needs_tls(s, ev->cmd)) {
            (void)pop3_pairs_answer_locally(&m->pp, POP3_LOCAL_NEED_TLS);
            /* The answer is decided now: an AUTH's parser need not wait for it. */
            pop3_client_on_reply(&m->cp, ev->cmd, POP3_STATUS_ERR);
            return false;
        }
    }
    if (m->hs == SESSION_POP3_HS_IDLE && session_pop3_hs_wanted(s)) {
        if (m->d.flags & SESSION_POP3_F_QUIT)
            return false; /* after that QUIT: never relayed, -ERR when the backend closes */
        if (pop3_cmd_flags(ev->cmd) & VERB_ENDS) {
            m->d.flags |= SESSION_POP3_F_QUIT;
            return true; /* the backend acts on nothing: relayed as it is */
        }
        /* The backend learns who the client is (and starts TLS) before it sees this command;
         * the command and what follows it wait. */
        session_pop3_hs_start(s, ev);
        return false;
    }
    return true;
}

/* Parses client bytes b[off, end): forwards what the parser says to forward, keeps the rest.
 * The caller keeps its own reference to b. */
static void session_pop3_client_bytes(struct session *s, struct relay_block *b, size_t off,
                                      size_t end)
{
    struct session_pop3 *m = POP3_M(s);
    struct dialog_out out = {.n = 0};
    uint64_t now = session_pop3_now();
    int rc = 0;

    m->d.flags &= ~DIALOG_F_SWITCHED;
    while (rc == 0 && !session_ending(s) && !(m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))) {
        struct pop3_event ev;
        size_t n;

        if (!session_pop3_fifo_attach(s)) {
            rc = UV_ENOMEM;
            break;
        }
        if (pop3_pairs_room(&m->pp) == 0) {
            dialog_hold(s, b, off, end); /* too many commands in flight */
            break;
        }
        n = pop3_client_parse(&m->cp, b->data + off, end - off, &ev);
        if (ev.type == POP3_EV_AGAIN) {
            rc = dialog_carry(s, b->data + off, end - off);
            break;
        }
        if (ev.type == POP3_EV_WAIT) {
            if (off < end)
                dialog_hold(s, b, off, end);
            break;
        }
        (void)pop3_pairs_on_client_event(&m->pp, &ev, now); /* room was checked */
        bool forward = session_pop3_intercept(s, &ev);
        if (forward && ev.fwd_len > 0)
            rc = dialog_out_add(s, b, &out, ev.fwd, ev.fwd_len);
        off += n;
        session_pop3_client_event(s, &ev);
        if (m->d.held == NULL && session_pop3_hs_busy(s)) {
            /* mxproxy's own exchange with the backend first: the rest waits. */
            if (rc == 0)
                rc = dialog_out_flush(s, b, &out);
            dialog_hold(s, b, off, end);
            break;
        }
        session_pop3_answer_locals(s);
        if (m->d.flags & DIALOG_F_SWITCHED) {
            /* Plaintext after STLS in this read is never parsed inside TLS. */
            m->d.flags &= ~DIALOG_F_SWITCHED;
            m->d.injected += end - off;
            dialog_log_injection(s);
            break;
        }
    }
    if (rc == 0)
        rc = dialog_out_flush(s, b, &out);
    if (rc == UV_ENOMEM)
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory"); /* FIFO or carry */
}

/* relay on_data for the client direction. */
static void session_pop3_on_client_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_pop3 *m = POP3_M(s);

    if (m->d.flags & DIALOG_F_OPAQUE) {
        uv_buf_t buf = uv_buf_init(b->data, (unsigned)len);
        (void)relay_send(d, b, &buf, 1); /* a failure closes through on_event */
    } else {
        session_pop3_client_bytes(s, b, 0, len);
    }
    dialog_carry_done(s);
    relay_block_unref(d->pool, b);
}

/* A response may let held client bytes be parsed again. */
static void session_pop3_resume_client(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);
    size_t off, end;

    if (m->d.held == NULL || session_pop3_hs_busy(s))
        return; /* nothing held, or mxproxy's exchange with the backend comes first */
    if (m->d.flags & DIALOG_F_DRAIN)
        return; /* draining: nothing more the client said reaches the backend */
    struct relay_block *b = dialog_take_held(s, &off, &end);
    session_pop3_client_bytes(s, b, off, end);
    relay_block_unref(s->up.pool, b);
    dialog_release(s);
}

/* The client got "+OK Begin TLS negotiation now": everything it sends from now on is TLS. */
static void session_pop3_start_client_tls(struct session *s)
{
    if (!dialog_start_client_tls(s))
        return;
    /* RFC 2595 4: what the client said in plaintext is forgotten. */
    session_pop3_client_init(s);
    dialog_log_injection(s);
}

/* Answers, in order, the lines mxproxy refused itself; then parses again what the client sent
 * meanwhile, so that no pipelined command is left unparsed behind a local answer. */
static void session_pop3_answer_locals(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);
    struct pop3_pair p;
    char text[POP3_TEXT_MAX + 32];
    bool answered = false;

    while (!session_closing(s) && pop3_pairs_take_local(&m->pp, session_pop3_now(), &p)) {
        snprintf(text, sizeof(text), "%s %.*s", pop3_status_name(p.status), (int)p.text_len,
                 p.text);
        dialog_say(s, text);
        session_pop3_log_pair(s, &p);
        pop3_client_on_reply(&m->cp, p.cmd, p.status); /* ends the STLS barrier */
        answered = true;
        if (p.local == POP3_LOCAL_STLS) {
            session_pop3_start_client_tls(s);
            return;
        }
        if (p.local == POP3_LOCAL_STLS_AUTHED)
            dialog_log_injection(s); /* no TLS: what followed STLS stays dropped */
    }
    if (answered)
        session_pop3_resume_client(s);
}

/* ---- backend side --------------------------------------------------------------------- */

/* Forgets the CAPA response gathered so far. */
static void session_pop3_capa_free(struct session_pop3 *m)
{
    free(m->capa);
    m->capa = NULL;
    m->capa_len = 0;
    m->d.flags &= ~SESSION_POP3_F_GATHER;
}

/* Sends the gathered CAPA response to the client: STLS offered before TLS (client_tls =
 * starttls) and withdrawn inside it, implicit TLS included (as it is, if it cannot be
 * rewritten). */
static void session_pop3_send_capa(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);
    char out[SESSION_POP3_CAPA_MAX + 16];
    ssize_t n = pop3_capa_edit(m->capa, m->capa_len,
                               session_pop3_tls_active(s) ? POP3_CAPA_DEL_STLS : POP3_CAPA_ADD_STLS,
                               out, sizeof(out));

    dialog_flush_down(s);
    if (n >= 0)
        (void)relay_send_copy(&s->down, out, (size_t)n);
    else
        (void)relay_send_copy(&s->down, m->capa, m->capa_len);
    session_pop3_capa_free(m);
}

/* Appends backend bytes to the CAPA response being gathered. Past SESSION_POP3_CAPA_MAX, what
 * was gathered goes out as it came and the rest of the response is forwarded as it comes. */
static bool session_pop3_gather(struct session *s, const char *p, size_t n)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->capa == NULL) {
        m->capa = malloc(SESSION_POP3_CAPA_MAX);
        if (m->capa == NULL)
            return false;
    }
    if (m->capa_len + n > SESSION_POP3_CAPA_MAX)
        return false;
    memcpy(m->capa + m->capa_len, p, n);
    m->capa_len += n;
    return true;
}

/* Stops gathering: the bytes gathered so far go out unchanged. */
static void session_pop3_ungather(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    dialog_flush_down(s);
    if (m->capa_len > 0)
        (void)relay_send_copy(&s->down, m->capa, m->capa_len);
    session_pop3_capa_free(m);
}

/* The backend is gone or unusable: the oldest outstanding command gets reply (one line
 * without CRLF) instead of a bare EOF, the others are logged as never answered, and the
 * session closes once the client has it. In the middle of a body nothing is said (an -ERR
 * would be read as a line of the message): the body is cut, and the close tells. */
static void session_pop3_abort(struct session *s, const char *reply, enum session_end end,
                               const char *error)
{
    struct session_pop3 *m = POP3_M(s);
    /* A CAPA response being gathered has not reached the client, not even its status line:
     * the -ERR replaces all of it, as it replaces an unfinished status line. */
    bool gathering = (m->d.flags & SESSION_POP3_F_GATHER) != 0;
    bool in_body = pop3_server_in_body(&m->sp) && !gathering;
    struct pop3_pair p;
    bool first = true;

    dialog_stop(s); /* a status line the backend left unfinished: the -ERR replaces it */
    if (gathering)
        session_pop3_capa_free(m);
    while (pop3_pairs_abort(&m->pp, &p)) {
        if (first && !in_body) {
            dialog_say(s, reply);
            p.kind = POP3_PAIR_LOCAL;
            p.status = POP3_STATUS_ERR;
            p.text_len = (size_t)snprintf(p.text, sizeof(p.text), "%s", reply + 5);
            p.t_reply = session_pop3_now();
            if (!pop3_pairs_summary(&m->pp)->has_primary && m->primary == NULL)
                m->primary = reply;
        }
        first = false;
        session_pop3_log_pair(s, &p);
    }
    if (first && !in_body && !pop3_pairs_summary(&m->pp)->has_primary && m->primary == NULL &&
        end == SESSION_END_TLS_ERROR) {
        dialog_say(s, reply); /* nothing outstanding: the client still learns why */
        m->primary = reply;
    }
    dialog_close_after_flush(s, end, error);
}

/* xclient = on went wrong: the backend is never left acting for a client it was not told
 * about. Logs why (with the backend's status line r, if there is one), resets the backend
 * connection and answers the client. */
static void session_pop3_xclient_failed(struct session *s, const char *reason,
                                        const struct pop3_response *r)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "xclient_error");
    log_sid(&l, s->id);
    log_str(&l, "reason", reason);
    if (r != NULL) {
        log_str(&l, "status", pop3_status_name(r->status));
        log_strn(&l, "reply", r->text, r->text_len);
    }
    log_end(&l);
    session_drop_backend(s);
    session_pop3_abort(s, POP3_SAY_XCLIENT, SESSION_END_XCLIENT_ERROR, reason);
}

/* backend_tls = starttls went wrong: say why, then the canned -ERR to the client. */
static void session_pop3_backend_stls_failed(struct session *s, const char *reason)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "tls_error");
    log_sid(&l, s->id);
    log_str(&l, "side", "backend");
    log_str(&l, "reason", reason);
    log_end(&l);
    session_pop3_backend_tls_failed(s, reason);
}

static void session_pop3_hs_failed(struct session *s, const char *reason,
                                   const struct pop3_response *r)
{
    enum session_pop3_hs hs = POP3_M(s)->hs;

    if (hs == SESSION_POP3_HS_STLS || hs == SESSION_POP3_HS_HANDSHAKE)
        session_pop3_backend_stls_failed(s, reason);
    else
        session_pop3_xclient_failed(s, reason, r);
}

static const char *session_pop3_hs_name(enum session_pop3_hs hs)
{
    static const char *const names[] = {
        [SESSION_POP3_HS_IDLE] = "idle",       [SESSION_POP3_HS_GREETING] = "greeting",
        [SESSION_POP3_HS_STLS] = "stls",       [SESSION_POP3_HS_HANDSHAKE] = "handshake",
        [SESSION_POP3_HS_XCLIENT] = "xclient", [SESSION_POP3_HS_DONE] = "done",
    };
    return names[hs];
}

/* Does this listener make mxproxy talk to the backend before the client? */
static bool session_pop3_hs_wanted(const struct session *s)
{
    return s->cl->xclient || s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS;
}

/* The state after hs, once hs got what it waited for. */
static enum session_pop3_hs session_pop3_hs_next(const struct session *s, enum session_pop3_hs hs)
{
    bool tls = s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS;

    switch (hs) {
    case SESSION_POP3_HS_IDLE:
        if (!POP3_M(s)->pp.greeted)
            return SESSION_POP3_HS_GREETING;
        /* fallthrough */
    case SESSION_POP3_HS_GREETING:
        return tls ? SESSION_POP3_HS_STLS
                   : (s->cl->xclient ? SESSION_POP3_HS_XCLIENT : SESSION_POP3_HS_DONE);
    case SESSION_POP3_HS_STLS:
        return SESSION_POP3_HS_HANDSHAKE;
    case SESSION_POP3_HS_HANDSHAKE:
        return s->cl->xclient ? SESSION_POP3_HS_XCLIENT : SESSION_POP3_HS_DONE;
    case SESSION_POP3_HS_XCLIENT:
        return SESSION_POP3_HS_DONE;
    case SESSION_POP3_HS_DONE:
        break;
    }
    abort();
}

/* Dovecot's POP3 XCLIENT line: the client's address (plain, IPv6 without a prefix; a v4
 * client on a dual-stack listener as v4) and port, as a trusted proxy says them. */
static int session_pop3_xclient_line(struct session *s, char *out, size_t cap)
{
    char ip[PROXYPROTO_ADDR_TEXT_MAX];
    unsigned port;
    bool v6;

    if (!proxyproto_addr_text(&s->client_sa.sa, ip, &v6, &port))
        return -1;
    return snprintf(out, cap, "XCLIENT ADDR=%s PORT=%u\r\n", ip, port);
}

/* Enters state next and does what it names: sends its line, starts TLS, or (DONE) sends the
 * client's command and lets the client's bytes flow. */
static void session_pop3_hs_enter(struct session *s, enum session_pop3_hs next)
{
    struct session_pop3 *m = POP3_M(s);
    struct log_line l;

    if (log_enabled(LOG_DEBUG)) {
        log_begin(&l, LOG_DEBUG, "backend_handshake");
        log_sid(&l, s->id);
        log_str(&l, "from", session_pop3_hs_name(m->hs));
        log_str(&l, "to", session_pop3_hs_name(next));
        log_end(&l);
    }
    m->hs = next;
    switch (next) {
    case SESSION_POP3_HS_GREETING:
        return; /* session_pop3_on_backend_data moves on after the greeting */
    case SESSION_POP3_HS_STLS:
        dialog_send_backend(s, "STLS\r\n", 6);
        return;
    case SESSION_POP3_HS_HANDSHAKE: {
        const char *why = NULL;
        if (!dialog_start_backend_tls(s, &why) && why != NULL)
            session_pop3_backend_stls_failed(s, why);
        return; /* session_pop3_backend_tls_ready moves on */
    }
    case SESSION_POP3_HS_XCLIENT: {
        char line[128];
        int n;
        if (!(m->d.flags & SESSION_POP3_F_XCLIENT)) {
            session_pop3_xclient_failed(s, "backend does not offer XCLIENT", NULL);
            return;
        }
        n = session_pop3_xclient_line(s, line, sizeof(line));
        if (n <= 0 || (size_t)n >= sizeof(line)) {
            session_pop3_xclient_failed(s, "no client address to send", NULL);
            return;
        }
        dialog_send_backend(s, line, (size_t)n);
        return;
    }
    case SESSION_POP3_HS_DONE:
        /* The client's command, never logged again here (it may be AUTH or PASS with
         * credentials); its response is the client's. */
        (void)relay_send_copy(&s->up, m->replay, m->replay_len);
        free(m->replay);
        m->replay = NULL;
        session_pop3_resume_client(s);
        return;
    case SESSION_POP3_HS_IDLE:
        break;
    }
    abort();
}

/* The client's first command (ev, just recorded in the FIFO and not forwarded) starts
 * mxproxy's exchange with the backend; the command is kept to be sent at its end. */
static void session_pop3_hs_start(struct session *s, const struct pop3_event *ev)
{
    struct session_pop3 *m = POP3_M(s);

    m->replay = malloc(ev->fwd_len);
    if (m->replay == NULL) {
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return;
    }
    memcpy(m->replay, ev->fwd, ev->fwd_len);
    m->replay_len = ev->fwd_len;
    session_pop3_hs_enter(s, session_pop3_hs_next(s, SESSION_POP3_HS_IDLE));
}

/* True when the backend's responses are mxproxy's own now. */
static bool session_pop3_hs_own(const struct session *s)
{
    enum session_pop3_hs hs = POP3_M(s)->hs;

    return hs == SESSION_POP3_HS_STLS || hs == SESSION_POP3_HS_XCLIENT;
}

/* One complete response of mxproxy's own exchange with the backend. */
static void session_pop3_hs_step(struct session *s, const struct pop3_response *r)
{
    struct session_pop3 *m = POP3_M(s);
    struct log_line l;

    switch (m->hs) {
    case SESSION_POP3_HS_STLS:
        if (r->status != POP3_STATUS_OK) {
            session_pop3_backend_stls_failed(s, "backend refused STLS");
            return;
        }
        session_pop3_hs_enter(s, session_pop3_hs_next(s, m->hs));
        return;
    case SESSION_POP3_HS_XCLIENT:
        if (r->status != POP3_STATUS_OK) {
            session_pop3_xclient_failed(s, "backend refused XCLIENT", r);
            return;
        }
        if (log_enabled(LOG_INFO)) {
            log_begin(&l, LOG_INFO, "xclient");
            log_sid(&l, s->id);
            log_str(&l, "status", pop3_status_name(r->status));
            log_strn(&l, "reply", r->text, r->text_len);
            log_end(&l);
        }
        session_pop3_hs_enter(s, session_pop3_hs_next(s, m->hs));
        return;
    default:
        abort(); /* only the states above wait for a response */
    }
}

static void session_pop3_backend_tls_ready(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->hs != SESSION_POP3_HS_HANDSHAKE)
        return;
    session_pop3_hs_enter(s, session_pop3_hs_next(s, m->hs));
}

/* The backend broke the protocol: a line that is no status line (text is its start), or a
 * status line longer than SESSION_POP3_LINE_MAX (text NULL). */
static void session_pop3_backend_broke(struct session *s, const char *text, size_t text_len)
{
    struct log_line l;

    if (log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "protocol_error");
        log_sid(&l, s->id);
        log_str(&l, "side", "backend");
        if (text != NULL) {
            log_str(&l, "reason", "not a POP3 response");
            log_strn(&l, "text", text, text_len);
        } else {
            log_str(&l, "reason", "status line too long");
            log_uint(&l, "limit", SESSION_POP3_LINE_MAX);
        }
        log_end(&l);
    }
    dialog_flush_down(s);
    dialog_drop_tail(s);
    session_drop_backend(s);
    session_pop3_abort(s, POP3_SAY_BROKE, session_backend_gone_end(s),
                       text != NULL ? "backend sent a line that is not a POP3 response"
                                    : "backend sent a status line over 65536 bytes");
}

static_assert(SESSION_POP3_LINE_MAX == 65536, "the error text above names the limit");

/* A greeting, a response or the end of a body: pairs it, logs it, lets the client go on. */
static void session_pop3_on_response(struct session *s, const struct pop3_response *r)
{
    struct session_pop3 *m = POP3_M(s);
    struct pop3_pair p;
    enum pop3_pairs_res res;

    res = pop3_pairs_on_response(&m->pp, r, &p);
    if (res == POP3_PAIRS_GREETING && p.text_len >= 9 && memcmp(p.text, "[XCLIENT]", 9) == 0)
        m->d.flags |= SESSION_POP3_F_XCLIENT; /* Dovecot: the backend trusts mxproxy */
    pop3_client_on_reply(&m->cp, p.cmd, p.status);
    if (res != POP3_PAIRS_INTERMEDIATE)
        session_pop3_log_pair(s, &p);
    if (p.cmd == POP3_CMD_STLS && res == POP3_PAIRS_MATCHED) {
        dialog_log_injection(s);
        if (p.status == POP3_STATUS_OK)
            dialog_go_opaque(s, "starttls_passthrough");
    }
    /* The response goes out with the rest of the read (dialog_say and
     * dialog_close_after_flush send it before anything of mxproxy's own). */
    session_pop3_resume_client(s);
    session_pop3_answer_locals(s);
    session_pop3_fifo_detach(s);
    session_pop3_drain_answered(s);
}

/* transcript=full: the backend bytes p[0, n) just parsed; bodies of messages (RETR, TOP) are
 * not logged line by line, only their size once they end. */
static void session_pop3_transcript(struct session *s, const char *p, size_t n, bool in_body,
                                    const struct pop3_server_event *ev)
{
    struct session_pop3 *m = POP3_M(s);

    if (!in_body || !(m->d.flags & SESSION_POP3_F_BODY_SKIP)) {
        dialog_server_lines(s, p, n);
    }
    if (ev->type == POP3_SEV_BODY) {
        enum pop3_cmd cmd = pop3_pairs_oldest(&m->pp);
        if (cmd == POP3_CMD_RETR || cmd == POP3_CMD_TOP)
            m->d.flags |= SESSION_POP3_F_BODY_SKIP;
    } else if (ev->type == POP3_SEV_RESPONSE && (m->d.flags & SESSION_POP3_F_BODY_SKIP)) {
        char text[64];
        int k = snprintf(text, sizeof(text), "<message body: %llu octets>",
                         (unsigned long long)ev->resp->size);
        m->d.flags &= ~SESSION_POP3_F_BODY_SKIP;
        dialog_log_line(s, "server", text, (size_t)k, false);
    }
}

/* relay on_data for the backend direction: status lines go to the client once whole (the start
 * of one that is not is held until it is), bodies as they come; responses are matched to
 * commands on the way. */
static void session_pop3_on_backend_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_pop3 *m = POP3_M(s);
    uint64_t now = session_pop3_now();
    size_t off = 0;

    m->d.down = b;
    m->d.down_start = 0;
    m->d.down_end = 0;
    while (off < len && !(m->d.flags & DIALOG_F_OPAQUE) && !session_ending(s)) {
        struct pop3_server_event ev;
        size_t at = off; /* where this response, or the rest of one, begins */
        bool own = session_pop3_hs_own(s);
        bool in_body = pop3_server_in_body(&m->sp);
        enum pop3_frame frame = own ? POP3_FRAME_SINGLE : pop3_pairs_frame(&m->pp);
        size_t n = pop3_server_parse(&m->sp, b->data + off, len - off, frame, now, &ev);

        if (!in_body && !own && m->pp.greeted && pop3_pairs_oldest(&m->pp) == POP3_CMD_CAPA &&
            m->capa_len == 0 &&
            (s->cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS || session_pop3_tls_active(s)))
            m->d.flags |= SESSION_POP3_F_GATHER; /* a new CAPA response: rewrite it */
        if (dialog_logs_lines(s))
            session_pop3_transcript(s, b->data + off, n, in_body, &ev);
        if (own) {
            /* mxproxy's own response: read, never forwarded. */
            dialog_flush_down(s); /* earlier responses first */
            m->d.down_start = m->d.down_end = off + n;
        } else if (m->d.flags & SESSION_POP3_F_GATHER) {
            dialog_flush_down(s); /* earlier responses first */
            if (!session_pop3_gather(s, b->data + off, n)) {
                session_pop3_ungather(s); /* too long to rewrite: the rest is forwarded */
                m->d.down_start = off;
            } else {
                m->d.down_start = off + n;
            }
        }
        off += n;
        if (!in_body)
            m->rsize += n;
        if (!in_body && m->rsize > SESSION_POP3_LINE_MAX) {
            m->d.down_end = at;
            session_pop3_backend_broke(s, NULL, 0);
            break;
        }
        if (ev.type == POP3_SEV_AGAIN) {
            if (pop3_server_in_body(&m->sp)) {
                m->d.down_end = off; /* a body goes to the client as it comes */
                break;
            }
            /* A status line that is not whole yet (it ends the read): its start waits for the
             * rest, unless it is being gathered or is mxproxy's own. */
            m->d.down_end = at;
            if (m->d.down_start <= at) {
                dialog_flush_down(s);
                if (!dialog_keep_tail(s, b->data + at, off - at)) {
                    session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
                    break;
                }
                m->d.down_start = m->d.down_end = off;
            }
            break;
        }
        m->rsize = 0;
        if (ev.type == POP3_SEV_GARBAGE) {
            /* The bad line, and whatever of it was held from earlier reads, never reaches
             * the client. */
            m->d.down_end = at;
            session_pop3_backend_broke(s, ev.resp->text, ev.resp->text_len);
            break;
        }
        m->d.down_end = off;
        if (m->d.tail_len > 0 && own)
            dialog_drop_tail(s);
        else if (m->d.tail_len > 0)
            dialog_send_tail(s); /* this status line's start, held from earlier reads */
        switch (ev.type) {
        case POP3_SEV_BODY:
            break; /* the status line goes out; the body follows as it comes */
        case POP3_SEV_RESPONSE:
        case POP3_SEV_CONTINUATION:
            if (own) {
                session_pop3_hs_step(s, ev.resp);
                /* Nothing may follow it before our next line: anything that does is neither
                 * ours nor the client's. */
                m->d.down_start = m->d.down_end = len;
                off = len;
                break;
            }
            if (m->d.flags & SESSION_POP3_F_GATHER)
                session_pop3_send_capa(s);
            session_pop3_on_response(s, ev.resp);
            if (m->hs == SESSION_POP3_HS_GREETING && m->pp.greeted && !session_closing(s) &&
                !(m->d.flags & DIALOG_F_ENDING))
                session_pop3_hs_enter(s, session_pop3_hs_next(s, m->hs));
            break;
        default:
            abort();
        }
    }
    if (m->d.down_end < len && (m->d.flags & DIALOG_F_OPAQUE))
        m->d.down_end = len; /* after STLS passthrough the rest is TLS: forward it too */
    if (!session_closing(s))
        dialog_flush_down(s);
    m->d.down = NULL;
    relay_block_unref(d->pool, b);
}

static void session_pop3_on_backend_eof(struct session *s)
{
    if (session_pop3_hs_own(s) || POP3_M(s)->hs == SESSION_POP3_HS_HANDSHAKE) {
        session_pop3_hs_failed(s, "backend closed the connection", NULL);
        return;
    }
    session_pop3_abort(s, POP3_SAY(backend_gone), session_backend_gone_end(s), NULL);
}

static void session_pop3_on_backend_reset(struct session *s, enum session_end end,
                                          const char *error)
{
    if (session_pop3_hs_own(s) || POP3_M(s)->hs == SESSION_POP3_HS_HANDSHAKE) {
        session_pop3_hs_failed(s, "backend reset the connection", NULL);
        return;
    }
    session_pop3_abort(s, POP3_SAY(backend_gone), end, error);
}

static bool session_pop3_opaque(const struct session *s)
{
    return (POP3_M(s)->d.flags & DIALOG_F_OPAQUE) != 0;
}

static void session_pop3_backend_tls_failed(struct session *s, const char *reason)
{
    session_drop_backend(s);
    /* Never a plaintext downgrade: whoever waits gets the -ERR, once. */
    session_pop3_abort(s, POP3_SAY(backend_tls), SESSION_END_TLS_ERROR, reason);
}

/* ---- session hooks ------------------------------------------------------------------- */

static int session_pop3_new(struct session *s)
{
    struct session_pop3 *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return UV_ENOMEM;
    m->d.dialect = &session_pop3_dialect;
    s->proto_state = m;
    session_pop3_client_init(s);
    return 0;
}

static void session_pop3_free(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (m == NULL)
        return;
    if (m->d.fifo != NULL) {
        struct pop3_pair p;
        while (pop3_pairs_abort(&m->pp, &p))
            ; /* empty it, so detach gives the storage back */
        session_pop3_fifo_detach(s);
    }
    dialog_free(s);
    free(m->capa);
    free(m->replay);
    free(m);
    s->proto_state = NULL;
}

static void session_pop3_on_connected(struct session *s)
{
    s->up.on_data = session_pop3_on_client_data;
    s->down.on_data = session_pop3_on_backend_data;
    s->down.flags |= RELAY_F_NO_FIN; /* on backend EOF, answer outstanding commands first */
}

/* No backend, or no resources for one: commands sent before the greeting that never came were
 * never answered; the client gets reply. */
static void session_pop3_refuse(struct session *s, const char *reply)
{
    struct pop3_pair p;

    while (pop3_pairs_abort(&POP3_M(s)->pp, &p))
        session_pop3_log_pair(s, &p);
    dialog_say(s, reply);
    POP3_M(s)->primary = reply;
}

static bool session_pop3_greeted(const struct session *s)
{
    return POP3_M(s)->pp.greeted;
}

static void session_pop3_goodbye(struct session *s, enum session_end end)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->d.flags & DIALOG_F_OPAQUE)
        return; /* the client speaks TLS to the backend: a plaintext reply would be noise */
    m->d.flags |= DIALOG_F_ENDING;
    if (pop3_server_in_body(&m->sp))
        return; /* inside a body an -ERR would be a line of the message: the close says it */
    dialog_drop_tail(s); /* never glued to the start of an unfinished status line */
    if (m->d.flags & SESSION_POP3_F_GATHER)
        session_pop3_ungather(s);
    dialog_say(s, end == SESSION_END_IDLE_TIMEOUT ? POP3_SAY(idle) : POP3_SAY(drain));
}

static bool session_pop3_drain_wait(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))
        return false;
    if (pop3_pairs_outstanding(&m->pp) == 0)
        return false; /* a body under way is owed by an outstanding RETR or TOP */
    m->d.flags |= DIALOG_F_DRAIN;
    relay_hold(&s->up); /* what the client sends now is answered by the -ERR, never relayed */
    return true;
}

/* After a response: a draining session owed nothing more ends now, with the -ERR that answers
 * whatever the client sent after the deadline. */
static void session_pop3_drain_answered(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);

    if (!dialog_drain_due(s, pop3_pairs_outstanding(&m->pp)))
        return;
    if (pop3_pairs_summary(&m->pp)->quit_answered) {
        dialog_close_after_flush(s, SESSION_END_QUIT, NULL); /* +OK said goodbye already */
        return;
    }
    session_pop3_goodbye(s, SESSION_END_DRAIN);
    dialog_close_after_flush(s, SESSION_END_DRAIN, NULL);
}

static void session_pop3_drain_cut(struct session *s)
{
    struct session_pop3 *m = POP3_M(s);
    struct pop3_pair p;
    bool owed = false;

    relay_hold(&s->up);
    /* A response still owed is never forged: the client sees only the close. */
    while (pop3_pairs_abort(&m->pp, &p)) {
        owed = true;
        session_pop3_log_pair(s, &p);
    }
    if (!owed)
        session_pop3_goodbye(s, SESSION_END_DRAIN);
    m->d.flags |= DIALOG_F_ENDING;
}

static enum session_end session_pop3_end(const struct session *s, enum session_end end)
{
    const struct pop3_pairs_summary *sum = pop3_pairs_summary(&POP3_M(s)->pp);

    if (POP3_M(s)->d.flags & DIALOG_F_OPAQUE)
        return end; /* a QUIT inside TLS is not seen: mode tcp's reasons */
    if (sum->quit_answered)
        return SESSION_END_QUIT; /* however the sockets closed after the response */
    if (end == SESSION_END_CLIENT_EOF)
        return sum->quit_sent ? SESSION_END_QUIT : SESSION_END_CLIENT_EOF_WITHOUT_QUIT;
    return end;
}

static void session_pop3_log_close(const struct session *s, struct log_line *l)
{
    const struct session_pop3 *m = POP3_M(s);
    const struct pop3_pairs_summary *sum = pop3_pairs_summary(&m->pp);

    if (m->d.flags & DIALOG_F_OPAQUE) {
        log_uint(l, "opaque", 1); /* what followed STLS ran inside TLS, unseen */
        return;
    }
    log_uint(l, "authenticated", sum->authenticated);
    log_uint(l, "retrieved", sum->retrieved);
    log_uint(l, "deleted", sum->deleted);
    if (sum->has_primary) {
        char primary[POP3_TEXT_MAX + 32];
        const struct pop3_pair *p = &sum->primary;
        int n = snprintf(primary, sizeof(primary), "%s %.*s", pop3_status_name(p->status),
                         (int)p->text_len, p->text);
        log_strn(l, "primary_error", primary,
                 (size_t)n < sizeof(primary) ? (size_t)n : sizeof(primary) - 1);
    } else if (m->primary != NULL) {
        log_str(l, "primary_error", m->primary);
    }
}

static void session_pop3_canned(struct session *s, enum proto_say what, const char *why)
{
    (void)why;
    switch (what) {
    case PROTO_SAY_UNAVAILABLE:
        session_pop3_refuse(s, POP3_SAY(unavailable));
        return;
    case PROTO_SAY_LOCAL_ERROR:
        session_pop3_refuse(s, POP3_SAY(local_error));
        return;
    case PROTO_SAY_LIMIT:
        dialog_say(s, POP3_SAY(limit));
        POP3_M(s)->primary = POP3_SAY(limit);
        return;
    case PROTO_SAY_CLIENT_LIMIT:
        dialog_say(s, POP3_SAY(client_limit));
        POP3_M(s)->primary = POP3_SAY(client_limit);
        return;
    case PROTO_SAY_DENIED:
        dialog_say(s, POP3_SAY(denied));
        POP3_M(s)->primary = POP3_SAY(denied);
        return;
    case PROTO_SAY_IDLE:
        session_pop3_goodbye(s, SESSION_END_IDLE_TIMEOUT);
        return;
    case PROTO_SAY_DRAIN:
        session_pop3_goodbye(s, SESSION_END_DRAIN);
        return;
    }
    abort();
}

const struct proto proto_pop3 = {
    .name = "pop3",
    .open = session_pop3_new,
    .free = session_pop3_free,
    .connected = session_pop3_on_connected,
    .say = session_pop3_canned,
    .backend_eof = session_pop3_on_backend_eof,
    .backend_reset = session_pop3_on_backend_reset,
    .opaque = session_pop3_opaque,
    .backend_tls_ready = session_pop3_backend_tls_ready,
    .backend_tls_failed = session_pop3_backend_tls_failed,
    .greeted = session_pop3_greeted,
    .drain_wait = session_pop3_drain_wait,
    .drain_cut = session_pop3_drain_cut,
    .end = session_pop3_end,
    .log_close = session_pop3_log_close,
};
