"""Top-k search with whole documents excluded: RETRO's leakage filter, REALM's source-document rule.

    queries (q d) ─ ShardedIndex.search(q, K) ─ drop candidates of excluded documents ─ first k
        ─ rows left short (fewer than k admissible) searched again with 4x more candidates

The first request K covers every chunk of the excluded documents (k * factor + their chunk count),
so the filter can only leave a row short when an approximate index returns fewer than K results.

Documents are dense int codes (`DocCodes`), so the filter is vectorised numpy.
"""
from __future__ import annotations

import numpy as np

from ratray.data.store import ChunkStore

CANDIDATE_FACTOR = 2  # first request: k * factor + (chunks of the row's excluded documents)


class DocCodes:
    """Document ids as dense int codes, so the leakage filter is vectorised numpy."""

    def __init__(self, store: ChunkStore):
        self.store = store
        doc = store.doc_ids(np.arange(len(store)))
        self.names, codes = np.unique(doc.astype(str), return_inverse=True)  # (D,) sorted doc ids
        self.later: dict[str, int] = {}  # documents first met in chunks appended since: D, D+1, ...
        self.of_chunk = codes.astype(np.int64)  # (N,)
        self.chunks = np.bincount(self.of_chunk)  # (D,) chunks per document

    def _grow(self) -> None:
        """Codes for the chunks a live update appended to the store since (ratray/index/update.py;
        a search of the updated index returns them). Existing codes never change, and a re-added
        document keeps its code, so the filter still excludes it by id."""
        self.store.reload()
        n = len(self.of_chunk)
        doc = self.store.doc_ids(np.arange(n, len(self.store))).astype(str)
        codes = self.of_documents(doc)
        for i in np.flatnonzero(codes < 0):
            codes[i] = self.later.setdefault(doc[i], len(self.names) + len(self.later))
        self.of_chunk = np.concatenate([self.of_chunk, codes])
        self.chunks = np.bincount(self.of_chunk, minlength=len(self.names) + len(self.later))

    def excluded_chunks(self, exclude: np.ndarray) -> np.ndarray:
        """exclude (q, E) doc codes, -1 and repeats allowed → (q,) chunks in each row's distinct
        excluded documents (an upper bound on the candidates the filter can drop)."""
        if exclude.size == 0:
            return np.zeros(len(exclude), np.int64)
        e = np.sort(exclude, axis=1)
        first = np.ones(e.shape, bool)
        first[:, 1:] = e[:, 1:] != e[:, :-1]
        return np.where(first & (e >= 0), self.chunks[np.maximum(e, 0)], 0).sum(1)

    def of_documents(self, doc_ids: np.ndarray) -> np.ndarray:
        """Document ids (any shape) → their codes, -1 for a document this store does not hold."""
        doc_ids = np.asarray(doc_ids).astype(str)
        if len(self.names) == 0:
            out = np.full(doc_ids.shape, -1, np.int64)
        else:
            at = np.minimum(np.searchsorted(self.names, doc_ids), len(self.names) - 1)
            out = np.where(self.names[at] == doc_ids, at, -1).astype(np.int64)
        if self.later and (out < 0).any():
            miss = out < 0
            out[miss] = [self.later.get(d, -1) for d in doc_ids[miss]]
        return out

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids (any shape, -1 allowed) → doc codes, -1 for empty slots."""
        out = np.full(ids.shape, -1, np.int64)
        ok = ids >= 0
        if ok.any() and int(ids[ok].max()) >= len(self.of_chunk):
            self._grow()
        out[ok] = self.of_chunk[ids[ok]]
        return out


def filter_candidates(cand: np.ndarray, dist: np.ndarray, exclude: np.ndarray, docs: DocCodes,
                      k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's first k candidates (in rank order) not from an excluded document.

    cand, dist (q, K); exclude (q, E) doc codes. Returns ids (q, k), dists (q, k), short (q,) bool —
    rows with fewer than k admissible candidates (their missing slots are -1 / inf).
    """
    cdoc = docs.of(cand)  # (q, K)
    bad = (cand < 0) | (cdoc[:, :, None] == np.where(exclude >= 0, exclude, -2)[:, None, :]).any(-1)
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]  # admissible first, rank order kept
    ids = np.take_along_axis(cand, order, 1)
    d = np.take_along_axis(dist, order, 1).astype(np.float32)
    miss = np.take_along_axis(bad, order, 1)
    ids[miss], d[miss] = -1, np.inf
    return ids, d, miss.any(1)


def first_request(ntotal: int, k: int, excluded_chunks) -> int:
    """Candidates asked for first: k * CANDIDATE_FACTOR beyond every chunk the filter could drop
    (`excluded_chunks`: per row, from `DocCodes.excluded_chunks`; the largest row sets K)."""
    return int(min(ntotal, k * CANDIDATE_FACTOR + int(np.max(excluded_chunks, initial=0))))


def search_filtered(index, queries: np.ndarray, exclude: np.ndarray, docs: DocCodes, k: int,
                    first=None, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k admissible neighbours; widens the search for rows the filter left short.

    `first` is an already-issued search result for (queries, K0) (the async path passes it in).
    `stats`, if given, accumulates `widen_searches` and `widened_rows`: the synchronous searches
    the filter forced (they are not prefetched, so they cost the caller their whole latency).
    """
    ntotal = index.ntotal
    res = first if first is not None else \
        index.search(queries, first_request(ntotal, k, docs.excluded_chunks(exclude)))
    ids, d, short = filter_candidates(res.ids, res.distances, exclude, docs, k)
    K = res.ids.shape[1]
    while short.any() and K < ntotal:
        K = min(ntotal, K * 4)
        rows = np.flatnonzero(short)
        if stats is not None:
            stats["widen_searches"] = stats.get("widen_searches", 0) + 1
            stats["widened_rows"] = stats.get("widened_rows", 0) + len(rows)
        r = index.search(queries[rows], K)
        ids[rows], d[rows], short_rows = filter_candidates(r.ids, r.distances, exclude[rows], docs, k)
        short[rows] = short_rows
    return ids, d
