/* query.c: admin query strings; see query.h. */
#include "query.h"

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

/* "ADDR" or "ADDR/PREFIX" into f, as an allow/deny block. */
static bool query_parse_cidr(const char *v, struct query_filter *f)
{
    return cidr_parse(v, strlen(v), &f->client) == CIDR_OK;
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
    return !f->has_client || cidr_match(&f->client, sa);
}
