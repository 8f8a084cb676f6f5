/* pop3_pairs.h: PURE matching of POP3 responses to pipelined commands, for mxproxy.
 *
 * POP3 answers commands in order (RFC 2449 PIPELINING), so a fixed-capacity FIFO
 * (POP3_PAIRS_CAP entries, no allocation) of commands still waiting for their response pairs
 * each complete response with the oldest one; the result is a struct pop3_pair, the data of
 * one log line. The FIFO also knows how the server frames the next response (single or
 * multi-line, SASL), which pop3_server_parse() needs. The module keeps the session summary
 * (login, messages retrieved and deleted, QUIT, primary error). It has no clock: the caller
 * passes timestamps (any monotonic uint64 nanoseconds) in.
 *
 * How a session drives it, together with pop3.h:
 *
 *  client bytes:  before each pop3_client_parse(), check pop3_pairs_room() > 0; when it is 0
 *                 stop reading the client and keep the bytes. Pass every event to
 *                 pop3_pairs_on_client_event(pp, &ev, now) after forwarding ev.fwd, then drain
 *                 local answers: while (pop3_pairs_take_local(pp, now, &pair)) send
 *                 "<status> <text>\r\n" to the client, pass pair.cmd and pair.status to
 *                 pop3_client_on_reply() and log pair.
 *  server bytes:  forward them to the client unchanged; parse them with
 *                 pop3_server_parse(sp, ..., pop3_pairs_frame(pp), ...); for each RESPONSE or
 *                 CONTINUATION (not BODY: the pair is made at the body's end) call
 * pop3_pairs_on_response(pp, resp, &pair), then pop3_client_on_reply(cp, pair.cmd, pair.status)
 * (this may end a WAIT: parse the held client bytes again), log pair unless the result is
 *                 POP3_PAIRS_INTERMEDIATE, and drain local answers as above.
 *                 POP3_SEV_GARBAGE is a protocol error: mxproxy answers the client and closes,
 *                 as for "backend gone".
 *  backend gone:  while (pop3_pairs_abort(pp, &pair)) log pair; answer the first one with a
 *                 canned -ERR.
 *  session end:   pop3_pairs_summary(pp) gives the login state, counts and primary_error=.
 *
 * A zero-initialised struct pop3_pairs is ready to use (it expects the greeting first) once it
 * has FIFO storage: the caller lends POP3_PAIRS_CAP entries with pop3_pairs_attach() and may
 * take them back with pop3_pairs_detach() whenever no command is outstanding.
 */
#ifndef MXPROXY_POP3_PAIRS_H
#define MXPROXY_POP3_PAIRS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pop3.h"

#define POP3_PAIRS_CAP 64       /* outstanding commands per session */
#define POP3_PAIRS_TEXT_MAX 200 /* bytes of command text kept for logs */

enum pop3_pair_kind {
    POP3_PAIR_COMMAND = 0, /* a client command and the server's response to it */
    POP3_PAIR_GREETING,    /* the server's greeting: no command */
    POP3_PAIR_UNSOLICITED, /* a response while no command was outstanding (Dovecot's
                              "-ERR Disconnected for inactivity." before it closes) */
    POP3_PAIR_LOCAL,       /* the proxy answers this one itself: see enum pop3_local */
    POP3_PAIR_ABORTED,     /* never answered: the backend went away (status NONE) */
};

/* Why the proxy answers a line itself, and the answer pop3_pairs_take_local() suggests. */
enum pop3_local {
    POP3_LOCAL_NONE = 0,
    POP3_LOCAL_TOO_LONG,   /* -ERR Line too long */
    POP3_LOCAL_INVALID,    /* -ERR Syntax error, bare CR or LF in command */
    POP3_LOCAL_STLS,       /* +OK Begin TLS negotiation now (mxproxy terminates TLS) */
    POP3_LOCAL_NEED_TLS,   /* -ERR Must issue a STLS command first */
    POP3_LOCAL_TLS_ACTIVE, /* -ERR TLS already active */
    POP3_LOCAL_XCLIENT,    /* -ERR Command not permitted: a client's own XCLIENT */
    /* -ERR STLS not permitted after authentication: what pop3_pairs_take_local() makes of
     * POP3_LOCAL_STLS once a login succeeded (RFC 2595 4: STLS only in AUTHORIZATION state). */
    POP3_LOCAL_STLS_AUTHED,
};

