/* resolve.h: a backend host name -> every IPv4 and IPv6 address it has.
 *
 * Blocking: called by the config loader (start, -t, SIGHUP) and, for periodic
 * re-resolution, on libuv's thread pool, never on a session loop. Without a
 * resolver address the system's resolver answers (getaddrinfo: /etc/hosts,
 * resolv.conf, nsswitch); with one, c-ares asks that DNS server only. */
#ifndef MXPROXY_RESOLVE_H
#define MXPROXY_RESOLVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define RESOLVE_ADDRS_MAX 64 /* addresses kept per name: CONFIG_BACKENDS_MAX */
#define RESOLVE_ERR_MAX 160  /* a lookup's error text, bytes including NUL */

/* One address without a port: family AF_INET (4 bytes used) or AF_INET6. */
struct resolve_ip {
    uint8_t family;
    uint8_t addr[16];
};

/* A name's answer: sorted (IPv4 before IPv6, then bytewise), no duplicates.
 * A zero-initialised set is empty. */
struct resolve_set {
    size_t n;
    bool truncated; /* more than RESOLVE_ADDRS_MAX addresses came: the lowest are kept */
    struct resolve_ip ip[RESOLVE_ADDRS_MAX];
};

/* Adds sa's address (AF_INET or AF_INET6; others are ignored) in order. */
void resolve_set_add(struct resolve_set *s, const struct sockaddr *sa);

/* True when a and b hold the same addresses. */
bool resolve_set_equal(const struct resolve_set *a, const struct resolve_set *b);

/* Writes the addresses of a that b lacks as "1.2.3.4,::1" into out (cap bytes,
 * NUL-terminated; "" when none; a list that does not fit ends in "..."). */
void resolve_set_minus(const struct resolve_set *a, const struct resolve_set *b, char *out,
                       size_t cap);

/* Fills sa with ip and port (host order); returns its length. */
socklen_t resolve_ip_sockaddr(const struct resolve_ip *ip, unsigned port,
                              struct sockaddr_storage *sa);

/* Resolves host to all its A and AAAA addresses into *out. server is the DNS
 * server to ask ("1.2.3.4:53" or "[::1]:53"), or NULL for the system resolver;
 * timeout_ms bounds one try (two tries) when server is given. Returns 0 with at
 * least one address, or -1 with a reason in err ("no address" for an empty
 * answer). Safe to call from several threads at once. */
int resolve_host(const char *server, const char *host, unsigned timeout_ms, struct resolve_set *out,
                 char *err, size_t errlen);

#endif /* MXPROXY_RESOLVE_H */
