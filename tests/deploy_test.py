#!/usr/bin/env python3
"""Validates deploy/ as far as this machine can without a Docker engine or a cluster.

Usage: deploy_test.py SOURCE_DIR [CDS_SERVER_BINARY]

- deploy/kubernetes/: every manifest parses (PyYAML, Debian's python3-yaml); kinds and
  apiVersions; kustomization.yaml lists existing files and never the Secret templates;
  labels and selectors agree between the workload, both Services, the PDB, the HPA and the
  NetworkPolicy; probes (cdsctl health over TLS, with options cdsctl really has);
  securityContext (the "restricted" Pod Security Standard and more); resources; the grace
  period budget; every mounted path a flag names; the audit trail on a persistent volume;
  Prometheus annotations; the trusted keys are a copy of rules/keys; the access policy
  parses as cds.v1.AccessPolicy (protoc).
- deploy/Dockerfile (no hadolint in Debian): Debian 12 stages only, non-root numeric USER
  equal to the pod's runAsUser, no ADD, exec-form ENTRYPOINT cds-server, EXPOSE of both
  ports, runtime stage without -dev packages; with a built cds-server, every Debian package
  its shared libraries come from is installed by the runtime stage (or comes with one).
- deploy/systemd/cds-server.service: `systemd-analyze verify` (on a copy whose ExecStart
  points at the built binary, or at a stub when there is none) must be silent, `systemd-analyze
  security --offline=true` must rate it OK or better, and the hardening directives are there.
- Flags: every cds-server flag used in the manifests, the Dockerfile and the unit is an
  ABSL_FLAG of the server's sources or in NEW_FLAGS below; development-only flags never
  appear.
- With a built cds-server that has every flag: the StatefulSet's exact arguments (paths
  re-rooted in a temporary directory laid out like the container, ports free ones) start
  it, the three probe commands succeed, /metrics answers, nothing is written outside the
  data volume and /tmp, and SIGTERM exits 0 within --grace_period.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

try:
    import yaml
except ImportError:  # pragma: no cover - install-deps.sh installs python3-yaml
    print("deploy_test: python3-yaml is missing (bash scripts/install-deps.sh)", file=sys.stderr)
    sys.exit(1)

SOURCE_DIR = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                             os.path.join(os.path.dirname(__file__), ".."))
SERVER_BINARY = sys.argv[2] if len(sys.argv) > 2 else ""
DEPLOY = os.path.join(SOURCE_DIR, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")

# ------------------------------------------------------------------------------------------
# NEW FLAGS: flags deploy/ uses before cds-server's sources define them (a flag another
# change is adding). Empty now: --metrics_listen, --log_level and --grace_period (issue 7,
# parts 2-4) were listed here until they landed in server/main.cc. Keep it as short as
# possible: a flag listed here is not checked against the sources (the test prints a note
# once it is defined, so it can be removed), and the tests that start the built server
# with the deployed arguments skip while it lacks one of these.
NEW_FLAGS = set()
# ------------------------------------------------------------------------------------------

# Never in a deployment.
FORBIDDEN_FLAGS = {"insecure_dev", "allow_unsigned", "noop_baseline"}
# Every deployment (Kubernetes, the image's defaults, systemd) sets these.
REQUIRED_FLAGS = {
    "listen", "rules_dir", "trusted_keys_dir", "state_dir", "tls_cert", "tls_key",
    "tls_client_ca", "policy", "audit_db", "audit_key_file", "metrics_listen", "log_level",
    "grace_period",
}
GRPC_PORT = 50051
METRICS_PORT = 9464

# kind -> the apiVersion the manifests must use.
API_VERSIONS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "Service": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def server_flags():
    """ABSL_FLAG names defined in cds-server's sources (server/, tests excluded)."""
    flags = {}
    pattern = re.compile(r"ABSL_FLAG\(\s*[\w:<>, ]+?\s*,\s*(\w+)\s*,")
    for root, _, files in os.walk(os.path.join(SOURCE_DIR, "server")):
        for name in files:
            if not name.endswith(".cc") or name.endswith("_test.cc"):
                continue
            path = os.path.join(root, name)
            for flag in pattern.findall(read(path)):
                flags[flag] = os.path.relpath(path, SOURCE_DIR)
    return flags


def cdsctl_options():
    """The --options client/cli.cc's argument parser accepts."""
    return set(re.findall(r'arg == "(--[a-z_-]+)"', read(os.path.join(SOURCE_DIR, "client", "cli.cc"))))


def flags_in(args):
    """{flag: value} for every --flag[=value] token."""
    out = {}
    for token in args:
        m = re.match(r"^--([a-z][a-z0-9_]*)(?:=(.*))?$", token)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else ""
    return out


def duration_seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not m:
        raise ValueError("not a duration: %r" % text)
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def quantity(text):
    """Kubernetes quantity -> float (cores or bytes)."""
    text = str(text)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3,
                "M": 1e6, "G": 1e9, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|)", text)
    if not m:
        raise ValueError("not a quantity: %r" % text)
    return float(m.group(1)) * suffixes[m.group(2)]


def under(path, directory):
    directory = directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


