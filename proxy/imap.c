/* imap.c: PURE IMAP framing (see imap.h for the contract). */
#include "imap.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Client parser states. */
enum {
    IMAP_CS_LINE = 0,     /* a command line, or the part of one after a literal */
    IMAP_CS_LITERAL,      /* literal data, lit_left bytes still to come */
    IMAP_CS_WAIT_LIT,     /* after a synchronizing announcement: "+" or a refusal */
    IMAP_CS_WAIT_AUTH,    /* AUTHENTICATE: "+" (a challenge) or the tagged end */
    IMAP_CS_AUTH_LINE,    /* one AUTHENTICATE continuation line */
    IMAP_CS_WAIT_IDLE,    /* IDLE sent: "+" or a refusal */
    IMAP_CS_IDLE,         /* idling: the next line is DONE */
    IMAP_CS_WAIT_REPLY,   /* DONE or COMPRESS sent: the tagged reply */
    IMAP_CS_BARRIER,      /* after STARTTLS, dropping bytes until its reply */
    IMAP_CS_SKIP,         /* dropping the rest of a refused line */
    IMAP_CS_SKIP_LITERAL, /* dropping a refused line's non-synchronizing literal */
};

/* SKIP: where the scanner for a literal's announcement at the end of the line stands. */
enum {
    IMAP_MK_NONE = 0, /* no announcement under way */
    IMAP_MK_OPEN,     /* "{" */
    IMAP_MK_DIGITS,   /* "{1" */
    IMAP_MK_PLUS,     /* "{1+" */
    IMAP_MK_CLOSE,    /* "{1}" or "{1+}" */
    IMAP_MK_CR,       /* "{1}\r" */
};

/* IMAP's verbs, indexed by enum imap_cmd (see verb.h). Before TLS (require_tls) a client may say
 * only what RFC 9051 6.1 allows in any state, STARTTLS and ID; an unknown verb may not. */
#define IMAP_PRE VERB_BEFORE_TLS
const struct verb imap_verbs[IMAP_CMD_COUNT_] = {
    [IMAP_CMD_NONE] = VERB_PSEUDO("", 0),
    [IMAP_CMD_UNKNOWN] = VERB_PSEUDO("UNKNOWN", 0),
    [IMAP_CMD_CAPABILITY] = VERB("CAPABILITY", IMAP_PRE),
    [IMAP_CMD_NOOP] = VERB("NOOP", IMAP_PRE),
    [IMAP_CMD_LOGOUT] = VERB("LOGOUT", IMAP_PRE | VERB_ENDS),
    [IMAP_CMD_STARTTLS] = VERB("STARTTLS", IMAP_PRE | VERB_BARRIER),
    [IMAP_CMD_AUTHENTICATE] = VERB("AUTHENTICATE", VERB_WAIT | VERB_CREDENTIALS),
    [IMAP_CMD_LOGIN] = VERB("LOGIN", VERB_CREDENTIALS),
    [IMAP_CMD_ENABLE] = VERB("ENABLE", 0),
    [IMAP_CMD_ID] = VERB("ID", IMAP_PRE),
    [IMAP_CMD_SELECT] = VERB("SELECT", 0),
    [IMAP_CMD_EXAMINE] = VERB("EXAMINE", 0),
    [IMAP_CMD_CREATE] = VERB("CREATE", 0),
    [IMAP_CMD_DELETE] = VERB("DELETE", 0),
    [IMAP_CMD_RENAME] = VERB("RENAME", 0),
    [IMAP_CMD_SUBSCRIBE] = VERB("SUBSCRIBE", 0),
    [IMAP_CMD_UNSUBSCRIBE] = VERB("UNSUBSCRIBE", 0),
    [IMAP_CMD_LIST] = VERB("LIST", 0),
    [IMAP_CMD_LSUB] = VERB("LSUB", 0),
    [IMAP_CMD_NAMESPACE] = VERB("NAMESPACE", 0),
    [IMAP_CMD_STATUS] = VERB("STATUS", 0),
    [IMAP_CMD_APPEND] = VERB("APPEND", 0),
    [IMAP_CMD_IDLE] = VERB("IDLE", VERB_WAIT),
    [IMAP_CMD_CHECK] = VERB("CHECK", 0),
    [IMAP_CMD_CLOSE] = VERB("CLOSE", 0),
    [IMAP_CMD_UNSELECT] = VERB("UNSELECT", 0),
    [IMAP_CMD_EXPUNGE] = VERB("EXPUNGE", 0),
    [IMAP_CMD_SEARCH] = VERB("SEARCH", 0),
    [IMAP_CMD_FETCH] = VERB("FETCH", 0),
    [IMAP_CMD_STORE] = VERB("STORE", 0),
    [IMAP_CMD_COPY] = VERB("COPY", 0),
    [IMAP_CMD_MOVE] = VERB("MOVE", 0),
    [IMAP_CMD_UID] = VERB("UID", 0),
    [IMAP_CMD_COMPRESS] = VERB("COMPRESS", VERB_WAIT),
    [IMAP_CMD_GETQUOTAROOT] = VERB("GETQUOTAROOT", 0),
    [IMAP_CMD_GETQUOTA] = VERB("GETQUOTA", 0),
    [IMAP_CMD_SETQUOTA] = VERB("SETQUOTA", 0),
    [IMAP_CMD_GETACL] = VERB("GETACL", 0),
    [IMAP_CMD_SETACL] = VERB("SETACL", 0),
    [IMAP_CMD_MYRIGHTS] = VERB("MYRIGHTS", 0),
    [IMAP_CMD_GETMETADATA] = VERB("GETMETADATA", 0),
    [IMAP_CMD_SETMETADATA] = VERB("SETMETADATA", 0),
    [IMAP_CMD_NOTIFY] = VERB("NOTIFY", 0),
};

