/* config.h: mxproxy's configuration, parsed from an INI file with inih.
 *
 * A struct config is immutable once loaded and shared by every worker thread;
 * sessions hold a reference (config_ref/config_unref) so a SIGHUP reload can
 * swap it while open sessions keep the one they started with.
 */
#ifndef MXPROXY_CONFIG_H
#define MXPROXY_CONFIG_H

#include "resolve.h"

#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CONFIG_NAME_MAX 64                /* listener names, bytes including NUL */
#define CONFIG_HOST_MAX 253               /* longest DNS name, without the trailing dot */
#define CONFIG_ADDR_TEXT_MAX 64           /* "[v6addr]:port" as text, bytes including NUL */
#define CONFIG_LINE_LENGTH_MIN 512        /* max_line_length bounds, bytes */
#define CONFIG_LINE_LENGTH_MAX 12288      /* RFC 4954: an AUTH line may be this long */
#define CONFIG_ERR_MAX 512                /* "FILE:LINE: message", bytes including NUL */
#define CONFIG_BACKENDS_MAX 64            /* "backend" entries per listener */
#define CONFIG_CERTS_MAX 16               /* "cert" / "key" pairs per listener */
#define CONFIG_ADMIN_CONNS_MAX 1024       /* admin_max_connections and _per_peer, at most */
#define CONFIG_RECENT_SESSIONS_MAX 100000 /* recent_sessions, at most */
#define CONFIG_CIDRS_MAX 1024             /* "allow" or "deny" blocks per listener */

/* Mode imap: max_line_length up to this (literals do not count), and its own defaults. */
#define CONFIG_IMAP_LINE_LENGTH_MAX 1048576
#define CONFIG_IMAP_LINE_LENGTH 65536                /* Dovecot's own limit */
#define CONFIG_IMAP_IDLE_TIMEOUT_MS (30 * 60 * 1000) /* RFC 9051's autologout */

/* Longest duration a key accepts, in ms (2^31 - 1, about 24.8 days), so any
 * timeout fits a signed 32-bit millisecond count. */
#define CONFIG_DURATION_MAX_MS 2147483647u
#define CONFIG_RESOLVE_TIMEOUT_MS                                                                  \
    2000 /* one try of a lookup at a configured resolver (two tries) */

enum config_log_format {
    CONFIG_LOG_LOGFMT = 0, /* key=value pairs (default) */
    CONFIG_LOG_JSON,       /* one JSON object per line, same keys */
};

enum config_log_level {
    CONFIG_LOG_DEBUG = 0,
    CONFIG_LOG_INFO, /* default */
    CONFIG_LOG_WARN,
    CONFIG_LOG_ERROR,
};

enum config_mode {
    CONFIG_MODE_TCP = 0, /* opaque byte relay (default) */
    CONFIG_MODE_SMTP,    /* SMTP-aware relay (proto_smtp.c) */
    CONFIG_MODE_POP3,    /* POP3-aware relay (proto_pop3.c) */
    CONFIG_MODE_IMAP,    /* IMAP-aware relay (proto_imap.c) */
};

/* A key that only some modes own names them as a mask of these bits
 * (config.c's key table, .modes); 0 means every mode. */
#define CONFIG_MODE_BIT(m) (1u << (m))

#define CONFIG_MODE_KEYS_MAX 64 /* mode-bound keys one listener can give */

/* The mode-bound keys a listener gave, in file order, checked against its
 * mode once the whole file is read ("'KEY' needs mode = ..."). */
struct config_mode_keys {
    unsigned short row[CONFIG_MODE_KEYS_MAX]; /* rows of config.c's key table */
    int line[CONFIG_MODE_KEYS_MAX];           /* where each was given */
    unsigned n;                               /* entries */
};

