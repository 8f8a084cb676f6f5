/* test_relay.c: relay.c over socketpairs on a real libuv loop.
 *
 *   peer_a <-> [a_side] --relay--> [b_side] <-> peer_b
 *
 * peer_a and peer_b are plain blocking-free fds the test drives by hand.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
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
    struct relay_dir back; /* b_side -> a_side, for the tied tests */
    bool with_back;        /* back is in use */
    size_t answered;       /* bytes the on_data owner answered */
    int n_eof, n_done, n_read_err, n_write_err, n_connected, n_kernel;
    size_t out_at_connected; /* bytes peer_b could read when RELAY_EV_CONNECTED came */
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
    case RELAY_EV_CONNECTED: {
        f->n_connected++;
        int queued = 0;
        ASSERT_OK(ioctl(f->peer_b, FIONREAD, &queued));
        f->out_at_connected = (size_t)queued;
        break;
    }
    case RELAY_EV_KERNEL:
        f->n_kernel++;
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
    if (f->with_back)
        relay_stop(&f->back);
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
 * queue stays bounded; half-close reaches peer_b after the last byte. The
 * same with kernel = RELAY_KERNEL_SPLICE: the first full block moves the
 * direction to splice(2), and nothing else may differ. */
static void test_backpressure_and_half_close(enum relay_kernel kernel)
{
    enum { TOTAL = 4 * 1024 * 1024 };
    static unsigned char src[TOTAL], dst[TOTAL];
    struct fixture f;
    size_t sent = 0, got = 0;
    bool saw_pause = false;

    for (size_t i = 0; i < TOTAL; i++)
        src[i] = (unsigned char)(i * 7 + (i >> 13));
    fixture_init(&f);
    relay_kernel_allow(&f.dir, kernel);
    ASSERT_OK(relay_start(&f.dir));

    /* Phase 1: peer_b reads nothing; the relay must stop reading. */
    for (int round = 0; round < 2000 && !saw_pause; round++) {
        sent += push(f.peer_a, src + sent, TOTAL - sent);
        uv_run(&f.loop, UV_RUN_NOWAIT);
        /* splice: the pipe holds what dst does not take, and src waits */
        saw_pause = (f.dir.flags & (RELAY_F_PAUSED | RELAY_F_PIPE_WAIT)) != 0;
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
    ASSERT_EQ(f.n_kernel, kernel == RELAY_KERNEL_SPLICE ? 1 : 0);
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

/* The byte at offset i of the streams these tests send. */
static unsigned char pattern(size_t i)
{
    return (unsigned char)('a' + i % 23);
}

/* Pushes len pattern bytes from *off on, as many as peer_a takes. */
static size_t push_pattern(int fd, size_t *off, size_t len)
{
    unsigned char buf[16384];
    if (len > sizeof(buf))
        len = sizeof(buf);
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern(*off + i);
    size_t n = push(fd, buf, len);
    *off += n;
    return n;
}

/* One-byte reads toward a peer that does not read share blocks: the memory
 * held grows by a block per RELAY_BLOCK_SIZE bytes, not per read, and the
 * bytes arrive whole and in order once the peer reads. */
static void test_small_reads_share_blocks(void)
{
    enum { TRICKLE = 20000 };
    static unsigned char got[4 * 1024 * 1024];
    struct fixture f;
    size_t sent = 0, n_got = 0;

    fixture_init(&f);
    ASSERT_OK(relay_start(&f.dir));
    /* Fill the kernel toward peer_b until the relay itself holds bytes. */
    for (int round = 0; round < 1000 && f.dir.queued == 0; round++) {
        push_pattern(f.peer_a, &sent, 16384);
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    ASSERT(f.dir.queued > 0);
    for (int round = 0; round < 10; round++)
        uv_run(&f.loop, UV_RUN_NOWAIT);
    ASSERT(!(f.dir.flags & RELAY_F_PAUSED));
    size_t q0 = f.dir.queued, bytes0 = (size_t)f.dir.bytes;
    ASSERT_EQ(bytes0, sent);

    for (int i = 0; i < TRICKLE; i++) {
        ASSERT_EQ(push_pattern(f.peer_a, &sent, 1), 1);
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    ASSERT_EQ((size_t)f.dir.bytes, sent); /* every byte was read... */
    /* ...and they hold a few blocks, not one each (that would pause). */
    ASSERT(f.dir.queued <= q0 + (TRICKLE / RELAY_BLOCK_SIZE + 2) * RELAY_BLOCK_SIZE);
    ASSERT(!(f.dir.flags & RELAY_F_PAUSED));

    for (int round = 0; round < 100000 && n_got < sent; round++) {
        uv_run(&f.loop, UV_RUN_NOWAIT);
        n_got += pull(f.peer_b, got + n_got, sizeof(got) - n_got);
    }
    ASSERT_EQ(n_got, sent);
    for (size_t i = 0; i < n_got; i++)
        ASSERT_EQ(got[i], pattern(i));
    ASSERT_EQ(f.dir.queued, 0);
    ASSERT(f.dir.tail == NULL);
    ASSERT_EQ(f.n_read_err + f.n_write_err, 0);
    fixture_close(&f);
}

/* on_data owner answering every byte read with a 16-byte reply toward the
 * peer it read from. */
static void on_data_answer(struct relay_dir *d, struct relay_block *b, size_t len)
{
    struct fixture *f = d->owner;
    char reply[16];

    memset(reply, 'r', sizeof(reply));
    reply[sizeof(reply) - 1] = '\n';
    for (size_t i = 0; i < len; i++) {
        if (relay_send_copy(&f->back, reply, sizeof(reply)) != 0)
            break;
        f->answered++;
    }
    relay_block_unref(d->pool, b);
}

/* A peer that does not read the replies it provokes stops being read: the
 * queue toward it stays near the high-water mark, however much it sends,
 * and everything flows again once it reads. */
static void test_unread_replies_pause_the_reader(void)
{
    static unsigned char got[64 * 1024];
    struct fixture f;
    size_t sent = 0, max_queued = 0, replies = 0;

    fixture_init(&f);
    f.with_back = true;
    relay_init(&f.back, (uv_stream_t *)&f.b_side, (uv_stream_t *)&f.a_side, &f.pool, on_event, &f);
    f.dir.rev = &f.back;
    f.back.rev = &f.dir;
    f.dir.on_data = on_data_answer;
    ASSERT_OK(relay_start(&f.dir));

    /* peer_a sends a lot and reads nothing. */
    for (int round = 0; round < 4000 && !(f.dir.flags & RELAY_F_PAUSED); round++) {
        push_pattern(f.peer_a, &sent, 4096);
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    ASSERT(f.dir.flags & RELAY_F_PAUSED);
    for (int round = 0; round < 200; round++) {
        push_pattern(f.peer_a, &sent, 4096);
        uv_run(&f.loop, UV_RUN_NOWAIT);
        if (f.back.queued > max_queued)
            max_queued = f.back.queued;
    }
    ASSERT(f.dir.flags & RELAY_F_PAUSED);
    ASSERT(!(f.dir.flags & RELAY_F_READING));
    /* At most the mark, what one full read provoked, and the open tail. */
    ASSERT(max_queued <= RELAY_HIWAT + RELAY_BLOCK_SIZE * 16 + RELAY_BLOCK_SIZE);
    ASSERT(f.dir.bytes < sent); /* bytes wait in the kernel, not in the relay */

    /* peer_a reads its replies: reading resumes, every byte is answered. */
    for (int round = 0; round < 200000 && (replies < f.dir.bytes * 16 || f.dir.bytes < sent);
         round++) {
        uv_run(&f.loop, UV_RUN_NOWAIT);
        size_t n = pull(f.peer_a, got, sizeof(got));
        for (size_t i = 0; i < n; i++)
            ASSERT_EQ(got[i], (replies + i) % 16 == 15 ? '\n' : 'r');
        replies += n;
    }
    ASSERT_EQ((size_t)f.dir.bytes, sent);
    ASSERT_EQ(f.answered, sent);
    ASSERT_EQ(replies, sent * 16);
    ASSERT(!(f.dir.flags & RELAY_F_PAUSED));
    ASSERT_EQ(f.back.queued, 0);
    ASSERT_EQ(f.n_read_err + f.n_write_err, 0);
    fixture_close(&f);
}

/* RELAY_F_CONNECTING: the first bytes are announced once, before they are relayed;
 * later reads are not; EOF as the first event is announced as well. */
static void test_connecting_first_read(void)
{
    struct fixture f;
    unsigned char buf[64];

    fixture_init(&f);
    f.dir.flags |= RELAY_F_CONNECTING;
    ASSERT_OK(relay_start(&f.dir));
    uv_run(&f.loop, UV_RUN_NOWAIT);
    ASSERT_EQ(f.n_connected, 0); /* nothing read yet: still connecting */
    ASSERT_EQ(push(f.peer_a, (const unsigned char *)"220 hi\r\n", 8), 8);
    for (int i = 0; i < 100 && f.dir.bytes < 8; i++)
        uv_run(&f.loop, UV_RUN_NOWAIT);
    ASSERT_EQ(f.n_connected, 1);
    ASSERT_EQ(f.out_at_connected, 0); /* announced before the bytes went on */
    ASSERT(!(f.dir.flags & RELAY_F_CONNECTING));
    ASSERT_EQ(pull(f.peer_b, buf, sizeof(buf)), 8);
    ASSERT_EQ(push(f.peer_a, (const unsigned char *)"more", 4), 4);
    for (int i = 0; i < 100 && f.dir.bytes < 12; i++)
        uv_run(&f.loop, UV_RUN_NOWAIT);
    ASSERT_EQ(f.n_connected, 1);
    fixture_close(&f);

    fixture_init(&f);
    f.dir.flags |= RELAY_F_CONNECTING;
    ASSERT_OK(relay_start(&f.dir));
    ASSERT_OK(shutdown(f.peer_a, SHUT_WR));
    for (int i = 0; i < 100 && f.n_eof == 0; i++)
        uv_run(&f.loop, UV_RUN_NOWAIT);
    ASSERT_EQ(f.n_connected, 1);
    ASSERT_EQ(f.n_eof, 1);
    fixture_close(&f);
}

int main(void)
{
    test_connecting_first_read();
    test_backpressure_and_half_close(RELAY_KERNEL_OFF);
    test_backpressure_and_half_close(RELAY_KERNEL_SPLICE);
    test_close_cancels_queued_writes();
    test_peer_close_is_eof();
    test_small_reads_share_blocks();
    test_unread_replies_pause_the_reader();
    printf("test_relay: ok\n");
    return 0;
}
