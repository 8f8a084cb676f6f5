/* smtp_pairs.h: PURE matching of server replies to pipelined client commands, for mxproxy.
 *
 * A fixed-capacity FIFO (SMTP_PAIRS_CAP entries, no allocation) of commands still waiting for
 * their reply. Each complete reply belongs to the oldest one; the result is a struct smtp_pair,
 * the data of one log line. The module also keeps the per-session summary (HELO name, first
 * MAIL FROM, recipient and message counts, QUIT, primary error). It has no clock: the caller
 * passes timestamps (any monotonic uint64 nanoseconds) in.
 *
 * How a session drives it, together with smtp.h:
 *
 *  client bytes:  before each smtp_client_parse(), check smtp_pairs_room() > 0; when it is 0
 *                 stop reading the client (backpressure) and keep the bytes. Pass every event
 *                 to smtp_pairs_on_client_event(pp, &ev, now) after forwarding ev.fwd. Then
 *                 drain local answers: while (smtp_pairs_take_local(pp, now, &pair)) send
 *                 "<code> <esc> <text>\r\n" to the client and log pair.
 *  server bytes:  forward them to the client unchanged; for each SMTP_SEV_REPLY from
 *                 smtp_server_parse(), call smtp_pairs_on_reply(pp, reply, &pair), then
 *                 smtp_client_on_reply(cp, pair.cmd, pair.code) (this may end a WAIT: parse
 *                 the held client bytes again), log pair unless the result is
 *                 SMTP_PAIRS_INTERMEDIATE, and drain local answers as above.
 *                 A 421 (matched or SMTP_PAIRS_UNSOLICITED) means the server is closing: treat
 *                 it like "backend gone" below once it has been forwarded. SMTP_SEV_GARBAGE is
 *                 a protocol error: mxproxy answers 421 and closes, as for "backend gone".
 *  backend gone:  while (smtp_pairs_abort(pp, &pair)) log pair; answer the first one with 421.
 *  session end:   smtp_pairs_summary(pp) gives helo=, mail_from=, counts and primary_error=.
 *
 * A zero-initialised struct smtp_pairs is ready to use (it expects the greeting first) once it
 * has FIFO storage: the caller lends SMTP_PAIRS_CAP entries with smtp_pairs_attach() and may
 * take them back with smtp_pairs_detach() whenever no command is outstanding, so a session
 * that waits for its client holds no FIFO at all.
 */
#ifndef MXPROXY_SMTP_PAIRS_H
#define MXPROXY_SMTP_PAIRS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "smtp.h"

#define SMTP_PAIRS_CAP 64       /* outstanding commands per session */
#define SMTP_PAIRS_TEXT_MAX 200 /* bytes of command text kept for logs */
#define SMTP_PAIRS_NAME_MAX 200 /* bytes of HELO name / MAIL FROM address kept */

enum smtp_pair_kind {
    SMTP_PAIR_COMMAND = 0, /* a client command and the server's reply to it */
    SMTP_PAIR_GREETING,    /* the server's greeting: no command */
    SMTP_PAIR_UNSOLICITED, /* a reply while no command was outstanding (421: the server is
                              closing; anything else is a protocol error) */
    SMTP_PAIR_LOCAL,       /* the proxy answers this one itself: see enum smtp_local */
    SMTP_PAIR_ABORTED,     /* never answered: the backend went away (code 0) */
};

/* Why the proxy answers a line itself, and the answer smtp_pairs_take_local() suggests. */
enum smtp_local {
    SMTP_LOCAL_NONE = 0,
    SMTP_LOCAL_TOO_LONG,   /* 500 5.5.2 Line too long */
    SMTP_LOCAL_INVALID,    /* 500 5.5.2 Bare CR or LF / NUL in command line */
    SMTP_LOCAL_SMUGGLING,  /* 554 5.7.0 message rejected: then send 421 and close */
    SMTP_LOCAL_STARTTLS,   /* 220 2.0.0 Ready to start TLS (mxproxy terminates TLS) */
    SMTP_LOCAL_NEED_TLS,   /* 530 5.7.0 Must issue a STARTTLS command first */
    SMTP_LOCAL_TLS_ACTIVE, /* 503 5.5.1 TLS already active */
    SMTP_LOCAL_XCLIENT,    /* 550 5.7.0 Command not permitted: a client's XCLIENT or XFORWARD */
    SMTP_LOCAL_EHLO,       /* 250: the EHLO/HELO after STARTTLS, answered from the backend's
                              earlier reply; the caller sends that reply and fills the pair's
                              esc, text and lines from it (the suggestion is a bare 250) */
    /* 503 5.5.1 Error: MAIL transaction in progress: what smtp_pairs_take_local() makes of
     * SMTP_LOCAL_STARTTLS while the server holds an accepted MAIL (no TLS starts). */
    SMTP_LOCAL_STARTTLS_IN_TX,
};

