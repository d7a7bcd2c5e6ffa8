"""Worker nodes for the local Ray head (``cluster/local.sh up --nodes "train:2 index:2"``): a
multi-node Ray cluster on one host, shaped like the KubeRay manifests, bound to 127.0.0.1.

    --nodes "train:2 index:2x2"  or  --nodes nodes.yaml
      └─ parse_nodes ─ one NodeSpec per node: name (train-0, index-0, index-1), group, cpus
           └─ with the groups' rayStartParams from k8s/base/ray/raycluster.yaml (manifest_groups):
              Ray's --num-cpus is the group's num-cpus when the manifest fixes it (index: "0", as
              KubeRay does) and the node's cpus otherwise; --resources is the group's (index:
              {"index_node": 2}: two shard slots per index node)
    localray.LocalRay.up ─ head with the head group's num-cpus ("0": it schedules no work)
      └─ start_nodes ─ per node, all at once: `ray start --address <head GCS> --node-ip-address
           127.0.0.1 --node-name <name> --num-cpus .. --resources .. --temp-dir <state>/<name>`
           in its own session, with its own marker (RATRAY_LOCAL_RAY) ─ state["nodes"]
    `down` stops each node's processes (session, marker, descendants), then the head's;
    `kill-node NAME` SIGKILLs one node's processes, raylet first (a lost pod).

Spec: ``GROUP:CPUS`` is one node of GROUP sized like a pod with CPUS cores, ``GROUP:CPUSxN`` N of
them, tokens separated by spaces; a file (YAML or JSON) holds the same as a list
``[{group: train, cpus: 2}, {group: index, cpus: 2, count: 2}]`` (or under a ``nodes:`` key).

Why `ray start` runs through this file (``python localnodes.py start ...``, the same CLI): Ray's
``ray start --address`` refuses to join a node while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the
switch that keeps the head on 127.0.0.1, see localray.py), and without it rewrites a loopback
``--node-ip-address`` and ``--address`` to the machine's address (``resolve_ip_for_localhost``;
seen on Ray 2.60: "Local node IP: 192.0.2.2", then "Failed to connect to GCS at address
192.0.2.2:<port>", since the head listens on 127.0.0.1 only). So the launcher imports Ray with
the clusters switch on, keeps loopback addresses as given (that one function replaced), puts
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` back into the environment the node's processes inherit,
and runs Ray's own CLI. Every other port of a node is picked free (the dashboard agent's HTTP
port explicitly: Ray's default 52365 would be shared by every node).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "base" / "ray" / "raycluster.yaml"
LOCAL_NODE_ENV = "RATRAY_LOCAL_NODE"  # the node's name, in its processes' environment
TOKEN = re.compile(r"^(?P<group>[a-z][a-z0-9-]*):(?P<cpus>\d+)(?:x(?P<count>\d+))?$")


class NodesError(ValueError):
    """A node spec that cannot be started: names what is wrong."""


@dataclass
class NodeSpec:
    name: str  # <group>-<i>: Ray's node name, the node's temp dir
    group: str  # a workerGroupSpecs groupName of the manifest
    cpus: int  # the "pod" size asked for
    num_cpus: int  # what Ray advertises: the group's num-cpus when the manifest fixes it, else cpus
    resources: dict = field(default_factory=dict)  # the group's custom resources


def kuberay_resources(value) -> dict:
    """rayStartParams' ``resources``: KubeRay's quoted JSON (``'"{\\"index_node\\": 2}"'``) or a dict."""
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = json.loads(text)  # the outer quotes KubeRay strips
    return json.loads(text)


def manifest_groups(path: Path = MANIFEST) -> dict[str, dict]:
    """groupName → its rayStartParams, the head as ``head`` (resources parsed into a dict)."""
    import yaml

    spec = yaml.safe_load(path.read_text())["spec"]
    groups = {"head": dict(spec["headGroupSpec"].get("rayStartParams") or {})}
    for g in spec.get("workerGroupSpecs", []):
        groups[g["groupName"]] = dict(g.get("rayStartParams") or {})
    for params in groups.values():
        if "resources" in params:
            params["resources"] = kuberay_resources(params["resources"])
    return groups


def _entries(spec: str) -> list[tuple[str, int, int]]:
    """(group, cpus, count) from a spec string or a YAML/JSON file's list."""
    path = Path(spec)
    if "/" in spec or spec.endswith((".yaml", ".yml", ".json")):
        if not path.is_file():
            raise NodesError(f"--nodes {spec}: no such file")
        import yaml

        data = yaml.safe_load(path.read_text())
        data = data.get("nodes") if isinstance(data, dict) else data
        if not isinstance(data, list) or not data:
            raise NodesError(f"--nodes {spec}: expected a list of {{group, cpus, count}} (or one under 'nodes:')")
        out = []
        for i, e in enumerate(data):
            extra = set(e) - {"group", "cpus", "count"} if isinstance(e, dict) else {"?"}
            if extra or not isinstance(e.get("cpus"), int) or not isinstance(e.get("count", 1), int):
                raise NodesError(f"--nodes {spec}: entry {i} must be {{group: NAME, cpus: INT, count: INT}}, got {e!r}")
            out.append((str(e.get("group")), e["cpus"], e.get("count", 1)))
        return out
    out = []
    for tok in spec.split():
        m = TOKEN.match(tok)
        if not m:
            raise NodesError(f"--nodes: {tok!r} is not GROUP:CPUS or GROUP:CPUSxCOUNT (e.g. 'train:2 index:2x2')")
        out.append((m["group"], int(m["cpus"]), int(m["count"] or 1)))
    if not out:
        raise NodesError("--nodes: no node given (e.g. 'train:2 index:2')")
    return out


