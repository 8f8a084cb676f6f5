/* proto_smtp.c: mode smtp, between the relays and the pure parsers. */
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
#include "relay.h"
#include "session_impl.h"
#include "smtp.h"
#include "smtp_pairs.h"
#include "tls.h"
#include "worker.h"
#include "xclient.h"

/* mxproxy's own exchange with the backend (backend_tls = starttls,
 * xclient = on), before the client's first command reaches it (QUIT
 * excepted: it is relayed as it is, and nothing after it ever is).
 * That command and everything behind it wait; each state has sent one line,
 * or waits for one event, and session_smtp_hs_next() names the next:
 *
 *   IDLE -> [GREETING] -> EHLO -> [STARTTLS -> HANDSHAKE -> [TLS_EHLO]] -> [XCLIENT]+ -> DONE
 *
 * Every reply in EHLO, STARTTLS, TLS_EHLO and XCLIENT is mxproxy's own: it
 * is read line by line, never kept whole, never paired, and never reaches
 * the client, whatever its size. Anything but the expected reply ends the
 * session with 421 4.7.0: the backend never acts for an unidentified client,
 * nor in plaintext when TLS was asked for. */
enum session_smtp_hs {
    SESSION_SMTP_HS_IDLE = 0,  /* nothing sent: no command yet, or neither option is on */
    SESSION_SMTP_HS_GREETING,  /* the client spoke first: our EHLO waits for the greeting */
    SESSION_SMTP_HS_EHLO,      /* our EHLO is out: what does the backend offer? */
    SESSION_SMTP_HS_STARTTLS,  /* STARTTLS is out: a 220 starts the handshake */
    SESSION_SMTP_HS_HANDSHAKE, /* the TLS handshake runs */
    SESSION_SMTP_HS_TLS_EHLO,  /* our EHLO again, inside TLS: is XCLIENT offered there? */
    SESSION_SMTP_HS_XCLIENT,   /* an XCLIENT line is out: its 2xx (a new greeting) is absorbed */
    SESSION_SMTP_HS_DONE,      /* the client's command went out: every reply is the client's */
};

struct session_smtp {
    struct dialog d;          /* first: the shared dialog machinery (dialog.h) */
    struct smtp_client cp;    /* client command parser */
    struct smtp_server sp;    /* backend reply parser */
    struct smtp_pairs pp;     /* outstanding commands, summary */
    const char *primary;      /* a primary error mxproxy made up (static text), or NULL */
    char *ehlo;               /* an EHLO reply being gathered for rewriting */
    size_t ehlo_len;          /* bytes in ehlo */
    char *replay;             /* the client's first command, sent after the handshake */
    size_t replay_len;        /* bytes in replay */
    enum smtp_cmd replay_cmd; /* its verb */
    size_t replay_arg;        /* HELO/EHLO: where its name starts in replay */
    size_t replay_arg_len;    /* and its length (0: no name) */
    enum session_smtp_hs hs;  /* mxproxy's own exchange with the backend */
    unsigned hs_caps;         /* what its last EHLO reply offered: SESSION_SMTP_CAP_* */
    char *hs_line;            /* the line of an own reply being read */
    size_t hs_line_len;       /* bytes in hs_line */
    unsigned hs_lines;        /* lines of the own reply read so far */
    uint64_t hs_bytes;        /* bytes of the own reply read so far */
    unsigned xtodo;           /* XCLIENT attributes still to send (XCLIENT_F_*) */
    size_t rsize;             /* bytes of the backend reply in progress, across reads */
    char *helo_before_tls;    /* passthrough: the HELO/EHLO name given before STARTTLS */
    char *caps;               /* client_tls = starttls: the backend's reply to the client's
                                 EHLO/HELO before TLS, then mxproxy's answer after it */
    size_t caps_len;          /* bytes in caps */
    enum smtp_cmd caps_cmd;   /* the command caps was the backend's reply to */
};

/* m->d.flags: the dialog's DIALOG_F_* and these:
 *   DROP_BDAT   the current BDAT was refused: drop its chunk
 *   HS_CUT      the own reply line being read is over SESSION_SMTP_HS_LINE_MAX
 *   QUIT        QUIT came first and was relayed: nothing else is
 *   IDENTIFIED  the backend accepted an EHLO/HELO from the client's side in its
 *               current SMTP session
 *   CAPS_NEW    caps holds the reply being matched right now
 *   HELO_DUE    client TLS began; no EHLO/HELO inside it yet
 *   IN_CHUNK    a BDAT chunk is on its way: the client owes bytes */
#define SESSION_SMTP_F_DROP_BDAT DIALOG_F_PROTO(0)
#define SESSION_SMTP_F_HS_CUT DIALOG_F_PROTO(1)
#define SESSION_SMTP_F_QUIT DIALOG_F_PROTO(2)
#define SESSION_SMTP_F_IDENTIFIED DIALOG_F_PROTO(3)
#define SESSION_SMTP_F_CAPS_NEW DIALOG_F_PROTO(4)
#define SESSION_SMTP_F_HELO_DUE DIALOG_F_PROTO(5)
#define SESSION_SMTP_F_IN_CHUNK DIALOG_F_PROTO(6)

#define SESSION_SMTP_EHLO_MAX 4096 /* an EHLO reply longer than this is not rewritten */
/* A backend reply reaches the client only whole, through its last line's end,
 * so its start is held while the rest is on the way; one longer than this is
 * a protocol error (RFC 5321 4.5.3.1.5: 512-byte lines; a reply of over a
 * hundred such lines is no mail server's). */
#define SESSION_SMTP_REPLY_MAX (64 * 1024)

#define SESSION_SMTP_HS_LINE_MAX 512    /* an own reply line longer than this offers nothing */
#define SESSION_SMTP_HS_REPLY_MAX 65536 /* an own reply longer than this ends the session */

/* hs_caps: what the backend's EHLO reply offered, besides XCLIENT_F_* attributes. */
#define SESSION_SMTP_CAP_STARTTLS 0x10000u /* STARTTLS */
#define SESSION_SMTP_CAP_XCLIENT 0x20000u  /* XCLIENT, with the attributes in the low bits */

#define SMTP_M(s) ((struct session_smtp *)(s)->proto_state)

/* A 334 challenge is an AUTH exchange: never in the transcript. */
static const char *session_smtp_redact(const char *line, size_t len)
{
    return len >= 3 && memcmp(line, "334", 3) == 0 ? "334 [redacted]" : NULL;
}

static const struct dialect session_smtp_dialect = {
    .name = "smtp",
    .match = DIALECT_MATCH_FIFO,
    .verbs = smtp_verbs,
    .nverbs = SMTP_CMD_COUNT,
    .replies =
        {
            .unavailable = "421 4.4.1 mxproxy: no mail server available, try again later",
            .local_error = "421 4.3.2 mxproxy: local resources exhausted, try again later",
            .limit = "421 4.7.0 mxproxy: too many connections, try again later",
            .client_limit = "421 4.7.0 mxproxy: too many connections from your address",
            /* RFC 5321 3.1: a server that will not serve a client may greet it with 554. */
            .denied = "554 5.7.1 mxproxy: access denied",
            .idle = "421 4.4.2 mxproxy: idle timeout, closing connection",
            .drain = "421 4.3.2 mxproxy: service shutting down, closing connection",
            .backend_gone = "421 4.4.2 mxproxy: backend closed the connection",
            .backend_tls = "421 4.7.0 mxproxy: TLS with the mail server failed, try again later",
        },
    .redact_server_line = session_smtp_redact,
};

#define SMTP_SAY(what) (session_smtp_dialect.replies.what)

static void session_smtp_backend_tls_failed(struct session *s, const char *reason);
static void session_smtp_goodbye(struct session *s, enum session_end end);

static uint64_t session_smtp_now(void)
{
    return clock_mono_ns();
}

static enum smtp_smuggling session_smtp_smuggling(const struct config_listener *cl)
{
    switch (cl->smuggling) {
    case CONFIG_SMUGGLING_NORMALIZE:
        return SMTP_SMUGGLING_NORMALIZE;
    case CONFIG_SMUGGLING_OFF:
        return SMTP_SMUGGLING_OFF;
    default:
        return SMTP_SMUGGLING_REJECT;
    }
}

/* ---- FIFO storage --------------------------------------------------------------------- */

static bool session_smtp_fifo_attach(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->d.fifo != NULL)
        return true;
    struct smtp_pairs_entry *q =
        dialog_fifo_lend(s, sizeof(struct smtp_pairs_entry) * SMTP_PAIRS_CAP);
    if (q == NULL)
        return false;
    smtp_pairs_attach(&m->pp, q);
    return true;
}

