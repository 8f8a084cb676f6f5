/* pop3.h: PURE POP3 framing for mxproxy. No I/O, no libuv or OpenSSL types, no allocation.
 *
 * Two independent parsers, one per direction, shaped like smtp.h's:
 *
 *   struct pop3_client  reads what the client sends: command lines (RFC 1939, RFC 2449, RFC
 *                       2595 STLS, RFC 5034 AUTH), SASL answer lines, the STLS barrier. It
 *                       tells the caller what to forward, what to drop and what may be logged:
 *                       USER, PASS and APOP arguments and everything after an AUTH mechanism
 *                       never are, nor are SASL answer lines.
 *   struct pop3_server  reads what the server sends: "+OK"/"-ERR" status lines, the multi-line
 *                       bodies that follow a "+OK" to CAPA, LIST and UIDL without argument,
 *                       RETR, TOP (dot-stuffed, ending in a "." line), and SASL continuations
 *                       ("+ " lines) during AUTH. Whether a "+OK" starts a body depends on the
 *                       command it answers: the caller passes that command's framing in.
 *
 * A zero-initialised struct pop3_client or struct pop3_server is ready to use (the client parser
 * then takes 4096-byte lines); pop3_client_init() sets other options.
 *
 * Driving the client parser (one call per event, as for smtp_client_parse()):
 *
 *     size_t off = 0;
 *     for (;;) {
 *         if (pop3_pairs_room(pairs) == 0)           // pop3_pairs.h: backpressure
 *             break;
 *         struct pop3_event ev;
 *         off += pop3_client_parse(cp, buf + off, len - off, &ev);
 *         if (ev.type == POP3_EV_AGAIN || ev.type == POP3_EV_WAIT)
 *             break;
 *         if (ev.fwd_len > 0)
 *             forward_to_backend(ev.fwd, ev.fwd_len);
 *         pop3_pairs_on_client_event(pairs, &ev, now_ns);
 *         while (pop3_pairs_take_local(pairs, now_ns, &pair))
 *             answer_client(&pair);                   // "-ERR Line too long", ...
 *     }
 *     keep buf[off, len) and present it again, followed by the next read
 *
 * Every consumed byte is either forwarded (covered by ev.fwd) or dropped (TOO_LONG, INVALID,
 * DISCARD, INJECTED). The parser never asks the caller to hold more than max_line_length bytes,
 * except in the WAIT state (see POP3_EV_WAIT).
 *
 * Command lines are split where any server splits them: the keyword is the first token after
 * any leading blanks, tokens are separated by runs of SP, HTAB, VT or FF, keywords match in any
 * case. Dovecot splits at SP only, so "PASS\tx" is an unknown command there; here it is still a
 * PASS and its argument is never loggable.
 *
 * Splitting the input at any byte boundary yields the same sequence of events (DISCARD and
 * INJECTED spans may be cut differently) and the same forwarded bytes, in both directions.
 */
#ifndef MXPROXY_POP3_H
#define MXPROXY_POP3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "verb.h"

#define POP3_DEFAULT_MAX_LINE 4096 /* bytes per command line, CRLF included */
#define POP3_MIN_MAX_LINE 16       /* smaller limits are raised to this */
#define POP3_TEXT_MAX 200          /* bytes of a status line's text kept for logs */

/* Keywords; POP3_CMD_XCLIENT is the last. Each has its row in pop3_verbs. */
enum pop3_cmd {
    POP3_CMD_NONE = 0, /* no command: greeting, unsolicited response */
    POP3_CMD_UNKNOWN,  /* a well-formed line whose keyword is not in the table */
    POP3_CMD_USER,
    POP3_CMD_PASS,
    POP3_CMD_APOP,
    POP3_CMD_AUTH,
    POP3_CMD_STLS,
    POP3_CMD_CAPA,
    POP3_CMD_QUIT,
    POP3_CMD_STAT,
    POP3_CMD_LIST,
    POP3_CMD_RETR,
    POP3_CMD_DELE,
    POP3_CMD_NOOP,
    POP3_CMD_RSET,
    POP3_CMD_TOP,
    POP3_CMD_UIDL,
    POP3_CMD_UTF8,    /* RFC 6856 */
    POP3_CMD_LANG,    /* RFC 6856: without argument, a +OK lists languages (multi-line) */
    POP3_CMD_XCLIENT, /* Dovecot's: the proxy tells the server who the client is */
};
#define POP3_CMD_COUNT (POP3_CMD_XCLIENT + 1)

