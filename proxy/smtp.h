/* smtp.h: PURE SMTP framing for mxproxy. No I/O, no libuv or OpenSSL types, no allocation.
 *
 * Two independent parsers, one per direction:
 *
 *   struct smtp_client  reads what the client sends: command lines, DATA bodies (with the SMTP
 *                       smuggling guard), BDAT chunks, AUTH credential lines, the STARTTLS
 *                       barrier. It tells the caller, byte range by byte range, what to forward
 *                       to the backend, what to drop and what to log.
 *   struct smtp_server  reads what the backend sends: replies, single or multi-line, and keeps
 *                       a bounded summary of each (code, enhanced status code, first line).
 *
 * A zero-initialised struct smtp_client or struct smtp_server is ready to use (the client
 * parser then uses the defaults: 4096-byte lines, smuggling = reject); smtp_client_init() sets
 * other options.
 *
 * Driving the client parser (one call per event, picohttpparser style):
 *
 *     size_t off = 0;
 *     for (;;) {
 *         if (smtp_pairs_room(pairs) == 0)           // smtp_pairs.h: backpressure
 *             break;                                  //   stop reading the client
 *         struct smtp_event ev;
 *         off += smtp_client_parse(cp, buf + off, len - off, &ev);
 *         if (ev.type == SMTP_EV_AGAIN || ev.type == SMTP_EV_WAIT)
 *             break;
 *         if (ev.fwd_len > 0)
 *             forward_to_backend(ev.fwd, ev.fwd_len);
 *         smtp_pairs_on_client_event(pairs, &ev, now_ns);
 *         while (smtp_pairs_take_local(pairs, now_ns, &pair))
 *             answer_client(&pair);                   // 500 for TOO_LONG/INVALID, 554(+421)
 *         ...                                         // count INJECTED, log SMUGGLING, ...
 *     }
 *     keep buf[off, len) and present it again, followed by the next read
 *
 * Every consumed byte is either forwarded (it is covered by ev.fwd, or replaced by ev.fwd in
 * normalize mode) or dropped (TOO_LONG, INVALID, DISCARD, INJECTED). Unconsumed bytes are held
 * by the caller, which must present them again, unchanged, at the start of the next call. The
 * parser never asks the caller to hold more than max_line_length bytes, except in the WAIT state
 * (see SMTP_EV_WAIT).
 *
 * Command lines are split as a server's tokenizer splits them (Postfix smtpd): the verb is the
 * first token after any leading blanks, tokens are separated by any run of SP, HTAB, VT or FF,
 * verbs match in any case. So every line a server takes for AUTH, DATA or STARTTLS is that
 * command here too, and the part of an AUTH line that may hold a credential is never loggable.
 *
 * Replies steer the client parser: after DATA, AUTH and XCLIENT it waits for the server's
 * answer before it reads further client bytes, because the meaning of those bytes depends on
 * the answer. The caller reports every reply it matched to a command with smtp_client_on_reply().
 *
 * Splitting the input at any byte boundary yields the same sequence of events (spans may be cut
 * differently) and the same forwarded bytes.
 */
#ifndef MXPROXY_SMTP_H
#define MXPROXY_SMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "verb.h"

#define SMTP_DEFAULT_MAX_LINE 4096 /* bytes per command line, CRLF included */
#define SMTP_MIN_MAX_LINE 16       /* smaller limits are raised to this */
#define SMTP_REPLY_TEXT_MAX 200    /* bytes of a reply's first line kept for logs */
#define SMTP_ESC_MAX 12            /* "5.123.123" plus NUL, rounded up */

