/* krelay.c: eBPF sockmap setup and TCP byte counters; see krelay.h. */
#include "krelay.h"

#include "log.h"

#include <errno.h>
#include <linux/sockios.h>
#include <linux/tcp.h> /* a struct tcp_info with the byte counters */
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#ifdef MXPROXY_HAVE_SOCKMAP
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "krelay.skel.h"
#endif

static pthread_once_t krelay_once = PTHREAD_ONCE_INIT;
#ifdef MXPROXY_HAVE_SOCKMAP
static int krelay_map_fd = -1;    /* krelay_peers (redirect targets), or -1: unavailable */
static int krelay_active_fd = -1; /* krelay_active (the verdict runs on its sockets) */
#endif

static void krelay_log_unavailable(const char *reason)
{
    struct log_line l;

    log_begin(&l, LOG_WARN, "kernel_relay_unavailable");
    log_str(&l, "kernel_relay", "sockmap");
    log_str(&l, "reason", reason);
    log_str(&l, "fallback", "user space");
    log_end(&l);
}

#ifdef MXPROXY_HAVE_SOCKMAP
static char krelay_libbpf_msg[160]; /* libbpf's last warning, for reason= */

/* libbpf speaks through this instead of stderr, where the log lines go. */
static int krelay_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));
static int krelay_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    if (level == LIBBPF_WARN) {
        vsnprintf(krelay_libbpf_msg, sizeof(krelay_libbpf_msg), fmt, ap);
        krelay_libbpf_msg[strcspn(krelay_libbpf_msg, "\n")] = '\0';
    }
    return 0;
}

/* The loaded program and map: kept for the life of the process. */
static struct krelay_bpf *krelay_skel;

static void krelay_load(void)
{
    char reason[256];

    libbpf_set_print(krelay_libbpf_print);
    struct krelay_bpf *skel = krelay_bpf__open_and_load();
    if (skel == NULL) {
        snprintf(reason, sizeof(reason), "loading the eBPF program failed: %s%s%s", strerror(errno),
                 krelay_libbpf_msg[0] != '\0' ? ": " : "", krelay_libbpf_msg);
        krelay_log_unavailable(reason);
        return;
    }
    int map = bpf_map__fd(skel->maps.krelay_peers);
    int active = bpf_map__fd(skel->maps.krelay_active);
    int prog = bpf_program__fd(skel->progs.krelay_verdict);
    if (bpf_prog_attach(prog, active, BPF_SK_SKB_STREAM_VERDICT, 0) != 0) {
        snprintf(reason, sizeof(reason), "attaching the eBPF program failed: %s", strerror(errno));
        krelay_log_unavailable(reason);
        krelay_bpf__destroy(skel);
        return;
    }
    /* The map keeps the program attached: the skeleton is never freed, the
     * map lives as long as the process. */
    krelay_skel = skel;
    krelay_active_fd = active;
    krelay_map_fd = map;
}
#else
static void krelay_load(void)
{
    krelay_log_unavailable("built without eBPF support");
}
#endif

bool krelay_sockmap_available(void)
{
    (void)pthread_once(&krelay_once, krelay_load);
#ifdef MXPROXY_HAVE_SOCKMAP
    return krelay_map_fd >= 0;
#else
    return false;
#endif
}

#ifdef MXPROXY_HAVE_SOCKMAP
static int krelay_cookie(int fd, uint64_t *out)
{
    socklen_t len = sizeof(*out);

    return getsockopt(fd, SOL_SOCKET, SO_COOKIE, out, &len) == 0 ? 0 : -errno;
}

/* Bytes that arrived before fd joined the map wait in its receive queue
 * until the next segment wakes the verdict up, and a read() of fd would
 * still return them, ahead of nothing and behind nothing the kernel keeps in
 * order. Setting SO_RCVLOWAT runs the socket's data_ready at once
 * (tcp_set_rcvlowat), which is the verdict's now: the queue goes to the peer
 * before anything else can. Always, whatever FIONREAD says: on a socket in
 * the map it counts only what the verdict kept for the socket itself. */
static int krelay_kick(int fd)
{
    int one = 1;

    return setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one)) == 0 ? 0 : -errno;
}
#endif

int krelay_consumed(int fd, struct krelay_count *c)
{
    /* The queue's length and the byte count come from two calls: a segment
     * arriving between them would leave the two apart. Read the count on
     * both sides of the length until it stands still. */
    for (int i = 0; i < 4; i++) {
        struct krelay_count after = {0};
        int n = 0;
        int rc = krelay_counters(fd, c);
        if (rc != 0)
            return rc;
        if (ioctl(fd, SIOCINQ, &n) != 0)
            return -errno;
        rc = krelay_counters(fd, &after);
        if (rc != 0)
            return rc;
        if (after.rx == c->rx) {
            c->rx -= (uint64_t)n;
            return 0;
        }
    }
    return -EAGAIN;
}

#ifdef MXPROXY_HAVE_SOCKMAP
/* Deletes key from map; ENOENT (never added, or the socket closed) is fine. */
static void krelay_delete(int map, uint64_t key)
{
    (void)bpf_map_delete_elem(map, &key);
}
#endif

int krelay_sockmap_pair(int a, int b)
{
#ifdef MXPROXY_HAVE_SOCKMAP
    uint64_t ca, cb, va = (uint64_t)a, vb = (uint64_t)b;
    int rc = 0;

    if (krelay_map_fd < 0)
        return -ENOTSUP;
    if (krelay_cookie(a, &ca) != 0 || krelay_cookie(b, &cb) != 0)
        return -errno;
    /* The targets first, each under its peer's cookie; then the verdict on
     * a and on b: whenever it runs on a socket, its peer is there. */
    if (bpf_map_update_elem(krelay_map_fd, &cb, &va, BPF_NOEXIST) != 0 ||
        bpf_map_update_elem(krelay_map_fd, &ca, &vb, BPF_NOEXIST) != 0 ||
        bpf_map_update_elem(krelay_active_fd, &ca, &va, BPF_NOEXIST) != 0 ||
        bpf_map_update_elem(krelay_active_fd, &cb, &vb, BPF_NOEXIST) != 0)
        rc = -errno;
    if (rc == 0)
        rc = krelay_kick(a);
    if (rc == 0)
        rc = krelay_kick(b);
    if (rc != 0)
        krelay_sockmap_unpair(a, b);
    return rc;
#else
    (void)a;
    (void)b;
    return -ENOTSUP;
#endif
}

void krelay_sockmap_unpair(int a, int b)
{
#ifdef MXPROXY_HAVE_SOCKMAP
    uint64_t ca, cb;

    if (krelay_cookie(a, &ca) != 0 || krelay_cookie(b, &cb) != 0)
        return;
    krelay_delete(krelay_active_fd, ca);
    krelay_delete(krelay_active_fd, cb);
    krelay_delete(krelay_map_fd, ca);
    krelay_delete(krelay_map_fd, cb);
#else
    (void)a;
    (void)b;
#endif
}

int krelay_counters(int fd, struct krelay_count *c)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    int outq = 0;

    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
        return -errno;
    if (len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
        return -ENOTSUP;
    if (ioctl(fd, SIOCOUTQ, &outq) != 0)
        return -errno;
    c->rx = ti.tcpi_bytes_received;
    c->tx = ti.tcpi_bytes_acked + (uint64_t)outq;
    c->idle_ms = ti.tcpi_last_data_recv;
    return 0;
}