static const char imap_cancel[] = "*\r\n";
static const char imap_redacted[] = " [redacted]";

const char *imap_cmd_name(enum imap_cmd cmd)
{
    return verb_name(imap_verbs, IMAP_CMD_COUNT_, (unsigned)cmd);
}

unsigned imap_cmd_flags(enum imap_cmd cmd)
{
    return verb_flags(imap_verbs, IMAP_CMD_COUNT_, (unsigned)cmd);
}

void imap_client_init(struct imap_client *p, const struct imap_client_opts *opts)
{
    memset(p, 0, sizeof(*p));
    if (opts != NULL)
        p->max_line = opts->max_line_length;
}

static void imap_ev_reset(struct imap_event *ev, enum imap_ev type)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
}

static char imap_upper(char c)
{
    return (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c;
}

/* Case-insensitive match of s[0, n) against an upper-case word, whole. */
static bool imap_word_is(const char *s, size_t n, const char *word)
{
    size_t wl = strlen(word);

    if (n != wl)
        return false;
    for (size_t i = 0; i < n; i++)
        if (imap_upper(s[i]) != word[i])
            return false;
    return true;
}

/* A byte of a tag (RFC 9051: ASTRING-CHAR except "+"; bytes over 0x7f are let through, as
 * Dovecot lets them through). */
static bool imap_tag_char(char c)
{
    unsigned char u = (unsigned char)c;

    if (u <= 0x20 || u == 0x7f)
        return false;
    return strchr("(){%*\"\\+", c) == NULL;
}

static size_t imap_token_end(const char *s, size_t i, size_t n)
{
    while (i < n && s[i] != ' ')
        i++;
    return i;
}

/* Does the token s[0, n) start with a credential verb (LOGIN, AUTHENTICATE; any case) glued to
 * what follows by a byte that ends an atom but is no SP ("LOGIN\tjoe", "LOGIN{5}")? *len: the
 * verb's length. */
static bool imap_credential_prefix(const char *s, size_t n, size_t *len)
{
    for (unsigned k = 0; k < IMAP_CMD_COUNT_; k++) {
        size_t vl = imap_verbs[k].len;
        if (!(imap_verbs[k].flags & VERB_CREDENTIALS) || n <= vl || !verb_is(&imap_verbs[k], s, vl))
            continue;
        unsigned char c = (unsigned char)s[vl];
        if (c < 0x20 || c == 0x7f || c == '(' || c == ')' || c == '{' || c == '"') {
            *len = vl;
            return true;
        }
    }
    return false;
}

static enum imap_cmd imap_verb_find(const char *s, size_t n)
{
    return (enum imap_cmd)verb_find(imap_verbs, IMAP_CMD_COUNT_, s, n, IMAP_CMD_UNKNOWN);
}

/* Is s[0, n) (a whole line, without its line end) a tag, SP and a verb mxproxy knows? */
static bool imap_is_command(const char *s, size_t n)
{
    size_t t = 0, v;

    while (t < n && imap_tag_char(s[t]))
        t++;
    if (t == 0 || t == n || s[t] != ' ')
        return false;
    v = imap_token_end(s, t + 1, n);
    return imap_verb_find(s + t + 1, v - t - 1) != IMAP_CMD_UNKNOWN;
}

/* A literal's announcement at the end of s[0, n) (the line without its line end):
 * "{digits}", "{digits+}" or "{digits-}" (RFC 7888), also after "~" (RFC 3516). */
static bool imap_literal_at_end(const char *s, size_t n, uint64_t *size, bool *sync)
{
    size_t i, e;
    uint64_t v = 0;

    if (n < 3 || s[n - 1] != '}')
        return false;
    i = n - 1;
    *sync = !(s[i - 1] == '+' || s[i - 1] == '-');
    if (!*sync)
        i--;
    e = i;
    while (i > 0 && s[i - 1] >= '0' && s[i - 1] <= '9' && e - i < 20)
        i--;
    /* 19 digits always fit in 64 bits; more are no announcement a server would take. */
    if (i == e || e - i > 19 || i == 0 || s[i - 1] != '{')
        return false;
    for (size_t k = i; k < e; k++)
        v = v * 10 + (uint64_t)(s[k] - '0');
    *size = v;
    return true;
}

static void imap_text_add(struct imap_client *p, const char *s, size_t n)
{
    size_t room = IMAP_TEXT_MAX - p->text_len;

    if (n > room)
        n = room;
    if (n > 0)
        memcpy(p->text + p->text_len, s, n);
    p->text_len += n;
    p->text[p->text_len] = '\0';
}

static void imap_set_tag(struct imap_client *p, const char *s, size_t n)
{
    if (n > IMAP_TAG_MAX)
        n = IMAP_TAG_MAX;
    if (n > 0)
        memcpy(p->tag, s, n);
    p->tag_len = n;
    p->tag[n] = '\0';
}

/* Reads the tag at the start of s[0, n) into p->tag; returns its end, or 0 (and an empty
 * tag) when the line does not start with a valid tag followed by SP or the line's end. */
static size_t imap_read_tag(struct imap_client *p, const char *s, size_t n, bool complete)
{
    size_t t = 0;

    while (t < n && imap_tag_char(s[t]))
        t++;
    if (t == 0 || (t < n && s[t] != ' ' && s[t] != '\r' && s[t] != '\n') || (t == n && !complete)) {
        imap_set_tag(p, "", 0);
        return 0;
    }
    imap_set_tag(p, s, t);
    return t;
}

/* The first part s[0, n) of a command (line end excluded): tag, verb and loggable text. */
static void imap_head(struct imap_client *p, const char *s, size_t n)
{
    size_t t = imap_read_tag(p, s, n, true), vb, ve, vl;

    p->flags = 0;
    p->redact = false;
    p->text_len = 0;
    p->text[0] = '\0';
    if (t == 0) {
        /* Never paired, so never logged: "* LOGIN joe pass" is refused by the server, but
         * the password may be real. */
        p->flags |= IMAP_EV_F_NO_TAG;
        p->cmd = IMAP_CMD_UNKNOWN;
        p->redact = true;
        return;
    } else {
        vb = t < n ? t + 1 : n;
        ve = imap_token_end(s, vb, n);
        p->cmd = ve > vb ? imap_verb_find(s + vb, ve - vb) : IMAP_CMD_UNKNOWN;
        /* A tag that is itself a credential verb: a client that forgot its tags. */
        if (imap_verb_find(s, t) == IMAP_CMD_LOGIN ||
            imap_verb_find(s, t) == IMAP_CMD_AUTHENTICATE) {
            p->redact = true;
            imap_text_add(p, imap_redacted + 1, sizeof(imap_redacted) - 2);
            return;
        }
    }
    if (p->cmd == IMAP_CMD_UNKNOWN && imap_credential_prefix(s + vb, ve - vb, &vl)) {
        /* No command a server runs, but the password may be real. */
        p->redact = true;
        imap_text_add(p, s + vb, vl);
        imap_text_add(p, imap_redacted, sizeof(imap_redacted) - 1);
        return;
    }
    if (p->cmd == IMAP_CMD_LOGIN) {
        p->redact = true;
        imap_text_add(p, s + vb, ve - vb);
        if (ve < n)
            imap_text_add(p, imap_redacted, sizeof(imap_redacted) - 1);
        return;
    }
    if (p->cmd == IMAP_CMD_AUTHENTICATE) {
        size_t mb = ve < n ? ve + 1 : n, me = mb;
        p->redact = true;
        while (me < n && me - mb <= IMAP_SASL_MECH_MAX && s[me] != ' ' && s[me] != '{')
            me++;
        imap_text_add(p, s + vb, ve - vb);
        if (me > mb && me - mb <= IMAP_SASL_MECH_MAX) {
            imap_text_add(p, " ", 1);
            imap_text_add(p, s + mb, me - mb);
        } else {
            me = ve;
        }
        if (me < n) {
            p->flags |= IMAP_EV_F_AUTH_INITIAL;
            imap_text_add(p, imap_redacted, sizeof(imap_redacted) - 1);
        }
        return;
    }
    imap_text_add(p, s + vb, n - vb);
}

/* Outcome of looking for the end of a line. */
enum imap_line {
    IMAP_LINE_MORE, /* no LF yet and still under the limit */
    IMAP_LINE_OK,   /* buf[0, *end) is a line ending in CRLF */
    IMAP_LINE_BAD,  /* buf[0, *end) is a line ending in LF with a fault in it */
    IMAP_LINE_LONG, /* over the limit: drop buf[0, *end), then skip up to the LF */
};

static enum imap_line imap_find_line(struct imap_client *p, const char *buf, size_t len,
                                     size_t room, size_t *end)
{
    size_t i = p->scan <= len ? p->scan : 0;

    if (i == 0)
        p->bad = NULL;
    for (; i < len && i < room; i++) {
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
    /* An overlong line always costs exactly room bytes here and the rest is skipped, so the
     * events do not depend on how the line was split into reads. */
    if (i >= room) {
        *end = room;
        return IMAP_LINE_LONG;
    }
    if (i == len || buf[i] != '\n') {
        p->scan = i;
        return IMAP_LINE_MORE;
    }
    *end = i + 1;
    if ((i == 0 || buf[i - 1] != '\r') && p->bad == NULL)
        p->bad = "bare LF";
    return p->bad != NULL ? IMAP_LINE_BAD : IMAP_LINE_OK;
}

/* Feeds dropped bytes of a refused line to the scanner that spots a literal's announcement at
 * its end. Returns the index just past the line's LF, or n when the line goes on. */
static size_t imap_mark_feed(struct imap_client *p, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool digit = c >= '0' && c <= '9';

        if (c == '\n')
            return i + 1;
        switch (p->mark) {
        case IMAP_MK_OPEN:
        case IMAP_MK_DIGITS:
            if (digit && p->mark_val < UINT64_MAX / 10 - 9) {
                p->mark_val = p->mark_val * 10 + (uint64_t)(c - '0');
                p->mark = IMAP_MK_DIGITS;
                continue;
            }
            if (p->mark == IMAP_MK_DIGITS && (c == '+' || c == '-')) {
                p->mark = IMAP_MK_PLUS;
                p->mark_sync = false;
                continue;
            }
            /* fallthrough */
        case IMAP_MK_PLUS:
            if (p->mark != IMAP_MK_OPEN && c == '}') {
                p->mark = IMAP_MK_CLOSE;
                continue;
            }
            break;
        case IMAP_MK_CLOSE:
            if (c == '\r') {
                p->mark = IMAP_MK_CR;
                continue;
            }
            break;
        default:
            break;
        }
        p->mark = c == '{' ? IMAP_MK_OPEN : IMAP_MK_NONE;
        p->mark_val = 0;
        p->mark_sync = true;
    }
    return n;
}

static void imap_mark_reset(struct imap_client *p)
{
    p->mark = IMAP_MK_NONE;
    p->mark_val = 0;
    p->mark_sync = true;
}

/* The LF of a refused line was dropped: a non-synchronizing literal announced at its end is
 * dropped too (the client sends it without waiting), then the line goes on; else the parser
 * goes back to skip_next. */
static void imap_skip_done(struct imap_client *p)
{
    /* AUTHENTICATE lines have no literals. */
    if ((p->mark == IMAP_MK_CLOSE || p->mark == IMAP_MK_CR) && !p->mark_sync && p->mark_val > 0 &&
        p->skip_next == IMAP_CS_LINE) {
        p->lit_left = p->mark_val;
        p->state = IMAP_CS_SKIP_LITERAL;
    } else {
        p->state = p->skip_next;
    }
    imap_mark_reset(p);
}

/* Forgets the command in progress. */
static void imap_cmd_done(struct imap_client *p)
{
    p->in_cmd = false;
    p->line_used = 0;
    p->lit_total = 0;
}

/* A refused line (TOO_LONG or INVALID) in state st: fills ev, which has its type. */
static void imap_refuse(struct imap_client *p, unsigned st, const char *buf, size_t n,
                        struct imap_event *ev)
{
    ev->cmd = p->cmd;
    if (st == IMAP_CS_AUTH_LINE) {
        /* The server still expects a continuation line: cancel the exchange instead. */
        ev->fwd = imap_cancel;
        ev->fwd_len = 3;
        ev->flags |= IMAP_EV_F_CANCEL;
        p->skip_next = IMAP_CS_WAIT_AUTH;
    } else {
        if (st == IMAP_CS_IDLE || p->in_cmd) {
            ev->flags |= IMAP_EV_F_MIDCMD;
            if (p->in_cmd) {
                /* What the command was, for the log line of its aborted pair. */
                ev->text = p->text;
                ev->text_len = p->text_len;
                ev->size = p->lit_total;
            }
        } else
            imap_read_tag(p, buf, n, false);
        if (!p->in_cmd && st == IMAP_CS_LINE)
            p->cmd = IMAP_CMD_NONE;
        ev->cmd = p->cmd;
        p->skip_next = IMAP_CS_LINE;
        imap_cmd_done(p);
    }
    ev->tag = p->tag;
    ev->tag_len = p->tag_len;
    p->bad = NULL;
}

/* A command line longer than IMAP_STREAM_AT (but within the limit): its first part goes out
 * now, the last bytes stay so that a literal's announcement at its end is seen whole. */
static size_t imap_stream(struct imap_client *p, const char *buf, struct imap_event *ev)
{
    size_t n = IMAP_STREAM_AT - IMAP_STREAM_TAIL;
    bool cont = p->in_cmd;

    if (!cont)
        imap_head(p, buf, n);
    else if (!p->redact)
        imap_text_add(p, buf, n);
    p->line_used += n;
    p->in_cmd = true;
    p->bad = NULL;
    imap_ev_reset(ev, cont ? IMAP_EV_PART : IMAP_EV_BEGIN);
    ev->flags |= p->flags & (IMAP_EV_F_NO_TAG | IMAP_EV_F_AUTH_INITIAL);
    ev->cmd = p->cmd;
    ev->tag = p->tag;
    ev->tag_len = p->tag_len;
    ev->text = p->text;
    ev->text_len = p->text_len;
    ev->fwd = buf;
    ev->fwd_len = n;
    return n;
}

/* Command, continuation and DONE lines. */
static size_t imap_line(struct imap_client *p, const char *buf, size_t len, struct imap_event *ev)
{
    unsigned st = p->state;
    size_t room = st == IMAP_CS_LINE ? p->max_line - p->line_used : p->max_line;
    size_t lim = room < IMAP_STREAM_AT ? room : IMAP_STREAM_AT;
    size_t end = 0, n;
    uint64_t lit = 0;
    bool sync = true;

    bool after_auth = p->after_auth;

    switch (imap_find_line(p, buf, len, lim, &end)) {
    case IMAP_LINE_MORE:
        imap_ev_reset(ev, IMAP_EV_AGAIN);
        return 0;
    case IMAP_LINE_LONG:
        p->after_auth = false;
        p->after_lit = false;
        if (st == IMAP_CS_LINE && lim < room) {
            /* Long but allowed: it goes out in parts, so the caller never holds more than
             * IMAP_STREAM_AT bytes; a fault in the part is one the backend must not see. */
            if (p->bad == NULL)
                return imap_stream(p, buf, ev);
            imap_ev_reset(ev, IMAP_EV_INVALID);
            ev->reason = p->bad;
        } else {
            imap_ev_reset(ev, IMAP_EV_TOO_LONG);
            ev->reason = "line too long";
        }
        imap_mark_reset(p);
        imap_mark_feed(p, buf, end);
        imap_refuse(p, st, buf, end, ev);
        p->state = IMAP_CS_SKIP;
        return end;
    case IMAP_LINE_BAD:
        p->after_auth = false;
        if (p->after_lit && st == IMAP_CS_LINE && !p->in_cmd) {
            imap_ev_reset(ev, IMAP_EV_DISCARD); /* binary credentials: see above */
            ev->size = end;
            return end;
        }
        imap_ev_reset(ev, IMAP_EV_INVALID);
        ev->reason = p->bad;
        imap_mark_reset(p);
        imap_mark_feed(p, buf, end - 1);
        imap_refuse(p, st, buf, end, ev);
        imap_skip_done(p);
        return end;
    case IMAP_LINE_OK:
        break;
    }
    n = end - 2;
    p->after_auth = false;
    if (after_auth && st == IMAP_CS_LINE && !p->in_cmd && memchr(buf, ' ', n) == NULL) {
        /* A SASL response the client sent without waiting for "+" (see IMAP_EV_DISCARD). */
        imap_ev_reset(ev, IMAP_EV_DISCARD);
        ev->size = end;
        return end;
    }
    if (p->after_lit && st == IMAP_CS_LINE && !p->in_cmd) {
        if (!imap_is_command(buf, n)) {
            /* Credentials sent without waiting for a "+" that never came (IMAP_EV_DISCARD). */
            imap_ev_reset(ev, IMAP_EV_DISCARD);
            ev->size = end;
            return end;
        }
        p->after_lit = false;
    }
    if (st == IMAP_CS_AUTH_LINE) {
        imap_ev_reset(ev, IMAP_EV_AUTH_RESPONSE);
        ev->cmd = IMAP_CMD_AUTHENTICATE;
        ev->fwd = buf;
        ev->fwd_len = end;
        if (n == 1 && buf[0] == '*')
            ev->flags |= IMAP_EV_F_CANCEL;
        p->state = IMAP_CS_WAIT_AUTH;
        return end;
    }
    if (st == IMAP_CS_IDLE) {
        imap_ev_reset(ev, IMAP_EV_DONE);
        ev->cmd = IMAP_CMD_IDLE;
        ev->fwd = buf;
        ev->fwd_len = end;
        p->state = IMAP_CS_WAIT_REPLY;
        return end;
    }
    bool cont = p->in_cmd;
    if (!cont)
        imap_head(p, buf, n);
    else if (!p->redact)
        imap_text_add(p, buf, n);
    p->line_used += end;
    if (imap_literal_at_end(buf, n, &lit, &sync)) {
        imap_ev_reset(ev, cont ? IMAP_EV_PART : IMAP_EV_BEGIN);
        ev->text = p->text; /* so far: a command refused here is logged for what it was */
        ev->text_len = p->text_len;
        p->in_cmd = true;
        p->lit_total += lit;
        if (sync) {
            ev->flags |= IMAP_EV_F_SYNC;
            p->lit_next = lit;
            p->state = IMAP_CS_WAIT_LIT;
        } else {
            p->lit_left = lit;
            p->state = lit > 0 ? IMAP_CS_LITERAL : IMAP_CS_LINE;
        }
    } else {
        imap_ev_reset(ev, IMAP_EV_COMMAND);
        ev->text = p->text;
        ev->text_len = p->text_len;
        ev->size = p->lit_total;
        if (cont)
            ev->flags |= IMAP_EV_F_CONTINUED;
        imap_cmd_done(p);
        unsigned f = imap_cmd_flags(p->cmd);
        /* A command the server cannot take for one (no tag) is answered untagged: waiting
         * for its tagged reply would wait for ever. */
        if (p->flags & IMAP_EV_F_NO_TAG)
            f = 0;
        if (f & VERB_BARRIER)
            p->state = IMAP_CS_BARRIER;
        else if (p->cmd == IMAP_CMD_AUTHENTICATE)
            p->state = IMAP_CS_WAIT_AUTH;
        else if (p->cmd == IMAP_CMD_IDLE)
            p->state = IMAP_CS_WAIT_IDLE;
        else if (f & VERB_WAIT)
            p->state = IMAP_CS_WAIT_REPLY;
    }
    ev->flags |= p->flags & (IMAP_EV_F_NO_TAG | IMAP_EV_F_AUTH_INITIAL);
    ev->cmd = p->cmd;
    ev->tag = p->tag;
    ev->tag_len = p->tag_len;
    ev->fwd = buf;
    ev->fwd_len = end;
    return end;
}

size_t imap_client_parse(struct imap_client *p, const char *buf, size_t len, struct imap_event *ev)
{
    if (p->max_line == 0)
        p->max_line = IMAP_DEFAULT_MAX_LINE;
    else if (p->max_line < IMAP_MIN_MAX_LINE)
        p->max_line = IMAP_MIN_MAX_LINE;
    if (buf == NULL)
        len = 0;

    switch (p->state) {
    case IMAP_CS_LINE:
    case IMAP_CS_AUTH_LINE:
    case IMAP_CS_IDLE:
        return imap_line(p, buf, len, ev);
    case IMAP_CS_LITERAL:
    case IMAP_CS_SKIP_LITERAL: {
        size_t n = p->lit_left < len ? (size_t)p->lit_left : len;
        bool skip = p->state == IMAP_CS_SKIP_LITERAL;
        if (n == 0) {
            imap_ev_reset(ev, IMAP_EV_AGAIN);
            return 0;
        }
        imap_ev_reset(ev, skip ? IMAP_EV_DISCARD : IMAP_EV_LITERAL);
        if (!skip) {
            ev->fwd = buf;
            ev->fwd_len = n;
        }
        ev->size = n;
        p->lit_left -= n;
        if (p->lit_left == 0) {
            p->state = skip ? IMAP_CS_SKIP : IMAP_CS_LINE;
            p->scan = 0;
            p->bad = NULL;
        }
        return n;
    }
    case IMAP_CS_SKIP: {
        size_t n = imap_mark_feed(p, buf, len);
        if (n == 0) {
            imap_ev_reset(ev, IMAP_EV_AGAIN);
            return 0;
        }
        imap_ev_reset(ev, IMAP_EV_DISCARD);
        ev->size = n;
        if (buf[n - 1] == '\n')
            imap_skip_done(p);
        return n;
    }
    case IMAP_CS_WAIT_LIT:
    case IMAP_CS_WAIT_AUTH:
    case IMAP_CS_WAIT_IDLE:
    case IMAP_CS_WAIT_REPLY:
        imap_ev_reset(ev, IMAP_EV_WAIT);
        ev->cmd = p->cmd;
        ev->tag = p->tag;
        ev->tag_len = p->tag_len;
        return 0;
    case IMAP_CS_BARRIER:
        if (len == 0) {
            imap_ev_reset(ev, IMAP_EV_AGAIN);
            return 0;
        }
        imap_ev_reset(ev, IMAP_EV_INJECTED);
        ev->size = len;
        p->injected += len;
        return len;
    default:
        abort();
    }
}

bool imap_client_idling(const struct imap_client *p)
{
    return p->state == IMAP_CS_WAIT_IDLE || p->state == IMAP_CS_IDLE;
}

void imap_client_on_continue(struct imap_client *p)
{
    switch (p->state) {
    case IMAP_CS_WAIT_LIT:
        p->lit_left = p->lit_next;
        p->state = p->lit_left > 0 ? IMAP_CS_LITERAL : IMAP_CS_LINE;
        break;
    case IMAP_CS_WAIT_AUTH:
        p->state = IMAP_CS_AUTH_LINE;
        break;
    case IMAP_CS_WAIT_IDLE:
        p->state = IMAP_CS_IDLE;
        break;
    default:
        return;
    }
    p->scan = 0;
    p->bad = NULL;
}

void imap_client_on_tagged(struct imap_client *p, const char *tag, size_t len)
{
    if (len > IMAP_TAG_MAX)
        len = IMAP_TAG_MAX;
    if (len != p->tag_len || memcmp(tag, p->tag, len) != 0)
        return;
    switch (p->state) {
    case IMAP_CS_WAIT_LIT: {
        /* The server refused the literal: the client will not send it, nor the rest. One
         * that sends them anyway sends credentials when the command was LOGIN or
         * AUTHENTICATE: its lines that are no command are dropped (IMAP_EV_DISCARD). */
        bool credentials = p->redact;
        imap_cmd_done(p);
        p->after_lit = credentials;
        break;
    }
    case IMAP_CS_WAIT_AUTH:
    case IMAP_CS_AUTH_LINE:
        p->after_auth = true; /* a response the client sent anyway comes next */
        break;
    case IMAP_CS_WAIT_IDLE:
    case IMAP_CS_IDLE:
    case IMAP_CS_WAIT_REPLY:
    case IMAP_CS_BARRIER:
        break;
    default:
        return;
    }
    p->state = IMAP_CS_LINE;
    p->scan = 0;
    p->bad = NULL;
}

/* --- server responses -------------------------------------------------------------------- */

/* Server parser states. */
enum {
    IMAP_SS_LINE = 0, /* a response line, or its part after a literal */
    IMAP_SS_LITERAL,  /* literal data, lit_left bytes still to come */
};

#define IMAP_SERVER_TAIL 32 /* bytes of a streamed line held back: an announcement fits */

static const char *const imap_status_names[] = {
    [IMAP_ST_NONE] = "",   [IMAP_ST_OK] = "OK",   [IMAP_ST_NO] = "NO",
    [IMAP_ST_BAD] = "BAD", [IMAP_ST_BYE] = "BYE", [IMAP_ST_PREAUTH] = "PREAUTH",
};

const char *imap_status_name(enum imap_status st)
{
    if ((unsigned)st >= sizeof(imap_status_names) / sizeof(imap_status_names[0]))
        return "";
    return imap_status_names[st];
}

static enum imap_status imap_status_find(const char *s, size_t n)
{
    for (unsigned i = IMAP_ST_OK; i <= IMAP_ST_PREAUTH; i++)
        if (imap_word_is(s, n, imap_status_names[i]))
            return (enum imap_status)i;
    return IMAP_ST_NONE;
}

/* Copies s[0, n) upper-cased into a keyword field, cut to IMAP_KEYWORD_MAX. */
static void imap_keyword_copy(char *dst, const char *s, size_t n)
{
    if (n > IMAP_KEYWORD_MAX)
        n = IMAP_KEYWORD_MAX;
    for (size_t i = 0; i < n; i++)
        dst[i] = imap_upper(s[i]);
    dst[n] = '\0';
}

static void imap_resp_text(struct imap_resp *r, const char *s, size_t n)
{
    if (n > IMAP_TEXT_MAX) {
        n = IMAP_TEXT_MAX;
        r->truncated = true;
    }
    if (n > 0)
        memcpy(r->text, s, n);
    r->text_len = n;
    r->text[n] = '\0';
    /* "[CODE ...]" or "[CODE]": its first word says what the response is about. */
    if (n > 1 && s[0] == '[') {
        size_t e = 1;
        while (e < n && s[e] != ' ' && s[e] != ']')
            e++;
        imap_keyword_copy(r->code, s + 1, e - 1);
    }
}

/* Summarises the first line s[0, n) of a response (line end excluded; for a streamed line,
 * its first IMAP_SERVER_HOLD bytes). */
static void imap_server_head(struct imap_resp *r, const char *s, size_t n)
{
    size_t e;

    if (n >= 1 && s[0] == '+' && (n == 1 || s[1] == ' ')) {
        r->kind = IMAP_RESP_CONTINUE;
        imap_resp_text(r, s + (n > 1 ? 2 : 1), n > 1 ? n - 2 : 0);
        return;
    }
    if (n >= 2 && s[0] == '*' && s[1] == ' ') {
        size_t i = 2;

        r->kind = IMAP_RESP_UNTAGGED;
        if (i < n && s[i] >= '0' && s[i] <= '9') {
            uint64_t v = 0;
            for (e = i; e < n && s[e] >= '0' && s[e] <= '9' && e - i < 19; e++)
                v = v * 10 + (uint64_t)(s[e] - '0');
            if (e < n && s[e] == ' ') {
                r->number = v;
                r->has_number = true;
                i = e + 1;
            }
        }
        e = imap_token_end(s, i, n);
        imap_keyword_copy(r->keyword, s + i, e - i);
        if (!r->has_number)
            r->status = imap_status_find(s + i, e - i);
        e = e < n ? e + 1 : n;
        imap_resp_text(r, s + e, n - e);
        return;
    }
    e = 0;
    while (e < n && imap_tag_char(s[e]))
        e++;
    if (e > 0 && e < n && s[e] == ' ') {
        size_t sb = e + 1, se = imap_token_end(s, sb, n);
        enum imap_status st = imap_status_find(s + sb, se - sb);
        if (st == IMAP_ST_OK || st == IMAP_ST_NO || st == IMAP_ST_BAD) {
            r->kind = IMAP_RESP_TAGGED;
            r->status = st;
            r->tag_len = e < IMAP_TAG_MAX ? e : IMAP_TAG_MAX;
            memcpy(r->tag, s, r->tag_len);
            r->tag[r->tag_len] = '\0';
            se = se < n ? se + 1 : n;
            imap_resp_text(r, s + se, n - se);
            return;
        }
    }
    r->kind = IMAP_RESP_GARBAGE;
    imap_resp_text(r, s, n);
}

static void imap_sev_reset(struct imap_server_event *ev, enum imap_sev type)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
}

