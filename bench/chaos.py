"""The chaos suite: real runs through Ray while things are killed, each ending in a JSON report.

    python bench/chaos.py [--scenarios all|retro_shard_kills,build_kills,...] [--out chaos.json]
    make chaos

Scenarios (one local Ray for all, 2 CPUs; a small stdlib corpus, 32-token chunks, Flat shards):
- retro_shard_kills: RETRO training with online retrieval while a shard actor is killed every
  --kill-every seconds (Ray restarts it from its shard files). Pass: every step done, no Ray Train
  retry (the run never resumed), the loss finite, at least 3 kills while the steps ran. Reported: kills, steps, step time of the logging
  intervals that saw a kill against those that did not.
- realm_kills: REALM training (refresh every 4 steps, checkpoints every 4) with one Ray Train
  worker SIGKILLed a third of the way in and the RefreshService killed while a refresh runs. Pass:
  every step done, the run resumed from a checkpoint, index versions built from ever newer
  weights, the serving version never decreasing (as logged per step), no orphaned version folders.
- build_kills: the index build as a separate driver process, SIGKILLed mid-embedding, each run
  as soon as it has cached a new part (--build-kills times), then run to the end; compared with a clean
  build in another workdir (embed.part_size=128: embeddings reach the cache in parts as they
  finish). Pass: at least 2 kills landed, the re-run took every part the killed runs had cached
  from the cache, and the chunk table, the embedding cache and every shard's ids and vectors equal
  the clean build's.
- concurrent_builds: two builds started at once on one workdir. Pass: at most one fails, and then
  with an error that says the workdir is in use; the result equals the clean build.
- gcs_kill_training: RETRO training with online retrieval as a Ray job on a head of its own whose
  GCS state is in Redis (cluster/local.sh up --gcs-ft), the gcs_server SIGKILLed a third of the way
  in and restarted by the keeper (bench/gcs_ft_train.py). Pass: the job SUCCEEDED with every step
  logged once, no Ray Train retry, the same shard-actor and Ray Train worker processes throughout
  (train.max_failures=0: a failed search would fail the job). Reported: the step gap spanning the
  kill against the median.
- unschedulable_shard: an index whose shard actors need a resource no node has, service.timeout_s
  = --shard-timeout. Pass: launching or searching fails within --deadline seconds with an error
  that names the shard and the resource.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
             "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
             "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(k, v)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

BUILD = ["corpus.max_docs=40", "corpus.max_bytes=90000", "corpus.val_fraction=0.2",
         "chunks.chunk_tokens=32", "chunks.vocab_size=2048", "index.factory=Flat", "index.shards=2",
         "index.recall_queries=50", "embed.part_size=128"]
MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128",
         "model.enc_layers=1", "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]",
         "train.micro_batch=2", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
         "train.eval_sequences=8", "train.num_workers=2", "train.zero_stage=2",
         "train.retrieval=online"]


def build_cmd(wd: Path) -> list[str]:
    sets = [a for s in BUILD + [f"workdir={wd}"] for a in ("--set", s)]
    return [sys.executable, str(ROOT / "jobs" / "build_index.py"), "--quiet", *sets]


def run_build(wd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(build_cmd(wd), env=env, capture_output=True, text=True, timeout=timeout)


def driver_env() -> dict:
    """Build drivers join this script's Ray (killing a driver then kills only the driver)."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------
# comparing two builds


def fingerprint(wd: Path) -> dict:
    """What a build produced, in comparable form: the chunk table (ids, documents, tokens), the
    embedding cache (vectors by chunk key) and every shard's ids and stored vectors (Flat)."""
    import faiss

    from ratray.workdir import Workdir

    w = Workdir(wd)
    summary = json.loads(w.index_summary.read_text())
    table = pq.read_table(Path(summary["chunk_store"]["path"]) / "chunks.parquet")
    emb = {}
    for part in sorted(w.embeddings.rglob("part-*.npz")):
        with np.load(part) as z:
            emb.update(zip(z["keys"].tolist(), z["vectors"]))
    shards = {}
    for f in sorted(w.index.glob("shard_*.faiss")):
        ix = faiss.read_index(str(f))
        shards[f.stem] = (np.load(f.with_suffix(".ids.npy")), ix.reconstruct_n(0, ix.ntotal))
    return {"table": table, "embeddings": emb, "shards": shards}


