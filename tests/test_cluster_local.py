"""cluster/localray.py (run by cluster/local.sh): a real `ray start --head` on non-default ports +
`ray job submit`, with and without a token file, and the wrapper script's CLI.

HOME points at a tmp dir in both cases (Ray reads the token from $HOME/.ray/auth_token), so the
test behaves the same on every machine and never touches the real ~/.ray. The head uses its own
--temp-dir, so the suite's `ray.init()` session (and anyone else's Ray) is unaffected, and `down()`
stops only this head's processes (never `ray stop`).
"""
from __future__ import annotations

import importlib.util
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_localray():
    """cluster/localray.py is tooling outside the ratray package: loaded from its file, the way
    cluster/local.sh runs it."""
    spec = importlib.util.spec_from_file_location("localray", ROOT / "cluster" / "localray.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


localray = _load_localray()
localnodes = sys.modules["localnodes"]  # imported by localray (cluster/localnodes.py)
LocalRay, port_busy, ray_exe = localray.LocalRay, localray.port_busy, localray.ray_exe


def _free_ports(base: int) -> tuple[int, int]:
    """A GCS port p with p, p+1, p+2 free and a free dashboard port, searched from `base`."""
    for p in range(base, base + 200, 7):
        d = p + 2000
        if not any(port_busy(x) for x in (p, p + 1, p + 2, d)):
            return p, d
    pytest.skip("no free port block for a test Ray head")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_local_sh_runs_the_cli_and_reports_a_head_that_is_not_up(tmp_path):
    """cluster/local.sh reaches cluster/localray.py's CLI: `status` of a port with no head started
    prints the JSON status and exits 3; an unknown subcommand is refused by the parser (exit 2)."""
    port = next(p for p in range(6700, 6900, 7) if not Path(tempfile.gettempdir(), f"ratray-ray-{p}").exists())
    env = {**os.environ, "PYTHON": sys.executable, "RATRAY_RAY_PORT": str(port), "HOME": str(tmp_path)}
    script = str(ROOT / "cluster" / "local.sh")
    r = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["up"] is False and info["port"] == port and info["auth"] == "token"
    r = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'start'" in r.stderr, r.stderr


def test_default_head_port_is_not_redis_port(tmp_path):
    """Ray's default GCS port 6379 is Redis's: `cluster/local.sh status` with no port chosen reports
    the head's default 6390, and `up` on a port something already holds (Redis, when it runs here)
    is refused in one line before anything starts."""
    assert localray.DEFAULT_PORT == 6390
    env = {k: v for k, v in os.environ.items() if k != "RATRAY_RAY_PORT"}
    env.update(PYTHON=sys.executable, HOME=str(tmp_path))
    r = subprocess.run([str(ROOT / "cluster" / "local.sh"), "status"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert json.loads(r.stdout)["port"] == 6390, r.stdout + r.stderr
    busy = 6379 if port_busy(6379) else None
    if busy is None:
        import socket
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
    lr = LocalRay(port=busy, temp_dir=tmp_path / "busy", extra_env={"HOME": str(tmp_path)})
    with pytest.raises(localray.ClusterError, match=rf"port {busy} \(GCS --port\) is already in use"):
        lr.up(num_cpus=1)
    assert not (tmp_path / "busy").exists()


def test_a_head_whose_gcs_died_without_fault_tolerance_is_reported_as_such(tmp_path):
    """A head's state whose GCS pid is gone while a process of the head (its marker) still runs:
    `status` is down and says the GCS died with nothing to restart it; `down` stops the rest."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    marker = "m" + os.urandom(8).hex()
    left = subprocess.Popen(["sleep", "60"], env={**os.environ, localray.MARKER_ENV: marker})
    lr = LocalRay(port=7010, temp_dir=tmp_path / "head")
    lr.make_state_dir()
    lr.state_path.write_text(json.dumps({"port": 7010, "dashboard_port": 9010, "auth": "token", "marker": marker,
                                         "sid": None, "started": time.time() - 1, "gcs_pid": gone.pid,
                                         "gcs_create_time": 0.0}))
    try:
        info = lr.status()
        assert info["up"] is False and info["processes"] == 1
        assert info["problem"].startswith(f"the GCS of this head (pid {gone.pid}) is gone while 1 of its processes")
        assert "without --gcs-ft nothing restarts it and the cluster's state is lost" in info["problem"]
        assert lr.down(grace=3, quiet=True) == 1 and left.wait(timeout=10) is not None
    finally:
        left.kill()


def _foreign(path: Path, monkeypatch) -> None:
    """Make `path` belong to another user: chown to nobody where we may (root), else make this
    process look like another user to the check."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        real = os.geteuid()
        monkeypatch.setattr(localray.os, "geteuid", lambda: real + 1)


@pytest.mark.parametrize("plant, error", [
    (lambda d, mp: _foreign(d, mp), r"belongs to uid \d+, not to you"),
    (lambda d, mp: d.chmod(0o777), r"is writable by others \(mode 0o777\)"),
    (lambda d, mp: d.chmod(0o770), r"is writable by others \(mode 0o770\)"),
], ids=["other-owner", "world-writable", "group-writable"])
def test_state_folder_planted_by_someone_else_is_refused(tmp_path, monkeypatch, plant, error):
    """The state folder lives under a world-writable temp dir: a folder (or a ratray_head.json
    telling `down` which processes to kill) planted there by another user is refused, not trusted."""
    state_dir = tmp_path / "ratray-ray-7000"
    state_dir.mkdir(mode=0o700)
    (state_dir / localray.STATE_FILE).write_text(json.dumps({"gcs_pid": 1, "dashboard_port": 1, "auth": "disabled"}))
    plant(state_dir, monkeypatch)
    with pytest.raises(localray.ClusterError, match=rf"state folder {state_dir} {error}"):
        LocalRay(port=7000, temp_dir=state_dir)


def test_state_folder_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "ratray-ray-7000").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(localray.ClusterError, match="is a symlink"):
        LocalRay(port=7000, temp_dir=tmp_path / "ratray-ray-7000")


def test_local_sh_refuses_a_world_writable_state_folder_in_one_line(tmp_path):
    port = next(p for p in range(7100, 7300, 7) if not Path(tempfile.gettempdir(), f"ratray-ray-{p}").exists())
    state_dir = Path(tempfile.gettempdir(), f"ratray-ray-{port}")
    state_dir.mkdir()
    try:
        state_dir.chmod(0o777)
        env = {**os.environ, "PYTHON": sys.executable, "RATRAY_RAY_PORT": str(port), "HOME": str(tmp_path)}
        r = subprocess.run([str(ROOT / "cluster" / "local.sh"), "status"], env=env, capture_output=True,
                           text=True, timeout=60)
    finally:
        shutil.rmtree(state_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"ratray: state folder {state_dir} is writable by others (mode 0o777): "
                                             f"remove it, or chmod go-w it if it is yours"]


def test_a_new_state_folder_is_private(tmp_path):
    lr = LocalRay(port=7000, temp_dir=tmp_path / "fresh")
    lr.make_state_dir()
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on; an IPv4-mapped IPv6 address
    (gRPC's ::ffff:127.0.0.1) as its IPv4 address."""
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                ip = ipaddress.ip_address(c.laddr.ip)
                out.add((str(getattr(ip, "ipv4_mapped", None) or ip), c.laddr.port))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("token_exists", [False, True], ids=["no-token-file", "token-file"])
def test_local_head_submit_and_down(tmp_path, token_exists):
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    if token_exists:
        token_file.parent.mkdir(parents=True)
        token_file.write_text("0123456789abcdef0123456789abcdef")
    port, dash = _free_ports(6410 if not token_exists else 6510)
    # Ray's unix socket paths must stay < 108 bytes: pytest's tmp_path is too deep for --temp-dir
    ray_tmp = tempfile.mkdtemp(prefix="ratray-t-", dir="/tmp")
    lr = LocalRay(port=port, dashboard_port=dash, temp_dir=ray_tmp, extra_env={"HOME": str(home)})
    try:
        addr = lr.up(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        assert addr == f"http://127.0.0.1:{dash}" and lr.is_up()
        assert lr.up(num_cpus=1) == addr  # idempotent: reuses the running head
        gcs_pid = lr.read_state()["gcs_pid"]
        # bound to the loopback interface: the GCS address and every listening socket of the head
        assert lr.gcs_address == f"127.0.0.1:{port}"
        listening = _listening(lr.processes())
        assert ("127.0.0.1", port) in listening and ("127.0.0.1", dash) in listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, sorted(listening)
        # policy: token auth always on; a token was generated only when missing
        assert token_file.is_file() and token_file.read_text().strip()
        if token_exists:
            assert token_file.read_text() == "0123456789abcdef0123456789abcdef"
        assert lr.env() == {"RAY_ADDRESS": addr, "RAY_API_SERVER_ADDRESS": addr,
                            "RAY_AUTH_MODE": "token"}
        # the job API refuses a request without the token ...
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(addr + "/api/jobs/", timeout=10)
        assert e.value.code == 401

        if token_exists:
            # ... and so does `ray job` without RAY_AUTH_MODE=token (the Ray default client mode);
            # with env() (RAY_AUTH_MODE=token) the CLI authenticates with the existing token file.
            # The job itself runs in the other case only (same code path; keeps the file < 90 s).
            ray = ray_exe(lr.python)
            env = {k: v for k, v in lr.base_env().items() if k != "RAY_AUTH_MODE"}
            r = subprocess.run([ray, "job", "list", f"--address={addr}"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "authentication token" in (r.stdout + r.stderr)
            r = subprocess.run([ray, "job", "list"], env={**lr.base_env(), **lr.env()},
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert lr.list_jobs() == []
        else:
            wd = tmp_path / "job"
            wd.mkdir()
            (wd / "hello.py").write_text(
                "import ray\nray.init()\nprint('RESOURCES', ray.cluster_resources())\n")
            out = io.StringIO()
            job_id, status = lr.submit(["python", "hello.py"], working_dir=wd, stream=out)
            assert status == "SUCCEEDED", out.getvalue()[-3000:]
            assert "RESOURCES" in out.getvalue()  # streamed
            logs = lr.job_logs(job_id)
            assert "RESOURCES" in logs and "'CPU': 1.0" in logs
            assert any(j["submission_id"] == job_id for j in lr.list_jobs())
    finally:
        pids = lr.processes()
        lr.down(grace=6.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert pids and gcs_pid in pids
    assert lr.processes() == [] and not lr.is_up()
    assert [p for p in pids if _running(p)] == []
    assert not port_busy(port) and not port_busy(dash)
    assert lr.down() == 0  # second down is a no-op


# A driver on the multi-node cluster: every node as the GCS lists it, where two named detached
# actors asking for index_node (they outlive the driver) and CPU tasks run (node names), as JSON.
NODES_PROBE = r'''
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
names = {n["NodeID"]: n["NodeName"] for n in ray.nodes()}

@ray.remote(num_cpus=0, resources={"index_node": 1})
class Shard:
    def node(self):
        return ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
def cpu_task():
    time.sleep(0.1)
    return ray.get_runtime_context().get_node_id()

shards = [Shard.options(name=f"shard-{i}", namespace="probe", lifetime="detached").remote() for i in range(2)]
print(json.dumps({"nodes": [{"name": n["NodeName"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                             "resources": {k: v for k, v in n["Resources"].items()
                                           if k in ("CPU", "GPU", "index_node")}} for n in ray.nodes()],
                  "shards": [names[n] for n in ray.get([s.node.remote() for s in shards])],
                  "cpu_tasks": sorted({names[n] for n in ray.get([cpu_task.remote() for _ in range(4)])})}))
'''


def test_nodes_spec_is_checked_against_the_manifest_groups_before_anything_starts(tmp_path):
    """--nodes names groups of k8s/base/ray/raycluster.yaml; sizes come from their rayStartParams
    (KubeRay's rule: the group's num-cpus wins over the pod's CPUs); a bad spec is refused by name."""
    nodes = localnodes.parse_nodes("train:2 index:2x2")
    assert [(n.name, n.group, n.cpus, n.num_cpus, n.resources) for n in nodes] == [
        ("train-0", "train", 2, 2, {}), ("index-0", "index", 2, 0, {"index_node": 2}),
        ("index-1", "index", 2, 0, {"index_node": 2})]
    (tmp_path / "nodes.yaml").write_text("nodes:\n  - {group: train, cpus: 1}\n  - {group: index, cpus: 4, count: 2}\n")
    assert [n.name for n in localnodes.parse_nodes(str(tmp_path / "nodes.yaml"))] == ["train-0", "index-0", "index-1"]
    for spec, says in (("gpu:2", "unknown group 'gpu'; the manifest raycluster.yaml has index, train"),
                       ("train", "'train' is not GROUP:CPUS"), ("index:1x0", "the count must be >= 1"),
                       ("", "no node given"), (str(tmp_path / "none.yaml"), "no such file")):
        with pytest.raises(localnodes.NodesError, match=re.escape(says)):
            localnodes.parse_nodes(spec)
    lr = LocalRay(port=7020, temp_dir=tmp_path / "head")
    with pytest.raises(localray.ClusterError, match="--num-cpus is the single-node head's"):
        lr.up(num_cpus=2, nodes="train:1")
    with pytest.raises(localray.ClusterError, match="unknown group 'gpu'"):
        lr.up(nodes="gpu:1")
    assert not (tmp_path / "head").exists()  # refused before anything started


@pytest.mark.slow
def test_local_cluster_with_nodes_places_shards_on_index_nodes_and_down_stops_every_process(tmp_path):
    """`up --nodes "train:1 index:1"`: a head with no CPUs, a train node with 1 CPU and an index
    node with index_node: 2 and no CPUs, all on 127.0.0.1 with token auth; actors asking for
    index_node land on the index node (and `status` lists them there), CPU tasks on the train
    node; `kill-node` kills one node's processes; `down` leaves none of anyone's."""
    home = tmp_path / "home"
    port, dash = _free_ports(6610)
    ray_tmp = tempfile.mkdtemp(prefix="ratray-n-", dir="/tmp")
    lr = LocalRay(port=port, dashboard_port=dash, temp_dir=ray_tmp, extra_env={"HOME": str(home)})
    pids: list[int] = []
    try:
        lr.up(nodes="train:1 index:1", object_store_memory=80 * 1024 * 1024)
        state = lr.read_state()
        pids = lr.processes() + [p for n in state["nodes"] for p in lr._members(n)]
        env = {**lr.base_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # as the head's drivers
        r = subprocess.run([sys.executable, "-c", NODES_PROBE, lr.gcs_address], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        nodes = {n["name"]: n for n in seen["nodes"]}
        assert set(nodes) == {"127.0.0.1", "train-0", "index-0"}  # the head keeps Ray's default name
        assert all(n["alive"] and n["ip"] == "127.0.0.1" for n in nodes.values())
        assert nodes["127.0.0.1"]["resources"] == {}  # the head schedules no work
        assert nodes["train-0"]["resources"] == {"CPU": 1.0}
        assert nodes["index-0"]["resources"] == {"index_node": 2.0}
        assert seen["shards"] == ["index-0", "index-0"] and seen["cpu_tasks"] == ["train-0"]
        # every node's sockets on the loopback interface only
        assert {ip for ip, _ in _listening(pids)} == {"127.0.0.1"}
        status = {n["name"]: n for n in lr.status()["nodes"]}
        assert status["index-0"]["state"] == "ALIVE" and status["index-0"]["raylet"]
        assert status["index-0"]["actors"] == ["shard-0", "shard-1"] and status["train-0"]["actors"] == []
        assert status["index-0"]["resources"] == {"index_node": 2} and status["train-0"]["num_cpus"] == 1
        # a lost node: its processes are gone, the rest of the cluster runs on
        assert lr.kill_node("index-0") > 0
        status = {n["name"]: n for n in lr.status()["nodes"]}
        assert status["index-0"]["processes"] == 0 and not status["index-0"]["raylet"]
        assert status["train-0"]["raylet"] and lr.is_up()
    finally:
        lr.down(grace=6.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(pids) > 10 and [p for p in pids if _running(p)] == []
    assert not port_busy(port) and not port_busy(dash) and lr.down() == 0
