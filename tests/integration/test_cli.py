"""Command line: -V, -t (config check with FILE:LINE: message), bad usage."""

import os
import re
import subprocess
import tempfile
import unittest

import mxtest
from mxtest import config, listener


def run(*args, timeout=10):
    r = subprocess.run([mxtest.binary()] + list(args), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


GOOD = config(listener("smtp", "127.0.0.1:2525", "127.0.0.1:25,[::1]:25", mode="tcp",
                       connect_timeout="250ms", idle_timeout="0.5", max_connections=10),
              listener("sub", "[::1]:2587", "127.0.0.1:587", idle_timeout="5m",
                       connect_timeout="1.5s"),
              workers=2, log_format="json", log_level="warn", drain_timeout="1h")


class CliTest(unittest.TestCase):

    def setUp(self):
        if not os.access(mxtest.binary(), os.X_OK):
            self.fail("mxproxy binary not found or not executable: %s" % mxtest.binary())
        self.dir = tempfile.TemporaryDirectory(prefix="mxtest-")
        self.addCleanup(self.dir.cleanup)

    def write(self, text, name="mx.conf"):
        path = os.path.join(self.dir.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def check_error(self, text, line, *words):
        """-t on text exits 1 and prints exactly one 'PATH:LINE: message' line."""
        path = self.write(text)
        rc, out, err = run("-t", "-c", path)
        self.assertEqual(rc, 1, err)
        m = re.fullmatch(r"(.*?):(\d+): (.+)\n", err)
        self.assertIsNotNone(m, "stderr must be exactly 'PATH:LINE: message\\n', got %r" % err)
        self.assertEqual(m.group(1), path)
        self.assertEqual(int(m.group(2)), line, err)
        for w in words:
            self.assertIn(w, m.group(3))
        return m.group(3)

    def test_version(self):
        self.assertEqual(run("-V"), (0, "mxproxy 0.1.0\n", ""))

    def test_check_good_config(self):
        rc, out, err = run("-t", "-c", self.write(GOOD))
        self.assertEqual(rc, 0, err)
        self.assertNotIn("error", err.lower())

    def test_check_unknown_key(self):
        text = GOOD.replace("max_connections = 10\n", "max_connections = 10\nbogus_key = 1\n")
        line = text.splitlines().index("bogus_key = 1") + 1
        self.check_error(text, line, "bogus_key")

    def test_check_unknown_global_key(self):
        text = GOOD.replace("[global]\n", "[global]\nworkerz = 2\n")
        self.check_error(text, 2, "workerz")

    def test_check_bad_duration(self):
        text = GOOD.replace('idle_timeout = 5m', 'idle_timeout = 5 parsecs')
        line = text.splitlines().index("idle_timeout = 5 parsecs") + 1
        self.check_error(text, line, "idle_timeout")

    def test_check_bad_mode(self):
        text = GOOD.replace("mode = tcp", "mode = udp")
        line = text.splitlines().index("mode = udp") + 1
        self.check_error(text, line, "udp")

    def test_check_missing_file(self):
        path = os.path.join(self.dir.name, "absent.conf")
        rc, out, err = run("-t", "-c", path)
        self.assertEqual(rc, 1)
        self.assertTrue(err.startswith(path + ": "), err)
        self.assertEqual(err.count("\n"), 1, err)

    def test_bad_usage(self):
        for args in (["-Z"], ["-c"], ["--no-such-flag"]):
            rc, out, err = run(*args)
            self.assertEqual(rc, 2, "%s: %r" % (args, err))
            self.assertNotEqual(err, "", "%s: usage goes to stderr" % args)


if __name__ == "__main__":
    mxtest.main()
