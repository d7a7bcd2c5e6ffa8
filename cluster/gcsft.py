"""GCS fault tolerance for the local Ray head (``cluster/local.sh up --gcs-ft``): its GCS state in Redis.

What KubeRay's ``gcsFaultToleranceOptions`` does on Kubernetes, done for one local head
(facts from Ray 2.60's "GCS Fault Tolerance" docs, checked on this machine):

- ``ray start --head`` runs with ``RAY_REDIS_ADDRESS=host:port`` (and ``--redis-password`` when
  ``$RATRAY_REDIS_PASSWORD`` is set) and ``RAY_external_storage_namespace=<ns>``: the GCS writes
  its tables to Redis under keys ``RAY<ns>@<TABLE>`` (``RAY<ns>@KV``, ``RAY<ns>@NODE``, ...). The
  namespace is ``ratray-<port>-<8 hex>``, one per head, so heads sharing a Redis never mix, and
  ``down`` deletes exactly that namespace's keys (Ray's ``cleanup_redis_storage``).
- Who restarts the GCS: on Kubernetes the head pod's restart; here a keeper process
  (``localray.py keep-gcs``, carrying the head's marker so ``down`` stops it before the GCS).
  It polls the gcs_server every 0.2 s and, when it is gone, starts it again with the same command
  line, environment and log files; the new GCS reloads the cluster's state from Redis, and the
  raylet, workers and actors reconnect (they wait up to ``RAY_gcs_rpc_server_reconnect_timeout_s``,
  60 s by default). ``$RATRAY_GCS_RESTART_DELAY_S`` (chaos runs only, default 0) makes the keeper
  wait that long before the restart, as a Kubernetes head pod takes a while to come back. Each
  restart is appended to the head's state (``gcs_restarts``: when the GCS was found dead, when it
  was started again, its new pid) and ``gcs_pid`` follows the new process.
- During the recovery running tasks and actors keep working; actor creation, placement groups and
  new worker processes wait for the GCS (Ray docs).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

POLL_S = 0.2

# A driver measuring what a GCS kill does to a running job: two named detached actors (namespace
# "ft") called every 20 ms for argv[2] seconds; each call records [start, end, answers, duration of
# a GCS request (ray.nodes()) made right after]. Prints READY once the actors answer, then CALLS <json>.
PROBE = r'''
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

actors = [Counter.options(name=f"shard{i}", namespace="ft", lifetime="detached").remote() for i in range(2)]
ray.get([a.incr.remote() for a in actors])
print("READY", flush=True)
calls, t_end = [], time.time() + float(sys.argv[2])
while time.time() < t_end:
    t0 = time.time()
    got = ray.get([a.incr.remote() for a in actors], timeout=90)
    t1 = time.time()
    assert ray.nodes()[0]["Alive"]  # a GCS request (GetAllNodeInfo): waits while the GCS is down
    calls.append([t0, t1, got, time.time() - t1])
    time.sleep(0.02)
print("CALLS " + json.dumps(calls), flush=True)
'''


def ft_env(redis: str, port: int) -> dict[str, str]:
    """The environment that puts a head's GCS state in Redis at ``redis`` (host:port)."""
    host, _, rport = redis.rpartition(":")
    if not host or not rport.isdigit():
        raise ValueError(f"--gcs-ft needs a Redis address host:port, got {redis!r}")
    return {"RAY_REDIS_ADDRESS": redis,
            "RAY_external_storage_namespace": f"ratray-{port}-{uuid.uuid4().hex[:8]}"}


def ft_args() -> list[str]:
    """Extra ``ray start`` arguments: the Redis password, when one is set."""
    pw = os.environ.get("RATRAY_REDIS_PASSWORD", "")
    return ["--redis-password", pw, "--redis-username", "default"] if pw else []


def redis_keys(redis: str, namespace: str) -> list[str]:
    """The keys a head with this namespace holds in Redis (``redis-cli --scan``)."""
    host, _, port = redis.rpartition(":")
    cmd = ["redis-cli", "-h", host, "-p", port, "--scan", "--pattern", f"RAY{namespace}@*"]
    env = {**os.environ}
    if os.environ.get("RATRAY_REDIS_PASSWORD"):
        env["REDISCLI_AUTH"] = os.environ["RATRAY_REDIS_PASSWORD"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    return [k for k in r.stdout.split() if k]


def cleanup(redis: str, namespace: str) -> None:
    """Delete the namespace's keys from Redis (the head is stopped)."""
    from ray._private.gcs_utils import cleanup_redis_storage

    host, _, port = redis.rpartition(":")
    cleanup_redis_storage(host=host, port=int(port), password=os.environ.get("RATRAY_REDIS_PASSWORD", ""),
                          use_ssl=False, storage_namespace=namespace)


def snapshot(gcs) -> dict:
    """What restarting this gcs_server (a psutil.Process) needs: argv, environment, cwd."""
    return {"cmdline": gcs.cmdline(), "environ": gcs.environ(), "cwd": gcs.cwd()}


def _log_files(cmdline: list[str]) -> tuple[str, str]:
    opts = dict(a[2:].split("=", 1) for a in cmdline if a.startswith("--") and "=" in a)
    return opts["stdout_filepath"], opts["stderr_filepath"]


def keep(state_path: Path) -> int:
    """Run until the head's state file disappears: restart its gcs_server whenever it dies."""
    import psutil

    state = json.loads(state_path.read_text())
    snap = state["gcs_snapshot"]
    out, err = _log_files(snap["cmdline"])
    pid, ctime = state["gcs_pid"], state["gcs_create_time"]
    while state_path.exists():
        try:
            alive = abs(psutil.Process(pid).create_time() - ctime) < 1.0 and \
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if alive:
            time.sleep(POLL_S)
            continue
        died = time.time()
        time.sleep(float(os.environ.get("RATRAY_GCS_RESTART_DELAY_S", "0") or 0))
        with open(out, "a") as fo, open(err, "a") as fe:
            proc = subprocess.Popen(snap["cmdline"], env=snap["environ"], cwd=snap["cwd"], stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL)
        pid, ctime = proc.pid, psutil.Process(proc.pid).create_time()
        if not state_path.exists():
            proc.kill()
            return 0
        state = json.loads(state_path.read_text())
        state.update(gcs_pid=pid, gcs_create_time=ctime)
        state.setdefault("gcs_restarts", []).append({"found_dead": died, "restarted": time.time(), "pid": pid})
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
    return 0


if __name__ == "__main__":  # started by LocalRay.up(gcs_ft=...): python cluster/gcsft.py <state file>
    import sys

    sys.exit(keep(Path(sys.argv[1])))
