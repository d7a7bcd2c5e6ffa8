"""The rules tests/test_k8s_manifests.py checks the manifests in k8s/ with, and what they need.

- a renderer for the kustomize subset the manifests use (resources, namespace, labels, JSON 6902
  patches with targets, secretGenerator without hash suffixes); anything else in a
  kustomization.yaml is a KustomizeError;
- strict validation: built-in kinds with `kubernetes-validate`, RayJob / RayCluster with the
  KubeRay CRD schemas made structural-strict (`strict_schema`);
- rule functions that return the problems they find (an empty list = the rule holds), so a test
  can assert both that the manifests pass and that a broken copy does not: KubeRay's admission
  rules (`kuberay_problems`), container resources, pod hardening, image tags, job capacity;
- what the jobs receive: the driver argv behind a RayJob entrypoint and the job config the job's
  own parser makes of it (`job_config`), the images' file layout, MLflow's Host-header check, and
  a NetworkPolicy ingress evaluator.

    python -m tests.k8s_rules k8s/overlays/gpu    # print a rendering, like `kubectl kustomize`
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
import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.job_capture import job_from_argv

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
RENDERINGS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu",
              "gcs-ft": K8S / "overlays" / "gcs-ft"}
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


# ---------------------------------------------------------------------------------------------
# pins


@functools.lru_cache(maxsize=None)
def pins() -> dict[str, str]:
    """name -> version of the pins in constraints.txt (lower-case names)."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[name.strip().lower()] = ver.strip()
    return out


@functools.lru_cache(maxsize=None)
def project_version() -> str:
    """The version in pyproject.toml (the images are tagged with it)."""
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
    """kind/namespace/name: what makes a resource unique in a rendering."""
    m = d.get("metadata", {})
    return f"{d['kind']}/{m.get('namespace', '-')}/{m.get('name')}"


def doc_id(d: dict) -> str:
    """kind/name, for messages and test ids."""
    return f"{d['kind']}/{d['metadata']['name']}"


@functools.lru_cache(maxsize=None)
def _rendered(name: str) -> tuple:
    return tuple(render(RENDERINGS[name]))


def rendered(name: str) -> list[dict]:
    """A private copy of a rendering (RENDERINGS key), safe to mutate."""
    return copy.deepcopy(list(_rendered(name)))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def decoded_secret(d: dict) -> dict:
    """A document with Secret data compared by value (kubectl wraps long base64 lines)."""
    if d["kind"] == "Secret":
        d = {**d, "data": {k: base64.b64decode(v) for k, v in d["data"].items()}}
    return d


# ---------------------------------------------------------------------------------------------
# built-in kinds: kubernetes-validate, strict


def validate_builtin(doc: dict) -> None:
    """Raises when the document is not valid for KUBE_VERSION, unknown fields included."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def all_docs() -> list[tuple[str, dict]]:
    """(rendering, document) of every rendering's documents (shared, not to be modified)."""
    return [(name, d) for name in RENDERINGS for d in _rendered(name)]


# ---------------------------------------------------------------------------------------------
# RayJob / RayCluster: the KubeRay CRD schemas, structural-strict


def crd_dir() -> Path:
    """Where the KubeRay CRDs are: $RATRAY_KUBERAY_CRDS, else ../shared/kuberay-crds."""
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
    """A strict Draft-4 validator for RayJob / RayCluster v1, None when the CRD file is absent."""
    d = crd_dir()
    files = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    path = d / files[kind]
    if not path.is_file():
        return None
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    """The CRD schema errors of a Ray document (skips the test where the CRDs are absent)."""
    v = crd_validator(doc["kind"])
    if v is None:
        pytest.skip(f"KubeRay CRDs not found in {crd_dir()} (set RATRAY_KUBERAY_CRDS to the folder "
                    "holding ray.io_rayjobs.yaml and ray.io_rayclusters.yaml)")
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


# ---------------------------------------------------------------------------------------------
# KubeRay's admission rules (validation.go) and the project's own rules


def ray_cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    """(name, spec) of the head group ("head") and each worker group."""
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
    """A container needs cpu and memory limits, and requests equal to them (the project's rule;
    with every container so, a pod gets the Guaranteed QoS class)."""
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
    """A pod runs non-root with RuntimeDefault seccomp, no host namespaces or hostPath volumes;
    every container drops all capabilities, cannot escalate, and has a read-only root filesystem
    with a writable /tmp."""
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


