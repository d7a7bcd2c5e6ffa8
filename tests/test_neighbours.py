"""RETRO neighbours: the leakage filter, [N, F] tokens, and precomputed == online retrieval."""
import numpy as np
import pytest

from ratray.config import ServiceConfig
from ratray.data.store import ChunkStore
from ratray.index.filtered import DocCodes, filter_candidates
from ratray.index.search import exact_search
from ratray.index.service import ShardedIndex
from ratray.retro.neighbours import (ChunkVectors, NeighbourFetcher, ensure_chunk_vectors, excluded_docs,
                                     precompute_neighbours, sequence_layout)
from ratray.workdir import Workdir

L = 4  # chunks per sequence
K = 2


@pytest.fixture(scope="module")
def env(small_workdir):
    wd, cfg, summary = small_workdir
    store = ChunkStore.open(summary["chunk_store"]["path"])
    w = Workdir(wd)
    vec_path = ensure_chunk_vectors(store, cfg.embed, w.embeddings, w.vectors, progress=False)
    index = ShardedIndex.launch(str(w.index), ServiceConfig(name="nbr-test", namespace="ratray-tests"))
    yield store, index, ChunkVectors(vec_path)
    index.shutdown()


def test_sequences_keep_every_chunk_in_order(env):
    store, _, _ = env
    lay = sequence_layout(store, "train", L)
    flat = lay.reshape(-1)
    assert np.array_equal(flat[flat >= 0], store.split_ids("train"))
    assert (flat[: len(store.split_ids("train"))] >= 0).all()  # padding only at the very end


def test_filter_drops_every_document_of_the_sequence(env):
    store, _, _ = env
    docs = DocCodes(store)
    firsts = np.flatnonzero(np.r_[True, np.diff(docs.of_chunk) != 0])[:6]  # one chunk per document
    cand = np.stack([firsts, firsts[::-1]])
    exclude = np.array([[docs.of_chunk[firsts[0]], docs.of_chunk[firsts[3]], -1]] * 2)
    ids, d, short = filter_candidates(cand, np.tile(np.arange(6, dtype=np.float32), (2, 1)), exclude, docs, 3)
    for row in range(2):
        kept = [c for c in cand[row] if docs.of_chunk[c] not in exclude[row]][:3]
        assert ids[row].tolist() == kept and not short[row]
    ids, d, short = filter_candidates(cand, np.tile(np.arange(6, dtype=np.float32), (2, 1)), exclude, docs, 5)
    assert short.all() and (ids[:, 4] == -1).all() and np.isinf(d[:, 4]).all()  # only 4 admissible


def test_precomputed_neighbours_obey_the_leakage_filter_and_are_exact(env):
    store, index, vectors = env
    tab = precompute_neighbours(store, index, "train", L, K, vectors, progress=False)
    docs = DocCodes(store)
    seq_docs = docs.of(tab.layout)  # (s, l)
    nbr_docs = docs.of(tab.ids)  # (s, l, k)
    live = tab.layout >= 0
    assert (tab.ids[live] >= 0).all()
    assert not (nbr_docs[:, :, :, None] == seq_docs[:, None, None, :]).any(-1)[live].any()
    # the kept neighbours are exactly the nearest admissible ones (brute force over the database)
    db = store.split_ids("train")
    q_rows = np.flatnonzero(live.reshape(-1))[:40]
    q = vectors[tab.layout.reshape(-1)[q_rows]]
    _, pos = exact_search(vectors[db], q, len(db), "l2")
    excl = excluded_docs(tab.layout, docs)[q_rows]
    for j, r in enumerate(q_rows):
        admissible = [c for c in db[pos[j]] if docs.of_chunk[c] not in excl[j]][:K]
        assert tab.ids.reshape(-1, K)[r].tolist() == admissible
    # reused on a second call
    assert precompute_neighbours(store, index, "train", L, K, vectors, progress=False).reused


def test_online_neighbours_equal_precomputed(env):
    store, index, vectors = env
    tab = precompute_neighbours(store, index, "train", L, K, vectors, progress=False)
    fetcher = NeighbourFetcher(store, index, tab.layout, K, vectors)
    seqs = np.arange(len(tab.layout))
    pending = [fetcher.request(seqs[i: i + 5]) for i in range(0, len(seqs), 5)]  # all in flight
    online = np.concatenate([p.result()[0] for p in pending])
    assert np.array_equal(online, tab.ids)


def test_neighbour_values_are_chunk_plus_continuation(env):
    store, _, _ = env
    m = store.chunk_tokens
    db = store.split_ids("train")
    with_next = db[store.continuation(db) >= 0][:3]
    last = db[store.continuation(db) < 0][:1]
    toks = store.with_continuation(np.concatenate([with_next, last, [-1]]))
    assert np.array_equal(toks[0, :m], store.tokens(with_next[:1])[0])
    assert np.array_equal(toks[0, m:], store.tokens(store.continuation(with_next[:1]))[0])
    pad = store.tokenizer.pad_id
    assert (toks[3, m:] == pad).all()  # a document's last chunk has no continuation
    assert (toks[4] == pad).all()  # no neighbour at all


