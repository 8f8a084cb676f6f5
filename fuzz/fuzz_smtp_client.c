/* fuzz_smtp_client.c: libFuzzer harness for the client side of proxy/smtp.c and for
 * proxy/smtp_pairs.c.
 *
 * Input layout: byte 0 picks max_line_length, byte 1 the smuggling mode and a seed; the rest is
 * what a client sends. The harness drives the parser like the session does (holding unconsumed
 * bytes, answering WAIT with replies chosen from the seed, feeding smtp_pairs), once with the
 * whole input and once cut into reads at points derived from the data, and checks:
 *   - both runs give the same events (spans merged) and the same forwarded bytes;
 *   - forwarded spans lie inside the bytes consumed by that very call, or are one of the static
 *     replacements; reject/off forward no more than the input (plus "*\r\n" AUTH cancels),
 *     normalize no more than twice the input;
 *   - in reject and normalize mode the body the backend sees never holds a lone dot between
 *     CR/LF delimiters, and in normalize mode no bare CR or LF;
 *   - the caller never holds more than max_line_length bytes outside WAIT;
 *   - no credential reaches loggable text: for every command line that a server's tokenizer
 *     takes for AUTH (Postfix: leading blanks skipped, tokens split at SP/HTAB/VT/FF; aiosmtpd
 *     splits the arguments at every byte Python's str.split() takes for a space), the parser
 *     says AUTH, its ev.line ends before the first byte of whatever follows the mechanism
 *     token, and the pair text built from it is that ev.line plus at most " [redacted]"; after
 *     a 334 to AUTH the next line is a credential line, never a command.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "smtp.h"
#include "smtp_pairs.h"

struct fuzz_ev {
    uint8_t type;
    uint8_t cmd;
    uint8_t flags;
    uint64_t size;
    const char *reason;
};

struct fuzz_run {
    struct smtp_client cp;
    struct smtp_pairs pp;
    struct smtp_pairs_entry fifo[SMTP_PAIRS_CAP]; /* pp's storage */
    enum smtp_smuggling mode;
    uint32_t seed;
    unsigned waits; /* WAITs answered so far: picks the reply */
    bool cred_next; /* AUTH got a 334: the next line is a credential */
    bool tls_stuck; /* the STARTTLS barrier is never lifted */
    /* results */
    char *out;
    size_t outlen;
    struct fuzz_ev *evs;
    size_t nevs, evcap;
    size_t cancels;
    /* body checks */
    char ctx[2]; /* last two bytes the backend saw in the current body */
};

static uint32_t fuzz_rand(uint32_t *s)
{
    /* xorshift32: deterministic cut points and replies */
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

static bool fuzz_is_static(const char *p, size_t n)
{
    return (n == 2 && (memcmp(p, "\r\n", 2) == 0 || memcmp(p, "..", 2) == 0)) ||
           (n == 3 && memcmp(p, "*\r\n", 3) == 0);
}

static void fuzz_body_bytes(struct fuzz_run *r, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char b = p[i];
        if (r->mode != SMTP_SMUGGLING_OFF) {
            FUZZ_CHECK(!((r->ctx[0] == '\r' || r->ctx[0] == '\n') && r->ctx[1] == '.' &&
                         (b == '\r' || b == '\n')));
        }
        if (r->mode == SMTP_SMUGGLING_NORMALIZE) {
            FUZZ_CHECK(!(b == '\n' && r->ctx[1] != '\r'));
            FUZZ_CHECK(!(r->ctx[1] == '\r' && b != '\n'));
        }
        r->ctx[0] = r->ctx[1];
        r->ctx[1] = b;
    }
}

static void fuzz_record(struct fuzz_run *r, const struct smtp_event *ev)
{
    bool span = ev->type == SMTP_EV_DATA || ev->type == SMTP_EV_BDAT_DATA ||
                ev->type == SMTP_EV_DISCARD || ev->type == SMTP_EV_INJECTED;

    if (ev->fwd_len > 0) {
        memcpy(r->out + r->outlen, ev->fwd, ev->fwd_len);
        r->outlen += ev->fwd_len;
    }
    if (span && r->nevs > 0 && r->evs[r->nevs - 1].type == ev->type) {
        r->evs[r->nevs - 1].size += ev->size;
        return;
    }
    FUZZ_CHECK(r->nevs < r->evcap);
    r->evs[r->nevs++] = (struct fuzz_ev){(uint8_t)ev->type, (uint8_t)ev->cmd, (uint8_t)ev->flags,
                                         ev->size, ev->reason};
}

