/* test_log.c: escaping and line building of log.c. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "test.h"

static void expect_escape(const char *in, size_t len, int json, const char *want)
{
    char out[256];
    size_t n = log_escape(out, sizeof(out), in, len, json != 0);
    ASSERT_EQ(n, strlen(want));
    ASSERT_STREQ(out, want);
}

static void test_escape_logfmt(void)
{
    expect_escape("plain", 5, 0, "plain");
    expect_escape("127.0.0.1:25", 12, 0, "127.0.0.1:25");
    expect_escape("", 0, 0, "\"\"");
    expect_escape("two words", 9, 0, "\"two words\"");
    expect_escape("a=b", 3, 0, "\"a=b\"");
    expect_escape("say \"hi\"", 8, 0, "\"say \\\"hi\\\"\"");
    expect_escape("back\\slash", 10, 0, "\"back\\\\slash\"");
    expect_escape("cr\r\nlf", 6, 0, "\"cr\\r\\nlf\"");
    expect_escape("nul\0x", 5, 0, "\"nul\\x00x\"");
    expect_escape("caf\xc3\xa9", 5, 0, "\"caf\xc3\xa9\"");      /* valid UTF-8 kept */
    expect_escape("bad\xff", 4, 0, "\"bad\\xff\"");             /* invalid byte escaped */
    expect_escape("\xc0\xaf", 2, 0, "\"\\xc0\\xaf\"");          /* overlong '/' */
    expect_escape("\xed\xa0\x80", 3, 0, "\"\\xed\\xa0\\x80\""); /* surrogate */
    expect_escape("\xe2\x82", 2, 0, "\"\\xe2\\x82\"");          /* truncated sequence */
}

/* Every byte value between two letters, against the rules spelled out one by one: which
 * bytes make logfmt quote a value, and what each becomes inside quotes. */
static void test_escape_every_byte(void)
{
    for (unsigned c = 0; c < 256; c++) {
        for (int json = 0; json <= 1; json++) {
            char in[3] = {'a', (char)c, 'b'}, want[32], mid[16];
            bool quote = json || c <= ' ' || c == '"' || c == '=' || c == '\\' || c >= 0x7f;

            if (c == '"' || c == '\\')
                snprintf(mid, sizeof(mid), "\\%c", (char)c);
            else if (c == '\n' || c == '\r' || c == '\t')
                snprintf(mid, sizeof(mid), "\\%c", c == '\n' ? 'n' : c == '\r' ? 'r' : 't');
            else if (c < 0x20 || c == 0x7f)
                snprintf(mid, sizeof(mid), json ? "\\u00%02x" : "\\x%02x", c);
            else if (c >= 0x80) /* alone, never valid UTF-8 */
                snprintf(mid, sizeof(mid), json ? "\\\\x%02x" : "\\x%02x", c);
            else
                snprintf(mid, sizeof(mid), "%c", (char)c);
            snprintf(want, sizeof(want), quote ? "\"a%sb\"" : "a%sb", mid);
            expect_escape(in, 3, json, want);
        }
    }
}

static void test_escape_json(void)
{
    expect_escape("plain", 5, 1, "\"plain\"");
    expect_escape("q\"b\\", 4, 1, "\"q\\\"b\\\\\"");
    expect_escape("\x01\x7f", 2, 1, "\"\\u0001\\u007f\"");
    expect_escape("bad\xff", 4, 1, "\"bad\\\\xff\"");
    expect_escape("\xf0\x9f\x93\xa7", 4, 1, "\"\xf0\x9f\x93\xa7\"");
}

/* Line breaks to Unicode-aware readers (Python's str.splitlines() splits on NEL, the other C1
 * controls FS/GS/RS are below 0x20 already, and on U+2028/U+2029) are \u escapes in both
 * formats; the printable neighbours stay raw. */
