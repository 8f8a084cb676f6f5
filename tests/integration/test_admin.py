"""The admin endpoint: /healthz, /readyz through a drain, /metrics as Prometheus text,
errors for other requests, and the SMTP listeners untouched by any of it."""

import re
import select
import signal
import socket
import time

import mxtest
from mxtest import HOST, config, listener, free_port

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def http(port, request, timeout=5.0):
    """Sends raw request bytes, reads to EOF; returns (code, headers dict, body bytes)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.1 (\d{3}) [A-Za-z ]+", lines[0])
    if not m:
        raise AssertionError("bad status line %r" % lines[0])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if int(headers["content-length"]) != len(body) and not request.startswith(b"HEAD"):
        raise AssertionError("Content-Length %s but %d body bytes"
                             % (headers["content-length"], len(body)))
    return int(m.group(1)), headers, body


def recv_all(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def get(port, path, method="GET"):
    return http(port, ("%s %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: mxtest\r\n\r\n"
                       % (method, path, HOST, port)).encode())


def parse_prometheus(text):
    """Parses text format 0.0.4: returns {name: type} and [(name, labels dict, value)].
    Every sample must belong to a metric with a # TYPE line before it."""
    types, samples, helps = {}, [], set()
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            if typ not in ("counter", "gauge", "histogram", "summary", "untyped"):
                raise AssertionError("bad type in %r" % line)
            if name in types:
                raise AssertionError("second TYPE for %s" % name)
            types[name] = typ
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        name, labels_text, value = m.group(1), m.group(3), m.group(4)
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = LABEL_RE.match(labels_text, pos)
                if not lm:
                    raise AssertionError("bad labels in %r" % line)
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        float(value)
        base = name
        if name not in types:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and types.get(name[:-len(suffix)]) == "histogram":
                    base = name[:-len(suffix)]
        if base not in types:
            raise AssertionError("sample %s has no # TYPE before it" % name)
        if not name.startswith("mxproxy_"):
            raise AssertionError("metric %s lacks the mxproxy_ prefix" % name)
        samples.append((name, labels, float(value)))
    if not text.endswith("\n"):
        raise AssertionError("text does not end with a newline")
    missing = set(types) - helps
    if missing:
        raise AssertionError("no # HELP for %s" % sorted(missing))
    return types, samples


def value(samples, name, **labels):
    got = [v for n, l, v in samples if n == name and l == labels]
    if len(got) != 1:
        raise AssertionError("%d samples %s%r" % (len(got), name, labels))
    return got[0]


