"""Cleaning in the chunk store build: exact duplicates, MinHash/LSH near-duplicates, PII, the key."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ratray.config import BuildConfig, ChunkConfig, ConfigError, CorpusConfig, load_config
from ratray.data.chunks import build_chunk_store, chunk_store_key
from ratray.data.clean import (Cleaner, clean_summary, contaminated_val_ids, format_clean,
                                pii_enabled, shingles)
from ratray.data.corpus import SkipReport, default_corpus_path, split_of
from ratray.data.records import Document

CHUNKS = ChunkConfig(chunk_tokens=32, vocab_size=512)
MODULES = ["textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "colorsys.py", "bisect.py",
           "keyword.py", "stringprep.py", "heapq.py", "sched.py", "copy.py", "operator.py"]
PII_LINE = "# Contact jane.doe@example.com or +1 415-555-2671; staging host 192.168.1.20\n"


def _text(name: str, chars: int = 3000) -> str:
    return (default_corpus_path() / name).read_text()[:chars]


def _edit(text: str, every: int) -> str:
    """Every `every`-th word replaced: a near-duplicate (few edits) or a different text (many)."""
    count = iter(range(1, len(text)))
    return re.sub(r"\w+", lambda m: "CHANGED" if next(count) % every == 0 else m.group(), text)


def _name(split: str, cfg: CorpusConfig, taken: set[str], stem: str) -> str:
    """A file name whose id the hash split puts into `split`."""
    for i in range(1000):
        name = f"{stem}{i}.txt"
        if name not in taken and split_of(name, cfg) == split:
            taken.add(name)
            return name
    raise AssertionError("no name found")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A user corpus folder: 12 stdlib texts (train/val by hash), an exact copy of one, two train
    near-duplicates of another (a few words changed), a validation near-duplicate of a third, and
    PII in one. Returns (folder, cfg, names)."""
    root = tmp_path_factory.mktemp("clean_corpus")
    cfg = CorpusConfig(path=str(root), val_fraction=0.25)
    taken: set[str] = set()
    names = {}
    for i, m in enumerate(MODULES):
        name = _name("train", cfg, taken, "doc") if i < 10 else _name("val", cfg, taken, "doc")
        (root / name).write_text(_text(m) + (PII_LINE if i == 1 else ""))
        names[m] = name
    names["copy"] = _name("train", cfg, taken, "zcopy")  # sorts after its original
    (root / names["copy"]).write_text((root / names["glob.py"]).read_text())
    names["near1"] = _name("train", cfg, taken, "znear")
    (root / names["near1"]).write_text(_edit(_text("fnmatch.py"), 100))
    names["near2"] = _name("train", cfg, taken, "znear")
    (root / names["near2"]).write_text(_edit(_text("fnmatch.py"), 80))
    names["val_near"] = _name("val", cfg, taken, "zval")
    (root / names["val_near"]).write_text(_edit(_text("heapq.py"), 100))
    return root, cfg, names


@pytest.fixture(scope="module")
def kept(corpus, tmp_path_factory):
    root, cfg, _ = corpus
    return build_chunk_store(cfg, CHUNKS, tmp_path_factory.mktemp("kept"), progress=False)


@pytest.fixture(scope="module")
def dropped(corpus, tmp_path_factory):
    root, cfg, _ = corpus
    return build_chunk_store(dataclasses.replace(cfg, near_dup="drop"), CHUNKS,
                             tmp_path_factory.mktemp("dropped"), progress=False)


def _docs(store) -> set[str]:
    return set(store.column("doc_id").tolist())


def test_exact_duplicate_removed_before_chunking_and_pair_reported(kept, corpus):
    _, _, names = corpus
    clean = kept.meta["clean"]
    assert clean["exact_duplicates"] == {"removed": 1, "pairs": [[names["copy"], names["glob.py"]]]}
    assert names["copy"] not in _docs(kept) and names["glob.py"] in _docs(kept)
    assert kept.meta["skips"]["counts"]["duplicate"] == 1
    assert names["glob.py"] in kept.meta["skips"]["examples"]["duplicate"][0]


