/* fuzz_session_smtp.c: libFuzzer harness for a whole mode smtp session.
 *
 * The real session code (session.c, session_smtp.c, relay.c, the parsers,
 * log.c) runs on a libuv loop driven by this harness on its own thread; the
 * transport is loopback TCP the harness holds both ends of: it is the client
 * and it is the backend. Input bytes are a script of steps, interleaving
 * what the client sends, what the backend sends, who reads, who closes, a
 * reset, a drain. After every step the harness turns the loop until it is
 * quiet and checks:
 *   - no reply of mxproxy's own is glued to a backend line: every "mxproxy"
 *     the client receives sits in a reply line that starts after a CRLF
 *     (the backend's bytes never contain that word);
 *   - memory held stays under a bound however much a peer floods or refuses
 *     to read (ASan's count of allocated bytes, against the level before the
 *     session);
 *   - no client command is answered twice: the client never receives more
 *     final reply lines than the backend sent plus one per line the client
 *     sent, plus one closing 421;
 * and at the end of the input, with every log line flushed:
 *   - no AUTH credential the client sent (in any spelling a server's
 *     tokenizer accepts) appears in any log line, at transcript = full and
 *     log level debug.
 *
 * The first input byte picks one of several listeners (client STARTTLS,
 * require_tls, XCLIENT, backend STARTTLS, smuggling mode), set up once per
 * process.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sanitizer/allocator_interface.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "fuzz.h"
#include "listener.h"
#include "log.h"
#include "session.h"
#include "tls_testcerts.h"
#include "worker.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_VARIANTS 24                  /* listeners: 2 client_tls x 2 xclient x 2 backend x 3 */
#define FUZZ_MEM_BOUND (3u * 1024 * 1024) /* bytes a session may hold above its start */
#define FUZZ_CAPTURE_MAX (1u << 20)       /* what the client keeps of what it received */
#define FUZZ_SNDBUF 4096                  /* small socket buffers: backpressure shows early */
#define FUZZ_LINE_MAX 512                 /* max_line_length of every listener */

/* The credentials: base64 of "\0fuzzuser\0fuzzsecret", and its parts. */
static const char fuzz_b64[] = "AGZ1enp1c2VyAGZ1enpzZWNyZXQ=";
static const char *const fuzz_secrets[] = {fuzz_b64, "fuzzsecret", "ZnV6enNlY3JldA"};

/* AUTH commands as the client sends them: every spelling Postfix's and
 * aiosmtpd's tokenizers take as AUTH with an initial response. */
static const char *const fuzz_auth[] = {
    "AUTH PLAIN AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
    "auth plain AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
    "AUTH\tPLAIN AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
    " AUTH PLAIN AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
    "AUTH PLAIN\tAGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
    "\tAuTh  \t PLAIN    AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n",
};

static const char *const fuzz_commands[] = {
    "EHLO client.example\r\n",
    "HELO client.example\r\n",
    "MAIL FROM:<a@example.org>\r\n",
    "RCPT TO:<b@example.net>\r\n",
    "DATA\r\n",
    "Subject: x\r\n\r\nbody\r\n.\r\n",
    "QUIT\r\n",
    "RSET\r\n",
    "NOOP\r\n",
    "STARTTLS\r\n",
    "XCLIENT ADDR=10.9.9.9 NAME=spoof.example\r\n",
    "XFORWARD ADDR=10.9.9.9\r\n",
    "BDAT 5 LAST\r\nhello",
    "BDAT 3\r\nabc",
    "AUTH LOGIN\r\n",
    "EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    "a\n.\nb\r\n.\r\n",
    "x\r\n.\n",
    "\r\n.\r\n",
    ".\r\n",
    "*\r\n",
};

static const char *const fuzz_replies[] = {
    "220 backend.example ESMTP\r\n",
    ("250-backend.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-XCLIENT ADDR NAME PORT "
     "PROTO HELO DESTADDR DESTPORT\r\n250-XFORWARD ADDR\r\n250 8BITMIME\r\n"),
    "250 2.1.0 Ok\r\n",
    "250 2.1.0 Ok",
    "354 End data with <CR><LF>.<CR><LF>\r\n",
    "550 5.1.1 <b@example.net>: Recipient address rejected\r\n",
    "221 2.0.0 Bye\r\n",
    "334 VXNlcm5hbWU6\r\n",
    "235 2.7.0 Authentication successful\r\n",
    "220 2.0.0 Ready to start TLS\r\n",
    "421 4.3.0 backend going away\r\n",
    "250-first line\r\n250-sec",
    "250 backend.example\r\n",
    "503 5.5.1 Error: send HELO/EHLO first\r\n",
};

