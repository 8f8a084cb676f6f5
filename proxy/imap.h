/* imap.h: PURE IMAP framing for mxproxy. No I/O, no libuv or OpenSSL types, no allocation.
 *
 * Two independent parsers, one per direction:
 *
 *   struct imap_client  reads what the client sends: tagged commands whose line may be cut by
 *                       literals ({n} synchronizing, {n+} and {n-} not), the literal data (never
 *                       parsed as commands, never loggable), AUTHENTICATE continuation lines,
 *                       IDLE's DONE, the STARTTLS barrier. It tells the caller, byte range by
 *                       byte range, what to forward to the backend, what to drop and what to log.
 *   struct imap_server  reads what the backend sends: tagged and untagged responses (untagged
 *                       ones may carry literals, e.g. FETCH bodies) and "+" continuations, and
 *                       keeps a bounded summary of each (tag, status, response code, text).
 *
 * A zero-initialised struct imap_client or struct imap_server is ready to use (the client parser
 * then uses 65536-byte lines); imap_client_init() sets other options.
 *
 * Driving the client parser (picohttpparser style, one call per event):
 *
 *     size_t off = 0;
 *     for (;;) {
 *         struct imap_event ev;
 *         off += imap_client_parse(cp, buf + off, len - off, &ev);
 *         if (ev.type == IMAP_EV_AGAIN || ev.type == IMAP_EV_WAIT)
 *             break;
 *         if (ev.fwd_len > 0)
 *             forward_to_backend(ev.fwd, ev.fwd_len);
 *         imap_pairs_on_client_event(pairs, &ev, now_ns);     // imap_pairs.h
 *     }
 *     keep buf[off, len) and present it again, followed by the next read
 *
 * Every consumed byte is either forwarded (it is covered by ev.fwd) or dropped (TOO_LONG,
 * INVALID, DISCARD, INJECTED). Unconsumed bytes are held by the caller, which must present them
 * again, unchanged, at the start of the next call. The parser never asks the caller to hold more
 * than max_line_length or IMAP_STREAM_AT bytes, whichever is less, except in the WAIT states
 * (see IMAP_EV_WAIT): a command line longer than IMAP_STREAM_AT goes out in parts (BEGIN,
 * PART) as it arrives, and a fault in it found later cuts the command short
 * (IMAP_EV_F_MIDCMD). AUTHENTICATE and DONE lines are limited to IMAP_STREAM_AT.
 *
 * A command line counts toward max_line_length with all its parts (the text before, between
 * and after its literals) but without the literal data. The server's answers steer the client
 * parser: a synchronizing literal, AUTHENTICATE and IDLE wait for the server's "+" (reported
 * with imap_client_on_continue()) or for the tagged response that refuses them (reported with
 * imap_client_on_tagged()).
 *
 * Splitting the input at any byte boundary yields the same sequence of events (spans may be cut
 * differently) and the same forwarded bytes.
 */
#ifndef MXPROXY_IMAP_H
#define MXPROXY_IMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "verb.h"

#define IMAP_DEFAULT_MAX_LINE 65536 /* bytes per command line, literals excluded */
#define IMAP_MIN_MAX_LINE 64        /* smaller limits are raised to this */
#define IMAP_TAG_MAX 64             /* bytes of a tag kept (and compared) */
#define IMAP_TEXT_MAX 200           /* bytes of command or response text kept for logs */
#define IMAP_KEYWORD_MAX 24         /* bytes of an untagged keyword or response code kept */
#define IMAP_SERVER_HOLD 8192       /* a response line up to this long is handed out whole */
#define IMAP_SASL_MECH_MAX 20       /* longest SASL mechanism name (RFC 4422 3.1) */
#define IMAP_STREAM_AT 12288        /* a command line longer than this goes out in parts */
#define IMAP_STREAM_TAIL 32         /* bytes of such a line held back: an announcement fits */

/* Verbs, each with its row in imap_verbs; use imap_cmd_name() for text (the `command` label of the
 * IMAP metrics). */
