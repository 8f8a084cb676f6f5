/* test_metrics.c: per-worker counters, their sum and the Prometheus text. */
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "metrics.h"
#include "smtp.h"
#include "test.h"

#define TEXT_MAX (256 * 1024)

static char text[TEXT_MAX];

static struct metrics *metrics_new(void)
{
    struct metrics *m = calloc(1, sizeof(*m));
    ASSERT(m != NULL);
    return m;
}

static size_t render(struct metrics *const *pw, unsigned n)
{
    size_t len = metrics_render(pw, n, text, sizeof(text));
    ASSERT(len < sizeof(text));
    ASSERT_EQ(strlen(text), len);
    return len;
}

/* The value of the sample line "series value" in text; fails if absent. */
static uint64_t value_of(const char *series)
{
    size_t n = strlen(series);

    for (const char *p = text; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        ASSERT(nl != NULL); /* every line ends in LF */
        if ((size_t)(nl - p) > n && strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtoull(p + n + 1, NULL, 10);
        p = nl + 1;
    }
    TEST_FAIL_("no sample %s in:\n%s", series, text);
}

static bool has_line(const char *line)
{
    size_t n = strlen(line);

    for (const char *p = text; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        if ((size_t)(nl - p) == n && strncmp(p, line, n) == 0)
            return true;
        p = nl + 1;
    }
    return false;
}

/* The lines from the one starting with from up to (not including) the one
 * starting with to. */
static const char *section(const char *from, const char *to, size_t *len)
{
    const char *a = strstr(text, from), *b;

    ASSERT(a != NULL);
    b = strstr(a, to);
    ASSERT(b != NULL);
    *len = (size_t)(b - a);
    return a;
}

static void test_counting(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};

    metrics_session_opened(m, "smtp");
    metrics_session_opened(m, "smtp");
    metrics_session_opened(m, "submission");
    metrics_session_closed(m, "smtp", SESSION_END_QUIT, 100, 2000);
    metrics_tls(m, true, true);
    metrics_tls(m, true, false);
    metrics_tls(m, false, true);
    metrics_tls(m, false, true);
    render(pw, 1);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"smtp\",end=\"quit\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"smtp\",end=\"client_eof\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"submission\",end=\"quit\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"smtp\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"submission\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_bytes_total{direction=\"up\"}"), 100);
    ASSERT_EQ(value_of("mxproxy_bytes_total{direction=\"down\"}"), 2000);
    ASSERT_EQ(value_of("mxproxy_tls_handshakes_total{side=\"client\",result=\"ok\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_tls_handshakes_total{side=\"client\",result=\"error\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_tls_handshakes_total{side=\"backend\",result=\"ok\"}"), 2);
    ASSERT_EQ(value_of("mxproxy_tls_handshakes_total{side=\"backend\",result=\"error\"}"), 0);

    /* Every end reason has a series, named as on ev=close. */
    for (unsigned e = 0; e < METRICS_ENDS; e++) {
        char series[160];
        snprintf(series, sizeof(series), "mxproxy_sessions_total{listener=\"smtp\",end=\"%s\"}",
                 session_end_name((enum session_end)e));
        (void)value_of(series);
    }

    /* Replies: class from the code, NONE as "none", codes outside 2xx-5xx ignored. */
    metrics_reply(m, SMTP_CMD_NONE, 220, METRICS_NO_LATENCY);
    metrics_reply(m, SMTP_CMD_RCPT, 250, 1000);
    metrics_reply(m, SMTP_CMD_RCPT, 550, 1000);
    metrics_reply(m, SMTP_CMD_RCPT, 551, 1000);
    metrics_reply(m, SMTP_CMD_DATA, 354, 1000);
    metrics_reply(m, SMTP_CMD_DOT, 451, 1000);
    metrics_reply(m, SMTP_CMD_MAIL, 0, 1000);
    metrics_reply(m, SMTP_CMD_MAIL, 199, 1000);
    metrics_reply(m, SMTP_CMD_MAIL, 600, 1000);
    render(pw, 1);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"none\",class=\"2xx\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"RCPT\",class=\"2xx\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"RCPT\",class=\"5xx\"}"), 2);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"DATA\",class=\"3xx\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\".\",class=\"4xx\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"MAIL\",class=\"2xx\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"MAIL\",class=\"5xx\"}"), 0);
    /* Five replies timed, the greeting reply and the ignored codes not. */
    ASSERT_EQ(value_of("mxproxy_reply_seconds_count"), 5);
    ASSERT(has_line("mxproxy_reply_seconds_sum 0.000005"));
    free(m);
}

