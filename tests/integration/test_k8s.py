"""Kubernetes deliverables, offline: k8s/ kustomizations, their INI files, the Containerfile.

For every kustomization (k8s: sidecar, k8s/ingress, k8s/ingress-proxy-protocol):
  - `kubectl kustomize` renders it (Debian's kubectl, whose kustomize is v2, and newer ones);
  - every rendered object is checked against the Kubernetes API model classes of
    Debian's python3-kubernetes: kind and apiVersion known, no unknown field, every
    value of its declared type, required fields present (see SchemaValidator);
  - the manifests agree with the INI they ship and with each other: container ports
    and listen ports, probes and the admin address, the grace period and
    drain_timeout + drain_grace + preStop, the init container's environment and the transparent
    listener, runAsUser and the Containerfile's USER;
  - every INI passes `mxproxy -t` (cluster-only DNS names replaced by 127.0.0.1).

No network, no cluster: kubectl only renders.

Run alone: /usr/bin/python3 tests/integration/test_k8s.py build/mxproxy
"""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

import mxtest

try:
    import yaml
    import kubernetes.client as k8s_models
    from kubernetes.client.configuration import Configuration as _K8sConfiguration
except ImportError:  # a python3 other than Debian's: its packages are still there
    sys.path.append("/usr/lib/python3/dist-packages")
    import yaml
    import kubernetes.client as k8s_models
    from kubernetes.client.configuration import Configuration as _K8sConfiguration

REPO = mxtest.REPO
K8S = os.path.join(REPO, "k8s")
CONTAINERFILE = os.path.join(REPO, "Containerfile")

# kustomization directory -> what it deploys
KUSTOMIZATIONS = {
    "sidecar": K8S,
    "ingress": os.path.join(K8S, "ingress"),
    "ingress-proxy-protocol": os.path.join(K8S, "ingress-proxy-protocol"),
}

# Host names that only resolve inside a cluster; `mxproxy -t` resolves every
# backend name, so the check substitutes them (and nothing else).
CLUSTER_ONLY_NAMES = {"mail-pool"}

# Where mxproxy reads its configuration in every pod (the image's ENTRYPOINT).
MXPROXY_COMMAND = ["mxproxy", "-c", "/etc/mxproxy/mxproxy.ini"]


# --------------------------------------------------------------------------
# Offline schema validation against python3-kubernetes' model classes


