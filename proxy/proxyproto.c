/* proxyproto.c: PROXY protocol v1/v2 encoders and decoder, XCLIENT line builder.
 *
 * Rules follow HAProxy's doc/proxy-protocol.txt (2020/03/05) and Postfix's XCLIENT_README.
 * The decoder is strict where the spec is: no leading zeros in v1 numbers, exactly one space
 * between fields, CRLF within 107 bytes, known v2 version, command, family and transport.
 */
#include "proxyproto.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char proxyproto_v2_sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                                    0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};
static const char proxyproto_v1_sig[6] = {'P', 'R', 'O', 'X', 'Y', ' '};

/* --- shared helpers -------------------------------------------------------------------------- */

uint32_t proxyproto_crc32c(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint32_t crc = 0xffffffffu;

    /* Bitwise: a header is hashed once per connection, a table is not worth its 1 KiB. */
    for (size_t i = 0; i < len; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    }
    return crc ^ 0xffffffffu;
}

static void proxyproto_put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void proxyproto_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static unsigned proxyproto_get16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static uint32_t proxyproto_get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* One endpoint as the encoders see it: 16 bytes (IPv4 in the last 4 when v4) and a port. */
struct proxyproto_ep {
    int family;             /* AF_INET or AF_INET6 */
    unsigned char addr[16]; /* IPv6, or IPv4 in addr[12..15] with ::ffff: before it */
    unsigned port;          /* host order */
};

/* Reads sa into *ep; false for NULL or a family that is not IP. */
static bool proxyproto_ep_from(const struct sockaddr *sa, struct proxyproto_ep *ep)
{
    memset(ep, 0, sizeof(*ep));
    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        ep->family = AF_INET;
        ep->addr[10] = 0xff;
        ep->addr[11] = 0xff;
        memcpy(ep->addr + 12, &in->sin_addr, 4);
        ep->port = ntohs(in->sin_port);
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        ep->family = AF_INET6;
        memcpy(ep->addr, &in6->sin6_addr, 16);
        ep->port = ntohs(in6->sin6_port);
        return true;
    }
    return false;
}

/* Both endpoints in one family: AF_INET, AF_INET6 (a lone IPv4 one is mapped), or AF_UNSPEC. */
static int proxyproto_pair(const struct sockaddr *src, const struct sockaddr *dst,
                           struct proxyproto_ep *s, struct proxyproto_ep *d)
{
    bool sok = proxyproto_ep_from(src, s);
    bool dok = proxyproto_ep_from(dst, d);

    if (!sok || !dok)
        return AF_UNSPEC;
    if (s->family == AF_INET && d->family == AF_INET)
        return AF_INET;
    return AF_INET6; /* the ::ffff: prefix is already in addr[] */
}

static bool proxyproto_is_v4mapped(const unsigned char a[16])
{
    static const unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, prefix, sizeof(prefix)) == 0;
}

/* Writes a.b.c.d; out needs 16 bytes. Returns the length. */
static size_t proxyproto_fmt_ipv4(char *out, const unsigned char a[4])
{
    int n = snprintf(out, 16, "%u.%u.%u.%u", a[0], a[1], a[2], a[3]);
    return n > 0 ? (size_t)n : 0;
}

/* Writes RFC 5952 text (lower case, the longest run of two or more zero groups as "::") in hex
 * groups only: no dotted tail, which the v1 spec does not allow. out needs 40 bytes. */
static size_t proxyproto_fmt_ipv6(char *out, const unsigned char a[16])
{
    unsigned g[8];
    int best = -1, best_len = 0;
    size_t n = 0;

    for (int i = 0; i < 8; i++)
        g[i] = proxyproto_get16(a + 2 * i);
    for (int i = 0; i < 8;) {
        int j = i;
        while (j < 8 && g[j] == 0)
            j++;
        if (j - i > best_len && j - i >= 2) {
            best = i;
            best_len = j - i;
        }
        i = j > i ? j : i + 1;
    }
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            out[n++] = ':';
            if (i == 0)
                out[n++] = ':';
            i += best_len - 1;
            continue;
        }
        int w = snprintf(out + n, 40 - n, "%x", g[i]);
        n += w > 0 ? (size_t)w : 0;
        if (i < 7)
            out[n++] = ':';
    }
    out[n] = '\0';
    return n;
}