size_t imap_server_parse(struct imap_server *p, const char *buf, size_t len, uint64_t now_ns,
                         struct imap_server_event *ev)
{
    struct imap_resp *r = &p->cur;

    imap_sev_reset(ev, IMAP_SEV_AGAIN);
    if (p->handed_out) {
        memset(r, 0, sizeof(*r)); /* the caller is done with the last response */
        p->handed_out = false;
        p->head_done = false;
        p->streamed = false;
    }
    if (buf == NULL || len == 0)
        return 0;
    if (r->size == 0 && !p->head_done && p->scan == 0)
        r->t_first = now_ns;

    if (p->state == IMAP_SS_LITERAL) {
        size_t n = p->lit_left < len ? (size_t)p->lit_left : len;
        imap_sev_reset(ev, IMAP_SEV_DATA);
        ev->flags = IMAP_SEV_F_LITERAL;
        ev->fwd = buf;
        ev->fwd_len = n;
        p->lit_left -= n;
        r->size += n;
        if (p->lit_left == 0)
            p->state = IMAP_SS_LINE;
        return n;
    }
    assert(p->state == IMAP_SS_LINE);

    size_t window = len;
    const char *lf = NULL;

    if (window > IMAP_SERVER_HOLD)
        window = IMAP_SERVER_HOLD;
    if (p->scan < window)
        lf = memchr(buf + p->scan, '\n', window - p->scan);

