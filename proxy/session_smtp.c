/* session_smtp.c: mode smtp, between the relays and the pure parsers. */
#include "session_smtp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "config.h"
#include "log.h"
#include "metrics.h"
#include "proxyproto.h"
#include "relay.h"
#include "session-t.h"
#include "smtp.h"
#include "smtp_pairs.h"
#include "tls.h"
#include "worker.h"

#define SMTP_LINE_LOG_MAX 512 /* transcript=full: bytes of a server line kept */
#define SMTP_FIFO_KEEP 16     /* spare command FIFOs a worker keeps */

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

/* Storage for one session's outstanding commands, lent while any are. */
struct smtp_fifo {
    struct smtp_fifo *next; /* worker free list */
    struct smtp_pairs_entry q[SMTP_PAIRS_CAP];
};

struct session_smtp {
    struct smtp_client cp;       /* client command parser */
    struct smtp_server sp;       /* backend reply parser */
    struct smtp_pairs pp;        /* outstanding commands, summary */
    struct smtp_fifo *fifo;      /* pp's storage while attached, else NULL */
    struct relay_block *held;    /* client bytes not parsed yet (WAIT, FIFO full) */
    size_t held_off, held_end;   /* their range in held->data */
    char *carry;                 /* a partial client line between reads */
    struct relay_block *down;    /* backend bytes parsed but not yet forwarded */
    size_t down_start, down_end; /* their range in down->data */
    uint64_t injected;           /* bytes dropped after STARTTLS, not yet logged */
    unsigned flags;              /* SESSION_SMTP_F_* */
    char *sline;                 /* transcript=full: the server line being read */
    size_t sline_len;            /* bytes in sline (capped at SMTP_LINE_LOG_MAX) */
    const char *primary;         /* a primary error mxproxy made up (static text), or NULL */
    char *ehlo;                  /* an EHLO reply being gathered for rewriting */
    size_t ehlo_len;             /* bytes in ehlo */
    char *replay;                /* the client's first command, sent after the handshake */
    size_t replay_len;           /* bytes in replay */
    enum smtp_cmd replay_cmd;    /* its verb */
    size_t replay_arg;           /* HELO/EHLO: where its name starts in replay */
    size_t replay_arg_len;       /* and its length (0: no name) */
    enum session_smtp_hs hs;     /* mxproxy's own exchange with the backend */
    unsigned hs_caps;            /* what its last EHLO reply offered: SESSION_SMTP_CAP_* */
    char *hs_line;               /* the line of an own reply being read */
    size_t hs_line_len;          /* bytes in hs_line */
    unsigned hs_lines;           /* lines of the own reply read so far */
    uint64_t hs_bytes;           /* bytes of the own reply read so far */
    unsigned xtodo;              /* XCLIENT attributes still to send (XCLIENT_F_*) */
    char *tail;                  /* the start of a backend reply not yet whole, or NULL */
    size_t tail_len, tail_cap;   /* bytes in tail, and its size */
    size_t rsize;                /* bytes of the backend reply in progress, across reads */
    char *helo_before_tls;       /* passthrough: the HELO/EHLO name given before STARTTLS */
    char *caps;                  /* client_tls = starttls: the backend's reply to the client's
                                    EHLO/HELO before TLS, then mxproxy's answer after it */
    size_t caps_len;             /* bytes in caps */
    enum smtp_cmd caps_cmd;      /* the command caps was the backend's reply to */
};

#define SESSION_SMTP_F_OPAQUE 0x01u    /* STARTTLS passed through: bytes are TLS now */
#define SESSION_SMTP_F_ENDING 0x02u    /* a final answer was sent; nothing more is parsed */
#define SESSION_SMTP_F_SLINE_CUT 0x04u /* sline was longer than SMTP_LINE_LOG_MAX */
#define SESSION_SMTP_F_TLS 0x08u       /* client_tls = starttls and the client did STARTTLS */
#define SESSION_SMTP_F_SWITCHED 0x10u  /* TLS began in the middle of a read: drop the rest */
#define SESSION_SMTP_F_DROP_BDAT 0x20u /* the current BDAT was refused: drop its chunk */
#define SESSION_SMTP_F_HS_CUT 0x40u    /* the own reply line being read is over HS_LINE_MAX */
#define SESSION_SMTP_F_QUIT 0x80u      /* QUIT came first and was relayed: nothing else is */
/* The backend accepted an EHLO/HELO from the client's side in its current SMTP session. */
#define SESSION_SMTP_F_IDENTIFIED 0x1000u
#define SESSION_SMTP_F_CAPS_NEW 0x2000u /* caps holds the reply being matched right now */
#define SESSION_SMTP_F_HELO_DUE 0x4000u /* client TLS began; no EHLO/HELO inside it yet */
#define SESSION_SMTP_F_DRAIN 0x400u     /* drain deadline passed: owed replies, then 421 */
#define SESSION_SMTP_F_IN_CHUNK 0x800u  /* a BDAT chunk is on its way: the client owes bytes */

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

static uint64_t session_smtp_now(void)
{
    return uv_hrtime();
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
    struct session_smtp *m = s->smtp;
    struct worker *w = s->w;

    if (m->fifo != NULL)
        return true;
    m->fifo = w->smtp_fifo_free;
    if (m->fifo != NULL) {
        w->smtp_fifo_free = m->fifo->next;
        w->smtp_fifo_n--;
    } else {
        m->fifo = malloc(sizeof(*m->fifo));
        if (m->fifo == NULL)
            return false;
    }
    smtp_pairs_attach(&m->pp, m->fifo->q);
    return true;
}

/* Gives the FIFO back while no command is outstanding, so an idle session
 * costs no FIFO at all. */
static void session_smtp_fifo_detach(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct worker *w = s->w;

    if (m->fifo == NULL || smtp_pairs_detach(&m->pp) == NULL)
        return;
    if (w->smtp_fifo_n >= SMTP_FIFO_KEEP) {
        free(m->fifo);
    } else {
        m->fifo->next = w->smtp_fifo_free;
        w->smtp_fifo_free = m->fifo;
        w->smtp_fifo_n++;
    }
    m->fifo = NULL;
}

