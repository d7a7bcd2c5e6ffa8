"""Offline validation of the Kubernetes manifests in k8s/ (base, overlays/cpu, overlays/gpu, secrets).

What is checked, for every document kustomize renders:

- built-in kinds against the Kubernetes OpenAPI schemas with `kubernetes-validate` in strict mode
  (unknown fields are errors);
- RayJob / RayCluster against the KubeRay CRD schemas in $RATRAY_KUBERAY_CRDS (default
  ../shared/kuberay-crds), made structural-strict: the API server prunes unknown fields, so a
  typo would be silently dropped in a real cluster; here it is an error (skipped, with the
  reason, where the CRDs are absent);
- KubeRay's own admission rules (ray-operator/controllers/ray/utils/validation.go): RayJob name
  <= 47 characters and DNS-1035, TTL only with shutdownAfterJobFinishes, rayStartParams values
  strings, ...; and the project's rules: requests == limits for every container, non-root pods
  with no privilege escalation and read-only root filesystems, image tags consistent with the
  pinned Ray / Python / MLflow versions, entrypoints naming job files and configs that exist in
  the image and loading with the job's own argument parser and config loader, shard slots and
  CPUs/GPUs enough for the job's config, the MLflow URI reachable and allowed, NetworkPolicies
  that let only Ray pods reach MLflow and nothing outside the namespace reach the Ray dashboard.

Rendering: a faithful renderer of the kustomize subset the manifests use (resources, namespace,
labels, JSON 6902 patches with targets, secretGenerator without hash suffixes); anything else in a
kustomization.yaml is an error. Where `kubectl` is installed, its `kubectl kustomize` output is
compared with ours. No cluster, no network, no Ray.
"""
from __future__ import annotations

import base64
import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
RENDERINGS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
KUBE_VERSION = "1.33.0"  # the Kubernetes API the manifests target (kubernetes-validate ships 1.33)
APP_ROOT = "/home/ray/ratray"  # where the images put the repository (docker/Dockerfile.*)
SHARED_CLAIM, SHARED_PATH = "ratray-shared", "/shared"
INDEX_RESOURCE = "index_node"
MAX_RAYJOB_NAME, MAX_RAYCLUSTER_NAME = 47, 53  # KubeRay utils/constant.go
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RAY_IMAGE = re.compile(r"ghcr\.io/ratray/ratray:(?P<version>\d+\.\d+\.\d+)-ray(?P<ray>\d+\.\d+\.\d+)"
                       r"-py(?P<py>\d{3})-(?P<flavor>cpu|gpu)")
MLFLOW_IMAGE = re.compile(r"ghcr\.io/ratray/mlflow:(?P<mlflow>\d+\.\d+\.\d+)")
PARTS = {"namespace", "platform", "retro", "realm", "interactive", "secrets"}
JOB_CONFIGS = {"retro_pretrain.py": "RetroJobConfig", "realm_pretrain.py": "RealmJobConfig"}


# ---------------------------------------------------------------------------------------------
# pins


@functools.lru_cache(maxsize=None)
def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[name.strip().lower()] = ver.strip()
    return out


@functools.lru_cache(maxsize=None)
def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------------------------------------
# a kustomize subset


class KustomizeError(ValueError):
    pass


SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches",
                  "secretGenerator", "generatorOptions"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                  "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts: list[str], path: str):
    node = doc
    for p in parts:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise KustomizeError(f"{path}: no index {p!r}")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                raise KustomizeError(f"{path}: no key {p!r}")
            node = node[p]
        else:
            raise KustomizeError(f"{path}: {p!r} is inside a scalar")
    return node


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / remove / replace / test (what the overlays use); a failed test raises."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or path is None:
            raise KustomizeError(f"unsupported JSON patch operation {op!r}")
        parts = _pointer(path)
        if kind == "test":
            got = _walk(doc, parts, path)
            if got != op.get("value"):
                raise KustomizeError(f"test {path}: expected {op.get('value')!r}, found {got!r}")
            continue
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            if not last.isdigit():
                raise KustomizeError(f"{path}: list index {last!r}")
            i = int(last)
            if kind == "add":
                if i > len(parent):
                    raise KustomizeError(f"{path}: index {i} out of range")
                parent.insert(i, copy.deepcopy(op["value"]))
            elif i >= len(parent):
                raise KustomizeError(f"{path}: index {i} out of range")
            elif kind == "remove":
                del parent[i]
            else:
                parent[i] = copy.deepcopy(op["value"])
        elif isinstance(parent, dict):
            if kind in ("remove", "replace") and last not in parent:
                raise KustomizeError(f"{path}: no key {last!r} to {kind}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"{path}: parent is a scalar")
    return doc


def _group_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)


def _matches(doc: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"unsupported patch target keys {sorted(unknown)}")
    group, version = _group_version(doc["apiVersion"])
    meta = doc.get("metadata", {})
    return all([target.get("group", group) == group, target.get("version", version) == version,
                target.get("kind", doc["kind"]) == doc["kind"],
                target.get("name", meta.get("name")) == meta.get("name"),
                target.get("namespace", meta.get("namespace")) == meta.get("namespace")])


def _load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}:{n}: not KEY=VALUE")
        k, v = line.split("=", 1)
        out[k] = v
    return out


