"""Corpus file readers: one file → (Document, UTF-8 bytes) pairs, with what they drop counted.

How a file is opened matters as much as how it is parsed:
  - only a regular file is ever read: it is opened with O_NONBLOCK and checked with fstat, so a
    FIFO (which would block the build until a writer comes) or a device is refused unopened-for-
    reading; a file we may not open is a counted skip ("unreadable"), not a PermissionError;
  - `*.gz` is read through gzip (the format is the name without `.gz`: `a.jsonl.gz` is JSONL), and
    every size limit applies to the decompressed bytes. A gzip file stops being read once it has
    decompressed past GZIP_MAX_RATIO times its size (at least GZIP_MIN_CAP): a decompression bomb
    costs at most that, and is counted as "too_large";
  - lines are read with a bounded reader: a JSONL line longer than
    JSON_ESCAPE_FACTOR × max_doc_bytes + LINE_SLACK_BYTES is skipped ("too_large", file:line)
    block by block, never held whole.
A `.json` file (format auto) is JSONL when its first line is a whole object, else one JSON
document: an object (one document) or an array of objects. A `.json` file that holds no documents
(a config or manifest next to the data: no id/text fields in its first object, not an object or
array, malformed) is skipped as "not_documents", never an error.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ratray.config import CorpusConfig
from ratray.data.records import CorpusError, Document, SkipReport

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
GZIP_SUFFIX = ".gz"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary
PARQUET_BATCH_ROWS = 1024  # rows per record batch when streaming a Parquet file
READ_BLOCK = 1 << 20  # bytes per read when skipping an over-long line
JSON_ESCAPE_FACTOR = 6  # one UTF-8 byte takes at most 6 bytes in JSON (\u00XX)
LINE_SLACK_BYTES = 1 << 20  # room for a JSONL row's other fields beside its text
JSON_DOCUMENT_MAX_BYTES = 256 << 20  # a larger whole-document .json is not parsed (write JSONL)
GZIP_MAX_RATIO = 200  # text compresses ~3-20×; far beyond that is a bomb, not a corpus
GZIP_MIN_CAP = 64 << 20  # decompressed bytes always allowed, whatever the ratio

Docs = Iterator[tuple[Document, int]]  # what a reader yields: a document and its UTF-8 bytes
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class _Bomb(Exception):
    """A gzip stream decompressed past its cap."""


# ---------------------------------------------------------------------------------------------
# files


def entry_problem(path: Path) -> tuple[str, str] | None:
    """(skip reason, where) when the listed entry `path` is not a regular file we can stat: a
    dangling (or looping) symlink, a FIFO, socket or device. Decided by stat, never by opening."""
    try:
        st = os.stat(path)
    except OSError as e:
        if path.is_symlink():
            return "dangling_link", f"{path} -> {os.readlink(path)} ({e.strerror})"
        return "unreadable", f"{path} ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not_regular", f"{path} ({next((k for f, k in _KINDS if f(st.st_mode)), 'not a file')})"
    return None


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for binary reading. O_NONBLOCK makes opening a FIFO (swapped in after the
    listing) return at once; fstat then refuses anything but a regular file (OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file (mode {stat.filemode(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: Path, h) -> int | None:
    """Feed the file's bytes to hash `h`; its size, or None when it cannot be opened."""
    try:
        f = open_regular(path)
    except OSError:
        return None
    with f:
        n = 0
        while block := f.read(READ_BLOCK):
            h.update(block)
            n += len(block)
    return n


def logical_name(path: Path) -> str:
    """The name that decides the format: without a `.gz` suffix."""
    return path.name[: -len(GZIP_SUFFIX)] if _is_gzip(path) else path.name


def file_format(path: Path, cfg: CorpusConfig) -> str:
    """`text` | `jsonl` | `json` | `parquet`. A forced format (not auto) applies to every file of the
    corpus; the default (stdlib) corpus is always text."""
    if cfg.path is None:
        return "text"
    if cfg.format != "auto":
        return cfg.format
    suffix = Path(logical_name(path)).suffix.lower()
    for suffixes, fmt in ((JSONL_SUFFIXES, "jsonl"), (JSON_SUFFIXES, "json"), (PARQUET_SUFFIXES, "parquet")):
        if suffix in suffixes:
            return fmt
    return "text"


class _Capped(io.RawIOBase):
    """A gzip stream that raises _Bomb once more than `cap` bytes came out of it."""

    def __init__(self, raw: gzip.GzipFile, cap: int):
        self.raw, self.cap, self.total = raw, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.total += n
        if self.total > self.cap:
            raise _Bomb(f"decompressed past {self.cap} bytes, more than {GZIP_MAX_RATIO}× its "
                        f"compressed size: not read further")
        return n


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(GZIP_SUFFIX)


