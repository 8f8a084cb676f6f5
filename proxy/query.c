/* query.c: admin query strings; see query.h. */
#include "query.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#define QUERY_VALUE_MAX 128 /* a decoded value, bytes with NUL */

static int query_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes in[0, len) into out (cap bytes, NUL-terminated). Returns
 * false for a bad escape, a NUL byte or a value that does not fit. */
static bool query_decode(const char *in, size_t len, char *out, size_t cap)
{
    size_t o = 0;

    for (size_t i = 0; i < len; i++) {
        int ch = (unsigned char)in[i];
        if (ch == '+') {
            ch = ' ';
        } else if (ch == '%') {
            if (i + 2 >= len)
                return false;
            int hi = query_hex(in[i + 1]);
            int lo = query_hex(in[i + 2]);
            if (hi < 0 || lo < 0)
                return false;
            ch = hi * 16 + lo;
            i += 2;
        }
        if (ch == 0 || o + 1 >= cap)
            return false;
        out[o++] = (char)ch;
    }
    out[o] = '\0';
    return true;
}

/* "ADDR" or "ADDR/PREFIX" into f. */
static bool query_parse_cidr(const char *v, struct query_filter *f)
{
    char addr[INET6_ADDRSTRLEN];
    const char *slash = strchr(v, '/');
    size_t alen = slash != NULL ? (size_t)(slash - v) : strlen(v);
    unsigned prefix = 0, max;

    if (alen == 0 || alen >= sizeof(addr))
        return false;
    memcpy(addr, v, alen);
    addr[alen] = '\0';
    if (inet_pton(AF_INET, addr, f->addr) == 1)
        f->family = AF_INET;
    else if (inet_pton(AF_INET6, addr, f->addr) == 1)
        f->family = AF_INET6;
    else
        return false;
    max = f->family == AF_INET ? 32 : 128;
    if (slash == NULL) {
        f->prefix = max;
        return true;
    }
    const char *p = slash + 1;
    if (*p == '\0' || strlen(p) > 3)
        return false;
    for (; *p != '\0'; p++) {
        if (*p < '0' || *p > '9')
            return false;
        prefix = prefix * 10 + (unsigned)(*p - '0');
    }
    if (prefix > max)
        return false;
    f->prefix = prefix;
    return true;
}

static bool query_name_is(const char *name, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(name, want, len) == 0;
}

bool query_parse(const char *q, size_t len, struct query_filter *f)
{
    bool seen_error = false;
    size_t i = 0;

    memset(f, 0, sizeof(*f));
    while (i < len) {
        const char *pair = q + i;
        const char *amp = memchr(pair, '&', len - i);
        size_t plen = amp != NULL ? (size_t)(amp - pair) : len - i;
        const char *eq = memchr(pair, '=', plen);
        char v[QUERY_VALUE_MAX];

        i += plen + (amp != NULL ? 1 : 0);
        if (plen == 0)
            continue; /* "a=1&&b=2", a trailing '&' */
        if (eq == NULL)
            return false;
        size_t nlen = (size_t)(eq - pair);
        if (!query_decode(eq + 1, plen - nlen - 1, v, sizeof(v)))
            return false;
        if (query_name_is(pair, nlen, "client")) {
            if (f->has_client || !query_parse_cidr(v, f))
                return false;
            f->has_client = true;
        } else if (query_name_is(pair, nlen, "listener")) {
            size_t vlen = strlen(v);
            if (f->has_listener || vlen == 0 || vlen >= sizeof(f->listener))
                return false;
            memcpy(f->listener, v, vlen + 1);
            f->has_listener = true;
        } else if (query_name_is(pair, nlen, "error")) {
            if (seen_error || (strcmp(v, "0") != 0 && strcmp(v, "1") != 0))
                return false;
            seen_error = true;
            f->error_only = v[0] == '1';
        } else {
            return false;
        }
    }
    return true;
}

bool query_parse_sid(const char *s, size_t len, uint64_t *sid)
{
    uint64_t v = 0;

    if (len == 0 || len > 16)
        return false;
    for (size_t i = 0; i < len; i++) {
        int h = query_hex(s[i]);
        if (h < 0)
            return false;
        v = v << 4 | (uint64_t)h;
    }
    *sid = v;
    return true;
}

bool query_client_match(const struct query_filter *f, const struct sockaddr *sa)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const uint8_t *a;

    if (!f->has_client)
        return true;
    if (sa->sa_family == AF_INET) {
        a = (const uint8_t *)&((const struct sockaddr_in *)(const void *)sa)->sin_addr;
        if (f->family != AF_INET)
            return false;
    } else if (sa->sa_family == AF_INET6) {
        a = ((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr.s6_addr;
        if (f->family == AF_INET) {
            if (memcmp(a, mapped, sizeof(mapped)) != 0)
                return false;
            a += 12;
        }
    } else {
        return false;
    }
    unsigned full = f->prefix / 8, rest = f->prefix % 8;
    if (memcmp(a, f->addr, full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (a[full] & mask) == (f->addr[full] & mask);
}