static void test_sum_across_workers(void)
{
    struct metrics *a = metrics_new(), *b = metrics_new(), *c = metrics_new();
    struct metrics *pw[] = {a, b, c};

    /* Names claimed in different orders per worker, one only in b. */
    metrics_session_opened(a, "smtp");
    metrics_session_opened(a, "submission");
    metrics_session_opened(b, "submission");
    metrics_session_opened(b, "alpha");
    metrics_session_opened(b, "smtp");
    metrics_session_closed(a, "smtp", SESSION_END_CLIENT_EOF, 1, 2);
    metrics_session_closed(b, "smtp", SESSION_END_CLIENT_EOF, 10, 20);
    metrics_session_closed(b, "alpha", SESSION_END_LIMIT, 0, 0);
    metrics_connect_time(a, 1000000);
    metrics_connect_time(c, 3000000);
    metrics_reply(a, SMTP_CMD_EHLO, 250, 10);
    metrics_reply(c, SMTP_CMD_EHLO, 250, 10);
    render(pw, 3);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"smtp\",end=\"client_eof\"}"), 2);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"alpha\",end=\"limit\"}"), 1);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"smtp\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"submission\"}"), 2);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"alpha\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_bytes_total{direction=\"up\"}"), 11);
    ASSERT_EQ(value_of("mxproxy_bytes_total{direction=\"down\"}"), 22);
    ASSERT_EQ(value_of("mxproxy_replies_total{verb=\"EHLO\",class=\"2xx\"}"), 2);
    ASSERT_EQ(value_of("mxproxy_connect_seconds_count"), 2);
    ASSERT(has_line("mxproxy_connect_seconds_sum 0.004"));

    /* Each listener once, in byte order, whichever worker saw it first. */
    size_t len;
    const char *s = section("mxproxy_sessions_active{", "# HELP mxproxy_replies_total", &len);
    const char want[] = "mxproxy_sessions_active{listener=\"alpha\"} 0\n"
                        "mxproxy_sessions_active{listener=\"smtp\"} 0\n"
                        "mxproxy_sessions_active{listener=\"submission\"} 2\n";
    ASSERT_MEMEQ(s, len, want, sizeof(want) - 1);
    free(a);
    free(b);
    free(c);
}

/* Accept errors: by listener and error kind, summed over workers, every
 * kind listed from 0. */
static void test_accept_errors(void)
{
    struct metrics *a = metrics_new(), *b = metrics_new();
    struct metrics *pw[] = {a, b};

    metrics_listener_seen(a, "smtp");
    metrics_accept_error(a, "smtp", UV_EMFILE);
    metrics_accept_error(b, "smtp", UV_EMFILE);
    metrics_accept_error(b, "smtp", UV_ENFILE);
    metrics_accept_error(b, "smtp", UV_ENOBUFS);
    metrics_accept_error(b, "smtp", UV_ENOMEM);
    metrics_accept_error(b, "smtp", UV_ECONNRESET);
    render(pw, 2);

    size_t len;
    const char *s =
        section("# HELP mxproxy_accept_errors_total", "# HELP mxproxy_bytes_total", &len);
    const char want[] = "# HELP mxproxy_accept_errors_total Failed accepts by listener and error "
                        "(ev=accept_error); accepting pauses briefly after each.\n"
                        "# TYPE mxproxy_accept_errors_total counter\n"
                        "mxproxy_accept_errors_total{listener=\"smtp\",error=\"emfile\"} 2\n"
                        "mxproxy_accept_errors_total{listener=\"smtp\",error=\"enfile\"} 1\n"
                        "mxproxy_accept_errors_total{listener=\"smtp\",error=\"enomem\"} 1\n"
                        "mxproxy_accept_errors_total{listener=\"smtp\",error=\"enobufs\"} 1\n"
                        "mxproxy_accept_errors_total{listener=\"smtp\",error=\"other\"} 1\n";
    ASSERT_MEMEQ(s, len, want, sizeof(want) - 1);
    free(a);
    free(b);
}

