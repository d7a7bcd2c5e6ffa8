"""Language-model evaluation: the nats and exact UTF-8 bytes of held-out sequences, per chunk slot.

`batches` is any source with `inputs_targets(rows) -> (idx (b n), targets (b n))`,
`neighbours(ids (b l k)) -> tokens (b l k r)`, `target_bytes(targets) -> (b n)` bytes per target
(0 for pad), `pad` and `chunk_tokens` (RETRO's `RetroBatches`); `model(idx, neighbours)` returns
(logits, _). Sums only: a distributed caller all-reduces them, then `metrics.lm_summary` turns them
into bits-per-byte.

Attribution: target i predicts token i+1, so its nats and bytes belong to the chunk slot of token
i+1, slot (i+1) // chunk_tokens. A sequence's first token is never predicted. In RETRO, slot u's
tokens are predicted by the positions whose chunked cross-attention reads the neighbours of slot
u-1 (the m-1 shift), so slot 0 is predicted without retrieval.
"""
from __future__ import annotations

import numpy as np


def slot_sums(model, batches, nbr_ids: np.ndarray | None, rows: np.ndarray, micro_batch: int,
              device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nats, bytes, tokens), each (len(rows), l) float64: per sequence and chunk slot, summed
    over the non-pad targets that predict a token of that slot. `nbr_ids` None = retrieval off
    (RETRO[OFF] / baseline)."""
    import torch
    import torch.nn.functional as F

    l_slots = None
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), micro_batch):
            sel = rows[s: s + micro_batch]
            idx, tgt = batches.inputs_targets(sel)  # (b n)
            nb = None if nbr_ids is None else torch.from_numpy(batches.neighbours(nbr_ids[sel])).to(device)
            logits, _ = model(torch.from_numpy(idx).to(device), nb)
            t = torch.from_numpy(tgt).to(device)
            nll = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none")
            nll = (nll.view(t.shape) * (t != batches.pad)).double().cpu().numpy()  # (b n)
            per_token = np.stack([nll, batches.target_bytes(tgt), tgt != batches.pad])  # (3 b n)
            shifted = np.zeros_like(per_token)
            shifted[:, :, 1:] = per_token[:, :, :-1]  # target i belongs to token i+1
            b, n = tgt.shape
            l_slots = n // batches.chunk_tokens
            out.append(tuple(shifted.reshape(3, b, l_slots, -1).sum(-1)))
    if was_training:
        model.train()
    if not out:
        empty = np.zeros((0, l_slots or 0))
        return empty, empty.copy(), empty.copy()
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


def lm_sums(model, batches, nbr_ids: np.ndarray | None, rows: np.ndarray, micro_batch: int,
            device) -> tuple[float, float, float]:
    """(nats, bytes, tokens) summed over every non-pad target of `rows`."""
    nats, nbytes, ntok = slot_sums(model, batches, nbr_ids, rows, micro_batch, device)
    return float(nats.sum()), float(nbytes.sum()), float(ntok.sum())