/* Gives the FIFO back while no command is outstanding, so an idle session
 * costs no FIFO at all. */
static void session_smtp_fifo_detach(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->d.fifo == NULL || smtp_pairs_detach(&m->pp) == NULL)
        return;
    dialog_fifo_return(s);
}

/* ---- logging ---------------------------------------------------------------------------- */

/* Counts every pair, logged or not (transcript = off). */
static void session_smtp_count_pair(const struct session *s, const struct smtp_pair *p)
{
    struct metrics *m = &s->w->metrics;

    switch (p->kind) {
    case SMTP_PAIR_GREETING:
        metrics_greeting(m, p->t_reply - s->t_accept);
        metrics_reply(m, SMTP_CMD_NONE, p->code, METRICS_NO_LATENCY);
        return;
    case SMTP_PAIR_COMMAND:
        metrics_reply(m, p->cmd, p->code,
                      p->t_reply >= p->t_cmd ? p->t_reply - p->t_cmd : METRICS_NO_LATENCY);
        return;
    case SMTP_PAIR_LOCAL:
    case SMTP_PAIR_UNSOLICITED:
        metrics_reply(m, p->cmd, p->code, METRICS_NO_LATENCY);
        return;
    case SMTP_PAIR_ABORTED:
        return; /* never answered */
    }
}

/* The pair for the admin endpoint's record, with the texts of the log line. */
static void session_smtp_note_pair(const struct session *s, const struct smtp_pair *p)
{
    struct dialog_pair_note n = {.cmd = p->cmd_text, .cmd_len = p->cmd_text_len, .code = ""};
    char code[8], reply[SMTP_ESC_MAX + SMTP_REPLY_TEXT_MAX + 2];

    if (s->view == NULL)
        return;
    if (p->kind == SMTP_PAIR_GREETING || p->kind == SMTP_PAIR_UNSOLICITED) {
        n.cmd = p->kind == SMTP_PAIR_GREETING ? "<greeting>" : "<none>";
        n.cmd_len = strlen(n.cmd);
    }
    n.reply = "";
    if (p->code != 0) {
        snprintf(code, sizeof(code), "%d", p->code);
        n.code = code;
        int k = snprintf(reply, sizeof(reply), "%s%s%.*s", p->esc, p->esc[0] != '\0' ? " " : "",
                         (int)p->text_len, p->text);
        n.reply = reply;
        n.reply_len = k < 0 ? 0 : (size_t)k < sizeof(reply) ? (size_t)k : sizeof(reply) - 1;
    }
    if (p->kind == SMTP_PAIR_GREETING) {
        n.ms_ns = p->t_reply - s->t_accept;
        n.flags |= SESSVIEW_P_MS;
    } else if (p->kind != SMTP_PAIR_UNSOLICITED && p->code != 0 && p->t_reply >= p->t_cmd) {
        n.ms_ns = p->t_reply - p->t_cmd;
        n.flags |= SESSVIEW_P_MS;
    }
    n.flags |= (p->flags & SMTP_PAIR_F_PIPELINED) ? SESSVIEW_P_PIPELINED : 0;
    n.flags |= (p->flags & SMTP_PAIR_F_PRIMARY) ? SESSVIEW_P_PRIMARY : 0;
    n.flags |= p->kind == SMTP_PAIR_LOCAL ? SESSVIEW_P_LOCAL : 0;
    n.flags |= p->kind == SMTP_PAIR_ABORTED ? SESSVIEW_P_ABORTED : 0;
    dialog_note_pair(s, &n);
}

static void session_smtp_log_pair(const struct session *s, const struct smtp_pair *p)
{
    struct log_line l;

    session_smtp_count_pair(s, p);
    session_smtp_note_pair(s, p);
    if (!dialog_logs_pairs(s))
        return;
    log_begin(&l, LOG_INFO, "pair");
    log_sid(&l, s->id);
    if (p->kind == SMTP_PAIR_GREETING)
        log_str(&l, "cmd", "<greeting>");
    else if (p->kind == SMTP_PAIR_UNSOLICITED)
        log_str(&l, "cmd", "<none>");
    else
        log_strn(&l, "cmd", p->cmd_text, p->cmd_text_len);
    log_uint(&l, "code", (uint64_t)p->code);
    if (p->esc[0] != '\0')
        log_str(&l, "esc", p->esc);
    if (p->code != 0) {
        log_strn(&l, "reply", p->text, p->text_len);
        log_uint(&l, "lines", p->lines);
    }
    if (p->kind == SMTP_PAIR_GREETING)
        log_ms(&l, "ms", p->t_reply - s->t_accept); /* what the client waited for */
    else if (p->kind != SMTP_PAIR_UNSOLICITED && p->code != 0 && p->t_reply >= p->t_cmd)
        log_ms(&l, "ms", p->t_reply - p->t_cmd); /* from the command's last byte */
    log_uint(&l, "pipelined", (p->flags & SMTP_PAIR_F_PIPELINED) != 0);
    if (p->cmd == SMTP_CMD_DOT || p->cmd == SMTP_CMD_BDAT)
        log_uint(&l, "size", p->size);
    if (p->cmd == SMTP_CMD_AUTH && p->rounds > 0)
        log_uint(&l, "rounds", p->rounds);
    if (p->kind == SMTP_PAIR_LOCAL)
        log_uint(&l, "local", 1);
    if (p->kind == SMTP_PAIR_ABORTED)
        log_uint(&l, "aborted", 1);
    if (p->flags & SMTP_PAIR_F_PRIMARY)
        log_uint(&l, "primary", 1);
    log_end(&l);
}

/* ---- sending ------------------------------------------------------------------------- */

/* ---- client side ---------------------------------------------------------------------- */

static void session_smtp_answer_locals(struct session *s);
static void session_smtp_drain_answered(struct session *s);

/* What a client event means beyond forwarding: logs, guard rails. */
static void session_smtp_client_event(struct session *s, const struct smtp_event *ev)
{
    struct session_smtp *m = SMTP_M(s);
    struct log_line l;

    if (ev->type == SMTP_EV_COMMAND && ev->cmd == SMTP_CMD_BDAT &&
        !(ev->flags & SMTP_EV_F_BAD_ARGS))
        m->d.flags |= SESSION_SMTP_F_IN_CHUNK;
    else if (ev->type == SMTP_EV_BDAT_END)
        m->d.flags &= ~SESSION_SMTP_F_IN_CHUNK;
    switch (ev->type) {
    case SMTP_EV_COMMAND:
        if (dialog_logs_lines(s)) {
            if (ev->cmd == SMTP_CMD_AUTH && (ev->flags & SMTP_EV_F_AUTH_INITIAL)) {
                char redacted[SMTP_PAIRS_TEXT_MAX + 16];
                int n = snprintf(
                    redacted, sizeof(redacted), "%.*s [redacted]",
                    (int)(ev->line_len < SMTP_PAIRS_TEXT_MAX ? ev->line_len : SMTP_PAIRS_TEXT_MAX),
                    ev->line);
                dialog_log_line(s, "client", redacted, (size_t)n, false);
            } else {
                dialog_log_line(s, "client", ev->line, ev->line_len, false);
            }
        }
        return;
    case SMTP_EV_AUTH_RESPONSE:
        if (dialog_logs_lines(s))
            dialog_log_line(s, "client", "[redacted]", 10, false);
        return;
    case SMTP_EV_TOO_LONG:
    case SMTP_EV_INVALID:
        if (log_enabled(LOG_WARN)) {
            log_begin(&l, LOG_WARN, ev->type == SMTP_EV_TOO_LONG ? "line_too_long" : "bad_line");
            log_sid(&l, s->id);
            if (ev->reason != NULL)
                log_str(&l, "reason", ev->reason);
            log_uint(&l, "limit", s->cl->max_line_length);
            log_end(&l);
        }
        return;
    case SMTP_EV_SMUGGLING:
        if (s->cl->smuggling == CONFIG_SMUGGLING_REJECT)
            session_drop_backend(s); /* it never sees an end of data: it discards the message */
        if (log_enabled(LOG_WARN)) {
            log_begin(&l, LOG_WARN, "smuggling");
            log_sid(&l, s->id);
            log_str(&l, "pattern", ev->reason != NULL ? ev->reason : "?");
            log_str(&l, "action", config_smuggling_name(s->cl->smuggling));
            log_end(&l);
        }
        return;
    case SMTP_EV_DATA_END:
        if (dialog_logs_lines(s)) {
            char text[64];
            int n = snprintf(text, sizeof(text), "<message body: %llu bytes>",
                             (unsigned long long)ev->size);
            dialog_log_line(s, "client", text, (size_t)n, false);
        }
        return;
    case SMTP_EV_INJECTED:
        m->d.injected += ev->size;
        return;
    default:
        return;
    }
}