static void test_escape_unicode_breaks(void)
{
    expect_escape("a\xc2\x85"
                  "b",
                  4, 0, "\"a\\u0085b\"");
    expect_escape("a\xc2\x85"
                  "b",
                  4, 1, "\"a\\u0085b\"");
    expect_escape("\xc2\x80\xc2\x9f", 4, 0, "\"\\u0080\\u009f\"");
    expect_escape("\xc2\x80\xc2\x9f", 4, 1, "\"\\u0080\\u009f\"");
    expect_escape("\xe2\x80\xa8\xe2\x80\xa9", 6, 0, "\"\\u2028\\u2029\"");
    expect_escape("\xe2\x80\xa8\xe2\x80\xa9", 6, 1, "\"\\u2028\\u2029\"");
    expect_escape("\xc2\xa0\xe2\x80\xa7\xe2\x80\xaa", 8, 0,
                  "\"\xc2\xa0\xe2\x80\xa7\xe2\x80\xaa\""); /* U+00A0, U+2027, U+202A */
    /* Every C1 control, in both formats. */
    for (unsigned cp = 0x80; cp <= 0x9f; cp++) {
        char in[2] = {(char)0xc2, (char)cp}, want[16];
        snprintf(want, sizeof(want), "\"\\u%04x\"", cp);
        expect_escape(in, 2, 0, want);
        expect_escape(in, 2, 1, want);
    }
}

static void test_escape_bounded(void)
{
    char big[1000], out[32];
    memset(big, '"', sizeof(big));
    size_t n = log_escape(out, sizeof(out), big, sizeof(big), false);
    ASSERT(n < sizeof(out));
    ASSERT_EQ(out[0], '"');
    ASSERT_EQ(out[n - 1], '"'); /* quotes are closed even when the value is cut */
    ASSERT_EQ(out[n], '\0');
}

/* Reads what the writer thread wrote to a pipe. */
static size_t read_pipe(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    ssize_t r;
    while (n < cap && (r = read(fd, buf + n, cap - n)) > 0)
        n += (size_t)r;
    return n;
}

static void test_lines(void)
{
    int fds[2];
    char out[LOG_LINE_MAX * 2 + 256];
    struct log_line l;

    ASSERT_OK(pipe(fds));
    ASSERT_OK(log_open(fds[1], LOG_FORMAT_LOGFMT, LOG_INFO));
    ASSERT(!log_enabled(LOG_DEBUG));
    ASSERT(log_enabled(LOG_WARN));
    log_begin(&l, LOG_INFO, "close");
    log_sid(&l, 0x2aULL);
    log_str(&l, "end", "client_eof");
    log_uint(&l, "bytes_up", 1234);
    log_ms(&l, "ms", 1234567);
    log_str(&l, "error", "connection refused");
    log_end(&l);

    log_configure(LOG_FORMAT_JSON, LOG_DEBUG);
    log_begin(&l, LOG_DEBUG, "open");
    log_sid(&l, 1);
    log_str(&l, "client", "[::1]:25");
    log_uint(&l, "n", 7);
    log_end(&l);

    /* A line whose value cannot fit is cut at a field and says so. */
    static char huge[LOG_LINE_MAX * 2];
    memset(huge, 'x', sizeof(huge));
    log_configure(LOG_FORMAT_JSON, LOG_INFO);
    log_begin(&l, LOG_INFO, "big");
    log_strn(&l, "v", huge, sizeof(huge));
    log_uint(&l, "after", 1);
    log_end(&l);
    log_close();
    close(fds[1]);

    size_t n = read_pipe(fds[0], out, sizeof(out) - 1);
    out[n] = '\0';
    close(fds[0]);

    char *line1 = out, *line2 = strchr(line1, '\n') + 1, *line3 = strchr(line2, '\n') + 1;
    /* ts=YYYY-MM-DDTHH:MM:SS.uuuuuuZ: Z is the 30th byte. */
    ASSERT(strncmp(line1, "ts=", 3) == 0);
    ASSERT_EQ(line1[29], 'Z');
    ASSERT_MEMEQ(line1 + 30, line2 - line1 - 30,
                 " lvl=info ev=close sid=000000000000002a end=client_eof bytes_up=1234 "
                 "ms=1.234 error=\"connection refused\"\n",
                 strlen(" lvl=info ev=close sid=000000000000002a end=client_eof bytes_up=1234 "
                        "ms=1.234 error=\"connection refused\"\n"));
    ASSERT(strncmp(line2, "{\"ts\":\"", 7) == 0);
    const char *rest2 = strchr(line2, 'Z') + 2;
    const char *want2 = ",\"lvl\":\"debug\",\"ev\":\"open\",\"sid\":\"0000000000000001\","
                        "\"client\":\"[::1]:25\",\"n\":7}\n";
    ASSERT_MEMEQ(rest2, line3 - rest2, want2, strlen(want2));
    size_t len3 = strlen(line3);
    ASSERT(len3 <= LOG_LINE_MAX);
    ASSERT(strstr(line3, "\"trunc\":1}\n") != NULL);
    ASSERT_EQ(line3[len3 - 1], '\n');
}

