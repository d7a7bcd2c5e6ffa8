"""A multi-node Ray cluster on one host (ray.cluster_utils.Cluster), shaped like the KubeRay
manifests: shard actors on index nodes only, Ray Train workers never on them; losing an index node
loses no search and no training step; losing the training node resumes the trainer from its
checkpoint.

The cluster runs in a child process (tests/multinode_cluster.py: this session's pytest already
holds a local Ray) with its own RAY_TMPDIR, so neither Ray sees the other; one run serves every
test here (~3-4 min on 2 cores beside the rest of `make test`). `make cluster-test` runs just this
file and the `cluster/local.sh up --nodes` test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# one cluster run with its training scenarios (and the session's small workdir built for them):
# minutes, past the suite's 600 s per test on a crowded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SCRIPT = Path(__file__).with_name("multinode_cluster.py")


@pytest.fixture(scope="module")
def observed(tmp_path_factory, small_workdir):
    """The child's observations (see multinode_cluster.py for the flow); RETRO trains on a copy of
    the session's small workdir (index, chunks, embeddings)."""
    train = ["--train", str(small_workdir[0])]
    ray_tmp = tempfile.mkdtemp(prefix="rtmn")  # short: Ray's unix socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")
    try:
        cmd = [sys.executable, str(SCRIPT), str(tmp_path_factory.mktemp("mn"))]
        out = subprocess.run(cmd + train, capture_output=True, text=True, env=env,
                             timeout=1500)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, f"cluster run failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shard_actors_land_only_on_index_nodes_and_cpu_work_never_does(observed):
    nodes = observed["nodes"]
    assert sorted(observed["shards_before"]) == ["0", "1"]
    assert set(observed["shards_before"].values()) <= set(nodes["index"])
    # the head and the index nodes advertise no CPUs: every CPU task runs on the train node
    assert set(observed["cpu_tasks"]) == {nodes["train"]}


def test_ray_train_workers_run_on_the_train_node_never_on_index_nodes(observed):
    assert len(observed["train_workers"]) == 2  # both workers of the TorchTrainer ran ...
    assert set(observed["train_workers"]) == {observed["nodes"]["train"]}  # ... on the train node


def test_losing_an_index_node_restarts_its_shards_on_the_survivor_and_no_search_fails(observed):
    nodes, removed = observed["nodes"], observed["removed"]
    survivor = next(n for n in nodes["index"] if n != removed)
    assert removed == observed["shards_before"]["0"]
    # both shards now live on the surviving index node, in new processes loaded from the files
    assert set(observed["shards_after"].values()) == {survivor}
    assert set(observed["pids_after"]).isdisjoint(observed["pids_before"])
    # searches went on through the loss: none failed, every answer equals the one before it
    assert observed["failures"] == []
    assert observed["answers_after_removal"] > 0
    assert observed["answers_equal"] == observed["answers"]
    assert observed["final_equal"] is True


def test_losing_an_index_node_while_retro_trains_online_loses_no_step_and_no_search(observed):
    """The real RETRO driver, train.retrieval=online, shards asking for index_node, max_failures=0
    (a search that failed would fail the worker and so the run); the index node holding shard 0
    removed mid-run. Its shards come back on the surviving index node, loaded from the shared
    files; the run logs every configured step exactly once and never restarted."""
    r = observed["retro"]
    assert r["error"] is None and r["fit_done"], r["error"]
    assert r["retrieval"] == "online"
    assert r["steps"] == r["configured"]
    assert r["logged_steps"] == list(range(1, r["configured"] + 1))  # none skipped, none twice
    assert r["resumed_from_step"] == "0"  # the trainer never restarted
    # removed mid-run, and training went on after the shards were back
    assert r["removed_at_step"] < r["step_when_back"] + 1 <= r["configured"]
    assert r["removed"] in r["shards_before"].values()
    assert set(r["shards_after"].values()) <= set(r["index_nodes"]) and r["removed"] not in r["shards_after"].values()
    moved = [int(i) for i, node in r["shards_before"].items() if node == r["removed"]]
    assert moved and all(r["pids_after"][i] != r["pids_before"][i] for i in moved)  # restarted from the files
    # how long a step then waited for its neighbours is a measurement, not asserted: a step blocked
    # ~1.8 s of a 5.7 s recovery on 2 busy cores; alone (2026-12-02) the 1.5 s recovery hid inside
    # the one-batch prefetch (longest wait 27 ms). Printed for the record:
    after = [w for s, w in r["wait_ms"] if s > r["removed_at_step"]]
    print(f"recovery {r['recovery_s']} s, longest retrieval wait after the loss {max(after, default=0):.0f} ms")


def test_losing_the_training_node_resumes_the_trainer_from_its_checkpoint_on_the_spare(observed):
    run = observed["train_loss"]
    assert run["fit_done"] and run["final_step"] == run["total"]
    before = [s for s, node in run["steps"] if node == run["victim"]]
    after = [s for s, node in run["steps"] if node != run["victim"]]
    assert before == list(range(1, len(before) + 1)) and len(before) >= 3
    assert {node for s, node in run["steps"] if node != run["victim"]} == {run["spare"]}
    # resumed from a checkpoint (not from step 1) without skipping a step, then ran to the end
    assert 1 < after[0] <= before[-1] + 1
    assert after == list(range(after[0], run["total"] + 1))