def same_build(a: dict, b: dict, atol: float = 1e-5) -> dict:
    """Equal chunk tables and shard ids; vectors equal to `atol` (the encoder's float sums depend
    on how texts were batched, and a resumed build batches differently)."""
    ka, kb = sorted(a["embeddings"]), sorted(b["embeddings"])
    emb_diff = max((float(np.abs(a["embeddings"][k] - b["embeddings"][k]).max()) for k in ka),
                   default=0.0) if ka == kb else None
    same_shards = sorted(a["shards"]) == sorted(b["shards"]) and all(
        np.array_equal(a["shards"][s][0], b["shards"][s][0]) for s in a["shards"])
    vec_diff = max((float(np.abs(a["shards"][s][1] - b["shards"][s][1]).max()) for s in a["shards"]),
                   default=0.0) if same_shards else None
    checks = {"chunk_table_equal": a["table"].equals(b["table"]),
              "embedding_keys_equal": ka == kb, "embedding_max_abs_diff": emb_diff,
              "shard_ids_equal": same_shards, "shard_vectors_max_abs_diff": vec_diff}
    checks["equal"] = bool(checks["chunk_table_equal"] and ka == kb and same_shards
                           and emb_diff is not None and emb_diff <= atol
                           and vec_diff is not None and vec_diff <= atol)
    return checks


# ---------------------------------------------------------------------------------------------
# scenarios


def retro_shard_kills(tmp: Path, clean: Path, a) -> dict:
    import ray
    from mlflow import MlflowClient

    from ratray.config import load_config
    from ratray.retro.config import RetroJobConfig
    from ratray.retro.driver import run
    from ratray.tracking import tracking_uri

    name = "chaos-shards"
    job = load_config(RetroJobConfig, None, MODEL + [f"workdir={clean}", f"train.steps={a.steps}",
                                                     f"train.run_name={name}",
                                                     f"train.checkpoint_every={a.steps}"])
    kills: list[float] = []
    done = threading.Event()
    result: dict = {}

    def train():
        try:
            result["summary"] = run(job, progress=False)
        except BaseException as e:  # reported, not raised: the report says what failed
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            done.set()

    th = threading.Thread(target=train, daemon=True)
    th.start()
    i, workers_seen = 0, set()
    while not done.wait(a.kill_every):
        workers_seen |= set(train_worker_pids())  # a Ray Train retry starts new worker processes
        shard = f"{name}-index-shard-{i % 2}"
        try:
            ray.kill(ray.get_actor(shard, namespace=job.service.namespace), no_restart=False)
            kills.append(time.time())
            i += 1
        except ValueError:  # not launched yet, or restarting: try again next time
            pass
    th.join()
    rep = {"killed": "a shard actor (SIGKILL via ray.kill, restart allowed)",
           "kill_every_s": a.kill_every, "kills": len(kills), "steps_planned": a.steps}
    if "error" in result:
        return {**rep, "passed": False, "error": result["error"]}
    s = result["summary"]
    c = MlflowClient(tracking_uri(clean))
    exp = c.get_experiment_by_name("ratray-retro")
    r = c.search_runs([exp.experiment_id], filter_string=f"tags.`ratray.run_name` = '{name}'",
                      order_by=["start_time DESC"])[0]
    hist = c.get_metric_history(r.info.run_id, "step_time_s")
    hist.sort(key=lambda m: m.timestamp)
    with_kill, without = [], []
    prev = r.info.start_time / 1e3
    for m in hist:
        t = m.timestamp / 1e3
        (with_kill if any(prev <= k <= t for k in kills) else without).append(m.value)
        prev = t
    loss = [m.value for m in c.get_metric_history(r.info.run_id, "loss")]
    resumed = r.data.tags.get("ratray.resumed_from_step", "0")
    first, last = r.info.start_time / 1e3, (hist[-1].timestamp / 1e3 if hist else 0.0)
    rep["kills_while_training"] = sum(first <= k <= last for k in kills)
    # a query that fails raises in its step, which fails the worker and makes Ray Train retry
    # (resumed_from_step > 0): no retry means no query failed
    retried = resumed != "0" or len(workers_seen) > job.train.num_workers
    rep["failed_queries"] = "some (the run retried)" if retried else 0
    rep.update({"steps_completed": s["steps"], "ray_train_worker_processes_seen": len(workers_seen),
                "ray_train_retried": retried,
                "resumed_from_step": int(resumed), "failed_steps": a.steps - int(s["steps"] or 0),
                "step_time_s_with_kill": statistics.median(with_kill) if with_kill else None,
                "step_time_s_without": statistics.median(without) if without else None,
                "loss_finite": all(np.isfinite(loss))})
    rep["passed"] = (rep["steps_completed"] == a.steps and not retried and rep["loss_finite"]
                     and rep["kills_while_training"] >= 3)
    return rep


