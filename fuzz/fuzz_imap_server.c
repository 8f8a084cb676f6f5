/* fuzz_imap_server.c: libFuzzer harness for the IMAP response parser (proxy/imap.c), the tag
 * pairing of responses (proxy/imap_pairs.c) and the capability rewriting.
 *
 * Input: byte 0 seeds the cut points and the capability edits; the rest is what the server
 * sends. It is parsed whole and cut into random reads; the invariants are:
 *   - every byte goes out exactly once, in order, as DATA or RESPONSE spans that the call
 *     consumed, and the caller never holds IMAP_SERVER_HOLD bytes or more;
 *   - the same responses (kind, status, tag, literals, sizes, WHOLE) both ways;
 *   - a WHOLE response is one line: rewriting its capabilities yields one line, without the
 *     words deleted and with the words added, and no more than 30 bytes longer;
 *   - pairing every response never breaks its bounds.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "imap.h"
#include "imap_pairs.h"

struct fuzz_resp {
    uint8_t kind, status, whole;
    unsigned literals;
    uint64_t lit_size, size;
    char tag[IMAP_TAG_MAX + 1];
};

struct fuzz_run {
    struct imap_server sp;
    struct imap_pairs pp;
    struct imap_pairs_entry fifo[IMAP_PAIRS_CAP];
    char *out;
    size_t outlen;
    struct fuzz_resp *rs;
    size_t nrs, cap;
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

static void fuzz_capa(const char *line, size_t len, uint32_t *s)
{
    static const unsigned pick[] = {
        IMAP_CAPA_ADD_STARTTLS,
        IMAP_CAPA_DEL_STARTTLS | IMAP_CAPA_DEL_LOGINDISABLED,
        IMAP_CAPA_DEL_STARTTLS | IMAP_CAPA_ADD_LOGINDISABLED | IMAP_CAPA_DEL_COMPRESS,
    };
    unsigned flags = pick[fuzz_rand(s) % 3];
    size_t cap = len + 40;
    char *out = malloc(cap);
    ssize_t n;

    FUZZ_CHECK(out != NULL);
    n = imap_capa_edit(line, len, flags, out, cap);
    FUZZ_CHECK(n >= 0 && (size_t)n <= len + 30);
    FUZZ_CHECK(n > 0 && out[n - 1] == '\n' && memchr(out, '\n', (size_t)n - 1) == NULL);
    if (flags & IMAP_CAPA_DEL_STARTTLS)
        FUZZ_CHECK(!imap_capa_has(out, (size_t)n, "STARTTLS"));
    if (flags & IMAP_CAPA_DEL_COMPRESS)
        FUZZ_CHECK(!imap_capa_has(out, (size_t)n, "COMPRESS="));
    if ((flags & IMAP_CAPA_ADD_STARTTLS) && imap_capa_has(line, len, "IMAP4REV1"))
        FUZZ_CHECK(imap_capa_has(out, (size_t)n, "STARTTLS"));
    free(out);
}

static void fuzz_drive(struct fuzz_run *r, char *hold, size_t *held, uint32_t *s)
{
    size_t off = 0;

    for (;;) {
        struct imap_server_event ev;
        struct imap_pair pair;
        size_t n, left = *held - off;
        const char *buf = hold + off;

        n = imap_server_parse(&r->sp, buf, left, 0, &ev);
        FUZZ_CHECK(n <= left);
        if (ev.type == IMAP_SEV_AGAIN) {
            FUZZ_CHECK(n == 0 && left < IMAP_SERVER_HOLD);
            break;
        }
        FUZZ_CHECK(n > 0 && ev.fwd == buf && ev.fwd_len == n);
        memcpy(r->out + r->outlen, ev.fwd, n);
        r->outlen += n;
        if (ev.type == IMAP_SEV_RESPONSE) {
            const struct imap_resp *x = ev.resp;
            struct fuzz_resp *f;
            FUZZ_CHECK(r->nrs < r->cap);
            f = &r->rs[r->nrs++];
            f->kind = (uint8_t)x->kind;
            f->status = (uint8_t)x->status;
            f->whole = (ev.flags & IMAP_SEV_F_WHOLE) != 0;
            f->literals = x->literals;
            f->lit_size = x->lit_size;
            f->size = x->size;
            FUZZ_CHECK(x->tag_len <= IMAP_TAG_MAX && x->text_len <= IMAP_TEXT_MAX);
            memcpy(f->tag, x->tag, x->tag_len + 1);
            if (f->whole) {
                FUZZ_CHECK(x->size == n && x->literals == 0);
                fuzz_capa(ev.fwd, n, s);
            }
            imap_pairs_on_response(&r->pp, x, &pair);
            FUZZ_CHECK(pair.text_len <= IMAP_TEXT_MAX && pair.text[pair.text_len] == '\0');
        }
        off += n;
    }
    memmove(hold, hold + off, *held - off);
    *held -= off;
}

static void fuzz_run(struct fuzz_run *r, uint32_t seed, const char *in, size_t len, bool split)
{
    char *hold = malloc(len + 1);
    size_t held = 0, pos = 0;
    uint32_t cut = seed ^ (uint32_t)len, capa = seed;

    FUZZ_CHECK(hold != NULL);
    imap_pairs_attach(&r->pp, r->fifo);
    while (pos < len) {
        size_t n = len - pos;
        if (split) {
            uint32_t x = fuzz_rand(&cut);
            size_t want = (x & 0x80000000u) ? (x % 7) + 1 : (x % 4096) + 1;
            if (n > want)
                n = want;
        }
        memcpy(hold + held, in + pos, n);
        held += n;
        pos += n;
        fuzz_drive(r, hold, &held, &capa);
    }
    FUZZ_CHECK(r->outlen + held == len);
    FUZZ_CHECK(memcmp(r->out, in, r->outlen) == 0);
    free(hold);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_run *a, *b;

    if (size < 1)
        return 0;
    a = calloc(2, sizeof(*a));
    FUZZ_CHECK(a != NULL);
    b = a + 1;
    for (int i = 0; i < 2; i++) {
        struct fuzz_run *r = i ? b : a;
        r->out = malloc(size + 1);
        r->cap = size + 1;
        r->rs = calloc(r->cap, sizeof(*r->rs));
        FUZZ_CHECK(r->out != NULL && r->rs != NULL);
        fuzz_run(r, data[0] + 1u, (const char *)data + 1, size - 1, i == 1);
    }
    FUZZ_CHECK(a->outlen == b->outlen && a->nrs == b->nrs);
    for (size_t i = 0; i < a->nrs; i++) {
        FUZZ_CHECK(a->rs[i].kind == b->rs[i].kind && a->rs[i].status == b->rs[i].status);
        FUZZ_CHECK(a->rs[i].whole == b->rs[i].whole);
        FUZZ_CHECK(a->rs[i].literals == b->rs[i].literals);
        FUZZ_CHECK(a->rs[i].lit_size == b->rs[i].lit_size && a->rs[i].size == b->rs[i].size);
        FUZZ_CHECK(strcmp(a->rs[i].tag, b->rs[i].tag) == 0);
    }
    for (int i = 0; i < 2; i++) {
        free(a[i].out);
        free(a[i].rs);
    }
    free(a);
    return 0;
}
