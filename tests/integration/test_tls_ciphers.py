"""Ciphers offered to clients: by default TLS 1.2+ only, and in TLS 1.2 only
ECDHE with AES-GCM or ChaCha20-Poly1305 (no CBC, no RSA key exchange, no
DHE); the `ciphers` and `ciphersuites` keys replace those lists; bad cipher
strings and key files without a key are FILE:LINE errors at -t, start and
reload.

Real clients: Python ssl sockets and openssl s_client offering one suite at a
time, and testssl.sh (Debian's testssl.sh package) scanning protocols and
every cipher of an implicit-TLS listener and a STARTTLS listener, its JSON
findings asserted. A scan takes about 10 s (printed by the test); the
environment variable MXTEST_SKIP_TESTSSL=1 skips the scans (tests/run does
not set it).

The RSA certificate is made here (mxtest.pki() makes EC ones): RSA key
exchange needs an RSA certificate, so only with one does refusing it mean
anything.
"""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

import mxtest
from mxtest import HOST, config, listener, pki

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
TESTSSL_TIMEOUT = 240  # seconds for one scan, at most

# TLS 1.2 suites the default must refuse: CBC with ECDHE, RSA key exchange
# (with GCM and CBC), DHE.
REFUSED_RSA = ("ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES128-SHA256",
               "AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA", "AES256-SHA256",
               "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-CHACHA20-POLY1305")
REFUSED_EC = ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384")
OFFERED_RSA = ("ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305",
               "ECDHE-RSA-AES128-GCM-SHA256")
OFFERED_EC = ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305",
              "ECDHE-ECDSA-AES128-GCM-SHA256")


def rsa_leaf(name):
    """An RSA 2048 certificate for name, signed by the test CA."""
    k = pki()
    d = tempfile.mkdtemp(prefix="mxtest-rsa-", dir=k.dir)
    cert, key, csr, ext = (os.path.join(d, f) for f in ("rsa.pem", "rsa.key", "rsa.csr",
                                                        "rsa.ext"))
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:%s\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n" % name)
    mxtest._openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=" + name)
    mxtest._openssl("x509", "-req", "-in", csr, "-CA", k.ca, "-CAkey", k.ca_key,
                    "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "3",
                    "-extfile", ext, "-out", cert)
    return mxtest.CertPair(cert, key, [name])


_RSA = None


def rsa():
    global _RSA
    if _RSA is None:
        _RSA = rsa_leaf("rsa.example.test")
    return _RSA


