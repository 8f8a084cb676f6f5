/* test_imap.c: unit tests for proxy/imap.c and proxy/imap_pairs.c, the pure IMAP framing.
 *
 * Every client and server case runs through a driver that behaves like the session: it keeps
 * unconsumed bytes, appends the next read, and answers WAIT from a script ('+' a continuation,
 * 'T' the tagged refusal). Each case runs whole, one byte at a time and split at every point;
 * the transcript of events and the forwarded bytes must be the same every time. The parser
 * always reads from a copy placed flush against a PROT_NONE page, so an over-read crashes.
 */
#include "imap.h"
#include "imap_pairs.h"
#include "test.h"

#include <stdarg.h>
#include <stdbool.h>

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
    ASSERT(d->p != NULL);
    if (n > 0)
        memcpy(d->p + d->n, s, n);
    d->n += n;
    d->p[d->n] = '\0';
}

static void dstr_printf(struct dstr *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void dstr_printf(struct dstr *d, const char *fmt, ...)
{
    char tmp[2048];
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

/* --- client driver ------------------------------------------------------------------------ */

static const char *g_secrets[4]; /* must never show in ev.tag, ev.text or ev.reason */

struct run {
    struct dstr tr;  /* transcript of events, spans merged */
    struct dstr out; /* bytes forwarded to the backend */
    uint64_t dropped;
    int last;
};

static const char *const ev_names[] = {
    [IMAP_EV_AGAIN] = "AGAIN",
    [IMAP_EV_WAIT] = "WAIT",
    [IMAP_EV_BEGIN] = "BEGIN",
    [IMAP_EV_PART] = "PART",
    [IMAP_EV_LITERAL] = "LITERAL",
    [IMAP_EV_COMMAND] = "CMD",
    [IMAP_EV_AUTH_RESPONSE] = "AUTHRESP",
    [IMAP_EV_DONE] = "DONE",
    [IMAP_EV_TOO_LONG] = "TOO_LONG",
    [IMAP_EV_INVALID] = "INVALID",
    [IMAP_EV_DISCARD] = "DISCARD",
    [IMAP_EV_INJECTED] = "INJECTED",
};

static void check_secret(const char *p, size_t n)
{
    for (size_t i = 0; i < 4 && g_secrets[i] != NULL; i++)
        if (p != NULL && memmem(p, n, g_secrets[i], strlen(g_secrets[i])) != NULL)
            TEST_FAIL_("secret \"%s\" in a loggable event field", g_secrets[i]);
}

static void record(struct run *r, const struct imap_event *ev)
{
    check_secret(ev->tag, ev->tag_len);
    check_secret(ev->text, ev->text_len);
    if (ev->reason != NULL)
        check_secret(ev->reason, strlen(ev->reason));
    ASSERT(ev->fwd_len == 0 || ev->fwd != NULL);
    dstr_add(&r->out, ev->fwd, ev->fwd_len);
    switch (ev->type) {
    case IMAP_EV_LITERAL:
    case IMAP_EV_DISCARD:
    case IMAP_EV_INJECTED:
        if (ev->type != IMAP_EV_LITERAL)
            r->dropped += ev->size;
        if (r->last != (int)ev->type)
            dstr_printf(&r->tr, "%s\n", ev_names[ev->type]);
        break;
    case IMAP_EV_COMMAND:
        dstr_printf(&r->tr, "CMD %.*s|%s|%.*s|%llu|%x\n", (int)ev->tag_len, ev->tag,
                    imap_cmd_name(ev->cmd), (int)ev->text_len, ev->text,
                    (unsigned long long)ev->size, ev->flags);
        break;
    default:
        dstr_printf(&r->tr, "%s %.*s|%s|%s|%x\n", ev_names[ev->type], (int)ev->tag_len,
                    ev->tag ? ev->tag : "", imap_cmd_name(ev->cmd), ev->reason ? ev->reason : "",
                    ev->flags);
        break;
    }
    r->last = (int)ev->type;
}

struct script {
    const char *s; /* '+': continuation, 'T': tagged response to the waited command */
    size_t next;
};

static void drive(struct imap_client *p, struct dstr *hold, struct script *sc, struct run *r)
{
    struct guard g;
    const char *buf = guard_place(&g, hold->p, hold->n);
    size_t off = 0;

    for (int loops = 0;; loops++) {
        struct imap_event ev;
        size_t n;

        ASSERT(loops < 10000000);
        memset(&ev, 0x5a, sizeof(ev));
        n = imap_client_parse(p, buf + off, hold->n - off, &ev);
        ASSERT(n <= hold->n - off);
        if (ev.type == IMAP_EV_AGAIN) {
            ASSERT_EQ(n, 0);
            ASSERT(hold->n - off <= p->max_line);
            break;
        }
        if (ev.type == IMAP_EV_WAIT) {
            ASSERT_EQ(n, 0);
            if (sc->s[sc->next] == '\0')
                break;
            char how = sc->s[sc->next++];
            dstr_printf(&r->tr, "WAIT %.*s|%s=%c\n", (int)ev.tag_len, ev.tag, imap_cmd_name(ev.cmd),
                        how);
            if (how == '+')
                imap_client_on_continue(p);
            else
                imap_client_on_tagged(p, ev.tag, ev.tag_len);
            r->last = IMAP_EV_WAIT;
            continue;
        }
        record(r, &ev);
        off += n;
    }
    memmove(hold->p, hold->p + off, hold->n - off);
    hold->n -= off;
    guard_free(&g);
}

static void run_cuts(size_t max, const char *in, size_t len, const size_t *cuts, size_t ncuts,
                     const char *script, struct run *r)
{
    struct imap_client p;
    struct imap_client_opts o = {max};
    struct dstr hold = {0};
    struct script sc = {script, 0};
    size_t a = 0;

    memset(r, 0, sizeof(*r));
    r->last = -1;
    imap_client_init(&p, &o);
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
    ASSERT_EQ(b->dropped, a->dropped);
}

/* Runs a case whole, byte by byte and at every split point; returns the whole run in *r. */
static void run_client(size_t max, const char *in, size_t len, const char *script, struct run *r)
{
    struct run s;
    size_t *cuts = calloc(len + 1, sizeof(*cuts));

    ASSERT(cuts != NULL);
    run_cuts(max, in, len, NULL, 0, script, r);
    for (size_t i = 0; i + 1 < len; i++)
        cuts[i] = i + 1;
    run_cuts(max, in, len, cuts, len > 0 ? len - 1 : 0, script, &s);
    same_run(r, &s, "byte by byte", 0);
    run_free(&s);
    for (size_t k = 1; k < len; k++) {
        run_cuts(max, in, len, &k, 1, script, &s);
        same_run(r, &s, "split at", k);
        run_free(&s);
    }
    free(cuts);
}

#define RUN(max, str, script, r) run_client((max), (str), sizeof(str) - 1, (script), (r))
#define ASSERT_PREFIX(s, want)                                                                     \
    ASSERT_MEMEQ((s), strlen(want) <= strlen(s) ? strlen(want) : strlen(s), (want), strlen(want))
#define ASSERT_TR(r, want) ASSERT_MEMEQ((r)->tr.p, (r)->tr.n, (want), strlen(want))
#define ASSERT_OUT_IN(r, in) ASSERT_MEMEQ((r)->out.p, (r)->out.n, (in), sizeof(in) - 1)

/* --- client cases ------------------------------------------------------------------------- */

static void test_simple(void)
{
    static const char in[] = "a1 CAPABILITY\r\n"
                             "a2 select INBOX\r\n"
                             "a3 UID FETCH 1:* (FLAGS)\r\n"
                             "a4 XYZZY plugh\r\n"
                             "a5 LOGOUT\r\n";
    struct run r;

    RUN(0, in, "", &r);
    ASSERT_TR(&r, "CMD a1|CAPABILITY|CAPABILITY|0|0\n"
                  "CMD a2|SELECT|select INBOX|0|0\n"
                  "CMD a3|UID|UID FETCH 1:* (FLAGS)|0|0\n"
                  "CMD a4|UNKNOWN|XYZZY plugh|0|0\n"
                  "CMD a5|LOGOUT|LOGOUT|0|0\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);
}

static void test_login_redaction(void)
{
    static const char in[] = "a LOGIN joe \"Secret1\"\r\n"
                             "b login joe Secret2\r\n"
                             "c LOGIN {3}\r\njoe {7}\r\nSecret3\r\n"
                             "d LOGIN {3+}\r\njoe {7+}\r\nSecret4\r\n"
                             "LOGIN joe Secret1\r\n"
                             /* A verb glued to its arguments by a TAB or a '{': no command a
                              * server runs, but a real password all the same. */
                             "e login\tjoe Secret5\r\n"
                             "f Authenticate\tPLAIN Secret6\r\n"
                             "g LOGIN{3+}\r\njoe Secret7\r\n";
    struct run r;

    g_secrets[0] = "Secret";
    RUN(0, in, "++", &r);
    ASSERT_TR(&r, "CMD a|LOGIN|LOGIN [redacted]|0|0\n"
                  "CMD b|LOGIN|login [redacted]|0|0\n"
                  "BEGIN c|LOGIN||1\n"
                  "WAIT c|LOGIN=+\n"
                  "LITERAL\n"
                  "PART c|LOGIN||1\n"
                  "WAIT c|LOGIN=+\n"
                  "LITERAL\n"
                  "CMD c|LOGIN|LOGIN [redacted]|10|2\n"
                  "BEGIN d|LOGIN||0\n"
                  "LITERAL\n"
                  "PART d|LOGIN||0\n"
                  "LITERAL\n"
                  "CMD d|LOGIN|LOGIN [redacted]|10|2\n"
                  "CMD LOGIN|UNKNOWN|[redacted]|0|0\n"
                  "CMD e|UNKNOWN|login [redacted]|0|0\n"
                  "CMD f|UNKNOWN|Authenticate [redacted]|0|0\n"
                  "BEGIN g|UNKNOWN||0\n"
                  "LITERAL\n"
                  "CMD g|UNKNOWN|LOGIN [redacted]|3|2\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);

    /* A literal refused (by require_tls, or the server) that the client sends anyway with
     * the rest of its LOGIN: those lines are no command and are dropped, a binary one too;
     * the first command ends it. After a refused APPEND the data stays commands (RFC 9051). */
    static const char eager[] = "c LOGIN {3}\r\njoe {7}\r\nSecret3\r\nd NOOP\r\n"
                                "e LOGIN joe {9}\r\nSecret\0\n4\r\nf NOOP\r\nxyzzy\r\n"
                                "g APPEND INBOX {9}\r\nh SELECT x\r\n";
    RUN(0, eager, "TTT", &r);
    ASSERT_TR(&r, "BEGIN c|LOGIN||1\n"
                  "WAIT c|LOGIN=T\n"
                  "DISCARD\n"
                  "CMD d|NOOP|NOOP|0|0\n"
                  "BEGIN e|LOGIN||1\n"
                  "WAIT e|LOGIN=T\n"
                  "DISCARD\n"
                  "CMD f|NOOP|NOOP|0|0\n"
                  "CMD xyzzy|UNKNOWN||0|0\n"
                  "BEGIN g|APPEND||1\n"
                  "WAIT g|APPEND=T\n"
                  "CMD h|SELECT|SELECT x|0|0\n");
    ASSERT_OUT_IN(&r, "c LOGIN {3}\r\nd NOOP\r\ne LOGIN joe {9}\r\nf NOOP\r\nxyzzy\r\n"
                      "g APPEND INBOX {9}\r\nh SELECT x\r\n");
    run_free(&r);
    g_secrets[0] = NULL;
}

static void test_append_literal(void)
{
    /* The message is never read as commands, however much it looks like them. */
    static const char in[] = "a APPEND INBOX (\\Seen) {28}\r\n"
                             "b LOGOUT\r\nc LOGIN x {5}\r\nd\r\n\r\n"
                             "e NOOP\r\n";
    struct run r;

    RUN(0, in, "+", &r);
    ASSERT_TR(&r, "BEGIN a|APPEND||1\n"
                  "WAIT a|APPEND=+\n"
                  "LITERAL\n"
                  "CMD a|APPEND|APPEND INBOX (\\Seen) {28}|28|2\n"
                  "CMD e|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);

    /* Refused before the data: the client never sends it, the next line is a command. */
    static const char refused[] = "a APPEND INBOX {999999}\r\nb NOOP\r\n";
    RUN(0, refused, "T", &r);
    ASSERT_TR(&r, "BEGIN a|APPEND||1\nWAIT a|APPEND=T\nCMD b|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, refused);
    run_free(&r);

    /* Literals do not count toward the line limit; literal8 and zero-length literals. */
    static const char big[] =
        "a APPEND INBOX {70+}\r\n"
        "0123456789012345678901234567890123456789012345678901234567890123456789"
        " ~{0+}\r\n\r\n"
        "b SEARCH SUBJECT {0}\r\n\r\n";
    RUN(64, big, "+", &r);
    ASSERT_TR(&r, "BEGIN a|APPEND||0\nLITERAL\nPART a|APPEND||0\n"
                  "CMD a|APPEND|APPEND INBOX {70+} ~{0+}|70|2\n"
                  "BEGIN b|SEARCH||1\nWAIT b|SEARCH=+\nCMD b|SEARCH|SEARCH SUBJECT {0}|0|2\n");
    ASSERT_OUT_IN(&r, big);
    run_free(&r);
}

static void test_authenticate(void)
{
    static const char in[] = "a AUTHENTICATE PLAIN\r\n"
                             "AGpvZQBTZWNyZXQx\r\n"
                             "b AUTHENTICATE PLAIN AGpvZQBTZWNyZXQy\r\n"
                             "c authenticate login\r\nam9l\r\n*\r\n"
                             "d NOOP\r\n";
    struct run r;

    g_secrets[0] = "AGpvZQ";
    g_secrets[1] = "am9l";
    RUN(0, in, "+TT++T", &r);
    ASSERT_TR(&r, "CMD a|AUTHENTICATE|AUTHENTICATE PLAIN|0|0\n"
                  "WAIT a|AUTHENTICATE=+\n"
                  "AUTHRESP |AUTHENTICATE||0\n"
                  "WAIT a|AUTHENTICATE=T\n"
                  "CMD b|AUTHENTICATE|AUTHENTICATE PLAIN [redacted]|0|20\n"
                  "WAIT b|AUTHENTICATE=T\n"
                  "CMD c|AUTHENTICATE|authenticate login|0|0\n"
                  "WAIT c|AUTHENTICATE=+\n"
                  "AUTHRESP |AUTHENTICATE||0\n"
                  "WAIT c|AUTHENTICATE=+\n"
                  "AUTHRESP |AUTHENTICATE||8\n"
                  "WAIT c|AUTHENTICATE=T\n"
                  "CMD d|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);

    /* An overlong continuation line becomes a cancel for the server. */
    static const char lng[] =
        "a AUTHENTICATE PLAIN\r\n"
        "AGpvZQ0123456789012345678901234567890123456789012345678901234567890123"
        "\r\nb NOOP\r\n";
    RUN(64, lng, "+T", &r);
    ASSERT_TR(&r, "CMD a|AUTHENTICATE|AUTHENTICATE PLAIN|0|0\n"
                  "WAIT a|AUTHENTICATE=+\n"
                  "TOO_LONG a|AUTHENTICATE|line too long|8\nDISCARD\n"
                  "WAIT a|AUTHENTICATE=T\n"
                  "CMD b|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, "a AUTHENTICATE PLAIN\r\n*\r\nb NOOP\r\n");
    run_free(&r);

    /* Refused before any "+", with the SASL response sent anyway: that one-word line is
     * dropped (it may be a credential, and no command is one word); the next is a command,
     * and so is a command that comes first. */
    static const char piped[] = "a AUTHENTICATE PLAIN\r\nAGpvZQBTZWNyZXQx\r\nb NOOP\r\n"
                                "c AUTHENTICATE PLAIN\r\nd NOOP\r\nxyzzy\r\n";
    RUN(0, piped, "TT", &r);
    ASSERT_TR(&r, "CMD a|AUTHENTICATE|AUTHENTICATE PLAIN|0|0\n"
                  "WAIT a|AUTHENTICATE=T\n"
                  "DISCARD\n"
                  "CMD b|NOOP|NOOP|0|0\n"
                  "CMD c|AUTHENTICATE|AUTHENTICATE PLAIN|0|0\n"
                  "WAIT c|AUTHENTICATE=T\n"
                  "CMD d|NOOP|NOOP|0|0\n"
                  "CMD xyzzy|UNKNOWN||0|0\n");
    ASSERT_OUT_IN(&r, "a AUTHENTICATE PLAIN\r\nb NOOP\r\nc AUTHENTICATE PLAIN\r\nd NOOP\r\n"
                      "xyzzy\r\n");
    run_free(&r);
    /* Refused after its "+" and before the response came: the response is dropped too. */
    static const char late[] = "a AUTHENTICATE PLAIN\r\n";
    static const char late_resp[] = "AGpvZQBTZWNyZXQx\r\nb NOOP\r\n";
    struct imap_client lp = {0};
    struct imap_event ev;
    size_t n = imap_client_parse(&lp, late, strlen(late), &ev);
    ASSERT_EQ(n, strlen(late));
    imap_client_on_continue(&lp);
    imap_client_on_tagged(&lp, "a", 1);
    n = imap_client_parse(&lp, late_resp, strlen(late_resp), &ev);
    ASSERT_EQ(ev.type, IMAP_EV_DISCARD);
    ASSERT_EQ(ev.fwd_len, 0);
    ASSERT_EQ(n, 18);
    ASSERT_EQ(imap_client_parse(&lp, late_resp + n, strlen(late_resp) - n, &ev),
              strlen(late_resp) - n);
    ASSERT_EQ(ev.type, IMAP_EV_COMMAND);
    ASSERT_EQ(ev.cmd, IMAP_CMD_NOOP);
    g_secrets[0] = g_secrets[1] = NULL;
}

static void test_idle(void)
{
    static const char in[] = "a IDLE\r\nDONE\r\nb IDLE\r\nc NOOP\r\n";
    struct run r;

    RUN(0, in, "+TT", &r);
    ASSERT_TR(&r, "CMD a|IDLE|IDLE|0|0\nWAIT a|IDLE=+\nDONE |IDLE||0\nWAIT a|IDLE=T\n"
                  "CMD b|IDLE|IDLE|0|0\nWAIT b|IDLE=T\nCMD c|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);
}

static void test_starttls_compress(void)
{
    static const char in[] = "a STARTTLS\r\nb LOGIN joe Secret1\r\n";
    struct run r;

    RUN(0, in, "", &r);
    ASSERT_TR(&r, "CMD a|STARTTLS|STARTTLS|0|0\nINJECTED\n");
    ASSERT_EQ(r.dropped, 21);
    ASSERT_OUT_IN(&r, "a STARTTLS\r\n");
    run_free(&r);

    /* The barrier lifts with the tagged reply to STARTTLS, not another one. */
    struct imap_client p = {0};
    struct imap_event ev;
    const char *s = "a STARTTLS\r\nb NOOP\r\n";
    size_t n = imap_client_parse(&p, s, strlen(s), &ev);
    ASSERT_EQ(ev.type, IMAP_EV_COMMAND);
    imap_client_on_tagged(&p, "z", 1);
    ASSERT_EQ(imap_client_parse(&p, s + n, strlen(s) - n, &ev), strlen(s) - n);
    ASSERT_EQ(ev.type, IMAP_EV_INJECTED);
    imap_client_on_tagged(&p, "a", 1);
    ASSERT_EQ(imap_client_parse(&p, s + n, strlen(s) - n, &ev), strlen(s) - n);
    ASSERT_EQ(ev.type, IMAP_EV_COMMAND);
    ASSERT_EQ(ev.cmd, IMAP_CMD_NOOP);

    /* COMPRESS holds what follows until its answer (after OK it is deflate data). */
    static const char comp[] = "a COMPRESS DEFLATE\r\nb NOOP\r\n";
    RUN(0, comp, "T", &r);
    ASSERT_TR(&r, "CMD a|COMPRESS|COMPRESS DEFLATE|0|0\nWAIT a|COMPRESS=T\nCMD b|NOOP|NOOP|0|0\n");
    run_free(&r);
}

static void test_refused_lines(void)
{
    static const char in[] =
        "a NOOP\n"
        "b NO\rOP\r\n"
        "c NO\0OP\r\n"
        "d 0123456789012345678901234567890123456789012345678901234567890123456789"
        "\r\n"
        "e NOOP\r\n";
    struct run r;

    RUN(64, in, "", &r);
    ASSERT_TR(&r, "INVALID a||bare LF|0\n"
                  "INVALID b||bare CR|0\n"
                  "INVALID c||NUL|0\n"
                  "TOO_LONG d||line too long|0\nDISCARD\n"
                  "CMD e|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, "e NOOP\r\n");
    run_free(&r);

    /* A refused line's non-synchronizing literal is dropped with it, and the line's rest. */
    static const char lit[] =
        "a APPEND INBOX 01234567890123456789012345678901234567890123456789 {9+}\r\n"
        "b LOGOUT\r rest\r\n"
        "c NOOP {4+}\n"
        "dd\r\n\r\n"
        "e NOOP\r\n";
    RUN(64, lit, "", &r);
    ASSERT_TR(&r, "TOO_LONG a||line too long|0\nDISCARD\n"
                  "INVALID c||bare LF|0\nDISCARD\n"
                  "CMD e|NOOP|NOOP|0|0\n");
    ASSERT_OUT_IN(&r, "e NOOP\r\n");
    run_free(&r);

    /* Cut short after a part went out: the session cannot go on. */
    static const char mid[] = "a APPEND INBOX {3+}\r\nabc"
                              " 0123456789012345678901234567890123456789012345678901234567890\r\n";
    RUN(64, mid, "", &r);
    ASSERT_TR(&r, "BEGIN a|APPEND||0\nLITERAL\nTOO_LONG a|APPEND|line too long|10\nDISCARD\n");
    run_free(&r);
}

static void test_long_lines(void)
{
    /* Over IMAP_STREAM_AT bytes but within the limit: the line goes out in parts, the caller
     * never holds more than IMAP_STREAM_AT bytes, the announcement at its end is still seen. */
    size_t n = 0, len = 3 * IMAP_STREAM_AT;
    char *in = malloc(len + 128);
    struct run r;

    ASSERT(in != NULL);
    n += (size_t)sprintf(in, "a UID SEARCH UID 1");
    while (n < len)
        n += (size_t)sprintf(in + n, ",%u", (unsigned)n);
    n += (size_t)sprintf(in + n, " {3+}\r\nabc\r\nb NOOP\r\n");
    struct run s;
    run_cuts(0, in, n, NULL, 0, "", &r);
    ASSERT(r.tr.p != NULL && r.out.p != NULL);
    ASSERT_PREFIX(r.tr.p, "BEGIN a|UID||0\nPART a|UID||0\nPART a|UID||0\nPART a|UID||0\nLITERAL\n"
                          "CMD a|UID|UID SEARCH UID 1,18,21,");
    ASSERT(strstr(r.tr.p, "|3|2\nCMD b|NOOP|NOOP|0|0\n") != NULL);
    ASSERT_MEMEQ(r.out.p, r.out.n, in, n);
    size_t *cuts = calloc(n, sizeof(*cuts));
    ASSERT(cuts != NULL);
    for (size_t i = 0; i + 1 < n; i++)
        cuts[i] = i + 1;
    run_cuts(0, in, n, cuts, n - 1, "", &s);
    same_run(&r, &s, "byte by byte", 0);
    run_free(&s);
    for (size_t k = IMAP_STREAM_AT - 40; k < IMAP_STREAM_AT + 40; k++) {
        run_cuts(0, in, n, &k, 1, "", &s);
        same_run(&r, &s, "split at", k);
        run_free(&s);
    }
    run_free(&r);

    /* A NUL in such a line: dropped, and the command is cut short once parts went out. */
    in[IMAP_STREAM_AT / 2] = '\0';
    run_cuts(0, in, n, NULL, 0, "", &r);
    ASSERT(r.tr.p != NULL);
    ASSERT_PREFIX(r.tr.p, "INVALID a||NUL|0\nDISCARD\nCMD b|NOOP|NOOP|0|0\n");
    run_free(&r);
    in[IMAP_STREAM_AT / 2] = '1';
    in[2 * IMAP_STREAM_AT] = '\0';
    run_cuts(0, in, n, NULL, 0, "", &r);
    ASSERT_PREFIX(
        r.tr.p,
        "BEGIN a|UID||0\nPART a|UID||0\nINVALID a|UID|NUL|10\nDISCARD\nCMD b|NOOP|NOOP|0|0\n");
    run_free(&r);
    free(cuts);
    free(in);
}

static void test_no_tag(void)
{
    static const char in[] = "* NOOP\r\n\r\n+ LOGIN joe Secret1\r\nx\r\n";
    struct run r;

    g_secrets[0] = "Secret";
    RUN(0, in, "", &r);
    g_secrets[0] = NULL;
    ASSERT_TR(&r, "CMD |UNKNOWN||0|4\nCMD |UNKNOWN||0|4\nCMD |UNKNOWN||0|4\n"
                  "CMD x|UNKNOWN||0|0\n");
    ASSERT_OUT_IN(&r, in);
    run_free(&r);
}

/* --- server -------------------------------------------------------------------------------- */

struct srun {
    struct dstr tr, out;
    int last;
};

static const char *const kind_names[] = {"UNTAGGED", "TAGGED", "CONTINUE", "GARBAGE"};

static void sdrive(struct imap_server *p, struct dstr *hold, struct srun *r)
{
    struct guard g;
    const char *buf = guard_place(&g, hold->p, hold->n);
    size_t off = 0;

    for (;;) {
        struct imap_server_event ev;
        size_t n = imap_server_parse(p, buf + off, hold->n - off, 7, &ev);
        ASSERT(n <= hold->n - off);
        if (ev.type == IMAP_SEV_AGAIN) {
            ASSERT_EQ(n, 0);
            ASSERT(hold->n - off < IMAP_SERVER_HOLD);
            break;
        }
        ASSERT(ev.fwd == buf + off && ev.fwd_len == n && n > 0);
        dstr_add(&r->out, ev.fwd, ev.fwd_len);
        if (ev.type == IMAP_SEV_DATA) {
            if (r->last != IMAP_SEV_DATA)
                dstr_printf(&r->tr, "DATA\n");
        } else {
            const struct imap_resp *x = ev.resp;
            dstr_printf(&r->tr, "%s %s|%s|%s|%s%llu|%s|%s|%u|%llu|%llu|%u%s\n", kind_names[x->kind],
                        x->tag, imap_status_name(x->status), x->keyword, x->has_number ? "#" : "",
                        (unsigned long long)x->number, x->code, x->text, x->literals,
                        (unsigned long long)x->lit_size, (unsigned long long)x->size, x->truncated,
                        (ev.flags & IMAP_SEV_F_WHOLE) ? " whole" : "");
        }
        r->last = (int)ev.type;
        off += n;
    }
    memmove(hold->p, hold->p + off, hold->n - off);
    hold->n -= off;
    guard_free(&g);
}

static void srun_cuts(const char *in, size_t len, size_t step, size_t at, struct srun *r)
{
    struct imap_server p = {0};
    struct dstr hold = {0};

    memset(r, 0, sizeof(*r));
    r->last = -1;
    dstr_add(&hold, "", 0);
    for (size_t a = 0; a < len;) {
        size_t b = step ? a + step : (at && a < at ? at : len);
        if (b > len)
            b = len;
        dstr_add(&hold, in + a, b - a);
        sdrive(&p, &hold, r);
        a = b;
    }
    ASSERT_EQ(hold.n, 0);
    dstr_free(&hold);
}

static void run_server(const char *in, size_t len, const char *want)
{
    struct srun a, b;

    srun_cuts(in, len, 0, 0, &a);
    ASSERT_MEMEQ(a.tr.p, a.tr.n, want, strlen(want));
    ASSERT_MEMEQ(a.out.p, a.out.n, in, len);
    srun_cuts(in, len, 1, 0, &b);
    ASSERT_MEMEQ(b.tr.p, b.tr.n, a.tr.p, a.tr.n);
    ASSERT_MEMEQ(b.out.p, b.out.n, in, len);
    dstr_free(&b.tr);
    dstr_free(&b.out);
    for (size_t k = 1; k < len && len < 2000; k++) {
        srun_cuts(in, len, 0, k, &b);
        ASSERT_MEMEQ(b.tr.p, b.tr.n, a.tr.p, a.tr.n);
        dstr_free(&b.tr);
        dstr_free(&b.out);
    }
    dstr_free(&a.tr);
    dstr_free(&a.out);
}

static void test_server(void)
{
    static const char in[] =
        "* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n"
        "* 3 EXISTS\r\n"
        "* 1 FETCH (UID 5 BODY[] {19}\r\na1 OK fake\r\n* BYE\r\n FLAGS (\\Seen))\r\n"
        "* 2 fetch (BODY[1] {0}\r\n BODY[2] ~{3}\r\nabc)\r\n"
        "+ idling\r\n"
        "+\r\n"
        "a1 OK [READ-WRITE] Select completed\n"
        "a2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        "* BYE Logging out\r\n"
        "hello there\r\n";

    run_server(
        in, sizeof(in) - 1,
        "UNTAGGED |OK|OK|0|CAPABILITY|[CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.|0|0|53|0"
        " whole\n"
        "UNTAGGED ||EXISTS|#3|||0|0|12|0 whole\n"
        "DATA\nUNTAGGED ||FETCH|#1||(UID 5 BODY[] {19}|1|19|66|0\n"
        "DATA\nUNTAGGED ||FETCH|#2||(BODY[1] {0}|2|3|45|0\n"
        "CONTINUE |||0||idling|0|0|10|0 whole\n"
        "CONTINUE |||0|||0|0|3|0 whole\n"
        "TAGGED a1|OK||0|READ-WRITE|[READ-WRITE] Select completed|0|0|36|0 whole\n"
        "TAGGED a2|NO||0|AUTHENTICATIONFAILED|[AUTHENTICATIONFAILED] Authentication "
        "failed.|0|0|53|0 whole\n"
        "UNTAGGED |BYE|BYE|0||Logging out|0|0|19|0 whole\n"
        "GARBAGE |||0||hello there|0|0|13|0 whole\n");
}

static void test_server_long_line(void)
{
    /* A SEARCH result longer than the hold limit goes out as it comes, with a literal
     * announced at its very end still seen. */
    size_t len = 3 * IMAP_SERVER_HOLD;
    char *in = malloc(len + 64);
    size_t n = 0;

    ASSERT(in != NULL);
    n += (size_t)sprintf(in, "* SEARCH");
    while (n < len - 20)
        n += (size_t)sprintf(in + n, " %u", (unsigned)(n % 9));
    n += (size_t)sprintf(in + n, " {4}\r\nabcd\r\na OK done\r\n");
    struct srun a, b;
    srun_cuts(in, n, 0, 0, &a);
    ASSERT(a.out.p != NULL && a.tr.p != NULL);
    ASSERT_MEMEQ(a.out.p, a.out.n, in, n);
    ASSERT(strncmp(a.tr.p, "DATA\nUNTAGGED ||SEARCH|0||8 1 3 5", 33) == 0);
    ASSERT(strstr(a.tr.p, "|1|4|24568|1\nTAGGED a|OK||0||done|0|0|11|0 whole\n") != NULL);
    srun_cuts(in, n, 1, 0, &b);
    ASSERT_MEMEQ(b.tr.p, b.tr.n, a.tr.p, a.tr.n);
    ASSERT_MEMEQ(b.out.p, b.out.n, in, n);
    dstr_free(&a.tr);
    dstr_free(&a.out);
    dstr_free(&b.tr);
    dstr_free(&b.out);
    free(in);
}

/* --- pairs --------------------------------------------------------------------------------- */

static struct imap_pairs_entry g_fifo[IMAP_PAIRS_CAP];

static void feed_client(struct imap_client *cp, struct imap_pairs *pp, const char *s, uint64_t now)
{
    size_t len = strlen(s), off = 0;

    while (off < len) {
        struct imap_event ev;
        off += imap_client_parse(cp, s + off, len - off, &ev);
        if (ev.type == IMAP_EV_AGAIN || ev.type == IMAP_EV_WAIT)
            break;
        ASSERT_OK(imap_pairs_on_client_event(pp, &ev, now));
    }
}

/* Feeds one whole response; returns the pairs result and fills *pair. */
static enum imap_pairs_res feed_server(struct imap_server *sp, struct imap_client *cp,
                                       struct imap_pairs *pp, const char *s, uint64_t now,
                                       struct imap_pair *pair)
{
    size_t len = strlen(s), off = 0;
    enum imap_pairs_res res = IMAP_PAIRS_GARBAGE;
    bool got = false;

    while (off < len) {
        struct imap_server_event ev;
        off += imap_server_parse(sp, s + off, len - off, now, &ev);
        if (ev.type == IMAP_SEV_AGAIN)
            break;
        if (ev.type != IMAP_SEV_RESPONSE)
            continue;
        res = imap_pairs_on_response(pp, ev.resp, pair);
        got = true;
        if (ev.resp->kind == IMAP_RESP_CONTINUE)
            imap_client_on_continue(cp);
        if (ev.resp->kind == IMAP_RESP_TAGGED)
            imap_client_on_tagged(cp, ev.resp->tag, ev.resp->tag_len);
    }
    ASSERT(got);
    return res;
}

static void test_pairs(void)
{
    struct imap_client cp = {0};
    struct imap_server sp = {0};
    struct imap_pairs pp = {0};
    struct imap_pair pair;

    imap_pairs_attach(&pp, g_fifo);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "* OK [CAPABILITY IMAP4rev1] ready\r\n", 10, &pair),
              IMAP_PAIRS_GREETING);
    ASSERT_STREQ(pair.tag, "*");
    ASSERT_EQ(pair.status, IMAP_ST_OK);
    ASSERT_STREQ(pair.code, "CAPABILITY");

    feed_client(&cp, &pp, "a1 LOGIN joe {7}\r\n", 20);
    ASSERT_EQ(imap_pairs_outstanding(&pp), 1);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "+ OK\r\n", 25, &pair), IMAP_PAIRS_CONTINUE);
    feed_client(&cp, &pp, "Secret1\r\na2 SELECT INBOX\r\na3 APPEND INBOX {5+}\r\nhello\r\n", 30);
    ASSERT_EQ(imap_pairs_outstanding(&pp), 3);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a1 OK Logged in\r\n", 40, &pair), IMAP_PAIRS_MATCHED);
    ASSERT_STREQ(pair.cmd_text, "LOGIN [redacted]");
    ASSERT_EQ(pair.t_cmd, 30);
    ASSERT_EQ(pair.t_reply, 40);
    ASSERT_EQ(pair.flags, 0);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "* 5 EXISTS\r\n", 41, &pair), IMAP_PAIRS_UNTAGGED);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "* 0 RECENT\r\n", 41, &pair), IMAP_PAIRS_UNTAGGED);
    /* Out of order: APPEND first. */
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a3 OK [APPENDUID 1 2] Append completed.\r\n", 42, &pair),
              IMAP_PAIRS_MATCHED);
    ASSERT_STREQ(pair.cmd_text, "APPEND INBOX {5+}");
    ASSERT_EQ(pair.size, 5);
    ASSERT_EQ(pair.untagged, 2);
    ASSERT_EQ(pair.flags, IMAP_PAIR_F_PIPELINED);
    ASSERT_EQ(
        feed_server(&sp, &cp, &pp, "a2 NO [NONEXISTENT] Mailbox doesn't exist\r\n", 43, &pair),
        IMAP_PAIRS_MATCHED);
    ASSERT_STREQ(pair.cmd_text, "SELECT INBOX");
    ASSERT_STREQ(pair.text, "[NONEXISTENT] Mailbox doesn't exist");
    ASSERT_EQ(pair.untagged, 2);
    ASSERT_EQ(pair.flags, IMAP_PAIR_F_PIPELINED | IMAP_PAIR_F_PRIMARY);
    ASSERT(imap_pairs_summary(&pp)->has_primary);
    ASSERT(imap_pairs_summary(&pp)->auth_ok);

    /* IDLE: one pair whose time runs from the IDLE line to the tagged OK. */
    feed_client(&cp, &pp, "a4 IDLE\r\n", 100);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "+ idling\r\n", 101, &pair), IMAP_PAIRS_CONTINUE);
    ASSERT_EQ(pair.cmd, IMAP_CMD_IDLE);
    feed_server(&sp, &cp, &pp, "* 6 EXISTS\r\n", 500, &pair);
    feed_client(&cp, &pp, "DONE\r\n", 900);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a4 OK Idle completed.\r\n", 901, &pair),
              IMAP_PAIRS_MATCHED);
    ASSERT_EQ(pair.t_cmd, 100);
    ASSERT_EQ(pair.untagged, 1);

    /* AUTHENTICATE rounds, and a cancel is no primary error. */
    feed_client(&cp, &pp, "a5 AUTHENTICATE PLAIN\r\n", 1000);
    feed_server(&sp, &cp, &pp, "+ \r\n", 1001, &pair);
    feed_client(&cp, &pp, "*\r\n", 1002);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a5 BAD Authentication aborted\r\n", 1003, &pair),
              IMAP_PAIRS_MATCHED);
    ASSERT_EQ(pair.rounds, 1);
    ASSERT_EQ(pair.flags, IMAP_PAIR_F_CANCELLED);

    /* An overlong line is answered locally, in order; a tag nobody sent is unsolicited. */
    feed_client(&cp, &pp, "a6 NOOP\r\n", 1100);
    cp.max_line = 64;
    feed_client(&cp, &pp, "a7 X 012345678901234567890123456789012345678901234567890123456789\r\n",
                1101);
    ASSERT(!imap_pairs_take_local(&pp, 1102, &pair));
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "zz OK what\r\n", 1103, &pair), IMAP_PAIRS_UNSOLICITED);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a6 OK NOOP completed.\r\n", 1104, &pair),
              IMAP_PAIRS_MATCHED);
    ASSERT(imap_pairs_take_local(&pp, 1105, &pair));
    ASSERT_EQ(pair.kind, IMAP_PAIR_LOCAL);
    char line[300];
    ASSERT_EQ(imap_pairs_local_line(&pair, line, sizeof(line)), 22);
    ASSERT_STREQ(line, "a7 BAD Line too long\r\n");
    ASSERT_STREQ(pair.cmd_text, "[line too long]");

    /* A command cut short after a part went out keeps what it was for its aborted pair. */
    feed_client(&cp, &pp,
                "a8 APPEND INBOX {3+}\r\nabc"
                " 0123456789012345678901234567890123456789012345678901234567890\r\n",
                1106);
    ASSERT(imap_pairs_abort(&pp, &pair));
    ASSERT_STREQ(pair.tag, "a8");
    ASSERT_STREQ(pair.cmd_text, "APPEND INBOX {3+}");
    ASSERT_EQ(pair.size, 3);
    ASSERT(!imap_pairs_abort(&pp, &pair));

    /* The backend goes away: every outstanding tag is aborted, oldest first. */
    feed_client(&cp, &pp, "b1 NOOP\r\nb2 LOGOUT\r\n", 1200);
    ASSERT(imap_pairs_summary(&pp)->logout_sent);
    ASSERT(imap_pairs_abort(&pp, &pair));
    ASSERT_STREQ(pair.tag, "b1");
    ASSERT_EQ(pair.kind, IMAP_PAIR_ABORTED);
    ASSERT(imap_pairs_abort(&pp, &pair));
    ASSERT_STREQ(pair.tag, "b2");
    ASSERT(!imap_pairs_abort(&pp, &pair));
    ASSERT(imap_pairs_detach(&pp) == g_fifo);
}

