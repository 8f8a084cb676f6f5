/* test_config.c: unit tests for proxy/config.c.
 *
 * Most cases go through config_load_string() with the name "t.ini", so every
 * expected message is the exact "t.ini:LINE: ..." the user would see.
 */
#include "cidr.h"
#include "climit.h"
#include "config.h"
#include "test.h"
#include "tls_testcerts.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <netdb.h>
#include <unistd.h>

/* A complete listener, for cases about something else. */
#define LISTENER "[listener smtp]\nlisten = 127.0.0.1:2525\nbackend = 127.0.0.1:25\n"

/* Stands in *out before a load that must fail, so the test sees it reset. */
static struct config not_loaded;

static struct config *load_ok_at(int line, const char *text)
{
    char err[CONFIG_ERR_MAX] = "";
    struct config *c = NULL;
    int rc = config_load_string(text, "t.ini", &c, err, sizeof(err));

    if (rc != 0 || c == NULL) {
        fprintf(stderr, "case at line %d: rc %d: %s\n", line, rc, err);
        exit(1);
    }
    return c;
}
#define load_ok(text) load_ok_at(__LINE__, (text))

static void expect_err_at(int line, const char *text, const char *want)
{
    char err[CONFIG_ERR_MAX] = "";
    struct config *c = &not_loaded; /* must come back NULL */
    int rc = config_load_string(text, "t.ini", &c, err, sizeof(err));

    if (rc != -EINVAL || c != NULL || strcmp(err, want) != 0)
        fprintf(stderr, "case at line %d failed:\n", line);
    ASSERT_EQ(rc, -EINVAL);
    ASSERT(c == NULL);
    ASSERT_STREQ(err, want);
}
#define expect_err(text, want) expect_err_at(__LINE__, (text), (want))

static unsigned online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n < 1 ? 1 : n > 256 ? 256 : (unsigned)n;
}

static unsigned addr_port(const struct config_addr *a)
{
    if (a->sa.ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)&a->sa)->sin6_port);
    return ntohs(((const struct sockaddr_in *)&a->sa)->sin_port);
}

static void test_defaults(void)
{
    struct config *c = load_ok(LISTENER);
    const struct config_listener *l = &c->listeners[0];
    char err[CONFIG_ERR_MAX];

    ASSERT_STREQ(c->path, "t.ini");
    ASSERT_EQ(atomic_load(&c->refs), 1);
    ASSERT_EQ(c->workers, online_cpus());
    ASSERT_EQ(c->log_format, CONFIG_LOG_LOGFMT);
    ASSERT_EQ(c->log_level, CONFIG_LOG_INFO);
    ASSERT_EQ(c->drain_timeout_ms, 30000);
    ASSERT_EQ(c->drain_grace_ms, 10000);
    ASSERT_EQ(c->n_listeners, 1);
    ASSERT_STREQ(l->name, "smtp");
    ASSERT_EQ(l->line, 1);
    ASSERT_STREQ(l->listen.text, "127.0.0.1:2525");
    ASSERT_EQ(l->listen.sa.ss_family, AF_INET);
    ASSERT_EQ(l->listen.salen, sizeof(struct sockaddr_in));
    ASSERT_EQ(addr_port(&l->listen), 2525);
    ASSERT_EQ(((struct sockaddr_in *)&l->listen.sa)->sin_addr.s_addr, htonl(INADDR_LOOPBACK));
    ASSERT_EQ(l->n_backends, 1);
    ASSERT_STREQ(l->backends[0].text, "127.0.0.1:25");
    ASSERT_EQ(l->mode, CONFIG_MODE_TCP);
    ASSERT_EQ(l->connect_timeout_ms, 5000);
    ASSERT_EQ(l->idle_timeout_ms, 300000);
    ASSERT_EQ(l->greeting_timeout_ms, 30000);
    ASSERT_EQ(l->max_connections, 0);
    ASSERT_EQ(l->fail_timeout_ms, 10000);
    ASSERT_EQ(l->max_line_length, 4096);
    ASSERT_EQ(l->smuggling, CONFIG_SMUGGLING_REJECT);
    ASSERT_EQ(l->transcript, CONFIG_TRANSCRIPT_PAIRS);
    ASSERT_EQ(l->mode_keys.n, 0);
    ASSERT(l->backend_retry_at != NULL);
    ASSERT_EQ(atomic_load(&l->backend_retry_at[0]), 0);
    ASSERT(l->shared != NULL);
    ASSERT_EQ(atomic_load(&l->shared->refs), 1);
    ASSERT_EQ(atomic_load(&l->shared->active), 0);
    config_unref(c);

    /* A NULL name stands for in-memory text. */
    ASSERT_OK(config_load_string(LISTENER, NULL, &c, err, sizeof(err)));
    ASSERT_STREQ(c->path, "<string>");
    config_unref(c);
}

static void test_every_key(void)
{
    struct config *c = load_ok("; leading comment\n"
                               "# another comment\n"
                               "[global]\n"
                               "workers = 3\n"
                               "log_format = json\n"
                               "drain_timeout = 2m\n"
                               "\n"
                               "[listener mx-in.1]\n"
                               "    listen = [::1]:25      ; indented, inline comment\n"
                               "\tbackend = 10.0.0.1:2525\n"
                               "    mode = smtp\n"
                               "    connect_timeout = 250ms\n"
                               "    idle_timeout = 1h\n"
                               "    max_connections = 1000000\n"
                               "    fail_timeout = 0\n"
                               "    max_line_length = 12288\n"
                               "    smuggling = normalize\n"
                               "    transcript = full\n"
                               "    greeting_timeout = 2s\n"
                               "[global]\n"
                               "log_level: error\n"
                               "drain_grace = 1500ms\n"
                               "[listener b_2]\n"
                               "listen = 0.0.0.0:26\r\n"
                               "backend = 127.0.0.1:27\r\n");
    const struct config_listener *l = &c->listeners[0];

    ASSERT_EQ(c->workers, 3);
    ASSERT_EQ(c->log_format, CONFIG_LOG_JSON);
    ASSERT_EQ(c->log_level, CONFIG_LOG_ERROR); /* a repeated [global] adds keys */
    ASSERT_EQ(c->drain_timeout_ms, 120000);
    ASSERT_EQ(c->drain_grace_ms, 1500);
    ASSERT_EQ(c->n_listeners, 2);
    ASSERT_STREQ(l->name, "mx-in.1");
    ASSERT_EQ(l->line, 8);
    ASSERT_STREQ(l->listen.text, "[::1]:25");
    ASSERT_EQ(l->listen.sa.ss_family, AF_INET6);
    ASSERT_EQ(l->listen.salen, sizeof(struct sockaddr_in6));
    ASSERT_EQ(addr_port(&l->listen), 25);
    ASSERT(IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&l->listen.sa)->sin6_addr));
    ASSERT_EQ(l->n_backends, 1);
    ASSERT_STREQ(l->backends[0].text, "10.0.0.1:2525");
    ASSERT_EQ(l->mode, CONFIG_MODE_SMTP);
    ASSERT_STREQ(config_mode_name(l->mode), "smtp");
    ASSERT_STREQ(config_mode_name(CONFIG_MODE_TCP), "tcp");
    ASSERT_EQ(l->connect_timeout_ms, 250);
    ASSERT_EQ(l->idle_timeout_ms, 3600000);
    ASSERT_EQ(l->max_connections, 1000000);
    ASSERT_EQ(l->fail_timeout_ms, 0);
    ASSERT_EQ(l->max_line_length, 12288);
    ASSERT_EQ(l->smuggling, CONFIG_SMUGGLING_NORMALIZE);
    ASSERT_EQ(l->transcript, CONFIG_TRANSCRIPT_FULL);
    ASSERT_EQ(l->greeting_timeout_ms, 2000);
    ASSERT_STREQ(config_smuggling_name(l->smuggling), "normalize");
    ASSERT_STREQ(config_transcript_name(l->transcript), "full");

    l = &c->listeners[1];
    ASSERT_STREQ(l->name, "b_2");
    ASSERT_EQ(l->line, 23);
    ASSERT_STREQ(l->listen.text, "0.0.0.0:26");
    ASSERT_STREQ(l->backends[0].text, "127.0.0.1:27");
    ASSERT(l->shared != c->listeners[0].shared);

    ASSERT(config_find_listener(c, "b_2") == &c->listeners[1]);
    ASSERT(config_find_listener(c, "mx-in.1") == &c->listeners[0]);
    ASSERT(config_find_listener(c, "b") == NULL);
    ASSERT(config_find_listener(NULL, "b") == NULL);
    config_unref(c);

    /* The other words of the enumerated keys. */
    c = load_ok("[global]\nlog_format = logfmt\nlog_level = warn\n" LISTENER "mode = tcp\n");
    ASSERT_EQ(c->log_format, CONFIG_LOG_LOGFMT);
    ASSERT_EQ(c->log_level, CONFIG_LOG_WARN);
    ASSERT_EQ(c->listeners[0].mode, CONFIG_MODE_TCP);
    config_unref(c);
    c = load_ok("[global]\nlog_level = debug\nworkers = 256\n" LISTENER);
    ASSERT_EQ(c->log_level, CONFIG_LOG_DEBUG);
    ASSERT_EQ(c->workers, 256);
    config_unref(c);
}