def render(directory: Path) -> list[dict]:
    """The documents `kustomize build directory` produces, for the subset ratray uses."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: keys this renderer does not implement: {sorted(unknown)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        docs.extend(render(p) if p.is_dir() else _load_yaml_docs(p))
    opts = k.get("generatorOptions", {})
    if set(opts) - {"disableNameSuffixHash", "labels"}:
        raise KustomizeError(f"{kfile}: unsupported generatorOptions {sorted(opts)}")
    for gen in k.get("secretGenerator", []):
        if not opts.get("disableNameSuffixHash"):
            raise KustomizeError(f"{kfile}: name hash suffixes are not implemented")
        if set(gen) - {"name", "envs", "literals", "type"}:
            raise KustomizeError(f"{kfile}: unsupported secretGenerator keys {sorted(gen)}")
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            data.update(_env_file(directory / env))
        for lit in gen.get("literals", []):
            key, value = lit.split("=", 1)
            data[key] = value
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]},
                  "type": gen.get("type", "Opaque"),
                  "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()}}
        if opts.get("labels"):
            secret["metadata"]["labels"] = dict(opts["labels"])
        docs.append(secret)
    for patch in k.get("patches", []):
        if set(patch) - {"path", "patch", "target"}:
            raise KustomizeError(f"{kfile}: unsupported patch keys {sorted(patch)}")
        ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: only JSON 6902 patches (a list of operations) are "
                                 "implemented; strategic merge patches are not")
        target = patch.get("target")
        if not target:
            raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a target")
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise KustomizeError(f"{kfile}: patch {patch.get('path')} matches no resource ({target})")
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{kfile}: only labels[].pairs (metadata labels) are implemented")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    seen = set()
    for d in docs:
        key = doc_key(d)
        if key in seen:
            raise KustomizeError(f"{directory}: duplicate resource {key}")
        seen.add(key)
    return docs


def doc_key(d: dict) -> str:
    m = d.get("metadata", {})
    return f"{d['kind']}/{m.get('namespace', '-')}/{m.get('name')}"


def doc_id(d: dict) -> str:
    return f"{d['kind']}/{d['metadata']['name']}"


@functools.lru_cache(maxsize=None)
def _rendered(name: str) -> tuple:
    return tuple(render(RENDERINGS[name]))


def rendered(name: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(name)))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """k8s/secrets with its env files generated by generate.sh (in a temporary copy)."""
    d = tmp_path_factory.mktemp("secrets") / "secrets"
    shutil.copytree(K8S / "secrets", d, ignore=shutil.ignore_patterns("*.env"))
    subprocess.run(["bash", str(d / "generate.sh")], check=True, capture_output=True, timeout=30)
    return d


# ---------------------------------------------------------------------------------------------
# the renderer itself


def test_renderer_applies_json6902_like_the_rfc():
    doc = {"a": {"b": [1, 2, 3]}, "c": "x"}
    out = apply_json6902(doc, [{"op": "test", "path": "/c", "value": "x"},
                               {"op": "replace", "path": "/a/b/1", "value": 20},
                               {"op": "add", "path": "/a/b/-", "value": 4},
                               {"op": "add", "path": "/a/d~1e", "value": {"f": 1}},
                               {"op": "remove", "path": "/c"}])
    assert out == {"a": {"b": [1, 20, 3, 4], "d/e": {"f": 1}}}
    assert doc == {"a": {"b": [1, 2, 3]}, "c": "x"}  # untouched
    with pytest.raises(KustomizeError, match="expected 'y'"):
        apply_json6902(doc, [{"op": "test", "path": "/c", "value": "y"}])
    with pytest.raises(KustomizeError, match="no key"):
        apply_json6902(doc, [{"op": "replace", "path": "/zzz", "value": 1}])
    with pytest.raises(KustomizeError, match="out of range"):
        apply_json6902(doc, [{"op": "replace", "path": "/a/b/9", "value": 1}])


def test_an_overlay_patch_whose_group_test_fails_does_not_build(tmp_path):
    """The overlays guard index-based paths with `test` ops on the group names: reordering the
    base's worker groups must break the build, not patch the wrong group."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    job = tmp_path / "k8s" / "base" / "ray" / "rayjob-retro.yaml"
    d = yaml.safe_load(job.read_text())
    d["spec"]["rayClusterSpec"]["workerGroupSpecs"].reverse()
    job.write_text(yaml.safe_dump(d))
    render(tmp_path / "k8s" / "base")  # the base itself is still fine
    for overlay in ("cpu", "gpu"):
        with pytest.raises(KustomizeError, match="groupName"):
            render(tmp_path / "k8s" / "overlays" / overlay)


def _decoded(d: dict) -> dict:
    """Secret data compared by value (kubectl wraps long base64 lines)."""
    if d["kind"] == "Secret":
        d = {**d, "data": {k: base64.b64decode(v) for k, v in d["data"].items()}}
    return d


@pytest.mark.parametrize("name", sorted(RENDERINGS) + ["secrets"])
def test_renderer_matches_kubectl_kustomize(name, secrets_dir):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: only the built-in kustomize renderer is checked")
    directory = secrets_dir if name == "secrets" else RENDERINGS[name]
    p = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    theirs = {doc_key(d): _decoded(d) for d in yaml.safe_load_all(p.stdout) if d}
    ours = {doc_key(d): _decoded(d) for d in render(directory)}
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert ours[key] == theirs[key], key