enum imap_cmd {
    IMAP_CMD_NONE = 0, /* no command: greeting, untagged line, no tag */
    IMAP_CMD_UNKNOWN,  /* a verb not in the table */
    IMAP_CMD_CAPABILITY,
    IMAP_CMD_NOOP,
    IMAP_CMD_LOGOUT,
    IMAP_CMD_STARTTLS,
    IMAP_CMD_AUTHENTICATE,
    IMAP_CMD_LOGIN,
    IMAP_CMD_ENABLE,
    IMAP_CMD_ID,
    IMAP_CMD_SELECT,
    IMAP_CMD_EXAMINE,
    IMAP_CMD_CREATE,
    IMAP_CMD_DELETE,
    IMAP_CMD_RENAME,
    IMAP_CMD_SUBSCRIBE,
    IMAP_CMD_UNSUBSCRIBE,
    IMAP_CMD_LIST,
    IMAP_CMD_LSUB,
    IMAP_CMD_NAMESPACE,
    IMAP_CMD_STATUS,
    IMAP_CMD_APPEND,
    IMAP_CMD_IDLE,
    IMAP_CMD_CHECK,
    IMAP_CMD_CLOSE,
    IMAP_CMD_UNSELECT,
    IMAP_CMD_EXPUNGE,
    IMAP_CMD_SEARCH,
    IMAP_CMD_FETCH,
    IMAP_CMD_STORE,
    IMAP_CMD_COPY,
    IMAP_CMD_MOVE,
    IMAP_CMD_UID,
    IMAP_CMD_COMPRESS,
    IMAP_CMD_GETQUOTAROOT,
    IMAP_CMD_GETQUOTA,
    IMAP_CMD_SETQUOTA,
    IMAP_CMD_GETACL,
    IMAP_CMD_SETACL,
    IMAP_CMD_MYRIGHTS,
    IMAP_CMD_GETMETADATA,
    IMAP_CMD_SETMETADATA,
    IMAP_CMD_NOTIFY,
    IMAP_CMD_COUNT_ /* number of commands, not one */
};

/* IMAP's verb table, indexed by enum imap_cmd: the parser's and the session's (verb.h). */
extern const struct verb imap_verbs[IMAP_CMD_COUNT_];

enum imap_ev {
    /* Nothing more can be done with the bytes given: read more from the client. Consumes
     * nothing. At most max_line_length bytes remain unconsumed. */
    IMAP_EV_AGAIN = 0,
    /* The parser waits for the server (ev.cmd says for which command): a "+" after a
     * synchronizing literal, AUTHENTICATE or IDLE, or the tagged reply to COMPRESS or to the
     * command after IDLE's DONE. Consumes nothing, however many bytes are given. Stop feeding
     * the client's bytes until imap_client_on_continue() or imap_client_on_tagged(). */
    IMAP_EV_WAIT,
    /* The first part of a command cut by a literal: ev.fwd is that part with its CRLF, the
     * literal's announcement "{n}" at its end; or of a line longer than IMAP_STREAM_AT, cut
     * there. ev.tag and ev.cmd are set, ev.text is the loggable text so far (as for COMMAND).
     * With IMAP_EV_F_SYNC the literal is synchronizing: a WAIT for the server's "+" comes
     * next. */
    IMAP_EV_BEGIN,
    /* A later part of a command, between two literals: forward ev.fwd; ev.text and
     * IMAP_EV_F_SYNC as for BEGIN. */
    IMAP_EV_PART,
    /* Literal data: forward ev.fwd, never log or inspect it. ev.size is its length. */
    IMAP_EV_LITERAL,
    /* A command is complete: ev.fwd is its last (or only) part, CRLF included. ev.tag, ev.cmd,
     * ev.text (the loggable command text: verb and arguments as sent, literal data left out,
     * credentials replaced by "[redacted]") and ev.size (the literal octets of the whole
     * command) describe it. IMAP_EV_F_CONTINUED when a BEGIN came first. */
    IMAP_EV_COMMAND,
    /* One AUTHENTICATE continuation line (the server sent "+"): forward ev.fwd, never log it.
     * IMAP_EV_F_CANCEL when it is "*". */
    IMAP_EV_AUTH_RESPONSE,
    /* The line that ends an IDLE (normally "DONE"): forward ev.fwd. */
    IMAP_EV_DONE,
    /* A command line longer than max_line_length (literals not counted). The bytes that fit
     * are consumed and dropped; the rest of the line follows as DISCARD events, and so does the
     * data of a non-synchronizing literal announced at its end. Nothing of it is forwarded: the
     * caller answers "<tag> BAD" itself (ev.tag is the tag when it was read, else empty: answer
     * "* BAD"). With IMAP_EV_F_MIDCMD an earlier part of the command was forwarded already
     * (the backend waits for the rest): the session cannot go on; ev.text and ev.size then
     * describe the command as far as it went (as for COMMAND). Inside AUTHENTICATE, ev.fwd
     * is "*\r\n", a cancel for the server, with IMAP_EV_F_CANCEL: forward it, do not answer. */
    IMAP_EV_TOO_LONG,
    /* A complete command line with a bare CR, a bare LF or a NUL in it, dropped up to and
     * including its LF. ev.reason names the fault. Answered and flagged as TOO_LONG (with
     * IMAP_EV_F_MIDCMD, ev.text and ev.size as there). */
    IMAP_EV_INVALID,
    /* Consumed and dropped bytes (the rest of a refused line). ev.size is their number. Also a
     * whole line that is one word without a blank right after an AUTHENTICATE ended: the
     * client's SASL response sent without waiting for a "+" that never came (the server
     * refused first). No command is one word, and that word may be a credential: it is never
     * forwarded, answered or logged. Likewise every line that is not a tag and a known verb
     * after the synchronizing literal of a LOGIN or AUTHENTICATE was refused (tagged reply
     * instead of "+"): the literal and the rest of the command, sent anyway. */
    IMAP_EV_DISCARD,
    /* Bytes after a STARTTLS line, before its tagged reply: consumed and dropped so that they
     * are never executed inside TLS (command injection). ev.size is their number. */
    IMAP_EV_INJECTED,
};