static void test_durations(void)
{
    static const struct {
        const char *text;
        unsigned ms;
    } good[] = {
        {"5", 5000},
        {"0.5", 500},
        {"250ms", 250},
        {"2m", 120000},
        {"1h", 3600000},
        {"1.5h", 5400000},
        {"0.001s", 1},
        {"7s", 7000},
        {"0.25m", 15000},
        {"1.0000000000", 1000},
        {"596h", 2145600000},
        {"2147483647ms", 2147483647u},
        {"2147483.647", 2147483647u},
    };
    char text[256];

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(text, sizeof(text),
                 "[global]\ndrain_timeout = %s\n" LISTENER
                 "connect_timeout = %s\nidle_timeout = %s\n",
                 good[i].text, good[i].text, good[i].text);
        struct config *c = load_ok(text);
        if (c->drain_timeout_ms != good[i].ms)
            fprintf(stderr, "duration '%s'\n", good[i].text);
        ASSERT_EQ(c->drain_timeout_ms, good[i].ms);
        ASSERT_EQ(c->listeners[0].connect_timeout_ms, good[i].ms);
        ASSERT_EQ(c->listeners[0].idle_timeout_ms, good[i].ms);
        config_unref(c);
    }

    /* Zero is a valid drain (close at once), not a valid timeout. */
    struct config *c = load_ok("[global]\ndrain_timeout = 0\n" LISTENER);
    ASSERT_EQ(c->drain_timeout_ms, 0);
    config_unref(c);
    c = load_ok("[global]\ndrain_timeout = 0ms\n" LISTENER);
    ASSERT_EQ(c->drain_timeout_ms, 0);
    config_unref(c);

    expect_err(LISTENER "connect_timeout = 0\n",
               "t.ini:4: invalid value '0' for 'connect_timeout': must be more than 0");
    expect_err(LISTENER "idle_timeout = 0.0s\n",
               "t.ini:4: invalid value '0.0s' for 'idle_timeout': must be more than 0");
    expect_err(LISTENER "idle_timeout =\n", "t.ini:4: empty value for 'idle_timeout'");

    /* greeting_timeout: mode smtp only, more than 0; drain_grace may be 0. */
    c = load_ok("[global]\ndrain_grace = 0\n" LISTENER "mode = smtp\ngreeting_timeout = 250ms\n");
    ASSERT_EQ(c->drain_grace_ms, 0);
    ASSERT_EQ(c->listeners[0].greeting_timeout_ms, 250);
    config_unref(c);
    expect_err(LISTENER "mode = smtp\ngreeting_timeout = 0\n",
               "t.ini:5: invalid value '0' for 'greeting_timeout': must be more than 0");
    expect_err(LISTENER "greeting_timeout = 5s\n",
               "t.ini:4: 'greeting_timeout' needs mode = smtp, imap or pop3 in [listener smtp]");
    expect_err(LISTENER "mode = smtp\ngreeting_timeout = 5s\ngreeting_timeout = 6s\n",
               "t.ini:6: duplicate key 'greeting_timeout' in [listener smtp]");
    expect_err("[global]\ndrain_grace = 5x\n" LISTENER,
               "t.ini:2: invalid value '5x' for 'drain_grace': expected a duration such as 30s, "
               "250ms, 2m or 1h");
    expect_err("[listener smtp]\ndrain_grace = 5s\n",
               "t.ini:2: unknown key 'drain_grace' in [listener smtp]");

    static const char *const bad[] = {"-1",    "5x", "1e3", "5 s",  ".5",   "5.",   "s",
                                      "1.2.3", "+5", "5S",  "0x10", "1ms5", "5sec", "inf"};
    char want[256];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), LISTENER "connect_timeout = %s\n", bad[i]);
        snprintf(want, sizeof(want),
                 "t.ini:4: invalid value '%s' for 'connect_timeout': expected a duration such "
                 "as 30s, 250ms, 2m or 1h",
                 bad[i]);
        expect_err(text, want);
    }
    expect_err("[global]\ndrain_timeout = 0.5ms\n" LISTENER,
               "t.ini:2: invalid value '0.5ms' for 'drain_timeout': finer than a millisecond");
    expect_err("[global]\ndrain_timeout = 0.00000000001h\n" LISTENER,
               "t.ini:2: invalid value '0.00000000001h' for 'drain_timeout': finer than a "
               "millisecond");
    expect_err("[global]\ndrain_timeout = 2147483648ms\n" LISTENER,
               "t.ini:2: invalid value '2147483648ms' for 'drain_timeout': longer than "
               "2147483647ms (about 24 days)");
    expect_err(LISTENER "idle_timeout = 597h\n",
               "t.ini:4: invalid value '597h' for 'idle_timeout': longer than 2147483647ms "
               "(about 24 days)");
    expect_err(LISTENER "idle_timeout = 99999999999999999999999\n",
               "t.ini:4: invalid value '99999999999999999999999' for 'idle_timeout': longer "
               "than 2147483647ms (about 24 days)");
}

