"""REALM masked queries: salient-span masking (and random-token masking) of wordpiece text.

REALM masks *salient spans* — spans whose prediction needs world knowledge (named entities and dates
in Wikipedia) — rather than random tokens, which forces the retriever to find the block that holds
the fact. The default corpus here is Python standard-library source, where the knowledge is in
names of modules, functions, classes and constants, in numbers and versions, in dates and in the
proper names of prose (docstrings, comments). `salient_spans(text)` finds them with the rules below
(regular expressions over the ORIGINAL text, so spans are character ranges); `mask_query` maps the
spans to wordpiece tokens through the tokenizer's character offsets and masks whole spans.

Rules (kind: what — examples matched / not matched):

  identifier  - dotted names: `os.path.join`, `json.dumps`, `collections.abc.Mapping`; a leading
                `self.` / `cls.` is dropped (`self._buffer_size` → `_buffer_size`, which then must
                qualify on its own); all-single-letter parts are prose abbreviations, not names
                (`e.g`, `i.e`);
              - snake_case names with an inner underscore: `max_doc_bytes`, `_read_text`, `MAX_SIZE`;
              - CamelCase names with an inner capital and a lowercase letter: `OrderedDict`,
                `JSONDecoder`, `getLogger`, `ValueError`;
              - dunder names: `__slots__`, `__getattr__` (not the ubiquitous `__init__`, `__name__`,
                `__main__`).
                NOT salient: plain lowercase words (`json`, `path`, `dumps` alone: in prose they are
                ordinary words), a single leading-underscore word (`_x`), Python keywords and soft
                keywords, and the most common builtins (`self`, `cls`, `None`, `True`, `False`, `str`,
                `int`, `len`, `isinstance`, ... — see STOP_WORDS).
  number      - hexadecimal / octal / binary literals: `0xFFFF`, `0o755`, `0b1010`;
              - versions and dotted numbers with 3+ parts: `3.11.2`, `127.0.0.1`;
              - floats: `3.14`, `1e-9`, `2.5E+3`; integers of 2+ digits: `42`, `65536`, `1_000`.
                NOT salient: single digits (`x[0]`, `range(2)`: indices, not knowledge), runs of
                zeros (`00`), digits inside identifiers (`utf8`, `sha256`: the identifier rules decide).
  date        - ISO dates (optionally with a time): `2001-12-31`, `2020-03-01T12:30`;
              - month name (full or 3-letter, optional day) + year: `March 2020`, `Jan 5, 1999`,
                `5 July 2004`;
              - standalone 4-digit years 1900–2099: `2001` in "Copyright (C) 2001-2023".
  name        - proper names in prose: a capitalised word (`[A-Z][a-z]+`) that is not at a sentence
                start, or a run of 2+ capitalised words (particles `van`, `von`, `de`, `der`, `da`, `di`,
                `del`, `le`, `la`, `du` may join them): `Guido van Rossum`, `Python Software
                Foundation`, `Unicode` in "the Unicode database", `Decimal` in "isinstance(x, Decimal)"
                (class names in code are knowledge too). A word is at a sentence start when the
                nearest non-blank character before it is absent, one of . ! ? : ; or a comment,
                quote, doctest or bullet mark (# " ' ` > * -), or a blank line lies between. A
                sentence-initial word that the same text also uses in lowercase (as a word of its
                own, not in an e-mail address or dotted name) is dropped from its run ("Handle Unix
                paths" with "handle" elsewhere → `Unix`); function words (`The`, `This`, `If`, ...)
                and other STOP_WORDS break runs (`Return True`: neither is a name);
              - all-caps acronyms of 2+ letters: `JSON`, `HTTP`, `UTF`, `POSIX` (not `TODO`, `FIXME`,
                `NOTE`, `OK`, nor one repeated letter: `XX`, `XXXX`);
              - references: `RFC 2822`, `PEP 8`, `ISO 8601`, `IEEE 754`, `bpo-12345`, `gh-98765`.
  Quoted string literals are NOT a rule of their own: their contents are often formatting
  fragments (`'%s'`, `', '`); knowledge inside them is found by the rules above.

Overlaps are resolved longest first (`March 2020` beats `2020`, `os.path.join` beats `join`); the
result is sorted by start and non-overlapping.

Masking (`mask_query`):
  salient  spans are drawn in random order and masked WHOLE (every wordpiece overlapping the span
           becomes [MASK], as REALM does) until at least `round(mask_rate * n)` tokens are masked
           (at least one span); a span that would take the total past
           `max(target, floor(2 * mask_rate * n))` tokens is passed over, so the rate never exceeds
           ~2 × mask_rate; with few spans the rate stays below mask_rate (REALM masks entities,
           not a quota). n counts the maskable (non-special) tokens. Spans covering a special token
           (e.g. [UNK]) are not used. A query with no usable span falls back to random masking
           with [MASK] only, and says so (`fell_back`).
  random   BERT-style: `round(mask_rate * n)` (at least 1) tokens chosen uniformly; with
           `bert_mix=True` (default) 80% become [MASK], 10% a random non-special id, 10% stay —
           REALM's random-token baseline. Labels are set at all chosen positions.
  Labels hold the original id at masked positions and -100 elsewhere. Special tokens are never
  masked. Numpy only: no Ray, no torch.

Queries (`make_queries`): one per block of a wordpiece chunk store, at most `query_tokens`
wordpieces of the block's re-tokenized text (a random word-aligned window holding a whole salient
span when the block is longer), masked as above, seeded per (seed, block id).
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ratray.realm.config import IGNORE

# ---------------------------------------------------------------------------------------------
# salient spans

STOP_WORDS = frozenset([
    *keyword.kwlist, *keyword.softkwlist,
    "self", "cls", "None", "True", "False", "NotImplemented", "Ellipsis", "object", "str", "int",
    "float", "bool", "bytes", "list", "dict", "set", "tuple", "len", "range", "print", "isinstance",
    "super", "type", "Exception", "__init__", "__name__", "__main__",
    # capitalised function words that start sentences or head runs ("The Python Software ...")
    "The", "A", "An", "This", "That", "These", "Those", "It", "Its", "If", "In", "On", "For", "To",
    "Of", "And", "Or", "But", "Not", "No", "Yes", "When", "Where", "What", "Which", "Who", "How",
    "Why", "With", "Without", "As", "At", "By", "From", "Is", "Are", "Be", "We", "You", "He", "She",
    "They", "Our", "Your", "See", "Note", "Also", "Use", "Return", "Returns", "Otherwise", "Each",
    "All", "Any", "Some", "Only", "Then", "Else", "Here", "There", "So", "Do", "Does",
])
ACRONYM_STOP = frozenset(["TODO", "XXX", "FIXME", "NOTE", "NB", "OK", "BUG", "HACK", "II", "III"])
PARTICLES = ("van", "von", "de", "der", "den", "da", "di", "del", "le", "la", "du")

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_YEAR = r"(?:19|20)\d\d"
_NUM_END = r"(?![\w]|\.\d)"  # a number ends where no word char or decimal part follows
_CAP = r"[A-Z][a-z\u00df-\u00ff]+"  # a capitalised word (Latin-1 lowercase letters allowed)

_RULES: list[tuple[str, re.Pattern]] = [
    ("date", re.compile(rf"(?<![\w-]){_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
                        rf"(?:[T ]\d\d:\d\d(?::\d\d)?)?(?![\w])")),
    ("date", re.compile(rf"\b(?:\d{{1,2}}(?:st|nd|rd|th)? )?{_MONTH}\.?"
                        rf"(?: \d{{1,2}}(?:st|nd|rd|th)?,?)? {_YEAR}\b")),
    ("number", re.compile(rf"(?<![\w.])0[xX][0-9a-fA-F_]+{_NUM_END}|(?<![\w.])0[oObB][0-7_]+{_NUM_END}")),
    ("number", re.compile(rf"(?<![\w.])\d+(?:\.\d+){{2,}}{_NUM_END}")),
    ("number", re.compile(rf"(?<![\w.])(?:\d[\d_]*\.\d[\d_]*(?:[eE][+-]?\d+)?|\d[\d_]*[eE][+-]?\d+)"
                          rf"{_NUM_END}")),
    ("number", re.compile(rf"(?<![\w.])\d[\d_]*{_NUM_END}")),  # ints: 1 digit dropped, years → date
    ("name", re.compile(r"\b(?:RFC|PEP|ISO|IEEE|ECMA|bpo|gh|[Ii]ssue)[- ]?#?\d+(?:[-.:]\d+)*\b")),
]
_DOTTED = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?!\w)")
# single words that may qualify (checked by _identifier_kind): a dunder, an inner underscore, an
# inner capital (lowerUpper or UPPERUpperlower), or all caps
_WORD = re.compile(r"(?<![\w.])(?:__[A-Za-z]\w*__"
                   r"|_*[A-Za-z0-9]+(?:_+[A-Za-z0-9]+)+_*"
                   r"|_*[A-Za-z][A-Za-z0-9]*(?:[a-z0-9][A-Z]|[A-Z][A-Z][a-z])[A-Za-z0-9]*"
                   r"|[A-Z]{2,})(?!\w)")
_RUN = re.compile(rf"\b{_CAP}(?:[ ](?:(?:{'|'.join(PARTICLES)})[ ])*{_CAP})*\b")
_LOWER_WORD = re.compile(r"(?<![\w@.])[a-z]+(?![\w@])")  # not inside emails, hosts, dotted names
_SENTENCE_END = set(".!?:;")
_LINE_MARKS = set("#\"'`>*-")


def _identifier_kind(word: str) -> str | None:
    """'identifier' / 'name' for a single word that qualifies by the rules, else None."""
    if word in STOP_WORDS:
        return None
    if len(word) > 4 and word.startswith("__") and word.endswith("__"):
        return "identifier"  # dunder
    core = word.strip("_")
    if "_" in core and any(c.isalpha() for c in core):
        return "identifier"  # snake_case (inner underscore)
    if any(c.islower() for c in core) and any(c.isupper() for c in core[1:]):
        return "identifier"  # CamelCase / lowerCamel
    if (len(core) >= 2 and core == word and core.isalpha() and core.isupper()
            and len(set(core)) > 1 and core not in ACRONYM_STOP):
        return "name"  # acronym
    return None


def _at_sentence_start(text: str, i: int) -> bool:
    """Whether the word starting at `i` begins a sentence, a comment, a docstring or a line item."""
    j, newlines = i - 1, 0
    while j >= 0 and text[j].isspace():
        newlines += text[j] == "\n"
        j -= 1
    return j < 0 or newlines >= 2 or text[j] in _SENTENCE_END or text[j] in _LINE_MARKS


def _names(text: str) -> list[tuple[int, int, str]]:
    """Proper-name spans: capitalised runs, minus stop words, not a lone word at a sentence start;
    a sentence-initial word that the text also uses in lowercase is dropped from its run."""
    out = []
    lower: set[str] | None = None  # lowercase words of the text, computed when first needed
    for m in _RUN.finditer(text):
        # split the run into words with their offsets; stop words cut it into separate runs
        words = [(w.start() + m.start(), w.end() + m.start(), w.group())
                 for w in re.finditer(r"\S+", m.group())]
        runs: list[list[tuple[int, int, str]]] = [[]]
        for w in words:
            if w[2] in STOP_WORDS:
                runs.append([])
            else:
                runs[-1].append(w)
        for run in runs:
            while run and run[-1][2] in PARTICLES:
                run.pop()
            while run and run[0][2] in PARTICLES:
                run.pop(0)
            if not run:
                continue
            if _at_sentence_start(text, run[0][0]):
                if sum(w[2] not in PARTICLES for w in run) == 1:
                    continue  # a lone capitalised word starting a sentence
                if lower is None:
                    lower = set(_LOWER_WORD.findall(text))
                if run[0][2].lower() in lower:  # "Handle Unix ..." → "Unix"
                    run = run[1:]
                    while run and run[0][2] in PARTICLES:
                        run.pop(0)
            if run:
                out.append((run[0][0], run[-1][1], "name"))
    return out


def salient_spans(text: str) -> list[tuple[int, int, str]]:
    """Salient spans of `text` as sorted, non-overlapping (start_char, end_char, kind) triples.

    kind ∈ {"identifier", "number", "date", "name"}; the rules are in the module docstring.
    """
    cands: list[tuple[int, int, str]] = []
    for kind, rx in _RULES:
        for m in rx.finditer(text):
            s = m.group()
            if kind == "number" and s.isdigit():
                if len(s) == 1 or not s.strip("0"):
                    continue
                if len(s) == 4 and 1900 <= int(s) <= 2099:
                    cands.append((m.start(), m.end(), "date"))  # a year
                    continue
            cands.append((m.start(), m.end(), kind))
    for m in _DOTTED.finditer(text):
        parts = m.group().split(".")
        start = m.start()
        while parts and parts[0] in ("self", "cls"):  # self.x.y → x.y
            start += len(parts[0]) + 1
            parts = parts[1:]
        if len(parts) >= 2 and not all(len(p) == 1 for p in parts):
            cands.append((start, m.end(), "identifier"))
        elif len(parts) == 1 and (kind := _identifier_kind(parts[0])):
            cands.append((start, m.end(), kind))
    for m in _WORD.finditer(text):
        if kind := _identifier_kind(m.group()):
            cands.append((m.start(), m.end(), kind))
    cands.extend(_names(text))
    # longest first, then leftmost; keep what does not overlap a kept span
    cands.sort(key=lambda c: (c[0] - c[1], c[0]))
    taken = bytearray(len(text))
    out = []
    for s, e, kind in cands:
        if 1 not in taken[s:e]:
            taken[s:e] = b"\x01" * (e - s)
            out.append((s, e, kind))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# masking one query


def span_token_ranges(spans: Sequence[tuple[int, int, str]], offsets: np.ndarray,
                      maskable: np.ndarray) -> np.ndarray:
    """Token ranges [a, b) of the spans (int64 (k, 2)): every token whose character span overlaps.

    Spans not wholly inside the tokens' character range (a window cut out of a longer text), spans
    covering no token and spans covering any non-maskable token are dropped; duplicates are merged.
    offsets: (n, 2) character [start, end) per token; maskable: (n,) bool.
    """
    none = np.zeros((0, 2), dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts  # (n,) tokens standing for text (special tokens may have (0, 0))
    if not len(spans) or not real.any():
        return none
    se = np.array([(s, e) for s, e, _ in spans], dtype=np.int64)  # (k, 2)
    se = se[(se[:, 0] >= starts[real].min()) & (se[:, 1] <= ends[real].max())]
    if not len(se):
        return none
    cover = (starts[None, :] < se[:, 1:2]) & (ends[None, :] > se[:, 0:1]) & real[None, :]  # (k, n)
    has = cover.any(1)
    a = cover.argmax(1)[has]  # first covered token
    b = cover.shape[1] - cover[:, ::-1].argmax(1)[has]  # one past the last covered token
    blocked = np.concatenate([[0], np.cumsum(~maskable)])  # (n + 1,) non-maskable tokens before i
    ok = blocked[b] == blocked[a]
    n1 = cover.shape[1] + 1
    code = np.unique(a[ok] * n1 + b[ok])  # sorted, deduplicated
    return np.stack([code // n1, code % n1], 1).astype(np.int64)


def _random_positions(maskable: np.ndarray, mask_rate: float, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(maskable)
    k = min(len(idx), max(1, int(round(mask_rate * len(idx)))))
    return np.sort(rng.choice(idx, size=k, replace=False)) if k else idx


def mask_query(ids: Sequence[int] | np.ndarray, offsets: np.ndarray, text: str,
               rng: np.random.Generator, *, mask_id: int, vocab_size: int,
               special_ids: Sequence[int] = (), mask_rate: float = 0.15, mode: str = "salient",
               bert_mix: bool = True, spans: Sequence[tuple[int, int, str]] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Mask one tokenized query → (masked_ids int32 (n,), labels int64 (n,), fell_back).

    ids: (n,) token ids; offsets: (n, 2) their character spans in `text` (special tokens may have
    (0, 0)); spans: precomputed `salient_spans(text)` (computed when None). `fell_back` is True when
    salient mode found no usable span and masked random tokens instead. See the module docstring.
    """
    _check_mode(mode, mask_rate)
    ids = np.asarray(ids, dtype=np.int32)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(len(ids), 2)
    special = _special_array(special_ids, mask_id)
    maskable = ~np.isin(ids, special)  # (n,)
    ranges = None
    if mode == "salient":
        ranges = span_token_ranges(salient_spans(text) if spans is None else spans, offsets, maskable)
    return _mask(ids, maskable, ranges, rng, mask_id, vocab_size, special, mask_rate, bert_mix)


