"""RETRO on Ray Train + DeepSpeed: a 2-worker run whose loss falls, that checkpoints, resumes at the
right step, and whose MLflow run reads back."""
import json

import pytest
from mlflow import MlflowClient

from ratray.config import ConfigError, load_config
from ratray.retro.config import RetroJobConfig
from ratray.retro.driver import resolve, run
from ratray.tracking import tracking_uri

TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128",
        "model.enc_layers=1", "model.enc_d_model=32", "model.enc_n_head=2", "model.cca_layers=[1,2]",
        "train.micro_batch=2", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_sequences=8", "train.num_workers=2", "train.zero_stage=2"]


def job(wd, *extra):
    return load_config(RetroJobConfig, None, TINY + [f"workdir={wd}", *extra])


@pytest.mark.slow
def test_two_workers_train_checkpoint_resume_and_log_to_mlflow(small_workdir):
    wd, _, _ = small_workdir
    first = run(job(wd, "train.steps=6", "train.checkpoint_every=3", "train.run_name=t-resume"), progress=False)
    assert first["steps"] == 6 and first["checkpoint"]
    hist = json.loads((wd / "runs" / "t-resume" / "final_metrics.json").read_text())
    assert first["val_bpb_retro_on"] > 0 and first["val_bpb_retro_off"] > 0

    # the same run name resumes from step 6 and continues to 9 (data position and schedule intact)
    second = run(job(wd, "train.steps=9", "train.checkpoint_every=3", "train.run_name=t-resume"), progress=False)
    assert second["steps"] == 9

    c = MlflowClient(tracking_uri(wd))
    exp = c.get_experiment_by_name("ratray-retro")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`ratray.run_name` = 't-resume'")
    assert len(runs) == 1  # resumed into the same MLflow run
    r = runs[0]
    assert r.data.params["train.zero_stage"] == "2" and r.data.params["model.n_layer"] == "2"
    assert r.data.tags["ratray.resumed_from_step"] == "6"
    loss = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)]
    steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "loss"))
    assert steps == [2, 3, 4, 6, 8, 9]  # no step logged twice after the resume
    assert loss[-1] < loss[0] - 0.25  # the loss falls
    for key in ("val_bpb_retro_on", "val_bpb_retro_off", "lr", "tokens_per_s"):
        assert c.get_metric_history(r.info.run_id, key), key
    assert hist["step"] == 6
    artifacts = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"summary.json", "loss.png", "config.json", "final_metrics.json"} <= artifacts


def test_bad_configuration_fails_before_any_work(small_workdir, tmp_path):
    wd, _, _ = small_workdir
    with pytest.raises(ConfigError, match="chunks.chunk_tokens"):
        resolve(job(wd, "model.chunk_tokens=64"))
    with pytest.raises(ConfigError, match="model.chunk_size"):  # unknown key: named, not ignored
        resolve(job(wd, "model.chunk_size=64"))
    with pytest.raises(ConfigError, match="model.k"):
        resolve(job(wd, "model.k=100000"))
    with pytest.raises(ConfigError, match="cca_layers"):
        resolve(job(wd, "model.cca_layers=[3]"))
    with pytest.raises(ConfigError, match="seq_len"):
        resolve(job(wd, "model.seq_len=100"))
    with pytest.raises(ConfigError, match="no index"):
        resolve(job(tmp_path))
