"""SIGHUP reload (backends, invalid config, listeners) and SIGTERM/SIGINT drain."""

import hashlib
import os
import signal
import smtplib
import socket
import subprocess
import time

import mxtest
from mxtest import HOST, config, listener, free_port


class ReloadTest(mxtest.ProxyTestCase):

    def test_sighup_switches_backend_and_keeps_old_on_error(self):
        x = self.smtp_backend("x")
        y = self.smtp_backend("y")
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, x.addr)))
        pid = p.pid
        a = self.client(port)
        self.assertEqual(a.recv_until(b"\r\n"), b"220 x ESMTP\r\n")

        t_hup = time.monotonic()
        m = p.reload(config(listener("smtp", listen, y.addr)))
        reached = None
        while reached != b"220 y ESMTP\r\n":
            self.assertLess(time.monotonic() - t_hup, 1.0, "new sessions still reach x after 1s")
            c = self.client(port)
            reached = c.recv_until(b"\r\n", timeout=1)
            self.assertIn(reached, (b"220 x ESMTP\r\n", b"220 y ESMTP\r\n"))
            c.close()
        ev = p.wait_event(start=m, ev="reload")
        self.assertEqual(ev["config"], p.path)
        self.assertEqual(ev["lvl"], "info")
        # The open session keeps its backend.
        self.assertEqual(a.cmd(b"NOOP"), b"250 2.0.0 x ok\r\n")
        n_x = len(x.conns)

        # An invalid config is refused with FILE:LINE: message; y stays.
        bad = config(listener("smtp", listen, y.addr, bogus_key="1"))
        bad_line = bad.splitlines().index("bogus_key = 1") + 1
        m = p.reload(bad)
        err = p.wait_event(start=m, ev="reload_error")
        self.assertEqual(err["lvl"], "error")
        self.assertTrue(err["error"].startswith("%s:%d: " % (p.path, bad_line)), err["error"])
        self.assertIn("bogus_key", err["error"])
        check = subprocess.run([mxtest.binary(), "-t", "-c", p.path], capture_output=True,
                               timeout=10)
        self.assertEqual(check.returncode, 1)
        self.assertEqual(err["error"] + "\n", check.stderr.decode(), "same message as -t")
        for _ in range(3):
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n", timeout=2), b"220 y ESMTP\r\n")
            c.close()
        self.assertEqual(len(x.conns), n_x)
        self.assertEqual(a.cmd(b"NOOP"), b"250 2.0.0 x ok\r\n")
        self.assertEqual(p.proc.poll(), None)
        self.assertEqual(p.pid, pid)
        self.assertEqual(len(p.find(ev="start")), 1, "reload must not restart the process")

    def test_sighup_adds_and_removes_listener(self):
        b = self.smtp_backend("mx")
        port1, port2 = free_port(), free_port()
        l1 = listener("one", "%s:%d" % (HOST, port1), b.addr)
        l2 = listener("two", "%s:%d" % (HOST, port2), b.addr)
        p = self.start_proxy(config(l1))
        self.assertTrue(mxtest.connect_refused(port2))

        m = p.reload(config(l1, l2))
        p.wait_event(start=m, ev="reload")
        ev = p.wait_event(start=m, ev="listen", listener="two")
        self.assertEqual((ev["addr"], ev["mode"]), ("%s:%d" % (HOST, port2), "tcp"))
        c = self.client(port2)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        self.assertEqual(p.wait_event(ev="open", sid=p.sid_of(c))["listener"], "two")
        c1 = self.client(port1)
        self.assertEqual(c1.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")

        m = p.reload(config(l1))
        p.wait_event(start=m, ev="reload")
        deadline = time.monotonic() + 1.0
        while not mxtest.connect_refused(port2):
            self.assertLess(time.monotonic(), deadline, "removed listener still accepts after 1s")
            time.sleep(0.02)
        # The session opened on the removed listener keeps working.
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        c3 = self.client(port1)
        self.assertEqual(c3.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        self.assertEqual(p.proc.poll(), None)
        self.assertEqual(len(p.find(ev="start")), 1)

    def test_open_session_keeps_its_idle_timeout(self):
        b = self.smtp_backend("mx")
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, b.addr, idle_timeout=1)))
        a = self.client(port)
        self.assertEqual(a.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        t_a = time.monotonic()
        m = p.reload(config(listener("smtp", listen, b.addr, idle_timeout=30)))
        p.wait_event(start=m, ev="reload")
        n = self.client(port)
        self.assertEqual(n.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        t_n = time.monotonic()
        self.assertEqual(a.wait_closed(2), ("eof", b""))
        self.assertWithin(time.monotonic() - t_a, 0.9, 1.6, "old session's idle_timeout")
        self.assertEqual(p.close_of(p.sid_of(a))["end"], "idle_timeout")
        # The new session runs under idle_timeout=30.
        n.assert_open(wait=max(0.0, 1.5 - (time.monotonic() - t_n)))
        self.assertEqual(n.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")

    def test_sighup_moves_a_listener(self):
        b = self.smtp_backend("mx")
        port1, port2 = free_port(), free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port1), b.addr)))
        m = p.reload(config(listener("smtp", "%s:%d" % (HOST, port2), b.addr)))
        p.wait_event(start=m, ev="reload")
        self.assertEqual(p.wait_event(start=m, ev="listen", listener="smtp")["addr"],
                         "%s:%d" % (HOST, port2))
        c = self.client(port2)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        deadline = time.monotonic() + 1.0
        while not mxtest.connect_refused(port1):
            self.assertLess(time.monotonic(), deadline, "old address still accepts after 1s")
            time.sleep(0.02)


