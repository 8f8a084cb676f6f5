/* config.c: INI text -> struct config, with "FILE:LINE: message" errors.
 *
 * inih does the tokenising, but mxproxy hands it the text one line at a time
 * through config_read_line(). That reader is what makes the messages exact:
 * Debian builds inih without INI_HANDLER_LINENO, so the reader's counter is
 * the only way the key handler learns its line; inih never reports section
 * headers (so an empty [listener x] would vanish) and cuts section names at
 * 50 bytes; and a line longer than inih's buffer would silently be split in
 * two. The reader also strips leading blanks, so indentation is cosmetic and
 * never turns a key into a continuation of the previous value.
 */
#include "config.h"
#include "cidr.h"
#include "climit.h"
#include "resolve.h"
#include "sockaddr.h"
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CONFIG_FILE_MAX (1024 * 1024) /* bigger files are refused, not truncated */
#define CONFIG_WORKERS_MAX 256
#define CONFIG_HEALTH_COUNT_MAX 100 /* health_rise and health_fall, at most */
#define CONFIG_MAX_CONNECTIONS_MAX 1000000

enum config_section {
    CONFIG_SECTION_NONE = 0, /* before the first header */
    CONFIG_SECTION_GLOBAL,   /* [global], possibly given several times */
    CONFIG_SECTION_LISTENER, /* [listener NAME]; parser->listener says which */
    CONFIG_SECTION_BAD,      /* header rejected; its error is already stored */
};

/* Parse state shared by the line reader and the key handler. */
struct config_parser {
    const char *name;               /* FILE in messages */
    const char *next;               /* text not yet handed to inih */
    int lineno;                     /* line most recently handed to inih, from 1 */
    enum config_section section;    /* section the current line belongs to */
    size_t listener;                /* index in cfg->listeners when in a listener */
    uint64_t global_seen[2];        /* one bit per config_keys[] row set in [global] */
    uint64_t listener_seen[2];      /* the same for the current listener */
    struct config *cfg;             /* being built; freed by the caller on error */
    int err_code;                   /* 0, or the negative errno of the first error */
    int err_line;                   /* line of the first error, 0 when none applies */
    char err[CONFIG_ERR_MAX];       /* first message, without "FILE:LINE: " */
    struct config_pending *pending; /* backend entries given by name, in file order */
    size_t n_pending;
    const struct config_name *pinned; /* answers to use instead of DNS (a rebuild) */
    size_t n_pinned;
};

/* A "backend = NAME:PORT" entry waiting for its name's addresses: the whole
 * file is read first, so "resolver" may come after the listeners. */
struct config_pending {
    size_t listener; /* index in cfg->listeners */
    size_t index;    /* of its placeholder in that listener's backends */
    size_t name;     /* index in cfg->names */
    unsigned port;
    int line;
};

/* One accepted word of an enumerated key. */
struct config_word {
    const char *name;
    int value;
};

static const struct config_word config_log_formats[] = {
    {"logfmt", CONFIG_LOG_LOGFMT},
    {"json", CONFIG_LOG_JSON},
    {NULL, 0},
};

static const struct config_word config_log_levels[] = {
    {"debug", CONFIG_LOG_DEBUG},
    {"info", CONFIG_LOG_INFO},
    {"warn", CONFIG_LOG_WARN},
    {"error", CONFIG_LOG_ERROR},
    {NULL, 0},
};

static const struct config_word config_modes[] = {
    {"tcp", CONFIG_MODE_TCP},
    {"smtp", CONFIG_MODE_SMTP},
    {"imap", CONFIG_MODE_IMAP},
    {"pop3", CONFIG_MODE_POP3},
    {NULL, 0},
};

static const struct config_word config_smugglings[] = {
    {"reject", CONFIG_SMUGGLING_REJECT},
    {"normalize", CONFIG_SMUGGLING_NORMALIZE},
    {"off", CONFIG_SMUGGLING_OFF},
    {NULL, 0},
};

static const struct config_word config_transcripts[] = {
    {"off", CONFIG_TRANSCRIPT_OFF},
    {"pairs", CONFIG_TRANSCRIPT_PAIRS},
    {"full", CONFIG_TRANSCRIPT_FULL},
    {NULL, 0},
};

static const struct config_word config_kernel_relays[] = {
    {"off", CONFIG_KERNEL_RELAY_OFF},
    {"splice", CONFIG_KERNEL_RELAY_SPLICE},
    {"sockmap", CONFIG_KERNEL_RELAY_SOCKMAP},
    {NULL, 0},
};

static const struct config_word config_onoff[] = {
    {"on", 1},
    {"off", 0},
    {NULL, 0},
};

static const struct config_word config_client_tls_words[] = {
    {"off", CONFIG_CLIENT_TLS_OFF},
    {"implicit", CONFIG_CLIENT_TLS_IMPLICIT},
    {"starttls", CONFIG_CLIENT_TLS_STARTTLS},
    {"passthrough", CONFIG_CLIENT_TLS_PASSTHROUGH},
    {NULL, 0},
};

static const struct config_word config_backend_tls_words[] = {
    {"off", CONFIG_BACKEND_TLS_OFF},
    {"implicit", CONFIG_BACKEND_TLS_IMPLICIT},
    {"starttls", CONFIG_BACKEND_TLS_STARTTLS},
    {NULL, 0},
};

static const struct config_word config_tls_versions[] = {
    {"TLSv1.2", CONFIG_TLS_1_2},
    {"TLSv1.3", CONFIG_TLS_1_3},
    {NULL, 0},
};

static const struct config_word config_transparent_words[] = {
    {"off", CONFIG_TRANSPARENT_OFF},
    {"redirect", CONFIG_TRANSPARENT_REDIRECT},
    {"tproxy", CONFIG_TRANSPARENT_TPROXY},
    {NULL, 0},
};

static const struct config_word config_proxy_protocol_words[] = {
    {"off", CONFIG_PROXY_PROTOCOL_OFF},
    {"v1", CONFIG_PROXY_PROTOCOL_V1},
    {"v2", CONFIG_PROXY_PROTOCOL_V2},
    {NULL, 0},
};

static const struct config_word config_health_words[] = {
    {"off", CONFIG_HEALTH_OFF},
    {"connect", CONFIG_HEALTH_CONNECT},
    {"greeting", CONFIG_HEALTH_GREETING},
    {"smtp", CONFIG_HEALTH_SMTP},
    {NULL, 0},
};

static const struct config_word config_balance_words[] = {
    {"round_robin", CONFIG_BALANCE_ROUND_ROBIN},
    {"least_connections", CONFIG_BALANCE_LEAST_CONNECTIONS},
    {"first", CONFIG_BALANCE_FIRST},
    {NULL, 0},
};

static const struct config_word config_source_words[] = {
    {"client", 1},
    {"proxy", 0},
    {NULL, 0},
};

struct config_key;
typedef int (*config_parse_fn)(struct config_parser *p, const struct config_key *k,
                               const char *value);

#define CONFIG_KEY_F_REPEAT 0x1u /* may be given again in a section; values add up */
#define CONFIG_KEY_F_TLS 0x4u    /* a TLS key: remembered in tls_line for messages */

#define CONFIG_SMTP CONFIG_MODE_BIT(CONFIG_MODE_SMTP) /* .modes of a key mode smtp owns */
#define CONFIG_IMAP CONFIG_MODE_BIT(CONFIG_MODE_IMAP) /* .modes of a key mode imap owns */
#define CONFIG_POP3 CONFIG_MODE_BIT(CONFIG_MODE_POP3) /* ... and mode pop3 */

/* One row per key: where it may appear, how its value is parsed, where it goes. */
struct config_key {
    const char *name;
    config_parse_fn parse;
    size_t offset; /* of an unsigned field in struct config or config_listener */
    enum config_section section;
    unsigned min; /* integers and durations: smallest value accepted */
    unsigned max; /* largest value accepted */
    unsigned flags;
    unsigned modes; /* CONFIG_MODE_BIT()s of the modes that own it; 0: every mode */
    const struct config_word *words; /* config_parse_enum: the accepted words */
};

static int config_parse_uint(struct config_parser *p, const struct config_key *k,
                             const char *value);
static int config_parse_duration(struct config_parser *p, const struct config_key *k,
                                 const char *value);
static int config_parse_log_format(struct config_parser *p, const struct config_key *k,
                                   const char *value);
static int config_parse_log_level(struct config_parser *p, const struct config_key *k,
                                  const char *value);
static int config_parse_mode(struct config_parser *p, const struct config_key *k,
                             const char *value);
static int config_parse_line_length(struct config_parser *p, const struct config_key *k,
                                    const char *value);
static int config_parse_listen(struct config_parser *p, const struct config_key *k,
                               const char *value);
static int config_parse_smuggling(struct config_parser *p, const struct config_key *k,
                                  const char *value);
static int config_parse_enum(struct config_parser *p, const struct config_key *k,
                             const char *value);
static int config_parse_path(struct config_parser *p, const struct config_key *k,
                             const char *value);
static int config_parse_cert(struct config_parser *p, const struct config_key *k,
                             const char *value);
static int config_parse_ciphers(struct config_parser *p, const struct config_key *k,
                                const char *value);
static int config_parse_transcript(struct config_parser *p, const struct config_key *k,
                                   const char *value);
static int config_parse_backend(struct config_parser *p, const struct config_key *k,
                                const char *value);
static int config_parse_cidrs(struct config_parser *p, const struct config_key *k,
                              const char *value);
static int config_parse_tls_keylog(struct config_parser *p, const struct config_key *k,
                                   const char *value);
static int config_parse_health(struct config_parser *p, const struct config_key *k,
                               const char *value);
static int config_parse_global_addr(struct config_parser *p, const struct config_key *k,
                                    const char *value);

