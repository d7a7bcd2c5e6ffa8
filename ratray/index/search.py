"""Top-k search of FAISS shards: exact, batch-independent distances, ties by chunk id, exact merge.

All shards of an index share ONE trained quantizer (trained once, then cloned; see `build.py`),
so searching every shard with the same nprobe and merging the per-shard top-k gives exactly the
top-k of a single index over all rows. Every reported distance is computed pair by pair
(candidates re-scored exactly; for IVF-PQ, FAISS's own table distances with pairwise coarse
distances), so results never depend on how queries were batched, and equal distances come out in
chunk-id order. Knows nothing of files or Ray.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from ratray.index.factory import faiss_message, faiss_metric

TIE_MARGIN = 8  # extra FAISS candidates per query, re-scored exactly to settle ties


@dataclass
class SearchResult:
    distances: np.ndarray  # (b, k) float32: l2 ascending / ip descending
    ids: np.ndarray  # (b, k) int64 chunk ids, -1 only if the index holds fewer than k
    version: int  # the index version that answered (every shard agreed)


def merge_topk(distances: list[np.ndarray], ids: list[np.ndarray], k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact global top-k of per-shard top-k lists.

    distances[s], ids[s]: (b, k_s). Returns D (b, k) float32, I (b, k) int64, ordered best first
    (l2 ascending, ip descending); equal distances are ordered by smaller chunk id; FAISS padding
    (id -1) always last. Missing slots (sum k_s < k) are padded with id -1 and distance +inf
    (l2) / -inf (ip).
    """
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d in distances], axis=1)  # (b, K)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)  # (b, K)
    worst = np.inf if metric == "l2" else -np.inf
    if D.shape[1] < k:  # pad so that every row has k slots
        fill = k - D.shape[1]
        D = np.concatenate([D, np.full((D.shape[0], fill), worst, np.float32)], axis=1)
        I = np.concatenate([I, np.full((I.shape[0], fill), -1, np.int64)], axis=1)
    pad = I < 0  # (b, K)
    key = D if metric == "l2" else -D  # ascending is better
    order = np.lexsort((I, key, pad), axis=-1)[:, :k]  # last key is primary: pads, dist, id
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    D[I < 0] = worst
    return D, I


def enable_reconstruct(index: faiss.Index) -> bool:
    """Make `index.reconstruct_batch` work (IVF needs a direct map); False if it cannot."""
    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is not None:
            ivf.make_direct_map()
        if index.ntotal:
            index.reconstruct_batch(np.zeros(1, np.int64))
        return True
    except RuntimeError:
        return False


def stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """Zero-copy (n, d) view of a flat index's vectors (valid while `index` lives), else None."""
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _candidate_keys(index: faiss.Index, vectors: np.ndarray | None, queries: np.ndarray,
                    P: np.ndarray, metric: str) -> np.ndarray:
    """queries (r, d), candidate rows P (r, c) -> sort key (r, c) float32 (l2 distance or -inner
    product; +inf for FAISS padding).

    Computed pair by pair (FAISS's `fvec_*_by_idx`), so the key of (q, x) never depends on the
    batch it came in — FAISS's BLAS path does, so equal vectors could swap places between two
    calls. Vectors come from `vectors`, a flat index's storage, or `reconstruct_batch`."""
    safe = np.ascontiguousarray(np.maximum(P, 0), dtype=np.int64)
    base = vectors if vectors is not None else stored_vectors(index)
    if base is None:  # IVF / PQ / HNSW: decode the candidates
        try:
            base = index.reconstruct_batch(safe.reshape(-1))  # (r * c, d)
        except RuntimeError as e:
            raise ValueError("exact_ties needs stored vectors: call enable_reconstruct(index) "
                             f"or pass exact_ties=False ({faiss_message(e)})") from None
        safe = np.arange(base.shape[0], dtype=np.int64).reshape(P.shape)
    base = np.ascontiguousarray(base, dtype=np.float32)
    key = np.empty(P.shape, np.float32)
    by_idx = faiss.fvec_L2sqr_by_idx if metric == "l2" else faiss.fvec_inner_products_by_idx
    by_idx(faiss.swig_ptr(key), faiss.swig_ptr(queries), faiss.swig_ptr(base),
           faiss.swig_ptr(safe), queries.shape[1], P.shape[0], P.shape[1])
    if metric == "ip":
        key = -key
    key[P < 0] = np.inf
    return key


