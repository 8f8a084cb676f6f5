/* fuzz_smtp_server.c: libFuzzer harness for the reply side of proxy/smtp.c and for the
 * reply matching in proxy/smtp_pairs.c.
 *
 * Input layout: byte 0 seeds the cut points and the commands the make-believe client keeps
 * outstanding; the rest is what a server sends. The harness parses it whole and cut into reads
 * at points derived from the data, and checks:
 *   - both runs see the same replies (code, esc, text, lines, size, truncation);
 *   - every byte is consumed, reply sizes add up to the bytes before the last reply's end;
 *   - summaries are bounded and NUL-terminated, codes are 100..599 (0 for garbage), an esc
 *     has the form class.subject.detail;
 *   - smtp_pairs never holds more than its capacity and never leaks AUTH credentials: the
 *     credential the fake client sends is never found in its FIFO or in any command text.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "smtp.h"
#include "smtp_pairs.h"

/* "AUTH PLAIN <secret>": the secret must never reach a pair. */
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

static void fuzz_check_reply(const struct smtp_reply *r, enum smtp_sev type)
{
    size_t el = strlen(r->esc);

    FUZZ_CHECK(r->text_len <= SMTP_REPLY_TEXT_MAX);
    FUZZ_CHECK(r->text[r->text_len] == '\0');
    FUZZ_CHECK(r->lines >= 1);
    if (type == SMTP_SEV_GARBAGE) {
        FUZZ_CHECK(r->code == 0 && el == 0);
        return;
    }
    FUZZ_CHECK(r->code >= 100 && r->code <= 599);
    FUZZ_CHECK(r->size >= 4);
    FUZZ_CHECK(el < SMTP_ESC_MAX);
    if (el > 0) {
        FUZZ_CHECK(el >= 5 && r->esc[0] == '0' + r->code / 100 && r->esc[1] == '.');
        FUZZ_CHECK(strchr(r->esc + 2, '.') != NULL);
    }
}

/* The fake client: pushes a few commands drawn from the seed. */
static void fuzz_push_commands(struct smtp_pairs *pp, uint32_t *s)
{
    static const char *const lines[] = {"MAIL FROM:<a@b>",
                                        "RCPT TO:<c@d>",
                                        "DATA",
                                        "RSET",
                                        "NOOP",
                                        "EHLO x",
                                        "QUIT",
                                        "AUTH PLAIN c2VjcmV0LXBhc3N3b3Jk",
                                        "BDAT 3 LAST",
                                        "XCLIENT ADDR=192.0.2.1",
                                        "STARTTLS"};
    uint32_t x = fuzz_rand(s);
    unsigned n = x % 4;

    for (unsigned i = 0; i < n && smtp_pairs_room(pp) > 0; i++) {
        struct smtp_client cp = {0};
        struct smtp_event ev;
        char line[64];
        size_t len;

        x = fuzz_rand(s);
        if (x % 13 == 12) {
            /* a line the proxy answers itself */
            memset(&ev, 0, sizeof(ev));
            ev.type = (x & 0x100) ? SMTP_EV_TOO_LONG : SMTP_EV_INVALID;
        } else if (x % 13 == 11) {
            memset(&ev, 0, sizeof(ev));
            ev.type = SMTP_EV_DATA_END;
            ev.cmd = SMTP_CMD_DOT;
            ev.size = x >> 8;
            if (x & 0x200)
                ev.flags = SMTP_EV_F_SMUGGLING;
        } else {
            len = (size_t)snprintf(line, sizeof(line), "%s\r\n", lines[x % 11]);
            FUZZ_CHECK(smtp_client_parse(&cp, line, len, &ev) == len);
            FUZZ_CHECK(ev.type == SMTP_EV_COMMAND);
        }
        FUZZ_CHECK(smtp_pairs_on_client_event(pp, &ev, x) == 0);
    }
}

