#!/usr/bin/env python3
"""client_tls = starttls in front of OpenSMTPD, with real clients.

OpenSMTPD refuses a second EHLO in one SMTP session ("503 5.5.1 Invalid
command: Already identified"). mxproxy answers STARTTLS itself, so the
backend sees no TLS: the EHLO a client sends after STARTTLS must not reach
it again. mxproxy answers it from the backend's first reply, without
STARTTLS, byte for byte otherwise (ev=pair ... local=1). swaks, curl and
Postfix's smtp client (a private instance, `postfix -c DIR start-fg`, with
relayhost = mxproxy and smtp_tls_security_level = encrypt) each deliver
through mxproxy to OpenSMTPD, which stores every message exactly once.

Debian's opensmtpd conflicts with postfix as a package, so it is never
installed: `.ci/setup test` unpacks it (apt-get download + dpkg -x) into
.cache/opensmtpd/root, and this file does the same when it is missing.
smtpd runs from there with `-f CONF -d`, in a private mount namespace
(`unshare --mount`) where tmpfs hold its queue (/var/spool/smtpd) and control
socket (/run) and the unpacked /usr/libexec holds its delivery helpers, so
instances never meet, and nothing of the host's
changes but the users opensmtpd/opensmtpq and /var/lib/opensmtpd/empty,
created when missing. It delivers to a maildir in a temporary directory, as
user nobody. Needs root; skips without it, except with CI=true, where a
missing OpenSMTPD fails the test.
"""

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import unittest

import mxtest
from mxtest import HOST, MS, UINT, ProxyTestCase, TlsClient, client_context, free_port, pair, pki

CACHE = os.path.join(mxtest.REPO, ".cache", "opensmtpd")
SMTPD = os.path.join(CACHE, "root", "usr", "sbin", "smtpd")
LIBEXEC = os.path.join(CACHE, "root", "usr", "libexec")
POSTFIX = "/usr/sbin/postfix"
DOMAIN = "opensmtpd.test"
READY = b"220 2.0.0 Ready to start TLS\r\n"


def run(args, input=b"", timeout=30, cwd=None):
    r = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, cwd=cwd)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def fetch_opensmtpd():
    """Unpacks Debian's opensmtpd into CACHE unless it is there. Returns None
    or why it could not."""
    if os.access(SMTPD, os.X_OK):
        return None
    shutil.rmtree(CACHE, ignore_errors=True)
    os.makedirs(CACHE)
    try:
        rc, out, err = run(["apt-get", "download", "opensmtpd"], cwd=CACHE, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "apt-get download opensmtpd: %r" % e
    debs = glob.glob(os.path.join(CACHE, "opensmtpd_*.deb"))
    if rc != 0 or len(debs) != 1:
        return "apt-get download opensmtpd failed: %s" % (out + err)[-500:]
    rc, out, err = run(["dpkg", "-x", debs[0], os.path.join(CACHE, "root")])
    if rc != 0 or not os.access(SMTPD, os.X_OK):
        return "dpkg -x failed: %s" % (out + err)[-500:]
    return None


def prepare_host():
    """The users and the chroot directory smtpd insists on."""
    for user in ("opensmtpd", "opensmtpq"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/var/lib/opensmtpd/empty", "--shell",
                            "/usr/sbin/nologin", user], check=True, timeout=20)
    os.makedirs("/var/lib/opensmtpd/empty", mode=0o755, exist_ok=True)


def unavailable():
    if os.geteuid() != 0:
        return "OpenSMTPD needs root (its privilege separation, a mount namespace)"
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    rc, out, err = run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs tmpfs /var/spool"])
    if rc != 0:
        return "no private mount namespace here: " + err.strip()
    why = fetch_opensmtpd()
    if why:
        return why
    rc, out, err = run(["ldd", SMTPD])
    if rc != 0 or "not found" in out:
        return "smtpd lacks libraries:\n" + out
    prepare_host()
    return None


