"""RETRO training with online retrieval while the GCS is SIGKILLed (issue 16's chaos scenario).

    python bench/gcs_ft_train.py [--workdir DIR] [--steps 40] [--kill-at 12] [--redis 127.0.0.1:6379]
    python bench/gcs_ft_train.py --no-redis      # the same kill on a head without GCS fault tolerance

    local head (cluster/localray.py, --gcs-ft: GCS tables in Redis, the keeper restarting gcs_server)
      └─ Ray job (`ray job submit`, as cluster/local.sh submit does): jobs/retro_pretrain.py
           ├─ 2 IndexShard actors (online retrieval, over their socket channels)
           └─ Ray Train: controller + 2 RayTrainWorkers (DeepSpeed ZeRO-2), one MLflow point per step
    this script: polls the run's MLflow steps and the head's processes; at step --kill-at it
      SIGKILLs the gcs_server; then waits for the job's end

Judged on the head's own record (no stub anywhere): the job's status from the job API, the run's
summary (steps done), its MLflow history (every step logged once with a search of non-zero latency
on the shard actors, the loss finite, the `ratray.resumed_from_step` tag: 0 means Ray Train never
restarted the worker group), and the pids of the shard actors and Ray Train workers seen during the
whole run (two each: none restarted). A search that fails raises in its step, which fails the
worker; the run sets train.max_failures=0, so a failed search fails the job: a SUCCEEDED job with
every step logged once lost no query.
The stall: the gaps between the MLflow timestamps of consecutive steps; the longest ending while
the GCS was down or within 10 s of its restart, against the median (--restart-delay keeps the GCS
down that long, as a Kubernetes head pod takes a while to return). Without Redis (--no-redis)
nothing restarts the GCS: what the job API, the job's log and `cluster/local.sh status` say is
printed as found.
The head, its Redis keys and (unless --workdir is given) the workdir are removed after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
import localray  # noqa: E402

# TORCH_EXTENSIONS_DIR as the Makefile sets it: DeepSpeed's CPU ops compiled once, not per $HOME
ENV = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}
BUILD = ["corpus.max_docs=40", "corpus.max_bytes=90000", "corpus.val_fraction=0.2",
         "chunks.chunk_tokens=32", "chunks.vocab_size=2048", "index.factory=Flat", "index.shards=2",
         "index.recall_queries=50"]
# the tiny RETRO of tests/test_retro_train.py, online retrieval, a metric point per step, no retry
TRAIN = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128",
         "model.enc_layers=1", "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]",
         "train.micro_batch=2", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
         "train.eval_sequences=8", "train.num_workers=2", "train.zero_stage=2",
         "train.retrieval=online", "train.max_failures=0"]
ROLES = {"shard": "IndexShard", "train_worker": "RayTrainWorker"}


def build(workdir: Path) -> None:
    """The small index of tests/conftest.py (SMALL_BUILD) in `workdir` (in a local Ray of its own)."""
    sets = [a for s in BUILD + [f"workdir={workdir}"] for a in ("--set", s)]
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_index.py"), "--quiet", *sets],
                       env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"building the index in {workdir} failed:\n{r.stderr[-3000:]}")


def train_entrypoint(workdir: Path, run_name: str, steps: int) -> list[str]:
    sets = [a for s in TRAIN + [f"train.checkpoint_every={steps}"] for a in ("--set", s)]
    return ["python", "jobs/retro_pretrain.py", "--workdir", str(workdir), "--run-name", run_name,
            "--steps", str(steps), "--quiet", *sets]


def role_pids(lr) -> dict[str, set[int]]:
    """Pids of the head's shard actors and Ray Train workers now (their process titles). A process
    an actor forks (a subprocess before its exec, a pool worker) carries the actor's title too: a
    process whose parent has the title is the actor's child, not another actor."""
    import psutil

    titled: dict[int, tuple[str, int]] = {}
    for pid in lr.processes():
        try:
            p = psutil.Process(pid)
            title, parent = " ".join(p.cmdline()), p.ppid()
        except psutil.Error:
            continue
        for role, word in ROLES.items():
            if word in title:
                titled[pid] = (role, parent)
    out: dict[str, set[int]] = {r: set() for r in ROLES}
    for pid, (role, parent) in titled.items():
        if titled.get(parent, (None,))[0] != role:
            out[role].add(pid)
    return out


