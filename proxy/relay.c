/* relay.c: zero-copy forwarding with watermarks; see relay.h. */
#include "relay.h"

#include "tls.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* relay_on_write finds the block from its request. */
static_assert(offsetof(struct relay_block, req) == 0, "req must lead struct relay_block");

static struct relay_block *relay_block_get(struct relay_pool *pool)
{
    struct relay_block *b = pool->free;
    if (b != NULL) {
        pool->free = b->next;
        pool->n_free--;
    } else {
        b = malloc(sizeof(*b));
        if (b == NULL)
            return NULL;
    }
    b->refs = 1;
    return b;
}

void relay_block_ref(struct relay_block *b)
{
    b->refs++;
}

void relay_block_unref(struct relay_pool *pool, struct relay_block *b)
{
    if (b == NULL || --b->refs > 0)
        return;
    if (pool->n_free >= RELAY_POOL_KEEP) {
        free(b);
        return;
    }
    b->next = pool->free;
    pool->free = b;
    pool->n_free++;
}

static struct relay_wreq *relay_wreq_get(struct relay_pool *pool)
{
    struct relay_wreq *w = pool->wfree;
    if (w != NULL) {
        pool->wfree = w->next;
        pool->n_wfree--;
        return w;
    }
    return malloc(sizeof(*w));
}

static void relay_wreq_put(struct relay_pool *pool, struct relay_wreq *w)
{
    if (pool->n_wfree >= RELAY_POOL_KEEP * 4) {
        free(w);
        return;
    }
    w->next = pool->wfree;
    pool->wfree = w;
    pool->n_wfree++;
}

/* The block that owns a read buffer handed out by relay_on_alloc. */
static struct relay_block *relay_block_of(const uv_buf_t *buf, size_t carried)
{
    return (struct relay_block *)(buf->base - carried - offsetof(struct relay_block, data));
}

void relay_pool_drain(struct relay_pool *pool)
{
    while (pool->free != NULL) {
        struct relay_block *b = pool->free;
        pool->free = b->next;
        free(b);
    }
    pool->n_free = 0;
    while (pool->wfree != NULL) {
        struct relay_wreq *w = pool->wfree;
        pool->wfree = w->next;
        free(w);
    }
    pool->n_wfree = 0;
}

/* Carried bytes placed at the start of the block handed out last; libuv
 * calls the read callback right after the alloc callback, so one slot per
 * thread is enough. */
static _Thread_local size_t relay_carried;

static void relay_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct relay_dir *d = h->data;
    struct relay_block *b = relay_block_get(d->pool);

    (void)suggested;
    relay_carried = 0;
    if (b == NULL) {
        *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS to relay_on_read */
        return;
    }
    if (d->carry_len > 0 && d->src_tls == NULL) {
        memcpy(b->data, d->carry, d->carry_len);
        relay_carried = d->carry_len;
    }
    *buf = uv_buf_init(b->data + relay_carried, (unsigned)(RELAY_BLOCK_SIZE - relay_carried));
}

static void relay_on_shutdown(uv_shutdown_t *req, int status)
{
    struct relay_dir *d = req->data;

    (void)status; /* a peer that is already gone needs no FIN */
    d->flags |= RELAY_F_DONE;
    d->on_event(d, RELAY_EV_DONE, 0);
}

int relay_shutdown_dst(struct relay_dir *d)
{
    if (d->dst_tls != NULL && tls_handshake_done(d->dst_tls) && tls_shutdown(d->dst_tls) == 0)
        relay_tls_flush(d); /* close_notify, then the FIN */
    /* Nothing queued: the FIN can go now, without a request and an epoll
     * round trip (the common case: writes are tried at once). */
    uv_os_fd_t fd;
    if (uv_stream_get_write_queue_size(d->dst) == 0 && uv_fileno((uv_handle_t *)d->dst, &fd) == 0 &&
        shutdown(fd, SHUT_WR) == 0) {
        d->flags |= RELAY_F_DONE;
        d->on_event(d, RELAY_EV_DONE, 0);
        return 0;
    }
    d->shutdown_req.data = d;
    int rc = uv_shutdown(&d->shutdown_req, d->dst, relay_on_shutdown);
    if (rc != 0) {
        d->flags |= RELAY_F_DONE;
        d->on_event(d, RELAY_EV_DONE, 0);
    }
    return rc;
}

static void relay_tls_drain(struct relay_dir *d);

