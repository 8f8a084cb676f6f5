/* fuzz_pop3_client.c: libFuzzer harness for the client side of proxy/pop3.c and for
 * proxy/pop3_pairs.c.
 *
 * Input layout: byte 0 picks max_line_length, byte 1 seeds the server's answers; the rest is
 * what a client sends. The harness drives the parser like the session does (holding unconsumed
 * bytes, answering WAIT and STLS with statuses chosen from the seed, feeding pop3_pairs and
 * draining local answers), once with the whole input and once cut into reads at points derived
 * from the data, and checks:
 *   - both runs give the same events and the same forwarded bytes (dropped byte counts summed);
 *   - forwarded spans lie inside the bytes consumed by that very call, or are the static
 *     "*\r\n" cancel; nothing is forwarded beyond the input plus those cancels;
 *   - every consumed byte is either forwarded or counted as dropped;
 *   - the caller never holds more than max_line_length bytes outside WAIT;
 *   - no credential reaches loggable text: for every command line whose first token (after any
 *     leading blanks, tokens split at SP/HTAB/VT/FF, or at the first SP as Dovecot splits) is
 *     USER, PASS or APOP in any case, ev.line ends at that token; for AUTH, at the first byte
 *     after the mechanism that is no SASL name character; SASL answer lines have no line; the
 *     pairs FIFO and every pair's cmd_text hold nothing the loggable fields did not.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "pop3.h"
#include "pop3_pairs.h"

struct fuzz_ev {
    uint8_t type;
    uint8_t cmd;
    uint8_t frame;
    uint8_t flags;
    size_t line_len;
    const char *reason;
};

struct fuzz_run {
    struct pop3_client cp;
    struct pop3_pairs pp;
    struct pop3_pairs_entry fifo[POP3_PAIRS_CAP]; /* pp's storage */
    uint32_t seed;
    unsigned answers; /* statuses chosen so far */
    /* results */
    char *out;
    size_t outlen;
    struct fuzz_ev *evs;
    size_t nevs, evcap;
    size_t cancels;
    uint64_t dropped; /* TOO_LONG/INVALID/DISCARD/INJECTED bytes */
    uint64_t consumed;
};

static uint32_t fuzz_rand(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

static bool fuzz_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f';
}

static bool fuzz_sasl_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

/* The status the make-believe server gives the k-th answer, from the seed. */
static enum pop3_status fuzz_status(struct fuzz_run *r, bool cont_ok)
{
    uint32_t s = r->seed + r->answers++ * 0x9e3779b9u;
    uint32_t x = fuzz_rand(&s) % (cont_ok ? 3 : 2);
    return x == 0 ? POP3_STATUS_OK : x == 1 ? POP3_STATUS_ERR : POP3_STATUS_CONT;
}

/* Independent check that a command line's loggable part holds no credential. s[0, n) is the
 * line without its CRLF. */
static void fuzz_check_redaction(const struct pop3_event *ev, const char *s, size_t n)
{
    size_t vb = 0, ve, sp;

    /* A SASL answer right behind a refused AUTH (one word, no verb): a static "[redacted]". */
    if (ev->cmd == POP3_CMD_UNKNOWN && ev->line_len == 10 &&
        memcmp(ev->line, "[redacted]", 10) == 0 && ev->line != s)
        return;
    while (vb < n && fuzz_blank(s[vb]))
        vb++;
    ve = vb;
    while (ve < n && !fuzz_blank(s[ve]))
        ve++;
    /* Dovecot: the command is everything up to the first SP, taken as it is. */
    sp = 0;
    while (sp < n && s[sp] != ' ')
        sp++;
    static const char *const secret_verbs[] = {"USER", "PASS", "APOP"};
    for (size_t k = 0; k < 3; k++) {
        const char *v = secret_verbs[k];
        if ((ve - vb == 4 && strncasecmp(s + vb, v, 4) == 0) ||
            (sp == 4 && strncasecmp(s, v, 4) == 0)) {
            FUZZ_CHECK(ev->line_len <= ve);
            FUZZ_CHECK(ev->arg == NULL);
            FUZZ_CHECK((ev->line_len < n) == ((ev->flags & POP3_EV_F_REDACTED) != 0));
        }
    }
    if ((ve - vb == 4 && strncasecmp(s + vb, "AUTH", 4) == 0) ||
        (sp == 4 && strncasecmp(s, "AUTH", 4) == 0)) {
        size_t mb = ve, me;
        while (mb < n && fuzz_blank(s[mb]))
            mb++;
        me = mb;
        while (me < n && fuzz_sasl_char(s[me]))
            me++;
        FUZZ_CHECK(ev->line_len <= (me > mb ? me : ve));
        FUZZ_CHECK(ev->arg != NULL && ev->arg + ev->arg_len <= s + ev->line_len);
        if (ev->line_len < n) {
            size_t i = ev->line_len;
            while (i < n && fuzz_blank(s[i]))
                i++;
            FUZZ_CHECK((i < n) == ((ev->flags & POP3_EV_F_REDACTED) != 0));
        }
    }
    FUZZ_CHECK(ev->line == s);
    FUZZ_CHECK(ev->line_len <= n);
}

