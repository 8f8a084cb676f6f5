"""Running out of file descriptors: mxproxy backs off accepting instead of
spinning, says so (ev=accept_error with count=, mxproxy_accept_errors_total),
answers a backend socket it cannot make with end=local_error (421 4.3.2 in
mode smtp) without blaming the backend, and serves again once descriptors
are free. The descriptor limit is lowered on the running process (prlimit),
to leave an exact number of descriptors free."""

import os
import resource
import signal
import socket
import threading
import time

import mxtest
from mxtest import HOST, config, listener, free_port
from test_admin import get, http, parse_prometheus, value

LOCAL_421 = b"421 4.3.2 mxproxy: local resources exhausted, try again later\r\n"
EMFILE_TEXT = "too many open files"


def open_fds(pid):
    return sorted(int(n) for n in os.listdir("/proc/%d/fd" % pid))


def set_nofile(pid, soft):
    """Lowers (or raises) the soft RLIMIT_NOFILE of the running process pid."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def limit_leaving(pid, free):
    """The descriptor limit under which pid has exactly `free` descriptor
    numbers left, counting those it closes later (new descriptors take the
    lowest free number, and only numbers under the limit)."""
    fds = open_fds(pid)
    limit = len(fds) + free
    if limit <= fds[-1]:
        raise AssertionError("%d free descriptors under %d: %r" % (free, limit, fds))
    return limit


def cpu_seconds(pid):
    """utime + stime of pid, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid):
    """How many sockets pid has open (listeners included)."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except FileNotFoundError:
            pass  # closed meanwhile
    return n


def wait_sockets(pid, n, timeout):
    """Waits until pid has at most n sockets open; returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        got = open_sockets(pid)
        if got <= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def log_time(ev):
    """ts= of an event as seconds since the epoch (microseconds kept)."""
    day, clock = ev["ts"].rstrip("Z").split("T")
    t = time.strptime(day + " " + clock.split(".")[0], "%Y-%m-%d %H:%M:%S")
    return time.mktime(t) + int(clock.split(".")[1]) / 1e6