#define SMTP_PAIR_F_PIPELINED 0x01u /* sent while an earlier reply was still outstanding */
#define SMTP_PAIR_F_CONSEQUENCE                                                                    \
    0x02u                           /* a failure caused by an earlier one (e.g. DATA 554           \
                                       after every RCPT was rejected): never primary */
#define SMTP_PAIR_F_PRIMARY 0x04u   /* this pair became the session's primary error */
#define SMTP_PAIR_F_TRUNCATED 0x08u /* reply text was cut to SMTP_REPLY_TEXT_MAX */
#define SMTP_PAIR_F_LAST 0x10u      /* BDAT ... LAST */
#define SMTP_PAIR_F_CANCELLED 0x20u /* AUTH cancelled with "*" (by the client or for it) */
#define SMTP_PAIR_F_NEW_SESSION                                                                    \
    0x40u /* XCLIENT accepted: the server greeted anew, HELO and                                   \
             transaction state were reset */

/* One log line's worth. All text is raw bytes, NUL-terminated, to be escaped by the logger;
 * cmd_text never holds AUTH credentials ("AUTH PLAIN [redacted]", "AUTH LOGIN"). */
struct smtp_pair {
    enum smtp_pair_kind kind;
    enum smtp_cmd cmd;                      /* SMTP_CMD_NONE for greeting/unsolicited */
    enum smtp_local local;                  /* SMTP_PAIR_LOCAL: why */
    char cmd_text[SMTP_PAIRS_TEXT_MAX + 1]; /* e.g. "RCPT TO:<a@b>", ".", "BDAT 10 LAST" */
    size_t cmd_text_len;
    int code;                           /* reply code; 0 for ABORTED */
    char esc[SMTP_ESC_MAX];             /* enhanced status code or "" */
    char text[SMTP_REPLY_TEXT_MAX + 1]; /* first reply line after code and esc */
    size_t text_len;
    unsigned lines;   /* reply lines */
    unsigned flags;   /* SMTP_PAIR_F_* */
    uint64_t size;    /* "." and BDAT: message/chunk bytes */
    unsigned rounds;  /* AUTH: 334 challenges answered */
    uint64_t t_cmd;   /* now_ns when the command was complete */
    uint64_t t_reply; /* reply's t_first (first byte) */
};

/* Session summary, kept up to date as pairs complete. */
struct smtp_pairs_summary {
    char helo[SMTP_PAIRS_NAME_MAX + 1];      /* name of the last HELO/EHLO sent, "" if none */
    char mail_from[SMTP_PAIRS_NAME_MAX + 1]; /* address of the first MAIL FROM sent */
    bool has_mail_from;                      /* mail_from is set ("<>" is an empty address) */
    unsigned rcpt_ok;                        /* RCPT answered 2xx */
    unsigned rcpt_rejected;                  /* RCPT answered 4xx/5xx */
    unsigned messages;                       /* "." or BDAT LAST answered 2xx */
    bool auth_ok;                            /* an AUTH exchange ended in 2xx */
    bool quit_sent;                          /* QUIT was sent to the server */
    bool quit_answered;                      /* and answered */
    bool has_primary;                        /* primary is set */
    struct smtp_pair primary;                /* first failure that failed a transaction or
                                                the session, consequences excluded */
};

/* One outstanding command; private. */
struct smtp_pairs_entry {
    enum smtp_cmd cmd;
    enum smtp_local local;
    unsigned flags;  /* SMTP_PAIR_F_* known at send time */
    unsigned rounds; /* AUTH 334 count */
    uint64_t size;   /* "." / BDAT bytes */
    uint64_t t_cmd;
    unsigned char text_len; /* <= SMTP_PAIRS_TEXT_MAX */
    char text[SMTP_PAIRS_TEXT_MAX];
};

struct smtp_pairs {
    struct smtp_pairs_entry *q; /* ring of SMTP_PAIRS_CAP, lent; NULL: none */
    unsigned head;              /* index of the oldest entry */
    unsigned count;             /* entries in use */
    bool greeted;               /* the greeting was seen */
    bool tx_mail_failed;        /* current transaction: MAIL rejected */
    unsigned tx_rcpt_ok;        /* current transaction: RCPTs accepted */
    unsigned tx_rcpt_rejected;  /* current transaction: RCPTs rejected */
    bool tx_open;               /* current transaction: the server accepted MAIL, and no
                                   end of data, RSET, EHLO/HELO or new session ended it */
    struct smtp_pairs_summary sum;
};