/* What to do with a lone "." next to a bare CR or LF inside DATA (mode smtp). */
enum config_smuggling {
    CONFIG_SMUGGLING_REJECT = 0, /* answer 554, never let the backend see an end (default) */
    CONFIG_SMUGGLING_NORMALIZE,  /* bare CR/LF become CRLF, the lone dot is dot-stuffed */
    CONFIG_SMUGGLING_OFF,        /* byte-exact */
};

/* How much of the SMTP dialogue is logged (mode smtp). */
enum config_transcript {
    CONFIG_TRANSCRIPT_PAIRS = 0, /* one ev=pair line per command/reply pair (default) */
    CONFIG_TRANSCRIPT_OFF,       /* only the open/connect/close lines */
    CONFIG_TRANSCRIPT_FULL,      /* pairs, plus one ev=line per line each way */
};

/* Client-side TLS of a listener ("client_tls"). */
enum config_client_tls {
    CONFIG_CLIENT_TLS_OFF = 0,     /* plaintext (default) */
    CONFIG_CLIENT_TLS_IMPLICIT,    /* TLS from the first byte (port 465) */
    CONFIG_CLIENT_TLS_STARTTLS,    /* mxproxy answers STARTTLS itself (mode smtp) */
    CONFIG_CLIENT_TLS_PASSTHROUGH, /* STARTTLS goes to the backend, then opaque (mode smtp) */
};

/* Backend-side TLS of a listener ("backend_tls"). */
enum config_backend_tls {
    CONFIG_BACKEND_TLS_OFF = 0,  /* plaintext (default) */
    CONFIG_BACKEND_TLS_IMPLICIT, /* TLS from the first byte */
    CONFIG_BACKEND_TLS_STARTTLS, /* EHLO + STARTTLS before the client's EHLO (mode smtp) */
};

/* Who relays opaque bytes ("kernel_relay"): mode tcp after the first bytes,
 * mode smtp after a STARTTLS passthrough. */
enum config_kernel_relay {
    CONFIG_KERNEL_RELAY_OFF = 0, /* user space reads and writes every byte */
    CONFIG_KERNEL_RELAY_SPLICE,  /* splice(2) through a pipe once a transfer is large */
    CONFIG_KERNEL_RELAY_SOCKMAP, /* an eBPF sk_skb verdict forwards in the kernel */
};

/* Measured in bench/RESULTS.md ("kernel_relay"). */
#define CONFIG_KERNEL_RELAY_DEFAULT CONFIG_KERNEL_RELAY_SPLICE

enum config_tls_version {
    CONFIG_TLS_1_2 = 0, /* "TLSv1.2" (default) */
    CONFIG_TLS_1_3,     /* "TLSv1.3" */
};

/* How connections reach a listener ("transparent"). */
enum config_transparent {
    CONFIG_TRANSPARENT_OFF = 0,  /* ordinary listener (default) */
    CONFIG_TRANSPARENT_REDIRECT, /* iptables REDIRECT: SO_ORIGINAL_DST gives the target */
    CONFIG_TRANSPARENT_TPROXY,   /* iptables TPROXY: IP_TRANSPARENT listener */
};

enum config_proxy_protocol {
    CONFIG_PROXY_PROTOCOL_OFF = 0, /* default */
    CONFIG_PROXY_PROTOCOL_V1,
    CONFIG_PROXY_PROTOCOL_V2,
};

/* Active health checks of a listener's backends ("health_check"). */
enum config_health_check {
    CONFIG_HEALTH_OFF = 0,  /* passive marking (fail_timeout) only (default) */
    CONFIG_HEALTH_CONNECT,  /* a TCP connect succeeds */
    CONFIG_HEALTH_GREETING, /* a complete positive greeting in the listener's mode */
    CONFIG_HEALTH_SMTP,     /* SMTP greeting, EHLO and QUIT, all 2xx */
};

/* How a new session picks among the usable backends ("balance"). */
enum config_balance {
    CONFIG_BALANCE_ROUND_ROBIN = 0,   /* each session starts one further (default) */
    CONFIG_BALANCE_LEAST_CONNECTIONS, /* fewest open sessions over all workers */
    CONFIG_BALANCE_FIRST,             /* the first usable one in file order */
};