def _check_mode(mode: str, mask_rate: float) -> None:
    if mode not in ("salient", "random"):
        raise ValueError(f"mode must be salient|random, got {mode!r}")
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")


def _special_array(special_ids: Sequence[int], mask_id: int) -> np.ndarray:
    """Sorted unique int64 ids that are never masked nor drawn as replacements ([MASK] included)."""
    return np.asarray(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=np.int64)


def _mask(ids: np.ndarray, maskable: np.ndarray, ranges: np.ndarray | None, rng: np.random.Generator,
          mask_id: int, vocab_size: int, special: np.ndarray, mask_rate: float,
          bert_mix: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Salient masking over token `ranges` (k, 2), or random masking when `ranges` is None."""
    out, labels = ids.copy(), np.full(len(ids), IGNORE, dtype=np.int64)
    n = int(maskable.sum())
    if n == 0:
        return out, labels, ranges is not None

    if ranges is not None:
        target = max(1, int(round(mask_rate * n)))
        cap = max(target, int(2 * mask_rate * n))
        ranges = ranges[ranges[:, 1] - ranges[:, 0] <= cap]
        chosen = np.zeros(len(ids), dtype=bool)
        count = 0
        for a, b in ranges[rng.permutation(len(ranges))].tolist():
            if count + (b - a) > cap or chosen[a:b].any():
                continue
            chosen[a:b] = True
            count += b - a
            if count >= target:
                break
        if count:
            labels[chosen] = ids[chosen]
            out[chosen] = mask_id
            return out, labels, False
        pos = _random_positions(maskable, mask_rate, rng)  # fallback: [MASK] only
        labels[pos], out[pos] = ids[pos], mask_id
        return out, labels, True

    pos = _random_positions(maskable, mask_rate, rng)
    labels[pos] = ids[pos]
    if not bert_mix:
        out[pos] = mask_id
        return out, labels, False
    u = rng.random(len(pos))
    out[pos[u < 0.8]] = mask_id
    swap = pos[(u >= 0.8) & (u < 0.9)]
    # uniform over the non-special ids: draw in [0, V - |special|), then step over each special id
    # in ascending order
    r = rng.integers(0, vocab_size - len(special), size=len(swap))
    for sp in special.tolist():
        r += r >= sp
    out[swap] = r
    return out, labels, False


# ---------------------------------------------------------------------------------------------
# queries from a wordpiece chunk store


@dataclass
class MaskedQueries:
    """Masked query examples, one row per source block (all numpy)."""

    ids: np.ndarray  # (n, query_tokens) int32 masked wordpiece ids (no [CLS]/[SEP]), pad_id after length
    labels: np.ndarray  # (n, query_tokens) int64 original id where masked, -100 elsewhere (and at pads)
    lengths: np.ndarray  # (n,) int32 real tokens per row
    block_ids: np.ndarray  # (n,) int64 the chunk-store block each query was cut from
    starts: np.ndarray  # (n,) int64 first token of the window within the block's re-tokenized text
    fell_back: np.ndarray  # (n,) bool salient mode found no span: random tokens masked instead

    @property
    def n_salient_fallback(self) -> int:
        return int(self.fell_back.sum())

    def __len__(self) -> int:
        return len(self.block_ids)


def _choose_window(n: int, q: int, word_start: np.ndarray, ranges: np.ndarray,
                   rng: np.random.Generator) -> int:
    """First token of a window of `q` tokens out of `n` (n > q).

    Candidate starts are tokens that begin a word (no "##" continuation) with the window inside the
    text; among those whose window holds at least one whole salient span one is drawn uniformly,
    else among all candidates; the last window position is always a candidate.
    """
    cand = np.flatnonzero(word_start[: n - q + 1])
    cand = np.union1d(cand, [n - q])  # (c,)
    if len(ranges):
        holds = ((ranges[None, :, 0] >= cand[:, None])
                 & (ranges[None, :, 1] <= cand[:, None] + q)).any(1)  # (c,)
        if holds.any():
            cand = cand[holds]
    return int(cand[rng.integers(len(cand))])


def make_queries(store, block_ids: Sequence[int] | np.ndarray, query_tokens: int, rng_seed: int = 0,
                 mode: str = "salient", mask_rate: float = 0.15, bert_mix: bool = True,
                 batch_size: int = 1024) -> MaskedQueries:
    """Masked queries from blocks of a wordpiece chunk store (`store.tokenizer` is WordPiece).

    Each block's `text` is re-tokenized with offsets; a block of at most `query_tokens` wordpieces is
    used whole, a longer one through one window (`_choose_window`: a random word-aligned window,
    in salient mode one holding a whole salient span when there is one). Rows keep the order of
    `block_ids`; [CLS]/[SEP] are the caller's (the query encoder and the reader wrap rows
    differently). The randomness of each block comes from `np.random.default_rng([rng_seed,
    block_id])`, so a block's query does not depend on which other blocks are in the call
    (deterministic per seed, shardable across workers).
    """
    tok = store.tokenizer
    if getattr(tok, "kind", "bpe") != "wordpiece":
        raise ValueError(f"make_queries needs a wordpiece chunk store, {store.path} is "
                         f"{getattr(tok, 'kind', 'bpe')}")
    if query_tokens < 1:
        raise ValueError(f"query_tokens must be >= 1, got {query_tokens}")
    _check_mode(mode, mask_rate)
    block_ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    n, q = len(block_ids), query_tokens
    ids = np.full((n, q), tok.pad_id, dtype=np.int32)
    labels = np.full((n, q), IGNORE, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int32)
    starts = np.zeros(n, dtype=np.int64)
    fell_back = np.zeros(n, dtype=bool)
    special = _special_array(tok.special_ids, tok.mask_id)
    salient = mode == "salient"
    for b0 in range(0, n, batch_size):
        part = block_ids[b0:b0 + batch_size]
        texts = store.texts(part)
        for r, (bid, text, (tid, off)) in enumerate(
                zip(part.tolist(), texts, tok.encode_batch_offsets(texts)), start=b0):
            rng = np.random.default_rng([rng_seed, bid])
            maskable = ~np.isin(tid, special)  # (len(tid),)
            ranges = span_token_ranges(salient_spans(text), off, maskable) if salient else None
            s = 0
            if len(tid) > q:
                s = _choose_window(len(tid), q, ~tok.is_subword[tid],
                                   ranges if salient else np.zeros((0, 2), np.int64), rng)
                tid, maskable = tid[s:s + q], maskable[s:s + q]
                if salient:  # the spans wholly inside the window, in window positions
                    ranges = ranges[(ranges[:, 0] >= s) & (ranges[:, 1] <= s + q)] - s
            masked, lab, fb = _mask(tid, maskable, ranges, rng, tok.mask_id, tok.vocab_size,
                                    special, mask_rate, bert_mix)
            k = len(tid)
            ids[r, :k], labels[r, :k], lengths[r], starts[r], fell_back[r] = masked, lab, k, s, fb
    return MaskedQueries(ids, labels, lengths, block_ids, starts, fell_back)