def parse_nodes(spec: str, groups: dict[str, dict] | None = None) -> list[NodeSpec]:
    """The nodes a spec asks for, named and sized by the manifest's groups (see module docstring)."""
    groups = manifest_groups() if groups is None else groups
    workers = sorted(g for g in groups if g != "head")
    nodes: list[NodeSpec] = []
    for group, cpus, count in _entries(spec):
        if group not in workers:
            raise NodesError(f"--nodes: unknown group {group!r}; the manifest {MANIFEST.name} has {', '.join(workers)}")
        if count < 1:
            raise NodesError(f"--nodes: {group}: the count must be >= 1, got {count}")
        params = groups[group]
        for _ in range(count):
            i = sum(n.group == group for n in nodes)
            nodes.append(NodeSpec(f"{group}-{i}", group, cpus, int(params.get("num-cpus", cpus)),
                                  dict(params.get("resources") or {})))
    return nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(python: str, node: NodeSpec, gcs_address: str, temp_dir: Path,
                 object_store_memory: int | None = None) -> list[str]:
    """This file's `ray start` for one worker node (the module docstring says why not `ray` itself)."""
    cmd = [python, str(Path(__file__).resolve()), "start", f"--address={gcs_address}",
           "--node-ip-address=127.0.0.1", f"--node-name={node.name}", f"--num-cpus={node.num_cpus}",
           f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    if node.resources:
        cmd.append(f"--resources={json.dumps(node.resources)}")
    if object_store_memory:
        cmd.append(f"--object-store-memory={int(object_store_memory)}")
    return cmd


def start_nodes(nodes: list[NodeSpec], gcs_address: str, state_dir: Path, env: dict[str, str],
                python: str, marker_env: str, object_store_memory: int | None = None,
                timeout: float = 120.0) -> tuple[list[dict], list[dict]]:
    """Start every node at once (each in its own session, with its own marker); returns the
    nodes' state entries and those of the nodes whose `ray start` failed, with its log's tail
    under "error" (kept in both: their processes are stopped by marker)."""
    procs = []
    for node in nodes:
        tmp = state_dir / node.name
        tmp.mkdir(mode=0o700, exist_ok=True)
        marker = uuid.uuid4().hex
        log = open(state_dir / f"{node.name}_ray_start.log", "w")
        t0 = time.time()
        p = subprocess.Popen(node_command(python, node, gcs_address, tmp, object_store_memory),
                             env={**env, marker_env: marker, LOCAL_NODE_ENV: node.name}, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append((node, p, log, {**asdict(node), "marker": marker, "sid": p.pid, "started": t0,
                                     "temp_dir": str(tmp), "log": log.name}))
    entries, failed = [], []
    deadline = time.time() + timeout
    for node, p, log, entry in procs:
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
        log.close()
        entries.append(entry)
        if rc != 0:
            failed.append({**entry, "error": f"node {node.name}: `ray start` failed (rc={rc}); "
                                             f"{entry['log']}:\n" + Path(entry["log"]).read_text()[-1500:]})
    return entries, failed


def ray_start(argv: list[str]) -> int:
    """`ray <argv>` with loopback addresses kept (the module docstring says why)."""
    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # Ray reads it once, at import
    import ray._private.services as services
    from ray.scripts.scripts import main

    def keep_loopback(host: str) -> str:
        if not host:
            raise ValueError(f"Malformed host: {host}")
        return host

    services.resolve_ip_for_localhost = keep_loopback
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the node's processes: as the head's
    sys.argv = ["ray", *argv]
    return main()


if __name__ == "__main__":
    sys.exit(ray_start(sys.argv[1:]))
