"""Byte-exact relay with real clients, a 50 MB message and half-close; every test runs
with each kernel_relay value (RelayTest_splice, RelayTest_sockmap, ...)."""

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

    KERNEL_RELAY = "off"

    def proxy_to(self, backend_addr, **opts):
        port = free_port()
        opts.setdefault("kernel_relay", self.KERNEL_RELAY)
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



class RelayEndsTest(mxtest.ProxyTestCase):
    """Client data before the greeting, resets, and backpressure downstream."""

    KERNEL_RELAY = "off"

    def proxy_to(self, backend_addr, **opts):
        port = free_port()
        opts.setdefault("kernel_relay", self.KERNEL_RELAY)
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backend_addr,
                                             **opts)))
        return p, port

    def test_client_data_before_greeting_is_kept(self):
        b = self.smtp_backend("late", greeting_delay=0.5)
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        c.send(b"EHLO early\r\n")
        self.assertEqual(c.read_reply(2), b"220 late ESMTP\r\n")
        self.assertEqual(c.read_reply(2), b"250-late\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        self.assertEqual(b.wait_conns(1).commands, [b"EHLO early"])

    def test_client_reset(self):
        b = self.smtp_backend("mx")
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        mxtest.reset_close(c.sock)
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "client_reset")
        self.assertEqual(close["error"], "connection reset by peer")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), ("6", str(len(c.received))))
        self.assertTrue(b.wait_conns(1).closed.wait(2), "backend connection left open")

    def test_backend_reset(self):
        class Resetter(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"220 short-lived\r\n")
                self.recv(rec)  # one command, then RST
                mxtest.reset_close(rec.sock)
        b = self.track(Resetter("rst"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 short-lived\r\n")
        c.send(b"NOOP\r\n")
        how, got = c.wait_closed(2)
        self.assertEqual(got, b"")
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "backend_reset")
        self.assertEqual(close["error"], "connection reset by peer")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), ("6", "17"))

    def test_download_with_slow_reader_is_bounded_and_exact(self):
        if self.KERNEL_RELAY == "sockmap":
            self.skipTest("kernel_relay = sockmap has no backpressure: the kernel queues what "
                          "the backend sends for a client that does not read (README)")
        b = self.track(mxtest.DownloadBackend("dl"))
        p, port = self.proxy_to(b.addr)
        warm = self.client(port)
        self.assertEqual(warm.recv_until(b"\r\n"), mxtest.DownloadBackend.GREETING)
        warm.close()
        base = mxtest.rss_kb(p.pid)
        n = 64 * 1024 * 1024
        c = self.client(port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.assertEqual(c.recv_until(b"\r\n"), mxtest.DownloadBackend.GREETING)
        c.send(b"GET %d\r\n" % n)
        rec = b.wait_conns(2)
        # The client does not read: the backend must stall once the proxy stops reading.
        last, still = -1, 0
        deadline = time.monotonic() + 10
        while still < 3:
            self.assertLess(time.monotonic(), deadline, "backend never stalled")
            time.sleep(0.1)
            still = still + 1 if rec.tx == last else 0
            last = rec.tx
        self.assertLess(rec.tx, n, "64 MB went through to a client that reads nothing")
        grown = mxtest.rss_kb(p.pid) - base
        self.assertLess(grown, 16 * 1024, "mxproxy buffered %d kB for one slow reader" % grown)
        h = hashlib.sha256()
        got = 0
        c.sock.settimeout(30)
        while got < n:
            data = c.sock.recv(1 << 20)
            self.assertTrue(data, "EOF after %d of %d bytes" % (got, n))
            h.update(data)
            got += len(data)
        self.assertEqual(got, n)
        self.assertEqual(h.hexdigest(), rec.digest)
        sid = p.sid_of(c)
        c.close()
        close = p.close_of(sid, timeout=10)
        self.assertEqual(close["end"], "client_eof")
        self.assertEqual(close["bytes_down"], str(n + len(mxtest.DownloadBackend.GREETING)))
        self.assertEqual(close["bytes_up"], str(len(b"GET %d\r\n" % n)))

mxtest.kernel_relay_variants(RelayTest, globals())
mxtest.kernel_relay_variants(RelayEndsTest, globals())

if __name__ == "__main__":
    mxtest.main()
