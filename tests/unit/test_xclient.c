/* test_xclient.c: unit tests for proxy/xclient.c, Postfix XCLIENT announcements and lines. */
#include "test.h"
#include "xclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <string.h>

static struct sockaddr_storage sa4(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    ASSERT_EQ(inet_pton(AF_INET, ip, &in->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage sa6(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    ASSERT_EQ(inet_pton(AF_INET6, ip, &in6->sin6_addr), 1);
    return ss;
}

#define SA(ss) ((const struct sockaddr *)&(ss))

static void test_xclient_caps(void)
{
    unsigned caps = 0xdead;

    ASSERT_EQ(xclient_parse_caps("NAME ADDR PROTO HELO", 20),
              XCLIENT_F_NAME | XCLIENT_F_ADDR | XCLIENT_F_PROTO | XCLIENT_F_HELO);
    const char *list = "name  port\tLogin destaddr DESTPORT FOO ADDRX";
    ASSERT_EQ(xclient_parse_caps(list, strlen(list)), XCLIENT_F_NAME | XCLIENT_F_PORT |
                                                          XCLIENT_F_LOGIN | XCLIENT_F_DESTADDR |
                                                          XCLIENT_F_DESTPORT);
    ASSERT_EQ(xclient_parse_caps("", 0), 0);
    /* Only len bytes are read. */
    ASSERT_EQ(xclient_parse_caps("NAMEADDR", 4), XCLIENT_F_NAME);

    const char *l = "250-XCLIENT NAME ADDR PROTO HELO PORT LOGIN DESTADDR DESTPORT\r\n";
    ASSERT(xclient_ehlo_line_caps(l, strlen(l), &caps));
    ASSERT_EQ(caps, XCLIENT_F_ALL & ~XCLIENT_F_REVERSE_NAME);
    /* Postfix 3.7's list. */
    l = "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n";
    ASSERT(xclient_ehlo_line_caps(l, strlen(l), &caps));
    ASSERT_EQ(caps, XCLIENT_F_ALL);
    l = "250 XCLIENT ADDR";
    ASSERT(xclient_ehlo_line_caps(l, strlen(l), &caps));
    ASSERT_EQ(caps, XCLIENT_F_ADDR);
    l = "xclient helo";
    ASSERT(xclient_ehlo_line_caps(l, strlen(l), &caps));
    ASSERT_EQ(caps, XCLIENT_F_HELO);
    l = "250-XCLIENT";
    ASSERT(xclient_ehlo_line_caps(l, strlen(l), &caps));
    ASSERT_EQ(caps, 0);

    caps = 0x1234;
    const char *no[] = {"250-PIPELINING",   "250-XCLIENTX NAME", "250 8BITMIME", "250-", "",
                        "250-SIZE XCLIENT", "25-XCLIENT NAME"};
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
        ASSERT(!xclient_ehlo_line_caps(no[i], strlen(no[i]), &caps));
    ASSERT_EQ(caps, 0x1234);
}

static void test_xclient_format(void)
{
    struct sockaddr_storage c4 = sa4("192.0.2.7", 40001), d4 = sa4("198.51.100.2", 25);
    struct sockaddr_storage c6 = sa6("2001:db8::7", 52000), d6 = sa6("2001:db8::25", 587);
    struct sockaddr_storage m = sa6("::ffff:192.0.2.9", 1234);
    char out[XCLIENT_LINE_MAX + 1];
    unsigned todo;
    int n;

    struct xclient_info info = {.addr = SA(c4),
                                .destaddr = SA(d4),
                                .name = "client.example.com",
                                .helo = "client.example.com",
                                .login = NULL,
                                .proto = XCLIENT_PROTO_ESMTP};
    todo = XCLIENT_F_ALL;
    n = xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT ADDR=192.0.2.7 PORT=40001 PROTO=ESMTP HELO=client.example.com "
                      "LOGIN=[UNAVAILABLE] NAME=client.example.com DESTADDR=198.51.100.2 "
                      "DESTPORT=25 REVERSE_NAME=[UNAVAILABLE]\r\n");
    ASSERT_EQ(n, (int)strlen(out));
    ASSERT_EQ(todo, 0);
    ASSERT_EQ(xclient_format(out, sizeof(out), &todo, &info), 0);

    /* Only what the backend announced; IPv6 with its prefix; SMTP; unknown bits ignored. */
    info.addr = SA(c6);
    info.destaddr = SA(d6);
    info.proto = XCLIENT_PROTO_SMTP;
    todo = XCLIENT_F_ADDR | XCLIENT_F_PORT | XCLIENT_F_PROTO | XCLIENT_F_DESTADDR | 0x1000;
    xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT ADDR=IPV6:2001:db8::7 PORT=52000 PROTO=SMTP "
                      "DESTADDR=IPV6:2001:db8::25\r\n");
    ASSERT_EQ(todo, 0);

    /* A mapped IPv4 client is sent as IPv4; no address at all is [UNAVAILABLE]; PROTO is left
     * out while unknown. */
    info.addr = SA(m);
    info.destaddr = NULL;
    info.proto = XCLIENT_PROTO_NONE;
    todo = XCLIENT_F_ADDR | XCLIENT_F_PROTO | XCLIENT_F_DESTADDR | XCLIENT_F_DESTPORT;
    xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT ADDR=192.0.2.9 DESTADDR=[UNAVAILABLE] DESTPORT=[UNAVAILABLE]\r\n");
    todo = XCLIENT_F_PROTO;
    ASSERT_EQ(xclient_format(out, sizeof(out), &todo, &info), 0);
    ASSERT_EQ(todo, 0);

    /* xtext: '+', '=', space, controls and bytes above 126 become +HH. */
    info.helo = "a+b=c d\x01\x7f\xe9~!";
    info.login = "user@example.com";
    info.name = NULL;
    todo = XCLIENT_F_HELO | XCLIENT_F_LOGIN | XCLIENT_F_NAME;
    xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT HELO=a+2Bb+3Dc+20d+01+7F+E9~! LOGIN=user@example.com "
                      "NAME=[UNAVAILABLE]\r\n");

    /* A value too long for any line is replaced, so a hostile HELO cannot block XCLIENT. */
    static char helo[600];
    memset(helo, '+', sizeof(helo) - 1);
    info.helo = helo;
    todo = XCLIENT_F_HELO;
    xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT HELO=[UNAVAILABLE]\r\n");

    /* Long values spill into further commands, each within 512 bytes, none lost. */
    static char name[256], h2[256];
    memset(name, 'n', 255);
    memset(h2, '=', 150); /* 450 bytes once encoded */
    info.name = name;
    info.helo = h2;
    info.addr = SA(c4);
    info.login = "u";
    todo = XCLIENT_F_ADDR | XCLIENT_F_HELO | XCLIENT_F_LOGIN | XCLIENT_F_NAME;
    n = xclient_format(out, sizeof(out), &todo, &info);
    ASSERT(n > 0 && n <= XCLIENT_LINE_MAX);
    ASSERT_EQ(strncmp(out, "XCLIENT ADDR=192.0.2.7 HELO=+3D", 31), 0);
    ASSERT_EQ(todo, XCLIENT_F_NAME);
    ASSERT(strstr(out, " LOGIN=u\r\n") != NULL); /* shorter LOGIN still fits after HELO */
    n = xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_EQ(n, 8 + 5 + 255 + 2);
    ASSERT_EQ(strncmp(out, "XCLIENT NAME=nnn", 16), 0);
    ASSERT_EQ(todo, 0);

    /* An exact fit: 512 bytes with CRLF. */
    static char exact[512];
    memset(exact, 'e', sizeof(exact));
    exact[XCLIENT_LINE_MAX - 8 - 5 - 2] = '\0'; /* "XCLIENT " + "HELO=" + value + CRLF */
    info.helo = exact;
    todo = XCLIENT_F_HELO;
    n = xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_EQ(n, XCLIENT_LINE_MAX);
    exact[XCLIENT_LINE_MAX - 8 - 5 - 2] = 'e';
    exact[XCLIENT_LINE_MAX - 8 - 5 - 1] = '\0';
    todo = XCLIENT_F_HELO;
    xclient_format(out, sizeof(out), &todo, &info);
    ASSERT_STREQ(out, "XCLIENT HELO=[UNAVAILABLE]\r\n");

    /* The buffer must hold a whole line. */
    todo = XCLIENT_F_ADDR;
    ASSERT_EQ(xclient_format(out, XCLIENT_LINE_MAX, &todo, &info), -ENOBUFS);
    ASSERT_EQ(todo, XCLIENT_F_ADDR);
}

int main(void)
{
    test_xclient_caps();
    test_xclient_format();
    printf("test_xclient: all passed\n");
    return 0;
}
