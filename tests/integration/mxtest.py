"""Shared harness for mxproxy's integration tests.

Every test_*.py file imports this module, runs mxproxy on 127.0.0.1 in front of
real SMTP servers (smtp-sink) or small scripted Python backends, drives it with
real clients and asserts on exact bytes and on exact log fields.

Rules the harness enforces for every test:
  - only 127.0.0.0/8 is bound, ports come from the kernel (bind port 0);
  - every wait is bounded by a timeout, and polls instead of sleeping;
  - processes are started in their own process group and stopped by pid;
  - mxproxy must exit 0 when stopped, with no sanitizer report on stderr.

Run a file alone: /usr/bin/python3 tests/integration/test_relay.py build/mxproxy
"""

import base64
import hashlib
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMTP_SINK = "/usr/sbin/smtp-sink"
SINK_GREETING = b"220 smtp-sink ESMTP\r\n"
SINK_BYE = b"221 Bye\r\n"

# Filled in by main() from argv[1], else $MXPROXY, else build/mxproxy.
BINARY = None

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SID_RE = re.compile(r"^[0-9a-f]{16}$")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def binary():
    if BINARY:
        return BINARY
    return os.environ.get("MXPROXY") or os.path.join(REPO, "build", "mxproxy")


# --------------------------------------------------------------------------
# Log parsing


class LogParseError(ValueError):
    pass


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "0": "\0",
            "a": "\a", "b": "\b", "f": "\f", "v": "\v", "e": "\x1b"}


def parse_logfmt(line):
    """Parses one logfmt line into a dict that keeps key order.

    key=value pairs separated by single spaces; a value is either bare (no
    space, quote, '=' or control char) or double-quoted with backslash escapes
    (\\n \\r \\t \\" \\\\ \\xHH \\uHHHH)."""
    line = line.rstrip("\n")
    out = {}
    i, n = 0, len(line)
    while i < n:
        eq = line.find("=", i)
        if eq <= i:
            raise LogParseError("expected key= at column %d: %r" % (i, line))
        key = line[i:eq]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise LogParseError("bad key %r in %r" % (key, line))
        if key in out:
            raise LogParseError("duplicate key %r in %r" % (key, line))
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            val = []
            while True:
                if i >= n:
                    raise LogParseError("unterminated quote in %r" % line)
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n:
                        raise LogParseError("dangling backslash in %r" % line)
                    e = line[i + 1]
                    if e in _ESCAPES:
                        val.append(_ESCAPES[e])
                        i += 2
                    elif e == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", line[i + 2:i + 4]):
                        val.append(chr(int(line[i + 2:i + 4], 16)))
                        i += 4
                    elif e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", line[i + 2:i + 6]):
                        val.append(chr(int(line[i + 2:i + 6], 16)))
                        i += 6
                    else:
                        raise LogParseError("bad escape \\%s in %r" % (e, line))
                    continue
                if ord(c) < 0x20:
                    raise LogParseError("raw control char in quoted value: %r" % line)
                val.append(c)
                i += 1
            out[key] = "".join(val)
            if i < n and line[i] != " ":
                raise LogParseError("junk after quoted value at %d: %r" % (i, line))
        else:
            sp = line.find(" ", i)
            if sp < 0:
                sp = n
            val = line[i:sp]
            if '"' in val or "=" in val or any(ord(c) < 0x20 for c in val):
                raise LogParseError("unquoted value needs quotes: %r in %r" % (val, line))
            out[key] = val
            i = sp
        if i < n:
            i += 1  # the single separating space
            if i >= n or line[i] == " ":
                raise LogParseError("double or trailing space in %r" % line)
    return out


def parse_json_line(line):
    """Parses one JSON log line into a dict that keeps key order."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise LogParseError("not JSON: %r (%s)" % (line, e))
    if not isinstance(obj, dict):
        raise LogParseError("not a JSON object: %r" % line)
    return obj


def parse_line(line, fmt=None):
    """fmt 'logfmt', 'json' or None (guess from the first char)."""
    if fmt is None:
        fmt = "json" if line.lstrip().startswith("{") else "logfmt"
    return parse_json_line(line) if fmt == "json" else parse_logfmt(line)


def check_header(ev):
    """Asserts the fixed leading keys: ts, lvl, ev, then sid when present."""
    keys = list(ev.keys())
    if keys[:3] != ["ts", "lvl", "ev"]:
        raise AssertionError("log line must start with ts, lvl, ev: %r" % (ev,))
    if not TS_RE.match(str(ev["ts"])):
        raise AssertionError("bad ts %r" % (ev["ts"],))
    if ev["lvl"] not in ("debug", "info", "warn", "error"):
        raise AssertionError("bad lvl %r" % (ev["lvl"],))
    if "sid" in ev:
        if keys[3] != "sid":
            raise AssertionError("sid must be the 4th key: %r" % (keys,))
        if not SID_RE.match(str(ev["sid"])):
            raise AssertionError("bad sid %r" % (ev["sid"],))


# --------------------------------------------------------------------------
# Ports, sockets, processes


_ports_handed_out = set()
_port_random = random.SystemRandom()


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A free port on 127.0.0.1, closed now, and never one this process had before.

    It comes from below the kernel's ephemeral range, at random: a bind to port 0 scans
    from a random point to the next free port, so while a test holds thousands of client
    connections (a flood), every bind(0) in every test lands on the same port after that
    block, and a test taking two (a listener and its admin port) fails on bind. Below the
    range no connection takes a port on its own, and tests running side by side draw
    from 10,000 or more."""
    low, high = 10000, _ephemeral_low() - 1
    for _ in range(1000):
        if high - low >= 1000:
            port = _port_random.randint(low, high)
        else:
            port = 0  # a machine with a wide ephemeral range: the kernel's choice
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((HOST, port))
            port = s.getsockname()[1]
        except OSError:
            continue  # in use
        finally:
            s.close()
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise AssertionError("no free port on %s after 1000 tries" % HOST)


