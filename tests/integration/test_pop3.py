"""mode pop3 in front of a real Dovecot (a private instance, mxtest.PrivateDovecot) with real
clients: Python's poplib, curl (pop3://, --ssl-reqd, pop3s://) and fetchmail.

What it pins: every byte a client gets is Dovecot's (greeting, CAPA, dot-stuffed bodies)
except where mode pop3 changes it on purpose (STLS offered and withdrawn in CAPA, its own
-ERR [SYS/TEMP] replies); ev=pair lines with status=, reply=, lines= and size= (the
un-stuffed body, as LIST counts it); credentials never logged; xclient = on making Dovecot log
the real client address and port; STLS terminated, passed through and guarded against
injection; implicit TLS; backend_tls = starttls; end=quit / client_eof_without_quit; the
metric mxproxy_pop3_responses_total; keys that do not apply to mode pop3. Failures are driven
with a scripted POP3 server: a backend gone before a response, or in the middle of a body.

Needs root (Dovecot's mail processes run as nobody), dovecot-pop3d, curl and fetchmail.
"""

import base64
import os
import poplib
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxtest  # noqa: E402
from mxtest import HOST, Like  # noqa: E402

ALICE, ALICE_PW = "alice", "alice-Secret-7"
BOB, BOB_PW = "bob", "bob-Secret-9"
SECRETS = (ALICE_PW, BOB_PW, base64.b64encode(b"\0alice\0" + ALICE_PW.encode()).decode(),
           base64.b64encode(ALICE_PW.encode()).decode())
CLIENT_IP = "127.0.0.2"  # clients connect from here: Dovecot sees mxproxy at 127.0.0.1

# alice's mailbox: one message with lines that need dot-stuffing, one of 40 KiB.
M1 = (b"From: a@example.test\r\nSubject: one\r\n\r\nhello\r\n.dot line\r\n..two dots\r\n"
      b".\r\nend\r\n")
M2 = b"From: a@example.test\r\nSubject: two\r\n\r\n" + mxtest.message_body(40000)
# bob's mailbox, for fetchmail: 25 messages of different sizes.
BOB_MSGS = [b"From: b@example.test\r\nSubject: %d\r\n\r\n.%d\r\n" % (i, i) +
            mxtest.message_body(200 * i) for i in range(1, 26)]

DOVECOT = None


def setUpModule():
    global DOVECOT
    DOVECOT = mxtest.PrivateDovecot(protocols=("pop3", "pop3s"),
                                    users={ALICE: ALICE_PW, BOB: BOB_PW})
    for m in (M1, M2):
        DOVECOT.add_message(ALICE, m)
    for m in BOB_MSGS:
        DOVECOT.add_message(BOB, m)
    DOVECOT.start()


def tearDownModule():
    if DOVECOT is not None:
        DOVECOT.close()


def dovecot_addr(name="pop3"):
    return "%s:%d" % (HOST, DOVECOT.ports[name])


