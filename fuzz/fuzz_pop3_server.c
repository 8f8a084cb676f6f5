/* fuzz_pop3_server.c: libFuzzer harness for the response side of proxy/pop3.c, for the
 * response matching in proxy/pop3_pairs.c and for the CAPA rewriting.
 *
 * Input layout: byte 0 seeds the cut points and the commands the make-believe client keeps
 * outstanding (and so how each response is framed); the rest is what a server sends. The
 * harness parses it whole and cut into reads at points derived from the data, and checks:
 *   - both runs see the same responses (status, text, multi, lines, size, wire, truncation);
 *   - every byte is consumed, response sizes add up to the bytes before the last one's end;
 *   - texts are bounded and NUL-terminated, a continuation keeps no text and comes only where a
 *     SASL exchange is outstanding, a body only after "+OK" to a multi-line command, and the
 *     un-stuffed body is never larger than the bytes that carried it;
 *   - every multi-line response can be rewritten by pop3_capa_edit() both ways, and the result
 *     parses back as one multi-line response with or without an STLS line, as asked;
 *   - pop3_pairs never holds more than its capacity and never holds the credentials the fake
 *     client sends.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "pop3.h"
#include "pop3_pairs.h"

static const char fuzz_secret[] = "c2VjcmV0LXBhc3N3b3Jk";

static uint32_t fuzz_rand(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

static void fuzz_check_pair(const struct pop3_pair *p)
{
    FUZZ_CHECK(p->cmd_text_len <= POP3_PAIRS_TEXT_MAX);
    FUZZ_CHECK(p->cmd_text[p->cmd_text_len] == '\0');
    FUZZ_CHECK(p->text_len <= POP3_TEXT_MAX);
    FUZZ_CHECK(p->text[p->text_len] == '\0');
    FUZZ_CHECK(memmem(p->cmd_text, p->cmd_text_len, fuzz_secret, sizeof(fuzz_secret) - 1) == NULL);
}

/* The fake client: pushes a few commands drawn from the seed. */
static void fuzz_push_commands(struct pop3_pairs *pp, uint32_t *s)
{
    static const char *const lines[] = {"CAPA",
                                        "LIST",
                                        "LIST 1",
                                        "UIDL",
                                        "UIDL 2",
                                        "RETR 1",
                                        "TOP 1 0",
                                        "STAT",
                                        "USER a",
                                        "PASS c2VjcmV0LXBhc3N3b3Jk",
                                        "AUTH PLAIN c2VjcmV0LXBhc3N3b3Jk",
                                        "AUTH LOGIN",
                                        "AUTH",
                                        "DELE 1",
                                        "QUIT",
                                        "LANG"};
    enum { NLINES = sizeof(lines) / sizeof(lines[0]) };
    uint32_t x = fuzz_rand(s);
    unsigned n = x % 4;

    for (unsigned i = 0; i < n && pop3_pairs_room(pp) > 0; i++) {
        struct pop3_client cp = {0};
        struct pop3_event ev;
        char line[64];
        size_t len;

        x = fuzz_rand(s);
        if (x % (NLINES + 1) == NLINES) {
            /* a line the proxy answers itself */
            memset(&ev, 0, sizeof(ev));
            ev.type = (x & 0x100) ? POP3_EV_TOO_LONG : POP3_EV_INVALID;
        } else {
            len = (size_t)snprintf(line, sizeof(line), "%s\r\n", lines[x % (NLINES + 1)]);
            FUZZ_CHECK(pop3_client_parse(&cp, line, len, &ev) == len);
            FUZZ_CHECK(ev.type == POP3_EV_COMMAND);
        }
        FUZZ_CHECK(pop3_pairs_on_client_event(pp, &ev, x) == 0);
    }
}

/* A multi-line response in[0, len) (its bytes as sent): both rewrites must work and parse. */
static void fuzz_check_capa(const char *in, size_t len, const struct pop3_response *r)
{
    size_t cap = len + 16;
    char *out = malloc(cap);

    FUZZ_CHECK(out != NULL);
    FUZZ_CHECK(pop3_capa_edit(in, len, 0, out, cap) == (ssize_t)len);
    FUZZ_CHECK(memcmp(out, in, len) == 0);
    for (int add = 0; add < 2; add++) {
        ssize_t n =
            pop3_capa_edit(in, len, add ? POP3_CAPA_ADD_STLS : POP3_CAPA_DEL_STLS, out, cap);
        struct pop3_server sp = {0};
        struct pop3_server_event ev;
        bool had = pop3_capa_has(in, len, "STLS");

        FUZZ_CHECK(n >= 0 && (size_t)n <= cap);
        size_t k = pop3_server_parse(&sp, out, (size_t)n, POP3_FRAME_MULTI, 0, &ev);
        FUZZ_CHECK(ev.type == POP3_SEV_BODY && k < (size_t)n);
        FUZZ_CHECK(pop3_server_parse(&sp, out + k, (size_t)n - k, POP3_FRAME_MULTI, 0, &ev) ==
                   (size_t)n - k);
        FUZZ_CHECK(ev.type == POP3_SEV_RESPONSE && ev.resp->multi);
        FUZZ_CHECK(ev.resp->status == POP3_STATUS_OK);
        FUZZ_CHECK(ev.resp->text_len == r->text_len);
        FUZZ_CHECK(pop3_capa_has(out, (size_t)n, "STLS") == (add != 0));
        if (add)
            FUZZ_CHECK(ev.resp->lines == r->lines + (had ? 0 : 1));
        else
            FUZZ_CHECK(ev.resp->lines <= r->lines && (had || (size_t)n == len));
    }
    free(out);
}

