"""Every YAML shipped in cluster/ and jobs/ is loaded and checked, without a cluster.

- RayCluster / RayJob documents are validated against the KubeRay v1 CRDs' openAPIV3Schema
  (vendored in tests/schemas/kuberay/), read the way a strict API server reads them: objects
  that declare `properties` reject unknown fields unless marked x-kubernetes-preserve-unknown-fields,
  `x-kubernetes-int-or-string` accepts both, `nullable` accepts null, list-type map/set items are
  unique, int32/int64 formats are range-checked. CEL rules (x-kubernetes-validations) are not
  evaluated.
- Core objects (Deployment, Service, PVC, Secret) reuse the PodTemplateSpec, ServiceSpec and
  PersistentVolumeClaimSpec schemas embedded in the same CRD, plus cross-reference checks
  (selectors, ports, Secrets, PVCs, volumes) and a scan for literal secrets.
- jobs/*.yaml load through raydpo.config.load_config; the cluster-launcher file is validated
  against Ray's own ray-schema.json (found without importing ray).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydpo.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay"
KUBERAY = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "launcher" / "aws-gpu.yaml"
LOCAL_README = REPO / "cluster" / "local" / "README.md"
SECRETS_TEMPLATE = KUBERAY / "secrets.example.yaml"
GPU_RECIPE = REPO / "jobs" / "stack_llama_2_gpu.yaml"
SHARED_MOUNT = "/mnt/cluster_storage"
SHARED_PVC = "raydpo-shared"
MLFLOW_URI = "http://mlflow:5000"

# Update both when a YAML file is added: a file the globs miss or skip fails here.
EXPECTED_YAML = {
    "cluster/kuberay/mlflow.yaml",
    "cluster/kuberay/raycluster.yaml",
    "cluster/kuberay/rayjob.yaml",
    "cluster/kuberay/secrets.example.yaml",
    "cluster/launcher/aws-gpu.yaml",
    "jobs/demo_cpu.yaml",
    "jobs/stack_llama_2_gpu.yaml",
}
# jobs/ files that are not raydpo configs (runtime-env files, ...): skipped by load_config, by name.
NOT_RAYDPO_CONFIGS: set[str] = set()

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ALL_YAML = sorted(
    {p for d in ("cluster", "jobs") for ext in ("yaml", "yml") for p in (REPO / d).rglob(f"*.{ext}")}
)
JOB_YAML = [p for p in ALL_YAML if p.relative_to(REPO).parts[0] == "jobs"]
KUBE_YAML = [p for p in ALL_YAML if KUBERAY in p.parents]


def rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


@lru_cache(maxsize=None)
def _load(path: Path) -> tuple:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None)


def load_docs(path: Path) -> list:
    """All documents of a (multi-document) YAML file; empty documents dropped. Deep copies."""
    return copy.deepcopy(list(_load(path)))


def kube_docs() -> list[tuple[str, dict]]:
    return [(rel(p), d) for p in KUBE_YAML for d in load_docs(p)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in kube_docs() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pins() -> dict[str, str]:
    """pyproject.toml's `name==version` pins, extras stripped: {"torch": "2.13.0", ...}."""
    text = (REPO / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]\n", 1)[0]
    return {m[0].lower(): m[1] for m in re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"', deps)}


def parse_pin(req: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", req.strip())
    return (m[1].lower(), m[2]) if m else None


# ---------------------------------------------------------------------------------------------
# KubeRay CRD schema -> JSON Schema

def k8s_to_jsonschema(s: dict) -> dict:
    """One openAPIV3Schema node (structural, as CRDs require) -> a JSON Schema node."""
    s = dict(s)
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {k: k8s_to_jsonschema(v) for k, v in s[key].items()}
    for key in ("additionalProperties", "items", "not"):
        if isinstance(s.get(key), dict):
            s[key] = k8s_to_jsonschema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [k8s_to_jsonschema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s and "type" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    # A strict API server (kubectl apply --validate=strict) rejects fields a structural schema
    # does not declare; without this a misspelled field would silently validate (and be pruned).
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if s.pop("nullable", False):
        s = {"anyOf": [{"type": "null"}, s]}
    return s


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `map` items are unique by their list-map-keys, `set` items unique."""
    if not isinstance(instance, list) or list_type == "atomic":
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set")
            seen.append(item)
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for keys {dict(zip(keys, key))}")
        seen.add(key)


_K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})
_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(v) -> bool:
    return not isinstance(v, int) or -(2**31) <= v < 2**31


@_formats.checks("int64")
def _int64(v) -> bool:
    return not isinstance(v, int) or -(2**63) <= v < 2**63


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = SCHEMAS / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    (crd,) = load_docs(path)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return k8s_to_jsonschema(v1["schema"]["openAPIV3Schema"])


def schema_errors(instance, schema: dict) -> list[str]:
    v = _K8sValidator(schema, format_checker=_formats)
    errs = sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]


def _head_props() -> dict:
    return crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]


def pod_template_schema() -> dict:  # core/v1 PodTemplateSpec, as embedded in the CRD
    return _head_props()["template"]


def service_spec_schema() -> dict:  # core/v1 ServiceSpec (headGroupSpec.headService)
    return _head_props()["headService"]["properties"]["spec"]


def pvc_spec_schema() -> dict:  # core/v1 PersistentVolumeClaimSpec (ephemeral volume template)
    vol = pod_template_schema()["properties"]["spec"]["properties"]["volumes"]["items"]
    return vol["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]


# ---------------------------------------------------------------------------------------------
# Core-object and cross-reference checks (each returns a list of error strings)

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CORE_KINDS = {("v1", "Secret"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment")}
RAY_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_KEY|CREDENTIAL", re.I)


def check_object_meta(doc: dict) -> list[str]:
    errs = []
    if (doc.get("apiVersion"), doc.get("kind")) not in CORE_KINDS | RAY_KINDS:
        errs.append(f"unexpected apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return errs + ["metadata.name missing"]
    name = meta["name"]
    rx, limit = (DNS1035_LABEL, 63) if doc.get("kind") == "Service" else (DNS1123_SUBDOMAIN, 253)
    if not rx.match(name) or len(name) > limit:
        errs.append(f"metadata.name {name!r} is not a valid {doc.get('kind')} name")
    for key in ("labels", "annotations"):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (meta.get(key) or {}).items()):
            errs.append(f"metadata.{key} must map strings to strings")
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errs.append(f"unexpected metadata fields {sorted(unknown)}")
    return errs


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodSpec) for every pod template in a Deployment, RayCluster or RayJob."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind == "Deployment":
        return [("spec.template.spec", spec["template"]["spec"])]
    out = []
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            out.append(("spec.submitterPodTemplate.spec", spec["submitterPodTemplate"]["spec"]))
        prefix, spec = "spec.rayClusterSpec", spec.get("rayClusterSpec", {})
    elif kind == "RayCluster":
        prefix = "spec"
    else:
        return []
    out.append((f"{prefix}.headGroupSpec.template.spec", spec["headGroupSpec"]["template"]["spec"]))
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        out.append((f"{prefix}.workerGroupSpecs[{i}].template.spec", g["template"]["spec"]))
    return out


def ray_pod_specs(doc: dict) -> list[tuple[str, dict]]:
    return [(w, p) for w, p in pod_specs(doc) if "submitterPodTemplate" not in w]


def defined(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in kube_docs() if d.get("kind") == kind}


def template_secrets() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
            for d in load_docs(SECRETS_TEMPLATE) if d.get("kind") == "Secret"}


def check_pod_spec(where: str, pod: dict, pvcs: set[str], secrets: dict[str, set[str]]) -> list[str]:
    errs = []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for v in volumes.values():
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in pvcs:
            errs.append(f"{where}: volume {v['name']} claims undefined PVC {claim!r}")
    names = [c["name"] for c in pod.get("containers", [])]
    if len(set(names)) != len(names):
        errs.append(f"{where}: duplicate container names {names}")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errs.append(f"{where}: container {c['name']} mounts undefined volume {m['name']!r}")
        env_names = [e["name"] for e in c.get("env", [])]
        if len(set(env_names)) != len(env_names):
            errs.append(f"{where}: container {c['name']} repeats env names {env_names}")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                if ref.get("name") not in secrets:
                    errs.append(f"{where}: env {e['name']} uses Secret {ref.get('name')!r}, "
                                f"not defined in {rel(SECRETS_TEMPLATE)}")
                elif ref.get("key") not in secrets[ref["name"]]:
                    errs.append(f"{where}: env {e['name']} uses key {ref.get('key')!r} missing from Secret {ref['name']}")
    return errs


def check_deployment(doc: dict) -> list[str]:
    errs = []
    spec = doc.get("spec", {})
    extra = set(spec) - {"replicas", "selector", "template", "strategy", "revisionHistoryLimit",
                         "minReadySeconds", "progressDeadlineSeconds", "paused"}
    if extra:
        errs.append(f"spec: unknown fields {sorted(extra)}")
    selector = spec.get("selector", {}).get("matchLabels") or {}
    labels = spec.get("template", {}).get("metadata", {}).get("labels") or {}
    if not selector:
        errs.append("spec.selector.matchLabels is empty")
    if any(labels.get(k) != v for k, v in selector.items()):
        errs.append(f"spec.selector.matchLabels {selector} does not match template labels {labels}")
    if spec.get("strategy", {}).get("type", "RollingUpdate") not in ("RollingUpdate", "Recreate"):
        errs.append(f"spec.strategy.type {spec['strategy']['type']!r}")
    errs += [f"spec.template.{e}" for e in schema_errors(spec.get("template"), pod_template_schema())]
    return errs


def container_ports(deployment: dict) -> list[dict]:
    return [p for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]


def selected_deployments(service: dict, deployments: list[dict]) -> list[dict]:
    sel = service["spec"].get("selector") or {}
    return [d for d in deployments
            if sel and all(d["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]


def check_service(doc: dict, deployments: list[dict]) -> list[str]:
    errs = [f"spec.{e}" for e in schema_errors(doc.get("spec"), service_spec_schema())]
    if errs:
        return errs
    targets = selected_deployments(doc, deployments)
    if len(targets) != 1:
        return [f"selector {doc['spec'].get('selector')} matches {len(targets)} Deployments, expected 1"]
    cports = container_ports(targets[0])
    for p in doc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        ok = any(cp.get("name") == target for cp in cports) if isinstance(target, str) else \
            any(cp["containerPort"] == target for cp in cports)
        if not ok:
            errs.append(f"port {p['port']}: targetPort {target!r} is not a container port of "
                        f"Deployment {targets[0]['metadata']['name']}")
    return errs


def check_pvc(doc: dict) -> list[str]:
    spec = doc.get("spec", {})
    errs = [f"spec.{e}" for e in schema_errors(spec, pvc_spec_schema())]
    modes = spec.get("accessModes") or []
    if not modes or not set(modes) <= {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}:
        errs.append(f"spec.accessModes {modes}")
    if "storage" not in spec.get("resources", {}).get("requests", {}):
        errs.append("spec.resources.requests.storage missing")
    return errs


def check_secret(doc: dict) -> list[str]:
    errs = []
    extra = set(doc) - {"apiVersion", "kind", "metadata", "type", "stringData", "data", "immutable"}
    if extra:
        errs.append(f"unknown fields {sorted(extra)}")
    if "data" in doc:
        errs.append("use stringData with visible placeholders, not base64 data")
    values = doc.get("stringData") or {}
    if not values:
        errs.append("no stringData")
    for k, v in values.items():
        if not isinstance(v, str) or "REPLACE_ME" not in v:
            errs.append(f"stringData.{k} is not a REPLACE_ME placeholder")
    return errs


LITERAL_SECRET_PATTERNS = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "password in a URI": re.compile(r"://[^/\s:@\"']+:(?!\$)[^@\s\"']+@"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def literal_secrets(obj, where: str = "") -> list[str]:
    """Secret-looking env vars set to a literal `value` anywhere in a parsed document."""
    errs = []
    if isinstance(obj, dict):
        if isinstance(obj.get("name"), str) and "value" in obj and SECRET_NAME.search(obj["name"]):
            errs.append(f"{where}: {obj['name']} has a literal value; use valueFrom.secretKeyRef")
        for k, v in obj.items():
            errs += literal_secrets(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            errs += literal_secrets(v, f"{where}[{i}]")
    return errs


def literal_secrets_in_text(text: str) -> list[str]:
    return [f"{what}: {m.group(0)[:12]}..." for what, rx in LITERAL_SECRET_PATTERNS.items() for m in rx.finditer(text)]


# ---------------------------------------------------------------------------------------------
# Every file is found and loads

def test_every_yaml_is_found_and_counted():
    found = {rel(p) for p in ALL_YAML}
    assert found == EXPECTED_YAML, f"new: {sorted(found - EXPECTED_YAML)}, missing: {sorted(EXPECTED_YAML - found)}"
    assert len(ALL_YAML) == 7
    assert len(JOB_YAML) == 2 and len(KUBE_YAML) == 4
    assert NOT_RAYDPO_CONFIGS <= {rel(p) for p in JOB_YAML}


@pytest.mark.parametrize("path", ALL_YAML, ids=rel)
def test_every_yaml_loads_as_mappings(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} has no documents"
    assert all(isinstance(d, dict) for d in docs), [type(d).__name__ for d in docs]


@pytest.mark.parametrize("path", [p for p in JOB_YAML if rel(p) not in NOT_RAYDPO_CONFIGS], ids=rel)
def test_job_yaml_is_a_valid_raydpo_config(path):
    cfg = load_config(path)
    assert cfg.run.name and cfg.tracking.experiment_name


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests

def test_manifest_inventory():
    kinds = sorted((rel_, d["kind"], d["metadata"]["name"]) for rel_, d in kube_docs())
    assert kinds == sorted([
        ("cluster/kuberay/mlflow.yaml", "PersistentVolumeClaim", SHARED_PVC),
        ("cluster/kuberay/mlflow.yaml", "PersistentVolumeClaim", "mlflow-postgres-data"),
        ("cluster/kuberay/mlflow.yaml", "Deployment", "mlflow-postgres"),
        ("cluster/kuberay/mlflow.yaml", "Service", "mlflow-postgres"),
        ("cluster/kuberay/mlflow.yaml", "Deployment", "mlflow"),
        ("cluster/kuberay/mlflow.yaml", "Service", "mlflow"),
        ("cluster/kuberay/raycluster.yaml", "RayCluster", "raydpo"),
        ("cluster/kuberay/rayjob.yaml", "RayJob", "raydpo-stack-llama-2"),
        ("cluster/kuberay/secrets.example.yaml", "Secret", "raydpo-hf"),
        ("cluster/kuberay/secrets.example.yaml", "Secret", "mlflow-postgres"),
    ])


@pytest.mark.parametrize("where,doc", kube_docs(), ids=lambda x: x if isinstance(x, str) else
                         f"{x.get('kind')}/{x.get('metadata', {}).get('name')}")
def test_manifest_is_valid(where, doc):
    errs = check_object_meta(doc)
    kind = doc.get("kind")
    if kind in ("RayCluster", "RayJob"):
        errs += schema_errors(doc, crd_schema(kind))
    elif kind == "Deployment":
        errs += check_deployment(doc)
    elif kind == "Service":
        errs += check_service(doc, list(defined("Deployment").values()))
    elif kind == "PersistentVolumeClaim":
        errs += check_pvc(doc)
    elif kind == "Secret":
        if where != rel(SECRETS_TEMPLATE):
            errs.append(f"Secrets belong in {rel(SECRETS_TEMPLATE)} only")
        errs += check_secret(doc)
    secrets, pvcs = template_secrets(), set(defined("PersistentVolumeClaim"))
    for pod_where, pod in pod_specs(doc):
        errs += check_pod_spec(pod_where, pod, pvcs, secrets)
    assert not errs, f"{where} {kind}/{doc['metadata'].get('name')}:\n" + "\n".join(errs)


@pytest.mark.parametrize("path", ALL_YAML + [LOCAL_README], ids=rel)
def test_no_literal_secrets(path):
    errs = [] if path == SECRETS_TEMPLATE else literal_secrets_in_text(path.read_text())
    if path.suffix in (".yaml", ".yml") and path != SECRETS_TEMPLATE:
        for d in load_docs(path):
            errs += literal_secrets(d)
            env = yaml.safe_load(d.get("spec", {}).get("runtimeEnvYAML", "") or "{}") if d.get("kind") == "RayJob" else {}
            errs += [f"runtimeEnvYAML env_vars.{k} looks secret" for k in (env.get("env_vars") or {}) if SECRET_NAME.search(k)]
    assert not errs, "\n".join(errs)


def test_secret_refs_are_all_defined_and_used():
    refs = set()
    for _, d in kube_docs():
        for _, pod in pod_specs(d):
            for c in pod["containers"]:
                refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                         for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    declared = {(n, k) for n, keys in template_secrets().items() for k in keys}
    assert refs == declared == {("raydpo-hf", "HF_TOKEN"), ("mlflow-postgres", "POSTGRES_PASSWORD")}


# ---------------------------------------------------------------------------------------------
# Ray on Kubernetes: what raydpo needs from the cluster

def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [("RayCluster", one("RayCluster")["spec"]), ("RayJob", one("RayJob")["spec"]["rayClusterSpec"])]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def cpu(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_rayjob_embeds_the_raycluster_spec():
    assert one("RayJob")["spec"]["rayClusterSpec"] == one("RayCluster")["spec"]


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_ray_cluster_shape(which):
    spec = dict(ray_cluster_specs())[which]
    ray_pin = pins()["ray"]
    assert spec["rayVersion"] == ray_pin and spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["dashboard-host"] == "0.0.0.0"
    assert spec["workerGroupSpecs"], "no worker group"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    doc = one(which)
    for where, pod in ray_pod_specs(doc):
        for c in pod["containers"]:
            assert c["image"].startswith(f"rayproject/ray:{ray_pin}-"), (where, c["image"])
            env = env_of(c)
            assert env.get("MLFLOW_TRACKING_URI") == MLFLOW_URI, where
            assert "secretKeyRef" in (env.get("HF_TOKEN") or {}), where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            vol = {v["name"]: v for v in pod["volumes"]}[mounts[SHARED_MOUNT]]
            assert vol["persistentVolumeClaim"]["claimName"] == SHARED_PVC, where


def test_shared_pvc_is_read_write_many_and_the_recipe_writes_to_it():
    assert defined("PersistentVolumeClaim")[SHARED_PVC]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert load_config(GPU_RECIPE).run.storage_path.startswith(SHARED_MOUNT + "/")


def test_gpu_worker_groups_fit_the_gpu_recipe():
    """Each KubeRay cluster starts with a num-cpus 0 head and zero workers; what the autoscaler can
    add (every group at maxReplicas) holds the recipe's training workers + Ray Data, its SFT merge
    and its reference replicas, each bundle on one node, as the stage's wait counts them
    (`raydpo.orchestration.resources`)."""
    from raydpo.orchestration.resources import fits, merge_needs, reference_needs, training_needs

    cfg = load_config(GPU_RECIPE)
    s = cfg.scaling
    for which, spec in ray_cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", which
        nodes = [{"CPU": 0.0}]  # the head runs the driver only
        for g in spec["workerGroupSpecs"]:
            assert g["replicas"] == 0 and g["minReplicas"] == 0, f"{which}: starts with worker nodes"
            (c,) = g["template"]["spec"]["containers"]
            pod_gpu, pod_cpu = float(c["resources"]["limits"]["nvidia.com/gpu"]), cpu(c["resources"]["limits"]["cpu"])
            assert s.gpus_per_worker <= pod_gpu and s.cpus_per_worker <= pod_cpu, f"{which}: a train worker fits no pod"
            nodes += [{"CPU": pod_cpu, "GPU": pod_gpu}] * g["maxReplicas"]
        for need in (training_needs(cfg), merge_needs(cfg), reference_needs(cfg)):
            assert fits(nodes, need), (which, [str(n) for n in need])


def test_raydpo_validate_passes_on_the_recipe_the_cluster_configs_run_as_a_ray_job(monkeypatch, capsys):
    """`raydpo validate` on the config every shipped cluster config runs, inside a Ray job's
    environment (where a relative run.storage_path would be refused): it passes; the same config
    with a relative storage path gets the one-line refusal and exit 2."""
    from raydpo import cli
    from raydpo.orchestration.nodes import RAY_JOB_ENV

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    assert cli.main(["validate", "--config", str(GPU_RECIPE)]) == 0
    assert cli.main(["validate", "--config", str(GPU_RECIPE), "--set", "run.storage_path=raydpo_runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.storage_path 'raydpo_runs' is relative" in err[0], err


def test_rayjob_runs_the_gpu_recipe_with_the_pinned_runtime_env():
    spec = one("RayJob")["spec"]
    assert spec["entrypoint"] == "raydpo pipeline --config jobs/stack_llama_2_gpu.yaml"
    load_config(REPO / spec["entrypoint"].split("--config ", 1)[1])
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "pip", "env_vars", "py_modules", "config", "uv", "excludes"}
    assert env["working_dir"].startswith(SHARED_MOUNT + "/")
    packages = env["pip"]["packages"]
    pinned = dict(p for p in map(parse_pin, packages) if p)
    assert pinned == pins(), "runtimeEnvYAML pip pins differ from pyproject.toml"
    assert packages[0].startswith("torch==")
    # the submitter zips working_dir, so it must see the shared PVC too
    sub = spec["submitterPodTemplate"]["spec"]
    assert any(m["mountPath"] == SHARED_MOUNT for m in sub["containers"][0]["volumeMounts"])


def test_mlflow_server_uses_postgres_and_shared_artifacts():
    dep = defined("Deployment")["mlflow"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"ghcr.io/mlflow/mlflow:v{pins()['mlflow']}"
    cmd = " ".join(c.get("command", []) + c.get("args", []))
    for flag in ("mlflow server", "--serve-artifacts", f"--artifacts-destination {SHARED_MOUNT}/mlartifacts",
                 "--host 0.0.0.0", "--port 5000", "postgresql://mlflow:${POSTGRES_PASSWORD}@mlflow-postgres:5432/mlflow"):
        assert flag in cmd, flag
    allowed = re.search(r'--allowed-hosts "([^"]+)"', cmd)[1].split(",")
    assert "mlflow:5000" in allowed  # MLflow >= 3.5 rejects other Host headers
    svc = defined("Service")
    assert [p["port"] for p in svc["mlflow"]["spec"]["ports"]] == [5000]
    assert [p["port"] for p in svc["mlflow-postgres"]["spec"]["ports"]] == [5432]


# ---------------------------------------------------------------------------------------------
# Cluster launcher and the local recipe

def ray_launcher_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locates the package without importing Ray
    assert spec is not None and spec.submodule_search_locations
    return json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_yaml_matches_rays_schema():
    (cfg,) = load_docs(LAUNCHER)
    jsonschema.validate(cfg, ray_launcher_schema())


def test_launcher_yaml_shape():
    (cfg,) = load_docs(LAUNCHER)
    p = pins()
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"} <= set(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker type"
    for t in workers.values():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"]
    recipe = load_config(GPU_RECIPE)
    nodes = [dict(types[cfg["head_node_type"]]["resources"])]  # CPU 0: the driver only
    for t in workers.values():
        assert t.get("min_workers", 0) == 0  # a cold start: the stage asks the autoscaler for its nodes
        nodes += [dict(t["resources"])] * t["max_workers"]
    from raydpo.orchestration.resources import fits, merge_needs, training_needs

    assert fits(nodes, training_needs(recipe)) and fits(nodes, merge_needs(recipe))
    setup = cfg["setup_commands"]
    assert f"torch=={p['torch']}" in setup[0]
    assert any("pip install" in c and "-e ~/raydpo" in c for c in setup[1:])
    assert cfg["file_mounts"]["~/raydpo"] == "."
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{p['ray']}-")
    head, worker = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "MLFLOW_TRACKING_URI=" in head and "MLFLOW_TRACKING_URI=" in worker
    assert any(SHARED_MOUNT in o for o in cfg["docker"]["run_options"])


def test_local_recipe():
    text = LOCAL_README.read_text()
    for line in ("ray start --head --num-cpus 2 --dashboard-host 127.0.0.1",
                 "export RAY_ADDRESS=http://127.0.0.1:8265",
                 "export RAY_AUTH_MODE=token",
                 "ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\\n"
                 "    raydpo pipeline --config jobs/demo_cpu.yaml"):
        assert line in text, line
    from raydpo.orchestration.resources import fits, training_needs

    assert fits([{"CPU": 2.0}], training_needs(load_config(REPO / "jobs" / "demo_cpu.yaml")))  # fits `--num-cpus 2`


# ---------------------------------------------------------------------------------------------
# The validators can fail

def _parent(doc, path: str):
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, (int(last) if isinstance(doc, list) else last)


def _set(path: str, value):
    def mutate(doc):
        parent, key = _parent(doc, path)
        parent[key] = value
    return mutate


def _rename(path: str, new: str):
    def mutate(doc):
        parent, key = _parent(doc, path)
        parent[new] = parent.pop(key)
    return mutate


WORKER = "spec.workerGroupSpecs.0"
WORKER_CONTAINER = f"{WORKER}.template.spec.containers.0"
BROKEN_RAYCLUSTERS = {
    "misspelled workerGroupSpecs": (_rename("spec.workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec"),
    "misspelled container field": (_rename(f"{WORKER_CONTAINER}.resources", "resource"), "resource"),
    "rayStartParams value not a string": (_set("spec.headGroupSpec.rayStartParams.num-cpus", 0), "num-cpus"),
    "maxReplicas as a string": (_set(f"{WORKER}.maxReplicas", "4"), "maxReplicas"),
    "maxReplicas over int32": (_set(f"{WORKER}.maxReplicas", 2**31), "maxReplicas"),
    "bad memory quantity": (_set(f"{WORKER_CONTAINER}.resources.limits.memory", "44GB"), "memory"),
    "headGroupSpec without template": (lambda d: d["spec"]["headGroupSpec"].pop("template"), "template"),
    "worker group without groupName": (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    "bad authOptions mode": (_set("spec.authOptions.mode", "tokens"), "mode"),
    "duplicate container port": (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
                                 .append({"containerPort": 8265, "name": "dash2"}), "ports"),
}


@pytest.mark.parametrize("name", BROKEN_RAYCLUSTERS)
def test_broken_raycluster_fails_validation(name):
    mutate, where = BROKEN_RAYCLUSTERS[name]
    doc = one("RayCluster")
    assert schema_errors(doc, crd_schema("RayCluster")) == []
    mutate(doc)
    errs = schema_errors(doc, crd_schema("RayCluster"))
    assert errs and any(where in e for e in errs), errs


def test_broken_rayjob_fails_validation():
    doc = one("RayJob")
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParm"] = {}
    errs = schema_errors(doc, crd_schema("RayJob"))
    assert any("shutdownAfterJobFinishes" in e for e in errs) and any("rayStartParm" in e for e in errs), errs


def test_broken_core_objects_fail():
    dep = defined("Deployment")["mlflow"]
    dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "other"
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    errs = check_deployment(dep)
    assert any("does not match template labels" in e for e in errs) and any("imagePullPolcy" in e for e in errs), errs

    svc = defined("Service")["mlflow"]
    svc["spec"]["ports"][0]["targetPort"] = "htp"
    assert any("targetPort 'htp'" in e for e in check_service(svc, list(defined("Deployment").values())))

    pod = copy.deepcopy(pod_specs(one("RayCluster"))[0][1])
    pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "hf-token"
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = "nope"
    errs = check_pod_spec("head", pod, set(defined("PersistentVolumeClaim")), template_secrets())
    assert any("'hf-token'" in e for e in errs) and any("'nope'" in e for e in errs), errs

    assert check_secret({**defined("Secret")["raydpo-hf"], "stringData": {"HF_TOKEN": "abc"}})
    assert literal_secrets({"env": [{"name": "HF_TOKEN", "value": "abc"}]})
    assert literal_secrets_in_text("uri: postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not literal_secrets_in_text('uri: "postgresql://mlflow:${POSTGRES_PASSWORD}@db:5432/mlflow"')
    assert literal_secrets_in_text("HF_TOKEN=hf_" + "a1B2" * 8)


def test_broken_launcher_fails_rays_schema():
    (cfg,) = load_docs(LAUNCHER)
    cfg["available_node_types"]["gpu_worker"]["max_worker"] = cfg["available_node_types"]["gpu_worker"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_launcher_schema())


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_every_ray_pod_and_the_job_stop_leave_a_step_and_a_save_before_sigkill(which):
    """Kubernetes gives a pod 30 s and `ray job stop` the driver 3 s by default before SIGKILL:
    less than a 7B step plus a checkpoint, so up to save_every steps were lost on every stop."""
    from raydpo.orchestration.estimate import STOP_GRACE_S

    for where, pod in ray_pod_specs(one(which)):
        assert pod.get("terminationGracePeriodSeconds", 30) >= STOP_GRACE_S, where
    if which == "RayJob":
        env = yaml.safe_load(one("RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]
        assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= STOP_GRACE_S


def test_the_launcher_heads_job_stop_waits_for_a_checkpoint():
    from raydpo.orchestration.estimate import STOP_GRACE_S

    cfg = yaml.safe_load((REPO / "cluster/launcher/aws-gpu.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert int(re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+)", head).group(1)) >= STOP_GRACE_S


def test_raydpo_submit_gives_a_stopped_job_time_to_checkpoint():
    from raydpo.orchestration.estimate import STOP_GRACE_S, stop_grace_s
    from raydpo.orchestration.submit import build_runtime_env

    assert build_runtime_env(".", env={})["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_S)
    # a longer wait the user set in the submitting shell is kept
    assert build_runtime_env(".", env={"RAY_JOB_STOP_WAIT_TIME_S": "900"})["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "900"
    # sized from a step: 12 s at the full rate is 60 s at a fifth of it, + 60 s to save
    assert stop_grace_s(12.0) == 120 and stop_grace_s(None) == STOP_GRACE_S and stop_grace_s(0.0) == 60
