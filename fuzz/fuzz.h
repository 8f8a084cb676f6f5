/* fuzz.h: what every mxproxy libFuzzer harness in fuzz/ shares.
 *
 * FUZZ_CHECK(cond) prints the location and the condition to stderr and aborts when cond is
 * false, so libFuzzer keeps the input that broke an invariant. Checks are for invariants of
 * mxproxy's own code, never a verdict on the input.
 */
#ifndef MXPROXY_FUZZ_H
#define MXPROXY_FUZZ_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* libFuzzer's entry point: called once per input; data is libFuzzer's, valid for the call. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* True when data (sent after the byte before) has a LF without a CR before it: a peer that
 * ends a line so. The session harnesses let mxproxy's own line follow such a line end. */
static inline bool fuzz_has_bare_lf(const char *data, size_t len, char before)
{
    for (size_t i = 0; i < len; i++)
        if (data[i] == '\n' && (i > 0 ? data[i - 1] : before) != '\r')
            return true;
    return false;
}

/* This process's own loopback address, 127.x.y.z made of its pid (the whole of 127.0.0.0/8
 * is local on Linux): harnesses running side by side, each picking free ports and binding
 * them a moment later, can never pick the same address and port. Host byte order. */
static inline uint32_t fuzz_loopback(void)
{
    return 0x7f000000u | ((uint32_t)getpid() & 0xffffffu);
}

/* fuzz_loopback() as text, for a config. */
static inline const char *fuzz_loopback_text(void)
{
    static char text[INET_ADDRSTRLEN];
    struct in_addr a = {.s_addr = htonl(fuzz_loopback())};

    FUZZ_CHECK(inet_ntop(AF_INET, &a, text, sizeof(text)) != NULL);
    return text;
}

/* n distinct free TCP ports on fuzz_loopback(): every probe socket is held until all are
 * picked, so the kernel cannot hand out one port twice. */
static inline void fuzz_free_ports(int *ports, size_t n)
{
    int fds[64];

    FUZZ_CHECK(n <= sizeof(fds) / sizeof(fds[0]));
    for (size_t i = 0; i < n; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(fuzz_loopback())};
        socklen_t len = sizeof(a);

        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        FUZZ_CHECK(fds[i] >= 0);
        FUZZ_CHECK(bind(fds[i], (struct sockaddr *)&a, sizeof(a)) == 0);
        FUZZ_CHECK(getsockname(fds[i], (struct sockaddr *)&a, &len) == 0);
        ports[i] = ntohs(a.sin_port);
    }
    for (size_t i = 0; i < n; i++)
        close(fds[i]);
}

#endif
