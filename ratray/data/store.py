"""Chunk store reader: a built store's chunks by chunk id (the build: ratray/data/chunks.py; appends
and removals: ratray/data/append.py).

    <store>/chunks.parquet        one row per chunk, SCHEMA below; chunk id = row position
    <store>/tokenizer.json        the store's tokenizer
    <store>/meta.json             key, settings, counts, skip report, tokenizer (written last by the build)
    <store>/appends/NNNNNN.parquet  chunks appended by live updates (SCHEMA; ids continue the rows)
    <store>/appends/log.json      the parts, tombstones and per-update history (rewritten atomically,
                                  last: a part it does not name is ignored)

Chunk ids never change: an appended chunk takes the next id, a removed document's chunks stay in
the files and are tombstoned (`removed_ids`), so old index versions and checkpoints stay readable.
A re-added document id tombstones its old chunks; `document_chunks` gives the live ones.
Splits by document ("train", "val", "db"); appended documents are "db" (retrieval only, never
trained on). The retrieval database is train + db minus tombstones (`database_ids`).

A store opened before an append sees the new chunks once asked for an id beyond its length (the
log is read again, `reload`): a running training or generation job follows the database.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ratray.data.tokenizer import LMTokenizer, WordPieceTokenizer, load_tokenizer

STORE_VERSION = 1
SPLITS = ("train", "val", "db")  # db: in the retrieval database only, never trained on
APPENDS = "appends"  # the folder of appended parts and their log, inside the store
LOG = "log.json"

SCHEMA = pa.schema([
    ("chunk_id", pa.int64()), ("doc_id", pa.string()),
    ("split", pa.string()),
    ("pos", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()), ("n_bytes", pa.int32()),
    ("text", pa.string()),
    ("next_chunk_id", pa.int64()),
])


class ChunkStoreError(ValueError):
    """A chunk store cannot be built or opened."""


class ChunkStore:
    """A built chunk store. Columns load lazily; lookups take arrays of chunk ids (vectorised)."""

    REQUIRED = ("meta.json", "chunks.parquet", "tokenizer.json")

    def __init__(self, path: Path, meta: dict, tokenizer: LMTokenizer | WordPieceTokenizer,
                 reused: bool):
        self.path, self.meta, self.tokenizer, self.reused = path, meta, tokenizer, reused
        self._lock = threading.Lock()  # reload: one thread re-reads, the others see old or new state
        self._reset(read_log(path))

    def _reset(self, log: dict) -> None:
        self.log = log  # appends/log.json (empty_log() before any update)
        self._n = int(self.meta["counts"]["chunks"]["total"]) + sum(p["rows"] for p in log["parts"])
        self._table: pa.Table | None = None
        self._columns: dict[str, np.ndarray] = {}
        self._tok_values: np.ndarray | None = None
        self._tok_offsets: np.ndarray | None = None
        self._doc_index: dict[str, tuple[int, int]] | None = None

    def reload(self) -> bool:
        """Read appends/log.json again; True if the store changed (caches dropped)."""
        with self._lock:
            log = read_log(self.path)
            if log == self.log:
                return False
            self._reset(log)
            return True

    def _ids(self, ids) -> np.ndarray:
        """Chunk ids as int64; an id beyond this object's length reloads first (an append since)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and int(ids.max()) >= self._n:
            self.reload()
            if int(ids.max()) >= self._n:
                raise IndexError(f"chunk id {int(ids.max())} is beyond {self.path} "
                                 f"({self._n} chunks)")
        return ids

    @classmethod
    def open(cls, path: str | Path, reused: bool = True) -> ChunkStore:
        path = Path(path)
        if not path.is_dir():
            raise ChunkStoreError(f"chunk store {path} does not exist")
        missing = [f for f in cls.REQUIRED if not (path / f).is_file()]
        if missing:
            raise ChunkStoreError(f"chunk store {path} is incomplete (missing {', '.join(missing)}); "
                                  f"delete it and build again")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != STORE_VERSION:
            raise ChunkStoreError(f"chunk store {path} has version {meta.get('version')}, "
                                  f"expected {STORE_VERSION}; build it again")
        kind = meta.get("tokenizer", {}).get("kind", "bpe")  # stores older than wordpiece: bpe
        return cls(path, meta, load_tokenizer(path / "tokenizer.json", kind), reused)

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def tokenizer_kind(self) -> str:
        """The tokenizer kind: "bpe" (RETRO chunks) or "wordpiece" (REALM blocks)."""
        return self.tokenizer.kind

    @property
    def chunk_tokens(self) -> int:
        return int(self.meta["settings"]["chunks"]["chunk_tokens"])

    def __len__(self) -> int:
        return self._n

    @property
    def history(self) -> list[dict]:
        """Every update of this store, oldest first: added/removed documents and chunks, skips."""
        return list(self.log["history"])

    def removed_ids(self) -> np.ndarray:
        """Tombstoned chunk ids (ascending): removed or replaced documents' chunks."""
        spans = [np.arange(t["start"], t["stop"], dtype=np.int64) for t in self.log["tombstones"]]
        return np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)

    def __repr__(self) -> str:
        c = self.meta["counts"]["chunks"]
        return f"ChunkStore({self.path}, chunks train={c['train']} val={c['val']}, reused={self.reused})"

    # -- columns ----------------------------------------------------------------------------

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            parts = [self.path / APPENDS / p["file"] for p in self.log["parts"]]
            tables = [pq.read_table(f, memory_map=True) for f in [self.path / "chunks.parquet", *parts]]
            self._table = pa.concat_tables(tables) if parts else tables[0]
        return self._table

    def column(self, name: str) -> np.ndarray:
        """A whole column as numpy (cached): int columns as ints, string columns as object arrays."""
        if name == "tokens":
            raise ValueError("use tokens(ids) for the token lists")
        if name not in self._columns:
            self._columns[name] = self.table.column(name).to_numpy(zero_copy_only=False)
        return self._columns[name]

    def _tokens_flat(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tok_values is None:
            flat = pc.list_flatten(self.table.column("tokens"))
            self._tok_values = flat.to_numpy().astype(np.int32, copy=False)
            self._tok_offsets = np.concatenate([[0], np.cumsum(self.column("n_tokens"), dtype=np.int64)])
        return self._tok_values, self._tok_offsets

    # -- lookups by chunk id ----------------------------------------------------------------

    def database_ids(self) -> np.ndarray:
        """The retrieval database: chunk ids (ascending) of the train and db splits, tombstones out."""
        return np.setdiff1d(np.union1d(self.split_ids("train"), self.split_ids("db")),
                            self.removed_ids(), assume_unique=True)

    def split_ids(self, split: str) -> np.ndarray:
        """Chunk ids (int64, ascending) of "train", "val" or "db"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        name = f"_ids_{split}"
        if name not in self._columns:
            mask = pc.equal(self.table.column("split"), split).to_numpy(zero_copy_only=False)
            self._columns[name] = np.flatnonzero(mask).astype(np.int64)
        return self._columns[name]

    def with_doc_prefix(self, prefix: str, ids=None) -> np.ndarray:
        """Chunk ids (ascending) among `ids` (default: every chunk) whose document id starts with
        `prefix`; "" keeps them all."""
        ids = np.arange(len(self), dtype=np.int64) if ids is None else self._ids(ids)
        if not prefix:
            return ids
        keep = np.char.startswith(self.doc_ids(ids).astype(str), prefix)
        return ids[keep]

    def tokens(self, ids, pad_to: int | None = None) -> np.ndarray:
        """int32 array (len(ids), pad_to or chunk_tokens) of the chunks' tokens, right-padded with pad_id."""
        ids = self._ids(ids).reshape(-1)
        width = pad_to or self.chunk_tokens
        values, offsets = self._tokens_flat()
        lens = self.column("n_tokens")[ids]
        if len(ids) and lens.max() > width:
            raise ValueError(f"pad_to={width} is shorter than a chunk ({lens.max()} tokens)")
        out = np.full((len(ids), width), self.tokenizer.pad_id, dtype=np.int32)
        cols = np.arange(width)
        mask = cols[None, :] < lens[:, None]
        out[mask] = values[(offsets[ids][:, None] + cols[None, :])[mask]]
        return out

    def n_tokens(self, ids) -> np.ndarray:
        ids = self._ids(ids)  # first: it may reload
        return self.column("n_tokens")[ids]

    def continuation(self, ids) -> np.ndarray:
        """next_chunk_id of each chunk: the following chunk of the same document, -1 if none."""
        ids = self._ids(ids)  # first: it may reload
        return self.column("next_chunk_id")[ids]

    def with_continuation(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids (any shape, -1 = none) → int32 tokens (..., 2m): each chunk followed by its
        continuation (RETRO's neighbour [N, F]), pad-filled where either is missing."""
        m, flat = self.chunk_tokens, np.asarray(ids, dtype=np.int64).reshape(-1)
        self._ids(flat)  # reload first if an id is new (the columns below then see it)
        out = np.full((len(flat), 2 * m), self.tokenizer.pad_id, np.int32)
        ok = flat >= 0
        if ok.any():
            out[ok, :m] = self.tokens(flat[ok], pad_to=m)
            cont = np.full(len(flat), -1, np.int64)
            cont[ok] = self.continuation(flat[ok])
            has = cont >= 0
            if has.any():
                out[has, m:] = self.tokens(cont[has], pad_to=m)
        return out.reshape(*np.shape(ids), 2 * m)

    def texts(self, ids) -> list[str]:
        ids = self._ids(ids)
        return self.table.column("text").take(pa.array(ids)).to_pylist()

    def doc_ids(self, ids) -> np.ndarray:
        ids = self._ids(ids)  # first: it may reload
        return self.column("doc_id")[ids]

    def document_chunks(self, doc_id: str) -> np.ndarray:
        """The live chunk ids of one document, in order (contiguous); KeyError if it has none
        (never held, removed, or every document chunk skipped)."""
        index = self.documents()
        if doc_id not in index:
            self.reload()  # added since this object read the log?
            index = self.documents()
        if doc_id not in index:
            raise KeyError(f"document {doc_id!r} has no chunks in {self.path}")
        start, stop = index[doc_id]
        return np.arange(start, stop, dtype=np.int64)

    def documents(self) -> dict[str, tuple[int, int]]:
        """Every live document: doc id → (first chunk id, stop) (a re-added id: its new chunks)."""
        if self._doc_index is None:
            starts = np.flatnonzero(self.column("pos") == 0)
            stops = np.append(starts[1:], len(self))
            dead = {t["start"] for t in self.log["tombstones"]}
            self._doc_index = {d: (a, b) for d, a, b in zip(self.column("doc_id")[starts].tolist(),
                                                            starts.tolist(), stops.tolist())
                               if a not in dead}
        return self._doc_index


def empty_log() -> dict:
    """appends/log.json of a store without updates."""
    return {"parts": [], "tombstones": [], "history": []}


def read_log(path: str | Path) -> dict:
    """A store's appends/log.json (empty_log() if it has none)."""
    f = Path(path) / APPENDS / LOG
    if not f.is_file():
        return empty_log()
    try:
        return {**empty_log(), **json.loads(f.read_text())}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChunkStoreError(f"{f}: corrupt update log ({e})") from None