void session_smtp_pool_drain(struct worker *w)
{
    while (w->smtp_fifo_free != NULL) {
        struct smtp_fifo *f = w->smtp_fifo_free;
        w->smtp_fifo_free = f->next;
        free(f);
    }
    w->smtp_fifo_n = 0;
}

/* ---- logging ---------------------------------------------------------------------------- */

static bool session_smtp_logs_pairs(const struct session *s)
{
    return s->cl->transcript != CONFIG_TRANSCRIPT_OFF && log_enabled(LOG_INFO);
}

static bool session_smtp_logs_lines(const struct session *s)
{
    return s->cl->transcript == CONFIG_TRANSCRIPT_FULL && log_enabled(LOG_INFO);
}

/* One ev=line for transcript=full; text must never hold credentials. */
static void session_smtp_log_line(const struct session *s, const char *dir, const char *text,
                                  size_t len, bool cut)
{
    struct log_line l;

    log_begin(&l, LOG_INFO, "line");
    log_sid(&l, s->id);
    log_str(&l, "dir", dir);
    log_ms(&l, "at_ms", uv_hrtime() - s->t_accept); /* since the session opened */
    log_strn(&l, "text", text, len);
    if (cut)
        log_uint(&l, "cut", 1);
    log_end(&l);
}

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

static void session_smtp_log_pair(const struct session *s, const struct smtp_pair *p)
{
    struct log_line l;

    session_smtp_count_pair(s, p);
    if (!session_smtp_logs_pairs(s))
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

/* Forwards the backend bytes parsed so far; called before mxproxy writes
 * anything of its own to the client, so the order on the wire is exact. */
static void session_smtp_flush_down(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (m->down == NULL || m->down_end <= m->down_start)
        return;
    uv_buf_t buf =
        uv_buf_init(m->down->data + m->down_start, (unsigned)(m->down_end - m->down_start));
    m->down_start = m->down_end;
    (void)relay_send(&s->down, m->down, &buf, 1); /* a failure closes through on_event */
}

/* Forgets the start of a backend reply that never became whole: it never
 * reaches the client. */
static void session_smtp_drop_tail(struct session *s)
{
    struct session_smtp *m = s->smtp;

    free(m->tail);
    m->tail = NULL;
    m->tail_len = m->tail_cap = 0;
}

/* Holds backend bytes of a reply that is not whole yet (at most
 * SESSION_SMTP_REPLY_MAX in all). Returns false when out of memory. */
static bool session_smtp_keep_tail(struct session *s, const char *p, size_t n)
{
    struct session_smtp *m = s->smtp;

    if (n == 0)
        return true;
    if (m->tail_len + n > m->tail_cap) {
        size_t cap = m->tail_cap > 0 ? m->tail_cap : 512;
        while (cap < m->tail_len + n)
            cap *= 2;
        char *t = realloc(m->tail, cap);
        if (t == NULL)
            return false;
        m->tail = t;
        m->tail_cap = cap;
    }
    memcpy(m->tail + m->tail_len, p, n);
    m->tail_len += n;
    return true;
}

/* The reply whose start is held is whole now: that start goes to the client,
 * before the rest of it. */
static void session_smtp_send_tail(struct session *s)
{
    struct session_smtp *m = s->smtp;

    for (size_t off = 0; off < m->tail_len && !(s->flags & SESSION_F_CLOSING);) {
        size_t n = m->tail_len - off < RELAY_BLOCK_SIZE ? m->tail_len - off : RELAY_BLOCK_SIZE;
        if (relay_send_copy(&s->down, m->tail + off, n) != 0)
            break; /* a failure closes through on_event */
        off += n;
    }
    session_smtp_drop_tail(s);
}

/* Sends a reply of mxproxy's own to the client, after what the backend
 * already said. text is one reply line without CRLF. */
static void session_smtp_say(struct session *s, const char *text)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "%s\r\n", text);

    session_smtp_flush_down(s);
    if (s->flags & SESSION_F_CLOSING)
        return;
    if (session_smtp_logs_lines(s))
        session_smtp_log_line(s, "proxy", text, strlen(text), false);
    (void)relay_send_copy(&s->down, line, (size_t)n); /* a failure closes through on_event */
}

/* Queues client bytes for the backend: gathers contiguous spans so a read
 * becomes one write. */
struct session_smtp_out {
    uv_buf_t bufs[RELAY_SEND_MAX_BUFS];
    unsigned n;
};

static int session_smtp_out_flush(struct session *s, struct relay_block *b,
                                  struct session_smtp_out *o)
{
    int rc = 0;
    if (o->n > 0 && !(s->flags & (SESSION_F_CLOSING | SESSION_F_NO_BACKEND)))
        rc = relay_send(&s->up, b, o->bufs, o->n);
    o->n = 0;
    return rc;
}

static int session_smtp_out_add(struct session *s, struct relay_block *b,
                                struct session_smtp_out *o, const char *p, size_t len)
{
    if (o->n > 0 && o->bufs[o->n - 1].base + o->bufs[o->n - 1].len == p) {
        o->bufs[o->n - 1].len += len;
        return 0;
    }
    if (o->n == RELAY_SEND_MAX_BUFS) {
        int rc = session_smtp_out_flush(s, b, o);
        if (rc != 0)
            return rc;
    }
    o->bufs[o->n++] = uv_buf_init((char *)p, (unsigned)len);
    return 0;
}

/* ---- client side ---------------------------------------------------------------------- */

static void session_smtp_answer_locals(struct session *s);
static void session_smtp_drain_answered(struct session *s);

