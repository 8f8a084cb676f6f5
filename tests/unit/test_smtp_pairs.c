/* test_smtp_pairs.c: unit tests for proxy/smtp_pairs.c.
 *
 * A small session simulator drives smtp_client, smtp_server and smtp_pairs exactly as
 * smtp_pairs.h tells the session to, and writes one text line per log line; the tests compare
 * those lines and the summary.
 */
#include "smtp_pairs.h"
#include "test.h"

#include <errno.h>
#include <stdarg.h>

struct sim {
    struct smtp_client cp;
    struct smtp_server sp;
    struct smtp_pairs pp;
    struct smtp_pairs_entry fifo[SMTP_PAIRS_CAP]; /* pp's storage */
    char hold[65536];                             /* client bytes not consumed yet */
    size_t held;
    char log[16384]; /* one line per pair */
    size_t loglen;
    char to_backend[16384];
    size_t backend_len;
    uint64_t now;           /* advanced by 1000 per call, the simulator's clock */
    const char *secrets[3]; /* must appear in no log field */
    struct smtp_pair last;  /* last pair logged */
};

static void sim_logf(struct sim *s, const char *f, ...) __attribute__((format(printf, 2, 3)));

static void sim_logf(struct sim *s, const char *f, ...)
{
    va_list ap;
    int n;

    va_start(ap, f);
    n = vsnprintf(s->log + s->loglen, sizeof(s->log) - s->loglen, f, ap);
    va_end(ap);
    ASSERT(n >= 0 && (size_t)n < sizeof(s->log) - s->loglen);
    s->loglen += (size_t)n;
}

static const char *const kind_names[] = {"cmd", "greeting", "unsolicited", "local", "aborted"};

static void sim_no_secret(const struct sim *s, const void *p, size_t n)
{
    for (size_t i = 0; i < 3 && s->secrets[i] != NULL; i++)
        if (memmem(p, n, s->secrets[i], strlen(s->secrets[i])) != NULL)
            TEST_FAIL_("secret \"%s\" found in logged data", s->secrets[i]);
}

static void sim_log_pair(struct sim *s, const struct smtp_pair *p)
{
    sim_no_secret(s, p, sizeof(*p));
    ASSERT_EQ(p->cmd_text[p->cmd_text_len], '\0');
    ASSERT_EQ(p->text[p->text_len], '\0');
    sim_logf(s, "%s [%s] %d %s [%s] lines=%u f=%x size=%llu rounds=%u\n", kind_names[p->kind],
             p->cmd_text, p->code, p->esc, p->text, p->lines, p->flags, (unsigned long long)p->size,
             p->rounds);
    s->last = *p;
}

static void sim_drain_local(struct sim *s)
{
    struct smtp_pair p;

    while (smtp_pairs_take_local(&s->pp, s->now, &p))
        sim_log_pair(s, &p);
}

/* Parses held client bytes as far as the pairing FIFO and the parser allow. */
static void sim_pump(struct sim *s)
{
    size_t off = 0;

    for (;;) {
        struct smtp_event ev;
        size_t n;

        if (smtp_pairs_room(&s->pp) == 0)
            break;
        n = smtp_client_parse(&s->cp, s->hold + off, s->held - off, &ev);
        if (ev.type == SMTP_EV_AGAIN || ev.type == SMTP_EV_WAIT)
            break;
        off += n;
        ASSERT(s->backend_len + ev.fwd_len <= sizeof(s->to_backend));
        if (ev.fwd_len > 0)
            memcpy(s->to_backend + s->backend_len, ev.fwd, ev.fwd_len);
        s->backend_len += ev.fwd_len;
        ASSERT_OK(smtp_pairs_on_client_event(&s->pp, &ev, s->now));
        sim_drain_local(s);
    }
    memmove(s->hold, s->hold + off, s->held - off);
    s->held -= off;
}

static void sim_client(struct sim *s, const char *bytes)
{
    size_t n = strlen(bytes);

    s->now += 1000;
    ASSERT(s->held + n <= sizeof(s->hold));
    memcpy(s->hold + s->held, bytes, n);
    s->held += n;
    sim_pump(s);
}

/* Feeds server bytes; returns the last smtp_pairs_on_reply() result. */
static enum smtp_pairs_res sim_server(struct sim *s, const char *bytes)
{
    size_t len = strlen(bytes), off = 0;
    enum smtp_pairs_res res = SMTP_PAIRS_MATCHED;

