"""Corpus reading and validation: files → Documents, with every dropped document accounted for.

A corpus is a file or a folder (read recursively, formats may be mixed):
  - plain text (any suffix other than the ones below): one document per file,
    doc_id = path relative to the corpus root (posix), title = dotted module name for `.py`, else stem;
  - JSONL (`.jsonl`, `.ndjson`, `.json`): one JSON object per line, fields named by the config;
  - Parquet (`.parquet`): one row per document, read in record batches.
With `path: None` the corpus is this interpreter's standard library source (see `default_corpus_path`).
With `versions: n`, every document read is followed by n edited copies of it (ratray/data/versions.py).

Splits, by document: "val" when `split_score(doc_id, seed) < val_fraction`, "db" (the retrieval
database only, never trained on) when it is below val_fraction + db_fraction, else "train".

Bad input either raises `CorpusError` (the message names the file, the row and the field), or — for
problems that are a property of one document rather than of the corpus's structure — skips that
document and counts it in a `SkipReport` under a reason, with its location:

  reason               what                                              where
  non_utf8             bytes that are not valid UTF-8                    text file, JSONL line
  binary               a NUL byte in the first 8 KiB                     text file
  empty                empty / whitespace-only text, or a null text      any
  too_large            more than `max_doc_bytes` UTF-8 bytes             any
  hidden               a dot-file or dot-folder inside a corpus folder   folder listing
  shorter_than_chunk   fewer tokens than one chunk (added by chunks.py)  any (bpe stores)
  no_tokens            no wordpiece at all (added by chunks.py)          any (wordpiece stores)

Errors (never skipped): nonexistent path, malformed JSON line, a row that is not an object, a missing
id/text field or column, a non-string text, an id that is not a string or integer, duplicate ids
across the whole corpus, an unreadable Parquet file, and an empty corpus (zero documents after skips).

This module knows nothing of tokenizers or Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ratray.config import CorpusConfig
from ratray.data.versions import edited, version_id

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary
PARQUET_BATCH_ROWS = 1024  # rows per record batch when streaming a Parquet file
MAX_EXAMPLES = 5  # locations kept per skip reason


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the file, row and field."""


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique across the corpus
    text: str  # non-empty, valid UTF-8 when encoded
    title: str | None
    source: str  # "path" for a text file, "path:row" for JSONL (1-based line) / Parquet (0-based row)


@dataclass
class SkipReport:
    """Documents dropped while reading, by reason, plus what was read and whether a cap stopped it.

    `capped` is not a skip: it names the cap ("max_docs" / "max_bytes") that stopped reading early,
    or is None when the whole corpus was read.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    capped: str | None = None
    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the documents yielded

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport) -> SkipReport:
        """Add `other`'s counts and stats into this report (in place); returns self."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(ex)])
        self.capped = self.capped or other.capped
        self.documents += other.documents
        self.bytes += other.bytes
        return self

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())},
                "capped": self.capped, "documents": self.documents, "bytes": self.bytes}


# ---------------------------------------------------------------------------------------------
# listing files


