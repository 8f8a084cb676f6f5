"""mode = smtp: guard rails. Overlong and malformed command lines, SMTP
smuggling (reject, normalize, off) against a lenient server that falls for it,
STARTTLS passthrough and command injection, slow and endless clients, and the
configuration keys.

The lenient backend (ScriptedSmtpBackend(lenient=True)) takes any of the
smuggling patterns as the end of a message and parses what follows as
commands, like the MTAs the 2023 SMTP smuggling attacks hit. LenientBackendTest
checks that it does, without mxproxy, so a guard test cannot pass because the
backend was never fooled in the first place; smuggling = off shows the attack
through mxproxy.
"""

import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import unittest

import mxtest
from mxtest import pair, smtp_close

EHLO_REPLY = (b"250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
              b"250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
EHLO = b"EHLO client.example\r\n"
ENVELOPE = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
ENVELOPE_REPLIES = (b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n"
                    b"354 End data with <CR><LF>.<CR><LF>\r\n")
TOO_LONG = b"500 5.5.2 Line too long\r\n"
BAD_LINE = b"500 5.5.2 Syntax error, bare CR or LF in command\r\n"
SMUGGLING_554 = b"554 5.7.0 Message rejected: bare CR or LF around end of data\r\n"
SMUGGLING_421 = b"421 4.7.0 mxproxy: closing connection after a smuggling attempt\r\n"
OK = b"250 2.0.0 ok\r\n"

# A lone dot between bare CR/LF, and the pattern= mxproxy names it by.
PATTERNS = [(b"\n.\n", "LF.LF"), (b"\n.\r\n", "LF.CRLF"), (b"\r\n.\n", "CRLF.LF"),
            (b"\r.\r", "CR.CR"), (b"\r\n.\r", "CRLF.CR")]
HEAD = b"Subject: invoice\r\n\r\nhello"
# What the attacker wants the server to run as a second transaction.
SMUGGLED = (b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: ceo@example.org\r\n\r\nforged\r\n")


def smuggling_body(pattern):
    """A body, final CRLF.CRLF not included, with pattern after HEAD."""
    return HEAD + pattern + SMUGGLED


class SmtpGuardsTest(mxtest.ProxyTestCase):

    def open(self, proxy):
        c = self.client(proxy.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO.rstrip()), EHLO_REPLY)
        return c, proxy.sid_of(c)

    def quit(self, c):
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))

    def greeting_ehlo(self):
        return [pair("<greeting>", 220, "scripted ESMTP"),
                pair("EHLO client.example", 250, "scripted", lines=6)]

    # ---- command lines

    def test_overlong_line_answered_in_order_never_forwarded(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512)
        c, sid = self.open(p)
        long_line = b"NOOP " + b"x" * 600 + b"\r\n"
        c.send(b"NOOP\r\n" + long_line + b"NOOP\r\n")
        want = OK + TOO_LONG + OK
        self.assertEqual(c.recv_exact(len(want)), want)
        self.quit(c)
        close = self.assertPairs(p, sid, self.greeting_ehlo() + [
            pair("NOOP", 250, "ok", esc="2.0.0"),
            pair("[line too long]", 500, "Line too long", esc="5.5.2", pipelined=1, local=1),
            pair("NOOP", 250, "ok", esc="2.0.0", pipelined=1),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))
        warn = p.find(ev="line_too_long", sid=sid)
        self.assertEqual(len(warn), 1)
        self.assertEvent(warn[0], "line_too_long", {"reason": "line too long", "limit": 512},
                         lvl="warn")
        rec = b.wait_conns(1)
        self.assertEqual(bytes(rec.received), EHLO + b"NOOP\r\nNOOP\r\nQUIT\r\n")

    def test_pipelined_after_refused_xclient_and_overlong_line(self):
        # Local answers (550, 500) in the middle of one write, more of them
        # than fit in flight: what follows them, a transaction and a body held
        # until the 354, is still parsed.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(EHLO + b"XCLIENT ADDR=192.0.2.66\r\n" + ENVELOPE + b"hi\r\n.\r\n" +
               b"NOOP " + b"x" * 600 + b"\r\n" + b"XFORWARD NAME=x\r\n" * 100 + b"NOOP\r\n")
        want = (EHLO_REPLY + b"550 5.7.0 Command not permitted\r\n" + ENVELOPE_REPLIES +
                b"250 2.0.0 queued as 1\r\n" + TOO_LONG +
                b"550 5.7.0 Command not permitted\r\n" * 100 + OK)
        self.assertEqual(c.recv_exact(len(want)), want)
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(bytes(rec.received),
                         EHLO + ENVELOPE + b"hi\r\n.\r\nNOOP\r\nQUIT\r\n")

    def test_line_length_limit_counts_crlf(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512)
        c, sid = self.open(p)
        fits = b"NOOP " + b"y" * (512 - 7) + b"\r\n"
        over = b"NOOP " + b"z" * (513 - 7) + b"\r\n"
        self.assertEqual((len(fits), len(over)), (512, 513))
        c.send(fits)
        self.assertEqual(c.read_reply(), OK)
        c.send(over)
        self.assertEqual(c.read_reply(), TOO_LONG)
        # the same limit, the line split into one-byte writes
        for i in range(len(over)):
            c.send(over[i:i + 1])
        self.assertEqual(c.read_reply(), TOO_LONG)
        self.quit(c)
        p.close_of(sid)
        self.assertEqual(bytes(b.wait_conns(1).received), EHLO + fits + b"QUIT\r\n")
        self.assertEqual(len(p.find(ev="line_too_long", sid=sid)), 2)

    def test_default_limit_is_4096(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"NOOP " + b"y" * (4096 - 7) + b"\r\n")
        self.assertEqual(c.read_reply(), OK)
        c.send(b"NOOP " + b"y" * (4097 - 7) + b"\r\n")
        self.assertEqual(c.read_reply(), TOO_LONG)
        self.quit(c)
        p.close_of(sid)  # every line of the session is written by then
        warn = p.find(ev="line_too_long", sid=sid)
        self.assertEqual(len(warn), 1)
        self.assertEvent(warn[0], "line_too_long", {"reason": "line too long", "limit": 4096},
                         lvl="warn")

    def test_bare_lf_cr_nul_in_command_line(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        cases = [(b"RSET\n", "bare LF"), (b"RS\rET\r\n", "bare CR"), (b"RS\0ET\r\n", "NUL")]
        for bad, _ in cases:
            c.send(bad + b"NOOP\r\n")
            self.assertEqual(c.recv_exact(len(BAD_LINE + OK)), BAD_LINE + OK)
        self.quit(c)
        # mxproxy answers a bad line at once: the NOOP after it waits for nothing
        bad_pair = pair("[invalid line]", 500, "Syntax error, bare CR or LF in command",
                        esc="5.5.2", local=1)
        self.assertPairs(p, sid, self.greeting_ehlo() + [
            bad_pair, pair("NOOP", 250, "ok", esc="2.0.0")] * 3 + [
            pair("QUIT", 221, "Bye", esc="2.0.0")])
        warns = p.find(ev="bad_line", sid=sid)
        self.assertEqual(len(warns), 3)
        for ev, (_, reason) in zip(warns, cases):
            self.assertEvent(ev, "bad_line", {"reason": reason, "limit": 4096}, lvl="warn")
        # no RSET, broken or whole, reached the server
        self.assertEqual(bytes(b.wait_conns(1).received), EHLO + b"NOOP\r\n" * 3 + b"QUIT\r\n")

    def test_overlong_auth_line_cancels_the_exchange(self):
        # Inside AUTH an overlong line is no command to refuse: mxproxy sends
        # the server a "*" (cancel) in its place and the server answers.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512, transcript="full")
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        token = b"QUJD" * 200
        self.assertEqual(c.cmd(token), b"501 5.7.0 Authentication cancelled\r\n")
        self.assertEqual(c.cmd(b"NOOP"), OK)
        self.quit(c)
        close = self.assertPairs(p, sid, self.greeting_ehlo() + [
            pair("AUTH LOGIN", 501, "Authentication cancelled", esc="5.7.0", rounds=1),
            pair("NOOP", 250, "ok", esc="2.0.0"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))
        self.assertEqual(b.wait_conns(1).auth_lines, [b"*"])
        self.assertNotIn("QUJD", "\n".join(p.raw))

    # ---- SMTP smuggling

    def send_envelope(self, c):
        c.send(ENVELOPE)
        self.assertEqual(c.recv_exact(len(ENVELOPE_REPLIES)), ENVELOPE_REPLIES)

    def test_smuggling_reject(self):
        b = self.scripted(lenient=True)
        p = self.start_smtp_proxy(b.addr)
        # every pattern sent whole, then one byte per write; and one right
        # after DATA's own CRLF
        cases = ([(pat, name, False) for pat, name in PATTERNS]
                 + [(pat, name, True) for pat, name in PATTERNS] + [(b".\n", "CRLF.LF", False)])
        for n, (pattern, name, split) in enumerate(cases, 1):
            with self.subTest(pattern=name, split=split, body_start=pattern == b".\n"):
                c, sid = self.open(p)
                self.send_envelope(c)
                body = (pattern + SMUGGLED) if pattern == b".\n" else smuggling_body(pattern)
                data = body + b"\r\n.\r\n"
                if split:
                    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for i in range(len(data)):
                        c.send(data[i:i + 1])
                        time.sleep(0.0005)
                else:
                    c.send(data)
                self.assertEqual(c.wait_closed(3), ("eof", SMUGGLING_554 + SMUGGLING_421))
                close = self.assertPairs(p, sid, self.greeting_ehlo() + [
                    pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
                    pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5",
                         pipelined=1),
                    pair("DATA", 354, "End data with <CR><LF>.<CR><LF>", pipelined=1),
                    pair(".", 554, "Message rejected: bare CR or LF around end of data",
                         esc="5.7.0", size=len(body) + 2, local=1, primary=1),
                ])
                self.assertEvent(close, "close", smtp_close(
                    "smuggling", error="smuggling", helo="client.example",
                    mail_from="a@example.com", rcpt_ok=1,
                    primary_error=SMUGGLING_554.decode().rstrip("\r\n")))
                warn = p.find(ev="smuggling", sid=sid)
                self.assertEqual(len(warn), 1)
                self.assertEvent(warn[0], "smuggling", {"pattern": name, "action": "reject"},
                                 lvl="warn")
                # the server saw no end of data, so no message and no smuggled command
                rec = b.wait_conns(n)
                self.assertTrue(rec.closed.wait(3), "backend connection still open")
                self.assertEqual(rec.bodies, [])
                self.assertEqual(rec.commands, [EHLO.rstrip(), b"MAIL FROM:<a@example.com>",
                                                b"RCPT TO:<b@example.com>", b"DATA"])
                self.assertNotIn(b"evil", bytes(rec.received))

    def test_smuggling_normalize(self):
        b = self.scripted(lenient=True)
        p = self.start_smtp_proxy(b.addr, smuggling="normalize")
        for n, (pattern, name) in enumerate(PATTERNS, 1):
            with self.subTest(pattern=name):
                c, sid = self.open(p)
                self.send_envelope(c)
                # plus a bare LF elsewhere: normalize makes every line end CRLF
                body = smuggling_body(pattern) + b"tail\nend\r\n"
                c.send(body + b".\r\n")
                self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
                self.quit(c)
                want = HEAD + b"\r\n..\r\n" + SMUGGLED + b"tail\r\nend\r\n"
                rec = b.wait_conns(n)
                self.assertTrue(rec.closed.wait(3))
                self.assertEqual(rec.bodies, [want])
                self.assertEqual(bytes(rec.received), EHLO + ENVELOPE + want + b".\r\nQUIT\r\n")
                close = self.assertPairs(p, sid, self.greeting_ehlo() + [
                    pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
                    pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5",
                         pipelined=1),
                    pair("DATA", 354, "End data with <CR><LF>.<CR><LF>", pipelined=1),
                    pair(".", 250, "queued as 1", esc="2.0.0", size=len(body)),
                    pair("QUIT", 221, "Bye", esc="2.0.0"),
                ])
                self.assertEvent(close, "close", smtp_close(
                    "quit", helo="client.example", mail_from="a@example.com", rcpt_ok=1,
                    messages=1))
                warn = p.find(ev="smuggling", sid=sid)
                self.assertEqual(len(warn), 1)
                self.assertEvent(warn[0], "smuggling", {"pattern": name, "action": "normalize"},
                                 lvl="warn")

    def test_smuggling_normalize_loses_no_byte(self):
        # One rule: every bare CR or LF becomes CRLF, then a dot that begins a line only
        # because of that rewrite is stuffed, so the server's un-stuffing keeps it.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, smuggling="normalize")
        body = b"a\n.foo\rb\r\n..stuffed\n..two\r\n"
        want = b"a\r\n..foo\r\nb\r\n..stuffed\r\n...two\r\n"
        c, sid = self.open(p)
        self.send_envelope(c)
        for chunk in (body[:2], body[2:3], body[3:], b".\r\n"):  # split around the dot
            c.send(chunk)
            time.sleep(0.02)
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.bodies, [want])
        stored = b"".join(l[1:] if l.startswith(b".") else l
                          for l in rec.bodies[0].splitlines(keepends=True))
        self.assertEqual(stored, b"a\r\n.foo\r\nb\r\n.stuffed\r\n..two\r\n")
        self.assertEqual(p.find(ev="smuggling", sid=sid), [])

    def test_smuggling_off_passes_bytes_and_fools_a_lenient_server(self):
        # smuggling = off is for servers that are not lenient: mxproxy then
        # forwards the body byte for byte. A lenient server behind it is
        # fooled, which is what this test shows (and why reject is the default).
        b = self.scripted(lenient=True)
        p = self.start_smtp_proxy(b.addr, smuggling="off")
        for n, (pattern, name) in enumerate(PATTERNS, 1):
            with self.subTest(pattern=name):
                c, sid = self.open(p)
                self.send_envelope(c)
                body = smuggling_body(pattern)
                c.send(body + b"\r\n.\r\n")
                want = (b"250 2.0.0 queued as 1\r\n250 2.1.0 sender ok\r\n"
                        b"250 2.1.5 recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                        b"250 2.0.0 queued as 2\r\n")
                self.assertEqual(c.recv_exact(len(want)), want)
                c.close()
                p.close_of(sid)
                rec = b.wait_conns(n)
                self.assertTrue(rec.closed.wait(3))
                self.assertEqual(bytes(rec.received), EHLO + ENVELOPE + body + b"\r\n.\r\n")
                self.assertEqual(len(rec.bodies), 2)
                self.assertIn(b"MAIL FROM:<evil@example.net>", rec.commands)
                self.assertEqual(p.find(ev="smuggling", sid=sid), [])

    def test_reload_keeps_the_policy_of_open_sessions(self):
        # A session opened under smuggling = reject keeps it after a reload to
        # off; a session opened after the reload gets off.
        b = self.scripted(lenient=True)
        p = self.start_smtp_proxy(b.addr)
        old, old_sid = self.open(p)
        self.send_envelope(old)
        m = p.reload(mxtest.config(mxtest.listener(
            "smtp", "%s:%d" % (mxtest.HOST, p.port), b.addr, mode="smtp", smuggling="off")))
        p.wait_event(5, start=m, ev="reload")
        new, new_sid = self.open(p)
        self.send_envelope(new)
        body = smuggling_body(b"\n.\n") + b"\r\n.\r\n"
        old.send(body)
        self.assertEqual(old.wait_closed(3), ("eof", SMUGGLING_554 + SMUGGLING_421))
        new.send(body)
        self.assertEqual(new.read_reply(), b"250 2.0.0 queued as 1\r\n")
        # The fooled server answers the smuggled transaction too; read it all,
        # so closing is a clean EOF and not a reset over unread bytes.
        rest = (b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n"
                b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 queued as 2\r\n")
        self.assertEqual(new.recv_exact(len(rest)), rest)
        new.close()
        self.assertEqual(p.close_of(old_sid)["end"], "smuggling")
        self.assertEqual(p.close_of(new_sid)["end"], "client_eof_without_quit")
        self.assertEqual([e["sid"] for e in p.find(ev="smuggling")], [old_sid])
        self.assertEqual(b.wait_conns(1).bodies, [])
        self.assertEqual(len(b.wait_conns(2).bodies), 2)  # the lenient server, fooled

    def test_bare_lf_elsewhere_in_body_passes_in_reject_mode(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.send_envelope(c)
        body = (b"Subject: t\r\n\r\nunix line\nmac line\rmixed\n\r\n..stuffed\r\n"
                b"a dot. inside\n.x not alone\r\n")
        c.send(body + b".\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        p.close_of(sid)
        rec = b.wait_conns(1)
        self.assertEqual(rec.bodies, [body])
        self.assertEqual(bytes(rec.received), EHLO + ENVELOPE + body + b".\r\nQUIT\r\n")
        self.assertEqual(p.find(ev="smuggling"), [])

    # ---- STARTTLS (mxproxy does not terminate TLS here: it passes it through)

    def test_starttls_passthrough_is_opaque(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"STARTTLS"), b"220 2.0.0 Ready to start TLS\r\n")
        # TLS records would follow; any bytes must pass, lines or not
        blob = (b"\x16\x03\x01\x02\x00\x01" + os.urandom(3000) + b"\r\n.\r\n" + b"\n.\n"
                + b"A" * 5000 + b"\r\nQUIT\r\n" + b"\0\r")
        got = b""
        for i in range(0, len(blob), 997):
            c.send(blob[i:i + 997])
        got = c.recv_exact(len(blob))
        self.assertEqual(got, blob)
        c.close()
        close = self.assertPairs(p, sid, self.greeting_ehlo() + [
            pair("STARTTLS", 220, "Ready to start TLS", esc="2.0.0")])
        self.assertEqual(close["end"], "client_eof")  # opaque: mode tcp's end reasons
        self.assertEqual(close["opaque"], "1")
        ev = p.find(ev="starttls_passthrough", sid=sid)
        self.assertEqual(len(ev), 1)
        self.assertEvent(ev[0], "starttls_passthrough", {})
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(bytes(rec.opaque), blob)
        self.assertEqual(bytes(rec.received), EHLO + b"STARTTLS\r\n" + blob)
        for e in ("line_too_long", "bad_line", "smuggling", "starttls_injection"):
            self.assertEqual(p.find(ev=e), [], e)

    def test_starttls_injection_is_dropped(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(c.read_reply(), b"220 2.0.0 Ready to start TLS\r\n")
        hello = b"\x16\x03\x01\x00\x05hello"
        c.send(hello)
        self.assertEqual(c.recv_exact(len(hello)), hello)
        c.assert_open(0.1)  # nothing more: no reply to an RSET
        c.close()
        p.close_of(sid)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(bytes(rec.received), EHLO + b"STARTTLS\r\n" + hello)
        self.assertEqual(rec.commands, [EHLO.rstrip(), b"STARTTLS"])
        inj = p.find(ev="starttls_injection", sid=sid)
        self.assertEqual(len(inj), 1)
        self.assertEvent(inj[0], "starttls_injection", {"bytes": 6}, lvl="warn")
        self.assertEqual(len(p.find(ev="starttls_passthrough", sid=sid)), 1)

    def test_starttls_refused_stays_smtp(self):
        refusal = b"454 4.7.0 TLS not available due to local problem\r\n"
        b = self.scripted(rules=[(b"STARTTLS", refusal)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"STARTTLS"), refusal)
        self.assertEqual(c.cmd(b"NOOP"), OK)
        c.send(b"NOOP " + b"x" * 5000 + b"\r\n")
        self.assertEqual(c.read_reply(), TOO_LONG)  # still parsed: not opaque
        self.quit(c)
        close = self.assertPairs(p, sid, self.greeting_ehlo() + [
            pair("STARTTLS", 454, "TLS not available due to local problem", esc="4.7.0",
                 primary=1),
            pair("NOOP", 250, "ok", esc="2.0.0"),
            pair("[line too long]", 500, "Line too long", esc="5.5.2", local=1),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close(
            "quit", helo="client.example",
            primary_error="454 4.7.0 TLS not available due to local problem"))
        self.assertEqual(p.find(ev="starttls_passthrough"), [])

    # ---- slow and endless clients

    def test_slowloris_trickle_costs_no_memory(self):
        # 100 clients each trickle a command line, one byte per 50 ms. While
        # the lines are still incomplete mxproxy may keep the partial line
        # only, not the 64 KiB buffer each one-byte read landed in.
        b = self.scripted()
        # Under ASan a freed block sits in quarantine and the next malloc takes
        # fresh pages: RSS would count churn, not what is held.
        asan = os.environ.get("ASAN_OPTIONS", "detect_leaks=1") + ":quarantine_size_mb=0"
        p = self.start_smtp_proxy(b.addr, env={"ASAN_OPTIONS": asan})
        clients = [self.open(p)[0] for _ in range(100)]
        time.sleep(0.1)
        rss0 = mxtest.rss_kb(p.pid)
        partial = b"NOOP " + b"x" * 15
        for i in range(len(partial)):
            for c in clients:
                c.send(partial[i:i + 1])
            time.sleep(0.05)
        time.sleep(0.05)
        grown = mxtest.rss_kb(p.pid) - rss0
        for c in clients:
            c.assert_open(0)  # no reply to half a line
            c.send(b"\r")
        time.sleep(0.05)
        for c in clients:
            c.send(b"\n")
        for c in clients:
            self.assertEqual(c.recv_exact(len(OK)), OK)
        self.assertLess(grown, 4096, "RSS grew by %d KiB for 100 trickling clients" % grown)
        for n in range(1, 101):
            self.assertEqual(bytes(b.wait_conns(n).received), EHLO + partial + b"\r\n")

    def test_20mb_without_newline_bounded_memory(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        rss0 = mxtest.rss_kb(p.pid)
        peak = [rss0]
        done = threading.Event()

        def sample():
            while not done.wait(0.01):
                try:
                    peak[0] = max(peak[0], mxtest.rss_kb(p.pid))
                except (OSError, AssertionError):
                    return

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        block = b"A" * (1 << 20)
        try:
            for _ in range(20):
                c.send(block)
            # answered while the line is still going on, not after it ends
            self.assertEqual(c.recv_exact(len(TOO_LONG), 20), TOO_LONG)
            c.send(block)
            c.send(b"\r\nNOOP\r\n")
            self.assertEqual(c.recv_exact(len(OK), 20), OK)
        finally:
            done.set()
            t.join(2)
        grown = peak[0] - rss0
        self.assertLess(grown, 8 * 1024, "RSS grew by %d KiB for a 20 MB line" % grown)
        self.quit(c)
        p.close_of(sid)
        self.assertEqual(bytes(b.wait_conns(1).received), EHLO + b"NOOP\r\nQUIT\r\n")
        self.assertEqual(len(p.find(ev="line_too_long", sid=sid)), 1)


class LenientBackendTest(unittest.TestCase):
    """The lenient backend alone, without mxproxy: it falls for every pattern
    (so the guard tests prove something) and the strict one for none."""

    def run_attack(self, lenient, pattern):
        b = mxtest.ScriptedSmtpBackend("scripted", lenient=lenient)
        try:
            c = mxtest.Client(b.port)
            try:
                self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
                c.send(EHLO + ENVELOPE)
                c.recv_exact(len(EHLO_REPLY + ENVELOPE_REPLIES))
                c.send(smuggling_body(pattern) + b"\r\n.\r\n")
                c.read_reply()
                c.send(b"QUIT\r\n")
                self.assertEqual(c.wait_closed(3)[0], "eof")
            finally:
                c.close()
            rec = b.wait_conns(1)
            self.assertTrue(rec.closed.wait(3))
            return rec
        finally:
            b.close()

    def test_lenient_falls_for_every_pattern(self):
        for pattern, name in PATTERNS:
            with self.subTest(pattern=name):
                rec = self.run_attack(True, pattern)
                # the first message ends at the pattern's dot
                self.assertEqual(rec.bodies[0], HEAD + pattern[:pattern.index(b".")])
                self.assertEqual(len(rec.bodies), 2)
                self.assertIn(b"MAIL FROM:<evil@example.net>", rec.commands)

    def test_strict_falls_for_none(self):
        for pattern, name in PATTERNS:
            with self.subTest(pattern=name):
                rec = self.run_attack(False, pattern)
                self.assertEqual(rec.bodies, [smuggling_body(pattern) + b"\r\n"])
                self.assertNotIn(b"MAIL FROM:<evil@example.net>", rec.commands)


class SmtpConfigTest(unittest.TestCase):
    """The mode smtp keys with mxproxy -t."""

    def check(self, body, mode="smtp"):
        text = mxtest.config(mxtest.listener("edge", "127.0.0.1:2525", "127.0.0.1:25",
                                             mode=mode) + body)
        with tempfile.TemporaryDirectory(prefix="mxtest-") as d:
            path = os.path.join(d, "mx.conf")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run([mxtest.binary(), "-t", "-c", path], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)
            line = text.splitlines().index(body.splitlines()[-1]) + 1 if body else 0
            return r.returncode, r.stderr.decode().replace(path, "FILE"), line

    def test_keys_need_mode_smtp(self):
        for key, value, modes in (("max_line_length", "1000", "smtp, imap or pop3"),
                                  ("smuggling", "off", "smtp"),
                                  ("transcript", "full", "smtp, imap or pop3")):
            with self.subTest(key=key):
                rc, err, line = self.check("%s = %s\n" % (key, value), mode="tcp")
                self.assertEqual((rc, err), (1, "FILE:%d: '%s' needs mode = %s in "
                                                "[listener edge]\n" % (line, key, modes)))

    def test_values(self):
        good = ["max_line_length = 512", "max_line_length = 12288", "smuggling = reject",
                "smuggling = normalize", "smuggling = off", "transcript = off",
                "transcript = pairs", "transcript = full"]
        for body in good:
            with self.subTest(body=body):
                rc, err, _ = self.check(body + "\n")
                self.assertEqual(rc, 0, err)
        bad = ["max_line_length = 511", "max_line_length = 32769", "max_line_length = 4k",
               "smuggling = strict", "transcript = on", "smuggling = Reject"]
        for body in bad:
            with self.subTest(body=body):
                rc, err, line = self.check(body + "\n")
                self.assertEqual(rc, 1)
                self.assertRegex(err, r"^FILE:%d: .*%s.*\n$"
                                 % (line, re.escape(body.split(" = ")[0])))


if __name__ == "__main__":
    mxtest.main()
