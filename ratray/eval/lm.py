"""Language-model evaluation: the nats and exact UTF-8 bytes of held-out sequences (bits-per-byte).

`batches` is any source with `inputs_targets(rows) -> (idx (b n), targets (b n))`,
`neighbours(ids (b l k)) -> tokens (b l k r)`, `target_bytes(targets) -> int` and `pad`
(RETRO's `RetroBatches`); `model(idx, neighbours)` returns (logits, _). Sums only: a distributed
caller all-reduces them, then `metrics.lm_summary` turns them into bits-per-byte.
"""
from __future__ import annotations

import numpy as np


def lm_sums(model, batches, nbr_ids: np.ndarray | None, rows: np.ndarray, micro_batch: int,
            device) -> tuple[float, float, float]:
    """(nats, bytes, tokens) summed over every non-pad target of `rows`, in micro-batches.

    `nbr_ids` None = retrieval off (RETRO[OFF] / baseline). Exact: nats of every non-pad target
    over the exact UTF-8 bytes those targets stand for."""
    import torch
    import torch.nn.functional as F

    nats, nbytes, ntok = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), micro_batch):
            sel = rows[s: s + micro_batch]
            idx, tgt = batches.inputs_targets(sel)
            nb = None if nbr_ids is None else torch.from_numpy(batches.neighbours(nbr_ids[sel])).to(device)
            logits, _ = model(torch.from_numpy(idx).to(device), nb)
            t = torch.from_numpy(tgt).to(device)
            mask = t != batches.pad
            nll = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none")
            nats += float(nll[mask.flatten()].sum())
            nbytes += batches.target_bytes(tgt)
            ntok += int(mask.sum())
    if was_training:
        model.train()
    return nats, float(nbytes), float(ntok)
