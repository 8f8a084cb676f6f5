#!/usr/bin/env python3
"""PROXY protocol both ways.

proxy_protocol = v1|v2: mxproxy tells the backend who the client is, in a
header before anything else; a Python backend reads it byte-exactly, then
speaks SMTP. v2 after implicit client TLS carries the TLS version, cipher and
the SNI (authority). accept_proxy_protocol = on: mxproxy behind a load
balancer takes the client's address from the header the balancer sends;
bad, truncated and LOCAL headers; a TLS ClientHello in the same segment as
the header.

The client connects from 127.0.0.2 and mxproxy listens on 127.0.0.1, so the
header's source address is told apart from mxproxy's own.
"""

import socket
import ssl
import struct
import time

import mxtest
from mxtest import (MS, Client, ProxyTestCase, ScriptedSmtpBackend, TlsClient,
                    client_context, pki)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_IP = "127.0.0.2"


def v2(src, dst, sport, dport, tlvs=b"", command=0x21):
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + bytes([command, 0x11]) + struct.pack("!H", len(addrs) + len(tlvs)) + addrs + tlvs


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


class PPBackend(ScriptedSmtpBackend):
    """Reads a PROXY header byte by byte (never past its end) into
    rec.pp_header, then is a ScriptedSmtpBackend."""

    def handle(self, rec):
        rec.pp_header = b""
        rec.sock.settimeout(5)
        first = rec.sock.recv(1)
        if first == b"P":
            hdr = first
            while not hdr.endswith(b"\r\n") and len(hdr) < 108:
                hdr += rec.sock.recv(1)
        elif first == b"\r":
            hdr = first
            while len(hdr) < 16:
                hdr += rec.sock.recv(16 - len(hdr))
            n = struct.unpack("!H", hdr[14:16])[0]
            while len(hdr) < 16 + n:
                hdr += rec.sock.recv(16 + n - len(hdr))
        else:
            hdr = first
        rec.pp_header = hdr
        rec.sock.settimeout(None)
        super().handle(rec)


