/* proxyproto.h: PURE PROXY protocol (v1 text, v2 binary) for mxproxy.
 * No I/O, no libuv or OpenSSL types, no allocation.
 *
 * Towards a backend (encoders):
 *
 *   proxyproto_encode_v1()   "PROXY TCP4 src dst sport dport\r\n", TCP6, or "PROXY UNKNOWN\r\n"
 *   proxyproto_encode_v2()   the binary header, with optional TLVs: AUTHORITY (SNI), SSL (with
 *                            VERSION, CN and CIPHER sub-TLVs), UNIQUE_ID, CRC32C
 *   proxyproto_addr_text()   an address as text, as v1 writes it (xclient.c uses it too)
 *
 * From a load balancer (decoder, for listeners with accept_proxy_protocol = on): a resumable
 * parser fed bytes as they arrive, one at a time if need be. It tells v1 from v2 by the first
 * byte and fails as soon as a byte cannot belong to a valid header, so a client speaking SMTP or
 * TLS directly is refused after its first byte, not after a timeout:
 *
 *     struct proxyproto_parser pp = {0};          // or .max_v2_len = ... for another limit
 *     struct proxyproto_header hdr;
 *     size_t used;
 *     switch (proxyproto_decode(&pp, buf, len, &used, &hdr)) {
 *     case PROXYPROTO_NEED_MORE: ...               // all len bytes taken; read more
 *     case PROXYPROTO_DONE: ...                    // buf[used, len) is the client's first data
 *     case PROXYPROTO_ERROR: ...                   // proxyproto_strerror(proxyproto_error(&pp))
 *     }
 *
 * The parser copies the header into itself (at most PROXYPROTO_DECODE_MAX bytes), so the caller
 * need not keep bytes it has fed. It never reads buf beyond len.
 */
#ifndef MXPROXY_PROXYPROTO_H
#define MXPROXY_PROXYPROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* --- limits ---------------------------------------------------------------------------------- */

/* v1: the longest line is "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", 107 bytes; 108 with the
 * NUL that proxyproto_encode_v1() writes. */
#define PROXYPROTO_V1_LINE_MAX 107
#define PROXYPROTO_V1_MAX 108

/* Longest values the v2 encoder accepts, in bytes (no NUL). Longer ones give -EINVAL. */
#define PROXYPROTO_AUTHORITY_MAX 255 /* a DNS name */
#define PROXYPROTO_SSL_VERSION_MAX 32
#define PROXYPROTO_SSL_CIPHER_MAX 64
#define PROXYPROTO_SSL_CN_MAX 64     /* X.520 ub-common-name */
#define PROXYPROTO_UNIQUE_ID_MAX 128 /* the spec's own limit */

#define PROXYPROTO_V2_FIXED 16      /* signature, ver/cmd, fam/proto, length */
#define PROXYPROTO_V2_ADDR_INET 12  /* 2 * 4 + 2 * 2 */
#define PROXYPROTO_V2_ADDR_INET6 36 /* 2 * 16 + 2 * 2 */
#define PROXYPROTO_V2_ADDR_UNIX 216 /* 2 * 108 */
#define PROXYPROTO_V2_TLV_HDR 3     /* type, length (2 bytes) */
#define PROXYPROTO_V2_SSL_HDR 5     /* client flags, verify (4 bytes) */

/* The longest header proxyproto_encode_v2() writes: TCP6 with every TLV at its longest. */
#define PROXYPROTO_V2_MAX                                                                          \
    (PROXYPROTO_V2_FIXED + PROXYPROTO_V2_ADDR_INET6 + PROXYPROTO_V2_TLV_HDR +                      \
     PROXYPROTO_AUTHORITY_MAX + PROXYPROTO_V2_TLV_HDR + PROXYPROTO_V2_SSL_HDR +                    \
     PROXYPROTO_V2_TLV_HDR + PROXYPROTO_SSL_VERSION_MAX + PROXYPROTO_V2_TLV_HDR +                  \
     PROXYPROTO_SSL_CN_MAX + PROXYPROTO_V2_TLV_HDR + PROXYPROTO_SSL_CIPHER_MAX +                   \
     PROXYPROTO_V2_TLV_HDR + PROXYPROTO_UNIQUE_ID_MAX + PROXYPROTO_V2_TLV_HDR + 4) /* 625 */