    if (lf == NULL) {
        if (len < IMAP_SERVER_HOLD) {
            p->scan = window;
            return 0;
        }
        /* A long line (a big SEARCH result): pass it on as it comes. */
        size_t n = IMAP_SERVER_HOLD - IMAP_SERVER_TAIL;
        if (!p->head_done) {
            imap_server_head(r, buf, IMAP_SERVER_HOLD);
            p->head_done = true;
        }
        p->scan = 0;
        p->streamed = true;
        r->size += n;
        imap_sev_reset(ev, IMAP_SEV_DATA);
        ev->fwd = buf;
        ev->fwd_len = n;
        return n;
    }
    size_t end = (size_t)(lf - buf) + 1, n = end - 1;
    uint64_t lit = 0;
    bool sync = true;

    if (n > 0 && buf[n - 1] == '\r')
        n--;
    p->scan = 0;
    if (!p->head_done) {
        imap_server_head(r, buf, n);
        p->head_done = true;
    }
    r->size += end;
    ev->fwd = buf;
    ev->fwd_len = end;
    /* Only untagged data ("* 1 FETCH (BODY[] {310}") carries literals. */
    if (r->kind == IMAP_RESP_UNTAGGED && r->status == IMAP_ST_NONE &&
        imap_literal_at_end(buf, n, &lit, &sync)) {
        ev->type = IMAP_SEV_DATA;
        r->literals++;
        r->lit_size += lit;
        p->lit_left = lit;
        p->streamed = true;
        if (lit > 0)
            p->state = IMAP_SS_LITERAL;
        return end;
    }
    ev->type = IMAP_SEV_RESPONSE;
    if (!p->streamed)
        ev->flags |= IMAP_SEV_F_WHOLE;
    ev->resp = r;
    p->handed_out = true;
    return end;
}

