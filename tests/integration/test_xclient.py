#!/usr/bin/env python3
"""xclient = on against Postfix's real smtpd.

The test runs a private Postfix instance (its own main.cf, master.cf, queue
and log file in a temporary directory, `postfix -c DIR start-fg`) with two
smtpd services on 127.0.0.1:
  - xclient: smtpd_authorized_xclient_hosts = 127.0.0.1, mxproxy's address;
  - plain:   no XCLIENT authorization.
The client connects from 127.0.0.2, so smtpd's log tells mxproxy's address
(127.0.0.1) from the client's, and a direct connection from 127.0.0.2 shows
byte for byte what smtpd says to that client.
"""

import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
import unittest

import mxtest
from mxtest import Client, ProxyTestCase, free_port

POSTFIX = "/usr/sbin/postfix"
CLIENT_IP = "127.0.0.2"
GREETING = b"220 mx.postfix.test ESMTP\r\n"


class Postfix:
    """A private Postfix instance; .xport and .plainport are its smtpd ports."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mxtest-postfix-")
        os.chmod(self.dir, 0o755)
        d = self.dir
        for sub in ("queue", "data"):
            os.mkdir(os.path.join(d, sub))
        pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(d, "data"), pw.pw_uid, pw.pw_gid)
        self.maillog = os.path.join(d, "maillog")
        self.xport, self.plainport = free_port(), free_port()
        with open(os.path.join(d, "main.cf"), "w") as f:
            f.write("""compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
mydestination = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
default_transport = discard
local_transport = discard
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
smtpd_authorized_xclient_hosts = 127.0.0.1
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
biff = no
smtputf8_enable = no
""".format(d=d))
        with open(os.path.join(d, "master.cf"), "w") as f:
            f.write("""127.0.0.1:{x} inet n - n - - smtpd
