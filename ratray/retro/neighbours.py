"""RETRO neighbours: for each chunk of a training sequence, its k nearest database chunks and their
continuations, with the leakage filter applied.

    split chunks ─► sequences (s, l) chunk ids ─► query vectors (embedding cache)
        ─► ShardedIndex.search(q, K) ─► leakage filter (drop chunks of any document in the
           query's sequence) ─► top-k ids (s, l, k) ─► tokens [N, F] (s, l, k, 2m)

Two modes give identical neighbours because both run the same search and the same filter:
- precomputed: `precompute_neighbours` searches every sequence once and stores the ids next to the
  chunk store (reused across runs);
- online: `NeighbourFetcher.request` issues the search asynchronously (the next batch's neighbours are
  in flight while the current batch computes) and `.result()` applies the filter.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ratray.data.store import ChunkStore
from ratray.index.filtered import DocCodes, first_request, search_filtered

# ---------------------------------------------------------------------------------------------
# sequences


def sequence_layout(store: ChunkStore, split: str, seq_chunks: int) -> np.ndarray:
    """(s, l) chunk ids of `split`, `l = seq_chunks` consecutive chunks per sequence, -1 = empty slot.

    Chunks are taken in store order (documents stay contiguous); a sequence may hold the end of one
    document and the start of the next, but a chunk never straddles two. The last sequence is padded
    with empty slots, so no chunk is dropped.
    """
    ids = store.split_ids(split)
    s = -(-len(ids) // seq_chunks)
    out = np.full(s * seq_chunks, -1, np.int64)
    out[: len(ids)] = ids
    return out.reshape(s, seq_chunks)


def excluded_docs(layout: np.ndarray, docs: DocCodes) -> np.ndarray:
    """(s, l) sequences → (s*l, l) doc codes each chunk must not retrieve from: every document of its
    own sequence (RETRO's leakage filter; -1 entries match nothing)."""
    seq_docs = docs.of(layout)  # (s, l)
    return np.repeat(seq_docs, layout.shape[1], axis=0)


# ---------------------------------------------------------------------------------------------
# query vectors: the retriever embedding of every chunk, aligned with chunk ids


def ensure_chunk_vectors(store: ChunkStore, embed_cfg, cache_root, out_dir, progress: bool = True) -> Path:
    """Write (once) an (N, d) float32 .npy of every chunk's retriever embedding, row = chunk id.

    Vectors come from the embedding cache (the index build already embedded the train chunks), so
    only chunks never seen before (validation chunks) reach the encoder. Workers memory-map it.
    """
    from ratray.index.embed import embed_with_cache
    from ratray.pretrained import model_id

    path = Path(out_dir) / f"chunk-vectors-{store.key[:16]}-{model_id(embed_cfg.model)}.npy"
    if path.is_file():
        return path
    vecs, _ = embed_with_cache(store.texts(np.arange(len(store))), embed_cfg, cache_root, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, vecs)
    os.replace(tmp, path)
    return path


def _tmp_name(path: Path) -> Path:
    """A temp name for `path` no other writer uses (two runs may write one table at once)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class ChunkVectors:
    """Memory-mapped chunk embeddings; `[ids]` with -1 entries gives zero rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.array.shape[1]), np.float32)
        ok = ids >= 0
        out[ok] = self.array[ids[ok]]
        return out


# ---------------------------------------------------------------------------------------------
# precomputed mode


@dataclass
class NeighbourTable:
    """Precomputed neighbours of one split: ids (s, l, k) and distances, aligned with the layout."""

    layout: np.ndarray  # (s, l) chunk ids
    ids: np.ndarray  # (s, l, k) neighbour chunk ids, -1 for empty slots
    distances: np.ndarray  # (s, l, k)
    path: Path | None = None
    reused: bool = False


def _table_path(store: ChunkStore, index_manifest, split: str, seq_chunks: int, k: int,
                hybrid=None) -> Path:
    fused = None if hybrid is None or hybrid.hybrid == "off" else [
        hybrid.hybrid, hybrid.rrf_k, hybrid.hybrid_weight, hybrid.hybrid_depth]
    ident = json.dumps({"index": index_manifest.chunk_store, "factory": index_manifest.factory,
                        **({"hybrid": fused} if fused else {}),
                        "version": index_manifest.version, "model": index_manifest.embedding_model,
                        "created": index_manifest.created, "nprobe": index_manifest.nprobe,
                        "ef_search": index_manifest.ef_search, "split": split, "l": seq_chunks,
                        "k": k}, sort_keys=True)
    h = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return store.path / "neighbours" / f"{split}-l{seq_chunks}-k{k}-{h}.parquet"


class _Ready:
    """A search answered already (a fused hybrid search), read like one in flight."""

    def __init__(self, res):
        self.res = res

    def result(self):
        return self.res