def _store_ready(db: Path) -> bool:
    """Whether the job has finished creating its MLflow store (the experiment row exists): a client
    opened earlier would migrate the schema alongside the job's own store and both fail."""
    import sqlite3

    if not db.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT 1 FROM experiments WHERE name = 'ratray-retro'").fetchone() is not None
    except sqlite3.Error:  # no table yet, or the job holds a write lock: not ready at this poll
        return False


def _run(workdir: Path, run_name: str):
    """(MlflowClient, the run named `run_name`) from the workdir's store, (None, None) before it exists."""
    from mlflow import MlflowClient

    db = workdir / "mlflow.db"
    if not _store_ready(db):
        return None, None
    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("ratray-retro")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ratray.run_name` = '{run_name}'") if exp else []
    return c, (runs[0] if runs else None)


def mlflow_steps(workdir: Path, run_name: str, key: str = "loss") -> list[tuple[int, float, float]]:
    """(step, value, MLflow timestamp in s) of the run's `key` points, by timestamp ([] before it exists)."""
    c, r = _run(workdir, run_name)
    if r is None:
        return []
    hist = sorted(c.get_metric_history(r.info.run_id, key), key=lambda m: m.timestamp)
    return [(m.step, m.value, m.timestamp / 1e3) for m in hist]


def _describe(pid: int, killed: dict | None) -> str:
    """A process's title and parent, and when it was first seen relative to the kill."""
    import psutil

    try:
        p = psutil.Process(pid)
        who = f"{' '.join(p.cmdline())[:60]!r} parent {p.ppid()}"
    except psutil.Error:
        who = "gone"
    return who + (f", {time.time() - killed['at']:+.1f} s from the kill" if killed else ", before the kill")


def _steps_now(workdir: Path, run_name: str) -> list[tuple[int, float, float]]:
    """mlflow_steps for the watcher's poll: while the job writes, sqlite may answer "database is
    locked"; then this poll sees no new step and the next one reads again."""
    from sqlalchemy.exc import OperationalError

    try:
        return mlflow_steps(workdir, run_name)
    except OperationalError as e:
        if "locked" not in str(e):
            raise
        return []


def job_state(lr, job_id: str) -> tuple[str, str]:
    """(status, message) from the job API, or ("unreachable", why) when it does not answer."""
    try:
        info = lr.job_info(job_id)
        return str(info.get("status")), str(info.get("message") or "")
    except Exception as e:  # the dashboard is down or restarting
        return "unreachable", f"{type(e).__name__}: {e}"


def watch(lr, job_id: str, workdir: Path, run_name: str, kill_at: int, deadline: float,
          after_kill: float, restarts: bool) -> dict:
    """Poll until the job ends (or `deadline`): the pids by role, the job states seen; SIGKILL the
    gcs_server once the run logged step `kill_at` (`restarts`: then time its port coming back).
    Without a restart, stop `after_kill` seconds after the kill if the job has not ended (a head
    without fault tolerance may never answer again)."""
    seen: dict[str, set[int]] = {r: set() for r in ROLES}
    first_seen: dict[int, str] = {}
    states, killed, pre_kill, alive, status_after = [], None, None, [], None
    while time.time() < deadline:
        now = role_pids(lr)
        for role, pids in now.items():
            for pid in pids - seen[role]:  # who it was, for a report that counts more than expected
                first_seen[pid] = _describe(pid, killed)
            seen[role] |= pids
        counts = {r: len(p) for r, p in now.items()}
        if killed and (not alive or alive[-1][1] != counts):  # after the kill: who is still running
            alive.append((round(time.time() - killed["at"], 1), counts))
        if killed and status_after is None and time.time() > killed["at"] + 5:
            status_after = {k: v for k, v in lr.status().items() if k in ("up", "problem", "gcs_restarts")}
        status, msg = job_state(lr, job_id)
        if not states or states[-1][1] != status:
            states.append((round(time.time(), 2), status, msg[:500]))
        if status in localray.TERMINAL:
            break
        if killed is None:
            steps = _steps_now(workdir, run_name)
            if steps and steps[-1][0] >= kill_at:
                pre_kill = {r: sorted(p) for r, p in seen.items()}
                gcs = lr.read_state()["gcs_pid"]
                t_kill = time.time()  # before the kill: this process is niced and may wait for a core after it
                os.kill(gcs, signal.SIGKILL)
                killed = {"at": t_kill, "gcs_pid": gcs, "after_step": steps[-1][0]}
                if restarts:
                    killed["gcs_port_back_s"] = port_back(lr.port, killed["at"], after_kill)
        elif not restarts and time.time() > killed["at"] + after_kill:
            break
        time.sleep(0.25)
    return {"pids_seen": {r: sorted(p) for r, p in seen.items()}, "pids_first_seen": first_seen,
            "pids_before_kill": pre_kill,
            "job_states": states, "kill": killed, "running_after_kill": alive,
            "local_sh_status_5s_after_kill": status_after}


def port_back(port: int, since: float, limit: float) -> float | None:
    """Seconds from `since` (the kill) until the GCS port, once closed, accepts connections again
    (None: not within `limit`)."""
    closed = False
    while time.time() < since + limit:
        busy = localray.port_busy(port)
        if closed and busy:
            return round(time.time() - since, 2)
        closed = closed or not busy
        time.sleep(0.02)
    return None


def stall(steps: list[tuple[int, float, float]], killed_at: float, back_at: float | None) -> dict:
    """The step gaps (MLflow timestamps of consecutive steps), in seconds: the median, the longest,
    the one spanning the kill, and the longest ending while the GCS was down or within 10 s of its
    restart (`back_at`; the whole rest of the run when it never came back) and how much longer
    than the median that one is: the stall."""
    gaps = [(b[2] - a[2], a[2], b[2], b[0]) for a, b in zip(steps, steps[1:])]
    if not gaps:
        return {}
    med = statistics.median(g[0] for g in gaps)
    end = back_at + 10 if back_at else math.inf
    outage = [g for g in gaps if killed_at <= g[2] <= end]
    worst = max(outage) if outage else None
    return {"median_step_gap_s": round(med, 3), "max_step_gap_s": round(max(gaps)[0], 3),
            "max_gap_before_step": max(gaps)[3],
            "gap_spanning_kill_s": next((round(g[0], 3) for g in gaps if g[1] <= killed_at <= g[2]), None),
            "max_gap_in_outage_s": round(worst[0], 3) if worst else None,
            "max_gap_in_outage_before_step": worst[3] if worst else None,
            "stall_s": round(worst[0] - med, 3) if worst else None}


def scenario(workdir: Path, redis: str | None, steps: int, kill_at: int, port: int,
             run_name: str = "gcs-kill", timeout: float = 900.0, after_kill: float = 150.0,
             restart_delay: float = 0.0) -> dict:
    """Start the head (GCS state in `redis`, or none), submit the training job, kill the GCS at
    step `kill_at`, wait for the end; returns the report (see the module docstring).
    `restart_delay`: the keeper waits that long before restarting the GCS (a slow head pod)."""
    tmp = tempfile.mkdtemp(prefix="ratray-gt-", dir="/tmp")
    lr = localray.LocalRay(port=port, dashboard_port=port + 2000, temp_dir=tmp, auth="disabled",
                           extra_env={**ENV, "HOME": tmp, "PYTHONPATH": str(ROOT),
                                      "RATRAY_GCS_RESTART_DELAY_S": str(restart_delay)})
    rep: dict = {"gcs_fault_tolerance": f"Redis {redis}" if redis else "off (no Redis)", "steps_planned": steps,
                 "kill_at_step": kill_at, "restart_delay_s": restart_delay if redis else None}
    try:
        t0 = time.time()
        lr.up(num_cpus=2, object_store_memory=200 * 1024 * 1024, gcs_ft=redis, quiet=True)
        rep["head_up_s"] = round(time.time() - t0, 1)
        job_id, _ = lr.submit(train_entrypoint(workdir, run_name, steps), working_dir=ROOT, follow=False,
                              stream=open(os.devnull, "w"))
        rep.update(watch(lr, job_id, workdir, run_name, kill_at, time.time() + timeout, after_kill, bool(redis)))
        rep["job_s"] = round(time.time() - t0, 1)
        state = lr.read_state() or {}
        rep["gcs_restarts"] = state.get("gcs_restarts", [])
        rep["local_sh_status"] = {k: v for k, v in lr.status().items() if k in ("up", "problem", "gcs_restarts")}
        rep["job_status"], rep["job_message"] = job_state(lr, job_id)
        try:
            logs = lr.job_logs(job_id)
            rep["job_log_tail"] = logs[-1500:]
            # the workers' progress lines reach the job's log through the GCS (its log pub-sub)
            rep["job_log_last_step"] = max((int(m) for m in re.findall(r"\[ratray\] step (\d+)/", logs)), default=None)
        except Exception as e:
            rep["job_log_tail"] = f"(the job API did not answer: {type(e).__name__}: {e})"
        rep["driver_log_tail"] = driver_log_tail(lr, job_id)
    finally:
        lr.down(grace=6.0, quiet=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return judge(rep, workdir, run_name, steps)


def driver_log_tail(lr, job_id: str) -> str:
    """The job driver's log file on the head (readable even when the job API is gone)."""
    logs = sorted(lr.ray_dir.glob(f"session_*/logs/job-driver-{job_id}.log"))
    return logs[-1].read_text(errors="replace")[-1500:] if logs else ""


def judge(rep: dict, workdir: Path, run_name: str, steps: int) -> dict:
    """Steps, stall and verdict from the run's MLflow record and summary."""
    hist = mlflow_steps(workdir, run_name)
    summary = workdir / "runs" / run_name / "summary.json"
    rep["steps_completed"] = json.loads(summary.read_text())["steps"] if summary.exists() else None
    logged = [s for s, _, _ in hist]
    rep["steps_logged"], rep["steps_logged_once"] = len(logged), logged == list(range(1, len(logged) + 1))
    rep["loss_finite"] = all(math.isfinite(v) for _, v, _ in hist)
    _, r = _run(workdir, run_name)
    rep["resumed_from_step"] = r.data.tags.get("ratray.resumed_from_step") if r else None
    # each step's neighbours came from the shard actors: a search of non-zero latency was logged for it
    rep["steps_with_online_retrieval"] = sum(v > 0 for _, v, _ in mlflow_steps(workdir, run_name,
                                                                               "retrieval_inflight_ms"))
    if rep.get("kill"):
        back = rep["gcs_restarts"][0]["restarted"] if rep["gcs_restarts"] else None
        rep.update(stall(hist, rep["kill"]["at"], back))
    seen = rep.get("pids_seen", {})
    rep["shard_actors_restarted"] = len(seen.get("shard", [])) > 2
    rep["train_workers_restarted"] = len(seen.get("train_worker", [])) > 2
    rep["passed"] = bool(rep.get("kill") and rep.get("job_status") == "SUCCEEDED" and rep["steps_completed"] == steps
                         and logged == list(range(1, steps + 1)) and rep["loss_finite"]
                         and rep["steps_with_online_retrieval"] == steps
                         and rep["resumed_from_step"] == "0" and len(rep["gcs_restarts"]) == 1
                         and len(seen.get("shard", [])) == 2 and len(seen.get("train_worker", [])) == 2)
    return rep


def headline(rep: dict) -> str:
    """The result in a few lines: what happened to the job, the stall, and without a restart what
    `status` and the job's driver said."""
    k = rep.get("kill") or {}
    restarts = rep.get("gcs_restarts") or []
    back = (f"the keeper restarted it {restarts[0]['restarted'] - restarts[0]['found_dead']:.2f} s after "
            f"finding it dead, its port answered {k.get('gcs_port_back_s')} s after the kill"
            if restarts else "nothing restarted it")
    lines = [f"GCS ({rep['gcs_fault_tolerance']}) SIGKILLed after step {k.get('after_step')} of "
             f"{rep['steps_planned']}: {back}; job {rep.get('job_status')}, {rep['steps_logged']} steps logged "
             f"(summary: {rep['steps_completed']}), {rep['steps_with_online_retrieval']} with online retrieval, "
             f"resumed_from_step {rep['resumed_from_step']}, shard actors restarted: {rep['shard_actors_restarted']}, "
             f"Ray Train workers restarted: {rep['train_workers_restarted']} -> "
             f"{'PASS' if rep['passed'] else 'not passed'}",
             f"step gaps: median {rep.get('median_step_gap_s')} s; spanning the kill {rep.get('gap_spanning_kill_s')} s; "
             f"longest while the GCS was down or within 10 s of its restart {rep.get('max_gap_in_outage_s')} s "
             f"(before step {rep.get('max_gap_in_outage_before_step')}): stall {rep.get('stall_s')} s; longest of the "
             f"run {rep.get('max_step_gap_s')} s (before step {rep.get('max_gap_before_step')})",
             f"the job's log (ray job logs) has the workers' progress lines up to step {rep.get('job_log_last_step')}"]
    if not restarts:
        said = [ln for ln in rep.get("driver_log_tail", "").splitlines() if "GCS" in ln]
        lines += [f"cluster/local.sh status 5 s after the kill: {(rep.get('local_sh_status_5s_after_kill') or {}).get('problem')}",
                  f"running after the kill (s, processes): {rep.get('running_after_kill')}",
                  f"the job's driver said last: {said[-1].split('] ', 1)[-1][:200] if said else '(nothing about the GCS)'}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="a built small index (default: built in a temp folder)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=12, help="SIGKILL gcs_server once this step is logged")
    ap.add_argument("--redis", default=os.environ.get("RATRAY_REDIS_ADDRESS", "127.0.0.1:6379"))
    ap.add_argument("--no-redis", action="store_true", help="a head without GCS fault tolerance")
    ap.add_argument("--restart-delay", type=float, default=0.0,
                    help="seconds the keeper waits before restarting the GCS (a slow head pod)")
    ap.add_argument("--port", type=int, default=6670)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    a = ap.parse_args()
    if not 0 < a.kill_at < a.steps:
        ap.error(f"--kill-at must be within 1..{a.steps - 1} (--steps), got {a.kill_at}")
    own = a.workdir is None
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="ratray-gtw-")).resolve()
    try:
        if not (wd / "index").is_dir():
            build(wd)
        name = f"gcs-kill-{int(time.time())}"
        rep = scenario(wd, None if a.no_redis else a.redis, a.steps, a.kill_at, a.port, run_name=name,
                       restart_delay=a.restart_delay)
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    print(json.dumps(rep, indent=1, default=str))
    print(headline(rep))
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=1, default=str))
    return 0 if rep["passed"] or a.no_redis else 1


if __name__ == "__main__":
    sys.exit(main())