class POP3From(poplib.POP3):
    """poplib.POP3 from CLIENT_IP (poplib itself cannot choose its source)."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))


class Raw:
    """A raw POP3 client from CLIENT_IP: sends bytes, reads responses whole."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection((HOST, port), timeout,
                                             source_address=(CLIENT_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def read_until(self, term, timeout=5.0):
        deadline = time.monotonic() + timeout
        while term not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("EOF before %r; got %r" % (term, self.buf[-300:]))
            self.buf += chunk
        i = self.buf.index(term) + len(term)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def line(self):
        return self.read_until(b"\r\n")

    def multi(self):
        """A status line and, after +OK, its body through the terminator."""
        first = self.line()
        if not first.startswith(b"+OK"):
            return first
        if self.buf.startswith(b".\r\n"):
            return first + self.read_until(b".\r\n")
        return first + self.read_until(b"\r\n.\r\n")

    def read_eof(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def close(self):
        self.sock.close()


def capa_of(body):
    return body.split(b"\r\n")[1:-2]


class ScriptedPop3:
    """A POP3 server on a free port answering from a script: greeting, then for each command
    line received the next item: bytes to send, or None to close the connection (after
    sending half of the bytes of a following item when it is a tuple ('half', bytes))."""

    def __init__(self, greeting, script):
        self.lsock = socket.socket()
        self.lsock.bind((HOST, 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.addr = "%s:%d" % (HOST, self.port)
        self.greeting, self.script = greeting, list(script)
        self.received = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            conn.sendall(self.greeting)
            buf = b""
            for item in self.script:
                while b"\r\n" not in buf:
                    try:
                        chunk = conn.recv(4096)
                    except ConnectionResetError:
                        return  # mxproxy gave up on this server (test_xclient_not_trusted)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\r\n", 1)
                self.received.append(line)
                if item is None:
                    return
                if isinstance(item, tuple):  # ("half", bytes): send half, then close
                    conn.sendall(item[1][:len(item[1]) // 2])
                    time.sleep(0.1)
                    return
                conn.sendall(item)
            time.sleep(0.5)

    def close(self):
        self.lsock.close()
        self.thread.join(5)


class Pop3TestCase(mxtest.ProxyTestCase):

    def start_pop3(self, backend=None, admin=None, **opts):
        port = mxtest.free_port()
        opts.setdefault("mode", "pop3")
        glob = {"admin": "%s:%d" % (HOST, admin)} if admin else {}
        p = self.start_proxy(mxtest.config(mxtest.listener(
            "pop", "%s:%d" % (HOST, port), backend or dovecot_addr(), **opts), **glob))
        p.port = port
        return p

    def sid_from(self, p, port):
        return p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, port))["sid"]

    def assertNoSecrets(self, p):
        for line in p.raw:
            for secret in SECRETS:
                self.assertNotIn(secret, line)

    def direct(self, cmds):
        """What Dovecot answers to cmds (one write) on a direct connection, all of it."""
        s = socket.create_connection((HOST, DOVECOT.ports["pop3"]), 5)
        s.sendall(cmds)
        data = b""
        s.settimeout(5)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        return data


class Pop3Dovecot(Pop3TestCase):

    def test_poplib_session(self):
        """poplib through mxproxy sees Dovecot's bytes; the log pairs every command."""
        p = self.start_pop3(transcript="pairs")
        direct = poplib.POP3(HOST, DOVECOT.ports["pop3"], timeout=5)
        c = POP3From(HOST, p.port, timeout=5)
        sid = self.sid_from(p, c.sock.getsockname()[1])
        self.assertEqual(c.getwelcome(), direct.getwelcome())
        self.assertEqual(c.capa(), direct.capa())
        direct.quit()
        c.user(ALICE)
        c.pass_(ALICE_PW)
        resp, listing, _ = c.list()
        sizes = [int(x.split()[1]) for x in listing]
        self.assertEqual(sizes, [len(M1), len(M2)])
        for i, m in enumerate((M1, M2), 1):
            resp, lines, octets = c.retr(i)
            self.assertEqual(b"\r\n".join(lines) + b"\r\n", m)
        self.assertEqual(c.quit(), b"+OK Logging out.")
        close = self.assertPairs(p, sid, [
            {"proto": "pop3", "cmd": "<greeting>", "status": "+OK",
             "reply": "[XCLIENT] Dovecot (Debian) ready.", "ms": Like(r"[0-9.]+")},
            {"proto": "pop3", "cmd": "CAPA", "status": "+OK", "reply": "", "lines": 9,
             "size": 87, "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "USER [redacted]", "status": "+OK", "reply": "",
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "PASS [redacted]", "status": "+OK", "reply": "Logged in.",
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "LIST", "status": "+OK", "reply": "2 messages:",
             "lines": 2, "size": len(listing[0]) + len(listing[1]) + 4,
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "RETR 1", "status": "+OK",
             "reply": "%d octets" % len(M1), "lines": M1.count(b"\n"), "size": len(M1),
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "RETR 2", "status": "+OK",
             "reply": "%d octets" % len(M2), "lines": M2.count(b"\n"), "size": len(M2),
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "QUIT", "status": "+OK", "reply": "Logging out.",
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
        ])
        self.assertEqual((close["end"], close["authenticated"], close["retrieved"],
                          close["deleted"]), ("quit", "1", "2", "0"))
        self.assertNotIn("primary_error", close)
        self.assertNoSecrets(p)

    def test_pipelined_in_one_write_and_byte_by_byte(self):
        """RFC 2449 PIPELINING: every command in one write, then one byte per write; the client
        gets what Dovecot sends a direct client, byte for byte, and the pairs keep order."""
        cmds = (b"CAPA\r\nUSER alice\r\nPASS " + ALICE_PW.encode() + b"\r\nSTAT\r\nLIST\r\n"
                b"UIDL\r\nTOP 1 2\r\nRETR 1\r\nLIST 7\r\nNOOP\r\nQUIT\r\n")
        want = self.direct(cmds)
        # Dovecot's session ids in "[XCLIENT]"-less greetings are the same text; the login
        # response and everything else does not depend on the connection.
        p = self.start_pop3()
        for bytewise in (False, True):
            c = self.track(Raw(p.port))
            sid = self.sid_from(p, c.port)
            if bytewise:
                for i in range(len(cmds)):
                    c.send(cmds[i:i + 1])
                    time.sleep(0.0005)
            else:
                c.send(cmds)
            got = c.read_eof()
            self.assertEqual(got, want)
            close = p.close_of(sid)
            self.assertEqual(close["end"], "quit")
            pairs = p.find(ev="pair", sid=sid)
            self.assertEqual([e["cmd"] for e in pairs],
                             ["<greeting>", "CAPA", "USER [redacted]", "PASS [redacted]", "STAT",
                              "LIST", "UIDL", "TOP 1 2", "RETR 1", "LIST 7", "NOOP", "QUIT"])
            self.assertEqual([e["status"] for e in pairs], ["+OK"] * 9 + ["-ERR", "+OK", "+OK"])
            top = pairs[7]
            self.assertEqual((top["lines"], top["size"]), ("5", str(M1.index(b"\r\n\r\n") + 4
                                                                    + len(b"hello\r\n.dot line\r\n"))))
            if not bytewise:
                self.assertEqual([e["pipelined"] for e in pairs[1:]], ["0"] + ["1"] * 10)
        self.assertNoSecrets(p)

    def test_xclient_gives_dovecot_the_client_address(self):
        """xclient = on: Dovecot logs the client's own address and port (rip=, rport=); without
        it, mxproxy's."""
        for xclient in ("on", "off"):
            p = self.start_pop3(xclient=xclient, transcript="full")
            c = POP3From(HOST, p.port, timeout=5)
            cport = c.sock.getsockname()[1]
            sid = self.sid_from(p, cport)
            c.user(ALICE)
            c.pass_(ALICE_PW)
            c.quit()
            p.close_of(sid)
            if xclient == "on":
                DOVECOT.wait_log(r"pop3-login: Info: Login: user=<alice>, method=PLAIN, "
                                 r"rip=127\.0\.0\.2, rport=%d, lip=127\.0\.0\.1" % cport)
                ev = p.find(ev="xclient", sid=sid)
                self.assertEqual(len(ev), 1)
                self.assertEvent(ev[0], "xclient", {"status": "+OK", "reply": "Updated"})
                lines = [(e["dir"], e["text"]) for e in p.find(ev="line", sid=sid)]
                self.assertIn(("proxy", "XCLIENT ADDR=127.0.0.2 PORT=%d" % cport), lines)
                self.assertIn(("client", "PASS [redacted]"), lines)
            else:
                self.assertNotRegex(DOVECOT.log(), r"rport=%d," % cport)
                self.assertEqual(p.find(ev="xclient", sid=sid), [])
            self.assertNoSecrets(p)

    def test_sasl_answer_behind_a_refused_auth(self):
        """A client that sends its SASL answer behind AUTH without waiting for "+ ", refused by
        Dovecot (a mechanism it does not offer): the line reaches Dovecot, which answers it, and
        is logged [redacted]."""
        token = base64.b64encode(b"\0alice\0" + ALICE_PW.encode())
        for transcript in ("pairs", "full"):
            with self.subTest(transcript=transcript):
                p = self.start_pop3(transcript=transcript)
                c = socket.create_connection((HOST, p.port), 5)
                f = c.makefile("rb")
                self.assertTrue(f.readline().startswith(b"+OK"))
                sid = p.sid_of(c.getsockname()[1])
                c.sendall(b"AUTH X-NONE\r\n" + token + b"\r\nQUIT\r\n")
                got = [f.readline()[:4] for _ in range(3)]
                self.assertEqual(got, [b"-ERR", b"-ERR", b"+OK "])
                c.close()
                p.close_of(sid)
                pairs = [(e["cmd"], e["status"]) for e in p.find(ev="pair", sid=sid)]
                self.assertEqual(pairs[1:], [("AUTH X-NONE", "-ERR"), ("[redacted]", "-ERR"),
                                             ("QUIT", "+OK")])
                if transcript == "full":
                    client = [e["text"] for e in p.find(ev="line", sid=sid)
                              if e["dir"] == "client"]
                    self.assertEqual(client, ["AUTH X-NONE", "[redacted]", "QUIT"])
                self.assertNoSecrets(p)

    def test_client_xclient_refused(self):
        """A client's own XCLIENT never reaches Dovecot, which trusts mxproxy's address."""
        p = self.start_pop3()
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        greeting = c.line()
        self.assertTrue(greeting.startswith(b"+OK "), greeting)
        c.send(b"XCLIENT ADDR=192.0.2.66 PORT=1\r\nUSER alice\r\nPASS " + ALICE_PW.encode() +
               b"\r\nQUIT\r\n")
        self.assertEqual(c.line(), b"-ERR Command not permitted\r\n")
        self.assertEqual(c.line(), b"+OK\r\n")
        self.assertEqual(c.line(), b"+OK Logged in.\r\n")
        self.assertEqual(c.line(), b"+OK Logging out.\r\n")
        p.close_of(sid)
        DOVECOT.wait_log(r"Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.1, rport=\d+")
        self.assertNotIn("192.0.2.66", DOVECOT.log())
        pair = p.find(ev="pair", sid=sid, cmd="XCLIENT ADDR=192.0.2.66 PORT=1")
        self.assertEqual((pair[0]["status"], pair[0]["local"]), ("-ERR", "1"))

    def test_curl_plain(self):
        """curl pop3:// lists and retrieves, logging in with AUTH PLAIN and AUTH LOGIN."""
        p = self.start_pop3()
        url = "pop3://%s:%d/" % (HOST, p.port)
        for opts in ([], ["--login-options", "AUTH=PLAIN"], ["--login-options", "AUTH=LOGIN"]):
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "--interface", CLIENT_IP,
                                "-u", "%s:%s" % (ALICE, ALICE_PW)] + opts + [url + "1"],
                               capture_output=True, timeout=20)
            self.assertEqual((r.returncode, r.stderr), (0, b""))
            self.assertEqual(r.stdout, M1)
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "-u", "%s:%s" % (ALICE, ALICE_PW),
                            url], capture_output=True, timeout=20)
        self.assertEqual(r.stdout, b"1 %d\r\n2 %d\r\n" % (len(M1), len(M2)))
        # curl picks SASL PLAIN from Dovecot's CAPA and sends no initial response: one "+ "
        # round for PLAIN (the listing's login too), two for LOGIN; the answers are never
        # logged. Counted once all four sessions closed: each pair is logged before its close.
        p.wait_count(4, ev="close", end="quit")
        plains = p.find(ev="pair", cmd="AUTH PLAIN")
        self.assertEqual([(e["rounds"], e["status"]) for e in plains], [("1", "+OK")] * 3)
        logins = p.find(ev="pair", cmd="AUTH LOGIN")
        self.assertEqual([(e["rounds"], e["status"]) for e in logins], [("2", "+OK")])
        self.assertNoSecrets(p)

    def test_stls_terminated(self):
        """client_tls = starttls: mxproxy offers STLS in CAPA, answers it, and withdraws it
        inside TLS; curl --ssl-reqd and poplib's stls() fetch mail; plaintext after STLS in
        the same write is dropped, never executed inside TLS."""
        pki = mxtest.pki()
        p = self.start_pop3(client_tls="starttls", cert=pki.mx.cert, key=pki.mx.key,
                            backend=None)
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--ssl-reqd", "--cacert", pki.ca,
                            "--resolve", "mx.example.test:%d:%s" % (p.port, HOST),
                            "-u", "%s:%s" % (ALICE, ALICE_PW),
                            "pop3://mx.example.test:%d/2" % p.port],
                           capture_output=True, timeout=20)
        self.assertEqual((r.returncode, r.stderr), (0, b""))
        self.assertEqual(r.stdout, M2)

        c = POP3From(HOST, p.port, timeout=5)
        sid = self.sid_from(p, c.sock.getsockname()[1])
        self.assertIn("STLS", c.capa())
        c.stls(context=mxtest.client_context(check_hostname=False))
        caps = c.capa()
        self.assertNotIn("STLS", caps)
        self.assertIn("PIPELINING", caps)
        c.user(ALICE)
        c.pass_(ALICE_PW)
        self.assertEqual(c.stat(), (2, len(M1) + len(M2)))
        c.quit()
        close = p.close_of(sid)
        self.assertEqual(close["end"], "quit")
        stls = p.find(ev="pair", sid=sid, cmd="STLS")
        self.assertEqual((stls[0]["status"], stls[0]["reply"], stls[0]["local"]),
                         ("+OK", "Begin TLS negotiation now", "1"))

        # The injection guard: what follows STLS in its write is dropped.
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        c.line()
        c.send(b"STLS\r\nUSER evil\r\nPASS evil\r\n")
        self.assertEqual(c.line(), b"+OK Begin TLS negotiation now\r\n")
        tls = mxtest.client_context(check_hostname=False).wrap_socket(
            c.sock, server_hostname="mx.example.test")
        tls.sendall(b"USER alice\r\n")
        self.assertEqual(tls.recv(100), b"+OK\r\n")
        tls.sendall(b"STLS\r\n")
        self.assertEqual(tls.recv(100), b"-ERR TLS already active\r\n")
        tls.close()
        ev = p.wait_event(ev="starttls_injection", sid=sid)
        self.assertEqual(ev["bytes"], str(len(b"USER evil\r\nPASS evil\r\n")))
        self.assertEqual(p.find(ev="pair", sid=sid, cmd="USER [redacted]"), [])

    def test_stls_passthrough(self):
        """Without termination STLS goes to Dovecot; after its +OK the session is opaque."""
        p = self.start_pop3()
        c = POP3From(HOST, p.port, timeout=5)
        sid = self.sid_from(p, c.sock.getsockname()[1])
        c.stls(context=mxtest.client_context(check_hostname=False))
        c.user(ALICE)
        c.pass_(ALICE_PW)
        self.assertEqual(c.stat()[0], 2)
        c.quit()
        close = p.close_of(sid)
        self.assertEqual(close["opaque"], "1")
        p.wait_event(ev="starttls_passthrough", sid=sid)
        DOVECOT.wait_log(r"Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.1, rport=\d+, "
                         r"lip=127\.0\.0\.1, mpid=\d+, TLS")

    def test_implicit_tls_pop3s(self):
        """client_tls = implicit (995-style): curl pop3s:// and poplib.POP3_SSL."""
        pki = mxtest.pki()
        p = self.start_pop3(client_tls="implicit", cert=pki.mx.cert, key=pki.mx.key)
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", pki.ca,
                            "--resolve", "mx.example.test:%d:%s" % (p.port, HOST),
                            "-u", "%s:%s" % (ALICE, ALICE_PW),
                            "pop3s://mx.example.test:%d/1" % p.port],
                           capture_output=True, timeout=20)
        self.assertEqual((r.returncode, r.stderr, r.stdout), (0, b"", M1))
        c = poplib.POP3_SSL(HOST, p.port, timeout=5, context=mxtest.client_context(
            check_hostname=False))
        caps = c.capa()  # Dovecot offers STLS to mxproxy, mxproxy not inside TLS
        self.assertNotIn("STLS", caps)
        self.assertIn("PIPELINING", caps)
        try:
            c._shortcmd("STLS")
            self.fail("STLS inside TLS accepted")
        except poplib.error_proto as e:
            self.assertEqual(e.args[0], b"-ERR TLS already active")
        c.user(ALICE)
        c.pass_(ALICE_PW)
        c.quit()
        p.wait_count(2, ev="close", end="quit")

    def test_backend_tls_starttls_then_xclient(self):
        """backend_tls = starttls: mxproxy sends STLS to Dovecot itself, then XCLIENT, then the
        client's first command; the client speaks plaintext to mxproxy."""
        pki = mxtest.pki()
        p = self.start_pop3(backend_tls="starttls", backend_ca=pki.ca,
                            backend_sni="mx.example.test", xclient="on")
        c = POP3From(HOST, p.port, timeout=5)
        cport = c.sock.getsockname()[1]
        sid = self.sid_from(p, cport)
        c.user(ALICE)
        c.pass_(ALICE_PW)
        self.assertEqual(c.stat()[0], 2)
        c.quit()
        self.assertEqual(p.close_of(sid)["end"], "quit")
        DOVECOT.wait_log(r"Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.2, "
                         r"rport=%d, lip=127\.0\.0\.1, mpid=\d+, TLS" % cport)

    def test_backend_tls_implicit(self):
        """backend_tls = implicit: mxproxy speaks TLS to Dovecot's pop3s port from the first
        byte; the greeting and responses are read inside it."""
        pki = mxtest.pki()
        p = self.start_pop3(backend=dovecot_addr("pop3s"), backend_tls="implicit",
                            backend_ca=pki.ca, backend_sni="mx.example.test", xclient="on")
        c = POP3From(HOST, p.port, timeout=5)
        cport = c.sock.getsockname()[1]
        sid = self.sid_from(p, cport)
        self.assertNotIn("STLS", c.capa())
        c.user(ALICE)
        c.pass_(ALICE_PW)
        self.assertEqual(c.retr(1)[1], M1.split(b"\r\n")[:-1])
        c.quit()
        self.assertEqual(p.close_of(sid)["end"], "quit")
        DOVECOT.wait_log(r"Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.2, "
                         r"rport=%d, lip=127\.0\.0\.1, mpid=\d+, TLS" % cport)

    def test_fetchmail_retrieves_every_message(self):
        """fetchmail fetches all of bob's messages over POP3 through mxproxy, each intact."""
        p = self.start_pop3()
        d = tempfile.mkdtemp(prefix="mxtest-fetchmail-", dir=self.tmpdir)
        out = os.path.join(d, "out")
        os.mkdir(out)
        mda = os.path.join(d, "mda.sh")
        with open(mda, "w") as f:
            f.write('#!/bin/sh\nexec cat > "%s/m.$$"\n' % out)
        os.chmod(mda, 0o755)
        rc = os.path.join(d, "fetchmailrc")
        with open(rc, "w") as f:
            f.write('poll %s service %d proto pop3 auth password timeout 10\n'
                    '  user "%s" there with password "%s" is root here\n'
                    '  mda "%s" fetchall keep\n'
                    % (HOST, p.port, BOB, BOB_PW, mda))
        os.chmod(rc, 0o600)
        env = dict(os.environ, FETCHMAILHOME=d, HOME=d)
        # No Received: header (--invisible), and no STLS: Dovecot offers it, with a
        # certificate fetchmail would not trust (--sslproto '').
        r = subprocess.run(["fetchmail", "-f", rc, "--nosyslog", "--nodetach", "-v",
                            "--invisible", "--sslproto", ""],
                           capture_output=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stdout.decode(errors="replace")[-2000:] +
                         r.stderr.decode(errors="replace")[-2000:])
        got = []
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as f:
                got.append(f.read())
        want = [m.replace(b"\r\n", b"\n") for m in BOB_MSGS]
        self.assertEqual(sorted(got), sorted(want))
        # The close line first: every pair of the session is logged before it.
        close = p.wait_event(ev="close")
        self.assertEqual((close["end"], close["retrieved"]), ("quit", str(len(BOB_MSGS))))
        retrs = p.find(ev="pair", status="+OK")
        sizes = sorted(int(e["size"]) for e in retrs if e["cmd"].startswith("RETR "))
        self.assertEqual(sizes, sorted(len(m) for m in BOB_MSGS))
        self.assertNoSecrets(p)

    def test_metrics(self):
        """mxproxy_pop3_responses_total counts responses by command and status."""
        admin = mxtest.free_port()
        p = self.start_pop3(admin=admin)
        c = POP3From(HOST, p.port, timeout=5)
        c.user(ALICE)
        c.pass_(ALICE_PW)
        c.retr(1)
        try:
            c.retr(99)
        except poplib.error_proto:
            pass
        c.quit()
        p.wait_event(ev="close")
        body = urllib.request.urlopen("http://%s:%d/metrics" % (HOST, admin), timeout=5).read()
        text = body.decode()
        for line in ('mxproxy_pop3_responses_total{command="none",status="+OK"} 1',
                     'mxproxy_pop3_responses_total{command="RETR",status="+OK"} 1',
                     'mxproxy_pop3_responses_total{command="RETR",status="-ERR"} 1',
                     'mxproxy_pop3_responses_total{command="PASS",status="+OK"} 1',
                     'mxproxy_pop3_responses_total{command="STLS",status="-ERR"} 0'):
            self.assertIn(line + "\n", text)

    def test_client_eof_without_quit(self):
        p = self.start_pop3()
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        c.line()
        c.send(b"CAPA\r\n")
        c.multi()
        c.close()
        self.assertEqual(p.close_of(sid)["end"], "client_eof_without_quit")