/* Verbs, plus pseudo commands; SMTP_CMD_DOT is the last. Each has its row in smtp_verbs. */
enum smtp_cmd {
    SMTP_CMD_NONE = 0, /* no command: greeting, unsolicited reply */
    SMTP_CMD_UNKNOWN,  /* a syntactically valid line with a verb not in the table */
    SMTP_CMD_HELO,
    SMTP_CMD_EHLO,
    SMTP_CMD_MAIL,
    SMTP_CMD_RCPT,
    SMTP_CMD_DATA,
    SMTP_CMD_BDAT,
    SMTP_CMD_RSET,
    SMTP_CMD_NOOP,
    SMTP_CMD_QUIT,
    SMTP_CMD_VRFY,
    SMTP_CMD_EXPN,
    SMTP_CMD_HELP,
    SMTP_CMD_AUTH,
    SMTP_CMD_STARTTLS,
    SMTP_CMD_XCLIENT,
    SMTP_CMD_XFORWARD,
    SMTP_CMD_DOT, /* pseudo: the end of a DATA body, answered by the server like a command */
};
#define SMTP_CMD_COUNT (SMTP_CMD_DOT + 1)

/* SMTP's verb table, indexed by enum smtp_cmd: the parser's and the session's (verb.h). */
extern const struct verb smtp_verbs[SMTP_CMD_COUNT];

/* What to do with a lone "." in a DATA body that is not a proper CRLF "." CRLF. */
enum smtp_smuggling {
    SMTP_SMUGGLING_REJECT = 0, /* report it, drop the rest of the message (default) */
    SMTP_SMUGGLING_NORMALIZE,  /* every bare CR or LF becomes CRLF, and a dot that then
                                  begins a line without having been stuffed by the client
                                  (after a bare CR or LF, or a lone dot) becomes "..", so the
                                  backend's un-stuffing loses no byte */
    SMTP_SMUGGLING_OFF,        /* forward the body byte for byte */
};

struct smtp_client_opts {
    size_t max_line_length;        /* command and AUTH line limit incl. CRLF; 0 = 4096. RFC 4954
                                      allows 12288-byte AUTH lines (large GSSAPI tokens) */
    enum smtp_smuggling smuggling; /* DATA body policy */
};

enum smtp_ev {
    /* Nothing more can be done with the bytes given: read more from the client. Consumes
     * nothing. At most max_line_length bytes remain unconsumed. */
    SMTP_EV_AGAIN = 0,
    /* The parser waits for the server's reply to ev.cmd (DATA, AUTH, XCLIENT) before it can
     * interpret what follows; consumes nothing, however many bytes are given. Stop feeding
     * (and, once the buffer is full, stop reading) the client until smtp_client_on_reply(). */
    SMTP_EV_WAIT,
    /* One command line. ev.fwd is the whole line including CRLF: forward it. ev.cmd, ev.line,
     * ev.arg, ev.size and ev.flags describe it. For STARTTLS, later bytes are dropped as
     * SMTP_EV_INJECTED until smtp_client_on_reply(p, SMTP_CMD_STARTTLS, code). Right after
     * an AUTH refused before any 334, a line of one word that is no verb is the client's SASL
     * response sent without waiting (a credential): forwarded (the server answers it), but
     * ev.line is "[redacted]". */
    SMTP_EV_COMMAND,
    /* One AUTH credential line (the server answered 334). ev.fwd is the line with CRLF:
     * forward it, never log it; ev.line and ev.arg are NULL. SMTP_EV_F_CANCEL if it is "*". */
    SMTP_EV_AUTH_RESPONSE,
    /* A command line longer than max_line_length. Its first max_line_length bytes are consumed
     * and dropped; the rest, up to and including the next LF, follows as SMTP_EV_DISCARD
     * events (however the line was split into reads). Nothing of the line is forwarded: the caller
     * answers "500 5.5.2" (through smtp_pairs, which keeps that answer in order with pipelined
     * replies). Exception: inside an AUTH exchange ev.fwd is "*\r\n", a cancel line for the server,
     * and SMTP_EV_F_CANCEL is set; forward it and do not answer, the server will. */
    SMTP_EV_TOO_LONG,
    /* A complete command line with a bare LF, a bare CR or a NUL in it, consumed up to and
     * including its LF and dropped. ev.reason names the fault. Answered as SMTP_EV_TOO_LONG. */
    SMTP_EV_INVALID,
    /* DATA body bytes: forward ev.fwd. It points into the input, or in normalize mode to a
     * static replacement ("\r\n" for a bare CR or LF, ".." for a dot right after one). */
    SMTP_EV_DATA,
    /* The end of the DATA body. Normally ev.fwd is ".\r\n": forward it; the server's answer
     * belongs to SMTP_CMD_DOT. ev.size is the body size in bytes as received, the CRLF before
     * the dot included, the dot line excluded. With SMTP_EV_F_SMUGGLING (reject mode) ev.fwd
     * is empty: answer "554 5.7.0" then "421" and close; the backend never saw an end. */
    SMTP_EV_DATA_END,
    /* A lone dot delimited by a bare CR or LF on at least one side. ev.reason is the pattern,
     * "<before>.<after>" with each side CRLF, LF or CR, e.g. "LF.CRLF". Reject mode: nothing is
     * consumed or forwarded; the parser then drops everything up to the real CRLF.CRLF
     * (SMTP_EV_DISCARD events) and ends with SMTP_EV_DATA_END + SMTP_EV_F_SMUGGLING. Normalize
     * mode: the dot is consumed and ev.fwd is "..": forward it and go on. Never in off mode. */
    SMTP_EV_SMUGGLING,
    /* BDAT chunk bytes: forward ev.fwd. Never inspected. */
    SMTP_EV_BDAT_DATA,
    /* The last byte of a BDAT chunk was seen (consumes nothing). ev.size is the chunk size,
     * SMTP_EV_F_LAST is copied from the command. Comes right after SMTP_EV_COMMAND for
     * "BDAT 0". */
    SMTP_EV_BDAT_END,
    /* Consumed and dropped bytes: the rest of an overlong line, or of a message with a
     * smuggling pattern (reject mode). ev.size is their number. */
    SMTP_EV_DISCARD,
    /* Bytes after a STARTTLS line, before its reply: consumed and dropped so that they are
     * never executed inside TLS (command injection). ev.size is their number. */
    SMTP_EV_INJECTED,
};