bool proxyproto_addr_text(const struct sockaddr *sa, char *out, bool *v6, unsigned *port)
{
    struct proxyproto_ep ep;

    if (!proxyproto_ep_from(sa, &ep))
        return false;
    *port = ep.port;
    *v6 = !(ep.family == AF_INET || proxyproto_is_v4mapped(ep.addr));
    if (*v6)
        proxyproto_fmt_ipv6(out, ep.addr);
    else
        proxyproto_fmt_ipv4(out, ep.addr + 12);
    return true;
}

/* --- v1 encoder ------------------------------------------------------------------------------ */

int proxyproto_encode_v1(char *out, size_t cap, const struct sockaddr *src,
                         const struct sockaddr *dst)
{
    struct proxyproto_ep s, d;
    char sa[40], da[40];
    char line[PROXYPROTO_V1_MAX];
    int n;

    switch (proxyproto_pair(src, dst, &s, &d)) {
    case AF_INET:
        proxyproto_fmt_ipv4(sa, s.addr + 12);
        proxyproto_fmt_ipv4(da, d.addr + 12);
        n = snprintf(line, sizeof(line), "PROXY TCP4 %s %s %u %u\r\n", sa, da, s.port, d.port);
        break;
    case AF_INET6:
        proxyproto_fmt_ipv6(sa, s.addr);
        proxyproto_fmt_ipv6(da, d.addr);
        n = snprintf(line, sizeof(line), "PROXY TCP6 %s %s %u %u\r\n", sa, da, s.port, d.port);
        break;
    default:
        n = snprintf(line, sizeof(line), "PROXY UNKNOWN\r\n");
        break;
    }
    if (n < 0 || (size_t)n >= sizeof(line))
        return -EINVAL; /* cannot happen: 104 bytes at most */
    if ((size_t)n + 1 > cap)
        return -ENOBUFS;
    memcpy(out, line, (size_t)n + 1);
    return n;
}

/* --- v2 encoder ------------------------------------------------------------------------------ */

/* Appends a TLV; the caller has checked the room. Returns the new offset. */
static size_t proxyproto_put_tlv(unsigned char *out, size_t off, unsigned type, const void *val,
                                 size_t len)
{
    out[off] = (unsigned char)type;
    proxyproto_put16(out + off + 1, (unsigned)len);
    if (len > 0)
        memcpy(out + off + 3, val, len);
    return off + 3 + len;
}

/* Length of s if it is at most max bytes, or (size_t)-1. s == NULL gives 0. */
static size_t proxyproto_bounded_len(const char *s, size_t max)
{
    if (s == NULL)
        return 0;
    size_t n = strnlen(s, max + 1);
    return n > max ? (size_t)-1 : n;
}