/* Results of smtp_pairs_on_reply(). */
enum smtp_pairs_res {
    SMTP_PAIRS_MATCHED = 0,  /* *out is a complete pair (kind COMMAND): log it */
    SMTP_PAIRS_GREETING,     /* *out is the greeting (kind GREETING): log it */
    SMTP_PAIRS_INTERMEDIATE, /* a 334 to AUTH: the exchange goes on; *out has cmd and code
                                for smtp_client_on_reply() but is not a log line */
    SMTP_PAIRS_UNSOLICITED,  /* *out (kind UNSOLICITED) matched no command: a 421 means the
                                server is closing, other codes are a protocol error */
};

/* Records what a client event means for pairing. Takes ev right after smtp_client_parse()
 * (its pointers are read and copied now, not kept). Pushes an entry for COMMAND (BDAT: timed
 * at its BDAT_END), DATA_END (the "." pseudo command, or a local entry after smuggling),
 * TOO_LONG and INVALID (local entries unless they cancel an AUTH exchange); marks AUTH
 * cancels; ignores other events. Returns 0, or -ENOBUFS when an entry was needed and the FIFO
 * was full or has no storage attached (the event is then not recorded: check smtp_pairs_room()
 * before parsing). */
int smtp_pairs_on_client_event(struct smtp_pairs *pp, const struct smtp_event *ev, uint64_t now_ns);

/* Lends FIFO storage of SMTP_PAIRS_CAP entries; pp uses it until smtp_pairs_detach(). */
void smtp_pairs_attach(struct smtp_pairs *pp, struct smtp_pairs_entry *q);

/* Takes the storage back when no command is outstanding and returns it; returns NULL (and
 * keeps it) otherwise, or when none is attached. */
struct smtp_pairs_entry *smtp_pairs_detach(struct smtp_pairs *pp);

/* Makes the command just recorded (the newest entry, from an SMTP_EV_COMMAND)
 * one that mxproxy answers itself with local's answer, in order with the
 * server's replies; the caller does not forward it. Returns 0, or -ENOENT
 * when no entry is outstanding. */
int smtp_pairs_answer_locally(struct smtp_pairs *pp, enum smtp_local local);

/* Free FIFO entries, 0 without storage. 0 means: do not parse more client bytes until a reply
 * arrives (or, without storage, until storage is attached). */
size_t smtp_pairs_room(const struct smtp_pairs *pp);

/* Outstanding entries, local ones included. */
size_t smtp_pairs_outstanding(const struct smtp_pairs *pp);

/* True while the server holds a mail transaction: MAIL was accepted and nothing ended it since
 * (an end of data or BDAT LAST answered, an accepted RSET, EHLO or HELO, a new session). */
bool smtp_pairs_in_transaction(const struct smtp_pairs *pp);

/* The oldest outstanding command, or SMTP_CMD_NONE when none is. */
enum smtp_cmd smtp_pairs_oldest(const struct smtp_pairs *pp);

/* Matches one complete reply (from smtp_server_parse(), borrowed for the call) and fills *out.
 * Updates the summary and the primary error. A local entry at the head is skipped over, which
 * only happens if the caller did not drain smtp_pairs_take_local(). */
enum smtp_pairs_res smtp_pairs_on_reply(struct smtp_pairs *pp, const struct smtp_reply *r,
                                        struct smtp_pair *out);

/* When the oldest outstanding entry is one the proxy answers itself, pops it into *out with
 * the suggested answer (code, esc, text; t_reply = now_ns) and returns true: send that answer
 * (or another) to the client, then log *out. Returns false otherwise. A STARTTLS while
 * smtp_pairs_in_transaction() comes out as SMTP_LOCAL_STARTTLS_IN_TX (RFC 3207 resets the
 * session at TLS, which the server, never seeing the TLS, would not do). */
bool smtp_pairs_take_local(struct smtp_pairs *pp, uint64_t now_ns, struct smtp_pair *out);

/* Pops the oldest outstanding entry into *out as kind ABORTED (code 0) and returns true, or
 * returns false when none is left. For a backend that closed or timed out: the caller
 * answers the first one with 421 and logs them all. */
bool smtp_pairs_abort(struct smtp_pairs *pp, struct smtp_pair *out);

/* The summary; valid as long as pp. */
const struct smtp_pairs_summary *smtp_pairs_summary(const struct smtp_pairs *pp);

#endif /* MXPROXY_SMTP_PAIRS_H */
