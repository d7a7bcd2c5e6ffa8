"""How fast RETRO's chunked cross-attention (CCA) learns to copy: the copy task at any size.

    python bench/cca_copy.py [--variants old,fix] [--steps 300] [--every 50] [--size k=v+k=v]

The task (tests/test_retro_model.py::copy_task at the demo's sizes by default): random tokens;
neighbour 0 of chunk u is [chunk u, chunk u+1], so every token after the first chunk can be
predicted by copying the neighbour's continuation; the other k-1 neighbours are distractors (random
[N, F] pairs) unless --dup repeats neighbour 0. Trains in-process on fresh batches (torch AdamW,
warmup then constant lr, clip 1.0; no Ray, no DeepSpeed); each variant starts from the same seed,
so running variants together or one per process gives the same numbers. Every --every steps it
prints the held-out loss with neighbours ON and OFF and what the first CCA layer does:
  ent    entropy of its attention over the k*r keys (uniform over 256 keys: 5.55 nats)
  hit    attention on the key to copy (neighbour 0, position m+j for query j): mean over heads;
         hit* the best head (positions alone cannot tell a distractor apart: at most 0.5 for k=2)
  s.std  spread of the learned logits q.k/sqrt(hd) (the prior not included)
  upd    rms of the CCA update / rms of the residual stream it is added to
  sig    over the last interval's training steps: mean / std of -dL/ds at the key to copy, i.e.
         how consistently gradient descent raises that key's logit (0: no consistent pull)
and the mean gradient norm per parameter group. One summary line per variant at the end.

A variant is a name in VARIANTS or ad-hoc overrides joined by '+': RetroConfig fields
(`enc_d_model=192`, `cca_layers=1/3`, `zero_init_cca=1`), `lr=`, `rlr=` (learning-rate multiplier
on the encoder + CCA parameters), `oracle=1` (CCA may attend only to the key to copy).
`name:spec` names an ad-hoc variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ratray.retro.model import Retro, RetroConfig, rope  # noqa: E402

# the demo's model (configs/demo.yaml) with the chunk store's m and a GPT-2-sized vocabulary
DEMO = dict(vocab_size=8192, pad_id=0, chunk_tokens=64, seq_len=256, n_layer=4, n_head=4,
            d_model=192, enc_layers=2, enc_d_model=96, enc_n_head=4, k=2, zero_init_cca=False)
OLD = "cca_prior_slope=0+copy_init=0"  # RoPE only, normal(0, 0.02) init: before the fix
VARIANTS = {
    "old": OLD,
    "fix": "",  # the defaults: CCA's alignment prior and the copy init of the value path
    "prior_only": "copy_init=0",
    "copy_only": "cca_prior_slope=0",
    "oracle": OLD + "+oracle=1",  # old model, attention forced onto the key to copy
    "fix_zero_init": "zero_init_cca=1",  # fix, CCA output starting at 0 (RETRO == RETRO[OFF])
}


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """'name' | 'name:k=v+k=v' | 'k=v+k=v' → (name, config overrides, training options)."""
    if ":" in spec:
        name, body = spec.split(":", 1)
    elif spec in VARIANTS or "=" in spec:
        name, body = spec, VARIANTS.get(spec, spec)
    else:
        raise SystemExit(f"unknown variant {spec!r}: one of {sorted(VARIANTS)} or k=v+k=v")
    fields = {f.name: f for f in dataclasses.fields(RetroConfig)}
    cfg, opt = {}, {}
    for item in filter(None, body.split("+")):
        key, _, val = item.partition("=")
        if key in ("lr", "rlr", "oracle"):
            opt[key] = float(val)
        elif key == "cca_layers":
            cfg[key] = tuple(int(v) for v in val.split("/"))
        elif key in fields:
            kind = type(DEMO.get(key, getattr(RetroConfig(), key)))
            cfg[key] = (val.lower() in ("1", "true")) if kind is bool else kind(val)
        else:
            raise SystemExit(f"variant {spec!r}: unknown key {key!r}")
    return name, cfg, opt


def copy_task(g: torch.Generator, b: int, cfg: RetroConfig, dup: bool):
    """idx (b n), neighbours (b l k 2m), targets (b n): neighbour 0 of chunk u = [chunk u, u+1]."""
    n, m, V, pad = cfg.seq_len, cfg.chunk_tokens, cfg.vocab_size, cfg.pad_id
    idx = torch.randint(1, V, (b, n + m), generator=g)
    chunks = idx.view(b, n // m + 1, m)
    nb = torch.cat([chunks[:, :-1], chunks[:, 1:]], dim=-1)[:, :, None]  # b l 1 2m
    nb[:, -1, :, m:] = pad  # the last chunk's continuation lies outside the sequence
    if cfg.k > 1:
        other = nb.expand(-1, -1, cfg.k - 1, -1) if dup else torch.randint(
            1, V, (b, n // m, cfg.k - 1, 2 * m), generator=g)
        nb = torch.cat([nb, other], dim=2)
    return idx[:, :n], nb, idx[:, 1: n + 1]


class CCAProbe:
    """What the first CCA layer does: its attention probabilities (captured from the
    scaled_dot_product_attention call of that layer, any additive mask included), the rms of its
    update relative to the residual stream, and (oracle) a mask that allows only the key to copy."""

    def __init__(self, model: Retro, oracle: bool = False):
        self.model, self.oracle, self.stats = model, oracle, []
        block = model.blocks[model.cfg.cca_layers[0] - 1]
        self.handles = [block.cca.attn.register_forward_pre_hook(self.pre, with_kwargs=True),
                        block.ln_cca.register_forward_pre_hook(self.resid),
                        block.cca.register_forward_hook(self.update)]
        self.on, self.armed, self.x_rms, self.upd_rms = False, False, 0.0, 0.0
        self.grad_on, self.grad_armed, self.delta, self.sig = False, False, None, []
        self.sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.capture

    def signal(self):
        """After backward: how consistently descent raises the logit of the key to copy,
        mean / std over (group, head, query) of -dL/ds at key m+j of neighbour 0."""
        if self.delta is not None and self.delta.grad is not None:
            m = self.delta.shape[2]
            j = torch.arange(m)
            g = -self.delta.grad[:, :, j, m + j][self.delta_real]  # groups h m
            if g.std() > 0:  # (an oracle's single key has no logit gradient)
                self.sig.append((g.mean() / g.std()).item())
        self.delta = None

    def close(self):
        F.scaled_dot_product_attention = self.sdpa
        for h in self.handles:
            h.remove()

    def resid(self, mod, args):
        if self.on:
            self.x_rms = args[0].pow(2).mean().sqrt().item()

    def update(self, mod, args, out):
        if self.on:
            m = self.model.cfg.chunk_tokens
            self.upd_rms = out[:, m - 1:].pow(2).mean().sqrt().item()

    def pre(self, mod, args, kwargs):
        # mask: bool (b l) 1 1 S (True = real key) or additive (b l) h m S (-inf = pad key)
        mask, m = kwargs["mask"], args[0].shape[1]
        allowed = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        self.armed, self.real = self.on, allowed[:, 0, 0, m: 2 * m].all(-1)  # F of neighbour 0 real
        self.grad_armed = self.grad_on
        if self.oracle:  # query j may attend only to key m+j of neighbour 0 (where it is real)
            j = torch.arange(m)
            only = torch.zeros(m, mask.shape[-1], dtype=torch.bool)
            only[j, m + j] = True
            only = torch.where(self.real[:, None, None, None], only, allowed)
            return args, {**kwargs, "mask": only}

    def capture(self, q, k, v, attn_mask=None, **kw):
        if self.grad_armed:  # a training step: attention by hand, with a zero logit offset whose
            self.grad_armed = False  # gradient is dL/ds for every (query, key)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # B h T S
            if attn_mask is not None:
                s = (s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                     else s + attn_mask)
            self.delta = torch.zeros_like(s, requires_grad=True)
            self.delta_real = self.real
            return (s + self.delta).softmax(-1) @ v
        if self.armed:  # q (B h T hd), k (B h S hd): the first CCA layer's call
            self.armed = False
            with torch.no_grad():
                s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # B h T S
                sstd = s.std().item()  # spread of the learned logits (q.k), before any mask
                if attn_mask is not None:
                    s = (s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                         else s + attn_mask)
                p = s.softmax(-1)
                ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # B h T
                m = q.shape[2]  # query j copies key m + j of neighbour 0
                j = torch.arange(m)
                hit = p[:, :, j, m + j]  # B h m
                self.stats.append((ent.mean().item(), hit[self.real].mean().item(),
                                   hit[self.real].mean((0, 2)).max().item(), sstd))
        return self.sdpa(q, k, v, attn_mask=attn_mask, **kw)


def groups(model: Retro) -> dict[str, list[torch.nn.Parameter]]:
    out = {"wte": [], "decoder": [], "encoder": [], "cca": []}
    for name, p in model.named_parameters():
        key = ("encoder" if name.startswith("encoder.") else "cca" if ".cca." in name
               or ".ln_cca." in name else "wte" if name == "wte.weight" else "decoder")
        out[key].append(p)
    return out


def run_variant(spec: str, args) -> dict:
    name, over, opt = parse_variant(spec)
    cfg = RetroConfig(**{**DEMO, **args.size, **over})
    torch.manual_seed(args.seed)
    model = Retro(cfg)
    lr = opt.get("lr", args.lr)
    retr = {id(p) for p in model.retrieval_parameters()}
    pgs = []
    for g in model.param_groups(args.weight_decay):  # split each by retrieval / not
        for is_r in (False, True):
            ps = [p for p in g["params"] if (id(p) in retr) == is_r]
            if ps:
                pgs.append({"params": ps, "weight_decay": g["weight_decay"],
                            "lr_mult": opt.get("rlr", 1.0) if is_r else 1.0})
    optim = torch.optim.AdamW(pgs, lr=lr, betas=(0.9, 0.95))
    gs = groups(model)
    probe = CCAProbe(model, oracle=bool(opt.get("oracle")))
    g = torch.Generator().manual_seed(args.seed + 1)
    held = copy_task(torch.Generator().manual_seed(12345), args.eval_batch, cfg, args.dup)

    @torch.no_grad()
    def evaluate():
        idx, nb, tgt = held
        model.eval()
        probe.on, probe.stats = True, []
        on = model(idx, nb, tgt)[1].item()
        probe.on = False
        off = model(idx, None, tgt)[1].item()
        return on, off, probe.stats[0] + (probe.upd_rms / probe.x_rms,)

    print(f"\n== {name}  ({'+'.join(f'{k}={v}' for k, v in {**over, **opt}.items()) or 'defaults'})"
          f"  params {model.num_params() / 1e6:.2f}M, retrieval "
          f"{sum(p.numel() for p in model.retrieval_parameters()) / 1e6:.2f}M, cca_layers "
          f"{cfg.cca_layers}, keys k*r = {cfg.k * cfg.neighbour_len}", flush=True)
    cols = ("ent", 5), ("hit", 6), ("hit*", 6), ("s.std", 6), ("upd", 6), ("sig", 6)
    print(f"{'step':>5} {'ON':>7} {'OFF':>7} " + " ".join(f"{c:>{w}}" for c, w in cols)
          + " | grad norm wte/decoder/encoder/cca", flush=True)
    curve, gnorm, t0 = {}, {k: 0.0 for k in gs}, time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            on, off, (ent, hit, best, sstd, upd) = evaluate()
            curve[step] = (on, off)
            n = max(1, args.every if step else 1)
            gn = "/".join(f"{gnorm[k] / n:.3f}" for k in gs) if step else "-"
            sig = f"{sum(probe.sig) / len(probe.sig):+6.3f}" if probe.sig else f"{'-':>6}"
            probe.sig = []
            print(f"{step:5d} {on:7.3f} {off:7.3f} {ent:5.2f} {hit:6.3f} {best:6.3f} {sstd:6.3f} "
                  f"{upd:6.3f} {sig} | {gn}", flush=True)
            gnorm = {k: 0.0 for k in gs}
        if step == args.steps:
            break
        for pg in optim.param_groups:
            pg["lr"] = lr * pg["lr_mult"] * min(1.0, (step + 1) / args.warmup)
        idx, nb, tgt = copy_task(g, args.batch, cfg, args.dup)
        probe.grad_on = True
        loss = model.train()(idx, nb, tgt)[1]
        probe.grad_on = False
        optim.zero_grad(set_to_none=True)
        loss.backward()
        probe.signal()
        for k, ps in gs.items():
            gnorm[k] += math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optim.step()
    probe.close()
    return dict(name=name, curve=curve, secs=time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="old,fix", help="comma-separated (see the docstring)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (demo: 2 workers x 4)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup", action="store_true", help="neighbours 1..k-1 repeat neighbour 0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="", help="size overrides for every variant, k=v+k=v "
                    "(e.g. chunk_tokens=16+seq_len=64+vocab_size=512)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.size = parse_variant("size:" + args.size)[1]
    m = args.size.get("chunk_tokens", DEMO["chunk_tokens"])
    V = args.size.get("vocab_size", DEMO["vocab_size"])
    n = args.size.get("seq_len", DEMO["seq_len"])
    print(f"copy task: m {m}, vocab {V}, n {n}, batch {args.batch}, lr {args.lr}, "
          f"uniform {math.log(V - 1):.2f} nats, perfect copier ≈ {m / n * math.log(V - 1):.2f}")
    results = [run_variant(v, args) for v in args.variants.split(",")]
    show = [s for s in (0, 50, 100, 200, 300) if s <= args.steps] + (
        [args.steps] if args.steps not in (0, 50, 100, 200, 300) else [])
    print("\nsummary (held-out loss ON/OFF at steps " + "/".join(map(str, show)) + ")")
    for r in results:
        pts = [r["curve"].get(s) for s in show]
        print(f"  {r['name']:<14} " + "  ".join(f"{p[0]:.2f}/{p[1]:.2f}" if p else "-" for p in pts)
              + f"   ({r['secs']:.0f} s)")


if __name__ == "__main__":
    main()
