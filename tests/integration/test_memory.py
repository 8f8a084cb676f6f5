"""Memory is accounted by what is held, not by payload bytes (issue 9, items 5
and 6). Each test runs one attack from several sessions at once and samples
mxproxy's RSS while it runs: the peak may grow by less than 2 MiB per attacking
session over the baseline taken once the sessions are set up.

  - 100,000 one-byte segments (TCP_NODELAY, paced) toward a backend that
    stops reading, in mode tcp and in mode smtp (inside DATA): each small read
    must not pin a 16 KiB block of its own;
  - 200,000 bare-LF lines, each answered 500 by mxproxy itself, from a client
    that never reads: the replies share blocks, and the client stops being
    read once they are over the mark;
  - TLS 1.3 KeyUpdate requests from a client that never reads
    (tests/tools/keyupdate_flood.c, compiled here): OpenSSL's answers count
    for the client too.

An attack that has already gone far over the limit is stopped early, so the
old behaviour fails fast instead of filling the machine.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxtest  # noqa: E402

SESSIONS = 5
LIMIT_KB = 2 * 1024           # per attacking session
SEGMENTS = 100_000            # one-byte segments per session
BARE_LF_LINES = 200_000       # per session
KEYUPDATE_SECONDS = 15.0
# The peer that does not read advertises a small MSS: the kernel then keeps
# mxproxy's send buffer toward it small too (on loopback, with its 64 KiB
# MSS, it grows to megabytes), so what piles up piles up in mxproxy.
SMALL_MSS = 536
TOOL_SRC = os.path.join(mxtest.REPO, "tests", "tools", "keyupdate_flood.c")

# Under ASan a freed block sits in quarantine and the next malloc takes fresh
# pages: RSS would count churn, not what is held.
ASAN_ENV = {"ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "detect_leaks=1")
            + ":quarantine_size_mb=0"}


def tx_queues(port):
    """{local port: bytes in the kernel's send queue} of the 127.0.0.1 TCP
    sockets connected to port (/proc/net/tcp, tx_queue)."""
    out = {}
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[0] == "sl":
                continue
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(remote[1], 16) == port:
                out[int(local[1], 16)] = int(fields[4].split(":")[0], 16)
    return out


def segs_out(sock):
    """tcpi_segs_out of a TCP socket: segments it sent, retransmits included."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    return struct.unpack_from("I", info, 136)[0]


class StallBackend(mxtest.TcpBackend):
    """Reads nothing once the payload starts, with a small receive buffer so
    the kernel soon stops taking bytes for it. smtp=True: greets, answers
    every command 250 and DATA 354, then stalls."""

    def __init__(self, smtp):
        super().__init__("stall")
        self.smtp = smtp
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SMALL_MSS)

    def handle(self, rec):
        if self.smtp:
            self.send(rec, b"220 stall ESMTP\r\n")
            buf = b""
            while True:
                data = self.recv(rec, 1)  # byte by byte: no body byte is read
                if not data:
                    return
                buf += data
                if not buf.endswith(b"\r\n"):
                    continue
                if buf.upper() == b"DATA\r\n":
                    self.send(rec, b"354 go ahead\r\n")
                    break
                self.send(rec, b"250 ok\r\n")
                buf = b""
        self.stopping.wait()


class LineBackend(mxtest.TcpBackend):
    """Greets and reads whatever comes (mxproxy answers the bad lines itself)."""

    def handle(self, rec):
        self.send(rec, b"220 lines ESMTP\r\n")
        while self.recv(rec):
            pass


class SinkBackend(mxtest.TcpBackend):
    """mode tcp: reads and discards."""

    def handle(self, rec):
        while self.recv(rec):
            pass


