/* tls.h: OpenSSL contexts and per-connection TLS on memory buffers.
 *
 * A tls_conn never touches a socket or a libuv handle. The session feeds it
 * the ciphertext it read from the network (tls_feed), takes out the
 * ciphertext it must send (tls_take), and exchanges plaintext with
 * tls_read/tls_write. Two tls_conns can therefore talk to each other in
 * memory, which is how tests/unit/test_tls.c exercises this module.
 *
 * Driving a connection, after every read from the network:
 *
 *     tls_feed(t, buf, nread);             copies; buf is the caller's again
 *     if (!tls_handshake_done(t))
 *         rc = tls_handshake(t);           0 done, TLS_WANT_IO, or < 0
 *     while ((n = tls_read(t, plain, cap)) > 0)
 *         forward plain;                   stop early under backpressure
 *     while (tls_pending_out(t) > 0)
 *         send tls_take(t, block, size);   ALSO after errors: it may be an alert
 *
 * tls_write() may be called at any time, even before the handshake is done:
 * plaintext written early is held and encrypted once the handshake completes.
 * Every call may produce ciphertext, so check tls_pending_out() after each.
 *
 * Errors are sticky: once a call failed, every later call returns the same
 * error, and tls_error_reason() says why in OpenSSL's words ("wrong version
 * number", "certificate verify failed", "no shared cipher", ...).
 *
 * Threads: a tls_ctx may be shared by every worker thread; a tls_conn belongs
 * to one thread. OpenSSL's error queue is per thread, so this is safe.
 *
 * Memory: no buffer is held while a connection is idle. SSL_MODE_RELEASE_BUFFERS
 * frees OpenSSL's record buffers between records, and the ciphertext queues
 * in both directions are freed as soon as they drain.
 *
 * Session resumption: a server context issues stateless TLS session tickets
 * (OpenSSL's default: two per TLS 1.3 handshake, one in TLS 1.2) and keeps no
 * server-side session cache, so memory does not grow with the number of
 * clients. Ticket keys are random per server context and shared by its SNI
 * certificates: after a reload, older tickets fall back to a full handshake.
 * Client contexts keep no sessions and always do a full handshake.
 */
#ifndef MXPROXY_TLS_H
#define MXPROXY_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define TLS_WANT 0                 /* tls_read: no plaintext yet, feed more ciphertext */
#define TLS_WANT_IO 1              /* tls_handshake: not finished, send tls_take() and feed */
#define TLS_EOF (-4095)            /* tls_read: peer sent close_notify; same value as UV_EOF */
#define TLS_FEED_MAX (256 * 1024)  /* ciphertext tls_feed buffers before -ENOBUFS */
#define TLS_WRITE_MAX (256 * 1024) /* plaintext held before the handshake, at most */

/* A certificate chain and its private key, both PEM files. */
struct tls_cert_pair {
    const char *cert_file; /* leaf first, then intermediates */
    const char *key_file;  /* the leaf's private key, unencrypted */
};

struct tls_ctx;  /* one configured set of SSL_CTXs, reference-counted */
struct tls_conn; /* one TLS connection; opaque */

/* Creates a server context. pairs[0..n) are loaded in order; pairs[0] is the
 * default. During the handshake the name the client sends (SNI) selects a
 * pair: an exact match among the certificates' subjectAltName DNS names first
 * (or the subject CN when a certificate has no DNS names), then a wildcard
 * match ("*.example.com" covers one label); a missing or unknown name gets
 * the default. min_version is "TLSv1.2" or "TLSv1.3"; NULL means "TLSv1.2".
 * The ciphers are TLS_SERVER_CIPHERS_DEFAULT and OpenSSL's TLS 1.3 suites.
 *
 * Returns 0 and sets *out (reference count 1, the caller's), or -EINVAL
 * (bad argument, unreadable or invalid file), -ENOMEM, with a message in
 * err (errlen bytes, NUL-terminated; e.g. "cert x.pem: No such file or
 * directory", "key k.pem does not match certificate c.pem"). *out is
 * untouched on failure. */
int tls_server_ctx_new(struct tls_ctx **out, const struct tls_cert_pair *pairs, size_t n,
                       const char *min_version, char *err, size_t errlen);

/* The TLS 1.2 cipher list of every server context until tls_ctx_set_ciphers
 * changes it: ECDHE key exchange (forward secrecy) with an AEAD cipher only;
 * no CBC, no RSA key exchange, no DHE. TLS 1.3 keeps OpenSSL's suites, which
 * are all forward-secret AEAD. The order is OpenSSL's own for these ciphers. */
