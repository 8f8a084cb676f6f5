#!/usr/bin/env python3
"""xclient = on against Postfix's real smtpd, and a client's own XCLIENT.

The test runs a private Postfix instance (its own main.cf, master.cf, queue
and log file in a temporary directory, `postfix -c DIR start-fg`) with two
smtpd services on 127.0.0.1:
  - xclient: smtpd_authorized_xclient_hosts (and _xforward_hosts) =
    127.0.0.1, mxproxy's address;
  - plain:   no XCLIENT authorization.
mynetworks holds only 127.0.0.1 and relaying needs mynetworks
(reject_unauth_destination), so a client smtpd mistakes for mxproxy may
relay anywhere. The client connects from 127.0.0.2, so smtpd's log tells
mxproxy's address (127.0.0.1) from the client's, and a direct connection
from 127.0.0.2 shows byte for byte what smtpd says to that client.
header_checks log every Received: header smtpd writes into a message.

Whatever the client sends first (EHLO with a whole transaction pipelined
behind it, HELO, MAIL without a greeting), mxproxy identifies it before
smtpd acts on it, and fails closed (421 4.7.0, ev=xclient_error) when it
cannot. A client's own XCLIENT and XFORWARD are answered 550 by mxproxy
and removed from the EHLO replies it sees (pass_client_xclient = off).
Scripted backends cover refusals, QUIT first, a backend that speaks late,
own replies far over 4 KiB (never forwarded) and backend_tls = starttls
with xclient = on.
"""

import base64
import os
import re
import select
import smtplib
import socket
import ssl
import time
import unittest

import mxtest
from mxtest import Client, ProxyTestCase, ScriptedSmtpBackend, TlsSmtpBackend, free_port

POSTFIX = "/usr/sbin/postfix"
CLIENT_IP = "127.0.0.2"
GREETING = b"220 mx.postfix.test ESMTP\r\n"
XCLIENT_421 = b"421 4.7.0 mxproxy: XCLIENT with the mail server failed, try again later\r\n"
RELAY_DENIED = b"554 5.7.1 <victim@foreign.example>: Relay access denied\r\n"
REFUSED = b"550 5.7.0 Command not permitted\r\n"
TLS_421 = b"421 4.7.0 mxproxy: TLS with the mail server failed, try again later\r\n"


