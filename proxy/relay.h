/* relay.h: the byte pump between two libuv streams, one direction at a time.
 *
 * A relay_dir reads from src and writes what it read to dst without copying:
 * the read buffer is a block from the worker's pool. Writes are tried at once
 * (uv_try_write), which completes most of them without a request and without
 * touching epoll; only what the socket does not take is queued.
 *
 * Memory is accounted by what is held, not by payload bytes. A queued write
 * of more than RELAY_COPY_MAX bytes keeps its block (no copy: full reads stay
 * zero-copy) and counts RELAY_BLOCK_SIZE; smaller ones while other writes
 * are out, and every copy (relay_send_copy: mxproxy's own replies), are
 * appended to the direction's tail block, which goes to libuv when the
 * writes before it complete. So a
 * stream of one-byte reads, or of short replies, fills blocks instead of
 * pinning one each. Reading src stops while the memory queued toward dst
 * (relay_dir.queued) is above RELAY_HIWAT, and resumes once it is at or
 * below RELAY_LOWAT.
 *
 * Whoever produced them, bytes queued toward a peer count for that peer: when
 * reading a peer can itself queue bytes toward it (OpenSSL's records on a TLS
 * socket, mxproxy's replies to what an on_data owner reads), reading it also
 * stops while the queue toward it is above the mark, so a peer that does not
 * read what it provokes stops being read. Such a direction then reads at most
 * RELAY_TIED_READ bytes at a time while that queue is not empty, which bounds
 * what one read can provoke. A queue thus holds at most RELAY_HIWAT plus what
 * one read adds: a block, or the answers to one read (an owner that answers
 * every byte of a first full read may add its replies to RELAY_BLOCK_SIZE
 * bytes). Plain relaying in mode tcp is not tied: a client may upload while
 * it does not read.
 *
 * A direction may instead hand every read to its owner (on_data), which
 * inspects the bytes and sends what it chooses with relay_send(): SMTP mode
 * does so. Blocks are then reference counted, since one read may turn into
 * several writes, interleaved with bytes the owner makes up itself.
 *
 * Either socket may speak TLS: src_tls decrypts what src sends before it is
 * delivered, dst_tls encrypts what is sent to dst. One tls_conn serves both
 * directions of its socket (it is the src_tls of one and the dst_tls of the
 * other), so what a read makes OpenSSL send (handshake, alerts) goes out
 * through the reverse direction, rev.
 *
 * The owner (the session) learns about EOF, errors and the end of a
 * direction through on_event; a relay_dir never closes handles itself.
 *
 * Kernel relay (relay_kernel_allow): once the owner says the bytes are
 * opaque, they may skip user space. RELAY_KERNEL_SPLICE: a direction whose
 * read fills a whole block (a large transfer) moves on to splice(2) through
 * its own pipe: libuv still says when src is readable (a read with no
 * buffer), the bytes go src -> pipe -> dst without a copy. What dst does
 * not take at once stays in the pipe, and src is not read until a poll of
 * dst (on a duplicate of its descriptor) finds room and the pipe is empty:
 * the pipe is the queue, bounded by its size (backpressure), and nothing
 * can overtake it. Bytes already queued in user space when splicing begins
 * go first: until they are written, spliced bytes are copied behind them.
 * RELAY_KERNEL_SOCKMAP: once both directions are quiet (nothing queued, no
 * TLS, neither at EOF), the pair goes into the eBPF sockmap (krelay.c) and
 * the kernel forwards every byte; libuv then only sees EOFs and errors. A
 * FIN is passed on once the kernel has written everything before it
 * (tcp_info byte counters), bytes and last_read are read from the same
 * counters (relay_kernel_sample). Any failure leaves the pair in user space.
 */
#ifndef MXPROXY_RELAY_H
#define MXPROXY_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct tls_conn;

#define RELAY_BLOCK_SIZE (16 * 1024) /* one read, one write; small blocks stay in cache */
#define RELAY_HIWAT (256 * 1024)     /* stop reading above this many queued bytes */
#define RELAY_LOWAT (64 * 1024)      /* resume at or below this */
#define RELAY_POOL_KEEP 64           /* idle blocks a pool keeps per worker */
#define RELAY_SEND_MAX_BUFS 16       /* uv_buf_t per relay_send() call */
#define RELAY_COPY_MAX (4 * 1024)    /* queued writes up to this size are copied to the tail */
#define RELAY_TIED_READ 1024         /* read size of a tied direction while its peer lags */

