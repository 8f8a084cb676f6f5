/* relay.c: zero-copy forwarding with watermarks; see relay.h. */
#include "relay.h"

#include "krelay.h"
#include "tls.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Sockmap state of a pair; outlives neither direction's relay_stop by more
 * than its timer's close callback. */
struct relay_sockmap {
    uv_timer_t timer; /* polls the kernel's progress while a FIN waits */
    unsigned live;    /* directions not yet stopped */
};

#define RELAY_PIPE_SIZE (256 * 1024) /* asked of the kernel for a splice pipe (HIWAT) */

/* A spliced direction's pipe and the poll that waits for room in dst. */
struct relay_splice {
    uv_poll_t poll;      /* on out_fd, while RELAY_F_PIPE_WAIT */
    struct relay_dir *d; /* NULL once the direction stopped */
    int pipe[2];         /* read end, write end */
    int out_fd;          /* dup() of dst's descriptor: libuv watches dst's own */
    size_t in_pipe;      /* bytes in the pipe */
    size_t cap;          /* the pipe's size: the most one splice from src takes */
};
#define RELAY_FIN_POLL_MS 1 /* how often a waiting FIN looks again */

static void relay_on_eof(struct relay_dir *d);
static void relay_kernel_try(struct relay_dir *d, size_t nread);
static void relay_sockmap_release(struct relay_dir *d);
static void relay_sockmap_on_timer(uv_timer_t *t);
static int64_t relay_sockmap_pending(const struct relay_dir *d);
static void relay_splice_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void relay_splice_on_read(uv_stream_t *src, ssize_t nread, const uv_buf_t *buf);
static void relay_splice_free(struct relay_dir *d);

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

/* Reading d->src can queue bytes toward d->src itself: OpenSSL's records
 * on a TLS socket, or the owner's answers to what it reads. */
static bool relay_tied(const struct relay_dir *d)
{
    return d->rev != NULL && (d->src_tls != NULL || d->on_data != NULL);
}

/* How much one read of src may take: little while a tied direction's peer
 * lags behind, since each byte read may provoke a reply that waits too. */
static size_t relay_read_cap(const struct relay_dir *d, size_t room)
{
    if (relay_tied(d) && d->rev->queued > 0 && room > RELAY_TIED_READ)
        return RELAY_TIED_READ;
    return room;
}

/* Whether d must stay paused: the queue toward dst, or (tied) the queue
 * toward src, is above mark. */
static bool relay_over(const struct relay_dir *d, size_t mark)
{
    return d->queued > mark || (relay_tied(d) && d->rev->queued > mark);
}

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
    d->ask = relay_read_cap(d, RELAY_BLOCK_SIZE - relay_carried);
    *buf = uv_buf_init(b->data + relay_carried, (unsigned)d->ask);
}

static void relay_on_shutdown(uv_shutdown_t *req, int status)
{
    struct relay_dir *d = req->data;

    (void)status; /* a peer that is already gone needs no FIN */
    d->flags |= RELAY_F_DONE;
    d->on_event(d, RELAY_EV_DONE, 0);
}

static int relay_tail_submit(struct relay_dir *d);

int relay_shutdown_dst(struct relay_dir *d)
{
    if (d->dst_tls != NULL && tls_handshake_done(d->dst_tls) && tls_shutdown(d->dst_tls) == 0)
        relay_tls_flush(d); /* close_notify, then the FIN */
    /* The FIN follows the tail's bytes too. */
    int rc = relay_tail_submit(d);
    if (rc != 0)
        return rc; /* on_event has seen the write error */
    /* Nothing queued: the FIN can go now, without a request and an epoll
     * round trip (the common case: writes are tried at once). Whatever
     * shutdown() says, this direction is done, as in relay_on_shutdown: a
     * peer that is already gone (ENOTCONN) needs no FIN, and asking libuv
     * would only make the same call fail again. */
    uv_os_fd_t fd;
    if (uv_stream_get_write_queue_size(d->dst) == 0 && uv_fileno((uv_handle_t *)d->dst, &fd) == 0) {
        (void)shutdown(fd, SHUT_WR);
        d->flags |= RELAY_F_DONE;
        d->on_event(d, RELAY_EV_DONE, 0);
        return 0;
    }
    d->shutdown_req.data = d;
    rc = uv_shutdown(&d->shutdown_req, d->dst, relay_on_shutdown);
    if (rc != 0) {
        d->flags |= RELAY_F_DONE;
        d->on_event(d, RELAY_EV_DONE, 0);
    }
    return rc;
}