static void fuzz_record(struct fuzz_run *r, const struct pop3_event *ev)
{
    struct fuzz_ev *e;

    /* Dropped spans merge, so that the runs compare however the input was cut. */
    if ((ev->type == POP3_EV_DISCARD || ev->type == POP3_EV_INJECTED) && r->nevs > 0 &&
        r->evs[r->nevs - 1].type == ev->type)
        return;
    FUZZ_CHECK(r->nevs < r->evcap);
    e = &r->evs[r->nevs++];
    e->type = (uint8_t)ev->type;
    e->cmd = (uint8_t)ev->cmd;
    e->frame = (uint8_t)ev->frame;
    e->flags = (uint8_t)ev->flags;
    e->reason = ev->reason;
    e->line_len = ev->type == POP3_EV_COMMAND ? ev->line_len : 0;
}

static void fuzz_check_pair(const struct pop3_pair *p)
{
    FUZZ_CHECK(p->cmd_text_len <= POP3_PAIRS_TEXT_MAX);
    FUZZ_CHECK(p->cmd_text[p->cmd_text_len] == '\0');
    FUZZ_CHECK(p->text_len <= POP3_TEXT_MAX);
    FUZZ_CHECK(p->text[p->text_len] == '\0');
}

/* The server answers the oldest outstanding command; returns the status it chose. */
static enum pop3_status fuzz_answer(struct fuzz_run *r, bool cont_ok)
{
    struct pop3_response resp = {.status = fuzz_status(r, cont_ok)};
    struct pop3_pair pair;

    (void)pop3_pairs_on_response(&r->pp, &resp, &pair);
    fuzz_check_pair(&pair);
    pop3_client_on_reply(&r->cp, pair.cmd, pair.status);
    while (pop3_pairs_take_local(&r->pp, 0, &pair)) {
        fuzz_check_pair(&pair);
        pop3_client_on_reply(&r->cp, pair.cmd, pair.status);
    }
    return resp.status;
}

/* Processes one event like the session does: forwarding, pairing, local answers. */
static void fuzz_event(struct fuzz_run *r, const struct pop3_event *ev, const char *buf, size_t n)
{
    struct pop3_pair pair;

    r->consumed += n;
    if (ev->fwd_len > 0) {
        bool inside = ev->fwd >= buf && ev->fwd + ev->fwd_len <= buf + n;
        bool cancel = ev->fwd_len == 3 && memcmp(ev->fwd, "*\r\n", 3) == 0 && !inside;
        FUZZ_CHECK(inside || cancel);
        if (cancel)
            r->cancels++;
        memcpy(r->out + r->outlen, ev->fwd, ev->fwd_len);
        r->outlen += ev->fwd_len;
    }
    switch (ev->type) {
    case POP3_EV_COMMAND:
        FUZZ_CHECK(ev->fwd == buf && ev->fwd_len == n && n >= 2);
        fuzz_check_redaction(ev, buf, n - 2);
        break;
    case POP3_EV_AUTH_RESPONSE:
        FUZZ_CHECK(ev->line == NULL && ev->arg == NULL && ev->fwd == buf && ev->fwd_len == n);
        break;
    case POP3_EV_TOO_LONG:
    case POP3_EV_INVALID:
        FUZZ_CHECK(ev->line == NULL && ev->arg == NULL);
        r->dropped += n;
        break;
    case POP3_EV_DISCARD:
    case POP3_EV_INJECTED:
        FUZZ_CHECK(ev->size == n && ev->fwd_len == 0);
        r->dropped += n;
        break;
    default:
        FUZZ_CHECK(0);
    }
    FUZZ_CHECK(pop3_pairs_on_client_event(&r->pp, ev, 0) == 0); /* room was checked */
    if (ev->type == POP3_EV_COMMAND && ev->cmd == POP3_CMD_STLS) {
        /* mxproxy terminates STLS (answers it in order), or the server answers it at once, or
         * never: then the rest of the input is injected. */
        uint32_t x = fuzz_rand(&r->seed) % 3;
        if (x == 0)
            FUZZ_CHECK(pop3_pairs_answer_locally(&r->pp, POP3_LOCAL_STLS) == 0);
        else if (x == 1)
            fuzz_answer(r, false);
    } else if (ev->type == POP3_EV_COMMAND && ev->frame != POP3_FRAME_SASL) {
        fuzz_answer(r, false); /* at once, so that the FIFO does not fill up */
    }
    while (pop3_pairs_take_local(&r->pp, 0, &pair)) {
        fuzz_check_pair(&pair);
        pop3_client_on_reply(&r->cp, pair.cmd, pair.status);
    }
    fuzz_record(r, ev);
}