    s->now += 1000;
    while (off < len) {
        struct smtp_server_event ev;
        struct smtp_pair p;

        off += smtp_server_parse(&s->sp, bytes + off, len - off, s->now, &ev);
        if (ev.type == SMTP_SEV_AGAIN)
            break;
        ASSERT_EQ(ev.type, SMTP_SEV_REPLY);
        res = smtp_pairs_on_reply(&s->pp, ev.reply, &p);
        smtp_client_on_reply(&s->cp, p.cmd, p.code);
        if (res != SMTP_PAIRS_INTERMEDIATE)
            sim_log_pair(s, &p);
        else
            sim_logf(s, "(334 round %u)\n", p.rounds);
        sim_drain_local(s);
        sim_pump(s);
    }
    sim_no_secret(s, &s->pp, sizeof(s->pp));
    sim_no_secret(s, s->fifo, sizeof(s->fifo));
    sim_no_secret(s, s->log, s->loglen);
    return res;
}

static struct sim *sim_new(void)
{
    struct sim *s = calloc(1, sizeof(*s));

    ASSERT(s != NULL);
    ASSERT_EQ(smtp_pairs_room(&s->pp), 0); /* no storage yet */
    smtp_pairs_attach(&s->pp, s->fifo);
    ASSERT_EQ(smtp_pairs_room(&s->pp), SMTP_PAIRS_CAP);
    return s;
}

#define ASSERT_LOG(s, want) ASSERT_MEMEQ((s)->log, (s)->loglen, (want), strlen(want))

/* --- cases -------------------------------------------------------------------------------------
 */

static void test_pipelined_transaction(void)
{
    struct sim *s = sim_new();
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&s->pp);

    ASSERT_EQ(sim_server(s, "220 mx.example ESMTP\r\n"), SMTP_PAIRS_GREETING);
    sim_client(s, "EHLO client.example\r\n");
    sim_server(s, "250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    sim_client(s, "MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                  "RCPT TO:<nobody@d.example>\r\nDATA\r\n");
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), 4);
    ASSERT_EQ(smtp_pairs_oldest(&s->pp), SMTP_CMD_MAIL);
    sim_server(s, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <nobody@d.example>: unknown\r\n"
                  "354 End data\r\n");
    sim_client(s, "Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    sim_server(s, "250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n");
    ASSERT_LOG(s, "greeting [] 220  [mx.example ESMTP] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [EHLO client.example] 250  [mx.example] lines=3 f=0 size=0 rounds=0\n"
                  "cmd [MAIL FROM:<a@b.example>] 250 2.1.0 [Ok] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [RCPT TO:<c@d.example>] 250 2.1.5 [Ok] lines=1 f=1 size=0 rounds=0\n"
                  "cmd [RCPT TO:<nobody@d.example>] 550 5.1.1 [<nobody@d.example>: unknown] "
                  "lines=1 f=5 size=0 rounds=0\n"
                  "cmd [DATA] 354  [End data] lines=1 f=1 size=0 rounds=0\n"
                  "cmd [.] 250 2.0.0 [Ok: queued as 1] lines=1 f=0 size=21 rounds=0\n"
                  "cmd [QUIT] 221 2.0.0 [Bye] lines=1 f=1 size=0 rounds=0\n");
    ASSERT_STREQ(sum->helo, "client.example");
    ASSERT_STREQ(sum->mail_from, "a@b.example");
    ASSERT_EQ(sum->rcpt_ok, 1);
    ASSERT_EQ(sum->rcpt_rejected, 1);
    ASSERT_EQ(sum->messages, 1);
    ASSERT_EQ(sum->quit_sent, 1);
    ASSERT_EQ(sum->quit_answered, 1);
    ASSERT_EQ(sum->has_primary, 1);
    ASSERT_STREQ(sum->primary.cmd_text, "RCPT TO:<nobody@d.example>");
    ASSERT_EQ(sum->primary.code, 550);
    ASSERT_STREQ(sum->primary.esc, "5.1.1");
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), 0);
    ASSERT_MEMEQ(s->to_backend, s->backend_len,
                 "EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                 "RCPT TO:<nobody@d.example>\r\nDATA\r\nSubject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n",
                 strlen("EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT "
                        "TO:<c@d.example>\r\nRCPT TO:<nobody@d.example>\r\nDATA\r\nSubject: "
                        "x\r\n\r\nhello\r\n.\r\nQUIT\r\n"));
    free(s);
}