static void relay_tls_drain(struct relay_dir *d);

/* Restarts reading d->src once nothing keeps it paused. */
static void relay_resume(struct relay_dir *d)
{
    if ((d->flags & (RELAY_F_PAUSED | RELAY_F_STOPPED)) != RELAY_F_PAUSED ||
        relay_over(d, RELAY_LOWAT))
        return;
    d->flags &= ~RELAY_F_PAUSED;
    if (relay_start(d) == 0 && d->src_tls != NULL && (d->flags & RELAY_F_READING))
        relay_tls_drain(d);
}

/* The queue toward d->dst shrank: resume on the crossing below the low-water
 * mark, d itself and rev, which reads d->dst. */
static void relay_after_write(struct relay_dir *d)
{
    relay_resume(d);
    if (d->rev != NULL)
        relay_resume(d->rev);
}

static void relay_pause(struct relay_dir *d)
{
    if (d->flags & RELAY_F_READING)
        uv_read_stop(d->src);
    d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_PAUSED;
}

/* The queue toward d->dst grew: above the high-water mark, stop reading what
 * fills it (d->src), and d->dst itself when reading it can add to it. */
static void relay_check_hiwat(struct relay_dir *d)
{
    if (d->queued <= RELAY_HIWAT)
        return;
    relay_pause(d);
    if (d->rev != NULL && relay_tied(d->rev))
        relay_pause(d->rev);
}

/* Gives the tail's block back; its bytes are never sent (the socket failed). */
static void relay_tail_drop(struct relay_dir *d)
{
    if (d->tail == NULL)
        return;
    relay_block_unref(d->pool, d->tail);
    d->tail = NULL;
    d->tail_len = 0;
    d->queued -= RELAY_BLOCK_SIZE;
}

