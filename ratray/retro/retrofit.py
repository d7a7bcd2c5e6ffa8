"""RETROfitting (RETRO §4.2, Megatron's "retro-fitting"): a trained baseline's decoder, frozen, with
the retrieval path — the neighbour encoder and the CCA layers — trained on top of it.

The baseline and the RETRO decoder share parameter names (ratray/retro/model.py), so the baseline's
state dict loads into a RETRO model with exactly the encoder and CCA parameters missing. With
`zero_init_cca` the CCA output projections start at zero: at step 0 the RETROfitted model computes
exactly the baseline, and from there only retrieval can change what it predicts.
"""
from __future__ import annotations

import torch


def load_decoder(model, baseline_state: dict[str, torch.Tensor]) -> None:
    """Load a baseline's weights into a RETRO model; every decoder weight must be there, and the
    only ones missing must be the retrieval path's."""
    retrieval = {n for n, p in model.named_parameters() if any(p is q for q in model.retrieval_parameters())}
    result = model.load_state_dict(baseline_state, strict=False)
    unexpected = sorted(result.unexpected_keys)
    missing = sorted(set(result.missing_keys) - retrieval)
    if unexpected or missing:
        raise ValueError(f"the baseline's weights do not fit this decoder: unexpected "
                         f"{unexpected[:5]}, missing {missing[:5]}")


def freeze_decoder(model) -> tuple[int, int]:
    """Only the encoder and CCA train from now on; returns (trainable, frozen) parameter counts."""
    train = {id(p) for p in model.retrieval_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable
