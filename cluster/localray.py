"""A local Ray head for `make demo` and the README — alone, or with worker nodes shaped like the
KubeRay groups (a multi-node cluster on one host): start it, submit jobs, stop it.

    cluster/local.sh up [--num-cpus 2] [--port 6390] [--dashboard-port 8265] [--gcs-ft]
    cluster/local.sh up --nodes "train:2 index:2x2"      # or --nodes nodes.yaml (cluster/localnodes.py)
    cluster/local.sh submit [--working-dir .] [--no-wait] -- python jobs/x.py --flag
    cluster/local.sh status | env | logs JOB_ID | kill-node NAME | down
    (cluster/local.sh runs this file with .venv/bin/python; it is tooling, not part of the
    ratray package, and imports nothing from it)

What this does on `up` (facts verified on Ray 2.60, see tests/test_cluster_local.py):

- Runs ``ray start --head`` in its own session (``setsid``), with ``--temp-dir
  /tmp/ratray-ray-<port>/ray``. The private temp dir means the head's address is written to
  ``/tmp/ratray-ray-<port>/ray/ray_current_cluster`` and *not* ``/tmp/ray/ray_current_cluster``, so a
  plain ``ray.init()`` elsewhere on the machine (the test suite, someone else's run) keeps starting
  its own local Ray instead of attaching to this head (which would fail: passing ``num_cpus`` to an
  existing cluster raises).
- Ports: GCS ``port``, dashboard/job API ``dashboard_port`` on 127.0.0.1, Ray client server
  ``port+1``, dashboard agent HTTP ``port+2`` (Ray's defaults 10001/52365 are shared by every
  local Ray, and 10001 can't be used anyway next to the default worker-port range 10002-19999);
  all other ports are picked free by Ray. Two heads with ports ≥ 3 apart never clash.
- Binding: the head listens on **127.0.0.1 only** — the dashboard/job API
  (``--dashboard-host=127.0.0.1``) and the GCS, raylet, object manager, client server and agents,
  which bind the node IP when it is 127.0.0.1 (``--node-ip-address=127.0.0.1``). Ray rewrites a
  loopback node IP to the machine's address (``resolve_ip_for_localhost``) unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` — Ray's own switch for a single-machine cluster, whose
  only other effect is that no other node may join — so the head runs with it. Nothing on the
  network reaches the head; tests/test_cluster_local.py lists its listening sockets. Still:
- **Auth policy: the local head always runs with token auth** (``RAY_AUTH_MODE=token``). If no
  token is available (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``$HOME/.ray/auth_token``),
  ``up`` creates one with ``ray get-auth-token --generate`` (the standard file, the same one a
  plain ``ray.init()`` writes). ``env()`` exports ``RAY_AUTH_MODE=token`` so ``ray job submit``
  sends it. Why explicit: Ray turns auth on by itself in ``ray start`` only when a token file
  already exists, and then a ``ray job submit`` without ``RAY_AUTH_MODE=token`` fails with
  "Missing authentication token"; with no token file it silently starts an unauthenticated head
  whose GCS is reachable from the network. Pinning the mode makes both machines behave the same.
  ``auth="disabled"`` (``--auth disabled``) is the explicit opt-out (exports
  ``RAY_AUTH_MODE=disabled``, which also stops Ray from auto-enabling auth from a token file).
- The head's processes inherit ``PATH`` with this interpreter's ``bin`` first, so ``python`` in a
  job entrypoint is the project venv's python (otherwise it is whatever ``python`` the shell that
  ran ``ray start`` finds — a bare system python without ray when the venv was not activated).
- Every head process carries ``RATRAY_LOCAL_RAY=<marker>`` in its environment. ``down`` stops
  exactly: processes in the head's session, processes with that marker (job drivers call
  ``setsid`` but keep the environment), and their descendants — raylet first, then the rest, then
  the GCS (``ray stop``'s order), SIGKILL after a grace period. It never runs ``ray stop``, which
  kills *every* Ray process on the machine.
- State (ports, pids, marker, auth) lives in ``/tmp/ratray-ray-<port>/ratray_head.json``; ``up`` is
  idempotent (a live head it started is reused) and a stale state file is replaced. The folder sits
  in a world-writable temp dir, and its state file says which processes ``down`` kills: a folder
  that is a symlink, belongs to another user or is writable by group or others is refused
  (ClusterError), never read; ``up`` creates it with mode 0700. Ray's temp dir is its subfolder
  ``ray`` (Ray makes that one mode 0777 for other users' drivers: the 0700 folder around it keeps
  them out).

- ``--gcs-ft [REDIS]`` (``up(gcs_ft="host:port")``): the GCS keeps its state in Redis under a
  namespace of this head, a keeper restarts it when it dies, ``down`` deletes the namespace's keys
  (cluster/gcsft.py). The default port 6390 keeps the head off Redis's 6379.

- ``--nodes SPEC`` (``up(nodes=...)``): a head that schedules no work (the KubeRay head's
  ``num-cpus: "0"``) plus worker nodes on this host, each a ``ray start --address`` of its own with
  the ``--num-cpus`` and ``--resources`` of its group in k8s/base/ray/raycluster.yaml (index nodes:
  ``index_node: 2``, no CPUs), bound to 127.0.0.1, token auth like the head, Ray temp dir
  ``<state folder>/<node name>``, its own session and marker (cluster/localnodes.py: the spec, and
  why a node's ``ray start`` runs through that file). The state lists them; ``status`` shows each
  node's processes and the GCS's view of it; ``kill-node NAME`` SIGKILLs one node (raylet first:
  a lost pod); ``down`` stops the nodes, then the head.

``up`` returns the job-submission address ``http://127.0.0.1:<dashboard_port>``; ``gcs_address``
is ``<node ip>:<port>`` for ``ray.init(address=...)``. Don't export ``env()`` into a shell where
you then run ``ray.init()`` directly: the job API address in RAY_ADDRESS is not a GCS address.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gcsft  # noqa: E402  (cluster/gcsft.py: the GCS state in Redis, the GCS keeper)
import localnodes  # noqa: E402  (cluster/localnodes.py: worker nodes shaped like the KubeRay groups)

MARKER_ENV = "RATRAY_LOCAL_RAY"
STATE_FILE = "ratray_head.json"
# Ray's own default GCS port 6379 is Redis's port: the project's machines run Redis there (and the
# GCS fault-tolerance option stores the head's state in it), so the local head defaults to 6390.
DEFAULT_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8265
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray puts sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store and AF_UNIX
# paths are limited to 107 bytes: the session part takes ~62, so keep the temp dir short.
MAX_TEMP_DIR_CHARS = 44


class ClusterError(RuntimeError):
    """The local head could not be started, reached or stopped."""


def ray_exe(python: str) -> str:
    """The `ray` CLI of the interpreter `python` (its venv's bin), else the first on PATH."""
    exe = Path(python).with_name("ray")
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise ClusterError(f"no `ray` executable next to {python} or on PATH")
    return found


def port_busy(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _alive(pid: int, create_time: float | None = None) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def _name(p) -> str:
    """A psutil process's name, "" once it is gone."""
    import psutil

    try:
        return p.name()
    except psutil.Error:
        return ""


def _signal(procs, sig: int) -> None:
    """Send `sig` to each psutil process that is still there."""
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def check_state_dir(path: Path) -> None:
    """ClusterError unless `path` is absent or a real folder of this user that nobody else may
    write: it lies in a world-writable temp dir, and its state file decides what `down` kills."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ClusterError(f"state folder {path} is a symlink or not a folder: remove it")
    if st.st_uid != os.geteuid():
        raise ClusterError(f"state folder {path} belongs to uid {st.st_uid}, not to you "
                           f"(uid {os.geteuid()}): someone else made it; remove it or use another --port")
    if st.st_mode & 0o022:
        raise ClusterError(f"state folder {path} is writable by others (mode {oct(st.st_mode & 0o777)}): "
                           f"remove it, or chmod go-w it if it is yours")


class LocalRay:
    """One local Ray head started (and stopped) by ratray. See the module docstring."""

    def __init__(self, port: int = DEFAULT_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT,
                 temp_dir: str | os.PathLike | None = None, auth: str = "token",
                 python: str | None = None, extra_env: dict[str, str] | None = None):
        if auth not in ("token", "disabled"):
            raise ValueError(f"auth must be token|disabled, got {auth!r}")
        self.auth = auth
        self.python = python or sys.executable
        self.extra_env = dict(extra_env or {})
        self._temp_dir_arg = temp_dir
        self._configure(port, dashboard_port)

    def _configure(self, port: int, dashboard_port: int) -> None:
        self.port = int(port)
        self.dashboard_port = int(dashboard_port)
        self.temp_dir = Path(self._temp_dir_arg or Path(tempfile.gettempdir()) / f"ratray-ray-{self.port}")
        check_state_dir(self.temp_dir)
        state = self.read_state()
        if state:  # a head already started on this port decides the ports/auth
            self.dashboard_port = state["dashboard_port"]
            self.auth = state["auth"]

    # -- addresses / environment --------------------------------------------------------------
    @property
    def address(self) -> str:
        """Job-submission (dashboard) address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str | None:
        state = self.read_state()
        return state.get("gcs_address") if state else None

    @property
    def ray_dir(self) -> Path:
        """Ray's --temp-dir (sessions, logs, sockets): inside the private state folder."""
        return self.temp_dir / "ray"

    @property
    def state_path(self) -> Path:
        return self.temp_dir / STATE_FILE

    def env(self) -> dict[str, str]:
        """What `ray job submit`/`ray job logs` need to reach this head."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.address,
                "RAY_AUTH_MODE": self.auth}

    def base_env(self) -> dict[str, str]:
        """The environment every command for this head runs with: ours, `extra_env`, the auth mode."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env["RAY_AUTH_MODE"] = self.auth
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        return env

    def _token(self) -> str | None:
        env = self.base_env()
        if env.get("RAY_AUTH_TOKEN", "").strip():
            return env["RAY_AUTH_TOKEN"].strip()
        candidates = []
        if env.get("RAY_AUTH_TOKEN_PATH"):
            candidates.append(Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser())
        home = env.get("HOME") or str(Path.home())
        candidates.append(Path(home) / ".ray" / "auth_token")
        for c in candidates:
            if c.is_file() and c.read_text().strip():
                return c.read_text().strip()
        return None

    def ensure_token(self) -> bool:
        """Create ``$HOME/.ray/auth_token`` via ``ray get-auth-token --generate`` if no token is
        available. Returns True when it generated one."""
        if self._token():
            return False
        r = subprocess.run([ray_exe(self.python), "get-auth-token", "--generate"],
                           env=self.base_env(), capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not self._token():
            raise ClusterError(f"`ray get-auth-token --generate` failed: {r.stderr.strip()[-2000:]}")
        return True

    # -- state --------------------------------------------------------------------------------
    def make_state_dir(self) -> None:
        """Create the state folder private to this user (0700), or check the one that exists."""
        self.temp_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.temp_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        check_state_dir(self.temp_dir)

    def read_state(self) -> dict | None:
        """The state file `up` wrote (ports, pids, marker, auth), None when there is none."""
        check_state_dir(self.temp_dir)
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def is_up(self) -> bool:
        state = self.read_state()
        return bool(state) and _alive(state["gcs_pid"], state.get("gcs_create_time"))

    # -- up -----------------------------------------------------------------------------------
    def up(self, num_cpus: int | None = None, dashboard_port: int | None = None, port: int | None = None,
           object_store_memory: int | None = None, num_gpus: int | None = None,
           timeout: float = 120.0, quiet: bool = False, gcs_ft: str | None = None,
           nodes: str | None = None) -> str:
        """Start the head (or reuse the one this class started); returns the job API address.
        ``gcs_ft="host:port"``: the GCS keeps its state in that Redis and a keeper restarts it
        when it dies (cluster/gcsft.py). ``nodes="train:2 index:2"`` (or a file): worker nodes
        shaped like the KubeRay groups, and a head that schedules no work (cluster/localnodes.py);
        ``num_cpus`` (default 2) is the single-node head's."""
        if port is not None and int(port) != self.port:
            self._configure(port, dashboard_port or self.dashboard_port)
        specs, num_cpus = self._node_specs(nodes, num_cpus)
        if self.is_up():
            have = [(n["name"], n["cpus"]) for n in (self.read_state() or {}).get("nodes", [])]
            if nodes is not None and have != [(n.name, n.cpus) for n in specs]:
                raise ClusterError(f"a local Ray head is already up on port {self.port} with nodes "
                                   f"{have or 'none'}: run `down` first to start other nodes")
            if not quiet:
                print(f"ratray: reusing the local Ray head on port {self.port} ({self.address})",
                      file=sys.stderr)
            return self.address
        if dashboard_port is not None:
            self.dashboard_port = int(dashboard_port)
        if self.state_path.exists():  # stale: its processes are gone
            self._stop_processes(self.read_state() or {}, grace=5.0)
            self.state_path.unlink(missing_ok=True)

        client_port, agent_port = self.port + 1, self.port + 2
        for what, p in (("GCS --port", self.port), ("--dashboard-port", self.dashboard_port),
                        ("ray client server (port+1)", client_port),
                        ("dashboard agent (port+2)", agent_port)):
            if port_busy(p):
                raise ClusterError(f"port {p} ({what}) is already in use by another process: "
                                   "choose other --port/--dashboard-port")
        if len(str(self.ray_dir.resolve())) > MAX_TEMP_DIR_CHARS:
            raise ClusterError(f"Ray's temp dir {self.ray_dir} is too long for its unix sockets "
                               f"(AF_UNIX paths ≤ 107 bytes incl. session_*/sockets/plasma_store): "
                               f"use a temp dir of ≤ {MAX_TEMP_DIR_CHARS - 4} characters, e.g. "
                               f"/tmp/ratray-ray-{self.port}")
        generated = self.ensure_token() if self.auth == "token" else False

        self.make_state_dir()
        marker = uuid.uuid4().hex
        env = self.base_env()
        env[MARKER_ENV] = marker
        env["PATH"] = str(Path(self.python).parent) + os.pathsep + env.get("PATH", "")
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps the node IP 127.0.0.1 (docstring)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        cmd = [ray_exe(self.python), "start", "--head", f"--num-cpus={int(num_cpus)}",
               f"--port={self.port}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
               f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={self.ray_dir}",
               "--disable-usage-stats"]
        ft = gcsft.ft_env(gcs_ft, self.port) if gcs_ft else {}
        env.update(ft)
        cmd += gcsft.ft_args() if gcs_ft else []
        if object_store_memory:
            cmd.append(f"--object-store-memory={int(object_store_memory)}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={int(num_gpus)}")
        log_path = self.temp_dir / "ratray_ray_start.log"
        t0 = time.time()
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = None
        state = {"port": self.port, "dashboard_port": self.dashboard_port, "auth": self.auth,
                 "marker": marker, "sid": proc.pid, "temp_dir": str(self.temp_dir),
                 "python": self.python, "started": t0}
        if gcs_ft:
            state["gcs_ft"] = {"redis": gcs_ft, "namespace": ft["RAY_external_storage_namespace"]}
        if rc != 0:
            self._stop_processes(state, grace=5.0)
            if gcs_ft:  # the GCS may have written its tables before `ray start` failed
                gcsft.cleanup(gcs_ft, ft["RAY_external_storage_namespace"])
            tail = log_path.read_text()[-3000:]
            raise ClusterError(f"`ray start --head` failed (rc={rc}); log {log_path}:\n{tail}")
        gcs = self._find(state, "gcs_server")
        if not gcs:
            self._stop_processes(state, grace=5.0)
            raise ClusterError(f"`ray start` returned but no gcs_server of this head is running; see {log_path}")
        state.update(gcs_pid=gcs.pid, gcs_create_time=gcs.create_time(),
                     gcs_address=(Path(self.ray_dir, "ray_current_cluster").read_text().strip()
                                  if Path(self.ray_dir, "ray_current_cluster").exists() else None))
        if gcs_ft:
            state["gcs_snapshot"] = gcsft.snapshot(gcs)
        self.state_path.write_text(json.dumps(state, indent=1))
        if gcs_ft:  # the keeper carries the marker: `down` stops it (before the GCS)
            subprocess.Popen([self.python, str(Path(gcsft.__file__).resolve()), str(self.state_path)], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self._wait_http(deadline=t0 + timeout)
        if specs:
            self._start_nodes(state, specs, env, object_store_memory, deadline=time.time() + timeout)
        if not quiet:
            print(f"ratray: local Ray head up in {time.time() - t0:.1f}s: job API {self.address}, "
                  f"GCS {state['gcs_address']}, auth={self.auth}"
                  + (f", GCS state in Redis {gcs_ft} (namespace {state['gcs_ft']['namespace']})" if gcs_ft else "")
                  + (f", nodes {', '.join(f'{n.name} (CPU {n.num_cpus}, {n.resources or {}})' for n in specs)}"
                     if specs else "")
                  + (" (generated $HOME/.ray/auth_token)" if generated else ""), file=sys.stderr)
        return self.address

    # -- worker nodes (cluster/localnodes.py) -------------------------------------------------
    def _node_specs(self, nodes: str | None, num_cpus: int | None) -> tuple[list, int]:
        """The worker nodes asked for and the head's CPUs, checked before anything starts."""
        if nodes is None:
            return [], 2 if num_cpus is None else int(num_cpus)
        if num_cpus is not None:
            raise ClusterError("--num-cpus is the single-node head's: with --nodes the head schedules "
                               "no work (the KubeRay head's num-cpus) and the nodes' CPUs come from --nodes")
        try:
            groups = localnodes.manifest_groups()
            specs = localnodes.parse_nodes(nodes, groups)
        except localnodes.NodesError as e:
            raise ClusterError(str(e)) from None
        longest = max((self.temp_dir.resolve() / n.name for n in specs), key=lambda p: len(str(p)))
        if len(str(longest)) > MAX_TEMP_DIR_CHARS:
            raise ClusterError(f"node temp dir {longest} is too long for Ray's unix sockets (≤ "
                               f"{MAX_TEMP_DIR_CHARS} characters): use a shorter state folder")
        return specs, int(groups["head"].get("num-cpus", 0))

    def _start_nodes(self, state: dict, specs: list, env: dict, object_store_memory: int | None,
                     deadline: float) -> None:
        """Start the worker nodes (a node whose `ray start` failed gets one more try: Ray gives a
        node 30 s to register, which a busy host can miss), record them in the state, wait until
        the GCS lists them alive; on any failure stop everything `up` started, raise ClusterError."""
        node_env = {k: v for k, v in env.items() if k != MARKER_ENV}

        def start(todo: list) -> tuple[list, list]:
            return localnodes.start_nodes(todo, state["gcs_address"], self.temp_dir, node_env, self.python,
                                          MARKER_ENV, object_store_memory, timeout=max(10.0, deadline - time.time()))
        entries, failed = start(specs)
        if failed:
            again = [n for n in specs if any(e["name"] == n.name for e in failed)]
            for e in failed:
                self._stop_processes(e, grace=3.0)
            retried, failed = start(again)
            by_name = {e["name"]: e for e in retried}
            entries = [by_name.get(e["name"], e) for e in entries]
        state["nodes"] = entries
        self.state_path.write_text(json.dumps(state, indent=1))
        failed = [e["error"] for e in failed]
        missing = [n.name for n in specs]
        while not failed and time.time() < deadline:
            alive = {n.get("node_name") for n in self.ray_nodes() if n.get("state") == "ALIVE"}
            missing = [n.name for n in specs if n.name not in alive]
            if not missing:
                return
            time.sleep(0.5)
        self.down(quiet=True)
        raise ClusterError("; ".join(failed) or f"nodes {missing} did not join the head in time")

    def ray_nodes(self) -> list[dict]:
        """The cluster's nodes as the GCS sees them (Ray's state API: node_name, state, resources)."""
        return self._state_api("nodes", "detail=true")

    def _state_api(self, what: str, query: str = "") -> list[dict]:
        """One listing of Ray's state API (`nodes`, `actors`); [] when the head does not answer."""
        try:
            data = self._request(f"/api/v0/{what}?limit=10000&{query}", timeout=10)
        except (OSError, ValueError):
            return []
        return (((data or {}).get("data") or {}).get("result") or {}).get("result") or []

    def kill_node(self, name: str) -> int:
        """SIGKILL one worker node's processes, raylet first (a lost pod); returns how many."""
        import psutil

        state = self.read_state() or {}
        node = next((n for n in state.get("nodes", []) if n["name"] == name), None)
        if node is None:
            raise ClusterError(f"no node {name!r} in the local Ray head on port {self.port}; it has "
                               f"{[n['name'] for n in state.get('nodes', [])] or 'no nodes'}")
        procs = sorted(self._members(node).values(), key=lambda p: _name(p) != "raylet")
        _signal(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=5)
        return len(procs)

    # -- HTTP job API -------------------------------------------------------------------------
    def _request(self, path: str, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(self.address + path)
        token = self._token() if self.auth == "token" else None
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
        return json.loads(body) if body else None

    def _wait_http(self, deadline: float) -> None:
        last: Exception | None = None
        while time.time() < deadline:
            try:
                self._request("/api/version", timeout=3)
                return
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise ClusterError(f"the job API at {self.address} refused our token ({e.code})") from e
                last = e
            except (OSError, ValueError) as e:
                last = e
            time.sleep(0.5)
        raise ClusterError(f"the job API at {self.address} did not answer: {last}")

    def job_info(self, job_id: str) -> dict:
        return self._request(f"/api/jobs/{job_id}")

    def job_status(self, job_id: str) -> str:
        return str(self.job_info(job_id).get("status"))

    def job_logs(self, job_id: str) -> str:
        return (self._request(f"/api/jobs/{job_id}/logs") or {}).get("logs", "")

    def list_jobs(self) -> list[dict]:
        return self._request("/api/jobs/") or []

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> str:
        deadline = time.time() + timeout
        while True:
            status = self.job_status(job_id)
            if status in TERMINAL or time.time() > deadline:
                return status
            time.sleep(poll)

    # -- submit -------------------------------------------------------------------------------
    def submit(self, entrypoint: list[str], working_dir: str | os.PathLike = ".",
               runtime_env: dict | None = None, follow: bool = True,
               submission_id: str | None = None, stream=None) -> tuple[str, str]:
        """``ray job submit`` the entrypoint. With ``follow`` the job's logs stream to ``stream``
        (default stdout) until it ends. Returns ``(job_id, status)`` where status is Ray's job
        status: SUCCEEDED | FAILED | STOPPED (or PENDING/RUNNING when ``follow=False``)."""
        if not entrypoint:
            raise ValueError("entrypoint must be a non-empty command list")
        if not self.is_up():
            raise ClusterError(f"no local Ray head started by ratray on port {self.port}: run `up` first")
        job_id = submission_id or f"ratray_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
        cmd = [ray_exe(self.python), "job", "submit", f"--address={self.address}",
               f"--submission-id={job_id}", f"--working-dir={Path(working_dir).resolve()}"]
        if runtime_env:
            cmd.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        if not follow:
            cmd.append("--no-wait")
        cmd += ["--", *[str(a) for a in entrypoint]]
        env = self.base_env()
        env.update(self.env())
        out = stream or sys.stdout
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line])[-40:]
        rc = proc.wait()
        try:
            status = self.wait(job_id, timeout=30, poll=0.5) if follow else self.job_status(job_id)
        except urllib.error.HTTPError as e:
            if e.code == 404 and rc != 0:
                raise ClusterError(f"`ray job submit` failed (rc={rc}):\n{''.join(tail)}") from e
            raise
        return job_id, status

    # -- down ---------------------------------------------------------------------------------
    def _members(self, state: dict) -> dict:
        import psutil

        sid, marker = state.get("sid"), state.get("marker")
        started = float(state.get("started", 0)) - 5.0  # `ray start` began at state["started"]
        out: dict[int, Any] = {}
        me = os.getpid()
        for p in psutil.process_iter(["pid", "name", "create_time"]):
            if p.pid == me:
                continue
            try:
                # session members created before this head existed are someone else's (pid reuse)
                hit = (sid is not None and os.getsid(p.pid) == sid
                       and (p.info["create_time"] or 0) >= started)
                if not hit and marker:
                    try:
                        hit = p.environ().get(MARKER_ENV) == marker
                    except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
                        hit = False
                if hit:
                    out[p.pid] = p
                    for c in p.children(recursive=True):
                        out.setdefault(c.pid, c)
            except (psutil.Error, OSError):
                continue
        return {pid: p for pid, p in out.items() if pid != me and _alive(pid)}

    def _find(self, state: dict, name: str):
        for p in self._members(state).values():
            try:
                if p.name() == name:
                    return p
            except Exception:
                pass
        return None

    def processes(self) -> list[int]:
        """Pids of the running processes of the head this class started (empty when down)."""
        state = self.read_state()
        return sorted(self._members(state)) if state else []

    def _stop_processes(self, state: dict, grace: float = 10.0) -> int:
        import psutil

        procs = self._members(state)
        if not procs:
            return 0

        raylets = [p for p in procs.values() if _name(p) == "raylet"]
        gcs = [p for p in procs.values() if _name(p) == "gcs_server"]
        rest = [p for p in procs.values() if p not in raylets and p not in gcs]
        for bucket in (raylets, rest, gcs):
            _signal(bucket, signal.SIGTERM)
            _, alive = psutil.wait_procs(bucket, timeout=grace / 3)
            _signal(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=2)
        _signal(self._members(state).values(), signal.SIGKILL)  # spawned meanwhile (a dying raylet's worker)
        return len(procs)

    def down(self, grace: float = 10.0, quiet: bool = False) -> int:
        """Stop only the head this class started; returns how many processes were stopped."""
        state = self.read_state()
        if not state:
            if not quiet:
                print(f"ratray: no local Ray head started by ratray on port {self.port}", file=sys.stderr)
            return 0
        t0 = time.time()
        n = sum(self._stop_processes(node, grace=grace) for node in state.get("nodes", []))
        n += self._stop_processes(state, grace=grace)
        self.state_path.unlink(missing_ok=True)
        if state.get("gcs_ft"):  # the head is gone: its namespace's keys go too
            gcsft.cleanup(state["gcs_ft"]["redis"], state["gcs_ft"]["namespace"])
        if not quiet:
            print(f"ratray: stopped {n} processes of the local Ray head on port {self.port} "
                  f"in {time.time() - t0:.1f}s", file=sys.stderr)
        return n

    def status(self) -> dict:
        state = self.read_state() or {}
        up = self.is_up()
        info = {"up": up, "port": self.port, "address": self.address if up else None,
                "gcs_address": state.get("gcs_address") if up else None, "auth": self.auth,
                "temp_dir": str(self.temp_dir), "processes": len(self.processes()) if state else 0,
                "gcs_ft": state.get("gcs_ft"), "gcs_restarts": len(state.get("gcs_restarts", []))}
        if state and not up and info["processes"]:
            info["problem"] = (f"the GCS of this head (pid {state.get('gcs_pid')}) is gone while "
                               f"{info['processes']} of its processes still run: "
                               + ("its keeper has not restarted it (yet)" if state.get("gcs_ft") else
                                  "without --gcs-ft nothing restarts it and the cluster's state is lost "
                                  "(the raylet exits after RAY_gcs_rpc_server_reconnect_timeout_s, 60 s)")
                               + "; `down` stops the rest")
        if up:
            try:
                info["jobs"] = [{"id": j.get("submission_id"), "status": j.get("status"),
                                 "entrypoint": j.get("entrypoint")} for j in self.list_jobs()]
            except (OSError, ValueError) as e:
                info["jobs_error"] = str(e)
        if state.get("nodes"):
            info["nodes"] = self.node_status(state, up)
        return info

    def node_status(self, state: dict, up: bool) -> list[dict]:
        """Each worker node `up` started: its group and Ray resources, how many of its processes
        run, whether its raylet does, the GCS's view of it (ALIVE / DEAD) and its live actors
        (their names, else classes: which index node holds which shard)."""
        seen = {n.get("node_name"): n for n in self.ray_nodes()} if up else {}
        actors: dict[str, list[str]] = {}
        for a in self._state_api("actors", "filter_keys=state&filter_predicates=%3D&filter_values=ALIVE") if up else []:
            actors.setdefault(a.get("node_id"), []).append(a.get("name") or a.get("class_name"))
        out = []
        for node in state["nodes"]:
            procs = self._members(node).values()
            ray_view = seen.get(node["name"], {})
            out.append({"name": node["name"], "group": node["group"], "cpus": node["cpus"],
                        "num_cpus": node["num_cpus"], "resources": node["resources"],
                        "processes": len(procs), "raylet": any(_name(p) == "raylet" for p in procs),
                        "state": ray_view.get("state"), "node_ip": ray_view.get("node_ip"),
                        "node_id": ray_view.get("node_id"),
                        "actors": sorted(actors.get(ray_view.get("node_id"), []))})
        return out


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entry: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, entry = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="cluster/local.sh",
                                 description="A local single-node Ray head (see module docstring).")
    ap.add_argument("command", choices=["up", "down", "status", "submit", "env", "logs", "kill-node"])
    ap.add_argument("job_id", nargs="?", help="JOB_ID for `logs`, a node's NAME for `kill-node`")
    ap.add_argument("--port", type=int, default=int(os.environ.get("RATRAY_RAY_PORT", DEFAULT_PORT)))
    ap.add_argument("--dashboard-port", type=int,
                    default=int(os.environ.get("RATRAY_RAY_DASHBOARD_PORT", DEFAULT_DASHBOARD_PORT)))
    ap.add_argument("--num-cpus", type=int, default=None, help="the single-node head's CPUs (default 2)")
    ap.add_argument("--nodes", default=None, metavar="SPEC|FILE",
                    help='up: worker nodes as the KubeRay groups, e.g. "train:2 index:2x2" '
                    "(GROUP:CPUS[xCOUNT]) or a YAML/JSON file; the head then schedules no work")
    ap.add_argument("--object-store-memory", type=int, default=None, help="bytes")
    ap.add_argument("--auth", choices=["token", "disabled"], default=os.environ.get("RATRAY_RAY_AUTH", "token"))
    ap.add_argument("--gcs-ft", nargs="?", const=os.environ.get("RATRAY_REDIS_ADDRESS", "127.0.0.1:6379"),
                    default=None, metavar="REDIS", help="up: GCS state in Redis host:port (default "
                    "$RATRAY_REDIS_ADDRESS or 127.0.0.1:6379), GCS restarted when it dies")
    ap.add_argument("--working-dir", default=".")
    ap.add_argument("--runtime-env-json", default=None)
    ap.add_argument("--no-wait", action="store_true")
    args = ap.parse_args(argv)

    try:
        lr = LocalRay(port=args.port, dashboard_port=args.dashboard_port, auth=args.auth)
        if args.command == "up":
            print(lr.up(num_cpus=args.num_cpus, object_store_memory=args.object_store_memory, gcs_ft=args.gcs_ft,
                        nodes=args.nodes))
            return 0
        if args.command == "kill-node":
            if not args.job_id:
                ap.error("kill-node needs a node name (see `status`)")
            print(f"ratray: killed {lr.kill_node(args.job_id)} processes of node {args.job_id}", file=sys.stderr)
            return 0
        if args.command == "down":
            lr.down()
            return 0
        if args.command == "env":
            for k, v in lr.env().items():
                print(f"export {k}={v}")
            return 0
        if args.command == "status":
            info = lr.status()
            print(json.dumps(info, indent=1))
            return 0 if info["up"] else 3
        if args.command == "logs":
            if not args.job_id:
                ap.error("logs needs a job id")
            sys.stdout.write(lr.job_logs(args.job_id))
            return 0
        # submit
        if not entry:
            ap.error("submit needs an entrypoint after `--`, e.g. submit -- python jobs/x.py")
        runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
        job_id, status = lr.submit(entry, working_dir=args.working_dir, runtime_env=runtime_env,
                                   follow=not args.no_wait)
        print(f"ratray: job {job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" or (args.no_wait and status not in ("FAILED", "STOPPED")) else 1
    except ClusterError as e:
        print(f"ratray: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