static bool session_smtp_tls_active(const struct session *s)
{
    return s->client_tls != NULL;
}

/* True while mxproxy's own exchange with the backend runs: the client's
 * commands wait. */
static bool session_smtp_hs_busy(const struct session *s)
{
    enum session_smtp_hs hs = SMTP_M(s)->hs;

    return hs != SESSION_SMTP_HS_IDLE && hs != SESSION_SMTP_HS_DONE;
}

static bool session_smtp_hs_wanted(const struct session *s);
static void session_smtp_hs_start(struct session *s, const struct smtp_event *ev);
/* client_tls = starttls: keeps the backend's accepted reply to the client's
 * EHLO/HELO before TLS (gathered in m->ehlo), for the EHLO/HELO RFC 3207
 * makes the client send again inside TLS. */
static void session_smtp_keep_caps(struct session *s, enum smtp_cmd cmd)
{
    struct session_smtp *m = SMTP_M(s);

    if (session_smtp_tls_active(s) || m->ehlo_len == 0)
        return;
    char *c = realloc(m->caps, m->ehlo_len);
    if (c == NULL)
        return; /* not kept: the EHLO inside TLS goes to the backend */
    memcpy(c, m->ehlo, m->ehlo_len);
    m->caps = c;
    m->caps_len = m->ehlo_len;
    m->caps_cmd = cmd;
    m->d.flags |= SESSION_SMTP_F_CAPS_NEW;
}

static void session_smtp_drop_caps(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    free(m->caps);
    m->caps = NULL;
    m->caps_len = 0;
}

/* Tracks whether the backend's current session accepted an EHLO/HELO from
 * the client's side, and whether caps is the reply that did. Replies after
 * the first EHLO/HELO inside TLS change nothing: the answer is decided. */
static void session_smtp_note_helo(struct session *s, enum smtp_pairs_res res,
                                   const struct smtp_pair *p)
{
    struct session_smtp *m = SMTP_M(s);
    bool fresh = (m->d.flags & SESSION_SMTP_F_CAPS_NEW) != 0;

    m->d.flags &= ~SESSION_SMTP_F_CAPS_NEW;
    if (res != SMTP_PAIRS_MATCHED ||
        (session_smtp_tls_active(s) && !(m->d.flags & SESSION_SMTP_F_HELO_DUE)))
        return;
    if ((p->cmd == SMTP_CMD_EHLO || p->cmd == SMTP_CMD_HELO) && p->code / 100 == 2) {
        m->d.flags |= SESSION_SMTP_F_IDENTIFIED;
        if (!fresh)
            session_smtp_drop_caps(s); /* the reply was too long to keep: none is cached */
    } else if ((p->flags & SMTP_PAIR_F_NEW_SESSION) ||
               (p->cmd == SMTP_CMD_STARTTLS && p->code == 220)) {
        /* The backend starts a new SMTP session: it must hear the next EHLO. */
        m->d.flags &= ~SESSION_SMTP_F_IDENTIFIED;
        session_smtp_drop_caps(s);
    }
}

/* The client's first EHLO/HELO inside TLS: when the backend already
 * accepted one and its reply was kept, turns caps into mxproxy's answer (an
 * EHLO gets that reply without STARTTLS, a HELO its first line as "250
 * <text>") and returns true. Returns false when the backend must hear the
 * command: it had none yet, or its reply was not kept or not well-formed. */
static bool session_smtp_caps_answer(struct session *s, enum smtp_cmd cmd)
{
    struct session_smtp *m = SMTP_M(s);
    char out[SESSION_SMTP_EHLO_MAX + 32];
    ssize_t n = -1;

    if ((m->d.flags & SESSION_SMTP_F_IDENTIFIED) && m->caps != NULL) {
        if (cmd == SMTP_CMD_EHLO && m->caps_cmd == SMTP_CMD_EHLO)
            n = smtp_ehlo_edit(m->caps, m->caps_len,
                               SMTP_EHLO_DEL_STARTTLS |
                                   (s->cl->pass_client_xclient ? 0 : SMTP_EHLO_DEL_XCLIENT),
                               out, sizeof(out));
        else
            n = smtp_helo_reply(m->caps, m->caps_len, out, sizeof(out));
    }
    session_smtp_drop_caps(s);
    if (n <= 0)
        return false;
    m->caps = malloc((size_t)n);
    if (m->caps == NULL)
        return false;
    memcpy(m->caps, out, (size_t)n);
    m->caps_len = (size_t)n;
    return true;
}

/* Sends mxproxy's answer to the EHLO/HELO inside TLS (caps) and completes
 * its pair with what the backend's reply would have shown: esc, first line,
 * lines. */
static void session_smtp_say_caps(struct session *s, struct smtp_pair *p)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_server sp = {0};
    struct smtp_server_event ev;

    assert(m->caps != NULL); /* made when the command was refused to the backend */
    dialog_flush_down(s);
    if (smtp_server_parse(&sp, m->caps, m->caps_len, p->t_reply, &ev) == m->caps_len &&
        ev.type == SMTP_SEV_REPLY) {
        const struct smtp_reply *r = ev.reply;
        p->code = r->code;
        memcpy(p->esc, r->esc, sizeof(p->esc));
        p->text_len = r->text_len < SMTP_REPLY_TEXT_MAX ? r->text_len : SMTP_REPLY_TEXT_MAX;
        memcpy(p->text, r->text, p->text_len);
        p->text[p->text_len] = '\0';
        p->lines = r->lines;
        if (r->truncated)
            p->flags |= SMTP_PAIR_F_TRUNCATED;
    }
    if (!session_closing(s)) {
        if (dialog_logs_lines(s)) {
            for (size_t pos = 0, end; pos < m->caps_len; pos = end) {
                end = smtp_line_end(m->caps, pos, m->caps_len);
                size_t n = end - pos;
                while (n > 0 && (m->caps[pos + n - 1] == '\n' || m->caps[pos + n - 1] == '\r'))
                    n--;
                dialog_log_line(s, "proxy", m->caps + pos, n, false);
            }
        }
        (void)relay_send_copy(&s->down, m->caps, m->caps_len); /* a failure closes via on_event */
    }
    session_smtp_drop_caps(s);
}

/* Decides whether a client event goes to the backend, where mxproxy itself
 * terminates STARTTLS, requires TLS, refuses a client's XCLIENT, or talks to
 * the backend first (backend STARTTLS, XCLIENT). The event is already
 * recorded in the FIFO. */
static bool session_smtp_intercept(struct session *s, const struct smtp_event *ev)
{
    struct session_smtp *m = SMTP_M(s);
    const struct config_listener *cl = s->cl;

    if (ev->type == SMTP_EV_BDAT_DATA || ev->type == SMTP_EV_BDAT_END) {
        bool drop = (m->d.flags & SESSION_SMTP_F_DROP_BDAT) != 0;
        if (ev->type == SMTP_EV_BDAT_END)
            m->d.flags &= ~SESSION_SMTP_F_DROP_BDAT;
        return !drop;
    }
    if (ev->type != SMTP_EV_COMMAND)
        return true;
    if ((ev->cmd == SMTP_CMD_XCLIENT || ev->cmd == SMTP_CMD_XFORWARD) && !cl->pass_client_xclient) {
        /* Only mxproxy tells the backend who the client is. */
        (void)smtp_pairs_answer_locally(&m->pp, SMTP_LOCAL_XCLIENT);
        /* The answer is decided now: the parser need not wait for it. */
        smtp_client_on_reply(&m->cp, ev->cmd, 550);
        return false;
    }
    if (cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS) {
        if ((ev->cmd == SMTP_CMD_EHLO || ev->cmd == SMTP_CMD_HELO) &&
            (m->d.flags & SESSION_SMTP_F_HELO_DUE)) {
            /* RFC 3207 makes the client say EHLO again; the backend, which
             * saw no TLS, already had one and may refuse a second. */
            m->d.flags &= ~SESSION_SMTP_F_HELO_DUE;
            if (session_smtp_caps_answer(s, ev->cmd)) {
                (void)smtp_pairs_answer_locally(&m->pp, SMTP_LOCAL_EHLO);
                return false;
            }
        }
        if (ev->cmd == SMTP_CMD_STARTTLS) {
            (void)smtp_pairs_answer_locally(
                &m->pp, session_smtp_tls_active(s) ? SMTP_LOCAL_TLS_ACTIVE : SMTP_LOCAL_STARTTLS);
            return false;
        }
        if (dialog_needs_tls(s, ev->cmd)) {
            (void)smtp_pairs_answer_locally(&m->pp, SMTP_LOCAL_NEED_TLS);
            if (ev->cmd == SMTP_CMD_BDAT)
                m->d.flags |= SESSION_SMTP_F_DROP_BDAT;
            return false;
        }
    }
    if (m->hs == SESSION_SMTP_HS_IDLE && session_smtp_hs_wanted(s)) {
        if (m->d.flags & SESSION_SMTP_F_QUIT) {
            /* After that QUIT: never relayed, 421 when the backend closes. */
            if (ev->cmd == SMTP_CMD_BDAT)
                m->d.flags |= SESSION_SMTP_F_DROP_BDAT;
            return false;
        }
        if (smtp_cmd_flags(ev->cmd) & VERB_ENDS) {
            m->d.flags |= SESSION_SMTP_F_QUIT;
            return true; /* the backend acts on nothing: relayed as it is */
        }
        /* The backend learns who the client is (and starts TLS) before it
         * sees this command; the command and what follows it wait. */
        session_smtp_hs_start(s, ev);
        return false;
    }
    return true;
}