/* Resumes reading on the crossing below the low-water mark. */
static void relay_after_write(struct relay_dir *d)
{
    if ((d->flags & (RELAY_F_PAUSED | RELAY_F_STOPPED)) == RELAY_F_PAUSED &&
        uv_stream_get_write_queue_size(d->dst) <= RELAY_LOWAT) {
        d->flags &= ~RELAY_F_PAUSED;
        if (relay_start(d) == 0 && d->src_tls != NULL && (d->flags & RELAY_F_READING))
            relay_tls_drain(d);
    }
}

/* Stops reading while the other side has too much queued. */
static void relay_check_hiwat(struct relay_dir *d)
{
    if (uv_stream_get_write_queue_size(d->dst) > RELAY_HIWAT) {
        if (d->flags & RELAY_F_READING)
            uv_read_stop(d->src);
        d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_PAUSED;
    }
}

static void relay_on_write(uv_write_t *req, int status)
{
    struct relay_dir *d = req->data;

    relay_block_unref(d->pool, (struct relay_block *)req); /* req is the first member */
    if (status < 0) {
        if (status != UV_ECANCELED)
            d->on_event(d, RELAY_EV_WRITE_ERR, status);
        return;
    }
    relay_after_write(d);
}

static void relay_on_send(uv_write_t *req, int status)
{
    struct relay_wreq *w = (struct relay_wreq *)req;
    struct relay_dir *d = req->data;

    relay_block_unref(d->pool, w->blk);
    relay_wreq_put(d->pool, w);
    if (status < 0) {
        if (status != UV_ECANCELED)
            d->on_event(d, RELAY_EV_WRITE_ERR, status);
        return;
    }
    relay_after_write(d);
}

/* Writes what the socket takes now, when nothing is queued before it; moves
 * *bufs and *n past what was written. Returns 0 or a negative UV_E* code. */
static int relay_try_write(struct relay_dir *d, uv_buf_t *bufs, unsigned *n)
{
    int w = uv_try_write(d->dst, bufs, *n);

    if (w == UV_EAGAIN || w == UV_ENOSYS)
        return 0; /* queued writes first, or a socket that cannot */
    if (w < 0)
        return w;
    size_t done = (size_t)w;
    unsigned i = 0;
    while (i < *n && done >= bufs[i].len) {
        done -= bufs[i].len;
        i++;
    }
    if (i < *n) {
        bufs[i].base += done;
        bufs[i].len -= done;
    }
    memmove(bufs, bufs + i, (*n - i) * sizeof(*bufs));
    *n -= i;
    return 0;
}

static int relay_send_raw(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs_in,
                          unsigned n)
{
    uv_buf_t bufs[RELAY_SEND_MAX_BUFS];

    if (n > RELAY_SEND_MAX_BUFS)
        return UV_EINVAL;
    memcpy(bufs, bufs_in, n * sizeof(*bufs));
    int rc = relay_try_write(d, bufs, &n);
    if (rc != 0) {
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return rc;
    }
    if (n == 0)
        return 0;

    struct relay_wreq *w = relay_wreq_get(d->pool);
    if (w == NULL) {
        d->on_event(d, RELAY_EV_WRITE_ERR, UV_ENOMEM);
        return UV_ENOMEM;
    }
    w->req.data = d;
    w->blk = b;
    rc = uv_write(&w->req, d->dst, bufs, n, relay_on_send);
    if (rc != 0) {
        relay_wreq_put(d->pool, w);
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return rc;
    }
    if (b != NULL)
        relay_block_ref(b);
    relay_check_hiwat(d);
    return 0;
}

void relay_tls_flush(struct relay_dir *d)
{
    while (d->dst_tls != NULL && tls_pending_out(d->dst_tls) > 0) {
        struct relay_block *b = relay_block_get(d->pool);
        if (b == NULL) {
            d->on_event(d, RELAY_EV_WRITE_ERR, UV_ENOMEM);
            return;
        }
        uv_buf_t buf =
            uv_buf_init(b->data, (unsigned)tls_take(d->dst_tls, b->data, RELAY_BLOCK_SIZE));
        int rc = relay_send_raw(d, b, &buf, 1);
        relay_block_unref(d->pool, b);
        if (rc != 0)
            return;
    }
}