#define POP3_PAIR_F_PIPELINED 0x01u /* sent while an earlier response was still outstanding */
#define POP3_PAIR_F_PRIMARY 0x02u   /* this pair became the session's primary error */
#define POP3_PAIR_F_TRUNCATED 0x04u /* response text was cut to POP3_TEXT_MAX */
#define POP3_PAIR_F_CANCELLED 0x08u /* AUTH cancelled with "*" (by the client or for it) */
#define POP3_PAIR_F_MULTI 0x10u     /* the response had a multi-line body: lines, size */

/* One log line's worth. All text is raw bytes, NUL-terminated, to be escaped by the logger;
 * cmd_text never holds credentials ("PASS [redacted]", "AUTH PLAIN [redacted]"). */
struct pop3_pair {
    enum pop3_pair_kind kind;
    enum pop3_cmd cmd;                      /* POP3_CMD_NONE for greeting/unsolicited */
    enum pop3_local local;                  /* POP3_PAIR_LOCAL: why */
    char cmd_text[POP3_PAIRS_TEXT_MAX + 1]; /* e.g. "RETR 1", "USER [redacted]" */
    size_t cmd_text_len;
    enum pop3_status status;      /* OK or ERR; NONE for ABORTED */
    char text[POP3_TEXT_MAX + 1]; /* status line text after "+OK "/"-ERR " */
    size_t text_len;
    unsigned lines;   /* body lines of a multi-line response */
    uint64_t size;    /* body octets of a multi-line response, un-stuffed */
    unsigned flags;   /* POP3_PAIR_F_* */
    unsigned rounds;  /* AUTH: continuations answered */
    uint64_t t_cmd;   /* now_ns when the command was complete */
    uint64_t t_reply; /* response's t_first (first byte) */
};

/* Session summary, kept up to date as pairs complete. */
struct pop3_pairs_summary {
    bool authenticated;        /* PASS, APOP or AUTH answered +OK: TRANSACTION state */
    unsigned retrieved;        /* RETR answered +OK */
    uint64_t retrieved_octets; /* their bodies, un-stuffed */
    unsigned deleted;          /* DELE answered +OK */
    bool quit_sent;            /* QUIT was sent to the server */
    bool quit_answered;        /* and answered */
    bool has_primary;          /* primary is set */
    struct pop3_pair primary;  /* first -ERR that failed something (a greeting, a login, a
                                  retrieval, a deletion, TLS, QUIT), or an unsolicited one */
};

/* One outstanding command; private. */
struct pop3_pairs_entry {
    enum pop3_cmd cmd;
    enum pop3_local local;
    enum pop3_frame frame;
    unsigned flags;  /* POP3_PAIR_F_* known at send time */
    unsigned rounds; /* AUTH continuations */
    uint64_t t_cmd;
    unsigned char text_len; /* <= POP3_PAIRS_TEXT_MAX */
    char text[POP3_PAIRS_TEXT_MAX];
};

struct pop3_pairs {
    struct pop3_pairs_entry *q; /* ring of POP3_PAIRS_CAP, lent; NULL: none */
    unsigned head;              /* index of the oldest entry */
    unsigned count;             /* entries in use */
    bool greeted;               /* the greeting was seen */
    struct pop3_pairs_summary sum;
};

