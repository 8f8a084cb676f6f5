/* test_smtp.c: unit tests for proxy/smtp.c, the pure SMTP framing.
 *
 * Every client case runs through a driver that behaves like the session: it keeps unconsumed
 * bytes, appends the next read, and answers WAIT with scripted reply codes. Each case runs whole,
 * one byte at a time, and (for short inputs) split at every point; the transcript of events and
 * the forwarded bytes must be the same every time. The parser always reads from a copy placed
 * flush against a PROT_NONE page, so an over-read crashes.
 */
#include "smtp.h"
#include "test.h"

#include <stdarg.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <unistd.h>

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
    char tmp[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    ASSERT(n >= 0 && (size_t)n < sizeof(tmp));
    dstr_add(d, tmp, (size_t)n);
}

/* Formats into a static buffer, for expected transcripts with computed sizes. */
static const char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));

static const char *fmt(const char *f, ...)
{
    static char buf[4096];
    va_list ap;

    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    return buf;
}

static void dstr_free(struct dstr *d)
{
    free(d->p);
    memset(d, 0, sizeof(*d));
}

/* --- guard page ------------------------------------------------------------------------------ */

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
    [SMTP_EV_AGAIN] = "AGAIN",         [SMTP_EV_WAIT] = "WAIT",
    [SMTP_EV_COMMAND] = "CMD",         [SMTP_EV_AUTH_RESPONSE] = "AUTHRESP",
    [SMTP_EV_TOO_LONG] = "TOO_LONG",   [SMTP_EV_INVALID] = "INVALID",
    [SMTP_EV_DATA] = "DATA",           [SMTP_EV_DATA_END] = "END",
    [SMTP_EV_SMUGGLING] = "SMUGGLING", [SMTP_EV_BDAT_DATA] = "BDATDATA",
    [SMTP_EV_BDAT_END] = "BDATEND",    [SMTP_EV_DISCARD] = "DISCARD",
    [SMTP_EV_INJECTED] = "INJECTED",
};

static void check_secret(const char *p, size_t n)
{
    for (size_t i = 0; i < 4 && g_secrets[i] != NULL; i++)
        if (p != NULL && memmem(p, n, g_secrets[i], strlen(g_secrets[i])) != NULL)
            TEST_FAIL_("secret \"%s\" in a loggable event field", g_secrets[i]);
}

static void record(struct run *r, const struct smtp_event *ev)
{
    check_secret(ev->line, ev->line_len);
    check_secret(ev->arg, ev->arg_len);
    if (ev->reason != NULL)
        check_secret(ev->reason, strlen(ev->reason));
    ASSERT(ev->fwd_len == 0 || ev->fwd != NULL);
    dstr_add(&r->out, ev->fwd, ev->fwd_len);
    switch (ev->type) {
    case SMTP_EV_DATA:
    case SMTP_EV_BDAT_DATA:
    case SMTP_EV_DISCARD:
    case SMTP_EV_INJECTED:
        if (ev->type == SMTP_EV_DISCARD)
            r->discarded += ev->size;
        if (ev->type == SMTP_EV_INJECTED)
            r->injected += ev->size;
        if (r->last != (int)ev->type)
            dstr_printf(&r->tr, "%s\n", ev_names[ev->type]);
        break;
    case SMTP_EV_COMMAND:
        dstr_printf(&r->tr, "CMD %s|%.*s|%.*s|%llu|%x\n", smtp_cmd_name(ev->cmd), (int)ev->line_len,
                    ev->line ? ev->line : "", (int)ev->arg_len, ev->arg ? ev->arg : "",
                    (unsigned long long)ev->size, ev->flags);
        break;
    default:
        dstr_printf(&r->tr, "%s %s|%s|%llu|%x\n", ev_names[ev->type], smtp_cmd_name(ev->cmd),
                    ev->reason ? ev->reason : "", (unsigned long long)ev->size, ev->flags);
        break;
    }
    r->last = (int)ev->type;
}

struct script {
    const int *replies; /* codes answered to each WAIT, in order */
    size_t n;
    size_t next;
};

/* Feeds hold (the unconsumed bytes plus the latest read) to the parser like the session does;
 * removes what was consumed. */
