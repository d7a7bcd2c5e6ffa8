"""FAISS index shards on disk: factory choice, build, save/load, exact top-k merge.

One index directory holds `shard_{i}.faiss` (plain `faiss.write_index`), `shard_{i}.ids.npy`
(int64 chunk id of every row of that shard) and `manifest.json` (written last). All shards share
ONE trained quantizer (trained once, then cloned), so searching every shard with the same
nprobe and merging the per-shard top-k gives exactly the top-k of a single index over all rows.
Every reported distance is computed pair by pair (candidates re-scored exactly; for IVF-PQ, FAISS's
own table distances with pairwise coarse distances), so results never depend on how queries were
batched, and equal distances come out in chunk-id order.

This module knows nothing of Ray; `service.py` wraps a shard in an actor.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting are catastrophic on a shared 2-core box: PQ training
# ran 7-10x slower under load with the default (active) policy. Must be set before libgomp
# loads, i.e. before the first `import faiss` in this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import math
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ratray.config import IndexConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid
BLAS_THRESHOLD = 16  # faiss-cpu default 20 queries *and* nq*d >= 128k: small batches ~17x slower
TIE_MARGIN = 8  # extra FAISS candidates per query, re-scored exactly to settle ties
RECALL_TARGET = 0.95  # auto nprobe: smallest nprobe whose measured recall@10 reaches this
AUTO_FLAT_MAX = 20_000  # auto: below this many vectors, exact search is cheap enough
AUTO_IVF_FLAT_MAX = 1_000_000  # auto: below this many, IVF-Flat (uncompressed); above, IVF-PQ


class IndexBuildError(ValueError):
    """An index cannot be built or loaded; the message names the culprit (string, file, dim)."""


def configure_faiss(omp_threads: int = 0) -> None:
    """Process-wide FAISS settings for searching: BLAS for every batch size, optional threads."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    if omp_threads > 0:
        faiss.omp_set_num_threads(omp_threads)


configure_faiss()


def _faiss_metric(metric: str) -> int:
    if metric == "l2":
        return faiss.METRIC_L2
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    raise IndexBuildError(f"metric must be 'l2' or 'ip', got {metric!r}")


def _faiss_message(e: Exception) -> str:
    """FAISS errors span lines and C++ signatures; keep the one sentence after 'Error:'."""
    text = " ".join(str(e).split())
    return text.split("Error: ", 1)[-1]


# ---------------------------------------------------------------------------------------------
# factory strings