/* A reply from a make-believe server to the oldest outstanding command. */
static void fuzz_reply(struct fuzz_run *r, int code)
{
    struct smtp_reply rep;
    struct smtp_pair pair;

    memset(&rep, 0, sizeof(rep));
    rep.code = code;
    rep.lines = 1;
    smtp_pairs_on_reply(&r->pp, &rep, &pair);
    FUZZ_CHECK(pair.cmd_text_len <= SMTP_PAIRS_TEXT_MAX);
    FUZZ_CHECK(pair.cmd_text[pair.cmd_text_len] == '\0');
    smtp_client_on_reply(&r->cp, pair.cmd, pair.code);
}

static void fuzz_drain_local(struct fuzz_run *r)
{
    struct smtp_pair pair;

    while (smtp_pairs_take_local(&r->pp, 0, &pair))
        FUZZ_CHECK(pair.kind == SMTP_PAIR_LOCAL && pair.code >= 500);
}

/* Answers everything outstanding; the newest (the command the parser waits for) gets a code
 * picked from the seed. */
static void fuzz_answer_wait(struct fuzz_run *r, enum smtp_cmd cmd)
{
    static const int data_codes[] = {354, 354, 354, 554, 451};
    static const int auth_codes[] = {334, 334, 235, 535, 501};
    static const int xclient_codes[] = {220, 220, 550};
    uint32_t s = r->seed + 7919u * ++r->waits;
    uint32_t pick = fuzz_rand(&s);
    int code;

    switch (cmd) {
    case SMTP_CMD_DATA:
        code = data_codes[pick % 5];
        break;
    case SMTP_CMD_AUTH:
        code = auth_codes[pick % 5];
        break;
    default:
        code = xclient_codes[pick % 3];
        break;
    }
    r->cred_next = cmd == SMTP_CMD_AUTH && code == 334;
    for (;;) {
        fuzz_drain_local(r);
        size_t left = smtp_pairs_outstanding(&r->pp);
        if (left == 0) {
            smtp_client_on_reply(&r->cp, cmd, code);
            return;
        }
        fuzz_reply(r, left == 1 ? code : 250);
        if (left == 1)
            return;
    }
}

/* Blanks as Postfix's smtpd tokenizer skips them, and the ASCII bytes Python's str.split()
 * (aiosmtpd's AUTH argument split) treats as spaces. */
static bool fuzz_pf_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f';
}

static bool fuzz_py_space(char c)
{
    return fuzz_pf_blank(c) || c == '\r' || c == '\n' || (c >= 0x1c && c <= 0x1f);
}

/* An independent reading of a command line s[0, n) as a server tokenizes it: returns true when
 * it is AUTH, and in *cred the offset where the text after the mechanism token starts (n when
 * nothing but blanks follows it). */
static bool fuzz_auth_oracle(const char *s, size_t n, size_t *cred)
{
    size_t i = 0, b;

    while (i < n && fuzz_pf_blank(s[i]))
        i++;
    b = i;
    while (i < n && !fuzz_pf_blank(s[i]))
        i++;
    if (i - b != 4 || strncasecmp(s + b, "AUTH", 4) != 0)
        return false;
    while (i < n && fuzz_py_space(s[i]))
        i++;
    while (i < n && !fuzz_py_space(s[i]))
        i++;
    while (i < n && fuzz_py_space(s[i]))
        i++;
    *cred = i;
    return true;
}

/* The credential rule for one COMMAND event and the pair entry it just created. */
static void fuzz_check_auth(struct fuzz_run *r, const struct smtp_event *ev)
{
    static const char red[] = " [redacted]";
    size_t cred = 0, n = ev->fwd_len - 2; /* a COMMAND's fwd is the line with CRLF */
    const struct smtp_pairs_entry *e;

    if (!fuzz_auth_oracle(ev->fwd, n, &cred)) {
        FUZZ_CHECK(ev->cmd != SMTP_CMD_AUTH);
        return;
    }
    FUZZ_CHECK(ev->cmd == SMTP_CMD_AUTH);
    FUZZ_CHECK(ev->line != NULL && ev->line == ev->fwd);
    if (cred < n) {
        FUZZ_CHECK(ev->line_len <= cred);
        FUZZ_CHECK(ev->flags & SMTP_EV_F_AUTH_INITIAL);
    }
    FUZZ_CHECK(smtp_pairs_outstanding(&r->pp) > 0);
    e = &r->pp.q[(r->pp.head + r->pp.count - 1) % SMTP_PAIRS_CAP];
    FUZZ_CHECK(e->cmd == SMTP_CMD_AUTH);
    size_t keep = e->text_len;
    if (ev->flags & SMTP_EV_F_AUTH_INITIAL) {
        FUZZ_CHECK(keep >= sizeof(red) - 1);
        FUZZ_CHECK(memcmp(e->text + keep - (sizeof(red) - 1), red, sizeof(red) - 1) == 0);
        keep -= sizeof(red) - 1;
    }
    FUZZ_CHECK(keep <= ev->line_len);
    FUZZ_CHECK(memcmp(e->text, ev->line, keep) == 0);
}

