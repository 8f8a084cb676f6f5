#!/usr/bin/python3
"""bench/pop3.py: mode pop3 against mode tcp, HAProxy and a direct connection, in front of a
private Dovecot (the test suite's mxtest.PrivateDovecot), on loopback.

For each target it runs SESSIONS POP3 sessions (greeting, USER, PASS, STAT, RETR 1 of a
MSG-byte message, QUIT), CONCURRENCY at a time, and reports:
  - greeting latency: connect to the greeting's last byte, median and p90 (ms);
  - sessions/s over the whole run (Dovecot's own login and mail processes bound it);
  - the proxy's CPU per session (user+system from /proc/PID/stat, over the run, in us).

    sudo bench/pop3.py [--sessions 2000] [--concurrency 16] [--rounds 3] [--msg 20000]

Needs root (Dovecot), dovecot-pop3d, haproxy (its column is skipped without it) and a Release
build of mxproxy in build-bench/ (made here if missing, as bench/run does).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import mxtest  # noqa: E402

BUILD = os.path.join(ROOT, "build-bench")
USER, PASSWORD = "alice", "alice-bench-pw"


def build_mxproxy():
    binary = os.path.join(BUILD, "mxproxy")
    subprocess.run(["cmake", "-S", ROOT, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", BUILD, "-j2", "--target", "mxproxy"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def dovecot_extra(proto):
    """Dovecot's settings for a bench: no per-IP session limit, and its high-performance
    mode (login processes and PROTO processes serve many connections and a few wait
    ready), so a session costs Dovecot no fork and every target is measured against a
    backend that answers at once, not against process start-up (~200 ms a session here in
    the default high-security mode)."""
    return ("mail_max_userip_connections = 10000\n"
            "service %s-login {\n  service_count = 0\n  process_min_avail = 2\n}\n"
            "service %s {\n  service_count = 1000\n  process_min_avail = 2\n}\n"
            % (proto, proto))


def cpu_seconds(pid):
    """user + system CPU of pid and its threads, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def recv_until(sock, buf, term):
    while term not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(buf[-200:])
        buf += chunk
    i = buf.index(term) + len(term)
    return buf[:i], buf[i:]


def one_session(port, msg_len):
    """One session; returns the greeting latency in seconds."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), 10)
    try:
        greeting, buf = recv_until(s, b"", b"\r\n")
        t_greet = time.monotonic() - t0
        s.sendall(b"USER %s\r\nPASS %s\r\nSTAT\r\nRETR 1\r\nQUIT\r\n"
                  % (USER.encode(), PASSWORD.encode()))
        for _ in range(3):
            line, buf = recv_until(s, buf, b"\r\n")
            assert line.startswith(b"+OK"), line
        body, buf = recv_until(s, buf, b"\r\n.\r\n")
        assert len(body) > msg_len, len(body)
        line, buf = recv_until(s, buf, b"\r\n")
        assert line.startswith(b"+OK"), line
    finally:
        s.close()
    return t_greet


def run_target(port, pid, sessions, concurrency, msg_len, session=None):
    """Runs sessions (one_session unless given) against port; pid's CPU is measured."""
    session = session or one_session
    lat, errors = [], []
    lock = threading.Lock()
    todo = [sessions]

    def worker():
        while True:
            with lock:
                if todo[0] == 0:
                    return
                todo[0] -= 1
            try:
                t = session(port, msg_len)
                with lock:
                    lat.append(t)
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(repr(e))

    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    lat.sort()
    return {
        "greet_p50_ms": 1000 * statistics.median(lat),
        "greet_p90_ms": 1000 * lat[int(0.9 * (len(lat) - 1))],
        "sessions_s": len(lat) / wall,
        "cpu_us": 1e6 * cpu / max(1, len(lat)) if pid else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--msg", type=int, default=20000, help="message size in bytes")
    ap.add_argument("--binary", default=None, help="mxproxy to run (default: build-bench/)")
    args = ap.parse_args()

    mxtest.raise_nofile()
    binary = args.binary or build_mxproxy()
    tmp = tempfile.mkdtemp(prefix="mxbench-pop3-")
    procs = []
    dovecot = mxtest.PrivateDovecot(protocols=("pop3",), users={USER: PASSWORD},
                                    extra=dovecot_extra("pop3"))
    body = mxtest.message_body(args.msg)
    dovecot.add_message(USER, b"From: a@example.test\r\nSubject: bench\r\n\r\n" + body)
    try:
        dovecot.start()
        backend = "127.0.0.1:%d" % dovecot.ports["pop3"]
        targets = [("direct", dovecot.ports["pop3"], None)]
        # mode tcp logs at warn (nothing per session); mode pop3 as deployed (transcript =
        # pairs, log_level = info: one ev=pair per command, to a file) and without logs.
        for name, mode, level, extra in (("mxproxy-tcp", "tcp", "warn", ""),
                                         ("mxproxy-pop3", "pop3", "info", ""),
                                         ("mxproxy-pop3-quiet", "pop3", "warn",
                                          "transcript = off\n")):
            port = mxtest.free_port()
            conf = os.path.join(tmp, "%s.ini" % name)
            with open(conf, "w") as f:
                f.write("[global]\nworkers = 2\nlog_level = %s\n\n[listener b]\nlisten = "
                        "127.0.0.1:%d\nbackend = %s\nmode = %s\n%s"
                        % (level, port, backend, mode, extra))
            log = open(os.path.join(tmp, "%s.log" % name), "wb")
            p = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL, stderr=log,
                                 start_new_session=True)
            procs.append(p)
            mxtest.wait_port(port, 10, p)
            targets.append((name, port, p.pid))
        if shutil.which("haproxy"):
            port = mxtest.free_port()
            conf = os.path.join(tmp, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write("global\n  nbthread 2\ndefaults\n  mode tcp\n"
                        "  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
                        "listen b\n  bind 127.0.0.1:%d\n  server s %s\n" % (port, backend))
            p = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            mxtest.wait_port(port, 10, p)
            targets.append(("haproxy", port, p.pid))
        run_target(targets[0][1], None, 200, args.concurrency, args.msg)  # warm Dovecot up
        results = {name: [] for name, _, _ in targets}
        for r in range(args.rounds):
            for name, port, pid in targets:  # interleaved, so drift hits every target alike
                results[name].append(run_target(port, pid, args.sessions, args.concurrency,
                                                args.msg))
        print("sessions=%d concurrency=%d rounds=%d message=%d bytes; medians over rounds"
              % (args.sessions, args.concurrency, args.rounds, args.msg))
        print("%-18s %12s %12s %12s %14s %7s" % ("target", "greet p50 ms", "greet p90 ms",
                                                 "sessions/s", "cpu us/session", "errors"))
        for name, _, _ in targets:
            rs = results[name]
            med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
            cpu = "-" if rs[0]["cpu_us"] is None else "%.1f" % med("cpu_us")
            print("%-18s %12.3f %12.3f %12.0f %14s %7d" % (
                name, med("greet_p50_ms"), med("greet_p90_ms"), med("sessions_s"), cpu,
                sum(x["errors"] for x in rs)))
            for x in rs:
                if x["first_error"]:
                    print("  first error: %s" % x["first_error"])
    finally:
        for p in procs:
            mxtest.stop_process(p)
        dovecot.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
