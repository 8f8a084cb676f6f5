/* test_proxyproto.c: unit tests for proxy/proxyproto.c, PROXY v1/v2.
 *
 * Encoders are checked byte for byte against arrays written by hand from the spec
 * (doc/proxy-protocol.txt); every decoder case runs whole, one byte at a time and split at every
 * point, each time from a copy placed flush against a PROT_NONE page, so an over-read crashes.
 */
#include "proxyproto.h"
#include "sockaddr.h"
#include "test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/un.h>
#include <unistd.h>

/* --- guard page ------------------------------------------------------------------------------ */

/* --- addresses ------------------------------------------------------------------------------- */

static struct sockaddr_storage sa4(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    ASSERT_EQ(inet_pton(AF_INET, ip, &in->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage sa6(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    ASSERT_EQ(inet_pton(AF_INET6, ip, &in6->sin6_addr), 1);
    return ss;
}

#define SA(ss) ((const struct sockaddr *)&(ss))

/* Same family, address and port (only what the decoder fills). */
static bool sa_same(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    /* The decoder fills AF_INET, AF_INET6 or nothing (AF_UNSPEC). */
    return a->ss_family == b->ss_family &&
           (a->ss_family == AF_UNSPEC ||
            sockaddr_equal((const struct sockaddr *)a, (const struct sockaddr *)b));
}

static bool bytes_same(struct proxyproto_bytes a, struct proxyproto_bytes b)
{
    if ((a.p == NULL) != (b.p == NULL))
        return false;
    return a.p == NULL || (a.len == b.len && memcmp(a.p, b.p, a.len) == 0);
}

static bool bytes_is(struct proxyproto_bytes a, const char *s)
{
    return a.p != NULL && a.len == strlen(s) && memcmp(a.p, s, a.len) == 0;
}

/* --- decoder driver -------------------------------------------------------------------------- */

/* The outcome of one decode run, with TLV bytes copied out of the parser. */
struct outcome {
    enum proxyproto_status st;
    enum proxyproto_err err;
    size_t err_pos;
    size_t consumed; /* over all calls */
    struct proxyproto_header h;
    char store[PROXYPROTO_DECODE_MAX]; /* the parser's header, for h's borrowed bytes */
};

/* Feeds in[0, n) in pieces: cut[0..ncut) are the split points. Stops at the first non-NEED_MORE
 * status and checks the calling contract on the way. */
static void run(struct outcome *o, const void *in, size_t n, const size_t *cut, size_t ncut,
                size_t max_v2_len)
{
    static struct proxyproto_parser p;
    struct guard g;
    const char *buf = guard_place(&g, in, n);
    size_t from = 0;

    memset(&p, 0, sizeof(p));
    p.max_v2_len = max_v2_len;
    memset(o, 0, sizeof(*o));
    o->st = PROXYPROTO_NEED_MORE;
    for (size_t k = 0; k <= ncut && o->st == PROXYPROTO_NEED_MORE; k++) {
        size_t to = k < ncut ? cut[k] : n;
        size_t used = 12345;

        o->st = proxyproto_decode(&p, buf + from, to - from, &used, &o->h);
        ASSERT(used <= to - from);
        if (o->st == PROXYPROTO_NEED_MORE)
            ASSERT_EQ(used, to - from);
        else
            ASSERT(used > 0);
        o->consumed += used;
        from = to;
    }
    o->err = proxyproto_error(&p);
    o->err_pos = proxyproto_error_pos(&p);
    if (o->st == PROXYPROTO_DONE) {
        ASSERT_EQ(o->err, PROXYPROTO_OK);
        ASSERT_EQ(o->h.len, o->consumed);
        /* A finished parser takes nothing more and reports the same header. */
        struct proxyproto_header again;
        size_t used = 1;
        ASSERT_EQ(proxyproto_decode(&p, "x", 1, &used, &again), PROXYPROTO_DONE);
        ASSERT_EQ(used, 0);
        ASSERT_EQ(again.len, o->h.len);
        ASSERT(sa_same(&again.src, &o->h.src));
        /* Rebase borrowed bytes onto our copy of the parser's buffer. */
        memcpy(o->store, p.buf, sizeof(o->store));
        struct proxyproto_bytes *b[] = {&o->h.authority, &o->h.unique_id, &o->h.ssl_version,
                                        &o->h.ssl_cipher, &o->h.ssl_cn};
        for (size_t i = 0; i < sizeof(b) / sizeof(b[0]); i++)
            if (b[i]->p != NULL)
                b[i]->p = o->store + (b[i]->p - (const char *)p.buf);
    } else if (o->st == PROXYPROTO_ERROR) {
        ASSERT(o->err != PROXYPROTO_OK);
        size_t used = 1;
        ASSERT_EQ(proxyproto_decode(&p, "x", 1, &used, &o->h), PROXYPROTO_ERROR);
        ASSERT_EQ(used, 0);
    } else {
        ASSERT_EQ(o->consumed, n);
    }
    guard_free(&g);
}

static void same_outcome(const struct outcome *a, const struct outcome *b, const char *how)
{
    if (a->st != b->st || a->err != b->err || a->consumed != b->consumed) {
        TEST_FAIL_("%s: status %d/%d err \"%s\"/\"%s\" consumed %zu/%zu", how, a->st, b->st,
                   proxyproto_strerror(a->err), proxyproto_strerror(b->err), a->consumed,
                   b->consumed);
    }
    ASSERT_EQ(a->err_pos, b->err_pos);
    if (a->st != PROXYPROTO_DONE)
        return;
    ASSERT_EQ(a->h.version, b->h.version);
    ASSERT_EQ(a->h.command, b->h.command);
    ASSERT_EQ(a->h.family, b->h.family);
    ASSERT_EQ(a->h.v2_fam, b->h.v2_fam);
    ASSERT_EQ(a->h.len, b->h.len);
    ASSERT(sa_same(&a->h.src, &b->h.src));
    ASSERT(sa_same(&a->h.dst, &b->h.dst));
    ASSERT(bytes_same(a->h.authority, b->h.authority));
    ASSERT(bytes_same(a->h.unique_id, b->h.unique_id));
    ASSERT_EQ(a->h.has_ssl, b->h.has_ssl);
    ASSERT_EQ(a->h.ssl_client, b->h.ssl_client);
    ASSERT_EQ(a->h.ssl_verify, b->h.ssl_verify);
    ASSERT(bytes_same(a->h.ssl_version, b->h.ssl_version));
    ASSERT(bytes_same(a->h.ssl_cipher, b->h.ssl_cipher));
    ASSERT(bytes_same(a->h.ssl_cn, b->h.ssl_cn));
    ASSERT_EQ(a->h.has_crc32c, b->h.has_crc32c);
}

/* Decodes in[0, n) whole, byte by byte, and split once at every point; all must agree. */
static void decode_max(struct outcome *o, const void *in, size_t n, size_t max_v2_len)
{
    static struct outcome other;
    size_t cuts[PROXYPROTO_DECODE_MAX + 64];

    ASSERT(n < sizeof(cuts) / sizeof(cuts[0]));
    run(o, in, n, NULL, 0, max_v2_len);
    for (size_t i = 0; i + 1 < n; i++)
        cuts[i] = i + 1;
    run(&other, in, n, cuts, n > 0 ? n - 1 : 0, max_v2_len);
    same_outcome(o, &other, "byte at a time");
    for (size_t k = 0; k <= n; k++) {
        cuts[0] = k;
        run(&other, in, n, cuts, 1, max_v2_len);
        same_outcome(o, &other, "split once");
    }
}

static void decode(struct outcome *o, const void *in, size_t n)
{
    decode_max(o, in, n, 0);
}

/* Asserts that in[0, n) is refused with err, after exactly `consumed` bytes. */
static void expect_error_at(const void *in, size_t n, enum proxyproto_err err, size_t consumed,
                            int line)
{
    static struct outcome o;

    decode(&o, in, n);
    if (o.st != PROXYPROTO_ERROR || o.err != err || o.consumed != consumed) {
        fprintf(stderr, "line %d: ", line);
        TEST_FAIL_("want ERROR \"%s\" after %zu bytes, got status %d \"%s\" after %zu",
                   proxyproto_strerror(err), consumed, o.st, proxyproto_strerror(o.err),
                   o.consumed);
    }
}

/* Asserts that the string s is refused with err once it is whole (at its last byte). */
static void expect_error_str(const char *s, enum proxyproto_err err, int line)
{
    expect_error_at(s, strlen(s), err, strlen(s), line);
}

#define EXPECT_ERR(s, err) expect_error_str((s), (err), __LINE__)
#define EXPECT_ERR_AT(s, n, err, at) expect_error_at((s), (n), (err), (at), __LINE__)
#define EXPECT_ERR_BUF(b, n, err) expect_error_at((b), (n), (err), (n), __LINE__)

static const unsigned char SIG[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                      0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};

/* Builds SIG + rest into out; returns the length. */
static size_t v2(unsigned char *out, const unsigned char *rest, size_t n)
{
    memcpy(out, SIG, sizeof(SIG));
    memcpy(out + sizeof(SIG), rest, n);
    return sizeof(SIG) + n;
}

/* --- v1 encoder ------------------------------------------------------------------------------ */

static void test_v1_encode(void)
{
    struct sockaddr_storage s4 = sa4("192.0.2.1", 56324), d4 = sa4("198.51.100.2", 25);
    struct sockaddr_storage s6 = sa6("2001:db8::1", 40000), d6 = sa6("2001:db8:0:1::25", 587);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    char out[PROXYPROTO_V1_MAX];
    int n;

    n = proxyproto_encode_v1(out, sizeof(out), SA(s4), SA(d4));
    ASSERT_MEMEQ(out, (size_t)n, "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n", 44);
    ASSERT_EQ(out[n], '\0');

    n = proxyproto_encode_v1(out, sizeof(out), SA(s6), SA(d6));
    ASSERT_STREQ(out, "PROXY TCP6 2001:db8::1 2001:db8:0:1::25 40000 587\r\n");
    ASSERT_EQ(n, 51);

    /* Unknown families, or none, give the short UNKNOWN form. */
    n = proxyproto_encode_v1(out, sizeof(out), (const struct sockaddr *)&un, SA(d4));
    ASSERT_STREQ(out, "PROXY UNKNOWN\r\n");
    ASSERT_EQ(n, 15);
    ASSERT_EQ(proxyproto_encode_v1(out, sizeof(out), NULL, NULL), 15);
    ASSERT_STREQ(out, "PROXY UNKNOWN\r\n");

    /* One IPv4 and one IPv6 end: TCP6 with the IPv4 one mapped, in hex groups only. */
    n = proxyproto_encode_v1(out, sizeof(out), SA(s4), SA(d6));
    ASSERT_STREQ(out, "PROXY TCP6 ::ffff:c000:201 2001:db8:0:1::25 56324 587\r\n");
    ASSERT_EQ(n, 55);

    /* RFC 5952: the longest zero run is compressed, a single zero group is not, ports 0 ok. */
    struct sockaddr_storage a = sa6("1:0:0:2:0:0:0:3", 0), b = sa6("::", 65535);
    proxyproto_encode_v1(out, sizeof(out), SA(a), SA(b));
    ASSERT_STREQ(out, "PROXY TCP6 1:0:0:2::3 :: 0 65535\r\n");
    a = sa6("1:0:2:0:3:0:4:0", 1);
    b = sa6("::1", 2);
    proxyproto_encode_v1(out, sizeof(out), SA(a), SA(b));
    ASSERT_STREQ(out, "PROXY TCP6 1:0:2:0:3:0:4:0 ::1 1 2\r\n");

    /* The longest TCP6 line is 104 bytes and fits PROXYPROTO_V1_MAX with its NUL. */
    a = sa6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535);
    n = proxyproto_encode_v1(out, sizeof(out), SA(a), SA(a));
    ASSERT_EQ(n, 104);
    ASSERT_STREQ(out, "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n");

    /* Too small by one byte (the NUL) is refused, and nothing is written. */
    char small[44];
    memset(small, '#', sizeof(small));
    ASSERT_EQ(proxyproto_encode_v1(small, sizeof(small), SA(s4), SA(d4)), -ENOBUFS);
    ASSERT_EQ(small[0], '#');
    ASSERT_EQ(proxyproto_encode_v1(small, 0, SA(s4), SA(d4)), -ENOBUFS);
    ASSERT_EQ(proxyproto_encode_v1(out, 45, SA(s4), SA(d4)), 44);
}

/* --- v2 encoder ------------------------------------------------------------------------------ */

/* Headers written by hand from doc/proxy-protocol.txt, laid out as the spec describes them. */
/* clang-format off */
static const unsigned char V2_TCP4[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, /* signature */
    0x21,                   /* version 2, PROXY */
    0x11,                   /* INET, STREAM */
    0x00, 0x0c,             /* 12 address bytes */
    192, 0, 2, 1,           /* src 192.0.2.1 */
    198, 51, 100, 2,        /* dst 198.51.100.2 */
    0xdc, 0x04,             /* sport 56324 */
    0x00, 0x19,             /* dport 25 */
};

static const unsigned char V2_TCP6[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    0x21,                   /* version 2, PROXY */
    0x21,                   /* INET6, STREAM */
    0x00, 0x24,             /* 36 address bytes */
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0, 0x01, /* 2001:db8::1 */
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x25, /* 2001:db8:0:1::25 */
    0x9c, 0x40,             /* sport 40000 */
    0x02, 0x4b,             /* dport 587 */
};

static const unsigned char V2_UNSPEC[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    0x21, 0x00, 0x00, 0x00, /* PROXY, UNSPEC, no address */
};

static const unsigned char V2_LOCAL[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    0x20, 0x00, 0x00, 0x00, /* LOCAL, UNSPEC, no address */
};

/* TCP4 with AUTHORITY, SSL (client cert on this connection, verified; version and cipher),
 * UNIQUE_ID and CRC32C. The checksum was computed separately over the header with it zeroed. */
static const unsigned char V2_TLVS[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    0x21, 0x11,
    0x00, 0x56,             /* 86 = 12 + 17 + 43 + 7 + 7 */
    192, 0, 2, 1,  198, 51, 100, 2,  0xdc, 0x04,  0x00, 0x19,
    /* PP2_TYPE_AUTHORITY, 14 */
    0x02, 0x00, 0x0e, 'm', 'x', '.', 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'c', 'o', 'm',
    /* PP2_TYPE_SSL, 40: client = SSL | CERT_CONN, verify = 0 */
    0x20, 0x00, 0x28,  0x03,  0x00, 0x00, 0x00, 0x00,
    /*   PP2_SUBTYPE_SSL_VERSION, 7 */
    0x21, 0x00, 0x07, 'T', 'L', 'S', 'v', '1', '.', '3',
    /*   PP2_SUBTYPE_SSL_CIPHER, 22 */
    0x23, 0x00, 0x16, 'T', 'L', 'S', '_', 'A', 'E', 'S', '_', '2', '5', '6', '_',
                      'G', 'C', 'M', '_', 'S', 'H', 'A', '3', '8', '4',
    /* PP2_TYPE_UNIQUE_ID, 4 */
    0x05, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04,
    /* PP2_TYPE_CRC32C, 4 */
    0x03, 0x00, 0x04, 0x87, 0x67, 0x6b, 0xac,
};

/* TCP6 with SSL only: certificate seen in the session, not verified (verify = 1), CN. */
static const unsigned char V2_SSL_CN[] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    0x21, 0x21,
    0x00, 0x47,             /* 71 = 36 + 35 */
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0, 0x01,
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x25,
    0x9c, 0x40,  0x02, 0x4b,
    /* PP2_TYPE_SSL, 32: client = SSL | CERT_SESS, verify = 1 */
    0x20, 0x00, 0x20,  0x05,  0x00, 0x00, 0x00, 0x01,
    /*   PP2_SUBTYPE_SSL_VERSION, 7 */
    0x21, 0x00, 0x07, 'T', 'L', 'S', 'v', '1', '.', '2',
    /*   PP2_SUBTYPE_SSL_CN, 14 */
    0x22, 0x00, 0x0e, 'c', 'l', 'i', 'e', 'n', 't', '.', 'e', 'x', 'a', 'm', 'p', 'l', 'e',
};
/* clang-format on */

static void test_crc32c(void)
{
    ASSERT_EQ(proxyproto_crc32c("123456789", 9), 0xe3069283u); /* the check value */
    ASSERT_EQ(proxyproto_crc32c("", 0), 0u);
}

static void test_v2_encode(void)
{
    struct sockaddr_storage s4 = sa4("192.0.2.1", 56324), d4 = sa4("198.51.100.2", 25);
    struct sockaddr_storage s6 = sa6("2001:db8::1", 40000), d6 = sa6("2001:db8:0:1::25", 587);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    unsigned char out[PROXYPROTO_V2_MAX];
    int n;

    n = proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), NULL);
    ASSERT_MEMEQ(out, (size_t)n, V2_TCP4, sizeof(V2_TCP4));
    n = proxyproto_encode_v2(out, sizeof(out), SA(s6), SA(d6), NULL);
    ASSERT_MEMEQ(out, (size_t)n, V2_TCP6, sizeof(V2_TCP6));
    n = proxyproto_encode_v2(out, sizeof(out), (const struct sockaddr *)&un, SA(d4), NULL);
    ASSERT_MEMEQ(out, (size_t)n, V2_UNSPEC, sizeof(V2_UNSPEC));
    n = proxyproto_encode_v2(out, sizeof(out), NULL, NULL, NULL);
    ASSERT_MEMEQ(out, (size_t)n, V2_UNSPEC, sizeof(V2_UNSPEC));

    struct proxyproto_v2_opts local = {.local = true};
    n = proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &local);
    ASSERT_MEMEQ(out, (size_t)n, V2_LOCAL, sizeof(V2_LOCAL));

    struct proxyproto_tls_info tls = {
        .version = "TLSv1.3", .cipher = "TLS_AES_256_GCM_SHA384", .cert_conn = true};
    struct proxyproto_v2_opts opts = {.authority = "mx.example.com",
                                      .tls = &tls,
                                      .unique_id = "\x01\x02\x03\x04",
                                      .unique_id_len = 4,
                                      .crc32c = true};
    n = proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &opts);
    ASSERT_MEMEQ(out, (size_t)n, V2_TLVS, sizeof(V2_TLVS));

    struct proxyproto_tls_info tls2 = {
        .version = "TLSv1.2", .cn = "client.example", .cert_sess = true, .verify = 1};
    struct proxyproto_v2_opts opts2 = {.tls = &tls2};
    n = proxyproto_encode_v2(out, sizeof(out), SA(s6), SA(d6), &opts2);
    ASSERT_MEMEQ(out, (size_t)n, V2_SSL_CN, sizeof(V2_SSL_CN));

    /* Mixed families: TCP6 with the IPv4 source mapped. */
    n = proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d6), NULL);
    ASSERT_EQ(n, 52);
    ASSERT_EQ(out[13], 0x21);
    static const unsigned char mapped[16] = {0, 0, 0,    0,    0,   0, 0, 0,
                                             0, 0, 0xff, 0xff, 192, 0, 2, 1};
    ASSERT(memcmp(out + 16, mapped, sizeof(mapped)) == 0);

    /* Room: exactly enough works, one byte less is refused. */
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(V2_TLVS), SA(s4), SA(d4), &opts),
              (int)sizeof(V2_TLVS));
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(V2_TLVS) - 1, SA(s4), SA(d4), &opts), -ENOBUFS);
    ASSERT_EQ(proxyproto_encode_v2(out, 15, NULL, NULL, NULL), -ENOBUFS);

    /* Limits of the values. */
    char big[PROXYPROTO_AUTHORITY_MAX + 2];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    struct proxyproto_v2_opts bad = {.authority = big};
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &bad), -EINVAL);
    big[PROXYPROTO_AUTHORITY_MAX] = '\0';
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &bad),
              16 + 12 + 3 + PROXYPROTO_AUTHORITY_MAX);
    struct proxyproto_v2_opts noid = {.unique_id = "", .unique_id_len = 0};
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &noid), -EINVAL);
    noid.unique_id_len = PROXYPROTO_UNIQUE_ID_MAX + 1;
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &noid), -EINVAL);
    struct proxyproto_tls_info longcipher = {.cipher = big};
    struct proxyproto_v2_opts bad2 = {.tls = &longcipher};
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s4), SA(d4), &bad2), -EINVAL);

    /* Every value at its longest fills PROXYPROTO_V2_MAX exactly. */
    static char id[PROXYPROTO_UNIQUE_ID_MAX];
    char v[PROXYPROTO_SSL_VERSION_MAX + 1], c[PROXYPROTO_SSL_CIPHER_MAX + 1];
    char cn[PROXYPROTO_SSL_CN_MAX + 1];
    memset(v, 'v', sizeof(v) - 1);
    v[sizeof(v) - 1] = '\0';
    memset(c, 'c', sizeof(c) - 1);
    c[sizeof(c) - 1] = '\0';
    memset(cn, 'n', sizeof(cn) - 1);
    cn[sizeof(cn) - 1] = '\0';
    struct proxyproto_tls_info tmax = {.version = v, .cipher = c, .cn = cn};
    struct proxyproto_v2_opts omax = {.authority = big,
                                      .tls = &tmax,
                                      .unique_id = id,
                                      .unique_id_len = sizeof(id),
                                      .crc32c = true};
    ASSERT_EQ(proxyproto_encode_v2(out, sizeof(out), SA(s6), SA(d6), &omax), PROXYPROTO_V2_MAX);
    ASSERT_EQ(PROXYPROTO_V2_MAX, 625);
    ASSERT(PROXYPROTO_V2_MAX <= PROXYPROTO_V2_DEFAULT_MAX);
}