static void test_timing(void)
{
    struct sim *s = sim_new();

    sim_server(s, "220 hi\r\n");     /* now = 1000 */
    sim_client(s, "NOOP\r\n");       /* now = 2000: t_cmd */
    sim_server(s, "250-");           /* now = 3000: the reply's first byte */
    sim_server(s, "a\r\n250 b\r\n"); /* now = 4000 */
    ASSERT_EQ(s->last.t_cmd, 2000);
    ASSERT_EQ(s->last.t_reply, 3000);
    ASSERT_EQ(s->last.lines, 2);

    /* A BDAT command is complete with the last byte of its chunk. */
    sim_client(s, "BDAT 4 LAST\r\nab");    /* now = 5000 */
    sim_client(s, "cd");                   /* now = 6000 */
    sim_server(s, "250 2.0.0 queued\r\n"); /* now = 7000 */
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [NOOP] 250  [a] lines=2 f=0 size=0 rounds=0\n"
                  "cmd [BDAT 4 LAST] 250 2.0.0 [queued] lines=1 f=10 size=4 rounds=0\n");
    ASSERT_EQ(s->last.t_cmd, 6000);
    ASSERT_EQ(s->last.t_reply, 7000);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->messages, 1);
    free(s);
}

static void test_bdat_chunks(void)
{
    struct sim *s = sim_new();

    sim_server(s, "220 hi\r\n");
    sim_client(s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\n\r\n.\r\nBDAT 3 LAST\r\nxyz");
    sim_server(s, "250 ok\r\n250 ok\r\n250 2.0.0 5 octets\r\n250 2.0.0 queued\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [MAIL FROM:<a@b>] 250  [ok] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [RCPT TO:<c@d>] 250  [ok] lines=1 f=1 size=0 rounds=0\n"
                  "cmd [BDAT 5] 250 2.0.0 [5 octets] lines=1 f=1 size=5 rounds=0\n"
                  "cmd [BDAT 3 LAST] 250 2.0.0 [queued] lines=1 f=11 size=3 rounds=0\n");
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->messages, 1);
    free(s);
}

static void test_auth_plain(void)
{
    struct sim *s = sim_new();

    s->secrets[0] = "AGFsaWNlAHNlY3JldA==";
    s->secrets[1] = "secret";
    sim_server(s, "220 hi\r\n");
    sim_client(s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    sim_server(s, "235 2.7.0 Authentication successful\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [AUTH PLAIN [redacted]] 235 2.7.0 [Authentication successful] lines=1 f=0 "
                  "size=0 rounds=0\n");
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->auth_ok, 1);
    ASSERT_MEMEQ(s->to_backend, s->backend_len, "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", 33);
    free(s);
}

static void test_auth_login(void)
{
    struct sim *s = sim_new();

    s->secrets[0] = "YWxpY2U=";
    s->secrets[1] = "c2VjcmV0";
    sim_server(s, "220 hi\r\n");
    sim_client(s, "AUTH LOGIN\r\n");
    ASSERT_EQ(sim_server(s, "334 VXNlcm5hbWU6\r\n"), SMTP_PAIRS_INTERMEDIATE);
    sim_client(s, "YWxpY2U=\r\n");
    ASSERT_EQ(sim_server(s, "334 UGFzc3dvcmQ6\r\n"), SMTP_PAIRS_INTERMEDIATE);
    sim_client(s, "c2VjcmV0\r\n");
    ASSERT_EQ(sim_server(s, "535 5.7.8 Authentication failed\r\n"), SMTP_PAIRS_MATCHED);
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "(334 round 1)\n(334 round 2)\n"
                  "cmd [AUTH LOGIN] 535 5.7.8 [Authentication failed] lines=1 f=4 size=0 "
                  "rounds=2\n");
    ASSERT_STREQ(smtp_pairs_summary(&s->pp)->primary.cmd_text, "AUTH LOGIN");
    ASSERT_MEMEQ(s->to_backend, s->backend_len, "AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n", 32);
    free(s);
}

/* Every form a server accepts as AUTH is paired as AUTH, with the credential redacted and the
 * continuation lines kept out of the pair text. */