class OpenSmtpd:
    """smtpd -d on 127.0.0.1 in its own mount namespace; accepts mail for
    DOMAIN into a maildir in dir."""

    def __init__(self, dir):
        self.dir = dir
        self.port = free_port()
        self.maildir = os.path.join(dir, "mail", "Maildir")
        os.makedirs(os.path.dirname(self.maildir))
        os.chmod(dir, 0o755)
        nobody = pwd.getpwnam("nobody")
        os.chown(os.path.dirname(self.maildir), nobody.pw_uid, nobody.pw_gid)
        self.conf = os.path.join(dir, "smtpd.conf")
        with open(self.conf, "w") as f:
            f.write('table vusers { "@" = "nobody" }\n'
                    'listen on 127.0.0.1 port %d\n'
                    'action "store" maildir "%s" virtual <vusers>\n'
                    'match from any for domain "%s" action "store"\n'
                    % (self.port, self.maildir, DOMAIN))
        self.logfile = os.path.join(dir, "smtpd.log")
        # tmpfs: the queue (/var/spool/smtpd) and the control socket (/run/smtpd.sock) are
        # this instance's own, and gone with it.
        script = ("mount -t tmpfs tmpfs /var/spool && mount -t tmpfs tmpfs /run && "
                  "mount --bind %s /usr/libexec && exec %s -f %s -d"
                  % (LIBEXEC, SMTPD, self.conf))
        with open(self.logfile, "wb") as log:
            # unshare and sh exec: the pid is smtpd's parent process.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            mxtest.wait_port(self.port, 15, self.proc)
        except BaseException:
            self.close()
            raise

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stored(self, since=0):
        """msgid of every message smtpd accepted into its queue, in order."""
        return re.findall(r"^[0-9a-f]{16} smtp message msgid=([0-9a-f]+) ",
                          self.log()[since:], re.M)

    def wait_log(self, regex, n=1, timeout=5.0):
        """The log's length once regex matched n lines."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if len(re.findall(regex, log, re.M)) >= n:
                return len(log)
            if time.monotonic() > deadline:
                raise AssertionError("no %r in smtpd's log:\n%s" % (regex, log[-3000:]))
            time.sleep(0.05)

    def wait_delivered(self, n, timeout=10.0):
        """The maildir's messages once n are there (and no more came)."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(glob.glob(os.path.join(self.maildir, "new", "*")))
            if len(files) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate would come right behind
        files = sorted(glob.glob(os.path.join(self.maildir, "new", "*")))
        out = []
        for path in files:
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def close(self):
        mxtest.stop_process(self.proc, signal.SIGTERM, 10)


class PostfixClient(mxtest.PrivatePostfix):
    """A private Postfix that only sends: relayhost = mxproxy, TLS required."""

    wait_timeout = 10.0

    def __init__(self, relay_port):
        super().__init__(prefix="mxtest-postfix-client-")
        self.write_main_cf("""myhostname = client.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{port}
smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
smtp_address_preference = ipv4
alias_maps =
alias_database =
""".format(port=relay_port))
        self.write_master_cf("""pickup    unix n - n 60 1 pickup
smtp      unix - - n - - smtp
tlsmgr    unix - - n 1000? 1 tlsmgr
relay     unix - - n - - smtp
""")
        self.start()

    def sendmail(self, sender, rcpt, message):
        rc, out, err = run(["/usr/sbin/sendmail", "-C", self.dir, "-f", sender, rcpt],
                           input=message)
        if rc != 0:
            raise AssertionError("sendmail: %d %s %s" % (rc, out, err))


