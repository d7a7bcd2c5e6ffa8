"""RETRO (Borgeaud et al., arXiv 2112.04426) and its no-retrieval baseline, in one file.

Data flow, in the order of this file:

    idx (b n) ─ token embedding (tied lm_head) ─ decoder blocks 1..n_layer ─ ln_f ─ lm_head
                                                        │ at the first CCA layer:
    neighbours (b l k r) ─ shared token embedding ─ encoder(cross-attends H_u) ─ E (b l k r D)
                                                        │ at every CCA layer:
                                                        x += CCA(x, E)   (chunked, causal)

Notation: b batch, n tokens, m = chunk_tokens, l = n/m chunks, k neighbours per chunk, r tokens per
neighbour (the neighbour chunk N and its continuation F), d decoder width, D encoder width.

Design (documented once, here):
- Positions are rotary (RoPE) in every attention, no position embeddings. One frame serves the
  retrieval path: a neighbour [N, F] is aligned with the chunk that retrieved it, so neighbour
  token t sits at position t and chunk token i at position i. Hence encoder cross-attention uses
  queries t, keys i in [0, m); CCA query j of a group (the token at chunk offset m-1+j) uses
  position m-1+j against keys t: copying F[j] is one fixed relative offset (+1), like the paper's
  relative encodings in CCA (measured on the copy task in the tests: learned absolute positions
  needed ~250 steps to start copying, this ~40). Any n that is a multiple of m (seq_len is the
  training length), any r (neighbour_len is the training r) and any k' >= 1 are accepted.
- The encoder runs once, at the input of the first CCA layer, on the decoder activations H there
  (as in the paper); every CCA layer attends to the same E.
- CCA: H is shifted left by m-1, so chunk u's group is positions [u*m+m-1, (u+1)*m+m-2]; the group
  attends to the k*r merged tokens of E_u. The first m-1 positions get a zero update. Keys that are
  pad_id are masked; a group whose keys are all pad gets an exact zero update (never NaN).
- neighbours=None on a retro model is RETRO[OFF]: encoder and CCA are skipped, which is exactly the
  baseline decoder computed with the same weights (parameter names match, so a baseline state dict
  loads into a retro model with strict=False, and vice versa).
- A baseline model ignores neighbours, so the same batches drive both models.
- Decoding (`decode_step`, ratray/retro/generate.py): one token at a time with a KV cache; the
  neighbours of a chunk enter with the token that completes it and are encoded once per chunk.
- Init à la GPT-2: normal(0, 0.02), residual output projections 0.02/sqrt(2*n_layer), lm_head tied
  to the token embedding. With zero_init_cca (default) the CCA output projections start at zero, so
  an untrained RETRO equals RETRO[OFF] (safe for RETROfitting a pretrained decoder); their gradient
  is non-zero, so retrieval is learned from the first step.
- How fast CCA learns to copy (bench/cca_copy.py). From a plain init CCA spreads its attention over
  all k*r keys (256 in the demo, 0.004 each) and its value path is a random map, so the gradient on
  the useful key's logit has no consistent sign: attention needs a copying value path, and the
  value path needs attention. Two defaults break the tie: copy_init starts the value path as a copy
  of the attended token's tied embedding (encoder.inp an orthonormal Q, CCA values ∝ Qᵀ, CCA output
  ∝ identity), and cca_prior_slope adds a fixed ALiBi-like -slope_h*|t-(i+1)| to CCA's logits,
  centred on the aligned position of the token being predicted (first heads near it, the last
  almost anywhere). Measured on the copy task at the demo's sizes (RETRO[ON] nats in 300 steps):
  plain 9.05 -> 8.83 (that gradient's mean/std -0.10 over steps 0-50; the key found at ~250);
  attention forced onto the key 9.05 -> 5.30 in 100 steps; both defaults 8.99 -> 5.52 (+0.52), each
  alone 7.99 (prior) / 8.60 (copy_init). Neither touches RETRO[OFF]; with zero_init_cca an untrained
  RETRO still equals it.
- Real neighbours are not position-aligned: a near-twin's continuation holds the next chunk at an
  arbitrary offset (edits shift its chunk boundaries), so copying means finding, by content, where
  the neighbour continues the current tokens (an induction head across the two). cca_match_bias
  gives CCA that match as a prior: a learnable per-head logit bonus on keys whose preceding
  neighbour token equals the query's current token, and a second one when the token before matches
  too (token ids compared, so it is exact, causal and needs no training). With copy_init the value
  at that key is the next token's embedding. On the demo corpus (bench/retro_read.py, 1 pass) the
  gap RETRO[OFF] - RETRO[ON] went from +0.002 bpb without it to +0.45 with it.
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from ratray.retro.config import RetroConfig  # the config (a torch-free dataclass: job configs use it)

__all__ = ["DecodeCache", "Retro", "RetroConfig"]

# ---------------------------------------------------------------------------------------------
# building blocks


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x (B h T hd), pos (T) → x rotated by pos (half-split form)."""
    half = x.shape[-1] // 2
    inv_freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv_freq  # T half
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head attention: queries from x (width d), keys/values from ctx (width d_ctx),
    rotary positions q_pos (T) and k_pos (S)."""

    def __init__(self, d: int, n_head: int, bias: bool, dropout: float, d_ctx: int | None = None):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q = nn.Linear(d, d, bias=bias)
        self.kv = nn.Linear(d_ctx or d, 2 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)  # residual projection (scaled init)
        self.resid_drop = nn.Dropout(dropout)

    def keys(self, ctx, k_pos):
        """ctx (B S d_ctx) → rotated keys and values (B h S hd each): what a KV cache holds."""
        (B, S, _), h = ctx.shape, self.n_head
        k, v = self.kv(ctx).view(B, S, 2, h, -1).permute(2, 0, 3, 1, 4)  # B h S hd each
        return rope(k, k_pos), v

    def forward(self, x, q_pos, ctx=None, k_pos=None, mask=None, causal: bool = False, kv=None):
        # x (B T d), ctx (B S d_ctx), mask bool broadcastable to (B h T S), True = may attend;
        # kv: (keys, values) from `keys` (a cache) instead of ctx
        (B, T, d), h = x.shape, self.n_head
        q = rope(self.q(x).view(B, T, h, d // h).transpose(1, 2), q_pos)  # B h T hd
        k, v = kv if kv is not None else self.keys(*((x, q_pos) if ctx is None else (ctx, k_pos)))
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # additive (CCA's prior), in q's dtype (autocast)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))


class MLP(nn.Module):
    def __init__(self, d: int, bias: bool, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d, bias=bias)
        self.proj = nn.Linear(4 * d, d, bias=bias)  # residual projection (scaled init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


def _key_mask(ok: torch.Tensor) -> torch.Tensor:
    """(… S) bool, True = real key → (… 1 1 S) attention mask. An all-pad row may attend to
    all keys (the caller zeroes or masks its result), so softmax never sees only -inf."""
    return (ok | ~ok.any(-1, keepdim=True))[..., None, None, :]


# ---------------------------------------------------------------------------------------------
# retrieval encoder: neighbours (b l k r) → E (b l k r D), conditioned on the decoder's H_u


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over one neighbour's r tokens, cross-attention to the
    activations H_u (m d) of the chunk u that retrieved it, then an MLP; pre-LN."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        D, h = cfg.enc_d_model, cfg.enc_n_head
        self.ln_1 = nn.LayerNorm(D, bias=cfg.bias)
        self.attn = Attention(D, h, cfg.bias, cfg.dropout)
        self.ln_2 = nn.LayerNorm(D, bias=cfg.bias)
        self.cross = Attention(D, h, cfg.bias, cfg.dropout, d_ctx=cfg.d_model)
        self.ln_3 = nn.LayerNorm(D, bias=cfg.bias)
        self.mlp = MLP(D, cfg.bias, cfg.dropout)

    def forward(self, e, hu, self_mask):
        # e (b l k r D), hu (b l m d) normalised, self_mask (b l k 1 1 r)
        b, l, k, r, D = e.shape
        t = torch.arange(r, device=e.device)  # neighbour token t aligned with chunk token t
        e = e + self.attn(self.ln_1(e).view(b * l * k, r, D), t,
                          mask=self_mask.view(b * l * k, 1, 1, r)).view(e.shape)
        # the k neighbours of chunk u all attend to the same H_u: merge k into the query axis
        i = torch.arange(hu.shape[2], device=e.device)
        e = e + self.cross(self.ln_2(e).view(b * l, k * r, D), t.repeat(k),
                           ctx=hu.flatten(0, 1), k_pos=i).view(e.shape)
        return e + self.mlp(self.ln_3(e))


class RetroEncoder(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.d_model, cfg.enc_d_model, bias=cfg.bias)  # from the shared wte
        self.ln_h = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.ln_f = nn.LayerNorm(cfg.enc_d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, nb_emb, h, key_ok):
        # nb_emb (b l k r d) token embeddings, h (b n d) decoder activations, key_ok (b l k r)
        b, l, k, r, _ = nb_emb.shape
        hu = self.ln_h(h).view(b, l, self.cfg.chunk_tokens, -1)  # b l m d
        e = self.drop(self.inp(nb_emb))  # b l k r D
        self_mask = _key_mask(key_ok)  # b l k 1 1 r
        for block in self.blocks:
            e = block(e, hu, self_mask)
        return self.ln_f(e)


# ---------------------------------------------------------------------------------------------
# chunked cross-attention (CCA)


class ChunkedCrossAttention(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.chunk_tokens = cfg.chunk_tokens
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.bias, cfg.dropout, d_ctx=cfg.enc_d_model)
        self.prior = cfg.cca_prior_slope > 0
        heads = torch.arange(cfg.n_head, dtype=torch.float32)  # ALiBi's geometric slopes
        self.register_buffer("slopes", cfg.cca_prior_slope * 2.0 ** (-8.0 * heads / cfg.n_head),
                             persistent=False)  # h
        self.pad_id = cfg.pad_id
        if cfg.cca_match_bias > 0:  # learnable per head: [one token matches, two tokens match]
            self.match = nn.Parameter(torch.full((2, cfg.n_head), float(cfg.cca_match_bias)))

    def match_bias(self, idx, nb):
        """idx (b n), nb (b l k r) token ids → (b l) h m kr logit bonus where the neighbour tokens
        before key j equal the query's current token (and the one before it): induction matching."""
        (b, n), m, pad = idx.shape, self.chunk_tokens, self.pad_id
        l = nb.shape[1]
        cur = F.pad(idx[:, m - 1:], (0, m - 1), value=pad).view(b * l, m)  # (b l) m
        prev = F.pad(idx[:, m - 2:], (0, m - 2), value=pad).view(b * l, m) if m > 1 else cur
        return self._match(cur, prev, nb.reshape(b * l, *nb.shape[2:]))

    def _match(self, cur, prev, nb):
        # cur, prev (B T) a query's current and previous token, nb (B k r) → (B h T kr)
        pad = self.pad_id
        nb1 = F.pad(nb[..., :-1], (1, 0), value=pad).flatten(1)  # token before key j
        nb2 = F.pad(nb[..., :-2], (2, 0), value=pad).flatten(1)  # two before
        one = (cur[:, :, None] == nb1[:, None, :]) & (cur != pad)[:, :, None]  # B T kr
        two = one & (prev[:, :, None] == nb2[:, None, :])
        w = self.match.float()  # 2 h
        return (one.float()[:, None] * w[0, None, :, None, None]
                + two.float()[:, None] * w[1, None, :, None, None])  # B h T kr

    def logit_mask(self, ok, q_pos, k_pos, bonus):
        """ok (B kr) real keys, q_pos (T), k_pos (kr), bonus (B h T kr) or None → the attention
        mask: bool (B 1 1 kr), or additive (B h T kr) with the prior and the match bonus."""
        mask = _key_mask(ok)  # B 1 1 kr
        if self.prior:  # -slope_h * distance to the aligned position of the predicted token
            dist = (k_pos[None, :] - q_pos[:, None] - 1).abs()  # T kr
            prior = -self.slopes[:, None, None] * dist  # h T kr
            mask = torch.where(mask, prior, float("-inf"))  # B h T kr, -inf: pad key
        if bonus is not None:  # + bonus where the neighbour continues the current tokens
            mask = torch.where(mask, 0.0, float("-inf")) + bonus if mask.dtype == torch.bool \
                else mask + bonus
        return mask

    def forward(self, x, e, key_ok, idx=None, nb=None):
        # x (b n d) normalised, e (b l k r D), key_ok (b l k r) → update (b n d);
        # idx (b n), nb (b l k r) token ids: only for the match bias
        (b, n, d), m = x.shape, self.chunk_tokens
        l, kr = e.shape[1], e.shape[2] * e.shape[3]
        # group u = positions u*m+m-1 .. (u+1)*m+m-2: shift left by m-1, pad the tail
        q = F.pad(x[:, m - 1:], (0, 0, 0, m - 1)).view(b * l, m, d)  # (b l) m d
        ok = key_ok.reshape(b * l, kr)  # neighbour and time axes merged
        q_pos = torch.arange(m - 1, 2 * m - 1, device=x.device)  # in the frame of [N, F]
        k_pos = torch.arange(e.shape[3], device=x.device).repeat(e.shape[2])
        mask = self.logit_mask(ok, q_pos, k_pos,
                               self.match_bias(idx, nb) if hasattr(self, "match") else None)
        y = self.attn(q, q_pos, ctx=e.reshape(b * l, kr, -1), k_pos=k_pos, mask=mask)  # (b l) m d
        y = y * ok.any(-1).to(y.dtype)[:, None, None]  # all keys pad → exact zero update
        return F.pad(y.view(b, l * m, d)[:, : n - m + 1], (0, 0, m - 1, 0))  # first m-1: zero

    def step(self, x, group, j: int, cur, prev):
        """One position of a group (decoding): x (b 1 d) normalised, query j of the group,
        cur/prev (b) its current and previous token; group from `Retro.decode_step`."""
        (kv, ok, nb), m = group, self.chunk_tokens
        q_pos = torch.tensor([m - 1 + j], device=x.device)
        k_pos = torch.arange(nb.shape[-1], device=x.device).repeat(nb.shape[1])
        bonus = self._match(cur[:, None], prev[:, None], nb) if hasattr(self, "match") else None
        y = self.attn(x, q_pos, kv=kv, mask=self.logit_mask(ok, q_pos, k_pos, bonus))  # b 1 d
        return y * ok.any(-1).to(y.dtype)[:, None, None]