static void test_auth_variants(void)
{
    static const struct {
        const char *line, *cmd_text;
    } cases[] = {
        {"AUTH\tPLAIN AGFsaWNlAHNlY3JldA==\r\n", "AUTH\tPLAIN [redacted]"},
        {" AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", " AUTH PLAIN [redacted]"},
        {"AUTH PLAIN\tAGFsaWNlAHNlY3JldA==\r\n", "AUTH PLAIN [redacted]"},
        {"auth  plain   AGFsaWNlAHNlY3JldA==\r\n", "auth  plain [redacted]"},
        {"AUTH PLAIN\x1f"
         "AGFsaWNlAHNlY3JldA==\r\n",
         "AUTH PLAIN [redacted]"},
        {"AUTH AGFsaWNlAHNlY3JldAAGFsaWNlAHNlY3JldA\r\n", "AUTH [redacted]"},
        {"AUTH\tLOGIN\r\n", "AUTH\tLOGIN"},
        {"\tAUTH LOGIN\r\n", "\tAUTH LOGIN"},
        {"AUTH PLAIN\r\n", "AUTH PLAIN"},
    };

    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        struct sim *s = sim_new();
        char want[512];

        s->secrets[0] = "AGFsaWNlAHNlY3JldA";
        s->secrets[1] = "YWxpY2U=";
        s->secrets[2] = "c2VjcmV0";
        sim_server(s, "220 hi\r\n");
        sim_client(s, cases[k].line);
        ASSERT_EQ(sim_server(s, "334 \r\n"), SMTP_PAIRS_INTERMEDIATE);
        sim_client(s, "YWxpY2U=\r\n");
        ASSERT_EQ(sim_server(s, "334 UGFzc3dvcmQ6\r\n"), SMTP_PAIRS_INTERMEDIATE);
        sim_client(s, "c2VjcmV0\r\nQUIT\r\n");
        ASSERT_EQ(sim_server(s, "235 2.7.0 ok\r\n221 bye\r\n"), SMTP_PAIRS_MATCHED);
        snprintf(want, sizeof(want),
                 "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                 "(334 round 1)\n(334 round 2)\n"
                 "cmd [%s] 235 2.7.0 [ok] lines=1 f=0 size=0 rounds=2\n"
                 "cmd [QUIT] 221  [bye] lines=1 f=0 size=0 rounds=0\n",
                 cases[k].cmd_text);
        ASSERT_LOG(s, want);
        ASSERT_EQ(smtp_pairs_summary(&s->pp)->auth_ok, 1);
        free(s);
    }
}

static void test_auth_cancel(void)
{
    struct sim *s = sim_new();

    sim_server(s, "220 hi\r\n");
    sim_client(s, "AUTH LOGIN\r\n");
    sim_server(s, "334 VXNlcm5hbWU6\r\n");
    sim_client(s, "*\r\nNOOP\r\n");
    sim_server(s, "501 5.7.0 Authentication aborted\r\n250 ok\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "(334 round 1)\n"
                  "cmd [AUTH LOGIN] 501 5.7.0 [Authentication aborted] lines=1 f=20 size=0 "
                  "rounds=1\n"
                  "cmd [NOOP] 250  [ok] lines=1 f=0 size=0 rounds=0\n");
    /* A cancel by the client fails nothing. */
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->has_primary, 0);
    free(s);
}

static void test_primary_rcpt_then_data(void)
{
    struct sim *s = sim_new();
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&s->pp);

    /* An unknown verb's 500 fails nothing; every RCPT rejected, so the DATA 554 is only the
     * consequence. */
    sim_server(s, "220 hi\r\n");
    sim_client(s, "XYZZY\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n");
    sim_server(s, "500 5.5.2 what\r\n250 ok\r\n550 5.1.1 no such user\r\n"
                  "554 5.5.1 Error: no valid recipients\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [XYZZY] 500 5.5.2 [what] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [MAIL FROM:<a@b>] 250  [ok] lines=1 f=1 size=0 rounds=0\n"
                  "cmd [RCPT TO:<x@y>] 550 5.1.1 [no such user] lines=1 f=5 size=0 rounds=0\n"
                  "cmd [DATA] 554 5.5.1 [Error: no valid recipients] lines=1 f=3 size=0 "
                  "rounds=0\n");
    ASSERT_STREQ(sum->primary.cmd_text, "RCPT TO:<x@y>");
    /* The next transaction starts clean: its DATA failure is not a consequence. */
    sim_client(s, "RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<ok@y>\r\nDATA\r\n");
    sim_server(s, "250 ok\r\n250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n");
    ASSERT_EQ(s->last.code, 451);
    ASSERT_EQ(s->last.flags & SMTP_PAIR_F_CONSEQUENCE, 0);
    ASSERT_STREQ(sum->primary.cmd_text, "RCPT TO:<x@y>");
    free(s);
}

