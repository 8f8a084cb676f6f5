/* fuzz_cidr.c: libFuzzer harness for the allow/deny address block parser (cidr.c).
 *
 * Input: byte 0 picks how much of the rest is the block (the parser takes a length, not a
 * NUL); the rest is the text. A block that parses must: format back to text that parses to
 * the same block, have no host bits past its prefix, match its own network address and the
 * last address inside it (unless that is IPv4-mapped: an IPv4 client), and not match an
 * address just outside it (unless it is /0).
 * Whatever is parsed, the same bytes are also matched as a client address against it.
 */
#include "cidr.h"
#include "fuzz.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

/* The block's address with every host bit set to one (last = true), or its network address,
 * as a socket address of its family. */
static struct sockaddr_storage fuzz_edge(const struct cidr *c, bool last)
{
    struct sockaddr_storage ss;
    uint8_t a[16];
    unsigned bits = c->family == AF_INET ? 32 : 128;

    memset(&ss, 0, sizeof(ss));
    memcpy(a, c->addr, sizeof(a));
    for (unsigned i = c->prefix; last && i < bits; i++)
        a[i / 8] |= (uint8_t)(0x80u >> (i % 8));
    if (c->family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        memcpy(&in->sin_addr, a, 4);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, a, 16);
    }
    return ss;
}

/* One past the block's last address: flip the last prefix bit of its network address. */
static struct sockaddr_storage fuzz_outside(const struct cidr *c)
{
    struct sockaddr_storage ss = fuzz_edge(c, false);
    unsigned bit = c->prefix - 1u;
    uint8_t *a = c->family == AF_INET ? (uint8_t *)&((struct sockaddr_in *)&ss)->sin_addr
                                      : ((struct sockaddr_in6 *)&ss)->sin6_addr.s6_addr;
    a[bit / 8] ^= (uint8_t)(0x80u >> (bit % 8));
    return ss;
}

/* An IPv6 address in ::ffff:0:0/96: a client there is an IPv4 client, and an IPv6 block
 * never matches those (cidr.h). */
static bool fuzz_v4mapped(const struct sockaddr_storage *ss)
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;

    return ss->ss_family == AF_INET6 && memcmp(in6->sin6_addr.s6_addr, prefix, 12) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cidr c, again;
    char text[CIDR_TEXT_MAX + 16];

    if (size == 0)
        return 0;
    size_t len = size - 1;
    if (data[0] != 0xff && data[0] < len)
        len = data[0];
    enum cidr_err e = cidr_parse((const char *)data + 1, len, &c);
    FUZZ_CHECK(cidr_strerror(e) != NULL);
    if (e != CIDR_OK) {
        FUZZ_CHECK(c.family == 0 && c.prefix == 0);
        return 0;
    }
    FUZZ_CHECK(c.family == AF_INET || c.family == AF_INET6);
    FUZZ_CHECK(c.prefix <= (c.family == AF_INET ? 32 : 128));
    if (c.family == AF_INET)
        for (unsigned i = 4; i < 16; i++)
            FUZZ_CHECK(c.addr[i] == 0);

    cidr_format(&c, text, sizeof(text));
    FUZZ_CHECK(cidr_parse(text, strlen(text), &again) == CIDR_OK);
    FUZZ_CHECK(memcmp(&c, &again, sizeof(c)) == 0);

    struct sockaddr_storage lo = fuzz_edge(&c, false), hi = fuzz_edge(&c, true);
    FUZZ_CHECK(cidr_match(&c, (const struct sockaddr *)&lo) == !fuzz_v4mapped(&lo));
    FUZZ_CHECK(cidr_match(&c, (const struct sockaddr *)&hi) == !fuzz_v4mapped(&hi));
    FUZZ_CHECK(cidr_list_match(&c, 1, (const struct sockaddr *)&hi) == !fuzz_v4mapped(&hi));
    if (c.prefix > 0) {
        struct sockaddr_storage out = fuzz_outside(&c);
        FUZZ_CHECK(!cidr_match(&c, (const struct sockaddr *)&out));
    }
    /* The same bytes as a client address, when they are one. */
    if (size >= 17) {
        struct sockaddr_in6 in6 = {.sin6_family = AF_INET6};
        memcpy(&in6.sin6_addr, data + 1, 16);
        (void)cidr_match(&c, (const struct sockaddr *)&in6);
    }
    return 0;
}
