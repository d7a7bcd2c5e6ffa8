"""Throughput of the sharded actor service vs the same FAISS index in-process.

    python bench/index_qps.py [--n 200000] [--dim 384] [--shards 2] [--queries 1024] [--k 10]
                              [--reps 5] [--pq-factory IVF1024,PQ192] [--quick] [--out res.json]

One run builds a Flat and an IVF-PQ index over the same vectors (a seeded Gaussian mixture of
unit vectors with an embedding-like spectrum), then for each measures queries per second of
  * faiss:      one FAISS index holding every vector, searched in this process (all cores),
  * sharded:    the shards searched in this process with the service's code (`search_topk`, whose
                distances do not depend on the batch, + exact merge), i.e. the service minus Ray,
  * service:    `ShardedIndex` over `--shards` IndexShard actors on a local Ray (num_cpus=2),
for a batch of `--queries` (best and median of `--reps`), plus the latency of an 8-query batch
("8q paired": the median over rounds of service ÷ FAISS latency; target ≤ 2).
The ratio service/faiss is the price of serving the index from actors: of the best repetitions,
of the medians, and "paired" = the median over rounds of the ratio within one round (the
contenders run back to back, so a round's ratio sees one load; the steadiest of the three on a
shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ratray.eval.metrics import recall_at_k  # noqa: E402
from ratray.index.build import build_index  # noqa: E402
from ratray.index.search import search_shards  # noqa: E402
from ratray.index.store import load_manifest, load_shard  # noqa: E402

import faiss  # noqa: E402  (after ratray: OMP_WAIT_POLICY is set before libgomp loads)
import numpy as np  # noqa: E402


def synthetic_embeddings(n: int, dim: int, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors: cluster centre + noise with an i^-1/2 spectrum (calibrated
    to be a little harder for IVF/PQ than real MiniLM chunk embeddings; see tests/test_index)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    scale = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    scale /= np.linalg.norm(scale)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 50_000):  # bounded temporaries
        m = min(n, s + 50_000) - s
        noise = rng.standard_normal((m, dim), np.float32) * scale  # (m, dim)
        x = centres[rng.integers(0, clusters, m)] + noise @ rot.T
        out[s: s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of each fn, round-robin (one warm-up call each first), so
    that load from other processes hits every contender alike."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def merged_index(index_dir: Path) -> tuple[faiss.Index, np.ndarray]:
    """All shards merged into one in-process FAISS index, and its row -> chunk id map."""
    m = load_manifest(index_dir)
    one, ids = load_shard(index_dir, 0, m, reconstruct=False)
    all_ids = [ids]
    for i in range(1, m.num_shards):
        other, ids = load_shard(index_dir, i, m, reconstruct=False)
        all_ids.append(ids)
        is_ivf = faiss.try_extract_index_ivf(one) is not None  # IVF stores row ids: offset them
        one.merge_from(other, one.ntotal if is_ivf else 0)
    return one, np.concatenate(all_ids)


def bench_one(name: str, factory: str, vectors, ids, queries, args, workdir: Path, ray) -> dict:
    from ratray.config import IndexConfig, ServiceConfig
    from ratray.index.service import ShardedIndex

    k, reps, nq = args.k, args.reps, len(queries)
    t = time.perf_counter()
    m = build_index(vectors, ids, workdir / name, IndexConfig(factory=factory, shards=args.shards),
                    embedding_model="synthetic")
    build_s = time.perf_counter() - t
    print(f"[{name}] built {m.factory} (requested {m.factory_requested}) in {build_s:.1f} s, "
          f"nprobe={m.nprobe}", flush=True)

    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))  # every core this process may use
    one, one_ids = merged_index(workdir / name)
    shards = [load_shard(workdir / name, i, m) for i in range(m.num_shards)]
    small = queries[:8]
    res: dict = {"factory": m.factory, "factory_requested": m.factory_requested, "nprobe": m.nprobe,
                 "build_s": round(build_s, 2), "shards": m.num_shards,
                 "shard_split": m.extra.get("shard_split")}
    svc = ShardedIndex.launch(str(workdir / name), ServiceConfig(name=f"bench-{name}",
                                                                 namespace="ratray-bench"))
    try:
        _, P_one = one.search(queries, k)
        _, I_sh = search_shards(shards, queries, k, m.metric)
        got = svc.search(queries, k)
        big = {"faiss": lambda: one.search(queries, k),
               "sharded": lambda: search_shards(shards, queries, k, m.metric),
               "service": lambda: svc.search(queries, k)}
        few = {"faiss_8": lambda: one.search(small, k),
               "sharded_8": lambda: search_shards(shards, small, k, m.metric),
               "service_8": lambda: svc.search(small, k)}
        res.update(timed_interleaved(big, reps))
        # each actor's own time per batch (its search_topk, no Ray): the gap to the service's
        # time is Ray + merge, the gap between the shards is uneven work
        res["actor_batch_ms"] = [1e3 * inf["search_s"] / max(1, inf["searches"])
                                 for inf in svc.info()]
        res.update(timed_interleaved(few, 5 * reps))
        res["actor_cpus_free"] = ray.available_resources().get("CPU", 0.0)
    finally:
        svc.shutdown()
    res["service_equals_sharded"] = bool(np.array_equal(got.ids, I_sh))
    res["service_ids_vs_faiss"] = float((got.ids == one_ids[P_one]).mean())  # near-ties may differ
    res["_ids"] = got.ids
    for key in ("faiss", "sharded", "service"):
        ts = res[key]
        res[f"{key}_qps_best"] = nq / min(ts)
        res[f"{key}_qps_median"] = nq / statistics.median(ts)
        res[f"{key}_8_ms_median"] = 1e3 * statistics.median(res[f"{key}_8"])
    res["service_batch_ms_mean"] = 1e3 * statistics.mean(res["service"])
    res["ratio_best"] = res["service_qps_best"] / res["faiss_qps_best"]
    res["ratio_median"] = res["service_qps_median"] / res["faiss_qps_median"]
    # each round times the contenders back to back: the ratio within a round sees the same load
    res["ratio_paired"] = statistics.median(f / s for f, s in zip(res["faiss"], res["service"]))
    res["latency_8_paired"] = statistics.median(s / f for f, s in zip(res["faiss_8"], res["service_8"]))
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pq-factory", default=None, help="default IVF1024,PQ{dim/2} (clamped to n)")
    ap.add_argument("--quick", action="store_true", help="n=20000, 256 queries, 3 reps")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.reps = 20_000, 256, 3
    pq_factory = args.pq_factory or f"IVF1024,PQ{args.dim // 2}"

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    x = synthetic_embeddings(args.n + args.queries, args.dim)
    vectors, queries = x[: args.n], x[args.n:]
    ids = np.arange(args.n, dtype=np.int64)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict = {"n": args.n, "dim": args.dim, "shards": args.shards, "queries": args.queries,
                     "k": args.k, "reps": args.reps, "cpus": os.cpu_count()}
    try:
        with tempfile.TemporaryDirectory(prefix="ratray-bench-") as tmp:
            for name, factory in (("flat", "Flat"), ("ivfpq", pq_factory)):
                results[name] = bench_one(name, factory, vectors, ids, queries, args, Path(tmp),
                                          ray)
    finally:
        ray.shutdown()
    truth = results["flat"].pop("_ids")
    results["ivfpq"]["recall_at_k"] = recall_at_k(results["ivfpq"].pop("_ids"), truth)

    print(f"\nn={args.n} dim={args.dim} shards={args.shards} batch={args.queries} k={args.k} "
          f"reps={args.reps} cpus={os.cpu_count()}")
    head = (f"{'index':<18}{'faiss QPS':>12}{'sharded QPS':>13}{'service QPS':>13}"
            f"{'svc/faiss':>11}{'8q faiss ms':>13}{'8q svc ms':>11}{'paired':>8}{'8q paired':>11}")
    print(head + "\n" + "-" * len(head))
    for name in ("flat", "ivfpq"):
        r = results[name]
        for stat in ("best", "median"):
            label = f"{r['factory']} {stat}" if stat == "best" else f"  {stat}"
            lat = (f"{r['faiss_8_ms_median']:>13.2f}{r['service_8_ms_median']:>11.2f}"
                   f"{r['ratio_paired']:>8.2f}{r['latency_8_paired']:>11.2f}" if stat == "median" else "")
            print(f"{label:<18}{r[f'faiss_qps_{stat}']:>12.0f}{r[f'sharded_qps_{stat}']:>13.0f}"
                  f"{r[f'service_qps_{stat}']:>13.0f}{r[f'ratio_{stat}']:>11.2f}{lat}")
    r = results["ivfpq"]
    print(f"\n{r['factory']} (nprobe {r['nprobe']}): recall@{args.k} vs exact = "
          f"{r['recall_at_k']:.3f}")
    for name in ("flat", "ivfpq"):
        r = results[name]
        print(f"{r['factory']} ({r['shard_split']} shards): service == in-process shards: "
              f"{r['service_equals_sharded']}; "
              f"ids equal to one FAISS index: {100 * r['service_ids_vs_faiss']:.2f}%; "
              f"CPUs left free by actors: {r['actor_cpus_free']:g}")
        print(f"  per {args.queries}-query batch: actors search "
              f"{' / '.join(f'{t:.0f}' for t in r['actor_batch_ms'])} ms each, "
              f"service call {r['service_batch_ms_mean']:.0f} ms (mean)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
        print(f"results written to {args.out}")
    return results


if __name__ == "__main__":
    main()
