"""The compute price of retrieval: a RETRO training step against a baseline step, and where it goes.

    python bench/step_time.py [--config configs/demo.yaml] [--rounds 5] [--steps 10] [--threads 1]
                              [--variants retro:,enc1:enc_layers=1]

In-process, no Ray and no DeepSpeed: the model of the config (`model:` section) on random tokens of
the chunk store's vocabulary (timing does not depend on the values), micro-batch `train.micro_batch`,
torch AdamW. Every round times each contender for --steps steps (forward + backward + optimizer),
contenders interleaved round by round; printed per contender: median step time over rounds, and the
paired ratio to the baseline per round with its median. Then one profiled RETRO step per variant,
split into the decoder blocks (self-attention + MLP), the encoder, CCA (its match bias
separately), the head + loss, backward and the optimizer (forward parts timed with hooks;
backward as a whole).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ratray.config import load_config  # noqa: E402
from ratray.retro.config import RetroJobConfig  # noqa: E402
from ratray.retro.model import Retro  # noqa: E402


def parse(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    over = {}
    for kv in filter(None, body.split("+")):
        k, v = kv.split("=")
        over[k] = eval(v, {}, {})
    return name, over


def batch(cfg, b: int, g: torch.Generator):
    l = cfg.seq_len // cfg.chunk_tokens
    idx = torch.randint(1, cfg.vocab_size, (b, cfg.seq_len), generator=g)
    nb = torch.randint(1, cfg.vocab_size, (b, l, cfg.k, cfg.neighbour_len), generator=g)
    return idx, nb, idx.roll(-1, 1)


def run_steps(model, opt, data, steps: int, retrieval: bool) -> float:
    idx, nb, tgt = data
    t = time.perf_counter()
    for _ in range(steps):
        loss = model(idx, nb if retrieval else None, tgt)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def profile_step(model, opt, data) -> dict[str, float]:
    """Seconds of one RETRO step by part (forward parts by hooks, backward and optimizer whole)."""
    idx, nb, tgt = data
    parts: dict[str, float] = {}
    starts: dict[int, float] = {}

    def timed(name):
        def pre(mod, args):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - starts[id(mod)]
        return pre, post

    hooks = []
    for name, mod in [("encoder", getattr(model, "encoder", None)), ("head", model.lm_head)]:
        if mod is not None:
            pre, post = timed(name)
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    for block in model.blocks:
        for name, mod in [("decoder attention", block.attn), ("decoder MLP", block.mlp),
                          ("CCA", getattr(block, "cca", None))]:
            if mod is not None:
                pre, post = timed(name)
                hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    cca = [b.cca for b in model.blocks if hasattr(b, "cca")]
    originals = []
    for c in cca:
        if hasattr(c, "match"):
            f = c.match_bias

            def wrapped(*a, _f=f):
                t = time.perf_counter()
                out = _f(*a)
                parts["CCA match bias"] = parts.get("CCA match bias", 0.0) + time.perf_counter() - t
                return out
            originals.append((c, f))
            c.match_bias = wrapped
    t0 = time.perf_counter()
    loss = model(idx, nb, tgt)[1]
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    for h in hooks:
        h.remove()
    for c, f in originals:
        c.match_bias = f
    parts["forward (all)"] = t1 - t0
    parts["backward"] = t2 - t1
    parts["optimizer"] = t3 - t2
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--variants", default="retro:", help="RETRO variants (RetroConfig overrides)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192, help="the chunk store's vocabulary size")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    job = load_config(RetroJobConfig, a.config)
    base_cfg = job.model.for_store(a.vocab, 0, 64)
    b = job.train.micro_batch
    contenders = {"baseline": (dataclasses.replace(base_cfg, model="baseline"), False)}
    for spec in a.variants.split(","):
        name, over = parse(spec)
        contenders[name] = (dataclasses.replace(base_cfg, **over), True)
    built = {}
    for name, (cfg, retr) in contenders.items():
        torch.manual_seed(0)
        m = Retro(cfg).train()
        built[name] = (m, m.configure_optimizer(0.1, 1e-3), retr,
                       batch(cfg, b, torch.Generator().manual_seed(0)))
        run_steps(m, built[name][1], built[name][3], 2, retr)  # warm-up
    print(f"{a.config}: micro-batch {b} x {base_cfg.seq_len} tokens, {a.threads} thread(s), "
          f"{a.rounds} rounds x {a.steps} steps, contenders interleaved", flush=True)
    times: dict[str, list[float]] = {n: [] for n in built}
    for r in range(a.rounds):
        for name, (m, opt, retr, d) in built.items():
            times[name].append(run_steps(m, opt, d, a.steps, retr))
        print(f"round {r + 1}: " + "  ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()),
              flush=True)
    print()
    for name in built:
        ratios = [x / y for x, y in zip(times[name], times["baseline"])]
        print(f"{name:>10}: median step {statistics.median(times[name]) * 1e3:6.0f} ms   "
              f"÷ baseline, paired per round: median {statistics.median(ratios):.2f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    for name, (m, opt, retr, d) in built.items():
        if not retr:
            continue
        prof = [profile_step(m, opt, d) for _ in range(3)]
        keys = list(prof[0])
        print(f"\n{name}: one step by part (median of 3, ms): " + ", ".join(
            f"{k} {statistics.median(x[k] for x in prof) * 1e3:.0f}" for k in keys))


if __name__ == "__main__":
    main()
