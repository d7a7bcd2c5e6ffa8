"""JSA (ratray/realm/jsa.py): the posterior retriever q(z|x,y) and its Metropolis independence sampler.

The sampler's chain, on a small enumerable case, ends distributed as the exact posterior
π(z) ∝ p(z|x) p(y|z,x) (and not as its proposal); JSA training on a constructed case (one
candidate holds the answer) raises that document under the posterior and the prior and teaches the
reader to copy from it, with gradient reaching the posterior tower only through q's own term.
Tiny random-init models, CPU, seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratray.config import ConfigError
from ratray.realm.jsa import jsa_loss, mis_chain, with_answer
from ratray.realm.model import IGNORE, Realm, RealmConfig

from tests.test_realm_model import _copy_batch


def _enumerable(rows: int):
    """5 candidates, the 4th missing: a proposal far from the target, both fixed for every row."""
    log_q = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0, 0.5, 0.3]), 0)
    log_t = torch.tensor([-3.0, 1.0, 0.2, 5.0, -0.5])  # unnormalised; candidate 3 is missing
    keep = torch.tensor([True, True, True, False, True])
    exact = torch.softmax(log_t.masked_fill(~keep, float("-inf")), 0)
    q_kept = torch.softmax(log_q.masked_fill(~keep, float("-inf")), 0)
    expand = lambda x: x.expand(rows, -1).clone()  # noqa: E731
    return expand(log_q), expand(log_t), expand(keep), exact, q_kept


def test_mis_chain_ends_distributed_as_the_exact_posterior():
    log_q, log_t, keep, exact, _ = _enumerable(40_000)
    z, accepted = mis_chain(log_q, log_t, keep, 40, torch.Generator().manual_seed(0))
    freq = torch.bincount(z, minlength=5).float() / len(z)
    assert freq[3] == 0  # a missing candidate is never proposed
    torch.testing.assert_close(freq, exact, atol=0.01, rtol=0)
    assert 0 < float(accepted.float().mean()) < 39  # some proposals rejected, some accepted


def test_one_proposal_is_a_draw_from_the_proposal_not_the_posterior():
    log_q, log_t, keep, exact, q_kept = _enumerable(40_000)
    z, accepted = mis_chain(log_q, log_t, keep, 1, torch.Generator().manual_seed(1))
    freq = torch.bincount(z, minlength=5).float() / len(z)
    torch.testing.assert_close(freq, q_kept, atol=0.01, rtol=0)
    assert (freq - exact).abs().max() > 0.2 and float(accepted.sum()) == 0


def test_acceptance_rule_is_metropolis_independence():
    """From state z, proposal z' is accepted with probability min(1, w(z')/w(z)), w = π/q."""
    rows = 100_000
    log_q = torch.log(torch.tensor([[0.5, 0.5]])).expand(rows, -1)
    log_t = torch.log(torch.tensor([[0.8, 0.2]])).expand(rows, -1)
    keep = torch.ones(rows, 2, dtype=torch.bool)
    z, acc = mis_chain(log_q, log_t, keep, 2, torch.Generator().manual_seed(2))
    # first draw 0 (p .5): a proposal of 1 is accepted with w(1)/w(0) = 0.25, of 0 always (a
    # proposal of the current state counts as accepted, as in Metropolis-Hastings); first draw 1:
    # every proposal accepted (w(0)/w(1) = 4). P(accepted) = .5·(.5 + .5·.25) + .5 = 0.8125;
    # P(z=0) = .5·(1 - .5·.25) + .5·.5 = 0.6875
    assert abs(float(acc.float().mean()) - 0.8125) < 0.006
    assert abs(float((z == 0).float().mean()) - 0.6875) < 0.006


def test_jsa_noise_is_zero_when_the_posterior_is_certain():
    log_pz = torch.log_softmax(torch.zeros(4, 3), 1)
    logp_yz = torch.tensor([[0.0, -80.0, -80.0]]).expand(4, -1)
    log_q = torch.log_softmax(torch.zeros(4, 3), 1).requires_grad_()
    out = jsa_loss(log_pz, logp_yz, log_q, torch.ones(4, 3, dtype=torch.bool), torch.tensor(4.0), 16)
    assert (out["z"] == 0).all() and float(out["grad_noise"].max()) < 1e-6
    out["loss"].backward()
    assert log_q.grad[:, 0].lt(0).all() and log_q.grad[:, 1:].eq(0).all()  # descent raises q(0)


def test_the_posterior_reads_the_answer():
    query = torch.tensor([[5, 3, 7, 0]])
    labels = torch.tensor([[IGNORE, 9, IGNORE, IGNORE]])
    assert with_answer(query, labels, IGNORE).tolist() == [[5, 9, 7, 0]]


@pytest.fixture(scope="module")
def jsa_training():
    """JSA from scratch, all parameters, on the copy task (doc A holds the context and the
    answer, B is noise): p(A|x) and the reader's copy rate on a held-out batch, before and after;
    the gradient at step 0."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Realm(_jsa_cfg())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    held = _copy_batch(np.random.default_rng(99), model.cfg, 64)
    before, grads = _measure(model, held), {}
    for step in range(600):
        out = model(*_copy_batch(rng, model.cfg, 32))
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            grads = {n: float(sum(p.grad.abs().sum() for m, p in model.named_parameters()
                                  if m.startswith(n) and p.grad is not None))
                     for n in ("posterior_tower", "query_tower", "doc_tower", "reader")}
        opt.step()
    return before, _measure(model, held), grads


