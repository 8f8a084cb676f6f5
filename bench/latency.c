/* latency.c: the bench's small SMTP client and discard server.
 *
 *   latency greet HOST PORT[,PORT...] N [WARMUP]
 *       N times per port, one session after the other: connect, time from
 *       the start of connect() to the first byte of the server's greeting,
 *       then send QUIT and read to EOF so the server side closes first (no
 *       TIME_WAIT piles up on the client's ephemeral ports) and the previous
 *       session is torn down before the next one is timed. With several
 *       ports the sessions alternate between them, so a busy moment of the
 *       machine hits every target alike, and the cycle's first port rotates:
 *       cycle i goes p[i mod n], p[i+1 mod n], ... Every target thus takes
 *       every slot (first, right after each other target) equally often; a
 *       fixed order favours whichever target follows the fastest one, since
 *       the previous session's teardown still runs on the other core.
 *       WARMUP sessions per port (default 100) go first and are not counted.
 *       Prints one JSON object per port, one per line, in argument order:
 *       {"port":..,"n":..,"errors":..,"median_us":..,"p99_us":..,"mean_us":..,"min_us":..,"max_us":..}
 *
 *   latency idle HOST PORT N
 *       Opens N connections one after the other and reads each greeting
 *       line, keeps them all open and idle, prints "ready OK ERRORS" and
 *       waits until a line (or EOF) arrives on stdin, then closes them all
 *       and prints "closed".
 *
 *   latency discard HOST PORT
 *       A server for the raw relay test: for each connection (one child
 *       process each) it sends a 220 greeting, reads and discards everything
 *       until EOF, then answers "250 BYTES" and closes.
 *
 *   latency blast HOST PORT BYTES
 *       Connects, reads the greeting, writes BYTES in 256 KiB chunks, shuts
 *       down its sending side and waits for the "250 BYTES" answer, so the
 *       time covers every byte arriving at the far end. Prints
 *       {"bytes":..,"elapsed_s":..,"mb_per_s":..}.
 *
 *   latency tlsgreet HOST PORT[,PORT...] N [WARMUP]
 *       greet over implicit TLS: the time runs from the start of connect()
 *       through the full handshake to the first plaintext byte of the
 *       greeting. Same rotation, QUIT and read to EOF, same output.
 *
 *   latency tlshs HOST PORT N CONC
 *       N full TLS handshakes in all, by CONC threads at once, each doing
 *       its share one after the other: connect, handshake, read the greeting
 *       line, send close_notify, close. Prints
 *       {"n":..,"errors":..,"resumed":..,"elapsed_s":..,"hs_per_s":..}.
 *
 *   latency tlsidle HOST PORT N
 *       idle over implicit TLS: N connections that completed the handshake
 *       and read the greeting, then held open.
 *
 * TLS client side, in every mode: TLS 1.3 only, OpenSSL's default ciphers
 * and groups, no certificate verification (the certificate is still sent
 * and its signature checked by the handshake), and never a resumption: one
 * SSL_CTX with SSL_OP_NO_TICKET and its session cache off, a new SSL per
 * connection and no SSL_set_session(), so every handshake is a full one
 * (checked: a resumed one counts as an error / in "resumed").
 *
 * Built by bench/run with cc -O2 ... -lssl -lcrypto -lpthread.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

static struct sockaddr_in target;

#define MAX_PORTS 16

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static SSL_CTX *client_ctx;

static int tls_init(void)
{
    client_ctx = SSL_CTX_new(TLS_client_method());
    if (!client_ctx)
        return -1;
    SSL_CTX_set_min_proto_version(client_ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(client_ctx, TLS1_3_VERSION);
    SSL_CTX_set_options(client_ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(client_ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_verify(client_ctx, SSL_VERIFY_NONE, NULL);
    return 0;
}

/* Connects to port and completes a full TLS handshake. Returns the SSL (its
 * fd is SSL_get_fd) or NULL. *resumed is set when the server resumed. */
static SSL *tls_connect(const struct sockaddr_in *to, int *resumed)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return NULL;
    set_timeouts(fd, 10);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) {
        close(fd);
        return NULL;
    }
    SSL *ssl = SSL_new(client_ctx);
    if (!ssl || !SSL_set_fd(ssl, fd) || SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(fd);
        ERR_clear_error();
        return NULL;
    }
    if (SSL_session_reused(ssl))
        *resumed = 1;
    return ssl;
}

