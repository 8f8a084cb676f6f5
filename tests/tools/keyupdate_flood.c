/* keyupdate_flood.c: a TLS 1.3 client that asks for key updates and never
 * reads, for tests/integration/test_memory.py.
 *
 *     keyupdate_flood HOST PORT SECONDS
 *
 * Connects, shakes hands (TLS 1.3, no certificate check), prints "ready" and
 * then, for SECONDS, sends KeyUpdate messages with update_requested set: the
 * server must answer each with its own KeyUpdate, which this client never
 * reads. Its receive buffer is small, so the answers pile up at the server.
 * The records are made in memory and sent in batches, so the flood is limited
 * by the server, not by a system call per message. Exits 0 after SECONDS (or
 * when the server stops reading and a write blocks until the deadline), 1 on
 * a setup error. Prints how many it sent.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

static double keyupdate_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: keyupdate_flood HOST PORT SECONDS\n");
        return 1;
    }
    double until = keyupdate_now() + atof(argv[3]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096, mss = 536;
    const double patience = 2.0; /* seconds a blocked write may wait */
    /* A blocked write gives up after a while, so the deadline holds. */
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    /* A small MSS keeps the server's kernel send buffer toward us small too:
     * what piles up must pile up in the server's own memory. */
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
        connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        perror("connect");
        return 1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1 || SSL_connect(ssl) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    BIO *mem = BIO_new(BIO_s_mem());
    if (mem == NULL) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    SSL_set0_wbio(ssl, mem); /* records go to memory; the socket stays the read BIO */
    printf("ready\n");
    fflush(stdout);
    unsigned long sent = 0;
    bool blocked = false;
    while (!blocked && keyupdate_now() < until) {
        for (int i = 0; i < 64; i++) {
            /* Makes the KeyUpdate record; nothing the server says is read. */
            if (SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) != 1 || SSL_do_handshake(ssl) != 1) {
                ERR_print_errors_fp(stderr);
                return 1;
            }
            sent++;
        }
        char *p;
        long n = BIO_get_mem_data(mem, &p);
        double since = keyupdate_now();
        while (n > 0) {
            ssize_t w = send(fd, p, (size_t)n, MSG_NOSIGNAL);
            if (w < 0 && errno == EAGAIN && keyupdate_now() - since < patience &&
                keyupdate_now() < until)
                continue; /* a slow server, not yet a stopped one */
            if (w <= 0) {
                blocked = true; /* the server stopped reading (or left) */
                break;
            }
            p += w;
            n -= w;
            since = keyupdate_now();
        }
        (void)BIO_reset(mem);
    }
    printf("sent %lu%s\n", sent, blocked ? " blocked" : "");
    /* Whatever failed (a write that timed out), the deadline is what counts. */
    while (keyupdate_now() < until)
        usleep(10000);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return 0;
}