#define CONFIG_G(field) offsetof(struct config, field)
#define CONFIG_L(field) offsetof(struct config_listener, field)

static const struct config_key config_keys[] = {
    {.name = "workers",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_uint,
     .offset = CONFIG_G(workers),
     .min = 1,
     .max = CONFIG_WORKERS_MAX},
    {.name = "log_format", .section = CONFIG_SECTION_GLOBAL, .parse = config_parse_log_format},
    {.name = "log_level", .section = CONFIG_SECTION_GLOBAL, .parse = config_parse_log_level},
    {.name = "drain_timeout",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_duration,
     .offset = CONFIG_G(drain_timeout_ms),
     .min = 0,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "drain_grace",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_duration,
     .offset = CONFIG_G(drain_grace_ms),
     .min = 0,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "resolver",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_global_addr,
     .offset = CONFIG_G(resolver)},
    {.name = "resolve_interval",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_duration,
     .offset = CONFIG_G(resolve_interval_ms),
     .min = 0,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "listen", .section = CONFIG_SECTION_LISTENER, .parse = config_parse_listen},
    {.name = "backend",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_backend,
     .flags = CONFIG_KEY_F_REPEAT},
    {.name = "mode", .section = CONFIG_SECTION_LISTENER, .parse = config_parse_mode},
    {.name = "connect_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(connect_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "idle_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(idle_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "greeting_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(greeting_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS,
     .modes = CONFIG_SMTP | CONFIG_IMAP | CONFIG_POP3},
    {.name = "max_connections",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(max_connections),
     .min = 0,
     .max = CONFIG_MAX_CONNECTIONS_MAX},
    {.name = "max_connections_per_client",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(max_per_client),
     .min = 0,
     .max = CONFIG_MAX_CONNECTIONS_MAX},
    {.name = "max_connection_rate_per_client",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(rate_per_client),
     .min = 0,
     .max = CLIMIT_RATE_MAX},
    {.name = "allow",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_cidrs,
     .flags = CONFIG_KEY_F_REPEAT},
    {.name = "deny",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_cidrs,
     .flags = CONFIG_KEY_F_REPEAT},
    {.name = "fail_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(fail_timeout_ms),
     .min = 0,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "health_check",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_health,
     .offset = CONFIG_L(health_check),
     .words = config_health_words},
    {.name = "health_interval",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(health_interval_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "health_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(health_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "health_rise",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(health_rise),
     .min = 1,
     .max = CONFIG_HEALTH_COUNT_MAX},
    {.name = "health_fall",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(health_fall),
     .min = 1,
     .max = CONFIG_HEALTH_COUNT_MAX},
    {.name = "balance",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(balance),
     .words = config_balance_words},
    {.name = "max_line_length",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_line_length,
     .offset = CONFIG_L(max_line_length),
     .min = CONFIG_LINE_LENGTH_MIN,
     .max = CONFIG_LINE_LENGTH_MAX,
     .modes = CONFIG_SMTP | CONFIG_IMAP | CONFIG_POP3},
    {.name = "transcript_clients",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_cidrs,
     .flags = CONFIG_KEY_F_REPEAT,
     .modes = CONFIG_SMTP | CONFIG_IMAP | CONFIG_POP3},
    {.name = "smuggling",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_smuggling,
     .modes = CONFIG_SMTP},
    {.name = "transcript",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_transcript,
     .modes = CONFIG_SMTP | CONFIG_IMAP | CONFIG_POP3},
    {.name = "admin",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_global_addr,
     .offset = CONFIG_G(admin)},
    {.name = "tls_keylog", .section = CONFIG_SECTION_GLOBAL, .parse = config_parse_tls_keylog},
    {.name = "admin_max_connections",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_uint,
     .offset = CONFIG_G(admin_max_connections),
     .min = 1,
     .max = CONFIG_ADMIN_CONNS_MAX},
    {.name = "admin_max_connections_per_peer",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_uint,
     .offset = CONFIG_G(admin_max_per_peer),
     .min = 1,
     .max = CONFIG_ADMIN_CONNS_MAX},
    {.name = "admin_header_timeout",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_duration,
     .offset = CONFIG_G(admin_header_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "recent_sessions",
     .section = CONFIG_SECTION_GLOBAL,
     .parse = config_parse_uint,
     .offset = CONFIG_G(recent_sessions),
     .min = 0,
     .max = CONFIG_RECENT_SESSIONS_MAX},
    {.name = "client_tls",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(client_tls),
     .words = config_client_tls_words,
     .flags = CONFIG_KEY_F_TLS},
    {.name = "cert",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_cert,
     .flags = CONFIG_KEY_F_REPEAT | CONFIG_KEY_F_TLS},
    {.name = "key",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_cert,
     .flags = CONFIG_KEY_F_REPEAT | CONFIG_KEY_F_TLS},
    {.name = "tls_min_version",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(tls_min_version),
     .words = config_tls_versions,
     .flags = CONFIG_KEY_F_TLS},
    {.name = "ciphers",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_ciphers,
     .offset = CONFIG_L(ciphers),
     .flags = CONFIG_KEY_F_TLS},
    {.name = "ciphersuites",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_ciphers,
     .offset = CONFIG_L(ciphersuites),
     .flags = CONFIG_KEY_F_TLS},
    {.name = "require_tls",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(require_tls),
     .words = config_onoff,
     .flags = CONFIG_KEY_F_TLS,
     .modes = CONFIG_SMTP | CONFIG_IMAP | CONFIG_POP3},
    {.name = "backend_tls",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(backend_tls),
     .words = config_backend_tls_words,
     .flags = CONFIG_KEY_F_TLS},
    {.name = "kernel_relay",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(kernel_relay),
     .words = config_kernel_relays},
    {.name = "backend_verify",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(backend_verify),
     .words = config_onoff,
     .flags = CONFIG_KEY_F_TLS},
    {.name = "backend_ca",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_path,
     .offset = CONFIG_L(backend_ca),
     .flags = CONFIG_KEY_F_TLS},
    {.name = "backend_sni",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_path,
     .offset = CONFIG_L(backend_sni),
     .flags = CONFIG_KEY_F_TLS},
    {.name = "transparent",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(transparent),
     .words = config_transparent_words},
    {.name = "mark",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_uint,
     .offset = CONFIG_L(mark),
     .min = 0,
     .max = UINT32_MAX},
    {.name = "source",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(source_client),
     .words = config_source_words},
    {.name = "proxy_protocol",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(proxy_protocol),
     .words = config_proxy_protocol_words},
    {.name = "accept_proxy_protocol",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(accept_proxy_protocol),
     .words = config_onoff},
    {.name = "proxy_protocol_timeout",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_duration,
     .offset = CONFIG_L(proxy_protocol_timeout_ms),
     .min = 1,
     .max = CONFIG_DURATION_MAX_MS},
    {.name = "xclient",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(xclient),
     .words = config_onoff,
     .modes = CONFIG_SMTP | CONFIG_POP3},
    {.name = "imap_id",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(imap_id),
     .words = config_onoff,
     .modes = CONFIG_IMAP},
    {.name = "pass_client_xclient",
     .section = CONFIG_SECTION_LISTENER,
     .parse = config_parse_enum,
     .offset = CONFIG_L(pass_client_xclient),
     .words = config_onoff,
     .modes = CONFIG_SMTP},
};

#define CONFIG_N_KEYS (sizeof(config_keys) / sizeof(config_keys[0]))
_Static_assert(CONFIG_N_KEYS <= sizeof(((struct config_parser *)0)->global_seen) * 8,
               "config_parser.*_seen hold one bit per key");
_Static_assert(CONFIG_N_KEYS <= CONFIG_MODE_KEYS_MAX, "config_listener.mode_keys fits every key");

/* Stores the first error only; later calls are ignored so the message always
 * names the earliest problem. */
__attribute__((format(printf, 4, 5))) static void config_fail(struct config_parser *p, int code,
                                                              int line, const char *fmt, ...)
{
    va_list ap;

    if (p->err_code != 0)
        return;
    p->err_code = code;
    p->err_line = line;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof(p->err), fmt, ap);
    va_end(ap);
}

static void config_fail_nomem(struct config_parser *p)
{
    config_fail(p, -ENOMEM, 0, "out of memory");
}

static void config_shared_put(struct config_listener_shared *s)
{
    if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    while (s->backends != NULL) {
        struct config_backend_state *b = s->backends;
        s->backends = b->next;
        free(b);
    }
    climit_table_free(atomic_load(&s->clients));
    free(s);
}

/* The state of the backend written text in s, made (at the list's end) on
 * first use. NULL when out of memory. Main thread only: workers reach the
 * entries through config_listener.backend_state, never through the list. */
static struct config_backend_state *config_backend_state_of(struct config_listener_shared *s,
                                                            const char *text)
{
    struct config_backend_state **at = &s->backends;

    for (; *at != NULL; at = &(*at)->next) {
        if (strcmp((*at)->text, text) == 0)
            return *at;
    }
    struct config_backend_state *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    snprintf(b->text, sizeof(b->text), "%s", text);
    atomic_init(&b->down, false);
    atomic_init(&b->active, 0);
    *at = b;
    return b;
}

/* Points l->backend_state at the entries of shared s for l's backends.
 * Returns 0, or -ENOMEM (l->backend_state is then unchanged). */
static int config_map_backend_state(struct config_listener *l, struct config_listener_shared *s)
{
    struct config_backend_state **map = calloc(l->n_backends > 0 ? l->n_backends : 1, sizeof(*map));

    if (map == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < l->n_backends; i++) {
        map[i] = config_backend_state_of(s, l->backends[i].text);
        if (map[i] == NULL) {
            free(map);
            return -ENOMEM;
        }
    }
    free(l->backend_state);
    l->backend_state = map;
    return 0;
}

static struct config_listener_shared *config_shared_new(void)
{
    struct config_listener_shared *s = malloc(sizeof(*s));

    if (s == NULL)
        return NULL;
    atomic_init(&s->refs, 1);
    atomic_init(&s->active, 0);
    s->backends = NULL;
    atomic_init(&s->clients, NULL);
    return s;
}

static void config_free(struct config *c)
{
    for (size_t i = 0; i < c->n_listeners; i++) {
        free(c->listeners[i].backends);
        free(c->listeners[i].backend_retry_at);
        free(c->listeners[i].backend_state);
        for (size_t j = 0; j < c->listeners[i].n_certs || j < c->listeners[i].n_keys; j++) {
            free(c->listeners[i].certs[j].cert);
            free(c->listeners[i].certs[j].key);
        }
        free(c->listeners[i].certs);
        tls_ctx_unref(c->listeners[i].tls_server);
        tls_ctx_unref(c->listeners[i].tls_client);
        free(c->listeners[i].backend_ca);
        free(c->listeners[i].backend_sni);
        free(c->listeners[i].ciphers);
        free(c->listeners[i].ciphersuites);
        free(c->listeners[i].allow);
        free(c->listeners[i].transcript_clients);
        free(c->listeners[i].deny);
        c->listeners[i].backends = NULL;
        config_shared_put(c->listeners[i].shared);
        c->listeners[i].shared = NULL;
    }
    free(c->listeners);
    c->listeners = NULL;
    free(c->tls_keylog);
    tls_keylog_unref(c->keylog);
    free(c->names);
    free(c->source);
    free(c->path);
    c->path = NULL;
    free(c);
}

static unsigned config_default_workers(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    if (n < 1)
        return 1;
    if (n > CONFIG_WORKERS_MAX)
        return CONFIG_WORKERS_MAX;
    return (unsigned)n;
}

static struct config *config_new(const char *path)
{
    struct config *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    c->path = strdup(path);
    if (c->path == NULL) {
        free(c);
        return NULL;
    }
    atomic_init(&c->refs, 1);
    c->workers = config_default_workers();
    c->log_format = CONFIG_LOG_LOGFMT;
    c->log_level = CONFIG_LOG_INFO;
    c->drain_timeout_ms = 30 * 1000;
    c->admin_max_connections = 64;
    c->admin_max_per_peer = 8;
    c->admin_header_timeout_ms = 3 * 1000;
    c->recent_sessions = 1000;
    c->drain_grace_ms = 10 * 1000;
    c->resolve_interval_ms = 10 * 1000;
    return c;
}

static struct config_listener *config_cur_listener(struct config_parser *p)
{
    return &p->cfg->listeners[p->listener];
}

/* "[global]" or "[listener NAME]", for messages about the current section. */
static const char *config_section_label(struct config_parser *p, char *buf, size_t len)
{
    if (p->section == CONFIG_SECTION_LISTENER)
        snprintf(buf, len, "[listener %s]", config_cur_listener(p)->name);
    else
        snprintf(buf, len, "[global]");
    return buf;
}

static bool config_is_blank(char c)
{
    return c == ' ' || c == '\t';
}

static bool config_is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static bool config_is_name_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || config_is_digit(c) || c == '_' ||
           c == '.' || c == '-';
}

/* ---- section headers ---- */

static void config_open_listener(struct config_parser *p, const char *name, size_t len)
{
    struct config *c = p->cfg;
    struct config_listener *grown;
    struct config_listener *l;
    bool valid = len > 0 && len < CONFIG_NAME_MAX;

    for (size_t i = 0; i < len; i++)
        valid = valid && config_is_name_char(name[i]);
    if (!valid) {
        config_fail(
            p, -EINVAL, p->lineno,
            "invalid listener name '%.*s': expected 1 to %d characters of A-Z a-z 0-9 _ . -",
            (int)len, name, CONFIG_NAME_MAX - 1);
        return;
    }
    for (size_t i = 0; i < c->n_listeners; i++) {
        if (strlen(c->listeners[i].name) == len && memcmp(c->listeners[i].name, name, len) == 0) {
            config_fail(p, -EINVAL, p->lineno,
                        "duplicate listener name '%s' (first defined at line %d)",
                        c->listeners[i].name, c->listeners[i].line);
            return;
        }
    }
    grown = realloc(c->listeners, (c->n_listeners + 1) * sizeof(*c->listeners));
    if (grown == NULL) {
        config_fail_nomem(p);
        return;
    }
    c->listeners = grown;
    l = &c->listeners[c->n_listeners];
    *l = (struct config_listener){
        .line = p->lineno,
        .mode = CONFIG_MODE_TCP,
        .connect_timeout_ms = 5 * 1000,
        .idle_timeout_ms = 300 * 1000,
        .greeting_timeout_ms = 30 * 1000,
        .max_connections = 0,
        .fail_timeout_ms = 10 * 1000,
        .health_interval_ms = 5 * 1000,
        .health_timeout_ms = 2 * 1000,
        .health_rise = 2,
        .health_fall = 3,
        .max_line_length = 4096,
        .smuggling = CONFIG_SMUGGLING_REJECT,
        .transcript = CONFIG_TRANSCRIPT_PAIRS,
        .backend_verify = 1,
        .proxy_protocol_timeout_ms = 5 * 1000,
        .kernel_relay = CONFIG_KERNEL_RELAY_DEFAULT,
    };
    memcpy(l->name, name, len);
    l->name[len] = '\0';
    l->shared = config_shared_new();
    if (l->shared == NULL) {
        config_fail_nomem(p);
        return;
    }
    p->listener = c->n_listeners++;
    memset(p->listener_seen, 0, sizeof(p->listener_seen));
    p->section = CONFIG_SECTION_LISTENER;
}

/* line starts with '[' and has no leading blanks. */
static void config_open_section(struct config_parser *p, const char *line)
{
    const char *close = strchr(line, ']');
    const char *start = line + 1;
    const char *end;
    const char *rest;
    size_t len;

    p->section = CONFIG_SECTION_BAD;
    if (close == NULL) {
        config_fail(p, -EINVAL, p->lineno, "syntax error");
        return;
    }
    for (rest = close + 1; config_is_blank(*rest); rest++)
        ;
    if (*rest != '\0' && *rest != ';' && *rest != '#') {
        config_fail(p, -EINVAL, p->lineno, "unexpected text after ']': '%s'", rest);
        return;
    }
    while (start < close && config_is_blank(*start))
        start++;
    for (end = close; end > start && config_is_blank(end[-1]); end--)
        ;
    len = (size_t)(end - start);

    if (len == 6 && memcmp(start, "global", 6) == 0) {
        p->section = CONFIG_SECTION_GLOBAL;
        return;
    }
    if (len >= 8 && memcmp(start, "listener", 8) == 0 && (len == 8 || config_is_blank(start[8]))) {
        const char *name = start + 8;

        while (name < end && config_is_blank(*name))
            name++;
        if (name == end) {
            config_fail(p, -EINVAL, p->lineno,
                        "section [listener] needs a name: expected [listener NAME]");
            return;
        }
        config_open_listener(p, name, (size_t)(end - name));
        return;
    }
    config_fail(p, -EINVAL, p->lineno, "unknown section [%.*s]", (int)len, start);
}

/* inih's ini_reader: copies the next line into buf (at most size - 1 bytes)
 * without its leading blanks and line terminator, and tracks the section.
 * Returns NULL at the end of the text or once an error is stored, which
 * makes inih stop: nothing after the first error is worth parsing. */
static char *config_read_line(char *buf, int size, void *stream)
{
    struct config_parser *p = stream;
    const char *line = p->next;
    size_t len;

    if (p->err_code != 0 || *line == '\0' || size < 2)
        return NULL;
    len = strcspn(line, "\n");
    p->next = line + len + (line[len] == '\n');
    p->lineno++;
    if (p->lineno == 1 && len >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) {
        line += 3;
        len -= 3;
    }
    while (len > 0 && config_is_blank(*line)) {
        line++;
        len--;
    }
    while (len > 0 && (config_is_blank(line[len - 1]) || line[len - 1] == '\r'))
        len--;
    if (len > (size_t)size - 1) {
        config_fail(p, -EINVAL, p->lineno, "line longer than %d characters", size - 1);
        len = 0;
    }
    memcpy(buf, line, len);
    buf[len] = '\0';
    if (buf[0] == '[')
        config_open_section(p, buf);
    return buf;
}

/* ---- values ---- */

static unsigned *config_field(struct config_parser *p, const struct config_key *k)
{
    char *obj =
        k->section == CONFIG_SECTION_GLOBAL ? (char *)p->cfg : (char *)config_cur_listener(p);

    return (unsigned *)(void *)(obj + k->offset);
}

/* Accepts decimal digits only: no sign, no blanks, no base prefix. Returns 0
 * and stores the number, or -1 if value is not one or exceeds max. */
static int config_strtou(const char *value, unsigned max, unsigned *out)
{
    uint64_t n = 0;

    if (*value == '\0')
        return -1;
    for (const char *s = value; *s != '\0'; s++) {
        if (!config_is_digit(*s))
            return -1;
        n = n * 10 + (uint64_t)(*s - '0');
        if (n > max)
            return -1;
    }
    *out = (unsigned)n;
    return 0;
}

static int config_parse_uint(struct config_parser *p, const struct config_key *k, const char *value)
{
    unsigned n;

    if (config_strtou(value, k->max, &n) != 0 || n < k->min) {
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for '%s': expected an integer from %u to %u", value,
                    k->name, k->min, k->max);
        return -1;
    }
    *config_field(p, k) = n;
    return 0;
}