/* Parses hold[0, *held) as far as possible; returns when more input is needed. */
static void fuzz_drive(struct fuzz_run *r, char *hold, size_t *held)
{
    size_t off = 0;

    for (size_t loops = 0;; loops++) {
        struct smtp_event ev;
        size_t n, left = *held - off;
        const char *buf = hold + off;

        FUZZ_CHECK(loops < 64 * (*held + 64));
        if (smtp_pairs_room(&r->pp) == 0) {
            fuzz_reply(r, 250);
            fuzz_drain_local(r);
            continue;
        }
        n = smtp_client_parse(&r->cp, buf, left, &ev);
        FUZZ_CHECK(n <= left);
        if (ev.type == SMTP_EV_AGAIN) {
            FUZZ_CHECK(n == 0);
            FUZZ_CHECK(left <= r->cp.max_line);
            break;
        }
        if (ev.type == SMTP_EV_WAIT) {
            FUZZ_CHECK(n == 0);
            FUZZ_CHECK(ev.cmd == SMTP_CMD_DATA || ev.cmd == SMTP_CMD_AUTH ||
                       ev.cmd == SMTP_CMD_XCLIENT);
            fuzz_answer_wait(r, ev.cmd);
            if (ev.cmd == SMTP_CMD_DATA) {
                /* A body, if one starts, follows the CRLF of the DATA line. */
                r->ctx[0] = '\r';
                r->ctx[1] = '\n';
            }
            continue;
        }
        /* Spans point into what this call consumed, or to static replacements. */
        if (ev.fwd_len > 0) {
            FUZZ_CHECK(ev.fwd != NULL);
            if (ev.fwd >= buf && ev.fwd < buf + left)
                FUZZ_CHECK(ev.fwd + ev.fwd_len <= buf + n);
            else
                FUZZ_CHECK(fuzz_is_static(ev.fwd, ev.fwd_len));
            if (r->mode != SMTP_SMUGGLING_NORMALIZE && fuzz_is_static(ev.fwd, ev.fwd_len) &&
                !(ev.fwd >= buf && ev.fwd < buf + left))
                FUZZ_CHECK(ev.fwd_len == 3 && (ev.flags & SMTP_EV_F_CANCEL));
        }
        /* ev.line is in buf, or the static "[redacted]" of a SASL response sent behind a
         * refused AUTH (one word, no verb). */
        if (ev.line != NULL && !(ev.line >= buf && ev.line < buf + n))
            FUZZ_CHECK(ev.type == SMTP_EV_COMMAND && ev.cmd == SMTP_CMD_UNKNOWN &&
                       ev.line_len == 10 && memcmp(ev.line, "[redacted]", 10) == 0);
        else if (ev.line != NULL)
            FUZZ_CHECK(ev.line + ev.line_len <= buf + n);
        if (ev.arg != NULL)
            FUZZ_CHECK(ev.arg >= buf && ev.arg + ev.arg_len <= buf + n);
        if ((ev.flags & SMTP_EV_F_CANCEL) && ev.type != SMTP_EV_AUTH_RESPONSE)
            r->cancels++;
        if (ev.type == SMTP_EV_DATA || ev.type == SMTP_EV_SMUGGLING)
            fuzz_body_bytes(r, ev.fwd, ev.fwd_len);
        if (ev.type == SMTP_EV_DATA_END && ev.fwd_len > 0) {
            FUZZ_CHECK(ev.fwd_len == 3 && memcmp(ev.fwd, ".\r\n", 3) == 0);
            FUZZ_CHECK(r->mode == SMTP_SMUGGLING_OFF || (r->ctx[0] == '\r' && r->ctx[1] == '\n'));
        }
        if (r->cred_next && ev.type != SMTP_EV_DISCARD) {
            FUZZ_CHECK(ev.type != SMTP_EV_COMMAND);
            r->cred_next = false;
        }
        if (ev.type == SMTP_EV_AUTH_RESPONSE)
            FUZZ_CHECK(ev.line == NULL && ev.line_len == 0 && ev.arg == NULL);
        fuzz_record(r, &ev);
        FUZZ_CHECK(smtp_pairs_on_client_event(&r->pp, &ev, 0) == 0);
        if (ev.type == SMTP_EV_COMMAND)
            fuzz_check_auth(r, &ev);
        fuzz_drain_local(r);
        if (ev.type == SMTP_EV_COMMAND && ev.cmd == SMTP_CMD_STARTTLS && !r->tls_stuck) {
            /* Either lift the barrier at once or never: the same in every run. */
            uint32_t s = r->seed ^ 0x5bd1e995u;
            if (fuzz_rand(&s) & 1) {
                fuzz_drain_local(r);
                while (smtp_pairs_outstanding(&r->pp) > 0) {
                    fuzz_reply(r, 454);
                    fuzz_drain_local(r);
                }
                smtp_client_on_reply(&r->cp, SMTP_CMD_STARTTLS, 454);
            } else {
                r->tls_stuck = true;
            }
        }
        off += n;
    }
    memmove(hold, hold + off, *held - off);
    *held -= off;
}