def test_near_duplicates_clustered_and_kept_by_default(kept, corpus):
    _, _, names = corpus
    nd = kept.meta["clean"]["near_duplicates"]
    cluster = [names["fnmatch.py"], names["near1"], names["near2"]]
    assert sorted(cluster) in [sorted(c) for c in nd["cluster_ids"]]
    assert nd["mode"] == "keep" and nd["dropped_from_train"] == 0
    assert set(cluster) <= _docs(kept)  # RETRO's database profits from them


def test_near_dup_drop_removes_train_copies_only(dropped, kept, corpus):
    _, _, names = corpus
    nd = dropped.meta["clean"]["near_duplicates"]
    assert sorted(nd["dropped"]) == sorted([[names["near1"], names["fnmatch.py"]],
                                            [names["near2"], names["fnmatch.py"]]])
    docs = _docs(dropped)
    assert names["fnmatch.py"] in docs and not {names["near1"], names["near2"]} & docs
    assert names["val_near"] in docs  # validation documents are reported, never removed
    assert dropped.meta["skips"]["counts"]["near_duplicate"] == 2
    assert dropped.meta["counts"]["documents"]["train"] == kept.meta["counts"]["documents"]["train"] - 2
    assert dropped.key != kept.key


def test_validation_contamination_listed_by_id(kept, corpus):
    _, _, names = corpus
    vc = kept.meta["clean"]["val_contamination"]
    assert list(vc["documents"]) == [names["val_near"]]
    (match, jaccard), = vc["documents"][names["val_near"]]
    assert match == names["heapq.py"] and 0.8 <= jaccard < 1.0
    assert vc["checked"] == kept.meta["documents_read"]["val"]
    assert set(kept.doc_ids(kept.split_ids("val"))) >= {names["val_near"]}
    assert contaminated_val_ids(kept.meta) == {names["val_near"]}  # the decontaminated subset's cut
    assert contaminated_val_ids({}) == set()


def test_pii_scrubbed_before_tokenization_and_counted(kept, corpus):
    _, _, names = corpus
    doc = kept.document_chunks(names["shlex.py"])
    text = "".join(kept.texts(doc))  # bpe chunks concatenate to the (scrubbed) document
    assert "# Contact <EMAIL> or <PHONE>; staging host <IP_ADDRESS>" in text
    assert "jane.doe" not in text and "415-555" not in text and "192.168" not in text
    real = "".join(kept.texts(kept.document_chunks(names["textwrap.py"])))
    assert "gward@python.net" in _text("textwrap.py") and "gward@" not in real  # its author's
    pii = kept.meta["clean"]["pii"]
    assert pii["enabled"] and pii["documents"] == 2
    assert pii["counts"] == {"EMAIL": 2, "IP_ADDRESS": 1, "PHONE": 1}
    vocab = kept.tokenizer.decode_batch([[i] for i in range(kept.tokenizer.vocab_size)])
    assert not any("jane" in v for v in vocab)  # the tokenizer never saw the address


def test_summary_counts_and_line(kept):
    s = clean_summary(kept.meta["clean"])
    assert s["exact_duplicates_removed"] == 1 and s["near_duplicates"]["clusters"] >= 1
    assert s["val_contaminated"] == 1 and len(s["val_contaminated_ids"]) == 1
    line = format_clean(s)
    print("\n" + line)
    assert "PII 4 replaced in 2 documents (EMAIL 2, IP_ADDRESS 1, PHONE 1)" in line
    assert "1 exact duplicates removed" in line and "1 of " in line


def test_pii_off_keeps_text_and_changes_the_key(corpus, kept, tmp_path):
    root, cfg, names = corpus
    off = dataclasses.replace(cfg, pii="off")
    assert chunk_store_key(off, CHUNKS) != kept.key
    assert chunk_store_key(dataclasses.replace(cfg, pii="on"), CHUNKS) == kept.key  # auto = on here
    cleaner = Cleaner(off)
    doc = Document("d", PII_LINE, None, "d")
    assert [d.text for d in cleaner.read([doc], SkipReport())] == [PII_LINE]
    assert cleaner.report()["pii"] == {"enabled": False, "counts": {}, "total": 0, "documents": 0}


def test_auto_pii_is_on_for_user_corpora_only():
    assert pii_enabled(CorpusConfig(path="/some/folder"))
    assert not pii_enabled(CorpusConfig())  # the stdlib: published source, its addresses kept
    assert pii_enabled(CorpusConfig(pii="on")) and not pii_enabled(CorpusConfig(path="x", pii="off"))


