/* cidr.c: address blocks for allow/deny lists; see cidr.h. */
#include "cidr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

static const uint8_t cidr_v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

const char *cidr_strerror(enum cidr_err err)
{
    switch (err) {
    case CIDR_OK:
        return "ok";
    case CIDR_ERR_EMPTY:
        return "empty address block";
    case CIDR_ERR_TOO_LONG:
        return "address block too long";
    case CIDR_ERR_ADDRESS:
        return "not an IPv4 or IPv6 address";
    case CIDR_ERR_PREFIX:
        return "prefix length is not a number";
    case CIDR_ERR_PREFIX_MAX:
        return "prefix length too large";
    case CIDR_ERR_HOST_BITS:
        return "host bits set past the prefix length";
    }
    return "unknown error";
}

/* True when bits of addr past prefix (of nbytes bytes) are all 0. */
static bool cidr_host_bits_clear(const uint8_t *addr, unsigned nbytes, unsigned prefix)
{
    for (unsigned i = prefix / 8; i < nbytes; i++) {
        unsigned keep = i == prefix / 8 ? prefix % 8 : 0;
        uint8_t host = (uint8_t)(0xffu >> keep);
        if (addr[i] & host)
            return false;
    }
    return true;
}

enum cidr_err cidr_parse(const char *text, size_t len, struct cidr *out)
{
    char buf[CIDR_TEXT_MAX + 1];
    struct cidr c = {0};
    unsigned max;
    unsigned prefix;

    memset(out, 0, sizeof(*out));
    if (len == 0)
        return CIDR_ERR_EMPTY;
    if (len > CIDR_TEXT_MAX)
        return CIDR_ERR_TOO_LONG;
    memcpy(buf, text, len);
    buf[len] = '\0';
    if (memchr(buf, '\0', len) != NULL)
        return CIDR_ERR_ADDRESS; /* an embedded NUL would hide the rest from inet_pton */

    char *slash = strchr(buf, '/');
    if (slash != NULL)
        *slash = '\0';
    if (inet_pton(AF_INET, buf, c.addr) == 1) {
        c.family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, buf, c.addr) == 1) {
        c.family = AF_INET6;
        max = 128;
    } else {
        return CIDR_ERR_ADDRESS;
    }

    prefix = max;
    if (slash != NULL) {
        const char *d = slash + 1;
        if (*d == '\0' || strlen(d) > 3)
            return CIDR_ERR_PREFIX;
        prefix = 0;
        for (; *d != '\0'; d++) {
            if (*d < '0' || *d > '9')
                return CIDR_ERR_PREFIX;
            prefix = prefix * 10 + (unsigned)(*d - '0');
        }
        if (prefix > max)
            return CIDR_ERR_PREFIX_MAX;
    }
    if (!cidr_host_bits_clear(c.addr, max / 8, prefix))
        return CIDR_ERR_HOST_BITS;
    c.prefix = (uint8_t)prefix;

    /* ::ffff:a.b.c.d/96+ is an IPv4 block written the IPv6 way. */
    if (c.family == AF_INET6 && prefix >= 96 &&
        memcmp(c.addr, cidr_v4mapped, sizeof(cidr_v4mapped)) == 0) {
        uint8_t v4[4];
        memcpy(v4, c.addr + 12, 4);
        memset(c.addr, 0, sizeof(c.addr));
        memcpy(c.addr, v4, 4);
        c.family = AF_INET;
        c.prefix = (uint8_t)(prefix - 96);
    }
    *out = c;
    return CIDR_OK;
}

char *cidr_format(const struct cidr *c, char *out, size_t cap)
{
    char addr[INET6_ADDRSTRLEN];

    if (cap == 0)
        return out;
    if ((c->family != AF_INET && c->family != AF_INET6) ||
        inet_ntop(c->family, c->addr, addr, sizeof(addr)) == NULL) {
        snprintf(out, cap, "-");
        return out;
    }
    snprintf(out, cap, "%s/%u", addr, (unsigned)c->prefix);
    return out;
}

/* The client's address as family + bytes, an IPv4-mapped IPv6 one as IPv4.
 * Returns false for families that never match. */
static bool cidr_client(const struct sockaddr *sa, uint8_t *family, const uint8_t **bytes)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        *family = AF_INET;
        *bytes = (const uint8_t *)&in->sin_addr;
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        const uint8_t *b = in6->sin6_addr.s6_addr;
        if (memcmp(b, cidr_v4mapped, sizeof(cidr_v4mapped)) == 0) {
            *family = AF_INET;
            *bytes = b + 12;
        } else {
            *family = AF_INET6;
            *bytes = b;
        }
        return true;
    }
    return false;
}

static bool cidr_match_bytes(const struct cidr *c, uint8_t family, const uint8_t *b)
{
    unsigned whole = c->prefix / 8;
    unsigned rest = c->prefix % 8;

    if (c->family != family)
        return false;
    if (memcmp(c->addr, b, whole) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (b[whole] & mask) == c->addr[whole];
}

bool cidr_match(const struct cidr *c, const struct sockaddr *sa)
{
    uint8_t family;
    const uint8_t *b;

    return cidr_client(sa, &family, &b) && cidr_match_bytes(c, family, b);
}

bool cidr_list_match(const struct cidr *list, size_t n, const struct sockaddr *sa)
{
    uint8_t family;
    const uint8_t *b;

    if (n == 0 || !cidr_client(sa, &family, &b))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (cidr_match_bytes(&list[i], family, b))
            return true;
    }
    return false;
}