_IVF_RE = re.compile(r"IVF(\d+)")
_PQ_RE = re.compile(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?(?![\dx]|fs)")  # not OPQ, not fast-scan PQ


def _auto_nlist(n: int, n_train: int) -> int:
    """~4*sqrt(n) inverted lists, but never fewer than ~39 training points per list."""
    return max(1, min(int(round(4 * math.sqrt(n))), n_train // MIN_POINTS_PER_CENTROID))


def _auto_pq_m(dim: int) -> int:
    """Sub-quantizers for auto IVF-PQ: 2 dims per byte-code (largest divisor of dim <= dim/2).

    Measured on 3,800 real MiniLM embeddings of stdlib chunks (recall@10 vs exact, best nprobe):
    PQ48 (8 dims/code) plateaus at 0.70, PQ96 (4 dims/code) at 0.84, PQ192 (2 dims/code) reaches
    0.95. So dim/2: still 8x smaller than float32 vectors, and above the 0.9 recall bar."""
    for m in range(max(1, dim // 2), 0, -1):
        if dim % m == 0:
            return m
    return 1


def resolve_factory(spec: str, n: int, dim: int, n_train: int | None = None) -> str:
    """Turn `spec` into a FAISS factory string that `n` vectors of `dim` can train.

    `auto` picks by corpus size:
      * n < 20k: `Flat` — exact; scanning 20k vectors costs less than training anything.
      * n < 1M: `IVF{nlist},Flat` — chosen over HNSW because (a) the quantizer is trained once and
        cloned into every shard, so sharded search is exactly a single index's search; (b) add()
        is O(n) after training while an HNSW build is O(n log n) with a large constant (minutes
        per 100k vectors on 2 cores) and costs ~2*M*4 extra bytes per vector; (c) nprobe is a
        single knob tuned against exact search at build time.
      * larger: `IVF{nlist},PQ{dim/2}` — 8x compressed codes (see `_auto_pq_m` for why not fewer).
    nlist = 4*sqrt(n), capped at n_train/39 so every list has the ~39 training points FAISS's
    k-means wants. `n_train` (default n) is how many vectors training will actually see.

    Explicit templates with an IVF size or PQ code width the data cannot train (e.g.
    `IVF65536,Flat` on 10k vectors) are clamped with a warning instead of failing. Any other
    FAISS factory string passes through unchanged (it is validated when the index is built).
    """
    if n <= 0:
        raise IndexBuildError(f"cannot build an index over {n} vectors")
    n_train = n if n_train is None else max(1, min(n, n_train))
    spec = spec.strip()
    if spec.lower() == "auto":
        if n < AUTO_FLAT_MAX:
            spec = "Flat"
        elif n < AUTO_IVF_FLAT_MAX:
            spec = f"IVF{_auto_nlist(n, n_train)},Flat"
        else:
            spec = f"IVF{_auto_nlist(n, n_train)},PQ{_auto_pq_m(dim)}"

    max_lists = max(1, n_train // MIN_POINTS_PER_CENTROID)

    def clamp_ivf(m: re.Match) -> str:
        nlist = int(m.group(1))
        if nlist <= max_lists:
            return m.group(0)
        log.warning("factory %r: IVF%d needs >= %d training vectors, have %d; using IVF%d",
                    spec, nlist, nlist * MIN_POINTS_PER_CENTROID, n_train, max_lists)
        return f"IVF{max_lists}"

    max_bits = max(1, int(math.log2(max(2, max_lists))))

    def clamp_pq(m: re.Match) -> str:
        nbits = int(m.group(2) or 8)
        if nbits <= max_bits:
            return m.group(0)
        log.warning("factory %r: PQ codes of %d bits need >= %d training vectors, have %d; "
                    "using %d bits", spec, nbits, (1 << nbits) * MIN_POINTS_PER_CENTROID,
                    n_train, max_bits)
        return f"PQ{m.group(1)}x{max_bits}"

    return _PQ_RE.sub(clamp_pq, _IVF_RE.sub(clamp_ivf, spec))


def new_index(factory: str, dim: int, metric: str, requested: str | None = None) -> faiss.Index:
    """An empty FAISS index from `factory`; IndexBuildError (one line) if FAISS rejects it.
    `requested` is the string the user wrote, named in the error if resolution changed it."""
    try:
        index = faiss.index_factory(dim, factory, _faiss_metric(metric))
    except RuntimeError as e:
        shown = f"{requested!r} (resolved to {factory!r})" if requested not in (None, factory) \
            else repr(factory)
        raise IndexBuildError(f"bad FAISS factory string {shown} for dim {dim}: "
                              f"{_faiss_message(e)}") from None
    # Factory PQ indexes default to polysemous training: slow (a simulated-annealing pass) and
    # useless unless polysemous_ht is set at search time. Turn it off wherever it hides.
    for sub in (faiss.downcast_index(index), faiss.try_extract_index_ivf(index)):
        if sub is not None and hasattr(sub, "do_polysemous_training"):
            sub.do_polysemous_training = False
    return index


def set_search_params(index: faiss.Index, nprobe: int = 0, ef_search: int = 0) -> None:
    """Apply nprobe / efSearch wherever they apply (IVF wrapped in a transform, HNSW quantizer)."""
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value > 0:
            try:
                ps.set_index_parameter(index, name, value)
            except RuntimeError:
                pass  # this index has no such knob (e.g. nprobe on Flat)


def index_nlist(index: faiss.Index) -> int:
    """Number of inverted lists, 0 if `index` has no IVF inside."""
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass
class Manifest:
    """What `manifest.json` holds: how the shards were built and where they are."""

    version: int
    factory: str  # the factory actually built (after auto / clamping)
    factory_requested: str  # what the config asked for
    metric: str  # "l2" | "ip"
    dim: int
    embedding_model: str
    ntotal: int
    nprobe: int  # 0 when the index has no IVF
    ef_search: int
    chunk_store: str
    shards: list[dict]  # [{"file": "shard_0.faiss", "ids": "shard_0.ids.npy", "size": 123}]
    created: str  # ISO 8601, UTC
    extra: dict = field(default_factory=dict)  # nlist, training size, recall measurements, timings

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise IndexBuildError("manifest must be a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in data and k != "extra"]
        if missing:
            raise IndexBuildError(f"manifest is missing keys: {', '.join(missing)}")
        return cls(**{k: data[k] for k in names if k in data})


def load_manifest(index_dir: str | Path) -> Manifest:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexBuildError(f"no index at {index_dir}: {path} does not exist")
    try:
        return Manifest.from_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise IndexBuildError(f"{path}: corrupt manifest ({e})") from None
    except IndexBuildError as e:
        raise IndexBuildError(f"{path}: {e}") from None


def load_shard(index_dir: str | Path, i: int, manifest: Manifest | None = None,
               reconstruct: bool = True) -> tuple[faiss.Index, np.ndarray]:
    """Read shard `i` (its FAISS index and row -> chunk id map), with search params applied.

    `reconstruct` builds the IVF direct map (8 bytes per vector) that exact tie-breaking needs."""
    index_dir = Path(index_dir)
    m = manifest or load_manifest(index_dir)
    if not 0 <= i < m.num_shards:
        raise IndexBuildError(f"{index_dir}: shard {i} out of range (index has {m.num_shards})")
    entry = m.shards[i]
    index_path, ids_path = index_dir / entry["file"], index_dir / entry["ids"]
    for p in (index_path, ids_path):
        if not p.is_file():
            raise IndexBuildError(f"shard {i}: missing file {p}")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise IndexBuildError(f"{index_path}: not a readable FAISS index ({_faiss_message(e)})"
                              ) from None
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexBuildError(f"{ids_path}: not a readable .npy id array ({e})") from None
    if index.d != m.dim:
        raise IndexBuildError(f"{index_path}: dimension {index.d} != manifest dim {m.dim}")
    if not (index.ntotal == len(ids) == entry["size"]):
        raise IndexBuildError(f"{index_path}: {index.ntotal} vectors, {len(ids)} ids in "
                              f"{ids_path.name}, manifest says {entry['size']}")
    set_search_params(index, m.nprobe, m.ef_search)
    if reconstruct:
        enable_reconstruct(index)
    return index, ids.astype(np.int64, copy=False)



# ---------------------------------------------------------------------------------------------
# exact search, merge, recall


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


def _stored_vectors(index: faiss.Index) -> np.ndarray | None:
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
    base = vectors if vectors is not None else _stored_vectors(index)
    if base is None:  # IVF / PQ / HNSW: decode the candidates
        try:
            base = index.reconstruct_batch(safe.reshape(-1))  # (r * c, d)
        except RuntimeError as e:
            raise ValueError("exact_ties needs stored vectors: call enable_reconstruct(index) "
                             f"or pass exact_ties=False ({_faiss_message(e)})") from None
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
      * plain IVF-PQ (`_plain_ivfpq`): FAISS's own lookup-table distances, with the coarse
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
    ivfpq = _plain_ivfpq(index, metric) if vectors is None else None
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


def _plain_ivfpq(index: Any, metric: str) -> faiss.IndexIVFPQ | None:
    """`index` as an IndexIVFPQ whose distances `_ivfpq_topk` can make batch-independent: no
    vector transform in front, a flat coarse quantizer, no polysemous filter, the same metric."""
    if not isinstance(index, faiss.Index):  # e.g. ratray.retrieval.gpu.GpuIndex
        return None
    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFPQ or ivf.polysemous_ht != 0 \
            or ivf.metric_type != _faiss_metric(metric):
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != ivf.nlist:
        return None
    return ivf


def _coarse_assign(ivf: faiss.IndexIVF, q: np.ndarray, metric: str
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
    centroids = _stored_vectors(quantizer)  # (nlist, d)
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
    `_coarse_assign` the distance is a function of (query, list, code): the same in any batch,
    in one index or in list- or row-split shards. Identical codes in one list (duplicates) tie
    exactly and are ordered by chunk id; FAISS returns kk + 1 candidates so that a tie across the
    k-th place is seen, and such rows are asked again with 4x more."""
    n = int(ivf.ntotal)
    lists, coarse = _coarse_assign(ivf, q, metric)
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
    flat = faiss.IndexFlat(vectors.shape[1], _faiss_metric(metric))
    flat.add(vectors)
    return search_topk(flat, np.arange(len(vectors), dtype=np.int64), queries, k, metric,
                       vectors=vectors)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the true top-k (exact_ids (b, k)) found in the approximate top-k (b, >=k)."""
    exact = np.asarray(exact_ids)
    approx = np.asarray(approx_ids)[:, : exact.shape[1]]
    valid = exact >= 0  # (b, k)
    hit = (approx[:, :, None] == exact[:, None, :]).any(axis=1) & valid  # (b, k)
    return float(hit.sum() / max(1, valid.sum()))


def search_shards(shards: list[tuple[faiss.Index, np.ndarray]], queries: np.ndarray, k: int,
                  metric: str, exact_ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """In-process twin of the service: search every (index, ids) shard, merge exactly."""
    parts = [search_topk(index, ids, queries, k, metric, exact_ties=exact_ties)
             for index, ids in shards]
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k, metric)


def _tune_nprobe(shards, vectors, ids, metric: str, nlist: int, n_queries: int, seed: int
                 ) -> tuple[int, float, list[list[float]]]:
    """Smallest power-of-two nprobe whose recall@10 vs exact search reaches RECALL_TARGET.

    Queries are sampled database vectors with their own id removed from both answers (a query
    finding itself is trivial and would flatter small nprobe); what is left behaves like a fresh
    query from the same distribution. If recall plateaus below the target (PQ error dominates),
    take the smallest nprobe within 0.005 of the best recall seen."""
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))
    q, self_ids = vectors[rows], ids[rows][:, None]  # (b, d), (b, 1)
    k = min(10, len(vectors) - 1)
    if k < 1:
        return 1, 1.0, []

    def without_self(I: np.ndarray) -> np.ndarray:  # (b, k+1) -> (b, k): drop the query's id
        keep = I != self_ids
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(I, order, 1), -1)

    _, pos = exact_search(vectors, q, k + 1, metric)
    truth = without_self(ids[pos])  # (b, k)
    table: list[list[float]] = []
    nprobe = 1
    while True:
        for index, _ in shards:
            set_search_params(index, nprobe=nprobe)
        _, I = search_shards(shards, q, k + 1, metric, exact_ties=False)
        table.append([nprobe, round(recall_at_k(without_self(I), truth), 4)])
        plateau = len(table) >= 3 and table[-1][1] - table[-2][1] < 0.002
        if table[-1][1] >= RECALL_TARGET or plateau or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    best = max(r for _, r in table)
    good = [(p, r) for p, r in table if r >= RECALL_TARGET] or \
        [(p, r) for p, r in table if r >= best - 0.005]
    p, r = good[0]
    return int(p), float(r), table


def _ivf_lists(index: faiss.Index, vectors: np.ndarray, block: int = 65_536) -> np.ndarray | None:
    """Inverted list of every row, (n,) int64, as the trained `index` would assign it; None if
    `index` is not an IVF (possibly behind vector transforms such as OPQ or PCA)."""
    top, chain = faiss.downcast_index(index), []
    if isinstance(top, faiss.IndexPreTransform):
        chain = [top.chain.at(i) for i in range(top.chain.size())]
        top = faiss.downcast_index(top.index)
    if not isinstance(top, faiss.IndexIVF):
        return None
    out = np.empty(len(vectors), np.int64)
    for s in range(0, len(vectors), block):
        x = vectors[s: s + block]
        for vt in chain:
            x = vt.apply(x)
        out[s: s + block] = top.quantizer.assign(x, 1)[:, 0]
    return out


def shard_rows(index: faiss.Index, vectors: np.ndarray, num_shards: int
               ) -> tuple[list[np.ndarray], str]:
    """Which rows go to which shard: (row indices per shard, "ivf_lists" | "rows").

    IVF: whole inverted lists are dealt out (largest first, to the lightest shard), so a query's
    probed lists are split between the shards instead of being visited by each of them. IVF-PQ
    computes lookup tables per probed list: with row-split shards every shard redoes them
    (measured, 200k x 384, IVF1024,PQ192: 1.36x the CPU of one index for 2 row shards, 0.87x
    for 2 list shards). Results are identical either way. Other indexes, or lists too few or
    too uneven to balance: contiguous row ranges."""
    n = len(vectors)
    lists = _ivf_lists(index, vectors) if num_shards > 1 else None
    if lists is not None:
        sizes = np.bincount(lists)
        owner, load = np.zeros(len(sizes), np.int64), np.zeros(num_shards, np.int64)
        for lst in np.argsort(-sizes, kind="stable"):  # LPT: biggest list to the lightest shard
            s = int(np.argmin(load))
            owner[lst], load[s] = s, load[s] + sizes[lst]
        if load.min() > 0 and load.max() <= 1.25 * n / num_shards:
            return [np.flatnonzero(owner[lists] == s) for s in range(num_shards)], "ivf_lists"
    bounds = np.linspace(0, n, num_shards + 1).astype(np.int64)
    return [np.arange(bounds[s], bounds[s + 1]) for s in range(num_shards)], "rows"


# ---------------------------------------------------------------------------------------------
# build


def build_index(vectors: np.ndarray, ids: np.ndarray, out_dir: str | Path, cfg: IndexConfig,
                embedding_model: str, chunk_store: str = "", version: int = 1) -> Manifest:
    """Train once, fill `cfg.shards` shards, write them + manifest atomically.

    Shards get whole IVF lists when the index has them, else contiguous row ranges (see
    `shard_rows`); `shard_{i}.ids.npy` maps each shard's rows back to chunk ids.

    vectors: (n, d) float32 embeddings; ids: (n,) int64 chunk ids (unique, >= 0). The finished
    directory replaces `out_dir` in one rename (an old index there is removed afterwards).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise IndexBuildError(f"vectors must be a non-empty (n, d) array, got shape "
                              f"{vectors.shape}")
    n, dim = vectors.shape
    if ids.shape != (n,):
        raise IndexBuildError(f"ids shape {ids.shape} does not match {n} vectors")
    if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or len(np.unique(ids)) != n:
        raise IndexBuildError("ids must be unique non-negative integers")
    if not np.isfinite(vectors).all():
        raise IndexBuildError("vectors contain NaN or inf")
    ids = ids.astype(np.int64)
    metric = cfg.metric

    n_train = min(n, cfg.train_size)
    factory = resolve_factory(cfg.factory, n, dim, n_train=n_train)
    empty = new_index(factory, dim, metric, requested=cfg.factory)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    trained_here = not empty.is_trained
    if trained_here:  # train ONCE; every shard clones this quantizer
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, n_train, replace=False))
        log.info("training %s on %d of %d vectors", factory, n_train, n)
        try:
            empty.train(vectors[sample])
        except RuntimeError as e:
            raise IndexBuildError(f"training {factory!r} failed: {_faiss_message(e)}") from None
    timings["train_s"] = round(time.perf_counter() - t0, 3)

    num_shards = min(cfg.shards, n)
    if num_shards < cfg.shards:
        log.warning("only %d vectors: building %d shards instead of %d", n, n, cfg.shards)
    t0 = time.perf_counter()
    rows, split = shard_rows(empty, vectors, num_shards)
    shards: list[tuple[faiss.Index, np.ndarray]] = []
    for s in tqdm(range(num_shards), desc=f"index shards ({factory})", unit="shard"):
        index = faiss.clone_index(empty)
        index.add(vectors[rows[s]])
        shards.append((index, ids[rows[s]]))
    timings["add_s"] = round(time.perf_counter() - t0, 3)

    nlist = index_nlist(empty)
    extra: dict[str, Any] = {"nlist": nlist, "train_size": n_train if trained_here else 0,
                             "shard_split": split, "timings": timings}
    nprobe = 0
    if nlist:
        if cfg.nprobe > 0:
            nprobe = min(cfg.nprobe, nlist)
        else:
            t0 = time.perf_counter()
            nprobe, recall, table = _tune_nprobe(shards, vectors, ids, metric, nlist,
                                                 cfg.recall_queries, cfg.seed)
            timings["tune_s"] = round(time.perf_counter() - t0, 3)
            extra.update(nprobe_auto=True, recall_at_10=recall, nprobe_recall=table)
            log.info("auto nprobe=%d of %d lists (recall@10 %.3f)", nprobe, nlist, recall)
    for index, _ in shards:
        set_search_params(index, nprobe=nprobe, ef_search=cfg.ef_search)

    # write everything into a fresh sibling directory, then swap it in with a rename
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries = []
        for s, (index, shard_ids) in enumerate(shards):
            entry = {"file": f"shard_{s}.faiss", "ids": f"shard_{s}.ids.npy",
                     "size": int(index.ntotal)}
            faiss.write_index(index, str(tmp / entry["file"]))
            np.save(tmp / entry["ids"], shard_ids)
            entries.append(entry)
        manifest = Manifest(
            version=int(version), factory=factory, factory_requested=cfg.factory, metric=metric,
            dim=int(dim), embedding_model=embedding_model, ntotal=int(n), nprobe=int(nprobe),
            ef_search=int(cfg.ef_search), chunk_store=chunk_store, shards=entries,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), extra=extra)
        (tmp / MANIFEST).write_text(manifest.to_json())
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp`: two renames (never a half-written index), then clean up."""
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise IndexBuildError(f"{out_dir} exists and is not a directory")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