def s_client(port, *extra, input=b"QUIT\n", timeout=20):
    r = subprocess.run(["openssl", "s_client", "-connect", "%s:%d" % (HOST, port),
                        "-nocommands", "-brief", "-crlf"] + list(extra),
                       input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


class CipherTestCase(mxtest.ProxyTestCase):

    def start(self, **opts):
        """mode smtp, client_tls = implicit; certificates: RSA (the default)
        and EC for SNI mx.example.test."""
        self.backend = self.smtp_backend("mx")
        opts.setdefault("client_tls", "implicit")
        opts.setdefault("cert", [rsa().cert, pki().mx.cert])
        opts.setdefault("key", [rsa().key, pki().mx.key])
        return self.start_smtp_proxy(self.backend.addr, **opts)

    def handshake(self, p, ciphers=None, name="rsa.example.test", version=ssl.TLSVersion.TLSv1_2,
                  suites=None):
        """One TLS handshake offering only ciphers (TLS 1.2) or only the
        default 1.3 suites; returns (ok, version/cipher as mxproxy logged it
        or the tls_error reason)."""
        ctx = mxtest.client_context()
        ctx.minimum_version = version
        ctx.maximum_version = version
        if ciphers is not None:
            ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
        m = p.mark()
        s = socket.create_connection((HOST, p.port), timeout=5)
        try:
            t = ctx.wrap_socket(s, server_hostname=name)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            s.close()
            ev = p.wait_event(start=m, ev="tls_error")
            return False, ev["reason"]
        try:
            self.assertEqual(t.recv(100), b"220 mx ESMTP\r\n")
            t.sendall(b"QUIT\r\n")
            t.recv(100)
        finally:
            t.close()
        ev = p.wait_event(start=m, ev="tls")
        return True, ev["tls"]


class DefaultCiphersTest(CipherTestCase):

    def test_only_forward_secret_aead_in_tls12(self):
        p = self.start()
        for c in REFUSED_RSA:
            self.assertEqual(self.handshake(p, c), (False, "no shared cipher"), c)
        for c in REFUSED_EC:
            self.assertEqual(self.handshake(p, c, name="mx.example.test"),
                             (False, "no shared cipher"), c)
        for c in OFFERED_RSA:
            self.assertEqual(self.handshake(p, c), (True, "TLSv1.2/" + c))
        for c in OFFERED_EC:
            self.assertEqual(self.handshake(p, c, name="mx.example.test"), (True, "TLSv1.2/" + c))
        # The server's order: AES-256-GCM first.
        self.assertEqual(self.handshake(p, "ALL"), (True, "TLSv1.2/ECDHE-RSA-AES256-GCM-SHA384"))
        self.assertEqual(self.handshake(p, version=ssl.TLSVersion.TLSv1_3),
                         (True, "TLSv1.3/TLS_AES_256_GCM_SHA384"))

    def test_s_client_cbc_and_rsa_kx_refused_old_versions_too(self):
        p = self.start()
        for c in ("ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384"):
            rc, out, err = s_client(p.port, "-tls1_2", "-cipher", c)
            self.assertNotEqual(rc, 0, err)
            self.assertIn("handshake failure", err)
            self.assertNotIn(b"220 mx ESMTP", out)
        for v in ("-tls1", "-tls1_1"):
            rc, out, err = s_client(p.port, v, "-cipher", "ALL:@SECLEVEL=0")
            self.assertNotEqual(rc, 0, err)
            self.assertNotIn(b"220 mx ESMTP", out)
        rc, out, err = s_client(p.port, "-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305")
        self.assertEqual(rc, 0, err)
        self.assertIn("Ciphersuite: ECDHE-RSA-CHACHA20-POLY1305", err)


class ConfiguredCiphersTest(CipherTestCase):

    def test_configured_lists_are_honoured(self):
        p = self.start(ciphers="ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
                       ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
        self.assertEqual(self.handshake(p, "ALL"), (True, "TLSv1.2/ECDHE-RSA-CHACHA20-POLY1305"))
        self.assertEqual(self.handshake(p, "ECDHE-RSA-AES256-GCM-SHA384"),
                         (False, "no shared cipher"))
        self.assertEqual(self.handshake(p, "ALL", name="mx.example.test"),
                         (True, "TLSv1.2/ECDHE-ECDSA-AES128-GCM-SHA256"))
        self.assertEqual(self.handshake(p, version=ssl.TLSVersion.TLSv1_3),
                         (True, "TLSv1.3/TLS_CHACHA20_POLY1305_SHA256"))
        rc, out, err = s_client(p.port, "-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384")
        self.assertNotEqual(rc, 0, err)
        self.assertNotIn(b"220 mx ESMTP", out)
        rc, out, err = s_client(p.port, "-tls1_3", "-ciphersuites",
                                "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")
        self.assertEqual(rc, 0, err)
        self.assertIn("Ciphersuite: TLS_CHACHA20_POLY1305_SHA256", err)

    def test_operator_may_allow_cbc(self):
        p = self.start(ciphers="ECDHE-RSA-AES128-SHA")
        self.assertEqual(self.handshake(p, "ALL"), (True, "TLSv1.2/ECDHE-RSA-AES128-SHA"))


class CipherConfigErrorTest(unittest.TestCase):
    """Bad cipher strings and key files without a key: PATH:LINE: message at
    -t and at start; on reload the old config stays."""

    def setUp(self):
        if not os.access(mxtest.binary(), os.X_OK):
            self.fail("mxproxy binary not found or not executable: %s" % mxtest.binary())
        self.dir = self.enterContext(tempfile.TemporaryDirectory(prefix="mxtest-"))

    def conf(self, **opts):
        opts.setdefault("client_tls", "implicit")
        opts.setdefault("cert", pki().mx.cert)
        opts.setdefault("key", pki().mx.key)
        opts = {k: v for k, v in opts.items() if v is not None}
        text = config(listener("tls", "127.0.0.1:%d" % mxtest.free_port(), "127.0.0.1:25",
                               **opts))
        path = os.path.join(self.dir, "mx.conf")
        with open(path, "w") as f:
            f.write(text)
        return path, text.splitlines()

    def check(self, opts, line_of, message):
        path, lines = self.conf(**opts)
        line = lines.index(line_of) + 1
        for args in (["-t", "-c", path], ["-c", path]):
            r = subprocess.run([mxtest.binary()] + args, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertEqual(r.stderr.decode(), "%s:%d: %s\n" % (path, line, message))

    def test_unknown_cipher(self):
        self.check(dict(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GMC-SHA256"),
                   "ciphers = ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GMC-SHA256",
                   "listener 'tls': ciphers: 'ECDHE-ECDSA-AES128-GMC-SHA256' matches no TLS 1.2 "
                   "cipher")

    def test_nothing_left(self):
        self.check(dict(ciphers="!ALL"), "ciphers = !ALL",
                   "listener 'tls': ciphers '!ALL': no cipher match")

    def test_unknown_suite(self):
        self.check(dict(ciphersuites="TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA512"),
                   "ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA512",
                   "listener 'tls': ciphersuites: 'TLS_AES_128_CCM_SHA512' matches no TLS 1.3 "
                   "cipher")

    def test_ciphers_need_client_tls(self):
        self.check(dict(client_tls="off", cert=None, key=None, ciphers="ECDHE+AESGCM"),
                   "ciphers = ECDHE+AESGCM",
                   "listener 'tls': 'ciphers' needs client_tls = implicit or starttls (it sets "
                   "the ciphers mxproxy offers to clients)")

    def test_key_file_without_key(self):
        empty = os.path.join(self.dir, "empty.key")
        open(empty, "w").close()
        for key in (empty, self.dir, pki().mx.cert):
            self.check(dict(key=key), "key = %s" % key,
                       "listener 'tls': key %s: no private key found" % key)


class CipherReloadTest(CipherTestCase):

    def test_reload_with_bad_ciphers_keeps_old_config(self):
        p = self.start(ciphers="ECDHE-RSA-CHACHA20-POLY1305")
        text = open(p.path).read()
        m = p.reload(text.replace("ciphers = ECDHE-RSA-CHACHA20-POLY1305",
                                  "ciphers = ECDHE-RSA-CHACHA20-POLY1305:NOPE"))
        ev = p.wait_event(start=m, ev="reload_error")
        line = [i + 1 for i, t in enumerate(open(p.path).read().splitlines())
                if t.startswith("ciphers =")][0]
        self.assertEqual(ev["error"], "%s:%d: listener 'smtp': ciphers: 'NOPE' matches no TLS "
                         "1.2 cipher" % (p.path, line))
        self.assertEqual(self.handshake(p, "ALL"), (True, "TLSv1.2/ECDHE-RSA-CHACHA20-POLY1305"))
        m = p.reload(text.replace("ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256"))
        p.wait_event(start=m, ev="reload")
        self.assertEqual(self.handshake(p, "ALL"), (True, "TLSv1.2/ECDHE-RSA-AES128-GCM-SHA256"))


@unittest.skipIf(TESTSSL is None, "testssl.sh not installed (bash .ci/setup test)")
@unittest.skipIf(os.environ.get("MXTEST_SKIP_TESTSSL") == "1", "MXTEST_SKIP_TESTSSL=1")
class TestsslTest(CipherTestCase):
    """testssl.sh against an implicit-TLS and a STARTTLS listener: protocols
    (-p) and every cipher it can test (-e), JSON findings asserted."""

    def scan(self, port, *extra):
        out = os.path.join(self.tmpdir, "testssl-%d.json" % port)
        args = [TESTSSL, "--quiet", "--warnings", "batch", "--color", "0", "--nodns", "min",
                "--openssl", "/usr/bin/openssl", "--connect-timeout", "5",
                "--openssl-timeout", "5", "--fast", "-p", "-e", "--jsonfile", out] + \
            list(extra) + ["%s:%d" % (HOST, port)]
        t0 = time.monotonic()
        r = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=TESTSSL_TIMEOUT)
        took = time.monotonic() - t0
        print("testssl %s took %.1fs" % (" ".join(extra) or "(implicit TLS)", took))
        self.last_json = out
        with open(out) as f:
            findings = json.load(f)
        by_id = {}
        for f in findings:
            by_id.setdefault(f["id"], []).append(f["finding"])
        self.assertNotIn("scanProblem", by_id, r.stdout.decode("utf-8", "replace")[-3000:])
        return by_id, r.stdout.decode("utf-8", "replace")

    def check(self, by_id, out):
        # Protocols: TLS 1.2 and 1.3 only.
        for proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
            self.assertEqual(by_id.get(proto), ["not offered"], "%s\n%s" % (proto, out[-3000:]))
        self.assertIn("offered", by_id.get("TLS1_2", [""])[0], out[-3000:])
        self.assertIn("offered", by_id.get("TLS1_3", [""])[0], out[-3000:])
        self.assertNotIn("not", by_id["TLS1_2"][0] + by_id["TLS1_3"][0])
        # Ciphers (-e): one finding per cipher offered, e.g.
        # "xc030   ECDHE-RSA-AES256-GCM-SHA384   ECDH 253   AESGCM   256   TLS_ECDHE_RSA_...".
        ciphers = []
        for k, v in by_id.items():
            if k.startswith("cipher_x"):
                for finding in v:
                    fields = finding.split()
                    ciphers.append((fields[1], fields[2], fields[4]))
        names = sorted(n for n, _, _ in ciphers)
        self.assertEqual(names, sorted(OFFERED_RSA + ("TLS_AES_128_GCM_SHA256",
                                                      "TLS_AES_256_GCM_SHA384",
                                                      "TLS_CHACHA20_POLY1305_SHA256")),
                         "%r\n%s" % (ciphers, out[-3000:]))
        for name, kx, enc in ciphers:
            self.assertEqual(kx, "ECDH", name)  # forward secret, whatever the version
            self.assertIn(enc, ("AESGCM", "CHACHA20"), name)  # AEAD, never CBC
            self.assertNotIn("CBC", name)

    def test_implicit_tls(self):
        p = self.start(cert=rsa().cert, key=rsa().key)
        self.check(*self.scan(p.port))

    def test_starttls(self):
        p = self.start(client_tls="starttls", cert=rsa().cert, key=rsa().key)
        self.check(*self.scan(p.port, "--starttls", "smtp"))


if __name__ == "__main__":
    mxtest.main()
