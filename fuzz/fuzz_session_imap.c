/* fuzz_session_imap.c: libFuzzer harness for a whole mode imap session
 * (fuzz_session_pop3.c's and fuzz_session_smtp.c's twin).
 *
 * The real session code (session.c, proto_imap.c, dialog.c, relay.c, the parsers,
 * log.c) runs on a libuv loop driven by this harness on its own thread; the
 * transport is loopback TCP the harness holds both ends of: it is the client
 * and it is the backend. Input bytes are a script of steps, interleaving
 * what the client sends, what the backend sends, who reads, who closes, a
 * reset, a drain. After every step the harness turns the loop until it is
 * quiet and checks:
 *   - no reply of mxproxy's own is glued to a backend line: every "mxproxy"
 *     the client receives sits in a "* BYE " line that starts after a line
 *     end, never inside a backend line or literal (neither peer's bytes ever
 *     contain that word);
 *   - memory held stays under a bound however much a peer floods or refuses
 *     to read (ASan's count of allocated bytes, against the level before the
 *     session);
 *   - no command is answered twice: the client never receives more status
 *     lines ("TAG OK", "* BYE", ...) than the backend sent plus one per line
 *     the client sent, plus one closing BYE;
 * and at the end of the input, with every log line flushed:
 *   - no credential the client sent (LOGIN as atoms, quoted strings or
 *     literals, AUTHENTICATE PLAIN with an initial response or on a
 *     continuation line, in any spelling a server's tokenizer accepts)
 *     appears in any log line, at transcript = full and log level debug;
 *   - no literal's data, the client's (APPEND) or the backend's (FETCH),
 *     appears in any log line: literal data is counted, never parsed.
 *
 * Some of those bytes are data or commands depending on the backend's
 * answers (a synchronizing literal the backend refuses is a command line
 * after all). The harness keeps the checks sound: the tag "z.." is never
 * answered by the backend (no raw byte is a 'z', no canned reply uses it),
 * so what follows such a command stays what it announced; and once raw
 * bytes may have left a side inside a literal or a wait, the steps that
 * rely on it send words that are not checked.
 *
 * The first input byte picks one of several listeners (client STARTTLS,
 * passthrough, transcript = pairs, imap_id, backend STARTTLS), set up once
 * per process.
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

#define FUZZ_VARIANTS 16                  /* listeners: 4 client sides x 2 imap_id x 2 backend */
#define FUZZ_MEM_BOUND (3u * 1024 * 1024) /* bytes a session may hold above its start */
#define FUZZ_CAPTURE_MAX (1u << 20)       /* what the client keeps of what it received */
#define FUZZ_SNDBUF 4096                  /* small socket buffers: backpressure shows early */
#define FUZZ_LINE_MAX 512                 /* max_line_length of every listener */

/* What no log line may hold: the credentials (and base64 of "\0fuzzuser\0fuzzsecret"), and
 * the marks in literal data. No raw byte is a 'z', so only the steps below spell them. */
static const char *const fuzz_secrets[] = {
    "AGZ1enp1c2VyAGZ1enpzZWNyZXQ=", "fuzzsecret", "fuzzuser", "fuzzlit", "fuzzbody",
};

/* A credential step: the line(s) the client sends; multi: more than one line, so sound only
 * while no raw client bytes may have left the parser waiting (see fuzz_send_auth). */
struct fuzz_auth {
    const char *text;
    bool multi;
};