/* POP3's verb table, indexed by enum pop3_cmd: the parser's and the session's (verb.h). */
extern const struct verb pop3_verbs[POP3_CMD_COUNT];

/* How the server answers a command. */
enum pop3_frame {
    POP3_FRAME_SINGLE = 0, /* one status line */
    POP3_FRAME_MULTI,      /* "+OK" line then a dot-stuffed body up to a "." line; "-ERR" is
                              one line. CAPA, RETR, TOP; LIST, UIDL, LANG without argument;
                              AUTH without argument (SASL mechanism discovery, as Outlook uses
                              it and Dovecot answers it) */
    POP3_FRAME_SASL,       /* AUTH with a mechanism: any number of "+ " continuation lines,
                              each answered by the client, then one status line */
};

/* A status as the server sent it. */
enum pop3_status {
    POP3_STATUS_NONE = 0, /* not a status line (garbage), or never answered */
    POP3_STATUS_OK,       /* "+OK" */
    POP3_STATUS_ERR,      /* "-ERR" */
    POP3_STATUS_CONT,     /* "+ ": a SASL continuation (POP3_FRAME_SASL only) */
};

struct pop3_client_opts {
    size_t max_line_length; /* command and SASL answer line limit incl. CRLF; 0 = 4096 */
};

enum pop3_ev {
    /* Nothing more can be done with the bytes given: read more from the client. Consumes
     * nothing. At most max_line_length bytes remain unconsumed. */
    POP3_EV_AGAIN = 0,
    /* The parser waits for the server's response to AUTH (ev.cmd) before it can tell a SASL
     * answer line from a command; consumes nothing, however many bytes are given. Stop feeding
     * (and, once the buffer is full, stop reading) the client until pop3_client_on_reply(). */
    POP3_EV_WAIT,
    /* One command line. ev.fwd is the whole line including CRLF: forward it. ev.cmd, ev.frame,
     * ev.line, ev.arg and ev.flags describe it. For STLS, later bytes are dropped as
     * POP3_EV_INJECTED until pop3_client_on_reply(p, POP3_CMD_STLS, status). Right after an
     * AUTH refused before any "+ ", a line of one word that is no verb is the client's SASL
     * answer sent without waiting (a credential): forwarded (the server answers it), but
     * ev.line is "[redacted]" and ev.arg empty. */
    POP3_EV_COMMAND,
    /* One SASL answer line (the server sent a "+ " continuation). ev.fwd is the line with CRLF:
     * forward it, never log it; ev.line and ev.arg are NULL. POP3_EV_F_CANCEL if it is "*". */
    POP3_EV_AUTH_RESPONSE,
    /* A line longer than max_line_length. Its first max_line_length bytes are consumed and
     * dropped; the rest, up to and including the next LF, follows as POP3_EV_DISCARD events.
     * Nothing of it is forwarded: the caller answers "-ERR" (through pop3_pairs, in order with
     * pipelined responses). Inside an AUTH exchange ev.fwd is "*\r\n", a cancel line for the
     * server, and POP3_EV_F_CANCEL is set: forward it and do not answer, the server will. */
    POP3_EV_TOO_LONG,
    /* A complete line with a bare LF, a bare CR or a NUL in it, consumed up to and including
     * its LF and dropped. ev.reason names the fault. Answered (or cancelled) as TOO_LONG. */
    POP3_EV_INVALID,
    /* Consumed and dropped bytes: the rest of an overlong line. ev.size is their number. */
    POP3_EV_DISCARD,
    /* Bytes after an STLS line, before its response: consumed and dropped so that they are
     * never executed inside TLS (command injection). ev.size is their number. */
    POP3_EV_INJECTED,
};

#define POP3_EV_F_REDACTED                                                                         \
    0x01u                      /* COMMAND: ev.line stops before a credential; the log shows        \
                                  ev.line followed by " [redacted]" */
