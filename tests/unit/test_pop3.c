/* test_pop3.c: unit tests for proxy/pop3.c, the pure POP3 framing.
 *
 * Every client case runs through a driver that behaves like the session: it keeps unconsumed
 * bytes, appends the next read, and answers WAIT with scripted statuses. Every server case runs
 * with a script of framings, one per response. Each case runs whole, one byte at a time and
 * split at every point; the transcript of events and the forwarded bytes must be the same every
 * time. The parsers always read from a copy placed flush against a PROT_NONE page, so an
 * over-read crashes.
 */
#include "pop3.h"
#include "test.h"

#include <stdarg.h>
#include <stdbool.h>

/* --- growing byte strings (test only) ----------------------------------------------------- */

struct dstr {
    char *p;
    size_t n, cap;
};

static void dstr_add(struct dstr *d, const void *s, size_t n)
{
    if (d->n + n + 1 > d->cap) {
        size_t cap = d->cap ? d->cap : 256;
        while (cap < d->n + n + 1)
            cap *= 2;
        d->p = realloc(d->p, cap);
        ASSERT(d->p != NULL);
        d->cap = cap;
    }
    if (n > 0)
        memcpy(d->p + d->n, s, n);
    d->n += n;
    d->p[d->n] = '\0';
}

static void dstr_printf(struct dstr *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void dstr_printf(struct dstr *d, const char *fmt, ...)
{
    char tmp[16384];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    ASSERT(n >= 0 && (size_t)n < sizeof(tmp));
    dstr_add(d, tmp, (size_t)n);
}

static void dstr_free(struct dstr *d)
{
    free(d->p);
    memset(d, 0, sizeof(*d));
}

/* --- client driver ---------------------------------------------------------------------------- */

static const char *g_secrets[4]; /* must never show in ev.line, ev.arg or ev.reason */
static const size_t no_cuts[1];  /* "read it all at once" */

struct run {
    struct dstr tr;  /* transcript of events, spans merged */
    struct dstr out; /* bytes forwarded to the backend */
    uint64_t discarded, injected;
    int last; /* type of the previous event, for merging spans */
};

static const char *const ev_names[] = {
    [POP3_EV_AGAIN] = "AGAIN",       [POP3_EV_WAIT] = "WAIT",
    [POP3_EV_COMMAND] = "CMD",       [POP3_EV_AUTH_RESPONSE] = "AUTHRESP",
    [POP3_EV_TOO_LONG] = "TOO_LONG", [POP3_EV_INVALID] = "INVALID",
    [POP3_EV_DISCARD] = "DISCARD",   [POP3_EV_INJECTED] = "INJECTED",
};

static const char frame_names[] = "SMA"; /* SINGLE, MULTI, SASL */

static void check_secret(const char *p, size_t n)
{
    for (size_t i = 0; i < 4 && g_secrets[i] != NULL; i++)
        if (p != NULL && memmem(p, n, g_secrets[i], strlen(g_secrets[i])) != NULL)
            TEST_FAIL_("secret \"%s\" in a loggable event field", g_secrets[i]);
}

static void record(struct run *r, const struct pop3_event *ev)
{
    check_secret(ev->line, ev->line_len);
    check_secret(ev->arg, ev->arg_len);
    if (ev->reason != NULL)
        check_secret(ev->reason, strlen(ev->reason));
    ASSERT(ev->fwd_len == 0 || ev->fwd != NULL);
    dstr_add(&r->out, ev->fwd, ev->fwd_len);
    switch (ev->type) {
    case POP3_EV_DISCARD:
    case POP3_EV_INJECTED:
        if (ev->type == POP3_EV_DISCARD)
            r->discarded += ev->size;
        else
            r->injected += ev->size;
        if (r->last != (int)ev->type)
            dstr_printf(&r->tr, "%s\n", ev_names[ev->type]);
        break;
    case POP3_EV_COMMAND:
        ASSERT(ev->line != NULL);
        dstr_printf(&r->tr, "CMD %s|%.*s|%.*s|%c|%x\n", pop3_cmd_name(ev->cmd), (int)ev->line_len,
                    ev->line, (int)ev->arg_len, ev->arg ? ev->arg : "", frame_names[ev->frame],
                    ev->flags);
        break;
    default:
        ASSERT(ev->line == NULL && ev->arg == NULL);
        dstr_printf(&r->tr, "%s %s|%s|%x\n", ev_names[ev->type], pop3_cmd_name(ev->cmd),
                    ev->reason ? ev->reason : "", ev->flags);
        break;
    }
    r->last = (int)ev->type;
}

struct script {
    const int *replies; /* statuses answered to each WAIT, in order */
    size_t n;
    size_t next;
};

/* Feeds hold (the unconsumed bytes plus the latest read) to the parser like the session does;
 * removes what was consumed. */
static void drive(struct pop3_client *p, struct dstr *hold, struct script *sc, struct run *r)
{
    struct guard g;
    const char *buf = guard_place(&g, hold->p, hold->n);
    size_t off = 0;

    for (int loops = 0;; loops++) {
        struct pop3_event ev;
        size_t n;

        ASSERT(loops < 10000000);
        memset(&ev, 0x5a, sizeof(ev));
        n = pop3_client_parse(p, buf + off, hold->n - off, &ev);
        ASSERT(n <= hold->n - off);
        if (ev.type == POP3_EV_AGAIN) {
            ASSERT_EQ(n, 0);
            /* The caller never has to hold more than one line. */
            ASSERT(hold->n - off <= p->max_line);
            break;
        }
        if (ev.type == POP3_EV_WAIT) {
            ASSERT_EQ(n, 0);
            if (sc->next == sc->n)
                break;
            dstr_printf(&r->tr, "WAIT %s=%s\n", pop3_cmd_name(ev.cmd),
                        pop3_status_name((enum pop3_status)sc->replies[sc->next]));
            pop3_client_on_reply(p, ev.cmd, (enum pop3_status)sc->replies[sc->next++]);
            r->last = POP3_EV_WAIT;
            continue;
        }
        record(r, &ev);
        off += n;
    }
    memmove(hold->p, hold->p + off, hold->n - off);
    hold->n -= off;
    guard_free(&g);
}

/* Runs in[0, len) cut at cuts[0] < cuts[1] < ... into reads. */
static void run_cuts(const struct pop3_client_opts *o, const char *in, size_t len,
                     const size_t *cuts, size_t ncuts, const int *replies, size_t nreplies,
                     struct run *r)
{
    struct pop3_client p;
    struct dstr hold = {0};
    struct script sc = {replies, nreplies, 0};
    size_t a = 0;

    memset(r, 0, sizeof(*r));
    r->last = -1;
    pop3_client_init(&p, o);
    dstr_add(&hold, "", 0);
    for (size_t i = 0; i <= ncuts; i++) {
        size_t b = i < ncuts ? cuts[i] : len;
        dstr_add(&hold, in + a, b - a);
        drive(&p, &hold, &sc, r);
        a = b;
    }
    dstr_free(&hold);
}

static void run_free(struct run *r)
{
    dstr_free(&r->tr);
    dstr_free(&r->out);
}

static void same_run(const struct run *a, const struct run *b, const char *how, size_t at)
{
    if (a->tr.n != b->tr.n || memcmp(a->tr.p, b->tr.p, a->tr.n) != 0)
        TEST_FAIL_("%s (%zu): transcript differs\n--- whole:\n%s--- split:\n%s", how, at, a->tr.p,
                   b->tr.p);
    ASSERT_MEMEQ(b->out.p, b->out.n, a->out.p, a->out.n);
    ASSERT_EQ(b->discarded, a->discarded);
    ASSERT_EQ(b->injected, a->injected);
}

/* Runs a case whole, byte by byte and at every split point; returns the whole run in *r. */
static void run_client(const struct pop3_client_opts *o, const char *in, size_t len,
                       const int *replies, size_t nreplies, struct run *r)
{
    struct run s;
    size_t *cuts = calloc(len + 1, sizeof(*cuts));

    ASSERT(cuts != NULL);
    run_cuts(o, in, len, no_cuts, 0, replies, nreplies, r);
    for (size_t i = 0; i + 1 < len; i++)
        cuts[i] = i + 1;
    run_cuts(o, in, len, cuts, len > 0 ? len - 1 : 0, replies, nreplies, &s);
    same_run(r, &s, "byte by byte", 0);
    run_free(&s);
    for (size_t k = 1; k < len; k++) {
        run_cuts(o, in, len, &k, 1, replies, nreplies, &s);
        same_run(r, &s, "split at", k);
        run_free(&s);
    }
    free(cuts);
}

#define OK_ POP3_STATUS_OK
#define ERR_ POP3_STATUS_ERR
#define CONT_ POP3_STATUS_CONT

#define RUN(o, str, r, ...)                                                                        \
    do {                                                                                           \
        static const int replies_[] = {0, __VA_ARGS__};                                            \
        run_client((o), (str), sizeof(str) - 1, replies_ + 1,                                      \
                   sizeof(replies_) / sizeof(replies_[0]) - 1, (r));                               \
    } while (0)

#define ASSERT_TR(r, want) ASSERT_MEMEQ((r)->tr.p, (r)->tr.n, (want), strlen(want))
#define ASSERT_OUT(r, want, wlen) ASSERT_MEMEQ((r)->out.p, (r)->out.n, (want), (wlen))

/* --- client cases ----------------------------------------------------------------------------- */

/* A whole RFC 1939 session: every keyword, its framing, its loggable text. */
static void test_session(void)
{
    static const char in[] = "CAPA\r\nUSER alice\r\nPASS s3cr3t pass\r\nSTAT\r\nLIST\r\n"
                             "LIST 1\r\nUIDL\r\nuidl  2 \r\nRETR 1\r\nTOP 1 10\r\nDELE 1\r\n"
                             "NOOP\r\nRSET\r\nLANG\r\nLANG en\r\nUTF8\r\nQUIT\r\n";
    struct run r;

    g_secrets[0] = "alice";
    g_secrets[1] = "s3cr3t";
    RUN(NULL, in, &r);
    ASSERT_TR(&r, "CMD CAPA|CAPA||M|0\n"
                  "CMD USER|USER||S|5\n"
                  "CMD PASS|PASS||S|5\n"
                  "CMD STAT|STAT||S|0\n"
                  "CMD LIST|LIST||M|0\n"
                  "CMD LIST|LIST 1|1|S|4\n"
                  "CMD UIDL|UIDL||M|0\n"
                  "CMD UIDL|uidl  2 |2|S|4\n"
                  "CMD RETR|RETR 1|1|M|4\n"
                  "CMD TOP|TOP 1 10|1 10|M|4\n"
                  "CMD DELE|DELE 1|1|S|4\n"
                  "CMD NOOP|NOOP||S|0\n"
                  "CMD RSET|RSET||S|0\n"
                  "CMD LANG|LANG||M|0\n"
                  "CMD LANG|LANG en|en|S|4\n"
                  "CMD UTF8|UTF8||S|0\n"
                  "CMD QUIT|QUIT||S|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);
    memset(g_secrets, 0, sizeof(g_secrets));
}

/* USER, PASS and APOP arguments are credentials wherever a server's tokenizer splits them. */
static void test_credentials(void)
{
    static const char in[] = "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"
                             "PASS\tsecret1\r\n"
                             " pass secret2\r\n"
                             "User\vsecret3\r\n"
                             "PASS \r\n"
                             "PASS\r\n"
                             "PASSsecret4\r\n";
    struct run r;

    g_secrets[0] = "c4c9334bac560ecc979e58001b3e22fb";
    g_secrets[1] = "secret1";
    g_secrets[2] = "secret2";
    g_secrets[3] = "secret3";
    RUN(NULL, in, &r);
    /* "PASS " may end in a one-blank password; "PASSsecret4" is no PASS to any server: an unknown
     * command, shown as it is. */
    ASSERT_TR(&r, "CMD APOP|APOP||S|5\n"
                  "CMD PASS|PASS||S|5\n"
                  "CMD PASS| pass||S|5\n"
                  "CMD USER|User||S|5\n"
                  "CMD PASS|PASS||S|1\n"
                  "CMD PASS|PASS||S|0\n"
                  "CMD UNKNOWN|PASSsecret4||S|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);
    memset(g_secrets, 0, sizeof(g_secrets));
}

static void test_auth(void)
{
    struct run r;

    /* PLAIN with an initial response: the log text stops at the mechanism. */
    static const char plain[] = "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nSTAT\r\n";
    g_secrets[0] = "AGFsaWNlAHNlY3JldA==";
    RUN(NULL, plain, &r, OK_);
    ASSERT_TR(&r, "CMD AUTH|AUTH PLAIN|PLAIN|A|5\nWAIT AUTH=+OK\nCMD STAT|STAT||S|0\n");
    ASSERT_OUT(&r, plain, sizeof(plain) - 1);
    run_free(&r);

    /* LOGIN with two continuations: answer lines are forwarded, never logged. */
    static const char login[] = "AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nQUIT\r\n";
    g_secrets[0] = "YWxpY2U=";
    g_secrets[1] = "c2VjcmV0";
    RUN(NULL, login, &r, CONT_, CONT_, OK_);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|A|4\nWAIT AUTH=+\nAUTHRESP AUTH||0\n"
                  "WAIT AUTH=+\nAUTHRESP AUTH||0\nWAIT AUTH=+OK\nCMD QUIT|QUIT||S|0\n");
    ASSERT_OUT(&r, login, sizeof(login) - 1);
    run_free(&r);

    /* Without the continuation the answer line would have been a command: it is held. */
    static const char early[] = "AUTH LOGIN\r\nYWxpY2U=\r\n";
    RUN(NULL, early, &r);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|A|4\n");
    ASSERT_OUT(&r, "AUTH LOGIN\r\n", 12);
    run_free(&r);

    /* A refused mechanism: what follows is a command again. */
    static const char refused[] = "AUTH CRAM-MD5\r\nUSER YWxpY2U=\r\n";
    RUN(NULL, refused, &r, ERR_);
    ASSERT_TR(&r, "CMD AUTH|AUTH CRAM-MD5|CRAM-MD5|A|4\nWAIT AUTH=-ERR\nCMD USER|USER||S|5\n");
    run_free(&r);

    /* Refused before any "+ " with the answer sent anyway: that one-word line still goes to
     * the server, but its text is never loggable; a word later on is a command as ever. */
    static const char piped[] = "AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nxyzzy\r\n";
    g_secrets[0] = "AGFsaWNlAHNlY3JldA==";
    RUN(NULL, piped, &r, ERR_);
    ASSERT_TR(&r, "CMD AUTH|AUTH PLAIN|PLAIN|A|4\nWAIT AUTH=-ERR\nCMD UNKNOWN|[redacted]||S|0\n"
                  "CMD UNKNOWN|xyzzy||S|0\n");
    ASSERT_OUT(&r, piped, sizeof(piped) - 1);
    run_free(&r);
    g_secrets[0] = NULL;

    /* Cancelled with "*". */
    static const char cancel[] = "AUTH LOGIN\r\n*\r\nQUIT\r\n";
    RUN(NULL, cancel, &r, CONT_, ERR_);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|A|4\nWAIT AUTH=+\nAUTHRESP AUTH||2\n"
                  "WAIT AUTH=-ERR\nCMD QUIT|QUIT||S|0\n");
    run_free(&r);

    /* An overlong answer line is replaced by a cancel, not answered locally; so is a bad one. */
    static const struct pop3_client_opts small = {32};
    static const char longcred[] = "AUTH LOGIN\r\n"
                                   "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\r\n"
                                   "AUTH LOGIN\r\nc2Vj\rcmV0\r\nQUIT\r\n";
    g_secrets[2] = "c2VjcmV0c2VjcmV0";
    RUN(&small, longcred, &r, CONT_, ERR_, CONT_, ERR_);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|A|4\nWAIT AUTH=+\n"
                  "TOO_LONG AUTH|line too long|2\nDISCARD\nWAIT AUTH=-ERR\n"
                  "CMD AUTH|AUTH LOGIN|LOGIN|A|4\nWAIT AUTH=+\n"
                  "INVALID AUTH|bare CR|2\nWAIT AUTH=-ERR\nCMD QUIT|QUIT||S|0\n");
    ASSERT_OUT(&r, "AUTH LOGIN\r\n*\r\nAUTH LOGIN\r\n*\r\nQUIT\r\n", 36);
    run_free(&r);
    memset(g_secrets, 0, sizeof(g_secrets));

    /* A bare AUTH lists mechanisms (multi-line +OK) and starts no exchange. */
    static const char bare[] = "AUTH\r\nAUTH \r\nSTAT\r\n";
    RUN(NULL, bare, &r);
    ASSERT_TR(&r, "CMD AUTH|AUTH||M|0\nCMD AUTH|AUTH||M|0\nCMD STAT|STAT||S|0\n");
    run_free(&r);
}

