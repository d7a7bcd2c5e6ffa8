"""RETRO's leakage analysis (§2.6, Fig. 6): how much of an evaluated chunk its neighbours hold.

For an evaluated chunk C, r(C) = the length of the longest run of tokens C shares with the
neighbours the model reads when it predicts C, ÷ C's length. In RETRO chunk u is predicted
through the neighbours retrieved for chunk u-1 ([N, F]: neighbour and continuation), so those are
the tokens compared; a sequence's first chunk is predicted without retrieval and has r = 0.
bpb(α) is the bits-per-byte over the chunks with r(C) ≤ α: where a gain comes from, from chunks
whose text the database holds verbatim (α = 1) to chunks it barely overlaps (α = 0.125).
"""
from __future__ import annotations

import numpy as np

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)


def longest_common_run(chunks: np.ndarray, chunk_pad: int, neighbours: np.ndarray,
                       neighbour_pad: int) -> np.ndarray:
    """chunks (n m), neighbours (n k r) token ids → (n,) the longest run of consecutive tokens a
    chunk shares with any of its neighbours (pad tokens never match). Dynamic programming over
    the chunk's positions, vectorised over chunks, neighbours and neighbour positions."""
    n, m = chunks.shape
    k, r = neighbours.shape[1:]
    nb = neighbours.reshape(n * k, r)
    ch = np.repeat(chunks, k, axis=0)  # (n*k m)
    run = np.zeros((n * k, r + 1), np.int32)  # run[:, j+1]: common run ending at (i, j)
    best = np.zeros(n * k, np.int32)
    nb_ok = nb != neighbour_pad
    for i in range(m):
        same = (ch[:, i:i + 1] == nb) & nb_ok & (ch[:, i:i + 1] != chunk_pad)  # (n*k r)
        run[:, 1:] = np.where(same, run[:, :-1] + 1, 0)
        run[:, 0] = 0
        best = np.maximum(best, run.max(1))
    return best.reshape(n, k).max(1)


def overlap_ratios(chunks: np.ndarray, chunk_len: np.ndarray, chunk_pad: int, neighbours: np.ndarray,
                   neighbour_pad: int) -> np.ndarray:
    """r(C) for each chunk: longest common run ÷ the chunk's length (0 for an empty chunk)."""
    runs = longest_common_run(chunks, chunk_pad, neighbours, neighbour_pad)
    return np.where(chunk_len > 0, runs / np.maximum(chunk_len, 1), 0.0)


def by_overlap(r: np.ndarray, alphas=ALPHAS) -> list[tuple[float, np.ndarray]]:
    """[(α, boolean mask of the chunks with r ≤ α)] for each α."""
    return [(float(a), r <= a + 1e-12) for a in alphas]