static void test_primary_mail_rejected(void)
{
    struct sim *s = sim_new();
    const struct smtp_pairs_summary *sum = smtp_pairs_summary(&s->pp);

    sim_server(s, "220 hi\r\n");
    sim_client(s, "EHLO a\r\n");
    sim_server(s, "502 5.5.1 EHLO not implemented\r\n");
    sim_client(s, "HELO a\r\n");
    sim_server(s, "250 ok\r\n");
    sim_client(s, "MAIL FROM:<spam@x>\r\nRCPT TO:<a@b>\r\nDATA\r\n");
    sim_server(s, "550 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [EHLO a] 502 5.5.1 [EHLO not implemented] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [HELO a] 250  [ok] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [MAIL FROM:<spam@x>] 550 5.7.1 [sender rejected] lines=1 f=4 size=0 "
                  "rounds=0\n"
                  "cmd [RCPT TO:<a@b>] 503 5.5.1 [need MAIL] lines=1 f=3 size=0 rounds=0\n"
                  "cmd [DATA] 503 5.5.1 [need RCPT] lines=1 f=3 size=0 rounds=0\n");
    ASSERT_STREQ(sum->primary.cmd_text, "MAIL FROM:<spam@x>");
    ASSERT_EQ(sum->primary.flags & SMTP_PAIR_F_PRIMARY, SMTP_PAIR_F_PRIMARY);
    free(s);
}

static void test_primary_greeting_and_421(void)
{
    struct sim *s = sim_new();

    ASSERT_EQ(sim_server(s, "554 5.7.1 go away\r\n"), SMTP_PAIRS_GREETING);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->primary.code, 554);
    free(s);

    /* Unsolicited 421: no command outstanding. */
    s = sim_new();
    sim_server(s, "220 hi\r\n");
    sim_client(s, "NOOP\r\n");
    sim_server(s, "250 ok\r\n");
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->has_primary, 0);
    ASSERT_EQ(sim_server(s, "421 4.4.2 mx.example Error: timeout exceeded\r\n"),
              SMTP_PAIRS_UNSOLICITED);
    ASSERT_EQ(s->last.kind, SMTP_PAIR_UNSOLICITED);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->primary.code, 421);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->primary.kind, SMTP_PAIR_UNSOLICITED);
    free(s);

    /* Another stray reply is reported but is no primary error. */
    s = sim_new();
    sim_server(s, "220 hi\r\n");
    ASSERT_EQ(sim_server(s, "250 what\r\n"), SMTP_PAIRS_UNSOLICITED);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->has_primary, 0);
    /* A 421 to an ordinary command is primary even for NOOP. */
    sim_client(s, "NOOP\r\n");
    sim_server(s, "421 4.3.2 shutting down\r\n");
    ASSERT_STREQ(smtp_pairs_summary(&s->pp)->primary.cmd_text, "NOOP");
    free(s);
}

static void test_xclient(void)
{
    struct sim *s = sim_new();

    sim_server(s, "220 hi\r\n");
    sim_client(s, "EHLO proxy\r\nXCLIENT ADDR=192.0.2.1\r\nEHLO client\r\n");
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), 2); /* EHLO client waits for the XCLIENT reply */
    sim_server(s, "250 ok\r\n");
    ASSERT_STREQ(smtp_pairs_summary(&s->pp)->helo, "proxy");
    sim_server(s, "220 mx.example ESMTP\r\n");
    ASSERT_EQ(s->last.flags & SMTP_PAIR_F_NEW_SESSION, SMTP_PAIR_F_NEW_SESSION);
    ASSERT_EQ(s->last.cmd, SMTP_CMD_XCLIENT);
    sim_server(s, "250 mx.example\r\n");
    ASSERT_STREQ(smtp_pairs_summary(&s->pp)->helo, "client");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [EHLO proxy] 250  [ok] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [XCLIENT ADDR=192.0.2.1] 220  [mx.example ESMTP] lines=1 f=41 size=0 "
                  "rounds=0\n"
                  "cmd [EHLO client] 250  [mx.example] lines=1 f=0 size=0 rounds=0\n");
    free(s);
}

