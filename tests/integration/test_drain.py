"""Drain in mode smtp never cuts a message the backend may have stored.

A backend that holds its reply to the end of DATA past the drain deadline
makes the race certain: the message is stored, the 250 is not yet sent. The
client must get that 250 (and a 421 only for what it sends afterwards, which
never reaches the backend); a session with no reply owed gets its 421 at the
deadline; a reply still owed after drain_grace (or at a third signal) is
never forged: the client sees the close, the pair is logged aborted=1.
"""

import re
import signal
import smtplib
import threading
import time

import mxtest
from mxtest import pair, smtp_close

SHUTTING_DOWN = b"421 4.3.2 mxproxy: service shutting down, closing connection\r\n"
EHLO_REPLY = (b"250-holding\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
              b"250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
GO_AHEAD = b"354 go ahead\r\n"
HELD_BODY = b"Message-ID: <held>\r\n\r\nbody\r\n"


class HoldingBackend(mxtest.ScriptedSmtpBackend):
    """Stores each message as soon as its final dot arrives (stored: the
    Message-ID values, in order), then holds the 250 until release is set."""

    def __init__(self, name="holding", **kw):
        self.release = threading.Event()
        self.stored = []
        self.dots = threading.Semaphore(0)
        self.datas = threading.Semaphore(0)
        self.lock = threading.Lock()
        super().__init__(name, rules=[(b"DATA", self.data)], **kw)

    def data(self, backend, rec, line):
        self.datas.release()
        self.send(rec, GO_AHEAD)
        body = self.read_body(rec)
        if body is None:
            return "close"  # no final dot: nothing stored
        m = re.search(rb"Message-ID: <([^>]+)>", body)
        mid = m.group(1).decode() if m else "?"
        with self.lock:
            self.stored.append(mid)
        rec.bodies.append(body)
        self.dots.release()
        while not self.release.wait(0.05):
            if self.stopping.is_set():
                return "close"
        try:
            self.send(rec, b"250 2.0.0 queued as %s\r\n" % mid.encode())
        except OSError:
            return "close"
        return None

    def close(self):
        self.release.set()
        super().close()


def message(mid, approx=200 * 1024):
    return (b"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <%s>\r\n"
            b"Subject: drain\r\n\r\n" % mid.encode()) + mxtest.message_body(approx)


class SmtplibSender(threading.Thread):
    """One real client: EHLO, MAIL, RCPT, DATA with a 200 KB body, then one
    more MAIL (a second transaction) once the first is answered."""

    def __init__(self, port, mid):
        super().__init__(daemon=True)
        self.port = port
        self.mid = mid
        self.data_reply = None   # (code, text) to the final dot, or the exception
        self.next_reply = None   # reply to the MAIL that follows
        self.local_port = None

    def run(self):
        try:
            s = smtplib.SMTP(mxtest.HOST, self.port, local_hostname="client.example",
                             timeout=30)
        except OSError as e:
            self.data_reply = e
            return
        self.local_port = s.sock.getsockname()[1]
        try:
            s.ehlo()
            s.mail("a@example.com")
            s.rcpt("b@example.com")
            self.data_reply = s.data(message(self.mid))
            self.next_reply = s.docmd("MAIL FROM:<a@example.com>")
        except (smtplib.SMTPException, OSError) as e:
            if self.data_reply is None:
                self.data_reply = e
            else:
                self.next_reply = e
        finally:
            s.close()


class DrainTest(mxtest.ProxyTestCase):

    def in_data(self, port, helo, sender):
        """A raw client through EHLO helo, MAIL FROM:<sender> and RCPT TO:<b@example.com>,
        each answered, and past DATA's go-ahead."""
        c = self.client(port)
        self.assertEqual(c.read_reply(), b"220 holding ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO " + helo), EHLO_REPLY)
        self.assertEqual(c.cmd(b"MAIL FROM:<%s>" % sender), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), GO_AHEAD)
        return c

    def stalled_in_data(self, port):
        """A raw client half-way through a message body: no reply owed."""
        c = self.in_data(port, b"stalled.example", b"s@example.com")
        c.send(b"Message-ID: <stalled>\r\n\r\nhalf a body\r\n")
        return c

    def test_no_accepted_message_is_cut(self):
        b = self.track(HoldingBackend())
        p = self.start_smtp_proxy(b.addr, glob={"drain_timeout": "3s", "workers": 2})
        stalled = self.stalled_in_data(p.port)
        senders = [SmtplibSender(p.port, "m%d" % i) for i in range(8)]
        for t in senders:
            t.start()
        # SIGTERM while the bodies are on their way.
        for _ in range(8):
            self.assertTrue(b.datas.acquire(timeout=10), "a DATA did not reach the backend")
        m = p.mark()
        p.signal(signal.SIGTERM)
        drain = p.wait_event(start=m, ev="drain")
        self.assertEqual(drain["sessions"], "9")
        for _ in range(8):
            self.assertTrue(b.dots.acquire(timeout=10), "a message did not reach the backend")

        # The deadline: the session owing nothing gets its 421 then.
        self.assertEqual(stalled.wait_closed(6), ("eof", SHUTTING_DOWN))
        self.assertWithin(time.monotonic() - drain["_t"], 2.8, 4.0, "drain deadline")
        time.sleep(0.5)
        self.assertEqual([t.data_reply for t in senders], [None] * 8,
                         "a client got a reply to its final dot before the backend sent one")
        self.assertEqual(sorted(b.stored), sorted("m%d" % i for i in range(8)))
        b.release.set()
        for t in senders:
            t.join(10)
            self.assertFalse(t.is_alive())

        for t in senders:
            stored = t.mid in b.stored
            if isinstance(t.data_reply, tuple) and t.data_reply[0] == 421:
                self.assertFalse(stored, "%s: stored by the backend, told 421" % t.mid)
            if stored:
                self.assertEqual(t.data_reply, (250, b"2.0.0 queued as %s" % t.mid.encode()),
                                 "%s: stored by the backend" % t.mid)
            # A new transaction after the deadline is refused, not relayed.
            self.assertEqual(t.next_reply, (421, SHUTTING_DOWN[4:].rstrip(b"\r\n")))
        for rec in b.conns:
            mails = [c for c in rec.commands if c.upper().startswith(b"MAIL")]
            self.assertLessEqual(len(mails), 1, "a second transaction reached the backend")

        for t in senders:
            sid = p.sid_of(t.local_port)
            close = p.close_of(sid, timeout=5)
            self.assertEvent(close, "close", smtp_close(
                "drain", helo="client.example", mail_from="a@example.com", rcpt_ok=1,
                messages=1))
            dot = p.find(ev="pair", sid=sid, cmd=".")
            self.assertEqual(len(dot), 1, dot)
            self.assertEvent(dot[0], "pair", pair(".", 250, "queued as %s" % t.mid, esc="2.0.0",
                                                   size=mxtest.UINT))
            self.assertGreater(float(dot[0]["ms"]), 2500.0, "the dot was answered after the deadline")
        sid = p.sid_of(stalled)
        self.assertEvent(p.close_of(sid), "close", smtp_close(
            "drain", helo="stalled.example", mail_from="s@example.com", rcpt_ok=1))
        self.assertEqual(p.wait_exit(5), 0)
        self.assertEqual(p.events[-1]["ev"], "stop")

    def open_with_dot_outstanding(self, b, port):
        """A raw client whose final dot the backend holds the reply to."""
        c = self.in_data(port, b"held.example", b"h@example.com")
        c.send(HELD_BODY + b".\r\n")
        self.assertTrue(b.dots.acquire(timeout=5), "the dot did not reach the backend")
        b.datas.acquire(timeout=0)
        return c

    def held_pairs(self, dot):
        return [
            pair("<greeting>", 220, "holding ESMTP"),
            pair("EHLO held.example", 250, "holding", lines=6),
            pair("MAIL FROM:<h@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("DATA", 354, "go ahead"),
            dot,
        ]

    def start_held_and_idle(self, glob):
        """A HoldingBackend behind a proxy with glob, one session owed the reply to its dot
        and one idle past the greeting; returns (backend, proxy, held, idle)."""
        b = self.track(HoldingBackend())
        p = self.start_smtp_proxy(b.addr, glob=glob)
        held = self.open_with_dot_outstanding(b, p.port)
        idle = self.client(p.port)
        self.assertEqual(idle.read_reply(), b"220 holding ESMTP\r\n")
        return b, p, held, idle

    def test_reply_owed_past_drain_grace_is_cut_without_421(self):
        b, p, held, idle = self.start_held_and_idle({"drain_timeout": "1s", "drain_grace": "1s"})
        m = p.mark()
        p.signal(signal.SIGTERM)
        drain = p.wait_event(start=m, ev="drain")
        self.assertEqual(idle.wait_closed(3), ("eof", SHUTTING_DOWN))
        self.assertWithin(time.monotonic() - drain["_t"], 0.8, 1.6, "drain deadline")
        # The held session: no 421 (the backend has the message), just the close.
        self.assertEqual(held.wait_closed(3), ("eof", b""))
        self.assertWithin(time.monotonic() - drain["_t"], 1.8, 2.8, "deadline + drain_grace")
        sid = p.sid_of(held)
        close = self.assertPairs(p, sid, self.held_pairs(
            pair(".", 0, pipelined=0, size=len(HELD_BODY), aborted=1)))
        self.assertEvent(close, "close", smtp_close(
            "drain", helo="held.example", mail_from="h@example.com", rcpt_ok=1))
        self.assertEqual(b.stored, ["held"])
        self.assertEqual(p.wait_exit(5), 0)

    def test_second_signal_still_waits_third_cuts(self):
        _, p, held, idle = self.start_held_and_idle({"drain_timeout": "30s",
                                                     "drain_grace": "30s"})
        m = p.mark()
        p.signal(signal.SIGTERM)
        p.wait_event(start=m, ev="drain")
        idle.assert_open(wait=0.3)
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        # Second signal: the deadline is now; the session owing nothing goes.
        self.assertEqual(idle.wait_closed(2), ("eof", SHUTTING_DOWN))
        self.assertLess(time.monotonic() - t0, 1.0)
        cut = p.wait_event(start=m, ev="drain_cut")
        self.assertEqual(cut["lvl"], "warn")
        # ... while the one owed a reply to its dot still waits for it.
        held.assert_open(wait=0.5)
        self.assertIsNone(p.proc.poll())
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        self.assertEqual(held.wait_closed(2), ("eof", b""))
        self.assertLess(time.monotonic() - t0, 1.0, "third signal: cut at once")
        self.assertEqual(p.wait_exit(5), 0)
        sid = p.sid_of(held)
        self.assertPairs(p, sid, self.held_pairs(pair(".", 0, size=len(HELD_BODY), aborted=1)))
        self.assertEqual(len(p.find(ev="drain_cut")), 2)

    def test_second_signal_then_reply_then_421(self):
        b = self.track(HoldingBackend())
        p = self.start_smtp_proxy(b.addr, glob={"drain_timeout": "30s"})
        held = self.open_with_dot_outstanding(b, p.port)
        m = p.mark()
        p.signal(signal.SIGTERM)
        p.wait_event(start=m, ev="drain")
        p.signal(signal.SIGTERM)
        p.wait_event(start=m, ev="drain_cut")
        # Sent after the deadline: never relayed, answered by the 421.
        held.send(b"MAIL FROM:<again@example.com>\r\n")
        held.assert_open(wait=0.3)
        b.release.set()
        self.assertEqual(held.read_reply(), b"250 2.0.0 queued as held\r\n")
        self.assertEqual(held.wait_closed(2), ("eof", SHUTTING_DOWN))
        sid = p.sid_of(held)
        close = self.assertPairs(p, sid, self.held_pairs(
            pair(".", 250, "queued as held", esc="2.0.0", size=len(HELD_BODY))))
        self.assertEvent(close, "close", smtp_close(
            "drain", helo="held.example", mail_from="h@example.com", rcpt_ok=1, messages=1))
        self.assertEqual(p.wait_exit(5), 0)
        rec = b.conns[0]
        self.assertEqual([c for c in rec.commands if c.startswith(b"MAIL")],
                         [b"MAIL FROM:<h@example.com>"])

    def test_bdat_chunk_on_its_way_is_not_waited_for(self):
        # The client owes the rest of the chunk, the backend owes nothing:
        # the deadline cuts at once, with the 421 as the BDAT's answer.
        b = self.track(HoldingBackend())
        p = self.start_smtp_proxy(b.addr, glob={"drain_timeout": "1s", "drain_grace": "30s"})
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 holding ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO chunky.example"), EHLO_REPLY)
        self.assertEqual(c.cmd(b"MAIL FROM:<c@example.com>"), b"250 2.1.0 sender ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 recipient ok\r\n")
        c.send(b"BDAT 1000 LAST\r\n" + b"x" * 400)
        rec = b.wait_conns(1)
        deadline = time.monotonic() + 3
        while len(rec.received) < 400 and time.monotonic() < deadline:
            time.sleep(0.02)
        m = p.mark()
        p.signal(signal.SIGTERM)
        drain = p.wait_event(start=m, ev="drain")
        self.assertEqual(c.wait_closed(3), ("eof", SHUTTING_DOWN))
        self.assertWithin(time.monotonic() - drain["_t"], 0.8, 1.8, "drain deadline")
        sid = p.sid_of(c)
        close = self.assertPairs(p, sid, [
            pair("<greeting>", 220, "holding ESMTP"),
            pair("EHLO chunky.example", 250, "holding", lines=6),
            pair("MAIL FROM:<c@example.com>", 250, "sender ok", esc="2.1.0"),
            pair("RCPT TO:<b@example.com>", 250, "recipient ok", esc="2.1.5"),
            pair("BDAT 1000 LAST", 0, size=1000, aborted=1),
        ])
        self.assertEvent(close, "close", smtp_close(
            "drain", helo="chunky.example", mail_from="c@example.com", rcpt_ok=1))
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.bodies, [], "an incomplete chunk was stored")
        self.assertEqual(p.wait_exit(5), 0)


if __name__ == "__main__":
    mxtest.main()
