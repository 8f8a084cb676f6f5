"""The README's run command, `bash conf/run`, end to end: it starts its own smtp-sink backends
for conf/mxproxy.ini, the README's swaks and openssl s_client lines go through, mxproxy logs
exactly the lines the README shows (fields and values; only timestamps, ids, timings, client
ports, sizes and host names may differ), and a Ctrl-C (SIGINT to the command's process group,
as a terminal sends it) stops mxproxy and both servers, the servers only once mxproxy has
drained an open session. A real mail server in place of the
first backend line is used as it is, and no test server is started for it.

MXTEST_PRINT_RUN=1 prints the lines of a run as the README shows them."""

import os
import re
import signal
import subprocess
import tempfile
import time
import unittest

import mxtest
from mxtest import HOST, REPO

DEMO_PORTS = (2525, 2526, 2527, 2528)  # conf/mxproxy.ini's listen and backend ports

# Fields whose values differ from run to run; the README shows one run's values.
VOLATILE = {"ts", "sid", "ms", "client", "bytes_up", "bytes_down", "size", "helo", "version",
            "config", "at_ms"}


def readme_demo_lines():
    """The log block of the README's "The two commands" section (the first ``` block there
    holding an ev= line)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("## The two commands")
    end = text.index("\n## ", start + 1)
    block, fence = None, None
    for line in text[start:end].split("\n"):
        if line.startswith("```"):
            if fence is None:
                fence, block = line, []
                continue
            if any("ev=" in b for b in block):
                return block
            fence = None
        elif fence is not None:
            block.append(line)
    raise AssertionError("no log block in the README's 'The two commands' section")


def readme_commands():
    """The README's swaks and openssl lines of that section, split into argv lists."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("## The two commands")
    end = text.index("\n## ", start + 1)
    cmds = [ln.split() for ln in text[start:end].split("\n")
            if ln.startswith("swaks ") or ln.startswith("openssl s_client ")]
    return cmds


class RunCommandTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="mxtest-run-")
        self.addCleanup(self.tmp.cleanup)
        self.ports = [mxtest.free_port() for _ in DEMO_PORTS]
        self.proc = None
        self.addCleanup(self.kill_all)
        self.pids = []

    def kill_all(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def config(self, edit=None):
        """conf/mxproxy.ini on this test's free ports, edited by edit(text) -> text."""
        with open(os.path.join(REPO, "conf", "mxproxy.ini")) as f:
            text = f.read()
        for demo, port in zip(DEMO_PORTS, self.ports):
            text = text.replace("127.0.0.1:%d" % demo, "127.0.0.1:%d" % port)
        if edit is not None:
            text = edit(text)
        path = os.path.join(self.tmp.name, "mxproxy.ini")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, path):
        self.err_path = os.path.join(self.tmp.name, "stderr")
        env = dict(os.environ, MXPROXY=mxtest.binary())
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["bash", "conf/run", path], cwd=REPO, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        self.wait_line(r"lvl=info ev=start ", 20)

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def wait_line(self, regex, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not re.search(regex, self.stderr(), re.M):
            if self.proc.poll() is not None:
                self.fail("conf/run exited %s before %r:\n%s"
                          % (self.proc.returncode, regex, self.stderr()))
            if time.monotonic() > deadline:
                self.fail("no %r within %.0fs:\n%s" % (regex, timeout, self.stderr()))
            time.sleep(0.02)

    def started_pids(self):
        """The pids conf/run reports: its servers', then mxproxy's."""
        pids = [int(p) for p in re.findall(r"^conf/run: .* pid (\d+)", self.stderr(), re.M)]
        self.pids = pids
        return pids

    def ctrl_c(self):
        """SIGINT to the command's process group, as a terminal's Ctrl-C; the command must
        exit 0 and every process it started must be gone."""
        pids = self.started_pids()
        os.killpg(self.proc.pid, signal.SIGINT)
        self.assertEqual(self.proc.wait(15), 0, self.stderr())
        deadline = time.monotonic() + 5
        for pid in pids:
            while os.path.exists("/proc/%d" % pid):
                self.assertLess(time.monotonic(), deadline, "pid %d still runs after Ctrl-C" % pid)
                time.sleep(0.02)

    def run_client(self, argv, stdin_lines=None):
        """Runs a README client line against this test's ports."""
        for demo, port in zip(DEMO_PORTS, self.ports):
            argv = [a.replace("127.0.0.1:%d" % demo, "127.0.0.1:%d" % port) for a in argv]
        if stdin_lines is None:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            return r.returncode, r.stdout.decode(errors="replace")
        # Typed lines: each waits for the reply to the one before, as a person would.
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        out = b""
        try:
            os.set_blocking(p.stdout.fileno(), False)
            for line, want in stdin_lines:
                p.stdin.write(line)
                p.stdin.flush()
                deadline = time.monotonic() + 10
                while want not in out:
                    self.assertLess(time.monotonic(), deadline, "no %r from s_client: %r"
                                    % (want, out[-500:]))
                    chunk = p.stdout.read()
                    if chunk:
                        out += chunk
                    else:
                        time.sleep(0.02)
            p.stdin.close()
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        return p.returncode, out.decode(errors="replace")

    def actual_lines(self):
        """The command's stderr with this test's ports and binary written as the README's."""
        text = self.stderr()
        for demo, port in zip(DEMO_PORTS, self.ports):
            text = text.replace("127.0.0.1:%d" % port, "127.0.0.1:%d" % demo)
        text = text.replace("conf/run: %s pid" % mxtest.binary(), "conf/run: build/mxproxy pid")
        text = text.replace("config=%s" % os.path.join(self.tmp.name, "mxproxy.ini"),
                            "config=conf/mxproxy.ini")
        return text.rstrip("\n").split("\n")

    def assert_same_line(self, shown, got, i):
        where = "line %d of the README's log block:\n  README: %s\n  actual: %s" % (i + 1, shown,
                                                                                  got)
        if shown.startswith("conf/run:"):
            norm = re.compile(r"pid \d+")
            self.assertEqual(norm.sub("pid N", shown), norm.sub("pid N", got), where)
            return
        s, g = mxtest.parse_logfmt(shown), mxtest.parse_logfmt(got)
        self.assertEqual(list(s), list(g), "fields differ, " + where)
        for k in s:
            if k in VOLATILE:
                continue
            sv, gv = s[k], g[k]
            if k == "cmd" and sv.startswith("EHLO ") and gv.startswith("EHLO ") \
                    and s.get("local") != "1" and sv != "EHLO mail.example.com":
                continue  # swaks says EHLO with the host's name
            self.assertEqual(sv, gv, "%s differs, %s" % (k, where))

    def test_readme_run_command_and_its_log_lines(self):
        self.start(self.config())
        pids = self.started_pids()
        self.assertEqual(len(pids), 3, self.stderr())  # two smtp-sinks, then mxproxy
        cmds = readme_commands()
        self.assertEqual([c[0] for c in cmds], ["swaks", "swaks", "openssl"], cmds)

        rc, out = self.run_client(cmds[0])
        self.assertEqual(rc, 0, out)
        self.assertIn("<-  250 2.0.0 Ok", out)
        self.wait_line(r"ev=close .*messages=1")
        rc, out = self.run_client(cmds[1])
        self.assertEqual(rc, 24, out)  # swaks: no recipients accepted
        self.assertIn("<** 550 5.1.1 Recipient address rejected: User unknown", out)
        self.wait_line(r"ev=close .*primary_error=")
        rc, out = self.run_client(cmds[2], [(b"", b"Verify return code"),
                                            (b"EHLO me\n", b"250-"), (b"QUIT\n", b"221 ")])
        self.wait_line(r"ev=close .*tls_client=")
        self.ctrl_c()

        shown, got = readme_demo_lines(), self.actual_lines()
        if os.environ.get("MXTEST_PRINT_RUN"):  # to update the README after a change
            print("\n".join(got))
        for i, (s, g) in enumerate(zip(shown, got)):
            self.assert_same_line(s, g, i)
        self.assertEqual(len(shown), len(got), "the README shows %d lines, the run printed %d:\n%s"
                         % (len(shown), len(got), "\n".join(got)))
        for port in self.ports:
            self.assertTrue(mxtest.connect_refused(port), "port %d still open" % port)

    def test_ctrl_c_drains_before_the_servers_stop(self):
        """An open session outlives the Ctrl-C: mxproxy drains it, its test server still
        answers, and only when mxproxy has exited are the servers stopped."""
        self.start(self.config())
        c = mxtest.Client(self.ports[0])
        self.addCleanup(c.close)
        self.assertEqual(c.recv_until(b"\r\n"), mxtest.SINK_GREETING)
        c.send(b"EHLO me\r\nMAIL FROM:<me@example.com>\r\n")
        c.recv_until(b"250 2.1.0 Ok\r\n")
        pids = self.started_pids()
        os.killpg(self.proc.pid, signal.SIGINT)
        self.wait_line(r"ev=drain sessions=1 ")
        time.sleep(0.3)
        self.assertIsNone(self.proc.poll(), "conf/run exited with a session open")
        for pid in pids:
            self.assertTrue(os.path.exists("/proc/%d" % pid), "pid %d stopped early" % pid)
        c.send(b"RCPT TO:<you@example.com>\r\nQUIT\r\n")
        self.assertEqual(c.recv_until(b"221 Bye\r\n"), b"250 2.1.5 Ok\r\n221 Bye\r\n")
        self.assertEqual(self.proc.wait(15), 0, self.stderr())
        self.wait_line(r"ev=close .*end=quit .*rcpt_ok=1")
        deadline = time.monotonic() + 5
        for pid in pids:
            while os.path.exists("/proc/%d" % pid):
                self.assertLess(time.monotonic(), deadline, "pid %d still runs" % pid)
                time.sleep(0.02)

    def test_own_mail_server_by_changing_one_backend_line(self):
        mine = mxtest.SmtpSink()
        self.addCleanup(mine.close)
        old = "backend = 127.0.0.1:%d ; conf/run: smtp-sink\n" % self.ports[1]
        path = self.config(lambda t: t.replace(old, "backend = %s\n" % mine.addr)
                           if old in t else self.fail("no %r in conf/mxproxy.ini" % old))
        self.start(path)
        self.assertEqual(len(self.started_pids()), 2, self.stderr())  # refuse's sink, mxproxy
        self.assertNotIn("127.0.0.1:%d" % self.ports[1], self.stderr())
        self.assertTrue(mxtest.connect_refused(self.ports[1]))
        rc, out = self.run_client(readme_commands()[0])
        self.assertEqual(rc, 0, out)
        self.wait_line(r"ev=close .*listener=smtp end=quit .*backend=%s .*messages=1"
                       % re.escape(mine.addr))
        self.ctrl_c()
        self.assertIsNone(mine.proc.poll(), "conf/run must leave a server it did not start")


if __name__ == "__main__":
    mxtest.main()