class SchemaValidator:
    """Walks a decoded manifest against the OpenAPI model classes of the
    Kubernetes Python client (openapi_types: attribute -> type, attribute_map:
    attribute -> JSON key). Required fields are the ones whose generated setter
    refuses None. python3-kubernetes 22 is Kubernetes 1.22's API; it has no
    autoscaling/v2 classes, but autoscaling/v2 is v2beta2 promoted unchanged
    (Kubernetes 1.23), so the v2beta2 classes check it."""

    KINDS = {
        ("apps/v1", "Deployment"): "V1Deployment",
        ("v1", "Service"): "V1Service",
        ("v1", "ConfigMap"): "V1ConfigMap",
        ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
        ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2beta2HorizontalPodAutoscaler",
    }

    # Enumerations the generated client does not check itself: (model, attr) -> values.
    ENUMS = {
        ("V1ServiceSpec", "type"): {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
        ("V1ServiceSpec", "external_traffic_policy"): {"Local", "Cluster"},
        ("V1ServicePort", "protocol"): {"TCP", "UDP", "SCTP"},
        ("V1ContainerPort", "protocol"): {"TCP", "UDP", "SCTP"},
        ("V1Container", "image_pull_policy"): {"Always", "IfNotPresent", "Never"},
        ("V1Capabilities", "add"): None,  # checked as capability names below
        ("V1DeploymentStrategy", "type"): {"RollingUpdate", "Recreate"},
        ("V1SeccompProfile", "type"): {"RuntimeDefault", "Unconfined", "Localhost"},
        ("V2beta2MetricSpec", "type"): {"Resource", "Pods", "Object", "External",
                                        "ContainerResource"},
        ("V2beta2MetricTarget", "type"): {"Utilization", "Value", "AverageValue"},
        ("V2beta2HPAScalingPolicy", "type"): {"Pods", "Percent"},
    }

    def __init__(self):
        self._required = {}

    def _cls(self, name):
        cls = getattr(k8s_models, name, None)
        if cls is None or not hasattr(cls, "openapi_types"):
            raise KeyError(name)
        return cls

    def required(self, name):
        if name not in self._required:
            cls = self._cls(name)
            req = set()
            for attr in cls.openapi_types:
                obj = cls.__new__(cls)
                obj.local_vars_configuration = _K8sConfiguration()
                try:
                    setattr(obj, attr, None)
                except ValueError:
                    req.add(attr)
            self._required[name] = req
        return self._required[name]

    def validate(self, obj):
        """Returns a list of 'path: problem' strings; empty when obj is valid."""
        errors = []
        if not isinstance(obj, dict):
            return ["<root>: not a mapping"]
        key = (obj.get("apiVersion"), obj.get("kind"))
        model = self.KINDS.get(key)
        if model is None:
            return ["%s/%s: kind not known to this validator" % key]
        where = "%s/%s" % (obj.get("kind"), (obj.get("metadata") or {}).get("name", "?"))
        self._walk(obj, model, where, errors)
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?",
                                                         name):
            errors.append("%s.metadata.name: %r is not a DNS subdomain name" % (where, name))
        return errors

    def _walk(self, value, typ, path, errors):
        if typ.startswith("list["):
            if not isinstance(value, list):
                errors.append("%s: expected a list, got %s" % (path, type(value).__name__))
                return
            for i, item in enumerate(value):
                self._walk(item, typ[5:-1], "%s[%d]" % (path, i), errors)
            return
        if typ.startswith("dict("):
            inner = typ[typ.index(",") + 1:-1].strip()
            if not isinstance(value, dict):
                errors.append("%s: expected a mapping, got %s" % (path, type(value).__name__))
                return
            for k, v in value.items():
                if not isinstance(k, str):
                    errors.append("%s: key %r is not a string" % (path, k))
                self._walk(v, inner, "%s[%s]" % (path, k), errors)
            return
        if typ in ("str", "date", "datetime"):
            if not isinstance(value, str):
                errors.append("%s: expected a string, got %r" % (path, value))
            return
        if typ == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                errors.append("%s: expected an integer, got %r" % (path, value))
            return
        if typ == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append("%s: expected a number, got %r" % (path, value))
            return
        if typ == "bool":
            if not isinstance(value, bool):
                errors.append("%s: expected true or false, got %r" % (path, value))
            return
        if typ == "object":  # IntOrString and free-form values
            if not isinstance(value, (str, int, dict, list)) or isinstance(value, bool):
                errors.append("%s: unexpected value %r" % (path, value))
            return
        try:
            cls = self._cls(typ)
        except KeyError:
            errors.append("%s: no model class %s" % (path, typ))
            return
        if not isinstance(value, dict):
            errors.append("%s: expected a %s mapping, got %r" % (path, typ, value))
            return
        by_json = {j: a for a, j in cls.attribute_map.items()}
        for k, v in value.items():
            attr = by_json.get(k)
            if attr is None:
                errors.append("%s: unknown field %r in %s" % (path, k, typ))
                continue
            if v is None:
                continue
            self._walk(v, cls.openapi_types[attr], "%s.%s" % (path, k), errors)
            allowed = self.ENUMS.get((typ, attr))
            if allowed is not None and isinstance(v, str) and v not in allowed:
                errors.append("%s.%s: %r is not one of %s" % (path, k, v, sorted(allowed)))
        for attr in sorted(self.required(typ)):
            if value.get(cls.attribute_map[attr]) is None:
                errors.append("%s: required field %r missing in %s"
                              % (path, cls.attribute_map[attr], typ))
        if typ == "V1Capabilities":
            for cap in (value.get("add") or []) + (value.get("drop") or []):
                if not (cap == "ALL" or re.fullmatch(r"[A-Z][A-Z_]+", str(cap))) \
                        or str(cap).startswith("CAP_"):
                    errors.append("%s: bad capability name %r" % (path, cap))
        if typ in ("V1ContainerPort", "V1ServicePort") and "name" in value:
            n = value["name"]
            if not isinstance(n, str) or len(n) > 15 or \
                    not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) or \
                    not re.search(r"[a-z]", n):
                errors.append("%s.name: %r is not an IANA service name (<= 15 chars)" % (path, n))


VALIDATOR = SchemaValidator()


# --------------------------------------------------------------------------
# Rendering and reading


