/* pop3.c: PURE POP3 framing (see pop3.h for the contract). */
#include "pop3.h"

#include <assert.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Client parser states. */
enum {
    POP3_CS_CMD = 0,   /* reading command lines */
    POP3_CS_SKIP,      /* dropping the rest of an overlong line, then skip_next */
    POP3_CS_WAIT,      /* holding bytes until the response to wait_cmd */
    POP3_CS_AUTH_LINE, /* reading one SASL answer line */
    POP3_CS_BARRIER,   /* after STLS, dropping bytes until its response */
};

#define POP3_SASL_MECH_MAX 20 /* longest SASL mechanism name (RFC 4422 3.1) */

/* POP3's own verb flags (verb.h). */
#define POP3_VERB_MULTI VERB_PROTO(0) /* a +OK carries a multi-line body */
#define POP3_VERB_NOARG VERB_PROTO(1) /* ... only when the command has no argument */

/* POP3's verbs, indexed by enum pop3_cmd (see verb.h). Before TLS (require_tls) a client may say
 * anything but what logs in or reads mail; an unknown verb may too (the server answers -ERR). */
#define POP3_PRE VERB_BEFORE_TLS
const struct verb pop3_verbs[POP3_CMD_COUNT] = {
    [POP3_CMD_NONE] = VERB_PSEUDO("", 0),
    [POP3_CMD_UNKNOWN] = VERB_PSEUDO("UNKNOWN", POP3_PRE),
    [POP3_CMD_USER] = VERB("USER", VERB_CREDENTIALS),
    [POP3_CMD_PASS] = VERB("PASS", VERB_CREDENTIALS),
    [POP3_CMD_APOP] = VERB("APOP", VERB_CREDENTIALS),
    /* framing depends on the mechanism: pop3_auth() */
    [POP3_CMD_AUTH] = VERB("AUTH", VERB_CREDENTIALS),
    [POP3_CMD_STLS] = VERB("STLS", POP3_PRE | VERB_BARRIER),
    [POP3_CMD_CAPA] = VERB("CAPA", POP3_PRE | POP3_VERB_MULTI),
    [POP3_CMD_QUIT] = VERB("QUIT", POP3_PRE | VERB_ENDS),
    [POP3_CMD_STAT] = VERB("STAT", 0),
    [POP3_CMD_LIST] = VERB("LIST", POP3_VERB_MULTI | POP3_VERB_NOARG),
    [POP3_CMD_RETR] = VERB("RETR", POP3_VERB_MULTI),
    [POP3_CMD_DELE] = VERB("DELE", 0),
    [POP3_CMD_NOOP] = VERB("NOOP", POP3_PRE),
    [POP3_CMD_RSET] = VERB("RSET", POP3_PRE),
    [POP3_CMD_TOP] = VERB("TOP", POP3_VERB_MULTI),
    [POP3_CMD_UIDL] = VERB("UIDL", POP3_VERB_MULTI | POP3_VERB_NOARG),
    [POP3_CMD_UTF8] = VERB("UTF8", POP3_PRE),
    [POP3_CMD_LANG] = VERB("LANG", POP3_PRE | POP3_VERB_MULTI | POP3_VERB_NOARG),
    [POP3_CMD_XCLIENT] = VERB("XCLIENT", POP3_PRE),
};

static const char pop3_cancel[] = "*\r\n";

const char *pop3_cmd_name(enum pop3_cmd cmd)
{
    return verb_name(pop3_verbs, POP3_CMD_COUNT, (unsigned)cmd);
}

unsigned pop3_cmd_flags(enum pop3_cmd cmd)
{
    return verb_flags(pop3_verbs, POP3_CMD_COUNT, (unsigned)cmd);
}

const char *pop3_status_name(enum pop3_status status)
{
    switch (status) {
    case POP3_STATUS_OK:
        return "+OK";
    case POP3_STATUS_ERR:
        return "-ERR";
    case POP3_STATUS_CONT:
        return "+";
    default:
        return "";
    }
}

void pop3_client_init(struct pop3_client *p, const struct pop3_client_opts *opts)
{
    memset(p, 0, sizeof(*p));
    if (opts != NULL)
        p->max_line = opts->max_line_length;
}

static void pop3_ev_reset(struct pop3_event *ev, enum pop3_ev type)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
}