class Postfix(mxtest.PrivatePostfix):
    """A private Postfix instance; .xport and .plainport are its smtpd ports,
    .tlsport the xclient one with STARTTLS (pair: a CertPair), .nameport one
    that looks up client names and refuses 'localhost', 127.0.0.1's name."""

    def __init__(self, pair):
        super().__init__()
        d = self.dir
        self.xport, self.plainport, self.tlsport = free_port(), free_port(), free_port()
        self.nameport = free_port()
        self.write_main_cf("""myhostname = mx.postfix.test
mydomain = postfix.test
mydestination = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
header_checks = regexp:{d}/header_checks
local_recipient_maps =
alias_maps =
alias_database =
default_transport = discard
local_transport = discard
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
smtpd_authorized_xclient_hosts = 127.0.0.1
smtpd_authorized_xforward_hosts = 127.0.0.1
""".format(d=d))
        self.write("header_checks", "/^Received:/ WARN\n")
        self.write("names", "/^localhost$/ REJECT the name of mxproxy's address\n")
        self.write_master_cf("""127.0.0.1:{x} inet n - n - - smtpd
127.0.0.1:{p} inet n - n - - smtpd -o smtpd_authorized_xclient_hosts=
  -o smtpd_authorized_xforward_hosts=
127.0.0.1:{n} inet n - n - - smtpd -o smtpd_peername_lookup=yes
  -o smtpd_client_restrictions=check_client_access,regexp:{d}/names,check_reverse_client_hostname_access,regexp:{d}/names
127.0.0.1:{t} inet n - n - - smtpd -o smtpd_tls_security_level=may
  -o smtpd_tls_cert_file={cert} -o smtpd_tls_key_file={key} -o smtpd_tls_received_header=yes
  -o smtpd_tls_loglevel=1
tlsmgr    unix - - n 1000? 1 tlsmgr
""".format(x=self.xport, p=self.plainport, t=self.tlsport, n=self.nameport, d=d,
           cert=pair.cert, key=pair.key))
        self.start((self.xport, self.plainport, self.tlsport, self.nameport))


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
        cls.pki = mxtest.pki()
        cls.postfix = Postfix(cls.pki.mx)

    @classmethod
    def tearDownClass(cls):
        cls.postfix.close()

    def client2(self, port):
        return self.track(Client(port, 5.0, source=CLIENT_IP))

    def greeted(self, port, **opts):
        """A proxy with opts to smtpd's port and a client from 127.0.0.2 that read smtpd's
        greeting through it; returns (proxy, client)."""
        p = self.start_smtp_proxy("127.0.0.1:%d" % port, **opts)
        c = self.client2(p.port)
        self.assertEqual(c.read_reply(), GREETING)
        return p, c

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

        p, c = self.greeted(pf.xport, xclient="on", transcript="full")
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

        # mxproxy's own lines; the client's EHLO went on after them, logged once as dir=client
        proxy_lines = [e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")]
        self.assertEqual(proxy_lines, [
            "EHLO client.example.test",
            "XCLIENT ADDR=127.0.0.2 PORT=%d PROTO=ESMTP HELO=client.example.test "
            "NAME=[UNAVAILABLE] DESTADDR=127.0.0.1 DESTPORT=%d REVERSE_NAME=[UNAVAILABLE]"
            % (c.local_port, p.port)])
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="client")][:1],
                         ["EHLO client.example.test"])
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

    def test_not_offered_fails_closed(self):
        """smtpd does not offer XCLIENT to mxproxy: the client gets 421 4.7.0
        and smtpd never sees a command of the client's."""
        pf = self.postfix
        p, c = self.greeted(pf.plainport, xclient="on", transcript="full")
        self.assertEqual(c.cmd(b"EHLO client.example.test"), XCLIENT_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["primary_error"]),
                         ("xclient_error", XCLIENT_421.decode().rstrip("\r\n")), close["_raw"])
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")],
                         ["EHLO client.example.test", XCLIENT_421.decode().rstrip("\r\n")])
        err = p.find(ev="xclient_error", sid=sid)
        self.assertEqual(len(err), 1, p.tail())
        self.assertEvent(err[0], "xclient_error", {"reason": "backend does not offer XCLIENT"},
                         lvl="warn")
        self.assertEqual(p.find(ev="xclient"), [])

    def test_xclient_off_smtpd_sees_mxproxy(self):
        pf = self.postfix
        p, c = self.greeted(pf.xport, transcript="full")
        ehlo = c.cmd(b"EHLO client.example.test")
        # smtpd offers XCLIENT and XFORWARD to mxproxy's address; the client never sees them
        self.assertNotIn(b"XCLIENT", ehlo)
        self.assertNotIn(b"XFORWARD", ehlo)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        p.close_of(sid)
        self.assertEqual(p.find(ev="line", sid=sid, dir="proxy"), [])

    def test_pass_client_xclient_on_is_a_trusted_chain(self):
        pf = self.postfix
        p, c = self.greeted(pf.xport, pass_client_xclient="on")
        ehlo = c.cmd(b"EHLO client.example.test")
        self.assertIn(b"\r\n250-XCLIENT ", ehlo)
        self.assertIn(b"\r\n250-XFORWARD ", ehlo)
        self.assertEqual(c.cmd(b"XCLIENT ADDR=192.0.2.7"), GREETING)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        pf.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[192\.0\.2\.7\]")

    def test_backend_starttls_and_xclient_with_smtpd(self):
        """backend_tls = starttls and xclient = on: smtpd gets mxproxy's EHLO,
        STARTTLS, EHLO inside TLS, XCLIENT, then the client's HELO; it logs
        the TLS connection from mxproxy and the message from the client."""
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.tlsport, xclient="on",
                                  backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test", transcript="full")
        c = self.message_session(p, b"HELO client.example.test\r\n"
                                 b"MAIL FROM:<a@client.example.test>\r\n")
        queue_id = self.finish_message(c, p, [b"250 mx.postfix.test\r\n", b"250 2.1.0 Ok\r\n"])
        sid = self.assert_identified(p, c, queue_id)
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")], [
            "EHLO client.example.test", "STARTTLS", "EHLO client.example.test",
            "XCLIENT ADDR=127.0.0.2 PORT=%d PROTO=SMTP HELO=client.example.test "
            "NAME=[UNAVAILABLE] DESTADDR=127.0.0.1 DESTPORT=%d REVERSE_NAME=[UNAVAILABLE]"
            % (c.local_port, p.port)])
        pf.wait_log(r"postfix/smtpd\[\d+\]: Anonymous TLS connection established from "
                    r"unknown\[127\.0\.0\.1\]:\d+: TLSv1\.3")
        pf.wait_log(r"postfix/cleanup\[\d+\]: %s: warning: header Received: from \S+ "
                    r"\(unknown \[127\.0\.0\.2\]\)\W+\(using TLSv1\.3" % queue_id)  # folded
        tls = p.find(ev="tls", sid=sid)
        self.assertEqual([e["side"] for e in tls], ["backend"], p.tail())

    def test_names_of_mxproxy_do_not_stay_with_the_client(self):
        """smtpd looks up client names: without NAME and REVERSE_NAME in
        XCLIENT it would keep 'localhost', mxproxy's, for the client."""
        pf = self.postfix
        if not re.search(r"^127\.0\.0\.1\s+localhost\b", open("/etc/hosts").read(), re.M):
            self.skipTest("127.0.0.1 is not 'localhost' in /etc/hosts")
        p, c = self.greeted(pf.nameport, xclient="on")
        self.assertNotIn(b"XCLIENT", c.cmd(b"EHLO client.example.test"))
        self.assertEqual(c.cmd(b"MAIL FROM:<a@client.example.test>"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(c.cmd(b"RCPT TO:<u@mx.postfix.test>"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        pf.wait_log(r"postfix/smtpd\[\d+\]: connect from localhost\[127\.0\.0\.1\]:\d+$")
        pf.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.2\]:%d "
                    % c.local_port)

    # -- whatever the client sends first, smtpd knows who it is -------------

    def message_session(self, p, first):
        """A session whose first write is `first`, then RCPT to a foreign
        domain (refused), RCPT to a local one, a message and QUIT; returns
        (client, queue id)."""
        c = self.client2(p.port)
        self.assertEqual(c.read_reply(), GREETING)
        c.send(first)
        return c

    def finish_message(self, c, p, pre_replies):
        """pre_replies: the replies `first` gets, in order."""
        for want in pre_replies:
            self.assertEqual(c.read_reply(10), want)
        self.assertEqual(c.cmd(b"RCPT TO:<victim@foreign.example>"), RELAY_DENIED)
        self.assertEqual(c.cmd(b"RCPT TO:<u@mx.postfix.test>"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(c.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        reply = c.cmd(b"Subject: first\r\n\r\nhello\r\n.", timeout=10)
        m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", reply)
        self.assertIsNotNone(m, reply)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        return m.group(1).decode()

    def assert_identified(self, p, c, queue_id):
        pf = self.postfix
        pf.wait_log(r"postfix/smtpd\[\d+\]: NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]:%d:"
                    r" 554 5\.7\.1 <victim@foreign\.example>: Relay access denied"
                    % c.local_port)
        pf.wait_log(r"postfix/smtpd\[\d+\]: %s: client=unknown\[127\.0\.0\.2\]:%d$"
                    % (queue_id, c.local_port))
        # the Received: header smtpd wrote into the message names the client
        pf.wait_log(r"postfix/cleanup\[\d+\]: %s: warning: header Received: from \S+ "
                    r"\(unknown \[127\.0\.0\.2\]\)" % queue_id)
        sid = p.wait_event(ev="open", client="%s:%d" % (CLIENT_IP, c.local_port))["sid"]
        self.assertEqual(p.close_of(sid)["end"], "quit")
        self.assertEqual(len(p.find(ev="xclient", sid=sid, code="220")), 1, p.tail())
        self.assertEqual(p.find(ev="xclient_error"), [])
        return sid

    def test_pipelined_ehlo_mail_rcpt_data_in_one_write(self):
        pf = self.postfix
        _, ehlo = self.direct_transcript(pf.xport, b"client.example.test")
        p, c = self.greeted(pf.xport, xclient="on")
        c.send(b"EHLO client.example.test\r\nMAIL FROM:<a@client.example.test>\r\n"
               b"RCPT TO:<victim@foreign.example>\r\nRCPT TO:<u@mx.postfix.test>\r\nDATA\r\n")
        want = (ehlo + b"250 2.1.0 Ok\r\n" + RELAY_DENIED + b"250 2.1.5 Ok\r\n"
                + b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(c.recv_exact(len(want), 10), want)
        c.assert_open(0.2)
        reply = c.cmd(b"Subject: pipelined\r\n\r\nhello\r\n.", timeout=10)
        m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", reply)
        self.assertIsNotNone(m, reply)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        sid = self.assert_identified(p, c, m.group(1).decode())
        self.assertEqual([(e["cmd"], e["code"], e["pipelined"]) for e in p.find(ev="pair", sid=sid)],
                         [("<greeting>", "220", "0"), ("EHLO client.example.test", "250", "0"),
                          ("MAIL FROM:<a@client.example.test>", "250", "1"),
                          ("RCPT TO:<victim@foreign.example>", "554", "1"),
                          ("RCPT TO:<u@mx.postfix.test>", "250", "1"), ("DATA", "354", "1"),
                          (".", "250", "0"), ("QUIT", "221", "0")])

    def test_helo_is_relayed_as_helo_after_xclient(self):
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, xclient="on", transcript="full")
        c = self.message_session(p, b"HELO client.example.test\r\n"
                                 b"MAIL FROM:<a@client.example.test>\r\n")
        queue_id = self.finish_message(c, p, [b"250 mx.postfix.test\r\n", b"250 2.1.0 Ok\r\n"])
        sid = self.assert_identified(p, c, queue_id)
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")], [
            "EHLO client.example.test",
            "XCLIENT ADDR=127.0.0.2 PORT=%d PROTO=SMTP HELO=client.example.test "
            "NAME=[UNAVAILABLE] DESTADDR=127.0.0.1 DESTPORT=%d REVERSE_NAME=[UNAVAILABLE]"
            % (c.local_port, p.port)])
        # the client's HELO as HELO; the EHLO is mxproxy's, before XCLIENT
        pf.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.2\]:%d "
                    r"helo=1 ehlo=1 .*mail=1 rcpt=1/2 data=1 quit=1 " % c.local_port)

    def test_mail_without_greeting(self):
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, xclient="on", transcript="full")
        c = self.message_session(p, b"MAIL FROM:<a@client.example.test>\r\n")
        queue_id = self.finish_message(c, p, [b"250 2.1.0 Ok\r\n"])
        sid = self.assert_identified(p, c, queue_id)
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")], [
            "EHLO mxproxy",
            "XCLIENT ADDR=127.0.0.2 PORT=%d HELO=[UNAVAILABLE] NAME=[UNAVAILABLE] "
            "DESTADDR=127.0.0.1 DESTPORT=%d REVERSE_NAME=[UNAVAILABLE]"
            % (c.local_port, p.port)])

    def test_spoofed_client_xclient_and_xforward_never_reach_smtpd(self):
        pf = self.postfix
        p = self.start_smtp_proxy("127.0.0.1:%d" % pf.xport, xclient="on")
        c = self.message_session(p, b"EHLO client.example.test\r\n"
                                 b"XCLIENT ADDR=192.0.2.66 NAME=spoof.example\r\n"
                                 b"XFORWARD ADDR=192.0.2.67 NAME=spoof.example\r\n"
                                 b"MAIL FROM:<a@client.example.test>\r\n")
        ehlo = c.read_reply()
        self.assertNotIn(b"XCLIENT", ehlo)
        queue_id = self.finish_message(c, p, [REFUSED, REFUSED, b"250 2.1.0 Ok\r\n"])
        sid = self.assert_identified(p, c, queue_id)
        self.assertNotIn("192.0.2.6", pf.log())
        self.assertNotIn("spoof.example", pf.log())
        pairs = [e for e in p.find(ev="pair", sid=sid) if e["cmd"].startswith("X")]
        self.assertEqual(len(pairs), 2, p.tail())
        self.assertEvent(pairs[0], "pair", mxtest.pair(
            "XCLIENT ADDR=192.0.2.66 NAME=spoof.example", 550, "Command not permitted",
            esc="5.7.0", pipelined=1, local=1))
        self.assertEvent(pairs[1], "pair", mxtest.pair(
            "XFORWARD ADDR=192.0.2.67 NAME=spoof.example", 550, "Command not permitted",
            esc="5.7.0", pipelined=1, local=1))