bool imap_server_mid_response(const struct imap_server *p)
{
    return p->streamed && !p->handed_out;
}

/* --- capability lists -------------------------------------------------------------------- */

/* Finds the capability list of the line s[0, n) (line end excluded): [*a, *b). */
static bool imap_capa_range(const char *s, size_t n, size_t *a, size_t *b)
{
    size_t i, e;

    if (n >= 12 && s[0] == '*' && s[1] == ' ' && imap_word_is(s + 2, 10, "CAPABILITY") &&
        (n == 12 || s[12] == ' ')) {
        *a = n == 12 ? 12 : 13;
        *b = n;
        return true;
    }
    i = imap_token_end(s, 0, n);
    if (i == 0 || i + 1 >= n)
        return false;
    e = imap_token_end(s, i + 1, n);
    if (imap_status_find(s + i + 1, e - i - 1) == IMAP_ST_NONE)
        return false;
    if (e + 12 > n || s[e] != ' ' || s[e + 1] != '[' || !imap_word_is(s + e + 2, 10, "CAPABILITY"))
        return false;
    i = e + 12;
    if (i < n && s[i] == ' ')
        i++;
    else if (i >= n || s[i] != ']')
        return false;
    const char *close = memchr(s + i, ']', n - i);
    if (close == NULL)
        return false;
    *a = i;
    *b = (size_t)(close - s);
    return true;
}