/* One backend address's run-time state, shared by every worker and the
 * health checker. It hangs off config_listener_shared, keyed by the address
 * text, so it outlives a reload that keeps the backend. Never moves once made. */
struct config_backend_state {
    char text[CONFIG_ADDR_TEXT_MAX];   /* the backend, as config_addr.text */
    atomic_bool down;                  /* health checks took it out */
    atomic_uint active;                /* sessions connecting or connected to it, all workers */
    _Atomic uint64_t sessions;         /* sessions that connected to it */
    _Atomic uint64_t connect_failures; /* failed connects (and greeting timeouts) */
    _Atomic uint64_t checks_ok;        /* health checks passed */
    _Atomic uint64_t checks_failed;    /* health checks failed */
    struct config_backend_state *next; /* the shared object's list; main thread only */
};

/* One certificate and its key, for client-side TLS; the first is the default. */
struct config_cert {
    char *cert;   /* PEM file, chain allowed */
    char *key;    /* PEM file */
    int line;     /* line of the "cert" key, for messages */
    int key_line; /* line of the "key" key */
};

/* One resolved socket address plus the text it was written as. */
struct config_addr {
    struct sockaddr_storage sa;      /* AF_INET or AF_INET6, port set */
    socklen_t salen;                 /* sizeof(sockaddr_in) or sizeof(sockaddr_in6) */
    char text[CONFIG_ADDR_TEXT_MAX]; /* canonical "1.2.3.4:25" or "[::1]:25" */
};

/* Counters that outlive a reload: a listener of the same name in the next
 * config shares this object, so max_connections holds across SIGHUP. */
struct tls_ctx;
struct climit_table;
struct cidr;

struct config_listener_shared {
    atomic_uint refs;                      /* configs pointing here */
    atomic_uint active;                    /* open sessions of this listener, all workers */
    struct config_backend_state *backends; /* every backend address seen, append-only */
    /* Per-client counts (climit.h), made once a config of this listener sets a
     * per-client limit, then kept for the life of this object; NULL before. */
    struct climit_table *_Atomic clients;
};