def search_topk(index: faiss.Index, ids: np.ndarray, queries: np.ndarray, k: int, metric: str,
                vectors: np.ndarray | None = None, exact_ties: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one index: D (b, k) float32, chunk ids (b, k) int64 (-1 padding).

    With `exact_ties`, every distance is a function of (query, stored vector) alone — never of
    the batch the query came in — and equal distances come out in chunk-id order:
      * plain IVF-PQ (`plain_ivfpq`): FAISS's own lookup-table distances, with the coarse
        distances they add computed pair by pair (`_ivfpq_topk`); no candidate is decoded.
      * anything else (flat indexes, `vectors`, or `enable_reconstruct(index)`): FAISS proposes
        k + TIE_MARGIN candidates, re-scored pair by pair from the stored vectors (decoded for
        compressed indexes). A row whose candidates are (near-)tied up to the last one is
        searched again with 4x more candidates.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = index.ntotal
    kk = min(k, n)
    if not exact_ties or kk == 0:
        D, P = index.search(q, kk)  # (b, kk) float32, row positions
        return D, np.where(P >= 0, ids[np.maximum(P, 0)], -1)
    ivfpq = plain_ivfpq(index, metric) if vectors is None else None
    if ivfpq is not None:
        return _ivfpq_topk(ivfpq, ids, q, kk, metric)
    D_out = np.empty((len(q), kk), np.float32)
    I_out = np.empty((len(q), kk), np.int64)
    no_id = np.iinfo(np.int64).max  # padding sorts after every real chunk id
    rows, cand = np.arange(len(q)), min(n, kk + TIE_MARGIN)
    while len(rows):
        _, P = index.search(q[rows], cand)  # (r, cand)
        key = np.empty(P.shape, np.float32)
        step = max(1, (1 << 24) // (cand * q.shape[1]))  # <= 16M decoded floats at a time
        for s in range(0, len(rows), step):
            key[s: s + step] = _candidate_keys(index, vectors, np.ascontiguousarray(
                q[rows[s: s + step]]), P[s: s + step], metric)
        gid = np.where(P >= 0, ids[np.maximum(P, 0)], no_id)
        order = np.lexsort((gid, key), axis=-1)
        key, gid = np.take_along_axis(key, order, 1), np.take_along_axis(gid, order, 1)
        last, kth = key[:, -1], key[:, kk - 1]
        with np.errstate(invalid="ignore"):  # inf - inf on padded rows; isfinite masks them
            open_tie = np.isfinite(last) & (last - kth <= 1e-5 * (1.0 + np.abs(kth)))
        if cand >= n:
            open_tie[:] = False
        done = ~open_tie
        D_out[rows[done]] = key[done, :kk] if metric == "l2" else -key[done, :kk]
        I_out[rows[done]] = np.where(gid[done, :kk] == no_id, -1, gid[done, :kk])
        rows, cand = rows[open_tie], min(n, cand * 4)
    return D_out, I_out


def plain_ivfpq(index: Any, metric: str) -> faiss.IndexIVFPQ | None:
    """`index` as an IndexIVFPQ whose distances `_ivfpq_topk` can make batch-independent: no
    vector transform in front, a flat coarse quantizer, no polysemous filter, the same metric."""
    if not isinstance(index, faiss.Index):  # e.g. ratray.retrieval.gpu.GpuIndex
        return None
    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFPQ or ivf.polysemous_ht != 0 \
            or ivf.metric_type != faiss_metric(metric):
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != ivf.nlist:
        return None
    return ivf


def coarse_assign(ivf: faiss.IndexIVF, q: np.ndarray, metric: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The nprobe lists each query probes, (b, nprobe) int64, and their coarse distances
    (b, nprobe) float32 (FAISS's convention: l2 distance / inner product), both computed pair by
    pair, so neither depends on the batch.

    FAISS's quantizer search (BLAS for batches, hence batch-dependent in the last bits) proposes
    nprobe + margin centroids; they are re-scored exactly and sorted by (distance, list number).
    A centroid it did not propose is approximately no closer than the last one proposed; if
    that last one is not clearly (by more than the rounding bound `tol`) beyond the nprobe-th,
    the row is asked again with twice as many."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    centroids = stored_vectors(quantizer)  # (nlist, d)
    nlist, (b, d) = int(ivf.nlist), q.shape
    nprobe = max(1, min(int(ivf.nprobe), nlist))
    # |BLAS - pairwise| <= ~4 (d + 2) u (|q|^2 + |c|^2) for either metric (u = 2^-24); doubled
    scale = np.einsum("ij,ij->i", q, q) + float(np.einsum("ij,ij->i", centroids, centroids).max())
    tol = 8.0 * (d + 2) * 2.0 ** -24 * scale  # (b,)
    lists = np.empty((b, nprobe), np.int64)
    dists = np.empty((b, nprobe), np.float32)
    rows, m = np.arange(b), min(nlist, nprobe + max(2, nprobe // 4))
    while len(rows):
        qr = np.ascontiguousarray(q[rows])
        A, L = quantizer.search(qr, m)  # (r, m) approximate distances, list numbers
        key = _candidate_keys(quantizer, centroids, qr, L, metric)  # exact, ascending is better
        order = np.lexsort((L, key), axis=-1)
        key, L = np.take_along_axis(key, order, 1), np.take_along_axis(L, order, 1)
        last = A[:, -1] if metric == "l2" else -A[:, -1]  # no unproposed centroid is below this
        settled = (m >= nlist) | (last - tol[rows] > key[:, nprobe - 1])
        lists[rows[settled]] = L[settled, :nprobe]
        dists[rows[settled]] = key[settled, :nprobe] if metric == "l2" else -key[settled, :nprobe]
        rows, m = rows[~settled], min(nlist, 2 * m)
    return lists, dists


def _search_preassigned(ivf: faiss.IndexIVF, q: np.ndarray, k: int, lists: np.ndarray,
                        coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ivf.search_preassigned` over as many threads as `ivf.search` would use.

    FAISS's own `search` splits the queries between its OpenMP threads and then calls
    `search_preassigned` per slice, which by itself runs on one thread (parallel_mode 0); so do
    the same split here, on Python threads (FAISS releases the GIL)."""
    threads = min(faiss.omp_get_max_threads(), len(q))
    if threads < 2:
        return ivf.search_preassigned(np.ascontiguousarray(q), k, lists, coarse)
    bounds = np.linspace(0, len(q), threads + 1).astype(np.int64)

    def part(s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = bounds[s], bounds[s + 1]
        return ivf.search_preassigned(np.ascontiguousarray(q[lo:hi]), k, lists[lo:hi],
                                      coarse[lo:hi])

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(part, range(threads)))
    return np.concatenate([D for D, _ in parts]), np.concatenate([P for _, P in parts])


def _ivfpq_topk(ivf: faiss.IndexIVFPQ, ids: np.ndarray, q: np.ndarray, kk: int, metric: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """`search_topk` for a plain IVF-PQ index, without decoding a single candidate.

    FAISS's IVF-PQ distance of (query, code) is the coarse distance of the code's list plus a
    sum of lookup-table entries; the tables are computed per query (never across a batch) and
    summed in the same order wherever the code sits, so once the coarse part comes from
    `coarse_assign` the distance is a function of (query, list, code): the same in any batch,
    in one index or in list- or row-split shards. Identical codes in one list (duplicates) tie
    exactly and are ordered by chunk id; FAISS returns kk + 1 candidates so that a tie across the
    k-th place is seen, and such rows are asked again with 4x more."""
    n = int(ivf.ntotal)
    lists, coarse = coarse_assign(ivf, q, metric)
    D_out = np.empty((len(q), kk), np.float32)
    I_out = np.empty((len(q), kk), np.int64)
    no_id = np.iinfo(np.int64).max  # padding sorts after every real chunk id
    rows, cand = np.arange(len(q)), min(n, kk + 1)
    while len(rows):
        D, P = _search_preassigned(ivf, q[rows], cand, lists[rows], coarse[rows])  # (r, cand)
        key = D if metric == "l2" else -D  # ascending is better
        key[P < 0] = np.inf
        gid = np.where(P >= 0, ids[np.maximum(P, 0)], no_id)
        order = np.lexsort((gid, key), axis=-1)
        key, gid = np.take_along_axis(key, order, 1), np.take_along_axis(gid, order, 1)
        open_tie = np.isfinite(key[:, -1]) & (key[:, -1] == key[:, kk - 1]) & (cand < n)
        done = ~open_tie
        D_out[rows[done]] = key[done, :kk] if metric == "l2" else -key[done, :kk]
        I_out[rows[done]] = np.where(gid[done, :kk] == no_id, -1, gid[done, :kk])
        rows, cand = rows[open_tie], min(n, cand * 4)
    return D_out, I_out


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: D (b, k) float32 and row positions into `vectors` (b, k), best first.

    Exact ties are ordered by position (exact re-scoring, see `search_topk`), so with
    position-sorted ids this agrees with the service's chunk-id tie-break."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = faiss.IndexFlat(vectors.shape[1], faiss_metric(metric))
    flat.add(vectors)
    return search_topk(flat, np.arange(len(vectors), dtype=np.int64), queries, k, metric,
                       vectors=vectors)


def search_shards(shards: list[tuple[faiss.Index, np.ndarray]], queries: np.ndarray, k: int,
                  metric: str, exact_ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """In-process twin of the service: search every (index, ids) shard, merge exactly."""
    parts = [search_topk(index, ids, queries, k, metric, exact_ties=exact_ties)
             for index, ids in shards]
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k, metric)


class ExactIndex:
    """Exact search over (vectors, chunk ids) in this process, with the shard actors' client
    interface (`ntotal`, `search`, `search_async`): evaluation against a database that is a
    subset of the index (the database-size curve) without building or serving anything."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, metric: str = "l2", version: int = 0):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids, self.metric, self.version = np.asarray(ids, np.int64), metric, version
        self.index = faiss.IndexFlat(self.vectors.shape[1], faiss_metric(metric))
        self.index.add(self.vectors)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        D, I = search_topk(self.index, self.ids, queries, k, self.metric, vectors=self.vectors)
        return SearchResult(D, I, self.version)

    def search_async(self, queries: np.ndarray, k: int) -> "_Done":
        return _Done(self.search(queries, k))


class _Done:
    """A search that has already finished (the future interface of `ExactIndex.search_async`)."""

    def __init__(self, result: SearchResult):
        self._result = result

    def result(self, timeout: float | None = None) -> SearchResult:
        return self._result