def wait_port(port, timeout=10.0, proc=None, host=HOST):
    """Polls until something accepts on host:port (127.0.0.1 unless told)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("process exited with %s before port %d opened"
                                 % (proc.returncode, port))
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError("nothing listens on %s:%d after %.1fs"
                                     % (host, port, timeout))
            time.sleep(0.01)



def raise_nofile(n=None):
    """Raises RLIMIT_NOFILE of this process to n (default: the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if n is None else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """Signals proc's pid, waits, then kills its process group. Returns the exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        return None
    return proc.returncode


def connect_refused(port, timeout=1.0):
    """True when a connect to 127.0.0.1:port is refused."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((HOST, port))
        return False
    except ConnectionRefusedError:
        return True
    finally:
        s.close()


# --------------------------------------------------------------------------
# A client with a receive buffer


class Client:
    """A TCP client that reads SMTP replies, exact byte counts or EOF, each
    with a timeout."""

    def __init__(self, port, timeout=5.0, host=HOST, source=None):
        self.t_connect = time.monotonic()
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.t_connected = time.monotonic()
        self.local_port = self.sock.getsockname()[1]  # still known after close()
        self.buf = b""
        self.received = b""      # everything ever read, for byte accounting
        self.sent = 0
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)
        self.sent += len(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    def recv_until(self, term, timeout=5.0):
        """Returns the buffer up to and including term."""
        deadline = time.monotonic() + timeout
        while term not in self.buf:
            try:
                if not self._fill(deadline):
                    raise AssertionError("EOF before %r; got %r" % (term, self.buf))
            except socket.timeout:
                raise AssertionError("no %r within %.2fs; got %r" % (term, timeout, self.buf))
        i = self.buf.index(term) + len(term)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def recv_exact(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            try:
                if not self._fill(deadline):
                    raise AssertionError("EOF after %d of %d bytes" % (len(self.buf), n))
            except socket.timeout:
                raise AssertionError("only %d of %d bytes within %.2fs"
                                     % (len(self.buf), n, timeout))
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_reply(self, timeout=5.0):
        """One whole SMTP reply (all lines of a multi-line reply), raw bytes."""
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            line = self.recv_until(b"\r\n", max(0.0, deadline - time.monotonic()))
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def cmd(self, line, timeout=5.0):
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def wait_closed(self, timeout=5.0):
        """Waits for EOF or reset. Returns ('eof'|'reset', bytes received first)."""
        deadline = time.monotonic() + timeout
        got = b""
        while True:
            try:
                if not self._fill(deadline):
                    got, self.buf = got + self.buf, b""
                    return "eof", got
                got, self.buf = got + self.buf, b""
            except ConnectionResetError:
                got, self.buf = got + self.buf, b""
                return "reset", got
            except socket.timeout:
                raise AssertionError("still open after %.2fs (got %r)" % (timeout, got))

    def assert_open(self, wait=0.0):
        """Asserts nothing arrives and the peer has not closed within wait seconds."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if r:
            try:
                data = self.sock.recv(65536, socket.MSG_PEEK)
            except ConnectionResetError:
                raise AssertionError("connection was reset")
            if not data:
                raise AssertionError("connection was closed by the peer")
            raise AssertionError("unexpected data %r" % data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# Scripted backends


class ConnRecord:
    """What a backend saw on one accepted connection."""

    def __init__(self, sock):
        self.sock = sock
        self.peer = sock.getpeername()
        self.t_accept = time.monotonic()
        self.rx = 0            # bytes received
        self.tx = 0            # bytes sent
        self.received = bytearray()  # kept only when the backend says so
        self.commands = []     # SMTP command lines, CRLF stripped
        self.messages = []     # (size, sha256 hex) per DATA
        self.eof = threading.Event()
        self.closed = threading.Event()
        self.t_eof = None
        self.error = None


class TcpBackend:
    """A threaded TCP server on 127.0.0.1; handler(backend, rec) runs per connection."""

    def __init__(self, name="backend", backlog=128, keep_bytes=False, host=HOST, port=0):
        self.name = name
        self.keep_bytes = keep_bytes
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self.addr = "%s:%d" % (host, self.port)
        self.conns = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.threads = []
        t = threading.Thread(target=self._accept_loop, name="accept-" + name, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept_loop(self):
        while not self.stopping.is_set():
            r, _, _ = select.select([self.lsock], [], [], 0.05)
            if not r:
                continue
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                continue
            rec = ConnRecord(sock)
            with self.cond:
                self.conns.append(rec)
                self.cond.notify_all()
            t = threading.Thread(target=self._run, args=(rec,), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, rec):
        try:
            self.handle(rec)
        except (OSError, ConnectionError) as e:
            rec.error = e
        except Exception as e:  # a handler bug must show, not hang the test
            rec.error = e
            print("backend %s handler error: %r" % (self.name, e), file=sys.stderr)
        finally:
            try:
                rec.sock.close()
            except OSError:
                pass
            rec.closed.set()
            with self.cond:
                self.cond.notify_all()

    # helpers for handlers
    def send(self, rec, data):
        rec.sock.sendall(data)
        rec.tx += len(data)

    def recv(self, rec, n=262144):
        """Returns b'' on EOF, None when the backend is stopping."""
        while not self.stopping.is_set():
            r, _, _ = select.select([rec.sock], [], [], 0.05)
            if r:
                data = rec.sock.recv(n)
                rec.rx += len(data)
                if self.keep_bytes:
                    rec.received += data
                if not data:
                    rec.t_eof = time.monotonic()
                    rec.eof.set()
                return data
        return None

    def recv_until(self, rec, marker):
        """Reads until rec.received holds marker: True, or False at EOF or stop."""
        while marker not in rec.received:
            data = self.recv(rec)
            if not data:
                return False
            if not self.keep_bytes:
                rec.received += data
        return True

    def recv_lines(self, rec):
        """Yields each CRLF-ended line the peer sends (without its CRLF), until EOF."""
        buf = b""
        while True:
            data = self.recv(rec)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                yield line

    def handle(self, rec):
        raise NotImplementedError

    def wait_conns(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.conns) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%s: %d connections, wanted %d within %.1fs"
                                         % (self.name, len(self.conns), n, timeout))
                self.cond.wait(left)
            return self.conns[n - 1]

    def close(self):
        self.stopping.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        for rec in list(self.conns):
            try:
                rec.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(2)


class SmtpBackend(TcpBackend):
    """Speaks just enough SMTP: greeting (optionally delayed or multi-line),
    EHLO/HELO/MAIL/RCPT/RSET/NOOP, DATA hashed with SHA-256, QUIT.

    Replies name the backend, so a client can tell which one it reached:
        220 NAME ESMTP / 250 2.0.0 NAME ok / 250 2.0.0 NAME queued SIZE SHA256
    After QUIT it answers 221 and waits for the client to close first, so the
    proxy's close reason is deterministic (client_eof)."""

    def __init__(self, name="backend", greeting=None, greeting_delay=0.0, greeting_parts=None,
                 part_delay=0.0, **kw):
        self.greeting = greeting if greeting is not None else b"220 %s ESMTP\r\n" % name.encode()
        self.greeting_delay = greeting_delay
        self.greeting_parts = greeting_parts
        self.part_delay = part_delay
        super().__init__(name, **kw)

    def greet(self, rec):
        if self.greeting_delay and self.stopping.wait(self.greeting_delay):
            return
        if self.greeting_parts:
            for i, part in enumerate(self.greeting_parts):
                if i and self.part_delay:
                    time.sleep(self.part_delay)
                self.send(rec, part)
        else:
            self.send(rec, self.greeting)

    def handle(self, rec):
        self.greet(rec)
        name = self.name.encode()
        buf = b""
        while True:
            while b"\r\n" not in buf:
                data = self.recv(rec)
                if not data:
                    return
                buf += data
            line, buf = buf.split(b"\r\n", 1)
            rec.commands.append(line)
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                self.send(rec, b"250-%s\r\n250-PIPELINING\r\n250 8BITMIME\r\n" % name)
            elif verb == b"HELO":
                self.send(rec, b"250 %s\r\n" % name)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.send(rec, b"250 2.0.0 %s ok\r\n" % name)
            elif verb == b"DATA":
                self.send(rec, b"354 go ahead\r\n")
                buf = self._data(rec, buf)
                if buf is None:
                    return
                size, digest = rec.messages[-1]
                self.send(rec, b"250 2.0.0 %s queued %d %s\r\n" % (name, size, digest.encode()))
            elif verb == b"QUIT":
                self.send(rec, b"221 2.0.0 %s bye\r\n" % name)
                while True:  # the client closes first
                    data = self.recv(rec)
                    if not data:
                        return
            else:
                self.send(rec, b"502 5.5.2 %s unknown\r\n" % name)

    def _data(self, rec, buf):
        """Hashes the message up to and including the CRLF before the final '.'.
        Returns the bytes after the terminator, or None on EOF."""
        h = hashlib.sha256()
        size = 0
        pending = b"\r\n" + buf  # a message may end right away with ".\r\n"
        first = True
        while True:
            i = pending.find(b"\r\n.\r\n")
            if i >= 0:
                body = pending[:i + 2]
                if first:
                    body = body[2:]
                h.update(body)
                size += len(body)
                rec.messages.append((size, h.hexdigest()))
                return pending[i + 5:]
            if len(pending) > 4:
                body = pending[:-4]
                if first:
                    body = body[2:]
                    first = False
                h.update(body)
                size += len(body)
                pending = pending[-4:]
            data = self.recv(rec)
            if not data:
                return None
            pending += data


# Ends of a DATA body as a lenient server takes them: a dot between any two of
# CRLF, LF and CR (what the 2023 SMTP smuggling attacks rely on).
LENIENT_END_RE = re.compile(rb"(\r\n|\n|\r)\.(\r\n|\n|\r)")


class ScriptedSmtpBackend(TcpBackend):
    """An SMTP server whose replies a test scripts, for mode smtp.

    rules: (prefix, action) pairs, prefix in bytes; the first whose prefix
    starts the command line (case-insensitive) decides. action is the reply as
    bytes, or a callable(backend, rec, line) that does what it likes and
    returns "close" to end the connection (else None).

    Lines no rule matches get the defaults:
      EHLO      250-NAME, then one line per entry of ext
      HELO      250 NAME
      MAIL      250 2.1.0 sender ok          RCPT   250 2.1.5 recipient ok
      RSET NOOP 250 2.0.0 ok
      DATA      354, the body, then 250 2.0.0 queued as N (N counts messages)
      BDAT n    reads n bytes: 250 2.0.0 n octets received; with LAST the
                message is complete: 250 2.0.0 queued as N
      AUTH LOGIN [x]  334 VXNlcm5hbWU6 (unless x given), 334 UGFzc3dvcmQ6,
                then 235 2.7.0 Authentication successful; a "*" line: 501 5.7.0
      AUTH PLAIN x    235 2.7.0; without x: "334 " and one line
      STARTTLS  220 2.0.0 Ready to start TLS, then the connection is opaque:
                every byte is kept in rec.opaque and echoed back
      XCLIENT   220 NAME ESMTP (the new session's greeting)
      QUIT      221 2.0.0 Bye, then close
      others    502 5.5.2 command not recognized

    lenient=True makes it a server vulnerable to SMTP smuggling: a command
    line ends at LF (a CR before it is dropped) and a DATA body ends at any
    LENIENT_END_RE match. Strict: CRLF lines, CRLF.CRLF ends a body.

    Per connection (ConnRecord): received (every byte), commands (lines),
    bodies (each message as the server took it: from after the 354 up to and
    including the line end before the final dot; BDAT: the chunks joined),
    chunks (BDAT payloads), auth_lines (credential lines), opaque."""

    EXT = ("PIPELINING", "8BITMIME", "CHUNKING", "AUTH PLAIN LOGIN", "STARTTLS")

    def __init__(self, name="scripted", rules=(), ext=EXT, lenient=False, greeting=None, **kw):
        self.rules = list(rules)
        self.ext = list(ext)
        self.lenient = lenient
        self.greeting = greeting if greeting is not None else b"220 %s ESMTP\r\n" % name.encode()
        kw.setdefault("keep_bytes", True)
        super().__init__(name, **kw)

    # reading
    def more(self, rec):
        data = self.recv(rec)
        if not data:
            return False
        rec.buf += data
        return True

    def read_line(self, rec):
        """One line without its end; None at EOF."""
        term = b"\n" if self.lenient else b"\r\n"
        while term not in rec.buf:
            if not self.more(rec):
                return None
        line, rec.buf = rec.buf.split(term, 1)
        if self.lenient and line.endswith(b"\r"):
            line = line[:-1]
        return line

    def read_exact(self, rec, n):
        while len(rec.buf) < n:
            if not self.more(rec):
                return None
        out, rec.buf = rec.buf[:n], rec.buf[n:]
        return out

    def read_body(self, rec):
        """Reads up to the end of a DATA body; returns the body or None at EOF."""
        while True:
            buf = b"\r\n" + rec.buf  # a body may end at once
            if self.lenient:
                m = LENIENT_END_RE.search(buf)
                if m is not None and m.end() == len(buf) and buf.endswith(b"\r"):
                    m = None  # CR at the very end: it may be half a CRLF
                if m is not None:
                    body, rec.buf = buf[2:m.end(1)], buf[m.end():]
                    return body
            else:
                i = buf.find(b"\r\n.\r\n")
                if i >= 0:
                    body, rec.buf = buf[2:i + 2], buf[i + 5:]
                    return body
            if not self.more(rec):
                return None

    # the session
    def handle(self, rec):
        rec.buf = b""
        rec.bodies = []
        rec.chunks = []
        rec.auth_lines = []
        rec.opaque = bytearray()
        if self.greeting:
            self.send(rec, self.greeting)
        while True:
            line = self.read_line(rec)
            if line is None:
                return
            rec.commands.append(line)
            action = None
            for prefix, act in self.rules:
                if line.upper().startswith(prefix.upper()):
                    action = act
                    break
            if action is None:
                action = self.default
            if isinstance(action, bytes):
                self.send(rec, action)
                continue
            if action(self, rec, line) == "close":
                self.finish(rec)
                return

    def finish(self, rec, timeout=2.0):
        """Closes like a server that is done: FIN first, then reads what the
        peer still sends until its EOF (bounded), so the close is never an RST."""
        try:
            rec.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            r, _, _ = select.select([rec.sock], [], [], 0.05)
            if r:
                try:
                    data = rec.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    rec.t_eof = time.monotonic()
                    rec.eof.set()
                    return
                rec.rx += len(data)
                rec.received += data

    def default(self, _backend, rec, line):
        name = self.name.encode()
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"EHLO":
            exts = [name] + [e.encode() for e in self.ext]
            self.send(rec, b"".join(b"250-%s\r\n" % e for e in exts[:-1])
                      + b"250 %s\r\n" % exts[-1])
        elif verb == b"HELO":
            self.send(rec, b"250 %s\r\n" % name)
        elif verb == b"MAIL":
            self.send(rec, b"250 2.1.0 sender ok\r\n")
        elif verb == b"RCPT":
            self.send(rec, b"250 2.1.5 recipient ok\r\n")
        elif verb in (b"RSET", b"NOOP"):
            self.send(rec, b"250 2.0.0 ok\r\n")
        elif verb == b"DATA":
            self.send(rec, b"354 End data with <CR><LF>.<CR><LF>\r\n")
            body = self.read_body(rec)
            if body is None:
                return "close"
            rec.bodies.append(body)
            self.send(rec, b"250 2.0.0 queued as %d\r\n" % len(rec.bodies))
        elif verb == b"BDAT":
            n = int(words[1])
            chunk = self.read_exact(rec, n)
            if chunk is None:
                return "close"
            rec.chunks.append(chunk)
            if len(words) > 2 and words[2].upper() == b"LAST":
                rec.bodies.append(b"".join(rec.chunks))
                self.send(rec, b"250 2.0.0 queued as %d\r\n" % len(rec.bodies))
            else:
                self.send(rec, b"250 2.0.0 %d octets received\r\n" % n)
        elif verb == b"AUTH":
            return self.auth(rec, words)
        elif verb == b"STARTTLS":
            self.send(rec, b"220 2.0.0 Ready to start TLS\r\n")
            data, rec.buf = rec.buf, b""
            while True:
                if data:
                    rec.opaque += data
                    self.send(rec, data)
                data = self.recv(rec)
                if not data:
                    return "close"
        elif verb == b"XCLIENT":
            self.send(rec, b"220 %s ESMTP\r\n" % name)
        elif verb == b"QUIT":
            self.send(rec, b"221 2.0.0 Bye\r\n")
            return "close"
        else:
            self.send(rec, b"502 5.5.2 command not recognized\r\n")
        return None

    def auth(self, rec, words):
        mech = words[1].upper() if len(words) > 1 else b""
        if mech == b"PLAIN" and len(words) > 2:
            self.send(rec, b"235 2.7.0 Authentication successful\r\n")
            return None
        if mech == b"PLAIN":
            prompts = [b"334 \r\n"]
        elif mech == b"LOGIN":
            prompts = [b"334 UGFzc3dvcmQ6\r\n"] if len(words) > 2 else \
                [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"]
        else:
            self.send(rec, b"504 5.5.4 mechanism not supported\r\n")
            return None
        for prompt in prompts:
            self.send(rec, prompt)
            line = self.read_line(rec)
            if line is None:
                return "close"
            rec.auth_lines.append(line)
            if line == b"*":
                self.send(rec, b"501 5.7.0 Authentication cancelled\r\n")
                return None
        self.send(rec, b"235 2.7.0 Authentication successful\r\n")
        return None


class HalfCloseBackend(TcpBackend):
    """Sends a greeting, reads until EOF, then replies with what it got and closes."""

    GREETING = b"220 halfclose ready\r\n"

    def handle(self, rec):
        self.send(rec, self.GREETING)
        h = hashlib.sha256()
        while True:
            data = self.recv(rec)
            if data is None:
                return
            if not data:
                break
            h.update(data)
        rec.digest = h.hexdigest()
        self.send(rec, b"250 got %d bytes %s\r\n" % (rec.rx, rec.digest.encode()))


class DownloadBackend(TcpBackend):
    """Greets, then answers 'GET N' with N bytes of random data (1 MB block
    repeated) and records their SHA-256 in rec.digest."""

    GREETING = b"220 download ready\r\n"

    def handle(self, rec):
        self.send(rec, self.GREETING)
        buf = b""
        while b"\r\n" not in buf:
            data = self.recv(rec)
            if not data:
                return
            buf += data
        n = int(buf.split(b"\r\n")[0].split()[1])
        block = os.urandom(1024 * 1024)
        # The digest is known before the first byte goes: a client that has
        # read everything may compare before this thread runs again.
        h = hashlib.sha256()
        left = n
        while left > 0:
            h.update(block[:left])
            left -= min(left, len(block))
        rec.digest = h.hexdigest()
        left = n
        while left > 0:
            chunk = block[:left]
            rec.sock.sendall(chunk)
            rec.tx += len(chunk)
            left -= len(chunk)
        rec.done = True
        while self.recv(rec):
            pass


def reset_close(sock):
    """Closes sock with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class Blackhole:
    """An address whose SYNs go unanswered: a listener with backlog 0 that never
    accepts, its accept queue filled first. On Linux a full accept queue drops
    new SYNs, so a connect() there hangs until the caller gives up."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind((HOST, 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        self.addr = "%s:%d" % (HOST, self.port)
        self.fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST, self.port))
            self.fillers.append(s)
            _, w, _ = select.select([], [s], [], 0.3)
            if not w:
                return  # this SYN was dropped: the queue is full
        raise AssertionError("could not fill the accept queue of %s" % self.addr)

    def close(self):
        for s in self.fillers:
            s.close()
        self.lsock.close()


class SmtpSink:
    """/usr/sbin/smtp-sink on host:port in its own process group: 127.0.0.1 and a free port
    unless told (host an IPv4 address or an IPv6 one without brackets). stop() and start()
    take it away and bring it back on the same address."""

    def __init__(self, max_conns=256, backlog=256, extra=(), port=None, host=HOST):
        self.host = host
        self.port = port or free_port()
        self.addr = ("[%s]:%d" if ":" in host else "%s:%d") % (host, self.port)
        self.args = [SMTP_SINK]
        if os.geteuid() == 0:
            self.args += ["-u", "nobody"]
        self.args += ["-m", str(max_conns)] + list(extra) + [self.addr, str(backlog)]
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_preexec_nofile)
        try:
            wait_port(self.port, 10, self.proc, self.host)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 5)
            self.proc = None

    def close(self):
        self.stop()


