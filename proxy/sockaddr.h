/* sockaddr.h: socket addresses as log and config text. */
#ifndef MXPROXY_SOCKADDR_H
#define MXPROXY_SOCKADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#define SOCKADDR_TEXT_MAX 64 /* "[" INET6_ADDRSTRLEN "]:65535" is 53 with the NUL */

/* Writes "1.2.3.4:25" or "[::1]:25" into out (cap bytes, NUL-terminated).
 * Other families give "-". Truncates to fit cap. Returns out. */
char *sockaddr_format(const struct sockaddr *sa, char *out, size_t cap);

/* True when a and b are the same family, address and port. */
bool sockaddr_equal(const struct sockaddr *a, const struct sockaddr *b);

/* The port of an AF_INET or AF_INET6 address, host order; 0 otherwise. */
unsigned sockaddr_port(const struct sockaddr *sa);

#endif /* MXPROXY_SOCKADDR_H */