static void test_local_answers_in_order(void)
{
    struct sim *s = sim_new();
    char line[5000];

    /* The proxy's own 500 for a bad line must wait for the replies pipelined before it. */
    sim_server(s, "220 hi\r\n");
    memset(line, 'A', sizeof(line));
    memcpy(line, "MAIL FROM:<a@b>\r\n", 17);
    memcpy(line + sizeof(line) - 15, "\r\nBAD\nNOOP\r\n", 13);
    sim_client(s, line);
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), 4);
    ASSERT_EQ(s->loglen, strlen("greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"));
    sim_server(s, "250 ok\r\n");
    sim_server(s, "250 ok\r\n");
    ASSERT_LOG(s, "greeting [] 220  [hi] lines=1 f=0 size=0 rounds=0\n"
                  "cmd [MAIL FROM:<a@b>] 250  [ok] lines=1 f=0 size=0 rounds=0\n"
                  "local [[line too long]] 500 5.5.2 [Line too long] lines=1 f=1 size=0 rounds=0\n"
                  "local [[invalid line]] 500 5.5.2 [Syntax error, bare CR or LF in command] "
                  "lines=1 f=1 size=0 rounds=0\n"
                  "cmd [NOOP] 250  [ok] lines=1 f=1 size=0 rounds=0\n");
    ASSERT_MEMEQ(s->to_backend, s->backend_len, "MAIL FROM:<a@b>\r\nNOOP\r\n", 23);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->has_primary, 0);
    free(s);
}

static void test_smuggling_local(void)
{
    struct sim *s = sim_new();

    sim_server(s, "220 hi\r\n");
    sim_client(s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    sim_server(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    sim_client(s, "x\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n");
    ASSERT_EQ(s->last.kind, SMTP_PAIR_LOCAL);
    ASSERT_EQ(s->last.local, SMTP_LOCAL_SMUGGLING);
    ASSERT_EQ(s->last.code, 554);
    ASSERT_EQ(s->last.size, strlen("x\n.\r\nMAIL FROM:<evil@x>\r\n"));
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->primary.code, 554);
    ASSERT_EQ(smtp_pairs_summary(&s->pp)->messages, 0);
    free(s);
}

/* Feeds one client command line to pp, as a session would. */
static void pairs_command(struct smtp_pairs *pp, const char *line, enum smtp_local local)
{
    struct smtp_client cp = {0};
    struct smtp_event ev;

    ASSERT_EQ(smtp_client_parse(&cp, line, strlen(line), &ev), strlen(line));
    ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
    ASSERT_OK(smtp_pairs_on_client_event(pp, &ev, 1));
    if (local != SMTP_LOCAL_NONE)
        ASSERT_OK(smtp_pairs_answer_locally(pp, local));
}

static void pairs_reply(struct smtp_pairs *pp, const char *reply)
{
    struct smtp_server sp = {0};
    struct smtp_server_event ev;
    struct smtp_pair p;

    ASSERT_EQ(smtp_server_parse(&sp, reply, strlen(reply), 2, &ev), strlen(reply));
    ASSERT_EQ(ev.type, SMTP_SEV_REPLY);
    (void)smtp_pairs_on_reply(pp, ev.reply, &p);
}

/* STARTTLS answered by the proxy: refused while the server holds a transaction, which it
 * would never reset, since it does not see the TLS; the EHLO after TLS closes one too. */
static void test_starttls_in_transaction(void)
{
    struct smtp_pairs_entry q[SMTP_PAIRS_CAP];
    struct smtp_pairs pp = {0};
    struct smtp_pair p;

    smtp_pairs_attach(&pp, q);
    pairs_reply(&pp, "220 hi\r\n");
    pairs_command(&pp, "EHLO c\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "250 mx\r\n");
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), false);
    pairs_command(&pp, "MAIL FROM:<a@b>\r\n", SMTP_LOCAL_NONE);
    pairs_command(&pp, "STARTTLS\r\n", SMTP_LOCAL_STARTTLS);
    ASSERT_EQ(smtp_pairs_take_local(&pp, 3, &p), false); /* MAIL first */
    pairs_reply(&pp, "250 ok\r\n");
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), true);
    ASSERT_EQ(smtp_pairs_take_local(&pp, 3, &p), true);
    ASSERT_EQ(p.local, SMTP_LOCAL_STARTTLS_IN_TX);
    ASSERT_EQ(p.code, 503);
    ASSERT_STREQ(p.esc, "5.5.1");
    ASSERT_STREQ(p.text, "Error: MAIL transaction in progress");
    ASSERT_STREQ(p.cmd_text, "STARTTLS");
    pairs_command(&pp, "RSET\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "250 ok\r\n");
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), false);
    pairs_command(&pp, "STARTTLS\r\n", SMTP_LOCAL_STARTTLS);
    ASSERT_EQ(smtp_pairs_take_local(&pp, 3, &p), true);
    ASSERT_EQ(p.local, SMTP_LOCAL_STARTTLS);
    ASSERT_EQ(p.code, 220);
    pairs_command(&pp, "EHLO c\r\n", SMTP_LOCAL_EHLO);
    ASSERT_EQ(smtp_pairs_take_local(&pp, 3, &p), true);
    ASSERT_EQ(p.local, SMTP_LOCAL_EHLO);
    ASSERT_EQ(p.code, 250);
    ASSERT_STREQ(p.cmd_text, "EHLO c");
    /* A transaction ends with its end of data, whatever the answer. */
    pairs_command(&pp, "MAIL FROM:<a@b>\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "250 ok\r\n");
    pairs_command(&pp, "RCPT TO:<c@d>\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "250 ok\r\n");
    pairs_command(&pp, "DATA\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "354 go\r\n");
    struct smtp_event end = {.type = SMTP_EV_DATA_END, .fwd = ".\r\n", .fwd_len = 3};
    ASSERT_OK(smtp_pairs_on_client_event(&pp, &end, 4));
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), true);
    pairs_reply(&pp, "554 no\r\n");
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), false);
    /* A refused MAIL opens none. */
    pairs_command(&pp, "MAIL FROM:<a@b>\r\n", SMTP_LOCAL_NONE);
    pairs_reply(&pp, "550 no\r\n");
    ASSERT_EQ(smtp_pairs_in_transaction(&pp), false);
}

