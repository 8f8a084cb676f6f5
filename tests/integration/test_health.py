"""Active health checks and balancing against real backends: smtp-sink and a private Postfix
smtpd killed and restarted mid-test. Checks the exact ev=backend_down / ev=backend_up lines,
that no client sees an error once a backend is marked down, that with every backend down a
client is answered at once (end=no_backend, no connect timeout paid), that balance = first
returns to the primary after it recovers, least_connections, and the mxproxy_backend_* lines
of /metrics."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxtest  # noqa: E402
from mxtest import HOST, Like, free_port  # noqa: E402

# Fast checks so a test takes seconds: a backend goes down after 2 failures 200ms apart.
FAST = {"health_interval": "200ms", "health_timeout": "150ms", "health_rise": 2,
        "health_fall": 2}


Sink = mxtest.SmtpSink


class Postfix(mxtest.PrivatePostfix):
    """A private Postfix smtpd on .port that can be stopped and started again."""

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.addr = "%s:%d" % (HOST, self.port)
        self.write_main_cf("""myhostname = mx.postfix.test
mydestination = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
default_transport = discard
""")
        self.write_master_cf("127.0.0.1:%d inet n - n - - smtpd\n" % self.port)
        self.start([self.port])

    def stop(self):
        subprocess.run([mxtest.POSTFIX, "-c", self.dir, "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        mxtest.stop_process(self.proc, signal.SIGTERM, 10)
        deadline = time.monotonic() + 10
        while not mxtest.connect_refused(self.port):
            if time.monotonic() > deadline:
                raise AssertionError("postfix still answers on %d" % self.port)
            time.sleep(0.05)


class Pop3Backend(mxtest.TcpBackend):
    """Greets with .greeting (switchable mid-test), answers QUIT with +OK and records every
    line it received in .lines."""

    def __init__(self, greeting=b"+OK ready\r\n"):
        self.greeting = greeting
        self.lines = []
        super().__init__("pop3")

    def handle(self, rec):
        self.send(rec, self.greeting)
        for line in self.recv_lines(rec):
            self.lines.append(line)
            if line.upper() == b"QUIT":
                self.send(rec, b"+OK bye\r\n")
                return
            self.send(rec, b"-ERR unknown\r\n")


class ProxiedSmtp(mxtest.TcpBackend):
    """Expects a PROXY header first (as a backend behind proxy_protocol does), records the
    header bytes in .headers, then greets 220 and closes on QUIT."""

    V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"

    def __init__(self, version):
        self.version = version
        self.headers = []
        super().__init__("proxied")

    def handle(self, rec):
        want = b"PROXY UNKNOWN\r\n" if self.version == 1 else self.V2_LOCAL
        got = b""
        while len(got) < len(want):
            data = self.recv(rec, len(want) - len(got))
            if not data:
                return
            got += data
        self.headers.append(got)
        if got != want:
            return
        self.send(rec, b"220 proxied ESMTP\r\n")
        while True:
            data = self.recv(rec)
            if not data or b"QUIT" in data:
                return


def metrics(proxy):
    with urllib.request.urlopen("http://%s/metrics" % proxy.admin, timeout=5) as r:
        return r.read().decode()


def backend_lines(text, listener):
    """The mxproxy_backend_* samples of listener, in order."""
    return [line for line in text.splitlines()
            if line.startswith("mxproxy_backend_") and 'listener="%s"' % listener in line]


class HealthTest(mxtest.ProxyTestCase):

    def start(self, *listeners, admin=False):
        glob = {}
        if admin:
            glob["admin"] = "%s:%d" % (HOST, free_port())
        p = self.start_proxy(mxtest.config(*listeners, **glob))
        p.admin = glob.get("admin")
        return p

    def smtp_session(self, p, port):
        """One SMTP session that must succeed: greeting, EHLO, QUIT. Returns the greeting and
        the backend it went to (found by the client's address: log lines come asynchronously)."""
        c = self.client(port)
        greeting = c.read_reply()
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        c.send(b"EHLO client.example\r\n")
        self.assertTrue(c.read_reply().startswith(b"250"))
        c.send(b"QUIT\r\n")
        self.assertTrue(c.read_reply().startswith(b"221"))
        c.wait_closed()
        c.close()
        close = p.close_of(p.sid_of(c))
        self.assertEqual(close["end"], "quit", close["_raw"])
        return greeting, close["backend"]

    def test_smtp_check_marks_down_and_up_no_client_error(self):
        a, b = self.track(Sink()), self.track(Sink())
        port = free_port()
        p = self.start(mxtest.listener("mx", "%s:%d" % (HOST, port), [a.addr, b.addr],
                                       mode="smtp", health_check="smtp", **FAST), admin=True)
        time.sleep(0.5)  # a few checks pass: nothing is logged while backends are up
        self.assertEqual(p.find(ev="backend_down") + p.find(ev="backend_up"), [])
        text = metrics(p)
        self.assertIn('mxproxy_backend_up{listener="mx",backend="%s"} 1' % a.addr, text)
        self.assertRegex(text, r'mxproxy_backend_health_checks_total\{listener="mx",backend="%s",'
                         r'result="ok"\} [1-9]' % a.addr.replace(".", r"\."))

        a.stop()
        down = p.wait_event(ev="backend_down", backend=a.addr, timeout=5)
        self.assertEvent(down, "backend_down", {"listener": "mx", "backend": a.addr,
                                                "check": "smtp", "reason": "connection refused"},
                         lvl="warn")
        # From here on no client sees an error and no connect to a is tried.
        for _ in range(6):
            self.assertEqual(self.smtp_session(p, port)[1], b.addr)
        self.assertEqual(p.find(ev="connect_error"), [])
        text = metrics(p)
        self.assertIn('mxproxy_backend_up{listener="mx",backend="%s"} 0' % a.addr, text)
        self.assertIn('mxproxy_backend_up{listener="mx",backend="%s"} 1' % b.addr, text)
        self.assertIn('mxproxy_backend_sessions_total{listener="mx",backend="%s"} 0' % a.addr,
                      text)
        self.assertRegex(text, r'mxproxy_backend_sessions_total\{listener="mx",backend="%s"\} '
                         r'([6-9]|\d\d)\n' % b.addr.replace(".", r"\."))
        self.assertIn('mxproxy_backend_active_sessions{listener="mx",backend="%s"} 0' % b.addr,
                      text)

        a.start()
        up = p.wait_event(ev="backend_up", backend=a.addr, timeout=5)
        self.assertEvent(up, "backend_up", {"listener": "mx", "backend": a.addr,
                                            "check": "smtp"})
        # Once per transition: one line each.
        self.assertEqual(len(p.find(ev="backend_down", backend=a.addr)), 1)
        self.assertEqual(len(p.find(ev="backend_up", backend=a.addr)), 1)
        self.assertIn('mxproxy_backend_up{listener="mx",backend="%s"} 1' % a.addr, metrics(p))

    def test_all_down_answered_at_once(self):
        # Backends that drop SYNs: a session's connect would wait connect_timeout (5s).
        holes = [self.track(mxtest.Blackhole()) for _ in range(2)]
        addrs = [h.addr for h in holes]
        smtp_port, pop3_port, tcp_port = free_port(), free_port(), free_port()
        p = self.start(
            mxtest.listener("s", "%s:%d" % (HOST, smtp_port), addrs, mode="smtp",
                            health_check="connect", **FAST),
            mxtest.listener("p", "%s:%d" % (HOST, pop3_port), addrs, mode="pop3",
                            health_check="connect", **FAST),
            mxtest.listener("t", "%s:%d" % (HOST, tcp_port), addrs, health_check="connect",
                            **FAST))
        for name in ("s", "p", "t"):
            for addr in addrs:
                ev = p.wait_event(ev="backend_down", listener=name, backend=addr, timeout=5)
                self.assertEvent(ev, "backend_down", {"listener": name, "backend": addr,
                                                      "check": "connect", "reason": "timeout"},
                                 lvl="warn")
        for port, reply, end_line in (
                (smtp_port, b"421 4.4.1 mxproxy: no mail server available, try again later\r\n",
                 "s"),
                (pop3_port, b"-ERR [SYS/TEMP] mxproxy: no mail server available, try again "
                            b"later\r\n", "p"),
                (tcp_port, b"", "t")):
            t0 = time.monotonic()
            c = self.client(port)
            got = c.recv_until(b"\n", timeout=3) if reply else b""
            c.wait_closed(timeout=3)
            self.assertEqual(got, reply)
            self.assertWithin(time.monotonic() - t0, 0, 1.0, "answer with every backend down")
            close = p.close_of(p.sid_of(c))
            want = {"listener": end_line, "end": "no_backend", "bytes_up": 0,
                    "bytes_down": 0, "ms": Like(r"\d+(\.\d+)?"), "client": Like(r"127\.0\.0\.1:\d+"),
                    "error": "all backends down"}
            if end_line == "s":
                want["primary_error"] = reply.decode().rstrip("\r\n")
            self.assertEqual(p.find(ev="connect"), [])
            for k, v in want.items():
                got_v = close.get(k)
                if isinstance(v, Like):
                    self.assertTrue(v.matches(got_v), "%s=%r in %s" % (k, got_v, close["_raw"]))
                else:
                    self.assertEqual(str(got_v), str(v), "%s= in %s" % (k, close["_raw"]))

    def test_first_returns_to_primary_postfix(self):
        primary = self.track(Postfix())
        standby = self.track(Sink())
        port = free_port()
        p = self.start(mxtest.listener("mx", "%s:%d" % (HOST, port),
                                       [primary.addr, standby.addr], mode="smtp",
                                       balance="first", health_check="greeting", **FAST),
                       admin=True)
        for _ in range(3):
            self.assertEqual(self.smtp_session(p, port),
                             (b"220 mx.postfix.test ESMTP\r\n", primary.addr))

        primary.stop()
        down = p.wait_event(ev="backend_down", backend=primary.addr, timeout=5)
        self.assertEqual(down["reason"], "connection refused")
        for _ in range(3):
            self.assertEqual(self.smtp_session(p, port), (b"220 smtp-sink ESMTP\r\n",
                                                          standby.addr))

        t0 = time.monotonic()
        primary.start([primary.port])
        up = p.wait_event(ev="backend_up", backend=primary.addr, timeout=20)
        self.assertEvent(up, "backend_up", {"listener": "mx", "backend": primary.addr,
                                            "check": "greeting"})
        # health_rise = 2 passes 200ms apart: not before the second check.
        self.assertGreater(up["_t"] - t0, 0.2)
        for _ in range(3):
            self.assertEqual(self.smtp_session(p, port),
                             (b"220 mx.postfix.test ESMTP\r\n", primary.addr))
        lines = backend_lines(metrics(p), "mx")
        self.assertIn('mxproxy_backend_up{listener="mx",backend="%s"} 1' % primary.addr, lines)
        self.assertIn('mxproxy_backend_sessions_total{listener="mx",backend="%s"} 6'
                      % primary.addr, lines)
        self.assertIn('mxproxy_backend_sessions_total{listener="mx",backend="%s"} 3'
                      % standby.addr, lines)
        self.assertIn('mxproxy_backend_connect_failures_total{listener="mx",backend="%s"} 0'
                      % standby.addr, lines)

    def test_least_connections(self):
        a, b = self.track(Sink()), self.track(Sink())
        port = free_port()
        p = self.start(mxtest.listener("mx", "%s:%d" % (HOST, port), [a.addr, b.addr],
                                       mode="smtp", balance="least_connections"), admin=True)
        c1 = self.client(port)
        self.assertTrue(c1.read_reply().startswith(b"220"))
        first = p.wait_event(ev="connect")["backend"]
        other = ({a.addr, b.addr} - {first}).pop()
        # The other backend (no sessions), then closed; round-robin would come back to the
        # first backend now, but c1 still holds it.
        self.assertEqual(self.smtp_session(p, port)[1], other)
        self.assertEqual(self.smtp_session(p, port)[1], other)
        lines = backend_lines(metrics(p), "mx")
        self.assertIn('mxproxy_backend_active_sessions{listener="mx",backend="%s"} 1' % first,
                      lines)
        c1.send(b"QUIT\r\n")
        c1.read_reply()
        c1.wait_closed()

    def test_passive_marking_says_why(self):
        """health_check = off: a failed connect still marks the backend (fail_timeout), and the
        line keeps its fields and adds reason=."""
        dead = free_port()
        live = self.track(Sink())
        port = free_port()
        p = self.start(mxtest.listener("mx", "%s:%d" % (HOST, port),
                                       ["%s:%d" % (HOST, dead), live.addr], mode="smtp"))
        self.assertEqual(self.smtp_session(p, port)[1], live.addr)
        down = p.wait_event(ev="backend_down")
        self.assertEvent(down, "backend_down", {"listener": "mx", "backend": "%s:%d" % (HOST, dead),
                                                "for_ms": 10000, "reason": "connection refused"},
                         lvl="warn")

    def test_pop3_greeting_check(self):
        """health_check = greeting in mode pop3: an -ERR greeting takes a backend out, +OK
        brings it back; the check says QUIT after a good greeting."""
        a = self.track(Pop3Backend())
        b = self.track(Pop3Backend(b"+OK standby\r\n"))
        port = free_port()
        p = self.start(mxtest.listener("pop", "%s:%d" % (HOST, port), [a.addr, b.addr],
                                       mode="pop3", balance="first", health_check="greeting",
                                       **FAST))
        deadline = time.monotonic() + 5
        while b"QUIT" not in a.lines and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertIn(b"QUIT", a.lines)  # the goodbye after a passing check
        a.greeting = b"-ERR [SYS/TEMP] overloaded\r\n"
        down = p.wait_event(ev="backend_down", backend=a.addr, timeout=5)
        self.assertEvent(down, "backend_down", {"listener": "pop", "backend": a.addr,
                                                "check": "greeting", "reason": "greeting -ERR"},
                         lvl="warn")
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"+OK standby\r\n")
        c.send(b"QUIT\r\n")
        self.assertEqual(c.recv_until(b"\r\n"), b"+OK bye\r\n")
        c.wait_closed()
        a.greeting = b"+OK ready\r\n"
        up = p.wait_event(ev="backend_up", backend=a.addr, timeout=5)
        self.assertEvent(up, "backend_up", {"listener": "pop", "backend": a.addr,
                                            "check": "greeting"})
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n"), b"+OK ready\r\n")

    def test_reload_keeps_state(self):
        """A backend down before SIGHUP stays down after it (no backend_up, no session to it)
        when the new config keeps its address."""
        a, b = self.track(Sink()), self.track(Sink())
        port = free_port()
        text = mxtest.config(mxtest.listener("mx", "%s:%d" % (HOST, port), [a.addr, b.addr],
                                             mode="smtp", balance="first",
                                             health_check="smtp", **FAST))
        p = self.start_proxy(text)
        a.stop()
        p.wait_event(ev="backend_down", backend=a.addr, timeout=5)
        m = p.reload(text.replace("health_rise = 2", "health_rise = 3"))
        p.wait_event(ev="reload", start=m)
        for _ in range(3):
            self.assertEqual(self.smtp_session(p, port)[1], b.addr)
        self.assertEqual(p.find(ev="backend_up"), [])
        self.assertEqual(p.find(ev="connect_error"), [])
        self.assertEqual(len(p.find(ev="backend_down")), 1)

    def test_checks_send_proxy_header(self):
        """With proxy_protocol, a check opens with PROXY UNKNOWN (v1) or a v2 LOCAL header,
        so a backend that demands the header passes."""
        v1, v2 = self.track(ProxiedSmtp(1)), self.track(ProxiedSmtp(2))
        p = self.start(
            mxtest.listener("v1", "%s:%d" % (HOST, free_port()), v1.addr, mode="smtp",
                            proxy_protocol="v1", health_check="greeting", **FAST),
            mxtest.listener("v2", "%s:%d" % (HOST, free_port()), v2.addr, mode="smtp",
                            proxy_protocol="v2", health_check="greeting", **FAST))
        deadline = time.monotonic() + 5
        while (len(v1.headers) < 3 or len(v2.headers) < 3) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(v1.headers[:3], [b"PROXY UNKNOWN\r\n"] * 3)
        self.assertEqual(v2.headers[:3], [ProxiedSmtp.V2_LOCAL] * 3)
        self.assertEqual(p.find(ev="backend_down"), [])

    def test_config_check(self):
        path = os.path.join(self.tmpdir, "bad.ini")
        with open(path, "w") as f:
            f.write(mxtest.config(mxtest.listener("mx", "127.0.0.1:2525", "127.0.0.1:25",
                                                  mode="pop3", health_check="smtp")))
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True, text=True,
                           timeout=10)
        self.assertEqual(r.returncode, 1)
        line = mxtest.config(mxtest.listener("mx", "127.0.0.1:2525", "127.0.0.1:25",
                                             mode="pop3", health_check="smtp")).splitlines()
        n = line.index("health_check = smtp") + 1
        self.assertEqual(r.stderr, "%s:%d: listener 'mx': health_check = smtp needs mode = smtp "
                                   "or tcp (mode pop3: use greeting)\n" % (path, n))


if __name__ == "__main__":
    mxtest.main()
