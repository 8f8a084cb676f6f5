/* smtp.c: PURE SMTP framing (see smtp.h for the contract). */
#include "smtp.h"

#include <assert.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Client parser states. */
enum {
    SMTP_CS_CMD = 0,   /* reading command lines */
    SMTP_CS_SKIP,      /* dropping the rest of an overlong line, then skip_next */
    SMTP_CS_WAIT,      /* holding bytes until the reply to wait_cmd */
    SMTP_CS_AUTH_LINE, /* reading one AUTH credential line */
    SMTP_CS_BODY,      /* DATA body */
    SMTP_CS_SWALLOW,   /* DATA body after a smuggling pattern: drop up to CRLF.CRLF */
    SMTP_CS_BDAT,      /* BDAT chunk, size = bytes still expected */
    SMTP_CS_BDAT_END,  /* chunk complete, SMTP_EV_BDAT_END not yet reported */
    SMTP_CS_BARRIER,   /* after STARTTLS, dropping bytes until its reply */
};

/* Body: the delimiter that precedes the next byte. */
enum {
    SMTP_BOL_NONE = 0, /* inside a line */
    SMTP_BOL_CRLF,
    SMTP_BOL_LF,
    SMTP_BOL_CR,
};

#define SMTP_SASL_MECH_MAX 20 /* longest SASL mechanism name (RFC 4422 3.1) */

/* SMTP's verbs, indexed by enum smtp_cmd (see verb.h). Before TLS (require_tls) a client may
 * say anything but MAIL, RCPT, DATA, BDAT and AUTH; an unknown verb may too (the server
 * answers it 502). */
#define SMTP_PRE VERB_BEFORE_TLS
const struct verb smtp_verbs[SMTP_CMD_COUNT] = {
    [SMTP_CMD_NONE] = VERB_PSEUDO("", 0),
    [SMTP_CMD_UNKNOWN] = VERB_PSEUDO("UNKNOWN", SMTP_PRE),
    [SMTP_CMD_HELO] = VERB("HELO", SMTP_PRE),
    [SMTP_CMD_EHLO] = VERB("EHLO", SMTP_PRE),
    [SMTP_CMD_MAIL] = VERB("MAIL", 0),
    [SMTP_CMD_RCPT] = VERB("RCPT", 0),
    [SMTP_CMD_DATA] = VERB("DATA", VERB_WAIT),
    [SMTP_CMD_BDAT] = VERB("BDAT", 0),
    [SMTP_CMD_RSET] = VERB("RSET", SMTP_PRE),
    [SMTP_CMD_NOOP] = VERB("NOOP", SMTP_PRE),
    [SMTP_CMD_QUIT] = VERB("QUIT", SMTP_PRE | VERB_ENDS),
    [SMTP_CMD_VRFY] = VERB("VRFY", SMTP_PRE),
    [SMTP_CMD_EXPN] = VERB("EXPN", SMTP_PRE),
    [SMTP_CMD_HELP] = VERB("HELP", SMTP_PRE),
    [SMTP_CMD_AUTH] = VERB("AUTH", VERB_WAIT | VERB_CREDENTIALS),
    [SMTP_CMD_STARTTLS] = VERB("STARTTLS", SMTP_PRE | VERB_BARRIER),
    [SMTP_CMD_XCLIENT] = VERB("XCLIENT", SMTP_PRE | VERB_WAIT),
    [SMTP_CMD_XFORWARD] = VERB("XFORWARD", SMTP_PRE),
    [SMTP_CMD_DOT] = VERB_PSEUDO(".", 0),
};

/* Smuggling pattern names, [before][after] by SMTP_BOL_* (NONE unused). */
static const char *const smtp_patterns[4][4] = {
    [SMTP_BOL_CRLF] =
        {[SMTP_BOL_CRLF] = "CRLF.CRLF", [SMTP_BOL_LF] = "CRLF.LF", [SMTP_BOL_CR] = "CRLF.CR"},
    [SMTP_BOL_LF] = {[SMTP_BOL_CRLF] = "LF.CRLF", [SMTP_BOL_LF] = "LF.LF", [SMTP_BOL_CR] = "LF.CR"},
    [SMTP_BOL_CR] = {[SMTP_BOL_CRLF] = "CR.CRLF", [SMTP_BOL_LF] = "CR.LF", [SMTP_BOL_CR] = "CR.CR"},
};

static const char smtp_crlf[] = "\r\n";
static const char smtp_dotdot[] = "..";
static const char smtp_cancel[] = "*\r\n";

const char *smtp_cmd_name(enum smtp_cmd cmd)
{
    return verb_name(smtp_verbs, SMTP_CMD_COUNT, (unsigned)cmd);
}