/* --- decoder: valid headers ------------------------------------------------------------------ */

static struct outcome O; /* large: keep it off the stack */

static void test_decode_v1(void)
{
    struct sockaddr_storage s4 = sa4("192.0.2.1", 56324), d4 = sa4("198.51.100.2", 25);
    struct sockaddr_storage s6 = sa6("2001:db8::1", 40000), d6 = sa6("2001:db8:0:1::25", 587);
    const char *l;

    l = "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n";
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.version, 1);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_PROXY);
    ASSERT_EQ(O.h.family, AF_INET);
    ASSERT_EQ(O.h.len, strlen(l));
    ASSERT(sa_same(&O.h.src, &s4));
    ASSERT(sa_same(&O.h.dst, &d4));
    ASSERT(O.h.authority.p == NULL && !O.h.has_ssl);

    l = "PROXY TCP6 2001:db8::1 2001:DB8:0:1:0:0:0:25 40000 587\r\n";
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.family, AF_INET6);
    ASSERT(sa_same(&O.h.src, &s6));
    ASSERT(sa_same(&O.h.dst, &d6));

    /* Mapped IPv4 with a dotted tail, as inet_ntop() writes it, is accepted. */
    l = "PROXY TCP6 ::ffff:192.0.2.1 ::1 0 65535\r\n";
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    struct sockaddr_storage m = sa6("::ffff:192.0.2.1", 0);
    ASSERT(sa_same(&O.h.src, &m));

    /* UNKNOWN: short form, and the long form whose rest is ignored. */
    l = "PROXY UNKNOWN\r\n";
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.family, AF_UNSPEC);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_PROXY);
    ASSERT_EQ(O.h.src.ss_family, AF_UNSPEC);
    ASSERT_EQ(O.h.len, 15);
    l = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    ASSERT_EQ(strlen(l), PROXYPROTO_V1_LINE_MAX);
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.len, 107);

    /* Data after the header is left to the caller. */
    l = "PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nEHLO x\r\n";
    decode(&O, l, strlen(l));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.consumed, strlen(l) - 8);
}