static void tls_close(SSL *ssl, int notify)
{
    int fd = SSL_get_fd(ssl);
    if (notify)
        SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    ERR_clear_error();
}

/* Reads the rest of the greeting line after n bytes in buf. 0 or -1. */
static int tls_finish_line(SSL *ssl, char *buf, int size, int n)
{
    while (!memchr(buf, '\n', (size_t)n)) {
        n = SSL_read(ssl, buf, size);
        if (n <= 0)
            return -1;
    }
    return 0;
}

/* One timed session over implicit TLS: from the start of connect() to the
 * first plaintext byte of the greeting. Returns ns or -1. */
static long long one_tls_session(unsigned short port)
{
    struct sockaddr_in to = target;
    to.sin_port = htons(port);
    char buf[4096];
    int resumed = 0;
    long long t0 = now_ns();
    SSL *ssl = tls_connect(&to, &resumed);
    if (!ssl)
        return -1;
    int n = SSL_read(ssl, buf, sizeof buf);
    long long t1 = now_ns();
    if (n <= 0 || buf[0] != '2' || resumed || tls_finish_line(ssl, buf, sizeof buf, n) < 0) {
        tls_close(ssl, 0);
        return -1;
    }
    static const char quit[] = "QUIT\r\n";
    if (SSL_write(ssl, quit, sizeof quit - 1) != (int)(sizeof quit - 1)) {
        tls_close(ssl, 0);
        return -1;
    }
    while (SSL_read(ssl, buf, sizeof buf) > 0)
        ;
    tls_close(ssl, 0);
    return t1 - t0;
}

/* One timed session. Returns the greeting latency in ns, or -1. */
static long long one_session(unsigned short port)
{
    target.sin_port = htons(port);
    char buf[4096];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, 10);
    long long t0 = now_ns();
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        close(fd);
        return -1;
    }
    ssize_t n = read(fd, buf, sizeof buf);
    long long t1 = now_ns();
    if (n <= 0 || buf[0] != '2') {
        close(fd);
        return -1;
    }
    /* Finish the greeting line if it came in pieces, then say goodbye. */
    while (!memchr(buf, '\n', (size_t)n)) {
        n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            close(fd);
            return -1;
        }
    }
    static const char quit[] = "QUIT\r\n";
    if (write(fd, quit, sizeof quit - 1) != (ssize_t)(sizeof quit - 1)) {
        close(fd);
        return -1;
    }
    while ((n = read(fd, buf, sizeof buf)) > 0)
        ;
    close(fd);
    return t1 - t0;
}

static void report(unsigned short port, long long *s, int n, int errors)
{
    if (n == 0) {
        printf("{\"port\":%u,\"n\":0,\"errors\":%d}\n", port, errors);
        return;
    }
    qsort(s, (size_t)n, sizeof *s, cmp_ll);
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += (double)s[i];
    double med = n % 2 ? (double)s[n / 2] : ((double)s[n / 2 - 1] + (double)s[n / 2]) / 2;
    int p99i = (int)((double)n * 0.99 + 0.5) - 1;
    if (p99i < 0)
        p99i = 0;
    if (p99i >= n)
        p99i = n - 1;
    printf("{\"port\":%u,\"n\":%d,\"errors\":%d,\"median_us\":%.1f,\"p99_us\":%.1f,\"mean_us\":%.1f,"
           "\"min_us\":%.1f,\"max_us\":%.1f}\n",
           port, n, errors, med / 1e3, (double)s[p99i] / 1e3, sum / n / 1e3, (double)s[0] / 1e3,
           (double)s[n - 1] / 1e3);
}

