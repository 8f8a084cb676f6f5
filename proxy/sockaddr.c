/* sockaddr.c: see sockaddr.h. */
#include "sockaddr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "fmt.h"

/* IPv4 by hand: glibc's inet_ntop formats it with sprintf, and every logged session
 * formats its client's address once. IPv6 keeps inet_ntop for its zero compression. */
char *sockaddr_format(const struct sockaddr *sa, char *out, size_t cap)
{
    char text[SOCKADDR_TEXT_MAX];
    char *p = text;

    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        const unsigned char *a = (const unsigned char *)&in->sin_addr;
        for (int i = 0; i < 4; i++) {
            p += fmt_u64(p, a[i]);
            *p++ = i < 3 ? '.' : ':';
        }
        p += fmt_u64(p, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        *p++ = '[';
        inet_ntop(AF_INET6, &in6->sin6_addr, p, INET6_ADDRSTRLEN);
        p += strlen(p);
        *p++ = ']';
        *p++ = ':';
        p += fmt_u64(p, ntohs(in6->sin6_port));
    } else {
        *p++ = '-';
    }
    if (cap == 0)
        return out;
    size_t n = (size_t)(p - text) < cap ? (size_t)(p - text) : cap - 1;
    memcpy(out, text, n);
    out[n] = '\0';
    return out;
}

bool sockaddr_equal(const struct sockaddr *a, const struct sockaddr *b)
{
    if (a->sa_family != b->sa_family)
        return false;
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        const struct sockaddr_in *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->sa_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0 &&
               x->sin6_scope_id == y->sin6_scope_id;
    }
    return false;
}

unsigned sockaddr_port(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    if (sa->sa_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    return 0;
}
