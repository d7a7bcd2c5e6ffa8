"""Live database updates: chunk store appends/tombstones, index versions hot-swapped under running
shard actors (ratray/data/append.py, ratray/data/store.py, ratray/index/update.py, jobs/update_index.py)."""
from __future__ import annotations

import json
import shutil
import threading
import time

import faiss
import numpy as np
import pytest

from ratray.config import IndexConfig, ServiceConfig
from ratray.data.corpus import CorpusError
from ratray.data.store import ChunkStore, ChunkStoreError
from ratray.index.build import build_index
from ratray.index.embed import embed_with_cache
from ratray.index.service import ShardedIndex
from ratray.index.store import is_versioned, load_manifest, load_shard, serving_dir
from ratray.index.update import UpdateJobConfig, drift_report, remove_rows, route, update_index
from ratray.workdir import Workdir

NEW_DOCS = {
    "zoo/zebra": "Zebras are African equines with distinctive black-and-white striped coats. "
                 "There are three living species: the Grevy's zebra, the plains zebra and the "
                 "mountain zebra. Zebras share the genus Equus with horses and asses. The stripes "
                 "are thought to deter biting flies, and each animal's pattern is unique. Plains "
                 "zebras live in small harems led by a stallion and migrate with wildebeest.",
    "zoo/giraffe": "The giraffe is a tall African mammal, the tallest living terrestrial animal "
                   "and the largest ruminant. Its long neck and legs let it browse the leaves of "
                   "acacia trees that other herbivores cannot reach. Giraffes live in herds of "
                   "related females and their offspring, while adult males are mostly solitary "
                   "and fight for dominance by swinging their necks.",
}


CONTACT = ("Write to alice.martin@example.org for the field notes on the migration of the plains "
           "zebra herds across the Serengeti, collected over three dry seasons by the survey team.")
EXTRA = {"notes/contact": CONTACT, "zoo/zebra-copy": NEW_DOCS["zoo/zebra"]}  # PII; an exact copy