static void drive(struct smtp_client *p, struct dstr *hold, struct script *sc, struct run *r)
{
    struct guard g;
    const char *buf = guard_place(&g, hold->p, hold->n);
    size_t off = 0;

    for (int guard_loop = 0;; guard_loop++) {
        struct smtp_event ev;
        size_t n;

        ASSERT(guard_loop < 10000000);
        memset(&ev, 0x5a, sizeof(ev));
        n = smtp_client_parse(p, buf + off, hold->n - off, &ev);
        ASSERT(n <= hold->n - off);
        if (ev.type == SMTP_EV_AGAIN) {
            ASSERT_EQ(n, 0);
            /* The caller never has to hold more than one line. */
            ASSERT(hold->n - off <= p->max_line);
            break;
        }
        if (ev.type == SMTP_EV_WAIT) {
            ASSERT_EQ(n, 0);
            if (sc->next == sc->n)
                break;
            dstr_printf(&r->tr, "WAIT %s=%d\n", smtp_cmd_name(ev.cmd), sc->replies[sc->next]);
            smtp_client_on_reply(p, ev.cmd, sc->replies[sc->next++]);
            r->last = SMTP_EV_WAIT;
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
static void run_cuts(const struct smtp_client_opts *o, const char *in, size_t len,
                     const size_t *cuts, size_t ncuts, const int *replies, size_t nreplies,
                     struct run *r)
{
    struct smtp_client p;
    struct dstr hold = {0};
    struct script sc = {replies, nreplies, 0};
    size_t a = 0;

    memset(r, 0, sizeof(*r));
    r->last = -1;
    smtp_client_init(&p, o);
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
static void run_client(const struct smtp_client_opts *o, const char *in, size_t len,
                       const int *replies, size_t nreplies, struct run *r)
{
    struct run s;
    size_t *cuts = calloc(len + 1, sizeof(*cuts)); /* zeroed: gcc -O2 cannot see the loop fill it */

    ASSERT(cuts != NULL);
    run_cuts(o, in, len, no_cuts, 0, replies, nreplies, r);
    for (size_t i = 0; i + 1 < len; i++)
        cuts[i] = i + 1;
    run_cuts(o, in, len, cuts, len > 0 ? len - 1 : 0, replies, nreplies, &s);
    same_run(r, &s, "byte by byte", 0);
    run_free(&s);
    if (len <= 600) {
        for (size_t k = 1; k < len; k++) {
            run_cuts(o, in, len, &k, 1, replies, nreplies, &s);
            same_run(r, &s, "split at", k);
            run_free(&s);
        }
    }
    free(cuts);
}

#define RUN(o, str, r, ...)                                                                        \
    do {                                                                                           \
        static const int replies_[] = {0, __VA_ARGS__};                                            \
        run_client((o), (str), sizeof(str) - 1, replies_ + 1,                                      \
                   sizeof(replies_) / sizeof(replies_[0]) - 1, (r));                               \
    } while (0)

#define ASSERT_TR(r, want) ASSERT_MEMEQ((r)->tr.p, (r)->tr.n, (want), strlen(want))
#define ASSERT_OUT(r, want, wlen) ASSERT_MEMEQ((r)->out.p, (r)->out.n, (want), (wlen))

static const struct smtp_client_opts opt_reject = {0, SMTP_SMUGGLING_REJECT};
static const struct smtp_client_opts opt_normalize = {0, SMTP_SMUGGLING_NORMALIZE};
static const struct smtp_client_opts opt_off = {0, SMTP_SMUGGLING_OFF};

/* --- client cases ----------------------------------------------------------------------------- */

static void test_simple_session(void)
{
    static const char in[] = "EHLO client.example\r\n"
                             "MAIL FROM:<a@b.example> SIZE=10\r\n"
                             "RCPT TO: <c@d.example>\r\n"
                             "DATA\r\n"
                             "Subject: hi\r\n\r\nbody\r\n.\r\n"
                             "rset\r\n"
                             "XYZZY plugh\r\n"
                             "QUIT\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 354);
    ASSERT_TR(&r, "CMD EHLO|EHLO client.example|client.example|0|0\n"
                  "CMD MAIL|MAIL FROM:<a@b.example> SIZE=10|a@b.example|0|0\n"
                  "CMD RCPT|RCPT TO: <c@d.example>|c@d.example|0|0\n"
                  "CMD DATA|DATA||0|0\n"
                  "WAIT DATA=354\n"
                  "DATA\n"
                  "END .||21|0\n"
                  "CMD RSET|rset||0|0\n"
                  "CMD UNKNOWN|XYZZY plugh||0|0\n"
                  "CMD QUIT|QUIT||0|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);
}

static void test_data_refused(void)
{
    /* Without a 354 the bytes after DATA are commands again. */
    static const char in[] = "DATA\r\nNOOP\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 554);
    ASSERT_TR(&r, "CMD DATA|DATA||0|0\nWAIT DATA=554\nCMD NOOP|NOOP||0|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);

    /* And until the reply comes nothing after DATA is consumed. */
    struct smtp_client p = {0};
    struct smtp_event ev;
    const char *s = "DATA\r\nbody\r\n";
    size_t n = smtp_client_parse(&p, s, strlen(s), &ev);
    ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
    ASSERT_EQ(smtp_client_parse(&p, s + n, strlen(s) - n, &ev), 0);
    ASSERT_EQ(ev.type, SMTP_EV_WAIT);
    ASSERT_EQ(ev.cmd, SMTP_CMD_DATA);
    /* Replies to other commands do not end the wait. */
    smtp_client_on_reply(&p, SMTP_CMD_MAIL, 354);
    ASSERT_EQ(smtp_client_parse(&p, s + n, strlen(s) - n, &ev), 0);
    ASSERT_EQ(ev.type, SMTP_EV_WAIT);
}

static void test_dot_stuffing(void)
{
    static const char in[] = "DATA\r\n..leading dot\r\n.\r\n..\r\nend\r\n.\r\nNOOP\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 354, 354);
    ASSERT_TR(&r, "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nEND .||15|0\n"
                  "CMD UNKNOWN|..||0|0\nCMD UNKNOWN|end||0|0\nCMD UNKNOWN|.||0|0\n"
                  "CMD NOOP|NOOP||0|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);

    /* Empty body: the CRLF of the DATA line counts as the one before the dot. */
    static const char empty[] = "DATA\r\n.\r\n";
    RUN(&opt_reject, empty, &r, 354);
    ASSERT_TR(&r, "CMD DATA|DATA||0|0\nWAIT DATA=354\nEND .||0|0\n");
    ASSERT_OUT(&r, empty, sizeof(empty) - 1);
    run_free(&r);
}

struct delim {
    const char *bytes;
    const char *name;
};

static const struct delim delims[] = {{"\r\n", "CRLF"}, {"\n", "LF"}, {"\r", "CR"}};

/* Every lone dot with a bare CR or LF on either side, in all three modes. */
static void test_smuggling_patterns(void)
{
    for (size_t b = 0; b < 3; b++) {
        for (size_t a = 0; a < 3; a++) {
            const char *before = delims[b].bytes, *after = delims[a].bytes;
            char pattern[32], in[256], want[512], tr[1024];
            struct dstr body = {0};
            struct run r;
            static const int replies[] = {354};
            size_t body_size;

            if (a == 0 && b == 0)
                continue;
            snprintf(pattern, sizeof(pattern), "%s.%s", delims[b].name, delims[a].name);
            snprintf(in, sizeof(in),
                     "DATA\r\nx%s.%sMAIL FROM:<evil@example>\r\nsecond\r\n.\r\nQUIT\r\n", before,
                     after);
            body_size = strlen(in) - strlen("DATA\r\n") - strlen(".\r\nQUIT\r\n");

            /* reject: nothing from the dot on reaches the backend, the real end is swallowed */
            run_client(&opt_reject, in, strlen(in), replies, 1, &r);
            snprintf(tr, sizeof(tr),
                     "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |%s|0|0\nDISCARD\n"
                     "END .||%zu|8\nCMD QUIT|QUIT||0|0\n",
                     pattern, body_size);
            ASSERT_TR(&r, tr);
            snprintf(want, sizeof(want), "DATA\r\nx%sQUIT\r\n", before);
            ASSERT_OUT(&r, want, strlen(want));
            ASSERT_EQ(r.discarded, body_size - 1 - strlen(before));
            run_free(&r);

            /* normalize: CRLF everywhere, the lone dot stuffed: one message for the backend */
            run_client(&opt_normalize, in, strlen(in), replies, 1, &r);
            snprintf(tr, sizeof(tr),
                     "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |%s|0|0\nDATA\n"
                     "END .||%zu|0\nCMD QUIT|QUIT||0|0\n",
                     pattern, body_size);
            ASSERT_TR(&r, tr);
            dstr_add(&body,
                     "DATA\r\nx\r\n..\r\nMAIL FROM:<evil@example>\r\nsecond\r\n.\r\n"
                     "QUIT\r\n",
                     strlen("DATA\r\nx\r\n..\r\nMAIL FROM:<evil@example>\r\nsecond\r\n.\r\n"
                            "QUIT\r\n"));
            ASSERT_OUT(&r, body.p, body.n);
            dstr_free(&body);
            run_free(&r);

            /* off: byte for byte, the parser still ends only at CRLF.CRLF */
            run_client(&opt_off, in, strlen(in), replies, 1, &r);
            snprintf(tr, sizeof(tr),
                     "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nEND .||%zu|0\n"
                     "CMD QUIT|QUIT||0|0\n",
                     body_size);
            ASSERT_TR(&r, tr);
            ASSERT_OUT(&r, in, strlen(in));
            run_free(&r);
        }
    }
}

static void test_smuggling_more(void)
{
    struct run r;

    /* A bare CR pair after the dot, and a pattern right at the start of the body. */
    static const char in1[] = "DATA\r\n\n.\r\nx\r\n.\r\n";
    RUN(&opt_reject, in1, &r, 354);
    ASSERT_TR(&r, "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |LF.CRLF|0|0\n"
                  "DISCARD\nEND .||7|8\n");
    ASSERT_OUT(&r, "DATA\r\n\n", 7);
    run_free(&r);

    static const char in2[] = "DATA\r\na\r\n.\r\r\n.\r\n";
    RUN(&opt_normalize, in2, &r, 354);
    ASSERT_OUT(&r, "DATA\r\na\r\n..\r\n\r\n.\r\n", 18);
    run_free(&r);

    /* "\r\n.\r\n" inside a swallowed message after a bare-LF dot: the real end is the first
     * proper CRLF.CRLF, even right after the pattern. */
    static const char in3[] = "DATA\r\n\n.\r\n.\r\nNOOP\r\n";
    RUN(&opt_reject, in3, &r, 354);
    ASSERT_TR(&r, "CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |LF.CRLF|0|0\n"
                  "DISCARD\nEND .||4|8\nCMD NOOP|NOOP||0|0\n");
    run_free(&r);
}

static void test_bare_lf_elsewhere(void)
{
    static const char in[] = "DATA\r\nline1\nline2\rline3\r\n..\n.x\n\r\n.\r\n";
    struct run r;

    size_t body = strlen("line1\nline2\rline3\r\n..\n.x\n\r\n");
    RUN(&opt_reject, in, &r, 354);
    ASSERT_TR(&r, fmt("CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nEND .||%zu|0\n", body));
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);

    RUN(&opt_off, in, &r, 354);
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);

    /* normalize: every bare line end is CRLF, and ".x", which now begins a line, is stuffed */
    static const char want[] = "DATA\r\nline1\r\nline2\r\nline3\r\n..\r\n..x\r\n\r\n.\r\n";
    RUN(&opt_normalize, in, &r, 354);
    ASSERT_TR(&r, fmt("CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nEND .||%zu|0\n", body));
    ASSERT_OUT(&r, want, sizeof(want) - 1);
    run_free(&r);
}

/* Un-stuffs a body as a server does (RFC 5321 4.5.2): the first of two leading dots goes. */
static void unstuff(const char *in, size_t len, struct dstr *out)
{
    for (size_t i = 0; i < len;) {
        const char *lf = memchr(in + i, '\n', len - i);
        size_t end = lf != NULL ? (size_t)(lf - in) + 1 : len;
        size_t skip = in[i] == '.' ? 1 : 0;
        dstr_add(out, in + i + skip, end - i - skip);
        i = end;
    }
}

/* smuggling = normalize: one rule, Postfix's: every bare CR or LF in a body becomes CRLF. A
 * line that begins after such a rewritten line end was never dot-stuffed by the client, so a
 * dot at its start is stuffed: after the backend un-stuffs, no byte of the text is lost. */
static void test_normalize_keeps_every_byte(void)
{
    static const struct {
        const char *body; /* what the client sends after DATA, up to its CRLF.CRLF */
        const char *fwd;  /* what the backend gets */
        const char *text; /* what the backend stores after un-stuffing */
        const char *pattern;
    } cases[] = {
        /* The issue's two examples. */
        {"a\nb\r\n", "a\r\nb\r\n", "a\r\nb\r\n", NULL},
        {"a\n.foo\r\n", "a\r\n..foo\r\n", "a\r\n.foo\r\n", NULL},
        /* The same with a bare CR, with a stuffed-looking line, at the start of the body. */
        {"a\r.foo\r\n", "a\r\n..foo\r\n", "a\r\n.foo\r\n", NULL},
        {"a\n..foo\r\n", "a\r\n...foo\r\n", "a\r\n..foo\r\n", NULL},
        {"\n.foo\r\n", "\r\n..foo\r\n", "\r\n.foo\r\n", NULL},
        /* A dot the client stuffed after a real CRLF stays as it is. */
        {"a\r\n..foo\nb\r\n", "a\r\n..foo\r\nb\r\n", "a\r\n.foo\r\nb\r\n", NULL},
        /* End-of-data look-alikes: each lone dot is kept as a "." line of the message. */
        {"a\n.\r\nb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "LF.CRLF"},
        {"a\r\n.\nb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "CRLF.LF"},
        {"a\n.\nb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "LF.LF"},
        {"a\r.\rb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "CR.CR"},
        {"a\r.\r\nb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "CR.CRLF"},
        {"a\n.\rb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "LF.CR"},
        {"a\r\n.\rb\r\n", "a\r\n..\r\nb\r\n", "a\r\n.\r\nb\r\n", "CRLF.CR"},
        /* A look-alike right before the real end. */
        {"a\n.\r\n", "a\r\n..\r\n", "a\r\n.\r\n", "LF.CRLF"},
        /* A bare LF as the last line end of the body: the real end still needs CRLF.CRLF. */
        {"a\n\r\n", "a\r\n\r\n", "a\r\n\r\n", NULL},
    };
    static const int replies[] = {354};

    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        struct dstr in = {0}, want = {0}, text = {0};
        struct run r;

        dstr_printf(&in, "DATA\r\n%s.\r\nQUIT\r\n", cases[k].body);
        dstr_printf(&want, "DATA\r\n%s.\r\nQUIT\r\n", cases[k].fwd);
        run_client(&opt_normalize, in.p, in.n, replies, 1, &r);
        ASSERT_OUT(&r, want.p, want.n);
        if (cases[k].pattern != NULL)
            ASSERT_TR(&r, fmt("CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |%s|0|0\n"
                              "DATA\nEND .||%zu|0\nCMD QUIT|QUIT||0|0\n",
                              cases[k].pattern, strlen(cases[k].body)));
        else
            ASSERT_TR(&r, fmt("CMD DATA|DATA||0|0\nWAIT DATA=354\nDATA\nEND .||%zu|0\n"
                              "CMD QUIT|QUIT||0|0\n",
                              strlen(cases[k].body)));
        dstr_add(&text, "", 0);
        unstuff(cases[k].fwd, strlen(cases[k].fwd), &text);
        ASSERT_MEMEQ(text.p, text.n, cases[k].text, strlen(cases[k].text));
        run_free(&r);
        dstr_free(&in);
        dstr_free(&want);
        dstr_free(&text);
    }
}

static void test_bdat(void)
{
    static const char in[] = "BDAT 12\r\nab\r\n.\r\ncd\r\n\n"
                             "BDAT 5 last\r\n\n.\n\r\n"
                             "BDAT 0 LAST\r\n"
                             "BDAT x\r\n"
                             "QUIT\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 0);
    ASSERT_TR(&r, "CMD BDAT|BDAT 12||12|0\nBDATDATA\nBDATEND BDAT||12|0\n"
                  "CMD BDAT|BDAT 5 last||5|1\nBDATDATA\nBDATEND BDAT||5|1\n"
                  "CMD BDAT|BDAT 0 LAST||0|1\nBDATEND BDAT||0|1\n"
                  "CMD BDAT|BDAT x||0|10\n"
                  "CMD QUIT|QUIT||0|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);
}

static void test_auth(void)
{
    struct run r;

    /* PLAIN with an initial response: the log text stops at the mechanism. */
    static const char plain[] = "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b>\r\n";
    g_secrets[0] = "AGFsaWNlAHNlY3JldA==";
    RUN(&opt_reject, plain, &r, 235);
    ASSERT_TR(&r,
              "CMD AUTH|AUTH PLAIN|PLAIN|0|2\nWAIT AUTH=235\nCMD MAIL|MAIL FROM:<a@b>|a@b|0|0\n");
    ASSERT_OUT(&r, plain, sizeof(plain) - 1);
    run_free(&r);

    /* LOGIN with two 334 rounds: credential lines are forwarded, never logged. */
    static const char login[] = "AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nQUIT\r\n";
    g_secrets[0] = "YWxpY2U=";
    g_secrets[1] = "c2VjcmV0";
    RUN(&opt_reject, login, &r, 334, 334, 235);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|0|0\nWAIT AUTH=334\nAUTHRESP AUTH||0|0\n"
                  "WAIT AUTH=334\nAUTHRESP AUTH||0|0\nWAIT AUTH=235\nCMD QUIT|QUIT||0|0\n");
    ASSERT_OUT(&r, login, sizeof(login) - 1);
    run_free(&r);

    /* Without the 334 the credential line would have been a command: the parser holds it. */
    static const char early[] = "AUTH LOGIN\r\nYWxpY2U=\r\n";
    RUN(&opt_reject, early, &r);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|0|0\n");
    run_free(&r);

    /* Cancelled with "*". */
    static const char cancel[] = "AUTH LOGIN\r\n*\r\nQUIT\r\n";
    RUN(&opt_reject, cancel, &r, 334, 501);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|0|0\nWAIT AUTH=334\nAUTHRESP AUTH||0|4\n"
                  "WAIT AUTH=501\nCMD QUIT|QUIT||0|0\n");
    run_free(&r);

    /* An overlong credential line is replaced by a cancel, not answered locally. */
    static const struct smtp_client_opts small = {32, SMTP_SMUGGLING_REJECT};
    static const char longcred[] = "AUTH LOGIN\r\n"
                                   "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\r\nQUIT\r\n";
    RUN(&small, longcred, &r, 334, 501);
    ASSERT_TR(&r, "CMD AUTH|AUTH LOGIN|LOGIN|0|0\nWAIT AUTH=334\n"
                  "TOO_LONG AUTH|line too long|0|4\nDISCARD\nWAIT AUTH=501\nCMD QUIT|QUIT||0|0\n");
    ASSERT_OUT(&r, "AUTH LOGIN\r\n*\r\nQUIT\r\n", 21);
    run_free(&r);

    /* Refused before any 334 with the response sent anyway: that one-word line still goes to
     * the server, which answers it, but its text is never loggable. A verb after a refused
     * AUTH, and a word later on, are commands as ever. */
    static const char piped[] = "AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nAUTH PLAIN\r\nNOOP\r\n"
                                "xyzzy\r\n";
    g_secrets[0] = "AGFsaWNlAHNlY3JldA==";
    g_secrets[1] = NULL;
    RUN(&opt_reject, piped, &r, 504, 504);
    ASSERT_TR(&r, "CMD AUTH|AUTH PLAIN|PLAIN|0|0\nWAIT AUTH=504\nCMD UNKNOWN|[redacted]||0|0\n"
                  "CMD AUTH|AUTH PLAIN|PLAIN|0|0\nWAIT AUTH=504\nCMD NOOP|NOOP||0|0\n"
                  "CMD UNKNOWN|xyzzy||0|0\n");
    ASSERT_OUT(&r, piped, sizeof(piped) - 1);
    run_free(&r);
    memset(g_secrets, 0, sizeof(g_secrets));
}

/* AUTH is recognised as a server's tokenizer reads it: any leading blanks, any run of SP, HTAB
 * (VT, FF) between tokens, any case. The loggable text stops at the mechanism name, whatever
 * separates the credential from it; credential lines after 334 are never loggable. */
static void test_auth_tokenizer(void)
{
    static const struct {
        const char *line; /* the AUTH line, CRLF excluded */
        const char *text; /* ev.line */
        const char *mech; /* ev.arg */
        unsigned flags;
    } cases[] = {
        {"AUTH\tPLAIN AGFsaWNlAHNlY3JldA==", "AUTH\tPLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {" AUTH PLAIN AGFsaWNlAHNlY3JldA==", " AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"\t \tAUTH PLAIN AGFsaWNlAHNlY3JldA==", "\t \tAUTH PLAIN", "PLAIN",
         SMTP_EV_F_AUTH_INITIAL},
        {"AUTH PLAIN\tAGFsaWNlAHNlY3JldA==", "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"auth  plain   AGFsaWNlAHNlY3JldA==", "auth  plain", "plain", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH PLAIN \t AGFsaWNlAHNlY3JldA== ", "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH PLAIN\vAGFsaWNlAHNlY3JldA==", "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH PLAIN\fAGFsaWNlAHNlY3JldA==", "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        /* Python's str.split() also splits at \x1c-\x1f (aiosmtpd splits AUTH arguments so) */
        {"AUTH PLAIN\x1c"
         "AGFsaWNlAHNlY3JldA==",
         "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH PLAIN=", "AUTH PLAIN", "PLAIN", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH SCRAM-SHA-256 biwsbj1hbGljZSxyPXNlY3JldA==", "AUTH SCRAM-SHA-256", "SCRAM-SHA-256",
         SMTP_EV_F_AUTH_INITIAL},
        /* No mechanism name, or one too long for SASL: nothing after the verb is shown. */
        {"AUTH +AGFsaWNlAHNlY3JldA==", "AUTH", "", SMTP_EV_F_AUTH_INITIAL},
        {"AUTH AGFsaWNlAHNlY3JldAAGFsaWNlAHNlY3JldA", "AUTH", "", SMTP_EV_F_AUTH_INITIAL},
        /* Without an initial response. */
        {"AUTH\tLOGIN", "AUTH\tLOGIN", "LOGIN", 0},
        {"\tauth login\t ", "\tauth login", "login", 0},
        {"AUTH PLAIN", "AUTH PLAIN", "PLAIN", 0},
    };

    g_secrets[0] = "AGFsaWNlAHNlY3JldA";
    g_secrets[1] = "YWxpY2U=";
    g_secrets[2] = "c2VjcmV0";
    g_secrets[3] = "biwsbj1hbGljZSxyPXNlY3JldA";
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        struct dstr in = {0};
        struct run r;
        static const int replies[] = {334, 334, 235};

        /* A LOGIN-style exchange follows every line: whatever the server answers, the next
         * lines are credentials, never commands. */
        dstr_printf(&in, "%s\r\nYWxpY2U=\r\nc2VjcmV0\r\nQUIT\r\n", cases[k].line);
        run_client(&opt_reject, in.p, in.n, replies, 3, &r);
        ASSERT_TR(&r, fmt("CMD AUTH|%s|%s|0|%x\nWAIT AUTH=334\nAUTHRESP AUTH||0|0\n"
                          "WAIT AUTH=334\nAUTHRESP AUTH||0|0\nWAIT AUTH=235\n"
                          "CMD QUIT|QUIT||0|0\n",
                          cases[k].text, cases[k].mech, cases[k].flags));
        ASSERT_OUT(&r, in.p, in.n); /* forwarded byte for byte */
        run_free(&r);
        dstr_free(&in);
    }
    memset(g_secrets, 0, sizeof(g_secrets));
}

/* The verb and the tokens after it are split the same way for every command, so a DATA, BDAT
 * or STARTTLS that a server obeys is never read as an unknown line (the body would then be
 * taken for commands and escape the smuggling guard). Well-formed lines are unchanged. */
static void test_verb_blanks(void)
{
    static const char in[] = " DATA\r\nx\n.\r\n.\r\n"
                             "DATA\t\r\ny\r\n.\r\n"
                             "MAIL\tFROM:\t<a@b>\r\nRCPT TO:c@d\t\r\nEHLO\tname\t\r\n"
                             "BDAT\t3\tLAST\r\nabc"
                             "\tSTARTTLS\r\nNOOP\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 354, 354);
    ASSERT_TR(&r, "CMD DATA| DATA||0|0\nWAIT DATA=354\nDATA\nSMUGGLING |LF.CRLF|0|0\n"
                  "DISCARD\nEND .||5|8\n"
                  "CMD DATA|DATA\t||0|0\nWAIT DATA=354\nDATA\nEND .||3|0\n"
                  "CMD MAIL|MAIL\tFROM:\t<a@b>|a@b|0|0\nCMD RCPT|RCPT TO:c@d\t|c@d|0|0\n"
                  "CMD EHLO|EHLO\tname\t|name|0|0\n"
                  "CMD BDAT|BDAT\t3\tLAST||3|1\nBDATDATA\nBDATEND BDAT||3|1\n"
                  "CMD STARTTLS|\tSTARTTLS||0|0\nINJECTED\n");
    run_free(&r);
}

static void test_overlong_and_invalid(void)
{
    static const struct smtp_client_opts small = {32, SMTP_SMUGGLING_REJECT};
    struct run r;

    /* 32 bytes with CRLF is fine, 33 is not; the parser resyncs after the LF. */
    /* "NOOP " + 25 = 30 bytes + CRLF = 32; one more is 33. */
    static const char in[] = "NOOP xxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
                             "NOOP yyyyyyyyyyyyyyyyyyyyyyyyyy\r\n"
                             "NOOP\r\n";
    RUN(&small, in, &r);
    ASSERT_TR(&r, "CMD NOOP|NOOP xxxxxxxxxxxxxxxxxxxxxxxxx||0|0\n"
                  "TOO_LONG |line too long|0|0\nDISCARD\nCMD NOOP|NOOP||0|0\n");
    ASSERT_OUT(&r, "NOOP xxxxxxxxxxxxxxxxxxxxxxxxx\r\nNOOP\r\n", 38);
    ASSERT_EQ(r.discarded, 1);
    run_free(&r);

    static const char bad[] = "NOOP\nNO\rOP\r\nNO\0P\r\nQUIT\r\r\nQUIT\r\n";
    RUN(&opt_reject, bad, &r);
    ASSERT_TR(&r, "INVALID |bare LF|0|0\nINVALID |bare CR|0|0\nINVALID |NUL|0|0\n"
                  "INVALID |bare CR|0|0\nCMD QUIT|QUIT||0|0\n");
    ASSERT_OUT(&r, "QUIT\r\n", 6);
    run_free(&r);

    /* The default limit, with a line far beyond it and no LF for a long while. */
    struct dstr big = {0};
    for (int i = 0; i < 9000; i++)
        dstr_add(&big, "A", 1);
    dstr_add(&big, "\r\nHELO x\r\n", 10);
    run_cuts(&opt_reject, big.p, big.n, no_cuts, 0, NULL, 0, &r);
    ASSERT_TR(&r, "TOO_LONG |line too long|0|0\nDISCARD\nCMD HELO|HELO x|x|0|0\n");
    ASSERT_EQ(r.discarded, 9002 - SMTP_DEFAULT_MAX_LINE);
    ASSERT_OUT(&r, "HELO x\r\n", 8);
    struct run s;
    size_t cuts[] = {1000, 4095, 4096, 4097, 8000};
    run_cuts(&opt_reject, big.p, big.n, cuts, 5, NULL, 0, &s);
    same_run(&r, &s, "big", 0);
    run_free(&s);
    run_free(&r);
    dstr_free(&big);
}

static void test_starttls(void)
{
    static const char in[] = "EHLO a\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<y@z>\r\n";
    struct run r;

    RUN(&opt_reject, in, &r);
    ASSERT_TR(&r, "CMD EHLO|EHLO a|a|0|0\nCMD STARTTLS|STARTTLS||0|0\nINJECTED\n");
    ASSERT_EQ(r.injected, strlen("MAIL FROM:<evil@x>\r\nRCPT TO:<y@z>\r\n"));
    ASSERT_OUT(&r, "EHLO a\r\nSTARTTLS\r\n", 18);
    run_free(&r);

    /* After the reply the parser reads commands again (inside TLS). */
    struct smtp_client p = {0};
    struct smtp_event ev;
    const char *s = "STARTTLS\r\nNOOP\r\n";
    size_t n = smtp_client_parse(&p, s, strlen(s), &ev);
    ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
    ASSERT_EQ(ev.cmd, SMTP_CMD_STARTTLS);
    ASSERT_EQ(smtp_client_parse(&p, s + n, strlen(s) - n, &ev), 6);
    ASSERT_EQ(ev.type, SMTP_EV_INJECTED);
    ASSERT_EQ(ev.size, 6);
    ASSERT_EQ(ev.fwd_len, 0);
    ASSERT_EQ(p.injected, 6);
    smtp_client_on_reply(&p, SMTP_CMD_STARTTLS, 220);
    ASSERT_EQ(smtp_client_parse(&p, "EHLO b\r\n", 8, &ev), 8);
    ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
    ASSERT_EQ(ev.cmd, SMTP_CMD_EHLO);
}

static void test_xclient(void)
{
    static const char in[] = "XCLIENT ADDR=192.0.2.1 NAME=client.example\r\nEHLO x\r\n";
    struct run r;

    /* The server greets anew; what the client sent meanwhile is read after that. */
    RUN(&opt_reject, in, &r, 220);
    ASSERT_TR(&r, "CMD XCLIENT|XCLIENT ADDR=192.0.2.1 NAME=client.example||0|0\n"
                  "WAIT XCLIENT=220\nCMD EHLO|EHLO x|x|0|0\n");
    ASSERT_OUT(&r, in, sizeof(in) - 1);
    run_free(&r);
}

static void test_verbs(void)
{
    static const char in[] = "helo a\r\nEhLo b \r\nMAIL FROM:<>\r\nRCPT TO:c@d\r\nRCPT x\r\n"
                             "VRFY a\r\nEXPN b\r\nHELP\r\nNOOP\r\nRSET\r\nDATAX\r\nSTARTTLSX\r\n"
                             "\r\nAUTH\r\n";
    struct run r;

    RUN(&opt_reject, in, &r, 503);
    ASSERT_TR(&r, "CMD HELO|helo a|a|0|0\nCMD EHLO|EhLo b |b|0|0\nCMD MAIL|MAIL FROM:<>||0|0\n"
                  "CMD RCPT|RCPT TO:c@d|c@d|0|0\nCMD RCPT|RCPT x||0|10\nCMD VRFY|VRFY a||0|0\n"
                  "CMD EXPN|EXPN b||0|0\nCMD HELP|HELP||0|0\nCMD NOOP|NOOP||0|0\n"
                  "CMD RSET|RSET||0|0\nCMD UNKNOWN|DATAX||0|0\nCMD UNKNOWN|STARTTLSX||0|0\n"
                  "CMD UNKNOWN|||0|0\nCMD AUTH|AUTH||0|0\nWAIT AUTH=503\n");
    run_free(&r);
    ASSERT_STREQ(smtp_cmd_name(SMTP_CMD_DOT), ".");
    ASSERT_STREQ(smtp_cmd_name((enum smtp_cmd)999), "");
}

/* 100 MB without a newline, with NULs and invalid UTF-8, as a command line and as a DATA body:
 * the caller never holds more than one line, and nothing of the command line goes out. */
static void test_client_bounded(void)
{
    enum { CHUNK = 1 << 16, TOTAL = 100 << 20 };
    char *chunk = malloc(CHUNK + SMTP_DEFAULT_MAX_LINE);
    struct smtp_client p = {0};
    size_t held = 0;
    uint64_t dropped = 0, forwarded = 0;

    ASSERT(chunk != NULL);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            /* A body this time. */
            struct smtp_event ev;
            smtp_client_init(&p, NULL);
            ASSERT_EQ(smtp_client_parse(&p, "DATA\r\n", 6, &ev), 6);
            smtp_client_on_reply(&p, ev.cmd, 354);
            held = 0;
        }
        for (size_t done = 0; done < TOTAL; done += CHUNK) {
            for (size_t i = 0; i < CHUNK; i++)
                chunk[held + i] = (char)("\0\xff\xc3"
                                         "A"[i % 4]);
            size_t len = held + CHUNK, off = 0;
            for (;;) {
                struct smtp_event ev;
                size_t n = smtp_client_parse(&p, chunk + off, len - off, &ev);
                if (ev.type == SMTP_EV_AGAIN)
                    break;
                ASSERT(ev.type == SMTP_EV_TOO_LONG || ev.type == SMTP_EV_DISCARD ||
                       ev.type == SMTP_EV_DATA);
                if (ev.type == SMTP_EV_DATA)
                    forwarded += ev.fwd_len;
                else
                    dropped += n;
                ASSERT_EQ(pass == 1, ev.type == SMTP_EV_DATA);
                off += n;
            }
            held = len - off;
            ASSERT(held <= SMTP_DEFAULT_MAX_LINE);
            memmove(chunk, chunk + off, held);
        }
    }
    ASSERT_EQ(dropped, (uint64_t)TOTAL);
    ASSERT_EQ(forwarded, (uint64_t)TOTAL);
    free(chunk);
}

/* --- server cases ------------------------------------------------------------------------------
 */

static void server_transcript(const char *in, size_t len, const size_t *cuts, size_t ncuts,
                              struct dstr *tr)
{
    struct smtp_server p = {0};
    size_t a = 0;

    for (size_t i = 0; i <= ncuts; i++) {
        size_t b = i < ncuts ? cuts[i] : len;
        struct guard g;
        const char *buf = guard_place(&g, in + a, b - a);
        size_t off = 0;
        for (;;) {
            struct smtp_server_event ev;
            size_t n = smtp_server_parse(&p, buf + off, b - a - off, 7, &ev);
            ASSERT(n <= b - a - off);
            off += n;
            if (ev.type == SMTP_SEV_AGAIN) {
                ASSERT_EQ(off, b - a);
                break;
            }
            const struct smtp_reply *r = ev.reply;
            ASSERT(r->text_len <= SMTP_REPLY_TEXT_MAX);
            ASSERT_EQ(r->text[r->text_len], '\0');
            ASSERT_EQ(r->t_first, 7);
            dstr_printf(tr, "%s %d|%s|%.*s|%u|%d|%llu\n", ev.type == SMTP_SEV_REPLY ? "R" : "G",
                        r->code, r->esc, (int)r->text_len, r->text, r->lines, r->truncated,
                        (unsigned long long)r->size);
        }
        guard_free(&g);
        a = b;
    }
}

static void run_server(const char *in, size_t len, struct dstr *tr)
{
    struct dstr s = {0};
    size_t *cuts = malloc((len + 1) * sizeof(*cuts));

    ASSERT(cuts != NULL);
    server_transcript(in, len, no_cuts, 0, tr);
    for (size_t i = 0; i + 1 < len; i++)
        cuts[i] = i + 1;
    server_transcript(in, len, cuts, len > 0 ? len - 1 : 0, &s);
    ASSERT_MEMEQ(s.p, s.n, tr->p, tr->n);
    for (size_t k = 1; k < len && len <= 600; k++) {
        s.n = 0;
        server_transcript(in, len, &k, 1, &s);
        ASSERT_MEMEQ(s.p, s.n, tr->p, tr->n);
    }
    dstr_free(&s);
    free(cuts);
}

#define ASSERT_SERVER(in, want)                                                                    \
    do {                                                                                           \
        struct dstr tr_ = {0};                                                                     \
        run_server((in), sizeof(in) - 1, &tr_);                                                    \
        ASSERT_MEMEQ(tr_.p, tr_.n, (want), strlen(want));                                          \
        dstr_free(&tr_);                                                                           \
    } while (0)

static void test_server_replies(void)
{
    static const char ehlo[] = "220 mx.example ESMTP\r\n"
                               "250-mx.example Hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n";
    ASSERT_SERVER(ehlo, "R 220||mx.example ESMTP|1|0|22\nR 250||mx.example Hello|3|0|53\n");

    static const char esc[] = "550 5.1.1 <c@d>: User unknown\r\n"
                              "250 2.0.0\r\n"
                              "550 2.1.1 wrong class\r\n"
                              "451 4.3.0x not one\r\n"
                              "250 2.1234.5 too long\r\n"
                              "354 End data with <CR><LF>.<CR><LF>\r\n"
                              "250\r\n"
                              "221 bye\n"
                              "421-4.4.2 first\r\n421 4.4.2 second\r\n";
    ASSERT_SERVER(esc, "R 550|5.1.1|<c@d>: User unknown|1|0|31\n"
                       "R 250|2.0.0||1|0|11\n"
                       "R 550||2.1.1 wrong class|1|0|23\n"
                       "R 451||4.3.0x not one|1|0|20\n"
                       "R 250||2.1234.5 too long|1|0|23\n"
                       "R 354||End data with <CR><LF>.<CR><LF>|1|0|37\n"
                       "R 250|||1|0|5\n"
                       "R 221||bye|1|0|8\n"
                       "R 421|4.4.2|first|2|0|35\n");

    /* CRs inside the first line's text are text; the one before the LF is not, wherever a
     * read ends. Continuation lines are only counted. */
    static const char crs[] = "250-a\rb\r\r\n250-\rskip\r\n250 c\r\n"
                              "554 \r\n";
    ASSERT_SERVER(crs, "R 250||a\rb\r|3|0|28\nR 554|||1|0|6\n");
}

/* A first line longer than the text kept: cut at SMTP_REPLY_TEXT_MAX and marked, whatever
 * the reads. */
static void test_server_long_text(void)
{
    char in[SMTP_REPLY_TEXT_MAX + 64], want[SMTP_REPLY_TEXT_MAX + 64];
    size_t n = 0;

    memcpy(in, "250 ", 4);
    n = 4;
    for (size_t i = 0; i < SMTP_REPLY_TEXT_MAX + 20; i++)
        in[n++] = (char)('a' + i % 26);
    memcpy(in + n, "\r\n", 2);
    n += 2;
    struct dstr tr = {0};
    run_server(in, n, &tr);
    int k = snprintf(want, sizeof(want), "R 250||%.*s|1|1|%zu\n", SMTP_REPLY_TEXT_MAX, in + 4, n);
    ASSERT_MEMEQ(tr.p, tr.n, want, (size_t)k);
    dstr_free(&tr);
}

static void test_server_garbage(void)
{
    static const char in[] = "HTTP/1.1 400 Bad Request\r\n"
                             "250-a\r\n251 b\r\n"
                             "25\r\n"
                             "250xok\r\n"
                             "\r\n"
                             "250 fine\r\n";
    ASSERT_SERVER(in, "G 0||HTTP/1.1 400 Bad Request|1|0|26\n"
                      "G 0||251 b|1|0|14\n"
                      "G 0||25|1|0|4\n"
                      "G 0||250xok|1|0|8\n"
                      "G 0|||1|0|2\n"
                      "R 250||fine|1|0|10\n");

    /* 100 kB without a newline, NULs and invalid UTF-8: bounded, counted, truncated. */
    struct dstr big = {0}, tr = {0};
    dstr_add(&big, "250 ", 4);
    for (int i = 0; i < 100000; i++)
        dstr_add(&big, i % 3 ? "\xff" : "\0", 1);
    dstr_add(&big, "\r\n", 2);
    server_transcript(big.p, big.n, no_cuts, 0, &tr);
    ASSERT_EQ(tr.n > 0, 1);
    struct smtp_server p = {0};
    struct smtp_server_event ev;
    ASSERT_EQ(smtp_server_parse(&p, big.p, big.n, 1, &ev), big.n);
    ASSERT_EQ(ev.type, SMTP_SEV_REPLY);
    ASSERT_EQ(ev.reply->code, 250);
    ASSERT_EQ(ev.reply->text_len, SMTP_REPLY_TEXT_MAX);
    ASSERT_EQ(ev.reply->truncated, 1);
    ASSERT_EQ(ev.reply->size, big.n);
    dstr_free(&big);
    dstr_free(&tr);
}

static void test_server_timing(void)
{
    struct smtp_server p = {0};
    struct smtp_server_event ev;

    /* t_first is the time of the read that held the reply's first byte. */
    ASSERT_EQ(smtp_server_parse(&p, "250-a\r\n", 7, 100, &ev), 7);
    ASSERT_EQ(ev.type, SMTP_SEV_AGAIN);
    ASSERT_EQ(smtp_server_parse(&p, "250 b\r\n2", 8, 200, &ev), 7);
    ASSERT_EQ(ev.type, SMTP_SEV_REPLY);
    ASSERT_EQ(ev.reply->t_first, 100);
    ASSERT_EQ(ev.reply->lines, 2);
    ASSERT_EQ(smtp_server_parse(&p, "2", 1, 300, &ev), 1);
    ASSERT_EQ(smtp_server_parse(&p, "50 c\r\n", 6, 400, &ev), 6);
    ASSERT_EQ(ev.reply->t_first, 300);
}

static void expect_ehlo(const char *in, bool add, const char *want)
{
    char out[512];
    ssize_t n = smtp_ehlo_rewrite(in, strlen(in), add, out, sizeof(out));
    if (want == NULL) {
        ASSERT_EQ(n, -1);
        return;
    }
    ASSERT(n >= 0);
    ASSERT_MEMEQ(out, (size_t)n, want, strlen(want));
}

static void expect_helo(const char *in, const char *want)
{
    char out[64];
    ssize_t n = smtp_helo_reply(in, strlen(in), out, sizeof(out));
    if (want == NULL) {
        ASSERT_EQ(n, -1);
        return;
    }
    ASSERT(n >= 0);
    ASSERT_MEMEQ(out, (size_t)n, want, strlen(want));
}

/* The single-line HELO form of a cached EHLO or HELO reply. */
static void test_helo_reply(void)
{
    expect_helo("250-mx.example ESMTP hi\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                "250 mx.example ESMTP hi\r\n");
    expect_helo("250 mx.example\r\n", "250 mx.example\r\n");
    expect_helo("250-mx.example\n250 SIZE\n", "250 mx.example\r\n"); /* LF only */
    expect_helo("250 \r\n", "250 \r\n");
    expect_helo("250-mx", NULL); /* no line end */
    expect_helo("", NULL);
    expect_helo("220 mx.example\r\n", NULL); /* not a 250 */
    expect_helo("250mx.example\r\n", NULL);  /* no separator */
    expect_helo("250-\n", "250 \r\n");
    char small[8];
    ASSERT_EQ(smtp_helo_reply("250 mx.example\r\n", 16, small, sizeof(small)), -1);
}

static void test_ehlo_rewrite(void)
{
    /* Offered before TLS: a second line, everything else byte for byte. */
    expect_ehlo("250-mx.example ESMTP hi\r\n250-PIPELINING\r\n250 8BITMIME\r\n", true,
                "250-mx.example ESMTP hi\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 "
                "8BITMIME\r\n");
    expect_ehlo("250 mx.example\r\n", true, "250-mx.example\r\n250 STARTTLS\r\n");
    /* Already offered: unchanged. */
    expect_ehlo("250-mx\r\n250-starttls\r\n250 SIZE 10\r\n", true,
                "250-mx\r\n250-starttls\r\n250 SIZE 10\r\n");
    /* Removed after TLS, wherever it stands. */
    expect_ehlo("250-mx\r\n250-STARTTLS\r\n250 SIZE 10\r\n", false, "250-mx\r\n250 SIZE 10\r\n");
    expect_ehlo("250-mx\r\n250-SIZE 10\r\n250 STARTTLS\r\n", false, "250-mx\r\n250 SIZE 10\r\n");
    expect_ehlo("250-mx\r\n250 STARTTLS\r\n", false, "250 mx\r\n");
    expect_ehlo("250-mx\r\n250 STARTTLSX\r\n", false, "250-mx\r\n250 STARTTLSX\r\n");
    /* The first line is the server's name, never a capability. */
    expect_ehlo("250 STARTTLS\r\n", false, "250 STARTTLS\r\n");
    /* Not a 250 reply, or cut short: left alone. */
    expect_ehlo("550 no\r\n", true, NULL);
    expect_ehlo("250-mx\r\n250 SIZE", true, NULL);
    expect_ehlo("", true, NULL);
    char out[8];
    ASSERT_EQ(smtp_ehlo_rewrite("250 mx\r\n", 8, true, out, sizeof(out)), -1);
    ASSERT(smtp_ehlo_offers_starttls("250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n", 35));
    ASSERT(smtp_ehlo_offers_starttls("250-mx\r\n250 starttls\r\n", 22));
    ASSERT(!smtp_ehlo_offers_starttls("250 STARTTLS\r\n", 14));
    ASSERT(!smtp_ehlo_offers_starttls("250-mx\r\n250 STARTTLSX\r\n", 23));
}

static void expect_ehlo_edit(const char *in, unsigned flags, const char *want)
{
    char out[512];
    ssize_t n = smtp_ehlo_edit(in, strlen(in), flags, out, sizeof(out));
    if (want == NULL) {
        ASSERT_EQ(n, -1);
        return;
    }
    ASSERT(n >= 0);
    ASSERT_MEMEQ(out, (size_t)n, want, strlen(want));
}

static void test_ehlo_edit_xclient(void)
{
    const unsigned x = SMTP_EHLO_DEL_XCLIENT;

    /* XCLIENT and XFORWARD go, wherever they stand, any case; the rest byte for byte. */
    expect_ehlo_edit("250-mx.example ESMTP\r\n250-XCLIENT NAME ADDR PROTO HELO\r\n"
                     "250-PIPELINING\r\n250-xforward NAME ADDR\r\n250 8BITMIME\r\n",
                     x, "250-mx.example ESMTP\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    expect_ehlo_edit("250-mx\r\n250-SIZE 10\r\n250 XCLIENT ADDR\r\n", x,
                     "250-mx\r\n250 SIZE 10\r\n");
    expect_ehlo_edit("250-mx\r\n250-XFORWARD ADDR\r\n250 XCLIENT\r\n", x, "250 mx\r\n");
    /* Only the whole first word counts; the first line is the server's name. */
    expect_ehlo_edit("250-mx\r\n250-XCLIENTX\r\n250 X-XCLIENT\r\n", x,
                     "250-mx\r\n250-XCLIENTX\r\n250 X-XCLIENT\r\n");
    expect_ehlo_edit("250 XCLIENT ADDR\r\n", x, "250 XCLIENT ADDR\r\n");
    /* Nothing to remove: unchanged, a bare LF line end included. */
    expect_ehlo_edit("250-mx\n250 SIZE\r\n", x, "250-mx\n250 SIZE\r\n");
    /* Combined with offering STARTTLS (before TLS) and withdrawing it (inside TLS). */
    expect_ehlo_edit("250-mx\r\n250 XCLIENT ADDR\r\n", x | SMTP_EHLO_ADD_STARTTLS,
                     "250-mx\r\n250 STARTTLS\r\n");
    expect_ehlo_edit("250-mx\r\n250-XCLIENT ADDR\r\n250 SIZE 1\r\n", x | SMTP_EHLO_ADD_STARTTLS,
                     "250-mx\r\n250-STARTTLS\r\n250 SIZE 1\r\n");
    expect_ehlo_edit("250-mx\r\n250-STARTTLS\r\n250-SIZE 1\r\n250 XFORWARD NAME\r\n",
                     x | SMTP_EHLO_DEL_STARTTLS, "250-mx\r\n250 SIZE 1\r\n");
    /* Without the flag XCLIENT stays. */
    expect_ehlo_edit("250-mx\r\n250 XCLIENT ADDR\r\n", SMTP_EHLO_DEL_STARTTLS,
                     "250-mx\r\n250 XCLIENT ADDR\r\n");
    expect_ehlo_edit("550 no\r\n", x, NULL);
    expect_ehlo_edit("250-mx\r\n250 XCLIENT", x, NULL);
    /* XFORWARD is a verb of its own. */
    struct smtp_client p = {0};
    struct smtp_event ev;
    ASSERT_EQ(smtp_client_parse(&p, "xforward ADDR=1.2.3.4\r\n", 23, &ev), 23);
    ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
    ASSERT_EQ(ev.cmd, SMTP_CMD_XFORWARD);
    ASSERT_STREQ(smtp_cmd_name(SMTP_CMD_XFORWARD), "XFORWARD");
    ASSERT_STREQ(smtp_cmd_name(SMTP_CMD_DOT), ".");
}

int main(void)
{
    test_simple_session();
    test_data_refused();
    test_dot_stuffing();
    test_smuggling_patterns();
    test_smuggling_more();
    test_bare_lf_elsewhere();
    test_normalize_keeps_every_byte();
    test_bdat();
    test_auth();
    test_auth_tokenizer();
    test_verb_blanks();
    test_overlong_and_invalid();
    test_starttls();
    test_xclient();
    test_verbs();
    test_client_bounded();
    test_server_replies();
    test_server_long_text();
    test_server_garbage();
    test_server_timing();
    test_ehlo_rewrite();
    test_ehlo_edit_xclient();
    test_helo_reply();
    printf("test_smtp: ok\n");
    return 0;
}
