/* tls.c: OpenSSL contexts and per-connection SSL over in-memory queues.
 *
 * Each tls_conn owns one SSL and one custom BIO, used for both directions.
 * The BIO reads ciphertext from the conn's input queue (filled by tls_feed)
 * and asks OpenSSL to retry when it is empty; it writes ciphertext to the
 * output queue (drained by tls_take) and never refuses. This is h2o's model
 * (lib/common/socket.c: read_bio/write_bio over its own buffers) rather than
 * BIO_new_bio_pair(), whose two buffers are allocated up front and would stay
 * allocated on every idle connection. Our queues are freed whenever they
 * drain, and SSL_MODE_RELEASE_BUFFERS does the same for OpenSSL's record
 * buffers, so an idle connection holds only OpenSSL's per-connection state.
 */
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

struct tls_ctx {
    atomic_uint refs;          /* the creator's plus one per tls_conn */
    bool server;               /* made by tls_server_ctx_new */
    struct tls_keylog *keylog; /* referenced; NULL: secrets are not written */
    size_t n;                  /* entries in ssl[] */
    SSL_CTX *ssl[];            /* server: one per cert pair, [0] the default; client: one */
};

/* The file of tls_keylog. Contexts reference it, and connections their context, so the
 * descriptor stays open while any handshake that could log to it may still run. */
struct tls_keylog {
    atomic_uint refs;
    int fd; /* O_APPEND: each line is one write, whole, whichever thread writes it */
};

/* A byte queue; all-zero is empty and holds no memory. */
struct tls_queue {
    unsigned char *p; /* NULL when empty */
    size_t off;       /* first unconsumed byte */
    size_t len;       /* end of data */
    size_t cap;       /* allocated size of p */
};

struct tls_conn {
    SSL *ssl;               /* owns the BIO */
    struct tls_ctx *ctx;    /* referenced until tls_conn_free */
    struct tls_queue in;    /* ciphertext fed, not yet read by OpenSSL */
    struct tls_queue out;   /* ciphertext produced, not yet taken */
    struct tls_queue held;  /* plaintext written before it could be encrypted */
    char *name;             /* client: SNI / verified name, or NULL */
    const char *reason;     /* static reason of the failure, or NULL */
    int err;                /* sticky negative error, 0 while healthy */
    unsigned flags;         /* TLS_F_* */
    unsigned char first[3]; /* server: the connection's first bytes, for tls_feed's check */
    unsigned char n_first;  /* bytes in first[] */
};

#define TLS_F_SERVER 0x01u    /* the accepting side */
#define TLS_F_DONE 0x02u      /* handshake complete */
#define TLS_F_PEER_EOF 0x04u  /* close_notify received */
#define TLS_F_SHUT_REQ 0x08u  /* tls_shutdown called: no more tls_write */
#define TLS_F_SHUT_SENT 0x10u /* our close_notify is queued */
#define TLS_F_NOMEM 0x20u     /* the BIO failed to grow the output queue */
#define TLS_F_CHECKED 0x40u   /* server: the first bytes looked like TLS */

/* ---- byte queues ---------------------------------------------------------------------------- */

static size_t tls_queue_len(const struct tls_queue *q)
{
    return q->len - q->off;
}

static int tls_queue_append(struct tls_queue *q, const void *data, size_t len, size_t max)
{
    size_t used = tls_queue_len(q);

    if (len == 0)
        return 0;
    if (len > max || used > max - len)
        return -ENOBUFS;
    if (q->cap - q->len < len) {
        if (q->off > 0 && used > 0)
            memmove(q->p, q->p + q->off, used);
        q->off = 0;
        q->len = used;
        if (q->cap - q->len < len) {
            size_t want = q->cap != 0 ? q->cap : 4096;
            while (want < used + len)
                want *= 2;
            unsigned char *p = realloc(q->p, want);
            if (p == NULL)
                return -ENOMEM;
            q->p = p;
            q->cap = want;
        }
    }
    memcpy(q->p + q->len, data, len);
    q->len += len;
    return 0;
}

/* Drops n consumed bytes; an emptied queue gives its memory back. */
static void tls_queue_consume(struct tls_queue *q, size_t n)
{
    q->off += n;
    if (q->off == q->len) {
        free(q->p);
        *q = (struct tls_queue){0};
    }
}