struct config_listener {
    char name[CONFIG_NAME_MAX];         /* from "[listener NAME]" */
    int line;                           /* line of the section header, for messages */
    struct config_addr listen;          /* "listen", required */
    struct config_addr *backends;       /* "backend", required, in file order; names resolved */
    size_t n_backends;                  /* 1..CONFIG_BACKENDS_MAX */
    enum config_mode mode;              /* "mode", default tcp */
    unsigned connect_timeout_ms;        /* "connect_timeout", default 5 s */
    unsigned idle_timeout_ms;           /* "idle_timeout", default 300 s */
    unsigned greeting_timeout_ms;       /* "greeting_timeout", mode smtp, default 30 s */
    unsigned max_connections;           /* "max_connections", 0 = unlimited (default) */
    unsigned max_per_client;            /* "max_connections_per_client", 0 = off (default) */
    unsigned rate_per_client;           /* "max_connection_rate_per_client", 0 = off */
    struct cidr *allow;                 /* "allow": if any, only clients inside one come in */
    size_t n_allow;                     /* blocks in allow */
    struct cidr *deny;                  /* "deny": clients inside one are refused */
    size_t n_deny;                      /* blocks in deny */
    struct cidr *transcript_clients;    /* "transcript_clients": these log transcript = full */
    size_t n_transcript_clients;        /* blocks in transcript_clients */
    unsigned fail_timeout_ms;           /* "fail_timeout", default 10 s, 0 = off */
    unsigned health_check;              /* enum config_health_check, "health_check" */
    unsigned health_interval_ms;        /* "health_interval", default 5 s */
    unsigned health_timeout_ms;         /* "health_timeout", default 2 s */
    unsigned health_rise;               /* "health_rise", default 2 */
    unsigned health_fall;               /* "health_fall", default 3 */
    int health_line;                    /* line of "health_check", for messages */
    unsigned balance;                   /* enum config_balance, "balance" */
    unsigned max_line_length;           /* "max_line_length", mode smtp, default 4096 */
    enum config_smuggling smuggling;    /* "smuggling", mode smtp, default reject */
    enum config_transcript transcript;  /* "transcript", mode smtp, default pairs */
    struct config_mode_keys mode_keys;  /* keys given that only some modes own */
    bool backend_original_dst;          /* "backend = original_dst" */
    unsigned client_tls;                /* enum config_client_tls, "client_tls" */
    struct config_cert *certs;          /* "cert" / "key" pairs, in file order */
    size_t n_certs;                     /* certificates given */
    size_t n_keys;                      /* keys given; must equal n_certs */
    unsigned tls_min_version;           /* enum config_tls_version, "tls_min_version" */
    char *ciphers;                      /* "ciphers" (TLS 1.2), NULL: mxproxy's default */
    int ciphers_line;                   /* its line, for messages */
    char *ciphersuites;                 /* "ciphersuites" (TLS 1.3), NULL: OpenSSL's default */
    int ciphersuites_line;              /* its line, for messages */
    unsigned require_tls;               /* "require_tls" on/off, default off */
    unsigned backend_tls;               /* enum config_backend_tls, "backend_tls" */
    unsigned backend_verify;            /* "backend_verify" on/off, default on */
    char *backend_ca;                   /* "backend_ca", NULL: the system's CAs */
    int backend_ca_line;                /* its line, for messages */
    char *backend_sni;                  /* "backend_sni", NULL: no SNI, no name check */
    int tls_line;                       /* line of the first TLS key, for messages */
    unsigned transparent;               /* enum config_transparent, "transparent" */
    unsigned kernel_relay;              /* enum config_kernel_relay, "kernel_relay" */
    unsigned mark;                      /* "mark": SO_MARK on backend sockets, 0 = none */
    unsigned source_client;             /* "source = client" (tproxy): bind to the client */
    unsigned proxy_protocol;            /* enum config_proxy_protocol, "proxy_protocol" */
    unsigned accept_proxy_protocol;     /* "accept_proxy_protocol" on/off */
    unsigned proxy_protocol_timeout_ms; /* "proxy_protocol_timeout", default 5 s */
    unsigned xclient;                   /* "xclient" on/off, mode smtp */
    unsigned imap_id;                   /* "imap_id" on/off, mode imap: ID with the client's
                                           address before its first command */
    unsigned pass_client_xclient;       /* "pass_client_xclient" on/off, mode smtp: relay a
                                           client's own XCLIENT/XFORWARD (trusted chain) */
    struct tls_ctx *tls_server;         /* client_tls implicit/starttls: certificates, or NULL */
    struct tls_ctx *tls_client;         /* backend_tls implicit/starttls: verification, or NULL */
    /* The one mutable part of a loaded config, shared by all workers: per
     * backend, the time (uv_hrtime() in ms) until which new sessions try it
     * only after every other backend; set after a failed connect. */
    _Atomic uint64_t *backend_retry_at;
    /* Per backend, in file order: its state in shared->backends. */
    struct config_backend_state **backend_state;
    struct config_listener_shared *shared; /* never NULL in a loaded config */
};

/* A backend host name and the addresses it stood for when the config was made:
 * each "backend = NAME:PORT" became one backend per address, in place. */
struct config_name {
    char host[CONFIG_HOST_MAX + 1]; /* as written in the file */
    int line;                       /* first "backend" line naming it */
    struct resolve_set addrs;       /* its answer: sorted, unique, at least one */
};