#define SMTP_EV_F_LAST 0x01u         /* BDAT: the chunk carries LAST */
#define SMTP_EV_F_AUTH_INITIAL 0x02u /* AUTH: an initial response follows the mechanism */
#define SMTP_EV_F_CANCEL 0x04u       /* AUTH line is "*", or replaced by "*\r\n" */
#define SMTP_EV_F_SMUGGLING 0x08u    /* DATA_END of a message that had a smuggling pattern */
/* MAIL/RCPT/BDAT arguments not understood: ev.arg is NULL, and a BDAT so flagged is not
 * followed by a chunk (the server will refuse it too). */
#define SMTP_EV_F_BAD_ARGS 0x10u

/* One result of smtp_client_parse(). Pointers are borrowed: into the buf passed to that call
 * (valid while the caller keeps those bytes unchanged) or to static storage. ev.line and ev.arg
 * never contain AUTH credentials; ev.fwd may, and must not be logged. */
struct smtp_event {
    enum smtp_ev type;
    const char *fwd; /* bytes to send to the backend, NULL when fwd_len == 0 */
    size_t fwd_len;
    enum smtp_cmd cmd; /* COMMAND, WAIT: the command; BDAT_END: BDAT; DATA_END: DOT;
                          AUTH_RESPONSE and AUTH cancels: AUTH; else SMTP_CMD_NONE */
    const char *line;  /* COMMAND: loggable command text without CRLF; for AUTH only the
                          line up to the end of the mechanism name, blanks as sent ("AUTH
                          PLAIN", "\tauth\tlogin"), or up to AUTH when there is no name or
                          one longer than SASL's 20 characters (see SMTP_EV_F_AUTH_INITIAL).
                          NULL otherwise */
    size_t line_len;
    const char *arg; /* COMMAND: HELO/EHLO name, MAIL/RCPT address without <>, AUTH
                        mechanism (empty when line stops at AUTH); NULL for other commands
                        and events */
    size_t arg_len;
    uint64_t size;      /* BDAT chunk size (COMMAND, BDAT_END), body size (DATA_END),
                           bytes dropped (DISCARD, INJECTED) */
    const char *reason; /* static text: SMUGGLING pattern, INVALID fault ("bare LF",
                           "bare CR", "NUL"), TOO_LONG "line too long"; else NULL */
    unsigned flags;     /* SMTP_EV_F_* */
};

