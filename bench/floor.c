/* floor.c: the floor relay, the limit for a user-space relay on this machine.
 *
 *   bench-floor THREADS LISTEN_PORT BACKEND_PORT [LISTEN_PORT BACKEND_PORT ...]
 *
 * Listens on 127.0.0.1:LISTEN_PORT (each pair) and relays every connection to
 * 127.0.0.1:BACKEND_PORT with the least a user-space relay can do: the backend
 * connect starts at accept; both sockets are registered once, edge-triggered,
 * for reading and writing, and never touched again until close (which removes
 * them); reads go into a 16 KiB buffer per thread and are written at once, and
 * only what the peer does not take is copied aside (its direction stops reading
 * until that is written); EOF is passed on as a half-close after the last byte;
 * no logging, no timers, no socket options. THREADS threads, each with its own
 * epoll set and its own SO_REUSEPORT listener per port.
 *
 * bench/run measures every proxy's CPU per session as a ratio to this one: it is
 * not a proxy (no timeouts, no limits, no failover), only the cost of moving
 * the bytes through user space. Runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define FLOOR_BUF (16 * 1024)
#define FLOOR_MAX_PORTS 8

struct pair;

/* One socket of a pair; the epoll data points here. */
struct side {
    int fd;
    struct pair *p;
    int idx; /* 0 client, 1 backend */
};

struct pair {
    struct side s[2];
    char *held[2];   /* bytes read from s[i] that s[1-i] did not take yet, or NULL */
    size_t held_off[2], held_len[2];
    bool eof[2];     /* s[i] sent EOF */
    bool shut[2];    /* s[i] was shut down for writing */
    bool dead;
};

struct lis {
    int fd;
    struct sockaddr_in backend;
};

static struct sockaddr_in floor_backends[FLOOR_MAX_PORTS];
static int floor_ports[FLOOR_MAX_PORTS];
static int floor_nports;

/* Pairs closed during one epoll_wait batch are freed after it: a later event of
 * the same batch may still point at them. */
static __thread struct pair *floor_graveyard[256];
static __thread int floor_ndead;

static void floor_close(struct pair *p)
{
    if (p->dead)
        return;
    p->dead = true;
    close(p->s[0].fd); /* closing removes the fd from the epoll set */
    close(p->s[1].fd);
    floor_graveyard[floor_ndead++] = p;
}

static void floor_bury(void)
{
    for (int i = 0; i < floor_ndead; i++) {
        free(floor_graveyard[i]->held[0]);
        free(floor_graveyard[i]->held[1]);
        free(floor_graveyard[i]);
    }
    floor_ndead = 0;
}

/* After EOF from s[i] and every byte of it written: the half-close. */
static void floor_fin(struct pair *p, int i)
{
    if (p->eof[i] && p->held[i] == NULL && !p->shut[1 - i]) {
        p->shut[1 - i] = true;
        shutdown(p->s[1 - i].fd, SHUT_WR);
    }
}

/* Writes what direction i holds to s[1-i]. Returns -1 on error, 0 if still held, 1 if empty. */
static int floor_flush(struct pair *p, int i)
{
    while (p->held[i] != NULL) {
        ssize_t n = write(p->s[1 - i].fd, p->held[i] + p->held_off[i], p->held_len[i] - p->held_off[i]);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        p->held_off[i] += (size_t)n;
        if (p->held_off[i] == p->held_len[i]) {
            free(p->held[i]);
            p->held[i] = NULL;
        }
    }
    floor_fin(p, i);
    return 1;
}

/* Moves bytes from s[i] to s[1-i]. Edge-triggered, yet a read shorter than the buffer
 * drained the socket (a new edge comes with new bytes), so no read ends in EAGAIN
 * unless the peer's FIN is pending (rdhup). Returns -1 to close. */
