#!/usr/bin/python3
"""bench/imap.py: mode imap against mode tcp, HAProxy and a direct connection, in front of a
private Dovecot (the test suite's mxtest.PrivateDovecot), on loopback.

For each target it runs SESSIONS IMAP sessions (greeting, then LOGIN, SELECT INBOX, FETCH 1
BODY[] of a MSG-byte message and LOGOUT pipelined in one write), CONCURRENCY at a time, and
reports what bench/pop3.py reports: greeting latency (connect to the greeting's last byte,
median and p90, ms), sessions/s, and the proxy's CPU per session (us).

    sudo bench/imap.py [--sessions 2000] [--concurrency 16] [--rounds 3] [--msg 20000]

Needs root (Dovecot), dovecot-imapd, haproxy (its column is skipped without it) and a Release
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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pop3 import build_mxproxy, dovecot_extra, mxtest, recv_until, run_target  # noqa: E402

USER, PASSWORD = "alice", "alice-bench-pw"


def imap_session(port, msg_len):
    """One session; returns the greeting latency in seconds."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), 10)
    try:
        greeting, buf = recv_until(s, b"", b"\r\n")
        t_greet = time.monotonic() - t0
        assert greeting.startswith(b"* OK"), greeting
        s.sendall(b"a LOGIN %s %s\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\nd LOGOUT\r\n"
                  % (USER.encode(), PASSWORD.encode()))
        out, buf = recv_until(s, buf, b"\r\nd OK ")
        assert b"a OK " in out and b"\r\nb OK " in out and b"\r\nc OK " in out, out[-300:]
        assert len(out) > msg_len, len(out)
    finally:
        s.close()
    return t_greet


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
    tmp = tempfile.mkdtemp(prefix="mxbench-imap-")
    procs = []
    dovecot = mxtest.PrivateDovecot(protocols=("imap",), users={USER: PASSWORD},
                                    extra=dovecot_extra("imap"))
    body = mxtest.message_body(args.msg)
    dovecot.add_message(USER, b"From: a@example.test\r\nSubject: bench\r\n\r\n" + body)
    try:
        dovecot.start()
        backend = "127.0.0.1:%d" % dovecot.ports["imap"]
        targets = [("direct", dovecot.ports["imap"], None)]
        # mode tcp logs at warn (nothing per session); mode imap as deployed (transcript =
        # pairs, log_level = info: one ev=pair per command, to a file) and without logs.
        for name, mode, level, extra in (("mxproxy-tcp", "tcp", "warn", ""),
                                         ("mxproxy-imap", "imap", "info", ""),
                                         ("mxproxy-imap-quiet", "imap", "warn",
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
        # warm Dovecot up
        run_target(targets[0][1], None, 200, args.concurrency, args.msg, imap_session)
        results = {name: [] for name, _, _ in targets}
        for _ in range(args.rounds):
            for name, port, pid in targets:  # interleaved, so drift hits every target alike
                results[name].append(run_target(port, pid, args.sessions, args.concurrency,
                                                args.msg, imap_session))
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
