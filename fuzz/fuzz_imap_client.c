/* fuzz_imap_client.c: libFuzzer harness for the IMAP client parser (proxy/imap.c) and the tag
 * pairing (proxy/imap_pairs.c).
 *
 * Input: byte 0 picks max_line_length, byte 1 seeds the make-believe server (how it answers
 * each WAIT and whether it ever lifts a STARTTLS barrier, and the cut points); the rest is what
 * the client sends. The input is parsed twice, whole and cut into random reads, and the
 * invariants are:
 *   - resumability: the same events (spans merged) and the same forwarded bytes both ways;
 *   - spans: ev.fwd lies inside the bytes the call consumed, or is the static "*\r\n" cancel;
 *     ev.tag and ev.text point into the parser and are bounded;
 *   - the parser never asks the caller to hold more than max_line_length bytes, nor more
 *     than IMAP_STREAM_AT (longer lines go out in parts);
 *   - nothing is forwarded twice: the output is at most the input plus the cancels;
 *   - credentials: the text of a LOGIN is the verb alone or the verb and " [redacted]"; an
 *     AUTHENTICATE's is the verb, at most a mechanism, and " [redacted]" with an initial
 *     response; an untagged line has no text;
 *   - pairing never fails when room was checked, and every pair's text is bounded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "imap.h"
#include "imap_pairs.h"

struct fuzz_ev {
    uint8_t type;
    uint8_t cmd;
    uint8_t flags;
    uint64_t size;
};

struct fuzz_run {
    struct imap_client cp;
    struct imap_pairs pp;
    struct imap_pairs_entry fifo[IMAP_PAIRS_CAP];
    uint32_t seed;
    unsigned waits;
    bool tls_stuck;
    char *out;
    size_t outlen;
    struct fuzz_ev *evs;
    size_t nevs, evcap;
    size_t cancels;
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

static void fuzz_record(struct fuzz_run *r, const struct imap_event *ev)
{
    bool span =
        ev->type == IMAP_EV_LITERAL || ev->type == IMAP_EV_DISCARD || ev->type == IMAP_EV_INJECTED;

    if (ev->fwd_len > 0) {
        memcpy(r->out + r->outlen, ev->fwd, ev->fwd_len);
        r->outlen += ev->fwd_len;
    }
    if (span && r->nevs > 0 && r->evs[r->nevs - 1].type == ev->type) {
        r->evs[r->nevs - 1].size += ev->size;
        return;
    }
    FUZZ_CHECK(r->nevs < r->evcap);
    r->evs[r->nevs++] =
        (struct fuzz_ev){(uint8_t)ev->type, (uint8_t)ev->cmd, (uint8_t)ev->flags, ev->size};
}

/* The make-believe server answers the oldest outstanding command with a tagged OK. */
static void fuzz_answer_oldest(struct fuzz_run *r)
{
    struct imap_resp resp;
    struct imap_pair pair;

    if (imap_pairs_take_local(&r->pp, 0, &pair))
        return;
    memset(&resp, 0, sizeof(resp));
    resp.kind = IMAP_RESP_TAGGED;
    resp.status = IMAP_ST_OK;
    const struct imap_pairs_entry *old = NULL;
    for (unsigned i = 0; i < IMAP_PAIRS_CAP; i++) {
        const struct imap_pairs_entry *e = &r->pp.q[i];
        if (e->used && (old == NULL || e->seq < old->seq))
            old = e;
    }
    FUZZ_CHECK(old != NULL && old->local == IMAP_LOCAL_NONE);
    memcpy(resp.tag, old->tag, old->tag_len);
    resp.tag_len = old->tag_len;
    FUZZ_CHECK(imap_pairs_on_response(&r->pp, &resp, &pair) == IMAP_PAIRS_MATCHED);
    FUZZ_CHECK(pair.cmd_text_len <= IMAP_TEXT_MAX && pair.cmd_text[pair.cmd_text_len] == '\0');
}