/* Parser state; fields are private, the struct is public so it can be embedded. */
struct smtp_client {
    size_t max_line;               /* effective line limit, 0 until the first call */
    enum smtp_smuggling smuggling; /* body policy */
    unsigned state;                /* SMTP_CS_* in smtp.c */
    unsigned skip_next;            /* state to enter after a skipped overlong line */
    enum smtp_cmd wait_cmd;        /* command whose reply WAIT expects */
    unsigned bol;                  /* body: line delimiter just before the next byte */
    size_t scan;                   /* line: bytes of the held line already examined */
    const char *bad;               /* line: first fault found in the examined bytes */
    uint64_t size;                 /* body bytes so far, or BDAT bytes still expected */
    uint64_t chunk;                /* BDAT chunk size */
    bool chunk_last;               /* BDAT chunk carries LAST */
    uint64_t injected;             /* total SMTP_EV_INJECTED bytes, for the session log */
    bool after_auth;               /* the last command was an AUTH refused before any 334 */
};

/* Sets options on a fresh or reset parser; opts may be NULL for defaults. */
void smtp_client_init(struct smtp_client *p, const struct smtp_client_opts *opts);

/* Parses the start of buf[0, len) (len may be 0) and describes one event in *ev. Returns the
 * number of bytes consumed from the start of buf: the caller drops buf[0, n) once it has used
 * the event and passes the rest again, with new bytes appended, on the next call. buf may be
 * NULL when len is 0. Never fails: bad client input yields TOO_LONG/INVALID/SMUGGLING events. */
size_t smtp_client_parse(struct smtp_client *p, const char *buf, size_t len, struct smtp_event *ev);

/* Tells the parser that the server answered cmd with code (as smtp_pairs reports it, 334
 * intermediates included). Ends a WAIT for that command: DATA + 354 starts the body, AUTH +
 * 334 makes the next line a credential line, anything else returns to commands. A reply to
 * STARTTLS ends the barrier (after a 2xx the caller switches to TLS before feeding more bytes).
 * Replies for other commands are ignored, so the caller may pass every reply. */
void smtp_client_on_reply(struct smtp_client *p, enum smtp_cmd cmd, int code);

/* Name of a command for logs: "MAIL", "." for SMTP_CMD_DOT, "" for SMTP_CMD_NONE. */
const char *smtp_cmd_name(enum smtp_cmd cmd);

/* VERB_* flags of a command (0 out of range). */
unsigned smtp_cmd_flags(enum smtp_cmd cmd);

/* --- server replies ------------------------------------------------------------------- */

/* Bounded summary of one reply. Text fields are raw bytes (the logger escapes them). */
struct smtp_reply {
    int code;                           /* 100..599; 0 for SMTP_SEV_GARBAGE */
    char esc[SMTP_ESC_MAX];             /* enhanced status code of the first line, "" if none */
    char text[SMTP_REPLY_TEXT_MAX + 1]; /* first line after code and esc, NUL-terminated;
                                           garbage: the start of the bad line */
    size_t text_len;                    /* bytes in text (it may itself contain NULs) */
    bool truncated;                     /* the first line was longer than text */
    unsigned lines;                     /* lines in the reply (saturates) */
    uint64_t size;                      /* bytes of the reply, line ends included */
    uint64_t t_first;                   /* now_ns of the call that saw its first byte */
};

enum smtp_sev {
    SMTP_SEV_AGAIN = 0, /* all bytes consumed, no reply completed yet */
    SMTP_SEV_REPLY,     /* a reply ended at the last consumed byte: *ev.reply */
    SMTP_SEV_GARBAGE,   /* a line that is not a reply line (or a continuation line whose
                           code differs) ended at the last consumed byte; the reply in progress
                           is abandoned and the parser starts afresh with the next line.
                           ev.reply->text holds the start of the bad line */
};

