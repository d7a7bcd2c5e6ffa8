"""FAISS shards on disk: factory resolution and clamping, exact merge, recall, manifest, errors.

Real FAISS indexes over realistic vectors: a seeded Gaussian mixture of L2-normalised 384-d
vectors whose within-cluster spread decays like a real embedding spectrum. Chunk ids are not
row numbers (`arange(n) * 3 + 7`) so that every test also checks the row -> id mapping.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from ratray.config import IndexConfig
from ratray.eval.metrics import recall_at_k
from ratray.index.build import build_index
from ratray.index.factory import IndexBuildError, resolve_factory
from ratray.index.search import (coarse_assign, exact_search, merge_topk, plain_ivfpq, search_shards,
                                 search_topk)
from ratray.index.store import Manifest, load_manifest, load_shard

import faiss  # noqa: E402  (after ratray.index, which sets OMP_WAIT_POLICY first)

DIM = 384


def mixture(n: int, dim: int = DIM, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors: cluster centre + anisotropic noise (spectrum ~ i^-1/2).

    Calibrated against real MiniLM embeddings of stdlib chunks: ~50% of the variance in the top
    50 directions (real: 57%), and IVF/PQ recall slightly *worse* than on the real vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = np.arange(1, dim + 1) ** -0.5
    scale /= np.linalg.norm(scale)
    x = centres[rng.integers(0, clusters, n)] + (rng.standard_normal((n, dim)) * scale) @ rot.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def chunk_ids(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 3 + 7


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Reference top-k in numpy: distances in float64, reported (and so ordered) as float32;
    equal float32 distances ordered by chunk id."""
    v = vectors.astype(np.float64)
    D, I = [], []
    for q in queries.astype(np.float64):
        key = ((v - q) ** 2).sum(-1) if metric == "l2" else -(v * q).sum(-1)  # (n,)
        key = key.astype(np.float32)
        order = np.lexsort((ids, key))[:k]
        D.append(key[order] if metric == "l2" else -key[order])
        I.append(ids[order])
    return np.array(D), np.array(I)


@pytest.fixture(scope="module")
def data():
    x = mixture(6_200)
    return x[:6_000], chunk_ids(6_000), x[6_000:]  # database, ids, held-out queries


# ---------------------------------------------------------------------------------------------
# factory strings


def test_auto_factory_scales_with_corpus_size():
    assert resolve_factory("auto", 5_000, DIM) == "Flat"
    mid = resolve_factory("auto", 300_000, DIM, n_train=50_000)
    nlist = int(mid.split(",")[0][3:])
    assert mid.endswith(",Flat") and nlist * 39 <= 50_000 and nlist > 100
    big = resolve_factory("auto", 5_000_000, DIM, n_train=50_000)
    assert big.startswith("IVF") and ",PQ" in big
    m = int(big.split("PQ")[1])
    assert DIM % m == 0 and m == DIM // 2


def test_oversized_templates_are_clamped(caplog):
    with caplog.at_level(logging.WARNING, logger="ratray.index.factory"):
        assert resolve_factory("IVF65536,Flat", 10_000, DIM) == "IVF256,Flat"
    assert "IVF65536" in caplog.text
    assert resolve_factory("IVF16,PQ48", 3_000, DIM) == "IVF16,PQ48x6"  # 3000/39 -> 76 codes
    assert resolve_factory("OPQ16,IVF4096,PQ16", 20_000, DIM) == "OPQ16,IVF512,PQ16"
    assert resolve_factory("IVF64,PQ16x4fs", 20_000, DIM) == "IVF64,PQ16x4fs"  # untouched
    assert resolve_factory("HNSW32", 10, DIM) == "HNSW32"


def test_clamped_template_builds_on_a_small_corpus(tmp_path):
    x = mixture(10_000, seed=3)
    cfg = IndexConfig(factory="IVF65536,Flat", shards=2, recall_queries=50)
    m = build_index(x, chunk_ids(10_000), tmp_path / "idx", cfg, embedding_model="test")
    assert (m.factory_requested, m.factory) == ("IVF65536,Flat", "IVF256,Flat")
    assert m.ntotal == 10_000 and 1 <= m.nprobe <= 256
    assert m.extra["recall_at_10"] >= 0.9