int relay_send(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs, unsigned n)
{
    if (d->dst_tls == NULL)
        return relay_send_raw(d, b, bufs, n);
    /* tls_write copies: b is not needed once the plaintext is encrypted. */
    for (unsigned i = 0; i < n; i++) {
        int rc = tls_write(d->dst_tls, bufs[i].base, bufs[i].len);
        if (rc != 0) {
            d->on_event(d, RELAY_EV_WRITE_ERR, rc == -ENOBUFS ? UV_ENOBUFS : UV_EPROTO);
            return rc;
        }
    }
    relay_tls_flush(d);
    return 0;
}

int relay_send_copy(struct relay_dir *d, const char *p, size_t len)
{
    struct relay_block *b = relay_block_get(d->pool);

    if (b == NULL) {
        d->on_event(d, RELAY_EV_WRITE_ERR, UV_ENOMEM);
        return UV_ENOMEM;
    }
    if (len > RELAY_BLOCK_SIZE)
        len = RELAY_BLOCK_SIZE;
    memcpy(b->data, p, len);
    uv_buf_t buf = uv_buf_init(b->data, (unsigned)len);
    int rc = relay_send(d, b, &buf, 1);
    relay_block_unref(d->pool, b); /* relay_send holds its own reference */
    return rc;
}

/* src sent EOF (a FIN, or a TLS close_notify). */
static void relay_on_eof(struct relay_dir *d)
{
    if (d->flags & RELAY_F_READING)
        uv_read_stop(d->src);
    d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_EOF;
    d->on_event(d, RELAY_EV_EOF, 0);
    /* The FIN goes out after every queued write: half-close is exact. */
    if (!(d->flags & (RELAY_F_NO_FIN | RELAY_F_STOPPED)))
        relay_shutdown_dst(d);
}

/* Hands bytes read (or decrypted) from src on: to the owner, or to dst.
 * Takes the caller's reference to b; data[0, len) are the bytes, a carry
 * included. */
static void relay_deliver(struct relay_dir *d, struct relay_block *b, size_t len)
{
    if (d->on_data != NULL) {
        d->carry_len = 0; /* delivered: the owner may reuse its carry buffer */
        d->on_data(d, b, len);
        return;
    }
    if (d->dst_tls != NULL) {
        uv_buf_t out = uv_buf_init(b->data, (unsigned)len);
        (void)relay_send(d, b, &out, 1);
        relay_block_unref(d->pool, b);
        return;
    }
    uv_buf_t out = uv_buf_init(b->data, (unsigned)len);
    unsigned n = 1;
    int rc = relay_try_write(d, &out, &n);
    if (rc == 0 && n == 0) {
        relay_block_unref(d->pool, b); /* all written: the usual case */
        return;
    }
    b->req.data = d;
    if (rc == 0)
        rc = uv_write(&b->req, d->dst, &out, 1, relay_on_write);
    if (rc != 0) {
        relay_block_unref(d->pool, b);
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return;
    }
    relay_check_hiwat(d);
}

/* Decrypts what src_tls holds and delivers it, while the direction may
 * take more; what OpenSSL answers goes out through rev. */
static void relay_tls_drain(struct relay_dir *d)
{
    struct tls_conn *t = d->src_tls;

    if (!tls_handshake_done(t)) {
        int rc = tls_handshake(t);
        relay_tls_flush(d->rev);
        if (rc == TLS_WANT_IO)
            return;
        if (rc < 0) {
            d->on_event(d, RELAY_EV_TLS_ERR, rc);
            return;
        }
        d->on_event(d, RELAY_EV_TLS_READY, 0);
    }
    while (!(d->flags & (RELAY_F_STOPPED | RELAY_F_HELD | RELAY_F_PAUSED | RELAY_F_EOF))) {
        struct relay_block *b = relay_block_get(d->pool);
        size_t c = 0;

        if (b == NULL) {
            d->on_event(d, RELAY_EV_READ_ERR, UV_ENOBUFS);
            return;
        }
        if (d->on_data != NULL && d->carry_len > 0) {
            c = d->carry_len;
            memcpy(b->data, d->carry, c);
        }
        ssize_t n = tls_read(t, b->data + c, RELAY_BLOCK_SIZE - c);
        if (n > 0) {
            d->bytes += (uint64_t)n;
            relay_deliver(d, b, c + (size_t)n);
            continue;
        }
        relay_block_unref(d->pool, b);
        if (n == TLS_WANT)
            break;
        relay_tls_flush(d->rev);
        if (n == TLS_EOF)
            relay_on_eof(d);
        else
            d->on_event(d, RELAY_EV_TLS_ERR, (int)n);
        return;
    }
    relay_tls_flush(d->rev); /* tickets, key updates */
}