def kubectl():
    """$KUBECTL, else kubectl on PATH (Debian's kubernetes-client, or any other)."""
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def render(directory):
    """`kubectl kustomize DIR` -> list of objects. Newer kustomize warns on
    stderr about the v2 field names the manifests keep for Debian's kubectl."""
    r = subprocess.run([kubectl(), "kustomize", directory], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError("kubectl kustomize %s failed (%d): %s"
                             % (directory, r.returncode, r.stderr.decode(errors="replace")))
    return [o for o in yaml.safe_load_all(r.stdout) if o is not None]


def parse_ini(text):
    """mxproxy's INI: {'global': {key: [values]}, 'listener NAME': {...}}.
    Comments: a line starting with ; or #, or ' ;' after a value."""
    sections = {"global": {}}
    cur = sections["global"]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            name = line[1:line.index("]")].strip()
            cur = sections.setdefault(name, {})
            continue
        m = re.match(r"([A-Za-z_]+)\s*[=:]\s*(.*)$", line)
        if not m:
            raise ValueError("not an INI line: %r" % raw)
        value = re.split(r"\s;", m.group(2), maxsplit=1)[0].strip()
        cur.setdefault(m.group(1), []).append(value)
    return sections


def ini_get(section, key, default=None):
    values = section.get(key)
    return values[-1] if values else default


def listeners(ini):
    return {name.split(None, 1)[1]: sec for name, sec in ini.items()
            if name.startswith("listener ")}


def split_hostport(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def duration_seconds(text):
    m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", text)
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]
    return float(m.group(1)) * scale


def parse_containerfile(path):
    """-> list of stages {'from', 'name', 'lines': [(INSTRUCTION, args)]},
    joining continuation lines and dropping comments."""
    with open(path) as f:
        text = f.read()
    logical, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        logical.append(buf + s)
        buf = ""
    if buf:
        raise ValueError("Containerfile ends inside a continued line")
    stages = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(),
                             re.IGNORECASE)
            if not m:
                raise ValueError("bad FROM line: %r" % line)
            stages.append({"from": m.group(1), "name": m.group(2), "lines": []})
            continue
        if not stages:
            if instr != "ARG":
                raise ValueError("%s before the first FROM" % instr)
            continue
        stages[-1]["lines"].append((instr, args.strip()))
    return stages


CONTAINERFILE_INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE",
                              "HEALTHCHECK", "LABEL", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL",
                              "USER", "VOLUME", "WORKDIR"}


def apt_installs(stage):
    """Packages named by `apt-get install` in a stage's RUN lines."""
    pkgs = []
    for instr, args in stage["lines"]:
        if instr != "RUN":
            continue
        for cmd in re.split(r"&&|;", args):
            words = shlex.split(cmd)
            if "apt-get" in words and "install" in words:
                after = words[words.index("install") + 1:]
                pkgs += [w for w in after if not w.startswith("-")]
    return pkgs


# --------------------------------------------------------------------------
# Helpers over rendered objects


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def one(objs, kind, name=None):
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError("expected one %s%s, found %d"
                             % (kind, " " + name if name else "", len(found)))
    return found[0]


def container(pod_spec, name, init=False):
    for c in pod_spec.get("initContainers" if init else "containers") or []:
        if c["name"] == name:
            return c
    raise AssertionError("no %scontainer %r" % ("init " if init else "", name))


def port_number(c, port):
    if isinstance(port, int):
        return port
    for p in c.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError("container %s has no port named %r" % (c["name"], port))


def effective(pod_spec, c, key):
    """A securityContext field of container c, falling back on the pod's."""
    v = (c.get("securityContext") or {}).get(key)
    if v is None:
        v = (pod_spec.get("securityContext") or {}).get(key)
    return v


def prestop_sleep(c):
    cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
    if not cmd:
        return 0
    if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep"):
        return float(cmd[1])
    raise AssertionError("preStop %r: expected [sleep, N]" % cmd)


def mounted_file(objs, pod_spec, c, path):
    """The ConfigMap key that container c sees at path: (ConfigMap, key)."""
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mp):
            key = path[len(mp):]
            vol = [v for v in pod_spec["volumes"] if v["name"] == m["name"]]
            assert vol and "configMap" in vol[0], "%s is not a ConfigMap volume" % m["name"]
            cm = one(objs, "ConfigMap", vol[0]["configMap"]["name"])
            assert key in cm.get("data", {}), "ConfigMap %s has no key %s" % (
                cm["metadata"]["name"], key)
            return cm, key
    raise AssertionError("nothing mounted at %s in container %s" % (path, c["name"]))


def containerfile_runtime_uid():
    stages = parse_containerfile(CONTAINERFILE)
    users = [a for i, a in stages[-1]["lines"] if i == "USER"]
    return int(users[-1].split(":")[0])