def cached_chunks(wd: Path) -> int:
    """Chunks in the workdir's embedding cache (0 before there is one)."""
    from ratray.config import EmbedConfig
    from ratray.index.embed import EmbeddingCache
    from ratray.workdir import Workdir

    try:
        return len(EmbeddingCache(Workdir(wd).embeddings, EmbedConfig().model))
    except (OSError, ValueError):
        return 0


def build_kills(tmp: Path, clean: Path, a) -> dict:
    wd = tmp / "killed"
    env = driver_env()
    killed_at = []
    for _ in range(a.build_kills):
        # killed mid-embedding, once this run has cached a new part (embed.part_size chunks): a
        # kill timed as a share of the clean build's time found the re-runs, which reuse the
        # cache, already finished (2026-12-02: 1 of 3 kills landed)
        start = cached_chunks(wd)
        p = subprocess.Popen(build_cmd(wd), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t = time.perf_counter()
        while p.poll() is None and cached_chunks(wd) <= start and time.perf_counter() - t < 900:
            time.sleep(0.1)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed_at.append({"after_s": round(time.perf_counter() - t, 1), "killed": True,
                              "cached_at_kill": cached_chunks(wd)})
        else:
            killed_at.append({"after_s": round(time.perf_counter() - t, 1), "killed": False,
                              "rc": p.returncode})
    cached_before = cached_chunks(wd)
    t = time.perf_counter()
    final = run_build(wd, env)
    rep = {"killed": "the build's driver process (SIGKILL)", "kills": killed_at,
           "final_rc": final.returncode, "final_s": round(time.perf_counter() - t, 1),
           # what the re-run reused: its summary lines (chunk store, embeddings from the cache)
           "final_run_said": [ln for ln in final.stdout.splitlines()
                              if ln.startswith(("chunk store:", "embeddings:"))],
           "chunks_cached_by_killed_runs": cached_before}
    said = " ".join(rep["final_run_said"])
    m = re.search(r"(\d+) from the cache", said)
    rep["final_run_from_cache"] = int(m.group(1)) if m else None
    if final.returncode:
        return {**rep, "passed": False, "error": final.stderr[-2000:]}
    cmp = same_build(fingerprint(wd), fingerprint(clean))
    kills = sum(k["killed"] for k in killed_at)
    reused = cached_before > 0 and (rep["final_run_from_cache"] or 0) >= cached_before
    return {**rep, "compared_with_clean_build": cmp, "passed": cmp["equal"] and kills >= 2 and reused}


def concurrent_builds(tmp: Path, clean: Path, a) -> dict:
    wd = tmp / "concurrent"
    env = driver_env()
    procs = [subprocess.Popen(build_cmd(wd), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    rcs = [p.returncode for p in procs]
    errors = [o[1].strip().splitlines()[-1] if rc and o[1].strip() else "" for o, rc in zip(outs, rcs)]
    rep = {"started": 2, "return_codes": rcs, "errors": errors}
    clear = all(rc == 0 or ("in use" in e or "lock" in e.lower()) for rc, e in zip(rcs, errors))
    if all(rcs):
        return {**rep, "passed": False}
    cmp = same_build(fingerprint(wd), fingerprint(clean))
    return {**rep, "compared_with_clean_build": cmp, "passed": clear and cmp["equal"]}


def gcs_kill_training(tmp: Path, clean: Path, a) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import gcs_ft_train

    rep = gcs_ft_train.scenario(clean, a.redis, a.gcs_steps, a.gcs_steps // 3, a.gcs_port, run_name="chaos-gcs")
    print(gcs_ft_train.headline(rep), flush=True)
    return rep


def unschedulable_shard(tmp: Path, clean: Path, a) -> dict:
    from ratray.config import ServiceConfig
    from ratray.index.service import ShardedIndex

    svc = ServiceConfig(name="chaos-unplaceable", resources={"no_such_node": 1},
                        timeout_s=a.shard_timeout)
    out: dict = {}

    def attempt():
        t = time.perf_counter()
        try:
            ix = ShardedIndex.launch(str(clean / "index"), svc)
            ix.search(np.zeros((1, 384), np.float32), 5)
            out["error"] = None
        except Exception as e:  # what the user would see
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.perf_counter() - t

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(a.deadline)
    rep = {"requested": {"no_such_node": 1}, "service.timeout_s": a.shard_timeout,
           "deadline_s": a.deadline}
    if th.is_alive():
        return {**rep, "passed": False, "error": f"still waiting after {a.deadline} s (no timeout)"}
    err = out.get("error") or ""
    rep.update({"failed_after_s": round(out["seconds"], 1), "error": err[:500]})
    rep["passed"] = bool(err) and "shard" in err and "no_such_node" in err
    return rep


REALM = ["chunks.tokenizer=wordpiece", "chunks.chunk_tokens=32", "corpus.max_bytes=40000",
         "corpus.val_fraction=0.2", "index.factory=Flat", "index.metric=ip", "index.shards=2",
         "model.retriever_layers=1", "model.reader_layers=1", "model.query_tokens=16", "model.k=3",
         "train.micro_batch=4", "train.num_workers=2", "train.warmup_steps=1", "train.lr=1e-4",
         "train.log_every=2", "train.checkpoint_every=4", "refresh.every=4", "eval_queries=16"]


def _mlflow_run(c, name: str):
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`ratray.run_name` = '{name}'",
                         order_by=["start_time DESC"]) if exps else []
    return runs[0] if runs else None


def train_worker_pids() -> list[int]:
    """PIDs of this cluster's Ray Train worker processes (children of our raylet: other Ray
    instances on the host are not ours to kill)."""
    import psutil
    import ray

    raylets = ray._private.worker._global_node.all_processes["raylet"]
    pids = []
    for proc in psutil.Process(raylets[0].process.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def realm_kills(tmp: Path, clean: Path, a) -> dict:
    """REALM: one Ray Train worker SIGKILLed mid-run, the RefreshService killed during a refresh."""
    import ray
    from mlflow import MlflowClient

    from ratray.config import load_config
    from ratray.index.store import load_manifest, version_dir, versions_on_disk
    from ratray.realm.config import RealmJobConfig
    from ratray.realm.driver import run
    from ratray.tracking import tracking_uri
    from ratray.workdir import Workdir

    name, wd = "chaos-realm", tmp / "realm"
    job = load_config(RealmJobConfig, None, REALM + [f"workdir={wd}", f"train.steps={a.realm_steps}",
                                                     f"train.run_name={name}"])
    result: dict = {}
    done = threading.Event()

    def train():
        try:
            result["summary"] = run(job, progress=False)
        except BaseException as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            done.set()

    th = threading.Thread(target=train, daemon=True)
    th.start()
    events: list[dict] = []
    c = MlflowClient(tracking_uri(wd))
    worker_killed = service_killed = False
    while not done.wait(0.5) and not (worker_killed and service_killed):
        try:
            r = _mlflow_run(c, name)
            step = max((m.step for m in c.get_metric_history(r.info.run_id, "loss")), default=0) if r else 0
        except Exception:  # the store is being created: try again
            continue
        if not worker_killed and step >= a.realm_steps // 3:
            alive = train_worker_pids()
            if alive:
                os.kill(alive[-1], signal.SIGKILL)
                worker_killed = True
                events.append({"killed": "a Ray Train worker (SIGKILL)", "at_logged_step": step})
        if worker_killed and not service_killed and step > 0:
            try:
                svc = ray.get_actor(f"{name}-index-refresh", namespace=job.service.namespace)
                if ray.get(svc.status.remote(), timeout=10).get("running"):
                    ray.kill(svc, no_restart=False)
                    service_killed = True
                    events.append({"killed": "the RefreshService during a refresh", "at_logged_step": step})
            except (ValueError, ray.exceptions.RayError):  # (re)starting: next time
                pass
    th.join()
    rep = {"events": events, "steps_planned": a.realm_steps}
    if "error" in result:
        return {**rep, "passed": False, "error": result["error"][-2000:]}
    s = result["summary"]
    r = _mlflow_run(c, name)
    root = Workdir(wd).run_index(name)
    versions = versions_on_disk(root)
    steps_of = [load_manifest(version_dir(root, v)).extra.get("weights_step") for v in versions]
    leftovers = sorted(p.name for p in (root / "versions").iterdir() if p.name.startswith("."))
    logged = [int(m.value) for m in sorted(c.get_metric_history(r.info.run_id, "index_version"),
                                           key=lambda m: m.timestamp)]
    rep.update({"steps_completed": s["steps"], "resumed_from_step": int(r.data.tags.get("ratray.resumed_from_step", 0)),
                "refresh": {k: s["refresh"].get(k) for k in ("requested", "completed", "failed")},
                "versions_on_disk": versions, "weights_step_of_versions": steps_of,
                "index_version_logged": logged, "orphaned_folders": leftovers})
    monotone = all(x <= y for x, y in zip(steps_of, steps_of[1:]) if x is not None and y is not None)
    rep["serving_version_never_decreased"] = all(x <= y for x, y in zip(logged, logged[1:]))
    rep["passed"] = (s["steps"] == a.realm_steps and worker_killed and service_killed
                     and rep["resumed_from_step"] > 0
                     and rep["resumed_from_step"] % job.train.checkpoint_every == 0
                     and monotone and not leftovers and rep["serving_version_never_decreased"])
    return rep


SCENARIOS = {f.__name__: f for f in (retro_shard_kills, realm_kills, build_kills, concurrent_builds,
                                     gcs_kill_training, unschedulable_shard)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="all")
    p.add_argument("--out", default="chaos.json")
    p.add_argument("--steps", type=int, default=300, help="RETRO steps under shard kills")
    p.add_argument("--kill-every", type=float, default=5.0)
    p.add_argument("--realm-steps", type=int, default=24)
    p.add_argument("--build-kills", type=int, default=3)
    p.add_argument("--shard-timeout", type=float, default=20.0, help="service.timeout_s")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="unschedulable_shard fails if no error came by then")
    p.add_argument("--gcs-steps", type=int, default=30, help="RETRO steps of gcs_kill_training")
    p.add_argument("--gcs-port", type=int, default=6670, help="GCS port of gcs_kill_training's head")
    p.add_argument("--redis", default=os.environ.get("RATRAY_REDIS_ADDRESS", "127.0.0.1:6379"),
                   help="Redis holding gcs_kill_training's GCS state")
    a = p.parse_args()
    names = list(SCENARIOS) if a.scenarios == "all" else a.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="ratray", log_to_driver=False)
    report = {"scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="ratray-chaos-") as d:
        tmp = Path(d)
        clean = tmp / "clean"
        t = time.perf_counter()
        r = run_build(clean, driver_env())
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 2
        report["clean_build_s"] = a.clean_build_s = round(time.perf_counter() - t, 1)
        for n in names:
            t = time.perf_counter()
            print(f"== {n}", flush=True)
            rep = SCENARIOS[n](tmp, clean, a)
            rep["wall_s"] = round(time.perf_counter() - t, 1)
            report["scenarios"][n] = rep
            print(json.dumps(rep, indent=1, default=str), flush=True)
    report["passed"] = all(r["passed"] for r in report["scenarios"].values())
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"chaos: {sum(r['passed'] for r in report['scenarios'].values())}/{len(names)} scenarios "
          f"passed; report {a.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