# --------------------------------------------------------------------------
# Scripted backends: refusals, QUIT first, late greetings, large own replies,
# backend STARTTLS together with XCLIENT. No Postfix needed.

XEXT = ("PIPELINING", "XCLIENT NAME ADDR PORT PROTO HELO DESTADDR DESTPORT", "8BITMIME",
        "XFORWARD NAME ADDR PROTO HELO", "SIZE 1000")
# What the client must see of the EHLO reply with XEXT: XCLIENT and XFORWARD gone.
XEHLO = (b"250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n")
EHLO = b"EHLO client.example"


def big_ehlo(name, size, exts):
    """An EHLO reply of about size bytes: padding lines, then exts."""
    lines = [name]
    i = 0
    while sum(len(l) + 6 for l in lines) < size:
        lines.append("X-PAD-%04d %s" % (i, "p" * 90))
        i += 1
    lines.append("X-LONG " + "l" * 5000)  # longer than any line mxproxy reads
    lines += list(exts)
    return b"".join(b"250-%s\r\n" % l.encode() for l in lines[:-1]) + \
        b"250 %s\r\n" % lines[-1].encode()


def first_ehlo_then_default(reply):
    """A rule: the first EHLO of a connection gets reply, later ones the default."""
    def rule(backend, rec, line):
        if not getattr(rec, "ehlo_seen", False):
            rec.ehlo_seen = True
            backend.send(rec, reply)
            return None
        return backend.default(backend, rec, line)
    return rule