/* Parses client bytes b[off, end): forwards what the parser says to forward,
 * keeps the rest. The caller keeps its own reference to b. */
static void session_smtp_client_bytes(struct session *s, struct relay_block *b, size_t off,
                                      size_t end)
{
    struct session_smtp *m = SMTP_M(s);
    struct dialog_out out = {.n = 0};
    uint64_t now = session_smtp_now();
    int rc = 0;

    /* SWITCHED concerns the read in which the 220 went out. A 220 sent after
     * a backend reply (STARTTLS pipelined behind RSET) left no plaintext
     * behind: these bytes came through TLS and are all commands. */
    m->d.flags &= ~DIALOG_F_SWITCHED;
    while (rc == 0 && !session_ending(s) && !(m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))) {
        struct smtp_event ev;
        size_t n;

        if (!session_smtp_fifo_attach(s)) {
            rc = UV_ENOMEM;
            break;
        }
        if (smtp_pairs_room(&m->pp) == 0) {
            dialog_hold(s, b, off, end); /* too many commands in flight */
            break;
        }
        n = smtp_client_parse(&m->cp, b->data + off, end - off, &ev);
        if (ev.type == SMTP_EV_AGAIN) {
            rc = dialog_carry(s, b->data + off, end - off);
            break;
        }
        if (ev.type == SMTP_EV_WAIT) {
            /* Stop reading only if the client already sent more: after a
             * lone DATA it usually waits for the 354 itself. */
            if (off < end)
                dialog_hold(s, b, off, end);
            break;
        }
        (void)smtp_pairs_on_client_event(&m->pp, &ev, now); /* room was checked */
        bool forward = session_smtp_intercept(s, &ev);
        if (forward && ev.fwd_len > 0)
            rc = dialog_out_add(s, b, &out, ev.fwd, ev.fwd_len);
        off += n;
        session_smtp_client_event(s, &ev);
        if (m->d.held == NULL && session_smtp_hs_busy(s)) {
            /* mxproxy's own exchange with the backend first: the rest waits. */
            if (rc == 0)
                rc = dialog_out_flush(s, b, &out);
            dialog_hold(s, b, off, end);
            break;
        }
        session_smtp_answer_locals(s);
        if (m->d.flags & DIALOG_F_SWITCHED) {
            /* Plaintext after STARTTLS in this read is never parsed inside TLS. */
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
static void session_smtp_on_client_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_smtp *m = SMTP_M(s);

    if (m->d.flags & DIALOG_F_OPAQUE) {
        uv_buf_t buf = uv_buf_init(b->data, (unsigned)len);
        (void)relay_send(d, b, &buf, 1); /* a failure closes through on_event */
    } else {
        session_smtp_client_bytes(s, b, 0, len);
    }
    dialog_carry_done(s);
    relay_block_unref(d->pool, b);
}

/* A reply may let held client bytes be parsed again. */
static void session_smtp_resume_client(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    size_t off, end;

    if (m->d.held == NULL || session_smtp_hs_busy(s))
        return; /* nothing held, or mxproxy's exchange with the backend comes first */
    if (m->d.flags & DIALOG_F_DRAIN)
        return; /* draining: nothing more the client said reaches the backend */
    struct relay_block *b = dialog_take_held(s, &off, &end);
    session_smtp_client_bytes(s, b, off, end);
    relay_block_unref(s->up.pool, b);
    dialog_release(s);
}

/* The client got "220 Ready to start TLS": everything it sends from now on
 * is TLS. */
static void session_smtp_start_client_tls(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (!dialog_start_client_tls(s))
        return;
    /* RFC 3207: forget what the client said in plaintext. */
    m->d.flags |= SESSION_SMTP_F_HELO_DUE;
    smtp_client_init(&m->cp, &(struct smtp_client_opts){
                                 .max_line_length = s->cl->max_line_length,
                                 .smuggling = session_smtp_smuggling(s->cl),
                             });
    dialog_log_injection(s);
}

/* Answers, in order, the lines mxproxy refused itself. An answer may end the
 * parser's wait (DATA, AUTH, XCLIENT) or free a FIFO slot: the client bytes
 * held meanwhile are parsed again, after the answers, so that no pipelined
 * command is left unparsed behind a local answer. */
static void session_smtp_answer_locals(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_pair p;
    char text[SMTP_REPLY_TEXT_MAX + 32];
    bool answered = false;

    while (!session_closing(s) && smtp_pairs_take_local(&m->pp, session_smtp_now(), &p)) {
        if (p.local == SMTP_LOCAL_EHLO) {
            session_smtp_say_caps(s, &p);
        } else {
            snprintf(text, sizeof(text), "%d %s %.*s", p.code, p.esc, (int)p.text_len, p.text);
            dialog_say(s, text);
        }
        session_smtp_log_pair(s, &p);
        /* A refused DATA or AUTH ends the parser's wait for the reply. */
        smtp_client_on_reply(&m->cp, p.cmd, p.code);
        answered = true;
        if (p.local == SMTP_LOCAL_STARTTLS) {
            session_smtp_start_client_tls(s);
            return;
        }
        if (p.local == SMTP_LOCAL_STARTTLS_IN_TX)
            dialog_log_injection(s); /* no TLS: what followed STARTTLS stays dropped */
        if (p.local == SMTP_LOCAL_SMUGGLING) {
            dialog_say(s, "421 4.7.0 mxproxy: closing connection after a smuggling attempt");
            m->d.flags |= DIALOG_F_ENDING;
            dialog_close_after_flush(s, SESSION_END_SMUGGLING, "smuggling");
            return;
        }
    }
    if (answered)
        session_smtp_resume_client(s);
}

/* ---- backend side --------------------------------------------------------------------- */

/* Remembers the HELO/EHLO name given so far (passthrough: the only one seen). */
static void session_smtp_keep_helo(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    const char *helo = smtp_pairs_summary(&m->pp)->helo;

    free(m->helo_before_tls);
    m->helo_before_tls = helo[0] != '\0' ? strdup(helo) : NULL;
}

static void session_smtp_on_reply(struct session *s, const struct smtp_reply *r)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_pair p;

    if (smtp_pairs_oldest(&m->pp) == SMTP_CMD_STARTTLS && r->code / 100 == 2)
        session_smtp_keep_helo(s); /* the reply forgets it; a passthrough close line names it */
    enum smtp_pairs_res res = smtp_pairs_on_reply(&m->pp, r, &p);
    session_smtp_note_helo(s, res, &p);
    smtp_client_on_reply(&m->cp, p.cmd, p.code);
    if (res != SMTP_PAIRS_INTERMEDIATE)
        session_smtp_log_pair(s, &p);
    if (p.cmd == SMTP_CMD_STARTTLS && res == SMTP_PAIRS_MATCHED) {
        dialog_log_injection(s);
        if (p.code >= 200 && p.code < 300)
            dialog_go_opaque(s, "starttls_passthrough");
    }
    /* The reply goes out with the rest of the read (dialog_say and
     * dialog_close_after_flush send it before anything of mxproxy's own). */
    session_smtp_resume_client(s);
    session_smtp_answer_locals(s);
    session_smtp_fifo_detach(s);
    session_smtp_drain_answered(s);
}

