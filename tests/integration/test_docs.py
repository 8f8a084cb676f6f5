"""The documentation agrees with the code, and conf/ holds valid examples.

Names are read from the sources, never listed here, so a key, event or end reason added to
the code fails this file until README.md (and conf/reference.ini) describe it:
  - every key of config.c's config_keys[] is in the README's [global] or [listener NAME]
    table (the one of its section, each table in one piece) and in conf/reference.ini, in the
    right section, with the README's default;
  - every ev= name the code logs is in the Logs section's ev= table, every end= name of
    session.c in its end= table;
  - tests/integration/README.md lists every tests/integration/test_*.py, and only those;
  - no "being built" / "still to come" for what exists;
  - every conf/*.ini passes `mxproxy -t` (conf/mxproxy.ini through `bash conf/run -t`,
    which makes its certificate; other certificate paths are pointed at a test certificate).
"""

import glob
import os
import re
import subprocess
import tempfile
import unittest

import mxtest
from mxtest import REPO

PROXY = os.path.join(REPO, "proxy")


def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def strip_c_comments(text):
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def config_keys():
    """{key: 'global' | 'listener'} from the rows of config.c's config_keys[]."""
    src = strip_c_comments(read("proxy", "config.c"))
    m = re.search(r"config_keys\[\]\s*=\s*\{(.*?)\n\};", src, re.S)
    assert m, "config_keys[] not found in proxy/config.c"
    keys = {}
    for row in re.split(r"\{\s*\.name\s*=", m.group(1))[1:]:
        name = re.match(r'\s*"([a-z0-9_]+)"', row).group(1)
        sec = re.search(r"CONFIG_SECTION_(GLOBAL|LISTENER)", row)
        assert sec, "no section for key %r" % name
        keys[name] = sec.group(1).lower()
    assert len(keys) > 10, keys
    return keys


def split_args(text, start):
    """The top-level arguments of the call whose '(' is at text[start]; None if unbalanced."""
    depth, args, cur, i, quote = 0, [], [], start, None
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == "\\":
                cur.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            cur.append(c)
        elif c == "(":
            depth += 1
            if depth > 1:
                cur.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(cur))
                return args
            cur.append(c)
        elif c == "," and depth == 1:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    return None


def logged_events():
    """Every ev= name the code can log: the string literals passed as the `const char *ev`
    parameter of log_begin() and of every function that takes one and passes it on."""
    sources = {p: strip_c_comments(open(p).read())
               for p in glob.glob(os.path.join(PROXY, "*.[ch]"))}
    takers = {}  # function name -> index of its ev parameter
    for text in sources.values():
        for m in re.finditer(r"\b([a-z_][a-z0-9_]*)\s*\(([^()]*)\)\s*[;{]", text):
            params = [p.strip() for p in m.group(2).split(",")]
            for i, p in enumerate(params):
                if re.fullmatch(r"const char \*\s*ev", p):
                    takers[m.group(1)] = i
    assert "log_begin" in takers, takers
    names = set()
    for text in sources.values():
        for fn, idx in takers.items():
            for m in re.finditer(r"\b%s\s*\(" % fn, text):
                args = split_args(text, m.end() - 1)
                if args is None or len(args) <= idx:
                    continue
                names.update(re.findall(r'"([a-z_]+)"', args[idx]))
    assert {"open", "close", "pair", "start"} <= names, names
    return names


def end_names():
    src = read("proxy", "session.c")
    names = re.findall(r'\[SESSION_END_[A-Z_]+\]\s*=\s*"([a-z_]+)"', src)
    assert len(names) > 5, names
    return set(names)


def readme_section(text, heading):
    i = text.index("\n" + heading + "\n")
    j = text.find("\n## ", i + 1)
    k = text.find("\n### ", i + 1)
    ends = [x for x in (j, k) if x > 0]
    return text[i:min(ends)] if ends else text[i:]


def tables(section):
    """The tables of a README section: lists of rows, each a list of cells; a table is a run
    of '|' lines."""
    out, cur = [], None
    for line in section.split("\n"):
        if line.startswith("|"):
            if cur is None:
                cur = []
                out.append(cur)
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        else:
            cur = None
    return out


def first_column_names(table):
    """The backticked names of each row's first cell (`cert`, `key` gives both), header
    row excluded."""
    names = set()
    for row in table[1:]:
        # `backend` = `original_dst`: a value, not a name
        names.update(re.findall(r"(?<!= )`([a-z0-9_]+)`", row[0]))
    return names