/* What a client event means beyond forwarding: logs, guard rails. */
static void session_smtp_client_event(struct session *s, const struct smtp_event *ev)
{
    struct session_smtp *m = s->smtp;
    struct log_line l;

    if (ev->type == SMTP_EV_COMMAND && ev->cmd == SMTP_CMD_BDAT &&
        !(ev->flags & SMTP_EV_F_BAD_ARGS))
        m->flags |= SESSION_SMTP_F_IN_CHUNK;
    else if (ev->type == SMTP_EV_BDAT_END)
        m->flags &= ~SESSION_SMTP_F_IN_CHUNK;
    switch (ev->type) {
    case SMTP_EV_COMMAND:
        if (session_smtp_logs_lines(s)) {
            if (ev->cmd == SMTP_CMD_AUTH && (ev->flags & SMTP_EV_F_AUTH_INITIAL)) {
                char redacted[SMTP_PAIRS_TEXT_MAX + 16];
                int n = snprintf(
                    redacted, sizeof(redacted), "%.*s [redacted]",
                    (int)(ev->line_len < SMTP_PAIRS_TEXT_MAX ? ev->line_len : SMTP_PAIRS_TEXT_MAX),
                    ev->line);
                session_smtp_log_line(s, "client", redacted, (size_t)n, false);
            } else {
                session_smtp_log_line(s, "client", ev->line, ev->line_len, false);
            }
        }
        return;
    case SMTP_EV_AUTH_RESPONSE:
        if (session_smtp_logs_lines(s))
            session_smtp_log_line(s, "client", "[redacted]", 10, false);
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
        if (session_smtp_logs_lines(s)) {
            char text[64];
            int n = snprintf(text, sizeof(text), "<message body: %llu bytes>",
                             (unsigned long long)ev->size);
            session_smtp_log_line(s, "client", text, (size_t)n, false);
        }
        return;
    case SMTP_EV_INJECTED:
        m->injected += ev->size;
        return;
    default:
        return;
    }
}

/* Keeps client bytes in b[off, end) until a reply lets the parser go on;
 * reading the client stops meanwhile (bounded: one block). */
static void session_smtp_hold(struct session *s, struct relay_block *b, size_t off, size_t end)
{
    struct session_smtp *m = s->smtp;

    relay_block_ref(b);
    m->held = b;
    m->held_off = off;
    m->held_end = end;
    relay_hold(&s->up);
}

/* Keeps a partial line (at most max_line_length bytes) for the next read. */
static int session_smtp_carry(struct session *s, const char *p, size_t len)
{
    struct session_smtp *m = s->smtp;

    if (len == 0)
        return 0;
    if (m->carry == NULL) {
        m->carry = malloc(s->cl->max_line_length);
        if (m->carry == NULL)
            return UV_ENOMEM;
    }
    memmove(m->carry, p, len); /* p may already point into carry's old copy */
    s->up.carry = m->carry;
    s->up.carry_len = len;
    return 0;
}

static bool session_smtp_tls_active(const struct session *s)
{
    return s->client_tls != NULL;
}

/* True while mxproxy's own exchange with the backend runs: the client's
 * commands wait. */
static bool session_smtp_hs_busy(const struct session *s)
{
    enum session_smtp_hs hs = s->smtp->hs;

    return hs != SESSION_SMTP_HS_IDLE && hs != SESSION_SMTP_HS_DONE;
}

static void session_smtp_log_injection(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct log_line l;

    if (m->injected > 0 && log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "starttls_injection");
        log_sid(&l, s->id);
        log_uint(&l, "bytes", m->injected);
        log_end(&l);
    }
    m->injected = 0;
}

static void session_smtp_send_backend(struct session *s, const char *line, size_t len)
{
    if (session_smtp_logs_lines(s))
        session_smtp_log_line(s, "proxy", line, len >= 2 ? len - 2 : len, false);
    (void)relay_send_copy(&s->up, line, len); /* a failure closes through on_event */
}

static bool session_smtp_hs_wanted(const struct session *s);
static void session_smtp_hs_start(struct session *s, const struct smtp_event *ev);
/* client_tls = starttls: keeps the backend's accepted reply to the client's
 * EHLO/HELO before TLS (gathered in m->ehlo), for the EHLO/HELO RFC 3207
 * makes the client send again inside TLS. */
static void session_smtp_keep_caps(struct session *s, enum smtp_cmd cmd)
{
    struct session_smtp *m = s->smtp;

    if (session_smtp_tls_active(s) || m->ehlo_len == 0)
        return;
    char *c = realloc(m->caps, m->ehlo_len);
    if (c == NULL)
        return; /* not kept: the EHLO inside TLS goes to the backend */
    memcpy(c, m->ehlo, m->ehlo_len);
    m->caps = c;
    m->caps_len = m->ehlo_len;
    m->caps_cmd = cmd;
    m->flags |= SESSION_SMTP_F_CAPS_NEW;
}

