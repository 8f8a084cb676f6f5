"""mode = smtp: command/reply pairs, the session summary and the primary error.

Every test reads like a scenario: what the client sends, what the (scripted)
server answers, then the exact bytes the client got and the exact ev=pair and
ev=close lines. In mode tcp none of these lines exist, so each test fails
without the feature.
"""

import base64
import hashlib
import socket
import time

import mxtest
from mxtest import MS, pair, smtp_close

MAIL = b"MAIL FROM:<a@example.com>\r\n"
RCPT = b"RCPT TO:<b@example.com>\r\n"
EHLO_REPLY = (b"250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
              b"250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
DATA_354 = b"354 End data with <CR><LF>.<CR><LF>\r\n"
DATA_REPLY = "End data with <CR><LF>.<CR><LF>"
REJECT_RCPT = b"550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n"
REJECT_TEXT = "550 5.1.1 <nobody@example.com>: Recipient address rejected"

USER = b"mxuser-7f3a"
PASSWORD = b"S3cr3t-Pa55w0rd!"


def greeting_pair():
    return pair("<greeting>", 220, "scripted ESMTP")


def ehlo_pair(name, pipelined=0):
    return pair("EHLO " + name, 250, "scripted", lines=6, pipelined=pipelined)


class SmtpPairsTest(mxtest.ProxyTestCase):

    def open(self, proxy, ehlo=b"client.example"):
        """A client past the greeting and EHLO; returns (client, sid)."""
        c = self.client(proxy.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        if ehlo:
            self.assertEqual(c.cmd(b"EHLO " + ehlo), EHLO_REPLY)
        return c, proxy.sid_of(c)

    def quit(self, c):
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))

    def test_one_message_step_by_step(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        body = b"Subject: hello\r\n\r\nline one\r\n..a stuffed dot\r\n"
        self.assertEqual(c.cmd(MAIL.rstrip()), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(RCPT.rstrip()), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), DATA_354)
        c.send(body + b".\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("DATA", 354, DATA_REPLY),
            pair(".", 250, "queued as 1", esc="2.0.0", size=len(body)),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    mail_from="a@example.com", rcpt_ok=1,
                                                    messages=1))
        rec = b.wait_conns(1)
        self.assertEqual(rec.bodies, [body])

    def test_greeting_ms_counts_from_accept(self):
        b = self.track(mxtest.SmtpBackend("slow", greeting_delay=0.3))
        p = self.start_smtp_proxy(b.addr)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 slow ESMTP\r\n")
        sid = p.sid_of(c)
        c.close()
        close = self.assertPairs(p, sid, [pair("<greeting>", 220, "slow ESMTP")])
        g = p.find(ev="pair", sid=sid)[0]
        self.assertWithin(float(g["ms"]) / 1000, 0.28, 1.5, "greeting ms=")
        self.assertEvent(close, "close", smtp_close("client_eof_without_quit"))

    def test_pipelined_rcpt_rejected_is_primary(self):
        b = self.scripted(rules=[(b"RCPT TO:<nobody@", REJECT_RCPT)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(MAIL + RCPT + b"RCPT TO:<nobody@example.com>\r\nDATA\r\n")
        self.assertEqual(c.recv_exact(len(b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n")
                                      + len(REJECT_RCPT) + len(DATA_354)),
                         b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n" + REJECT_RCPT
                         + DATA_354)
        c.send(b"hi\r\n.\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5", pipelined=1),
            pair("RCPT TO:<nobody@example.com>", 550,
                 "<nobody@example.com>: Recipient address rejected", esc="5.1.1", pipelined=1,
                 primary=1),
            pair("DATA", 354, DATA_REPLY, pipelined=1),
            pair(".", 250, "queued as 1", esc="2.0.0", size=4),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    mail_from="a@example.com", rcpt_ok=1,
                                                    rcpt_rejected=1, messages=1,
                                                    primary_error=REJECT_TEXT))

    def test_data_refused_after_every_rcpt_failed_is_not_primary(self):
        b = self.scripted(rules=[(b"RCPT", REJECT_RCPT),
                                 (b"DATA", b"554 5.5.1 Error: no valid recipients\r\n")])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(MAIL + b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<nobody@example.org>\r\n"
               b"DATA\r\n")
        want = (b"250 2.1.0 sender ok\r\n" + REJECT_RCPT + REJECT_RCPT
                + b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"RSET"), b"250 2.0.0 ok\r\n")
        self.quit(c)
        rejected = "<nobody@example.com>: Recipient address rejected"
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<nobody@example.com>", 550, rejected, esc="5.1.1", pipelined=1,
                 primary=1),
            pair("RCPT TO:<nobody@example.org>", 550, rejected, esc="5.1.1", pipelined=1),
            pair("DATA", 554, "Error: no valid recipients", esc="5.5.1", pipelined=1),
            pair("RSET", 250, "ok", esc="2.0.0"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    mail_from="a@example.com", rcpt_rejected=2,
                                                    primary_error=REJECT_TEXT))

    def test_multiline_reply_first_line_and_count(self):
        refusal = (b"550-5.7.1 first line of the refusal\r\n550-5.7.1 second line\r\n"
                   b"550 5.7.1 third line\r\n")
        b = self.scripted(rules=[(b"RCPT", refusal)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(MAIL.rstrip()), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(RCPT.rstrip()), refusal)
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 550, "first line of the refusal", lines=3,
                 esc="5.7.1", primary=1),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close(
            "quit", helo="client.example", mail_from="a@example.com", rcpt_rejected=1,
            primary_error="550 5.7.1 first line of the refusal"))

    def test_auth_rounds_and_credentials_never_logged(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, transcript="full")
        c, sid = self.open(p)
        u64, p64 = base64.b64encode(USER), base64.b64encode(PASSWORD)
        plain = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
        # AUTH LOGIN, two 334 rounds
        self.assertEqual(c.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(c.cmd(u64), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(c.cmd(p64), b"235 2.7.0 Authentication successful\r\n")
        # AUTH LOGIN with the user name as initial response: one round
        self.assertEqual(c.cmd(b"AUTH LOGIN " + u64), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(c.cmd(p64), b"235 2.7.0 Authentication successful\r\n")
        # AUTH PLAIN with initial response
        self.assertEqual(c.cmd(b"AUTH PLAIN " + plain), b"235 2.7.0 Authentication successful\r\n")
        self.quit(c)
        ok = "Authentication successful"
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("AUTH LOGIN", 235, ok, esc="2.7.0", rounds=2),
            pair("AUTH LOGIN [redacted]", 235, ok, esc="2.7.0", rounds=1),
            pair("AUTH PLAIN [redacted]", 235, ok, esc="2.7.0"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))
        # the credentials reached the server untouched
        self.assertEqual(b.wait_conns(1).auth_lines, [u64, p64, p64])
        # the transcript, in order, with every credential and challenge redacted
        lines = [(e["dir"], e["text"]) for e in p.find(ev="line", sid=sid)]
        self.assertEqual(lines, [
            ("server", "220 scripted ESMTP"),
            ("client", "EHLO client.example"),
        ] + [("server", l) for l in EHLO_REPLY.decode().split("\r\n")[:-1]] + [
            ("client", "AUTH LOGIN"),
            ("server", "334 [redacted]"),
            ("client", "[redacted]"),
            ("server", "334 [redacted]"),
            ("client", "[redacted]"),
            ("server", "235 2.7.0 Authentication successful"),
            ("client", "AUTH LOGIN [redacted]"),
            ("server", "334 [redacted]"),
            ("client", "[redacted]"),
            ("server", "235 2.7.0 Authentication successful"),
            ("client", "AUTH PLAIN [redacted]"),
            ("server", "235 2.7.0 Authentication successful"),
            ("client", "QUIT"),
            ("server", "221 2.0.0 Bye"),
        ])
        for ev in p.find(ev="line", sid=sid):
            self.assertEvent(ev, "line", {"dir": ev["dir"], "at_ms": MS, "text": ev["text"]})
        # no form of a credential anywhere in the log
        p.stop()
        log = "\n".join(p.raw)
        secrets = [USER, PASSWORD, u64, p64, plain, base64.b64encode(b"\0" + USER),
                   base64.b64encode(PASSWORD).rstrip(b"=")]
        for s in list(secrets):
            secrets += [s.hex().encode(), s.hex().upper().encode()]
        for s in secrets:
            self.assertNotIn(s.decode(), log)
        # a challenge's payload is not in the log either (334 lines are redacted)
        self.assertNotIn("VXNlcm5hbWU6", log)

    def test_auth_cancelled_is_no_primary_error(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(c.cmd(b"*"), b"501 5.7.0 Authentication cancelled\r\n")
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("AUTH LOGIN", 501, "Authentication cancelled", esc="5.7.0", rounds=1),
            pair("NOOP", 250, "ok", esc="2.0.0"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))
        self.assertEqual(b.wait_conns(1).auth_lines, [b"*"])

    def test_bdat_chunks_pass_untouched_one_pair_each(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(MAIL.rstrip()), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(RCPT.rstrip()), b"250 2.1.5 recipient ok\r\n")
        chunk1 = b"x\r\n.\r\nyz\r\n"      # an end-of-data sequence inside a chunk
        chunk2 = b"a\n.\nb\r\n"           # and a smuggling pattern: not DATA, not inspected
        self.assertEqual((len(chunk1), len(chunk2)), (10, 7))
        sent = b"BDAT 10\r\n" + chunk1 + b"BDAT 7 LAST\r\n" + chunk2
        c.send(sent)
        want = b"250 2.0.0 10 octets received\r\n250 2.0.0 queued as 1\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("BDAT 10", 250, "10 octets received", esc="2.0.0", size=10),
            pair("BDAT 7 LAST", 250, "queued as 1", esc="2.0.0", pipelined=1, size=7),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    mail_from="a@example.com", rcpt_ok=1,
                                                    messages=1))
        rec = b.wait_conns(1)
        self.assertEqual(rec.chunks, [chunk1, chunk2])
        self.assertEqual(bytes(rec.received), b"EHLO client.example\r\n" + MAIL + RCPT + sent
                         + b"QUIT\r\n")
        self.assertEqual(p.find(ev="smuggling"), [])

    def test_xclient_new_greeting_keeps_pairs_in_step(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, pass_client_xclient="on")  # a trusted chain
        c, sid = self.open(p, ehlo=b"before.example")
        # XCLIENT, the new session's EHLO and a MAIL in one segment
        c.send(b"XCLIENT ADDR=192.0.2.7 NAME=mail.example.org\r\nEHLO after.example\r\n" + MAIL)
        want = b"220 scripted ESMTP\r\n" + EHLO_REPLY + b"250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(RCPT.rstrip()), b"250 2.1.5 recipient ok\r\n")
        self.quit(c)
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("before.example"),
            pair("XCLIENT ADDR=192.0.2.7 NAME=mail.example.org", 220, "scripted ESMTP"),
            ehlo_pair("after.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0", pipelined=1),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="after.example",
                                                    mail_from="a@example.com", rcpt_ok=1))

    def test_auth_plain_without_initial_response(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, transcript="full")
        c, sid = self.open(p)
        plain = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
        self.assertEqual(c.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(c.cmd(plain), b"235 2.7.0 Authentication successful\r\n")
        self.quit(c)
        self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("AUTH PLAIN", 235, "Authentication successful", esc="2.7.0", rounds=1),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEqual(b.wait_conns(1).auth_lines, [plain])
        p.stop()
        self.assertNotIn(plain.decode(), "\n".join(p.raw))
        self.assertNotIn(PASSWORD.decode(), "\n".join(p.raw))

    def test_split_writes_give_the_same_pairs(self):
        # Pipelined commands and a body, one byte per write: the same bytes
        # reach the server and the pairs are the same as in one write.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmds = MAIL + RCPT + b"DATA\r\n"
        body = b"Subject: split\r\n\r\nbare\nlf and ..dots\r\n"
        for data in (cmds, body + b".\r\n"):
            for i in range(len(data)):
                c.send(data[i:i + 1])
                time.sleep(0.001)
            if data is cmds:
                want = b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n" + DATA_354
                self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        self.quit(c)
        self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair("client.example"),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5",
                 pipelined=mxtest.Like("[01]")),
            pair("DATA", 354, DATA_REPLY, pipelined=mxtest.Like("[01]")),
            pair(".", 250, "queued as 1", esc="2.0.0", size=len(body)),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        rec = b.wait_conns(1)
        self.assertEqual(rec.bodies, [body])
        self.assertEqual(bytes(rec.received), b"EHLO client.example\r\n" + cmds + body
                         + b".\r\nQUIT\r\n")

    def test_pipeline_deeper_than_the_command_fifo(self):
        # 300 commands in one write, more than mxproxy keeps in flight (64),
        # with overlong lines and an unknown verb among them: every answer
        # comes back in order and every pair is logged.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, max_line_length=512)
        c, sid = self.open(p)
        lines, want, pairs = [], b"", []
        for i in range(300):
            if i % 50 == 49:
                lines.append(b"NOOP " + b"x" * 600 + b"\r\n")
                want += b"500 5.5.2 Line too long\r\n"
                pairs.append(pair("[line too long]", 500, "Line too long", esc="5.5.2",
                                  pipelined=1, local=1))
            elif i == 150:
                lines.append(b"XYZZY\r\n")
                want += b"502 5.5.2 command not recognized\r\n"
                pairs.append(pair("XYZZY", 502, "command not recognized", esc="5.5.2",
                                  pipelined=1))
            else:
                verb = b"NOOP %d" % i if i % 2 else b"RSET"
                lines.append(verb + b"\r\n")
                want += b"250 2.0.0 ok\r\n"
                pairs.append(pair(verb.decode(), 250, "ok", esc="2.0.0",
                                  pipelined=0 if i == 0 else 1))
        c.send(b"".join(lines))
        self.assertEqual(c.recv_exact(len(want), 10), want)
        self.quit(c)
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair("client.example")] + pairs
                                 + [pair("QUIT", 221, "Bye", esc="2.0.0")])
        # an unknown verb refused is no primary error
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))
        forwarded = b"".join(l for l in lines if len(l) < 512)
        self.assertEqual(bytes(b.wait_conns(1).received), b"EHLO client.example\r\n" + forwarded
                         + b"QUIT\r\n")

    def test_5mb_message_byte_exact(self):
        b = self.track(mxtest.SmtpBackend("mx"))
        p = self.start_smtp_proxy(b.addr)
        body = mxtest.message_body(5 * 1024 * 1024)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 mx ESMTP\r\n")
        sid = p.sid_of(c)
        c.send(b"HELO client.example\r\n" + MAIL + RCPT + b"DATA\r\n")
        want = b"250 mx\r\n250 2.0.0 mx ok\r\n250 2.0.0 mx ok\r\n354 go ahead\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        c.send(body + b".\r\n")
        self.assertEqual(c.read_reply(10), b"250 2.0.0 mx queued %d %s\r\n"
                         % (len(body), hashlib.sha256(body).hexdigest().encode()))
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c.close()
        close = p.close_of(sid)
        dot = p.find(ev="pair", sid=sid, cmd=".")
        self.assertEqual(len(dot), 1)
        self.assertEqual(dot[0]["size"], str(len(body)))
        self.assertEvent(close, "close", smtp_close("quit", helo="client.example",
                                                    mail_from="a@example.com", rcpt_ok=1,
                                                    messages=1))

    def test_transcript_full_lines(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, transcript="full", max_line_length=512)
        c, sid = self.open(p)
        body = b"Subject: t\r\n\r\nsecret body text\r\n"
        c.send(MAIL + RCPT + b"DATA\r\n")
        want = b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n" + DATA_354
        self.assertEqual(c.recv_exact(len(want)), want)
        c.send(body + b".\r\nNOOP " + b"x" * 600 + b"\r\n")
        want = b"250 2.0.0 queued as 1\r\n500 5.5.2 Line too long\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.quit(c)
        p.close_of(sid)
        lines = [(e["dir"], e["text"]) for e in p.find(ev="line", sid=sid)]
        self.assertEqual(lines[8:], [
            ("client", "MAIL FROM:<a@example.com>"),
            ("client", "RCPT TO:<b@example.com>"),
            ("client", "DATA"),
            ("server", "250 2.1.0 sender ok"),
            ("server", "250 2.1.5 recipient ok"),
            ("server", "354 End data with <CR><LF>.<CR><LF>"),
            ("client", "<message body: %d bytes>" % len(body)),
            ("server", "250 2.0.0 queued as 1"),
            ("proxy", "500 5.5.2 Line too long"),
            ("client", "QUIT"),
            ("server", "221 2.0.0 Bye"),
        ])
        self.assertNotIn("secret body text", "\n".join(p.raw))
        self.assertNotIn("x" * 100, "\n".join(p.raw))

    def test_json_log_has_the_same_pairs(self):
        # the same session with log_format = logfmt and json: same events,
        # same keys in the same order, same values (ts, sid, ms, addresses aside)
        seen = {}
        for fmt in ("logfmt", "json"):
            b = self.scripted(rules=[(b"RCPT TO:<nobody@", REJECT_RCPT)])
            p = self.start_smtp_proxy(b.addr, log_format=fmt, transcript="full")
            c, sid = self.open(p)
            c.send(MAIL + b"RCPT TO:<nobody@example.com>\r\n" + RCPT + b"DATA\r\n")
            want = (b"250 2.1.0 sender ok\r\n" + REJECT_RCPT + b"250 2.1.5 recipient ok\r\n"
                    + DATA_354)
            self.assertEqual(c.recv_exact(len(want)), want)
            c.send(b"x\r\n.\r\n")
            self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
            self.quit(c)
            p.close_of(sid)
            evs = [e for e in p.find(sid=sid) if e["ev"] in ("pair", "line", "close")]
            seen[fmt] = [[(k, "" if k in ("ts", "sid", "ms", "at_ms", "client", "backend")
                           else str(v)) for k, v in e.items() if not k.startswith("_")]
                         for e in evs]
        self.assertEqual(len(seen["json"]), len(seen["logfmt"]))
        for j, l in zip(seen["json"], seen["logfmt"]):
            self.assertEqual(j, l)
        self.assertEqual(sum(1 for e in seen["json"] if ("ev", "pair") in e), 8)

    def test_transcript_off_and_pairs(self):
        for transcript, want_pairs, want_lines in (("off", 0, 0), ("pairs", 4, 0),
                                                   ("full", 4, 12)):
            with self.subTest(transcript=transcript):
                b = self.scripted()
                p = self.start_smtp_proxy(b.addr, transcript=transcript)
                c, sid = self.open(p)
                self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
                self.quit(c)
                close = p.close_of(sid)
                self.assertEqual(len(p.find(ev="pair")), want_pairs)
                self.assertEqual(len(p.find(ev="line")), want_lines)
                # the summary does not depend on the transcript
                self.assertEvent(close, "close", smtp_close("quit", helo="client.example"))


if __name__ == "__main__":
    mxtest.main()