#define POP3_EV_F_CANCEL 0x02u /* the SASL answer is "*", or was replaced by "*\r\n" */
#define POP3_EV_F_ARG 0x04u    /* COMMAND: something other than blanks follows the keyword */

/* One result of pop3_client_parse(). Pointers are borrowed: into the buf passed to that call
 * (valid while the caller keeps those bytes unchanged) or to static storage. ev.line and ev.arg
 * never contain credentials; ev.fwd may, and must not be logged. */
struct pop3_event {
    enum pop3_ev type;
    const char *fwd; /* bytes to send to the server, NULL when fwd_len == 0 */
    size_t fwd_len;
    enum pop3_cmd cmd;     /* COMMAND, WAIT: the command; AUTH_RESPONSE and cancels: AUTH;
                              else POP3_CMD_NONE */
    enum pop3_frame frame; /* COMMAND: how the server will answer it */
    const char *line;      /* COMMAND: loggable text without CRLF: the whole line, except for
                              USER, PASS and APOP (up to the end of the keyword) and AUTH (up
                              to the end of the mechanism name, or of the keyword when there
                              is none or it is no SASL name); NULL otherwise */
    size_t line_len;
    const char *arg; /* COMMAND: AUTH mechanism (empty when line stops at AUTH); the argument
                        text of other commands except USER, PASS and APOP, blanks trimmed
                        (empty when none); NULL otherwise */
    size_t arg_len;
    uint64_t size;      /* bytes dropped (DISCARD, INJECTED) */
    const char *reason; /* static text: INVALID fault ("bare LF", "bare CR", "NUL"), TOO_LONG
                           "line too long"; else NULL */
    unsigned flags;     /* POP3_EV_F_* */
};

/* Parser state; fields are private, the struct is public so it can be embedded. */
struct pop3_client {
    size_t max_line;        /* effective line limit, 0 until the first call */
    unsigned state;         /* POP3_CS_* in pop3.c */
    unsigned skip_next;     /* state to enter after a skipped overlong line */
    enum pop3_cmd wait_cmd; /* command whose response WAIT or the barrier expects */
    size_t scan;            /* bytes of the held line already examined */
    const char *bad;        /* first fault found in the examined bytes */
    uint64_t injected;      /* total POP3_EV_INJECTED bytes, for the session log */
    bool after_auth;        /* the last command was an AUTH refused before any "+ " */
};

/* Sets options on a fresh or reset parser; opts may be NULL for defaults. */
void pop3_client_init(struct pop3_client *p, const struct pop3_client_opts *opts);

/* Parses the start of buf[0, len) (len may be 0; buf may then be NULL) and describes one event
 * in *ev. Returns the number of bytes consumed from the start of buf: the caller drops
 * buf[0, n) once it has used the event and passes the rest again, with new bytes appended, on
 * the next call. Never fails: bad client input yields TOO_LONG/INVALID events. */
size_t pop3_client_parse(struct pop3_client *p, const char *buf, size_t len, struct pop3_event *ev);

/* Tells the parser that the server answered cmd with status (as pop3_pairs reports it,
 * continuations included). Ends a WAIT for AUTH: a continuation makes the next line a SASL
 * answer, anything else returns to commands. Any response to STLS ends the barrier (after a
 * +OK the caller switches to TLS before feeding more bytes). Other responses are ignored, so
 * the caller may pass every response. */
void pop3_client_on_reply(struct pop3_client *p, enum pop3_cmd cmd, enum pop3_status status);

/* Name of a command for logs and metric labels: "RETR", "" for POP3_CMD_NONE. */
const char *pop3_cmd_name(enum pop3_cmd cmd);

/* VERB_* flags of a command (0 out of range). */
unsigned pop3_cmd_flags(enum pop3_cmd cmd);

/* "+OK", "-ERR", "+" (continuation) or "" (none). */
const char *pop3_status_name(enum pop3_status status);

/* --- server responses ------------------------------------------------------------------ */