/* A read buffer, or the tail that gathers small queued writes. */
struct relay_block {
    struct relay_block *next; /* pool free list link */
    unsigned refs;            /* owners: the reader, queued relay_send()s, held input */
    char data[RELAY_BLOCK_SIZE];
};

/* A write request for relay_send(): keeps its block alive until written. */
struct relay_wreq {
    uv_write_t req;          /* req.data -> the relay_dir */
    struct relay_block *blk; /* referenced until the write completes; may be NULL */
    size_t held;             /* what this write counts in relay_dir.queued */
    struct relay_wreq *next; /* pool free list link */
};

/* Per-worker free lists; all-zero is an empty pool. */
struct relay_pool {
    struct relay_block *free; /* singly linked free blocks */
    unsigned n_free;          /* length of the free list */
    struct relay_wreq *wfree; /* free write requests */
    unsigned n_wfree;         /* length of wfree */
};

enum relay_event {
    RELAY_EV_EOF,       /* src sent EOF; dst has been shut down after pending writes */
    RELAY_EV_DONE,      /* the shutdown of dst completed: this direction is finished */
    RELAY_EV_READ_ERR,  /* reading src failed; status says why */
    RELAY_EV_WRITE_ERR, /* writing dst failed (not UV_ECANCELED); status says why */
    RELAY_EV_TLS_READY, /* the TLS handshake on src completed */
    RELAY_EV_TLS_ERR,   /* TLS on src (or, status -EPIPE... on dst) failed: see
                           tls_error_reason() of the tls_conn; status is the error */
    RELAY_EV_CONNECTED, /* RELAY_F_CONNECTING: src's first bytes or EOF came, so its
                           connect completed; they are delivered after on_event returns */
    RELAY_EV_KERNEL,    /* the kernel relays from now on: status is the enum relay_kernel
                           (SOCKMAP: both directions, reported on the one that began) */
};

/* Who may relay a direction's opaque bytes; the values of enum config_kernel_relay. */
enum relay_kernel {
    RELAY_KERNEL_OFF = 0, /* user space */
    RELAY_KERNEL_SPLICE,  /* splice(2) through a pipe, for large transfers */
    RELAY_KERNEL_SOCKMAP, /* the eBPF sockmap forwards both directions */
};

struct relay_dir;
struct relay_sockmap;
struct relay_splice;
typedef void (*relay_event_cb)(struct relay_dir *d, enum relay_event ev, int status);

/* Takes one reference to b, whose data[0, len) holds the carry (see
 * relay_dir.carry) followed by the bytes just read. The callee must drop the
 * reference with relay_block_unref() once it no longer needs the bytes. */
typedef void (*relay_data_cb)(struct relay_dir *d, struct relay_block *b, size_t len);

struct relay_dir {
    uv_stream_t *src;           /* read from here */
    uv_stream_t *dst;           /* write to here */
    struct relay_pool *pool;    /* the worker's block pool */
    relay_event_cb on_event;    /* owner's callback */
    relay_data_cb on_data;      /* NULL: forward reads as they are */
    void *owner;                /* for the owner, e.g. its session */
    const char *carry;          /* on_data mode: bytes to put before the next read */
    size_t carry_len;           /* their length; set to 0 once delivered in a block */
    uint64_t bytes;             /* payload bytes read from src */
    uint64_t last_read;         /* uv_now() of the last read, for idle timeouts */
    unsigned flags;             /* RELAY_F_* */
    uv_shutdown_t shutdown_req; /* shuts dst down after src's EOF */
    struct tls_conn *src_tls;   /* decrypts src's bytes, or NULL; not owned */
    struct tls_conn *dst_tls;   /* encrypts what goes to dst, or NULL; not owned */
    struct relay_dir *rev;      /* the other direction (its dst is our src) */
    struct relay_block *tail;   /* small writes gathered while others are queued, or NULL */
    size_t tail_len;            /* bytes in tail->data */
    size_t queued;              /* memory held for dst: blocks of queued writes, the tail */
    unsigned inflight;          /* uv_write requests not yet completed */
    unsigned kernel;            /* enum relay_kernel the owner allows; OFF once tried */
    struct relay_splice *spl;   /* splice: the direction's pipe, with RELAY_F_SPLICE */
    struct relay_sockmap *smap; /* sockmap: shared by both directions, or NULL */
    uint64_t k_bytes0;          /* sockmap: bytes when the kernel took over */
    uint64_t k_rx0;             /* sockmap: src's consumed byte count then */
    uint64_t k_tx0;             /* sockmap: dst's written byte count then */
    size_t ask;                 /* what the last read of src could take */
};