#define IMAP_EV_F_SYNC 0x01u         /* BEGIN/PART: the literal waits for the server's "+" */
#define IMAP_EV_F_CONTINUED 0x02u    /* COMMAND: the end of a command that began with BEGIN */
#define IMAP_EV_F_NO_TAG 0x04u       /* BEGIN/COMMAND: no valid tag; the server answers untagged */
#define IMAP_EV_F_CANCEL 0x08u       /* AUTH_RESPONSE "*", or TOO_LONG/INVALID replaced by "*" */
#define IMAP_EV_F_MIDCMD 0x10u       /* TOO_LONG/INVALID after parts of the command went out */
#define IMAP_EV_F_AUTH_INITIAL 0x20u /* AUTHENTICATE with an initial response (SASL-IR) */

/* One result of imap_client_parse(). ev.fwd points into the buf passed to that call (valid
 * while the caller keeps those bytes) or to static storage; ev.tag and ev.text point into the
 * parser (valid until the next call on it). ev.tag and ev.text never hold credentials or
 * literal data; ev.fwd may, and must not be logged. */
struct imap_event {
    enum imap_ev type;
    const char *fwd; /* bytes to send to the backend, NULL when fwd_len == 0 */
    size_t fwd_len;
    enum imap_cmd cmd; /* BEGIN, COMMAND, WAIT, AUTH_RESPONSE, DONE, TOO_LONG, INVALID */
    const char *tag;   /* BEGIN, COMMAND, WAIT, TOO_LONG, INVALID: the tag ("" if none) */
    size_t tag_len;
    const char *text; /* COMMAND: loggable command text without the tag; else NULL */
    size_t text_len;
    uint64_t size;      /* COMMAND: literal octets; LITERAL, DISCARD, INJECTED: bytes */
    const char *reason; /* INVALID: "bare LF", "bare CR", "NUL"; TOO_LONG: "line too long" */
    unsigned flags;     /* IMAP_EV_F_* */
};

struct imap_client_opts {
    size_t max_line_length; /* command line limit, literals excluded; 0 = 65536 */
};

/* Parser state; fields are private, the struct is public so it can be embedded. */
struct imap_client {
    size_t max_line;              /* effective line limit, 0 until the first call */
    unsigned state;               /* IMAP_CS_* in imap.c */
    size_t scan;                  /* line: bytes of the held part already examined */
    const char *bad;              /* line: first fault found in the examined bytes */
    bool in_cmd;                  /* a BEGIN went out; the command is not complete */
    bool redact;                  /* the command's later parts are not loggable */
    size_t line_used;             /* bytes of the command's earlier parts */
    uint64_t lit_left;            /* literal bytes still to come (LITERAL, SKIP_LITERAL) */
    uint64_t lit_total;           /* literal octets of the command so far */
    uint64_t lit_next;            /* size of the literal announced, waiting for "+" */
    enum imap_cmd cmd;            /* the command in progress or waited for */
    unsigned flags;               /* IMAP_EV_F_* of the command in progress */
    unsigned skip_next;           /* state after a skipped line (CMD, or WAIT_AUTH) */
    bool after_auth;              /* the last command was an AUTHENTICATE that ended */
    bool after_lit;               /* a credential command's literal was refused */
    unsigned mark;                /* SKIP: literal announcement scanner state */
    uint64_t mark_val;            /* SKIP: the announced size so far */
    bool mark_sync;               /* SKIP: the announcement has no '+' or '-' */
    uint64_t injected;            /* total INJECTED bytes, for the session log */
    size_t tag_len;               /* bytes in tag */
    char tag[IMAP_TAG_MAX + 1];   /* tag of the command in progress, NUL-terminated */
    size_t text_len;              /* bytes in text */
    char text[IMAP_TEXT_MAX + 1]; /* loggable text of the command in progress */
};

