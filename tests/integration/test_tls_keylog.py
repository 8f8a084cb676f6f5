"""tls_keylog = FILE: the TLS secrets of both legs, for Wireshark.

Every handshake mxproxy makes or accepts appends its secrets to FILE in the
NSS key log format (what SSLKEYLOGFILE produces). The proof is Wireshark's:
tcpdump captures a STARTTLS session from swaks on loopback, on both legs
(client_tls = starttls in front, backend_tls = implicit behind, towards a
second mxproxy without tls_keylog that terminates TLS for smtp-sink), and
`tshark -o tls.keylog_file:FILE` shows the SMTP commands sent inside TLS on
each leg; without the file it shows none of them.

Also: the file is created mode 0600 and appended to, never truncated; an
existing file others can read, or one that cannot be opened, is a
FILE:LINE error for `mxproxy -t` and at reload; `lvl=warn ev=tls_keylog
file=...` at start and after every reload; a reload without the key stops
the lines for new sessions; TLS 1.2 handshakes give CLIENT_RANDOM lines.

tcpdump needs root (CAP_NET_RAW); without it the capture test is skipped.
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import time

import mxtest
from mxtest import HOST, config, free_port, listener, pki

SECRET = re.compile(r"(CLIENT_RANDOM|CLIENT_HANDSHAKE_TRAFFIC_SECRET|"
                    r"SERVER_HANDSHAKE_TRAFFIC_SECRET|CLIENT_TRAFFIC_SECRET_0|"
                    r"SERVER_TRAFFIC_SECRET_0|EXPORTER_SECRET) [0-9a-f]{64} [0-9a-f]{64,96}")
TLS13_LABELS = {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}
FROM, TO = "sender@example.com", "rcpt@example.net"


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def check_lines(test, lines):
    """Every line a whole key log line; returns the set of client randoms."""
    for line in lines:
        test.assertRegex(line, "^" + SECRET.pattern + "$")
    return {line.split(" ")[1] for line in lines}


class Capture:
    """tcpdump on lo for the given ports, written to a file; close() ends it."""

    def __init__(self, path, ports):
        flt = " or ".join("tcp port %d" % p for p in ports)
        self.path = path
        self.proc = subprocess.Popen(["tcpdump", "-Z", "root", "--immediate-mode", "-i", "lo", "-U", "-n", "-s", "0", "-w", path,
                                      flt], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        # tcpdump says "listening on lo" once the capture is live.
        line = self.proc.stderr.readline()
        if b"listening on" not in line:
            self.close()
            raise AssertionError("tcpdump did not start: %r" % line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stderr.close()


def tshark_commands(capture, keylog, smtp_port, tls_port):
    """(port, command line) of every SMTP command tshark can read in capture:
    smtp_port carries SMTP with STARTTLS, tls_port SMTP inside implicit TLS."""
    args = ["tshark", "-n", "-r", capture, "-d", "tcp.port==%d,smtp" % smtp_port,
            "-d", "tcp.port==%d,tls" % tls_port, "-d", "tls.port==%d,smtp" % tls_port,
            "-Y", "smtp.req", "-T", "fields", "-E", "separator=|", "-e", "tcp.dstport",
            "-e", "smtp.command_line"]
    if keylog is not None:
        args[1:1] = ["-o", "tls.keylog_file:%s" % keylog]
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                       env=dict(os.environ, HOME=os.path.dirname(capture)))
    if r.returncode != 0:
        raise AssertionError("tshark failed: %s" % r.stderr.decode("utf-8", "replace"))
    out = []
    for line in r.stdout.decode().splitlines():
        port, lines = line.split("|", 1)
        # A frame with pipelined commands has several, joined by ','; tshark shows the
        # line ends as the text \r\n.
        for cmd in lines.split(","):
            out.append((int(port), cmd.replace("\\r\\n", "")))
    return out


class KeylogTest(mxtest.ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = pki()

    def keylog_path(self):
        return os.path.join(self.tmpdir, "keys.log")

    def two_proxies(self, keylog):
        """inner: client_tls = implicit for smtp-sink, no tls_keylog; outer: client_tls =
        starttls, backend_tls = implicit to inner, tls_keylog = keylog. Returns (outer
        port, inner port, outer proxy)."""
        sink = self.sink()
        inner_port, outer_port = free_port(), free_port()
        self.start_proxy(config(listener("inner", "%s:%d" % (HOST, inner_port), sink.addr,
                                         mode="smtp", client_tls="implicit",
                                         cert=self.pki.mx.cert, key=self.pki.mx.key)),
                         name="inner.conf")
        outer = self.start_proxy(config(listener(
            "outer", "%s:%d" % (HOST, outer_port), "%s:%d" % (HOST, inner_port), mode="smtp",
            client_tls="starttls", cert=self.pki.mx.cert, key=self.pki.mx.key,
            backend_tls="implicit", backend_ca=self.pki.ca, backend_sni="mx.example.test"),
            tls_keylog=keylog), name="outer.conf")
        return outer_port, inner_port, outer

    def swaks(self, port):
        r = subprocess.run(["swaks", "--server", "%s:%d" % (HOST, port), "--tls",
                            "--tls-verify", "--tls-ca-path", self.pki.ca,
                            "--helo", "client.example", "--from", FROM, "--to", TO],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout.decode("utf-8", "replace"))
        return r.stdout.decode("utf-8", "replace")

    def test_wireshark_decrypts_both_legs(self):
        if os.geteuid() != 0 or shutil.which("tcpdump") is None:
            self.skipTest("capturing on lo needs root and tcpdump")
        keylog = self.keylog_path()
        outer_port, inner_port, outer = self.two_proxies(keylog)
        self.assertEqual(stat.S_IMODE(os.stat(keylog).st_mode), 0o600)
        outer.wait_event(ev="tls_keylog", lvl="warn", file=keylog)
        cap = Capture(os.path.join(self.tmpdir, "leg.pcap"), (outer_port, inner_port))
        try:
            self.swaks(outer_port)
            outer.wait_event(ev="close", listener="outer", end="quit")
            time.sleep(0.2)  # -U writes each packet at once; let the last ones land
        finally:
            cap.close()

        lines = read_lines(keylog)
        randoms = check_lines(self, lines)
        # One TLS 1.3 handshake per leg: the client's with mxproxy, mxproxy's with inner.
        self.assertEqual(len(randoms), 2, lines)
        self.assertEqual({l.split(" ")[0] for l in lines}, TLS13_LABELS)

        seen = tshark_commands(cap.path, keylog, outer_port, inner_port)
        inside = [("MAIL FROM:<%s>" % FROM), ("RCPT TO:<%s>" % TO), "DATA", "QUIT"]
        # Client leg: EHLO and STARTTLS in plaintext, then the transaction inside TLS.
        self.assertEqual([c for p, c in seen if p == outer_port],
                         ["EHLO client.example", "STARTTLS", "EHLO client.example"] + inside)
        # Backend leg: TLS from the first byte; mxproxy relays the client's commands.
        self.assertEqual([c for p, c in seen if p == inner_port],
                         ["EHLO client.example"] + inside)

        # The same capture without the secrets: only the plaintext before STARTTLS.
        self.assertEqual(tshark_commands(cap.path, None, outer_port, inner_port),
                         [(outer_port, "EHLO client.example"), (outer_port, "STARTTLS")])

    def test_appends_and_reload_turns_it_off(self):
        keylog = self.keylog_path()
        with open(keylog, "w") as f:
            f.write("# kept\n")
        os.chmod(keylog, 0o600)
        outer_port, _, outer = self.two_proxies(keylog)
        self.swaks(outer_port)
        first = read_lines(keylog)
        self.assertEqual(first[0], "# kept")
        self.assertEqual(len(check_lines(self, first[1:])), 2)

        # Reloaded with the key: warned again, and new sessions append.
        m = outer.reload(open(outer.path).read())
        outer.wait_event(start=m, ev="reload")
        self.assertEqual(len(outer.find(ev="tls_keylog", lvl="warn", file=keylog)), 2)
        self.swaks(outer_port)
        second = read_lines(keylog)
        self.assertEqual(second[:len(first)], first)
        self.assertEqual(len(check_lines(self, second[len(first):])), 2)

        # Without it: no warning, no more lines.
        text = open(outer.path).read().replace("tls_keylog = %s\n" % keylog, "")
        m = outer.reload(text)
        outer.wait_event(start=m, ev="reload")
        self.assertEqual(len(outer.find(ev="tls_keylog")), 2)
        self.swaks(outer_port)
        outer.wait_count(3, listener="outer", ev="close", end="quit")
        self.assertEqual(read_lines(keylog), second)

    def test_tls12_client_random(self):
        keylog = self.keylog_path()
        sink = self.sink()
        p = self.start_smtp_proxy(sink.addr, client_tls="implicit", cert=self.pki.mx.cert,
                                  key=self.pki.mx.key, glob={"tls_keylog": keylog})
        r = subprocess.run(["openssl", "s_client", "-connect", "%s:%d" % (HOST, p.port),
                            "-tls1_2", "-CAfile", self.pki.ca, "-verify_return_error",
                            "-crlf", "-ign_eof", "-nocommands", "-keylogfile",
                            os.path.join(self.tmpdir, "client.log")],
                           input=b"QUIT\n", stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=20)
        self.assertIn(b"221 ", r.stdout, r.stdout.decode("utf-8", "replace"))
        p.wait_event(ev="close", end="quit")
        lines = read_lines(keylog)
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^CLIENT_RANDOM [0-9a-f]{64} [0-9a-f]{96}$")
        # The client's own key log holds the same secret.
        self.assertIn(lines[0], read_lines(os.path.join(self.tmpdir, "client.log")))


class KeylogConfigTest(mxtest.ProxyTestCase):

    def check(self, keylog):
        """mxproxy -t on a config whose line 2 is tls_keylog = keylog."""
        path = os.path.join(self.tmpdir, "t.ini")
        with open(path, "w") as f:
            f.write(config(listener("x", "%s:%d" % (HOST, free_port()), "127.0.0.1:25"),
                           tls_keylog=keylog))
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=10)
        return r.returncode, r.stderr.decode(), path

    def line_of_key(self, path):
        with open(path) as f:
            return 1 + [l.startswith("tls_keylog") for l in f].index(True)

    def test_open_to_others_is_refused(self):
        keylog = os.path.join(self.tmpdir, "shared.log")
        with open(keylog, "w"):
            pass
        os.chmod(keylog, 0o644)
        rc, err, path = self.check(keylog)
        self.assertEqual(rc, 1)
        self.assertIn("%s:%d: tls_keylog %s: open to group or others (chmod 600 it)"
                      % (path, self.line_of_key(path), keylog), err)

    def test_unopenable_is_refused(self):
        keylog = os.path.join(self.tmpdir, "no-such-dir", "keys.log")
        rc, err, path = self.check(keylog)
        self.assertEqual(rc, 1)
        self.assertIn("%s:%d: tls_keylog %s: No such file or directory"
                      % (path, self.line_of_key(path), keylog), err)

    def test_new_file_is_the_owners_alone(self):
        keylog = os.path.join(self.tmpdir, "new.log")
        old = os.umask(0)
        try:
            rc, err, _ = self.check(keylog)
        finally:
            os.umask(old)
        self.assertEqual(rc, 0, err)
        self.assertEqual(stat.S_IMODE(os.stat(keylog).st_mode), 0o600)


if __name__ == "__main__":
    mxtest.main()
