"""The build pipeline: corpus → chunk store → embeddings → sharded index → recall check → summary.

Each stage is reused when its inputs are unchanged: the chunk store by a content hash of corpus and
settings, embeddings by a per-chunk content key, the index by its manifest (chunk store key, factory,
shards, metric, model, training sample size and seed). Search-time settings (`index.nprobe`,
`index.ef_search`) never force a rebuild: a reused index takes the configured values into its
manifest. Nothing started here outlives the call: the shard actors used to measure recall through
the real service are shut down before returning.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from ratray.config import BuildConfig, IndexConfig, ServiceConfig, flatten, to_dict
from ratray.data.chunks import ChunkStore, build_chunk_store
from ratray.eval.metrics import recall_at_k
from ratray.index.build import build_index, build_settings
from ratray.index.embed import embed_with_cache
from ratray.index.search import exact_search
from ratray.index.store import Manifest, load_manifest, write_manifest
from ratray.pretrained import model_id
from ratray.workdir import Workdir

log = logging.getLogger(__name__)

RECALL_K = 10


def _index_is_current(path: Path, cfg: BuildConfig, store: ChunkStore, model: str) -> Manifest | None:
    """The existing index, if it was built from this chunk store with these build-time settings."""
    try:
        m = load_manifest(path)
    except Exception:  # missing or unreadable: rebuild
        return None
    want = dict(chunk_store=store.key, factory_requested=cfg.index.factory, metric=cfg.index.metric,
                embedding_model=model, n_shards=cfg.index.shards, build=build_settings(cfg.index))
    have = dict(chunk_store=m.chunk_store, factory_requested=m.factory_requested, metric=m.metric,
                embedding_model=m.embedding_model, n_shards=len(m.shards),
                build=m.extra.get("build_settings"))
    have_files = all((path / s["file"]).is_file() and (path / s["ids"]).is_file() for s in m.shards)
    return m if want == have and have_files else None


def apply_search_settings(path: Path, m: Manifest, cfg: IndexConfig) -> list[str]:
    """Give a reused index the configured search-time settings (written to its manifest, which
    every shard reads when it loads). nprobe 0 keeps the nprobe tuned at build time.
    Returns the names of the settings that changed."""
    changed = []
    nlist = int(m.extra.get("nlist", 0))
    if nlist and cfg.nprobe > 0 and min(cfg.nprobe, nlist) != m.nprobe:
        m.nprobe = min(cfg.nprobe, nlist)
        changed.append("nprobe")
    if cfg.ef_search != m.ef_search:
        m.ef_search = int(cfg.ef_search)
        changed.append("ef_search")
    if changed:
        write_manifest(path, m)
    return changed


def measure_recall(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, path: Path,
                   cfg: BuildConfig, k: int = RECALL_K) -> dict:
    """ANN recall@k of the sharded actor service against exact search over the same vectors."""
    from ratray.index.service import ShardedIndex

    k = min(k, len(ids))
    t0 = time.perf_counter()
    _, exact_pos = exact_search(vectors, queries, k, cfg.index.metric)
    exact_ids = ids[exact_pos]
    svc_cfg = ServiceConfig(**{**to_dict(cfg.service), "name": f"build-{os.getpid()}-{time.time_ns()}"})
    client = ShardedIndex.launch(str(path), svc_cfg)
    try:
        t1 = time.perf_counter()
        res = client.search(queries, k)
        search_s = time.perf_counter() - t1
    finally:
        client.shutdown()
    return {"k": k, "queries": int(len(queries)), f"recall@{k}": round(recall_at_k(res.ids, exact_ids), 4),
            "service_search_s": round(search_s, 4), "seconds": round(time.perf_counter() - t0, 3)}


def build(cfg: BuildConfig, progress: bool = True) -> dict:
    """Run the whole build; returns the summary (also written to `<workdir>/index/summary.json`)."""
    import ray

    t_all = time.perf_counter()
    wd = Workdir(cfg.workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(namespace=cfg.service.namespace, log_to_driver=False)
    timings: dict[str, float] = {}

    # corpus → chunks
    t = time.perf_counter()
    store = build_chunk_store(cfg.corpus, cfg.chunks, wd.chunks, progress=progress)
    timings["chunk_store_s"] = time.perf_counter() - t
    train_ids = store.split_ids("train")
    val_ids = store.split_ids("val")

    # chunks → embeddings (database = train chunks only; validation documents are held out)
    t = time.perf_counter()
    vectors, estats = embed_with_cache(store.texts(train_ids), cfg.embed, wd.embeddings,
                                       progress=progress)
    timings["embed_s"] = time.perf_counter() - t

    # embeddings → index shards
    t = time.perf_counter()
    path = wd.index
    model = model_id(cfg.embed.model)
    manifest = _index_is_current(path, cfg, store, model)
    index_reused = manifest is not None
    search_updated = apply_search_settings(path, manifest, cfg.index) if index_reused else []
    if manifest is None:
        manifest = build_index(vectors, train_ids.astype(np.int64), path, cfg.index,
                               embedding_model=model, chunk_store=store.key)
    timings["index_build_s"] = time.perf_counter() - t

    # recall@10 of the served index against exact search, on held-out (validation) chunks
    t = time.perf_counter()
    rng = np.random.default_rng(cfg.index.seed)
    pool = val_ids if len(val_ids) else train_ids
    q_ids = np.sort(rng.choice(pool, size=min(cfg.index.recall_queries, len(pool)), replace=False))
    queries, _ = embed_with_cache(store.texts(q_ids), cfg.embed, wd.embeddings, progress=False)
    recall = measure_recall(vectors, train_ids.astype(np.int64), queries, path, cfg)
    recall["query_split"] = "val" if len(val_ids) else "train"
    timings["recall_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    meta = store.meta
    summary = {
        "workdir": str(wd.root),
        "chunk_store": {"path": str(store.path), "key": store.key, "reused": store.reused},
        "counts": {**meta.get("counts", {}), "index_vectors": int(manifest.ntotal)},
        "skipped": meta.get("skips", {}),
        "embeddings": estats.as_dict(),
        "index": {"path": str(path), "reused": index_reused, "search_settings_updated": search_updated,
                  "factory": manifest.factory,
                  "factory_requested": manifest.factory_requested, "metric": manifest.metric,
                  "dim": manifest.dim, "shards": len(manifest.shards), "nprobe": manifest.nprobe,
                  "ef_search": manifest.ef_search, "version": manifest.version},
        "recall": recall,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "config": flatten(to_dict(cfg)),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    wd.index_summary.write_text(json.dumps(summary, indent=2, default=str))
    log.info("build summary written to %s", wd.index_summary)
    return summary
