"""RETRO against its baselines in one command (what jobs/retro_experiment.py calls).

    build the database once ─ train, on identical data, tokens and schedule:
        baseline-N   the RETRO decoder without the encoder and CCA
        baseline-4N  the same with twice the width: about 4x its non-embedding parameters
        RETRO-N      the decoder of baseline-N with retrieval
        [RETROfit]   baseline-N's decoder frozen, encoder + CCA trained for a share of its steps
    ─ evaluate RETRO-N against all of them on the same bytes (ratray/retro/evaluate.py)
    ─ <workdir>/experiments/<name>/: experiment.json, experiment.md (+ the evaluation's plots)

Every training goes through the same Ray Train + DeepSpeed path as jobs/retro_pretrain.py, each
under its own run name, so a re-run resumes or reuses what finished (a run whose summary shows the
requested steps is not trained again). The report adds to the evaluation what training cost: steps,
tokens, passes over the training split, wall time and the median step time (the first logging
interval, which holds start-up, left out); RETRO ÷ baseline-N step time is the compute price of
retrieval (InstructRetro paid ×1.31 in GPU-hours).
"""
from __future__ import annotations

import dataclasses
import json
import statistics

from ratray.retro.config import RetroJobConfig
from ratray.workdir import Workdir

RETROFIT_SHARE = 0.25  # RETROfit trains for this share of the baseline's steps (RETRO: 3% of its data)


def plans(job: RetroJobConfig, name: str, retrofit: bool,
          retrofit_share: float) -> list[tuple[str, RetroJobConfig]]:
    """(role, job config) of every training, in order (RETROfit needs baseline-N first)."""
    t, m = job.train, job.model

    def plan(role: str, model_type: str, model=None, **train) -> tuple[str, RetroJobConfig]:
        return role, dataclasses.replace(
            job, model_type=model_type, model=dataclasses.replace(model or m, model=model_type),
            train=dataclasses.replace(t, run_name=f"{name}-{role}", **train))

    wide = dataclasses.replace(m, d_model=2 * m.d_model)  # params per layer ~ d²: ~4x
    out = [plan("baseline-N", "baseline"), plan("baseline-4N", "baseline", wide), plan("RETRO-N", "retro")]
    if retrofit:
        steps = max(1, round(retrofit_share * t.steps))
        role, fit = plan("RETROfit", "retro", dataclasses.replace(m, zero_init_cca=True), steps=steps,
                         warmup_steps=min(t.warmup_steps, steps), checkpoint_every=max(1, steps))
        out.append((role, dataclasses.replace(fit, init_from=f"{name}-baseline-N")))
    return out


def finished(wd: Workdir, job: RetroJobConfig) -> dict | None:
    """The summary of a run that already trained all its steps, else None."""
    path = wd.run_summary(job.train.run_name)
    if path.is_file():
        s = json.loads(path.read_text())
        if s.get("steps") == job.train.steps:
            return s
    return None


def median_step_s(summary: dict) -> float | None:
    """Median of the logged per-interval step times, the first interval (start-up) left out."""
    from mlflow import MlflowClient

    ml = summary.get("mlflow") or {}
    if not ml.get("run_id"):
        return None
    hist = sorted(MlflowClient(ml["tracking_uri"]).get_metric_history(ml["run_id"], "step_time_s"),
                  key=lambda m: m.step)
    values = [m.value for m in hist[1:]] or [m.value for m in hist]
    return statistics.median(values) if values else None


def run_experiment(job: RetroJobConfig, name: str = "experiment", retrofit: bool = False,
                   retrofit_share: float = RETROFIT_SHARE, fractions=(0.1, 0.3, 1.0), sequences: int = 0,
                   progress: bool = True) -> dict:
    """Build, train every model (or reuse finished runs), evaluate; write and return the report."""
    from ratray.build import build
    from ratray.data.store import ChunkStore
    from ratray.retro import driver
    from ratray.retro.evaluate import evaluate

    wd = Workdir(job.workdir)
    job = dataclasses.replace(job, workdir=str(wd.root))
    built = build(job, progress=progress)
    store = ChunkStore.open(built["chunk_store"]["path"])
    train_tokens = int(store.meta["counts"]["tokens"]["train"])
    todo = plans(job, name, retrofit, retrofit_share)
    for _, plan in todo:  # every check of every run before the first one trains (a RETROfit's
        driver.resolve(dataclasses.replace(plan, init_from=None))  # source is checked at its turn)
    training = {}
    for role, plan in todo:
        s = finished(wd, plan) or driver.run(plan, progress=progress)
        training[role] = {"run": plan.train.run_name, "steps": s["steps"], "tokens": s["tokens"],
                          "passes": s["tokens"] / max(1, train_tokens), "wall_time_s": s["wall_time_s"],
                          "median_step_s": median_step_s(s)}
    runs = {role: t["run"] for role, t in training.items()}
    others = tuple(r for role, r in runs.items() if role != "RETRO-N")
    report = evaluate(str(wd.root), runs["RETRO-N"], others, fractions, sequences, progress=progress)
    base, retro = training["baseline-N"]["median_step_s"], training["RETRO-N"]["median_step_s"]
    experiment = {
        "name": name, "training": training, "train_tokens": train_tokens,
        "step_time_retro_over_baseline": retro / base if base and retro else None,
        "database": {"chunks": int(built["counts"]["index_vectors"]),
                     "share_r_ge_0.5": report["eval"]["share_r_ge_0.5"]},
        "evaluation": report,
    }
    write(wd, experiment)
    return experiment


def write(wd: Workdir, experiment: dict) -> None:
    from ratray.eval.report import format_experiment

    out = wd.experiment(experiment["name"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(experiment, indent=2))
    (out / "experiment.md").write_text(format_experiment(experiment))