static const struct fuzz_auth fuzz_auth[] = {
    {"a1 LOGIN fuzzuser fuzzsecret\r\n", false},
    {"a1 LOGIN \"fuzzuser\" \"fuzzsecret\"\r\n", false},
    {"a1 login\tfuzzuser \"fuzzsecret\"\r\n", false},
    {"a1 Login fuzzuser fuzzsecret with blanks\r\n", false},
    {"LOGIN fuzzuser fuzzsecret\r\n", false},
    {"* LOGIN fuzzuser fuzzsecret\r\n", false},
    {"a1 LOGIN fuzzuser\r\n", false},
    {"z3 AUTHENTICATE PLAIN AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n", false},
    {"z3 authenticate plain AGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n", false},
    {"z1 LOGIN fuzzuser {10}\r\nfuzzsecret\r\n", true},
    {"a1 LOGIN fuzzuser {10+}\r\nfuzzsecret\r\n", true},
    {"a1 LOGIN {8+}\r\nfuzzuser {10+}\r\nfuzzsecret\r\n", true},
    {"z1 LOGIN {8}\r\nfuzzuser {10}\r\nfuzzsecret\r\n", true},
    {"z2 AUTHENTICATE PLAIN\r\nAGZ1enp1c2VyAGZ1enpzZWNyZXQ=\r\n", true},
};

/* Every tag of these is "aN": the backend's tagged step answers them. */
static const char *const fuzz_commands[] = {
    "a0 CAPABILITY\r\n",
    "a1 NOOP\r\n",
    "a2 SELECT INBOX\r\n",
    "a3 FETCH 1 (BODY[])\r\n",
    "a4 IDLE\r\nDONE\r\n",
    "a5 STARTTLS\r\n",
    "a6 COMPRESS DEFLATE\r\n",
    "a7 LOGOUT\r\n",
    "a9 ID NIL\r\n",
    "a2 UID FETCH 1:* (FLAGS)\r\n",
    "a0 CAPABILITY\r\na1 NOOP\r\na2 SELECT INBOX\r\n",
    "a5 STARTTLS\r\na1 NOOP\r\n",
    "a6 COMPRESS DEFLATE\r\na1 NOOP\r\n",
    "DONE\r\n",
    "*\r\n",
    "a1 ENABLE QRESYNC\r\n",
};

static const char *const fuzz_replies[] = {
    ("* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
     "AUTH=PLAIN] Dovecot ready.\r\n"),
    "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n",
    "* OK ready\r\n",
    "* PREAUTH logged in\r\n",
    "* BYE too busy\r\n",
    "* CAPABILITY IMAP4rev1 STARTTLS LITERAL+ IDLE COMPRESS=DEFLATE LOGINDISABLED\r\n",
    "+ \r\n",
    "+ idling\r\n",
    "+ Ready for literal data\r\n",
    "* 2 EXISTS\r\n* 0 RECENT\r\n",
    "* 1 FETCH (FLAGS (\\Seen))\r\n",
    "* ID NIL\r\n",
    "mxp1 OK Begin TLS negotiation now.\r\n",
    "mxp2 OK ID completed.\r\n",
    "mxp1 NO not now\r\n",
    "* OK",
};

struct fuzz_peer {
    int fd;        /* the harness's end, non-blocking; -1 when closed */
    bool reads;    /* the harness reads what arrives (else it lets it pile up) */
    bool shut;     /* the harness sent its FIN */
    bool cut;      /* a send gave up before its end */
    bool lit;      /* raw bytes may have announced a literal: later steps may be its data */
    bool wait;     /* raw bytes may have left the client's parser waiting for an answer */
    uint64_t sent; /* bytes the harness sent */
    char last;     /* the last byte the harness sent */
};

static struct worker fuzz_w;
static struct config *fuzz_cfg;
static int fuzz_backend_lfd = -1;
static int fuzz_ports[FUZZ_VARIANTS];
static bool fuzz_requires_tls[FUZZ_VARIANTS]; /* the variant's listener has require_tls = on */
static bool fuzz_plaintext_refused; /* this input's listener refuses APPEND before STARTTLS */
static int fuzz_log_fd = -1;

static struct fuzz_peer fuzz_client, fuzz_backend;
static char *fuzz_seen; /* what the client received */
static size_t fuzz_seen_len;
static uint64_t fuzz_backend_finals; /* status lines the backend sent */
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

