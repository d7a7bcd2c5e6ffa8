"""A Ray Train worker SIGKILLed mid-run: the default `train.max_failures` retries the worker group,
which resumes from the last checkpoint, finishes every step and logs each step to MLflow once.

Two worker-group starts make it a multi-minute test (3 min on a busy 2-core node), past what
`make test` affords per test: it runs with RATRAY_CHAOS=1 (beside bench/chaos.py's scenarios)."""
import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ratray.config import load_config
from ratray.retro.config import RetroJobConfig
from ratray.retro.driver import run
from ratray.tracking import tracking_uri

_chaos = importlib.util.spec_from_file_location(  # bench/ is not a package: its file, loaded once
    "ratray_chaos", Path(__file__).resolve().parents[1] / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_chaos)
_chaos.loader.exec_module(chaos)
train_worker_pids = chaos.train_worker_pids  # this cluster's Ray Train worker processes

TINY = ["model_type=baseline", "model.n_layer=2", "model.d_model=64", "model.n_head=2",
        "model.seq_len=128", "train.micro_batch=2", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_sequences=8", "train.num_workers=2", "train.zero_stage=2",
        "train.checkpoint_every=5", "train.steps=60", "train.run_name=t-retry"]


def registered_step(run_root) -> int | None:
    """The step of the newest checkpoint Ray Train has registered (its snapshot file: a folder
    on disk is not yet one a retry resumes from), or None."""
    try:
        snap = json.loads((run_root / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RATRAY_CHAOS"), reason="multi-minute: set RATRAY_CHAOS=1")
def test_a_killed_train_worker_is_retried_and_resumes_from_its_last_checkpoint(small_workdir):
    wd, _, _ = small_workdir
    job = load_config(RetroJobConfig, None, TINY + [f"workdir={wd}"])
    assert job.train.max_failures >= 1  # the default, not set here
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(summary=run(job, progress=False)), daemon=True)
    th.start()
    killed, registered = None, None
    deadline = time.monotonic() + 600
    while th.is_alive() and killed is None and time.monotonic() < deadline:
        registered = registered_step(wd / "ray_results" / "t-retry")
        pids = train_worker_pids()
        if registered is not None and pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed = pids[-1]
        time.sleep(0.1)
    th.join(timeout=600)
    assert killed is not None and registered < 60, "the run ended before a worker was killed"
    s = out["summary"]  # absent if the run failed: the thread's exception is in the log above
    assert s["steps"] == 60

    c = MlflowClient(tracking_uri(wd))
    r = c.get_run(s["mlflow"]["run_id"])
    resumed = int(r.data.tags["ratray.resumed_from_step"])
    assert resumed >= registered and resumed % 5 == 0  # the retry resumed from a checkpoint
    steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # every step once: redone steps not re-logged