class ProxyProtocolTest(ProxyTestCase):

    def pp_backend(self):
        return self.track(PPBackend("pp"))

    def client2(self, port):
        return self.track(Client(port, 5.0, source=CLIENT_IP))

    def ehlo_quit(self, c):
        self.assertEqual(c.read_reply(), b"220 pp ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO c.example.test")[:8], b"250-pp\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))

    # ---- to the backend

    def test_v1_to_backend(self):
        b = self.pp_backend()
        p = self.start_smtp_proxy(b.addr, proxy_protocol="v1")
        c = self.client2(p.port)
        self.ehlo_quit(c)
        rec = b.wait_conns(1)
        self.assertEqual(rec.pp_header, b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n"
                         % (CLIENT_IP.encode(), c.local_port, p.port))
        self.assertEqual(rec.commands, [b"EHLO c.example.test", b"QUIT"])
        self.assertEqual(rec.peer[0], "127.0.0.1")  # mxproxy's own address
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["client"]),
                         ("quit", "%s:%d" % (CLIENT_IP, c.local_port)))

    def test_v2_to_backend(self):
        b = self.pp_backend()
        p = self.start_smtp_proxy(b.addr, proxy_protocol="v2")
        c = self.client2(p.port)
        self.ehlo_quit(c)
        rec = b.wait_conns(1)
        self.assertEqual(rec.pp_header, v2(CLIENT_IP, "127.0.0.1", c.local_port, p.port))
        self.assertEqual(len(rec.pp_header), 28)
        self.assertEqual(rec.commands, [b"EHLO c.example.test", b"QUIT"])

    def test_v1_mode_tcp(self):
        b = self.pp_backend()
        p = self.start_smtp_proxy(b.addr, proxy_protocol="v1", mode="tcp")
        c = self.client2(p.port)
        self.ehlo_quit(c)
        self.assertEqual(b.wait_conns(1).pp_header, b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n"
                         % (CLIENT_IP.encode(), c.local_port, p.port))

    def test_v2_after_implicit_tls_carries_tls_and_sni(self):
        k = pki()
        b = self.pp_backend()
        p = self.start_smtp_proxy(b.addr, proxy_protocol="v2", client_tls="implicit",
                                  cert=k.mx.cert, key=k.mx.key)
        c = self.track(TlsClient(p.port, client_context(), server_hostname="mx.example.test"))
        self.ehlo_quit(c)
        version, cipher = c.sock.version(), c.sock.cipher()[0]
        ssl_tlv = tlv(0x20, b"\x01" + struct.pack("!I", 1) + tlv(0x21, version.encode())
                      + tlv(0x23, cipher.encode()))
        want = v2("127.0.0.1", "127.0.0.1", c.local_port, p.port,
                  tlv(0x02, b"mx.example.test") + ssl_tlv)
        self.assertEqual(b.wait_conns(1).pp_header, want)

    def test_v2_after_implicit_tls_without_sni(self):
        k = pki()
        b = self.pp_backend()
        p = self.start_smtp_proxy(b.addr, proxy_protocol="v2", client_tls="implicit",
                                  cert=k.mx.cert, key=k.mx.key)
        c = self.track(TlsClient(p.port, client_context(check_hostname=False),
                                 server_hostname=None))
        self.ehlo_quit(c)
        version, cipher = c.sock.version(), c.sock.cipher()[0]
        ssl_tlv = tlv(0x20, b"\x01" + struct.pack("!I", 1) + tlv(0x21, version.encode())
                      + tlv(0x23, cipher.encode()))
        self.assertEqual(b.wait_conns(1).pp_header,
                         v2("127.0.0.1", "127.0.0.1", c.local_port, p.port, ssl_tlv))

    # ---- from a load balancer

    def lb_proxy(self, b, **opts):
        return self.start_smtp_proxy(b.addr, accept_proxy_protocol="on", **opts)

    def assertPPEvent(self, p, c, client, version):
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        ev = p.wait_event(ev="proxy_protocol", sid=sid)
        self.assertEvent(ev, "proxy_protocol", {
            "client": client, "via": "%s:%d" % (CLIENT_IP, c.local_port), "version": version})
        return sid

    def test_accept_v1_and_pass_the_real_client_on_in_v2(self):
        b = self.pp_backend()
        p = self.lb_proxy(b, proxy_protocol="v2")
        c = self.client2(p.port)
        c.send(b"PROXY TCP4 192.0.2.10 198.51.100.20 40000 25\r\n")
        self.ehlo_quit(c)
        sid = self.assertPPEvent(p, c, "192.0.2.10:40000", 1)
        # The destination is mxproxy's listener: a non-transparent listener
        # does not take the header's destination as a target.
        self.assertEqual(b.wait_conns(1).pp_header, v2("192.0.2.10", "127.0.0.1", 40000, p.port))
        want = mxtest.smtp_close("quit", helo="c.example.test", backend=b.addr)
        want["client"] = "192.0.2.10:40000"
        self.assertEvent(p.close_of(sid), "close", want)

    def test_accept_v2(self):
        b = self.pp_backend()
        p = self.lb_proxy(b, proxy_protocol="v1")
        c = self.client2(p.port)
        c.send(v2("203.0.113.7", "198.51.100.20", 51000, 25, tlv(0x04, b"")))
        self.ehlo_quit(c)
        sid = self.assertPPEvent(p, c, "203.0.113.7:51000", 2)
        self.assertEqual(b.wait_conns(1).pp_header,
                         b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 %d\r\n" % p.port)
        self.assertEqual(p.close_of(sid)["client"], "203.0.113.7:51000")

    def test_accept_v2_local_keeps_the_peer_address(self):
        b = self.pp_backend()
        p = self.lb_proxy(b, proxy_protocol="v1")
        c = self.client2(p.port)
        c.send(SIG + b"\x20\x00\x00\x00")  # LOCAL: a health check, no addresses
        self.ehlo_quit(c)
        me = "%s:%d" % (CLIENT_IP, c.local_port)
        sid = self.assertPPEvent(p, c, me, 2)
        self.assertEqual(b.wait_conns(1).pp_header, b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n"
                         % (CLIENT_IP.encode(), c.local_port, p.port))
        self.assertEqual(p.close_of(sid)["client"], me)

    def assertRefused(self, p, b, c, reason, data=b""):
        me = "%s:%d" % (CLIENT_IP, c.local_port)
        sid = p.wait_event(ev="open", client=me)["sid"]
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        self.assertEvent(p.wait_event(ev="proxy_protocol_error", sid=sid), "proxy_protocol_error",
                         {"listener": "smtp", "peer": me, "reason": reason}, lvl="warn")
        self.assertEvent(p.close_of(sid), "close", {
            "listener": "smtp", "end": "proxy_protocol_error", "bytes_up": 0, "bytes_down": 0,
            "ms": MS, "client": me, "error": reason, "rcpt_ok": 0, "rcpt_rejected": 0,
            "messages": 0})
        self.assertEqual(b.conns, [])  # the backend is never reached
        return sid

    def test_accept_garbage(self):
        b = self.pp_backend()
        p = self.lb_proxy(b)
        c = self.client2(p.port)
        c.send(b"GARBAGE\r\n")
        self.assertRefused(p, b, c, "bad signature")

    def test_accept_smtp_command_instead_of_header(self):
        b = self.pp_backend()
        p = self.lb_proxy(b)
        c = self.client2(p.port)
        c.send(b"EHLO client.example.test\r\n")
        self.assertRefused(p, b, c, "bad signature")

    def test_accept_v1_bad_address(self):
        b = self.pp_backend()
        p = self.lb_proxy(b)
        c = self.client2(p.port)
        c.send(b"PROXY TCP4 192.0.2.300 198.51.100.20 40000 25\r\n")
        self.assertRefused(p, b, c, "v1: invalid source address")

    def test_accept_truncated_header_times_out(self):
        b = self.pp_backend()
        p = self.lb_proxy(b, proxy_protocol_timeout="1s")
        c = self.client2(p.port)
        c.send(b"PROXY TCP4 192.0.2.10 ")
        t0 = time.monotonic()
        self.assertRefused(p, b, c, "timeout")
        self.assertWithin(time.monotonic() - t0, 0.8, 2.0, "proxy_protocol_timeout = 1s")

    def test_accept_nothing_sent_no_greeting(self):
        """Server first, but not before the header: nothing reaches the
        client until the balancer has spoken."""
        b = self.pp_backend()
        p = self.lb_proxy(b, proxy_protocol_timeout="1s")
        c = self.client2(p.port)
        c.assert_open(0.5)
        self.assertRefused(p, b, c, "timeout")

    def test_accept_header_and_tls_client_hello_in_one_segment(self):
        """Implicit TLS behind a load balancer: the ClientHello follows the
        header in the same segment and must not be lost."""
        k = pki()
        b = self.pp_backend()
        p = self.lb_proxy(b, client_tls="implicit", cert=k.mx.cert, key=k.mx.key,
                          proxy_protocol="v2")
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=5,
                                        source_address=(CLIENT_IP, 0))
        self.track(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context().wrap_bio(inc, out, server_hostname="mx.example.test")
        prefix = b"PROXY TCP4 192.0.2.10 198.51.100.20 40000 465\r\n"
        deadline = time.monotonic() + 5

        def pump(first=False):
            data = out.read()
            if data:
                sock.sendall(prefix + data if first else data)

        def fill():
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                self.fail("EOF during the TLS handshake")
            inc.write(data)

        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump(first)
                first = False
                fill()
        pump()
        got = b""
        while b"\r\n" not in got:
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                fill()
        self.assertEqual(got, b"220 pp ESMTP\r\n")
        ssl_tlv = tlv(0x20, b"\x01" + struct.pack("!I", 1) + tlv(0x21, tls.version().encode())
                      + tlv(0x23, tls.cipher()[0].encode()))
        self.assertEqual(b.wait_conns(1).pp_header,
                         v2("192.0.2.10", "127.0.0.1", 40000, p.port,
                            tlv(0x02, b"mx.example.test") + ssl_tlv))
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, sock.getsockname()[1]))["sid"]
        self.assertEqual(p.wait_event(ev="proxy_protocol", sid=sid)["client"], "192.0.2.10:40000")
        self.assertEqual(p.wait_event(ev="tls", sid=sid)["side"], "client")
        tls.write(b"QUIT\r\n")
        pump()
        got = b""
        while b"\r\n" not in got:
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                fill()
        self.assertEqual(got, b"221 2.0.0 Bye\r\n")
        sock.close()
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["client"]), ("quit", "192.0.2.10:40000"))


if __name__ == "__main__":
    mxtest.main()