/* Decoder: the largest v2 header (fixed part included) a parser can hold, and its default limit.
 * The spec keeps headers within 536 bytes (one minimal TCP segment); the rest is room for TLVs
 * of load balancers that go beyond, and for our own encoder's PROXYPROTO_V2_MAX. */
#define PROXYPROTO_DECODE_MAX 1024
#define PROXYPROTO_V2_DEFAULT_MAX 1024

/* v2 TLV types and SSL sub-types (doc/proxy-protocol.txt, 2.2). */
#define PROXYPROTO_PP2_TYPE_ALPN 0x01
#define PROXYPROTO_PP2_TYPE_AUTHORITY 0x02
#define PROXYPROTO_PP2_TYPE_CRC32C 0x03
#define PROXYPROTO_PP2_TYPE_NOOP 0x04
#define PROXYPROTO_PP2_TYPE_UNIQUE_ID 0x05
#define PROXYPROTO_PP2_TYPE_SSL 0x20
#define PROXYPROTO_PP2_SUBTYPE_SSL_VERSION 0x21
#define PROXYPROTO_PP2_SUBTYPE_SSL_CN 0x22
#define PROXYPROTO_PP2_SUBTYPE_SSL_CIPHER 0x23

/* Bits of the SSL TLV's client field. */
#define PROXYPROTO_PP2_CLIENT_SSL 0x01       /* the client connected over TLS */
#define PROXYPROTO_PP2_CLIENT_CERT_CONN 0x02 /* it sent a certificate on this connection */
#define PROXYPROTO_PP2_CLIENT_CERT_SESS 0x04 /* it sent one at least once in the TLS session */

/* --- encoders -------------------------------------------------------------------------------- */

/* TLS facts about the client connection, for the SSL TLV. Strings are NUL-terminated, NULL
 * leaves the sub-TLV out. */
struct proxyproto_tls_info {
    const char *version; /* e.g. "TLSv1.3" (PP2_SUBTYPE_SSL_VERSION) */
    const char *cipher;  /* e.g. "TLS_AES_256_GCM_SHA384" (PP2_SUBTYPE_SSL_CIPHER) */
    const char *cn;      /* client certificate's Common Name (PP2_SUBTYPE_SSL_CN) */
    bool cert_conn;      /* client sent a certificate on this connection */
    bool cert_sess;      /* client sent a certificate at least once in this TLS session */
    uint32_t verify;     /* 0: the certificate was verified; anything else: it was not */
};

/* Options of a v2 header. A zero-initialised struct gives a PROXY header without TLVs. */
struct proxyproto_v2_opts {
    bool local;                            /* LOCAL command (health check): no addresses */
    const char *authority;                 /* PP2_TYPE_AUTHORITY (SNI); NULL: none */
    const struct proxyproto_tls_info *tls; /* PP2_TYPE_SSL; NULL: none (plaintext client) */
    const void *unique_id;                 /* PP2_TYPE_UNIQUE_ID bytes; NULL: none */
    size_t unique_id_len;                  /* 1 to PROXYPROTO_UNIQUE_ID_MAX */
    bool crc32c;                           /* append a PP2_TYPE_CRC32C checksum */
};

/* Writes the v1 line for a connection from src to dst into out, NUL-terminated.
 * Both AF_INET: TCP4; both AF_INET6: TCP6; one of each: TCP6 with the IPv4 one as ::ffff:a.b.c.d.
 * Anything else (NULL, AF_UNIX, ...): "PROXY UNKNOWN\r\n".
 * Returns the line's length (NUL excluded), or -ENOBUFS if out has less than that plus one byte;
 * PROXYPROTO_V1_MAX bytes always suffice. */
int proxyproto_encode_v1(char *out, size_t cap, const struct sockaddr *src,
                         const struct sockaddr *dst);

/* Writes a v2 header into out. Addresses as for proxyproto_encode_v1(); a pair that is not IP
 * gives family UNSPEC with no address block. opts may be NULL.
 * Returns the header's length, -ENOBUFS if cap is too small (PROXYPROTO_V2_MAX always
 * suffices), or -EINVAL for a string or unique ID over its limit or an empty unique ID. */
int proxyproto_encode_v2(void *out, size_t cap, const struct sockaddr *src,
                         const struct sockaddr *dst, const struct proxyproto_v2_opts *opts);

/* CRC-32C (Castagnoli) of buf, as the PP2_TYPE_CRC32C TLV carries it. */
uint32_t proxyproto_crc32c(const void *buf, size_t len);

/* --- decoder --------------------------------------------------------------------------------- */

enum proxyproto_status {
    PROXYPROTO_NEED_MORE = 0, /* every byte given was taken; feed more */
    PROXYPROTO_DONE = 1,      /* a whole header was read; *hdr is filled */
    PROXYPROTO_ERROR = -1,    /* not a valid header; proxyproto_error() says why */
};

/* Why a header was refused. Values are stable; proxyproto_strerror() gives the text. */
enum proxyproto_err {
    PROXYPROTO_OK = 0,
    PROXYPROTO_E_SIGNATURE,        /* "bad signature": neither "PROXY " nor the v2 signature */
    PROXYPROTO_E_V1_TOO_LONG,      /* no CRLF within PROXYPROTO_V1_LINE_MAX bytes */
    PROXYPROTO_E_V1_CRLF,          /* a CR without LF, or an LF without CR */
    PROXYPROTO_E_V1_PROTOCOL,      /* not TCP4, TCP6 or UNKNOWN */
    PROXYPROTO_E_V1_SRC_ADDR,      /* source address missing or not of the family */
    PROXYPROTO_E_V1_DST_ADDR,      /* destination address missing or not of the family */
    PROXYPROTO_E_V1_SRC_PORT,      /* source port missing, not 0-65535, or leading zero */
    PROXYPROTO_E_V1_DST_PORT,      /* destination port likewise */
    PROXYPROTO_E_V1_TRAILING,      /* anything between the destination port and CRLF */
    PROXYPROTO_E_V2_VERSION,       /* version nibble not 2 */
    PROXYPROTO_E_V2_COMMAND,       /* command nibble not LOCAL (0) or PROXY (1) */
    PROXYPROTO_E_V2_FAMILY,        /* address family nibble above 3 (AF_UNIX) */
    PROXYPROTO_E_V2_TRANSPORT,     /* transport nibble above 2 (DGRAM) */
    PROXYPROTO_E_V2_TOO_LONG,      /* the announced length exceeds the parser's limit */
    PROXYPROTO_E_V2_ADDR_SHORT,    /* PROXY: length below the family's address block */
    PROXYPROTO_E_V2_TLV_OVERRUN,   /* a TLV header or value goes past the header's end */
    PROXYPROTO_E_V2_TLV_DUPLICATE, /* AUTHORITY, SSL, UNIQUE_ID or CRC32C given twice */
    PROXYPROTO_E_V2_SSL_SHORT,     /* SSL TLV shorter than its 5-byte client/verify part */
    PROXYPROTO_E_V2_SSL_OVERRUN,   /* an SSL sub-TLV goes past the SSL TLV's end */
    PROXYPROTO_E_V2_UNIQUE_ID,     /* UNIQUE_ID over 128 bytes */
    PROXYPROTO_E_V2_CRC32C_LEN,    /* CRC32C TLV value not 4 bytes */
    PROXYPROTO_E_V2_CRC32C,        /* CRC32C does not match the header */
};

/* Bytes that point into the parser (not NUL-terminated). p == NULL: absent. */
struct proxyproto_bytes {
    const char *p;
    size_t len;
};

enum proxyproto_cmd {
    PROXYPROTO_CMD_LOCAL = 0, /* v2 LOCAL: the proxy's own connection; use the real endpoints */
    PROXYPROTO_CMD_PROXY = 1, /* relayed connection (every v1 header, UNKNOWN included) */
};

/* A decoded header. The proxyproto_bytes fields point into the parser: they stay valid while
 * the parser is neither fed again, reset nor freed. */