def write_docs(folder, docs: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    return path


@pytest.fixture(scope="module")
def live(small_workdir, tmp_path_factory):
    """Our own copy of the shared small workdir (never mutate the shared one), its shard actors
    running, one update applied (two documents added, one removed) while they serve."""
    src, _, summary = small_workdir
    wd = tmp_path_factory.mktemp("live") / "wd"
    shutil.copytree(src, wd)
    svc = ServiceConfig(name=f"upd-{time.time_ns()}", namespace="ratray-tests")
    client = ShardedIndex.launch(str(Workdir(wd).index), svc)
    store_path = Workdir(wd).chunk_store(summary["chunk_store"]["key"])
    early = ChunkStore.open(store_path)  # opened before the update, like a running job's
    from ratray.index.filtered import DocCodes

    codes = DocCodes(ChunkStore.open(store_path))  # a running job's leakage filter
    victim = str(early.doc_ids(early.split_ids("train")[:1])[0])
    before = {"n": len(early), "db": early.database_ids(), "victim_chunks": early.document_chunks(victim),
              "tokens0": early.tokens(np.arange(5)), "version": client.version()}
    cfg = UpdateJobConfig(workdir=str(wd), service=svc)
    result = update_index(wd, add=write_docs(tmp_path_factory.mktemp("add"), {**NEW_DOCS, **EXTRA}),
                          remove=[victim], cfg=cfg)  # no service_name: found by its index folder
    yield {"wd": wd, "client": client, "svc": svc, "cfg": cfg, "early": early, "codes": codes, "victim": victim,
           "before": before, "result": result, "store_path": store_path}
    client.shutdown()


def test_appended_chunks_continue_the_ids_and_read_back_like_built_ones(live):
    store, b = ChunkStore.open(live["store_path"]), live["before"]
    r = live["result"]["store"]
    new = np.arange(*r["added_ids"])
    assert new[0] == b["n"] and len(store) == b["n"] + len(new) == b["n"] + r["chunks_added"]
    assert set(store.doc_ids(new)) == {*NEW_DOCS, "notes/contact"}
    for doc, text in NEW_DOCS.items():
        ids = store.document_chunks(doc)
        assert np.all(store.continuation(ids[:-1]) == ids[1:]) and store.continuation(ids[-1:])[0] == -1
        toks = np.concatenate([store.tokens([i])[0][:store.n_tokens([i])[0]] for i in ids])
        assert store.tokenizer.decode(toks.tolist()) == text  # the store's own BPE, lossless
    assert set(store.column("split")[new]) == {"db"}  # retrieval only, never trained on
    np.testing.assert_array_equal(store.tokens(np.arange(5)), b["tokens0"])  # old ids unchanged


def test_a_store_opened_before_the_update_serves_the_new_ids(live):
    early, new = live["early"], np.arange(*live["result"]["store"]["added_ids"])
    fresh = ChunkStore.open(live["store_path"])
    np.testing.assert_array_equal(early.with_continuation(new), fresh.with_continuation(new))
    assert early.texts(new[:1]) == fresh.texts(new[:1])


def test_a_leakage_filter_made_before_the_update_codes_the_new_chunks(live):
    docs, new = live["codes"], np.arange(*live["result"]["store"]["added_ids"])
    d = len(docs.names)
    got = docs.of(np.array([[0, new[0]], [new[-1], -1]]))  # grows on the first new id
    assert got[0, 0] == docs.of_documents([live["early"].doc_ids([0])[0]])[0] and got[1, 1] == -1
    zebra, giraffe = docs.of_documents(["zoo/zebra", "zoo/giraffe"])
    assert zebra >= d and giraffe >= d and zebra != giraffe
    ids = ChunkStore.open(live["store_path"]).document_chunks("zoo/giraffe")
    assert (docs.of(ids) == giraffe).all() and docs.excluded_chunks(np.array([[giraffe]]))[0] == len(ids)


def test_removed_document_leaves_the_database_but_its_ids_stay_readable(live):
    store, b = ChunkStore.open(live["store_path"]), live["before"]
    gone = b["victim_chunks"]
    db = store.database_ids()
    assert not np.isin(gone, db).any() and np.isin(gone, b["db"]).all()
    assert len(db) == len(b["db"]) - len(gone) + live["result"]["store"]["chunks_added"]
    assert store.tokens(gone).shape == (len(gone), store.chunk_tokens)  # old versions still read them
    with pytest.raises(KeyError, match="has no chunks"):
        store.document_chunks(live["victim"])
    h = store.history[-1]
    assert (h["documents_added"], h["documents_removed"], h["chunks_removed"]) == (3, 1, len(gone))


def test_added_documents_are_cleaned_like_the_build_and_skips_are_counted(live):
    store, r = ChunkStore.open(live["store_path"]), live["result"]["store"]
    text = "".join(store.texts(store.document_chunks("notes/contact")))
    assert "alice.martin@example.org" not in text and "<EMAIL>" in text
    assert r["cleaned"]["pii"] == {"EMAIL": 1}
    assert r["skipped"]["counts"] == {"duplicate": 1} and r["documents_read"] == 3  # kept
    assert r["cleaned"]["duplicates"] == [["zoo/zebra-copy", "zoo/zebra"]]


def test_running_shards_serve_the_new_version_exactly(live):
    client, store, r = live["client"], ChunkStore.open(live["store_path"]), live["result"]
    assert client.version() == r["version"] == live["before"]["version"] + 1
    assert live["svc"].name in r["services_swapped"]
    new = np.arange(*r["store"]["added_ids"])
    q, _ = embed_with_cache(store.texts(new), live["cfg"].embed, Workdir(live["wd"]).embeddings,
                            progress=False, use_ray=False)  # cache hits: the update embedded them
    res = client.search(q, 1)  # a Flat index: exact
    np.testing.assert_array_equal(res.ids[:, 0], new)
    gone = live["before"]["victim_chunks"]
    qg, _ = embed_with_cache(store.texts(gone), live["cfg"].embed, Workdir(live["wd"]).embeddings,
                             progress=False, use_ray=False)
    assert not np.isin(client.search(qg, 5).ids, gone).any()
    kw = client.keyword_search(["giraffe acacia ruminant", *store.texts(gone[:1])], 5)  # BM25 shards
    assert kw.version == r["version"] and kw.ids[0, 0] in store.document_chunks("zoo/giraffe")
    assert not np.isin(kw.ids, gone).any()
    m = load_manifest(serving_dir(Workdir(live["wd"]).index))
    assert m.ntotal == len(store.database_ids()) and is_versioned(Workdir(live["wd"]).index)
    u = m.extra["updates"][-1]
    assert (u["chunks_added"], u["index_rows_removed"]) == (len(new), len(gone))
    assert r["drift"]["applies"] is False and "no trained quantizer" in r["drift"]["why"]


def test_readding_a_document_replaces_it_while_searches_run(live):
    client, stop, seen, errors = live["client"], threading.Event(), [], []
    store = ChunkStore.open(live["store_path"])
    old_ids = store.document_chunks("zoo/zebra")
    q, _ = embed_with_cache(store.texts(old_ids[:1]), live["cfg"].embed,
                            Workdir(live["wd"]).embeddings, progress=False, use_ray=False)

    def searcher():
        while not stop.is_set():
            try:
                res = client.search(q, 1)
                seen.append((res.version, int(res.ids[0, 0])))
            except Exception as e:  # noqa: BLE001 — the test reports it
                errors.append(e)

    t = threading.Thread(target=searcher)
    t.start()
    try:
        time.sleep(0.3)
        r = update_index(live["wd"], add=write_docs(live["wd"].parent / "readd", {
            "zoo/zebra": NEW_DOCS["zoo/zebra"]}), cfg=live["cfg"], service_name=live["svc"].name)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    new_ids = ChunkStore.open(live["store_path"]).document_chunks("zoo/zebra")
    assert r["store"]["documents_replaced"] == 1 and new_ids[0] > old_ids[-1]
    assert r["embeddings"]["embedded"] == 0  # same text: every vector from the cache
    assert not errors and {v for v, _ in seen} == {r["version"] - 1, r["version"]}
    assert all(i == (old_ids[0] if v < r["version"] else new_ids[0]) for v, i in seen)  # never mixed


@pytest.mark.parametrize("kind", ["missing", "unknown_id", "empty", "both"])
def test_bad_updates_are_clear_errors_and_change_nothing(live, tmp_path, kind):
    n = len(ChunkStore.open(live["store_path"]))
    version = live["client"].version()
    with pytest.raises((ChunkStoreError, CorpusError)) as e:
        if kind == "missing":
            update_index(live["wd"], add=tmp_path / "nope.jsonl", cfg=live["cfg"])
        elif kind == "unknown_id":
            update_index(live["wd"], remove=["no/such-doc", "zoo/giraffe"], cfg=live["cfg"])
        elif kind == "empty":
            (tmp_path / "empty").mkdir()
            update_index(live["wd"], add=tmp_path / "empty", cfg=live["cfg"])
        else:
            update_index(live["wd"], add=write_docs(tmp_path, {"zoo/giraffe": "x " * 200}),
                         remove=["zoo/giraffe"], cfg=live["cfg"])
    want = {"missing": "nope.jsonl does not exist", "unknown_id": "'no/such-doc'",
            "empty": "empty corpus", "both": "both added and removed"}[kind]
    assert want in str(e.value)
    assert len(ChunkStore.open(live["store_path"])) == n and live["client"].version() == version


def test_an_update_that_cannot_publish_leaves_store_and_index_as_they_were(live):
    store = ChunkStore.open(live["store_path"])
    n, history, version = len(store), len(store.history), live["client"].version()
    index = Workdir(live["wd"]).index
    blocker = index / "versions" / f"v{version + 1:06d}"  # a stray folder where the next version goes
    blocker.mkdir()
    (blocker / "stray").write_text("not an index")
    try:
        with pytest.raises(OSError):
            update_index(live["wd"], remove=["notes/contact"], cfg=live["cfg"])
    finally:
        shutil.rmtree(blocker)
    store.reload()
    assert (len(store), len(store.history), live["client"].version()) == (n, history, version)
    assert len(store.document_chunks("notes/contact"))  # still served: the removal was undone


def test_the_job_removes_documents_and_names_unknown_ids(live, tmp_path, capsys):
    from jobs.update_index import main

    ids = tmp_path / "ids.txt"
    ids.write_text("# one per line\nzoo/giraffe\n")
    assert main(["--workdir", str(live["wd"]), "--remove", str(ids), "--quiet",
                 "--set", f"service.namespace={live['svc'].namespace}"]) == 0
    out = capsys.readouterr().out
    assert "1 removed" in out and "hot-swapped: " + live["svc"].name in out
    assert main(["--workdir", str(live["wd"]), "--remove-doc", "zoo/giraffe", "--quiet"]) == 2
    assert "does not hold: 'zoo/giraffe'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# FAISS mechanics on random vectors (no model): IVF rows renumbered, lists routed, drift


def updated_shards(folder, m, gone, new, new_ids):
    """The shards of the index at folder/v1 with `gone` removed and (new, new_ids) added, as
    update_index does it, written as folder/v2 and loaded back as a shard actor loads them."""
    from dataclasses import replace

    from ratray.index.store import write_index_dir

    shards = [remove_rows(*load_shard(folder / "v1", i, m, reconstruct=False), gone, m)[:2]
              for i in range(m.num_shards)]
    for s, rows in enumerate(route(shards, new, m.extra["shard_split"])):
        shards[s][0].add(new[rows])
        shards[s] = (shards[s][0], np.concatenate([shards[s][1], new_ids[rows]]))
    n = sum(ix.ntotal for ix, _ in shards)
    write_index_dir(folder / "v2", shards, replace(m, version=2, ntotal=n))
    return [load_shard(folder / "v2", i) for i in range(m.num_shards)]


def test_ivf_shards_remove_and_add_rows_with_the_trained_quantizer(tmp_path):
    from ratray.index.search import search_shards

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    ids = np.arange(2000, dtype=np.int64) * 3  # chunk ids need not be dense
    m = build_index(x, ids, tmp_path / "v1", IndexConfig(factory="IVF8,Flat", shards=2, nprobe=8),
                    embedding_model="random")
    gone = ids[::7]
    new, new_ids = rng.normal(size=(50, 16)).astype(np.float32), 10_000 + np.arange(50)
    shards = updated_shards(tmp_path, m, gone, new, new_ids)
    kept = ~np.isin(ids, gone)
    q = np.concatenate([x[kept][:100], new])
    want = np.concatenate([ids[kept][:100], new_ids])
    _, got = search_shards(shards, q, 1, "l2")
    np.testing.assert_array_equal(got[:, 0], want)  # every vector finds itself under its chunk id
    _, near = search_shards(shards, x[~kept], 10, "l2")
    assert not np.isin(near, gone).any()
    held = [{i for i in range(8) if faiss.extract_index_ivf(ix).invlists.list_size(i)} for ix, _ in shards]
    assert m.extra["shard_split"] == "ivf_lists" and not held[0] & held[1]  # whole lists per shard


def test_drift_report_flags_shifted_vectors_only():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    index = faiss.index_factory(32, "IVF16,PQ8x4")
    index.train(x)
    same = drift_report(index, rng.normal(size=(300, 32)).astype(np.float32), x[:1000], 1.5)
    moved = drift_report(index, (rng.normal(size=(300, 32)) * 3 + 4).astype(np.float32), x[:1000], 1.5)
    assert same["applies"] and not same["retrain"] and 0.8 < same["coarse"]["ratio"] < 1.25
    assert moved["retrain"] and moved["coarse"]["ratio"] > 3 and moved["codec"]["ratio"] > 1.5


@pytest.mark.parametrize("factory", ["HNSW16", "OPQ4,IVF8,PQ4x4"])
def test_other_index_types_remove_and_add_rows(tmp_path, factory):
    """HNSW has no remove_ids (its shard is refilled from its stored vectors); OPQ puts a
    transform in front of the IVF (lists routed through it). Removed chunks never come back."""
    from ratray.index.search import search_shards

    rng = np.random.default_rng(2)
    x, ids = rng.normal(size=(1500, 16)).astype(np.float32), np.arange(1500, dtype=np.int64) * 2
    m = build_index(x, ids, tmp_path / "v1", IndexConfig(factory=factory, shards=2, nprobe=8),
                    embedding_model="random")
    gone = ids[::5]
    new, new_ids = rng.normal(size=(30, 16)).astype(np.float32), 10_000 + np.arange(30)
    shards = updated_shards(tmp_path, m, gone, new, new_ids)  # sizes and id maps agree on load
    assert sorted(np.concatenate([i for _, i in shards])) == sorted([*ids[~np.isin(ids, gone)], *new_ids])
    _, near = search_shards(shards, x[::5], 10, "l2")
    assert not np.isin(near, gone).any()
    _, own = search_shards(shards, new, 1, "l2")
    assert (own[:, 0] == new_ids).mean() >= 0.9  # PQ codes are lossy; HNSW finds every one