class RssPeak:
    """Samples RSS every 10 ms from start() until stop(); over(): the peak
    already passed the limit several times over (the attack may stop)."""

    def __init__(self, pid, limit_kb):
        self.pid = pid
        self.limit_kb = limit_kb
        self.base = mxtest.rss_kb(pid)
        self.peak = self.base
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.done.wait(0.01):
            try:
                self.peak = max(self.peak, mxtest.rss_kb(self.pid))
            except (OSError, AssertionError):
                return

    def over(self):
        return self.peak - self.base > 8 * self.limit_kb

    def stop(self):
        self.done.set()
        self.t.join(2)
        self.peak = max(self.peak, mxtest.rss_kb(self.pid))
        return self.peak - self.base


class MemoryTest(mxtest.ProxyTestCase):

    def proxy(self, backend, mode, **opts):
        p = self.start_smtp_proxy(backend.addr, mode=mode, env=ASAN_ENV, **opts)
        return p

    def connect(self, p, n, rcvbuf=None):
        socks = []
        for _ in range(n):
            s = socket.socket()
            if rcvbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SMALL_MSS)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            s.connect((mxtest.HOST, p.port))
            self.track(s)
            socks.append(s)
        return socks

    def assertBounded(self, grown, what):
        self.assertLess(grown, LIMIT_KB * SESSIONS,
                        "RSS grew by %d KiB for %d sessions (%s)" % (grown, SESSIONS, what))

    def fill(self, socks, backend, chunk):
        """Sends chunk on every socket, round after round, until the kernel
        holds all it will for the backend: mxproxy's send queues toward it
        stop growing. What the next rounds send waits in mxproxy itself."""
        last = None
        for _ in range(200):
            for s in socks:
                s.sendall(chunk)
            time.sleep(0.05)
            now = tx_queues(backend.port)
            if len(now) == len(socks) and now == last:
                return
            last = now
        self.fail("the backend's side never filled up: %r" % last)

    def trickle(self, socks, payload, rss):
        """Sends payload one byte per segment on every socket, interleaved in
        small batches so mxproxy reads the bytes nearly one at a time."""
        for s in socks:
            s.setblocking(False)
        sent = [0] * len(socks)
        n = len(payload)
        deadline = time.monotonic() + 40
        while min(sent) < n and not rss.over():
            self.assertLess(time.monotonic(), deadline, "sent %r of %d" % (sent, n))
            for i, s in enumerate(socks):
                for _ in range(20):
                    if sent[i] >= n:
                        break
                    try:
                        s.send(payload[sent[i]:sent[i] + 1])
                    except BlockingIOError:
                        break
                    sent[i] += 1
            time.sleep(0.0001)
        time.sleep(0.3)  # the last reads land
        if not rss.over():
            # Segments really left one by one (mxproxy may still coalesce a few).
            for s in socks:
                self.assertGreater(segs_out(s), n // 2)
        return sent

    def one_byte_attack(self, mode):
        b = self.track(StallBackend(smtp=mode == "smtp"))
        p = self.proxy(b, mode)
        socks = self.connect(p, SESSIONS)
        if mode == "smtp":
            for s in socks:
                f = s.makefile("rb")
                self.assertEqual(f.readline(), b"220 stall ESMTP\r\n")
                s.sendall(b"EHLO a.example\r\nMAIL FROM:<a@a.example>\r\n"
                          b"RCPT TO:<b@b.example>\r\nDATA\r\n")
                for want in (b"250 ok\r\n",) * 3 + (b"354 go ahead\r\n",):
                    self.assertEqual(f.readline(), want)
                f.close()
        b.wait_conns(SESSIONS)
        line = b"0123456789" * 6 + b"\r\n"
        payload = (line * (SEGMENTS // len(line) + 1))[:SEGMENTS]
        # First the kernel's buffers toward the backend fill: from then on
        # each segment read waits in mxproxy.
        self.fill(socks, b, line * 128)
        time.sleep(0.2)
        rss = RssPeak(p.pid, LIMIT_KB * SESSIONS)
        try:
            self.trickle(socks, payload, rss)
        finally:
            grown = rss.stop()
        print("  %s: one-byte segments, RSS +%d KiB for %d sessions" % (mode, grown, SESSIONS),
              file=sys.stderr)
        self.assertBounded(grown, "one-byte segments, mode %s" % mode)
        for s in socks:
            s.close()

    def test_one_byte_segments_tcp(self):
        self.one_byte_attack("tcp")

    def test_one_byte_segments_smtp(self):
        self.one_byte_attack("smtp")

    def test_bare_lf_replies_to_a_client_that_never_reads(self):
        b = self.track(LineBackend("lines"))
        p = self.proxy(b, "smtp")
        socks = self.connect(p, SESSIONS, rcvbuf=4096)
        for s in socks:
            self.assertEqual(s.recv(64), b"220 lines ESMTP\r\n")
            s.setblocking(False)
        b.wait_conns(SESSIONS)
        time.sleep(0.2)
        rss = RssPeak(p.pid, LIMIT_KB * SESSIONS)
        sent = [0] * SESSIONS
        try:
            # mxproxy must stop reading: the client's writes then block, and
            # the attack ends with the time budget instead.
            deadline = time.monotonic() + 15
            while (min(sent) < BARE_LF_LINES and time.monotonic() < deadline
                   and not rss.over()):
                progress = False
                for i, s in enumerate(socks):
                    left = BARE_LF_LINES - sent[i]
                    if left <= 0:
                        continue
                    try:
                        n = s.send(b"\n" * min(left, 4096))
                    except BlockingIOError:
                        continue
                    sent[i] += n
                    progress = True
                if not progress:
                    time.sleep(0.01)
            time.sleep(0.5)
        finally:
            grown = rss.stop()
        print("  bare LF: RSS +%d KiB for %d sessions, lines sent %r" % (grown, SESSIONS, sent),
              file=sys.stderr)
        self.assertBounded(grown, "bare-LF lines answered 500")
        # mxproxy answered while it read: the replies are the 500s, in order.
        s = socks[0]
        s.setblocking(True)
        reply = b"500 5.5.2 Syntax error, bare CR or LF in command\r\n"
        got = b""
        while len(got) < 10 * len(reply):
            data = s.recv(65536)
            self.assertTrue(data)
            got += data
        self.assertEqual(got[:10 * len(reply)], reply * 10)
        for s in socks:
            s.close()

    def test_keyupdate_flood_from_a_client_that_never_reads(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        self.assertIsNotNone(cc, "no C compiler for %s" % TOOL_SRC)
        tool = os.path.join(self.tmpdir, "keyupdate_flood")
        subprocess.run([cc, "-O1", "-o", tool, TOOL_SRC, "-lssl", "-lcrypto"], check=True,
                       timeout=60)
        k = mxtest.pki()
        pair = k.leaf("mx.example.test")
        b = self.track(SinkBackend("sink"))
        p = self.proxy(b, "tcp", client_tls="implicit", cert=pair.cert, key=pair.key)
        procs = []
        try:
            for _ in range(SESSIONS):
                proc = subprocess.Popen([tool, mxtest.HOST, str(p.port), str(KEYUPDATE_SECONDS)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
                procs.append(proc)
            for proc in procs:
                ready = proc.stdout.readline()
                if ready != b"ready\n":
                    self.fail("keyupdate_flood: %r %r" % (ready, proc.stderr.read()))
            rss = RssPeak(p.pid, LIMIT_KB * SESSIONS)
            try:
                deadline = time.monotonic() + KEYUPDATE_SECONDS + 10
                while any(proc.poll() is None for proc in procs):
                    self.assertLess(time.monotonic(), deadline, "keyupdate_flood did not end")
                    if rss.over():
                        break
                    time.sleep(0.05)
            finally:
                grown = rss.stop()
            counts = []
            for proc in procs:
                if proc.poll() is None:
                    break
                counts.append(proc.stdout.read().decode().strip())
        finally:
            for proc in procs:
                if proc.poll() is None:
                    mxtest.stop_process(proc)
                proc.stdout.close()
                proc.stderr.close()
        print("  keyupdate: RSS +%d KiB for %d sessions, %s" % (grown, SESSIONS, counts),
              file=sys.stderr)
        self.assertBounded(grown, "TLS 1.3 KeyUpdate flood")


if __name__ == "__main__":
    mxtest.main()
