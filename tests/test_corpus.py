"""Corpus reading: every bad input is a clear error (file, row, field) or a counted, located skip."""
from __future__ import annotations

import json
import operator
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def default_corpus():
    """(documents, skips, doc ids) of the default corpus, read once."""
    docs, skips = read(CorpusConfig())
    return docs, skips, [d.doc_id for d in docs]


def test_default_corpus_has_hundreds_of_documents(default_corpus):
    docs, _, _ = default_corpus
    assert len(docs) > 300


def test_default_corpus_ids_are_sorted(default_corpus):
    _, _, ids = default_corpus
    assert ids == sorted(ids)


def test_default_corpus_is_python_source(default_corpus):
    _, _, ids = default_corpus
    for doc_id in ids:
        assert doc_id.endswith(".py")


def test_default_corpus_skips_test_and_installed_package_folders(default_corpus):
    _, _, ids = default_corpus
    for doc_id in ids:
        parts = doc_id.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), doc_id


def test_default_corpus_skips_test_modules(default_corpus):
    _, _, ids = default_corpus
    for doc_id in ids:
        assert not doc_id.split("/")[-1].startswith("test_"), doc_id


@pytest.mark.parametrize("doc_id, title", [("json/decoder.py", "json.decoder"), ("json/__init__.py", "json")])
def test_default_corpus_titles_are_module_names(default_corpus, doc_id, title):
    docs, _, _ = default_corpus
    assert {d.doc_id: d for d in docs}[doc_id].title == title


def test_default_corpus_source_is_the_file(default_corpus):
    docs, _, _ = default_corpus
    by_id = {d.doc_id: d for d in docs}
    assert by_id["json/decoder.py"].source == str(default_corpus_path() / "json" / "decoder.py")


def test_default_corpus_is_read_whole(default_corpus):
    docs, skips, _ = default_corpus
    assert skips.capped is None and skips.documents == len(docs)


def test_default_corpus_is_deterministic(default_corpus):
    _, _, ids = default_corpus
    assert [d.doc_id for d in read(CorpusConfig())[0]] == ids  # deterministic


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory):
    """The fingerprint of three files: twice, after editing one (same sizes), after adding a file."""
    tmp = tmp_path_factory.mktemp("fp")
    for p in stdlib_files(3):
        shutil.copy(p, tmp / p.name)
    cfg = CorpusConfig(path=str(tmp))
    fp, again = corpus_fingerprint(cfg), corpus_fingerprint(cfg)
    victim = sorted(tmp.iterdir())[0]
    victim.write_text(victim.read_text().replace("a", "b", 1))  # same files and sizes, one edited
    edited = corpus_fingerprint(cfg)
    (tmp / "new.txt").write_text("another document\n")
    return SimpleNamespace(fp=fp, again=again, edited=edited, added=corpus_fingerprint(cfg))


def test_fingerprint_is_stable(fingerprints):
    assert fingerprints.fp == fingerprints.again


def test_fingerprint_changes_when_a_file_is_edited(fingerprints):
    assert fingerprints.edited != fingerprints.fp


def test_fingerprint_changes_when_a_file_is_added(fingerprints):
    assert fingerprints.added not in (fingerprints.fp, fingerprints.edited)


VAL_IDS = [f"doc-{i}" for i in range(4000)]


@pytest.fixture(scope="module")
def val_flags():
    return [is_validation(i, 0.1, seed=0) for i in VAL_IDS]


def test_is_validation_is_deterministic_by_document(val_flags):
    assert val_flags == [is_validation(i, 0.1, seed=0) for i in VAL_IDS]


def test_is_validation_picks_about_the_fraction(val_flags):
    assert 300 < sum(val_flags) < 500


def test_is_validation_depends_on_the_seed(val_flags):
    assert val_flags != [is_validation(i, 0.1, seed=1) for i in VAL_IDS]


def test_zero_val_fraction_picks_nothing():
    assert not any(is_validation(i, 0.0, seed=0) for i in VAL_IDS)


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


