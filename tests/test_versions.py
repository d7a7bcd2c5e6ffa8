"""Derived versions and the database-only split: the redundancy a RETRO database profits from,
and a database larger than the training data."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from ratray.config import ChunkConfig, ConfigError, CorpusConfig, load_config
from ratray.data.chunks import build_chunk_store
from ratray.data.corpus import SkipReport, iter_documents, split_of
from ratray.data.versions import edited
from tests.test_corpus import stdlib_files


def ngrams(text: str, n: int = 13) -> set:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    for f in stdlib_files(6, min_bytes=4000):
        shutil.copy(f, root / f.name)
    return CorpusConfig(path=str(root), versions=2, val_fraction=0.2, db_fraction=0.4)


def test_every_document_is_followed_by_its_versions(corpus):
    docs = list(iter_documents(corpus, SkipReport()))
    originals = [d for d in docs if "@v" not in d.doc_id]
    assert len(docs) == 3 * len(originals) == 18
    for i, d in enumerate(docs):
        if "@v" not in d.doc_id:
            assert [x.doc_id for x in docs[i + 1:i + 3]] == [f"{d.doc_id}@v1", f"{d.doc_id}@v2"]


def test_versions_are_near_twins_not_copies(corpus):
    docs = {d.doc_id: d.text for d in iter_documents(corpus, SkipReport())}
    for doc_id in [k for k in docs if "@v" not in k]:
        a, b = ngrams(docs[doc_id]), ngrams(docs[f"{doc_id}@v1"])
        share = len(a & b) / len(a)
        assert docs[doc_id] != docs[f"{doc_id}@v1"] and 0.4 < share < 0.99, (doc_id, share)


def test_exact_versions_are_copies_in_a_store_of_their_own(corpus):
    """corpus.version_edits=false: the aligned-duplicate control; a different chunk store key."""
    from ratray.data.chunks import chunk_store_key

    exact = dataclasses.replace(corpus, version_edits=False)
    docs = {d.doc_id: d.text for d in iter_documents(exact, SkipReport())}
    for doc_id in [k for k in docs if "@v" not in k]:
        assert docs[doc_id] == docs[f"{doc_id}@v1"] == docs[f"{doc_id}@v2"]
    assert chunk_store_key(exact, ChunkConfig()) != chunk_store_key(corpus, ChunkConfig())


def test_versions_are_deterministic_and_seeded():
    text = "def alpha_one(x):\n    return x\n\nclass BetaTwo:\n    pass\n" * 20
    assert edited(text, "a.py", 1, 0) == edited(text, "a.py", 1, 0)
    assert edited(text, "a.py", 1, 0) != edited(text, "a.py", 2, 0) != edited(text, "a.py", 1, 1)
    assert edited(text, "a.py", 1, 0).startswith("# a.py, version 2\n")


def test_caps_count_the_documents_read_not_their_versions(corpus):
    docs = list(iter_documents(dataclasses.replace(corpus, max_docs=2), SkipReport()))
    assert len(docs) == 6


def test_splits_partition_the_documents_by_their_share():
    cfg = CorpusConfig(val_fraction=0.1, db_fraction=0.5)
    splits = [split_of(f"doc-{i}", cfg) for i in range(4000)]
    share = {s: splits.count(s) / len(splits) for s in ("val", "db", "train")}
    assert abs(share["val"] - 0.1) < 0.02 and abs(share["db"] - 0.5) < 0.03
    assert abs(share["train"] - 0.4) < 0.03
    assert split_of("doc-7", cfg) == split_of("doc-7", cfg)  # by document, deterministic


def test_the_database_is_train_and_db_and_only_train_is_trained_on(corpus, tmp_path):
    store = build_chunk_store(corpus, ChunkConfig(chunk_tokens=32, vocab_size=600), tmp_path, progress=False)
    train, db, val = (store.split_ids(s) for s in ("train", "db", "val"))
    assert len(train) and len(db) and len(val)
    assert np.array_equal(store.database_ids(), np.union1d(train, db))
    assert not np.intersect1d(store.database_ids(), val).size
    counts = store.meta["counts"]["chunks"]
    assert (counts["train"], counts["db"], counts["val"]) == (len(train), len(db), len(val))
    assert counts["total"] == len(store)
    assert set(store.doc_ids(db)).isdisjoint(store.doc_ids(train))  # whole documents


@pytest.mark.parametrize("override, key", [("corpus.db_fraction=0.96", "corpus.db_fraction"),
                                           ("corpus.db_fraction=-0.1", "corpus.db_fraction"),
                                           ("corpus.versions=10", "corpus.versions")])
def test_bad_database_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CorpusConfig, None, [override.split(".", 1)[1]])


def test_original_id_groups_a_document_with_its_versions():
    from ratray.data.versions import original_id, version_id

    assert original_id(version_id("pkg/mod.py", 2)) == "pkg/mod.py"
    assert original_id("pkg/mod.py") == "pkg/mod.py"
    assert original_id("notes@v0") == "notes@v0"  # versions are numbered from 1
