"""Checkpoint safety (ratray/train/checkpoint.py) on a real DeepSpeed ZeRO-2 checkpoint: a planted
pickle is refused before it runs, a torn or extra file is refused, and a resume with another
world size, micro-batch or model config fails with one line naming the values."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

from ratray.train.checkpoint import CKPT_TAG, CheckpointError, run_meta, seal, verify

MODEL = {"d_in": 4, "d_hidden": 8, "n_layer": 2}
META = run_meta(1, 2, 1, MODEL)
MODEL_STATES = f"{CKPT_TAG}/mp_rank_00_model_states.pt"


class Planted:
    """Unpickling this runs a shell command: what an attacker would drop into a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save_deepspeed_checkpoint(out: str) -> None:
    """One ZeRO-2 step of a tiny model saved as a ratray checkpoint (in its own process: DeepSpeed
    needs a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from ratray.config import TrainConfig
    from ratray.train.deepspeed_cfg import deepspeed_config, lr_lambda

    deepspeed.init_distributed(dist_backend="gloo")
    t = TrainConfig(zero_stage=2, micro_batch=2, num_workers=1, steps=4, warmup_steps=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(t, 1),
                                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
    engine.backward(engine(torch.randn(2, 4)).sum())
    engine.step()
    engine.save_checkpoint(out, tag=CKPT_TAG, client_state={"step": 1, "history": {}})
    seal(out, 0, META)


@pytest.fixture(scope="module")
def saved(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    task = ray_session.remote(max_calls=1, num_cpus=0)(_save_deepspeed_checkpoint)
    ray_session.get(task.remote(str(out)), timeout=300)
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint for a test to tamper with."""
    return shutil.copytree(saved, tmp_path / "checkpoint")


def _plant(ckpt, tmp_path, rewrite_manifest: bool):
    marker = tmp_path / "pwned"
    torch.save({"module": Planted(marker)}, ckpt / MODEL_STATES)
    if rewrite_manifest:  # an attacker who can write the folder can rewrite the manifest too
        seal(ckpt, 0, META)
    return marker


def test_a_sealed_deepspeed_checkpoint_verifies(ckpt):
    """The real files (ZeRO-2 optimizer states included) pass the weights_only check."""
    assert (ckpt / f"{CKPT_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert verify(ckpt, META) == META


def test_a_planted_pickle_is_refused_and_never_runs(ckpt, tmp_path):
    marker = _plant(ckpt, tmp_path, rewrite_manifest=False)
    with pytest.raises(CheckpointError, match=f"{MODEL_STATES} changed since it was saved"):
        verify(ckpt, META)
    assert not marker.exists()


def test_a_planted_pickle_with_a_rewritten_manifest_is_refused_by_the_weights_only_load(ckpt, tmp_path):
    marker = _plant(ckpt, tmp_path, rewrite_manifest=True)
    with pytest.raises(CheckpointError, match=f"{MODEL_STATES} is not a plain tensor checkpoint "
                                              r"\(unpickling it would call posix.system\)"):
        verify(ckpt, META)
    assert not marker.exists()
    torch.load(ckpt / MODEL_STATES, weights_only=False)  # what DeepSpeed's load would have done
    assert marker.exists()


def test_load_weights_refuses_a_planted_pickle(ckpt, tmp_path):
    """Evaluation and RETROfitting consolidate a checkpoint with DeepSpeed's zero_to_fp32, which
    unpickles without weights_only: the same check comes first."""
    from ratray.train.trainer import load_weights

    marker = _plant(ckpt, tmp_path, rewrite_manifest=False)
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        load_weights(ckpt)
    assert not marker.exists()


def test_an_unlisted_or_missing_manifest_file_is_refused(ckpt, tmp_path):
    shutil.copy(ckpt / MODEL_STATES, ckpt / CKPT_TAG / "extra_optim_states.pt")
    with pytest.raises(CheckpointError, match=f"{CKPT_TAG}/extra_optim_states.pt is not in its manifest"):
        verify(ckpt, META)
    (ckpt / CKPT_TAG / "extra_optim_states.pt").unlink()
    (ckpt / "ratray-manifest.rank0.json").unlink()
    with pytest.raises(CheckpointError, match="no ratray-manifest"):
        verify(ckpt, META)


def test_a_torn_file_is_refused(ckpt):
    path = ckpt / MODEL_STATES
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        verify(ckpt, META)


def test_a_checkpoint_of_another_model_config_names_the_differing_keys(ckpt):
    other = run_meta(1, 2, 1, {**MODEL, "d_hidden": 16, "n_layer": 3})
    with pytest.raises(CheckpointError) as e:
        verify(ckpt, other)
    msg = str(e.value)
    assert "model.d_hidden 8 -> 16" in msg and "model.n_layer 2 -> 3" in msg
    assert "d_in" not in msg and "\n" not in msg


@pytest.mark.parametrize("now, says", [
    (run_meta(2, 2, 1, MODEL), "train.num_workers=1, this run has train.num_workers=2"),
    (run_meta(1, 4, 1, MODEL), "train.micro_batch=2, this run has train.micro_batch=4"),
    (run_meta(1, 2, 3, MODEL), "train.grad_accum=1, this run has train.grad_accum=3"),
])
def test_resume_with_another_world_size_or_micro_batch_is_refused_naming_both(ckpt, now, says):
    """The data position of step t is a function of world size x micro-batch x grad_accum: a
    resume with other values would silently read other examples."""
    with pytest.raises(CheckpointError, match=says):
        verify(ckpt, now)


def test_manifests_of_every_rank_are_required(ckpt):
    m = json.loads((ckpt / "ratray-manifest.rank0.json").read_text())
    m["meta"]["world_size"] = 2  # a two-worker save whose rank 1 never finished
    (ckpt / "ratray-manifest.rank0.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="1 rank manifests for a run of 2 workers"):
        verify(ckpt, META)


def test_a_mismatching_resume_fails_at_the_driver_before_any_worker_starts(saved, tmp_path):
    """A worker's refusal would be retried train.max_failures times: the driver refuses first."""
    from ratray.config import TrainConfig
    from ratray.train.trainer import make_trainer

    run_root = tmp_path / "ray_results" / "r"
    shutil.copytree(saved, run_root / "checkpoint_2026-12-02_01-00-00.000000")
    fn = lambda config: None  # noqa: E731
    same = TrainConfig(run_name="r", num_workers=1, micro_batch=2, grad_accum=1)
    make_trainer(fn, {"model": MODEL}, same, str(tmp_path))  # matches: a trainer
    with pytest.raises(CheckpointError, match="train.num_workers=1, this run has train.num_workers=2"):
        make_trainer(fn, {"model": MODEL}, TrainConfig(run_name="r", micro_batch=2), str(tmp_path))
    with pytest.raises(CheckpointError, match="model.n_layer 2 -> 3"):
        make_trainer(fn, {"model": {**MODEL, "n_layer": 3}}, same, str(tmp_path))


def test_a_manifest_that_points_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    m = json.loads((ckpt / "ratray-manifest.rank0.json").read_text())
    m["files"]["../elsewhere.pt"] = "0" * 64
    (ckpt / "ratray-manifest.rank0.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"lists \.\./elsewhere.pt, outside the checkpoint"):
        verify(ckpt, META)
