/* fuzz_proxyproto.c: libFuzzer harness for the PROXY protocol decoder and XCLIENT helpers.
 *
 * Input: byte 0 seeds the split points, byte 1 picks the parser's max_v2_len (0: default), the
 * rest is what a load balancer would send. The input is decoded whole and again in pieces; both
 * runs must agree, and every call must keep the contract in proxyproto.h. A decoded PROXY header
 * is re-encoded as v1 and v2 and decoded again: the addresses and TLVs must survive. The same
 * bytes are then read as an EHLO reply line and used as a HELO value for XCLIENT.
 */
#include "fuzz.h"
#include "proxyproto.h"
#include "sockaddr.h"
#include "xclient.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fuzz_run {
    enum proxyproto_status st;
    enum proxyproto_err err;
    size_t consumed;
    struct proxyproto_header h;
};

static bool fuzz_sa_same(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    /* The decoder fills AF_INET, AF_INET6 or nothing (AF_UNSPEC). */
    return a->ss_family == b->ss_family &&
           (a->ss_family == AF_UNSPEC ||
            sockaddr_equal((const struct sockaddr *)a, (const struct sockaddr *)b));
}

static bool fuzz_bytes_same(struct proxyproto_bytes a, struct proxyproto_bytes b)
{
    if ((a.p == NULL) != (b.p == NULL))
        return false;
    return a.p == NULL || (a.len == b.len && memcmp(a.p, b.p, a.len) == 0);
}

/* A borrowed value must lie inside the header the parser holds. */
static void fuzz_check_bytes(const struct proxyproto_parser *p, struct proxyproto_bytes b,
                             size_t hdr_len)
{
    if (b.p == NULL)
        return;
    const char *base = (const char *)p->buf;
    FUZZ_CHECK(b.p >= base && b.p + b.len <= base + hdr_len);
}

/* Checks what a DONE header may contain. */
static void fuzz_check_header(const struct proxyproto_parser *p, const struct proxyproto_header *h)
{
    FUZZ_CHECK(h->version == 1 || h->version == 2);
    FUZZ_CHECK(h->command == PROXYPROTO_CMD_LOCAL || h->command == PROXYPROTO_CMD_PROXY);
    FUZZ_CHECK(h->family == AF_INET || h->family == AF_INET6 || h->family == AF_UNSPEC);
    FUZZ_CHECK(h->src.ss_family == h->family && h->dst.ss_family == h->family);
    if (h->family != AF_UNSPEC)
        FUZZ_CHECK(h->command == PROXYPROTO_CMD_PROXY);
    if (h->version == 1)
        FUZZ_CHECK(h->len <= PROXYPROTO_V1_LINE_MAX);
    else
        FUZZ_CHECK(h->len >= PROXYPROTO_V2_FIXED && h->len <= PROXYPROTO_DECODE_MAX);
    fuzz_check_bytes(p, h->authority, h->len);
    fuzz_check_bytes(p, h->unique_id, h->len);
    fuzz_check_bytes(p, h->ssl_version, h->len);
    fuzz_check_bytes(p, h->ssl_cipher, h->len);
    fuzz_check_bytes(p, h->ssl_cn, h->len);
    if (h->unique_id.p != NULL)
        FUZZ_CHECK(h->unique_id.len <= PROXYPROTO_UNIQUE_ID_MAX);
}

/* Feeds in[0, n) in pieces whose sizes come from seed (0: whole). */
static void fuzz_decode(struct proxyproto_parser *p, struct fuzz_run *r, const uint8_t *in,
                        size_t n, unsigned seed, size_t max_v2_len)
{
    size_t off = 0;

    memset(p, 0, sizeof(*p));
    p->max_v2_len = max_v2_len;
    memset(r, 0, sizeof(*r));
    r->st = PROXYPROTO_NEED_MORE;
    do {
        size_t piece = n - off;
        if (seed != 0) {
            seed = seed * 1103515245u + 12345u;
            piece = (seed >> 16) % 17; /* 0 to 16: empty calls too */
            if (piece > n - off)
                piece = n - off;
        }
        size_t used = (size_t)-1;
        r->st = proxyproto_decode(p, in + off, piece, &used, &r->h);
        FUZZ_CHECK(used <= piece);
        if (r->st == PROXYPROTO_NEED_MORE)
            FUZZ_CHECK(used == piece);
        off += used;
        r->consumed += used;
    } while (r->st == PROXYPROTO_NEED_MORE && off < n);
    r->err = proxyproto_error(p);
    FUZZ_CHECK((r->st == PROXYPROTO_ERROR) == (r->err != PROXYPROTO_OK));
    FUZZ_CHECK(strlen(proxyproto_strerror(r->err)) > 0);
    if (r->st == PROXYPROTO_DONE) {
        FUZZ_CHECK(r->h.len == r->consumed);
        fuzz_check_header(p, &r->h);
    }
    if (r->st == PROXYPROTO_NEED_MORE)
        FUZZ_CHECK(r->consumed == n);
}

