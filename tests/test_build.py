"""The build job end to end: corpus → chunk store → embeddings → sharded index → summary.json."""
import json

import numpy as np
import pytest

from jobs.build_index import main as build_main
from ratray.data.store import ChunkStore
from ratray.index.store import load_manifest, load_shard
from tests.conftest import SMALL_BUILD


@pytest.fixture(scope="module")
def built(small_workdir):
    wd, _, first = small_workdir
    argv = ["--workdir", str(wd), "--quiet"] + [a for s in SMALL_BUILD for a in ("--set", s)]
    assert build_main(argv) == 0  # the job again, on the same inputs
    second = json.loads((wd / "index" / "summary.json").read_text())
    return wd, first, second


def test_summary_counts_timings_and_recall(built):
    wd, s, _ = built
    c = s["counts"]
    assert c["index_vectors"] == c["chunks"]["train"] > 0
    assert c["documents"]["val"] > 0
    assert s["recall"]["recall@10"] == 1.0  # Flat is exact
    assert s["recall"]["query_split"] == "val"
    for k in ("chunk_store_s", "embed_s", "index_build_s", "recall_s", "total_s"):
        assert s["timings"][k] >= 0
    assert isinstance(s["skipped"], dict)
    assert s["config"]["index.shards"] == 2
    o = s["overlap"]  # how much of the validation text the database holds (RETRO's r(C))
    assert o["k"] == 2 and o["chunks"] > 0 and 0 <= o["share_r_ge_1"] <= o["share_r_ge_0.5"] <= 1


def test_index_dir_is_self_describing(built):
    wd, s, _ = built
    m = load_manifest(wd / "index")
    assert m.factory == "Flat" and m.metric == "l2" and m.dim == 384
    assert len(m.shards) == 2 and sum(sh["size"] for sh in m.shards) == m.ntotal
    store = ChunkStore.open(s["chunk_store"]["path"])
    assert m.chunk_store == store.key
    ids = np.concatenate([load_shard(wd / "index", i, m)[1] for i in range(2)])
    # the database holds exactly the training chunks, each once
    assert np.array_equal(np.sort(ids), store.split_ids("train"))


def test_rebuild_reuses_chunks_embeddings_and_index(built):
    _, first, second = built
    assert first["embeddings"]["embedded"] > 0
    assert second["chunk_store"]["reused"] is True
    assert second["embeddings"]["embedded"] == 0
    assert second["embeddings"]["cached"] == first["embeddings"]["chunks"]
    assert second["index"]["reused"] is True


def test_bad_corpus_fails_with_file_and_row(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "body": "no text field"}\n')
    rc = build_main(["--corpus", str(corpus), "--workdir", str(tmp_path / "wd"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "docs.jsonl" in err and "2" in err and "text" in err


def test_bad_flag_value_fails_before_any_work(tmp_path, capsys):
    rc = build_main(["--workdir", str(tmp_path / "wd"), "--shards", "0"])
    assert rc == 2 and "index.shards" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()


def test_search_settings_take_effect_without_a_rebuild_and_build_settings_force_one(small_workdir,
                                                                                     tmp_path):
    """`--set index.ef_search=…` on a built workdir: reused, the manifest (which every shard reads)
    carries the new value. `--set index.seed=…` (a build-time setting): rebuilt, never 'reused'."""
    import shutil

    from ratray.build import build
    from ratray.config import BuildConfig, load_config

    wd, _, _ = small_workdir
    copy = tmp_path / "wd"
    for part in ("chunks", "embeddings", "index"):  # the built database, not the runs
        shutil.copytree(wd / part, copy / part)

    def again(*extra):
        return build(load_config(BuildConfig, None, SMALL_BUILD + [f"workdir={copy}", *extra]),
                     progress=False)

    s = again("index.ef_search=32")
    assert s["index"]["reused"] is True and s["index"]["search_settings_updated"] == ["ef_search"]
    assert load_manifest(copy / "index").ef_search == 32 == s["index"]["ef_search"]
    assert again("index.ef_search=32")["index"]["search_settings_updated"] == []
    rebuilt = again("index.ef_search=32", "index.seed=7")
    assert rebuilt["index"]["reused"] is False
    assert load_manifest(copy / "index").extra["build_settings"]["seed"] == 7
    assert again("index.ef_search=32", "index.seed=7")["index"]["reused"] is True


def test_a_corpus_with_versions_gives_the_database_near_twins_of_the_validation_text(ray_session,
                                                                                    tmp_path):
    """The same four modules with and without two derived versions each: with them most validation
    chunks find a long verbatim run in what they retrieve; without, almost none do."""
    import shutil

    from ratray.build import build
    from ratray.config import BuildConfig, load_config
    from tests.test_corpus import stdlib_files

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in [p for p in stdlib_files(60, min_bytes=3000) if p.stat().st_size < 6000][:4]:
        shutil.copy(f, corpus / f.name)  # ~20 KB: a few hundred chunks to embed
    base = [f"corpus.path={corpus}", "corpus.val_fraction=0.4", "chunks.chunk_tokens=32",
            "chunks.vocab_size=600", "index.factory=Flat", "index.shards=1", "index.recall_queries=20"]
    plain = build(load_config(BuildConfig, None, base + [f"workdir={tmp_path / 'a'}"]), progress=False)
    twins = build(load_config(BuildConfig, None, base + [f"workdir={tmp_path / 'b'}", "corpus.versions=2",
                                                          "corpus.db_fraction=0.3"]), progress=False)
    assert twins["counts"]["chunks"]["db"] > 0
    chunks = twins["counts"]["chunks"]
    assert twins["counts"]["index_vectors"] == chunks["train"] + chunks["db"]
    assert twins["overlap"]["share_r_ge_0.5"] > 0.4 > plain["overlap"]["share_r_ge_0.5"] + 0.2, \
        (twins["overlap"], plain["overlap"])