/* The server's answer to a WAIT (AUTH): a continuation or a final status. */
static void fuzz_answer_wait(struct fuzz_run *r, enum pop3_cmd cmd)
{
    FUZZ_CHECK(cmd == POP3_CMD_AUTH);
    FUZZ_CHECK(pop3_pairs_frame(&r->pp) == POP3_FRAME_SASL);
    FUZZ_CHECK(r->nevs < r->evcap);
    r->evs[r->nevs].type = 0xff; /* a WAIT answered */
    r->evs[r->nevs].cmd = (uint8_t)fuzz_answer(r, true);
    r->nevs++;
}

static void fuzz_run(struct fuzz_run *r, const struct pop3_client_opts *o, uint32_t seed,
                     const char *in, size_t len, bool split)
{
    char *hold = malloc(len + 1);
    size_t held = 0, pos = 0;
    uint32_t cut = seed ^ (uint32_t)len;
    unsigned waits = 0;

    FUZZ_CHECK(hold != NULL);
    pop3_client_init(&r->cp, o);
    pop3_pairs_attach(&r->pp, r->fifo);
    r->seed = seed;
    {
        /* The greeting, so that responses pair with commands. */
        struct pop3_response g = {.status = POP3_STATUS_OK};
        struct pop3_pair pair;
        FUZZ_CHECK(pop3_pairs_on_response(&r->pp, &g, &pair) == POP3_PAIRS_GREETING);
    }
    while (pos < len) {
        size_t n = len - pos, off = 0;
        if (split) {
            uint32_t x = fuzz_rand(&cut);
            size_t want = (x & 0x80000000u) ? (x % 7) + 1 : (x % 500) + 1;
            if (n > want)
                n = want;
        }
        memcpy(hold + held, in + pos, n);
        held += n;
        pos += n;
        for (;;) {
            struct pop3_event ev;
            size_t k;

            FUZZ_CHECK(pop3_pairs_room(&r->pp) > 0);
            k = pop3_client_parse(&r->cp, hold + off, held - off, &ev);
            FUZZ_CHECK(k <= held - off);
            if (ev.type == POP3_EV_AGAIN) {
                FUZZ_CHECK(k == 0);
                FUZZ_CHECK(held - off <= r->cp.max_line);
                break;
            }
            if (ev.type == POP3_EV_WAIT) {
                FUZZ_CHECK(k == 0);
                /* Answer a bounded number of WAITs; after that the client is stuck, as
                 * behind a server that never answers. */
                if (waits++ > 64)
                    break;
                fuzz_answer_wait(r, ev.cmd);
                continue;
            }
            FUZZ_CHECK(k > 0);
            fuzz_event(r, &ev, hold + off, k);
            off += k;
        }
        memmove(hold, hold + off, held - off);
        held -= off;
    }
    FUZZ_CHECK(r->consumed + held == len);
    FUZZ_CHECK(r->outlen + r->dropped == r->consumed + 3 * r->cancels);
    free(hold);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pop3_client_opts o;
    struct fuzz_run *a, *b;
    const char *in;
    size_t len;
    uint32_t seed;

    if (size < 2)
        return 0;
    o.max_line_length = data[0] == 255 ? 0 : 16 + (size_t)data[0] * 4;
    seed = (uint32_t)data[1] + 1;
    in = (const char *)data + 2;
    len = size - 2;

    a = calloc(2, sizeof(*a));
    FUZZ_CHECK(a != NULL);
    b = a + 1;
    for (int i = 0; i < 2; i++) {
        struct fuzz_run *r = i ? b : a;
        r->out = malloc(len + 3 * len + 64);
        r->evcap = 4 * len + 256;
        r->evs = calloc(r->evcap, sizeof(*r->evs));
        FUZZ_CHECK(r->out != NULL && r->evs != NULL);
        fuzz_run(r, &o, seed, in, len, i == 1);
    }
    FUZZ_CHECK(a->outlen <= len + 3 * a->cancels);
    FUZZ_CHECK(a->outlen == b->outlen);
    FUZZ_CHECK(memcmp(a->out, b->out, a->outlen) == 0);
    FUZZ_CHECK(a->dropped == b->dropped);
    FUZZ_CHECK(a->nevs == b->nevs);
    for (size_t i = 0; i < a->nevs; i++) {
        FUZZ_CHECK(a->evs[i].type == b->evs[i].type);
        FUZZ_CHECK(a->evs[i].cmd == b->evs[i].cmd);
        FUZZ_CHECK(a->evs[i].frame == b->evs[i].frame);
        FUZZ_CHECK(a->evs[i].flags == b->evs[i].flags);
        FUZZ_CHECK(a->evs[i].reason == b->evs[i].reason);
        FUZZ_CHECK(a->evs[i].line_len == b->evs[i].line_len);
    }
    for (int i = 0; i < 2; i++) {
        free(a[i].out);
        free(a[i].evs);
    }
    free(a);
    return 0;
}