class Manifests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.kustomization = load_yaml_docs(os.path.join(K8S, "kustomization.yaml"))[0]
        cls.docs = []  # (file, doc) of every applied resource
        for name in cls.kustomization.get("resources", []):
            for doc in load_yaml_docs(os.path.join(K8S, name)):
                cls.docs.append((name, doc))
        cls.templates = load_yaml_docs(os.path.join(K8S, "secrets.example.yaml"))
        workloads = [d for _, d in cls.docs if d["kind"] in ("StatefulSet", "Deployment")]
        assert len(workloads) == 1, "exactly one workload, got %d" % len(workloads)
        cls.workload = workloads[0]
        cls.pod = cls.workload["spec"]["template"]["spec"]
        containers = cls.pod["containers"]
        assert len(containers) == 1, "one container"
        cls.container = containers[0]
        cls.args = flags_in(cls.container.get("args", []))
        cls.mounts = {m["mountPath"]: m for m in cls.container.get("volumeMounts", [])}
        cls.volumes = {v["name"]: v for v in cls.pod.get("volumes", [])}
        cls.claims = {c["metadata"]["name"]: c
                      for c in cls.workload["spec"].get("volumeClaimTemplates", [])}

    def of_kind(self, kind):
        return [d for _, d in self.docs if d["kind"] == kind]

    def one(self, kind):
        found = self.of_kind(kind)
        self.assertEqual(len(found), 1, "exactly one %s" % kind)
        return found[0]

    def mount_for(self, path):
        """The volumeMount whose mountPath holds path (longest match), or None."""
        best = None
        for mount_path, mount in self.mounts.items():
            if under(path, mount_path) and (best is None or len(mount_path) > len(best["mountPath"])):
                best = mount
        return best

    # --- files, kinds, apiVersions -----------------------------------------------------

    def test_every_yaml_file_parses_and_is_accounted_for(self):
        resources = set(self.kustomization.get("resources", []))
        for name in sorted(os.listdir(K8S)):
            if not name.endswith((".yaml", ".yml")):
                continue
            docs = load_yaml_docs(os.path.join(K8S, name))
            self.assertTrue(docs, name + " is empty")
            if name in ("kustomization.yaml", "secrets.example.yaml"):
                continue
            self.assertIn(name, resources, name + " is not listed in kustomization.yaml")
        for name in resources:
            self.assertTrue(os.path.isfile(os.path.join(K8S, name)), name + " missing")

    def test_kinds_and_api_versions(self):
        docs = [d for _, d in self.docs] + self.templates + [self.kustomization]
        for doc in docs:
            kind = doc.get("kind")
            self.assertIn(kind, API_VERSIONS, "unexpected kind %r" % kind)
            self.assertEqual(doc.get("apiVersion"), API_VERSIONS[kind], kind)
            if kind != "Kustomization":
                self.assertTrue(doc.get("metadata", {}).get("name"), kind + " without a name")
        kinds = {d["kind"] for _, d in self.docs}
        for kind in ("Namespace", "ServiceAccount", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "NetworkPolicy"):
            self.assertIn(kind, kinds)

    def test_kustomization(self):
        k = self.kustomization
        self.assertEqual(k.get("namespace"), self.one("Namespace")["metadata"]["name"])
        self.assertNotIn("secrets.example.yaml", k.get("resources", []),
                         "Secret templates must never be applied")
        for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            for entry in generator.get("files", []):
                path = entry.split("=", 1)[-1]
                self.assertTrue(os.path.isfile(os.path.join(K8S, path)), path + " missing")
        images = {i["name"] for i in k.get("images", [])}
        self.assertIn(self.container["image"], images, "the image is set in kustomization.yaml")

    def test_namespace_enforces_restricted_pod_security(self):
        labels = self.one("Namespace")["metadata"].get("labels", {})
        self.assertEqual(labels.get("pod-security.kubernetes.io/enforce"), "restricted")

    # --- labels and selectors ----------------------------------------------------------

    def test_selectors_match(self):
        selector = self.workload["spec"]["selector"]["matchLabels"]
        self.assertTrue(selector)
        template_labels = self.workload["spec"]["template"]["metadata"]["labels"]
        for key, value in selector.items():
            self.assertEqual(template_labels.get(key), value, "template lacks selector label")
        services = self.of_kind("Service")
        self.assertGreaterEqual(len(services), 2)
        for service in services:
            self.assertEqual(service["spec"]["selector"], selector, service["metadata"]["name"])
        self.assertEqual(self.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], selector)
        self.assertEqual(self.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"], selector)
        # Every object carries the name label, so `kubectl get all -l` finds them.
        for _, doc in self.docs:
            if doc["kind"] == "Namespace":
                continue
            self.assertEqual(doc["metadata"].get("labels", {}).get("app.kubernetes.io/name"),
                             selector["app.kubernetes.io/name"], doc["kind"])

    def test_services(self):
        port_names = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(port_names.get("grpc"), GRPC_PORT)
        self.assertEqual(port_names.get("metrics"), METRICS_PORT)
        headless = [s for s in self.of_kind("Service") if s["spec"].get("clusterIP") == "None"]
        normal = [s for s in self.of_kind("Service") if s["spec"].get("clusterIP") != "None"]
        self.assertEqual(len(headless), 1, "one headless Service")
        self.assertEqual(len(normal), 1, "one ClusterIP Service")
        self.assertFalse(headless[0]["spec"].get("publishNotReadyAddresses", False),
                         "draining / unready replicas must leave the headless DNS")
        if self.workload["kind"] == "StatefulSet":
            self.assertEqual(self.workload["spec"]["serviceName"], headless[0]["metadata"]["name"])
        for service in headless + normal:
            for port in service["spec"]["ports"]:
                self.assertIn(port["targetPort"], port_names, "unknown targetPort")
                self.assertEqual(port["port"], port_names[port["targetPort"]])
            self.assertIn(GRPC_PORT, [p["port"] for p in service["spec"]["ports"]])

    def test_hpa_and_pdb(self):
        hpa = self.one("HorizontalPodAutoscaler")["spec"]
        target = hpa["scaleTargetRef"]
        self.assertEqual(target["kind"], self.workload["kind"])
        self.assertEqual(target["name"], self.workload["metadata"]["name"])
        self.assertEqual(target["apiVersion"], self.workload["apiVersion"])
        self.assertGreaterEqual(hpa["minReplicas"], 2, "at least two replicas")
        self.assertGreaterEqual(hpa["maxReplicas"], hpa["minReplicas"])
        self.assertTrue(hpa.get("metrics"), "the HPA scales on some metric")
        for metric in hpa["metrics"]:
            if metric["type"] == "Resource":
                name = metric["resource"]["name"]
                self.assertIn(name, self.container["resources"]["requests"],
                              "utilisation of %s needs a request" % name)
        # The HPA owns the replica count; a fixed one would be reset by every apply.
        self.assertNotIn("replicas", self.workload["spec"])
        pdb = self.one("PodDisruptionBudget")["spec"]
        if "minAvailable" in pdb:
            self.assertLess(int(pdb["minAvailable"]), hpa["minReplicas"], "PDB would block drains")
        else:
            self.assertGreaterEqual(int(pdb["maxUnavailable"]), 1)
            self.assertLess(int(pdb["maxUnavailable"]), hpa["minReplicas"])

    def test_network_policy_admits_grpc_and_metrics(self):
        spec = self.one("NetworkPolicy")["spec"]
        ports = [p["port"] for rule in spec.get("ingress", []) for p in rule.get("ports", [])]
        self.assertIn(GRPC_PORT, ports)
        self.assertIn(METRICS_PORT, ports)

    # --- probes and lifecycle ----------------------------------------------------------

    def probe_command(self, probe):
        command = probe["exec"]["command"]
        if command[:2] == ["/bin/sh", "-c"]:
            return shlex.split(command[2].replace(";", " ; "))
        return command

    def test_probes_use_grpc_health_over_tls(self):
        options = cdsctl_options()
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            self.assertIn(kind, self.container, kind + " missing")
            probe = self.container[kind]
            self.assertIn("exec", probe, kind + ": kubelet's grpc probe cannot do TLS")
            command = self.probe_command(probe)
            self.assertEqual(command[0], "/usr/local/bin/cdsctl", kind)
            self.assertEqual(command[1], "health", kind)
            end = command.index(";") if ";" in command else len(command)
            probe_flags = flags_in(command[2:end])
            for flag in probe_flags:
                self.assertIn("--" + flag, options, "%s: cdsctl has no option --%s" % (kind, flag))
            self.assertEqual(probe_flags.get("server"), "localhost:%d" % GRPC_PORT, kind)
            for flag in ("tls_ca", "tls_cert", "tls_key"):
                path = probe_flags.get(flag)
                self.assertTrue(path, "%s: --%s missing" % (kind, flag))
                self.assertIsNotNone(self.mount_for(path), "%s: %s is not mounted" % (kind, path))
            deadline = duration_seconds(probe_flags.get("deadline", "5s"))
            self.assertLess(deadline, probe.get("timeoutSeconds", 1), kind + ": deadline >= timeout")
        # Readiness: SERVING only. Liveness and start-up: any answer (0 or 1) counts, so
        # NOT_SERVING (no rule set, draining) never restarts the container.
        readiness = self.probe_command(self.container["readinessProbe"])
        self.assertEqual(flags_in(readiness).get("service"), "cds.v1.DecisionSupport")
        self.assertNotIn("-c", self.container["readinessProbe"]["exec"]["command"][:2])
        for kind in ("livenessProbe", "startupProbe"):
            script = self.container[kind]["exec"]["command"][2]
            self.assertIn("test $? -le 1", script, kind)

    def test_grace_period_budget(self):
        grace = duration_seconds(self.args["grace_period"])
        pre_stop = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(pre_stop[0], "/bin/sleep")
        sleep = float(pre_stop[1])
        termination = self.pod["terminationGracePeriodSeconds"]
        self.assertGreater(termination, grace + sleep,
                           "terminationGracePeriodSeconds must cover preStop + --grace_period")

    # --- security ----------------------------------------------------------------------

    def test_security_context(self):
        pod = self.pod["securityContext"]
        c = self.container["securityContext"]
        self.assertTrue(pod.get("runAsNonRoot"))
        self.assertTrue(c.get("runAsNonRoot", pod.get("runAsNonRoot")))
        uid = c.get("runAsUser", pod.get("runAsUser"))
        self.assertIsInstance(uid, int)
        self.assertNotEqual(uid, 0)
        self.assertEqual(uid, dockerfile_user_uid(), "runAsUser differs from the image's USER")
        self.assertIn("fsGroup", pod, "volumes must be writable by the non-root user")
        for ctx in (pod, c):
            self.assertEqual(ctx.get("seccompProfile", {}).get("type"), "RuntimeDefault")
        self.assertIs(c.get("readOnlyRootFilesystem"), True)
        self.assertIs(c.get("allowPrivilegeEscalation"), False)
        self.assertFalse(c.get("privileged", False))
        self.assertEqual(c["capabilities"].get("drop"), ["ALL"])
        self.assertFalse(c["capabilities"].get("add"))
        self.assertIs(self.pod.get("automountServiceAccountToken"), False)
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            self.assertFalse(self.pod.get(key, False), key)
        for volume in self.volumes.values():
            self.assertNotIn("hostPath", volume, "hostPath breaks the restricted standard")

    def test_resources(self):
        resources = self.container["resources"]
        for name in ("cpu", "memory"):
            self.assertIn(name, resources["requests"])
        self.assertIn("memory", resources["limits"])
        for name, limit in resources["limits"].items():
            if name in resources["requests"]:
                self.assertGreaterEqual(quantity(limit), quantity(resources["requests"][name]), name)

    # --- volumes, files, secrets -------------------------------------------------------

    def test_every_mount_has_a_volume(self):
        for mount in self.mounts.values():
            self.assertTrue(mount["name"] in self.volumes or mount["name"] in self.claims,
                            mount["name"] + " has no volume")
            volume = self.volumes.get(mount["name"], {})
            if "secret" in volume or "configMap" in volume:
                self.assertTrue(mount.get("readOnly"), mount["name"] + " must be read-only")
            # subPath mounts are never updated: renewed certificates would not arrive.
            self.assertNotIn("subPath", mount, mount["name"])

    def test_flag_paths_are_mounted(self):
        image_paths = ["/opt/cds/rules"]  # baked into the image (deploy/Dockerfile)
        for flag in ("rules_dir", "trusted_keys_dir", "tls_cert", "tls_key", "tls_client_ca",
                     "policy", "audit_key_file"):
            path = self.args[flag]
            mount = self.mount_for(path)
            self.assertTrue(mount is not None or any(under(path, p) for p in image_paths),
                            "--%s=%s is neither mounted nor in the image" % (flag, path))
        # Written by the server: per-replica persistent volume, writable.
        for flag in ("state_dir", "audit_db"):
            mount = self.mount_for(self.args[flag])
            self.assertIsNotNone(mount, flag)
            self.assertFalse(mount.get("readOnly", False), flag + " on a read-only mount")
            self.assertIn(mount["name"], self.claims,
                          "--%s must be on a per-replica persistent volume" % flag)
        env = {e["name"]: e.get("value") for e in self.container.get("env", [])}
        tmp = self.mount_for(env.get("TMPDIR", "/tmp"))
        self.assertIsNotNone(tmp, "TMPDIR must be a writable mount (read-only root)")
        self.assertFalse(tmp.get("readOnly", False))

    def test_secrets_and_config_maps_are_provided(self):
        generated = {g["name"] for g in self.kustomization.get("configMapGenerator", [])}
        templates = {t["metadata"]["name"]: t for t in self.templates}
        for volume in self.volumes.values():
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                self.assertIn(name, templates, name + " has no template in secrets.example.yaml")
                for item in volume["secret"].get("items", []):
                    self.assertIn(item["key"], templates[name]["stringData"])
            if "configMap" in volume:
                self.assertIn(volume["configMap"]["name"], generated)

    def test_secret_templates_hold_placeholders_only(self):
        text = read(os.path.join(K8S, "secrets.example.yaml"))
        self.assertNotIn("-----BEGIN", text, "real key or certificate material")
        for template in self.templates:
            self.assertEqual(template["kind"], "Secret")
            self.assertNotIn("data", template, "use placeholders in stringData")
            for key, value in template["stringData"].items():
                self.assertRegex(value, r"^<.*>$", "%s/%s is not a placeholder" %
                                 (template["metadata"]["name"], key))
        # No private key anywhere under deploy/.
        for root, _, files in os.walk(DEPLOY):
            for name in files:
                content = read(os.path.join(root, name))
                self.assertNotRegex(content, r"-----BEGIN [A-Z ]*PRIVATE KEY-----", name)

    def test_trusted_keys_are_the_repository_keys(self):
        keys_dir = os.path.join(SOURCE_DIR, "rules", "keys")
        repo_keys = {n: read(os.path.join(keys_dir, n)) for n in os.listdir(keys_dir)
                     if n.endswith(".pub")}
        (generator,) = [g for g in self.kustomization["configMapGenerator"]
                        if g["name"] == "cds-trusted-keys"]
        shipped = {os.path.basename(f): read(os.path.join(K8S, f)) for f in generator["files"]}
        self.assertEqual(shipped, repo_keys, "deploy/kubernetes/trusted-keys/ != rules/keys/")

    def test_policy_parses(self):
        (generator,) = [g for g in self.kustomization["configMapGenerator"]
                        if g["name"] == "cds-server-policy"]
        (policy_file,) = generator["files"]
        self.assertEqual(os.path.basename(self.args["policy"]), os.path.basename(policy_file))
        text = read(os.path.join(K8S, policy_file))
        self.assertNotIn("bearer_tokens", text, "bearer tokens are for development only")
        self.assertNotRegex(text, r'identity:\s*"(cds:)?cds-probe"', "the probe needs no role")
        protoc = shutil.which("protoc")
        if protoc is None:
            self.skipTest("protoc not installed")
        result = subprocess.run(
            [protoc, "-I" + os.path.join(SOURCE_DIR, "proto"), "-I/usr/include",
             "--encode=cds.v1.AccessPolicy", "cds/v1/access.proto"],
            input=text.encode(), capture_output=True, check=False)
        self.assertEqual(result.returncode, 0, result.stderr.decode())

    def test_prometheus_annotations(self):
        annotations = self.workload["spec"]["template"]["metadata"].get("annotations", {})
        self.assertEqual(annotations.get("prometheus.io/scrape"), "true")
        self.assertEqual(annotations.get("prometheus.io/port"), str(METRICS_PORT))
        self.assertEqual(annotations.get("prometheus.io/path"), "/metrics")
        self.assertEqual(self.args["metrics_listen"].rsplit(":", 1)[1], str(METRICS_PORT))
        self.assertEqual(self.args["listen"].rsplit(":", 1)[1], str(GRPC_PORT))


# ------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions():
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in read(os.path.join(DEPLOY, "Dockerfile")).splitlines():
        stripped = raw.strip()
        if not current and (stripped.startswith("#") or not stripped):
            continue
        if stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_stages():
    stages = []
    for instruction, rest in dockerfile_instructions():
        if instruction == "FROM":
            stages.append({"from": rest, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instruction, rest))
    return stages


def dockerfile_user_uid():
    final = dockerfile_stages()[-1]
    users = [rest for instruction, rest in final["instructions"] if instruction == "USER"]
    return int(users[-1].split(":")[0]) if users else 0


def dockerfile_cmd_flags():
    for instruction, rest in dockerfile_stages()[-1]["instructions"]:
        if instruction == "CMD":
            return flags_in(json.loads(rest))
    return {}


def runtime_packages():
    packages = []
    for instruction, rest in dockerfile_stages()[-1]["instructions"]:
        if instruction == "RUN" and "apt-get install" in rest:
            install = rest.split("apt-get install", 1)[1].split("&&", 1)[0]
            packages += [t for t in install.split() if not t.startswith("-")]
    return packages


class Dockerfile(unittest.TestCase):
    def test_structure(self):
        stages = dockerfile_stages()
        self.assertGreaterEqual(len(stages), 2, "multi-stage")
        for stage in stages:
            image = stage["from"].split()[0]
            self.assertRegex(image, r"^debian:12(-slim)?$", "Debian 12 stages only")
        self.assertRegex(stages[0]["from"], r"\bAS build$")
        instructions = dockerfile_instructions()
        for instruction, rest in instructions:
            self.assertNotEqual(instruction, "ADD", "use COPY (no remote or archive ADD)")
            self.assertNotRegex(rest, r"\b(curl|wget)\b", "no downloads outside apt")
        build_runs = " ".join(rest for i, rest in stages[0]["instructions"] if i == "RUN")
        self.assertIn("install-deps.sh", build_runs, "build stage uses scripts/install-deps.sh")
        final = stages[-1]["instructions"]
        names = [i for i, _ in final]
        self.assertIn("USER", names)
        self.assertNotEqual(dockerfile_user_uid(), 0, "non-root USER")
        self.assertRegex([r for i, r in final if i == "USER"][-1], r"^\d+(:\d+)?$",
                         "numeric USER, so runAsNonRoot can verify it")
        entrypoint = json.loads([r for i, r in final if i == "ENTRYPOINT"][-1])
        self.assertEqual(entrypoint, ["/usr/local/bin/cds-server"])
        exposed = " ".join(r for i, r in final if i == "EXPOSE").split()
        self.assertIn(str(GRPC_PORT), exposed)
        self.assertIn(str(METRICS_PORT), exposed)
        for package in runtime_packages():
            self.assertFalse(package.endswith("-dev"), "-dev package in the runtime stage")
        # Everything the build COPYs from the context passes .dockerignore.
        ignore = read(os.path.join(SOURCE_DIR, ".dockerignore")).split()
        for instruction, rest in instructions:
            if instruction == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    self.assertIn("!" + source, ignore, source + " is excluded by .dockerignore")

    def test_runtime_packages_cover_the_binary(self):
        if not SERVER_BINARY or not os.path.exists(SERVER_BINARY):
            self.skipTest("no built cds-server to inspect")
        if shutil.which("ldd") is None or shutil.which("dpkg") is None:
            self.skipTest("ldd or dpkg missing")
        binaries = [SERVER_BINARY]
        cdsctl = os.path.join(os.path.dirname(os.path.dirname(SERVER_BINARY)), "client", "cdsctl")
        if os.path.exists(cdsctl):
            binaries.append(cdsctl)
        # In debian:12-slim already, or pulled in by the listed packages (Depends).
        implied = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libgrpc29", "libre2-9",
                   "libc-ares2", "libbrotli1"}
        listed = set(runtime_packages())
        libraries = set()
        for binary in binaries:
            result = subprocess.run(["ldd", binary], capture_output=True, text=True)
            if result.returncode != 0:
                self.skipTest("%s is not a dynamic executable" % binary)
            ldd = result.stdout
            self.assertNotIn("not found", ldd)
            libraries |= set(re.findall(r"=> (/\S+)", ldd))
        # One dpkg -S for all (it is slow per call); Debian 12 ships libraries under
        # /usr/lib but ldd may name them through the /lib symlink.
        candidates = {}
        for path in libraries:
            for candidate in (path, os.path.realpath(path), re.sub(r"^/lib/", "/usr/lib/", path)):
                candidates[candidate] = path
        owners = subprocess.run(["dpkg", "-S"] + sorted(candidates), capture_output=True,
                                text=True).stdout
        owned = {}
        for line in owners.splitlines():
            package, _, path = line.partition(": ")
            if path in candidates:
                owned[candidates[path]] = package.split(":", 1)[0]
        for path in sorted(libraries):
            package = owned.get(path)
            if package is None:
                continue  # not from a Debian package (e.g. a locally built library)
            self.assertTrue(package in listed or package in implied,
                            "%s comes from %s: add it to the runtime stage" % (path, package))