static void test_histogram_buckets(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};
    size_t len;

    metrics_greeting(m, 0);                 /* le 0.0001 */
    metrics_greeting(m, 100000);            /* exactly 0.0001: still le 0.0001 */
    metrics_greeting(m, 100001);            /* le 0.00025 */
    metrics_greeting(m, 1500000);           /* le 0.0025 */
    metrics_greeting(m, 1000000000);        /* exactly 1 s */
    metrics_greeting(m, 10000000000);       /* exactly 10 s */
    metrics_greeting(m, 10000000001);       /* +Inf only */
    metrics_greeting(m, UINT64_C(1) << 40); /* far beyond */
    render(pw, 1);
    const char *s =
        section("# HELP mxproxy_greeting_seconds", "# HELP mxproxy_reply_seconds", &len);
    const char want[] =
        "# HELP mxproxy_greeting_seconds Time from accept to the first byte of the backend's "
        "greeting (mode smtp).\n"
        "# TYPE mxproxy_greeting_seconds histogram\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.0001\"} 2\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.00025\"} 3\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.0005\"} 3\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.001\"} 3\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.0025\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.005\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.01\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.025\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.05\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.1\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.25\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"0.5\"} 4\n"
        "mxproxy_greeting_seconds_bucket{le=\"1\"} 5\n"
        "mxproxy_greeting_seconds_bucket{le=\"2.5\"} 5\n"
        "mxproxy_greeting_seconds_bucket{le=\"5\"} 5\n"
        "mxproxy_greeting_seconds_bucket{le=\"10\"} 6\n"
        "mxproxy_greeting_seconds_bucket{le=\"+Inf\"} 8\n"
        "mxproxy_greeting_seconds_sum 1120.513327778\n"
        "mxproxy_greeting_seconds_count 8\n";
    ASSERT_MEMEQ(s, len, want, sizeof(want) - 1);
    free(m);
}

/* The whole text for one worker with one listener and a few counts. */
static void test_exact_text(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};
    size_t len;

    metrics_session_opened(m, "smtp");
    metrics_session_opened(m, "smtp");
    metrics_session_closed(m, "smtp", SESSION_END_BACKEND_CLOSED, 14, 195);
    metrics_connect_time(m, 250000);
    render(pw, 1);

    const char *s = section("# HELP mxproxy_sessions_total", "# HELP mxproxy_replies_total", &len);
    char want[4096];
    size_t n = (size_t)snprintf(want, sizeof(want), "%s",
                                "# HELP mxproxy_sessions_total Sessions ended, by listener and "
                                "end reason (the end= of ev=close).\n"
                                "# TYPE mxproxy_sessions_total counter\n");
    for (unsigned e = 0; e < METRICS_ENDS; e++)
        n += (size_t)snprintf(
            want + n, sizeof(want) - n, "mxproxy_sessions_total{listener=\"smtp\",end=\"%s\"} %d\n",
            session_end_name((enum session_end)e), e == SESSION_END_BACKEND_CLOSED);
    n += (size_t)snprintf(want + n, sizeof(want) - n, "%s",
                          "# HELP mxproxy_sessions_active Sessions open now, by listener.\n"
                          "# TYPE mxproxy_sessions_active gauge\n"
                          "mxproxy_sessions_active{listener=\"smtp\"} 1\n");
    ASSERT_MEMEQ(s, len, want, n);

    s = section("# HELP mxproxy_bytes_total", "# HELP mxproxy_connect_seconds", &len);
    const char bytes[] = "# HELP mxproxy_bytes_total Bytes read from clients (up) and from "
                         "backends (down), counted when a session ends.\n"
                         "# TYPE mxproxy_bytes_total counter\n"
                         "mxproxy_bytes_total{direction=\"up\"} 14\n"
                         "mxproxy_bytes_total{direction=\"down\"} 195\n"
                         "# HELP mxproxy_tls_handshakes_total TLS handshakes by side (client or "
                         "backend) and result.\n"
                         "# TYPE mxproxy_tls_handshakes_total counter\n"
                         "mxproxy_tls_handshakes_total{side=\"client\",result=\"ok\"} 0\n"
                         "mxproxy_tls_handshakes_total{side=\"client\",result=\"error\"} 0\n"
                         "mxproxy_tls_handshakes_total{side=\"backend\",result=\"ok\"} 0\n"
                         "mxproxy_tls_handshakes_total{side=\"backend\",result=\"error\"} 0\n";
    ASSERT_MEMEQ(s, len, bytes, sizeof(bytes) - 1);
    ASSERT(has_line("mxproxy_connect_seconds_bucket{le=\"0.0001\"} 0"));
    ASSERT(has_line("mxproxy_connect_seconds_bucket{le=\"0.00025\"} 1"));
    ASSERT(has_line("mxproxy_connect_seconds_sum 0.00025"));
    ASSERT(has_line("mxproxy_connect_seconds_count 1"));
    ASSERT(has_line("mxproxy_reply_seconds_sum 0"));
    /* The text ends with the last histogram and a newline. */
    const char tail[] = "\nmxproxy_reply_seconds_count 0\n";
    ASSERT_STREQ(text + strlen(text) - (sizeof(tail) - 1), tail);

    /* Every line is a comment or "name{labels} value" / "name value". */
    for (const char *p = text; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        ASSERT(nl != NULL);
        if (*p != '#') {
            const char *sp = memchr(p, ' ', (size_t)(nl - p));
            ASSERT(sp != NULL && sp > p && sp + 1 < nl);
            ASSERT(strncmp(p, "mxproxy_", 8) == 0);
        }
        p = nl + 1;
    }
    free(m);
}

