/* probe.h: PURE. The dialogue of one active health check, bytes in, verdict out.
 *
 * A health check connects to a backend and reads its greeting (and for an
 * SMTP check also says EHLO and QUIT); this module judges the bytes and says
 * what to send next. It does no I/O: health.c owns the socket. One row per
 * protocol (enum probe_proto) decides what a positive greeting looks like,
 * so a new server-first protocol adds a row, not a code path.
 *
 * Contract: a zero-filled struct probe is not ready; call probe_init() first.
 * probe_feed() consumes bytes up to and including the end of a verdict and
 * returns it; feed the rest again after sending probe_output().
 */
#ifndef MXPROXY_PROBE_H
#define MXPROXY_PROBE_H

#include <stdbool.h>
#include <stddef.h>

#define PROBE_LINE_MAX 1024  /* longest reply line accepted, CRLF included */
#define PROBE_REASON_MAX 64  /* reason text with NUL */
#define PROBE_OUTPUT_MAX 300 /* a command line to send, with NUL */

/* What a positive greeting is (and which goodbye a check says). */
enum probe_proto {
    PROBE_SMTP = 0, /* "220 ..." (any 2xx, multi-line allowed); goodbye QUIT */
    PROBE_POP3,     /* "+OK ..."; goodbye QUIT */
    PROBE_IMAP,     /* "* OK ..." or "* PREAUTH ..."; goodbye "a LOGOUT" */
    PROBE_PROTO_COUNT_,
};

enum probe_status {
    PROBE_AGAIN = 0, /* every byte given was consumed; feed more */
    PROBE_SEND,      /* send probe_output(), then feed on (the rest of the bytes first) */
    PROBE_OK,        /* the check passed; probe_goodbye() may be sent */
    PROBE_FAIL,      /* the check failed; probe_reason() says why */
};

struct probe {
    enum probe_proto proto;        /* whose greeting */
    bool smtp;                     /* after the greeting, EHLO and QUIT (SMTP only) */
    unsigned step;                 /* 0: greeting, 1: EHLO reply, 2: QUIT reply, 3: done */
    int code;                      /* SMTP: code of the reply's first line, 0 before it */
    size_t len;                    /* bytes in line */
    bool skipping;                 /* the current line is over PROBE_LINE_MAX: judged at its end */
    const char *ehlo_name;         /* EHLO argument, borrowed from probe_init's caller */
    char line[PROBE_LINE_MAX];     /* the current line, without its terminator */
    char out[PROBE_OUTPUT_MAX];    /* the command to send after PROBE_SEND */
    char reason[PROBE_REASON_MAX]; /* after PROBE_FAIL */
};

/* Readies p for one check. smtp: the "smtp" check (greeting, EHLO ehlo_name,
 * QUIT), only with PROBE_SMTP. ehlo_name must outlive p. */
void probe_init(struct probe *p, enum probe_proto proto, bool smtp, const char *ehlo_name);

/* Judges len bytes of buf. Sets *used to the bytes consumed: all of them with
 * PROBE_AGAIN, up to the verdict's line end otherwise. After PROBE_OK or
 * PROBE_FAIL further calls return the same verdict and consume nothing. */
enum probe_status probe_feed(struct probe *p, const char *buf, size_t len, size_t *used);

/* The command line to send after PROBE_SEND (CRLF included), NUL-terminated. */
const char *probe_output(const struct probe *p);

/* Why the check failed: "greeting 421", "EHLO 550", "malformed reply"... */
const char *probe_reason(const struct probe *p);

/* A polite goodbye after a passing greeting check ("QUIT\r\n"...). */
const char *probe_goodbye(enum probe_proto proto);

#endif /* MXPROXY_PROBE_H */