/* The backend is gone or unusable: the oldest outstanding command gets
 * reply ("NNN X.Y.Z text", one line without CRLF) instead of a bare EOF, the others are
 * logged as never answered, and the session closes once the client has it. */
static void session_smtp_abort(struct session *s, const char *reply, enum session_end end,
                               const char *error)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_pair p;
    bool first = true;

    dialog_stop(s); /* a reply the backend left unfinished: the 421 replaces it */
    while (smtp_pairs_abort(&m->pp, &p)) {
        if (first) {
            dialog_say(s, reply);
            p.kind = SMTP_PAIR_LOCAL;
            p.code = (reply[0] - '0') * 100 + (reply[1] - '0') * 10 + (reply[2] - '0');
            snprintf(p.esc, sizeof(p.esc), "%.5s", reply + 4);
            p.text_len = (size_t)snprintf(p.text, sizeof(p.text), "%s", reply + 10);
            p.lines = 1;
            p.t_reply = session_smtp_now();
            if (!smtp_pairs_summary(&m->pp)->has_primary && m->primary == NULL)
                m->primary = reply;
            first = false;
        }
        session_smtp_log_pair(s, &p);
    }
    if (first && !smtp_pairs_summary(&m->pp)->has_primary && m->primary == NULL &&
        end == SESSION_END_TLS_ERROR) {
        dialog_say(s, reply); /* nothing outstanding: the client still learns why */
        m->primary = reply;
    }
    dialog_close_after_flush(s, end, error);
}

/* relay on_data for the backend direction: bytes go to the client as they
 * are; replies are matched on the way. */
/* Appends backend bytes to the EHLO reply being gathered. Returns false
 * when it grows past SESSION_SMTP_EHLO_MAX. */
static bool session_smtp_gather(struct session *s, const char *p, size_t n)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->ehlo == NULL) {
        m->ehlo = malloc(SESSION_SMTP_EHLO_MAX);
        if (m->ehlo == NULL)
            return false;
    }
    if (m->ehlo_len + n > SESSION_SMTP_EHLO_MAX)
        return false;
    memcpy(m->ehlo + m->ehlo_len, p, n);
    m->ehlo_len += n;
    return true;
}

/* Sends the gathered EHLO reply to the client, with STARTTLS offered before
 * TLS and withdrawn after it, XCLIENT and XFORWARD withdrawn (as it is, if it
 * cannot be rewritten). A reply to HELO is gathered too, only to be kept,
 * and goes out as it came. */
static void session_smtp_send_ehlo(struct session *s, int code)
{
    struct session_smtp *m = SMTP_M(s);
    char out[SESSION_SMTP_EHLO_MAX + 32];
    ssize_t n = -1;
    enum smtp_cmd cmd = smtp_pairs_oldest(&m->pp);
    unsigned edit = 0;

    dialog_flush_down(s);
    if (code == 250 && s->cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS) {
        session_smtp_keep_caps(s, cmd);
        edit |= session_smtp_tls_active(s) ? SMTP_EHLO_DEL_STARTTLS : SMTP_EHLO_ADD_STARTTLS;
    }
    if (code == 250 && !s->cl->pass_client_xclient)
        edit |= SMTP_EHLO_DEL_XCLIENT; /* only mxproxy tells the backend who the client is */
    if (edit != 0 && cmd == SMTP_CMD_EHLO)
        n = smtp_ehlo_edit(m->ehlo, m->ehlo_len, edit, out, sizeof(out));
    if (n >= 0)
        (void)relay_send_copy(&s->down, out, (size_t)n);
    else
        (void)relay_send_copy(&s->down, m->ehlo, m->ehlo_len);
    /* Every EHLO reply is gathered now: an idle session keeps no buffer for it. */
    free(m->ehlo);
    m->ehlo = NULL;
    m->ehlo_len = 0;
}

/* backend_tls = starttls went wrong: say why, then 421 4.7.0 to the client. */
static void session_smtp_backend_starttls_failed(struct session *s, const char *reason)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "tls_error");
    log_sid(&l, s->id);
    log_str(&l, "side", "backend");
    log_str(&l, "reason", reason);
    log_end(&l);
    session_smtp_backend_tls_failed(s, reason);
}

/* xclient = on went wrong: the backend is never left acting for a client it
 * was not told about. Logs why (with the backend's reply r, if there is
 * one), resets the backend connection and answers the client 421 4.7.0. */
static void session_smtp_xclient_failed(struct session *s, const char *reason,
                                        const struct smtp_reply *r)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "xclient_error");
    log_sid(&l, s->id);
    log_str(&l, "reason", reason);
    if (r != NULL) {
        log_uint(&l, "code", (uint64_t)r->code);
        log_strn(&l, "reply", r->text, r->text_len);
    }
    log_end(&l);
    session_drop_backend(s);
    session_smtp_abort(s, "421 4.7.0 mxproxy: XCLIENT with the mail server failed, try again later",
                       SESSION_END_XCLIENT_ERROR, reason);
}

/* The exchange failed in state hs: TLS or XCLIENT, whichever it was for. */
static void session_smtp_hs_failed(struct session *s, const char *reason,
                                   const struct smtp_reply *r)
{
    enum session_smtp_hs hs = SMTP_M(s)->hs;
    bool tls = hs == SESSION_SMTP_HS_STARTTLS || hs == SESSION_SMTP_HS_HANDSHAKE ||
               (hs == SESSION_SMTP_HS_EHLO && s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS);

    if (tls)
        session_smtp_backend_starttls_failed(s, reason);
    else
        session_smtp_xclient_failed(s, reason, r);
}

static const char *session_smtp_hs_name(enum session_smtp_hs hs)
{
    static const char *const names[] = {
        [SESSION_SMTP_HS_IDLE] = "idle",           [SESSION_SMTP_HS_GREETING] = "greeting",
        [SESSION_SMTP_HS_EHLO] = "ehlo",           [SESSION_SMTP_HS_STARTTLS] = "starttls",
        [SESSION_SMTP_HS_HANDSHAKE] = "handshake", [SESSION_SMTP_HS_TLS_EHLO] = "tls_ehlo",
        [SESSION_SMTP_HS_XCLIENT] = "xclient",     [SESSION_SMTP_HS_DONE] = "done",
    };
    return names[hs];
}

/* Does this listener make mxproxy talk to the backend before the client? */
static bool session_smtp_hs_wanted(const struct session *s)
{
    return s->cl->xclient || s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS;
}

/* The state after hs, once hs got what it waited for. */
static enum session_smtp_hs session_smtp_hs_next(const struct session *s, enum session_smtp_hs hs)
{
    bool tls = s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS;

    switch (hs) {
    case SESSION_SMTP_HS_IDLE:
        return SMTP_M(s)->pp.greeted ? SESSION_SMTP_HS_EHLO : SESSION_SMTP_HS_GREETING;
    case SESSION_SMTP_HS_GREETING:
        return SESSION_SMTP_HS_EHLO;
    case SESSION_SMTP_HS_EHLO:
        return tls ? SESSION_SMTP_HS_STARTTLS : SESSION_SMTP_HS_XCLIENT;
    case SESSION_SMTP_HS_STARTTLS:
        return SESSION_SMTP_HS_HANDSHAKE;
    case SESSION_SMTP_HS_HANDSHAKE:
        /* RFC 3207: what the backend offered before TLS no longer counts. */
        return s->cl->xclient ? SESSION_SMTP_HS_TLS_EHLO : SESSION_SMTP_HS_DONE;
    case SESSION_SMTP_HS_TLS_EHLO:
        return SESSION_SMTP_HS_XCLIENT;
    case SESSION_SMTP_HS_XCLIENT:
        return SMTP_M(s)->xtodo != 0 ? SESSION_SMTP_HS_XCLIENT : SESSION_SMTP_HS_DONE;
    case SESSION_SMTP_HS_DONE:
        break;
    }
    abort();
}

/* Sends mxproxy's EHLO, with the client's HELO/EHLO name when it gave one. */
static void session_smtp_hs_send_ehlo(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    char line[SMTP_PAIRS_NAME_MAX + 16];
    int n = 0;

    if (m->replay_arg_len > 0 && m->replay_arg_len <= SMTP_PAIRS_NAME_MAX)
        n = snprintf(line, sizeof(line), "EHLO %.*s\r\n", (int)m->replay_arg_len,
                     m->replay + m->replay_arg);
    else
        n = snprintf(line, sizeof(line), "EHLO mxproxy\r\n");
    m->hs_caps = 0;
    dialog_send_backend(s, line, (size_t)n);
}

