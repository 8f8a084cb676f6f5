"""The backend's greeting reaches a client that never speaks first."""

import time

import mxtest
from mxtest import HOST, SINK_GREETING, config, listener, free_port


class GreetingTest(mxtest.ProxyTestCase):

    def proxy_to(self, backend_addr, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backend_addr,
                                             **opts)))
        return p, port

    def test_greeting_from_smtp_sink_within_100ms(self):
        sink = self.sink()
        p, port = self.proxy_to(sink.addr)
        c = self.client(port)
        greeting = c.recv_until(b"\r\n", timeout=2)
        elapsed = time.monotonic() - c.t_connected
        self.assertEqual(greeting, SINK_GREETING)
        self.assertLess(elapsed, 0.100, "greeting took %.3fs" % elapsed)
        sid = p.sid_of(c)
        conn = p.wait_event(ev="connect", sid=sid)
        self.assertEqual(conn["backend"], sink.addr)
        self.assertGreaterEqual(float(conn["ms"]), 0.0)
        c.close()
        close = p.close_of(sid)
        self.assertEqual(close["end"], "client_eof")
        self.assertEqual(close["listener"], "smtp")
        self.assertEqual(close["bytes_up"], "0")
        self.assertEqual(close["bytes_down"], str(len(SINK_GREETING)))
        self.assertEqual(close["backend"], sink.addr)

    def test_delayed_greeting_arrives_when_sent(self):
        b = self.smtp_backend("slow", greeting_delay=2.0)
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        t0 = c.t_connected
        # Nothing may arrive (and the session may not end) before the backend speaks.
        c.assert_open(wait=1.8)
        greeting = c.recv_until(b"\r\n", timeout=2.0)
        elapsed = time.monotonic() - t0
        self.assertEqual(greeting, b"220 slow ESMTP\r\n")
        self.assertWithin(elapsed, 1.9, 2.6, "delayed greeting")
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 slow ok\r\n")

    def test_multiline_greeting_whole_and_exact(self):
        want = b"220-a\r\n220-b\r\n220 c\r\n"
        b1 = self.smtp_backend("one", greeting=want)
        b2 = self.smtp_backend("split", greeting_parts=[b"220-a\r\n", b"220-b\r\n", b"220 c\r\n"],
                               part_delay=0.05)
        for b in (b1, b2):
            p, port = self.proxy_to(b.addr)
            c = self.client(port)
            self.assertEqual(c.read_reply(timeout=2), want, b.name)
            self.assertEqual(c.buf, b"")
            self.assertEqual(c.cmd(b"EHLO client.example"),
                             b"250-%s\r\n250-PIPELINING\r\n250 8BITMIME\r\n" % b.name.encode())
            sid = p.sid_of(c)
            c.close()
            close = p.close_of(sid)
            self.assertEqual(close["bytes_up"], str(len(b"EHLO client.example\r\n")))
            self.assertEqual(close["bytes_down"], str(len(c.received)))


if __name__ == "__main__":
    mxtest.main()