unsigned smtp_cmd_flags(enum smtp_cmd cmd)
{
    return verb_flags(smtp_verbs, SMTP_CMD_COUNT, (unsigned)cmd);
}

void smtp_client_init(struct smtp_client *p, const struct smtp_client_opts *opts)
{
    memset(p, 0, sizeof(*p));
    if (opts != NULL) {
        p->max_line = opts->max_line_length;
        p->smuggling = opts->smuggling;
    }
}

static void smtp_ev_reset(struct smtp_event *ev, enum smtp_ev type)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
}

static char smtp_upper(char c)
{
    return (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c;
}

/* Case-insensitive prefix match of an upper-case ASCII word. */
static bool smtp_prefix(const char *s, size_t n, const char *word)
{
    size_t wl = strlen(word);

    if (n < wl)
        return false;
    for (size_t i = 0; i < wl; i++)
        if (smtp_upper(s[i]) != word[i])
            return false;
    return true;
}

/* Blanks between the tokens of a command line, and before the verb: SP and HTAB, and VT and
 * FF, which Postfix's smtpd tokenizer (ISSPACE) skips as well. The parser must split a line
 * where the server does, or a credential after a TAB would be taken for part of the mechanism
 * name, and a "DATA" or "STARTTLS" the server obeys would pass as an unknown verb. */
static bool smtp_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f';
}

static size_t smtp_skip_sp(const char *s, size_t i, size_t n)
{
    while (i < n && smtp_blank(s[i]))
        i++;
    return i;
}

/* End of the token that starts at s[i]. */
static size_t smtp_token_end(const char *s, size_t i, size_t n)
{
    while (i < n && !smtp_blank(s[i]))
        i++;
    return i;
}

/* A character of a SASL mechanism name (RFC 4422 3.1: upper-case letters, digits, '-', '_';
 * servers match it in any case). */
