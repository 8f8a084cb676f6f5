/* tls_testcerts.h: throw-away CA, server certificates and keys for tests.
 *
 * Everything is made with the OpenSSL API at test start (no openssl(1), no
 * files in the repository), in a directory from tls_testcerts_mkdtemp():
 *
 *     struct tls_testca ca;
 *     char dir[64];
 *     tls_testcerts_mkdtemp(dir, sizeof(dir));
 *     tls_testcerts_ca(&ca, "mxproxy test CA", false, dir);      writes DIR/ca.pem
 *     const char *names[] = {"mx.example.test"};
 *     tls_testcerts_leaf(&ca, "mx.example.test", names, 1, false, dir, "mx");
 *         writes DIR/mx.crt (leaf then CA) and DIR/mx.key
 *     ...
 *     tls_testcerts_ca_free(&ca);
 *     tls_testcerts_rmdir(dir);
 *
 * EC P-256 keys take a millisecond; RSA 2048 (rsa = true) up to a second.
 * Header-only (static inline) because CMake builds each tests/unit/test_*.c
 * alone; every function returns 0 or -1 and prints what failed.
 */
#ifndef MXPROXY_TLS_TESTCERTS_H
#define MXPROXY_TLS_TESTCERTS_H

#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

struct tls_testca {
    EVP_PKEY *key;  /* the CA's private key */
    X509 *cert;     /* self-signed, CA:TRUE */
    char path[256]; /* DIR/ca.pem, the certificate for verify tests */
};

static inline int tls_testcerts_fail_(const char *what)
{
    fprintf(stderr, "tls_testcerts: %s failed\n", what);
    return -1;
}

/* A new key: RSA 2048 or EC P-256. NULL on failure. */
static inline EVP_PKEY *tls_testcerts_key(bool rsa)
{
    return rsa ? EVP_RSA_gen(2048) : EVP_EC_gen("P-256");
}

/* Makes a private directory under $TMPDIR (or /tmp) into dir (cap bytes). */
static inline int tls_testcerts_mkdtemp(char *dir, size_t cap)
{
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || *tmp == '\0')
        tmp = "/tmp";
    if ((size_t)snprintf(dir, cap, "%s/mxproxy-tls-XXXXXX", tmp) >= cap)
        return tls_testcerts_fail_("mkdtemp path");
    return mkdtemp(dir) != NULL ? 0 : tls_testcerts_fail_("mkdtemp");
}

static inline int tls_testcerts_rm_(const char *path, const struct stat *st, int flag,
                                    struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Removes dir and everything in it. */
static inline int tls_testcerts_rmdir(const char *dir)
{
    return nftw(dir, tls_testcerts_rm_, 8, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}

static inline int tls_testcerts_add_ext_(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (e == NULL)
        return -1;
    int ok = X509_add_ext(x, e, -1);
    X509_EXTENSION_free(e);
    return ok == 1 ? 0 : -1;
}

/* A certificate for key, signed by issuer (NULL: self-signed), valid from an
 * hour ago for a year. cn may be NULL (no subject CN). */
static inline X509 *tls_testcerts_make_(EVP_PKEY *key, const char *cn, X509 *issuer,
                                        EVP_PKEY *issuer_key, bool ca, const char *san)
{
    static long serial = 1;
    X509 *x = X509_new();
    X509_NAME *name;

    if (x == NULL)
        return NULL;
    if (X509_set_version(x, 2) != 1 || ASN1_INTEGER_set(X509_get_serialNumber(x), serial++) != 1 ||
        X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL ||
        X509_gmtime_adj(X509_getm_notAfter(x), 365L * 24 * 3600) == NULL ||
        X509_set_pubkey(x, key) != 1)
        goto fail;
    name = X509_get_subject_name(x);
    if (X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"mxproxy tests",
                                   -1, -1, 0) != 1)
        goto fail;
    if (cn != NULL && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                                 (const unsigned char *)cn, -1, -1, 0) != 1)
        goto fail;
    if (X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name) != 1)
        goto fail;
    X509 *iss = issuer != NULL ? issuer : x;
    if (tls_testcerts_add_ext_(x, iss, NID_basic_constraints,
                               ca ? "critical,CA:TRUE" : "CA:FALSE") ||
        tls_testcerts_add_ext_(x, iss, NID_key_usage,
                               ca ? "critical,keyCertSign,cRLSign"
                                  : "critical,digitalSignature,keyEncipherment") ||
        tls_testcerts_add_ext_(x, iss, NID_subject_key_identifier, "hash") ||
        tls_testcerts_add_ext_(x, iss, NID_authority_key_identifier, "keyid:always"))
        goto fail;
    if (!ca && tls_testcerts_add_ext_(x, iss, NID_ext_key_usage, "serverAuth,clientAuth"))
        goto fail;
    if (san != NULL && tls_testcerts_add_ext_(x, iss, NID_subject_alt_name, san))
        goto fail;
    if (X509_sign(x, issuer_key != NULL ? issuer_key : key, EVP_sha256()) <= 0)
        goto fail;
    return x;
