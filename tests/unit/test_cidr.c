/* test_cidr.c: unit tests for proxy/cidr.c (allow/deny address blocks). */
#include "cidr.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>

/* Parses text placed against a guard page, so an over-read crashes. */
static enum cidr_err parse_guarded(const char *text, struct cidr *out)
{
    struct guard g;
    size_t n = strlen(text);
    const char *p = guard_place(&g, text, n);
    enum cidr_err e = cidr_parse(p, n, out);

    guard_free(&g);
    return e;
}

static void expect_block(const char *text, const char *want)
{
    struct cidr c;
    char out[80];

    if (parse_guarded(text, &c) != CIDR_OK)
        TEST_FAIL_("'%s' did not parse", text);
    ASSERT_STREQ(cidr_format(&c, out, sizeof(out)), want);
}

static void expect_error(const char *text, enum cidr_err want)
{
    struct cidr c;

    memset(&c, 0xa5, sizeof(c));
    enum cidr_err got = parse_guarded(text, &c);
    if (got != want)
        TEST_FAIL_("'%s': error %d (%s), want %d (%s)", text, got, cidr_strerror(got), want,
                   cidr_strerror(want));
    ASSERT_EQ(c.family, 0); /* zeroed on error */
    ASSERT_EQ(c.prefix, 0);
}

static void test_parse(void)
{
    expect_block("10.0.0.0/8", "10.0.0.0/8");
    expect_block("192.0.2.7", "192.0.2.7/32");
    expect_block("192.0.2.7/32", "192.0.2.7/32");
    expect_block("0.0.0.0/0", "0.0.0.0/0");
    expect_block("172.16.0.0/12", "172.16.0.0/12");
    expect_block("2001:db8::/32", "2001:db8::/32");
    expect_block("::1", "::1/128");
    expect_block("::/0", "::/0");
    expect_block("2001:db8:0:1::/64", "2001:db8:0:1::/64");
    expect_block("fe80::/10", "fe80::/10");
    /* IPv4-mapped IPv6 blocks are IPv4 blocks. */
    expect_block("::ffff:192.0.2.0/120", "192.0.2.0/24");
    expect_block("::ffff:0.0.0.0/96", "0.0.0.0/0");
    expect_block("::/80", "::/80"); /* wider than IPv4: stays IPv6 */
    expect_error("::ffff:0:0/95", CIDR_ERR_HOST_BITS);
    /* whole and byte-at-a-time lengths: a prefix of the text is its own question */
    struct cidr c;
    ASSERT_EQ(cidr_parse("10.0.0.0/8junk", 10, &c), CIDR_OK);
    ASSERT_EQ(c.prefix, 8);
    ASSERT_EQ(cidr_parse("10.0.0.0/8", 9, &c), CIDR_ERR_PREFIX);
    ASSERT_EQ(cidr_parse("10.0.0.0/8", 8, &c), CIDR_OK);
    ASSERT_EQ(c.prefix, 32);

    expect_error("", CIDR_ERR_EMPTY);
    expect_error("10.0.0.0/", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/x", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/-1", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/+8", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/ 8", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/0008", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/8/8", CIDR_ERR_PREFIX);
    expect_error("10.0.0.0/33", CIDR_ERR_PREFIX_MAX);
    expect_error("::/129", CIDR_ERR_PREFIX_MAX);
    expect_error("10.0.0.1/8", CIDR_ERR_HOST_BITS);
    expect_error("10.128.0.0/8", CIDR_ERR_HOST_BITS);
    expect_error("192.0.2.1/31", CIDR_ERR_HOST_BITS);
    expect_error("2001:db8::1/64", CIDR_ERR_HOST_BITS);
    expect_error("10.0.0", CIDR_ERR_ADDRESS);
    expect_error("10.0.0.256", CIDR_ERR_ADDRESS);
    expect_error("mail.example.com", CIDR_ERR_ADDRESS);
    expect_error(" 10.0.0.0/8", CIDR_ERR_ADDRESS);
    expect_error("10.0.0.0/8 ", CIDR_ERR_PREFIX);
    expect_error("[::1]", CIDR_ERR_ADDRESS);
    expect_error("::1%lo", CIDR_ERR_ADDRESS);
    expect_error("1111111111111111111111111111111111111111111111111111111111111111",
                 CIDR_ERR_ADDRESS);
    expect_error("11111111111111111111111111111111111111111111111111111111111111111",
                 CIDR_ERR_TOO_LONG);
    ASSERT_EQ(cidr_parse("10.0\0.0.0", 9, &c), CIDR_ERR_ADDRESS);
    ASSERT_STREQ(cidr_strerror(CIDR_ERR_HOST_BITS), "host bits set past the prefix length");
}