static void test_fifo_full(void)
{
    struct sim *s = sim_new();
    char many[70 * 6 + 1];
    struct smtp_event ev;
    char replies[70 * 8 + 1];

    sim_server(s, "220 hi\r\n");
    for (int i = 0; i < 70; i++)
        memcpy(many + i * 6, "NOOP\r\n", 6);
    many[sizeof(many) - 1] = '\0';
    sim_client(s, many);
    /* Bounded: the parser stopped at the capacity and the rest waits in the caller's buffer. */
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), SMTP_PAIRS_CAP);
    ASSERT_EQ(smtp_pairs_room(&s->pp), 0);
    ASSERT_EQ(s->held, (70 - SMTP_PAIRS_CAP) * 6);
    ASSERT_EQ(s->backend_len, SMTP_PAIRS_CAP * 6);
    /* A caller that ignores the room gets an error, not an overwrite. */
    memset(&ev, 0, sizeof(ev));
    ev.type = SMTP_EV_COMMAND;
    ev.cmd = SMTP_CMD_NOOP;
    ev.line = "NOOP";
    ev.line_len = 4;
    ASSERT_EQ(smtp_pairs_on_client_event(&s->pp, &ev, 0), -ENOBUFS);
    /* One reply frees one slot: exactly one more command goes out. */
    sim_server(s, "250 ok\r\n");
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), SMTP_PAIRS_CAP);
    ASSERT_EQ(s->backend_len, (SMTP_PAIRS_CAP + 1) * 6);
    for (int i = 0; i < 69; i++)
        memcpy(replies + i * 8, "250 ok\r\n", 8);
    replies[69 * 8] = '\0';
    sim_server(s, replies);
    ASSERT_EQ(smtp_pairs_outstanding(&s->pp), 0);
    ASSERT_EQ(s->held, 0);
    ASSERT_EQ(s->backend_len, 70 * 6);
    /* Every reply matched a command: none was unsolicited. */
    ASSERT(strstr(s->log, "unsolicited") == NULL);
    free(s);
}

