/* log.c: line builder, escaping and the asynchronous writer thread. */
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "fmt.h"

#define LOG_QUEUE_SIZE (1u << 20) /* bytes of pending lines before dropping */
#define LOG_BATCH_NS 5000000L     /* the writer lets lines gather this long */

static const char *const log_level_names[] = {"debug", "info", "warn", "error"};

/* A ring of bytes; head and tail grow without wrapping, index with % size. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    bool running;
    bool stopping;
    bool idle;   /* the writer sleeps on wake: the next line must signal */
    bool urgent; /* a warning or error is queued: write without pausing */
    int fd;
    size_t head;      /* next byte to write out */
    size_t tail;      /* next byte to fill */
    uint64_t dropped; /* lines refused since the last report */
    char ring[LOG_QUEUE_SIZE];
} log_q = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .fd = 2,
};

static atomic_int log_min_level = LOG_INFO;
static atomic_int log_cur_format = LOG_FORMAT_LOGFMT;

/* A worker's own line buffer (log_thread_attach): log_end appends to it without a lock and
 * log_flush hands it to the ring once per loop turn, so the shared lock is taken, and the
 * writer woken, at most once per turn instead of once per line. */
#define LOG_STAGE_SIZE (64 * 1024)

struct log_stage {
    size_t len;  /* bytes of whole lines in buf */
    bool urgent; /* a warning or error is staged */
    char buf[LOG_STAGE_SIZE];
};

static _Thread_local struct log_stage *log_stage;

/* The timestamp up to the seconds, formatted once per second per thread: the second it was
 * made for (0: none yet) and "YYYY-MM-DDTHH:MM:SS.". */
static _Thread_local time_t log_ts_sec;
static _Thread_local char log_ts_text[24];

static void log_write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                /* A non-blocking stderr (shared with a parent that set O_NONBLOCK): wait
                 * rather than leave the rest of a line unwritten. */
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                if (poll(&pfd, 1, -1) >= 0 || errno == EINTR)
                    continue;
            }
            return; /* nowhere to report a broken stderr */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Copies whole lines p[0, n) into the ring, or counts as dropped those that do not fit.
 * urgent lines (warnings and errors) cut the writer's batching pause short. */
static void log_enqueue(const char *p, size_t n, bool urgent)
{
    pthread_mutex_lock(&log_q.lock);
    if (!log_q.running) {
        pthread_mutex_unlock(&log_q.lock);
        log_write_all(log_q.fd, p, n); /* before log_open or after log_close */
        return;
    }
    size_t room = LOG_QUEUE_SIZE - (log_q.tail - log_q.head);
    if (room < n) {
        /* Keep the whole lines that fit; count the rest, one per newline. */
        size_t fit = 0;
        for (size_t i = 0; i < room; i++)
            if (p[i] == '\n')
                fit = i + 1;
        for (size_t i = fit; i < n; i++)
            if (p[i] == '\n')
                log_q.dropped++;
        n = fit;
    }
    if (n > 0) {
        size_t off = log_q.tail % LOG_QUEUE_SIZE;
        size_t first = LOG_QUEUE_SIZE - off < n ? LOG_QUEUE_SIZE - off : n;
        memcpy(log_q.ring + off, p, first);
        memcpy(log_q.ring, p + first, n - first);
        log_q.tail += n;
        /* Only an idle writer needs a wake-up: a busy proxy then pays one
         * futex call per batch, not one per line. */
        if (log_q.idle || urgent) {
            log_q.idle = false;
            log_q.urgent = log_q.urgent || urgent;
            pthread_cond_signal(&log_q.wake);
        }
    }
    pthread_mutex_unlock(&log_q.lock);
}

int log_thread_attach(void)
{
    if (log_stage != NULL)
        return 0;
    log_stage = malloc(sizeof(*log_stage));
    if (log_stage == NULL)
        return -ENOMEM;
    log_stage->len = 0;
    log_stage->urgent = false;
    return 0;
}