enum config_duration_err {
    CONFIG_DURATION_OK = 0,
    CONFIG_DURATION_SYNTAX, /* not NUMBER[ms|s|m|h] */
    CONFIG_DURATION_FINE,   /* not a whole number of milliseconds */
    CONFIG_DURATION_RANGE,  /* above CONFIG_DURATION_MAX_MS */
};

/* "5", "0.5", "250ms", "2m", "1h": a decimal number and an optional unit,
 * seconds when there is none. Exact integer arithmetic, no strtod. */
static enum config_duration_err config_strtoms(const char *s, unsigned *out)
{
    static const struct {
        const char *suffix;
        uint64_t ms;
    } units[] = {{"", 1000}, {"ms", 1}, {"s", 1000}, {"m", 60 * 1000}, {"h", 3600 * 1000}};
    uint64_t whole = 0, frac = 0, scale = 1, mult = 0, ms;
    const char *digits = s;
    bool big = false, fine = false;

    for (; config_is_digit(*s); s++) {
        whole = whole * 10 + (uint64_t)(*s - '0');
        if (whole > CONFIG_DURATION_MAX_MS) {
            whole = CONFIG_DURATION_MAX_MS;
            big = true;
        }
    }
    if (s == digits)
        return CONFIG_DURATION_SYNTAX;
    if (*s == '.') {
        digits = ++s;
        for (; config_is_digit(*s); s++) {
            /* A non-zero eleventh fraction digit is finer than 1 ms in any
             * unit (1 h = 2^7 * 3^2 * 5^5 ms), so ten digits are enough. */
            if (scale < UINT64_C(10000000000)) {
                frac = frac * 10 + (uint64_t)(*s - '0');
                scale *= 10;
            } else if (*s != '0') {
                fine = true;
            }
        }
        if (s == digits)
            return CONFIG_DURATION_SYNTAX;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(s, units[i].suffix) == 0) {
            mult = units[i].ms;
            break;
        }
    }
    if (mult == 0)
        return CONFIG_DURATION_SYNTAX;
    if (big)
        return CONFIG_DURATION_RANGE;
    if (fine || (frac * mult) % scale != 0)
        return CONFIG_DURATION_FINE;
    ms = whole * mult + frac * mult / scale;
    if (ms > CONFIG_DURATION_MAX_MS)
        return CONFIG_DURATION_RANGE;
    *out = (unsigned)ms;
    return CONFIG_DURATION_OK;
}