127.0.0.1:{p} inet n - n - - smtpd -o smtpd_authorized_xclient_hosts=
postlog   unix-dgram n - n - 1 postlogd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
discard   unix - - n - - discard
error     unix - - n - - error
retry     unix - - n - - error
""".format(x=self.xport, p=self.plainport))
        self.proc = subprocess.Popen([POSTFIX, "-c", d, "start-fg"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=d)
        try:
            mxtest.wait_port(self.xport, 15, self.proc)
            mxtest.wait_port(self.plainport, 5, self.proc)
        except BaseException:
            self.close()
            raise

    def log(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, regex, timeout=5.0):
        """The first match of regex in the mail log, polled until timeout."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(regex, self.log(), re.M)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError("no %r in postfix's log within %.1fs:\n%s"
                                     % (regex, timeout, self.log()[-3000:]))
            time.sleep(0.05)

    def close(self):
        subprocess.run([POSTFIX, "-c", self.dir, "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        mxtest.stop_process(self.proc, signal.SIGTERM, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _unavailable():
    if not os.access(POSTFIX, os.X_OK):
        return "postfix is not installed"
    if os.geteuid() != 0:
        return "a private postfix instance needs root"
    return None


class XclientTest(ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        why = _unavailable()
        if why:
            raise unittest.SkipTest(why)
        cls.postfix = Postfix()

    @classmethod
    def tearDownClass(cls):
        cls.postfix.close()

    def client2(self, port):
        return self.track(Client(port, 5.0, source=CLIENT_IP))

    def direct_transcript(self, port, helo):
        """Greeting and EHLO reply smtpd sends straight to 127.0.0.2."""
        c = self.client2(port)
        greeting = c.read_reply()
        ehlo = c.cmd(b"EHLO " + helo)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        c.close()
        return greeting, ehlo

    def test_smtpd_sees_the_client_and_the_client_sees_one_session(self):
        pf = self.postfix
        greeting, ehlo = self.direct_transcript(pf.xport, b"client.example.test")
        self.assertEqual(greeting, GREETING)
        self.assertNotIn(b"XCLIENT", ehlo)  # 127.0.0.2 is not authorized

        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, xclient="on", transcript="full")
        c = self.client2(p.port)
        self.assertEqual(c.read_reply(), GREETING)
        self.assertEqual(c.cmd(b"EHLO client.example.test"), ehlo)
        self.assertEqual(c.cmd(b"MAIL FROM:<a@client.example.test>"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<u@mx.postfix.test>"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        reply = c.cmd(b"Subject: xclient\r\n\r\nhello\r\n.", timeout=10)
        m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", reply)
        self.assertIsNotNone(m, reply)
        queue_id = m.group(1).decode()
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        # Nothing else ever reached the client: one greeting, one EHLO reply.
        self.assertEqual(c.received, GREETING + ehlo + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                         b"354 End data with <CR><LF>.<CR><LF>\r\n" + reply
                         + b"221 2.0.0 Bye\r\n")

        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        close = p.close_of(sid)
        # smtpd: the connection came from mxproxy, the session is the client's.
        pf.wait_log(r"postfix/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]:\d+$")
        pf.wait_log(r"postfix/smtpd\[\d+\]: %s: client=unknown\[127\.0\.0\.2\]:%d$"
                    % (queue_id, c.local_port))
        pf.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.2\]:%d "
                    % c.local_port)

        proxy_lines = [e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")]
        self.assertEqual(proxy_lines, [
            "XCLIENT ADDR=127.0.0.2 PORT=%d PROTO=ESMTP HELO=client.example.test "
            "DESTADDR=127.0.0.1 DESTPORT=%d" % (c.local_port, p.port),
            "EHLO client.example.test"])
        x = p.find(ev="xclient", sid=sid)
        self.assertEqual(len(x), 1, p.tail())
        self.assertEvent(x[0], "xclient", {"code": 220})
        self.assertEqual(p.find(ev="xclient_error"), [])
        pairs = p.find(ev="pair", sid=sid)
        self.assertEqual([(e["cmd"], e["code"]) for e in pairs],
                         [("<greeting>", "220"), ("EHLO client.example.test", "250"),
                          ("MAIL FROM:<a@client.example.test>", "250"),
                          ("RCPT TO:<u@mx.postfix.test>", "250"), ("DATA", "354"), (".", "250"),
                          ("QUIT", "221")])
        self.assertEqual((close["end"], close["client"], close["helo"], close["messages"]),
                         ("quit", "%s:%d" % (CLIENT_IP, c.local_port), "client.example.test",
                          "1"))

    def test_smtplib_through_xclient(self):
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, xclient="on")
        s = smtplib.SMTP("127.0.0.1", p.port, local_hostname="lib.example.test", timeout=5,
                         source_address=(CLIENT_IP, 0))
        try:
            port = s.sock.getsockname()[1]
            code, _ = s.ehlo()
            self.assertEqual(code, 250)
            self.assertNotIn("xclient", s.esmtp_features)
            self.assertEqual(s.sendmail("a@lib.example.test", ["u@mx.postfix.test"],
                                        b"Subject: t\r\n\r\nbody\r\n"), {})
            self.assertEqual(s.quit()[0], 221)
        finally:
            s.close()
        pf.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.2\]:%d ehlo=2 "
                    % port)
        self.assertEqual(len(p.wait_count(1, ev="xclient", code=220)), 1)

    def test_not_offered_nothing_sent(self):
        """smtpd does not offer XCLIENT to mxproxy: mxproxy sends none, the
        client sees smtpd's EHLO reply as it is, smtpd sees mxproxy."""
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.plainport, xclient="on",
                                  transcript="full")
        direct = self.track(Client(pf.plainport))  # from 127.0.0.1, like mxproxy
        self.assertEqual(direct.read_reply(), GREETING)
        ehlo = direct.cmd(b"EHLO client.example.test")
        direct.cmd(b"QUIT")
        c = self.client2(p.port)
        self.assertEqual(c.read_reply(), GREETING)
        self.assertEqual(c.cmd(b"EHLO client.example.test"), ehlo)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        self.assertEqual(p.close_of(sid)["end"], "quit")
        self.assertEqual(p.find(ev="line", sid=sid, dir="proxy"), [])
        self.assertEqual(p.find(ev="xclient"), [])
        self.assertEqual(p.find(ev="xclient_error"), [])

    def test_xclient_off_smtpd_sees_mxproxy(self):
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, transcript="full")
        c = self.client2(p.port)
        self.assertEqual(c.read_reply(), GREETING)
        self.assertIn(b"250-XCLIENT ", c.cmd(b"EHLO client.example.test"))
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        p.close_of(sid)
        self.assertEqual(p.find(ev="line", sid=sid, dir="proxy"), [])


if __name__ == "__main__":
    mxtest.main()