static void fuzz_check_text(const struct imap_event *ev)
{
    static const char red[] = " [redacted]";
    const char *t = ev->text;
    size_t n = ev->text_len;

    FUZZ_CHECK(n <= IMAP_TEXT_MAX && t != NULL);
    if (ev->flags & IMAP_EV_F_NO_TAG) {
        FUZZ_CHECK(n == 0);
        return;
    }
    /* A line whose tag is LOGIN or AUTHENTICATE (a client that forgot its tags). */
    if (n == sizeof(red) - 2 && memcmp(t, red + 1, n) == 0)
        return;
    if (ev->cmd == IMAP_CMD_LOGIN) {
        FUZZ_CHECK(n == 5 || (n == 5 + sizeof(red) - 1 && memcmp(t + 5, red, n - 5) == 0));
        FUZZ_CHECK(strncasecmp(t, "LOGIN", 5) == 0);
    }
    if (ev->cmd == IMAP_CMD_AUTHENTICATE) {
        size_t i = 12;
        /* Only these flags say the parser cut something: without them, " [redacted]" right
         * after the verb is a mechanism the client named so, not a redaction. */
        bool cut = (ev->flags & (IMAP_EV_F_AUTH_INITIAL | IMAP_EV_F_MIDCMD)) != 0;
        FUZZ_CHECK(n >= 12 && strncasecmp(t, "AUTHENTICATE", 12) == 0);
        if (i < n && t[i] == ' ' &&
            !(cut && n - i == sizeof(red) - 1 && memcmp(t + i, red, n - i) == 0)) {
            size_t b = ++i;
            while (i < n && t[i] != ' ')
                i++;
            FUZZ_CHECK(i - b <= IMAP_SASL_MECH_MAX);
        }
        /* A refused command (MIDCMD) carries no AUTH_INITIAL flag: either form, redacted. */
        if (cut)
            FUZZ_CHECK((n - i == sizeof(red) - 1 && memcmp(t + i, red, n - i) == 0) ||
                       (i == n && !(ev->flags & IMAP_EV_F_AUTH_INITIAL)));
        else
            FUZZ_CHECK(i == n);
    }
}

static void fuzz_drive(struct fuzz_run *r, char *hold, size_t *held)
{
    size_t off = 0;
    struct imap_pair pair;

    for (size_t loops = 0;; loops++) {
        struct imap_event ev;
        size_t n, left = *held - off;
        const char *buf = hold + off;

        FUZZ_CHECK(loops < 64 * (*held + 64));
        while (imap_pairs_take_local(&r->pp, 0, &pair))
            FUZZ_CHECK(pair.kind == IMAP_PAIR_LOCAL && pair.status == IMAP_ST_BAD);
        if (imap_pairs_room(&r->pp) == 0) {
            fuzz_answer_oldest(r);
            continue;
        }
        n = imap_client_parse(&r->cp, buf, left, &ev);
        FUZZ_CHECK(n <= left);
        if (ev.type == IMAP_EV_AGAIN) {
            FUZZ_CHECK(n == 0);
            FUZZ_CHECK(left <= r->cp.max_line && left <= IMAP_STREAM_AT);
            break;
        }
        if (ev.type == IMAP_EV_WAIT) {
            uint32_t s = r->seed + 7919u * ++r->waits;
            FUZZ_CHECK(n == 0);
            if (fuzz_rand(&s) % 3 != 0) {
                struct imap_resp resp = {.kind = IMAP_RESP_CONTINUE};
                imap_pairs_on_response(&r->pp, &resp, &pair);
                imap_client_on_continue(&r->cp);
            } else {
                imap_client_on_tagged(&r->cp, ev.tag, ev.tag_len);
            }
            continue;
        }
        if (ev.fwd_len > 0) {
            FUZZ_CHECK(ev.fwd != NULL);
            if (ev.fwd >= buf && ev.fwd < buf + left) {
                FUZZ_CHECK(ev.fwd + ev.fwd_len <= buf + n);
            } else {
                FUZZ_CHECK(ev.fwd_len == 3 && memcmp(ev.fwd, "*\r\n", 3) == 0);
                FUZZ_CHECK(ev.flags & IMAP_EV_F_CANCEL);
                r->cancels++;
            }
        }
        if (ev.tag != NULL)
            FUZZ_CHECK(ev.tag_len <= IMAP_TAG_MAX && ev.tag[ev.tag_len] == '\0');
        /* A command names itself (redacted) when it ends, in its parts so far (BEGIN, PART),
         * and when it is refused mid-way, for its aborted pair. */
        if (ev.type == IMAP_EV_COMMAND || ev.type == IMAP_EV_BEGIN || ev.type == IMAP_EV_PART ||
            ((ev.type == IMAP_EV_TOO_LONG || ev.type == IMAP_EV_INVALID) &&
             (ev.flags & IMAP_EV_F_MIDCMD) && ev.text != NULL))
            fuzz_check_text(&ev);
        else
            FUZZ_CHECK(ev.text == NULL);
        fuzz_record(r, &ev);
        FUZZ_CHECK(imap_pairs_on_client_event(&r->pp, &ev, 0) == 0);
        if (ev.type == IMAP_EV_COMMAND && ev.cmd == IMAP_CMD_STARTTLS && !r->tls_stuck &&
            !(ev.flags & IMAP_EV_F_NO_TAG)) {
            uint32_t s = r->seed ^ 0x5bd1e995u;
            if (fuzz_rand(&s) & 1)
                imap_client_on_tagged(&r->cp, ev.tag, ev.tag_len);
            else
                r->tls_stuck = true;
        }
        off += n;
    }
    memmove(hold, hold + off, *held - off);
    *held -= off;
}

