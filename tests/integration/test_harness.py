"""The harness itself, without mxproxy: clients against smtp-sink and the
scripted backends directly, so a broken backend cannot pass for a proxy bug."""

import hashlib
import smtplib
import socket
import time
import unittest

import mxtest
from mxtest import SINK_GREETING, SINK_BYE


class HarnessTest(unittest.TestCase):

    def setUp(self):
        self.objs = []

    def tearDown(self):
        for o in reversed(self.objs):
            o.close()

    def track(self, o):
        self.objs.append(o)
        return o

    def test_smtp_sink_direct(self):
        sink = self.track(mxtest.SmtpSink())
        c = self.track(mxtest.Client(sink.port))
        self.assertEqual(c.read_reply(), SINK_GREETING)
        self.assertTrue(c.cmd(b"EHLO x").startswith(b"250-smtp-sink\r\n"))
        self.assertEqual(c.cmd(b"QUIT"), SINK_BYE)
        self.assertEqual(c.wait_closed(2), ("eof", b""))

    def test_smtp_backend_hashes_data(self):
        b = self.track(mxtest.SmtpBackend("mx"))
        body = mxtest.message_body(5 * 1024 * 1024)
        c = self.track(mxtest.Client(b.port))
        self.assertEqual(c.read_reply(), b"220 mx ESMTP\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 go ahead\r\n")
        c.send(body + b".\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 mx queued %d %s\r\n"
                         % (len(body), hashlib.sha256(body).hexdigest().encode()))
        # an empty message, terminator split over two writes
        self.assertEqual(c.cmd(b"DATA"), b"354 go ahead\r\n")
        c.send(b".\r")
        c.send(b"\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 mx queued 0 %s\r\n"
                         % hashlib.sha256(b"").hexdigest().encode())
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c.close()
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(2))
        self.assertEqual(rec.rx, c.sent)
        self.assertEqual(rec.tx, len(c.received))

    def test_smtplib_direct(self):
        b = self.track(mxtest.SmtpBackend("mx"))
        with smtplib.SMTP(mxtest.HOST, b.port, timeout=5) as s:
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], b"x\r\n"), {})

    def test_delayed_and_split_greeting(self):
        b = self.track(mxtest.SmtpBackend("slow", greeting_delay=0.3))
        c = self.track(mxtest.Client(b.port))
        with self.assertRaises(AssertionError):
            c.assert_open(wait=0.5)  # the greeting arrives at 0.3 s
        self.assertEqual(c.read_reply(), b"220 slow ESMTP\r\n")
        b2 = self.track(mxtest.SmtpBackend("s", greeting_parts=[b"220-a\r\n", b"220 b\r\n"],
                                           part_delay=0.05))
        c2 = self.track(mxtest.Client(b2.port))
        self.assertEqual(c2.read_reply(), b"220-a\r\n220 b\r\n")

    def test_half_close_backend(self):
        b = self.track(mxtest.HalfCloseBackend("h"))
        c = self.track(mxtest.Client(b.port))
        self.assertEqual(c.recv_until(b"\r\n"), b.GREETING)
        c.send(b"hello")
        c.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(c.wait_closed(2), ("eof", b"250 got 5 bytes %s\r\n"
                                            % hashlib.sha256(b"hello").hexdigest().encode()))

    def test_blackhole_never_answers(self):
        hole = self.track(mxtest.Blackhole())
        s = socket.socket()
        s.settimeout(0.5)
        t0 = time.monotonic()
        with self.assertRaises(socket.timeout):
            s.connect((mxtest.HOST, hole.port))
        self.assertGreaterEqual(time.monotonic() - t0, 0.45)
        s.close()

    def test_free_port_is_closed(self):
        self.assertTrue(mxtest.connect_refused(mxtest.free_port()))


if __name__ == "__main__":
    mxtest.main()
