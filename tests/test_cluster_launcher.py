"""The cluster-launcher configs in cluster/ validate against the schema shipped in the ray wheel
(ray/autoscaler/ray-schema.json) and against what `ray up` itself does before touching a cloud
(ray.autoscaler._private.util.prepare_config + validate_config); the GPU cluster gives the job its
header documents (parsed by the job itself) the GPUs, CPUs and `index_node` shard slots it asks
for, with faiss-gpu only on the GPU nodes; the local scripts parse.

Offline: the AWS defaults are read from the wheel, nothing calls the cloud."""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.job_capture import job_from_argv
from tests.k8s_rules import paths_in_repo

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "cluster").glob("*.sh"))
IMAGE = re.compile(r"ghcr\.io/ratray/ratray:(?P<version>[\d.]+)-ray(?P<ray>[\d.]+)-py(?P<py>\d{3})-(?P<flavor>cpu|gpu)")


@functools.lru_cache(maxsize=None)
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def schema_errors(cfg: dict) -> list[str]:
    v = jsonschema.Draft7Validator(ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(cfg)]


def ray_up_checks(cfg: dict) -> dict:
    """What `ray up` runs on the config before it starts nodes: fill in the provider defaults,
    then Ray's own validate_config (the schema plus node-type consistency)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            k, v = line.split("==", 1)
            out[k.strip().lower()] = v.strip()
    return out


GPU_CONFIG = ROOT / "cluster" / "gpu-cluster.yaml"
FAISS_CPU = re.compile(r"faiss-cpu|\.\[cpu")  # the faiss-cpu wheel or the project's `cpu` extra


def documented_job(path: Path) -> tuple[Path, list[str]]:
    """The job script and arguments of the `ray job submit ... -- python ...` example in the
    config's header comment, paths in the head's image mapped to the repository."""
    lines = iter(ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#"))
    command = next(ln for ln in lines if "ray job submit" in ln)
    while command.endswith("\\"):
        command = command[:-1] + next(lines)
    argv = shlex.split(command)
    argv = argv[argv.index("--") + 1:]
    assert argv[0] == "python", argv
    script, *args = paths_in_repo(argv[1:], IMAGE.fullmatch(load(path)["docker"]["image"])["flavor"])
    return Path(script), args


def node_flavor(cfg: dict, node_type: str) -> str | None:
    """cpu | gpu: the image a node type runs (its worker_image, else the cluster's image)."""
    image = cfg["available_node_types"][node_type].get("docker", {}).get("worker_image", cfg["docker"]["image"])
    m = IMAGE.fullmatch(image)
    return m["flavor"] if m else None


def gpu_node_problems(cfg: dict, job) -> list[str]:
    """GPU nodes are the node types that declare GPUs, and exactly those run the GPU image; they
    keep CPUs for Ray Train's workers (one GPU and train.cpus_per_worker CPUs each); the cluster
    can reach enough GPUs for the training workers and the CUDA encoder actors, and enough
    shard slots of the custom resources the index shards request (service.resources)."""
    types = cfg["available_node_types"]
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    errs = [] if gpu_types else ["no worker node type declares GPUs"]
    for n in types:
        if (node_flavor(cfg, n) == "gpu") != (n in gpu_types):
            errs.append(f"{n}: a {node_flavor(cfg, n)} image on a node type with "
                        f"{types[n]['resources'].get('GPU', 0)} GPUs")
    for n, t in gpu_types.items():
        cpus = t["resources"].get("CPU")  # absent: detected from the instance type
        if cpus is not None and cpus < job.train.cpus_per_worker * t["resources"]["GPU"]:
            errs.append(f"{n}: {cpus} CPUs for {t['resources']['GPU']} training workers")
    gpus = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types.values())
    if job.train.use_gpu and gpus < job.train.num_workers:
        errs.append(f"{job.train.num_workers} GPU training workers, the cluster reaches {gpus} GPUs")
    if job.embed.device == "cuda" and gpus < job.embed.num_actors:
        errs.append(f"{job.embed.num_actors} CUDA encoder actors, the cluster reaches {gpus} GPUs")
    for res, amount in job.service.resources.items():
        slots = sum(int(t["resources"].get(res, 0) // amount) * t["max_workers"] for t in workers.values())
        if slots < job.index.shards:
            errs.append(f"{job.index.shards} shards need {amount} {res} each: the cluster reaches {slots} slots")
    return errs


def faiss_problems(cfg: dict, gpu_dockerfile: str) -> list[str]:
    """GPU nodes get faiss-gpu from the image (the `gpu` extra) and nothing installs faiss-cpu next
    to it: both wheels provide the same `faiss` module, the later install wins."""
    install = [ln for ln in gpu_dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    errs = [] if any('".[gpu]"' in ln for ln in install) else ["the GPU image does not install the gpu extra"]
    errs += [f"the GPU image installs faiss-cpu: {ln.strip()}" for ln in install if FAISS_CPU.search(ln)]
    commands = cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", []) + [
        c for t in cfg["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    errs += [f"a setup command installs faiss-cpu: {c}" for c in commands if FAISS_CPU.search(c)]
    return errs


def gpu_dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile.gpu").read_text()


def test_the_gpu_cluster_gives_the_documented_job_the_gpus_and_shard_slots_it_requests(monkeypatch):
    """The job the config's header tells users to submit, parsed by the job itself: its GPU
    training workers, CUDA encoders and index shards all fit the node types."""
    job = job_from_argv(*documented_job(GPU_CONFIG), monkeypatch)
    assert job.train.use_gpu and job.embed.device == "cuda" and job.service.resources
    assert gpu_node_problems(load(GPU_CONFIG), job) == []


def test_gpu_nodes_get_faiss_gpu_and_never_faiss_cpu():
    assert faiss_problems(load(GPU_CONFIG), gpu_dockerfile()) == []


def _gpu_type(cfg: dict) -> dict:
    return cfg["available_node_types"]["gpu"]


BROKEN_GPU_CLUSTERS = {  # a change to the config or the documented job -> text of the problem
    "gpu-type-declares-no-gpus": (lambda cfg, job: _gpu_type(cfg)["resources"].pop("GPU"),
                                  "no worker node type declares GPUs"),
    "gpu-type-without-cpus": (lambda cfg, job: _gpu_type(cfg)["resources"].update(CPU=0),
                              "CPUs for 4 training workers"),
    "too-few-gpu-nodes": (lambda cfg, job: _gpu_type(cfg).update(max_workers=0), "GPU training workers"),
    "cpu-image-on-gpu-nodes": (lambda cfg, job: _gpu_type(cfg)["docker"].update(
        worker_image=cfg["docker"]["image"]), "a cpu image on a node type with 4 GPUs"),
    "too-few-index-nodes": (lambda cfg, job: cfg["available_node_types"]["index"].update(max_workers=1),
                            "slots"),
    "shards-request-an-unknown-resource": (lambda cfg, job: setattr(job.service, "resources",
                                                                    {"index_nodes": 1}), "0 slots"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_GPU_CLUSTERS))
def test_gpu_node_rules_catch_a_broken_config(case, monkeypatch):
    mutate, problem = BROKEN_GPU_CLUSTERS[case]
    cfg, job = load(GPU_CONFIG), job_from_argv(*documented_job(GPU_CONFIG), monkeypatch)
    assert gpu_node_problems(cfg, job) == []
    mutate(cfg, job)
    assert any(problem in e for e in gpu_node_problems(cfg, job)), gpu_node_problems(cfg, job)


@pytest.mark.parametrize("where", ["setup_commands", "worker_setup_commands", "node-type", "image"])
def test_faiss_rule_catches_faiss_cpu_next_to_faiss_gpu(where):
    cfg, dockerfile = load(GPU_CONFIG), gpu_dockerfile()
    install = "pip install -c constraints.txt faiss-cpu==1.15.1"
    if where == "node-type":
        _gpu_type(cfg)["worker_setup_commands"] = [install]
    elif where == "image":
        dockerfile = dockerfile.replace('".[gpu]"', '".[cpu]"')
    else:
        cfg[where] = [install]
    assert faiss_problems(cfg, dockerfile)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_against_the_ray_wheel_schema(path):
    cfg = load(path)
    assert schema_errors(cfg) == []
    prepared = ray_up_checks(cfg)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_matches_the_project_layout(path):
    cfg = load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head schedules no work"
    index = [t for t in types.values() if t["resources"].get("index_node")]
    assert len(index) == 1 and index[0]["resources"]["CPU"] == 0 and index[0]["min_workers"] >= 1
    gpu_types = [n for n, t in types.items() if t.get("docker", {}).get("worker_image")]
    images = [cfg["docker"]["image"]] + [types[n]["docker"]["worker_image"] for n in gpu_types]
    for image in images:
        m = IMAGE.fullmatch(image)
        assert m, image
        assert m["ray"] == pins()["ray"] and m["py"] == "311", image
    assert IMAGE.fullmatch(cfg["docker"]["image"])["flavor"] == "cpu"
    assert all(IMAGE.fullmatch(types[n]["docker"]["worker_image"])["flavor"] == "gpu" for n in gpu_types)
    assert any("/shared:/shared" in o for o in cfg["docker"]["run_options"])
    assert any("RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"])
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    # the dashboard / job API stays on the head's loopback (reached through `ray dashboard`)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


def test_schema_validation_rejects_typos_and_non_integer_resources():
    cfg = load(ROOT / "cluster" / "gpu-cluster.yaml")
    assert schema_errors(cfg) == []
    typo = copy.deepcopy(cfg)
    typo["max_worker"] = typo.pop("max_workers")
    assert any("max_worker" in e for e in schema_errors(typo))
    frac = copy.deepcopy(cfg)
    frac["available_node_types"]["index"]["resources"]["index_node"] = 0.5
    assert any("index_node" in e and "integer" in e for e in schema_errors(frac))
    docker = copy.deepcopy(cfg)
    docker["docker"]["worker_images"] = "x"
    assert any("worker_images" in e for e in schema_errors(docker))
    bad_head = copy.deepcopy(cfg)
    bad_head["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_checks(bad_head)


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_local_scripts_parse(path):
    assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
    p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
