"""idle_timeout and connect_timeout."""

import time

import mxtest
from mxtest import HOST, config, listener, free_port


class TimeoutsTest(mxtest.ProxyTestCase):

    def proxy_to(self, backends, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backends, **opts)))
        return p, port

    def test_idle_session_closed_after_idle_timeout(self):
        b = self.smtp_backend("mx")
        p, port = self.proxy_to(b.addr, idle_timeout=1)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        t_last = time.monotonic()
        how, got = c.wait_closed(3)
        self.assertEqual(got, b"")
        self.assertWithin(time.monotonic() - t_last, 0.9, 1.6, "idle close")
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "idle_timeout")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), ("0", "14"))
        self.assertTrue(b.conns[0].closed.wait(2), "backend side left open")

    def test_active_session_survives_idle_timeout(self):
        b = self.smtp_backend("mx")
        p, port = self.proxy_to(b.addr, idle_timeout="1s")
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        t_end = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < t_end:
            c.assert_open(wait=0.4)
            self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
            n += 1
        self.assertGreaterEqual(n, 5)
        t_last = time.monotonic()
        how, got = c.wait_closed(3)
        self.assertEqual(got, b"")
        self.assertWithin(time.monotonic() - t_last, 0.9, 1.6, "idle close after activity")
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "idle_timeout")
        self.assertEqual(close["bytes_up"], str(6 * n))
        self.assertEqual(close["bytes_down"], str(len(c.received)))

    def test_connect_timeout(self):
        # A SYN to a listener whose accept queue is full is dropped on Linux,
        # so mxproxy's connect() stays pending until connect_timeout.
        hole = self.track(mxtest.Blackhole())
        p, port = self.proxy_to(hole.addr, connect_timeout="750ms")
        c = self.client(port)
        how, got = c.wait_closed(3)
        elapsed = time.monotonic() - c.t_connected
        self.assertEqual(got, b"")
        self.assertWithin(elapsed, 0.65, 1.4, "connect timeout")
        sid = p.sid_of(c)
        close = p.close_of(sid)
        self.assertEqual(close["end"], "connect_failed")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), ("0", "0"))
        # The wording mxproxy uses for a timed-out connect, pinned here.
        self.assertEqual(close["error"], "connect timeout")
        errors = p.find(ev="connect_error", sid=sid)
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(errors[0]["backend"], hole.addr)
        self.assertEqual(errors[0]["lvl"], "warn")
        self.assertEqual(errors[0]["error"], "connect timeout")

    def test_connect_timeout_then_next_backend(self):
        hole = self.track(mxtest.Blackhole())
        live = self.smtp_backend("live")
        p, port = self.proxy_to([hole.addr, live.addr], connect_timeout=0.5)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n", timeout=3), b"220 live ESMTP\r\n")
        self.assertWithin(time.monotonic() - c.t_connected, 0.4, 1.2, "greeting after failover")
        sid = p.sid_of(c)
        self.assertEqual(p.find(ev="connect_error", sid=sid)[0]["backend"], hole.addr)
        self.assertEqual(p.wait_event(ev="connect", sid=sid)["backend"], live.addr)


if __name__ == "__main__":
    mxtest.main()