def test_auto_on_10k_builds(tmp_path):
    x = mixture(10_000, seed=4)
    m = build_index(x, chunk_ids(10_000), tmp_path / "idx", IndexConfig(shards=2), "test")
    assert m.factory_requested == "auto" and m.factory == "Flat" and m.ntotal == 10_000


@pytest.mark.parametrize("factory, needle", [("IVF10,Bogus", "Bogus"), ("IVF16,PQ50", "multiple"),
                                              ("NotAnIndex", "NotAnIndex")])
def test_bad_factory_is_a_clear_one_line_error(tmp_path, data, factory, needle):
    x, ids, _ = data
    with pytest.raises(IndexBuildError) as e:
        build_index(x[:500], ids[:500], tmp_path / "idx", IndexConfig(factory=factory), "test")
    msg = str(e.value)
    assert factory in msg and needle in msg and "\n" not in msg
    assert not (tmp_path / "idx").exists()


def test_bad_inputs_are_rejected(tmp_path, data):
    x, ids, _ = data
    cfg = IndexConfig(factory="Flat")
    with pytest.raises(IndexBuildError, match="ids shape"):
        build_index(x[:100], ids[:99], tmp_path / "a", cfg, "test")
    with pytest.raises(IndexBuildError, match="unique"):
        build_index(x[:100], np.zeros(100, np.int64), tmp_path / "a", cfg, "test")
    with pytest.raises(IndexBuildError, match="shape"):
        build_index(x[0], ids[:1], tmp_path / "a", cfg, "test")


# ---------------------------------------------------------------------------------------------
# build, manifest, load


def test_manifest_round_trips_and_names_plain_faiss_files(tmp_path, data):
    x, ids, _ = data
    out = tmp_path / "idx"
    m = build_index(x, ids, out, IndexConfig(factory="Flat", shards=3), "minilm", "store-key")
    assert Manifest.from_json(m.to_json()) == m == load_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert {"version", "factory", "factory_requested", "metric", "dim", "embedding_model", "ntotal",
            "nprobe", "ef_search", "chunk_store", "shards", "created"} <= raw.keys()
    assert (m.dim, m.ntotal, m.num_shards, m.chunk_store) == (DIM, 6_000, 3, "store-key")
    got_ids = []
    for s in m.shards:
        index = faiss.read_index(str(out / s["file"]))  # plain FAISS, no ratray needed
        assert index.ntotal == s["size"] and index.d == DIM
        got_ids.append(np.load(out / s["ids"]))
    assert np.array_equal(np.concatenate(got_ids), ids)  # contiguous shards, ids preserved
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in m.shards] + [s["ids"] for s in m.shards])


def test_rebuild_replaces_the_directory_atomically(tmp_path, data):
    x, ids, _ = data
    out = tmp_path / "idx"
    build_index(x, ids, out, IndexConfig(factory="Flat", shards=3), "test", version=1)
    m2 = build_index(x[:1000], ids[:1000], out, IndexConfig(factory="Flat", shards=2), "test",
                     version=2)
    assert load_manifest(out).version == 2 and m2.num_shards == 2
    assert not (out / "shard_2.faiss").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp or old dirs left over


def test_rebuild_in_place_gets_a_higher_version_than_the_index_it_replaces(tmp_path, data):
    # a shard restarted under a running service must be able to tell the new index from the old
    x, ids, _ = data
    out, cfg = tmp_path / "idx", IndexConfig(factory="Flat", shards=2)
    assert build_index(x[:500], ids[:500], out, cfg, "test").version == 1
    assert build_index(x[500:900], ids[500:900], out, cfg, "test").version == 2
    assert load_manifest(out).version == 2 and np.array_equal(
        np.sort(np.concatenate([np.load(out / s["ids"]) for s in load_manifest(out).shards])),
        np.sort(ids[500:900]))
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp or old dirs left over


def test_missing_or_corrupt_files_name_the_file(tmp_path, data):
    x, ids, _ = data
    with pytest.raises(IndexBuildError, match="manifest.json"):
        load_manifest(tmp_path / "nowhere")
    out = tmp_path / "idx"
    m = build_index(x[:300], ids[:300], out, IndexConfig(factory="Flat", shards=2), "test")
    (out / "shard_1.faiss").write_bytes(b"not an index")
    with pytest.raises(IndexBuildError, match="shard_1.faiss"):
        load_shard(out, 1, m)
    (out / "shard_0.ids.npy").unlink()
    with pytest.raises(IndexBuildError, match="shard_0.ids.npy"):
        load_shard(out, 0, m)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IndexBuildError, match="corrupt"):
        load_manifest(out)