# --------------------------------------------------------------------------
# TLS: certificates made with the openssl CLI, TLS clients and backends

OPENSSL = "/usr/bin/openssl"


class CertPair:
    """A PEM certificate and its key on disk. der: the certificate in DER, to
    tell which one a peer presented."""

    def __init__(self, cert, key, names):
        self.cert = cert
        self.key = key
        self.names = list(names)
        with open(cert) as f:
            self.der = ssl.PEM_cert_to_DER_cert(f.read())


def _openssl(*args, cwd=None):
    r = subprocess.run([OPENSSL] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=cwd, timeout=20)
    if r.returncode != 0:
        raise AssertionError("openssl %s failed: %s" % (" ".join(args), r.stderr.decode()))
    return r.stdout


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class TestPKI:
    """A throw-away CA and EC P-256 leaf certificates under dir.

        ca         the CA certificate (clients and backend_ca trust it)
        mx         CN and SAN mx.example.test, signed by the CA
        other      CN and SAN *.other.test, signed by the CA
        untrusted  CN and SAN mx.example.test, self-signed

    leaf() and self_signed() make more (each call a new key)."""

    def __init__(self, dir):
        self.dir = dir
        self._n = 0
        self.ca_key = os.path.join(dir, "ca.key")
        self.ca = os.path.join(dir, "ca.pem")
        _openssl("req", "-x509", "-new", *_EC, "-keyout", self.ca_key, "-out", self.ca,
                 "-days", "3", "-subj", "/CN=mxproxy test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.mx = self.leaf("mx.example.test")
        self.other = self.leaf("*.other.test")
        self.untrusted = self.self_signed("mx.example.test")

    def _paths(self, name):
        self._n += 1
        base = os.path.join(self.dir, "%02d-%s" % (self._n, name.replace("*", "star")))
        return base + ".pem", base + ".key"

    def leaf(self, name, *more_names, ips=(), file_name=None):
        """A certificate for name (CN and first SAN), more_names and the IP
        addresses ips (iPAddress SANs), signed by the CA."""
        cert, key = self._paths(file_name or name)
        names = (name,) + more_names
        ext = cert + ".ext"
        sans = ["DNS:" + n for n in names] + ["IP:" + a for a in ips]
        with open(ext, "w") as f:
            f.write("subjectAltName=%s\n" % ",".join(sans)
                    + "basicConstraints=critical,CA:FALSE\n"
                    + "keyUsage=critical,digitalSignature\n"
                    + "extendedKeyUsage=serverAuth\n"
                    + "subjectKeyIdentifier=hash\n"
                    + "authorityKeyIdentifier=keyid\n")
        csr = cert + ".csr"
        _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", "/CN=" + name)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "3",
                 "-extfile", ext, "-out", cert)
        return CertPair(cert, key, names)

    def self_signed(self, name):
        cert, key = self._paths("self-" + name)
        _openssl("req", "-x509", "-new", *_EC, "-keyout", key, "-out", cert, "-days", "3",
                 "-subj", "/CN=" + name, "-addext", "subjectAltName=DNS:" + name)
        return CertPair(cert, key, [name])