static void test_addresses(void)
{
    struct config *c = load_ok("[listener a]\n"
                               "listen = [0:0::1]:65535\n"
                               "backend = 127.0.0.1:25 ,[2001:db8::1]:26,\t10.1.2.3:1  \n"
                               "backend = 192.0.2.1:587\n"
                               "[listener b]\n"
                               "listen = 0.0.0.0:1\n"
                               "backend = [::ffff:192.0.2.7]:25\n");
    const struct config_listener *l = &c->listeners[0];

    ASSERT_STREQ(l->listen.text, "[::1]:65535");
    ASSERT_EQ(l->n_backends, 4);
    ASSERT_STREQ(l->backends[0].text, "127.0.0.1:25");
    ASSERT_EQ(l->backends[0].sa.ss_family, AF_INET);
    ASSERT_STREQ(l->backends[1].text, "[2001:db8::1]:26");
    ASSERT_EQ(l->backends[1].sa.ss_family, AF_INET6);
    ASSERT_EQ(l->backends[1].salen, sizeof(struct sockaddr_in6));
    ASSERT_EQ(addr_port(&l->backends[1]), 26);
    ASSERT_STREQ(l->backends[2].text, "10.1.2.3:1");
    ASSERT_STREQ(l->backends[3].text, "192.0.2.1:587");
    ASSERT_STREQ(c->listeners[1].listen.text, "0.0.0.0:1");
    ASSERT_STREQ(c->listeners[1].backends[0].text, "[::ffff:192.0.2.7]:25");
    config_unref(c);

    /* A DNS name is resolved at load time, to its first address. */
    c = load_ok("[listener a]\nlisten = 127.0.0.1:2525\nbackend = localhost:25\n");
    l = &c->listeners[0];
    ASSERT_EQ(l->n_backends, 1);
    ASSERT_EQ(addr_port(&l->backends[0]), 25);
    if (l->backends[0].sa.ss_family == AF_INET) {
        ASSERT_STREQ(l->backends[0].text, "127.0.0.1:25");
        ASSERT_EQ(l->backends[0].salen, sizeof(struct sockaddr_in));
    } else {
        ASSERT_EQ(l->backends[0].sa.ss_family, AF_INET6);
        ASSERT_STREQ(l->backends[0].text, "[::1]:25");
    }
    config_unref(c);

    /* The same failure getaddrinfo() gives, word for word. */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo("mxproxy-test.invalid", NULL, &hints, &res);
    ASSERT(gai != 0);
    char want[CONFIG_ERR_MAX];
    snprintf(want, sizeof(want), "t.ini:3: cannot resolve 'mxproxy-test.invalid': %s",
             gai_strerror(gai));
    expect_err("[listener a]\nlisten = 127.0.0.1:2525\n"
               "backend = 127.0.0.1:25, mxproxy-test.invalid:25\n",
               want);

    /* listen takes numeric addresses only. */
    static const char *const bad_listen[] = {"1.2.3.4",      "localhost:25", "::1:25",
                                             "[::1]25",      "[::1]",        "1.2.3:25",
                                             "1.2.3.256:25", "[1.2.3.4]:25", ":25",
                                             "1.2.3.4:",     "[]:25",        "[zz::1]:25",
                                             " [::1:25"};
    char text[256];
    for (size_t i = 0; i < sizeof(bad_listen) / sizeof(bad_listen[0]); i++) {
        snprintf(text, sizeof(text), "[listener smtp]\nlisten = %s\n", bad_listen[i]);
        snprintf(want, sizeof(want),
                 "t.ini:2: invalid value '%s' for 'listen': expected IPv4:port or [IPv6]:port",
                 bad_listen[i][0] == ' ' ? bad_listen[i] + 1 : bad_listen[i]);
        expect_err(text, want);
    }
    expect_err("[listener smtp]\nlisten = 1.2.3.4:70000\n",
               "t.ini:2: invalid port '70000' in 'listen'");
    expect_err("[listener smtp]\nlisten = [::]:0\n", "t.ini:2: invalid port '0' in 'listen'");
    expect_err("[listener smtp]\nlisten = 1.2.3.4:-1\n", "t.ini:2: invalid port '-1' in 'listen'");
    expect_err("[listener smtp]\nlisten = 1.2.3.4:2x\n", "t.ini:2: invalid port '2x' in 'listen'");

    static const char *const bad_backend[] = {"1.2.3.4", "::1:25", "[::1]25",         "1.2.3:25",
                                              "a b:25",  ":25",    "[mx.example]:25", "h:"};
    for (size_t i = 0; i < sizeof(bad_backend) / sizeof(bad_backend[0]); i++) {
        snprintf(text, sizeof(text), "[listener smtp]\nbackend = 127.0.0.1:1, %s\n",
                 bad_backend[i]);
        snprintf(want, sizeof(want),
                 "t.ini:2: invalid value '%s' for 'backend': expected host:port or [IPv6]:port",
                 bad_backend[i]);
        expect_err(text, want);
    }
    expect_err("[listener smtp]\nbackend = localhost:65536\n",
               "t.ini:2: invalid port '65536' in 'backend'");
    expect_err("[listener smtp]\nbackend = 127.0.0.1:1,,127.0.0.1:2\n",
               "t.ini:2: invalid value '127.0.0.1:1,,127.0.0.1:2' for 'backend': empty entry");
    expect_err("[listener smtp]\nbackend = 127.0.0.1:1,\n",
               "t.ini:2: invalid value '127.0.0.1:1,' for 'backend': empty entry");
    expect_err("[listener smtp]\nbackend = , 127.0.0.1:1\n",
               "t.ini:2: invalid value ', 127.0.0.1:1' for 'backend': empty entry");
}

/* 64 backends fit, spread over lines; the 65th does not. */
static void test_backend_limit(void)
{
    char text[4096] = "[listener smtp]\nlisten = 127.0.0.1:25\n";
    size_t used = strlen(text);

    for (int line = 0; line < 8; line++) {
        used += (size_t)snprintf(text + used, sizeof(text) - used, "backend = ");
        for (int i = 0; i < 8; i++)
            used += (size_t)snprintf(text + used, sizeof(text) - used, "%s10.0.%d.%d:25",
                                     i ? ", " : "", line, i);
        used += (size_t)snprintf(text + used, sizeof(text) - used, "\n");
    }
    struct config *c = load_ok(text);
    ASSERT_EQ(c->listeners[0].n_backends, CONFIG_BACKENDS_MAX);
    ASSERT_STREQ(c->listeners[0].backends[0].text, "10.0.0.0:25");
    ASSERT_STREQ(c->listeners[0].backends[63].text, "10.0.7.7:25");
    config_unref(c);

    snprintf(text + used, sizeof(text) - used, "backend = 10.1.0.0:25\n");
    expect_err(text, "t.ini:11: more than 64 entries in 'backend' of [listener smtp]");
}