/* Sends the next XCLIENT line; false when none could be made. */
static bool session_smtp_send_xclient(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    struct sockaddr_storage dst;
    char line[XCLIENT_LINE_MAX + 1];
    char helo[XCLIENT_LINE_MAX + 1];

    session_client_dst(s, &dst);
    /* The whole name, not the summary's cut copy; one too long for any line
     * would be [UNAVAILABLE] anyway. */
    size_t hl = m->replay_arg_len < sizeof(helo) ? m->replay_arg_len : 0;
    memcpy(helo, m->replay + m->replay_arg, hl);
    helo[hl] = '\0';
    struct xclient_info info = {
        .addr = (const struct sockaddr *)&s->client_sa,
        .destaddr = dst.ss_family != AF_UNSPEC ? (const struct sockaddr *)&dst : NULL,
        .helo = hl > 0 ? helo : NULL, /* NULL: [UNAVAILABLE] */
        .proto = m->replay_cmd == SMTP_CMD_EHLO   ? XCLIENT_PROTO_ESMTP
                 : m->replay_cmd == SMTP_CMD_HELO ? XCLIENT_PROTO_SMTP
                                                  : XCLIENT_PROTO_NONE,
    };
    int n = xclient_format(line, sizeof(line), &m->xtodo, &info);
    if (n <= 0) {
        m->xtodo = 0;
        return false;
    }
    dialog_send_backend(s, line, (size_t)n);
    return true;
}

/* Enters state next and does what it names: sends its line, starts TLS, or
 * (DONE) sends the client's command and lets the client's bytes flow. */
static void session_smtp_hs_enter(struct session *s, enum session_smtp_hs next)
{
    struct session_smtp *m = SMTP_M(s);
    struct log_line l;

    if (log_enabled(LOG_DEBUG)) {
        log_begin(&l, LOG_DEBUG, "backend_handshake");
        log_sid(&l, s->id);
        log_str(&l, "from", session_smtp_hs_name(m->hs));
        log_str(&l, "to", session_smtp_hs_name(next));
        log_end(&l);
    }
    m->hs = next;
    switch (next) {
    case SESSION_SMTP_HS_GREETING:
        return; /* session_smtp_on_backend_data moves on after the greeting */
    case SESSION_SMTP_HS_EHLO:
    case SESSION_SMTP_HS_TLS_EHLO:
        session_smtp_hs_send_ehlo(s);
        return;
    case SESSION_SMTP_HS_STARTTLS:
        dialog_send_backend(s, "STARTTLS\r\n", 10);
        return;
    case SESSION_SMTP_HS_HANDSHAKE: {
        const char *why = NULL;
        if (!dialog_start_backend_tls(s, &why) && why != NULL)
            session_smtp_backend_starttls_failed(s, why);
        return; /* session_smtp_backend_tls_ready moves on */
    }
    case SESSION_SMTP_HS_XCLIENT:
        if (!session_smtp_send_xclient(s))
            session_smtp_xclient_failed(s, "no XCLIENT attribute to send", NULL);
        return;
    case SESSION_SMTP_HS_DONE:
        /* The client's command, never logged again here (it may be AUTH with
         * credentials); its reply is the client's. */
        (void)relay_send_copy(&s->up, m->replay, m->replay_len);
        free(m->replay);
        m->replay = NULL;
        free(m->hs_line);
        m->hs_line = NULL;
        session_smtp_resume_client(s);
        return;
    case SESSION_SMTP_HS_IDLE:
        break;
    }
    abort();
}

/* The client's first command (ev, just recorded in the FIFO and not
 * forwarded) starts mxproxy's exchange with the backend; the command is kept
 * to be sent at its end. */
static void session_smtp_hs_start(struct session *s, const struct smtp_event *ev)
{
    struct session_smtp *m = SMTP_M(s);

    m->replay = malloc(ev->fwd_len);
    m->hs_line = malloc(SESSION_SMTP_HS_LINE_MAX);
    if (m->replay == NULL || m->hs_line == NULL) {
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return;
    }
    memcpy(m->replay, ev->fwd, ev->fwd_len);
    m->replay_len = ev->fwd_len;
    m->replay_cmd = ev->cmd;
    if ((ev->cmd == SMTP_CMD_EHLO || ev->cmd == SMTP_CMD_HELO) && ev->arg != NULL) {
        m->replay_arg = (size_t)(ev->arg - ev->fwd); /* ev->arg points into ev->fwd */
        m->replay_arg_len = ev->arg_len;
    }
    session_smtp_hs_enter(s, session_smtp_hs_next(s, SESSION_SMTP_HS_IDLE));
}

/* One line of an own reply is complete in hs_line: notes what it offers.
 * The first line names the server; capabilities follow. */
static void session_smtp_hs_line(struct session_smtp *m)
{
    const char *p = m->hs_line;
    size_t n = m->hs_line_len;
    unsigned caps = 0;

    if (m->hs_lines++ == 0 || (m->d.flags & SESSION_SMTP_F_HS_CUT))
        return;
    if (smtp_ehlo_line_is(p, n, "STARTTLS"))
        m->hs_caps |= SESSION_SMTP_CAP_STARTTLS;
    else if (n > 4 && xclient_ehlo_line_caps(p, n, &caps))
        m->hs_caps |= SESSION_SMTP_CAP_XCLIENT | caps;
}

/* Reads n bytes of an own reply, line by line: nothing is kept but the line
 * being read (up to SESSION_SMTP_HS_LINE_MAX bytes; a longer one offers
 * nothing). Returns false when the reply grows past SESSION_SMTP_HS_REPLY_MAX. */
static bool session_smtp_hs_scan(struct session *s, const char *p, size_t n)
{
    struct session_smtp *m = SMTP_M(s);

    m->hs_bytes += n;
    if (m->hs_bytes > SESSION_SMTP_HS_REPLY_MAX)
        return false;
    while (n > 0) {
        const char *lf = memchr(p, '\n', n);
        size_t take = lf != NULL ? (size_t)(lf - p) + 1 : n;
        size_t room = SESSION_SMTP_HS_LINE_MAX - m->hs_line_len;

        if (take > room)
            m->d.flags |= SESSION_SMTP_F_HS_CUT;
        else
            memcpy(m->hs_line + m->hs_line_len, p, take);
        m->hs_line_len += take <= room ? take : 0;
        if (lf != NULL) {
            session_smtp_hs_line(m);
            m->hs_line_len = 0;
            m->d.flags &= ~SESSION_SMTP_F_HS_CUT;
        }
        p += take;
        n -= take;
    }
    return true;
}

/* A reply to mxproxy's EHLO when XCLIENT comes next: it must offer XCLIENT
 * with ADDR. */
static void session_smtp_xclient_offer(struct session *s, const struct smtp_reply *r, unsigned caps)
{
    struct session_smtp *m = SMTP_M(s);

    if (r->code != 250) {
        session_smtp_xclient_failed(s, "backend refused EHLO", r);
        return;
    }
    if (!(caps & SESSION_SMTP_CAP_XCLIENT) || !(caps & XCLIENT_F_ADDR)) {
        session_smtp_xclient_failed(s, "backend does not offer XCLIENT", NULL);
        return;
    }
    /* NAME and REVERSE_NAME too, as [UNAVAILABLE] (mxproxy looks up no
     * names): else the backend keeps those of mxproxy's own address. */
    m->xtodo =
        caps & (XCLIENT_F_ADDR | XCLIENT_F_PORT | XCLIENT_F_PROTO | XCLIENT_F_HELO |
                XCLIENT_F_NAME | XCLIENT_F_REVERSE_NAME | XCLIENT_F_DESTADDR | XCLIENT_F_DESTPORT);
    session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
}

/* One complete reply of mxproxy's own exchange with the backend (its bytes
 * went through session_smtp_hs_scan); it is never forwarded nor paired. */