/* Copies b into a NUL-terminated string if it has no NUL and at most max bytes. */
static const char *fuzz_cstr(struct proxyproto_bytes b, size_t max, char *out)
{
    if (b.p == NULL || b.len > max || memchr(b.p, '\0', b.len) != NULL)
        return NULL;
    memcpy(out, b.p, b.len);
    out[b.len] = '\0';
    return out;
}

/* Re-encodes a decoded PROXY header and checks that decoding gives it back. */
static void fuzz_round_trip(const struct proxyproto_header *h)
{
    static struct proxyproto_parser p2;
    static unsigned char out[PROXYPROTO_V2_MAX];
    char line[PROXYPROTO_V1_MAX];
    struct {
        char auth[PROXYPROTO_AUTHORITY_MAX + 1];
        char ver[PROXYPROTO_SSL_VERSION_MAX + 1];
        char ciph[PROXYPROTO_SSL_CIPHER_MAX + 1];
        char cn[PROXYPROTO_SSL_CN_MAX + 1];
    } str; /* NUL-terminated copies the encoder reads */
    struct proxyproto_header h2;
    struct proxyproto_tls_info tls;
    struct proxyproto_v2_opts opts;
    size_t used;
    int n;

    if (h->command != PROXYPROTO_CMD_PROXY || h->family == AF_UNSPEC)
        return;

    n = proxyproto_encode_v1(line, sizeof(line), (const struct sockaddr *)&h->src,
                             (const struct sockaddr *)&h->dst);
    FUZZ_CHECK(n > 0 && (size_t)n < sizeof(line));
    memset(&p2, 0, sizeof(p2));
    FUZZ_CHECK(proxyproto_decode(&p2, line, (size_t)n, &used, &h2) == PROXYPROTO_DONE);
    FUZZ_CHECK(used == (size_t)n && h2.family == h->family);
    FUZZ_CHECK(fuzz_sa_same(&h2.src, &h->src) && fuzz_sa_same(&h2.dst, &h->dst));

    memset(&tls, 0, sizeof(tls));
    memset(&opts, 0, sizeof(opts));
    opts.authority = fuzz_cstr(h->authority, PROXYPROTO_AUTHORITY_MAX, str.auth);
    if (h->unique_id.p != NULL && h->unique_id.len > 0) {
        opts.unique_id = h->unique_id.p;
        opts.unique_id_len = h->unique_id.len;
    }
    if (h->has_ssl) {
        tls.version = fuzz_cstr(h->ssl_version, PROXYPROTO_SSL_VERSION_MAX, str.ver);
        tls.cipher = fuzz_cstr(h->ssl_cipher, PROXYPROTO_SSL_CIPHER_MAX, str.ciph);
        tls.cn = fuzz_cstr(h->ssl_cn, PROXYPROTO_SSL_CN_MAX, str.cn);
        tls.cert_conn = (h->ssl_client & PROXYPROTO_PP2_CLIENT_CERT_CONN) != 0;
        tls.cert_sess = (h->ssl_client & PROXYPROTO_PP2_CLIENT_CERT_SESS) != 0;
        tls.verify = h->ssl_verify;
        opts.tls = &tls;
    }
    opts.crc32c = h->has_crc32c;
    n = proxyproto_encode_v2(out, sizeof(out), (const struct sockaddr *)&h->src,
                             (const struct sockaddr *)&h->dst, &opts);
    FUZZ_CHECK(n >= PROXYPROTO_V2_FIXED && n <= PROXYPROTO_V2_MAX);
    memset(&p2, 0, sizeof(p2));
    FUZZ_CHECK(proxyproto_decode(&p2, out, (size_t)n, &used, &h2) == PROXYPROTO_DONE);
    FUZZ_CHECK(used == (size_t)n && h2.len == (size_t)n && h2.family == h->family);
    FUZZ_CHECK(fuzz_sa_same(&h2.src, &h->src) && fuzz_sa_same(&h2.dst, &h->dst));
    if (opts.authority != NULL)
        FUZZ_CHECK(fuzz_bytes_same(h2.authority, h->authority));
    if (opts.unique_id != NULL)
        FUZZ_CHECK(fuzz_bytes_same(h2.unique_id, h->unique_id));
    FUZZ_CHECK(h2.has_ssl == h->has_ssl);
    if (h->has_ssl) {
        FUZZ_CHECK(h2.ssl_verify == h->ssl_verify);
        if (tls.version != NULL)
            FUZZ_CHECK(fuzz_bytes_same(h2.ssl_version, h->ssl_version));
        if (tls.cipher != NULL)
            FUZZ_CHECK(fuzz_bytes_same(h2.ssl_cipher, h->ssl_cipher));
        if (tls.cn != NULL)
            FUZZ_CHECK(fuzz_bytes_same(h2.ssl_cn, h->ssl_cn));
    }
    FUZZ_CHECK(h2.has_crc32c == h->has_crc32c);
}

