"""mode = smtp: replies reach the client whole, and sessions end as they
really ended.

A backend reply goes to the client only once its last line has ended: a
backend that stops mid-reply (close, reset, silence until idle_timeout or
drain) never gets its fragment glued to mxproxy's 421. A reply over 64 KiB is
a protocol error. A backend reset after the final dot is answered like a
close. Once QUIT is answered the session ended with end=quit, however the
sockets close after it (smtp-source through mxproxy to smtp-sink, a client
that resets after 221, a backend that resets after it). After a STARTTLS
passthrough the close line says opaque=1 and uses mode tcp's end reasons.
"""

import signal
import smtplib
import subprocess
import time

import mxtest
from mxtest import (BACKEND_CLOSED, HOST, IDLE, SHUTTING_DOWN, TlsSmtpBackend, client_context,
                    pair, pki, smtp_close)
from mxtest import scripted_ehlo_pair as ehlo_pair, scripted_greeting_pair as greeting_pair

PROTOCOL_ERROR = b"421 4.4.2 mxproxy: backend protocol error\r\n"
SMTP_SOURCE = "/usr/sbin/smtp-source"
TCP_ENDS = ("client_eof", "client_reset", "backend_closed", "backend_reset")


def text(reply):
    return reply.decode().rstrip("\r\n")


def send_then(data, then="close", pause=0.0, more=b""):
    """A rule action: sends data, optionally more after pause seconds, then
    closes ("close"), resets ("reset") or stays until the peer is gone
    ("stay")."""
    def action(backend, rec, line):
        backend.send(rec, data)
        if pause:
            time.sleep(pause)
        if more:
            backend.send(rec, more)
        if then == "reset":
            mxtest.reset_close(rec.sock)
            return "close"
        if then == "stay":
            while backend.recv(rec):
                pass
            return "close"
        return then
    return action


