#!/usr/bin/env python3
"""Transparent interception with real kernel rules, in network namespaces.

Each test makes two namespaces joined by a veth pair: "pod" (10.77.0.2, the
mail server on port 25 and mxproxy on 0.0.0.0:15025, with the rules of
k8s/iptables-init.sh) and "cli" (10.77.0.1, the client). The client connects
to the pod's port 25, as it would without mxproxy; the kernel hands the
connection to mxproxy, which connects to the original destination. The
addresses exist only inside these namespaces, which are deleted after each
test, failed or not.
"""

import os
import signal
import smtplib
import socket
import subprocess
import time

import mxtest
from mxtest import MS, SINK_GREETING, UINT, Client, Like, ProxyTestCase, config, listener

POD_IP = "10.77.0.2"
CLI_IP = "10.77.0.1"
PROXY_PORT = 15025
MARK = 77
SCRIPT = os.path.join(mxtest.REPO, "k8s", "iptables-init.sh")
CLI_ADDR = Like(r"10\.77\.0\.1:\d+")

_UNAVAILABLE = None


class PodTestCase(ProxyTestCase):
    """Makes the two namespaces per test; deletes them afterwards."""

    @classmethod
    def setUpClass(cls):
        global _UNAVAILABLE
        _UNAVAILABLE = mxtest.netns_unavailable()

    def setUp(self):
        if _UNAVAILABLE:
            self.skipTest(_UNAVAILABLE)
        super().setUp()
        tag = "%d%d" % (os.getpid() % 100000, int(time.monotonic() * 1000) % 1000)
        self.pod = "mxpod" + tag
        self.cli = "mxcli" + tag
        self._procs = []
        self.addCleanup(self._delete_namespaces)
        for ns in (self.pod, self.cli):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        # The veth pair is created inside the namespaces: nothing appears in
        # the host's own.
        subprocess.run(["ip", "-n", self.pod, "link", "add", "eth0", "type", "veth", "peer",
                        "name", "eth0", "netns", self.cli], check=True, timeout=10)
        for ns, ip in ((self.pod, POD_IP), (self.cli, CLI_IP)):
            for cmd in (["addr", "add", ip + "/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                        ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", ns] + cmd, check=True, timeout=10)

    def tearDown(self):
        for proc in reversed(self._procs):
            mxtest.stop_process(proc, signal.SIGTERM, 5)
        super().tearDown()

    def _delete_namespaces(self):
        for ns in (self.pod, self.cli):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)

    # ---- helpers

    def iptables_init(self, mode, *args, **env):
        e = dict(os.environ, MODE=mode, MX_PROXY_PORT=str(PROXY_PORT), MX_MARK=str(MARK))
        e.update({k: str(v) for k, v in env.items()})
        return mxtest.netns_run(self.pod, "sh", SCRIPT, *args, env=e)

    def rules(self):
        out = ""
        for table in ("nat", "mangle"):
            out += mxtest.netns_run(self.pod, "iptables", "-w", "-t", table, "-S").stdout
        out += mxtest.netns_run(self.pod, "ip", "rule", "show").stdout
        out += mxtest.netns_run(self.pod, "ip", "route", "show", "table", "100",
                                check=False).stdout
        return out

    def start_sink(self):
        """Postfix's smtp-sink on POD_IP:25 in the pod."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.pod, mxtest.SMTP_SINK, "-u", "nobody",
                                 "%s:25" % POD_IP, "100"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self._procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            with mxtest.in_netns(self.pod):
                s = socket.socket()
            s.settimeout(1)
            try:
                s.connect((POD_IP, 25))
                s.close()
                return proc
            except OSError:
                s.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.fail("smtp-sink did not listen on %s:25 in the pod" % POD_IP)
                time.sleep(0.02)

    def start_pod_proxy(self, transparent, **opts):
        opts.setdefault("mode", "smtp")
        opts.setdefault("mark", MARK)
        text = config(listener("intercept", "0.0.0.0:%d" % PROXY_PORT, "original_dst",
                               transparent=transparent, **opts))
        p = mxtest.Proxy(text, self.tmpdir, netns=self.pod)
        self._proxies.append(p)
        p.wait_started()
        return p

    def client_in(self, ns, port, host=POD_IP, timeout=5.0):
        with mxtest.in_netns(ns):
            c = Client(port, timeout, host=host)
        return self.track(c)

    def open_of(self, p, client, ip=CLI_IP):
        return p.wait_event(ev="open", client="%s:%d" % (ip, client.local_port))

    def assertLoop(self, p, c, dst):
        ev = self.open_of(p, c)
        sid = ev["sid"]
        loop = p.wait_event(ev="loop", sid=sid)
        self.assertEvent(loop, "loop", {"listener": "intercept", "dst": dst}, lvl="warn")
        close = p.close_of(sid)
        self.assertEvent(close, "close", {
            "listener": "intercept", "end": "loop", "bytes_up": 0, "bytes_down": 0, "ms": MS,
            "client": "%s:%d" % (CLI_IP, c.local_port),
            "error": "original destination is mxproxy itself", "rcpt_ok": 0, "rcpt_rejected": 0,
            "messages": 0})
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        self.assertEqual(p.find(ev="connect"), [])



class InterceptionTest(PodTestCase):

    # ---- redirect

    def test_redirect_greeting_at_once_and_swaks_transaction(self):
        self.start_sink()
        self.iptables_init("redirect")
        p = self.start_pod_proxy("redirect")
        c = self.client_in(self.cli, 25)
        self.assertEqual(c.recv_until(b"\r\n", 2), SINK_GREETING)
        self.assertLess(time.monotonic() - c.t_connected, 0.2, "greeting through REDIRECT")
        sid = self.open_of(p, c)["sid"]
        self.assertEvent(p.wait_event(ev="connect", sid=sid), "connect",
                         {"backend": "%s:25" % POD_IP, "ms": MS})
        self.assertEqual(c.cmd(b"QUIT"), b"221 Bye\r\n")
        c.close()
        p.close_of(sid)

        r = mxtest.netns_run(self.cli, "swaks", "--server", "%s:25" % POD_IP, "--from",
                             "me@example.test", "--to", "you@example.test", "--helo",
                             "cli.example.test", timeout=30)
        self.assertIn("\n<-  250 2.0.0 Ok\n -> QUIT\n<-  221 Bye\n", r.stdout)
        closes = p.wait_count(2, ev="close")
        self.assertEvent(closes[1], "close", {
            "listener": "intercept", "end": "quit", "bytes_up": UINT, "bytes_down": UINT,
            "ms": MS, "client": CLI_ADDR, "backend": "%s:25" % POD_IP,
            "helo": "cli.example.test", "mail_from": "me@example.test", "rcpt_ok": 1,
            "rcpt_rejected": 0, "messages": 1})

    def test_redirect_smtplib_transaction(self):
        self.start_sink()
        self.iptables_init("redirect")
        p = self.start_pod_proxy("redirect")
        with mxtest.in_netns(self.cli):
            s = smtplib.SMTP(POD_IP, 25, local_hostname="lib.example.test", timeout=5)
        try:
            self.assertEqual(s.sendmail("a@example.test", ["b@example.test", "c@example.test"],
                                        b"Subject: t\r\n\r\nbody\r\n"), {})
            self.assertEqual(s.quit()[0], 221)
        finally:
            s.close()
        close = p.wait_event(ev="close")
        self.assertEqual((close["end"], close["backend"], close["rcpt_ok"], close["messages"]),
                         ("quit", "%s:25" % POD_IP, "2", "1"))

    def test_redirect_direct_connection_to_mxproxy_is_a_loop(self):
        self.start_sink()
        self.iptables_init("redirect")
        p = self.start_pod_proxy("redirect")
        c = self.client_in(self.cli, PROXY_PORT)
        self.assertLoop(p, c, "%s:%d" % (POD_IP, PROXY_PORT))

    def test_redirect_local_traffic_and_the_mark(self):
        """MX_INTERCEPT_OUTPUT=1: a process inside the pod that connects to
        the pod's port 25 goes through mxproxy too; mxproxy's own connection
        carries mark = 77, which the rules exempt, so it reaches the mail
        server instead of mxproxy again."""
        self.start_sink()
        self.iptables_init("redirect", MX_INTERCEPT_OUTPUT=1)
        self.assertIn("-A MXPROXY_OUTPUT -m mark --mark 0x4d -j RETURN", self.rules())
        p = self.start_pod_proxy("redirect")
        c = self.client_in(self.pod, 25)
        self.assertEqual(c.recv_until(b"\r\n", 2), SINK_GREETING)
        sid = self.open_of(p, c, ip=POD_IP)["sid"]
        self.assertEvent(p.wait_event(ev="connect", sid=sid), "connect",
                         {"backend": "%s:25" % POD_IP, "ms": MS})
        self.assertEqual(c.cmd(b"QUIT"), b"221 Bye\r\n")
        c.close()
        p.close_of(sid)
        self.assertEqual(len(p.find(ev="open")), 1, p.tail())

    def test_script_is_idempotent_and_deletes_everything(self):
        before = self.rules()
        self.iptables_init("redirect", MX_INTERCEPT_OUTPUT=1)
        once = self.rules()
        self.assertIn("-A PREROUTING -p tcp -j MXPROXY_REDIRECT", once)
        for port in (25, 465, 587):
            self.assertIn("-A MXPROXY_REDIRECT -p tcp -m tcp --dport %d -j REDIRECT --to-ports %d"
                          % (port, PROXY_PORT), once)
        self.iptables_init("redirect", MX_INTERCEPT_OUTPUT=1)
        self.assertEqual(self.rules(), once)
        self.iptables_init("tproxy")  # switching modes leaves nothing of the other
        tp = self.rules()
        self.assertNotIn("MXPROXY_REDIRECT", tp)
        self.assertIn("-A PREROUTING -p tcp -j MXPROXY_TPROXY", tp)
        self.assertIn("fwmark 0x4d58 lookup 100", tp)
        self.assertIn("local default dev lo", tp)
        self.iptables_init("tproxy")
        self.assertEqual(self.rules(), tp)
        self.iptables_init("tproxy", "--delete")
        self.assertEqual(self.rules(), before)
        r = mxtest.netns_run(self.pod, "sh", SCRIPT, check=False,
                             env=dict(os.environ, MX_PORTS="25 15025", MX_PROXY_PORT="15025"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("MX_PORTS must not contain MX_PROXY_PORT (15025)", r.stderr)
        self.assertEqual(self.rules(), before)

    # ---- tproxy

    def pod_backend(self):
        """A Python SMTP server on POD_IP:25 in the pod that records each
        connection's peer address."""
        with mxtest.in_netns(self.pod):
            b = self.scripted("pod", host=POD_IP, port=25)
        return b

    def test_tproxy_greeting_at_once_and_original_destination(self):
        b = self.pod_backend()
        self.iptables_init("tproxy")
        p = self.start_pod_proxy("tproxy")
        c = self.client_in(self.cli, 25)
        self.assertEqual(c.recv_until(b"\r\n", 2), b"220 pod ESMTP\r\n")
        self.assertLess(time.monotonic() - c.t_connected, 0.2, "greeting through TPROXY")
        sid = self.open_of(p, c)["sid"]
        self.assertEvent(p.wait_event(ev="connect", sid=sid), "connect",
                         {"backend": "%s:25" % POD_IP, "ms": MS})
        self.assertEqual(c.cmd(b"EHLO cli.example.test")[:9], b"250-pod\r\n")
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.wait_closed(3), ("eof", b""))
        rec = b.wait_conns(1)
        self.assertEqual(rec.peer[0], POD_IP)  # without source = client: mxproxy's address
        self.assertEqual(rec.commands, [b"EHLO cli.example.test", b"QUIT"])
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["backend"]), ("quit", "%s:25" % POD_IP))

    def test_tproxy_source_client_backend_sees_the_client(self):
        b = self.pod_backend()
        self.iptables_init("tproxy")
        p = self.start_pod_proxy("tproxy", source="client")
        c = self.client_in(self.cli, 25)
        self.assertEqual(c.recv_until(b"\r\n", 2), b"220 pod ESMTP\r\n")
        rec = b.wait_conns(1)
        self.assertEqual(rec.peer[0], CLI_IP)
        self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        sid = self.open_of(p, c)["sid"]
        self.assertEqual(p.close_of(sid)["end"], "quit")

    def test_tproxy_swaks_transaction(self):
        self.start_sink()
        self.iptables_init("tproxy")
        p = self.start_pod_proxy("tproxy")
        r = mxtest.netns_run(self.cli, "swaks", "--server", "%s:25" % POD_IP, "--from",
                             "me@example.test", "--to", "you@example.test", timeout=30)
        self.assertIn("\n<-  250 2.0.0 Ok\n -> QUIT\n<-  221 Bye\n", r.stdout)
        close = p.wait_event(ev="close")
        self.assertEqual((close["end"], close["backend"], close["messages"]),
                         ("quit", "%s:25" % POD_IP, "1"))


if __name__ == "__main__":
    mxtest.main()
