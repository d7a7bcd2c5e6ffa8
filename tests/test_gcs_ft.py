"""GCS fault tolerance with Redis on a real local head (cluster/local.sh up --gcs-ft, cluster/gcsft.py).

A head started in its own processes (not the suite's Ray) keeps its GCS state in the machine's
Redis (127.0.0.1:6379, $RATRAY_REDIS_ADDRESS for another) under its own namespace. A driver
process holds two named actors and calls them every 20 ms; the test SIGKILLs the gcs_server in the
middle. Checked: every call answers in order (none lost), the keeper started a new GCS that reloaded
the state from Redis (a new driver finds the named actors through it), the longest actor round-trip
and the longest GCS request (the stall) are printed, and `down` leaves no key of the namespace in Redis. Skips, saying
why, only when Redis is unreachable.

Then RETRO training with online retrieval as a Ray job on such a head, its GCS SIGKILLed mid-run
(bench/gcs_ft_train.py, also a chaos scenario; ~1 min on 2 cores), and the same kill on a head
without Redis: nothing restarts the GCS, `status` and the driver say so.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.test_cluster_local import _free_ports, localray

gcsft = sys.modules["gcsft"]  # imported by cluster/localray.py
REDIS = os.environ.get("RATRAY_REDIS_ADDRESS", "127.0.0.1:6379")


LOOKUP = r'''
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("FOUND", [ray.get(ray.get_actor(f"shard{i}", namespace="ft").incr.remote()) for i in range(2)], flush=True)
'''


def _redis_reason() -> str | None:
    host, _, port = REDIS.rpartition(":")
    try:
        r = subprocess.run(["redis-cli", "-h", host, "-p", port, "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"redis-cli failed: {e}"
    return None if r.stdout.strip() == "PONG" else f"Redis at {REDIS} did not answer PING: {r.stdout + r.stderr}"


@contextlib.contextmanager
def _probed_head(tmp_path, base_port: int, seconds: int, gcs_ft: str | None = None, extra_env: dict | None = None):
    """A local head of its own (GCS state in Redis `gcs_ft`, or none) with gcsft.PROBE's driver
    running `seconds` and its actors answering: yields (head, driver, its stdout path, its stderr
    path, the drivers' environment); stops the driver and the head after."""
    port, dash = _free_ports(base_port)
    ray_tmp = tempfile.mkdtemp(prefix="ratray-ft-", dir="/tmp")
    lr = localray.LocalRay(port=port, dashboard_port=dash, temp_dir=ray_tmp, auth="disabled",
                           extra_env={"HOME": str(tmp_path), **(extra_env or {})})
    # drivers of a loopback head keep 127.0.0.1 as its address (cluster/localray.py's docstring)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    driver = None
    try:
        lr.up(num_cpus=1, object_store_memory=80 * 1024 * 1024, gcs_ft=gcs_ft, quiet=True)
        out_path, err_path = tmp_path / "driver.out", tmp_path / "driver.err"
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            driver = subprocess.Popen([sys.executable, "-c", gcsft.PROBE, lr.gcs_address, str(seconds)], env=env,
                                      text=True, stdout=fo, stderr=fe)
        deadline = time.time() + 120
        while "READY" not in out_path.read_text() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert "READY" in out_path.read_text(), err_path.read_text()[-3000:]
        yield lr, driver, out_path, err_path, env
    finally:
        if driver and driver.poll() is None:
            driver.kill()
        lr.down(grace=6.0, quiet=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_actors_keep_answering_while_the_gcs_is_killed_and_comes_back_from_redis(tmp_path):
    reason = _redis_reason()
    if reason:
        pytest.skip(f"no Redis for the GCS fault-tolerance test: {reason}")
    with _probed_head(tmp_path, 6610, 8, gcs_ft=REDIS) as (lr, driver, out_path, err_path, env):
        state = lr.read_state()
        ns, old_gcs = state["gcs_ft"]["namespace"], state["gcs_pid"]
        assert state["gcs_snapshot"]["environ"]["RAY_external_storage_namespace"] == ns
        assert f"RAY{ns}@NODE" in gcsft.redis_keys(REDIS, ns)  # the GCS writes its tables to Redis
        time.sleep(2.0)
        killed_at = time.time()
        os.kill(old_gcs, signal.SIGKILL)
        driver.wait(timeout=150)
        out, err = out_path.read_text(), err_path.read_text()
        assert driver.returncode == 0, err[-3000:]
        calls = json.loads(out.split("CALLS ", 1)[1])
        state = lr.read_state()
        (restart,) = state["gcs_restarts"]
        assert state["gcs_pid"] == restart["pid"] != old_gcs and psutil.pid_exists(restart["pid"]) and lr.is_up()
        assert not psutil.pid_exists(old_gcs) or psutil.Process(old_gcs).status() == psutil.STATUS_ZOMBIE
        # no call lost: each actor's count goes 2, 3, 4, ... without a gap, on both sides of the kill
        assert [c[2] for c in calls] == [[i, i] for i in range(2, 2 + len(calls))]
        assert calls[0][0] < killed_at < calls[-1][1] and any(c[0] > restart["restarted"] for c in calls)
        stall = max(c[1] - c[0] for c in calls)  # the longest actor round-trip
        # the restarted GCS reloaded the named actors from Redis: a new driver finds and calls them
        r = subprocess.run([sys.executable, "-c", LOOKUP, lr.gcs_address], env=env, capture_output=True,
                           text=True, timeout=120)
        assert f"FOUND [{len(calls) + 2}, {len(calls) + 2}]" in r.stdout, r.stdout + r.stderr[-3000:]
        trips = sorted(c[1] - c[0] for c in calls)
        print(f"\nGCS killed: restarted after {restart['restarted'] - restart['found_dead']:.2f}s; "
              f"{len(calls)} actor round-trips, none lost; longest actor round-trip {stall:.2f}s "
              f"(median {trips[len(trips) // 2]:.3f}s); longest GCS lookup {max(c[3] for c in calls):.2f}s "
              f"(median {sorted(c[3] for c in calls)[len(calls) // 2]:.3f}s)")
    assert lr.processes() == [] and gcsft.redis_keys(REDIS, ns) == []


@pytest.mark.slow
def test_without_redis_a_killed_gcs_stays_dead_and_status_and_the_driver_say_so(tmp_path):
    """The same kill on a head without --gcs-ft: nothing restarts the GCS, `status` names the loss
    at once, and a driver holding actors dies with Ray's "Failed to connect to GCS" once the
    reconnect timeout passes (10 s here instead of the default 60, to keep the test short)."""
    short = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}
    with _probed_head(tmp_path, 6810, 60, extra_env=short) as (lr, driver, out_path, err_path, _):
        os.kill(lr.read_state()["gcs_pid"], signal.SIGKILL)
        time.sleep(1.0)
        status = lr.status()
        assert not status["up"] and "without --gcs-ft nothing restarts it" in status["problem"], status
        driver.wait(timeout=120)
        err = err_path.read_text()
        assert driver.returncode != 0 and "CALLS" not in out_path.read_text()
        assert "Failed to connect to GCS within 10 seconds" in err, err[-3000:]
        assert "gcs_restarts" not in lr.read_state() and not lr.is_up()
        print(f"\nno Redis: GCS killed, the driver exited rc={driver.returncode}: "
              + next(ln for ln in err.splitlines() if "Failed to connect to GCS" in ln).split("] ", 1)[-1][:160])
    assert lr.processes() == []

def _gcs_ft_train():
    """bench/gcs_ft_train.py (bench/ is not a package): loaded from its file."""
    spec = importlib.util.spec_from_file_location("ratray_gcs_ft_train", Path(__file__).resolve().parents[1]
                                                  / "bench" / "gcs_ft_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_retro_training_with_online_retrieval_finishes_every_step_through_a_gcs_kill(small_workdir):
    reason = _redis_reason()
    if reason:
        pytest.skip(f"no Redis for the GCS fault-tolerance test: {reason}")
    bench = _gcs_ft_train()
    wd, _, _ = small_workdir
    port, _ = _free_ports(6710)
    rep = bench.scenario(wd, REDIS, steps=12, kill_at=4, port=port, run_name="t-gcs-kill")
    print("\n" + bench.headline(rep))
    assert rep["kill"] and rep["kill"]["after_step"] < 12, rep  # the GCS died while the steps ran
    assert rep["job_status"] == "SUCCEEDED", rep["driver_log_tail"]
    (restart,) = rep["gcs_restarts"]  # the keeper started one new GCS
    assert restart["pid"] != rep["kill"]["gcs_pid"] and rep["kill"]["gcs_port_back_s"] is not None
    # every step done and logged once; Ray Train never restarted the worker group (max_failures=0
    # would have failed the job on a failed search)
    assert rep["steps_completed"] == 12 and rep["steps_logged"] == 12 and rep["steps_logged_once"]
    assert rep["resumed_from_step"] == "0" and rep["loss_finite"]
    assert rep["steps_with_online_retrieval"] == 12  # every step's neighbours searched on the shard actors
    # the same two shard actors and two Ray Train workers before the kill and until the end
    assert {r: len(p) for r, p in rep["pids_seen"].items()} == {"shard": 2, "train_worker": 2}, rep["pids_first_seen"]
    assert rep["pids_seen"] == rep["pids_before_kill"]
    assert rep["gap_spanning_kill_s"] is not None and rep["passed"]