struct fuzz_peer {
    int fd;        /* the harness's end, non-blocking; -1 when closed */
    bool reads;    /* the harness reads what arrives (else it lets it pile up) */
    bool shut;     /* the harness sent its FIN */
    uint64_t sent; /* bytes the harness sent */
    char last;     /* the last byte the harness sent */
};

static struct worker fuzz_w;
static struct config *fuzz_cfg;
static int fuzz_backend_lfd = -1;
static int fuzz_ports[FUZZ_VARIANTS];
static int fuzz_log_fd = -1;

static struct fuzz_peer fuzz_client, fuzz_backend;
static char *fuzz_seen; /* what the client received */
static size_t fuzz_seen_len;
static uint64_t fuzz_backend_finals; /* final reply lines the backend sent */
static uint64_t fuzz_client_lines;   /* line ends the client sent */
static size_t fuzz_mem_base;

static int fuzz_listen_backend(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(fuzz_loopback())};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);

    FUZZ_CHECK(fd >= 0);
    FUZZ_CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    FUZZ_CHECK(listen(fd, 64) == 0);
    FUZZ_CHECK(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    fuzz_backend_lfd = fd;
    return ntohs(a.sin_port);
}

/* One [listener] per variant: client_tls, xclient, backend_tls, smuggling;
 * require_tls on half of the client_tls = starttls ones. */
static void fuzz_make_config(const char *dir, int backend_port)
{
    static const char *const smuggling[] = {"reject", "normalize", "off"};
    size_t cap = 64 * 1024, len = 0;
    char *text = malloc(cap);
    char err[CONFIG_ERR_MAX];

    FUZZ_CHECK(text != NULL);
    len +=
        (size_t)snprintf(text + len, cap - len, "[global]\nlog_level = debug\ndrain_timeout = 0\n");
    fuzz_free_ports(fuzz_ports, FUZZ_VARIANTS);
    for (int v = 0; v < FUZZ_VARIANTS; v++) {
        len += (size_t)snprintf(text + len, cap - len,
                                "[listener v%d]\nlisten = %s:%d\nbackend = %s:%d\nmode = smtp\n"
                                "transcript = full\nmax_line_length = %d\nsmuggling = %s\n"
                                "xclient = %s\n%s%s",
                                v, fuzz_loopback_text(), fuzz_ports[v], fuzz_loopback_text(),
                                backend_port, FUZZ_LINE_MAX, smuggling[v % 3],
                                (v / 3) % 2 ? "on" : "off",
                                (v / 6) % 2 ? "backend_tls = starttls\nbackend_verify = off\n" : "",
                                (v / 12) % 2 ? "client_tls = starttls\n" : "");
        if ((v / 12) % 2)
            len += (size_t)snprintf(text + len, cap - len, "cert = %s/mx.crt\nkey = %s/mx.key\n%s",
                                    dir, dir, v % 2 ? "require_tls = on\n" : "");
        FUZZ_CHECK(len < cap);
    }
    if (config_load_string(text, "fuzz.ini", &fuzz_cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz config: %s\n", err);
        abort();
    }
    free(text);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char dir[64];
    struct tls_testca ca;
    const char *names[] = {"mx.example.test"};

    signal(SIGPIPE, SIG_IGN);
    FUZZ_CHECK(tls_testcerts_mkdtemp(dir, sizeof(dir)) == 0);
    FUZZ_CHECK(tls_testcerts_ca(&ca, "mxproxy fuzz CA", false, dir) == 0);
    FUZZ_CHECK(tls_testcerts_leaf(&ca, "mx.example.test", names, 1, false, dir, "mx") == 0);
    tls_testcerts_ca_free(&ca);
    fuzz_make_config(dir, fuzz_listen_backend());
    tls_testcerts_rmdir(dir); /* the config holds the certificates in memory now */

    FUZZ_CHECK(uv_loop_init(&fuzz_w.loop) == 0);
    fuzz_w.cfg = config_ref(fuzz_cfg);
    for (size_t i = 0; i < fuzz_cfg->n_listeners; i++) {
        struct listener *l = NULL;
        FUZZ_CHECK(listener_open(&fuzz_w, &fuzz_cfg->listeners[i], &l) == 0);
        l->next = fuzz_w.listeners;
        fuzz_w.listeners = l;
    }
    fuzz_log_fd = memfd_create("fuzz-log", 0);
    FUZZ_CHECK(fuzz_log_fd >= 0);
    fuzz_seen = malloc(FUZZ_CAPTURE_MAX);
    FUZZ_CHECK(fuzz_seen != NULL);
    return 0;
}

/* Called by session.c when a session is freed. */
void worker_session_gone(struct worker *w)
{
    (void)w;
}

static void fuzz_turn(void)
{
    for (int i = 0; i < 4; i++)
        uv_run(&fuzz_w.loop, UV_RUN_NOWAIT);
}

static void fuzz_small_buffers(int fd)
{
    int v = FUZZ_SNDBUF;
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v));
}

