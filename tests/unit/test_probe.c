/* test_probe.c: health check dialogues (proxy/probe.c), fed whole and byte by byte. */
#include <stdbool.h>
#include <string.h>

#include "probe.h"
#include "test.h"

/* What a whole dialogue came to: the verdict, the reason, and every command
 * the probe asked to send, concatenated. */
struct run {
    enum probe_status verdict;
    char reason[PROBE_REASON_MAX];
    char sent[1024];
};

/* Feeds server bytes in pieces of at most step bytes (0: all at once). */
static struct run run_probe(enum probe_proto proto, bool smtp, const char *server, size_t step)
{
    struct probe p;
    struct run r = {.verdict = PROBE_AGAIN};
    size_t len = strlen(server), off = 0;

    probe_init(&p, proto, smtp, "mx.example");
    while (off < len) {
        size_t n = step == 0 || len - off < step ? len - off : step;
        size_t pos = 0;
        while (pos < n) {
            size_t used = 99;
            enum probe_status st = probe_feed(&p, server + off + pos, n - pos, &used);
            ASSERT(used <= n - pos);
            pos += used;
            if (st == PROBE_SEND) {
                size_t have = strlen(r.sent);
                snprintf(r.sent + have, sizeof(r.sent) - have, "%s", probe_output(&p));
                continue;
            }
            if (st == PROBE_AGAIN) {
                ASSERT_EQ(pos, n); /* AGAIN consumes everything */
                continue;
            }
            r.verdict = st;
            snprintf(r.reason, sizeof(r.reason), "%s", probe_reason(&p));
            /* A verdict sticks and consumes nothing more. */
            size_t again = 99;
            ASSERT_EQ(probe_feed(&p, "x\r\n", 3, &again), st);
            ASSERT_EQ(again, 0);
            return r;
        }
        off += n;
    }
    return r;
}

static void check(int line, enum probe_proto proto, bool smtp, const char *server,
                  enum probe_status verdict, const char *reason, const char *sent)
{
    size_t steps[] = {0, 1, 2, 7};
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        struct run r = run_probe(proto, smtp, server, steps[i]);
        if (r.verdict != verdict || strcmp(r.reason, reason) != 0 || strcmp(r.sent, sent) != 0)
            fprintf(stderr, "case at line %d, step %zu\n", line, steps[i]);
        ASSERT_EQ(r.verdict, verdict);
        ASSERT_STREQ(r.reason, reason);
        ASSERT_STREQ(r.sent, sent);
    }
}
#define CHECK(...) check(__LINE__, __VA_ARGS__)

static void test_smtp_greeting(void)
{
    CHECK(PROBE_SMTP, false, "220 mx ESMTP\r\n", PROBE_OK, "", "");
    CHECK(PROBE_SMTP, false, "220-mx ESMTP\r\n220-more\r\n220 end\r\n", PROBE_OK, "", "");
    CHECK(PROBE_SMTP, false, "220\r\n", PROBE_OK, "", "");
    CHECK(PROBE_SMTP, false, "250 odd but positive\r\n", PROBE_OK, "", "");
    CHECK(PROBE_SMTP, false, "220 bare LF\n", PROBE_OK, "", "");
    CHECK(PROBE_SMTP, false, "421 4.3.2 busy\r\n", PROBE_FAIL, "greeting 421", "");
    CHECK(PROBE_SMTP, false, "554-no\r\n554 go away\r\n", PROBE_FAIL, "greeting 554", "");
    CHECK(PROBE_SMTP, false, "220-mx\r\n250 mixed\r\n", PROBE_FAIL, "malformed reply", "");
    CHECK(PROBE_SMTP, false, "hello\r\n", PROBE_FAIL, "malformed reply", "");
    CHECK(PROBE_SMTP, false, "22\r\n", PROBE_FAIL, "malformed reply", "");
    CHECK(PROBE_SMTP, false, "220x\r\n", PROBE_FAIL, "malformed reply", "");
    CHECK(PROBE_SMTP, false, "+OK pop3 here\r\n", PROBE_FAIL, "malformed reply", "");
    /* Not complete: no verdict yet. */
    CHECK(PROBE_SMTP, false, "220-mx ESMTP\r\n", PROBE_AGAIN, "", "");
    CHECK(PROBE_SMTP, false, "220 mx ESMTP", PROBE_AGAIN, "", "");
}