static void test_decode_v2(void)
{
    struct sockaddr_storage s4 = sa4("192.0.2.1", 56324), d4 = sa4("198.51.100.2", 25);
    struct sockaddr_storage s6 = sa6("2001:db8::1", 40000), d6 = sa6("2001:db8:0:1::25", 587);

    decode(&O, V2_TCP4, sizeof(V2_TCP4));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.version, 2);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_PROXY);
    ASSERT_EQ(O.h.family, AF_INET);
    ASSERT_EQ(O.h.v2_fam, 0x11);
    ASSERT_EQ(O.h.len, sizeof(V2_TCP4));
    ASSERT(sa_same(&O.h.src, &s4));
    ASSERT(sa_same(&O.h.dst, &d4));

    decode(&O, V2_TCP6, sizeof(V2_TCP6));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.family, AF_INET6);
    ASSERT(sa_same(&O.h.src, &s6));
    ASSERT(sa_same(&O.h.dst, &d6));

    decode(&O, V2_UNSPEC, sizeof(V2_UNSPEC));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_PROXY);
    ASSERT_EQ(O.h.family, AF_UNSPEC);
    ASSERT_EQ(O.h.len, 16);

    decode(&O, V2_LOCAL, sizeof(V2_LOCAL));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_LOCAL);
    ASSERT_EQ(O.h.family, AF_UNSPEC);

    decode(&O, V2_TLVS, sizeof(V2_TLVS));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT(sa_same(&O.h.src, &s4));
    ASSERT(bytes_is(O.h.authority, "mx.example.com"));
    ASSERT(bytes_is(O.h.unique_id, "\x01\x02\x03\x04"));
    ASSERT(O.h.has_ssl);
    ASSERT_EQ(O.h.ssl_client, PROXYPROTO_PP2_CLIENT_SSL | PROXYPROTO_PP2_CLIENT_CERT_CONN);
    ASSERT_EQ(O.h.ssl_verify, 0);
    ASSERT(bytes_is(O.h.ssl_version, "TLSv1.3"));
    ASSERT(bytes_is(O.h.ssl_cipher, "TLS_AES_256_GCM_SHA384"));
    ASSERT(O.h.ssl_cn.p == NULL);
    ASSERT(O.h.has_crc32c);

    decode(&O, V2_SSL_CN, sizeof(V2_SSL_CN));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT(sa_same(&O.h.dst, &d6));
    ASSERT(O.h.authority.p == NULL && O.h.unique_id.p == NULL && !O.h.has_crc32c);
    ASSERT_EQ(O.h.ssl_client, PROXYPROTO_PP2_CLIENT_SSL | PROXYPROTO_PP2_CLIENT_CERT_SESS);
    ASSERT_EQ(O.h.ssl_verify, 1);
    ASSERT(bytes_is(O.h.ssl_version, "TLSv1.2"));
    ASSERT(bytes_is(O.h.ssl_cn, "client.example"));
    ASSERT(O.h.ssl_cipher.p == NULL);

    /* Unknown TLVs (NOOP, ALPN, a vendor type, an empty one) are skipped; an SSL TLV with only
     * client and verify is fine; the header ends exactly at the last TLV. */
    unsigned char buf[128];
    static const unsigned char skip[] = {
        0x21, 0x11, 0x00, 0x26, 10,   0,    0,    1,    10,   0,    0,
        2,    0,    1,    0,    2,    0x04, 0x00, 0x02, 0xaa, 0xbb, /* NOOP */
        0x01, 0x00, 0x04, 's',  'm',  't',  'p',                    /* ALPN */
        0xea, 0x00, 0x00,                                           /* vendor, empty */
        0x20, 0x00, 0x05, 0x01, 0xff, 0xff, 0xff, 0xff,             /* SSL, no sub-TLV */
        0x02, 0x00, 0x00,                                           /* AUTHORITY, empty */
    };
    size_t n = v2(buf, skip, sizeof(skip));
    decode(&O, buf, n);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.len, n);
    ASSERT(O.h.has_ssl);
    ASSERT_EQ(O.h.ssl_verify, 0xffffffffu);
    ASSERT(O.h.authority.p != NULL && O.h.authority.len == 0);

    /* UDP and UNIX are valid but fall back to UNSPEC; their TLVs are still read. */
    static const unsigned char udp[] = {0x21, 0x12, 0x00, 0x10, 10, 0, 0,    1,    10,   0,
                                        0,    2,    0,    1,    0,  2, 0x02, 0x00, 0x01, 'a'};
    n = v2(buf, udp, sizeof(udp));
    decode(&O, buf, n);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.family, AF_UNSPEC);
    ASSERT_EQ(O.h.v2_fam, 0x12);
    ASSERT(bytes_is(O.h.authority, "a"));
    static unsigned char unixh[16 + 216 + 4];
    memcpy(unixh, SIG, 12);
    unixh[12] = 0x21;
    unixh[13] = 0x31;
    unixh[14] = 0;
    unixh[15] = 220;
    memcpy(unixh + 16 + 216, "\x02\x00\x01z", 4);
    decode(&O, unixh, sizeof(unixh));
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.family, AF_UNSPEC);
    ASSERT(bytes_is(O.h.authority, "z"));

    /* LOCAL with an address block and garbage after it: all of it is discarded. */
    static const unsigned char local[] = {0x20, 0x11, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff};
    n = v2(buf, local, sizeof(local));
    decode(&O, buf, n);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.command, PROXYPROTO_CMD_LOCAL);
    ASSERT_EQ(O.h.family, AF_UNSPEC);
    ASSERT_EQ(O.h.len, n);

    /* Application data after a v2 header stays with the caller. */
    memcpy(buf, V2_TCP4, sizeof(V2_TCP4));
    memcpy(buf + sizeof(V2_TCP4), "\x16\x03\x01", 3);
    decode(&O, buf, sizeof(V2_TCP4) + 3);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.consumed, sizeof(V2_TCP4));
}