static void test_errors(void)
{
    expect_err("[foo]\n" LISTENER, "t.ini:1: unknown section [foo]");
    expect_err(LISTENER "[ Global ]\n", "t.ini:4: unknown section [Global]");
    expect_err(LISTENER "[listeners x]\n", "t.ini:4: unknown section [listeners x]");
    expect_err("[global]\nbar = 1\n" LISTENER, "t.ini:2: unknown key 'bar' in [global]");
    expect_err("[global]\nlisten = 127.0.0.1:25\n" LISTENER,
               "t.ini:2: unknown key 'listen' in [global]");
    expect_err(LISTENER "x = 1\n", "t.ini:4: unknown key 'x' in [listener smtp]");
    expect_err(LISTENER "workers = 1\n", "t.ini:4: unknown key 'workers' in [listener smtp]");
    expect_err("x = 1\n" LISTENER, "t.ini:1: key 'x' outside a section");

    static const char *const bad_workers[] = {"abc", "0",   "257",  "-1",
                                              "+2",  "1.5", "0x10", "99999999999999999999"};
    char text[256], want[256];
    for (size_t i = 0; i < sizeof(bad_workers) / sizeof(bad_workers[0]); i++) {
        snprintf(text, sizeof(text), "[global]\nworkers = %s\n" LISTENER, bad_workers[i]);
        snprintf(want, sizeof(want),
                 "t.ini:2: invalid value '%s' for 'workers': expected an integer from 1 to 256",
                 bad_workers[i]);
        expect_err(text, want);
    }
    expect_err(LISTENER "max_connections = 1000001\n",
               "t.ini:4: invalid value '1000001' for 'max_connections': expected an integer from "
               "0 to 1000000");
    expect_err("[global]\nlog_format = xml\n" LISTENER,
               "t.ini:2: invalid value 'xml' for 'log_format': expected logfmt or json");
    expect_err("[global]\nlog_level = JSON\n" LISTENER,
               "t.ini:2: invalid value 'JSON' for 'log_level': expected debug, info, warn or "
               "error");
    expect_err(LISTENER "mode = lmtp\n",
               "t.ini:4: invalid value 'lmtp' for 'mode': expected tcp, smtp, imap or pop3");

    expect_err("[listener smtp]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n"
               "listen = 127.0.0.1:27\n",
               "t.ini:4: duplicate key 'listen' in [listener smtp]");
    expect_err("[global]\nworkers = 2\n" LISTENER "[global]\nworkers = 2\n",
               "t.ini:7: duplicate key 'workers' in [global]");
    expect_err(LISTENER "transcript = full\n",
               "t.ini:4: 'transcript' needs mode = smtp, imap or pop3 in [listener smtp]");
    expect_err(LISTENER "mode = tcp\nsmuggling = off\nmax_line_length = 1000\n",
               "t.ini:5: 'smuggling' needs mode = smtp in [listener smtp]");
    /* Mode pop3 owns the line-dialog keys mode smtp shares, not SMTP's own. */
    struct config *pop = load_ok(LISTENER "mode = pop3\nmax_line_length = 1000\n"
                                          "transcript = full\nxclient = on\n"
                                          "greeting_timeout = 2s\n");
    ASSERT_EQ(pop->listeners[0].mode, CONFIG_MODE_POP3);
    ASSERT_EQ(pop->listeners[0].max_line_length, 1000);
    ASSERT_EQ(pop->listeners[0].xclient, 1);
    ASSERT_STREQ(config_mode_name(CONFIG_MODE_POP3), "pop3");
    config_unref(pop);
    expect_err(LISTENER "mode = pop3\nsmuggling = off\n",
               "t.ini:5: 'smuggling' needs mode = smtp in [listener smtp]");
    expect_err(LISTENER "mode = pop3\npass_client_xclient = on\n",
               "t.ini:5: 'pass_client_xclient' needs mode = smtp in [listener smtp]");
    expect_err(LISTENER "mode = smtp\nsmuggling = strip\n",
               "t.ini:5: invalid value 'strip' for 'smuggling': expected reject, normalize or "
               "off");
    expect_err(LISTENER "mode = smtp\ntranscript = some\n",
               "t.ini:5: invalid value 'some' for 'transcript': expected off, pairs or full");
    expect_err(LISTENER "mode = smtp\nmax_line_length = 511\n",
               "t.ini:5: invalid value '511' for 'max_line_length': expected an integer from "
               "512 to 12288");
    expect_err(LISTENER "mode = tcp\nmode = tcp\n",
               "t.ini:5: duplicate key 'mode' in [listener smtp]");
    expect_err("[listener smtp]\nlisten =\n", "t.ini:2: empty value for 'listen'");
    expect_err("[global]\nlog_level = ; nothing\n" LISTENER,
               "t.ini:2: empty value for 'log_level'");

    expect_err("[listener smtp]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n\n"
               "[listener smtp]\n",
               "t.ini:5: duplicate listener name 'smtp' (first defined at line 1)");
    expect_err("[listener]\n",
               "t.ini:1: section [listener] needs a name: expected [listener NAME]");
    expect_err("[listener a b]\n", "t.ini:1: invalid listener name 'a b': expected 1 to 63 "
                                   "characters of A-Z a-z 0-9 _ . -");
    expect_err("[listener sm/tp]\n", "t.ini:1: invalid listener name 'sm/tp': expected 1 to 63 "
                                     "characters of A-Z a-z 0-9 _ . -");
    expect_err("[listener "
               "a123456789b123456789c123456789d123456789e123456789f123456789abcd]\n",
               "t.ini:1: invalid listener name "
               "'a123456789b123456789c123456789d123456789e123456789f123456789abcd': expected 1 "
               "to 63 characters of A-Z a-z 0-9 _ . -");
    struct config *c = load_ok("[listener "
                               "a123456789b123456789c123456789d123456789e123456789f123456789abc]\n"
                               "listen = 127.0.0.1:25\nbackend = 127.0.0.1:26\n");
    ASSERT_STREQ(c->listeners[0].name,
                 "a123456789b123456789c123456789d123456789e123456789f123456789abc");
    config_unref(c);

    expect_err("[global]\nworkers\n" LISTENER, "t.ini:2: syntax error");
    expect_err("[global\nworkers = 2\n" LISTENER, "t.ini:1: syntax error");
    expect_err("[global] x\n" LISTENER, "t.ini:1: unexpected text after ']': 'x'");
    c = load_ok("[global] ; main settings\n" LISTENER);
    config_unref(c);

    /* A line inih could not hold is refused, not split in two. */
    char longline[INI_MAX_LINE + 128];
    snprintf(longline, sizeof(longline), LISTENER "; %0*d\n", INI_MAX_LINE, 0);
    snprintf(want, sizeof(want), "t.ini:4: line longer than %d characters", INI_MAX_LINE - 1);
    expect_err(longline, want);
    snprintf(longline, sizeof(longline), LISTENER "; %0*d\n", INI_MAX_LINE - 3, 0);
    c = load_ok(longline); /* exactly INI_MAX_LINE - 1 characters */
    config_unref(c);

    expect_err("[listener smtp]\nlisten = 127.0.0.1:25\n", "t.ini:1: listener 'smtp' has no "
                                                           "'backend'");
    expect_err(LISTENER "[listener x]\nbackend = 127.0.0.1:25\n",
               "t.ini:4: listener 'x' has no 'listen'");
    expect_err(LISTENER "[listener x]\n", "t.ini:4: listener 'x' has no 'listen'");
    expect_err("", "t.ini: no [listener NAME] section");
    expect_err("[global]\nworkers = 2\n", "t.ini: no [listener NAME] section");

    expect_err("[listener a]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n"
               "[listener b]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n",
               "t.ini:4: listener 'b' listens on 127.0.0.1:25, already used by listener 'a' "
               "(line 1)");
    expect_err("[listener a]\nlisten = [::1]:25\nbackend = 127.0.0.1:26\n"
               "[listener b]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n"
               "[listener c]\nlisten = [0::1]:25\nbackend = 127.0.0.1:26\n",
               "t.ini:7: listener 'c' listens on [::1]:25, already used by listener 'a' "
               "(line 1)");
    expect_err("[listener a]\nlisten = 0.0.0.0:25\nbackend = 127.0.0.1:26\n"
               "[listener b]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n",
               "t.ini:4: listener 'b' listens on 127.0.0.1:25, which overlaps 0.0.0.0:25 of "
               "listener 'a' (line 1)");
    expect_err("[listener a]\nlisten = [::1]:25\nbackend = 127.0.0.1:26\n"
               "[listener b]\nlisten = [::]:25\nbackend = 127.0.0.1:26\n",
               "t.ini:4: listener 'b' listens on [::]:25, which overlaps [::1]:25 of "
               "listener 'a' (line 1)");
    /* Same address, other port; other address, same port: both fine. */
    c = load_ok("[listener a]\nlisten = 0.0.0.0:25\nbackend = 127.0.0.1:26\n"
                "[listener b]\nlisten = 127.0.0.1:26\nbackend = 127.0.0.1:26\n"
                "[listener c]\nlisten = 127.0.0.2:26\nbackend = 127.0.0.1:26\n"
                "[listener d]\nlisten = [::1]:25\nbackend = 127.0.0.1:26\n");
    ASSERT_EQ(c->n_listeners, 4);
    config_unref(c);
}

/* Only the first error is reported, whichever part of the parser saw it. */
static void test_first_error_kept(void)
{
    expect_err("[global]\nworkers = 0\nlog_format = xml\n" LISTENER,
               "t.ini:2: invalid value '0' for 'workers': expected an integer from 1 to 256");
    expect_err("[global]\nnot a pair\nworkers = 0\n" LISTENER, "t.ini:2: syntax error");
    expect_err("[global]\nworkers = 0\nnot a pair\n" LISTENER,
               "t.ini:2: invalid value '0' for 'workers': expected an integer from 1 to 256");
    expect_err("[foo]\n[bar]\n", "t.ini:1: unknown section [foo]");
    /* A bad line wins over the checks that run after the last line. */
    expect_err("[listener a]\nlisten = 1.2.3.4\n",
               "t.ini:2: invalid value '1.2.3.4' for 'listen': expected IPv4:port or [IPv6]:port");
    /* And among those checks, the earliest listener. */
    expect_err("[listener a]\nbackend = 127.0.0.1:1\n[listener b]\n",
               "t.ini:1: listener 'a' has no 'listen'");
}

static void test_refs_and_inherit(void)
{
    struct config *a = load_ok("[listener x]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:1\n"
                               "[listener y]\nlisten = 127.0.0.1:26\nbackend = 127.0.0.1:1\n");
    struct config *b = load_ok("[listener y]\nlisten = 127.0.0.1:36\nbackend = 127.0.0.1:1\n"
                               "[listener z]\nlisten = 127.0.0.1:37\nbackend = 127.0.0.1:1\n");
    struct config_listener_shared *ay = a->listeners[1].shared;
    struct config_listener_shared *bz = b->listeners[1].shared;

    ASSERT(config_ref(a) == a);
    ASSERT_EQ(atomic_load(&a->refs), 2);
    config_unref(a);
    ASSERT_EQ(atomic_load(&a->refs), 1);
    ASSERT(config_ref(NULL) == NULL);
    config_unref(NULL);

    atomic_fetch_add(&ay->active, 3);
    config_inherit_shared(b, a);
    ASSERT(b->listeners[0].shared == ay);
    ASSERT_EQ(atomic_load(&ay->refs), 2);
    ASSERT_EQ(atomic_load(&b->listeners[0].shared->active), 3);
    ASSERT(b->listeners[1].shared == bz); /* no 'z' in a */
    ASSERT_EQ(atomic_load(&bz->refs), 1);
    ASSERT_EQ(atomic_load(&a->listeners[0].shared->refs), 1);

    /* Inheriting again changes nothing; a NULL side is a no-op. */
    config_inherit_shared(b, a);
    ASSERT_EQ(atomic_load(&ay->refs), 2);
    config_inherit_shared(b, NULL);
    config_inherit_shared(NULL, a);
    ASSERT(b->listeners[0].shared == ay);

    /* The old config goes; the shared counters stay with the new one. */
    config_unref(a);
    ASSERT_EQ(atomic_load(&ay->refs), 1);
    ASSERT_EQ(atomic_load(&ay->active), 3);
    atomic_fetch_sub(&ay->active, 3);
    config_unref(b); /* frees ay and bz; ASan reports a leak or double free */
}