static void fuzz_check_pair(const struct smtp_pair *p)
{
    FUZZ_CHECK(p->cmd_text_len <= SMTP_PAIRS_TEXT_MAX);
    FUZZ_CHECK(p->cmd_text[p->cmd_text_len] == '\0');
    FUZZ_CHECK(p->text_len <= SMTP_REPLY_TEXT_MAX);
    FUZZ_CHECK(p->text[p->text_len] == '\0');
    /* Reply text comes from the server and may hold anything; command text may not. */
    FUZZ_CHECK(memmem(p->cmd_text, p->cmd_text_len, fuzz_secret, sizeof(fuzz_secret) - 1) == NULL);
}

/* Parses in[0, len) cut into reads; writes one line of text per reply into out. */
static size_t fuzz_run(const char *in, size_t len, uint32_t seed, bool split, char *out, size_t cap)
{
    struct smtp_server sp = {0};
    struct smtp_pairs *pp = calloc(1, sizeof(*pp));
    struct smtp_pairs_entry *fifo = calloc(SMTP_PAIRS_CAP, sizeof(*fifo));
    uint32_t cut = seed ^ (uint32_t)len, cmds = seed;
    size_t pos = 0, olen = 0;
    uint64_t sizes = 0;

    FUZZ_CHECK(pp != NULL && fifo != NULL);
    smtp_pairs_attach(pp, fifo);
    while (pos < len) {
        size_t n = len - pos, off = 0;
        if (split) {
            uint32_t x = fuzz_rand(&cut);
            size_t want = (x & 0x80000000u) ? (x % 5) + 1 : (x % 300) + 1;
            if (n > want)
                n = want;
        }
        while (off < n) {
            struct smtp_server_event ev;
            size_t k = smtp_server_parse(&sp, in + pos + off, n - off, pos, &ev);
            FUZZ_CHECK(k <= n - off);
            off += k;
            if (ev.type == SMTP_SEV_AGAIN) {
                FUZZ_CHECK(off == n);
                break;
            }
            FUZZ_CHECK(k > 0);
            fuzz_check_reply(ev.reply, ev.type);
            sizes += ev.reply->size;
            FUZZ_CHECK(sizes == pos + off);
            int w = snprintf(out + olen, cap - olen, "%d %d|%s|%u|%d|%llu|", (int)ev.type,
                             ev.reply->code, ev.reply->esc, ev.reply->lines, ev.reply->truncated,
                             (unsigned long long)ev.reply->size);
            FUZZ_CHECK(w > 0 && (size_t)w < cap - olen);
            olen += (size_t)w;
            FUZZ_CHECK(olen + ev.reply->text_len + 1 < cap);
            memcpy(out + olen, ev.reply->text, ev.reply->text_len);
            olen += ev.reply->text_len;
            out[olen++] = '\n';
            if (ev.type == SMTP_SEV_REPLY) {
                struct smtp_pair pair;
                fuzz_push_commands(pp, &cmds);
                smtp_pairs_on_reply(pp, ev.reply, &pair);
                fuzz_check_pair(&pair);
                while (smtp_pairs_take_local(pp, 0, &pair))
                    fuzz_check_pair(&pair);
                FUZZ_CHECK(smtp_pairs_outstanding(pp) <= SMTP_PAIRS_CAP);
            }
        }
        pos += n;
    }
    {
        struct smtp_pair pair;
        while (smtp_pairs_abort(pp, &pair))
            fuzz_check_pair(&pair);
        FUZZ_CHECK(smtp_pairs_oldest(pp) == SMTP_CMD_NONE);
    }
    FUZZ_CHECK(memmem(fifo, SMTP_PAIRS_CAP * sizeof(*fifo), fuzz_secret, sizeof(fuzz_secret) - 1) ==
               NULL);
    fuzz_check_pair(&smtp_pairs_summary(pp)->primary);
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
    /* one line per reply, each at most ~60 bytes of numbers plus the text */
    cap = (size + 1) * (SMTP_REPLY_TEXT_MAX + 80);
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