static int config_parse_duration(struct config_parser *p, const struct config_key *k,
                                 const char *value)
{
    unsigned ms = 0;

    switch (config_strtoms(value, &ms)) {
    case CONFIG_DURATION_OK:
        break;
    case CONFIG_DURATION_SYNTAX:
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for '%s': expected a duration such as 30s, 250ms, 2m or 1h",
                    value, k->name);
        return -1;
    case CONFIG_DURATION_FINE:
        config_fail(p, -EINVAL, p->lineno, "invalid value '%s' for '%s': finer than a millisecond",
                    value, k->name);
        return -1;
    case CONFIG_DURATION_RANGE:
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for '%s': longer than %ums (about 24 days)", value, k->name,
                    (unsigned)CONFIG_DURATION_MAX_MS);
        return -1;
    default:
        abort();
    }
    if (ms < k->min) {
        config_fail(p, -EINVAL, p->lineno, "invalid value '%s' for '%s': must be more than 0",
                    value, k->name);
        return -1;
    }
    *config_field(p, k) = ms;
    return 0;
}

/* Looks value up in words; on failure stores a message listing them all. */
static int config_parse_word(struct config_parser *p, const struct config_key *k, const char *value,
                             const struct config_word *words, int *out)
{
    char expected[128] = "";
    size_t n = 0, used = 0;

    for (const struct config_word *w = words; w->name != NULL; w++) {
        if (strcmp(w->name, value) == 0) {
            *out = w->value;
            return 0;
        }
        n++;
    }
    for (size_t i = 0; i < n && used < sizeof(expected); i++) {
        const char *sep = i == 0 ? "" : i + 1 == n ? " or " : ", ";
        int r = snprintf(expected + used, sizeof(expected) - used, "%s%s", sep, words[i].name);

        if (r < 0)
            break;
        used += (size_t)r;
    }
    config_fail(p, -EINVAL, p->lineno, "invalid value '%s' for '%s': expected %s", value, k->name,
                expected);
    return -1;
}

static int config_parse_log_format(struct config_parser *p, const struct config_key *k,
                                   const char *value)
{
    int v;

    if (config_parse_word(p, k, value, config_log_formats, &v) != 0)
        return -1;
    p->cfg->log_format = (enum config_log_format)v;
    return 0;
}

static int config_parse_log_level(struct config_parser *p, const struct config_key *k,
                                  const char *value)
{
    int v;

    if (config_parse_word(p, k, value, config_log_levels, &v) != 0)
        return -1;
    p->cfg->log_level = (enum config_log_level)v;
    return 0;
}

/* Was the listener key name given in the current section so far? */
static bool config_listener_key_seen(const struct config_parser *p, const char *name)
{
    for (size_t row = 0; row < sizeof(config_keys) / sizeof(config_keys[0]); row++)
        if (config_keys[row].section == CONFIG_SECTION_LISTENER &&
            strcmp(config_keys[row].name, name) == 0)
            return (p->listener_seen[row / 64] & (UINT64_C(1) << (row % 64))) != 0;
    return false;
}

static int config_parse_mode(struct config_parser *p, const struct config_key *k, const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    int v;

    if (config_parse_word(p, k, value, config_modes, &v) != 0)
        return -1;
    l->mode = (enum config_mode)v;
    if (l->mode == CONFIG_MODE_IMAP) {
        /* Mode imap's own defaults, unless the file gave the keys before the mode. */
        if (!config_listener_key_seen(p, "idle_timeout"))
            l->idle_timeout_ms = CONFIG_IMAP_IDLE_TIMEOUT_MS;
        if (!config_listener_key_seen(p, "max_line_length"))
            l->max_line_length = CONFIG_IMAP_LINE_LENGTH;
    }
    return 0;
}

/* max_line_length: 512 to 12288 (RFC 4954's AUTH line), or up to 1 MiB in mode imap, where
 * literals do not count; before any mode line it may be either (checked again at the end). */
static int config_parse_line_length(struct config_parser *p, const struct config_key *k,
                                    const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    bool imap = l->mode == CONFIG_MODE_IMAP || !config_listener_key_seen(p, "mode");
    unsigned max = imap ? CONFIG_IMAP_LINE_LENGTH_MAX : k->max;
    unsigned n;

    if (config_strtou(value, max, &n) != 0 || n < k->min) {
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for '%s': expected an integer from %u to %u", value,
                    k->name, k->min, max);
        return -1;
    }
    l->max_line_length = n;
    return 0;
}

static int config_parse_smuggling(struct config_parser *p, const struct config_key *k,
                                  const char *value)
{
    int v;

    if (config_parse_word(p, k, value, config_smugglings, &v) != 0)
        return -1;
    config_cur_listener(p)->smuggling = (enum config_smuggling)v;
    return 0;
}

static int config_parse_transcript(struct config_parser *p, const struct config_key *k,
                                   const char *value)
{
    int v;

    if (config_parse_word(p, k, value, config_transcripts, &v) != 0)
        return -1;
    config_cur_listener(p)->transcript = (enum config_transcript)v;
    return 0;
}

static int config_parse_enum(struct config_parser *p, const struct config_key *k, const char *value)
{
    int v;

    if (config_parse_word(p, k, value, k->words, &v) != 0)
        return -1;
    *config_field(p, k) = (unsigned)v;
    return 0;
}

/* health_check: its line is kept for the checks that need the whole section. */
static int config_parse_health(struct config_parser *p, const struct config_key *k,
                               const char *value)
{
    if (config_parse_enum(p, k, value) != 0)
        return -1;
    config_cur_listener(p)->health_line = p->lineno;
    return 0;
}

