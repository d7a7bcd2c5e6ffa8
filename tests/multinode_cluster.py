"""A multi-node Ray cluster on this host, as the KubeRay manifests shape it; run by test_multinode.

    python tests/multinode_cluster.py WORKDIR [--train [SMALL_WORKDIR]]   → one JSON line on stdout

Its own process because a `ray.cluster_utils.Cluster` needs its own Ray (the pytest session
already runs one). The cluster mirrors k8s/base/ray: a head with no CPUs (job driver, GCS), a
train node (CPUs, no index_node), two index nodes (no CPUs, `index_node: 2` = two shard slots
each). Flow:

    build a 2-shard Flat index of synthetic vectors in WORKDIR (the "shared volume")
    ─ ShardedIndex.launch(service.resources={"index_node": 1}) ─ where did the actors land?
    ─ CPU tasks (and with --train a 2-worker Ray Train run): where did they land?
    ─ search (the reference answer)
    ─ a thread searches non-stop; remove the index node holding shard 0 (its raylet and workers
      killed) ─ wait until every shard answers again ─ where are they now? searches lost?
    ─ with --train SMALL_WORKDIR: RETRO trained with online retrieval by the real driver on a copy
      of that workdir (shards asking for index_node, a fresh index node added: two again); the
      index node holding shard 0 removed once step 8 is logged ─ where are the shards now, did
      every step run once, did the trainer ever restart (max_failures=0: a failed search would
      fail the run), how long did retrieval stall?
    ─ with --train: a 1-worker trainer checkpointing every step, a spare train node added; the
      worker's node removed after step 3 ─ where did it resume, from which step, did it finish?
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray._private.state as ray_state  # noqa: E402  (actor → node via the GCS, no dashboard)
from ray.cluster_utils import Cluster  # noqa: E402

from ratray.config import IndexConfig, ServiceConfig  # noqa: E402
from ratray.index.build import build_index  # noqa: E402
from ratray.index.service import ShardedIndex  # noqa: E402

N, DIM, K = 2000, 32, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor_nodes(name: str) -> dict[int, str]:
    """Shard number → node id of its live actor process."""
    out = {}
    for a in ray_state.actors().values():
        if a.get("Name", "").startswith(f"{name}-shard-") and a.get("State") == "ALIVE":
            out[int(a["Name"].rsplit("-", 1)[1])] = a["Address"]["NodeID"]
    return out


def train_loop(config: dict) -> None:
    """A Ray Train worker: write down which node it runs on (in the shared folder)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    (Path(config["out"]) / f"rank{rank}.node").write_text(node)


def train_worker_nodes(workdir: Path) -> list[str]:
    """Run a 2-worker TorchTrainer (gloo group, 1 CPU each); the nodes its workers ran on."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = workdir / "train_nodes"
    out.mkdir()
    TorchTrainer(train_loop, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="mn", storage_path=str(workdir / "runs"))).fit()
    return [p.read_text() for p in sorted(out.glob("rank*.node"))]


def counting_loop(config: dict) -> None:
    """A Ray Train worker that resumes: a step = 0.5 s of work, its line in the shared log, then a
    checkpoint holding the step; a restarted worker continues after its last checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = int((Path(d) / "step").read_text())
    node = ray.get_runtime_context().get_node_id()
    for step in range(start + 1, config["steps"] + 1):
        time.sleep(0.5)
        with open(config["log"], "a") as f:
            f.write(f"{step} {node}\n")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "step").write_text(str(step))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))