def test_every_kustomization_builds_and_labels_its_parts(secrets_dir):
    for name in RENDERINGS:
        docs = rendered(name)
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service",
                "NetworkPolicy", "RayJob", "RayCluster"} <= kinds, (name, kinds)
        for d in docs:
            labels = d["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "ratray", (name, doc_id(d))
            assert labels.get("ratray.io/part") in PARTS, (name, doc_id(d))
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == "ratray", (name, doc_id(d))
        assert {one(docs, "RayJob", n)["metadata"]["labels"]["ratray.io/part"]
                for n in ("ratray-retro", "ratray-realm")} == {"retro", "realm"}
    secrets = render(secrets_dir)
    assert {d["metadata"]["name"] for d in secrets} == {"ratray-postgres", "ratray-ray-auth"}
    assert all(d["metadata"]["labels"]["ratray.io/part"] == "secrets" for d in secrets)


# ---------------------------------------------------------------------------------------------
# built-in kinds: kubernetes-validate, strict


def validate_builtin(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _all_docs() -> list[tuple[str, dict]]:
    return [(name, d) for name in RENDERINGS for d in _rendered(name)]


BUILTIN = [(n, d) for n, d in _all_docs() if d["apiVersion"] != "ray.io/v1"]
RAY_DOCS = [(n, d) for n, d in _all_docs() if d["apiVersion"] == "ray.io/v1"]


@pytest.mark.parametrize("name,doc", BUILTIN, ids=[f"{n}:{doc_id(d)}" for n, d in BUILTIN])
def test_builtin_kinds_validate_strictly(name, doc):
    validate_builtin(doc)


def test_generated_secrets_validate_strictly(secrets_dir):
    for d in render(secrets_dir):
        validate_builtin(d)


def test_strict_validation_rejects_a_typo_in_a_builtin_kind():
    dep = one(rendered("base"), "Deployment", "ratray-mlflow")
    validate_builtin(dep)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["imagePullPolicyy"] = c.pop("imagePullPolicy")
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_builtin(dep)
    pvc = one(rendered("base"), "PersistentVolumeClaim", SHARED_CLAIM)
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(Exception, match="accesModes"):
        validate_builtin(pvc)


# ---------------------------------------------------------------------------------------------
# RayJob / RayCluster: the KubeRay CRD schemas, structural-strict


def crd_dir() -> Path:
    return Path(os.environ.get("RATRAY_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds").resolve()


def strict_schema(node):
    """A CRD's openAPIV3Schema as the API server applies it: objects that list `properties` are
    closed (unknown fields would be pruned, i.e. silently lost: here they are errors) unless they
    carry x-kubernetes-preserve-unknown-fields, and fields with a default are not required."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: strict_schema(s) for name, s in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(s) for s in value]
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if "required" in out and "properties" in out:
        req = [r for r in out["required"] if "default" not in out["properties"].get(r, {})]
        if req:
            out["required"] = req
        else:
            del out["required"]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    d = crd_dir()
    files = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    path = d / files[kind]
    if not path.is_file():
        return None
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    v = crd_validator(doc["kind"])
    if v is None:
        pytest.skip(f"KubeRay CRDs not found in {crd_dir()} (set RATRAY_KUBERAY_CRDS to the folder "
                    "holding ray.io_rayjobs.yaml and ray.io_rayclusters.yaml)")
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[f"{n}:{doc_id(d)}" for n, d in RAY_DOCS])
def test_ray_resources_validate_against_the_kuberay_crds(name, doc):
    assert crd_errors(doc) == []


def test_crd_validation_rejects_typos_and_non_string_ray_start_params():
    job = one(rendered("base"), "RayJob", "ratray-retro")
    assert crd_errors(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(typo))
    as_int = copy.deepcopy(job)
    as_int["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("num-cpus" in e and "string" in e for e in crd_errors(as_int))
    deep = copy.deepcopy(job)  # a typo inside the pod template, five levels down
    head = deep["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMount"] = head.pop("volumeMounts")
    assert any("volumeMount" in e for e in crd_errors(deep))
    cluster = one(rendered("base"), "RayCluster", "ratray-interactive")
    cluster["spec"]["enableInTreeAutoscalling"] = cluster["spec"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoscalling" in e for e in crd_errors(cluster))


def test_strict_schema_keeps_preserve_unknown_fields_open_and_defaults_optional():
    schema = strict_schema({"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "string"}, "b": {"type": "integer", "default": 0},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"x": {"type": "string"}}}}})
    v = jsonschema.Draft4Validator(schema)
    assert list(v.iter_errors({"a": "x", "free": {"x": "1", "anything": 2}})) == []
    assert [e.message for e in v.iter_errors({"a": "x", "typo": 1})]
    assert [e.message for e in v.iter_errors({"b": 1})]  # a has no default: still required


# ---------------------------------------------------------------------------------------------
# KubeRay's admission rules (validation.go) and the project's own rules


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    spec = ray_cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def parse_ray_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources: KubeRay passes it verbatim to `ray start --resources=<value>`
    through a shell, so it is a JSON object inside literal double quotes: '"{\\"a\\": 1}"'."""
    v = value.strip()
    if not (len(v) >= 2 and v[0] == v[-1] == '"'):
        raise ValueError(f"resources {value!r} must be a JSON object inside literal double quotes")
    parsed = json.loads(v[1:-1].replace('\\"', '"'))
    if not isinstance(parsed, dict) or not all(isinstance(x, (int, float)) for x in parsed.values()):
        raise ValueError(f"resources {value!r} must map names to numbers")
    return parsed


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def kuberay_problems(doc: dict) -> list[str]:
    """The parts of KubeRay's ValidateRayJobMetadata/Spec and ValidateRayClusterSpec that apply."""
    errs: list[str] = []
    name, spec = doc["metadata"]["name"], doc["spec"]
    limit = MAX_RAYJOB_NAME if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    if len(name) > limit:
        errs.append(f"{doc['kind']} name should be no more than {limit} characters")
    if not DNS1035.fullmatch(name) or len(name) > 63:
        errs.append(f"{doc['kind']} name should be a valid DNS1035 label")
    if doc["kind"] == "RayJob":
        shutdown = spec.get("shutdownAfterJobFinishes", False)
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if spec.get("suspend") and not shutdown:
            errs.append("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if ttl < 0:
            errs.append("TTLSecondsAfterFinished must be a non-negative integer")
        if not shutdown and ttl > 0:
            errs.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
        if "deletionStrategy" in spec:
            errs.append("deletionStrategy needs the RayJobDeletionPolicy feature gate")
        if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
            errs.append("one of RayClusterSpec or ClusterSelector must be set")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode != "InteractiveMode" and not spec.get("entrypoint", "").strip():
            errs.append("entrypoint must be set")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
            if not isinstance(env, dict):
                errs.append("runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as e:
            errs.append(f"runtimeEnvYAML is not valid YAML: {e}")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            errs.append("activeDeadlineSeconds must be a positive integer")
        if spec.get("backoffLimit", 0) < 0:
            errs.append("backoffLimit must be a positive integer")
        sub = spec.get("submitterPodTemplate")
        if sub is not None:
            if not sub.get("spec", {}).get("containers"):
                errs.append("submitterPodTemplate needs a container")
            if sub.get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
                errs.append("a submitter Job's pods need restartPolicy Never or OnFailure")
        if (spec.get("rayClusterSpec") or {}).get("authOptions", {}).get("enableK8sTokenAuth"):
            errs.append("K8s token auth mode is currently not supported for RayJob")
    cs = ray_cluster_spec(doc)
    autoscaling = bool(cs.get("enableInTreeAutoscaling"))
    if not cs["headGroupSpec"]["template"]["spec"].get("containers"):
        errs.append("headGroupSpec should have at least one container")
    names = [g for g, _ in groups(doc)[1:]]
    if len(names) != len(set(names)):
        errs.append(f"worker group names must be unique: {names}")
    for gname, g in groups(doc):
        params = g.get("rayStartParams", {}) or {}
        for key, value in params.items():
            if not isinstance(value, str):
                errs.append(f"{gname}: rayStartParams[{key!r}] must be a string, got {value!r}")
        if "labels" in params:
            errs.append(f"{gname}: rayStartParams['labels'] is not supported")
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errs.append(f"{gname}: resources set in both rayStartParams and Resources")
        if isinstance(params.get("resources"), str):
            try:
                res = parse_ray_resources(params["resources"])
                bad = sorted(set(res) & {"CPU", "GPU", "memory"})
                if bad:
                    errs.append(f"{gname}: rayStartParams.resources may not set {bad}")
            except (ValueError, json.JSONDecodeError) as e:
                errs.append(f"{gname}: {e}")
        if gname == "head":
            continue
        if not g["template"]["spec"].get("containers"):
            errs.append(f"worker group {gname} should have at least one container")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errs.append(f"worker group {gname} must set both minReplicas and maxReplicas")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errs.append(f"worker group {gname} has negative replicas bounds")
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"worker group {gname} has minReplicas {lo} greater than maxReplicas {hi}")
        rp = g["template"]["spec"].get("restartPolicy")
        if autoscaling and rp not in (None, "Never"):
            errs.append(f"restartPolicy for worker group {gname} should be Never or unset (autoscaler v2)")
    if cs.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) < 0:
        errs.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if cs.get("authOptions", {}).get("mode", "disabled") == "token":
        if not cs.get("rayVersion"):
            errs.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif _version_tuple(cs["rayVersion"]) < (2, 52, 0):
            errs.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    for gated in ("networkPolicy", "tlsOptions", "historyServerOptions"):
        if gated in cs:
            errs.append(f"spec.{gated} requires a KubeRay feature gate")
    return errs


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[f"{n}:{doc_id(d)}" for n, d in RAY_DOCS])
def test_ray_resources_pass_kuberays_admission_rules(name, doc):
    assert kuberay_problems(doc) == []


def test_admission_rules_reject_what_kuberay_rejects():
    job = one(rendered("base"), "RayJob", "ratray-retro")
    assert kuberay_problems(job) == []

    def mutated(fn) -> list[str]:
        d = copy.deepcopy(job)
        fn(d)
        return kuberay_problems(d)

    assert any("47 characters" in e for e in mutated(lambda d: d["metadata"].update(name="r" * 48)))
    assert any("DNS1035" in e for e in mutated(lambda d: d["metadata"].update(name="Ratray_Retro")))
    assert any("cannot have TTLSecondsAfterFinished" in e
               for e in mutated(lambda d: d["spec"].update(shutdownAfterJobFinishes=False)))
    assert any("must be a string" in e for e in mutated(lambda d: d["spec"]["rayClusterSpec"][
        "workerGroupSpecs"][1]["rayStartParams"].update({"num-cpus": 0})))
    assert any("literal double quotes" in e for e in mutated(lambda d: d["spec"]["rayClusterSpec"][
        "workerGroupSpecs"][1]["rayStartParams"].update(resources='{"index_node": 2}')))
    assert any("may not set ['CPU']" in e for e in mutated(lambda d: d["spec"]["rayClusterSpec"][
        "workerGroupSpecs"][1]["rayStartParams"].update(resources='"{\\"CPU\\": 2}"')))
    assert any("restartPolicy Never" in e for e in mutated(
        lambda d: d["spec"]["submitterPodTemplate"]["spec"].pop("restartPolicy")))
    assert any("activeDeadlineSeconds" in e for e in mutated(lambda d: d["spec"].update(activeDeadlineSeconds=0)))
    assert any("minReplicas 3 greater" in e for e in mutated(lambda d: d["spec"]["rayClusterSpec"][
        "workerGroupSpecs"][0].update(minReplicas=3)))


def test_ray_resources_carry_the_project_shape():
    """Head schedules no work; an index group advertises index_node and no CPUs; token auth with
    the generated Secret; the Ray version of the pins; RayJobs clean up after themselves."""
    for name in RENDERINGS:
        for doc in by_kind(rendered(name), "RayJob") + by_kind(rendered(name), "RayCluster"):
            where = f"{name}:{doc_id(doc)}"
            cs = ray_cluster_spec(doc)
            assert cs["rayVersion"] == pins()["ray"], where
            assert cs["authOptions"] == {"mode": "token", "secretName": "ratray-ray-auth"}, where
            assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
            index = [g for n, g in groups(doc) if n == "index"]
            assert len(index) == 1, where
            params = index[0]["rayStartParams"]
            assert params["num-cpus"] == "0", where
            assert parse_ray_resources(params["resources"]).get(INDEX_RESOURCE, 0) >= 1, where
            others = [g for n, g in groups(doc) if n != "index" and "resources" in g.get("rayStartParams", {})]
            assert not others, f"{where}: only the index group may advertise {INDEX_RESOURCE}"
            if doc["kind"] == "RayJob":
                s = doc["spec"]
                assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0, where
                assert s["activeDeadlineSeconds"] > 0, where
            else:
                assert cs["enableInTreeAutoscaling"] is True, where
                assert all(g["minReplicas"] == 0 for n, g in groups(doc)[1:]), where


# ---------------------------------------------------------------------------------------------
# pods: resources, security, images, volumes


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod a document makes, KubeRay's included."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet"):
        return [(f"{kind}/{name}", doc["spec"]["template"])]
    if kind in ("RayJob", "RayCluster"):
        out = [(f"{kind}/{name}/{g}", spec["template"]) for g, spec in groups(doc)]
        if kind == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            out.append((f"{kind}/{name}/submitter", doc["spec"]["submitterPodTemplate"]))
        return out
    return []


def all_pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [pt for d in docs for pt in pod_templates(d)]


_UNITS = {"m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
          "T": Decimal(10) ** 12, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20,
          "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40}


def quantity(q) -> Decimal:
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {q!r}")
    return Decimal(m.group(1)) * _UNITS.get(m.group(2) or "", Decimal(1))


def resource_problems(where: str, container: dict) -> list[str]:
    r = container.get("resources", {})
    req, lim = r.get("requests", {}), r.get("limits", {})
    errs = []
    for key in ("cpu", "memory"):
        if key not in lim:
            errs.append(f"{where}/{container['name']}: no {key} limit")
    if set(req) != set(lim) or any(quantity(req[k]) != quantity(lim[k]) for k in req if k in lim):
        errs.append(f"{where}/{container['name']}: requests {req} != limits {lim}")
    return errs


def security_problems(where: str, template: dict) -> list[str]:
    spec = template["spec"]
    psc = spec.get("securityContext", {})
    errs = []
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 1) == 0:
        errs.append(f"{where}: pod must run as non-root")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errs.append(f"{where}: seccompProfile RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            errs.append(f"{where}: {key}")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        errs.append(f"{where}: hostPath volume")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            errs.append(f"{where}/{c['name']}: privileged")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            errs.append(f"{where}/{c['name']}: capabilities must drop ALL and add none")
        if sc.get("readOnlyRootFilesystem") is not True:
            errs.append(f"{where}/{c['name']}: readOnlyRootFilesystem")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if sc.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
            errs.append(f"{where}/{c['name']}: a read-only root filesystem needs a writable /tmp")
    return errs


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_every_container_has_limits_equal_to_requests(name):
    docs = rendered(name)
    errs = [e for where, t in all_pod_templates(docs) for c in t["spec"]["containers"]
            for e in resource_problems(where, c)]
    for cluster in by_kind(docs, "RayCluster"):  # the autoscaler sidecar KubeRay adds
        opts = cluster["spec"]["autoscalerOptions"]
        errs += resource_problems(f"RayCluster/{cluster['metadata']['name']}",
                                  {"name": "autoscaler", "resources": opts["resources"]})
    assert errs == []
    assert len(all_pod_templates(docs)) == 13  # mlflow, postgres, 2 x (head, 2 groups, submitter), cluster


def test_resource_rules_reject_requests_below_limits():
    dep = one(rendered("base"), "Deployment", "ratray-mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert resource_problems("x", c) == []
    c["resources"]["requests"]["memory"] = "1Gi"
    assert any("!= limits" in e for e in resource_problems("x", c))
    del c["resources"]["limits"]["cpu"]
    assert any("no cpu limit" in e for e in resource_problems("x", c))
    assert quantity("1536Mi") == quantity("1.5Gi") and quantity("500m") == Decimal("0.5")


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_pods_run_hardened(name):
    docs = rendered(name)
    errs = [e for where, t in all_pod_templates(docs) for e in security_problems(where, t)]
    for cluster in by_kind(docs, "RayCluster"):
        sc = cluster["spec"]["autoscalerOptions"]["securityContext"]
        if (sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]
                or sc.get("runAsNonRoot") is not True or sc.get("readOnlyRootFilesystem") is not True):
            errs.append(f"{doc_id(cluster)}: autoscaler container not hardened: {sc}")
    assert errs == []
    # Only the interactive head keeps a service account token (its autoscaler scales the cluster)
    for where, t in all_pod_templates(docs):
        if where != "RayCluster/ratray-interactive/head":
            assert t["spec"].get("automountServiceAccountToken") is False, where
    bad = copy.deepcopy(one(docs, "StatefulSet", "ratray-postgres"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert security_problems("pg", bad["spec"]["template"])


def image_problems(image: str, wants_gpu: bool) -> list[str]:
    p = pins()
    if image.startswith("ghcr.io/ratray/ratray"):
        m = RAY_IMAGE.fullmatch(image)
        if not m:
            return [f"{image}: tag is not <version>-ray<ray>-py<XY>-<cpu|gpu>"]
        errs = []
        if m["version"] != project_version():
            errs.append(f"{image}: ratray version {m['version']} != pyproject {project_version()}")
        if m["ray"] != p["ray"]:
            errs.append(f"{image}: Ray {m['ray']} != pinned {p['ray']}")
        if m["py"] != dockerfile_python(m["flavor"]):
            errs.append(f"{image}: py{m['py']} != the Dockerfile's base image")
        if (m["flavor"] == "gpu") != wants_gpu:
            errs.append(f"{image}: a {m['flavor']} image on a pod that {'has' if wants_gpu else 'has no'} GPU")
        return errs
    if image.startswith("ghcr.io/ratray/mlflow"):
        m = MLFLOW_IMAGE.fullmatch(image)
        return [] if m and m["mlflow"] == p["mlflow"] else [f"{image}: MLflow tag != pinned {p['mlflow']}"]
    m = re.fullmatch(r"[\w./-]+:(\d+(\.\d+)+)(-[\w.]+)?", image)
    return [] if m else [f"{image}: third-party images need an explicit version tag"]


def _gpus(container: dict) -> int:
    return int(quantity(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_image_tags_agree_with_the_pins(name):
    errs = [e for where, t in all_pod_templates(rendered(name)) for c in t["spec"]["containers"]
            for e in image_problems(c["image"], _gpus(c) > 0)]
    assert errs == []


def test_image_rules_reject_a_wrong_ray_version_or_flavour():
    good = f"ghcr.io/ratray/ratray:{project_version()}-ray{pins()['ray']}-py311-cpu"
    assert image_problems(good, False) == []
    assert image_problems(good.replace(pins()["ray"], "2.59.0"), False)
    assert image_problems(good, True)  # a CPU image on a GPU pod
    assert image_problems(good.replace("py311", "py312"), False)
    assert image_problems("ghcr.io/ratray/mlflow:3.18.0", False)
    assert image_problems("postgres:latest", False)


def dockerfile_from(flavor: str) -> str:
    text = (ROOT / "docker" / f"Dockerfile.{flavor}").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    return line.split()[1]


def dockerfile_python(flavor: str) -> str:
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d{3})-(cpu|cu\d+)", dockerfile_from(flavor))
    assert m, dockerfile_from(flavor)
    return m.group(2)


def test_dockerfiles_build_from_the_pinned_ray_and_python():
    for flavor, accel in (("cpu", "cpu"), ("gpu", "cu")):
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|cu\d+)", dockerfile_from(flavor))
        assert m, dockerfile_from(flavor)
        assert m.group(1) == pins()["ray"]
        assert m.group(4).startswith(accel)
        assert (int(m.group(2)), int(m.group(3))) >= (3, 10)  # pyproject requires-python
    assert dockerfile_python("cpu") == dockerfile_python("gpu") == "311"
    cpu, gpu = ((ROOT / "docker" / f"Dockerfile.{f}").read_text() for f in ("cpu", "gpu"))
    assert '".[cpu]"' in cpu and '".[gpu]"' in gpu and '".[cpu]"' not in gpu  # one faiss only
    assert f"torch=={pins()['torch']}" in cpu and f"torch=={pins()['torch']}" in gpu
    assert "DS_BUILD_FUSED_ADAM=1" in gpu and f"deepspeed=={pins()['deepspeed']}" in gpu
    assert re.search(r"FROM python:3\.11", (ROOT / "docker" / "Dockerfile.mlflow").read_text())
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "**/*.env" in ignore and "work" in ignore


def image_paths(flavor: str) -> dict[str, str]:
    """Destination in the image -> source in the repository, from the Dockerfile's COPY lines."""
    out = {}
    for line in (ROOT / "docker" / f"Dockerfile.{flavor}").read_text().splitlines():
        if line.startswith("COPY "):
            args = [a for a in line.split()[1:] if not a.startswith("--")]
            *srcs, dst = args
            for s in srcs:
                out[dst.rstrip("/") + ("/" + s if dst.endswith("/") else "")] = s
    return out


def repo_path_in_image(path: str, flavor: str) -> Path | None:
    """The repository file an absolute path in the image comes from, None if the image lacks it."""
    for dst, src in sorted(image_paths(flavor).items(), key=lambda kv: -len(kv[0])):
        if path == dst or path.startswith(dst + "/"):
            return ROOT / src / path[len(dst):].lstrip("/")
    return None


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_every_ray_pod_mounts_the_shared_volume_at_the_same_path(name):
    docs = rendered(name)
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    assert SHARED_CLAIM in claims
    modes = claims[SHARED_CLAIM]["spec"]["accessModes"]
    assert modes == (["ReadWriteOnce"] if name == "cpu" else ["ReadWriteMany"])  # cpu: one node
    for doc in by_kind(docs, "RayJob") + by_kind(docs, "RayCluster"):
        for g, spec in groups(doc):
            pod = spec["template"]["spec"]
            vols = {v["name"]: v for v in pod["volumes"]}
            (c,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            shared = [m for m in c["volumeMounts"] if m["mountPath"] == SHARED_PATH]
            assert len(shared) == 1, (doc_id(doc), g)
            assert vols[shared[0]["name"]]["persistentVolumeClaim"]["claimName"] == SHARED_CLAIM
            for m in c["volumeMounts"]:
                assert m["name"] in vols, (doc_id(doc), g, m)


def test_secret_references_resolve_to_generated_secrets(secrets_dir):
    secrets = {d["metadata"]["name"]: d for d in render(secrets_dir)}
    for name in RENDERINGS:
        docs = rendered(name)
        refs = []
        for where, t in all_pod_templates(docs):
            for c in t["spec"]["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.append((where, ref["name"], ref["key"]))
        for d in by_kind(docs, "RayJob") + by_kind(docs, "RayCluster"):
            refs.append((doc_id(d), ray_cluster_spec(d)["authOptions"]["secretName"], "auth_token"))
        assert refs
        for where, secret, key in refs:
            assert secret in secrets, (name, where, secret)
            assert key in secrets[secret]["data"], (name, where, secret, key)
    token = base64.b64decode(secrets["ratray-ray-auth"]["data"]["auth_token"]).decode()
    password = base64.b64decode(secrets["ratray-postgres"]["data"]["POSTGRES_PASSWORD"]).decode()
    assert len(token) >= 32 and re.fullmatch(r"[0-9a-f]+", password) and len(password) >= 32
    assert "replace" not in token and "replace" not in password


def test_generate_sh_never_overwrites_and_draws_fresh_values(tmp_path):
    for run in ("a", "b"):
        shutil.copytree(K8S / "secrets", tmp_path / run, ignore=shutil.ignore_patterns("*.env"))
        subprocess.run(["bash", str(tmp_path / run / "generate.sh")], check=True, capture_output=True)
    a, b = ((tmp_path / r / "ray-auth.env").read_text() for r in ("a", "b"))
    assert a != b
    (tmp_path / "a" / "postgres.env").write_text("POSTGRES_USER=u\nPOSTGRES_PASSWORD=keep\nPOSTGRES_DB=d\n")
    out = subprocess.run(["bash", str(tmp_path / "a" / "generate.sh")], check=True, capture_output=True, text=True)
    assert "kept" in out.stdout and "keep" in (tmp_path / "a" / "postgres.env").read_text()
    assert (tmp_path / "a" / "ray-auth.env").read_text() == a
    ignored = (K8S / "secrets" / ".gitignore").read_text().split()
    assert "*.env" in ignored


# ---------------------------------------------------------------------------------------------
# entrypoints: what the job process actually receives, parsed by the job itself


def driver_argv(entrypoint: str) -> list[str]:
    """The argv the job driver runs with. KubeRay's submitter pod runs
    `bash -c "... ray job submit ... -- <entrypoint> ; fi"` (so bash splits the entrypoint);
    `ray job submit` joins its arguments with subprocess.list2cmdline; the job supervisor runs
    that string with shell=True."""
    first = shlex.split(entrypoint)
    assert not set(first) & {";", "&&", "||", "|", ">", "<", "&"}, f"shell operators in {entrypoint!r}"
    return shlex.split(subprocess.list2cmdline(first))


def head_image_flavor(doc: dict) -> str:
    image = ray_cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    return RAY_IMAGE.fullmatch(image)["flavor"]


class _Captured(Exception):
    pass


def job_config(doc: dict, monkeypatch):
    """Run the RayJob's job script's own main() on the driver argv (paths in the image mapped to
    the repository) up to the point where it would start work; return (script, parsed job config)."""
    import importlib

    argv = driver_argv(doc["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    flavor = head_image_flavor(doc)
    script = repo_path_in_image(argv[1], flavor)
    assert script is not None and script.is_file(), f"{argv[1]} is not in the {flavor} image"
    assert script.parent == ROOT / "jobs" and script.name in JOB_CONFIGS, script
    args = []
    for a in argv[2:]:
        if a.startswith(APP_ROOT + "/"):
            p = repo_path_in_image(a, flavor)
            assert p is not None and p.exists(), f"{a} is not in the {flavor} image"
            a = str(p)
        args.append(a)
    captured = {}

    def capture(job, *a, **k):
        captured["job"] = job
        raise _Captured

    import ratray.build
    import ratray.train.realm
    import ratray.train.retro

    for mod, attr in ((ratray.build, "build"), (ratray.train.retro, "resolve"),
                      (ratray.train.retro, "run"), (ratray.train.realm, "run")):
        monkeypatch.setattr(mod, attr, capture)
    module = importlib.import_module(f"jobs.{script.stem}")
    try:
        rc = module.main(args)
    except _Captured:
        return script.name, captured["job"], args
    raise AssertionError(f"{script.name} {args} exited with {rc} before starting (a config error)")


RAYJOBS = [(n, d) for n, d in RAY_DOCS if d["kind"] == "RayJob"]


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=[f"{n}:{doc_id(d)}" for n, d in RAYJOBS])
def test_entrypoint_runs_a_job_of_the_image_with_a_valid_config(name, doc, monkeypatch):
    script, job, args = job_config(doc, monkeypatch)
    assert type(job).__name__ == JOB_CONFIGS[script]
    assert job.workdir.startswith(SHARED_PATH + "/"), job.workdir  # on the shared volume
    assert job.train.run_name in args  # an explicit run name: re-applying resumes
    assert job.service.resources == {INDEX_RESOURCE: 1}
    assert job.service.omp_threads > 0  # containers see the host's cores; size FAISS to the pod


def test_entrypoint_quoting_survives_the_submitter_and_the_shell():
    argv = driver_argv("python x.py --set 'service.resources={\"index_node\": 1}' --set a=b")
    assert argv == ["python", "x.py", "--set", 'service.resources={"index_node": 1}', "--set", "a=b"]
    # without the single quotes, the value splits at the space after the shells strip the quotes
    assert 'service.resources={"index_node": 1}' not in driver_argv(
        'python x.py --set service.resources={"index_node": 1}')


def test_entrypoint_rules_reject_a_missing_job_file(monkeypatch):
    job = one(rendered("base"), "RayJob", "ratray-retro")
    job_config(job, monkeypatch)
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("retro_pretrain.py", "retro_train.py")
    with pytest.raises(AssertionError, match="retro_train.py"):
        job_config(job, monkeypatch)
    job = one(rendered("base"), "RayJob", "ratray-retro")
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("demo.yaml", "demo2.yaml")
    with pytest.raises(AssertionError, match="demo2.yaml"):
        job_config(job, monkeypatch)
    job = one(rendered("base"), "RayJob", "ratray-retro")
    job["spec"]["entrypoint"] += " --set train.num_worker=2"
    with pytest.raises(AssertionError, match="config error"):
        job_config(job, monkeypatch)


# ---------------------------------------------------------------------------------------------
# capacity: the job's config fits the cluster it asks for


def group_capacity(g: dict) -> dict[str, float]:
    """Ray resources one pod of the group advertises (KubeRay: rayStartParams, else the limits;
    CPU limits round up)."""
    params = g.get("rayStartParams", {}) or {}
    (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    lim = c["resources"]["limits"]
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(lim["cpu"]))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else _gpus(c)
    out = {"CPU": cpus, "GPU": gpus}
    if "resources" in params:
        out.update(parse_ray_resources(params["resources"]))
    return out


def capacity_problems(doc: dict, job) -> list[str]:
    errs = []
    ws = [(n, g) for n, g in groups(doc)[1:]]
    pods = [(n, group_capacity(g), g["replicas"]) for n, g in ws]
    need = job.service.resources
    shards = job.index.shards
    for res, amount in need.items():
        slots = sum(int(cap.get(res, 0) // amount) * r for _, cap, r in pods)
        if slots < shards:
            errs.append(f"{shards} shards need {amount} {res} each: the cluster has {slots} slots")
        if any(cap.get(res) and cap["CPU"] > 0 for _, cap, _ in pods):
            errs.append(f"pods advertising {res} must advertise no CPU (shards only)")
    t = job.train
    cpus = sum(cap["CPU"] * r for _, cap, r in pods)
    gpus = sum(cap["GPU"] * r for _, cap, r in pods)
    want_cpu = t.num_workers * t.cpus_per_worker
    refresh = getattr(job, "refresh", None)
    if refresh is not None and refresh.every:
        want_cpu += refresh.num_workers * refresh.num_cpus
    if cpus < want_cpu:
        errs.append(f"training needs {want_cpu} CPUs, worker groups have {cpus}")
    if t.use_gpu and gpus < t.num_workers:
        errs.append(f"{t.num_workers} GPU workers, {gpus} GPUs")
    if not t.use_gpu and gpus:
        errs.append(f"{gpus} GPUs requested but train.use_gpu is false")
    if t.use_gpu and t.precision != "bf16":
        errs.append("GPU training should run in bf16")
    e = job.embed
    if e.device == "cuda" and gpus < e.num_actors:
        errs.append(f"{e.num_actors} GPU encoder actors, {gpus} GPUs")
    if e.device != "cuda":  # ratray.retrieval.embed._threads: 0 = the cluster's CPUs / actors
        threads = e.threads_per_actor or max(1, int(cpus) // e.num_actors)
        fit = sum(int(cap["CPU"] // threads) * r for _, cap, r in pods)
        if fit < e.num_actors:
            errs.append(f"{e.num_actors} embedding actors of {threads} CPUs each: the pods fit {fit}")
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    if env.get("DS_ACCELERATOR") != ("cuda" if t.use_gpu else "cpu"):
        errs.append(f"DS_ACCELERATOR={env.get('DS_ACCELERATOR')} with train.use_gpu={t.use_gpu}")
    if job.service.omp_threads:
        for n, cap, _ in pods:
            if cap.get(INDEX_RESOURCE):
                g = dict(ws)[n]
                (c,) = g["template"]["spec"]["containers"]
                cores = max(1, math.ceil(quantity(c["resources"]["limits"]["cpu"])))
                per_pod = int(cap[INDEX_RESOURCE] // need.get(INDEX_RESOURCE, 1))
                if per_pod * job.service.omp_threads > max(cores, per_pod):  # >= 1 thread a shard
                    errs.append(f"{per_pod} shards x {job.service.omp_threads} FAISS threads on {cores} cores")
    return errs


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=[f"{n}:{doc_id(d)}" for n, d in RAYJOBS])
def test_the_job_fits_its_cluster(name, doc, monkeypatch):
    _, job, _ = job_config(doc, monkeypatch)
    assert capacity_problems(doc, job) == []
    for g_name, g in groups(doc)[1:]:
        (c,) = g["template"]["spec"]["containers"]
        if _gpus(c):
            tol = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tol), g_name
            assert g["template"]["spec"].get("nodeSelector"), g_name


def test_capacity_rules_catch_too_few_shard_slots_and_missing_gpus(monkeypatch):
    doc = one(rendered("base"), "RayJob", "ratray-retro")
    _, job, _ = job_config(doc, monkeypatch)
    assert capacity_problems(doc, job) == []
    small = copy.deepcopy(doc)
    small["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["rayStartParams"]["resources"] = '"{\\"index_node\\": 1}"'
    assert any("slots" in e for e in capacity_problems(small, job))
    gpu_job = copy.deepcopy(job)
    gpu_job.train.use_gpu, gpu_job.train.precision = True, "bf16"
    assert any("GPU workers" in e for e in capacity_problems(doc, gpu_job))
    greedy = copy.deepcopy(job)  # an encoder actor asking for every CPU of the cluster at once
    greedy.embed.num_actors, greedy.embed.threads_per_actor = 1, 0
    assert any("embedding actors" in e for e in capacity_problems(doc, greedy))
    threads = copy.deepcopy(job)
    threads.service.omp_threads = 8
    assert any("FAISS threads" in e for e in capacity_problems(doc, threads))


# ---------------------------------------------------------------------------------------------
# MLflow: reachable from the jobs, Host header allowed


@functools.lru_cache(maxsize=None)
def mlflow_host_check():
    """`is_allowed_host_header` of the installed MLflow (mlflow/server/security_utils.py), taken
    from its source: importing mlflow.server would start most of the MLflow server's imports."""
    import ast
    import importlib.util

    (pkg,) = importlib.util.find_spec("mlflow").submodule_search_locations
    src = (Path(pkg) / "server" / "security_utils.py").read_text()
    (fn,) = [n for n in ast.parse(src).body
             if isinstance(n, ast.FunctionDef) and n.name == "is_allowed_host_header"]
    namespace: dict = {}
    exec(compile(ast.Module(body=[ast.parse("import fnmatch").body[0], fn], type_ignores=[]),
                 "mlflow/server/security_utils.py", "exec"), namespace)
    return namespace["is_allowed_host_header"]


def mlflow_uris(doc: dict) -> list[str]:
    if doc["kind"] == "RayJob":
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
        return [env["MLFLOW_TRACKING_URI"]]
    return [e["value"] for _, g in groups(doc) for c in g["template"]["spec"]["containers"]
            for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_ray_jobs_reach_mlflow_and_mlflow_accepts_their_host_header(name):
    is_allowed_host_header = mlflow_host_check()
    docs = rendered(name)
    dep = one(docs, "Deployment", "ratray-mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    svc = one(docs, "Service", "ratray-mlflow")
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    for doc in by_kind(docs, "RayJob") + by_kind(docs, "RayCluster"):
        uris = mlflow_uris(doc)
        assert uris, doc_id(doc)
        for uri in uris:
            u = urlparse(uri)
            assert u.scheme == "http" and u.hostname == "ratray-mlflow" and u.port in ports, uri
            assert named[ports[u.port]["targetPort"]] == int(c["args"][1].split("=")[1])
            assert is_allowed_host_header(allowed, u.netloc), (uri, allowed)
    for host in ("ratray-mlflow.ratray.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host  # FQDN and `kubectl port-forward`
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@ratray-postgres:5432/")
    names = [e["name"] for e in c["env"]]
    assert names.index("MLFLOW_BACKEND_STORE_URI") > max(names.index(k) for k in
                                                          ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"))


def test_runtime_envs_are_what_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    for name, doc in RAYJOBS:
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert set(env) == {"env_vars"}, (name, doc_id(doc))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items())
        RuntimeEnv(**env)  # Ray's own validation (env_vars must be Dict[str, str])
    with pytest.raises(TypeError):
        RuntimeEnv(env_vars={"OMP_NUM_THREADS": 1})


# ---------------------------------------------------------------------------------------------
# NetworkPolicies, evaluated


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(k) not in vals or op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels or op == "DoesNotExist" and k in labels:
            return False
    return True


def ingress_allowed(policies: list[dict], dst: dict, src: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy ingress semantics for pods {labels, ns}: allowed when no policy
    selects the destination, else when some rule of a selecting policy admits source and port."""
    applicable = [p for p in policies if p["metadata"]["namespace"] == dst["ns"]
                  and _selects(p["spec"]["podSelector"], dst["labels"])
                  and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not applicable:
        return True
    src_ns_labels = {"kubernetes.io/metadata.name": src["ns"]}
    for p in applicable:
        for rule in p["spec"].get("ingress", []) or []:
            ports = rule.get("ports")
            if ports and not any(pp.get("protocol", "TCP") == "TCP" and pp.get("port") == port for pp in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                ns_ok = (_selects(peer["namespaceSelector"], src_ns_labels) if "namespaceSelector" in peer
                         else src["ns"] == p["metadata"]["namespace"])
                pod_ok = _selects(peer["podSelector"], src["labels"]) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def _kuberay_labels(template: dict, node_type: str) -> dict:
    return {**template["metadata"].get("labels", {}), "ray.io/is-ray-node": "yes",
            "ray.io/node-type": node_type, "app.kubernetes.io/created-by": "kuberay-operator"}


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_network_policies_admit_only_the_intended_traffic(name):
    docs = rendered(name)
    pols = by_kind(docs, "NetworkPolicy")
    ns = "ratray"
    job = one(docs, "RayJob", "ratray-retro")
    cs = job["spec"]["rayClusterSpec"]
    head = {"ns": ns, "labels": _kuberay_labels(cs["headGroupSpec"]["template"], "head")}
    worker = {"ns": ns, "labels": _kuberay_labels(cs["workerGroupSpecs"][0]["template"], "worker")}
    submitter = {"ns": ns, "labels": job["spec"]["submitterPodTemplate"]["metadata"]["labels"]}
    mlflow = {"ns": ns, "labels": one(docs, "Deployment", "ratray-mlflow")["spec"]["template"]["metadata"]["labels"]}
    pg = {"ns": ns, "labels": one(docs, "StatefulSet", "ratray-postgres")["spec"]["template"]["metadata"]["labels"]}
    debug = {"ns": ns, "labels": {"app": "debug"}}
    outsider = {"ns": "default", "labels": {"app": "web"}}
    operator = {"ns": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
    fake_operator = {"ns": "default", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}

    assert ingress_allowed(pols, mlflow, worker, 5000) and ingress_allowed(pols, mlflow, head, 5000)
    for src in (submitter, debug, outsider, operator):
        assert not ingress_allowed(pols, mlflow, src, 5000), src
    assert ingress_allowed(pols, pg, mlflow, 5432)
    for src in (head, worker, debug, outsider):
        assert not ingress_allowed(pols, pg, src, 5432), src
    assert ingress_allowed(pols, head, submitter, 8265) and ingress_allowed(pols, head, worker, 6379)
    assert ingress_allowed(pols, head, debug, 8265)  # same namespace: a client pod may submit
    assert ingress_allowed(pols, head, operator, 8265)  # KubeRay polls job status
    for src, port in ((outsider, 8265), (outsider, 6379), (outsider, 10001), (operator, 6379),
                      (fake_operator, 8265)):
        assert not ingress_allowed(pols, head, src, port), (src, port)
    assert not ingress_allowed(pols, debug, outsider, 80)  # default deny for everything else


def test_network_policy_evaluator_notices_an_open_policy():
    docs = rendered("base")
    pols = by_kind(docs, "NetworkPolicy")
    head = {"ns": "ratray", "labels": {"ratray.io/role": "ray"}}
    outsider = {"ns": "default", "labels": {}}
    assert not ingress_allowed(pols, head, outsider, 8265)
    for p in pols:
        if p["metadata"]["name"] == "ratray-ray-ingress":
            p["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]
    assert ingress_allowed(pols, head, outsider, 8265)


# ---------------------------------------------------------------------------------------------
# the scaling guide points at what exists


def test_scaling_guide_names_real_files_and_parts():
    text = (ROOT / "docs" / "scaling.md").read_text()
    for rel in re.findall(r"(?<![\w/.-])((?:k8s|cluster|docker|bench|configs|jobs)/[\w./-]+\w)", text):
        assert (ROOT / rel).exists(), rel
    for part in re.findall(r"ratray\.io/part=(\w+)", text):
        assert part in PARTS, part
    assert "kubectl apply -k k8s/secrets" in text and "port-forward svc/ratray-mlflow" in text


if __name__ == "__main__":  # render an overlay like `kubectl kustomize`
    print(yaml.safe_dump_all(render(Path(sys.argv[1])), sort_keys=False))