static void tls_queue_free(struct tls_queue *q)
{
    free(q->p);
    *q = (struct tls_queue){0};
}

/* ---- the BIO between OpenSSL and the queues ------------------------------------------------- */

static BIO_METHOD *tls_bio_method;
static pthread_once_t tls_bio_once = PTHREAD_ONCE_INIT;

static int tls_bio_write(BIO *b, const char *data, int len)
{
    struct tls_conn *t = BIO_get_data(b);

    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    /* Never a retry: OpenSSL's output is bounded by what the caller writes. */
    if (tls_queue_append(&t->out, data, (size_t)len, SIZE_MAX / 2) != 0) {
        t->flags |= TLS_F_NOMEM;
        return -1;
    }
    return len;
}

static int tls_bio_read(BIO *b, char *buf, int len)
{
    struct tls_conn *t = BIO_get_data(b);
    size_t avail = tls_queue_len(&t->in);

    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (avail == 0) {
        BIO_set_retry_read(b); /* "no data yet", not EOF: WANT_READ for the caller */
        return -1;
    }
    size_t n = avail < (size_t)len ? avail : (size_t)len;
    memcpy(buf, t->in.p + t->in.off, n);
    tls_queue_consume(&t->in, n);
    return (int)n;
}

static long tls_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1; /* writes are complete as soon as they are queued */
    case BIO_CTRL_PENDING: {
        const struct tls_conn *t = BIO_get_data(b);
        size_t n = tls_queue_len(&t->in);
        return n > LONG_MAX ? LONG_MAX : (long)n;
    }
    case BIO_CTRL_WPENDING:
        return 0;
    default:
        return 0;
    }
}

static void tls_bio_init_once(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_TYPE_SOURCE_SINK | BIO_get_new_index(), "mxproxy tls");
    if (m == NULL)
        return;
    if (BIO_meth_set_write(m, tls_bio_write) != 1 || BIO_meth_set_read(m, tls_bio_read) != 1 ||
        BIO_meth_set_ctrl(m, tls_bio_ctrl) != 1) {
        BIO_meth_free(m);
        return;
    }
    tls_bio_method = m;
}

/* ---- contexts ------------------------------------------------------------------------------- */

static int tls_parse_min_version(const char *s, int *out)
{
    if (s == NULL || strcmp(s, "TLSv1.2") == 0)
        *out = TLS1_2_VERSION;
    else if (strcmp(s, "TLSv1.3") == 0)
        *out = TLS1_3_VERSION;
    else
        return -EINVAL;
    return 0;
}

/* OpenSSL's reason for the oldest queued error, or fallback; clears the queue. */
static const char *tls_take_ssl_reason(const char *fallback)
{
    unsigned long e = ERR_peek_error();
    const char *r = e != 0 ? ERR_reason_error_string(e) : NULL;

    ERR_clear_error();
    return r != NULL ? r : fallback;
}

static int tls_ctx_alloc(struct tls_ctx **out, size_t n, bool server)
{
    struct tls_ctx *c = calloc(1, sizeof(*c) + n * sizeof(c->ssl[0]));
    if (c == NULL)
        return -ENOMEM;
    atomic_init(&c->refs, 1);
    c->server = server;
    c->n = n;
    *out = c;
    return 0;
}

static void tls_ctx_free(struct tls_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        SSL_CTX_free(c->ssl[i]);
    tls_keylog_unref(c->keylog);
    free(c);
}

/* ---- tls_keylog: secrets in the NSS key log format ------------------------------------------- */

