"""JSA (Joint Stochastic Approximation) for retrieval: a posterior retriever and its sampler.

    query with the answer shown x⊕y ─ posterior tower ─ e_q (b p) ─┐
    the prior's candidates' embeddings e_z (b k-1 p), no gradient ─┴─ log q(z|x,y) (b k, ∅ too)
    Metropolis independence sampling over the k candidates, proposals z' ~ q(z|x,y), target
        π(z) ∝ p(z|x) p(y|z,x): accept z' with min(1, w(z')/w(z)), w = p(z|x) p(y|z,x) / q(z|x,y)
      └─ z* (b,) the chain's last state
    loss = -[log p(z*|x) + log p(y|z*,x) + log q(z*|x,y)] / masked tokens
      (the prior, the reader and the posterior all trained on the accepted passage; no marginal)

Design (documented once, here):
- The posterior re-scores the prior's candidates: the index stays the prior's (doc tower), the
  refresh service and hot swaps are unchanged, and q needs no index of its own. Its block
  embeddings are the doc tower's, detached, so q's gradient reaches the posterior tower only.
  Its null document has a learned bias over the same reference as the prior's.
- One chain per query per step, `model.jsa_proposals` proposals: the initial state is the first
  proposal (accepted), each later one is accepted or rejected. On a finite candidate set the
  chain's last state tends to the exact posterior π as proposals grow (tested on an enumerable
  case); acceptance rate = accepted / (proposals - 1).
- The retriever's gradient noise: JSA's gradient on the prior's logits is p(z|x) - onehot(z*),
  marginal likelihood's exact one (over the same candidates) p(z|x) - π(z). Their squared
  distance ‖onehot(z*) - π‖² is logged per query (`grad_noise`; 0 for marginal likelihood;
  its expectation 1 - Σπ² when z* ~ π): the variance JSA pays for needing no marginal.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def mis_chain(log_q: torch.Tensor, log_target: torch.Tensor, keep: torch.Tensor, proposals: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Metropolis independence sampling, one chain per row.

    log_q (b k) proposal log-probabilities (normalised over the kept candidates), log_target (b k)
    unnormalised log π, keep (b k) candidates that exist, proposals ≥ 1 -> (z (b,) the last
    state, accepted (b,) accepted proposals after the first)."""
    if proposals < 1:
        raise ValueError(f"proposals must be >= 1, got {proposals}")
    b = log_q.shape[0]
    probs = log_q.float().masked_fill(~keep, float("-inf")).softmax(-1)  # (b k)
    draws = torch.multinomial(probs, proposals, replacement=True, generator=generator)  # (b P)
    log_w = (log_target.float() - log_q.float()).masked_fill(~keep, float("-inf"))  # (b k)
    u = torch.rand(b, proposals, generator=generator, device=log_q.device)  # (b P)
    z = draws[:, 0]
    accepted = torch.zeros(b, dtype=torch.long, device=log_q.device)
    rows = torch.arange(b, device=log_q.device)
    for i in range(1, proposals):
        cand = draws[:, i]
        ratio = (log_w[rows, cand] - log_w[rows, z]).clamp(max=0.0).exp()
        take = u[:, i] < ratio
        z = torch.where(take, cand, z)
        accepted += take.long()
    return z, accepted


def null_reference(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """s (b k-1) block scores (-inf where not valid), valid (b k-1) -> (b 1) their log-mean-exp
    over the valid blocks (0 for a row with none): the null document's reference score, in the
    prior (model.py) and the posterior alike. With its gradient: a shift of all of a row's block
    scores leaves p(∅) unchanged and gets no gradient (the finite fill keeps a row with no valid
    block from sending NaN back through logsumexp)."""
    n = valid.sum(1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(~valid, -1e4), 1, keepdim=True)
    return torch.where(n > 0, lse - torch.log(n.clamp(min=1).float()), torch.zeros_like(lse))


def posterior_logits(e_q: torch.Tensor, e_z: torch.Tensor, valid: torch.Tensor,
                     null_bias: torch.Tensor) -> torch.Tensor:
    """e_q (b p) the posterior tower's embedding of x⊕y, e_z (b k-1 p) the candidates' (detached
    here), valid (b k-1) -> log q(z|x,y) (b k), ∅ last."""
    s = torch.einsum("bp,bkp->bk", e_q, e_z.detach()).float().masked_fill(~valid, float("-inf"))
    return torch.log_softmax(torch.cat([s, null_reference(s, valid) + null_bias], 1), -1)


def with_answer(query: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """query (b q) masked, labels (b q) -> the query with its masked tokens shown (what q reads)."""
    return torch.where(labels != ignore, labels.to(query.dtype), query)


def jsa_loss(log_pz: torch.Tensor, logp_yz: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor,
             n_masked: torch.Tensor, proposals: int, generator: torch.Generator | None = None) -> dict:
    """One JSA step's surrogate loss (its gradient is JSA's update for the prior, the reader and
    the posterior) and its statistics: proposals, accepted, grad_noise (sums over the batch)."""
    log_target = (log_pz + logp_yz).detach().masked_fill(~keep, float("-inf"))  # (b k)
    z, accepted = mis_chain(log_q.detach(), log_target, keep, proposals, generator)
    rows = torch.arange(len(z), device=z.device)
    picked = log_pz[rows, z] + logp_yz[rows, z] + log_q[rows, z]  # (b)
    loss = -picked.sum() / n_masked.clamp(min=1)
    with torch.no_grad():
        post = torch.softmax(log_target, -1)  # (b k) π over the candidates
        onehot = torch.nn.functional.one_hot(z, post.shape[1]).float()
        noise = ((onehot - post) ** 2).sum(1)  # (b)
    return {"loss": loss, "z": z, "accepted": accepted.float(),
            "proposals": torch.full_like(noise, float(max(proposals - 1, 0))), "grad_noise": noise}
