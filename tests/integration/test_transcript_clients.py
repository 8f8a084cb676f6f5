"""transcript_clients = CIDR[, CIDR...]: one sender's sessions with a full transcript.

A listener logging `transcript = pairs` (or off) logs `ev=line` records for sessions
whose real client lies in one of the blocks, as `transcript = full` would, and keeps
its own setting for everyone else. The real client is the one a PROXY header names.
SIGHUP changes the blocks for new sessions; an open session keeps what it started with.
"""

import subprocess

import mxtest
from mxtest import HOST, Client, config, free_port, listener

OTHER = "127.0.0.2"  # a second loopback source address: the client under watch
SESSION = [b"EHLO client.example", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>",
           b"QUIT"]


class TranscriptClientsTest(mxtest.ProxyTestCase):

    def start(self, sink, **opts):
        port = free_port()
        opts.setdefault("mode", "smtp")
        text = config(listener("smtp", "%s:%d" % (HOST, port), sink.addr, **opts))
        p = self.start_proxy(text)
        p.port = port
        return p, text

    def session(self, p, source=HOST, proxy_line=None):
        """One SMTP session from source; returns its sid once it closed."""
        c = self.track(Client(p.port, source=source))
        if proxy_line is not None:
            c.send(proxy_line)
        sid = p.wait_event(ev="open", client="%s:%d" % (source, c.local_port))["sid"]
        self.assertTrue(c.read_reply().startswith(b"220 "))
        for line in SESSION:
            c.cmd(line)
        self.assertEqual(c.wait_closed(3)[0], "eof")
        self.assertEqual(p.close_of(sid)["end"], "quit")
        return sid

    def lines(self, p, sid):
        return [(e["dir"], e["text"]) for e in p.find(ev="line", sid=sid)]

    def assertFull(self, p, sid):
        got = self.lines(p, sid)
        self.assertEqual([t for d, t in got if d == "client"],
                         [l.decode() for l in SESSION])
        self.assertEqual(got[0], ("server", "220 smtp-sink ESMTP"))
        # The pairs are still there: full adds lines, it takes nothing away.
        self.assertEqual(len(p.find(ev="pair", sid=sid)), 5)

    def test_only_the_watched_client_gets_lines(self):
        sink = self.track(mxtest.SmtpSink())
        p, _ = self.start(sink, transcript="pairs", transcript_clients="%s/32" % OTHER)
        watched = self.session(p, source=OTHER)
        other = self.session(p)
        self.assertFull(p, watched)
        self.assertEqual(self.lines(p, other), [])
        self.assertEqual(len(p.find(ev="pair", sid=other)), 5)

    def test_with_transcript_off_and_several_blocks(self):
        sink = self.track(mxtest.SmtpSink())
        p, _ = self.start(sink, transcript="off",
                          transcript_clients=["10.0.0.0/8, 2001:db8::/32", "%s" % OTHER])
        watched = self.session(p, source=OTHER)
        other = self.session(p)
        self.assertFull(p, watched)
        self.assertEqual(p.find(sid=other, ev="pair") + p.find(sid=other, ev="line"), [])

    def test_the_client_a_proxy_header_names(self):
        sink = self.track(mxtest.SmtpSink())
        p, _ = self.start(sink, accept_proxy_protocol="on", transcript="pairs",
                          transcript_clients="192.0.2.0/24")
        sid = self.session(p, proxy_line=b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        self.assertFull(p, sid)
        # The peer (127.0.0.1) itself is not watched.
        p2, _ = self.start(sink, accept_proxy_protocol="on", transcript="pairs",
                           transcript_clients="127.0.0.1")
        sid = self.session(p2, proxy_line=b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        self.assertEqual(self.lines(p2, sid), [])

    def test_reload_applies_to_new_sessions(self):
        sink = self.track(mxtest.SmtpSink())
        p, text = self.start(sink, transcript="pairs")
        c = self.track(Client(p.port))
        old = p.sid_of(c)
        self.assertTrue(c.read_reply().startswith(b"220 "))
        m = p.reload(text.replace("transcript = pairs",
                                  "transcript = pairs\ntranscript_clients = 127.0.0.0/8"))
        p.wait_event(start=m, ev="reload")
        new = self.session(p)
        self.assertFull(p, new)
        for line in SESSION:  # the session open across the reload keeps pairs only
            c.cmd(line)
        p.close_of(old)
        self.assertEqual(self.lines(p, old), [])

    def test_config_errors(self):
        path = "%s/t.ini" % self.tmpdir
        for opts, err in (
                ({"mode": "smtp", "transcript_clients": "10.0.0.1/8"},
                 "t.ini:%d: invalid value '10.0.0.1/8' for 'transcript_clients': host bits set "
                 "past the prefix length"),
                ({"mode": "tcp", "transcript_clients": "10.0.0.0/8"},
                 "t.ini:%d: 'transcript_clients' needs mode = smtp, imap or pop3 in "
                 "[listener x]")):
            text = config(listener("x", "%s:%d" % (HOST, free_port()), "127.0.0.1:25", **opts))
            with open(path, "w") as f:
                f.write(text)
            err = err % (1 + text.splitlines().index("transcript_clients = 10.0.0.%s/8"
                                                       % ("1" if "host" in err else "0")))
            r = subprocess.run([mxtest.binary(), "-t", "-c", path], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=10)
            self.assertEqual(r.returncode, 1)
            self.assertIn(path.replace("t.ini", "") + err, r.stderr.decode())


if __name__ == "__main__":
    mxtest.main()
