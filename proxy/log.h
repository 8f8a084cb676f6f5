/* log.h: one line per event, logfmt or JSON, written by a dedicated thread.
 *
 * A line is built on the caller's stack with log_begin/log_*()/log_end and
 * handed to a bounded in-memory queue; a writer thread drains it to stderr.
 * Worker threads gather their lines in a buffer of their own first and hand
 * them over once per loop turn (log_thread_attach, log_flush): the hot path
 * takes no lock.
 * The event loop therefore never blocks on a slow stderr: when the queue is
 * full the line is dropped and counted, and the writer reports the count
 * (ev=log_dropped) once it catches up.
 *
 * Field order is fixed by the caller: ts, lvl and ev come first, then sid.
 * Values are escaped so every line is valid UTF-8 on one line.
 */
#ifndef MXPROXY_LOG_H
#define MXPROXY_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum log_level {
    LOG_DEBUG = 0,
    LOG_INFO,
    LOG_WARN,
    LOG_ERROR,
};

enum log_format {
    LOG_FORMAT_LOGFMT = 0,
    LOG_FORMAT_JSON,
};

#define LOG_LINE_MAX 4096 /* longer lines are cut and end with trunc=1 */

struct log_line {
    size_t len;             /* bytes used in buf */
    bool json;              /* format chosen at log_begin */
    bool truncated;         /* a field did not fit */
    enum log_level level;   /* set by log_begin */
    char buf[LOG_LINE_MAX]; /* the line being built, no NUL guaranteed */
};

/* Starts the writer thread on fd (normally 2). Returns 0 or a negative errno. */
int log_open(int fd, enum log_format fmt, enum log_level min);

/* Flushes every queued line and stops the writer thread. */
void log_close(void);

/* Gives the calling thread (an event loop's) its own line buffer: from then on its lines
 * gather there without a lock until log_flush(), which the thread calls once per loop turn
 * and before it exits. Returns 0 or -ENOMEM (the thread then logs as any other). */
int log_thread_attach(void);

/* Hands the calling thread's gathered lines to the writer (waking it at most once). */
void log_flush(void);

/* Flushes and frees the calling thread's buffer. */
void log_thread_detach(void);

/* Changes format and threshold at run time (SIGHUP); safe from any thread. */
void log_configure(enum log_format fmt, enum log_level min);

/* True when a line at lvl would be written: check before building costly fields. */
bool log_enabled(enum log_level lvl);

/* Starts a line: ts=, lvl=, ev=. */
void log_begin(struct log_line *l, enum log_level lvl, const char *ev);

/* Starts a bare JSON fragment (no ts, lvl, ev): the fields added then read
 * ,"key":value,... and l->buf[0, l->len) can be spliced into a JSON object
 * (the admin endpoint's sessions). Never passed to log_end(). */
void log_fields_begin(struct log_line *l);

/* Adds the session id as a fixed-width 16-digit hex string. */
void log_sid(struct log_line *l, uint64_t sid);

/* The field adders take the key's length from the inline wrappers below: with a literal
 * key, as every caller passes, the compiler counts it, not strlen on each field. */
void log_strn_k(struct log_line *l, const char *key, size_t klen, const char *value, size_t len);
void log_uint_k(struct log_line *l, const char *key, size_t klen, uint64_t value);
void log_ms_k(struct log_line *l, const char *key, size_t klen, uint64_t ns);

/* Adds key=value; the value is quoted and escaped as the format needs. */
static inline void log_strn(struct log_line *l, const char *key, const char *value, size_t len)
{
    log_strn_k(l, key, strlen(key), value, len);
}

static inline void log_str(struct log_line *l, const char *key, const char *value)
{
    log_strn_k(l, key, strlen(key), value, strlen(value));
}

/* Adds key=N (a JSON number in json format). */
static inline void log_uint(struct log_line *l, const char *key, uint64_t value)
{
    log_uint_k(l, key, strlen(key), value);
}

/* Adds key=F with three decimals, from a duration in nanoseconds (for ms=). */
static inline void log_ms(struct log_line *l, const char *key, uint64_t ns)
{
    log_ms_k(l, key, strlen(key), ns);
}

/* Ends the line and queues it; never blocks on the output. */
void log_end(struct log_line *l);

/* Formats like printf into a single msg= field: for rare, free-form lines. */
void log_msg(enum log_level lvl, const char *ev, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Appends value to out (capacity cap, NUL-terminated) escaped for logfmt or
 * JSON; quotes are added when needed. Returns bytes written, excluding NUL.
 * Exposed for unit tests. */
size_t log_escape(char *out, size_t cap, const char *value, size_t len, bool json);

#endif /* MXPROXY_LOG_H */
