"""The log writer under a blocked stderr: lines are dropped whole, never cut.

mxproxy runs with its stderr on a pipe nobody reads while a client makes it log several
megabytes (transcript = full, 3,000-byte NOOP lines), far more than its 1 MiB queue and the
64 KiB pipe hold. Then the pipe is drained: every line must parse as a whole log line, and the
drop report must be a line of its own, exactly `ev=log_dropped lines=N`.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import mxtest
from mxtest import HOST

NOOPS = 1500
ARG = b"x" * 3000
BATCH = 50


class LogWriterTest(unittest.TestCase):

    def setUp(self):
        self.tmpdir = tempfile.mkdtemp(prefix="mxtest-logw-")
        self.backend = mxtest.ScriptedSmtpBackend()
        self.proc = None

    def tearDown(self):
        if self.proc is not None and self.proc.poll() is None:
            mxtest.stop_process(self.proc, signal.SIGKILL, 10)
        self.backend.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def test_flood_on_blocked_stderr_keeps_lines_whole(self):
        port = mxtest.free_port()
        conf = os.path.join(self.tmpdir, "mxproxy.conf")
        with open(conf, "w") as f:
            f.write(mxtest.config(mxtest.listener("smtp", "%s:%d" % (HOST, port),
                                                  self.backend.addr, mode="smtp",
                                                  transcript="full")))
        self.proc = subprocess.Popen([mxtest.binary(), "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        mxtest.wait_port(port, 10, self.proc)
        c = mxtest.Client(port, timeout=20)
        out = bytearray()
        lock = threading.Lock()

        def drain():
            fd = self.proc.stderr.fileno()
            while True:
                data = os.read(fd, 65536)
                if not data:
                    return
                with lock:
                    out.extend(data)

        def wait_for(needle, timeout=30.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with lock:
                    if needle in out:
                        return
                time.sleep(0.05)
            self.fail("no %r in mxproxy's stderr" % needle)

        reader = threading.Thread(target=drain, daemon=True)
        try:
            self.assertEqual(c.read_reply(), b"220 scripted ESMTP\r\n")
            # About 40 KB that the pipe still takes: the writer's position in its queue is then
            # well past the start, so the flood's lines wrap around the queue's end (where the
            # report used to be written into the middle of a line).
            c.send((b"NOOP " + ARG + b"\r\n") * 12)
            for _ in range(12):
                self.assertEqual(c.read_reply(timeout=20), b"250 2.0.0 ok\r\n")
            time.sleep(0.3)
            for _ in range(NOOPS // BATCH):
                c.send((b"NOOP " + ARG + b"\r\n") * BATCH)
                for _ in range(BATCH):
                    self.assertEqual(c.read_reply(timeout=20), b"250 2.0.0 ok\r\n")
            # Only now is stderr read: the writer catches up and reports what it dropped,
            # then the lines that follow are written as usual.
            reader.start()
            wait_for(b"ev=log_dropped")
            self.assertEqual(c.cmd(b"QUIT"), b"221 2.0.0 Bye\r\n")
        finally:
            c.close()
        wait_for(b" ev=close ")
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(30), 0)
        reader.join(30)
        self.assertFalse(reader.is_alive())

        self.assertTrue(out.endswith(b"\n"))
        lines = bytes(out).decode("utf-8").split("\n")[:-1]
        dropped, noop_lines = 0, 0
        for line in lines:
            ev = mxtest.parse_line(line, "logfmt")  # raises on a cut line
            mxtest.check_header(ev)
            if ev["ev"] == "log_dropped":
                self.assertEqual([k for k in ev], ["ts", "lvl", "ev", "lines"], line)
                self.assertEqual(ev["lvl"], "warn", line)
                self.assertGreater(int(ev["lines"]), 0, line)
                dropped += int(ev["lines"])
            elif ev["ev"] == "line" and ev["dir"] == "client" and ev["text"].startswith("NOOP"):
                self.assertEqual(ev["text"], "NOOP " + ARG.decode(), line[:200])
                noop_lines += 1
        self.assertGreater(dropped, 0, "the queue never overflowed: the test proves nothing")
        self.assertLess(noop_lines, NOOPS)
        # the lines after the report are whole too: the session's pair for QUIT, its close
        evs = [mxtest.parse_line(l, "logfmt") for l in lines]
        first = [i for i, e in enumerate(evs) if e["ev"] == "log_dropped"][0]
        self.assertIn("QUIT", [e.get("cmd") for e in evs[first:] if e["ev"] == "pair"])
        self.assertIn("close", [e["ev"] for e in evs[first:]])


if __name__ == "__main__":
    mxtest.main()