# ---------------------------------------------------------------------------------------------
# search quality


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sharded_flat_equals_brute_force(tmp_path, data, metric):
    x, ids, q = data
    m = build_index(x, ids, tmp_path / "idx", IndexConfig(factory="Flat", shards=3, metric=metric),
                    "test")
    shards = [load_shard(tmp_path / "idx", i, m) for i in range(3)]
    D, I = search_shards(shards, q, 10, metric)
    D_ref, I_ref = brute_force(x, ids, q, 10, metric)
    assert np.array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-6)


def test_merge_breaks_ties_by_chunk_id_and_puts_padding_last():
    # two shards, exact ties across and within them, FAISS padding (-1) mixed in
    D0 = np.array([[0.5, 0.5, 0.9], [1.0, 2.0, np.inf]], np.float32)
    I0 = np.array([[42, 11, 3], [5, 6, -1]])
    D1 = np.array([[0.5, 0.1], [1.0, 1.0]], np.float32)
    I1 = np.array([[7, 99], [4, 2]])
    D, I = merge_topk([D0, D1], [I0, I1], 4, "l2")
    assert I.tolist() == [[99, 7, 11, 42], [2, 4, 5, 6]]
    # the same, shard order swapped: identical answer
    assert np.array_equal(merge_topk([D1, D0], [I1, I0], 4, "l2")[1], I)
    # inner product: larger is better; padding is still last, slots beyond the data are -1
    D, I = merge_topk([np.array([[0.2, 0.7, -np.inf]])], [np.array([[8, 9, -1]])], 4, "ip")
    assert I.tolist() == [[9, 8, -1, -1]] and D[0, 0] == np.float32(0.7) and np.isneginf(D[0, 3])


def test_duplicate_vectors_come_back_in_chunk_id_order(tmp_path, data):
    """Exact ties inside a shard: FAISS's BLAS noise must not decide their order."""
    x, ids, q = data
    dup = np.concatenate([x[:2000], np.repeat(x[:5], 6, axis=0)])  # 6 copies of 5 vectors
    dup_ids = np.random.default_rng(0).permutation(len(dup)).astype(np.int64) * 2 + 1
    m = build_index(dup, dup_ids, tmp_path / "idx", IndexConfig(factory="Flat", shards=2), "test")
    shards = [load_shard(tmp_path / "idx", i, m) for i in range(2)]
    _, I_ref = brute_force(dup, dup_ids, x[:5], 10, "l2")
    _, I_batch = search_shards(shards, np.concatenate([x[:5], q]), 10, "l2")
    _, I_one = search_shards(shards, x[2:3], 10, "l2")
    assert np.array_equal(I_batch[:5], I_ref) and np.array_equal(I_one[0], I_ref[2])
    copies = dup_ids[np.flatnonzero((dup == x[2]).all(1))]
    assert I_ref[2, :7].tolist() == sorted(copies.tolist())


def test_ivfpq_recall_with_auto_nprobe(tmp_path):
    """The auto template for big corpora (IVF{nlist},PQ{dim/2}), clamped to this corpus."""
    x = mixture(12_300, seed=1)
    db, q, ids = x[:12_000], x[12_000:], chunk_ids(12_000)
    factory = resolve_factory("auto", 5_000_000, DIM, n_train=50_000)  # IVF1282,PQ192
    m = build_index(db, ids, tmp_path / "idx", IndexConfig(factory=factory, shards=2), "test")
    assert m.factory == f"IVF{12_000 // 39},PQ192" and m.nprobe >= 1
    shards = [load_shard(tmp_path / "idx", i, m) for i in range(2)]
    _, I = search_shards(shards, q, 10, "l2")
    _, pos = exact_search(db, q, 10, "l2")
    assert recall_at_k(I, ids[pos]) >= 0.9