static void test_pairs_bye(void)
{
    struct imap_client cp = {0};
    struct imap_server sp = {0};
    struct imap_pairs pp = {0};
    struct imap_pair pair;

    imap_pairs_attach(&pp, g_fifo);
    feed_server(&sp, &cp, &pp, "* OK ready\r\n", 1, &pair);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "* BYE Disconnected for inactivity.\r\n", 2, &pair),
              IMAP_PAIRS_UNTAGGED);
    ASSERT(imap_pairs_summary(&pp)->has_primary);
    ASSERT_EQ(imap_pairs_summary(&pp)->primary.status, IMAP_ST_BYE);

    /* A BYE that LOGOUT asked for is no error. */
    memset(&pp, 0, sizeof(pp));
    memset(&sp, 0, sizeof(sp));
    memset(&cp, 0, sizeof(cp));
    imap_pairs_attach(&pp, g_fifo);
    feed_server(&sp, &cp, &pp, "* OK ready\r\n", 1, &pair);
    feed_client(&cp, &pp, "a LOGOUT\r\n", 2);
    feed_server(&sp, &cp, &pp, "* BYE Logging out\r\n", 3, &pair);
    ASSERT_EQ(feed_server(&sp, &cp, &pp, "a OK Logout completed.\r\n", 4, &pair),
              IMAP_PAIRS_MATCHED);
    ASSERT_EQ(pair.untagged, 1);
    ASSERT(!imap_pairs_summary(&pp)->has_primary);
    ASSERT(imap_pairs_summary(&pp)->logout_answered);
}