static void test_health_keys(void)
{
    struct config *c = load_ok(LISTENER);
    const struct config_listener *l = &c->listeners[0];

    ASSERT_EQ(l->health_check, CONFIG_HEALTH_OFF);
    ASSERT_EQ(l->health_interval_ms, 5000);
    ASSERT_EQ(l->health_timeout_ms, 2000);
    ASSERT_EQ(l->health_rise, 2);
    ASSERT_EQ(l->health_fall, 3);
    ASSERT_EQ(l->balance, CONFIG_BALANCE_ROUND_ROBIN);
    ASSERT(l->backend_state != NULL && l->backend_state[0] != NULL);
    ASSERT_STREQ(l->backend_state[0]->text, "127.0.0.1:25");
    ASSERT(!atomic_load(&l->backend_state[0]->down));
    ASSERT_STREQ(config_health_check_name(CONFIG_HEALTH_GREETING), "greeting");
    config_unref(c);

    c = load_ok("[listener a]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:1, 127.0.0.1:2\n"
                "mode = smtp\nhealth_check = smtp\nhealth_interval = 1s\nhealth_timeout = 1s\n"
                "health_rise = 1\nhealth_fall = 100\nbalance = least_connections\n"
                "[listener b]\nlisten = 127.0.0.1:26\nbackend = 127.0.0.1:1\nmode = pop3\n"
                "health_check = greeting\nbalance = first\n"
                "[listener c]\nlisten = 127.0.0.1:27\nbackend = 127.0.0.1:1\n"
                "health_check = connect\nbalance = round_robin\n");
    l = &c->listeners[0];
    ASSERT_EQ(l->health_check, CONFIG_HEALTH_SMTP);
    ASSERT_EQ(l->health_interval_ms, 1000);
    ASSERT_EQ(l->health_timeout_ms, 1000);
    ASSERT_EQ(l->health_rise, 1);
    ASSERT_EQ(l->health_fall, 100);
    ASSERT_EQ(l->balance, CONFIG_BALANCE_LEAST_CONNECTIONS);
    ASSERT(l->backend_state[0] != l->backend_state[1]);
    ASSERT_EQ(c->listeners[1].health_check, CONFIG_HEALTH_GREETING);
    ASSERT_EQ(c->listeners[1].balance, CONFIG_BALANCE_FIRST);
    ASSERT_EQ(c->listeners[2].health_check, CONFIG_HEALTH_CONNECT);
    /* Same address, other listener: its own state. */
    ASSERT(c->listeners[1].backend_state[0] != l->backend_state[0]);
    config_unref(c);

#define HL "[listener h]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:1\n"
    expect_err(HL "health_check = maybe\n",
               "t.ini:4: invalid value 'maybe' for 'health_check': expected off, connect, "
               "greeting or smtp");
    expect_err(HL "balance = random\n", "t.ini:4: invalid value 'random' for 'balance': expected "
                                        "round_robin, least_connections or first");
    expect_err(HL "health_rise = 0\n",
               "t.ini:4: invalid value '0' for 'health_rise': expected an integer from 1 to 100");
    expect_err(HL "health_fall = 101\n",
               "t.ini:4: invalid value '101' for 'health_fall': expected an integer from 1 to 100");
    expect_err(HL "health_interval = 0\n",
               "t.ini:4: invalid value '0' for 'health_interval': must be more than 0");
    expect_err(HL "health_check = connect\nhealth_timeout = 6s\n",
               "t.ini:4: listener 'h': health_timeout (6000ms) is longer than health_interval "
               "(5000ms)");
    expect_err(HL "health_check = greeting\n",
               "t.ini:4: listener 'h': health_check = greeting needs a mode with a greeting "
               "(smtp, imap or pop3); in mode tcp use connect or smtp");
    expect_err(HL "mode = pop3\nhealth_check = smtp\n",
               "t.ini:5: listener 'h': health_check = smtp needs mode = smtp or tcp (mode pop3: "
               "use greeting)");
    expect_err(HL "mode = smtp\nbackend_tls = implicit\nbackend_verify = off\n"
                  "health_check = greeting\n",
               "t.ini:7: listener 'h': health_check = greeting reads plaintext; with backend_tls "
               "= implicit use health_check = connect");
    expect_err("[listener h]\nlisten = 127.0.0.1:25\nbackend = original_dst\n"
               "transparent = redirect\nhealth_check = connect\n",
               "t.ini:5: listener 'h': health_check needs a 'backend' list (not original_dst)");
#undef HL
    /* smtp in mode tcp (an SMTP server behind an opaque relay) is fine. */
    c = load_ok(LISTENER "health_check = smtp\n");
    config_unref(c);
}

/* Backend state follows the address across a reload; a new address gets its own. */
static void test_backend_state_inherit(void)
{
    struct config *a = load_ok("[listener x]\nlisten = 127.0.0.1:25\n"
                               "backend = 127.0.0.1:1, 127.0.0.1:2\n");
    struct config *b = load_ok("[listener x]\nlisten = 127.0.0.1:25\n"
                               "backend = 127.0.0.1:3, 127.0.0.1:2\n");
    struct config_backend_state *two = a->listeners[0].backend_state[1];

    atomic_store(&two->down, true);
    atomic_store(&two->sessions, 7);
    config_inherit_shared(b, a);
    ASSERT(b->listeners[0].backend_state[1] == two);
    ASSERT(atomic_load(&b->listeners[0].backend_state[1]->down));
    ASSERT_EQ(atomic_load(&b->listeners[0].backend_state[1]->sessions), 7);
    ASSERT_STREQ(b->listeners[0].backend_state[0]->text, "127.0.0.1:3");
    ASSERT(!atomic_load(&b->listeners[0].backend_state[0]->down));
    ASSERT(b->listeners[0].backend_state[0] != a->listeners[0].backend_state[0]);
    config_unref(a);
    ASSERT_EQ(atomic_load(&b->listeners[0].backend_state[1]->sessions), 7);
    config_unref(b); /* frees every state once; ASan reports a leak or double free */
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    ASSERT(f != NULL);
    ASSERT_EQ(fwrite(text, 1, strlen(text), f), strlen(text));
    ASSERT_OK(fclose(f));
}

static void test_load_file(void)
{
    char err[CONFIG_ERR_MAX] = "";
    char path[] = "/tmp/mxproxy-test-config-XXXXXX";
    char want[CONFIG_ERR_MAX];
    struct config *c = &not_loaded;
    int fd;

    ASSERT_EQ(config_load_file("/nonexistent/mxproxy.ini", &c, err, sizeof(err)), -ENOENT);
    ASSERT(c == NULL);
    ASSERT_STREQ(err, "/nonexistent/mxproxy.ini: cannot open: No such file or directory");

    ASSERT_EQ(config_load_file("/tmp", &c, err, sizeof(err)), -EISDIR);
    ASSERT_STREQ(err, "/tmp: cannot read: Is a directory");

    fd = mkstemp(path);
    ASSERT(fd >= 0);
    close(fd);
    write_file(path, "\xEF\xBB\xBF[global]\nworkers = 2\n" LISTENER);
    ASSERT_OK(config_load_file(path, &c, err, sizeof(err)));
    ASSERT_STREQ(c->path, path);
    ASSERT_EQ(c->workers, 2);
    ASSERT_STREQ(c->listeners[0].listen.text, "127.0.0.1:2525");
    config_unref(c);

    write_file(path, "[global]\nworkers = 2\n\nlog_level = loud\n" LISTENER);
    ASSERT_EQ(config_load_file(path, &c, err, sizeof(err)), -EINVAL);
    ASSERT(c == NULL);
    snprintf(want, sizeof(want),
             "%s:4: invalid value 'loud' for 'log_level': expected debug, info, warn or error",
             path);
    ASSERT_STREQ(err, want);

    /* A NUL byte would hide the rest of the file from the parser. */
    FILE *f = fopen(path, "w");
    ASSERT(f != NULL);
    ASSERT_EQ(fwrite(LISTENER "\0x = 1\n", 1, sizeof(LISTENER) + 6, f), sizeof(LISTENER) + 6);
    ASSERT_OK(fclose(f));
    ASSERT_EQ(config_load_file(path, &c, err, sizeof(err)), -EINVAL);
    snprintf(want, sizeof(want), "%s: contains a NUL byte, not a text file", path);
    ASSERT_STREQ(err, want);

    /* err may be left out. */
    ASSERT_EQ(config_load_file(path, &c, NULL, 0), -EINVAL);
    ASSERT_EQ(config_load_string("", "t.ini", &c, NULL, 0), -EINVAL);
    ASSERT(c == NULL);

    ASSERT_OK(unlink(path));
}

