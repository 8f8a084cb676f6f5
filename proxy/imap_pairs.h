/* imap_pairs.h: PURE matching of IMAP responses to client commands by tag, for mxproxy.
 *
 * IMAP clients may have many commands in flight; each tagged response names the one it ends.
 * This module keeps the outstanding commands (IMAP_PAIRS_CAP slots, no allocation), counts the
 * untagged responses that arrive while each is outstanding, and turns every tagged response into
 * a struct imap_pair, the data of one `ev=pair proto=imap` log line. It also keeps the
 * per-session summary (LOGOUT, BYE, primary error). It has no clock: the caller passes
 * timestamps (any monotonic uint64 nanoseconds) in.
 *
 * How a session drives it, together with imap.h:
 *
 *  client bytes:  before each imap_client_parse(), check imap_pairs_room() > 0; when it is 0
 *                 stop reading the client (backpressure). Pass every event to
 *                 imap_pairs_on_client_event(pp, &ev, now) after forwarding ev.fwd; then drain
 *                 local answers: while (imap_pairs_take_local(pp, now, &pair)) answer
 *                 "<tag> <status> <text>\r\n" and log pair.
 *  server bytes:  for each IMAP_SEV_RESPONSE, call imap_pairs_on_response(pp, ev.resp, &pair);
 *                 tell the client parser (imap_client_on_continue() for a "+",
 *                 imap_client_on_tagged() for a tagged response), log pair for MATCHED,
 *                 GREETING and UNSOLICITED, and drain local answers as above.
 *  backend gone:  while (imap_pairs_abort(pp, &pair)) log pair (aborted=1).
 *  session end:   imap_pairs_summary(pp): LOGOUT answered, BYE, primary error.
 *
 * A zero-initialised struct imap_pairs expects the greeting first; it needs storage lent with
 * imap_pairs_attach() (IMAP_PAIRS_CAP entries) before it records commands.
 */
#ifndef MXPROXY_IMAP_PAIRS_H
#define MXPROXY_IMAP_PAIRS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "imap.h"

#define IMAP_PAIRS_CAP 64 /* outstanding commands per session */

enum imap_pair_kind {
    IMAP_PAIR_COMMAND = 0, /* a client command and the tagged response that ended it */
    IMAP_PAIR_GREETING,    /* the server's greeting ("* OK", "* PREAUTH", "* BYE"): tag "*" */
    IMAP_PAIR_UNSOLICITED, /* a tagged response whose tag no outstanding command has */
    IMAP_PAIR_LOCAL,       /* mxproxy answers this one itself: see enum imap_local */
    IMAP_PAIR_ABORTED,     /* never answered: the backend went away (status NONE) */
};

/* Why mxproxy answers a command itself, and the answer imap_pairs_take_local() suggests. */
enum imap_local {
    IMAP_LOCAL_NONE = 0,
    IMAP_LOCAL_TOO_LONG,   /* BAD Line too long */
    IMAP_LOCAL_INVALID,    /* BAD Bare CR or LF or NUL in command line */
    IMAP_LOCAL_STARTTLS,   /* OK Begin TLS negotiation now (mxproxy terminates TLS) */
    IMAP_LOCAL_TLS_ACTIVE, /* BAD TLS already active */
    IMAP_LOCAL_NEED_TLS,   /* NO [PRIVACYREQUIRED] TLS required (before STARTTLS) */
};

#define IMAP_PAIR_F_PIPELINED 0x01u /* sent while an earlier command was outstanding */
#define IMAP_PAIR_F_PRIMARY 0x02u   /* this pair became the session's primary error */
#define IMAP_PAIR_F_TRUNCATED 0x04u /* response text was cut to IMAP_TEXT_MAX */
#define IMAP_PAIR_F_CANCELLED 0x08u /* AUTHENTICATE cancelled with "*" */

/* One log line's worth. All text is raw bytes, NUL-terminated, to be escaped by the logger;
 * cmd_text never holds credentials or literal data. */
struct imap_pair {
    enum imap_pair_kind kind;
    enum imap_cmd cmd;
    enum imap_local local;      /* IMAP_PAIR_LOCAL: why */
    char tag[IMAP_TAG_MAX + 1]; /* the command's tag; "*" for the greeting */
    size_t tag_len;
    char cmd_text[IMAP_TEXT_MAX + 1]; /* "SELECT INBOX", "LOGIN [redacted]" */
    size_t cmd_text_len;
    enum imap_status status;      /* OK/NO/BAD; greeting: OK/PREAUTH/BYE; NONE: aborted */
    char text[IMAP_TEXT_MAX + 1]; /* response text after the status, "[code]" included */
    size_t text_len;
    char code[IMAP_KEYWORD_MAX + 1]; /* first word of the response code, "" if none */
    unsigned untagged;               /* untagged responses while the command was outstanding */
    unsigned rounds;                 /* AUTHENTICATE: "+" challenges answered */
    uint64_t size;                   /* literal octets the command carried (APPEND: the message) */
    unsigned flags;                  /* IMAP_PAIR_F_* */
    uint64_t t_cmd;   /* now_ns when the command was complete (IDLE: the IDLE line) */
    uint64_t t_reply; /* the response's t_first */
};

