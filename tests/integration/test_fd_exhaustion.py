"""Running out of file descriptors: mxproxy answers a backend socket it
cannot make with end=local_error (421 4.3.2 in mode smtp) without blaming
the backend, and serves again once descriptors are free. The descriptor limit is lowered on the running process (prlimit),
to leave an exact number of descriptors free."""

import os
import resource
import signal
import socket
import threading
import time

import mxtest
from mxtest import HOST, config, listener, free_port
from test_admin import get, parse_prometheus, value

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
        # The same descriptor is free again: the next client gets the same answer,
        # and round robin moved on without skipping a "down" backend.
        c2 = self.client(p.port)
        self.assertEqual(c2.read_reply(), LOCAL_421)
        p.close_of(p.sid_of(c2))
        set_nofile(p.pid, 4096)
        c3 = self.client(p.port)
        self.assertIn(c3.read_reply(), (b"220 mx ESMTP\r\n", b"220 spare ESMTP\r\n"))
        self.assertEqual(c3.cmd(b"QUIT")[:4], b"221 ")
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


if __name__ == "__main__":
    mxtest.main()