/* conf/reference.ini shows every key at its default: it must load, and what
 * it calls the defaults must be the defaults. */
static void test_example_file(void)
{
    static const char self[] = "tests/unit/test_config.c";
    const char *file = __FILE__;
    char path[4096];
    char err[CONFIG_ERR_MAX] = "";
    size_t n = strlen(file);
    struct config *c = NULL;
    struct config *d;

    /* CMake compiles with absolute source paths; the repo root is above us. */
    ASSERT(n >= strlen(self) && strcmp(&file[n - strlen(self)], self) == 0);
    snprintf(path, sizeof(path), "%.*sconf/reference.ini", (int)(n - strlen(self)), file);
    if (config_load_file(path, &c, err, sizeof(err)) != 0)
        TEST_FAIL_("%s", err);

    d = load_ok(LISTENER);
    ASSERT_EQ(c->workers, d->workers);
    ASSERT_EQ(c->log_format, d->log_format);
    ASSERT_EQ(c->log_level, d->log_level);
    ASSERT_EQ(c->drain_timeout_ms, d->drain_timeout_ms);
    ASSERT_EQ(c->drain_grace_ms, d->drain_grace_ms);
    ASSERT_EQ(c->n_listeners, 1);
    ASSERT_STREQ(c->listeners[0].name, "smtp");
    ASSERT_STREQ(c->listeners[0].listen.text, "127.0.0.1:2525");
    ASSERT_EQ(c->listeners[0].n_backends, 1);
    ASSERT_STREQ(c->listeners[0].backends[0].text, "127.0.0.1:25");
    ASSERT_EQ(c->listeners[0].mode, d->listeners[0].mode);
    ASSERT_EQ(c->listeners[0].connect_timeout_ms, d->listeners[0].connect_timeout_ms);
    ASSERT_EQ(c->listeners[0].idle_timeout_ms, d->listeners[0].idle_timeout_ms);
    ASSERT_EQ(c->listeners[0].max_connections, d->listeners[0].max_connections);
    ASSERT_EQ(c->listeners[0].fail_timeout_ms, d->listeners[0].fail_timeout_ms);
    config_unref(d);
    config_unref(c);
}

static void test_tls_and_interception_keys(void)
{
    /* Real files: TLS contexts are built at load, so a bad file is a
     * FILE:LINE error there. */
    struct tls_testca ca;
    char dir[64], text[4096], path[128];
    const char *names[] = {"mx.example.test"};
    ASSERT_OK(tls_testcerts_mkdtemp(dir, sizeof(dir)));
    ASSERT_OK(tls_testcerts_ca(&ca, "mxproxy test CA", false, dir));
    ASSERT_OK(tls_testcerts_leaf(&ca, "mx.example.test", names, 1, false, dir, "a"));
    ASSERT_OK(tls_testcerts_leaf(&ca, "mx.example.test", names, 1, false, dir, "b"));
    snprintf(text, sizeof(text),
             "[global]\n"
             "admin = 127.0.0.1:9180\n"
             "[listener smtps]\n"
             "listen = 127.0.0.1:465\n"
             "backend = 127.0.0.1:25\n"
             "client_tls = implicit\n"
             "cert = %s/a.crt\n"
             "key = %s/a.key\n"
             "cert = %s/b.crt\n"
             "key = %s/b.key\n"
             "tls_min_version = TLSv1.3\n"
             "backend_tls = implicit\n"
             "backend_verify = off\n"
             "backend_ca = %s/ca.pem\n"
             "backend_sni = mx.example.test\n"
             "proxy_protocol = v2\n"
             "accept_proxy_protocol = on\n"
             "proxy_protocol_timeout = 2s\n"
             "[listener side]\n"
             "listen = 127.0.0.1:25\n"
             "backend = original_dst\n"
             "transparent = tproxy\n"
             "source = client\n"
             "mark = 4242\n"
             "mode = smtp\n"
             "client_tls = passthrough\n"
             "xclient = on\n"
             "pass_client_xclient = on\n",
             dir, dir, dir, dir, dir);
    struct config *c = load_ok(text);
    const struct config_listener *l = &c->listeners[0];

    ASSERT(config_addr_given(&c->admin));
    ASSERT_STREQ(c->admin.text, "127.0.0.1:9180");
    ASSERT_EQ(l->client_tls, CONFIG_CLIENT_TLS_IMPLICIT);
    ASSERT_EQ(l->n_certs, 2);
    snprintf(path, sizeof(path), "%s/a.crt", dir);
    ASSERT_STREQ(l->certs[0].cert, path);
    snprintf(path, sizeof(path), "%s/a.key", dir);
    ASSERT_STREQ(l->certs[0].key, path);
    ASSERT_EQ(l->certs[0].line, 7);
    snprintf(path, sizeof(path), "%s/b.crt", dir);
    ASSERT_STREQ(l->certs[1].cert, path);
    snprintf(path, sizeof(path), "%s/b.key", dir);
    ASSERT_STREQ(l->certs[1].key, path);
    ASSERT(l->tls_server != NULL);
    ASSERT(l->tls_client != NULL);
    ASSERT_EQ(l->tls_min_version, CONFIG_TLS_1_3);
    ASSERT_EQ(l->backend_tls, CONFIG_BACKEND_TLS_IMPLICIT);
    ASSERT_EQ(l->backend_verify, 0);
    snprintf(path, sizeof(path), "%s/ca.pem", dir);
    ASSERT_STREQ(l->backend_ca, path);
    ASSERT_STREQ(l->backend_sni, "mx.example.test");
    ASSERT_EQ(l->proxy_protocol, CONFIG_PROXY_PROTOCOL_V2);
    ASSERT_EQ(l->accept_proxy_protocol, 1);
    ASSERT_EQ(l->proxy_protocol_timeout_ms, 2000);
    ASSERT_EQ(l->tls_line, 6);
    l = &c->listeners[1];
    ASSERT(l->backend_original_dst);
    ASSERT_EQ(l->n_backends, 0);
    ASSERT_EQ(l->transparent, CONFIG_TRANSPARENT_TPROXY);
    ASSERT_EQ(l->source_client, 1);
    ASSERT_EQ(l->mark, 4242);
    ASSERT_EQ(l->client_tls, CONFIG_CLIENT_TLS_PASSTHROUGH);
    ASSERT_EQ(l->xclient, 1);
    ASSERT_EQ(l->pass_client_xclient, 1);
    ASSERT_EQ(c->listeners[0].pass_client_xclient, 0); /* default off */
    ASSERT_EQ(l->backend_verify, 1);                   /* default on */
    ASSERT_STREQ(config_client_tls_name(CONFIG_CLIENT_TLS_STARTTLS), "starttls");
    ASSERT_STREQ(config_backend_tls_name(CONFIG_BACKEND_TLS_STARTTLS), "starttls");
    char err[CONFIG_ERR_MAX];
    /* Everything parsed here is carried out: nothing is refused. */
    ASSERT_OK(config_check_supported(c, err, sizeof(err)));
    config_unref(c);
    c = load_ok("[global]\nadmin = 127.0.0.1:9180\n" LISTENER);
    ASSERT_OK(config_check_supported(c, err, sizeof(err)));
    config_unref(c);

    expect_err(LISTENER "client_tls = implicit\n",
               "t.ini:4: listener 'smtp': client_tls = implicit needs a 'cert' and a 'key'");
    expect_err(LISTENER
               "client_tls = implicit\ncert = /nonexistent/x.crt\nkey = /nonexistent/x.key\n",
               "t.ini:5: listener 'smtp': cert /nonexistent/x.crt: No such file or directory");
    snprintf(text, sizeof(text),
             LISTENER "client_tls = implicit\ncert = %s/a.crt\nkey = %s/b.key\n", dir, dir);
    char want[512];
    snprintf(want, sizeof(want),
             "t.ini:5: listener 'smtp': key %s/b.key does not match certificate %s/a.crt", dir,
             dir);
    expect_err(text, want);
    expect_err(LISTENER "client_tls = implicit\ncert = a\ncert = b\nkey = k\n",
               "t.ini:4: listener 'smtp' has 2 'cert' and 1 'key' lines; they pair up in order");
    expect_err(LISTENER "cert = a\nkey = b\n",
               "t.ini:4: listener 'smtp': 'cert' needs client_tls = implicit or starttls");
    expect_err(LISTENER "client_tls = starttls\ncert = a\nkey = b\n",
               "t.ini:4: listener 'smtp': STARTTLS needs mode = smtp, imap or pop3");
    expect_err(LISTENER "mode = smtp\nrequire_tls = on\n",
               "t.ini:5: listener 'smtp': require_tls needs client_tls = starttls");
    expect_err(LISTENER "backend_sni = x\n",
               "t.ini:4: listener 'smtp': backend_ca and backend_sni need backend_tls");
    expect_err(LISTENER "client_tls = sometimes\n",
               "t.ini:4: invalid value 'sometimes' for 'client_tls': expected off, implicit, "
               "starttls or passthrough");
    expect_err(LISTENER "backend_verify = yes\n",
               "t.ini:4: invalid value 'yes' for 'backend_verify': expected on or off");
    expect_err(LISTENER "tls_min_version = TLSv1.1\n",
               "t.ini:4: invalid value 'TLSv1.1' for 'tls_min_version': expected TLSv1.2 or "
               "TLSv1.3");
    expect_err("[listener s]\nlisten = 127.0.0.1:25\nbackend = original_dst\n",
               "t.ini:1: listener 's': backend = original_dst needs transparent = redirect or "
               "tproxy");
    expect_err("[listener s]\nlisten = 127.0.0.1:25\nbackend = 127.0.0.1:26\n"
               "backend = original_dst\n",
               "t.ini:4: 'backend = original_dst' cannot be mixed with addresses");
    expect_err(LISTENER "transparent = redirect\nsource = client\n",
               "t.ini:1: listener 'smtp': source = client needs transparent = tproxy");
    expect_err(LISTENER "xclient = on\n",
               "t.ini:4: 'xclient' needs mode = smtp or pop3 in [listener smtp]");
    expect_err(LISTENER "pass_client_xclient = on\n",
               "t.ini:4: 'pass_client_xclient' needs mode = smtp in [listener smtp]");
    expect_err(LISTENER "mode = smtp\npass_client_xclient = yes\n",
               "t.ini:5: invalid value 'yes' for 'pass_client_xclient': expected on or off");
    expect_err(LISTENER "mode = smtp\npass_client_xclient = on\npass_client_xclient = off\n",
               "t.ini:6: duplicate key 'pass_client_xclient' in [listener smtp]");
    expect_err("[global]\nadmin = localhost:9180\n" LISTENER,
               "t.ini:2: invalid value 'localhost:9180' for 'admin': expected IPv4:port or "
               "[IPv6]:port");
    tls_testcerts_ca_free(&ca);
    ASSERT_OK(tls_testcerts_rmdir(dir));
}

