"""Which training examples each (step, micro-step, rank) reads: deterministic, disjoint, resumable.

Step `t` of a run always reads the same examples on the same rank — the order is a per-epoch
permutation fixed by the seed — so resuming at step `t` resumes the data position exactly.
"""
from __future__ import annotations

import numpy as np


class SequenceSampler:
    """Global sample g → sequence index: the concatenation of per-epoch seeded permutations."""

    def __init__(self, n_sequences: int, seed: int):
        self.n, self.seed = n_sequences, seed
        self._perm: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._perm:
            self._perm = {e: np.random.default_rng((self.seed, e)).permutation(self.n)}
        return self._perm[e]

    def take(self, start: int, count: int) -> np.ndarray:
        g = np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for e in np.unique(g // self.n):
            sel = (g // self.n) == e
            out[sel] = self._epoch(int(e))[g[sel] % self.n]
        return out

    def for_step(self, step: int, micro: int, rank: int, micro_batch: int, grad_accum: int,
                 world: int) -> np.ndarray:
        """The sequences of (step, micro-step, rank): disjoint across ranks and micro-steps."""
        per_step = micro_batch * grad_accum * world
        start = step * per_step + (rank * grad_accum + micro) * micro_batch
        return self.take(start, micro_batch)