@pytest.mark.parametrize("write, expect", [
    (lambda f: pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), f),
     r"n\.parquet, row 1: column 'id' \(the document id\) is null"),
    (lambda f: pq.write_table(pa.table({"id": ["a"], "text": [3]}), f),
     r"n\.parquet: column 'text' must be a string column, got int64"),
    (lambda f: f.write_bytes(b"not parquet at all"), r"n\.parquet: not a readable Parquet file"),
], ids=["null-id", "int-text", "not-parquet"])
def test_parquet_null_id_and_bad_types(tmp_path, write, expect):
    f = tmp_path / "n.parquet"
    write(f)
    with pytest.raises(CorpusError, match=expect):
        read(CorpusConfig(path=str(f)))


# ---------------------------------------------------------------------------------------------
# counted skips, with their locations


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """(the one good file, documents, skips) of a folder with a good file and four kinds of skip."""
    tmp = tmp_path_factory.mktemp("mixed")
    good = stdlib_files(1)[0]
    shutil.copy(good, tmp / "good.py")
    (tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp / "blank.txt").write_text(" \n\n\t")
    (tmp / ".hidden").write_text("dotfiles are not documents")
    return (good, *read(CorpusConfig(path=str(tmp))))


def test_only_the_readable_document_is_kept(mixed_folder):
    good, docs, _ = mixed_folder
    assert [d.doc_id for d in docs] == ["good.py"] and docs[0].text == good.read_text()


def test_plain_file_title_is_its_stem(mixed_folder):
    _, docs, _ = mixed_folder
    assert docs[0].title == "good"


def test_non_utf8_binary_empty_hidden_are_counted(mixed_folder):
    _, _, skips = mixed_folder
    assert skips.counts == {"non_utf8": 1, "binary": 1, "empty": 1, "hidden": 1}


@pytest.mark.parametrize("kind, check, where", [
    ("non_utf8", operator.contains, "latin1.txt (byte offset 3)"),
    ("binary", str.endswith, "blob.bin"),
    ("empty", str.endswith, "blank.txt"),
])
def test_skipped_files_are_located(mixed_folder, kind, check, where):
    _, _, skips = mixed_folder
    assert check(skips.examples[kind][0], where), skips.examples[kind]


def test_skip_total_and_dict(mixed_folder):
    _, _, skips = mixed_folder
    assert skips.total == 4 and skips.as_dict()["counts"]["binary"] == 1


@pytest.fixture(scope="module")
def jsonl_rows(tmp_path_factory):
    """(file, documents, skips) of a JSONL file with kept, blank, null, non-UTF-8 and empty lines."""
    f = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    f.write_bytes(b'{"id": "a", "text": "kept"}\n{"id": "b", "text": "   "}\n{"id": "c", "text": null}\n'
                  b'{"id": "d", "text": "\xff\xfe"}\n\n{"id": "e", "text": "also kept"}\n')
    return (f, *read(CorpusConfig(path=str(f))))


def test_jsonl_keeps_rows_with_text(jsonl_rows):
    _, docs, _ = jsonl_rows
    assert [d.doc_id for d in docs] == ["a", "e"]


def test_jsonl_source_is_file_and_line(jsonl_rows):
    f, docs, _ = jsonl_rows
    assert docs[1].source == f"{f}:6"


def test_jsonl_empty_null_and_non_utf8_rows_are_counted(jsonl_rows):
    _, _, skips = jsonl_rows
    assert skips.counts == {"empty": 2, "non_utf8": 1}


def test_jsonl_skipped_rows_are_located(jsonl_rows):
    f, _, skips = jsonl_rows
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


N_ROWS = 2600  # more than one record batch


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """(file, documents, skips) of a Parquet file of N_ROWS rows in row groups of 700, one text null."""
    texts = [f"document number {i}" for i in range(N_ROWS)]
    texts[2500] = None
    f = tmp_path_factory.mktemp("many") / "many.parquet"
    pq.write_table(pa.table({"id": list(range(N_ROWS)), "text": texts}), f, row_group_size=700)
    return (f, *read(CorpusConfig(path=str(f))))


def test_parquet_rows_across_batches(many_rows):
    f, docs, _ = many_rows
    n = N_ROWS
    assert len(docs) == n - 1 and docs[-1].doc_id == str(n - 1) and docs[-1].source == f"{f}:{n - 1}"