class Pop3Failures(Pop3TestCase):

    def test_no_backend(self):
        p = self.start_pop3(backend="%s:%d" % (HOST, mxtest.free_port()))
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        self.assertEqual(c.read_eof(), b"-ERR [SYS/TEMP] mxproxy: no mail server available, "
                                       b"try again later\r\n")
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["primary_error"]),
                         ("connect_failed", "-ERR [SYS/TEMP] mxproxy: no mail server available, "
                                            "try again later"))

    def test_backend_gone_with_command_outstanding(self):
        b = self.track(ScriptedPop3(b"+OK scripted\r\n", [b"+OK\r\n", None]))
        p = self.start_pop3(backend=b.addr)
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        self.assertEqual(c.line(), b"+OK scripted\r\n")
        c.send(b"USER alice\r\nSTAT\r\nNOOP\r\n")
        self.assertEqual(c.read_eof(), b"+OK\r\n-ERR [SYS/TEMP] mxproxy: backend closed the "
                                       b"connection\r\n")
        close = self.assertPairs(p, sid, [
            {"proto": "pop3", "cmd": "<greeting>", "status": "+OK", "reply": "scripted",
             "ms": Like(r"[0-9.]+")},
            {"proto": "pop3", "cmd": "USER [redacted]", "status": "+OK", "reply": "",
             "ms": Like(r"[0-9.]+"), "pipelined": 0},
            {"proto": "pop3", "cmd": "STAT", "status": "-ERR",
             "reply": "[SYS/TEMP] mxproxy: backend closed the connection",
             "ms": Like(r"[0-9.]+"), "pipelined": 1, "local": 1},
            {"proto": "pop3", "cmd": "NOOP", "pipelined": 1, "aborted": 1},
        ])
        self.assertEqual((close["end"], close["primary_error"]),
                         ("backend_closed",
                          "-ERR [SYS/TEMP] mxproxy: backend closed the connection"))

    def test_backend_gone_in_a_body(self):
        """A body cut by the backend is never ended with mxproxy's -ERR (the client would take
        it for a line of the message): the client sees the cut and the close."""
        body = b"+OK 300 octets\r\n" + b"x" * 298 + b"\r\n.\r\n"
        b = self.track(ScriptedPop3(b"+OK scripted\r\n", [("half", body)]))
        p = self.start_pop3(backend=b.addr)
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        c.line()
        c.send(b"RETR 1\r\n")
        self.assertEqual(c.read_eof(), body[:len(body) // 2])
        close = p.close_of(sid)
        self.assertEqual(close["end"], "backend_closed")
        self.assertNotIn("primary_error", close)
        retr = p.find(ev="pair", sid=sid, cmd="RETR 1")
        self.assertEqual(retr[0]["aborted"], "1")

    def test_backend_gone_in_a_capa_being_rewritten(self):
        """client_tls = starttls holds the CAPA response to add STLS; a backend gone inside it
        (mid status line, or after some capability lines) gets the client the -ERR alone,
        never glued to the held bytes nor after a cut list."""
        for cut in (b"+OK Capa", b"+OK\r\nUSER\r\nTOP\r\n"):
            with self.subTest(cut=cut):
                b = self.track(ScriptedPop3(b"+OK scripted\r\n", [("half", cut * 2)]))
                p = self.start_pop3(backend=b.addr, client_tls="starttls",
                                    cert=mxtest.pki().mx.cert, key=mxtest.pki().mx.key)
                c = self.track(Raw(p.port))
                sid = self.sid_from(p, c.port)
                self.assertEqual(c.line(), b"+OK scripted\r\n")
                c.send(b"CAPA\r\n")
                self.assertEqual(c.read_eof(), b"-ERR [SYS/TEMP] mxproxy: backend closed the "
                                               b"connection\r\n")
                self.assertEqual(p.close_of(sid)["primary_error"],
                                 "-ERR [SYS/TEMP] mxproxy: backend closed the connection")
                capa = p.find(ev="pair", sid=sid, cmd="CAPA")
                self.assertEqual((capa[0]["status"], capa[0]["local"]), ("-ERR", "1"))

    def test_backend_garbage(self):
        b = self.track(ScriptedPop3(b"+OK scripted\r\n", [b"HTTP/1.1 400 Bad Request\r\n"]))
        p = self.start_pop3(backend=b.addr)
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        c.line()
        c.send(b"NOOP\r\n")
        self.assertEqual(c.read_eof(), b"-ERR [SYS/TEMP] mxproxy: backend protocol error\r\n")
        ev = p.wait_event(ev="protocol_error", sid=sid)
        self.assertEqual(ev["text"], "HTTP/1.1 400 Bad Request")

    def test_xclient_not_trusted(self):
        """xclient = on against a server whose greeting lacks [XCLIENT] (Dovecot does not
        trust mxproxy): the client's command never reaches it."""
        b = self.track(ScriptedPop3(b"+OK Dovecot ready.\r\n", [b"+OK\r\n"]))
        p = self.start_pop3(backend=b.addr, xclient="on")
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        self.assertEqual(c.line(), b"+OK Dovecot ready.\r\n")
        c.send(b"USER alice\r\n")
        self.assertEqual(c.read_eof(), b"-ERR [SYS/TEMP] mxproxy: XCLIENT with the mail server "
                                       b"failed, try again later\r\n")
        self.assertEqual(p.close_of(sid)["end"], "xclient_error")
        self.assertEqual(b.received, [])

    def test_require_tls_idle_and_limit(self):
        """require_tls refuses a login before STLS; idle_timeout and max_connections say why
        with their own -ERR [SYS/TEMP]."""
        pki = mxtest.pki()
        p = self.start_pop3(client_tls="starttls", require_tls="on", cert=pki.mx.cert,
                            key=pki.mx.key, idle_timeout="400ms", max_connections=1)
        c = self.track(Raw(p.port))
        sid = self.sid_from(p, c.port)
        c.line()
        c.send(b"CAPA\r\nUSER alice\r\nAUTH PLAIN\r\nNOOP\r\n")
        capa = c.multi()
        self.assertIn(b"\r\nSTLS\r\n", capa)
        self.assertEqual(c.line(), b"-ERR Must issue a STLS command first\r\n")
        self.assertEqual(c.line(), b"-ERR Must issue a STLS command first\r\n")
        self.assertEqual(c.line(), b"-ERR Unknown command.\r\n")  # Dovecot's: NOOP may pass
        # A second client over max_connections = 1.
        d = self.track(Raw(p.port))
        self.assertEqual(d.read_eof(), b"-ERR [SYS/TEMP] mxproxy: too many connections, try "
                                       b"again later\r\n")
        t0 = time.monotonic()
        self.assertEqual(c.read_eof(), b"-ERR [SYS/TEMP] mxproxy: idle timeout, closing "
                                       b"connection\r\n")
        self.assertWithin(time.monotonic() - t0, 0.2, 2.0, "idle_timeout")
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["authenticated"]), ("idle_timeout", "0"))
        self.assertEqual(close["primary_error"], "-ERR Must issue a STLS command first")
        self.assertEqual(len(p.find(ev="pair", sid=sid, local="1")), 2)

    def test_config_keys(self):
        """mxproxy -t: keys of mode smtp alone are refused in mode pop3."""
        for key, value in (("smuggling", "off"), ("pass_client_xclient", "on")):
            text = mxtest.config(mxtest.listener("pop", "%s:%d" % (HOST, mxtest.free_port()),
                                                 dovecot_addr(), mode="pop3",
                                                 **{key: value}))
            path = os.path.join(self.tmpdir, "t.conf")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True,
                               timeout=10)
            line = text.splitlines().index("%s = %s" % (key, value)) + 1
            self.assertEqual((r.returncode, r.stderr.decode().replace(path, "FILE")),
                             (1, "FILE:%d: '%s' needs mode = smtp in [listener pop]\n"
                              % (line, key)))


if __name__ == "__main__":
    mxtest.main()
