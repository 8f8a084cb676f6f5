/* test_pop3_pairs.c: unit tests for proxy/pop3_pairs.c.
 *
 * A small session simulator drives pop3_client, pop3_server and pop3_pairs exactly as
 * pop3_pairs.h tells the session to, and writes one text line per log line; the tests compare
 * those lines and the summary. Server bytes are fed whole and then one byte at a time: the log
 * must not change.
 */
#include "pop3_pairs.h"
#include "test.h"

#include <errno.h>
#include <stdarg.h>

struct sim {
    struct pop3_client cp;
    struct pop3_server sp;
    struct pop3_pairs pp;
    struct pop3_pairs_entry fifo[POP3_PAIRS_CAP]; /* pp's storage */
    char hold[65536];                             /* client bytes not consumed yet */
    size_t held;
    char log[16384]; /* one line per pair */
    size_t loglen;
    char to_backend[16384];
    size_t backend_len;
    uint64_t now;           /* advanced by 1000 per call, the simulator's clock */
    const char *secrets[3]; /* must appear in no log field */
    bool bytewise;          /* feed server bytes one at a time */
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

static void sim_log_pair(struct sim *s, const struct pop3_pair *p)
{
    sim_no_secret(s, p, sizeof(*p));
    ASSERT_EQ(p->cmd_text[p->cmd_text_len], '\0');
    ASSERT_EQ(p->text[p->text_len], '\0');
    sim_logf(s, "%s [%s] %s [%s] lines=%u size=%llu f=%x rounds=%u ms=%llu\n", kind_names[p->kind],
             p->cmd_text, pop3_status_name(p->status), p->text, p->lines,
             (unsigned long long)p->size, p->flags, p->rounds,
             (unsigned long long)((p->t_reply - p->t_cmd) / 1000));
}

static void sim_drain_local(struct sim *s)
{
    struct pop3_pair p;

    while (pop3_pairs_take_local(&s->pp, s->now, &p)) {
        pop3_client_on_reply(&s->cp, p.cmd, p.status);
        sim_log_pair(s, &p);
    }
}

/* Parses held client bytes as far as the pairing FIFO and the parser allow. */
static void sim_pump(struct sim *s)
{
    size_t off = 0;

    for (;;) {
        struct pop3_event ev;
        size_t n;

        if (pop3_pairs_room(&s->pp) == 0)
            break;
        n = pop3_client_parse(&s->cp, s->hold + off, s->held - off, &ev);
        if (ev.type == POP3_EV_AGAIN || ev.type == POP3_EV_WAIT)
            break;
        off += n;
        ASSERT_OK(pop3_pairs_on_client_event(&s->pp, &ev, s->now));
        if (ev.type == POP3_EV_COMMAND && ev.cmd == POP3_CMD_STLS) {
            ASSERT_OK(pop3_pairs_answer_locally(&s->pp, POP3_LOCAL_STLS)); /* terminated here */
        } else {
            ASSERT(s->backend_len + ev.fwd_len <= sizeof(s->to_backend));
            if (ev.fwd_len > 0)
                memcpy(s->to_backend + s->backend_len, ev.fwd, ev.fwd_len);
            s->backend_len += ev.fwd_len;
        }
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

/* Feeds server bytes; returns the last pop3_pairs_on_response() result. */
static enum pop3_pairs_res sim_server(struct sim *s, const char *bytes)
{
    size_t len = strlen(bytes), off = 0;
    enum pop3_pairs_res res = POP3_PAIRS_MATCHED;

    s->now += 1000;
    while (off < len) {
        struct pop3_server_event ev;
        struct pop3_pair p;
        size_t chunk = s->bytewise ? 1 : len - off;

        off += pop3_server_parse(&s->sp, bytes + off, chunk, pop3_pairs_frame(&s->pp), s->now, &ev);
        if (ev.type == POP3_SEV_AGAIN || ev.type == POP3_SEV_BODY)
            continue; /* a body starts: the pair is made at its end */
        ASSERT(ev.type != POP3_SEV_GARBAGE);
        res = pop3_pairs_on_response(&s->pp, ev.resp, &p);
        pop3_client_on_reply(&s->cp, p.cmd, p.status);
        if (res != POP3_PAIRS_INTERMEDIATE)
            sim_log_pair(s, &p);
        else
            sim_logf(s, "(continuation %u)\n", p.rounds);
        sim_drain_local(s);
        sim_pump(s);
    }
    sim_no_secret(s, &s->pp, sizeof(s->pp));
    sim_no_secret(s, s->fifo, sizeof(s->fifo));
    sim_no_secret(s, s->log, s->loglen);
    return res;
}

static struct sim *sim_new(bool bytewise)
{
    struct sim *s = calloc(1, sizeof(*s));

    ASSERT(s != NULL);
    ASSERT_EQ(pop3_pairs_room(&s->pp), 0); /* no storage yet */
    pop3_pairs_attach(&s->pp, s->fifo);
    ASSERT_EQ(pop3_pairs_room(&s->pp), POP3_PAIRS_CAP);
    s->bytewise = bytewise;
    return s;
}

#define ASSERT_LOG(s, want) ASSERT_MEMEQ((s)->log, (s)->loglen, (want), strlen(want))

/* --- cases ------------------------------------------------------------------------------------ */

/* A whole session pipelined in one write, as fetchmail and curl do after CAPA shows
 * PIPELINING; the server answers in one write too. */
static void test_pipelined_session(void)
{
    static const char want[] =
        "greeting [] +OK [Dovecot ready.] lines=0 size=0 f=0 rounds=0 ms=2\n"
        "cmd [CAPA] +OK [] lines=3 size=23 f=10 rounds=0 ms=3\n"
        "cmd [USER [redacted]] +OK [] lines=0 size=0 f=1 rounds=0 ms=1\n"
        "cmd [PASS [redacted]] +OK [Logged in.] lines=0 size=0 f=1 rounds=0 ms=1\n"
        "cmd [STAT] +OK [2 46] lines=0 size=0 f=1 rounds=0 ms=1\n"
        "cmd [LIST] +OK [2 messages:] lines=2 size=12 f=11 rounds=0 ms=1\n"
        "cmd [RETR 1] +OK [18 octets] lines=3 size=18 f=11 rounds=0 ms=1\n"
        "cmd [RETR 2] +OK [28 octets] lines=3 size=28 f=11 rounds=0 ms=1\n"
        "cmd [DELE 1] +OK [Marked to be deleted.] lines=0 size=0 f=1 rounds=0 ms=1\n"
        "cmd [LIST 9] -ERR [There's no message 9.] lines=0 size=0 f=1 rounds=0 ms=1\n"
        "cmd [QUIT] +OK [Logging out, messages deleted.] lines=0 size=0 f=1 rounds=0 ms=1\n";
    static const char client[] = "CAPA\r\nUSER alice\r\nPASS pa55word\r\nSTAT\r\nLIST\r\n"
                                 "RETR 1\r\nRETR 2\r\nDELE 1\r\nLIST 9\r\nQUIT\r\n";
    static const char server[] = "+OK\r\nUSER\r\nPIPELINING\r\nTOP\r\n.\r\n"
                                 "+OK\r\n"
                                 "+OK Logged in.\r\n"
                                 "+OK 2 46\r\n"
                                 "+OK 2 messages:\r\n1 18\r\n2 28\r\n.\r\n"
                                 "+OK 18 octets\r\nSubject: a\r\n\r\nhi\r\n.\r\n"
                                 "+OK 28 octets\r\nSubject: b\r\n\r\n..dot-stuffed\r\n.\r\n"
                                 "+OK Marked to be deleted.\r\n"
                                 "-ERR There's no message 9.\r\n"
                                 "+OK Logging out, messages deleted.\r\n";

    for (int bytewise = 0; bytewise < 2; bytewise++) {
        struct sim *s = sim_new(bytewise);
        const struct pop3_pairs_summary *sum = pop3_pairs_summary(&s->pp);

        s->secrets[0] = "alice";
        s->secrets[1] = "pa55word";
        /* Commands sent before the greeting wait for it: the greeting is framed alone. */
        sim_client(s, "CAPA\r\n");
        ASSERT_EQ(pop3_pairs_frame(&s->pp), POP3_FRAME_SINGLE);
        ASSERT_EQ(sim_server(s, "+OK Dovecot ready.\r\n"), POP3_PAIRS_GREETING);
        ASSERT_EQ(pop3_pairs_frame(&s->pp), POP3_FRAME_MULTI);
        sim_client(s, client + 6);
        ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 10);
        ASSERT_EQ(pop3_pairs_oldest(&s->pp), POP3_CMD_CAPA);
        sim_server(s, server);
        /* The CAPA went out before the greeting: its ms counts from then. Size and lines are
         * the un-stuffed bodies', which add up to what STAT and LIST announced. */
        ASSERT_LOG(s, want);
        ASSERT_EQ(sum->authenticated, 1);
        ASSERT_EQ(sum->retrieved, 2);
        ASSERT_EQ(sum->retrieved_octets, 46);
        ASSERT_EQ(sum->deleted, 1);
        ASSERT_EQ(sum->quit_sent, 1);
        ASSERT_EQ(sum->quit_answered, 1);
        ASSERT_EQ(sum->has_primary, 0); /* a LIST n refused fails nothing */
        ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 0);
        ASSERT_MEMEQ(s->to_backend, s->backend_len, client, strlen(client));
        ASSERT(pop3_pairs_detach(&s->pp) == s->fifo);
        ASSERT_EQ(pop3_pairs_room(&s->pp), 0);
        free(s);
    }
}

static void test_auth(void)
{
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        struct sim *s = sim_new(bytewise);

        s->secrets[0] = "AGFsaWNlAHNlY3JldA==";
        s->secrets[1] = "VXNlcm5hbWU6";
        sim_server(s, "+OK ready\r\n");
        /* A bare AUTH lists mechanisms and logs in no one. */
        sim_client(s, "AUTH\r\n");
        sim_server(s, "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
        ASSERT(!pop3_pairs_authenticated(&s->pp));
        /* LOGIN cancelled by the client: the refusal is no failure. */
        sim_client(s, "AUTH LOGIN\r\n");
        ASSERT_EQ(sim_server(s, "+ VXNlcm5hbWU6\r\n"), POP3_PAIRS_INTERMEDIATE);
        sim_client(s, "*\r\n");
        sim_server(s, "-ERR Authentication aborted\r\n");
        /* PLAIN with the credential after an empty continuation, then a pipelined STAT. */
        sim_client(s, "AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTAT\r\n");
        ASSERT_EQ(pop3_pairs_frame(&s->pp), POP3_FRAME_SASL);
        sim_server(s, "+ \r\n");
        sim_server(s, "+OK Logged in.\r\n");
        ASSERT_MEMEQ(s->to_backend + s->backend_len - 6, 6, "STAT\r\n", 6); /* released */
        sim_server(s, "+OK 0 0\r\n");
        /* ms runs from the command to the final response; STAT waited in mxproxy for the end
         * of the exchange, so it went out alone (not pipelined). */
        ASSERT_LOG(s, "greeting [] +OK [ready] lines=0 size=0 f=0 rounds=0 ms=1\n"
                      "cmd [AUTH] +OK [] lines=2 size=14 f=10 rounds=0 ms=1\n"
                      "(continuation 1)\n"
                      "cmd [AUTH LOGIN] -ERR [Authentication aborted] lines=0 size=0 f=8 "
                      "rounds=1 ms=3\n"
                      "(continuation 1)\n"
                      "cmd [AUTH PLAIN] +OK [Logged in.] lines=0 size=0 f=0 rounds=1 ms=2\n"
                      "cmd [STAT] +OK [0 0] lines=0 size=0 f=0 rounds=0 ms=1\n");
        ASSERT(pop3_pairs_authenticated(&s->pp));
        ASSERT(!pop3_pairs_summary(&s->pp)->has_primary);
        ASSERT_MEMEQ(s->to_backend, s->backend_len,
                     "AUTH\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTAT\r\n",
                     61);
        free(s);
    }

    /* An initial response is redacted in the log; a failed exchange is the primary error. */
    struct sim *s = sim_new(false);
    s->secrets[0] = "dGVzdAB0ZXN0AHRlc3Q=";
    sim_server(s, "+OK ready\r\n");
    sim_client(s, "AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n");
    sim_server(s, "-ERR [AUTH] Authentication failed.\r\n");
    ASSERT_LOG(s, "greeting [] +OK [ready] lines=0 size=0 f=0 rounds=0 ms=1\n"
                  "cmd [AUTH PLAIN [redacted]] -ERR [[AUTH] Authentication failed.] lines=0 "
                  "size=0 f=2 rounds=0 ms=1\n");
    ASSERT_STREQ(pop3_pairs_summary(&s->pp)->primary.cmd_text, "AUTH PLAIN [redacted]");
    free(s);
}

/* Which -ERR becomes primary_error: the first that fails something the client wanted. */
static void test_primary(void)
{
    struct sim *s = sim_new(false);
    const struct pop3_pairs_summary *sum = pop3_pairs_summary(&s->pp);

    sim_server(s, "+OK ready\r\n");
    sim_client(s, "CAPA\r\nUIDL\r\nNOOP\r\nXYZZY\r\nLIST 7\r\n");
    sim_server(s, "-ERR no CAPA\r\n-ERR no UIDL\r\n-ERR no NOOP\r\n-ERR what\r\n-ERR no 7\r\n");
    ASSERT(!sum->has_primary);
    sim_client(s, "USER bob\r\nPASS x\r\nRETR 1\r\n");
    sim_server(s, "+OK\r\n-ERR [AUTH] Authentication failed.\r\n-ERR Unknown command\r\n");
    ASSERT(sum->has_primary);
    ASSERT_STREQ(sum->primary.cmd_text, "PASS [redacted]");
    ASSERT_STREQ(sum->primary.text, "[AUTH] Authentication failed.");
    ASSERT_EQ(sum->primary.flags & POP3_PAIR_F_PRIMARY, POP3_PAIR_F_PRIMARY);
    free(s);

    /* A refusing greeting, and an unsolicited -ERR before the server closes. */
    s = sim_new(false);
    sim_server(s, "-ERR [SYS/TEMP] too many connections\r\n");
    ASSERT(pop3_pairs_summary(&s->pp)->has_primary);
    free(s);
    s = sim_new(false);
    sim_server(s, "+OK ready\r\n");
    ASSERT_EQ(sim_server(s, "-ERR Disconnected for inactivity.\r\n"), POP3_PAIRS_UNSOLICITED);
    ASSERT_STREQ(pop3_pairs_summary(&s->pp)->primary.text, "Disconnected for inactivity.");
    ASSERT_EQ(pop3_pairs_summary(&s->pp)->primary.kind, POP3_PAIR_UNSOLICITED);
    free(s);
}

/* Lines mxproxy answers itself keep their place among pipelined responses. */
static void test_local_order(void)
{
    struct sim *s = sim_new(false);
    char line[POP3_DEFAULT_MAX_LINE + 64];

    sim_server(s, "+OK ready\r\n");
    memset(line, 'x', sizeof(line));
    memcpy(line, "NOOP\r\nNOOP ", 11);
    memcpy(line + sizeof(line) - 14, "\r\nSTAT\r\nA\rB\r\n", 13);
    line[sizeof(line) - 1] = '\0';
    sim_client(s, line);
    ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 4);
    sim_server(s, "+OK\r\n");
    sim_server(s, "+OK 1 2\r\n");
    ASSERT_LOG(s, "greeting [] +OK [ready] lines=0 size=0 f=0 rounds=0 ms=1\n"
                  "cmd [NOOP] +OK [] lines=0 size=0 f=0 rounds=0 ms=1\n"
                  "local [[line too long]] -ERR [Line too long] lines=0 size=0 f=1 rounds=0 ms=1\n"
                  "cmd [STAT] +OK [1 2] lines=0 size=0 f=1 rounds=0 ms=2\n"
                  "local [[invalid line]] -ERR [Syntax error, bare CR or LF in command] lines=0 "
                  "size=0 f=1 rounds=0 ms=2\n");
    ASSERT_MEMEQ(s->to_backend, s->backend_len, "NOOP\r\nSTAT\r\n", 12);
    free(s);
}