void log_flush(void)
{
    struct log_stage *st = log_stage;

    if (st == NULL || st->len == 0)
        return;
    log_enqueue(st->buf, st->len, st->urgent);
    st->len = 0;
    st->urgent = false;
}

void log_thread_detach(void)
{
    log_flush();
    free(log_stage);
    log_stage = NULL;
}

static void *log_writer_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&log_q.lock);
    for (;;) {
        while (log_q.head == log_q.tail && log_q.dropped == 0 && !log_q.stopping) {
            log_q.idle = true;
            pthread_cond_wait(&log_q.wake, &log_q.lock);
        }
        log_q.idle = false;
        if (log_q.head == log_q.tail && log_q.dropped == 0)
            break; /* stopping and drained */
        if (!log_q.stopping && !log_q.urgent) {
            /* Let the lines of this burst gather, then write them at once. */
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += LOG_BATCH_NS;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            while (!log_q.stopping && !log_q.urgent &&
                   pthread_cond_timedwait(&log_q.wake, &log_q.lock, &until) == 0)
                ;
        }
        log_q.urgent = false;

        size_t off = log_q.head % LOG_QUEUE_SIZE;
        size_t n = log_q.tail - log_q.head;
        size_t first = n < LOG_QUEUE_SIZE - off ? n : LOG_QUEUE_SIZE - off;
        uint64_t dropped = log_q.dropped;
        log_q.dropped = 0;
        pthread_mutex_unlock(&log_q.lock);

        /* The ring bytes [head, head+n) are ours until head moves past them. They are whole
         * lines; a line may wrap around the end of the ring, so both parts are written before
         * anything else, or the drop report would land inside that line. */
        log_write_all(log_q.fd, log_q.ring + off, first);
        log_write_all(log_q.fd, log_q.ring, n - first);
        if (dropped > 0) {
            struct log_line l;
            log_begin(&l, LOG_WARN, "log_dropped");
            log_uint(&l, "lines", dropped);
            l.buf[l.len++] = '\n';
            log_write_all(log_q.fd, l.buf, l.len);
        }

        pthread_mutex_lock(&log_q.lock);
        log_q.head += n;
    }
    pthread_mutex_unlock(&log_q.lock);
    return NULL;
}

int log_open(int fd, enum log_format fmt, enum log_level min)
{
    log_configure(fmt, min);
    pthread_mutex_lock(&log_q.lock);
    log_q.fd = fd;
    log_q.stopping = false;
    int rc = pthread_create(&log_q.thread, NULL, log_writer_main, NULL);
    log_q.running = rc == 0;
    pthread_mutex_unlock(&log_q.lock);
    return -rc;
}

void log_close(void)
{
    pthread_mutex_lock(&log_q.lock);
    if (!log_q.running) {
        pthread_mutex_unlock(&log_q.lock);
        return;
    }
    log_q.stopping = true;
    log_q.idle = false;
    pthread_cond_signal(&log_q.wake);
    pthread_mutex_unlock(&log_q.lock);
    pthread_join(log_q.thread, NULL);
    pthread_mutex_lock(&log_q.lock);
    log_q.running = false;
    pthread_mutex_unlock(&log_q.lock);
}

void log_configure(enum log_format fmt, enum log_level min)
{
    atomic_store(&log_cur_format, (int)fmt);
    atomic_store(&log_min_level, (int)min);
}

bool log_enabled(enum log_level lvl)
{
    return (int)lvl >= atomic_load_explicit(&log_min_level, memory_order_relaxed);
}

/* Room left for fields; the reserve holds log_end's trunc marker, brace and newline. */
#define LOG_RESERVE 16

static size_t log_room(const struct log_line *l)
{
    return sizeof(l->buf) - LOG_RESERVE - l->len;
}

