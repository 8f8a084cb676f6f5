"""DNS discovery: a backend given by name stands for every address it has. A small DNS server
in this file (UDP on 127.0.0.1, answers from a dict the test edits) is the proxy's resolver;
smtp-sink listens on 127.0.0.2, 127.0.0.3 and [::1] on one port, so the backend= of each
ev=close says which address a session went to. Checks that both addresses of a name get
sessions, that a changed answer logs the exact ev=backends line and moves new sessions while a
session on the removed address runs to its end, that SERVFAIL, a timeout, an empty answer and
NXDOMAIN keep the last good set with one ev=resolve_error each time the name starts failing,
that resolve_interval = 0 asks only at start, that SIGHUP refuses a name that does not resolve
and follows a new one, that -t names the line of a name that does not resolve, that with
resolver set /etc/hosts is not read, and the order of the expanded list (IPv4 first, sorted,
no duplicates, in the entry's place) on /metrics."""
import os
import select
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
from mxtest import HOST, free_port, smtp_close  # noqa: E402

NAME = "mx.dns.test"
TTL = 1
QTYPE_A, QTYPE_AAAA = 1, 28
NOERROR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 2, 3, 4
# c-ares's words (ares_strerror) for the failures the server can play.
ERR_NXDOMAIN = "Domain name not found"
# SERVFAIL: c-ares 1.18 tries the next server and, with none left, says it could not contact
# any; later versions name the SERVFAIL.
ERR_SERVFAIL = mxtest.Like("Could not contact DNS servers|Server failed to process the query")
ERR_TIMEOUT = "Timeout while contacting DNS servers"
ERR_NODATA = "DNS server returned answer with no data"


def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


class DnsServer:
    """A DNS server on 127.0.0.1 (UDP, a free port) in a thread.

    It answers one-question queries from .records, {name: [ip, ...]}: IPv4 entries as A
    records, IPv6 entries as AAAA, TTL 1, the question echoed and each answer's owner a
    pointer to it (0xc00c). A name in .records with no address of the asked type gets NOERROR
    and no answer; a name not in it (such as the name with a search domain appended) gets
    NXDOMAIN. fail(name, "servfail") answers SERVFAIL for it, fail(name, "drop") nothing at
    all, so the asker times out; set(name, ips) ends either. Names match without case.

    Every query is kept in .log as (monotonic time, name, qtype, what it got: "answer",
    "nodata", "nxdomain", "servfail" or "drop")."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.addr = "%s:%d" % (HOST, self.port)
        self.records = {}
        self.failing = {}
        self.log = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="dns", daemon=True)
        self.thread.start()

    def set(self, name, ips):
        """name answers ips from now on (an empty list: the name exists, without addresses)."""
        with self.lock:
            self.records[name.lower()] = list(ips)
            self.failing.pop(name.lower(), None)

    def remove(self, name):
        """name is unknown from now on: NXDOMAIN."""
        with self.lock:
            self.records.pop(name.lower(), None)
            self.failing.pop(name.lower(), None)

    def fail(self, name, how):
        """how: "servfail" or "drop"."""
        assert how in ("servfail", "drop")
        with self.lock:
            self.failing[name.lower()] = how

    def queries(self, name, qtype=QTYPE_A, what=None):
        """The queries for name of qtype (and answered with what, when given), oldest first."""
        with self.lock:
            return [q for q in self.log if q[1] == name.lower() and q[2] == qtype
                    and (what is None or q[3] == what)]

    def wait_queries(self, n, name, qtype=QTYPE_A, what=None, timeout=5.0):
        """Polls until at least n such queries came; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.queries(name, qtype, what)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError("%d of %d queries for %s type %d (%s) within %.1fs"
                                     % (len(got), n, name, qtype, what, timeout))
            time.sleep(0.01)

    def _serve(self):
        while not self.stopping.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.05)
                if not r:
                    continue
                pkt, peer = self.sock.recvfrom(4096)
            except (OSError, ValueError):
                return
            out = self.answer(pkt)
            if out is not None:
                try:
                    self.sock.sendto(out, peer)
                except OSError:
                    pass

    @staticmethod
    def parse(pkt):
        """(id, flags, name, qtype, qclass, question bytes) of a query, or None."""
        if len(pkt) < 12:
            return None
        qid, flags, qdcount = struct.unpack("!3H", pkt[:6])
        if flags & 0x8000 or qdcount != 1:
            return None
        labels, i = [], 12
        while True:
            if i >= len(pkt):
                return None
            n = pkt[i]
            i += 1
            if n == 0:
                break
            if n & 0xc0 or i + n > len(pkt):
                return None  # a question's name is never compressed
            labels.append(pkt[i:i + n])
            i += n
        if i + 4 > len(pkt):
            return None
        qtype, qclass = struct.unpack("!2H", pkt[i:i + 4])
        name = b".".join(labels).decode("ascii", "replace").lower()
        return qid, flags, name, qtype, qclass, pkt[12:i + 4]

    def answer(self, pkt):
        q = self.parse(pkt)
        if q is None:
            return None
        qid, flags, name, qtype, qclass, question = q
        rdatas = []
        with self.lock:
            how = self.failing.get(name)
            if (flags >> 11) & 0xf:
                rcode, what = NOTIMP, "notimp"
            elif how is not None:
                rcode, what = SERVFAIL, how
            elif name not in self.records:
                rcode, what = NXDOMAIN, "nxdomain"
            else:
                rcode, what = NOERROR, "nodata"
                family = {QTYPE_A: socket.AF_INET, QTYPE_AAAA: socket.AF_INET6}.get(qtype)
                for ip in self.records[name]:
                    if family is not None and qclass == 1 and (":" in ip) == (qtype == QTYPE_AAAA):
                        rdatas.append(socket.inet_pton(family, ip))
                if rdatas:
                    what = "answer"
            self.log.append((time.monotonic(), name, qtype, what))
        if what == "drop":
            return None
        # QR, the opcode, AA, RD as asked, RA, the rcode.
        out_flags = 0x8000 | (flags & 0x7800) | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
        out = struct.pack("!6H", qid, out_flags, 1, len(rdatas), 0, 0) + question
        for rdata in rdatas:
            out += struct.pack("!HHHIH", 0xc00c, qtype, 1, TTL, len(rdata)) + rdata
        return out

    def close(self):
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


