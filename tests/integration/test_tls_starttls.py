"""STARTTLS termination in mode smtp, on both legs.

client_tls = starttls: mxproxy offers STARTTLS in the backend's EHLO reply
(every other line, the first included, byte for byte), answers STARTTLS
itself with 220 (the backend never sees it), handshakes with the client and
answers the client's new EHLO itself (ev=pair local=1): the backend's reply
to the first EHLO without STARTTLS, so the backend hears one EHLO per session
(a HELO gets that reply's first line as "250 <text>"). A backend that had no
EHLO/HELO yet, or whose reply was too long to keep, hears it.
require_tls = on answers MAIL, RCPT, DATA and AUTH before TLS with 530 5.7.0.
Plaintext sent after STARTTLS in the same segment is dropped
(ev=starttls_injection), never executed inside TLS.

backend_tls = starttls: the greeting goes to the client at once; at the
client's first EHLO mxproxy sends its own EHLO and STARTTLS to the backend,
handshakes, then sends the client's EHLO inside TLS: the client sees one
greeting and one EHLO reply. A backend that does not offer STARTTLS, or
whose certificate does not verify, gets the client a 421 4.7.0.

Real clients: openssl s_client -starttls smtp, swaks --tls, smtplib.starttls().
"""

import smtplib
import ssl
import subprocess
import time

import mxtest
from mxtest import (HOST, MS, UINT, ADDR, TlsClient, TlsSmtpBackend, client_context,
                    pair, pki)

TLS13 = "TLSv1.3/TLS_AES_256_GCM_SHA384"
READY = b"220 2.0.0 Ready to start TLS\r\n"
MUST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
BACKEND_421 = b"421 4.7.0 mxproxy: TLS with the mail server failed, try again later\r\n"
NO_STARTTLS_EXT = ("PIPELINING", "8BITMIME", "CHUNKING", "AUTH PLAIN LOGIN")
EHLO = b"EHLO client.example"


def ehlo_lines(name, exts):
    lines = [name] + list(exts)
    return b"".join(b"250-%s\r\n" % l.encode() for l in lines[:-1]) + b"250 %s\r\n" % \
        lines[-1].encode()


# The backend's reply (no STARTTLS), and what the client must see before TLS:
# the same lines with "250-STARTTLS" as the second one.
BACKEND_EHLO = ehlo_lines("scripted", NO_STARTTLS_EXT)
OFFERED_EHLO = ehlo_lines("scripted", ("STARTTLS",) + NO_STARTTLS_EXT)


# Close-line fields, the TLS ones included: one builder for every test file.
tls_close = mxtest.smtp_close