struct drain {
    int fd;
    atomic_bool go; /* the reader starts only once the queue has overflowed */
    char *buf;
    size_t len, cap;
};

static void *drain_main(void *arg)
{
    struct drain *d = arg;
    ssize_t r;

    while (!atomic_load(&d->go))
        usleep(1000);
    while (d->len < d->cap && (r = read(d->fd, d->buf + d->len, d->cap - d->len)) > 0)
        d->len += (size_t)r;
    return NULL;
}

/* The writer's queue overflows while stderr is blocked: lines are dropped, and what is written
 * is whole lines only, with the drop report on a line of its own. Lines of 1000 bytes do not
 * divide the queue, so a queued line always straddles its end. */
static void test_dropped_lines_stay_whole(void)
{
    enum { LINES = 3000, VALUE = 900 };
    static char value[VALUE];
    int fds[2];
    pthread_t reader;
    struct drain d = {.cap = 8u << 20};
    struct log_line l;
    size_t written = 0, reported = 0, reports = 0;

    ASSERT_OK(pipe(fds));
    fcntl(fds[1], F_SETPIPE_SZ, 4096); /* the smallest pipe: the writer blocks at once */
    d.fd = fds[0];
    d.buf = malloc(d.cap);
    ASSERT(d.buf != NULL);
    ASSERT_OK(pthread_create(&reader, NULL, drain_main, &d));
    memset(value, 'v', sizeof(value));
    ASSERT_OK(log_open(fds[1], LOG_FORMAT_LOGFMT, LOG_INFO));
    /* Three lines the pipe still takes: the writer's place in its queue is then past the
     * start, so once the queue is full its lines wrap around the queue's end. */
    for (unsigned i = 0; i < LINES; i++) {
        if (i == 3)
            usleep(100 * 1000);
        log_begin(&l, LOG_INFO, "fill");
        log_uint(&l, "n", 100000 + i);
        log_strn(&l, "v", value, sizeof(value));
        log_end(&l);
    }
    atomic_store(&d.go, true);
    log_close();
    close(fds[1]);
    ASSERT_OK(pthread_join(reader, NULL));
    close(fds[0]);

    for (size_t pos = 0; pos < d.len;) {
        char *lf = memchr(d.buf + pos, '\n', d.len - pos);
        ASSERT(lf != NULL);
        size_t n = (size_t)(lf - (d.buf + pos)) + 1;
        const char *line = d.buf + pos, *rest = line + 30;
        ASSERT(n > 30);
        ASSERT(strncmp(line, "ts=", 3) == 0);
        ASSERT_EQ(line[29], 'Z');
        if (strncmp(rest, " lvl=warn ev=log_dropped lines=", 31) == 0) {
            char *end;
            unsigned long v = strtoul(rest + 31, &end, 10);
            ASSERT(end == lf);
            reported += v;
            reports++;
        } else {
            static const char head[] = " lvl=info ev=fill n=";
            ASSERT_MEMEQ(rest, strlen(head), head, strlen(head));
            ASSERT_EQ(n, 30 + strlen(head) + 6 + 3 + VALUE + 1);
            written++;
        }
        pos += n;
    }
    ASSERT(reports >= 1);
    ASSERT(reported > 0);
    ASSERT_EQ(written + reported, LINES);
    free(d.buf);
}