/* STLS terminated by mxproxy: answered locally, in order; refused after a login. */
static void test_stls_local(void)
{
    struct sim *s = sim_new(false);

    sim_server(s, "+OK ready\r\n");
    sim_client(s, "CAPA\r\nSTLS\r\nUSER injected\r\n");
    ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 2);
    ASSERT_EQ(s->cp.injected, strlen("USER injected\r\n"));
    sim_server(s, "+OK\r\nTOP\r\n.\r\n");
    sim_client(s, "USER a\r\nPASS b\r\nSTLS\r\nNOOP\r\n");
    sim_server(s, "+OK\r\n+OK Logged in.\r\n");
    ASSERT_LOG(s, "greeting [] +OK [ready] lines=0 size=0 f=0 rounds=0 ms=1\n"
                  "cmd [CAPA] +OK [] lines=1 size=5 f=10 rounds=0 ms=1\n"
                  "local [STLS] +OK [Begin TLS negotiation now] lines=0 size=0 f=1 rounds=0 ms=1\n"
                  "cmd [USER [redacted]] +OK [] lines=0 size=0 f=0 rounds=0 ms=1\n"
                  "cmd [PASS [redacted]] +OK [Logged in.] lines=0 size=0 f=1 rounds=0 ms=1\n"
                  "local [STLS] -ERR [STLS not permitted after authentication] lines=0 size=0 "
                  "f=1 rounds=0 ms=1\n");
    /* What followed either STLS in the same read stays dropped, TLS or not (as for SMTP). */
    ASSERT_MEMEQ(s->to_backend, s->backend_len, "CAPA\r\nUSER a\r\nPASS b\r\n", 22);
    ASSERT_EQ(s->cp.injected, strlen("USER injected\r\nNOOP\r\n"));
    ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 0);
    sim_client(s, "NOOP\r\n");
    ASSERT_EQ(pop3_pairs_outstanding(&s->pp), 1);
    free(s);
}