static int mode_greet(const char *portlist, int count, int warmup, long long (*session)(unsigned short))
{
    unsigned short ports[MAX_PORTS];
    int np = 0;
    char *copy = strdup(portlist), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && np < MAX_PORTS; t = strtok_r(NULL, ",", &save))
        ports[np++] = (unsigned short)atoi(t);
    free(copy);
    if (np == 0)
        return 64;
    long long *s[MAX_PORTS];
    int n[MAX_PORTS] = {0}, errors[MAX_PORTS] = {0};
    for (int p = 0; p < np; p++)
        if (!(s[p] = calloc((size_t)count, sizeof **s)))
            return 1;
    /* Cycle i starts at port i mod np: every port takes every slot. */
    for (int i = 0; i < warmup; i++)
        for (int k = 0; k < np; k++) {
            int p = (i + k) % np;
            if (session(ports[p]) < 0)
                errors[p]++;
        }
    for (int p = 0; p < np; p++) {
        if (errors[p] > warmup / 2) {
            fprintf(stderr, "latency: warm-up of port %u failed (%d/%d errors)\n", ports[p], errors[p], warmup);
            return 1;
        }
        errors[p] = 0;
    }
    for (int i = 0; i < count; i++)
        for (int k = 0; k < np; k++) {
            int p = (i + k) % np;
            long long v = session(ports[p]);
            if (v < 0)
                errors[p]++;
            else
                s[p][n[p]++] = v;
        }
    int rc = 0;
    for (int p = 0; p < np; p++) {
        report(ports[p], s[p], n[p], errors[p]);
        if (errors[p])
            rc = 2;
        free(s[p]);
    }
    return rc;
}

static int mode_idle(int count, int tls)
{
    int *fds = calloc((size_t)count, sizeof *fds);
    SSL **ssls = calloc((size_t)count, sizeof *ssls);
    if (!fds || !ssls)
        return 1;
    int ok = 0, errors = 0;
    char buf[1024];
    for (int i = 0; i < count; i++) {
        if (tls) {
            int resumed = 0;
            SSL *ssl = tls_connect(&target, &resumed);
            if (!ssl) {
                errors++;
                continue;
            }
            int n = SSL_read(ssl, buf, sizeof buf);
            if (n <= 0 || buf[0] != '2' || resumed || tls_finish_line(ssl, buf, sizeof buf, n) < 0) {
                tls_close(ssl, 0);
                errors++;
                continue;
            }
            ssls[ok] = ssl;
            fds[ok++] = SSL_get_fd(ssl);
            continue;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            errors++;
            continue;
        }
        set_timeouts(fd, 10);
        if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
            close(fd);
            errors++;
            continue;
        }
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0 || buf[0] != '2') {
            close(fd);
            errors++;
            continue;
        }
        fds[ok++] = fd;
    }
    printf("ready %d %d\n", ok, errors);
    fflush(stdout);
    if (!fgets(buf, sizeof buf, stdin)) {
        /* EOF: close all the same */
    }
    for (int i = 0; i < ok; i++) {
        if (ssls[i])
            SSL_free(ssls[i]);
        close(fds[i]);
    }
    printf("closed\n");
    fflush(stdout);
    free(fds);
    free(ssls);
    return 0;
}

#define CHUNK (256 * 1024)

static int mode_discard(void)
{
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&target, sizeof target) < 0 || listen(ls, 1024) < 0) {
        perror("latency discard: bind/listen");
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            perror("latency discard: accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(ls);
            static char buf[CHUNK];
            static const char hello[] = "220 discard ready\r\n";
            if (write(fd, hello, sizeof hello - 1) < 0)
                _exit(1);
            long long total = 0;
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0)
                total += n;
            int len = snprintf(buf, 64, "250 %lld\r\n", total);
            if (write(fd, buf, (size_t)len) < 0)
                _exit(1);
            _exit(0);
        }
        close(fd);
    }
}

static int mode_blast(long long bytes)
{
    signal(SIGPIPE, SIG_IGN);
    static char buf[CHUNK];
    memset(buf, 'x', sizeof buf);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    set_timeouts(fd, 60);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        perror("latency blast: connect");
        return 1;
    }
    char in[256];
    ssize_t n = read(fd, in, sizeof in - 1);
    if (n <= 0 || in[0] != '2') {
        fprintf(stderr, "latency blast: no greeting\n");
        return 1;
    }
    long long t0 = now_ns(), left = bytes;
    while (left > 0) {
        size_t want = left < CHUNK ? (size_t)left : CHUNK;
        ssize_t w = write(fd, buf, want);
        if (w <= 0) {
            perror("latency blast: write");
            return 1;
        }
        left -= w;
    }
    shutdown(fd, SHUT_WR);
    size_t got = 0;
    while (got < sizeof in - 1 && (n = read(fd, in + got, sizeof in - 1 - got)) > 0)
        got += (size_t)n;
    long long t1 = now_ns();
    in[got] = 0;
    long long echoed = -1;
    if (sscanf(in, "250 %lld", &echoed) != 1 || echoed != bytes) {
        fprintf(stderr, "latency blast: far end counted %lld of %lld bytes (%s)\n", echoed, bytes, in);
        return 1;
    }
    double el = (double)(t1 - t0) / 1e9;
    printf("{\"bytes\":%lld,\"elapsed_s\":%.4f,\"mb_per_s\":%.1f}\n", bytes, el, (double)bytes / el / 1e6);
    close(fd);
    return 0;
}