static void session_smtp_hs_step(struct session *s, const struct smtp_reply *r)
{
    struct session_smtp *m = SMTP_M(s);
    unsigned caps = m->hs_caps;
    struct log_line l;

    m->hs_lines = 0;
    m->hs_bytes = 0;
    switch (m->hs) {
    case SESSION_SMTP_HS_EHLO:
        if (s->cl->backend_tls == CONFIG_BACKEND_TLS_STARTTLS) {
            if (r->code != 250 || !(caps & SESSION_SMTP_CAP_STARTTLS)) {
                session_smtp_backend_starttls_failed(s, "backend does not offer STARTTLS");
                return;
            }
            session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
            return;
        }
        session_smtp_xclient_offer(s, r, caps);
        return;
    case SESSION_SMTP_HS_TLS_EHLO:
        session_smtp_xclient_offer(s, r, caps);
        return;
    case SESSION_SMTP_HS_STARTTLS:
        if (r->code != 220) {
            session_smtp_backend_starttls_failed(s, "backend refused STARTTLS");
            return;
        }
        session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
        return;
    case SESSION_SMTP_HS_XCLIENT:
        if (r->code / 100 != 2) {
            session_smtp_xclient_failed(s, "backend refused XCLIENT", r);
            return;
        }
        if (m->xtodo == 0 && log_enabled(LOG_INFO)) {
            log_begin(&l, LOG_INFO, "xclient");
            log_sid(&l, s->id);
            log_uint(&l, "code", (uint64_t)r->code);
            log_end(&l);
        }
        session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
        return;
    default:
        abort(); /* only the states above wait for a reply */
    }
}

static void session_smtp_backend_tls_ready(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->hs != SESSION_SMTP_HS_HANDSHAKE)
        return;
    session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
}

/* True when the backend's replies are mxproxy's own now. */
static bool session_smtp_hs_own(const struct session *s)
{
    enum session_smtp_hs hs = SMTP_M(s)->hs;

    return hs == SESSION_SMTP_HS_EHLO || hs == SESSION_SMTP_HS_STARTTLS ||
           hs == SESSION_SMTP_HS_TLS_EHLO || hs == SESSION_SMTP_HS_XCLIENT;
}

/* The backend broke the protocol: a line that is no reply (text is its
 * start), or a reply longer than SESSION_SMTP_REPLY_MAX (text NULL). Replies
 * can no longer be matched to commands: the whole replies before it go out,
 * nothing after them, and the client gets 421. */
static void session_smtp_backend_broke(struct session *s, const char *text, size_t text_len)
{
    if (log_enabled(LOG_WARN)) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "backend_garbage");
        log_sid(&l, s->id);
        if (text != NULL) {
            log_strn(&l, "text", text, text_len);
        } else {
            log_str(&l, "reason", "reply too long");
            log_uint(&l, "limit", SESSION_SMTP_REPLY_MAX);
        }
        log_end(&l);
    }
    dialog_flush_down(s);
    dialog_drop_tail(s);
    session_drop_backend(s);
    session_smtp_abort(s, "421 4.4.2 mxproxy: backend protocol error", session_backend_gone_end(s),
                       text != NULL ? "backend sent a line that is not an SMTP reply"
                                    : "backend sent a reply over 65536 bytes");
}

static_assert(SESSION_SMTP_REPLY_MAX == 65536, "the error text above names the limit");

/* relay on_data for the backend direction: replies go to the client as they
 * are, each once whole (the start of one that is not is held until it is);
 * they are matched to commands on the way. */
static void session_smtp_on_backend_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_smtp *m = SMTP_M(s);
    uint64_t now = session_smtp_now();
    size_t off = 0;

    m->d.down = b;
    m->d.down_start = 0;
    m->d.down_end = 0;
    while (off < len && !(m->d.flags & DIALOG_F_OPAQUE) && !session_ending(s)) {
        struct smtp_server_event ev;
        size_t at = off; /* where this reply, or the rest of a held one, begins */
        size_t n = smtp_server_parse(&m->sp, b->data + off, len - off, now, &ev);
        bool own = session_smtp_hs_own(s);
        enum smtp_cmd oldest = smtp_pairs_oldest(&m->pp);
        bool ehlo = oldest == SMTP_CMD_EHLO || oldest == SMTP_CMD_HELO;
        bool gather = !own && ((s->cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS && ehlo) ||
                               (oldest == SMTP_CMD_EHLO && !s->cl->pass_client_xclient));

        if (dialog_logs_lines(s))
            dialog_server_lines(s, b->data + off, n);
        if (own) {
            /* mxproxy's own reply: read, never forwarded, whatever its size. */
            dialog_flush_down(s); /* earlier replies first */
            m->d.down_start = m->d.down_end = off + n;
            if (!session_smtp_hs_scan(s, b->data + off, n)) {
                m->d.down_start = m->d.down_end = len;
                session_smtp_hs_failed(s, "backend reply too long", NULL);
                break;
            }
        } else if (gather) {
            dialog_flush_down(s); /* earlier replies first */
            if (!session_smtp_gather(s, b->data + off, n)) {
                /* Too long to rewrite: what was gathered goes out as it came,
                 * with the rest of the reply once that is whole. */
                if (!dialog_keep_tail(s, m->ehlo, m->ehlo_len)) {
                    session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
                    break;
                }
                m->ehlo_len = 0;
                m->d.down_start = off;
                gather = false;
            } else {
                m->d.down_start = off + n;
            }
        }
        off += n;
        m->rsize += n;
        if (m->rsize > SESSION_SMTP_REPLY_MAX) {
            m->d.down_end = at;
            session_smtp_backend_broke(s, NULL, 0);
            break;
        }
        if (ev.type == SMTP_SEV_AGAIN) {
            /* The reply is not whole yet (it ends the read): its start waits
             * for the rest, unless it is being gathered. */
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
        m->d.down_end = off;
        if (ev.type == SMTP_SEV_REPLY) {
            if (m->d.tail_len > 0 && own)
                dialog_drop_tail(s);
            else if (m->d.tail_len > 0)
                dialog_send_tail(s); /* this reply's start, held from earlier reads */
            if (own) {
                session_smtp_hs_step(s, ev.reply);
                /* Nothing may follow it before our next line: anything that
                 * does is neither ours nor the client's. */
                m->d.down_start = m->d.down_end = len;
                break;
            }
            if (gather)
                session_smtp_send_ehlo(s, ev.reply->code);
            session_smtp_on_reply(s, ev.reply);
            if (m->hs == SESSION_SMTP_HS_GREETING && m->pp.greeted && !session_closing(s) &&
                !(m->d.flags & DIALOG_F_ENDING))
                session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
        } else if (ev.type == SMTP_SEV_GARBAGE) {
            /* The bad line, and a reply it cut short, never reach the client. */
            m->d.down_end = at;
            session_smtp_backend_broke(s, ev.reply->text, ev.reply->text_len);
            break;
        }
    }
    if (m->d.down_end < len && (m->d.flags & DIALOG_F_OPAQUE))
        m->d.down_end = len; /* after STARTTLS passthrough the rest is TLS: forward it too */
    if (!session_closing(s))
        dialog_flush_down(s);
    m->d.down = NULL;
    relay_block_unref(d->pool, b);
}

static void session_smtp_on_backend_eof(struct session *s)
{
    if (session_smtp_hs_own(s) || SMTP_M(s)->hs == SESSION_SMTP_HS_HANDSHAKE) {
        session_smtp_hs_failed(s, "backend closed the connection", NULL);
        return;
    }
    session_smtp_abort(s, SMTP_SAY(backend_gone), session_backend_gone_end(s), NULL);
}

static void session_smtp_on_backend_reset(struct session *s, enum session_end end,
                                          const char *error)
{
    if (session_smtp_hs_own(s) || SMTP_M(s)->hs == SESSION_SMTP_HS_HANDSHAKE) {
        session_smtp_hs_failed(s, "backend reset the connection", NULL);
        return;
    }
    session_smtp_abort(s, SMTP_SAY(backend_gone), end, error);
}

static bool session_smtp_opaque(const struct session *s)
{
    return (SMTP_M(s)->d.flags & DIALOG_F_OPAQUE) != 0;
}

static void session_smtp_backend_tls_failed(struct session *s, const char *reason)
{
    session_drop_backend(s);
    /* Never a plaintext downgrade: whoever waits gets 421, once. */
    session_smtp_abort(s, SMTP_SAY(backend_tls), SESSION_END_TLS_ERROR, reason);
}

/* ---- session hooks ------------------------------------------------------------------- */

static int session_smtp_new(struct session *s)
{
    struct smtp_client_opts opts = {
        .max_line_length = s->cl->max_line_length,
        .smuggling = s->cl->smuggling == CONFIG_SMUGGLING_NORMALIZE ? SMTP_SMUGGLING_NORMALIZE
                     : s->cl->smuggling == CONFIG_SMUGGLING_OFF     ? SMTP_SMUGGLING_OFF
                                                                    : SMTP_SMUGGLING_REJECT,
    };
    struct session_smtp *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return UV_ENOMEM;
    smtp_client_init(&m->cp, &opts);
    m->d.dialect = &session_smtp_dialect;
    s->proto_state = m;
    return 0;
}

