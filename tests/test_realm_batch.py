"""A training batch's inputs on constructed queries and blocks: counterfactual answers
(ratray/realm/swap.py) — what is swapped, where, what is left alone — and the padding cut
(ratray/realm/worker.trim)."""
from __future__ import annotations

import numpy as np
import pytest

from ratray.realm.swap import IGNORE, AnswerSwap
from ratray.realm.worker import trim

MASK, PAD = 4, 0


def _case():
    """Three training queries of 6 tokens; answers [50 51], [60 61], [70] at positions 3-4 / 3-4 / 3;
    gold blocks 10, 11, 12 hold them at positions 2-3 / 1-2 / 4."""
    labels = np.full((3, 6), IGNORE, dtype=np.int64)
    labels[0, 3:5], labels[1, 3:5], labels[2, 3] = [50, 51], [60, 61], 70
    ids = np.array([[7, 8, 9, MASK, MASK, 5], [7, 8, 9, MASK, 60, 5], [7, 8, 9, MASK, 5, PAD]], dtype=np.int32)
    gold = np.array([10, 11, 12])
    blocks = {10: [20, 21, 50, 51, 22, 0, 0, 0], 11: [30, 60, 61, 31, 0, 0, 0, 0],
              12: [40, 41, 42, 43, 70, 0, 0, 0], 13: [50, 51, 60, 61, 70, 0, 0, 0]}
    return labels, ids, gold, blocks


def _tokens(cand, blocks):
    return np.array([[blocks[c] if c >= 0 else [PAD] * 8 for c in row] for row in cand], dtype=np.int64)


def test_a_swap_puts_another_answer_of_the_same_length_in_the_labels_and_the_gold_block_only():
    labels, ids, gold, blocks = _case()
    swap = AnswerSwap(labels, gold, rate=1.0, mask_id=MASK)
    sel = np.array([0, 1])
    cand = np.array([[13, 10], [11, 13]])  # the gold block second, then first; 13 holds every answer
    tok = _tokens(cand, blocks)
    new_ids, new_labels, new_tok = swap.apply(sel, ids[sel], cand, tok)
    # query 0: [50 51] -> [60 61] (the only other 2-token answer), query 1 the other way round
    assert new_labels[0, 3:5].tolist() == [60, 61] and new_labels[1, 3:5].tolist() == [50, 51]
    assert (new_labels[:, [0, 1, 2, 5]] == IGNORE).all()
    assert new_tok[0, 1].tolist() == [20, 21, 60, 61, 22, 0, 0, 0]  # the gold block, answer replaced
    assert new_tok[1, 0].tolist() == [30, 50, 51, 31, 0, 0, 0, 0]
    assert (new_tok[0, 0] == tok[0, 0]).all() and (new_tok[1, 1] == tok[1, 1]).all()  # others untouched
    # every masked position shows [MASK] (query 1 had BERT's kept original token at position 4)
    assert new_ids[1, 3:5].tolist() == [MASK, MASK] and new_ids[1, 5] == 5
    # the inputs the caller holds are not modified
    assert tok[0, 1].tolist() == blocks[10] and ids[1, 4] == 60 and labels[0, 3] == 50
    assert swap.take_stats() == {"answer_swapped": 2.0, "answer_swap_eligible": 2.0}


def test_nothing_is_swapped_without_the_gold_block_a_findable_answer_or_another_answer_of_its_length():
    labels, ids, gold, blocks = _case()
    swap = AnswerSwap(labels, gold, rate=1.0, mask_id=MASK)
    cand = np.array([[13, -1], [12, 13], [12, 13]])  # 0: gold missing; 1: gold missing; 2: gold 12
    sel = np.array([0, 1, 2])
    tok = _tokens(cand, blocks)
    new_ids, new_labels, new_tok = swap.apply(sel, ids, cand, tok)
    # query 2's answer [70] has no other 1-token answer to take its place
    assert (new_labels == labels).all() and (new_tok == tok).all() and (new_ids == ids).all()
    assert swap.take_stats() == {"answer_swapped": 0.0, "answer_swap_eligible": 0.0}
    blocks[10] = [20, 21, 50, 22, 51, 0, 0, 0]  # the answer not contiguous in its block
    cand = np.array([[10, 13]])
    _, new_labels, _ = swap.apply(np.array([0]), ids[:1], cand, _tokens(cand, blocks))
    assert (new_labels == labels[:1]).all()