# ---------------------------------------------------------------------------------------------
# decoder


class Block(nn.Module):
    """Pre-LN decoder block: causal self-attention, [CCA], MLP (the paper's ATTN, CCA, FFW)."""

    def __init__(self, cfg: RetroConfig, cca: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.bias, cfg.dropout)
        if cca:
            self.ln_cca = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
            self.cca = ChunkedCrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.bias, cfg.dropout)

    def forward(self, x, e=None, key_ok=None, idx=None, nb=None):
        x = x + self.attn(self.ln_1(x), torch.arange(x.shape[1], device=x.device), causal=True)
        if e is not None and hasattr(self, "cca"):
            x = x + self.cca(self.ln_cca(x), e, key_ok, idx, nb)
        return x + self.mlp(self.ln_2(x))

    def step(self, x, pos, cache: "DecodeCache", i: int):
        """Decoding: x (b 1 d) at position pos (1,); earlier keys/values from the cache."""
        a = self.ln_1(x)
        k, v = self.attn.keys(a, pos)  # b h 1 hd
        if cache.kv[i] is not None:
            k, v = torch.cat([cache.kv[i][0], k], 2), torch.cat([cache.kv[i][1], v], 2)
        cache.kv[i] = (k, v)
        x = x + self.attn(a, pos, kv=(k, v))  # the one query comes after every key: no mask
        if cache.group is not None and hasattr(self, "cca"):
            m, idx = self.cca.chunk_tokens, cache.idx
            x = x + self.cca.step(self.ln_cca(x), cache.group[i], (int(pos) + 1) % m, idx[:, -1],
                                  idx[:, -2] if m > 1 else idx[:, -1])
        return x + self.mlp(self.ln_2(x))