def test_widening_searches_are_counted_and_still_exact(env):
    """A first request too small for the filter (here: handed in, 4 candidates while excluding all
    database documents but one) leaves rows short: search_filtered widens synchronously, counts it
    in `stats`, and still returns the nearest admissible chunks."""
    from ratray.index.filtered import DocCodes, search_filtered

    store, index, vectors = env
    docs = DocCodes(store)
    db = store.split_ids("train")
    codes = np.unique(docs.of_chunk[db])
    keep = codes[-1]  # every database document but one excluded
    q = vectors[db[:4]]
    exclude = np.tile(codes[codes != keep], (len(q), 1))
    stats: dict = {}
    ids, _ = search_filtered(index, q, exclude, docs, 2, first=index.search(q, 4), stats=stats)
    assert stats["widen_searches"] >= 1 and stats["widened_rows"] >= len(q)
    admissible = db[docs.of_chunk[db] == keep]
    _, pos = exact_search(vectors[db], q, len(db), "l2")
    for j in range(len(q)):
        assert ids[j].tolist() == [c for c in db[pos[j]] if c in set(admissible)][:2]


def test_first_request_covers_the_excluded_documents_chunks_so_no_widening(env):
    """The first request is sized from the chunk counts of each row's excluded documents (not their
    number): excluding a query's own many-chunk documents needs no second search, and the answer is
    still the exact admissible top-k."""
    from ratray.index.filtered import DocCodes, first_request, search_filtered

    store, index, vectors = env
    docs = DocCodes(store)
    db = store.split_ids("train")
    big = np.argsort(np.bincount(docs.of_chunk[db]))[::-1][:2]  # the database's two longest documents
    assert docs.chunks[big].min() > 4
    q = vectors[db[np.isin(docs.of_chunk[db], big)][:6]]  # queries from inside them
    exclude = np.tile(np.array([big[0], big[1], big[0], -1]), (len(q), 1))  # repeats and -1 ignored
    assert (docs.excluded_chunks(exclude) == docs.chunks[big].sum()).all()
    assert first_request(len(db), 2, docs.excluded_chunks(exclude)) == min(len(db), 4 + docs.chunks[big].sum())
    stats: dict = {}
    ids, _ = search_filtered(index, q, exclude, docs, 2, stats=stats)
    assert stats.get("widen_searches", 0) == 0
    admissible = set(db[~np.isin(docs.of_chunk[db], big)])
    _, pos = exact_search(vectors[db], q, len(db), "l2")
    for j in range(len(q)):
        assert ids[j].tolist() == [c for c in db[pos[j]] if c in admissible][:2]


def test_chunk_vectors_are_written_beside_another_writers_temp_file(env, small_workdir, tmp_path):
    # another run writing the same file at the same moment holds the temp name a fixed scheme
    # would pick (here a folder, so a collision fails loudly instead of by timing)
    from ratray.pretrained import model_id

    store, _, vectors = env
    _, cfg, _ = small_workdir
    w = Workdir(small_workdir[0])
    final = tmp_path / f"chunk-vectors-{store.key[:16]}-{model_id(cfg.embed.model)}.npy"
    final.with_suffix(".tmp.npy").mkdir()
    path = ensure_chunk_vectors(store, cfg.embed, w.embeddings, tmp_path, progress=False)
    assert path == final and np.array_equal(np.load(path), np.load(vectors.path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, final.name[:-4] + ".tmp.npy"])


def test_hybrid_neighbours_are_the_fused_lists_after_the_leakage_filter(env):
    """index.hybrid=rrf: each chunk's first candidates are the dense and BM25 lists of its text
    fused, then filtered like dense ones; the table is kept apart from the dense one; the mode
    needs precomputed retrieval."""
    from ratray.config import ConfigError, IndexConfig, load_config
    from ratray.index.filtered import first_request
    from ratray.retro.config import RetroJobConfig

    store, index, vectors = env
    cfg = IndexConfig(hybrid="rrf")
    dense = precompute_neighbours(store, index, "val", L, K, vectors, progress=False)
    tab = precompute_neighbours(store, index, "val", L, K, vectors, progress=False, hybrid=cfg)
    assert tab.path != dense.path and not tab.reused
    docs = DocCodes(store)
    live = tab.layout >= 0
    seq_docs = docs.of(tab.layout)
    assert not (docs.of(tab.ids)[:, :, :, None] == seq_docs[:, None, None, :]).any(-1)[live].any()
    flat = tab.layout.reshape(-1)
    rows = np.flatnonzero(flat >= 0)[:16]
    excl = excluded_docs(tab.layout, docs)[rows]
    q = vectors[flat[rows]]
    K0 = first_request(index.ntotal, K, docs.excluded_chunks(excl))
    fused = index.hybrid_search(q, store.texts(flat[rows]), K0, cfg)
    want, _, short = filter_candidates(fused.ids, fused.distances, excl, docs, K)
    got = tab.ids.reshape(-1, K)[rows]
    assert np.array_equal(got[~short], want[~short])
    assert not np.array_equal(tab.ids[live], dense.ids[live])  # BM25 changes some neighbours
    with pytest.raises(ConfigError, match="index.hybrid"):
        load_config(RetroJobConfig, None, ["index.hybrid=rrf", "train.retrieval=online"])
