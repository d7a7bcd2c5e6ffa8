"""BM25 keyword shards (ratray/index/keyword.py): exact sharded merge, swaps, fusion, updates.

The corpus is real text: pieces of stdlib modules. The reference is a brute-force BM25 computed
here over the whole (unsharded) corpus with numpy, and bm25s (an independent implementation of
the same Lucene formula) for the scores.
"""
from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import bm25s
import numpy as np
import pytest

from ratray.config import BuildConfig, ConfigError, IndexConfig, ServiceConfig, load_config
from ratray.index.build import build_index
from ratray.index.keyword import (B, K1, GlobalStats, KeywordIndexError, KeywordSearcher,
                                  KeywordShard, build_keyword_shards, fuse, keyword_topk,
                                  load_keyword, manifest_entry, tokenize, update_keyword_shard)
from ratray.index.service import ShardedIndex
from ratray.index.store import load_manifest, version_dir, write_current, write_manifest

NS = "ratray-keyword-tests"


def stdlib_pieces(n: int = 160) -> list[str]:
    """`n` real texts: consecutive 12-line pieces of a few stdlib modules."""
    import argparse
    import json.decoder
    import textwrap as tw

    lines = []
    for mod in (tw, json.decoder, argparse):
        lines += inspect.getsource(mod).splitlines()
    pieces = ["\n".join(lines[i: i + 12]) for i in range(0, len(lines), 12)]
    return [p for p in pieces if p.strip()][:n]