struct smtp_server_event {
    enum smtp_sev type;
    const struct smtp_reply *reply; /* REPLY, GARBAGE: owned by the parser, valid until the
                                       next smtp_server_parse() call on it */
};

/* Parser state; fields are private. */
struct smtp_server {
    unsigned state;        /* SMTP_SS_* in smtp.c */
    int line_code;         /* code digits of the current line so far */
    bool pending_cr;       /* a CR in first-line text, not yet known to end the line */
    bool bad;              /* the current line is garbage */
    bool handed_out;       /* cur is a completed reply the caller may still read */
    struct smtp_reply cur; /* reply being read, or the one just completed */
};

/* Parses server bytes. Every byte is meant to be forwarded to the client unchanged; this only
 * observes. Returns the number of bytes consumed: up to the end of the first complete reply
 * (or garbage line), or len. now_ns is the caller's clock, stored as t_first of a reply whose
 * first byte is in this call. Memory stays bounded for any input (long lines are counted, not
 * stored). */
size_t smtp_server_parse(struct smtp_server *p, const char *buf, size_t len, uint64_t now_ns,
                         struct smtp_server_event *ev);

/* --- EHLO replies ----------------------------------------------------------------------- */

/* Rewrites one complete EHLO reply (raw bytes as the server sent them) for a proxy that
 * terminates STARTTLS itself: add=true offers STARTTLS (a second line "250-STARTTLS", or a
 * single-line reply made multi-line) unless it already is; add=false removes every STARTTLS
 * line. Every other line, the first included, keeps its bytes; only the separator after a code
 * changes where the last line changes. Returns the length written to out (cap bytes), or -1
 * when out is too small or the input is not a well-formed 250 reply: the caller then forwards
 * the reply as it is. */
ssize_t smtp_ehlo_rewrite(const char *in, size_t len, bool add, char *out, size_t cap);

/* What smtp_ehlo_edit() changes in an EHLO reply. */
#define SMTP_EHLO_ADD_STARTTLS 0x01u /* offer STARTTLS unless it already is (as add=true) */
#define SMTP_EHLO_DEL_STARTTLS 0x02u /* remove every STARTTLS line (as add=false) */
#define SMTP_EHLO_DEL_XCLIENT 0x04u  /* remove every XCLIENT and XFORWARD line */

/* smtp_ehlo_rewrite() with the changes as SMTP_EHLO_* flags, which may be combined (ADD and
 * DEL_STARTTLS together: ADD wins). Keywords match case-insensitively as the whole first word of
 * a capability line (never the first line). Lines kept keep their bytes; only the separator after
 * a code changes where the last line changes. No change to make: the reply is copied as it is.
 * Returns the length written to out (cap bytes), or -1 when out is too small, the reply has more
 * than 64 lines or is not a well-formed 250 reply. */
ssize_t smtp_ehlo_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap);
/* The single-line reply to HELO that a raw 250 reply (EHLO or HELO) implies: its first line's
 * text as "250 <text>\r\n" (the text keeps its bytes; the line's own end, CRLF or LF, becomes
 * CRLF). Returns the length written to out (cap bytes), or -1 when out is too small or the first
 * line is not a complete "250" reply line. */
ssize_t smtp_helo_reply(const char *in, size_t len, char *out, size_t cap);

/* Index just past the LF that ends the line starting at buf[pos], or len when no LF follows:
 * for walking the lines of a raw reply. pos < len. */
size_t smtp_line_end(const char *buf, size_t pos, size_t len);

/* True when one line of an EHLO reply (code and separator included, CRLF optional) announces
 * kw, an upper-case keyword, as its whole first word, in any case ("250-xclient ADDR" is kw
 * "XCLIENT"). The caller skips the reply's first line, which names the server. */
bool smtp_ehlo_line_is(const char *line, size_t len, const char *kw);

/* True when a raw EHLO reply lists STARTTLS among its capabilities (not on its first line). */
bool smtp_ehlo_offers_starttls(const char *in, size_t len);

#endif /* MXPROXY_SMTP_H */
