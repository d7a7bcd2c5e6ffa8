"""REALM's reader warm-up (job `freeze_towers_steps`, ratray/realm/worker.py `hold_towers`): the
towers stay exactly as they were while the reader learns, then train.

Driven the way the DeepSpeed engine drives the optimizer: AdamW over `Realm.param_groups`, a
LambdaLR schedule stepped after every optimizer step, `hold_towers` before every forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratray.config import ConfigError, load_config
from ratray.realm.config import RealmJobConfig
from ratray.realm.model import IGNORE, Realm, RealmConfig
from ratray.realm.worker import hold_towers

WARMUP, STEPS = 3, 6


def _batch(rng: np.random.Generator, cfg: RealmConfig, b: int = 8):
    query = torch.from_numpy(rng.integers(10, 64, (b, cfg.query_tokens))).long()
    labels = torch.full_like(query, IGNORE)
    labels[:, 1] = query[:, 1]
    query[:, 1] = cfg.mask_id
    return query, labels, torch.from_numpy(rng.integers(10, 64, (b, cfg.k - 1, cfg.chunk_tokens))).long()


def _snapshot(model: Realm) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"towers": ("query_tower", "doc_tower"), "reader": ("reader", "mlm_", "null_")}
    return {part: {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(pre)}
            for part, pre in parts.items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def warmup_run():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = RealmConfig.tiny()
    model = Realm(cfg)
    opt = torch.optim.AdamW(model.param_groups(0.01, 1e-2, 0.5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    snaps, tower_grads = [_snapshot(model)], []
    for step in range(STEPS):
        hold_towers(model, opt.param_groups, frozen=step < WARMUP)
        out = model(*_batch(rng, cfg))
        opt.zero_grad()
        out["loss"].backward()
        tower_grads.append(any(p.grad is not None for p in model.query_tower.parameters()))
        opt.step()
        sched.step()
        snaps.append(_snapshot(model))
    return snaps, tower_grads


def test_towers_do_not_change_during_the_warm_up(warmup_run):
    snaps, _ = warmup_run
    for step in range(1, WARMUP + 1):
        assert _changed(snaps[0]["towers"], snaps[step]["towers"]) == 0, f"a tower moved at step {step}"


def test_reader_and_null_logit_learn_during_the_warm_up(warmup_run):
    snaps, _ = warmup_run
    assert _changed(snaps[0]["reader"], snaps[WARMUP]["reader"]) == len(snaps[0]["reader"])


def test_frozen_towers_get_no_gradient_then_do(warmup_run):
    _, grads = warmup_run
    assert grads == [False] * WARMUP + [True] * (STEPS - WARMUP)


def test_towers_train_after_the_warm_up(warmup_run):
    snaps, _ = warmup_run
    towers = snaps[WARMUP]["towers"]
    assert _changed(towers, snaps[WARMUP + 1]["towers"]) == len(towers)  # every tower tensor moves


def test_freeze_towers_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="freeze_towers_steps"):
        load_config(RealmJobConfig, None, ["freeze_towers_steps=-1"])