/* "ciphers" and "ciphersuites": checked at load, with the line at fault;
 * key files that hold no key say so. */
static void test_cipher_keys(void)
{
    struct tls_testca ca;
    char dir[64], text[4096], want[512], tls[256];
    const char *names[] = {"mx.example.test"};
    ASSERT_OK(tls_testcerts_mkdtemp(dir, sizeof(dir)));
    ASSERT_OK(tls_testcerts_ca(&ca, "mxproxy test CA", false, dir));
    ASSERT_OK(tls_testcerts_leaf(&ca, "mx.example.test", names, 1, false, dir, "a"));
    snprintf(tls, sizeof(tls), "client_tls = implicit\ncert = %s/a.crt\nkey = %s/a.key\n", dir,
             dir);

    snprintf(text, sizeof(text),
             LISTENER "%sciphers = ECDHE-ECDSA-AES256-GCM-SHA384:!aNULL\n"
                      "ciphersuites = TLS_AES_256_GCM_SHA384\n",
             tls);
    struct config *c = load_ok(text);
    ASSERT_STREQ(c->listeners[0].ciphers, "ECDHE-ECDSA-AES256-GCM-SHA384:!aNULL");
    ASSERT_EQ(c->listeners[0].ciphers_line, 7);
    ASSERT_STREQ(c->listeners[0].ciphersuites, "TLS_AES_256_GCM_SHA384");
    ASSERT_EQ(c->listeners[0].ciphersuites_line, 8);
    ASSERT(c->listeners[0].tls_server != NULL);
    config_unref(c);
    c = load_ok(LISTENER);
    ASSERT(c->listeners[0].ciphers == NULL && c->listeners[0].ciphersuites == NULL);
    config_unref(c);

    snprintf(text, sizeof(text), LISTENER "%sciphers = ECDHE-ECDSA-AES256-GCM-SHA384:FOO\n", tls);
    expect_err(text, "t.ini:7: listener 'smtp': ciphers: 'FOO' matches no TLS 1.2 cipher");
    snprintf(text, sizeof(text), LISTENER "ciphersuites = TLS_AES_256_GCM_SHA384\n%s", tls);
    snprintf(text + strlen(text), sizeof(text) - strlen(text), "ciphers = !ALL\n");
    expect_err(text, "t.ini:8: listener 'smtp': ciphers '!ALL': no cipher match");
    snprintf(text, sizeof(text), LISTENER "ciphersuites = TLS_AES_256_GCM_SHA385\n%s", tls);
    expect_err(text, "t.ini:4: listener 'smtp': ciphersuites: 'TLS_AES_256_GCM_SHA385' matches no "
                     "TLS 1.3 cipher");
    expect_err(LISTENER "ciphers = ECDHE+AESGCM\n",
               "t.ini:4: listener 'smtp': 'ciphers' needs client_tls = implicit or starttls (it "
               "sets the ciphers mxproxy offers to clients)");
    expect_err(LISTENER "backend_tls = implicit\nciphersuites = TLS_AES_256_GCM_SHA384\n",
               "t.ini:5: listener 'smtp': 'ciphersuites' needs client_tls = implicit or starttls "
               "(it sets the ciphers mxproxy offers to clients)");
    expect_err(LISTENER "ciphers =\n", "t.ini:4: empty value for 'ciphers'");

    /* An empty key file and a directory: no key, said plainly. */
    char empty[128];
    snprintf(empty, sizeof(empty), "%s/empty.key", dir);
    FILE *f = fopen(empty, "w");
    ASSERT(f != NULL);
    fclose(f);
    const char *nokeys[] = {empty, dir};
    for (size_t i = 0; i < 2; i++) {
        snprintf(text, sizeof(text), LISTENER "client_tls = implicit\ncert = %s/a.crt\nkey = %s\n",
                 dir, nokeys[i]);
        snprintf(want, sizeof(want), "t.ini:6: listener 'smtp': key %s: no private key found",
                 nokeys[i]);
        expect_err(text, want);
    }
    tls_testcerts_ca_free(&ca);
    ASSERT_OK(tls_testcerts_rmdir(dir));
}

/* The admin endpoint's limits. */
static void test_admin_keys(void)
{
    struct config *c = load_ok(LISTENER);
    ASSERT_EQ(c->admin_max_connections, 64);
    ASSERT_EQ(c->admin_max_per_peer, 8);
    ASSERT_EQ(c->admin_header_timeout_ms, 3000);
    config_unref(c);
    c = load_ok("[global]\nadmin = 127.0.0.1:9180\nadmin_max_connections = 1024\n"
                "admin_max_connections_per_peer = 1\nadmin_header_timeout = 500ms\n" LISTENER);
    ASSERT_EQ(c->admin_max_connections, 1024);
    ASSERT_EQ(c->admin_max_per_peer, 1);
    ASSERT_EQ(c->admin_header_timeout_ms, 500);
    config_unref(c);
    expect_err("[global]\nadmin_max_connections = 0\n" LISTENER,
               "t.ini:2: invalid value '0' for 'admin_max_connections': expected an integer "
               "from 1 to 1024");
    expect_err("[global]\nadmin_max_connections_per_peer = 1025\n" LISTENER,
               "t.ini:2: invalid value '1025' for 'admin_max_connections_per_peer': expected an "
               "integer from 1 to 1024");
    expect_err("[global]\nadmin_header_timeout = 0\n" LISTENER,
               "t.ini:2: invalid value '0' for 'admin_header_timeout': must be more than 0");
    expect_err(LISTENER "admin_header_timeout = 1s\n",
               "t.ini:4: unknown key 'admin_header_timeout' in [listener smtp]");
}

