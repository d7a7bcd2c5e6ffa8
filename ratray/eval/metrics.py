"""Metrics as plain functions of counts and id arrays (numpy; no torch, no Ray).

- bits-per-byte: nats summed over the predicted tokens ÷ ln 2 ÷ the exact UTF-8 bytes those tokens
  stand for (never decoded text: a chunk may start or end inside a character);
- recall@k of an approximate top-k against the exact one;
- REALM's rates: masked-token accuracy with retrieval and with the null document only, retrieval
  utility, p(∅|x), from the sums `Realm.forward` reports (see ratray/realm/model.py `_stats`).
"""
from __future__ import annotations

import math

import numpy as np


def bits_per_byte(nats: float, n_bytes: float) -> float:
    return nats / math.log(2) / max(1.0, n_bytes)


def lm_summary(nats: float, n_bytes: float, n_tokens: float) -> dict:
    """Sums of one evaluation (all ranks) → bpb, nats per token and the counts."""
    return {"bpb": bits_per_byte(nats, n_bytes), "nats_per_token": nats / max(1.0, n_tokens),
            "tokens": int(n_tokens), "bytes": int(n_bytes)}


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the true top-k (exact_ids (b, k)) found in the approximate top-k (b, >=k)."""
    exact = np.asarray(exact_ids)
    approx = np.asarray(approx_ids)[:, : exact.shape[1]]
    valid = exact >= 0  # (b, k)
    hit = (approx[:, :, None] == exact[:, None, :]).any(axis=1) & valid  # (b, k)
    return float(hit.sum() / max(1, valid.sum()))


REALM_SUMS = ("correct_retrieval", "correct_null", "masked", "queries", "utility", "p_null", "nll_null",
              "nll_marginal", "proposals", "accepted", "grad_noise")


def realm_rates(s: dict, prefix: str = "") -> dict:
    """REALM sums (keys REALM_SUMS) → accuracies per masked token, utility and p(∅|x) per query."""
    m, q = max(s["masked"], 1.0), max(s["queries"], 1.0)
    return {f"{prefix}acc_retrieval": s["correct_retrieval"] / m, f"{prefix}acc_null": s["correct_null"] / m,
            f"{prefix}retrieval_utility": s["utility"] / q, f"{prefix}p_null": s["p_null"] / q,
            f"{prefix}nll_null_per_token": s["nll_null"] / m,
            f"{prefix}nll_marginal_per_token": s["nll_marginal"] / m,
            # objective jsa (ratray/realm/jsa.py): the sampler's acceptance rate, the retriever's
            # gradient noise ‖onehot(z*) - π‖² per query (0 under marginal likelihood)
            **({f"{prefix}jsa_acceptance": s["accepted"] / s["proposals"]} if s["proposals"] > 0 else {}),
            f"{prefix}retriever_grad_noise": s["grad_noise"] / q}