struct proxyproto_header {
    uint8_t version;                   /* 1 or 2 */
    uint8_t v2_fam;                    /* v2: raw family/transport byte (0x11, 0x21, ...); v1: 0 */
    enum proxyproto_cmd command;       /* LOCAL or PROXY */
    int family;                        /* AF_INET, AF_INET6, or AF_UNSPEC: keep the real endpoints
                                          (v1 UNKNOWN, v2 LOCAL, UNSPEC, UNIX, DGRAM) */
    size_t len;                        /* header length, total bytes consumed over all calls */
    struct sockaddr_storage src;       /* the client, when family is AF_INET or AF_INET6 */
    struct sockaddr_storage dst;       /* the address the client connected to; zero otherwise */
    struct proxyproto_bytes authority; /* PP2_TYPE_AUTHORITY (SNI), untrusted UTF-8 */
    struct proxyproto_bytes unique_id; /* PP2_TYPE_UNIQUE_ID, opaque */
    bool has_ssl;                      /* a PP2_TYPE_SSL TLV was present */
    uint8_t ssl_client;                /* its PROXYPROTO_PP2_CLIENT_* bits */
    uint32_t ssl_verify;               /* its verify field: 0 when the client cert was verified */
    struct proxyproto_bytes ssl_version; /* PP2_SUBTYPE_SSL_VERSION */
    struct proxyproto_bytes ssl_cipher;  /* PP2_SUBTYPE_SSL_CIPHER */
    struct proxyproto_bytes ssl_cn;      /* PP2_SUBTYPE_SSL_CN */
    bool has_crc32c;                     /* a PP2_TYPE_CRC32C TLV was present and matched */
};

/* A zero-initialised parser is ready to use; set max_v2_len before the first call to change the
 * limit. Reuse for another connection with proxyproto_reset(). */
struct proxyproto_parser {
    size_t max_v2_len; /* largest v2 header accepted, fixed part included; 0: default
                          PROXYPROTO_V2_DEFAULT_MAX; clamped to [16, DECODE_MAX] */
    /* private */
    uint8_t state;                            /* enum proxyproto_state in proxyproto.c */
    uint8_t err;                              /* enum proxyproto_err once in the error state */
    size_t have;                              /* header bytes copied into buf */
    size_t total;                             /* v2: 16 + announced length, once known */
    size_t err_pos;                           /* offset in the header where the error was found */
    unsigned char buf[PROXYPROTO_DECODE_MAX]; /* the header so far */
};

/* Feeds len bytes of buf (len may be 0). *consumed is set to how many bytes were taken: len on
 * NEED_MORE; on DONE the bytes that complete the header (what follows is the client's data); on
 * ERROR the bytes up to and including the one found wrong (a v1 line after "PROXY " and a v2
 * block after its 16 fixed bytes are judged whole, so for them: up to the header's end).
 * On DONE, *hdr is filled; on NEED_MORE it is left alone; on ERROR its contents are unspecified.
 * Once DONE or ERROR, further calls return the same status and take nothing (on DONE, *hdr is
 * filled again). */
enum proxyproto_status proxyproto_decode(struct proxyproto_parser *p, const void *buf, size_t len,
                                         size_t *consumed, struct proxyproto_header *hdr);

/* Why the parser is in the error state (PROXYPROTO_OK if it is not), and the offset within the
 * header of the byte or field found wrong. */
enum proxyproto_err proxyproto_error(const struct proxyproto_parser *p);
size_t proxyproto_error_pos(const struct proxyproto_parser *p);

/* Fixed English text for an error, e.g. "v2: TLV overruns header". Never NULL. */
const char *proxyproto_strerror(enum proxyproto_err err);

/* Makes p ready for a new header, keeping max_v2_len. */
void proxyproto_reset(struct proxyproto_parser *p);

/* --- address text ------------------------------------------------------------------------- */

#define PROXYPROTO_ADDR_TEXT_MAX 40 /* bytes of proxyproto_addr_text()'s text, NUL included */

/* The text of sa's address as the v1 header writes it: a.b.c.d, or RFC 5952 hex groups (lower
 * case, "::" for the longest run of two or more zero groups, no dotted tail); an IPv4-mapped
 * IPv6 address is written as IPv4 (*v6 false). Also gives the port (host order). Returns false
 * (out untouched) when sa is NULL or not IP. out needs PROXYPROTO_ADDR_TEXT_MAX bytes. */
bool proxyproto_addr_text(const struct sockaddr *sa, char *out, bool *v6, unsigned *port);

#endif /* MXPROXY_PROXYPROTO_H */