class WholeRepliesTest(mxtest.ScriptedSessionTestCase):
    """Item 10.3: a backend reply reaches the client only whole."""

    def cut_short(self, fragment):
        """The backend answers MAIL with fragment and closes: the client gets
        mxproxy's 421 alone, as one whole reply, and nothing of fragment."""
        b = self.scripted(rules=[(b"MAIL", send_then(fragment))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", BACKEND_CLOSED))
        close = self.assertPairs(p, sid, [
            greeting_pair(), ehlo_pair(),
            pair("MAIL FROM:<a@example.com>", 421, "mxproxy: backend closed the connection",
                 esc="4.4.2", local=1)])
        self.assertEvent(close, "close", smtp_close(
            "backend_closed", helo="client.example", mail_from="a@example.com",
            primary_error=text(BACKEND_CLOSED)))

    def test_reply_without_crlf_then_close(self):
        self.cut_short(b"250 2.1.0 Ok")

    def test_reply_code_and_space_then_close(self):
        self.cut_short(b"250 ")

    def test_one_digit_then_close(self):
        self.cut_short(b"4")

    def test_reply_ending_in_cr_then_close(self):
        self.cut_short(b"250 2.1.0 Ok\r")

    def test_unfinished_multiline_reply_then_close(self):
        self.cut_short(b"250-first line\r\n250-second line\r\n250-thi")

    def test_unfinished_reply_after_whole_ones_in_the_same_read(self):
        # MAIL and RCPT are answered whole; the reply to DATA is cut short:
        # the whole ones arrive, then the 421 for DATA, nothing in between.
        b = self.scripted(rules=[(b"DATA", send_then(b"354 go ah"))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(c.wait_closed(3), (
            "eof", b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n" + BACKEND_CLOSED))
        close = self.assertPairs(p, sid, [
            greeting_pair(), ehlo_pair(),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5", pipelined=1),
            pair("DATA", 421, "mxproxy: backend closed the connection", esc="4.4.2",
                 pipelined=1, local=1)])
        self.assertEqual(close["end"], "backend_closed")

    def test_reply_split_over_reads_arrives_whole(self):
        # The first lines wait for the last one; then the reply is byte-exact.
        first, rest = b"250-first line\r\n250-sec", b"ond line\r\n250 2.1.0 last\r\n"
        b = self.scripted(rules=[(b"MAIL", send_then(first, then=None, pause=0.5, more=rest))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<a@example.com>\r\n")
        c.assert_open(0.3)  # nothing of the reply yet
        self.assertEqual(c.read_reply(3), first + rest)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        close = self.assertPairs(p, sid, [
            greeting_pair(), ehlo_pair(),
            pair("MAIL FROM:<a@example.com>", 250, "first line", lines=3),
            pair("QUIT", 221, "Bye", esc="2.0.0")])
        self.assertEqual(close["end"], "quit")

    def test_greeting_split_over_reads_arrives_whole_at_once(self):
        # The first part waits for the rest; the rest goes out the moment it
        # arrives.
        b = self.smtp_backend(greeting_parts=[b"220-mx.example ESMTP\r\n220 rea", b"dy\r\n"],
                              part_delay=0.5)
        p = self.start_smtp_proxy(b.addr)
        c = self.client(p.port)
        c.assert_open(0.3)
        self.assertEqual(c.read_reply(3), b"220-mx.example ESMTP\r\n220 ready\r\n")
        self.assertLess(time.monotonic() - c.t_connected, 1.0)

    def test_large_reply_in_many_reads_is_byte_exact(self):
        # 60 KB of continuation lines, sent in 1 KB pieces: under the limit.
        lines = b"".join(b"250-%05d %s\r\n" % (i, b"x" * 90) for i in range(600))
        reply = lines + b"250 2.0.0 end\r\n"

        def trickle(backend, rec, line):
            for i in range(0, len(reply), 1024):
                backend.send(rec, reply[i:i + 1024])
                time.sleep(0.002)

        b = self.scripted(rules=[(b"HELP", trickle)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertLess(len(reply), 65536)
        self.assertEqual(c.cmd(b"HELP"), reply)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")

    def test_reply_over_64k_is_a_protocol_error(self):
        line = b"250-" + b"y" * 500 + b"\r\n"

        def endless(backend, rec, line_):
            try:
                for _ in range(200):  # 100 KB, never a last line
                    backend.send(rec, line)
                    time.sleep(0.001)
            except OSError:
                return "close"
            while backend.recv(rec):
                pass
            return "close"

        b = self.scripted(rules=[(b"HELP", endless)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"HELP\r\n")
        self.assertEqual(c.wait_closed(5), ("eof", PROTOCOL_ERROR))
        close = self.assertPairs(p, sid, [
            greeting_pair(), ehlo_pair(),
            pair("HELP", 421, "mxproxy: backend protocol error", esc="4.4.2", local=1)])
        self.assertEvent(close, "close", smtp_close(
            "backend_closed", error="backend sent a reply over 65536 bytes",
            helo="client.example", primary_error=text(PROTOCOL_ERROR)))
        warn = p.find(ev="backend_garbage", sid=sid)
        self.assertEqual(len(warn), 1)
        self.assertEvent(warn[0], "backend_garbage", {"reason": "reply too long",
                                                      "limit": 65536}, lvl="warn")
        self.assertTrue(b.wait_conns(1).closed.wait(3), "backend connection still open")

    def test_garbage_after_unfinished_reply_sends_neither(self):
        b = self.scripted(rules=[(b"NOOP", send_then(b"250-first\r\nhello world\r\n",
                                                     then="stay"))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"NOOP\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", PROTOCOL_ERROR))
        self.assertEqual(p.close_of(sid)["end"], "backend_closed")  # logged after the warning
        warn = p.find(ev="backend_garbage", sid=sid)
        self.assertEqual(len(warn), 1)
        self.assertEvent(warn[0], "backend_garbage", {"text": "hello world"}, lvl="warn")

    def test_idle_timeout_mid_reply(self):
        b = self.scripted(rules=[(b"MAIL", send_then(b"250 2.1.0 O", then="stay"))])
        p = self.start_smtp_proxy(b.addr, idle_timeout="400ms")
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", IDLE))
        close = p.close_of(sid)
        self.assertEqual(close["end"], "idle_timeout", close["_raw"])

    def test_drain_mid_unsolicited_reply(self):
        # Nothing is outstanding (the NOOP was answered); the backend starts
        # an unsolicited reply and stops: the drain's 421 comes alone.
        b = self.scripted(rules=[(b"NOOP", send_then(b"250 2.0.0 ok\r\n", then="stay",
                                                     pause=0.1, more=b"421 4.3.2 going d"))])
        p = self.start_smtp_proxy(b.addr, glob={"drain_timeout": "300ms"})
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        time.sleep(0.3)
        p.signal(signal.SIGTERM)
        self.assertEqual(c.wait_closed(3), ("eof", SHUTTING_DOWN))
        self.assertEqual(p.close_of(sid)["end"], "drain")
        self.assertEqual(p.wait_exit(5), 0)


class BackendResetTest(mxtest.ScriptedSessionTestCase):
    """Item 10.4: a backend reset is answered like a close."""

    def test_reset_after_final_dot(self):
        def take_body_then_reset(backend, rec, line):
            backend.send(rec, b"354 End data with <CR><LF>.<CR><LF>\r\n")
            rec.bodies.append(backend.read_body(rec))
            mxtest.reset_close(rec.sock)
            return "close"

        b = self.scripted(rules=[(b"DATA", take_body_then_reset)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        # the final dot and a pipelined QUIT
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", BACKEND_CLOSED))
        close = self.assertPairs(p, sid, [
            greeting_pair(), ehlo_pair(),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("DATA", 354, "End data with <CR><LF>.<CR><LF>"),
            pair(".", 421, "mxproxy: backend closed the connection", esc="4.4.2", local=1,
                 size=20),
            pair("QUIT", 0, pipelined=1, aborted=1)])
        self.assertEvent(close, "close", smtp_close(
            "backend_reset", error="connection reset by peer", helo="client.example",
            mail_from="a@example.com", rcpt_ok=1, primary_error=text(BACKEND_CLOSED)))

    def test_reset_with_nothing_outstanding(self):
        b = self.scripted(rules=[(b"NOOP", send_then(b"250 2.0.0 ok\r\n", then="reset",
                                                     pause=0.2))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair(),
                                          pair("NOOP", 250, "ok", esc="2.0.0")])
        self.assertEvent(close, "close", smtp_close(
            "backend_reset", error="connection reset by peer", helo="client.example"))


class QuitAnsweredTest(mxtest.ScriptedSessionTestCase):
    """Item 10.11: once QUIT is answered, end=quit."""

    def test_client_resets_after_221(self):
        # The backend keeps its side open after 221: the client's RST ends it.
        b = self.scripted(rules=[(b"QUIT", send_then(b"221 2.0.0 Bye\r\n", then="stay"))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        mxtest.reset_close(c.sock)
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair(),
                                          pair("QUIT", 221, "Bye", esc="2.0.0")])
        self.assertEvent(close, "close", smtp_close("quit", error="connection reset by peer",
                                                    helo="client.example"))

    def test_backend_resets_after_221(self):
        b = self.scripted(rules=[(b"QUIT", send_then(b"221 2.0.0 Bye\r\n", then="reset",
                                                     pause=0.2))])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair(),
                                          pair("QUIT", 221, "Bye", esc="2.0.0")])
        self.assertEvent(close, "close", smtp_close("quit", error="connection reset by peer",
                                                    helo="client.example"))

    def test_smtp_source_to_smtp_sink(self):
        sink = self.sink()
        # transcript = off: 2000 close lines and nothing else, so none is dropped
        p = self.start_smtp_proxy(sink.addr, transcript="off")
        n = 2000
        r = subprocess.run([SMTP_SOURCE, "-s", "20", "-m", str(n), "-M", "source.example",
                            "-f", "a@example.com", "-t", "b@example.com",
                            "%s:%d" % (HOST, p.port)],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout.decode() + r.stderr.decode())
        closes = p.wait_count(n, timeout=30, ev="close")
        ends = {}
        for e in closes:
            ends[e["end"]] = ends.get(e["end"], 0) + 1
        self.assertEqual(ends, {"quit": n}, "\n".join(
            [e["_raw"] for e in closes if e["end"] != "quit"][:5]))
        self.assertEqual(p.find(ev="log_dropped"), [])


class PassthroughCloseTest(mxtest.ProxyTestCase):
    """Item 10.12: after STARTTLS passthrough the close line says opaque=1,
    uses mode tcp's end reasons and only helo= of the SMTP fields."""

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()
        cls.backend_pair = cls.pki.leaf("backend.example.test", file_name="backend")

    def backend(self):
        return self.track(TlsSmtpBackend("realtls", pair=self.backend_pair, tls="starttls"))

    def opaque_close(self, end, **extra):
        f = smtp_close(end, smtp=False, **extra)
        f["opaque"] = 1
        f["helo"] = "client.example"
        return f

    def test_smtplib_mail_through_passthrough(self):
        b = self.backend()
        p = self.start_smtp_proxy(b.addr, client_tls="passthrough")
        for i in range(5):
            body = b"Subject: e2e %d\r\n\r\nhello\r\n" % i
            with smtplib.SMTP(HOST, p.port, local_hostname="client.example", timeout=10) as s:
                s.ehlo()
                self.assertEqual(s.starttls(context=client_context(check_hostname=False))[0],
                                 220)
                self.assertEqual(s.sendmail("a@example.com", ["b@example.com"], body), {})
            rec = b.wait_conns(i + 1)
            self.assertTrue(rec.closed.wait(3))
            self.assertEqual(rec.bodies, [body])
            close = p.wait_count(i + 1, ev="close")[-1]
            sid = close["sid"]
            self.assertIn(close["end"], TCP_ENDS, close["_raw"])
            self.assertEvent(close, "close", self.opaque_close(
                close["end"], error=close.get("error")))
            self.assertEqual(p.find(ev="pair", sid=sid)[-1]["cmd"], "STARTTLS")

    def test_idle_timeout_after_passthrough(self):
        b = self.backend()
        p = self.start_smtp_proxy(b.addr, client_tls="passthrough", idle_timeout="500ms")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        c.cmd(b"EHLO client.example")
        self.assertEqual(c.cmd(b"STARTTLS"), b"220 2.0.0 Ready to start TLS\r\n")
        tls = client_context(check_hostname=False).wrap_socket(c.sock)
        tls.sendall(b"EHLO client.example\r\n")
        self.assertTrue(tls.recv(4096).startswith(b"250-realtls"))
        sid = p.sid_of(c)
        close = p.close_of(sid, 5)
        self.assertEvent(close, "close", self.opaque_close("idle_timeout"))
        tls.close()


if __name__ == "__main__":
    mxtest.main()