class AdminTest(mxtest.ProxyTestCase):

    def start(self, **glob):
        self.backend = self.smtp_backend("mx")
        port, admin = free_port(), free_port()
        glob.setdefault("admin", "%s:%d" % (HOST, admin))
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), self.backend.addr,
                                             mode="smtp"), **glob))
        p.port, p.admin = port, admin
        return p

    def smtp_ok(self, p):
        """One whole SMTP session through the proxy."""
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 mx ESMTP\r\n")
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c.close()

    def test_endpoints(self):
        p = self.start()
        ev = p.find(ev="admin_listen")
        self.assertEqual(len(ev), 1)
        self.assertEqual(ev[0]["addr"], "%s:%d" % (HOST, p.admin))

        code, headers, body = get(p.admin, "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(get(p.admin, "/readyz")[::2], (200, b"ready\n"))
        self.assertEqual(get(p.admin, "/readyz?verbose=1")[::2], (200, b"ready\n"))

        code, headers, body = get(p.admin, "/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        types, samples = parse_prometheus(body.decode())
        self.assertEqual(types["mxproxy_sessions_total"], "counter")
        self.assertEqual(types["mxproxy_sessions_active"], "gauge")
        self.assertEqual(types["mxproxy_replies_total"], "counter")
        self.assertEqual(types["mxproxy_bytes_total"], "counter")
        self.assertEqual(types["mxproxy_tls_handshakes_total"], "counter")
        for h in ("connect", "greeting", "reply"):
            name = "mxproxy_%s_seconds" % h
            self.assertEqual(types[name], "histogram")
            buckets = [(l["le"], v) for n, l, v in samples if n == name + "_bucket"]
            self.assertEqual(buckets[-1][0], "+Inf")
            self.assertEqual([v for _, v in buckets], sorted(v for _, v in buckets))
            self.assertEqual(value(samples, name + "_count"), buckets[-1][1])
        # The listener's series exist from the start, at 0.
        self.assertEqual(value(samples, "mxproxy_sessions_active", listener="smtp"), 0)
        self.assertEqual(value(samples, "mxproxy_sessions_total", listener="smtp", end="quit"), 0)

        code, headers, body = get(p.admin, "/metrics", method="HEAD")
        self.assertEqual((code, body), (200, b""))
        self.assertGreater(int(headers["content-length"]), 1000)

        self.smtp_ok(p)
        self.assertEqual(get(p.admin, "/nope")[::2], (404, b"not found\n"))
        self.assertEqual(get(p.admin, "/")[0], 200)  # the sessions page (test_sessions_page.py)
        self.assertEqual(get(p.admin, "/sessionsx")[0], 404)
        code, headers, _ = http(p.admin, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 3\r\n\r\nabc")
        self.assertEqual(code, 405)
        self.assertEqual(headers["allow"], "GET, HEAD")
        self.assertEqual(get(p.admin, "/healthz", method="DELETE")[0], 405)
        self.smtp_ok(p)

    def test_bad_requests(self):
        p = self.start()
        # A head over 8 KiB, whether or not it ever ends.
        code, _, body = http(p.admin, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 +
                             b"\r\n\r\n")
        self.assertEqual((code, body), (400, b"request head too large\n"))
        for bad in (b"GARBAGE\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics HTTP/2.0\r\n\r\n", b"get /metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nX: a\x01b\r\n\r\n"):
            code, _, _ = http(p.admin, bad)
            self.assertEqual(code, 400, bad)
        # Split over many writes, it still parses.
        s = socket.create_connection((HOST, p.admin), timeout=5)
        for ch in b"GET /healthz HTTP/1.0\r\n\r\n":
            s.sendall(bytes([ch]))
            time.sleep(0.001)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertTrue(data.endswith(b"\r\n\r\nok\n"), data)
        self.smtp_ok(p)

    def test_timeout_and_connection_limit(self):
        p = self.start()
        # A peer holds at most 8 connections (admin_max_connections_per_peer):
        # its 9th closes its oldest idle one, and the SMTP listener does not
        # notice.
        idle = [socket.create_connection((HOST, p.admin), timeout=5) for _ in range(8)]
        time.sleep(0.2)
        m = p.mark()
        ninth = socket.create_connection((HOST, p.admin), timeout=5)
        self.assertEqual(idle[0].recv(100), b"")
        idle[0].close()
        ninth.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        self.assertTrue(recv_all(ninth).startswith(b"HTTP/1.1 200 OK\r\n"))
        ninth.close()
        ev = p.wait_event(start=m, ev="admin_drop")
        self.assertEvent(ev, "admin_drop", {"reason": "peer_limit", "count": 1, "peer": HOST,
                                            "admin": "%s:%d" % (HOST, p.admin)}, lvl="warn")
        self.smtp_ok(p)
        # An incomplete request gets 408 after 3 s (admin_header_timeout),
        # counted from the accept.
        idle[1].sendall(b"GET /healthz HTTP/1.1\r\n")
        data = idle[1].recv(4096)
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                if get(p.admin, "/healthz")[0] == 200:
                    break
            except (ConnectionError, AssertionError, IndexError):
                pass
            self.assertLess(time.monotonic(), deadline, "admin did not recover")
            time.sleep(0.05)

    def assertHealthzFast(self, p):
        """/healthz from 127.0.0.1 answers 200, five times in a row, and the
        median answer takes under 100 ms. Every answer must be a 200: only the
        timing is judged on the median, so one descheduling of this test on a
        loaded machine does not decide it."""
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            code, _, body = get(p.admin, "/healthz")
            times.append(time.monotonic() - t0)
            self.assertEqual((code, body), (200, b"ok\n"))
        times.sort()
        self.assertLess(times[2], 0.100, "healthz times %r" % times)
        return times

    def drops(self, p, reason, total, timeout=5.0):
        """Waits until the ev=admin_drop lines for reason add up to total
        closes; returns the lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = p.find(ev="admin_drop", reason=reason)
            got = sum(int(e["count"]) for e in lines)
            if got >= total or time.monotonic() > deadline:
                self.assertEqual(got, total, "\n".join(e["_raw"] for e in lines))
                return lines
            time.sleep(0.1)

    def test_idle_flood_from_one_peer(self):
        """1,000 idle connections from 127.0.0.2 cost another address nothing:
        its /healthz answers 200 within 100 ms, and the flood is logged in at
        most one line per second."""
        mxtest.raise_nofile(4096)
        p = self.start()
        flood = []
        t0 = time.monotonic()
        try:
            for _ in range(1000):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                flood.append(s)
                s.bind(("127.0.0.2", 0))
                s.settimeout(5)
                s.connect((HOST, p.admin))
            flood_s = time.monotonic() - t0
            times = self.assertHealthzFast(p)
            print("flood of 1000 took %.2fs; healthz %s ms"
                  % (flood_s, ", ".join("%.1f" % (t * 1000) for t in times)))
            # The peer keeps its 8 newest; the other 992 were closed.
            lines = self.drops(p, "peer_limit", 992)
            elapsed = time.monotonic() - t0
            self.assertLessEqual(len(lines), int(elapsed) + 2, "one line per second at most")
            for e in lines:
                self.assertEqual(e["peer"], "127.0.0.2")
            closed = 0
            for s in flood:
                s.settimeout(0.5)
                try:
                    closed += s.recv(1) == b""
                except socket.timeout:
                    pass
            self.assertEqual(closed, 992)
        finally:
            for s in flood:
                s.close()
        self.smtp_ok(p)

    def test_idle_flood_from_many_peers(self):
        """200 idle connections from 200 addresses fill the table (64): each
        new one closes the oldest idle one, so /healthz still gets a slot."""
        mxtest.raise_nofile(4096)
        p = self.start()
        flood = []
        try:
            for i in range(200):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                flood.append(s)
                s.bind(("127.0.%d.%d" % (1 + i // 250, 2 + i % 250), 0))
                s.settimeout(5)
                s.connect((HOST, p.admin))
            self.assertHealthzFast(p)
            # 136 closes for the flood; each /healthz may close one more idle
            # connection, when the one before it still holds its slot.
            time.sleep(1.2)  # the last paced line
            got = sum(int(e["count"]) for e in p.find(ev="admin_drop", reason="conn_limit"))
            self.assertTrue(200 - 64 <= got <= 200 - 64 + 5, got)
            self.assertEqual(p.find(ev="admin_drop", reason="peer_limit"), [])
        finally:
            for s in flood:
                s.close()

    def test_slowloris(self):
        """A peer sending one header byte per second is cut by
        admin_header_timeout: 408, then the connection closes."""
        p = self.start(admin_header_timeout="2s")
        s = socket.create_connection((HOST, p.admin), timeout=5)
        t0 = time.monotonic()
        data = b""
        try:
            for ch in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":
                s.sendall(bytes([ch]))
                r, _, _ = select.select([s], [], [], 1.0)
                if r:
                    data = recv_all(s)
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        took = time.monotonic() - t0
        s.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data)
        self.assertTrue(data.endswith(b"\r\n\r\nrequest timeout\n"), data)
        self.assertWithin(took, 1.8, 3.5, "header timeout")
        ev = p.wait_event(ev="admin_drop")
        self.assertEvent(ev, "admin_drop", {"reason": "header_timeout", "count": 1, "peer": HOST,
                                            "admin": "%s:%d" % (HOST, p.admin)}, lvl="warn")

    def test_limit_keys(self):
        """admin_max_connections and admin_max_connections_per_peer, and a
        reload that changes them."""
        p = self.start(admin_max_connections=2, admin_max_connections_per_peer=2)
        a = [socket.create_connection((HOST, p.admin), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        b = socket.create_connection((HOST, p.admin), timeout=5)  # the peer's third
        self.assertEqual(a[0].recv(10), b"")
        time.sleep(0.1)
        c = socket.socket()
        c.bind(("127.0.0.2", 0))
        c.settimeout(5)
        c.connect((HOST, p.admin))  # the table's third: closes a[1], the oldest
        self.assertEqual(a[1].recv(10), b"")
        for s in (b, c):
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            self.assertTrue(recv_all(s).startswith(b"HTTP/1.1 200 OK\r\n"))
        for s in a + [b, c]:
            s.close()
        self.drops(p, "peer_limit", 1)
        self.drops(p, "conn_limit", 1)
        listen = "%s:%d" % (HOST, p.port)
        m = p.reload(config(listener("smtp", listen, self.backend.addr, mode="smtp"),
                            admin="%s:%d" % (HOST, p.admin), admin_max_connections_per_peer=1))
        p.wait_event(start=m, ev="reload")
        a = socket.create_connection((HOST, p.admin), timeout=5)
        time.sleep(0.1)
        b = socket.create_connection((HOST, p.admin), timeout=5)
        self.assertEqual(a.recv(10), b"")
        a.close()
        b.close()

    def test_readyz_during_drain(self):
        p = self.start(drain_timeout="3s")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 mx ESMTP\r\n")
        self.assertEqual(get(p.admin, "/readyz")[::2], (200, b"ready\n"))

        p.signal(signal.SIGTERM)
        p.wait_event(ev="drain")
        code, _, body = get(p.admin, "/readyz")
        self.assertEqual((code, body), (503, b"draining\n"))
        self.assertEqual(get(p.admin, "/healthz")[::2], (200, b"ok\n"))
        self.assertEqual(get(p.admin, "/metrics")[0], 200)
        # The open session is still served while draining.
        self.assertEqual(c.cmd(b"NOOP"), b"250 2.0.0 mx ok\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 mx bye\r\n")
        c.close()
        self.assertEqual(p.wait_exit(10), 0)
        self.assertTrue(mxtest.connect_refused(p.admin), "admin still open after exit")

    def test_reload_moves_admin(self):
        p = self.start()
        other = free_port()
        listen = "%s:%d" % (HOST, p.port)
        m = p.reload(config(listener("smtp", listen, self.backend.addr, mode="smtp"),
                            admin="%s:%d" % (HOST, other)))
        p.wait_event(start=m, ev="reload")
        p.wait_event(start=m, ev="admin_listen", addr="%s:%d" % (HOST, other))
        self.assertEqual(get(other, "/healthz")[0], 200)
        self.assertTrue(mxtest.connect_refused(p.admin))
        # Removing the key closes it; the proxy keeps serving.
        m = p.reload(config(listener("smtp", listen, self.backend.addr, mode="smtp")))
        p.wait_event(start=m, ev="admin_unlisten", addr="%s:%d" % (HOST, other))
        self.assertTrue(mxtest.connect_refused(other))
        self.smtp_ok(p)

    def test_admin_address_in_use(self):
        busy = socket.socket()
        busy.bind((HOST, 0))
        busy.listen(1)
        try:
            port = free_port()
            text = config(listener("smtp", "%s:%d" % (HOST, port), "%s:25" % HOST),
                          admin="%s:%d" % (HOST, busy.getsockname()[1]))
            p = mxtest.Proxy(text, self.tmpdir)
            self.assertEqual(p.wait_exit(10), 1)
            ev = p.find(ev="admin_error")
            self.assertEqual(len(ev), 1, p.tail())
            self.assertEqual(ev[0]["error"], "address already in use")
        finally:
            busy.close()

    def test_session_counters(self):
        """Needs the metrics hooks in the session code (session.c, session_smtp.c)."""
        p = self.start()
        self.smtp_ok(p)
        p.wait_event(ev="close")
        _, samples = parse_prometheus(get(p.admin, "/metrics")[2].decode())
        self.assertEqual(value(samples, "mxproxy_sessions_total", listener="smtp", end="quit"), 1)
        self.assertEqual(value(samples, "mxproxy_sessions_active", listener="smtp"), 0)
        self.assertEqual(value(samples, "mxproxy_replies_total", **{"verb": "NOOP", "class": "2xx"}),
                         1)
        self.assertEqual(value(samples, "mxproxy_connect_seconds_count"), 1)
        self.assertEqual(value(samples, "mxproxy_greeting_seconds_count"), 1)
        self.assertGreater(value(samples, "mxproxy_bytes_total", direction="down"), 0)


if __name__ == "__main__":
    mxtest.main()