def _jsa_cfg(**over) -> RealmConfig:
    return RealmConfig.tiny(**{"k": 3, "query_tokens": 4, "chunk_tokens": 4, "reader_layers": 2,
                               "objective": "jsa", "jsa_proposals": 4, **over})


def _measure(model: Realm, held) -> dict:
    with torch.no_grad():
        o = model(*held)
    return {"p_a": float(o["log_pz"][:, 0].exp().mean()),
            "copies": float((o["logp_yz"][:, 0] > o["logp_yz"][:, 1]).float().mean())}


def test_jsa_raises_the_answer_document_under_the_prior(jsa_training):
    before, after, _ = jsa_training
    # p(A) sits on a plateau near 0.48 (A and ∅ share the mass) before it climbs, and when it climbs
    # depends on the CPU's float kernels: at 400 steps 0.86 on one machine, 0.48 on another (seed 0).
    # At 600 steps, seeds 0-3 here: 0.95, 0.99, 0.69, 0.96 (from 0.31-0.33)
    assert after["p_a"] > before["p_a"] + 0.3, (before, after)


def test_jsa_teaches_the_reader_to_copy(jsa_training):
    _, after, _ = jsa_training
    assert after["copies"] > 0.9, after


@pytest.mark.parametrize("name", ["posterior_tower", "query_tower", "doc_tower", "reader"])
def test_jsa_gradient_reaches_every_part(jsa_training, name):
    _, _, grads = jsa_training
    assert grads[name] > 0, grads