int proxyproto_encode_v2(void *outp, size_t cap, const struct sockaddr *src,
                         const struct sockaddr *dst, const struct proxyproto_v2_opts *opts)
{
    static const struct proxyproto_v2_opts none;
    const struct proxyproto_tls_info *tls;
    struct proxyproto_ep s, d;
    unsigned char *out = outp;
    size_t alen, vlen, clen, cnlen, tlv = 0, ssl_len = 0, off;
    size_t authlen;
    int family = AF_UNSPEC;
    unsigned char fam = 0x00;

    if (opts == NULL)
        opts = &none;
    tls = opts->tls;

    authlen = proxyproto_bounded_len(opts->authority, PROXYPROTO_AUTHORITY_MAX);
    if (authlen == (size_t)-1)
        return -EINVAL;
    if (opts->authority != NULL)
        tlv += PROXYPROTO_V2_TLV_HDR + authlen;
    if (tls != NULL) {
        vlen = proxyproto_bounded_len(tls->version, PROXYPROTO_SSL_VERSION_MAX);
        clen = proxyproto_bounded_len(tls->cipher, PROXYPROTO_SSL_CIPHER_MAX);
        cnlen = proxyproto_bounded_len(tls->cn, PROXYPROTO_SSL_CN_MAX);
        if (vlen == (size_t)-1 || clen == (size_t)-1 || cnlen == (size_t)-1)
            return -EINVAL;
        ssl_len = PROXYPROTO_V2_SSL_HDR;
        ssl_len += tls->version != NULL ? PROXYPROTO_V2_TLV_HDR + vlen : 0;
        ssl_len += tls->cn != NULL ? PROXYPROTO_V2_TLV_HDR + cnlen : 0;
        ssl_len += tls->cipher != NULL ? PROXYPROTO_V2_TLV_HDR + clen : 0;
        tlv += PROXYPROTO_V2_TLV_HDR + ssl_len;
    } else {
        vlen = clen = cnlen = 0;
    }
    if (opts->unique_id != NULL) {
        if (opts->unique_id_len == 0 || opts->unique_id_len > PROXYPROTO_UNIQUE_ID_MAX)
            return -EINVAL;
        tlv += PROXYPROTO_V2_TLV_HDR + opts->unique_id_len;
    }
    if (opts->crc32c)
        tlv += PROXYPROTO_V2_TLV_HDR + 4;

    if (!opts->local)
        family = proxyproto_pair(src, dst, &s, &d);
    switch (family) {
    case AF_INET:
        fam = 0x11;
        alen = PROXYPROTO_V2_ADDR_INET;
        break;
    case AF_INET6:
        fam = 0x21;
        alen = PROXYPROTO_V2_ADDR_INET6;
        break;
    default:
        alen = 0;
        break;
    }
    if (cap < PROXYPROTO_V2_FIXED + alen + tlv)
        return -ENOBUFS;

    memcpy(out, proxyproto_v2_sig, sizeof(proxyproto_v2_sig));
    out[12] = opts->local ? 0x20 : 0x21;
    out[13] = fam;
    proxyproto_put16(out + 14, (unsigned)(alen + tlv));
    off = PROXYPROTO_V2_FIXED;
    if (family == AF_INET) {
        memcpy(out + off, s.addr + 12, 4);
        memcpy(out + off + 4, d.addr + 12, 4);
        proxyproto_put16(out + off + 8, s.port);
        proxyproto_put16(out + off + 10, d.port);
    } else if (family == AF_INET6) {
        memcpy(out + off, s.addr, 16);
        memcpy(out + off + 16, d.addr, 16);
        proxyproto_put16(out + off + 32, s.port);
        proxyproto_put16(out + off + 34, d.port);
    }
    off += alen;

    if (opts->authority != NULL)
        off = proxyproto_put_tlv(out, off, PROXYPROTO_PP2_TYPE_AUTHORITY, opts->authority, authlen);
    if (tls != NULL) {
        unsigned char client = PROXYPROTO_PP2_CLIENT_SSL;

        client |= tls->cert_conn ? PROXYPROTO_PP2_CLIENT_CERT_CONN : 0;
        client |= tls->cert_sess ? PROXYPROTO_PP2_CLIENT_CERT_SESS : 0;
        out[off] = PROXYPROTO_PP2_TYPE_SSL;
        proxyproto_put16(out + off + 1, (unsigned)ssl_len);
        out[off + 3] = client;
        proxyproto_put32(out + off + 4, tls->verify);
        off += PROXYPROTO_V2_TLV_HDR + PROXYPROTO_V2_SSL_HDR;
        if (tls->version != NULL)
            off = proxyproto_put_tlv(out, off, PROXYPROTO_PP2_SUBTYPE_SSL_VERSION, tls->version,
                                     vlen);
        if (tls->cn != NULL)
            off = proxyproto_put_tlv(out, off, PROXYPROTO_PP2_SUBTYPE_SSL_CN, tls->cn, cnlen);
        if (tls->cipher != NULL)
            off =
                proxyproto_put_tlv(out, off, PROXYPROTO_PP2_SUBTYPE_SSL_CIPHER, tls->cipher, clen);
    }
    if (opts->unique_id != NULL)
        off = proxyproto_put_tlv(out, off, PROXYPROTO_PP2_TYPE_UNIQUE_ID, opts->unique_id,
                                 opts->unique_id_len);
    if (opts->crc32c) {
        static const unsigned char zero[4];
        size_t crc_off = off + PROXYPROTO_V2_TLV_HDR;
        off = proxyproto_put_tlv(out, off, PROXYPROTO_PP2_TYPE_CRC32C, zero, sizeof(zero));
        /* The checksum covers the whole header with its own field still zero. */
        proxyproto_put32(out + crc_off, proxyproto_crc32c(out, off));
    }
    return (int)off;
}

/* --- decoder --------------------------------------------------------------------------------- */

enum proxyproto_state {
    PROXYPROTO_S_START = 0, /* nothing read yet */
    PROXYPROTO_S_V1_SIG,    /* inside "PROXY " */
    PROXYPROTO_S_V1_LINE,   /* after "PROXY ", up to CRLF */
    PROXYPROTO_S_V2_SIG,    /* inside the 12-byte signature */
    PROXYPROTO_S_V2_FIXED,  /* bytes 13 to 16 */
    PROXYPROTO_S_V2_BODY,   /* addresses and TLVs, up to total */
    PROXYPROTO_S_DONE,
    PROXYPROTO_S_ERROR,
};