static bool smtp_sasl_char(char c)
{
    c = smtp_upper(c);
    return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

/* "MAIL FROM:<addr> ..." / "RCPT TO:<addr> ...": sets ev->arg to addr, or flags bad args. */
static void smtp_parse_path(const char *s, size_t i, size_t n, const char *kw,
                            struct smtp_event *ev)
{
    i = smtp_skip_sp(s, i, n);
    if (!smtp_prefix(s + i, n - i, kw)) {
        ev->flags |= SMTP_EV_F_BAD_ARGS;
        return;
    }
    i = smtp_skip_sp(s, i + strlen(kw), n);
    if (i < n && s[i] == '<') {
        const char *end = memchr(s + i + 1, '>', n - i - 1);
        if (end == NULL) {
            ev->flags |= SMTP_EV_F_BAD_ARGS;
            return;
        }
        ev->arg = s + i + 1;
        ev->arg_len = (size_t)(end - (s + i + 1));
        return;
    }
    size_t b = i;
    i = smtp_token_end(s, i, n);
    if (i == b) {
        ev->flags |= SMTP_EV_F_BAD_ARGS;
        return;
    }
    ev->arg = s + b;
    ev->arg_len = i - b;
}

/* "BDAT <size> [LAST]". Returns false when the arguments do not parse. */
static bool smtp_parse_bdat(const char *s, size_t i, size_t n, struct smtp_event *ev)
{
    uint64_t v = 0;
    size_t b;

    i = smtp_skip_sp(s, i, n);
    b = i;
    while (i < n && s[i] >= '0' && s[i] <= '9') {
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
        i++;
    }
    if (i == b)
        return false;
    if (i < n && !smtp_blank(s[i]))
        return false;
    i = smtp_skip_sp(s, i, n);
    if (i < n) {
        if (!smtp_prefix(s + i, n - i, "LAST"))
            return false;
        i = smtp_skip_sp(s, i + 4, n);
        if (i < n)
            return false;
        ev->flags |= SMTP_EV_F_LAST;
    }
    ev->size = v;
    return true;
}

/* Fills ev for the command line s[0, n) (CRLF excluded) and moves the parser to the state
 * that reads what follows it. */
static void smtp_command(struct smtp_client *p, const char *s, size_t n, struct smtp_event *ev)
{
    /* The verb is the first token, after any blanks, as servers read it; vl is its end. */
    size_t vb = smtp_skip_sp(s, 0, n), vl = smtp_token_end(s, vb, n);
    enum smtp_cmd cmd =
        (enum smtp_cmd)verb_find(smtp_verbs, SMTP_CMD_COUNT, s + vb, vl - vb, SMTP_CMD_UNKNOWN);
    unsigned flags = smtp_verbs[cmd].flags;
    bool after_auth = p->after_auth;

    p->after_auth = false;
    ev->cmd = cmd;
    ev->line = s;
    ev->line_len = n;
    if (after_auth && cmd == SMTP_CMD_UNKNOWN && smtp_skip_sp(s, vl, n) == n) {
        /* A SASL response sent behind an AUTH that was refused (see SMTP_EV_COMMAND). */
        ev->line = "[redacted]";
        ev->line_len = sizeof("[redacted]") - 1;
        return;
    }
    switch (ev->cmd) {
    case SMTP_CMD_HELO:
    case SMTP_CMD_EHLO: {
        size_t e = n, i = smtp_skip_sp(s, vl, n);
        while (e > i && smtp_blank(s[e - 1]))
            e--;
        ev->arg = s + i;
        ev->arg_len = e - i;
        break;
    }
    case SMTP_CMD_MAIL:
        smtp_parse_path(s, vl, n, "FROM:", ev);
        break;
    case SMTP_CMD_RCPT:
        smtp_parse_path(s, vl, n, "TO:", ev);
        break;
    case SMTP_CMD_BDAT:
        if (!smtp_parse_bdat(s, vl, n, ev)) {
            ev->flags |= SMTP_EV_F_BAD_ARGS;
            ev->flags &= ~SMTP_EV_F_LAST;
            ev->size = 0;
            break;
        }
        p->chunk = ev->size;
        p->chunk_last = (ev->flags & SMTP_EV_F_LAST) != 0;
        p->size = ev->size;
        p->state = ev->size > 0 ? SMTP_CS_BDAT : SMTP_CS_BDAT_END;
        break;
    case SMTP_CMD_AUTH: {
        /* Whatever follows the mechanism name is a credential: keep it out of the log text.
         * The name ends at its first byte that no mechanism name has, whichever separator a
         * server splits on (Python's str.split() also takes \x1c-\x1f and Unicode spaces);
         * one longer than SASL's 20 characters is no name and is not shown either. */
        size_t b = smtp_skip_sp(s, vl, n), e = b;
        while (e < n && smtp_sasl_char(s[e]))
            e++;
        if (e - b > SMTP_SASL_MECH_MAX)
            e = b = vl;
        ev->arg = s + b;
        ev->arg_len = e - b;
        ev->line_len = e > b ? e : vl;
        if (smtp_skip_sp(s, e, n) < n)
            ev->flags |= SMTP_EV_F_AUTH_INITIAL;
        break;
    }
    default:
        break;
    }
    if (flags & VERB_WAIT) {
        p->state = SMTP_CS_WAIT;
        p->wait_cmd = cmd;
    } else if (flags & VERB_BARRIER) {
        p->state = SMTP_CS_BARRIER;
        p->wait_cmd = cmd;
    }
}

/* Outcome of looking for the end of a line. */
enum smtp_line {
    SMTP_LINE_MORE, /* no LF yet and still under the limit */
    SMTP_LINE_OK,   /* buf[0, *end) is a line ending in CRLF */
    SMTP_LINE_BAD,  /* buf[0, *end) is a line ending in LF with a fault in it */
    SMTP_LINE_LONG, /* over the limit: drop buf[0, *end), then skip up to the LF */
};

static enum smtp_line smtp_find_line(struct smtp_client *p, const char *buf, size_t len,
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
    /* An overlong line always costs exactly max_line bytes here and the rest is skipped, so
     * the events do not depend on how the line was split into reads. */
    if (i >= p->max_line) {
        *end = p->max_line;
        return SMTP_LINE_LONG;
    }
    if (i == len || buf[i] != '\n') {
        p->scan = i;
        return SMTP_LINE_MORE;
    }
    *end = i + 1;
    if ((i == 0 || buf[i - 1] != '\r') && p->bad == NULL)
        p->bad = "bare LF";
    return p->bad != NULL ? SMTP_LINE_BAD : SMTP_LINE_OK;
}

/* Command or credential line states. */
static size_t smtp_line(struct smtp_client *p, const char *buf, size_t len, struct smtp_event *ev)
{
    bool auth = p->state == SMTP_CS_AUTH_LINE;
    size_t end = 0;
    unsigned next = auth ? SMTP_CS_WAIT : SMTP_CS_CMD;

    switch (smtp_find_line(p, buf, len, &end)) {
    case SMTP_LINE_MORE:
        smtp_ev_reset(ev, SMTP_EV_AGAIN);
        return 0;
    case SMTP_LINE_LONG:
        smtp_ev_reset(ev, SMTP_EV_TOO_LONG);
        ev->reason = "line too long";
        p->skip_next = next;
        p->state = SMTP_CS_SKIP;
        break;
    case SMTP_LINE_BAD:
        smtp_ev_reset(ev, SMTP_EV_INVALID);
        ev->reason = p->bad;
        p->state = next;
        break;
    case SMTP_LINE_OK:
        if (auth) {
            smtp_ev_reset(ev, SMTP_EV_AUTH_RESPONSE);
            ev->cmd = SMTP_CMD_AUTH;
            ev->fwd = buf;
            ev->fwd_len = end;
            if (end == 3 && buf[0] == '*')
                ev->flags |= SMTP_EV_F_CANCEL;
            p->state = SMTP_CS_WAIT;
            return end;
        }
        smtp_ev_reset(ev, SMTP_EV_COMMAND);
        ev->fwd = buf;
        ev->fwd_len = end;
        smtp_command(p, buf, end - 2, ev);
        return end;
    }
    p->bad = NULL;
    if (auth) {
        /* The server still expects a credential line: cancel the exchange instead. */
        ev->cmd = SMTP_CMD_AUTH;
        ev->fwd = smtp_cancel;
        ev->fwd_len = 3;
        ev->flags |= SMTP_EV_F_CANCEL;
    }
    return end;
}

/* Emits the body span buf[0, n) (n > 0) as DATA, or as DISCARD when swallowing. */
static size_t smtp_body_span(struct smtp_client *p, const char *buf, size_t n,
                             struct smtp_event *ev)
{
    if (p->state == SMTP_CS_SWALLOW) {
        smtp_ev_reset(ev, SMTP_EV_DISCARD);
        ev->size = n;
    } else {
        smtp_ev_reset(ev, SMTP_EV_DATA);
        ev->fwd = buf;
        ev->fwd_len = n;
    }
    p->size += n;
    return n;
}

/* Emits a normalize-mode replacement for n consumed bytes. */
static size_t smtp_body_replace(struct smtp_client *p, enum smtp_ev type, const char *with,
                                size_t wlen, size_t n, struct smtp_event *ev)
{
    smtp_ev_reset(ev, type);
    ev->fwd = with;
    ev->fwd_len = wlen;
    p->size += n;
    return n;
}

/* Index of the first CR or LF in buf[i, len), or len. memchr is vectorised
 * in libc: bodies are scanned at memory speed, not a byte per loop turn. */
static size_t smtp_find_eol(const char *buf, size_t i, size_t len)
{
    const char *lf = memchr(buf + i, '\n', len - i);
    size_t end = lf != NULL ? (size_t)(lf - buf) : len;
    const char *cr = memchr(buf + i, '\r', end - i);
    return cr != NULL ? (size_t)(cr - buf) : end;
}

/* DATA body, in BODY or SWALLOW state. Stops before every byte that needs an event of its own
 * (replacement, dot decision, end), so that p->bol always describes the first unconsumed byte;
 * holds at most the two bytes ".\r" or the byte "\r" while the next byte is unknown. */
static size_t smtp_body(struct smtp_client *p, const char *buf, size_t len, struct smtp_event *ev)
{
    bool swallow = p->state == SMTP_CS_SWALLOW;
    bool normalize = !swallow && p->smuggling == SMTP_SMUGGLING_NORMALIZE;
    unsigned bol = p->bol;
    size_t i = 0;

    while (i < len) {
        char c = buf[i];

        if (c == '\r' || c == '\n') {
            unsigned delim;
            size_t dl;
            if (c == '\n') {
                delim = SMTP_BOL_LF;
                dl = 1;
            } else if (i + 1 == len) {
                break;
            } else if (buf[i + 1] == '\n') {
                delim = SMTP_BOL_CRLF;
                dl = 2;
            } else {
                delim = SMTP_BOL_CR;
                dl = 1;
            }
            if (normalize && delim != SMTP_BOL_CRLF) {
                if (i > 0)
                    break;
                p->bol = delim;
                return smtp_body_replace(p, SMTP_EV_DATA, smtp_crlf, 2, 1, ev);
            }
            bol = delim;
            i += dl;
            continue;
        }
        if (c == '.' && bol != SMTP_BOL_NONE) {
            unsigned after;
            if (i + 1 == len)
                break;
            if (buf[i + 1] == '\n') {
                after = SMTP_BOL_LF;
            } else if (buf[i + 1] != '\r') {
                after = SMTP_BOL_NONE;
            } else if (i + 2 == len) {
                break;
            } else {
                after = buf[i + 2] == '\n' ? SMTP_BOL_CRLF : SMTP_BOL_CR;
            }
            bool end = bol == SMTP_BOL_CRLF && after == SMTP_BOL_CRLF;
            bool detect = !swallow && p->smuggling != SMTP_SMUGGLING_OFF;
            if (normalize && after == SMTP_BOL_NONE && bol != SMTP_BOL_CRLF) {
                /* The bare CR or LF before this dot becomes CRLF, so the dot now begins a
                 * line the client never dot-stuffed: stuff it, or the backend would strip it
                 * and a byte of the message would be lost. */
                if (i > 0)
                    break;
                p->bol = SMTP_BOL_NONE;
                return smtp_body_replace(p, SMTP_EV_DATA, smtp_dotdot, 2, 1, ev);
            }
            if (after != SMTP_BOL_NONE && (end || detect)) {
                if (i > 0)
                    break;
                if (end) {
                    smtp_ev_reset(ev, SMTP_EV_DATA_END);
                    ev->cmd = SMTP_CMD_DOT;
                    ev->size = p->size;
                    if (swallow) {
                        ev->flags |= SMTP_EV_F_SMUGGLING;
                    } else {
                        ev->fwd = buf;
                        ev->fwd_len = 3;
                    }
                    p->state = SMTP_CS_CMD;
                    p->bol = SMTP_BOL_NONE;
                    p->size = 0;
                    return 3;
                }
                smtp_ev_reset(ev, SMTP_EV_SMUGGLING);
                ev->reason = smtp_patterns[bol][after];
                if (normalize) {
                    p->bol = SMTP_BOL_NONE;
                    ev->fwd = smtp_dotdot;
                    ev->fwd_len = 2;
                    p->size += 1;
                    return 1;
                }
                p->state = SMTP_CS_SWALLOW;
                return 0;
            }
        }
        /* Inside a line: nothing matters until the next CR or LF. */
        bol = SMTP_BOL_NONE;
        i = smtp_find_eol(buf, i + 1, len);
    }
    p->bol = bol;
    if (i == 0) {
        smtp_ev_reset(ev, SMTP_EV_AGAIN);
        return 0;
    }
    return smtp_body_span(p, buf, i, ev);
}

size_t smtp_client_parse(struct smtp_client *p, const char *buf, size_t len, struct smtp_event *ev)
{
    if (p->max_line == 0)
        p->max_line = SMTP_DEFAULT_MAX_LINE;
    else if (p->max_line < SMTP_MIN_MAX_LINE)
        p->max_line = SMTP_MIN_MAX_LINE;
    if (buf == NULL)
        len = 0;

    switch (p->state) {
    case SMTP_CS_CMD:
    case SMTP_CS_AUTH_LINE:
        return smtp_line(p, buf, len, ev);
    case SMTP_CS_SKIP: {
        const char *lf = len > 0 ? memchr(buf, '\n', len) : NULL;
        size_t n = lf != NULL ? (size_t)(lf - buf) + 1 : len;
        if (n == 0) {
            smtp_ev_reset(ev, SMTP_EV_AGAIN);
            return 0;
        }
        smtp_ev_reset(ev, SMTP_EV_DISCARD);
        ev->size = n;
        if (lf != NULL)
            p->state = p->skip_next;
        return n;
    }
    case SMTP_CS_WAIT:
        smtp_ev_reset(ev, SMTP_EV_WAIT);
        ev->cmd = p->wait_cmd;
        return 0;
    case SMTP_CS_BODY:
    case SMTP_CS_SWALLOW:
        return smtp_body(p, buf, len, ev);
    case SMTP_CS_BDAT: {
        size_t n = p->size < len ? (size_t)p->size : len;
        if (n == 0) {
            smtp_ev_reset(ev, SMTP_EV_AGAIN);
            return 0;
        }
        smtp_ev_reset(ev, SMTP_EV_BDAT_DATA);
        ev->fwd = buf;
        ev->fwd_len = n;
        p->size -= n;
        if (p->size == 0)
            p->state = SMTP_CS_BDAT_END;
        return n;
    }
    case SMTP_CS_BDAT_END:
        smtp_ev_reset(ev, SMTP_EV_BDAT_END);
        ev->cmd = SMTP_CMD_BDAT;
        ev->size = p->chunk;
        if (p->chunk_last)
            ev->flags |= SMTP_EV_F_LAST;
        p->state = SMTP_CS_CMD;
        return 0;
    case SMTP_CS_BARRIER:
        if (len == 0) {
            smtp_ev_reset(ev, SMTP_EV_AGAIN);
            return 0;
        }
        smtp_ev_reset(ev, SMTP_EV_INJECTED);
        ev->size = len;
        p->injected += len;
        return len;
    default:
        abort();
    }
}

void smtp_client_on_reply(struct smtp_client *p, enum smtp_cmd cmd, int code)
{
    if (p->state == SMTP_CS_BARRIER && cmd == SMTP_CMD_STARTTLS) {
        p->state = SMTP_CS_CMD;
        p->scan = 0;
        p->bad = NULL;
        return;
    }
    if (p->state != SMTP_CS_WAIT || cmd != p->wait_cmd)
        return;
    p->scan = 0;
    p->bad = NULL;
    if (cmd == SMTP_CMD_DATA && code == 354) {
        p->state = SMTP_CS_BODY;
        p->bol = SMTP_BOL_CRLF;
        p->size = 0;
    } else if (cmd == SMTP_CMD_AUTH && code == 334) {
        p->state = SMTP_CS_AUTH_LINE;
    } else {
        /* An AUTH refused at once: a response the client sent anyway comes next. */
        p->after_auth = cmd == SMTP_CMD_AUTH;
        p->state = SMTP_CS_CMD;
    }
}

/* --- server replies ------------------------------------------------------------------- */

/* Server parser states. */
enum {
    SMTP_SS_CODE0 = 0, /* start of a line: first code digit */
    SMTP_SS_CODE1,
    SMTP_SS_CODE2,
    SMTP_SS_SEP,  /* ' ', '-' or the line end after the code */
    SMTP_SS_TEXT, /* rest of the line up to LF */
};

#define SMTP_SS_F_LAST 0x100 /* added to the state when the line is the reply's last one */

static void smtp_reply_add_text(struct smtp_reply *r, char c)
{
    if (r->text_len < SMTP_REPLY_TEXT_MAX)
        r->text[r->text_len++] = c;
    else
        r->truncated = true;
}

static void smtp_reply_add_textn(struct smtp_reply *r, const char *p, size_t n)
{
    size_t room = SMTP_REPLY_TEXT_MAX - r->text_len;

    if (n > room) {
        n = room;
        r->truncated = true;
    }
    memcpy(r->text + r->text_len, p, n);
    r->text_len += n;
}

/* A line's text up to its LF, or to the end of buf, in one step: the first line's is kept
 * (a CR is held back until the next byte shows whether it ends the line), the others' only
 * counted. Returns the bytes taken. The byte loop would do the same one byte at a time. */
static size_t smtp_server_text_run(struct smtp_server *p, struct smtp_reply *r, const char *buf,
                                   size_t len)
{
    const char *nl = memchr(buf, '\n', len);
    size_t n = nl != NULL ? (size_t)(nl - buf) : len;

    if (n == 0)
        return 0;
    r->size = r->size > UINT64_MAX - n ? UINT64_MAX : r->size + n;
    if (r->lines == 0) {
        size_t keep = n;
        if (p->pending_cr) {
            smtp_reply_add_text(r, '\r'); /* held back, and not before the LF */
            p->pending_cr = false;
        }
        if (buf[n - 1] == '\r') {
            keep--;
            p->pending_cr = true;
        }
        smtp_reply_add_textn(r, buf, keep);
    }
    return n;
}

/* Splits an enhanced status code off the first line's text, when the class (2, 4, 5) matches
 * the code's and the form is class.subject.detail with 1-3 digit subject and detail. */
static void smtp_reply_esc(struct smtp_reply *r)
{
    const char *t = r->text;
    size_t n = r->text_len, i = 1;
    char cls = (char)('0' + r->code / 100);

    if (n < 5 || t[0] != cls || (cls != '2' && cls != '4' && cls != '5') || t[1] != '.')
        return;
    for (int part = 0; part < 2; part++) {
        size_t b = ++i;
        while (i < n && i - b < 4 && t[i] >= '0' && t[i] <= '9')
            i++;
        if (i == b || i - b > 3)
            return;
        if (part == 0 && (i >= n || t[i] != '.'))
            return;
    }
    if (i < n && t[i] != ' ')
        return;
    memcpy(r->esc, t, i);
    r->esc[i] = '\0';
    while (i < n && t[i] == ' ')
        i++;
    memmove(r->text, t + i, n - i);
    r->text_len = n - i;
    r->text[r->text_len] = '\0';
}

/* The current line is not a reply line: from here on it is only counted, and its start (the
 * st code digits already read, then c) is kept as the garbage text for the log. */
static void smtp_server_bad(struct smtp_server *p, unsigned st, char c)
{
    struct smtp_reply *r = &p->cur;
    char digits[3];

    p->bad = true;
    p->pending_cr = false;
    r->lines = 0;
    r->text_len = 0;
    r->truncated = false;
    for (unsigned k = 0, v = (unsigned)p->line_code; k < st && k < 3; k++, v /= 10)
        digits[st - 1 - k] = (char)('0' + v % 10);
    for (unsigned k = 0; k < st && k < 3; k++)
        smtp_reply_add_text(r, digits[k]);
    if (c != '\r' && c != '\n')
        smtp_reply_add_text(r, c);
}

/* A bad line ended: it ends whatever reply was in progress too. */
static void smtp_server_garbage(struct smtp_server *p, struct smtp_server_event *ev)
{
    struct smtp_reply *r = &p->cur;

    r->code = 0;
    r->esc[0] = '\0';
    r->lines = 1;
    r->text[r->text_len] = '\0';
    p->handed_out = true; /* cleared at the next call, so the pointer lives until then */
    p->state = SMTP_SS_CODE0;
    p->bad = false;
    ev->type = SMTP_SEV_GARBAGE;
    ev->reply = r;
}

size_t smtp_server_parse(struct smtp_server *p, const char *buf, size_t len, uint64_t now_ns,
                         struct smtp_server_event *ev)
{
    struct smtp_reply *r = &p->cur;
    size_t i = 0;

    ev->type = SMTP_SEV_AGAIN;
    ev->reply = NULL;
    if (p->handed_out) {
        memset(r, 0, sizeof(*r)); /* the caller is done with the last reply */
        p->handed_out = false;
    }
    if (buf == NULL)
        len = 0;
    while (i < len) {
        if (p->state == SMTP_SS_TEXT || p->state == (SMTP_SS_TEXT | SMTP_SS_F_LAST)) {
            if (!p->bad) {
                i += smtp_server_text_run(p, r, buf + i, len - i);
                if (i == len)
                    break;
            }
        }
        char c = buf[i++];
        unsigned st = p->state & 0xffu;
        bool first = r->lines == 0;

        if (r->size == 0)
            r->t_first = now_ns;
        if (r->size != UINT64_MAX)
            r->size++;
        if (p->bad) {
            if (c != '\n') {
                /* Keep the start of a garbage line for the log; the rest is only counted. */
                if (c != '\r')
                    smtp_reply_add_text(r, c);
                continue;
            }
            smtp_server_garbage(p, ev);
            return i;
        }
        switch (st) {
        case SMTP_SS_CODE0:
        case SMTP_SS_CODE1:
        case SMTP_SS_CODE2:
            if (c < '0' || c > '9' || (st == SMTP_SS_CODE0 && (c < '1' || c > '5'))) {
                smtp_server_bad(p, st, c);
                if (c == '\n') {
                    smtp_server_garbage(p, ev);
                    return i;
                }
                break;
            }
            if (st == SMTP_SS_CODE0)
                p->line_code = 0;
            p->line_code = p->line_code * 10 + (c - '0');
            p->state = st + 1;
            break;
        case SMTP_SS_SEP:
            if ((!first && p->line_code != r->code) ||
                (c != ' ' && c != '-' && c != '\r' && c != '\n')) {
                smtp_server_bad(p, st, c);
                if (c == '\n') {
                    smtp_server_garbage(p, ev);
                    return i;
                }
                break;
            }
            if (first)
                r->code = p->line_code;
            if (c == '-') {
                p->state = SMTP_SS_TEXT;
                break;
            }
            /* ' ', or a line end right after the code: "250\r\n" is a last line. */
            p->state = SMTP_SS_TEXT | SMTP_SS_F_LAST;
            if (c != '\n')
                break;
            /* fallthrough */
        case SMTP_SS_TEXT:
            if (c == '\n') {
                if (first)
                    smtp_reply_esc(r);
                p->pending_cr = false;
                if (r->lines < UINT_MAX)
                    r->lines++;
                r->text[r->text_len] = '\0';
                if (p->state & SMTP_SS_F_LAST) {
                    p->state = SMTP_SS_CODE0;
                    p->handed_out = true;
                    ev->type = SMTP_SEV_REPLY;
                    ev->reply = r;
                    return i;
                }
                p->state = SMTP_SS_CODE0;
                break;
            }
            if (!first)
                break;
            if (p->pending_cr) {
                smtp_reply_add_text(r, '\r');
                p->pending_cr = false;
            }
            if (c == '\r')
                p->pending_cr = true;
            else
                smtp_reply_add_text(r, c);
            break;
        default:
            abort();
        }
    }
    return i;
}

/* --- EHLO reply rewriting ------------------------------------------------------------- */

#define SMTP_EHLO_MAX_LINES 64 /* capability lines considered; more: left unchanged */

bool smtp_ehlo_line_is(const char *line, size_t len, const char *kw)
{
    size_t n = strlen(kw);

    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        len--;
    if (len < 4 + n || (len > 4 + n && line[4 + n] != ' '))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = line[4 + i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (c != kw[i])
            return false;
    }
    return true;
}

static bool smtp_ehlo_is_starttls(const char *line, size_t len)
{
    return smtp_ehlo_line_is(line, len, "STARTTLS");
}

size_t smtp_line_end(const char *buf, size_t pos, size_t len)
{
    const char *lf = memchr(buf + pos, '\n', len - pos);
    return lf != NULL ? (size_t)(lf - buf) + 1 : len;
}

bool smtp_ehlo_offers_starttls(const char *in, size_t len)
{
    /* Capabilities start on the second line; the first names the server. */
    for (size_t pos = smtp_line_end(in, 0, len), end; pos < len; pos = end) {
        end = smtp_line_end(in, pos, len);
        if (smtp_ehlo_is_starttls(in + pos, end - pos))
            return true;
    }
    return false;
}

ssize_t smtp_ehlo_rewrite(const char *in, size_t len, bool add, char *out, size_t cap)
{
    return smtp_ehlo_edit(in, len, add ? SMTP_EHLO_ADD_STARTTLS : SMTP_EHLO_DEL_STARTTLS, out, cap);
}

ssize_t smtp_ehlo_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap)
{
    size_t start[SMTP_EHLO_MAX_LINES], end[SMTP_EHLO_MAX_LINES];
    bool keep[SMTP_EHLO_MAX_LINES];
    bool add = (flags & SMTP_EHLO_ADD_STARTTLS) != 0;
    bool del_tls = !add && (flags & SMTP_EHLO_DEL_STARTTLS) != 0;
    bool del_x = (flags & SMTP_EHLO_DEL_XCLIENT) != 0;
    size_t n = 0, o = 0, pos = 0;
    bool has = false, removed = false;

    while (pos < len) {
        const char *lf = memchr(in + pos, '\n', len - pos);
        if (lf == NULL || n == SMTP_EHLO_MAX_LINES)
            return -1;
        start[n] = pos;
        end[n] = (size_t)(lf - in) + 1;
        if (end[n] - start[n] < 5 || memcmp(in + pos, "250", 3) != 0 ||
            (in[pos + 3] != '-' && in[pos + 3] != ' '))
            return -1;
        bool tls = n > 0 && smtp_ehlo_is_starttls(in + pos, end[n] - pos);
        bool x = n > 0 && (smtp_ehlo_line_is(in + pos, end[n] - pos, "XCLIENT") ||
                           smtp_ehlo_line_is(in + pos, end[n] - pos, "XFORWARD"));
        keep[n] = !((del_tls && tls) || (del_x && x));
        has = has || tls;
        removed = removed || !keep[n];
        pos = end[n];
        n++;
    }
    if (n == 0)
        return -1;
    bool insert = add && !has; /* a new "250-STARTTLS" after the first line */
    if (!insert && !removed) {
        if (len > cap)
            return -1;
        memcpy(out, in, len);
        return (ssize_t)len;
    }
    size_t last = 0; /* index of the last line kept */
    for (size_t i = 0; i < n; i++)
        if (keep[i])
            last = i;
    for (size_t i = 0; i < n; i++) {
        size_t l = end[i] - start[i];
        if (!keep[i])
            continue;
        if (o + l + 16 > cap)
            return -1;
        memcpy(out + o, in + start[i], l);
        /* The separator says whether more lines follow: set it for the new shape. */
        bool more = i != last || (insert && i == 0);
        out[o + 3] = more ? '-' : ' ';
        o += l;
        if (insert && i == 0) {
            static const char ins[] = "250-STARTTLS\r\n", tail[] = "250 STARTTLS\r\n";
            const char *line = last == 0 ? tail : ins;
            memcpy(out + o, line, sizeof(ins) - 1);
            o += sizeof(ins) - 1;
        }
    }
    return (ssize_t)o;
}

ssize_t smtp_helo_reply(const char *in, size_t len, char *out, size_t cap)
{
    if (len == 0)
        return -1;
    size_t end = smtp_line_end(in, 0, len);
    if (end < 5 || in[end - 1] != '\n' || memcmp(in, "250", 3) != 0 ||
        (in[3] != '-' && in[3] != ' '))
        return -1;
    /* The line end is written anew as CRLF, whatever the server used. */
    size_t text = end - 5 - (in[end - 2] == '\r' ? 1 : 0);
    if (text + 6 > cap)
        return -1;
    memcpy(out, "250 ", 4);
    memcpy(out + 4, in + 4, text);
    memcpy(out + 4 + text, "\r\n", 2);
    return (ssize_t)(text + 6);
}
