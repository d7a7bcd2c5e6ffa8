"""Evaluation pieces on constructed cases: bits-per-byte per chunk slot against a slow independent
computation, the overlap r(C) and bpb(α), bootstrap intervals that cover the truth, verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ratray.eval.lm import lm_sums, slot_sums
from ratray.eval.overlap import ALPHAS, by_overlap, longest_common_run, overlap_ratios
from ratray.eval.stats import bpb_interval, delta_interval, per_document, significant, verdict
from ratray.retro.model import Retro, RetroConfig

M, V, PAD = 4, 64, 0


class Batches:
    """The batch interface of RetroBatches over fixed token rows (tiny, hand-made)."""

    chunk_tokens, pad = M, PAD

    def __init__(self, idx: np.ndarray, byte_len: np.ndarray):
        self.idx, self.byte_len = idx, byte_len

    def inputs_targets(self, rows):
        idx = self.idx[rows]
        tgt = np.full_like(idx, PAD)
        tgt[:, :-1] = idx[:, 1:]
        return idx, tgt

    def target_bytes(self, tgt):
        return np.where(tgt != PAD, self.byte_len[tgt], 0)

    def neighbours(self, ids):
        return ids  # the tests pass neighbour tokens directly


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(zero_init_cca=False)).eval()
    g = np.random.default_rng(0)
    idx = g.integers(1, V, (5, 16))
    idx[3, 13:] = PAD  # a short last chunk: pad targets count nothing
    byte_len = g.integers(1, 4, V)
    byte_len[PAD] = 0
    nb = g.integers(1, V, (5, 4, 2, 2 * M))
    return model, Batches(idx, byte_len), nb


def slow_slot_sums(model, batches, nb, rows):
    """Token by token, in float64: −log softmax of each target, its bytes, to the slot of the
    token it predicts."""
    nats = np.zeros((len(rows), 4))
    nbytes = np.zeros((len(rows), 4))
    for j, r in enumerate(rows):
        idx, tgt = batches.inputs_targets(np.array([r]))
        with torch.no_grad():
            logits = model(torch.from_numpy(idx), None if nb is None else torch.from_numpy(nb[[r]]))[0][0]
        logp = torch.log_softmax(logits.double(), -1)
        for i in range(idx.shape[1]):
            t = int(tgt[0, i])
            if t == PAD:
                continue
            slot = (i + 1) // M
            nats[j, slot] -= float(logp[i, t])
            nbytes[j, slot] += int(batches.byte_len[t])
    return nats, nbytes


@pytest.mark.parametrize("with_neighbours", [True, False])
def test_bits_per_byte_per_slot_equals_a_slow_token_by_token_sum(tiny, with_neighbours):
    model, batches, nb = tiny
    nb = nb if with_neighbours else None
    rows = np.arange(5)
    nats, nbytes, ntok = slot_sums(model, batches, nb, rows, micro_batch=2, device="cpu")
    ref_nats, ref_bytes = slow_slot_sums(model, batches, nb, rows)
    np.testing.assert_allclose(nats, ref_nats, rtol=1e-5)
    np.testing.assert_array_equal(nbytes, ref_bytes)
    assert (nats[:, 0] > 0).all()  # slot 0 predicted from its 2nd token on (3 of 4 targets)
    assert ntok.sum() == (batches.idx[:, 1:] != PAD).sum()
    total = lm_sums(model, batches, nb, rows, 2, "cpu")
    assert total[0] == pytest.approx(ref_nats.sum(), rel=1e-6) and total[1] == ref_bytes.sum()
    bpb = ref_nats.sum() / math.log(2) / ref_bytes.sum()
    assert total[0] / math.log(2) / total[1] == pytest.approx(bpb, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# overlap


def test_longest_common_run_finds_the_longest_shared_stretch():
    chunk = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    nbrs = np.array([[[1, 6, 7, 8, 2, 0, 0, 0],       # 6 7 8: 3 tokens
                      [9, 10, 11, 12, 3, 5, 6, 0]]])  # 9 10 11 12: 4 tokens
    assert longest_common_run(chunk, -1, nbrs, 0).tolist() == [4]


def test_pad_tokens_never_match():
    chunk = np.array([[5, 6, 0, 0]])  # a short chunk padded with 0
    nbrs = np.array([[[0, 0, 0, 0, 5, 0, 0, 0]]])
    assert longest_common_run(chunk, 0, nbrs, 0).tolist() == [1]


def test_overlap_ratio_is_the_run_over_the_chunks_own_length():
    chunks = np.array([[5, 6, 7, 8], [5, 6, 0, 0], [0, 0, 0, 0]])
    nbrs = np.array([[[5, 6, 7, 8, 1, 1, 1, 1]], [[9, 5, 6, 9, 1, 1, 1, 1]], [[1] * 8]])
    r = overlap_ratios(chunks, np.array([4, 2, 0]), 0, nbrs, 0)
    assert r.tolist() == [1.0, 1.0, 0.0]  # verbatim in the database; an empty slot overlaps nothing


def test_bpb_alpha_buckets_are_cumulative_and_end_with_every_chunk():
    r = np.array([0.0, 0.1, 0.3, 0.6, 0.8, 1.0])
    buckets = by_overlap(r)
    assert [a for a, _ in buckets] == list(ALPHAS)
    assert [int(m.sum()) for _, m in buckets] == [2, 2, 3, 4, 6]


# ---------------------------------------------------------------------------------------------
# bootstrap over documents


def population(n_docs: int, rng, shift: float = 0.0):
    """Documents of 200-2000 bytes whose nats per byte vary by document (mean 1.0 + shift):
    the population bpb is known."""
    nbytes = rng.integers(200, 2000, n_docs).astype(float)
    rate = rng.normal(1.0 + shift, 0.3, n_docs).clip(0.2)
    return rate * nbytes, nbytes


def test_the_95_percent_interval_covers_the_population_value_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    big_n, big_b = population(200_000, np.random.default_rng(1))
    truth = big_n.sum() / math.log(2) / big_b.sum()
    hits = 0
    trials = 200
    for t in range(trials):
        pick = rng.integers(0, len(big_b), 40)  # an evaluation set of 40 documents
        _, (lo, hi) = bpb_interval(big_n[pick], big_b[pick], n_boot=500, seed=t)
        hits += lo <= truth <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_paired_interval_covers_the_true_difference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(2)
    nats_a, nbytes = population(60, rng)
    nats_b = nats_a * 1.02 + rng.normal(0, 5, 60)  # b is 2% worse, correlated with a
    delta, ci = delta_interval(nats_a, nats_b, nbytes, n_boot=2000, seed=0)
    assert ci[0] <= delta <= ci[1] and ci[1] < 0  # a better, and the interval says so
    _, ci_a = bpb_interval(nats_a, nbytes, seed=0)
    assert ci[1] - ci[0] < (ci_a[1] - ci_a[0]) / 4  # pairing removes the between-document spread


def test_per_document_sums_chunks_of_the_same_document():
    assert per_document(np.array([0, 2, 0, 1]), np.array([1.0, 2.0, 3.0, 4.0]), 3).tolist() == [4, 4, 2]


@pytest.mark.parametrize("ci, expected", [((-0.02, -0.01), "A predicts better"),
                                          ((0.01, 0.03), "B predicts better"),
                                          ((-0.0003, 0.0002), "no significant difference")])
def test_verdict_states_the_difference_its_interval_and_what_it_means(ci, expected):
    delta = sum(ci) / 2
    text = verdict("A", "B", delta, ci)
    assert text.startswith(f"A − B = {delta:+.4f} bpb (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])")
    assert text.endswith(expected) and significant(ci) == (expected != "no significant difference")