/* AUTH is split as any server's tokenizer splits it; the loggable text stops at the mechanism
 * name whatever separates the credential from it, and at AUTH when there is no SASL name. */
static void test_auth_tokenizer(void)
{
    static const struct {
        const char *line; /* the AUTH line, CRLF excluded */
        const char *text; /* ev.line */
        const char *mech; /* ev.arg */
        unsigned flags;
    } cases[] = {
        {"AUTH PLAIN", "AUTH PLAIN", "PLAIN", 4},
        {"auth\tplain\tSECRET", "auth\tplain", "plain", 5},
        {"  AUTH  PLAIN=SECRET", "  AUTH  PLAIN", "PLAIN", 5},
        {"AUTH PLAIN\x1cSECRET", "AUTH PLAIN", "PLAIN", 5},
        {"AUTH XSECRETXXXXXXXXXXXXXXXXXXXXXXXXX", "AUTH", "", 5},
        {"AUTH =SECRET", "AUTH", "", 5},
        {"AUTH\vX-OAUTH2 SECRET", "AUTH\vX-OAUTH2", "X-OAUTH2", 5},
    };

    g_secrets[0] = "SECRET";
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct pop3_client p = {0};
        struct pop3_event ev;
        char line[128];
        size_t n = (size_t)snprintf(line, sizeof(line), "%s\r\n", cases[i].line);

        ASSERT_EQ(pop3_client_parse(&p, line, n, &ev), n);
        ASSERT_EQ(ev.type, POP3_EV_COMMAND);
        ASSERT_EQ(ev.cmd, POP3_CMD_AUTH);
        ASSERT_EQ(ev.frame, POP3_FRAME_SASL);
        ASSERT_MEMEQ(ev.line, ev.line_len, cases[i].text, strlen(cases[i].text));
        ASSERT_MEMEQ(ev.arg, ev.arg_len, cases[i].mech, strlen(cases[i].mech));
        ASSERT_EQ(ev.flags, cases[i].flags);
        check_secret(ev.line, ev.line_len);
        check_secret(ev.arg, ev.arg_len);
        ASSERT_EQ(pop3_client_parse(&p, "x\r\n", 3, &ev), 0);
        ASSERT_EQ(ev.type, POP3_EV_WAIT);
    }
    memset(g_secrets, 0, sizeof(g_secrets));
}