_PKI = None
_PKI_LOCK = threading.Lock()


def pki():
    """The TestPKI of this test run, made on first use in a temporary
    directory that is removed when the process exits."""
    global _PKI
    with _PKI_LOCK:
        if _PKI is None:
            import atexit
            d = tempfile.mkdtemp(prefix="mxtest-pki-")
            atexit.register(shutil.rmtree, d, True)
            _PKI = TestPKI(d)
        return _PKI


def client_context(ca=None, check_hostname=True, min_version=None, max_version=None):
    """An ssl client context trusting ca (default: the test CA); ca=False
    verifies nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(ca or pki().ca)
        ctx.check_hostname = check_hostname
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def server_context(pair, min_version=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    if min_version is not None:
        ctx.minimum_version = min_version
    return ctx


def peer_cn(tls_sock):
    """The subject CN of the certificate tls_sock's peer presented (verified
    or not)."""
    der = tls_sock.getpeercert(binary_form=True)
    text = subprocess.run([OPENSSL, "x509", "-inform", "DER", "-noout", "-subject",
                           "-nameopt", "sep_multiline"], input=der, stdout=subprocess.PIPE,
                          timeout=10, check=True).stdout.decode()
    m = re.search(r"^\s*CN=(.*)$", text, re.M)
    return m.group(1) if m else None


class TlsClient(Client):
    """A Client whose socket is wrapped in TLS. tls=True: at once (implicit
    TLS); tls=False: later, with start_tls() (after STARTTLS)."""

    def __init__(self, port, ctx=None, server_hostname=None, timeout=5.0, tls=True):
        super().__init__(port, timeout)
        self.ctx = ctx or client_context(check_hostname=False)
        self.server_hostname = server_hostname
        if tls:
            self.start_tls()

    def start_tls(self):
        """Handshakes over the connection; what was read in plaintext and not
        consumed must be nothing (an injected reply would show here)."""
        if self.buf:
            raise AssertionError("plaintext bytes before the TLS handshake: %r" % self.buf)
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname=self.server_hostname)
        return self.sock

    def _fill(self, deadline):
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            data = self.sock.recv(65536)
            self.buf += data
            self.received += data
            return bool(data) or self._eof()
        try:
            return super()._fill(deadline)
        except ssl.SSLEOFError:
            return self._eof()

    def _eof(self):
        self.eof = True
        return False

    def assert_open(self, wait=0.0):
        """Asserts no application data arrives and the peer does not close
        within wait seconds (TLS records without data, such as session
        tickets, do not count)."""
        if not isinstance(self.sock, ssl.SSLSocket):
            return super().assert_open(wait)
        if self.buf:
            raise AssertionError("unexpected data %r" % self.buf)
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if not self.sock.pending():
                r, _, _ = select.select([self.sock], [], [], max(0.0, left))
                if not r:
                    return
            self.sock.settimeout(max(0.01, left))
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                if time.monotonic() >= deadline:
                    return
                continue
            except ConnectionResetError:
                raise AssertionError("connection was reset")
            except ssl.SSLEOFError:
                data = b""
            if not data:
                raise AssertionError("connection was closed by the peer")
            self.buf += data
            self.received += data
            raise AssertionError("unexpected data %r" % data)


class TlsSmtpBackend(ScriptedSmtpBackend):
    """A ScriptedSmtpBackend that speaks TLS with pair (a CertPair).

    tls="implicit": the handshake comes first, then the greeting inside TLS.
    tls="starttls": STARTTLS is answered with ready (a 220), then the
    connection is wrapped and SMTP goes on inside TLS (EHLO, MAIL, ...); what
    the client had sent after STARTTLS in plaintext is kept in rec.injected,
    not executed. Inside TLS, EHLO no longer offers STARTTLS (and STARTTLS
    gets 503).

    Per connection also: rec.tls (version/cipher), rec.sni (the server name the
    client sent, or None), rec.tls_error (why a handshake failed).
    rec.commands and rec.received hold plaintext, before and inside TLS."""

    def __init__(self, name="tlsmx", pair=None, tls="implicit", min_version=None,
                 ready=b"220 2.0.0 Ready to start TLS\r\n", **kw):
        self.pair = pair or pki().mx
        self.tls_mode = tls
        self.ready = ready
        self.ctx = server_context(self.pair, min_version)
        self.ctx.sni_callback = self._on_sni
        self._local = threading.local()
        super().__init__(name, **kw)

    def _on_sni(self, sslobj, name, ctx):
        rec = getattr(self._local, "rec", None)
        if rec is not None:
            rec.sni = name
        return None

    def wrap(self, rec):
        self._local.rec = rec
        rec.sock.settimeout(5)
        rec.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            rec.sock = self.ctx.wrap_socket(rec.sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            rec.tls_error = e
            raise
        rec.tls = "%s/%s" % (rec.sock.version(), rec.sock.cipher()[0])
        return rec.sock

    def recv(self, rec, n=262144):
        if isinstance(rec.sock, ssl.SSLSocket) and rec.sock.pending():
            data = rec.sock.recv(n)
            rec.rx += len(data)
            if self.keep_bytes:
                rec.received += data
            return data
        try:
            return super().recv(rec, n)
        except ssl.SSLEOFError:
            rec.t_eof = time.monotonic()
            rec.eof.set()
            return b""

    def handle(self, rec):
        rec.sni = None
        rec.tls = None
        rec.tls_error = None
        rec.injected = None
        if self.tls_mode == "implicit":
            self.wrap(rec)
        super().handle(rec)

    def default(self, backend, rec, line):
        if (self.tls_mode == "starttls" and isinstance(rec.sock, ssl.SSLSocket)
                and line[:5].upper() == b"EHLO "):
            exts = [self.name.encode()] + [e.encode() for e in self.ext if e != "STARTTLS"]
            self.send(rec, b"".join(b"250-%s\r\n" % e for e in exts[:-1])
                      + b"250 %s\r\n" % exts[-1])
            return None
        if self.tls_mode == "starttls" and line.upper() == b"STARTTLS":
            if isinstance(rec.sock, ssl.SSLSocket):
                self.send(rec, b"503 5.5.1 TLS already active\r\n")
                return None
            self.send(rec, self.ready)
            rec.injected, rec.buf = rec.buf, b""
            self.wrap(rec)
            return None
        return super().default(backend, rec, line)

    def finish(self, rec, timeout=2.0):
        if isinstance(rec.sock, ssl.SSLSocket):
            try:
                rec.sock = rec.sock.unwrap()  # close_notify, then the FIN
            except (ssl.SSLError, OSError):
                pass
        super().finish(rec, timeout)


# --------------------------------------------------------------------------
# Configuration


def listener(name, listen, backends, **opts):
    """One [listener NAME] section. backends: list of 'ip:port' or one string.
    An option given as a list or tuple is written once per item, in order
    (cert = A / cert = B)."""
    if not isinstance(backends, str):
        backends = ",".join(backends)
    lines = ["[listener %s]" % name, "listen = %s" % listen, "backend = %s" % backends]
    for k, v in opts.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            lines.append("%s = %s" % (k, item))
    return "\n".join(lines) + "\n"


def config(*listeners, **glob):
    """INI text: [global] with glob (workers=1, drain_timeout=2s unless given)
    followed by the listener sections."""
    g = {"workers": 1, "log_level": "info", "drain_timeout": "2s"}
    g.update(glob)
    lines = ["[global]"] + ["%s = %s" % (k, v) for k, v in g.items() if v is not None]
    return "\n".join(lines) + "\n\n" + "\n".join(listeners)


# --------------------------------------------------------------------------
# The proxy under test


class Proxy:
    """mxproxy -c FILE in the foreground; stderr parsed line by line into events.

    Each event is the parsed dict plus '_t' (monotonic arrival time) and '_raw'.
    Lines that do not parse are kept in self.bad_lines and fail the test."""

    def __init__(self, conf_text, tmpdir, log_format="logfmt", env=None, preexec_fn=None,
                 name="mxproxy.conf", netns=None):
        self.tmpdir = tmpdir
        self.path = os.path.join(tmpdir, name)
        self.fmt = log_format
        self.write_config(conf_text)
        self.events = []
        self.raw = []
        self.bad_lines = []
        self.cond = threading.Condition()
        self.closed_stderr = False
        e = dict(os.environ)
        e.setdefault("ASAN_OPTIONS", "detect_leaks=1")
        e.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        if env:
            e.update(env)
        # ip netns exec execs mxproxy: the pid stays mxproxy's own.
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(prefix + [binary(), "-c", self.path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, env=e, preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.rc = None

    def write_config(self, text):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def _read(self):
        for bline in self.proc.stderr:
            t = time.monotonic()
            line = bline.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.raw.append(line)
                if any(m in line for m in SANITIZER_MARKS):
                    self.bad_lines.append(line)
                try:
                    ev = parse_line(line, self.fmt)
                    check_header(ev)
                except (LogParseError, AssertionError) as e:
                    if line.strip():
                        self.bad_lines.append("%s  [%s]" % (line, e))
                    ev = None
                if ev is not None:
                    ev["_t"] = t
                    ev["_raw"] = line
                    self.events.append(ev)
                self.cond.notify_all()
        with self.cond:
            self.closed_stderr = True
            self.cond.notify_all()

    @staticmethod
    def _match(ev, fields):
        for k, v in fields.items():
            if k not in ev or str(ev[k]) != str(v):
                return False
        return True

    def find(self, **fields):
        with self.cond:
            return [e for e in self.events if self._match(e, fields)]

    def wait_event(self, timeout=5.0, start=0, **fields):
        """The first event at index >= start whose fields equal the given ones."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events[start:]:
                    if self._match(e, fields):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.closed_stderr:
                    raise AssertionError("no log event %r within %.1fs; log tail:\n%s"
                                         % (fields, timeout, self.tail()))
                self.cond.wait(left)

    def wait_count(self, n, timeout=5.0, **fields):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [e for e in self.events if self._match(e, fields)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self.closed_stderr:
                    raise AssertionError("%d of %d log events %r within %.1fs; log tail:\n%s"
                                         % (len(got), n, fields, timeout, self.tail()))
                self.cond.wait(left)

    def mark(self):
        with self.cond:
            return len(self.events)

    def tail(self, n=30):
        return "\n".join(self.raw[-n:])

    def wait_started(self, timeout=10.0):
        try:
            return self.wait_event(timeout, ev="start")
        except AssertionError:
            raise AssertionError("mxproxy did not log ev=start (exit %s); stderr:\n%s"
                                 % (self.proc.poll(), self.tail()))

    def sid_of(self, client, timeout=5.0):
        """The session id of the ev=open whose client= is this client's address."""
        port = client if isinstance(client, int) else client.local_port
        return self.wait_event(timeout, ev="open", client="%s:%d" % (HOST, port))["sid"]

    def close_of(self, sid, timeout=5.0):
        return self.wait_event(timeout, ev="close", sid=sid)

    def signal(self, sig):
        os.kill(self.pid, sig)

    def reload(self, text):
        """Rewrites the config, sends SIGHUP and returns the index to search from."""
        m = self.mark()
        self.write_config(text)
        self.signal(signal.SIGHUP)
        return m

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def wait_exit(self, timeout):
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("mxproxy still running after %.1fs; log tail:\n%s"
                                 % (timeout, self.tail()))
        self.reader.join(5)
        return self.rc

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.rc = stop_process(self.proc, signal.SIGTERM, timeout)
        else:
            self.rc = self.proc.returncode
        self.reader.join(5)
        return self.rc


class Like:
    """A log field value that must fullmatch a regex (for ms=, at_ms=, ...)."""

    def __init__(self, regex):
        self.regex = re.compile(regex)

    def matches(self, value):
        return self.regex.fullmatch(str(value)) is not None

    def __repr__(self):
        return "Like(%r)" % self.regex.pattern


MS = Like(r"\d+\.\d{3}")   # a duration in milliseconds, 3 decimals
UINT = Like(r"\d+")
ADDR = Like(r"127\.0\.0\.1:\d+")


def pair(cmd, code, reply=None, lines=1, esc=None, pipelined=0, ms=MS, **extra):
    """The fields of a mode smtp ev=pair line after sid, in mxproxy's order.
    extra: size, rounds, local, aborted, primary. code 0 (aborted): no reply,
    lines or ms."""
    f = {"cmd": cmd, "code": code}
    if esc is not None:
        f["esc"] = esc
    if code:
        f["reply"] = reply
        f["lines"] = lines
        if ms is not None:
            f["ms"] = ms
    f["pipelined"] = pipelined
    for k in ("size", "rounds", "local", "aborted", "primary"):
        if k in extra:
            f[k] = extra.pop(k)
    if extra:
        raise TypeError("unknown pair fields %r" % extra)
    return f


def smtp_close(end, helo=None, mail_from=None, rcpt_ok=0, rcpt_rejected=0, messages=0,
               primary_error=None, error=None, backend=ADDR, listener_name="smtp",
               tls_client=None, sni=None, tls_backend=None, smtp=True):
    """The fields of an ev=close line after sid, in mxproxy's order: the TLS
    fields when given, the mode smtp summary unless smtp=False."""
    f = {"listener": listener_name, "end": end, "bytes_up": UINT, "bytes_down": UINT, "ms": MS,
         "client": ADDR}
    if backend is not None:
        f["backend"] = backend
    if error is not None:
        f["error"] = error
    if tls_client is not None:
        f["tls_client"] = tls_client
        if sni is not None:
            f["sni"] = sni
    if tls_backend is not None:
        f["tls_backend"] = tls_backend
    if not smtp:
        return f
    if helo is not None:
        f["helo"] = helo
    if mail_from is not None:
        f["mail_from"] = mail_from
    f.update(rcpt_ok=rcpt_ok, rcpt_rejected=rcpt_rejected, messages=messages)
    if primary_error is not None:
        f["primary_error"] = primary_error
    return f


class ProxyTestCase(unittest.TestCase):
    """Starts and always stops what a test creates. tearDown fails the test
    when mxproxy did not exit 0 or printed a sanitizer report or a line that is
    not a well-formed log line."""

    def setUp(self):
        self.tmpdir = tempfile.mkdtemp(prefix="mxtest-")
        self._proxies = []
        self._cleanups_objs = []

    def track(self, obj):
        self._cleanups_objs.append(obj)
        return obj

    def smtp_backend(self, name="backend", **kw):
        return self.track(SmtpBackend(name, **kw))

    def sink(self, **kw):
        return self.track(SmtpSink(**kw))

    def client(self, port, timeout=5.0):
        return self.track(Client(port, timeout))

    def scripted(self, name="scripted", **kw):
        return self.track(ScriptedSmtpBackend(name, **kw))

    def start_smtp_proxy(self, backends, log_format="logfmt", glob=None, env=None, **opts):
        """mxproxy with one listener 'smtp' in mode smtp (unless opts say
        otherwise) on a free port; the proxy's .port is that port. opts are
        listener keys, glob [global] keys."""
        port = free_port()
        opts.setdefault("mode", "smtp")
        glob = dict(glob or {})
        glob.setdefault("log_format", log_format)
        p = self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, port), backends, **opts),
                                    **glob), log_format=log_format, env=env)
        p.port = port
        return p

    def start_proxy(self, conf_text, log_format="logfmt", **kw):
        if not os.access(binary(), os.X_OK):
            self.fail("mxproxy binary not found or not executable: %s" % binary())
        p = Proxy(conf_text, self.tmpdir, log_format=log_format, **kw)
        self._proxies.append(p)
        p.wait_started()
        return p

    def tearDown(self):
        problems = []
        for obj in reversed(self._cleanups_objs):
            try:
                obj.close()
            except Exception as e:
                problems.append("cleanup %r: %r" % (obj, e))
        for p in self._proxies:
            rc = p.stop()
            if rc != 0:
                problems.append("mxproxy exited with %r (expected 0); log tail:\n%s"
                                % (rc, p.tail()))
            if p.bad_lines:
                problems.append("mxproxy wrote bad stderr lines:\n" + "\n".join(p.bad_lines[:20]))
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if problems:
            self.fail("\n".join(problems))

    # assertions shared by the files
    def assertPairs(self, proxy, sid, expected, timeout=5.0):
        """Once the session has closed: its ev=pair lines are exactly expected
        (a list of pair() dicts), in order. Returns the close event."""
        close = proxy.close_of(sid, timeout)
        got = proxy.find(ev="pair", sid=sid)
        listing = "\n".join(e["_raw"] for e in got)
        self.assertEqual(len(got), len(expected), "pairs of %s:\n%s" % (sid, listing))
        for ev, want in zip(got, expected):
            self.assertEvent(ev, "pair", want)
        return close

    def assertEvent(self, ev, name, fields, lvl="info"):
        """ev is exactly ts, lvl, ev, [sid,] then fields, in that order, with
        those values (str() compared, or a Like)."""
        keys = [k for k in ev if not k.startswith("_")]
        want = ["ts", "lvl", "ev"] + (["sid"] if "sid" in ev else []) + list(fields)
        self.assertEqual(keys, want, "keys of %s" % ev.get("_raw"))
        self.assertEqual((ev["lvl"], ev["ev"]), (lvl, name), ev.get("_raw"))
        for k, v in fields.items():
            if isinstance(v, Like):
                self.assertTrue(v.matches(ev[k]), "%s=%r is not %r in %s"
                                % (k, ev[k], v, ev.get("_raw")))
            else:
                self.assertEqual(str(ev[k]), str(v), "%s= in %s" % (k, ev.get("_raw")))

    def assertWithin(self, value, lo, hi, what):
        if not lo <= value <= hi:
            self.fail("%s: %.3fs not within [%.2f, %.2f]" % (what, value, lo, hi))