static void log_raw(struct log_line *l, const char *s, size_t n)
{
    if (n > log_room(l)) {
        l->truncated = true;
        n = log_room(l);
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

/* Starts "key=" or ,"key": according to the format. Returns false, and marks
 * the line truncated, when the key and a short value would not fit: fields are
 * added whole or not at all, so a cut line still parses. */
static bool log_key(struct log_line *l, const char *key, size_t klen)
{
    if (log_room(l) < klen + 32) {
        l->truncated = true;
        return false;
    }
    char *p = l->buf + l->len;
    if (l->json) {
        p[0] = ',';
        p[1] = '"';
        memcpy(p + 2, key, klen);
        p[2 + klen] = '"';
        p[3 + klen] = ':';
        l->len += klen + 4;
    } else {
        p[0] = ' ';
        memcpy(p + 1, key, klen);
        p[1 + klen] = '=';
        l->len += klen + 2;
    }
    return true;
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when invalid; *cpo gets its code
 * point. */
static size_t log_utf8_len(const unsigned char *p, size_t n, uint32_t *cpo)
{
    unsigned char c = p[0];
    size_t need;
    uint32_t cp;

    if (c < 0x80) {
        *cpo = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        need = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < need)
        return 0;
    for (size_t i = 1; i < need; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((need == 3 && cp < 0x800) || (need == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0; /* overlong, out of range or a surrogate */
    *cpo = cp;
    return need;
}

/* What each byte needs in a value: 0 goes over as it is, even unquoted; 1 (space, '=')
 * makes logfmt quote the value; 2 is escaped (quotes, backslash, controls, DEL); 3 starts
 * or continues UTF-8, checked sequence by sequence. */
/* clang-format off */
static const unsigned char log_byte_class[256] = {
    2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2, /* 0x00 */
    2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2, /* 0x10 */
    1,0,2,0,0,0,0,0,0,0,0,0,0,0,0,0, /* 0x20 ' ' '"' */
    0,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0, /* 0x30 '=' */
    0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, /* 0x40 */
    0,0,0,0,0,0,0,0,0,0,0,0,2,0,0,0, /* 0x50 '\\' */
    0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, /* 0x60 */
    0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2, /* 0x70 DEL */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0x80 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0x90 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xa0 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xb0 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xc0 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xd0 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xe0 */
    3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, /* 0xf0 */
};
/* clang-format on */

static bool log_needs_quotes(const char *v, size_t n)
{
    if (n == 0)
        return true;
    for (size_t i = 0; i < n; i++)
        if (log_byte_class[(unsigned char)v[i]] != 0)
            return true;
    return false;
}

size_t log_escape(char *out, size_t cap, const char *value, size_t len, bool json)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *v = (const unsigned char *)value;
    bool quote = json || log_needs_quotes(value, len);
    size_t o = 0;

    if (cap == 0)
        return 0;
    cap--; /* keep room for the NUL */
    if (!quote) {
        /* Nothing to quote means nothing to escape: the bytes go over as they are, cut
         * where the loop below would stop. */
        size_t k = cap > 7 ? cap - 7 : 0;
        if (k > len)
            k = len;
        memcpy(out, value, k);
        out[k] = '\0';
        return k;
    }
#define LOG_PUT(ch)                                                                                \
    do {                                                                                           \
        if (o < cap)                                                                               \
            out[o++] = (char)(ch);                                                                 \
    } while (0)
    LOG_PUT('"'); /* quoted from here on */
    for (size_t i = 0; i < len && o + 7 < cap; i++) {
        unsigned char c = v[i];
        if (c == '"' || c == '\\') {
            LOG_PUT('\\');
            LOG_PUT(c);
        } else if (c == '\n') {
            LOG_PUT('\\');
            LOG_PUT('n');
        } else if (c == '\r') {
            LOG_PUT('\\');
            LOG_PUT('r');
        } else if (c == '\t') {
            LOG_PUT('\\');
            LOG_PUT('t');
        } else if (c < 0x20 || c == 0x7f) {
            if (json) {
                LOG_PUT('\\');
                LOG_PUT('u');
                LOG_PUT('0');
                LOG_PUT('0');
            } else {
                LOG_PUT('\\');
                LOG_PUT('x');
            }
            LOG_PUT(hex[c >> 4]);
            LOG_PUT(hex[c & 15]);
        } else if (c < 0x80) {
            /* A run of printable ASCII goes over in one copy, cut where the loop would stop. */
            size_t k = 1, lim = cap - 7 - o;
            while (k < lim && i + k < len && log_byte_class[v[i + k]] <= 1)
                k++;
            memcpy(out + o, v + i, k);
            o += k;
            i += k - 1;
        } else {
            uint32_t cp = 0;
            size_t n = log_utf8_len(v + i, len - i, &cp);
            if (n != 0 && ((cp >= 0x80 && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029)) {
                /* C1 controls (NEL among them) and the Unicode line and paragraph separators
                 * are line breaks to some readers (Python's str.splitlines()): \u escapes keep
                 * the line one line in both formats. */
                LOG_PUT('\\');
                LOG_PUT('u');
                LOG_PUT(hex[cp >> 12]);
                LOG_PUT(hex[(cp >> 8) & 15]);
                LOG_PUT(hex[(cp >> 4) & 15]);
                LOG_PUT(hex[cp & 15]);
                i += n - 1;
            } else if (n == 0) {
                /* Invalid UTF-8 is shown as the text \xHH, valid in both formats. */
                if (json)
                    LOG_PUT('\\');
                LOG_PUT('\\');
                LOG_PUT('x');
                LOG_PUT(hex[c >> 4]);
                LOG_PUT(hex[c & 15]);
            } else {
                for (size_t k = 0; k < n; k++)
                    LOG_PUT(v[i + k]);
                i += n - 1;
            }
        }
    }
    LOG_PUT('"');
#undef LOG_PUT
    out[o] = '\0';
    return o;
}

/* Writes value as exactly width decimal digits, zero-padded (value < 10^width). */
static void log_fmt_fixed(char *out, unsigned long value, size_t width)
{
    while (width > 0) {
        out[--width] = (char)('0' + value % 10);
        value /= 10;
    }
}

/* "YYYY-MM-DDTHH:MM:SS." for sec, cached per thread: gmtime_r once a second. */
static const char *log_ts_prefix(time_t sec)
{
    if (log_ts_sec != sec || sec == 0) {
        struct tm tm;
        char *t = log_ts_text;
        gmtime_r(&sec, &tm);
        log_fmt_fixed(t, (unsigned long)(tm.tm_year + 1900) % 10000, 4);
        t[4] = '-';
        log_fmt_fixed(t + 5, (unsigned long)tm.tm_mon + 1, 2);
        t[7] = '-';
        log_fmt_fixed(t + 8, (unsigned long)tm.tm_mday, 2);
        t[10] = 'T';
        log_fmt_fixed(t + 11, (unsigned long)tm.tm_hour, 2);
        t[13] = ':';
        log_fmt_fixed(t + 14, (unsigned long)tm.tm_min, 2);
        t[16] = ':';
        log_fmt_fixed(t + 17, (unsigned long)tm.tm_sec, 2);
        t[19] = '.';
        log_ts_sec = sec;
    }
    return log_ts_text;
}

void log_begin(struct log_line *l, enum log_level lvl, const char *ev)
{
    static const char lvl_logfmt[] = "Z lvl=", lvl_json[] = "Z\",\"lvl\":\"";
    struct timespec ts;
    char *p;

    l->truncated = false;
    l->level = lvl;
    l->json = atomic_load_explicit(&log_cur_format, memory_order_relaxed) == LOG_FORMAT_JSON;
    clock_real(&ts);
    /* The head always fits: the buffer is empty. */
    p = l->buf;
    if (l->json) {
        memcpy(p, "{\"ts\":\"", 7);
        p += 7;
    } else {
        memcpy(p, "ts=", 3);
        p += 3;
    }
    memcpy(p, log_ts_prefix(ts.tv_sec), 20);
    p += 20;
    log_fmt_fixed(p, (unsigned long)ts.tv_nsec / 1000, 6);
    p += 6;
    if (l->json) {
        memcpy(p, lvl_json, sizeof(lvl_json) - 1);
        p += sizeof(lvl_json) - 1;
    } else {
        memcpy(p, lvl_logfmt, sizeof(lvl_logfmt) - 1);
        p += sizeof(lvl_logfmt) - 1;
    }
    size_t n = strlen(log_level_names[lvl]);
    memcpy(p, log_level_names[lvl], n);
    p += n;
    if (l->json)
        *p++ = '"';
    l->len = (size_t)(p - l->buf);
    log_str(l, "ev", ev);
}

void log_fields_begin(struct log_line *l)
{
    l->len = 0;
    l->json = true;
    l->truncated = false;
    l->level = LOG_INFO;
}

void log_sid(struct log_line *l, uint64_t sid)
{
    static const char hex[] = "0123456789abcdef";
    char v[18];
    size_t n = 0;

    if (l->json)
        v[n++] = '"';
    for (int shift = 60; shift >= 0; shift -= 4)
        v[n++] = hex[(sid >> shift) & 15];
    if (l->json)
        v[n++] = '"';
    if (log_key(l, "sid", 3))
        log_raw(l, v, n);
}

void log_strn_k(struct log_line *l, const char *key, size_t klen, const char *value, size_t len)
{
    size_t n;

    if (!log_key(l, key, klen))
        return;
    /* log_escape always closes its quotes, so a value cut to fit stays well formed. */
    n = log_escape(l->buf + l->len, log_room(l) + 1, value, len, l->json);
    if (log_room(l) - n < 8)
        l->truncated = true;
    l->len += n;
}

void log_uint_k(struct log_line *l, const char *key, size_t klen, uint64_t value)
{
    char v[FMT_U64_MAX];
    size_t n = fmt_u64(v, value);
    if (log_key(l, key, klen))
        log_raw(l, v, n);
}

void log_ms_k(struct log_line *l, const char *key, size_t klen, uint64_t ns)
{
    char v[24];
    uint64_t us = ns / 1000;
    size_t n = fmt_u64(v, us / 1000);
    v[n++] = '.';
    log_fmt_fixed(v + n, (unsigned long)(us % 1000), 3);
    n += 3;
    if (log_key(l, key, klen))
        log_raw(l, v, n);
}

void log_end(struct log_line *l)
{
    if (l->truncated) {
        /* The reserve always has room for this marker. */
        static const char mark_logfmt[] = " trunc=1", mark_json[] = ",\"trunc\":1";
        const char *m = l->json ? mark_json : mark_logfmt;
        size_t n = l->json ? sizeof(mark_json) - 1 : sizeof(mark_logfmt) - 1;
        memcpy(l->buf + l->len, m, n);
        l->len += n;
    }
    if (l->json)
        l->buf[l->len++] = '}';
    l->buf[l->len++] = '\n';
    struct log_stage *st = log_stage;
    if (st == NULL) {
        log_enqueue(l->buf, l->len, l->level >= LOG_WARN);
        return;
    }
    if (LOG_STAGE_SIZE - st->len < l->len)
        log_flush();
    memcpy(st->buf + st->len, l->buf, l->len);
    st->len += l->len;
    st->urgent = st->urgent || l->level >= LOG_WARN;
}

void log_msg(enum log_level lvl, const char *ev, const char *fmt, ...)
{
    struct log_line l;
    char msg[1024];
    va_list ap;

    if (!log_enabled(lvl))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    log_begin(&l, lvl, ev);
    log_str(&l, "msg", msg);
    log_end(&l);
}