static void session_smtp_drop_caps(struct session *s)
{
    struct session_smtp *m = s->smtp;

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
    struct session_smtp *m = s->smtp;
    bool fresh = (m->flags & SESSION_SMTP_F_CAPS_NEW) != 0;

    m->flags &= ~SESSION_SMTP_F_CAPS_NEW;
    if (res != SMTP_PAIRS_MATCHED ||
        (session_smtp_tls_active(s) && !(m->flags & SESSION_SMTP_F_HELO_DUE)))
        return;
    if ((p->cmd == SMTP_CMD_EHLO || p->cmd == SMTP_CMD_HELO) && p->code / 100 == 2) {
        m->flags |= SESSION_SMTP_F_IDENTIFIED;
        if (!fresh)
            session_smtp_drop_caps(s); /* the reply was too long to keep: none is cached */
    } else if ((p->flags & SMTP_PAIR_F_NEW_SESSION) ||
               (p->cmd == SMTP_CMD_STARTTLS && p->code == 220)) {
        /* The backend starts a new SMTP session: it must hear the next EHLO. */
        m->flags &= ~SESSION_SMTP_F_IDENTIFIED;
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
    struct session_smtp *m = s->smtp;
    char out[SESSION_SMTP_EHLO_MAX + 32];
    ssize_t n = -1;

    if ((m->flags & SESSION_SMTP_F_IDENTIFIED) && m->caps != NULL) {
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
    struct session_smtp *m = s->smtp;
    struct smtp_server sp = {0};
    struct smtp_server_event ev;

    assert(m->caps != NULL); /* made when the command was refused to the backend */
    session_smtp_flush_down(s);
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
    if (!(s->flags & SESSION_F_CLOSING)) {
        if (session_smtp_logs_lines(s)) {
            for (size_t pos = 0, end; pos < m->caps_len; pos = end) {
                end = smtp_line_end(m->caps, pos, m->caps_len);
                size_t n = end - pos;
                while (n > 0 && (m->caps[pos + n - 1] == '\n' || m->caps[pos + n - 1] == '\r'))
                    n--;
                session_smtp_log_line(s, "proxy", m->caps + pos, n, false);
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
    struct session_smtp *m = s->smtp;
    const struct config_listener *cl = s->cl;

    if (ev->type == SMTP_EV_BDAT_DATA || ev->type == SMTP_EV_BDAT_END) {
        bool drop = (m->flags & SESSION_SMTP_F_DROP_BDAT) != 0;
        if (ev->type == SMTP_EV_BDAT_END)
            m->flags &= ~SESSION_SMTP_F_DROP_BDAT;
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
            (m->flags & SESSION_SMTP_F_HELO_DUE)) {
            /* RFC 3207 makes the client say EHLO again; the backend, which
             * saw no TLS, already had one and may refuse a second. */
            m->flags &= ~SESSION_SMTP_F_HELO_DUE;
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
        if (cl->require_tls && !session_smtp_tls_active(s) &&
            (ev->cmd == SMTP_CMD_MAIL || ev->cmd == SMTP_CMD_RCPT || ev->cmd == SMTP_CMD_DATA ||
             ev->cmd == SMTP_CMD_AUTH || ev->cmd == SMTP_CMD_BDAT)) {
            (void)smtp_pairs_answer_locally(&m->pp, SMTP_LOCAL_NEED_TLS);
            if (ev->cmd == SMTP_CMD_BDAT)
                m->flags |= SESSION_SMTP_F_DROP_BDAT;
            return false;
        }
    }
    if (m->hs == SESSION_SMTP_HS_IDLE && session_smtp_hs_wanted(s)) {
        if (m->flags & SESSION_SMTP_F_QUIT) {
            /* After that QUIT: never relayed, 421 when the backend closes. */
            if (ev->cmd == SMTP_CMD_BDAT)
                m->flags |= SESSION_SMTP_F_DROP_BDAT;
            return false;
        }
        if (ev->cmd == SMTP_CMD_QUIT) {
            m->flags |= SESSION_SMTP_F_QUIT;
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
    struct session_smtp *m = s->smtp;
    struct session_smtp_out out = {.n = 0};
    uint64_t now = session_smtp_now();
    int rc = 0;

    /* SWITCHED concerns the read in which the 220 went out. A 220 sent after
     * a backend reply (STARTTLS pipelined behind RSET) left no plaintext
     * behind: these bytes came through TLS and are all commands. */
    m->flags &= ~SESSION_SMTP_F_SWITCHED;
    while (rc == 0 && !(s->flags & (SESSION_F_CLOSING | SESSION_F_FLUSHING)) &&
           !(m->flags & (SESSION_SMTP_F_OPAQUE | SESSION_SMTP_F_ENDING))) {
        struct smtp_event ev;
        size_t n;

        if (!session_smtp_fifo_attach(s)) {
            rc = UV_ENOMEM;
            break;
        }
        if (smtp_pairs_room(&m->pp) == 0) {
            session_smtp_hold(s, b, off, end); /* too many commands in flight */
            break;
        }
        n = smtp_client_parse(&m->cp, b->data + off, end - off, &ev);
        if (ev.type == SMTP_EV_AGAIN) {
            rc = session_smtp_carry(s, b->data + off, end - off);
            break;
        }
        if (ev.type == SMTP_EV_WAIT) {
            /* Stop reading only if the client already sent more: after a
             * lone DATA it usually waits for the 354 itself. */
            if (off < end)
                session_smtp_hold(s, b, off, end);
            break;
        }
        (void)smtp_pairs_on_client_event(&m->pp, &ev, now); /* room was checked */
        bool forward = session_smtp_intercept(s, &ev);
        if (forward && ev.fwd_len > 0)
            rc = session_smtp_out_add(s, b, &out, ev.fwd, ev.fwd_len);
        off += n;
        session_smtp_client_event(s, &ev);
        if (m->held == NULL && session_smtp_hs_busy(s)) {
            /* mxproxy's own exchange with the backend first: the rest waits. */
            if (rc == 0)
                rc = session_smtp_out_flush(s, b, &out);
            session_smtp_hold(s, b, off, end);
            break;
        }
        session_smtp_answer_locals(s);
        if (m->flags & SESSION_SMTP_F_SWITCHED) {
            /* Plaintext after STARTTLS in this read is never parsed inside TLS. */
            m->flags &= ~SESSION_SMTP_F_SWITCHED;
            m->injected += end - off;
            session_smtp_log_injection(s);
            break;
        }
    }
    if (rc == 0)
        rc = session_smtp_out_flush(s, b, &out);
    if (rc == UV_ENOMEM)
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory"); /* FIFO or carry */
}

/* relay on_data for the client direction. */
static void session_smtp_on_client_data(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct session *s = d->owner;
    struct session_smtp *m = s->smtp;

    if (m->flags & SESSION_SMTP_F_OPAQUE) {
        uv_buf_t buf = uv_buf_init(b->data, (unsigned)len);
        (void)relay_send(d, b, &buf, 1); /* a failure closes through on_event */
    } else {
        session_smtp_client_bytes(s, b, 0, len);
    }
    if (m->carry != NULL && s->up.carry_len == 0 && m->held == NULL) {
        /* Lines are whole again: a session waiting for its client keeps no
         * carry buffer, while a client trickling one line reuses the same one. */
        free(m->carry);
        m->carry = NULL;
    }
    relay_block_unref(d->pool, b);
}

/* A reply may let held client bytes be parsed again. */
static void session_smtp_resume_client(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct relay_block *b = m->held;

    if (b == NULL || session_smtp_hs_busy(s))
        return; /* nothing held, or mxproxy's exchange with the backend comes first */
    if (m->flags & SESSION_SMTP_F_DRAIN)
        return; /* draining: nothing more the client said reaches the backend */
    m->held = NULL;
    session_smtp_client_bytes(s, b, m->held_off, m->held_end);
    relay_block_unref(s->up.pool, b);
    if (m->held == NULL && !(s->flags & (SESSION_F_CLOSING | SESSION_F_FLUSHING))) {
        int rc = relay_release(&s->up);
        if (rc != 0)
            session_close(s, SESSION_END_CLIENT_RESET, uv_strerror(rc));
    }
}

/* The client got "220 Ready to start TLS": everything it sends from now on
 * is TLS. */
static void session_smtp_start_client_tls(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (tls_conn_new(&s->client_tls, s->cl->tls_server, NULL) != 0) {
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return;
    }
    session_wire_tls(s);
    session_tls_started(s); /* the 5 s handshake limit starts now */
    m->flags |= SESSION_SMTP_F_TLS | SESSION_SMTP_F_SWITCHED | SESSION_SMTP_F_HELO_DUE;
    /* RFC 3207: forget what the client said in plaintext. */
    s->up.carry_len = 0;
    smtp_client_init(&m->cp, &(struct smtp_client_opts){
                                 .max_line_length = s->cl->max_line_length,
                                 .smuggling = session_smtp_smuggling(s->cl),
                             });
    session_smtp_log_injection(s);
}

/* Answers, in order, the lines mxproxy refused itself. An answer may end the
 * parser's wait (DATA, AUTH, XCLIENT) or free a FIFO slot: the client bytes
 * held meanwhile are parsed again, after the answers, so that no pipelined
 * command is left unparsed behind a local answer. */
static void session_smtp_answer_locals(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct smtp_pair p;
    char text[SMTP_REPLY_TEXT_MAX + 32];
    bool answered = false;

    while (!(s->flags & SESSION_F_CLOSING) &&
           smtp_pairs_take_local(&m->pp, session_smtp_now(), &p)) {
        if (p.local == SMTP_LOCAL_EHLO) {
            session_smtp_say_caps(s, &p);
        } else {
            snprintf(text, sizeof(text), "%d %s %.*s", p.code, p.esc, (int)p.text_len, p.text);
            session_smtp_say(s, text);
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
            session_smtp_log_injection(s); /* no TLS: what followed STARTTLS stays dropped */
        if (p.local == SMTP_LOCAL_SMUGGLING) {
            session_smtp_say(s, "421 4.7.0 mxproxy: closing connection after a smuggling attempt");
            m->flags |= SESSION_SMTP_F_ENDING;
            session_close_after_flush(s, SESSION_END_SMUGGLING, "smuggling");
            return;
        }
    }
    if (answered)
        session_smtp_resume_client(s);
}

/* ---- backend side --------------------------------------------------------------------- */

/* STARTTLS was accepted and mxproxy does not terminate TLS: from here on the
 * bytes are TLS, end to end, and are relayed untouched. */
static void session_smtp_go_opaque(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct log_line l;

    m->flags |= SESSION_SMTP_F_OPAQUE;
    s->up.carry_len = 0; /* bytes after STARTTLS were dropped as injected; keep none */
    /* The backend's EOF is passed on to the client, as in mode tcp. */
    s->down.flags &= ~RELAY_F_NO_FIN;
    relay_kernel_allow(&s->up, (enum relay_kernel)s->cl->kernel_relay);
    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, "starttls_passthrough");
        log_sid(&l, s->id);
        log_end(&l);
    }
}

/* Remembers the HELO/EHLO name given so far (passthrough: the only one seen). */
static void session_smtp_keep_helo(struct session *s)
{
    struct session_smtp *m = s->smtp;
    const char *helo = smtp_pairs_summary(&m->pp)->helo;

    free(m->helo_before_tls);
    m->helo_before_tls = helo[0] != '\0' ? strdup(helo) : NULL;
}

static void session_smtp_on_reply(struct session *s, const struct smtp_reply *r)
{
    struct session_smtp *m = s->smtp;
    struct smtp_pair p;

    /* The client gets the reply before anything is logged about it. */
    session_smtp_flush_down(s);
    if (smtp_pairs_oldest(&m->pp) == SMTP_CMD_STARTTLS && r->code / 100 == 2)
        session_smtp_keep_helo(s); /* the reply forgets it; a passthrough close line names it */
    enum smtp_pairs_res res = smtp_pairs_on_reply(&m->pp, r, &p);
    session_smtp_note_helo(s, res, &p);
    smtp_client_on_reply(&m->cp, p.cmd, p.code);
    if (res != SMTP_PAIRS_INTERMEDIATE)
        session_smtp_log_pair(s, &p);
    if (p.cmd == SMTP_CMD_STARTTLS && res == SMTP_PAIRS_MATCHED) {
        session_smtp_log_injection(s);
        if (p.code >= 200 && p.code < 300)
            session_smtp_go_opaque(s);
    }
    /* Forward this reply before anything the client's held bytes cause. */
    session_smtp_flush_down(s);
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
    struct session_smtp *m = s->smtp;
    struct smtp_pair p;
    bool first = true;

    relay_hold(&s->up); /* nothing the client says can reach anyone now */
    m->flags |= SESSION_SMTP_F_ENDING;
    session_smtp_drop_tail(s); /* a reply the backend left unfinished: the 421 replaces it */
    while (smtp_pairs_abort(&m->pp, &p)) {
        if (first) {
            session_smtp_say(s, reply);
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
        session_smtp_say(s, reply); /* nothing outstanding: the client still learns why */
        m->primary = reply;
    }
    session_close_after_flush(s, end, error);
}

/* end= for a backend that went away: who closed first decides. */
static enum session_end session_smtp_backend_gone_end(struct session *s)
{
    if (!(s->flags & SESSION_F_FIRST_CLOSE)) {
        s->flags |= SESSION_F_FIRST_CLOSE;
        s->first_close = SESSION_END_BACKEND_CLOSED;
    }
    return s->first_close;
}

/* transcript=full: splits forwarded server bytes into lines. A 334
 * challenge is an AUTH exchange and is never logged. */
static void session_smtp_server_lines(struct session *s, const char *p, size_t len)
{
    struct session_smtp *m = s->smtp;

    if (m->sline == NULL) {
        m->sline = malloc(SMTP_LINE_LOG_MAX);
        if (m->sline == NULL)
            return;
    }
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '\n') {
            if (m->sline_len < SMTP_LINE_LOG_MAX)
                m->sline[m->sline_len++] = p[i];
            else
                m->flags |= SESSION_SMTP_F_SLINE_CUT;
            continue;
        }
        size_t n = m->sline_len;
        if (n > 0 && m->sline[n - 1] == '\r')
            n--;
        if (n >= 3 && memcmp(m->sline, "334", 3) == 0)
            session_smtp_log_line(s, "server", "334 [redacted]", 14, false);
        else
            session_smtp_log_line(s, "server", m->sline, n,
                                  (m->flags & SESSION_SMTP_F_SLINE_CUT) != 0);
        m->sline_len = 0;
        m->flags &= ~SESSION_SMTP_F_SLINE_CUT;
    }
}

/* relay on_data for the backend direction: bytes go to the client as they
 * are; replies are matched on the way. */
/* Appends backend bytes to the EHLO reply being gathered. Returns false
 * when it grows past SESSION_SMTP_EHLO_MAX. */
static bool session_smtp_gather(struct session *s, const char *p, size_t n)
{
    struct session_smtp *m = s->smtp;

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
    struct session_smtp *m = s->smtp;
    char out[SESSION_SMTP_EHLO_MAX + 32];
    ssize_t n = -1;
    enum smtp_cmd cmd = smtp_pairs_oldest(&m->pp);
    unsigned edit = 0;

    session_smtp_flush_down(s);
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
    enum session_smtp_hs hs = s->smtp->hs;
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
        return s->smtp->pp.greeted ? SESSION_SMTP_HS_EHLO : SESSION_SMTP_HS_GREETING;
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
        return s->smtp->xtodo != 0 ? SESSION_SMTP_HS_XCLIENT : SESSION_SMTP_HS_DONE;
    case SESSION_SMTP_HS_DONE:
        break;
    }
    abort();
}

/* Sends mxproxy's EHLO, with the client's HELO/EHLO name when it gave one. */
static void session_smtp_hs_send_ehlo(struct session *s)
{
    struct session_smtp *m = s->smtp;
    char line[SMTP_PAIRS_NAME_MAX + 16];
    int n = 0;

    if (m->replay_arg_len > 0 && m->replay_arg_len <= SMTP_PAIRS_NAME_MAX)
        n = snprintf(line, sizeof(line), "EHLO %.*s\r\n", (int)m->replay_arg_len,
                     m->replay + m->replay_arg);
    else
        n = snprintf(line, sizeof(line), "EHLO mxproxy\r\n");
    m->hs_caps = 0;
    session_smtp_send_backend(s, line, (size_t)n);
}

/* Sends the next XCLIENT line; false when none could be made. */
static bool session_smtp_send_xclient(struct session *s)
{
    struct session_smtp *m = s->smtp;
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
    session_smtp_send_backend(s, line, (size_t)n);
    return true;
}

/* Enters state next and does what it names: sends its line, starts TLS, or
 * (DONE) sends the client's command and lets the client's bytes flow. */
static void session_smtp_hs_enter(struct session *s, enum session_smtp_hs next)
{
    struct session_smtp *m = s->smtp;
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
        session_smtp_send_backend(s, "STARTTLS\r\n", 10);
        return;
    case SESSION_SMTP_HS_HANDSHAKE: {
        char host[SOCKADDR_TEXT_MAX];
        if (tls_conn_new(&s->backend_tls, s->cl->tls_client,
                         session_backend_name(s, host, sizeof(host))) != 0) {
            session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
            return;
        }
        session_wire_tls(s);
        int hs = tls_handshake(s->backend_tls); /* the ClientHello */
        relay_tls_flush(&s->up);
        if (hs < 0) {
            const char *why = tls_error_reason(s->backend_tls);
            session_smtp_backend_starttls_failed(s, why != NULL ? why : "TLS failure");
        }
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
    struct session_smtp *m = s->smtp;

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

    if (m->hs_lines++ == 0 || (m->flags & SESSION_SMTP_F_HS_CUT))
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
    struct session_smtp *m = s->smtp;

    m->hs_bytes += n;
    if (m->hs_bytes > SESSION_SMTP_HS_REPLY_MAX)
        return false;
    while (n > 0) {
        const char *lf = memchr(p, '\n', n);
        size_t take = lf != NULL ? (size_t)(lf - p) + 1 : n;
        size_t room = SESSION_SMTP_HS_LINE_MAX - m->hs_line_len;

        if (take > room)
            m->flags |= SESSION_SMTP_F_HS_CUT;
        else
            memcpy(m->hs_line + m->hs_line_len, p, take);
        m->hs_line_len += take <= room ? take : 0;
        if (lf != NULL) {
            session_smtp_hs_line(m);
            m->hs_line_len = 0;
            m->flags &= ~SESSION_SMTP_F_HS_CUT;
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
    struct session_smtp *m = s->smtp;

    if (r->code != 250) {
        session_smtp_xclient_failed(s, "backend refused EHLO", r);
        return;
    }
    if (!(caps & SESSION_SMTP_CAP_XCLIENT) || !(caps & XCLIENT_F_ADDR)) {
        session_smtp_xclient_failed(s, "backend does not offer XCLIENT", NULL);
        return;
    }
    (void)session_client_addr(s); /* fills client_sa */
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
    struct session_smtp *m = s->smtp;
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

void session_smtp_backend_tls_ready(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (m->hs != SESSION_SMTP_HS_HANDSHAKE)
        return;
    session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
}

/* True when the backend's replies are mxproxy's own now. */
static bool session_smtp_hs_own(const struct session *s)
{
    enum session_smtp_hs hs = s->smtp->hs;

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
    session_smtp_flush_down(s);
    session_smtp_drop_tail(s);
    session_drop_backend(s);
    session_smtp_abort(s, "421 4.4.2 mxproxy: backend protocol error",
                       session_smtp_backend_gone_end(s),
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
    struct session_smtp *m = s->smtp;
    uint64_t now = session_smtp_now();
    size_t off = 0;

    m->down = b;
    m->down_start = 0;
    m->down_end = 0;
    while (off < len && !(m->flags & SESSION_SMTP_F_OPAQUE) &&
           !(s->flags & (SESSION_F_CLOSING | SESSION_F_FLUSHING))) {
        struct smtp_server_event ev;
        size_t at = off; /* where this reply, or the rest of a held one, begins */
        size_t n = smtp_server_parse(&m->sp, b->data + off, len - off, now, &ev);
        bool own = session_smtp_hs_own(s);
        enum smtp_cmd oldest = smtp_pairs_oldest(&m->pp);
        bool ehlo = oldest == SMTP_CMD_EHLO || oldest == SMTP_CMD_HELO;
        bool gather = !own && ((s->cl->client_tls == CONFIG_CLIENT_TLS_STARTTLS && ehlo) ||
                               (oldest == SMTP_CMD_EHLO && !s->cl->pass_client_xclient));

        if (session_smtp_logs_lines(s))
            session_smtp_server_lines(s, b->data + off, n);
        if (own) {
            /* mxproxy's own reply: read, never forwarded, whatever its size. */
            session_smtp_flush_down(s); /* earlier replies first */
            m->down_start = m->down_end = off + n;
            if (!session_smtp_hs_scan(s, b->data + off, n)) {
                m->down_start = m->down_end = len;
                session_smtp_hs_failed(s, "backend reply too long", NULL);
                break;
            }
        } else if (gather) {
            session_smtp_flush_down(s); /* earlier replies first */
            if (!session_smtp_gather(s, b->data + off, n)) {
                /* Too long to rewrite: what was gathered goes out as it came,
                 * with the rest of the reply once that is whole. */
                if (!session_smtp_keep_tail(s, m->ehlo, m->ehlo_len)) {
                    session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
                    break;
                }
                m->ehlo_len = 0;
                m->down_start = off;
                gather = false;
            } else {
                m->down_start = off + n;
            }
        }
        off += n;
        m->rsize += n;
        if (m->rsize > SESSION_SMTP_REPLY_MAX) {
            m->down_end = at;
            session_smtp_backend_broke(s, NULL, 0);
            break;
        }
        if (ev.type == SMTP_SEV_AGAIN) {
            /* The reply is not whole yet (it ends the read): its start waits
             * for the rest, unless it is being gathered. */
            m->down_end = at;
            if (m->down_start <= at) {
                session_smtp_flush_down(s);
                if (!session_smtp_keep_tail(s, b->data + at, off - at)) {
                    session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
                    break;
                }
                m->down_start = m->down_end = off;
            }
            break;
        }
        m->rsize = 0;
        m->down_end = off;
        if (ev.type == SMTP_SEV_REPLY) {
            if (m->tail_len > 0 && own)
                session_smtp_drop_tail(s);
            else if (m->tail_len > 0)
                session_smtp_send_tail(s); /* this reply's start, held from earlier reads */
            if (own) {
                session_smtp_hs_step(s, ev.reply);
                /* Nothing may follow it before our next line: anything that
                 * does is neither ours nor the client's. */
                m->down_start = m->down_end = len;
                break;
            }
            if (gather)
                session_smtp_send_ehlo(s, ev.reply->code);
            session_smtp_on_reply(s, ev.reply);
            if (m->hs == SESSION_SMTP_HS_GREETING && m->pp.greeted &&
                !(s->flags & SESSION_F_CLOSING) && !(m->flags & SESSION_SMTP_F_ENDING))
                session_smtp_hs_enter(s, session_smtp_hs_next(s, m->hs));
        } else if (ev.type == SMTP_SEV_GARBAGE) {
            /* The bad line, and a reply it cut short, never reach the client. */
            m->down_end = at;
            session_smtp_backend_broke(s, ev.reply->text, ev.reply->text_len);
            break;
        }
    }
    if (m->down_end < len && (m->flags & SESSION_SMTP_F_OPAQUE))
        m->down_end = len; /* after STARTTLS passthrough the rest is TLS: forward it too */
    if (!(s->flags & SESSION_F_CLOSING))
        session_smtp_flush_down(s);
    m->down = NULL;
    relay_block_unref(d->pool, b);
}

void session_smtp_on_backend_eof(struct session *s)
{
    if (session_smtp_hs_own(s) || s->smtp->hs == SESSION_SMTP_HS_HANDSHAKE) {
        session_smtp_hs_failed(s, "backend closed the connection", NULL);
        return;
    }
    session_smtp_abort(s, "421 4.4.2 mxproxy: backend closed the connection",
                       session_smtp_backend_gone_end(s), NULL);
}

void session_smtp_on_backend_reset(struct session *s, enum session_end end, const char *error)
{
    if (session_smtp_hs_own(s) || s->smtp->hs == SESSION_SMTP_HS_HANDSHAKE) {
        session_smtp_hs_failed(s, "backend reset the connection", NULL);
        return;
    }
    session_smtp_abort(s, "421 4.4.2 mxproxy: backend closed the connection", end, error);
}

bool session_smtp_opaque(const struct session *s)
{
    return (s->smtp->flags & SESSION_SMTP_F_OPAQUE) != 0;
}

void session_smtp_backend_tls_failed(struct session *s, const char *reason)
{
    session_drop_backend(s);
    /* Never a plaintext downgrade: whoever waits gets 421, once. */
    session_smtp_abort(s, "421 4.7.0 mxproxy: TLS with the mail server failed, try again later",
                       SESSION_END_TLS_ERROR, reason);
}

/* ---- session hooks ------------------------------------------------------------------- */

int session_smtp_new(struct session *s)
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
    s->smtp = m;
    return 0;
}

void session_smtp_free(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (m == NULL)
        return;
    if (m->held != NULL)
        relay_block_unref(s->up.pool, m->held);
    if (m->fifo != NULL) {
        struct smtp_pair p;
        while (smtp_pairs_abort(&m->pp, &p))
            ; /* empty it, so detach gives the storage back */
        session_smtp_fifo_detach(s);
    }
    free(m->carry);
    free(m->sline);
    free(m->ehlo);
    free(m->replay);
    free(m->tail);
    free(m->helo_before_tls);
    free(m->hs_line);
    free(m->caps);
    free(m);
    s->smtp = NULL;
}

void session_smtp_on_connected(struct session *s)
{
    s->up.on_data = session_smtp_on_client_data;
    s->down.on_data = session_smtp_on_backend_data;
    s->down.flags |= RELAY_F_NO_FIN; /* on backend EOF, answer outstanding commands first */
}

void session_smtp_connect_failed(struct session *s, const char *why)
{
    (void)why;
    static const char reply[] = "421 4.4.1 mxproxy: no mail server available, try again later";
    struct smtp_pair p;

    /* A client that talked before a greeting that never came: its
     * commands were never answered. */
    while (smtp_pairs_abort(&s->smtp->pp, &p))
        session_smtp_log_pair(s, &p);
    session_smtp_say(s, reply);
    s->smtp->primary = reply;
}

bool session_smtp_greeted(const struct session *s)
{
    return s->smtp->pp.greeted;
}

void session_smtp_local_error(struct session *s, const char *why)
{
    (void)why;
    static const char reply[] = "421 4.3.2 mxproxy: local resources exhausted, try again later";
    struct smtp_pair p;

    /* As for a failed connect: commands sent before the greeting never came
     * are logged aborted. */
    while (smtp_pairs_abort(&s->smtp->pp, &p))
        session_smtp_log_pair(s, &p);
    session_smtp_say(s, reply);
    s->smtp->primary = reply;
}

void session_smtp_goodbye(struct session *s, enum session_end end)
{
    struct session_smtp *m = s->smtp;

    if (m->flags & SESSION_SMTP_F_OPAQUE)
        return; /* the client speaks TLS to the backend: a plaintext reply would be noise */
    session_smtp_drop_tail(s); /* never glued to the start of an unfinished reply */
    session_smtp_say(s, end == SESSION_END_IDLE_TIMEOUT
                            ? "421 4.4.2 mxproxy: idle timeout, closing connection"
                            : "421 4.3.2 mxproxy: service shutting down, closing connection");
    m->flags |= SESSION_SMTP_F_ENDING;
}

void session_smtp_over_limit(struct session *s)
{
    static const char reply[] = "421 4.7.0 mxproxy: too many connections, try again later";

    session_smtp_say(s, reply);
    s->smtp->primary = reply;
}

/* Replies the backend owes: a BDAT whose chunk is still on its way is owed
 * bytes by the client instead, and the backend answers it only once they
 * are all in. */
static size_t session_smtp_owed(const struct session_smtp *m)
{
    size_t n = smtp_pairs_outstanding(&m->pp);

    if (n > 0 && (m->flags & SESSION_SMTP_F_IN_CHUNK))
        n--;
    return n;
}

/* Logs the BDAT whose chunk will never be complete as aborted=1 (the 421
 * that follows is its answer, and the backend discards the chunk). */
static void session_smtp_drop_chunk(struct session *s)
{
    struct session_smtp *m = s->smtp;
    struct smtp_pair p;

    if (!(m->flags & SESSION_SMTP_F_IN_CHUNK))
        return;
    while (smtp_pairs_abort(&m->pp, &p))
        session_smtp_log_pair(s, &p);
}

bool session_smtp_drain_wait(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (m->flags & (SESSION_SMTP_F_OPAQUE | SESSION_SMTP_F_ENDING))
        return false;
    if (session_smtp_owed(m) == 0) {
        session_smtp_drop_chunk(s);
        return false;
    }
    m->flags |= SESSION_SMTP_F_DRAIN;
    relay_hold(&s->up); /* what the client sends now is answered by the 421, never relayed */
    return true;
}

/* After a reply: a draining session owed nothing more ends now, with the
 * 421 that answers whatever the client sent after the deadline. */
static void session_smtp_drain_answered(struct session *s)
{
    struct session_smtp *m = s->smtp;

    if (!(m->flags & SESSION_SMTP_F_DRAIN) || (m->flags & SESSION_SMTP_F_ENDING) ||
        (s->flags & (SESSION_F_CLOSING | SESSION_F_FLUSHING)) || session_smtp_owed(m) > 0)
        return;
    session_smtp_drop_chunk(s);
    if (smtp_pairs_summary(&m->pp)->quit_answered) {
        session_close_after_flush(s, SESSION_END_QUIT, NULL); /* 221 said goodbye already */
        return;
    }
    session_smtp_goodbye(s, SESSION_END_DRAIN);
    session_close_after_flush(s, SESSION_END_DRAIN, NULL);
}

void session_smtp_drain_cut(struct session *s)
{
    struct session_smtp *m = s->smtp;
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
    m->flags |= SESSION_SMTP_F_ENDING;
}

enum session_end session_smtp_end(const struct session *s, enum session_end end)
{
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&s->smtp->pp);

    if (s->smtp->flags & SESSION_SMTP_F_OPAQUE)
        return end; /* a QUIT inside TLS is not seen: mode tcp's reasons */
    if (sum->quit_answered)
        return SESSION_END_QUIT; /* however the sockets closed after the reply */
    if (end == SESSION_END_CLIENT_EOF)
        return sum->quit_sent ? SESSION_END_QUIT : SESSION_END_CLIENT_EOF_WITHOUT_QUIT;
    return end;
}

void session_smtp_log_close(const struct session *s, struct log_line *l)
{
    const struct session_smtp *m = s->smtp;
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&m->pp);

    if (m->flags & SESSION_SMTP_F_OPAQUE) {
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