class DrainTest(mxtest.ProxyTestCase):

    def test_sigterm_drains_then_exits_0(self):
        b = self.smtp_backend("mx")
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr),
                                    workers=2, drain_timeout=2))
        s = smtplib.SMTP(HOST, port, local_hostname="client.example", timeout=5)
        self.track(s)
        self.assertEqual(s.ehlo()[0], 250)
        self.assertEqual(s.mail("a@example.com")[0], 250)
        self.assertEqual(s.rcpt("b@example.com")[0], 250)
        self.assertEqual(s.docmd("DATA")[0], 354)
        part1 = b"Subject: drain\r\n\r\nfirst half\r\n"
        s.send(part1)
        idle = self.client(port)
        self.assertEqual(idle.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        b.wait_conns(2)

        m = p.mark()
        p.signal(signal.SIGTERM)
        drain = p.wait_event(start=m, ev="drain")
        self.assertTrue(mxtest.connect_refused(port), "listener still open after ev=drain")
        self.assertEqual(drain["sessions"], "2")

        part2 = b"second half\r\n"
        s.send(part2 + b".\r\n")
        code, text = s.getreply()
        msg = part1 + part2
        self.assertEqual(code, 250, text)
        digest = hashlib.sha256(msg).hexdigest().encode()
        self.assertEqual(text, b"2.0.0 mx queued %d %s" % (len(msg), digest))
        self.assertEqual(s.quit()[0], 221)
        s.close()

        how, got = idle.wait_closed(4)
        self.assertEqual(got, b"")
        self.assertWithin(time.monotonic() - drain["_t"], 1.8, 2.8, "idle session cut")
        close = p.close_of(p.sid_of(idle))
        self.assertEqual(close["end"], "drain")
        rc = p.wait_exit(2)
        self.assertEqual(rc, 0)
        self.assertEqual(p.events[-1]["ev"], "stop")
        closes = p.find(ev="close")
        self.assertEqual(sorted(e["end"] for e in closes), ["client_eof", "drain"])

    def test_exits_when_last_session_ends_before_drain_timeout(self):
        b = self.smtp_backend("mx")
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr),
                                    drain_timeout=30))
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        m = p.mark()
        p.signal(signal.SIGTERM)
        self.assertEqual(p.wait_event(start=m, ev="drain")["sessions"], "1")
        self.assertIsNone(p.proc.poll())
        # The session still works while draining.
        c.assert_open(wait=0.3)
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        sid = p.sid_of(c)
        c.close()
        t0 = time.monotonic()
        self.assertEqual(p.wait_exit(3), 0)
        self.assertLess(time.monotonic() - t0, 1.0, "exit once the last session ended")
        self.assertEqual(p.find(ev="close", sid=sid)[0]["end"], "client_eof")
        self.assertEqual(p.events[-1]["ev"], "stop")

    def test_sigint_without_sessions_exits_at_once(self):
        b = self.smtp_backend("mx")
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr),
                                    drain_timeout=30))
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        sid = p.sid_of(c)
        c.close()
        p.close_of(sid)
        t0 = time.monotonic()
        p.signal(signal.SIGINT)
        self.assertEqual(p.wait_exit(3), 0)
        self.assertLess(time.monotonic() - t0, 1.0, "nothing to drain: exit at once")
        self.assertEqual(p.find(ev="drain")[0]["sessions"], "0")
        self.assertEqual(p.events[-1]["ev"], "stop")


