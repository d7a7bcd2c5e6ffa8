"""Counterfactual answers for training queries: the reader must read the block, not remember.

On a knowledge corpus each training fact is asked the same way every pass; after a few passes the
reader answers from the question alone (measured: training accuracy 1.000 with retrieval and with
the null document only, held-out span exact match 0.04 vs 0.03) and nothing teaches it to copy.
`AnswerSwap` breaks that shortcut in training only: for a share (`answer_swap`) of the training
queries whose gold block was retrieved, the answer is replaced by another fact's answer of the same
length, both in the query's labels and inside the gold block the reader sees (the towers score
the block as the index holds it; with the towers shown the swapped block, held-out gold recall@3
was 0.52 at rate 1.0, with the change 0.64 — the intervals overlap, so whether the swapped block
misled the towers is not settled):

    query  "HTTP status 404 is called [MASK] [MASK]"   labels  not found   ->  bad gateway
    gold   "404 Not Found: ..."                         block   not found   ->  bad gateway
    ─► remembering "not found" is now wrong; copying from the block is right, and the gold block
       is the only candidate that explains the answer (the retriever's gradient points at it)

Held-out queries are never touched. Shapes: b queries, k1 = k-1 candidates, t block tokens,
q query tokens.
"""
from __future__ import annotations

import numpy as np

from ratray.realm.config import IGNORE


def _find(seq: np.ndarray, sub: np.ndarray) -> int:
    """First position of `sub` inside `seq` (1-d int arrays), -1 when absent."""
    n, m = len(seq), len(sub)
    if m == 0 or m > n:
        return -1
    win = np.lib.stride_tricks.sliding_window_view(seq, m)  # (n-m+1 m)
    hit = np.flatnonzero((win == sub).all(1))
    return int(hit[0]) if len(hit) else -1


class AnswerSwap:
    """labels (n q) of the training queries (IGNORE where not masked), gold (n,) each query's gold
    block id (-1 unknown), rate in [0, 1]: the share of eligible queries swapped each time."""

    def __init__(self, labels: np.ndarray, gold: np.ndarray, rate: float, mask_id: int, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"answer_swap must be in [0, 1], got {rate}")
        self.labels, self.gold, self.rate, self.mask_id = labels, gold, rate, mask_id
        self.rng = np.random.default_rng([seed, 0x5a17])
        # the answers (masked token sequences) of queries with a known gold block, by length
        by_len: dict[int, set] = {}
        for row, g in zip(labels, gold):
            y = row[row != IGNORE]
            if g >= 0 and len(y):
                by_len.setdefault(len(y), set()).add(tuple(int(v) for v in y))
        self.pool = {n: np.array(sorted(s), dtype=np.int64) for n, s in by_len.items()}
        self.swapped = self.eligible = 0  # counts since the last take_stats

    def apply(self, sel: np.ndarray, ids: np.ndarray, cand: np.ndarray, tok: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sel (b,) rows of the training queries, ids (b q) their masked inputs, cand (b k1)
        retrieved block ids, tok (b k1 t) their tokens -> (ids, labels, tok), copies where changed.
        A query is eligible when its gold block is among the candidates and holds its answer."""
        labels = self.labels[sel].copy()  # (b q)
        if self.rate == 0.0:
            return ids, labels, tok
        ids, tok = ids.copy(), tok.copy()
        for i, r in enumerate(sel):
            g = self.gold[r]
            where = np.flatnonzero(cand[i] == g) if g >= 0 else ()
            if not len(where):
                continue
            m = labels[i] != IGNORE
            y = labels[i][m]
            j = int(where[0])
            at = _find(tok[i, j], y)
            pool = self.pool.get(len(y))
            if at < 0 or pool is None or len(pool) < 2:
                continue
            self.eligible += 1
            if self.rng.random() >= self.rate:
                continue
            others = pool[(pool != y).any(1)]  # (p L): every other answer of this length
            y2 = others[self.rng.integers(len(others))]
            tok[i, j, at:at + len(y)] = y2
            labels[i][m] = y2
            ids[i][m] = self.mask_id  # BERT's 10% kept / random tokens would show the old answer
            self.swapped += 1
        return ids, labels, tok

    def take_stats(self) -> dict:
        out = {"answer_swapped": float(self.swapped), "answer_swap_eligible": float(self.eligible)}
        self.swapped = self.eligible = 0
        return out
