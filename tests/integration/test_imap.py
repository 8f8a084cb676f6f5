"""Mode imap in front of a real Dovecot (mxtest.PrivateDovecot), with real clients: Python's
imaplib, curl (imap://, --ssl-reqd, imaps://), mbsync (isync) and raw sockets.

Every test checks exact bytes on the wire and exact log fields: ev=pair proto=imap per tagged
response (LOGIN, AUTHENTICATE and literals never logged, literal octets never parsed either
way), end=logout and end=client_eof_without_logout, the canned `* BYE [UNAVAILABLE]` (backend
gone, no backend, idle_timeout, drain, max_connections), STARTTLS termination and passthrough
and its injection guard, implicit TLS both ways, backend STARTTLS, COMPRESS turning the session
opaque, imap_id giving Dovecot the client's address (also behind the PROXY protocol),
max_line_length, and mbsync syncing 200 messages intact.
"""

import base64
import imaplib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxtest  # noqa: E402
from mxtest import HOST, MS, Like  # noqa: E402

USER, PASSWORD = "joe", "Secr3t-pw"
LIT_USER, LIT_PASSWORD = "lit", "d1 LOGOUT"  # a password that reads like a command
BYE = b"* BYE [UNAVAILABLE] mxproxy: no mail server available\r\n"
MBSYNC = "/usr/bin/mbsync"
CURL = "/usr/bin/curl"
N_MESSAGES = 200
ZLIB_PLUGIN = """mail_plugins = $mail_plugins zlib
protocol imap {
  mail_plugins = $mail_plugins imap_zlib
}
"""


def message(i):
    """Message i of joe's INBOX (CRLF line ends, as Dovecot serves it)."""
    return ("From: mxtest <mxtest@example.test>\r\nTo: joe@example.test\r\n"
            "Subject: mxtest message %d\r\nMessage-ID: <%d@mxtest>\r\n\r\n" % (i, i)
            + "".join("line %d of message %d\r\n" % (k, i) for k in range(i % 7 + 1))).encode()


# A body whose lines read like IMAP responses: inside a FETCH literal they are data.
TRAP = (b"Subject: looks like responses\r\nMessage-ID: <trap@mxtest>\r\n\r\n"
        b"x1 OK fake completion\r\n* BYE fake goodbye\r\n+ fake continuation\r\n"
        b"* 99 EXISTS\r\n")


def imap_pair(tag, cmd, status, reply, untagged=0, pipelined=0, ms=MS, **extra):
    """The fields of an ev=pair line of mode imap after sid, in mxproxy's order."""
    f = {"proto": "imap", "tag": tag, "cmd": cmd, "status": status, "reply": reply,
         "untagged": untagged, "ms": ms, "pipelined": pipelined}
    f.update(extra)
    return f


def greeting_pair(reply):
    return {"proto": "imap", "tag": "*", "cmd": "<greeting>", "status": "OK", "reply": reply,
            "ms": MS}


class Raw(mxtest.Client):
    """A raw IMAP client: tagged commands, responses read up to the tagged one."""

    def tagged(self, tag, timeout=5.0):
        """Reads responses up to and including the one tagged tag; returns them as bytes."""
        out = b""
        while True:
            line = self.recv_until(b"\r\n", timeout)
            out += line
            m = re.match(rb"\* .*\{(\d+)\}\r\n$", line)
            if m:
                out += self.recv_exact(int(m.group(1)), timeout)
                continue
            if line.startswith(tag.encode() + b" "):
                return out


class CapsBackend(mxtest.TcpBackend):
    """A scripted IMAP backend: greets with `greeting`, answers CAPABILITY with `caps` and
    LOGOUT with a BYE, and any other command with other(tag, verb); self.lines holds every
    line it read, in order."""

    def __init__(self, name, greeting, caps, other):
        super().__init__(name)
        self.greeting, self.caps, self.other, self.lines = greeting, caps, other, []

    def handle(self, rec):
        self.send(rec, self.greeting)
        for line in self.recv_lines(rec):
            self.lines.append(line)
            tag, verb = (line.split(b" ") + [b""])[:2]
            if verb.upper() == b"CAPABILITY":
                self.send(rec, b"* CAPABILITY %s\r\n%s OK done\r\n" % (self.caps, tag))
            elif verb.upper() == b"LOGOUT":
                self.send(rec, b"* BYE bye\r\n%s OK done\r\n" % tag)
                return
            else:
                self.send(rec, self.other(tag, verb))


