/* listener.c: SO_REUSEPORT listening sockets; see listener.h. */
#include "listener.h"

#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "session.h"
#include "worker.h"

#define LISTENER_BACKLOG 4096 /* the kernel caps it at net.core.somaxconn */

static void listener_on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;

    if (status < 0) {
        /* EMFILE and friends: log and keep listening, libuv retries. */
        log_msg(LOG_ERROR, "accept_error", "listener %s: %s", l->cl->name, uv_strerror(status));
        return;
    }
    session_accept(l);
}

static void listener_on_closed(uv_handle_t *h)
{
    free(h->data);
}

int listener_open(struct worker *w, const struct config_listener *cl, struct listener **out)
{
    const struct sockaddr *sa = (const struct sockaddr *)&cl->listen.sa;
    struct listener *l = calloc(1, sizeof(*l));
    uv_os_fd_t fd;
    int one = 1;
    int rc;

    *out = NULL;
    if (l == NULL)
        return UV_ENOMEM;
    l->w = w;
    l->cl = cl;
    /* Creates the socket now, so SO_REUSEPORT can be set before bind. */
    rc = uv_tcp_init_ex(&w->loop, &l->handle, sa->sa_family);
    if (rc != 0) {
        free(l);
        return rc;
    }
    l->handle.data = l;
    rc = uv_fileno((uv_handle_t *)&l->handle, &fd);
    if (rc == 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
        rc = -errno;
    if (rc == 0 && cl->transparent == CONFIG_TRANSPARENT_TPROXY)
        rc = listener_set_transparent(fd, sa->sa_family);
    /* IPv6 listeners take IPv6 only: [::]:25 beside 0.0.0.0:25 must not
     * silently split IPv4 traffic between two listeners. */
    if (rc == 0)
        rc = uv_tcp_bind(&l->handle, sa, sa->sa_family == AF_INET6 ? UV_TCP_IPV6ONLY : 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&l->handle, LISTENER_BACKLOG, listener_on_connection);
    if (rc != 0) {
        uv_close((uv_handle_t *)&l->handle, listener_on_closed);
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
    /* uv_close closes the fd at once: new connects are refused from here on. */
    uv_close((uv_handle_t *)&l->handle, listener_on_closed);
}