static void test_label_escaping(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};

    /* Config names cannot hold these, but the renderer must not trust that. */
    metrics_session_opened(m, "a\"b\\c\nd");
    render(pw, 1);
    ASSERT(has_line("mxproxy_sessions_active{listener=\"a\\\"b\\\\c\\nd\"} 1"));
    free(m);
}

static void test_truncation(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};
    char small[100], big[TEXT_MAX];

    metrics_session_opened(m, "smtp");
    size_t full = metrics_render(pw, 1, big, sizeof(big));
    ASSERT(full > sizeof(small));
    memset(small, 'x', sizeof(small));
    ASSERT_EQ(metrics_render(pw, 1, small, sizeof(small)), full);
    ASSERT_EQ(strlen(small), sizeof(small) - 1);
    ASSERT_MEMEQ(small, sizeof(small) - 1, big, sizeof(small) - 1);
    ASSERT_EQ(metrics_render(pw, 1, NULL, 0), full);
    free(m);
}

static void test_listener_overflow(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};
    char name[16];

    for (unsigned i = 0; i < METRICS_LISTENERS_MAX + 3; i++) {
        snprintf(name, sizeof(name), "l%03u", i);
        metrics_session_opened(m, name);
        metrics_session_closed(m, name, SESSION_END_DRAIN, 0, 0);
    }
    metrics_session_opened(m, "l000"); /* still found */
    render(pw, 1);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"l063\",end=\"drain\"}"), 1);
    ASSERT_EQ(
        value_of("mxproxy_sessions_total{listener=\"" METRICS_OTHER_LISTENER "\",end=\"drain\"}"),
        3);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"l000\"}"), 1);
    ASSERT(strstr(text, "l064") == NULL);
    free(m);
}

/* A worker thread counts while the main thread renders: every count lands. */
#define THREAD_ROUNDS 200000

static void *count_thread(void *arg)
{
    struct metrics *m = arg;
    for (unsigned i = 0; i < THREAD_ROUNDS; i++) {
        metrics_session_opened(m, i % 2 ? "odd" : "even");
        metrics_session_closed(m, i % 2 ? "odd" : "even", SESSION_END_QUIT, 1, 2);
        metrics_reply(m, SMTP_CMD_RCPT, 250, i);
    }
    return NULL;
}

static void test_concurrent_scrape(void)
{
    struct metrics *m = metrics_new();
    struct metrics *pw[] = {m};
    pthread_t t;

    ASSERT_OK(pthread_create(&t, NULL, count_thread, m));
    for (int i = 0; i < 50; i++)
        render(pw, 1);
    ASSERT_OK(pthread_join(t, NULL));
    render(pw, 1);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"odd\",end=\"quit\"}"), THREAD_ROUNDS / 2);
    ASSERT_EQ(value_of("mxproxy_sessions_total{listener=\"even\",end=\"quit\"}"),
              THREAD_ROUNDS / 2);
    ASSERT_EQ(value_of("mxproxy_sessions_active{listener=\"odd\"}"), 0);
    ASSERT_EQ(value_of("mxproxy_bytes_total{direction=\"down\"}"), 2 * THREAD_ROUNDS);
    ASSERT_EQ(value_of("mxproxy_reply_seconds_count"), THREAD_ROUNDS);
    free(m);
}

int main(void)
{
    test_counting();
    test_sum_across_workers();
    test_accept_errors();
    test_histogram_buckets();
    test_exact_text();
    test_label_escaping();
    test_truncation();
    test_listener_overflow();
    test_concurrent_scrape();
    printf("test_metrics: all passed\n");
    return 0;
}