static const char *const proxyproto_errstr[] = {
    [PROXYPROTO_OK] = "no error",
    [PROXYPROTO_E_SIGNATURE] = "bad signature",
    [PROXYPROTO_E_V1_TOO_LONG] = "v1: line too long",
    [PROXYPROTO_E_V1_CRLF] = "v1: line not terminated by CRLF",
    [PROXYPROTO_E_V1_PROTOCOL] = "v1: unknown protocol",
    [PROXYPROTO_E_V1_SRC_ADDR] = "v1: invalid source address",
    [PROXYPROTO_E_V1_DST_ADDR] = "v1: invalid destination address",
    [PROXYPROTO_E_V1_SRC_PORT] = "v1: invalid source port",
    [PROXYPROTO_E_V1_DST_PORT] = "v1: invalid destination port",
    [PROXYPROTO_E_V1_TRAILING] = "v1: junk after destination port",
    [PROXYPROTO_E_V2_VERSION] = "v2: unsupported version",
    [PROXYPROTO_E_V2_COMMAND] = "v2: unsupported command",
    [PROXYPROTO_E_V2_FAMILY] = "v2: unsupported address family",
    [PROXYPROTO_E_V2_TRANSPORT] = "v2: unsupported transport protocol",
    [PROXYPROTO_E_V2_TOO_LONG] = "v2: length exceeds limit",
    [PROXYPROTO_E_V2_ADDR_SHORT] = "v2: address block too short for family",
    [PROXYPROTO_E_V2_TLV_OVERRUN] = "v2: TLV overruns header",
    [PROXYPROTO_E_V2_TLV_DUPLICATE] = "v2: duplicate TLV",
    [PROXYPROTO_E_V2_SSL_SHORT] = "v2: SSL TLV too short",
    [PROXYPROTO_E_V2_SSL_OVERRUN] = "v2: SSL sub-TLV overruns SSL TLV",
    [PROXYPROTO_E_V2_UNIQUE_ID] = "v2: unique ID too long",
    [PROXYPROTO_E_V2_CRC32C_LEN] = "v2: CRC32C TLV length is not 4",
    [PROXYPROTO_E_V2_CRC32C] = "v2: CRC32C mismatch",
};

const char *proxyproto_strerror(enum proxyproto_err err)
{
    size_t i = (size_t)err;

    if (i >= sizeof(proxyproto_errstr) / sizeof(proxyproto_errstr[0]) ||
        proxyproto_errstr[i] == NULL)
        return "unknown error";
    return proxyproto_errstr[i];
}

enum proxyproto_err proxyproto_error(const struct proxyproto_parser *p)
{
    return p->state == PROXYPROTO_S_ERROR ? (enum proxyproto_err)p->err : PROXYPROTO_OK;
}

size_t proxyproto_error_pos(const struct proxyproto_parser *p)
{
    return p->state == PROXYPROTO_S_ERROR ? p->err_pos : 0;
}

void proxyproto_reset(struct proxyproto_parser *p)
{
    size_t max = p->max_v2_len;

    memset(p, 0, sizeof(*p));
    p->max_v2_len = max;
}

static size_t proxyproto_limit(const struct proxyproto_parser *p)
{
    size_t max = p->max_v2_len == 0 ? PROXYPROTO_V2_DEFAULT_MAX : p->max_v2_len;

    if (max < PROXYPROTO_V2_FIXED)
        max = PROXYPROTO_V2_FIXED;
    if (max > PROXYPROTO_DECODE_MAX)
        max = PROXYPROTO_DECODE_MAX;
    return max;
}

static enum proxyproto_err proxyproto_fail(struct proxyproto_parser *p, enum proxyproto_err e,
                                           size_t pos)
{
    p->state = PROXYPROTO_S_ERROR;
    p->err = (uint8_t)e;
    p->err_pos = pos;
    return e;
}

/* Decimal 0-65535 filling s[0, n) exactly, without a leading zero ("0" itself is fine). */
static bool proxyproto_parse_port(const char *s, size_t n, unsigned *out)
{
    unsigned v = 0;

    if (n == 0 || n > 5 || (s[0] == '0' && n > 1))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > 65535)
        return false;
    *out = v;
    return true;
}

