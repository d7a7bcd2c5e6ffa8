"""Corpus reading: every bad input is a clear error (file, row, field) or a counted, located skip."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.chunks import ChunkStoreError, build_chunk_store
from ratray.data.corpus import (CorpusError, SkipReport, corpus_fingerprint, default_corpus_path,
                                is_validation, iter_documents, list_corpus_files)


def read(cfg: CorpusConfig) -> tuple[list, SkipReport]:
    skips = SkipReport()
    return list(iter_documents(cfg, skips)), skips


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stdlib_files(n: int, min_bytes: int = 2000) -> list[Path]:
    """The first `n` default-corpus files of at least `min_bytes` (real, reasonably long text)."""
    root, files = list_corpus_files(CorpusConfig())
    return [p for p in files if p.stat().st_size >= min_bytes][:n]


# ---------------------------------------------------------------------------------------------
# the default corpus


def test_default_corpus_is_stdlib_source_without_tests():
    docs, skips = read(CorpusConfig())
    assert len(docs) > 300
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids)
    for doc_id in ids:
        parts = doc_id.split("/")
        assert doc_id.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), doc_id
        assert not parts[-1].startswith("test_"), doc_id
    by_id = {d.doc_id: d for d in docs}
    assert by_id["json/decoder.py"].title == "json.decoder"
    assert by_id["json/__init__.py"].title == "json"
    assert by_id["json/decoder.py"].source == str(default_corpus_path() / "json" / "decoder.py")
    assert skips.capped is None and skips.documents == len(docs)
    assert [d.doc_id for d in read(CorpusConfig())[0]] == ids  # deterministic


def test_fingerprint_tracks_content(tmp_path):
    for p in stdlib_files(3):
        shutil.copy(p, tmp_path / p.name)
    cfg = CorpusConfig(path=str(tmp_path))
    fp = corpus_fingerprint(cfg)
    assert fp == corpus_fingerprint(cfg)
    victim = sorted(tmp_path.iterdir())[0]
    victim.write_text(victim.read_text().replace("a", "b", 1))  # same files and sizes, one edited
    fp2 = corpus_fingerprint(cfg)
    assert fp2 != fp
    (tmp_path / "new.txt").write_text("another document\n")
    assert corpus_fingerprint(cfg) not in (fp, fp2)


def test_is_validation_deterministic_by_document():
    ids = [f"doc-{i}" for i in range(4000)]
    a = [is_validation(i, 0.1, seed=0) for i in ids]
    assert a == [is_validation(i, 0.1, seed=0) for i in ids]
    assert 300 < sum(a) < 500
    assert a != [is_validation(i, 0.1, seed=1) for i in ids]
    assert not any(is_validation(i, 0.0, seed=0) for i in ids)


# ---------------------------------------------------------------------------------------------
# structural errors


def test_nonexistent_path(tmp_path):
    with pytest.raises(CorpusError, match="does-not-exist.*does not exist"):
        read(CorpusConfig(path=str(tmp_path / "does-not-exist")))


def test_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="empty corpus.*contains no files"):
        read(CorpusConfig(path=str(tmp_path)))


def test_folder_of_whitespace_docs(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\t\r\n ")
    with pytest.raises(CorpusError, match=r"empty corpus.*no documents left after skips.*'empty': 2") as e:
        read(CorpusConfig(path=str(tmp_path)))
    assert "a.txt" in str(e.value) and "b.txt" in str(e.value)


def test_jsonl_missing_field(tmp_path):
    f = write_jsonl(tmp_path / "docs.jsonl", [{"id": 1, "text": "fine"}, {"id": 2, "body": "oops"}])
    with pytest.raises(CorpusError) as e:
        read(CorpusConfig(path=str(f)))
    msg = str(e.value)
    assert "docs.jsonl" in msg and "line 2" in msg and "'text'" in msg and "['body', 'id']" in msg


def test_parquet_missing_column(tmp_path):
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["hello"]}), f)
    with pytest.raises(CorpusError) as e:
        read(CorpusConfig(path=str(f)))
    msg = str(e.value)
    assert "docs.parquet" in msg and "missing column 'text'" in msg and "['id', 'body']" in msg


def test_malformed_json_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "x"}, "", '{"id": "b", "text": "y"'])
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: malformed JSON"):
        read(CorpusConfig(path=str(f)))


@pytest.mark.parametrize("row, expect", [
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"id": "a", "text": 5}', "field 'text' must be a string, got int"),
    ('{"id": 1.5, "text": "x"}', "field 'id' (the document id) must be a string or an integer"),
    ('{"id": "a", "text": "x", "title": 3}', "field 'title' (title) must be a string or null"),
])
def test_jsonl_bad_rows(tmp_path, row, expect):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"id": "ok", "text": "fine"}, row])
    with pytest.raises(CorpusError, match=r"rows\.jsonl, line 2: ") as e:
        read(CorpusConfig(path=str(f)))
    assert expect in str(e.value)


def test_duplicate_ids_in_one_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "text": "a"}, {"id": 8, "text": "b"}, {"id": "7", "text": "c"}])
    with pytest.raises(CorpusError, match=r"duplicate document id '7': at .*d\.jsonl:1 and at .*d\.jsonl:3"):
        read(CorpusConfig(path=str(f)))


def test_duplicate_ids_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one"}])
    pq.write_table(pa.table({"id": ["y", "x"], "text": ["two", "three"]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"duplicate document id 'x': at .*a\.jsonl:1 and at .*b\.parquet:1"):
        read(CorpusConfig(path=str(tmp_path)))


def test_parquet_null_id_and_bad_types(tmp_path):
    f = tmp_path / "n.parquet"
    pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), f)
    with pytest.raises(CorpusError, match=r"n\.parquet, row 1: column 'id' \(the document id\) is null"):
        read(CorpusConfig(path=str(f)))
    pq.write_table(pa.table({"id": ["a"], "text": [3]}), f)
    with pytest.raises(CorpusError, match=r"n\.parquet: column 'text' must be a string column, got int64"):
        read(CorpusConfig(path=str(f)))
    f.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"n\.parquet: not a readable Parquet file"):
        read(CorpusConfig(path=str(f)))


# ---------------------------------------------------------------------------------------------
# counted skips, with their locations


def test_non_utf8_binary_empty_are_counted(tmp_path):
    good = stdlib_files(1)[0]
    shutil.copy(good, tmp_path / "good.py")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    (tmp_path / ".hidden").write_text("dotfiles are not documents")
    docs, skips = read(CorpusConfig(path=str(tmp_path)))
    assert [d.doc_id for d in docs] == ["good.py"] and docs[0].text == good.read_text()
    assert docs[0].title == "good"
    assert skips.counts == {"non_utf8": 1, "binary": 1, "empty": 1, "hidden": 1}
    assert "latin1.txt (byte offset 3)" in skips.examples["non_utf8"][0]
    assert skips.examples["binary"][0].endswith("blob.bin")
    assert skips.examples["empty"][0].endswith("blank.txt")
    assert skips.total == 4 and skips.as_dict()["counts"]["binary"] == 1


def test_jsonl_empty_null_and_non_utf8_rows(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"id": "a", "text": "kept"}\n{"id": "b", "text": "   "}\n{"id": "c", "text": null}\n'
                  b'{"id": "d", "text": "\xff\xfe"}\n\n{"id": "e", "text": "also kept"}\n')
    docs, skips = read(CorpusConfig(path=str(f)))
    assert [d.doc_id for d in docs] == ["a", "e"]
    assert docs[1].source == f"{f}:6"
    assert skips.counts == {"empty": 2, "non_utf8": 1}
    assert skips.examples["empty"] == [f"{f}:2", f"{f}:3"]
    assert skips.examples["non_utf8"][0].startswith(f"{f}:4")


def test_huge_single_document_is_skipped(tmp_path):
    (tmp_path / "small.txt").write_text("small enough\n")
    (tmp_path / "huge.txt").write_text("x" * 500)
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "big", "text": "é" * 60}, {"id": "ok", "text": "fine"}])
    docs, skips = read(CorpusConfig(path=str(tmp_path), max_doc_bytes=100))
    assert sorted(d.doc_id for d in docs) == ["ok", "small.txt"]
    assert skips.counts == {"too_large": 2}
    ex = " ".join(skips.examples["too_large"])
    assert "huge.txt (500 bytes > max_doc_bytes 100)" in ex and "rows.jsonl:1 (120 bytes" in ex


def test_parquet_null_text_and_rows_across_batches(tmp_path):
    n = 2600  # more than one record batch
    texts = [f"document number {i}" for i in range(n)]
    texts[2500] = None
    f = tmp_path / "many.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), f, row_group_size=700)
    docs, skips = read(CorpusConfig(path=str(f)))
    assert len(docs) == n - 1 and docs[-1].doc_id == str(n - 1) and docs[-1].source == f"{f}:{n - 1}"
    assert skips.counts == {"empty": 1} and skips.examples["empty"] == [f"{f}:2500"]
    assert all(d.title is None for d in docs)


def test_documents_shorter_than_one_chunk(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in stdlib_files(6):
        shutil.copy(p, corpus / p.name)
    (corpus / "tiny.py").write_text("x = 1\n")
    store = build_chunk_store(CorpusConfig(path=str(corpus), val_fraction=0.0),
                              ChunkConfig(vocab_size=400), tmp_path / "store", progress=False)
    skips = store.meta["skips"]
    assert skips["counts"] == {"shorter_than_chunk": 1}
    assert "tiny.py" in skips["examples"]["shorter_than_chunk"][0]
    assert "tokens < chunk_tokens 64" in skips["examples"]["shorter_than_chunk"][0]
    assert "tiny.py" not in set(store.column("doc_id"))
    assert store.meta["counts"]["documents"]["total"] == 6


def test_train_split_without_chunks_is_an_error(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("short\n")
    (corpus / "b.txt").write_text("also short\n")
    with pytest.raises(ChunkStoreError, match="train split has no chunks.*shorter_than_chunk"):
        build_chunk_store(CorpusConfig(path=str(corpus), val_fraction=0.0),
                          ChunkConfig(vocab_size=300), tmp_path / "store", progress=False)
    assert [p.name for p in (tmp_path / "store").iterdir()] == []  # no half-built store left


# ---------------------------------------------------------------------------------------------
# configuration: fields, formats, caps


def test_configurable_fields_jsonl_and_parquet(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"key": 1, "body": "first body", "name": "First"},
                                       {"key": "two", "body": "second body"}])
    pq.write_table(pa.table({"key": [3, 4], "body": ["third", "fourth"], "name": ["Third", None]}),
                   tmp_path / "b.parquet")
    (tmp_path / "notes.md").write_text("# plain text sits next to them\n")
    cfg = CorpusConfig(path=str(tmp_path), id_field="key", text_field="body", title_field="name")
    docs, _ = read(cfg)
    assert [(d.doc_id, d.text, d.title) for d in docs] == [
        ("1", "first body", "First"), ("two", "second body", None),
        ("3", "third", "Third"), ("4", "fourth", None),
        ("notes.md", "# plain text sits next to them\n", "notes")]
    with pytest.raises(CorpusError, match=r"a\.jsonl, line 1: missing field 'id' \(config corpus\.id_field\)"):
        read(CorpusConfig(path=str(tmp_path), text_field="body"))


def test_forced_format(tmp_path):
    f = tmp_path / "docs.data"
    write_jsonl(f, [{"id": "a", "text": "x"}])
    assert read(CorpusConfig(path=str(f)))[0][0].doc_id == "docs.data"  # auto: plain text
    assert read(CorpusConfig(path=str(f), format="jsonl"))[0][0].doc_id == "a"


def test_caps(tmp_path):
    docs, skips = read(CorpusConfig(max_docs=5))
    assert len(docs) == 5 and skips.capped == "max_docs"
    docs, skips = read(CorpusConfig(max_bytes=50_000))
    assert sum(len(d.text.encode()) for d in docs) == skips.bytes <= 50_000
    assert skips.capped == "max_bytes" and len(docs) >= 1
    write_jsonl(tmp_path / "two.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}])
    docs, skips = read(CorpusConfig(path=str(tmp_path), max_docs=2))
    assert len(docs) == 2 and skips.capped is None  # nothing was left unread
    (tmp_path / "big.txt").write_text("more than ten bytes of text\n")
    with pytest.raises(CorpusError, match="empty corpus.*stopped by cap max_bytes"):
        read(CorpusConfig(path=str(tmp_path / "big.txt"), max_bytes=10))


def test_skip_report_merge():
    a, b = SkipReport(), SkipReport()
    for i in range(4):
        a.add("empty", f"a{i}")
        b.add("empty", f"b{i}")
    b.add("binary", "b.bin")
    b.capped = "max_docs"
    a.merge(b)
    assert a.counts == {"empty": 8, "binary": 1} and a.total == 9
    assert a.examples["empty"] == ["a0", "a1", "a2", "a3", "b0"] and a.capped == "max_docs"