static void test_abort_and_room(void)
{
    struct sim *s = sim_new(false);
    struct pop3_pair p;
    struct pop3_event ev;
    int n = 0;

    sim_server(s, "+OK ready\r\n");
    sim_client(s, "RETR 1\r\nQUIT\r\n");
    ASSERT(pop3_pairs_detach(&s->pp) == NULL); /* commands outstanding */
    while (pop3_pairs_abort(&s->pp, &p)) {
        ASSERT_EQ(p.kind, POP3_PAIR_ABORTED);
        ASSERT_EQ(p.status, POP3_STATUS_NONE);
        ASSERT_STREQ(p.cmd_text, n == 0 ? "RETR 1" : "QUIT");
        n++;
    }
    ASSERT_EQ(n, 2);
    ASSERT(pop3_pairs_summary(&s->pp)->quit_sent);
    ASSERT(!pop3_pairs_summary(&s->pp)->quit_answered);

    /* The FIFO holds POP3_PAIRS_CAP commands, then refuses. */
    memset(&ev, 0, sizeof(ev));
    ev.type = POP3_EV_COMMAND;
    ev.cmd = POP3_CMD_NOOP;
    ev.line = "NOOP";
    ev.line_len = 4;
    for (int i = 0; i < POP3_PAIRS_CAP; i++)
        ASSERT_OK(pop3_pairs_on_client_event(&s->pp, &ev, 0));
    ASSERT_EQ(pop3_pairs_room(&s->pp), 0);
    ASSERT_EQ(pop3_pairs_on_client_event(&s->pp, &ev, 0), -ENOBUFS);
    ev.type = POP3_EV_TOO_LONG;
    ASSERT_EQ(pop3_pairs_on_client_event(&s->pp, &ev, 0), -ENOBUFS);
    ev.type = POP3_EV_DISCARD; /* needs no entry */
    ASSERT_OK(pop3_pairs_on_client_event(&s->pp, &ev, 0));
    while (pop3_pairs_abort(&s->pp, &p))
        ;
    ASSERT_EQ(pop3_pairs_answer_locally(&s->pp, POP3_LOCAL_XCLIENT), -ENOENT);
    ASSERT(!pop3_pairs_take_local(&s->pp, 0, &p));
    free(s);

    struct pop3_pairs empty = {0};
    ASSERT_EQ(pop3_pairs_on_client_event(&empty, &ev, 0), 0);
    ev.type = POP3_EV_COMMAND;
    ASSERT_EQ(pop3_pairs_on_client_event(&empty, &ev, 0), -ENOBUFS);
    ASSERT(pop3_pairs_detach(&empty) == NULL);
}

int main(void)
{
    test_pipelined_session();
    test_auth();
    test_primary();
    test_local_order();
    test_stls_local();
    test_abort_and_room();
    printf("test_pop3_pairs: ok\n");
    return 0;
}
