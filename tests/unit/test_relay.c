/* test_relay.c: relay.c over socketpairs on a real libuv loop.
 *
 *   peer_a <-> [a_side] --relay--> [b_side] <-> peer_b
 *
 * peer_a and peer_b are plain blocking-free fds the test drives by hand.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "relay.h"
#include "test.h"

struct fixture {
    uv_loop_t loop;
    uv_pipe_t a_side, b_side;
    int peer_a, peer_b;
    struct relay_pool pool;
    struct relay_dir dir;
    int n_eof, n_done, n_read_err, n_write_err;
    int last_status;
};

static void on_event(struct relay_dir *d, enum relay_event ev, int status)
{
    struct fixture *f = d->owner;
    f->last_status = status;
    switch (ev) {
    case RELAY_EV_EOF:
        f->n_eof++;
        break;
    case RELAY_EV_DONE:
        f->n_done++;
        break;
    case RELAY_EV_READ_ERR:
        f->n_read_err++;
        break;
    case RELAY_EV_WRITE_ERR:
        f->n_write_err++;
        break;
    case RELAY_EV_TLS_READY:
    case RELAY_EV_TLS_ERR:
        ASSERT(!"no TLS in these tests");
        break;
    }
}

static void set_nonblock(int fd)
{
    ASSERT(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0);
}

static void fixture_init(struct fixture *f)
{
    int sa[2], sb[2];
    memset(f, 0, sizeof(*f));
    ASSERT_OK(uv_loop_init(&f->loop));
    ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, sa));
    ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, sb));
    /* Small kernel buffers so backpressure shows with little data. */
    int sz = 16384;
    for (int i = 0; i < 2; i++) {
        setsockopt(sa[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
        setsockopt(sb[i], SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
        setsockopt(sb[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    }
    f->peer_a = sa[0];
    f->peer_b = sb[0];
    set_nonblock(f->peer_a);
    set_nonblock(f->peer_b);
    ASSERT_OK(uv_pipe_init(&f->loop, &f->a_side, 0));
    ASSERT_OK(uv_pipe_init(&f->loop, &f->b_side, 0));
    ASSERT_OK(uv_pipe_open(&f->a_side, sa[1]));
    ASSERT_OK(uv_pipe_open(&f->b_side, sb[1]));
    relay_init(&f->dir, (uv_stream_t *)&f->a_side, (uv_stream_t *)&f->b_side, &f->pool, on_event,
               f);
}

static void fixture_close(struct fixture *f)
{
    relay_stop(&f->dir);
    uv_close((uv_handle_t *)&f->a_side, NULL);
    uv_close((uv_handle_t *)&f->b_side, NULL);
    ASSERT_OK(uv_run(&f->loop, UV_RUN_DEFAULT));
    ASSERT_OK(uv_loop_close(&f->loop));
    relay_pool_drain(&f->pool);
    ASSERT_EQ(f->pool.n_free, 0);
    close(f->peer_a);
    close(f->peer_b);
}

/* Writes as much of buf as the socket takes; returns the count. */
static size_t push(int fd, const unsigned char *buf, size_t len)
{
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
        ASSERT(errno == EAGAIN);
        return 0;
    }
    return (size_t)n;
}

static size_t pull(int fd, unsigned char *buf, size_t cap)
{
    ssize_t n = read(fd, buf, cap);
    if (n < 0) {
        ASSERT(errno == EAGAIN);
        return 0;
    }
    return (size_t)n;
}

/* Bytes flow in order; the relay pauses while peer_b does not read, so the
 * queue stays bounded; half-close reaches peer_b after the last byte. */
static void test_backpressure_and_half_close(void)
{
    enum { TOTAL = 4 * 1024 * 1024 };
    static unsigned char src[TOTAL], dst[TOTAL];
    struct fixture f;
    size_t sent = 0, got = 0;
    bool saw_pause = false;

    for (size_t i = 0; i < TOTAL; i++)
        src[i] = (unsigned char)(i * 7 + (i >> 13));
    fixture_init(&f);
    ASSERT_OK(relay_start(&f.dir));

    /* Phase 1: peer_b reads nothing; the relay must stop reading. */
    for (int round = 0; round < 2000 && !saw_pause; round++) {
        sent += push(f.peer_a, src + sent, TOTAL - sent);
        uv_run(&f.loop, UV_RUN_NOWAIT);
        saw_pause = (f.dir.flags & RELAY_F_PAUSED) != 0;
        size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&f.b_side);
        ASSERT(queued <= RELAY_HIWAT + RELAY_BLOCK_SIZE);
    }
    ASSERT(saw_pause);
    ASSERT(!(f.dir.flags & RELAY_F_READING));

    /* Phase 2: peer_b drains; the relay resumes and everything arrives. */
    for (int round = 0; round < 200000 && got < TOTAL; round++) {
        if (sent < TOTAL) {
            sent += push(f.peer_a, src + sent, TOTAL - sent);
            if (sent == TOTAL)
                ASSERT_OK(shutdown(f.peer_a, SHUT_WR));
        }
        uv_run(&f.loop, UV_RUN_NOWAIT);
        got += pull(f.peer_b, dst + got, TOTAL - got);
        size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&f.b_side);
        ASSERT(queued <= RELAY_HIWAT + RELAY_BLOCK_SIZE);
    }
    ASSERT_EQ(got, TOTAL);
    ASSERT(memcmp(src, dst, TOTAL) == 0);
    ASSERT_EQ(f.dir.bytes, TOTAL);

    /* The FIN follows the last byte. */
    unsigned char extra[16];
    ssize_t n = -1;
    for (int round = 0; round < 10000 && n != 0; round++) {
        uv_run(&f.loop, UV_RUN_NOWAIT);
        n = read(f.peer_b, extra, sizeof(extra));
        ASSERT(n == 0 || (n < 0 && errno == EAGAIN));
    }
    ASSERT_EQ(n, 0);
    ASSERT_EQ(f.n_eof, 1);
    ASSERT_EQ(f.n_done, 1);
    ASSERT_EQ(f.n_read_err + f.n_write_err, 0);
    ASSERT(f.dir.flags & RELAY_F_DONE);
    /* Blocks went back to the pool, within its bound. */
    ASSERT(f.pool.n_free >= 1 && f.pool.n_free <= RELAY_POOL_KEEP);
    fixture_close(&f);
}

/* Closing with writes queued cancels them: every block comes back, and
 * UV_ECANCELED is not reported as a write error. */
static void test_close_cancels_queued_writes(void)
{
    static unsigned char buf[1024 * 1024];
    struct fixture f;
    size_t sent = 0;

    fixture_init(&f);
    ASSERT_OK(relay_start(&f.dir));
    for (int round = 0; round < 2000 && !(f.dir.flags & RELAY_F_PAUSED); round++) {
        sent += push(f.peer_a, buf, sizeof(buf));
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    ASSERT(f.dir.flags & RELAY_F_PAUSED);
    ASSERT(uv_stream_get_write_queue_size((uv_stream_t *)&f.b_side) > RELAY_LOWAT);
    (void)sent;
    fixture_close(&f); /* runs the loop: cancelled write callbacks return their blocks */
    ASSERT_EQ(f.n_write_err, 0);
    ASSERT_EQ(f.n_read_err, 0);
}

/* A peer that closes without sending anything is a clean EOF, and the
 * other side is shut down. */
static void test_peer_close_is_eof(void)
{
    struct fixture f;
    unsigned char b[8];
    ssize_t n = -1;

    fixture_init(&f);
    ASSERT_OK(relay_start(&f.dir));
    close(f.peer_a);
    f.peer_a = open("/dev/null", O_RDONLY); /* keeps fixture_close's close() valid */
    for (int round = 0; round < 1000 && n != 0; round++) {
        uv_run(&f.loop, UV_RUN_NOWAIT);
        n = read(f.peer_b, b, sizeof(b));
    }
    ASSERT_EQ(n, 0);
    ASSERT_EQ(f.n_eof, 1);
    ASSERT_EQ(f.n_done, 1);
    ASSERT_EQ(f.n_read_err, 0);
    fixture_close(&f);
}

int main(void)
{
    test_backpressure_and_half_close();
    test_close_cancels_queued_writes();
    test_peer_close_is_eof();
    printf("test_relay: ok\n");
    return 0;
}