fail:
    X509_free(x);
    return NULL;
}

static inline int tls_testcerts_write_(const char *path, X509 *const *certs, size_t n,
                                       EVP_PKEY *key)
{
    BIO *b = BIO_new_file(path, "w");
    int ok = b != NULL;

    for (size_t i = 0; ok && i < n; i++)
        ok = PEM_write_bio_X509(b, certs[i]) == 1;
    if (ok && key != NULL)
        ok = PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL) == 1;
    BIO_free(b);
    return ok ? 0 : tls_testcerts_fail_(path);
}

/* Makes a self-signed CA and writes its certificate to DIR/ca.pem. */
static inline int tls_testcerts_ca(struct tls_testca *ca, const char *cn, bool rsa, const char *dir)
{
    memset(ca, 0, sizeof(*ca));
    ca->key = tls_testcerts_key(rsa);
    if (ca->key == NULL)
        return tls_testcerts_fail_("CA key");
    ca->cert = tls_testcerts_make_(ca->key, cn, NULL, NULL, true, NULL);
    if (ca->cert == NULL)
        return tls_testcerts_fail_("CA certificate");
    if ((size_t)snprintf(ca->path, sizeof(ca->path), "%s/ca.pem", dir) >= sizeof(ca->path))
        return tls_testcerts_fail_("CA path");
    return tls_testcerts_write_(ca->path, &ca->cert, 1, NULL);
}

static inline void tls_testcerts_ca_free(struct tls_testca *ca)
{
    X509_free(ca->cert);
    EVP_PKEY_free(ca->key);
    ca->cert = NULL;
    ca->key = NULL;
}

/* Makes a server certificate signed by ca with subject CN cn (NULL: none) and
 * the DNS names dns[0..ndns) as subjectAltName (ndns 0: no SAN). Writes the
 * chain (leaf, then the CA) to DIR/BASE.crt and the key to DIR/BASE.key. */
static inline int tls_testcerts_leaf(const struct tls_testca *ca, const char *cn,
                                     const char *const *dns, size_t ndns, bool rsa, const char *dir,
                                     const char *base)
{
    char san[1024] = "", path[512];
    size_t used = 0;
    int rc = -1;

    for (size_t i = 0; i < ndns; i++) {
        int w = snprintf(san + used, sizeof(san) - used, "%sDNS:%s", i ? "," : "", dns[i]);
        if (w < 0 || (size_t)w >= sizeof(san) - used)
            return tls_testcerts_fail_("SAN too long");
        used += (size_t)w;
    }
    EVP_PKEY *key = tls_testcerts_key(rsa);
    if (key == NULL)
        return tls_testcerts_fail_("leaf key");
    X509 *x = tls_testcerts_make_(key, cn, ca->cert, ca->key, false, ndns ? san : NULL);
    if (x == NULL) {
        tls_testcerts_fail_("leaf certificate");
        goto out;
    }
    X509 *chain[2] = {x, ca->cert};
    if ((size_t)snprintf(path, sizeof(path), "%s/%s.crt", dir, base) >= sizeof(path) ||
        tls_testcerts_write_(path, chain, 2, NULL) != 0)
        goto out;
    if ((size_t)snprintf(path, sizeof(path), "%s/%s.key", dir, base) >= sizeof(path) ||
        tls_testcerts_write_(path, NULL, 0, key) != 0)
        goto out;
    rc = 0;
out:
    X509_free(x);
    EVP_PKEY_free(key);
    return rc;
}

#endif /* MXPROXY_TLS_TESTCERTS_H */