static char pop3_upper(char c)
{
    return (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c;
}

/* Blanks between tokens, and before the keyword: SP and HTAB, and VT and FF as well, so that a
 * credential after any of them, on any server, stays out of the log (see pop3.h). */
static bool pop3_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f';
}

static size_t pop3_skip_sp(const char *s, size_t i, size_t n)
{
    while (i < n && pop3_blank(s[i]))
        i++;
    return i;
}

static size_t pop3_token_end(const char *s, size_t i, size_t n)
{
    while (i < n && !pop3_blank(s[i]))
        i++;
    return i;
}

/* A character of a SASL mechanism name (RFC 4422 3.1), in any case. */
static bool pop3_sasl_char(char c)
{
    c = pop3_upper(c);
    return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

/* AUTH: "AUTH" alone asks for the mechanisms (multi-line); "AUTH mech [initial]" starts an
 * exchange whose every line after the mechanism name is a credential. */
static void pop3_auth(struct pop3_client *p, const char *s, size_t vl, size_t n,
                      struct pop3_event *ev)
{
    size_t b = pop3_skip_sp(s, vl, n), e = b;

    ev->line_len = vl;
    ev->arg = s + vl;
    ev->arg_len = 0;
    if (b == n) {
        ev->frame = POP3_FRAME_MULTI;
        return;
    }
    /* The name ends at its first byte that no mechanism name has, whichever separator a server
     * splits on; one longer than SASL's 20 characters is no name and is not shown either. */
    while (e < n && pop3_sasl_char(s[e]))
        e++;
    if (e > b && e - b <= POP3_SASL_MECH_MAX) {
        ev->arg = s + b;
        ev->arg_len = e - b;
        ev->line_len = e;
    } else {
        e = vl;
    }
    if (pop3_skip_sp(s, e, n) < n)
        ev->flags |= POP3_EV_F_REDACTED;
    ev->frame = POP3_FRAME_SASL;
    p->state = POP3_CS_WAIT;
    p->wait_cmd = POP3_CMD_AUTH;
}

/* Fills ev for the command line s[0, n) (CRLF excluded) and moves the parser to the state that
 * reads what follows it. */
static void pop3_command(struct pop3_client *p, const char *s, size_t n, struct pop3_event *ev)
{
    size_t vb = pop3_skip_sp(s, 0, n), vl = pop3_token_end(s, vb, n);
    size_t ab = pop3_skip_sp(s, vl, n), ae = n;
    enum pop3_cmd cmd =
        (enum pop3_cmd)verb_find(pop3_verbs, POP3_CMD_COUNT, s + vb, vl - vb, POP3_CMD_UNKNOWN);
    unsigned flags = pop3_verbs[cmd].flags;
    bool after_auth = p->after_auth;

    p->after_auth = false;
    while (ae > ab && pop3_blank(s[ae - 1]))
        ae--;
    ev->cmd = cmd;
    ev->frame = POP3_FRAME_SINGLE;
    ev->line = s;
    ev->line_len = n;
    if (after_auth && cmd == POP3_CMD_UNKNOWN && ab == n) {
        /* A SASL answer sent behind an AUTH that was refused (see POP3_EV_COMMAND). */
        ev->line = "[redacted]";
        ev->line_len = sizeof("[redacted]") - 1;
        return;
    }
    if (ab < n)
        ev->flags |= POP3_EV_F_ARG;
    if (ev->cmd == POP3_CMD_AUTH) {
        pop3_auth(p, s, vl, n, ev);
        return;
    }
    if (flags & VERB_CREDENTIALS) {
        /* Whatever follows the keyword, blanks included (Dovecot's PASS takes the rest of the
         * line after one SP as the password), is a credential. */
        ev->line_len = vl;
        if (vl < n)
            ev->flags |= POP3_EV_F_REDACTED;
        return;
    }
    ev->arg = s + ab;
    ev->arg_len = ae - ab;
    if ((flags & POP3_VERB_MULTI) && !((flags & POP3_VERB_NOARG) && ab < n))
        ev->frame = POP3_FRAME_MULTI;
    if (flags & VERB_BARRIER) {
        p->state = POP3_CS_BARRIER;
        p->wait_cmd = cmd;
    }
}

/* Outcome of looking for the end of a line. */
enum pop3_line {
    POP3_LINE_MORE, /* no LF yet and still under the limit */
    POP3_LINE_OK,   /* buf[0, *end) is a line ending in CRLF */
    POP3_LINE_BAD,  /* buf[0, *end) is a line ending in LF with a fault in it */
    POP3_LINE_LONG, /* over the limit: drop buf[0, *end), then skip up to the LF */
};

static enum pop3_line pop3_find_line(struct pop3_client *p, const char *buf, size_t len,
                                     size_t *end)
{
    size_t i = p->scan <= len ? p->scan : 0;

    if (i == 0)
        p->bad = NULL;
    for (; i < len; i++) {
        char c = buf[i];
        if (c == '\n')
            break;
        if (c == '\r') {
            /* A CR is fine only right before the LF; at the end of the input, wait. */
            if (i + 1 == len)
                break;
            if (buf[i + 1] != '\n' && p->bad == NULL)
                p->bad = "bare CR";
        } else if (c == '\0' && p->bad == NULL) {
            p->bad = "NUL";
        }
    }
    p->scan = 0;
    /* An overlong line always costs exactly max_line bytes here and the rest is skipped, so the
     * events do not depend on how the line was split into reads. */
    if (i >= p->max_line) {
        *end = p->max_line;
        return POP3_LINE_LONG;
    }
    if (i == len || buf[i] != '\n') {
        p->scan = i;
        return POP3_LINE_MORE;
    }
    *end = i + 1;
    if ((i == 0 || buf[i - 1] != '\r') && p->bad == NULL)
        p->bad = "bare LF";
    return p->bad != NULL ? POP3_LINE_BAD : POP3_LINE_OK;
}

/* Command or SASL answer line states. */
static size_t pop3_line(struct pop3_client *p, const char *buf, size_t len, struct pop3_event *ev)
{
    bool auth = p->state == POP3_CS_AUTH_LINE;
    unsigned next = auth ? POP3_CS_WAIT : POP3_CS_CMD;
    size_t end = 0;

    switch (pop3_find_line(p, buf, len, &end)) {
    case POP3_LINE_MORE:
        pop3_ev_reset(ev, POP3_EV_AGAIN);
        return 0;
    case POP3_LINE_LONG:
        pop3_ev_reset(ev, POP3_EV_TOO_LONG);
        ev->reason = "line too long";
        p->skip_next = next;
        p->state = POP3_CS_SKIP;
        break;
    case POP3_LINE_BAD:
        pop3_ev_reset(ev, POP3_EV_INVALID);
        ev->reason = p->bad;
        p->state = next;
        break;
    case POP3_LINE_OK:
        if (auth) {
            pop3_ev_reset(ev, POP3_EV_AUTH_RESPONSE);
            ev->cmd = POP3_CMD_AUTH;
            ev->fwd = buf;
            ev->fwd_len = end;
            if (end == 3 && buf[0] == '*')
                ev->flags |= POP3_EV_F_CANCEL;
            p->state = POP3_CS_WAIT;
            return end;
        }
        pop3_ev_reset(ev, POP3_EV_COMMAND);
        ev->fwd = buf;
        ev->fwd_len = end;
        pop3_command(p, buf, end - 2, ev);
        return end;
    }
    p->bad = NULL;
    if (auth) {
        /* The server still expects an answer line: cancel the exchange instead. */
        ev->cmd = POP3_CMD_AUTH;
        ev->fwd = pop3_cancel;
        ev->fwd_len = 3;
        ev->flags |= POP3_EV_F_CANCEL;
    }
    return end;
}

size_t pop3_client_parse(struct pop3_client *p, const char *buf, size_t len, struct pop3_event *ev)
{
    if (p->max_line == 0)
        p->max_line = POP3_DEFAULT_MAX_LINE;
    else if (p->max_line < POP3_MIN_MAX_LINE)
        p->max_line = POP3_MIN_MAX_LINE;
    if (buf == NULL)
        len = 0;

    switch (p->state) {
    case POP3_CS_CMD:
    case POP3_CS_AUTH_LINE:
        return pop3_line(p, buf, len, ev);
    case POP3_CS_SKIP: {
        const char *lf = len > 0 ? memchr(buf, '\n', len) : NULL;
        size_t n = lf != NULL ? (size_t)(lf - buf) + 1 : len;
        if (n == 0) {
            pop3_ev_reset(ev, POP3_EV_AGAIN);
            return 0;
        }
        pop3_ev_reset(ev, POP3_EV_DISCARD);
        ev->size = n;
        if (lf != NULL)
            p->state = p->skip_next;
        return n;
    }
    case POP3_CS_WAIT:
        pop3_ev_reset(ev, POP3_EV_WAIT);
        ev->cmd = p->wait_cmd;
        return 0;
    case POP3_CS_BARRIER:
        if (len == 0) {
            pop3_ev_reset(ev, POP3_EV_AGAIN);
            return 0;
        }
        pop3_ev_reset(ev, POP3_EV_INJECTED);
        ev->size = len;
        p->injected += len;
        return len;
    default:
        abort();
    }
}

void pop3_client_on_reply(struct pop3_client *p, enum pop3_cmd cmd, enum pop3_status status)
{
    unsigned next = status == POP3_STATUS_CONT ? POP3_CS_AUTH_LINE : POP3_CS_CMD;

    if (p->state == POP3_CS_BARRIER && cmd == POP3_CMD_STLS) {
        p->state = POP3_CS_CMD;
        p->scan = 0;
        p->bad = NULL;
        return;
    }
    if (cmd != p->wait_cmd || cmd != POP3_CMD_AUTH)
        return;
    if (p->state == POP3_CS_SKIP && p->skip_next == POP3_CS_WAIT) {
        /* The server answered the cancel sent for an overlong answer line before the rest of
         * that line came in: once it has been skipped, the client is free again. */
        p->skip_next = next;
        return;
    }
    if (p->state != POP3_CS_WAIT)
        return;
    p->scan = 0;
    p->bad = NULL;
    p->state = next;
    /* Refused at once: an answer the client sent anyway comes next. */
    p->after_auth = status != POP3_STATUS_CONT;
}

/* --- server responses -------------------------------------------------------------------- */

/* Server parser states. */
enum {
    POP3_SS_START = 0, /* first byte of a response: the framing is taken here */
    POP3_SS_STATUS,    /* reading the status indicator, ind[0, ind_len) so far */
    POP3_SS_TEXT0,     /* right after "+OK"/"-ERR": one SP is skipped */
    POP3_SS_TEXT,      /* rest of the status line */
    POP3_SS_CONT,      /* rest of a continuation line (not kept) */
    POP3_SS_BAD,       /* rest of a line that is no status line */
    POP3_SS_BOL,       /* body: start of a line (the body states come last) */
    POP3_SS_DOT,       /* body: a line began with "." */
    POP3_SS_DOTCR,     /* body: a line began with ".\r" */
    POP3_SS_LINE,      /* body: inside a line */
};

static void pop3_resp_add_text(struct pop3_response *r, char c)
{
    if (r->text_len < POP3_TEXT_MAX)
        r->text[r->text_len++] = c;
    else
        r->truncated = true;
}

/* What the status indicator read so far, ind[0, n), can still become. */
enum pop3_ind {
    POP3_IND_MORE, /* a proper prefix of "+OK" or "-ERR" */
    POP3_IND_OK,
    POP3_IND_ERR,
    POP3_IND_CONT, /* "+" then SP, CR or LF, where continuations are expected */
    POP3_IND_BAD,
};

static enum pop3_ind pop3_ind_match(const char *ind, size_t n, enum pop3_frame frame)
{
    if (n >= 2 && ind[0] == '+' && frame == POP3_FRAME_SASL &&
        (ind[1] == ' ' || ind[1] == '\r' || ind[1] == '\n'))
        return POP3_IND_CONT;
    if (n <= 3 && memcmp(ind, "+OK", n) == 0)
        return n == 3 ? POP3_IND_OK : POP3_IND_MORE;
    if (memcmp(ind, "-ERR", n) == 0)
        return n == 4 ? POP3_IND_ERR : POP3_IND_MORE;
    return POP3_IND_BAD;
}

/* Ends the current unit: the caller returns i after this. */
static void pop3_server_done(struct pop3_server *p, enum pop3_sev type,
                             struct pop3_server_event *ev)
{
    struct pop3_response *r = &p->cur;

    r->text[r->text_len] = '\0';
    p->handed_out = true; /* cleared at the next call, so the pointer lives until then */
    p->state = POP3_SS_START;
    p->pending_cr = false;
    ev->type = type;
    ev->resp = r;
}

/* The status line ended (the LF was just read). */
static void pop3_status_end(struct pop3_server *p, struct pop3_server_event *ev)
{
    struct pop3_response *r = &p->cur;

    if (r->status == POP3_STATUS_OK && p->frame == POP3_FRAME_MULTI) {
        /* The response goes on: cur stays the parser's, and is kept, not reset. */
        r->multi = true;
        r->text[r->text_len] = '\0';
        p->state = POP3_SS_BOL;
        p->pending_cr = false;
        ev->type = POP3_SEV_BODY;
        ev->resp = r;
        return;
    }
    pop3_server_done(p, POP3_SEV_RESPONSE, ev);
}

bool pop3_server_in_body(const struct pop3_server *p)
{
    return p->state >= POP3_SS_BOL;
}

/* A body line ended (its LF was just read). */
static void pop3_body_line(struct pop3_response *r)
{
    if (r->lines < UINT_MAX)
        r->lines++;
}

size_t pop3_server_parse(struct pop3_server *p, const char *buf, size_t len, enum pop3_frame frame,
                         uint64_t now_ns, struct pop3_server_event *ev)
{
    struct pop3_response *r = &p->cur;
    size_t i = 0;

    ev->type = POP3_SEV_AGAIN;
    ev->resp = NULL;
    if (p->handed_out) {
        memset(r, 0, sizeof(*r)); /* the caller is done with the last response */
        p->handed_out = false;
    }
    if (buf == NULL)
        len = 0;
    while (i < len && ev->type == POP3_SEV_AGAIN) {
        char c = buf[i];

        switch (p->state) {
        case POP3_SS_START:
            memset(r, 0, sizeof(*r));
            r->t_first = now_ns;
            p->frame = frame;
            p->ind_len = 0;
            p->pending_cr = false;
            p->state = POP3_SS_STATUS;
            /* fallthrough */
        case POP3_SS_STATUS: {
            enum pop3_ind m;
            i++;
            p->ind[p->ind_len++] = c;
            m = pop3_ind_match(p->ind, p->ind_len, p->frame);
            if (m == POP3_IND_OK || m == POP3_IND_ERR) {
                r->status = m == POP3_IND_OK ? POP3_STATUS_OK : POP3_STATUS_ERR;
                p->state = POP3_SS_TEXT0;
            } else if (m == POP3_IND_CONT) {
                r->status = POP3_STATUS_CONT;
                p->state = POP3_SS_CONT;
                if (c == '\n')
                    pop3_server_done(p, POP3_SEV_CONTINUATION, ev);
            } else if (m == POP3_IND_BAD) {
                /* Keep the start of the bad line for the log. */
                for (unsigned k = 0; k < p->ind_len; k++)
                    if (p->ind[k] != '\r' && p->ind[k] != '\n')
                        pop3_resp_add_text(r, p->ind[k]);
                p->state = POP3_SS_BAD;
                if (c == '\n')
                    pop3_server_done(p, POP3_SEV_GARBAGE, ev);
            }
            break;
        }
        case POP3_SS_TEXT0:
            p->state = POP3_SS_TEXT;
            if (c == ' ') {
                i++;
                break;
            }
            /* fallthrough */
        case POP3_SS_TEXT:
            i++;
            if (c == '\n') {
                p->pending_cr = false;
                pop3_status_end(p, ev);
                break;
            }
            if (p->pending_cr) {
                pop3_resp_add_text(r, '\r');
                p->pending_cr = false;
            }
            if (c == '\r')
                p->pending_cr = true;
            else
                pop3_resp_add_text(r, c);
            break;
        case POP3_SS_CONT:
        case POP3_SS_BAD: {
            /* SASL data is never kept; of a bad line only its start. */
            const char *lf = memchr(buf + i, '\n', len - i);
            size_t e = lf != NULL ? (size_t)(lf - buf) : len;
            if (p->state == POP3_SS_BAD)
                for (size_t k = i; k < e && r->text_len < POP3_TEXT_MAX; k++)
                    if (buf[k] != '\r')
                        pop3_resp_add_text(r, buf[k]);
            i = e;
            if (lf == NULL)
                break;
            i++;
            pop3_server_done(p, p->state == POP3_SS_BAD ? POP3_SEV_GARBAGE : POP3_SEV_CONTINUATION,
                             ev);
            break;
        }
        case POP3_SS_BOL:
            i++;
            if (c == '.') {
                p->state = POP3_SS_DOT;
                break;
            }
            r->size++;
            if (c == '\n')
                pop3_body_line(r);
            else
                p->state = POP3_SS_LINE;
            break;
        case POP3_SS_DOT:
        case POP3_SS_DOTCR:
            i++;
            if (c == '\n') {
                r->multi = true;
                pop3_server_done(p, POP3_SEV_RESPONSE, ev);
                break;
            }
            if (c == '\r' && p->state == POP3_SS_DOT) {
                p->state = POP3_SS_DOTCR;
                break;
            }
            /* A stuffed line: its first dot is not part of the body. */
            r->size += p->state == POP3_SS_DOTCR ? 2 : 1;
            p->state = POP3_SS_LINE;
            break;
        case POP3_SS_LINE: {
            /* Message bodies go by at memchr speed, not a byte per turn. */
            const char *lf = memchr(buf + i, '\n', len - i);
            size_t e = lf != NULL ? (size_t)(lf - buf) + 1 : len;
            r->size += e - i;
            i = e;
            if (lf != NULL) {
                pop3_body_line(r);
                p->state = POP3_SS_BOL;
            }
            break;
        }
        default:
            abort();
        }
    }
    r->wire += i;
    return i;
}

/* --- CAPA responses ---------------------------------------------------------------------- */

static size_t pop3_line_end(const char *buf, size_t pos, size_t len)
{
    const char *lf = memchr(buf + pos, '\n', len - pos);
    return lf != NULL ? (size_t)(lf - buf) + 1 : len;
}

/* True when the line s[0, n) (line end included) is the "." terminator. */
static bool pop3_is_terminator(const char *s, size_t n)
{
    return (n == 2 && s[0] == '.' && s[1] == '\n') ||
           (n == 3 && s[0] == '.' && s[1] == '\r' && s[2] == '\n');
}

/* True when the capability line s[0, n) has kw (upper case) as its first word. */
static bool pop3_capa_line_is(const char *s, size_t n, const char *kw)
{
    size_t k = strlen(kw);

    if (n < k)
        return false;
    for (size_t i = 0; i < k; i++)
        if (pop3_upper(s[i]) != kw[i])
            return false;
    return n == k || s[k] == ' ' || s[k] == '\t' || s[k] == '\r' || s[k] == '\n';
}

/* Checks that in[0, len) is a complete +OK multi-line response; sets *first to the end of its
 * status line and *term to the start of its terminator line. */
static bool pop3_capa_split(const char *in, size_t len, size_t *first, size_t *term)
{
    size_t pos, end;

    if (len < 5 || memcmp(in, "+OK", 3) != 0)
        return false;
    *first = pop3_line_end(in, 0, len);
    for (pos = *first; pos < len; pos = end) {
        end = pop3_line_end(in, pos, len);
        if (in[end - 1] != '\n')
            return false;
        if (pop3_is_terminator(in + pos, end - pos)) {
            *term = pos;
            return end == len;
        }
    }
    return false;
}

bool pop3_capa_has(const char *in, size_t len, const char *kw)
{
    size_t first, term;

    if (!pop3_capa_split(in, len, &first, &term))
        return false;
    for (size_t pos = first, end; pos < term; pos = end) {
        end = pop3_line_end(in, pos, term);
        if (pop3_capa_line_is(in + pos, end - pos, kw))
            return true;
    }
    return false;
}

ssize_t pop3_capa_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap)
{
    static const char stls[] = "STLS\r\n";
    bool add = (flags & POP3_CAPA_ADD_STLS) != 0;
    bool del = !add && (flags & POP3_CAPA_DEL_STLS) != 0;
    size_t first, term, o;
    bool has;

    if (!pop3_capa_split(in, len, &first, &term))
        return -1;
    has = pop3_capa_has(in, len, "STLS");
    if (len + sizeof(stls) - 1 > cap)
        return -1;
    memcpy(out, in, first);
    o = first;
    for (size_t pos = first, end; pos < term; pos = end) {
        end = pop3_line_end(in, pos, term);
        if (del && pop3_capa_line_is(in + pos, end - pos, "STLS"))
            continue;
        memcpy(out + o, in + pos, end - pos);
        o += end - pos;
    }
    if (add && !has) {
        memcpy(out + o, stls, sizeof(stls) - 1);
        o += sizeof(stls) - 1;
    }
    memcpy(out + o, in + term, len - term);
    o += len - term;
    return (ssize_t)o;
}