def test_every_cleaning_setting_changes_the_key():
    base = CorpusConfig()
    key = chunk_store_key(base, ChunkConfig(), "fp")
    for change in (dict(dedup=False), dict(near_dup="drop"), dict(near_dup_threshold=0.9),
                   dict(near_dup_ngram=3), dict(near_dup_num_perm=64), dict(pii="on")):
        assert chunk_store_key(dataclasses.replace(base, **change), ChunkConfig(), "fp") != key, change
    assert chunk_store_key(dataclasses.replace(base, pii="off"), ChunkConfig(), "fp") == key  # auto


def test_near_duplicates_found_at_the_threshold():
    """A document with a few words changed, against its original: reported when the threshold is
    below the true n-gram Jaccard (minus the MinHash error), not when it is above it."""
    a = _text("textwrap.py", 6000)
    b = _edit(a, 40)
    sa, sb = shingles(a, 5), shingles(b, 5)
    true_j = len(sa & sb) / len(sa | sb)
    assert 0.6 < true_j < 0.9
    docs = [Document("a", a, None, "a"), Document("b", b, None, "b"),
            Document("c", _text("heapq.py", 6000), None, "c")]
    found = {}
    for t in (true_j - 0.1, true_j + 0.1):
        cleaner = Cleaner(CorpusConfig(near_dup_threshold=round(t, 3), near_dup_num_perm=256))
        list(cleaner.read(docs, SkipReport()))
        cleaner.resolve(lambda d: "train", SkipReport())
        found[t > true_j] = cleaner.clusters
    assert found[False] == [["a", "b"]] and found[True] == []


def test_dedup_off_keeps_exact_copies_and_versions_are_never_deduplicated(tmp_path):
    text = _text("bisect.py")
    docs = [Document("x", text, None, "x"), Document("y", text, None, "y")]
    on = Cleaner(CorpusConfig())
    assert [d.doc_id for d in on.read(docs, SkipReport())] == ["x"]
    off = Cleaner(CorpusConfig(dedup=False))
    assert [d.doc_id for d in off.read(docs, SkipReport())] == ["x", "y"]
    versions = Cleaner(CorpusConfig(versions=1, version_edits=False))
    copies = [Document("x", text, None, "x"), Document("x@v1", text, None, "x (version 2)")]
    assert [d.doc_id for d in versions.read(copies, SkipReport())] == ["x", "x@v1"]


@pytest.mark.parametrize("override,message", [
    ("corpus.near_dup=remove", "corpus.near_dup': must be keep|drop, got 'remove'"),
    ("corpus.near_dup_threshold=0", "corpus.near_dup_threshold': must be in (0, 1]"),
    ("corpus.near_dup_threshold=1.5", "corpus.near_dup_threshold': must be in (0, 1]"),
    ("corpus.near_dup_threshold=high", "corpus.near_dup_threshold': expected float"),
    ("corpus.near_dup_ngram=0", "corpus.near_dup_ngram': must be an integer in 1..50"),
    ("corpus.near_dup_num_perm=8", "corpus.near_dup_num_perm': must be an integer in 16..1024"),
    ("corpus.pii=maybe", "corpus.pii': must be on|off|auto, got 'maybe'"),
    ("corpus.dedup=sometimes", "corpus.dedup': expected true/false"),
])
def test_bad_cleaning_flags_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(BuildConfig, None, [override])


def test_yaml_on_off_read_as_pii_modes():
    assert load_config(BuildConfig, None, ["corpus.pii=on"]).corpus.pii == "on"
    assert load_config(BuildConfig, None, ["corpus.pii=off"]).corpus.pii == "off"


def test_build_summary_reports_cleaning(small_workdir):
    from ratray.build import format_build

    _, _, summary = small_workdir
    clean = summary["clean"]
    assert clean["pii"]["enabled"] is False  # the default stdlib corpus: pii auto = off
    assert clean["val_checked"] >= summary["counts"]["documents"]["val"] > 0
    text = format_build(summary)
    print("\n" + text)
    assert "cleaning: PII scrubbing off; " in text and "exact duplicates removed" in text