/* Bounded summary of one response. Text is raw bytes (the logger escapes them). */
struct pop3_response {
    enum pop3_status status;      /* OK or ERR; CONT for a continuation; NONE for garbage */
    bool multi;                   /* a multi-line body followed the status line */
    char text[POP3_TEXT_MAX + 1]; /* status line after "+OK"/"-ERR" and one SP, NUL-terminated;
                                    empty for a continuation (SASL data is never kept);
                                    garbage: the start of the bad line */
    size_t text_len;              /* bytes in text (it may itself contain NULs) */
    bool truncated;               /* the status line was longer than text */
    unsigned lines;               /* body lines, the "." terminator excluded (saturates) */
    uint64_t size;                /* body octets once un-stuffed, line ends included,
                                     terminator excluded: a RETR body's size is the message's */
    uint64_t wire;                /* bytes of the whole response as sent */
    uint64_t t_first;             /* now_ns of the call that saw its first byte */
};

enum pop3_sev {
    POP3_SEV_AGAIN = 0,    /* all bytes consumed, no response completed yet */
    POP3_SEV_RESPONSE,     /* a response ended at the last consumed byte: *ev.resp */
    POP3_SEV_CONTINUATION, /* a "+ " line ended at the last consumed byte (POP3_FRAME_SASL):
                              the exchange goes on, the client answers next */
    POP3_SEV_GARBAGE,      /* a line that is no status line ended at the last consumed byte;
                              the parser starts afresh with the next line. ev.resp->text holds
                              the start of the bad line */
    POP3_SEV_BODY,         /* the status line of a multi-line response ended at the last
                              consumed byte: status, text and wire (the status line's bytes)
                              are set, the body follows, then POP3_SEV_RESPONSE */
};

struct pop3_server_event {
    enum pop3_sev type;
    const struct pop3_response *resp; /* all but AGAIN: owned by the parser, valid until the
                                         next pop3_server_parse() call on it */
};

/* Parser state; fields are private. */
struct pop3_server {
    unsigned state;           /* POP3_SS_* in pop3.c */
    enum pop3_frame frame;    /* framing of the response being read */
    bool pending_cr;          /* a CR in the status text, not yet known to end the line */
    unsigned char ind_len;    /* bytes of the status indicator read so far */
    char ind[4];              /* those bytes: a prefix of "+OK", "-ERR" or "+ " */
    bool handed_out;          /* cur is a completed response the caller may still read */
    struct pop3_response cur; /* response being read, or the one just completed */
};

/* Parses server bytes. Every byte is meant to be forwarded to the client unchanged; this only
 * observes. frame is how the server answers the command the next response belongs to
 * (pop3_pairs_frame()); it is taken when a response's first byte is read and ignored while one
 * is in progress. Returns the number of bytes consumed: up to the end of the first complete
 * response, continuation or garbage line, or len. now_ns is the caller's clock, stored as
 * t_first of a response whose first byte is in this call. Memory stays bounded for any input. */
size_t pop3_server_parse(struct pop3_server *p, const char *buf, size_t len, enum pop3_frame frame,
                         uint64_t now_ns, struct pop3_server_event *ev);

/* True between POP3_SEV_BODY and the end of that response: the client is reading a body, and
 * nothing but the rest of it may be sent to it. */
bool pop3_server_in_body(const struct pop3_server *p);

/* --- CAPA responses ---------------------------------------------------------------------- */

#define POP3_CAPA_ADD_STLS 0x01u /* offer STLS unless it already is */
#define POP3_CAPA_DEL_STLS 0x02u /* remove every STLS line (ADD wins when both are given) */

/* Rewrites one complete "+OK" CAPA response (raw bytes as the server sent them: status line,
 * capability lines, "." line) for a proxy that terminates STLS itself or speaks it to the
 * server: ADD_STLS appends an "STLS\r\n" line before the terminator, DEL_STLS removes every
 * line whose first word is STLS (in any case). Other lines keep their bytes. Nothing to change:
 * the response is copied as it is. Returns the length written to out (cap bytes), or -1 when
 * out is too small or the input is not a complete "+OK" multi-line response: the caller then
 * forwards it as it is. */
ssize_t pop3_capa_edit(const char *in, size_t len, unsigned flags, char *out, size_t cap);

/* True when a complete CAPA response lists kw (an upper-case keyword) as the first word of a
 * capability line, in any case. */
bool pop3_capa_has(const char *in, size_t len, const char *kw);

#endif /* MXPROXY_POP3_H */
