"""RETRO model: chunked cross-attention causality, RETRO[OFF], padding, config, learning."""
from __future__ import annotations

import pytest
import torch

from ratray.retro.model import Retro, RetroConfig

M, N, V, PAD = 4, 16, 64, 0  # tiny(): chunk_tokens 4, seq_len 16 (l = 4 chunks)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: two threads on a shared 2-core box only contend (measured ~6x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **overrides) -> Retro:
    torch.manual_seed(seed)
    model = Retro(RetroConfig.tiny(zero_init_cca=False, **overrides)).eval()
    return model


def batch(seed: int = 1, b: int = 2, k: int = 2, r: int = 2 * M):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, V, (b, N), generator=g)
    nb = torch.randint(1, V, (b, N // M, k, r), generator=g)
    return idx, nb


@torch.no_grad()
def logits(model, idx, nb):
    return model(idx, nb)[0]


def changed_positions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(b n V) pair → bool (n): positions whose logits differ in any batch row."""
    return (a != b).any(-1).any(0)


# ---------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("u", [0, 1, 2])
def test_cca_neighbours_of_chunk_u_only_affect_later_positions(u):
    model = tiny_model()
    idx, nb = batch()
    nb2 = nb.clone()
    nb2[:, u] = torch.randint(1, V, nb2[:, u].shape, generator=torch.Generator().manual_seed(7))
    diff = changed_positions(logits(model, idx, nb), logits(model, idx, nb2))
    first = (u + 1) * M - 1  # the last token of chunk u predicts the first token of chunk u+1
    assert not diff[:first].any(), f"positions {diff[:first].nonzero().flatten().tolist()} leaked"
    assert diff[first], "the last token of chunk u must see E_u"
    assert diff[first:].all(), "every later position attends (through CCA or self-attention)"


def test_last_chunk_neighbours_affect_only_final_position_and_first_m_minus_1_see_nothing():
    model = tiny_model()
    idx, nb = batch()
    base = logits(model, idx, nb)
    nb_last = nb.clone()
    nb_last[:, -1] = (nb_last[:, -1] % (V - 1)) + 1  # different non-pad tokens
    diff = changed_positions(base, logits(model, idx, nb_last))
    assert diff.tolist() == [False] * (N - 1) + [True]
    other = batch(seed=99)[1]  # every neighbour replaced
    diff = changed_positions(base, logits(model, idx, other))
    assert not diff[: M - 1].any() and diff[M - 1:].all()


def test_decoder_is_causal():
    model = tiny_model()
    idx, nb = batch()
    base = logits(model, idx, nb)
    for t in (0, 5, N - 1):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] % (V - 1)) + 1
        diff = changed_positions(base, logits(model, idx2, nb))
        assert not diff[:t].any() and diff[t]


# ---------------------------------------------------------------------------------------------
# RETRO[OFF], baseline, padding


def test_retro_off_is_the_baseline_decoder_with_the_same_weights():
    model = tiny_model()
    idx, nb = batch()
    off = logits(model, idx, None)
    baseline = Retro(model.cfg.as_baseline()).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(k.startswith("encoder.") or ".cca." in k or ".ln_cca." in k
                              for k in unexpected)
    assert torch.equal(off, logits(baseline, idx, None))
    assert torch.equal(off, logits(baseline, idx, nb))  # a baseline ignores neighbours
    assert not any(k.startswith("encoder.") or "cca" in k for k, _ in baseline.named_parameters())
    assert baseline.num_params() < model.num_params()
    assert model.num_params() - baseline.num_params() == sum(
        p.numel() for p in model.retrieval_parameters())


def test_zero_init_cca_starts_equal_to_retro_off():
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny()).eval()  # zero_init_cca=True (default)
    idx, nb = batch()
    assert torch.equal(logits(model, idx, nb), logits(model, idx, None))


def test_all_pad_neighbours_are_finite_and_equal_retro_off():
    model = tiny_model()
    idx, nb = batch()
    off = logits(model, idx, None)
    pad = torch.full_like(nb, PAD)
    out = logits(model, idx, pad)
    assert torch.isfinite(out).all()
    assert torch.equal(out, off)  # every CCA group has only pad keys: exact zero update
    # only chunk 1's neighbours are pad: positions up to the group of chunk 1 equal RETRO[OFF]...
    part = nb.clone()
    part[:, :2] = PAD
    out = logits(model, idx, part)
    assert torch.isfinite(out).all() and torch.equal(out[:, : 3 * M - 1], off[:, : 3 * M - 1])
    # ...and a partly padded neighbour (no continuation) is finite, gradients too
    nb[:, :, :, M:] = PAD
    model.train()
    loss = model(idx, nb, idx)[1]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all()
                                        for p in model.parameters() if p.grad is not None)


def test_shapes_shorter_sequences_and_more_neighbours():
    model = tiny_model()
    idx, nb = batch(k=3, r=M + 1)  # k' != cfg.k, r' < neighbour_len
    assert logits(model, idx, nb).shape == (2, N, V)
    short = logits(model, idx[:, : 2 * M], nb[:, :2])
    assert torch.allclose(short, logits(model, idx, nb)[:, : 2 * M], atol=1e-5)
    with pytest.raises(ValueError, match="multiple of chunk_tokens"):
        model(idx[:, :5])
    with pytest.raises(ValueError, match="neighbours"):
        model(idx, nb[:, :2])


def test_loss_ignores_pad_targets_and_nll_sum_matches():
    model = tiny_model()
    idx, nb = batch()
    targets = idx.clone()
    targets[:, -3:] = PAD
    with torch.no_grad():
        lo, loss = model(idx, nb, targets)
    keep = targets != PAD
    ref = torch.nn.functional.cross_entropy(lo[keep], targets[keep])
    assert torch.allclose(loss, ref, atol=1e-6)
    total, count = model.nll_sum(idx, nb, targets)
    assert count == int(keep.sum()) and total / count == pytest.approx(float(ref), rel=1e-5)
    assert model(idx, nb, torch.full_like(idx, PAD))[1] == 0  # all pad: 0, not NaN


def test_bf16_autocast_runs():
    model = tiny_model()
    idx, nb = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo, loss = model(idx, nb, idx)
    assert torch.isfinite(loss) and lo.shape == (2, N, V)


# ---------------------------------------------------------------------------------------------
# config and parameters


@pytest.mark.parametrize("overrides, field", [
    (dict(seq_len=18), "seq_len"),
    (dict(cca_layers=(0,)), "cca_layers"),
    (dict(cca_layers=(3,)), "cca_layers"),  # tiny has 2 layers
    (dict(cca_layers=()), "cca_layers"),
    (dict(n_head=3), "n_head"),
    (dict(enc_n_head=3), "enc_n_head"),
    (dict(k=0), "k"),
    (dict(cca_prior_slope=-1.0), "cca_prior_slope"),
    (dict(pad_id=64), "pad_id"),
    (dict(model="realm"), "model"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"config 'model\.{field}':"):
        RetroConfig.tiny(**overrides)


def test_default_cca_layers_follow_the_paper():
    assert RetroConfig(vocab_size=V, pad_id=0, n_layer=12).cca_layers == (6, 9, 12)
    assert RetroConfig(vocab_size=V, pad_id=0).cca_layers == (3, 6)  # 6 layers
    assert RetroConfig(vocab_size=V, pad_id=0, n_layer=1).cca_layers == (1,)
    assert RetroConfig(vocab_size=V, pad_id=0, cca_layers=[6, 3]).cca_layers == (3, 6)
    assert RetroConfig(vocab_size=V, pad_id=0, chunk_tokens=64).neighbour_len == 128  # [N, F]
    assert RetroConfig().neighbour_len is None  # a job's section: m comes from the chunk store


def test_a_model_needs_the_chunk_stores_vocabulary_and_chunk_length():
    with pytest.raises(ValueError, match="for_store"):
        Retro(RetroConfig(n_layer=1))
    cfg = RetroConfig(n_layer=1, cca_layers=(1,)).for_store(V, PAD, M)
    assert (cfg.vocab_size, cfg.pad_id, cfg.chunk_tokens, cfg.neighbour_len) == (V, PAD, M, 2 * M)
    assert Retro(cfg).cfg is cfg


def test_param_groups_decay_only_linear_weights():
    model = tiny_model()
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.wte.weight for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)


# ---------------------------------------------------------------------------------------------
# learning: retrieval of the continuation is useful


def copy_task(g: torch.Generator, b: int = 16, m: int = M, n: int = N, vocab: int = V, k: int = 1):
    """Random sequences; the neighbour of chunk u is [chunk u, chunk u+1] (its continuation),
    so with retrieval every token after the first chunk is predictable, without it none is.
    Neighbours 2..k are distractors: random [N, F] pairs."""
    idx = torch.randint(1, vocab, (b, n + m), generator=g)
    chunks = idx.view(b, n // m + 1, m)
    nb = torch.cat([chunks[:, :-1], chunks[:, 1:]], dim=-1)[:, :, None]  # b l 1 2m
    nb[:, -1, :, m:] = PAD  # the last chunk's continuation lies outside the sequence
    if k > 1:
        nb = torch.cat([nb, torch.randint(1, vocab, (b, n // m, k - 1, 2 * m), generator=g)], 2)
    return idx[:, :n], nb, idx[:, 1: n + 1]


def train_copy(model: Retro, steps: int, lr: float, b: int = 32, **task) -> tuple[float, ...]:
    """Held-out loss (start, RETRO[ON], RETRO[OFF]) around `steps` of AdamW on fresh batches
    (only copying through retrieval generalises)."""
    opt = model.configure_optimizer(0.0, lr)
    g = torch.Generator().manual_seed(0)
    held_out = copy_task(torch.Generator().manual_seed(123), b=32, **task)

    @torch.no_grad()
    def held_out_loss(neighbours: bool) -> float:
        idx, nb, tgt = held_out
        return model.eval()(idx, nb if neighbours else None, tgt)[1].item()

    start = held_out_loss(True)
    for _ in range(steps):
        idx, nb, tgt = copy_task(g, b=b, **task)
        loss = model.train()(idx, nb, tgt)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    on, off = held_out_loss(True), held_out_loss(False)
    print(f"held-out loss: start {start:.3f}  RETRO[ON] {on:.3f}  RETRO[OFF] {off:.3f}")
    return start, on, off


def test_retrieval_learns_to_copy_the_continuation():
    torch.manual_seed(0)
    start, on, off = train_copy(Retro(RetroConfig.tiny(k=1)), steps=60, lr=6e-3)
    assert on < start - 0.5 and on < off - 0.5


def test_retrieval_learns_to_copy_fast_from_64_keys_with_a_distractor():
    """m 16, k 2 (one neighbour a distractor): 64 keys per CCA group, vocabulary 256. With plain
    RoPE and a normal init of the value path (cca_prior_slope=0, copy_init=False) 40 steps left
    the loss where it started (5.56 -> 5.55); with the alignment prior and the copy init it fell
    to ~4.1 (bench/cca_copy.py: the same at the demo's m 64, 256 keys)."""
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=256, pad_id=PAD, chunk_tokens=16, seq_len=64, n_layer=2,
                      n_head=4, d_model=64, cca_layers=(1,), enc_layers=1, enc_d_model=32,
                      enc_n_head=2, k=2)  # zero_init_cca (default): starts as RETRO[OFF]
    start, on, off = train_copy(Retro(cfg), steps=40, lr=6e-3, b=16, m=16, n=64, vocab=256, k=2)
    assert on < start - 1.0 and on < off - 1.0


def test_match_bias_marks_keys_that_continue_the_current_tokens():
    """Query j of chunk u's group holds token idx[u*m + m-1 + j]; key t of a neighbour gets the
    first bonus when the neighbour token before it equals that token, both when the two before
    match the query's last two tokens."""
    cfg = RetroConfig(vocab_size=32, pad_id=0, chunk_tokens=4, seq_len=8, n_layer=2, n_head=2,
                      d_model=16, cca_layers=(2,), enc_layers=1, enc_d_model=8, enc_n_head=2, k=1,
                      cca_match_bias=1.0)
    cca = Retro(cfg).blocks[1].cca
    with torch.no_grad():
        cca.match.copy_(torch.tensor([[1.0, 3.0], [10.0, 30.0]]))  # [one match, two] x heads
    idx = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])  # chunk 0 = 5..8, group 0 = tokens 8 9 10 11
    nb = torch.full((1, 2, 1, 8), 0)
    nb[0, 0, 0] = torch.tensor([1, 9, 4, 7, 8, 9, 2, 2])  # group 0's neighbours
    bonus = cca.match_bias(idx, nb)  # (b l) h m kr
    assert bonus.shape == (2, 2, 4, 8)
    head0 = bonus[0, 0]
    # query 0 (token 8, before it 7): key 5 follows "7 8" (two match), key 4 would need nb[3]==8
    assert head0[0].tolist() == [0, 0, 0, 0, 0, 11.0, 0, 0]
    # query 1 (token 9, before it 8): key 2 follows "1 9" (one), key 6 follows "8 9" (two)
    assert head0[1].tolist() == [0, 0, 1.0, 0, 0, 0, 11.0, 0]
    assert bonus[0, 1, 1, 6].item() == 33.0  # the second head's weights
    assert (bonus[1] == 0).all()  # group 1's neighbour is all pad: pad never matches