/* A file name or host name, kept as given. */
static int config_parse_path(struct config_parser *p, const struct config_key *k, const char *value)
{
    char **field = (char **)(void *)((char *)config_cur_listener(p) + k->offset);

    free(*field);
    if (k->offset == CONFIG_L(backend_ca))
        config_cur_listener(p)->backend_ca_line = p->lineno;
    *field = strdup(value);
    if (*field == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    return 0;
}

/* "ciphers" / "ciphersuites": an OpenSSL cipher string, kept as given with
 * its line; tls_ctx_set_ciphers() checks it once the certificates load. */
static int config_parse_ciphers(struct config_parser *p, const struct config_key *k,
                                const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    bool suites = k->offset == CONFIG_L(ciphersuites);
    char **field = suites ? &l->ciphersuites : &l->ciphers;

    free(*field);
    *field = strdup(value);
    if (*field == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    *(suites ? &l->ciphersuites_line : &l->ciphers_line) = p->lineno;
    return 0;
}

/* "cert" and "key" lines pair up in order: the n-th key belongs to the n-th
 * certificate. */
static int config_parse_cert(struct config_parser *p, const struct config_key *k, const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    bool is_cert = strcmp(k->name, "cert") == 0;
    size_t *count = is_cert ? &l->n_certs : &l->n_keys;
    size_t other = is_cert ? l->n_keys : l->n_certs;

    if (*count >= CONFIG_CERTS_MAX) {
        config_fail(p, -EINVAL, p->lineno, "more than %d '%s' lines in [listener %s]",
                    CONFIG_CERTS_MAX, k->name, l->name);
        return -1;
    }
    if (*count >= other) {
        struct config_cert *grown = realloc(l->certs, (*count + 1) * sizeof(*grown));
        if (grown == NULL) {
            config_fail_nomem(p);
            return -1;
        }
        l->certs = grown;
        l->certs[*count] = (struct config_cert){.line = p->lineno};
    }
    char *copy = strdup(value);
    if (copy == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    if (is_cert) {
        l->certs[*count].cert = copy;
        l->certs[*count].line = p->lineno;
    } else {
        l->certs[*count].key = copy;
        l->certs[*count].key_line = p->lineno;
    }
    (*count)++;
    return 0;
}

/* Fills addr->text from addr->sa. */
static void config_addr_format(struct config_addr *addr)
{
    sockaddr_format((const struct sockaddr *)&addr->sa, addr->text, sizeof(addr->text));
}

/* Stores a numeric address; host is the text inside the brackets for IPv6. */
static int config_addr_numeric(struct config_addr *addr, const char *host, bool v6, unsigned port)
{
    memset(addr, 0, sizeof(*addr));
    if (v6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&addr->sa;

        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            return -1;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        addr->salen = sizeof(*sin6);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&addr->sa;

        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            return -1;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        addr->salen = sizeof(*sin);
    }
    config_addr_format(addr);
    return 0;
}

enum config_hostport_err {
    CONFIG_HOSTPORT_OK = 0,
    CONFIG_HOSTPORT_FORM, /* not HOST:PORT or [HOST]:PORT */
    CONFIG_HOSTPORT_PORT, /* a port, but not 1..65535 */
};

/* Splits "host:port" or "[v6]:port" held in s (modified in place). On
 * success *host points into s and *bracketed says which form it was; on
 * CONFIG_HOSTPORT_PORT *host is the port text, for the message. */
static enum config_hostport_err config_split_hostport(char *s, char **host, bool *bracketed,
                                                      unsigned *port)
{
    char *colon;

    if (s[0] == '[') {
        char *close = strchr(s, ']');

        if (close == NULL || close[1] != ':')
            return CONFIG_HOSTPORT_FORM;
        *close = '\0';
        colon = close + 1;
        *host = s + 1;
        *bracketed = true;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL)
            return CONFIG_HOSTPORT_FORM;
        *colon = '\0';
        *host = s;
        *bracketed = false;
        if (strchr(s, ':') != NULL) /* IPv6 without brackets: where is the port? */
            return CONFIG_HOSTPORT_FORM;
    }
    if (**host == '\0' || colon[1] == '\0')
        return CONFIG_HOSTPORT_FORM;
    if (config_strtou(colon + 1, 65535, port) != 0 || *port == 0) {
        *host = colon + 1;
        return CONFIG_HOSTPORT_PORT;
    }
    return CONFIG_HOSTPORT_OK;
}

/* A numeric "IPv4:port" or "[IPv6]:port" into *addr, or a FILE:LINE error. */
static int config_parse_numeric_addr(struct config_parser *p, const struct config_key *k,
                                     const char *value, struct config_addr *addr)
{
    char buf[CONFIG_ADDR_TEXT_MAX];
    char *host;
    bool v6;
    unsigned port;
    enum config_hostport_err e = CONFIG_HOSTPORT_FORM;

    if (strlen(value) < sizeof(buf)) {
        memcpy(buf, value, strlen(value) + 1);
        e = config_split_hostport(buf, &host, &v6, &port);
    }
    if (e == CONFIG_HOSTPORT_PORT) {
        config_fail(p, -EINVAL, p->lineno, "invalid port '%s' in '%s'", host, k->name);
        return -1;
    }
    if (e != CONFIG_HOSTPORT_OK || config_addr_numeric(addr, host, v6, port) != 0) {
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for '%s': expected IPv4:port or [IPv6]:port", value,
                    k->name);
        return -1;
    }
    return 0;
}

static int config_parse_listen(struct config_parser *p, const struct config_key *k,
                               const char *value)
{
    return config_parse_numeric_addr(p, k, value, &config_cur_listener(p)->listen);
}

/* "tls_keylog": a path, opened once the whole file is read (config_alloc_runtime). */
static int config_parse_tls_keylog(struct config_parser *p, const struct config_key *k,
                                   const char *value)
{
    (void)k;
    if (value[0] == '\0') {
        config_fail(p, -EINVAL, p->lineno, "tls_keylog: expected a file name");
        return -1;
    }
    free(p->cfg->tls_keylog);
    p->cfg->tls_keylog = strdup(value);
    if (p->cfg->tls_keylog == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    p->cfg->tls_keylog_line = p->lineno;
    return 0;
}

/* "admin", "resolver": a numeric address in [global], stored at k->offset. */
static int config_parse_global_addr(struct config_parser *p, const struct config_key *k,
                                    const char *value)
{
    return config_parse_numeric_addr(p, k, value,
                                     (struct config_addr *)((char *)p->cfg + k->offset));
}

/* The index of host in cfg->names, added when new; -1 when out of memory. */
static long config_name_index(struct config_parser *p, const char *host)
{
    struct config *c = p->cfg;
    struct config_name *grown;

    for (size_t i = 0; i < c->n_names; i++)
        if (strcasecmp(c->names[i].host, host) == 0)
            return (long)i;
    grown = realloc(c->names, (c->n_names + 1) * sizeof(*c->names));
    if (grown == NULL)
        return -1;
    c->names = grown;
    memset(&c->names[c->n_names], 0, sizeof(c->names[0]));
    snprintf(c->names[c->n_names].host, sizeof(c->names[0].host), "%s", host);
    c->names[c->n_names].line = p->lineno;
    return (long)c->n_names++;
}

/* A backend host without brackets: a dotted quad, or a plausible DNS name,
 * resolved once the whole file is read (config_expand_names) to every address
 * it has; until then addr is a placeholder. Returns 0, or -1 with the error stored. */
static int config_backend_host(struct config_parser *p, struct config_addr *addr, const char *entry,
                               const char *host, unsigned port)
{
    struct config_listener *l = config_cur_listener(p);
    struct config_pending *grown;
    size_t len = strlen(host);
    bool dotted = true;
    bool name = len <= CONFIG_HOST_MAX;
    long idx;

    for (const char *s = host; *s != '\0'; s++) {
        dotted = dotted && (config_is_digit(*s) || *s == '.');
        name = name && config_is_name_char(*s);
    }
    /* getaddrinfo() would take "127.1" as 127.0.0.1; an address must be whole. */
    if (dotted || !name) {
        if (dotted && config_addr_numeric(addr, host, false, port) == 0)
            return 0;
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for 'backend': expected host:port or [IPv6]:port", entry);
        return -1;
    }
    idx = config_name_index(p, host);
    grown = idx < 0 ? NULL : realloc(p->pending, (p->n_pending + 1) * sizeof(*p->pending));
    if (grown == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    p->pending = grown;
    p->pending[p->n_pending++] = (struct config_pending){
        .listener = p->listener,
        .index = (size_t)(addr - l->backends),
        .name = (size_t)idx,
        .port = port,
        .line = p->lineno,
    };
    memset(addr, 0, sizeof(*addr));
    return 0;
}

/* A name's addresses: the pinned answer when a rebuild brought one, else DNS now. */
static int config_resolve_name(struct config_parser *p, struct config_name *n)
{
    char why[RESOLVE_ERR_MAX];
    const struct config *c = p->cfg;

    for (size_t i = 0; i < p->n_pinned; i++) {
        if (strcasecmp(p->pinned[i].host, n->host) == 0 && p->pinned[i].addrs.n > 0) {
            n->addrs = p->pinned[i].addrs;
            return 0;
        }
    }
    if (resolve_host(config_addr_given(&c->resolver) ? c->resolver.text : NULL, n->host,
                     CONFIG_RESOLVE_TIMEOUT_MS, &n->addrs, why, sizeof(why)) != 0) {
        config_fail(p, -EINVAL, n->line, "cannot resolve '%s': %s", n->host, why);
        return -1;
    }
    return 0;
}

/* Replaces every name placeholder by one backend per address of the name, in
 * place, so file order holds ("balance = first"). */
static void config_expand_names(struct config_parser *p)
{
    struct config *c = p->cfg;

    for (size_t i = 0; i < c->n_names; i++)
        if (config_resolve_name(p, &c->names[i]) != 0)
            return;
    for (size_t li = 0; li < c->n_listeners; li++) {
        struct config_listener *l = &c->listeners[li];
        struct config_addr *out = NULL;
        size_t n = 0;
        bool named = false;

        for (size_t e = 0; e < p->n_pending; e++)
            named = named || p->pending[e].listener == li;
        if (!named)
            continue;
        out = calloc(CONFIG_BACKENDS_MAX, sizeof(*out));
        if (out == NULL) {
            config_fail_nomem(p);
            return;
        }
        const struct config_pending *last = NULL; /* the last name entry: it is to blame */
        for (size_t b = 0; b < l->n_backends; b++) {
            const struct config_pending *e = NULL;

            for (size_t i = 0; i < p->n_pending && e == NULL; i++)
                if (p->pending[i].listener == li && p->pending[i].index == b)
                    e = &p->pending[i];
            if (e == NULL) {
                if (n < CONFIG_BACKENDS_MAX)
                    out[n] = l->backends[b];
                n++;
                continue;
            }
            const struct config_name *name = &c->names[e->name];
            for (size_t a = 0; a < name->addrs.n; a++, n++) {
                if (n >= CONFIG_BACKENDS_MAX)
                    continue;
                out[n].salen = resolve_ip_sockaddr(&name->addrs.ip[a], e->port, &out[n].sa);
                config_addr_format(&out[n]);
            }
            last = e;
        }
        /* Counted whole, whichever entries come after the names. */
        if (n > CONFIG_BACKENDS_MAX) {
            const struct config_name *name = &c->names[last->name];
            free(out);
            config_fail(p, -EINVAL, last->line,
                        "'%s' resolves to %zu addresses: %zu backends in [listener %s], more "
                        "than %d",
                        name->host, name->addrs.n, n, l->name, CONFIG_BACKENDS_MAX);
            return;
        }
        free(l->backends);
        l->backends = out;
        l->n_backends = n;
    }
}

static int config_backend_entry(struct config_parser *p, struct config_addr *addr,
                                const char *entry, size_t len)
{
    char buf[CONFIG_HOST_MAX + 16];
    char shown[CONFIG_HOST_MAX + 16];
    char *host;
    bool v6;
    unsigned port;
    enum config_hostport_err e = CONFIG_HOSTPORT_FORM;

    snprintf(shown, sizeof(shown), "%.*s", (int)len, entry);
    if (len < sizeof(buf)) {
        memcpy(buf, entry, len);
        buf[len] = '\0';
        e = config_split_hostport(buf, &host, &v6, &port);
    }
    if (e == CONFIG_HOSTPORT_PORT) {
        config_fail(p, -EINVAL, p->lineno, "invalid port '%s' in 'backend'", host);
        return -1;
    }
    if (e == CONFIG_HOSTPORT_OK && v6) {
        if (config_addr_numeric(addr, host, true, port) == 0)
            return 0;
        e = CONFIG_HOSTPORT_FORM;
    }
    if (e != CONFIG_HOSTPORT_OK) {
        config_fail(p, -EINVAL, p->lineno,
                    "invalid value '%s' for 'backend': expected host:port or [IPv6]:port", shown);
        return -1;
    }
    return config_backend_host(p, addr, shown, host, port);
}

/* "a:1, b:2": appends every entry, so a long list may be spread over
 * several backend lines (inih caps a line at 199 bytes). */
static int config_parse_backend(struct config_parser *p, const struct config_key *k,
                                const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    struct config_addr *grown;
    size_t n = 1;
    const char *s = value;

    if (strcmp(value, "original_dst") == 0) {
        if (l->n_backends > 0) {
            config_fail(p, -EINVAL, p->lineno,
                        "'backend = original_dst' cannot be mixed with addresses");
            return -1;
        }
        l->backend_original_dst = true;
        return 0;
    }
    if (l->backend_original_dst) {
        config_fail(p, -EINVAL, p->lineno,
                    "'backend = original_dst' cannot be mixed with addresses");
        return -1;
    }

    for (const char *c = value; *c != '\0'; c++)
        n += *c == ',';
    if (l->n_backends + n > CONFIG_BACKENDS_MAX) {
        config_fail(p, -EINVAL, p->lineno, "more than %d entries in '%s' of [listener %s]",
                    CONFIG_BACKENDS_MAX, k->name, l->name);
        return -1;
    }
    grown = realloc(l->backends, (l->n_backends + n) * sizeof(*l->backends));
    if (grown == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    l->backends = grown;
    for (size_t i = 0; i < n; i++) {
        size_t len = strcspn(s, ",");
        size_t end = len;

        while (config_is_blank(*s)) {
            s++;
            len--;
            end--;
        }
        while (end > 0 && config_is_blank(s[end - 1]))
            end--;
        if (end == 0) {
            config_fail(p, -EINVAL, p->lineno, "invalid value '%s' for '%s': empty entry", value,
                        k->name);
            return -1;
        }
        if (config_backend_entry(p, &l->backends[l->n_backends], s, end) != 0)
            return -1;
        l->n_backends++;
        s += len + (s[len] == ',');
    }
    return 0;
}

/* "allow" / "deny" / "transcript_clients": "10.0.0.0/8, 2001:db8::/32"; lines add up, like
 * backend. */
static int config_parse_cidrs(struct config_parser *p, const struct config_key *k,
                              const char *value)
{
    struct config_listener *l = config_cur_listener(p);
    bool allow = strcmp(k->name, "allow") == 0;
    bool full = strcmp(k->name, "transcript_clients") == 0;
    struct cidr **list = full ? &l->transcript_clients : allow ? &l->allow : &l->deny;
    size_t *count = full ? &l->n_transcript_clients : allow ? &l->n_allow : &l->n_deny;
    struct cidr *grown;
    size_t n = 1;
    const char *s = value;

    for (const char *c = value; *c != '\0'; c++)
        n += *c == ',';
    if (*count + n > CONFIG_CIDRS_MAX) {
        config_fail(p, -EINVAL, p->lineno, "more than %d entries in '%s' of [listener %s]",
                    CONFIG_CIDRS_MAX, k->name, l->name);
        return -1;
    }
    grown = realloc(*list, (*count + n) * sizeof(**list));
    if (grown == NULL) {
        config_fail_nomem(p);
        return -1;
    }
    *list = grown;
    for (size_t i = 0; i < n; i++) {
        size_t len = strcspn(s, ",");
        size_t start = 0;
        size_t end = len;

        while (start < end && config_is_blank(s[start]))
            start++;
        while (end > start && config_is_blank(s[end - 1]))
            end--;
        enum cidr_err e = cidr_parse(s + start, end - start, &grown[*count]);
        if (e != CIDR_OK) {
            config_fail(p, -EINVAL, p->lineno, "invalid value '%.*s' for '%s': %s",
                        (int)(end - start), s + start, k->name, cidr_strerror(e));
            return -1;
        }
        (*count)++;
        s += len + (s[len] == ',');
    }
    return 0;
}

/* inih's handler: one name = value line. Returns 1 to go on, 0 on error. */
static int config_on_key(void *user, const char *section, const char *name, const char *value)
{
    struct config_parser *p = user;
    const struct config_key *k = NULL;
    uint64_t *seen;
    uint64_t bit;
    char label[CONFIG_NAME_MAX + 16];

    (void)section; /* config_read_line() tracks sections, with their lines */
    if (p->err_code != 0 || p->section == CONFIG_SECTION_BAD)
        return 0;
    if (p->section == CONFIG_SECTION_NONE) {
        config_fail(p, -EINVAL, p->lineno, "key '%s' outside a section", name);
        return 0;
    }
    for (size_t i = 0; i < sizeof(config_keys) / sizeof(config_keys[0]); i++) {
        if (config_keys[i].section == p->section && strcmp(config_keys[i].name, name) == 0) {
            k = &config_keys[i];
            break;
        }
    }
    if (k == NULL) {
        config_fail(p, -EINVAL, p->lineno, "unknown key '%s' in %s", name,
                    config_section_label(p, label, sizeof(label)));
        return 0;
    }
    size_t row = (size_t)(k - config_keys);
    seen = (p->section == CONFIG_SECTION_GLOBAL ? p->global_seen : p->listener_seen) + row / 64;
    bit = UINT64_C(1) << (row % 64);
    if ((*seen & bit) != 0 && (k->flags & CONFIG_KEY_F_REPEAT) == 0) {
        config_fail(p, -EINVAL, p->lineno, "duplicate key '%s' in %s", name,
                    config_section_label(p, label, sizeof(label)));
        return 0;
    }
    if (*value == '\0') {
        config_fail(p, -EINVAL, p->lineno, "empty value for '%s'", name);
        return 0;
    }
    if ((k->flags & CONFIG_KEY_F_TLS) && config_cur_listener(p)->tls_line == 0)
        config_cur_listener(p)->tls_line = p->lineno;
    if (k->modes != 0 && (*seen & bit) == 0) {
        struct config_listener *l = config_cur_listener(p); /* checked against mode at the end */
        l->mode_keys.row[l->mode_keys.n] = (unsigned short)row;
        l->mode_keys.line[l->mode_keys.n++] = p->lineno;
    }
    *seen |= bit;
    return k->parse(p, k, value) == 0;
}

/* ---- after the last line ---- */

/* Every mode-bound key l was given must be owned by l's mode: the first one
 * that is not fails with "'KEY' needs mode = M[, M...][ or M] in [listener L]". */
static int config_check_mode_keys(struct config_parser *p, const struct config_listener *l)
{
    for (unsigned i = 0; i < l->mode_keys.n; i++) {
        const struct config_key *k = &config_keys[l->mode_keys.row[i]];
        char modes[64] = "";
        size_t n = 0;
        unsigned left = 0;

        if (k->modes & CONFIG_MODE_BIT(l->mode))
            continue;
        for (const struct config_word *w = config_modes; w->name != NULL; w++)
            left += (k->modes & CONFIG_MODE_BIT(w->value)) != 0;
        /* "a", "a or b", "a, b or c" */
        for (const struct config_word *w = config_modes; w->name != NULL; w++) {
            if ((k->modes & CONFIG_MODE_BIT(w->value)) == 0)
                continue;
            const char *sep = --left > 1 ? ", " : " or ";
            n += (size_t)snprintf(modes + n, n < sizeof(modes) ? sizeof(modes) - n : 0, "%s%s",
                                  w->name, left > 0 ? sep : "");
        }
        config_fail(p, -EINVAL, l->mode_keys.line[i], "'%s' needs mode = %s in [listener %s]",
                    k->name, modes, l->name);
        return -EINVAL;
    }
    return 0;
}

/* A max_line_length over 12288 given before "mode = imap" was taken on trust; any other
 * mode refuses it as the key itself would have. */
static int config_check_line_length(struct config_parser *p, const struct config_listener *l)
{
    if (l->mode == CONFIG_MODE_IMAP || l->max_line_length <= CONFIG_LINE_LENGTH_MAX)
        return 0;
    for (unsigned i = 0; i < l->mode_keys.n; i++) {
        const struct config_key *k = &config_keys[l->mode_keys.row[i]];
        if (strcmp(k->name, "max_line_length") != 0)
            continue;
        config_fail(p, -EINVAL, l->mode_keys.line[i],
                    "invalid value '%u' for '%s': expected an integer from %u to %u",
                    l->max_line_length, k->name, k->min, k->max);
        return -EINVAL;
    }
    return 0;
}

static bool config_addr_is_any(const struct config_addr *a)
{
    if (a->sa.ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&a->sa;

        return IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr);
    }
    return ((const struct sockaddr_in *)&a->sa)->sin_addr.s_addr == htonl(INADDR_ANY);
}

static bool config_addr_equal(const struct config_addr *a, const struct config_addr *b)
{
    return sockaddr_equal((const struct sockaddr *)&a->sa, (const struct sockaddr *)&b->sa);
}

static bool config_addr_overlaps(const struct config_addr *a, const struct config_addr *b)
{
    if (a->sa.ss_family != b->sa.ss_family)
        return false;
    if (a->sa.ss_family == AF_INET6) {
        if (((const struct sockaddr_in6 *)&a->sa)->sin6_port !=
            ((const struct sockaddr_in6 *)&b->sa)->sin6_port)
            return false;
    } else if (((const struct sockaddr_in *)&a->sa)->sin_port !=
               ((const struct sockaddr_in *)&b->sa)->sin_port) {
        return false;
    }
    return config_addr_is_any(a) || config_addr_is_any(b);
}

/* health_check against the rest of the section: what a check can speak. */
static int config_check_health(struct config_parser *p, const struct config_listener *l)
{
    const char *name = config_health_check_name((enum config_health_check)l->health_check);
    int line = l->health_line;

    if (l->health_check == CONFIG_HEALTH_OFF)
        return 0;
    if (l->backend_original_dst) {
        config_fail(p, -EINVAL, line,
                    "listener '%s': health_check needs a 'backend' list (not original_dst)",
                    l->name);
        return -1;
    }
    if (l->health_timeout_ms > l->health_interval_ms) {
        config_fail(p, -EINVAL, line,
                    "listener '%s': health_timeout (%ums) is longer than health_interval (%ums)",
                    l->name, l->health_timeout_ms, l->health_interval_ms);
        return -1;
    }
    if (l->health_check == CONFIG_HEALTH_CONNECT)
        return 0;
    if (l->backend_tls == CONFIG_BACKEND_TLS_IMPLICIT) {
        config_fail(p, -EINVAL, line,
                    "listener '%s': health_check = %s reads plaintext; with backend_tls = "
                    "implicit use health_check = connect",
                    l->name, name);
        return -1;
    }
    if (l->health_check == CONFIG_HEALTH_GREETING && l->mode == CONFIG_MODE_TCP) {
        config_fail(p, -EINVAL, line,
                    "listener '%s': health_check = greeting needs a mode with a greeting (smtp, "
                    "imap or pop3); in mode tcp use connect or smtp",
                    l->name);
        return -1;
    }
    if (l->health_check == CONFIG_HEALTH_SMTP && l->mode != CONFIG_MODE_TCP &&
        l->mode != CONFIG_MODE_SMTP) {
        config_fail(p, -EINVAL, line,
                    "listener '%s': health_check = smtp needs mode = smtp or tcp (mode %s: use "
                    "greeting)",
                    l->name, config_mode_name(l->mode));
        return -1;
    }
    return 0;
}

/* Settings that only make sense together. */
static int config_check_features(struct config_parser *p, const struct config_listener *l)
{
    bool dialog = l->mode == CONFIG_MODE_SMTP || l->mode == CONFIG_MODE_IMAP ||
                  l->mode == CONFIG_MODE_POP3; /* modes with STARTTLS */
    int line = l->tls_line > 0 ? l->tls_line : l->line;

    if (l->n_certs != l->n_keys) {
        config_fail(p, -EINVAL, line,
                    "listener '%s' has %zu 'cert' and %zu 'key' lines; they pair up in order",
                    l->name, l->n_certs, l->n_keys);
        return -1;
    }
    if ((l->client_tls == CONFIG_CLIENT_TLS_IMPLICIT ||
         l->client_tls == CONFIG_CLIENT_TLS_STARTTLS) &&
        l->n_certs == 0) {
        config_fail(p, -EINVAL, line, "listener '%s': client_tls = %s needs a 'cert' and a 'key'",
                    l->name, config_client_tls_name(l->client_tls));
        return -1;
    }
    if (l->n_certs > 0 && l->client_tls != CONFIG_CLIENT_TLS_IMPLICIT &&
        l->client_tls != CONFIG_CLIENT_TLS_STARTTLS) {
        config_fail(p, -EINVAL, l->certs[0].line,
                    "listener '%s': 'cert' needs client_tls = implicit or starttls", l->name);
        return -1;
    }
    if ((l->ciphers != NULL || l->ciphersuites != NULL) && l->n_certs == 0) {
        config_fail(p, -EINVAL, l->ciphers != NULL ? l->ciphers_line : l->ciphersuites_line,
                    "listener '%s': '%s' needs client_tls = implicit or starttls (it sets the "
                    "ciphers mxproxy offers to clients)",
                    l->name, l->ciphers != NULL ? "ciphers" : "ciphersuites");
        return -1;
    }
    if (!dialog && (l->client_tls == CONFIG_CLIENT_TLS_STARTTLS ||
                    l->client_tls == CONFIG_CLIENT_TLS_PASSTHROUGH ||
                    l->backend_tls == CONFIG_BACKEND_TLS_STARTTLS)) {
        config_fail(p, -EINVAL, line, "listener '%s': STARTTLS needs mode = smtp, imap or pop3",
                    l->name);
        return -1;
    }
    if (l->require_tls && l->client_tls != CONFIG_CLIENT_TLS_STARTTLS) {
        config_fail(p, -EINVAL, line, "listener '%s': require_tls needs client_tls = starttls",
                    l->name);
        return -1;
    }
    if ((l->backend_ca != NULL || l->backend_sni != NULL) &&
        l->backend_tls == CONFIG_BACKEND_TLS_OFF) {
        config_fail(p, -EINVAL, line, "listener '%s': backend_ca and backend_sni need backend_tls",
                    l->name);
        return -1;
    }
    if (l->backend_original_dst && l->transparent == CONFIG_TRANSPARENT_OFF) {
        config_fail(p, -EINVAL, l->line,
                    "listener '%s': backend = original_dst needs transparent = redirect or tproxy",
                    l->name);
        return -1;
    }
    if (l->source_client && l->transparent != CONFIG_TRANSPARENT_TPROXY) {
        config_fail(p, -EINVAL, l->line,
                    "listener '%s': source = client needs transparent = tproxy", l->name);
        return -1;
    }
    return config_check_health(p, l);
}

/* Checks what no single line can: required keys and listen addresses that
 * collide. Messages carry the line of the offending section header. */
static void config_check(struct config_parser *p)
{
    const struct config *c = p->cfg;

    if (c->n_listeners == 0) {
        config_fail(p, -EINVAL, 0, "no [listener NAME] section");
        return;
    }
    for (size_t i = 0; i < c->n_listeners; i++) {
        const struct config_listener *l = &c->listeners[i];

        if (l->listen.salen == 0) {
            config_fail(p, -EINVAL, l->line, "listener '%s' has no 'listen'", l->name);
            return;
        }
        if (l->n_backends == 0 && !l->backend_original_dst) {
            config_fail(p, -EINVAL, l->line, "listener '%s' has no 'backend'", l->name);
            return;
        }
        if (config_check_features(p, l) != 0)
            return;
        if (config_check_mode_keys(p, l) != 0 || config_check_line_length(p, l) != 0)
            return;
        for (size_t j = 0; j < i; j++) {
            const struct config_listener *o = &c->listeners[j];

            if (config_addr_equal(&l->listen, &o->listen)) {
                config_fail(p, -EINVAL, l->line,
                            "listener '%s' listens on %s, already used by listener '%s' (line %d)",
                            l->name, l->listen.text, o->name, o->line);
                return;
            }
            if (config_addr_overlaps(&l->listen, &o->listen)) {
                config_fail(p, -EINVAL, l->line,
                            "listener '%s' listens on %s, which overlaps %s of listener '%s' "
                            "(line %d)",
                            l->name, l->listen.text, o->listen.text, o->name, o->line);
                return;
            }
        }
    }
}

static void config_write_err(const struct config_parser *p, char *err, size_t errlen)
{
    if (err == NULL || errlen == 0)
        return;
    if (p->err_line > 0)
        snprintf(err, errlen, "%s:%d: %s", p->name, p->err_line, p->err);
    else
        snprintf(err, errlen, "%s: %s", p->name, p->err);
}

/* Loads the certificates and CAs a listener's TLS needs, so that a bad
 * file is a FILE:LINE error at load (and for -t), not a failure per session. */
static void config_load_tls(struct config_parser *p, struct config_listener *l)
{
    const char *version = l->tls_min_version == CONFIG_TLS_1_3 ? "TLSv1.3" : "TLSv1.2";
    char err[CONFIG_ERR_MAX - 64];

    if (l->n_certs > 0) {
        struct tls_cert_pair pairs[CONFIG_CERTS_MAX];
        for (size_t i = 0; i < l->n_certs; i++) {
            struct tls_ctx *one;
            pairs[i] = (struct tls_cert_pair){l->certs[i].cert, l->certs[i].key};
            /* Each pair alone first, so a message names the line at fault. */
            if (tls_server_ctx_new(&one, &pairs[i], 1, version, err, sizeof(err)) != 0) {
                /* An unreadable key is the key line's fault; a mismatch the pair's. */
                bool key = strncmp(err, "key ", 4) == 0 && strstr(err, "does not match") == NULL;
                int line = key ? l->certs[i].key_line : l->certs[i].line;
                config_fail(p, -EINVAL, line, "listener '%s': %s", l->name, err);
                return;
            }
            tls_ctx_unref(one);
        }
        if (tls_server_ctx_new(&l->tls_server, pairs, l->n_certs, version, err, sizeof(err)) != 0) {
            config_fail(p, -EINVAL, l->certs[0].line, "listener '%s': %s", l->name, err);
            return;
        }
        if (tls_ctx_set_ciphers(l->tls_server, l->ciphers, l->ciphersuites, err, sizeof(err)) !=
            0) {
            bool suites = strncmp(err, "ciphersuites", 12) == 0;
            config_fail(p, -EINVAL, suites ? l->ciphersuites_line : l->ciphers_line,
                        "listener '%s': %s", l->name, err);
            return;
        }
    }
    if (l->backend_tls == CONFIG_BACKEND_TLS_OFF)
        return;
    if (l->backend_ca != NULL) {
        FILE *f = fopen(l->backend_ca, "r");
        if (f == NULL) {
            config_fail(p, -EINVAL, l->backend_ca_line, "listener '%s': backend_ca %s: %s", l->name,
                        l->backend_ca, strerror(errno));
            return;
        }
        fclose(f);
    }
    if (tls_client_ctx_new(&l->tls_client, l->backend_verify != 0, l->backend_ca, version, err,
                           sizeof(err)) != 0)
        config_fail(p, -EINVAL, l->backend_ca != NULL ? l->backend_ca_line : l->tls_line,
                    "listener '%s': %s", l->name, err);
}

/* Allocates the per-backend state sessions update at run time, and the
 * TLS contexts. */
/* tls_ctx_set_keylog for a listener's context when it has one. */
static int config_set_keylog(struct tls_ctx *ctx, struct tls_keylog *k)
{
    return ctx != NULL ? tls_ctx_set_keylog(ctx, k) : 0;
}

static void config_alloc_runtime(struct config_parser *p)
{
    struct config *c = p->cfg;
    char err[CONFIG_ERR_MAX - 64];

    if (c->tls_keylog != NULL &&
        tls_keylog_open(&c->keylog, c->tls_keylog, err, sizeof(err)) != 0) {
        config_fail(p, -EINVAL, c->tls_keylog_line, "%s", err);
        return;
    }
    for (size_t i = 0; i < p->cfg->n_listeners; i++) {
        struct config_listener *l = &p->cfg->listeners[i];

        config_load_tls(p, l);
        if (p->err_code != 0)
            return;
        if (c->keylog != NULL && (config_set_keylog(l->tls_server, c->keylog) != 0 ||
                                  config_set_keylog(l->tls_client, c->keylog) != 0)) {
            config_fail_nomem(p);
            return;
        }
        l->backend_retry_at =
            calloc(l->n_backends > 0 ? l->n_backends : 1, sizeof(*l->backend_retry_at));
        if (l->backend_retry_at == NULL || config_map_backend_state(l, l->shared) != 0) {
            config_fail_nomem(p);
            return;
        }
        struct climit_table *clients = NULL;
        if ((l->max_per_client > 0 || l->rate_per_client > 0) &&
            climit_table_new(&clients, CLIMIT_ENTRIES_DEFAULT, 0) != 0) {
            config_fail_nomem(p);
            return;
        }
        atomic_store(&l->shared->clients, clients);
    }
}

static int config_load_text(const char *text, const char *name, const struct config_name *pinned,
                            size_t n_pinned, struct config **out, char *err, size_t errlen)
{
    struct config_parser p = {.name = name, .next = text, .pinned = pinned, .n_pinned = n_pinned};
    int rc;

    p.cfg = config_new(name);
    if (p.cfg == NULL) {
        config_fail_nomem(&p);
        config_write_err(&p, err, errlen);
        return p.err_code;
    }
    rc = ini_parse_stream(config_read_line, &p, config_on_key, &p);
    /* inih reports lines it cannot split (no '=') only through rc; the
     * handler never sees them, so an earlier rc means an earlier error. */
    if (rc > 0 && (p.err_code == 0 || (p.err_line > 0 && rc < p.err_line))) {
        p.err_code = 0;
        config_fail(&p, -EINVAL, rc, "syntax error");
    } else if (rc < 0) {
        config_fail_nomem(&p);
    }
    if (p.err_code == 0)
        config_expand_names(&p);
    free(p.pending);
    if (p.err_code == 0)
        config_check(&p);
    if (p.err_code == 0 && (p.cfg->source = strdup(text)) == NULL)
        config_fail_nomem(&p);
    if (p.err_code == 0)
        config_alloc_runtime(&p);
    if (p.err_code != 0) {
        config_write_err(&p, err, errlen);
        config_free(p.cfg);
        return p.err_code;
    }
    *out = p.cfg;
    return 0;
}

int config_load_string(const char *text, const char *name, struct config **out, char *err,
                       size_t errlen)
{
    *out = NULL;
    if (name == NULL)
        name = "<string>";
    return config_load_text(text, name, NULL, 0, out, err, errlen);
}

/* Reads the whole file, so the same line reader serves files and strings.
 * Returns 0 and a NUL-terminated malloc'd copy, or a negative errno with a
 * message in err. */
static int config_slurp(const char *path, char **text, char *err, size_t errlen)
{
    char why[128];
    FILE *f = fopen(path, "r");
    char *buf = NULL;
    size_t len = 0;
    int rc;

    if (f == NULL) {
        rc = errno != 0 ? -errno : -EIO; /* never 0: that would mean text was read */
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror_r(-rc, why, sizeof(why)));
        return rc;
    }
    buf = malloc(CONFIG_FILE_MAX + 1);
    if (buf == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        rc = -ENOMEM;
        goto out_close;
    }
    len = fread(buf, 1, CONFIG_FILE_MAX + 1, f);
    if (ferror(f)) {
        rc = errno != 0 ? -errno : -EIO;
        snprintf(err, errlen, "%s: cannot read: %s", path, strerror_r(-rc, why, sizeof(why)));
        goto out_free;
    }
    if (len > CONFIG_FILE_MAX) {
        snprintf(err, errlen, "%s: larger than %d bytes", path, CONFIG_FILE_MAX);
        rc = -EFBIG;
        goto out_free;
    }
    buf[len] = '\0';
    if (strlen(buf) != len) {
        snprintf(err, errlen, "%s: contains a NUL byte, not a text file", path);
        rc = -EINVAL;
        goto out_free;
    }
    *text = buf;
    fclose(f);
    return 0;

out_free:
    free(buf);
out_close:
    fclose(f);
    return rc;
}

int config_load_file(const char *path, struct config **out, char *err, size_t errlen)
{
    char scratch[CONFIG_ERR_MAX];
    char *text = NULL;
    int rc;

    *out = NULL;
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof(scratch);
    }
    errno = 0;
    rc = config_slurp(path, &text, err, errlen);
    if (text == NULL) /* set exactly when rc is 0 */
        return rc;
    rc = config_load_text(text, path, NULL, 0, out, err, errlen);
    free(text);
    return rc;
}

int config_load_rebuild(const struct config *c, const struct config_name *names, size_t n,
                        struct config **out, char *err, size_t errlen)
{
    char scratch[CONFIG_ERR_MAX];

    *out = NULL;
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof(scratch);
    }
    return config_load_text(c->source, c->path, names, n, out, err, errlen);
}

