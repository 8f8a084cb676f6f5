/* test_resolve.c: unit tests for proxy/resolve.c's address sets and for the
 * config's expansion of backend names (config_load_rebuild with pinned answers,
 * so no DNS is asked). */
#include "config.h"
#include "resolve.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>

static void add(struct resolve_set *s, const char *text)
{
    struct sockaddr_storage ss = {0};

    if (strchr(text, ':') != NULL) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(25);
        ASSERT_EQ(inet_pton(AF_INET6, text, &in6->sin6_addr), 1);
    } else {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(587);
        ASSERT_EQ(inet_pton(AF_INET, text, &in->sin_addr), 1);
    }
    resolve_set_add(s, (struct sockaddr *)&ss);
}

static void expect_set(const struct resolve_set *s, const char *want)
{
    static const struct resolve_set none;
    char got[1024];

    resolve_set_minus(s, &none, got, sizeof(got));
    ASSERT_STREQ(got, want);
}

/* Sorted IPv4 first, duplicates (any port) once, other families ignored. */
static void test_set_order(void)
{
    struct resolve_set s = {0};
    struct sockaddr unix_sa = {.sa_family = AF_UNIX};

    add(&s, "::1");
    add(&s, "10.0.0.2");
    add(&s, "10.0.0.10");
    add(&s, "2001:db8::1");
    add(&s, "10.0.0.2");
    add(&s, "9.255.255.255");
    add(&s, "::1");
    resolve_set_add(&s, &unix_sa);
    ASSERT_EQ(s.n, 5);
    ASSERT(!s.truncated);
    expect_set(&s, "9.255.255.255,10.0.0.2,10.0.0.10,::1,2001:db8::1");
}

/* The same addresses in another order make an equal set; one more does not. */
static void test_set_equal_and_minus(void)
{
    struct resolve_set a = {0}, b = {0};
    char out[64];

    add(&a, "127.0.0.2");
    add(&a, "127.0.0.3");
    add(&b, "127.0.0.3");
    add(&b, "127.0.0.2");
    ASSERT(resolve_set_equal(&a, &b));
    add(&b, "127.0.0.4");
    ASSERT(!resolve_set_equal(&a, &b));
    resolve_set_minus(&b, &a, out, sizeof(out));
    ASSERT_STREQ(out, "127.0.0.4");
    resolve_set_minus(&a, &b, out, sizeof(out));
    ASSERT_STREQ(out, "");
}

/* Past RESOLVE_ADDRS_MAX the highest addresses go, whatever the answer order. */
static void test_set_truncated(void)
{
    struct resolve_set up = {0}, down = {0};
    char text[32];

    for (int i = 0; i < RESOLVE_ADDRS_MAX + 6; i++) {
        snprintf(text, sizeof(text), "10.1.%d.%d", i / 200, i % 200);
        add(&up, text);
        snprintf(text, sizeof(text), "10.1.%d.%d", (RESOLVE_ADDRS_MAX + 5 - i) / 200,
                 (RESOLVE_ADDRS_MAX + 5 - i) % 200);
        add(&down, text);
    }
    ASSERT_EQ(up.n, RESOLVE_ADDRS_MAX);
    ASSERT(up.truncated && down.truncated);
    ASSERT(resolve_set_equal(&up, &down));
    snprintf(text, sizeof(text), "10.1.0.%d", RESOLVE_ADDRS_MAX - 1);
    char all[2048];
    resolve_set_minus(&up, &(struct resolve_set){0}, all, sizeof(all));
    ASSERT(strstr(all, text) != NULL);
    snprintf(text, sizeof(text), ",10.1.0.%d", RESOLVE_ADDRS_MAX);
    ASSERT(strstr(all, text) == NULL);
}

/* A list that does not fit ends in "...", within the buffer. */
static void test_minus_cut(void)
{
    struct resolve_set s = {0};
    char out[24];

    add(&s, "10.0.0.1");
    add(&s, "10.0.0.2");
    add(&s, "10.0.0.3");
    resolve_set_minus(&s, &(struct resolve_set){0}, out, sizeof(out));
    ASSERT_STREQ(out, "10.0.0.1,10.0.0.2,...");
    resolve_set_minus(&s, &(struct resolve_set){0}, out, 6);
    ASSERT_STREQ(out, "...");
    resolve_set_minus(&s, &(struct resolve_set){0}, out, 3);
    ASSERT_STREQ(out, "");
}

static void pin(struct config_name *n, const char *host, const char *a, const char *b)
{
    memset(n, 0, sizeof(*n));
    snprintf(n->host, sizeof(n->host), "%s", host);
    add(&n->addrs, a);
    if (b != NULL)
        add(&n->addrs, b);
}

/* Loads numeric text, then rebuilds it as if read from named (the rebuild
 * reads config->source, not the file). */