def run(args, input=b"", timeout=20):
    r = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def client_hello():
    """The bytes of a real ClientHello, made with a memory BIO."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(check_hostname=False).wrap_bio(inc, out,
                                                        server_hostname="mx.example.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def features(ehlo_reply_bytes):
    """The capability keywords of an EHLO reply (first line excluded), upper case."""
    lines = ehlo_reply_bytes.split(b"\r\n")[1:-1]
    return [l[4:].split(b" ")[0].upper().decode() for l in lines]


class StarttlsTestCase(mxtest.ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()

    def starttls_proxy(self, backends, **opts):
        opts.setdefault("client_tls", "starttls")
        opts.setdefault("cert", self.pki.mx.cert)
        opts.setdefault("key", self.pki.mx.key)
        return self.start_smtp_proxy(backends, **opts)

    def plain_backend(self, ext=NO_STARTTLS_EXT, **kw):
        return self.scripted(ext=ext, **kw)

    def tls_client(self, port):
        return self.track(TlsClient(port, client_context(), server_hostname="mx.example.test",
                                    tls=False))

    def quit(self, c):
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))

    def plain_session(self, **opts):
        """A plain backend, a starttls proxy with opts in front of it and a client that read
        the greeting and sent EHLO (STARTTLS offered); returns (backend, proxy, client)."""
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr, **opts)
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), OFFERED_EHLO)
        return b, p, c

    def to_tls(self, c, ehlo_before=OFFERED_EHLO):
        """Greeting, EHLO (STARTTLS offered), STARTTLS answered by mxproxy,
        handshake."""
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), ehlo_before)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.sock.getpeercert(binary_form=True), self.pki.mx.der)


# --------------------------------------------------------------------------


class ClientStarttlsTest(StarttlsTestCase):

    def test_offered_answered_locally_and_withdrawn_inside_tls(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c)
        c.assert_open(0.2)  # no second greeting after the handshake
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)  # the backend's own bytes again
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        body = b"Subject: starttls\r\n\r\n" + mxtest.message_body(100000)
        self.assertEqual(c.cmd(body + b"."), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"MAIL FROM:<a@example.com>",
                                        b"RCPT TO:<b@example.com>", b"DATA", b"QUIT"])
        self.assertEqual(rec.bodies, [body])
        sid = p.sid_of(c)
        tls = p.wait_count(1, ev="tls", sid=sid)
        self.assertEqual(len(tls), 1)
        self.assertEvent(tls[0], "tls", {"side": "client", "tls": TLS13,
                                         "sni": "mx.example.test"})
        close = self.assertPairs(p, sid, [
            pair("<greeting>", 220, "scripted ESMTP"),
            pair("EHLO client.example", 250, "scripted", lines=UINT),
            pair("STARTTLS", 220, "Ready to start TLS", esc="2.0.0", local=1),
            pair("EHLO client.example", 250, "scripted", lines=5, local=1),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("DATA", 354, "End data with <CR><LF>.<CR><LF>"),
            pair(".", 250, "queued as 1", esc="2.0.0", size=UINT),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", helo="client.example",
            mail_from="a@example.com", rcpt_ok=1, messages=1))
        self.assertEqual(p.find(ev="starttls_passthrough"), [])
        self.assertEqual(p.find(ev="starttls_injection"), [])

    def test_single_line_ehlo_made_multi_line(self):
        b = self.plain_backend(ext=())
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c, ehlo_before=b"250-scripted\r\n250 STARTTLS\r\n")
        self.assertEqual(c.cmd(EHLO), b"250 scripted\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"QUIT"])

    def test_backend_offering_starttls_is_not_offered_twice_nor_inside_tls(self):
        b = self.scripted()  # offers STARTTLS as its last line
        backend_ehlo = ehlo_lines("scripted", NO_STARTTLS_EXT + ("STARTTLS",))
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c, ehlo_before=backend_ehlo)  # unchanged: one STARTTLS
        # inside TLS the STARTTLS line goes, and the line before it ends the reply
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"QUIT"])
        self.assertEqual(bytes(rec.opaque), b"")  # the backend never entered STARTTLS

    def test_starttls_inside_tls_is_refused_locally(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c)
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        again = c.cmd(b"STARTTLS")
        self.assertRegex(again, rb"^503 5\.5\.1 [^\r\n]+\r\n$")
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")  # the session goes on
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"NOOP", b"QUIT"])

    def test_require_tls_530_before_starttls(self):
        b, p, c = self.plain_session(require_tls="on")
        for line in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA",
                     b"AUTH PLAIN AGFAYg==", b"mail from:<lower@example.com>"):
            with self.subTest(cmd=line):
                self.assertEqual(c.cmd(line), MUST)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")  # not a transaction command
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"NOOP", b"MAIL FROM:<a@example.com>", b"QUIT"])
        self.assertEqual(rec.auth_lines, [])
        sid = p.sid_of(c)
        p.close_of(sid)
        local = [e for e in p.find(ev="pair", sid=sid) if e.get("code") == "530"]
        self.assertEqual(len(local), 5, [e["_raw"] for e in local])
        for e in local:
            self.assertEqual((e["esc"], e["reply"], e.get("local")),
                             ("5.7.0", "Must issue a STARTTLS command first", "1"), e["_raw"])
        self.assertEqual(local[3]["cmd"], "AUTH PLAIN [redacted]")  # never the credentials

    def test_require_tls_bdat_refused_and_its_chunk_swallowed(self):
        b, p, c = self.plain_session(require_tls="on")
        c.send(b"BDAT 10 LAST\r\nSTARTTLS\r\n")  # the chunk is data, not a command
        self.assertEqual(c.read_reply(), MUST)
        c.assert_open(0.3)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"NOOP", b"QUIT"])
        self.assertNotIsInstance(c.sock, ssl.SSLSocket)

    # A local 530 ends the parser's wait (DATA, AUTH): the commands the client
    # pipelined behind it are parsed, never left waiting.

    def pipelined_after_local(self, data, want):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr, require_tls="on")
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(data)  # one write, before the backend answered the EHLO
        self.assertEqual(c.read_reply(), OFFERED_EHLO)
        for reply in want:
            self.assertEqual(c.read_reply(), reply)
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"NOOP", b"QUIT"])
        self.assertEqual(rec.auth_lines, [])
        return p, p.sid_of(c)

    def test_require_tls_pipelined_data_then_noop(self):
        p, sid = self.pipelined_after_local(EHLO + b"\r\nDATA\r\nNOOP\r\n",
                                            [MUST, b"250 2.0.0 ok\r\n"])
        p.close_of(sid)
        cmds = [(e["cmd"], e["code"], e.get("local")) for e in p.find(ev="pair", sid=sid)]
        self.assertEqual(cmds, [("<greeting>", "220", None), ("EHLO client.example", "250", None),
                                ("DATA", "530", "1"), ("NOOP", "250", None),
                                ("QUIT", "221", None)])

    def test_require_tls_pipelined_auth_then_noop(self):
        self.pipelined_after_local(EHLO + b"\r\nAUTH PLAIN xxx\r\nNOOP\r\n",
                                   [MUST, b"250 2.0.0 ok\r\n"])

    def test_require_tls_pipelined_bdat_chunk_then_noop(self):
        self.pipelined_after_local(EHLO + b"\r\nBDAT 5 LAST\r\nNOOP\rNOOP\r\n",
                                   [MUST, b"250 2.0.0 ok\r\n"])

    def test_require_tls_bdat_after_a_local_refusal(self):
        self.pipelined_after_local(EHLO + b"\r\nDATA\r\nBDAT 5 LAST\r\nNOOP\rNOOP\r\n",
                                   [MUST, MUST, b"250 2.0.0 ok\r\n"])

    def test_injection_after_starttls_dropped(self):
        b, p, c = self.plain_session()
        c.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(c.read_reply(), READY)
        c.start_tls()  # fails if a plaintext reply to RSET came first
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(c.cmd(b"Subject: x\r\n\r\nin TLS\r\n."), b"250 2.0.0 queued as 1\r\n")
        c.assert_open(0.1)  # and no late reply to the RSET either
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"MAIL FROM:<a@example.com>",
                                        b"RCPT TO:<b@example.com>", b"DATA", b"QUIT"])
        self.assertEqual(rec.bodies, [b"Subject: x\r\n\r\nin TLS\r\n"])
        sid = p.sid_of(c)
        p.close_of(sid)
        inj = p.find(ev="starttls_injection", sid=sid)
        self.assertEqual(len(inj), 1)
        self.assertEvent(inj[0], "starttls_injection", {"bytes": 6}, lvl="warn")
        self.assertEqual(p.find(ev="pair", sid=sid, cmd="RSET"), [])

    def test_pipelined_ehlo_and_starttls_answered_in_order(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr, require_tls="on")
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(b"NOOP\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 ok\r\n")
        self.assertEqual(c.read_reply(), MUST)  # mxproxy's, between the backend's two
        self.assertEqual(c.read_reply(), b"250 2.0.0 ok\r\n")
        c.send(EHLO + b"\r\nSTARTTLS\r\n")  # RFC 3207: STARTTLS last in a group
        self.assertEqual(c.read_reply(), OFFERED_EHLO)
        self.assertEqual(c.read_reply(), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [b"NOOP", b"NOOP", EHLO, b"QUIT"])
        sid = p.sid_of(c)
        p.close_of(sid)
        self.assertEqual(p.find(ev="starttls_injection", sid=sid), [])
        cmds = [(e["cmd"], e["code"], e.get("local")) for e in p.find(ev="pair", sid=sid)]
        self.assertEqual(cmds, [("<greeting>", "220", None), ("NOOP", "250", None),
                                ("MAIL FROM:<a@example.com>", "530", "1"),
                                ("NOOP", "250", None), ("EHLO client.example", "250", None),
                                ("STARTTLS", "220", "1"), ("EHLO client.example", "250", "1"),
                                ("QUIT", "221", None)])

    def test_pipelined_rset_starttls_then_ehlo_noop_in_one_record(self):
        """The 220 goes out after the backend's reply to RSET: the first read
        inside TLS is all commands, none dropped as injected."""
        b, p, c = self.plain_session()
        c.send(b"RSET\r\nSTARTTLS\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 ok\r\n")
        self.assertEqual(c.read_reply(), READY)
        c.start_tls()
        c.send(EHLO + b"\r\nNOOP\r\n")  # one TLS record
        self.assertEqual(c.read_reply(), BACKEND_EHLO)
        self.assertEqual(c.read_reply(), b"250 2.0.0 ok\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"RSET", b"NOOP", b"QUIT"])
        sid = p.sid_of(c)
        close = self.assertPairs(p, sid, [
            pair("<greeting>", 220, "scripted ESMTP"),
            pair("EHLO client.example", 250, "scripted", lines=5),
            pair("RSET", 250, "ok", esc="2.0.0"),
            pair("STARTTLS", 220, "Ready to start TLS", esc="2.0.0", local=1, pipelined=1),
            pair("EHLO client.example", 250, "scripted", lines=5, local=1),
            pair("NOOP", 250, "ok", esc="2.0.0"),  # the EHLO before it was answered at once
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEqual(close["end"], "quit")
        self.assertEqual(p.find(ev="starttls_injection"), [])

    def test_helo_inside_tls_gets_the_first_line(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr, transcript="full")
        c = self.tls_client(p.port)
        self.to_tls(c)
        self.assertEqual(c.cmd(b"HELO client.example"), b"250 scripted\r\n")
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands,
                         [EHLO, b"MAIL FROM:<a@example.com>", b"QUIT"])
        sid = p.sid_of(c)
        p.close_of(sid)
        ev = p.find(ev="pair", sid=sid, cmd="HELO client.example")
        self.assertEqual(len(ev), 1)
        self.assertEvent(ev[0], "pair", {"cmd": "HELO client.example", "code": 250,
                                         "reply": "scripted", "lines": 1, "ms": MS,
                                         "pipelined": 0, "local": 1})
        self.assertIn("250 scripted", [e["text"] for e in p.find(ev="line", sid=sid,
                                                                  dir="proxy")])

    def test_helo_before_tls_answers_ehlo_inside_tls(self):
        """HELO, then STARTTLS anyway: the EHLO inside TLS gets the HELO reply."""
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"HELO client.example"), b"250 scripted\r\n")  # as it came
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), b"250 scripted\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [b"HELO client.example", b"QUIT"])

    def test_ehlo_inside_tls_relayed_when_the_backend_had_none(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"STARTTLS"), READY)  # no EHLO first
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"QUIT"])
        sid = p.sid_of(c)
        p.close_of(sid)
        ev = p.find(ev="pair", sid=sid, cmd="EHLO client.example")
        self.assertEqual([e.get("local") for e in ev], [None])

    def test_second_ehlo_inside_tls_is_relayed(self):
        """Only the EHLO RFC 3207 asks for is answered by mxproxy; one the
        client repeats inside TLS is the backend's to answer."""
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c)
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.assertEqual(c.cmd(b"EHLO again.example"),
                         ehlo_lines("scripted", NO_STARTTLS_EXT))
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, b"EHLO again.example", b"QUIT"])

    def test_ehlo_reply_too_long_to_keep_is_relayed_again(self):
        """An EHLO reply over 4096 bytes is neither rewritten nor kept: the
        EHLO inside TLS goes to the backend, which answers it."""
        ext = NO_STARTTLS_EXT + tuple("X-LONG-%03d %s" % (i, "v" * 60) for i in range(70))
        b = self.plain_backend(ext=ext)
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        big = ehlo_lines("scripted", ext)
        self.assertGreater(len(big), 4096)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), big)  # as it came: STARTTLS not offered
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), big)
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands, [EHLO, EHLO, b"QUIT"])

    def test_starttls_refused_during_a_transaction(self):
        """The backend never sees the TLS, so it would keep a transaction
        that RFC 3207 ends: STARTTLS is refused while one is open, as
        Postfix and OpenSMTPD refuse it themselves."""
        b, p, c = self.plain_session()
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"STARTTLS"),
                         b"503 5.5.1 Error: MAIL transaction in progress\r\n")
        self.assertEqual(c.cmd(b"RSET"), b"250 2.0.0 ok\r\n")  # still plaintext
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), BACKEND_EHLO)
        self.assertEqual(c.cmd(b"MAIL FROM:<b@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands,
                         [EHLO, b"MAIL FROM:<a@example.com>", b"RSET",
                          b"MAIL FROM:<b@example.com>", b"QUIT"])
        sid = p.sid_of(c)
        self.assertPairs(p, sid, [
            pair("<greeting>", 220, "scripted ESMTP"),
            pair("EHLO client.example", 250, "scripted", lines=5),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("STARTTLS", 503, "Error: MAIL transaction in progress", esc="5.5.1", local=1),
            pair("RSET", 250, "ok", esc="2.0.0"),
            pair("STARTTLS", 220, "Ready to start TLS", esc="2.0.0", local=1),
            pair("EHLO client.example", 250, "scripted", lines=5, local=1),
            pair("MAIL FROM:<b@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])

    def test_pipelined_inside_tls_answered_in_order(self):
        """The EHLO mxproxy answers waits for the replies before it."""
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.tls_client(p.port)
        self.to_tls(c)
        c.send(b"NOOP\r\n" + EHLO + b"\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 ok\r\n")
        self.assertEqual(c.read_reply(), BACKEND_EHLO)
        self.assertEqual(c.read_reply(), b"250 2.1.0 sender ok\r\n")
        self.quit(c)
        self.assertEqual(b.wait_conns(1).commands,
                         [EHLO, b"NOOP", b"MAIL FROM:<a@example.com>", b"QUIT"])
        sid = p.sid_of(c)
        p.close_of(sid)
        cmds = [(e["cmd"], e["code"], e["pipelined"], e.get("local"))
                for e in p.find(ev="pair", sid=sid)][3:]
        self.assertEqual(cmds, [("NOOP", "250", "0", None),
                                ("EHLO client.example", "250", "1", "1"),
                                ("MAIL FROM:<a@example.com>", "250", "1", None),
                                ("QUIT", "221", "0", None)])

    def test_xclient_new_session_then_one_ehlo_inside_it(self):
        """xclient = on: XCLIENT starts a new backend session, which hears the
        client's EHLO once; the EHLO inside TLS is answered from that reply."""
        b = self.plain_backend(ext=NO_STARTTLS_EXT + ("XCLIENT ADDR PORT PROTO HELO",))
        p = self.starttls_proxy(b.addr, xclient="on")
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        before = c.cmd(EHLO)
        self.assertIn(b"250-STARTTLS\r\n", before)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), before.replace(b"250-STARTTLS\r\n", b""))
        self.quit(c)
        commands = b.wait_conns(1).commands
        x = max(i for i, line in enumerate(commands) if line.startswith(b"XCLIENT "))
        self.assertEqual(commands[x + 1:], [EHLO, b"QUIT"], commands)
        sid = p.sid_of(c)
        p.close_of(sid)
        ehlos = [e.get("local") for e in p.find(ev="pair", sid=sid, cmd="EHLO client.example")]
        self.assertEqual(ehlos, [None, "1"])

    def test_plaintext_after_220_is_not_a_handshake(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), OFFERED_EHLO)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.send(b"MAIL FROM:<a@example.com>\r\n")  # a client that ignores the 220
        self.assertEqual(c.wait_closed(2), ("eof", b""))
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="tls_error", sid=sid)
        self.assertEqual(len(err), 1)
        self.assertEvent(err[0], "tls_error", {"side": "client",
                                               "reason": "not a TLS handshake"}, lvl="warn")
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["error"]), ("tls_error", "not a TLS handshake"))
        self.assertEqual(b.wait_conns(1).commands, [EHLO])

    def test_truncated_handshake_after_starttls_times_out(self):
        """The 5 s limit on a client's TLS handshake also holds after STARTTLS,
        counted from the 220, not from the connect; idle_timeout is much longer."""
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr, idle_timeout="30s")
        c = self.client(p.port, timeout=10)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        time.sleep(1.0)  # the session is older than its handshake
        self.assertEqual(c.cmd(EHLO), OFFERED_EHLO)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        t0 = time.monotonic()
        hello = client_hello()
        c.send(hello[:len(hello) // 2])
        self.assertEqual(c.wait_closed(8), ("eof", b""))
        self.assertWithin(time.monotonic() - t0, 4.5, 6.5, "handshake timeout after STARTTLS")
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="tls_error", sid=sid)
        self.assertEvent(err[0], "tls_error", {"side": "client", "reason": "handshake timeout"},
                         lvl="warn")
        self.assertEqual(p.close_of(sid)["end"], "tls_error")

    def test_s_client_starttls_smtp(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        rc, out, err = run(["openssl", "s_client", "-connect", "%s:%d" % (HOST, p.port),
                            "-starttls", "smtp", "-name", "client.example", "-nocommands",
                            "-brief", "-crlf", "-ign_eof", "-servername", "mx.example.test",
                            "-verify_return_error", "-CAfile", self.pki.ca,
                            "-verify_hostname", "mx.example.test"],
                           input=b"EHLO x\nQUIT\n")
        self.assertEqual(rc, 0, err)
        self.assertIn("Peer certificate: CN = mx.example.test\n", err)
        self.assertIn("Verification: OK\n", err)
        self.assertIn("Protocol version: TLSv1.3\n", err)
        self.assertEqual(out, ehlo_lines("scripted", NO_STARTTLS_EXT) + b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [b"EHLO client.example", b"QUIT"])

    def test_swaks_tls_verified(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        rc, out, err = run(["swaks", "--server", "%s:%d" % (HOST, p.port), "--tls",
                            "--tls-verify", "--tls-ca-path", self.pki.ca,
                            "--tls-sni", "mx.example.test", "--helo", "client.example",
                            "--from", "a@example.com", "--to", "b@example.com",
                            "--body", "over STARTTLS"])
        out = out.decode()
        self.assertEqual(rc, 0, out + err)
        self.assertIn("<-  220 scripted ESMTP\n", out)
        self.assertIn("<-  250-STARTTLS\n", out)
        self.assertIn("<-  220 2.0.0 Ready to start TLS\n", out)
        self.assertIn("=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384", out)
        self.assertIn("<~  250 2.0.0 queued as 1\n", out)
        self.assertNotIn("<~  250-STARTTLS", out)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(len(rec.bodies), 1)
        self.assertIn(b"over STARTTLS", rec.bodies[0])
        self.assertNotIn(b"STARTTLS", rec.commands)

    def test_smtplib_capabilities_plus_then_minus_starttls(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)
        body = b"Subject: smtplib\r\n\r\n" + mxtest.message_body(50000)
        with smtplib.SMTP(HOST, p.port, local_hostname="client.example", timeout=10) as s:
            code, _ = s.ehlo()
            self.assertEqual(code, 250)
            before = sorted(s.esmtp_features)
            ctx = client_context(check_hostname=False)  # smtplib sends no name for an IP
            self.assertEqual(s.starttls(context=ctx)[0], 220)
            self.assertEqual(s.sock.getpeercert(binary_form=True), self.pki.mx.der)
            s.ehlo()
            after = sorted(s.esmtp_features)
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], body), {})
        backend = sorted(f.split(" ")[0].lower() for f in NO_STARTTLS_EXT)
        self.assertEqual(before, sorted(backend + ["starttls"]))
        self.assertEqual(after, backend)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.bodies, [body])
        self.assertNotIn(b"STARTTLS", [c.upper() for c in rec.commands])

    def test_plaintext_session_without_starttls_still_works(self):
        b = self.plain_backend()
        p = self.starttls_proxy(b.addr)  # require_tls off: TLS is offered, not imposed
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), OFFERED_EHLO)
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.quit(c)
        close = p.close_of(p.sid_of(c))
        self.assertNotIn("tls_client", close)