def shifted_copy_task(g: torch.Generator, b: int, m: int, n: int, vocab: int):
    """The copy task with real neighbours' geometry: chunk u's neighbour holds the next chunk at a
    random offset (a near-twin whose chunk boundaries moved), so copying needs content matching."""
    idx = torch.randint(1, vocab, (b, n + 2 * m), generator=g)
    l = n // m
    nb = torch.empty(b, l, 1, 2 * m, dtype=torch.long)
    for u in range(l):
        off = torch.randint(0, m, (b,), generator=g)
        for i in range(b):  # the window [u*m + m - o, ...) of the text: chunk u+1 starts at o
            s = u * m + m - int(off[i])
            nb[i, u, 0] = idx[i, s: s + 2 * m]
    return idx[:, :n], nb, idx[:, 1: n + 1]


@pytest.mark.parametrize("match", [0.0, 2.0])
def test_match_bias_lets_cca_copy_a_neighbour_at_any_offset(match):
    """40 steps on the shifted copy task: with the match bias RETRO[ON] falls far below RETRO[OFF]
    (the default); without it the loss stays where it started."""
    torch.manual_seed(0)
    m, n, vocab = 16, 64, 256
    cfg = RetroConfig(vocab_size=vocab, pad_id=PAD, chunk_tokens=m, seq_len=n, n_layer=2, n_head=4,
                      d_model=64, cca_layers=(1,), enc_layers=1, enc_d_model=32, enc_n_head=2, k=1,
                      cca_match_bias=match)
    model = Retro(cfg)
    opt = model.configure_optimizer(0.0, 6e-3)
    g = torch.Generator().manual_seed(0)
    idx, nb, tgt = shifted_copy_task(torch.Generator().manual_seed(123), 32, m, n, vocab)
    for _ in range(40):
        loss = model.train()(*shifted_copy_task(g, 16, m, n, vocab))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        on, off = (model.eval()(idx, x, tgt)[1].item() for x in (nb, None))
    print(f"match {match}: RETRO[ON] {on:.3f}  RETRO[OFF] {off:.3f}")
    if match:
        assert on < off - 1.0
    else:
        assert on > off - 0.3