class DecodeCache:
    """What `Retro.decode_step` keeps between tokens (b rows, p tokens fed so far): per block the
    self-attention keys/values (b h p hd); the tokens (b p); the first CCA layer's input over the
    current chunk (b ≤m d: the encoder's H_u); the group being served, per CCA block: its keys and
    values of E (b h kr hd), the real keys (b kr) and the neighbour tokens (b k r)."""

    def __init__(self, n_blocks: int):
        self.n, self.kv, self.idx, self.h, self.group = 0, [None] * n_blocks, None, None, None


class Retro(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        if not cfg.complete:
            raise ValueError("RetroConfig needs vocab_size, pad_id and chunk_tokens (for_store())")
        self.cfg = cfg
        self.retrieval = cfg.model == "retro"
        cca = set(cfg.cca_layers) if self.retrieval else set()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i in cca) for i in range(1, cfg.n_layer + 1))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        if self.retrieval:
            self.encoder = RetroEncoder(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
            if isinstance(mod, (nn.Linear, nn.LayerNorm)) and mod.bias is not None:
                nn.init.zeros_(mod.bias)
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections (attn, MLP, CCA, encoder)
                nn.init.normal_(p, mean=0.0, std=std)
        if self.retrieval and self.cfg.copy_init:  # value path = copy of the neighbour's token
            d, D = self.cfg.d_model, self.cfg.enc_d_model
            Q = nn.init.orthogonal_(torch.empty(D, d))  # D d: orthonormal rows (or columns)
            with torch.no_grad():  # inp keeps the embedding's scale; values, proj: normal-init rms
                self.encoder.inp.weight.copy_(Q)
                for block in self.blocks:
                    if hasattr(block, "cca"):
                        block.cca.attn.kv.weight[d:].copy_(0.02 * math.sqrt(d) * Q.T)  # values
                        block.cca.attn.proj.weight.copy_(std * math.sqrt(d) * torch.eye(d))
        if self.cfg.zero_init_cca:
            for block in self.blocks:
                if hasattr(block, "cca"):
                    nn.init.zeros_(block.cca.attn.proj.weight)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, idx, neighbours=None, targets=None):
        """idx (b n) long, n a multiple of m; neighbours (b n/m k' r') long, or None
        (RETRO[OFF]); targets (b n) long or None.
        Returns (logits (b n V), mean cross-entropy over non-pad targets or None)."""
        cfg = self.cfg
        b, n = idx.shape
        if n == 0 or n % cfg.chunk_tokens:
            raise ValueError(f"sequence length {n} must be a positive multiple of chunk_tokens "
                             f"({cfg.chunk_tokens})")
        x = self.drop(self.wte(idx))  # b n d (positions are rotary, inside attention)
        key_ok = None
        if not self.retrieval:
            neighbours = None
        if neighbours is not None:
            l = n // cfg.chunk_tokens
            if neighbours.dim() != 4 or neighbours.shape[:2] != (b, l):
                raise ValueError(f"neighbours must be (b={b}, l={l}, k, r), "
                                 f"got {tuple(neighbours.shape)}")
            key_ok = neighbours != cfg.pad_id  # b l k r
        e = None
        for i, block in enumerate(self.blocks, 1):
            if neighbours is not None and i == cfg.cca_layers[0]:
                e = self.encoder(self.wte(neighbours), x, key_ok)  # b l k r D
            x = block(x, e, key_ok, idx, neighbours)
        logits = self.lm_head(self.ln_f(x))  # b n V
        if targets is None:
            return logits, None
        nll, count = self._nll(logits, targets)
        return logits, nll / count.clamp(min=1)

    @torch.no_grad()
    def decode_step(self, tok, cache: DecodeCache, neighbours=None):
        """Feed one token per row, tok (b,), at position p = cache.n (a fresh cache: DecodeCache(
        len(model.blocks))); returns the logits (b V) that forward gives at p. Costs one position.
        neighbours (b k' r'): retrieved with the chunk this token completes (p % m == m-1), served
        by CCA at positions p .. p+m-1 (forward's group of that chunk); none at such a token: those
        positions get no CCA (as all-pad neighbours), so RETRO[OFF] never passes any."""
        cfg, m, p = self.cfg, self.cfg.chunk_tokens, cache.n
        if neighbours is not None and (not self.retrieval or p % m != m - 1):
            raise ValueError(f"neighbours go with a token that completes a chunk (position % {m} "
                             f"== {m - 1}) of a retro model; got position {p}")
        cache.idx = tok[:, None] if cache.idx is None else torch.cat([cache.idx, tok[:, None]], 1)
        pos = torch.tensor([p], device=tok.device)
        x = self.wte(tok)[:, None]  # b 1 d
        if p % m == m - 1:
            cache.group = None  # the previous chunk's group ended at p-1
        for i, block in enumerate(self.blocks):
            if self.retrieval and i + 1 == cfg.cca_layers[0]:
                cache.h = x if p % m == 0 else torch.cat([cache.h, x], 1)  # b (p%m+1) d
                if neighbours is not None:
                    ok = neighbours != cfg.pad_id  # b k r
                    e = self.encoder(self.wte(neighbours)[:, None], cache.h, ok[:, None])[:, 0]
                    k_pos = torch.arange(e.shape[2], device=e.device).repeat(e.shape[1])
                    cache.group = {j: (b.cca.attn.keys(e.flatten(1, 2), k_pos), ok.flatten(1),
                                       neighbours) for j, b in enumerate(self.blocks)
                                   if hasattr(b, "cca")}  # b k r D → keys/values once per chunk
            x = block.step(x, pos, cache, i)
        cache.n += 1
        return self.lm_head(self.ln_f(x))[:, 0]

    def _nll(self, logits, targets):
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                              ignore_index=self.cfg.pad_id, reduction="sum")
        return nll, (targets != self.cfg.pad_id).sum()

    @torch.no_grad()
    def nll_sum(self, idx, neighbours, targets) -> tuple[float, int]:
        """(sum of nats over non-pad targets, their count): exact bits-per-byte accumulation."""
        logits, _ = self(idx, neighbours)
        nll, count = self._nll(logits, targets)
        return float(nll.double()), int(count)

    # --- parameters ---------------------------------------------------------------------------

    def num_params(self) -> int:
        """Unique parameters (the tied lm_head counted once; no position embeddings)."""
        return sum(p.numel() for p in self.parameters())

    def retrieval_parameters(self) -> list[nn.Parameter]:
        """Encoder + CCA parameters: what RETROfitting trains with the decoder frozen."""
        return [p for name, p in self.named_parameters()
                if name.startswith("encoder.") or ".cca." in name or ".ln_cca." in name]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on Linear weights only (not norms, biases, embeddings)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay.discard(id(self.wte.weight))  # tied lm_head is the embedding
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]

    def configure_optimizer(self, weight_decay: float, lr: float,
                            betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=lr, betas=betas)
