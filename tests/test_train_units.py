"""Training plumbing without Ray: sampler, DeepSpeed config, learning-rate schedule, batches."""
import json

import numpy as np
import pytest

from ratray.config import ConfigError, TrainConfig
from ratray.train.sampler import SequenceSampler
from ratray.train.deepspeed_cfg import deepspeed_config, lr_at


def test_sampler_is_disjoint_across_ranks_and_microsteps_and_covers_an_epoch():
    s = SequenceSampler(24, seed=3)
    got = [s.for_step(step, micro, rank, 2, 2, 3) for step in range(2) for rank in range(3) for micro in range(2)]
    flat = np.concatenate(got)
    assert sorted(flat.tolist()) == list(range(24))  # 2 steps x 12 = one epoch, each once
    again = SequenceSampler(24, seed=3)
    assert np.array_equal(again.for_step(1, 1, 2, 2, 2, 3), s.for_step(1, 1, 2, 2, 2, 3))  # resumable
    assert not np.array_equal(SequenceSampler(24, seed=4).take(0, 24), s.take(0, 24))


def test_lr_warms_up_then_decays_to_the_floor():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(i, t) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, t) == pytest.approx(1e-4)


def test_deepspeed_config_reflects_train_config_and_user_overrides(tmp_path):
    t = TrainConfig(zero_stage=3, precision="bf16", micro_batch=2, grad_accum=4)
    c = deepspeed_config(t, world_size=2)
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"]
    assert c["train_batch_size"] == 16 and c["zero_allow_untested_optimizer"]
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True},
                             "train_micro_batch_size_per_gpu": 3}))
    c = deepspeed_config(TrainConfig(deepspeed_config=str(f)), world_size=2)
    assert c["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert c["train_batch_size"] == 3 * 2
    f.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(TrainConfig(deepspeed_config=str(f)), world_size=1)


def test_fp16_is_refused_up_front():
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")


def test_a_worker_death_is_retried_from_the_checkpoint_by_default(tmp_path):
    """One dead Ray Train worker must not fail a run: the default retries the worker group (every
    retry calls the train loop again, which resumes from `ray.train.get_checkpoint()`)."""
    from ratray.train.trainer import make_trainer

    trainer = make_trainer(lambda config: None, {"model": {}}, TrainConfig(), str(tmp_path))
    assert trainer.run_config.failure_config.max_failures >= 1
    assert make_trainer(lambda config: None, {"model": {}}, TrainConfig(max_failures=0),
                        str(tmp_path)).run_config.failure_config.max_failures == 0