# --------------------------------------------------------------------------


class BackendStarttlsTest(StarttlsTestCase):

    def tls_backend(self, pair=None, **kw):
        """A backend doing STARTTLS; its 220 differs from mxproxy's own, so a
        leaked one shows."""
        kw.setdefault("ready", b"220 2.0.0 realtls says go ahead\r\n")
        return self.track(TlsSmtpBackend("realtls", pair=pair or self.pki.mx, tls="starttls",
                                         **kw))

    def test_greeting_at_once_then_one_ehlo_reply_inside_tls(self):
        b = self.tls_backend()
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        t0 = time.monotonic()
        self.assertEqual(c.read_reply(1.0), b"220 realtls ESMTP\r\n")
        self.assertLess(time.monotonic() - t0, 0.5)
        self.assertEqual(c.cmd(EHLO), ehlo_lines("realtls", NO_STARTTLS_EXT))
        c.assert_open(0.2)  # exactly one EHLO reply
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        body = b"Subject: to the backend over STARTTLS\r\n\r\n" + mxtest.message_body(80000)
        self.assertEqual(c.cmd(body + b"."), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands[0][:5], b"EHLO ")  # mxproxy's own EHLO, in plaintext
        self.assertEqual(rec.commands[1:], [b"STARTTLS", EHLO, b"MAIL FROM:<a@example.com>",
                                            b"RCPT TO:<b@example.com>", b"DATA", b"QUIT"])
        self.assertEqual(rec.injected, b"")
        self.assertEqual(rec.sni, "mx.example.test")
        self.assertEqual(rec.tls, TLS13)
        self.assertEqual(rec.bodies, [body])
        sid = p.sid_of(c)
        tls = p.wait_count(1, ev="tls", sid=sid)
        self.assertEqual(len(tls), 1)
        self.assertEvent(tls[0], "tls", {"side": "backend", "tls": TLS13,
                                         "sni": "mx.example.test", "verified": 1})
        pairs = p.find(ev="pair", sid=sid)
        self.assertEqual([e["cmd"] for e in pairs if e["cmd"] in ("<greeting>", EHLO.decode())],
                         ["<greeting>", EHLO.decode()], [e["_raw"] for e in pairs])
        self.assertEvent(p.close_of(sid), "close", tls_close(
            "quit", tls_backend=TLS13, helo="client.example", mail_from="a@example.com",
            rcpt_ok=1, messages=1))

    def test_backend_without_starttls_gets_421(self):
        b = self.plain_backend()  # no STARTTLS in its EHLO reply
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        reply = c.cmd(EHLO)
        self.assertRegex(reply, rb"^421 4\.7\.0 [^\r\n]+\r\n$")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        # only mxproxy's own EHLO (it uses the client's name): no STARTTLS, and
        # nothing else ever reaches a backend that cannot do TLS
        self.assertEqual(rec.commands, [EHLO])
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="tls_error", sid=sid)
        self.assertEqual(len(err), 1)
        self.assertEqual((err[0]["lvl"], err[0]["side"]), ("warn", "backend"), err[0]["_raw"])
        self.assertIn("STARTTLS", err[0]["reason"], err[0]["_raw"])
        close = p.close_of(sid)
        self.assertEqual(close["end"], "tls_error", close["_raw"])
        self.assertEqual(close["primary_error"], reply.decode().rstrip("\r\n"), close["_raw"])

    def test_backend_starttls_untrusted_gets_421(self):
        b = self.tls_backend(pair=self.pki.untrusted)
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        reply = c.cmd(EHLO)
        self.assertRegex(reply, rb"^421 4\.7\.0 [^\r\n]+\r\n$")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"STARTTLS"])  # mxproxy's, then the handshake
        self.assertIsNotNone(rec.tls_error)
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="tls_error", sid=sid)
        self.assertEqual(len(err), 1)
        self.assertEvent(err[0], "tls_error", {"side": "backend",
                                               "reason": "certificate verify failed",
                                               "verify": "self-signed certificate"}, lvl="warn")
        self.assertEqual(p.close_of(sid)["end"], "tls_error")

    def test_swaks_through_backend_starttls(self):
        b = self.tls_backend()
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        rc, out, err = run(["swaks", "--server", "%s:%d" % (HOST, p.port),
                            "--helo", "client.example", "--from", "a@example.com",
                            "--to", "b@example.com", "--body", "plain to mxproxy"])
        out = out.decode()
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(out.count("<-  220 realtls ESMTP\n"), 1)
        self.assertIn("<-  250 2.0.0 queued as 1\n", out)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.tls, TLS13)
        self.assertEqual(len(rec.bodies), 1)

    def test_starttls_on_both_legs(self):
        b = self.tls_backend()
        p = self.starttls_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                backend_sni="mx.example.test")
        c = self.tls_client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        offered = ehlo_lines("realtls", ("STARTTLS",) + NO_STARTTLS_EXT)
        self.assertEqual(c.cmd(EHLO), offered)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(EHLO), ehlo_lines("realtls", NO_STARTTLS_EXT))
        self.quit(c)
        sid = p.sid_of(c)
        sides = sorted(e["side"] for e in p.wait_count(2, ev="tls", sid=sid))
        self.assertEqual(sides, ["backend", "client"])
        self.assertEvent(p.close_of(sid), "close", tls_close(
            "quit", tls_client=TLS13, sni="mx.example.test", tls_backend=TLS13,
            helo="client.example"))
        rec = b.wait_conns(1)
        self.assertEqual(rec.commands.count(b"STARTTLS"), 1)  # mxproxy's, not the client's


if __name__ == "__main__":
    mxtest.main()
