"""REALM's null document: a learned logit that is trained from the first step (ratray/realm/model.py).

p(∅|x) starts at 1/k whatever the towers score, receives the marginal likelihood's gradient, and
moves the way the data says: up on a corpus of random blocks (retrieval useless), down when the
retrieved block holds the answer (retrieval useful). Tiny random-init models, CPU, seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratray.realm.model import IGNORE, Realm, RealmConfig

ANSWERS = np.arange(10, 64)  # non-special ids of the tiny vocabulary


def tiny(**over) -> RealmConfig:
    return RealmConfig.tiny(**{"k": 3, "query_tokens": 4, "chunk_tokens": 4, **over})


def _batch(rng: np.random.Generator, cfg: RealmConfig, b: int, useful: bool):
    """Query: 3 context tokens then [MASK]. useful: block 0 holds the context and the answer, the
    answer is random (only a block can tell it); useless: the answer is the first context token
    (the query alone tells it) and both blocks are random tokens of the answers' range."""
    q, t = cfg.query_tokens, cfg.chunk_tokens
    query = torch.zeros(b, q, dtype=torch.long)
    labels = torch.full((b, q), IGNORE)
    blocks = torch.from_numpy(rng.choice(ANSWERS, (b, cfg.k - 1, t))).long()
    for i in range(b):
        ctx = rng.choice(ANSWERS, 4, replace=False)
        if not useful:
            ctx[3] = ctx[0]
        query[i, :3] = torch.from_numpy(ctx[:3])
        query[i, 3] = cfg.mask_id
        labels[i, 3] = int(ctx[3])
        if useful:
            blocks[i, 0] = torch.from_numpy(ctx)
    return query, labels, blocks


def _train(useful: bool, steps: int = 150) -> list[float]:
    """Train everything (towers, reader, null logit); mean p(∅|x) on a held-out batch, before and after."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = tiny()
    model = Realm(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    held = _batch(np.random.default_rng(99), cfg, 64, useful)
    p_null = []
    for step in range(steps + 1):
        if step in (0, steps):
            with torch.no_grad():
                p_null.append(float(model(*held)["log_pz"][:, -1].exp().mean()))
        if step == steps:
            break
        out = model(*_batch(rng, cfg, 32, useful))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return p_null


@pytest.mark.parametrize("scale", [1.0, 16.0, 64.0])
def test_null_document_starts_at_one_over_k_whatever_the_score_scale(scale):
    torch.manual_seed(0)
    cfg = tiny(score_scale=scale, k=4)
    model = Realm(cfg).eval()
    q, lab, blk = _batch(np.random.default_rng(0), cfg, 8, useful=True)
    with torch.no_grad():
        p = model(q, lab, blk)["log_pz"][:, -1].exp()
    torch.testing.assert_close(p, torch.full_like(p, 1 / 4))


def test_null_init_sets_the_starting_null_probability():
    cfg = tiny(null_init=2.0)
    q, lab, blk = _batch(np.random.default_rng(0), cfg, 8, useful=True)
    with torch.no_grad():
        p = Realm(cfg).eval()(q, lab, blk)["log_pz"][:, -1].exp()
    expected = 1 / (1 + 2 * np.exp(-2.0))
    torch.testing.assert_close(p, torch.full_like(p, expected))


def test_null_logit_receives_gradient():
    torch.manual_seed(0)
    cfg = tiny()
    model = Realm(cfg)
    model(*_batch(np.random.default_rng(0), cfg, 8, useful=True))["loss"].backward()
    assert model.null_bias.grad is not None and float(model.null_bias.grad.abs()) > 0
    assert float(model.null_query.grad.abs().sum()) > 0  # the query-dependent part too


@pytest.fixture(scope="module")
def trained():
    return {"useless": _train(useful=False), "useful": _train(useful=True)}


def test_null_probability_rises_when_retrieval_is_useless(trained):
    before, after = trained["useless"]
    assert after > before + 0.15, (before, after)


def test_null_probability_falls_when_retrieval_is_useful(trained):
    before, after = trained["useful"]
    assert after < before - 0.15, (before, after)



def test_a_shift_of_all_block_scores_gets_no_gradient():
    """p(∅|x) and p(z|x) are invariant to adding one constant to a query's block scores (∅'s logit
    holds their log-mean-exp), so the gradient must not move that common mode either: per query,
    Σ_z ∂L/∂s_z = 0. With the log-mean-exp stopped it was (post_∅ − prior_∅)/n: every retrieved
    block pushed up whenever the blocks beat ∅, down whenever ∅ won."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Realm(cfg)
    with torch.no_grad():
        model.null_bias.fill_(1.0)  # p(∅|x) away from 1/k, and depending on the query
        model.null_query.normal_(0.0, 1.0)
    seen = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            seen[name] = out
        return hook

    model.query_tower.register_forward_hook(keep("e_x"))
    model.doc_tower.register_forward_hook(keep("e_z"))
    q, lab, blk = _batch(np.random.default_rng(0), cfg, 8, useful=True)
    out = model(q, lab, blk)
    out["loss"].backward()
    b, k1 = blk.shape[:2]
    e_x = seen["e_x"].detach()  # (b p)
    g_ez = seen["e_z"].grad.view(b, k1, -1)  # (b k-1 p) = ∂L/∂s_z · e_x: e_z enters only s_z
    g_s = torch.einsum("bkp,bp->bk", g_ez, e_x) / (e_x * e_x).sum(1, keepdim=True)  # (b k-1)
    torch.testing.assert_close(g_s.sum(1), torch.zeros(b), rtol=0, atol=1e-7)
    assert float(g_s.abs().max()) > 1e-6  # the blocks themselves do get gradient (a random reader: small)
    post = torch.softmax(out["log_pz"] + out["logp_yz"], -1)
    assert float((post - out["log_pz"].exp())[:, -1].abs().max()) > 1e-4  # ∅'s posterior moved
