/* resolve.c: host name -> address set, by getaddrinfo() or by c-ares.
 *
 * c-ares is used only when a resolver address is configured: glibc cannot be
 * told to ask one server on one port, and c-ares (Debian's libc-ares) can.
 * Each lookup gets its own channel and runs to completion on the calling
 * thread (poll() on the channel's sockets), so lookups on the thread pool never
 * share state. */
#include "resolve.h"

#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static int resolve_ip_cmp(const struct resolve_ip *a, const struct resolve_ip *b)
{
    if (a->family != b->family)
        return a->family == AF_INET ? -1 : 1;
    return memcmp(a->addr, b->addr, sizeof(a->addr));
}

void resolve_set_add(struct resolve_set *s, const struct sockaddr *sa)
{
    struct resolve_ip ip = {0};
    size_t at = 0;
    int c = 1;

    if (sa->sa_family == AF_INET) {
        ip.family = AF_INET;
        memcpy(ip.addr, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        ip.family = AF_INET6;
        memcpy(ip.addr, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    } else {
        return;
    }
    while (at < s->n && (c = resolve_ip_cmp(&s->ip[at], &ip)) < 0)
        at++;
    if (at < s->n && c == 0)
        return;
    if (s->n == RESOLVE_ADDRS_MAX) {
        s->truncated = true;
        if (at == s->n)
            return;
        s->n--; /* the highest goes, so the kept set does not depend on answer order */
    }
    memmove(&s->ip[at + 1], &s->ip[at], (s->n - at) * sizeof(s->ip[0]));
    s->ip[at] = ip;
    s->n++;
}

bool resolve_set_equal(const struct resolve_set *a, const struct resolve_set *b)
{
    if (a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++)
        if (resolve_ip_cmp(&a->ip[i], &b->ip[i]) != 0)
            return false;
    return true;
}

static bool resolve_set_has(const struct resolve_set *s, const struct resolve_ip *ip)
{
    for (size_t i = 0; i < s->n; i++)
        if (resolve_ip_cmp(&s->ip[i], ip) == 0)
            return true;
    return false;
}

void resolve_set_minus(const struct resolve_set *a, const struct resolve_set *b, char *out,
                       size_t cap)
{
    char one[INET6_ADDRSTRLEN];
    size_t len = 0;

    if (cap == 0)
        return;
    out[0] = '\0';
    for (size_t i = 0; i < a->n; i++) {
        if (resolve_set_has(b, &a->ip[i]))
            continue;
        inet_ntop(a->ip[i].family, a->ip[i].addr, one, sizeof(one));
        size_t n = strlen(one);
        const char *more = len > 0 ? ",..." : "...";
        /* Room for this one and, after it, a ",..." and the NUL. */
        if (len + (len > 0) + n + 5 > cap) {
            if (len + strlen(more) < cap)
                memcpy(out + len, more, strlen(more) + 1);
            return;
        }
        if (len > 0)
            out[len++] = ',';
        memcpy(out + len, one, n + 1);
        len += n;
    }
}

socklen_t resolve_ip_sockaddr(const struct resolve_ip *ip, unsigned port,
                              struct sockaddr_storage *sa)
{
    memset(sa, 0, sizeof(*sa));
    if (ip->family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        memcpy(&in->sin_addr, ip->addr, 4);
        return sizeof(*in);
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    memcpy(&in6->sin6_addr, ip->addr, 16);
    return sizeof(*in6);
}

static int resolve_system(const char *host, struct resolve_set *out, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, NULL, &hints, &res);

    if (rc != 0) {
        snprintf(err, errlen, "%s", rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return -1;
    }
    for (const struct addrinfo *a = res; a != NULL; a = a->ai_next)
        resolve_set_add(out, a->ai_addr);
    freeaddrinfo(res);
    return 0;
}

/* c-ares keeps process-wide state that must be set up once, before any channel. */
static pthread_once_t resolve_ares_once = PTHREAD_ONCE_INIT;
static int resolve_ares_init_rc = ARES_ENOTINITIALIZED;

static void resolve_ares_init(void)
{
    resolve_ares_init_rc = ares_library_init(ARES_LIB_INIT_ALL);
}

struct resolve_query {
    struct resolve_set *out;
    int status;
    bool done;
};

static void resolve_on_answer(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    struct resolve_query *q = arg;

    (void)timeouts;
    q->status = status;
    q->done = true;
    if (res == NULL)
        return;
    for (const struct ares_addrinfo_node *n = res->nodes; n != NULL; n = n->ai_next)
        resolve_set_add(q->out, n->ai_addr);
    ares_freeaddrinfo(res);
}

/* Runs the channel until its one query has answered (c-ares bounds the time:
 * timeout per try, two tries). */
static void resolve_ares_wait(ares_channel ch, struct resolve_query *q)
{
    while (!q->done) {
        ares_socket_t socks[ARES_GETSOCK_MAXNUM];
        struct pollfd pfd[ARES_GETSOCK_MAXNUM];
        struct timeval tv;
        /* Bit i: socks[i] wants reading; bit i + ARES_GETSOCK_MAXNUM: writing. Tested as
         * unsigned: c-ares' own ARES_GETSOCK_WRITABLE shifts a signed 1 into the sign bit. */
        unsigned bits = (unsigned)ares_getsock(ch, socks, ARES_GETSOCK_MAXNUM);
        nfds_t n = 0;

        for (unsigned i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
            short ev = (short)(((bits >> i) & 1u ? POLLIN : 0) |
                               ((bits >> (i + ARES_GETSOCK_MAXNUM)) & 1u ? POLLOUT : 0));
            if (ev != 0)
                pfd[n++] = (struct pollfd){.fd = socks[i], .events = ev};
        }
        const struct timeval *t = ares_timeout(ch, NULL, &tv);
        int ms = t != NULL ? (int)(t->tv_sec * 1000 + (t->tv_usec + 999) / 1000) : 1000;
        int ready = poll(pfd, n, ms);
        if (ready < 0 && errno != EINTR)
            break;
        if (ready <= 0) {
            ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD); /* timeouts */
            continue;
        }
        for (nfds_t i = 0; i < n; i++) {
            if (pfd[i].revents == 0)
                continue;
            bool in = (pfd[i].revents & (POLLIN | POLLERR | POLLHUP)) != 0;
            bool out = (pfd[i].revents & POLLOUT) != 0;
            ares_process_fd(ch, in ? pfd[i].fd : ARES_SOCKET_BAD,
                            out ? pfd[i].fd : ARES_SOCKET_BAD);
        }
    }
}

static int resolve_dns(const char *server, const char *host, unsigned timeout_ms,
                       struct resolve_set *out, char *err, size_t errlen)
{
    /* DNS only: a configured resolver is the whole truth, /etc/hosts is not asked. */
    char lookups[] = "b";
    struct ares_options o = {.timeout = (int)timeout_ms, .tries = 2, .lookups = lookups};
    struct ares_addrinfo_hints hints = {.ai_family = AF_UNSPEC, .ai_flags = ARES_AI_NOSORT};
    struct resolve_query q = {.out = out, .status = ARES_ENOTFOUND};
    ares_channel ch;
    int rc;

    pthread_once(&resolve_ares_once, resolve_ares_init);
    if (resolve_ares_init_rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(resolve_ares_init_rc));
        return -1;
    }
    rc = ares_init_options(&ch, &o, ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_LOOKUPS);
    if (rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(rc));
        return -1;
    }
    rc = ares_set_servers_ports_csv(ch, server);
    if (rc != ARES_SUCCESS) {
        snprintf(err, errlen, "resolver %s: %s", server, ares_strerror(rc));
        ares_destroy(ch);
        return -1;
    }
    ares_getaddrinfo(ch, host, NULL, &hints, resolve_on_answer, &q);
    resolve_ares_wait(ch, &q);
    ares_destroy(ch); /* answers a query still open with ARES_EDESTRUCTION */
    if (q.status != ARES_SUCCESS) {
        snprintf(err, errlen, "%s", ares_strerror(q.status));
        return -1;
    }
    return 0;
}

int resolve_host(const char *server, const char *host, unsigned timeout_ms, struct resolve_set *out,
                 char *err, size_t errlen)
{
    int rc;

    memset(out, 0, sizeof(*out));
    rc = server != NULL ? resolve_dns(server, host, timeout_ms, out, err, errlen)
                        : resolve_system(host, out, err, errlen);
    if (rc == 0 && out->n == 0) {
        snprintf(err, errlen, "no address");
        return -1;
    }
    return rc;
}