def test_ivf_shards_hold_whole_lists_and_equal_one_index(tmp_path, data):
    x, ids, q = data
    one = build_index(x, ids, tmp_path / "one", IndexConfig(factory="IVF32,Flat", nprobe=4,
                                                            shards=1), "test")
    three = build_index(x, ids, tmp_path / "three", IndexConfig(factory="IVF32,Flat", nprobe=4,
                                                                shards=3), "test")
    assert three.extra["shard_split"] == "ivf_lists"
    shards = [load_shard(tmp_path / "three", i, three) for i in range(3)]
    used = np.array([[faiss.extract_index_ivf(ix).invlists.list_size(j) > 0 for j in range(32)]
                     for ix, _ in shards])  # (shards, lists)
    assert (used.sum(0) <= 1).all()  # every inverted list lives in one shard only
    assert sorted(np.concatenate([i for _, i in shards]).tolist()) == ids.tolist()
    D1, I1 = search_shards([load_shard(tmp_path / "one", 0, one)], q, 10, "l2")
    D3, I3 = search_shards(shards, q, 10, "l2")
    assert np.array_equal(I1, I3) and np.array_equal(D1, D3)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF64,Flat"])
def test_hnsw_and_ivf_flat_work(tmp_path, data, factory):
    x, ids, q = data
    m = build_index(x, ids, tmp_path / "idx", IndexConfig(factory=factory, shards=2, ef_search=64),
                    "test")
    shards = [load_shard(tmp_path / "idx", i, m) for i in range(2)]
    _, I = search_shards(shards, q, 10, "l2")
    _, pos = exact_search(x, q, 10, "l2")
    assert recall_at_k(I, ids[pos]) >= 0.9
    assert set(np.unique(I)) <= set(ids)


def test_recall_at_k_counts_found_true_neighbours():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx(6 / 8)


# ---------------------------------------------------------------------------------------------
# IVF-PQ: batch-independent distances without decoding (index._ivfpq_topk)


@pytest.fixture(scope="module")
def pq_data():
    x = mixture(10_200, seed=5)
    return x[:10_000], chunk_ids(10_000), x[10_000:]  # database, ids, held-out queries


def _pq_shards(tmp_path, x, ids, metric="l2", shards=2, name="pq", pq_tables="off"):
    m = build_index(x, ids, tmp_path / name, IndexConfig(factory="IVF64,PQ48", nprobe=8, shards=shards,
                                                          metric=metric, pq_tables=pq_tables), "test")
    assert m.factory == "IVF64,PQ48"
    return [load_shard(tmp_path / name, i, m) for i in range(m.num_shards)], m


@pytest.mark.parametrize("metric, pq_tables", [("l2", "off"), ("l2", "on"), ("ip", "off")])
def test_ivfpq_top_k_does_not_depend_on_batch_or_sharding(tmp_path, pq_data, metric, pq_tables):
    x, ids, q = pq_data
    two, m2 = _pq_shards(tmp_path, x, ids, metric, 2, "two", pq_tables)
    one, _ = _pq_shards(tmp_path, x, ids, metric, 1, "one", pq_tables)
    assert m2.extra["shard_split"] == "ivf_lists"
    D, I = search_shards(two, q, 10, metric)
    D1, I1 = search_shards(one, q, 10, metric)
    assert np.array_equal(I, I1) and np.array_equal(D, D1)  # bitwise: 2 list shards == 1 index
    # one query at a time (below the BLAS threshold: FAISS's other distance code) and odd batches
    for part in (slice(0, 1), slice(1, 2), slice(5, 12), slice(12, 80)):
        Dp, Ip = search_shards(two, q[part], 10, metric)
        assert np.array_equal(Ip, I[part]) and np.array_equal(Dp, D[part])
    # split over 1 or 3 threads (the slices are searched on Python threads): the same answer
    threads = faiss.omp_get_max_threads()
    try:
        for t in (1, 3):
            faiss.omp_set_num_threads(t)
            Dt, It = search_shards(two, q, 10, metric)
            assert np.array_equal(It, I) and np.array_equal(Dt, D)
    finally:
        faiss.omp_set_num_threads(threads)
    # row-split shards (each holds part of every list, at other positions in it) agree too
    trained = faiss.clone_index(faiss.downcast_index(one[0][0]))
    trained.reset()
    halves = []
    for rows in (np.arange(0, 4_000), np.arange(4_000, 10_000)):
        part = faiss.clone_index(trained)
        part.add(x[rows])
        halves.append((part, ids[rows]))
    Dr, Ir = search_shards(halves, q, 10, metric)
    assert np.array_equal(Ir, I) and np.array_equal(Dr, D)