int tls_keylog_open(struct tls_keylog **out, const char *path, char *err, size_t errlen)
{
    struct tls_keylog *k;
    struct stat st;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0600);

    if (fd < 0) {
        snprintf(err, errlen, "tls_keylog %s: %s", path, strerror(errno));
        return -EINVAL;
    }
    /* Anyone who reads the file decrypts every session: it must be the owner's alone. */
    const char *why = NULL;
    if (fstat(fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file";
    else if ((st.st_mode & 077) != 0)
        why = "open to group or others (chmod 600 it)";
    if (why != NULL) {
        snprintf(err, errlen, "tls_keylog %s: %s", path, why);
        close(fd);
        return -EINVAL;
    }
    k = malloc(sizeof(*k));
    if (k == NULL) {
        snprintf(err, errlen, "out of memory");
        close(fd);
        return -ENOMEM;
    }
    atomic_init(&k->refs, 1);
    k->fd = fd;
    *out = k;
    return 0;
}

void tls_keylog_unref(struct tls_keylog *k)
{
    if (k != NULL && atomic_fetch_sub_explicit(&k->refs, 1, memory_order_acq_rel) == 1) {
        close(k->fd);
        free(k);
    }
}

static int tls_keylog_index = -1;
static pthread_once_t tls_keylog_once = PTHREAD_ONCE_INIT;

static void tls_keylog_init_once(void)
{
    tls_keylog_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/* OpenSSL calls this on the connection's thread with one line without its newline. A
 * failed or short write loses that line only; the handshake goes on. */
static void tls_keylog_line(const SSL *ssl, const char *line)
{
    const struct tls_keylog *k = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), tls_keylog_index);
    struct iovec iov[2] = {{(void *)line, strlen(line)}, {"\n", 1}};

    if (k != NULL && writev(k->fd, iov, 2) < 0)
        return; /* nothing to do: the session must not fail for its debugging aid */
}

int tls_ctx_set_keylog(struct tls_ctx *c, struct tls_keylog *k)
{
    if (pthread_once(&tls_keylog_once, tls_keylog_init_once) != 0 || tls_keylog_index < 0)
        return -ENOMEM;
    /* Every SSL_CTX: the SNI callback moves a connection to its certificate's. */
    for (size_t i = 0; i < c->n; i++) {
        if (SSL_CTX_set_ex_data(c->ssl[i], tls_keylog_index, k) != 1)
            return -ENOMEM;
        SSL_CTX_set_keylog_callback(c->ssl[i], k != NULL ? tls_keylog_line : NULL);
    }
    if (k != NULL)
        atomic_fetch_add_explicit(&k->refs, 1, memory_order_relaxed);
    tls_keylog_unref(c->keylog);
    c->keylog = k;
    return 0;
}