class MxproxyIni:
    """The INI a pod's mxproxy container reads, as rendered."""

    def __init__(self, objs, pod_spec, c):
        self.cm, self.key = mounted_file(objs, pod_spec, c, c["command"][2])
        self.text = self.cm["data"][self.key]
        self.ini = parse_ini(self.text)
        self.listeners = listeners(self.ini)


# --------------------------------------------------------------------------
# Tests


def setUpModule():
    if not (os.environ.get("KUBECTL") or shutil.which("kubectl")):
        raise AssertionError("kubectl not found: bash .ci/setup test installs Debian's "
                             "kubernetes-client")


class K8sTest(unittest.TestCase):
    rendered = {}

    @classmethod
    def setUpClass(cls):
        for name, d in KUSTOMIZATIONS.items():
            cls.rendered[name] = render(d)

    def setUp(self):
        if not os.access(mxtest.binary(), os.X_OK):
            self.fail("mxproxy binary not found or not executable: %s" % mxtest.binary())
        self.tmp = tempfile.TemporaryDirectory(prefix="mxtest-k8s-")
        self.addCleanup(self.tmp.cleanup)

    # -- rendering and schema ------------------------------------------------

    def test_renders_expected_kinds(self):
        want = {
            "sidecar": {"Deployment": 1, "Service": 1, "ConfigMap": 2},
            "ingress": {"Deployment": 1, "Service": 1, "ConfigMap": 1,
                        "PodDisruptionBudget": 1, "HorizontalPodAutoscaler": 1},
        }
        want["ingress-proxy-protocol"] = want["ingress"]
        for name, objs in self.rendered.items():
            got = {}
            for o in objs:
                got[o["kind"]] = got.get(o["kind"], 0) + 1
            self.assertEqual(got, want[name], name)

    def test_every_object_matches_the_api_schema(self):
        for name, objs in self.rendered.items():
            for o in objs:
                with self.subTest(kustomization=name, kind=o.get("kind"),
                                  obj=o.get("metadata", {}).get("name")):
                    self.assertEqual(VALIDATOR.validate(o), [])

    def test_validator_rejects_broken_objects(self):
        objs = self.rendered["ingress"]
        dep = one(objs, "Deployment")
        self.assertEqual(VALIDATOR.validate(dep), [])

        def broken(mutate, *expect):
            o = copy.deepcopy(dep)
            mutate(o)
            errs = VALIDATOR.validate(o)
            self.assertTrue(errs, "validator accepted a broken object")
            self.assertTrue(any(all(e in err for e in expect) for err in errs),
                            "%s not in %s" % (expect, errs))

        def pod(o):
            return o["spec"]["template"]["spec"]

        def rename(d, old, new):
            d[new] = d.pop(old)

        # misspelled fields, at several depths
        broken(lambda o: rename(pod(o)["containers"][0], "readinessProbe", "readinesProbe"),
               "unknown field 'readinesProbe'", "V1Container")
        broken(lambda o: rename(o["spec"], "replicas", "replica"), "unknown field 'replica'")
        broken(lambda o: rename(pod(o)["containers"][0]["securityContext"],
                                "readOnlyRootFilesystem", "readOnlyRootFileSystem"),
               "unknown field 'readOnlyRootFileSystem'")
        broken(lambda o: rename(o["metadata"], "labels", "label"), "unknown field 'label'")
        # wrong types
        broken(lambda o: o["spec"].__setitem__("replicas", "2"), "spec.replicas",
               "expected an integer")
        broken(lambda o: pod(o)["containers"][0]["securityContext"].__setitem__(
            "runAsNonRoot", "true"), "runAsNonRoot", "expected true or false")
        broken(lambda o: pod(o).__setitem__("containers", {"name": "x"}), "expected a list")
        # required fields
        broken(lambda o: pod(o)["containers"][0].pop("name"), "required field 'name'")
        broken(lambda o: o["spec"].pop("selector"), "required field 'selector'")
        # values
        broken(lambda o: pod(o)["containers"][0].__setitem__("imagePullPolicy", "Sometimes"),
               "imagePullPolicy")
        broken(lambda o: o.__setitem__("apiVersion", "apps/v1beta3"), "kind not known")

        svc = one(objs, "Service")
        o = copy.deepcopy(svc)
        o["spec"]["externalTrafficPolicy"] = "local"
        self.assertTrue(VALIDATOR.validate(o))
        o = copy.deepcopy(svc)
        o["spec"]["ports"][0]["targetport"] = o["spec"]["ports"][0].pop("targetPort")
        self.assertTrue(any("unknown field 'targetport'" in e for e in VALIDATOR.validate(o)))
        hpa = one(objs, "HorizontalPodAutoscaler")
        o = copy.deepcopy(hpa)
        o["spec"]["metrics"][0]["resource"]["target"]["averageUtilisation"] = 70
        self.assertTrue(any("averageUtilisation" in e for e in VALIDATOR.validate(o)))
        pdb = one(objs, "PodDisruptionBudget")
        o = copy.deepcopy(pdb)
        o["spec"]["minAvaliable"] = 1
        self.assertTrue(any("minAvaliable" in e for e in VALIDATOR.validate(o)))

    # -- INI files -------------------------------------------------------------

    def check_ini(self, text, label):
        """`mxproxy -t` on text, with cluster-only backend names made local."""
        out = []
        for line in text.splitlines(keepends=True):
            m = re.match(r"(\s*backend\s*[=:]\s*)([^;]*?)(\s*(?:\s;.*)?\n?)$", line)
            if m and m.group(2) != "original_dst":
                entries = []
                for entry in m.group(2).split(","):
                    host, port = split_hostport(entry.strip())
                    if host in CLUSTER_ONLY_NAMES:
                        host = "127.0.0.1"
                    self.assertRegex(host, r"^[0-9.]+$|:", "%s: backend %s must resolve "
                                     "offline (or be in CLUSTER_ONLY_NAMES)" % (label, host))
                    entries.append("%s:%d" % ("[%s]" % host if ":" in host else host, port))
                line = m.group(1) + ", ".join(entries) + m.group(3)
            out.append(line)
        path = os.path.join(self.tmp.name, re.sub(r"\W", "_", label) + ".ini")
        with open(path, "w") as f:
            f.write("".join(out))
        r = subprocess.run([mxtest.binary(), "-t", "-c", path], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=10)
        self.assertEqual(r.returncode, 0, "%s: %s%s" % (label, r.stdout.decode(),
                                                        r.stderr.decode()))

    def test_every_shipped_ini_passes_mxproxy_t(self):
        sources = [os.path.join(K8S, "sidecar.ini")]
        for d in (KUSTOMIZATIONS["ingress"], KUSTOMIZATIONS["ingress-proxy-protocol"]):
            sources.append(os.path.join(d, "mxproxy.ini"))
        for path in sources:
            with open(path) as f:
                self.check_ini(f.read(), os.path.relpath(path, REPO))
        # and each as rendered into its ConfigMap, which must be the file itself
        shipped = set()
        for name, objs in self.rendered.items():
            dep = one(objs, "Deployment")
            pod = dep["spec"]["template"]["spec"]
            ini = MxproxyIni(objs, pod, container(pod, "mxproxy"))
            self.check_ini(ini.text, name + " ConfigMap")
            shipped.add(ini.text)
        for path in sources:
            with open(path) as f:
                self.assertIn(f.read(), shipped, "%s is not what any ConfigMap ships" % path)

    def test_cluster_names_substitution_is_needed_and_narrow(self):
        # mail-pool is the only name replaced; a typo in it would not be hidden
        with open(os.path.join(KUSTOMIZATIONS["ingress"], "mxproxy.ini")) as f:
            text = f.read()
        names = set(re.findall(r"(?m)^\s*backend\s*=\s*([A-Za-z][-A-Za-z0-9.]*):", text))
        self.assertEqual(names, CLUSTER_ONLY_NAMES)

    # -- the mxproxy container, in every deployment ----------------------------

    def test_mxproxy_container_matches_its_ini(self):
        uid = containerfile_runtime_uid()
        for name, objs in self.rendered.items():
            with self.subTest(kustomization=name):
                dep = one(objs, "Deployment")
                pod = dep["spec"]["template"]["spec"]
                c = container(pod, "mxproxy")
                self.assertEqual(c["command"], MXPROXY_COMMAND)
                ini = MxproxyIni(objs, pod, c)
                g = ini.ini["global"]

                # container ports = listen ports + admin port
                admin = ini_get(g, "admin")
                self.assertIsNotNone(admin, "probes need [global] admin")
                admin_host, admin_port = split_hostport(admin)
                self.assertIn(admin_host, ("0.0.0.0", "::"),
                              "admin on %s: the kubelet probes the pod address" % admin)
                listen_ports = {split_hostport(ini_get(sec, "listen"))[1]
                                for sec in ini.listeners.values()}
                for sec in ini.listeners.values():
                    self.assertIn(split_hostport(ini_get(sec, "listen"))[0], ("0.0.0.0", "::"))
                ports = {p["containerPort"] for p in c["ports"]}
                self.assertEqual(ports, listen_ports | {admin_port})
                self.assertGreaterEqual(min(ports), 1024,
                                        "ports below 1024 need CAP_NET_BIND_SERVICE")

                # probes on the admin endpoint
                for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    get = c[probe]["httpGet"]
                    self.assertEqual(get["path"], path)
                    self.assertEqual(port_number(c, get["port"]), admin_port)

                # drain timing
                drain = (duration_seconds(ini_get(g, "drain_timeout", "30s"))
                         + duration_seconds(ini_get(g, "drain_grace", "10s")))
                grace = pod.get("terminationGracePeriodSeconds", 30)
                self.assertGreater(grace, drain + prestop_sleep(c))
                self.assertGreaterEqual(prestop_sleep(c), 1)

                # non-root, read-only, no capability unless `mark` needs one
                sc = c["securityContext"]
                self.assertIs(effective(pod, c, "runAsNonRoot"), True)
                self.assertEqual(effective(pod, c, "runAsUser"), uid)
                self.assertIs(sc.get("readOnlyRootFilesystem"), True)
                self.assertIs(sc.get("allowPrivilegeEscalation"), False)
                self.assertEqual(sc["capabilities"].get("drop"), ["ALL"])
                marks = [ini_get(sec, "mark") for sec in ini.listeners.values()]
                needs = {"NET_ADMIN"} if any(m not in (None, "0") for m in marks) else set()
                self.assertEqual(set(sc["capabilities"].get("add") or []), needs)

                # resources
                self.assertTrue(c["resources"].get("requests"))
                self.assertTrue(c["resources"].get("limits"))
                workers = ini_get(g, "workers")
                self.assertIsNotNone(workers, "workers defaults to the node's CPUs")
                cpu = c["resources"]["limits"]["cpu"]
                cpu_cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
                self.assertLessEqual(int(workers), max(1, round(cpu_cores)))

                # the image is this build's
                self.assertRegex(c["image"], r"(^|/)mxproxy:%s$" % re.escape(self.version()))

    def version(self):
        with open(os.path.join(REPO, "CMakeLists.txt")) as f:
            return re.search(r"project\(mxproxy VERSION ([0-9.]+)", f.read()).group(1)

    # -- sidecar ---------------------------------------------------------------

    def test_sidecar_init_container_matches_the_ini(self):
        objs = self.rendered["sidecar"]
        pod = one(objs, "Deployment")["spec"]["template"]["spec"]
        mx = container(pod, "mxproxy")
        ini = MxproxyIni(objs, pod, mx)
        transparent = {n: s for n, s in ini.listeners.items()
                       if ini_get(s, "transparent", "off") != "off"}
        self.assertEqual(len(transparent), 1, "one listener takes the redirected connections")
        (lname, sec), = transparent.items()
        self.assertEqual(ini_get(sec, "backend"), "original_dst")
        self.assertEqual(ini_get(sec, "mode"), "smtp")

        init = container(pod, "iptables-init", init=True)
        env = {e["name"]: e.get("value") for e in init.get("env") or []}
        self.assertEqual(env.get("MODE"), ini_get(sec, "transparent"))
        self.assertEqual(env.get("MX_PROXY_PORT"), str(split_hostport(ini_get(sec, "listen"))[1]))
        ports = env.get("MX_PORTS", "25 465 587").split()
        self.assertTrue(ports and all(p.isdigit() for p in ports), "MX_PORTS is blank separated")
        self.assertNotIn(env["MX_PROXY_PORT"], ports)
        if ini_get(sec, "mode") == "smtp":
            self.assertNotIn("465", ports, "implicit TLS cannot pass a mode = smtp listener")
        # loop prevention: the UID exemption names mxproxy's UID; MX_MARK, if
        # given, is the listener's mark
        self.assertEqual(env.get("MX_PROXY_UID"), str(effective(pod, mx, "runAsUser")))
        self.assertEqual(env.get("MX_MARK") or "0", ini_get(sec, "mark", "0"))
        if env.get("MX_INTERCEPT_OUTPUT") == "1" or env.get("MODE") == "tproxy":
            self.assertTrue(env.get("MX_PROXY_UID") or env.get("MX_MARK"))

        # the mail server serves every intercepted port; the Service targets it
        mail = container(pod, "mail")
        mail_ports = {str(p["containerPort"]) for p in mail["ports"]}
        self.assertTrue(set(ports) <= mail_ports)
        self.assertNotEqual(effective(pod, mail, "runAsUser"), effective(pod, mx, "runAsUser"),
                            "the mail server's connections must not look like mxproxy's")
        svc = one(objs, "Service")
        for p in svc["spec"]["ports"]:
            self.assertIn(str(port_number(mail, p["targetPort"])), mail_ports)

        # the mail server outlives mxproxy's drain
        g = ini.ini["global"]
        drain = (duration_seconds(ini_get(g, "drain_timeout", "30s"))
                 + duration_seconds(ini_get(g, "drain_grace", "10s")))
        self.assertGreaterEqual(prestop_sleep(mail), prestop_sleep(mx) + drain)
        self.assertGreater(pod["terminationGracePeriodSeconds"], prestop_sleep(mail))

        # the init container runs k8s/iptables-init.sh from its ConfigMap
        script = init["command"][-1]
        cm, key = mounted_file(objs, pod, init, script)
        with open(os.path.join(K8S, "iptables-init.sh")) as f:
            self.assertEqual(cm["data"][key], f.read())
        self.assertEqual(init["command"][0], "/bin/sh")
        isc = init["securityContext"]
        self.assertEqual(isc["capabilities"]["drop"], ["ALL"])
        self.assertEqual(set(isc["capabilities"]["add"]), {"NET_ADMIN", "NET_RAW"})
        self.assertIs(isc.get("allowPrivilegeEscalation"), False)
        self.assertIs(isc.get("readOnlyRootFilesystem"), True)
        self.assertIn("/run", [m["mountPath"] for m in init["volumeMounts"]],
                      "iptables -w needs a writable /run for its lock")
        self.assertRegex(init["image"], r"(^|/)mxproxy-iptables-init:%s$"
                         % re.escape(self.version()))

    # -- ingress ---------------------------------------------------------------

    def check_ingress(self, name):
        objs = self.rendered[name]
        dep = one(objs, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        c = container(pod, "mxproxy")
        ini = MxproxyIni(objs, pod, c)

        self.assertGreaterEqual(dep["spec"]["replicas"], 2)
        self.assertEqual(pod.get("initContainers"), None, "no privileged init in the ingress")
        terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        self.assertTrue(any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname" and
                            self.selects(t["podAffinityTerm"]["labelSelector"], labels)
                            for t in terms))
        self.assertTrue(self.selects(dep["spec"]["selector"], labels))

        svc = one(objs, "Service")
        self.assertEqual(svc["spec"]["type"], "LoadBalancer")
        self.assertEqual(svc["spec"]["externalTrafficPolicy"], "Local")
        self.assertTrue(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()))
        listen_ports = {split_hostport(ini_get(s, "listen"))[1] for s in ini.listeners.values()}
        targets = {port_number(c, p["targetPort"]) for p in svc["spec"]["ports"]}
        self.assertEqual(targets, listen_ports, "the Service reaches every listener, only them")
        self.assertEqual({p["port"] for p in svc["spec"]["ports"]}, {25, 465, 587})

        pdb = one(objs, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["minAvailable"], 1)
        self.assertTrue(self.selects(pdb["spec"]["selector"], labels))

        hpa = one(objs, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        ref = hpa["spec"]["scaleTargetRef"]
        self.assertEqual((ref["apiVersion"], ref["kind"], ref["name"]),
                         ("apps/v1", "Deployment", dep["metadata"]["name"]))
        self.assertGreaterEqual(hpa["spec"]["minReplicas"], 2)
        self.assertGreater(hpa["spec"]["maxReplicas"], hpa["spec"]["minReplicas"])
        self.assertIn("cpu", [m["resource"]["name"] for m in hpa["spec"]["metrics"]
                              if m["type"] == "Resource"])
        self.assertIn("cpu", c["resources"]["requests"], "CPU utilisation needs a request")
        return ini, svc

    @staticmethod
    def selects(selector, labels):
        ml = selector.get("matchLabels") or {}
        return bool(ml) and all(labels.get(k) == v for k, v in ml.items()) and \
            not selector.get("matchExpressions")

    def test_ingress(self):
        ini, svc = self.check_ingress("ingress")
        for sec in ini.listeners.values():
            self.assertEqual(ini_get(sec, "accept_proxy_protocol", "off"), "off")
            self.assertEqual(ini_get(sec, "transparent", "off"), "off")
        self.assertFalse(svc["metadata"].get("annotations"))

    def test_ingress_proxy_protocol(self):
        ini, svc = self.check_ingress("ingress-proxy-protocol")
        for sec in ini.listeners.values():
            self.assertEqual(ini_get(sec, "accept_proxy_protocol"), "on")
        ann = svc["metadata"].get("annotations") or {}
        self.assertTrue(any(re.search(r"proxy-?protocol", k) for k in ann), ann)
        # the same deployment otherwise
        base = self.rendered["ingress"]
        strip = re.compile(r"(?m)^accept_proxy_protocol = on\n")
        base_ini = MxproxyIni(base, one(base, "Deployment")["spec"]["template"]["spec"],
                              container(one(base, "Deployment")["spec"]["template"]["spec"],
                                        "mxproxy"))
        self.assertEqual({n: s for n, s in listeners(parse_ini(strip.sub("", ini.text))).items()},
                         base_ini.listeners)

    # -- Containerfile ------------------------------------------------------------

    def test_containerfile(self):
        stages = parse_containerfile(CONTAINERFILE)
        names = [s["name"] for s in stages]
        self.assertEqual(names, ["build", "iptables-init", "mxproxy"],
                         "the runtime image is the last (default) stage")
        for s in stages:
            self.assertIn(s["from"], ("debian:12", "debian:12-slim"))
            for instr, args in s["lines"]:
                self.assertIn(instr, CONTAINERFILE_INSTRUCTIONS)
                self.assertTrue(args, "%s without arguments" % instr)
                if instr == "COPY":
                    words = args.split()
                    frm = [w for w in words if w.startswith("--from=")]
                    if frm:
                        self.assertIn(frm[0][7:], names[:names.index(s["name"])])
                    else:
                        for src in [w for w in words if not w.startswith("--")][:-1]:
                            self.assertTrue(os.path.exists(os.path.join(REPO, src)),
                                            "COPY source %s is not in the repository" % src)
        build, init, runtime = stages

        self.assertTrue({"cmake", "gcc", "pkg-config", "libuv1-dev", "libssl-dev",
                         "libinih-dev", "libc-ares-dev"} <= set(apt_installs(build)))
        self.assertTrue(any("CMAKE_BUILD_TYPE=Release" in a for i, a in build["lines"]
                            if i == "RUN"))
        self.assertEqual(set(apt_installs(runtime)),
                         {"libuv1", "libssl3", "libinih1", "libc-ares2", "ca-certificates"})
        self.assertTrue({"iptables", "iproute2"} <= set(apt_installs(init)))
        self.assertIn("k8s/iptables-init.sh",
                      " ".join(a for i, a in init["lines"] if i == "COPY"))

        rt = {}
        for instr, args in runtime["lines"]:
            rt.setdefault(instr, []).append(args)
        self.assertIn("--from=build /build/mxproxy /usr/local/bin/mxproxy", rt["COPY"])
        user = rt["USER"][-1]
        self.assertRegex(user, r"^[0-9]+(:[0-9]+)?$", "numeric USER, for runAsNonRoot")
        self.assertNotEqual(int(user.split(":")[0]), 0)
        self.assertEqual(json.loads(rt["ENTRYPOINT"][-1]), MXPROXY_COMMAND)
        self.assertEqual(rt["STOPSIGNAL"], ["SIGTERM"])
        exposed = {int(p.split("/")[0]) for e in rt["EXPOSE"] for p in e.split()}

        # the manifests run this image as its own UID, on ports it declares
        uid = int(user.split(":")[0])
        for name, objs in self.rendered.items():
            pod = one(objs, "Deployment")["spec"]["template"]["spec"]
            c = container(pod, "mxproxy")
            self.assertEqual(effective(pod, c, "runAsUser"), uid, name)
            self.assertEqual(c["command"], json.loads(rt["ENTRYPOINT"][-1]), name)
            self.assertTrue({p["containerPort"] for p in c["ports"]} <= exposed, name)

    def test_containerfile_parser_catches_mistakes(self):
        path = os.path.join(self.tmp.name, "Containerfile")
        with open(path, "w") as f:
            f.write("FROM debian:12 AS a\nRUN true \\\n  && true\n")
        self.assertEqual(parse_containerfile(path)[0]["lines"], [("RUN", "true  && true")])
        for bad in ("RUN true\n", "FROM debian:12 AS a\nRUN x \\\n"):
            with open(path, "w") as f:
                f.write(bad)
            with self.assertRaises(ValueError):
                parse_containerfile(path)


if __name__ == "__main__":
    mxtest.main()