def port_free_on(hosts):
    """A TCP port that is free on each of hosts right now."""
    for _ in range(50):
        port = free_port()
        socks = []
        try:
            for h in hosts:
                s = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no port free on all of %s" % (hosts,))


def hosts_file_name():
    """A name /etc/hosts maps to an address (other than localhost, which c-ares answers
    itself), or None."""
    try:
        with open("/etc/hosts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and not words[0].startswith(("ff", "fe")):
            for name in words[1:]:
                if not name.startswith("localhost"):
                    return name
    return None


class DnsTest(mxtest.ProxyTestCase):

    def setUp(self):
        super().setUp()
        self.dns = self.track(DnsServer())

    def sinks(self, *hosts):
        """smtp-sink on each of hosts, all on one port; returns that port."""
        self.port = port_free_on(hosts)
        for h in hosts:
            self.track(mxtest.SmtpSink(port=self.port, host=h))
        return self.port

    def start(self, backends, interval="10s", admin=False, **opts):
        """mxproxy asking self.dns, with one mode smtp listener (round_robin unless opts say
        otherwise) in front of backends."""
        glob = {"resolver": self.dns.addr, "resolve_interval": interval}
        if admin:
            glob["admin"] = "%s:%d" % (HOST, free_port())
        opts.setdefault("balance", "round_robin")
        p = self.start_smtp_proxy(backends, glob=glob, **opts)
        p.admin = glob.get("admin")
        return p

    def session(self, p, sender="a@example.test"):
        """One whole transaction through p (EHLO, a message, QUIT answered 221); returns its
        backend= after checking every field of its ev=close line."""
        s = smtplib.SMTP(HOST, p.port, local_hostname="client.example", timeout=5)
        try:
            local = s.sock.getsockname()[1]
            self.assertEqual(s.sendmail(sender, ["b@example.test"],
                                        b"Subject: dns\r\n\r\nhello\r\n"), {})
            self.assertEqual(s.quit()[0], 221)
        finally:
            s.close()
        close = p.close_of(p.sid_of(local))
        self.assertEvent(close, "close", smtp_close(
            "quit", helo="client.example", mail_from=sender, rcpt_ok=1, messages=1,
            backend=mxtest.Like(r"(127\.0\.0\.[23]|\[::1\]):%d" % self.port)))
        return close["backend"]

    def backends_line(self, p, start, added, removed, addresses, timeout=5.0):
        """Waits for the ev=backends of NAME from start on and checks every field."""
        ev = p.wait_event(timeout, start=start, ev="backends", name=NAME)
        self.assertEvent(ev, "backends", {"name": NAME, "added": added, "removed": removed,
                                          "addresses": addresses})
        return ev

    def rounds(self, n, name=NAME, timeout=5.0):
        """Waits until n more lookups of name (its A query) came from now on: with at most two
        tries a round, at least one round began and ended in between once n >= 3, and once
        n >= 2 when every query is answered."""
        have = len(self.dns.queries(name))
        self.dns.wait_queries(have + n, name, timeout=timeout)

    # ----------------------------------------------------------------------

    def test_start_uses_every_address(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.3", "127.0.0.2"])
        p = self.start("%s:%d" % (NAME, port))
        got = [self.session(p) for _ in range(6)]
        # round_robin over the two addresses, one worker: each gets every second session.
        self.assertEqual(sorted(got), ["127.0.0.2:%d" % port] * 3 + ["127.0.0.3:%d" % port] * 3)
        self.assertEqual(got[0::2], [got[0]] * 3)
        self.assertNotEqual(got[0], got[1])
        # The name was asked of the resolver (A and AAAA): the answer came from there.
        self.assertGreaterEqual(len(self.dns.queries(NAME, QTYPE_A, "answer")), 1)
        self.assertGreaterEqual(len(self.dns.queries(NAME, QTYPE_AAAA, "nodata")), 1)
        self.assertEqual(p.find(ev="backends") + p.find(ev="resolve_error"), [])

    def test_changed_answer_moves_new_sessions(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        p = self.start("%s:%d" % (NAME, port), interval="200ms")
        old, new = "127.0.0.2:%d" % port, "127.0.0.3:%d" % port
        # Asked again every 200ms: a few rounds within a second or so.
        t0 = time.monotonic()
        self.rounds(4)
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertEqual(self.session(p), old)

        # A session on the address about to go: held after EHLO.
        held = smtplib.SMTP(HOST, p.port, local_hostname="held.example", timeout=5)
        held_sid = p.sid_of(held.sock.getsockname()[1])
        self.assertEqual(held.ehlo()[0], 250)
        self.assertEqual(p.wait_event(ev="connect", sid=held_sid)["backend"], old)

        m = p.mark()
        self.dns.set(NAME, ["127.0.0.3"])
        self.backends_line(p, m, added="127.0.0.3", removed="127.0.0.2", addresses=1)
        for _ in range(4):
            self.assertEqual(self.session(p), new)
        # The held session still runs on the removed address, to its end.
        self.assertEqual(held.sendmail("h@example.test", ["b@example.test"],
                                       b"Subject: held\r\n\r\nstill here\r\n"), {})
        self.assertEqual(held.quit()[0], 221)
        held.close()
        self.assertEvent(p.close_of(held_sid), "close", smtp_close(
            "quit", helo="held.example", mail_from="h@example.test", rcpt_ok=1, messages=1,
            backend=old))
        # One line for one change, however many rounds saw the new answer since.
        self.rounds(3)
        self.assertEqual(len(p.find(ev="backends")), 1)
        self.assertEqual(p.find(ev="resolve_error"), [])

    def test_servfail_keeps_last_set(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        p = self.start("%s:%d" % (NAME, port), interval="200ms")
        old, new = "127.0.0.2:%d" % port, "127.0.0.3:%d" % port
        self.rounds(2)

        self.dns.fail(NAME, "servfail")
        err = p.wait_event(ev="resolve_error", name=NAME)
        self.assertEvent(err, "resolve_error", {"name": NAME, "error": ERR_SERVFAIL, "kept": 1},
                         lvl="warn")
        # More failed rounds: still one line, and sessions go to the last good address.
        self.dns.wait_queries(len(self.dns.queries(NAME, what="servfail")) + 6, NAME,
                              what="servfail")
        for _ in range(3):
            self.assertEqual(self.session(p), old)
        self.assertEqual(len(p.find(ev="resolve_error")), 1)
        self.assertEqual(p.find(ev="backends"), [])

        m = p.mark()
        self.dns.set(NAME, ["127.0.0.3"])
        self.backends_line(p, m, added="127.0.0.3", removed="127.0.0.2", addresses=1)
        for _ in range(3):
            self.assertEqual(self.session(p), new)
        self.assertEqual(len(p.find(ev="resolve_error")), 1)

    def test_timeout_empty_and_nxdomain_keep_last_set(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        p = self.start("%s:%d" % (NAME, port), interval="200ms")
        old, new = "127.0.0.2:%d" % port, "127.0.0.3:%d" % port
        self.rounds(2)

        # No answer at all: c-ares gives up after its two tries (2 s each, or more).
        self.dns.fail(NAME, "drop")
        err = p.wait_event(15, ev="resolve_error", name=NAME)
        self.assertEvent(err, "resolve_error", {"name": NAME, "error": ERR_TIMEOUT, "kept": 1},
                         lvl="warn")
        self.assertEqual(self.session(p), old)

        # It answers again, the same address: no ev=backends; the failure is over.
        self.dns.set(NAME, ["127.0.0.2"])
        self.rounds(3, timeout=15)
        self.assertEqual(p.find(ev="backends"), [])
        self.assertEqual(len(p.find(ev="resolve_error")), 1)

        # The name without any address: a failure again, logged again.
        m = p.mark()
        self.dns.set(NAME, [])
        err = p.wait_event(start=m, ev="resolve_error", name=NAME)
        self.assertEvent(err, "resolve_error", {"name": NAME, "error": ERR_NODATA, "kept": 1},
                         lvl="warn")
        self.assertEqual(self.session(p), old)

        # Back with two addresses: one added, none removed.
        m = p.mark()
        self.dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
        self.backends_line(p, m, added="127.0.0.3", removed="", addresses=2)
        got = [self.session(p) for _ in range(4)]
        self.assertEqual(sorted(got), [old, old, new, new])

        # NXDOMAIN: a third failure, the two addresses kept.
        m = p.mark()
        self.dns.remove(NAME)
        err = p.wait_event(start=m, ev="resolve_error", name=NAME)
        self.assertEvent(err, "resolve_error", {"name": NAME, "error": ERR_NXDOMAIN, "kept": 2},
                         lvl="warn")
        got = [self.session(p) for _ in range(4)]
        self.assertEqual(sorted(got), [old, old, new, new])
        self.assertEqual(len(p.find(ev="resolve_error")), 3)
        self.assertEqual(len(p.find(ev="backends")), 1)

    def test_rebuild_refused_is_logged_once_and_kept(self):
        """A changed answer the config cannot take (more than 64 backends once expanded) keeps
        the running backends, logs one ev=resolve_error with the config error, and is not
        tried again until an answer differs."""
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        others = ["192.0.2.%d:25" % i for i in range(1, 64)]  # with the name's one: 64
        p = self.start("%s:%d" % (NAME, port), interval="200ms", balance="first",
                       backend=others)
        self.rounds(2)
        self.dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
        err = p.wait_event(ev="resolve_error", name=NAME)
        with open(p.path) as f:
            line = f.read().splitlines().index("backend = %s:%d" % (NAME, port)) + 1
        self.assertEvent(err, "resolve_error", {
            "name": NAME,
            "error": "%s:%d: '%s' resolves to 2 addresses: 65 backends in [listener smtp], "
                     "more than 64" % (p.path, line, NAME)}, lvl="warn")
        # The same answer in later rounds: neither rebuilt nor logged again.
        self.rounds(4)
        self.assertEqual(len(p.find(ev="resolve_error")), 1)
        self.assertEqual(p.find(ev="backends"), [])
        self.assertEqual(self.session(p), "127.0.0.2:%d" % port)
        # An answer the config can take is taken.
        m = p.mark()
        self.dns.set(NAME, ["127.0.0.3"])
        self.backends_line(p, m, added="127.0.0.3", removed="127.0.0.2", addresses=1)
        self.assertEqual(self.session(p), "127.0.0.3:%d" % port)
        self.assertEqual(len(p.find(ev="resolve_error")), 1)

    def test_interval_zero_asks_once(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        p = self.start("%s:%d" % (NAME, port), interval="0")
        asked = len(self.dns.queries(NAME))
        self.assertGreaterEqual(asked, 1)
        self.dns.set(NAME, ["127.0.0.3"])
        time.sleep(1.0)  # five rounds' worth at 200ms: none may come
        self.assertEqual(len(self.dns.queries(NAME)), asked)
        self.assertEqual(self.session(p), "127.0.0.2:%d" % port)
        self.assertEqual(p.find(ev="backends"), [])

    def test_sighup_resolves_and_follows_new_names(self):
        port = self.sinks("127.0.0.2", "127.0.0.3")
        self.dns.set(NAME, ["127.0.0.2"])
        self.dns.set("mx2.dns.test", ["127.0.0.3"])
        p = self.start("%s:%d" % (NAME, port), interval="200ms")
        good = open(p.path).read()
        old, new = "127.0.0.2:%d" % port, "127.0.0.3:%d" % port

        # A name that does not resolve: the reload is refused with its line, as -t says.
        bad = good.replace(NAME, "nx.dns.test")
        line = bad.splitlines().index("backend = nx.dns.test:%d" % port) + 1
        m = p.reload(bad)
        err = p.wait_event(start=m, ev="reload_error")
        self.assertEvent(err, "reload_error", {"error": "%s:%d: cannot resolve 'nx.dns.test': %s"
                                               % (p.path, line, ERR_NXDOMAIN)}, lvl="error")
        self.assertEqual(self.session(p), old)
        # The running config still asks its own name.
        self.rounds(2)

        m = p.reload(good.replace(NAME, "mx2.dns.test"))
        p.wait_event(start=m, ev="reload")
        self.assertEqual(self.session(p), new)
        # Discovery follows the new name, and no longer asks the old one.
        self.rounds(2, "mx2.dns.test")
        asked = len(self.dns.queries(NAME))
        m = p.mark()
        self.dns.set("mx2.dns.test", ["127.0.0.2"])
        ev = p.wait_event(start=m, ev="backends", name="mx2.dns.test")
        self.assertEvent(ev, "backends", {"name": "mx2.dns.test", "added": "127.0.0.2",
                                          "removed": "127.0.0.3", "addresses": 1})
        self.assertEqual(self.session(p), old)
        self.assertEqual(len(self.dns.queries(NAME)), asked)
        self.assertEqual(p.find(ev="backends", name=NAME), [])

    def test_config_check_names_the_line(self):
        self.dns.set(NAME, ["127.0.0.2"])
        port = free_port()
        glob = {"resolver": self.dns.addr}
        good = mxtest.listener("a", "%s:%d" % (HOST, free_port()), "127.0.0.2:%d" % port)
        text = mxtest.config(good, mxtest.listener("b", "%s:%d" % (HOST, free_port()),
                                                   "nx.dns.test:%d" % port, mode="smtp"),
                             **glob)
        path = os.path.join(self.tmpdir, "nx.ini")
        with open(path, "w") as f:
            f.write(text)
        line = text.splitlines().index("backend = nx.dns.test:%d" % port) + 1
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True, text=True,
                           timeout=20)
        self.assertEqual((r.returncode, r.stdout, r.stderr),
                         (1, "", "%s:%d: cannot resolve 'nx.dns.test': %s\n"
                          % (path, line, ERR_NXDOMAIN)))
        self.assertGreaterEqual(len(self.dns.queries("nx.dns.test", what="nxdomain")), 1)
        # The daemon does not start either.
        listen = int(text.splitlines()[text.splitlines().index("[listener b]") + 1]
                     .rsplit(":", 1)[1])
        r = subprocess.run([mxtest.binary(), "-c", path], capture_output=True, text=True,
                           timeout=20)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("%s:%d: cannot resolve 'nx.dns.test': %s" % (path, line, ERR_NXDOMAIN),
                      r.stderr)
        self.assertTrue(mxtest.connect_refused(listen))

        # The same file with a name the resolver knows: valid.
        ok = text.replace("nx.dns.test", NAME)
        with open(path, "w") as f:
            f.write(ok)
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True, text=True,
                           timeout=20)
        self.assertEqual((r.returncode, r.stdout, r.stderr),
                         (0, "%s: configuration is valid\n" % path, ""))

    def test_resolver_does_not_read_hosts_file(self):
        name = hosts_file_name()
        if name is None:
            self.skipTest("/etc/hosts maps no name but localhost")
        text = mxtest.config(mxtest.listener("a", "%s:%d" % (HOST, free_port()),
                                             "%s:25" % name), resolver=self.dns.addr)
        path = os.path.join(self.tmpdir, "hosts.ini")
        with open(path, "w") as f:
            f.write(text)
        line = text.splitlines().index("backend = %s:25" % name) + 1
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True, text=True,
                           timeout=20)
        self.assertEqual((r.returncode, r.stderr),
                         (1, "%s:%d: cannot resolve '%s': %s\n"
                          % (path, line, name, ERR_NXDOMAIN)))
        self.assertGreaterEqual(len(self.dns.queries(name, what="nxdomain")), 1)
        # Without resolver, the system's resolver reads /etc/hosts and finds it.
        with open(path, "w") as f:
            f.write(text.replace("resolver = %s\n" % self.dns.addr, ""))
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], capture_output=True, text=True,
                           timeout=20)
        self.assertEqual((r.returncode, r.stderr), (0, ""))

    def test_order_ipv4_first_in_place(self):
        hosts = ["127.0.0.2", "127.0.0.3"]
        v6 = have_ipv6_loopback()
        if v6:
            hosts.append("::1")
        port = self.sinks(*hosts)
        # Unsorted, with a duplicate, IPv6 first in the records.
        self.dns.set(NAME, (["::1"] if v6 else []) + ["127.0.0.3", "127.0.0.2", "127.0.0.3"])
        before, after = "127.0.0.9:%d" % free_port(), "127.0.0.1:%d" % free_port()
        p = self.start([before, "%s:%d" % (NAME, port), after], admin=True, balance="first",
                       health_check="connect", health_interval="200ms", health_timeout="150ms",
                       health_rise=1, health_fall=1)
        expanded = ["127.0.0.2:%d" % port, "127.0.0.3:%d" % port] + (["[::1]:%d" % port]
                                                                     if v6 else [])
        with urllib.request.urlopen("http://%s/metrics" % p.admin, timeout=5) as r:
            text = r.read().decode()
        got = [line.split('backend="', 1)[1].split('"', 1)[0] for line in text.splitlines()
               if line.startswith("mxproxy_backend_up{")]
        self.assertEqual(got, [before] + expanded + [after])
        # balance = first: the entry before the name is down, so its lowest address serves.
        p.wait_event(ev="backend_down", backend=before)
        self.assertEqual(self.session(p), expanded[0])
        if not v6:
            return
        # The IPv6 address is a backend like the others.
        p.stop()
        p2 = self.start("%s:%d" % (NAME, port))
        got = [self.session(p2) for _ in range(6)]
        self.assertEqual(sorted(got), sorted(expanded * 2))


if __name__ == "__main__":
    mxtest.main()