class ImapTest(mxtest.ProxyTestCase):
    dovecot = None

    @classmethod
    def setUpClass(cls):
        pki = mxtest.pki()
        cls.tls_leaf = pki.mx
        # The backend: TLS offered (STARTTLS, imaps), COMPRESS, mxproxy trusted for ID.
        cls.dovecot = mxtest.PrivateDovecot(protocols=("imap", "imaps"),
                                            users={USER: PASSWORD, "amy": "amy-pw",
                                                   LIT_USER: LIT_PASSWORD},
                                            trusted="127.0.0.1/32", extra=ZLIB_PLUGIN)
        # A Dovecot without TLS: mxproxy must offer STARTTLS itself.
        cls.plain = mxtest.PrivateDovecot(protocols=("imap",), users={USER: PASSWORD},
                                          trusted="", extra="ssl = no\n")
        try:
            for i in range(N_MESSAGES):
                cls.dovecot.add_message(USER, message(i))
            cls.dovecot.add_message("amy", TRAP)
            for i in range(3):
                cls.dovecot.add_message("amy", message(i))
                cls.plain.add_message(USER, message(i))
            cls.dovecot.start()
            cls.plain.start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for d in (cls.dovecot, cls.plain):
            if d is not None:
                d.close()

    # --- helpers ----------------------------------------------------------------------------

    def start_imap(self, backend=None, admin=False, glob=None, **opts):
        port = mxtest.free_port()
        opts.setdefault("mode", "imap")
        if opts.get("client_tls") in ("starttls", "implicit"):
            opts.setdefault("cert", self.tls_leaf.cert)
            opts.setdefault("key", self.tls_leaf.key)
        glob = dict(glob or {})
        if admin:
            glob["admin"] = "%s:%d" % (HOST, mxtest.free_port())
        backend = backend or "%s:%d" % (HOST, self.dovecot.ports["imap"])
        p = self.start_proxy(mxtest.config(mxtest.listener("imap", "%s:%d" % (HOST, port),
                                                           backend, **opts), **glob))
        p.port = port
        p.admin = glob.get("admin")
        return p

    def raw(self, port, source=None):
        c = Raw(port, source=source)
        self.track(c)
        return c

    def direct_greeting(self, dovecot=None):
        c = self.raw((dovecot or self.dovecot).ports["imap"])
        g = c.recv_until(b"\r\n")
        c.close()
        return g

    def assertNoSecret(self, proxy, *secrets):
        for line in proxy.raw:
            for s in secrets:
                self.assertNotIn(s, line, "a credential reached the log")

    # --- tests ------------------------------------------------------------------------------

    def test_greeting_at_once_and_client_eof(self):
        """The greeting reaches the client as Dovecot sent it, at once; a client that goes
        away without LOGOUT ends client_eof_without_logout."""
        direct = self.direct_greeting()
        p = self.start_imap()
        t0 = time.monotonic()
        c = self.raw(p.port)
        g = c.recv_until(b"\r\n")
        took = time.monotonic() - t0
        self.assertEqual(g, direct)
        self.assertLess(took, 1.0)
        sid = p.sid_of(c)
        c.close()
        close = self.assertPairs(p, sid, [greeting_pair(g[5:-2].decode())])
        self.assertEqual(close["end"], "client_eof_without_logout")
        self.assertNotIn("primary_error", close)
        pair = p.find(ev="pair", sid=sid)[0]
        # ms is accept to the greeting's first byte: no more than the client waited.
        self.assertLess(float(pair["ms"]) / 1000, took + 0.005)

    def test_imaplib_session(self):
        """imaplib: LOGIN (quoted), SELECT, FETCH with literals, APPEND with a synchronizing
        literal, a failing SELECT as primary error, LOGOUT; metrics by command and status."""
        p = self.start_imap(admin=True)
        m = imaplib.IMAP4(HOST, p.port, timeout=5)
        sid = p.sid_of(m.sock.getsockname()[1])
        self.assertEqual(m.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(m.select("INBOX"), ("OK", [str(N_MESSAGES).encode()]))
        typ, data = m.fetch("1:2", "(BODY.PEEK[])")
        self.assertEqual(typ, "OK")
        self.assertEqual(sorted(d[1] for d in data if isinstance(d, tuple)),
                         sorted([message(0), message(1)]))
        body = b"Subject: appended by mxtest\r\n\r\nHello a1 LOGOUT\r\n"
        typ, _ = m.append("INBOX", None, None, body)
        self.assertEqual(typ, "OK")
        self.assertEqual(m.select("Nonexistent")[0], "NO")
        m.logout()
        tags = [e["tag"] for e in p.wait_count(7, ev="pair", sid=sid)[1:]]
        self.assertPairs(p, sid, [
            greeting_pair(Like(r"\[CAPABILITY IMAP4rev1 .*\] Dovecot \(Debian\) ready\.")),
            imap_pair(tags[0], "CAPABILITY", "OK", Like(r"Pre-login capabilities listed.*"),
                      untagged=1),
            imap_pair(tags[1], "LOGIN [redacted]", "OK", "Logged in", untagged=1),
            imap_pair(tags[2], "SELECT INBOX", "OK", Like(r"\[READ-WRITE\] Select completed.*"),
                      untagged=Like(r"[5-9]")),
            imap_pair(tags[3], "FETCH 1:2 (BODY.PEEK[])", "OK", Like(r"Fetch completed.*"),
                      untagged=2),
            imap_pair(tags[4], "APPEND INBOX {%d}" % len(body), "OK",
                      Like(r"\[APPENDUID \d+ \d+\] Append completed.*"), untagged=Like(r"\d+"),
                      size=len(body)),
            imap_pair(tags[5], "SELECT Nonexistent", "NO",
                      Like(r"Mailbox doesn't exist: Nonexistent.*"),
                      untagged=Like(r"\d+"), primary=1),
            imap_pair(tags[6], "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1),
        ])
        close = p.close_of(sid)
        self.assertEqual(close["end"], "logout")
        self.assertTrue(close["primary_error"].startswith(
            "NO Mailbox doesn't exist: Nonexistent"), close["_raw"])
        self.assertNoSecret(p, PASSWORD, "Hello a1")
        with urllib.request.urlopen("http://%s/metrics" % p.admin, timeout=5) as r:
            text = r.read().decode()
        for want in ('mxproxy_imap_responses_total{command="LOGIN",status="OK"} 1',
                     'mxproxy_imap_responses_total{command="SELECT",status="NO"} 1',
                     'mxproxy_imap_responses_total{command="SELECT",status="OK"} 1',
                     'mxproxy_imap_responses_total{command="none",status="OK"} 1',
                     'mxproxy_sessions_total{listener="imap",end="logout"} 1'):
            self.assertIn(want, text)

    def test_credentials_never_logged(self):
        """LOGIN with literal passwords (synchronizing and not), AUTHENTICATE PLAIN with and
        without an initial response: one pair each, rounds=, transcript=full included."""
        p = self.start_imap(transcript="full")
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 LOGIN {3}\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"+ OK\r\n")
        c.send(b"joe {%d}\r\n" % len(PASSWORD))
        self.assertEqual(c.recv_until(b"\r\n"), b"+ OK\r\n")
        c.send(PASSWORD.encode() + b"\r\n")
        self.assertRegex(c.tagged("a1"), rb"a1 OK \[CAPABILITY .*\] Logged in\r\n$")
        c.send(b"a2 LOGOUT\r\n")
        c.tagged("a2")
        c.close()
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r".*Dovecot \(Debian\) ready\.")),
            imap_pair("a1", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("a2", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual(close["end"], "logout")

        cred = base64.b64encode(b"\0joe\0" + PASSWORD.encode())
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"b1 AUTHENTICATE PLAIN\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"+ \r\n")
        c.send(cred + b"\r\n")
        self.assertRegex(c.tagged("b1"), rb"b1 OK .*Logged in\r\n$")
        c.send(b"b2 NOOP\r\n")
        c.tagged("b2")
        c.close()
        self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("b1", "AUTHENTICATE PLAIN", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*"), rounds=1),
            imap_pair("b2", "NOOP", "OK", Like(r"NOOP completed.*"))])

        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"c1 AUTHENTICATE PLAIN " + cred + b"\r\n")
        self.assertRegex(c.tagged("c1"), rb"c1 OK .*Logged in\r\n$")
        c.close()
        self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("c1", "AUTHENTICATE PLAIN [redacted]", "OK",
                      Like(r"\[CAPABILITY IMAP4rev1 .*"), rounds=0)])

        # A non-synchronizing literal password, and a line after it that looks like a command:
        # the literal's octets are data, never a command, never logged.
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"d1 LOGIN {3+}\r\n%s {%d+}\r\n%s\r\n"
               % (LIT_USER.encode(), len(LIT_PASSWORD), LIT_PASSWORD.encode()))
        self.assertRegex(c.tagged("d1"), rb"d1 OK \[CAPABILITY .*\] Logged in\r\n$")
        c.send(b"d2 LOGOUT\r\n")
        c.tagged("d2")
        c.close()
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("d1", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("d2", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual(close["end"], "logout")
        lines = [e for e in p.find(ev="line") if e["dir"] == "client"]
        self.assertIn("a1 LOGIN [redacted]", [e["text"] for e in lines])
        self.assertIn("[redacted]", [e["text"] for e in lines])
        self.assertNotIn(LIT_PASSWORD, [e["text"] for e in lines])
        self.assertNoSecret(p, PASSWORD, cred.decode(), LIT_PASSWORD)

    def test_idle(self):
        """IDLE: the "+", untagged EXISTS while idling, DONE, the tagged OK: one pair whose
        ms is the idle time."""
        p = self.start_imap()
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a LOGIN amy amy-pw\r\nb SELECT INBOX\r\n")
        c.tagged("a")
        c.tagged("b")
        c.send(b"i IDLE\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"+ idling\r\n")
        other = imaplib.IMAP4(HOST, self.dovecot.ports["imap"], timeout=5)
        other.login("amy", "amy-pw")
        other.append("INBOX", None, None, b"Subject: while idling\r\n\r\nx\r\n")
        other.logout()
        self.assertRegex(c.recv_until(b"EXISTS\r\n", timeout=5), rb"\* \d+ EXISTS\r\n$")
        time.sleep(0.3)
        c.send(b"DONE\r\n")
        self.assertRegex(c.tagged("i"), rb"i OK Idle completed.*\r\n$")
        c.close()
        self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("b", "SELECT INBOX", "OK", Like(r"\[READ-WRITE\].*"),
                      untagged=Like(r"\d+"), pipelined=1),
            imap_pair("i", "IDLE", "OK", Like(r"Idle completed.*"), untagged=Like(r"[1-9]\d*"))])
        idle = p.find(ev="pair", sid=sid, tag="i")[0]
        self.assertGreater(float(idle["ms"]), 300)

    def test_starttls_offered_and_terminated(self):
        """client_tls = starttls in front of a Dovecot without TLS: mxproxy offers STARTTLS in
        the greeting, answers it itself, and inside TLS the lists offer neither STARTTLS nor
        LOGINDISABLED; imaplib and curl --ssl-reqd log in through it."""
        backend = "%s:%d" % (HOST, self.plain.ports["imap"])
        direct = self.direct_greeting(self.plain)
        self.assertNotIn(b"STARTTLS", direct)
        p = self.start_imap(backend, client_tls="starttls")
        c = self.raw(p.port)
        g = c.recv_until(b"\r\n")
        self.assertEqual(g, direct.replace(b"] Dovecot", b" STARTTLS] Dovecot"))
        sid = p.sid_of(c)
        c.send(b"a CAPABILITY\r\n")
        caps = c.tagged("a")
        self.assertRegex(caps, rb"^\* CAPABILITY IMAP4rev1 .* STARTTLS\r\na OK ")
        c.send(b"b STARTTLS\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"b OK Begin TLS negotiation now\r\n")
        tls = mxtest.client_context().wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"c CAPABILITY\r\n")
        got = b""
        while not re.search(rb"c OK .*\r\n", got):
            got += tls.recv(4096)
        self.assertNotIn(b"STARTTLS", got)
        self.assertNotIn(b"LOGINDISABLED", got)
        tls.sendall(b"e STARTTLS\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            got += tls.recv(4096)
        self.assertEqual(got, b"e BAD TLS already active\r\n")
        tls.sendall(b"d LOGOUT\r\n")
        while b"d OK" not in got:
            got += tls.recv(4096)
        tls.close()
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r"\[CAPABILITY .*\] Dovecot \(Debian\) ready\.")),
            imap_pair("a", "CAPABILITY", "OK", Like(r".*"), untagged=1),
            {"proto": "imap", "tag": "b", "cmd": "STARTTLS", "status": "OK",
             "reply": "Begin TLS negotiation now", "ms": MS, "pipelined": 0, "local": 1},
            imap_pair("c", "CAPABILITY", "OK", Like(r".*"), untagged=1),
            {"proto": "imap", "tag": "e", "cmd": "STARTTLS", "status": "BAD",
             "reply": "TLS already active", "ms": MS, "pipelined": 0, "local": 1},
            imap_pair("d", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual(close["end"], "logout")

        m = imaplib.IMAP4(HOST, p.port, timeout=5)
        m.starttls(ssl_context=mxtest.client_context(check_hostname=False))
        self.assertNotIn("STARTTLS", m.capabilities)
        self.assertEqual(m.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(m.select("INBOX")[0], "OK")
        m.logout()

        out = subprocess.run([CURL, "-sS", "--ssl-reqd", "--cacert", mxtest.pki().ca,
                              "--resolve", "mx.example.test:%d:%s" % (p.port, HOST),
                              "-u", "%s:%s" % (USER, PASSWORD),
                              "imap://mx.example.test:%d/INBOX;UID=1" % p.port],
                             capture_output=True, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, message(0))

    def test_logindisabled_withdrawn_inside_tls(self):
        """A backend that says LOGINDISABLED (it sees no TLS): mxproxy keeps it before TLS and
        withdraws it, with STARTTLS, inside the TLS it terminates; the rest byte for byte."""
        caps = b"IMAP4rev1 LITERAL+ LOGINDISABLED AUTH=PLAIN ID"

        b = self.track(CapsBackend("strict", b"* OK [CAPABILITY %s] strict ready\r\n" % caps,
                                   caps, lambda tag, verb: b"%s BAD what\r\n" % tag))
        p = self.start_imap(b.addr, client_tls="starttls")
        c = self.raw(p.port)
        self.assertEqual(c.recv_until(b"\r\n"),
                         b"* OK [CAPABILITY IMAP4rev1 LITERAL+ LOGINDISABLED AUTH=PLAIN ID "
                         b"STARTTLS] strict ready\r\n")
        sid = p.sid_of(c)
        c.send(b"a CAPABILITY\r\n")
        self.assertEqual(c.tagged("a"), b"* CAPABILITY IMAP4rev1 LITERAL+ LOGINDISABLED "
                                        b"AUTH=PLAIN ID STARTTLS\r\na OK done\r\n")
        c.send(b"b STARTTLS\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"b OK Begin TLS negotiation now\r\n")
        tls = mxtest.client_context().wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"c CAPABILITY\r\nd LOGOUT\r\n")
        got = b""
        while not got.endswith(b"d OK done\r\n"):
            data = tls.recv(4096)
            self.assertTrue(data, got)
            got += data
        self.assertEqual(got, b"* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN ID\r\nc OK done\r\n"
                              b"* BYE bye\r\nd OK done\r\n")
        tls.close()
        self.assertEqual(p.close_of(sid)["end"], "logout")

    def test_require_tls_refuses_before_starttls(self):
        """require_tls = on: before STARTTLS the capability lists add LOGINDISABLED, and every
        command but CAPABILITY, NOOP, LOGOUT, STARTTLS and ID gets "NO [PRIVACYREQUIRED]" from
        mxproxy without a byte of it reaching the backend: LOGIN (credentials never leave),
        a synchronizing literal (answered instead of "+"), non-synchronizing literals with
        their data, AUTHENTICATE (no "+"); inside TLS the same commands go through."""
        caps = b"IMAP4rev1 LITERAL+ AUTH=PLAIN ID"
        b = self.track(CapsBackend("recorder", b"* OK [CAPABILITY %s] rec ready\r\n" % caps,
                                   caps, lambda tag, verb: b"%s OK %s done\r\n" % (tag, verb)))
        p = self.start_imap(b.addr, client_tls="starttls", require_tls="on")
        c = self.raw(p.port)
        self.assertEqual(c.recv_until(b"\r\n"), b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN "
                                                 b"ID STARTTLS LOGINDISABLED] rec ready\r\n")
        sid = p.sid_of(c)
        c.send(b"a CAPABILITY\r\n")
        self.assertEqual(c.tagged("a"), b"* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN ID STARTTLS "
                                        b"LOGINDISABLED\r\na OK done\r\n")
        no = b" NO [PRIVACYREQUIRED] TLS required\r\n"
        # Pipelined, in one write: each answered in order, the allowed NOOP by the backend.
        c.send(b"b LOGIN user secret-pw\r\nc SELECT INBOX\r\nd NOOP\r\n")
        self.assertEqual(c.tagged("d"), b"b" + no + b"c" + no + b"d OK NOOP done\r\n")
        # A synchronizing literal: NO instead of "+", and the client sends no data.
        c.send(b"e LOGIN {4}\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"e" + no)
        # A client that sends its literals anyway: they are no commands, and go nowhere.
        c.send(b"e2 LOGIN {4}\r\nuser {9}\r\nsecret-pw\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"e2" + no)
        # Non-synchronizing literals: the data goes with the command, and nowhere.
        # AUTHENTICATE with its SASL response sent anyway, not waiting for a "+": the response
        # (one word, a credential) is dropped, never taken for a command or logged.
        token = base64.b64encode(b"\0user\0secret-pw")
        c.send(b"f LOGIN {4+}\r\nuser {9+}\r\nsecret-pw\r\ng AUTHENTICATE PLAIN\r\n" + token
               + b"\r\nh NOOP\r\n")
        self.assertEqual(c.tagged("h"), b"f" + no + b"g" + no + b"h OK NOOP done\r\n")
        c.send(b"i STARTTLS\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"i OK Begin TLS negotiation now\r\n")
        tls = mxtest.client_context().wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"j CAPABILITY\r\nk LOGIN user secret-pw\r\nl LOGOUT\r\n")
        got = b""
        while not got.endswith(b"l OK done\r\n"):
            data = tls.recv(4096)
            self.assertTrue(data, got)
            got += data
        self.assertEqual(got, b"* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN ID\r\nj OK done\r\n"
                              b"k OK LOGIN done\r\n* BYE bye\r\nl OK done\r\n")
        tls.close()
        self.assertEqual(b.lines, [b"a CAPABILITY", b"d NOOP", b"h NOOP", b"j CAPABILITY",
                                   b"k LOGIN user secret-pw", b"l LOGOUT"])

        def refused(tag, cmd, pipelined, **extra):
            f = {"proto": "imap", "tag": tag, "cmd": cmd, "status": "NO",
                 "reply": "[PRIVACYREQUIRED] TLS required", "ms": MS, "pipelined": pipelined}
            f.update(extra)
            f["local"] = 1
            return f
        close = self.assertPairs(p, sid, [
            greeting_pair("[CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN ID] rec ready"),
            imap_pair("a", "CAPABILITY", "OK", "done", untagged=1),
            refused("b", "LOGIN [redacted]", 0),
            refused("c", "SELECT INBOX", 0),
            imap_pair("d", "NOOP", "OK", "NOOP done"),
            refused("e", "LOGIN [redacted]", 0),
            refused("e2", "LOGIN [redacted]", 0),
            refused("f", "LOGIN [redacted]", 0),
            refused("g", "AUTHENTICATE PLAIN", 0, rounds=0),
            imap_pair("h", "NOOP", "OK", "NOOP done"),
            {"proto": "imap", "tag": "i", "cmd": "STARTTLS", "status": "OK",
             "reply": "Begin TLS negotiation now", "ms": MS, "pipelined": 0, "local": 1},
            imap_pair("j", "CAPABILITY", "OK", "done", untagged=1),
            imap_pair("k", "LOGIN [redacted]", "OK", "LOGIN done", untagged=1, pipelined=1),
            imap_pair("l", "LOGOUT", "OK", "done", untagged=2, pipelined=1)])
        self.assertEqual(close["end"], "logout")
        self.assertNoSecret(p, "secret-pw", token.decode())

    def test_refused_login_literal_sent_anyway(self):
        """A backend that refuses a LOGIN's synchronizing literal (tagged NO instead of "+"),
        and a client that sends the literal and the rest of its LOGIN anyway: those lines are
        no commands; the credentials in them are neither relayed nor logged, nor answered.
        The first real command after them is relayed as usual."""
        caps = b"IMAP4rev1 AUTH=PLAIN"
        b = self.track(CapsBackend("refuser", b"* OK [CAPABILITY %s] ready\r\n" % caps, caps,
                                   lambda tag, verb: (b"%s NO [AUTHENTICATIONFAILED] no\r\n" % tag
                                                      if verb.upper() == b"LOGIN"
                                                      else b"%s OK %s done\r\n" % (tag, verb))))
        p = self.start_imap(b.addr, transcript="full")
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a LOGIN {4}\r\nuser {9}\r\nsecret-pw\r\nb NOOP\r\n")
        self.assertEqual(c.tagged("b"), b"a NO [AUTHENTICATIONFAILED] no\r\nb OK NOOP done\r\n")
        c.send(b"c LOGOUT\r\n")
        self.assertEqual(c.tagged("c"), b"* BYE bye\r\nc OK done\r\n")
        close = p.close_of(sid)
        self.assertEqual(b.lines, [b"a LOGIN {4}", b"b NOOP", b"c LOGOUT"])
        self.assertEqual([(e["tag"], e["cmd"]) for e in p.find(ev="pair", sid=sid)],
                         [("*", "<greeting>"), ("a", "LOGIN [redacted]"), ("b", "NOOP"),
                          ("c", "LOGOUT")])
        self.assertEqual(close["end"], "logout")
        self.assertNoSecret(p, "secret-pw", "user {9}")

    def test_starttls_injection_guard(self):
        """Commands pipelined behind STARTTLS in plaintext are dropped, never run inside TLS."""
        p = self.start_imap("%s:%d" % (HOST, self.plain.ports["imap"]), client_tls="starttls")
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a STARTTLS\r\nb LOGIN joe x\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"a OK Begin TLS negotiation now\r\n")
        ev = p.wait_event(ev="starttls_injection", sid=sid)
        self.assertEqual(ev["bytes"], "15")
        tls = mxtest.client_context().wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"c NOOP\r\n")
        got = b""
        while b"\r\n" not in got:
            got += tls.recv(4096)
        self.assertRegex(got, rb"^c OK NOOP completed")
        tls.close()
        p.close_of(sid)
        self.assertEqual([e["tag"] for e in p.find(ev="pair", sid=sid)], ["*", "a", "c"])

    def test_starttls_passthrough(self):
        """client_tls = passthrough: Dovecot's own STARTTLS; after its OK the session is
        opaque and ends as in mode tcp."""
        p = self.start_imap(client_tls="passthrough")
        c = self.raw(p.port)
        self.assertIn(b"STARTTLS", c.recv_until(b"\r\n"))
        sid = p.sid_of(c)
        c.send(b"a STARTTLS\r\n")
        self.assertRegex(c.recv_until(b"\r\n"), rb"^a OK Begin TLS negotiation now")
        p.wait_event(ev="starttls_passthrough", sid=sid)
        tls = mxtest.client_context().wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"b LOGIN joe %s\r\nc LOGOUT\r\n" % PASSWORD.encode())
        got = b""
        while b"c OK" not in got:
            data = tls.recv(4096)
            if not data:
                break
            got += data
        self.assertRegex(got, rb"b OK .*Logged in")
        tls.close()
        close = p.close_of(sid)
        self.assertEqual(close["opaque"], "1")

    def test_drain_when_starttls_passes_through(self):
        """A session past its drain deadline that waits for owed tags and then has its
        STARTTLS passed through can see no reply again: it ends at once (the client gets the
        OK, then the close), never held unread until drain_grace."""
        go = threading.Event()

        class Late(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] late ready\r\n")
                if not self.recv_until(rec, b"a5 STARTTLS\r\n"):
                    return
                if go.wait(10):
                    self.send(rec, b"a5 OK Begin TLS negotiation now\r\n")
                    while self.recv(rec):
                        pass
        b = self.track(Late("late"))
        p = self.start_imap(b.addr, client_tls="passthrough",
                            glob={"drain_timeout": "200ms", "drain_grace": "30s"})
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 NOOP\r\na5 STARTTLS\r\n")
        p.signal(signal.SIGTERM)
        time.sleep(0.6)  # past the deadline: a1 and a5 are owed
        go.set()
        self.assertEqual(c.wait_closed(3), ("eof", b"a5 OK Begin TLS negotiation now\r\n"))
        close = p.close_of(sid)
        self.assertEqual(close["end"], "drain")
        self.assertEqual(close["opaque"], "1")
        self.assertEqual(p.wait_exit(5), 0)

    def test_implicit_tls_both_ways(self):
        """client_tls = implicit (curl imaps://) in front of backend_tls = implicit (imaps)."""
        p = self.start_imap("%s:%d" % (HOST, self.dovecot.ports["imaps"]),
                            client_tls="implicit", backend_tls="implicit",
                            backend_ca=mxtest.pki().ca, backend_sni="mx.example.test")
        out = subprocess.run([CURL, "-sS", "--cacert", mxtest.pki().ca,
                              "--resolve", "mx.example.test:%d:%s" % (p.port, HOST),
                              "-u", "%s:%s" % (USER, PASSWORD),
                              "imaps://mx.example.test:%d/INBOX;UID=2" % p.port],
                             capture_output=True, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, message(1))
        close = p.wait_event(ev="close")
        self.assertEqual(close["end"], "logout")
        self.assertNoSecret(p, PASSWORD)

    def test_backend_starttls_and_imap_id(self):
        """backend_tls = starttls and imap_id = on: mxproxy's own STARTTLS and ID after the
        greeting, which the client gets at once (without STARTTLS); Dovecot logs the client's
        address (127.0.0.2) and port, over TLS."""
        p = self.start_imap(backend_tls="starttls", backend_ca=mxtest.pki().ca,
                            backend_sni="mx.example.test", imap_id="on")
        c = self.raw(p.port, source="127.0.0.2")
        g = c.recv_until(b"\r\n")
        self.assertEqual(g, self.direct_greeting().replace(b" STARTTLS", b""))
        sid = p.wait_event(ev="open", client="127.0.0.2:%d" % c.local_port)["sid"]
        c.send(b"a LOGIN joe %s\r\n" % PASSWORD.encode())
        self.assertRegex(c.tagged("a"), rb"a OK .*Logged in\r\n$")
        self.dovecot.wait_log(r"imap-login: Info: Login: user=<joe>, method=PLAIN, "
                              r"rip=127\.0\.0\.2, rport=%d, lip=127\.0\.0\.1, .*TLS"
                              % c.local_port)
        c.send(b"b LOGOUT\r\n")
        c.tagged("b")
        c.close()
        self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("b", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual(p.find(ev="imap_id", sid=sid)[0]["status"], "OK")

        # Without imap_id Dovecot sees mxproxy's own address.
        q = self.start_imap()
        m = imaplib.IMAP4(HOST, q.port, timeout=5)
        m.login(USER, PASSWORD)
        port = m.sock.getsockname()[1]
        m.logout()
        log = self.dovecot.log()
        self.assertNotRegex(log, r"Login: user=<joe>, method=PLAIN, rip=127\.0\.0\.1, rport=%d,"
                            % port)

    def test_backend_starttls_no_downgrade(self):
        """backend_tls = starttls to a Dovecot without TLS: its refusal ends the session with
        mxproxy's BYE; the client's command never reaches the backend in plaintext."""
        p = self.start_imap("%s:%d" % (HOST, self.plain.ports["imap"]), backend_tls="starttls",
                            backend_ca=mxtest.pki().ca, backend_sni="mx.example.test")
        c = self.raw(p.port)
        self.assertEqual(c.recv_until(b"\r\n"), self.direct_greeting(self.plain))
        sid = p.sid_of(c)
        seen = len(self.plain.log())
        c.send(b"a LOGIN joe %s\r\n" % PASSWORD.encode())
        self.assertEqual(c.wait_closed(),
                         ("eof", b"* BYE [UNAVAILABLE] mxproxy: TLS with the mail server failed"
                                 b"\r\n"))
        self.assertEqual(p.wait_event(ev="tls_error", sid=sid)["reason"],
                         "backend refused STARTTLS")
        self.assertEqual(p.close_of(sid)["end"], "tls_error")
        self.assertNoSecret(p, PASSWORD)
        self.plain.wait_log(r"imap-login: Info: Disconnected")
        self.assertNotIn("user=<joe>", self.plain.log()[seen:])

    def test_imap_id_behind_proxy_protocol(self):
        """accept_proxy_protocol with imap_id = on: Dovecot logs the address of the PROXY
        header; a client's own ID naming another address does not change it."""
        p = self.start_imap(imap_id="on", accept_proxy_protocol="on")
        c = self.raw(p.port)
        c.send(b"PROXY TCP4 192.0.2.10 198.51.100.20 40000 143\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), self.direct_greeting())
        sid = p.wait_event(ev="proxy_protocol", client="192.0.2.10:40000")["sid"]
        c.send(b'a ID ("x-originating-ip" "10.9.9.9" "x-originating-port" "4444")\r\n')
        self.assertRegex(c.tagged("a"), rb"^\* ID .*\r\na OK ID completed.*\r\n$")
        c.send(b"b LOGIN joe %s\r\n" % PASSWORD.encode())
        self.assertRegex(c.tagged("b"), rb"b OK .*Logged in\r\n$")
        self.dovecot.wait_log(r"imap-login: Info: Login: user=<joe>, method=PLAIN, "
                              r"rip=192\.0\.2\.10, rport=40000, lip=127\.0\.0\.1, ")
        self.assertNotIn("rip=10.9.9.9", self.dovecot.log())
        c.send(b"c LOGOUT\r\n")
        c.tagged("c")
        c.close()
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a", 'ID ("x-originating-ip" "10.9.9.9" "x-originating-port" "4444")',
                      "OK", Like(r"ID completed.*"), untagged=1),
            imap_pair("b", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("c", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual((close["end"], close["client"]), ("logout", "192.0.2.10:40000"))
        self.assertEvent(p.find(ev="imap_id", sid=sid)[0], "imap_id",
                         {"status": "OK", "reply": Like(r"ID completed.*")})

    def test_compress_turns_opaque(self):
        """COMPRESS=DEFLATE is relayed; after its OK the bytes are deflate and the session is
        opaque (ev=compress_passthrough)."""
        p = self.start_imap()
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a LOGIN joe %s\r\n" % PASSWORD.encode())
        self.assertIn(b"COMPRESS=DEFLATE", c.tagged("a"))
        c.send(b"b COMPRESS DEFLATE\r\n")
        self.assertRegex(c.tagged("b"), rb"b OK .*\r\n$")
        p.wait_event(ev="compress_passthrough", sid=sid)
        comp = zlib.compressobj(wbits=-15)
        dec = zlib.decompressobj(wbits=-15)
        c.send(comp.compress(b"c NOOP\r\nd LOGOUT\r\n") + comp.flush(zlib.Z_SYNC_FLUSH))
        got = b""
        deadline = time.monotonic() + 5
        while b"d OK" not in got and time.monotonic() < deadline:
            c._fill(deadline)
            got += dec.decompress(c.buf)
            c.buf = b""
            if c.eof:
                break
        self.assertRegex(got, rb"c OK NOOP completed.*\r\n(.|\r\n)*d OK Logout completed")
        c.close()
        close = p.close_of(sid)
        self.assertEqual(close["opaque"], "1")
        tags = [e["tag"] for e in p.find(ev="pair", sid=sid)]
        self.assertEqual(tags, ["*", "a", "b"])

    def test_backend_gone_and_unavailable(self):
        """A backend that closes with a command outstanding: the client gets the canned BYE,
        the tag is logged aborted=1. No backend at all: the same BYE, end=connect_failed."""
        class Silent(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"* OK fake ready\r\n")
                if not self.recv_until(rec, b"a1 NOOP\r\n"):
                    return
        b = self.track(Silent("silent"))
        p = self.start_imap(b.addr)
        c = self.raw(p.port)
        self.assertEqual(c.recv_until(b"\r\n"), b"* OK fake ready\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 NOOP\r\n")
        self.assertEqual(c.wait_closed(), ("eof", BYE))
        close = self.assertPairs(p, sid, [
            greeting_pair("fake ready"),
            {"proto": "imap", "tag": "a1", "cmd": "NOOP", "untagged": 0, "pipelined": 0,
             "aborted": 1}])
        self.assertEqual(close["end"], "backend_closed")
        self.assertEqual(close["primary_error"],
                         "BYE [UNAVAILABLE] mxproxy: no mail server available")

        down = "%s:%d" % (HOST, mxtest.free_port())
        q = self.start_imap(down)
        c = self.raw(q.port)
        self.assertEqual(c.wait_closed(), ("eof", BYE))
        close = q.wait_event(ev="close")
        self.assertEqual(close["end"], "connect_failed")
        self.assertEqual(close["primary_error"],
                         "BYE [UNAVAILABLE] mxproxy: no mail server available")

    def test_backend_gone_inside_a_response(self):
        """A backend that closes inside a FETCH body already partly relayed: a BYE now would
        be read as more of the body, so the client gets no line of mxproxy's, only the close;
        the tag is still logged aborted=1."""
        class Cut(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"* OK fake ready\r\n")
                if not self.recv_until(rec, b"a1 FETCH 1 BODY[]\r\n"):
                    return
                self.send(rec, b"* 1 FETCH (BODY[] {50}\r\nSubject: cut")
        b = self.track(Cut("cut"))
        p = self.start_imap(b.addr)
        c = self.raw(p.port)
        self.assertEqual(c.recv_until(b"\r\n"), b"* OK fake ready\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 FETCH 1 BODY[]\r\n")
        self.assertEqual(c.wait_closed(), ("eof", b"* 1 FETCH (BODY[] {50}\r\nSubject: cut"))
        close = self.assertPairs(p, sid, [
            greeting_pair("fake ready"),
            {"proto": "imap", "tag": "a1", "cmd": "FETCH 1 BODY[]", "untagged": 0,
             "pipelined": 0, "aborted": 1}])
        self.assertEqual(close["end"], "backend_closed")
        self.assertNotIn("primary_error", close)

    def test_local_answer_waits_for_the_response_in_progress(self):
        """mxproxy's own answer (BAD Line too long) to a line sent while an unsolicited FETCH
        body is still arriving waits for that response's end: never inside the body."""
        rest = threading.Event()
        body = b"Subject: cut\r\n\r\nbody\r\n"
        head = b"* OK fake ready\r\n* 1 FETCH (BODY[] {%d}\r\n%s" % (len(body), body[:9])

        class Slow(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, head)
                if rest.wait(5):
                    self.send(rec, body[9:] + b")\r\n")
                    self.recv(rec)
        b = self.track(Slow("slow"))
        p = self.start_imap(b.addr, max_line_length=512)
        c = self.raw(p.port)
        self.assertEqual(c.recv_exact(len(head)), head)
        c.send(b"a2 NOOP " + b"y" * 600 + b"\r\n")
        try:
            c.assert_open(wait=0.3)
        finally:
            rest.set()
        self.assertEqual(c.tagged("a2"), body[9:] + b")\r\na2 BAD Line too long\r\n")
        c.close()

    def test_backend_tag_of_a_local_starttls_keeps_the_barrier(self):
        """A backend that answers the tag of a STARTTLS mxproxy answers itself does not lift
        the STARTTLS barrier: a second STARTTLS sent behind it is dropped, never answered (and
        TLS never started twice)."""
        go = threading.Event()

        class Echo(mxtest.TcpBackend):
            def handle(self, rec):
                self.send(rec, b"* OK ready\r\n")
                if not self.recv_until(rec, b"a1 NOOP\r\n"):
                    return
                self.send(rec, b"a5 BAD not yours\r\n")
                if go.wait(5):
                    self.send(rec, b"a1 OK done\r\n")
                    self.recv(rec)
        b = self.track(Echo("echo"))
        p = self.start_imap(b.addr, client_tls="starttls")
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 NOOP\r\na5 STARTTLS\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"a5 BAD not yours\r\n")
        c.send(b"a6 STARTTLS\r\n")
        time.sleep(0.2)
        go.set()
        self.assertEqual(c.recv_until(b"\r\n"), b"a1 OK done\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"a5 OK Begin TLS negotiation now\r\n")
        c.close()
        p.close_of(sid)
        self.assertEqual([e["tag"] for e in p.find(ev="pair", sid=sid)], ["*", "a5", "a1", "a5"])

    def test_literals_are_data(self):
        """Literal octets are never parsed: a FETCH body full of response-like lines, an
        APPEND body full of command-like lines (synchronizing, then non-synchronizing)."""
        p = self.start_imap()
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a LOGIN amy amy-pw\r\nb EXAMINE INBOX\r\n")
        c.tagged("a")
        c.tagged("b")
        c.send(b"c FETCH 1 BODY.PEEK[]\r\n")
        got = c.tagged("c")
        self.assertEqual(got, b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(TRAP), TRAP)
                         + re.search(rb"c OK Fetch completed.*\r\n$", got).group(0))
        body = b"Subject: looks like commands\r\n\r\nz1 LOGOUT\r\nz2 STARTTLS\r\nDONE\r\n"
        c.send(b"d APPEND INBOX {%d}\r\n" % len(body))
        self.assertEqual(c.recv_until(b"\r\n"), b"+ OK\r\n")
        c.send(body + b"\r\n")
        self.assertRegex(c.tagged("d"), rb"d OK \[APPENDUID \d+ \d+\] Append completed")
        c.send(b"e APPEND INBOX {%d+}\r\n%s\r\nf NOOP\r\n" % (len(body), body))
        self.assertRegex(c.tagged("e"), rb"e OK \[APPENDUID \d+ \d+\] Append completed")
        c.tagged("f")
        c.close()
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            imap_pair("b", "EXAMINE INBOX", "OK", Like(r"\[READ-ONLY\] Examine completed.*"),
                      untagged=Like(r"\d+"), pipelined=1),
            imap_pair("c", "FETCH 1 BODY.PEEK[]", "OK", Like(r"Fetch completed.*"), untagged=1),
            imap_pair("d", "APPEND INBOX {%d}" % len(body), "OK", Like(r"\[APPENDUID .*"),
                      untagged=Like(r"\d+"), size=len(body)),
            imap_pair("e", "APPEND INBOX {%d+}" % len(body), "OK", Like(r"\[APPENDUID .*"),
                      untagged=Like(r"\d+"), size=len(body)),
            imap_pair("f", "NOOP", "OK", Like(r"NOOP completed.*"), untagged=Like(r"\d+"),
                      pipelined=1)])
        self.assertEqual(close["end"], "client_eof_without_logout")
        self.assertNotIn("primary_error", close)

    def test_more_commands_in_flight_than_slots(self):
        """300 commands in one write, more than mxproxy keeps in flight (64): the rest wait
        in mxproxy and go on as answers come; every one is answered and paired once."""
        p = self.start_imap()
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a LOGIN joe %s\r\n" % PASSWORD.encode()
               + b"".join(b"t%d NOOP\r\n" % i for i in range(300)) + b"z LOGOUT\r\n")
        got = c.tagged("z", timeout=10)
        self.assertEqual(re.findall(rb"(?m)^(t\d+) OK NOOP completed", got),
                         [b"t%d" % i for i in range(300)])
        c.close()
        p.close_of(sid)
        pairs = p.find(ev="pair", sid=sid)
        self.assertEqual([e["tag"] for e in pairs],
                         ["*", "a"] + ["t%d" % i for i in range(300)] + ["z"])
        self.assertEqual({e["status"] for e in pairs[2:]}, {"OK"})

    def test_curl_plain_and_drain(self):
        """curl imap:// fetches through mxproxy; at the drain deadline an idle client gets
        the BYE."""
        p = self.start_imap(glob={"drain_timeout": "300ms"})
        out = subprocess.run([CURL, "-sS", "-u", "%s:%s" % (USER, PASSWORD),
                              "imap://%s:%d/INBOX;UID=3" % (HOST, p.port)],
                             capture_output=True, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, message(2))
        close = p.wait_event(ev="close")
        self.assertEqual(close["end"], "logout")
        cmds = [e["cmd"] for e in p.find(ev="pair", sid=close["sid"])]
        self.assertEqual(cmds[0], "<greeting>")
        self.assertIn("UID FETCH 3 BODY[]", cmds)
        self.assertEqual(cmds[-1], "LOGOUT")
        self.assertNoSecret(p, PASSWORD)

        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        p.signal(signal.SIGTERM)
        self.assertEqual(c.wait_closed(), ("eof", BYE))
        close = p.close_of(sid)
        self.assertEqual(close["end"], "drain")
        self.assertEqual(close["primary_error"], BYE[2:-2].decode())
        self.assertEqual(p.wait_exit(5), 0)

    def test_max_connections(self):
        """Over max_connections the client gets mxproxy's own BYE, end=limit."""
        p = self.start_imap(max_connections=1)
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        d = self.raw(p.port)
        self.assertEqual(d.wait_closed(),
                         ("eof", b"* BYE [UNAVAILABLE] mxproxy: too many connections\r\n"))
        self.assertEqual(p.wait_event(ev="close", end="limit")["end"], "limit")

    def test_idle_timeout(self):
        p = self.start_imap(idle_timeout="1s")
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        t0 = time.monotonic()
        self.assertEqual(c.wait_closed(timeout=5), ("eof", BYE))
        self.assertGreater(time.monotonic() - t0, 0.8)
        self.assertEqual(p.close_of(sid)["end"], "idle_timeout")

    def test_max_line_length(self):
        """A command line over max_line_length is answered BAD by mxproxy and never reaches
        Dovecot; literals do not count toward the limit."""
        p = self.start_imap(max_line_length=512)
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 LOGIN joe %s\r\n" % PASSWORD.encode())
        c.tagged("a1")
        c.send(b"a2 SEARCH SUBJECT " + b"x" * 600 + b"\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"a2 BAD Line too long\r\n")
        body = b"Subject: big\r\n\r\n" + b"y" * 2000 + b"\r\n"
        c.send(b"a3 APPEND INBOX {%d+}\r\n%s\r\n" % (len(body), body))
        self.assertRegex(c.tagged("a3"), rb"a3 OK \[APPENDUID .*\r\n$")
        c.send(b"a4 LOGOUT\r\n")
        c.tagged("a4")
        c.close()
        self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a1", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            {"proto": "imap", "tag": "a2", "cmd": "[line too long]", "status": "BAD",
             "reply": "Line too long", "ms": MS, "pipelined": 0, "local": 1},
            imap_pair("a3", "APPEND INBOX {%d+}" % len(body), "OK", Like(r"\[APPENDUID .*"),
                      untagged=Like(r"\d+"), size=len(body)),
            imap_pair("a4", "LOGOUT", "OK", Like(r"Logout completed.*"), untagged=1)])
        self.assertEqual(p.find(ev="line_too_long", sid=sid)[0]["limit"], "512")

    def mbsync(self, p, extra=""):
        """Runs mbsync (Sync Pull of INBOX) through p; checks the two maildirs hold the same
        messages and mxproxy spent well under a second of CPU on it. Returns the close
        event and the number of messages."""
        d = tempfile.mkdtemp(prefix="mxtest-mbsync-", dir=self.tmpdir)
        local = os.path.join(d, "local")
        os.mkdir(local)
        rc = os.path.join(d, "mbsyncrc")
        with open(rc, "w") as f:
            f.write("""IMAPAccount mx
Host {host}
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN
{extra}
IMAPStore far
Account mx

MaildirStore near
Path {local}/
Inbox {local}/INBOX

Channel sync
Far :far:
Near :near:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""".format(host=HOST, port=p.port, user="joe", password=PASSWORD, local=local, extra=extra))
        r = subprocess.run([MBSYNC, "-c", rc, "-a"], capture_output=True, timeout=30,
                           env=dict(os.environ, HOME=d))
        self.assertEqual(r.returncode, 0, r.stderr.decode() + r.stdout.decode())

        def bodies(path):
            """The messages of a maildir by Message-ID, line ends as LF (mbsync stores LF),
            without mbsync's X-TUID line."""
            out = {}
            for sub in ("cur", "new"):
                for name in os.listdir(os.path.join(path, sub)):
                    with open(os.path.join(path, sub, name), "rb") as f:
                        raw = f.read().replace(b"\r\n", b"\n")
                    # mbsync marks what it stored with its own X-TUID header line
                    raw = re.sub(rb"(?m)^X-TUID: \S+\n", b"", raw, count=1)
                    m = re.search(rb"^Message-ID: (.*)$", raw, re.M)
                    out[m.group(1) if m else raw] = raw
            return out
        got = bodies(os.path.join(local, "INBOX"))
        want = bodies(self.dovecot.maildir(USER))
        self.assertGreaterEqual(len(want), N_MESSAGES)
        # Set comparisons, not assertEqual on the whole lists: difflib on 200 bodies takes
        # minutes to describe a difference.
        self.assertEqual(sorted(set(want) - set(got)), [], "messages mbsync did not get")
        self.assertEqual(sorted(set(got) - set(want)), [], "messages mbsync made up")
        differ = [k for k in want if got[k] != want[k]]
        self.assertEqual(differ, [], "messages that differ, the first: %r != %r"
                         % (got[differ[0]], want[differ[0]]) if differ else "")
        close = p.wait_event(ev="close", timeout=10)
        # The relay works for its bytes, not by spinning: well under a second of CPU.
        with open("/proc/%d/stat" % p.pid) as f:
            ticks = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        self.assertLess(ticks / os.sysconf("SC_CLK_TCK"), 1.0)
        self.assertNoSecret(p, PASSWORD)
        return close, len(want)

    def test_line_too_long_after_a_literal(self):
        """A command whose text before a literal already went to the backend and whose rest
        runs past max_line_length cannot be answered BAD: the session ends with a BYE."""
        p = self.start_imap(max_line_length=512)
        c = self.raw(p.port)
        c.recv_until(b"\r\n")
        sid = p.sid_of(c)
        c.send(b"a1 LOGIN joe %s\r\n" % PASSWORD.encode())
        c.tagged("a1")
        c.send(b"a2 APPEND INBOX (\\Seen) {5+}\r\nhello " + b"x" * 600 + b"\r\n")
        self.assertEqual(c.wait_closed(), ("eof", b"* BYE mxproxy: command line refused\r\n"))
        close = self.assertPairs(p, sid, [
            greeting_pair(Like(r".*")),
            imap_pair("a1", "LOGIN [redacted]", "OK", Like(r"\[CAPABILITY IMAP4rev1 .*")),
            {"proto": "imap", "tag": "a2", "cmd": "APPEND INBOX (\\Seen) {5+}",
             "untagged": 0, "pipelined": 0, "size": 5, "aborted": 1}])
        self.assertEqual(close["primary_error"], "BYE mxproxy: command line refused")
        self.assertEqual((close["end"], close["error"]), ("client_reset", "line too long"))
        self.assertEqual(p.find(ev="line_too_long", sid=sid)[0]["limit"], "512")

    def test_mbsync_200_messages(self):
        """mbsync pulls a 200-message mailbox through mxproxy, COMPRESS left out so every
        command is paired: the two maildirs hold the same messages."""
        p = self.start_imap()
        close, n = self.mbsync(p, "DisableExtensions COMPRESS=DEFLATE\n")
        self.assertEqual(close["end"], "logout")
        self.assertNotIn("opaque", close)
        pairs = p.find(ev="pair", sid=close["sid"])
        self.assertEqual([e["cmd"] for e in pairs[:6]],
                         ["<greeting>", "LOGIN [redacted]", "NAMESPACE", 'LIST "" "*"',
                          'SELECT "INBOX"', "UID FETCH 1:%d (UID FLAGS)" % n])
        self.assertEqual(pairs[5]["untagged"], str(n))
        bodies_fetched = pairs[6:-1]
        self.assertEqual(sorted(e["cmd"] for e in bodies_fetched),
                         sorted("UID FETCH %d (BODY.PEEK[])" % (i + 1) for i in range(n)))
        self.assertEqual({e["status"] for e in bodies_fetched}, {"OK"})
        self.assertIn("1", {e["pipelined"] for e in bodies_fetched})  # mbsync pipelines them
        self.assertEqual((pairs[-1]["cmd"], pairs[-1]["status"]), ("LOGOUT", "OK"))

    def test_mbsync_compressed(self):
        """mbsync with COMPRESS=DEFLATE, as it syncs by default against Dovecot: after the
        COMPRESS OK the session is opaque, and the messages arrive intact all the same."""
        p = self.start_imap()
        close, _ = self.mbsync(p)
        self.assertEqual(close["opaque"], "1")
        # The LOGOUT went by inside deflate: mode tcp's reasons, whoever closed first.
        self.assertIn(close["end"], ("backend_closed", "client_eof"))
        self.assertEqual([e["cmd"] for e in p.find(ev="pair", sid=close["sid"])],
                         ["<greeting>", "LOGIN [redacted]", "COMPRESS DEFLATE"])
        p.wait_event(ev="compress_passthrough", sid=close["sid"])

    def test_config_refuses_keys_of_other_modes(self):
        for body, want in (
                ("mode = imap\nsmuggling = off\n",
                 "FILE:5: 'smuggling' needs mode = smtp in [listener imap]\n"),
                ("mode = smtp\nimap_id = on\n",
                 "FILE:5: 'imap_id' needs mode = imap in [listener imap]\n"),
                ("mode = imap\nxclient = on\n",
                 "FILE:5: 'xclient' needs mode = smtp or pop3 in [listener imap]\n")):
            with self.subTest(body=body):
                path = os.path.join(self.tmpdir, "t.conf")
                with open(path, "w") as f:
                    f.write("[listener imap]\nlisten = 127.0.0.1:1143\n"
                            "backend = 127.0.0.1:143\n" + body)
                r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True,
                                   timeout=10, stdin=subprocess.DEVNULL)
                self.assertEqual((r.returncode, r.stderr.decode().replace(path, "FILE")),
                                 (1, want))


if __name__ == "__main__":
    mxtest.main()