/* Settings shared by every SSL_CTX this module makes. */
static int tls_ctx_common(SSL_CTX *s, int min_version)
{
    if (SSL_CTX_set_min_proto_version(s, min_version) != 1)
        return -EINVAL;
    /* Renegotiation only serves attacks on a mail connection; compression is CRIME. */
    SSL_CTX_set_options(s, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* RELEASE_BUFFERS frees the ~17 KiB record buffers between records: idle
     * connections are the common case. PARTIAL_WRITE and MOVING_WRITE_BUFFER
     * let tls_write resume from its own copy of the plaintext. */
    SSL_CTX_set_mode(s, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                            SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    return 0;
}

/* Fails with "<what> <path>: <strerror>" when path cannot be opened, so a
 * missing file reads as one rather than as a PEM error. */
static int tls_check_readable(const char *what, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s %s: %s", what, path, strerror(errno));
        return -EINVAL;
    }
    fclose(f);
    return 0;
}

static int tls_load_pair(SSL_CTX *s, const struct tls_cert_pair *p, char *err, size_t errlen)
{
    int rc;

    if (p->cert_file == NULL || p->key_file == NULL) {
        snprintf(err, errlen, "a certificate needs both a cert file and a key file");
        return -EINVAL;
    }
    if ((rc = tls_check_readable("cert", p->cert_file, err, errlen)) != 0 ||
        (rc = tls_check_readable("key", p->key_file, err, errlen)) != 0)
        return rc;

    ERR_clear_error();
    if (SSL_CTX_use_certificate_chain_file(s, p->cert_file) != 1) {
        snprintf(err, errlen, "cert %s: %s", p->cert_file,
                 tls_take_ssl_reason("no PEM certificate found"));
        return -EINVAL;
    }

    BIO *b = BIO_new_file(p->key_file, "r");
    EVP_PKEY *key = b != NULL ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    if (key == NULL) {
        unsigned long e = ERR_peek_error();
        /* OpenSSL 3 says "unsupported" (no decoder took it) for an empty file,
         * a directory or text without a PEM block: say what that means. */
        bool none = e == 0 || ERR_GET_REASON(e) == ERR_R_UNSUPPORTED ||
                    (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
        snprintf(err, errlen, "key %s: %s", p->key_file,
                 none ? "no private key found" : tls_take_ssl_reason("no private key found"));
        ERR_clear_error();
        return -EINVAL;
    }
    /* Checked here, not by SSL_CTX_use_PrivateKey, so the message names both files. */
    if (X509_check_private_key(SSL_CTX_get0_certificate(s), key) != 1) {
        EVP_PKEY_free(key);
        ERR_clear_error();
        snprintf(err, errlen, "key %s does not match certificate %s", p->key_file, p->cert_file);
        return -EINVAL;
    }
    rc = SSL_CTX_use_PrivateKey(s, key);
    EVP_PKEY_free(key);
    if (rc != 1) {
        snprintf(err, errlen, "key %s: %s", p->key_file,
                 tls_take_ssl_reason("cannot use private key"));
        return -EINVAL;
    }
    return 0;
}

/* SNI: switch the connection to the SSL_CTX whose certificate covers the name.
 * Exact names win over wildcards, and earlier pairs over later ones. The
 * session context (ticket keys) stays ctx->ssl[0]. */
static int tls_on_servername(SSL *ssl, int *alert, void *arg)
{
    const struct tls_ctx *c = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    static const unsigned int passes[] = {
        X509_CHECK_FLAG_NO_WILDCARDS,
        X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS,
    };

    (void)alert;
    if (name == NULL || c->n < 2)
        return SSL_TLSEXT_ERR_OK;
    for (size_t pass = 0; pass < sizeof(passes) / sizeof(passes[0]); pass++) {
        for (size_t i = 0; i < c->n; i++) {
            X509 *x = SSL_CTX_get0_certificate(c->ssl[i]);
            if (X509_check_host(x, name, 0, passes[pass], NULL) == 1) {
                if (i != 0 && SSL_set_SSL_CTX(ssl, c->ssl[i]) == NULL)
                    return SSL_TLSEXT_ERR_ALERT_FATAL;
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    ERR_clear_error();
    return SSL_TLSEXT_ERR_OK; /* unknown name: the default certificate */
}

int tls_server_ctx_new(struct tls_ctx **out, const struct tls_cert_pair *pairs, size_t n,
                       const char *min_version, char *err, size_t errlen)
{
    static const unsigned char sid_ctx[] = "mxproxy";
    struct tls_ctx *c;
    int minv, rc;

    if (tls_parse_min_version(min_version, &minv) != 0) {
        snprintf(err, errlen, "min_version %s: expected TLSv1.2 or TLSv1.3", min_version);
        return -EINVAL;
    }
    if (n == 0 || pairs == NULL) {
        snprintf(err, errlen, "a TLS server needs at least one certificate");
        return -EINVAL;
    }
    if (tls_ctx_alloc(&c, n, true) != 0) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        SSL_CTX *s = SSL_CTX_new(TLS_server_method());
        if (s == NULL) {
            snprintf(err, errlen, "SSL_CTX_new: %s", tls_take_ssl_reason("out of memory"));
            rc = -ENOMEM;
            goto fail;
        }
        c->ssl[i] = s;
        if ((rc = tls_ctx_common(s, minv)) != 0) {
            snprintf(err, errlen, "min_version: %s", tls_take_ssl_reason("not supported"));
            goto fail;
        }
        SSL_CTX_set_options(s, SSL_OP_CIPHER_SERVER_PREFERENCE);
        /* Stateless tickets only: a server-side cache would grow with clients. */
        SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_OFF);
        /* One TLS 1.3 ticket per full handshake, not OpenSSL's two: a mail client resumes
         * one connection at a time, and each ticket costs ~6% of a handshake's CPU. */
        SSL_CTX_set_num_tickets(s, 1);
        if (SSL_CTX_set_session_id_context(s, sid_ctx, sizeof(sid_ctx) - 1) != 1) {
            snprintf(err, errlen, "session id context: %s", tls_take_ssl_reason("failed"));
            rc = -ENOMEM;
            goto fail;
        }
        if ((rc = tls_load_pair(s, &pairs[i], err, errlen)) != 0)
            goto fail;
        if (SSL_CTX_set_cipher_list(s, TLS_SERVER_CIPHERS_DEFAULT) != 1) {
            snprintf(err, errlen, "ciphers: %s", tls_take_ssl_reason("no cipher match"));
            rc = -EINVAL;
            goto fail;
        }
    }
    SSL_CTX_set_tlsext_servername_callback(c->ssl[0], tls_on_servername);
    SSL_CTX_set_tlsext_servername_arg(c->ssl[0], c);
    *out = c;
    return 0;

fail:
    ERR_clear_error();
    tls_ctx_free(c);
    return rc;
}

/* Checks each name of a cipher list on its own, so a typo among good names
 * fails instead of being skipped as OpenSSL does. Names after '!' or '-'
 * (removals), '+' (reordering) and '@' (commands) are left to OpenSSL: a
 * removal of what this build lacks ("!RC4") is harmless. suites: a TLS 1.3
 * list, names separated by ':' only. */
static int tls_check_cipher_names(SSL_CTX *scratch, const char *list, bool suites, const char *what,
                                  char *err, size_t errlen)
{
    const char *seps = suites ? ":" : ":, ";
    const char *p = list;

    while (*p != '\0') {
        size_t n = strcspn(p, seps);
        bool positive = suites || strchr("!-+@", *p) == NULL;

        if (n > 0 && positive) {
            char name[128];
            int ok;
            if (n >= sizeof(name)) {
                snprintf(err, errlen, "%s: '%.*s...' is not a cipher name", what, 32, p);
                return -EINVAL;
            }
            memcpy(name, p, n);
            name[n] = '\0';
            ok = suites ? SSL_CTX_set_ciphersuites(scratch, name)
                        : SSL_CTX_set_cipher_list(scratch, name);
            ERR_clear_error();
            if (ok != 1) {
                snprintf(err, errlen, "%s: '%s' matches no %s cipher", what, name,
                         suites ? "TLS 1.3" : "TLS 1.2");
                return -EINVAL;
            }
        }
        p += n;
        if (*p != '\0')
            p++;
    }
    return 0;
}

int tls_ctx_set_ciphers(struct tls_ctx *c, const char *ciphers, const char *ciphersuites, char *err,
                        size_t errlen)
{
    SSL_CTX *scratch = SSL_CTX_new(TLS_method());
    int rc = 0;

    if (scratch == NULL) {
        snprintf(err, errlen, "SSL_CTX_new: %s", tls_take_ssl_reason("out of memory"));
        return -ENOMEM;
    }
    if (ciphers != NULL)
        rc = tls_check_cipher_names(scratch, ciphers, false, "ciphers", err, errlen);
    if (rc == 0 && ciphersuites != NULL)
        rc = tls_check_cipher_names(scratch, ciphersuites, true, "ciphersuites", err, errlen);
    SSL_CTX_free(scratch);
    for (size_t i = 0; rc == 0 && i < c->n; i++) {
        ERR_clear_error();
        if (ciphers != NULL && SSL_CTX_set_cipher_list(c->ssl[i], ciphers) != 1) {
            snprintf(err, errlen, "ciphers '%s': %s", ciphers,
                     tls_take_ssl_reason("no cipher match"));
            rc = -EINVAL;
        } else if (ciphersuites != NULL && SSL_CTX_set_ciphersuites(c->ssl[i], ciphersuites) != 1) {
            snprintf(err, errlen, "ciphersuites '%s': %s", ciphersuites,
                     tls_take_ssl_reason("no cipher match"));
            rc = -EINVAL;
        }
    }
    ERR_clear_error();
    return rc;
}

int tls_client_ctx_new(struct tls_ctx **out, bool verify, const char *ca_file,
                       const char *min_version, char *err, size_t errlen)
{
    struct tls_ctx *c;
    SSL_CTX *s;
    int minv, rc;

    if (tls_parse_min_version(min_version, &minv) != 0) {
        snprintf(err, errlen, "min_version %s: expected TLSv1.2 or TLSv1.3", min_version);
        return -EINVAL;
    }
    if (tls_ctx_alloc(&c, 1, false) != 0) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s = SSL_CTX_new(TLS_client_method());
    if (s == NULL) {
        snprintf(err, errlen, "SSL_CTX_new: %s", tls_take_ssl_reason("out of memory"));
        rc = -ENOMEM;
        goto fail;
    }
    c->ssl[0] = s;
    if ((rc = tls_ctx_common(s, minv)) != 0) {
        snprintf(err, errlen, "min_version: %s", tls_take_ssl_reason("not supported"));
        goto fail;
    }
    SSL_CTX_set_verify(s, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    ERR_clear_error();
    if (ca_file != NULL) {
        if ((rc = tls_check_readable("ca_file", ca_file, err, errlen)) != 0)
            goto fail;
        if (SSL_CTX_load_verify_locations(s, ca_file, NULL) != 1) {
            snprintf(err, errlen, "ca_file %s: %s", ca_file,
                     tls_take_ssl_reason("no PEM certificate found"));
            rc = -EINVAL;
            goto fail;
        }
    } else if (SSL_CTX_set_default_verify_paths(s) != 1) {
        snprintf(err, errlen, "default CA paths: %s", tls_take_ssl_reason("cannot load"));
        rc = -EINVAL;
        goto fail;
    }
    *out = c;
    return 0;

fail:
    ERR_clear_error();
    tls_ctx_free(c);
    return rc;
}

void tls_ctx_ref(struct tls_ctx *c)
{
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void tls_ctx_unref(struct tls_ctx *c)
{
    if (c != NULL && atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
        tls_ctx_free(c);
}

bool tls_ctx_is_server(const struct tls_ctx *c)
{
    return c->server;
}

/* ---- connections ---------------------------------------------------------------------------- */

int tls_conn_new(struct tls_conn **out, struct tls_ctx *ctx, const char *name)
{
    struct tls_conn *t;
    BIO *bio;

    if (ctx->server && name != NULL)
        return -EINVAL;
    if (pthread_once(&tls_bio_once, tls_bio_init_once) != 0 || tls_bio_method == NULL)
        return -ENOMEM;
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return -ENOMEM;
    ERR_clear_error();
    t->ssl = SSL_new(ctx->ssl[0]);
    if (t->ssl == NULL)
        goto fail_t;
    bio = BIO_new(tls_bio_method);
    if (bio == NULL)
        goto fail_ssl;
    BIO_set_data(bio, t);
    BIO_set_init(bio, 1);
    SSL_set_bio(t->ssl, bio, bio); /* the SSL takes our one reference */

    if (ctx->server) {
        t->flags |= TLS_F_SERVER;
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_connect_state(t->ssl);
        if (name != NULL) {
            unsigned char ip[16];
            t->name = strdup(name);
            if (t->name == NULL)
                goto fail_ssl;
            if (inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1) {
                /* No SNI for addresses (RFC 6066 §3); verify the iPAddress SAN. */
                if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name) != 1)
                    goto fail_name;
            } else if (SSL_set_tlsext_host_name(t->ssl, name) != 1 ||
                       SSL_set1_host(t->ssl, name) != 1) {
                goto fail_name;
            }
        }
    }
    tls_ctx_ref(ctx);
    t->ctx = ctx;
    *out = t;
    return 0;

fail_name:
    free(t->name);
fail_ssl:
    SSL_free(t->ssl);
fail_t:
    ERR_clear_error();
    free(t);
    return -ENOMEM;
}

void tls_conn_free(struct tls_conn *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl);
    tls_queue_free(&t->in);
    tls_queue_free(&t->out);
    tls_queue_free(&t->held);
    free(t->name);
    tls_ctx_unref(t->ctx);
    free(t);
}

static int tls_fail(struct tls_conn *t, int err, const char *reason)
{
    if (t->err == 0) {
        t->err = err;
        t->reason = reason;
    }
    return t->err;
}

/* Turns SSL_get_error() of a failed call into the sticky error. WANT_READ and
 * WANT_WRITE are not failures and return 1; the caller decides what they mean. */
static int tls_ssl_error(struct tls_conn *t, int ret)
{
    int e = SSL_get_error(t->ssl, ret);

    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return 1;
    case SSL_ERROR_ZERO_RETURN:
        t->flags |= TLS_F_PEER_EOF;
        return TLS_EOF;
    default:
        break;
    }
    if (t->flags & TLS_F_NOMEM) {
        ERR_clear_error();
        return tls_fail(t, -ENOMEM, "out of memory");
    }
    if (e == SSL_ERROR_SSL)
        return tls_fail(t, -EPROTO, tls_take_ssl_reason("TLS protocol error"));
    return tls_fail(t, -EPROTO, tls_take_ssl_reason("TLS I/O error"));
}

/* Encrypts held plaintext, then sends a requested close_notify. */
static int tls_flush(struct tls_conn *t)
{
    while (tls_queue_len(&t->held) > 0) {
        size_t n = 0;
        ERR_clear_error();
        int r = SSL_write_ex(t->ssl, t->held.p + t->held.off, tls_queue_len(&t->held), &n);
        if (r != 1) {
            int rc = tls_ssl_error(t, r);
            return rc == 1 || rc == TLS_EOF ? 0 : rc;
        }
        tls_queue_consume(&t->held, n);
    }
    if ((t->flags & (TLS_F_SHUT_REQ | TLS_F_SHUT_SENT)) == TLS_F_SHUT_REQ) {
        ERR_clear_error();
        int r = SSL_shutdown(t->ssl);
        if (r < 0) {
            int rc = tls_ssl_error(t, r);
            if (rc != 1 && rc != TLS_EOF)
                return rc;
        }
        t->flags |= TLS_F_SHUT_SENT;
    }
    return 0;
}

int tls_looks_like_handshake(const void *buf, size_t len)
{
    const unsigned char *p = buf;

    if (len == 0)
        return -1;
    if (p[0] != 0x16) /* content type: handshake */
        return 0;
    if (len == 1)
        return -1;
    if (p[1] != 0x03) /* record version major */
        return 0;
    if (len == 2)
        return -1;
    return p[2] <= 0x04 ? 1 : 0;
}

int tls_feed(struct tls_conn *t, const void *cipher, size_t len)
{
    int rc;

    if (t->err != 0)
        return t->err;
    if ((t->flags & (TLS_F_SERVER | TLS_F_CHECKED)) == TLS_F_SERVER && len > 0) {
        size_t n = sizeof(t->first) - t->n_first;
        if (n > len)
            n = len;
        memcpy(t->first + t->n_first, cipher, n);
        t->n_first = (unsigned char)(t->n_first + n);
        /* SSLv2-format hellos are refused too: no mail client sends one. */
        rc = tls_looks_like_handshake(t->first, t->n_first);
        if (rc == 0)
            return tls_fail(t, -EPROTO, "not a TLS handshake");
        if (rc == 1)
            t->flags |= TLS_F_CHECKED;
    }
    rc = tls_queue_append(&t->in, cipher, len, TLS_FEED_MAX);
    return rc == 0 ? 0
                   : tls_fail(t, rc, rc == -ENOBUFS ? "too much unread input" : "out of memory");
}

int tls_handshake(struct tls_conn *t)
{
    if (t->err != 0)
        return t->err;
    if (t->flags & TLS_F_DONE)
        return 0;
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r != 1) {
        int rc = tls_ssl_error(t, r);
        if (rc == 1)
            return TLS_WANT_IO;
        /* close_notify in the middle of a handshake is a failure too. */
        return rc == TLS_EOF ? tls_fail(t, -EPROTO, "closed during handshake") : rc;
    }
    t->flags |= TLS_F_DONE;
    return tls_flush(t);
}

ssize_t tls_read(struct tls_conn *t, void *plain, size_t cap)
{
    size_t n = 0;

    if (t->err != 0)
        return t->err;
    if (t->flags & TLS_F_PEER_EOF)
        return TLS_EOF;
    if (!(t->flags & TLS_F_DONE)) {
        int rc = tls_handshake(t);
        if (rc != 0)
            return rc == TLS_WANT_IO ? TLS_WANT : rc;
    }
    if (tls_queue_len(&t->held) > 0 && tls_flush(t) != 0)
        return t->err;
    if (cap == 0)
        return TLS_WANT;
    if (cap > INT_MAX)
        cap = INT_MAX;
    ERR_clear_error();
    int r = SSL_read_ex(t->ssl, plain, cap, &n);
    if (r == 1)
        return (ssize_t)n;
    int rc = tls_ssl_error(t, r);
    if (rc == 1) {
        /* WANT_WRITE cannot happen with our BIO; WANT_READ is the normal idle state. */
        return TLS_WANT;
    }
    return rc;
}

int tls_write(struct tls_conn *t, const void *plain, size_t len)
{
    int rc;

    if (t->err != 0)
        return t->err;
    if (t->flags & TLS_F_SHUT_REQ)
        return -EPIPE;
    if (!(t->flags & TLS_F_DONE) || tls_queue_len(&t->held) > 0) {
        rc = tls_queue_append(&t->held, plain, len, TLS_WRITE_MAX);
        if (rc != 0)
            return rc == -ENOMEM ? tls_fail(t, rc, "out of memory") : rc;
        return (t->flags & TLS_F_DONE) ? tls_flush(t) : 0;
    }
    /* The common case: encrypt straight from the caller's buffer. */
    const unsigned char *p = plain;
    while (len > 0) {
        size_t n = 0;
        ERR_clear_error();
        int r = SSL_write_ex(t->ssl, p, len, &n);
        if (r == 1) {
            p += n;
            len -= n;
            continue;
        }
        rc = tls_ssl_error(t, r);
        if (rc != 1)
            return rc == TLS_EOF ? -EPIPE : rc;
        /* Not expected with a BIO that takes every write; keep the rest for later. */
        rc = tls_queue_append(&t->held, p, len, SIZE_MAX / 2);
        return rc == 0 ? 0 : tls_fail(t, rc, "out of memory");
    }
    return 0;
}

size_t tls_pending_out(const struct tls_conn *t)
{
    return tls_queue_len(&t->out);
}

size_t tls_take(struct tls_conn *t, void *cipher, size_t cap)
{
    size_t n = tls_queue_len(&t->out);

    if (n > cap)
        n = cap;
    if (n == 0)
        return 0;
    memcpy(cipher, t->out.p + t->out.off, n);
    tls_queue_consume(&t->out, n);
    return n;
}

int tls_shutdown(struct tls_conn *t)
{
    if (t->err != 0)
        return t->err;
    t->flags |= TLS_F_SHUT_REQ;
    if (!(t->flags & TLS_F_DONE))
        return 0;
    return tls_flush(t);
}

bool tls_handshake_done(const struct tls_conn *t)
{
    return (t->flags & TLS_F_DONE) != 0;
}

bool tls_is_server(const struct tls_conn *t)
{
    return (t->flags & TLS_F_SERVER) != 0;
}

const char *tls_version(const struct tls_conn *t)
{
    return (t->flags & TLS_F_DONE) ? SSL_get_version(t->ssl) : NULL;
}

const char *tls_cipher(const struct tls_conn *t)
{
    return (t->flags & TLS_F_DONE) ? SSL_get_cipher_name(t->ssl) : NULL;
}

const char *tls_sni(const struct tls_conn *t)
{
    if (!(t->flags & TLS_F_SERVER))
        return t->name;
    return SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name);
}

