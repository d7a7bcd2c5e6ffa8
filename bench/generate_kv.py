"""What the decoder's KV cache buys in generation: tokens/s with the cache and with the full
forward recomputed per token (the reference path), side by side.

    python bench/generate_kv.py [--lengths 128,256,512] [--rounds 3] [--threads 1]

In-process, no Ray: RETRO at the default model size (ratray/retro/config.py: 6 layers, d 256,
chunks of 64, CCA at 3 and 6), untrained, CCA live (zero_init_cca off); a 64-token prompt, then
tokens sampled greedily up to each length. Retrieval is present at every completed chunk, but
its neighbours are random vocabulary tokens: the model's cost does not depend on their values, and
the index search (the same in both paths) is left out. Rounds alternate the two paths; printed
per length: median seconds of the whole call (prompt included), generated tokens/s of each path
and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ratray.retro.config import RetroConfig  # noqa: E402
from ratray.retro.generate import Retrieved, generate  # noqa: E402
from ratray.retro.model import Retro  # noqa: E402


class RandomNeighbours:
    """Stands in for the index: k random [N, F] token rows per completed chunk."""

    def __init__(self, cfg: RetroConfig, seed: int = 0):
        self.cfg, self.gen = cfg, torch.Generator().manual_seed(seed)

    def __call__(self, chunk: int, tokens: list[int]) -> Retrieved:
        k, r = self.cfg.k, self.cfg.neighbour_len
        nb = torch.randint(1, self.cfg.vocab_size, (k, r), generator=self.gen)
        return Retrieved(chunk, "", np.arange(k), np.zeros(k), 0, nb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,256,512", help="total tokens (prompt + generated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--vocab", type=int, default=8192)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = RetroConfig.small(a.vocab, 0, zero_init_cca=False)
    model = Retro(cfg).eval()
    prompt = torch.randint(1, a.vocab, (64,)).tolist()
    print(f"RETRO {cfg.n_layer} layers, d {cfg.d_model}, m {cfg.chunk_tokens}, CCA {cfg.cca_layers}, "
          f"k {cfg.k}; {a.threads} thread(s); median of {a.rounds} rounds")
    print(f"{'tokens':>6} {'generated':>9} {'cached s':>9} {'full s':>8} {'cached tok/s':>12} "
          f"{'full tok/s':>10} {'ratio':>6}")
    for n in [int(x) for x in a.lengths.split(",")]:
        new = n - len(prompt)
        times = {True: [], False: []}
        for _ in range(a.rounds):
            out = {}
            for cache in (True, False):
                g = generate(model, prompt, new, RandomNeighbours(cfg), cache=cache)
                times[cache].append(g.seconds)
                out[cache] = g.tokens
            assert out[True] == out[False], "the cache changed the greedy tokens"
        c, f = statistics.median(times[True]), statistics.median(times[False])
        print(f"{n:>6} {new:>9} {c:>9.2f} {f:>8.2f} {new / c:>12.1f} {new / f:>10.1f} {f / c:>5.1f}x")


if __name__ == "__main__":
    main()