#define TLS_SERVER_CIPHERS_DEFAULT                                                                 \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                   \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"                                   \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"

/* Replaces the TLS 1.2 cipher list (ciphers, OpenSSL's cipher string syntax)
 * and the TLS 1.3 suites (ciphersuites, names joined by ':') of every
 * SSL_CTX in c; NULL leaves that one as it is. Call it before the context is
 * used by any connection. Every positive name must match a cipher of this
 * OpenSSL build (a typo is an error, not skipped), and the whole string must
 * leave at least one cipher. Returns 0, or -EINVAL / -ENOMEM with a message
 * in err ("ciphers: 'FOO' matches no TLS 1.2 cipher"); on failure c may
 * hold the new list in some of its SSL_CTXs, so drop it. */
int tls_ctx_set_ciphers(struct tls_ctx *c, const char *ciphers, const char *ciphersuites, char *err,
                        size_t errlen);

/* Creates a client context (the proxy connecting to a backend). verify=true
 * makes the handshake fail unless the server's chain verifies against
 * ca_file (PEM bundle) or, with ca_file NULL, the system's default CA paths;
 * the name check is per connection (tls_conn_new). verify=false still records
 * the verification result for tls_peer_verified(). Returns and sets like
 * tls_server_ctx_new. */
int tls_client_ctx_new(struct tls_ctx **out, bool verify, const char *ca_file,
                       const char *min_version, char *err, size_t errlen);

struct tls_keylog; /* an open tls_keylog file, reference-counted */

/* Opens path for appending TLS secrets (created mode 0600 when missing; an
 * existing file must be a regular file that group and others cannot read, and
 * is never truncated). Returns 0 and sets *out (one reference, the caller's),
 * or -EINVAL / -ENOMEM with "tls_keylog PATH: why" in err. */
int tls_keylog_open(struct tls_keylog **out, const char *path, char *err, size_t errlen);

/* Drops a reference; the last one closes the file. NULL is accepted. */
void tls_keylog_unref(struct tls_keylog *k);

/* Makes every handshake on c's connections append its secrets to k, one line
 * each in the NSS key log format (SSLKEYLOGFILE: CLIENT_RANDOM for TLS 1.2,
 * the CLIENT_/SERVER_HANDSHAKE_TRAFFIC_SECRET and _TRAFFIC_SECRET_0 lines for
 * TLS 1.3), which Wireshark reads to decrypt a capture. c references k; NULL
 * stops it. Call it before c is used by any connection. Returns 0 or -ENOMEM. */
int tls_ctx_set_keylog(struct tls_ctx *c, struct tls_keylog *k);

/* Takes one more reference. Any thread. */
void tls_ctx_ref(struct tls_ctx *c);

/* Drops a reference; the last one frees the context. Connections hold their
 * own reference, so a reload can drop the old context while they run. NULL
 * is accepted. */
void tls_ctx_unref(struct tls_ctx *c);

/* True for a context made by tls_server_ctx_new. */
bool tls_ctx_is_server(const struct tls_ctx *c);

/* Creates a connection on ctx, which it references until tls_conn_free.
 * A server context gives the server side. For a client context, name is the
 * backend's host name: sent as SNI (unless it is an IP address) and, when
 * the context verifies, checked against the certificate; NULL sends no SNI
 * and checks no name. Returns 0 and sets *out, or -ENOMEM, or -EINVAL (name
 * given for a server context). The client sends its ClientHello on the first
 * tls_handshake() call. */
int tls_conn_new(struct tls_conn **out, struct tls_ctx *ctx, const char *name);

/* Frees t and its buffers, sending nothing (call tls_shutdown first for a
 * close_notify). NULL is accepted. */
void tls_conn_free(struct tls_conn *t);

/* Appends len bytes of ciphertext from the network; copies them, so the
 * caller keeps cipher. Returns 0, -ENOBUFS when more than TLS_FEED_MAX bytes
 * would wait unprocessed (the caller forgot to tls_read, or reads faster than
 * it drains), -ENOMEM, or the sticky error; -ENOBUFS and -ENOMEM become the
 * sticky error, since the bytes are lost. On a server connection the first
 * bytes are checked at once: anything but a TLS handshake record (plaintext
 * "EHLO" on a TLS port, HTTP, ...) fails with -EPROTO and the reason "not a
 * TLS handshake", so the caller can close without waiting for a timeout. */