/* Exactly four decimal 0-255 separated by single dots, no leading zeros. */
static bool proxyproto_parse_ipv4(const char *s, size_t n, unsigned char out[4])
{
    size_t i = 0;

    for (int part = 0; part < 4; part++) {
        size_t start = i;
        unsigned v = 0;

        while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 3) {
            v = v * 10 + (unsigned)(s[i] - '0');
            i++;
        }
        if (i == start || v > 255 || (s[start] == '0' && i - start > 1))
            return false;
        out[part] = (unsigned char)v;
        if (part < 3) {
            if (i >= n || s[i] != '.')
                return false;
            i++;
        }
    }
    return i == n;
}

/* Hex groups with at most one "::". A dotted IPv4 tail (::ffff:1.2.3.4) is accepted too: the
 * spec asks for hex only, but senders that format with inet_ntop() write it for mapped
 * addresses. inet_pton() is pure (no I/O, no locale) and does the group arithmetic. */
static bool proxyproto_parse_ipv6(const char *s, size_t n, unsigned char out[16])
{
    char tmp[INET6_ADDRSTRLEN];

    if (n < 2 || n >= sizeof(tmp))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
              c == ':' || c == '.'))
            return false;
    }
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    return inet_pton(AF_INET6, tmp, out) == 1;
}

static void proxyproto_set_sa(struct sockaddr_storage *ss, int family, const unsigned char *addr,
                              unsigned port)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)(void *)ss;
        in->sin_family = AF_INET;
        memcpy(&in->sin_addr, addr, 4);
        in->sin_port = htons((uint16_t)port);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)(void *)ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, addr, 16);
        in6->sin6_port = htons((uint16_t)port);
    }
}

/* Splits off the next field of line[*pos, n), up to a single space or the end. Returns its
 * length; *pos moves past the space. A field is never empty in a valid line, so two spaces in
 * a row, or a space at the end, give an empty field that the field's parser rejects. */
static size_t proxyproto_field(const char *line, size_t n, size_t *pos, const char **start)
{
    size_t i = *pos;

    *start = line + i;
    while (i < n && line[i] != ' ')
        i++;
    size_t len = i - *pos;
    *pos = i < n ? i + 1 : i;
    return len;
}

/* Parses a complete v1 line (CRLF excluded) in p->buf. */
static enum proxyproto_err proxyproto_v1_line(struct proxyproto_parser *p,
                                              struct proxyproto_header *h)
{
    const char *line = (const char *)p->buf;
    size_t n = p->have - 2, pos = sizeof(proxyproto_v1_sig), len;
    const char *f;
    unsigned char sa[16], da[16];
    unsigned sport, dport;
    int family;

    memset(h, 0, sizeof(*h));
    h->version = 1;
    h->command = PROXYPROTO_CMD_PROXY;
    h->family = AF_UNSPEC;
    h->len = p->have;

    size_t proto_pos = pos;
    len = proxyproto_field(line, n, &pos, &f);
    if (len == 7 && memcmp(f, "UNKNOWN", 7) == 0)
        return PROXYPROTO_OK; /* whatever follows is to be ignored */
    if (len == 4 && memcmp(f, "TCP4", 4) == 0)
        family = AF_INET;
    else if (len == 4 && memcmp(f, "TCP6", 4) == 0)
        family = AF_INET6;
    else
        return proxyproto_fail(p, PROXYPROTO_E_V1_PROTOCOL, proto_pos);

    size_t at = pos;
    len = proxyproto_field(line, n, &pos, &f);
    if (family == AF_INET ? !proxyproto_parse_ipv4(f, len, sa) : !proxyproto_parse_ipv6(f, len, sa))
        return proxyproto_fail(p, PROXYPROTO_E_V1_SRC_ADDR, at);
    at = pos;
    len = proxyproto_field(line, n, &pos, &f);
    if (family == AF_INET ? !proxyproto_parse_ipv4(f, len, da) : !proxyproto_parse_ipv6(f, len, da))
        return proxyproto_fail(p, PROXYPROTO_E_V1_DST_ADDR, at);
    at = pos;
    len = proxyproto_field(line, n, &pos, &f);
    if (!proxyproto_parse_port(f, len, &sport))
        return proxyproto_fail(p, PROXYPROTO_E_V1_SRC_PORT, at);
    at = pos;
    len = proxyproto_field(line, n, &pos, &f);
    if (!proxyproto_parse_port(f, len, &dport))
        return proxyproto_fail(p, PROXYPROTO_E_V1_DST_PORT, at);
    /* pos == n unless a space followed the port: then something (maybe empty) is left over. */
    if (pos != n || line[n - 1] == ' ')
        return proxyproto_fail(p, PROXYPROTO_E_V1_TRAILING, at + len);

