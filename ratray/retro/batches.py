"""Training and evaluation batches for RETRO: sequences of chunk slots, their neighbours, exact bytes.

A sequence is `l` consecutive chunk slots of `chunk_tokens` tokens (a document's short last chunk is
padded inside its slot, so chunk boundaries stay aligned with CCA). Which sequences a step reads is
the sampler's business (ratray/train/sampler.py).
"""
from __future__ import annotations

import numpy as np

from ratray.data.store import ChunkStore


class RetroBatches:
    """Turns sequence indices of one split into model inputs (numpy; the loop makes tensors)."""

    def __init__(self, store: ChunkStore, layout: np.ndarray, k: int, source: ChunkStore | None = None):
        """`layout` (s, l): chunk ids of `source` (default: `store`, the retrieval database whose
        chunks the neighbour ids name; another store when scoring documents outside it)."""
        self.store, self.layout, self.k = store, layout, k
        self.source = store if source is None else source
        self.chunk_tokens = store.chunk_tokens
        self.pad = store.tokenizer.pad_id
        self.byte_len = store.tokenizer.byte_lengths.astype(np.int64)  # (V,) bytes per token id

    def __len__(self) -> int:
        return len(self.layout)

    def tokens(self, seq_idx: np.ndarray) -> np.ndarray:
        """(b,) → (b, n) int64 tokens, pad in empty slots and after short chunks."""
        ids = self.layout[seq_idx].reshape(-1)
        out = np.full((len(ids), self.chunk_tokens), self.pad, np.int64)
        ok = ids >= 0
        if ok.any():
            out[ok] = self.source.tokens(ids[ok], pad_to=self.chunk_tokens)
        return out.reshape(len(seq_idx), -1)

    def inputs_targets(self, seq_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """idx (b, n) and targets (b, n): next token, pad where there is none (ignored by the loss)."""
        idx = self.tokens(seq_idx)
        tgt = np.full_like(idx, self.pad)
        tgt[:, :-1] = idx[:, 1:]
        return idx, tgt

    def target_bytes(self, targets: np.ndarray) -> np.ndarray:
        """(b, n) exact UTF-8 bytes each target stands for, 0 for pad (the bits-per-byte
        denominator; a token may hold part of a character, so never decoded text)."""
        return np.where(targets != self.pad, self.byte_len[targets], 0)

    def neighbours(self, nbr_ids: np.ndarray) -> np.ndarray:
        """Neighbour ids (b, l, k) → tokens (b, l, k, 2m) int64 ([N, F], pad-filled)."""
        return self.store.with_continuation(nbr_ids).astype(np.int64)
