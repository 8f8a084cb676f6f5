"""Byte-exact relay with real clients, a 50 MB message and half-close."""

import hashlib
import smtplib
import socket
import subprocess
import time

import mxtest
from mxtest import HOST, SINK_GREETING, SINK_BYE, config, listener, free_port


def swaks_bytes(transcript):
    """Bytes sent ('->') and received ('<-') according to a swaks transcript.
    swaks prints DATA lines with their CR (shown as a trailing '\\r'), other
    lines without the CRLF."""
    up = down = 0
    for line in transcript.split("\n"):
        if line.startswith(" -> "):
            text = line[4:]
            up += len(text.encode()) + (1 if text.endswith("\r") else 2)
        elif line.startswith("<-  "):
            down += len(line[4:].encode()) + 2
    return up, down


class RelayTest(mxtest.ProxyTestCase):

    def proxy_to(self, backend_addr, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backend_addr,
                                             **opts)))
        return p, port

    def test_swaks_through_proxy_to_smtp_sink(self):
        sink = self.sink()
        p, port = self.proxy_to(sink.addr)
        r = subprocess.run(["swaks", "--server", "%s:%d" % (HOST, port), "--from",
                            "sender@example.com", "--to", "rcpt@example.com", "--timeout", "10",
                            "--helo", "client.example"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        out = r.stdout.decode("utf-8", "replace")
        self.assertEqual(r.returncode, 0, out + r.stderr.decode())
        self.assertIn("<-  220 smtp-sink ESMTP\n", out)
        self.assertIn("<-  250 2.0.0 Ok\n", out)
        self.assertIn("<-  221 Bye\n", out)
        opens = p.wait_count(1, ev="open")
        close = p.close_of(opens[0]["sid"])
        self.assertIn(close["end"], ("client_eof", "backend_closed"))
        up, down = swaks_bytes(out)
        self.assertEqual((close["bytes_up"], close["bytes_down"]), (str(up), str(down)),
                         "log bytes vs swaks transcript")

    def test_smtplib_sendmail(self):
        b = self.smtp_backend("mx")
        p, port = self.proxy_to(b.addr)
        msg = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: relay\r\n\r\n"
               b"line one\r\nline two\r\n")
        with smtplib.SMTP(HOST, port, local_hostname="client.example", timeout=5) as s:
            code, _ = s.ehlo()
            self.assertEqual(code, 250)
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], msg), {})
            local_port = s.sock.getsockname()[1]
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(5))
        self.assertEqual(rec.messages, [(len(msg), hashlib.sha256(msg).hexdigest())])
        self.assertEqual(rec.commands, [b"ehlo client.example", b"mail FROM:<a@example.com>",
                                        b"rcpt TO:<b@example.com>", b"data", b"QUIT"])
        close = p.close_of(p.sid_of(local_port))
        self.assertEqual(close["end"], "client_eof")
        self.assertEqual(close["backend"], b.addr)
        self.assertEqual(close["bytes_up"], str(rec.rx))
        self.assertEqual(close["bytes_down"], str(rec.tx))

    def test_50mb_message_byte_exact(self):
        b = self.smtp_backend("big")
        p, port = self.proxy_to(b.addr)
        body = mxtest.message_body(50 * 1024 * 1024)
        digest = hashlib.sha256(body).hexdigest()
        c = self.client(port, timeout=60)
        self.assertEqual(c.read_reply(), b"220 big ESMTP\r\n")
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.0.0 big ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.0.0 big ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 go ahead\r\n")
        t0 = time.monotonic()
        c.send(body)
        c.send(b".\r\n")
        reply = c.read_reply(timeout=90)
        self.assertEqual(reply, b"250 2.0.0 big queued %d %s\r\n" % (len(body), digest.encode()),
                         "after %.1fs" % (time.monotonic() - t0))
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 big bye\r\n")
        sid = p.sid_of(c)
        c.close()
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(10))
        close = p.close_of(sid, timeout=10)
        self.assertEqual(close["end"], "client_eof")
        self.assertEqual(rec.rx, c.sent)
        self.assertEqual(rec.tx, len(c.received))
        self.assertEqual(close["bytes_up"], str(c.sent))
        self.assertEqual(close["bytes_down"], str(len(c.received)))

    def test_half_close_reaches_backend_and_reply_flows_back(self):
        b = self.track(mxtest.HalfCloseBackend("half"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), mxtest.HalfCloseBackend.GREETING)
        payload = b"EHLO x\r\n" + mxtest.message_body(256 * 1024) + b"no newline at the end"
        c.send(payload)
        c.sock.shutdown(socket.SHUT_WR)
        rec = b.wait_conns(1)
        self.assertTrue(rec.eof.wait(5), "backend never saw EOF (got %d bytes)" % rec.rx)
        self.assertEqual(rec.rx, len(payload))
        self.assertEqual(rec.digest, hashlib.sha256(payload).hexdigest())
        how, got = c.wait_closed(5)
        want = b"250 got %d bytes %s\r\n" % (len(payload), rec.digest.encode())
        self.assertEqual((how, got), ("eof", want))
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "client_eof")
        self.assertEqual(close["bytes_up"], str(len(payload)))
        self.assertEqual(close["bytes_down"], str(len(mxtest.HalfCloseBackend.GREETING) + len(want)))
        self.assertEqual(close["backend"], b.addr)

    def test_backend_closes_first(self):
        class Banner(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"554 5.3.2 go away\r\n")
        b = self.track(Banner("banner"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        how, got = c.wait_closed(5)
        self.assertEqual((how, got), ("eof", b"554 5.3.2 go away\r\n"))
        c.close()
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "backend_closed")
        self.assertEqual(close["bytes_up"], "0")
        self.assertEqual(close["bytes_down"], str(len(b"554 5.3.2 go away\r\n")))


if __name__ == "__main__":
    mxtest.main()