/* Sets options on a fresh or reset parser; opts may be NULL for defaults. */
void imap_client_init(struct imap_client *p, const struct imap_client_opts *opts);

/* Parses the start of buf[0, len) (len may be 0; buf may then be NULL) and describes one event
 * in *ev. Returns the number of bytes consumed from the start of buf: the caller drops buf[0, n)
 * once it has used the event and passes the rest again, with new bytes appended, on the next
 * call. Never fails: bad client input yields TOO_LONG/INVALID events. */
size_t imap_client_parse(struct imap_client *p, const char *buf, size_t len, struct imap_event *ev);

/* The server sent a "+" continuation. Ends a WAIT for it: the literal's data, an AUTHENTICATE
 * line or the IDLE's DONE comes next. Ignored in other states. */
void imap_client_on_continue(struct imap_client *p);

/* The server sent a tagged response with tag[0, len). When it answers the command the parser
 * waits for (a refused literal, AUTHENTICATE, IDLE, COMPRESS) or the STARTTLS barrier, the
 * parser reads commands again (after an OK to STARTTLS or COMPRESS the caller switches to TLS
 * or to opaque relaying before it feeds more bytes). Ignored otherwise, so the caller may pass
 * every tagged response. */
void imap_client_on_tagged(struct imap_client *p, const char *tag, size_t len);

/* True while an IDLE waits for its "+" or for the client's DONE: the server owes its tagged
 * response only after the DONE. */
bool imap_client_idling(const struct imap_client *p);

/* Name of a verb: "SELECT"; "UNKNOWN"; "" for IMAP_CMD_NONE. */
const char *imap_cmd_name(enum imap_cmd cmd);

/* VERB_* flags of a command (0 out of range). */
unsigned imap_cmd_flags(enum imap_cmd cmd);

/* --- server responses -------------------------------------------------------------------- */

enum imap_resp_kind {
    IMAP_RESP_UNTAGGED = 0, /* "* ..." */
    IMAP_RESP_TAGGED,       /* "<tag> OK|NO|BAD ..." */
    IMAP_RESP_CONTINUE,     /* "+ ..." */
    IMAP_RESP_GARBAGE,      /* a line that is none of these */
};

enum imap_status {
    IMAP_ST_NONE = 0, /* untagged data ("* 5 EXISTS", "* CAPABILITY ..."), continuation */
    IMAP_ST_OK,
    IMAP_ST_NO,
    IMAP_ST_BAD,
    IMAP_ST_BYE,
    IMAP_ST_PREAUTH,
};

/* Bounded summary of one response. Text fields are raw bytes, NUL-terminated (the logger
 * escapes them). */
struct imap_resp {
    enum imap_resp_kind kind;
    enum imap_status status;
    char tag[IMAP_TAG_MAX + 1]; /* TAGGED: the tag */
    size_t tag_len;
    char keyword[IMAP_KEYWORD_MAX + 1]; /* UNTAGGED: "OK", "CAPABILITY", "EXISTS", upper-cased */
    uint64_t number;                    /* UNTAGGED: the number of "* 5 EXISTS" */
    bool has_number;                    /* number is set */
    char code[IMAP_KEYWORD_MAX + 1];    /* first word inside a leading "[...]", upper-cased */
    char text[IMAP_TEXT_MAX + 1];       /* status responses and "+": text after the status word,
                                           "[code]" included; data responses: after the keyword;
                                           garbage: the start of the line */
    size_t text_len;
    bool truncated;    /* text was cut to IMAP_TEXT_MAX */
    unsigned literals; /* literals in the response */
    uint64_t lit_size; /* their octets */
    uint64_t size;     /* bytes of the response, line ends and literals included */
    uint64_t t_first;  /* now_ns of the call that saw its first byte */
};

enum imap_sev {
    IMAP_SEV_AGAIN = 0, /* no more can be done: hold the rest, read more (consumes nothing) */
    IMAP_SEV_DATA,      /* ev.fwd: bytes of a response still in progress: forward them */
    IMAP_SEV_RESPONSE,  /* ev.fwd: the end of a response, *ev.resp: the whole response */
};