/* The input as an EHLO line, then as HELO and NAME values: every XCLIENT line must stay within
 * XCLIENT_LINE_MAX and every attribute must be sent exactly once. */
static void fuzz_xclient(const uint8_t *in, size_t n)
{
    static char val[1024];
    static char out[XCLIENT_LINE_MAX + 1];
    unsigned caps = 0;
    size_t vl = n < sizeof(val) - 1 ? n : sizeof(val) - 1;

    (void)xclient_ehlo_line_caps((const char *)in, n, &caps);
    FUZZ_CHECK((caps & ~(unsigned)XCLIENT_F_ALL) == 0);

    memcpy(val, in, vl);
    val[vl] = '\0';
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(25)};
    if (n >= 16)
        memcpy(&a.sin6_addr, in, 16);
    struct xclient_info info = {.addr = (const struct sockaddr *)&a,
                                .helo = val,
                                .name = val,
                                .login = (n % 2) == 0 ? val + vl / 2 : NULL,
                                .proto = (enum xclient_proto)(n % 3)};
    unsigned todo = XCLIENT_F_ALL;
    int lines = 0;
    do {
        unsigned before = todo;
        int len = xclient_format(out, sizeof(out), &todo, &info);
        FUZZ_CHECK(len >= 0 && len <= XCLIENT_LINE_MAX);
        FUZZ_CHECK((todo & ~before) == 0);
        if (len > 0) {
            FUZZ_CHECK(strlen(out) == (size_t)len);
            FUZZ_CHECK(memcmp(out, "XCLIENT ", 8) == 0 && memcmp(out + len - 2, "\r\n", 2) == 0);
            FUZZ_CHECK(strpbrk(out, "\r\n") == out + len - 2);
            FUZZ_CHECK(todo != before);
        }
        FUZZ_CHECK(++lines <= 8);
    } while (todo != 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct proxyproto_parser pa, pb;
    static struct fuzz_run whole, split;

    if (size < 2)
        return 0;
    unsigned seed = data[0] | 1u;
    size_t max_v2_len = data[1] == 0 ? 0 : (size_t)data[1] * 5;
    const uint8_t *in = data + 2;
    size_t n = size - 2;

    fuzz_decode(&pa, &whole, in, n, 0, max_v2_len);
    fuzz_decode(&pb, &split, in, n, seed, max_v2_len);
    FUZZ_CHECK(whole.st == split.st && whole.err == split.err);
    FUZZ_CHECK(whole.consumed == split.consumed);
    FUZZ_CHECK(proxyproto_error_pos(&pa) == proxyproto_error_pos(&pb));
    if (whole.st == PROXYPROTO_DONE) {
        FUZZ_CHECK(whole.h.len == split.h.len && whole.h.family == split.h.family);
        FUZZ_CHECK(fuzz_sa_same(&whole.h.src, &split.h.src));
        FUZZ_CHECK(fuzz_sa_same(&whole.h.dst, &split.h.dst));
        FUZZ_CHECK(fuzz_bytes_same(whole.h.authority, split.h.authority));
        FUZZ_CHECK(fuzz_bytes_same(whole.h.ssl_cipher, split.h.ssl_cipher));
        fuzz_round_trip(&whole.h);
    }
    fuzz_xclient(in, n);
    return 0;
}