static void fuzz_peer_reset(struct fuzz_peer *p)
{
    if (p->fd < 0)
        return;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    (void)setsockopt(p->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(p->fd);
    p->fd = -1;
}

/* Counts the final reply lines ("NNN " at a line start) in what the
 * backend sends. */
static void fuzz_count_finals(const char *p, size_t n)
{
    static bool line_start = true;
    static int digits;

    if (p == NULL) { /* a new session */
        line_start = true;
        digits = 0;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\n') {
            line_start = true;
            digits = 0;
            continue;
        }
        if (line_start && digits < 3 && c >= '0' && c <= '9') {
            digits++;
            continue;
        }
        if (line_start && digits == 3 && c == ' ')
            fuzz_backend_finals++;
        line_start = false;
    }
}

static void fuzz_read(struct fuzz_peer *p, bool keep)
{
    char buf[16384];

    while (p->fd >= 0) {
        ssize_t n = recv(p->fd, buf, sizeof(buf), 0);
        if (n <= 0)
            return;
        if (keep) {
            size_t room = FUZZ_CAPTURE_MAX - fuzz_seen_len;
            size_t k = (size_t)n < room ? (size_t)n : room;
            memcpy(fuzz_seen + fuzz_seen_len, buf, k);
            fuzz_seen_len += k;
        }
    }
}

static bool fuzz_backend_bare_lf; /* the backend ended a line with a bare LF */

/* Sends what the socket takes, turning the loop so mxproxy reads; gives up
 * when mxproxy stops reading (as it must when the other side is full). */
static void fuzz_send(struct fuzz_peer *p, const char *data, size_t len)
{
    int stuck = 0;

    if (p->fd < 0 || p->shut)
        return;
    if (p == &fuzz_backend) {
        fuzz_count_finals(data, len);
        if (fuzz_has_bare_lf(data, len, p->last))
            fuzz_backend_bare_lf = true;
    } else
        for (size_t i = 0; i < len; i++)
            fuzz_client_lines += data[i] == '\n' || data[i] == '\r';
    while (len > 0 && stuck < 3) {
        ssize_t n = send(p->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return;
            stuck++;
            fuzz_turn();
            if (fuzz_client.reads)
                fuzz_read(&fuzz_client, true);
            if (fuzz_backend.reads)
                fuzz_read(&fuzz_backend, false);
            continue;
        }
        stuck = 0;
        p->sent += (uint64_t)n;
        p->last = data[n - 1];
        data += n;
        len -= (size_t)n;
    }
}

/* Raw bytes never spell mxproxy's name on the backend's side (no 'x'), nor
 * the credential on either side (no 'z' or 'Z'): so any "mxproxy" the client
 * sees is mxproxy's own, and a credential in a log can only come from an
 * AUTH command. */
static void fuzz_send_raw(struct fuzz_peer *p, const uint8_t *data, size_t len)
{
    char buf[256];

    for (size_t i = 0; i < len; i++) {
        char c = (char)data[i];
        buf[i] = c == 'z' || c == 'Z' || (c == 'x' && p == &fuzz_backend) ? 'y' : c;
    }
    fuzz_send(p, buf, len);
}

/* An AUTH command starts a line, so it is never part of another command. */
static void fuzz_send_auth(const char *line)
{
    if (fuzz_client.last != '\n' && fuzz_client.sent > 0)
        fuzz_send(&fuzz_client, "\r\n", 2);
    fuzz_send(&fuzz_client, line, strlen(line));
}

static void fuzz_flood(struct fuzz_peer *p, const char *unit, unsigned count)
{
    size_t ul = strlen(unit);
    char buf[8192];
    size_t n = 0;

    for (unsigned i = 0; i < count && p->fd >= 0; i++) {
        if (n + ul > sizeof(buf)) {
            fuzz_send(p, buf, n);
            n = 0;
        }
        memcpy(buf + n, unit, ul);
        n += ul;
    }
    if (n > 0)
        fuzz_send(p, buf, n);
}