    h->family = family;
    proxyproto_set_sa(&h->src, family, sa, sport);
    proxyproto_set_sa(&h->dst, family, da, dport);
    return PROXYPROTO_OK;
}

/* Checks bytes 13 to 16 as they arrive, so a bad header fails at its first wrong byte. */
static enum proxyproto_err proxyproto_v2_fixed(struct proxyproto_parser *p)
{
    const unsigned char *b = p->buf;

    switch (p->have) {
    case 13:
        if ((b[12] >> 4) != 2)
            return proxyproto_fail(p, PROXYPROTO_E_V2_VERSION, 12);
        if ((b[12] & 0x0f) > 1)
            return proxyproto_fail(p, PROXYPROTO_E_V2_COMMAND, 12);
        return PROXYPROTO_OK;
    case 14:
        if ((b[13] >> 4) > 3)
            return proxyproto_fail(p, PROXYPROTO_E_V2_FAMILY, 13);
        if ((b[13] & 0x0f) > 2)
            return proxyproto_fail(p, PROXYPROTO_E_V2_TRANSPORT, 13);
        return PROXYPROTO_OK;
    case 15:
        return PROXYPROTO_OK;
    default:
        break;
    }

    size_t body = proxyproto_get16(b + 14);
    p->total = PROXYPROTO_V2_FIXED + body;
    if (p->total > proxyproto_limit(p))
        return proxyproto_fail(p, PROXYPROTO_E_V2_TOO_LONG, 14);
    /* A transport of UNSPEC leaves the block's layout undefined: nothing to require. */
    if ((b[12] & 0x0f) == PROXYPROTO_CMD_PROXY && (b[13] & 0x0f) != 0) {
        static const size_t need[4] = {0, PROXYPROTO_V2_ADDR_INET, PROXYPROTO_V2_ADDR_INET6,
                                       PROXYPROTO_V2_ADDR_UNIX};
        if (body < need[b[13] >> 4])
            return proxyproto_fail(p, PROXYPROTO_E_V2_ADDR_SHORT, 14);
    }
    return PROXYPROTO_OK;
}

/* Walks the SSL TLV's value v[0, n). */
static enum proxyproto_err proxyproto_v2_ssl(struct proxyproto_parser *p,
                                             struct proxyproto_header *h, size_t at, size_t n)
{
    const unsigned char *v = p->buf + at;
    size_t i = PROXYPROTO_V2_SSL_HDR;

    if (n < PROXYPROTO_V2_SSL_HDR)
        return proxyproto_fail(p, PROXYPROTO_E_V2_SSL_SHORT, at);
    h->has_ssl = true;
    h->ssl_client = v[0];
    h->ssl_verify = proxyproto_get32(v + 1);
    while (i < n) {
        if (n - i < PROXYPROTO_V2_TLV_HDR)
            return proxyproto_fail(p, PROXYPROTO_E_V2_SSL_OVERRUN, at + i);
        unsigned type = v[i];
        size_t len = proxyproto_get16(v + i + 1);
        if (len > n - i - PROXYPROTO_V2_TLV_HDR)
            return proxyproto_fail(p, PROXYPROTO_E_V2_SSL_OVERRUN, at + i);
        struct proxyproto_bytes *dst = NULL;
        if (type == PROXYPROTO_PP2_SUBTYPE_SSL_VERSION)
            dst = &h->ssl_version;
        else if (type == PROXYPROTO_PP2_SUBTYPE_SSL_CIPHER)
            dst = &h->ssl_cipher;
        else if (type == PROXYPROTO_PP2_SUBTYPE_SSL_CN)
            dst = &h->ssl_cn;
        if (dst != NULL) {
            if (dst->p != NULL)
                return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_DUPLICATE, at + i);
            dst->p = (const char *)v + i + PROXYPROTO_V2_TLV_HDR;
            dst->len = len;
        }
        i += PROXYPROTO_V2_TLV_HDR + len;
    }
    return PROXYPROTO_OK;
}