struct imap_pairs_summary {
    bool logout_sent;         /* LOGOUT went to the server */
    bool logout_answered;     /* and its tagged response came back */
    bool bye_seen;            /* an untagged BYE came */
    bool auth_ok;             /* LOGIN or AUTHENTICATE answered OK (or the greeting was PREAUTH) */
    bool has_primary;         /* primary is set */
    struct imap_pair primary; /* the first tagged NO/BAD (an AUTHENTICATE the client cancelled
                                 aside), or a BYE that no LOGOUT asked for */
};

/* One outstanding command; private. */
struct imap_pairs_entry {
    bool used;     /* the slot holds a command */
    bool complete; /* the command's last byte went out */
    enum imap_cmd cmd;
    enum imap_local local;
    unsigned flags; /* IMAP_PAIR_F_* known at send time */
    unsigned rounds;
    uint64_t seq; /* order of arrival */
    uint64_t size;
    uint64_t t_cmd;
    uint64_t untagged_at; /* the session's untagged count when the command was sent */
    unsigned char tag_len;
    unsigned char text_len;
    char tag[IMAP_TAG_MAX];
    char text[IMAP_TEXT_MAX];
};

struct imap_pairs {
    struct imap_pairs_entry *q; /* IMAP_PAIRS_CAP slots, lent; NULL: none */
    unsigned count;             /* slots in use */
    uint64_t seq;               /* next entry's seq */
    uint64_t untagged;          /* untagged responses so far */
    unsigned current;           /* slot of the newest command, when has_current */
    bool has_current;           /* current is outstanding */
    bool greeted;               /* the greeting was seen */
    struct imap_pairs_summary sum;
};

enum imap_pairs_res {
    IMAP_PAIRS_MATCHED = 0, /* *out is a complete pair (kind COMMAND): log it */
    IMAP_PAIRS_GREETING,    /* *out is the greeting (kind GREETING): log it */
    IMAP_PAIRS_UNTAGGED,    /* counted; *out has the status (BYE) but is no log line */
    IMAP_PAIRS_CONTINUE,    /* a "+": *out has the command it belongs to; no log line */
    IMAP_PAIRS_UNSOLICITED, /* *out (kind UNSOLICITED): a tag no command has: log it */
    IMAP_PAIRS_GARBAGE,     /* not a response line at all: a protocol error */
};

/* Lends storage of IMAP_PAIRS_CAP entries; pp uses it until imap_pairs_detach(). */
void imap_pairs_attach(struct imap_pairs *pp, struct imap_pairs_entry *q);

/* Takes the storage back when no command is outstanding and returns it; NULL otherwise. */
struct imap_pairs_entry *imap_pairs_detach(struct imap_pairs *pp);

/* Free slots, 0 without storage: do not parse more client bytes until a response. */
size_t imap_pairs_room(const struct imap_pairs *pp);

/* Outstanding entries, local ones and a command still being sent included. */
size_t imap_pairs_outstanding(const struct imap_pairs *pp);

/* Records what a client event means for pairing (ev is read now, not kept). BEGIN and COMMAND
 * with a tag take a slot (COMMAND after BEGIN completes it); TOO_LONG and INVALID take a local
 * slot unless they cancel an AUTHENTICATE or cut a command short (IMAP_EV_F_MIDCMD: the session
 * ends); an AUTHENTICATE cancel marks its entry. Returns 0, or -ENOBUFS when a slot was needed
 * and none is free (check imap_pairs_room() first). */
int imap_pairs_on_client_event(struct imap_pairs *pp, const struct imap_event *ev, uint64_t now_ns);

/* Makes the newest command one that mxproxy answers itself with local's answer, in order
 * with the server's responses; the caller did not forward it. A command still under way
 * (BEGIN seen, refused at its synchronizing literal) ends there: the client, answered
 * instead of getting "+", abandons it. Returns 0, or -ENOENT. */
int imap_pairs_answer_locally(struct imap_pairs *pp, enum imap_local local);

/* Matches one complete response (borrowed for the call) and fills *out. */
enum imap_pairs_res imap_pairs_on_response(struct imap_pairs *pp, const struct imap_resp *r,
                                           struct imap_pair *out);

/* When the oldest outstanding entry is answered by mxproxy, pops it into *out with the
 * suggested answer (status, text; t_reply = now_ns) and returns true. */
bool imap_pairs_take_local(struct imap_pairs *pp, uint64_t now_ns, struct imap_pair *out);

/* Pops the oldest outstanding entry into *out as kind ABORTED and returns true, or false when
 * none is left: for a backend that went away. */
bool imap_pairs_abort(struct imap_pairs *pp, struct imap_pair *out);

/* Writes the answer line for a local pair ("<tag> BAD Line too long\r\n", "* BAD ..." when
 * the tag is empty) into out; returns its length or -1 when cap is too small. */
ssize_t imap_pairs_local_line(const struct imap_pair *pair, char *out, size_t cap);

/* The summary; valid as long as pp. */
const struct imap_pairs_summary *imap_pairs_summary(const struct imap_pairs *pp);

#endif /* MXPROXY_IMAP_PAIRS_H */
