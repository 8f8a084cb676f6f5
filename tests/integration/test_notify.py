"""Readiness for systemd (Type=notify): the sd_notify datagrams mxproxy sends.

A test binds the AF_UNIX datagram socket a service manager would, passes its name in
NOTIFY_SOCKET, and reads every datagram byte for byte: READY=1 once every listener is bound,
RELOADING=1 with MONOTONIC_USEC then READY=1 around SIGHUP (a valid and an invalid file),
STOPPING=1 when SIGTERM starts the drain; a file path and an abstract name; a socket nobody
reads is an ev=notify_error line, and mxproxy serves all the same.
"""

import os
import re
import signal
import socket
import time
import unittest

import mxtest
from mxtest import HOST, config, listener, free_port

RELOADING_RE = re.compile(rb"RELOADING=1\nMONOTONIC_USEC=([0-9]+)")


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket, by path or abstract name."""

    def __init__(self, tmpdir, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "mxtest-notify-%d-%s" % (os.getpid(), os.urandom(4).hex())
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = os.path.join(tmpdir, "notify.sock")
            self.sock.bind(path)
            self.env = path

    def recv(self, timeout=10.0):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096)
        except socket.timeout:
            raise AssertionError("no datagram within %.1fs" % timeout)

    def assert_empty(self):
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        raise AssertionError("unexpected datagram %r" % data)

    def close(self):
        self.sock.close()


def assert_accepts(test, port):
    """A TCP connect to the listener succeeds now (no retry: it must be bound)."""
    s = socket.create_connection((HOST, port), timeout=2)
    s.close()


class NotifyTest(mxtest.ProxyTestCase):

    def notify_socket(self, abstract=False):
        return self.track(NotifySocket(self.tmpdir, abstract))

    def test_ready_reloading_stopping_exact_datagrams(self):
        n = self.notify_socket()
        backend = self.smtp_backend()
        a, b = free_port(), free_port()
        first = config(listener("a", "%s:%d" % (HOST, a), backend.addr), workers=2)
        p = self.start_proxy(first, env={"NOTIFY_SOCKET": n.env})
        self.assertEqual(n.recv(), b"READY=1")
        assert_accepts(self, a)
        n.assert_empty()

        # A valid reload that adds a listener: READY=1 only once it is bound.
        before = monotonic_usec()
        m = p.reload(config(listener("a", "%s:%d" % (HOST, a), backend.addr),
                            listener("b", "%s:%d" % (HOST, b), backend.addr), workers=2))
        got = n.recv()
        after = monotonic_usec()
        match = RELOADING_RE.fullmatch(got)
        self.assertIsNotNone(match, got)
        self.assertTrue(before <= int(match.group(1)) <= after,
                        "MONOTONIC_USEC=%s not within [%d, %d]" % (match.group(1), before, after))
        self.assertEqual(n.recv(), b"READY=1")
        for _ in range(4):
            assert_accepts(self, b)
        p.wait_event(start=m, ev="reload")
        n.assert_empty()

        # An invalid file: the old config stays, and the reload still ends with READY=1.
        m = p.reload(config(listener("a", "%s:%d" % (HOST, a), backend.addr, bogus_key="1")))
        self.assertIsNotNone(RELOADING_RE.fullmatch(n.recv()))
        self.assertEqual(n.recv(), b"READY=1")
        p.wait_event(start=m, ev="reload_error")
        assert_accepts(self, b)
        n.assert_empty()

        # SIGTERM: STOPPING=1 as the drain starts, then nothing more.
        p.signal(signal.SIGTERM)
        self.assertEqual(n.recv(), b"STOPPING=1")
        self.assertEqual(p.wait_exit(10), 0)
        n.assert_empty()
        self.assertEqual(p.find(ev="notify_error"), [])

    def test_abstract_socket_name(self):
        n = self.notify_socket(abstract=True)
        backend = self.smtp_backend()
        port = free_port()
        p = self.start_proxy(config(listener("a", "%s:%d" % (HOST, port), backend.addr)),
                             env={"NOTIFY_SOCKET": n.env})
        self.assertEqual(n.recv(), b"READY=1")
        assert_accepts(self, port)
        p.signal(signal.SIGHUP)
        self.assertIsNotNone(RELOADING_RE.fullmatch(n.recv()))
        self.assertEqual(n.recv(), b"READY=1")
        p.signal(signal.SIGINT)
        self.assertEqual(n.recv(), b"STOPPING=1")
        self.assertEqual(p.wait_exit(10), 0)

    def test_unreachable_socket_is_logged_and_mxproxy_serves(self):
        backend = self.smtp_backend()
        for env, error in ((os.path.join(self.tmpdir, "nobody.sock"), "no such file or directory"),
                           ("vsock:2:9999", "address family not supported")):
            port = free_port()
            p = self.start_proxy(config(listener("a", "%s:%d" % (HOST, port), backend.addr)),
                                 env={"NOTIFY_SOCKET": env})
            ev = p.wait_event(ev="notify_error")
            self.assertEqual((ev["lvl"], ev["state"], ev["error"]), ("warn", "READY=1", error))
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n"), b"220 backend ESMTP\r\n")
            c.close()
            p.signal(signal.SIGTERM)
            self.assertEqual(p.wait_exit(10), 0)
            stops = p.find(ev="notify_error", state="STOPPING=1")
            self.assertEqual([e["error"] for e in stops], [error])


if __name__ == "__main__":
    mxtest.main()