/* Parses the whole v2 header in p->buf[0, total). */
static enum proxyproto_err proxyproto_v2_body(struct proxyproto_parser *p,
                                              struct proxyproto_header *h)
{
    unsigned char *b = p->buf;
    size_t total = p->total, off = PROXYPROTO_V2_FIXED, crc_at = 0;
    enum proxyproto_err e;

    memset(h, 0, sizeof(*h));
    h->version = 2;
    h->v2_fam = b[13];
    h->command = (enum proxyproto_cmd)(b[12] & 0x0f);
    h->family = AF_UNSPEC;
    h->len = total;

    /* LOCAL: the spec says to discard the whole block, family included. UNSPEC: the address
     * block has no defined length, so nothing after it can be located either. */
    if (h->command == PROXYPROTO_CMD_LOCAL || (b[13] >> 4) == 0 || (b[13] & 0x0f) == 0)
        return PROXYPROTO_OK;

    switch (b[13]) {
    case 0x11:
        h->family = AF_INET;
        proxyproto_set_sa(&h->src, AF_INET, b + off, proxyproto_get16(b + off + 8));
        proxyproto_set_sa(&h->dst, AF_INET, b + off + 4, proxyproto_get16(b + off + 10));
        off += PROXYPROTO_V2_ADDR_INET;
        break;
    case 0x21:
        h->family = AF_INET6;
        proxyproto_set_sa(&h->src, AF_INET6, b + off, proxyproto_get16(b + off + 32));
        proxyproto_set_sa(&h->dst, AF_INET6, b + off + 16, proxyproto_get16(b + off + 34));
        off += PROXYPROTO_V2_ADDR_INET6;
        break;
    /* UDP and UNIX are valid but not ours: fall back to UNSPEC, still reading the TLVs. */
    case 0x12:
        off += PROXYPROTO_V2_ADDR_INET;
        break;
    case 0x22:
        off += PROXYPROTO_V2_ADDR_INET6;
        break;
    default: /* 0x31, 0x32: proxyproto_v2_fixed() let no other value through */
        off += PROXYPROTO_V2_ADDR_UNIX;
        break;
    }

    while (off < total) {
        if (total - off < PROXYPROTO_V2_TLV_HDR)
            return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_OVERRUN, off);
        unsigned type = b[off];
        size_t len = proxyproto_get16(b + off + 1);
        size_t val = off + PROXYPROTO_V2_TLV_HDR;
        if (len > total - val)
            return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_OVERRUN, off);
        switch (type) {
        case PROXYPROTO_PP2_TYPE_AUTHORITY:
            if (h->authority.p != NULL)
                return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_DUPLICATE, off);
            h->authority.p = (const char *)b + val;
            h->authority.len = len;
            break;
        case PROXYPROTO_PP2_TYPE_UNIQUE_ID:
            if (h->unique_id.p != NULL)
                return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_DUPLICATE, off);
            if (len > PROXYPROTO_UNIQUE_ID_MAX)
                return proxyproto_fail(p, PROXYPROTO_E_V2_UNIQUE_ID, off);
            h->unique_id.p = (const char *)b + val;
            h->unique_id.len = len;
            break;
        case PROXYPROTO_PP2_TYPE_SSL:
            if (h->has_ssl)
                return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_DUPLICATE, off);
            e = proxyproto_v2_ssl(p, h, val, len);
            if (e != PROXYPROTO_OK)
                return e;
            break;
        case PROXYPROTO_PP2_TYPE_CRC32C:
            if (crc_at != 0)
                return proxyproto_fail(p, PROXYPROTO_E_V2_TLV_DUPLICATE, off);
            if (len != 4)
                return proxyproto_fail(p, PROXYPROTO_E_V2_CRC32C_LEN, off);
            crc_at = val;
            break;
        default: /* ALPN, NOOP, NETNS, vendor types: skipped */
            break;
        }
        off = val + len;
    }

    if (crc_at != 0) {
        uint32_t want = proxyproto_get32(b + crc_at);
        unsigned char saved[4];

        /* The sum covers the header with the checksum field zeroed; the parser owns buf. */
        memcpy(saved, b + crc_at, 4);
        memset(b + crc_at, 0, 4);
        uint32_t got = proxyproto_crc32c(b, total);
        memcpy(b + crc_at, saved, 4);
        if (got != want)
            return proxyproto_fail(p, PROXYPROTO_E_V2_CRC32C, crc_at);
        h->has_crc32c = true;
    }
    return PROXYPROTO_OK;
}

