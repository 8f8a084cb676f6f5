/* fuzz_probe.c: libFuzzer harness for proxy/probe.c, the health check dialogues.
 *
 * Input layout: byte 0 picks the protocol (and the SMTP EHLO dialogue) and seeds the cut
 * points; the rest is what a backend sends. The harness runs the probe on the whole input and
 * on the input cut into reads, and checks:
 *   - both runs reach the same verdict with the same reason and send the same commands;
 *   - probe_feed never reports more bytes used than it was given, and AGAIN uses them all;
 *   - a failure always has a reason, a pass never has one; reasons are NUL-terminated.
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "fuzz.h"
#include "probe.h"

struct fuzz_run {
    enum probe_status verdict;
    char reason[PROBE_REASON_MAX];
    char sent[4 * PROBE_OUTPUT_MAX];
    size_t n_sent;
};

static void fuzz_run(struct fuzz_run *r, enum probe_proto proto, bool smtp, const uint8_t *data,
                     size_t size, uint32_t seed)
{
    struct probe p;
    size_t off = 0;

    memset(r, 0, sizeof(*r));
    probe_init(&p, proto, smtp, "fuzz.example");
    while (off < size) {
        size_t n = size - off;
        if (seed != 0) {
            seed = seed * 1103515245u + 12345u;
            n = 1 + (seed >> 16) % 13;
            if (n > size - off)
                n = size - off;
        }
        size_t pos = 0;
        while (pos < n) {
            size_t used = 0;
            enum probe_status st = probe_feed(&p, (const char *)data + off + pos, n - pos, &used);
            FUZZ_CHECK(used <= n - pos);
            pos += used;
            if (st == PROBE_AGAIN) {
                FUZZ_CHECK(pos == n);
                continue;
            }
            if (st == PROBE_SEND) {
                const char *out = probe_output(&p);
                size_t len = strlen(out);
                FUZZ_CHECK(len > 2 && len < PROBE_OUTPUT_MAX && out[len - 1] == '\n');
                FUZZ_CHECK(r->n_sent + len < sizeof(r->sent)); /* at most EHLO and QUIT */
                memcpy(r->sent + r->n_sent, out, len);
                r->n_sent += len;
                continue;
            }
            r->verdict = st;
            const char *why = probe_reason(&p);
            FUZZ_CHECK(strnlen(why, PROBE_REASON_MAX) < PROBE_REASON_MAX);
            FUZZ_CHECK((st == PROBE_FAIL) == (why[0] != '\0'));
            memcpy(r->reason, why, strlen(why) + 1);
            return;
        }
        off += n;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_run whole, cut;

    if (size < 1)
        return 0;
    enum probe_proto proto = (enum probe_proto)(data[0] % PROBE_PROTO_COUNT_);
    bool smtp = proto == PROBE_SMTP && (data[0] & 0x80) != 0;
    fuzz_run(&whole, proto, smtp, data + 1, size - 1, 0);
    fuzz_run(&cut, proto, smtp, data + 1, size - 1, data[0] | 1u);
    FUZZ_CHECK(whole.verdict == cut.verdict);
    FUZZ_CHECK(strcmp(whole.reason, cut.reason) == 0);
    FUZZ_CHECK(whole.n_sent == cut.n_sent && memcmp(whole.sent, cut.sent, whole.n_sent) == 0);
    return 0;
}