static void test_storage(void)
{
    struct smtp_pairs pp = {0};
    struct smtp_pairs_entry fifo[SMTP_PAIRS_CAP], other[SMTP_PAIRS_CAP];
    struct smtp_reply greeting = {.code = 220, .lines = 1}, ok = {.code = 250, .lines = 1};
    struct smtp_pair pair;
    struct smtp_event ev = {
        .type = SMTP_EV_COMMAND, .cmd = SMTP_CMD_NOOP, .line = "NOOP", .line_len = 4};

    /* Without storage nothing can be recorded, and the caller is told to hold back. */
    ASSERT_EQ(smtp_pairs_room(&pp), 0);
    ASSERT_EQ(smtp_pairs_on_client_event(&pp, &ev, 1), -ENOBUFS);
    ASSERT(smtp_pairs_detach(&pp) == NULL);
    ASSERT_EQ(smtp_pairs_on_reply(&pp, &greeting, &pair), SMTP_PAIRS_GREETING);
    smtp_pairs_attach(&pp, fifo);
    smtp_pairs_attach(&pp, other); /* already attached: ignored */
    ASSERT_EQ(smtp_pairs_room(&pp), SMTP_PAIRS_CAP);
    ASSERT_OK(smtp_pairs_on_client_event(&pp, &ev, 1));
    /* Storage stays while a command is outstanding. */
    ASSERT(smtp_pairs_detach(&pp) == NULL);
    ASSERT_EQ(smtp_pairs_oldest(&pp), SMTP_CMD_NOOP);
    ASSERT_EQ(smtp_pairs_on_reply(&pp, &ok, &pair), SMTP_PAIRS_MATCHED);
    ASSERT_STREQ(pair.cmd_text, "NOOP");
    ASSERT(smtp_pairs_detach(&pp) == fifo);
    ASSERT_EQ(smtp_pairs_room(&pp), 0);
    /* The summary survives the storage. */
    ASSERT_EQ(smtp_pairs_on_reply(&pp, &ok, &pair), SMTP_PAIRS_UNSOLICITED);
    smtp_pairs_attach(&pp, other);
    ASSERT_EQ(smtp_pairs_room(&pp), SMTP_PAIRS_CAP);
}

static void test_abort_outstanding(void)
{
    struct sim *s = sim_new();
    struct smtp_pair p;

    sim_server(s, "220 hi\r\n");
    sim_client(s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    sim_server(s, "250 ok\r\n");
    ASSERT_EQ(smtp_pairs_oldest(&s->pp), SMTP_CMD_RCPT);
    ASSERT(smtp_pairs_abort(&s->pp, &p));
    ASSERT_EQ(p.kind, SMTP_PAIR_ABORTED);
    ASSERT_EQ(p.cmd, SMTP_CMD_RCPT);
    ASSERT_STREQ(p.cmd_text, "RCPT TO:<c@d>");
    ASSERT_EQ(p.code, 0);
    ASSERT(!smtp_pairs_abort(&s->pp, &p));
    ASSERT_EQ(smtp_pairs_oldest(&s->pp), SMTP_CMD_NONE);
    free(s);
}

static void test_long_text(void)
{
    struct sim *s = sim_new();
    char line[600];

    /* Command text is cut for the log; the command itself goes out whole. */
    sim_server(s, "220 hi\r\n");
    memset(line, 'x', sizeof(line));
    memcpy(line, "RCPT TO:<", 9);
    memcpy(line + sizeof(line) - 4, ">\r\n", 4);
    sim_client(s, line);
    sim_server(s, "250 ok\r\n");
    ASSERT_EQ(s->last.cmd_text_len, SMTP_PAIRS_TEXT_MAX);
    ASSERT_EQ(s->backend_len, sizeof(line) - 1);
    free(s);
}

int main(void)
{
    test_pipelined_transaction();
    test_timing();
    test_bdat_chunks();
    test_auth_plain();
    test_auth_login();
    test_auth_variants();
    test_auth_cancel();
    test_primary_rcpt_then_data();
    test_primary_mail_rejected();
    test_primary_greeting_and_421();
    test_xclient();
    test_local_answers_in_order();
    test_smuggling_local();
    test_starttls_in_transaction();
    test_fifo_full();
    test_abort_outstanding();
    test_storage();
    test_long_text();
    printf("test_smtp_pairs: ok\n");
    return 0;
}