def test_parquet_null_text_is_an_empty_skip(many_rows):
    f, _, skips = many_rows
    assert skips.counts == {"empty": 1} and skips.examples["empty"] == [f"{f}:2500"]


def test_parquet_without_title_column_has_no_titles(many_rows):
    _, docs, _ = many_rows
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


@pytest.fixture(scope="module")
def field_folder(tmp_path_factory):
    """A JSONL and a Parquet file with the fields key/body/name, and a plain text file."""
    tmp = tmp_path_factory.mktemp("fields")
    write_jsonl(tmp / "a.jsonl", [{"key": 1, "body": "first body", "name": "First"},
                                  {"key": "two", "body": "second body"}])
    pq.write_table(pa.table({"key": [3, 4], "body": ["third", "fourth"], "name": ["Third", None]}),
                   tmp / "b.parquet")
    (tmp / "notes.md").write_text("# plain text sits next to them\n")
    return tmp


def test_configurable_fields_jsonl_and_parquet(field_folder):
    cfg = CorpusConfig(path=str(field_folder), id_field="key", text_field="body", title_field="name")
    docs, _ = read(cfg)
    assert [(d.doc_id, d.text, d.title) for d in docs] == [
        ("1", "first body", "First"), ("two", "second body", None),
        ("3", "third", "Third"), ("4", "fourth", None),
        ("notes.md", "# plain text sits next to them\n", "notes")]


def test_missing_field_error_names_the_config_key(field_folder):
    with pytest.raises(CorpusError, match=r"a\.jsonl, line 1: missing field 'id' \(config corpus\.id_field\)"):
        read(CorpusConfig(path=str(field_folder), text_field="body"))


@pytest.mark.parametrize("fmt, doc_id", [
    ({}, "docs.data"),  # auto: plain text
    ({"format": "jsonl"}, "a"),
], ids=["auto", "jsonl"])
def test_forced_format(tmp_path, fmt, doc_id):
    f = tmp_path / "docs.data"
    write_jsonl(f, [{"id": "a", "text": "x"}])
    assert read(CorpusConfig(path=str(f), **fmt))[0][0].doc_id == doc_id


def test_max_docs_cap():
    docs, skips = read(CorpusConfig(max_docs=5))
    assert len(docs) == 5 and skips.capped == "max_docs"


def test_max_bytes_cap():
    docs, skips = read(CorpusConfig(max_bytes=50_000))
    assert sum(len(d.text.encode()) for d in docs) == skips.bytes <= 50_000
    assert skips.capped == "max_bytes" and len(docs) >= 1