static void session_smtp_free(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (m == NULL)
        return;
    if (m->d.fifo != NULL) {
        struct smtp_pair p;
        while (smtp_pairs_abort(&m->pp, &p))
            ; /* empty it, so detach gives the storage back */
        session_smtp_fifo_detach(s);
    }
    dialog_free(s);
    free(m->ehlo);
    free(m->replay);
    free(m->helo_before_tls);
    free(m->hs_line);
    free(m->caps);
    free(m);
    s->proto_state = NULL;
}

static void session_smtp_on_connected(struct session *s)
{
    s->up.on_data = session_smtp_on_client_data;
    s->down.on_data = session_smtp_on_backend_data;
    s->down.flags |= RELAY_F_NO_FIN; /* on backend EOF, answer outstanding commands first */
}

static void session_smtp_connect_failed(struct session *s, const char *why)
{
    (void)why;
    const char *reply = SMTP_SAY(unavailable);
    struct smtp_pair p;

    /* A client that talked before a greeting that never came: its
     * commands were never answered. */
    while (smtp_pairs_abort(&SMTP_M(s)->pp, &p))
        session_smtp_log_pair(s, &p);
    dialog_say(s, reply);
    SMTP_M(s)->primary = reply;
}

static bool session_smtp_greeted(const struct session *s)
{
    return SMTP_M(s)->pp.greeted;
}

static void session_smtp_local_error(struct session *s, const char *why)
{
    (void)why;
    const char *reply = SMTP_SAY(local_error);
    struct smtp_pair p;

    /* As for a failed connect: commands sent before the greeting never came
     * are logged aborted. */
    while (smtp_pairs_abort(&SMTP_M(s)->pp, &p))
        session_smtp_log_pair(s, &p);
    dialog_say(s, reply);
    SMTP_M(s)->primary = reply;
}

static void session_smtp_goodbye(struct session *s, enum session_end end)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->d.flags & DIALOG_F_OPAQUE)
        return; /* the client speaks TLS to the backend: a plaintext reply would be noise */
    dialog_drop_tail(s); /* never glued to the start of an unfinished reply */
    dialog_say(s, end == SESSION_END_IDLE_TIMEOUT ? SMTP_SAY(idle) : SMTP_SAY(drain));
    m->d.flags |= DIALOG_F_ENDING;
}

static void session_smtp_over_limit(struct session *s, const char *reply)
{
    dialog_say(s, reply);
    SMTP_M(s)->primary = reply;
}

/* Replies the backend owes: a BDAT whose chunk is still on its way is owed
 * bytes by the client instead, and the backend answers it only once they
 * are all in. */
static size_t session_smtp_owed(const struct session_smtp *m)
{
    size_t n = smtp_pairs_outstanding(&m->pp);

    if (n > 0 && (m->d.flags & SESSION_SMTP_F_IN_CHUNK))
        n--;
    return n;
}

/* Logs the BDAT whose chunk will never be complete as aborted=1 (the 421
 * that follows is its answer, and the backend discards the chunk). */
static void session_smtp_drop_chunk(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_pair p;

    if (!(m->d.flags & SESSION_SMTP_F_IN_CHUNK))
        return;
    while (smtp_pairs_abort(&m->pp, &p))
        session_smtp_log_pair(s, &p);
}

static bool session_smtp_drain_wait(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (m->d.flags & (DIALOG_F_OPAQUE | DIALOG_F_ENDING))
        return false;
    if (session_smtp_owed(m) == 0) {
        session_smtp_drop_chunk(s);
        return false;
    }
    m->d.flags |= DIALOG_F_DRAIN;
    relay_hold(&s->up); /* what the client sends now is answered by the 421, never relayed */
    return true;
}

/* After a reply: a draining session owed nothing more ends now, with the
 * 421 that answers whatever the client sent after the deadline. */
static void session_smtp_drain_answered(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);

    if (!dialog_drain_due(s, session_smtp_owed(m)))
        return;
    session_smtp_drop_chunk(s);
    if (smtp_pairs_summary(&m->pp)->quit_answered) {
        dialog_close_after_flush(s, SESSION_END_QUIT, NULL); /* 221 said goodbye already */
        return;
    }
    session_smtp_goodbye(s, SESSION_END_DRAIN);
    dialog_close_after_flush(s, SESSION_END_DRAIN, NULL);
}

static void session_smtp_drain_cut(struct session *s)
{
    struct session_smtp *m = SMTP_M(s);
    struct smtp_pair p;
    bool owed = false;

    relay_hold(&s->up);
    /* A reply still owed is never forged: the client sees only the close,
     * as for a dropped connection; a 421 would say the message was refused. */
    while (smtp_pairs_abort(&m->pp, &p)) {
        owed = true;
        session_smtp_log_pair(s, &p);
    }
    if (!owed)
        session_smtp_goodbye(s, SESSION_END_DRAIN);
    m->d.flags |= DIALOG_F_ENDING;
}

static enum session_end session_smtp_end(const struct session *s, enum session_end end)
{
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&SMTP_M(s)->pp);

    if (SMTP_M(s)->d.flags & DIALOG_F_OPAQUE)
        return end; /* a QUIT inside TLS is not seen: mode tcp's reasons */
    if (sum->quit_answered)
        return SESSION_END_QUIT; /* however the sockets closed after the reply */
    if (end == SESSION_END_CLIENT_EOF)
        return sum->quit_sent ? SESSION_END_QUIT : SESSION_END_CLIENT_EOF_WITHOUT_QUIT;
    return end;
}

static void session_smtp_log_close(const struct session *s, struct log_line *l)
{
    const struct session_smtp *m = SMTP_M(s);
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&m->pp);

    if (m->d.flags & DIALOG_F_OPAQUE) {
        /* Only the name given before STARTTLS was seen; transactions, if
         * any, ran inside TLS and were not. */
        log_uint(l, "opaque", 1);
        if (m->helo_before_tls != NULL)
            log_str(l, "helo", m->helo_before_tls);
        return;
    }
    if (sum->helo[0] != '\0')
        log_str(l, "helo", sum->helo);
    if (sum->has_mail_from)
        log_str(l, "mail_from", sum->mail_from);
    log_uint(l, "rcpt_ok", sum->rcpt_ok);
    log_uint(l, "rcpt_rejected", sum->rcpt_rejected);
    log_uint(l, "messages", sum->messages);
    if (sum->has_primary) {
        char primary[SMTP_REPLY_TEXT_MAX + 32];
        const struct smtp_pair *p = &sum->primary;
        int n = snprintf(primary, sizeof(primary), "%d%s%s %.*s", p->code,
                         p->esc[0] != '\0' ? " " : "", p->esc, (int)p->text_len, p->text);
        log_strn(l, "primary_error", primary,
                 (size_t)n < sizeof(primary) ? (size_t)n : sizeof(primary) - 1);
    } else if (m->primary != NULL) {
        log_str(l, "primary_error", m->primary);
    }
}

static void session_smtp_canned(struct session *s, enum proto_say what, const char *why)
{
    switch (what) {
    case PROTO_SAY_UNAVAILABLE:
        session_smtp_connect_failed(s, why);
        return;
    case PROTO_SAY_LOCAL_ERROR:
        session_smtp_local_error(s, why);
        return;
    case PROTO_SAY_LIMIT:
        session_smtp_over_limit(s, SMTP_SAY(limit));
        return;
    case PROTO_SAY_CLIENT_LIMIT:
        session_smtp_over_limit(s, SMTP_SAY(client_limit));
        return;
    case PROTO_SAY_DENIED:
        session_smtp_over_limit(s, SMTP_SAY(denied));
        return;
    case PROTO_SAY_IDLE:
        session_smtp_goodbye(s, SESSION_END_IDLE_TIMEOUT);
        return;
    case PROTO_SAY_DRAIN:
        session_smtp_goodbye(s, SESSION_END_DRAIN);
        return;
    }
    abort();
}

const struct proto proto_smtp = {
    .name = "smtp",
    .open = session_smtp_new,
    .free = session_smtp_free,
    .connected = session_smtp_on_connected,
    .say = session_smtp_canned,
    .backend_eof = session_smtp_on_backend_eof,
    .backend_reset = session_smtp_on_backend_reset,
    .opaque = session_smtp_opaque,
    .backend_tls_ready = session_smtp_backend_tls_ready,
    .backend_tls_failed = session_smtp_backend_tls_failed,
    .greeted = session_smtp_greeted,
    .drain_wait = session_smtp_drain_wait,
    .drain_cut = session_smtp_drain_cut,
    .end = session_smtp_end,
    .log_close = session_smtp_log_close,
};