def test_pq_lookup_tables_are_timed_at_build_and_applied_at_load(tmp_path, pq_data):
    """index.pq_tables=auto times IVF-PQ search with and without precomputed lookup tables, records
    both and the choice in the manifest, and every load applies it; off frees the tables (nlist x
    M x 256 floats per shard); on and off find the same neighbours."""
    x, ids, q = pq_data
    auto, m = _pq_shards(tmp_path, x, ids, pq_tables="auto", name="auto")
    choice = m.extra["pq_tables_choice"]
    assert choice["search_ms_with_tables"] > 0 and choice["search_ms_without_tables"] > 0
    assert m.extra["pq_tables"] == (choice["search_ms_with_tables"] < choice["search_ms_without_tables"])
    for index, _ in auto:
        assert faiss.downcast_index(index).use_precomputed_table == (1 if m.extra["pq_tables"] else -1)
    off, m_off = _pq_shards(tmp_path, x, ids, pq_tables="off", name="off")
    on, m_on = _pq_shards(tmp_path, x, ids, pq_tables="on", name="on")
    assert m_off.extra["pq_tables"] is False and m_on.extra["pq_tables"] is True
    for (i_off, _), (i_on, _) in zip(off, on):
        ivf_off, ivf_on = faiss.downcast_index(i_off), faiss.downcast_index(i_on)
        assert ivf_off.use_precomputed_table == -1 and ivf_off.precomputed_table.size() == 0
        assert ivf_on.use_precomputed_table == 1 and ivf_on.precomputed_table.size() == 64 * 48 * 256
    _, I_off = search_shards(off, q, 10, "l2")
    _, I_on = search_shards(on, q, 10, "l2")
    assert (I_off == I_on).mean() > 0.99  # the same codes; float sums differ only in the last bits


