"""mode = smtp: how sessions end, seen by real clients and in ev=close.

end=quit, client_eof_without_quit (the openssl s_client 'Q' case, a relay that
closes after delivering), backend_closed with a real 421 instead of a bare EOF,
an unsolicited 421, connect_failed with a 421 greeting, idle_timeout and drain
with a 421, and mode tcp for contrast.
"""

import signal
import smtplib
import subprocess
import time

import mxtest
from mxtest import ADDR, BACKEND_CLOSED, IDLE, MS, SHUTTING_DOWN, pair, smtp_close
from mxtest import SCRIPTED_EHLO_REPLY as EHLO_REPLY
from mxtest import scripted_ehlo_pair as ehlo_pair, scripted_greeting_pair as greeting_pair

REJECT_RCPT = b"550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n"
NO_SERVER = b"421 4.4.1 mxproxy: no mail server available, try again later\r\n"


class SmtpEndsTest(mxtest.ScriptedSessionTestCase):

    # ---- real clients

    def test_swaks_pipeline_against_smtp_sink(self):
        sink = self.sink()
        p = self.start_smtp_proxy(sink.addr)
        r = subprocess.run(["swaks", "--pipeline", "--server", "%s:%d" % (mxtest.HOST, p.port),
                            "--helo", "swaks.example", "--from", "a@example.com",
                            "--to", "b@example.com", "--timeout", "5"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        self.assertEqual(r.returncode, 0, r.stdout.decode() + r.stderr.decode())
        close = p.wait_event(5, ev="close")
        sid = close["sid"]
        pairs = p.find(ev="pair", sid=sid)
        self.assertEqual([(e["cmd"], e["code"], e["pipelined"]) for e in pairs], [
            ("<greeting>", "220", "0"),
            ("EHLO swaks.example", "250", "0"),
            ("MAIL FROM:<a@example.com>", "250", "0"),
            ("RCPT TO:<b@example.com>", "250", "1"),
            ("DATA", "354", "1"),
            (".", "250", "0"),
            ("QUIT", "221", "0"),
        ], "\n".join(e["_raw"] for e in pairs))
        self.assertGreater(int(pairs[5]["size"]), 100)  # swaks' default message
        self.assertEvent(close, "close", smtp_close("quit", helo="swaks.example",
                                                    mail_from="a@example.com", rcpt_ok=1,
                                                    messages=1))

    def test_smtplib_sendmail(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        msg = b"Subject: smtplib\r\n\r\nhello\r\n"
        with smtplib.SMTP(mxtest.HOST, p.port, local_hostname="smtplib.example",
                          timeout=5) as s:
            self.assertEqual(s.sendmail("a@example.com", ["b@example.com", "c@example.com"],
                                        msg), {})
        close = p.wait_event(5, ev="close")
        self.assertPairs(p, close["sid"], [
            greeting_pair(),
            pair("ehlo smtplib.example", 250, "scripted", lines=6),
            pair("mail FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("rcpt TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("rcpt TO:<c@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("data", 354, "End data with <CR><LF>.<CR><LF>"),
            pair(".", 250, "queued as 1", esc="2.0.0", size=len(msg)),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEvent(close, "close", smtp_close("quit", helo="smtplib.example",
                                                    mail_from="a@example.com", rcpt_ok=2,
                                                    messages=1))
        self.assertEqual(b.wait_conns(1).bodies, [msg])

    def test_ehlo_then_close_without_quit(self):
        # What openssl s_client does when a typed line starts with 'Q': it
        # closes the connection instead of sending QUIT.
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.close()
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair()])
        self.assertEvent(close, "close", smtp_close("client_eof_without_quit",
                                                    helo="client.example"))
        self.assertTrue(b.wait_conns(1).eof.wait(3), "the backend saw no EOF")

    def test_same_client_in_mode_tcp_has_no_smtp_fields(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, mode="tcp")
        c, sid = self.open(p)
        c.close()
        close = p.close_of(sid)
        self.assertEvent(close, "close", {"listener": "smtp", "end": "client_eof",
                                          "bytes_up": 21, "bytes_down": len(EHLO_REPLY) + 20,
                                          "ms": MS, "client": ADDR, "backend": ADDR})
        self.assertEqual(p.find(ev="pair"), [])

    def test_relay_closes_after_delivering(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        want = (b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n"
                b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(c.recv_exact(len(want)), want)
        c.send(b"bounce\r\n.\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 queued as 1\r\n")
        c.close()
        close = p.close_of(sid)
        self.assertEvent(close, "close", smtp_close("client_eof_without_quit",
                                                    helo="client.example", mail_from="",
                                                    rcpt_ok=1, messages=1))

    # ---- the backend ends the session

    def test_backend_closes_after_rejecting_rcpt(self):
        def reject_and_close(backend, rec, line):
            backend.send(rec, REJECT_RCPT)
            return "close"

        b = self.scripted(rules=[(b"RCPT TO:<nobody@", reject_and_close)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
               b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
        # a real reply for the oldest outstanding command instead of a bare EOF
        self.assertEqual(c.wait_closed(3),
                         ("eof", b"250 2.1.0 sender ok\r\n" + REJECT_RCPT + BACKEND_CLOSED))
        close = self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair(),
            pair("MAIL FROM:<a@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<nobody@example.com>", 550,
                 "<nobody@example.com>: Recipient address rejected", esc="5.1.1", pipelined=1,
                 primary=1),
            pair("RCPT TO:<b@example.com>", 421, "mxproxy: backend closed the connection",
                 esc="4.4.2", pipelined=1, local=1),
            pair("RCPT TO:<c@example.com>", 0, pipelined=1, aborted=1),
            pair("DATA", 0, pipelined=1, aborted=1),
        ])
        self.assertEvent(close, "close", smtp_close(
            "backend_closed", helo="client.example", mail_from="a@example.com",
            rcpt_rejected=1, primary_error=REJECT_RCPT.decode().rstrip("\r\n")))

    def test_backend_closes_with_nothing_outstanding(self):
        def close_now(backend, rec, line):
            backend.send(rec, b"250 2.0.0 ok\r\n")
            return "close"

        b = self.scripted(rules=[(b"NOOP", close_now)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        # nothing was asked, so nothing is answered: a plain EOF
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair(),
                                          pair("NOOP", 250, "ok", esc="2.0.0")])
        self.assertEvent(close, "close", smtp_close("backend_closed", helo="client.example"))

    def test_unsolicited_421_while_client_idle(self):
        def ok_then_shut_down(backend, rec, line):
            backend.send(rec, b"250 2.0.0 ok\r\n")
            if backend.stopping.wait(0.2):
                return "close"
            backend.send(rec, b"421 4.3.2 shutting down\r\n")
            return "close"

        b = self.scripted(rules=[(b"NOOP", ok_then_shut_down)])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 ok\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b"421 4.3.2 shutting down\r\n"))
        close = p.close_of(sid)
        unsolicited = p.find(ev="pair", sid=sid)[-1]
        # No command was waiting: ms= has nothing to measure. If it is given
        # at all it must be a duration within the session, not a clock value.
        if "ms" in unsolicited:
            self.assertLessEqual(float(unsolicited["ms"]), float(close["ms"]),
                                 "ms= of an unsolicited reply: " + unsolicited["_raw"])
            del unsolicited["ms"]
        self.assertPairs(p, sid, [
            greeting_pair(),
            ehlo_pair(),
            pair("NOOP", 250, "ok", esc="2.0.0"),
            pair("<none>", 421, "shutting down", esc="4.3.2", ms=None, primary=1),
        ])
        self.assertEvent(close, "close", smtp_close("backend_closed", helo="client.example",
                                                    primary_error="421 4.3.2 shutting down"))

    def test_backend_garbage_ends_session_with_421(self):
        # A line that is no reply puts commands and replies out of step for
        # good: smtp_pairs.h says mxproxy answers 421 and closes, as when the
        # backend is gone, rather than pairing later replies with the wrong
        # commands.
        b = self.scripted(rules=[(b"NOOP", b"hello world\r\n")])
        p = self.start_smtp_proxy(b.addr)
        c, sid = self.open(p)
        c.send(b"NOOP\r\n")
        how, got = c.wait_closed(3)
        self.assertEqual(how, "eof")
        self.assertRegex(got, rb"^(hello world\r\n)?421 4\.\d\.\d mxproxy: [^\r\n]+\r\n$")
        close = p.close_of(sid)
        self.assertEqual(close["end"], "backend_closed", close["_raw"])
        warn = p.find(ev="backend_garbage", sid=sid)
        self.assertEqual(len(warn), 1)
        self.assertEvent(warn[0], "backend_garbage", {"text": "hello world"}, lvl="warn")
        noop = p.find(ev="pair", sid=sid, cmd="NOOP")
        self.assertEqual(len(noop), 1)
        self.assertEqual(noop[0]["code"], "421", noop[0]["_raw"])
        self.assertTrue(b.wait_conns(1).closed.wait(3), "backend connection still open")

    # ---- mxproxy ends the session

    def test_all_backends_down_421_then_eof(self):
        down = ["%s:%d" % (mxtest.HOST, mxtest.free_port()) for _ in range(2)]
        p = self.start_smtp_proxy(down, fail_timeout=0)
        c = self.client(p.port)
        t0 = time.monotonic()
        self.assertEqual(c.read_reply(1.0), NO_SERVER)
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertEqual(c.wait_closed(2), ("eof", b""))
        sid = p.sid_of(c)
        close = self.assertPairs(p, sid, [])
        self.assertEvent(close, "close", smtp_close(
            "connect_failed", backend=None, error="connection refused",
            primary_error=NO_SERVER.decode().rstrip("\r\n")))
        self.assertEqual(len(p.find(ev="connect_error", sid=sid)), 2)

    def test_idle_timeout_421_then_eof(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, idle_timeout="300ms")
        c, sid = self.open(p)
        t0 = time.monotonic()
        self.assertEqual(c.wait_closed(3), ("eof", IDLE))
        self.assertWithin(time.monotonic() - t0, 0.25, 1.5, "idle timeout")
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair()])
        self.assertEvent(close, "close", smtp_close("idle_timeout", helo="client.example"))
        self.assertTrue(b.wait_conns(1).eof.wait(3), "the backend saw no EOF")

    def test_drain_421_then_eof(self):
        b = self.scripted()
        p = self.start_smtp_proxy(b.addr, glob={"drain_timeout": "200ms"})
        c, sid = self.open(p)
        p.signal(signal.SIGTERM)
        self.assertEqual(c.wait_closed(3), ("eof", SHUTTING_DOWN))
        close = self.assertPairs(p, sid, [greeting_pair(), ehlo_pair()])
        self.assertEvent(close, "close", smtp_close("drain", helo="client.example"))
        self.assertEqual(p.wait_exit(5), 0)


if __name__ == "__main__":
    mxtest.main()