class OpenSmtpdTest(ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        why = unavailable()
        if why:
            if os.environ.get("CI") == "true":
                raise AssertionError("CI=true and OpenSMTPD is unavailable: " + why)
            raise unittest.SkipTest(why)
        cls.pki = pki()

    def setUp(self):
        super().setUp()
        self.smtpd = self.track(OpenSmtpd(self.tmpdir))

    def proxy(self, **opts):
        opts.setdefault("client_tls", "starttls")
        opts.setdefault("cert", self.pki.mx.cert)
        opts.setdefault("key", self.pki.mx.key)
        return self.start_smtp_proxy("%s:%d" % (HOST, self.smtpd.port), **opts)

    def assertStoredOnce(self, p, marker, n=1, since=0):
        """n messages stored and delivered by OpenSMTPD, each once, marker in
        each; no command failed on either side (smtpd's log from since)."""
        mails = self.smtpd.wait_delivered(n)
        log = self.smtpd.log()[since:]
        self.assertEqual(len(mails), n, log[-3000:])
        self.assertEqual(len(self.smtpd.stored(since)), n, log[-3000:])
        for m in mails:
            self.assertEqual(m.count(marker), 1, m)
        self.assertNotIn("failed-command", log)
        self.assertNotIn("503 5.5.1", log)
        self.assertEqual([e for e in p.find(ev="pair") if e.get("code") == "503"], [])

    def local_ehlo(self, p, sid, helo):
        """The pairs of the two EHLOs: the backend's, then mxproxy's."""
        ehlos = p.find(ev="pair", sid=sid, cmd="EHLO " + helo)
        self.assertEqual(len(ehlos), 2, p.tail())
        self.assertEqual(ehlos[0].get("local"), None, ehlos[0]["_raw"])
        self.assertEqual(ehlos[1].get("local"), "1", ehlos[1]["_raw"])
        # the same server text, one line fewer (no STARTTLS inside TLS)
        self.assertEqual(ehlos[1]["reply"], ehlos[0]["reply"])
        self.assertEqual(int(ehlos[1]["lines"]), int(ehlos[0]["lines"]))
        return ehlos

    def test_raw_client_sees_opensmtpd_bytes_and_one_ehlo_reaches_it(self):
        # What OpenSMTPD itself says to this EHLO from 127.0.0.1.
        d = self.track(mxtest.Client(self.smtpd.port))
        greeting = d.read_reply()
        direct = d.cmd(b"EHLO client.example")
        self.assertEqual(d.cmd(b"EHLO client.example"),
                         b"503 5.5.1 Invalid command: Already identified\r\n")
        self.assertEqual(d.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        d.close()
        mark = self.smtpd.wait_log(r"smtp disconnected reason=quit$")
        self.assertRegex(direct, rb"^250-[^\r\n]+\r\n(250-[^\r\n]+\r\n)*250 [^\r\n]+\r\n$")
        self.assertNotIn(b"STARTTLS", direct)
        first, rest = direct.split(b"\r\n", 1)
        offered = first + b"\r\n250-STARTTLS\r\n" + rest

        p = self.proxy(transcript="full")
        c = self.track(TlsClient(p.port, client_context(), server_hostname="mx.example.test",
                                 tls=False))
        self.assertEqual(c.read_reply(), greeting)
        self.assertEqual(c.cmd(b"EHLO client.example"), offered)
        self.assertEqual(c.cmd(b"STARTTLS"), READY)
        c.start_tls()
        self.assertEqual(c.cmd(b"EHLO client.example"), direct)  # byte for byte
        self.assertEqual(c.cmd(b"MAIL FROM:<a@client.example>"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<u@%s>" % DOMAIN.encode()),
                         b"250 2.1.5 Destination address valid: Recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 Enter mail, end with \".\" on a line by itself\r\n")
        reply = c.cmd(b"Subject: raw\r\n\r\nmarker-raw\r\n.", timeout=10)
        self.assertRegex(reply, rb"^250 2\.0\.0 [0-9a-f]+ Message accepted for delivery\r\n$")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))

        sid = p.sid_of(c)
        text = direct.split(b"\r\n", 1)[0][4:].decode()
        close = self.assertPairs(p, sid, [
            pair("<greeting>", 220, greeting[4:-2].decode()),
            pair("EHLO client.example", 250, text, lines=direct.count(b"\r\n")),
            pair("STARTTLS", 220, "Ready to start TLS", esc="2.0.0", local=1),
            pair("EHLO client.example", 250, text, lines=direct.count(b"\r\n"), local=1),
            pair("MAIL FROM:<a@client.example>", 250, "Ok", esc="2.0.0"),
            pair("RCPT TO:<u@%s>" % DOMAIN, 250, "Destination address valid: Recipient ok",
                 esc="2.1.5"),
            pair("DATA", 354, 'Enter mail, end with "." on a line by itself'),
            pair(".", 250, mxtest.Like(r"[0-9a-f]+ Message accepted for delivery"),
                 esc="2.0.0", size=UINT),
            pair("QUIT", 221, "Bye", esc="2.0.0"),
        ])
        self.assertEqual(close["end"], "quit")
        self.assertEqual(close["messages"], "1")
        # The backend heard one EHLO; mxproxy said the second reply itself.
        sent = [e["text"] for e in p.find(ev="line", sid=sid, dir="client")]
        self.assertEqual(sent.count("EHLO client.example"), 2)
        proxy_lines = [e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")]
        self.assertEqual(proxy_lines[-direct.count(b"\r\n"):],
                         [l.decode() for l in direct.split(b"\r\n")[:-1]])
        smtpd_sessions = re.findall(r"^([0-9a-f]{16}) smtp connected address=127\.0\.0\.1 ",
                                    self.smtpd.log()[mark:], re.M)
        self.assertEqual(len(smtpd_sessions), 1)  # mxproxy's
        self.assertStoredOnce(p, b"marker-raw", since=mark)

    def test_pipelined_rset_starttls_then_ehlo_noop_in_one_record(self):
        """RSET + STARTTLS in one write, EHLO + NOOP in one TLS record: every
        command answered (OpenSMTPD hears RSET, then NOOP, each alone)."""
        p = self.proxy()
        c = self.track(TlsClient(p.port, client_context(), server_hostname="mx.example.test",
                                 tls=False))
        c.read_reply()
        before = c.cmd(b"EHLO client.example")
        c.send(b"RSET\r\nSTARTTLS\r\n")
        self.assertEqual(c.read_reply(), b"250 2.0.0 Reset state\r\n")
        self.assertEqual(c.read_reply(), READY)
        c.start_tls()
        c.send(b"EHLO client.example\r\nNOOP\r\n")  # one TLS record
        self.assertEqual(c.read_reply(), before.replace(b"250-STARTTLS\r\n", b""))
        self.assertEqual(c.read_reply(), b"250 2.0.0 Ok\r\n")
        # OpenSMTPD offers no PIPELINING: one command at a time from here.
        self.assertEqual(c.cmd(b"MAIL FROM:<a@client.example>"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<u@%s>" % DOMAIN.encode()),
                         b"250 2.1.5 Destination address valid: Recipient ok\r\n")
        self.assertEqual(c.cmd(b"DATA"),
                         b"354 Enter mail, end with \".\" on a line by itself\r\n")
        self.assertRegex(c.cmd(b"Subject: pipelined\r\n\r\nmarker-pipelined\r\n.", timeout=10),
                         rb"^250 2\.0\.0 [0-9a-f]+ Message accepted for delivery\r\n$")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        sid = p.sid_of(c)
        p.close_of(sid)
        self.local_ehlo(p, sid, "client.example")
        self.assertEqual(p.find(ev="starttls_injection"), [])
        self.assertStoredOnce(p, b"marker-pipelined")

    def test_swaks_tls(self):
        p = self.proxy()
        rc, out, err = run(["swaks", "--server", "%s:%d" % (HOST, p.port), "--tls",
                            "--helo", "swaks.example", "--from", "a@swaks.example",
                            "--to", "u@" + DOMAIN, "--body", "marker-swaks"])
        self.assertEqual(rc, 0, out + err)
        self.assertIn("<-  220 2.0.0 Ready to start TLS\n", out)
        self.assertRegex(out, r"<~  250 2\.0\.0 [0-9a-f]+ Message accepted for delivery\n")
        # swaks prints replies as "<-  " (plain) or "<~  " (TLS); a queue id may hold "503".
        self.assertEqual(re.findall(r"^<[-~] +503.*$", out, re.M), [])
        sid = p.wait_event(ev="close")["sid"]
        self.local_ehlo(p, sid, "swaks.example")
        self.assertStoredOnce(p, b"marker-swaks")

    def test_curl_ssl_reqd(self):
        p = self.proxy()
        msg = os.path.join(self.tmpdir, "msg.txt")
        with open(msg, "wb") as f:
            f.write(b"From: a@curl.example\r\nTo: u@%s\r\nSubject: curl\r\n\r\nmarker-curl\r\n"
                    % DOMAIN.encode())
        rc, out, err = run(["curl", "--silent", "--show-error", "--ssl-reqd", "-k",
                            "smtp://%s:%d/curl.example" % (HOST, p.port),
                            "--mail-from", "a@curl.example", "--mail-rcpt", "u@" + DOMAIN,
                            "-T", msg])
        self.assertEqual(rc, 0, out + err)
        sid = p.wait_event(ev="close")["sid"]
        self.local_ehlo(p, sid, "curl.example")
        self.assertStoredOnce(p, b"marker-curl")

    def test_postfix_smtp_client_delivers_without_bounce(self):
        if not os.access(POSTFIX, os.X_OK):
            self.fail("postfix is not installed (.ci/setup test installs it)")
        p = self.proxy()
        pf = self.track(PostfixClient(p.port))
        pf.sendmail("a@client.postfix.test", "u@" + DOMAIN,
                    b"Subject: postfix\r\n\r\nmarker-postfix\r\n")
        m = pf.wait_log(r"postfix/smtp\[\d+\]: [0-9A-F]+: to=<u@opensmtpd\.test>, "
                        r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d, .*status=(\w+) (.*)$"
                        % p.port, 20)
        self.assertEqual(m.group(1), "sent", m.group(0))
        self.assertIn("Message accepted for delivery", m.group(2))
        pf.wait_log(r"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:%d|"
                    r"Untrusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:%d"
                    % (p.port, p.port))
        self.assertNotIn("status=bounced", pf.log())
        self.assertNotIn("status=deferred", pf.log())
        sid = p.wait_event(ev="close")["sid"]
        self.local_ehlo(p, sid, "client.postfix.test")
        self.assertStoredOnce(p, b"marker-postfix")


if __name__ == "__main__":
    mxtest.main()