/* Encode then decode: what goes in comes out, for v1 and v2 and several address pairs. */
static void test_round_trip(void)
{
    struct sockaddr_storage pairs[][2] = {
        {sa4("0.0.0.0", 0), sa4("255.255.255.255", 65535)},
        {sa4("127.0.0.1", 33714), sa4("127.0.0.1", 2525)},
        {sa6("::", 0), sa6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)},
        {sa6("fe80::1:2", 1), sa6("2001:db8:1:2:3:4:5:6", 25)},
        {sa6("::ffff:10.1.2.3", 7), sa6("::ffff:10.1.2.4", 8)},
    };
    char line[PROXYPROTO_V1_MAX];
    unsigned char bin[PROXYPROTO_V2_MAX];

    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
        int n = proxyproto_encode_v1(line, sizeof(line), SA(pairs[i][0]), SA(pairs[i][1]));
        ASSERT(n > 0);
        decode(&O, line, (size_t)n);
        ASSERT_EQ(O.st, PROXYPROTO_DONE);
        ASSERT(sa_same(&O.h.src, &pairs[i][0]));
        ASSERT(sa_same(&O.h.dst, &pairs[i][1]));

        struct proxyproto_tls_info tls = {
            .version = "TLSv1.3", .cipher = "X", .cn = "", .verify = 7};
        struct proxyproto_v2_opts opts = {.authority = "smtp.example.org",
                                          .tls = &tls,
                                          .unique_id = "id",
                                          .unique_id_len = 2,
                                          .crc32c = (i % 2) == 0};
        n = proxyproto_encode_v2(bin, sizeof(bin), SA(pairs[i][0]), SA(pairs[i][1]), &opts);
        ASSERT(n > 0);
        decode(&O, bin, (size_t)n);
        ASSERT_EQ(O.st, PROXYPROTO_DONE);
        ASSERT(sa_same(&O.h.src, &pairs[i][0]));
        ASSERT(sa_same(&O.h.dst, &pairs[i][1]));
        ASSERT(bytes_is(O.h.authority, "smtp.example.org"));
        ASSERT(bytes_is(O.h.unique_id, "id"));
        ASSERT(bytes_is(O.h.ssl_version, "TLSv1.3"));
        ASSERT(bytes_is(O.h.ssl_cipher, "X"));
        ASSERT(bytes_is(O.h.ssl_cn, ""));
        ASSERT_EQ(O.h.ssl_verify, 7);
        ASSERT_EQ(O.h.has_crc32c, (i % 2) == 0);
    }
}