/* True when the capability token t[0, n) is word ("COMPRESS=" matches any COMPRESS=x). */
static bool imap_capa_is(const char *t, size_t n, const char *word)
{
    size_t wl = strlen(word);

    if (wl > 0 && word[wl - 1] == '=')
        return n >= wl && imap_word_is(t, wl, word);
    return imap_word_is(t, n, word);
}

bool imap_capa_has(const char *in, size_t len, const char *word)
{
    size_t a, b;

    while (len > 0 && (in[len - 1] == '\n' || in[len - 1] == '\r'))
        len--;
    if (!imap_capa_range(in, len, &a, &b))
        return false;
    for (size_t i = a, e; i < b; i = e + 1) {
        e = imap_token_end(in, i, b);
        if (imap_capa_is(in + i, e - i, word))
            return true;
    }
    return false;
}

ssize_t imap_capa_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap)
{
    static const struct {
        const char *word;
        unsigned add, del;
    } edits[] = {
        {"STARTTLS", IMAP_CAPA_ADD_STARTTLS, IMAP_CAPA_DEL_STARTTLS},
        {"LOGINDISABLED", IMAP_CAPA_ADD_LOGINDISABLED, IMAP_CAPA_DEL_LOGINDISABLED},
        {"COMPRESS=", 0, IMAP_CAPA_DEL_COMPRESS},
    };
    size_t n = len, a, b, o = 0;
    bool change = false;

    while (n > 0 && in[n - 1] == '\r')
        n--;
    if (n == 0 || in[n - 1] != '\n')
        return -1;
    n--;
    while (n > 0 && in[n - 1] == '\r')
        n--;
    if (!imap_capa_range(in, n, &a, &b)) {
        if (len > cap)
            return -1;
        memcpy(out, in, len);
        return (ssize_t)len;
    }
    /* What changes: a word to delete that is there, or one to add that is not. */
    for (size_t k = 0; k < sizeof(edits) / sizeof(edits[0]); k++) {
        bool has = imap_capa_has(in, n, edits[k].word);
        if ((flags & edits[k].add) ? !has : ((flags & edits[k].del) && has))
            change = true;
    }
    if (!change) {
        if (len > cap)
            return -1;
        memcpy(out, in, len);
        return (ssize_t)len;
    }
    if (a > cap)
        return -1;
    memcpy(out, in, a);
    o = a;
    for (size_t i = a, e; i < b; i = e + 1) {
        bool keep = true;
        e = imap_token_end(in, i, b);
        if (e == i)
            continue;
        for (size_t k = 0; k < sizeof(edits) / sizeof(edits[0]); k++)
            if ((flags & edits[k].del) && !(flags & edits[k].add) &&
                imap_capa_is(in + i, e - i, edits[k].word))
                keep = false;
        if (!keep)
            continue;
        if (o + (o > a) + (e - i) > cap)
            return -1;
        if (o > a)
            out[o++] = ' ';
        memcpy(out + o, in + i, e - i);
        o += e - i;
    }
    for (size_t k = 0; k < sizeof(edits) / sizeof(edits[0]); k++) {
        size_t wl = strlen(edits[k].word);
        if (!(flags & edits[k].add) || imap_capa_has(in, n, edits[k].word))
            continue;
        if (o + 1 + wl > cap)
            return -1;
        /* "* CAPABILITY" and "[CAPABILITY]" end without a blank before the list. */
        if (o > a || out[o - 1] != ' ')
            out[o++] = ' ';
        memcpy(out + o, edits[k].word, wl);
        o += wl;
    }
    if (o + (len - b) > cap)
        return -1;
    memcpy(out + o, in + b, len - b);
    o += len - b;
    return (ssize_t)o;
}

/* --- ID ---------------------------------------------------------------------------------- */

static bool imap_quotable(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f || *s == '"' || *s == '\\')
            return false;
    return true;
}

ssize_t imap_id_line(const char *tag, const char *client_ip, unsigned client_port,
                     const char *local_ip, unsigned local_port, char *out, size_t cap)
{
    int n;

    if (!imap_quotable(tag) || !imap_quotable(client_ip) || !imap_quotable(local_ip))
        return -1;
    n = snprintf(out, cap,
                 "%s ID (\"x-originating-ip\" \"%s\" \"x-originating-port\" \"%u\" "
                 "\"x-connected-ip\" \"%s\" \"x-connected-port\" \"%u\")\r\n",
                 tag, client_ip, client_port, local_ip, local_port);
    if (n < 0 || (size_t)n >= cap)
        return -1;
    return n;
}
