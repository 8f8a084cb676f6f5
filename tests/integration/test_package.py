"""`cmake --install` and the Debian package, installed on this machine and removed again.

A fresh build tree configured for /usr (where the package installs) is made beside the binary
under test (BUILD/package); `cpack -G DEB` turns it into mxproxy_VERSION_ARCH.deb.
  - the layout of `cmake --install` into a DESTDIR: sbin/mxproxy, /etc/mxproxy/mxproxy.ini,
    the systemd unit naming those paths, the interception drop-in example, both man pages;
  - the package's control data: name, version and architecture in the file name, Depends
    naming the package of every library the binary links (dpkg-shlibdeps) and adduser, the
    config listed as a conffile;
  - as root: dpkg -i, `mxproxy -V` and `mxproxy -t` on the installed config, the mxproxy
    user, `man -w`, `systemd-analyze verify` of the installed unit with and without the
    drop-in (no warning at all) and its offline security exposure, a reinstall keeping an
    edited config, dpkg -r keeping it (conffile), dpkg -P removing it. The machine is left
    as it was: the package purged, the mxproxy user removed if the test made it. Without
    root the install test is skipped (it fails when CI=true); a machine that already has
    mxproxy installed fails it rather than being touched.
"""

import glob
import gzip
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import mxtest
from mxtest import REPO

PKG = {}  # build dir, .deb path, version


def run(args, timeout=300, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (" ".join(args), r.returncode, r.stdout,
                                                      r.stderr))
    return r


def setUpModule():
    build = os.path.join(os.path.dirname(mxtest.binary()), "package")
    shutil.rmtree(build, ignore_errors=True)
    # cpack installs without building everything first: the unit tests are not packaged.
    run(["cmake", "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
         "-DCMAKE_INSTALL_PREFIX=/usr", "-DCMAKE_SKIP_INSTALL_ALL_DEPENDENCY=ON"])
    run(["cmake", "--build", build, "-j%d" % (os.cpu_count() or 1), "--target", "mxproxy",
         "man"])
    run(["cpack", "-G", "DEB"], cwd=build)
    PKG["build"] = build
    PKG["version"] = run([os.path.join(build, "mxproxy"), "-V"]).stdout.split()[1]
    PKG["arch"] = run(["dpkg", "--print-architecture"]).stdout.strip()
    debs = glob.glob(os.path.join(build, "*.deb"))
    assert len(debs) == 1, debs
    PKG["deb"] = debs[0]
    PKG["deb_binary"] = os.path.join(build, "mxproxy")


def field(deb, name):
    return run(["dpkg-deb", "-f", deb, name]).stdout.strip()


def unit_verify(path, env=None):
    """systemd-analyze verify: exit status and everything it printed."""
    e = dict(os.environ)
    e.update(env or {})
    r = run(["systemd-analyze", "verify", path], check=False, env=e, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


def exposure(path):
    """systemd-analyze security --offline: the overall exposure and the table."""
    r = run(["systemd-analyze", "security", "--offline=true", path], check=False, timeout=60)
    m = re.search(r"Overall exposure level for mxproxy\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r.stdout


class LayoutTest(unittest.TestCase):

    def test_cmake_install_layout(self):
        dest = tempfile.mkdtemp(prefix="mxtest-install-")
        self.addCleanup(shutil.rmtree, dest, True)
        run(["cmake", "--install", PKG["build"]], env=dict(os.environ, DESTDIR=dest))
        files = sorted(os.path.relpath(os.path.join(d, f), dest)
                       for d, _, fs in os.walk(dest) for f in fs)
        self.assertEqual(files, [
            "etc/mxproxy/mxproxy.ini",
            "usr/lib/systemd/system/mxproxy.service",
            "usr/sbin/mxproxy",
            "usr/share/doc/mxproxy/examples/interception.conf",
            "usr/share/man/man5/mxproxy.ini.5.gz",
            "usr/share/man/man8/mxproxy.8.gz",
        ])
        with open(os.path.join(dest, "usr/lib/systemd/system/mxproxy.service")) as f:
            unit = f.read()
        for line in ("Type=notify",
                     "ExecStartPre=/usr/sbin/mxproxy -t -c /etc/mxproxy/mxproxy.ini",
                     "ExecStart=/usr/sbin/mxproxy -c /etc/mxproxy/mxproxy.ini",
                     "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM",
                     "User=mxproxy", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                     "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"):
            self.assertIn("\n" + line + "\n", unit)
        # TimeoutStopSec outlasts the drain of the shipped config: drain_timeout +
        # drain_grace + 1 s, read from the config itself.
        with open(os.path.join(dest, "etc/mxproxy/mxproxy.ini")) as f:
            ini = f.read()
        secs = lambda v: int(v.rstrip("s"))
        drain = secs(re.search(r"^drain_timeout = (\d+s)$", ini, re.M).group(1))
        grace = secs(re.search(r"^drain_grace = (\d+s)$", ini, re.M).group(1))
        stop = secs(re.search(r"^TimeoutStopSec=(\d+s)$", unit, re.M).group(1))
        self.assertGreater(stop, drain + grace + 1)
        with gzip.open(os.path.join(dest, "usr/share/man/man5/mxproxy.ini.5.gz"), "rt") as f:
            self.assertIn('.TH "mxproxy.ini" "5"', f.read())

    def test_deb_control(self):
        deb = PKG["deb"]
        self.assertEqual(os.path.basename(deb),
                         "mxproxy_%s_%s.deb" % (PKG["version"], PKG["arch"]))
        self.assertEqual(field(deb, "Package"), "mxproxy")
        self.assertEqual(field(deb, "Version"), PKG["version"])
        self.assertEqual(field(deb, "Architecture"), PKG["arch"])
        depends = {d.split()[0] for d in field(deb, "Depends").split(", ")}
        self.assertIn("adduser", depends)
        # Every library the binary links (NEEDED; what those link in turn is their packages'
        # business, e.g. libbpf's libelf) comes from a package named in Depends.
        libs = dict(re.findall(r"^\s*(\S+) => (/\S+)", run(["ldd", PKG["deb_binary"]]).stdout,
                               re.M))
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]",
                                run(["readelf", "-d", PKG["deb_binary"]]).stdout))
        self.assertTrue({"libuv.so.1", "libinih.so.1", "libssl.so.3", "libc.so.6"} <= needed,
                        needed)
        for soname, path in sorted(libs.items()):
            if soname not in needed:
                continue
            # Debian 12 merged /lib into /usr/lib; dpkg knows each file by one of the names.
            names = (path, path[4:] if path.startswith("/usr/") else "/usr" + path)
            owners = [run(["dpkg", "-S", n], check=False).stdout for n in names]
            owner = next((o.split(":")[0] for o in owners if o), None)
            self.assertIn(owner, depends, "%s (%s) comes from %s" % (soname, path, owner))
        control = tempfile.mkdtemp(prefix="mxtest-control-")
        self.addCleanup(shutil.rmtree, control, True)
        run(["dpkg-deb", "-e", deb, control])
        with open(os.path.join(control, "conffiles")) as f:
            self.assertEqual(f.read().split(), ["/etc/mxproxy/mxproxy.ini"])


