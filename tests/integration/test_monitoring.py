"""k8s/monitoring: the Grafana dashboard and the Prometheus alert rules, offline.

- mxproxy-alerts.yaml passes `promtool check rules`, and its unit tests
  (mxproxy-alerts.test.yaml: synthetic series, alerts that must fire with
  their exact labels and annotations, and must not) pass `promtool test rules`.
- Every query of mxproxy-dashboard.json is valid PromQL (Grafana's variables
  replaced by what they expand to, each query checked by promtool as a rule).
- Every metric and label those queries and rules name is one a running
  mxproxy exports on /metrics, so neither can drift from the code.
"""

import json
import os
import re
import subprocess
import urllib.request

import mxtest
from mxtest import HOST, config, free_port, listener

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MON = os.path.join(ROOT, "k8s", "monitoring")
DASHBOARD = os.path.join(MON, "mxproxy-dashboard.json")
ALERTS = os.path.join(MON, "mxproxy-alerts.yaml")
ALERT_TESTS = os.path.join(MON, "mxproxy-alerts.test.yaml")

# Labels Prometheus adds when it scrapes, and histogram buckets.
SCRAPE_LABELS = {"job", "instance", "le"}
# Grafana's variables, as they expand when every value is chosen.
GRAFANA_VARS = {"$__rate_interval": "5m", "$instance": ".*", "$listener": ".*"}
METRIC = re.compile(r"\b(mxproxy_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def promtool(*args, cwd=None):
    r = subprocess.run(["promtool"] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60, cwd=cwd)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def dashboard_queries():
    """(panel title, expr) of every target, panels inside rows included."""
    with open(DASHBOARD) as f:
        d = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))
    walk(d["panels"])
    return d, out


def alert_exprs():
    """expr of every alert rule, read without a YAML library: the rules file is
    written with `expr: >` blocks or one-line exprs."""
    exprs, cur = [], None
    with open(ALERTS) as f:
        for line in f:
            s = line.rstrip("\n")
            if cur is not None:
                if s.strip() and len(s) - len(s.lstrip()) > cur[0]:
                    cur[1].append(s.strip())
                    continue
                exprs.append(" ".join(cur[1]))
                cur = None
            m = re.match(r"^(\s*)- alert:|^(\s*)expr:\s*(.*)$", s)
            if m and m.group(2) is not None:
                if m.group(3) in (">", "|"):
                    cur = (len(m.group(2)), [])
                else:
                    exprs.append(m.group(3))
    if cur is not None:
        exprs.append(" ".join(cur[1]))
    return exprs


def expand(expr):
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return expr


class MonitoringTest(mxtest.ProxyTestCase):

    def exported(self):
        """{metric family: set of label names} from a running mxproxy's /metrics."""
        admin = free_port()
        self.start_proxy(config(listener("smtp", "%s:%d" % (HOST, free_port()), "127.0.0.1:25",
                                         mode="smtp"),
                                admin="%s:%d" % (HOST, admin)))
        with urllib.request.urlopen("http://%s:%d/metrics" % (HOST, admin), timeout=5) as r:
            text = r.read().decode()
        families = {}
        for line in text.splitlines():
            m = re.match(r"^# TYPE (\S+) (\S+)$", line)
            if m:
                families[m.group(1)] = set()
                continue
            m = re.match(r"^([a-z_:][a-z0-9_:]*)(\{([^}]*)\})? ", line)
            if m:
                name = re.sub(r"_(bucket|sum|count)$", "", m.group(1)) \
                    if m.group(1) not in families else m.group(1)
                labels = set(re.findall(r'([a-zA-Z_]\w*)="', m.group(3) or ""))
                families.setdefault(name, set()).update(labels)
        return families

    def check_names(self, where, expr, families):
        named = METRIC.findall(expr)
        self.assertTrue(named, "%s: names no mxproxy metric: %s" % (where, expr))
        labels_of_expr = set()
        for metric, matchers in named:
            family = re.sub(r"_(bucket|sum|count)$", "", metric)
            self.assertIn(family, families, "%s: mxproxy exports no %s" % (where, metric))
            if family != metric:
                self.assertTrue(metric.endswith("_bucket") or metric.endswith("_sum")
                                or metric.endswith("_count"), metric)
            labels = {m[0] for m in MATCHER.findall(matchers or "")}
            self.assertLessEqual(labels - SCRAPE_LABELS, families[family],
                                 "%s: %s has no such label" % (where, metric))
            labels_of_expr |= families[family]
        for group in BY.findall(expr):
            by = {l.strip() for l in group.split(",") if l.strip()}
            self.assertLessEqual(by - SCRAPE_LABELS, labels_of_expr,
                                 "%s: grouped by a label no named metric has" % where)

    def test_alert_rules_check_and_unit_tests(self):
        rc, out = promtool("check", "rules", ALERTS)
        self.assertEqual(rc, 0, out)
        self.assertIn("SUCCESS: 4 rules found", out)
        rc, out = promtool("test", "rules", os.path.basename(ALERT_TESTS), cwd=MON)
        self.assertEqual(rc, 0, out)
        self.assertIn("SUCCESS", out)

    def test_dashboard_queries_are_promql(self):
        d, queries = dashboard_queries()
        self.assertEqual(d["uid"], "mxproxy")
        self.assertGreaterEqual(len(queries), 15)
        path = os.path.join(self.tmpdir, "dashboard-as-rules.yaml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (_, expr) in enumerate(queries):
                f.write("      - record: dashboard:query_%d\n        expr: %s\n"
                        % (i, json.dumps(expand(expr))))
        rc, out = promtool("check", "rules", path)
        self.assertEqual(rc, 0, out)
        self.assertIn("SUCCESS: %d rules found" % len(queries), out)

    def test_every_name_is_one_mxproxy_exports(self):
        families = self.exported()
        for title, expr in dashboard_queries()[1]:
            self.check_names("dashboard panel %r" % title, expand(expr), families)
        exprs = alert_exprs()
        self.assertEqual(len(exprs), 4)
        for expr in exprs:
            self.check_names("alert rule", expr, families)


if __name__ == "__main__":
    mxtest.main()