static int rebuild(const char *named, const struct config_name *pins, size_t n, struct config **out,
                   char *err)
{
    struct config *c = NULL;

    ASSERT_OK(config_load_string("[listener a]\nlisten = 127.0.0.1:1\nbackend = 127.0.0.1:2\n",
                                 "t.ini", &c, err, CONFIG_ERR_MAX));
    free(c->source);
    c->source = strdup(named);
    ASSERT(c->source != NULL);
    int rc = config_load_rebuild(c, pins, n, out, err, CONFIG_ERR_MAX);
    config_unref(c);
    return rc;
}

/* A name becomes one backend per address, in its entry's place, with its port. */
static void test_expand_in_place(void)
{
    struct config_name pins[2];
    struct config *c = NULL;
    char err[CONFIG_ERR_MAX];

    pin(&pins[0], "mx.pool.test", "::1", "127.0.0.3");
    pin(&pins[1], "standby.test", "127.0.0.9", NULL);
    ASSERT_OK(rebuild("[listener a]\nlisten = 127.0.0.1:1\n"
                      "backend = 10.0.0.1:25, MX.Pool.test:2525\n"
                      "backend = standby.test:26\n"
                      "[listener b]\nlisten = 127.0.0.1:3\nbackend = mx.pool.test:27\n",
                      pins, 2, &c, err));
    const struct config_listener *l = &c->listeners[0];
    ASSERT_EQ(l->n_backends, 4);
    ASSERT_STREQ(l->backends[0].text, "10.0.0.1:25");
    ASSERT_STREQ(l->backends[1].text, "127.0.0.3:2525");
    ASSERT_STREQ(l->backends[2].text, "[::1]:2525");
    ASSERT_STREQ(l->backends[3].text, "127.0.0.9:26");
    ASSERT_EQ(c->listeners[1].n_backends, 2);
    ASSERT_STREQ(c->listeners[1].backends[0].text, "127.0.0.3:27");
    ASSERT_STREQ(c->listeners[1].backends[1].text, "[::1]:27");
    /* One entry per name, case aside, with the line that first named it. */
    ASSERT_EQ(c->n_names, 2);
    ASSERT_STREQ(c->names[0].host, "MX.Pool.test");
    ASSERT_EQ(c->names[0].line, 3);
    ASSERT_EQ(c->names[1].line, 4);
    ASSERT(resolve_set_equal(&c->names[0].addrs, &pins[0].addrs));
    ASSERT(c->listeners[0].backend_state[2] != NULL);
    ASSERT_STREQ(c->listeners[0].backend_state[2]->text, "[::1]:2525");
    config_unref(c);
}

/* More than 64 backends once names are expanded: the entry's line says so. */
static void test_expand_too_many(void)
{
    struct config_name pin2;
    struct config *c = NULL;
    char err[CONFIG_ERR_MAX];
    char text[4096];
    size_t len = (size_t)snprintf(text, sizeof(text), "[listener a]\nlisten = 127.0.0.1:1\n");

    for (int i = 0; i < CONFIG_BACKENDS_MAX - 1; i++)
        len += (size_t)snprintf(text + len, sizeof(text) - len, "backend = 10.0.%d.1:25\n", i);
    snprintf(text + len, sizeof(text) - len, "backend = two.test:25\n");
    pin(&pin2, "two.test", "127.0.0.2", "127.0.0.3");
    ASSERT(rebuild(text, &pin2, 1, &c, err) != 0);
    ASSERT(c == NULL);
    ASSERT_STREQ(err, "t.ini:66: 'two.test' resolves to 2 addresses: 65 backends in [listener a], "
                      "more than 64");
    /* The same with the name first: the entries after it count too. */
    len = (size_t)snprintf(text, sizeof(text),
                           "[listener a]\nlisten = 127.0.0.1:1\nbackend = two.test:25\n");
    for (int i = 0; i < CONFIG_BACKENDS_MAX - 1; i++)
        len += (size_t)snprintf(text + len, sizeof(text) - len, "backend = 10.0.%d.1:25\n", i);
    ASSERT(rebuild(text, &pin2, 1, &c, err) != 0);
    ASSERT(c == NULL);
    ASSERT_STREQ(err, "t.ini:3: 'two.test' resolves to 2 addresses: 65 backends in [listener a], "
                      "more than 64");
    /* 64 exactly is fine. */
    pin(&pin2, "two.test", "127.0.0.2", NULL);
    ASSERT_OK(rebuild(text, &pin2, 1, &c, err));
    ASSERT_EQ(c->listeners[0].n_backends, CONFIG_BACKENDS_MAX);
    ASSERT_STREQ(c->listeners[0].backends[0].text, "127.0.0.2:25");
    ASSERT_STREQ(c->listeners[0].backends[63].text, "10.0.62.1:25");
    config_unref(c);
}

int main(void)
{
    test_set_order();
    test_set_equal_and_minus();
    test_set_truncated();
    test_minus_cut();
    test_expand_in_place();
    test_expand_too_many();
    printf("test_resolve: all passed\n");
    return 0;
}