class LateGreeting(ScriptedSmtpBackend):
    """Greets 0.3 s after the connect; rec.early: bytes had arrived before."""

    def handle(self, rec):
        time.sleep(0.3)
        r, _, _ = select.select([rec.sock], [], [], 0)
        rec.early = bool(r)
        super().handle(rec)


class XclientScriptedTest(ProxyTestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = mxtest.pki()

    def xclient_line(self, c, p, helo="client.example", proto="ESMTP"):
        return ("XCLIENT ADDR=127.0.0.1 PORT=%d PROTO=%s HELO=%s NAME=[UNAVAILABLE] "
                "DESTADDR=127.0.0.1 DESTPORT=%d" % (c.local_port, proto, helo, p.port)).encode()

    def assert_failed(self, p, c, reason, **fields):
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="xclient_error", sid=sid)
        self.assertEqual(len(err), 1, p.tail())
        self.assertEvent(err[0], "xclient_error", dict(reason=reason, **fields), lvl="warn")
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["primary_error"]),
                         ("xclient_error", XCLIENT_421.decode().rstrip("\r\n")), close["_raw"])
        self.assertEqual(p.find(ev="xclient"), [])

    def test_client_xclient_and_xforward_refused_without_xclient(self):
        """xclient = off: a client's XCLIENT and XFORWARD, pipelined behind
        EHLO, get 550 from mxproxy in order, the MAIL behind them still
        flows, and the EHLO reply loses both keywords, byte for byte."""
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(EHLO + b"\r\nXCLIENT ADDR=192.0.2.1\r\nxforward ADDR=192.0.2.2\r\n"
               b"MAIL FROM:<a@example.com>\r\n")
        want = XEHLO + REFUSED + REFUSED + b"250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"XCLIENT NAME=x"), REFUSED)  # alone, too
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"MAIL FROM:<a@example.com>", b"QUIT"])
        sid = p.sid_of(c)
        close = p.close_of(sid)
        self.assertNotIn("primary_error", close)
        local = [(e["cmd"], e["code"], e.get("local")) for e in p.find(ev="pair", sid=sid)
                 if e["cmd"][:1] in ("X", "x")]
        self.assertEqual(local, [("XCLIENT ADDR=192.0.2.1", "550", "1"),
                                 ("xforward ADDR=192.0.2.2", "550", "1"),
                                 ("XCLIENT NAME=x", "550", "1")])

    def test_backend_refuses_xclient(self):
        b = self.scripted(ext=XEXT, rules=[(b"XCLIENT", b"550 5.7.0 not authorized\r\n")])
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(EHLO + b"\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(c.read_reply(), XCLIENT_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, self.xclient_line(c, p)])
        self.assert_failed(p, c, "backend refused XCLIENT", code=550, reply="not authorized")

    def test_backend_refuses_ehlo(self):
        b = self.scripted(ext=XEXT, rules=[(b"EHLO", b"502 5.5.2 no EHLO here\r\n")])
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"HELO client.example"), XCLIENT_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO])
        self.assert_failed(p, c, "backend refused EHLO", code=502, reply="no EHLO here")

    def test_xclient_without_addr_is_not_enough(self):
        b = self.scripted(ext=("PIPELINING", "XCLIENT NAME HELO"))
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"NOOP"), XCLIENT_421)
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [b"EHLO mxproxy"])
        self.assert_failed(p, c, "backend does not offer XCLIENT")

    def test_quit_first_is_relayed_and_nothing_follows_it(self):
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(b"QUIT\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
               b"BDAT 10 LAST\r\nRSET\r\nNOOP\r\n")  # the chunk looks like commands
        self.assertEqual(c.read_reply(), b"221 2.0.0 Bye\r\n")
        # as without xclient: the backend closed after QUIT, the MAIL gets a 421
        self.assertEqual(c.wait_closed(3),
                         ("eof", b"421 4.4.2 mxproxy: backend closed the connection\r\n"))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [b"QUIT"])
        self.assertEqual(bytes(rec.received), b"QUIT\r\n")
        self.assertEqual(p.close_of(p.sid_of(c))["end"], "quit")

    def test_client_speaks_before_the_greeting(self):
        """mxproxy's EHLO waits for the backend's greeting, which goes to
        the client as it is."""
        b = self.track(LateGreeting("scripted", ext=XEXT))
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        c.send(EHLO + b"\r\nMAIL FROM:<a@example.com>\r\n")
        want = b"220 scripted ESMTP\r\n" + XEHLO + b"250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertFalse(rec.early)
        self.assertEqual(rec.commands, [EHLO, self.xclient_line(c, p), EHLO,
                                        b"MAIL FROM:<a@example.com>", b"QUIT"])

    def test_long_helo_name_takes_two_xclient_commands(self):
        """A HELO name too long to share a line goes in a second XCLIENT,
        whole (not the 200 bytes the close line keeps); each 220 is absorbed."""
        name = b"h" * 460 + b".example"
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(b"EHLO " + name + b"\r\nNOOP\r\n")
        want = XEHLO + b"250 2.0.0 ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [
            b"EHLO mxproxy",
            b"XCLIENT ADDR=127.0.0.1 PORT=%d PROTO=ESMTP NAME=[UNAVAILABLE] DESTADDR=127.0.0.1 "
            b"DESTPORT=%d" % (c.local_port, p.port),
            b"XCLIENT HELO=" + name, b"EHLO " + name, b"NOOP", b"QUIT"])
        self.assertEqual(len(p.wait_count(1, ev="xclient", code="220")), 1)

    def test_auth_first_is_relayed_after_xclient_and_never_logged(self):
        secret = base64.b64encode(b"\0user\0s3cr3t-pass")
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr, xclient="on", transcript="full")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"AUTH PLAIN " + secret),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands[2:], [b"AUTH PLAIN " + secret, b"QUIT"])
        sid = p.sid_of(c)
        p.close_of(sid)
        log = "\n".join(p.raw)
        for s in (secret.decode(), "s3cr3t-pass"):
            self.assertNotIn(s, log)
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="client")][:1],
                         ["AUTH PLAIN [redacted]"])

    def test_require_tls_answer_after_xclient_releases_what_follows(self):
        """The commands held during mxproxy's XCLIENT exchange: DATA, refused
        530 by mxproxy once the EHLO is answered, must not strand the NOOP
        pipelined behind it."""
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr, xclient="on", client_tls="starttls", require_tls="on",
                                  cert=self.pki.mx.cert, key=self.pki.mx.key)
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(EHLO + b"\r\nDATA\r\nNOOP\r\n")
        want = (XEHLO.replace(b"250-scripted\r\n", b"250-scripted\r\n250-STARTTLS\r\n") +
                b"530 5.7.0 Must issue a STARTTLS command first\r\n250 2.0.0 ok\r\n")
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, self.xclient_line(c, p), EHLO, b"NOOP", b"QUIT"])

    def test_one_byte_at_a_time(self):
        b = self.scripted(ext=XEXT)
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        for byte in EHLO + b"\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n":
            c.send(bytes([byte]))
            time.sleep(0.001)
        want = XEHLO + b"250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, self.xclient_line(c, p), EHLO,
                                        b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>",
                                        b"QUIT"])

    def test_own_ehlo_reply_of_8k_never_reaches_the_client(self):
        reply = big_ehlo("scripted", 8192, XEXT)
        self.assertGreater(len(reply), 8192 + 5000)
        b = self.scripted(ext=XEXT, rules=[(b"EHLO", first_ehlo_then_default(reply))])
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        c.send(EHLO + b"\r\nMAIL FROM:<a@example.com>\r\n")
        want = XEHLO + b"250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        self.assertEqual(c.received, b"220 scripted ESMTP\r\n" + want + b"221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertEqual(rec.commands[:3], [EHLO, self.xclient_line(c, p), EHLO])

    def test_own_reply_too_long_fails_closed(self):
        reply = big_ehlo("scripted", 70000, XEXT)
        b = self.scripted(ext=XEXT, rules=[(b"EHLO", first_ehlo_then_default(reply))])
        p = self.start_smtp_proxy(b.addr, xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), XCLIENT_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        self.assert_failed(p, c, "backend reply too long")

    # -- backend_tls = starttls ---------------------------------------------

    def tls_backend(self, ext, **kw):
        return self.track(TlsSmtpBackend("realtls", pair=self.pki.mx, tls="starttls",
                                         ready=b"220 2.0.0 realtls says go ahead\r\n",
                                         ext=ext, **kw))

    def test_backend_starttls_own_ehlo_reply_of_8k_never_reaches_the_client(self):
        """The plaintext EHLO reply to mxproxy's own EHLO is 8 KiB: none of it
        reaches the client, which sees one greeting and the EHLO reply from
        inside TLS."""
        exts = ("PIPELINING", "8BITMIME", "STARTTLS")
        reply = big_ehlo("realtls", 8192, exts)
        b = self.tls_backend(exts, rules=[(b"EHLO", first_ehlo_then_default(reply))])
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), b"250-realtls\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        c.assert_open(0.2)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        self.assertEqual(c.received, b"220 realtls ESMTP\r\n250-realtls\r\n250-PIPELINING\r\n"
                         b"250 8BITMIME\r\n221 2.0.0 Bye\r\n")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"STARTTLS", EHLO, b"QUIT"])

    def test_backend_starttls_own_reply_too_long_fails_closed(self):
        exts = ("PIPELINING", "STARTTLS")
        reply = big_ehlo("realtls", 70000, exts)
        b = self.tls_backend(exts, rules=[(b"EHLO", first_ehlo_then_default(reply))])
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), TLS_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        sid = p.sid_of(c)
        err = p.wait_count(1, ev="tls_error", sid=sid)
        self.assertEqual(len(err), 1, p.tail())
        self.assertEvent(err[0], "tls_error", {"side": "backend",
                                               "reason": "backend reply too long"}, lvl="warn")
        self.assertEqual(p.close_of(sid)["end"], "tls_error")
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO])

    def test_backend_starttls_before_any_first_command(self):
        """backend_tls = starttls alone: a NOOP and a MAIL pipelined as the
        first commands go to the backend inside TLS, never in plaintext."""
        exts = ("PIPELINING", "STARTTLS")
        b = self.tls_backend(exts)
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        c.send(b"NOOP\r\nMAIL FROM:<a@example.com>\r\n")
        want = b"250 2.0.0 ok\r\n250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [b"EHLO mxproxy", b"STARTTLS", b"NOOP",
                                        b"MAIL FROM:<a@example.com>", b"QUIT"])
        self.assertEqual(rec.injected, b"")
        self.assertEqual(rec.tls, "TLSv1.3/TLS_AES_256_GCM_SHA384")

    def test_backend_starttls_and_xclient_together(self):
        """EHLO, STARTTLS, handshake, EHLO inside TLS, XCLIENT, then the
        client's HELO: the backend learns who the client is inside TLS."""
        exts = ("PIPELINING", "XCLIENT NAME ADDR PORT PROTO HELO DESTADDR DESTPORT", "STARTTLS",
                "XFORWARD NAME ADDR")
        b = self.tls_backend(exts)
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test", xclient="on",
                                  transcript="full")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        c.send(b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\n")
        want = b"250 realtls\r\n250 2.1.0 sender ok\r\n"
        self.assertEqual(c.recv_exact(len(want)), want)
        self.assertEqual(c.cmd(b"EHLO client.example"),
                         b"250-realtls\r\n250 PIPELINING\r\n")  # XCLIENT, XFORWARD gone
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [
            EHLO, b"STARTTLS", EHLO, self.xclient_line(c, p, proto="SMTP"),
            b"HELO client.example", b"MAIL FROM:<a@example.com>", EHLO, b"QUIT"])
        self.assertEqual(rec.injected, b"")
        self.assertEqual(rec.tls, "TLSv1.3/TLS_AES_256_GCM_SHA384")
        sid = p.sid_of(c)
        self.assertEqual(p.close_of(sid)["end"], "quit")  # every line before it is read
        self.assertEqual([e["text"] for e in p.find(ev="line", sid=sid, dir="proxy")],
                         [EHLO.decode(), "STARTTLS", EHLO.decode(),
                          self.xclient_line(c, p, proto="SMTP").decode()])
        self.assertEqual(len(p.find(ev="xclient", sid=sid, code="220")), 1)

    def test_backend_starttls_and_xclient_not_offered_inside_tls(self):
        """XCLIENT offered in plaintext only: what was offered before TLS no
        longer counts, so the session fails closed."""
        exts = ("PIPELINING", "STARTTLS")

        def ehlo(backend, rec, line):
            if isinstance(rec.sock, ssl.SSLSocket):
                return backend.default(backend, rec, line)
            backend.send(rec, b"250-realtls\r\n250-XCLIENT ADDR PORT\r\n250 STARTTLS\r\n")
            return None
        b = self.tls_backend(exts, rules=[(b"EHLO", ehlo)])
        p = self.start_smtp_proxy(b.addr, backend_tls="starttls", backend_ca=self.pki.ca,
                                  backend_sni="mx.example.test", xclient="on")
        c = self.client(p.port)
        self.assertEqual(c.read_reply(), b"220 realtls ESMTP\r\n")
        self.assertEqual(c.cmd(EHLO), XCLIENT_421)
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertTrue(rec.closed.wait(3))
        self.assertEqual(rec.commands, [EHLO, b"STARTTLS", EHLO])
        self.assert_failed(p, c, "backend does not offer XCLIENT")


if __name__ == "__main__":
    mxtest.main()
