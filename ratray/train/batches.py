"""Training and evaluation batches for RETRO: sequences of chunk slots, their neighbours, exact bytes.

A sequence is `l` consecutive chunk slots of `m` tokens (a document's short last chunk is padded
inside its slot, so chunk boundaries stay aligned with CCA). Step `t` of a run always reads the same
sequences on the same rank — the order is a per-epoch permutation fixed by the seed — so resuming at
step `t` resumes the data position exactly.
"""
from __future__ import annotations

import numpy as np

from ratray.data.chunks import ChunkStore
from ratray.retrieval.neighbours import neighbour_tokens


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


class RetroBatches:
    """Turns sequence indices of one split into model inputs (numpy; the loop makes tensors)."""

    def __init__(self, store: ChunkStore, layout: np.ndarray, k: int):
        self.store, self.layout, self.k = store, layout, k
        self.m = store.chunk_tokens
        self.pad = store.tokenizer.pad_id
        self.byte_len = store.tokenizer.byte_lengths.astype(np.int64)  # (V,) bytes per token id

    def __len__(self) -> int:
        return len(self.layout)

    def tokens(self, seq_idx: np.ndarray) -> np.ndarray:
        """(b,) → (b, n) int64 tokens, pad in empty slots and after short chunks."""
        ids = self.layout[seq_idx].reshape(-1)
        out = np.full((len(ids), self.m), self.pad, np.int64)
        ok = ids >= 0
        if ok.any():
            out[ok] = self.store.tokens(ids[ok], pad_to=self.m)
        return out.reshape(len(seq_idx), -1)

    def inputs_targets(self, seq_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """idx (b, n) and targets (b, n): next token, pad where there is none (ignored by the loss)."""
        idx = self.tokens(seq_idx)
        tgt = np.full_like(idx, self.pad)
        tgt[:, :-1] = idx[:, 1:]
        return idx, tgt

    def target_bytes(self, targets: np.ndarray) -> int:
        """Exact UTF-8 bytes the non-pad targets stand for (the bits-per-byte denominator)."""
        t = targets[targets != self.pad]
        return int(self.byte_len[t].sum())

    def neighbours(self, nbr_ids: np.ndarray) -> np.ndarray:
        """Neighbour ids (b, l, k) → tokens (b, l, k, 2m) int64 ([N, F], pad-filled)."""
        return neighbour_tokens(self.store, nbr_ids).astype(np.int64)
