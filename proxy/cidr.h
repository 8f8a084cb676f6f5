/* cidr.h: PURE parsing and matching of address blocks ("10.0.0.0/8", "2001:db8::/32").
 *
 * No I/O, no allocation: the caller owns every struct cidr. An IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d, what a dual-stack socket reports for an IPv4 peer) is the IPv4 address
 * it carries, both as a block written that way (with a prefix of 96 or more) and as a
 * client, so one "allow = 192.0.2.0/24" line covers both. Families never cross: an IPv6
 * block (even "::/0") never matches an IPv4 client, and an IPv4 block no IPv6 client.
 */
#ifndef MXPROXY_CIDR_H
#define MXPROXY_CIDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CIDR_TEXT_MAX 64 /* longest block text accepted, bytes without NUL */

/* One address block. A zero-initialised struct cidr matches nothing. */
struct cidr {
    uint8_t family;   /* AF_INET or AF_INET6 (0: empty) */
    uint8_t prefix;   /* leading bits that must match: 0..32 or 0..128 */
    uint8_t addr[16]; /* network order; the first 4 bytes for AF_INET; host bits are 0 */
};

enum cidr_err {
    CIDR_OK = 0,
    CIDR_ERR_EMPTY,      /* no text */
    CIDR_ERR_TOO_LONG,   /* more than CIDR_TEXT_MAX bytes */
    CIDR_ERR_ADDRESS,    /* not an IPv4 or IPv6 address */
    CIDR_ERR_PREFIX,     /* the part after '/' is not a decimal number */
    CIDR_ERR_PREFIX_MAX, /* prefix over 32 (IPv4) or 128 (IPv6) */
    CIDR_ERR_HOST_BITS,  /* bits set past the prefix ("10.0.0.1/8"): probably a typo */
};

/* Parses len bytes of text (no NUL needed; blanks are not trimmed): "ADDR" (a single host,
 * /32 or /128) or "ADDR/PREFIX". Fills *out and returns CIDR_OK, or returns an error and
 * leaves *out zeroed. */
enum cidr_err cidr_parse(const char *text, size_t len, struct cidr *out);

/* A short static English text for err ("host bits set past the prefix"). */
const char *cidr_strerror(enum cidr_err err);

/* Writes c as "ADDR/PREFIX" into out (cap bytes, NUL-terminated); returns out. */
char *cidr_format(const struct cidr *c, char *out, size_t cap);

/* True when sa (AF_INET or AF_INET6; anything else never matches) lies inside c. */
bool cidr_match(const struct cidr *c, const struct sockaddr *sa);

/* True when sa lies inside any of the n blocks of list. */
bool cidr_list_match(const struct cidr *list, size_t n, const struct sockaddr *sa);

#endif /* MXPROXY_CIDR_H */