def test_faiss_blas_runs_this_cpus_kernels():
    """faiss-cpu's bundled OpenBLAS predates this CPU and would fall back to SSE3 kernels;
    ratray.index sets OPENBLAS_CORETYPE from /proc/cpuinfo before faiss loads, unless the user
    (or the machine: this one presets Haswell) set it."""
    from ratray.index import openblas_coretype

    assert openblas_coretype("flags\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd\n") == "SkylakeX"
    assert openblas_coretype("flags\t: fpu sse2 avx avx2 fma\n") == "Haswell"
    assert openblas_coretype("flags\t: fpu sse2 sse4_2\n") is None
    want = openblas_coretype()
    if want is None:
        pytest.skip("CPU without AVX2: OpenBLAS's own detection stands")

    def faiss_blas(env: dict) -> set[str]:  # a fresh process: OpenBLAS reads it when it loads
        code = ("import ratray.index, faiss; from threadpoolctl import threadpool_info; "
                "print(sorted({i['architecture'] for i in threadpool_info() "
                "if i.get('internal_api') == 'openblas' and 'faiss' in i['filepath']}))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=120).stdout
        return set(ast.literal_eval(out.strip().splitlines()[-1]))

    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    assert faiss_blas(base) == {want}  # chosen from /proc/cpuinfo when the user set nothing
    assert faiss_blas({**base, "OPENBLAS_CORETYPE": "Haswell"}) == {"Haswell"}  # a user's stands


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivfpq_fast_path_equals_rescoring_the_decoded_vectors(tmp_path, pq_data, metric):
    """Without near-ties, FAISS's table distances give the same top-k as re-scoring every
    candidate against its decoded vector (the generic path, fed the decoded vectors)."""
    x, ids, q = pq_data
    shards, _ = _pq_shards(tmp_path, x, ids, metric)
    for index, shard_ids in shards:
        assert plain_ivfpq(index, metric) is not None  # the no-decoding path is taken
        decoded = index.reconstruct_n(0, index.ntotal)  # (n_s, d)
        D, I = search_topk(index, shard_ids, q, 10, metric)
        D_dec, I_dec = search_topk(index, shard_ids, q, 10, metric, vectors=decoded)
        assert np.array_equal(I, I_dec)
        np.testing.assert_allclose(D, D_dec, rtol=1e-5, atol=1e-5)


def test_ivfpq_duplicates_come_back_in_chunk_id_order(tmp_path, pq_data):
    """12 copies of a vector share one code in one list: an exact tie wider than k + 1."""
    x, _, q = pq_data
    dup = np.concatenate([x, np.repeat(x[:3], 12, axis=0)])
    dup_ids = np.random.default_rng(1).permutation(len(dup)).astype(np.int64) * 2 + 1
    shards, _ = _pq_shards(tmp_path, dup, dup_ids)
    D, I = search_shards(shards, np.concatenate([x[:3], q]), 10, "l2")
    D40, I40 = search_shards(shards, np.concatenate([x[:3], q]), 40, "l2")
    assert np.array_equal(I, I40[:, :10]) and np.array_equal(D, D40[:, :10])
    for j in range(3):  # each copied vector finds its 13 copies first, smallest chunk ids first
        copies = np.sort(dup_ids[np.flatnonzero((dup == x[j]).all(1))])
        assert len(copies) == 13 and I[j].tolist() == copies[:10].tolist()
        assert (D[j] == D[j, 0]).all() and (D40[j, :13] == D[j, 0]).all()
    for Dr, Ir in zip(D40, I40):  # within every run of equal distances, ids ascend
        same = np.diff(Dr) == 0
        assert (np.diff(Ir)[same] > 0).all()


def test_only_plain_ivfpq_takes_the_no_decoding_path():
    d, x = 32, mixture(1_000, dim=32)
    for factory, plain in (("IVF8,PQ8x4", True), ("OPQ8,IVF8,PQ8x4", False), ("IVF8,Flat", False),
                           ("IVF8,PQ8x4fs", False), ("Flat", False)):
        index = faiss.index_factory(d, factory)
        index.train(x)
        assert (plain_ivfpq(index, "l2") is not None) == plain, factory
        assert plain_ivfpq(index, "ip") is None  # not the index's metric
    assert plain_ivfpq(faiss.index_factory(d, "IVF8,PQ8x4"), "l2") is None  # untrained


def test_coarse_ties_go_to_the_smaller_list_number():
    """Eight identical centroids, nprobe 2: the probed lists are the two smallest numbers among
    them, whatever the batch (the candidate window has to widen past the tie)."""
    rng = np.random.default_rng(0)
    d = 32
    cents = rng.standard_normal((40, d)).astype(np.float32)
    twins = [3, 7, 12, 20, 21, 30, 33, 39]
    cents[twins] = cents[3]
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(cents)
    ivf = faiss.IndexIVFPQ(quantizer, d, 40, 8, 8)
    ivf.train(rng.standard_normal((3_000, d)).astype(np.float32))
    ivf.nprobe = 2
    q = cents[3] + 1e-3 * rng.standard_normal((40, d)).astype(np.float32)
    lists, dists = coarse_assign(ivf, q, "l2")
    assert lists.tolist() == [[3, 7]] * 40 and (dists[:, 0] == dists[:, 1]).all()
    for i in (0, 17):  # one at a time: FAISS's non-BLAS quantizer search, same answer
        assert np.array_equal(coarse_assign(ivf, q[i: i + 1], "l2")[0], lists[i: i + 1])


def test_a_reused_index_takes_new_search_settings_into_its_manifest(tmp_path):
    from ratray.build import apply_search_settings
    from ratray.index.build import build_settings

    x = mixture(4_000, seed=11)
    cfg = IndexConfig(factory="IVF32,Flat", nprobe=2, shards=2)
    m = build_index(x, chunk_ids(4_000), tmp_path / "idx", cfg, "test")
    assert m.nprobe == 2 and m.extra["build_settings"] == build_settings(cfg)
    changed = apply_search_settings(tmp_path / "idx", m, IndexConfig(factory="IVF32,Flat", nprobe=8))
    assert changed == ["nprobe"]
    on_disk = load_manifest(tmp_path / "idx")
    assert on_disk.nprobe == 8
    index, _ = load_shard(tmp_path / "idx", 0, on_disk)
    assert faiss.extract_index_ivf(index).nprobe == 8  # what a shard actor serves with
    # nprobe 0 (auto) keeps what the build tuned; over nlist is capped
    assert apply_search_settings(tmp_path / "idx", on_disk, IndexConfig(nprobe=0)) == []
    apply_search_settings(tmp_path / "idx", on_disk, IndexConfig(nprobe=1000))
    assert load_manifest(tmp_path / "idx").nprobe == 32
    # build-time settings differ: a reuse check sees it
    assert build_settings(IndexConfig(train_size=10)) != build_settings(IndexConfig())
    assert build_settings(IndexConfig(seed=1)) != build_settings(IndexConfig())
    assert build_settings(IndexConfig(nprobe=9, ef_search=7)) == build_settings(IndexConfig())