# ------------------------------------------------------------------------------------------
# systemd


def unit_text():
    return read(os.path.join(DEPLOY, "systemd", "cds-server.service"))


def unit_directives():
    """{key: [values]} of the [Service]/[Unit] sections, continuation lines joined."""
    out = {}
    text = re.sub(r"\\\n\s*", " ", unit_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def unit_exec_start_flags():
    (exec_start,) = unit_directives()["ExecStart"]
    tokens = exec_start.split()
    flags = flags_in(tokens[1:])
    env = read(os.path.join(DEPLOY, "systemd", "cds-server.env"))
    # The env file's extra arguments, commented examples included.
    for line in env.splitlines():
        m = re.match(r"^#?\s*CDS_EXTRA_ARGS=(.*)$", line)
        if m:
            flags.update(flags_in(m.group(1).split()))
    return tokens[0], flags


class SystemdUnit(unittest.TestCase):
    def verify_copy(self):
        """A copy of the unit whose ExecStart is an existing executable."""
        binary, _ = unit_exec_start_flags()
        tmp = tempfile.mkdtemp(prefix="deploy_test.")
        self.addCleanup(shutil.rmtree, tmp)
        target = SERVER_BINARY if SERVER_BINARY and os.access(SERVER_BINARY, os.X_OK) else ""
        if not target:
            target = os.path.join(tmp, "cds-server")
            with open(target, "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(target, 0o755)
            print("deploy_test: no built cds-server; verifying the unit against a stub",
                  file=sys.stderr)
        path = os.path.join(tmp, "cds-server.service")
        with open(path, "w") as f:
            f.write(unit_text().replace(binary, target))
        return path

    def systemd_analyze(self):
        tool = shutil.which("systemd-analyze")
        self.assertIsNotNone(tool, "systemd-analyze missing (bash scripts/install-deps.sh)")
        return tool

    def test_systemd_analyze_verify(self):
        tool = self.systemd_analyze()
        path = self.verify_copy()
        result = subprocess.run([tool, "verify", path], capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        self.assertEqual(result.returncode, 0, output)
        self.assertEqual(output, "", "systemd-analyze verify printed warnings")

    def test_systemd_analyze_security(self):
        tool = self.systemd_analyze()
        path = self.verify_copy()
        result = subprocess.run([tool, "security", "--offline=true", "--no-pager", path],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
        self.assertIsNotNone(m, result.stdout[-500:])
        self.assertLessEqual(float(m.group(1)), 2.0, "exposure %s %s" % (m.group(1), m.group(2)))

    def test_hardening_directives(self):
        d = {k: v[-1] for k, v in unit_directives().items()}
        self.assertTrue(d.get("User") or d.get("DynamicUser") == "yes", "dedicated user")
        self.assertNotIn(d.get("User"), ("root", "0"))
        expected = {
            "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
            "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
            "AmbientCapabilities": "", "KillSignal": "SIGTERM", "Restart": "on-failure",
            "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
            "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
            "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
        }
        for key, value in expected.items():
            self.assertEqual(d.get(key), value, key)
        self.assertIn("@system-service", unit_directives()["SystemCallFilter"][0])
        families = set(d["RestrictAddressFamilies"].split())
        self.assertTrue(families <= {"AF_INET", "AF_INET6", "AF_UNIX"}, families)
        self.assertIn("-HUP $MAINPID", d["ExecReload"], "reload = SIGHUP = rescan rules")
        self.assertTrue(d.get("StateDirectory"))
        self.assertIn("/etc/cds", d.get("ReadOnlyPaths", "").split())
        _, flags = unit_exec_start_flags()
        grace = duration_seconds(flags["grace_period"])
        self.assertGreater(duration_seconds(d["TimeoutStopSec"]), grace,
                           "TimeoutStopSec must exceed --grace_period")
        # The server writes only inside its StateDirectory.
        state = "/var/lib/" + d["StateDirectory"].split()[0]
        for flag in ("state_dir", "audit_db"):
            self.assertTrue(under(flags[flag], state), "--%s outside %s" % (flag, state))
        for flag in ("rules_dir", "trusted_keys_dir", "tls_cert", "tls_key", "tls_client_ca",
                     "policy", "audit_key_file"):
            self.assertTrue(under(flags[flag], "/etc/cds"), "--%s outside /etc/cds" % flag)


# ------------------------------------------------------------------------------------------
# Flags, across all three


class Flags(unittest.TestCase):
    def uses(self):
        return {
            "kubernetes": flags_in(_container_args()),
            "Dockerfile CMD": dockerfile_cmd_flags(),
            "systemd unit": unit_exec_start_flags()[1],
        }

    def test_every_flag_exists(self):
        defined = server_flags()
        self.assertIn("listen", defined, "could not read the server's ABSL_FLAGs")
        for flag in sorted(NEW_FLAGS & set(defined)):
            print("deploy_test: NOTE: --%s is now defined in %s; remove it from NEW_FLAGS in "
                  "tests/deploy_test.py" % (flag, defined[flag]), file=sys.stderr)
        for where, flags in self.uses().items():
            for flag in flags:
                self.assertTrue(flag in defined or flag in NEW_FLAGS,
                                "%s uses --%s, which cds-server does not define" % (where, flag))
                self.assertNotIn(flag, FORBIDDEN_FLAGS, "%s uses --%s" % (where, flag))
            self.assertEqual(REQUIRED_FLAGS - set(flags), set(), where + " lacks flags")
            grace = duration_seconds(flags["grace_period"])
            self.assertGreater(grace, 0)

    def test_no_development_flags_anywhere_in_deploy(self):
        for root, _, files in os.walk(DEPLOY):
            for name in files:
                if name.endswith(".md"):
                    continue  # the README may say what never to use
                text = read(os.path.join(root, name))
                for flag in FORBIDDEN_FLAGS:
                    self.assertNotIn("--" + flag, text, "%s mentions --%s" % (name, flag))


class FlagsAgainstServer(unittest.TestCase):
    """The StatefulSet's and the systemd unit's exact arguments, run by the built server.

    Paths are re-rooted under a temporary directory laid out like the container or the
    host (Secrets, ConfigMaps, /etc/cds and the writable volume as files and symlinks), the
    gRPC port is 0 and the metrics port a free one; everything else is as deployed. Skipped
    while the built server lacks a flag of NEW_FLAGS (or there is no built server, cdsctl
    or openssl).
    """

    def setUp(self):
        if not SERVER_BINARY or not os.access(SERVER_BINARY, os.X_OK):
            self.skipTest("no built cds-server")
        helpfull = subprocess.run([SERVER_BINARY, "--helpfull"], capture_output=True,
                                  text=True).stdout
        missing = [f for f in sorted(NEW_FLAGS) if "--" + f + " " not in helpfull]
        if missing:
            self.skipTest("the built cds-server lacks --" + ", --".join(missing))
        if shutil.which("openssl") is None:
            self.skipTest("openssl missing (scripts/make-dev-certs.sh)")
        cdsctl = os.path.join(os.path.dirname(os.path.dirname(SERVER_BINARY)), "client", "cdsctl")
        if not os.access(cdsctl, os.X_OK):
            self.skipTest("no built cdsctl")
        self.cdsctl = cdsctl
        self.tmp = tempfile.mkdtemp(prefix="deploy_test.")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.root = os.path.join(self.tmp, "root")
        self.certs = os.path.join(self.tmp, "certs")
        subprocess.run(["bash", os.path.join(SOURCE_DIR, "scripts", "make-dev-certs.sh"),
                        self.certs, "cds-probe", "ops"], check=True, capture_output=True)
        self.audit_key = os.path.join(self.tmp, "audit.key")
        with open(self.audit_key, "wb") as f:
            f.write(os.urandom(48))

    def lay_out(self, layout, writable):
        """layout: deployed path -> file here (symlinked); writable: directories to create."""
        for deployed, real in layout.items():
            link = self.root + deployed
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(real, link)
        for directory in writable:
            os.makedirs(self.root + directory)

    def reroot(self, token):
        m = re.match(r"^(--[a-z_]+=)(/.*)$", token)
        return m.group(1) + self.root + m.group(2) if m else token

    def run_server(self, flag_tokens, writable):
        """Starts the server with flag_tokens (re-rooted); returns (process, port, log)."""
        import socket
        import time
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.metrics_port = sock.getsockname()[1]
        args = []
        for token in flag_tokens:
            if token.startswith("--listen="):
                token = "--listen=127.0.0.1:0"
            elif token.startswith("--metrics_listen="):
                token = "--metrics_listen=127.0.0.1:%d" % self.metrics_port
            args.append(self.reroot(token))
        env = dict(os.environ, TMPDIR=os.path.join(self.root, "tmp"))
        log_path = os.path.join(self.tmp, "server.log")
        with open(log_path, "w") as log:
            server = subprocess.Popen([SERVER_BINARY] + args, stderr=log, stdout=log, env=env)

        def stop():
            if server.poll() is None:
                server.kill()
                server.wait()
        self.addCleanup(stop)
        port, deadline = None, time.time() + 60
        while port is None and time.time() < deadline and server.poll() is None:
            m = re.search(r"listening on [^\s\"]*:(\d+)", read(log_path))
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        self.assertIsNotNone(port, "server did not start:\n" + read(log_path)[-3000:])
        self.writable = writable
        return server, port, log_path

    def check_metrics_and_stop(self, server, log_path, grace):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                    timeout=10) as response:
            self.assertEqual(response.status, 200)
            self.assertIn("# TYPE", response.read().decode())
        # SIGTERM with nothing in flight: exit 0 well within --grace_period.
        server.terminate()
        self.assertEqual(server.wait(timeout=grace + 10), 0, read(log_path)[-2000:])
        # Nothing written outside the writable directories.
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    self.assertTrue(any(under(path, self.root + w) for w in self.writable), path)

    def test_kubernetes_arguments_and_probes(self):
        certs = self.certs
        self.lay_out({
            "/opt/cds/rules": os.path.join(SOURCE_DIR, "rules"),
            "/etc/cds/keys": os.path.join(K8S, "trusted-keys"),
            "/etc/cds/tls/tls.crt": os.path.join(certs, "server.pem"),
            "/etc/cds/tls/tls.key": os.path.join(certs, "server.key"),
            "/etc/cds/tls/ca.crt": os.path.join(certs, "ca.pem"),
            "/etc/cds/probe/tls.crt": os.path.join(certs, "cds-probe.pem"),
            "/etc/cds/probe/tls.key": os.path.join(certs, "cds-probe.key"),
            "/etc/cds/probe/ca.crt": os.path.join(certs, "ca.pem"),
            "/etc/cds/policy/policy.textproto": os.path.join(K8S, "policy.textproto"),
            "/etc/cds/audit/audit.key": self.audit_key,
        }, writable=["/var/lib/cds", "/tmp"])
        server, port, log_path = self.run_server(_container_args(), ["/var/lib/cds", "/tmp"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = [c.replace("/usr/local/bin/cdsctl", self.cdsctl)
                       for c in _container()[kind]["exec"]["command"]]
            if command[:2] == ["/bin/sh", "-c"]:
                script = command[2].replace("=/etc/", "=" + self.root + "/etc/")
                command = command[:2] + [script.replace("localhost:%d" % GRPC_PORT,
                                                        "localhost:%d" % port)]
            else:
                command = [self.reroot(c).replace("localhost:%d" % GRPC_PORT, "localhost:%d" % port)
                           for c in command]
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
            self.assertEqual(result.returncode, 0, "%s: %s%s\n%s" % (
                kind, result.stdout, result.stderr, read(log_path)[-2000:]))
        self.assertTrue(os.path.exists(self.root + "/var/lib/cds/audit.db"))
        self.assertTrue(os.path.isdir(self.root + "/var/lib/cds/state"))
        self.check_metrics_and_stop(server, log_path,
                                    duration_seconds(flags_in(_container_args())["grace_period"]))

    def test_dockerfile_default_arguments(self):
        certs = self.certs
        self.lay_out({
            "/opt/cds/rules": os.path.join(SOURCE_DIR, "rules"),
            "/etc/cds/tls/tls.crt": os.path.join(certs, "server.pem"),
            "/etc/cds/tls/tls.key": os.path.join(certs, "server.key"),
            "/etc/cds/tls/ca.crt": os.path.join(certs, "ca.pem"),
            "/etc/cds/policy/policy.textproto": os.path.join(K8S, "policy.textproto"),
            "/etc/cds/audit/audit.key": self.audit_key,
        }, writable=["/var/lib/cds", "/tmp"])
        cmd = []
        for instruction, rest in dockerfile_stages()[-1]["instructions"]:
            if instruction == "CMD":
                cmd = json.loads(rest)
        server, port, log_path = self.run_server(cmd, ["/var/lib/cds", "/tmp"])
        self.check_metrics_and_stop(server, log_path,
                                    duration_seconds(flags_in(cmd)["grace_period"]))

    def test_systemd_unit_arguments(self):
        certs = self.certs
        d = unit_directives()
        state = "/var/lib/" + d["StateDirectory"][-1].split()[0]
        self.lay_out({
            "/etc/cds/rules": os.path.join(SOURCE_DIR, "rules"),
            "/etc/cds/keys": os.path.join(SOURCE_DIR, "rules", "keys"),
            "/etc/cds/tls/server.pem": os.path.join(certs, "server.pem"),
            "/etc/cds/tls/server.key": os.path.join(certs, "server.key"),
            "/etc/cds/tls/ca.pem": os.path.join(certs, "ca.pem"),
            "/etc/cds/policy.textproto": os.path.join(K8S, "policy.textproto"),
            "/etc/cds/audit.key": self.audit_key,
        }, writable=[state, "/tmp"])
        # ExecStart with the unit's Environment= values (the env file's are the same).
        env = {}
        for line in d.get("Environment", []):
            for assignment in shlex.split(line):
                key, _, value = assignment.partition("=")
                env[key] = value
        (exec_start,) = d["ExecStart"]
        tokens = []
        for token in exec_start.split()[1:]:
            if token in ("$CDS_EXTRA_ARGS", "${CDS_EXTRA_ARGS}"):
                continue
            tokens.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], token))
        server, port, log_path = self.run_server(tokens, [state, "/tmp"])
        result = subprocess.run(
            [self.cdsctl, "health", "--server=localhost:%d" % port,
             "--tls_ca=" + os.path.join(certs, "ca.pem"),
             "--tls_cert=" + os.path.join(certs, "ops.pem"),
             "--tls_key=" + os.path.join(certs, "ops.key")],
            capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertTrue(os.path.exists(self.root + state + "/audit.db"))
        self.check_metrics_and_stop(server, log_path, duration_seconds(
            flags_in(tokens)["grace_period"]))


def _container():
    """The workload's container, read independently of the Manifests class."""
    for name in load_yaml_docs(os.path.join(K8S, "kustomization.yaml"))[0]["resources"]:
        for doc in load_yaml_docs(os.path.join(K8S, name)):
            if doc["kind"] in ("StatefulSet", "Deployment"):
                return doc["spec"]["template"]["spec"]["containers"][0]
    return {}


def _container_args():
    return _container().get("args", [])


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
