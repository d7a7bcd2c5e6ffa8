"""RETROfitting: a baseline decoder loaded and frozen, only encoder + CCA train; step 0 is the baseline."""
from __future__ import annotations

import pytest
import torch

from ratray.retro.model import Retro, RetroConfig
from ratray.retro.retrofit import freeze_decoder, load_decoder

M, N, V = 4, 16, 64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def pair():
    """A 'trained' baseline (random weights, seeded) and a RETRO model RETROfitted from it."""
    torch.manual_seed(0)
    cfg = RetroConfig.tiny(zero_init_cca=True)
    baseline = Retro(cfg.as_baseline())
    torch.manual_seed(1)  # another init: everything the baseline has must come from its weights
    model = Retro(cfg)
    load_decoder(model, baseline.state_dict())
    return baseline, model


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, V, (4, N), generator=g)
    return idx, torch.randint(1, V, (4, N // M, 2, 2 * M), generator=g), torch.roll(idx, -1, 1)


def test_step_zero_loss_equals_the_baselines(pair):
    baseline, model = pair
    idx, nb, tgt = batch(0)
    with torch.no_grad():
        fitted, base = model.eval()(idx, nb, tgt)[1].item(), baseline.eval()(idx, None, tgt)[1].item()
    assert fitted == pytest.approx(base, abs=1e-6)


def test_training_changes_only_the_retrieval_path(pair):
    baseline, model = pair
    trainable, frozen = freeze_decoder(model)
    assert trainable == sum(p.numel() for p in model.retrieval_parameters()) and frozen > trainable
    decoder = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    retrieval = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    for s in range(3):
        idx, nb, tgt = batch(s)
        loss = model.train()(idx, nb, tgt)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in decoder.items())  # frozen, no weight decay
    assert set(decoder) == set(baseline.state_dict()) - {"lm_head.weight"}  # tied to wte
    assert any(not torch.equal(params[n], w) for n, w in retrieval.items())


def test_a_baseline_of_another_shape_is_refused():
    other = Retro(RetroConfig.tiny(d_model=48).as_baseline())
    with pytest.raises((ValueError, RuntimeError)):
        load_decoder(Retro(RetroConfig.tiny()), other.state_dict())
