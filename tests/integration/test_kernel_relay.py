"""kernel_relay = splice and sockmap: the kernel moves the bytes, nothing else changes.

Each case runs once per value (KernelRelayTest_splice, KernelRelayTest_sockmap, ...; the
sockmap ones skip where this machine or build does not allow BPF). The proxy logs at debug,
so ev=kernel_relay shows the kernel took over. The fallback test drops the capabilities
BPF needs from mxproxy and runs everywhere."""

import ctypes
import hashlib
import os
import smtplib
import socket
import threading
import time

import mxtest
from mxtest import HOST, config, listener, free_port, client_context, TlsSmtpBackend, pki


def random_stream(n):
    """n bytes: one random MiB repeated (cheap to make, still no pattern a relay could fake)."""
    block = os.urandom(1 << 20)
    return (block * (n // len(block) + 1))[:n]


class BulkBackend(mxtest.TcpBackend):
    """Greets, then sends its DOWN bytes and shuts down writing while it reads until EOF;
    rec.digest and rec.rx say what came up."""

    GREETING = b"220 bulk\r\n"

    def __init__(self, down, wait_go=True, **kw):
        self.down = down
        self.wait_go = wait_go
        super().__init__("bulk", **kw)

    def handle(self, rec):
        self.send(rec, self.GREETING)
        buf = b""
        while self.wait_go and not buf.endswith(b"go\r\n"):  # the client says when
            data = self.recv(rec, 4)
            if not data:
                return
            buf += data
        h = hashlib.sha256(buf)

        def pour():
            try:
                rec.sock.sendall(self.down)
                rec.tx += len(self.down)
                rec.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                rec.error = e
        t = threading.Thread(target=pour, daemon=True)
        t.start()
        while True:
            data = self.recv(rec)
            if not data:
                break
            h.update(data)
        rec.digest = h.hexdigest()
        t.join(30)


class SinkBackend(mxtest.TcpBackend):
    """Greets, then reads and counts until EOF."""

    GREETING = b"220 sink\r\n"

    def handle(self, rec):
        self.send(rec, self.GREETING)
        while self.recv(rec):
            pass


class KernelRelayTest(mxtest.ProxyTestCase):
    """Mode tcp with kernel_relay = KERNEL_RELAY (set by the variants below)."""

    KERNEL_RELAY = None

    def proxy_to(self, backend_addr, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("tcp", "%s:%d" % (HOST, port), backend_addr,
                                             kernel_relay=self.KERNEL_RELAY, **opts),
                                    log_level="debug"))
        return p, port

    def wait_paired(self, p, sid):
        """sockmap: the pair goes to the kernel once both directions are quiet (after the
        greeting here); bytes sent before that may keep the session in user space."""
        if self.KERNEL_RELAY == "sockmap":
            p.wait_event(ev="kernel_relay", sid=sid)

    def assertKernelRelayed(self, p, sid, dirs):
        """ev=kernel_relay for sid: one per direction for splice, one for the pair (sockmap)."""
        want = ["both"] if self.KERNEL_RELAY == "sockmap" else dirs
        got = sorted(e["dir"] for e in p.find(ev="kernel_relay", sid=sid))
        self.assertEqual(got, sorted(want), "ev=kernel_relay lines of %s:\n%s" % (sid, p.tail()))
        for e in p.find(ev="kernel_relay", sid=sid):
            self.assertEqual(e["kernel_relay"], self.KERNEL_RELAY)
            self.assertEqual(e["lvl"], "debug")

    def test_both_ways_at_once_byte_exact(self):
        self.both_ways(wait_go=True)

    def test_both_ways_from_the_greeting_on_byte_exact(self):
        """Both sides pour at once, so the kernel takes over (or not) in mid-stream: no
        byte lost or repeated either way (a segment half read by user space must not go
        out again from its start)."""
        self.both_ways(wait_go=False)

    def both_ways(self, wait_go):
        up = random_stream(24 * 1024 * 1024 + 12345)
        down = random_stream(24 * 1024 * 1024 + 6789)
        b = self.track(BulkBackend(down, wait_go=wait_go))
        p, port = self.proxy_to(b.addr)
        c = self.client(port, timeout=30)
        self.assertEqual(c.recv_until(b"\r\n"), BulkBackend.GREETING)
        sid = p.sid_of(c)
        if wait_go:
            self.wait_paired(p, sid)
            up = b"go\r\n" + up
        got = {"n": len(c.buf), "h": hashlib.sha256(c.buf)}  # down bytes read with the greeting

        def drain():
            while True:
                data = c.sock.recv(1 << 20)
                if not data:
                    break
                got["n"] += len(data)
                got["h"].update(data)
        c.sock.settimeout(30)
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        c.sock.sendall(up)
        c.sock.shutdown(socket.SHUT_WR)
        t.join(30)
        self.assertFalse(t.is_alive(), "no EOF from the proxy after %d bytes" % got["n"])
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(30))
        self.assertEqual((got["n"], got["h"].hexdigest()),
                         (len(down), hashlib.sha256(down).hexdigest()), "down")
        self.assertEqual((rec.rx, rec.digest), (len(up), hashlib.sha256(up).hexdigest()), "up")
        close = p.close_of(sid, timeout=10)
        self.assertIn(close["end"], ("client_eof", "backend_closed"))
        self.assertNotIn("error", close)
        self.assertEqual(close["bytes_up"], str(len(up)))
        self.assertEqual(close["bytes_down"], str(len(BulkBackend.GREETING) + len(down)))
        if wait_go:
            self.assertKernelRelayed(p, sid, ["down", "up"])

    def test_half_close_by_client_then_reply(self):
        b = self.track(mxtest.HalfCloseBackend("half"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), mxtest.HalfCloseBackend.GREETING)
        sid = p.sid_of(c)
        self.wait_paired(p, sid)
        payload = random_stream(3 * 1024 * 1024 + 7)
        c.sock.sendall(payload)
        c.sock.shutdown(socket.SHUT_WR)
        rec = b.wait_conns(1)
        self.assertTrue(rec.eof.wait(10), "backend never saw EOF (got %d bytes)" % rec.rx)
        self.assertEqual((rec.rx, rec.digest), (len(payload), hashlib.sha256(payload).hexdigest()))
        how, got = c.wait_closed(5)
        want = b"250 got %d bytes %s\r\n" % (len(payload), rec.digest.encode())
        self.assertEqual((how, got), ("eof", want))
        close = p.close_of(sid)
        self.assertEqual(close["end"], "client_eof")
        self.assertNotIn("error", close)
        self.assertEqual(close["bytes_up"], str(len(payload)))
        self.assertEqual(close["bytes_down"],
                         str(len(mxtest.HalfCloseBackend.GREETING) + len(want)))
        self.assertKernelRelayed(p, sid, ["up"])

    def test_half_close_by_backend_then_client_sends(self):
        down = random_stream(3 * 1024 * 1024 + 3)
        up = random_stream(2 * 1024 * 1024 + 11)

        class FirstDone(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"220 first\r\n")
                if self.recv(rec, 4) != b"go\r\n":
                    return
                self.send(rec, down)
                rec.sock.shutdown(socket.SHUT_WR)
                h = hashlib.sha256()
                while True:
                    data = self.recv(rec)
                    if not data:
                        break
                    h.update(data)
                rec.digest = h.hexdigest()
        b = self.track(FirstDone("first"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port, timeout=10)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 first\r\n")
        sid = p.sid_of(c)
        self.wait_paired(p, sid)
        c.send(b"go\r\n")
        self.assertEqual(c.recv_exact(len(down), timeout=10), down)
        c.sock.settimeout(5)
        self.assertEqual(c.sock.recv(1), b"", "the backend's FIN did not reach the client")
        c.sock.sendall(up)  # the client's direction still flows after the backend's FIN
        c.sock.shutdown(socket.SHUT_WR)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(10))
        self.assertEqual((rec.rx - 4, rec.digest), (len(up), hashlib.sha256(up).hexdigest()))
        close = p.close_of(sid)
        self.assertEqual(close["end"], "backend_closed")
        self.assertNotIn("error", close)
        self.assertEqual(close["bytes_up"], str(4 + len(up)))
        self.assertEqual(close["bytes_down"], str(len(b"220 first\r\n") + len(down)))
        self.assertKernelRelayed(p, sid, ["down", "up"])

    def test_idle_timeout_waits_for_a_busy_stream(self):
        b = self.track(SinkBackend("sink"))
        p, port = self.proxy_to(b.addr, idle_timeout="1s")
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), SinkBackend.GREETING)
        sid = p.sid_of(c)
        self.wait_paired(p, sid)
        chunk = random_stream(64 * 1024)
        sent = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.6:  # 2.6 idle_timeouts, never 1 s without bytes
            c.sock.sendall(chunk)
            sent += len(chunk)
            time.sleep(0.1)
        self.assertEqual(p.find(ev="close", sid=sid), [],
                         "idle_timeout fired on a session moving bytes")
        self.assertKernelRelayed(p, sid, ["up"])
        quiet = time.monotonic()
        close = p.close_of(sid, timeout=5)
        waited = time.monotonic() - quiet
        self.assertEqual(close["end"], "idle_timeout")
        self.assertEqual(close["bytes_up"], str(sent))
        self.assertEqual(close["bytes_down"], str(len(SinkBackend.GREETING)))
        self.assertWithin(waited, 0.5, 2.6, "idle_timeout after the last byte")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(5))
        self.assertEqual(rec.rx, sent)