static void test_overlong_and_invalid(void)
{
    static const struct pop3_client_opts small = {32};
    struct run r;

    /* 32 bytes with CRLF is fine, 33 is not; the parser resyncs after the LF. */
    static const char in[] = "NOOP xxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
                             "NOOP yyyyyyyyyyyyyyyyyyyyyyyyyy\r\n"
                             "NOOP\r\n";
    RUN(&small, in, &r);
    ASSERT_TR(&r, "CMD NOOP|NOOP xxxxxxxxxxxxxxxxxxxxxxxxx|xxxxxxxxxxxxxxxxxxxxxxxxx|S|4\n"
                  "TOO_LONG |line too long|0\nDISCARD\nCMD NOOP|NOOP||S|0\n");
    ASSERT_OUT(&r, "NOOP xxxxxxxxxxxxxxxxxxxxxxxxx\r\nNOOP\r\n", 38);
    ASSERT_EQ(r.discarded, 1);
    run_free(&r);

    static const char bad[] = "NOOP\nNO\rOP\r\nNO\0P\r\nQUIT\r\r\nQUIT\r\n";
    RUN(NULL, bad, &r);
    ASSERT_TR(&r, "INVALID |bare LF|0\nINVALID |bare CR|0\nINVALID |NUL|0\n"
                  "INVALID |bare CR|0\nCMD QUIT|QUIT||S|0\n");
    ASSERT_OUT(&r, "QUIT\r\n", 6);
    run_free(&r);

    /* The default limit is 4096 bytes, CRLF included. */
    struct dstr big = {0};
    dstr_add(&big, "NOOP ", 5);
    for (int i = 0; i < POP3_DEFAULT_MAX_LINE - 7; i++)
        dstr_add(&big, "A", 1);
    dstr_add(&big, "\r\nNOOP ", 7);
    for (int i = 0; i < POP3_DEFAULT_MAX_LINE - 6; i++)
        dstr_add(&big, "B", 1);
    dstr_add(&big, "\r\nSTAT\r\n", 8);
    run_cuts(NULL, big.p, big.n, no_cuts, 0, NULL, 0, &r);
    ASSERT(strncmp(r.tr.p, "CMD NOOP|NOOP AAA", 17) == 0);
    ASSERT(strstr(r.tr.p, "\nTOO_LONG |line too long|0\nDISCARD\nCMD STAT|STAT||S|0\n") != NULL);
    ASSERT_EQ(r.discarded, 1);
    struct run s;
    size_t cuts[] = {1000, 4095, 4096, 4097, 8000};
    run_cuts(NULL, big.p, big.n, cuts, 5, NULL, 0, &s);
    same_run(&r, &s, "big", 0);
    run_free(&s);
    run_free(&r);
    dstr_free(&big);
}