class FdExhaustionTest(mxtest.ProxyTestCase):

    class Backends:
        def __init__(self, *backends):
            self.addr = ",".join(b.addr for b in backends)

    def start(self, backend, workers=1, **opts):
        port, admin = free_port(), free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backend.addr,
                                             **opts),
                                    workers=workers, admin="%s:%d" % (HOST, admin)))
        p.port, p.admin = port, admin
        self.addCleanup(lambda: p.proc.poll() is None and set_nofile(p.pid, 4096))
        return p

    def metrics(self, p):
        return parse_prometheus(get(p.admin, "/metrics")[2].decode())[1]

    def test_backend_socket_shortage_is_local_error(self):
        """Accept succeeds on the last descriptor; the backend socket cannot be
        made: 421 4.3.2, end=local_error, the backend is not marked down and no
        other backend is tried."""
        b = self.smtp_backend("mx")
        spare = self.smtp_backend("spare")
        p = self.start(self.Backends(b, spare), mode="smtp")
        # A first session: libuv opens its loop's reserve descriptor on the first stream.
        c0 = self.client(p.port)
        self.assertEqual(c0.read_reply(), b"220 mx ESMTP\r\n")
        set_nofile(p.pid, limit_leaving(p.pid, 1))
        m = p.mark()
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), LOCAL_421)
        self.assertEqual(c.wait_closed(), ("eof", b""))
        sid = p.sid_of(c)
        close = p.close_of(sid)
        self.assertEqual(close["end"], "local_error")
        self.assertEqual(close["error"], EMFILE_TEXT)
        self.assertEqual(close["primary_error"],
                         "421 4.3.2 mxproxy: local resources exhausted, try again later")
        self.assertNotIn("backend", close)
        self.assertEqual(p.find(ev="backend_down"), [])
        self.assertEqual(p.find(ev="connect_error"), [])
        self.assertEqual(p.find(ev="connect", sid=sid), [])
        self.assertEqual([e for e in p.events[m:] if e["ev"] == "accept_error"], [])
        self.assertEqual((len(b.conns), len(spare.conns)), (1, 0))
        # That session gave its descriptor back: the next client gets the same answer.
        c2 = self.client(p.port)
        self.assertEqual(c2.read_reply(), LOCAL_421)
        p.close_of(p.sid_of(c2))
        self.assertEqual((len(b.conns), len(spare.conns)), (1, 0))
        # With descriptors again, both backends serve: neither was put last.
        set_nofile(p.pid, 4096)
        got = set()
        for _ in range(2):
            c3 = self.client(p.port)
            got.add(c3.read_reply())
            self.assertEqual(c3.cmd(b"QUIT")[:4], b"221 ")
        self.assertEqual(got, {b"220 mx ESMTP\r\n", b"220 spare ESMTP\r\n"})
        self.assertEqual(c0.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        samples = self.metrics(p)
        self.assertEqual(value(samples, "mxproxy_sessions_total", listener="smtp",
                               end="local_error"), 2)

    def test_backend_socket_shortage_mode_tcp(self):
        """Mode tcp: the client is closed, end=local_error, nothing is written."""
        b = self.smtp_backend("mx")
        p = self.start(b)
        c0 = self.client(p.port)
        self.assertEqual(c0.read_reply(), b"220 mx ESMTP\r\n")
        set_nofile(p.pid, limit_leaving(p.pid, 1))
        c = self.client(p.port)
        self.assertEqual(c.wait_closed(), ("eof", b""))
        close = p.close_of(p.sid_of(c))
        self.assertEqual((close["end"], close["error"]), ("local_error", EMFILE_TEXT))
        self.assertEqual(p.find(ev="backend_down"), [])
        self.assertEqual(len(b.conns), 1)

    def test_one_worker_accept_shortage_is_logged_and_served_later(self):
        """With no descriptor left, the connection waits in the backlog (it is
        not accepted and dropped), ev=accept_error says so once, and the client
        is served as soon as a session frees descriptors."""
        b = self.smtp_backend("mx")
        p = self.start(b, mode="smtp")
        c0 = self.client(p.port)
        self.assertEqual(c0.read_reply(), b"220 mx ESMTP\r\n")
        set_nofile(p.pid, limit_leaving(p.pid, 0))
        m = p.mark()
        c = self.client(p.port)
        e = p.wait_event(start=m, ev="accept_error")
        self.assertEvent(e, "accept_error", {"listener": "smtp", "addr": "%s:%d" % (HOST, p.port),
                                             "worker": "0", "error": EMFILE_TEXT, "count": "1"},
                         lvl="error")
        c.assert_open(wait=0.5)
        self.assertEqual(c0.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c0.close()
        self.assertEqual(c.read_reply(timeout=3), b"220 mx ESMTP\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c.close()
        # The errors counted after the first line come out within a second.
        time.sleep(1.2)
        set_nofile(p.pid, 4096)
        lines = [e for e in p.events[m:] if e["ev"] == "accept_error"]
        samples = self.metrics(p)
        errors = value(samples, "mxproxy_accept_errors_total", listener="smtp", error="emfile")
        self.assertGreaterEqual(errors, 1)
        self.assertEqual(sum(int(e["count"]) for e in lines), errors)
        self.assertEqual(value(samples, "mxproxy_accept_errors_total", listener="smtp",
                               error="enfile"), 0)
        self.assertEqual(len(p.find(ev="close")), 2)

    def test_flood_two_workers(self):
        """150 clients reconnecting for 6 s into 2 workers with ~60 spare
        descriptors: afterwards mxproxy is idle (no accept loop spinning),
        every session closed, at most one ev=accept_error per second per
        worker with counts that add up to the metric, a new client is served
        and SIGTERM ends the process at once."""
        sink = self.sink()
        p = self.start(sink, workers=2, mode="smtp")
        c0 = self.client(p.port)
        self.assertEqual(c0.read_reply(), mxtest.SINK_GREETING)
        c0.close()
        p.close_of(p.sid_of(c0))
        c0 = self.client(p.port)  # reaches the other worker too, most likely
        c0.read_reply()
        c0.close()
        p.close_of(p.sid_of(c0))
        baseline = open_sockets(p.pid)  # the listening sockets
        set_nofile(p.pid, limit_leaving(p.pid, 60))
        m = p.mark()
        stop = time.monotonic() + 6.0
        results = {"greeted": 0, "local": 0, "waited": 0, "other": 0}
        lock = threading.Lock()

        def flood():
            while time.monotonic() < stop:
                what = "other"
                try:
                    s = socket.create_connection((HOST, p.port), timeout=1.0)
                    try:
                        s.settimeout(0.5)
                        data = s.recv(100)
                        what = ("greeted" if data.startswith(b"220 ") else
                                "local" if data == LOCAL_421 else "other")
                        if what == "greeted":
                            time.sleep(0.3)  # hold the session's descriptors a while
                    except socket.timeout:
                        what = "waited"
                    finally:
                        s.close()
                except OSError:
                    pass
                with lock:
                    results[what] += 1

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(150)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        flood_s = time.monotonic() - t0
        # Every session closes, with the limit still low.
        left = wait_sockets(p.pid, baseline, 20)
        self.assertLessEqual(left, baseline, "sessions did not close; clients saw %r" % results)
        cpu0 = cpu_seconds(p.pid)
        time.sleep(2.0)
        cpu = cpu_seconds(p.pid) - cpu0
        self.assertLess(cpu, 0.2, "mxproxy used %.2fs of CPU in 2s after the flood" % cpu)
        # A new client is served, under the same limit.
        c = self.client(p.port)
        self.assertEqual(c.read_reply(timeout=3), mxtest.SINK_GREETING)
        c.close()
        set_nofile(p.pid, 4096)
        samples = self.metrics(p)
        errors = sum(value(samples, "mxproxy_accept_errors_total", listener="smtp", error=k)
                     for k in ("emfile", "enfile", "enomem", "enobufs", "other"))
        # The new client's own accept may have failed once more; errors that
        # come within a second of a line are written a second after it.
        deadline = time.monotonic() + 3.0
        while True:
            lines = [e for e in p.events[m:] if e["ev"] == "accept_error"]
            if sum(int(e["count"]) for e in lines) >= errors or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertGreater(len(lines), 0, "accept never ran short: clients saw %r" % results)
        self.assertEqual(sum(int(e["count"]) for e in lines), errors)
        for worker in ("0", "1"):
            times = [log_time(e) for e in lines if e["worker"] == worker]
            gaps = [b - a for a, b in zip(times, times[1:])]
            self.assertTrue(all(g >= 0.99 for g in gaps),
                            "worker %s: accept_error lines %r s apart" % (worker, gaps))
            self.assertLessEqual(len(times), int(flood_s + 20) + 2)
        for e in lines:
            self.assertEqual((e["lvl"], e["listener"], e["error"]), ("error", "smtp", EMFILE_TEXT))
        self.assertEqual(p.find(ev="backend_down"), [])
        print("  clients %r; %d accept errors in %d lines; %.2fs CPU in 2s after"
              % (results, errors, len(lines), cpu))
        p.signal(signal.SIGTERM)
        self.assertEqual(p.wait_exit(5), 0)

    def test_admin_endpoint_under_shortage(self):
        """Health checks while descriptors run out: the admin endpoint's
        accept backs off like the listeners' (libuv's uv_listen() spins on
        the main loop when a worker takes its spare descriptor, and signals
        are no longer handled)."""
        sink = self.sink()
        p = self.start(sink, workers=2, mode="smtp")
        set_nofile(p.pid, limit_leaving(p.pid, 4))
        stop = time.monotonic() + 5.0

        def connect(port, admin):
            while time.monotonic() < stop:
                try:
                    if admin:
                        http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=0.5)
                        continue
                    s = socket.create_connection((HOST, port), timeout=0.5)
                    try:
                        s.settimeout(0.3)
                        if s.recv(100).startswith(b"220 "):
                            time.sleep(0.2)
                    finally:
                        s.close()
                except (OSError, AssertionError, ValueError):
                    pass  # refused, reset or cut short: the shortage at work

        threads = [threading.Thread(target=connect, args=(p.port, False), daemon=True)
                   for _ in range(60)]
        threads += [threading.Thread(target=connect, args=(p.admin, True), daemon=True)
                    for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        time.sleep(1.0)
        cpu0 = cpu_seconds(p.pid)
        time.sleep(2.0)
        cpu = cpu_seconds(p.pid) - cpu0
        self.assertLess(cpu, 0.2, "mxproxy used %.2fs of CPU in 2s after the flood" % cpu)
        code, _, body = get(p.admin, "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        p.signal(signal.SIGTERM)
        self.assertEqual(p.wait_exit(5), 0)


if __name__ == "__main__":
    mxtest.main()