# Pod Security Standards, "restricted" profile (https://kubernetes.io/docs/concepts/security/
# pod-security-standards/), with the "baseline" controls it includes
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def kuberay_pod(template: dict, node_type: str, autoscaler: dict | None = None) -> dict:
    """The pod KubeRay (v1.7, ray-operator/controllers/ray/common/pod.go) makes from a group's
    template: a worker gets the wait-gcs-ready init container with a copy of the Ray container's
    securityContext; a head with the autoscaler gets its sidecar with autoscalerOptions.securityContext."""
    t = copy.deepcopy(template)
    ray = t["spec"]["containers"][0]
    if node_type == "worker":
        t["spec"].setdefault("initContainers", []).append(
            {"name": "wait-gcs-ready", "image": ray["image"], "securityContext": copy.deepcopy(ray.get("securityContext"))})
    if autoscaler is not None:
        t["spec"]["containers"].append({"name": "autoscaler", "securityContext": copy.deepcopy(autoscaler.get("securityContext"))})
    return t


def kuberay_pods(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod) of every pod a RayJob / RayCluster makes, as KubeRay builds it."""
    spec = ray_cluster_spec(doc)
    auto = spec.get("autoscalerOptions", {}) if spec.get("enableInTreeAutoscaling") else None
    out = [(f"{doc['kind']}/{doc['metadata']['name']}/{g}",
            kuberay_pod(t["template"], "head" if i == 0 else "worker", auto if i == 0 else None))
           for i, (g, t) in enumerate(groups(doc))]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append((f"RayJob/{doc['metadata']['name']}/submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def restricted_problems(where: str, template: dict) -> list[str]:
    """What the Pod Security admission controller at level "restricted" rejects in a pod, and,
    stricter, any container that does not itself set runAsNonRoot, allowPrivilegeEscalation false,
    capabilities drop ALL and seccompProfile RuntimeDefault (a container that relies on the pod's
    settings is not compliant once copied elsewhere — KubeRay copies the Ray container's)."""
    spec = template["spec"]
    psc = spec.get("securityContext") or {}
    errs = [f"{where}: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    errs += [f"{where}: volume {v['name']} of type {sorted(set(v) - {'name'})}" for v in spec.get("volumes", [])
             if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    errs += [f"{where}: sysctl {c['name']}" for c in psc.get("sysctls", []) if c["name"] not in SAFE_SYSCTLS]
    if psc.get("runAsUser") == 0 or psc.get("runAsNonRoot") is False:
        errs.append(f"{where}: pod runs as root")
    if psc.get("seccompProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        errs.append(f"{where}: pod seccompProfile {psc['seccompProfile']}")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        at = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged") or sc.get("procMount", "Default") != "Default":
            errs.append(f"{at}: privileged or unmasked /proc")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            errs.append(f"{at}: hostPort")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            errs.append(f"{at}: adds capabilities {sc['capabilities']['add']}")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            errs.append(f"{at}: runs as uid 0")
        own = {"runAsNonRoot": sc.get("runAsNonRoot") is True,
               "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
               "capabilities drop ALL": "ALL" in sc.get("capabilities", {}).get("drop", []),
               "seccompProfile RuntimeDefault": sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"}
        errs += [f"{at}: securityContext lacks {k}" for k, ok in own.items() if not ok]
    return errs


def pod_security_levels(docs: list[dict]) -> dict[str, str]:
    """The Pod Security labels (enforce/warn/audit -> level) of the namespace ratray."""
    labels = one(docs, "Namespace", "ratray")["metadata"]["labels"]
    prefix = "pod-security.kubernetes.io/"
    return {k[len(prefix):]: v for k, v in labels.items() if k.startswith(prefix) and not k.endswith("-version")}


def autoscaler_problems(cluster: dict) -> list[str]:
    """The autoscaler sidecar KubeRay adds to a RayCluster runs hardened like every container."""
    sc = cluster["spec"]["autoscalerOptions"]["securityContext"]
    if (sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]
            or sc.get("runAsNonRoot") is not True or sc.get("readOnlyRootFilesystem") is not True):
        return [f"{doc_id(cluster)}: autoscaler container not hardened: {sc}"]
    return []


def secret_refs(docs: list[dict]) -> list[tuple[str, str, str]]:
    """(where, secret, key) of every secretKeyRef of a container and every Ray auth secret."""
    refs = []
    for where, t in all_pod_templates(docs):
        for c in t["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((where, ref["name"], ref["key"]))
    for d in by_kind(docs, "RayJob") + by_kind(docs, "RayCluster"):
        refs.append((doc_id(d), ray_cluster_spec(d)["authOptions"]["secretName"], "auth_token"))
    return refs


def image_problems(image: str, wants_gpu: bool) -> list[str]:
    """Project images carry the project, Ray and Python versions of the pins and Dockerfiles and
    the flavour that matches the pod (gpu image on a GPU pod only); MLflow the pinned version;
    third-party images an explicit version tag."""
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


def gpu_limit(container: dict) -> int:
    """The container's nvidia.com/gpu limit (0 without one)."""
    return int(quantity(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))


def dockerfile_from(flavor: str) -> str:
    """The base image of docker/Dockerfile.<flavor>."""
    text = (ROOT / "docker" / f"Dockerfile.{flavor}").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    return line.split()[1]


def dockerfile_python(flavor: str) -> str:
    """The Python of docker/Dockerfile.<flavor>'s Ray base image, as in image tags ("311")."""
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d{3})-(cpu|cu\d+)", dockerfile_from(flavor))
    assert m, dockerfile_from(flavor)
    return m.group(2)


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


def paths_in_repo(args: list[str], flavor: str) -> list[str]:
    """Command-line arguments with every path under APP_ROOT replaced by the repository file the
    image has there; AssertionError naming the path when the image lacks it."""
    out = []
    for a in args:
        if a.startswith(APP_ROOT + "/"):
            p = repo_path_in_image(a, flavor)
            assert p is not None and p.exists(), f"{a} is not in the {flavor} image"
            a = str(p)
        out.append(a)
    return out


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
    """cpu | gpu: the image the Ray head (where the job driver runs) uses."""
    image = ray_cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    return RAY_IMAGE.fullmatch(image)["flavor"]


def job_config(doc: dict, monkeypatch):
    """Run the RayJob's job script's own main() on the driver argv (paths in the image mapped to
    the repository) up to the point where it would start work; return (script, parsed job config,
    args)."""
    argv = driver_argv(doc["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script, *args = paths_in_repo(argv[1:], head_image_flavor(doc))
    return Path(script).name, job_from_argv(Path(script), args, monkeypatch), args


# ---------------------------------------------------------------------------------------------
# capacity: the job's config fits the cluster it asks for


def group_capacity(g: dict) -> dict[str, float]:
    """Ray resources one pod of the group advertises (KubeRay: rayStartParams, else the limits;
    CPU limits round up)."""
    params = g.get("rayStartParams", {}) or {}
    (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    lim = c["resources"]["limits"]
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(lim["cpu"]))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else gpu_limit(c)
    out = {"CPU": cpus, "GPU": gpus}
    if "resources" in params:
        out.update(parse_ray_resources(params["resources"]))
    return out


def capacity_problems(doc: dict, job) -> list[str]:
    """The job's config fits the worker groups of its RayJob: shard slots for every shard on pods
    that advertise no CPU, CPUs and GPUs for the training (and refresh) workers and the embedding
    actors, DS_ACCELERATOR matching train.use_gpu, FAISS threads within the index pods' cores."""
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
    if e.device != "cuda":  # ratray.index.embed._threads: 0 = the cluster's CPUs / actors
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
    """The MLFLOW_TRACKING_URI values the document gives its job or its pods."""
    if doc["kind"] == "RayJob":
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
        return [env["MLFLOW_TRACKING_URI"]]
    return [e["value"] for _, g in groups(doc) for c in g["template"]["spec"]["containers"]
            for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]


def mlflow_container(docs: list[dict]) -> tuple[dict, dict]:
    """The MLflow container and its env (name -> value)."""
    (c,) = one(docs, "Deployment", "ratray-mlflow")["spec"]["template"]["spec"]["containers"]
    return c, {e["name"]: e.get("value") for e in c["env"]}


def mlflow_allowed_hosts(docs: list[dict]) -> list[str]:
    """MLFLOW_SERVER_ALLOWED_HOSTS of the MLflow container: the Host headers it accepts."""
    return [h.strip() for h in mlflow_container(docs)[1]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]


# ---------------------------------------------------------------------------------------------
# NetworkPolicies, evaluated


def _selects(selector: dict | None, labels: dict) -> bool:
    """Label-selector semantics (matchLabels and matchExpressions); None selects nothing."""
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


def kuberay_labels(template: dict, node_type: str) -> dict:
    """The labels KubeRay puts on the pods it creates from a group's template."""
    return {**template["metadata"].get("labels", {}), "ray.io/is-ray-node": "yes",
            "ray.io/node-type": node_type, "app.kubernetes.io/created-by": "kuberay-operator"}


def traffic_peers(docs: list[dict]) -> dict[str, dict]:
    """The pods whose traffic is checked ({ns, labels}), named; Ray pods as KubeRay labels them."""
    ns = "ratray"
    job = one(docs, "RayJob", "ratray-retro")
    cs = job["spec"]["rayClusterSpec"]
    return {
        "head": {"ns": ns, "labels": kuberay_labels(cs["headGroupSpec"]["template"], "head")},
        "worker": {"ns": ns, "labels": kuberay_labels(cs["workerGroupSpecs"][0]["template"], "worker")},
        "submitter": {"ns": ns, "labels": job["spec"]["submitterPodTemplate"]["metadata"]["labels"]},
        "client": {"ns": ns, "labels": {"app": "notebook", **CLIENT_LABELS}},
        "mlflow": {"ns": ns, "labels": one(docs, "Deployment", "ratray-mlflow")["spec"]["template"]["metadata"]["labels"]},
        "pg": {"ns": ns, "labels": one(docs, "StatefulSet", "ratray-postgres")["spec"]["template"]["metadata"]["labels"]},
        "debug": {"ns": ns, "labels": {"app": "debug"}},
        "outsider": {"ns": "default", "labels": {"app": "web"}},
        "operator": {"ns": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}},
        "fake_operator": {"ns": "default", "labels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }


RAY_PORTS = (6379, 8265, 10001, 10002, 52365)  # GCS, dashboard, client, a worker port, agent
CLIENT_LABELS = {"ratray.io/ray-client": "true"}  # the pods that may submit jobs (dashboard port)


def ray_pod_peers(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, {ns, labels}) of every Ray pod of every RayJob and RayCluster, as KubeRay labels it."""
    return [(f"{doc_id(d)}/{g}", {"ns": "ratray", "labels": kuberay_labels(spec["template"], "head" if i == 0 else "worker")})
            for d in by_kind(docs, "RayJob") + by_kind(docs, "RayCluster") for i, (g, spec) in enumerate(groups(d))]


def ray_ingress_problems(docs: list[dict]) -> list[str]:
    """Every Ray pod is selected by a policy that admits the Ray pods on every port, a labelled
    client on the dashboard port only (of the head), and no other pod of the namespace at all."""
    pols = by_kind(docs, "NetworkPolicy")
    pods = ray_pod_peers(docs)
    stranger = {"ns": "ratray", "labels": {"app": "debug"}}
    client = {"ns": "ratray", "labels": dict(CLIENT_LABELS)}
    errs = []
    for where, dst in pods:
        for port in RAY_PORTS:
            errs += [f"{where}: {w} cannot reach port {port}" for w, src in pods
                     if not ingress_allowed(pols, dst, src, port)]
            if ingress_allowed(pols, dst, stranger, port):
                errs.append(f"{where}: any pod of the namespace reaches port {port}")
            if port != 8265 and ingress_allowed(pols, dst, client, port):
                errs.append(f"{where}: a job client reaches port {port}")
        if dst["labels"]["ray.io/node-type"] == "head" and not ingress_allowed(pols, dst, client, 8265):
            errs.append(f"{where}: a labelled job client cannot reach the dashboard")
    return errs


if __name__ == "__main__":  # render an overlay like `kubectl kustomize`
    print(yaml.safe_dump_all(render(Path(sys.argv[1])), sort_keys=False))