static void test_stls(void)
{
    static const char in[] = "CAPA\r\nSTLS\r\nUSER evil\r\nPASS evil\r\n";
    struct run r;

    RUN(NULL, in, &r);
    ASSERT_TR(&r, "CMD CAPA|CAPA||M|0\nCMD STLS|STLS||S|0\nINJECTED\n");
    ASSERT_EQ(r.injected, strlen("USER evil\r\nPASS evil\r\n"));
    ASSERT_OUT(&r, "CAPA\r\nSTLS\r\n", 12);
    run_free(&r);

    /* After the response the parser reads commands again (inside TLS). */
    struct pop3_client p = {0};
    struct pop3_event ev;
    const char *s = "STLS\r\nNOOP\r\n";
    size_t n = pop3_client_parse(&p, s, strlen(s), &ev);
    ASSERT_EQ(ev.type, POP3_EV_COMMAND);
    ASSERT_EQ(ev.cmd, POP3_CMD_STLS);
    ASSERT_EQ(pop3_client_parse(&p, s + n, strlen(s) - n, &ev), 6);
    ASSERT_EQ(ev.type, POP3_EV_INJECTED);
    ASSERT_EQ(ev.size, 6);
    ASSERT_EQ(ev.fwd_len, 0);
    ASSERT_EQ(p.injected, 6);
    pop3_client_on_reply(&p, POP3_CMD_NOOP, POP3_STATUS_OK); /* not the barrier's */
    ASSERT_EQ(pop3_client_parse(&p, "USER b\r\n", 8, &ev), 8);
    ASSERT_EQ(ev.type, POP3_EV_INJECTED);
    pop3_client_on_reply(&p, POP3_CMD_STLS, POP3_STATUS_OK);
    ASSERT_EQ(pop3_client_parse(&p, "USER b\r\n", 8, &ev), 8);
    ASSERT_EQ(ev.type, POP3_EV_COMMAND);
    ASSERT_EQ(ev.cmd, POP3_CMD_USER);
}