/* Every proper prefix of a valid header asks for more and takes every byte. */
static void test_truncated(void)
{
    const void *hdrs[] = {V2_TCP4,
                          V2_TCP6,
                          V2_TLVS,
                          V2_SSL_CN,
                          V2_LOCAL,
                          "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
                          "PROXY UNKNOWN\r\n"};
    size_t lens[] = {sizeof(V2_TCP4),
                     sizeof(V2_TCP6),
                     sizeof(V2_TLVS),
                     sizeof(V2_SSL_CN),
                     sizeof(V2_LOCAL),
                     44,
                     15};

    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        for (size_t n = 0; n < lens[i]; n++) {
            run(&O, hdrs[i], n, NULL, 0, 0);
            ASSERT_EQ(O.st, PROXYPROTO_NEED_MORE);
            ASSERT_EQ(O.consumed, n);
        }
    }
}

/* --- decoder: errors ------------------------------------------------------------------------- */

static void test_errors_detect(void)
{
    /* Plain SMTP, TLS and HTTP are refused at their first byte. */
    EXPECT_ERR_AT("EHLO client.example\r\n", 21, PROXYPROTO_E_SIGNATURE, 1);
    EXPECT_ERR_AT("\x16\x03\x01\x02\x00\x01", 6, PROXYPROTO_E_SIGNATURE, 1);
    EXPECT_ERR_AT("GET / HTTP/1.1\r\n", 16, PROXYPROTO_E_SIGNATURE, 1);
    EXPECT_ERR_AT("\0", 1, PROXYPROTO_E_SIGNATURE, 1);
    /* Wrong at a later byte of either signature: refused at that byte. */
    EXPECT_ERR_AT("PROXx TCP4", 10, PROXYPROTO_E_SIGNATURE, 5);
    EXPECT_ERR_AT("proxy TCP4", 10, PROXYPROTO_E_SIGNATURE, 1);
    EXPECT_ERR_AT("PROXY\r\n", 7, PROXYPROTO_E_SIGNATURE, 6);
    EXPECT_ERR_AT("\r\n\r\n\0\r\nQUIT\r", 12, PROXYPROTO_E_SIGNATURE, 12);
    EXPECT_ERR_AT("\r\nEHLO", 6, PROXYPROTO_E_SIGNATURE, 3);
}