static void test_smtp_dialogue(void)
{
    CHECK(PROBE_SMTP, true, "220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n221 bye\r\n",
          PROBE_OK, "", "EHLO mx.example\r\nQUIT\r\n");
    CHECK(PROBE_SMTP, true, "220 mx\r\n", PROBE_AGAIN, "", "EHLO mx.example\r\n");
    CHECK(PROBE_SMTP, true, "421 busy\r\n", PROBE_FAIL, "greeting 421", "");
    CHECK(PROBE_SMTP, true, "220 mx\r\n550 no EHLO for you\r\n", PROBE_FAIL, "EHLO 550",
          "EHLO mx.example\r\n");
    CHECK(PROBE_SMTP, true, "220 mx\r\n250 mx\r\n500 what\r\n", PROBE_FAIL, "QUIT 500",
          "EHLO mx.example\r\nQUIT\r\n");
}

static void test_pop3_imap(void)
{
    CHECK(PROBE_POP3, false, "+OK Dovecot ready.\r\n", PROBE_OK, "", "");
    CHECK(PROBE_POP3, false, "+OK\r\n", PROBE_OK, "", "");
    CHECK(PROBE_POP3, false, "-ERR [SYS/TEMP] busy\r\n", PROBE_FAIL, "greeting -ERR", "");
    CHECK(PROBE_POP3, false, "+OKAY\r\n", PROBE_FAIL, "malformed greeting", "");
    CHECK(PROBE_POP3, false, "220 smtp here\r\n", PROBE_FAIL, "malformed greeting", "");
    CHECK(PROBE_IMAP, false, "* OK [CAPABILITY IMAP4rev1] ready\r\n", PROBE_OK, "", "");
    CHECK(PROBE_IMAP, false, "* PREAUTH hi\r\n", PROBE_OK, "", "");
    CHECK(PROBE_IMAP, false, "* BYE overloaded\r\n", PROBE_FAIL, "greeting BYE", "");
    CHECK(PROBE_IMAP, false, "a OK\r\n", PROBE_FAIL, "malformed greeting", "");
    ASSERT_STREQ(probe_goodbye(PROBE_SMTP), "QUIT\r\n");
    ASSERT_STREQ(probe_goodbye(PROBE_POP3), "QUIT\r\n");
    ASSERT_STREQ(probe_goodbye(PROBE_IMAP), "a LOGOUT\r\n");
}

static void test_long_line(void)
{
    static char text[PROBE_LINE_MAX * 3];
    memset(text, 'x', sizeof(text) - 3);
    memcpy(text, "220 ", 4);
    memcpy(text + sizeof(text) - 3, "\r\n", 3);
    CHECK(PROBE_SMTP, false, text, PROBE_FAIL, "reply line too long", "");
    /* Exactly PROBE_LINE_MAX bytes before CRLF still fit (the CR is stripped). */
    static char fits[PROBE_LINE_MAX + 2];
    memset(fits, 'y', sizeof(fits) - 1);
    memcpy(fits, "220 ", 4);
    memcpy(fits + PROBE_LINE_MAX - 1, "\r\n", 3);
    CHECK(PROBE_SMTP, false, fits, PROBE_OK, "", "");
}

/* The input ends at a PROT_NONE page: the probe never reads past len. */
static void test_guard(void)
{
    static const char g[] = "220-a\r\n220 b\r\n";
    struct guard gd;
    const char *buf = guard_place(&gd, g, sizeof(g) - 1);
    struct probe p;
    size_t used;
    probe_init(&p, PROBE_SMTP, false, "h");
    ASSERT_EQ(probe_feed(&p, buf, sizeof(g) - 1, &used), PROBE_OK);
    ASSERT_EQ(used, sizeof(g) - 1);
    guard_free(&gd);
}

int main(void)
{
    test_smtp_greeting();
    test_smtp_dialogue();
    test_pop3_imap();
    test_long_line();
    test_guard();
    printf("test_probe: ok\n");
    return 0;
}