#define IMAP_SEV_F_LITERAL 0x02u /* DATA: literal data (a message body): never log it */
#define IMAP_SEV_F_WHOLE                                                                           \
    0x01u /* RESPONSE: ev.fwd is the entire response (one line of at most                          \
             IMAP_SERVER_HOLD bytes, no literal): it may be rewritten */

struct imap_server_event {
    enum imap_sev type;
    const char *fwd; /* into the buf passed in; NULL when fwd_len == 0 */
    size_t fwd_len;
    unsigned flags;               /* IMAP_SEV_F_* */
    const struct imap_resp *resp; /* RESPONSE: owned by the parser, valid until the next call */
};

/* Parser state; fields are private. */
struct imap_server {
    unsigned state;       /* IMAP_SS_* in imap.c */
    size_t scan;          /* bytes of the held line already searched for its LF */
    bool head_done;       /* the response's first line was summarised */
    bool streamed;        /* part of the response went out before its end */
    bool handed_out;      /* cur was handed out: reset it at the next call */
    uint64_t lit_left;    /* literal bytes still to come */
    struct imap_resp cur; /* the response in progress */
};

/* Parses the start of buf[0, len) like imap_client_parse(): returns the bytes consumed and
 * describes one event. A line is held (not consumed) until its LF unless it is longer than
 * IMAP_SERVER_HOLD: then it goes out in DATA pieces as it arrives (the last 32 bytes are held
 * back so that a literal's announcement at its end is seen whole). Literal data goes out as DATA
 * as it arrives. Only untagged data responses carry literals. A bare LF ends a line too (the
 * bytes are forwarded unchanged either way). now_ns stamps t_first. Never fails. */
size_t imap_server_parse(struct imap_server *p, const char *buf, size_t len, uint64_t now_ns,
                         struct imap_server_event *ev);

/* True when part of a response went out as DATA (literal data, or the start of a long line)
 * and its end has not come yet: a line of the caller's own written now would be read as more
 * of that response. */
bool imap_server_mid_response(const struct imap_server *p);

/* Name of a status: "OK", "NO", "BAD", "BYE", "PREAUTH", "" for none. */
const char *imap_status_name(enum imap_status st);

/* --- capability lists -------------------------------------------------------------------- */

#define IMAP_CAPA_ADD_STARTTLS 0x01u      /* add STARTTLS where missing */
#define IMAP_CAPA_DEL_STARTTLS 0x02u      /* remove STARTTLS */
#define IMAP_CAPA_ADD_LOGINDISABLED 0x04u /* add LOGINDISABLED where missing */
#define IMAP_CAPA_DEL_LOGINDISABLED 0x08u /* remove LOGINDISABLED */
#define IMAP_CAPA_DEL_COMPRESS 0x10u      /* remove COMPRESS=* */

/* Rewrites the capability list of one whole response line in[0, len) (CRLF or LF included):
 * "* CAPABILITY ..." or a status response whose text starts with "[CAPABILITY ...]" (the
 * greeting, a tagged OK). Flags as IMAP_CAPA_*; an ADD and a DEL of the same word: ADD wins.
 * Capabilities match case-insensitively as whole words; added ones go at the end of the list.
 * Other lines, and lists with nothing to change, are copied as they are. Returns the length
 * written to out (cap bytes), or -1 when out is too small or the line has no line end. */
ssize_t imap_capa_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap);

/* True when the line in[0, len) has a capability list (as for imap_capa_edit()) naming word
 * (upper-case, e.g. "STARTTLS"; "COMPRESS=" matches any COMPRESS=x). */
bool imap_capa_has(const char *in, size_t len, const char *word);

/* Writes `<tag> ID ("x-originating-ip" "<ip>" "x-originating-port" "<port>" "x-connected-ip"
 * "<ip>" "x-connected-port" "<port>")` CRLF into out (cap bytes): the RFC 2971 ID command a
 * proxy sends so that a Dovecot that trusts it logs the client's address. Addresses are
 * printable text without '"' or '\\'. Returns the length, or -1 when out is too small or an
 * argument holds a byte that a quoted string cannot. */
ssize_t imap_id_line(const char *tag, const char *client_ip, unsigned client_port,
                     const char *local_ip, unsigned local_port, char *out, size_t cap);

#endif /* MXPROXY_IMAP_H */
