#!/usr/bin/python3
"""CPU cost of mxproxy's health checker: one listener with 64 backends (127.0.0.1 to
127.0.0.64, all one smtp-sink on 0.0.0.0), health_check = smtp (the longest dialogue:
greeting, EHLO, QUIT) at the default health_interval (5s), no client traffic (the two scrapes of /metrics that count the checks are outside the
measured span). Reads the
CPU time of all its threads from /proc/PID/task/*/schedstat before and after SECONDS and prints it as a share
of one core, next to the same run with health_check = off (what an idle mxproxy costs).

    bench/health_cpu.py build/mxproxy [SECONDS]     # default 60
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

SINK = "/usr/sbin/smtp-sink"
BACKENDS = 64


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    """CPU time of every thread of pid, in seconds, at nanosecond resolution (schedstat)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
            total += int(f.read().split()[0])
    return total / 1e9


def checks(admin):
    """mxproxy_backend_health_checks_total summed over backends and results."""
    import urllib.request
    with urllib.request.urlopen("http://%s/metrics" % admin, timeout=5) as r:
        text = r.read().decode()
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mxproxy_backend_health_checks_total{"))


def run(binary, check, seconds, sink_port):
    port = free_port()
    backends = "\n".join("backend = 127.0.0.%d:%d" % (i, sink_port)
                         for i in range(1, BACKENDS + 1))
    admin = "127.0.0.1:%d" % free_port()
    conf = ("[global]\nworkers = 1\nlog_level = warn\nadmin = %s\n[listener bench]\n"
            "listen = 127.0.0.1:%d\n%s\nmode = smtp\nhealth_check = %s\n"
            % (admin, port, backends, check))
    with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as f:
        f.write(conf)
    proc = subprocess.Popen([binary, "-c", f.name], stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        if proc.poll() is not None:
            sys.exit("mxproxy exited: %s" % proc.communicate()[1].decode())
        n0, t0, c0 = checks(admin), time.monotonic(), cpu_seconds(proc.pid)
        time.sleep(seconds)
        t1, c1, n1 = time.monotonic(), cpu_seconds(proc.pid), checks(admin)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1].decode()
        os.unlink(f.name)
    downs = err.count("ev=backend_down")
    return (c1 - c0) / (t1 - t0), n1 - n0, downs


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    sink_port = free_port()
    args = [SINK] + (["-u", "nobody"] if os.geteuid() == 0 else [])
    sink = subprocess.Popen(args + ["0.0.0.0:%d" % sink_port, "256"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for check in ("off", "smtp"):
            share, n, downs = run(binary, check, seconds, sink_port)
            print("health_check = %-5s %d backends, %.0fs: %.3f%% of a core, %d checks "
                  "(%d backend_down)" % (check, BACKENDS, seconds, share * 100, n, downs))
    finally:
        sink.terminate()
        sink.wait(timeout=10)


if __name__ == "__main__":
    main()
