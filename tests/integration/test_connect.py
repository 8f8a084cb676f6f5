"""Connecting to a backend without extra loop turns.

mxproxy makes the backend socket itself, connects it and reads it at once: the backend's
first bytes (its greeting) complete the connect, with no POLLOUT registration and no
SO_ERROR query in between. A backend that waits for its client is found connected by a
probe of the socket; a refused connect still fails over. The same holds in every mode:
mode tcp and mode smtp in front of smtp-sink, modes pop3 and imap in front of small servers.
Both sockets of a session have TCP_NODELAY; the client's inherits it from the listening
socket, so it costs no system call per session.
"""

import contextlib
import ctypes
import os
import platform
import socket
import re
import shutil
import signal
import subprocess
import time
import unittest

import mxtest
from mxtest import HOST, SINK_GREETING, config, listener, free_port


class ClientFirstBackend(mxtest.TcpBackend):
    """Never speaks first: echoes what it receives."""

    def handle(self, rec):
        while True:
            data = self.recv(rec)
            if not data:
                return
            self.send(rec, data)


POP3_GREETING = b"+OK pop3 ready\r\n"
POP3_BYE = b"+OK bye\r\n"


class Pop3Backend(mxtest.TcpBackend):
    """Greets as a POP3 server, answers QUIT and closes; any other command gets -ERR."""

    def handle(self, rec):
        self.send(rec, POP3_GREETING)
        for line in self.recv_lines(rec):
            if line.upper() == b"QUIT":
                self.send(rec, POP3_BYE)
                return
            self.send(rec, b"-ERR unknown\r\n")


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1] imap ready\r\n"
IMAP_BYE = b"* BYE bye\r\na OK LOGOUT done\r\n"


class ImapBackend(mxtest.TcpBackend):
    """Greets as an IMAP server, answers "a LOGOUT" and closes; anything else gets BAD."""

    def handle(self, rec):
        self.send(rec, IMAP_GREETING)
        for line in self.recv_lines(rec):
            if line.upper() == b"A LOGOUT":
                self.send(rec, IMAP_BYE)
                return
            self.send(rec, line.split(b" ", 1)[0] + b" BAD unknown\r\n")


