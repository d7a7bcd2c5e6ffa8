"""The build pipeline: corpus → chunk store → embeddings → sharded index → recall and overlap
through the shard actors → summary.

Each stage is reused when its inputs are unchanged: the chunk store by a content hash of corpus and
settings, embeddings by a per-chunk content key, the index by its manifest (chunk store key, factory,
shards, metric, model, training sample size and seed). Search-time settings (`index.nprobe`,
`index.ef_search`) never force a rebuild: a reused index takes the configured values into its
manifest. The database is the train and db splits (validation documents are held out). Nothing
started here outlives the call: the shard actors used to measure recall and overlap through the real
service are shut down before returning.
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
from ratray.data.chunks import build_chunk_store
from ratray.data.clean import clean_summary, format_clean
from ratray.data.store import ChunkStore
from ratray.eval.metrics import recall_at_k
from ratray.eval.overlap import overlap_ratios
from ratray.index.build import build_index, build_settings
from ratray.index.embed import embed_with_cache
from ratray.index.keyword import build_keyword_shards, has_keyword, manifest_entry
from ratray.index.search import exact_search
from ratray.index.service import ShardedIndex
from ratray.index.store import (Manifest, check_embedding_model, load_manifest, serving_dir,
                                write_manifest)
from ratray.pretrained import model_id
from ratray.workdir import Workdir

log = logging.getLogger(__name__)

RECALL_K = 10


def _index_is_current(path: Path, cfg: BuildConfig, store: ChunkStore, model: str) -> Manifest | None:
    """The existing index, if it was built from this chunk store with these build-time settings."""
    path = serving_dir(path)  # after live updates: the version serving now
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


def measure_recall(client, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, metric: str,
                   k: int = RECALL_K) -> dict:
    """ANN recall@k of the sharded actor service against exact search over the same vectors."""
    k = min(k, len(ids))
    t0 = time.perf_counter()
    _, exact_pos = exact_search(vectors, queries, k, metric)
    t1 = time.perf_counter()
    res = client.search(queries, k)
    search_s = time.perf_counter() - t1
    recall = recall_at_k(res.ids, ids[exact_pos])
    return {"k": k, "queries": int(len(queries)), f"recall@{k}": round(recall, 4),
            "service_search_s": round(search_s, 4), "seconds": round(time.perf_counter() - t0, 3)}


def measure_overlap(client, store: ChunkStore, all_vectors: np.ndarray, k: int) -> dict:
    """How much of the held-out text the database holds, as RETRO reads it: for every validation
    chunk with a predecessor in its document, r(C) = its longest common run with the [N, F] of the
    k neighbours retrieved for that predecessor, ÷ its length (ratray/eval/overlap.py)."""
    val = store.split_ids("val")
    chunks = val[store.column("pos")[val] > 0]  # chunk ids are dense, a document's consecutive
    if len(chunks) == 0:
        return {"k": k, "chunks": 0}
    res = client.search(all_vectors[chunks - 1], min(k, client.ntotal))  # (val documents are not in it)
    pad = store.tokenizer.pad_id
    r = overlap_ratios(store.tokens(chunks), store.n_tokens(chunks), pad,
                       store.with_continuation(res.ids), pad)
    return {"k": k, "chunks": int(len(chunks)), "mean_r": round(float(r.mean()), 4),
            **{f"share_r_ge_{a:g}": round(float((r >= a).mean()), 4) for a in (0.125, 0.5, 1.0)}}


def build(cfg: BuildConfig, progress: bool = True) -> dict:
    """Run the whole build; returns the summary (also written to `<workdir>/index/summary.json`).

    Holds the workdir's lock throughout: a second build into the same workdir fails at once
    (WorkdirBusyError, naming the holder) instead of racing this one. Before any work: what killed
    builds left is removed, and a workdir whose index another embedding model built is refused."""
    wd = Workdir(cfg.workdir)
    with wd.locked("build"):
        removed = wd.remove_leftovers()
        if removed:
            log.warning("removed leftovers of interrupted builds: %s", ", ".join(removed))
        check_embedding_model(wd.index, model_id(cfg.embed.model), rebuild_ok=True)
        return _build(cfg, wd, progress)


def _build(cfg: BuildConfig, wd: Workdir, progress: bool) -> dict:
    import ray

    t_all = time.perf_counter()
    if not ray.is_initialized():
        ray.init(namespace=cfg.service.namespace, log_to_driver=False)
    timings: dict[str, float] = {}

    # corpus → chunks
    t = time.perf_counter()
    store = build_chunk_store(cfg.corpus, cfg.chunks, wd.chunks, progress=progress)
    timings["chunk_store_s"] = time.perf_counter() - t
    db_ids = store.database_ids()  # train + db chunks: validation documents are held out
    val_ids = store.split_ids("val")

    # chunks → embeddings: every chunk in one pass (one actor pool); the index holds the database
    # (validation documents are held out), the validation chunks are the queries of the checks
    t = time.perf_counter()
    all_vectors, estats = embed_with_cache(store.texts(np.arange(len(store))), cfg.embed,
                                           wd.embeddings, progress=progress)
    vectors = all_vectors[db_ids]
    timings["embed_s"] = time.perf_counter() - t

    # embeddings → index shards
    t = time.perf_counter()
    path = wd.index
    model = model_id(cfg.embed.model)
    manifest = _index_is_current(path, cfg, store, model)
    index_reused = manifest is not None
    search_updated = apply_search_settings(serving_dir(path), manifest, cfg.index) if index_reused else []
    if manifest is None:
        manifest = build_index(vectors, db_ids.astype(np.int64), path, cfg.index,
                               embedding_model=model, chunk_store=store.key)
    timings["index_build_s"] = time.perf_counter() - t
    # BM25 shards beside the dense ones, same chunk ids per shard: always (seconds, next to the
    # embedding's minutes), so any job can turn index.hybrid on without a rebuild
    keyword = "reused"
    kpath = serving_dir(path)  # a reused index after live updates: its serving version
    if not has_keyword(kpath, manifest):
        t = time.perf_counter()
        keyword = build_keyword_shards(kpath, store.texts, manifest)
        manifest.extra["keyword"] = manifest_entry()
        write_manifest(kpath, manifest)  # last: the manifest names complete keyword files
        timings["keyword_s"] = time.perf_counter() - t

    # through the real shard actors: recall@10 against exact search on held-out (validation)
    # chunks, and how much of the validation text the database holds (RETRO's r(C))
    t = time.perf_counter()
    rng = np.random.default_rng(cfg.index.seed)
    pool = val_ids if len(val_ids) else db_ids
    q_ids = np.sort(rng.choice(pool, size=min(cfg.index.recall_queries, len(pool)), replace=False))
    queries = all_vectors[q_ids]
    svc = ServiceConfig(**{**to_dict(cfg.service), "name": f"build-{os.getpid()}-{time.time_ns()}"})
    client = ShardedIndex.launch(str(path), svc)
    try:
        recall = measure_recall(client, vectors, db_ids.astype(np.int64), queries, cfg.index.metric)
        recall["query_split"] = "val" if len(val_ids) else "train"
        timings["recall_s"] = time.perf_counter() - t
        t = time.perf_counter()
        overlap = measure_overlap(client, store, all_vectors, getattr(getattr(cfg, "model", None), "k", 2))
        timings["overlap_s"] = time.perf_counter() - t
    finally:
        client.shutdown()
    timings["total_s"] = time.perf_counter() - t_all

    meta = store.meta
    summary = {
        "workdir": str(wd.root),
        "chunk_store": {"path": str(store.path), "key": store.key, "reused": store.reused},
        "counts": {**meta.get("counts", {}), "index_vectors": int(manifest.ntotal)},
        "skipped": meta.get("skips", {}),
        "clean": clean_summary(meta.get("clean")),  # PII by type, duplicates, contaminated val ids
        "embeddings": estats.as_dict(),
        "index": {"path": str(path), "reused": index_reused, "search_settings_updated": search_updated,
                  "factory": manifest.factory,
                  "factory_requested": manifest.factory_requested, "metric": manifest.metric,
                  "dim": manifest.dim, "shards": len(manifest.shards), "nprobe": manifest.nprobe,
                  "ef_search": manifest.ef_search, "version": manifest.version, "keyword": keyword},
        "recall": recall,
        "overlap": overlap,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "config": flatten(to_dict(cfg)),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    wd.index_summary.write_text(json.dumps(summary, indent=2, default=str))
    log.info("build summary written to %s", wd.index_summary)
    return summary


def format_build(s: dict) -> str:
    """A build summary (summary.json) as the few lines a person reads."""
    c, sk, ix, e, r = s["counts"], s["skipped"], s["index"], s["embeddings"], s["recall"]
    ch, docs = c["chunks"], c["documents"]
    splits = " · ".join(f"{k} {ch[k]:,}" for k in ("train", "val", "db") if k in ch)
    skipped = ", ".join(f"{k} {v}" for k, v in sk["counts"].items())
    lines = [f"chunk store: {docs['total']:,} documents → {ch['total']:,} chunks ({splits})"
             + (f"; {sk['total']} documents skipped ({skipped})" if sk["total"] else "")
             + (f"; reading stopped at corpus.{sk['capped']}" if sk.get("capped") else ""),
             *([format_clean(s["clean"])] if s.get("clean") else []),
             f"embeddings: {e['embedded']:,} embedded ({e['chunks_per_s']} chunks/s), {e['cached']:,} "
             f"from the cache",
             f"database: {c['index_vectors']:,} chunks (train + db) in {ix['shards']} {ix['factory']} "
             f"shards, index v{ix['version']} ({'reused' if ix['reused'] else 'built'}); "
             f"recall@{r['k']} {r['recall@' + str(r['k'])]:.3f} against exact search on {r['queries']} "
             f"validation queries"]
    kw = ix.get("keyword")
    if isinstance(kw, dict):
        lines.append(f"BM25 shards: {kw['docs']:,} chunks, {kw['postings']:,} postings (built)")
    elif kw:
        lines.append("BM25 shards: reused")
    o = s.get("overlap")
    if o:
        lines.append(f"overlap: {o['share_r_ge_0.5']:.1%} of {o['chunks']:,} validation chunks share a run "
                     f"of ≥ half their tokens with the k={o['k']} neighbours of their predecessor "
                     f"(mean r(C) {o['mean_r']:.2f})")
    lines.append(f"time: {s['timings']['total_s']:.0f} s; summary: {ix['path']}/summary.json")
    return "\n".join(lines)