class PortOwnerTest(mxtest.ProxyTestCase):
    """SO_REUSEPORT is for this process's own workers: a second process on a
    listen address fails to start (or to reload) instead of taking half the
    connections."""

    def start_second(self, text):
        """mxproxy -c on text, expected to exit at once: (code, stdout, stderr, path)."""
        path = os.path.join(self.tmpdir, "second.conf")
        with open(path, "w") as f:
            f.write(text)
        r = subprocess.run([mxtest.binary(), "-c", path], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=10, start_new_session=True)
        return r.returncode, r.stdout.decode(), r.stderr.decode(), path

    def test_second_process_on_the_same_address_exits_1(self):
        x = self.smtp_backend("x")
        y = self.smtp_backend("y")
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, x.addr), workers=2))
        for addr in (listen, "0.0.0.0:%d" % port):
            text = config(listener("first", "%s:%d" % (HOST, free_port()), y.addr),
                          listener("second", addr, y.addr), workers=2)
            line = text.splitlines().index("[listener second]") + 1
            rc, out, err, path = self.start_second(text)
            self.assertEqual((rc, out, err),
                             (1, "", "%s:%d: listener 'second': address already in use\n"
                              % (path, line)))
        # Nothing of the second process took a connection; the first still serves.
        for _ in range(4):
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n"), b"220 x ESMTP\r\n")
            c.close()
        self.assertEqual(len(y.conns), 0)
        # Its own reload still works, and keeps sharing the port between its workers.
        m = p.reload(config(listener("smtp", listen, y.addr), workers=2))
        p.wait_event(start=m, ev="reload")
        for _ in range(4):
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n"), b"220 y ESMTP\r\n")
            c.close()
        self.assertEqual(p.find(ev="reload_error"), [])

    def test_address_held_by_another_program(self):
        """A socket with SO_REUSEPORT of the same user would share the port
        with mxproxy's workers: start and reload refuse that address."""
        b = self.smtp_backend("mx")
        other = socket.socket()
        self.addCleanup(other.close)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((HOST, 0))
        other.listen(8)
        taken = "%s:%d" % other.getsockname()
        text = config(listener("smtp", taken, b.addr))
        line = text.splitlines().index("[listener smtp]") + 1
        rc, out, err, path = self.start_second(text)
        self.assertEqual((rc, out, err),
                         (1, "", "%s:%d: listener 'smtp': address already in use\n" % (path, line)))
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, b.addr)))
        text = config(listener("smtp", listen, b.addr), listener("stolen", taken, b.addr))
        line = text.splitlines().index("[listener stolen]") + 1
        m = p.reload(text)
        err = p.wait_event(start=m, ev="reload_error")
        self.assertEqual(err["error"], "%s:%d: listener 'stolen': address already in use"
                         % (p.path, line))
        self.assertEqual(p.find(ev="listen", listener="stolen"), [])
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")


if __name__ == "__main__":
    mxtest.main()
