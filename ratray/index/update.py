"""Live updates of the database index: add and remove documents, publish a new version, hot-swap.

    update_index(workdir, add=PATH, remove=[doc ids], service_name=...)   (under Workdir.locked)
      1. store    data/append.update_store: the store's readers + tokenizer + chunking; new chunks
                  appended (split "db"), removed/replaced documents tombstoned
      2. embed    only the new chunks (embed_with_cache: content-keyed, so a re-add is free)
      3. shards   the serving version's shards, copied: tombstoned rows removed (FAISS remove_ids,
                  rows renumbered so `shard_i.ids.npy` stays the row → chunk id map), new vectors
                  added with the trained IVF/PQ reused; a new vector goes to the shard that owns
                  its IVF list (as the build dealt them), else to the smallest shard
      4. drift    new vectors' mean squared distance to their IVF centroid and PQ reconstruction
                  error ÷ the same figures on a database sample: retrain advised past
                  `update.drift_threshold`
      5. publish  <index>/versions/v(N+1) (a plain index folder becomes a versioned root first: its
                  files hard-linked as versions/vN, CURRENT naming it, so running shards and
                  restarts see the same index); manifest.extra["updates"] lists every update's
                  added/removed counts; keyword shards (index/keyword.py) updated alongside
      6. swap     every running shard service of this index (`service_name`, or found by the
                  index folder its actors serve) → ShardedIndex.swap (prepare all, CURRENT, commit
                  all: searches never fail nor mix versions); none running: CURRENT rewritten

A running training or generation job keeps searching through it; its ChunkStore picks the new
chunks up when a search returns one (data/store.py). The index keeps its shard count, factory,
metric and nprobe; only a rebuild (jobs/build_index.py) retrains the quantizers.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from ratray.config import EmbedConfig, ServiceConfig, UpdateConfig
from ratray.data.append import restore_log, update_store
from ratray.data.store import ChunkStore
from ratray.index.build import ivf_lists
from ratray.index.embed import embed_with_cache
from ratray.index.factory import IndexBuildError, faiss_message, new_index
from ratray.index.store import (MANIFEST, Manifest, check_embedding_model, current_version,
                                is_versioned, load_manifest, load_shard, now_iso, remove_leftovers,
                                remove_version, serving_dir, version_dir, versions_on_disk,
                                write_current, write_index_dir, write_manifest)
from ratray.pretrained import model_id
from ratray.workdir import Workdir

log = logging.getLogger(__name__)

IN_PROCESS_MAX = 256  # up to this many new chunks are embedded in this process (a Ray Data pool
#                       takes longer to start than they take to embed)


@dataclass
class UpdateJobConfig:
    workdir: str = "work"  # holds the database index (<workdir>/index) and its chunk store
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # the model the index was built with
    service: ServiceConfig = field(default_factory=ServiceConfig)  # namespace of running shards
    update: UpdateConfig = field(default_factory=UpdateConfig)


# ---------------------------------------------------------------------------------------------
# shards: remove rows, add vectors


def remove_rows(index: faiss.Index, ids: np.ndarray, gone: np.ndarray, manifest: Manifest
                ) -> tuple[faiss.Index, np.ndarray, int]:
    """Drop the rows whose chunk id is in `gone` → (index, ids (n',), rows removed). Rows stay
    dense (0..n'-1 in `ids` order): FAISS compacts flat codes itself; IVF keeps the old row
    labels in its lists, renumbered here; an index without remove_ids (HNSW) is refilled from
    its reconstructed vectors."""
    drop = np.isin(ids, gone)
    if not drop.any():
        return index, ids, 0
    keep = ~drop
    rows = np.flatnonzero(drop).astype(np.int64)
    try:
        removed = int(index.remove_ids(rows))
    except RuntimeError:  # e.g. HNSW: rebuild the shard from its stored vectors
        fresh = new_index(manifest.factory, manifest.dim, manifest.metric)
        if not fresh.is_trained:
            raise IndexBuildError(f"{manifest.factory} shards cannot remove rows: rebuild the "
                                  f"index (jobs/build_index.py)") from None
        try:
            kept = index.reconstruct_batch(np.flatnonzero(keep).astype(np.int64))
        except RuntimeError as e:
            raise IndexBuildError(f"{manifest.factory} shards can neither remove nor reconstruct "
                                  f"rows ({faiss_message(e)}): rebuild the index") from None
        fresh.add(kept)
        return fresh, ids[keep], int(drop.sum())
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        new_row = np.cumsum(keep) - 1  # old row → new row (kept rows only)
        inv, seen = ivf.invlists, 0
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:
                labels = faiss.rev_swig_ptr(inv.get_ids(lst), size)  # the list's labels, in place
                labels[:] = new_row[labels]
                seen += size
        if seen != index.ntotal:
            raise IndexBuildError(f"remove: the IVF lists hold {seen} rows, the index {index.ntotal}")
    if removed != len(rows) or index.ntotal != int(keep.sum()):
        raise IndexBuildError(f"remove: {removed} of {len(rows)} rows removed, {index.ntotal} left")
    return index, ids[keep], removed


def route(shards: list[tuple[faiss.Index, np.ndarray]], vectors: np.ndarray, split: str
          ) -> list[np.ndarray]:
    """Which new vectors go to which shard (row indices per shard). "ivf_lists" shards: a vector
    goes to the shard holding its IVF list (a list no shard holds yet: to the smallest shard, which
    then owns it); "rows": all to the smallest shard."""
    sizes = np.array([ix.ntotal for ix, _ in shards], np.int64)
    lists = ivf_lists(shards[0][0], vectors) if split == "ivf_lists" else None
    if lists is None:
        out = [np.zeros(0, np.int64) for _ in shards]
        out[int(np.argmin(sizes))] = np.arange(len(vectors))
        return out
    owner = np.full(faiss.try_extract_index_ivf(shards[0][0]).nlist, -1, np.int64)
    for s, (ix, _) in enumerate(shards):
        inv = faiss.try_extract_index_ivf(ix).invlists
        held = np.array([inv.list_size(i) for i in range(inv.nlist)]) > 0
        owner[held & (owner < 0)] = s
    for lst in np.unique(lists[owner[lists] < 0]):
        s = int(np.argmin(sizes))
        owner[lst], sizes[s] = s, sizes[s] + int((lists == lst).sum())
    return [np.flatnonzero(owner[lists] == s) for s in range(len(shards))]


# ---------------------------------------------------------------------------------------------
# drift


def _quantizer_errors(index: faiss.Index, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per vector: squared distance to its IVF centroid ("coarse") and PQ/SQ reconstruction error
    ("codec"), for the parts this index has."""
    out = {}
    top, y = faiss.downcast_index(index), x
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            y = top.chain.at(i).apply(y)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.quantizer.assign(y, 1)[:, 0]
        out["coarse"] = ((y - ivf.quantizer.reconstruct_batch(lists)) ** 2).sum(1)
    try:
        rec = index.sa_decode(index.sa_encode(x))
        err = ((x - rec) ** 2).sum(1)
        if err.max() > 1e-9:  # a lossy code (flat storage reconstructs exactly: nothing to say)
            out["codec"] = err
    except RuntimeError:  # no standalone codec (HNSW, ...)
        pass
    return out


def drift_report(index: faiss.Index, new: np.ndarray, base: np.ndarray, threshold: float) -> dict:
    """How far `new` vectors sit from the trained quantizers, relative to `base` (a sample of the
    database, possibly including the training sample: a slightly low baseline)."""
    if len(new) == 0:
        return {"applies": False, "why": "no new vectors", "retrain": False}
    e_new, e_base = _quantizer_errors(index, new), _quantizer_errors(index, base)
    if not e_new:
        return {"applies": False, "why": "the index has no trained quantizer to drift from",
                "retrain": False}
    figures = {}
    for k in e_new:
        b, n = float(e_base[k].mean()), float(e_new[k].mean())
        figures[k] = {"new_mean": round(n, 6), "database_mean": round(b, 6),
                      "ratio": round(n / max(b, 1e-12), 4)}
    worst = max(f["ratio"] for f in figures.values())
    return {"applies": True, **figures, "max_ratio": worst, "threshold": threshold,
            "base_vectors": int(len(base)), "new_vectors": int(len(new)),
            "retrain": bool(worst > threshold)}


# ---------------------------------------------------------------------------------------------
# publish and swap


def make_versioned(root: Path) -> int:
    """A plain index folder becomes a versioned root: its serving files hard-linked as
    versions/vN (N = its version) and CURRENT naming them. The plain files stay, so shards running
    from the folder keep what they loaded, and a restarted one loads the same index. Returns N."""
    if is_versioned(root):
        return int(load_manifest(serving_dir(root)).version)
    m = load_manifest(root)
    dst = version_dir(root, m.version)
    if not (dst / MANIFEST).is_file():
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        names = [f for s in m.shards for f in (s["file"], s["ids"])]
        if m.extra.get("keyword"):
            from ratray.index.keyword import shard_file

            names += [shard_file(i) for i in range(m.num_shards)]
        for name in names:
            os.link(root / name, tmp / name)
        write_manifest(tmp, m)
        os.rename(tmp, dst)
    write_current(root, dst)
    return int(m.version)


def running_services(root: Path, namespace: str, name: str | None) -> list:
    """Clients of the shard services serving `root`: the one named `name`, else every service in
    `namespace` whose shard 0 reports `root` as its index folder."""
    import ray

    from ratray.index.service import ShardedIndex

    if name:
        client = ShardedIndex.connect(name, namespace, timeout=30)
        if Path(client.index_dir).resolve() != root.resolve():
            raise IndexBuildError(f"shard service {namespace}/{name} serves {client.index_dir}, "
                                  f"not {root}")
        return [client]
    found = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] != namespace or not a["name"].endswith("-shard-0"):
            continue
        svc = a["name"][: -len("-shard-0")]
        try:
            actor = ray.get_actor(a["name"], namespace=namespace)
            served = ray.get(actor.info.remote(), timeout=30)["index_dir"]
        except Exception as e:  # noqa: BLE001 — a dying service is not this update's business
            log.warning("shard service %s/%s did not answer (%s): not swapped", namespace, svc, e)
            continue
        if Path(served).resolve() == root.resolve():
            found.append(ShardedIndex.connect(svc, namespace, timeout=30))
    return found


def _publish(root: Path, src: Path, shards: list, m: Manifest, entry: dict, new_ids, new_texts,
             gone) -> Path:
    """Write versions/v(entry version) with its keyword shards (if the index has them), renamed
    into place whole."""
    dst = version_dir(root, entry["version"])
    stage = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    write_index_dir(stage, shards, m)
    try:
        if m.extra.get("keyword"):
            from ratray.index.keyword import update_keyword_shard

            for i, (_, ids) in enumerate(shards):
                mine = np.isin(new_ids, ids)
                update_keyword_shard(src, stage, i, new_ids[mine],
                                     [t for t, k in zip(new_texts, mine) if k], gone)
        os.rename(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dst


def update_index(workdir: str | Path, add: str | Path | None = None, remove=(),
                 service_name: str | None = None, cfg: UpdateJobConfig | None = None,
                 progress: bool = False) -> dict:
    """Add the documents at `add`, remove the documents `remove` (ids), publish and swap a new
    index version (see the module docstring). Returns what was done, with timings."""
    cfg = cfg or UpdateJobConfig(workdir=str(workdir))
    wd = Workdir(workdir)
    root = wd.index
    with wd.locked("index update"):
        t0 = time.perf_counter()
        if removed := remove_leftovers(root):  # of a killed update (we hold the workdir's lock)
            log.warning("removed leftovers of an interrupted update: %s", ", ".join(removed))
        src = serving_dir(root)
        m = load_manifest(src)
        check_embedding_model(root, model_id(cfg.embed.model))
        store = ChunkStore.open(wd.chunk_store(m.chunk_store))
        before, log_before = store.database_ids(), copy.deepcopy(store.log)
        up = update_store(store, add, list(remove))
        try:
            return _index_update(wd, cfg, m, src, store, up, before, service_name, progress, t0)
        except BaseException:
            if current_version(root) in (None, m.version):  # no new version serves: undo it all
                restore_log(store, log_before)
                for v in versions_on_disk(root):
                    if v > m.version:
                        remove_version(root, v)
            raise


def _index_update(wd: Workdir, cfg: UpdateJobConfig, m: Manifest, src: Path, store: ChunkStore,
                  up, before: np.ndarray, service_name: str | None, progress: bool, t0: float
                  ) -> dict:
    """Steps 2-6 of `update_index` (the store already updated by `up`)."""
    root = wd.index
    gone = np.unique(np.concatenate(
        [np.arange(t["start"], t["stop"]) for t in store.log["tombstones"]
         if t["update"] == up.update] or [np.zeros(0, np.int64)])).astype(np.int64)
    new_ids = up.new_ids()
    t_store = time.perf_counter()

    new_texts = store.texts(new_ids)
    vectors, estats = (embed_with_cache(new_texts, cfg.embed, wd.embeddings, progress,
                                        use_ray=len(new_ids) > IN_PROCESS_MAX)
                       if len(new_ids) else (np.zeros((0, m.dim), np.float32), None))
    t_embed = time.perf_counter()

    shards, rows_removed = [], 0
    for i in range(m.num_shards):
        index, ids = load_shard(src, i, m, reconstruct=False)
        index, ids, r = remove_rows(index, ids, gone, m)
        shards.append((index, ids))
        rows_removed += r
    routed = route(shards, vectors, m.extra.get("shard_split", "rows")) if len(new_ids) \
        else [np.zeros(0, np.int64)] * len(shards)
    for s, rows in enumerate(routed):
        if len(rows):
            shards[s][0].add(vectors[rows])
            shards[s] = (shards[s][0], np.concatenate([shards[s][1], new_ids[rows]]))
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(before, min(cfg.update.drift_sample, len(before)), replace=False))
    base, _ = embed_with_cache(store.texts(sample), cfg.embed, wd.embeddings, progress=False,
                               use_ray=False)  # cache hits: the database was embedded
    drift = drift_report(shards[0][0], vectors, base, cfg.update.drift_threshold)
    t_shards = time.perf_counter()

    base_version = make_versioned(root)
    version = max([base_version, m.version, *versions_on_disk(root)]) + 1
    counts = {k: v for k, v in dataclasses.asdict(up).items() if k not in ("added_ids", "skipped")}
    entry = {"version": version, "from_version": int(m.version), **counts,
             "index_rows_added": int(len(new_ids)), "index_rows_removed": rows_removed,
             "drift_max_ratio": drift.get("max_ratio"), "retrain_advised": drift["retrain"]}
    extra = {**m.extra, "updates": [*m.extra.get("updates", []), entry], "drift": drift}
    extra.pop("republished_from", None)
    new_m = replace(m, version=version, ntotal=int(sum(ix.ntotal for ix, _ in shards)),
                    created=now_iso(), shards=[], extra=extra)
    dst = _publish(root, src, shards, new_m, entry, new_ids, new_texts, gone)
    t_write = time.perf_counter()

    services = running_services(root, cfg.service.namespace, service_name)
    for client in services:
        client.swap(dst)
    if not services:
        write_current(root, dst)
    t_swap = time.perf_counter()
    return {"store": dataclasses.asdict(up), "index": entry, "drift": drift,
            "embeddings": estats.as_dict() if estats else None, "version": version,
            "version_dir": str(dst), "services_swapped": [c.name for c in services],
            "timings": {"store_s": round(t_store - t0, 3), "embed_s": round(t_embed - t_store, 3),
                        "shards_s": round(t_shards - t_embed, 3), "write_s": round(t_write - t_shards, 3),
                        "swap_s": round(t_swap - t_write, 3), "total_s": round(t_swap - t0, 3)},
            "chunks_per_s": round(len(new_ids) / max(t_swap - t0, 1e-9), 1)}


def format_update(r: dict) -> str:
    """An update's result as the lines a person reads."""
    s, ix, d, t = r["store"], r["index"], r["drift"], r["timings"]
    sk = s["skipped"]
    skipped = ", ".join(f"{k} {v}" for k, v in sk.get("counts", {}).items())
    lines = [f"documents: {s['documents_read']} read, {s['documents_added']} added "
             f"({s['documents_replaced']} replacing older versions), {s['documents_removed']} removed"
             + (f"; {sk['total']} skipped ({skipped})" if sk.get("total") else ""),
             f"chunks: {s['chunks_added']} added (split db: retrieval only, never trained on), "
             f"{s['chunks_removed']} tombstoned; index rows +{ix['index_rows_added']} "
             f"-{ix['index_rows_removed']}"]
    if d["applies"]:
        figs = "; ".join(f"{k} {d[k]['new_mean']:.4g} vs database {d[k]['database_mean']:.4g} "
                         f"(x{d[k]['ratio']:.2f})" for k in ("coarse", "codec") if k in d)
        lines.append(f"drift: {figs}; " + (f"RETRAIN ADVISED (ratio > {d['threshold']}): "
                                           "rebuild with jobs/build_index.py" if d["retrain"]
                                           else f"below the retrain threshold {d['threshold']}"))
    else:
        lines.append(f"drift: n/a ({d['why']})")
    swapped = ", ".join(r["services_swapped"]) or "none running (CURRENT rewritten)"
    lines.append(f"index v{r['version']} serving ({r['version_dir']}); hot-swapped: {swapped}")
    lines.append(f"time: {t['total_s']:.2f} s (store {t['store_s']:.2f}, embed {t['embed_s']:.2f}, "
                 f"shards {t['shards_s']:.2f}, write {t['write_s']:.2f}, swap {t['swap_s']:.3f}); "
                 f"{r['chunks_per_s']} chunks/s added")
    return "\n".join(lines)