static void test_client_keys(void)
{
    char text[80];
    struct config *c = load_ok(LISTENER "max_connections_per_client = 5\n"
                                        "max_connection_rate_per_client = 2\n"
                                        "allow = 10.0.0.0/8, 2001:db8::/32\n"
                                        "allow = 127.0.0.1\n"
                                        "deny = 10.1.0.0/16\n");
    const struct config_listener *l = &c->listeners[0];

    ASSERT_EQ(l->max_per_client, 5);
    ASSERT_EQ(l->rate_per_client, 2);
    ASSERT_EQ(l->n_allow, 3);
    ASSERT_STREQ(cidr_format(&l->allow[0], text, sizeof(text)), "10.0.0.0/8");
    ASSERT_STREQ(cidr_format(&l->allow[1], text, sizeof(text)), "2001:db8::/32");
    ASSERT_STREQ(cidr_format(&l->allow[2], text, sizeof(text)), "127.0.0.1/32");
    ASSERT_EQ(l->n_deny, 1);
    ASSERT_STREQ(cidr_format(&l->deny[0], text, sizeof(text)), "10.1.0.0/16");
    struct climit_table *t = atomic_load(&l->shared->clients);
    ASSERT(t != NULL);
    ASSERT_EQ(climit_capacity(t), CLIMIT_ENTRIES_DEFAULT);

    /* No limit, no table; a reload that sets one keeps the first table made. */
    struct config *off = load_ok(LISTENER "allow = 0.0.0.0/0\n");
    ASSERT(atomic_load(&off->listeners[0].shared->clients) == NULL);
    ASSERT_EQ(off->listeners[0].max_per_client, 0);
    ASSERT_EQ(off->listeners[0].rate_per_client, 0);
    config_inherit_shared(c, off);
    ASSERT(c->listeners[0].shared == off->listeners[0].shared);
    ASSERT(atomic_load(&off->listeners[0].shared->clients) == t);
    struct config *again = load_ok(LISTENER "max_connections_per_client = 1\n");
    config_inherit_shared(again, c);
    ASSERT(atomic_load(&again->listeners[0].shared->clients) == t); /* its own was dropped */
    config_unref(off);
    config_unref(c);
    config_unref(again); /* frees t once; ASan reports a leak or double free */

    expect_err(LISTENER "max_connections_per_client = -1\n",
               "t.ini:4: invalid value '-1' for 'max_connections_per_client': expected an integer "
               "from 0 to 1000000");
    expect_err(LISTENER "max_connection_rate_per_client = 1000001\n",
               "t.ini:4: invalid value '1000001' for 'max_connection_rate_per_client': expected an "
               "integer from 0 to 1000000");
    expect_err(LISTENER "allow = 10.0.0.1/8\n",
               "t.ini:4: invalid value '10.0.0.1/8' for 'allow': host bits set past the prefix "
               "length");
    expect_err(LISTENER "deny = 10.0.0.0/8,, ::1\n",
               "t.ini:4: invalid value '' for 'deny': empty address block");
    expect_err(LISTENER "deny = mail.example.com\n",
               "t.ini:4: invalid value 'mail.example.com' for 'deny': not an IPv4 or IPv6 "
               "address");
    expect_err(LISTENER "allow = ::1\ndeny = 2001:db8::/129\n",
               "t.ini:5: invalid value '2001:db8::/129' for 'deny': prefix length too large");
    expect_err(LISTENER "allow = 10.0.0.0/x\n",
               "t.ini:4: invalid value '10.0.0.0/x' for 'allow': prefix length is not a number");

    /* CONFIG_CIDRS_MAX blocks, over several lines, and not one more. */
    size_t cap = 64 + CONFIG_CIDRS_MAX * 32;
    char *big = malloc(cap);
    ASSERT(big != NULL);
    size_t len = (size_t)snprintf(big, cap, "%s", LISTENER);
    for (unsigned i = 0; i < CONFIG_CIDRS_MAX; i++)
        len += (size_t)snprintf(big + len, cap - len, "deny = 10.%u.%u.0/24\n", i / 256, i % 256);
    c = load_ok(big);
    ASSERT_EQ(c->listeners[0].n_deny, CONFIG_CIDRS_MAX);
    config_unref(c);
    snprintf(big + len, cap - len, "deny = 11.0.0.0/8\n");
    expect_err(big, "t.ini:1028: more than 1024 entries in 'deny' of [listener smtp]");
    free(big);
}

/* kernel_relay: per listener, every mode; splice unless set. */
static void test_kernel_relay_key(void)
{
    static const struct {
        const char *word;
        unsigned value;
    } words[] = {{"off", CONFIG_KERNEL_RELAY_OFF},
                 {"splice", CONFIG_KERNEL_RELAY_SPLICE},
                 {"sockmap", CONFIG_KERNEL_RELAY_SOCKMAP}};
    char text[256];

    struct config *c = load_ok(LISTENER);
    ASSERT_EQ(c->listeners[0].kernel_relay, CONFIG_KERNEL_RELAY_SPLICE);
    config_unref(c);
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        snprintf(text, sizeof(text), LISTENER "mode = smtp\nkernel_relay = %s\n", words[i].word);
        c = load_ok(text);
        ASSERT_EQ(c->listeners[0].kernel_relay, words[i].value);
        ASSERT_STREQ(config_kernel_relay_name((enum config_kernel_relay)words[i].value),
                     words[i].word);
        config_unref(c);
    }
    expect_err(LISTENER "kernel_relay = ebpf\n",
               "t.ini:4: invalid value 'ebpf' for 'kernel_relay': expected off, splice or sockmap");
    expect_err("[global]\nkernel_relay = off\n" LISTENER,
               "t.ini:2: unknown key 'kernel_relay' in [global]");
}

/* Mode imap owns its keys and has its own defaults (idle_timeout 30 min, 64 KiB lines),
 * unless the file gave them, before or after the mode. */
static void test_mode_imap(void)
{
    struct config *c = load_ok(LISTENER "mode = imap\nimap_id = on\ntranscript = full\n");
    const struct config_listener *l = &c->listeners[0];
    ASSERT_EQ(l->mode, CONFIG_MODE_IMAP);
    ASSERT_EQ(l->idle_timeout_ms, 30 * 60 * 1000);
    ASSERT_EQ(l->max_line_length, 65536);
    ASSERT_EQ(l->imap_id, 1);
    config_unref(c);
    c = load_ok(LISTENER "idle_timeout = 5m\nmax_line_length = 20000\nmode = imap\n");
    l = &c->listeners[0];
    ASSERT_EQ(l->idle_timeout_ms, 5 * 60 * 1000);
    ASSERT_EQ(l->max_line_length, 20000);
    config_unref(c);
    c = load_ok(LISTENER "mode = imap\nmax_line_length = 1048576\nidle_timeout = 10s\n");
    ASSERT_EQ(c->listeners[0].max_line_length, 1048576);
    ASSERT_EQ(c->listeners[0].idle_timeout_ms, 10 * 1000);
    config_unref(c);
    expect_err(LISTENER "mode = smtp\nimap_id = on\n",
               "t.ini:5: 'imap_id' needs mode = imap in [listener smtp]");
    expect_err(LISTENER "mode = imap\nxclient = on\n",
               "t.ini:5: 'xclient' needs mode = smtp or pop3 in [listener smtp]");
    expect_err(LISTENER "mode = imap\nsmuggling = off\n",
               "t.ini:5: 'smuggling' needs mode = smtp in [listener smtp]");
    expect_err(LISTENER "mode = imap\nmax_line_length = 1048577\n",
               "t.ini:5: invalid value '1048577' for 'max_line_length': expected an integer "
               "from 512 to 1048576");
    expect_err(LISTENER "max_line_length = 20000\nmode = smtp\n",
               "t.ini:4: invalid value '20000' for 'max_line_length': expected an integer from "
               "512 to 12288");
}

int main(void)
{
    test_defaults();
    test_mode_imap();
    test_every_key();
    test_durations();
    test_addresses();
    test_backend_limit();
    test_errors();
    test_first_error_kept();
    test_refs_and_inherit();
    test_health_keys();
    test_backend_state_inherit();
    test_load_file();
    test_example_file();
    test_tls_and_interception_keys();
    test_cipher_keys();
    test_admin_keys();
    test_client_keys();
    test_kernel_relay_key();
    printf("test_config: all passed\n");
    return 0;
}
