"""Chunk store reader: a built store's chunks by chunk id (the build lives in ratray/data/chunks.py).

    <store>/chunks.parquet   one row per chunk, SCHEMA below; chunk id = row position
    <store>/tokenizer.json   the store's tokenizer
    <store>/meta.json        key, settings, counts, skip report, tokenizer (written last by the build)

Splits by document ("train", "val", "db"); the retrieval database is train + db (`database_ids`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ratray.data.tokenizer import LMTokenizer, WordPieceTokenizer, load_tokenizer

STORE_VERSION = 1
SPLITS = ("train", "val", "db")  # db: in the retrieval database only, never trained on

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
        self._table: pa.Table | None = None
        self._columns: dict[str, np.ndarray] = {}
        self._tok_values: np.ndarray | None = None
        self._tok_offsets: np.ndarray | None = None
        self._doc_index: dict[str, tuple[int, int]] | None = None

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
        return int(self.meta["counts"]["chunks"]["total"])

    def __repr__(self) -> str:
        c = self.meta["counts"]["chunks"]
        return f"ChunkStore({self.path}, chunks train={c['train']} val={c['val']}, reused={self.reused})"

    # -- columns ----------------------------------------------------------------------------

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = pq.read_table(self.path / "chunks.parquet", memory_map=True)
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
        """The retrieval database: chunk ids (ascending) of the train and db splits."""
        return np.union1d(self.split_ids("train"), self.split_ids("db"))

    def split_ids(self, split: str) -> np.ndarray:
        """Chunk ids (int64, ascending) of "train", "val" or "db"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        name = f"_ids_{split}"
        if name not in self._columns:
            mask = pc.equal(self.table.column("split"), split).to_numpy(zero_copy_only=False)
            self._columns[name] = np.flatnonzero(mask).astype(np.int64)
        return self._columns[name]

    def tokens(self, ids, pad_to: int | None = None) -> np.ndarray:
        """int32 array (len(ids), pad_to or chunk_tokens) of the chunks' tokens, right-padded with pad_id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
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
        return self.column("n_tokens")[np.asarray(ids, dtype=np.int64)]

    def continuation(self, ids) -> np.ndarray:
        """next_chunk_id of each chunk: the following chunk of the same document, -1 if none."""
        return self.column("next_chunk_id")[np.asarray(ids, dtype=np.int64)]

    def with_continuation(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids (any shape, -1 = none) → int32 tokens (..., 2m): each chunk followed by its
        continuation (RETRO's neighbour [N, F]), pad-filled where either is missing."""
        m, flat = self.chunk_tokens, np.asarray(ids, dtype=np.int64).reshape(-1)
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
        return self.table.column("text").take(pa.array(np.asarray(ids, dtype=np.int64))).to_pylist()

    def doc_ids(self, ids) -> np.ndarray:
        return self.column("doc_id")[np.asarray(ids, dtype=np.int64)]

    def document_chunks(self, doc_id: str) -> np.ndarray:
        """The chunk ids of one document, in order (they are contiguous)."""
        if self._doc_index is None:
            starts = np.flatnonzero(self.column("pos") == 0)
            stops = np.append(starts[1:], len(self))
            self._doc_index = dict(zip(self.column("doc_id")[starts].tolist(),
                                       zip(starts.tolist(), stops.tolist())))
        if doc_id not in self._doc_index:
            raise KeyError(f"document {doc_id!r} has no chunks in {self.path}")
        start, stop = self._doc_index[doc_id]
        return np.arange(start, stop, dtype=np.int64)
