"""mode = smtp: no credential in any log line, whatever form of AUTH a server accepts; log lines
stay one line for readers that split on Unicode line breaks.

Every AUTH variant (PLAIN with and without initial response, LOGIN with and without, a TAB
after the verb or the mechanism, leading blanks, any case) goes through mxproxy to three
servers: Postfix's real smtpd (a private instance, Cyrus SASL with a sasldb holding one user;
one service without and one with the old "AUTH=" EHLO line), aiosmtpd (python3-aiosmtpd) with
an authenticator that accepts the same user (it refuses a TAB after the verb and leading
blanks, 500, and a mechanism name in lower case, 504: those forms go to the other two only),
and a scripted server that splits command lines at any whitespace as Postfix does. Each
variant is sent in both log formats, with transcript = pairs and full, at levels info and
debug; the AUTH pair and the client's ev=line texts are compared exactly, then every line
mxproxy wrote is searched for the credentials: the user, the password, the PLAIN token (raw and
escaped), each base64 text and its first half.
"""

import base64
import os
import subprocess
import threading
import unittest

import mxtest
from mxtest import HOST

USER = b"mx-redact-user"
PASSWORD = b"Redact-Pa55w0rd"
PLAIN = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
U64, P64 = base64.b64encode(USER), base64.b64encode(PASSWORD)
SECRETS = [USER, PASSWORD, PLAIN, U64, P64, PLAIN[:len(PLAIN) // 2], U64[:8], P64[:8],
           b"\0" + USER + b"\0" + PASSWORD]

# (command line, continuation lines answered to 334s, cmd= of the pair and text= of ev=line)
VARIANTS = [
    (b"AUTH PLAIN " + PLAIN, [], "AUTH PLAIN [redacted]"),
    (b"AUTH PLAIN", [PLAIN], "AUTH PLAIN"),
    (b"AUTH LOGIN", [U64, P64], "AUTH LOGIN"),
    (b"AUTH LOGIN " + U64, [P64], "AUTH LOGIN [redacted]"),
    (b"AUTH PLAIN\t" + PLAIN, [], "AUTH PLAIN [redacted]"),
    (b"auth  PLAIN   " + PLAIN, [], "auth  PLAIN [redacted]"),
    (b"Auth LOGIN\t" + U64, [P64], "Auth LOGIN [redacted]"),
    # aiosmtpd answers these 500 (a TAB after the verb, leading blanks) or 504 (a mechanism
    # name in lower case); a server that tokenizes like Postfix accepts them
    (b"AUTH\tPLAIN " + PLAIN, [], "AUTH\tPLAIN [redacted]"),
    (b" AUTH PLAIN " + PLAIN, [], " AUTH PLAIN [redacted]"),
    (b"AUTH\tLOGIN", [U64, P64], "AUTH\tLOGIN"),
    (b"\t AUTH\tPLAIN", [PLAIN], "\t AUTH\tPLAIN"),
    (b"auth  plain   " + PLAIN, [], "auth  plain [redacted]"),
]
POSTFIX_ONLY = 7  # VARIANTS[7:] are no successful AUTH for aiosmtpd

LOG_SETUPS = [  # (log_format, transcript, log_level)
    ("logfmt", "full", "info"),
    ("logfmt", "pairs", "debug"),
    ("json", "full", "debug"),
    ("json", "pairs", "info"),
]


class AiosmtpdServer:
    """aiosmtpd on 127.0.0.1 with AUTH PLAIN/LOGIN over plaintext; accepts USER/PASSWORD."""

    def __init__(self):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.logins = []
        self.lock = threading.Lock()

        def authenticator(_server, _session, _envelope, mechanism, data):
            ok = data.login == USER and data.password == PASSWORD
            with self.lock:
                self.logins.append((mechanism, ok))
            return AuthResult(success=ok)

        class Handler:
            async def handle_DATA(self, _server, _session, _envelope):
                return "250 OK"

        self.port = mxtest.free_port()
        self.ctl = Controller(Handler(), hostname=HOST, port=self.port,
                              authenticator=authenticator, auth_require_tls=False,
                              server_hostname="aiosmtpd.test", ready_timeout=10.0)
        self.ctl.start()
        self.addr = "%s:%d" % (HOST, self.port)

    def close(self):
        self.ctl.stop()


POSTFIX = "/usr/sbin/postfix"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"


class PostfixSasl(mxtest.PrivatePostfix):
    """A private Postfix instance (as in test_xclient.py) whose smtpd offers AUTH PLAIN LOGIN
    through Cyrus SASL with a sasldb holding USER/PASSWORD. Two smtpd services: .port
    advertises "AUTH PLAIN LOGIN" only, .eqport also the old "AUTH=PLAIN LOGIN" line
    (broken_sasl_auth_clients)."""

    def __init__(self):
        super().__init__(prefix="mxtest-postfix-sasl-", subdirs=("sasl",))
        d = self.dir
        pw = self.postfix_pw
        sasldb = os.path.join(d, "sasl", "sasldb2")
        subprocess.run([SASLPASSWD2, "-f", sasldb, "-c", "-p", "-u", "mx.postfix.test",
                        USER.decode()], input=PASSWORD, check=True, timeout=20,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.chown(sasldb, pw.pw_uid, pw.pw_gid)
        self.write(os.path.join("sasl", "smtpd.conf"),
                   "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
                   "sasldb_path: %s\n" % sasldb)
        self.port, self.eqport = mxtest.free_port(), mxtest.free_port()
        self.write_main_cf("""myhostname = mx.postfix.test
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
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_local_domain = mx.postfix.test
smtpd_sasl_security_options = noanonymous
cyrus_sasl_config_path = {d}/sasl
""".format(d=d))
        self.write_master_cf("""127.0.0.1:{p} inet n - n - - smtpd
127.0.0.1:{e} inet n - n - - smtpd -o broken_sasl_auth_clients=yes
""".format(p=self.port, e=self.eqport))
        self.start((self.port, self.eqport))


def _postfix_unavailable():
    for path in (POSTFIX, SASLPASSWD2):
        if not os.access(path, os.X_OK):
            return "%s is not installed" % path
    if os.geteuid() != 0:
        return "a private postfix instance needs root"
    return None


def read_reply(c):
    r = c.read_reply()
    return int(r[:3]), r


class AuthRedactionTest(mxtest.ProxyTestCase):

    def run_variants(self, addr, variants, log_format, transcript, level, greeting):
        """Sends each variant in its own session; returns the proxy and the list of
        (variant, final reply code, sid)."""
        p = self.start_smtp_proxy(addr, log_format=log_format, transcript=transcript,
                                  glob={"log_level": level})
        done = []
        for line, conts, want_cmd in variants:
            c = self.client(p.port)
            self.assertTrue(c.read_reply().startswith(greeting))
            c.send(b"EHLO client.example\r\n")
            self.assertEqual(read_reply(c)[0], 250)
            c.send(line + b"\r\n")
            code, reply = read_reply(c)
            rest = list(conts)
            while code == 334 and rest:
                c.send(rest.pop(0) + b"\r\n")
                code, reply = read_reply(c)
            self.assertEqual(rest, [], "%r: %r" % (line, reply))
            self.assertEqual(code, 235, "%r: %r" % (line, reply))
            sid = p.sid_of(c)
            self.assertEqual(c.cmd(b"QUIT")[:3], b"221")
            c.close()
            p.close_of(sid)
            done.append(((line, conts, want_cmd), code, sid))
        return p, done

    def check_logs(self, p, done, transcript):
        # Exact pairs: the AUTH pair shows the command up to its mechanism, then [redacted].
        for (line, conts, want_cmd), code, sid in done:
            auth = [e for e in p.find(ev="pair", sid=sid) if "AUTH" in e["cmd"].upper()]
            self.assertEqual([(e["cmd"], str(e["code"])) for e in auth], [(want_cmd, str(code))],
                             repr(line))
            self.assertEqual(str(auth[0].get("rounds", 0)), str(len(conts)), repr(line))
            if transcript == "full":
                client = [e["text"] for e in p.find(ev="line", sid=sid) if e["dir"] == "client"]
                self.assertEqual(client, ["EHLO client.example", want_cmd]
                                 + ["[redacted]"] * len(conts) + ["QUIT"], repr(line))
        # No credential in any form in any line mxproxy wrote.
        p.stop()
        text = "\n".join(p.raw)
        for s in SECRETS:
            for form in (s.decode("latin-1"), s.decode("latin-1").replace("\0", "\\x00"),
                         s.decode("latin-1").replace("\0", "\\u0000")):
                self.assertNotIn(form, text, "credential %r in the log" % s)

    def test_aiosmtpd_every_variant_every_log_format(self):
        srv = self.track(AiosmtpdServer())
        for fmt, transcript, level in LOG_SETUPS:
            with self.subTest(fmt=fmt, transcript=transcript, level=level):
                p, done = self.run_variants(srv.addr, VARIANTS[:POSTFIX_ONLY], fmt, transcript,
                                            level, b"220 aiosmtpd.test")
                self.check_logs(p, done, transcript)
        # every exchange reached aiosmtpd's authenticator with the right credentials
        self.assertEqual(len(srv.logins), POSTFIX_ONLY * len(LOG_SETUPS))
        self.assertTrue(all(ok for _, ok in srv.logins), srv.logins)

    def test_aiosmtpd_refuses_the_tab_forms(self):
        # What aiosmtpd does with the forms only a Postfix-like tokenizer accepts: 500, and
        # the line is still logged without its credential.
        srv = self.track(AiosmtpdServer())
        p = self.start_smtp_proxy(srv.addr, transcript="full")
        c = self.client(p.port)
        c.read_reply()
        c.cmd(b"EHLO client.example")
        for line, _conts, want_cmd in VARIANTS[POSTFIX_ONLY:]:
            self.assertIn(c.cmd(line)[:3], (b"500", b"504"), repr(line))
        sid = p.sid_of(c)
        c.cmd(b"QUIT")
        p.close_of(sid)
        cmds = [e["cmd"] for e in p.find(ev="pair", sid=sid)][2:-1]
        self.assertEqual(cmds, [v[2] for v in VARIANTS[POSTFIX_ONLY:]])
        p.stop()
        for s in SECRETS:
            self.assertNotIn(s.decode("latin-1"), "\n".join(p.raw))

    @unittest.skipIf(_postfix_unavailable(), _postfix_unavailable())
    def test_postfix_smtpd_every_variant_every_log_format(self):
        pf = self.track(PostfixSasl())
        for port, auth_eq in ((pf.port, False), (pf.eqport, True)):
            # The EHLO reply with and without the old "AUTH=" line.
            c = self.client(port)
            c.read_reply()
            ehlo = c.cmd(b"EHLO client.example")
            self.assertIn(b"250-AUTH PLAIN LOGIN\r\n", ehlo)
            self.assertEqual(b"AUTH=PLAIN LOGIN\r\n" in ehlo, auth_eq, ehlo)
            c.close()
            for fmt, transcript, level in LOG_SETUPS:
                with self.subTest(auth_eq=auth_eq, fmt=fmt, transcript=transcript, level=level):
                    p, done = self.run_variants("%s:%d" % (HOST, port), VARIANTS, fmt,
                                                transcript, level, b"220 mx.postfix.test ESMTP")
                    self.check_logs(p, done, transcript)
        # smtpd's own log: every session authenticated, none failed
        log = pf.log()
        self.assertEqual(log.count(" ehlo=1 auth=1 quit=1 commands=3"),
                         2 * len(LOG_SETUPS) * len(VARIANTS), log[-3000:])
        self.assertNotIn("authentication failed", log)

    @unittest.skipIf(_postfix_unavailable(), _postfix_unavailable())
    def test_response_sent_behind_a_refused_auth(self):
        """A client that sends its SASL response behind AUTH without waiting for 334, refused
        by Postfix's smtpd (a mechanism it does not offer) or by mxproxy (require_tls): the
        response line reaches the server, which answers it, and is logged [redacted]."""
        pf = self.track(PostfixSasl())
        pki = mxtest.pki()
        for opts, auth_code in (({}, b"535"),
                                ({"client_tls": "starttls", "require_tls": "on",
                                  "cert": pki.mx.cert, "key": pki.mx.key}, b"530")):
            for transcript in ("pairs", "full"):
                with self.subTest(opts=sorted(opts), transcript=transcript):
                    p = self.start_smtp_proxy("%s:%d" % (HOST, pf.port), transcript=transcript,
                                              **opts)
                    c = self.client(p.port)
                    c.read_reply()
                    c.cmd(b"EHLO client.example")
                    c.send(b"AUTH CRAM-MD5\r\n" + PLAIN + b"\r\nQUIT\r\n")
                    replies = [read_reply(c)[0] for _ in range(3)]
                    self.assertEqual([str(r)[:3] for r in replies],
                                     [auth_code.decode(), "500", "221"])
                    sid = p.sid_of(c)
                    p.close_of(sid)
                    pairs = [(e["cmd"], str(e["code"])) for e in p.find(ev="pair", sid=sid)]
                    self.assertEqual(pairs[2:], [("AUTH CRAM-MD5", auth_code.decode()),
                                                 ("[redacted]", "500"), ("QUIT", "221")])
                    if transcript == "full":
                        client = [e["text"] for e in p.find(ev="line", sid=sid)
                                  if e["dir"] == "client"]
                        self.assertEqual(client, ["EHLO client.example", "AUTH CRAM-MD5",
                                                  "[redacted]", "QUIT"])
                    p.stop()
                    for sec in SECRETS:
                        self.assertNotIn(sec.decode("latin-1"), "\n".join(p.raw))

    def test_postfix_like_tokenizer_every_variant_every_log_format(self):
        b = self.scripted("postfixlike")
        for fmt, transcript, level in LOG_SETUPS:
            with self.subTest(fmt=fmt, transcript=transcript, level=level):
                p, done = self.run_variants(b.addr, VARIANTS, fmt, transcript, level,
                                            b"220 postfixlike ESMTP")
                self.check_logs(p, done, transcript)
        # the server got every credential line byte for byte
        got = [line for rec in b.conns for line in rec.auth_lines]
        want = [line for _ in LOG_SETUPS for _l, conts, _c in VARIANTS for line in conts]
        self.assertEqual(got, want)


class UnicodeLineBreaksTest(mxtest.ProxyTestCase):
    """U+0085, the other C1 controls and U+2028/U+2029 in a client line are written as \\u
    escapes: str.splitlines() keeps every log line one line, and the value reads back."""

    TEXT = "NOOP a\u0085b\u2028c\u2029d\u0080e\u009ff"

    def test_client_line_with_unicode_breaks(self):
        for fmt in ("logfmt", "json"):
            with self.subTest(fmt=fmt):
                b = self.scripted()
                p = self.start_smtp_proxy(b.addr, log_format=fmt, transcript="full")
                c = self.client(p.port)
                c.read_reply()
                self.assertEqual(c.cmd(self.TEXT.encode()), b"250 2.0.0 ok\r\n")
                sid = p.sid_of(c)
                c.cmd(b"QUIT")
                p.close_of(sid)
                p.stop()
                for raw in p.raw:
                    self.assertEqual(len(raw.splitlines()), 1 if raw else 0, repr(raw))
                self.assertIn("\\u0085", "\n".join(p.raw))
                lines = [e["text"] for e in p.find(ev="line", sid=sid) if e["dir"] == "client"]
                self.assertEqual(lines, [self.TEXT, "QUIT"])
                pairs = [e["cmd"] for e in p.find(ev="pair", sid=sid)]
                self.assertEqual(pairs, ["<greeting>", self.TEXT, "QUIT"])


if __name__ == "__main__":
    mxtest.main()