static int floor_pump(struct pair *p, int i, char *buf, bool rdhup)
{
    if (p->held[i] != NULL)
        return 0; /* paused until s[1-i] takes what it holds */
    while (!p->eof[i]) {
        ssize_t n = read(p->s[i].fd, buf, FLOOR_BUF);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        if (n == 0) {
            p->eof[i] = true;
            break;
        }
        ssize_t w = write(p->s[1 - i].fd, buf, (size_t)n);
        if (w < 0) {
            if (errno != EAGAIN)
                return -1;
            w = 0;
        }
        if (w < n) {
            p->held[i] = malloc((size_t)(n - w));
            if (p->held[i] == NULL)
                return -1;
            memcpy(p->held[i], buf + w, (size_t)(n - w));
            p->held_off[i] = 0;
            p->held_len[i] = (size_t)(n - w);
            return 0;
        }
        if (n < FLOOR_BUF && !rdhup)
            return 0;
    }
    floor_fin(p, i);
    return 0;
}

static void floor_accept(int ep, const struct lis *l)
{
    for (;;) {
        int c = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0)
            return;
        int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (b < 0) {
            close(c);
            continue;
        }
        if (connect(b, (struct sockaddr *)&l->backend, sizeof(l->backend)) != 0 && errno != EINPROGRESS) {
            close(b);
            close(c);
            continue;
        }
        struct pair *p = calloc(1, sizeof(*p));
        if (p == NULL) {
            close(b);
            close(c);
            continue;
        }
        p->s[0] = (struct side){.fd = c, .p = p, .idx = 0};
        p->s[1] = (struct side){.fd = b, .p = p, .idx = 1};
        for (int i = 0; i < 2; i++) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                     .data.ptr = &p->s[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, p->s[i].fd, &ev);
        }
    }
}

static void *floor_thread(void *arg)
{
    (void)arg;
    static __thread char buf[FLOOR_BUF];
    struct lis lis[FLOOR_MAX_PORTS];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        exit(1);
    }
    for (int k = 0; k < floor_nports; k++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)floor_ports[k])};
        int one = 1;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        lis[k].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        lis[k].backend = floor_backends[k];
        setsockopt(lis[k].fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        setsockopt(lis[k].fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
        if (bind(lis[k].fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(lis[k].fd, 4096) != 0) {
            perror("bind/listen");
            exit(1);
        }
        /* The listener is the only level-triggered registration; data.ptr NULL + u32 marks it. */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)k + 1};
        epoll_ctl(ep, EPOLL_CTL_ADD, lis[k].fd, &ev);
    }
    struct epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(ep, evs, 128, -1);
        for (int e = 0; e < n; e++) {
            if (evs[e].data.u64 <= (uint64_t)floor_nports) {
                floor_accept(ep, &lis[evs[e].data.u64 - 1]);
                continue;
            }
            struct side *sd = evs[e].data.ptr;
            struct pair *p = sd->p;
            uint32_t what = evs[e].events;
            int i = sd->idx;
            if (p->dead)
                continue;
            int rc = 0;
            /* s[i] writable: what direction 1-i holds can go; then that direction reads on. */
            if ((what & EPOLLOUT) && p->held[1 - i] != NULL) {
                rc = floor_flush(p, 1 - i);
                if (rc == 1)
                    rc = floor_pump(p, 1 - i, buf, true);
            }
            if (rc >= 0 && (what & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                rc = floor_pump(p, i, buf, (what & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
            if (rc < 0 || (p->shut[0] && p->shut[1]))
                floor_close(p);
        }
        floor_bury();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (argc - 2) % 2 != 0 || (argc - 2) / 2 > FLOOR_MAX_PORTS) {
        fprintf(stderr, "usage: %s THREADS LISTEN_PORT BACKEND_PORT [LISTEN_PORT BACKEND_PORT ...]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    for (int i = 2; i + 1 < argc; i += 2) {
        floor_ports[floor_nports] = atoi(argv[i]);
        floor_backends[floor_nports] = (struct sockaddr_in){.sin_family = AF_INET,
                                                            .sin_port = htons((unsigned short)atoi(argv[i + 1]))};
        floor_backends[floor_nports].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        floor_nports++;
    }
    pthread_t t[64];
    if (threads < 1 || threads > 64)
        threads = 2;
    for (int i = 1; i < threads; i++)
        pthread_create(&t[i], NULL, floor_thread, NULL);
    floor_thread(NULL);
    return 0;
}