def test_posterior_gradient_raises_the_answer_document():
    """Constructed: a reader that copies from A (trained by marginal likelihood) makes the target π
    put ~all its mass on A, so the chains accept A; the JSA loss's gradient on the posterior tower
    then points where log q(A|x,y) rises: descent along it raises the answer document to first
    order (the two gradients' inner product is negative), and no other part moves it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ml = Realm(_jsa_cfg(objective="marginal"))
    opt = torch.optim.Adam([p for n, p in ml.named_parameters() if "tower" not in n], lr=3e-3)
    for _ in range(300):
        out = ml(*_copy_batch(rng, ml.cfg, 32))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model = Realm(_jsa_cfg(jsa_proposals=8))
    model.load_state_dict(ml.state_dict(), strict=False)  # the posterior tower: its fresh init
    batch = _copy_batch(np.random.default_rng(99), model.cfg, 64)
    post = [p for n, p in model.named_parameters() if n.startswith("posterior_tower")]
    out = model(*batch)
    pi = torch.softmax(out["log_pz"] + out["logp_yz"], 1)
    assert float(pi[:, 0].mean()) > 0.95 and (out["z"] == 0).float().mean() > 0.8
    g_loss = torch.autograd.grad(out["loss"], post, allow_unused=True)
    # log q(A|x,y) of the same batch, as a differentiable function of the posterior tower
    from ratray.realm.jsa import posterior_logits, with_answer

    query, labels, blocks = batch
    e_z = model.embed_docs(blocks.reshape(-1, blocks.shape[-1])).view(*blocks.shape[:2], -1).detach()
    e_q = model.posterior_tower(with_answer(query, labels, IGNORE))
    log_q = posterior_logits(e_q, e_z, torch.ones(blocks.shape[:2], dtype=torch.bool), model.post_null_bias)
    g_a = torch.autograd.grad(log_q[:, 0].mean(), post)
    inner = sum(float((a * b).sum()) for a, b in zip(g_loss, g_a) if a is not None)
    assert inner < 0, inner  # -lr * g_loss raises log q(A) to first order


def test_marginal_model_has_no_posterior_tower():
    assert not hasattr(Realm(RealmConfig.tiny()), "posterior_tower")


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="model.objective"):
        RealmConfig.tiny(objective="elbo")


# ---------------------------------------------------------------------------------------------
# end to end: the knowledge corpus, an index of fact blocks only, asks as queries, JSA


def test_jsa_trains_on_the_knowledge_corpus_with_an_index_of_fact_blocks(ray_session, tmp_path):
    """One short Ray Train + DeepSpeed run: the index holds exactly the fact blocks, queries are
    asks only, the JSA sampler's acceptance and gradient noise are logged, a refresh swaps in a
    new version, and the per-query held-out table lands for paired comparisons."""
    from ratray.config import load_config
    from ratray.data.store import ChunkStore
    from ratray.index.store import load_manifest, serving_dir
    from ratray.realm.config import RealmJobConfig
    from ratray.realm.driver import run
    from ratray.realm.heldout import load_rows, paired

    job = load_config(RealmJobConfig, "configs/realm_knowledge.yaml", [
        f"workdir={tmp_path}", "model.retriever_layers=1", "model.reader_layers=1", "model.objective=jsa",
        "train.steps=3", "train.micro_batch=4", "train.warmup_steps=1", "train.log_every=1",
        "train.checkpoint_every=3", "freeze_towers_steps=1", "refresh.every=2", "eval_queries=24",
        "train.run_name=jsa-test"])
    s = run(job, progress=False)
    f = s["final"]
    assert s["steps"] == 3 and s["refresh"]["failed"] == 0 and s["refresh"]["completed"] >= 1
    assert 0 <= f["jsa_acceptance"] <= 1 and f["retriever_grad_noise"] > 0
    assert 0 <= f["val_gold_recall_at_3"] <= 1 and f["val_scored_queries"] > 0
    store = ChunkStore.open(s["chunk_store"])
    facts = store.with_doc_prefix("fact/")
    manifest = load_manifest(serving_dir(tmp_path / "runs" / "jsa-test" / "index"))
    assert manifest.ntotal == len(facts) < len(store)  # fact blocks only
    rows = load_rows(tmp_path / "runs" / "jsa-test" / "heldout_rows.npz")
    assert all(d.startswith("ask/") for d in store.doc_ids(rows["block_ids"]).astype(str))
    same = paired(rows, rows, 3)
    assert same["exact_retrieval"]["delta"] == 0 and same["gold_recall_at_3"]["hi"] == 0


def test_doc_prefix_selects_blocks_of_those_documents_only(tmp_path):
    from ratray.config import ChunkConfig, CorpusConfig
    from ratray.data.chunks import build_chunk_store
    from ratray.realm.knowledge import write_corpus

    path = tmp_path / "facts.jsonl"
    write_corpus(path, tables=("http",))
    store = build_chunk_store(CorpusConfig(path=str(path), val_fraction=0.2),
                              ChunkConfig(tokenizer="wordpiece", chunk_tokens=48), tmp_path / "s", progress=False)
    facts, asks = store.with_doc_prefix("fact/"), store.with_doc_prefix("ask/")
    assert len(facts) + len(asks) == len(store) and len(np.intersect1d(facts, asks)) == 0
    assert len(store.with_doc_prefix("")) == len(store)
    val_asks = store.with_doc_prefix("ask/", store.split_ids("val"))
    assert 0 < len(val_asks) and set(val_asks) <= set(store.split_ids("val"))


def test_compare_runs_one_config_three_ways():
    from ratray.config import load_config
    from ratray.realm.compare import VARIANTS, variant
    from ratray.realm.config import RealmJobConfig

    job = load_config(RealmJobConfig, "configs/realm_knowledge.yaml", ["train.run_name=k"])
    got = {n: variant(job, n) for n in VARIANTS}
    assert {n: (v.train.run_name, v.model.objective, v.refresh.every) for n, v in got.items()} == {
        "marginal": ("k-marginal", "marginal", job.refresh.every), "stale": ("k-stale", "marginal", 0),
        "jsa": ("k-jsa", "jsa", job.refresh.every)}
    assert len({(v.train.steps, v.train.lr, v.model.k, v.freeze_towers_steps) for v in got.values()}) == 1
