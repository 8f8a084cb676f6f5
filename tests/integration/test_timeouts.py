"""idle_timeout, connect_timeout and greeting_timeout."""

import time

import mxtest
from mxtest import HOST, config, listener, free_port, smtp_close

NO_SERVER = b"421 4.4.1 mxproxy: no mail server available, try again later\r\n"


class SilentBackend(mxtest.TcpBackend):
    """Accepts and never greets; keeps what it receives until the peer closes."""

    def __init__(self, name="silent"):
        super().__init__(name, keep_bytes=True)

    def handle(self, rec):
        while self.recv(rec):
            pass


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
        self.assertEqual(p.wait_event(ev="connect_error", sid=sid)["backend"], hole.addr)
        self.assertEqual(p.wait_event(ev="connect", sid=sid)["backend"], live.addr)


class GreetingTimeoutTest(mxtest.ProxyTestCase):
    """Mode smtp: a backend that accepts but does not greet within
    greeting_timeout is a failed connect."""

    def test_silent_backend_then_live_one(self):
        silent = self.track(SilentBackend())
        live = self.smtp_backend("live")
        p = self.start_smtp_proxy([silent.addr, live.addr], greeting_timeout="1s")
        c = self.client(p.port)
        self.assertEqual(c.recv_until(b"\r\n", timeout=4), b"220 live ESMTP\r\n")
        self.assertWithin(time.monotonic() - c.t_connected, 0.9, 2.0, "greeting after failover")
        sid = p.sid_of(c)
        p.wait_event(ev="connect", sid=sid, backend=live.addr)  # log lines lag the bytes
        connects = p.find(ev="connect", sid=sid)
        self.assertEqual([e["backend"] for e in connects], [silent.addr, live.addr])
        errors = p.find(ev="connect_error", sid=sid)
        self.assertEqual(len(errors), 1, errors)
        self.assertEvent(errors[0], "connect_error",
                         {"backend": silent.addr, "error": "no greeting"}, lvl="warn")
        down = p.find(ev="backend_down", backend=silent.addr)
        self.assertEqual(len(down), 1, down)
        rec = silent.wait_conns(1)
        self.assertTrue(rec.eof.wait(2), "the silent backend's connection was left open")
        self.assertEqual(bytes(rec.received), b"", "nothing may reach a backend that never greeted")
        self.assertEqual(c.cmd(b"EHLO client.example"),
                         b"250-live\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 live bye\r\n")
        c.close()
        close = p.close_of(sid)
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    backend=live.addr))
        # fail_timeout: the next session goes to the live backend first.
        c2 = self.client(p.port)
        self.assertEqual(c2.recv_until(b"\r\n", timeout=1), b"220 live ESMTP\r\n")
        self.assertEqual(len(silent.conns), 1)

    def test_only_silent_backends_421(self):
        s1 = self.track(SilentBackend("s1"))
        s2 = self.track(SilentBackend("s2"))
        p = self.start_smtp_proxy([s1.addr, s2.addr], greeting_timeout="500ms", fail_timeout=0)
        c = self.client(p.port)
        self.assertEqual(c.wait_closed(4), ("eof", NO_SERVER))
        self.assertWithin(time.monotonic() - c.t_connected, 0.9, 2.0, "two greeting timeouts")
        sid = p.sid_of(c)
        close = self.assertPairs(p, sid, [])
        self.assertEvent(close, "close", smtp_close(
            "connect_failed", backend=None, error="no greeting",
            primary_error=NO_SERVER.decode().rstrip("\r\n")))
        errors = p.find(ev="connect_error", sid=sid)
        self.assertEqual([(e["backend"], e["error"]) for e in errors],
                         [(s1.addr, "no greeting"), (s2.addr, "no greeting")])
        for b in (s1, s2):
            self.assertTrue(b.wait_conns(1).eof.wait(2), "%s left open" % b.name)

    def test_client_talking_first_is_not_moved(self):
        # Bytes already relayed cannot be taken back from the silent backend:
        # the client gets the 421 at once instead of a second backend.
        silent = self.track(SilentBackend())
        live = self.smtp_backend("live")
        p = self.start_smtp_proxy([silent.addr, live.addr], greeting_timeout="500ms")
        c = self.client(p.port)
        silent.wait_conns(1)
        c.send(b"EHLO early.example\r\n")
        how, got = c.wait_closed(3)
        self.assertEqual((how, got), ("eof", NO_SERVER))
        self.assertWithin(time.monotonic() - c.t_connected, 0.4, 1.5, "greeting timeout")
        sid = p.sid_of(c)
        close = self.assertPairs(p, sid, [mxtest.pair("EHLO early.example", 0, aborted=1)])
        self.assertEvent(close, "close", smtp_close(
            "connect_failed", backend=None, error="no greeting", helo="early.example",
            primary_error=NO_SERVER.decode().rstrip("\r\n")))
        self.assertEqual(len(live.conns), 0)
        self.assertEqual(bytes(silent.conns[0].received), b"EHLO early.example\r\n")


if __name__ == "__main__":
    mxtest.main()
