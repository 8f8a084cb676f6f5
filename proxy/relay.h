/* relay.h: the byte pump between two libuv streams, one direction at a time.
 *
 * A relay_dir reads from src and writes what it read to dst without copying:
 * the read buffer is a block from the worker's pool whose uv_write_t travels
 * with it. Memory is bounded by watermarks: reading stops while dst's write
 * queue is above RELAY_HIWAT and resumes on the crossing below RELAY_LOWAT.
 *
 * The owner (the session) learns about EOF, errors and activity through the
 * on_event callback; a relay_dir never closes handles itself.
 */
#ifndef MXPROXY_RELAY_H
#define MXPROXY_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define RELAY_BLOCK_SIZE (64 * 1024)  /* one read, one write */
#define RELAY_HIWAT (256 * 1024)      /* stop reading above this many queued bytes */
#define RELAY_LOWAT (64 * 1024)       /* resume at or below this */
#define RELAY_POOL_KEEP 64            /* idle blocks a pool keeps per worker */

/* A read buffer and the write request that carries it to the other side. */
struct relay_block {
    uv_write_t req;              /* req.data -> the relay_dir that wrote it */
    struct relay_block *next;    /* pool free list link */
    char data[RELAY_BLOCK_SIZE];
};

/* Per-worker free list of blocks; all-zero is an empty pool. */
struct relay_pool {
    struct relay_block *free;   /* singly linked free blocks */
    unsigned n_free;            /* length of the free list */
};

enum relay_event {
    RELAY_EV_EOF,      /* src sent EOF; dst has been shut down after pending writes */
    RELAY_EV_DONE,     /* the shutdown of dst completed: this direction is finished */
    RELAY_EV_READ_ERR, /* reading src failed; status says why */
    RELAY_EV_WRITE_ERR /* writing dst failed (not UV_ECANCELED); status says why */
};

struct relay_dir;
typedef void (*relay_event_cb)(struct relay_dir *d, enum relay_event ev, int status);

struct relay_dir {
    uv_stream_t *src;          /* read from here */
    uv_stream_t *dst;          /* write to here */
    struct relay_pool *pool;   /* the worker's block pool */
    relay_event_cb on_event;   /* owner's callback */
    void *owner;               /* for the owner, e.g. its session */
    uint64_t bytes;            /* payload bytes read from src */
    uint64_t last_read;        /* uv_now() of the last read, for idle timeouts */
    unsigned flags;            /* RELAY_F_* */
    uv_shutdown_t shutdown_req; /* shuts dst down after src's EOF */
};

#define RELAY_F_READING 0x01u  /* uv_read_start is in effect on src */
#define RELAY_F_PAUSED 0x02u   /* stopped by backpressure, restart on LOWAT */
#define RELAY_F_EOF 0x04u      /* src sent EOF */
#define RELAY_F_DONE 0x08u     /* dst shut down after EOF: nothing more will flow */
#define RELAY_F_STOPPED 0x10u  /* the owner stopped the direction; never restart */

/* Prepares d; src and dst must be initialised libuv streams whose data
 * fields point at their owner. Does not start reading. */
void relay_init(struct relay_dir *d, uv_stream_t *src, uv_stream_t *dst, struct relay_pool *pool,
                relay_event_cb on_event, void *owner);

/* Starts reading src. Returns 0 or a negative UV_E* code. */
int relay_start(struct relay_dir *d);

/* Stops reading for good (the session is closing). Idempotent. */
void relay_stop(struct relay_dir *d);

/* Frees every block the pool keeps. */
void relay_pool_drain(struct relay_pool *pool);

#endif /* MXPROXY_RELAY_H */
