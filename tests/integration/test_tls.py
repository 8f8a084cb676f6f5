"""TLS on both legs: client_tls = implicit (mode smtp and mode tcp), SNI
certificate selection, tls_min_version, handshake failures (plaintext,
truncated ClientHello, refused versions, a client that rejects the
certificate), backend_tls = implicit with backend_ca / backend_sni /
backend_verify, certificates replaced on SIGHUP, certificate errors at -t,
start and reload, and STARTTLS passthrough against a backend that really
does TLS.

Certificates come from mxtest.pki(): a throw-away CA and EC P-256 leaves
(mx.example.test, *.other.test, a self-signed mx.example.test) made with the
openssl CLI when the file starts. Real clients: swaks --tlsc,
openssl s_client, smtplib (SMTP_SSL, starttls()) and Python ssl sockets.
"""

import hashlib
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

import mxtest
from mxtest import (HOST, MS, UINT, ADDR, Like, TcpBackend, TlsClient, TlsSmtpBackend,
                    client_context, config, listener, pair, pki)

TLS13 = "TLSv1.3/TLS_AES_256_GCM_SHA384"
TLS12 = "TLSv1.2/ECDHE-ECDSA-AES256-GCM-SHA384"
BACKEND_421 = b"421 4.7.0 mxproxy: TLS with the mail server failed, try again later\r\n"
EXT_LINES = (b"250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n"
             b"250 STARTTLS\r\n")
# TlsSmtpBackend(tls="starttls") inside TLS: STARTTLS is no longer offered
EXT_LINES_IN_TLS = (b"250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
                    b"250 AUTH PLAIN LOGIN\r\n")


def ehlo_reply(name, in_tls=False):
    return b"250-%s\r\n" % name + (EXT_LINES_IN_TLS if in_tls else EXT_LINES)


# Close-line fields, the TLS ones included: one builder for every test file.
tls_close = mxtest.smtp_close


def tls_fields(side, tls=TLS13, sni=None, verified=None):
    f = {"side": side, "tls": tls}
    if sni is not None:
        f["sni"] = sni
    if verified is not None:
        f["verified"] = verified
    return f