def test_cap_reached_with_nothing_left_is_not_capped(tmp_path):
    write_jsonl(tmp_path / "two.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}])
    docs, skips = read(CorpusConfig(path=str(tmp_path), max_docs=2))
    assert len(docs) == 2 and skips.capped is None  # nothing was left unread


def test_cap_that_leaves_no_document_is_an_error(tmp_path):
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


# ---------------------------------------------------------------------------------------------
# files that are not plain documents: .json documents, gzip, Parquet string types, huge lines,
# unreadable files and folders, FIFOs, dangling links (issue 13)


def _only(tmp_path: Path, *skip_reasons: str, **settings) -> tuple[list, SkipReport]:
    """Read the folder `tmp_path` (which holds good.txt besides the files under test); the skips
    are exactly of `skip_reasons`."""
    (tmp_path / "good.txt").write_text("a good document\n")
    docs, skips = read(CorpusConfig(path=str(tmp_path), **settings))
    assert "good.txt" in [d.doc_id for d in docs]
    assert set(skips.counts) == set(skip_reasons), skips.counts
    return docs, skips


def test_pretty_printed_json_array_and_object_are_read_as_documents(tmp_path):
    (tmp_path / "many.json").write_text(json.dumps([{"id": "a", "text": "first"},
                                                    {"id": "b", "text": "second", "title": "B"}], indent=2))
    (tmp_path / "one.json").write_text(json.dumps({"id": "c", "text": "third"}, indent=4))
    docs, _ = _only(tmp_path)
    by_id = {d.doc_id: d for d in docs}
    assert [by_id[i].text for i in "abc"] == ["first", "second", "third"] and by_id["b"].title == "B"
    assert by_id["b"].source == f"{tmp_path / 'many.json'}[1]" and by_id["c"].source == str(tmp_path / "one.json")


def test_json_file_written_one_object_per_line_is_read_as_jsonl(tmp_path):
    write_jsonl(tmp_path / "rows.json", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    docs, _ = _only(tmp_path)
    assert sorted(d.doc_id for d in docs) == ["a", "b", "good.txt"]


@pytest.mark.parametrize("content, why", [
    (json.dumps({"name": "my-corpus", "version": 2}, indent=2), "no 'id' and 'text' fields"),
    ('{"name": "my-corpus"}', "no 'id' and 'text' fields"),
    ("[1, 2, 3]", "no 'id' and 'text' fields"),
    ('"just a string"', "not an object or an array"),
    ('{\n  "id": "a",\n  "text": ', "malformed JSON"),
], ids=["config", "one-line-config", "numbers", "string", "malformed"])
def test_json_file_that_holds_no_documents_is_a_counted_skip(tmp_path, content, why):
    (tmp_path / "meta.json").write_text(content)
    _, skips = _only(tmp_path, "not_documents")
    (where,) = skips.examples["not_documents"]
    assert where.startswith(str(tmp_path / "meta.json")) and why in where, where


def test_bad_row_inside_a_json_array_names_the_item(tmp_path):
    (tmp_path / "docs.json").write_text(json.dumps([{"id": "a", "text": "x"}, {"id": "b", "text": 5}]))
    with pytest.raises(CorpusError, match=r"docs\.json, item 1: field 'text' must be a string"):
        read(CorpusConfig(path=str(tmp_path)))


def test_gzip_files_are_read_transparently(tmp_path):
    import gzip

    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"id": "r1", "text": "from jsonl.gz"}\n'))
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress("text from txt.gz \u00e9\n".encode()))
    (tmp_path / "plain.gz").write_bytes(gzip.compress(b"text from .gz\n"))
    docs, skips = _only(tmp_path)
    by_id = {d.doc_id: d for d in docs}
    assert by_id["r1"].text == "from jsonl.gz" and by_id["plain.gz"].text == "text from .gz\n"
    assert by_id["notes.txt.gz"].text == "text from txt.gz \u00e9\n" and by_id["notes.txt.gz"].title == "notes"


def test_gzip_size_limit_applies_to_the_decompressed_bytes(tmp_path):
    import gzip

    (tmp_path / "big.txt.gz").write_bytes(gzip.compress(b"x" * 5000))  # ~40 bytes compressed
    _, skips = _only(tmp_path, "too_large", max_doc_bytes=1000)
    assert skips.examples["too_large"] == [f"{tmp_path / 'big.txt.gz'} (more than max_doc_bytes 1000 "
                                           f"bytes decompressed)"]


def test_gzip_bomb_stops_at_the_decompression_cap(tmp_path, monkeypatch):
    import gzip

    from ratray.data import readers

    monkeypatch.setattr(readers, "GZIP_MIN_CAP", 1 << 20)  # small caps keep the test small
    monkeypatch.setattr(readers, "GZIP_MAX_RATIO", 4)
    rows = b"".join(b'{"id": %d, "text": "same text"}\n' % i for i in range(200_000))  # ~6 MB
    (tmp_path / "bomb.jsonl.gz").write_bytes(gzip.compress(rows))
    docs, skips = _only(tmp_path, "too_large")
    (where,) = skips.examples["too_large"]
    assert "bomb.jsonl.gz" in where and "decompress" in where
    assert 1 < len(docs) < 200_000  # the rows before the cap are kept, the rest is not read


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    with pytest.raises(CorpusError, match=r"broken\.txt\.gz: not a readable gzip file"):
        read(CorpusConfig(path=str(tmp_path)))