static struct sockaddr_storage v4(const char *a)
{
    struct sockaddr_storage ss = {0};
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;

    in->sin_family = AF_INET;
    in->sin_port = htons(25);
    ASSERT_EQ(inet_pton(AF_INET, a, &in->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage v6(const char *a)
{
    struct sockaddr_storage ss = {0};
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;

    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(25);
    ASSERT_EQ(inet_pton(AF_INET6, a, &in6->sin6_addr), 1);
    return ss;
}

static bool match(const char *block, struct sockaddr_storage ss)
{
    struct cidr c;

    ASSERT_EQ(cidr_parse(block, strlen(block), &c), CIDR_OK);
    return cidr_match(&c, (const struct sockaddr *)&ss);
}

static void test_match(void)
{
    ASSERT(match("10.0.0.0/8", v4("10.255.1.2")));
    ASSERT(!match("10.0.0.0/8", v4("11.0.0.0")));
    ASSERT(!match("10.0.0.0/8", v4("9.255.255.255")));
    ASSERT(match("192.0.2.128/25", v4("192.0.2.200")));
    ASSERT(!match("192.0.2.128/25", v4("192.0.2.127")));
    ASSERT(match("192.0.2.7", v4("192.0.2.7")));
    ASSERT(!match("192.0.2.7", v4("192.0.2.6")));
    ASSERT(match("0.0.0.0/0", v4("203.0.113.9")));
    ASSERT(!match("0.0.0.0/0", v6("2001:db8::1"))); /* families never cross */
    ASSERT(!match("::/0", v4("203.0.113.9")));
    ASSERT(match("::/0", v6("2001:db8::1")));
    ASSERT(!match("::/0", v6("::ffff:192.0.2.1"))); /* an IPv4 client, even so */
    ASSERT(!match("::/80", v6("::ffff:192.0.2.1")));
    ASSERT(match("2001:db8::/32", v6("2001:db8:ffff::1")));
    ASSERT(!match("2001:db8::/32", v6("2001:db9::1")));
    ASSERT(match("2001:db8::/33", v6("2001:db8:7fff::1")));
    ASSERT(!match("2001:db8::/33", v6("2001:db8:8000::1")));
    ASSERT(match("::1", v6("::1")));
    /* a dual-stack socket's view of an IPv4 client */
    ASSERT(match("10.0.0.0/8", v6("::ffff:10.1.2.3")));
    ASSERT(!match("10.0.0.0/8", v6("::ffff:11.1.2.3")));
    ASSERT(match("::ffff:10.0.0.0/104", v4("10.9.9.9")));

    struct sockaddr_storage unix_sa = {.ss_family = AF_UNIX};
    ASSERT(!match("0.0.0.0/0", unix_sa));
    struct cidr empty = {0};
    struct sockaddr_storage a = v4("0.0.0.0");
    ASSERT(!cidr_match(&empty, (const struct sockaddr *)&a));

    struct cidr list[3];
    ASSERT_EQ(cidr_parse("192.0.2.0/24", 12, &list[0]), CIDR_OK);
    ASSERT_EQ(cidr_parse("2001:db8::/32", 13, &list[1]), CIDR_OK);
    ASSERT_EQ(cidr_parse("127.0.0.1", 9, &list[2]), CIDR_OK);
    a = v4("127.0.0.1");
    ASSERT(cidr_list_match(list, 3, (const struct sockaddr *)&a));
    ASSERT(!cidr_list_match(list, 2, (const struct sockaddr *)&a));
    ASSERT(!cidr_list_match(list, 0, (const struct sockaddr *)&a));
    a = v6("2001:db8::25");
    ASSERT(cidr_list_match(list, 3, (const struct sockaddr *)&a));

    char out[4];
    ASSERT_STREQ(cidr_format(&list[0], out, sizeof(out)), "192"); /* cut, NUL-terminated */
    ASSERT_STREQ(cidr_format(&empty, out, sizeof(out)), "-");
}

int main(void)
{
    test_parse();
    test_match();
    printf("test_cidr: all passed\n");
    return 0;
}