class StartTlsPassthroughTest(mxtest.ProxyTestCase):
    """Mode smtp, client_tls = passthrough: after STARTTLS the session turns opaque and the
    kernel relays the TLS records."""

    KERNEL_RELAY = None

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()
        cls.backend_pair = cls.pki.leaf("backend.example.test", file_name="backend")

    def test_mail_inside_passthrough_tls(self):
        b = self.track(TlsSmtpBackend("realtls", pair=self.backend_pair, tls="starttls"))
        p = self.start_smtp_proxy(b.addr, client_tls="passthrough",
                                  kernel_relay=self.KERNEL_RELAY, glob={"log_level": "debug"})
        body = b"Subject: big\r\n\r\n" + mxtest.message_body(4 * 1024 * 1024)
        with smtplib.SMTP(HOST, p.port, local_hostname="client.example", timeout=20) as s:
            s.ehlo()
            self.assertEqual(s.starttls(context=client_context(check_hostname=False))[0], 220)
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], body), {})
            sid = p.sid_of(s.sock.getsockname()[1])
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(10))
        self.assertEqual([hashlib.sha256(x).hexdigest() for x in rec.bodies],
                         [hashlib.sha256(body).hexdigest()])
        p.wait_event(ev="starttls_passthrough", sid=sid)
        close = p.close_of(sid, timeout=10)
        self.assertEqual(close["opaque"], "1")
        # As in user space: smtplib closes with the backend's close_notify unread (a reset).
        self.assertIn(close["end"], ("client_eof", "backend_closed", "client_reset"))
        kernel = p.find(ev="kernel_relay", sid=sid)
        self.assertTrue(kernel, "the TLS records never left user space:\n%s" % p.tail())
        self.assertEqual({e["kernel_relay"] for e in kernel}, {self.KERNEL_RELAY})
        # Only after the switch: the plaintext dialog went through user space.
        self.assertGreater(p.events.index(kernel[0]),
                           p.events.index(p.find(ev="starttls_passthrough", sid=sid)[0]))


# CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF: without them no eBPF program loads.
_BPF_CAPS = (12, 21, 38, 39)
_PR_CAPBSET_DROP = 24


def _drop_bpf_caps():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _BPF_CAPS:
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL for a cap this kernel lacks


class FallbackTest(mxtest.ProxyTestCase):
    """kernel_relay = sockmap where BPF is not allowed: one warning, user space serves."""

    def test_without_bpf_capabilities_user_space_relays(self):
        b = self.track(mxtest.HalfCloseBackend("half"))
        port = free_port()
        p = self.start_proxy(config(listener("tcp", "%s:%d" % (HOST, port), b.addr,
                                             kernel_relay="sockmap"), log_level="debug"),
                             preexec_fn=_drop_bpf_caps)
        n = 3
        for i in range(n):
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n"), mxtest.HalfCloseBackend.GREETING)
            payload = random_stream(256 * 1024 + i)
            c.sock.sendall(payload)
            c.sock.shutdown(socket.SHUT_WR)
            how, got = c.wait_closed(5)
            digest = hashlib.sha256(payload).hexdigest().encode()
            self.assertEqual((how, got), ("eof", b"250 got %d bytes %s\r\n" % (len(payload),
                                                                            digest)))
            close = p.close_of(p.sid_of(c))
            self.assertEqual(close["end"], "client_eof")
            self.assertEqual(close["bytes_up"], str(len(payload)))
        warn = p.find(ev="kernel_relay_unavailable")
        self.assertEqual(len(warn), 1, p.tail())
        self.assertEvent(warn[0], "kernel_relay_unavailable",
                         {"kernel_relay": "sockmap", "reason": mxtest.Like(r".+"),
                          "fallback": "user space"}, lvl="warn")
        self.assertEqual(p.find(ev="kernel_relay"), [])
        self.assertEqual(len(p.find(ev="close")), n)


mxtest.kernel_relay_variants(KernelRelayTest, globals())
mxtest.kernel_relay_variants(StartTlsPassthroughTest, globals())
del KernelRelayTest, StartTlsPassthroughTest  # only their variants run


if __name__ == "__main__":
    mxtest.main()
