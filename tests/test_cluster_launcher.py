"""The cluster-launcher configs in cluster/ validate against the schema shipped in the ray wheel
(ray/autoscaler/ray-schema.json) and against what `ray up` itself does before touching a cloud
(ray.autoscaler._private.util.prepare_config + validate_config); the local scripts parse.

Offline: the AWS defaults are read from the wheel, nothing calls the cloud."""
from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

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


def test_there_is_a_cloud_gpu_config():
    assert ROOT / "cluster" / "gpu-cluster.yaml" in CONFIGS


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
