"""The driver's side of training, shared by every method: the Ray Train `TorchTrainer` of a run and
the run's `summary.json`."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from ratray.workdir import SUMMARY, Workdir


def make_trainer(train_fn, loop_config: dict, t, workdir: str):
    """The Ray Train `TorchTrainer` of a run: `t.num_workers` workers, resumable by `t.run_name`
    (same storage path + name = resume), `t.max_failures` retries, `t.keep_checkpoints` kept;
    CheckpointError if the run would resume from a checkpoint of another setup
    (`checkpoint.check_resume`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ratray.train.checkpoint import check_resume, run_meta

    storage = Workdir(workdir).ray_results(t.storage_path)
    if "://" not in storage:  # a local run folder: refuse a mismatching resume before any work
        check_resume(Path(storage) / t.run_name, run_meta(t.num_workers, t.micro_batch,
                                                          t.grad_accum, loop_config["model"]))
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=t.run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             # Ray Train's INFO lines off the console (its per-report line is
                             # logged under a file path, past this: train/worker.quiet_libraries)
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def write_summary(job, run_dir: Path, result, timings: dict, head: dict, tail: dict) -> dict:
    """`run_dir/summary.json` of a finished run (driver side): the job's own `head` fields, what
    every run reports (wall time, timings, checkpoint, MLflow record, run folder), then `tail`;
    also attached to the run's MLflow record. Returns the summary."""
    from mlflow import MlflowClient

    from ratray.tracking import tracking_uri

    run_id = (result.metrics or {}).get("mlflow_run_id")
    summary = {
        **head,
        "wall_time_s": round(timings["total_s"], 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "mlflow": {"tracking_uri": tracking_uri(job.workdir), "experiment": job.experiment,
                   "run_id": run_id},
        "run_dir": str(run_dir.resolve()),
        **tail,
    }
    path = run_dir / SUMMARY
    path.write_text(json.dumps(summary, indent=2, default=str))
    if run_id:
        MlflowClient(tracking_uri(job.workdir)).log_artifact(run_id, str(path))
    return summary


def load_weights(checkpoint: str | Path) -> dict:
    """The model's fp32 state dict from a run's Ray Train checkpoint folder (any ZeRO stage: the
    shards every rank saved are consolidated), on the CPU; CheckpointError if it fails
    `checkpoint.verify`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ratray.train.checkpoint import CKPT_TAG, verify

    path = Path(checkpoint)
    if not (path / CKPT_TAG).is_dir():
        raise FileNotFoundError(f"{path} is not a ratray checkpoint (no {CKPT_TAG}/ folder)")
    verify(path)  # DeepSpeed's merge unpickles with weights_only=False: only checked files
    quiet = io.StringIO()  # DeepSpeed prints every step of the merge, and a progress bar
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=CKPT_TAG)
