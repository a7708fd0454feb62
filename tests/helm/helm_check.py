#!/usr/bin/env python3
"""`make helm-check`: the Helm chart, rendered and validated like an operator would.

For the default values and every helm/herald/ci/*-values.yaml:
  1. merge the values over values.yaml as Helm does and validate them against
     values.schema.json (JSON Schema draft 7, as Helm does before rendering);
  2. render the chart: with `helm template` when helm is on PATH, otherwise with
     .tools/bin/helm-render (Go text/template + sprig + Helm's functions, built by
     scripts/install-deps.sh from Debian's Go packages);
  3. validate every manifest against the Kubernetes 1.30 schemas with
     `kubernetes-validate --strict`; ServiceMonitor/PrometheusRule (CRDs, no bundled schema)
     against the strict subsets in tests/helm/crd-schemas;
  4. run the binaries' own `--check-config` on the worker.toml and coordinator.toml of the
     rendered ConfigMap, so the chart and the code cannot drift;
  5. check what the chart promises: probes, resources, non-root read-only containers without
     privilege escalation or capabilities, no RPC URL in any ConfigMap, a rendered NOTES.txt.
Then every tests/helm/bad-values/*.yaml must be rejected by the schema with a message naming
the field its `# expect:` line gives.

Last line: `helm: <V> value sets, <M> manifests, <E> errors`.
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "herald")
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "herald", "herald"
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BINARIES = {name: os.path.join(TARGET, "debug", name) for name in ("herald-worker", "herald-coordinator")}
TOOLS_BIN = os.path.join(ROOT, ".tools", "bin")

errors: list[str] = []


def error(message: str) -> None:
    errors.append(message)
    print(f"helm-check: ERROR {message}", flush=True)


def info(message: str) -> None:
    print(f"helm-check: {message}", flush=True)


def coalesce(dst: dict, src: dict) -> dict:
    """Helm's merge of user values over the chart's: maps recursively, null deletes."""
    for key, value in src.items():
        if value is None:
            dst.pop(key, None)
        elif isinstance(value, dict) and isinstance(dst.get(key), dict):
            coalesce(dst[key], value)
        else:
            dst[key] = value
    return dst


def load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_errors(values: dict) -> list[str]:
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    validator = jsonschema.Draft7Validator(schema)
    found = []
    for e in sorted(validator.iter_errors(values), key=lambda e: list(map(str, e.absolute_path))):
        leaves = [e]
        # if/then and anyOf hide the real failure in their context: report the leaves.
        while leaves and any(x.context for x in leaves):
            leaves = [c for x in leaves for c in (x.context or [x])]
        for leaf in leaves:
            where = dotted(leaf.absolute_path) or "(root)"
            message = leaf.message
            if leaf.validator == "required":
                missing = re.search(r"'([^']+)' is a required property", message)
                if missing:
                    where = f"{where}.{missing.group(1)}" if leaf.absolute_path else missing.group(1)
            if leaf.validator == "additionalProperties":
                unexpected = re.findall(r"'([^']+)'", message.split("(")[-1])
                where = ", ".join(f"{where}.{u}" if leaf.absolute_path else u for u in unexpected)
                message = f"unknown key ({message})"
            found.append(f"{where}: {message}")
    return sorted(set(found))


def renderer() -> list[str]:
    helm = shutil.which("helm")
    if helm:
        return [helm]
    render = os.path.join(TOOLS_BIN, "helm-render")
    if not os.access(render, os.X_OK):
        sys.exit(f"helm-check: neither helm nor {render} (run scripts/install-deps.sh)")
    return [render]


def render(tool: list[str], value_files: list[str], notes_out: str) -> str:
    if os.path.basename(tool[0]) == "helm":
        cmd = tool + ["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        for f in value_files:
            cmd += ["-f", f]
        notes_cmd = cmd + ["--show-only", "templates/NOTES.txt"]
        notes = subprocess.run(notes_cmd, capture_output=True, text=True)
        with open(notes_out, "w") as f:
            f.write(notes.stdout if notes.returncode == 0 else "")
    else:
        cmd = tool + ["-chart", CHART, "-name", RELEASE, "-namespace", NAMESPACE, "-kube-version",
                      "v" + KUBE_VERSION, "-notes-out", notes_out]
        for f in value_files:
            cmd += ["-f", f]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"{cmd[0]} exited with {result.returncode}")
    return result.stdout


def kubernetes_validate(paths: list[str]) -> dict[str, list[str]]:
    tool = os.path.join(ROOT, ".tools", "venv", "bin", "kubernetes-validate")
    if not os.access(tool, os.X_OK):
        tool = shutil.which("kubernetes-validate") or sys.exit("helm-check: kubernetes-validate missing")
    result = subprocess.run([tool, "--strict", "-k", KUBE_VERSION, "--no-warn", *paths],
                            capture_output=True, text=True)
    problems: dict[str, list[str]] = {}
    passed = set()
    for line in (result.stdout + result.stderr).splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in paths:
            if parts[0] == "INFO" and parts[2].startswith("passed "):
                passed.add(parts[1])
            elif parts[0] in ("ERROR", "WARN"):
                problems.setdefault(parts[1], []).append(parts[2])
    for p in paths:
        if p not in passed and p not in problems:
            problems[p] = [f"no verdict from kubernetes-validate (exit {result.returncode}): "
                           f"{(result.stdout + result.stderr).strip()[-500:]}"]
    return problems


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}


def check_crd(doc: dict) -> list[str]:
    name = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    with open(os.path.join(ROOT, "tests", "helm", "crd-schemas", name)) as f:
        schema = json.load(f)
    return [f"{dotted(e.absolute_path) or '(root)'}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def check_policy(doc: dict) -> list[str]:
    """What the chart promises about its workloads."""
    problems = []
    if doc["kind"] not in ("Deployment", "StatefulSet"):
        return problems
    pod = doc["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problems.append("pod securityContext.runAsNonRoot is not true")
    if pod.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false: Service env vars (HERALD_*_SERVICE_HOST) "
                        "would be read as unknown configuration keys")
    if pod.get("terminationGracePeriodSeconds", 30) < 30:
        problems.append("terminationGracePeriodSeconds < 30: no room for a graceful drain")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities are not all dropped")
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in c:
                problems.append(f"{where}: no {probe}")
        if not c.get("resources", {}).get("requests"):
            problems.append(f"{where}: no resource requests")
    return problems


def check_configs(docs: list[dict], workdir: str) -> list[str]:
    """The binaries' own --check-config on the rendered ConfigMap's files."""
    problems = []
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    if len(maps) != 1:
        return [f"expected one *-config ConfigMap, found {len(maps)}"]
    env_for = {
        # Set from the pod name by the Deployments (fieldRef metadata.name).
        "herald-worker": {"HERALD_WORKER_ID": f"{RELEASE}-worker-7c9d8b6f5-x2x7q"},
        "herald-coordinator": {"HERALD_IDENTITY": f"{RELEASE}-coordinator-5f4d7c8b9-k8m2p"},
    }
    for binary, key in (("herald-worker", "worker.toml"), ("herald-coordinator", "coordinator.toml")):
        text = maps[0].get("data", {}).get(key)
        if text is None:
            problems.append(f"ConfigMap has no {key}")
            continue
        path = os.path.join(workdir, key)
        with open(path, "w") as f:
            f.write(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.update(env_for[binary])
        result = subprocess.run([BINARIES[binary], "--check-config", "--config", path],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0 or result.stdout.strip() != "config ok":
            problems.append(f"{binary} --check-config rejects the rendered {key}: "
                            f"{(result.stderr or result.stdout).strip()}")
    return problems


def check_secret_hygiene(docs: list[dict], values: dict) -> list[str]:
    problems = []
    urls = [u for chain in values.get("chains", []) for u in chain.get("rpcUrls", []) or []]
    for d in docs:
        if d["kind"] == "ConfigMap":
            text = json.dumps(d)
            for u in urls:
                if u in text:
                    problems.append(f"ConfigMap {d['metadata']['name']} contains the RPC URL {u}")
        if d["kind"] == "Secret":
            for key, value in (d.get("data") or {}).items():
                try:
                    base64.b64decode(value, validate=True)
                except Exception:
                    problems.append(f"Secret {d['metadata']['name']}: data.{key} is not base64")
    return problems


def check_value_set(tool: list[str], label: str, value_files: list[str], workdir: str) -> int:
    values = load_yaml(os.path.join(CHART, "values.yaml"))
    for f in value_files:
        coalesce(values, load_yaml(f))
    for problem in schema_errors(values):
        error(f"[{label}] values.schema.json: {problem}")
    notes = os.path.join(workdir, "NOTES.txt")
    try:
        out = render(tool, value_files, notes)
    except RuntimeError as e:
        error(f"[{label}] render failed: {e}")
        return 0
    if not os.path.exists(notes) or "/v1/subscriptions" not in open(notes).read():
        error(f"[{label}] NOTES.txt did not render or does not show how to register a subscription")
    docs = [d for d in yaml.safe_load_all(out) if d]
    paths, crds = [], []
    kinds = []
    for i, doc in enumerate(docs):
        kinds.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
            crds.append(doc)
            continue
        path = os.path.join(workdir, f"{i:02d}-{doc.get('kind', 'unknown').lower()}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        paths.append(path)
    for path, problems in kubernetes_validate(paths).items():
        for p in problems:
            error(f"[{label}] {os.path.basename(path)}: {p}")
    for doc in crds:
        for p in check_crd(doc):
            error(f"[{label}] {doc['kind']}/{doc['metadata']['name']}: {p}")
    for doc in docs:
        for p in check_policy(doc):
            error(f"[{label}] {doc['kind']}/{doc['metadata']['name']}: {p}")
    for p in check_configs(docs, workdir) + check_secret_hygiene(docs, values):
        error(f"[{label}] {p}")
    info(f"[{label}] {len(docs)} manifests: {', '.join(kinds)}")
    return len(docs)


def check_bad_values(tool: list[str]) -> int:
    cases = sorted(glob.glob(os.path.join(ROOT, "tests", "helm", "bad-values", "*.yaml")))
    for case in cases:
        name = os.path.basename(case)
        with open(case) as f:
            expect = re.search(r"^# expect: (\S+)", f.read(), re.M)
        if not expect:
            error(f"bad-values/{name}: no '# expect: <field>' line")
            continue
        values = coalesce(load_yaml(os.path.join(CHART, "values.yaml")), load_yaml(case))
        found = schema_errors(values)
        by = "values.schema.json"
        if not found:
            # What a JSON schema cannot express (e.g. unique chain ids) the templates reject.
            try:
                render(tool, [case], os.devnull)
            except RuntimeError as e:
                found, by = [str(e).split("error calling fail: ")[-1]], "the chart"
        if not found:
            error(f"bad-values/{name}: accepted by values.schema.json and the templates")
        elif not any(p.startswith(expect.group(1) + ":") or expect.group(1) in p.split(":")[0].split(", ")
                     for p in found):
            error(f"bad-values/{name}: rejected, but no message names {expect.group(1)}: {found}")
        else:
            info(f"bad-values/{name}: rejected by {by}: {[p for p in found if expect.group(1) in p][0]}")
        if os.path.basename(tool[0]) == "helm":  # real Helm validates the schema itself
            try:
                render(tool, [case], os.devnull)
                error(f"bad-values/{name}: helm template accepted it")
            except RuntimeError:
                pass
    return len(cases)


def main() -> int:
    for binary, path in BINARIES.items():
        if not os.access(path, os.X_OK):
            sys.exit(f"helm-check: {path} missing (make build)")
    tool = renderer()
    info(f"renderer: {tool[0]} ({'Helm' if os.path.basename(tool[0]) == 'helm' else 'helm-render emulation'})"
         f", Kubernetes {KUBE_VERSION}")
    sets = [("default", [])] + [
        (os.path.basename(f).removesuffix("-values.yaml"), [f])
        for f in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    ]
    manifests = 0
    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        for label, files in sets:
            workdir = os.path.join(tmp, label)
            os.makedirs(workdir)
            manifests += check_value_set(tool, label, files, workdir)
    bad = check_bad_values(tool)
    info(f"{bad} bad value files rejected" if not any("bad-values" in e for e in errors)
         else "some bad value files were not rejected as expected")
    print(f"helm: {len(sets)} value sets, {manifests} manifests, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
