/* fmt.h: integers as decimal text without printf, for lines formatted on the hot path
 * (log fields, addresses). */
#ifndef MXPROXY_FMT_H
#define MXPROXY_FMT_H

#include <stddef.h>
#include <stdint.h>

#define FMT_U64_MAX 20 /* digits of UINT64_MAX */

/* Writes value in decimal to out (room for FMT_U64_MAX digits, no NUL); returns the digits
 * written. */
static inline size_t fmt_u64(char *out, uint64_t value)
{
    char tmp[FMT_U64_MAX];
    size_t n = 0;

    do {
        tmp[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

#endif /* MXPROXY_FMT_H */
