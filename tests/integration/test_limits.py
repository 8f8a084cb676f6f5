"""max_connections: the connection over the limit is closed at once; in mode
smtp it first gets a 421 4.7.0 saying why."""

import mxtest
from mxtest import HOST, config, listener, free_port, smtp_close

TOO_MANY = b"421 4.7.0 mxproxy: too many connections, try again later\r\n"


class LimitsTest(mxtest.ProxyTestCase):

    def test_max_connections(self):
        b = self.smtp_backend("mx")
        port = free_port()
        # Two workers: the limit holds for the listener as a whole.
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             max_connections=2), workers=2))
        c1 = self.client(port)
        c2 = self.client(port)
        for c in (c1, c2):
            self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        c3 = self.client(port)
        how, got = c3.wait_closed(0.5)
        self.assertEqual((how, got), ("eof", b""), "third connection must be closed at once")
        sid3 = p.sid_of(c3)
        close3 = p.close_of(sid3)
        self.assertEqual(close3["end"], "limit")
        self.assertEqual((close3["bytes_up"], close3["bytes_down"]), ("0", "0"))
        self.assertEqual(p.find(ev="connect", sid=sid3), [])
        self.assertEqual(len(b.conns), 2, "no backend connection for a refused session")
        # Both sessions still work.
        self.assertEqual(c2.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        # One ends: the next is accepted.
        self.assertEqual(c1.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        sid1 = p.sid_of(c1)
        c1.close()
        self.assertEqual(p.close_of(sid1)["end"], "client_eof")
        c4 = self.client(port)
        self.assertEqual(c4.recv_until(b"\r\n", timeout=2), b"220 mx ESMTP\r\n")
        self.assertEqual(c4.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        self.assertEqual(len(b.conns), 3)
        self.assertEqual(len(p.find(ev="close", end="limit")), 1)

    def test_burst_over_two_workers(self):
        b = self.smtp_backend("mx")
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             max_connections=3), workers=2))
        clients = [self.client(port) for _ in range(12)]
        ends = p.wait_count(9, timeout=5, ev="close", end="limit")
        limited = {e["sid"] for e in ends}
        kept = 0
        for c in clients:
            sid = p.sid_of(c)
            if sid in limited:
                self.assertEqual(c.wait_closed(1), ("eof", b""))
            else:
                self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
                kept += 1
        self.assertEqual(kept, 3)
        self.assertEqual(len(b.conns), 3)

    def test_limit_holds_across_reload(self):
        x = self.smtp_backend("x")
        y = self.smtp_backend("y")
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, x.addr, max_connections=1)))
        a = self.client(port)
        self.assertEqual(a.recv_until(b"\r\n"), b"220 x ESMTP\r\n")
        m = p.reload(config(listener("smtp", listen, y.addr, max_connections=1)))
        p.wait_event(start=m, ev="reload")
        # a, opened under the old config, still counts against the listener.
        b = self.client(port)
        self.assertEqual(b.wait_closed(0.5), ("eof", b""))
        self.assertEqual(p.close_of(p.sid_of(b))["end"], "limit")
        sid_a = p.sid_of(a)
        a.close()
        p.close_of(sid_a)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n", timeout=2), b"220 y ESMTP\r\n")
        self.assertEqual(len(y.conns), 1)

    def test_smtp_over_limit_gets_421(self):
        b = self.smtp_backend("mx")
        p = self.start_smtp_proxy(b.addr, max_connections=1)
        c1 = self.client(p.port)
        self.assertEqual(c1.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        c2 = self.client(p.port)
        self.assertEqual(c2.wait_closed(1), ("eof", TOO_MANY))
        sid2 = p.sid_of(c2)
        close2 = p.close_of(sid2)
        self.assertEvent(close2, "close", smtp_close(
            "limit", backend=None, primary_error=TOO_MANY.decode().rstrip("\r\n")))
        self.assertEqual((close2["bytes_up"], close2["bytes_down"]), ("0", "0"))
        self.assertEqual(p.find(ev="connect", sid=sid2), [])
        self.assertEqual(p.find(ev="pair", sid=sid2), [])
        self.assertEqual(len(b.conns), 1, "no backend connection for a refused session")
        # The refused session never counted: once c1 is gone the next one is served.
        self.assertEqual(c1.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        sid1 = p.sid_of(c1)
        c1.close()
        self.assertEqual(p.close_of(sid1)["end"], "quit")
        c3 = self.client(p.port)
        self.assertEqual(c3.recv_until(b"\r\n", timeout=2), b"220 mx ESMTP\r\n")
        self.assertEqual(len(b.conns), 2)

    def test_smtp_burst_over_limit(self):
        b = self.smtp_backend("mx")
        p = self.start_smtp_proxy(b.addr, max_connections=2, glob={"workers": 2})
        clients = [self.client(p.port) for _ in range(10)]
        ends = p.wait_count(8, timeout=5, ev="close", end="limit")
        limited = {e["sid"] for e in ends}
        kept = 0
        for c in clients:
            if p.sid_of(c) in limited:
                self.assertEqual(c.wait_closed(1), ("eof", TOO_MANY))
            else:
                self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
                kept += 1
        self.assertEqual(kept, 2)
        self.assertEqual(len(b.conns), 2)


if __name__ == "__main__":
    mxtest.main()