/* Every "mxproxy" the client received is in a reply line of mxproxy's own
 * that starts the stream or follows a line end: a CRLF, or a bare LF that
 * ended a backend reply line (the reply parser takes a bare LF for a line
 * end, as SMTP clients do: Postfix, smtplib, swaks read replies up to LF). */
static void fuzz_check_unglued(void)
{
    static size_t checked;
    const char *s = fuzz_seen;

    if (fuzz_seen_len < checked)
        checked = 0;
    for (size_t i = checked; i + 7 <= fuzz_seen_len; i++) {
        if (memcmp(s + i, "mxproxy", 7) != 0)
            continue;
        size_t ls = i;
        while (ls > 0 && s[ls - 1] != '\n')
            ls--;
        FUZZ_CHECK(ls == 0 || (ls >= 2 && s[ls - 2] == '\r') || fuzz_backend_bare_lf);
        /* "NNN X.Y.Z mxproxy: ...": the word right after the line's code and status. */
        FUZZ_CHECK(i - ls == 10 && s[ls] >= '2' && s[ls] <= '5' &&
                   (s[ls + 3] == ' ' || s[ls + 3] == '-'));
    }
    checked = fuzz_seen_len >= 7 ? fuzz_seen_len - 6 : 0;
}

static uint64_t fuzz_finals_received(void)
{
    uint64_t n = 0;
    for (size_t i = 0; i + 4 <= fuzz_seen_len; i++)
        if ((i == 0 || fuzz_seen[i - 1] == '\n') && fuzz_seen[i] >= '1' && fuzz_seen[i] <= '5' &&
            fuzz_seen[i + 1] >= '0' && fuzz_seen[i + 1] <= '9' && fuzz_seen[i + 2] >= '0' &&
            fuzz_seen[i + 2] <= '9' && fuzz_seen[i + 3] == ' ')
            n++;
    return n;
}

static void fuzz_check_step(void)
{
    if (fuzz_client.reads)
        fuzz_read(&fuzz_client, true);
    if (fuzz_backend.reads)
        fuzz_read(&fuzz_backend, false);
    fuzz_check_unglued();
    size_t now = __sanitizer_get_current_allocated_bytes();
    FUZZ_CHECK(now < fuzz_mem_base || now - fuzz_mem_base < FUZZ_MEM_BOUND);
}

static int fuzz_connect(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(fuzz_loopback()),
                            .sin_port = htons((uint16_t)port)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);

    FUZZ_CHECK(fd >= 0);
    fuzz_small_buffers(fd);
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static void fuzz_check_log(void)
{
    off_t end = lseek(fuzz_log_fd, 0, SEEK_END);
    char *text;

    if (end <= 0)
        return;
    text = mmap(NULL, (size_t)end, PROT_READ, MAP_SHARED, fuzz_log_fd, 0);
    FUZZ_CHECK(text != MAP_FAILED);
    for (size_t k = 0; k < sizeof(fuzz_secrets) / sizeof(fuzz_secrets[0]); k++) {
        if (memmem(text, (size_t)end, fuzz_secrets[k], strlen(fuzz_secrets[k])) != NULL) {
            fprintf(stderr, "credential in the log:\n%.*s\n", (int)end, text);
            abort();
        }
    }
    munmap(text, (size_t)end);
    FUZZ_CHECK(ftruncate(fuzz_log_fd, 0) == 0);
    FUZZ_CHECK(lseek(fuzz_log_fd, 0, SEEK_SET) == 0);
}