static void test_errors_v1(void)
{
    /* No CRLF within 107 bytes: refused at the 107th. */
    char l[200];
    memcpy(l, "PROXY UNKNOWN ", 14);
    memset(l + 14, 'x', sizeof(l) - 14);
    EXPECT_ERR_AT(l, sizeof(l), PROXYPROTO_E_V1_TOO_LONG, 107);
    l[105] = '\r';
    l[106] = '\n';
    decode(&O, l, 107);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    l[105] = 'x';
    l[106] = '\r';
    l[107] = '\n';
    EXPECT_ERR_AT(l, 108, PROXYPROTO_E_V1_TOO_LONG, 107);

    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", PROXYPROTO_E_V1_CRLF);
    EXPECT_ERR_AT("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", 32, PROXYPROTO_E_V1_CRLF, 32);
    const char *cr = "PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n";
    EXPECT_ERR_AT(cr, strlen(cr), PROXYPROTO_E_V1_CRLF, 20);
    EXPECT_ERR_AT("PROXY UNKNOWN\r\r\n", 16, PROXYPROTO_E_V1_CRLF, 15);

    EXPECT_ERR("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY \r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY UNKNOWNX\r\n", PROXYPROTO_E_V1_PROTOCOL);
    EXPECT_ERR("PROXY TCP4\r\n", PROXYPROTO_E_V1_SRC_ADDR);

    EXPECT_ERR("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_DST_ADDR);
    EXPECT_ERR("PROXY TCP4 ::1 5.6.7.8 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 1.2.3.4 ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 1::2::3 ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 12345::1 ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP6 [::1] ::1 1 2\r\n", PROXYPROTO_E_V1_SRC_ADDR);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", PROXYPROTO_E_V1_DST_ADDR);
    EXPECT_ERR("PROXY TCP4 1.2.3.4\r\n", PROXYPROTO_E_V1_DST_ADDR);
    EXPECT_ERR("PROXY TCP6 ::1 g::1 1 2\r\n", PROXYPROTO_E_V1_DST_ADDR);

    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8\r\n", PROXYPROTO_E_V1_SRC_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", PROXYPROTO_E_V1_DST_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", PROXYPROTO_E_V1_DST_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 2x\r\n", PROXYPROTO_E_V1_DST_PORT);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", PROXYPROTO_E_V1_DST_PORT);

    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", PROXYPROTO_E_V1_TRAILING);
    EXPECT_ERR("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", PROXYPROTO_E_V1_TRAILING);

    /* The position points at the offending field. */
    const char *s = "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n";
    decode(&O, s, strlen(s));
    ASSERT_EQ(O.err_pos, 29);
    s = "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n";
    decode(&O, s, strlen(s));
    ASSERT_EQ(O.err_pos, 30);
}