def train_node_loss(cluster: Cluster, workdir: Path, steps: int = 12, kill_after: int = 3) -> dict:
    """A 1-worker trainer (FailureConfig(max_failures=1)) with a spare train node; once step
    `kill_after` is logged, the worker's node is removed. What ran where, and the final step."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spare = cluster.add_node(num_cpus=1, resources={"train_node": 1})
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    log = workdir / "steps.log"
    trainer = TorchTrainer(
        counting_loop, train_loop_config={"steps": steps, "log": str(log)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="resume", storage_path=str(workdir / "runs"),
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result: dict = {}
    fit = threading.Thread(target=lambda: result.update(r=trainer.fit()), daemon=True)
    fit.start()
    lines: list[list[str]] = []
    deadline = time.time() + 120
    while time.time() < deadline and len(lines) < kill_after:
        time.sleep(0.2)
        lines = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
    victim = lines[-1][1]
    cluster.remove_node(nodes[victim])
    fit.join(timeout=180)
    lines = [ln.split() for ln in log.read_text().splitlines()]
    r = result.get("r")
    final = None
    if r is not None and r.checkpoint is not None:
        with r.checkpoint.as_directory() as d:
            final = int((Path(d) / "step").read_text())
    return {"spare": spare.node_id, "victim": victim, "steps": [(int(a), b) for a, b in lines],
            "final_step": final, "fit_done": not fit.is_alive(), "total": steps}


# RETRO small enough to train 30 steps in seconds on one CPU worker (tests/test_retro_train.py's TINY)
RETRO = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128", "model.enc_layers=1",
         "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]", "train.micro_batch=2",
         "train.warmup_steps=2", "train.log_every=1", "train.eval_sequences=2", "train.num_workers=1",
         "train.retrieval=online", "train.max_failures=0", "train.run_name=mn-retro",
         'service.resources={"index_node": 1}', "service.timeout_s=120"]


def logged(db: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric the run logged so far (its MLflow store: sqlite in the workdir)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT step, value FROM metrics WHERE key = ? ORDER BY step, timestamp",
                               (key,)).fetchall()
    except sqlite3.Error:  # not created yet, or locked by a writer: the next poll reads it
        return []


def retro_index_node_loss(cluster: Cluster, workdir: Path, small: Path, steps: int = 30,
                          kill_at: int = 8) -> dict:
    """RETRO with online retrieval (the real driver, shards on index nodes); the index node holding
    shard 0 is removed once step `kill_at` is logged. What moved where, which steps ran, whether
    the trainer restarted, and the retrieval wait of every step."""
    from ratray.config import load_config
    from ratray.retro.config import RetroJobConfig
    from ratray.retro.driver import run

    wd = workdir / "retro"
    shutil.copytree(small, wd, ignore=shutil.ignore_patterns("ray_results", "runs", "mlflow.db", "mlartifacts"))
    fresh = cluster.add_node(num_cpus=0, resources={"index_node": 2})  # two index nodes again
    cluster.wait_for_nodes()
    job = load_config(RetroJobConfig, None, RETRO + [f"workdir={wd}", f"train.steps={steps}"])
    name = f"{job.train.run_name}-index"  # the driver's service name
    result: dict = {}

    def fit():
        try:
            result["summary"] = run(job, progress=False)
        except Exception as e:  # noqa: BLE001  (reported: the test names it)
            result["error"] = f"{type(e).__name__}: {e}"[-2000:]

    th = threading.Thread(target=fit, daemon=True)
    th.start()
    db = wd / "mlflow.db"
    deadline = time.time() + 300
    while time.time() < deadline and th.is_alive():
        if len(actor_nodes(name)) == 2 and logged(db, "loss") and logged(db, "loss")[-1][0] >= kill_at:
            break
        time.sleep(0.2)
    out: dict = {"fresh_index_node": fresh.node_id, "configured": steps}
    if not th.is_alive() or time.time() >= deadline:
        th.join(timeout=5)
        return {**out, "error": result.get("error", "the run ended or stalled before the removal")}
    index = ShardedIndex.connect(name, namespace=job.service.namespace)
    out["shards_before"] = actor_nodes(name)
    out["pids_before"] = [inf["pid"] for inf in index.info()]
    victim = next(n for n in cluster.worker_nodes if n.node_id == out["shards_before"][0])
    out["removed_at_step"] = logged(db, "loss")[-1][0]
    t0 = time.perf_counter()
    cluster.remove_node(victim)
    out["removed"] = victim.node_id
    while th.is_alive() and time.perf_counter() - t0 < 180:  # both shards back, elsewhere
        after = actor_nodes(name)
        if len(after) == 2 and victim.node_id not in after.values():
            out["recovery_s"] = round(time.perf_counter() - t0, 2)
            out["shards_after"] = after
            out["pids_after"] = [inf["pid"] for inf in index.info()]
            out["step_when_back"] = logged(db, "loss")[-1][0]
            break
        time.sleep(0.2)
    th.join(timeout=300)
    summary = result.get("summary") or {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tags = dict(con.execute("SELECT key, value FROM tags WHERE key LIKE 'ratray.%'").fetchall())
    return {**out, "error": result.get("error"), "fit_done": not th.is_alive(),
            "steps": summary.get("steps"), "index_nodes": [n.node_id for n in cluster.worker_nodes
                                                           if n.node_id != victim.node_id],
            "logged_steps": [s for s, _ in logged(db, "loss")],
            "wait_ms": logged(db, "retrieval_wait_ms"),
            "resumed_from_step": tags.get("ratray.resumed_from_step"),
            "retrieval": summary.get("retrieval")}


@ray.remote(num_cpus=1)
def where() -> str:
    time.sleep(0.2)  # keep the slot a moment so several tasks run at once
    return ray.get_runtime_context().get_node_id()


def main(workdir: Path, train: bool = False, small: Path | None = None) -> dict:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N + 16, DIM)).astype(np.float32)  # (n + q, d)
    queries = vectors[N:]
    build_index(vectors[:N], np.arange(N, dtype=np.int64), workdir / "index",
                IndexConfig(factory="Flat", shards=2), embedding_model="synthetic")
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": False,
        "dashboard_port": free_port(), "_system_config": system})
    train = cluster.add_node(num_cpus=2, resources={"train_node": 1})
    index_nodes = [cluster.add_node(num_cpus=0, resources={"index_node": 2})
                   for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ratray-multinode", log_to_driver=False)
    ids = {"head": cluster.head_node.node_id, "train": train.node_id,
           "index": [n.node_id for n in index_nodes]}
    out: dict = {"nodes": ids}
    svc = ServiceConfig(name="mn", namespace="ratray-multinode", resources={"index_node": 1},
                        timeout_s=90)
    index = ShardedIndex.launch(str(workdir / "index"), svc)
    try:
        before = actor_nodes("mn")
        out["shards_before"] = before
        out["cpu_tasks"] = ray.get([where.remote() for _ in range(6)])
        if train:  # ~40 s more on 2 busy cores
            out["train_workers"] = train_worker_nodes(workdir)
        ref = index.search(queries, K)
        out["pids_before"] = [inf["pid"] for inf in index.info()]

        answers, failures, stop = [], [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    answers.append(bool(np.array_equal(index.search(queries, K).ids, ref.ids)))
                except Exception as e:  # noqa: BLE001  (counted and reported, never hidden)
                    failures.append(f"{type(e).__name__}: {e}"[:300])

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        time.sleep(0.5)
        victim = next(n for n in index_nodes if n.node_id == before[0])
        t0 = time.perf_counter()
        cluster.remove_node(victim)
        out["removed"] = victim.node_id
        answered_before = len(answers)
        deadline = time.time() + 90
        while time.time() < deadline:  # every shard back (and the searches answering after it)
            after = actor_nodes("mn")
            if len(after) == 2 and victim.node_id not in after.values() \
                    and len(answers) > answered_before + 3:
                break
            time.sleep(0.5)
        out["recovery_s"] = round(time.perf_counter() - t0, 2)
        stop.set()
        t.join(timeout=60)
        out["shards_after"] = actor_nodes("mn")
        out["pids_after"] = [inf["pid"] for inf in index.info()]
        out["answers"], out["answers_equal"] = len(answers), sum(answers)
        out["answers_after_removal"] = len(answers) - answered_before
        out["failures"] = failures
        out["final_equal"] = bool(np.array_equal(index.search(queries, K).ids, ref.ids))
        index.shutdown()  # its shards free their index_node slots
        if small is not None:  # an index node lost while RETRO trains with online retrieval
            out["retro"] = retro_index_node_loss(cluster, workdir, small)
        if train:  # a training node lost mid-run: the trainer resumes from its checkpoint
            out["train_loss"] = train_node_loss(cluster, workdir)
    finally:
        index.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    args = sys.argv[2:]
    small = args[args.index("--train") + 1] if "--train" in args and args[-1] != "--train" else None
    print(json.dumps(main(Path(sys.argv[1]), train="--train" in args, small=Path(small) if small else None)))