static void test_verbs(void)
{
    static const char in[] = "capa\r\nStLs2\r\nRETRX 1\r\n\r\n   \r\nXCLIENT ADDR=192.0.2.1\r\n"
                             "top 1 0\r\n";
    struct run r;

    RUN(NULL, in, &r);
    ASSERT_TR(&r, "CMD CAPA|capa||M|0\nCMD UNKNOWN|StLs2||S|0\nCMD UNKNOWN|RETRX 1|1|S|4\n"
                  "CMD UNKNOWN|||S|0\nCMD UNKNOWN|   ||S|0\n"
                  "CMD XCLIENT|XCLIENT ADDR=192.0.2.1|ADDR=192.0.2.1|S|4\n"
                  "CMD TOP|top 1 0|1 0|M|4\n");
    run_free(&r);
    ASSERT_STREQ(pop3_cmd_name(POP3_CMD_XCLIENT), "XCLIENT");
    ASSERT_STREQ(pop3_cmd_name(POP3_CMD_NONE), "");
    ASSERT_STREQ(pop3_cmd_name((enum pop3_cmd)999), "");
    ASSERT_STREQ(pop3_status_name(POP3_STATUS_ERR), "-ERR");
}

/* The server answers the cancel that replaced an overlong answer line before the rest of that
 * line arrives: once the line is skipped the client's next command is read, not held. */
static void test_cancel_answered_early(void)
{
    static const struct pop3_client_opts small = {16};
    struct pop3_client p;
    struct pop3_event ev;

    pop3_client_init(&p, &small);
    ASSERT_EQ(pop3_client_parse(&p, "AUTH LOGIN\r\n", 12, &ev), 12);
    pop3_client_on_reply(&p, POP3_CMD_AUTH, POP3_STATUS_CONT);
    ASSERT_EQ(pop3_client_parse(&p, "AAAAAAAAAAAAAAAAAAAA", 20, &ev), 16);
    ASSERT_EQ(ev.type, POP3_EV_TOO_LONG);
    ASSERT_MEMEQ(ev.fwd, ev.fwd_len, "*\r\n", 3);
    pop3_client_on_reply(&p, POP3_CMD_AUTH, POP3_STATUS_ERR);
    ASSERT_EQ(pop3_client_parse(&p, "AAAA\r\nSTAT\r\n", 12, &ev), 6);
    ASSERT_EQ(ev.type, POP3_EV_DISCARD);
    ASSERT_EQ(pop3_client_parse(&p, "STAT\r\n", 6, &ev), 6);
    ASSERT_EQ(ev.type, POP3_EV_COMMAND);
    ASSERT_EQ(ev.cmd, POP3_CMD_STAT);
}