static void relay_on_send(uv_write_t *req, int status)
{
    struct relay_wreq *w = (struct relay_wreq *)req;
    struct relay_dir *d = req->data;

    d->queued -= w->held;
    d->inflight--;
    relay_block_unref(d->pool, w->blk);
    relay_wreq_put(d->pool, w);
    if (status < 0) {
        if (d->inflight == 0)
            relay_tail_drop(d); /* no write will complete to send it */
        if (status != UV_ECANCELED)
            d->on_event(d, RELAY_EV_WRITE_ERR, status);
        return;
    }
    /* The tail waits for every write before it: then it goes out whole. */
    if (d->inflight == 0 && relay_tail_submit(d) != 0)
        return;
    relay_after_write(d);
    relay_kernel_try(d, 0);
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

/* Hands bufs to libuv. Takes the caller's reference to b (may be NULL);
 * held is what the write counts in d->queued, already added by the caller.
 * Returns 0 or a negative UV_E* code, which on_event has seen. */
static int relay_queue(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs, unsigned n,
                       size_t held)
{
    struct relay_wreq *w = relay_wreq_get(d->pool);
    int rc = UV_ENOMEM;

    if (w != NULL) {
        w->req.data = d;
        w->blk = b;
        w->held = held;
        rc = uv_write(&w->req, d->dst, bufs, n, relay_on_send);
        if (rc != 0)
            relay_wreq_put(d->pool, w);
    }
    if (rc != 0) {
        d->queued -= held;
        relay_block_unref(d->pool, b);
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return rc;
    }
    d->inflight++;
    return 0;
}

/* Hands the tail, if any, to libuv. Returns 0 or a negative UV_E* code,
 * which on_event has seen. */
static int relay_tail_submit(struct relay_dir *d)
{
    struct relay_block *b = d->tail;

    if (b == NULL)
        return 0;
    uv_buf_t buf = uv_buf_init(b->data, (unsigned)d->tail_len);
    d->tail = NULL;
    d->tail_len = 0;
    return relay_queue(d, b, &buf, 1, RELAY_BLOCK_SIZE); /* counted since it was opened */
}

/* Copies len bytes to the end of the tail, opening blocks as they fill. */
static int relay_tail_append(struct relay_dir *d, const char *p, size_t len)
{
    while (len > 0) {
        if (d->tail != NULL && d->tail_len == RELAY_BLOCK_SIZE) {
            int rc = relay_tail_submit(d);
            if (rc != 0)
                return rc;
        }
        if (d->tail == NULL) {
            d->tail = relay_block_get(d->pool);
            if (d->tail == NULL) {
                d->on_event(d, RELAY_EV_WRITE_ERR, UV_ENOMEM);
                return UV_ENOMEM;
            }
            d->tail_len = 0;
            d->queued += RELAY_BLOCK_SIZE;
        }
        size_t n = RELAY_BLOCK_SIZE - d->tail_len;
        if (n > len)
            n = len;
        memcpy(d->tail->data + d->tail_len, p, n);
        d->tail_len += n;
        p += n;
        len -= n;
    }
    return 0;
}

/* relay_send without TLS. copy: the bytes are the caller's (relay_send_copy),
 * so whatever is not written at once goes to the tail, whatever its size. */
static int relay_write(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs_in,
                       unsigned n, bool copy)
{
    uv_buf_t bufs[RELAY_SEND_MAX_BUFS];
    size_t left = 0;
    int rc = 0;

    if (n > RELAY_SEND_MAX_BUFS)
        return UV_EINVAL;
    memcpy(bufs, bufs_in, n * sizeof(*bufs));
    if (d->tail == NULL) { /* else the tail's bytes go first */
        rc = relay_try_write(d, bufs, &n);
        if (rc != 0) {
            d->on_event(d, RELAY_EV_WRITE_ERR, rc);
            return rc;
        }
    }
    for (unsigned i = 0; i < n; i++)
        left += bufs[i].len;
    if (left == 0)
        return 0;
    /* Small bytes join the tail while writes are out; with none out, the
     * block goes as it is (the tail would go at once too, after a copy). */
    if (copy || (left <= RELAY_COPY_MAX && d->inflight > 0)) {
        for (unsigned i = 0; i < n && rc == 0; i++)
            rc = relay_tail_append(d, bufs[i].base, bufs[i].len);
        /* No write is out whose completion would send the tail: send it now. */
        if (rc == 0 && d->inflight == 0)
            rc = relay_tail_submit(d);
    } else {
        rc = relay_tail_submit(d);
        if (rc == 0) {
            size_t held = b != NULL ? RELAY_BLOCK_SIZE : left; /* NULL: static bytes */
            if (b != NULL)
                relay_block_ref(b);
            d->queued += held;
            rc = relay_queue(d, b, bufs, n, held);
        }
    }
    if (rc == 0)
        relay_check_hiwat(d);
    return rc;
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
        int rc = relay_write(d, b, &buf, 1, false);
        relay_block_unref(d->pool, b);
        if (rc != 0)
            return;
    }
}

int relay_send(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs, unsigned n)
{
    if (d->dst_tls == NULL)
        return relay_write(d, b, bufs, n, false);
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
    if (len > RELAY_BLOCK_SIZE)
        len = RELAY_BLOCK_SIZE;
    uv_buf_t buf = uv_buf_init((char *)p, (unsigned)len);
    if (d->dst_tls != NULL)
        return relay_send(d, NULL, &buf, 1); /* tls_write copies */
    return relay_write(d, NULL, &buf, 1, true);
}

