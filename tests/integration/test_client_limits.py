"""Per-client limits and access lists: max_connections_per_client,
max_connection_rate_per_client, allow and deny. Clients come from distinct
127.x.y.z source addresses (or from a PROXY header); each refusal is checked
byte for byte (mode smtp 421 4.7.0 / 554 5.7.1, mode imap * BYE, mode pop3
-ERR, mode tcp a bare close), by its ev=close line (end=client_limit / end=denied, no backend),
and refused clients never reach a backend. /metrics counts the refusals,
SIGHUP applies new lists, and a flood from 18,000 addresses (more than the
per-listener table holds) keeps RSS bounded while every address stays limited.
"""

import os
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxtest  # noqa: E402
from mxtest import HOST, MS, config, listener, free_port, smtp_close  # noqa: E402

SMTP_LIMIT = b"421 4.7.0 mxproxy: too many connections from your address\r\n"
SMTP_DENIED = b"554 5.7.1 mxproxy: access denied\r\n"
POP3_LIMIT = b"-ERR [SYS/TEMP] mxproxy: too many connections from your address, try again later\r\n"
POP3_DENIED = b"-ERR [SYS/PERM] mxproxy: access denied\r\n"
IMAP_LIMIT = b"* BYE [UNAVAILABLE] mxproxy: too many connections from your address\r\n"
IMAP_DENIED = b"* BYE mxproxy: access denied\r\n"


class HoldBackend(mxtest.TcpBackend):
    """Sends greeting, then holds the connection until the peer closes."""

    def __init__(self, greeting, **kw):
        self.greeting = greeting
        super().__init__(**kw)

    def handle(self, rec):
        self.send(rec, self.greeting)
        while True:
            data = self.recv(rec)
            if not data:
                return


ANY_ADDR = mxtest.Like(r"(127\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+")


def tcp_close(end, error=None, client=ANY_ADDR):
    """ev=close of a mode tcp session refused before any backend."""
    f = {"listener": "smtp", "end": end, "bytes_up": "0", "bytes_down": "0", "ms": MS,
         "client": client}
    if error is not None:
        f["error"] = error
    return f


def smtp_refusal(end, reply, error=None, client=ANY_ADDR):
    """ev=close of a mode smtp session refused with reply before any backend."""
    f = smtp_close(end, backend=None, error=error, primary_error=reply.decode().rstrip("\r\n"))
    f["client"] = client
    return f


