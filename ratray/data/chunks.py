"""Chunk store: every document tokenized and cut into fixed-size chunks, built once per content hash.

    <root>/<key>/chunks.parquet   one row per chunk (columns: see SCHEMA and docs/architecture.md)
    <root>/<key>/tokenizer.json   the tokenizer (bpe: trained on the train split only; wordpiece: a copy)
    <root>/<key>/meta.json        key, settings, counts, skip report, fingerprint, tokenizer kind + ids
                                  (written last)

`key` = sha256 of the corpus fingerprint and the corpus/chunk settings, so the same inputs always
map to the same folder and a complete folder is reused without reading the corpus. A store is
written to a temporary folder and renamed into place, so `<key>/` is either absent or complete.

Two tokenizers (`chunks.tokenizer`):
  bpe        RETRO chunks: byte-level BPE trained here; `text` is the decoded chunk, `n_bytes` the
             exact bytes of its tokens (chunks of a document concatenate to the document).
  wordpiece  REALM blocks: the fixed BERT WordPiece of `chunks.wordpiece_model` (no training);
             `chunk_tokens` is a maximum (REALM: 288). `text` is the ORIGINAL span of the document
             from the block's first token's start character to its last token's end character (not
             the lowercased decode; whitespace between blocks belongs to no block), `n_bytes` its
             UTF-8 length. Blocks tokenize back to their tokens when they start at a word boundary.

Build, in data-flow order (the corpus is streamed up to three times, so memory holds one batch of docs):
  1. plan      read all documents once: skip report, cleaning (ratray/data/clean.py: PII scrubbed,
               exact duplicates removed, near-duplicates found — every later pass sees the same
               cleaned stream; the report is meta.json's "clean"), train/val split by document id;
  2. tokenizer bpe: train on the train documents' text only; wordpiece: load the model's;
  3. chunk     tokenize in batches, cut each document into consecutive `chunk_tokens` chunks that
               never cross a document (only its last chunk may be shorter), write Parquet batches.
bpe: documents with fewer than `chunk_tokens` tokens are skipped and counted as "shorter_than_chunk".
wordpiece: such a document is kept as one shorter block; one without any wordpiece (e.g. only
control characters, which BERT's normalizer deletes) is skipped and counted as "no_tokens".

Splits by document ("train", "val", "db": `ratray.data.corpus.plan_split`); the retrieval database
is train + db (`ChunkStore.database_ids`). A train split without any chunk is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.clean import CLEAN_FIELDS, Cleaner, clean_settings
from ratray.data.corpus import (Document, SkipReport, corpus_fingerprint, iter_documents,
                                plan_split, split_of)
from ratray.data.store import SCHEMA, SPLITS, STORE_VERSION, ChunkStore, ChunkStoreError
from ratray.data.tokenizer import LMTokenizer, WordPieceTokenizer, wordpiece_file

DOC_BATCH = 128  # documents tokenized (and written as one row group) at a time
# corpus fields added after stores existed, with their defaults: left out of the key at the default,
# so a store built before them keeps its key
LATER_CORPUS_FIELDS = {"db_fraction": 0.0, "versions": 0, "version_edits": True}



# ---------------------------------------------------------------------------------------------
# identity


def chunk_store_key(corpus: CorpusConfig, chunks: ChunkConfig, fingerprint: str | None = None) -> str:
    """sha256 over the corpus fingerprint and every setting that changes the store's content.

    The corpus path itself is not part of the key: the fingerprint already covers the files, so the
    same content in another folder reuses the same store. Only the settings of the chosen tokenizer
    count (see `_key_chunk_settings`). The cleaning settings enter resolved (`clean_settings`: pii
    auto as on/off, the cleaning version), so a store built before cleaning existed (unscrubbed,
    not deduplicated) is never reused for a build that cleans.
    """
    settings = _settings(corpus, chunks)
    payload = {"version": STORE_VERSION, "fingerprint": fingerprint or corpus_fingerprint(corpus),
               "corpus": {k: v for k, v in settings["corpus"].items()
                          if k != "path" and k not in CLEAN_FIELDS
                          and LATER_CORPUS_FIELDS.get(k, object()) != v},
               "chunks": _key_chunk_settings(chunks), "clean": clean_settings(corpus)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _key_chunk_settings(chunks: ChunkConfig) -> dict:
    """The chunk settings the key hashes.

    bpe: chunk_tokens, vocab_size, min_frequency — exactly the fields that existed before the
    wordpiece option, so bpe stores built earlier keep their key and are reused.
    wordpiece: chunk_tokens, tokenizer, wordpiece_model and the sha256 of the model's tokenizer.json
    (the vocabulary is fixed: vocab_size / min_frequency do not change the store).
    """
    d = dataclasses.asdict(chunks)
    if chunks.tokenizer == "bpe":
        return {k: d[k] for k in ("chunk_tokens", "vocab_size", "min_frequency")}
    digest = hashlib.sha256(wordpiece_file(chunks.wordpiece_model).read_bytes()).hexdigest()
    return {"chunk_tokens": d["chunk_tokens"], "tokenizer": "wordpiece",
            "wordpiece_model": d["wordpiece_model"], "wordpiece_sha256": digest}


def _settings(corpus: CorpusConfig, chunks: ChunkConfig) -> dict:
    return {"corpus": dataclasses.asdict(corpus), "chunks": dataclasses.asdict(chunks)}


# ---------------------------------------------------------------------------------------------
# building


def build_chunk_store(corpus: CorpusConfig, chunks: ChunkConfig, root: str | Path,
                      progress: bool = True) -> ChunkStore:
    """Open `root/<key>/` if it is complete (building nothing, `store.reused` is True), else build it."""
    root = Path(root)
    if corpus.path is not None and Path(corpus.path).is_dir() and \
            root.resolve().is_relative_to(Path(corpus.path).resolve()):
        raise ChunkStoreError(f"chunk store root {root} lies inside the corpus folder {corpus.path}: "
                              f"the store would become part of its own corpus; put it elsewhere")
    fingerprint = corpus_fingerprint(corpus)
    key = chunk_store_key(corpus, chunks, fingerprint)
    final = root / key
    if (final / "meta.json").is_file():
        return ChunkStore.open(final, reused=True)
    try:
        if final.exists():  # a leftover without meta.json is never a valid store
            shutil.rmtree(final)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-", dir=root))
    except PermissionError as e:
        raise ChunkStoreError(f"chunk store folder {root} is not writable ({e.strerror})") from None
    try:
        _build(corpus, chunks, tmp, key, fingerprint, progress)
        if corpus_fingerprint(corpus) != fingerprint:  # the store must match the key's content
            raise ChunkStoreError("the corpus changed while its chunk store was being built; build again")
        try:
            os.rename(tmp, final)  # atomic on one filesystem
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ChunkStore.open(final, reused=False)


def _cut(lens: np.ndarray, chunk_tokens: int) -> tuple[np.ndarray, ...]:
    """Cut documents of `lens` tokens (laid end to end) into chunks of at most `chunk_tokens` tokens.

    Returns per chunk (all (n_chunks,)): chunk_doc (index into lens), pos (chunk index within its
    document), starts / ends (token positions in the concatenation), last (no chunk follows).
    """
    doc_end = np.cumsum(lens)
    doc_start = doc_end - lens
    n_chunks = -(-lens // chunk_tokens)  # ceil
    chunk_doc = np.repeat(np.arange(len(lens)), n_chunks)
    first_chunk = np.cumsum(n_chunks) - n_chunks
    pos = np.arange(len(chunk_doc)) - first_chunk[chunk_doc]
    starts = doc_start[chunk_doc] + pos * chunk_tokens
    ends = np.minimum(starts + chunk_tokens, doc_end[chunk_doc])
    return chunk_doc, pos, starts, ends, pos + 1 == n_chunks[chunk_doc]


def chunk_documents(docs: list[Document], ids: list, split: list[str], chunk_tokens: int,
                 tok: LMTokenizer | WordPieceTokenizer, first_id: int, skips: SkipReport,
                 offsets: list[np.ndarray] | None = None) -> pa.Table | None:
    """Cut a batch of tokenized documents into chunks of `chunk_tokens` tokens (vectorised); None
    if no chunk.

    bpe (`offsets` None): documents under `chunk_tokens` tokens are skipped ("shorter_than_chunk");
    text is the decoded chunk and n_bytes its exact byte count. wordpiece (`offsets` given: (n_i, 2)
    character spans per document): a document under `chunk_tokens` tokens is one shorter block, one
    without any token is skipped ("no_tokens"); text is the original span from the first token's
    start to the last token's end, n_bytes its UTF-8 length.
    """
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    min_len = chunk_tokens if offsets is None else 1
    keep = np.flatnonzero(lens >= min_len)
    for i in np.flatnonzero(lens < min_len):
        if offsets is None:
            skips.add("shorter_than_chunk",
                      f"{docs[i].source} ({lens[i]} tokens < chunk_tokens {chunk_tokens})")
        else:
            skips.add("no_tokens", f"{docs[i].source} (no wordpiece token)")
    if len(keep) == 0:
        return None
    lens = lens[keep]
    flat = np.concatenate([np.asarray(ids[i], dtype=np.int32) for i in keep])  # (sum(lens),)
    chunk_doc, pos, starts, ends, last = _cut(lens, chunk_tokens)
    chunk_id = first_id + np.arange(len(chunk_doc), dtype=np.int64)
    next_id = np.where(last, -1, chunk_id + 1)
    doc_of = keep[chunk_doc]
    if offsets is None:
        n_bytes = np.add.reduceat(tok.byte_lengths[flat], starts)
        texts = tok.decode_batch([c.tolist() for c in np.split(flat, starts[1:])])
    else:
        spans = np.concatenate([offsets[i] for i in keep])  # (len(flat), 2) character spans
        first_char, last_char = spans[starts, 0], spans[ends - 1, 1]
        texts = [docs[d].text[a:b] for d, a, b in zip(doc_of.tolist(), first_char.tolist(),
                                                       last_char.tolist())]
        n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
    return pa.table({
        "chunk_id": pa.array(chunk_id, pa.int64()),
        "doc_id": pa.array([docs[i].doc_id for i in doc_of], pa.string()),
        "split": pa.array([split[i] for i in doc_of], pa.string()),
        "pos": pa.array(pos.astype(np.int32)),
        "tokens": pa.ListArray.from_arrays(pa.array(np.append(starts, len(flat)).astype(np.int32)),
                                           pa.array(flat)),  # chunks tile `flat` in order
        "n_tokens": pa.array((ends - starts).astype(np.int32)),
        "n_bytes": pa.array(n_bytes.astype(np.int32)),
        "text": pa.array(texts, pa.string()),
        "next_chunk_id": pa.array(next_id, pa.int64()),
    }, schema=SCHEMA)


def _batches(it: Iterator[Document], n: int) -> Iterator[list[Document]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def _build(corpus: CorpusConfig, chunks: ChunkConfig, out: Path, key: str, fingerprint: str,
           progress: bool) -> None:
    t0 = time.time()
    skips = SkipReport()
    cleaner = Cleaner(corpus)
    docs_read, forced_val = plan_split(corpus, skips, cleaner.read(iter_documents(corpus, skips), skips))

    def split_id(doc_id: str) -> str:
        return "val" if doc_id == forced_val else split_of(doc_id, corpus)

    def split(doc: Document) -> str:
        return split_id(doc.doc_id)

    docs_read["train"] -= cleaner.resolve(split_id, skips)  # near_dup=drop: train near-duplicates

    def cleaned() -> Iterator[Document]:  # every later pass: scrubbed, removed documents left out
        return cleaner.stream(iter_documents(corpus, SkipReport()))

    # 2. tokenizer: BPE trained on the train split only (re-read: the skip report of pass 1 is the
    # one kept), or the fixed WordPiece of the model, copied into the store
    wordpiece = chunks.tokenizer == "wordpiece"
    tok: LMTokenizer | WordPieceTokenizer
    if wordpiece:
        tok = WordPieceTokenizer.from_model(chunks.wordpiece_model)
    else:
        train_texts = (d.text for d in cleaned() if split(d) == "train")
        tok = LMTokenizer.train(train_texts, chunks.vocab_size, chunks.min_frequency)
    tok.save(out / "tokenizer.json")
    t_tok = time.time() - t0

    # 3. tokenize, chunk, write
    counts = {k: dict.fromkeys(SPLITS, 0) for k in ("documents", "chunks", "tokens", "bytes")}
    n_written = 0
    bar = tqdm(total=sum(docs_read.values()), unit="doc", desc="tokenize+chunk", disable=not progress)
    with pq.ParquetWriter(out / "chunks.parquet", SCHEMA) as writer:
        for docs in _batches(cleaned(), DOC_BATCH):
            splits = [split(d) for d in docs]
            texts = [d.text for d in docs]
            if wordpiece:
                ids, offsets = zip(*tok.encode_batch_offsets(texts))
                table = chunk_documents(docs, list(ids), splits, chunks.chunk_tokens, tok, n_written,
                                     skips, list(offsets))
            else:
                table = chunk_documents(docs, tok.encode_batch(texts), splits, chunks.chunk_tokens, tok,
                                     n_written, skips)
            bar.update(len(docs))
            if table is None:
                continue
            writer.write_table(table)
            n_written += table.num_rows
            first = table["pos"].to_numpy() == 0
            n_tok, n_byt = table["n_tokens"].to_numpy(), table["n_bytes"].to_numpy()
            for s in SPLITS:
                mask = pc.equal(table["split"], s).to_numpy(zero_copy_only=False)
                counts["documents"][s] += int((mask & first).sum())
                counts["chunks"][s] += int(mask.sum())
                counts["tokens"][s] += int(n_tok[mask].sum())
                counts["bytes"][s] += int(n_byt[mask].sum())
    bar.close()
    if counts["chunks"]["train"] == 0:
        if wordpiece:
            raise ChunkStoreError(f"the train split has no blocks: no train document has a wordpiece "
                                  f"token (skipped: {skips.counts}); add documents")
        raise ChunkStoreError(
            f"the train split has no chunks: every train document is shorter than "
            f"chunk_tokens={chunks.chunk_tokens} "
            f"tokens (skipped: {skips.counts}); lower chunks.chunk_tokens or add longer documents")
    for c in counts.values():
        c["total"] = sum(c[s] for s in SPLITS)

    meta = {
        "version": STORE_VERSION, "key": key, "fingerprint": fingerprint,
        "settings": _settings(corpus, chunks), "counts": counts,
        "documents_read": {**docs_read, "total": sum(docs_read.values())},
        "forced_val_doc": forced_val, "skips": skips.as_dict(), "clean": cleaner.report(),
        "tokenizer": _tokenizer_meta(tok, chunks, t_tok),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.time() - t0, 3),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # last: marks the store complete


def _tokenizer_meta(tok: LMTokenizer | WordPieceTokenizer, chunks: ChunkConfig, seconds: float) -> dict:
    if isinstance(tok, WordPieceTokenizer):
        return {"kind": tok.kind, "model": chunks.wordpiece_model, "vocab_size": tok.vocab_size,
                "pad_id": tok.pad_id, "unk_id": tok.unk_id, "cls_id": tok.cls_id,
                "sep_id": tok.sep_id, "mask_id": tok.mask_id, "load_seconds": round(seconds, 3)}
    return {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "pad_id": tok.pad_id, "train_seconds": round(seconds, 3)}