def search_layout(store: ChunkStore, index, layout: np.ndarray, k: int, vectors: ChunkVectors,
                  batch: int = 1024, progress: bool = True, in_flight: int = 2,
                  desc: str = "neighbours", hybrid=None) -> tuple[np.ndarray, np.ndarray]:
    """The k admissible neighbours of every chunk slot of `layout` (s, l) → ids (s, l, k), -1 for
    empty slots, and distances. `index`: the shard actors' client, or any object with `ntotal`,
    `search` and `search_async` (e.g. `ratray.index.search.ExactIndex`); a few searches in flight.
    `hybrid` (an IndexConfig with `hybrid` rrf | weighted): the first candidates of each batch are
    the dense and BM25 lists of the chunks' texts fused (`ShardedIndex.hybrid_search`, one at a
    time); rows the leakage filter leaves short widen with dense search."""
    from tqdm.auto import tqdm

    docs = DocCodes(store)
    flat = layout.reshape(-1)
    excl = excluded_docs(layout, docs)
    ids = np.full((len(flat), k), -1, np.int64)
    dist = np.full((len(flat), k), np.inf, np.float32)
    live = np.flatnonzero(flat >= 0)
    n_excl = docs.excluded_chunks(excl)  # (s*l,)
    starts = list(range(0, len(live), batch))
    pending: list = []  # (rows, queries, future)
    with tqdm(total=len(live), desc=desc, unit="chunk", disable=not progress) as bar:
        for s in starts + [None] * in_flight:
            if s is not None:
                rows = live[s: s + batch]
                q = vectors[flat[rows]]
                K = first_request(index.ntotal, k, n_excl[rows])
                fused = hybrid is not None and hybrid.hybrid != "off"
                pending.append((rows, q, _Ready(index.hybrid_search(q, store.texts(flat[rows]), K, hybrid))
                                if fused else index.search_async(q, K)))
            if len(pending) > in_flight or (s is None and pending):
                rows, q, fut = pending.pop(0)
                ids[rows], dist[rows] = search_filtered(index, q, excl[rows], docs, k, first=fut.result())
                bar.update(len(rows))
    return ids.reshape(*layout.shape, k), dist.reshape(*layout.shape, k)


def precompute_neighbours(store: ChunkStore, index, split: str, seq_chunks: int, k: int,
                          vectors: ChunkVectors, batch: int = 1024, progress: bool = True,
                          in_flight: int = 2, hybrid=None) -> NeighbourTable:
    """Search every chunk of `split` once through the shard actors; store and reuse the result."""
    from ratray.index.store import load_manifest, serving_dir

    manifest = load_manifest(serving_dir(index.index_dir))  # the version serving (live updates)
    path = _table_path(store, manifest, split, seq_chunks, k, hybrid)
    layout = sequence_layout(store, split, seq_chunks)
    if path.is_file():
        t = pq.read_table(path)
        ids = np.stack(t.column("neighbours").to_numpy(zero_copy_only=False)).astype(np.int64)
        dist = np.stack(t.column("distances").to_numpy(zero_copy_only=False)).astype(np.float32)
        return NeighbourTable(layout, ids.reshape(*layout.shape, k), dist.reshape(*layout.shape, k),
                              path, reused=True)
    ids, dist = search_layout(store, index, layout, k, vectors, batch, progress, in_flight,
                              desc=f"neighbours[{split}]", hybrid=hybrid)
    flat = layout.reshape(-1)
    ids, dist = ids.reshape(len(flat), k), dist.reshape(len(flat), k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    pq.write_table(pa.table({"chunk_id": flat, "neighbours": list(ids), "distances": list(dist)}), tmp)
    os.replace(tmp, path)
    return NeighbourTable(layout, ids.reshape(*layout.shape, k), dist.reshape(*layout.shape, k), path)


# ---------------------------------------------------------------------------------------------
# online mode


class NeighbourFetcher:
    """Online retrieval for training batches: `request(seq_idx)` returns at once with a handle whose
    `.result()` gives (ids (b, l, k), wait seconds, search latency seconds)."""

    def __init__(self, store: ChunkStore, index, layout: np.ndarray, k: int, vectors: ChunkVectors):
        self.store, self.index, self.layout, self.k, self.vectors = store, index, layout, k, vectors
        self.docs = DocCodes(store)
        self.excl = excluded_docs(layout, self.docs).reshape(*layout.shape, -1)
        self.excl_chunks = self.docs.excluded_chunks(self.excl[:, 0])  # (s,) per sequence
        self.stats: dict = {}  # widen_searches, widened_rows (search_filtered)

    def request(self, seq_idx: np.ndarray) -> "_Pending":
        flat = self.layout[seq_idx].reshape(-1)
        q = self.vectors[flat]
        K = first_request(self.index.ntotal, self.k, self.excl_chunks[seq_idx])
        return _Pending(self, seq_idx, q, self.index.search_async(q, K), time.perf_counter())


class _Pending:
    def __init__(self, f: NeighbourFetcher, seq_idx, q, fut, t0):
        self.f, self.seq_idx, self.q, self.fut, self.t0 = f, seq_idx, q, fut, t0

    def result(self) -> tuple[np.ndarray, float, float]:
        """(ids, wait, latency): `wait` is all the time the caller blocks here — the prefetched
        search still in flight, the leakage filter and any widening search it forces (counted in
        the fetcher's `stats`); `latency` runs from the request to the answer."""
        f = self.f
        t = time.perf_counter()
        first = self.fut.result()
        excl = f.excl[self.seq_idx].reshape(len(self.q), -1)
        ids, _ = search_filtered(f.index, self.q, excl, f.docs, f.k, first=first, stats=f.stats)
        flat = f.layout[self.seq_idx].reshape(-1)
        ids[flat < 0] = -1  # empty slots retrieve nothing
        now = time.perf_counter()
        return ids.reshape(len(self.seq_idx), f.layout.shape[1], f.k), now - t, now - self.t0
