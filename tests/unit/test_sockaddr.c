/* test_sockaddr.c: unit tests for proxy/sockaddr.c (addresses as log text). */
#include "sockaddr.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>

/* What sockaddr_format must write: inet_ntop and the port, as "%s:%u" or "[%s]:%u". */
static void reference(const struct sockaddr *sa, char *out, size_t cap)
{
    char host[INET6_ADDRSTRLEN];

    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(out, cap, "%s:%u", host, (unsigned)ntohs(in->sin_port));
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        snprintf(out, cap, "[%s]:%u", host, (unsigned)ntohs(in6->sin6_port));
    }
}

static void expect_v4(uint32_t addr, uint16_t port)
{
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(port)};
    char got[SOCKADDR_TEXT_MAX], want[SOCKADDR_TEXT_MAX];

    in.sin_addr.s_addr = htonl(addr);
    memset(got, 'x', sizeof(got));
    reference((struct sockaddr *)&in, want, sizeof(want));
    ASSERT_STREQ(sockaddr_format((struct sockaddr *)&in, got, sizeof(got)), want);
}

static void test_ipv4(void)
{
    char out[SOCKADDR_TEXT_MAX];
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(25)};

    in.sin_addr.s_addr = htonl(0x7f000001);
    ASSERT_STREQ(sockaddr_format((struct sockaddr *)&in, out, sizeof(out)), "127.0.0.1:25");
    expect_v4(0, 0);
    expect_v4(0xffffffff, 65535);
    expect_v4(0x0a00ff09, 9);
    expect_v4(0xc0a86463, 10000);
    /* Every octet value in every position, and ports of every length. */
    for (uint32_t v = 0; v < 256; v++) {
        expect_v4(v << 24 | (255 - v) << 16 | (v * 7 % 256) << 8 | v, (uint16_t)(v * 257));
        expect_v4(v, (uint16_t)v);
    }
    uint32_t x = 2463534242u; /* xorshift32: a spread of addresses and ports */
    for (int i = 0; i < 100000; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        expect_v4(x, (uint16_t)(x >> 7));
    }
}

static void test_ipv6(void)
{
    static const char *const addrs[] = {
        "::",
        "::1",
        "2001:db8::25",
        "fe80::1:2:3:4",
        "2001:db8:0:0:1:0:0:1",
        "::ffff:192.0.2.1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "1:0:2:0:3:0:4:0",
    };
    for (size_t i = 0; i < sizeof(addrs) / sizeof(addrs[0]); i++) {
        struct sockaddr_in6 in6 = {.sin6_family = AF_INET6,
                                   .sin6_port = htons((uint16_t)(i * 9001))};
        char got[SOCKADDR_TEXT_MAX], want[SOCKADDR_TEXT_MAX];

        ASSERT_EQ(inet_pton(AF_INET6, addrs[i], &in6.sin6_addr), 1);
        reference((struct sockaddr *)&in6, want, sizeof(want));
        ASSERT_STREQ(sockaddr_format((struct sockaddr *)&in6, got, sizeof(got)), want);
    }
    /* The longest IPv6 text fits SOCKADDR_TEXT_MAX whole. */
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons(65535)};
    char out[SOCKADDR_TEXT_MAX];
    ASSERT_EQ(inet_pton(AF_INET6, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", &in6.sin6_addr),
              1);
    sockaddr_format((struct sockaddr *)&in6, out, sizeof(out));
    ASSERT_STREQ(out, "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
}

static void test_other_family_and_truncation(void)
{
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(2525)};
    char out[16];

    ASSERT_STREQ(sockaddr_format((struct sockaddr *)&un, out, sizeof(out)), "-");
    in.sin_addr.s_addr = htonl(0xc0000201);
    ASSERT_STREQ(sockaddr_format((struct sockaddr *)&in, out, 8), "192.0.2");
    ASSERT_STREQ(sockaddr_format((struct sockaddr *)&in, out, 1), "");
    memset(out, 'x', sizeof(out));
    ASSERT(sockaddr_format((struct sockaddr *)&in, out, 0) == out);
    ASSERT_EQ(out[0], 'x'); /* cap 0: nothing written */
}

int main(void)
{
    test_ipv4();
    test_ipv6();
    test_other_family_and_truncation();
    printf("test_sockaddr: ok\n");
    return 0;
}