/* One [listener] per variant: client_tls (off, starttls, passthrough, and off with
 * transcript = pairs), imap_id (with starttls: and require_tls), backend_tls. */
static void fuzz_make_config(const char *dir, int backend_port)
{
    static const char *const client_tls[] = {"off", "starttls", "passthrough", "off"};
    size_t cap = 64 * 1024, len = 0;
    char *text = malloc(cap);
    char err[CONFIG_ERR_MAX];

    FUZZ_CHECK(text != NULL);
    len +=
        (size_t)snprintf(text + len, cap - len, "[global]\nlog_level = debug\ndrain_timeout = 0\n");
    fuzz_free_ports(fuzz_ports, FUZZ_VARIANTS);
    for (int v = 0; v < FUZZ_VARIANTS; v++) {
        len += (size_t)snprintf(
            text + len, cap - len,
            "[listener v%d]\nlisten = %s:%d\nbackend = %s:%d\nmode = imap\n"
            "transcript = %s\nmax_line_length = %d\nimap_id = %s\nclient_tls = %s\n%s",
            v, fuzz_loopback_text(), fuzz_ports[v], fuzz_loopback_text(), backend_port,
            v % 4 == 3 ? "pairs" : "full", FUZZ_LINE_MAX, (v / 4) % 2 ? "on" : "off",
            client_tls[v % 4], (v / 8) % 2 ? "backend_tls = starttls\nbackend_verify = off\n" : "");
        if (v % 4 == 1)
            len += (size_t)snprintf(text + len, cap - len, "cert = %s/mx.crt\nkey = %s/mx.key\n%s",
                                    dir, dir, (v / 4) % 2 ? "require_tls = on\n" : "");
        fuzz_requires_tls[v] = v % 4 == 1 && (v / 4) % 2;
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

/* Is s[0, n) (at a line start) a status line: a tag or "*", a space, then OK, NO, BAD, BYE or
 * PREAUTH and a space or the line's end? n < 0: not known yet (more bytes needed). */
static int fuzz_is_status(const char *s, size_t n)
{
    static const char *const st[] = {"OK", "NO", "BAD", "BYE", "PREAUTH"};
    size_t t = 0;

    while (t < n && s[t] != ' ' && s[t] != '\r' && s[t] != '\n')
        t++;
    if (t == n)
        return -1;
    if (t == 0 || s[t] != ' ')
        return 0;
    t++;
    for (size_t k = 0; k < sizeof(st) / sizeof(st[0]); k++) {
        size_t kl = strlen(st[k]);
        if (n - t < kl + 1) {
            if (memcmp(s + t, st[k], n - t < kl ? n - t : kl) == 0)
                return -1;
            continue;
        }
        if (memcmp(s + t, st[k], kl) == 0 &&
            (s[t + kl] == ' ' || s[t + kl] == '\r' || s[t + kl] == '\n'))
            return 1;
    }
    return 0;
}

/* Counts the status lines in what the backend sends, literal data alike (the client sees
 * those too). */
static void fuzz_count_finals(const char *p, size_t n)
{
    static char head[96];
    static size_t hn;
    static bool line_start = true;

    if (p == NULL) { /* a new session */
        line_start = true;
        hn = 0;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (line_start && hn < sizeof(head)) {
            head[hn++] = c;
            int r = fuzz_is_status(head, hn);
            if (r >= 0 || hn == sizeof(head)) {
                fuzz_backend_finals += r == 1;
                line_start = false;
            }
        }
        if (c == '\n') {
            line_start = true;
            hn = 0;
        }
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

/* Sends what the socket takes, turning the loop so mxproxy reads; gives up
 * when mxproxy stops reading (as it must when the other side is full). */
static void fuzz_send(struct fuzz_peer *p, const char *data, size_t len)
{
    int stuck = 0;

    if (p->fd < 0 || p->shut)
        return;
    if (p == &fuzz_backend)
        fuzz_count_finals(data, len);
    else
        for (size_t i = 0; i < len; i++)
            fuzz_client_lines += data[i] == '\n' || data[i] == '\r';
    while (len > 0 && stuck < 3) {
        ssize_t n = send(p->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                break;
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
    if (len > 0)
        p->cut = true;
}

/* Raw bytes (literal data too) never spell mxproxy's name (no 'x'), nor a credential or a
 * literal's mark (no 'z' or 'Z'): so any "mxproxy" the client sees is mxproxy's own, and a checked
 * word in a log can only come from the steps that send it. A '{' may announce a literal; a client
 * line may be a command that waits (IDLE, AUTHENTICATE, a literal) for an answer any backend bytes
 * may give. */
static void fuzz_filter(char *out, const uint8_t *data, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = (char)data[i];
        out[i] = c == 'z' || c == 'Z' || c == 'x' ? 'y' : c;
    }
}

static void fuzz_send_raw(struct fuzz_peer *p, const uint8_t *data, size_t len)
{
    char buf[256];

    fuzz_filter(buf, data, len);
    for (size_t i = 0; i < len; i++)
        p->lit |= buf[i] == '{';
    if (p == &fuzz_client && len > 0)
        p->wait = true;
    fuzz_send(p, buf, len);
}

/* Starts a line of the peer's, so what follows is never the end of another one. */
static void fuzz_line_start(struct fuzz_peer *p)
{
    if (p->sent > 0 && p->last != '\n')
        fuzz_send(p, "\r\n", 2);
}

/* Replaces the checked words of a step that is not sound now by words nobody checks. */
static void fuzz_unmark(char *s)
{
    for (char *q = s; (q = strstr(q, "fuzz")) != NULL; q += 4)
        memcpy(q, "pass", 4);
    for (char *q = s; (q = strstr(q, "AGZ1enp1c2VyAGZ1enpzZWNyZXQ=")) != NULL; q += 4)
        memcpy(q, "AHBh", 4);
}

/* A credential step. A single line is sound in any state but inside a literal (a client
 * parser that waits reads it as an AUTHENTICATE response or a DONE, both never logged);
 * a step of several lines also needs a parser that does not wait for the backend. */
static void fuzz_send_auth(const struct fuzz_auth *a)
{
    char line[128];
    size_t n = strlen(a->text);

    FUZZ_CHECK(n < sizeof(line));
    memcpy(line, a->text, n + 1);
    if (fuzz_client.lit || fuzz_client.cut || (a->multi && fuzz_client.wait))
        fuzz_unmark(line);
    fuzz_line_start(&fuzz_client);
    fuzz_send(&fuzz_client, line, n);
}

/* An APPEND whose literal holds raw bytes and the mark: {n+} is data whatever the backend
 * answers (and dropped whole where require_tls refuses the APPEND); {n} under a "z" tag too,
 * since the backend never refuses that tag, but not where mxproxy refuses it: the client
 * here sends the data without waiting for the "+" it never gets, so the server takes it
 * for commands, as RFC 9051 says. */
static void fuzz_send_append(bool sync, const uint8_t *data, size_t len)
{
    char buf[512];
    static const char mark[] = "fuzzlit ";
    size_t dl = sizeof(mark) - 1 + len;
    int h = snprintf(buf, sizeof(buf), "%s APPEND INBOX (\\Seen) {%zu%s}\r\n%s", sync ? "z8" : "a8",
                     dl, sync ? "" : "+", mark);

    FUZZ_CHECK(h > 0 && (size_t)h + len + 2 < sizeof(buf));
    fuzz_filter(buf + h, data, len);
    memcpy(buf + h + len, "\r\n", 2);
    buf[h + len + 2] = '\0';
    if (fuzz_client.lit || fuzz_client.cut || (sync && fuzz_plaintext_refused)) {
        memcpy(strstr(buf, mark), "passlit ", sizeof(mark) - 1);
    }
    fuzz_line_start(&fuzz_client);
    fuzz_send(&fuzz_client, buf, (size_t)h + len + 2);
}

/* A FETCH response whose literal holds raw bytes and the mark. */
static void fuzz_send_fetch(const uint8_t *data, size_t len)
{
    char buf[512];
    static const char mark[] = "fuzzbody\r\n";
    size_t dl = sizeof(mark) - 1 + len;
    int h = snprintf(buf, sizeof(buf), "* 1 FETCH (UID 7 BODY[] {%zu}\r\n%s", dl, mark);

    FUZZ_CHECK(h > 0 && (size_t)h + len + 3 < sizeof(buf));
    fuzz_filter(buf + h, data, len);
    memcpy(buf + h + len, ")\r\n", 3);
    if (fuzz_backend.lit || fuzz_backend.cut)
        memcpy(strstr(buf, mark), "pass", 4);
    fuzz_line_start(&fuzz_backend);
    fuzz_send(&fuzz_backend, buf, (size_t)h + len + 3);
}

/* A line of a big literal's data that looks like a response. */
static const char fuzz_lit_unit[] = "a1 OK\r\n";

/* A tagged response to one of the "aN" commands. */
static void fuzz_send_tagged(uint8_t arg)
{
    static const char *const st[] = {"OK", "NO", "BAD"};
    char buf[64];
    int n = snprintf(buf, sizeof(buf), "a%u %s %s\r\n", arg % 10u, st[(arg / 10u) % 3u],
                     arg >= 128 ? "[COMPRESSIONACTIVE] done" : "done");

    fuzz_line_start(&fuzz_backend);
    fuzz_send(&fuzz_backend, buf, (size_t)n);
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

/* Every "mxproxy" the client received is in a BYE of mxproxy's own
 * ("* BYE [UNAVAILABLE] mxproxy: ..." or "* BYE mxproxy: ...") that starts the stream or
 * follows a line end (a bare LF ends a backend line too: mxproxy relays it as it is). */
static void fuzz_check_unglued(void)
{
    static const char own[] = "* BYE ";
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
        if (!((i - ls == sizeof(own) - 1 ||
               (i - ls == sizeof(own) - 1 + 14 && memcmp(s + ls + 6, "[UNAVAILABLE] ", 14) == 0)) &&
              memcmp(s + ls, own, sizeof(own) - 1) == 0)) {
            fprintf(stderr, "client got:\n");
            fwrite(fuzz_seen, 1, fuzz_seen_len, stderr); /* NULs too */
            fputc('\n', stderr);
            FUZZ_CHECK(!"a reply of mxproxy's own glued to a backend line");
        }
    }
    checked = fuzz_seen_len >= 7 ? fuzz_seen_len - 6 : 0;
}

static uint64_t fuzz_finals_received(void)
{
    uint64_t n = 0;
    for (size_t i = 0; i < fuzz_seen_len; i++) {
        if (i != 0 && fuzz_seen[i - 1] != '\n')
            continue;
        size_t e = i;
        while (e < fuzz_seen_len && e - i < 96 && fuzz_seen[e] != '\n')
            e++;
        if (e < fuzz_seen_len && fuzz_seen[e] == '\n')
            e++;
        n += fuzz_is_status(fuzz_seen + i, e - i) == 1;
    }
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
            fprintf(stderr, "%s in the log:\n%.*s\n", fuzz_secrets[k], (int)end, text);
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
    fuzz_backend_finals = 0;
    fuzz_client_lines = 0;
    fuzz_count_finals(NULL, 0);
    fuzz_check_unglued(); /* resets its position */
}

/* Takes the raw chunk of a step: arg % 64 bytes after the argument byte. */
static const uint8_t *fuzz_chunk(const uint8_t *data, size_t size, size_t *i, uint8_t arg,
                                 size_t *len)
{
    size_t at = ++*i < size ? *i : size;

    *len = arg % 64;
    if (*len > size - at)
        *len = size - at;
    *i = at + *len;
    return data + at;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    FUZZ_CHECK(log_open(fuzz_log_fd, LOG_FORMAT_LOGFMT, LOG_DEBUG) == 0);
    fuzz_reset_counters();
    fuzz_client =
        (struct fuzz_peer){.fd = fuzz_connect(fuzz_ports[data[0] % FUZZ_VARIANTS]), .reads = true};
    fuzz_plaintext_refused = fuzz_requires_tls[data[0] % FUZZ_VARIANTS];
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
        const uint8_t *chunk;
        size_t len;

        switch (op % 20) {
        case 0: /* the client sends raw bytes */
        case 1: /* the backend sends raw bytes */
            chunk = fuzz_chunk(data, size, &i, arg, &len);
            fuzz_send_raw(op % 20 == 0 ? &fuzz_client : &fuzz_backend, chunk, len);
            break;
        case 2:
        case 3:
            i++;
            {
                const char *c =
                    fuzz_commands[arg % (sizeof(fuzz_commands) / sizeof(*fuzz_commands))];
                fuzz_line_start(&fuzz_client);
                fuzz_send(&fuzz_client, c, strlen(c));
            }
            break;
        case 4:
            i++;
            {
                const char *r = fuzz_replies[arg % (sizeof(fuzz_replies) / sizeof(*fuzz_replies))];
                fuzz_send(&fuzz_backend, r, strlen(r));
            }
            break;
        case 5:
            i++;
            fuzz_send_tagged(arg);
            break;
        case 6:
            i++;
            fuzz_send_auth(&fuzz_auth[arg % (sizeof(fuzz_auth) / sizeof(*fuzz_auth))]);
            break;
        case 7: /* a client flood: one short line, or one byte, many times */
            i++;
            fuzz_flood(&fuzz_client,
                       (arg & 3) == 0   ? "\n"
                       : (arg & 3) == 1 ? "y"
                                        : "a1 NOOP\r\n",
                       (arg >> 2) * 128u + 1);
            break;
        case 8: /* a backend flood: many untagged responses, or continuations (each one is
                 * logged at transcript = full: fewer than in the byte floods) */
            i++;
            fuzz_flood(&fuzz_backend, (arg & 1) ? "* 1 FETCH (FLAGS (\\Seen))\r\n" : "+ go\r\n",
                       (arg >> 1) * 8u + 1);
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
        case 15: /* drain: every session ends as at drain_timeout */
            session_close_all(&fuzz_w);
            break;
        case 16: /* APPEND {n+} */
        case 17: /* APPEND {n} */
            chunk = fuzz_chunk(data, size, &i, arg, &len);
            fuzz_send_append(op % 20 == 17, chunk, len);
            break;
        case 18: /* FETCH with a literal body */
            chunk = fuzz_chunk(data, size, &i, arg, &len);
            fuzz_send_fetch(chunk, len);
            break;
        default: /* a backend flood of literals: a big FETCH body in pieces */
            i++;
            {
                char head[64];
                unsigned count = (arg % 64u) * 16u + 1;
                int h = snprintf(head, sizeof(head), "* 2 FETCH (BODY[] {%u}\r\n",
                                 count * (unsigned)strlen(fuzz_lit_unit));
                fuzz_line_start(&fuzz_backend);
                fuzz_send(&fuzz_backend, head, (size_t)h);
                fuzz_flood(&fuzz_backend, fuzz_lit_unit, count); /* data, not a response */
                fuzz_send(&fuzz_backend, ")\r\n", 3);
            }
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
    /* One status line per line end the client sent, per max_line_length
     * bytes (an overlong line is answered before its end), per status line
     * the backend sent, and one closing BYE. */
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