/* --- capabilities, ID ----------------------------------------------------------------------- */

static void capa(const char *in, unsigned flags, const char *want)
{
    char out[512];
    ssize_t n = imap_capa_edit(in, strlen(in), flags, out, sizeof(out));

    ASSERT(n >= 0);
    ASSERT_MEMEQ(out, (size_t)n, want, strlen(want));
}

static void test_capa(void)
{
    capa("* CAPABILITY IMAP4rev1 SASL-IR STARTTLS LOGINDISABLED AUTH=PLAIN\r\n",
         IMAP_CAPA_DEL_STARTTLS | IMAP_CAPA_DEL_LOGINDISABLED,
         "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n");
    capa("* OK [CAPABILITY IMAP4rev1 SASL-IR] Dovecot ready.\r\n", IMAP_CAPA_ADD_STARTTLS,
         "* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS] Dovecot ready.\r\n");
    capa("* OK [CAPABILITY IMAP4rev1 starttls] Dovecot ready.\r\n", IMAP_CAPA_ADD_STARTTLS,
         "* OK [CAPABILITY IMAP4rev1 starttls] Dovecot ready.\r\n");
    capa("a2 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] Logged in\r\n",
         IMAP_CAPA_DEL_COMPRESS | IMAP_CAPA_DEL_STARTTLS,
         "a2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
    capa("* capability STARTTLS\n", IMAP_CAPA_DEL_STARTTLS | IMAP_CAPA_ADD_LOGINDISABLED,
         "* capability LOGINDISABLED\n");
    capa("* CAPABILITY\r\n", IMAP_CAPA_ADD_STARTTLS, "* CAPABILITY STARTTLS\r\n");
    capa("a OK [CAPABILITY] x\r\n", IMAP_CAPA_ADD_STARTTLS, "a OK [CAPABILITY STARTTLS] x\r\n");
    capa("* OK [ALERT] STARTTLS\r\n", IMAP_CAPA_DEL_STARTTLS, "* OK [ALERT] STARTTLS\r\n");
    capa("* 1 FETCH (FLAGS (STARTTLS))\r\n", IMAP_CAPA_DEL_STARTTLS,
         "* 1 FETCH (FLAGS (STARTTLS))\r\n");
    char out[8];
    ASSERT_EQ(imap_capa_edit("* CAPABILITY IMAP4rev1\r\n", 24, 0, out, sizeof(out)), -1);
    ASSERT(imap_capa_has("* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] x\r\n", 48, "COMPRESS="));
    ASSERT(!imap_capa_has("* OK [CAPABILITY IMAP4rev1] STARTTLS\r\n", 38, "STARTTLS"));

    char id[256];
    ssize_t n = imap_id_line("mx1", "192.0.2.7", 40000, "127.0.0.1", 143, id, sizeof(id));
    static const char want[] = "mx1 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" "
                               "\"40000\" \"x-connected-ip\" \"127.0.0.1\" \"x-connected-port\" "
                               "\"143\")\r\n";
    ASSERT_MEMEQ(id, (size_t)n, want, sizeof(want) - 1);
    ASSERT_EQ(imap_id_line("mx1", "a\"b", 1, "c", 2, id, sizeof(id)), -1);
    ASSERT_EQ(imap_id_line("mx1", "::1", 1, "::1", 2, id, 20), -1);
}

int main(void)
{
    test_simple();
    test_login_redaction();
    test_append_literal();
    test_authenticate();
    test_idle();
    test_starttls_compress();
    test_refused_lines();
    test_no_tag();
    test_long_lines();
    test_server();
    test_server_long_line();
    test_pairs();
    test_pairs_bye();
    test_capa();
    printf("test_imap: ok\n");
    return 0;
}