def test_parquet_dictionary_string_view_and_large_string_columns_are_read(tmp_path):
    f = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"id": pa.array(["a", "b"]).cast(pa.string_view()),
                             "text": pa.array(["one", "two"]).dictionary_encode(),
                             "title": pa.array(["A", None], pa.large_string())}), f)
    assert pq.ParquetFile(f).schema_arrow.field("text").type.id == pa.dictionary(pa.int32(), pa.string()).id
    docs, _ = read(CorpusConfig(path=str(f)))
    assert [(d.doc_id, d.text, d.title) for d in docs] == [("a", "one", "A"), ("b", "two", None)]


def test_overlong_jsonl_line_is_skipped_without_reading_it_whole(tmp_path):
    import tracemalloc

    f = tmp_path / "rows.jsonl"
    with open(f, "wb") as out:
        out.write(b'{"id": "a", "text": "kept"}\n{"id": "huge", "text": "')
        for _ in range(24):
            out.write(b"y" * (1 << 20))  # a 24 MiB line
        out.write(b'"}\n{"id": "b", "text": "also kept"}\n')
    tracemalloc.start()
    try:
        docs, skips = read(CorpusConfig(path=str(f), max_doc_bytes=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.doc_id for d in docs] == ["a", "b"] and skips.counts == {"too_large": 1}
    assert skips.examples["too_large"][0].startswith(f"{f}:2 (line longer than")
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the line was held whole"


def _deny(monkeypatch, *denied: Path) -> None:
    """Make `denied` unreadable: chmod 000, and for root (whom chmod does not stop) a
    PermissionError from os.open / os.scandir, as the kernel gives any other user."""
    for p in denied:
        p.chmod(0)
    if os.geteuid() != 0:
        return
    real_open, real_scandir = os.open, os.scandir

    def refuse(path, *a, **k):
        if Path(os.fsdecode(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, *a, **k)

    def refuse_dir(path="."):
        if Path(os.fsdecode(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "scandir", refuse_dir)


def test_unreadable_file_and_folder_are_counted_skips(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("not for us\n")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "inner.txt").write_text("not for us either\n")
    _deny(monkeypatch, tmp_path / "secret.txt", tmp_path / "locked")
    try:
        _, skips = _only(tmp_path, "unreadable")
        fp = corpus_fingerprint(CorpusConfig(path=str(tmp_path)))  # no PermissionError either
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert skips.counts == {"unreadable": 2} and len(fp) == 64
    ex = " ".join(skips.examples["unreadable"])
    assert f"{tmp_path / 'secret.txt'} (Permission denied)" in ex and f"{tmp_path / 'locked'}" in ex


def test_fifo_in_the_corpus_is_skipped_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")  # opening it for reading would block until a writer comes

    def blocked(*_):
        raise TimeoutError("reading the corpus blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)  # a regression fails, never hangs the suite
    signal.alarm(20)
    try:
        _, skips = _only(tmp_path, "not_regular")
        fp = corpus_fingerprint(CorpusConfig(path=str(tmp_path)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert skips.examples["not_regular"] == [f"{tmp_path / 'pipe.txt'} (a FIFO)"] and len(fp) == 64


def test_dangling_symlink_is_a_counted_skip_naming_the_link(tmp_path):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    _, skips = _only(tmp_path, "dangling_link")
    (where,) = skips.examples["dangling_link"]
    assert where.startswith(f"{tmp_path / 'gone.txt'} -> {tmp_path / 'nowhere.txt'}")
    assert len(corpus_fingerprint(CorpusConfig(path=str(tmp_path)))) == 64


def test_unwritable_chunk_store_folder_is_a_clear_error(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in stdlib_files(2):
        shutil.copy(p, corpus / p.name)
    ro = tmp_path / "work"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores the mode: refuse like the kernel does for anyone else
        real_mkdir = os.mkdir

        def refuse(path, *a, **k):
            if Path(os.fsdecode(path)).is_relative_to(ro):
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", refuse)
    try:
        with pytest.raises(ChunkStoreError, match=rf"chunk store folder {ro / 'chunks'} is not writable "
                                                  r"\(Permission denied\)"):
            build_chunk_store(CorpusConfig(path=str(corpus)), ChunkConfig(vocab_size=300),
                              ro / "chunks", progress=False)
    finally:
        ro.chmod(0o755)