struct config {
    atomic_uint refs;                  /* starts at 1 for the loader */
    char *path;                        /* file it was read from ("<string>" for tests) */
    unsigned workers;                  /* "workers", default = online cores, 1..256 */
    enum config_log_format log_format; /* "log_format", default logfmt */
    enum config_log_level log_level;   /* "log_level", default info */
    unsigned drain_timeout_ms;         /* "drain_timeout", default 30 s */
    unsigned drain_grace_ms;           /* "drain_grace": owed replies after it, default 10 s */
    struct config_addr admin;          /* "admin": the HTTP admin endpoint's address, or unset */
    unsigned admin_max_connections;    /* "admin_max_connections", default 64 */
    unsigned admin_max_per_peer;       /* "admin_max_connections_per_peer", default 8 */
    unsigned admin_header_timeout_ms;  /* "admin_header_timeout", default 3 s */
    unsigned recent_sessions;          /* "recent_sessions": closed sessions kept, default 1000 */
    char *tls_keylog;                  /* "tls_keylog": file for TLS secrets, or NULL */
    int tls_keylog_line;               /* its line, for errors */
    struct tls_keylog *keylog;         /* tls_keylog opened, shared by every TLS context */
    struct config_addr resolver;       /* "resolver": the DNS server names are asked of, or unset */
    unsigned resolve_interval_ms;      /* "resolve_interval": re-resolve names, default 10 s */
    struct config_name *names;         /* backend host names, in order of first use */
    size_t n_names;                    /* 0: every backend is an address */
    char *source;                      /* the text read, to rebuild with new DNS answers */
    struct config_listener *listeners; /* in file order */
    size_t n_listeners;                /* >= 1 in a loaded config */
};

/* Was an optional address key ("admin", "resolver") given? */
static inline bool config_addr_given(const struct config_addr *a)
{
    return a->salen > 0;
}

/* Parses the INI file at path. On success returns 0 and stores a config with
 * one reference in *out. On failure returns a negative errno-style code,
 * leaves *out NULL and writes "FILE:LINE: message" (or "FILE: message" when no
 * line applies, e.g. the file cannot be opened) into err, which may be NULL.
 * Only the first error is reported. Backend host names are resolved here, each to
 * all its addresses (resolve.h), so this may block on DNS. */
int config_load_file(const char *path, struct config **out, char *err, size_t errlen);

/* The same for INI text held in memory; name stands in for FILE in messages
 * and is stored in config->path ("<string>" when name is NULL). */
int config_load_string(const char *text, const char *name, struct config **out, char *err,
                       size_t errlen);

/* Builds c again from the text it was read from, with the addresses given in
 * names (n of them) for those host names instead of asking DNS: how a changed
 * DNS answer reaches the backends. Names c has that are not in names are
 * resolved again. Returns and reports errors as config_load_file. */
int config_load_rebuild(const struct config *c, const struct config_name *names, size_t n,
                        struct config **out, char *err, size_t errlen);

/* Returns 0 when this version carries out everything c asks for, else
 * -ENOTSUP with "FILE:LINE: message" in err: keys that are parsed and
 * checked but whose feature is still to come. */
int config_check_supported(const struct config *c, char *err, size_t errlen);

/* Makes next share the config_listener_shared objects of prev's listeners that
 * have the same name, so counters survive a reload. prev may be NULL. */
void config_inherit_shared(struct config *next, const struct config *prev);

/* Finds the listener called name, or NULL. */
const struct config_listener *config_find_listener(const struct config *c, const char *name);

/* Reference counting, safe across threads. config_unref frees on the last
 * reference; both accept NULL. */
struct config *config_ref(struct config *c);
void config_unref(struct config *c);

const char *config_mode_name(enum config_mode m);
const char *config_smuggling_name(enum config_smuggling m);
const char *config_transcript_name(enum config_transcript t);
const char *config_client_tls_name(enum config_client_tls t);
const char *config_backend_tls_name(enum config_backend_tls t);
const char *config_health_check_name(enum config_health_check h);
const char *config_kernel_relay_name(enum config_kernel_relay k);

#endif /* MXPROXY_CONFIG_H */