static void fuzz_reset_counters(void)
{
    fuzz_seen_len = 0;
    fuzz_backend_bare_lf = false;
    fuzz_backend_finals = 0;
    fuzz_client_lines = 0;
    fuzz_count_finals(NULL, 0);
    fuzz_check_unglued(); /* resets its position */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    FUZZ_CHECK(log_open(fuzz_log_fd, LOG_FORMAT_LOGFMT, LOG_DEBUG) == 0);
    fuzz_reset_counters();
    fuzz_client =
        (struct fuzz_peer){.fd = fuzz_connect(fuzz_ports[data[0] % FUZZ_VARIANTS]), .reads = true};
    fuzz_backend = (struct fuzz_peer){.fd = -1, .reads = true};
    FUZZ_CHECK(fuzz_client.fd >= 0);
    for (int i = 0; i < 50 && fuzz_backend.fd < 0; i++) {
        fuzz_turn();
        fuzz_backend.fd = accept4(fuzz_backend_lfd, NULL, NULL, SOCK_NONBLOCK);
    }
    FUZZ_CHECK(fuzz_backend.fd >= 0);
    fuzz_small_buffers(fuzz_backend.fd);
    fuzz_turn();
    fuzz_mem_base = __sanitizer_get_current_allocated_bytes();

    size_t i = 1;
    while (i < size && fuzz_w.sessions != NULL) {
        uint8_t op = data[i++];
        uint8_t arg = i < size ? data[i] : 0;
        size_t len;

        switch (op % 16) {
        case 0: /* the client sends raw bytes */
        case 1: /* the backend sends raw bytes */
            len = arg % 64;
            i++;
            if (len > size - (i < size ? i : size))
                len = size - (i < size ? i : size);
            fuzz_send_raw(op % 16 == 0 ? &fuzz_client : &fuzz_backend, data + i, len);
            i += len;
            break;
        case 2:
        case 3:
            i++;
            {
                const char *c =
                    fuzz_commands[arg % (sizeof(fuzz_commands) / sizeof(*fuzz_commands))];
                fuzz_send(&fuzz_client, c, strlen(c));
            }
            break;
        case 4:
        case 5:
            i++;
            {
                const char *r = fuzz_replies[arg % (sizeof(fuzz_replies) / sizeof(*fuzz_replies))];
                fuzz_send(&fuzz_backend, r, strlen(r));
            }
            break;
        case 6:
            i++;
            {
                fuzz_send_auth(fuzz_auth[arg % (sizeof(fuzz_auth) / sizeof(*fuzz_auth))]);
            }
            break;
        case 7: /* a client flood: one short line, or one byte, many times */
            i++;
            fuzz_flood(&fuzz_client,
                       (arg & 3) == 0   ? "\n"
                       : (arg & 3) == 1 ? "x"
                                        : "NOOP\r\n",
                       (arg >> 2) * 128u + 1);
            break;
        case 8: /* a backend flood: many reply lines */
            i++;
            fuzz_flood(&fuzz_backend, (arg & 1) ? "250-x\r\n" : "250 ok\r\n", (arg >> 1) * 64u + 1);
            break;
        case 9:
            fuzz_client.reads = !fuzz_client.reads;
            break;
        case 10:
            fuzz_backend.reads = !fuzz_backend.reads;
            break;
        case 11:
            if (fuzz_client.fd >= 0 && !fuzz_client.shut) {
                (void)shutdown(fuzz_client.fd, SHUT_WR);
                fuzz_client.shut = true;
            }
            break;
        case 12:
            if (fuzz_backend.fd >= 0 && !fuzz_backend.shut) {
                (void)shutdown(fuzz_backend.fd, SHUT_WR);
                fuzz_backend.shut = true;
            }
            break;
        case 13:
            fuzz_peer_reset(&fuzz_backend);
            break;
        case 14:
            fuzz_peer_reset(&fuzz_client);
            break;
        default: /* drain: every session ends as at drain_timeout */
            session_close_all(&fuzz_w);
            break;
        }
        fuzz_turn();
        fuzz_check_step();
    }
    /* The client reads what is left; then both ends go. */
    if (fuzz_client.fd >= 0) {
        fuzz_client.reads = true;
        fuzz_turn();
        fuzz_check_step();
    }
    /* One reply per line end the client sent, per max_line_length bytes (an
     * overlong line is answered before its end), per final reply the
     * backend sent, and one closing 421. */
    uint64_t bound = fuzz_backend_finals + fuzz_client_lines + fuzz_client.sent / FUZZ_LINE_MAX + 1;
    if (fuzz_finals_received() > bound) {
        fprintf(stderr, "client got %llu replies for %llu from the backend and %llu lines:\n%.*s\n",
                (unsigned long long)fuzz_finals_received(), (unsigned long long)fuzz_backend_finals,
                (unsigned long long)fuzz_client_lines, (int)fuzz_seen_len, fuzz_seen);
        FUZZ_CHECK(!"a command answered twice");
    }
    fuzz_peer_reset(&fuzz_client);
    fuzz_peer_reset(&fuzz_backend);
    for (int k = 0; k < 1000 && fuzz_w.sessions != NULL; k++)
        fuzz_turn();
    FUZZ_CHECK(fuzz_w.sessions == NULL);
    /* A backend connection the session began but the harness never took
     * would be the next input's backend: reset every one left. */
    for (int fd; (fd = accept4(fuzz_backend_lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0;) {
        struct fuzz_peer stale = {.fd = fd};
        fuzz_peer_reset(&stale);
    }
    log_close();
    fuzz_check_log();
    return 0;
}