int tls_feed(struct tls_conn *t, const void *cipher, size_t len);

/* Drives the handshake with the ciphertext fed so far. Returns 0 once the
 * handshake is complete (at once on later calls), TLS_WANT_IO while it needs
 * more input (send tls_take() output and feed what the peer answers; a
 * truncated ClientHello stays here, the caller's timeout ends it), or a
 * negative error: -EPROTO with tls_error_reason() set, -ENOMEM. */
int tls_handshake(struct tls_conn *t);

/* Decrypts into plain (cap bytes). Drives the handshake first if needed.
 * Returns the number of bytes (> 0), TLS_WANT (0) when no complete record is
 * buffered, TLS_EOF after the peer's close_notify (the plaintext before it
 * has been returned by earlier calls), or a negative error as tls_handshake.
 * Call it until it returns <= 0 after each tls_feed: ciphertext left unread
 * counts against TLS_FEED_MAX. A network EOF without close_notify is the
 * caller's to notice (a truncation, if it matters). */
ssize_t tls_read(struct tls_conn *t, void *plain, size_t cap);

/* Encrypts len bytes of plaintext; the ciphertext becomes available through
 * tls_take(). Before the handshake is done the plaintext is held (at most
 * TLS_WRITE_MAX bytes) and encrypted when it completes. Returns 0 (all len
 * bytes accepted), -ENOBUFS, -ENOMEM, -EPIPE after tls_shutdown, or the
 * sticky error. Backpressure is the caller's: stop writing while
 * tls_pending_out() is large. */
int tls_write(struct tls_conn *t, const void *plain, size_t len);

/* Bytes of ciphertext waiting to be sent. */
size_t tls_pending_out(const struct tls_conn *t);

/* Moves up to cap bytes of ciphertext into cipher and returns how many. */
size_t tls_take(struct tls_conn *t, void *cipher, size_t cap);

/* Queues a close_notify alert (after any held plaintext). Later tls_write
 * calls fail with -EPIPE; tls_read still returns what the peer sends.
 * Returns 0, or the sticky error. Before the handshake completes nothing is
 * queued yet: the alert follows the handshake if it goes on (a caller that
 * closes the socket at once sends nothing, which is fine). */
int tls_shutdown(struct tls_conn *t);

/* True once the handshake completed. */
bool tls_handshake_done(const struct tls_conn *t);

/* True when the connection is the server side. */
bool tls_is_server(const struct tls_conn *t);

/* Protocol ("TLSv1.3") and cipher ("TLS_AES_256_GCM_SHA384") once the
 * handshake is done, else NULL. Static strings. */
const char *tls_version(const struct tls_conn *t);
const char *tls_cipher(const struct tls_conn *t);

/* Server: the name the client asked for (SNI), or NULL. Client: the name
 * given to tls_conn_new, or NULL. Valid while t lives. */
const char *tls_sni(const struct tls_conn *t);

/* True when the handshake resumed an earlier session (a ticket). */
bool tls_session_reused(const struct tls_conn *t);

/* True when the peer presented a certificate that verified (chain, and name
 * when one was given). Meaningful on client connections after the handshake. */
bool tls_peer_verified(const struct tls_conn *t);

/* Why verification failed in OpenSSL's words ("hostname mismatch",
 * "self-signed certificate in certificate chain"), or NULL when it did not
 * fail or did not run. Static string. */
const char *tls_verify_error(const struct tls_conn *t);

/* Writes the peer certificate's subject as RFC 2253 text ("CN=mx.example.test")
 * into buf (cap bytes, NUL-terminated, cut if needed). Returns its full length,
 * or 0 (buf = "") when there is no peer certificate. */
size_t tls_peer_subject(const struct tls_conn *t, char *buf, size_t cap);

/* OpenSSL's reason for the failure that made the connection fail, for the
 * reason= field of ev=tls_error; NULL while nothing failed. Static string. */
const char *tls_error_reason(const struct tls_conn *t);

/* Pure check of a connection's first bytes: 1 when they start like a TLS
 * handshake record (0x16 0x03 0x00..0x04), 0 when they cannot, -1 when
 * len is too short to tell (nothing is decided on an empty buffer). */
int tls_looks_like_handshake(const void *buf, size_t len);

#endif /* MXPROXY_TLS_H */
