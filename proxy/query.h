/* query.h: PURE: the query string of an admin request (GET /sessions?...).
 *
 * A query is NAME=VALUE pairs joined by '&', percent-encoded as browsers
 * send them ('+' is a space). Known names: client=CIDR (an IPv4 or IPv6
 * address, optionally /PREFIX), listener=NAME, error=0|1. An unknown name,
 * a repeated one or a malformed value makes the whole query bad (400), so
 * a typo never silently widens what an operator looks at.
 */
#ifndef MXPROXY_QUERY_H
#define MXPROXY_QUERY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "cidr.h"

#define QUERY_NAME_MAX 64 /* listener= value, bytes with NUL */

struct query_filter {
    bool has_client;               /* client= given */
    struct cidr client;            /* its block, parsed as allow/deny blocks are (cidr.h) */
    bool has_listener;             /* listener= given */
    char listener[QUERY_NAME_MAX]; /* NUL-terminated */
    bool error_only;               /* error=1: only sessions with a primary error or error= */
};

/* Parses q[0, len) (the text after '?', may be empty) into *f, zeroed first.
 * Returns true when the query is good. */
bool query_parse(const char *q, size_t len, struct query_filter *f);

/* Parses a session id: 1..16 hex digits, case-insensitive. */
bool query_parse_sid(const char *s, size_t len, uint64_t *sid);

/* True when sa (AF_INET/AF_INET6) lies in f's client= block, or f has none;
 * cidr_match() decides (an IPv4-mapped address is the IPv4 one it carries). */
bool query_client_match(const struct query_filter *f, const struct sockaddr *sa);

#endif /* MXPROXY_QUERY_H */