/* Results of pop3_pairs_on_response(). */
enum pop3_pairs_res {
    POP3_PAIRS_MATCHED = 0,  /* *out is a complete pair (kind COMMAND): log it */
    POP3_PAIRS_GREETING,     /* *out is the greeting (kind GREETING): log it */
    POP3_PAIRS_INTERMEDIATE, /* a continuation to AUTH: the exchange goes on; *out has cmd and
                                status for pop3_client_on_reply() but is not a log line */
    POP3_PAIRS_UNSOLICITED,  /* *out (kind UNSOLICITED) matched no command */
};

/* Records what a client event means for pairing. Takes ev right after pop3_client_parse()
 * (its pointers are read and copied now, not kept). Pushes an entry for COMMAND, TOO_LONG and
 * INVALID (local entries unless they cancel an AUTH exchange); marks AUTH cancels; ignores
 * other events. Returns 0, or -ENOBUFS when an entry was needed and the FIFO was full or has no
 * storage attached (the event is then not recorded: check pop3_pairs_room() before parsing). */
int pop3_pairs_on_client_event(struct pop3_pairs *pp, const struct pop3_event *ev, uint64_t now_ns);

/* Lends FIFO storage of POP3_PAIRS_CAP entries; pp uses it until pop3_pairs_detach(). */
void pop3_pairs_attach(struct pop3_pairs *pp, struct pop3_pairs_entry *q);

/* Takes the storage back when no command is outstanding and returns it; returns NULL (and
 * keeps it) otherwise, or when none is attached. */
struct pop3_pairs_entry *pop3_pairs_detach(struct pop3_pairs *pp);

/* Makes the command just recorded (the newest entry) one that mxproxy answers itself with
 * local's answer, in order with the server's responses; the caller does not forward it.
 * Returns 0, or -ENOENT when no entry is outstanding. */
int pop3_pairs_answer_locally(struct pop3_pairs *pp, enum pop3_local local);

/* Free FIFO entries, 0 without storage. */
size_t pop3_pairs_room(const struct pop3_pairs *pp);

/* Outstanding entries, local ones included. */
size_t pop3_pairs_outstanding(const struct pop3_pairs *pp);

/* The oldest outstanding command, or POP3_CMD_NONE when none is. */
enum pop3_cmd pop3_pairs_oldest(const struct pop3_pairs *pp);

/* How the server frames its next response: that of the oldest command it answers (local
 * entries are skipped), POP3_FRAME_SINGLE for the greeting and when none is outstanding. */
enum pop3_frame pop3_pairs_frame(const struct pop3_pairs *pp);

/* True once a login succeeded (PASS, APOP or AUTH answered +OK). */
bool pop3_pairs_authenticated(const struct pop3_pairs *pp);

/* Matches one complete response or continuation (from pop3_server_parse(), borrowed for the
 * call) and fills *out. Updates the summary and the primary error. A local entry at the head
 * is skipped over, which only happens if the caller did not drain pop3_pairs_take_local(). */
enum pop3_pairs_res pop3_pairs_on_response(struct pop3_pairs *pp, const struct pop3_response *r,
                                           struct pop3_pair *out);

/* When the oldest outstanding entry is one the proxy answers itself, pops it into *out with
 * the suggested answer (status, text; t_reply = now_ns) and returns true: send that answer
 * (or another) to the client, then log *out. Returns false otherwise. */
bool pop3_pairs_take_local(struct pop3_pairs *pp, uint64_t now_ns, struct pop3_pair *out);

/* Pops the oldest outstanding entry into *out as kind ABORTED (status NONE) and returns true,
 * or returns false when none is left. For a backend that closed or timed out: the caller
 * answers the first one with a canned -ERR and logs them all. */
bool pop3_pairs_abort(struct pop3_pairs *pp, struct pop3_pair *out);

/* The summary; valid as long as pp. */
const struct pop3_pairs_summary *pop3_pairs_summary(const struct pop3_pairs *pp);

#endif /* MXPROXY_POP3_PAIRS_H */
