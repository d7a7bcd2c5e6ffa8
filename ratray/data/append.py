"""Live updates of a chunk store: append documents, remove documents (tombstones).

    add (file | folder) ─ corpus readers (the store's own corpus settings: same validation, same
        errors naming file/row/field, same counted skips) ─ the build's cleaning (data/clean.py:
        PII scrubbed per corpus.pii, exact duplicates within the add removed and counted) ─ the
        store's tokenizer (never retrained) ─ chunk_documents (the build's own chunking)
        ─ appends/NNNNNN.parquet (ids continue)
    remove (doc ids) ─ tombstones: their chunk id ranges, per update
    ─ appends/log.json rewritten last (atomic): parts, tombstones, history

New documents go to the "db" split: in the retrieval database, never trained on. A document id the
store already holds (live) is replaced: its old chunks are tombstoned, the new ones appended. An id
both added and removed in one update, or a removal of an id the store does not hold, is an error
naming the ids. Nothing is written unless the whole update is valid.

The caller serialises updates (ratray.index.update holds the workdir's lock): one writer per store.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ratray.config import CorpusConfig
from ratray.data.chunks import DOC_BATCH, chunk_documents
from ratray.data.clean import Cleaner
from ratray.data.corpus import SkipReport, iter_documents
from ratray.data.store import APPENDS, LOG, ChunkStore, ChunkStoreError
from ratray.data.tokenizer import WordPieceTokenizer

NEW_SPLIT = "db"  # appended documents: retrieval only, never trained on


@dataclass
class StoreUpdate:
    """What one update did to the store (also its entry in log.json's history)."""
    update: int  # 1 for the store's first update
    documents_read: int = 0
    documents_added: int = 0  # new ids, plus re-added ones (counted in documents_replaced too)
    documents_replaced: int = 0
    documents_removed: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0  # tombstoned: removed and replaced documents' old chunks
    added_ids: list = field(default_factory=list)  # [first, stop) of the appended chunk ids
    skipped: dict = field(default_factory=dict)  # SkipReport.as_dict() of the added documents
    cleaned: dict = field(default_factory=dict)  # PII placeholders by type, exact duplicate pairs
    part: str | None = None
    time: str = ""

    def new_ids(self) -> np.ndarray:
        return np.arange(*self.added_ids, dtype=np.int64) if self.added_ids else np.zeros(0, np.int64)


def update_corpus_config(store: ChunkStore, path: str | Path) -> CorpusConfig:
    """The store's own corpus settings (fields, formats, size limits, cleaning) read from `path`,
    with no caps, no versions and nothing held out: every valid document there is added. PII:
    corpus.pii as the store's config says it (auto: on, since added documents come from a path)."""
    saved = dict(store.meta["settings"]["corpus"])
    known = {f.name for f in dataclasses.fields(CorpusConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    return CorpusConfig(**{**saved, "path": str(path), "max_docs": None, "max_bytes": None,
                           "versions": 0, "val_fraction": 0.0, "db_fraction": 0.0})


def update_store(store: ChunkStore, add: str | Path | None = None, remove: list[str] = (),
                 log_extra: dict | None = None) -> StoreUpdate:
    """Append the documents at `add` and tombstone the documents `remove`; returns what was done.
    Raises CorpusError (bad documents: file/row/field named) or ChunkStoreError (unknown ids, an
    id both added and removed, nothing to do)."""
    if add is not None and not Path(add).exists():
        raise ChunkStoreError(f"documents to add: {add} does not exist")
    store.reload()
    live = store.documents()
    remove = list(dict.fromkeys(str(r) for r in remove))
    unknown = [r for r in remove if r not in live]
    if unknown:
        raise ChunkStoreError(f"cannot remove {len(unknown)} document(s) {store.path} does not "
                              f"hold: {', '.join(map(repr, unknown[:20]))}"
                              + (" ..." if len(unknown) > 20 else ""))
    up = StoreUpdate(update=len(store.history) + 1,
                     time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tomb = [{"doc_id": r, "start": live[r][0], "stop": live[r][1], "update": up.update}
            for r in remove]
    part, table = None, None
    if add is not None:
        table, docs, skips, cleaned = chunk_new_documents(store, add)
        up.documents_read, up.skipped, up.cleaned = docs, skips.as_dict(), cleaned
        added = [] if table is None else list(dict.fromkeys(
            table.column("doc_id").to_pylist()))
        both = sorted(set(added) & set(remove))
        if both:
            raise ChunkStoreError(f"document(s) both added and removed in one update: "
                                  f"{', '.join(map(repr, both[:20]))}")
        if table is None:
            raise ChunkStoreError(f"nothing to add from {add}: {docs} document(s) read, all "
                                  f"skipped ({skips.counts}; e.g. {skips.examples})")
        replaced = [d for d in added if d in live]
        tomb += [{"doc_id": d, "start": live[d][0], "stop": live[d][1], "update": up.update,
                  "replaced": True} for d in replaced]
        up.documents_added, up.documents_replaced = len(added), len(replaced)
        up.chunks_added = table.num_rows
        up.added_ids = [len(store), len(store) + table.num_rows]
        part = f"{up.update:06d}.parquet"
    elif not remove:
        raise ChunkStoreError("nothing to do: give documents to add and/or ids to remove")
    up.documents_removed = len(remove)
    up.chunks_removed = sum(t["stop"] - t["start"] for t in tomb)
    up.part = part
    _commit(store, table, part, tomb, {**dataclasses.asdict(up), **(log_extra or {})})
    store.reload()
    return up


def chunk_new_documents(store: ChunkStore, add: str | Path, split: str = NEW_SPLIT,
                        first: int | None = None):
    """The documents at `add`, validated, cleaned and chunked like the build's, with the store's
    tokenizer → (SCHEMA table of `split` with ids from `first` (default len(store)), or None if no
    chunk; documents read; skip report; cleaning counts). Also what an evaluation of documents
    outside the store reads (ratray/retro/evaluate.py, split "val", ids from 0)."""
    cfg = update_corpus_config(store, add)
    skips = SkipReport()
    tok = store.tokenizer
    tables, n_docs, first = [], 0, len(store) if first is None else first
    cleaner = Cleaner(cfg)  # the build's cleaning: PII scrubbed, exact duplicates (within the add) removed
    docs_it = cleaner.read(iter_documents(cfg, skips), skips)
    while docs := list(itertools.islice(docs_it, DOC_BATCH)):
        n_docs += len(docs)
        texts = [d.text for d in docs]
        if isinstance(tok, WordPieceTokenizer):
            ids, offsets = zip(*tok.encode_batch_offsets(texts))
            t = chunk_documents(docs, list(ids), [split] * len(docs), store.chunk_tokens, tok,
                                first, skips, list(offsets))
        else:
            t = chunk_documents(docs, tok.encode_batch(texts), [split] * len(docs),
                                store.chunk_tokens, tok, first, skips)
        if t is not None:
            tables.append(t)
            first += t.num_rows
    cleaned = {"pii": dict(cleaner.pii_counts), "duplicates": cleaner.exact_pairs}
    return (pa.concat_tables(tables) if tables else None), n_docs, skips, cleaned


def _commit(store: ChunkStore, table, part: str | None, tomb: list[dict], entry: dict) -> None:
    """Write the part (temp name, renamed), then the new log (atomic replace): readers see the
    whole update or none of it."""
    folder = store.path / APPENDS
    folder.mkdir(exist_ok=True)
    log = json.loads(json.dumps(store.log))  # a deep copy
    if part is not None:
        tmp = folder / f".{part}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp)
        os.replace(tmp, folder / part)
        log["parts"].append({"file": part, "first_id": int(table.column("chunk_id")[0].as_py()),
                             "rows": table.num_rows, "update": entry["update"]})
    log["tombstones"] += tomb
    log["history"].append(entry)
    _write_log(folder, log)


def _write_log(folder: Path, log: dict) -> None:
    tmp = folder / f".{LOG}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(json.dumps(log, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / LOG)


def restore_log(store: ChunkStore, log: dict) -> None:
    """Undo updates whose index version was never published: `log` (an earlier `store.log`) is
    written back and the parts it does not name are deleted."""
    folder = store.path / APPENDS
    _write_log(folder, log)
    keep = {p["file"] for p in log["parts"]}
    for f in folder.glob("*.parquet"):
        if f.name not in keep:
            f.unlink()
    store.reload()