def brute_force_bm25(texts: list[str], ids: np.ndarray, queries: list[str], k: int):
    """One BM25 over all texts (no shards): (b, k) float32 scores and chunk ids, best first,
    equal scores by chunk id, only texts sharing a token with the query; -inf / -1 after."""
    docs = [tokenize(t) for t in texts]
    vocab = sorted({t for d in docs for t in d})
    col = {t: j for j, t in enumerate(vocab)}
    tf = np.zeros((len(docs), len(vocab)), np.float64)  # (n, V) term frequencies
    for r, d in enumerate(docs):
        for t in d:
            tf[r, col[t]] += 1
    dl = tf.sum(1)
    n, df = len(docs), (tf > 0).sum(0)
    norm = K1 * (1 - B + B * dl / (dl.sum() / n))
    S = np.full((len(queries), k), -np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    for q, text in enumerate(queries):
        acc, hit = np.zeros(n), np.zeros(n, bool)
        for t in sorted(set(tokenize(text))):
            if t in col:
                j = col[t]
                idf = float(np.log(1 + (n - df[j] + 0.5) / (df[j] + 0.5)))
                has = tf[:, j] > 0
                acc[has] += idf * (tf[has, j] / (tf[has, j] + norm[has]))
                hit |= has
        rows = np.flatnonzero(hit)
        sc = acc[rows].astype(np.float32)
        order = np.lexsort((ids[rows], -sc))[:k]
        S[q, :len(order)], I[q, :len(order)] = sc[order], ids[rows][order]
    return S, I


def sharded(texts, ids, cuts):
    shards = [KeywordShard.build(ids[a:b], texts[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    stats = GlobalStats.of(shards)
    return [KeywordSearcher(s, stats) for s in shards]


@pytest.fixture(scope="module")
def corpus():
    texts = stdlib_pieces()
    texts += [texts[5], texts[40]]  # exact duplicates under other ids: ties, in other shards
    rng = np.random.default_rng(0)
    ids = rng.choice(10_000, len(texts), replace=False).astype(np.int64)  # not in text order
    queries = ["parse the json object", "raw_decode", "wrap text width", "add_argument help",
               "ArgumentParser prefix_chars", "JSONDecodeError lineno colno", "the", "zzzqqq"]
    queries += [" ".join(tokenize(texts[i])[3:9]) for i in (5, 40, 77, 120)]  # fragments
    return texts, ids, queries


def test_tokenizer_keeps_identifiers_and_their_parts():
    toks = tokenize("def parse_header(self, HTTPConnection): return 0x7fff")
    assert toks[:3] == ["def", "parse_header", "parse"] and "header" in toks
    assert {"httpconnection", "http", "connection", "0x7fff"} <= set(toks)


def test_sharded_merge_equals_one_global_bm25(corpus):
    texts, ids, queries = corpus
    k = 15
    want_S, want_I = brute_force_bm25(texts, ids, queries, k)
    for cuts in ([0, len(texts)], [0, 50, 120, len(texts)], [0, 3, len(texts) - 1, len(texts)]):
        S, I = keyword_topk(sharded(texts, ids, cuts), queries, k)
        np.testing.assert_array_equal(I, want_I)  # ids and order, ties included
        np.testing.assert_allclose(S, want_S, rtol=1e-6)
    # the duplicated pieces tie exactly and come out by chunk id, whichever shard holds them
    for src, dup in ((5, len(texts) - 2), (40, len(texts) - 1)):
        row = list(want_I[queries.index(" ".join(tokenize(texts[src])[3:9]))])
        pos = [row.index(ids[src]), row.index(ids[dup])]
        assert abs(pos[0] - pos[1]) == 1 and row[min(pos)] == min(ids[src], ids[dup])
    assert (I[queries.index("zzzqqq")] == -1).all()  # no shared token: nothing ranked


def test_scores_match_bm25s_on_the_unsharded_corpus(corpus):
    texts, ids, queries = corpus
    ref = bm25s.BM25(method="lucene", k1=K1, b=B)
    ref.index([tokenize(t) for t in texts], show_progress=False)
    mine = sharded(texts, ids, [0, 60, len(texts)])
    for q in queries:
        want = ref.get_scores(sorted(set(tokenize(q))))  # (n,) in text order
        got = np.zeros(len(texts))
        for s in mine:
            rows, sc = s.scores(q)
            pos = np.searchsorted(np.sort(ids), s.shard.ids[rows])
            got[np.argsort(ids)[pos]] = sc
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_update_removes_and_adds_and_equals_a_fresh_build(corpus, tmp_path):
    texts, ids, queries = corpus
    src, dst = tmp_path / "v1", tmp_path / "v2"
    src.mkdir(), dst.mkdir()
    cuts = [0, 80, len(texts)]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        KeywordShard.build(ids[a:b], texts[a:b]).save(src / f"keyword_{i}.npz")
    new_text = "def frobnicate_widget_7731(x):\n    return x  # a brand new chunk"
    gone = ids[3]
    r0 = update_keyword_shard(src, dst, 0, add_ids=[20_000], add_texts=[new_text],
                              remove_ids=[gone, 999_999])
    r1 = update_keyword_shard(src, dst, 1)  # unchanged, copied into the new version
    assert (r0["added"], r0["removed"], r0["not_found"], r1["docs"]) == (1, 1, 1, len(texts) - 80)
    m = SimpleNamespace(extra={"keyword": r0["manifest_extra"]}, num_shards=2)  # a manifest's
    after = [load_keyword(dst, i, m) for i in range(2)]
    before = [load_keyword(src, i, m) for i in range(2)]
    q = ["frobnicate widget", " ".join(tokenize(texts[3])[2:10])]
    assert keyword_topk(before, q, 5)[1][0, 0] == -1
    S, I = keyword_topk(after, q, 5)
    assert I[0, 0] == 20_000 and gone not in I[1]
    # exact after the update: the same as shards built from scratch over the final corpus
    keep = np.flatnonzero(ids != gone)
    t2 = [texts[i] for i in keep[keep < 80]] + [new_text] + texts[80:]
    i2 = np.concatenate([ids[keep[keep < 80]], [20_000], ids[80:]])
    fresh = keyword_topk(sharded(t2, i2, [0, 80, len(t2)]), q + queries, 10)
    got = keyword_topk(after, q + queries, 10)
    np.testing.assert_array_equal(got[1], fresh[1])
    np.testing.assert_allclose(got[0], fresh[0], rtol=1e-6)
    with pytest.raises(KeywordIndexError, match=r"chunk ids \[20000\] are already in it"):
        update_keyword_shard(dst, tmp_path, 0, add_ids=[20_000], add_texts=["again"])
    with pytest.raises(KeywordIndexError, match="2 ids to add but 1 texts"):
        update_keyword_shard(src, dst, 0, add_ids=[1, 2], add_texts=["x"])


def test_fusion_ties_by_chunk_id_and_weights_move_the_order():
    cfg = IndexConfig(hybrid="rrf")
    dense_d = np.array([[0.1, 0.2, 0.3]], np.float32)  # l2: 7 best
    dense_i = np.array([[7, 3, 9]])
    kw_s = np.array([[5.0, 4.0, -np.inf]], np.float32)
    kw_i = np.array([[3, 7, -1]])
    S, I = fuse(dense_d, dense_i, "l2", kw_s, kw_i, 3, cfg)
    assert I.tolist() == [[3, 7, 9]]  # 3 and 7 tie (ranks 1 + 2 each): smaller id first
    assert S[0, 0] == S[0, 1]
    _, I = fuse(dense_d, dense_i, "l2", kw_s, kw_i, 3, IndexConfig(hybrid="rrf", hybrid_weight=0.9))
    assert I.tolist() == [[7, 3, 9]]
    _, I = fuse(dense_d, dense_i, "l2", kw_s, kw_i, 4, IndexConfig(hybrid="weighted"))
    assert I.tolist() == [[3, 7, 9, -1]]  # 3: 0.5*0.5 + 0.5*1; 7: 0.5*1 + 0.5*0; 9: 0


def test_bad_hybrid_settings_are_clear_errors():
    for bad, key in (("index.hybrid=bm25", "index.hybrid"), ("index.hybrid_weight=1.5",
                                                             "index.hybrid_weight"),
                     ("index.rrf_k=0", "index.rrf_k"), ("index.hybrid_depth=0", "index.hybrid_depth")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(BuildConfig, None, [bad])
    assert load_config(BuildConfig, None, ["index.hybrid=off"]).index.hybrid == "off"
    with pytest.raises(ConfigError, match="rrf|weighted"):
        fuse(np.zeros((1, 1)), np.zeros((1, 1), int), "l2", np.zeros((1, 1)),
             np.zeros((1, 1), int), 1, IndexConfig())


# ---------------------------------------------------------------------------------------------
# served by the shard actors


def _version(root, v, vectors, ids, texts, keyword=True):
    """versions/v{v}: a 2-shard Flat dense index + (keyword) BM25 shards of the same ids."""
    out = version_dir(root, v)
    m = build_index(vectors, ids, out, IndexConfig(factory="Flat", shards=2, metric="ip"), "t",
                    version=v)
    if keyword:
        by_id = dict(zip(ids.tolist(), texts))
        build_keyword_shards(out, lambda s: [by_id[int(i)] for i in s], m)
        m.extra["keyword"] = manifest_entry()
        write_manifest(out, m)
    return out


@pytest.fixture()
def served(ray_session, tmp_path, corpus):
    texts, ids, _ = corpus
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((len(texts), 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    _version(tmp_path, 1, vecs, ids, texts)
    write_current(tmp_path, version_dir(tmp_path, 1))
    index = ShardedIndex.launch(str(tmp_path), ServiceConfig(name=f"kw-{tmp_path.name}",
                                                             namespace=NS))
    yield index, tmp_path, vecs, ids, texts
    index.shutdown()


def test_service_keyword_search_equals_brute_force(served, corpus):
    index, _, _, ids, texts = served
    queries = corpus[2]
    res = index.keyword_search(queries, 10)
    want_S, want_I = brute_force_bm25(texts, ids, queries, 10)
    np.testing.assert_array_equal(res.ids, want_I)
    np.testing.assert_allclose(res.distances, want_S, rtol=1e-6)
    assert res.version == 1
    assert sum(i["keyword_size"] for i in index.info()) == len(ids)


def test_keyword_shards_swap_with_the_dense_ones(served):
    index, root, vecs, ids, texts = served
    new_text = "class QuuxRegistry_4417: a chunk only version 2 holds"
    v2 = version_dir(root, 2)  # as jobs/update_index writes it: the dense shards, then each
    m = build_index(np.vstack([vecs[1:], vecs[:1]]), np.append(ids[1:], 50_000), v2,  # keyword
                    IndexConfig(factory="Flat", shards=2, metric="ip"), "t", version=2,  # shard
                    extra_manifest={"keyword": manifest_entry()})  # updated from v1's
    for i, entry in enumerate(m.shards):
        mine = 50_000 in np.load(v2 / entry["ids"])
        update_keyword_shard(version_dir(root, 1), v2, i, [50_000] if mine else [],
                             [new_text] if mine else [], remove_ids=[ids[0]])
    assert index.keyword_search([texts[0]], 1).ids[0, 0] == ids[0]
    before = index.keyword_search(["quuxregistry_4417"], 3)
    assert before.version == 1 and before.ids[0, 0] == -1
    assert index.swap(v2) == 2
    after = index.keyword_search(["quuxregistry_4417"], 3)
    assert after.version == 2 and after.ids[0, 0] == 50_000
    assert index.search(vecs[:1], 2).version == 2
    pinned = index.keyword_search(["quuxregistry_4417"], 3, version=1)  # the previous, still held
    assert pinned.version == 1 and pinned.ids[0, 0] == -1
    assert ids[0] not in index.keyword_search([texts[0]], 10).ids[0]  # removed in v2


def test_hybrid_puts_a_chunk_found_only_by_keyword_into_the_top_k(served):
    index, _, vecs, ids, texts = served
    target = 77
    rare = next(t for t in tokenize(texts[target]) if "_" in t and
                sum(t in tokenize(x) for x in texts) == 1)
    # a query vector far from the target's: the dense top-k misses it
    q = -vecs[target: target + 1]
    k = 5
    dense = index.hybrid_search(q, [rare], k, IndexConfig(hybrid="off"))
    assert ids[target] not in dense.ids[0]
    for mode in ("rrf", "weighted"):
        res = index.hybrid_search(q, [rare], k, IndexConfig(hybrid=mode))
        assert ids[target] in res.ids[0] and res.version == 1
        assert len(set(res.ids[0]) & set(dense.ids[0])) >= k - 1  # the rest: the dense list


def test_an_index_without_keyword_shards_says_so(ray_session, tmp_path, corpus):
    texts, ids, _ = corpus
    vecs = np.random.default_rng(2).standard_normal((len(ids), 8)).astype(np.float32)
    _version(tmp_path, 1, vecs, ids, texts, keyword=False)
    write_current(tmp_path, version_dir(tmp_path, 1))
    index = ShardedIndex.launch(str(tmp_path), ServiceConfig(name=f"nokw-{tmp_path.name}",
                                                             namespace=NS))
    try:
        with pytest.raises(Exception, match="has no keyword shards"):
            index.keyword_search(["json"], 3)
    finally:
        index.shutdown()


def test_the_build_makes_keyword_shards_beside_the_dense_ones(small_workdir):
    import pyarrow.parquet as pq

    wd, cfg, summary = small_workdir
    path = wd / "index"
    m = load_manifest(path)
    assert m.extra["keyword"] == manifest_entry()
    searchers = [load_keyword(path, i, m) for i in range(m.num_shards)]
    for s, entry in zip(searchers, m.shards):  # same chunk ids per shard as the dense index
        np.testing.assert_array_equal(s.shard.ids, np.load(path / entry["ids"]))
    assert summary["index"]["keyword"]["docs"] == m.ntotal
    # a fragment of a database chunk finds that chunk
    store_dir = summary["chunk_store"]["path"]
    table = pq.read_table(f"{store_dir}/chunks.parquet", columns=["chunk_id", "text"])
    cid = int(searchers[1].shard.ids[0])
    text = table.column("text")[cid].as_py()
    _, I = keyword_topk(searchers, [" ".join(tokenize(text)[:12])], 10)
    assert cid in I[0]
    on_disk = json.loads((path / "summary.json").read_text())["index"]["keyword"]
    # the summary on disk is the last build's: this one's counts, or "reused" when a later test
    # rebuilt the shared workdir (its keyword shards found complete and kept)
    assert on_disk == "reused" or on_disk["docs"] == m.ntotal