bool tls_session_reused(const struct tls_conn *t)
{
    return (t->flags & TLS_F_DONE) && SSL_session_reused(t->ssl) == 1;
}

bool tls_peer_verified(const struct tls_conn *t)
{
    return SSL_get0_peer_certificate(t->ssl) != NULL && SSL_get_verify_result(t->ssl) == X509_V_OK;
}

const char *tls_verify_error(const struct tls_conn *t)
{
    long v = SSL_get_verify_result(t->ssl);
    return v == X509_V_OK ? NULL : X509_verify_cert_error_string(v);
}

size_t tls_peer_subject(const struct tls_conn *t, char *buf, size_t cap)
{
    X509 *x = SSL_get0_peer_certificate(t->ssl);
    BIO *b;
    char *text;
    long len;

    if (cap > 0)
        buf[0] = '\0';
    if (x == NULL || (b = BIO_new(BIO_s_mem())) == NULL)
        return 0;
    if (X509_NAME_print_ex(b, X509_get_subject_name(x), 0, XN_FLAG_RFC2253) < 0 ||
        (len = BIO_get_mem_data(b, &text)) <= 0) {
        BIO_free(b);
        ERR_clear_error();
        return 0;
    }
    if (cap > 0) {
        size_t n = (size_t)len < cap - 1 ? (size_t)len : cap - 1;
        memcpy(buf, text, n);
        buf[n] = '\0';
    }
    BIO_free(b);
    return (size_t)len;
}

const char *tls_error_reason(const struct tls_conn *t)
{
    return t->reason;
}
