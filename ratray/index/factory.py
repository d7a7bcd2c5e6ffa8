"""FAISS set-up and factory strings: which index a corpus of n vectors gets, and how it is searched.

Knows nothing of files (`store.py`), search kernels (`search.py`) or Ray (`service.py`).
"""
from __future__ import annotations

import logging
import math
import re

import faiss  # after ratray/index/__init__.py has set OMP_WAIT_POLICY

log = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid
BLAS_THRESHOLD = 16  # faiss-cpu default 20 queries *and* nq*d >= 128k: small batches ~17x slower
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


def residual_ivfpq(index: faiss.Index):
    """The IndexIVFPQ inside `index` whose L2 search can use precomputed lookup tables (by
    residual, L2), else None."""
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.by_residual and ivf.metric_type == faiss.METRIC_L2:
        return ivf
    return None


def set_pq_tables(index: faiss.Index, on: bool) -> None:
    """IVF-PQ lookup tables: precomputed per list (nlist x M x 256 floats, streamed from memory at
    every probe) or computed per probe from the query's residual; no-op for other indexes.
    Which is faster depends on M, the cores and memory bandwidth: the build times both."""
    ivf = residual_ivfpq(index)
    if ivf is None:
        return
    ivf.use_precomputed_table = 1 if on else -1
    ivf.precompute_table()  # builds the tables, or (-1) frees them


def faiss_metric(metric: str) -> int:
    if metric == "l2":
        return faiss.METRIC_L2
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    raise IndexBuildError(f"metric must be 'l2' or 'ip', got {metric!r}")


def faiss_message(e: Exception) -> str:
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
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        shown = f"{requested!r} (resolved to {factory!r})" if requested not in (None, factory) \
            else repr(factory)
        raise IndexBuildError(f"bad FAISS factory string {shown} for dim {dim}: "
                              f"{faiss_message(e)}") from None
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