def _stream(f: BinaryIO, path: Path) -> BinaryIO:
    """What the readers read: the file, or its decompressed bytes for a `.gz` (capped)."""
    if not _is_gzip(path):
        return f
    cap = max(GZIP_MIN_CAP, GZIP_MAX_RATIO * os.fstat(f.fileno()).st_size)
    return io.BufferedReader(_Capped(gzip.GzipFile(fileobj=f, mode="rb"), cap), READ_BLOCK)


def bounded_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary stream with at most `limit` + 1 bytes of a line in memory;
    a longer line is yielded as None after skipping the rest of it block by block."""
    lineno = 0
    while line := f.readline(limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(READ_BLOCK)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
        else:
            yield lineno, line


def _line_limit(cfg: CorpusConfig) -> int:
    return JSON_ESCAPE_FACTOR * cfg.max_doc_bytes + LINE_SLACK_BYTES


def read_file(path: Path, root: Path, cfg: CorpusConfig, skips: SkipReport) -> Docs:
    """The documents of one corpus file, in the format `file_format` gives it (see the module docstring)."""
    fmt = file_format(path, cfg)
    try:
        if fmt == "json":
            with open_regular(path) as f:
                fmt, why = _json_kind(_stream(f, path), cfg)
            if why:
                skips.add("not_documents", f"{path} ({why})")
                return
        f = open_regular(path)
    except _Bomb as e:
        skips.add("too_large", f"{path} ({e})")
        return
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: not a readable gzip file ({e})") from None
    except OSError as e:  # permission denied, vanished since the listing, a FIFO swapped in
        skips.add("unreadable", f"{path} ({e.strerror or e})")
        return
    with f:
        try:
            stream = _stream(f, path)
            if fmt == "text":
                yield from _read_text(path, stream, root, cfg, skips)
            elif fmt == "parquet":
                yield from _read_parquet(path, stream, cfg, skips)
            elif fmt == "jsonl":
                yield from _read_jsonl(path, stream, cfg, skips)
            else:
                yield from _read_json_document(path, stream, cfg, skips)
        except _Bomb as e:
            skips.add("too_large", f"{path} ({e})")
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise CorpusError(f"{path}: not a readable gzip file ({e})") from None
        except OSError as e:
            raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# formats


def _title_for(rel: Path) -> str:
    if rel.suffix == ".py":
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        return ".".join(parts)
    return rel.stem


def _read_text(path: Path, f: BinaryIO, root: Path, cfg: CorpusConfig,
               skips: SkipReport) -> Docs:
    where = str(path)
    if not _is_gzip(path):
        size = os.fstat(f.fileno()).st_size
        if size > cfg.max_doc_bytes:  # checked before reading: a huge file is never loaded
            skips.add("too_large", f"{where} ({size} bytes > max_doc_bytes {cfg.max_doc_bytes})")
            return
    data = f.read(cfg.max_doc_bytes + 1)
    if len(data) > cfg.max_doc_bytes:  # a gzip file (or one that grew since its stat)
        skips.add("too_large", f"{where} (more than max_doc_bytes {cfg.max_doc_bytes} bytes decompressed)")
        return
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
    yield Document(rel.as_posix(), text, _title_for(rel.with_name(logical_name(rel))), where), len(data)


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
    """Size and emptiness checks shared by the JSON(L) and Parquet readers."""
    if text is None or not text.strip():
        skips.add("empty", where)
        return None
    n = len(text.encode("utf-8"))
    if n > cfg.max_doc_bytes:
        skips.add("too_large", f"{where} ({n} bytes > max_doc_bytes {cfg.max_doc_bytes})")
        return None
    return Document(doc_id, text, title, where), n


def _row(row: object, label: str, where: str, cfg: CorpusConfig,
         skips: SkipReport) -> tuple[Document, int] | None:
    """One JSON row (a JSONL line, a JSON array item) checked: `label` locates it in errors
    ("file, line 3"), `where` is its Document.source."""
    if not isinstance(row, dict):
        raise CorpusError(f"{label}: expected a JSON object, got {type(row).__name__}")
    for fld, key in ((cfg.id_field, "corpus.id_field"), (cfg.text_field, "corpus.text_field")):
        if fld not in row:
            raise CorpusError(f"{label}: missing field '{fld}' (config {key}); fields present: {sorted(row)}")
    doc_id = _check_id(row[cfg.id_field], label, cfg.id_field)
    text = row[cfg.text_field]
    if text is not None and not isinstance(text, str):
        raise CorpusError(f"{label}: field '{cfg.text_field}' must be a string, got {type(text).__name__}")
    title = row.get(cfg.title_field) if cfg.title_field else None
    if title is not None and not isinstance(title, str):
        raise CorpusError(f"{label}: field '{cfg.title_field}' (title) must be a string or null, "
                          f"got {type(title).__name__}")
    return _accept(doc_id, text, title, where, cfg, skips)


def _read_jsonl(path: Path, f: BinaryIO, cfg: CorpusConfig, skips: SkipReport) -> Docs:
    """One JSON object per line. Blank lines are ignored; a null text is skipped as "empty"."""
    limit = _line_limit(cfg)
    for lineno, raw in bounded_lines(f, limit):
        where = f"{path}:{lineno}"
        if raw is None:
            skips.add("too_large", f"{where} (line longer than {limit} bytes = {JSON_ESCAPE_FACTOR} × "
                                   f"max_doc_bytes + {LINE_SLACK_BYTES})")
            continue
        if not raw.strip():
            continue
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
        except RecursionError:
            raise CorpusError(f"{path}, line {lineno}: malformed JSON (nested too deeply)") from None
        if (got := _row(row, f"{path}, line {lineno}", where, cfg, skips)) is not None:
            yield got


def _holds_documents(row: object, cfg: CorpusConfig) -> bool:
    return isinstance(row, dict) and cfg.id_field in row and cfg.text_field in row


def _not_documents(cfg: CorpusConfig) -> str:
    return f"no '{cfg.id_field}' and '{cfg.text_field}' fields in its first object: not a corpus file"


def _json_kind(f: BinaryIO, cfg: CorpusConfig) -> tuple[str, str | None]:
    """How to read a `.json` file, from its first non-blank line: ("jsonl" | "json", None), or
    (_, why) when its first line is a whole object that holds no document."""
    for _, raw in bounded_lines(f, _line_limit(cfg)):
        if raw is None:
            return "json", None
        if raw.strip():
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):  # the first line of a pretty-printed document
                return "json", None
            if not isinstance(row, dict):
                return "json", None
            return "jsonl", None if _holds_documents(row, cfg) else _not_documents(cfg)
    return "json", None


def _read_json_document(path: Path, f: BinaryIO, cfg: CorpusConfig,
                        skips: SkipReport) -> Docs:
    """A `.json` file holding one JSON document: an object (one document) or an array of objects."""
    data = f.read(JSON_DOCUMENT_MAX_BYTES + 1)
    if len(data) > JSON_DOCUMENT_MAX_BYTES:
        skips.add("too_large", f"{path} (a JSON document over {JSON_DOCUMENT_MAX_BYTES} bytes is not "
                               f"parsed whole: write one object per line, JSONL)")
        return
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        skips.add("non_utf8", f"{path} (byte offset {e.start})")
        return
    except json.JSONDecodeError as e:
        skips.add("not_documents", f"{path} (malformed JSON: {e.msg} at line {e.lineno} column {e.colno})")
        return
    except RecursionError:
        skips.add("not_documents", f"{path} (JSON nested too deeply)")
        return
    if isinstance(doc, dict):
        rows = [(doc, str(path), str(path))]
    elif isinstance(doc, list):
        rows = [(r, f"{path}, item {i}", f"{path}[{i}]") for i, r in enumerate(doc)]
    else:
        skips.add("not_documents", f"{path} (a JSON {type(doc).__name__}, not an object or an array of "
                                   f"objects)")
        return
    if not rows:
        skips.add("empty", str(path))
        return
    if not _holds_documents(rows[0][0], cfg):
        skips.add("not_documents", f"{path} ({_not_documents(cfg)})")
        return
    for row, label, where in rows:
        if (got := _row(row, label, where, cfg, skips)) is not None:
            yield got


def _text_type(t: pa.DataType) -> bool:
    """A column type whose values are str: string, large_string, string_view, or a dictionary of them."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _read_parquet(path: Path, f: BinaryIO, cfg: CorpusConfig, skips: SkipReport) -> Docs:
    """One row per document, streamed in record batches. Columns are checked against the schema
    before any row is read; a null text is skipped as "empty", a null id is an error."""
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    names = schema.names
    for fld, key in ((cfg.id_field, "corpus.id_field"), (cfg.text_field, "corpus.text_field")):
        if fld not in names:
            raise CorpusError(f"{path}: missing column '{fld}' (config {key}); available columns: {names}")
    id_type, text_type = schema.field(cfg.id_field).type, schema.field(cfg.text_field).type
    id_base = id_type.value_type if pa.types.is_dictionary(id_type) else id_type
    if not (pa.types.is_integer(id_base) or _text_type(id_base)):
        raise CorpusError(f"{path}: column '{cfg.id_field}' (the document id) must be string or integer, "
                          f"got {id_type}")
    if not _text_type(text_type):
        raise CorpusError(f"{path}: column '{cfg.text_field}' must be a string column, got {text_type}")
    columns = [cfg.id_field, cfg.text_field]
    has_title = bool(cfg.title_field) and cfg.title_field in names
    if has_title:
        t = schema.field(cfg.title_field).type
        if not _text_type(t):
            raise CorpusError(f"{path}: column '{cfg.title_field}' (title) must be a string column, got {t}")
        columns.append(cfg.title_field)
    row0 = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        # to_pylist gives str for every text type above (dictionary values decoded)
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