/* 100 MB without a newline, with NULs and invalid UTF-8: the caller never holds more than one
 * line, and nothing of it goes out. */
static void test_client_bounded(void)
{
    enum { CHUNK = 1 << 16, TOTAL = 100 << 20 };
    char *chunk = malloc(CHUNK + POP3_DEFAULT_MAX_LINE);
    struct pop3_client p = {0};
    size_t held = 0;
    uint64_t dropped = 0;

    ASSERT(chunk != NULL);
    for (size_t done = 0; done < TOTAL; done += CHUNK) {
        for (size_t i = 0; i < CHUNK; i++)
            chunk[held + i] = (char)("\0\xff\xc3"
                                     "A"[i % 4]);
        size_t len = held + CHUNK, off = 0;
        for (;;) {
            struct pop3_event ev;
            size_t n = pop3_client_parse(&p, chunk + off, len - off, &ev);
            if (ev.type == POP3_EV_AGAIN)
                break;
            ASSERT(ev.type == POP3_EV_TOO_LONG || ev.type == POP3_EV_DISCARD);
            ASSERT_EQ(ev.fwd_len, 0);
            dropped += n;
            off += n;
        }
        held = len - off;
        ASSERT(held <= POP3_DEFAULT_MAX_LINE);
        memmove(chunk, chunk + off, held);
    }
    ASSERT_EQ(dropped, (uint64_t)TOTAL);
    free(chunk);
}

/* --- server cases ----------------------------------------------------------------------------- */

/* Parses in[0, len) cut into reads; frames[] is how each response is framed, in order. */
static void server_transcript(const char *in, size_t len, const size_t *cuts, size_t ncuts,
                              const char *frames, struct dstr *tr)
{
    struct pop3_server p = {0};
    size_t a = 0, next = 0, total = 0;

    for (size_t i = 0; i <= ncuts; i++) {
        size_t b = i < ncuts ? cuts[i] : len;
        struct guard g;
        const char *buf = guard_place(&g, in + a, b - a);
        size_t off = 0;
        for (;;) {
            struct pop3_server_event ev;
            enum pop3_frame f = POP3_FRAME_SINGLE;
            if (frames[next] != '\0')
                f = (enum pop3_frame)(strchr(frame_names, frames[next]) - frame_names);
            size_t n = pop3_server_parse(&p, buf + off, b - a - off, f, 7, &ev);
            ASSERT(n <= b - a - off);
            off += n;
            if (ev.type == POP3_SEV_AGAIN) {
                ASSERT_EQ(off, b - a);
                ASSERT(ev.resp == NULL);
                break;
            }
            const struct pop3_response *r = ev.resp;
            ASSERT(r->text_len <= POP3_TEXT_MAX);
            ASSERT_EQ(r->text[r->text_len], '\0');
            ASSERT_EQ(r->t_first, 7);
            ASSERT_EQ(total + r->wire, a + off);
            ASSERT_EQ(ev.type == POP3_SEV_BODY, pop3_server_in_body(&p));
            if (ev.type != POP3_SEV_BODY)
                total += r->wire;
            if (ev.type == POP3_SEV_RESPONSE && frames[next] != '\0')
                next++;
            if (ev.type == POP3_SEV_CONTINUATION) {
                ASSERT_EQ(r->status, POP3_STATUS_CONT);
                ASSERT_EQ(r->text_len, 0);
            }
            dstr_printf(tr, "%c %s|%.*s|%d|%u|%llu|%d|%llu\n", "-RCGB"[ev.type],
                        pop3_status_name(r->status), (int)r -> text_len, r -> text, r -> multi,
                        r -> lines, (unsigned long long)r -> size, r -> truncated,
                        (unsigned long long)r -> wire);
        }
        guard_free(&g);
        a = b;
    }
}

static void run_server(const char *in, size_t len, const char *frames, struct dstr *tr)
{
    struct dstr s = {0};
    size_t *cuts = calloc(len + 1, sizeof(*cuts));

    ASSERT(cuts != NULL);
    server_transcript(in, len, no_cuts, 0, frames, tr);
    for (size_t i = 0; i + 1 < len; i++)
        cuts[i] = i + 1;
    server_transcript(in, len, cuts, len > 0 ? len - 1 : 0, frames, &s);
    ASSERT_MEMEQ(s.p, s.n, tr->p, tr->n);
    for (size_t k = 1; k < len; k++) {
        s.n = 0;
        server_transcript(in, len, &k, 1, frames, &s);
        ASSERT_MEMEQ(s.p, s.n, tr->p, tr->n);
    }
    dstr_free(&s);
    free(cuts);
}

#define ASSERT_SERVER(in, frames, want)                                                            \
    do {                                                                                           \
        struct dstr tr_ = {0};                                                                     \
        run_server((in), sizeof(in) - 1, (frames), &tr_);                                          \
        ASSERT_MEMEQ(tr_.p, tr_.n, (want), strlen(want));                                          \
        dstr_free(&tr_);                                                                           \
    } while (0)

