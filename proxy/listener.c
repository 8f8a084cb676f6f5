/* listener.c: SO_REUSEPORT listening sockets and their accept loop; see listener.h. */
#include "listener.h"

#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "session.h"
#include "worker.h"

#define LISTENER_BACKLOG 4096    /* the kernel caps it at net.core.somaxconn */
#define LISTENER_ACCEPT_BATCH 64 /* accepts per wakeup; the loop turns between batches */

static void listener_on_readable(uv_poll_t *p, int status, int events);

/* Milliseconds of the rate limit: the clock the lines' ts= come from, not the loop's
 * cached time, so two lines are a second apart by their ts= too. */
static uint64_t listener_clock_ms(void)
{
    return clock_mono_ns() / 1000000;
}

/* ev=accept_error for the errors counted since the last line. */
static void listener_log_errors(struct listener *l, uint64_t now)
{
    struct log_line line;

    l->err_logged = true;
    l->err_logged_at = now;
    if (log_enabled(LOG_ERROR)) {
        log_begin(&line, LOG_ERROR, "accept_error");
        log_str(&line, "listener", l->cl->name);
        log_str(&line, "addr", l->cl->listen.text);
        log_uint(&line, "worker", l->w->id);
        log_str(&line, "error", uv_strerror(l->err_last));
        log_uint(&line, "count", l->err_count);
        log_end(&line);
    }
    l->err_count = 0;
}

/* Counts an accept error (a negative UV_E* code) and logs it, at most once
 * per LISTENER_LOG_EVERY_MS. */
static void listener_accept_error(struct listener *l, int err)
{
    uint64_t now = listener_clock_ms();

    metrics_accept_error(&l->w->metrics, l->cl->name, err);
    l->err_count++;
    l->err_last = err;
    if (!l->err_logged || now - l->err_logged_at >= LISTENER_LOG_EVERY_MS)
        listener_log_errors(l, now);
}

/* Ends a back-off, and writes the line for errors that came too soon after
 * the last one, once a second has passed: a burst's tail is never lost. */
static void listener_on_timer(uv_timer_t *t)
{
    struct listener *l = t->data;
    uint64_t now = listener_clock_ms();

    if (l->paused) {
        l->paused = false;
        if (uv_poll_start(&l->poll, UV_READABLE, listener_on_readable) != 0)
            abort(); /* only fails for a closing handle, which has no timer running */
    }
    if (l->err_count == 0)
        return;
    if (now - l->err_logged_at >= LISTENER_LOG_EVERY_MS)
        listener_log_errors(l, now);
    else
        uv_timer_start(&l->timer, listener_on_timer, l->err_logged_at + LISTENER_LOG_EVERY_MS - now,
                       0);
}

/* Accepting again at once would fail again, and spin: stop for
 * LISTENER_BACKOFF_MS. The loop goes on serving (and closing) sessions
 * meanwhile; the kernel keeps new clients in the backlog. */
void listener_accept_failed(struct listener *l, int err)
{
    listener_accept_error(l, err);
    l->paused = true;
    uv_poll_stop(&l->poll);
    uv_timer_start(&l->timer, listener_on_timer, LISTENER_BACKOFF_MS, 0);
}

static void listener_on_readable(uv_poll_t *p, int status, int events)
{
    struct listener *l = p->data;

    (void)events;
    if (status < 0) {
        listener_accept_failed(l, status);
        return;
    }
    for (int i = 0; i < LISTENER_ACCEPT_BATCH; i++) {
        /* The client's address comes with the accept: the session never asks for it again. */
        struct sockaddr_storage peer;
        socklen_t peerlen = sizeof(peer);
        int fd = accept4(l->fd, (struct sockaddr *)&peer, &peerlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR || errno == ECONNABORTED)
                continue; /* that client is gone, or try again: nothing to report */
            listener_accept_failed(l, -errno); /* EMFILE, ENFILE, ENOBUFS, ENOMEM */
            return;
        }
        session_accept(l, fd, &peer);
        if (l->paused)
            return;
    }
}

static void listener_on_closed(uv_handle_t *h)
{
    struct listener *l = h->data;

    if (--l->open_handles == 0)
        free(l);
}

/* A non-blocking socket bound to cl->listen, not yet listening; with
 * reuseport, SO_REUSEPORT lets this process's workers share the address.
 * Returns the descriptor or a negative UV_E* code. */