def default_corpus_path() -> Path:
    """This interpreter's standard library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _is_stdlib_source(rel: Path) -> bool:
    """The default corpus: stdlib `*.py`, without test suites, site-packages or caches."""
    return (rel.suffix == ".py" and not rel.name.startswith("test_")
            and not any(part in _STDLIB_EXCLUDED_DIRS for part in rel.parts[:-1]))


def _walk(root: Path, skips: SkipReport, prune: Collection[str] = ("__pycache__",)) -> list[Path]:
    """All files under `root`, recursively, in sorted (deterministic) order.

    Folders named in `prune` are not part of the corpus and are not entered (`__pycache__`; for the
    default corpus also the test suites and site-packages); dot-files and dot-folders (`.git`, ...)
    are skipped and counted once each as "hidden".
    """
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                skips.add("hidden", str(here / d))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in prune)
        for f in sorted(filenames):
            if f.startswith("."):
                skips.add("hidden", str(here / f))
            else:
                out.append(here / f)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def list_corpus_files(cfg: CorpusConfig, skips: SkipReport | None = None) -> tuple[Path, list[Path]]:
    """(root, files): the corpus root (ids are relative to it) and its files in sorted order."""
    skips = skips if skips is not None else SkipReport()
    if cfg.path is None:
        root = default_corpus_path()
        files = [p for p in _walk(root, SkipReport(), _STDLIB_EXCLUDED_DIRS)
                 if _is_stdlib_source(p.relative_to(root))]
        return root, files
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist (config corpus.path)")
    if path.is_file():
        return path.parent, [path]
    return path, _walk(path, skips)


def _file_format(path: Path, cfg: CorpusConfig) -> str:
    """`text` | `jsonl` | `parquet`. A forced format (not auto) applies to every file of the corpus;
    the default (stdlib) corpus is always text."""
    if cfg.path is None:
        return "text"
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


# ---------------------------------------------------------------------------------------------
# readers: each yields (Document, utf8_bytes) and adds what it drops to `skips`


def _title_for(rel: Path) -> str:
    if rel.suffix == ".py":
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        return ".".join(parts)
    return rel.stem


def _read_text(path: Path, root: Path, cfg: CorpusConfig,
               skips: SkipReport) -> Iterator[tuple[Document, int]]:
    where = str(path)
    try:
        size = path.stat().st_size
        if size > cfg.max_doc_bytes:  # checked before reading: a huge file is never loaded
            skips.add("too_large", f"{where} ({size} bytes > max_doc_bytes {cfg.max_doc_bytes})")
            return
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{where}: cannot read ({e.strerror or e})") from None
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        skips.add("binary", where)
        return
    try:
        text = data.decode("utf-8")  # no newline translation: CRLF stays CRLF
    except UnicodeDecodeError as e:
        skips.add("non_utf8", f"{where} (byte offset {e.start})")
        return
    if not text.strip():
        skips.add("empty", where)
        return
    rel = path.relative_to(root)
    yield Document(rel.as_posix(), text, _title_for(rel), where), len(data)


def _check_id(value: object, where: str, fld: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusError(f"{where}: field '{fld}' (the document id) must be a string or an integer, "
                          f"got {type(value).__name__} {value!r:.40}")
    doc_id = str(value)
    if not doc_id.strip():
        raise CorpusError(f"{where}: field '{fld}' (the document id) is empty")
    return doc_id


def _accept(doc_id: str, text: str | None, title: str | None, where: str, cfg: CorpusConfig,
            skips: SkipReport) -> tuple[Document, int] | None:
    """Size and emptiness checks shared by the JSONL and Parquet readers."""
    if text is None or not text.strip():
        skips.add("empty", where)
        return None
    n = len(text.encode("utf-8"))
    if n > cfg.max_doc_bytes:
        skips.add("too_large", f"{where} ({n} bytes > max_doc_bytes {cfg.max_doc_bytes})")
        return None
    return Document(doc_id, text, title, where), n


def _read_jsonl(path: Path, cfg: CorpusConfig, skips: SkipReport) -> Iterator[tuple[Document, int]]:
    """One JSON object per line. Blank lines are ignored; a null text is skipped as "empty"."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                skips.add("non_utf8", f"{where} (byte offset {e.start} of the line)")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}, line {lineno}: malformed JSON "
                                  f"({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            for fld, key in ((cfg.id_field, "corpus.id_field"), (cfg.text_field, "corpus.text_field")):
                if fld not in row:
                    raise CorpusError(f"{path}, line {lineno}: missing field '{fld}' (config {key}); "
                                      f"fields present: {sorted(row)}")
            doc_id = _check_id(row[cfg.id_field], f"{path}, line {lineno}", cfg.id_field)
            text = row[cfg.text_field]
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{path}, line {lineno}: field '{cfg.text_field}' must be a string, "
                                  f"got {type(text).__name__}")
            title = row.get(cfg.title_field) if cfg.title_field else None
            if title is not None and not isinstance(title, str):
                raise CorpusError(f"{path}, line {lineno}: field '{cfg.title_field}' (title) must be a "
                                  f"string or null, got {type(title).__name__}")
            got = _accept(doc_id, text, title, where, cfg, skips)
            if got is not None:
                yield got