/* A thread with its own buffer (a worker): its lines reach the writer only at log_flush,
 * all of them, in order, byte for byte as any other thread's; the timestamp is the
 * current UTC second, formatted once a second. */
static void *attached_main(void *arg)
{
    int rfd = *(int *)arg;
    struct log_line l;
    char probe[64];

    ASSERT_OK(log_thread_attach());
    for (unsigned i = 0; i < 3; i++) {
        log_begin(&l, i == 2 ? LOG_WARN : LOG_INFO, "staged");
        log_sid(&l, 0xfedcba9876543210ULL);
        log_uint(&l, "n", i == 0 ? 0 : UINT64_MAX);
        log_ms(&l, "ms", i * 1000999ULL);
        log_end(&l);
    }
    usleep(30 * 1000); /* longer than the writer's batching pause */
    ASSERT(read(rfd, probe, sizeof(probe)) < 0 && errno == EAGAIN); /* nothing yet */
    log_flush();
    log_thread_detach();
    return NULL;
}

static void test_thread_buffer(void)
{
    int fds[2];
    char out[4096];
    pthread_t th;

    ASSERT_OK(pipe(fds));
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    ASSERT_OK(log_open(fds[1], LOG_FORMAT_LOGFMT, LOG_INFO));
    time_t before = time(NULL);
    ASSERT_OK(pthread_create(&th, NULL, attached_main, &fds[0]));
    ASSERT_OK(pthread_join(th, NULL));
    time_t after = time(NULL);
    log_close();
    close(fds[1]);
    fcntl(fds[0], F_SETFL, 0);
    size_t n = read_pipe(fds[0], out, sizeof(out) - 1);
    out[n] = '\0';
    close(fds[0]);

    static const char *const want[] = {
        " lvl=info ev=staged sid=fedcba9876543210 n=0 ms=0.000\n",
        " lvl=info ev=staged sid=fedcba9876543210 n=18446744073709551615 ms=1.000\n",
        " lvl=warn ev=staged sid=fedcba9876543210 n=18446744073709551615 ms=2.001\n",
    };
    char *line = out;
    for (unsigned i = 0; i < 3; i++) {
        char *end = strchr(line, '\n');
        ASSERT(end != NULL);
        ASSERT(strncmp(line, "ts=", 3) == 0);
        ASSERT_EQ(line[29], 'Z');
        ASSERT_MEMEQ(line + 30, (size_t)(end + 1 - line - 30), want[i], strlen(want[i]));
        /* The seconds part is the clock's, as strftime would write it. */
        char t1[32], t2[32];
        struct tm tm;
        strftime(t1, sizeof(t1), "%Y-%m-%dT%H:%M:%S.", gmtime_r(&before, &tm));
        strftime(t2, sizeof(t2), "%Y-%m-%dT%H:%M:%S.", gmtime_r(&after, &tm));
        ASSERT(strncmp(line + 3, t1, 20) == 0 || strncmp(line + 3, t2, 20) == 0);
        line = end + 1;
    }
    ASSERT_EQ(*line, '\0');
}

/* log_fields_begin: bare JSON fields, spliced into the admin endpoint's sessions. */
static void test_fields_fragment(void)
{
    struct log_line l;

    log_fields_begin(&l);
    log_str(&l, "helo", "a \"b\"");
    log_uint(&l, "rcpt_ok", 2);
    ASSERT_MEMEQ(l.buf, l.len, ",\"helo\":\"a \\\"b\\\"\",\"rcpt_ok\":2", 29);
    ASSERT(!l.truncated);
}

int main(void)
{
    test_fields_fragment();
    test_escape_logfmt();
    test_escape_json();
    test_escape_every_byte();
    test_escape_unicode_breaks();
    test_escape_bounded();
    test_lines();
    test_dropped_lines_stay_whole();
    test_thread_buffer();
    printf("test_log: ok\n");
    return 0;
}
