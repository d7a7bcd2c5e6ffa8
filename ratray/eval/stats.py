"""95% intervals by bootstrap over documents (the unit that is independent), paired for differences.

A corpus-level bits-per-byte is a ratio of sums, Σ nats / Σ bytes / ln 2, so a resample draws D
documents with replacement and recomputes that ratio; chunks of one document are never split
(neighbouring chunks are not independent). A difference between two models is paired: both are
scored on the same resampled documents, so what varies between documents cancels.

    bpb_interval(doc_nats, doc_bytes)                 -> (bpb, (low, high))
    delta_interval(doc_nats_a, doc_nats_b, doc_bytes) -> (bpb_a − bpb_b, (low, high))
    verdict("RETRO[ON]", "RETRO[OFF]", delta, ci)      -> one line a person reads
"""
from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000  # resamples: the interval's ends move by ~0.1 of their width between seeds
LEVEL = 0.95


def per_document(chunk_doc: np.ndarray, values: np.ndarray, n_docs: int) -> np.ndarray:
    """Chunk values (n,) → sums per document (n_docs,), documents coded 0..n_docs-1."""
    return np.bincount(chunk_doc, weights=values, minlength=n_docs).astype(np.float64)


def _resample_counts(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_docs) how often each document is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ratio(num, den):
    return np.asarray(num) / np.maximum(np.asarray(den), 1.0)


def ratio_interval(doc_num: np.ndarray, doc_den: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, tuple[float, float]]:
    """sum(num) / sum(den) over the documents (a rate: hits per query, a mean: values per
    document with den 1) and its percentile bootstrap interval, documents resampled."""
    point = float(_ratio(doc_num.sum(), doc_den.sum()))
    if len(doc_num) < 2:
        return point, (point, point)
    c = _resample_counts(len(doc_num), n_boot, seed)
    return point, _interval(_ratio(c @ doc_num, c @ doc_den), level)


def ratio_delta_interval(doc_num_a: np.ndarray, doc_num_b: np.ndarray, doc_den: np.ndarray,
                         n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
                         ) -> tuple[float, tuple[float, float]]:
    """ratio(a) − ratio(b) over the same denominators, and its paired bootstrap interval."""
    return ratio_interval(doc_num_a - doc_num_b, doc_den, n_boot, seed, level)


def bpb_interval(doc_nats: np.ndarray, doc_bytes: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, tuple[float, float]]:
    """Bits-per-byte of the documents and its percentile bootstrap interval."""
    return ratio_interval(doc_nats / math.log(2), doc_bytes, n_boot, seed, level)


def delta_interval(doc_nats_a: np.ndarray, doc_nats_b: np.ndarray, doc_bytes: np.ndarray,
                   n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
                   ) -> tuple[float, tuple[float, float]]:
    """bpb(a) − bpb(b) on the same bytes, and its paired bootstrap interval."""
    return ratio_delta_interval(doc_nats_a / math.log(2), doc_nats_b / math.log(2), doc_bytes,
                                n_boot, seed, level)


def significant(ci: tuple[float, float]) -> bool:
    """The interval excludes 0."""
    return ci[0] > 0 or ci[1] < 0


def verdict(a: str, b: str, delta: float, ci: tuple[float, float]) -> str:
    """'a − b = −0.0123 bpb (95% CI [−0.0201, −0.0046]): a predicts better', or no difference."""
    head = f"{a} − {b} = {delta:+.4f} bpb (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])"
    if not significant(ci):
        return f"{head}: no significant difference"
    return f"{head}: {a if delta < 0 else b} predicts better"