static void fuzz_run(struct fuzz_run *r, size_t max, uint32_t seed, const char *in, size_t len,
                     bool split)
{
    char *hold = malloc(len + 1);
    size_t held = 0, pos = 0;
    uint32_t cut = seed ^ (uint32_t)len;
    struct imap_client_opts o = {max};

    FUZZ_CHECK(hold != NULL);
    memset(&r->pp, 0, sizeof(r->pp));
    imap_pairs_attach(&r->pp, r->fifo);
    imap_client_init(&r->cp, &o);
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
    struct fuzz_run *a, *b;
    size_t max, len;
    uint32_t seed;
    const char *in;

    if (size < 2)
        return 0;
    max = data[0] == 255 ? 0 : IMAP_MIN_MAX_LINE + (size_t)data[0] * 4;
    seed = data[1] + 1u;
    in = (const char *)data + 2;
    len = size - 2;

    a = calloc(2, sizeof(*a));
    FUZZ_CHECK(a != NULL);
    b = a + 1;
    for (int i = 0; i < 2; i++) {
        struct fuzz_run *r = i ? b : a;
        r->out = malloc(4 * len + 64);
        r->evcap = 4 * len + 64;
        r->evs = calloc(r->evcap, sizeof(*r->evs));
        FUZZ_CHECK(r->out != NULL && r->evs != NULL);
        fuzz_run(r, max, seed, in, len, i == 1);
    }
    FUZZ_CHECK(a->outlen <= len + 3 * a->cancels);
    FUZZ_CHECK(a->outlen == b->outlen);
    FUZZ_CHECK(memcmp(a->out, b->out, a->outlen) == 0);
    FUZZ_CHECK(a->nevs == b->nevs);
    for (size_t i = 0; i < a->nevs; i++) {
        FUZZ_CHECK(a->evs[i].type == b->evs[i].type);
        FUZZ_CHECK(a->evs[i].cmd == b->evs[i].cmd);
        FUZZ_CHECK(a->evs[i].flags == b->evs[i].flags);
        FUZZ_CHECK(a->evs[i].size == b->evs[i].size);
    }
    for (int i = 0; i < 2; i++) {
        free(a[i].out);
        free(a[i].evs);
    }
    free(a);
    return 0;
}