/* src sent EOF (a FIN, or a TLS close_notify). */
static void relay_on_eof(struct relay_dir *d)
{
    if (d->flags & RELAY_F_READING)
        uv_read_stop(d->src);
    d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_EOF;
    d->on_event(d, RELAY_EV_EOF, 0);
    /* The FIN goes out after every queued write: half-close is exact. */
    if (d->flags & (RELAY_F_NO_FIN | RELAY_F_STOPPED))
        return;
    if ((d->flags & RELAY_F_SOCKMAP) && relay_sockmap_pending(d) > 0) {
        d->flags |= RELAY_F_FIN_WAIT; /* after the bytes the kernel still holds */
        if (!uv_is_active((uv_handle_t *)&d->smap->timer))
            uv_timer_start(&d->smap->timer, relay_sockmap_on_timer, 0, RELAY_FIN_POLL_MS);
        return;
    }
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
    uv_buf_t out = uv_buf_init(b->data, (unsigned)len);
    (void)relay_send(d, b, &out, 1); /* usually written at once; a failure went to on_event */
    relay_block_unref(d->pool, b);
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
        ssize_t n = tls_read(t, b->data + c, relay_read_cap(d, RELAY_BLOCK_SIZE - c));
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
    if ((d->flags & RELAY_F_CONNECTING) && nread != 0) {
        /* Reading a connecting socket: its first event says how the connect went. */
        d->flags &= ~RELAY_F_CONNECTING;
        if (nread > 0 || nread == UV_EOF) {
            d->on_event(d, RELAY_EV_CONNECTED, 0);
            if (d->flags & RELAY_F_STOPPED) {
                if (buf->base != NULL)
                    relay_block_unref(d->pool, relay_block_of(buf, carried));
                return;
            }
        }
    }
    if (nread <= 0) {
        if (buf->base != NULL)
            relay_block_unref(d->pool, relay_block_of(buf, carried));
        if (nread == 0) {
            /* EAGAIN; the carry stays with the owner for the next read. src
             * is read empty: the moment a sockmap pair may begin. */
            d->flags &= ~RELAY_F_PARTIAL;
            relay_kernel_try(d, 0);
            return;
        }
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
    /* A read that took less than it could emptied the receive queue. */
    if ((size_t)nread < d->ask)
        d->flags &= ~RELAY_F_PARTIAL;
    else
        d->flags |= RELAY_F_PARTIAL;
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
    relay_kernel_try(d, (size_t)nread);
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
    if (d->flags & (RELAY_F_READING | RELAY_F_EOF | RELAY_F_STOPPED | RELAY_F_HELD |
                    RELAY_F_PAUSED | RELAY_F_PIPE_WAIT))
        return 0;
    int rc = (d->flags & RELAY_F_SPLICE)
                 ? uv_read_start(d->src, relay_splice_on_alloc, relay_splice_on_read)
                 : uv_read_start(d->src, relay_on_alloc, relay_on_read);
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
    relay_splice_free(d);
    relay_sockmap_release(d);
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

/* ---- kernel relay --------------------------------------------------------------------- */

void relay_kernel_allow(struct relay_dir *d, enum relay_kernel mode)
{
    d->kernel = mode;
    if (d->rev != NULL)
        d->rev->kernel = mode;
}

static void relay_splice_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(NULL, 0); /* libuv reads nothing: relay_splice_on_read moves the bytes */
}

static void relay_splice_on_close(uv_handle_t *h)
{
    struct relay_splice *sp = (struct relay_splice *)(void *)h; /* poll is its first member */

    close(sp->out_fd);
    free(sp);
}

/* relay_stop: the pipe goes, with what it still holds (as queued writes are cancelled). */
static void relay_splice_free(struct relay_dir *d)
{
    struct relay_splice *sp = d->spl;

    if (sp == NULL)
        return;
    d->spl = NULL;
    d->flags &= ~(RELAY_F_SPLICE | RELAY_F_PIPE_WAIT);
    close(sp->pipe[0]);
    close(sp->pipe[1]);
    sp->d = NULL;
    uv_close((uv_handle_t *)&sp->poll, relay_splice_on_close);
}

static void relay_splice_on_writable(uv_poll_t *h, int status, int events);

/* Moves the pipe's bytes on to dst. With user-space writes still queued
 * (from before splicing began) they are copied behind those, as
 * relay_send would queue them; else spliced while dst takes them, and what
 * it does not take waits in the pipe, src unread, until dst has room.
 * Returns 0 or a UV_E* code, which on_event has seen. */
static int relay_splice_push(struct relay_dir *d)
{
    struct relay_splice *sp = d->spl;
    uv_os_fd_t dfd;

    if (uv_fileno((uv_handle_t *)d->dst, &dfd) != 0)
        return 0;
    while (sp->in_pipe > 0 && d->inflight == 0 && d->tail == NULL) {
        ssize_t w =
            splice(sp->pipe[0], NULL, dfd, NULL, sp->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (w > 0) {
            sp->in_pipe -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            if (!(d->flags & RELAY_F_PIPE_WAIT)) {
                if (d->flags & RELAY_F_READING)
                    uv_read_stop(d->src);
                d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_PIPE_WAIT;
                int rc = uv_poll_start(&sp->poll, UV_WRITABLE, relay_splice_on_writable);
                if (rc != 0) {
                    d->on_event(d, RELAY_EV_WRITE_ERR, rc);
                    return rc;
                }
            }
            return 0;
        }
        int rc = w < 0 ? -errno : UV_EPIPE;
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return rc;
    }
    while (sp->in_pipe > 0) {
        struct relay_block *b = relay_block_get(d->pool);
        if (b == NULL) {
            d->on_event(d, RELAY_EV_WRITE_ERR, UV_ENOMEM);
            return UV_ENOMEM;
        }
        size_t n = sp->in_pipe < RELAY_BLOCK_SIZE ? sp->in_pipe : RELAY_BLOCK_SIZE;
        ssize_t r = read(sp->pipe[0], b->data, n);
        if (r <= 0) {
            int rc = r < 0 ? -errno : UV_EIO;
            relay_block_unref(d->pool, b);
            d->on_event(d, RELAY_EV_WRITE_ERR, rc);
            return rc;
        }
        sp->in_pipe -= (size_t)r;
        uv_buf_t buf = uv_buf_init(b->data, (unsigned)r);
        int rc = relay_write(d, b, &buf, 1, false);
        relay_block_unref(d->pool, b);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* dst has room again: the pipe goes on; once it is empty, src is read again. */
static void relay_splice_on_writable(uv_poll_t *h, int status, int events)
{
    struct relay_splice *sp = (struct relay_splice *)(void *)h;
    struct relay_dir *d = sp->d;

    (void)events;
    if (d == NULL)
        return;
    if (status < 0) {
        uv_poll_stop(h);
        d->flags &= ~RELAY_F_PIPE_WAIT;
        d->on_event(d, RELAY_EV_WRITE_ERR, status);
        return;
    }
    if (relay_splice_push(d) != 0 || sp->in_pipe > 0)
        return;
    uv_poll_stop(h);
    d->flags &= ~RELAY_F_PIPE_WAIT;
    if (relay_start(d) != 0)
        d->on_event(d, RELAY_EV_READ_ERR, UV_EIO);
}

/* src is readable (libuv's UV_ENOBUFS for the empty buffer): one splice
 * into the pipe, then on to dst. libuv polls level-triggered, so what is
 * left comes with the next turn of the loop. */
static void relay_splice_on_read(uv_stream_t *src, ssize_t nread, const uv_buf_t *buf)
{
    struct relay_dir *d = src->data;
    struct relay_splice *sp = d->spl;
    uv_os_fd_t sfd;

    (void)nread;
    (void)buf;
    if (sp == NULL || uv_fileno((uv_handle_t *)d->src, &sfd) != 0)
        return;
    /* While user-space writes are queued (copies go behind them), a block
     * at a time, as the plain path reads: the queue keeps its bound. */
    size_t max = d->queued > 0 ? RELAY_BLOCK_SIZE : sp->cap - sp->in_pipe;
    ssize_t n = splice(sfd, NULL, sp->pipe[1], NULL, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
        d->bytes += (uint64_t)n;
        d->last_read = uv_now(src->loop);
        sp->in_pipe += (size_t)n;
        (void)relay_splice_push(d); /* a failure went to on_event */
        return;
    }
    if (n == 0) {
        relay_on_eof(d);
        return;
    }
    if (errno == EAGAIN || errno == EINTR)
        return;
    int rc = -errno;
    uv_read_stop(src);
    d->flags &= ~RELAY_F_READING;
    d->on_event(d, RELAY_EV_READ_ERR, rc);
}

/* d may move its bytes by splice: plain bytes, still flowing. */
static bool relay_splice_ok(const struct relay_dir *d)
{
    return !(d->flags & (RELAY_F_SPLICE | RELAY_F_EOF | RELAY_F_STOPPED)) && d->src_tls == NULL &&
           d->dst_tls == NULL && d->carry_len == 0;
}

static void relay_splice_begin(struct relay_dir *d)
{
    struct relay_splice *sp = calloc(1, sizeof(*sp));
    uv_os_fd_t dfd;

    d->kernel = RELAY_KERNEL_OFF; /* once; any failure leaves d in user space */
    if (sp == NULL || uv_fileno((uv_handle_t *)d->dst, &dfd) != 0) {
        free(sp);
        return;
    }
    sp->out_fd = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    if (sp->out_fd < 0 || pipe2(sp->pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        if (sp->out_fd >= 0)
            close(sp->out_fd);
        free(sp); /* out of descriptors */
        return;
    }
    if (uv_poll_init(d->src->loop, &sp->poll, sp->out_fd) != 0) {
        close(sp->pipe[0]);
        close(sp->pipe[1]);
        close(sp->out_fd);
        free(sp);
        return;
    }
    (void)fcntl(sp->pipe[1], F_SETPIPE_SZ, RELAY_PIPE_SIZE); /* else the default, 64 KiB */
    int cap = fcntl(sp->pipe[1], F_GETPIPE_SZ);
    sp->cap = cap > 0 ? (size_t)cap : 65536;
    sp->d = d;
    d->spl = sp;
    d->flags |= RELAY_F_SPLICE;
    d->on_event(d, RELAY_EV_KERNEL, RELAY_KERNEL_SPLICE);
    if (d->flags & RELAY_F_READING) {
        uv_read_stop(d->src);
        d->flags &= ~RELAY_F_READING;
        if (relay_start(d) != 0)
            d->on_event(d, RELAY_EV_READ_ERR, UV_EIO);
    }
}

/* d may join the sockmap: nothing of it is in user space, nothing ended,
 * and no segment of src is half read: the verdict takes whole segments off
 * the receive queue, one that a read() began would go out again from its
 * start. */
static bool relay_sockmap_quiet(const struct relay_dir *d)
{
    return (d->flags & (RELAY_F_READING | RELAY_F_EOF | RELAY_F_DONE | RELAY_F_STOPPED |
                        RELAY_F_HELD | RELAY_F_PAUSED | RELAY_F_SPLICE | RELAY_F_SOCKMAP |
                        RELAY_F_PARTIAL)) == RELAY_F_READING &&
           d->inflight == 0 && d->tail == NULL && d->carry_len == 0 && d->src_tls == NULL &&
           d->dst_tls == NULL && uv_stream_get_write_queue_size(d->dst) == 0;
}

static void relay_sockmap_on_close(uv_handle_t *h)
{
    free((struct relay_sockmap *)(void *)h); /* the timer is its first member */
}

/* Bytes d's src gave the kernel that it has not yet written to dst. */
static int64_t relay_sockmap_pending(const struct relay_dir *d)
{
    struct krelay_count src, dst;
    uv_os_fd_t sfd, dfd;

    if (uv_fileno((uv_handle_t *)d->src, &sfd) != 0 ||
        uv_fileno((uv_handle_t *)d->dst, &dfd) != 0 || krelay_counters(sfd, &src) != 0 ||
        krelay_counters(dfd, &dst) != 0)
        return 0; /* nothing to wait for that could be measured */
    uint64_t in = src.rx - d->k_rx0 - ((d->flags & RELAY_F_EOF) ? 1 : 0); /* the FIN */
    return (int64_t)(in - (dst.tx - d->k_tx0));
}

/* A FIN waits while the kernel still forwards what came before it. */
static void relay_sockmap_on_timer(uv_timer_t *t)
{
    struct relay_dir *dirs[2] = {t->data, ((struct relay_dir *)t->data)->rev};
    bool waiting = false;

    for (unsigned i = 0; i < 2; i++) {
        struct relay_dir *d = dirs[i];
        if ((d->flags & (RELAY_F_FIN_WAIT | RELAY_F_STOPPED)) != RELAY_F_FIN_WAIT)
            continue;
        if (relay_sockmap_pending(d) > 0) {
            waiting = true;
            continue;
        }
        d->flags &= ~RELAY_F_FIN_WAIT;
        relay_shutdown_dst(d); /* may end the session, and close this timer */
        if (uv_is_closing((uv_handle_t *)t))
            return;
    }
    if (!waiting)
        uv_timer_stop(t);
}

/* Hands d and d->rev to the kernel, once: any failure leaves them in user
 * space for good. */
static void relay_sockmap_begin(struct relay_dir *d)
{
    struct relay_dir *r = d->rev;
    struct krelay_count ca, cb;
    uv_os_fd_t a, b;

    d->kernel = r->kernel = RELAY_KERNEL_OFF;
    if (!krelay_sockmap_available())
        return;
    if (uv_fileno((uv_handle_t *)d->src, &a) != 0 || uv_fileno((uv_handle_t *)d->dst, &b) != 0)
        return;
    /* What arrived since the last reads is counted as the kernel's: it
     * forwards it (krelay_sockmap_pair's kick). */
    int rc = krelay_consumed(a, &ca);
    if (rc == 0)
        rc = krelay_consumed(b, &cb);
    if (rc == -EAGAIN) {
        d->kernel = r->kernel = RELAY_KERNEL_SOCKMAP; /* a busy moment: after the next read */
        return;
    }
    if (rc != 0)
        return;
    struct relay_sockmap *m = malloc(sizeof(*m));
    if (m == NULL)
        return;
    rc = krelay_sockmap_pair(a, b);
    if (rc != 0) {
        free(m);
        return;
    }
    uv_timer_init(d->src->loop, &m->timer);
    m->timer.data = d;
    m->live = 2;
    d->smap = r->smap = m;
    d->flags |= RELAY_F_SOCKMAP;
    r->flags |= RELAY_F_SOCKMAP;
    d->k_bytes0 = d->bytes;
    d->k_rx0 = ca.rx;
    d->k_tx0 = cb.tx;
    r->k_bytes0 = r->bytes;
    r->k_rx0 = cb.rx;
    r->k_tx0 = ca.tx;
    d->on_event(d, RELAY_EV_KERNEL, RELAY_KERNEL_SOCKMAP);
}

/* relay_stop: the pair's sockmap state goes when both directions stopped.
 * The sockets leave the map when they are closed. */
static void relay_sockmap_release(struct relay_dir *d)
{
    struct relay_sockmap *m = d->smap;

    if (m == NULL)
        return;
    d->smap = NULL;
    if (--m->live > 0)
        return;
    uv_close((uv_handle_t *)&m->timer, relay_sockmap_on_close);
}

/* After a read or a completed write of d: the moment a direction may leave
 * user space. nread: what the read took, 0 after a write. */
static void relay_kernel_try(struct relay_dir *d, size_t nread)
{
    if (d->kernel == RELAY_KERNEL_SPLICE) {
        if (nread >= RELAY_BLOCK_SIZE && relay_splice_ok(d))
            relay_splice_begin(d);
        return;
    }
    if (d->kernel == RELAY_KERNEL_SOCKMAP && d->rev != NULL &&
        d->rev->kernel == RELAY_KERNEL_SOCKMAP && relay_sockmap_quiet(d) &&
        relay_sockmap_quiet(d->rev))
        relay_sockmap_begin(d);
}

/* One direction's counts from the kernel's: src's and dst's counters. */
static void relay_sockmap_note(struct relay_dir *d, const struct krelay_count *src,
                               const struct krelay_count *dst, uint64_t now)
{
    uint64_t t = dst->tx - d->k_tx0;
    if ((d->flags & RELAY_F_DONE) && t > 0)
        t--; /* our FIN */
    d->bytes = d->k_bytes0 + t;
    uint64_t at = now > src->idle_ms ? now - src->idle_ms : 0;
    if (at > d->last_read)
        d->last_read = at;
}

void relay_kernel_sample(struct relay_dir *d)
{
    struct krelay_count ca, cb;
    uv_os_fd_t a, b;

    if (!(d->flags & RELAY_F_SOCKMAP) || d->rev == NULL)
        return;
    if (uv_fileno((uv_handle_t *)d->src, &a) != 0 || uv_fileno((uv_handle_t *)d->dst, &b) != 0 ||
        krelay_counters(a, &ca) != 0 || krelay_counters(b, &cb) != 0)
        return;
    uint64_t now = uv_now(d->src->loop);
    relay_sockmap_note(d, &ca, &cb, now);
    relay_sockmap_note(d->rev, &cb, &ca, now);
}