/* ---- tlshs: full handshakes per second -------------------------------------------------- */

struct hs_worker {
    pthread_t th;
    int todo, errors, resumed;
};

static void *hs_run(void *arg)
{
    struct hs_worker *w = arg;
    char buf[1024];
    for (int i = 0; i < w->todo; i++) {
        int resumed = 0;
        SSL *ssl = tls_connect(&target, &resumed);
        if (!ssl) {
            w->errors++;
            continue;
        }
        w->resumed += resumed;
        int n = SSL_read(ssl, buf, sizeof buf);
        if (n <= 0 || buf[0] != '2' || tls_finish_line(ssl, buf, sizeof buf, n) < 0) {
            w->errors++;
            tls_close(ssl, 0);
            continue;
        }
        tls_close(ssl, 1);
    }
    return NULL;
}

static int mode_hs(int count, int conc)
{
    if (conc < 1 || conc > 256)
        return 64;
    struct hs_worker *w = calloc((size_t)conc, sizeof *w);
    if (!w)
        return 1;
    for (int i = 0; i < conc; i++)
        w[i].todo = count / conc + (i < count % conc);
    long long t0 = now_ns();
    for (int i = 0; i < conc; i++)
        if (pthread_create(&w[i].th, NULL, hs_run, &w[i]) != 0)
            return 1;
    int errors = 0, resumed = 0;
    for (int i = 0; i < conc; i++) {
        pthread_join(w[i].th, NULL);
        errors += w[i].errors;
        resumed += w[i].resumed;
    }
    double el = (double)(now_ns() - t0) / 1e9;
    int done = count - errors;
    printf("{\"n\":%d,\"errors\":%d,\"resumed\":%d,\"conc\":%d,\"elapsed_s\":%.4f,\"hs_per_s\":%.1f}\n", done,
           errors, resumed, conc, el, (double)done / el);
    free(w);
    return errors || resumed ? 2 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (argc < 5 && strcmp(argv[1], "discard") != 0)) {
        fprintf(stderr,
                "usage: %s greet|tlsgreet|idle|tlsidle|blast HOST PORT N [WARMUP] | tlshs HOST PORT N CONC | "
                "discard HOST PORT\n",
                argv[0]);
        return 64;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &target.sin_addr) != 1) {
        fprintf(stderr, "latency: bad IPv4 address %s\n", argv[2]);
        return 64;
    }
    if (strcmp(argv[1], "discard") == 0)
        return mode_discard();
    if (strcmp(argv[1], "blast") == 0)
        return mode_blast(atoll(argv[4]));
    int count = atoi(argv[4]);
    if (count <= 0)
        return 64;
    if (strcmp(argv[1], "greet") == 0)
        return mode_greet(argv[3], count, argc > 5 ? atoi(argv[5]) : 100, one_session);
    if (strcmp(argv[1], "idle") == 0)
        return mode_idle(count, 0);
    signal(SIGPIPE, SIG_IGN);
    if (tls_init() < 0) {
        fprintf(stderr, "latency: SSL_CTX_new failed\n");
        return 1;
    }
    if (strcmp(argv[1], "tlsgreet") == 0)
        return mode_greet(argv[3], count, argc > 5 ? atoi(argv[5]) : 100, one_tls_session);
    if (strcmp(argv[1], "tlsidle") == 0)
        return mode_idle(count, 1);
    if (strcmp(argv[1], "tlshs") == 0)
        return mode_hs(count, argc > 5 ? atoi(argv[5]) : 8);
    fprintf(stderr, "latency: unknown mode %s\n", argv[1]);
    return 64;
}
