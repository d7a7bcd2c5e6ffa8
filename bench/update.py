"""Live update throughput: documents added to a serving index (running shard actors, searches in
flight), side by side with rebuilding the same shards from scratch.

    python bench/update.py --workdir WORK [--docs 20] [--rounds 2]

WORK: a built workdir (jobs/build_index.py; `make demo`'s `work`), copied to a temporary folder
first (the original is never changed). New documents: stdlib source files the chunk store does not
hold (real text the encoder has not seen). Per round, in one copy, with the copy's shard actors
running and a thread searching throughout:
  add     N new documents (embedded: the encoder's cost included)
  re-add  the same N documents again (every vector from the content-keyed cache: the index side
          alone: tombstones, FAISS remove + add, version write, swap)
  rebuild build_index over the database's vectors (from the cache): what an update avoids
Printed per round: chunks, chunks/s and seconds for add and re-add, swap seconds, rebuild seconds,
rebuild ÷ re-add, and the searches served during the swaps (failures must be 0).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def new_documents(store, n: int, out: Path, skip: set[str]) -> list[str]:
    """Copy n stdlib modules the store does not hold into `out` (same relative ids)."""
    from ratray.data.corpus import default_corpus_path

    root, held, picked = default_corpus_path(), store.documents(), []
    largest = min(20_000, store.meta["settings"]["corpus"]["max_doc_bytes"])  # the store's limit
    for p in sorted(root.glob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel in held or rel in skip or not 2_000 < p.stat().st_size < largest:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, out / rel)
        picked.append(rel)
        if len(picked) == n:
            break
    return picked


def one_round(src: Path, n_docs: int, used: set[str]) -> dict:
    import ray  # noqa: F401

    from ratray.config import IndexConfig, ServiceConfig
    from ratray.data.store import ChunkStore
    from ratray.index.build import build_index
    from ratray.index.embed import embed_with_cache
    from ratray.index.service import ShardedIndex
    from ratray.index.store import load_manifest, serving_dir
    from ratray.index.update import UpdateJobConfig, update_index
    from ratray.workdir import Workdir

    tmp = Path(tempfile.mkdtemp(prefix="bench-update-"))
    try:
        wd = Workdir(shutil.copytree(src, tmp / "wd"))
        m = load_manifest(serving_dir(wd.index))
        store = ChunkStore.open(wd.chunk_store(m.chunk_store))
        (tmp / "add").mkdir()
        docs = new_documents(store, n_docs, tmp / "add", used)
        used.update(docs)
        svc = ServiceConfig(name=f"bench-update-{time.time_ns()}", namespace="ratray-bench")
        client = ShardedIndex.launch(str(wd.index), svc)
        cfg = UpdateJobConfig(workdir=str(wd.root), service=svc)
        q = np.random.default_rng(0).normal(size=(4, m.dim)).astype(np.float32)
        stop, served, failed = threading.Event(), [0], [0]

        def searcher():
            while not stop.is_set():
                try:
                    client.search(q, 5)
                    served[0] += 1
                except Exception:  # noqa: BLE001 — counted, must stay 0
                    failed[0] += 1

        t = threading.Thread(target=searcher, daemon=True)
        t.start()
        try:
            add = update_index(wd.root, add=tmp / "add", service_name=svc.name, cfg=cfg)
            readd = update_index(wd.root, add=tmp / "add", service_name=svc.name, cfg=cfg)
        finally:
            stop.set()
            t.join()
            client.shutdown()
        ids = ChunkStore.open(store.path).database_ids()
        vecs, _ = embed_with_cache(store.texts(ids), cfg.embed, wd.embeddings, progress=False,
                                   use_ray=False)
        t0 = time.perf_counter()
        build_index(vecs, ids, tmp / "rebuild", IndexConfig(factory=m.factory_requested,
                                                             shards=m.num_shards),
                    embedding_model=m.embedding_model)
        rebuild_s = time.perf_counter() - t0
        return {"docs": len(docs), "chunks": add["store"]["chunks_added"], "db": len(ids),
                "factory": m.factory, "add_s": add["timings"]["total_s"],
                "add_cps": add["chunks_per_s"], "readd_s": readd["timings"]["total_s"],
                "readd_cps": readd["chunks_per_s"],
                "swap_s": [add["timings"]["swap_s"], readd["timings"]["swap_s"]],
                "rebuild_s": round(rebuild_s, 3), "served": served[0], "failed": failed[0],
                "retrain": add["drift"]["retrain"], "drift": add["drift"].get("max_ratio")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a built workdir (copied, never changed)")
    p.add_argument("--docs", type=int, default=20, help="new documents added per round")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, namespace="ratray-bench")
    used: set[str] = set()
    rows = [one_round(Path(a.workdir).resolve(), a.docs, used) for _ in range(a.rounds)]
    r0 = rows[0]
    print(f"index: {r0['factory']}, {r0['db']:,} database chunks after the update")
    print("round  docs chunks | add s  chunks/s | re-add s chunks/s | swap s (add, re-add) | "
          "rebuild s  rebuild/re-add | searches served/failed during | drift ratio retrain")
    for i, r in enumerate(rows):
        print(f"{i:5d} {r['docs']:5d} {r['chunks']:6d} | {r['add_s']:5.2f} {r['add_cps']:9.1f} | "
              f"{r['readd_s']:8.2f} {r['readd_cps']:8.1f} | {r['swap_s'][0]:.3f}, {r['swap_s'][1]:.3f}"
              f"         | {r['rebuild_s']:9.2f} {r['rebuild_s'] / r['readd_s']:14.2f} | "
              f"{r['served']:6d} / {r['failed']}                  | {r['drift']} {r['retrain']}")
    print(f"median: add {statistics.median(r['add_cps'] for r in rows):.1f} chunks/s, re-add "
          f"{statistics.median(r['readd_cps'] for r in rows):.1f} chunks/s, swap "
          f"{statistics.median(s for r in rows for s in r['swap_s']):.3f} s, rebuild ÷ re-add "
          f"{statistics.median(r['rebuild_s'] / r['readd_s'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