#define RELAY_F_READING 0x01u /* uv_read_start is in effect on src */
#define RELAY_F_PAUSED 0x02u  /* stopped by backpressure (see relay_over), restart on LOWAT */
#define RELAY_F_EOF 0x04u     /* src sent EOF */
#define RELAY_F_DONE 0x08u    /* dst shut down after EOF: nothing more will flow */
#define RELAY_F_STOPPED 0x10u /* the owner stopped the direction; never restart */
#define RELAY_F_HELD 0x20u    /* the owner holds reading (relay_hold) */
#define RELAY_F_NO_FIN 0x40u  /* on EOF, do not shut dst down (the owner will) */
/* src is a socket still connecting: its first read event is reported first (bytes or EOF:
 * RELAY_EV_CONNECTED; an error: RELAY_EV_READ_ERR, the flag cleared) */
#define RELAY_F_CONNECTING 0x80u
#define RELAY_F_SPLICE 0x100u    /* bytes move by splice(2) through spl's pipe */
#define RELAY_F_SOCKMAP 0x200u   /* the kernel forwards the bytes (smap) */
#define RELAY_F_FIN_WAIT 0x400u  /* sockmap: EOF seen, the FIN waits for the kernel's bytes */
#define RELAY_F_PIPE_WAIT 0x800u /* splice: dst is full, the pipe holds bytes; src is not read */
/* src's last read filled its buffer: the kernel may hold the rest of a segment it began */
#define RELAY_F_PARTIAL 0x1000u

/* Prepares d; src and dst must be initialised libuv streams. Sets
 * src->data = d. Does not start reading. */
void relay_init(struct relay_dir *d, uv_stream_t *src, uv_stream_t *dst, struct relay_pool *pool,
                relay_event_cb on_event, void *owner);

/* Starts reading src unless held, paused, stopped or at EOF. Returns 0 or a
 * negative UV_E* code. */
int relay_start(struct relay_dir *d);

/* Stops reading for good (the session is closing). Idempotent. */
void relay_stop(struct relay_dir *d);

/* The owner stops reading src until relay_release(); independent of
 * backpressure. Both are idempotent. */
void relay_hold(struct relay_dir *d);
int relay_release(struct relay_dir *d);

/* Writes bufs (at most RELAY_SEND_MAX_BUFS; the array is copied) to d->dst
 * in order after everything queued before: what the socket takes at once is
 * written now; the rest is copied to the tail when it is at most
 * RELAY_COPY_MAX bytes, else queued in place and b (may be NULL when the
 * bytes are static) gets a reference until it is written.
 * Applies backpressure to d->src like the plain path. Returns 0 or a
 * negative UV_E* code, which on_event has already seen as
 * RELAY_EV_WRITE_ERR: the caller only stops. */
int relay_send(struct relay_dir *d, struct relay_block *b, const uv_buf_t *bufs, unsigned n);

/* Sends len bytes (at most RELAY_BLOCK_SIZE) to d->dst, copying what is not
 * written at once into the tail, so short replies share blocks; p is the
 * caller's again on return. Errors as relay_send(). */
int relay_send_copy(struct relay_dir *d, const char *p, size_t len);

/* Shuts d->dst down after the queued writes, as EOF does; on_event gets
 * RELAY_EV_DONE when it completes. */
int relay_shutdown_dst(struct relay_dir *d);

void relay_block_ref(struct relay_block *b);
void relay_block_unref(struct relay_pool *pool, struct relay_block *b);

/* Processes len bytes as if they had just been read from src (bytes that
 * arrived before the relay was set up): decrypted if src speaks TLS, then
 * delivered. */
void relay_inject(struct relay_dir *d, const char *p, size_t len);

/* Sends whatever ciphertext d->dst_tls has for d->dst (handshake messages,
 * alerts, a close_notify). */
void relay_tls_flush(struct relay_dir *d);

/* The bytes of d and d->rev carry nothing the owner reads any more (mode
 * tcp; SMTP after a STARTTLS passthrough): mode may hand them to the kernel
 * from the next read on. Applies to both directions. */
void relay_kernel_allow(struct relay_dir *d, enum relay_kernel mode);

/* While the kernel relays d's pair, bytes and last_read of both directions
 * are brought up to date only by this call: make it before reading them.
 * Does nothing otherwise. */
void relay_kernel_sample(struct relay_dir *d);

/* Frees every block and request the pool keeps. */
void relay_pool_drain(struct relay_pool *pool);

#endif /* MXPROXY_RELAY_H */