def client_hello(server_hostname="mx.example.test"):
    """The bytes of a real ClientHello, made with a memory BIO."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(check_hostname=False).wrap_bio(inc, out,
                                                        server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, hello[:16]
    return hello


class SniSMTP_SSL(smtplib.SMTP_SSL):
    """SMTP_SSL to 127.0.0.1 that sends (and verifies) server name sni."""

    def __init__(self, sni, *a, **kw):
        self.sni = sni
        super().__init__(*a, **kw)

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout)
        return self.context.wrap_socket(sock, server_hostname=self.sni)


def run(args, input=b"", timeout=20):
    r = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def s_client(port, *extra, input=b"EHLO x\nQUIT\n"):
    """openssl s_client -brief: the session's plaintext on stdout, the
    connection summary (peer certificate, verification) on stderr."""
    return run(["openssl", "s_client", "-connect", "%s:%d" % (HOST, port), "-nocommands",
                "-brief", "-crlf", "-ign_eof"] + list(extra), input=input)


class EchoBackend(TcpBackend):
    """Sends GREETING, then echoes every byte back (for mode tcp)."""

    GREETING = b"hello from echo\r\n"

    def handle(self, rec):
        self.send(rec, self.GREETING)
        while True:
            data = self.recv(rec)
            if not data:
                return
            self.send(rec, data)


class TlsTestCase(mxtest.ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()

    def start_tls_proxy(self, backends, **opts):
        """mode smtp, client_tls = implicit, cert mx.example.test unless opts
        say otherwise."""
        opts.setdefault("client_tls", "implicit")
        if opts["client_tls"] == "implicit":
            opts.setdefault("cert", self.pki.mx.cert)
            opts.setdefault("key", self.pki.mx.key)
        return self.start_smtp_proxy(backends, **opts)

    def tls_client(self, port, server_hostname="mx.example.test", ctx=None, **kw):
        if ctx is None:
            ctx = client_context(check_hostname=server_hostname is not None)
        return self.track(TlsClient(port, ctx, server_hostname=server_hostname, **kw))

    def tls_event(self, proxy, sid, side):
        evs = proxy.wait_count(1, ev="tls", sid=sid, side=side)
        self.assertEqual(len(evs), 1, [e["_raw"] for e in evs])
        return evs[0]

    def one_error(self, proxy, sid, side="client"):
        evs = proxy.wait_count(1, ev="tls_error", sid=sid)
        self.assertEqual(len(evs), 1, [e["_raw"] for e in evs])
        self.assertEqual(evs[0]["side"], side, evs[0]["_raw"])
        return evs[0]

    def quit(self, c):
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))


# --------------------------------------------------------------------------


class ClientTlsTest(TlsTestCase):
    """client_tls = implicit: the client speaks TLS from its first byte."""

    def test_swaks_tlsc_delivers_through_smtp_sink(self):
        sink = self.sink()
        p = self.start_tls_proxy(sink.addr)
        rc, out, err = run(["swaks", "--server", "%s:%d" % (HOST, p.port), "--tlsc",
                            "--tls-verify", "--tls-ca-path", self.pki.ca,
                            "--tls-sni", "mx.example.test", "--helo", "client.example",
                            "--from", "a@example.com", "--to", "b@example.com",
                            "--body", "over implicit TLS"], timeout=20)
        out = out.decode()
        self.assertEqual(rc, 0, out + err)
        self.assertIn("=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384", out)
        # '<~' and '~>' are swaks' marks for lines read and written inside TLS:
        # the greeting never came in plaintext
        self.assertNotIn("<-  220", out)
        self.assertIn("<~  220 smtp-sink ESMTP\n", out)
        self.assertIn("<~  250 2.0.0 Ok", out)
        self.assertIn("<~  221 Bye\n", out)
        close = p.wait_event(ev="close")
        sid = close["sid"]
        self.assertPairs(p, sid, [
            pair("<greeting>", 220, "smtp-sink ESMTP"),
            pair("EHLO client.example", 250, "smtp-sink", lines=9),
            pair("MAIL FROM:<a@example.com>", 250, "Ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "Ok", esc="2.1.5"),
            pair("DATA", 354, "End data with <CR><LF>.<CR><LF>"),
            pair(".", 250, "Ok", esc="2.0.0", size=UINT),
            pair("QUIT", 221, "Bye"),
        ])
        self.assertEvent(close, "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", helo="client.example",
            mail_from="a@example.com", rcpt_ok=1, messages=1))
        self.assertEvent(self.tls_event(p, sid, "client"), "tls",
                         tls_fields("client", sni="mx.example.test"))

    def test_smtplib_smtp_ssl_message_byte_exact(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        body = (b"Subject: tls\r\n\r\n" + mxtest.message_body(300000)
                + b".leading dot\r\n\xc3\xa9 8bit\r\n")
        with SniSMTP_SSL("mx.example.test", HOST, p.port, timeout=10,
                         context=client_context()) as s:
            self.assertEqual(s.ehlo("client.example")[0], 250)
            self.assertIn("chunking", s.esmtp_features)
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], body), {})
            self.assertEqual(s.sock.version(), "TLSv1.3")
            self.assertEqual(s.sock.getpeercert(binary_form=True), self.pki.mx.der)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        self.assertEqual(rec.bodies, [stuffed])  # dot-stuffed by smtplib, untouched by mxproxy
        close = p.wait_event(ev="close")
        self.assertEvent(close, "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", helo="client.example",
            mail_from="a@example.com", rcpt_ok=1, messages=1))
        self.assertEqual(int(close["bytes_up"]), rec.rx)  # plaintext bytes, both counted

    def test_s_client_verifies_against_test_ca(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        rc, out, err = s_client(p.port, "-servername", "mx.example.test",
                                "-verify_return_error", "-CAfile", self.pki.ca,
                                "-verify_hostname", "mx.example.test")
        self.assertEqual(rc, 0, err)
        self.assertIn("Protocol version: TLSv1.3\n", err)
        self.assertIn("Ciphersuite: TLS_AES_256_GCM_SHA384\n", err)
        self.assertIn("Peer certificate: CN = mx.example.test\n", err)
        self.assertIn("Verification: OK\n", err)
        self.assertIn("Verified peername: mx.example.test\n", err)
        # exactly the backend's bytes, and nothing else, inside TLS
        self.assertEqual(out, b"220 scripted ESMTP\r\n" + ehlo_reply(b"scripted")
                         + b"221 2.0.0 Bye\r\n")
        close = p.wait_event(ev="close")
        self.assertEvent(close, "close", tls_close("quit", tls_client=TLS13,
                                                   sni="mx.example.test", helo="x"))
        # and an s_client that trusts another CA gives up: verify error 18
        rc, out, err = s_client(p.port, "-servername", "mx.example.test",
                                "-verify_return_error", "-CAfile", self.pki.untrusted.cert)
        self.assertNotEqual(rc, 0)
        self.assertEqual(out, b"")
        self.assertIn("unable to get local issuer certificate", err)

    def test_greeting_held_until_handshake_then_encrypted(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        c = self.tls_client(p.port, tls=False)
        rec = b.wait_conns(1)  # the backend is connected at accept ...
        deadline = time.monotonic() + 3
        while rec.tx == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(rec.tx, len(b"220 scripted ESMTP\r\n"), "backend did not greet")
        c.assert_open(0.3)  # ... but its greeting is never sent in plaintext
        c.start_tls()
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"scripted"))
        self.quit(c)
        sid = p.sid_of(c)
        self.assertPairs(p, sid, [
            pair("<greeting>", 220, "scripted ESMTP"),
            pair("EHLO client.example", 250, "scripted", lines=6),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])

    def test_sni_picks_certificate_unknown_gets_default(self):
        b = self.scripted()
        k = self.pki
        p = self.start_tls_proxy(b.addr, cert=[k.mx.cert, k.other.cert],
                                 key=[k.mx.key, k.other.key])
        cases = [  # (SNI sent, certificate expected, verify the name)
            ("mx.example.test", k.mx, True),
            ("a.other.test", k.other, True),
            ("Mail.Other.TEST", k.other, True),   # names are case-insensitive
            ("other.test", k.mx, False),          # a wildcard needs one more label
            ("x.y.other.test", k.mx, False),      # ... and only one
            ("unknown.example", k.mx, False),
            (None, k.mx, False),
        ]
        for name, want, check in cases:
            with self.subTest(sni=name):
                c = self.tls_client(p.port, server_hostname=name,
                                    ctx=client_context(check_hostname=check))
                self.assertEqual(c.sock.getpeercert(binary_form=True), want.der,
                                 "SNI %r got CN %r" % (name, mxtest.peer_cn(c.sock)))
                self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
                self.quit(c)
                sid = p.sid_of(c)
                self.assertEvent(self.tls_event(p, sid, "client"), "tls",
                                 tls_fields("client", sni=name))
                self.assertEvent(p.close_of(sid), "close",
                                 tls_close("quit", tls_client=TLS13, sni=name))
        # s_client sees the wildcard certificate's subject for a name under it
        rc, out, err = s_client(p.port, "-servername", "mail.other.test",
                                "-verify_return_error", "-CAfile", k.ca,
                                "-verify_hostname", "mail.other.test")
        self.assertEqual(rc, 0, err)
        self.assertIn("Peer certificate: CN = *.other.test\n", err)
        self.assertEqual(out[:20], b"220 scripted ESMTP\r\n")

    def test_first_certificate_is_the_default(self):
        b = self.scripted()
        k = self.pki
        p = self.start_tls_proxy(b.addr, cert=[k.other.cert, k.mx.cert],
                                 key=[k.other.key, k.mx.key])
        for name, want in ((None, k.other), ("unknown.example", k.other),
                           ("mx.example.test", k.mx)):
            with self.subTest(sni=name):
                c = self.tls_client(p.port, server_hostname=name,
                                    ctx=client_context(check_hostname=False))
                self.assertEqual(c.sock.getpeercert(binary_form=True), want.der)
                self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
                c.close()

    def test_tls13_minimum_refuses_tls12_client(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr, tls_min_version="TLSv1.3")
        c = self.client(p.port)
        ctx = client_context(max_version=ssl.TLSVersion.TLSv1_2)
        with self.assertRaises(ssl.SSLError) as cm:
            ctx.wrap_socket(c.sock, server_hostname="mx.example.test")
        self.assertIn("PROTOCOL_VERSION", str(cm.exception))
        sid = p.sid_of(c)
        self.assertEvent(self.one_error(p, sid), "tls_error",
                         {"side": "client", "reason": "unsupported protocol"}, lvl="warn")
        self.assertEvent(p.close_of(sid), "close",
                         tls_close("tls_error", error="unsupported protocol"))
        self.assertEqual(p.find(ev="tls", sid=sid), [])
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3), "backend connection left open")
        self.assertEqual(rec.commands, [])
        # the same listener takes TLSv1.3
        c = self.tls_client(p.port)
        self.assertEqual(c.sock.version(), "TLSv1.3")
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.quit(c)

    def test_tls12_accepted_by_default(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        c = self.tls_client(p.port, ctx=client_context(max_version=ssl.TLSVersion.TLSv1_2))
        self.assertEqual(c.sock.version(), "TLSv1.2")
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.quit(c)
        sid = p.sid_of(c)
        self.assertEvent(self.tls_event(p, sid, "client"), "tls",
                         tls_fields("client", tls=TLS12, sni="mx.example.test"))
        self.assertEvent(p.close_of(sid), "close",
                         tls_close("quit", tls_client=TLS12, sni="mx.example.test"))

    def test_plaintext_ehlo_on_tls_port_closed_at_once(self):
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        c = self.client(p.port)
        rec = b.wait_conns(1)
        c.assert_open(0.2)  # no plaintext greeting
        t0 = time.monotonic()
        c.send(b"EHLO client.example\r\n")
        self.assertEqual(c.wait_closed(2), ("eof", b""))
        self.assertLess(time.monotonic() - t0, 0.5)
        sid = p.sid_of(c)
        self.assertEvent(self.one_error(p, sid), "tls_error",
                         {"side": "client", "reason": "not a TLS handshake"}, lvl="warn")
        self.assertEvent(p.close_of(sid), "close",
                         tls_close("tls_error", error="not a TLS handshake"))
        self.assertTrue(rec.closed.wait(3), "backend connection left open")
        self.assertEqual(bytes(rec.received), b"")  # the EHLO never reached it

    def test_bad_handshakes_then_good_sessions(self):
        """Truncated ClientHello (closed after 5 s), plaintext, garbage
        records, a client that rejects the certificate, a client that hangs up
        mid-handshake: each ends alone, and sessions next to them work."""
        b = self.scripted()
        p = self.start_tls_proxy(b.addr)
        hello = client_hello()
        slow = self.client(p.port)
        slow.send(hello[:len(hello) // 2])
        t_slow = time.monotonic()
        slow_sid = p.sid_of(slow)

        # garbage in a handshake record
        g = self.client(p.port)
        g.send(b"\x16\x03\x01\x00\x08" + b"\x01\x00\x00\x04" + b"\xff" * 4)
        self.assertEqual(g.wait_closed(2)[0], "eof")
        g_err = self.one_error(p, p.sid_of(g))
        self.assertEqual(p.close_of(g_err["sid"])["end"], "tls_error")
        self.assertEqual(p.close_of(g_err["sid"])["error"], g_err["reason"])

        # a client that does not trust the certificate: it alerts, mxproxy logs why
        u = self.client(p.port)
        with self.assertRaises(ssl.SSLCertVerificationError):
            client_context(ca=self.pki.untrusted.cert).wrap_socket(
                u.sock, server_hostname="mx.example.test")
        u_sid = p.sid_of(u)
        self.assertEvent(self.one_error(p, u_sid), "tls_error",
                         {"side": "client", "reason": "tlsv1 alert unknown ca"}, lvl="warn")
        self.assertEvent(p.close_of(u_sid), "close",
                         tls_close("tls_error", error="tlsv1 alert unknown ca"))

        # a whole ClientHello, then the client hangs up
        h = self.client(p.port)
        h.send(hello)
        h_sid = p.sid_of(h)
        time.sleep(0.05)
        h.close()
        self.assertIn(p.close_of(h_sid)["end"], ("client_eof_without_quit", "tls_error",
                                                 "client_reset"))

        # meanwhile a real session delivers, while the slow one still waits
        with SniSMTP_SSL("mx.example.test", HOST, p.port, timeout=5,
                         context=client_context()) as s:
            s.ehlo("client.example")
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"],
                                        b"Subject: x\r\n\r\nok\r\n"), {})
        slow.assert_open(0)
        self.assertLess(time.monotonic() - t_slow, 4.5)

        # the truncated ClientHello: closed after the 5 s handshake timeout, nothing sent
        self.assertEqual(slow.wait_closed(8), ("eof", b""))
        self.assertWithin(time.monotonic() - t_slow, 4.5, 6.5, "handshake timeout")
        self.assertEvent(self.one_error(p, slow_sid), "tls_error",
                         {"side": "client", "reason": "handshake timeout"}, lvl="warn")
        self.assertEvent(p.close_of(slow_sid), "close",
                         tls_close("tls_error", error="handshake timeout"))

        # and the proxy still serves
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.quit(c)
        self.assertEqual(len(p.wait_count(2, ev="tls", side="client")), 2)

    def test_mode_tcp_relays_inside_tls(self):
        b = self.track(EchoBackend("echo"))
        p = self.start_tls_proxy(b.addr, mode="tcp")
        c = self.tls_client(p.port, tls=False)
        b.wait_conns(1)
        c.assert_open(0.2)  # mode tcp holds the backend's first bytes for TLS too
        c.start_tls()
        self.assertEqual(c.recv_exact(len(EchoBackend.GREETING)), EchoBackend.GREETING)
        blob = os.urandom(3 * 1024 * 1024 + 17)
        got = bytearray()

        def reader():
            while len(got) < len(blob):
                got.extend(c.recv_exact(min(65536, len(blob) - len(got)), timeout=20))

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        c.sock.sendall(blob)
        t.join(30)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(blob).hexdigest())
        rec = b.wait_conns(1)
        self.assertEqual(rec.rx, len(blob))
        c.close()
        sid = p.sid_of(c)
        close = p.close_of(sid)
        self.assertEvent(close, "close", tls_close(
            "client_eof", tls_client=TLS13, sni="mx.example.test", smtp=False))
        self.assertEqual(int(close["bytes_up"]), len(blob))
        self.assertEqual(int(close["bytes_down"]), len(blob) + len(EchoBackend.GREETING))
        self.assertEqual(p.find(ev="pair"), [])


# --------------------------------------------------------------------------


class BackendTlsTest(TlsTestCase):
    """backend_tls = implicit: mxproxy is a TLS client of the mail server."""

    def test_verified_backend_with_ca_and_sni(self):
        b = self.track(TlsSmtpBackend("tlsmx", pair=self.pki.mx))
        p = self.start_smtp_proxy(b.addr, backend_tls="implicit", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 tlsmx ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"tlsmx"))
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        body = b"Subject: over TLS\r\n\r\n" + mxtest.message_body(100000)
        self.assertEqual(c.cmd(body + b"."), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.sni, "mx.example.test")
        self.assertEqual(rec.tls, "TLSv1.3/TLS_AES_256_GCM_SHA384")
        self.assertEqual(rec.bodies, [body])
        sid = p.sid_of(c)
        self.assertEvent(self.tls_event(p, sid, "backend"), "tls",
                         tls_fields("backend", sni="mx.example.test", verified=1))
        self.assertEvent(p.close_of(sid), "close", tls_close(
            "quit", tls_backend=TLS13, helo="client.example", mail_from="a@example.com",
            rcpt_ok=1, messages=1))

    def check_backend_tls_refused(self, proxy, reason, verify):
        c = self.client(proxy.port)
        self.assertEqual(c.read_reply(), BACKEND_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        sid = proxy.sid_of(c)
        f = {"side": "backend", "reason": reason}
        if verify is not None:
            f["verify"] = verify
        self.assertEvent(self.one_error(proxy, sid, "backend"), "tls_error", f, lvl="warn")
        close = self.assertPairs(proxy, sid, [])
        self.assertEvent(close, "close", tls_close(
            "tls_error", error=reason, primary_error=BACKEND_421.decode().rstrip("\r\n")))
        self.assertEqual(proxy.find(ev="tls", sid=sid), [])
        return sid

    def test_wrong_name_gets_421(self):
        b = self.track(TlsSmtpBackend("tlsmx", pair=self.pki.mx))
        p = self.start_smtp_proxy(b.addr, backend_tls="implicit", backend_ca=self.pki.ca,
                                  backend_sni="wrong.example.test")
        self.check_backend_tls_refused(p, "certificate verify failed", "hostname mismatch")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.sni, "wrong.example.test")
        self.assertEqual(rec.commands, [])  # no SMTP ever went to an unverified server

    def test_untrusted_ca_gets_421(self):
        b = self.track(TlsSmtpBackend("selfsigned", pair=self.pki.untrusted))
        p = self.start_smtp_proxy(b.addr, backend_tls="implicit", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        self.check_backend_tls_refused(p, "certificate verify failed", "self-signed certificate")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [])

    def test_backend_not_speaking_tls_gets_421(self):
        b = self.scripted()  # plaintext: its greeting is not a TLS record
        p = self.start_smtp_proxy(b.addr, backend_tls="implicit", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), BACKEND_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        sid = p.sid_of(c)
        err = self.one_error(p, sid, "backend")
        self.assertEqual(p.close_of(sid)["end"], "tls_error")
        self.assertEqual(p.close_of(sid)["error"], err["reason"])

    def test_backend_verify_off_accepts_untrusted(self):
        b = self.track(TlsSmtpBackend("selfsigned", pair=self.pki.untrusted))
        p = self.start_smtp_proxy(b.addr, backend_tls="implicit", backend_verify="off")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 selfsigned ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"selfsigned"))
        self.quit(c)
        sid = p.sid_of(c)
        self.assertEvent(self.tls_event(p, sid, "backend"), "tls",
                         tls_fields("backend", verified=0))
        self.assertEvent(p.close_of(sid), "close",
                         tls_close("quit", tls_backend=TLS13, helo="client.example"))

    def test_without_backend_sni_the_backend_address_is_verified(self):
        """backend_verify = on and no backend_sni: the certificate must be for
        the backend as configured (here the address 127.0.0.1, an iPAddress
        SAN), not just any certificate the CA signed."""
        k = self.pki
        by_ip = k.leaf("mx.example.test", ips=("127.0.0.1",), file_name="mx-ip")
        good = self.track(TlsSmtpBackend("byip", pair=by_ip))
        p = self.start_smtp_proxy(good.addr, backend_tls="implicit", backend_ca=k.ca)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 byip ESMTP\r\n")
        self.quit(c)
        self.assertEvent(self.tls_event(p, p.sid_of(c), "backend"), "tls",
                         tls_fields("backend", verified=1))
        self.assertIsNone(good.wait_conns(1).sni)  # no SNI for an address (RFC 6066)
        # a certificate of the same CA for another name only
        other = self.track(TlsSmtpBackend("other", pair=k.other))
        p2 = self.start_smtp_proxy(other.addr, backend_tls="implicit", backend_ca=k.ca)
        self.check_backend_tls_refused(p2, "certificate verify failed", "IP address mismatch")

    def test_tls_on_both_legs(self):
        b = self.track(TlsSmtpBackend("tlsmx", pair=self.pki.mx))
        p = self.start_tls_proxy(b.addr, backend_tls="implicit", backend_ca=self.pki.ca,
                                 backend_sni="mx.example.test")
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 tlsmx ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"tlsmx"))
        self.quit(c)
        sid = p.sid_of(c)
        self.assertEvent(self.tls_event(p, sid, "client"), "tls",
                         tls_fields("client", sni="mx.example.test"))
        self.assertEvent(self.tls_event(p, sid, "backend"), "tls",
                         tls_fields("backend", sni="mx.example.test", verified=1))
        self.assertEvent(p.close_of(sid), "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", tls_backend=TLS13,
            helo="client.example"))

    def test_mode_tcp_backend_tls_failure_closes(self):
        b = self.track(TlsSmtpBackend("selfsigned", pair=self.pki.untrusted))
        p = self.start_smtp_proxy(b.addr, mode="tcp", backend_tls="implicit",
                                  backend_ca=self.pki.ca, backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.wait_closed(3), ("eof", b""))  # mode tcp: no SMTP reply
        sid = p.sid_of(c)
        self.assertEvent(self.one_error(p, sid, "backend"), "tls_error",
                         {"side": "backend", "reason": "certificate verify failed",
                          "verify": "self-signed certificate"}, lvl="warn")
        self.assertEvent(p.close_of(sid), "close", tls_close(
            "tls_error", error="certificate verify failed", smtp=False))


# --------------------------------------------------------------------------


class TlsReloadTest(TlsTestCase):
    """Certificates are read at start and at every SIGHUP."""

    def live_pair(self, src):
        cert = os.path.join(self.tmpdir, "live.pem")
        key = os.path.join(self.tmpdir, "live.key")
        self.install(src, cert, key)
        return cert, key

    @staticmethod
    def install(src, cert, key):
        for a, b in ((src.cert, cert), (src.key, key)):
            shutil.copyfile(a, b + ".tmp")
            os.replace(b + ".tmp", b)

    def test_sighup_with_replaced_certificate(self):
        b = self.scripted()
        cert, key = self.live_pair(self.pki.mx)
        p = self.start_tls_proxy(b.addr, cert=cert, key=key)
        old = self.tls_client(p.port)
        self.assertEqual(old.sock.getpeercert(binary_form=True), self.pki.mx.der)
        self.assertEqual(old.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(old.cmd(b"EHLO old.example"), ehlo_reply(b"scripted"))

        new_pair = self.pki.leaf("mx.example.test", file_name="mx-renewed")
        self.install(new_pair, cert, key)
        m = p.reload(open(p.path).read())
        p.wait_event(start=m, ev="reload")
        new = self.tls_client(p.port)
        self.assertEqual(new.sock.getpeercert(binary_form=True), new_pair.der)
        self.assertEqual(new.read_reply(), b"220 scripted ESMTP\r\n")
        self.quit(new)

        # the session opened before the reload goes on, on its TLS session
        self.assertEqual(old.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(old.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(old.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(old.cmd(b"Subject: x\r\n\r\nbody\r\n."), b"250 2.0.0 queued as 1\r\n")
        self.quit(old)
        self.assertEvent(p.close_of(p.sid_of(old)), "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", helo="old.example",
            mail_from="a@example.com", rcpt_ok=1, messages=1))

    def check_reload_error(self, p, text, line_of, message):
        m = p.reload(text)
        err = p.wait_event(start=m, ev="reload_error")
        lines = [text.splitlines().index(t) + 1
                 for t in (line_of if isinstance(line_of, tuple) else (line_of,))]
        self.assertEvent(err, "reload_error", {"error": Like(".*")}, lvl="error")
        self.assertIn(err["error"], ["%s:%d: %s" % (p.path, n, message) for n in lines])
        self.assertEqual(p.find(ev="reload"), [])

    def test_sighup_with_bad_certificate_keeps_old_config(self):
        b = self.scripted()
        k = self.pki
        p = self.start_tls_proxy(b.addr)
        good = open(p.path).read()
        missing = os.path.join(self.tmpdir, "missing.pem")
        bad = good.replace("cert = %s" % k.mx.cert, "cert = %s" % missing)
        self.check_reload_error(p, bad, "cert = %s" % missing,
                                "listener 'smtp': cert %s: No such file or directory" % missing)
        mismatch = good.replace("key = %s" % k.mx.key, "key = %s" % k.other.key)
        self.check_reload_error(p, mismatch, ("cert = %s" % k.mx.cert, "key = %s" % k.other.key),
                                "listener 'smtp': key %s does not match certificate %s"
                                % (k.other.key, k.mx.cert))
        # the old certificate still serves, for new sessions too
        c = self.tls_client(p.port)
        self.assertEqual(c.sock.getpeercert(binary_form=True), k.mx.der)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.quit(c)


# --------------------------------------------------------------------------


class TlsConfigTest(unittest.TestCase):
    """Certificate and CA problems are FILE:LINE errors at -t and at start."""

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()

    def setUp(self):
        if not os.access(mxtest.binary(), os.X_OK):
            self.fail("mxproxy binary not found or not executable: %s" % mxtest.binary())
        self.dir = self.enterContext(tempfile.TemporaryDirectory(prefix="mxtest-"))
        self.garbage = os.path.join(self.dir, "garbage.pem")
        with open(self.garbage, "w") as f:
            f.write("not a certificate\n")

    def conf(self, **opts):
        text = config(listener("tls", "127.0.0.1:%d" % mxtest.free_port(), "127.0.0.1:25",
                               **opts))
        path = os.path.join(self.dir, "mx.conf")
        with open(path, "w") as f:
            f.write(text)
        return path, text.splitlines()

    def check(self, opts, line_of, message, start_too=False):
        """-t exits 1 printing exactly 'PATH:LINE: message'; LINE is that of
        the first config line equal to line_of (one of the texts given)."""
        path, lines = self.conf(**opts)
        want_lines = [lines.index(t) + 1 for t in
                      (line_of if isinstance(line_of, tuple) else (line_of,))]
        runs = [["-t", "-c", path]] + ([["-c", path]] if start_too else [])
        for args in runs:
            r = subprocess.run([mxtest.binary()] + args, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)
            err = r.stderr.decode()
            self.assertEqual(r.returncode, 1, err)
            m = re.fullmatch(r"(.*?):(\d+): (.+)\n", err)
            self.assertIsNotNone(m, "stderr must be exactly 'PATH:LINE: message\\n': %r" % err)
            self.assertEqual(m.group(1), path)
            self.assertIn(int(m.group(2)), want_lines, "%s\n%s" % (err, "\n".join(lines)))
            if isinstance(message, Like):
                self.assertTrue(message.matches(m.group(3)), "%r is not %r" % (err, message))
            else:
                self.assertEqual(m.group(3), message)

    def test_cert_missing(self):
        k = self.pki
        self.check(dict(client_tls="implicit", cert="/nonexistent/c.pem", key=k.mx.key),
                   "cert = /nonexistent/c.pem",
                   "listener 'tls': cert /nonexistent/c.pem: No such file or directory",
                   start_too=True)

    def test_cert_not_pem(self):
        k = self.pki
        self.check(dict(client_tls="implicit", cert=self.garbage, key=k.mx.key),
                   "cert = %s" % self.garbage,
                   Like(r"listener 'tls': cert %s: .+" % re.escape(self.garbage)))

    def test_key_does_not_match(self):
        k = self.pki
        self.check(dict(client_tls="implicit", cert=k.mx.cert, key=k.other.key),
                   ("cert = %s" % k.mx.cert, "key = %s" % k.other.key),
                   "listener 'tls': key %s does not match certificate %s"
                   % (k.other.key, k.mx.cert), start_too=True)

    def test_key_missing_reported_at_its_line(self):
        k = self.pki
        self.check(dict(client_tls="implicit", cert=k.mx.cert, key="/nonexistent/k.pem"),
                   "key = /nonexistent/k.pem",
                   "listener 'tls': key /nonexistent/k.pem: No such file or directory")

    def test_second_pair_errors_reported_at_its_lines(self):
        k = self.pki
        self.check(dict(client_tls="implicit", cert=[k.mx.cert, "/nonexistent/c2.pem"],
                        key=[k.mx.key, k.other.key]),
                   "cert = /nonexistent/c2.pem",
                   "listener 'tls': cert /nonexistent/c2.pem: No such file or directory")
        self.check(dict(client_tls="implicit", cert=[k.mx.cert, k.other.cert],
                        key=[k.mx.key, k.mx.key]),
                   ("cert = %s" % k.other.cert, "key = %s" % k.mx.key),
                   "listener 'tls': key %s does not match certificate %s"
                   % (k.mx.key, k.other.cert))

    def test_backend_ca_missing(self):
        self.check(dict(mode="smtp", backend_tls="implicit", backend_ca="/nonexistent/ca.pem"),
                   "backend_ca = /nonexistent/ca.pem",
                   "listener 'tls': backend_ca /nonexistent/ca.pem: No such file or directory",
                   start_too=True)

    def test_cert_needs_key_and_client_tls(self):
        k = self.pki
        self.check(dict(client_tls="implicit"), "client_tls = implicit",
                   "listener 'tls': client_tls = implicit needs a 'cert' and a 'key'")
        self.check(dict(cert=k.mx.cert, key=k.mx.key), "cert = %s" % k.mx.cert,
                   "listener 'tls': 'cert' needs client_tls = implicit or starttls")


# --------------------------------------------------------------------------


class StarttlsPassthroughTest(TlsTestCase):
    """mode smtp without TLS termination: STARTTLS goes to the backend, which
    really does TLS; the client must see the backend's certificate."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.backend_pair = cls.pki.leaf("backend.example.test", file_name="backend")

    def backend(self):
        return self.track(TlsSmtpBackend("realtls", pair=self.backend_pair, tls="starttls"))

    def test_s_client_starttls_sees_backend_certificate(self):
        b = self.backend()
        p = self.start_smtp_proxy(b.addr, client_tls="passthrough")
        rc, out, err = s_client(p.port, "-starttls", "smtp", "-name", "client.example",
                                "-servername", "backend.example.test",
                                "-verify_return_error", "-CAfile", self.pki.ca,
                                "-verify_hostname", "backend.example.test")
        self.assertEqual(rc, 0, err)
        self.assertIn("Peer certificate: CN = backend.example.test\n", err)
        self.assertIn("Verification: OK\n", err)
        self.assertEqual(out, ehlo_reply(b"realtls", in_tls=True) + b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.sni, "backend.example.test")
        self.assertEqual(rec.commands, [b"EHLO client.example", b"STARTTLS", b"EHLO x",
                                        b"QUIT"])
        sid = p.wait_event(ev="close")["sid"]
        self.assertEqual(len(p.find(ev="starttls_passthrough", sid=sid)), 1)
        self.assertEqual(p.find(ev="tls"), [])  # mxproxy terminated nothing
        self.assertEqual(p.find(ev="starttls_injection"), [])
        self.assertEqual(p.find(ev="pair", sid=sid)[-1]["cmd"], "STARTTLS")

    def test_smtplib_starttls_passthrough(self):
        b = self.backend()
        p = self.start_smtp_proxy(b.addr)  # client_tls = off: the same passthrough
        body = b"Subject: e2e\r\n\r\n" + mxtest.message_body(50000)
        with smtplib.SMTP(HOST, p.port, local_hostname="client.example", timeout=10) as s:
            s.ehlo()
            self.assertIn("starttls", s.esmtp_features)
            ctx = client_context(check_hostname=False)  # smtplib sends no name for an IP
            self.assertEqual(s.starttls(context=ctx)[0], 220)
            self.assertEqual(s.sock.getpeercert(binary_form=True), self.backend_pair.der)
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], body), {})
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.bodies, [body])
        self.assertEqual(rec.commands[:3], [b"ehlo client.example", b"STARTTLS",
                                            b"ehlo client.example"])

    def test_injection_after_starttls_never_reaches_backend(self):
        b = self.backend()
        p = self.start_smtp_proxy(b.addr, client_tls="passthrough")
        c = self.tls_client(p.port, server_hostname="backend.example.test", tls=False)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"realtls"))
        c.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(c.read_reply(), b"220 2.0.0 Ready to start TLS\r\n")
        c.start_tls()
        self.assertEqual(c.sock.getpeercert(binary_form=True), self.backend_pair.der)
        self.assertEqual(c.cmd(b"EHLO client.example"), ehlo_reply(b"realtls", in_tls=True))
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(c.cmd(b"Subject: x\r\n\r\nin TLS\r\n."), b"250 2.0.0 queued as 1\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        c.close()
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.injected, b"")
        self.assertEqual(rec.commands, [b"EHLO client.example", b"STARTTLS",
                                        b"EHLO client.example", b"MAIL FROM:<a@example.com>",
                                        b"RCPT TO:<b@example.com>", b"DATA", b"QUIT"])
        self.assertEqual(rec.bodies, [b"Subject: x\r\n\r\nin TLS\r\n"])
        sid = p.sid_of(c)
        p.close_of(sid)
        inj = p.find(ev="starttls_injection", sid=sid)
        self.assertEqual(len(inj), 1)
        self.assertEvent(inj[0], "starttls_injection", {"bytes": 6}, lvl="warn")
        self.assertEqual(len(p.find(ev="starttls_passthrough", sid=sid)), 1)


if __name__ == "__main__":
    mxtest.main()