class InstallTest(unittest.TestCase):

    def setUp(self):
        if os.geteuid() != 0:
            why = "dpkg -i needs root"
            if os.environ.get("CI") == "true":
                self.fail(why)
            self.skipTest(why)
        status = run(["dpkg-query", "-W", "-f", "${Status}", "mxproxy"], check=False)
        if status.returncode == 0 and "not-installed" not in status.stdout:
            self.fail("mxproxy is already installed here (%s); the test does not touch it"
                      % status.stdout)
        self.made_user = run(["getent", "passwd", "mxproxy"], check=False).returncode != 0
        self.addCleanup(self.restore)

    def restore(self):
        run(["dpkg", "--purge", "mxproxy"], check=False)
        if self.made_user:
            run(["userdel", "mxproxy"], check=False)
            run(["groupdel", "mxproxy"], check=False)

    def status(self):
        return run(["dpkg-query", "-W", "-f", "${Status}", "mxproxy"], check=False).stdout

    def test_dpkg_install_run_remove_purge(self):
        conf = "/etc/mxproxy/mxproxy.ini"
        unit = "/usr/lib/systemd/system/mxproxy.service"
        run(["dpkg", "-i", PKG["deb"]])
        self.assertEqual(self.status(), "install ok installed")
        self.assertEqual(run(["/usr/sbin/mxproxy", "-V"]).stdout, "mxproxy %s\n" % PKG["version"])
        r = run(["/usr/sbin/mxproxy", "-t", "-c", conf])
        self.assertEqual((r.stdout, r.stderr), ("%s: configuration is valid\n" % conf, ""))
        user = run(["getent", "passwd", "mxproxy"]).stdout.strip().split(":")
        self.assertEqual(user[6], "/usr/sbin/nologin")
        self.assertEqual(run(["man", "-w", "mxproxy.ini"]).stdout.strip(),
                         "/usr/share/man/man5/mxproxy.ini.5.gz")
        self.assertEqual(run(["man", "-w", "8", "mxproxy"]).stdout.strip(),
                         "/usr/share/man/man8/mxproxy.8.gz")

        # The unit as installed, then with the interception drop-in beside it: not a word
        # from systemd-analyze (it exits 0 on unknown keys, but prints them).
        self.assertEqual(unit_verify(unit), (0, ""))
        plain, table = exposure(unit)
        self.assertLessEqual(plain, 2.5, table)
        self.assertRegex(table, r"✓ CapabilityBoundingSet=~CAP_NET_ADMIN ")
        tmp = tempfile.mkdtemp(prefix="mxtest-unit-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.mkdir(os.path.join(tmp, "mxproxy.service.d"))
        shutil.copy(unit, tmp)
        shutil.copy("/usr/share/doc/mxproxy/examples/interception.conf",
                    os.path.join(tmp, "mxproxy.service.d"))
        self.assertEqual(unit_verify(os.path.join(tmp, "mxproxy.service")), (0, ""))
        _, table = exposure(os.path.join(tmp, "mxproxy.service"))
        self.assertRegex(table, r"✗ CapabilityBoundingSet=~CAP_NET_ADMIN ")

        # An edited config survives a reinstall and dpkg -r (a conffile); purge removes it.
        with open(conf, "a") as f:
            f.write("; edited by the operator\n")
        run(["dpkg", "-i", PKG["deb"]])
        with open(conf) as f:
            self.assertTrue(f.read().endswith("; edited by the operator\n"))
        run(["dpkg", "-r", "mxproxy"])
        self.assertEqual(self.status(), "deinstall ok config-files")
        for gone in ("/usr/sbin/mxproxy", unit, "/usr/share/man/man8/mxproxy.8.gz"):
            self.assertFalse(os.path.exists(gone), gone)
        with open(conf) as f:
            self.assertTrue(f.read().endswith("; edited by the operator\n"))
        run(["dpkg", "-P", "mxproxy"])
        self.assertFalse(os.path.exists("/etc/mxproxy"))
        self.assertEqual(run(["dpkg-query", "-W", "mxproxy"], check=False).returncode, 1)


if __name__ == "__main__":
    mxtest.main()
