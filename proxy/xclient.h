/* xclient.h: PURE Postfix XCLIENT (XCLIENT_README) for mode smtp's xclient = on.
 * No I/O, no libuv or OpenSSL types, no allocation.
 *
 *   xclient_ehlo_line_caps()  reads the "250-XCLIENT NAME ADDR ..." line of an EHLO reply
 *   xclient_format()          writes "XCLIENT ADDR=... PORT=... ...\r\n" for those attributes
 */
#ifndef MXPROXY_XCLIENT_H
#define MXPROXY_XCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#define XCLIENT_LINE_MAX 512 /* an SMTP command line, CRLF included */

/* Attributes, as announced in "250-XCLIENT NAME ADDR ..." and sent in this order. */
#define XCLIENT_F_ADDR 0x01          /* client IP: a.b.c.d or IPV6:x:y::z */
#define XCLIENT_F_PORT 0x02          /* client TCP port */
#define XCLIENT_F_PROTO 0x04         /* SMTP or ESMTP */
#define XCLIENT_F_HELO 0x08          /* HELO/EHLO argument */
#define XCLIENT_F_LOGIN 0x10         /* SASL login name */
#define XCLIENT_F_NAME 0x20          /* client hostname from reverse DNS */
#define XCLIENT_F_DESTADDR 0x40      /* the address the client connected to */
#define XCLIENT_F_DESTPORT 0x80      /* its port */
#define XCLIENT_F_REVERSE_NAME 0x100 /* client hostname from reverse DNS, not verified forward */
#define XCLIENT_F_ALL 0x1ff

enum xclient_proto {
    XCLIENT_PROTO_NONE = 0, /* not known yet: PROTO is not sent */
    XCLIENT_PROTO_SMTP,     /* the client said HELO */
    XCLIENT_PROTO_ESMTP,    /* the client said EHLO */
};

/* What to tell the backend. NULL (or a non-IP address) is sent as [UNAVAILABLE]; a caller may
 * pass "[TEMPUNAVAIL]" as name after a transient DNS failure. */
struct xclient_info {
    const struct sockaddr *addr;     /* client address and port (ADDR, PORT) */
    const struct sockaddr *destaddr; /* local address it connected to (DESTADDR, DESTPORT) */
    const char *name;                /* NAME */
    const char *reverse_name;        /* REVERSE_NAME */
    const char *helo;                /* HELO */
    const char *login;               /* LOGIN */
    enum xclient_proto proto;        /* PROTO; XCLIENT_PROTO_NONE leaves it out */
};

/* Parses a space-separated attribute list ("NAME ADDR PROTO HELO"), case-insensitively, into
 * XCLIENT_F_* bits. Unknown names are ignored. */
unsigned xclient_parse_caps(const char *list, size_t len);

/* Reads one line of an EHLO reply ("250-XCLIENT NAME ADDR", "250 XCLIENT ...", or the text
 * without the code; a trailing CRLF is allowed). Returns true and sets *caps if it is the
 * XCLIENT line, false (and leaves *caps alone) otherwise. */
bool xclient_ehlo_line_caps(const char *line, size_t len, unsigned *caps);

/* Writes one "XCLIENT ATTR=value ...\r\n" line, NUL-terminated, with the attributes in *todo
 * (XCLIENT_F_* bits) in the order of the bit values. Values are xtext-encoded (RFC 1891). The
 * line stays within XCLIENT_LINE_MAX bytes: attributes that do not fit stay set in *todo for a
 * further XCLIENT command (send it after the 220 reply); those written are cleared. A value
 * whose encoding cannot fit on a line by itself is sent as [UNAVAILABLE].
 * Returns the line's length, 0 (nothing written) when *todo has no attribute left, or -ENOBUFS
 * if cap is below XCLIENT_LINE_MAX + 1. */
int xclient_format(char *out, size_t cap, unsigned *todo, const struct xclient_info *info);

#endif /* MXPROXY_XCLIENT_H */