class ClientLimitsTest(mxtest.ProxyTestCase):

    def client_from(self, port, source):
        c = self.track(mxtest.Client(port, source=source))
        c.src = source
        return c

    @staticmethod
    def sid(p, c):
        """The sid of client c (mxtest's sid_of knows 127.0.0.1 only)."""
        return p.wait_event(ev="open", client="%s:%d" % (getattr(c, "src", HOST),
                                                        c.local_port))["sid"]

    def assertRefused(self, p, c, wire, close_fields, msg=None):
        """c gets exactly wire then EOF; its close line is close_fields; no backend."""
        self.assertEqual(c.wait_closed(2), ("eof", wire), msg)
        sid = self.sid(p, c)
        self.assertEvent(p.close_of(sid), "close", close_fields)
        self.assertEqual(p.find(ev="connect", sid=sid), [])
        return sid

    def test_smtp_max_connections_per_client(self):
        b = self.smtp_backend("mx")
        p = self.start_smtp_proxy(b.addr, max_connections_per_client=2, glob={"workers": 2})
        a1 = self.client_from(p.port, "127.0.0.2")
        a2 = self.client_from(p.port, "127.0.0.2")
        for c in (a1, a2):
            self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        a3 = self.client_from(p.port, "127.0.0.2")
        self.assertRefused(p, a3, SMTP_LIMIT, smtp_refusal(
            "client_limit", SMTP_LIMIT, error="max_connections_per_client",
            client="127.0.0.2:%d" % a3.local_port))
        self.assertEqual(len(b.conns), 2, "no backend connection for a refused session")
        # Another address is counted apart.
        o = self.client_from(p.port, "127.0.0.3")
        self.assertEqual(o.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        # The refused one never counted: once a1 ends, the address is served again.
        self.assertEqual(a1.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        sid1 = self.sid(p, a1)
        a1.close()
        self.assertEqual(p.close_of(sid1)["end"], "quit")
        a4 = self.client_from(p.port, "127.0.0.2")
        self.assertEqual(a4.recv_until(b"\r\n", timeout=2), b"220 mx ESMTP\r\n")
        self.assertEqual(a2.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        self.assertEqual(len(p.find(ev="close", end="client_limit")), 1)

    def test_tcp_rate_per_client(self):
        b = HoldBackend(b"hello\r\n", name="hold")
        self.track(b)
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             max_connection_rate_per_client=3)))
        other = self.client_from(port, "127.0.0.6")
        self.assertEqual(other.recv_until(b"\r\n"), b"hello\r\n")
        burst = [self.client_from(port, "127.0.0.5") for _ in range(3)]
        for c in burst:
            self.assertEqual(c.recv_until(b"\r\n"), b"hello\r\n")
        t_burst = time.monotonic()  # after the third token was taken
        # Closing sessions gives no token back: the rate counts new sessions.
        for c in burst:
            c.close()
        over = self.client_from(port, "127.0.0.5")
        self.assertEqual(over.wait_closed(2), ("eof", b""))
        # A third of a second on, one token is back, and only one (a second takes 2/3 s).
        time.sleep(max(0.0, t_burst + 0.36 - time.monotonic()))
        later = self.client_from(port, "127.0.0.5")
        self.assertEqual(later.recv_until(b"\r\n"), b"hello\r\n")
        last = self.client_from(port, "127.0.0.5")
        self.assertEqual(last.wait_closed(2), ("eof", b""))
        for c in (over, last):
            self.assertRefused(p, c, b"", tcp_close("client_limit",
                                                    error="max_connection_rate_per_client"))
        self.assertEqual(len(b.conns), 5)

    def test_smtp_deny_and_allow(self):
        b = self.smtp_backend("mx")
        admin = free_port()
        p = self.start_smtp_proxy(b.addr, allow=["127.0.0.0/24", "::1"],
                                  deny="127.0.0.8/29, 127.0.0.66",
                                  glob={"admin": "%s:%d" % (HOST, admin)})
        # smtplib sees the 554 greeting as a refused connection.
        with self.assertRaises(smtplib.SMTPConnectError) as cm:
            smtplib.SMTP(HOST, p.port, source_address=("127.0.0.9", 0), timeout=5)
        self.assertEqual(cm.exception.smtp_code, 554)
        self.assertEqual(cm.exception.smtp_error, b"5.7.1 mxproxy: access denied")
        denied = p.wait_event(ev="close", end="denied")
        self.assertEvent(denied, "close", smtp_refusal(
            "denied", SMTP_DENIED, client=mxtest.Like(r"127\.0\.0\.9:\d+")))
        # Raw bytes: in deny (a single host), and outside a non-empty allow.
        for src in ("127.0.0.66", "127.0.1.1", "127.0.0.15"):
            c = self.client_from(p.port, src)
            self.assertRefused(p, c, SMTP_DENIED, smtp_refusal(
                "denied", SMTP_DENIED, client="%s:%d" % (src, c.local_port)), src)
        self.assertEqual(len(b.conns), 0, "no backend connection for a denied client")
        # Inside allow and outside deny: served (127.0.0.16 is past 127.0.0.8/29).
        for src in ("127.0.0.1", "127.0.0.7", "127.0.0.16"):
            s = smtplib.SMTP(HOST, p.port, source_address=(src, 0), timeout=5)
            self.assertEqual(s.noop(), (250, b"2.0.0 mx ok"))
            s.quit()
        self.assertEqual(len(b.conns), 3)
        # /metrics counts the refusals under their end.
        p.wait_count(4, ev="close", end="denied")
        body = urllib.request.urlopen("http://%s:%d/metrics" % (HOST, admin), timeout=5).read()
        self.assertIn(b'mxproxy_sessions_total{listener="smtp",end="denied"} 4\n', body)
        self.assertIn(b'mxproxy_sessions_total{listener="smtp",end="client_limit"} 0\n', body)

    def test_tcp_denied_is_a_close(self):
        b = HoldBackend(b"hello\r\n", name="hold")
        self.track(b)
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             deny="127.0.0.0/8")))
        c = self.client_from(port, "127.0.0.20")
        self.assertRefused(p, c, b"", tcp_close("denied"))
        self.assertEqual(len(b.conns), 0)

    def test_pop3_replies(self):
        b = HoldBackend(b"+OK ready\r\n", name="pop3")
        self.track(b)
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             mode="pop3", max_connections_per_client=1,
                                             deny="127.0.0.30")))
        first = self.client_from(port, "127.0.0.31")
        self.assertEqual(first.recv_until(b"\r\n"), b"+OK ready\r\n")
        second = self.client_from(port, "127.0.0.31")
        self.assertEqual(second.wait_closed(2), ("eof", POP3_LIMIT))
        close = p.close_of(self.sid(p, second))
        self.assertEqual((close["end"], close["error"], close["primary_error"]),
                         ("client_limit", "max_connections_per_client",
                          POP3_LIMIT.decode().rstrip("\r\n")))
        self.assertNotIn("backend", close)
        denied = self.client_from(port, "127.0.0.30")
        self.assertEqual(denied.wait_closed(2), ("eof", POP3_DENIED))
        close = p.close_of(self.sid(p, denied))
        self.assertEqual((close["end"], close["primary_error"]),
                         ("denied", POP3_DENIED.decode().rstrip("\r\n")))
        self.assertEqual(len(b.conns), 1)

    def test_imap_replies(self):
        b = HoldBackend(b"* OK ready\r\n", name="imap")
        self.track(b)
        port = free_port()
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), b.addr,
                                             mode="imap", max_connections_per_client=1,
                                             deny="127.0.0.50")))
        first = self.client_from(port, "127.0.0.51")
        self.assertEqual(first.recv_until(b"\r\n"), b"* OK ready\r\n")
        second = self.client_from(port, "127.0.0.51")
        self.assertEqual(second.wait_closed(2), ("eof", IMAP_LIMIT))
        close = p.close_of(self.sid(p, second))
        self.assertEqual((close["end"], close["error"], close["primary_error"]),
                         ("client_limit", "max_connections_per_client",
                          IMAP_LIMIT.decode()[2:].rstrip("\r\n")))
        self.assertNotIn("backend", close)
        denied = self.client_from(port, "127.0.0.50")
        self.assertEqual(denied.wait_closed(2), ("eof", IMAP_DENIED))
        close = p.close_of(self.sid(p, denied))
        self.assertEqual((close["end"], close["primary_error"]),
                         ("denied", IMAP_DENIED.decode()[2:].rstrip("\r\n")))
        self.assertEqual(len(b.conns), 1)

    def test_proxy_protocol_client_is_checked(self):
        b = self.smtp_backend("mx")
        p = self.start_smtp_proxy(b.addr, accept_proxy_protocol="on",
                                  deny="192.0.2.0/24", max_connections_per_client=1)

        def via_lb(src, sport):
            c = self.client(p.port)  # the load balancer: always 127.0.0.1
            c.send(b"PROXY TCP4 %s 127.0.0.1 %d 25\r\n" % (src.encode(), sport))
            return c

        d = via_lb("192.0.2.9", 40000)
        self.assertRefused(p, d, SMTP_DENIED, smtp_refusal("denied", SMTP_DENIED,
                                                           client="192.0.2.9:40000"))
        ok = via_lb("198.51.100.1", 40001)
        self.assertEqual(ok.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        # Same real client through another connection of the balancer: over its limit,
        # although the balancer's own address (127.0.0.1) has two sessions.
        over = via_lb("198.51.100.1", 40002)
        self.assertRefused(p, over, SMTP_LIMIT, smtp_refusal(
            "client_limit", SMTP_LIMIT, error="max_connections_per_client",
            client="198.51.100.1:40002"))
        # An IPv6 client is counted by its /64.
        v6a = self.client(p.port)
        v6a.send(b"PROXY TCP6 2001:db8:1:2::1 ::1 40003 25\r\n")
        self.assertEqual(v6a.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        v6b = self.client(p.port)
        v6b.send(b"PROXY TCP6 2001:db8:1:2:ffff::9 ::1 40004 25\r\n")
        self.assertRefused(p, v6b, SMTP_LIMIT, smtp_refusal(
            "client_limit", SMTP_LIMIT, error="max_connections_per_client",
            client="[2001:db8:1:2:ffff::9]:40004"))
        v6c = self.client(p.port)
        v6c.send(b"PROXY TCP6 2001:db8:1:3::1 ::1 40005 25\r\n")
        self.assertEqual(v6c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        self.assertEqual(len(b.conns), 3)

    def test_reload_applies_new_lists(self):
        b = self.smtp_backend("mx")
        port = free_port()
        listen = "%s:%d" % (HOST, port)
        p = self.start_proxy(config(listener("smtp", listen, b.addr, mode="smtp")))
        c = self.client_from(port, "127.0.0.40")
        self.assertEqual(c.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        m = p.reload(config(listener("smtp", listen, b.addr, mode="smtp",
                                     deny="127.0.0.40", max_connections_per_client=1)))
        p.wait_event(start=m, ev="reload")
        d = self.client_from(port, "127.0.0.40")
        self.assertRefused(p, d, SMTP_DENIED, smtp_refusal("denied", SMTP_DENIED))
        # The session opened before the reload runs on.
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        e1 = self.client_from(port, "127.0.0.41")
        self.assertEqual(e1.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        m = p.reload(config(listener("smtp", listen, b.addr, mode="smtp",
                                     max_connections_per_client=1)))
        p.wait_event(start=m, ev="reload")
        c2 = self.client_from(port, "127.0.0.40")
        self.assertEqual(c2.recv_until(b"\r\n"), b"220 mx ESMTP\r\n")
        # The counts made under the previous config hold across the reload.
        e2 = self.client_from(port, "127.0.0.41")
        self.assertRefused(p, e2, SMTP_LIMIT, smtp_refusal(
            "client_limit", SMTP_LIMIT, error="max_connections_per_client"))

    @staticmethod
    def refusals(admin, want, timeout=10.0):
        """mxproxy_sessions_total{end="client_limit"} once it reaches want (or at timeout)."""
        needle = b'mxproxy_sessions_total{listener="smtp",end="client_limit"} '
        deadline = time.monotonic() + timeout
        while True:
            body = urllib.request.urlopen("http://%s:%d/metrics" % (HOST, admin),
                                          timeout=5).read()
            line = body[body.index(needle):].split(b"\n", 1)[0]
            got = int(line[len(needle):])
            if got >= want or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def test_check_reports_bad_values(self):
        """mxproxy -t: FILE:LINE: message for a bad block or limit, exit 1."""
        good = config(listener("smtp", "127.0.0.1:2525", "127.0.0.1:25",
                               allow=["10.0.0.0/8, ::1", "192.0.2.0/24"], deny="10.9.0.0/16",
                               max_connections_per_client=10,
                               max_connection_rate_per_client=2))
        cases = [
            (good, 0, ""),
            (good + "deny = 10.0.0.1/8\n", 1,
             "invalid value '10.0.0.1/8' for 'deny': host bits set past the prefix length"),
            (good + "allow = 2001:db8::/129\n", 1,
             "invalid value '2001:db8::/129' for 'allow': prefix length too large"),
            (good + "allow = mx.example.com\n", 1,
             "invalid value 'mx.example.com' for 'allow': not an IPv4 or IPv6 address"),
            (good.replace("max_connection_rate_per_client = 2",
                          "max_connection_rate_per_client = 1000001"), 1,
             "invalid value '1000001' for 'max_connection_rate_per_client': expected an integer "
             "from 0 to 1000000"),
        ]
        for text, rc, msg in cases:
            path = os.path.join(self.tmpdir, "check.ini")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True,
                               timeout=10, stdin=subprocess.DEVNULL)
            self.assertEqual(r.returncode, rc, r.stderr)
            if rc:
                line = text.count("\n")
                if "1000001" in msg:
                    line = text.split("\n").index("max_connection_rate_per_client = 1000001") + 1
                self.assertEqual(r.stderr.decode(), "%s:%d: %s\n" % (path, line, msg))

    def test_many_addresses_bounded_memory(self):
        """18,000 addresses, more than the 16,384 entries of the table: each opens
        a session, every 8th a second one, refused (max 1 open, 1 per second); a
        session held open from the start keeps its address limited throughout,
        and RSS stays within 3 MiB of where it was after the first batch."""
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind((HOST, 0))
        lsock.listen(1024)
        stop = threading.Event()
        held = []

        def backend():  # keeps the first connection, closes every other at once
            lsock.settimeout(0.05)
            while not stop.is_set():
                try:
                    s, _ = lsock.accept()
                except OSError:
                    continue
                if held:
                    s.close()
                else:
                    held.append(s)

        t = threading.Thread(target=backend, daemon=True)
        t.start()

        def cleanup():
            stop.set()
            t.join(2)
            for s in held:
                s.close()
            lsock.close()
        self.addCleanup(cleanup)

        port, admin = free_port(), free_port()
        p = self.start_proxy(config(listener(
            "smtp", "%s:%d" % (HOST, port), "%s:%d" % lsock.getsockname(),
            max_connections_per_client=1, max_connection_rate_per_client=1),
            # The sessions page's ring of closed sessions (recent_sessions, 1000 by default,
            # ~4 KiB each) would fill during the flood and hide the table's own growth.
            admin="%s:%d" % (HOST, admin), recent_sessions=0), env=ASAN_ENV)
        busy = self.client_from(port, "127.200.0.1")
        busy_sid = self.sid(p, busy)
        p.wait_event(ev="connect", sid=busy_sid)

        n, batch, every = 18000, 500, 8
        rss0 = None
        linger = struct.pack("ii", 1, 0)
        for start in range(0, n, batch):
            socks, probes = [], []
            for i in range(start, start + batch):
                src = "127.%d.%d.%d" % (100 + (i >> 16), (i >> 8) & 255, i & 255)
                # Every address opens a session; every 8th then a second one, which must
                # be refused: the table still counts new addresses while it evicts.
                for k in range(2 if i % every == 0 else 1):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    s.settimeout(5)
                    s.bind((src, 0))
                    s.connect((HOST, port))
                    (probes if k else socks).append(s)
            for s in probes:
                self.assertEqual(s.recv(16), b"")  # refused: a bare close
            for s in socks + probes:
                s.close()  # a reset: no TIME_WAIT left behind
            if rss0 is None:
                rss0 = mxtest.rss_kb(p.proc.pid)
        # Counted by /metrics: under this load the log writer may drop lines (by design).
        self.assertEqual(self.refusals(admin, n // every), n // every)
        rss1 = mxtest.rss_kb(p.proc.pid)
        self.assertLess(rss1 - rss0, 3 * 1024, "RSS grew from %d to %d KiB" % (rss0, rss1))
        # The busy address was never forgotten.
        again = self.client_from(port, "127.200.0.1")
        self.assertRefused(p, again, b"", tcp_close("client_limit",
                                                    error="max_connections_per_client"))
        busy.assert_open()


# Under ASan a freed block sits in quarantine: RSS would count churn, not what is held.
ASAN_ENV = {"ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "detect_leaks=1")
            + ":quarantine_size_mb=0"}

if __name__ == "__main__":
    mxtest.main()