static int listener_socket(const struct config_listener *cl, bool reuseport)
{
    const struct sockaddr *sa = (const struct sockaddr *)&cl->listen.sa;
    int one = 1;
    int rc = 0;
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -errno;
    /* As uv_tcp_bind(): connections of an earlier run in TIME_WAIT do not
     * keep a restart from binding. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
        rc = -errno;
    if (rc == 0 && reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
        rc = -errno;
    /* IPv6 listeners take IPv6 only: [::]:25 beside 0.0.0.0:25 must not
     * silently split IPv4 traffic between two listeners. */
    if (rc == 0 && sa->sa_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
        rc = -errno;
    /* Accepted sockets inherit TCP_NODELAY from the listener (Linux): mxproxy writes each reply
     * and each read as it comes and must not wait for an ACK; set once here, it costs no system
     * call per session. */
    if (rc == 0 && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0)
        rc = -errno;
    if (rc == 0 && cl->transparent == CONFIG_TRANSPARENT_TPROXY)
        rc = listener_set_transparent(fd, sa->sa_family);
    if (rc == 0 && bind(fd, sa, cl->listen.salen) != 0)
        rc = -errno;
    if (rc != 0) {
        close(fd);
        return rc;
    }
    return fd;
}

int listener_probe(const struct config_listener *cl)
{
    int fd = listener_socket(cl, false);

    if (fd < 0)
        return fd;
    close(fd);
    return 0;
}

int listener_open(struct worker *w, const struct config_listener *cl, struct listener **out)
{
    struct listener *l = calloc(1, sizeof(*l));
    int rc;

    *out = NULL;
    if (l == NULL)
        return UV_ENOMEM;
    l->w = w;
    l->cl = cl;
    l->fd = listener_socket(cl, true);
    if (l->fd < 0) {
        rc = l->fd;
        free(l);
        return rc;
    }
    rc = listen(l->fd, LISTENER_BACKLOG) == 0 ? 0 : -errno;
    if (rc == 0)
        rc = uv_poll_init_socket(&w->loop, &l->poll, l->fd);
    if (rc != 0) {
        close(l->fd);
        free(l);
        return rc;
    }
    l->poll.data = l;
    uv_timer_init(&w->loop, &l->timer);
    l->timer.data = l;
    l->open_handles = 2;
    rc = uv_poll_start(&l->poll, UV_READABLE, listener_on_readable);
    if (rc != 0) {
        listener_close(l);
        return rc;
    }
    *out = l;
    return 0;
}

int listener_set_transparent(int fd, int family)
{
    int one = 1;
    int rc = family == AF_INET6 ? setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))
                                : setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one));
    return rc == 0 ? 0 : -errno;
}

int listener_original_dst(int fd, bool tproxy, struct sockaddr_storage *out)
{
    socklen_t len = sizeof(*out);

    /* After HAProxy's sock_inet_get_dst(): TPROXY keeps the original
     * destination as the socket's local address; REDIRECT rewrote it, and
     * conntrack remembers the original. */
    if (getsockname(fd, (struct sockaddr *)out, &len) != 0)
        return -errno;
    if (tproxy)
        return 0;
    len = sizeof(*out);
    int rc = out->ss_family == AF_INET6 ? getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, out, &len)
                                        : getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, out, &len);
    return rc == 0 ? 0 : -errno;
}

bool listener_addr_is_local(const struct sockaddr *sa)
{
    struct sockaddr_storage probe;
    socklen_t len =
        sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool local;

    if (fd < 0)
        return false;
    /* Binding without IP_TRANSPARENT succeeds only for this host's addresses. */
    memcpy(&probe, sa, len);
    if (probe.ss_family == AF_INET6)
        ((struct sockaddr_in6 *)&probe)->sin6_port = 0;
    else
        ((struct sockaddr_in *)&probe)->sin_port = 0;
    local = bind(fd, (const struct sockaddr *)&probe, len) == 0;
    close(fd);
    return local;
}

void listener_close(struct listener *l)
{
    /* uv_close stops polling at once, so the descriptor may go now: new
     * connects are refused from here on. */
    uv_close((uv_handle_t *)&l->poll, listener_on_closed);
    uv_close((uv_handle_t *)&l->timer, listener_on_closed);
    close(l->fd);
    l->fd = -1;
}
