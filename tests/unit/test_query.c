/* test_query.c: admin query strings and client= networks (query.c). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "query.h"
#include "test.h"

static bool parse(const char *q, struct query_filter *f)
{
    return query_parse(q, strlen(q), f);
}

static struct sockaddr_storage addr(const char *text)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (inet_pton(AF_INET, text, &((struct sockaddr_in *)&ss)->sin_addr) == 1)
        ss.ss_family = AF_INET;
    else if (inet_pton(AF_INET6, text, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1)
        ss.ss_family = AF_INET6;
    return ss;
}

static bool match(const struct query_filter *f, const char *text)
{
    struct sockaddr_storage ss = addr(text);
    return query_client_match(f, (const struct sockaddr *)&ss);
}

static void test_good(void)
{
    struct query_filter f;

    ASSERT(query_parse(NULL, 0, &f));
    ASSERT(!f.has_client && !f.has_listener && !f.error_only);
    ASSERT(parse("client=10.0.0.0%2F8&listener=mx%20in&error=1", &f));
    ASSERT(f.has_client && f.client.family == AF_INET && f.client.prefix == 8);
    ASSERT(f.has_listener);
    ASSERT_STREQ(f.listener, "mx in");
    ASSERT(f.error_only);
    ASSERT(parse("error=0&&listener=a+b&", &f));
    ASSERT(!f.error_only);
    ASSERT_STREQ(f.listener, "a b");
    ASSERT(parse("client=2001:db8::/32", &f));
    ASSERT(f.client.family == AF_INET6 && f.client.prefix == 32);
    ASSERT(parse("client=127.0.0.1", &f));
    ASSERT_EQ(f.client.prefix, 32);
}

static void test_bad(void)
{
    static const char *const bad[] = {
        "client",
        "client=",
        "client=1.2.3",
        "client=1.2.3.4/33",
        "client=::1/129",
        "client=1.2.3.4/",
        "client=1.2.3.4/x",
        "client=1.2.3.4/0008",
        "error=2",
        "error=",
        "nope=1",
        "listener=",
        "listener=%",
        "listener=%4",
        "listener=%zz",
        "listener=a%00b",
        "error=1&error=1",
        "listener=a&listener=b",
        "client=::1&client=::1",
        "=1",
    };
    struct query_filter f;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (parse(bad[i], &f))
            TEST_FAIL_("accepted %s", bad[i]);
    }
    char longname[200];
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    memcpy(longname, "listener=", 9);
    ASSERT(!parse(longname, &f));
}

static void test_match(void)
{
    struct query_filter f;

    ASSERT(parse("", &f));
    ASSERT(match(&f, "192.0.2.1"));
    ASSERT(parse("client=192.0.2.0/25", &f));
    ASSERT(match(&f, "192.0.2.1"));
    ASSERT(match(&f, "192.0.2.127"));
    ASSERT(!match(&f, "192.0.2.128"));
    ASSERT(match(&f, "::ffff:192.0.2.5")); /* IPv4-mapped */
    ASSERT(!match(&f, "2001:db8::1"));
    ASSERT(parse("client=0.0.0.0/0", &f));
    ASSERT(match(&f, "203.0.113.9"));
    ASSERT(parse("client=2001:db8::/33", &f));
    ASSERT(match(&f, "2001:db8:7fff::1"));
    ASSERT(!match(&f, "2001:db8:8000::1"));
    ASSERT(!match(&f, "192.0.2.1"));
    struct sockaddr_storage none;
    memset(&none, 0, sizeof(none));
    ASSERT(!query_client_match(&f, (const struct sockaddr *)&none));
}

static void test_sid(void)
{
    uint64_t sid = 0;

    ASSERT(query_parse_sid("a40a02d600000001", 16, &sid));
    ASSERT(sid == 0xa40a02d600000001ULL);
    ASSERT(query_parse_sid("FF", 2, &sid));
    ASSERT_EQ(sid, 255);
    ASSERT(!query_parse_sid("", 0, &sid));
    ASSERT(!query_parse_sid("00000000000000001", 17, &sid));
    ASSERT(!query_parse_sid("12g4", 4, &sid));
}

int main(void)
{
    test_good();
    test_bad();
    test_match();
    test_sid();
    printf("test_query: ok\n");
    return 0;
}