static void test_server_responses(void)
{
    /* Greeting, a LIST, a STAT, a LIST n refused, an empty UIDL. */
    static const char s1[] = "+OK Dovecot ready. <1.2@host>\r\n"
                             "+OK 2 messages:\r\n1 120\r\n2 200\r\n.\r\n"
                             "+OK 2 320\r\n"
                             "-ERR [SYS/PERM] no such message\r\n"
                             "+OK\r\n.\r\n"
                             "-ERR unknown command\r\n";
    ASSERT_SERVER(s1, "SMSMMS",
                  "R +OK|Dovecot ready. <1.2@host>|0|0|0|0|31\n"
                  "B +OK|2 messages:|1|0|0|0|17\n"
                  "R +OK|2 messages:|1|2|14|0|34\n"
                  "R +OK|2 320|0|0|0|0|11\n"
                  "R -ERR|[SYS/PERM] no such message|0|0|0|0|33\n"
                  "B +OK||1|0|0|0|5\n"
                  "R +OK||1|0|0|0|8\n"
                  "R -ERR|unknown command|0|0|0|0|22\n");

    /* A RETR body: dot-stuffed lines lose their first dot in size=, the terminator counts
     * nowhere; lines that only look like terminators are body lines. */
    static const char retr[] = "+OK 36 octets\r\n"
                               "Subject: x\r\n"
                               "\r\n"
                               "..\r\n"
                               "...x\r\n"
                               ". \r\n"
                               ".\rx\r\n"
                               "body\n"
                               "\r\n"
                               ".\r\n"
                               "+OK bye\r\n";
    ASSERT_SERVER(retr, "M",
                  "B +OK|36 octets|1|0|0|0|15\n"
                  "R +OK|36 octets|1|8|36|0|58\n"
                  "R +OK|bye|0|0|0|0|9\n");

    /* A terminator with a bare LF ends the body too (as poplib and fetchmail read it). */
    static const char lf[] = "+OK\nline\n.\n+OK x\n";
    ASSERT_SERVER(lf, "MS", "B +OK||1|0|0|0|4\nR +OK||1|1|5|0|11\nR +OK|x|0|0|0|0|6\n");

    /* "+OK" without a space, and a CR inside the text. */
    static const char odd[] = "+OKfoo\r\n-ERR\r\n-ERRa\rb\r\n+OK  two\r\n";
    ASSERT_SERVER(odd, "SSSS",
                  "R +OK|foo|0|0|0|0|8\nR -ERR||0|0|0|0|6\nR -ERR|a\rb|0|0|0|0|9\n"
                  "R +OK| two|0|0|0|0|10\n");
}

static void test_server_sasl(void)
{
    /* Continuations in a SASL framing: never kept; then the final status. */
    static const char login[] = "+ VXNlcm5hbWU6\r\n+ \r\n+\r\n+\n+OK Logged in.\r\n";
    ASSERT_SERVER(login, "A",
                  "C +||0|0|0|0|16\nC +||0|0|0|0|4\nC +||0|0|0|0|3\nC +||0|0|0|0|2\n"
                  "R +OK|Logged in.|0|0|0|0|16\n");

    /* Elsewhere a "+ " line is no status line. */
    static const char stray[] = "+ c2VjcmV0\r\n+OK\r\n";
    ASSERT_SERVER(stray, "S", "G |+ c2VjcmV0|0|0|0|0|12\nR +OK||0|0|0|0|5\n");

    /* A bare AUTH lists mechanisms, multi-line. */
    static const char mechs[] = "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n";
    ASSERT_SERVER(mechs, "M", "B +OK||1|0|0|0|5\nR +OK||1|2|14|0|22\n");
}