enum proxyproto_status proxyproto_decode(struct proxyproto_parser *p, const void *bufp, size_t len,
                                         size_t *consumed, struct proxyproto_header *hdr)
{
    const unsigned char *in = bufp;
    size_t i = 0;

    *consumed = 0;
    if (p->state == PROXYPROTO_S_ERROR)
        return PROXYPROTO_ERROR;
    if (p->state == PROXYPROTO_S_DONE) {
        /* Fill *hdr again, from the header kept in buf. */
        if (p->buf[0] == 'P')
            (void)proxyproto_v1_line(p, hdr);
        else
            (void)proxyproto_v2_body(p, hdr);
        return PROXYPROTO_DONE;
    }

    while (i < len) {
        if (p->state == PROXYPROTO_S_V2_BODY) {
            /* Addresses and TLVs are only looked at whole: copy what there is. */
            size_t n = p->total - p->have;
            if (n > len - i)
                n = len - i;
            memcpy(p->buf + p->have, in + i, n);
            p->have += n;
            i += n;
            if (p->have < p->total)
                break;
            *consumed = i;
            if (proxyproto_v2_body(p, hdr) != PROXYPROTO_OK)
                return PROXYPROTO_ERROR;
            p->state = PROXYPROTO_S_DONE;
            return PROXYPROTO_DONE;
        }

        unsigned char c = in[i++];
        size_t at = p->have;
        p->buf[p->have++] = c;
        *consumed = i;

        switch (p->state) {
        case PROXYPROTO_S_START:
            /* Decide on the first byte: nothing else may start a header. */
            if (c == proxyproto_v1_sig[0]) {
                p->state = PROXYPROTO_S_V1_SIG;
            } else if (c == proxyproto_v2_sig[0]) {
                p->state = PROXYPROTO_S_V2_SIG;
            } else {
                proxyproto_fail(p, PROXYPROTO_E_SIGNATURE, at);
                return PROXYPROTO_ERROR;
            }
            break;
        case PROXYPROTO_S_V1_SIG:
            if (c != (unsigned char)proxyproto_v1_sig[at]) {
                proxyproto_fail(p, PROXYPROTO_E_SIGNATURE, at);
                return PROXYPROTO_ERROR;
            }
            if (p->have == sizeof(proxyproto_v1_sig))
                p->state = PROXYPROTO_S_V1_LINE;
            break;
        case PROXYPROTO_S_V1_LINE:
            if (c == '\n') {
                if (p->buf[at - 1] != '\r') {
                    proxyproto_fail(p, PROXYPROTO_E_V1_CRLF, at);
                    return PROXYPROTO_ERROR;
                }
                if (proxyproto_v1_line(p, hdr) != PROXYPROTO_OK)
                    return PROXYPROTO_ERROR;
                p->state = PROXYPROTO_S_DONE;
                return PROXYPROTO_DONE;
            }
            if (p->buf[at - 1] == '\r') {
                proxyproto_fail(p, PROXYPROTO_E_V1_CRLF, at - 1);
                return PROXYPROTO_ERROR;
            }
            if (p->have >= PROXYPROTO_V1_LINE_MAX) {
                proxyproto_fail(p, PROXYPROTO_E_V1_TOO_LONG, at);
                return PROXYPROTO_ERROR;
            }
            break;
        case PROXYPROTO_S_V2_SIG:
            if (c != proxyproto_v2_sig[at]) {
                proxyproto_fail(p, PROXYPROTO_E_SIGNATURE, at);
                return PROXYPROTO_ERROR;
            }
            if (p->have == sizeof(proxyproto_v2_sig))
                p->state = PROXYPROTO_S_V2_FIXED;
            break;
        case PROXYPROTO_S_V2_FIXED:
            if (proxyproto_v2_fixed(p) != PROXYPROTO_OK)
                return PROXYPROTO_ERROR;
            if (p->have < PROXYPROTO_V2_FIXED)
                break;
            if (p->total == PROXYPROTO_V2_FIXED) {
                (void)proxyproto_v2_body(p, hdr);
                p->state = PROXYPROTO_S_DONE;
                return PROXYPROTO_DONE;
            }
            p->state = PROXYPROTO_S_V2_BODY;
            break;
        default:
            abort(); /* DONE, ERROR and V2_BODY are handled above */
        }
    }
    *consumed = i;
    return PROXYPROTO_NEED_MORE;
}