/* Parses in[0, len) cut into reads; writes one line of text per event into out. */
static size_t fuzz_run(const char *in, size_t len, uint32_t seed, bool split, char *out, size_t cap)
{
    struct pop3_server sp = {0};
    struct pop3_pairs *pp = calloc(1, sizeof(*pp));
    struct pop3_pairs_entry *fifo = calloc(POP3_PAIRS_CAP, sizeof(*fifo));
    uint32_t cut = seed ^ (uint32_t)len, cmds = seed;
    size_t pos = 0, olen = 0;
    uint64_t wire = 0;

    FUZZ_CHECK(pp != NULL && fifo != NULL);
    pop3_pairs_attach(pp, fifo);
    while (pos < len) {
        size_t n = len - pos, off = 0;
        if (split) {
            uint32_t x = fuzz_rand(&cut);
            size_t want = (x & 0x80000000u) ? (x % 5) + 1 : (x % 300) + 1;
            if (n > want)
                n = want;
        }
        while (off < n) {
            struct pop3_server_event ev;
            enum pop3_frame frame = pop3_pairs_frame(pp);
            size_t k = pop3_server_parse(&sp, in + pos + off, n - off, frame, pos, &ev);
            const struct pop3_response *r = ev.resp;
            struct pop3_pair pair;

            FUZZ_CHECK(k <= n - off);
            off += k;
            if (ev.type == POP3_SEV_AGAIN) {
                FUZZ_CHECK(off == n && r == NULL);
                break;
            }
            FUZZ_CHECK(k > 0);
            FUZZ_CHECK(r->text_len <= POP3_TEXT_MAX && r->text[r->text_len] == '\0');
            FUZZ_CHECK(r->size <= r->wire && r->lines <= r->wire);
            FUZZ_CHECK(wire + r->wire == pos + off);
            FUZZ_CHECK((ev.type == POP3_SEV_BODY) == pop3_server_in_body(&sp));
            if (ev.type != POP3_SEV_BODY)
                wire += r->wire;
            switch (ev.type) {
            case POP3_SEV_BODY:
                FUZZ_CHECK(r->status == POP3_STATUS_OK && r->multi && frame == POP3_FRAME_MULTI);
                FUZZ_CHECK(r->lines == 0 && r->size == 0);
                break;
            case POP3_SEV_RESPONSE:
                FUZZ_CHECK(r->status == POP3_STATUS_OK || r->status == POP3_STATUS_ERR);
                FUZZ_CHECK(!r->multi || (r->status == POP3_STATUS_OK && frame == POP3_FRAME_MULTI));
                if (r->multi)
                    fuzz_check_capa(in + pos + off - r->wire, (size_t)r->wire, r);
                else
                    FUZZ_CHECK(r->lines == 0 && r->size == 0);
                break;
            case POP3_SEV_CONTINUATION:
                FUZZ_CHECK(r->status == POP3_STATUS_CONT && frame == POP3_FRAME_SASL);
                FUZZ_CHECK(r->text_len == 0 && !r->multi);
                break;
            case POP3_SEV_GARBAGE:
                FUZZ_CHECK(r->status == POP3_STATUS_NONE && !r->multi);
                break;
            default:
                FUZZ_CHECK(0);
            }
            int w = snprintf(out + olen, cap - olen, "%d %d|%d|%u|%llu|%llu|%d|", (int)ev.type,
                             (int)r->status, r->multi, r->lines, (unsigned long long)r->size,
                             (unsigned long long)r->wire, r->truncated);
            FUZZ_CHECK(w > 0 && (size_t)w < cap - olen);
            olen += (size_t)w;
            FUZZ_CHECK(olen + r->text_len + 1 < cap);
            memcpy(out + olen, r->text, r->text_len);
            olen += r->text_len;
            out[olen++] = '\n';
            if (ev.type == POP3_SEV_RESPONSE || ev.type == POP3_SEV_CONTINUATION) {
                enum pop3_pairs_res res = pop3_pairs_on_response(pp, r, &pair);
                FUZZ_CHECK(res != POP3_PAIRS_INTERMEDIATE || r->status == POP3_STATUS_CONT);
                fuzz_check_pair(&pair);
                while (pop3_pairs_take_local(pp, 0, &pair))
                    fuzz_check_pair(&pair);
                fuzz_push_commands(pp, &cmds);
                FUZZ_CHECK(pop3_pairs_outstanding(pp) <= POP3_PAIRS_CAP);
            }
        }
        pos += n;
    }
    {
        struct pop3_pair pair;
        while (pop3_pairs_abort(pp, &pair))
            fuzz_check_pair(&pair);
        FUZZ_CHECK(pop3_pairs_oldest(pp) == POP3_CMD_NONE);
    }
    FUZZ_CHECK(memmem(fifo, POP3_PAIRS_CAP * sizeof(*fifo), fuzz_secret, sizeof(fuzz_secret) - 1) ==
               NULL);
    fuzz_check_pair(&pop3_pairs_summary(pp)->primary);
    free(fifo);
    free(pp);
    return olen;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t cap, la, lb;
    char *a, *b;

    if (size < 1)
        return 0;
    /* one line per event, each at most ~80 bytes of numbers plus the text */
    cap = (size + 1) * (POP3_TEXT_MAX + 100);
    a = malloc(cap);
    b = malloc(cap);
    FUZZ_CHECK(a != NULL && b != NULL);
    la = fuzz_run((const char *)data + 1, size - 1, data[0], false, a, cap);
    lb = fuzz_run((const char *)data + 1, size - 1, data[0], true, b, cap);
    FUZZ_CHECK(la == lb && memcmp(a, b, la) == 0);
    free(a);
    free(b);
    return 0;
}