static void relay_on_read(uv_stream_t *src, ssize_t nread, const uv_buf_t *buf)
{
    struct relay_dir *d = src->data;
    size_t carried = relay_carried;

    relay_carried = 0;
    if (nread <= 0) {
        if (buf->base != NULL)
            relay_block_unref(d->pool, relay_block_of(buf, carried));
        if (nread == 0)
            return; /* EAGAIN; the carry stays with the owner for the next read */
        if (nread != UV_EOF) {
            uv_read_stop(src);
            d->flags &= ~RELAY_F_READING;
            d->on_event(d, RELAY_EV_READ_ERR, (int)nread);
            return;
        }
        relay_on_eof(d);
        return;
    }

    struct relay_block *b = relay_block_of(buf, carried);
    d->last_read = uv_now(src->loop);
    if (d->src_tls != NULL) {
        int rc = tls_feed(d->src_tls, buf->base, (size_t)nread);
        relay_block_unref(d->pool, b); /* tls_feed copied the ciphertext */
        if (rc != 0) {
            relay_tls_flush(d->rev); /* an alert, if OpenSSL made one */
            d->on_event(d, RELAY_EV_TLS_ERR, rc);
            return;
        }
        relay_tls_drain(d);
        return;
    }
    d->bytes += (uint64_t)nread;
    relay_deliver(d, b, carried + (size_t)nread);
}

void relay_inject(struct relay_dir *d, const char *p, size_t len)
{
    while (len > 0 && !(d->flags & RELAY_F_STOPPED)) {
        struct relay_block *b = relay_block_get(d->pool);
        size_t c = d->on_data != NULL && d->src_tls == NULL ? d->carry_len : 0;
        size_t n;

        if (b == NULL) {
            d->on_event(d, RELAY_EV_READ_ERR, UV_ENOBUFS);
            return;
        }
        if (c > 0)
            memcpy(b->data, d->carry, c);
        n = len < RELAY_BLOCK_SIZE - c ? len : RELAY_BLOCK_SIZE - c;
        memcpy(b->data + c, p, n);
        p += n;
        len -= n;
        if (d->src_tls != NULL) {
            int rc = tls_feed(d->src_tls, b->data, n);
            relay_block_unref(d->pool, b);
            if (rc != 0) {
                relay_tls_flush(d->rev);
                d->on_event(d, RELAY_EV_TLS_ERR, rc);
                return;
            }
            relay_tls_drain(d);
            continue;
        }
        d->bytes += n;
        relay_deliver(d, b, c + n);
    }
}

void relay_init(struct relay_dir *d, uv_stream_t *src, uv_stream_t *dst, struct relay_pool *pool,
                relay_event_cb on_event, void *owner)
{
    *d = (struct relay_dir){
        .src = src,
        .dst = dst,
        .pool = pool,
        .on_event = on_event,
        .owner = owner,
    };
    src->data = d;
}

int relay_start(struct relay_dir *d)
{
    if (d->flags &
        (RELAY_F_READING | RELAY_F_EOF | RELAY_F_STOPPED | RELAY_F_HELD | RELAY_F_PAUSED))
        return 0;
    int rc = uv_read_start(d->src, relay_on_alloc, relay_on_read);
    if (rc == 0)
        d->flags |= RELAY_F_READING;
    return rc;
}

void relay_stop(struct relay_dir *d)
{
    d->flags |= RELAY_F_STOPPED;
    d->flags &= ~RELAY_F_READING;
    if (!uv_is_closing((uv_handle_t *)d->src))
        uv_read_stop(d->src);
}

void relay_hold(struct relay_dir *d)
{
    d->flags |= RELAY_F_HELD;
    if (d->flags & RELAY_F_READING) {
        uv_read_stop(d->src);
        d->flags &= ~RELAY_F_READING;
    }
}

int relay_release(struct relay_dir *d)
{
    d->flags &= ~RELAY_F_HELD;
    int rc = relay_start(d);
    /* Plaintext OpenSSL decrypted before the hold was never delivered, and
     * no socket read will come for it: deliver it now. */
    if (rc == 0 && d->src_tls != NULL && (d->flags & RELAY_F_READING))
        relay_tls_drain(d);
    return rc;
}