def reference_keys():
    """[(section, key, value)] of conf/reference.ini: its key lines, set or commented out
    (';key = value', no blank after the ';')."""
    out, section = [], None
    for line in read("conf", "reference.ini").split("\n"):
        m = re.match(r"\[(global|listener) ?[^\]]*\]$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r";?([a-z0-9_]+) = (.*)$", line)
        if m:
            out.append((section, m.group(1), m.group(2)))
    return out


class ReadmeAgreesWithCode(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.readme = read("README.md")

    def test_every_config_key_in_its_table(self):
        keys = config_keys()
        for heading, section in (("### `[global]`", "global"),
                                 ("### `[listener NAME]`", "listener")):
            t = tables(readme_section(self.readme, heading))
            self.assertEqual(len(t), 1, "%s must hold one key table in one piece, found %d"
                             % (heading, len(t)))
            shown = first_column_names(t[0])
            want = {k for k, s in keys.items() if s == section}
            self.assertEqual(sorted(want - shown), [],
                             "keys of config.c missing from the README's %s table" % heading)
            self.assertEqual(sorted(shown - set(keys)), [],
                             "keys in the README's %s table that config.c does not know"
                             % heading)

    def test_every_logged_event_in_the_ev_table(self):
        logs = readme_section(self.readme, "## Logs")
        ev_tables = [t for t in tables(logs) if t[0][0] == "`ev=`"]
        self.assertEqual(len(ev_tables), 1, "one `ev=` table in Logs")
        shown = first_column_names(ev_tables[0])
        self.assertEqual(sorted(logged_events() - shown), [],
                         "ev= names the code logs that the README's ev= table lacks")

    def test_every_end_reason_in_the_end_table(self):
        logs = readme_section(self.readme, "## Logs")
        end_tables = [t for t in tables(logs) if t[0][0] == "`end=`"]
        self.assertEqual(len(end_tables), 1, "one `end=` table in Logs")
        shown = first_column_names(end_tables[0])
        self.assertEqual(sorted(end_names() - shown), [], "end= names missing from the README")
        self.assertEqual(sorted(shown - end_names()), [], "end= names the code does not have")

    def test_no_promise_for_what_exists(self):
        for phrase in ("being built", "still to come", "once TLS is configured", "not yet"):
            self.assertNotIn(phrase, self.readme.lower())

    def test_integration_readme_lists_every_test_file(self):
        listed = set(re.findall(r"^\| (test_[a-z0-9_]+\.py) +\|",
                                read("tests", "integration", "README.md"), re.M))
        files = {os.path.basename(p)
                 for p in glob.glob(os.path.join(REPO, "tests", "integration", "test_*.py"))}
        self.assertEqual(sorted(files - listed), [], "test files missing from the table")
        self.assertEqual(sorted(listed - files), [], "listed test files that do not exist")


class ReferenceConfig(unittest.TestCase):

    def test_every_key_once_in_its_section(self):
        keys = config_keys()
        ref = reference_keys()
        names = [k for _, k, _ in ref]
        self.assertEqual(sorted(n for n in set(names) if names.count(n) > 1), [],
                         "keys shown twice in conf/reference.ini")
        self.assertEqual(sorted(set(keys) - set(names)), [],
                         "keys of config.c missing from conf/reference.ini")
        self.assertEqual(sorted(set(names) - set(keys)), [],
                         "keys in conf/reference.ini that config.c does not know")
        for section, key, _ in ref:
            self.assertEqual(section, keys[key], "%s is a [%s] key" % (key, keys[key]))

    def test_defaults_agree_with_the_readme(self):
        readme = read("README.md")
        defaults = {}
        for heading in ("### `[global]`", "### `[listener NAME]`"):
            for row in tables(readme_section(readme, heading))[0][1:]:
                names = re.findall(r"`([a-z0-9_]+)`", row[0])
                m = re.fullmatch(r"`([^`]+)`", row[2])
                if len(names) == 1 and m:
                    defaults[names[0]] = m.group(1)
        self.assertGreater(len(defaults), 20, defaults)
        for _, key, value in reference_keys():
            if key in defaults:
                self.assertEqual(value, defaults[key],
                                 "conf/reference.ini and the README disagree on %s" % key)

    def test_valid(self):
        r = subprocess.run([mxtest.binary(), "-t", "-c", "conf/reference.ini"], cwd=REPO,
                           capture_output=True, text=True, timeout=10)
        self.assertEqual((r.returncode, r.stdout, r.stderr),
                         (0, "conf/reference.ini: configuration is valid\n", ""))


class Examples(unittest.TestCase):

    def test_every_example_is_valid(self):
        leaf = mxtest.pki().mx
        tmp = tempfile.TemporaryDirectory(prefix="mxtest-docs-")
        self.addCleanup(tmp.cleanup)
        paths = sorted(glob.glob(os.path.join(REPO, "conf", "*.ini")))
        self.assertGreaterEqual(len(paths), 4, paths)
        for path in paths:
            rel = os.path.relpath(path, REPO)
            with self.subTest(rel):
                with open(path) as f:
                    text = f.read()
                if rel == "conf/mxproxy.ini":
                    # The run command's own check: it makes the demo certificate first.
                    r = subprocess.run(["bash", "conf/run", "-t", rel], cwd=REPO,
                                       env=dict(os.environ, MXPROXY=mxtest.binary()),
                                       capture_output=True, text=True, timeout=30)
                    self.assertEqual((r.returncode, r.stdout, r.stderr),
                                     (0, "%s: configuration is valid\n" % rel, ""))
                    continue
                # Production certificate paths become a test certificate's; nothing else.
                text2 = re.sub(r"^cert = /.*$", "cert = " + leaf.cert, text, flags=re.M)
                text2 = re.sub(r"^key = /.*$", "key = " + leaf.key, text2, flags=re.M)
                check = path
                if text2 != text:
                    check = os.path.join(tmp.name, os.path.basename(path))
                    with open(check, "w") as f:
                        f.write(text2)
                r = subprocess.run([mxtest.binary(), "-t", "-c", check], cwd=REPO,
                                   capture_output=True, text=True, timeout=10)
                self.assertEqual((r.returncode, r.stdout, r.stderr),
                                 (0, "%s: configuration is valid\n" % check, ""))


if __name__ == "__main__":
    mxtest.main()