static void test_errors_v2(void)
{
    unsigned char buf[2048];
    size_t n;

    /* Version and command: refused at byte 13. */
    static const unsigned char ver1[] = {0x11, 0x11, 0x00, 0x0c};
    n = v2(buf, ver1, sizeof(ver1));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_VERSION, 13);
    static const unsigned char ver3[] = {0x31, 0x11, 0x00, 0x0c};
    n = v2(buf, ver3, sizeof(ver3));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_VERSION, 13);
    static const unsigned char cmd2[] = {0x22, 0x11, 0x00, 0x0c};
    n = v2(buf, cmd2, sizeof(cmd2));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_COMMAND, 13);

    /* Family and transport: refused at byte 14. */
    static const unsigned char fam4[] = {0x21, 0x41, 0x00, 0x0c};
    n = v2(buf, fam4, sizeof(fam4));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_FAMILY, 14);
    static const unsigned char proto3[] = {0x21, 0x13, 0x00, 0x0c};
    n = v2(buf, proto3, sizeof(proto3));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_TRANSPORT, 14);
    static const unsigned char localfam[] = {0x20, 0xf1, 0x00, 0x00};
    n = v2(buf, localfam, sizeof(localfam));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_FAMILY, 14);

    /* Length over the limit: refused at byte 16, before any of the body arrives. */
    static const unsigned char huge[] = {0x21, 0x11, 0xff, 0xff, 1, 2, 3, 4};
    n = v2(buf, huge, sizeof(huge));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_TOO_LONG, 16);
    /* At the default limit exactly it is fine; one more is not. */
    memset(buf, 0, sizeof(buf));
    static const unsigned char atmax[] = {0x21, 0x11, (PROXYPROTO_V2_DEFAULT_MAX - 16) >> 8,
                                          (PROXYPROTO_V2_DEFAULT_MAX - 16) & 0xff};
    v2(buf, atmax, sizeof(atmax));
    buf[16 + 12] = 0x04; /* one NOOP TLV covering the rest */
    buf[16 + 13] = (PROXYPROTO_V2_DEFAULT_MAX - 16 - 12 - 3) >> 8;
    buf[16 + 14] = (PROXYPROTO_V2_DEFAULT_MAX - 16 - 12 - 3) & 0xff;
    decode(&O, buf, PROXYPROTO_V2_DEFAULT_MAX);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    ASSERT_EQ(O.h.len, PROXYPROTO_V2_DEFAULT_MAX);
    buf[15]++;
    EXPECT_ERR_AT(buf, PROXYPROTO_V2_DEFAULT_MAX + 1, PROXYPROTO_E_V2_TOO_LONG, 16);
    /* A configured lower limit. */
    decode_max(&O, V2_TCP6, sizeof(V2_TCP6), 51);
    ASSERT_EQ(O.st, PROXYPROTO_ERROR);
    ASSERT_EQ(O.err, PROXYPROTO_E_V2_TOO_LONG);
    decode_max(&O, V2_TCP6, sizeof(V2_TCP6), 52);
    ASSERT_EQ(O.st, PROXYPROTO_DONE);
    /* A limit above what the parser holds is clamped to it. */
    decode_max(&O, buf, PROXYPROTO_V2_DEFAULT_MAX + 1, 1000000);
    ASSERT_EQ(O.err, PROXYPROTO_E_V2_TOO_LONG);

    /* PROXY with fewer bytes than the family's address block: refused at byte 16. */
    static const unsigned char short4[] = {0x21, 0x11, 0x00, 0x0b};
    n = v2(buf, short4, sizeof(short4));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_ADDR_SHORT, 16);
    static const unsigned char short6[] = {0x21, 0x21, 0x00, 0x0c};
    n = v2(buf, short6, sizeof(short6));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_ADDR_SHORT, 16);
    static const unsigned char shortu[] = {0x21, 0x32, 0x00, 0xd7};
    n = v2(buf, shortu, sizeof(shortu));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_ADDR_SHORT, 16);

    /* TLVs running past the header. */
    static const unsigned char tlv_hdr[] = {0x21, 0x11, 0x00, 0x0e, 1, 1, 1, 1,    2,
                                            2,    2,    2,    0,    1, 0, 2, 0x02, 0x00};
    n = v2(buf, tlv_hdr, sizeof(tlv_hdr));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_TLV_OVERRUN);
    static const unsigned char tlv_val[] = {0x21, 0x11, 0x00, 0x11, 1, 1,    1,    1,    2,   2,  2,
                                            2,    0,    1,    0,    2, 0x02, 0x00, 0x03, 'a', 'b'};
    n = v2(buf, tlv_val, sizeof(tlv_val));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_TLV_OVERRUN);
    decode(&O, buf, n);
    ASSERT_EQ(O.err_pos, 28);
    /* A TLV length pointing into the next header's bytes, with those bytes present. */
    static const unsigned char tlv_far[] = {0x21, 0x11, 0x00, 0x0f, 1, 1,    1,    1,    2,   2,  2,
                                            2,    0,    1,    0,    2, 0x04, 0xff, 0xff, 'E', 'H'};
    n = v2(buf, tlv_far, sizeof(tlv_far));
    EXPECT_ERR_AT(buf, n, PROXYPROTO_E_V2_TLV_OVERRUN, 31);

    /* Duplicates of TLVs we read. */
    static const unsigned char dup[] = {0x21, 0x11, 0x00, 0x14, 1,    1,    1,    1,
                                        2,    2,    2,    2,    0,    1,    0,    2,
                                        0x02, 0x00, 0x01, 'a',  0x02, 0x00, 0x01, 'b'};
    n = v2(buf, dup, sizeof(dup));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_TLV_DUPLICATE);
    static const unsigned char dupsub[] = {
        0x21, 0x11, 0x00, 0x1b, 1, 1, 1, 1, 2,    2,    2,    2,    0,    1,    0,  2,
        0x20, 0x00, 0x0c, 0x01, 0, 0, 0, 0, 0x21, 0x00, 0x00, 0x21, 0x00, 0x01, 'x'};
    n = v2(buf, dupsub, sizeof(dupsub));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_TLV_DUPLICATE);

    /* SSL TLV: too short for client + verify; sub-TLV past its end (inside the header). */
    static const unsigned char sslshort[] = {
        0x21, 0x11, 0x00, 0x13, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 0, 2, 0x20, 0x00, 0x04, 1, 0, 0, 0};
    n = v2(buf, sslshort, sizeof(sslshort));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_SSL_SHORT);
    static const unsigned char sslover[] = {
        0x21, 0x11, 0x00, 0x1b, 1, 1, 1, 1, 2,    2,    2,    2,   0,    1,    0,   2,
        0x20, 0x00, 0x09, 0x01, 0, 0, 0, 0, 0x21, 0x00, 0x05, 'T', 0x04, 0x00, 0x00};
    n = v2(buf, sslover, sizeof(sslover));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_SSL_OVERRUN);
    static const unsigned char sslhalf[] = {0x21, 0x11, 0x00, 0x16, 1, 1, 1,    1,    2,
                                            2,    2,    2,    0,    1, 0, 2,    0x20, 0x00,
                                            0x07, 0x01, 0,    0,    0, 0, 0x21, 0x00};
    n = v2(buf, sslhalf, sizeof(sslhalf));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_SSL_OVERRUN);

    /* UNIQUE_ID over 128 bytes. */
    memset(buf, 'u', sizeof(buf));
    static const unsigned char uid[] = {
        0x21, 0x11, 0x00, 12 + 3 + 129, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 0, 2, 0x05, 0x00, 129};
    n = v2(buf, uid, sizeof(uid)) + 129;
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_UNIQUE_ID);

    /* CRC32C of the wrong size, or not matching. */
    static const unsigned char crclen[] = {0x21, 0x11, 0x00, 0x12, 1, 1,    1,    1,    2, 2, 2,
                                           2,    0,    1,    0,    2, 0x03, 0x00, 0x03, 0, 0, 0};
    n = v2(buf, crclen, sizeof(crclen));
    EXPECT_ERR_BUF(buf, n, PROXYPROTO_E_V2_CRC32C_LEN);
    memcpy(buf, V2_TLVS, sizeof(V2_TLVS));
    buf[sizeof(V2_TLVS) - 1] ^= 1;
    EXPECT_ERR_BUF(buf, sizeof(V2_TLVS), PROXYPROTO_E_V2_CRC32C);
    memcpy(buf, V2_TLVS, sizeof(V2_TLVS));
    buf[20] ^= 1; /* a source address bit: the checksum no longer matches */
    EXPECT_ERR_BUF(buf, sizeof(V2_TLVS), PROXYPROTO_E_V2_CRC32C);
}

