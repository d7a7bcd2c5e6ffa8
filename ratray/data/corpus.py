"""Corpus reading and validation: files → Documents, with every dropped document accounted for.

A corpus is a file or a folder (read recursively, formats may be mixed):
  - plain text (any suffix other than the ones below): one document per file,
    doc_id = path relative to the corpus root (posix), title = dotted module name for `.py`, else stem;
  - JSONL (`.jsonl`, `.ndjson`): one JSON object per line, fields named by the config;
  - JSON (`.json`): JSONL, or one pretty-printed document: an object or an array of objects;
  - Parquet (`.parquet`): one row per document, read in record batches;
  - any of them gzip-compressed (`.gz`: `a.jsonl.gz`, `b.txt.gz`; a bare `c.gz` is text).
Only regular files are opened, lines are read bounded, gzip is capped: ratray/data/readers.py.
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
                       a JSONL line over 6 × max_doc_bytes + 1 MiB       JSONL line
                       a gzip file past its decompression cap (a bomb)   gzip file
  not_documents        a `.json` file without documents (a config, ...)  JSON file
  unreadable           a file or folder we may not open (permissions)    folder listing, file
  not_regular          a FIFO, socket or device (never opened)           folder listing
  dangling_link        a symlink to nothing, or a loop                   folder listing
  hidden               a dot-file or dot-folder inside a corpus folder   folder listing
  shorter_than_chunk   fewer tokens than one chunk (added by chunks.py)  any (bpe stores)
  duplicate            the same text as an earlier document (clean.py)   any (corpus.dedup)
  near_duplicate       a train near-duplicate (clean.py)                 any (corpus.near_dup=drop)
  no_tokens            no wordpiece at all (added by chunks.py)          any (wordpiece stores)

Errors (never skipped): nonexistent path, malformed JSON line, a row that is not an object, a missing
id/text field or column, a non-string text, an id that is not a string or integer, duplicate ids
across the whole corpus, an unreadable Parquet or gzip file, and an empty corpus (zero documents
after skips).

This module knows nothing of tokenizers or Ray.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Collection, Iterable, Iterator

from ratray.config import CorpusConfig
from ratray.data.readers import entry_problem, file_digest, read_file
from ratray.data.records import CorpusError, Document, SkipReport  # re-exported: the corpus API
from ratray.data.versions import edited, version_id

__all__ = ["CorpusError", "Document", "SkipReport", "corpus_fingerprint", "default_corpus_path",
           "is_validation", "iter_documents", "list_corpus_files", "plan_split", "split_of",
           "split_score"]


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
    """All regular files under `root`, recursively, in sorted (deterministic) order.

    Folders named in `prune` are not part of the corpus and are not entered (`__pycache__`; for the
    default corpus also the test suites and site-packages); dot-files and dot-folders (`.git`, ...)
    are skipped and counted once each as "hidden"; a folder we may not list as "unreadable"; a
    FIFO, socket or device, or a symlink to a folder (not followed) as "not_regular"; a symlink to
    nothing as "dangling_link". None of them is opened.
    """
    out: list[Path] = []

    def unlistable(e: OSError) -> None:
        skips.add("unreadable", f"{e.filename} ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                skips.add("hidden", str(here / d))
            elif (here / d).is_symlink():
                skips.add("not_regular", f"{here / d} (a symlink to a folder: not followed)")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in prune
                             and not (here / d).is_symlink())
        for f in sorted(filenames):
            if f.startswith("."):
                skips.add("hidden", str(here / f))
            elif problem := entry_problem(here / f):
                skips.add(*problem)
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
    if not path.is_dir():
        if problem := entry_problem(path):  # a FIFO or device named directly: never opened
            skips.add(*problem)
            return path.parent, []
        return path.parent, [path]
    return path, _walk(path, skips)


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
    done = False
    for path in files:
        for doc, size in read_file(path, root, cfg, skips):
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


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """sha256 over the corpus's sorted file list: relative path, size and content hash of each file.

    Changes whenever a file is added, removed, renamed or edited. Settings (fields, caps, split) are
    not part of it: the chunk store key adds those. A file we may not open counts by name only, so
    it changes the fingerprint once it becomes readable.
    """
    root, files = list_corpus_files(cfg)
    h = hashlib.sha256(b"ratray-corpus-v1\n")
    for path in files:
        rel = path.relative_to(root).as_posix()
        content = hashlib.sha256()
        size = file_digest(path, content)
        h.update(f"{rel}\0{size}\0{content.hexdigest()}\n".encode() if size is not None
                 else f"{rel}\0unreadable\n".encode())
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


def plan_split(cfg: CorpusConfig, skips: SkipReport,
               docs: Iterable[Document] | None = None) -> tuple[dict[str, int], str | None]:
    """Read every document once: documents per split, and the document forced into "val" when the
    hash put none there although val_fraction > 0 and there are ≥ 2 documents (the one with the
    smallest `split_score`, nearest to the val side), so a small corpus still holds one out.

    `docs`: the documents to plan (default: `iter_documents(cfg, skips)`; the chunk store passes
    them through its cleaner, so removed duplicates take no split)."""
    n = {"train": 0, "val": 0, "db": 0}
    nearest: tuple[float, str, str] | None = None  # (split_score, doc_id, its split)
    for doc in (iter_documents(cfg, skips) if docs is None else docs):
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