static void test_server_garbage(void)
{
    static const char in[] = "HTTP/1.1 400 Bad Request\r\n"
                             "-ER\r\n"
                             "\r\n"
                             "+O\n"
                             "OK\r\n"
                             "+OK fine\r\n";
    ASSERT_SERVER(in, "SSSSSS",
                  "G |HTTP/1.1 400 Bad Request|0|0|0|0|26\n"
                  "G |-ER|0|0|0|0|5\n"
                  "G ||0|0|0|0|2\n"
                  "G |+O|0|0|0|0|3\n"
                  "G |OK|0|0|0|0|4\n"
                  "R +OK|fine|0|0|0|0|10\n");

    /* Long lines are counted, not stored; text stops at POP3_TEXT_MAX. */
    struct dstr big = {0}, tr = {0};
    dstr_add(&big, "-ERR ", 5);
    for (int i = 0; i < 100000; i++)
        dstr_add(&big, "e", 1);
    dstr_add(&big, "\r\n+OK\r\n", 7);
    for (int i = 0; i < 100000; i++)
        dstr_add(&big, "x", 1);
    dstr_add(&big, "\r\n.\r\n", 5);
    size_t cuts[] = {3, 50, 4000, 100010, 100011, 150000};
    server_transcript(big.p, big.n, cuts, 6, "SM", &tr);
    char want[512];
    snprintf(
        want, sizeof(want), "R -ERR|%.*s|0|0|0|1|100007\n", POP3_TEXT_MAX,
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee");
    ASSERT(strncmp(tr.p, want, strlen(want)) == 0);
    /* A body line of 100000 bytes is no status text: nothing is truncated. */
    ASSERT_STREQ(tr.p + strlen(want), "B +OK||1|0|0|0|5\nR +OK||1|1|100002|0|100010\n");
    dstr_free(&big);
    dstr_free(&tr);
}

/* The framing is taken at a response's first byte: one passed while a response is in progress
 * does not change it. */
static void test_server_frame_latch(void)
{
    struct pop3_server p = {0};
    struct pop3_server_event ev;

    ASSERT_EQ(pop3_server_parse(&p, "+O", 2, POP3_FRAME_MULTI, 1, &ev), 2);
    ASSERT_EQ(ev.type, POP3_SEV_AGAIN);
    ASSERT_EQ(pop3_server_parse(&p, "K\r\nx\r\n.\r\n", 9, POP3_FRAME_SINGLE, 2, &ev), 3);
    ASSERT_EQ(ev.type, POP3_SEV_BODY);
    ASSERT(pop3_server_in_body(&p));
    ASSERT_EQ(ev.resp->wire, 5);
    ASSERT_EQ(pop3_server_parse(&p, "x\r\n.\r\n", 6, POP3_FRAME_SINGLE, 2, &ev), 6);
    ASSERT_EQ(ev.type, POP3_SEV_RESPONSE);
    ASSERT(!pop3_server_in_body(&p));
    ASSERT(ev.resp->multi);
    ASSERT_EQ(ev.resp->lines, 1);
    ASSERT_EQ(ev.resp->t_first, 1);
    ASSERT_EQ(ev.resp->wire, 11);
    ASSERT_EQ(pop3_server_parse(&p, "+OK\r\n", 5, POP3_FRAME_SINGLE, 3, &ev), 5);
    ASSERT(!ev.resp->multi);
    ASSERT_EQ(ev.resp->t_first, 3);
    ASSERT_EQ(pop3_server_parse(&p, NULL, 0, POP3_FRAME_SINGLE, 3, &ev), 0);
    ASSERT_EQ(ev.type, POP3_SEV_AGAIN);
}

/* --- CAPA ---------------------------------------------------------------------------------- */

static void expect_capa(const char *in, unsigned flags, const char *want)
{
    char out[1024];
    ssize_t n = pop3_capa_edit(in, strlen(in), flags, out, sizeof(out));

    if (want == NULL) {
        ASSERT_EQ(n, -1);
        return;
    }
    ASSERT(n >= 0);
    ASSERT_MEMEQ(out, (size_t)n, want, strlen(want));
}

static void test_capa(void)
{
    static const char dovecot[] = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
                                  "AUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    static const char no_tls[] = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
                                 "AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    static const char added[] = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
                                "AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n";

    expect_capa(dovecot, POP3_CAPA_DEL_STLS, no_tls);
    expect_capa(dovecot, POP3_CAPA_ADD_STLS, dovecot);
    expect_capa(no_tls, POP3_CAPA_ADD_STLS, added);
    expect_capa(no_tls, POP3_CAPA_DEL_STLS, no_tls);
    expect_capa(no_tls, 0, no_tls);
    expect_capa(dovecot, POP3_CAPA_ADD_STLS | POP3_CAPA_DEL_STLS, dovecot);
    /* Any case, any line end, several times; "STLSX" is another capability. */
    expect_capa("+OK Capability list follows\nstls\nSTLSX\r\nStls extra\r\nTOP\n.\n",
                POP3_CAPA_DEL_STLS, "+OK Capability list follows\nSTLSX\r\nTOP\n.\n");
    expect_capa("+OK\r\n.\r\n", POP3_CAPA_ADD_STLS, "+OK\r\nSTLS\r\n.\r\n");
    /* Not a complete +OK multi-line response: left to the caller. */
    expect_capa("-ERR no\r\n", POP3_CAPA_ADD_STLS, NULL);
    expect_capa("+OK\r\nTOP\r\n", POP3_CAPA_ADD_STLS, NULL);
    expect_capa("+OK\r\nTOP\r\n.\r\nx", POP3_CAPA_ADD_STLS, NULL);
    expect_capa("+OK\r\nTOP", POP3_CAPA_ADD_STLS, NULL);
    expect_capa("+OK", POP3_CAPA_ADD_STLS, NULL);
    char small[8];
    ASSERT_EQ(pop3_capa_edit(dovecot, strlen(dovecot), 0, small, sizeof(small)), -1);

    ASSERT(pop3_capa_has(dovecot, strlen(dovecot), "STLS"));
    ASSERT(pop3_capa_has(dovecot, strlen(dovecot), "SASL"));
    ASSERT(!pop3_capa_has(no_tls, strlen(no_tls), "STLS"));
    ASSERT(!pop3_capa_has(dovecot, strlen(dovecot), "XCLIENT"));
    ASSERT(!pop3_capa_has("+OK STLS\r\n.\r\n", 13, "STLS")); /* the status line is no capability */
}

int main(void)
{
    test_session();
    test_credentials();
    test_auth();
    test_auth_tokenizer();
    test_overlong_and_invalid();
    test_stls();
    test_verbs();
    test_cancel_answered_early();
    test_client_bounded();
    test_server_responses();
    test_server_sasl();
    test_server_garbage();
    test_server_frame_latch();
    test_capa();
    printf("test_pop3: ok\n");
    return 0;
}