static void fuzz_run(struct fuzz_run *r, const struct smtp_client_opts *o, uint32_t seed,
                     const char *in, size_t len, bool split)
{
    char *hold = malloc(len + 1);
    size_t held = 0, pos = 0;
    uint32_t cut = seed ^ (uint32_t)len;
    struct smtp_reply greeting = {.code = 220, .lines = 1};
    struct smtp_pair pair;

    FUZZ_CHECK(hold != NULL);
    memset(&r->cp, 0, sizeof(r->cp));
    memset(&r->pp, 0, sizeof(r->pp));
    smtp_pairs_attach(&r->pp, r->fifo);
    smtp_client_init(&r->cp, o);
    smtp_pairs_on_reply(&r->pp, &greeting, &pair);
    r->mode = o->smuggling;
    r->seed = seed;
    while (pos < len) {
        size_t n = len - pos;
        if (split) {
            uint32_t x = fuzz_rand(&cut);
            size_t want = (x & 0x80000000u) ? (x % 7) + 1 : (x % 512) + 1;
            if (n > want)
                n = want;
        }
        memcpy(hold + held, in + pos, n);
        held += n;
        pos += n;
        fuzz_drive(r, hold, &held);
    }
    fuzz_drive(r, hold, &held);
    free(hold);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct smtp_client_opts o;
    struct fuzz_run *a, *b;
    const char *in;
    size_t len;
    uint32_t seed;

    if (size < 2)
        return 0;
    o.max_line_length = data[0] == 255 ? 0 : 16 + (size_t)data[0] * 4;
    o.smuggling = (enum smtp_smuggling)(data[1] % 3);
    seed = data[1] / 3u + 1;
    in = (const char *)data + 2;
    len = size - 2;

    a = calloc(2, sizeof(*a));
    FUZZ_CHECK(a != NULL);
    b = a + 1;
    for (int i = 0; i < 2; i++) {
        struct fuzz_run *r = i ? b : a;
        r->out = malloc(2 * len + 64 + 3 * len);
        r->evcap = 4 * len + 64;
        r->evs = calloc(r->evcap, sizeof(*r->evs));
        FUZZ_CHECK(r->out != NULL && r->evs != NULL);
        fuzz_run(r, &o, seed, in, len, i == 1);
    }
    /* Output bounds. */
    if (o.smuggling == SMTP_SMUGGLING_NORMALIZE)
        FUZZ_CHECK(a->outlen <= 2 * len + 3 * a->cancels);
    else
        FUZZ_CHECK(a->outlen <= len + 3 * a->cancels);
    /* Resumability. */
    FUZZ_CHECK(a->outlen == b->outlen);
    FUZZ_CHECK(memcmp(a->out, b->out, a->outlen) == 0);
    FUZZ_CHECK(a->nevs == b->nevs);
    for (size_t i = 0; i < a->nevs; i++) {
        FUZZ_CHECK(a->evs[i].type == b->evs[i].type);
        FUZZ_CHECK(a->evs[i].cmd == b->evs[i].cmd);
        FUZZ_CHECK(a->evs[i].flags == b->evs[i].flags);
        FUZZ_CHECK(a->evs[i].reason == b->evs[i].reason);
        if (a->evs[i].type != SMTP_EV_TOO_LONG)
            FUZZ_CHECK(a->evs[i].size == b->evs[i].size);
    }
    for (int i = 0; i < 2; i++) {
        free(a[i].out);
        free(a[i].evs);
    }
    free(a);
    return 0;
}