static void test_strerror(void)
{
    /* The texts are part of the log format: pin every one. */
    static const struct {
        enum proxyproto_err e;
        const char *s;
    } t[] = {
        {PROXYPROTO_OK, "no error"},
        {PROXYPROTO_E_SIGNATURE, "bad signature"},
        {PROXYPROTO_E_V1_TOO_LONG, "v1: line too long"},
        {PROXYPROTO_E_V1_CRLF, "v1: line not terminated by CRLF"},
        {PROXYPROTO_E_V1_PROTOCOL, "v1: unknown protocol"},
        {PROXYPROTO_E_V1_SRC_ADDR, "v1: invalid source address"},
        {PROXYPROTO_E_V1_DST_ADDR, "v1: invalid destination address"},
        {PROXYPROTO_E_V1_SRC_PORT, "v1: invalid source port"},
        {PROXYPROTO_E_V1_DST_PORT, "v1: invalid destination port"},
        {PROXYPROTO_E_V1_TRAILING, "v1: junk after destination port"},
        {PROXYPROTO_E_V2_VERSION, "v2: unsupported version"},
        {PROXYPROTO_E_V2_COMMAND, "v2: unsupported command"},
        {PROXYPROTO_E_V2_FAMILY, "v2: unsupported address family"},
        {PROXYPROTO_E_V2_TRANSPORT, "v2: unsupported transport protocol"},
        {PROXYPROTO_E_V2_TOO_LONG, "v2: length exceeds limit"},
        {PROXYPROTO_E_V2_ADDR_SHORT, "v2: address block too short for family"},
        {PROXYPROTO_E_V2_TLV_OVERRUN, "v2: TLV overruns header"},
        {PROXYPROTO_E_V2_TLV_DUPLICATE, "v2: duplicate TLV"},
        {PROXYPROTO_E_V2_SSL_SHORT, "v2: SSL TLV too short"},
        {PROXYPROTO_E_V2_SSL_OVERRUN, "v2: SSL sub-TLV overruns SSL TLV"},
        {PROXYPROTO_E_V2_UNIQUE_ID, "v2: unique ID too long"},
        {PROXYPROTO_E_V2_CRC32C_LEN, "v2: CRC32C TLV length is not 4"},
        {PROXYPROTO_E_V2_CRC32C, "v2: CRC32C mismatch"},
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
        ASSERT_STREQ(proxyproto_strerror(t[i].e), t[i].s);
    ASSERT_STREQ(proxyproto_strerror((enum proxyproto_err)200), "unknown error");
}

static void test_reset(void)
{
    struct proxyproto_parser p = {.max_v2_len = 100};
    struct proxyproto_header h;
    size_t used;

    ASSERT_EQ(proxyproto_decode(&p, "X", 1, &used, &h), PROXYPROTO_ERROR);
    ASSERT_STREQ(proxyproto_strerror(proxyproto_error(&p)), "bad signature");
    ASSERT_EQ(proxyproto_error_pos(&p), 0);
    proxyproto_reset(&p);
    ASSERT_EQ(p.max_v2_len, 100);
    ASSERT_EQ(proxyproto_error(&p), PROXYPROTO_OK);
    ASSERT_EQ(proxyproto_decode(&p, V2_TCP4, sizeof(V2_TCP4), &used, &h), PROXYPROTO_DONE);
    ASSERT_EQ(used, sizeof(V2_TCP4));
    ASSERT_EQ(proxyproto_decode(&p, NULL, 0, &used, &h), PROXYPROTO_DONE);
    proxyproto_reset(&p);
    ASSERT_EQ(proxyproto_decode(&p, NULL, 0, &used, &h), PROXYPROTO_NEED_MORE);
    ASSERT_EQ(used, 0);
}

/* --- XCLIENT --------------------------------------------------------------------------------- */

int main(void)
{
    test_crc32c();
    test_v1_encode();
    test_v2_encode();
    test_decode_v1();
    test_decode_v2();
    test_round_trip();
    test_truncated();
    test_errors_detect();
    test_errors_v1();
    test_errors_v2();
    test_strerror();
    test_reset();
    printf("test_proxyproto: all passed\n");
    return 0;
}
