"""The REALM index refresh: its wall time vs its parts measured alone, and search under a refresh.

    python bench/refresh.py [--max-bytes 150000] [--chunk-tokens 64] [--layers 6] [--out r.json]

One run, on a wordpiece chunk store of stdlib source and REALM's doc tower (the pretrained encoder):
1. re-embed time alone (the service's parallel embedding tasks) and build time alone (FAISS shards);
2. a whole refresh through the RefreshService actor (embed + build + two-phase hot swap into the
   running shard actors), nothing else running: ratio refresh ÷ (embed + build), target ≤ 1.1;
3. search throughput of the shard actors (batch of query embeddings, k = 8) with no refresh, then
   while a second refresh runs, then with none again: ratio during ÷ without (the refresh's
   embedding competes with the searches for the same cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def search_load(index, queries: np.ndarray, k: int, stop: threading.Event, out: list) -> None:
    """Search until `stop`; appends (seconds, queries answered, versions seen)."""
    n, versions, t0 = 0, set(), time.perf_counter()
    while not stop.is_set():
        r = index.search(queries, k)
        n += len(queries)
        versions.add(r.version)
    out.append((time.perf_counter() - t0, n, sorted(versions)))


def qps_for(index, queries, k, seconds: float) -> float:
    stop, out = threading.Event(), []
    th = threading.Thread(target=search_load, args=(index, queries, k, stop, out))
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    return out[0][1] / out[0][0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--max-bytes", type=int, default=150_000, help="stdlib source read (corpus.max_bytes)")
    p.add_argument("--chunk-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=6, help="doc tower layers (of the pretrained 6)")
    p.add_argument("--workers", type=int, default=2, help="embedding tasks in flight")
    p.add_argument("--factory", default="Flat")
    p.add_argument("--batch", type=int, default=64, help="queries per search call")
    p.add_argument("--seconds", type=float, default=8.0, help="search-load window without refresh")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()

    import ray
    import torch

    from ratray.config import IndexConfig, RefreshConfig, ServiceConfig, load_config
    from ratray.index.build import build_index
    from ratray.index.refresh import embed_corpus, launch_refresh_service, put_weights
    from ratray.index.service import ShardedIndex
    from ratray.realm.config import RealmJobConfig
    from ratray.realm.driver import DocTowerEmbedder, resolve
    from ratray.realm.model import Realm

    workdir = a.workdir or tempfile.mkdtemp(prefix="ratray-bench-refresh-")
    ray.init(num_cpus=os.cpu_count(), namespace="ratray-bench", log_to_driver=False)
    job = load_config(RealmJobConfig, None, [
        f"workdir={workdir}", f"corpus.max_bytes={a.max_bytes}", "chunks.tokenizer=wordpiece",
        f"chunks.chunk_tokens={a.chunk_tokens}", "index.metric=ip", f"index.factory={a.factory}",
        "index.shards=2", f"model.retriever_layers={a.layers}", "model.reader_layers=1",
        "model.query_tokens=32", "train.num_workers=1"])
    prep = resolve(job)
    store = prep.store
    model = Realm.from_pretrained(prep.model, prep.weights)
    w0 = model.doc_state_dict()
    g = torch.Generator().manual_seed(0)
    w1 = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v
          for k, v in w0.items()}  # "newer" weights: the index must change
    rcfg = RefreshConfig(num_workers=a.workers, threads=max(1, (os.cpu_count() or 2) // a.workers))
    icfg = IndexConfig(factory=a.factory, metric="ip", shards=2)
    svc = ServiceConfig(name="bench-refresh", namespace="ratray-bench")
    embedder = DocTowerEmbedder(dataclasses.asdict(prep.model))
    print(f"corpus: {len(store)} blocks of <= {a.chunk_tokens} wordpieces; doc tower {a.layers} layers; "
          f"{a.workers} embedding tasks x {rcfg.threads} threads", flush=True)

    service = launch_refresh_service(os.path.join(workdir, "bench-index"), store, icfg, svc, rcfg, embedder)
    ray.get(service.initial.remote(put_weights(w0), 0))
    index = ShardedIndex.launch(os.path.join(workdir, "bench-index"), svc)

    # 1. the parts alone (same tasks, same builder)
    t0 = time.perf_counter()
    ids, vecs = embed_corpus(embedder, put_weights(w1), store, rcfg, progress=True)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_index(vecs, ids, os.path.join(workdir, "alone-build"), icfg, "bench", version=99)
    build_s = time.perf_counter() - t0

    # 2. a whole refresh through the service (embed + build + hot swap), nothing else running
    rec = ray.get(service.refresh_now.remote(put_weights(w1), 1, False))

    # 3. search load without, during and after another refresh
    w2 = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v
          for k, v in w0.items()}
    with torch.no_grad():
        q_ids = torch.from_numpy(store.tokens(ids[: a.batch], pad_to=a.chunk_tokens)[:, :32].astype(np.int64))
        queries = model.embed_queries(q_ids).numpy()
    before = qps_for(index, queries, 8, a.seconds)
    stop, out = threading.Event(), []
    th = threading.Thread(target=search_load, args=(index, queries, 8, stop, out))
    th.start()
    rec_loaded = ray.get(service.refresh_now.remote(put_weights(w2), 2, False))
    stop.set()
    th.join()
    during = out[0][1] / out[0][0]
    after = qps_for(index, queries, 8, a.seconds)
    baseline = (before + after) / 2
    res = {
        "blocks": len(store), "chunk_tokens": a.chunk_tokens, "doc_tower_layers": a.layers,
        "embed_alone_s": round(embed_s, 2), "build_alone_s": round(build_s, 3),
        "refresh_total_s": rec["total_s"], "refresh_embed_s": rec["embed_s"],
        "refresh_build_s": rec["build_s"], "refresh_swap_s": rec["swap_s"],
        "refresh_ratio": round(rec["total_s"] / (embed_s + build_s), 3),
        "reembed_blocks_per_s": round(len(store) / embed_s, 1),
        "search_qps_without": round(baseline, 1), "search_qps_during": round(during, 1),
        "search_ratio_during": round(during / baseline, 3),
        "versions_seen_during": out[0][2], "search_batch": a.batch,
        "refresh_under_search_load_s": rec_loaded["total_s"],
    }
    index.shutdown()
    ray.kill(service)
    print(f"\nre-embed alone {embed_s:.1f} s ({res['reembed_blocks_per_s']} blocks/s), build alone "
          f"{build_s:.2f} s")
    print(f"refresh through the service: {rec['total_s']:.1f} s (embed {rec['embed_s']:.1f}, build "
          f"{rec['build_s']:.2f}, swap {rec['swap_s']:.2f})")
    print(f"refresh / (embed + build) = {res['refresh_ratio']:.3f}   (target <= 1.1)")
    print(f"a refresh under search load took {rec_loaded['total_s']:.1f} s")
    print(f"search QPS (batch {a.batch}, k 8): without refresh {baseline:.0f} (before {before:.0f}, after "
          f"{after:.0f}), during {during:.0f}  -> during / without = {res['search_ratio_during']:.3f}; "
          f"versions served during the refresh: {out[0][2]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
