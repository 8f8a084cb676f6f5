/* relay.c: zero-copy forwarding with watermarks; see relay.h. */
#include "relay.h"

#include <assert.h>
#include <stdlib.h>

/* relay_on_write finds the block from its request. */
static_assert(offsetof(struct relay_block, req) == 0, "req must lead struct relay_block");

static struct relay_block *relay_block_get(struct relay_pool *pool)
{
    struct relay_block *b = pool->free;
    if (b != NULL) {
        pool->free = b->next;
        pool->n_free--;
        return b;
    }
    return malloc(sizeof(*b));
}

static void relay_block_put(struct relay_pool *pool, struct relay_block *b)
{
    if (pool->n_free >= RELAY_POOL_KEEP) {
        free(b);
        return;
    }
    b->next = pool->free;
    pool->free = b;
    pool->n_free++;
}

/* The block that owns a read buffer handed out by relay_on_alloc. */
static struct relay_block *relay_block_of(const uv_buf_t *buf)
{
    return (struct relay_block *)(buf->base - offsetof(struct relay_block, data));
}

void relay_pool_drain(struct relay_pool *pool)
{
    while (pool->free != NULL) {
        struct relay_block *b = pool->free;
        pool->free = b->next;
        free(b);
    }
    pool->n_free = 0;
}

static void relay_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct relay_dir *d = h->data;
    struct relay_block *b = relay_block_get(d->pool);

    (void)suggested;
    /* A NULL base makes libuv report UV_ENOBUFS to relay_on_read. */
    *buf = uv_buf_init(b != NULL ? b->data : NULL, b != NULL ? RELAY_BLOCK_SIZE : 0);
}

static void relay_on_shutdown(uv_shutdown_t *req, int status)
{
    struct relay_dir *d = req->data;

    (void)status; /* a peer that is already gone needs no FIN */
    d->flags |= RELAY_F_DONE;
    d->on_event(d, RELAY_EV_DONE, 0);
}

static void relay_on_write(uv_write_t *req, int status)
{
    struct relay_dir *d = req->data;
    struct relay_block *b = (struct relay_block *)req; /* req is the first member */

    relay_block_put(d->pool, b);
    if (status < 0) {
        if (status != UV_ECANCELED)
            d->on_event(d, RELAY_EV_WRITE_ERR, status);
        return;
    }
    if ((d->flags & (RELAY_F_PAUSED | RELAY_F_STOPPED)) == RELAY_F_PAUSED &&
        uv_stream_get_write_queue_size(d->dst) <= RELAY_LOWAT) {
        d->flags &= ~RELAY_F_PAUSED;
        (void)relay_start(d);
    }
}

static void relay_on_read(uv_stream_t *src, ssize_t nread, const uv_buf_t *buf)
{
    struct relay_dir *d = src->data;

    if (nread <= 0) {
        if (buf->base != NULL)
            relay_block_put(d->pool, relay_block_of(buf));
        if (nread == 0)
            return; /* EAGAIN */
        uv_read_stop(src);
        d->flags &= ~RELAY_F_READING;
        if (nread != UV_EOF) {
            d->on_event(d, RELAY_EV_READ_ERR, (int)nread);
            return;
        }
        d->flags |= RELAY_F_EOF;
        d->shutdown_req.data = d;
        /* The FIN goes out after every queued write: half-close is exact. */
        if (uv_shutdown(&d->shutdown_req, d->dst, relay_on_shutdown) != 0) {
            d->flags |= RELAY_F_DONE;
            d->on_event(d, RELAY_EV_EOF, 0);
            d->on_event(d, RELAY_EV_DONE, 0);
            return;
        }
        d->on_event(d, RELAY_EV_EOF, 0);
        return;
    }

    struct relay_block *b = relay_block_of(buf);
    uv_buf_t out = uv_buf_init(buf->base, (unsigned)nread);
    d->bytes += (uint64_t)nread;
    d->last_read = uv_now(src->loop);
    b->req.data = d;
    int rc = uv_write(&b->req, d->dst, &out, 1, relay_on_write);
    if (rc != 0) {
        relay_block_put(d->pool, b);
        d->on_event(d, RELAY_EV_WRITE_ERR, rc);
        return;
    }
    if (uv_stream_get_write_queue_size(d->dst) > RELAY_HIWAT) {
        uv_read_stop(src);
        d->flags = (d->flags & ~RELAY_F_READING) | RELAY_F_PAUSED;
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
    if (d->flags & (RELAY_F_READING | RELAY_F_EOF | RELAY_F_STOPPED))
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