void config_inherit_shared(struct config *next, const struct config *prev)
{
    if (next == NULL || prev == NULL)
        return;
    for (size_t i = 0; i < next->n_listeners; i++) {
        struct config_listener *l = &next->listeners[i];
        const struct config_listener *old = config_find_listener(prev, l->name);

        if (old == NULL || old->shared == l->shared)
            continue;
        /* Out of memory: this listener's counters start afresh, nothing worse. */
        if (config_map_backend_state(l, old->shared) != 0)
            continue;
        /* The first table made for a listener stays, so counts survive the reload;
         * sessions read it only while their config has a per-client limit. */
        struct climit_table *none = NULL;
        struct climit_table *mine = atomic_load(&l->shared->clients);
        if (mine != NULL && atomic_compare_exchange_strong(&old->shared->clients, &none, mine))
            atomic_store(&l->shared->clients, NULL);
        atomic_fetch_add_explicit(&old->shared->refs, 1, memory_order_relaxed);
        config_shared_put(l->shared);
        l->shared = old->shared;
    }
}

int config_check_supported(const struct config *c, char *err, size_t errlen)
{
    /* Every key this version parses is carried out: nothing to refuse. */
    (void)c;
    if (errlen > 0)
        err[0] = '\0';
    return 0;
}

const struct config_listener *config_find_listener(const struct config *c, const char *name)
{
    for (size_t i = 0; c != NULL && i < c->n_listeners; i++) {
        if (strcmp(c->listeners[i].name, name) == 0)
            return &c->listeners[i];
    }
    return NULL;
}

struct config *config_ref(struct config *c)
{
    if (c != NULL)
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    return c;
}

void config_unref(struct config *c)
{
    if (c != NULL && atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
        config_free(c);
}

static const char *config_word_name(const struct config_word *words, int value)
{
    for (const struct config_word *w = words; w->name != NULL; w++) {
        if (w->value == value)
            return w->name;
    }
    abort(); /* not a value of the enum the table lists */
}

const char *config_mode_name(enum config_mode m)
{
    return config_word_name(config_modes, (int)m);
}

const char *config_smuggling_name(enum config_smuggling m)
{
    return config_word_name(config_smugglings, (int)m);
}

const char *config_transcript_name(enum config_transcript t)
{
    return config_word_name(config_transcripts, (int)t);
}

const char *config_client_tls_name(enum config_client_tls t)
{
    return config_word_name(config_client_tls_words, (int)t);
}

const char *config_backend_tls_name(enum config_backend_tls t)
{
    return config_word_name(config_backend_tls_words, (int)t);
}

const char *config_health_check_name(enum config_health_check h)
{
    return config_word_name(config_health_words, (int)h);
}

const char *config_kernel_relay_name(enum config_kernel_relay k)
{
    return config_word_name(config_kernel_relays, (int)k);
}