class ConnectTest(mxtest.ProxyTestCase):

    def proxy_to(self, backends, **opts):
        port = free_port()
        p = self.start_proxy(config(listener("bench", "%s:%d" % (HOST, port), backends, **opts)))
        return p, port

    def server(self, mode):
        """A backend for mode: its address, its greeting, the command that ends a session
        and the whole reply to it."""
        if mode == "pop3":
            b = self.track(Pop3Backend("pop3"))
            return b.addr, POP3_GREETING, b"QUIT", POP3_BYE
        if mode == "imap":
            b = self.track(ImapBackend("imap"))
            return b.addr, IMAP_GREETING, b"a LOGOUT", IMAP_BYE
        return self.sink().addr, SINK_GREETING, b"QUIT", b"221 Bye\r\n"

    def test_backend_waiting_for_its_client_is_connected(self):
        b = self.track(ClientFirstBackend("echo"))
        p, port = self.proxy_to(b.addr)
        c = self.client(port)
        sid = p.sid_of(c)
        conn = p.wait_event(ev="connect", sid=sid, timeout=2)
        self.assertEqual(conn["backend"], b.addr)
        self.assertLess(float(conn["ms"]), 1000.0)  # the first probe comes after 50 ms
        c.send(b"ping\r\n")
        self.assertEqual(c.recv_until(b"\r\n", timeout=2), b"ping\r\n")
        c.close()
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["bytes_up"], close["bytes_down"]),
                         ("client_eof", "6", "6"))
        self.assertEqual(p.find(ev="connect_error"), [])

    def test_refused_backend_fails_over(self):
        for mode in ("tcp", "smtp", "pop3", "imap"):
            with self.subTest(mode=mode):
                dead = "%s:%d" % (HOST, free_port())  # nothing listens there
                addr, greeting, quit_cmd, bye = self.server(mode)
                p, port = self.proxy_to([dead, addr], mode=mode)
                c = self.client(port)
                self.assertEqual(c.recv_until(b"\r\n", timeout=2), greeting)
                sid = p.sid_of(c)
                p.wait_event(ev="connect", sid=sid, backend=addr)
                errors = p.find(ev="connect_error", sid=sid)
                self.assertEqual([(e["backend"], e["error"]) for e in errors],
                                 [(dead, "connection refused")])
                self.assertEqual([e["backend"] for e in p.find(ev="connect", sid=sid)], [addr])
                c.send(quit_cmd + b"\r\n")
                self.assertEqual(c.recv_until(bye, timeout=2), bye)
                c.close()
                close = p.close_of(sid)
                self.assertEqual(close["backend"], addr)
                # mode tcp: whichever side closed first after the 221
                want = {"tcp": ("client_eof", "backend_closed"), "imap": ("logout",)}
                self.assertIn(close["end"], want.get(mode, ("quit",)))

    def test_pop3_silent_backend_is_probed_then_given_up(self):
        """A POP3 backend that accepts and never greets: the probe finds it connected, then
        greeting_timeout moves the session to the next backend, whose greeting the client
        gets as its first bytes."""
        silent = self.track(ClientFirstBackend("silent"))
        live = self.track(Pop3Backend("pop3"))
        p, port = self.proxy_to([silent.addr, live.addr], mode="pop3",
                                greeting_timeout="500ms")
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n", timeout=3), POP3_GREETING)
        sid = p.sid_of(c)
        p.wait_event(ev="connect", sid=sid, backend=live.addr)
        connects = p.find(ev="connect", sid=sid)
        self.assertEqual([e["backend"] for e in connects], [silent.addr, live.addr])
        # The silent one was connected by the first probe, 50 ms after its connect began.
        self.assertGreaterEqual(float(connects[0]["ms"]), 40.0)
        errors = p.find(ev="connect_error", sid=sid)
        self.assertEqual([(e["backend"], e["error"]) for e in errors],
                         [(silent.addr, "no greeting")])
        rec = silent.wait_conns(1)
        self.assertTrue(rec.eof.wait(2), "the silent backend's connection was left open")
        self.assertEqual(rec.rx, 0, "nothing may reach a backend that never greeted")
        c.send(b"QUIT\r\n")
        self.assertEqual(c.recv_until(b"\r\n", timeout=2), POP3_BYE)
        c.close()
        close = p.close_of(sid)
        self.assertEqual((close["end"], close["backend"]), ("quit", live.addr))

    @contextlib.contextmanager
    def traced(self, pid, syscalls):
        """strace -f on pid for the block's duration; the list it yields holds the
        traced calls' lines once the block has ended."""
        out = os.path.join(self.tmpdir, "strace-%d.out" % len(os.listdir(self.tmpdir)))
        st = subprocess.Popen(["strace", "-f", "-e", "trace=" + syscalls, "-o", out,
                               "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        calls = []
        try:
            # strace says "Process N attached" once per thread; wait for the first.
            line = st.stderr.readline()
            if b"attached" not in line:
                self.skipTest("strace cannot attach here: %r" % line)
            time.sleep(0.3)  # the other threads
            yield calls
        finally:
            st.send_signal(signal.SIGINT)
            st.wait(timeout=10)
        with open(out) as f:
            calls.extend(f.readlines())

    @unittest.skipIf(shutil.which("strace") is None, "strace is not installed")
    def test_one_session_registers_each_socket_once(self):
        for mode in ("tcp", "smtp", "pop3", "imap"):
            with self.subTest(mode=mode):
                self.registers_each_socket_once(mode)

    def registers_each_socket_once(self, mode):
        addr, greeting, quit_cmd, bye = self.server(mode)
        p, port = self.proxy_to(addr, mode=mode)
        # One session before tracing: the worker has then polled once, so the listening
        # socket and the loop's own descriptors are registered before strace looks.
        c = self.client(port)
        self.assertEqual(c.recv_until(b"\r\n", timeout=2), greeting)
        sid = p.sid_of(c)
        c.close()
        p.close_of(sid)
        with self.traced(p.pid, "epoll_ctl,getsockopt,connect") as calls:
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n", timeout=2), greeting)
            c.send(quit_cmd + b"\r\n")
            self.assertEqual(c.recv_until(bye, timeout=2), bye)
            sid = p.sid_of(c)
            c.close()
            p.close_of(sid)
            time.sleep(0.2)  # the close's own calls
        backend_fds = [m.group(1) for m in (re.search(r" connect\((\d+),", ln) for ln in calls)
                       if m]
        self.assertEqual(len(backend_fds), 1, "".join(calls))
        # The backend is added once, for reading: libuv's uv_tcp_connect adds it for POLLOUT,
        # asks SO_ERROR, then adds it again for reading (EEXIST, then MOD). The DELs are
        # libuv's at close (and one for a socket at EOF that is no longer read).
        self.assertEqual([ln for ln in calls if "SO_ERROR" in ln], [])
        ctl = [ln for ln in calls if "epoll_ctl(" in ln]
        on_backend = [ln for ln in ctl
                      if re.search(r"epoll_ctl\(\d+, \w+, %s," % backend_fds[0], ln)]
        self.assertEqual(len([ln for ln in on_backend if "EPOLL_CTL_ADD" in ln]), 1,
                         "".join(ctl))
        self.assertEqual([ln for ln in ctl if "EPOLL_CTL_MOD" in ln or "EEXIST" in ln], [],
                         "".join(ctl))
        if mode == "tcp":
            # The client too: mode tcp never stops reading it before the end.
            self.assertEqual(len([ln for ln in ctl if "EPOLL_CTL_ADD" in ln]), 2, "".join(ctl))

    @unittest.skipIf(shutil.which("strace") is None, "strace is not installed")
    def test_both_sockets_nodelay_without_a_call_for_the_client(self):
        for mode in ("tcp", "smtp"):
            with self.subTest(mode=mode):
                self.both_sockets_nodelay(mode)

    def proxy_socket(self, pid, peer):
        """A duplicate of the proxy's TCP socket whose peer is `peer` (pidfd_getfd)."""
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
        try:
            for name in os.listdir("/proc/%d/fd" % pid):
                if not os.readlink("/proc/%d/fd/%s" % (pid, name)).startswith("socket:"):
                    continue
                fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd
                if fd < 0:
                    self.skipTest("pidfd_getfd: %s" % os.strerror(ctypes.get_errno()))
                sock = socket.socket(fileno=fd)
                try:
                    if sock.type == socket.SOCK_STREAM and sock.getpeername() == peer:
                        return sock
                except OSError:
                    pass
                sock.close()
        finally:
            os.close(pidfd)
        self.fail("the proxy has no socket connected to %r" % (peer,))

    def both_sockets_nodelay(self, mode):
        if platform.machine() not in ("x86_64", "aarch64"):
            self.skipTest("pidfd_getfd's number is known here for x86_64 and aarch64 only")
        sink = self.sink()
        p, port = self.proxy_to(sink.addr, mode=mode)
        with self.traced(p.pid, "setsockopt,connect,getpeername") as calls:
            c = self.client(port)
            self.assertEqual(c.recv_until(b"\r\n", timeout=2), SINK_GREETING)
            client_side = self.proxy_socket(p.pid, c.sock.getsockname())
            with client_side:
                self.assertEqual(client_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
                backend_side = self.proxy_socket(p.pid, (sink.host, sink.port))
                with backend_side:
                    self.assertEqual(
                        backend_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            c.send(b"QUIT\r\n")
            self.assertEqual(c.recv_until(b"221 Bye\r\n", timeout=2), b"221 Bye\r\n")
            sid = p.sid_of(c)
            c.close()
            p.close_of(sid)
        # One TCP_NODELAY per session, on the backend socket mxproxy made: the accepted one
        # already has it.
        nodelay = [ln for ln in calls if "TCP_NODELAY" in ln]
        connects = [ln for ln in calls if " connect(" in ln]
        self.assertEqual(len(connects), 1, "".join(calls))
        backend_fd = re.search(r" connect\((\d+),", connects[0]).group(1)
        self.assertEqual(len(nodelay), 1, "".join(calls))
        self.assertIn("setsockopt(%s, " % backend_fd, nodelay[0])
        # The client's address came with the accept: client= in the logs asks nothing more.
        self.assertEqual([ln for ln in calls if "getpeername(" in ln], [], "".join(calls))
        self.assertEqual(p.close_of(sid)["client"], "%s:%d" % (HOST, c.local_port))


if __name__ == "__main__":
    mxtest.main()