def _read_parquet(path: Path, cfg: CorpusConfig, skips: SkipReport) -> Iterator[tuple[Document, int]]:
    """One row per document, streamed in record batches. Columns are checked against the schema
    before any row is read; a null text is skipped as "empty", a null id is an error."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    names = schema.names
    for fld, key in ((cfg.id_field, "corpus.id_field"), (cfg.text_field, "corpus.text_field")):
        if fld not in names:
            raise CorpusError(f"{path}: missing column '{fld}' (config {key}); available columns: {names}")
    id_type, text_type = schema.field(cfg.id_field).type, schema.field(cfg.text_field).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise CorpusError(f"{path}: column '{cfg.id_field}' (the document id) must be string or integer, "
                          f"got {id_type}")
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise CorpusError(f"{path}: column '{cfg.text_field}' must be a string column, got {text_type}")
    columns = [cfg.id_field, cfg.text_field]
    has_title = bool(cfg.title_field) and cfg.title_field in names
    if has_title:
        t = schema.field(cfg.title_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise CorpusError(f"{path}: column '{cfg.title_field}' (title) must be a string column, got {t}")
        columns.append(cfg.title_field)
    row0 = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        ids = batch.column(0).to_pylist()
        texts = batch.column(1).to_pylist()
        titles = batch.column(2).to_pylist() if has_title else [None] * len(ids)
        for i, (raw_id, text, title) in enumerate(zip(ids, texts, titles)):
            row = row0 + i
            if raw_id is None:
                raise CorpusError(f"{path}, row {row}: column '{cfg.id_field}' (the document id) is null")
            doc_id = _check_id(raw_id, f"{path}, row {row}", cfg.id_field)
            got = _accept(doc_id, text, title, f"{path}:{row}", cfg, skips)
            if got is not None:
                yield got
        row0 += len(ids)


# ---------------------------------------------------------------------------------------------
# the corpus


def iter_documents(cfg: CorpusConfig, skips: SkipReport) -> Iterator[Document]:
    """Every document of the corpus, in deterministic order, validated.

    Dropped documents are counted in `skips`. Reading stops at `cfg.max_docs` documents or before
    the document that would take the total past `cfg.max_bytes` UTF-8 bytes; `skips.capped` then
    names the cap. Raises CorpusError for structural problems (see the module docstring), including
    a corpus that yields no document at all.
    """
    root, files = list_corpus_files(cfg, skips)
    seen: dict[str, str] = {}  # doc_id → source, for duplicate detection
    readers = {"text": lambda p: _read_text(p, root, cfg, skips),
               "jsonl": lambda p: _read_jsonl(p, cfg, skips),
               "parquet": lambda p: _read_parquet(p, cfg, skips)}
    done = False
    for path in files:
        for doc, size in readers[_file_format(path, cfg)](path):
            if cfg.max_docs is not None and skips.documents >= cfg.max_docs:
                skips.capped = "max_docs"
            elif cfg.max_bytes is not None and skips.bytes + size > cfg.max_bytes:
                skips.capped = "max_bytes"
            if skips.capped:
                done = True
                break
            if doc.doc_id in seen:
                raise CorpusError(f"duplicate document id {doc.doc_id!r}: at {seen[doc.doc_id]} "
                                  f"and at {doc.source}")
            seen[doc.doc_id] = doc.source
            skips.documents += 1
            skips.bytes += size
            yield doc
            for i in range(1, cfg.versions + 1):  # derived: not counted against the caps
                vid = version_id(doc.doc_id, i)
                if vid in seen:
                    raise CorpusError(f"document id {vid!r} at {seen[vid]} collides with version "
                                      f"{i + 1} of {doc.doc_id!r} (corpus.versions)")
                seen[vid] = doc.source
                text = edited(doc.text, doc.doc_id, i, cfg.seed) if cfg.version_edits else doc.text
                yield Document(vid, text, doc.title,
                               f"{doc.source} (version {i + 1})")
        if done:
            break
    if not seen:
        where = cfg.path if cfg.path is not None else f"{root} (default stdlib corpus)"
        what = "contains no files" if not files else f"has no documents left after skips ({len(files)} files)"
        detail = f"; skipped: {skips.counts}; examples: {skips.examples}" if skips.total else ""
        cap = f"; stopped by cap {skips.capped}" if skips.capped else ""
        raise CorpusError(f"empty corpus: {where} {what}{detail}{cap}")


# ---------------------------------------------------------------------------------------------
# identity and split


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 over the corpus's sorted file list: relative path, size and content hash of each file.

    Changes whenever a file is added, removed, renamed or edited. Settings (fields, caps, split) are
    not part of it: the chunk store key adds those.
    """
    root, files = list_corpus_files(cfg)
    h = hashlib.sha256(b"ratray-corpus-v1\n")
    for path in files:
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0{_file_sha256(path)}\n".encode())
    return h.hexdigest()


def split_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc_id): the document's position on the split line."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic train/val assignment by document: the whole document goes to one side."""
    return split_score(doc_id, seed) < val_fraction


def split_of(doc_id: str, cfg: CorpusConfig) -> str:
    """"val", "db" or "train": the whole document goes to one split."""
    score = split_score(doc_id, cfg.seed)
    return "val" if score < cfg.val_fraction else "db" if score < cfg.val_fraction + cfg.db_fraction \
        else "train"


def plan_split(cfg: CorpusConfig, skips: SkipReport) -> tuple[dict[str, int], str | None]:
    """Read every document once: documents per split, and the document forced into "val" when the
    hash put none there although val_fraction > 0 and there are ≥ 2 documents (the one with the
    smallest `split_score`, nearest to the val side), so a small corpus still holds one out."""
    n = {"train": 0, "val": 0, "db": 0}
    nearest: tuple[float, str, str] | None = None  # (split_score, doc_id, its split)
    for doc in iter_documents(cfg, skips):
        s = split_of(doc.doc_id, cfg)
        n[s] += 1
        score = split_score(doc.doc_id, cfg.seed)
        if nearest is None or score < nearest[0]:
            nearest = (score, doc.doc_id, s)
    forced = None
    if cfg.val_fraction > 0 and n["val"] == 0 and n["train"] + n["db"] >= 2 and nearest is not None:
        forced = nearest[1]
        n[nearest[2]] -= 1
        n["val"] = 1
    if n["train"] == 0:
        raise CorpusError(f"the train split is empty: all {sum(n.values())} documents fell into val or "
                          f"db (corpus.val_fraction={cfg.val_fraction}, db_fraction={cfg.db_fraction}); "
                          f"lower them or add documents")
    return n, forced