def message_body(approx):
    """About approx bytes of 76-char base64 lines ending in CRLF: no line starts
    with '.', so the body needs no dot-stuffing."""
    raw = os.urandom(approx * 57 // 78)
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------
# kernel_relay

KERNEL_RELAYS = ("off", "splice", "sockmap")
_sockmap_why = []


class _Greeter(TcpBackend):
    def handle(self, rec):
        self.send(rec, b"220 probe\r\n")
        while self.recv(rec):
            pass


def sockmap_unavailable():
    """None when mxproxy relays by sockmap on this machine (a build with eBPF, BPF allowed),
    else why not, for a skip. Asks the binary once: one mode tcp session through a probe
    proxy logs ev=kernel_relay (debug) or ev=kernel_relay_unavailable."""
    if not _sockmap_why:
        tmp = tempfile.mkdtemp(prefix="mxtest-")
        b = _Greeter("probe")
        port = free_port()
        p = Proxy(config(listener("probe", "%s:%d" % (HOST, port), b.addr, kernel_relay="sockmap"),
                         log_level="debug"), tmp)
        why = "mxproxy logged neither ev=kernel_relay nor ev=kernel_relay_unavailable"
        try:
            p.wait_started()
            c = Client(port)
            c.recv_until(b"\r\n")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if p.find(ev="kernel_relay"):
                    why = None
                    break
                bad = p.find(ev="kernel_relay_unavailable")
                if bad:
                    why = "kernel_relay = sockmap unavailable: %s" % bad[0].get("reason")
                    break
                time.sleep(0.02)
            c.close()
        finally:
            p.stop()
            b.close()
            shutil.rmtree(tmp, ignore_errors=True)
        _sockmap_why.append(why)
    return _sockmap_why[0]


def kernel_relay_variants(base, module_globals, values=("splice", "sockmap")):
    """Adds a subclass of the test case base per kernel_relay value to module_globals (named
    BASE_VALUE, with KERNEL_RELAY = value); the sockmap one skips where sockmap is
    unavailable."""
    for value in values:
        def setUp(self, _base=base, _value=value):
            if _value == "sockmap" and sockmap_unavailable():
                self.skipTest(sockmap_unavailable())
            _base.setUp(self)
        name = "%s_%s" % (base.__name__, value)
        module_globals[name] = type(name, (base,), {"KERNEL_RELAY": value, "setUp": setUp,
                                                    "__module__": base.__module__})


# --------------------------------------------------------------------------
# Runner


class _Result(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows = []
        self._t0 = {}

    def startTest(self, test):
        self._t0[test.id()] = time.monotonic()
        super().startTest(test)

    def _row(self, test, status):
        self.rows.append((status, time.monotonic() - self._t0.get(test.id(), time.monotonic()),
                          test.id()))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._row(test, "PASS")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._row(test, "FAIL")

    def addError(self, test, err):
        super().addError(test, err)
        self._row(test, "ERROR")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._row(test, "SKIP")


def main():
    """Entry point of every test file: argv[1] is the mxproxy binary."""
    global BINARY
    argv = list(sys.argv)
    if len(argv) > 1 and ("/" in argv[1] or os.path.isfile(argv[1])):
        BINARY = os.path.abspath(argv.pop(1))
    raise_nofile()
    t0 = time.monotonic()
    runner = unittest.TextTestRunner(verbosity=2, resultclass=_Result)
    prog = unittest.main(argv=argv, testRunner=runner, exit=False)
    res = prog.result
    print("\n==== %s summary (binary %s, %.1fs) ====" % (os.path.basename(argv[0]), binary(),
                                                      time.monotonic() - t0))
    for status, secs, name in getattr(res, "rows", []):
        print("%-5s %6.2fs  %s" % (status, secs, name))
    ok = res.wasSuccessful()
    print("RESULT: %s (%d run, %d failed, %d errors, %d skipped)"
          % ("PASS" if ok else "FAIL", res.testsRun, len(res.failures), len(res.errors),
             len(res.skipped)))
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------
# Network namespaces (interception tests): made and removed by the tests


CLONE_NEWNET = 0x40000000


def _setns(fd):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


class in_netns:
    """with in_netns("name"): sockets created in the block live in that
    network namespace (only the calling thread switches; it switches back at
    the end). The sockets keep working from any thread afterwards."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open("/run/netns/%s" % self.name, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            _setns(self.home)
        finally:
            os.close(self.home)
        return False


def netns_run(ns, *args, timeout=20, env=None, check=True):
    """Runs args inside network namespace ns; returns the CompletedProcess
    (stdout and stderr as text). check: raise with stderr on failure."""
    r = subprocess.run(["ip", "netns", "exec", ns] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       env=env, text=True)
    if check and r.returncode != 0:
        raise AssertionError("in %s: %s exited %d: %s%s" % (ns, " ".join(args), r.returncode,
                                                           r.stdout, r.stderr))
    return r


def netns_unavailable():
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    name = "mxprobe%d" % os.getpid()
    r = subprocess.run(["ip", "netns", "add", name], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=10)
    if r.returncode != 0:
        return "cannot create a network namespace: %s" % r.stdout.decode().strip()
    subprocess.run(["ip", "netns", "del", name], timeout=10)
    return None


# --- A private Postfix instance, shared by the tests that run one ---

POSTFIX = "/usr/sbin/postfix"


class PrivatePostfix:
    """A private Postfix instance: its own main.cf, master.cf, queue and mail log in a temporary
    directory, run as `postfix -c DIR start-fg` (needs root). A test file subclasses it and,
    in its __init__, calls super().__init__() (which makes .dir with queue/, data/ and subdirs),
    writes its files (write_main_cf, write_master_cf, write), then start()."""

    # Postfix's internal services every instance runs; write_master_cf adds its own before them.
    BASE_SERVICES = """postlog   unix-dgram n - n - 1 postlogd
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
"""
    wait_timeout = 5.0  # wait_log's default

    def __init__(self, prefix="mxtest-postfix-", subdirs=()):
        import pwd

        self.proc = None
        self.dir = d = tempfile.mkdtemp(prefix=prefix)
        os.chmod(d, 0o755)
        for sub in ("queue", "data") + tuple(subdirs):
            os.mkdir(os.path.join(d, sub))
        self.postfix_pw = pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(d, "data"), pw.pw_uid, pw.pw_gid)
        self.maillog = os.path.join(d, "maillog")

    def write(self, name, text):
        """Writes text to the file name in .dir; returns its path."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def write_main_cf(self, settings):
        """main.cf: queue, data directory and owners, then settings (lines, each ending in a
        newline), then the mail log in .dir."""
        self.write("main.cf", """compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
{settings}maillog_file_prefixes = {d}
maillog_file = {d}/maillog
biff = no
smtputf8_enable = no
""".format(d=self.dir, settings=settings))

    def write_master_cf(self, services):
        """master.cf: services (lines, each ending in a newline), then BASE_SERVICES."""
        self.write("master.cf", services + self.BASE_SERVICES)

    def start(self, ports=()):
        """Starts Postfix; waits for each of ports (15 s for the first, 5 s for each other),
        or with no ports for the master's "daemon started". Closes the instance on failure."""
        self.proc = subprocess.Popen([POSTFIX, "-c", self.dir, "start-fg"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     cwd=self.dir)
        try:
            if ports:
                for i, port in enumerate(ports):
                    wait_port(port, 15 if i == 0 else 5, self.proc)
            else:
                self.wait_log(r"postfix/master\[\d+\]: daemon started", 15)
        except BaseException:
            self.close()
            raise

    def log(self):
        """The mail log so far ("" before Postfix wrote one)."""
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, regex, timeout=None):
        """The first match of regex in the mail log, polled until timeout (wait_timeout when
        None) or until Postfix exits."""
        if timeout is None:
            timeout = self.wait_timeout
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(regex, self.log(), re.M)
            if m:
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("no %r in postfix's log within %.1fs:\n%s"
                                     % (regex, timeout, self.log()[-3000:]))
            time.sleep(0.05)

    def close(self):
        subprocess.run([POSTFIX, "-c", self.dir, "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- A private Dovecot instance (POP3 and IMAP backends) ---

DOVECOT = "/usr/sbin/dovecot"


class PrivateDovecot:
    """A private Dovecot 2.3: its own dovecot.conf, users, maildirs and log in a temporary
    directory, run in the foreground as `dovecot -F -c DIR/dovecot.conf` (needs root: mail
    processes run as nobody, login processes as dovenull). It binds 127.0.0.1 only, on free
    ports, one listener per name in protocols:

        "pop3" (STLS offered), "pop3s" (implicit TLS), "imap" (STARTTLS offered), "imaps"

    .ports[name] is each listener's port. users maps user names to passwords (PLAIN in a
    passwd-file; mechanisms PLAIN and LOGIN, plaintext logins allowed without TLS).
    login_trusted_networks is trusted (mxproxy's own address by default), so XCLIENT (POP3) and
    ID (IMAP) from there set the client's address; Dovecot logs it as rip= in its login lines.
    tls is the CertPair Dovecot presents (the test CA's mx.example.test by default).

    Messages: add_message(user, raw) before or after start() (Maildir new/; raw: bytes with
    LF or CRLF line ends, stored as given). Logs: log(), wait_log(regex). close() stops
    Dovecot by pid and removes the directory."""

    wait_timeout = 5.0  # wait_log's default

    def __init__(self, protocols=("pop3",), users=None, trusted="127.0.0.1/32", tls=None,
                 extra="", prefix="mxtest-dovecot-"):
        import pwd

        self.proc = None
        self.users = dict(users or {"alice": "alice-secret"})
        self.dir = d = tempfile.mkdtemp(prefix=prefix)
        os.chmod(d, 0o755)
        self.nobody = pwd.getpwnam("nobody")
        self.mail = os.path.join(d, "mail")
        os.mkdir(self.mail)
        os.chown(self.mail, self.nobody.pw_uid, self.nobody.pw_gid)
        for sub in ("run", "state"):
            os.mkdir(os.path.join(d, sub))
        self.logfile = os.path.join(d, "dovecot.log")
        self._seq = 0
        tls = tls or pki().mx
        self.ports = {name: free_port() for name in protocols}
        with open(os.path.join(d, "users"), "w") as f:
            for user, password in self.users.items():
                f.write("%s:{PLAIN}%s:%d:%d::%s/%s\n" % (user, password, self.nobody.pw_uid,
                                                         self.nobody.pw_gid, self.mail, user))
        for user in self.users:
            self.maildir(user)
        # Every listener a login service has by default is named here: those not asked for
        # get port 0, so the instance never binds 110, 143, 993 or 995.
        services, protos = "", []
        for proto in ("pop3", "imap"):
            block = ""
            for name in (proto, proto + "s"):
                if name in self.ports:
                    block += ("  inet_listener %s {\n    address = %s\n    port = %d\n"
                              "    ssl = %s\n  }\n" % (name, HOST, self.ports[name],
                                                      "yes" if name.endswith("s") else "no"))
                else:
                    block += "  inet_listener %s {\n    port = 0\n  }\n" % name
            services += "service %s-login {\n%s}\n" % (proto, block)
            if proto in self.ports or proto + "s" in self.ports:
                protos.append(proto)
        protos = " ".join(protos)
        self.conf = os.path.join(d, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write("""protocols = {protos}
listen = {host}
base_dir = {d}/run
state_dir = {d}/state
instance_name = {name}
log_path = {log}
info_log_path = {log}
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
mail_location = maildir:~
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = {trusted}
login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l mpid=%e %c session=<%{{session}}>
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{services}{extra}
""".format(protos=protos, host=HOST, d=d, name=os.path.basename(d), log=self.logfile,
           uid=self.nobody.pw_uid, cert=tls.cert, key=tls.key, trusted=trusted,
           services=services, extra=extra))

    def maildir(self, user):
        """The Maildir of user (made, owned by nobody)."""
        path = os.path.join(self.mail, user)
        for sub in ("", "cur", "new", "tmp"):
            p = os.path.join(path, sub)
            if not os.path.isdir(p):
                os.mkdir(p)
                os.chown(p, self.nobody.pw_uid, self.nobody.pw_gid)
        return path

    def add_message(self, user, raw):
        """Stores raw (bytes) as a new message in user's INBOX; returns its path."""
        self._seq += 1
        name = "%d.M%dP%d.mxtest" % (1700000000 + self._seq, self._seq, os.getpid())
        path = os.path.join(self.maildir(user), "new", name)
        with open(path, "wb") as f:
            f.write(raw)
        os.chown(path, self.nobody.pw_uid, self.nobody.pw_gid)
        return path

    def start(self):
        """Starts Dovecot and waits (15 s) for every listener; closes the instance on failure."""
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, cwd=self.dir)
        try:
            deadline = time.monotonic() + 15
            for port in self.ports.values():
                wait_port(port, max(0.1, deadline - time.monotonic()), self.proc)
        except BaseException:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""
            self.close()
            raise AssertionError("dovecot did not start: %s\n%s" % (err, self.log()[-3000:]))

    def log(self):
        """Dovecot's log so far ("" before it wrote one)."""
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, regex, timeout=None):
        """The first match of regex in Dovecot's log, polled until timeout (wait_timeout when
        None) or until Dovecot exits."""
        if timeout is None:
            timeout = self.wait_timeout
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(regex, self.log(), re.M)
            if m:
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("no %r in dovecot's log within %.1fs:\n%s"
                                     % (regex, timeout, self.log()[-3000:]))
            time.sleep(0.05)

    def close(self):
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
            self.proc.stderr.close()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Sessions through a ScriptedSmtpBackend with its default replies, and mxproxy's 421s ---

SCRIPTED_EHLO_REPLY = (b"250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
                       b"250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
BACKEND_CLOSED = b"421 4.4.2 mxproxy: backend closed the connection\r\n"
IDLE = b"421 4.4.2 mxproxy: idle timeout, closing connection\r\n"
SHUTTING_DOWN = b"421 4.3.2 mxproxy: service shutting down, closing connection\r\n"


def scripted_greeting_pair(text="scripted ESMTP"):
    """The ev=pair fields of a ScriptedSmtpBackend's greeting."""
    return pair("<greeting>", 220, text)


def scripted_ehlo_pair(name="client.example", pipelined=0):
    """The ev=pair fields of EHLO name answered by a ScriptedSmtpBackend."""
    return pair("EHLO " + name, 250, "scripted", lines=6, pipelined=pipelined)


class ScriptedSessionTestCase(ProxyTestCase):
    """A ProxyTestCase whose open() starts a session through a ScriptedSmtpBackend."""

    def open(self, proxy):
        """A client of proxy that read the greeting and sent EHLO client.example, each
        answered exactly as a ScriptedSmtpBackend does; returns (client, sid)."""
        c = self.client(proxy.port)
        self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
        self.assertEqual(c.cmd(b"EHLO client.example"), SCRIPTED_EHLO_REPLY)
        return c, proxy.sid_of(c)