def test_the_rate_is_the_share_of_eligible_queries_swapped_and_zero_changes_nothing():
    labels, ids, gold, blocks = _case()
    cand = np.array([[10, 13]])
    tok = _tokens(cand, blocks)
    off = AnswerSwap(labels, gold, rate=0.0, mask_id=MASK)
    i0, l0, t0 = off.apply(np.array([0]), ids[:1], cand, tok)
    assert (l0 == labels[:1]).all() and t0 is tok and (i0 == ids[:1]).all()
    half = AnswerSwap(labels, gold, rate=0.3, mask_id=MASK, seed=1)
    for _ in range(2000):
        half.apply(np.array([0]), ids[:1], cand, tok)
    s = half.take_stats()
    assert s["answer_swap_eligible"] == 2000 and 0.26 < s["answer_swapped"] / 2000 < 0.34
    with pytest.raises(ValueError, match="answer_swap"):
        AnswerSwap(labels, gold, rate=1.5, mask_id=MASK)


def test_trim_cuts_only_padding_and_the_towers_embed_the_cut_blocks_identically():
    import torch

    from ratray.realm.model import Realm, RealmConfig

    labels, ids, gold, blocks = _case()
    cand = np.array([[10, -1], [11, 12], [13, 10]])
    tok = _tokens(cand, blocks)  # (3 2 8): the longest block holds 5 tokens
    ids = np.pad(ids, ((0, 0), (0, 4)), constant_values=PAD)  # (3 10): the longest query 6
    lab = np.pad(labels, ((0, 0), (0, 4)), constant_values=IGNORE)
    i2, l2, t2 = trim(ids, lab, tok, PAD)
    assert i2.shape == (3, 6) and l2.shape == (3, 6) and t2.shape == (3, 2, 5)
    assert (i2 == ids[:, :6]).all() and (l2 == labels).all() and (t2 == tok[:, :, :5]).all()
    assert (ids[:, 6:] == PAD).all() and (tok[:, :, 5:] == PAD).all()  # what went was padding
    torch.manual_seed(0)
    model = Realm(RealmConfig.tiny(vocab_size=128, chunk_tokens=8)).eval()
    with torch.no_grad():
        full = model.embed_docs(torch.from_numpy(tok.reshape(6, 8)))
        cut = model.embed_docs(torch.from_numpy(t2.reshape(6, 5)))
    torch.testing.assert_close(full, cut, atol=1e-5, rtol=1e-5)


def test_the_towers_score_the_blocks_as_indexed_while_the_reader_reads_the_swapped_ones():
    import torch

    from ratray.realm.model import Realm, RealmConfig

    torch.manual_seed(0)
    cfg = RealmConfig.tiny(vocab_size=128, k=3, query_tokens=6, chunk_tokens=8)
    model = Realm(cfg).eval()
    labels, ids, gold, blocks = _case()
    cand = np.array([[10, 13], [11, 13]])
    tok = _tokens(cand, blocks)
    _, lab2, read = AnswerSwap(labels, gold, rate=1.0, mask_id=cfg.mask_id).apply(
        np.array([0, 1]), ids[:2], cand, tok)
    q, lab = torch.from_numpy(ids[:2].astype(np.int64)), torch.from_numpy(lab2)
    with torch.no_grad():
        both = model(q, lab, torch.from_numpy(tok), None, torch.from_numpy(read))
        indexed = model(q, lab, torch.from_numpy(tok))
        swapped = model(q, lab, torch.from_numpy(read))
    torch.testing.assert_close(both["log_pz"], indexed["log_pz"])
    torch.testing.assert_close(both["logp_yz"], swapped["logp_yz"])
    assert not torch.allclose(indexed["log_pz"], swapped["log_pz"])
